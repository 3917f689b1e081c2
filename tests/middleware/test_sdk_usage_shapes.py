"""Answers as the official SDKs' own types define them, read through the middleware under real uvicorn. Every body
is validated by the SDK's pydantic model before it is served, and the client is the SDK itself; the metrics are read
from real scrapes, the finished calls from the middleware's public ``observers`` hook, the spans from an in-memory
exporter.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.beta import BetaMessage, BetaRawMessageStreamEvent
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.responses import Response, ResponseInputItemParam, ResponseStreamEvent
from openai.types.responses.compacted_response import CompactedResponse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import APIS
from llm_telemetry.middleware import Router
from llm_telemetry.record import LLMCall
from support import Calls, Metrics, free_port, read_as_middleware, scrape, serve, settled, whole_after

PRICING = {
    "models": {
        "claude-sonnet-4": {"input": 3.0, "output": 15.0, "cache_read": 0.3},
        "gpt-5": {"input": 1.25, "output": 10.0},
        "claude-opus-4-7": {"input": 5.0, "output": 25.0, "cache_read": 0.5, "cache_creation": 6.25},
    }
}
#: Served as JSON (model name -> body) or as an event stream (model name -> [(event name or None, data)]).
ANSWERS: dict[str, Any] = {}
STREAMS: dict[str, list[tuple[str | None, Any]]] = {}

_ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
_BETA_EVENT: TypeAdapter[Any] = TypeAdapter(BetaRawMessageStreamEvent)
_RESPONSES_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def claude_event(data: dict[str, Any], beta: bool = False) -> tuple[str, dict[str, Any]]:
    event = (_BETA_EVENT if beta else _ANTHROPIC_EVENT).validate_python(data)
    return data["type"], event.model_dump(mode="json", exclude_none=True)


def _beta_stream_final(service: Service, model: str, beta: str) -> Any:
    """The final message the official SDK assembles from the service's beta stream of ``model``."""
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    with claude.beta.messages.stream(
        model=model, max_tokens=1000, messages=[{"role": "user", "content": "?"}], betas=[beta]
    ) as stream:
        return stream.get_final_message()


def _beta_text_block(index: int, texts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The beta stream events of a text content block at ``index``: its start, a delta per text, its stop."""
    return [
        claude_event(
            {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}, beta=True
        ),
        *(
            claude_event(
                {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
                beta=True,
            )
            for text in texts
        ),
        claude_event({"type": "content_block_stop", "index": index}, beta=True),
    ]


def message_start(message_id: str, model: str, usage: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic stream's ``message_start`` event, its message empty and its usage ``usage``."""
    message = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
    return {"type": "message_start", "message": message}


def responses_event(data: dict[str, Any], number: int) -> tuple[str, dict[str, Any]]:
    event = _RESPONSES_EVENT.validate_python({**data, "sequence_number": number})
    return data["type"], event.model_dump(mode="json", exclude_unset=True)


def chat_event(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> tuple[None, dict[str, Any]]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-audio-preview"}
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    valid = ChatCompletionChunk.model_validate({**chunk, "choices": choices, **extra})
    return None, valid.model_dump(mode="json", exclude_unset=True)


def output_message(*parts: dict[str, Any]) -> dict[str, Any]:
    """A Responses API answer's message item holding ``parts``."""
    return {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": list(parts)}


def responses_body(model: str, output: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    usage = {
        "input_tokens": 100,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 40,
        "output_tokens_details": {"reasoning_tokens": 10},
        "total_tokens": 140,
    }
    body = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": model,
        "status": status,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage if status == "completed" else None,
    }
    return Response.model_validate(body).model_dump(mode="json", exclude_unset=True)


#: For each streamed model, the clock (``perf_counter``) just before each of its events was handed on, in order.
SENT: dict[str, list[float]] = {}


async def _events(steps: list[tuple[str | None, Any]], sent: list[float]) -> AsyncIterator[bytes]:
    for name, data in steps:
        await asyncio.sleep(0.002)  # each event in its own chunk, as a model sends them
        text = data if isinstance(data, str) else json.dumps(data)
        sent.append(time.perf_counter())
        yield (f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode()


async def answer(request: Request) -> HTTPResponse:
    model = (await request.json())["model"]
    if model in STREAMS:
        return StreamingResponse(_events(STREAMS[model], SENT.setdefault(model, [])), media_type="text/event-stream")
    return JSONResponse(ANSWERS[model])


class Service:
    def __init__(self, base: str, port: int, calls: Calls, spans: InMemorySpanExporter) -> None:
        self.base, self.port, self.calls, self.spans = base, port, calls, spans

    def metrics(self, model: str, check: Any = None) -> Metrics:
        def recorded(m: Metrics) -> None:
            assert m.value("llm_requests_total", gen_ai_request_model=model) >= 1
            assert self.call(model) is not None
            if check is not None:
                check(m)

        settled(self.port, recorded)
        return whole_after(self.port)  # (the scrape that showed the request may lack the call's tokens)

    def call(self, model: str) -> LLMCall | None:
        return next((c for c in reversed(self.calls.ended) if c.request_model == model), None)

    def output_messages(self, model: str) -> list[dict[str, Any]]:
        self.metrics(model)
        (span,) = [s for s in self.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == model]
        return list(json.loads(str(span.attributes["gen_ai.output.messages"])))


def _service(capture: bool) -> Iterator[Service]:
    port, calls, spans = free_port(), Calls(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    paths = ("/v1/chat/completions", "/v1/responses", "/v1/responses/compact", "/v1/messages")
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route(path, answer, methods=["POST"]) for path in paths]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing=PRICING,
        observers=[calls],
        tracer_provider=provider,
        capture_content=capture,
    )
    with serve(app) as base:
        yield Service(base, port, calls, spans)
    if app._telemetry is not None:
        app._telemetry.shutdown()


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    yield from _service(capture=False)


@pytest.fixture(scope="module")
def capturing() -> Iterator[Service]:
    yield from _service(capture=True)


# --- Claude's thinking tokens ---------------------------------------------------------------------------------------


def test_claudes_thinking_tokens_are_its_reasoning_tokens_in_a_message(service: Service) -> None:
    model = "claude-sonnet-4-thinking"
    usage = {"input_tokens": 10, "output_tokens": 50, "output_tokens_details": {"thinking_tokens": 30}}
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "sig"}, {"type": "text", "text": "Hi."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    ANSWERS[model] = Message.model_validate(message).model_dump(mode="json", exclude_none=True)
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    reply = claude.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": "?"}])
    assert reply.usage.output_tokens_details is not None and reply.usage.output_tokens_details.thinking_tokens == 30
    m = service.metrics(model)
    assert m.value("llm_token_details_total", gen_ai_request_model=model, llm_token_detail="reasoning") == 30
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 50
    (span,) = [s for s in service.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == model]
    assert span.attributes["gen_ai.usage.reasoning.output_tokens"] == 30


def test_claudes_thinking_counts_in_the_estimate_of_a_message_without_usage(capturing: Service) -> None:
    """A Claude answer without usage (a gateway that drops it) is estimated from what the model wrote, at about four
    characters a token: its thinking too, as a stream's thinking deltas count; the captured answer is its text only.
    The thinking was left out of the estimate of a message, so the same answer read lower unstreamed."""
    model = "claude-thinking-no-usage"
    thinking, text = "The tide tables for Brest put high water near noon today.", "High at noon."
    message = {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "thinking", "thinking": thinking, "signature": "sig"}, {"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    ANSWERS[model] = message
    claude = anthropic.Anthropic(base_url=capturing.base, api_key="test", max_retries=0)
    reply = claude.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": "?"}])
    assert [block.type for block in reply.content] == ["thinking", "text"]
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "output"}
    assert capturing.metrics(model).value("llm_tokens_total", **estimated) == -(-(len(thinking) + len(text)) // 4)
    assert json.dumps(capturing.output_messages(model)).count(thinking) == 0


def test_thinking_a_claude_stream_does_not_show_is_left_out_of_its_time_per_output_token(service: Service) -> None:
    """``display: omitted``: the thinking block carries a signature and no text, so the stream's first token is the
    answer's, and the 1,800 thinking tokens of the 2,000 reported were made before it: 200 tokens are spread over the
    time from the first token to the end (the usage's output_tokens_details, as the SDK merges message_delta's)."""
    model = "claude-sonnet-4-omitted"
    start = message_start("msg_2", model, {"input_tokens": 10, "output_tokens": 1})
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }
    events = [
        claude_event(start),
        claude_event(block),
        claude_event(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}}
        ),
        claude_event({"type": "content_block_stop", "index": 0}),
        claude_event({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        *[
            claude_event({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": f"w{i} "}})
            for i in range(50)
        ],
        claude_event({"type": "content_block_stop", "index": 1}),
        claude_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 2000, "output_tokens_details": {"thinking_tokens": 1800}},
            }
        ),
        claude_event({"type": "message_stop"}),
    ]
    STREAMS[model] = events
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    with claude.messages.stream(
        model=model,
        max_tokens=4000,
        messages=[{"role": "user", "content": "?"}],
        thinking={"type": "enabled", "budget_tokens": 2000},
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens_details is not None and final.usage.output_tokens_details.thinking_tokens == 1800
    m = service.metrics(model)
    assert m.value("llm_token_details_total", gen_ai_request_model=model, llm_token_detail="reasoning") == 1800
    call = service.call(model)
    assert call is not None and call.end is not None and call.first_token_at is not None
    assert call.time_per_output_token == pytest.approx((call.end - call.first_token_at) / (200 - 1))


# --- Claude's compaction passes -------------------------------------------------------------------------------------

#: A beta message whose conversation the API compacted first: the compaction pass is an entry of ``iterations`` that
#: the top-level counts leave out; the ``message`` entry is the top level again.
COMPACTED_USAGE = {
    "input_tokens": 20000,
    "output_tokens": 500,
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 0,
    "iterations": [
        {
            "type": "compaction",
            "input_tokens": 179000,
            "output_tokens": 3000,
            "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 0,
        },
        {
            "type": "message",
            "input_tokens": 20000,
            "output_tokens": 500,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        },
    ],
}


def _compaction_counted(m: Metrics, model: str) -> None:
    reported = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **reported) == 20000 + 179000 + 1000
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **reported) == 500 + 3000
    assert m.value("llm_token_details_total", llm_token_detail="cache_read", **reported) == 1000
    cost = ((20000 + 179000) * 3.0 + 1000 * 0.3 + (500 + 3000) * 15.0) / 1e6
    assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == pytest.approx(cost)


def test_a_compaction_pass_is_counted_in_a_claude_message(service: Service) -> None:
    model = "claude-sonnet-4-compacted"
    message = {
        "id": "msg_3",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "compaction", "content": "What was said."}, {"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": COMPACTED_USAGE,
    }
    ANSWERS[model] = BetaMessage.model_validate(message).model_dump(mode="json", exclude_none=True)
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    reply = claude.beta.messages.create(
        model=model, max_tokens=1000, messages=[{"role": "user", "content": "?"}], betas=["compact-2026-01-12"]
    )
    assert [i.type for i in reply.usage.iterations or []] == ["compaction", "message"]
    service.metrics(model, lambda m: _compaction_counted(m, model))


def test_a_compaction_pass_is_counted_in_a_claude_stream_and_not_timed_as_its_tokens(service: Service) -> None:
    model = "claude-sonnet-4-compacted-stream"
    start_usage = {
        "input_tokens": 20000,
        "output_tokens": 1,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }
    start = message_start("msg_4", model, start_usage)
    closing = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 500, "input_tokens": 20000, "iterations": COMPACTED_USAGE["iterations"]},
    }
    compaction = {"type": "compaction_delta", "content": "What was said."}
    STREAMS[model] = [
        claude_event(start, beta=True),
        claude_event({"type": "content_block_start", "index": 0, "content_block": {"type": "compaction"}}, beta=True),
        claude_event({"type": "content_block_delta", "index": 0, "delta": compaction}, beta=True),
        claude_event({"type": "content_block_stop", "index": 0}, beta=True),
        *_beta_text_block(1, ["w "] * 20),
        claude_event(closing, beta=True),
        claude_event({"type": "message_stop"}, beta=True),
    ]
    final = _beta_stream_final(service, model, "compact-2026-01-12")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (20000, 500)
    assert [i.type for i in final.usage.iterations or []] == ["compaction", "message"]
    service.metrics(model, lambda m: _compaction_counted(m, model))
    call = service.call(model)
    assert call is not None and call.end is not None and call.first_token_at is not None
    # The pass was made before the answer's first token: the message's own 500 tokens are the ones timed.
    assert call.time_per_output_token == pytest.approx((call.end - call.first_token_at) / (500 - 1))


