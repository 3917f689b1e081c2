"""One line in Starlette, FastAPI and Litestar (a non-Starlette ASGI framework) gives the same metrics."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from litestar import Litestar, post
from litestar import Request as LitestarRequest
from litestar import Response as LitestarResponse
from litestar.middleware import DefineMiddleware
from litestar.response import Stream
from starlette.responses import JSONResponse, StreamingResponse

from llm_telemetry import LLMTelemetryMiddleware
from support import Metrics, free_port, scrape, serve

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def completion(model: str) -> dict[str, Any]:
    return {
        "id": "c1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    }  # fmt: skip


async def chunks(model: str) -> AsyncIterator[bytes]:
    for delta in ({"role": "assistant"}, {"content": "one "}, {"content": "two"}):
        obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        yield b"data: " + json.dumps(obj).encode() + b"\n\n"
    final = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}  # fmt: skip
    yield b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n"


def starlette_app(metrics_port: int) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(chunks(body["model"]), media_type="text/event-stream")
        return JSONResponse(completion(body["model"]))

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.add_middleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    return app


def fastapi_app(metrics_port: int) -> Any:
    app = FastAPI()

    @app.post("/openai/v1/chat/completions")  # a gateway prefix: matched by suffix
    async def chat(request: FastAPIRequest) -> Any:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(chunks(body["model"]), media_type="text/event-stream")
        return JSONResponse(completion(body["model"]))

    app.add_middleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    return app


def litestar_app(metrics_port: int) -> Any:
    @post("/v1/chat/completions", status_code=200)
    async def chat(request: LitestarRequest[Any, Any, Any]) -> LitestarResponse[Any] | Stream:
        body = await request.json()
        if body.get("stream"):
            return Stream(chunks(body["model"]), media_type="text/event-stream")
        return LitestarResponse(completion(body["model"]))

    middleware = DefineMiddleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    return Litestar(route_handlers=[chat], middleware=[middleware])


FRAMEWORKS: dict[str, tuple[Callable[[int], Any], str]] = {
    "starlette": (starlette_app, "/v1"),
    "fastapi": (fastapi_app, "/openai/v1"),
    "litestar": (litestar_app, "/v1"),
}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_framework_stream_and_non_stream(framework: str) -> None:
    build, prefix = FRAMEWORKS[framework]
    metrics_port = free_port()
    with serve(build(metrics_port)) as base:
        client = openai.OpenAI(base_url=base + prefix, api_key="t", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "one two three"
        streamed = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "one two"
        deadline = time.monotonic() + 5
        metrics = Metrics("")
        while time.monotonic() < deadline:
            metrics = scrape(metrics_port)
            if metrics.value("llm_requests_total") >= 2:
                break
            time.sleep(0.02)
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o-mini", llm_stream="false") == 1
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o-mini", llm_stream="true") == 1
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input") == 10
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output") == 5
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count") == 1
