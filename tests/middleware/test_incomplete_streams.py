"""Streams whose upstream cut them off, through a real uvicorn server and the official SDKs.

An app that relays a provider's stream passes on what it got and ends its response normally when the provider's
connection drops. The SDKs end such a stream without a word (no exception), so the middleware is the only one left
to tell: a stream read whole that ended without the end of its answer is ``incomplete_stream``. A stream that ends
with its closing event (OpenAI's ``[DONE]``, Anthropic's ``message_stop``) but no finish reason is whole, and so is
one the middleware did not read to its end (it cannot know what the unread part held).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import Metrics, free_port, request_log_lines, serve, settled, whole_after

WORDS = ["The", " answer", " is"]


def _sse(obj: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _chat(model: str, how: str) -> Iterator[bytes]:
    def chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> bytes:
        return _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})  # fmt: skip

    if how == "two-choices-cut":
        # n=2: the first choice's finish sent early, then its final one (as gateways do); the second never ends.
        yield chunk({"role": "assistant", "content": ""}) + chunk({"role": "assistant", "content": ""}, 1)
        yield chunk({"content": "One"}) + chunk({"content": "Two"}, 1)
        yield chunk({}, 0, "length") + chunk({}, 0, "stop") + chunk({"content": " more"}, 1)
        return
    if how == "only-closed":
        # No answer at all, only the stream's end, its [DONE] spelled without the space after the colon.
        yield b"data:[DONE]\n\n"
        return
    yield chunk({"role": "assistant", "content": ""})
    for word in WORDS[:-1]:
        yield chunk({"content": word})
    if how == "closed":
        yield chunk({"content": WORDS[-1]})
        yield _sse("[DONE]")  # a server that sends no finish reason, but ends its stream as OpenAI's do
    elif how == "closed-joined":
        yield chunk({"content": WORDS[-1]}) + _sse("[DONE]")  # (the same, in one chunk with the last delta)
    elif how == "closed-padded":
        yield chunk({"content": WORDS[-1]})
        yield _sse("[DONE] ")  # (the SDKs take what starts with it)
    elif how == "closed-open":
        yield chunk({"content": WORDS[-1]})
        yield b"data: [DONE]"  # and no line break: a server that leaves out the blank line after the last event
    elif how == "finished-open":
        yield chunk({"content": WORDS[-1]})[:-1]  # (one line break: the finish is in the next event)
        yield b"\n" + chunk({})[:-2].replace(b'"finish_reason":null', b'"finish_reason":"stop"') + b"\n"
    else:
        yield chunk({"content": WORDS[-1]})
        if how == "unread":
            yield b": " + b"x" * (2 << 20) + b"\n\n"  # a comment line too large to read: what followed is unknown


def _messages(model: str, how: str) -> Iterator[bytes]:
    yield _sse({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": None, "usage": {"input_tokens": 9, "output_tokens": 1}}},
               "message_start")  # fmt: skip
    yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
               "content_block_start")  # fmt: skip
    for word in WORDS:
        yield _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                   "content_block_delta")  # fmt: skip
    if how == "closed":
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield _sse({"type": "message_stop"}, "message_stop")


def _responses(model: str, how: str) -> Iterator[bytes]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "output": [],
                "status": "in_progress"}  # fmt: skip
    yield _sse({"type": "response.created", "sequence_number": 0, "response": response}, "response.created")
    for i, word in enumerate(WORDS):
        yield _sse({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                    "output_index": 0, "content_index": 0, "delta": word}, "response.output_text.delta")  # fmt: skip
    if how == "closed":  # a Responses-compatible server whose last event says nothing of the response's status
        yield _sse({"type": "response.completed", "sequence_number": 9, "response": {"id": "resp_1", "model": model}},
                   "response.completed")  # fmt: skip


STREAMS = {"/v1/chat/completions": _chat, "/v1/messages": _messages, "/v1/responses": _responses}


async def relay(request: Request) -> Response:
    """Relays a scripted upstream stream. ``x-upstream``: ``cut`` (the default) stops mid-answer; ``closed`` ends
    with the API's closing event but no finish reason (``-joined``: in one chunk with the last delta; ``-padded``:
    ``[DONE]`` with a space after it; ``-open``: without the blank line after it); ``finished-open`` ends with a
    finish reason, without the blank line; ``only-closed`` (chat) sends nothing but ``data:[DONE]``; ``unread`` cuts
    after something too large to read; ``no-content`` answers 204. ``x-gzip`` compresses it; ``damaged``, with bytes
    after it that do not decode. ``x-linger``: seconds the app takes to end its response after the last event."""
    body = await request.json()
    how = request.headers.get("x-upstream", "cut")
    if how == "no-content":
        return Response(status_code=204, media_type="text/event-stream")
    events = list(STREAMS[request.url.path](body["model"], how))
    if request.headers.get("x-gzip"):
        packed = gzip.compress(b"".join(events))
        if request.headers["x-gzip"] == "damaged":
            packed += b"\x1f\x8b\x08\x00 and then bytes that are no gzip member"
        return Response(packed, media_type="text/event-stream", headers={"content-encoding": "gzip"})

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event
        if request.headers.get("x-linger"):
            await asyncio.sleep(float(request.headers["x-linger"]))  # (its upstream's teardown, say)

    return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, int]]:
    metrics_port = free_port()
    routes = [Route(path, relay, methods=["POST"]) for path in STREAMS]
    app = LLMTelemetryMiddleware(Starlette(routes=routes), metrics_port=metrics_port, metrics_host="127.0.0.1")
    with serve(app) as base:
        yield base, metrics_port
    app.telemetry.shutdown()


def _counted(port: int, model: str) -> Metrics:
    def recorded(metrics: Metrics) -> None:
        assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 1

    settled(port, recorded)
    return whole_after(port)  # (the scrape that showed the request may lack the call's tokens)


def test_streams_their_upstream_cut_off_are_incomplete_streams_the_sdks_say_nothing_of(
    service: tuple[str, int],
) -> None:
    base, port = service
    oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
    claude = anthropic.Anthropic(base_url=base, api_key="test", max_retries=0)
    prompt = [{"role": "user", "content": "Say something"}]
    with request_log_lines() as lines:
        # Each SDK returns the part that came, raising nothing.
        chat = oai.chat.completions.create(model="cut-chat", messages=prompt, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in chat) == "".join(WORDS)
        events = oai.responses.create(model="cut-responses", input="Say something", stream=True)
        assert "".join(getattr(e, "delta", "") for e in events) == "".join(WORDS)
        with claude.messages.stream(model="cut-messages", max_tokens=10, messages=prompt) as streamed:  # type: ignore[arg-type]
            assert "".join(streamed.text_stream) == "".join(WORDS)
        for model in ("cut-chat", "cut-responses", "cut-messages"):
            metrics = _counted(port, model)
            assert metrics.value("llm_errors_total", gen_ai_request_model=model, error_type="incomplete_stream") == 1
            # A failed stream is in the error counts, not in the latency histograms; its tokens still count.
            assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 0
            assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") > 0
    logged = {line["model"]: line for line in map(json.loads, lines.getvalue().splitlines())}
    for model in ("cut-chat", "cut-responses", "cut-messages"):
        assert (logged[model]["level"], logged[model]["error_type"], logged[model]["status_code"]) == (
            "warning",
            "incomplete_stream",
            200,
        )


def test_a_stream_of_two_choices_cut_before_the_second_finished_is_incomplete(service: tuple[str, int]) -> None:
    """n=2, and the first choice's finish comes twice (an early one, then its final one): two finishes, but of one
    choice; the second choice was cut off mid-answer. (Counting finish events, the answer passed for whole.)"""
    base, port = service
    oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
    chunks = list(
        oai.chat.completions.create(
            model="cut-two-choices", messages=[{"role": "user", "content": "Hi"}], n=2, stream=True,
            extra_headers={"x-upstream": "two-choices-cut"},
        )
    )  # fmt: skip
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    metrics = _counted(port, "cut-two-choices")
    assert (
        metrics.value("llm_errors_total", gen_ai_request_model="cut-two-choices", error_type="incomplete_stream") == 1
    )


@pytest.mark.parametrize(
    ("path", "how"),
    [
        ("/v1/chat/completions", "closed"),
        ("/v1/chat/completions", "closed-joined"),
        ("/v1/chat/completions", "closed-padded"),
        ("/v1/chat/completions", "closed-open"),
        ("/v1/chat/completions", "finished-open"),
        ("/v1/messages", "closed"),
        ("/v1/responses", "closed"),
    ],
)
def test_a_stream_that_ends_with_its_closing_event_is_whole_without_a_finish_reason(
    service: tuple[str, int], path: str, how: str
) -> None:
    base, port = service
    model = f"{how}-{path.rsplit('/', 1)[1]}"
    body = {"model": model, "stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    answer = httpx.post(base + path, json=body, headers={"x-upstream": how}, timeout=30)
    assert answer.status_code == 200
    metrics = _counted(port, model)
    assert metrics.value("llm_errors_total", gen_ai_request_model=model) == 0
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1


def test_a_stream_of_nothing_but_its_closing_event_is_whole(service: tuple[str, int]) -> None:
    """A chat stream with no answer in it, only its ``[DONE]``: no token and no finish reason, but it came to its end,
    and the SDK ends it without a word. (Spelled ``data:[DONE]``, the event is read by the SSE decoder, not taken as
    the chunk OpenAI sends alone: read there as an event before the first token, it was once set aside as a role
    chunk would be, and never read as the end.)"""
    base, port = service
    oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
    chunks = oai.chat.completions.create(
        model="only-closed-chat", messages=[{"role": "user", "content": "Hi"}], stream=True,
        extra_headers={"x-upstream": "only-closed"},
    )  # fmt: skip
    assert list(chunks) == []
    metrics = _counted(port, "only-closed-chat")
    assert metrics.value("llm_errors_total", gen_ai_request_model="only-closed-chat") == 0


def test_an_answer_with_no_content_is_no_stream_cut_short(service: tuple[str, int]) -> None:
    base, port = service
    body = {"model": "no-content", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-upstream": "no-content"}, timeout=30)
    assert answer.status_code == 204
    assert _counted(port, "no-content").value("llm_errors_total", gen_ai_request_model="no-content") == 0


def test_a_stream_not_read_to_its_end_is_not_called_incomplete(service: tuple[str, int]) -> None:
    """An event too large to read could have held the finish reason: the middleware does not guess."""
    base, port = service
    body = {"model": "unread-chat", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-upstream": "unread"}, timeout=30)
    assert len(answer.content) > 2 << 20
    metrics = _counted(port, "unread-chat")
    assert metrics.value("llm_errors_total", gen_ai_request_model="unread-chat") == 0


def test_a_compressed_stream_cut_off_is_read_through_its_coding(service: tuple[str, int]) -> None:
    base, port = service
    body = {"model": "cut-gzip", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-gzip": "1"}, timeout=30)
    assert answer.headers["content-encoding"] == "gzip" and b"answer" in answer.content  # (httpx decoded it)
    metrics = _counted(port, "cut-gzip")
    assert metrics.value("llm_errors_total", gen_ai_request_model="cut-gzip", error_type="incomplete_stream") == 1


def test_a_compressed_stream_that_does_not_decode_to_its_end_is_not_called_incomplete(service: tuple[str, int]) -> None:
    base, port = service
    body = {"model": "damaged-gzip", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers={"x-gzip": "damaged"}) as answer:
        assert b"no gzip member" in b"".join(answer.iter_raw())
    metrics = _counted(port, "damaged-gzip")
    assert metrics.value("llm_errors_total", gen_ai_request_model="damaged-gzip") == 0


def test_a_client_that_leaves_on_the_closing_event_got_the_whole_answer(service: tuple[str, int]) -> None:
    """The openai SDK closes the connection on ``[DONE]``; an app that takes a while longer to end its response sees
    the client leave. A stream without finish reasons (some servers send none) ended there all the same: no
    client_disconnect."""
    base, port = service
    oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
    stream = oai.chat.completions.create(
        model="closed-lingering", messages=[{"role": "user", "content": "Hi"}], stream=True,
        extra_headers={"x-upstream": "closed", "x-linger": "2"},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "".join(WORDS)
    stream.close()
    metrics = _counted(port, "closed-lingering")
    assert metrics.value("llm_errors_total", gen_ai_request_model="closed-lingering") == 0, metrics.text


def test_a_stream_the_app_fails_mid_answer_under_basehttpmiddleware_is_the_apps_failure() -> None:
    """Starlette's BaseHTTPMiddleware (FastAPI's ``@app.middleware("http")``) ends the response normally and then
    raises the app's exception again: the client gets a 200 stream cut short, and the call was a success."""
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

    async def chat(request: Request) -> Response:
        body = await request.json()

        async def stream() -> AsyncIterator[bytes]:
            for i, chunk in enumerate(_chat(body["model"], "cut")):
                if i == 2:
                    raise RuntimeError("the upstream dropped mid-answer")
                yield chunk

        return StreamingResponse(stream(), media_type="text/event-stream")

    class Passthrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    inner = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    inner.add_middleware(Passthrough)
    port = free_port()
    app = LLMTelemetryMiddleware(inner, metrics_port=port, metrics_host="127.0.0.1")
    try:
        with serve(app) as base:
            oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
            chunks = oai.chat.completions.create(
                model="failed-mid", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == WORDS[0]  # and no error raised
            metrics = _counted(port, "failed-mid")
    finally:
        app.telemetry.shutdown()
    assert metrics.value("llm_errors_total", gen_ai_request_model="failed-mid", error_type="app_exception") == 1