# --- Claude's advisor tool -----------------------------------------------------------------------------------------


def advisor_usage(advisor: str) -> dict[str, Any]:
    """A beta usage whose executor consulted the advisor tool twice: each consultation an ``advisor_message`` entry
    of ``iterations``, run by ``advisor``, that the top-level counts (the executor's, its ``message`` entries) leave
    out."""
    executor = {
        "input_tokens": 2000,
        "output_tokens": 300,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }
    consult = {"type": "advisor_message", "model": advisor, "input_tokens": 1000, "output_tokens": 1600,
               "cache_read_input_tokens": 4000, "cache_creation_input_tokens": 500}  # fmt: skip
    return {
        **executor,
        "iterations": [{"type": "message", **executor}, consult, {**consult, "cache_read_input_tokens": 0}],
    }


def _advisor_counted(m: Metrics, model: str, priced: bool) -> None:
    reported = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
    # The tokens stay the executor's: the advisor's would carry the executor's model labels.
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **reported) == 2000
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **reported) == 300
    executor = (2000 * 3.0 + 300 * 15.0) / 1e6
    # Each consultation at the advisor's own prices: fresh input, cache reads, cache writes, output.
    advisor = ((1000 * 5.0 + 4000 * 0.5 + 500 * 6.25 + 1600 * 25.0) + (1000 * 5.0 + 500 * 6.25 + 1600 * 25.0)) / 1e6
    cost = m.value("llm_cost_usd_total", gen_ai_request_model=model)
    assert cost == pytest.approx(executor + advisor if priced else executor)
    unpriced = 0 if priced else (1000 + 4000 + 500 + 1600) + (1000 + 500 + 1600)
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == unpriced


@pytest.mark.parametrize("advisor", ["claude-opus-4-7", "claude-opus-unpriced"])
def test_the_advisor_tools_consultations_are_priced_at_the_advisors_price_in_a_claude_message(
    service: Service, advisor: str
) -> None:
    """The advisor's tokens are billed at its model's price and the top-level usage leaves them out: they were in no
    cost at all (a consultation of Opus from Sonnet, most of such a call's spend, was free). Now each is priced as
    its own model, or counted as unpriced tokens when that model has no price."""
    model = f"claude-sonnet-4-advised-{advisor}"
    message = {
        "id": "msg_adv",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": advisor_usage(advisor),
    }
    ANSWERS[model] = BetaMessage.model_validate(message).model_dump(mode="json", exclude_none=True)
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    reply = claude.beta.messages.create(
        model=model, max_tokens=1000, messages=[{"role": "user", "content": "?"}], betas=["advisor-tool-2026-03-01"]
    )
    assert [i.type for i in reply.usage.iterations or []] == ["message", "advisor_message", "advisor_message"]
    service.metrics(model, lambda m: _advisor_counted(m, model, advisor == "claude-opus-4-7"))


def test_the_advisor_tools_consultations_are_priced_in_a_claude_stream(service: Service) -> None:
    model = "claude-sonnet-4-advised-stream"
    usage = advisor_usage("claude-opus-4-7")
    start = message_start(
        "msg_adv2", model, {k: v for k, v in usage.items() if k != "iterations"} | {"output_tokens": 1}
    )
    closing = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 300, "input_tokens": 2000, "iterations": usage["iterations"]},
    }
    STREAMS[model] = [
        claude_event(start, beta=True),
        *_beta_text_block(0, ["ok"]),
        claude_event(closing, beta=True),
        claude_event({"type": "message_stop"}, beta=True),
    ]
    final = _beta_stream_final(service, model, "advisor-tool-2026-03-01")
    assert [i.type for i in final.usage.iterations or []] == ["message", "advisor_message", "advisor_message"]
    service.metrics(model, lambda m: _advisor_counted(m, model, priced=True))


# --- OpenAI's compaction pass ---------------------------------------------------------------------------------------


def test_openais_responses_compact_is_a_responses_call(service: Service) -> None:
    model = "gpt-5-compact"
    compacted = {
        "id": "cmp_1",
        "created_at": 1,
        "object": "response.compaction",
        "output": [{"type": "compaction", "id": "cmpi_1", "encrypted_content": "enc"}],
        "usage": {
            "input_tokens": 50000,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 2000,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 52000,
        },
    }
    ANSWERS[model] = CompactedResponse.model_validate(compacted).model_dump(mode="json")
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    assert oai.responses.compact(model=model, input="a long conversation").usage.input_tokens == 50000
    m = service.metrics(model)
    reported = {"gen_ai_request_model": model, "llm_usage_source": "reported", "gen_ai_operation_name": "chat"}
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **reported) == 50000
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **reported) == 2000
    assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == pytest.approx((50000 * 1.25 + 2000 * 10) / 1e6)
    # The route takes that path only: a stored response's own paths are no inference calls.
    router = Router()
    assert router.match("/openai/v1/responses/compact").name == "openai.responses"  # type: ignore[union-attr]
    assert router.match("/v1/responses/resp_1/input_items") is None
    assert router.match("/v1/responses/resp_1/cancel") is None
    assert router.match("/v1/responses").name == "openai.responses"  # type: ignore[union-attr]


def test_a_compaction_captures_no_user_message_as_the_models_answer(capturing: Service) -> None:
    """A compaction's output is the user's messages followed by the compaction item (``CompactedResponse.output``):
    with content capture on, none of it is the model's answer."""
    model = "gpt-5-compact-captured"
    said = {"type": "message", "id": "msg_u", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": "My account number is 12345."}]}  # fmt: skip
    compacted = {
        "id": "cmp_2",
        "created_at": 1,
        "object": "response.compaction",
        "output": [said, {"type": "compaction", "id": "cmpi_2", "encrypted_content": "enc"}],
        "usage": {
            "input_tokens": 900,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 100,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 1000,
        },
    }
    ANSWERS[model] = compacted
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    assert oai.responses.compact(model=model, input="My account number is 12345.").usage.output_tokens == 100
    capturing.metrics(model)
    (span,) = [s for s in capturing.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == model]
    assert "12345" not in str(span.attributes.get("gen_ai.output.messages", ""))
    assert "12345" in str(span.attributes.get("gen_ai.input.messages", ""))  # (what the user said, as such)


# --- spoken answers -------------------------------------------------------------------------------------------------

AUDIO = "UklGRiQAAABXQVZF" * 20


def _spoken_chat(usage: bool) -> list[tuple[None, Any]]:
    events = [chat_event({"role": "assistant", "content": None})]
    events += [chat_event({"audio": {"id": "audio_1", "transcript": word}}) for word in ("Hello", " there", "!")]
    events += [chat_event({"audio": {"data": AUDIO}}) for _ in range(4)]
    events += [chat_event({"audio": {"expires_at": 1700000000}}), chat_event({}, "stop")]
    if usage:
        events.append(chat_event(None, usage={"prompt_tokens": 20, "completion_tokens": 120, "total_tokens": 140}))
    return [*events, (None, "[DONE]")]


@pytest.mark.parametrize("usage", [True, False])
def test_a_spoken_chat_answer_has_a_first_token_and_an_estimate(service: Service, usage: bool) -> None:
    model = f"gpt-4o-audio-preview-{usage}"
    STREAMS[model] = _spoken_chat(usage)
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    extra: Any = {"stream_options": {"include_usage": True}} if usage else {}
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "?"}],
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "pcm16"},
            stream=True,
            **extra,
        )
    )
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    transcript = [piece.transcript for piece in audio if piece.transcript]
    assert transcript == ["Hello", " there", "!"]
    m = service.metrics(model)
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    if usage:
        assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 120
    else:
        # Each piece of the transcript is about a token, as a piece of text is (the audio says nothing of its own).
        estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "output"}
        assert m.value("llm_tokens_total", **estimated) == len(transcript)


