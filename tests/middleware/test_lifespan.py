"""The server's lifespan. A server that is stopped (a rollout, a scale-down: SIGTERM) exports what it still holds: the
spans and OTLP log records queued for the next batch reach the collector before the process ends. And a lifespan
after one that ended (a test client entered again) finds everything set up again.

The batch processors keep their default delays (5 s for spans, 1 s for log records), so every record of these
requests is still queued when SIGTERM arrives. uvicorn ends the process by raising SIGTERM again after its
shutdown, so no exit handler of the OpenTelemetry SDK runs: only the middleware's flush at lifespan shutdown
saves them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from llm_telemetry.demo.app import create_app
from llm_telemetry.telemetry import SHUTDOWN_SECONDS
from otlp_receiver import otlp_receiver
from support import free_port, request_log_lines, scrape, wait_for

REQUESTS = 3


@dataclass
class Stopped:
    took: float  # seconds from the signal to the process's exit
    returncode: int
    stderr: str


def _serve_and_stop(
    env: dict[str, str],
    requests: int,
    stop: signal.Signals,
    tmp_path: Path,
    pause: float = 0,
    app: str | None = None,
    paths: tuple[str, ...] = ("/v1/chat/completions",),
) -> Stopped:
    """The demo (or the ``app`` of this module source) under uvicorn with ``env`` added to a clean environment:
    ``requests`` chat requests on each of ``paths``, ``pause`` seconds, then ``stop``; how the stop went."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    command = [sys.executable, "-m", "uvicorn", "--factory", "llm_telemetry.demo.app:create_app"]
    if app is not None:
        (tmp_path / "stopped_app.py").write_text(app)
        clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), clean.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "uvicorn", "stopped_app:app"]
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env={**clean, "LLM_TELEMETRY_METRICS_PORT": "0", **env},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("the server", lambda: _up(base), seconds=30)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(requests):
            for path in paths:
                assert httpx.post(base + path, json=body, timeout=10).status_code == 200
        time.sleep(pause)
        stopped = time.monotonic()
        server.send_signal(stop)
        server.wait(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    return Stopped(took, server.returncode, log.read_text(errors="replace"))


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_queued_spans_and_log_records_are_exported_when_the_server_is_stopped(protocol: str, tmp_path: Path) -> None:
    with otlp_receiver() as receiver:
        endpoint = receiver.http_endpoint if protocol == "http/protobuf" else receiver.grpc_endpoint
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_LOGS_EXPORTER": "otlp",
            "OTEL_SERVICE_NAME": "stopped",
        }
        stopped = _serve_and_stop(env, REQUESTS, signal.SIGTERM, tmp_path)
        flushed = receiver.wait_for(lambda r: len(r.spans) >= REQUESTS and len(r.logs) >= REQUESTS, timeout=5)
        assert flushed, stopped.stderr
    assert len(receiver.spans) == REQUESTS and len(receiver.logs) == REQUESTS
    assert {span.name for span in receiver.spans} == {"chat gpt-4o-mini"}
    assert stopped.took < 5, stopped.took  # flushed at once, not after the batch delay


def test_a_collector_that_never_answers_holds_the_stop_up_for_the_bound_only(tmp_path: Path) -> None:
    """The collector accepts connections and never answers, and the batch processors are busy exporting to it when
    the server is stopped (SIGINT: uvicorn then returns from ``main`` and the interpreter exits normally, running
    exit handlers). The stop waits SHUTDOWN_SECONDS for the flush, and no more: the exporters' own timeouts would
    each add their 10 s, past the 30 s a Kubernetes pod gets before SIGKILL."""
    with socket.socket() as blackhole:  # listening, never accepting: connections complete, nothing is answered
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{blackhole.getsockname()[1]}",
            "OTEL_LOGS_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_BLRP_SCHEDULE_DELAY": "100",
        }
        # After the requests, the span and log record processors are each waiting on an export.
        stopped = _serve_and_stop(env, 20, signal.SIGINT, tmp_path, pause=1)
    assert stopped.took < SHUTDOWN_SECONDS + 5, (stopped.took, stopped.stderr)


MOUNTED = """
from contextlib import asynccontextmanager
from starlette.applications import Starlette
from starlette.routing import Mount
from llm_telemetry import LLMTelemetryMiddleware, shutdown
from llm_telemetry.demo.app import bare_app

@asynccontextmanager
async def lifespan(app):
    yield
    await shutdown()

app = Starlette(
    routes=[Mount("/a", LLMTelemetryMiddleware(bare_app())), Mount("/b", LLMTelemetryMiddleware(bare_app()))],
    lifespan=lifespan,
)
"""

