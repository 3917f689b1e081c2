"""llama.cpp's own server (``llama-server``, C++) behind the middleware: its streams and errors as it sends them.

The server is not Python, so the middleware wraps what a Python service in front of it would be: an ASGI app that
passes each request to the server and each chunk of its answer back as it comes (``passthrough`` below; the bytes
are the server's). The model is ``tiny_llama.write_model``'s, run greedily. The server's own usage, when a client
asks for it, is the truth the estimate is held to; its context-overflow error must read as ``context_length``.

Needs a ``llama-server`` binary: ``LLAMA_SERVER_BIN`` (a path) or ``llama-server`` on PATH (it builds from llama.cpp's
source with CMake, target ``llama-server``), plus ``numpy`` and ``gguf`` to write the model; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

SERVER = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
if not SERVER or not os.access(SERVER, os.X_OK):
    pytest.skip("no llama-server: set LLAMA_SERVER_BIN, or put `llama-server` on PATH", allow_module_level=True)
pytest.importorskip("gguf", reason="needs the gguf package to write the test's model")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from llm_telemetry import LLMTelemetryMiddleware  # noqa: E402
from support import free_port, request_body, scrape, serve, stop_process, wait_for  # noqa: E402
from tiny_llama import CONTEXT, write_model  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "tiny"
PROMPTS = ("hello world", "naïve time", "数据 über", "ok yes no")


def passthrough(upstream: str) -> Any:
    """An ASGI app that forwards each request to ``upstream`` and streams its answer back unchanged."""
    client = httpx.AsyncClient(base_url=upstream, timeout=60)
    hop = {"content-length", "transfer-encoding", "connection", "keep-alive"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await request_body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        request = client.build_request(scope["method"], scope["path"], content=body, headers=headers)
        response = await client.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower().decode() not in hop]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    """(an openai client of the wrapped passthrough, its metrics port), llama-server running behind it."""
    work = tmp_path_factory.mktemp("llama-server")
    model = work / "tiny.gguf"
    write_model(model)
    port = free_port()
    log = (work / "server.log").open("wb")
    argv = [str(SERVER), "-m", str(model), "-a", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(CONTEXT), "-t", "1", "--no-webui"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    upstream = f"http://127.0.0.1:{port}"
    try:
        wait_for("llama-server healthy", lambda: httpx.get(f"{upstream}/health", timeout=5).status_code == 200)
        metrics_port = free_port()
        app = LLMTelemetryMiddleware(
            passthrough(upstream), metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False
        )
        with serve(app) as base:
            yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), metrics_port
    finally:
        stop_process(process)
        log.close()
        print((work / "server.log").read_text(errors="replace")[-2000:])  # shown when a test fails


def test_its_streams_and_errors_are_read_as_it_sends_them(gateway: tuple[Any, int]) -> None:
    client, port = gateway
    before = scrape(port)
    truth = estimated_deltas = 0
    for prompt in PROMPTS:
        request = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                   "temperature": 0}  # fmt: skip
        asked = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        (usage,) = [chunk.usage for chunk in asked if chunk.usage]
        truth += usage.completion_tokens
        estimated_deltas += sum(
            1
            for chunk in client.chat.completions.create(**request, stream=True)
            for choice in chunk.choices
            if choice.delta.content is not None
        )
    with pytest.raises(openai.BadRequestError, match="context size"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * CONTEXT}])

    requests = 2 * len(PROMPTS) + 1

    def recorded() -> Any:
        metrics = scrape(port)
        return metrics.value("llm_requests_total") - before.value("llm_requests_total") == requests and metrics

    metrics = wait_for(f"{requests} requests recorded", recorded, seconds=30)

    def added(name: str, **labels: str) -> float:
        return metrics.value(name, **labels) - before.value(name, **labels)

    output = {"gen_ai_token_type": "output", "gen_ai_response_model": MODEL}
    assert added("llm_tokens_total", llm_usage_source="reported", **output) == truth
    # Without the usage: a delta a token. This server sends one delta for the tokens of a character that takes
    # several, so the estimate may fall short of its count, by as many.
    estimated = added("llm_tokens_total", llm_usage_source="estimated", **output)
    assert estimated == estimated_deltas and 0.7 * truth <= estimated <= truth, (estimated, truth)
    assert added("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=MODEL) == 2 * len(PROMPTS)
    assert added("llm_errors_total", error_type="context_length") == added("llm_errors_total") == 1
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
