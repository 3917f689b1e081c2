"""Whether this replica stands by: kopf's peering rule, applied to the operator's own passes too.

kopf pauses its handlers while another live replica in the peering object has a higher priority (or the same one),
but the operator also runs passes of its own: its retries and resyncs (``schedule.py``) and the passes its watches
of workloads and children start (``childwatch.py``). Those know nothing of kopf's pause, so a standby replica would
go on acting, with the specs it knew before it paused (kopf's watch of the LLMTelemetry resources is paused with
it): on a real API server two replicas then fought over every Deployment, one rollout after another, and a standby
replica put back the injection of a resource just deleted. The operator reads the peering objects itself and runs
no pass of its own while kopf would stand by.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

#: Seconds between two reads of the peering objects: how long a replica that should stand by may still act.
POLL_SECONDS = 2.0


def standing_by(status: Any, identity: str, priority: int, now: datetime.datetime | None = None) -> bool:
    """kopf's rule for one peering object's ``status`` (``{identity: {priority, lastseen, lifetime}}``): stand by
    while another live peer has a higher priority, or the same one (kopf then pauses all of them).

    And while this replica's own entry is missing or dead and another peer is alive: that peer then sees no one
    above it and acts. kopf removes an entry it reads as dead, its own included: a replica frozen past its lifetime
    reads, once it runs again, the peering events queued meanwhile, and takes its just renewed entry out again until
    its next keepalive, up to a minute later. Acting meanwhile, it would act beside the replica that took over."""
    if not isinstance(status, Mapping):
        return False
    now = now or datetime.datetime.now(datetime.UTC)
    registered = others = False
    for peer, info in status.items():
        if not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.datetime.fromisoformat(str(info.get("lastseen")))
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=datetime.UTC)
            alive = seen + datetime.timedelta(seconds=int(info.get("lifetime", 60))) > now
            other = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue  # an entry kopf could not have written: kopf ignores it too
        if peer == identity:
            registered = registered or alive
        elif alive and other >= priority:
            return True
        else:
            others = others or alive
    return others and not registered
