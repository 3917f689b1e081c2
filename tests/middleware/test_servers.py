"""The middleware under ASGI servers other than uvicorn, as users deploy it: Hypercorn (pure Python; its asyncio and
trio workers) and Granian (a Rust server whose ``send`` has no Python frame). Each serves the demo app bare and
wrapped, in its own process; the client gets the same bytes from both, over HTTP/1.1 and HTTP/2, the numbers come
out right, and a client that leaves mid-stream is a client disconnect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import anyio
import httpx
import openai
import pytest

from llm_telemetry import LLMTelemetryMiddleware
from support import Calls, free_port, scrape, serve, wait_for

APPS = """
import os

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import bare_app, create_app

bare = bare_app(token_delay=float(os.environ["DEMO_TOKEN_DELAY"]))
wrapped = create_app(
    metrics_port=int(os.environ["DEMO_METRICS_PORT"]),
    metrics_host="127.0.0.1",
    token_delay=float(os.environ["DEMO_TOKEN_DELAY"]),
    request_logs=False,
)


async def _exact(scope, receive, send):
    # Reads the request body up to its Content-Length and no further, as Falcon does: Hypercorn and Granian send
    # the body, then an empty closing message this app never asks for.
    if scope["type"] == "lifespan":  # (Hypercorn's trio worker fails to start an app that ignores it)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    length = int(dict(scope["headers"]).get(b"content-length", b"0"))
    got = b""
    while len(got) < length:
        got += (await receive()).get("body", b"")
    answer = (b'{"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini-2024", "choices": [{"index": 0, '
              b'"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], '
              b'"usage": {"prompt_tokens": 3, "completion_tokens": 1}}')
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


exact = LLMTelemetryMiddleware(
    _exact, metrics_port=int(os.environ["DEMO_EXACT_METRICS_PORT"]), metrics_host="127.0.0.1", request_logs=False
)
"""


def _command(server: str, app: str, port: int) -> list[str]:
    if server.startswith("hypercorn"):
        worker = ["--worker-class", "trio"] if server == "hypercorn-trio" else []
        return [sys.executable, "-m", "hypercorn", *worker, f"apps:{app}", "--bind", f"127.0.0.1:{port}"]
    return [sys.executable, "-m", "granian", "--interface", "asgi", f"apps:{app}", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]  # fmt: skip


def _wait(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


@pytest.fixture(scope="module", params=["hypercorn", "hypercorn-trio", "granian"])
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Base ports of the bare and the wrapped demo app under one server, and the wrapped one's metrics port."""
    server = request.param
    directory = tmp_path_factory.mktemp(server)
    (directory / "apps.py").write_text(textwrap.dedent(APPS))
    ports = {"bare": free_port(), "wrapped": free_port(), "metrics": free_port(), "exact": free_port(),
             "exact_metrics": free_port()}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(directory), "DEMO_METRICS_PORT": str(ports["metrics"]),
           "DEMO_EXACT_METRICS_PORT": str(ports["exact_metrics"]), "DEMO_TOKEN_DELAY": "0.02"}  # fmt: skip
    env = {k: v for k, v in env.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    processes = []
    try:
        for app in ("bare", "wrapped", "exact"):
            process = subprocess.Popen(
                _command(server, app, ports[app]), cwd=directory, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            processes.append(process)
            _wait(ports[app], process)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


#: What differs between two answers of the demo by design: ids and times made from the clock.
_CLOCK = re.compile(rb'"(?:created|id)":\s*"?[A-Za-z0-9_-]*"?')

REQUESTS = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 64, "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": "not a list"}),
]  # fmt: skip


def _answer(port: int, path: str, body: dict[str, object], http2: bool) -> tuple[str, int, str, bytes]:
    # HTTP/2 over cleartext with prior knowledge, which both servers speak.
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
        response = client.post(f"http://127.0.0.1:{port}{path}", json=body)
    content_type = response.headers.get("content-type", "")
    return response.http_version, response.status_code, content_type, _CLOCK.sub(b"", response.content)


