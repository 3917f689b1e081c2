"""Clients the SDKs never are, on raw sockets, against real uvicorn under both of its HTTP parsers (h11, httptools)
and both of its event loops (asyncio, uvloop): pipelined requests on one connection, chunked bodies cut at odd
sizes with chunk extensions and trailers, ``Expect: 100-continue``, compressed request bodies (a compression bomb
among them), ``HEAD`` and ``OPTIONS`` on the LLM routes, a body stopped halfway and its connection dropped. The
client gets the bytes the bare app sends, byte for byte, and the scrape parses and counts every call as it was."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from otlp_receiver import isolated_env
from support import Metrics, serve, settled

CLOSE = b"Connection: close\r\n"


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _request(raw: bytes) -> tuple[str, bool, str]:
    """The model and stream flag the client asked for, and a digest of the body the app received."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    stream = parsed.get("stream") is True if isinstance(parsed, dict) else False
    # The model that answers is named apart from the one asked for: a request the middleware did not read is recorded
    # under the model that answered.
    return "served-" + (model if isinstance(model, str) else "none"), stream, hashlib.sha256(raw).hexdigest()


async def chat(request: Request) -> Response:
    if request.method != "POST":
        return Response(b"chat route, " + request.method.encode(), media_type="text/plain")
    model, stream, digest = _request(await request.body())
    if not stream:
        return JSONResponse({
            "id": "c1", "object": "chat.completion", "model": model, "body_sha256": digest,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        })  # fmt: skip

    async def events() -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse({"id": "c1", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

        yield chunk({"role": "assistant", "content": ""})
        for word in ("one ", "two ", "three"):
            yield chunk({"content": word})
        yield chunk({}, "stop")
        yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})  # fmt: skip
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-body-sha256": digest})


async def messages(request: Request) -> Response:
    if request.method != "POST":
        return Response(b"messages route, " + request.method.encode(), media_type="text/plain")
    model, _, digest = _request(await request.body())  # (always a stream)

    async def events() -> AsyncIterator[bytes]:
        yield _sse({"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant",
                    "model": model, "content": [], "usage": {"input_tokens": 13, "output_tokens": 1}}},
                   "message_start")  # fmt: skip
        yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")  # fmt: skip
        yield _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}},
                   "content_block_delta")  # fmt: skip
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
                   "message_delta")  # fmt: skip
        yield _sse({"type": "message_stop"}, "message_stop")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-body-sha256": digest})


def the_app() -> Starlette:
    methods = ["POST", "GET", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=methods), Route("/v1/messages", messages, methods=methods)]
    )


@contextmanager
def uvicorn_on(app: Any, http: str, loop: str) -> Iterator[int]:
    """``app`` under a real uvicorn on 127.0.0.1 with the given HTTP parser and event loop, in a thread; its port."""
    with serve(app, event_loop=loop, http=http, date_header=False, server_header=False) as url:
        yield int(url.rsplit(":", 1)[1])


def post(path: str, body: bytes, extra: bytes = b"", close: bool = True) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        CLOSE if close else b"",
        body,
    )


def chunked(body: bytes, sizes: list[int]) -> list[bytes]:
    """``body`` as chunks of the given sizes in turn (hexadecimal in upper case, each with an extension), then the
    last chunk with a trailer field."""
    pieces, at, turn = [], 0, 0
    while at < len(body):
        piece = body[at : at + sizes[turn % len(sizes)]]
        pieces.append(b"%X;ext=1\r\n%s\r\n" % (len(piece), piece))
        at += len(piece)
        turn += 1
    return [*pieces, b"0\r\nx-trailer: 1\r\n\r\n"]


