"""Turns a finished :class:`~llm_telemetry.record.LLMCall` into metric points."""

from __future__ import annotations

from typing import Any

from . import instruments as names
from .instruments import Instruments
from .labels import LabelLimiter
from .pricing import PricingTable
from .record import LLMCall

_TOKEN_FIELDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_tokens"),
    ("cache_creation", "cache_creation_tokens"),
    ("reasoning", "reasoning_tokens"),
)


class MetricsRecorder:
    """Records every metric of the contract (``docs/metrics.md``) for each call.

    Args:
        instruments: where to record.
        pricing: the pricing table for ``llm.cost``.
        limit: the label limiter that keeps every label value bounded.
    """

    def __init__(self, instruments: Instruments, pricing: PricingTable, limit: LabelLimiter) -> None:
        self.instruments = instruments
        self.pricing = pricing
        self.limit = limit

    def start(self, call: LLMCall) -> None:
        self.instruments.requests_active.add(
            1, {names.GEN_AI_OPERATION_NAME: call.operation, names.GEN_AI_PROVIDER_NAME: call.provider}
        )

    def end(self, call: LLMCall) -> None:
        ins = self.instruments
        limit = self.limit
        ins.requests_active.add(
            -1, {names.GEN_AI_OPERATION_NAME: call.operation, names.GEN_AI_PROVIDER_NAME: call.provider}
        )
        base: dict[str, Any] = {
            names.GEN_AI_OPERATION_NAME: call.operation,
            names.GEN_AI_PROVIDER_NAME: call.provider,
            names.GEN_AI_REQUEST_MODEL: limit(names.GEN_AI_REQUEST_MODEL, call.request_model or "unknown"),
        }
        for label, value in call.attribution.items():
            base[names.LLM_METADATA_PREFIX + label] = value
        response_model = limit(names.GEN_AI_RESPONSE_MODEL, call.response_model) if call.response_model else None
        stream = "true" if call.stream else "false"
        ctx = call.otel_context

        outcome = dict(base)
        if response_model:
            outcome[names.GEN_AI_RESPONSE_MODEL] = response_model
        outcome[names.LLM_STREAM] = stream
        if call.error_type:
            outcome[names.ERROR_TYPE] = call.error_type
        ins.requests.add(1, outcome)
        if call.duration is not None:
            ins.request_duration.record(call.duration, outcome, context=ctx)
        if call.error_type:
            errors = dict(base)
            errors[names.LLM_STREAM] = stream
            errors[names.ERROR_TYPE] = call.error_type
            ins.errors.add(1, errors)

        if call.stream:
            ttft = call.time_to_first_token
            if ttft is not None:
                ins.time_to_first_token.record(ttft, base, context=ctx)
            tpot = call.time_per_output_token
            if tpot is not None:
                ins.time_per_output_token.record(tpot, base, context=ctx)

        tokens = dict(base)
        if response_model:
            tokens[names.GEN_AI_RESPONSE_MODEL] = response_model
        tokens[names.LLM_USAGE_SOURCE] = call.usage_source
        total = 0
        for token_type, field in _TOKEN_FIELDS:
            count = getattr(call, field)
            if count:
                tokens[names.GEN_AI_TOKEN_TYPE] = token_type
                ins.tokens.add(count, tokens)
                if token_type in ("input", "output"):
                    total += count

        if total:
            cost = self.pricing.cost(call)
            call.cost_usd = cost
            if cost is not None:
                ins.cost.add(cost, base)
            else:
                ins.unpriced_tokens.add(
                    total,
                    {
                        names.GEN_AI_OPERATION_NAME: call.operation,
                        names.GEN_AI_PROVIDER_NAME: call.provider,
                        names.GEN_AI_REQUEST_MODEL: base[names.GEN_AI_REQUEST_MODEL],
                    },
                )

        if call.tool_calls:
            tools = dict(base)
            for tool in call.tool_calls:
                tools[names.GEN_AI_TOOL_NAME] = limit(names.GEN_AI_TOOL_NAME, tool)
                ins.tool_calls.add(1, tools)
        for result in call.tool_results:
            ins.tool_results.add(
                1,
                {
                    names.GEN_AI_PROVIDER_NAME: call.provider,
                    names.GEN_AI_TOOL_NAME: limit(names.GEN_AI_TOOL_NAME, result.name),
                    names.LLM_TOOL_STATUS: "error" if result.is_error else "success",
                },
            )
