"""Answers the demo never gives, as the providers send them, read by the official SDKs through the middleware under
real uvicorn: refusals, legacy ``function_call`` deltas, custom tools, open models' reasoning text in the Responses
API, Anthropic usage with null counts, and an invalid-parameter error whose parameter's name sounds like a refusal.
The metrics are read from real scrapes and held to what the SDK received.

The app serves canned bodies by model name; ``PAUSE`` before the first generated event and ``LATE`` before the next
part make time to first token measurable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import RECORDED_WITHIN, Metrics, free_port, scrape, serve, whole_after

PAUSE = 0.05
LATE = 1.5  # wide enough that a busy machine stalling the first event still tells the two apart
Step = dict[str, Any] | str | float  # an event (a name goes first when the API names its events), or a pause


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [choice]}


ROLE = chunk({"role": "assistant", "content": None, "refusal": None})
REFUSAL = ["I'm", " sorry,", " I", " can't", " help"]
STREAMS: dict[str, list[Step]] = {
    "chat-refusal": [
        ROLE,
        PAUSE,
        *[chunk({"refusal": piece}) for piece in REFUSAL],
        chunk({}, "stop"),
    ],
    "chat-function-call": [
        ROLE,
        PAUSE,
        chunk({"function_call": {"name": "get_weather", "arguments": ""}}),
        chunk({"function_call": {"arguments": '{"city"'}}),
        chunk({"function_call": {"arguments": ':"Paris"}'}}),
        chunk({}, "function_call"),
    ],
    "chat-custom-tool": [
        ROLE,
        PAUSE,
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "custom", "custom": {"name": "code_exec"}}]}),
        chunk({"tool_calls": [{"index": 0, "custom": {"input": "print(1)"}}]}),
        chunk({}, "tool_calls"),
    ],
}


def responses_events(model: str, middle: list[Step]) -> list[Step]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "output": []}
    usage = {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 39,
    }
    created = {"type": "response.created", "sequence_number": 0, "response": {**response, "status": "in_progress"}}
    done = {**response, "status": "completed", "usage": usage}
    return [
        "response.created",
        created,
        *middle,
        "response.completed",
        {"type": "response.completed", "sequence_number": 99, "response": done},
    ]


def text_delta(kind: str, text: str, number: int) -> list[Step]:
    body = {"type": kind, "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": text}
    return [kind, {**body, "sequence_number": number}]


STREAMS["responses-reasoning-text"] = responses_events(
    "gpt-oss-120b",
    [
        PAUSE,
        *[
            step
            for i, word in enumerate(["Let", " me", " think"])
            for step in text_delta("response.reasoning_text.delta", word, i + 1)
        ],
        LATE,
        *text_delta("response.output_text.delta", "Paris.", 10),
    ],
)
CUSTOM_ITEM = {"type": "custom_tool_call", "id": "ctc_1", "call_id": "call_1", "name": "code_exec", "input": ""}
STREAMS["responses-custom-tool"] = responses_events(
    "gpt-5",
    [
        PAUSE,
        "response.output_item.added",
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": CUSTOM_ITEM},
        "response.custom_tool_call_input.delta",
        {
            "type": "response.custom_tool_call_input.delta",
            "sequence_number": 2,
            "output_index": 0,
            "item_id": "ctc_1",
            "delta": "print(1)",
        },
        "response.output_item.done",
        {
            "type": "response.output_item.done",
            "sequence_number": 3,
            "output_index": 0,
            "item": {**CUSTOM_ITEM, "input": "print(1)", "status": "completed"},
        },
    ],
)
ANTHROPIC_START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "cache_read_input_tokens": 2000,
            "cache_creation_input_tokens": 0,
            "output_tokens": 1,
        },
    },
}
STREAMS["claude-null-cache"] = [
    "message_start",
    ANTHROPIC_START,
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    PAUSE,
    *[
        step
        for word in ["Paris", " is", " lovely."]
        for step in [
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
        ]
    ],
    "content_block_stop",
    {"type": "content_block_stop", "index": 0},
    # The closing counts: the output, the fresh input again, and the cache counts as nulls (the SDK keeps the earlier
    # values of those).
    "message_delta",
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "output_tokens": 5,
            "input_tokens": 12,
            "cache_read_input_tokens": None,
            "cache_creation_input_tokens": None,
        },
    },
    "message_stop",
    {"type": "message_stop"},
]

CUSTOM_MESSAGE = {"role": "assistant", "content": None, "refusal": None}
ANSWERS: dict[str, Any] = {
    "chat-custom-tool-json": {
        **CUSTOM_MESSAGE,
        "tool_calls": [{"id": "call_1", "type": "custom", "custom": {"name": "code_exec", "input": "print(1)"}}],
    },
    "chat-function-call-json": {**CUSTOM_MESSAGE, "function_call": {"name": "get_time", "arguments": "{}"}},
}
INVALID_PARAMETER = {
    "error": {
        "message": "Invalid type for 'safety_identifier': expected a string, but got an integer instead.",
        "type": "invalid_request_error",
        "param": "safety_identifier",
        "code": "invalid_type",
    }
}


async def _sse(steps: list[Step], chat: bool) -> AsyncIterator[bytes]:
    name: str | None = None
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
        elif isinstance(step, str):
            name = step
        else:
            yield (f"event: {name}\n" if name else "").encode() + b"data: " + json.dumps(step).encode() + b"\n\n"
            name = None
    if chat:
        yield b"data: [DONE]\n\n"


async def answer(request: Request) -> Response:
    body = await request.json()
    model = body["model"]
    if model == "invalid-parameter":
        return JSONResponse(INVALID_PARAMETER, status_code=400)
    if body.get("stream"):
        sse = _sse(STREAMS[model], chat=request.url.path.endswith("/chat/completions"))
        return StreamingResponse(sse, media_type="text/event-stream")
    message = ANSWERS[model]
    finish = "tool_calls" if "tool_calls" in message else "function_call"
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    usage = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
    return JSONResponse(
        {
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    )


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, int]]:
    port = free_port()
    routes = [
        Route(path, answer, methods=["POST"]) for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages")
    ]
    app = LLMTelemetryMiddleware(Starlette(routes=routes), metrics_port=port, metrics_host="127.0.0.1")
    with serve(app) as base:
        yield base, port
    if app._telemetry is not None:
        app._telemetry.shutdown()


@pytest.fixture
def oai(service: tuple[str, int]) -> openai.OpenAI:
    return openai.OpenAI(base_url=service[0] + "/v1", api_key="test", max_retries=0)


def settled(service: tuple[str, int], model: str, check: Callable[[Metrics], bool] = lambda m: True) -> Metrics:
    """The scrape once the request of ``model`` has been recorded (just after its last byte was sent)."""
    deadline = time.monotonic() + RECORDED_WITHIN
    while True:
        metrics = scrape(service[1])
        if metrics.value("llm_requests_total", gen_ai_request_model=model) >= 1 and check(metrics):
            return whole_after(service[1])
        if time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def test_a_refusal_stream_has_a_first_token_and_an_estimate(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "chat-refusal"
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}], stream=True))
    refused = [c.choices[0].delta.refusal for c in chunks if c.choices and c.choices[0].delta.refusal]
    assert refused == REFUSAL
    m = settled(service, model)
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "output"}
    assert m.value("llm_tokens_total", **estimated) == len(refused)


@pytest.mark.parametrize(("model", "tool"), [("chat-function-call", "get_weather"), ("chat-custom-tool", "code_exec")])
def test_legacy_function_calls_and_custom_tools_are_tool_calls_in_a_chat_stream(
    service: tuple[str, int], oai: openai.OpenAI, model: str, tool: str
) -> None:
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    named = [d.function_call.name for d in deltas if d.function_call and d.function_call.name]
    # (The SDK's stream types know only function tool calls: a custom one's member comes as the JSON it was.)
    named += [
        (t.model_extra or {})["custom"].get("name") for d in deltas for t in d.tool_calls or [] if t.type == "custom"
    ]
    named = [name for name in named if name]
    assert named == [tool]
    m = settled(service, model)
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name=tool) == 1
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated", "gen_ai_token_type": "output"}
    assert m.value("llm_tokens_total", **estimated) == len(deltas) - 2  # each piece of the call; not role nor finish


@pytest.mark.parametrize(
    ("model", "tool"), [("chat-custom-tool-json", "code_exec"), ("chat-function-call-json", "get_time")]
)
def test_custom_tools_and_legacy_function_calls_are_tool_calls_in_a_chat_answer(
    service: tuple[str, int], oai: openai.OpenAI, model: str, tool: str
) -> None:
    reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}])
    message = reply.choices[0].message
    names = [t.custom.name if t.type == "custom" else t.function.name for t in message.tool_calls or []]
    assert names + ([message.function_call.name] if message.function_call else []) == [tool]
    m = settled(service, model)
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name=tool) == 1


def test_reasoning_text_is_the_first_token_of_a_responses_stream(service: tuple[str, int], oai: openai.OpenAI) -> None:
    """Open models served through the Responses API stream their reasoning as text: the first token is the first
    reasoning delta (sent after PAUSE), not the answer's first delta (LATE seconds after it)."""
    model = "responses-reasoning-text"
    kinds = [event.type for event in oai.responses.create(model=model, input="?", stream=True)]
    assert kinds.count("response.reasoning_text.delta") == 3 and kinds.count("response.output_text.delta") == 1
    m = settled(service, model)
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    ttft = m.value("gen_ai_server_time_to_first_token_seconds_sum", gen_ai_request_model=model)
    assert PAUSE * 0.9 <= ttft < PAUSE + LATE / 2


