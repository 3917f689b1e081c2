"""When each LLMTelemetry gets its next pass of the operator's own: a retry after a failure, or the periodic resync.

kopf's own retries do not fit: a handler that raises ``TemporaryError`` is retried by kopf through two patches
of the resource (its progress record, then a touch to wake itself up later), for every retry of every resource,
whether or not anything changed; and kopf keeps a task per resource for a daemon or timer, which it may start
anew for a watch event arriving while it shuts down. So the handlers end normally and note here when the
resource wants its next pass; one task of the operator's (started at startup, cancelled at cleanup) runs the
passes that are due. A pass that writes nothing when nothing changed then costs no writes, retried or not.

- After a failed pass (an API error, a missing CRD, a child that could not be created): a retry after
  ``retry_base * 2**(failures - 1)`` seconds, capped at the resync interval, each wait drawn between half and
  all of it, so resources that failed together do not retry together; the server's ``Retry-After`` wins when it gave
  one. ``failures`` counts the failed retries in a row (and the first failure): passes that fail in between,
  started by watch events, change nothing.
- After a successful pass: the periodic resync. Each resource has a fixed place (phase) in the resync interval,
  taken from a hash of its uid, and is resynced at the first point of its phase at least half an interval after
  its last pass. So the resyncs of N resources are spread evenly over the interval, however they were created
  (all at once, at a restart), and no resource waits more than one and a half intervals.
"""

from __future__ import annotations

import heapq
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

#: Seconds before the first retry of a failed pass; doubled for each further failure in a row.
RETRY_BASE = 5.0

Key = tuple[str, str]


def phase(uid: str, interval: float) -> float:
    """The resource's fixed offset in the resync interval, in [0, interval): evenly spread over uids."""
    return zlib.crc32(uid.encode()) / 2**32 * interval


@dataclass
class Schedule:
    """Due times of the operator's own passes, by (namespace, name).

    Args:
        interval: seconds of the resync period.
        retry_base: seconds before the first retry after a failure.
        clock: a monotonic clock (seconds).

    Example::

        schedule = Schedule(interval=300)
        schedule.succeeded(("llm", "chat"), "uid-1")     # next: its resync
        schedule.failed(("llm", "chat"), retry_after=2)  # next: a retry in 2 s
        due = schedule.pop_due()                          # keys whose time has come
    """

    interval: float
    retry_base: float = RETRY_BASE
    clock: Callable[[], float] = time.monotonic
    #: Next pass of each resource: (when, why) with why "retry", "resync", "resume" or "served".
    due: dict[Key, tuple[float, str]] = field(default_factory=dict)
    #: Failed passes in a row, by resource.
    failures: dict[Key, int] = field(default_factory=dict)
    _heap: list[tuple[float, Key]] = field(default_factory=list)
    _epoch: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._epoch = self.clock()

    def succeeded(self, key: Key, uid: str) -> float:
        """A pass succeeded (or found the spec invalid, which only a change mends): schedule the resync."""
        self.failures.pop(key, None)
        now = self.clock()
        earliest = now + self.interval / 2
        offset = self._epoch + phase(uid or "/".join(key), self.interval)
        periods = max(0, -(-(earliest - offset) // self.interval))  # ceil, on the resource's grid
        return self._set(key, offset + periods * self.interval, "resync")

    def resume(self, key: Key) -> float:
        """This replica became the active one: a pass now (the scheduler runs a few at a time)."""
        self.failures.pop(key, None)
        return self._set(key, self.clock(), "resume")

    def failed(self, key: Key, retry_after: float | None = None) -> float:
        """A pass failed: schedule a retry with backoff (or after ``retry_after`` when the server said). A pass that
        failed while a retry was still to come (one a watch event started: the echoes of a failed pass's own writes
        start more) leaves that retry as it is: only the retries' own failures lengthen the wait, so a blip of two
        seconds is retried seconds later, not minutes. One whose time has come stands too: the scheduler takes it as
        soon as it wakes, and a pass that fails just before must not put it off by the backoff."""
        pending = self.due.get(key)
        now = self.clock()
        if retry_after is None and pending is not None and pending[1] in ("retry", "served"):
            return pending[0]
        count = self.failures[key] = self.failures.get(key, 0) + 1
        if retry_after is not None:
            delay = max(retry_after, 0.0)
        else:
            delay = random.uniform(0.5, 1.0) * min(self.interval, self.retry_base * 2 ** (count - 1))
        return self._set(key, now + delay, "retry")

    def again(self, key: Key, delay: float, why: str = "retry") -> float:
        """Look at the resource again in ``delay`` seconds: as a retry (something it waits on is being confirmed),
        or ``why`` "served" (a kind it may have waited for is served now). Either stands as a retry does: a pass
        that fails before it leaves it as it is."""
        return self._set(key, self.clock() + delay, why)

    def forget(self, key: Key) -> None:
        self.due.pop(key, None)
        self.failures.pop(key, None)

    def next_time(self) -> float | None:
        """When the earliest pass is due, or None when none is scheduled."""
        while self._heap and self.due.get(self._heap[0][1], (None, ""))[0] != self._heap[0][0]:
            heapq.heappop(self._heap)  # rescheduled or forgotten since
        return self._heap[0][0] if self._heap else None

    def pop_due(self) -> list[tuple[Key, str]]:
        """The resources whose pass is due now, with why; they are unscheduled until their pass reports back."""
        now = self.clock()
        found = []
        while (when := self.next_time()) is not None and when <= now:
            _, key = heapq.heappop(self._heap)
            found.append((key, self.due.pop(key)[1]))
        return found

    def _set(self, key: Key, when: float, why: str) -> float:
        self.due[key] = (when, why)
        heapq.heappush(self._heap, (when, key))
        return when