LITESTAR = """
from litestar import Litestar, Request, post
from litestar.middleware import DefineMiddleware
from llm_telemetry import LLMTelemetryMiddleware, shutdown

@post("/v1/chat/completions", status_code=200)
async def chat(request: Request) -> dict:
    body = await request.json()
    message = {"role": "assistant", "content": "hi"}
    return {"id": "c1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}

app = Litestar([chat], middleware=[DefineMiddleware(LLMTelemetryMiddleware)], on_shutdown=[shutdown])
"""


@pytest.mark.parametrize(
    ("app", "paths"),
    [(MOUNTED, ("/a/v1/chat/completions", "/b/v1/chat/completions")), (LITESTAR, ("/v1/chat/completions",))],
    ids=["mounted-sub-apps", "litestar-define-middleware"],
)
def test_instances_the_lifespan_never_reaches_are_flushed_by_the_apps_own_shutdown(
    app: str, paths: tuple[str, ...], tmp_path: Path
) -> None:
    """Servers pass the lifespan to the app, and neither Starlette's router (to mounted sub-apps) nor Litestar (to
    route handlers' middleware) passes it on: the app's own shutdown calls ``llm_telemetry.shutdown()``, which
    exports what every instance still holds."""
    with otlp_receiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_LOGS_EXPORTER": "otlp",
            # The instances share one pipeline, as they do on a metrics port (README.md).
            "LLM_TELEMETRY_METRICS_PORT": str(free_port()),
            "LLM_TELEMETRY_METRICS_HOST": "127.0.0.1",
        }
        stopped = _serve_and_stop(env, REQUESTS, signal.SIGTERM, tmp_path, app=app, paths=paths)
        expected = REQUESTS * len(paths)
        flushed = receiver.wait_for(lambda r: len(r.spans) >= expected and len(r.logs) >= expected, timeout=5)
        assert flushed, (len(receiver.spans), len(receiver.logs), stopped.stderr)
    assert len(receiver.spans) == expected and len(receiver.logs) == expected
    assert stopped.took < 5, stopped.took  # flushed at once, not after the batch delay


def test_a_traces_endpoint_that_never_answers_does_not_hold_back_the_last_metrics_and_log_records(
    tmp_path: Path,
) -> None:
    """Traces go to a socket that takes connections and never answers; metrics and log records go to a collector
    that works. At the stop, the span flush waits on its silent endpoint, and the final OTLP metrics push and the
    queued log records reach theirs all the same, within the bound."""
    with socket.socket() as blackhole, otlp_receiver() as receiver:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        env = {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{blackhole.getsockname()[1]}/v1/traces",
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.http_endpoint + "/v1/logs",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.http_endpoint + "/v1/metrics",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "60",  # the span export outwaits the whole bound
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_LOGS_EXPORTER": "otlp",
            "LLM_TELEMETRY_METRICS_EXPORTER": "otlp",
        }
        stopped = _serve_and_stop(env, REQUESTS, signal.SIGTERM, tmp_path)
        arrived = receiver.wait_for(lambda r: r.metric_exports >= 1 and len(r.logs) >= REQUESTS, timeout=5)
        assert arrived, (receiver.metric_exports, len(receiver.logs), stopped.stderr)
    assert len(receiver.logs) == REQUESTS and receiver.spans == []
    assert stopped.took < SHUTDOWN_SECONDS + 3, (stopped.took, stopped.stderr)


CUT_APP = """
import anyio
from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import bare_app

inner = bare_app(token_delay=1.0, reply_words=30)

async def closing(scope, receive, send):
    try:
        await inner(scope, receive, send)
    finally:
        if scope["type"] == "http":
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.3)  # as an app closing its upstream stream when cut

app = LLMTelemetryMiddleware(closing)
"""