def answer(port: int, pieces: list[bytes], expect_continue: bool = False) -> bytes:
    """Everything the server sends on one connection, the request written in ``pieces`` (one ``sendall`` each),
    until it closes the connection, with a short pause between pieces, so that the server delivers a body in
    several messages (whatever it does, the answer must be the same). ``expect_continue``: the first piece is the
    head, and the rest is sent only once the server has said ``100 Continue``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        received = b""
        sock.sendall(pieces[0])
        if expect_continue:
            while b"\r\n\r\n" not in received:
                data = sock.recv(65536)
                assert data, "the server closed the connection before 100 Continue"
                received += data
            assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        for piece in pieces[1:]:
            time.sleep(0.02)
            sock.sendall(piece)
        while data := sock.recv(65536):
            received += data
    return received


def body(model: str, stream: bool = False) -> bytes:
    """A request for ``model`` that returns the result of a tool call: one of ``wire_tool``, as the request says."""
    call = {"id": "t1", "type": "function", "function": {"name": "wire_tool", "arguments": "{}"}}
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
    ]
    return json.dumps({"model": model, "stream": stream, "messages": conversation}).encode()


def exchanges() -> list[tuple[str, list[bytes], bool]]:
    """The exchanges, each on a connection of its own, as (name, pieces, whether it sends Expect: 100-continue)."""
    return [
        (
            "pipelined",
            [
                post("/v1/chat/completions", body("wire-json"), close=False)
                + post("/v1/messages", body("wire-claude", True), close=False)
                + b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"OPTIONS /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n"
                + post("/v1/chat/completions", body("wire-stream", True))
            ],
            False,
        ),
        (
            "chunked at odd sizes",
            [
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + CLOSE + b"\r\n",
                *chunked(body("wire-chunked", True), [1, 3, 7, 64]),
            ],
            False,
        ),
        (
            "expect 100-continue",
            [
                post("/v1/messages", b"", b"Expect: 100-continue\r\n").replace(
                    b"Content-Length: 0", b"Content-Length: %d" % len(body("wire-expect", True))
                ),
                body("wire-expect", True),
            ],
            True,
        ),
        (
            "gzip body",
            [post("/v1/chat/completions", gzip.compress(body("wire-gzip")), b"Content-Encoding: gzip\r\n")],
            False,
        ),
        (
            "gzip bomb",
            [
                post(
                    "/v1/chat/completions",
                    gzip.compress(b'{"model": "' + b"a" * (64 << 20) + b'"}', 9),
                    b"Content-Encoding: gzip\r\n",
                )
            ],
            False,
        ),
    ]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_raw_clients_get_the_bare_apps_bytes_and_are_counted(http: str, loop: str) -> None:
    with isolated_env({}):
        wrapped = LLMTelemetryMiddleware(the_app(), metrics_port=0, metrics_app_path="/metrics", request_logs=False)
        wrapped.telemetry  # noqa: B018 - built while the environment is in place
    try:
        with uvicorn_on(the_app(), http, loop) as bare_port, uvicorn_on(wrapped, http, loop) as port:
            for name, pieces, expect_continue in exchanges():
                alone = answer(bare_port, pieces, expect_continue)
                assert alone.startswith(b"HTTP/1.1 "), name
                assert answer(port, pieces, expect_continue) == alone, name
            # A body stopped halfway, the connection dropped: no answer, and nothing else goes wrong.
            for target in (bare_port, port):
                with socket.create_connection(("127.0.0.1", target), timeout=30) as sock:
                    sock.sendall(post("/v1/chat/completions", body("wire-dropped"))[:-10])
            # The next request on a fresh connection is measured as ever.
            next_one = [post("/v1/chat/completions", body("wire-after"))]
            assert answer(port, next_one) == answer(bare_port, next_one)

            def counted(metrics: Metrics) -> None:
                def requests(model: str, **labels: str) -> float:
                    return metrics.value("llm_requests_total", gen_ai_request_model=model, **labels)

                for model in ("wire-json", "wire-claude", "wire-stream", "wire-chunked", "wire-expect", "wire-after"):
                    assert requests(model, error_type="") == 1, model
                # Compressed bodies are not read: the model is the one that answered (the app could not read it
                # either, and answered "none"); the dropped one never reached the app's answer.
                assert requests("unknown", error_type="client_disconnect") == 1
                assert requests("served-none", gen_ai_response_model="served-none") == 2
                assert metrics.value("llm_requests_total") == 9
                # Each chat request read in full returned one tool result (on the Anthropic route, the same
                # conversation is not of that API's shape).
                assert metrics.value("llm_tool_results_total", gen_ai_tool_name="wire_tool") == 4
                tokens = {
                    (model, kind): metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type=kind)
                    for model in ("wire-json", "wire-claude", "wire-stream", "wire-chunked")
                    for kind in ("input", "output")
                }
                assert tokens == {
                    ("wire-json", "input"): 11, ("wire-json", "output"): 7,
                    ("wire-claude", "input"): 13, ("wire-claude", "output"): 2,
                    ("wire-stream", "input"): 5, ("wire-stream", "output"): 3,
                    ("wire-chunked", "input"): 5, ("wire-chunked", "output"): 3,
                }  # fmt: skip
                assert metrics.value("llm_requests_active") == 0
                assert metrics.value("llm_telemetry_internal_errors_total") == 0

            settled(port, counted)
    finally:
        wrapped.telemetry.shutdown()
