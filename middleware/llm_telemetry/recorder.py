"""Turns a finished :class:`~llm_telemetry.record.LLMCall` into metric points, with attributes from the contract."""

from __future__ import annotations

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


class MetricsRecorder:
    """Records every metric of the contract (:data:`llm_telemetry.instruments.CONTRACT`) for each call.

    Every point's attributes are the keys its :class:`~llm_telemetry.instruments.MetricSpec` declares, taken
    from one mapping of the call's (bounded) values, so a metric never carries a label the contract lacks.

    Args:
        instruments: where to record.
        pricing: the pricing table for ``llm.cost``.
        limit: the label limiter that keeps every label value bounded.
    """

    def __init__(self, instruments: Instruments, pricing: PricingTable, limit: LabelLimiter) -> None:
        self.instruments = instruments
        self.pricing = pricing
        self.limit = limit

    @staticmethod
    def _active(call: LLMCall) -> dict[str, Any]:
        return select(
            names.REQUESTS_ACTIVE,
            {names.GEN_AI_OPERATION_NAME: call.operation, names.GEN_AI_PROVIDER_NAME: call.provider},
        )

    def start(self, call: LLMCall) -> None:
        self.instruments.requests_active.add(1, self._active(call))

    def end(self, call: LLMCall) -> None:
        ins = self.instruments
        limit = self.limit
        ins.requests_active.add(-1, self._active(call))
        values: dict[str, Any] = {
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
        attribution = call.attribution
        ctx = call.otel_context

        ins.requests.add(1, select(names.REQUESTS, values, attribution))
        if call.duration is not None:
            ins.request_duration.record(call.duration, select(names.REQUEST_DURATION, values, attribution), context=ctx)
        if call.error_type:
            ins.errors.add(1, select(names.ERRORS, values, attribution))

        if call.stream:
            ttft = call.time_to_first_token
            if ttft is not None:
                ins.time_to_first_token.record(
                    ttft, select(names.TIME_TO_FIRST_TOKEN, values, attribution), context=ctx
                )
            tpot = call.time_per_output_token
            if tpot is not None:
                ins.time_per_output_token.record(
                    tpot, select(names.TIME_PER_OUTPUT_TOKEN, values, attribution), context=ctx
                )

        total = 0
        for token_type, field in _BILLABLE:
            count = getattr(call, field)
            if count:
                values[names.GEN_AI_TOKEN_TYPE] = token_type
                ins.tokens.add(count, select(names.TOKENS, values, attribution))
                total += count
        for detail, token_type, field in _DETAILS:
            count = getattr(call, field)
            if count:
                values[names.GEN_AI_TOKEN_TYPE] = token_type
                values[names.LLM_TOKEN_DETAIL] = detail
                ins.token_details.add(count, select(names.TOKEN_DETAILS, values, attribution))

        if total:
            cost = self.pricing.cost(call)
            call.cost_usd = cost
            if cost is not None:
                ins.cost.add(cost, select(names.COST, values, attribution))
            else:
                ins.unpriced_tokens.add(total, select(names.UNPRICED_TOKENS, values))

        for tool in call.tool_calls:
            values[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, tool)
            ins.tool_calls.add(1, select(names.TOOL_CALLS, values, attribution))
        for result in call.tool_results:
            values[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, result.name)
            values[names.LLM_TOOL_STATUS] = "error" if result.is_error else "success"
            ins.tool_results.add(1, select(names.TOOL_RESULTS, values))