def test_a_spoken_chat_answer_not_streamed_is_estimated_as_the_same_answer_in_text(service: Service) -> None:
    """An answer without usage is estimated from its text; a spoken one (``message.audio``, no ``content``) from its
    transcript, as a stream's transcript deltas are: the same words, written or spoken, the same estimate."""
    words = "The tide in Brest is high at noon and low at six."
    spoken = {"role": "assistant", "content": None, "audio": {"id": "audio_1", "data": AUDIO, "expires_at": 1700000000,
                                                              "transcript": words}}  # fmt: skip
    for model, message in (("gpt-4o-audio-written", {"role": "assistant", "content": words}),
                           ("gpt-4o-audio-spoken", spoken)):  # fmt: skip
        body = {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}  # fmt: skip
        ANSWERS[model] = ChatCompletion.model_validate(body).model_dump(mode="json", exclude_unset=True)
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    written = oai.chat.completions.create(model="gpt-4o-audio-written", messages=[{"role": "user", "content": "?"}])
    reply = oai.chat.completions.create(
        model="gpt-4o-audio-spoken",
        messages=[{"role": "user", "content": "?"}],
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
    )
    assert written.choices[0].message.content == words and written.usage is None
    audio = reply.choices[0].message.audio
    assert audio is not None and audio.transcript == words and reply.choices[0].message.content is None
    estimated = {"llm_usage_source": "estimated", "gen_ai_token_type": "output"}
    text_estimate = service.metrics("gpt-4o-audio-written").value(
        "llm_tokens_total", gen_ai_request_model="gpt-4o-audio-written", **estimated
    )
    assert text_estimate == -(-len(words) // 4)  # ~4 characters a token
    m = service.metrics("gpt-4o-audio-spoken")
    assert m.value("llm_tokens_total", gen_ai_request_model="gpt-4o-audio-spoken", **estimated) == text_estimate


def test_a_spoken_responses_answer_has_a_first_token(service: Service) -> None:
    model = "gpt-5-spoken"
    created = {"type": "response.created", "response": responses_body(model, [], "in_progress")}
    steps = [
        created,
        {"type": "response.audio.transcript.delta", "delta": "Hello", "response_id": "resp_1"},
        {"type": "response.audio.delta", "delta": AUDIO, "response_id": "resp_1"},
        {"type": "response.audio.delta", "delta": AUDIO, "response_id": "resp_1"},
        {"type": "response.audio.done", "response_id": "resp_1"},
        {"type": "response.audio.transcript.done", "response_id": "resp_1"},
        {"type": "response.completed", "response": responses_body(model, [])},
    ]
    STREAMS[model] = [responses_event(step, n) for n, step in enumerate(steps)]
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    kinds = [event.type for event in oai.responses.create(model=model, input="?", stream=True)]
    assert "response.audio.delta" in kinds and "response.audio.transcript.delta" in kinds
    m = service.metrics(model)
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1


pieces = st.lists(
    st.tuples(st.sampled_from(["content", "transcript", "data"]), st.text(min_size=1, max_size=8)),
    min_size=1,
    max_size=20,
)


@given(pieces, st.booleans())
@settings(max_examples=100, deadline=None)
def test_audio_deltas_never_pass_for_text_deltas_on_the_fast_path(chunks: list[tuple[str, str]], spaced: bool) -> None:
    """A chat stream whose text deltas teach the reader their shape, with audio deltas among them: the audio ones
    fall to the full parse (their bytes are not of the text's shape) and are read there, so the reader with its
    shortcuts (content capture off) and the one without them count the same output and the same first token."""
    separators = (", ", ": ") if spaced else (",", ":")
    deltas = [{"content": text} if kind == "content" else {"audio": {kind: text}} for kind, text in chunks]
    events = [{"role": "assistant", "content": None}, *deltas]
    body = [b"data: " + json.dumps(chat_event(delta)[1], separators=separators).encode() + b"\n\n" for delta in events]
    body += [
        b"data: " + json.dumps(chat_event({}, "stop")[1], separators=separators).encode() + b"\n\n",
        b"data: [DONE]\n\n",
    ]

    def run(capture: bool) -> LLMCall:
        spec = APIS["openai.chat"]
        call = LLMCall(spec.operation, spec.provider, start=0.0)
        reader = spec.response_reader(call, stream=True, capture=capture)
        for i, chunk in enumerate(body):
            reader.feed(chunk, now=1.0 + i)
        reader.finish(now=100.0)
        return call

    fast, full = run(False), run(True)
    # Every piece but the audio's bytes is about a token (with none, there is nothing to estimate from); the first
    # piece of either kind is the first token.
    tokens = sum(kind != "data" for kind, _ in chunks) or None
    assert fast.output_tokens == full.output_tokens == tokens
    assert fast.first_token_at == full.first_token_at == 2.0


# --- reasoning is no part of the captured answer --------------------------------------------------------------------


def test_a_responses_streams_captured_answer_leaves_its_reasoning_out(capturing: Service) -> None:
    model = "gpt-5-captured"
    message = output_message({"type": "output_text", "text": "Hello world", "annotations": []})
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]}
    text = {"item_id": "msg_1", "output_index": 1, "content_index": 0, "logprobs": []}
    summary = {"item_id": "rs_1", "output_index": 0, "summary_index": 0}
    steps = [
        {"type": "response.created", "response": responses_body(model, [], "in_progress")},
        {"type": "response.reasoning_summary_text.delta", **summary, "delta": "think"},
        {"type": "response.reasoning_summary_text.delta", **summary, "delta": "ing"},
        {"type": "response.output_text.delta", **text, "delta": "Hello"},
        {"type": "response.output_text.delta", **text, "delta": " world"},
        {"type": "response.completed", "response": responses_body(model, [reasoning, message])},
    ]
    STREAMS[model] = [responses_event(step, n) for n, step in enumerate(steps)]
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    events = list(oai.responses.create(model=model, input="?", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello world"
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "Hello world"
    (output,) = capturing.output_messages(model)
    assert output["parts"] == [{"type": "text", "content": "Hello world"}]


def test_a_responses_answers_captured_text_leaves_an_open_models_reasoning_text_out(capturing: Service) -> None:
    model = "gpt-oss-captured"
    message = output_message({"type": "output_text", "text": "Paris.", "annotations": []})
    reasoning = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "The capital of France"}],
    }
    ANSWERS[model] = responses_body(model, [reasoning, message])
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    assert oai.responses.create(model=model, input="?").output_text == "Paris."
    (output,) = capturing.output_messages(model)
    assert output["parts"] == [{"type": "text", "content": "Paris."}]


def test_a_chat_streams_captured_answer_leaves_its_reasoning_content_out(capturing: Service) -> None:
    model = "deepseek-captured"
    STREAMS[model] = [
        chat_event({"role": "assistant", "content": ""}),
        (None, {**chat_event({})[1], "choices": [{"index": 0, "delta": {"reasoning_content": "Let me think. "}}]}),
        chat_event({"content": "Answer"}),
        chat_event({}, "stop"),
        (None, "[DONE]"),
    ]
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Answer"
    (output,) = capturing.output_messages(model)
    assert output["parts"] == [{"type": "text", "content": "Answer"}]


def test_a_refusal_not_streamed_is_the_captured_answer_as_a_streamed_one_is(capturing: Service) -> None:
    """A refusal streamed (chat ``delta.refusal``, the Responses API's ``response.refusal.delta``) is the output
    message's text; the same refusal in an answer not streamed (chat ``message.refusal``, a Responses ``refusal``
    part) is too."""
    refusal = "I can't help with that."
    chat = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None, "refusal": refusal}}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }
    ANSWERS["gpt-4o-refusing"] = ChatCompletion.model_validate(chat).model_dump(mode="json", exclude_unset=True)
    part = {"type": "refusal", "refusal": refusal}
    message = output_message(part)
    ANSWERS["gpt-5-refusing"] = responses_body("gpt-5-refusing", [message])
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    reply = oai.chat.completions.create(model="gpt-4o-refusing", messages=[{"role": "user", "content": "?"}])
    assert reply.choices[0].message.refusal == refusal
    answer = oai.responses.create(model="gpt-5-refusing", input="?")
    assert [p.type for item in answer.output if item.type == "message" for p in item.content] == ["refusal"]
    for model in ("gpt-4o-refusing", "gpt-5-refusing"):
        (output,) = capturing.output_messages(model)
        assert output["parts"] == [{"type": "text", "content": refusal}], model


# --- the Responses API's hosted and client tools --------------------------------------------------------------------

HOSTED_TOOL_ITEMS = [
    {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "weather"}},
    {
        "type": "mcp_call",
        "id": "mcp_1",
        "server_label": "deepwiki",
        "name": "read_wiki",
        "arguments": "{}",
        "output": "ok",
    },
    {
        "type": "code_interpreter_call",
        "id": "ci_1",
        "status": "completed",
        "code": "1+1",
        "container_id": "c",
        "outputs": [],
    },
    {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
]
HOSTED_TOOL_NAMES = ["web_search", "read_wiki", "code_interpreter", "get_weather"]


def test_hosted_tools_are_tool_calls_in_a_responses_answer(service: Service) -> None:
    model = "gpt-5-hosted-tools"
    ANSWERS[model] = responses_body(model, HOSTED_TOOL_ITEMS)
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    assert [item.type for item in oai.responses.create(model=model, input="?").output] == [
        item["type"] for item in HOSTED_TOOL_ITEMS
    ]
    m = service.metrics(model)
    for name in HOSTED_TOOL_NAMES:
        assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name=name) == 1, name


@pytest.mark.parametrize("text", [False, True])
def test_hosted_tools_are_tool_calls_in_a_responses_stream(service: Service, text: bool) -> None:
    """The items of tools the API ran, and of a function call whose arguments are not streamed, come whole: the first
    is the stream's first output, and with nothing streamed after it the stream has no time per output token (its
    tokens were all made before that first one); text streamed after them is timed."""
    model = f"gpt-5-hosted-tools-stream-{text}"
    message = output_message({"type": "output_text", "text": "Sunny.", "annotations": []})
    items = [*HOSTED_TOOL_ITEMS, message] if text else HOSTED_TOOL_ITEMS
    steps: list[dict[str, Any]] = [{"type": "response.created", "response": responses_body(model, [], "in_progress")}]
    for index, item in enumerate(items):
        steps.append({"type": "response.output_item.added", "output_index": index, "item": item})
        if item is message:
            delta = {"item_id": message["id"], "output_index": index, "content_index": 0, "logprobs": []}
            steps += [{"type": "response.output_text.delta", **delta, "delta": word} for word in ("Sun", "ny.")]
        steps.append({"type": "response.output_item.done", "output_index": index, "item": item})
    steps.append({"type": "response.completed", "response": responses_body(model, items)})
    STREAMS[model] = [responses_event(step, n) for n, step in enumerate(steps)]
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    with oai.responses.stream(model=model, input="?") as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == [item["type"] for item in items]
    m = service.metrics(model)
    for name in HOSTED_TOOL_NAMES:
        assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name=name) == 1, name
    # The first of them is the stream's first output.
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    assert m.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model) == int(text)


@pytest.mark.parametrize(
    ("kind", "event"),
    [("function_call", "response.function_call_arguments.delta"), ("shell_call", "response.shell_call_command.delta")],
)
def test_a_tool_calls_input_streamed_after_its_item_is_timed(service: Service, kind: str, event: str) -> None:
    """A function call's arguments (and a shell's commands) stream after their item is added: the item is the
    stream's first output, and the pieces that follow are tokens made after it, so the stream has a time per output
    token, as one whose text streams after a hosted tool's item has."""
    model = f"gpt-5-streamed-input-{kind}"
    added = {"type": kind, "id": "tc_1", "call_id": "call_1", "status": "in_progress"} | (
        {"name": "get_weather", "arguments": ""} if kind == "function_call" else {"action": {"commands": []}}
    )
    done = (
        added
        | {"status": "completed"}
        | ({"arguments": '{"city":"Paris"}'} if kind == "function_call" else {"action": {"commands": ["ls -la"]}})
    )
    pieces = ['{"city":', '"Paris"}'] if kind == "function_call" else ["ls", " -la"]
    where = {"output_index": 0, "item_id": "tc_1"} if kind == "function_call" else {"output_index": 0}
    steps: list[dict[str, Any]] = [
        {"type": "response.created", "response": responses_body(model, [], "in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": added},
        *[{"type": event, **where, "delta": piece} | ({} if kind == "function_call" else {"command_index": 0})
          for piece in pieces],
        {"type": "response.output_item.done", "output_index": 0, "item": done},
        {"type": "response.completed", "response": responses_body(model, [done])},
    ]  # fmt: skip
    STREAMS[model] = [responses_event(step, n) for n, step in enumerate(steps)]
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    with oai.responses.stream(model=model, input="?") as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == [kind]
    m = service.metrics(model)
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    assert m.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model) == 1


