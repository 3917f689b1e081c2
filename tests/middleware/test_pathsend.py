"""Answers a server sends from a file (ASGI's ``http.response.pathsend``): Starlette's FileResponse uses it under a
server offering the extension, as Granian does (uvicorn does not), so a completion served from a cache file reached
the client whole and was recorded with no tokens and no model. Served by Granian, in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from support import Metrics, free_port, settled, whole_after

APP = """
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware

HERE = os.path.dirname(os.path.abspath(__file__))


async def chat(request: Request):
    body = await request.json()  # (a cache finds its answer by the request)
    if body["model"] == "gpt-stream-file":  # a recorded stream, labelled as FileResponse labels an unknown type
        return FileResponse(os.path.join(HERE, "stream.txt"), media_type="text/plain")
    name = "large.json" if body["model"] == "gpt-large" else "cached.json"
    return FileResponse(os.path.join(HERE, name), media_type="application/json")


async def healthz(request: Request):
    return JSONResponse({"ok": True})


app = LLMTelemetryMiddleware(
    Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/healthz", healthz)]),
    metrics_port=int(os.environ["PATHSEND_METRICS_PORT"]),
    metrics_host="127.0.0.1",
    request_logs=False,
)
"""

USAGE = {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}


@pytest.fixture(scope="module")
def granian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    import urllib.error
    import urllib.request

    from support import wait_for

    directory: Path = tmp_path_factory.mktemp("pathsend")
    (directory / "pathsend_app.py").write_text(textwrap.dedent(APP))
    answer = {
        "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-cached-2024",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the cache"},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    }  # fmt: skip
    (directory / "cached.json").write_text(json.dumps(answer))
    # Larger than the reader reads (8 MiB): its usage, last, is read from the file's last bytes.
    large = {
        **answer,
        "choices": [{**answer["choices"][0], "message": {"role": "assistant", "content": "x" * (9 << 20)}}],
    }
    (directory / "large.json").write_text(json.dumps(large))
    # A recorded stream larger than a JSON answer's read limit: its end lies past what is read of it.
    delta = {"id": "c3", "object": "chat.completion.chunk", "created": 1, "model": "gpt-stream-file"}
    event = "data: " + json.dumps({**delta, "choices": [{"index": 0, "delta": {"content": "x" * 200}}]}) + "\n\n"
    end = {**delta, "choices": [], "usage": USAGE}
    (directory / "stream.txt").write_text(event * ((9 << 20) // len(event)) + f"data: {json.dumps(end)}\n\n")
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(directory), env.get("PYTHONPATH", "")]))
    env["PATHSEND_METRICS_PORT"] = str(metrics_port)
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "pathsend_app:app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    process = subprocess.Popen(command, cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"granian exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True

    try:
        wait_for("granian to serve", ready, 30)
        yield f"http://127.0.0.1:{port}", metrics_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_an_answer_sent_from_a_file_is_read(granian: tuple[str, int]) -> None:
    """A cached completion sent by Granian from its file: recorded with the usage, response model and finish reason
    in it, as the same answer sent as body messages is; and one larger than the reader reads, with its usage."""
    base, metrics_port = granian
    client = openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)
    for model in ("gpt-cached", "gpt-large"):
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].finish_reason == "stop" and answer.usage is not None

    def recorded(metrics: Metrics) -> None:  # (the module's other test shares the server)
        for model in ("gpt-cached", "gpt-large"):
            assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 1

    settled(metrics_port, recorded)
    metrics = whole_after(metrics_port)
    responded = metrics.value(
        "llm_requests_total", gen_ai_request_model="gpt-cached", gen_ai_response_model="gpt-cached-2024"
    )
    assert responded == 1
    for model in ("gpt-cached", "gpt-large"):  # (past the read limit only its usage is read, as of a body)
        assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input") == 11
        assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 8
        assert metrics.value("llm_errors_total", gen_ai_request_model=model) == 0
    finish = metrics.value("llm_finish_reasons_total", gen_ai_request_model="gpt-cached", llm_finish_reason="stop")
    assert finish == 1
    assert metrics.value("llm_requests_active") == 0


def test_a_stream_sent_from_a_file_past_the_read_limit_is_no_error(granian: tuple[str, int]) -> None:
    """A recorded stream served from a file labelled text/plain (FileResponse's label for an unknown type) is known
    for a stream only from its first bytes, once read as a JSON answer's head: its middle is not read, so its end is
    unknown (its output estimated from what was read), not missing, which would count an incomplete_stream error."""
    import httpx

    base, metrics_port = granian
    body = {"model": "gpt-stream-file", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    answer = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200 and answer.content.endswith(b"\n\n")

    def recorded(metrics: Metrics) -> None:
        assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-stream-file") == 1

    metrics = settled(metrics_port, recorded)
    assert metrics.value("llm_errors_total", gen_ai_request_model="gpt-stream-file") == 0
    assert metrics.value("llm_requests_active") == 0


def test_a_large_stream_sent_from_a_file_is_read_in_pieces_to_its_usage(tmp_path: Path) -> None:
    """A recorded stream of 40 MiB sent from its file (the server offers ``pathsend``): read a piece at a time, each
    piece read before the next is, so the file is never held whole, and read to its end, where its usage is (read
    whole, its reading stopped at the CPU time one chunk may take, and the usage was lost)."""
    import asyncio
    import tracemalloc

    from llm_telemetry import LLMTelemetryMiddleware

    delta = {"id": "c4", "object": "chat.completion.chunk", "created": 1, "model": "gpt-big-file"}
    # (Long events: few of them to read, so that reading a piece stays far below the CPU time one may take.)
    event = "data: " + json.dumps({**delta, "choices": [{"index": 0, "delta": {"content": "y" * 32000}}]}) + "\n\n"
    end = {**delta, "choices": [], "usage": USAGE}
    path = tmp_path / "big-stream.txt"
    path.write_text(event * ((40 << 20) // len(event)) + f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.pathsend", "path": str(path)})

    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, metrics_app_path="/metrics", request_logs=False)

    async def call(method: str, target: str, body: bytes) -> bytes:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": target, "raw_path": target.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "extensions": {"http.response.pathsend": {}}}  # fmt: skip
        received = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[bytes] = []

        async def receive() -> dict[str, Any]:
            return received.pop() if received else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message.get("body", b""))

        await wrapped(scope, receive, send)
        return b"".join(sent)

    request = json.dumps({"model": "gpt-big-file", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    asyncio.run(call("POST", "/v1/chat/completions", request.encode()))
    metrics = Metrics(asyncio.run(call("GET", "/metrics", b"")).decode())
    assert metrics.value("llm_tokens_total", gen_ai_request_model="gpt-big-file", gen_ai_token_type="output") == 8
    assert metrics.value("llm_errors_total", gen_ai_request_model="gpt-big-file") == 0
    # The same answer again, its memory traced (tracing slows the reading: only the memory is looked at here).
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        asyncio.run(call("POST", "/v1/chat/completions", request.encode()))
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # the file is 40 MiB
