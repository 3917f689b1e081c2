"""kopf's peering rule, as the operator applies it to its own passes (standby.py): stand by while another live
replica has a higher priority or the same one; a dead one (its lastseen older than its lifetime) counts for
nothing. And while this replica's own entry is missing or dead and another replica is alive, which then acts."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

import pytest

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import kube
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ApiError
from llm_telemetry_operator.handlers import (
    HEARTBEAT_SECONDS,
    RELIST_ATTEMPTS,
    OperatorState,
    _check_standby,
    _heartbeat,
    _mark_stopped,
    _paused,
    _stopped_at,
)
from llm_telemetry_operator.standby import alive_until, standing_by

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float = 1, lifetime: int = 60) -> dict[str, Any]:
    seen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lastseen": seen.isoformat(), "lifetime": lifetime}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, False),
        (None, False),
        ({"me": peer(10)}, False),
        ({"me": peer(10), "other": peer(5)}, False),
        ({"me": peer(10), "other": peer(20)}, True),
        ({"me": peer(10), "other": peer(10)}, True),  # kopf pauses every replica of the same priority
        ({"me": peer(10), "other": peer(20, seconds_ago=61)}, False),  # dead: its lifetime has passed
        ({"me": peer(10), "other": peer(20, seconds_ago=100, lifetime=120)}, True),
        ({"other": peer(20)}, True),  # this replica not written yet
        # Missing or dead itself, it is nobody's peer: the live one acts (kopf there sees no one above it).
        ({"other": peer(5)}, True),
        ({"me": peer(10, seconds_ago=61), "other": peer(5)}, True),
        ({"other": peer(5, seconds_ago=61)}, False),  # nobody else alive: it acts alone
        ({"me": peer(10, seconds_ago=61)}, False),
        ({"me": peer(10), "other": {"priority": "x", "lastseen": "never"}}, False),  # nothing kopf wrote
        (
            {"me": peer(10), "other": {**peer(20), "lastseen": (NOW - datetime.timedelta(seconds=1)).isoformat()[:-6]}},
            True,
        ),
    ],
)
def test_standing_by_follows_kopfs_peering_rule(status: Any, expected: bool) -> None:
    assert standing_by(status, "me", 10, NOW) is expected


def test_alive_until_is_the_entrys_lastseen_plus_its_lifetime() -> None:
    assert alive_until({"me": peer(10, seconds_ago=5, lifetime=60)}, "me") == NOW + datetime.timedelta(seconds=55)
    assert alive_until({"other": peer(5)}, "me") is None
    assert alive_until({"me": {"priority": 10, "lastseen": "never"}}, "me") is None
    assert alive_until(None, "me") is None


class PeeringReads:
    """What the standby check reads: the peering object as kopf keeps it, and the LLMTelemetry resources."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.listed: list[str] = []
        self.refused = 0  # lists of the resources answered 503 before one is served
        self.annotations: dict[str, str] = {}  # the peering object's, written by the active replica
        self.patches = 0
        self.patch_failures: list[int] = []  # statuses the next patches of the peering object answer

    async def list(self, resource: kube.Resource, namespace: str | None, *_: Any, **__: Any) -> list[dict[str, Any]]:
        self.listed.append(resource.plural)
        if resource is kube.CLUSTERKOPFPEERINGS:
            return [{"metadata": {"name": "llm-telemetry", "annotations": self.annotations}, "status": self.status}]
        if self.refused:
            self.refused -= 1
            raise ApiError(503, "ServiceUnavailable", "the API server is starting")
        return []

    async def patch(
        self, resource: kube.Resource, namespace: str | None, name: str, patch: dict[str, Any], **_: Any
    ) -> dict[str, Any]:
        assert resource is kube.CLUSTERKOPFPEERINGS and namespace is None
        self.patches += 1
        if self.patch_failures:
            status = self.patch_failures.pop(0)
            raise ApiError(status, "Failed", f"clusterkopfpeerings answered {status}")
        self.annotations.update(patch["metadata"]["annotations"])
        return {}


async def check(reads: PeeringReads, config: OperatorConfig, state: OperatorState, log: logging.Logger) -> None:
    """One look at the peering object, and the write of the watched namespaces it started, if any."""
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    if state.publishing is not None:
        await state.publishing


def entry(seconds_ago: float, priority: int = 10) -> dict[str, Any]:
    seen = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lastseen": seen.isoformat(), "lifetime": 60}


async def test_a_replica_stands_by_once_its_entry_may_have_expired_until_it_reads_it_renewed() -> None:
    """Its keepalive was due before a freeze too short to notice (or the peering object could not be read): another
    replica may have taken over. It acts again only once it has read its entry renewed, and the resources again."""
    reads, state = PeeringReads(), OperatorState()
    config = OperatorConfig(peering="llm-telemetry", priority=10)
    log = logging.getLogger("test")
    reads.status = {"me": entry(seconds_ago=58), "other": entry(seconds_ago=1, priority=5)}
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    assert not _paused(state)
    await asyncio.sleep(2.1)  # past its lastseen + lifetime
    assert _paused(state)
    reads.status["me"] = entry(seconds_ago=0)
    reads.listed.clear()
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    assert not _paused(state)
    assert kube.LLMTELEMETRIES.plural in reads.listed  # what it knew is read again before it acts