def answered_with(service: Service, model: str, items: list[dict[str, Any]], stream: bool, usage: bool = True) -> None:
    """Have the upstream answer ``model`` with the Responses API output ``items``, as one JSON answer (``usage``: with
    its usage) or as a stream of each item added and done, and ask for it with the official SDK, which must read them
    all back."""
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    if stream:
        steps: list[dict[str, Any]] = [
            {"type": "response.created", "response": responses_body(model, [], "in_progress")}
        ]
        for index, item in enumerate(items):
            steps.append({"type": "response.output_item.added", "output_index": index, "item": item})
            steps.append({"type": "response.output_item.done", "output_index": index, "item": item})
        steps.append({"type": "response.completed", "response": responses_body(model, items)})
        STREAMS[model] = [responses_event(step, n) for n, step in enumerate(steps)]
        with oai.responses.stream(model=model, input="?") as events:
            final = events.get_final_response()
    else:
        ANSWERS[model] = responses_body(model, items) | ({} if usage else {"usage": None})
        final = oai.responses.create(model=model, input="?")
    assert [item.type for item in final.output] == [item["type"] for item in items]


#: Programmatic tool calling: the JavaScript the model wrote (a ``program`` item, which the API runs, its result a
#: ``program_output`` item), and a call of a function that program made (``caller``: the program).
PROGRAM_ITEMS = [
    {"type": "program", "id": "prg_1", "call_id": "call_prg", "code": "await tools.get_weather({city: 'Paris'})",
     "fingerprint": "fp_1"},
    {"type": "function_call", "id": "fc_1", "call_id": "call_fn", "name": "get_weather", "arguments": "{}",
     "caller": {"type": "program", "caller_id": "call_prg"}},
    {"type": "program_output", "id": "prgo_1", "call_id": "call_prg", "result": "sunny", "status": "completed"},
]  # fmt: skip
#: The API asks the application to approve a call of an MCP server's tool the model chose.
APPROVAL_REQUEST = {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "deepwiki", "name": "read_wiki",
                    "arguments": '{"page": "intro", "section": "install"}'}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_a_program_is_a_call_of_the_programmatic_tool_and_an_approval_request_a_first_output(
    service: Service, stream: bool
) -> None:
    """A ``program`` item is the model calling the ``programmatic_tool_calling`` tool, which the API runs (a tool call,
    and a stream's first output, as a ``code_interpreter_call`` is); the calls its program makes are counted as their
    own items. An ``mcp_approval_request`` is output the model made (a stream's first token, its arguments estimated
    when no usage is reported) but no tool call: the ``mcp_call`` item that follows the approval is."""
    models = {f"gpt-5-program-{stream}": PROGRAM_ITEMS, f"gpt-5-approval-{stream}": [APPROVAL_REQUEST]}
    for model, items in models.items():
        answered_with(service, model, items, stream, usage=False)
    program, approval = (service.metrics(model) for model in models)
    program_model, approval_model = models
    for name in ("programmatic_tool_calling", "get_weather"):
        assert program.value("llm_tool_calls_total", gen_ai_request_model=program_model, gen_ai_tool_name=name) == 1
    assert approval.value("llm_tool_calls_total", gen_ai_request_model=approval_model) == 0
    if stream:
        for m, model in ((program, program_model), (approval, approval_model)):
            assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1, model
            # Nothing was streamed after the first output: its 30 tokens were all made before it, and spread over
            # the few milliseconds to the end they read tens of times too fast.
            assert m.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model) == 0, model
    else:
        # No usage: the program's code and the approval's arguments are output to estimate (~4 characters a token).
        estimated = {"llm_usage_source": "estimated", "gen_ai_token_type": "output"}
        code, arguments = str(PROGRAM_ITEMS[0]["code"]), APPROVAL_REQUEST["arguments"]
        assert program.value("llm_tokens_total", gen_ai_request_model=program_model, **estimated) == -(
            -(len(code) + 2) // 4
        )
        assert approval.value("llm_tokens_total", gen_ai_request_model=approval_model, **estimated) == -(
            -len(arguments) // 4
        )