def test_a_custom_tool_call_in_a_responses_stream_is_a_tool_call(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "responses-custom-tool"
    events = list(oai.responses.create(model=model, input="?", stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(item.type, getattr(item, "name", None)) for item in added] == [("custom_tool_call", "code_exec")]
    m = settled(service, model)
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="code_exec") == 1
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1


def test_null_counts_in_anthropics_closing_usage_erase_none_of_the_opening_ones(service: tuple[str, int]) -> None:
    model = "claude-null-cache"
    claude = anthropic.Anthropic(base_url=service[0], api_key="test", max_retries=0)
    with claude.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "?"}]) as stream:
        final = stream.get_final_message()
    usage = final.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (12, 2000, 5)
    m = settled(service, model)
    reported = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **reported) == 12 + 2000
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **reported) == 5
    assert m.value("llm_token_details_total", gen_ai_request_model=model, llm_token_detail="cache_read") == 2000


def test_an_invalid_parameter_named_like_a_refusal_is_an_invalid_request(
    service: tuple[str, int], oai: openai.OpenAI
) -> None:
    model = "invalid-parameter"
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}], safety_identifier=7)  # type: ignore[arg-type]
    assert raised.value.code == "invalid_type"
    # A model never answered, refused with a 400: its name takes no label place (see test_hostile_inputs).
    m = settled(service, "other")
    assert m.value("llm_errors_total", gen_ai_request_model="other", error_type="invalid_request") == 1
    assert m.value("llm_errors_total", gen_ai_request_model="other", error_type="content_filter") == 0
