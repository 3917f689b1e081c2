"""With ``LLM_TELEMETRY_TRACING_HTTP_SPAN=true`` the headers OpenTelemetry's ASGI middleware reads the caller's context
from are screened while it opens its span, and the request's own are put back before the app runs: through real
uvicorn (both of its HTTP parsers) and a real HTTP client, the app, and an ASGI app around the middleware after it,
see the request's headers exactly as uvicorn parsed them (duplicates, order, names in any case, bytes that are not
UTF-8), also when the app fails, and the HTTP span's parent and the baggage are what OpenTelemetry's own extraction
reads from those headers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asgi import asgi_getter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_telemetry import LLMTelemetryMiddleware
from otlp_receiver import isolated_env
from support import request_body, serve

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#: Header lists a client may send, each with something the screen takes out or changes for OpenTelemetry's reading.
SENT: dict[str, list[tuple[bytes, bytes]]] = {
    "duplicates-and-case": [
        (b"TraceParent", TRACEPARENT),
        (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        (b"X-Team", b"a"),
        (b"BAGGAGE", b"k=v,bad member,k2=v2"),
        (b"x-team", b"b"),
        (b"Baggage", b"z=1"),
    ],
    "not-utf-8": [
        (b"traceparent", TRACEPARENT),
        (b"tracestate", b"congo=t61,rojo=\xe9\xff"),
        (b"x-raw", b"\xff\xfe\x80"),
        (b"baggage", b"a=\xe9,b=2"),
    ],
    "escapes-in-latin-1": [
        (b"traceparent", TRACEPARENT),
        (b"baggage", b"a=\\u00e9\xff,b=\\x41"),
        (b"tracestate", b"k=\\ud800\xff,rojo=1"),
    ],
    "long-traceparent": [
        (b"traceparent", b"01" + TRACEPARENT[2:] + b"-" + b"a" * 600),
        (b"tracestate", b"rojo=1"),
        (b"baggage", b"k=v"),
    ],
    "malformed-tracestate": [
        (b"traceparent", TRACEPARENT),
        (b"TraceState", b"congo=1,Evil=" + b"Z" * 100),
        (b"tracestate", b"rojo=2"),
        (b"x-fail", b"1"),  # (the app fails)
    ],
}
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


@pytest.mark.parametrize("http", ["h11", "httptools"])
@pytest.mark.parametrize("case", list(SENT))
def test_the_app_sees_the_request_headers_as_sent_and_the_http_span_the_callers_context(case: str, http: str) -> None:
    sent = SENT[case]
    names = {name.lower() for name, _ in sent}
    seen: list[tuple[list[tuple[bytes, bytes]], dict[str, object]]] = []
    after: list[tuple[bool, list[str]]] = []
    app_keys: list[list[str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((list(scope["headers"]), dict(baggage.get_all())))
        app_keys.append(sorted(scope))
        await request_body(receive)
        if (b"x-fail", b"1") in scope["headers"]:
            raise RuntimeError("the app failed")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(COMPLETION).encode()})

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with isolated_env({"LLM_TELEMETRY_TRACING_HTTP_SPAN": "true"}):
        middleware = LLMTelemetryMiddleware(app, metrics_port=0, tracer_provider=provider)
        middleware.telemetry  # noqa: B018 - built while the environment is in place

    async def around(scope: Any, receive: Any, send: Any) -> None:
        # An app around the middleware, which reads the scope after it (as an access log does).
        headers = scope.get("headers")
        before = list(headers or ())
        try:
            await middleware(scope, receive, send)
        finally:
            if scope["type"] == "http":
                after.append((scope["headers"] is headers and scope["headers"] == before, sorted(scope)))

    try:
        with serve(around, http=http) as base, httpx.Client(base_url=base) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            reply = client.post("/v1/chat/completions", json=body, headers=sent)
    finally:
        middleware.telemetry.shutdown()
        provider.shutdown()
    assert reply.status_code == (500 if case == "malformed-tracestate" else 200)
    [(headers, app_baggage)] = seen
    assert [header for header in headers if header[0] in names] == [(name.lower(), value) for name, value in sent]
    [(same_headers, keys)] = after
    assert same_headers
    # (Nor does the key the request's own headers waited under stay in the scope, for the app or after it.)
    assert not [key for key in [*keys, *app_keys[0]] if key.startswith("llm_telemetry.sent")]
    # What OpenTelemetry's own extraction reads from the headers as sent (its warnings included).
    expected = propagate.extract({"headers": headers}, context=Context(), getter=asgi_getter)
    [http_span] = [span for span in exporter.get_finished_spans() if span.kind is trace.SpanKind.SERVER]
    parent = trace.get_current_span(expected).get_span_context()
    assert http_span.parent == (parent if parent.is_valid else None)
    if parent.is_valid:
        assert dict(http_span.parent.trace_state) == dict(parent.trace_state)
    assert app_baggage == dict(baggage.get_all(expected))
