"""Stream events that carry no output add nothing to an output estimate, whatever the chunking.

A scripted upstream in the middleware runs under real uvicorn on 127.0.0.1; the official ``openai`` and
``anthropic`` SDKs read its streams; the numbers are read from the middleware's own ``/metrics`` scrape. Each stream
is built from texts whose count is known, with events of no output put anywhere among them (hypothesis): a delta
whose text is null (``"content": null``, a completion's ``"text": null``, an Anthropic ``text_delta`` whose
``text`` is null or missing), an empty reasoning beside a null content, a refusal, tool calls or usage that are
null, keep-alive comments, Anthropic pings and signatures, and malformed events on one ``data:`` line (no JSON, a
document cut short or followed by junk, JSON of the wrong shape). The stream is cut into chunks at random byte
offsets, as a proxy re-chunks it, and its role delta, finish chunk and ``[DONE]`` are there or not.

Without a usage block, the estimate is the count of deltas with output, and so the time per output token is the
stream's time after its first token over that count less one (each call's own times, from the public ``observers``
hook). With a usage block, the usage is what is recorded, exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.record import LLMCall
from support import RECORDED_WITHIN, Calls, Metrics, free_port, scrape, serve, whole_after

#: The chunks each model's stream is sent in (set by the test before its request).
STREAMS: dict[str, list[bytes]] = {}


async def answer(request: Request) -> StreamingResponse:
    body = await request.json()

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in STREAMS[body["model"]]:
            yield chunk

    return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, int, Calls]]:
    port = free_port()
    calls = Calls()
    paths = ("/v1/chat/completions", "/v1/completions", "/v1/messages")
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route(path, answer, methods=["POST"]) for path in paths]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        observers=[calls],
    )
    with serve(app) as base:
        yield base, port, calls
    app.telemetry.shutdown()


def sse(data: Any, event: str | None = None) -> bytes:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + raw + b"\n\n"


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


def completion_chunk(text: Any, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}


def anthropic_delta(delta: dict[str, Any]) -> bytes:
    return sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")


#: Malformed events on one data line, each with the bytes a text delta has (a text member): no output.
MALFORMED_CHAT = [
    b"data: not json\n\n",
    sse(json.dumps(chat_chunk({"content": "lost"})).encode() + b" junk"),
    sse(json.dumps(chat_chunk({"content": "lost"})).encode()[:-3]),
    sse(json.dumps(chat_chunk({"content": "lost"})).encode() * 2),
    sse({"content": "lost"}),
    sse({"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"content": "lost"}}]}),
    sse({"id": "chatcmpl-1", "choices": [], "system": {"content": "lost"}}),
]
#: Chat events with no output: null texts, an empty reasoning beside a null content, null tool calls and refusals, a
#: piece of a tool call with neither a name nor a piece of its arguments (only an id, null arguments).
EMPTY_CHAT = [
    sse(chat_chunk({"content": None})),
    sse(chat_chunk({"content": None, "reasoning_content": ""})),
    sse(chat_chunk({"content": None, "reasoning": ""})),
    sse(chat_chunk({"content": None, "refusal": None})),
    sse(chat_chunk({"content": None, "tool_calls": None})),
    sse(chat_chunk({"content": None, "tool_calls": [{"index": 0, "id": "call_1"}]})),
    sse(chat_chunk({"content": None, "tool_calls": [{"index": 0, "function": {"arguments": None}}]})),
    sse(chat_chunk({})),
    b": keep-alive\n\n",
    *MALFORMED_CHAT,
]
EMPTY_COMPLETION = [
    sse(completion_chunk(None)),
    b": keep-alive\n\n",
    sse(json.dumps(completion_chunk("lost")).encode() + b" junk"),
    sse({"id": "cmpl-1", "choices": [], "text": "lost"}),
]
EMPTY_ANTHROPIC = [
    anthropic_delta({"type": "text_delta", "text": None}),
    anthropic_delta({"type": "text_delta"}),
    anthropic_delta({"type": "input_json_delta", "partial_json": None}),
    anthropic_delta({"type": "thinking_delta", "thinking": None}),
    anthropic_delta({"type": "signature_delta", "signature": "c2ln"}),
    sse({"type": "ping"}, "ping"),
    anthropic_delta({"type": "text_delta", "text": "lost"})[:-2] + b" junk\n\n",
    anthropic_delta({"type": "text_delta", "text": "lost"})[:-6] + b"\n\n",
]

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@st.composite
def streams(draw: st.DrawFn, kind: str) -> tuple[list[bytes], int, bool]:
    """(the stream's events, how many deltas with output it has, whether it carries a usage block)."""
    texts = draw(st.lists(TEXT, min_size=1, max_size=8))
    empties = {"chat": EMPTY_CHAT, "completions": EMPTY_COMPLETION, "anthropic": EMPTY_ANTHROPIC}[kind]
    if kind == "chat":
        deltas = [sse(chat_chunk({"content": text})) for text in texts]
    elif kind == "completions":
        deltas = [sse(completion_chunk(text)) for text in texts]
    else:
        deltas = [anthropic_delta({"type": "text_delta", "text": text}) for text in texts]
    # Events of no output anywhere among the deltas, before the first one too.
    events = list(deltas)
    for empty in draw(st.lists(st.sampled_from(empties), max_size=6)):
        events.insert(draw(st.integers(0, len(events))), empty)
    usage = draw(st.booleans())
    if kind == "anthropic":
        start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": []}
        start["usage"] = {"input_tokens": 11, "output_tokens": 1}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        head = [sse({"type": "message_start", "message": start}, "message_start"), sse(block, "content_block_start")]
        # Without its message_delta (cut short), or with one whose output count is null (whole, then), the stream
        # has no output count: estimated.
        tail = []
        if usage or draw(st.booleans()):
            count = 777 if usage else None
            end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": count}}
            tail = [sse(end, "message_delta"), sse({"type": "message_stop"}, "message_stop")]
        return [*head, *events, *tail], len(texts), usage
    chunk = chat_chunk if kind == "chat" else completion_chunk
    head = [sse(chat_chunk({"role": "assistant", "content": ""}))] if kind == "chat" and draw(st.booleans()) else []
    tail = []
    if draw(st.booleans()):
        tail.append(sse(chunk({} if kind == "chat" else "", "stop")))
    if usage:
        tail.append(sse({"id": "x", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 777}}))
    if draw(st.booleans()):
        tail.append(b"data: [DONE]\n\n")
    return [*head, *events, *tail], len(texts), usage