@pytest.mark.parametrize("otlp", [True, False], ids=["otlp", "stdout-only"])
def test_a_stream_the_server_cuts_at_its_graceful_timeout_is_recorded_before_the_exporters_stop(
    otlp: bool, tmp_path: Path
) -> None:
    """uvicorn's ``--timeout-graceful-shutdown`` cancels the streams still running and goes straight on to the
    lifespan shutdown: the cut stream ends after that began (here 0.3 s after, the app closing what it streamed
    from). Its span, its JSON line (on stdout, as every line) and its OTLP log record all get out; none of its line
    falls to logging's plain-text stderr."""
    (tmp_path / "slow_app.py").write_text(CUT_APP)
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    path = os.pathsep.join(filter(None, [str(tmp_path), clean.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "uvicorn", "slow_app:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--timeout-graceful-shutdown", "1", "--log-level", "warning"]
    with otlp_receiver() as receiver:
        env = {
            **clean,
            "PYTHONPATH": path,
            "LLM_TELEMETRY_METRICS_PORT": "0",
            **(
                {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "OTEL_LOGS_EXPORTER": "otlp"}
                if otlp
                else {"OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
            ),
        }
        stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            server = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for("the server", lambda: _up(base), seconds=30)
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            with httpx.Client(timeout=30) as client, client.stream("POST", base + "/v1/chat/completions", json=body):
                time.sleep(0.5)  # the stream is under way: 30 words, one a second
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=10)
        if otlp:
            receiver.wait_for(lambda r: r.spans and r.logs, timeout=5)
    lines = [json.loads(line) for line in stdout.read_text().splitlines() if line.startswith("{")]
    assert [line["error_type"] for line in lines] == ["client_disconnect"], (stdout.read_text(), stderr.read_text())
    assert "chat gpt-4o-mini" not in stderr.read_text()
    assert [span.name for span in receiver.spans] == (["chat gpt-4o-mini"] if otlp else [])
    assert len(receiver.logs) == (1 if otlp else 0)


def _up(base: str) -> bool:
    try:
        httpx.get(base + "/", timeout=1)
    except httpx.TransportError:
        return False
    return True


def test_a_lifespan_after_one_that_ended_finds_metrics_and_logs_set_up_again() -> None:
    """A test client entered once per test around one app (a module-level app, the usual fixture) runs one lifespan
    per test: each finds the metrics port serving and the request logged, as the first did."""
    port = free_port()
    app = create_app(metrics_port=port, metrics_host="127.0.0.1")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for cycle in range(3):
        with TestClient(app) as client, request_log_lines() as lines:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert scrape(port).value("llm_requests_total", gen_ai_request_model="gpt-4o-mini") == 1, cycle
            assert len(lines.getvalue().splitlines()) == 1, cycle
    app.telemetry.shutdown()


async def test_a_request_while_shutdown_drains_leaves_the_instance_working_after_it() -> None:
    """``llm_telemetry.shutdown()`` waits for a stream in flight; a request arriving meanwhile set the instance up
    again on the pipeline being shut down (its listener not closed yet, so shared), and the instance stayed on it,
    closed: its metrics port gone and every later request counted nowhere."""
    import asyncio

    from llm_telemetry import LLMTelemetryMiddleware, shutdown
    from llm_telemetry.demo.app import bare_app

    port = free_port()
    app = LLMTelemetryMiddleware(
        bare_app(token_delay=0.05, reply_words=12), metrics_port=port, metrics_host="127.0.0.1", request_logs=False
    )
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:
        await client.post("/v1/chat/completions", json=body)
        stream = asyncio.create_task(client.post("/v1/chat/completions", json={**body, "stream": True}))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(shutdown())
        await asyncio.sleep(0.1)  # (shutdown() waits for the stream)
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        await stream
        await stopping
        for _ in range(3):
            await client.post("/v1/chat/completions", json=body)
        metrics = await asyncio.to_thread(scrape, port)
    try:
        assert metrics.value("llm_requests_total") == 3  # (the requests since: a new pipeline)
    finally:
        await shutdown()


async def test_the_servers_stop_closes_the_pipeline_set_up_after_a_shutdown_call() -> None:
    """After ``llm_telemetry.shutdown()`` mid-run the instance sets up a new pipeline at its next request; the
    server's lifespan shutdown flushed only the one it started with: the new one's metrics port stayed open and what
    it held was never exported at the stop."""
    import asyncio

    from llm_telemetry import LLMTelemetryMiddleware, shutdown
    from llm_telemetry.demo.app import bare_app

    port = free_port()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=port, metrics_host="127.0.0.1", request_logs=False)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        await client.post("/v1/chat/completions", json=body)
        await shutdown()
        await client.post("/v1/chat/completions", json=body)
        assert (await asyncio.to_thread(scrape, port)).value("llm_requests_total") == 1
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
    await lifespan
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the listener closed with the pipeline