@pytest.mark.parametrize("stream", [False, True])
def test_the_results_of_a_tool_search_and_a_program_the_api_ran_are_shown_after_their_calls(
    capturing: Service, stream: bool
) -> None:
    """The ``tool_search_output`` of a search the API ran (``execution: server``), the ``program_output`` of a
    program it ran and the ``shell_call_output`` of a shell it ran in its own container are its tools' results:
    ``server_tool_call_response`` parts after their calls' ``server_tool_call`` parts, as Anthropic's result blocks of
    the tools it runs are, in an answer streamed or not (and as they are when the conversation sends them back); a
    tool search or a shell the client ran has its output sent by the client."""
    search = {"type": "tool_search_call", "id": "tsc_1", "call_id": "call_srv", "execution": "server",
              "arguments": {"query": "maps"}, "status": "completed"}  # fmt: skip
    found = {"type": "tool_search_output", "id": "tso_1", "call_id": "call_srv", "execution": "server", "tools": [],
             "status": "completed"}  # fmt: skip
    container = {"type": "container_reference", "container_id": "cntr_1"}
    shell = {"type": "shell_call", "id": "sh_1", "call_id": "call_sh", "action": {"commands": ["ls"]},
             "status": "completed", "environment": container}  # fmt: skip
    ran = {"type": "shell_call_output", "id": "sho_1", "call_id": "call_sh", "status": "completed",
           "output": [{"stdout": "a.txt", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]}  # fmt: skip
    items = [search, found, PROGRAM_ITEMS[0], PROGRAM_ITEMS[2], shell, ran]
    model = f"gpt-5-server-results-{stream}"
    answered_with(capturing, model, items, stream)
    (output,) = capturing.output_messages(model)
    assert output["parts"] == [
        {"type": part, "id": call_id, part: {"type": kind}} | ({"name": kind} if part == "server_tool_call" else {})
        for call_id, kind in (
            ("call_srv", "tool_search"),
            ("call_prg", "programmatic_tool_calling"),
            ("call_sh", "shell"),
        )
        for part in ("server_tool_call", "server_tool_call_response")
    ]


def test_a_program_and_its_output_sent_back_are_the_apis_tool_call_and_result(capturing: Service) -> None:
    """A conversation that sends back a program the API ran and its ``program_output`` shows them as in the answer, a
    ``server_tool_call`` and its ``server_tool_call_response`` (the assistant's, not a tool result of the
    application's, which the metrics do not count either); the function call the program made, and the application's
    output of it, are a tool call and its response."""
    model = "gpt-5-program-sent-back"
    ANSWERS[model] = responses_body(model, [output_message({"type": "output_text", "text": "ok", "annotations": []})])
    sent = TypeAdapter(list[ResponseInputItemParam]).validate_python(
        [
            {"type": "message", "role": "user", "content": "Weather?"},
            *PROGRAM_ITEMS[:2],
            {"type": "function_call_output", "call_id": "call_fn", "output": "sunny",
             "caller": {"type": "program", "caller_id": "call_prg"}},
            PROGRAM_ITEMS[2],
        ]
    )  # fmt: skip
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    assert oai.responses.create(model=model, input=sent).output_text == "ok"
    capturing.metrics(model)
    (span,) = [s for s in capturing.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == model]
    shown = json.loads(str(span.attributes["gen_ai.input.messages"]))
    kind = "programmatic_tool_calling"
    assert shown[1:] == [
        {"role": "assistant", "parts": [{"type": "server_tool_call", "id": "call_prg", "name": kind,
                                         "server_tool_call": {"type": kind}}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_fn", "name": "get_weather",
                                         "arguments": "{}"}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_fn", "response": "sunny"}]},
        {"role": "assistant", "parts": [{"type": "server_tool_call_response", "id": "call_prg",
                                         "server_tool_call_response": {"type": kind}}]},
    ]  # fmt: skip


#: A tool search the API ran whose ``call_id`` is null in its call and its output (the SDK's types allow it).
SEARCH_WITHOUT_CALL_ID = [
    {"type": "tool_search_call", "id": "tsc_9", "call_id": None, "execution": "server", "arguments": {},
     "status": "completed"},
    {"type": "tool_search_output", "id": "tso_9", "call_id": None, "execution": "server", "tools": [],
     "status": "completed"},
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_a_hosted_result_is_shown_under_its_calls_id_and_only_for_the_apis_own_calls(
    capturing: Service, stream: bool
) -> None:
    """A tool search's output without a ``call_id`` is shown under the id of the call it answers, right after it (it
    was shown under its own id, after every other call); the output of a shell the application runs (a ``local``
    environment), which an agent server that runs the tools may put in its answer, is not shown as the API's result."""
    local = {"type": "shell_call", "id": "sh_2", "call_id": "call_local", "action": {"commands": ["pwd"]},
             "status": "completed", "environment": {"type": "local"}}  # fmt: skip
    ran = {"type": "shell_call_output", "id": "sho_2", "call_id": "call_local", "status": "completed",
           "output": [{"stdout": "/", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]}  # fmt: skip
    items = [*SEARCH_WITHOUT_CALL_ID, HOSTED_TOOL_ITEMS[0], local, ran]
    model = f"gpt-5-result-ids-{stream}"
    answered_with(capturing, model, items, stream)
    (output,) = capturing.output_messages(model)
    assert output["parts"] == [
        {"type": "server_tool_call", "id": "tsc_9", "name": "tool_search", "server_tool_call": {"type": "tool_search"}},
        {"type": "server_tool_call_response", "id": "tsc_9", "server_tool_call_response": {"type": "tool_search"}},
        {"type": "server_tool_call", "id": "ws_1", "name": "web_search", "server_tool_call": {"type": "web_search"}},
        {"type": "tool_call", "id": "call_local", "name": "shell"},
    ]


def test_a_tool_search_sent_back_without_call_ids_shows_its_output_under_its_calls_id(capturing: Service) -> None:
    """Sent back with the conversation, a tool search the API ran whose ``call_id`` is null shows its output under its
    call's id, as in the answer."""
    model = "gpt-5-search-sent-back"
    ANSWERS[model] = responses_body(model, [output_message({"type": "output_text", "text": "ok", "annotations": []})])
    sent = TypeAdapter(list[ResponseInputItemParam]).validate_python(
        [{"type": "message", "role": "user", "content": "Find a tool"}, *SEARCH_WITHOUT_CALL_ID]
    )
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    assert oai.responses.create(model=model, input=sent).output_text == "ok"
    capturing.metrics(model)
    (span,) = [s for s in capturing.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == model]
    shown = json.loads(str(span.attributes["gen_ai.input.messages"]))
    assert [part["id"] for message in shown[1:] for part in message["parts"]] == ["tsc_9", "tsc_9"]


def _search(kind: str, item_id: str, call_id: str | None) -> dict[str, Any]:
    item = {
        "type": f"tool_search_{kind}",
        "id": item_id,
        "call_id": call_id,
        "execution": "server",
        "status": "completed",
    }
    return item | ({"arguments": {}} if kind == "call" else {"tools": []})


@pytest.mark.parametrize(
    ("items", "ids"),
    [
        # Two searches side by side: their outputs answer them in order.
        ([_search("call", "tsc_a", None), _search("call", "tsc_b", None), _search("output", "tso_a", None),
          _search("output", "tso_b", None)], ["tsc_a", "tsc_b", "tsc_a", "tsc_b"]),
        # A call with a call_id, its output without.
        ([_search("call", "tsc_c", "call_x"), _search("output", "tso_c", None)], ["call_x", "call_x"]),
    ],
)  # fmt: skip
def test_tool_search_outputs_without_call_ids_answer_the_same_calls_in_an_answer_and_sent_back(
    capturing: Service, items: list[dict[str, Any]], ids: list[str]
) -> None:
    """Which call a tool search's output without a ``call_id`` answers is the same in the answer and sent back: the
    first call before it not yet answered."""
    model = f"gpt-5-search-pairs-{len(items)}"
    ANSWERS[model] = responses_body(model, items)
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    oai.responses.create(model=model, input="?")
    (answer,) = capturing.output_messages(model)
    calls = [part["id"] for part in answer["parts"] if part["type"] == "server_tool_call"]
    # In the answer, each output right after the call it answers.
    assert [part["id"] for part in answer["parts"]] == [i for i in calls for _ in range(2)]
    assert sorted(calls) == sorted(set(ids))
    sent_model = f"{model}-sent"
    ANSWERS[sent_model] = responses_body(
        sent_model, [output_message({"type": "output_text", "text": "ok", "annotations": []})]
    )
    sent = TypeAdapter(list[ResponseInputItemParam]).validate_python([{"role": "user", "content": "?"}, *items])
    oai.responses.create(model=sent_model, input=sent)
    capturing.metrics(sent_model)
    (span,) = [
        s for s in capturing.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == sent_model
    ]
    shown = json.loads(str(span.attributes["gen_ai.input.messages"]))
    assert [part["id"] for message in shown[1:] for part in message["parts"]] == ids


def test_a_result_of_a_tool_whose_call_is_not_shown_is_not_shown(capturing: Service) -> None:
    """An answer shows its first 16 tool calls: the result of a tool the API ran past them is not shown either (it
    was, at the end of the parts, with no call before it)."""
    model = "gpt-5-many-calls"
    calls = [{"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": "f", "arguments": "{}"}
             for n in range(16)]  # fmt: skip
    items = [*calls, _search("call", "tsc_1", "call_late"), _search("output", "tso_1", "call_late")]
    ANSWERS[model] = responses_body(model, items)
    oai = openai.OpenAI(base_url=capturing.base + "/v1", api_key="test", max_retries=0)
    oai.responses.create(model=model, input="?")
    (answer,) = capturing.output_messages(model)
    assert [part["type"] for part in answer["parts"]] == ["tool_call"] * 16


def test_a_result_of_a_tool_call_made_in_an_earlier_answer_is_shown(capturing: Service) -> None:
    """Claude's code execution runs on across requests (programmatic tool calling): the last answer starts with the
    result of a call made in the answer before, the code that called the application's tool, then its text. The
    result is shown, after the text, though its call is not in this answer."""
    model = "claude-ptc-final"
    result = {
        "type": "code_execution_tool_result",
        "tool_use_id": "srvtoolu_1",
        "content": {"type": "code_execution_result", "stdout": "3", "stderr": "", "return_code": 0, "content": []},
    }
    ANSWERS[model] = {"id": "msg_2", "type": "message", "role": "assistant", "model": model,
                      "content": [result, {"type": "text", "text": "Three regions."}], "stop_reason": "end_turn",
                      "usage": {"input_tokens": 5, "output_tokens": 3}}  # fmt: skip
    earlier = [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "code_execution", "input": {"code": "q()"}},
               {"type": "tool_use", "id": "toolu_1", "name": "query", "input": {},
                "caller": {"type": "code_execution_20250825", "tool_id": "srvtoolu_1"}}]  # fmt: skip
    claude = anthropic.Anthropic(base_url=capturing.base, api_key="test", max_retries=0)
    claude.messages.create(
        model=model,
        max_tokens=64,
        messages=[
            {"role": "user", "content": "Who is over budget?"},
            {"role": "assistant", "content": earlier},  # type: ignore[typeddict-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "[...]"}]},
        ],
    )
    (output,) = capturing.output_messages(model)
    assert output["parts"] == [
        {"type": "text", "content": "Three regions."},
        {"type": "server_tool_call_response", "id": "srvtoolu_1",
         "server_tool_call_response": {"type": "code_execution"}},
    ]  # fmt: skip


def test_an_answer_that_only_calls_a_tool_without_usage_is_estimated_from_the_calls_input(service: Service) -> None:
    """An answer not streamed that reports no usage is estimated from its text at ~4 characters a token; one whose
    output is a tool call, from the call's input (its arguments), as a stream's pieces of a call are counted."""
    arguments = '{"city": "Paris", "unit": "celsius", "days": 3}'
    call = {"id": "call_1", "type": "function", "function": {"name": "get_forecast", "arguments": arguments}}
    chat = {"id": "c1", "object": "chat.completion", "created": 1, "model": "local-chat-tools",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}  # fmt: skip
    ANSWERS["local-chat-tools"] = ChatCompletion.model_validate(chat).model_dump(mode="json", exclude_unset=True)
    item = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_forecast", "arguments": arguments}
    responses = {**responses_body("local-responses-tools", [item]), "usage": None}
    ANSWERS["local-responses-tools"] = Response.model_validate(responses).model_dump(mode="json", exclude_unset=True)
    # The commands a shell call has run are its input; an Anthropic tool_use block's is its input object.
    commands = ["ls -la /srv/data", "grep -c ERROR /var/log/app.log"]
    shell = {"type": "shell_call", "id": "sh_1", "call_id": "call_sh", "status": "completed",
             "action": {"commands": commands}}  # fmt: skip
    responses = {**responses_body("local-responses-shell", [shell]), "usage": None}
    ANSWERS["local-responses-shell"] = Response.model_validate(responses).model_dump(mode="json", exclude_unset=True)
    forecast = {"city": "Paris", "unit": "celsius", "days": 3}
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_forecast", "input": forecast}
    ANSWERS["local-claude-tools"] = {"id": "msg_1", "type": "message", "role": "assistant", "content": [use],
                                     "model": "local-claude-tools", "stop_reason": "tool_use"}  # fmt: skip
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    reply = oai.chat.completions.create(model="local-chat-tools", messages=[{"role": "user", "content": "?"}])
    assert reply.usage is None and reply.choices[0].message.tool_calls is not None
    assert [t.model_dump()["function"]["name"] for t in reply.choices[0].message.tool_calls] == ["get_forecast"]
    answer = oai.responses.create(model="local-responses-tools", input="?")
    assert answer.usage is None and [i.type for i in answer.output] == ["function_call"]
    shell_answer = oai.responses.create(model="local-responses-shell", input="?")
    assert shell_answer.usage is None and [i.type for i in shell_answer.output] == ["shell_call"]
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    message = claude.messages.create(
        model="local-claude-tools", max_tokens=64, messages=[{"role": "user", "content": "?"}]
    )
    assert [block.type for block in message.content] == ["tool_use"]
    written = len(json.dumps(forecast, separators=(",", ":")))
    for model, chars in (
        ("local-chat-tools", len(arguments)),
        ("local-responses-tools", len(arguments)),
        ("local-responses-shell", sum(map(len, commands))),
        ("local-claude-tools", written),
    ):
        estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "output"}
        m = service.metrics(model)
        assert m.value("llm_tokens_total", **estimated) == -(-chars // 4), model


def test_the_code_and_commands_a_model_writes_for_its_tools_are_estimated_in_a_cut_responses_stream(
    service: Service,
) -> None:
    """A stream cut before ``response.completed`` has its output estimated from the pieces it sent: the code the model
    writes for the code interpreter, an MCP tool's arguments and a shell's commands count as a function call's
    arguments do, a piece a token."""
    model = "gpt-5-tools-cut"
    interpreter = {"type": "code_interpreter_call", "id": "ci_1", "status": "in_progress", "code": "",
                   "container_id": "cntr_1", "outputs": []}  # fmt: skip
    mcp = {"type": "mcp_call", "id": "mcp_1", "server_label": "deepwiki", "name": "read_wiki", "arguments": ""}
    shell = {"type": "shell_call", "id": "sh_1", "call_id": "call_sh", "status": "in_progress",
             "action": {"commands": []}}  # fmt: skip
    steps: list[dict[str, Any]] = [
        {"type": "response.created", "response": responses_body(model, [], "in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": interpreter},
        *[
            {"type": "response.code_interpreter_call_code.delta", "output_index": 0, "item_id": "ci_1", "delta": code}
            for code in ("import math", "\nprint(", "math.pi)")
        ],
        {"type": "response.output_item.added", "output_index": 1, "item": mcp},
        *[
            {"type": "response.mcp_call_arguments.delta", "output_index": 1, "item_id": "mcp_1", "delta": piece}
            for piece in ('{"page":', ' "intro"}')
        ],
        {"type": "response.output_item.added", "output_index": 2, "item": shell},
        *[
            {"type": "response.shell_call_command.delta", "output_index": 2, "command_index": 0, "delta": piece}
            for piece in ("ls", " -la")
        ],
    ]
    STREAMS[model] = [responses_event(step, n) for n, step in enumerate(steps)]
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    kinds = [event.type for event in oai.responses.create(model=model, input="?", stream=True)]
    assert "response.completed" not in kinds and len(kinds) == len(steps)
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "output"}
    m = service.metrics(model)
    assert m.value("llm_tokens_total", **estimated) == 3 + 2 + 2


def test_the_tool_outputs_a_request_sends_back_count_in_its_estimated_input(service: Service) -> None:
    """A Responses stream cut before ``response.completed`` reports no usage: its input is estimated from the text the
    request sends at ~4 characters a token, the tool outputs it sends back included (a function's output, a shell's
    stdout and stderr), as a chat request's tool messages are."""
    model = "gpt-5-cut-after-tools"
    question, found, listing, errors = "Which files are stale?", "x" * 400, "a.txt\nb.txt\n", "rm: denied"
    given = TypeAdapter(list[ResponseInputItemParam]).validate_python(
        [
            {"type": "message", "role": "user", "content": question},
            {"type": "function_call", "call_id": "call_fn", "name": "find_stale", "arguments": "{}"},
            {"type": "shell_call", "call_id": "call_sh", "action": {"commands": ["ls"]}, "status": "completed"},
            {"type": "function_call_output", "call_id": "call_fn", "output": found},
            {
                "type": "shell_call_output",
                "call_id": "call_sh",
                "output": [{"stdout": listing, "stderr": errors, "outcome": {"type": "exit", "exit_code": 0}}],
            },
        ]
    )
    text = {"item_id": "msg_1", "output_index": 0, "content_index": 0, "logprobs": []}
    STREAMS[model] = [
        responses_event(step, n)
        for n, step in enumerate(
            [
                {"type": "response.created", "response": responses_body(model, [], "in_progress")},
                {"type": "response.output_text.delta", **text, "delta": "Both"},
            ]
        )
    ]
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    kinds = [event.type for event in oai.responses.create(model=model, input=given, stream=True)]
    assert kinds == ["response.created", "response.output_text.delta"]
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "input"}
    m = service.metrics(model)
    chars = len(question) + len(found) + len(listing) + len(errors)
    assert m.value("llm_tokens_total", **estimated) == -(-chars // 4)


#: A turn of an agent that runs the shell, computer, local shell and apply_patch tools and a tool search for the model,
#: then sends their outputs back (the model's calls, then the application's outputs, as the SDK's input items).
CLIENT_TOOL_TURN: list[dict[str, Any]] = [
    {"type": "message", "role": "user", "content": "Fix the build."},
    {"type": "shell_call", "call_id": "call_sh", "action": {"commands": ["make"]}, "status": "completed"},
    {
        "type": "local_shell_call",
        "id": "lsh_1",
        "call_id": "call_lsh",
        "status": "completed",
        "action": {"type": "exec", "command": ["ls"], "env": {}},
    },
    {
        "type": "computer_call",
        "id": "cu_1",
        "call_id": "call_cu",
        "status": "completed",
        "pending_safety_checks": [],
        "action": {"type": "screenshot"},
    },
    {
        "type": "apply_patch_call",
        "call_id": "call_ap",
        "status": "completed",
        "operation": {"type": "delete_file", "path": "stale.txt"},
    },
    {"type": "tool_search_call", "call_id": "call_ts", "arguments": {"query": "deploy"}, "execution": "client"},
    {
        "type": "shell_call_output",
        "call_id": "call_sh",
        "output": [{"stdout": "", "stderr": "make: *** No rule", "outcome": {"type": "exit", "exit_code": 2}}],
    },
    # (A local shell call's output names its call in ``id``.)
    {"type": "local_shell_call_output", "id": "call_lsh", "output": '{"stdout": "Makefile"}'},
    {
        "type": "computer_call_output",
        "call_id": "call_cu",
        "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,AAAA"},
    },
    {"type": "apply_patch_call_output", "call_id": "call_ap", "status": "failed", "output": "no such file"},
    {"type": "tool_search_output", "call_id": "call_ts", "tools": [], "execution": "client"},
]


def test_the_outputs_of_the_tools_an_application_runs_for_the_model_are_tool_results(service: Service) -> None:
    """Every tool output item the SDK defines is a tool result, named after the call it answers; a shell command that
    exited with a status other than 0 and a patch that failed to apply are failures. A tool search the API ran itself,
    or a shell it ran in its own container, sent back with the conversation, is its own result, as a web search's
    is."""
    items = TypeAdapter(list[ResponseInputItemParam]).validate_python(CLIENT_TOOL_TURN)
    hosted_search = TypeAdapter(list[ResponseInputItemParam]).validate_python(
        [
            {"type": "tool_search_call", "call_id": "call_ts2", "arguments": {}, "execution": "server"},
            {"type": "tool_search_output", "call_id": "call_ts2", "tools": [], "execution": "server"},
            # A shell the API ran in its own container (the tool's ``container_auto``), and its output.
            {
                "type": "shell_call",
                "call_id": "call_sh2",
                "action": {"commands": ["ls"]},
                "status": "completed",
                "environment": {"type": "container_reference", "container_id": "cntr_1"},
            },
            {
                "type": "shell_call_output",
                "call_id": "call_sh2",
                "output": [{"stdout": "a.txt", "stderr": "", "outcome": {"type": "exit", "exit_code": 1}}],
            },
        ]
    )

    def results(m: Metrics) -> dict[tuple[str, str], float]:
        return {
            (tool, status): m.value("llm_tool_results_total", gen_ai_tool_name=tool, llm_tool_status=status)
            for tool in ("shell", "local_shell", "computer", "apply_patch", "tool_search")
            for status in ("success", "error")
        }

    # (The results have no model label: those other tests of this service sent are left out.)
    before = results(scrape(service.port))
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    for model, sent in (("gpt-5-client-tools", items), ("gpt-5-hosted-search", hosted_search)):
        ANSWERS[model] = responses_body(
            model, [output_message({"type": "output_text", "text": "ok", "annotations": []})]
        )
        assert oai.responses.create(model=model, input=sent).output_text == "ok"

    def counted(m: Metrics) -> None:
        added = {key: count - before[key] for key, count in results(m).items()}
        assert {key: count for key, count in added.items() if count} == {
            ("shell", "error"): 1,
            ("local_shell", "success"): 1,
            ("computer", "success"): 1,
            ("apply_patch", "error"): 1,
            ("tool_search", "success"): 1,
        }

    service.metrics("gpt-5-client-tools")
    service.metrics("gpt-5-hosted-search", counted)


def test_a_legacy_function_calls_result_is_a_tool_result(service: Service) -> None:
    """A conversation that used the legacy ``function_call`` (counted as a tool call) sends its result back as a
    message of role ``function`` naming the function: a tool result, read as a tool message's is."""
    model = "gpt-4o-legacy-functions"
    answer = {"role": "assistant", "content": "No clock."}
    body = {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": answer}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33}}  # fmt: skip
    ANSWERS[model] = ChatCompletion.model_validate(body).model_dump(mode="json", exclude_unset=True)
    messages = TypeAdapter(list[ChatCompletionMessageParam]).validate_python(
        [
            {"role": "user", "content": "What time is it?"},
            {"role": "assistant", "content": None, "function_call": {"name": "read_clock", "arguments": "{}"}},
            {"role": "function", "name": "read_clock", "content": '{"error": "clock unavailable"}'},
        ]
    )
    oai = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    functions: Any = [{"name": "read_clock", "parameters": {"type": "object", "properties": {}}}]
    reply = oai.chat.completions.create(model=model, messages=messages, functions=functions)
    assert reply.choices[0].message.content == "No clock."

    def counted(m: Metrics) -> None:
        assert m.value("llm_tool_results_total", gen_ai_tool_name="read_clock", llm_tool_status="error") == 1

    service.metrics(model, counted)


# --- every content block and delta type of the Messages API's streams ---------------------------------------------

#: A web search result's location, as a ``citations_delta`` of the answer's text cites it.
_CITATION = {"type": "web_search_result_location", "url": "https://example.org/", "title": "Example",
             "encrypted_index": "Eo8B", "cited_text": "Paris is the capital."}  # fmt: skip
#: A web search's result, as a ``web_search_tool_result`` block carries it.
_RESULT = {"type": "web_search_result", "url": "https://example.org/", "title": "Example", "encrypted_content": "Eq",
           "page_age": None}  # fmt: skip


def _claude_block(index: int, block: dict[str, Any], deltas: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The beta stream events of a content block at ``index``: its start, its deltas, its stop."""
    return [
        claude_event({"type": "content_block_start", "index": index, "content_block": block}, beta=True),
        *(claude_event({"type": "content_block_delta", "index": index, "delta": d}, beta=True) for d in deltas),
        claude_event({"type": "content_block_stop", "index": index}, beta=True),
    ]


@pytest.mark.parametrize("capture", [False, True])
def test_a_citation_is_no_output_token_of_a_cut_claude_stream(request: pytest.FixtureRequest, capture: bool) -> None:
    """A web search's answer cites its sources: a ``citations_delta`` before the text it cites, carrying no text. A
    stream cut before its ``message_delta`` (an ``overloaded_error`` in the middle) has its output estimated from its
    deltas with output: the text's, as the SDK shows them, whatever the capture setting. (The reading of deltas after
    the first token without a parse counted each citation as a token: five citations read as seven tokens.)"""
    service: Service = request.getfixturevalue("capturing" if capture else "service")
    model = f"claude-sonnet-4-cited-{capture}"
    cited = [*[{"type": "citations_delta", "citation": _CITATION}] * 5, {"type": "text_delta", "text": "Paris"}]
    STREAMS[model] = [
        claude_event(message_start("msg_c", model, {"input_tokens": 30, "output_tokens": 1})),
        *_claude_block(0, {"type": "text", "text": ""}, [{"type": "text_delta", "text": "I'll search."}]),
        *_claude_block(
            1,
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            [{"type": "input_json_delta", "partial_json": '{"query": "capital of France"}'}],
        ),
        *_claude_block(2, {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [_RESULT]}, []),
        *_claude_block(3, {"type": "text", "text": "", "citations": []}, cited)[:-1],  # (cut before its stop)
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ]
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    shown = []
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        claude.beta.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": "?"}]) as stream,
    ):
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type in ("text_delta", "input_json_delta"):
                shown.append(event.delta)
    assert len(shown) == 3  # two texts and the search's input; the citations carry none
    m = service.metrics(model)
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated"}
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **estimated) == len(shown)
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="web_search") == 1
    assert m.value("llm_errors_total", gen_ai_request_model=model, error_type="server_error") == 1


#: How a server or a proxy may write an event's JSON: as the API does (compact, ``type`` first, UTF-8), as Python's
#: ``json.dumps`` does by default (spaced, non-ASCII escaped), as the SDK's models write it (``type`` last), with
#: quotes in strings escaped by their code.
_WRITERS = {
    "compact": lambda data: json.dumps(_type_first(data), separators=(",", ":"), ensure_ascii=False),
    "spaced": lambda data: json.dumps(_type_first(data)),
    "type-last": lambda data: json.dumps(_type_last(data), separators=(",", ":"), ensure_ascii=False),
    "quote-escaped": lambda data: _quotes_by_code(json.dumps(_type_first(data), separators=(",", ":"))),
}


def _quotes_by_code(written: str) -> str:
    """JSON text with each quote inside a string escaped by its code, ``\\u0022`` (as PHP's ``json_encode`` writes
    it with ``JSON_HEX_QUOT``)."""
    return re.sub(r"\\(.)", lambda m: "\\u0022" if m[1] == '"' else m[0], written)


def _type_last(value: Any) -> Any:
    """``value`` with each object's ``type`` last, as the SDKs' models write their fields."""
    if isinstance(value, dict):
        return {k: _type_last(v) for k, v in sorted(value.items(), key=lambda item: item[0] == "type")}
    if isinstance(value, list):
        return [_type_last(v) for v in value]
    return value


@pytest.mark.parametrize("writer", sorted(_WRITERS))
def test_a_delta_of_a_type_it_does_not_know_is_no_output_token_of_a_cut_claude_stream(
    service: Service, writer: str
) -> None:
    """After the first token, a delta of a type the reader does not know (the API adds some now and then: citations,
    signatures and compaction summaries came after text and tool input) carries no output the SDK shows, and is no
    token of a cut stream's estimate; texts that name delta types, end in an escaped quote or hold one escaped as
    ``\\u0022`` are a token each, however the events are written. (Counted from its bytes, without a parse, each such
    delta read as a token.)"""
    model = f"claude-sonnet-4-future-delta-{writer}"
    texts = ["Paris", ' "citations_delta"', "citations_delta", 'he said "', "signature_delta", "é", " \u2028"]
    future = [{"type": "tone_delta", "tone": "warm"}, {"type": "reference_delta", "reference": {"id": "ref_1"}}]
    deltas = [
        {"type": "text_delta", "text": texts[0]},
        *future,
        *({"type": "text_delta", "text": t} for t in texts[1:]),
    ]
    deltas += [*future, {"type": "text_delta", "text": ""}]
    events: list[tuple[str | None, Any]] = [
        claude_event(message_start("msg_f", model, {"input_tokens": 30, "output_tokens": 1})),
        claude_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ]
    STREAMS[model] = [(name, _WRITERS[writer](data)) for name, data in events]
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    shown = []
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        claude.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": "?"}]) as stream,
    ):
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta" and event.delta.text:
                shown.append(event.delta.text)
    assert shown == texts
    m = service.metrics(model)
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated"}
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **estimated) == len(texts)


def test_an_event_is_read_by_its_data_as_the_sdk_reads_it_after_the_first_token(service: Service) -> None:
    """The SDK takes an event's kind from its data's ``type``: the SSE event name only has to be there. A
    ``message_delta`` sent under the name ``content_block_delta`` is still the stream's usage and stop reason to the
    SDK, and to the middleware too. (Counted from its name and bytes, it read as one more text token: the usage and
    stop reason were lost.)"""
    model = "claude-sonnet-4-misnamed-delta"
    stop = claude_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}})
    STREAMS[model] = [
        claude_event(message_start("msg_n", model, {"input_tokens": 3, "output_tokens": 1})),
        *_claude_block(0, _TEXT, [{"type": "text_delta", "text": t} for t in ("Paris", " is", " lovely")]),
        ("content_block_delta", stop[1]),
        claude_event({"type": "message_stop"}),
    ]
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    with claude.messages.stream(model=model, max_tokens=99, messages=[{"role": "user", "content": "?"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 40 and final.stop_reason == "end_turn"
    m = service.metrics(model)
    reported = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **reported) == 40


def _first_token_event(service: Service, model: str) -> int:
    """The index of the event of ``model``'s stream that the middleware took for its first token: the middleware reads
    the clock for a chunk before handing it on, and the app hands on the next event only after that."""
    service.metrics(model)
    call = service.call(model)
    assert call is not None and call.first_token_at is not None
    return bisect.bisect(SENT[model], call.first_token_at) - 1


def _claude_thinking(deltas: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return _claude_block(0, {"type": "thinking", "thinking": "", "signature": ""}, deltas)


_SIGNATURE = {"type": "signature_delta", "signature": "EqQBCkgIARABGAIiQ"}
_TEXT = {"type": "text", "text": ""}
#: Anthropic streams by what comes before the answer's text (block 1, "Paris"): the events before it (after
#: ``message_start``), and the index among them of the one docs/metrics.md names the first token (None: the answer's
#: text).
_CLAUDE_FIRSTS: dict[str, tuple[list[tuple[str, dict[str, Any]]], int | None]] = {
    "thinking shown": (_claude_thinking([{"type": "thinking_delta", "thinking": "Hm."}, _SIGNATURE]), 1),
    "thinking omitted": (_claude_thinking([_SIGNATURE]), None),
    "compaction": (
        _claude_block(0, {"type": "compaction"}, [{"type": "compaction_delta", "content": "Earlier."}]),
        None,
    ),
    "redacted thinking": (_claude_block(0, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}, []), 0),
    "tool": (
        _claude_block(
            0,
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            [{"type": "input_json_delta", "partial_json": '{"a": 1}'}],
        ),
        0,
    ),
    "search": (
        _claude_block(
            0,
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            [{"type": "input_json_delta", "partial_json": '{"query": "q"}'}],
        ),
        0,
    ),
    "search result": (
        _claude_block(0, {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [_RESULT]}, []),
        None,
    ),
    "citation, empty text": (
        _claude_block(
            0,
            {**_TEXT, "citations": []},
            [{"type": "citations_delta", "citation": _CITATION}, {"type": "text_delta", "text": ""}],
        ),
        None,
    ),
}


@pytest.mark.parametrize("before", sorted(_CLAUDE_FIRSTS))
def test_the_first_token_of_a_claude_stream_is_the_event_the_docs_name(service: Service, before: str) -> None:
    """docs/metrics.md names the events that are a first token (a piece of thinking or text, the start of a tool's
    block, a redacted thinking block) and those that are not (a signature, a citation, a compaction's summary, a
    tool's result, an empty delta): read through uvicorn, with the SDK as the client, the first token is the one
    named, whatever came before it."""
    model = f"claude-sonnet-4-first-{before.replace(' ', '-').replace(',', '')}"
    events, first = _CLAUDE_FIRSTS[before]
    answer_text = _claude_block(1, _TEXT, [{"type": "text_delta", "text": "Paris"}])
    STREAMS[model] = [
        claude_event(message_start("msg_f", model, {"input_tokens": 3, "output_tokens": 1})),
        *events,
        *answer_text,
        claude_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
        claude_event({"type": "message_stop"}),
    ]
    if first is None:
        first = len(events) + 1  # (the answer's text_delta, after its block's start)
    claude = anthropic.Anthropic(base_url=service.base, api_key="test", max_retries=0)
    with claude.beta.messages.stream(model=model, max_tokens=9, messages=[{"role": "user", "content": "?"}]) as stream:
        assert stream.get_final_text() == "Paris"
    assert _first_token_event(service, model) == 1 + first  # (after message_start)


_REASONING = {"type": "reasoning", "id": "rs_1", "summary": []}
_MESSAGE = {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress", "content": []}
#: Responses streams: the steps after ``response.created``, and the index of the one docs/metrics.md names the first
#: token.
_RESPONSES_FIRSTS: dict[str, tuple[list[dict[str, Any]], int]] = {
    "reasoning not shown": (
        [
            {"type": "response.output_item.added", "output_index": 0, "item": _REASONING},
            {"type": "response.output_item.done", "output_index": 0, "item": {**_REASONING, "status": "completed"}},
            {"type": "response.output_item.added", "output_index": 1, "item": _MESSAGE},
            {
                "type": "response.output_text.delta",
                "output_index": 1,
                "item_id": "msg_1",
                "content_index": 0,
                "delta": "",
                "logprobs": [],
            },
            {
                "type": "response.output_text.delta",
                "output_index": 1,
                "item_id": "msg_1",
                "content_index": 0,
                "delta": "Paris",
                "logprobs": [],
            },
        ],
        4,
    ),
    "reasoning summary": (
        [
            {"type": "response.output_item.added", "output_index": 0, "item": _REASONING},
            {
                "type": "response.reasoning_summary_text.delta",
                "output_index": 0,
                "item_id": "rs_1",
                "summary_index": 0,
                "delta": "Hm.",
            },
        ],
        1,
    ),
    "function call": (
        [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": ""},
            },
            {"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc_1", "delta": "{}"},
        ],
        0,
    ),
    "web search": (
        [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {
                    "type": "web_search_call",
                    "id": "ws_1",
                    "status": "in_progress",
                    "action": {"type": "search", "query": "q"},
                },
            },
            {"type": "response.web_search_call.searching", "output_index": 0, "item_id": "ws_1"},
        ],
        0,
    ),
    "mcp approval": (
        [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {
                    "type": "mcp_approval_request",
                    "id": "mcpr_1",
                    "name": "f",
                    "arguments": "{}",
                    "server_label": "s",
                },
            },
        ],
        0,
    ),
}


@pytest.mark.parametrize("before", sorted(_RESPONSES_FIRSTS))
def test_the_first_token_of_a_responses_stream_is_the_event_the_docs_name(service: Service, before: str) -> None:
    """As for Anthropic's streams: a text or reasoning summary delta with text, the ``output_item.added`` of a tool
    call's item or of an approval request is the first token; a reasoning item whose reasoning is not shown, and an
    empty delta, are not."""
    model = f"gpt-5-first-{before.replace(' ', '-')}"
    steps, first = _RESPONSES_FIRSTS[before]
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "status": "in_progress",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}  # fmt: skip
    usage = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12}  # fmt: skip
    done = {"type": "response.completed", "response": {**response, "status": "completed", "usage": usage}}
    STREAMS[model] = [responses_event(step, n) for n, step in enumerate([
        {"type": "response.created", "response": response}, *steps, done])]  # fmt: skip
    client = openai.OpenAI(base_url=f"{service.base}/v1", api_key="test", max_retries=0)
    kinds = [event.type for event in client.responses.create(model=model, input="?", stream=True)]
    assert kinds[-1] == "response.completed"
    assert _first_token_event(service, model) == 1 + first  # (after response.created)


# --- any chunking of streams with every event type the SDKs define ----------------------------------------------

_pieces = st.text(alphabet=st.characters(codec="utf-8"), max_size=6) | st.sampled_from(
    ['"text_delta"', "citations_delta", 'say "hi"', "back\\slash", "line\nbreak", "你好"]
)
#: The Messages API's stop reasons, as its SDK types them.
_STOP_REASONS = ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                 "model_context_window_exceeded", "compaction"]  # fmt: skip


@st.composite
def _claude_content(draw: st.DrawFn, index: int) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """A content block of any type an SDK's stream can carry, and how many deltas with output it has (a redacted
    thinking block, which comes whole, counted as one)."""
    kinds = ["text", "cited", "future", "thinking", "omitted", "redacted", "tool", "search", "compaction"]
    kind = draw(st.sampled_from(kinds))
    texts = draw(st.lists(_pieces, min_size=1, max_size=5))
    if kind == "future":
        # Deltas of a type the SDK does not define yet (the API adds some now and then), without output, among texts:
        # not validated, as the SDK does not validate them either.
        future = [{"type": "tone_delta", "tone": "warm"}, {"type": "mark_delta", "mark": {"type": "text", "at": 1}}]
        deltas = [{"type": "text_delta", "text": t} for t in texts]
        for _ in range(draw(st.integers(1, 3))):
            deltas.insert(draw(st.integers(0, len(deltas))), draw(st.sampled_from(future)))
        start = claude_event(
            {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
        )
        events = [start, *(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                           for d in deltas)]  # fmt: skip
        events.append(claude_event({"type": "content_block_stop", "index": index}, beta=True))
        return events, sum(1 for t in texts if t)
    if kind in ("text", "cited"):
        deltas = [{"type": "text_delta", "text": t} for t in texts]
        if kind == "cited":
            at = draw(st.integers(0, len(deltas)))
            # (Its cited text may be any text, the name of a delta type too.)
            citation = {**_CITATION, "cited_text": draw(st.sampled_from(["Paris.", "text_delta", 'a "text_delta"']))}
            deltas[at:at] = [{"type": "citations_delta", "citation": citation}] * draw(st.integers(1, 3))
        block: dict[str, Any] = {"type": "text", "text": "", **({"citations": []} if kind == "cited" else {})}
        return _claude_block(index, block, deltas), sum(1 for t in texts if t)
    if kind in ("thinking", "omitted"):
        shown = texts if kind == "thinking" else []
        deltas = [{"type": "thinking_delta", "thinking": t} for t in shown]
        deltas.append({"type": "signature_delta", "signature": "EqQBCkgIARABGAIiQ"})
        block = {"type": "thinking", "thinking": "", "signature": ""}
        return _claude_block(index, block, deltas), sum(1 for t in shown if t)
    if kind == "redacted":
        return _claude_block(index, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}, []), 1
    if kind == "compaction":
        summary = {"type": "compaction_delta", "content": "".join(texts)}
        return _claude_block(index, {"type": "compaction"}, [summary]), 0
    tool = "web_search" if kind == "search" else "get_weather"
    use = {"type": "server_tool_use" if kind == "search" else "tool_use", "id": f"toolu_{index}", "name": tool}
    deltas = [{"type": "input_json_delta", "partial_json": t} for t in ["", *texts]]
    events = _claude_block(index, {**use, "input": {}}, deltas)
    if kind == "search":
        result = {"type": "web_search_tool_result", "tool_use_id": f"toolu_{index}", "content": []}
        events += _claude_block(index + 1, result, [])
    return events, sum(1 for t in texts if t)


@st.composite
def claude_streams(draw: st.DrawFn) -> tuple[list[bytes], int | None, int]:
    """A Messages API stream of any content blocks, complete, failed or cut, as chunks (an event each, as the API
    sends them, or cut anywhere); its output as its usage says, or None when it says none; and its deltas with
    output."""
    events = [claude_event(message_start("msg_1", "claude-sonnet-4", {"input_tokens": 12, "output_tokens": 1}))]
    with_output = 0
    for _ in range(draw(st.integers(1, 5))):
        block, count = draw(_claude_content(len(events)))
        events += block
        with_output += count
    ending = draw(st.sampled_from(["complete", "failed", "cut"]))
    output = None
    if ending == "complete":
        output = draw(st.integers(1, 5000))
        usage = {"output_tokens": output, "output_tokens_details": {"thinking_tokens": draw(st.integers(0, output))}}
        stop = {"stop_reason": draw(st.sampled_from(_STOP_REASONS)), "stop_sequence": None}
        events += [claude_event({"type": "message_delta", "delta": stop, "usage": usage}, beta=True)]
        events += [claude_event({"type": "message_stop"}, beta=True)]
    elif ending == "failed":
        events += [("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]
    return _chunked(draw, events), output, with_output


def _chunked(draw: st.DrawFn, events: list[tuple[str | None, Any]]) -> list[bytes]:
    """The events encoded as a server or a proxy sends them (compact JSON or spaced; each object's ``type`` first, as
    the APIs write it, or last, as the SDKs' models do; non-ASCII as UTF-8 or escaped; a quote in a string as ``\\"``
    or ``\\u0022``; LF or CRLF), an event to a chunk or cut anywhere."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    separators = None if draw(st.booleans()) else (",", ":")
    order = draw(st.sampled_from([_type_first, _type_last]))
    ascii_only = draw(st.booleans())
    write = _quotes_by_code if draw(st.booleans()) else str
    encoded = [
        (f"event: {name}{newline}" if name else "").encode()
        + f"data: {write(json.dumps(order(data), separators=separators, ensure_ascii=ascii_only))}".encode()
        + f"{newline}{newline}".encode()
        for name, data in events
    ]
    if draw(st.booleans()):
        return encoded
    body = b"".join(encoded)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(body) - 1), max_size=30))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def _type_first(value: Any) -> Any:
    """``value`` with each object's ``type`` first, as the APIs write their events (the SDKs' models put it last)."""
    if isinstance(value, dict):
        return {k: _type_first(v) for k, v in sorted(value.items(), key=lambda item: item[0] != "type")}
    if isinstance(value, list):
        return [_type_first(v) for v in value]
    return value


