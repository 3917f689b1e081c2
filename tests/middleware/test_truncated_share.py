"""The dashboard's share of answers cut short, read from what the official SDKs receive through the middleware.

Every stop reason the providers give for an answer cut at a token limit (the answer's own, or the model's context
window) must fall in the "Truncated response ratio by model" panel; every other must not. Answers typed by the
SDKs' own models are served under real uvicorn with the middleware added as a user adds it, read by the official
SDKs, and the real scrape's ``llm_finish_reasons_total`` is handed to Prometheus's engine (promtool's rule unit
tests) with the panel's query.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.monitoring.dashboards import build_dashboard
from support import Metrics, free_port, serve, settled

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")

_CLAUDE_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
#: Model name -> (whether streamed, the answer's stop reason): each model answers twice, once with its stop reason
#: and once ending its turn, so that each model's share is 1/2 when its reason is a cut and 0 when it is not.
CLAUDE = {
    "claude-window": (True, "model_context_window_exceeded"),  # the context window filled up mid-answer
    "claude-window-json": (False, "model_context_window_exceeded"),
    "claude-max": (True, "max_tokens"),
    "claude-paused": (True, "pause_turn"),  # a server tool's long turn paused: not cut short
    "claude-refused": (False, "refusal"),
}


def _claude_message(model: str, stop: str) -> dict[str, Any]:
    return Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "stop_reason": stop,
            "stop_sequence": None,
            "content": [{"type": "text", "text": "Some answer"}],
            "usage": {"input_tokens": 10, "output_tokens": 3},
        }
    ).model_dump(mode="json", exclude_unset=True)


def _claude_stream(model: str, stop: str) -> list[bytes]:
    start = _claude_message(model, stop) | {
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 10, "output_tokens": 1},
    }
    events = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Some"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " answer"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"},
    ]
    out = []
    for event in events:
        data = _CLAUDE_EVENT.validate_python(event).model_dump(mode="json", exclude_unset=True)
        out.append(f"event: {event['type']}\ndata: {json.dumps(data)}\n\n".encode())
    return out


def _chat(model: str, finish: str) -> dict[str, Any]:
    return ChatCompletion.model_validate(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": "Some answer"}}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        }
    ).model_dump(mode="json", exclude_unset=True)


def _responses(model: str, incomplete: str | None) -> dict[str, Any]:
    return Response.model_validate(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": model,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "output": [
                {
                    "type": "message",
                    "id": "m1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Some answer", "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": 3,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 13,
            },
        }
    ).model_dump(mode="json", exclude_unset=True)


async def _events(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


async def answer(request: Request) -> HTTPResponse:
    body = await request.json()
    model, cut = body["model"], request.headers.get("x-cut") == "yes"
    if request.url.path.endswith("/messages"):
        _, stop = CLAUDE[model]
        stop = stop if cut else "end_turn"
        if body.get("stream"):
            return StreamingResponse(_events(_claude_stream(model, stop)), media_type="text/event-stream")
        return JSONResponse(_claude_message(model, stop))
    if request.url.path.endswith("/responses"):
        return JSONResponse(_responses(model, "max_output_tokens" if cut else None))
    return JSONResponse(_chat(model, "length" if cut else "stop"))


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, int]]:
    port = free_port()
    paths = ("/v1/chat/completions", "/v1/responses", "/v1/messages")
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route(path, answer, methods=["POST"]) for path in paths]),
        metrics_port=port,
        metrics_host="127.0.0.1",
    )
    with serve(app) as base:
        yield base, port
    if app._telemetry is not None:
        app._telemetry.shutdown()


def _panel_query() -> str:
    (panel,) = [p for p in build_dashboard()["panels"] if p.get("title") == "Truncated response ratio by model"]
    (target,) = panel["targets"]
    expr: str = target["expr"]  # Grafana's variables as it sends them for "All"
    return (
        expr.replace("$__rate_interval", "2m")
        .replace('=~"$namespace"', '=~".*"')
        .replace('=~"$job"', '=~".*"')
        .replace('=~"$endpoint"', '=~".*"')
        .replace('=~"$model"', '=~".*"')
        .replace('=~"$llm_metadata_tenant"', '=~".*"')
    )


def test_answers_cut_by_the_context_window_are_truncated_answers(service: tuple[str, int], tmp_path: Path) -> None:
    base, port = service
    claude = anthropic.Anthropic(base_url=base, api_key="test", max_retries=0)
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="test", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    for model, (streamed, stop) in CLAUDE.items():
        for cut in ("yes", "no"):
            asked: dict[str, Any] = {
                "model": model,
                "max_tokens": 9,
                "messages": messages,
                "extra_headers": {"x-cut": cut},
            }
            if streamed:
                with claude.messages.stream(**asked) as stream:
                    got = stream.get_final_message().stop_reason
            else:
                got = claude.messages.create(**asked).stop_reason
            assert got == (stop if cut == "yes" else "end_turn")
    for cut in ("yes", "no"):
        chat = oai.chat.completions.create(model="gpt-chat", messages=messages, extra_headers={"x-cut": cut})
        assert chat.choices[0].finish_reason == ("length" if cut == "yes" else "stop")
        response = oai.responses.create(model="gpt-responses", input="hi", extra_headers={"x-cut": cut})
        assert response.status == ("incomplete" if cut == "yes" else "completed")

    models = [*CLAUDE, "gpt-chat", "gpt-responses"]

    def recorded(m: Metrics) -> None:
        for model in models:
            assert m.value("llm_finish_reasons_total", gen_ai_request_model=model) == 2, model

    metrics = settled(port, recorded)
    scrape = 'namespace="llm",job="chat",endpoint="llm-metrics"'
    series = []
    for sample in metrics.samples:
        if sample.name == "llm_finish_reasons_total":
            labels = ",".join([scrape, *(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))])
            series.append({"series": f"llm_finish_reasons_total{{{labels}}}", "values": f"0+{sample.value:g}x10"})
    # The ground truth, by hand: the answers cut at the answer's limit or at the model's context window are half of
    # each such model's answers; a paused turn and a refusal are answers the model did not cut.
    expected = {
        "claude-window": 0.5,
        "claude-window-json": 0.5,
        "claude-max": 0.5,
        "claude-paused": 0,
        "claude-refused": 0,
        "gpt-chat": 0.5,
        "gpt-responses": 0.5,
    }
    test = {
        "expr": _panel_query(),
        "eval_time": "10m",
        "exp_samples": [{"labels": f'{{gen_ai_request_model="{m}"}}', "value": v} for m, v in expected.items()],
    }
    path = tmp_path / "truncated.yaml"
    path.write_text(yaml.safe_dump({"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [test]}]}))
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
