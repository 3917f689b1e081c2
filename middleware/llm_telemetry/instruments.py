"""The metric contract: every metric the middleware exports, declared once.

Each :class:`MetricSpec` holds a metric's OpenTelemetry name, unit, kind, description, the attribute keys it
may carry, whether the ``llm.metadata.*`` attribution attributes apply, and its bucket boundaries. From that
follow its Prometheus name and labels (what the OpenTelemetry Prometheus exporter derives: dots become
underscores, the unit is appended, counters get ``_total``). The recorder builds its attributes from these
specs; the rule and dashboard generators (:mod:`llm_telemetry.monitoring`), the operator and the metric table
in ``docs/metrics.md`` read them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from bisect import bisect_left
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from time import time_ns
from typing import Any, Final, Protocol

from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.util.types import Attributes

# --- instrument names -------------------------------------------------------------------------

GEN_AI_SERVER_REQUEST_DURATION: Final = "gen_ai.server.request.duration"
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN: Final = "gen_ai.server.time_to_first_token"
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN: Final = "gen_ai.server.time_per_output_token"
LLM_SERVER_TIME_TO_ABANDONMENT: Final = "llm.server.time_to_abandonment"
LLM_TOKENS: Final = "llm.tokens"
LLM_TOKEN_DETAILS: Final = "llm.token_details"
LLM_REQUESTS: Final = "llm.requests"
LLM_ERRORS: Final = "llm.errors"
LLM_COST: Final = "llm.cost"
LLM_COST_UNPRICED_TOKENS: Final = "llm.cost.unpriced_tokens"
LLM_TOOL_CALLS: Final = "llm.tool_calls"
LLM_TOOL_RESULTS: Final = "llm.tool_results"
LLM_FINISH_REASONS: Final = "llm.finish_reasons"
LLM_REQUESTS_ACTIVE: Final = "llm.requests.active"
LLM_TELEMETRY_INTERNAL_ERRORS: Final = "llm_telemetry.internal_errors"
LLM_TELEMETRY_UNREAD_BODIES: Final = "llm_telemetry.unread_bodies"

# --- attribute keys (Prometheus label = key with dots as underscores) ------------------------

GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
ERROR_TYPE: Final = "error.type"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
LLM_USAGE_SOURCE: Final = "llm.usage.source"
LLM_TOKEN_DETAIL: Final = "llm.token.detail"
LLM_TOOL_STATUS: Final = "llm.tool.status"
#: One of the reasons in the span's ``gen_ai.response.finish_reasons``, as the provider named it.
LLM_FINISH_REASON: Final = "llm.finish_reason"
LLM_TELEMETRY_COMPONENT: Final = "llm_telemetry.component"
#: Which body of a call was not read whole: ``request`` or ``response`` (see UNREAD_BODIES).
LLM_TELEMETRY_BODY: Final = "llm_telemetry.body"
#: Why: ``budget`` or ``stalled`` (see UNREAD_BODIES).
LLM_TELEMETRY_REASON: Final = "llm_telemetry.reason"
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
    "incomplete_stream",
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
#: The semantic conventions' boundaries for gen_ai.server.time_to_first_token (up to 10 s), extended by three
#: doublings to 80 s: a reasoning model's first token can take tens of seconds, which would all land in +Inf.
TIME_TO_FIRST_TOKEN_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
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
    (*_CALL, GEN_AI_RESPONSE_MODEL, GEN_AI_REQUEST_STREAM, ERROR_TYPE),
    buckets=REQUEST_DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN: Final = MetricSpec(
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
    "s",
    "histogram",
    "Time from the request's arrival to the first chunk carrying generated content or a tool call; successful streams.",
    _CALL,
    buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
)
TIME_TO_ABANDONMENT: Final = MetricSpec(
    LLM_SERVER_TIME_TO_ABANDONMENT,
    "s",
    "histogram",
    "Time from the request's arrival until its client left, of streams left before their first token: the waits"
    " time to first token leaves out.",
    _CALL,
    buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN: Final = MetricSpec(
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    "s",
    "histogram",
    "Time per output token after the first: (end - first token) / (output tokens - 1), reasoning the stream did not"
    " show left out; successful streams. With n choices, per choice.",
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
    (*_CALL, GEN_AI_RESPONSE_MODEL, GEN_AI_REQUEST_STREAM, ERROR_TYPE),
)
ERRORS: Final = MetricSpec(
    LLM_ERRORS,
    "{error}",
    "counter",
    "Failed LLM API requests by error.type.",
    (*_CALL, GEN_AI_REQUEST_STREAM, ERROR_TYPE),
)
COST: Final = MetricSpec(LLM_COST, "usd", "counter", "Cost of priced tokens in US dollars.", _CALL)
UNPRICED_TOKENS: Final = MetricSpec(
    LLM_COST_UNPRICED_TOKENS,
    "{token}",
    "counter",
    "Tokens left out of the cost: of models absent from the pricing table, and those the advisor, the image"
    " generation tool or an SVG image's author ran on a model without a price (labelled as their call).",
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
FINISH_REASONS: Final = MetricSpec(
    LLM_FINISH_REASONS,
    "{response}",
    "counter",
    "Responses by llm.finish_reason, as the provider named it (stop, length, tool_calls, end_turn, max_tokens...);"
    " a response whose choices stopped for different reasons counts once under each.",
    (*_CALL, LLM_FINISH_REASON),
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

UNREAD_BODIES: Final = MetricSpec(
    LLM_TELEMETRY_UNREAD_BODIES,
    "{body}",
    "counter",
    "Request bodies and JSON answers not read whole for want of room in LLM_TELEMETRY_MAX_INSPECTED_BYTES, by"
    " llm_telemetry.body (request, response) and llm_telemetry.reason (budget: no room when they came; stalled: given"
    " up by a request that made no progress while another needed the room); their calls are recorded without their"
    " request fields, or with what the answer's last bytes say.",
    (LLM_TELEMETRY_BODY, LLM_TELEMETRY_REASON),
    attributed=False,
)

#: Every metric the middleware exports, in the order of the docs' table.
CONTRACT: Final = (
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    TIME_TO_ABANDONMENT,
    TIME_PER_OUTPUT_TOKEN,
    TOKENS,
    TOKEN_DETAILS,
    REQUESTS,
    ERRORS,
    COST,
    UNPRICED_TOKENS,
    TOOL_CALLS,
    TOOL_RESULTS,
    FINISH_REASONS,
    REQUESTS_ACTIVE,
    INTERNAL_ERRORS,
    UNREAD_BODIES,
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


#: The key of an empty attribute set.
_NO_KEY: Final[frozenset[tuple[str, Any]]] = frozenset()

#: Distinct attribute sets an instrument keeps before folding new ones into overflow series (the SDK's default
#: cardinality limit, and the attribute it marks an overflow series with). The label caps bound each label's
#: values, but not their combinations: 100 models times 100 tenants is 10,000 series.
CARDINALITY_LIMIT: Final = 2000
OVERFLOW_ATTRIBUTES: Final = {"otel.metric.overflow": True}
#: The attributes an overflow series keeps: those whose values are few by construction (operation, provider,
#: stream, error type, token type and detail, usage source, tool status). It leaves out the others, whose values
#: come from clients or upstream servers (models, tool names, finish reasons, the attribution labels), each value
#: capped by the label limiter but not their combinations. So what an error ratio or an availability rule selects
#: on survives the overflow, where the SDK's own overflow series drops every attribute (its errors would match
#: every ``error_type!=...`` filter), and an instrument has at most a few hundred overflow series.
FEW_VALUED: Final = frozenset(
    {
        GEN_AI_OPERATION_NAME,
        GEN_AI_PROVIDER_NAME,
        GEN_AI_REQUEST_STREAM,
        ERROR_TYPE,
        GEN_AI_TOKEN_TYPE,
        LLM_TOKEN_DETAIL,
        LLM_USAGE_SOURCE,
        LLM_TOOL_STATUS,
        LLM_TELEMETRY_COMPONENT,
    }
)
#: What the SDK's own limit is for the observable instruments :class:`SummedInstrument` hands its totals to: above
#: all a summed instrument can hold (CARDINALITY_LIMIT series and its overflow series), so that its limit, not the
#: SDK's, decides which series overflow and into which.
OBSERVED_CARDINALITY_LIMIT: Final = 4 * CARDINALITY_LIMIT


def observed_cardinality_limits() -> dict[type, int]:
    """``cardinality_limits`` for a metric reader that gets the totals of :class:`SummedInstrument` (see
    :data:`OBSERVED_CARDINALITY_LIMIT`)."""
    from opentelemetry.sdk.metrics import ObservableCounter, ObservableUpDownCounter

    return {ObservableCounter: OBSERVED_CARDINALITY_LIMIT, ObservableUpDownCounter: OBSERVED_CARDINALITY_LIMIT}


def overflow_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The attributes of the overflow series a new attribute set past :data:`CARDINALITY_LIMIT` is added to: its
    few-valued attributes (see :data:`FEW_VALUED`) and ``otel.metric.overflow``."""
    kept = {key: value for key, value in (attributes or {}).items() if key in FEW_VALUED}
    kept.update(OVERFLOW_ATTRIBUTES)
    return kept


