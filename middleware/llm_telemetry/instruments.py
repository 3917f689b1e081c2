"""The metric contract: instrument names, units, attribute keys, buckets and their factories.

OpenTelemetry names are declared here once; the Prometheus names in the comments are what the
OpenTelemetry Prometheus exporter derives from them (dots become underscores, the unit is appended,
counters get ``_total``). Dashboards, alert rules and docs refer to the Prometheus names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Final, Protocol

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.util.types import Attributes

# --- instrument names -------------------------------------------------------------------------

#: gen_ai_server_request_duration_seconds (histogram)
GEN_AI_SERVER_REQUEST_DURATION: Final = "gen_ai.server.request.duration"
#: gen_ai_server_time_to_first_token_seconds (histogram, streams only)
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN: Final = "gen_ai.server.time_to_first_token"
#: gen_ai_server_time_per_output_token_seconds (histogram, streams only)
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN: Final = "gen_ai.server.time_per_output_token"
#: llm_tokens_total (counter)
LLM_TOKENS: Final = "llm.tokens"
#: llm_requests_total (counter)
LLM_REQUESTS: Final = "llm.requests"
#: llm_errors_total (counter)
LLM_ERRORS: Final = "llm.errors"
#: llm_cost_usd_total (counter)
LLM_COST: Final = "llm.cost"
#: llm_cost_unpriced_tokens_total (counter): tokens of models missing from the pricing table
LLM_COST_UNPRICED_TOKENS: Final = "llm.cost.unpriced_tokens"
#: llm_tool_calls_total (counter): tool calls the model asked for
LLM_TOOL_CALLS: Final = "llm.tool_calls"
#: llm_tool_results_total (counter): tool results sent back by the client, by outcome
LLM_TOOL_RESULTS: Final = "llm.tool_results"
#: llm_requests_active (gauge from an up-down counter)
LLM_REQUESTS_ACTIVE: Final = "llm.requests.active"
#: llm_telemetry_internal_errors_total (counter): failures inside the middleware itself
LLM_TELEMETRY_INTERNAL_ERRORS: Final = "llm_telemetry.internal_errors"

# --- attribute keys (Prometheus label = key with dots as underscores) ------------------------

GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
ERROR_TYPE: Final = "error.type"
LLM_STREAM: Final = "llm.stream"
LLM_USAGE_SOURCE: Final = "llm.usage.source"
LLM_TOOL_STATUS: Final = "llm.tool.status"
LLM_TELEMETRY_COMPONENT: Final = "llm_telemetry.component"
#: Attribution labels are ``llm.metadata.<name>`` -> ``llm_metadata_<name>``.
LLM_METADATA_PREFIX: Final = "llm.metadata."

# --- bounded attribute values -----------------------------------------------------------------

TOKEN_TYPES: Final = ("input", "output", "cache_read", "cache_creation", "reasoning")
USAGE_SOURCES: Final = ("reported", "estimated")
TOOL_STATUSES: Final = ("success", "error")
#: The fixed set of ``error.type`` values.
ERROR_TYPES: Final = (
    "rate_limit",
    "context_length",
    "content_filter",
    "auth",
    "invalid_request",
    "not_found",
    "timeout",
    "server_error",
    "client_disconnect",
    "app_exception",
    "other",
)
#: Value a label takes once it has seen its cap of distinct values.
OTHER: Final = "other"

# --- buckets ----------------------------------------------------------------------------------

#: The semantic conventions' boundaries (0.01 s doubling to 81.92 s), extended by three more doublings to
#: 655.36 s: long reasoning generations run for minutes and would otherwise all land in +Inf.
REQUEST_DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    163.84, 327.68, 655.36,
)  # fmt: skip
#: The semantic conventions' boundaries for gen_ai.server.time_to_first_token.
TIME_TO_FIRST_TOKEN_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
#: The semantic conventions' boundaries for gen_ai.server.time_per_output_token.
TIME_PER_OUTPUT_TOKEN_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


class Sum(Protocol):
    """What the recorder needs of a counter or up-down counter."""

    def add(self, amount: float, attributes: Attributes = None, context: Context | None = None) -> None: ...


class SummedInstrument:
    """A counter or up-down counter that keeps its running totals in a dict and hands them to the SDK at
    collection time, through an observable (asynchronous) instrument of the same name, unit and description.

    The SDK's synchronous ``add`` builds a ``Measurement`` and copies and hashes the attributes on every call;
    measured here that is 10-20 µs, and a request makes up to nine of them. A dict update is well under a
    microsecond, and the exported series (names, types, labels, values) are the same, because a cumulative
    observable counter is exactly what a synchronous one becomes in the exporter.
    """

    __slots__ = ("_lock", "_totals")

    def __init__(self, meter: Meter, name: str, unit: str, description: str, *, monotonic: bool = True) -> None:
        self._totals: dict[frozenset[tuple[str, Any]], list[Any]] = {}
        self._lock = threading.Lock()
        create = meter.create_observable_counter if monotonic else meter.create_observable_up_down_counter
        create(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: float, attributes: Attributes = None, context: Context | None = None) -> None:
        key = frozenset(attributes.items()) if attributes else frozenset()
        with self._lock:
            entry = self._totals.get(key)
            if entry is None:
                self._totals[key] = [amount, dict(attributes or {})]
            else:
                entry[0] += amount

    def _observe(self, options: CallbackOptions) -> list[Observation]:
        with self._lock:
            return [Observation(total, attributes) for total, attributes in self._totals.values()]


@dataclass(frozen=True)
class Instruments:
    """Every instrument the middleware records to, created once per meter."""

    request_duration: Histogram
    time_to_first_token: Histogram
    time_per_output_token: Histogram
    tokens: Sum
    requests: Sum
    errors: Sum
    cost: Sum
    unpriced_tokens: Sum
    tool_calls: Sum
    tool_results: Sum
    requests_active: Sum
    internal_errors: Sum


def create_request_duration(meter: Meter) -> Histogram:
    return meter.create_histogram(
        GEN_AI_SERVER_REQUEST_DURATION,
        unit="s",
        description="Time from the request's arrival to the last byte of its response.",
        explicit_bucket_boundaries_advisory=list(REQUEST_DURATION_BUCKETS),
    )


def create_time_to_first_token(meter: Meter) -> Histogram:
    return meter.create_histogram(
        GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
        unit="s",
        description="Time from the request's arrival to the first chunk carrying generated content or a tool call.",
        explicit_bucket_boundaries_advisory=list(TIME_TO_FIRST_TOKEN_BUCKETS),
    )


def create_time_per_output_token(meter: Meter) -> Histogram:
    return meter.create_histogram(
        GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
        unit="s",
        description="Time per output token after the first: (end - first token) / (output tokens - 1).",
        explicit_bucket_boundaries_advisory=list(TIME_PER_OUTPUT_TOKEN_BUCKETS),
    )


def create_instruments(meter: Meter, *, summed: bool = False) -> Instruments:
    """The contract's instruments on ``meter``.

    Args:
        meter: where the instruments are created.
        summed: keep counters as :class:`SummedInstrument` (the single-process fast path); otherwise the meter's own
            synchronous counters (what the multi-worker shared meter implements).
    """

    def counter(name: str, unit: str, description: str) -> Sum:
        if summed:
            return SummedInstrument(meter, name, unit, description)
        return meter.create_counter(name, unit=unit, description=description)

    def up_down_counter(name: str, unit: str, description: str) -> Sum:
        if summed:
            return SummedInstrument(meter, name, unit, description, monotonic=False)
        return meter.create_up_down_counter(name, unit=unit, description=description)

    return Instruments(
        request_duration=create_request_duration(meter),
        time_to_first_token=create_time_to_first_token(meter),
        time_per_output_token=create_time_per_output_token(meter),
        tokens=counter(LLM_TOKENS, "{token}", "Tokens by type, reported or estimated."),
        requests=counter(LLM_REQUESTS, "{request}", "LLM API requests handled."),
        errors=counter(LLM_ERRORS, "{error}", "Failed LLM API requests by error.type."),
        cost=counter(LLM_COST, "usd", "Cost of priced tokens in US dollars."),
        unpriced_tokens=counter(LLM_COST_UNPRICED_TOKENS, "{token}", "Tokens of models absent from the pricing table."),
        tool_calls=counter(LLM_TOOL_CALLS, "{call}", "Tool calls made by the model."),
        tool_results=counter(LLM_TOOL_RESULTS, "{result}", "Tool results sent back to the model, by llm.tool.status."),
        requests_active=up_down_counter(LLM_REQUESTS_ACTIVE, "{request}", "LLM API requests in flight."),
        internal_errors=counter(
            LLM_TELEMETRY_INTERNAL_ERRORS,
            "{error}",
            "Failures inside llm-telemetry itself; the service's response is never affected.",
        ),
    )