def _read(api: str, chunks: list[bytes], groups: list[int] | None) -> LLMCall:
    """The call a stream reader records: fed as the middleware feeds it (``groups``: the sizes of the groups of
    chunks it keeps and reads in bulk while holding), or, for the reference, with content capture on, which turns
    every shortcut off so that every event is parsed in full."""
    spec = APIS[api]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=groups is None)
    if groups is None:
        for i, chunk in enumerate(chunks):
            reader.feed(chunk, now=1.0 + i)
        reader.finish(now=1000.0)
    else:
        read_as_middleware(reader, chunks, groups)
    return call


def _numbers(call: LLMCall) -> tuple[Any, ...]:
    return (call.input_tokens, call.output_tokens, call.usage_source, call.reasoning_tokens, call.finish_reasons,
            call.tool_calls, call.server_tool_results, call.error_type, call.first_token_at is None,
            call.reasoning_shown, call.first_output_whole)  # fmt: skip


def _no_output_after_the_first_token() -> tuple[list[bytes], None, int]:
    """A cut stream whose first token is followed by deltas without output, each an event of its own: a citation, a
    compaction's summary, an empty thinking delta, and an empty text written spaced (as ``json.dumps`` writes it)."""
    events = [claude_event(message_start("msg_1", "claude-sonnet-4", {"input_tokens": 12, "output_tokens": 1}))]
    events += _claude_block(0, {"type": "text", "text": ""}, [{"type": "text_delta", "text": "Paris"}])
    events += _claude_block(1, {"type": "text", "text": "", "citations": []},
                            [{"type": "citations_delta", "citation": _CITATION}])  # fmt: skip
    events += _claude_block(2, {"type": "compaction"}, [{"type": "compaction_delta", "content": "Earlier: a query."}])
    events += _claude_block(3, {"type": "thinking", "thinking": "", "signature": ""},
                            [{"type": "thinking_delta", "thinking": ""}])  # fmt: skip
    compact = [f"event: {name}\ndata: {json.dumps(_type_first(data), separators=(',', ':'))}\n\n".encode()
               for name, data in events]  # fmt: skip
    spaced = {"type": "content_block_delta", "index": 4, "delta": {"type": "text_delta", "text": ""}}
    return [*compact, f"event: content_block_delta\ndata: {json.dumps(spaced)}\n\n".encode()], None, 1