def attributes_key(attributes: Attributes) -> frozenset[tuple[str, Any]]:
    """The key :class:`SummedInstrument` and :class:`BucketHistogram` keep an attribute set's series under."""
    return frozenset(attributes.items()) if attributes else _NO_KEY


class Sum(Protocol):
    """What the recorder needs of a counter or up-down counter."""

    def add(self, amount: float, attributes: Attributes = None, context: Context | None = None) -> None: ...


class SummedInstrument:
    """A counter or up-down counter that keeps its running totals in a dict and hands them to the SDK at
    collection time, through an observable (asynchronous) instrument of the same name, unit and description.

    The SDK's synchronous ``add`` builds a ``Measurement`` and copies and hashes the attributes on every call;
    measured here that is 10-20 µs, and a request makes up to nine of them. A dict update is well under a
    microsecond, and the exported series (names, types, labels, values) are the same, because a cumulative
    observable counter is exactly what a synchronous one becomes in a cumulative reader. Past
    :data:`CARDINALITY_LIMIT` attribute sets, new ones are added to an ``otel.metric.overflow`` series, as in the
    SDK's own counter, but one per combination of the few-valued attributes (see :func:`overflow_attributes`).
    Only for readers that are all cumulative (see :func:`create_instruments`): in a delta reader an observable
    counter repeats every series at each export, as a zero. The SDK stamps an observed series with the
    time it first saw it, at a collection; the time of its first ``add`` is kept here and put back on the points by
    :meth:`HistogramFeed.merge`.
    """

    __slots__ = ("_lock", "_totals")

    def __init__(
        self,
        meter: Meter,
        name: str,
        unit: str,
        description: str,
        *,
        monotonic: bool = True,
        lock: threading.Lock | None = None,
    ) -> None:
        #: Attribute key -> [running total, attributes, time of the first add (ns)].
        self._totals: dict[frozenset[tuple[str, Any]], list[Any]] = {}
        #: Guards the totals; may be shared with other instruments (see :attr:`Instruments.lock`).
        self._lock = lock or threading.Lock()
        create = meter.create_observable_counter if monotonic else meter.create_observable_up_down_counter
        create(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: float, attributes: Attributes = None, context: Context | None = None) -> None:
        self.add_keyed(amount, attributes_key(attributes), attributes)

    def add_keyed(self, amount: float, key: frozenset[tuple[str, Any]], attributes: Attributes) -> None:
        """``add`` with the attributes' key (``frozenset(attributes.items())``) already made: callers that
        record the same attribute set again and again keep it (a frozenset keeps its hash too)."""
        with self._lock:
            self.add_locked(amount, key, attributes)

    def add_locked(self, amount: float, key: frozenset[tuple[str, Any]], attributes: Attributes) -> None:
        """:meth:`add_keyed` for a caller holding this instrument's lock (:attr:`Instruments.lock`)."""
        entry = self._totals.get(key)
        if entry is None:
            if len(self._totals) >= CARDINALITY_LIMIT:
                attributes = overflow_attributes(attributes)
                key = frozenset(attributes.items())
                entry = self._totals.get(key)
            if entry is None:
                self._totals[key] = [amount, dict(attributes or {}), time_ns()]
                return
        entry[0] += amount

    def _observe(self, options: CallbackOptions) -> list[Observation]:
        with self._lock:
            return [Observation(total, attributes) for total, attributes, _ in self._totals.values()]

    def starts(self) -> dict[frozenset[tuple[str, Any]], int]:
        """Attribute key -> the time (ns) of the series' first ``add``."""
        with self._lock:
            return {key: entry[2] for key, entry in self._totals.items()}


