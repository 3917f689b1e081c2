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
        until = alive_until(status, peer)
        try:
            other = int(info.get("priority", 0))
        except (AttributeError, TypeError, ValueError):
            continue  # an entry kopf could not have written: kopf ignores it too
        if until is None:
            continue
        alive = until > now
        if peer == identity:
            registered = registered or alive
        elif alive and other >= priority:
            return True
        else:
            others = others or alive
    return others and not registered


def alive_until(status: Any, identity: str) -> datetime.datetime | None:
    """Until when the other replicas see this one alive by its entry in a peering object's ``status`` (its
    ``lastseen`` plus its ``lifetime``): past it, one of them may take over. None without a readable entry."""
    info = status.get(identity) if isinstance(status, Mapping) else None
    if not isinstance(info, Mapping):
        return None
    try:
        seen = datetime.datetime.fromisoformat(str(info.get("lastseen")))
        lifetime = int(info.get("lifetime", 60))
    except (TypeError, ValueError):
        return None
    return (seen if seen.tzinfo else seen.replace(tzinfo=datetime.UTC)) + datetime.timedelta(seconds=lifetime)