@settings(max_examples=300, deadline=None)
@given(claude_streams(), st.lists(st.integers(1, 40), min_size=1, max_size=5))
@example(_no_output_after_the_first_token(), [1])
def test_any_chunking_of_a_claude_stream_of_any_blocks_reads_as_its_full_parse(
    stream: tuple[list[bytes], int | None, int], groups: list[int]
) -> None:
    """Thinking and its signature, redacted thinking, citations, tool and server tool inputs, compaction: however
    the stream is chunked, the reader's shortcuts record what parsing each event in full records, and that is the
    usage's output when the stream reports it, else one token for each delta with output."""
    chunks, output, with_output = stream
    call = _read("anthropic.messages", chunks, groups)
    assert _numbers(call) == _numbers(_read("anthropic.messages", chunks, None))
    assert call.output_tokens == (output if output is not None else with_output or None)


@st.composite
def _responses_item(draw: st.DrawFn, at: int, first: int) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """The events of an output item of any kind a Responses stream carries (numbered from ``first``), and how many
    of its deltas have output."""
    kind = draw(st.sampled_from(["text", "refusal", "summary", "reasoning", "function", "code", "search", "image"]))
    texts = draw(st.lists(_pieces, min_size=1, max_size=5))
    here = {"output_index": at, "item_id": f"it_{at}"}
    steps: list[dict[str, Any]] = []
    if kind in ("text", "refusal"):
        item = {"type": "message", "id": f"it_{at}", "role": "assistant", "status": "in_progress", "content": []}
        steps.append({"type": "response.output_item.added", "output_index": at, "item": item})
        event = {"type": f"response.{'output_text' if kind == 'text' else 'refusal'}.delta"}
        if kind == "text":
            event["logprobs"] = []
        steps += [{**event, **here, "content_index": 0, "delta": t} for t in texts]
        if kind == "text" and draw(st.booleans()):
            cite = {"type": "url_citation", "url": "https://example.org/", "title": "text_delta", "start_index": 0,
                    "end_index": 1}  # fmt: skip
            steps.append({"type": "response.output_text.annotation.added", **here, "content_index": 0,
                          "annotation_index": 0, "annotation": cite})  # fmt: skip
    elif kind in ("summary", "reasoning"):
        steps.append({"type": "response.output_item.added", "output_index": at,
                      "item": {"type": "reasoning", "id": f"it_{at}", "summary": []}})  # fmt: skip
        if kind == "summary":
            steps += [{"type": "response.reasoning_summary_text.delta", **here, "summary_index": 0, "delta": t}
                      for t in texts]  # fmt: skip
        else:
            steps += [{"type": "response.reasoning_text.delta", **here, "content_index": 0, "delta": t} for t in texts]
    elif kind in ("function", "code"):
        if kind == "function":
            item = {"type": "function_call", "id": f"it_{at}", "call_id": f"call_{at}", "name": "f", "arguments": ""}
            event = "response.function_call_arguments.delta"
        else:
            item = {"type": "code_interpreter_call", "id": f"it_{at}", "container_id": "cntr_1", "code": "",
                    "status": "in_progress", "outputs": None}  # fmt: skip
            event = "response.code_interpreter_call_code.delta"
        steps.append({"type": "response.output_item.added", "output_index": at, "item": item})
        steps += [{"type": event, **here, "delta": t} for t in texts]
    elif kind == "search":
        item = {"type": "web_search_call", "id": f"it_{at}", "status": "in_progress",
                "action": {"type": "search", "query": "q"}}  # fmt: skip
        steps.append({"type": "response.output_item.added", "output_index": at, "item": item})
        steps += [{"type": f"response.web_search_call.{s}", **here} for s in ("in_progress", "searching", "completed")]
        texts = []
    else:
        item = {"type": "image_generation_call", "id": f"it_{at}", "status": "in_progress", "result": None}
        steps.append({"type": "response.output_item.added", "output_index": at, "item": item})
        steps.append({"type": "response.image_generation_call.partial_image", **here, "partial_image_b64": "aGk=",
                      "partial_image_index": 0})  # fmt: skip
        texts = []
    return [responses_event(step, first + n) for n, step in enumerate(steps)], sum(1 for t in texts if t)