class Record(Protocol):
    """What the recorder needs of a histogram."""

    def record(self, amount: float, attributes: Attributes = None, context: Context | None = None) -> None: ...


#: Types of the spans found in a record's context, each a subclass of ``trace.Span`` (see BucketHistogram.exemplar).
_SPAN_TYPES: Final[set[type]] = set()
#: (A class attribute read through the class on every request is a dictionary walk; a module global is not.)
_SAMPLED: Final = trace.TraceFlags.SAMPLED

#: What an exemplar carries besides its value: (time, span id, trace id).
Sample = tuple[int, int | None, int | None]


class _Series:
    """One attribute set of a :class:`BucketHistogram`."""

    __slots__ = ("attributes", "count", "counts", "exemplars", "max", "min", "start", "sum")

    def __init__(self, attributes: dict[str, Any], buckets: int) -> None:
        self.attributes = attributes
        self.start = time_ns()
        self.counts = [0] * buckets
        self.sum = 0.0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        #: Per bucket, the newest exemplar: (sequence number, value, time, span id, trace id), or None.
        self.exemplars: list[tuple[int, float, int, int | None, int | None] | None] = [None] * buckets


class BucketHistogram:
    """A histogram with fixed buckets that aggregates per attribute set in a dict; its points reach the SDK's
    exporters at collection time through :class:`Histograms`.

    The SDK's synchronous ``Histogram.record`` builds a ``Measurement``, looks up the context, cleans and hashes
    the attributes and offers the value to an exemplar reservoir: about 20 µs, three times per stream. Here a
    record is a frozenset key, a bisect and a few additions, with the SDK's semantics kept: a value on a bucket
    boundary counts in that bucket; negative and non-finite values are dropped; the configured exemplar filter
    (``OTEL_METRICS_EXEMPLAR_FILTER``, ``trace_based`` by default) decides which records leave an exemplar, and
    each bucket keeps the newest one with the trace and span id of the recording's span; past
    :data:`CARDINALITY_LIMIT` attribute sets, new ones go to an ``otel.metric.overflow`` series (see
    :func:`overflow_attributes`).
    """

    __slots__ = ("_filter", "_lock", "_owner", "_sequence", "_series", "_trace_based", "bounds", "spec")

    def __init__(self, owner: Histograms, spec: MetricSpec, exemplar_filter: Any, lock: threading.Lock) -> None:
        from opentelemetry.sdk.metrics import TraceBasedExemplarFilter

        self.spec = spec
        self.bounds = tuple(spec.buckets or ())
        self._owner = owner
        self._filter = exemplar_filter
        #: The SDK's default filter, whose decision :meth:`exemplar` takes from the span it finds for the sample.
        self._trace_based = type(exemplar_filter) is TraceBasedExemplarFilter
        self._series: dict[frozenset[tuple[str, Any]], _Series] = {}
        self._sequence = 0
        #: Guards the series; shared with the other instruments of the meter (see :attr:`Instruments.lock`).
        self._lock = lock

    def record(self, amount: float, attributes: Attributes = None, context: Context | None = None) -> None:
        if not 0 <= amount < math.inf:  # also false for NaN
            return
        context = context or get_current()  # as the SDK's Histogram.record: an empty context is the current one
        sample = self.sample(context) if self._filter.should_sample(amount, 0, attributes, context) else None
        self.record_keyed(amount, attributes_key(attributes), attributes, sample)

    def sample(self, context: Context | None) -> Sample:
        """What an exemplar of a record in ``context`` carries besides its value: (time, span id, trace id)."""
        span = trace.get_current_span(context or None)  # an empty context is the current one, as in the SDK
        ids = span.get_span_context() if span is not trace.INVALID_SPAN else None
        return (time_ns(), ids.span_id if ids else None, ids.trace_id if ids else None)

    def exemplar(self, context: Context | None) -> Sample | None:
        """:meth:`sample` when the exemplar filter keeps records made in ``context``, else None. The filters the
        SDK offers (``always_on``, ``always_off``, ``trace_based``) decide by the context alone, so a caller
        making several records in one context asks once."""
        if self._trace_based:
            # TraceBasedExemplarFilter.should_sample, with the span looked up once for the decision and the sample.
            span: Any
            if type(context) is Context and context:
                # trace.get_current_span(context) without its two Python calls: a value that is not a span
                # stands for the invalid span, so it leaves no exemplar. isinstance(span, trace.Span) calls the
                # ABC's Python-level __instancecheck__; a type once found to be a Span stays one.
                span = context.get(_SPAN_KEY)
                if span is None:
                    return None
                if type(span) not in _SPAN_TYPES:
                    if not isinstance(span, trace.Span):
                        return None
                    if issubclass(type(span), trace.Span):
                        _SPAN_TYPES.add(type(span))
            else:
                # The SDK records in the current context when given none or an empty one (`context or get_current()`).
                span = trace.get_current_span(context or None)
            if span == trace.INVALID_SPAN:
                return None
            ids = span.get_span_context()
            if type(ids) is trace.SpanContext and type(ids[3]) is trace.TraceFlags:
                # The SpanContext tuple read in place of its properties (trace id, span id, flags at 0, 1, 3),
                # and TraceFlags.sampled's test of the sampled bit.
                return (time_ns(), ids[1], ids[0]) if ids[3] & _SAMPLED else None
            return (time_ns(), ids.span_id, ids.trace_id) if ids.trace_flags.sampled else None
        return self.sample(context) if self._filter.should_sample(0.0, 0, None, context) else None

    def record_keyed(
        self, amount: float, key: frozenset[tuple[str, Any]], attributes: Attributes, sample: Sample | None
    ) -> None:
        """``record`` with the attributes' key (:func:`attributes_key`) and the exemplar decision
        (:meth:`exemplar`) already made."""
        with self._lock:
            self.record_locked(amount, key, attributes, sample)

    def record_locked(
        self, amount: float, key: frozenset[tuple[str, Any]], attributes: Attributes, sample: Sample | None
    ) -> None:
        """:meth:`record_keyed` for a caller holding this histogram's lock (:attr:`Instruments.lock`)."""
        if not 0 <= amount < math.inf:  # also false for NaN
            return
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key, attributes)
        index = bisect_left(self.bounds, amount)
        series.counts[index] += 1
        series.sum += amount
        series.count += 1
        if amount < series.min:
            series.min = amount
        if amount > series.max:
            series.max = amount
        if sample is not None:
            self._sequence += 1
            series.exemplars[index] = (self._sequence, amount, *sample)

    def _new_series(self, key: frozenset[tuple[str, Any]], attributes: Attributes) -> _Series:
        """Called with the lock held."""
        if len(self._series) >= CARDINALITY_LIMIT:
            attributes = overflow_attributes(attributes)
            key = frozenset(attributes.items())
            series = self._series.get(key)
            if series is not None:
                return series
        if not self._series:
            self._owner.started(self)
        series = self._series[key] = _Series(dict(attributes or {}), len(self.bounds) + 1)
        return series

    def metric(self, now: int, since: int) -> tuple[Any, int] | None:
        """This histogram as an SDK ``Metric`` (cumulative), with the exemplars newer than sequence number
        ``since``; and the newest sequence number. None when nothing has been recorded."""
        from opentelemetry.sdk.metrics import Exemplar
        from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, HistogramDataPoint, Metric

        with self._lock:
            newest = self._sequence
            rows = [
                (s.attributes, s.start, list(s.counts), s.sum, s.count, s.min, s.max, list(s.exemplars))
                for s in self._series.values()
            ]
        if not rows:
            return None
        bounds = list(self.bounds)
        points = [
            HistogramDataPoint(
                attributes=attributes,
                start_time_unix_nano=start,
                time_unix_nano=now,
                count=count,
                sum=total,
                bucket_counts=counts,
                explicit_bounds=bounds,
                min=low,
                max=high,
                exemplars=[Exemplar({}, e[1], e[2], e[3], e[4]) for e in exemplars if e is not None and e[0] > since],
            )
            for attributes, start, counts, total, count, low, high, exemplars in rows
        ]
        data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        spec = self.spec
        return Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data), newest


