"""kopf's peering rule, as the operator applies it to its own passes (standby.py): stand by while another live
replica has a higher priority or the same one; a dead one (its lastseen older than its lifetime) counts for
nothing. And while this replica's own entry is missing or dead and another replica is alive, which then acts."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from llm_telemetry_operator.standby import standing_by

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
