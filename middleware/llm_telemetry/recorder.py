"""Turns a finished :class:`~llm_telemetry.record.LLMCall` into metric points, with attributes from the contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import instruments as names
from .instruments import Instruments, select
from .labels import LabelLimiter
from .pricing import PricingTable
from .record import LLMCall

#: ``gen_ai.token.type`` -> LLMCall field of the billable counts (``llm.tokens``).
_BILLABLE = (("input", "input_tokens"), ("output", "output_tokens"))
#: ``llm.token.detail`` -> (the type it is part of, LLMCall field), for ``llm.token_details``.
_DETAILS = tuple((detail, part, f"{detail}_tokens") for detail, part in names.TOKEN_DETAIL_PARTS)


#: Distinct call shapes whose attribute sets are kept; the label values are bounded, so this is a safety net.
MAX_SHAPES = 4096


class _Shape:
    """The attribute sets of every point a call of one shape makes (same labels, attribution, outcome)."""

    __slots__ = ("cost", "details", "duration", "errors", "requests", "tokens", "tpot", "ttft", "unpriced")

    def __init__(self, values: dict[str, Any], attribution: Mapping[str, str]) -> None:
        self.requests = select(names.REQUESTS, values, attribution)
        self.duration = select(names.REQUEST_DURATION, values, attribution)
        self.errors = select(names.ERRORS, values, attribution)
        self.ttft = select(names.TIME_TO_FIRST_TOKEN, values, attribution)
        self.tpot = select(names.TIME_PER_OUTPUT_TOKEN, values, attribution)
        self.cost = select(names.COST, values, attribution)
        self.unpriced = select(names.UNPRICED_TOKENS, values)
        #: (LLMCall field, attributes) of each billable count and each detail.
        self.tokens = [
            (field, select(names.TOKENS, {**values, names.GEN_AI_TOKEN_TYPE: token_type}, attribution))
            for token_type, field in _BILLABLE
        ]
        self.details = [
            (
                field,
                select(
                    names.TOKEN_DETAILS,
                    {**values, names.GEN_AI_TOKEN_TYPE: part, names.LLM_TOKEN_DETAIL: detail},
                    attribution,
                ),
            )
            for detail, part, field in _DETAILS
        ]


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
        self._active: dict[tuple[str, str], dict[str, Any]] = {}

    def _active_attributes(self, call: LLMCall) -> dict[str, Any]:
        key = (call.operation, call.provider)
        attributes = self._active.get(key)
        if attributes is None:
            values = {names.GEN_AI_OPERATION_NAME: call.operation, names.GEN_AI_PROVIDER_NAME: call.provider}
            attributes = self._active[key] = select(names.REQUESTS_ACTIVE, values)
        return attributes

    def start(self, call: LLMCall) -> None:
        self.instruments.requests_active.add(1, self._active_attributes(call))

    def _values(self, call: LLMCall) -> dict[str, Any]:
        limit = self.limit
        return {
            names.GEN_AI_OPERATION_NAME: call.operation,
            names.GEN_AI_PROVIDER_NAME: call.provider,
            names.GEN_AI_REQUEST_MODEL: limit(names.GEN_AI_REQUEST_MODEL, call.request_model or "unknown"),
            names.GEN_AI_RESPONSE_MODEL: (
                limit(names.GEN_AI_RESPONSE_MODEL, call.response_model) if call.response_model else None
            ),
            names.LLM_STREAM: "true" if call.stream else "false",
            names.ERROR_TYPE: call.error_type,
            names.LLM_USAGE_SOURCE: call.usage_source,
        }

    def end(self, call: LLMCall) -> None:
        ins = self.instruments
        ins.requests_active.add(-1, self._active_attributes(call))
        values = self._values(call)
        attribution = call.attribution
        key = (*values.values(), *attribution.items())
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(values, attribution)
        ctx = call.otel_context

        ins.requests.add(1, shape.requests)
        if call.end is not None:
            ins.request_duration.record(call.end - call.start, shape.duration, context=ctx)
        if call.error_type:
            ins.errors.add(1, shape.errors)

        if call.stream:
            ttft = call.time_to_first_token
            if ttft is not None:
                ins.time_to_first_token.record(ttft, shape.ttft, context=ctx)
            tpot = call.time_per_output_token
            if tpot is not None:
                ins.time_per_output_token.record(tpot, shape.tpot, context=ctx)

        total = 0
        for field, attributes in shape.tokens:
            count = getattr(call, field)
            if count:
                ins.tokens.add(count, attributes)
                total += count
        for field, attributes in shape.details:
            count = getattr(call, field)
            if count:
                ins.token_details.add(count, attributes)

        if total:
            cost = self.pricing.cost(call)
            call.cost_usd = cost
            if cost is not None:
                ins.cost.add(cost, shape.cost)
            else:
                ins.unpriced_tokens.add(total, shape.unpriced)

        if call.tool_calls or call.tool_results:
            self._tools(call, values, attribution)

    def _tools(self, call: LLMCall, values: dict[str, Any], attribution: Mapping[str, str]) -> None:
        ins = self.instruments
        limit = self.limit
        for tool in call.tool_calls:
            values[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, tool)
            ins.tool_calls.add(1, select(names.TOOL_CALLS, values, attribution))
        for result in call.tool_results:
            values[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, result.name)
            values[names.LLM_TOOL_STATUS] = "error" if result.is_error else "success"
            ins.tool_results.add(1, select(names.TOOL_RESULTS, values))
