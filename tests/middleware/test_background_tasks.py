"""A call is recorded when its answer is whole, not when the app returns: Starlette and FastAPI run an answer's
background tasks (``BackgroundTasks``, ``StreamingResponse(background=...)``) after its last byte, inside the app's
ASGI call, for as long as they take."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi import Request as FastAPIRequest
from starlette.responses import JSONResponse, StreamingResponse

from llm_telemetry import LLMTelemetryMiddleware
from support import Metrics, free_port, request_log_lines, scrape, serve, settled, wait_for, whole_after

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _chunk(model: str, delta: dict[str, Any], finish: str | None, usage: Any = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": choices}
    if usage:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _stream(model: str) -> AsyncIterator[bytes]:
    yield _chunk(model, {"role": "assistant", "content": ""}, None)
    yield _chunk(model, {"content": "one "}, None)
    yield _chunk(model, {"content": "two"}, None)
    yield _chunk(model, {}, "stop")
    yield _chunk(model, {}, None, USAGE)
    yield b"data: [DONE]\n\n"


def test_an_answer_is_recorded_when_whole_while_its_background_task_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The request, its tokens, its span and its log line are there, and the request no longer active, as soon as
    the client has the whole answer, stream or JSON, while the answer's background task still waits; once the task
    ends (and fails, the second time) nothing is counted again, and the outcome stays the client's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    release = threading.Event()
    waiting = threading.Event()
    task_done = threading.Event()
    returned = threading.Event()

    def after_answer(fail: bool) -> None:
        waiting.set()
        release.wait(30)
        task_done.set()
        if fail:
            raise ConnectionError("usage database unreachable")

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: FastAPIRequest, tasks: BackgroundTasks) -> Any:
        body = await request.json()
        tasks.add_task(after_answer, body["model"] == "json-model")
        if body.get("stream"):
            return StreamingResponse(_stream(body["model"]), media_type="text/event-stream", background=tasks)
        answer = {
            "id": "c2", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"},
                         "finish_reason": "stop"}],
            "usage": USAGE,
        }  # fmt: skip
        return JSONResponse(answer, background=tasks)

    metrics_port = free_port()
    wrapped = LLMTelemetryMiddleware(
        app, metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=True, tracer_provider=provider
    )

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        try:
            await wrapped(scope, receive, send)
        finally:
            if scope["type"] == "http":
                returned.set()  # the app, background task and all, has returned

    try:
        with request_log_lines() as lines, serve(outer) as base:
            for model, stream in (("stream-model", True), ("json-model", False)):
                release.clear()
                waiting.clear()
                task_done.clear()
                returned.clear()
                client = openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)
                messages: Any = [{"role": "user", "content": "hi"}]
                if stream:
                    chunks = list(
                        client.chat.completions.create(
                            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
                        )
                    )
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two"
                else:
                    answer = client.chat.completions.create(model=model, messages=messages)
                    assert answer.choices[0].message.content == "one two three"
                wait_for("the background task to start", waiting.is_set, 10)

                def recorded(metrics: Metrics, model: str = model) -> None:
                    assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 1
                    assert metrics.value("llm_requests_active") == 0

                settled(metrics_port, recorded)
                metrics = whole_after(metrics_port)
                assert not task_done.is_set() and not returned.is_set()  # the task still waits
                assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input") == 5
                assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 3
                assert metrics.value("llm_errors_total", gen_ai_request_model=model) == 0
                assert metrics.value("gen_ai_server_request_duration_seconds_count", gen_ai_request_model=model) == 1
                if stream:
                    ttft = "gen_ai_server_time_to_first_token_seconds_count"
                    assert metrics.value(ttft, gen_ai_request_model=model) == 1
                ended = [span for span in spans.get_finished_spans() if span.name == f"chat {model}"]
                assert len(ended) == 1 and ended[0].parent is None  # (the first call's context was restored)
                logged = [json.loads(line) for line in lines.getvalue().splitlines()]
                assert [(line["model"], line["status_code"], line["error_type"]) for line in logged][-1] == (
                    model,
                    200,
                    None,
                )

                release.set()
                wait_for("the app to return", returned.is_set, 10)
                metrics = scrape(metrics_port)
                assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 1
                assert metrics.value("llm_errors_total", gen_ai_request_model=model) == 0
                assert metrics.value("llm_tokens_total", gen_ai_request_model=model) == 8
                assert metrics.value("gen_ai_server_request_duration_seconds_count", gen_ai_request_model=model) == 1
                assert metrics.value("llm_requests_active") == 0
                assert len([line for line in lines.getvalue().splitlines() if model in line]) == 1
                assert len([span for span in spans.get_finished_spans() if span.name == f"chat {model}"]) == 1
    finally:
        release.set()
        wrapped.telemetry.shutdown()
        provider.shutdown()
    # The LLM span's context is restored in the request's own task, not in the streaming response's, where it was
    # not set (OpenTelemetry logs "Failed to detach context" for that).
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelno >= logging.ERROR]


def test_an_app_failure_answered_with_a_500_is_recorded_once_when_the_app_raises() -> None:
    """Around the whole FastAPI app, the middleware sees Starlette's error handler answer 500 for the app's exception
    and then raise it again: the call waits for that exception (its failure is the app's, ``app_exception``, not a
    ``server_error`` answered), and is counted once."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: FastAPIRequest) -> Any:
        await request.json()
        raise RuntimeError("the app's own failure")

    metrics_port = free_port()
    wrapped = LLMTelemetryMiddleware(app, metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False)
    try:
        with serve(wrapped) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="failing", messages=[{"role": "user", "content": "hi"}])

            def recorded(metrics: Metrics) -> None:
                assert metrics.value("llm_requests_total", gen_ai_request_model="failing") == 1

            settled(metrics_port, recorded)
            metrics = whole_after(metrics_port)
    finally:
        wrapped.telemetry.shutdown()
    assert metrics.value("llm_requests_total", gen_ai_request_model="failing") == 1
    assert metrics.value("llm_errors_total", gen_ai_request_model="failing") == 1
    assert metrics.value("llm_errors_total", gen_ai_request_model="failing", error_type="app_exception") == 1
    assert metrics.value("llm_requests_active") == 0


