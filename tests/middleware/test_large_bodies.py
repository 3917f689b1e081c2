"""Responses too large to read whole still give their usage: a Responses stream whose last event repeats a response
carrying an image (over the decoder's 1 MiB per event), and JSON bodies over the 8 MiB the reader parses. Each API
puts its usage after the output, so it is read from the body's last bytes. Served by real uvicorn, read by the
official SDKs, checked in a real scrape against the usage the SDK got."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import MAX_JSON_RESPONSE_BYTES
from support import Metrics, free_port, serve, settled

IMAGE = "iVBORw0KGgo" * 100_000  # 1.1 MB of base64: one generated image, as the Responses API returns it
RESPONSES_USAGE = {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1024}, "output_tokens": 300,
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2300}  # fmt: skip


def _responses_events(model: str, status: str) -> list[bytes]:
    def event(kind: str, **body: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    base = {"id": "resp_big", "object": "response", "created_at": 1, "model": model, "output": []}
    image = {"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": IMAGE}
    text = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Here it is.", "annotations": []}]}  # fmt: skip
    done = {**base, "status": status, "output": [image, text], "usage": RESPONSES_USAGE, "user": None, "metadata": {}}
    if status == "incomplete":
        done["incomplete_details"] = {"reason": "max_output_tokens"}
    end = "response.completed" if status == "completed" else "response.incomplete"
    return [
        event("response.created", sequence_number=0, response={**base, "status": "in_progress", "usage": None}),
        event(
            "response.output_text.delta",
            sequence_number=1,
            item_id="msg_1",
            output_index=1,
            content_index=0,
            delta="Here it is.",
        ),
        event(end, sequence_number=2, response=done),
    ]


async def responses(request: Request) -> Response:
    body = await request.json()
    events = _responses_events(body["model"], request.headers.get("x-status", "completed"))

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream")


async def chat(request: Request) -> Response:
    body = await request.json()
    message = {"role": "assistant", "content": "x" * 9_000_000}
    return JSONResponse(
        {
            "id": "chatcmpl-big",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 2_000_000,
                "total_tokens": 2_000_050,
                "prompt_tokens_details": {"cached_tokens": 32},
            },
        }
    )


async def messages(request: Request) -> Response:
    body = await request.json()
    return JSONResponse(
        {
            "id": "msg_big",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "y" * 9_000_000}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 40,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 2_200_000,
            },
        }
    )


#: The model a sized answer says it came from (the request names another: the label shows which one was read).
_SIZED_MODEL = "gpt-4o-2024-08-06"


def _sized_answer(size: int) -> bytes:
    """A chat completion of exactly ``size`` bytes, its usage in its last hundred (the text makes up the rest)."""
    answer: dict[str, Any] = {
        "id": "chatcmpl-sized",
        "object": "chat.completion",
        "created": 1,
        "model": _SIZED_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18},
    }
    answer["choices"][0]["message"]["content"] = "x" * (size - len(json.dumps(answer)))
    body = json.dumps(answer).encode()
    assert len(body) == size and len(body) - body.index(b'"usage"') < 100
    return body


async def sized_chat(request: Request) -> Response:
    """The answer of ``x-size`` bytes: in one body message, or in two split at byte ``x-split``."""
    await request.json()
    body = _sized_answer(int(request.headers["x-size"]))
    if "x-split" not in request.headers:
        return Response(body, media_type="application/json")
    split = int(request.headers["x-split"])

    async def pieces() -> AsyncIterator[bytes]:
        yield body[:split]
        yield body[split:]

    return StreamingResponse(pieces(), media_type="application/json")


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, int]]:
    port = free_port()
    routes = [
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/sized/v1/chat/completions", sized_chat, methods=["POST"]),
    ]
    app = LLMTelemetryMiddleware(Starlette(routes=routes), metrics_port=port, metrics_host="127.0.0.1")
    with serve(app) as base:
        yield base, port
    app.telemetry.shutdown()


@pytest.mark.parametrize(("status", "finish"), [("completed", "stop"), ("incomplete", "incomplete")])
def test_a_responses_stream_whose_last_event_holds_an_image_keeps_its_usage(
    service: tuple[str, int], status: str, finish: str
) -> None:
    base, port = service
    model = "gpt-4.1" if status == "completed" else "gpt-4.1-2025-04-14"  # (a series of each)
    client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
    with client.responses.create(model=model, input="draw", stream=True, extra_headers={"x-status": status}) as s:
        last = list(s)[-1]
    assert last.response.usage is not None and last.response.usage.input_tokens == 2000  # the SDK's truth
    assert last.response.output[0].result == IMAGE  # and the client's bytes, unchanged
    labels = {"gen_ai_request_model": model}

    def recorded(m: Metrics) -> None:
        assert m.value("llm_tokens_total", gen_ai_token_type="input", llm_usage_source="reported", **labels) == 2000
        assert m.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported", **labels) == 300
        assert m.value("llm_token_details_total", llm_token_detail="cache_read", **labels) == 1024
        assert m.value("llm_tokens_total", llm_usage_source="estimated", **labels) == 0
        # gpt-4.1: $2 per million input tokens, $0.50 cached, $8 output.
        assert m.value("llm_cost_usd_total", **labels) == pytest.approx((976 * 2 + 1024 * 0.5 + 300 * 8) / 1e6)
        assert m.value("llm_finish_reasons_total", llm_finish_reason=finish, **labels) == 1

    settled(port, recorded)


def test_a_json_body_over_the_read_limit_keeps_its_usage(service: tuple[str, int]) -> None:
    base, port = service
    client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "long"}])
    assert reply.usage is not None and reply.usage.completion_tokens == 2_000_000
    assert len(reply.choices[0].message.content or "") == 9_000_000
    claude = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
    ask = [{"role": "user", "content": "long"}]
    message = claude.messages.create(model="claude-sonnet-4-20250514", max_tokens=10, messages=ask)  # type: ignore[arg-type]
    assert message.usage.cache_read_input_tokens == 2000
    chat_labels = {"gen_ai_request_model": "gpt-4o-mini"}
    claude_labels = {"gen_ai_request_model": "claude-sonnet-4-20250514"}
    # claude-sonnet-4: $3 input, $0.30 cache reads, $3.75 cache writes, $15 output, per million.
    expected = (40 * 3 + 2000 * 0.3 + 100 * 3.75 + 2_200_000 * 15) / 1e6

    def recorded(m: Metrics) -> None:
        assert m.value("llm_tokens_total", gen_ai_token_type="input", **chat_labels) == 50
        assert m.value("llm_tokens_total", gen_ai_token_type="output", **chat_labels) == 2_000_000
        assert m.value("llm_token_details_total", llm_token_detail="cache_read", **chat_labels) == 32
        # Anthropic's input_tokens leaves the cache out: the input is all three.
        assert m.value("llm_tokens_total", gen_ai_token_type="input", **claude_labels) == 2140
        assert m.value("llm_tokens_total", gen_ai_token_type="output", **claude_labels) == 2_200_000
        assert m.value("llm_cost_usd_total", **claude_labels) == pytest.approx(expected)

    settled(port, recorded)


@pytest.mark.parametrize("over", [0, 1])
def test_a_json_answer_of_exactly_the_read_limit_is_read_whole(service: tuple[str, int], over: int) -> None:
    """MAX_JSON_RESPONSE_BYTES is the largest answer parsed whole: one of exactly that size gives its response model
    and finish reason as well as its usage. One byte more and only its last bytes are read, for the usage alone."""
    base, port = service
    model = f"sized-{over}"
    client = openai.OpenAI(base_url=base + "/sized/v1", api_key="k", max_retries=0)
    size = str(MAX_JSON_RESPONSE_BYTES + over)
    ask = [{"role": "user", "content": "long"}]
    reply = client.chat.completions.create(model=model, messages=ask, extra_headers={"x-size": size})  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 11  # the SDK's truth
    assert reply.model == _SIZED_MODEL and reply.choices[0].finish_reason == "length"

    def recorded(m: Metrics) -> None:
        # The response model is a label of the token series itself (no scrape shows the count under another): read
        # from the body's head, or not at all.
        output = {"gen_ai_request_model": model, "gen_ai_token_type": "output"}
        assert m.value("llm_tokens_total", **output) == 11
        assert m.value("llm_tokens_total", gen_ai_response_model=_SIZED_MODEL, **output) == (0 if over else 11)
        if not over:
            assert m.value("llm_finish_reasons_total", gen_ai_request_model=model, llm_finish_reason="length") == 1

    metrics = settled(port, recorded)
    assert metrics.value("llm_finish_reasons_total", gen_ai_request_model=model) == (0 if over else 1)


@pytest.mark.parametrize("split", [None, MAX_JSON_RESPONSE_BYTES])
def test_a_json_answer_whose_usage_comes_in_the_step_that_crosses_the_read_limit_keeps_it(
    service: tuple[str, int], split: int | None
) -> None:
    """The bytes that take a JSON answer past MAX_JSON_RESPONSE_BYTES start the tail kept for its usage, even when
    they are its last: here its last 100 bytes, which hold the usage, are the step that crosses the limit (the last
    step the middleware reads one large body message in, or a body message of their own after one of exactly the
    limit)."""
    base, port = service
    model = f"crossing-{split}"
    client = openai.OpenAI(base_url=base + "/sized/v1", api_key="k", max_retries=0)
    headers = {"x-size": str(MAX_JSON_RESPONSE_BYTES + 100)} | ({"x-split": str(split)} if split else {})
    ask = [{"role": "user", "content": "long"}]
    reply = client.chat.completions.create(model=model, messages=ask, extra_headers=headers)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 11 and reply.usage.prompt_tokens == 7

    def recorded(m: Metrics) -> None:
        labels = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
        assert m.value("llm_tokens_total", gen_ai_token_type="input", **labels) == 7
        assert m.value("llm_tokens_total", gen_ai_token_type="output", **labels) == 11

    settled(port, recorded)


#: A JSON answer of 64 MiB, sent in 64 KiB pieces (the same bytes each time: the app itself keeps nothing).
_PIECE = b"x" * (64 << 10)
_PIECES = 1024


async def _huge_chat(request: Request) -> Response:
    body = await request.json()
    head = json.dumps({"id": "chatcmpl-huge", "object": "chat.completion", "created": 1, "model": body["model"]})
    usage = {"prompt_tokens": 12, "completion_tokens": 16_000_000, "total_tokens": 16_000_012}
    tail = json.dumps({"finish_reason": "stop"})[1:-1] + "}]," + json.dumps({"usage": usage})[1:]

    async def answer() -> AsyncIterator[bytes]:
        yield head[:-1].encode() + b', "choices": [{"index": 0, "message": {"role": "assistant", "content": "'
        for _ in range(_PIECES):
            yield _PIECE
        yield b'"}, ' + tail.encode()

    return StreamingResponse(answer(), media_type="application/json")


def test_reading_a_json_answer_far_over_the_read_limit_keeps_bounded_memory() -> None:
    """Past MAX_JSON_RESPONSE_BYTES only the body's last bytes are kept, for its usage: a 64 MiB answer passes through
    with the server's memory peaking well under the answer's size (about twice the read limit: the bytes kept up to
    it and their copy when it is passed), and its usage still counted. Measured with tracemalloc around one request
    to a real uvicorn server in this process, the client reading the body as it comes and keeping none of it."""
    port = free_port()
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", _huge_chat, methods=["POST"])]),
        metrics_port=port,
        metrics_host="127.0.0.1",
    )
    model = "gpt-4o-huge"
    try:
        with serve(app) as base, httpx.Client(timeout=60) as client:
            request = {"model": model, "messages": [{"role": "user", "content": "long"}]}
            tracemalloc.start()
            try:
                with client.stream("POST", base + "/v1/chat/completions", json=request) as response:
                    received = sum(len(piece) for piece in response.iter_raw())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert response.status_code == 200
            assert received > _PIECES * len(_PIECE)

            def recorded(m: Metrics) -> None:
                labels = {"gen_ai_request_model": model, "gen_ai_token_type": "output"}
                assert m.value("llm_tokens_total", **labels) == 16_000_000

            settled(port, recorded)
    finally:
        app.telemetry.shutdown()
    assert peak < 4 * MAX_JSON_RESPONSE_BYTES < _PIECES * len(_PIECE)
