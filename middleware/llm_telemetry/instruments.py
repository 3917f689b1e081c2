"""The metric contract: every metric the middleware exports, declared once.

Each :class:`MetricSpec` holds a metric's OpenTelemetry name, unit, kind, description, the attribute keys it
may carry, whether the ``llm.metadata.*`` attribution attributes apply, and its bucket boundaries. From that
follow its Prometheus name and labels (what the OpenTelemetry Prometheus exporter derives: dots become
underscores, the unit is appended, counters get ``_total``). The recorder builds its attributes from these
specs; the rule and dashboard generators (:mod:`llm_telemetry.monitoring`), the operator and the metric table
in ``docs/metrics.md`` read them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.util.types import Attributes

# --- instrument names -------------------------------------------------------------------------

GEN_AI_SERVER_REQUEST_DURATION: Final = "gen_ai.server.request.duration"
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN: Final = "gen_ai.server.time_to_first_token"
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN: Final = "gen_ai.server.time_per_output_token"
LLM_TOKENS: Final = "llm.tokens"
LLM_TOKEN_DETAILS: Final = "llm.token_details"
LLM_REQUESTS: Final = "llm.requests"
LLM_ERRORS: Final = "llm.errors"
LLM_COST: Final = "llm.cost"
LLM_COST_UNPRICED_TOKENS: Final = "llm.cost.unpriced_tokens"
LLM_TOOL_CALLS: Final = "llm.tool_calls"
LLM_TOOL_RESULTS: Final = "llm.tool_results"
LLM_REQUESTS_ACTIVE: Final = "llm.requests.active"
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
LLM_TOKEN_DETAIL: Final = "llm.token.detail"
LLM_TOOL_STATUS: Final = "llm.tool.status"
LLM_TELEMETRY_COMPONENT: Final = "llm_telemetry.component"
#: Attribution labels are ``llm.metadata.<name>`` -> ``llm_metadata_<name>``.
LLM_METADATA_PREFIX: Final = "llm.metadata."

# --- bounded attribute values -----------------------------------------------------------------

#: ``gen_ai.token.type`` values: the two billable kinds, disjoint, so summing ``llm_tokens_total`` over any
#: labels gives billable tokens.
TOKEN_TYPES: Final = ("input", "output")
#: ``llm.token.detail`` values with the token type each is a part of, named after the GenAI span attributes
#: ``gen_ai.usage.<detail>.<type>_tokens``. They live in their own counter, ``llm.token_details``, because they
#: overlap ``llm.tokens``: cache reads and cache writes are parts of input, reasoning is part of output.
TOKEN_DETAIL_PARTS: Final = (("cache_read", "input"), ("cache_creation", "input"), ("reasoning", "output"))
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

# --- the contract -----------------------------------------------------------------------------

#: How the OpenTelemetry Prometheus exporter spells the units we use in a metric name ("{...}" annotations vanish).
_PROMETHEUS_UNITS: Final = {"s": "seconds", "By": "bytes", "usd": "usd"}
_ANNOTATION = re.compile(r"\{[^}]*\}")


def label(attribute: str) -> str:
    """The Prometheus label of an OpenTelemetry attribute key."""
    return attribute.replace(".", "_")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Args:
        name: OpenTelemetry instrument name.
        unit: UCUM unit (``s``, ``{token}``, ``usd``).
        kind: ``counter``, ``updowncounter`` or ``histogram``.
        description: the instrument's description (also the ``# HELP`` line).
        attributes: attribute keys a point may carry, besides attribution; a point carries a subset when a
            value is unknown (``gen_ai.response.model`` before a response, ``error.type`` on success).
        attributed: whether the ``llm.metadata.*`` attribution attributes apply.
        buckets: explicit bucket boundaries of a histogram.
    """

    name: str
    unit: str
    kind: str
    description: str
    attributes: tuple[str, ...]
    attributed: bool = True
    buckets: tuple[float, ...] | None = None

    @property
    def prometheus_name(self) -> str:
        """The exporter's name: dots to underscores, the unit (if any) appended, ``_total`` for counters."""
        name = self.name.replace(".", "_")
        unit = _PROMETHEUS_UNITS.get(self.unit, _ANNOTATION.sub("", self.unit))
        if unit and not name.endswith("_" + unit):
            name = f"{name}_{unit}"
        return f"{name}_total" if self.kind == "counter" else name

    @property
    def prometheus_type(self) -> str:
        """``counter``, ``gauge`` (an up-down counter) or ``histogram``."""
        return {"counter": "counter", "updowncounter": "gauge", "histogram": "histogram"}[self.kind]

    @property
    def labels(self) -> frozenset[str]:
        """Prometheus labels (besides scrape labels, OTel scope labels and ``llm_metadata_*``)."""
        return frozenset(label(a) for a in self.attributes)