def exemplar_filter(name: str) -> Any:
    """The SDK's exemplar filter called ``name`` (``OTEL_METRICS_EXEMPLAR_FILTER``, as :class:`OTelEnvironment`
    resolved it): ``always_on``, ``always_off``, else ``trace_based``."""
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, AlwaysOnExemplarFilter, TraceBasedExemplarFilter

    filters = {"always_on": AlwaysOnExemplarFilter, "always_off": AlwaysOffExemplarFilter}
    return filters.get(name, TraceBasedExemplarFilter)()


class Histograms:
    """The :class:`BucketHistogram` of one meter, and their points for the SDK's export path.

    Each consumer (the Prometheus reader, the OTLP exporter) takes a :meth:`feed` and passes every collection the
    SDK hands it through :meth:`HistogramFeed.merge`, which adds the histograms' metrics to the meter's scope:
    the exporters then see exactly what the SDK's own histograms would have given them (cumulative temporality).

    Args:
        scope: the instrumentation scope of the meter the other instruments are created on.
        resource: the meter provider's resource, for a collection that holds no other metric.
    """

    def __init__(self, scope: Any, resource: Any, exemplar_filter: Any = None) -> None:
        from opentelemetry.sdk.metrics import TraceBasedExemplarFilter

        self.scope = scope
        self.resource = resource
        #: The meter provider's exemplar filter (:func:`exemplar_filter`), the SDK's default when not given.
        self._filter = exemplar_filter if exemplar_filter is not None else TraceBasedExemplarFilter()
        #: Histograms in the order of their first record: the order the SDK reports its own instruments in.
        self._order: list[BucketHistogram] = []
        self._lock = threading.Lock()
        #: The lock of every histogram created here (and of the counters created with them: :func:`create_instruments`).
        self.lock = threading.Lock()
        #: The sums created with these histograms, by name: their points get their series' start times back.
        self.sums: dict[str, SummedInstrument] = {}

    def create(self, spec: MetricSpec) -> BucketHistogram:
        return BucketHistogram(self, spec, self._filter, self.lock)

    def started(self, histogram: BucketHistogram) -> None:
        with self._lock:
            if histogram not in self._order:
                self._order.append(histogram)

    def feed(self) -> HistogramFeed:
        return HistogramFeed(self)

    def metrics(self, since: dict[str, int]) -> list[Any]:
        """Every histogram with points, as SDK metrics; ``since`` (histogram name -> newest exemplar sequence
        number already handed out) is advanced."""
        now = time_ns()
        with self._lock:
            order = list(self._order)
        metrics = []
        for histogram in order:
            found = histogram.metric(now, since.get(histogram.spec.name, 0))
            if found is not None:
                metrics.append(found[0])
                since[histogram.spec.name] = found[1]
        return metrics

    def with_starts(self, metrics: list[Any]) -> list[Any]:
        """``metrics`` (of this meter's scope) with each point of a :class:`SummedInstrument` starting when its
        series was first added to, as a synchronous counter's does, instead of when a collection first saw it."""
        from opentelemetry.sdk.metrics.export import Sum

        out = []
        for metric in metrics:
            summed = self.sums.get(metric.name)
            if summed is None or not isinstance(metric.data, Sum):
                out.append(metric)
                continue
            starts = summed.starts()
            points = [
                dataclasses.replace(point, start_time_unix_nano=start)
                if (start := starts.get(frozenset((point.attributes or {}).items()))) is not None
                else point
                for point in metric.data.data_points
            ]
            out.append(dataclasses.replace(metric, data=dataclasses.replace(metric.data, data_points=points)))
        return out