async def test_a_replica_whose_event_loop_stalled_stands_by_until_it_reads_the_peering_object_again() -> None:
    """Its event loop did not run for longer than frozen_seconds (SIGSTOP, a paused VM, a stalled node), though its
    lease, as last read, still runs: it stands by from the moment it runs again, before anything its freeze held
    back acts on what it knew, and acts again once it has read its entry and the resources anew."""
    reads, state = PeeringReads(), OperatorState(frozen_seconds=2.0)
    config = OperatorConfig(peering="llm-telemetry", priority=10)
    log = logging.getLogger("test")
    reads.status = {"me": entry(seconds_ago=0), "other": entry(seconds_ago=0, priority=5)}
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    heartbeat = asyncio.create_task(_heartbeat(state))
    try:
        await asyncio.sleep(0.1)
        assert not _paused(state)
        # The freeze: blocking, so that nothing on the event loop runs.
        time.sleep(max(HEARTBEAT_SECONDS, state.frozen_seconds) + 0.5)  # noqa: ASYNC251
        await asyncio.sleep(0.1)  # running again, its heartbeat ticks: it stands by until it has read the peering
        assert _paused(state)
        reads.listed.clear()
        await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
        assert not _paused(state)
        assert kube.LLMTELEMETRIES.plural in reads.listed  # what it knew is read again before it acts
    finally:
        heartbeat.cancel()


async def test_an_entry_already_dead_at_startup_is_no_lease() -> None:
    """A pod restarted under the same name finds its old entry dead: alone, it acts at once (kopf renews it)."""
    reads, state = PeeringReads(), OperatorState()
    reads.status = {"me": entry(seconds_ago=300)}
    await _check_standby(
        reads, OperatorConfig(peering="llm-telemetry", priority=10), state, "me", logging.getLogger("t")
    )  # type: ignore[arg-type]
    assert not _paused(state)


async def test_a_replica_active_again_stands_by_while_it_cannot_list_the_resources() -> None:
    """What it knew is as old as its pause: it acts again once it has read the resources anew, not before; after
    RELIST_ATTEMPTS failed lists it acts on what it knew (and what its watch delivers), rather than idle for good."""
    reads, state = PeeringReads(), OperatorState()
    config, log = OperatorConfig(peering="llm-telemetry", priority=10), logging.getLogger("test")
    reads.status = {"me": entry(seconds_ago=0), "other": entry(seconds_ago=0, priority=20)}
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    assert _paused(state)
    del reads.status["other"]  # the other replica has gone
    reads.refused = 1
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    assert _paused(state)  # the list failed: still standing by
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    assert not _paused(state)
    reads.status["other"] = entry(seconds_ago=0, priority=20)
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    del reads.status["other"]
    reads.refused = 100
    for _ in range(RELIST_ATTEMPTS):
        await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
        assert _paused(state)
    await _check_standby(reads, config, state, "me", log)  # type: ignore[arg-type]
    assert not _paused(state)


async def test_the_active_replica_says_once_on_the_peering_object_which_namespaces_the_operator_watches() -> None:
    """Another operator reads it to tell whether this one still serves a namespace (see test_two_operators.py), and
    relies on it only while the replica named with it has an entry. A replica standing by writes nothing; the active
    one writes it once, and again only if it is changed, or was written by another replica."""
    reads, state, log = PeeringReads(), OperatorState(), logging.getLogger("test")
    config = OperatorConfig(peering="llm-telemetry", priority=10, namespaces=("llm", "team-b"))
    reads.status = {"me": entry(seconds_ago=0), "other": entry(seconds_ago=0, priority=20)}
    await check(reads, config, state, log)
    assert reads.patches == 0
    del reads.status["other"]
    for _ in range(3):
        await check(reads, config, state, log)
    said = {c.ANNOTATION_WATCHED: "llm,team-b", c.ANNOTATION_WATCHED_BY: "me"}
    assert reads.annotations == said and reads.patches == 1
    reads.annotations[c.ANNOTATION_WATCHED] = "*"  # another release of the same peering name, say
    await check(reads, config, state, log)
    assert reads.annotations == said and reads.patches == 2
    reads.annotations[c.ANNOTATION_WATCHED_BY] = "other"  # the replica active before this one
    await check(reads, config, state, log)
    assert reads.annotations == said and reads.patches == 3