_CALL = (GEN_AI_OPERATION_NAME, GEN_AI_PROVIDER_NAME, GEN_AI_REQUEST_MODEL)

REQUEST_DURATION: Final = MetricSpec(
    GEN_AI_SERVER_REQUEST_DURATION,
    "s",
    "histogram",
    "Time from the request's arrival to the last byte of its response.",
    (*_CALL, GEN_AI_RESPONSE_MODEL, LLM_STREAM, ERROR_TYPE),
    buckets=REQUEST_DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN: Final = MetricSpec(
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
    "s",
    "histogram",
    "Time from the request's arrival to the first chunk carrying generated content or a tool call.",
    _CALL,
    buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN: Final = MetricSpec(
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    "s",
    "histogram",
    "Time per output token after the first: (end - first token) / (output tokens - 1).",
    _CALL,
    buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
)
TOKENS: Final = MetricSpec(
    LLM_TOKENS,
    "{token}",
    "counter",
    "Billable tokens by gen_ai.token.type (input, output), reported or estimated; sums over any labels are exact.",
    (*_CALL, GEN_AI_RESPONSE_MODEL, GEN_AI_TOKEN_TYPE, LLM_USAGE_SOURCE),
)
TOKEN_DETAILS: Final = MetricSpec(
    LLM_TOKEN_DETAILS,
    "{token}",
    "counter",
    "Parts of the billable tokens by llm.token.detail (cache_read, cache_creation of input; reasoning of output).",
    (*_CALL, GEN_AI_RESPONSE_MODEL, GEN_AI_TOKEN_TYPE, LLM_TOKEN_DETAIL, LLM_USAGE_SOURCE),
)
REQUESTS: Final = MetricSpec(
    LLM_REQUESTS,
    "{request}",
    "counter",
    "LLM API requests handled.",
    (*_CALL, GEN_AI_RESPONSE_MODEL, LLM_STREAM, ERROR_TYPE),
)
ERRORS: Final = MetricSpec(
    LLM_ERRORS, "{error}", "counter", "Failed LLM API requests by error.type.", (*_CALL, LLM_STREAM, ERROR_TYPE)
)
COST: Final = MetricSpec(LLM_COST, "usd", "counter", "Cost of priced tokens in US dollars.", _CALL)
UNPRICED_TOKENS: Final = MetricSpec(
    LLM_COST_UNPRICED_TOKENS,
    "{token}",
    "counter",
    "Tokens of models absent from the pricing table.",
    _CALL,
    attributed=False,
)
TOOL_CALLS: Final = MetricSpec(
    LLM_TOOL_CALLS, "{call}", "counter", "Tool calls made by the model.", (*_CALL, GEN_AI_TOOL_NAME)
)
TOOL_RESULTS: Final = MetricSpec(
    LLM_TOOL_RESULTS,
    "{result}",
    "counter",
    "Tool results sent back to the model, by llm.tool.status.",
    (GEN_AI_PROVIDER_NAME, GEN_AI_TOOL_NAME, LLM_TOOL_STATUS),
    attributed=False,
)
REQUESTS_ACTIVE: Final = MetricSpec(
    LLM_REQUESTS_ACTIVE,
    "{request}",
    "updowncounter",
    "LLM API requests in flight.",
    (GEN_AI_OPERATION_NAME, GEN_AI_PROVIDER_NAME),
    attributed=False,
)
INTERNAL_ERRORS: Final = MetricSpec(
    LLM_TELEMETRY_INTERNAL_ERRORS,
    "{error}",
    "counter",
    "Failures inside llm-telemetry itself; the service's response is never affected.",
    (LLM_TELEMETRY_COMPONENT,),
    attributed=False,
)

#: Every metric the middleware exports, in the order of the docs' table.
CONTRACT: Final = (
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TIME_PER_OUTPUT_TOKEN,
    TOKENS,
    TOKEN_DETAILS,
    REQUESTS,
    ERRORS,
    COST,
    UNPRICED_TOKENS,
    TOOL_CALLS,
    TOOL_RESULTS,
    REQUESTS_ACTIVE,
    INTERNAL_ERRORS,
)
#: The contract by Prometheus name (histograms add ``_bucket``/``_count``/``_sum``).
BY_PROMETHEUS_NAME: Final[Mapping[str, MetricSpec]] = {m.prometheus_name: m for m in CONTRACT}
#: The latency histograms; each of their buckets carries a trace exemplar when tracing is on.
LATENCY_HISTOGRAMS: Final = (REQUEST_DURATION, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN)


def select(spec: MetricSpec, values: Mapping[str, Any], attribution: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The attributes of one point of ``spec``: the keys it declares that have a value, plus attribution."""
    attributes = {key: values[key] for key in spec.attributes if values.get(key) is not None}
    if spec.attributed and attribution:
        for name, value in attribution.items():
            attributes[LLM_METADATA_PREFIX + name] = value
    return attributes


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
    token_details: Sum
    requests: Sum
    errors: Sum
    cost: Sum
    unpriced_tokens: Sum
    tool_calls: Sum
    tool_results: Sum
    requests_active: Sum
    internal_errors: Sum


def create_histogram(meter: Meter, spec: MetricSpec) -> Histogram:
    return meter.create_histogram(
        spec.name,
        unit=spec.unit,
        description=spec.description,
        explicit_bucket_boundaries_advisory=list(spec.buckets or ()),
    )


def create_instruments(meter: Meter, *, summed: bool = False) -> Instruments:
    """The contract's instruments on ``meter``.

    Args:
        meter: where the instruments are created.
        summed: keep counters as :class:`SummedInstrument` (the single-process fast path); otherwise the meter's own
            synchronous counters (what the multi-worker shared meter implements).
    """

    def create(spec: MetricSpec) -> Any:
        if spec.kind == "histogram":
            return create_histogram(meter, spec)
        monotonic = spec.kind == "counter"
        if summed:
            return SummedInstrument(meter, spec.name, spec.unit, spec.description, monotonic=monotonic)
        factory = meter.create_counter if monotonic else meter.create_up_down_counter
        return factory(spec.name, unit=spec.unit, description=spec.description)

    return Instruments(
        request_duration=create(REQUEST_DURATION),
        time_to_first_token=create(TIME_TO_FIRST_TOKEN),
        time_per_output_token=create(TIME_PER_OUTPUT_TOKEN),
        tokens=create(TOKENS),
        token_details=create(TOKEN_DETAILS),
        requests=create(REQUESTS),
        errors=create(ERRORS),
        cost=create(COST),
        unpriced_tokens=create(UNPRICED_TOKENS),
        tool_calls=create(TOOL_CALLS),
        tool_results=create(TOOL_RESULTS),
        requests_active=create(REQUESTS_ACTIVE),
        internal_errors=create(INTERNAL_ERRORS),
    )