@st.composite
def responses_streams(draw: st.DrawFn) -> tuple[list[bytes], int | None, int]:
    """A Responses stream of any output items, completed, incomplete, failed or cut, as chunks; its output as its
    usage says (None when it says none) and its deltas with output."""
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-5", "status": "in_progress",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}  # fmt: skip
    events = [responses_event({"type": "response.created", "response": response}, 0)]
    with_output = 0
    for at in range(draw(st.integers(1, 5))):
        item, count = draw(_responses_item(at, len(events)))
        events += item
        with_output += count
    ending = draw(st.sampled_from(["completed", "incomplete", "failed", "cut"]))
    output = None
    if ending in ("completed", "incomplete"):
        output = draw(st.integers(1, 5000))
        usage = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                 "output_tokens": output, "output_tokens_details": {"reasoning_tokens": draw(st.integers(0, output))},
                 "total_tokens": 9 + output}  # fmt: skip
        reason = {"incomplete_details": {"reason": "max_output_tokens"}} if ending == "incomplete" else {}
        ended = {**response, "status": ending, "usage": usage, **reason}
        events.append(responses_event({"type": f"response.{ending}", "response": ended}, len(events)))
    elif ending == "failed":
        failed = {**response, "status": "failed", "error": {"code": "server_error", "message": "failed"}}
        events.append(responses_event({"type": "response.failed", "response": failed}, len(events)))
    return _chunked(draw, events), output, with_output


@settings(max_examples=300, deadline=None)
@given(responses_streams(), st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_any_chunking_of_a_responses_stream_of_any_items_reads_as_its_full_parse(
    stream: tuple[list[bytes], int | None, int], groups: list[int]
) -> None:
    """Reasoning summaries and text, refusals, a function's arguments, code, web searches, partial images, citations,
    an incomplete or failed end: however the stream is chunked, what the reader records is what parsing each event
    in full records, and its output is the usage's, else one token for each delta with output."""
    chunks, output, with_output = stream
    call = _read("openai.responses", chunks, groups)
    assert _numbers(call) == _numbers(_read("openai.responses", chunks, None))
    assert call.output_tokens == (output if output is not None else with_output or None)
