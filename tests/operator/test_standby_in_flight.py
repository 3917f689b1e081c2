"""A pass already under way when its replica begins to stand by writes nothing more: another replica has taken over
and acts on what it reads now, and this one's pass, which read the cluster before, would write what it knew beside
it. The operator's API client refuses every write while the replica stands by (``handlers._paused``); the pass
stops there, and the resource gets a pass once the replica is active again."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import pytest
from kopf_testing import (
    CLUSTERKOPFPEERINGS,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    SERVICES,
    condition,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    is_write,
    minimal_llmt,
    posted_events,
    ready,
    running_operator,
)
from test_operator_kmock import env_of, hand

from llm_telemetry_operator import handlers
from llm_telemetry_operator.standby import POLL_SECONDS

#: The pass's read of the workloads its selector picks: after it, the pass patches the Deployment.
WORKLOADS_READ = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
#: Polls (of 0.05 s) for the replica to read the peering object: a few of its reads, every POLL_SECONDS.
STANDBY_SEEN = int(5 * POLL_SECONDS / 0.05)
STOPPED = "stopped: this replica stands by"


def operator_writes(emulator: Any, since: int) -> list[str]:
    """The operator's writes from request ``since`` on, but for kopf's keepalives of its peering entry."""
    return [
        f"{r.method.value} {r.url.path}"
        for r in list(emulator)[since:]
        if is_write(r) and not r.headers.get("X-Test-Hand") and "kopfpeerings" not in str(r.url.path)
    ]


async def test_a_pass_under_way_when_its_replica_begins_to_stand_by_writes_nothing_more(
    emulator: Any, monitoring_crds: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The first pass of a resource has read its workloads when another replica (of a higher priority) takes over:
    the Deployment's injection, the metrics Service and the status are the new active replica's to write. Once the
    other replica has gone, this one is active again and gives the resource its pass."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    caplog.set_level(logging.INFO)
    # The API server answers the pass's read of the workloads only once the test lets it: meanwhile the replica
    # begins to stand by.
    emulator.holds = lambda request: (
        request.method == "GET" and request.path == WORKLOADS_READ and "labelSelector" in request.query
    )
    peering = f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}"
    async with running_operator() as memo:
        await eventually(lambda: emulator.held, "the pass's read of the workloads under way")
        state, me = handlers._state(memo), str(memo["identity"])

        def entered() -> bool:
            return me in ((get(emulator, CLUSTERKOPFPEERINGS, PEERING, None) or {}).get("status") or {})

        await eventually(entered, "this replica's peering entry (another replica's outranks it)")
        now = datetime.datetime.now(datetime.UTC).isoformat()
        other = {"priority": 100, "lastseen": now, "lifetime": 60}
        await hand(emulator, "PATCH", peering, {"status": {"other": other}})
        await eventually(lambda: state.standby, "this replica standing by", STANDBY_SEEN)
        since = len(list(emulator))
        emulator.released.set()  # the read answered: the pass goes on, with what it read
        await eventually(
            lambda: any(STOPPED in r.getMessage() for r in caplog.records) or operator_writes(emulator, since),
            "the pass stopped, or written on",
        )
        assert operator_writes(emulator, since) == []
        # Stopped quietly: its one log line, no error, no Warning event, nothing in the status.
        # (The pass kopf's handler asked for, or the one the watch of the Deployment did: whichever took the lock.)
        (line,) = [r.getMessage() for r in caplog.records if STOPPED in r.getMessage()]
        assert line.startswith("llm/chat: pass (") or line.startswith("pass ("), line
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert posted_events(emulator) == []
        assert "conditions" not in (get(emulator, LLMT, "chat").get("status") or {})
        assert "LLM_TELEMETRY_METRICS_PORT" not in env_of(get(emulator, DEPLOYMENTS, "chat"))
        assert get(emulator, SERVICES, "chat-llm-metrics") is None
        # Still nothing written once the replica has read the peering object again (still standing by).
        reads = sum(1 for r in list(emulator) if str(r.url.path).endswith("/clusterkopfpeerings"))
        await eventually(
            lambda: sum(1 for r in list(emulator) if str(r.url.path).endswith("/clusterkopfpeerings")) > reads + 1,
            "the peering object read again",
            STANDBY_SEEN,
        )
        assert state.standby
        assert operator_writes(emulator, since) == []

        # The other replica has gone: this one is active again, and the resource gets its pass.
        await hand(emulator, "PATCH", peering, {"status": {"other": None}})
        found = await ready(emulator, attempts=STANDBY_SEEN + 300)
        assert condition(found, "Ready")["status"] == "True"
        assert env_of(get(emulator, DEPLOYMENTS, "chat"))["LLM_TELEMETRY_METRICS_PORT"] == "9464"
        assert get(emulator, SERVICES, "chat-llm-metrics") is not None
        assert f"PATCH {WORKLOADS_READ}/chat" in operator_writes(emulator, since)