@st.composite
def chunkings(draw: st.DrawFn, events: list[bytes]) -> list[bytes]:
    """The stream's bytes cut at random offsets (whole events, several in a chunk, events split across chunks)."""
    body = b"".join(events)
    if draw(st.booleans()):
        return events
    cuts = sorted(set(draw(st.lists(st.integers(1, len(body) - 1), max_size=12))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def read(service: tuple[str, int, Calls], kind: str, model: str) -> None:
    """Read the stream with the official SDK as an application would, whatever the events (an SDK raises on an
    event that is no JSON: the application sees the failure, and the middleware has the stream all the same)."""
    base = service[0]
    try:
        if kind == "anthropic":
            claude = anthropic.Anthropic(base_url=base, api_key="test", max_retries=0)
            with claude.messages.create(
                model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}], stream=True
            ) as events:
                for _ in events:
                    pass
            return
        oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        if kind == "chat":
            stream: Any = oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        else:
            stream = oai.completions.create(model=model, prompt="hi", stream=True)
        with stream:
            for _ in stream:
                pass
    except (json.JSONDecodeError, anthropic.APIError, openai.APIError):
        pass


def recorded(service: tuple[str, int, Calls], model: str, count: int) -> Metrics:
    """The scrape once ``count`` requests of ``model`` are recorded."""
    deadline = time.monotonic() + RECORDED_WITHIN
    while scrape(service[1]).value("llm_requests_total", gen_ai_request_model=model) < count:
        assert time.monotonic() < deadline, f"request {count} of {model} was not recorded"
        time.sleep(0.02)
    return whole_after(service[1])


def check_stream(service: tuple[str, int, Calls], kind: str, data: st.DataObject) -> None:
    events, outputs, usage = data.draw(streams(kind))
    model = f"empty-events-{kind}"
    before = recorded(service, model, 0)
    count = before.value("llm_requests_total", gen_ai_request_model=model) + 1
    STREAMS[model] = data.draw(chunkings(events))
    ended = len(service[2].ended)
    read(service, kind, model)
    after = recorded(service, model, count)
    call: LLMCall = next(c for c in service[2].ended[ended:] if c.request_model == model)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, gen_ai_request_model=model, **labels) - before.value(
            name, gen_ai_request_model=model, **labels
        )

    if usage:
        assert delta("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 777
        assert delta("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="estimated") == 0
        return
    assert delta("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="estimated") == outputs
    assert delta("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 0
    # The time per output token is over the deltas with output: no event of none spreads it thinner.
    recorded_tpot = delta("gen_ai_server_time_per_output_token_seconds_count")
    if recorded_tpot:
        assert outputs >= 2 and call.end is not None and call.first_token_at is not None
        expected = (call.end - call.first_token_at) / (outputs - 1)
        assert delta("gen_ai_server_time_per_output_token_seconds_sum") == pytest.approx(expected, rel=1e-6)
    else:
        assert outputs < 2 or call.error_type is not None


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_chat_stream_events_without_output_add_no_token(service: tuple[str, int, Calls], data: st.DataObject) -> None:
    check_stream(service, "chat", data)


@SETTINGS
@given(data=st.data())
def test_completion_stream_events_without_output_add_no_token(
    service: tuple[str, int, Calls], data: st.DataObject
) -> None:
    check_stream(service, "completions", data)


@SETTINGS
@given(data=st.data())
def test_anthropic_stream_events_without_output_add_no_token(
    service: tuple[str, int, Calls], data: st.DataObject
) -> None:
    check_stream(service, "anthropic", data)