def test_a_body_read_to_its_content_length_is_read(servers: dict[str, int]) -> None:
    """An app that stops reading at the body's Content-Length (Falcon) never asks for the server's closing message:
    the body is read all the same, so the call has its model, where it was recorded as unknown."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{servers['exact']}/v1", api_key="test", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    metrics = wait_for(
        "the call recorded",
        lambda: (m := scrape(servers["exact_metrics"])).value("llm_requests_total") and m,
    )
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"gpt-4o-mini"}


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_the_client_gets_the_bare_apps_bytes(servers: dict[str, int], http2: bool) -> None:
    for path, body in REQUESTS:
        answer = _answer(servers["wrapped"], path, body, http2)
        assert answer[0] == ("HTTP/2" if http2 else "HTTP/1.1")
        assert answer == _answer(servers["bare"], path, body, http2)


def test_streams_are_measured_and_a_client_leaving_is_a_disconnect(servers: dict[str, int]) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{servers['wrapped']}/v1", api_key="test", max_retries=0)
    before = scrape(servers["metrics"])
    stream = client.chat.completions.create(
        model="gpt-4o-server", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    (usage,) = [chunk.usage for chunk in stream if chunk.usage]
    body = {"model": "gpt-4o-left", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"http://127.0.0.1:{servers['wrapped']}/v1/chat/completions", json=body) as response:
        next(response.iter_raw())  # the first chunk, then the client goes

    deadline = time.monotonic() + 10
    while True:
        after = scrape(servers["metrics"])
        left = after.value("llm_errors_total", gen_ai_request_model="gpt-4o-left", error_type="client_disconnect")
        if left == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == 1
    model = {"gen_ai_request_model": "gpt-4o-server"}
    # The SDK closes as soon as it has read the stream's last event; the stream was complete all the same.
    assert after.value("llm_requests_total", **model) == 1
    assert after.value("llm_errors_total", **model) == 0
    assert after.value("gen_ai_server_time_to_first_token_seconds_count", **model) == 1
    assert after.value("llm_tokens_total", gen_ai_token_type="output", **model) == usage.completion_tokens
    assert after.value("llm_tokens_total", gen_ai_token_type="input", **model) == usage.prompt_tokens
    assert after.value("llm_errors_total", gen_ai_request_model="gpt-4o-server") == 0
    assert after.value("llm_requests_active") == before.value("llm_requests_active") == 0
    assert after.value("llm_telemetry_internal_errors_total") == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_request_the_server_cancels_is_a_client_disconnect(backend: str) -> None:
    """Servers cancel the requests in flight when they stop (Hypercorn's trio worker after its graceful timeout,
    any server on a cancel scope): the call is the server's doing, a client disconnect, whichever library runs it,
    never the app's exception (which alerts count against the error budget)."""

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        await receive()  # type: ignore[operator]
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        await send(start)  # type: ignore[operator]
        chunk = (
            b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"w "},"finish_reason":null}]}\n\n'
        )
        while True:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})  # type: ignore[operator]
            await anyio.sleep(0.01)

    calls = Calls()
    middleware = LLMTelemetryMiddleware(app, metrics_port=0, request_logs=False, observers=[calls])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [], "client": None, "server": None}  # fmt: skip
    requests = [{"type": "http.request", "body": b'{"model":"m","stream":true,"messages":[]}'}]

    async def receive() -> dict[str, object]:
        if requests:
            return requests.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, object]) -> None:
        pass

    async def serve_until_cancelled() -> None:
        with anyio.move_on_after(0.2):
            await middleware(scope, receive, send)

    anyio.run(serve_until_cancelled, backend=backend)
    middleware.telemetry.shutdown()
    [call] = calls.ended
    assert (call.status_code, call.error_type) == (200, "client_disconnect")
    assert call.output_tokens is not None and call.output_tokens > 0


JSON_ANSWER = (
    b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
)
SSE_CHUNK = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"w "},"finish_reason":null}]}\n\n'


@pytest.mark.parametrize("http", ["h11", "httptools"])
@pytest.mark.parametrize("fault", ["json-longer-than-content-length", "stream-longer-than-content-length", "header"])
def test_a_message_the_server_refuses_is_the_apps_failure(http: str, fault: str) -> None:
    """The server raises from ``send`` when the app breaks HTTP (a body longer than the Content-Length it declared,
    as a proxy forwarding the upstream's length for a body it decompressed; a header value with a line break). The
    client is still there: this is the app's failure, counted against the error budget, not a client disconnect
    (which the alert rules leave out), whichever path the refused message took through the middleware."""

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await receive()  # type: ignore[operator]
        stream = fault.startswith("stream")
        headers = [(b"content-type", b"text/event-stream" if stream else b"application/json")]
        headers.append((b"x-note", b"a\r\nb") if fault == "header" else (b"content-length", b"40"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        if stream:
            for _ in range(5):
                await send({"type": "http.response.body", "body": SSE_CHUNK, "more_body": True})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"" if stream else JSON_ANSWER})  # type: ignore[operator]

    calls = Calls()
    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, request_logs=False, observers=[calls])
    body = {"model": "m", "messages": [], "stream": fault.startswith("stream")}
    with serve(wrapped, http=http) as url:
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).read()
        except httpx.HTTPError:
            pass  # the server cut the response
        wait_for("the call ended", lambda: calls.ended)
    wrapped.telemetry.shutdown()
    [call] = calls.ended
    assert call.error_type == "app_exception"
    assert call.status_code == (500 if fault == "header" else 200)


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_an_app_that_returns_without_an_answer_is_logged_as_the_servers_500(http: str) -> None:
    """The app reads the request and returns without starting a response: the server answers 500 for it, and
    the call says so (it had no status at all)."""

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http":
            await receive()  # type: ignore[operator]

    calls = Calls()
    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, request_logs=False, observers=[calls])
    with serve(wrapped, http=http) as url:
        status = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": []}, timeout=10).status_code
        wait_for("the call ended", lambda: calls.ended)
    wrapped.telemetry.shutdown()
    [call] = calls.ended
    assert (status, call.status_code, call.error_type) == (500, 500, "other")
