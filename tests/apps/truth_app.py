"""A scripted LLM upstream for tests/test_ground_truth.py, wrapped in the middleware, for ``uvicorn --workers N``.

Each request carries its script in the ``x-truth`` header (JSON), so the test knows every number the middleware
should see: ``api`` ("openai" or "anthropic"), ``usage`` ([input, output, cache_read, cache_creation,
reasoning]; input includes the cached parts, as the middleware counts it), ``ttft`` and ``gap`` (seconds slept
before the first token and between tokens, or before a non-stream reply), ``words`` (content chunks of a
stream), ``no_usage`` (a stream without a usage block), ``tool`` (the model calls this tool), ``finish`` (the
finish reason to send instead of the usual one) and ``fail``
(one way to fail, named after the ``error.type`` the middleware should give it). The middleware reads its
settings from ``LLM_TELEMETRY_*``; every response carries ``x-worker-pid``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware

#: status, OpenAI-style error body ``{"error": {...}}`` for each scripted HTTP failure.
FAILURES: dict[str, tuple[int, dict[str, Any]]] = {
    "rate_limit": (429, {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}),
    "context_length": (
        400,
        {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"},
    ),
    "content_filter": (400, {"message": "refused", "type": "invalid_request_error", "code": "content_filter"}),
    "auth": (
        401,
        {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"},
    ),
    "invalid_request": (400, {"message": "bad field", "type": "invalid_request_error", "code": None}),
    "not_found": (404, {"message": "no such model", "type": "invalid_request_error", "code": "model_not_found"}),
    "timeout": (504, {"message": "upstream timed out", "type": "timeout", "code": None}),
    "server_error": (500, {"message": "The server had an error", "type": "server_error", "code": None}),
}


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _openai_stream(script: dict[str, Any], model: str) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({"id": "c1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

    yield chunk({"role": "assistant", "content": ""})
    if script.get("fail") == "client_disconnect":
        await asyncio.sleep(1.0)  # the client leaves during this pause
        yield chunk({"content": "late "})
        return
    await asyncio.sleep(script.get("ttft", 0.0))
    tool = script.get("tool")
    if tool:
        yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": tool, "arguments": "{}"}}]})  # fmt: skip
    for i in range(0 if tool else script.get("words", 1)):
        if i:
            await asyncio.sleep(script.get("gap", 0.0))
        yield chunk({"content": f"w{i} "})
    if script.get("fail") == "incomplete_stream":
        return  # its upstream cut it off: no finish reason, no usage, no [DONE]
    yield chunk({}, script.get("finish") or ("tool_calls" if tool else "stop"))
    if not script.get("no_usage"):
        yield _sse({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [],
                    "usage": _openai_usage(script["usage"])})  # fmt: skip
    yield b"data: [DONE]\n\n"


def _openai_usage(usage: list[int]) -> dict[str, Any]:
    inp, out, cache_read, _, reasoning = usage
    return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
            "prompt_tokens_details": {"cached_tokens": cache_read},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}  # fmt: skip


def _anthropic_usage(usage: list[int]) -> dict[str, int]:
    inp, out, cache_read, cache_creation, _ = usage
    # Anthropic reports fresh input separately from the cached parts.
    return {"input_tokens": inp - cache_read - cache_creation, "output_tokens": out,
            "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_creation}  # fmt: skip


async def _anthropic_stream(script: dict[str, Any], model: str) -> AsyncIterator[bytes]:
    usage = _anthropic_usage(script["usage"])
    start_usage = {**usage, "output_tokens": 1}
    yield _sse({"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant",
                "model": model, "content": [], "usage": start_usage}}, "message_start")  # fmt: skip
    await asyncio.sleep(script.get("ttft", 0.0))
    tool = script.get("tool")
    if tool:
        yield _sse({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "tool_use", "id": "tu1", "name": tool, "input": {}}},
                   "content_block_start")  # fmt: skip
    else:
        yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")  # fmt: skip
        for i in range(script.get("words", 1)):
            if i:
                await asyncio.sleep(script.get("gap", 0.0))
            yield _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"w{i} "}},
                       "content_block_delta")  # fmt: skip
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    stop = script.get("finish") or ("tool_use" if tool else "end_turn")
    yield _sse({"type": "message_delta", "delta": {"stop_reason": stop},
                "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta")  # fmt: skip
    yield _sse({"type": "message_stop"}, "message_stop")


async def llm(request: Request) -> Response:
    script: dict[str, Any] = json.loads(request.headers["x-truth"])
    body = await request.json()
    model = body["model"]
    fail = script.get("fail")
    if fail == "app_exception":
        raise RuntimeError("truth app: scripted failure")
    if fail in FAILURES:
        status, error = FAILURES[fail]
        return JSONResponse({"error": error}, status_code=status)
    anthropic = script["api"] == "anthropic"
    if body.get("stream"):
        stream = _anthropic_stream(script, model) if anthropic else _openai_stream(script, model)
        return StreamingResponse(stream, media_type="text/event-stream")
    await asyncio.sleep(script.get("ttft", 0.0))
    tool = script.get("tool")
    if anthropic:
        content = (
            [{"type": "tool_use", "id": "tu1", "name": tool, "input": {}}] if tool else [{"type": "text", "text": "hi"}]
        )
        return JSONResponse({"id": "m1", "type": "message", "role": "assistant", "model": model, "content": content,
                             "stop_reason": script.get("finish") or ("tool_use" if tool else "end_turn"),
                             "usage": _anthropic_usage(script["usage"])})  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": None if tool else "hi"}
    if tool:
        message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {"name": tool, "arguments": "{}"}}]
    finish = script.get("finish") or ("tool_calls" if tool else "stop")
    return JSONResponse({"id": "c1", "object": "chat.completion", "model": model,
                         "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                         "usage": _openai_usage(script["usage"])})  # fmt: skip


async def health(request: Request) -> Response:
    return Response("ok")


_upstream = Starlette(
    routes=[
        Route("/v1/chat/completions", llm, methods=["POST"]),
        Route("/v1/messages", llm, methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
    ]
)


async def _upstream_or_give_up(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``fail: other``: the app starts a stream and returns without finishing it, raising nothing."""
    script = dict(scope.get("headers") or ()).get(b"x-truth", b"{}")
    if scope["type"] == "http" and json.loads(script).get("fail") == "other":
        while (await receive()).get("more_body"):
            pass  # read the request, as any app would: the middleware learns the model from it
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b": started\n\n", "more_body": True})
        return
    await _upstream(scope, receive, send)


_app = LLMTelemetryMiddleware(_upstream_or_give_up)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await _app(scope, receive, send)
        return
    pid = str(os.getpid()).encode()

    async def send_with_pid(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", pid)]}
        await send(message)

    await _app(scope, receive, send_with_pid)