class HistogramFeed:
    """One consumer's view of :class:`Histograms`: each exemplar is handed out once, like an SDK reservoir that
    resets at every collection of its reader."""

    def __init__(self, histograms: Histograms) -> None:
        self.histograms = histograms
        self._since: dict[str, int] = {}
        self._lock = threading.Lock()

    def merge(self, metrics_data: Any) -> Any:
        """``metrics_data`` (an SDK ``MetricsData``, or None) with the histograms' metrics added to their scope."""
        from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics

        with self._lock:
            ours = self.histograms.metrics(self._since)
        scope = self.histograms.scope
        if metrics_data is None or not metrics_data.resource_metrics:
            if not ours:
                return metrics_data
            resource = self.histograms.resource
            only = ScopeMetrics(scope=scope, metrics=ours, schema_url=scope.schema_url)
            return MetricsData(
                [ResourceMetrics(resource=resource, scope_metrics=[only], schema_url=resource.schema_url)]
            )
        first, *rest = metrics_data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scope_metrics in enumerate(scopes):
            if scope_metrics.scope == scope:
                # The SDK lists instruments by first measurement; a histogram is recorded before any counter
                # is observed (observations are taken at collection time), so the histograms come first.
                sums = self.histograms.with_starts(scope_metrics.metrics)
                scopes[i] = ScopeMetrics(scope, [*ours, *sums], scope_metrics.schema_url)
                break
        else:
            if not ours:
                return metrics_data
            scopes.append(ScopeMetrics(scope=scope, metrics=ours, schema_url=scope.schema_url))
        merged = ResourceMetrics(resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url)
        return MetricsData([merged, *rest])


