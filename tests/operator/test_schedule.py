"""The operator's own schedule of passes: retries back off, resyncs spread over the interval."""

from __future__ import annotations

import pytest

from llm_telemetry_operator.schedule import Schedule


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resyncs_of_resources_passed_together_spread_over_the_interval() -> None:
    """A thousand resources created (or resumed) in the same second resync over the whole interval, none sooner
    than half an interval after its pass and none later than one and a half."""
    clock = Clock()
    schedule = Schedule(interval=300, clock=clock)
    keys = [("llm", f"chat-{i}") for i in range(1000)]
    due = [schedule.succeeded(key, f"uid-{i}") - clock.now for i, key in enumerate(keys)]
    assert all(150 <= d <= 450 for d in due)
    # Thirty buckets of ten seconds over one interval: each holds about a thirtieth of the resyncs.
    buckets = [0] * 30
    for d in due:
        buckets[int((d - 150) // 10) % 30] += 1
    assert max(buckets) < 3 * 1000 / 30, buckets
    # And the same resource keeps its place: its next resync is one interval after this one.
    clock.now += due[0]
    assert schedule.pop_due() and abs(schedule.succeeded(keys[0], "uid-0") - clock.now - 300) < 1e-6


def _retry_fails(schedule: Schedule, clock: Clock, key: tuple[str, str]) -> float:
    """The retry due comes (the clock moved to it, the scheduler takes it) and fails: the delay of the next one."""
    clock.now = schedule.due[key][0]
    assert schedule.pop_due() == [(key, "retry")]
    return schedule.failed(key) - clock.now


def test_failures_back_off_until_a_success_resets_them() -> None:
    clock = Clock()
    schedule = Schedule(interval=300, retry_base=5, clock=clock)
    key = ("llm", "chat")
    delays = [schedule.failed(key) - clock.now] + [_retry_fails(schedule, clock, key) for _ in range(7)]
    for n, d in enumerate(delays, start=1):
        assert 0.5 * min(300, 5 * 2 ** (n - 1)) <= d <= min(300, 5 * 2 ** (n - 1))
    assert schedule.failed(key, retry_after=7) - clock.now == 7  # the server's Retry-After wins
    schedule.succeeded(key, "uid")
    assert schedule.failed(key) - clock.now <= 5


def test_passes_failing_before_the_retry_is_due_do_not_push_it_back() -> None:
    """A blip of two seconds: the failed pass's own writes echo back as watch events, each starting a pass that
    fails too. Counted as failures in a row, they doubled the wait a dozen times (a 2 s outage, retried after
    four minutes); the retry scheduled after the first failure stands, and only its own failure backs off."""
    clock = Clock()
    schedule = Schedule(interval=300, retry_base=5, clock=clock)
    key = ("llm", "chat")
    first = schedule.failed(key)
    for _ in range(30):
        clock.now += 0.05
        assert schedule.failed(key) == first
    assert first - 1000.0 <= 5
    assert 5 <= _retry_fails(schedule, clock, key) <= 10  # the second failure of a retry: the second step


def test_due_passes_are_handed_out_once_in_time_order() -> None:
    clock = Clock()
    schedule = Schedule(interval=60, clock=clock)
    schedule.failed(("llm", "a"), retry_after=2)
    schedule.failed(("llm", "b"), retry_after=1)
    schedule.failed(("llm", "c"), retry_after=10)
    schedule.failed(("llm", "a"), retry_after=3)  # rescheduled: only the later time counts
    schedule.forget(("llm", "c"))
    clock.now += 2.5
    assert schedule.pop_due() == [(("llm", "b"), "retry")]
    clock.now += 1
    assert schedule.pop_due() == [(("llm", "a"), "retry")]
    assert schedule.pop_due() == [] and schedule.next_time() is None


@pytest.mark.parametrize("before", [1.0, 0.0], ids=["still-to-come", "due-not-yet-taken"])
def test_a_pass_for_a_kind_served_now_stands_when_a_pass_fails_before_it(before: float) -> None:
    """The Prometheus Operator's CRDs came to be served: a pass is due in seconds for each resource, however far its
    retry had backed off. An event's pass failing meanwhile (the retry's count is high), while that pass is still to
    come or once its time has come but before the scheduler (which wakes on the event loop after the failing pass)
    has taken it, leaves it where it is, and it is handed out as what it is."""
    clock = Clock()
    schedule = Schedule(interval=300, retry_base=5, clock=clock)
    key = ("llm", "chat")
    schedule.failed(key)
    for _ in range(6):
        _retry_fails(schedule, clock, key)
    assert schedule.due[key][0] - clock.now > 2
    soon = schedule.again(key, 2, "served")
    clock.now = soon - before
    assert schedule.failed(key) == soon
    clock.now = soon
    assert schedule.pop_due() == [(key, "served")]