async def test_a_refused_write_of_the_watched_namespaces_is_said_once_and_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """403: the chart's RBAC does not let it (a chart from before); asked again, it would be refused again."""
    reads, state, log = PeeringReads(), OperatorState(), logging.getLogger("test")
    reads.status, reads.patch_failures = {"me": entry(seconds_ago=0)}, [403]
    with caplog.at_level(logging.WARNING, logger="test"):
        for _ in range(3):
            await check(reads, OperatorConfig(peering="llm-telemetry", priority=10), state, log)
    assert reads.patches == 1 and not _paused(state) and reads.annotations == {}
    assert len([r for r in caplog.records if "watched namespaces" in r.getMessage()]) == 1


@pytest.mark.parametrize("status", [0, 503, 429])
async def test_a_failed_write_of_the_watched_namespaces_is_tried_again(
    caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """A connection reset, or an API server failing for a while: written at a later read of the peering object (a
    narrowed release whose write failed once would otherwise keep its resources in the namespaces it dropped)."""
    reads, state, log = PeeringReads(), OperatorState(), logging.getLogger("test")
    reads.status, reads.patch_failures = {"me": entry(seconds_ago=0)}, [status, status]
    with caplog.at_level(logging.WARNING, logger="test"):
        for _ in range(4):
            await check(reads, OperatorConfig(peering="llm-telemetry", priority=10), state, log)
    assert reads.patches == 3
    assert reads.annotations == {c.ANNOTATION_WATCHED: "*", c.ANNOTATION_WATCHED_BY: "me"}
    assert len([r for r in caplog.records if "watched namespaces" in r.getMessage()]) == 1


async def test_the_replica_active_until_the_stop_says_when_it_stopped() -> None:
    """kopf takes its entry out before the cleanup runs, so its last read may have shown it another replica's
    standby: it says so all the same. A replica that stood by says nothing (the active one goes on)."""
    reads, log = PeeringReads(), logging.getLogger("test")
    config = OperatorConfig(peering="llm-telemetry", priority=10)
    state = OperatorState()
    reads.status = {"me": entry(seconds_ago=0), "other": entry(seconds_ago=0, priority=5)}
    await check(reads, config, state, log)
    assert not _paused(state)
    del reads.status["me"]  # kopf took this replica's entry out as it stopped
    await check(reads, config, state, log)
    assert _paused(state)
    await _mark_stopped(reads, config, state, log)  # type: ignore[arg-type]
    assert c.ANNOTATION_STOPPED in reads.annotations

    standing_by, reads = OperatorState(), PeeringReads()
    reads.status = {"me": entry(seconds_ago=0), "other": entry(seconds_ago=0, priority=20)}
    await check(reads, config, standing_by, log)
    await _mark_stopped(reads, config, standing_by, log)  # type: ignore[arg-type]
    assert reads.annotations == {}


def test_a_stop_mark_far_in_the_future_counts_for_nothing() -> None:
    """A clock far ahead, or a hand-written date, would otherwise hold another operator's resources for good."""
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)
    assert _stopped_at({"metadata": {"annotations": {c.ANNOTATION_STOPPED: soon.isoformat()}}}) == soon
    for far in ("9999-12-31T23:59:59+00:00", (soon + datetime.timedelta(hours=1)).isoformat()):
        assert _stopped_at({"metadata": {"annotations": {c.ANNOTATION_STOPPED: far}}}) is None


async def test_an_operator_is_taken_as_gone_only_when_seen_so_twice_apart_and_not_long_apart() -> None:
    """Its peering object with no replica and no stop mark: maybe read between kopf taking a stopping replica's
    entry out and the operator's cleanup saying it stopped. Gone once seen so again takeover_confirm_seconds later;
    a sighting long before (what it did since is unknown) starts a new confirmation."""
    from llm_telemetry_operator.handlers import _held_elsewhere

    class TheirPeering:
        async def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
            return [{"metadata": {"name": "theirs"}, "status": {}}]

    state = OperatorState()
    config = OperatorConfig(peering="mine")
    memo = {"config": config, "client": TheirPeering(), "state": state}
    body = {"metadata": {"namespace": "llm", "name": "chat"}, "status": {"operator": "theirs"}}
    confirm, holder_check = config.timers.takeover_confirm_seconds, config.timers.holder_check_seconds

    def later(seconds: float) -> None:
        """As if ``seconds`` had passed since the sightings so far (and the cached read had expired)."""
        state.holders_gone["theirs"] -= seconds
        checked, alive, watched = state.holders["theirs"]
        state.holders["theirs"] = (checked - max(seconds, holder_check + 1), alive, watched)

    assert await _held_elsewhere(memo, body) == "theirs"  # first sighting: left to it for now
    later(confirm / 2)
    assert await _held_elsewhere(memo, body) == "theirs"
    later(confirm / 2 + 1)
    assert await _held_elsewhere(memo, body) is None  # seen gone twice, far enough apart

    state.holders.clear()
    state.holders_gone["theirs"] -= 1000  # that sighting is long past
    assert await _held_elsewhere(memo, body) == "theirs"  # a new confirmation starts