def test_an_upstream_5xx_passed_on_is_recorded_when_whole_while_its_background_task_still_runs() -> None:
    """A gateway passes on its upstream's 529 (Anthropic overloaded) with a background task that logs the spend: the
    error is counted as soon as the client has it, as an answer below 500 is; only a 500 waits for the app to
    return, since Starlette's error handler answers 500 and then raises the app's exception again."""
    release = threading.Event()
    waiting = threading.Event()

    def after_answer() -> None:
        waiting.set()
        release.wait(30)

    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: FastAPIRequest, tasks: BackgroundTasks) -> Any:
        await request.json()  # (the upstream's answer, here)
        tasks.add_task(after_answer)
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return JSONResponse(error, status_code=529, background=tasks)

    metrics_port = free_port()
    wrapped = LLMTelemetryMiddleware(app, metrics_port=metrics_port, metrics_host="127.0.0.1")
    try:
        with serve(wrapped) as base:
            client = anthropic.Anthropic(base_url=base, api_key="t", max_retries=0)
            with pytest.raises(anthropic.InternalServerError):
                client.messages.create(
                    model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                )
            wait_for("the background task to start", waiting.is_set, 10)

            def recorded(metrics: Metrics) -> None:
                assert metrics.value("llm_requests_total", gen_ai_request_model="claude-sonnet-4-5") == 1
                assert metrics.value("llm_errors_total", error_type="server_error") == 1
                assert metrics.value("llm_requests_active") == 0

            settled(metrics_port, recorded)
            assert waiting.is_set() and not release.is_set()  # (the task still waits)
    finally:
        release.set()
        wrapped.telemetry.shutdown()
