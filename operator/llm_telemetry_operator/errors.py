"""Exceptions the operator raises; handlers turn them into conditions, events and retries."""

from __future__ import annotations

from typing import Any


class ConfigurationError(ValueError):
    """The operator's own environment is unusable; raised at startup, the message names the variable."""


#: The longest message a SpecError carries into the resource's conditions and events: it may quote the spec's values
#: (a label value, a header name), which the schema leaves unbounded.
MAX_MESSAGE_CHARS = 1000


class SpecError(ValueError):
    """An LLMTelemetry spec the CRD schema let through but the operator cannot use.

    Args:
        field: dotted path of the offending field, e.g. ``spec.alerts.ttftObjectiveSeconds``.
        message: what is wrong with it.
    """

    def __init__(self, field: str, message: str) -> None:
        text = f"{field}: {message}"
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(text)
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
