"""Each request on a connection is a trace of its own, through a real uvicorn server.

uvicorn starts a connection's next request inside the context of the one before it when that one's body paused
reading (over 64 KiB, on asyncio's event loop) or when the client pipelines its requests (CPython #140947): the
earlier request's LLM span is then current when the next request arrives. Taken as a parent, it made every later
request on the connection an INTERNAL span of the first one's trace, its own ``traceparent`` (and sampling
decision) ignored, and its log line and exemplars pointing into another request's trace.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import serve, wait_for

MODELS = ["big-prompt", "next-1", "next-2"]


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"id": "c", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})  # fmt: skip


def _request(i: int, model: str, prompt_chars: int) -> bytes:
    """A chat request whose traceparent names trace i+1, parent span i+1, forwarded for client 10.0.0.<i+1>."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * prompt_chars}]}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\ntraceparent: 00-{i + 1:032x}-{i + 1:016x}-01\r\n"
        f"X-Forwarded-For: 10.0.0.{i + 1}\r\n\r\n"
    )
    return head.encode() + body


def _read_answers(sock: socket.socket, count: int) -> None:
    seen = b""
    while seen.count(b'"usage"') < count:
        piece = sock.recv(65536)
        assert piece, "the server closed the connection"
        seen += piece


#: How the app is served: the LLM span as the server span; under OpenTelemetry's HTTP span (two spans); behind a proxy
#: whose X-Forwarded-For uvicorn takes for the client (a different one on each request of the connection); with
#: OpenTelemetry's ASGI middleware inside the app, which sends the response inside a span of its own.
SHAPES = ["one-span", "two-span", "forwarded", "otel-inside"]


@pytest.fixture(params=SHAPES)
def traced(request: pytest.FixtureRequest) -> Iterator[tuple[str, InMemorySpanExporter, str]]:
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inner: Any = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    if request.param == "otel-inside":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        inner = OpenTelemetryMiddleware(inner, tracer_provider=provider)
    app = LLMTelemetryMiddleware(
        inner, metrics_port=0, tracer_provider=provider, tracing_http_span=request.param == "two-span"
    )
    config: dict[str, Any] = {"http": "h11"}
    if request.param == "forwarded":
        config.update(proxy_headers=True, forwarded_allow_ips="*")
    with serve(app, **config) as base:
        yield base, exporter, request.param
    app.telemetry.shutdown()


@pytest.mark.parametrize("how", ["large-body-first", "pipelined"])
def test_every_request_on_a_connection_continues_its_own_traceparent(
    traced: tuple[str, InMemorySpanExporter, str], how: str
) -> None:
    base, exporter, shape = traced
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if how == "pipelined":
            sock.sendall(b"".join(_request(i, model, 10) for i, model in enumerate(MODELS)))
            _read_answers(sock, len(MODELS))
        else:  # one after another, the first over uvicorn's 64 KiB read limit
            for i, model in enumerate(MODELS):
                sock.sendall(_request(i, model, 300_000 if i == 0 else 10))
                _read_answers(sock, 1)

    def llm_spans() -> list[Any] | None:
        spans = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
        return spans if len(spans) >= len(MODELS) else None

    spans = wait_for("the LLM spans", llm_spans, seconds=20)
    by_model = {span.name.removeprefix("chat "): span for span in spans}
    assert sorted(by_model) == sorted(MODELS)
    spans_by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    for i, model in enumerate(MODELS):
        span = by_model[model]
        # The server span of the request (the LLM span itself, or OpenTelemetry's HTTP span above it) continues the
        # request's own traceparent.
        server = span if span.kind == SpanKind.SERVER else spans_by_id[span.parent.span_id]
        assert server.kind == SpanKind.SERVER, (shape, model, span.kind)
        assert (server.context.trace_id, server.parent.span_id) == (i + 1, i + 1), model
        assert span.context.trace_id == i + 1, model


#: The app served in the fan-out test, which its route calls in process.
_FAN_OUT: list[Any] = []


async def fan_out(request: Request) -> JSONResponse:
    """An LLM route that asks two others of the same app in process (a router, a mixture of agents), one after the
    other or at once (``asyncio.gather``, a ``TaskGroup``: tasks of their own), before it answers."""
    import asyncio

    import httpx

    body = await request.json()
    model = body["model"]
    if not model.startswith("outer-"):
        return await chat(request)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_FAN_OUT[0]), base_url="http://in") as http:
        how = model.removeprefix("outer-")
        asks = [http.post("/v1/chat/completions", json={"model": f"inner-{how}-{p}", "messages": []}) for p in "ab"]
        if how == "one-by-one":
            for ask in asks:
                await ask
        elif how == "gather":
            await asyncio.gather(*asks)
        else:
            async with asyncio.TaskGroup() as group:
                for ask in asks:
                    group.create_task(ask)
    return await chat(request)


@pytest.mark.parametrize(
    "how",
    ["one-by-one", "gather",
     pytest.param("task-group", marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup is 3.11's"))],
)  # fmt: skip
def test_in_process_calls_of_a_request_are_its_children_however_they_are_made(how: str) -> None:
    """Calls an LLM request makes to the app in process, while it is still answering, are INTERNAL spans of its
    trace, whether made one after another or at once in tasks of their own; a context is set aside as an earlier
    request's only once that request has answered. (The first fix of uvicorn's leak, which set aside any context made
    current in another task, split a fan-out into traces of their own.)"""
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", fan_out, methods=["POST"])]), metrics_port=0,
        tracer_provider=provider,
    )  # fmt: skip
    _FAN_OUT[:] = [app]
    try:
        with serve(app) as base, socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as sock:
            sock.sendall(_request(6, f"outer-{how}", 10))
            _read_answers(sock, 1)
            spans = wait_for("the LLM spans", lambda: len(exporter.get_finished_spans()) >= 3 or None, seconds=20)
    finally:
        app.telemetry.shutdown()
    spans = {span.name.removeprefix("chat "): span for span in exporter.get_finished_spans()}
    assert sorted(spans) == [f"inner-{how}-a", f"inner-{how}-b", f"outer-{how}"], spans
    outer = spans[f"outer-{how}"]
    assert outer.kind == SpanKind.SERVER and (outer.context.trace_id, outer.parent.span_id) == (7, 7)
    for part in "ab":
        inner = spans[f"inner-{how}-{part}"]
        assert inner.kind == SpanKind.INTERNAL, (part, inner.kind)
        assert (inner.context.trace_id, inner.parent.span_id) == (7, outer.context.span_id), part