@dataclass(frozen=True)
class Instruments:
    """Every instrument the middleware records to, created once per meter."""

    request_duration: Record
    time_to_first_token: Record
    time_to_abandonment: Record
    time_per_output_token: Record
    tokens: Sum
    token_details: Sum
    requests: Sum
    errors: Sum
    cost: Sum
    unpriced_tokens: Sum
    tool_calls: Sum
    tool_results: Sum
    finish_reasons: Sum
    requests_active: Sum
    internal_errors: Sum
    unread_bodies: Sum
    #: Held by the recorder around the ``add_locked`` / ``record_locked`` calls of one call's points, so a call
    #: takes one lock instead of one per point: the lock the single-process instruments share, or a context
    #: that does nothing when every instrument locks itself (the SDK's, the workers' shared meter).
    lock: AbstractContextManager[Any] = dataclasses.field(default_factory=nullcontext)


def create_histogram(meter: Meter, spec: MetricSpec) -> Record:
    return meter.create_histogram(
        spec.name,
        unit=spec.unit,
        description=spec.description,
        explicit_bucket_boundaries_advisory=list(spec.buckets or ()),
    )


def create_instruments(meter: Meter, *, summed: bool = False, histograms: Histograms | None = None) -> Instruments:
    """The contract's instruments on ``meter``.

    Args:
        meter: where the instruments are created.
        summed: keep counters as :class:`SummedInstrument` (the single-process fast path, for a meter whose readers
            are all cumulative and get ``histograms`` through their feed); otherwise the meter's own synchronous
            counters (what the multi-worker shared meter implements).
        histograms: keep histograms in these :class:`BucketHistogram` (whose points the meter provider's exporters
            must get through :meth:`Histograms.feed`); otherwise the meter's own synchronous histograms.
    """

    lock = histograms.lock if histograms is not None else threading.Lock()

    def create(spec: MetricSpec) -> Any:
        if spec.kind == "histogram":
            return histograms.create(spec) if histograms is not None else create_histogram(meter, spec)
        monotonic = spec.kind == "counter"
        if summed:
            instrument = SummedInstrument(meter, spec.name, spec.unit, spec.description, monotonic=monotonic, lock=lock)
            if histograms is not None:
                histograms.sums[spec.name] = instrument
            return instrument
        factory = meter.create_counter if monotonic else meter.create_up_down_counter
        return factory(spec.name, unit=spec.unit, description=spec.description)

    return Instruments(
        request_duration=create(REQUEST_DURATION),
        time_to_first_token=create(TIME_TO_FIRST_TOKEN),
        time_to_abandonment=create(TIME_TO_ABANDONMENT),
        time_per_output_token=create(TIME_PER_OUTPUT_TOKEN),
        tokens=create(TOKENS),
        token_details=create(TOKEN_DETAILS),
        requests=create(REQUESTS),
        errors=create(ERRORS),
        cost=create(COST),
        unpriced_tokens=create(UNPRICED_TOKENS),
        tool_calls=create(TOOL_CALLS),
        tool_results=create(TOOL_RESULTS),
        finish_reasons=create(FINISH_REASONS),
        requests_active=create(REQUESTS_ACTIVE),
        internal_errors=create(INTERNAL_ERRORS),
        unread_bodies=create(UNREAD_BODIES),
        lock=lock if summed or histograms is not None else nullcontext(),
    )
