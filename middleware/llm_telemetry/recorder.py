"""Turns a finished :class:`~llm_telemetry.record.LLMCall` into metric points, with attributes from the contract."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

from . import instruments as names
from .instruments import OTHER, BucketHistogram, Instruments, SummedInstrument, attributes_key, select
from .labels import LabelLimiter, mask_keys
from .pricing import PricingTable
from .record import UNTIMED_OPERATION, LLMCall

#: ``gen_ai.token.type`` -> LLMCall field of the billable counts (``llm.tokens``).
_BILLABLE = tuple((kind, f"{kind}_tokens") for kind in names.TOKEN_TYPES)
#: ``llm.token.detail`` -> (the type it is part of, LLMCall field), for ``llm.token_details``.
_DETAILS = tuple((detail, part, f"{detail}_tokens") for detail, part in names.TOKEN_DETAIL_PARTS)


#: Distinct call shapes whose attribute sets are kept; the label values are bounded, so this is a safety net.
MAX_SHAPES = 4096
#: Longest model name a shape is also found by as sent (longer ones are looked up by their bounded label value).
_RAW_KEY_CHARS = 256


#: An attribute set and its key in the instruments (:func:`~llm_telemetry.instruments.attributes_key`).
Keyed = tuple[dict[str, Any], frozenset[tuple[str, Any]]]


def _keyed(attributes: dict[str, Any]) -> Keyed:
    return attributes, attributes_key(attributes)


#: The attribution label value of a request without the header (or with an empty one).
NO_HEADER: Final = "none"


def _refused(status: int | None) -> bool:
    """Whether a request answered ``status`` was refused: a 4xx (a bad key, an unknown model, a malformed body).
    Such a request admits no new label value (model, tool or attribution): its values are the client's word
    alone, and a flood of them would fold every value seen later into other. Not a timeout or a rate limit (408,
    429): those meet real models and tenants, whose errors must keep their names."""
    return status is not None and 400 <= status < 500 and status != 408 and status != 429


class _Shape:
    """The attribute sets of every point a call of one shape makes (same labels, attribution, outcome), each
    with its key, so that recording a point is one dict lookup."""

    __slots__ = (
        "abandoned",
        "attribution",
        "cost",
        "details",
        "duration",
        "errors",
        "finish",
        "requests",
        "tokens",
        "tpot",
        "ttft",
        "unpriced",
        "values",
    )

    def __init__(self, values: dict[str, Any], attribution: Mapping[str, str], input_estimated: bool = False) -> None:
        #: The call's bounded label values (without attribution), for the tool and finish-reason points.
        self.values = values
        self.attribution = attribution
        #: Finish reason as sent -> its point's attributes, for the reasons the label limit admitted as they are.
        self.finish: dict[str, Keyed] = {}
        self.requests = _keyed(select(names.REQUESTS, values, attribution))
        self.duration = _keyed(select(names.REQUEST_DURATION, values, attribution))
        self.errors = _keyed(select(names.ERRORS, values, attribution))
        self.ttft = _keyed(select(names.TIME_TO_FIRST_TOKEN, values, attribution))
        self.abandoned = _keyed(select(names.TIME_TO_ABANDONMENT, values, attribution))
        self.tpot = _keyed(select(names.TIME_PER_OUTPUT_TOKEN, values, attribution))
        self.cost = _keyed(select(names.COST, values, attribution))
        self.unpriced = _keyed(select(names.UNPRICED_TOKENS, values))
        # Output tokens are estimated when a response reports no usage, and then input tokens too (from the
        # request's text); any other count a call has is the provider's own (a stream cut before its usage still had
        # its input tokens reported at its start), so it is labelled reported.
        reported = {**values, names.LLM_USAGE_SOURCE: "reported"}
        estimated = ("output", "input") if input_estimated else ("output",)
        #: (LLMCall field, attributes) of each billable count and each detail.
        self.tokens = [
            (
                field,
                _keyed(
                    select(
                        names.TOKENS,
                        {**(values if token_type in estimated else reported), names.GEN_AI_TOKEN_TYPE: token_type},
                        attribution,
                    )
                ),
            )
            for token_type, field in _BILLABLE
        ]
        self.details = [
            (
                field,
                _keyed(
                    select(
                        names.TOKEN_DETAILS,
                        {**reported, names.GEN_AI_TOKEN_TYPE: part, names.LLM_TOKEN_DETAIL: detail},
                        attribution,
                    )
                ),
            )
            for detail, part, field in _DETAILS
        ]


class _KeyedSum:
    """A counter without keyed adds (the SDK's own, or the shared one of several workers), given the methods of
    :class:`SummedInstrument` the recorder calls."""

    def __init__(self, instrument: Any) -> None:
        self.instrument = instrument

    def add_keyed(self, amount: float, key: Any, attributes: dict[str, Any]) -> None:
        self.instrument.add(amount, attributes)

    add_locked = add_keyed  # the instrument locks itself


class _KeyedHistogram:
    """A histogram without keyed records, given the methods of :class:`BucketHistogram` the recorder calls; its
    "exemplar decision" is the context, handed to ``record`` as it is."""

    def __init__(self, instrument: Any) -> None:
        self.instrument = instrument

    def exemplar(self, context: Any) -> Any:
        return context

    def record_keyed(self, amount: float, key: Any, attributes: dict[str, Any], sample: Any) -> None:
        self.instrument.record(amount, attributes, context=sample)

    record_locked = record_keyed  # the instrument locks itself


def _keyed_instruments(instruments: Instruments) -> Instruments:
    """``instruments`` whose counters all have ``add_keyed`` and ``add_locked``, and histograms ``record_keyed``,
    ``record_locked`` and ``exemplar``."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(instruments):
        instrument = getattr(instruments, field.name)
        if field.name == "lock" or isinstance(instrument, (SummedInstrument, BucketHistogram)):
            continue
        if hasattr(instrument, "record"):
            changes[field.name] = _KeyedHistogram(instrument)
        else:
            changes[field.name] = _KeyedSum(instrument)
    return dataclasses.replace(instruments, **changes) if changes else instruments


class MetricsRecorder:
    """Records every metric of the contract (:data:`llm_telemetry.instruments.CONTRACT`) for each call.

    Every point's attributes are the keys its :class:`~llm_telemetry.instruments.MetricSpec` declares, taken
    from one mapping of the call's (bounded) values, so a metric never carries a label the contract lacks.
    Calls of the same shape (operation, provider, models, stream, outcome, attribution) share their attribute
    sets, built once.

    Args:
        instruments: where to record.
        pricing: the pricing table for ``llm.cost``.
        limit: the label limiter that keeps every label value bounded.
    """

    def __init__(self, instruments: Instruments, pricing: PricingTable, limit: LabelLimiter) -> None:
        self.instruments = instruments
        self.pricing = pricing
        self.limit = limit
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._active: dict[tuple[str, str], Keyed] = {}
        #: The same instruments, each with the keyed methods the hot path calls.
        self._keyed: Any = _keyed_instruments(instruments)

    def _active_attributes(self, call: LLMCall) -> Keyed:
        key = (call.operation, call.provider)
        attributes = self._active.get(key)
        if attributes is None:
            values = {names.GEN_AI_OPERATION_NAME: call.operation, names.GEN_AI_PROVIDER_NAME: call.provider}
            attributes = self._active[key] = _keyed(select(names.REQUESTS_ACTIVE, values))
        return attributes

    def start(self, call: LLMCall) -> None:
        attributes, key = self._active_attributes(call)
        self._keyed.requests_active.add_keyed(1, key, attributes)

    def _values(self, call: LLMCall, refused: bool) -> dict[str, Any]:
        limit = self.limit
        # A request that names no model we could read (a body over the read limit, a multimodal one with large
        # images, say, or not JSON): the model that answered, as in the log line, rather than ``unknown``.
        asked = call.request_model or call.response_model or "unknown"
        model = (limit.known if refused else limit)(names.GEN_AI_REQUEST_MODEL, asked)
        return {
            names.GEN_AI_OPERATION_NAME: call.operation,
            names.GEN_AI_PROVIDER_NAME: call.provider,
            names.GEN_AI_REQUEST_MODEL: model,
            names.GEN_AI_RESPONSE_MODEL: (
                limit(names.GEN_AI_RESPONSE_MODEL, call.response_model) if call.response_model else None
            ),
            names.GEN_AI_REQUEST_STREAM: "true" if call.stream else "false",
            names.ERROR_TYPE: call.error_type,
            names.LLM_USAGE_SOURCE: call.usage_source,
        }

    def _shape(self, call: LLMCall) -> _Shape:
        """The attribute sets of ``call``'s points. Calls are matched to their shape by their raw values while
        those are short (so a repeat costs no label limiting), else by their bounded label values."""
        attribution = call.attribution
        request_model, response_model = call.request_model, call.response_model
        short = len(request_model or "") <= _RAW_KEY_CHARS and len(response_model or "") <= _RAW_KEY_CHARS
        raw = None
        if short:
            raw = (call.operation, call.provider, request_model, response_model, call.stream, call.error_type,
                   call.usage_source, call.input_estimated, *attribution.items())  # fmt: skip
            shape = self._shapes.get(raw)
            if shape is not None:
                return shape
        refused = _refused(call.status_code)
        values = self._values(call, refused)
        bounded = self._attribution(attribution, refused)
        key = (*values.values(), call.input_estimated, *bounded.items())
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(values, bounded, call.input_estimated)
        if (
            raw is not None
            and values[names.GEN_AI_REQUEST_MODEL] == (request_model or response_model or "unknown")
            and values[names.GEN_AI_RESPONSE_MODEL] == response_model
            and all(bounded[label] == (value or NO_HEADER) for label, value in attribution.items())
        ):
            # Every value was admitted as sent, and an admitted value stays admitted: from now on the raw values
            # stand for the bounded ones. (A value folded into ``other`` is asked about again each time.)
            self._shapes[raw] = shape
        return shape

    def _attribution(self, sent: Mapping[str, str], refused: bool) -> dict[str, str]:
        """The attribution labels of header values ``sent``: bounded, ``none`` for a header absent or empty."""
        if not sent:
            return {}
        admit = self.limit.known if refused else self.limit
        return {label: admit(label, value) if value else NO_HEADER for label, value in sent.items()}

    def end(self, call: LLMCall) -> None:
        ins = self._keyed
        active, active_key = self._active_attributes(call)
        shape = self._shape(call)
        call.model_label = shape.values[names.GEN_AI_REQUEST_MODEL]
        if call.model_label == OTHER or shape.values[names.GEN_AI_RESPONSE_MODEL] == OTHER:
            # A model name that could not be a label may hold a key (a client that swapped its key and model
            # settings, an upstream that names its model so): masked for the span and the log line too, which the
            # observers after this one write.
            call.request_model, call.response_model = mask_keys(call.request_model), mask_keys(call.response_model)
        # Everything the points need is worked out first; then they are all recorded under one lock.
        # The exemplar filter decides by the context alone: asked once for the call's (up to) three records.
        sample = ins.request_duration.exemplar(call.otel_context)
        end, first, tpot, abandoned = call.end, None, None, None
        if call.stream and not call.error_type:
            # As the GenAI conventions define them: successful responses only (a failed one is in the error counts).
            first, tpot = call.first_token_at, call.time_per_output_token
        elif (
            call.stream
            and call.error_type == "client_disconnect"
            and call.first_token_at is None
            and end is not None
            and call.operation != UNTIMED_OPERATION
        ):
            # A stream its client left before any token: a wait time to first token leaves out (a stalled upstream
            # the clients give up on would otherwise not show in it at all). Not an image's or a transcription's,
            # which have no first token (see apis.OpenAIMediaReader).
            abandoned = end - call.start
        finishes = [self._finish(shape, reason) for reason in call.finish_reasons] if call.finish_reasons else None
        total = (call.input_tokens or 0) + (call.output_tokens or 0)  # the billable counts (shape.tokens)
        cost = None
        if total:
            cost = call.cost_usd = self.pricing.cost(call)
        unpriced = total if cost is None else 0
        if call.advisor_usage or call.image_tool_usage or call.svg_usage:
            # The sub-inferences of another model (the advisor tool's, the image generation tool's; apart from the
            # tokens, which would be labelled as this call's model) that had no price.
            unpriced += self.pricing.unpriced_sub_tokens(call, cost is not None)
        tools = None
        if call.tool_calls or call.tool_results:
            tools = self._tools(call, dict(shape.values), shape.attribution, _refused(call.status_code))

        # Under one lock: a scrape after one that showed the call's request shows every point of it.
        with ins.lock:
            ins.requests_active.add_locked(-1, active_key, active)
            attributes, key = shape.requests
            ins.requests.add_locked(1, key, attributes)
            if call.error_type:
                attributes, key = shape.errors
                ins.errors.add_locked(1, key, attributes)
            if end is not None:
                attributes, key = shape.duration
                ins.request_duration.record_locked(end - call.start, key, attributes, sample)
            if first is not None:
                attributes, key = shape.ttft
                ins.time_to_first_token.record_locked(first - call.start, key, attributes, sample)
            if abandoned is not None:
                attributes, key = shape.abandoned
                ins.time_to_abandonment.record_locked(abandoned, key, attributes, sample)
            if tpot is not None:
                attributes, key = shape.tpot
                ins.time_per_output_token.record_locked(tpot, key, attributes, sample)
            for field, (attributes, key) in shape.tokens:
                if count := getattr(call, field):
                    ins.tokens.add_locked(count, key, attributes)
            for field, (attributes, key) in shape.details:
                if count := getattr(call, field):
                    ins.token_details.add_locked(count, key, attributes)
            if cost is not None:
                attributes, key = shape.cost
                ins.cost.add_locked(cost, key, attributes)
            if unpriced:
                attributes, key = shape.unpriced
                ins.unpriced_tokens.add_locked(unpriced, key, attributes)
            if finishes:
                for attributes, key in finishes:
                    ins.finish_reasons.add_locked(1, key, attributes)
            if tools:
                for instrument, count, attributes in tools:
                    instrument.add_locked(count, attributes_key(attributes), attributes)

        if shape.attribution:  # (none configured: the call's is empty already, with no copy per request)
            call.attribution = dict(shape.attribution)  # as recorded, for the observers after this one

    def _finish(self, shape: _Shape, reason: str) -> Keyed:
        """The attributes of ``reason``'s point for calls of ``shape`` (a call's reasons are distinct already)."""
        keyed = shape.finish.get(reason)
        if keyed is None:
            value = self.limit(names.LLM_FINISH_REASON, reason)
            values = {**shape.values, names.LLM_FINISH_REASON: value}
            keyed = _keyed(select(names.FINISH_REASONS, values, shape.attribution))
            if value == reason:
                shape.finish[reason] = keyed  # admitted values stay admitted; ``other`` is asked about each time
        return keyed

    def _tools(
        self, call: LLMCall, values: dict[str, Any], attribution: Mapping[str, str], refused: bool
    ) -> list[tuple[Any, int, dict[str, Any]]]:
        """The tool points of ``call``: (instrument, count, attributes), to record with its other points."""
        # Counted per distinct tool first (in the order of first appearance, which the label limit admits by):
        # one point per tool and status, however many calls or results a request carries. A client may send
        # a hundred thousand tool results in one body; recorded one by one, they took ~3 µs each.
        ins = self._keyed
        # The tool results of a refused request are the client's word alone, as its model is (see _refused).
        limit = self.limit.known if refused else self.limit
        points: list[tuple[Any, int, dict[str, Any]]] = []
        for tool, count in Counter(call.tool_calls).items():
            values[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, tool)
            points.append((ins.tool_calls, count, select(names.TOOL_CALLS, values, attribution)))
        for (tool, is_error), count in Counter((r.name, r.is_error) for r in call.tool_results).items():
            values[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, tool)
            values[names.LLM_TOOL_STATUS] = "error" if is_error else "success"
            points.append((ins.tool_results, count, select(names.TOOL_RESULTS, values)))
        return points
