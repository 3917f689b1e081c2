"""Bounded label values: each label keeps at most N distinct values and folds the rest into ``other``."""

from __future__ import annotations

import threading

from .instruments import OTHER


class LabelLimiter:
    """Remembers the first ``max_values`` distinct values per label.

    Args:
        max_values: distinct values kept per label; later new values become ``"other"``.

    Example::

        limit = LabelLimiter(2)
        limit("model", "a"), limit("model", "b"), limit("model", "c")   # ('a', 'b', 'other')
    """

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if value in seen:
                return value
            if len(seen) >= self.max_values:
                return OTHER
            seen.add(value)
            return value
