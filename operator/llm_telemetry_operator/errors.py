"""Exceptions the operator raises; handlers turn them into conditions, events and retries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ConfigurationError(ValueError):
    """The operator's own environment is unusable; raised at startup, the message names the variable."""


#: The longest message a SpecError carries into the resource's conditions and events: it may quote the spec's values
#: (a label value, a header name), which the schema leaves unbounded.
MAX_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class Listed:
    """Names in a message that :func:`bounded` may shorten: as many as fit, in order (at most ``most``), then
    ``and N more``."""

    items: Sequence[str]
    sep: str = ", "
    most: int | None = None


def bounded(*parts: str | Listed, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message of fixed words and lists of names, within ``limit`` characters: each list names as many of its
    items as fit, whole and in order, and says how many more there are (``, and 12 more``); the room the fixed words
    leave is shared between the lists, a short one giving what it does not need to the others. kopf cuts a longer
    event message in its middle (a user would read half a name); conditions carry the same words. Only fixed words
    longer than ``limit`` on their own are cut, at the end, with ``…``."""
    lists = [i for i, part in enumerate(parts) if isinstance(part, Listed)]
    room = max(0, limit - sum(len(part) for part in parts if isinstance(part, str)))
    full = {i: len(_named(parts[i], limit)) for i in lists}  # type: ignore[arg-type]
    # Each list names its first item, if the room allows it for all; what is left is shared.
    first = {i: min(full[i], _first(parts[i])) for i in lists}  # type: ignore[arg-type]
    width = dict.fromkeys(lists, 0)
    if sum(first.values()) <= room:
        width, room = first, room - sum(first.values())
    for left, i in enumerate(sorted(lists, key=lambda i: full[i] - width[i]), start=-len(lists)):
        extra = min(full[i] - width[i], room // -left)
        width[i] += extra
        room -= extra
    text = "".join(part if isinstance(part, str) else _named(part, width[i]) for i, part in enumerate(parts))
    return clipped(text, limit)


def clipped(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text``, or its first ``limit`` - 1 characters and ``…``: for a text that is no list of names (an API
    error's)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first(listed: Listed) -> int:
    """The width ``listed`` takes naming its first item only, with the count of the others."""
    items = listed.items
    if not items or listed.most == 0:
        return len(f"and {len(items)} more") if items else 0
    return len(str(items[0])) + (len(f"{listed.sep}and {len(items) - 1} more") if len(items) > 1 else 0)


def _named(listed: Listed, width: int) -> str:
    """As many of ``listed``'s items as fit in ``width`` characters with the count of the others."""
    items, sep = [str(item) for item in listed.items], listed.sep
    most = len(items) if listed.most is None else max(0, listed.most)
    if len(items) <= most and len(sep.join(items)) <= width:
        return sep.join(items)
    used = 0
    for count, item in enumerate(items):
        more = f"{sep if count else ''}and {len(items) - count} more"
        after = used + (len(sep) if count else 0) + len(item)
        if count == most or after + len(f"{sep}and {len(items) - count - 1} more") > width:
            return sep.join(items[:count]) + more
        used = after
    return sep.join(items)  # (not reached: the whole list was longer than width, or than most)


class SpecError(ValueError):
    """An LLMTelemetry spec the CRD schema let through but the operator cannot use.

    Args:
        field: dotted path of the offending field, e.g. ``spec.alerts.ttftObjectiveSeconds``.
        message: what is wrong with it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(clipped(f"{field}: {message}"))
        self.field = field
        self.message = message


class ApiError(Exception):
    """A Kubernetes API call answered with an error status.

    Args:
        status: the HTTP status code.
        reason: the ``reason`` of the Kubernetes ``Status`` object, if any.
        message: its ``message``.
        retry_after: the server's ``Retry-After``, in seconds (429, 503).
    """

    def __init__(
        self, status: int, reason: str = "", message: str = "", *, body: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body
        #: Seconds the server asked the client to wait (its ``Retry-After`` header), if it said.
        self.retry_after = retry_after


class NotFoundError(ApiError):
    """404: the object, or the whole resource type, does not exist."""


class ConflictError(ApiError):
    """409: the object already exists, or it changed since it was read."""


class WriteWithheld(Exception):
    """A write this replica must not make now: it stands by, or has not yet looked again after a freeze (see
    ``handlers._paused``). A pass meeting it stops there; the replica gives every resource a pass when it resumes."""


class PermissionNotDeclaredError(RuntimeError):
    """An API call that :data:`llm_telemetry_operator.rbac.PERMISSIONS` does not declare; a bug in the operator."""
