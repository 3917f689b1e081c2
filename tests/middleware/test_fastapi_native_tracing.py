"""FastAPI traces requests itself (its native telemetry, on whenever it finds a tracer provider): its SERVER span
wraps the whole middleware stack, so the middleware's GenAI span is that span's INTERNAL child, as under
opentelemetry-instrumentation-asgi. ``FastAPI(telemetry={"tracing": False})`` gives the one-span shape back.
docs/tracing.md says both; these pin them, through a real uvicorn server and the openai SDK."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_telemetry import LLMTelemetryMiddleware
from support import serve

pytest.importorskip("fastapi.telemetry", reason="this FastAPI has no native telemetry")

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"


def chat_app(provider: TracerProvider, **telemetry: Any) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(telemetry={"tracer_provider": provider, **telemetry})

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        if body.get("user") == "limited":
            error = {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}
            return JSONResponse(error, status_code=429)
        message = {"role": "assistant", "content": "hello"}
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }

    app.add_middleware(LLMTelemetryMiddleware, tracer_provider=provider, metrics_port=0)
    return app


def spans_of(telemetry: dict[str, Any]) -> list[ReadableSpan]:
    """The spans of one answered and one rate-limited chat request, sent with a caller's traceparent."""
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with serve(chat_app(provider, **telemetry)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        headers = {"traceparent": TRACEPARENT}
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=[], user="limited", extra_headers=headers)
    provider.shutdown()
    return list(exporter.get_finished_spans())


def test_under_fastapis_own_server_span_the_genai_span_is_its_internal_child() -> None:
    spans = spans_of({})
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    ours = [s for s in spans if s.instrumentation_scope.name == "llm_telemetry"]
    assert [s.name for s in servers] == ["POST /v1/chat/completions"] * 2
    assert {s.instrumentation_scope.name for s in servers} == {"fastapi"}
    assert [(s.name, s.kind) for s in ours] == [("chat gpt-4o", SpanKind.INTERNAL)] * 2
    for server, span in zip(servers, ours, strict=True):
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert f"{server.context.trace_id:032x}" == CALLER_TRACE
        assert "server.address" not in (span.attributes or {})  # FastAPI's span has them
    # The rate-limited request: ERROR on the INTERNAL span (the HTTP conventions leave a 4xx unset on SERVER spans).
    assert [s.status.status_code for s in ours] == [StatusCode.UNSET, StatusCode.ERROR]
    assert (ours[1].attributes or {})["error.type"] == "rate_limit"
    assert [s.status.status_code for s in servers] == [StatusCode.UNSET, StatusCode.UNSET]


def test_with_fastapis_tracing_off_the_genai_span_is_the_server_span() -> None:
    spans = spans_of({"tracing": False})
    assert [(s.name, s.kind, s.instrumentation_scope.name) for s in spans] == [
        ("chat gpt-4o", SpanKind.SERVER, "llm_telemetry")
    ] * 2
    assert all(f"{s.context.trace_id:032x}" == CALLER_TRACE for s in spans)
    assert "server.address" in (spans[0].attributes or {})
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.UNSET]
    assert (spans[1].attributes or {})["error.type"] == "rate_limit"
