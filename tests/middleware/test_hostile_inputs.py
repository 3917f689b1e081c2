"""Hostile clients and failing apps: the app answers as it would alone, the scrape stays whole and small, the
numbers stay right, and nothing a client sends moves ``llm_telemetry_internal_errors_total``.

Each test drives the real middleware in-process with raw ASGI messages (as Starlette's and OpenTelemetry's
middleware tests do) and reads its real Prometheus exposition through ``metrics_app_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import MAX_KEPT_TEXT_CHARS, MAX_TOOL_CALLS
from llm_telemetry.labels import MAX_LABEL_CHARS
from llm_telemetry.logs import REQUEST_LOGGER, JsonFormatter
from llm_telemetry.middleware import BODY_PIECE_OVERHEAD, Router
from llm_telemetry.record import LLMCall
from llm_telemetry.sse import SSEDecoder
from support import Calls, Metrics, serve, settled, wait_for

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


def scope(path: str, method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def exchange(
    app: Any, path: str, body: bytes = b"", *, method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None
) -> list[dict[str, Any]]:
    """One request through ``app``; the messages it sent. The client stays connected until the app returns."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # never: the client is still there
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope(path, method, headers), receive, send)
    return sent


def wire(messages: list[dict[str, Any]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """What the server would put on the wire: status, headers (materialised), body."""
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return start["status"], [tuple(h) for h in start.get("headers") or ()], body  # type: ignore[misc]


async def scrape(wrapped: LLMTelemetryMiddleware) -> Metrics:
    status, _, body = wire(await exchange(wrapped, "/metrics", method="GET"))
    assert status == 200
    return Metrics(body.decode())


def internal_errors(metrics: Metrics) -> float:
    return metrics.value("llm_telemetry_internal_errors_total")


def observe(app: Any, **options: Any) -> tuple[LLMTelemetryMiddleware, Calls]:
    calls = Calls()
    options.setdefault("request_logs", False)
    options.setdefault("echo_request_id", False)
    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, metrics_app_path="/metrics", observers=[calls], **options)
    return wrapped, calls


def replying(status: int, headers: list[tuple[bytes, bytes]], *chunks: bytes) -> Any:
    """An app that reads the whole request, then answers ``status`` with ``chunks`` as separate body messages."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


OK_JSON = replying(200, JSON, b'{"model": "m", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}')


# --- label values ---------------------------------------------------------------------------------------------


async def test_hostile_lone_surrogate_model_keeps_scrape_and_log_line_whole(cleanup: list[Any]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    requests_logger = logging.getLogger(REQUEST_LOGGER)
    requests_logger.addHandler(handler)
    try:
        wrapped, _ = observe(OK_JSON, request_logs=True)
        cleanup.append(wrapped)
        body = b'{"model": "x\\ud800y", "messages": [{"role": "user", "content": "hi \\udfff"}]}'
        assert wire(await exchange(wrapped, "/v1/chat/completions", body))[0] == 200
        for _ in range(2):  # not just the first scrape: every later one too
            metrics = await scrape(wrapped)
            assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"x\ufffdy"}
            assert internal_errors(metrics) == 0
    finally:
        requests_logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["model"] == "x\ufffdy"
    line.encode("utf-8")  # what a UTF-8 stream handler does; lone surrogates made this raise


async def test_hostile_label_values_longer_than_the_cap_become_other(cleanup: list[Any]) -> None:
    wrapped, _ = observe(OK_JSON, attribution_headers={"x-tenant": "tenant"})
    cleanup.append(wrapped)
    at_cap = "m" * MAX_LABEL_CHARS
    for model, tenant in ((at_cap, b"a" * MAX_LABEL_CHARS), ("n" * (4 << 20), b"t" * (MAX_LABEL_CHARS + 1))):
        body = json.dumps({"model": model}).encode()
        await exchange(wrapped, "/v1/chat/completions", body, headers=[(b"x-tenant", tenant)])
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {at_cap, "other"}
    assert metrics.label_values("llm_requests_total", "llm_metadata_tenant") == {"a" * MAX_LABEL_CHARS, "other"}
    assert len(metrics.text) < 256 * 1024  # a 4 MiB model name does not reach the exposition


async def test_hostile_label_values_are_bounded_in_number(cleanup: list[Any]) -> None:
    wrapped, _ = observe(OK_JSON, max_label_values=3)
    cleanup.append(wrapped)
    # Twice over: the second time, every model has been seen (admitted ones and folded ones alike).
    for i in [*range(10), *range(10)]:
        await exchange(wrapped, "/v1/chat/completions", json.dumps({"model": f"m{i}"}).encode())
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"m0", "m1", "m2", "other"}
    for model in ("m0", "m1", "m2"):
        assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 2
    assert metrics.value("llm_requests_total", gen_ai_request_model="other") == 14


async def test_hostile_refused_requests_take_no_model_slots(cleanup: list[Any]) -> None:
    """Requests the service refuses with a 4xx (a gateway's bad key: it never reaches a model) name whatever model
    the client wrote. They admit no new model name: a flood of them would fold every real model seen after it into
    ``other`` until a restart. A model admitted already keeps its name on its refusals too."""
    refused = replying(401, JSON, b'{"error": {"message": "invalid key", "type": "authentication_error"}}')

    async def gateway(scope: dict[str, Any], receive: Any, send: Any) -> None:
        accepted = dict(scope["headers"]).get(b"authorization") == b"Bearer good"
        await (OK_JSON if accepted else refused)(scope, receive, send)

    wrapped, _ = observe(gateway, max_label_values=3)
    cleanup.append(wrapped)
    good = [(b"authorization", b"Bearer good")]
    for i in range(20):
        await exchange(wrapped, "/v1/chat/completions", json.dumps({"model": f"junk-{i}"}).encode())
    for model in ("gpt-4o", "claude"):
        await exchange(wrapped, "/v1/chat/completions", json.dumps({"model": model}).encode(), headers=good)
    await exchange(wrapped, "/v1/chat/completions", json.dumps({"model": "gpt-4o"}).encode())  # refused, known
    # A rate limit or a timeout meets real models: a new name answered 429 or 408 takes its place as any answered
    # request's does; another 4xx (409) is a refusal.
    for status, admitted in ((429, {"new-model"}), (408, {"new-model"}), (409, {"other"})):
        limited = replying(status, JSON, b'{"error": {"message": "slow down", "type": "rate_limit_error"}}')
        limited_wrapped, _ = observe(limited, max_label_values=3)
        cleanup.append(limited_wrapped)
        await exchange(limited_wrapped, "/v1/chat/completions", json.dumps({"model": "new-model"}).encode())
        models = (await scrape(limited_wrapped)).label_values("llm_requests_total", "gen_ai_request_model")
        assert models == admitted, status
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"gpt-4o", "claude", "other"}
    assert metrics.value("llm_requests_total", gen_ai_request_model="other", error_type="auth") == 20
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o", error_type="auth") == 1
    assert metrics.value("llm_requests_total", gen_ai_request_model="claude") == 1
    assert metrics.value("llm_cost_usd_total", gen_ai_request_model="other") == 0


async def test_hostile_refused_requests_take_no_tool_or_tenant_slots(cleanup: list[Any]) -> None:
    """As for models: the tenant header and the tool results of a refused request are the client's word alone, and
    admit no new value, so a flood of them sent with a bad key cannot fold every real tenant and tool seen after it
    into ``other``; values admitted already keep their names on refusals. An empty header counts as none."""
    refused = replying(401, JSON, b'{"error": {"message": "invalid key", "type": "authentication_error"}}')

    async def gateway(scope: dict[str, Any], receive: Any, send: Any) -> None:
        accepted = dict(scope["headers"]).get(b"authorization") == b"Bearer good"
        await (OK_JSON if accepted else refused)(scope, receive, send)

    def body(tool: str) -> bytes:
        call = {"id": "c1", "type": "function", "function": {"name": tool, "arguments": "{}"}}
        messages = [{"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "1"}]
        return json.dumps({"model": "gpt-4o", "messages": messages}).encode()

    wrapped, calls = observe(gateway, max_label_values=3, attribution_headers={"x-tenant-id": "tenant"})
    cleanup.append(wrapped)
    good = [(b"authorization", b"Bearer good")]
    for i in range(20):
        await exchange(wrapped, "/v1/chat/completions", body(f"junk-tool-{i}"), headers=[(b"x-tenant-id", b"j%d" % i)])
    await exchange(wrapped, "/v1/chat/completions", body("get_weather"), headers=[*good, (b"x-tenant-id", b"acme")])
    await exchange(wrapped, "/v1/chat/completions", body("get_weather"), headers=[(b"x-tenant-id", b"acme")])
    await exchange(wrapped, "/v1/chat/completions", body("get_weather"), headers=[*good, (b"x-tenant-id", b"")])
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_requests_total", "llm_metadata_tenant") == {"acme", "other", "none"}
    assert metrics.value("llm_requests_total", llm_metadata_tenant="other", error_type="auth") == 20
    assert metrics.value("llm_requests_total", llm_metadata_tenant="acme", error_type="auth") == 1  # known: kept
    assert metrics.label_values("llm_tool_results_total", "gen_ai_tool_name") == {"get_weather", "other"}
    assert metrics.value("llm_tool_results_total", gen_ai_tool_name="get_weather") == 3
    assert metrics.value("llm_tool_results_total", gen_ai_tool_name="other") == 20
    # An observer (the public hook) gets each call's attribution as it was recorded.
    assert [c.attribution for c in calls.ended[19:]] == [{"tenant": t} for t in ("other", "acme", "acme", "none")]


async def test_hostile_many_tool_results_are_counted_exactly_per_tool_and_status(cleanup: list[Any]) -> None:
    """A body may carry a hundred thousand tool results: each counts once, under its tool's bounded name (past the
    label limit, in order of first appearance: ``other``) and its status, as tool calls in the answer do."""
    turn = {"role": "assistant", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}
        for i, name in enumerate(["search", "calc", "lookup", "extra"])
    ]}  # fmt: skip
    sent = [("c0", "ok", 50_000), ("c0", "error: timeout", 20_000), ("c1", '{"error": "boom"}', 30_000),
            ("c1", '{"value": 4}', 5), ("c2", "fine", 7), ("c3", "ok", 11), ("c9", "ok", 3)]  # fmt: skip
    results = [{"role": "tool", "tool_call_id": i, "content": text} for i, text, n in sent for _ in range(n)]
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}, turn, *results]}).encode()
    calls = [{"id": "x", "type": "function", "function": {"name": name, "arguments": "{}"}}
             for name in ["calc", "search", "calc", "extra"]]  # fmt: skip
    answer = {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": calls},
                                         "finish_reason": "tool_calls"}]}  # fmt: skip
    wrapped, _ = observe(replying(200, JSON, json.dumps(answer).encode()), max_label_values=3)
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", body)
    metrics = await scrape(wrapped)
    counted = {
        (s.labels["gen_ai_tool_name"], s.labels["llm_tool_status"]): s.value
        for s in metrics.samples
        if s.name == "llm_tool_results_total"
    }
    # The answer's tool calls are counted first: calc, search and extra take the three places, so lookup and the
    # unknown id's tool are "other".
    assert counted == {
        ("search", "success"): 50_000,
        ("search", "error"): 20_000,
        ("calc", "error"): 30_000,
        ("calc", "success"): 5,
        ("extra", "success"): 11,
        ("other", "success"): 10,
    }
    tool_calls = {s.labels["gen_ai_tool_name"]: s.value for s in metrics.samples if s.name == "llm_tool_calls_total"}
    assert tool_calls == {"calc": 2, "search": 1, "extra": 1}
    assert internal_errors(metrics) == 0


# --- errors by origin -------------------------------------------------------------------------------------------


def raising(exc: BaseException) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await receive()
            raise exc

    return app


@pytest.mark.parametrize(
    "exc", [TimeoutError("upstream timed out"), ConnectionRefusedError(111, "refused"), OSError("upstream reset")]
)
async def test_hostile_app_raised_oserror_is_a_server_error_not_a_disconnect(
    cleanup: list[Any], exc: BaseException
) -> None:
    wrapped, calls = observe(raising(exc))
    cleanup.append(wrapped)
    with pytest.raises(type(exc)):
        await exchange(wrapped, "/v1/chat/completions", b'{"model": "m"}')
    (call,) = calls.ended
    assert (call.error_type, call.status_code) == ("app_exception", 500)
    metrics = await scrape(wrapped)
    assert metrics.value("llm_errors_total", error_type="client_disconnect") == 0
    assert metrics.value("llm_errors_total", error_type="app_exception") == 1


async def request_then_leave(app: Any, body: bytes) -> None:
    """One chat request through ``app`` from a client that leaves once the app asks for more than the body: the
    server's ``http.disconnect``; what the app sends is dropped."""
    messages = [{"type": "http.request", "body": body}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope("/v1/chat/completions"), receive, send)


async def test_hostile_disconnect_told_by_the_server_is_a_client_disconnect(cleanup: list[Any]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            raise OSError("the client went away")  # what Starlette's streaming helpers do on disconnect

    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    with pytest.raises(OSError):
        await request_then_leave(wrapped, b'{"model": "m"}')

    async def broken_pipe(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("broken pipe")  # a server whose send fails once the client is gone

    async def first_only() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "m"}'}

    with pytest.raises(OSError):
        await wrapped(scope("/v1/chat/completions"), first_only, broken_pipe)
    assert [c.error_type for c in calls.ended] == ["client_disconnect", "client_disconnect"]


async def test_hostile_client_leaving_after_the_streams_end_got_the_whole_answer(cleanup: list[Any]) -> None:
    """The openai SDK closes the connection once it has read a stream's ``[DONE]``; an app told of the leave before
    it sent its closing (empty) message stops there, as Litestar's does. The client had the whole answer: a
    success, with its time to first token, not a disconnect. A client leaving before the finish reason is one."""
    stop = b'data: {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    text = b'data: {"model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'

    def streaming(*events: bytes) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await receive()  # the leave: the app stops without its closing message

        return app

    async def leaving(app: Any) -> LLMCall:
        wrapped, calls = observe(app)
        cleanup.append(wrapped)
        await request_then_leave(wrapped, b'{"model": "m", "stream": true}')
        (call,) = calls.ended
        return call

    whole = await leaving(streaming(text, stop, b"data: [DONE]\n\n"))
    assert whole.error_type is None and whole.first_token_at is not None
    assert (await leaving(streaming(text))).error_type == "client_disconnect"

    # Two choices asked for (n=2): the first one's finish reason is not the end of the answer.
    async def asked_two(*events: bytes) -> LLMCall:
        wrapped, calls = observe(streaming(*events))
        cleanup.append(wrapped)
        await request_then_leave(wrapped, b'{"model": "m", "stream": true, "n": 2}')
        (call,) = calls.ended
        return call

    second = text.replace(b'"index": 0', b'"index": 1')
    second_stop = stop.replace(b'"index": 0', b'"index": 1')
    assert (await asked_two(text, second, stop, second)).error_type == "client_disconnect"
    assert (await asked_two(text, second, stop, second_stop, b"data: [DONE]\n\n")).error_type is None


@given(st.lists(st.text(alphabet="/abcv1chatompletinsrgx", max_size=40), max_size=60))
@settings(max_examples=100, deadline=None)
def test_hostile_paths_get_the_same_route_from_the_cache_and_cannot_grow_it(paths: list[str]) -> None:
    router = Router({"/generate": "openai.chat"})
    router.CACHE_SIZE = 8  # type: ignore[misc]
    long_path = "/v1/" + "x" * 10_000 + "/chat/completions"
    for path in [*paths, long_path, *paths]:
        assert router.match(path) is router._match(path)
        assert len(router._cache) <= 8
        assert all(len(p) <= Router.CACHED_PATH_CHARS for p in router._cache)


class _Gone(Exception):
    """What a framework raises in place of the server's error when the client is gone (Starlette: ClientDisconnect)."""


def _streaming(on_send_error: str) -> Any:
    """An app streaming text chunks; when ``send`` fails it re-raises, raises its own exception in its place, or
    raises one of its own regardless of ``send`` (``"own"``: an upstream failure mid-stream)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        for i in range(5):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
            body = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            if on_send_error == "own" and i == 3:
                raise OSError("upstream reset")
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            except OSError as exc:
                if on_send_error == "replace":
                    raise _Gone() from None  # no __cause__; the OSError stays as __context__
                raise exc
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


class _CallableSend:
    """A server ``send`` that is an object, not a coroutine function: no frame of its own to recognise."""

    def __init__(self, fail_after: int) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail_after = fail_after

    def __call__(self, message: dict[str, Any]) -> Any:
        async def deliver() -> None:
            if len(self.sent) >= self.fail_after:
                raise OSError("broken pipe")
            self.sent.append(message)

        return deliver()


@pytest.mark.parametrize(
    ("on_send_error", "server", "expected"),
    [
        ("reraise", "coroutine", "client_disconnect"),
        ("replace", "coroutine", "client_disconnect"),
        ("reraise", "callable", "client_disconnect"),
        ("replace", "callable", "client_disconnect"),
        ("own", "coroutine", "app_exception"),
        ("own", "callable", "app_exception"),
    ],
)
async def test_hostile_send_failure_mid_stream_is_a_disconnect_whatever_the_app_raises(
    cleanup: list[Any], on_send_error: str, server: str, expected: str
) -> None:
    wrapped, calls = observe(_streaming(on_send_error))
    cleanup.append(wrapped)
    delivered: list[dict[str, Any]] = []
    fail_after = 1000 if on_send_error == "own" else 3  # "own": the server delivers everything

    async def coroutine_send(message: dict[str, Any]) -> None:
        if len(delivered) >= fail_after:
            raise OSError("broken pipe")
        delivered.append(message)

    send = coroutine_send if server == "coroutine" else _CallableSend(fail_after)

    async def first_only() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "m"}'}

    with pytest.raises((OSError, _Gone)):
        await wrapped(scope("/v1/chat/completions"), first_only, send)
    (call,) = calls.ended
    assert call.error_type == expected
    if expected == "app_exception":
        assert call.status_code == 200  # the response had started: its status stands


async def test_streamed_chunks_reach_the_server_as_the_app_sent_them(cleanup: list[Any]) -> None:
    wrapped, calls = observe(_streaming("reraise"))
    cleanup.append(wrapped)
    app_sent: list[dict[str, Any]] = []
    await _streaming("reraise")(scope("/v1/chat/completions"), _body_once(), _collect(app_sent))
    for server in ("coroutine", "callable"):
        got: list[dict[str, Any]] = []
        send = _collect(got) if server == "coroutine" else _CallableSend(fail_after=1000)
        await wrapped(scope("/v1/chat/completions"), _body_once(), send)
        if server == "callable":
            got = send.sent  # type: ignore[union-attr]
        assert [(m["type"], m.get("body"), m.get("more_body")) for m in got if m["type"] != "http.response.start"] == [
            (m["type"], m.get("body"), m.get("more_body")) for m in app_sent if m["type"] != "http.response.start"
        ]
    assert [c.output_tokens for c in calls.ended] == [5, 5]
    assert [c.error_type for c in calls.ended] == [None, None]


def _body_once() -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "m"}'}

    return receive


def _collect(into: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        into.append(message)

    return send


# --- bodies the parser must survive ------------------------------------------------------------------------------


DEEP = b"[" * 100_000


@pytest.mark.parametrize(
    "body",
    [
        DEEP,
        b'{"model": "m", "messages": ' + DEEP + b"}",
        b'{"model": "m", "messages": [{"role": "tool", "tool_call_id": [1], "content": "x"}]}',
        b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": {"a": 1}}]}]}',
        b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": 7}]}',
        b'{"model": "m", "messages": [{"role": "tool", "content": "{' + b"[" * 50_000 + b'"}]}',
        b'{"model": "m", "max_tokens": 1' + b"0" * 4000 + b', "temperature": 1' + b"0" * 400 + b"}",
        b'{"model": ["a"], "stream": {"x": 1}, "top_p": "high"}',
        b'{"model": "m", "input": [{"type": "function_call_output", "call_id": [], "output": 1}]}',
    ],
    ids=[
        "deep",
        "deep-messages",
        "tool_call_id-list",
        "tool-id-dict",
        "tool_calls-int",
        "deep-tool-content",
        "huge-numbers",
        "wrong-types",
        "responses-call_id-list",
    ],
)
async def test_hostile_request_bodies_answer_as_the_bare_app(cleanup: list[Any], body: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        expected = wire(await exchange(OK_JSON, path, body))
        wrapped, calls = observe(OK_JSON)
        cleanup.append(wrapped)
        assert wire(await exchange(wrapped, path, body)) == expected
        assert len(calls.ended) == 1
        assert internal_errors(await scrape(wrapped)) == 0


@pytest.mark.parametrize("admitted", [True, False], ids=["largest-read", "past-the-limit"])
async def test_hostile_dripped_request_body_keeps_no_more_than_the_body_limit_alive(
    cleanup: list[Any], admitted: bool
) -> None:
    """A client that drips its body gets one ``http.request`` message per read of the server, a byte or two each
    (uvicorn delivered a 2 MB body dripped over loopback in ~1M pieces). However small the pieces, what the
    middleware keeps of them for its parse costs no more than the body limit, both for the largest such body it
    still reads and for one far past the limit, while the app, which reads the body as it comes and keeps none of
    it, gets every byte. Measured with tracemalloc while the app runs."""
    limit = 1 << 20
    head, tail = b'{"model": "m", "messages": [{"role": "user", "content": "', b'"}]}'
    # In two-byte pieces: the most the limit admits, counting each piece's overhead; or about 8x that.
    size = 2 * (limit // (2 + BODY_PIECE_OVERHEAD)) if admitted else 400_000
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    measured: list[tuple[int, int]] = []  # (bytes the app received, bytes traced as alive once it has read them)
    baseline = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        received = 0
        while True:
            message = await receive()
            received += len(message["body"])  # used and dropped, as a parser reading the body as it comes does
            if not message.get("more_body"):
                break
        measured.append((received, tracemalloc.get_traced_memory()[0] - baseline))
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": b'{"model": "m", "choices": []}'})

    wrapped, calls = observe(app, max_request_bytes=limit)
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b"{}")  # the middleware's set-up, before memory is traced
    offset = 0

    async def receive() -> dict[str, Any]:
        # Each piece a new bytes object, as a server makes one per read: traced, and freed unless kept.
        nonlocal offset
        piece, offset = body[offset : offset + 2], offset + 2
        return {"type": "http.request", "body": piece, "more_body": offset < len(body)}

    async def send(message: dict[str, Any]) -> None:
        pass

    measured.clear()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        await wrapped(scope("/v1/chat/completions"), receive, send)
    finally:
        tracemalloc.stop()
    [(received, alive)] = measured
    assert received == len(body)
    assert alive < limit, f"{alive} bytes kept alive for a body limit of {limit}"
    assert len(calls.ended) == 2
    assert calls.ended[1].request_model == ("m" if admitted else None)  # past the limit: recorded unread
    assert internal_errors(await scrape(wrapped)) == 0


async def test_hostile_deep_error_body_is_classified_by_status(cleanup: list[Any]) -> None:
    wrapped, calls = observe(replying(429, JSON, b'{"error": ' + DEEP))
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m"}')
    assert calls.ended[0].error_type == "rate_limit"
    assert internal_errors(await scrape(wrapped)) == 0


async def test_hostile_deep_sse_event_does_not_switch_the_reader_off(cleanup: list[Any]) -> None:
    app = replying(
        200,
        SSE,
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
        b"data: " + DEEP + b"\n\n",
        b'data: {"choices": [{"delta": {"content": "b"}, "finish_reason": "stop"}]}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
    )
    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m", "stream": true}')
    (call,) = calls.ended
    assert (call.finish_reasons, call.input_tokens, call.output_tokens) == (["stop"], 3, 2)
    assert internal_errors(await scrape(wrapped)) == 0


async def test_hostile_responses_items_with_a_list_or_object_type_are_skipped(cleanup: list[Any]) -> None:
    """A Responses API input item whose ``type`` is a list or an object is no item of the API: skipped, the tool
    results of the others still counted, and nothing in the internal errors (which would page on any client)."""
    wrapped, calls = observe(OK_JSON)
    cleanup.append(wrapped)
    items = [
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": ["function_call_output"], "call_id": "c1", "output": "x"},
        {"type": {"k": 1}, "call_id": "c1", "output": "x"},
        {"type": "function_call_output", "call_id": "c1", "output": "found"},
    ]
    body = json.dumps({"model": "m", "input": items}).encode()
    await exchange(wrapped, "/v1/responses", body)
    (call,) = calls.ended
    assert [result.name for result in call.tool_results] == ["lookup"]
    assert internal_errors(await scrape(wrapped)) == 0


async def test_hostile_response_headers_as_a_generator_reach_the_client(cleanup: list[Any]) -> None:
    pairs = [(b"content-type", b"application/json"), (b"x-upstream", b"1")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": (h for h in pairs)})
        await send({"type": "http.response.body", "body": b'{"model": "m"}'})

    wrapped, calls = observe(app, echo_request_id=True)
    cleanup.append(wrapped)
    _, headers, _ = wire(await exchange(wrapped, "/v1/chat/completions", b"{}"))
    assert headers[:2] == pairs and headers[2][0] == b"x-request-id"
    assert calls.ended[0].response_model == "m"  # and we read the response they described


async def test_hostile_endless_stream_keeps_bounded_text_and_tool_calls(cleanup: list[Any]) -> None:
    """A stream that does not end (a runaway model behind a gateway) must not grow what is kept per call: the
    generated text kept for a captured span stops at MAX_KEPT_TEXT_CHARS, the tool calls counted at
    MAX_TOOL_CALLS, while every byte still reaches the client."""
    text = "y" * 1000
    deltas = [
        {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]} for _ in range(600)
    ] + [
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": i, "id": f"c{i}", "type": "function", "function": {"name": "t", "arguments": ""}}
        ]}, "finish_reason": None}]} for i in range(3 * MAX_TOOL_CALLS)
    ]  # fmt: skip
    chunks = [b"data: " + json.dumps({"model": "m", **d}).encode() + b"\n\n" for d in deltas]
    app = replying(200, SSE, *chunks)
    wrapped, calls = observe(app, capture_content=True)
    cleanup.append(wrapped)
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]}).encode()
    assert wire(await exchange(wrapped, "/v1/chat/completions", body))[2] == b"".join(chunks)
    (call,) = calls.ended
    assert call.output_text is not None
    assert MAX_KEPT_TEXT_CHARS <= len(call.output_text[0]) < MAX_KEPT_TEXT_CHARS + len(text)
    assert len(call.tool_calls) == MAX_TOOL_CALLS
    metrics = await scrape(wrapped)
    assert metrics.value("llm_tool_calls_total", gen_ai_tool_name="t") == MAX_TOOL_CALLS
    assert internal_errors(metrics) == 0


@pytest.mark.parametrize("first", [1024, 1023])
async def test_text_kept_for_a_span_stops_at_the_first_piece_that_reaches_the_bound(
    cleanup: list[Any], first: int
) -> None:
    """Pieces of text are kept while fewer than MAX_KEPT_TEXT_CHARS are: pieces that add up to exactly the bound keep
    exactly the bound, and pieces that reach one character short of it keep the next piece too (a mutation audit could
    start the count one above or below zero with every test passing: the other test's pieces never meet the bound)."""
    piece = 1024
    pieces = ["y" * first] + ["y" * piece] * (MAX_KEPT_TEXT_CHARS // piece + 2)
    chunks = [
        b"data: " + json.dumps({"model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"
        for text in pieces
    ]
    wrapped, calls = observe(replying(200, SSE, *chunks), capture_content=True)
    cleanup.append(wrapped)
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]}).encode()
    assert wire(await exchange(wrapped, "/v1/chat/completions", body))[2] == b"".join(chunks)
    (call,) = calls.ended
    assert call.output_text is not None
    kept = MAX_KEPT_TEXT_CHARS if first == piece else MAX_KEPT_TEXT_CHARS - 1 + piece
    assert len(call.output_text[0]) == kept


async def test_hostile_answer_with_too_many_tool_calls_counts_up_to_the_bound(cleanup: list[Any]) -> None:
    tool_calls = [{"id": f"c{i}", "type": "function", "function": {"name": "t", "arguments": ""}} for i in range(5000)]
    message = {"role": "assistant", "tool_calls": tool_calls}
    answer = {"model": "m", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    wrapped, calls = observe(replying(200, JSON, json.dumps(answer).encode()))
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m"}')
    assert len(calls.ended[0].tool_calls) == MAX_TOOL_CALLS
    assert (await scrape(wrapped)).value("llm_tool_calls_total", gen_ai_tool_name="t") == MAX_TOOL_CALLS


# --- routes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "operation", "provider"),
    [
        ("/v1/chat/completions", "chat", "openai"),
        ("/openai/deployments/gpt-4o/chat/completions", "chat", "openai"),
        ("/v1/engines/davinci/completions", "text_completion", "openai"),
        ("/v1/responses", "chat", "openai"),
        ("/v1/messages", "chat", "anthropic"),
        ("/anthropic/v1/messages/", "chat", "anthropic"),
        ("/v1/threads/thread_abc/messages", None, None),
        ("/v1/chat/completions/chatcmpl-1/messages", None, None),
        ("/v1/messages/count_tokens", None, None),
        ("/v1/threads/thread_abc/runs", None, None),
    ],
)
async def test_hostile_routes_follow_the_apis_real_path_shapes(
    cleanup: list[Any], path: str, operation: str | None, provider: str | None
) -> None:
    wrapped, calls = observe(OK_JSON)
    cleanup.append(wrapped)
    await exchange(wrapped, path, b'{"model": "m"}')
    assert [(c.operation, c.provider) for c in calls.ended] == ([(operation, provider)] if operation else [])


# --- what gateways and providers send mid-stream ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # The LiteLLM proxy's error event inside a 200 stream: the HTTP status as a string code.
        (
            {"message": "litellm.RateLimitError: throttled", "type": "throttling_error", "param": None, "code": "429"},
            "rate_limit",
        ),
        (
            {"message": "litellm.APIConnectionError: dropped", "type": None, "param": None, "code": "500"},
            "server_error",
        ),
        ({"message": "something broke"}, "server_error"),  # nothing to go on: a stream error is the server's
        ({"message": "bad", "type": "invalid_request_error", "code": 400}, "invalid_request"),
    ],
)
async def test_hostile_gateway_stream_errors_are_classified(
    cleanup: list[Any], error: dict[str, Any], expected: str
) -> None:
    event = b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    app = replying(200, SSE, b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', event)
    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m", "stream": true}')
    assert calls.ended[0].error_type == expected


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_hostile_second_response_start_is_the_apps_failure_with_the_first_status(cleanup: list[Any], http: str) -> None:
    """An app that sends ``http.response.start`` twice breaks ASGI: uvicorn refuses the second (raising into the
    app) and the client gets the first one's status. The call keeps that status and is the app's failure; it is no
    client disconnect, though the exception comes out of the server's ``send``."""
    import httpx

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.start", "status": 500, "headers": JSON})
        await send({"type": "http.response.body", "body": b"{}"})

    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    with serve(wrapped, http=http) as base:
        with contextlib.suppress(httpx.HTTPError):  # the server cuts the response short
            status = httpx.post(f"{base}/v1/chat/completions", json={"model": "m"}).status_code
            assert status == 200
        (call,) = wait_for("the call", lambda: calls.ended)
    assert (call.status_code, call.error_type) == (200, "app_exception")


def anthropic_events(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


async def test_hostile_anthropic_stream_cut_before_message_delta_is_estimated(cleanup: list[Any]) -> None:
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 9,
             "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word"}}
    app = replying(200, SSE, anthropic_events(start, {"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}), *[anthropic_events(delta)] * 5)  # fmt: skip
    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/messages", b'{"model": "claude-x", "stream": true}')
    (call,) = calls.ended
    assert (call.input_tokens, call.output_tokens, call.usage_source) == (9, 5, "estimated")
    # Only the output is estimated: the input count is the one message_start reported.
    metrics = await scrape(wrapped)
    tokens = {"gen_ai_request_model": "claude-x"}
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input", llm_usage_source="reported", **tokens) == 9
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="estimated", **tokens) == 5
    assert not metrics.series("llm_tokens_total", gen_ai_token_type="input", llm_usage_source="estimated")

    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}
    whole = replying(200, SSE, anthropic_events(start), *[anthropic_events(delta)] * 5, anthropic_events(end))
    wrapped, calls = observe(whole)
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/messages", b'{"model": "claude-x", "stream": true}')
    (call,) = calls.ended
    assert (call.input_tokens, call.output_tokens, call.usage_source) == (9, 7, "reported")


# --- setup ------------------------------------------------------------------------------------------------------


class BrokenMeterProvider:
    """A meter provider an application passed in that fails when asked for a meter."""

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this provider is broken")


async def test_hostile_failed_setup_leaves_a_counted_pass_through(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    wrapped = LLMTelemetryMiddleware(
        OK_JSON,
        metrics_port=0,
        metrics_app_path="/metrics",
        request_logs=False,
        observers=[calls],
        meter_provider=BrokenMeterProvider(),  # type: ignore[arg-type]
    )
    cleanup.append(wrapped)
    with caplog.at_level(logging.ERROR, logger="llm_telemetry"):
        for _ in range(2):
            answer = wire(await exchange(wrapped, "/v1/chat/completions", b'{"model": "m"}'))
            assert answer == wire(await exchange(OK_JSON, "/v1/chat/completions", b'{"model": "m"}'))
    assert calls.ended == []  # passed through, not observed
    assert [r.message for r in caplog.records].count(
        "llm-telemetry: setup failed; requests pass through unobserved: RuntimeError('this provider is broken')"
    ) == 1  # setup ran once
    metrics = await scrape(wrapped)
    assert metrics.value("llm_telemetry_internal_errors_total", llm_telemetry_component="setup") == 1


class FailingObserver:
    """An observer of the application's own that fails at both ends of every call."""

    def start(self, call: LLMCall) -> None:
        raise ValueError("start failed")

    def end(self, call: LLMCall) -> None:
        raise ValueError("end failed")


async def test_hostile_failing_observer_is_counted_and_the_answer_unchanged(cleanup: list[Any]) -> None:
    calls = Calls()
    wrapped = LLMTelemetryMiddleware(
        OK_JSON, metrics_port=0, metrics_app_path="/metrics", request_logs=False, observers=[FailingObserver(), calls]
    )
    cleanup.append(wrapped)
    for _ in range(3):
        answer = wire(await exchange(wrapped, "/v1/chat/completions", b'{"model": "m"}'))
        assert answer == wire(await exchange(OK_JSON, "/v1/chat/completions", b'{"model": "m"}'))
    assert len(calls.ended) == 3  # the observers after it are still told
    metrics = await scrape(wrapped)
    assert metrics.value("llm_requests_total") == 3
    assert metrics.value("llm_telemetry_internal_errors_total", llm_telemetry_component="observer_start") == 3
    assert metrics.value("llm_telemetry_internal_errors_total", llm_telemetry_component="observer_end") == 3


async def test_hostile_setup_runs_at_lifespan_startup(cleanup: list[Any]) -> None:
    wrapped, _ = observe(OK_JSON)
    cleanup.append(wrapped)
    events = [{"type": "lifespan.startup"}]

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        return {"type": "lifespan.shutdown"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # the wrapped app sees startup; setup already happened before it was called

    wrapped.app = app
    await wrapped({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, lambda message: asyncio.sleep(0))
    assert wrapped._set_up


# --- the SSE decoder's own bounds -------------------------------------------------------------------------------


def test_hostile_sse_empty_data_lines_are_bounded() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    assert decoder.feed(b"data:\n" * 5000) == []
    assert decoder.dropped_events == 1
    assert decoder.feed(b"\ndata: ok\n\n") == [("message", b"ok")]


def test_hostile_sse_many_data_lines_join_exactly() -> None:
    lines = 30_000
    events = SSEDecoder().feed(b"data: 0123456789abcd\n" * lines + b"\n")
    assert events == [("message", b"\n".join([b"0123456789abcd"] * lines))]


def _sse_text(i: int) -> bytes:
    return b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"w%d"},"finish_reason":null}]}\n\n' % i


_SSE_FINISH = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
_SSE_USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
_HEAD = 20  # bytes of the next event a re-chunking proxy sends early; the same for every event here


@pytest.mark.parametrize(
    ("chunks", "finish_reasons", "tokens"),
    [
        # [e0] [e1 + head of e2] [rest of e2] [e3 + head of finish] [rest of finish] [usage]: the fourth chunk has
        # exactly the shape of the second, arriving between events.
        (
            [_sse_text(0), _sse_text(1) + _sse_text(2)[:_HEAD], _sse_text(2)[_HEAD:],
             _sse_text(3) + _SSE_FINISH[:_HEAD], _SSE_FINISH[_HEAD:], _SSE_USAGE],
            ["length"],
            (3, 4),
        ),
        # The same from the first text delta on: the first chunk with one whole event is one with the next's head.
        (
            [_sse_text(1) + _sse_text(2)[:_HEAD], _sse_text(2)[_HEAD:], _sse_text(3) + _SSE_FINISH[:_HEAD],
             _SSE_FINISH[_HEAD:], _SSE_USAGE],
            ["length"],
            (3, 4),
        ),
        # No usage: the output is estimated from the text deltas, all four of them.
        (
            [_sse_text(1) + _sse_text(2)[:_HEAD], _sse_text(2)[_HEAD:], _sse_text(3) + _sse_text(4)[:_HEAD],
             _sse_text(4)[_HEAD:], _SSE_FINISH],
            ["length"],
            None,
        ),
    ],
)  # fmt: skip
def test_hostile_sse_one_event_and_head_of_next_do_not_skip_events(
    cleanup: list[Any], chunks: list[bytes], finish_reasons: list[str], tokens: tuple[int, int] | None
) -> None:
    async def run(chunks: list[bytes]) -> list[LLMCall]:
        wrapped, calls = observe(replying(200, SSE, *chunks))
        cleanup.append(wrapped)
        await exchange(wrapped, "/v1/chat/completions", b'{"model": "m", "stream": true}')
        return calls.ended

    (call,) = asyncio.run(run(chunks))
    (whole,) = asyncio.run(run([b"".join(chunks)]))
    assert call.finish_reasons == whole.finish_reasons == finish_reasons
    assert (call.input_tokens, call.output_tokens) == (whole.input_tokens, whole.output_tokens)
    if tokens is not None:
        assert (call.input_tokens, call.output_tokens) == tokens


def test_hostile_sse_overlong_partial_line_after_a_line_break_is_not_kept() -> None:
    """The bound holds for the bytes after a chunk's last line break too: a chunk that ends a line and then sends
    8 MiB without one leaves the decoder holding no more than the event limit once the chunk is gone (the event is
    dropped at once, not when a later chunk comes, which a stalled stream may never send)."""
    decoder = SSEDecoder()
    tracemalloc.start()
    try:
        chunk = b"data: a\n\ndata: " + b"y" * (8 << 20)
        assert decoder.feed(chunk) == [("message", b"a")]
        del chunk
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 2 << 20, held
    assert decoder.feed(b"y\n\ndata: ok\n\n") == [("message", b"ok")]
    assert decoder.dropped_events == 1


def test_hostile_sse_event_dropped_by_its_data_lines_keeps_them_in_its_tail_and_leaves_nothing_behind() -> None:
    """An event whose data lines add up past the limit (none of them over it alone) is dropped with its lines so far
    in its tail, joined by LF as the event's data would have been, then the line that went over; the next event
    starts afresh, with none of the dropped one's data or name."""
    decoder = SSEDecoder(max_event_bytes=64)
    events = decoder.feed(b"event: big\ndata: one\ndata: two\ndata: " + b"x" * 58 + b"\ndata: more\n\ndata: ok\n\n")
    assert events == [("message", b"ok")]
    assert (decoder.dropped_events, decoder.dropped_event) == (1, "big")
    assert decoder.dropped_tail() == b"one\ntwo\n" + b"x" * 58 + b"\ndata: more"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"data: " + b"x" * 20 + b"\n\ndata: ok\n\n", [("message", b"ok")]),  # a 26-byte line, over 16 bytes
        (b"data: " + b"x" * 20 + b"\n" + b"data:" * 4, []),  # the same event goes on with another long line
    ],
)
def test_hostile_sse_overlong_line_drops_its_event_however_it_is_cut(
    body: bytes, expected: list[tuple[str, bytes]]
) -> None:
    for cut in range(len(body) + 1):
        decoder = SSEDecoder(max_event_bytes=16)
        events = decoder.feed(body[:cut]) + decoder.feed(body[cut:]) + decoder.close()
        assert (events, decoder.dropped_events) == (expected, 1), cut


def test_hostile_sse_short_data_lines_cost_about_their_bytes() -> None:
    """An event of a million one-byte data lines stays within the event limit's bytes, and so does the decoder's
    memory: the lines are joined as they come, not kept as a million objects (some forty times their bytes)."""
    decoder = SSEDecoder()
    chunk = b"data: z\n" * 8192
    tracemalloc.start()
    try:
        for _ in range(64):  # just under the 1 MiB limit, as one event still being assembled
            assert decoder.feed(chunk) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoder.dropped_events == 0
    assert peak < 3 * 1024 * 1024, peak
    assert decoder.feed(b"\n") == [("message", b"\n".join([b"z"] * 8192 * 64))]


def _completed_event(text_chars: int, after_usage: bytes = b"}}") -> bytes:
    """A Responses stream's ``response.completed`` event, its data on one line whose output text is ``text_chars``
    long and whose usage member is followed by ``after_usage``."""
    data = (
        b'{"type":"response.completed","sequence_number":1,"response":{"id":"resp_1","object":"response",'
        b'"model":"served-model","status":"completed","output":[{"type":"message","id":"m1","role":"assistant",'
        b'"content":[{"type":"output_text","text":"' + b"A" * text_chars + b'"}]}],'
        b'"usage":{"input_tokens":11,"output_tokens":7,"total_tokens":18}' + after_usage
    )
    return b"event: response.completed\ndata: " + data + b"\n\n"


async def _responses_stream(cleanup: list[Any], event: bytes, split: bool = False) -> Metrics:
    """One Responses stream of ``event`` through the middleware (``split``: its blank line in a chunk of its own)."""
    wrapped, _ = observe(replying(200, SSE, *([event[:-2], event[-2:]] if split else [event])))
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/responses", b'{"model": "asked-model", "input": "hi", "stream": true}')
    return await scrape(wrapped)


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "line-then-its-end"])
@pytest.mark.parametrize(("over", "read_whole"), [(0, True), (1, False)], ids=["1MiB-line", "1MiB+1-line"])
async def test_hostile_sse_event_line_of_one_mebibyte_is_read_and_one_byte_more_is_dropped(
    cleanup: list[Any], over: int, read_whole: bool, split: bool
) -> None:
    """The documented bound on an SSE event ("Bounds" in docs/metrics.md): a data line of 1 MiB, field name and all,
    is read whole (the served model is the response's), whether it comes with its line break or without (the line
    kept whole between chunks); one byte longer, the event is dropped, and its usage is still read from its last
    bytes, with how it ended."""
    line_without_text = len(_completed_event(0)) - len(b"event: response.completed\n") - 2
    event = _completed_event((1 << 20) - line_without_text + over)
    metrics = await _responses_stream(cleanup, event, split)
    served = metrics.value("gen_ai_server_request_duration_seconds_count", gen_ai_response_model="served-model")
    assert served == (1 if read_whole else 0)
    assert metrics.value("gen_ai_server_request_duration_seconds_count") == 1
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input", llm_usage_source="reported") == 11
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 7
    assert metrics.value("llm_finish_reasons_total", llm_finish_reason="stop") == 1
    assert internal_errors(metrics) == 0


async def test_hostile_sse_usage_on_the_data_lines_before_the_one_that_overflows_is_read(cleanup: list[Any]) -> None:
    """A completion event sent as several data lines (pretty-printed JSON: SSE joins them with LF) and over the
    event limit only with its last line: the usage members that came on the lines before are read from its tail."""
    lines = [
        b'{"type":"response.completed","response":{"status":"completed","output_text":"' + b"A" * ((1 << 20) - 200)
        + b'",',
        b'"usage":{"input_tokens":11,',
        b'"output_tokens":7,"total_tokens":18,"note":"' + b"B" * 300 + b'"}}}',
    ]  # fmt: skip
    event = b"event: response.completed\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    metrics = await _responses_stream(cleanup, event)
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input", llm_usage_source="reported") == 11
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 7
    assert metrics.value("llm_finish_reasons_total", llm_finish_reason="stop") == 1
    assert internal_errors(metrics) == 0


@pytest.mark.parametrize(("from_end", "found"), [(64 * 1024, True), (64 * 1024 + 1, False)])
async def test_hostile_sse_dropped_event_usage_is_read_from_its_last_64_kib_only(
    cleanup: list[Any], from_end: int, found: bool
) -> None:
    """Of an event too large to read, its last 64 KiB are kept (the documented memory bound): a usage member that
    starts 64 KiB before the end of its line is read from there; one starting a byte earlier is not (and no tokens
    are counted: the stream had no text delta to estimate from)."""
    usage = b'"usage":{"input_tokens":11,"output_tokens":7,"total_tokens":18}'
    padding = from_end - len(usage) - len(b',"pad":"') - len(b'"}}')
    event = _completed_event(2 << 20, b',"pad":"' + b"B" * padding + b'"}}')
    assert len(event.split(b"\n")[1]) - event.split(b"\n")[1].rindex(b'"usage"') == from_end
    metrics = await _responses_stream(cleanup, event)
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input") == (11 if found else 0)
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output") == (7 if found else 0)
    assert metrics.value("gen_ai_server_request_duration_seconds_count") == 1
    assert internal_errors(metrics) == 0


async def test_hostile_sse_chat_stream_of_one_error_event_without_its_blank_line_is_the_servers_error(
    cleanup: list[Any],
) -> None:
    """A chat stream whose one event is an error whose blank line never came: read at the stream's end before any
    token, it is set aside as the role chunk that opens a stream is (to be read once a later event shows whether it
    is needed); no later event comes, and it is still read: the server's error, not a call that went well."""
    error = b'data: {"error":{"message":"The model is overloaded","type":"server_error"}}\n'
    wrapped, _ = observe(replying(200, SSE, error))
    cleanup.append(wrapped)
    body = b'{"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    await exchange(wrapped, "/v1/chat/completions", body)
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_errors_total", "error_type") == {"server_error"}
    assert internal_errors(metrics) == 0


async def test_hostile_sse_last_error_event_named_only_by_its_event_line_is_the_servers_error(
    cleanup: list[Any],
) -> None:
    """A stream that ends in an error event whose blank line never came, its kind given only by its ``event:`` line
    (the data has no ``type``): the error the server said, not a stream cut short."""
    start = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","model":"claude-x","content":[],"stop_reason":null,'
        b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n'
    )
    delta = (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    )
    wrapped, _ = observe(replying(200, SSE, start, delta, b'event: error\ndata: {"message":"Overloaded"}\n'))
    cleanup.append(wrapped)
    body = b'{"model": "claude-x", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    await exchange(wrapped, "/v1/messages", body)
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_errors_total", "error_type") == {"server_error"}
    assert internal_errors(metrics) == 0


async def test_hostile_chat_chunk_with_text_and_an_error_after_the_first_token_is_the_error(cleanup: list[Any]) -> None:
    """A chat chunk after the first token that carries text and an ``error`` member is no plain text delta (the
    reader's shortcut for those): it is read in full, and its error counted, not taken for a stream cut short."""
    chunks = [
        _chat_chunk(b'{"role":"assistant","content":""}'),
        _chat_chunk(b'{"content":"Hi"}'),
        _chat_chunk(b'{"content":" there"}', b',"error":{"message":"upstream failed","type":"server_error"}'),
    ]
    wrapped, _ = observe(replying(200, SSE, *chunks))
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m", "stream": true, "messages": []}')
    metrics = await scrape(wrapped)
    assert metrics.label_values("llm_errors_total", "error_type") == {"server_error"}
    assert internal_errors(metrics) == 0


def _chat_chunk(delta: bytes, extra: bytes = b"", finish: bytes = b"null") -> bytes:
    return (
        b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":'
        + delta + b',"finish_reason":' + finish + b"}]" + extra + b"}\n\n"
    )  # fmt: skip


async def test_hostile_chat_text_chunk_with_a_tool_call_after_the_first_token_counts_the_call(
    cleanup: list[Any],
) -> None:
    """A chat chunk after the first token with text and a tool call (servers that stream both in one delta) is no
    plain text delta: the tool call is counted."""
    tool = b'"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"lookup","arguments":"{}"}}]'
    chunks = [
        _chat_chunk(b'{"role":"assistant","content":""}'),
        _chat_chunk(b'{"content":"Hi"}'),
        _chat_chunk(b'{"content":" there",' + tool + b"}"),
        _chat_chunk(b"{}", finish=b'"tool_calls"'),
    ]
    wrapped, _ = observe(replying(200, SSE, *chunks))
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m", "stream": true, "messages": []}')
    metrics = await scrape(wrapped)
    assert metrics.value("llm_tool_calls_total", gen_ai_tool_name="lookup") == 1
    assert internal_errors(metrics) == 0


async def test_hostile_chat_usage_on_every_text_chunk_counts_the_last_one_read(cleanup: list[Any]) -> None:
    """A server that reports the usage so far on every chunk (vLLM's ``continuous_usage_stats``), its stream cut
    before the finish: the tokens are those of the last chunk, not of the first token's."""

    def usage(output: int) -> bytes:
        return b',"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}' % (output, 5 + output)

    chunks = [
        _chat_chunk(b'{"role":"assistant","content":""}', usage(0)),
        *(_chat_chunk(b'{"content":"w%d"}' % n, usage(n)) for n in range(1, 5)),
    ]
    wrapped, _ = observe(replying(200, SSE, *chunks))
    cleanup.append(wrapped)
    await exchange(wrapped, "/v1/chat/completions", b'{"model": "m", "stream": true, "messages": []}')
    metrics = await scrape(wrapped)
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 4
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input", llm_usage_source="reported") == 5
    assert internal_errors(metrics) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_hostile_memoryview_body_chunks_are_read(cleanup: list[Any], stream: bool) -> None:
    """ASGI says a body is bytes; an app or a middleware inside ours that sends memoryviews (slices of a buffer it
    reuses) reaches the client as ever, and is read too."""
    events = [
        b'data: {"model": "m", "choices": [{"index": 0, "delta": {"content": "hi there"}}]}\n\n',
        b'data: {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    answer = b'{"model": "m", "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]}'
    chunks = events if stream else [answer[:20], answer[20:]]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE if stream else JSON})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": memoryview(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": memoryview(b"")})

    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    sent: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "m", "stream": %s}' % (b"true" if stream else b"false")}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(bytes(message["body"]))

    await wrapped(scope("/v1/chat/completions"), receive, send)
    assert b"".join(sent) == b"".join(chunks)
    (call,) = calls.ended
    assert (call.error_type, call.finish_reasons, call.response_model) == (None, ["stop"], "m")
    assert call.output_tokens is not None and call.output_tokens > 0
    assert (call.first_token_at is not None) is stream


@pytest.mark.parametrize("kind", ["http.response.pathsend", "http.response.zerocopysend"])
async def test_hostile_a_body_the_server_sends_from_a_file_is_a_whole_answer(cleanup: list[Any], kind: str) -> None:
    """With the ASGI extensions a server advertises, an app may answer from a file (Starlette's FileResponse uses
    ``http.response.pathsend``): the server sends it whole; the call is a success (unread: no tokens), not an app
    that stopped before its last byte."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        if kind == "http.response.pathsend":
            await send({"type": kind, "path": "/srv/cached/answer.json"})
        else:
            await send({"type": kind, "file": 3, "count": 100, "more_body": True})
            await send({"type": kind, "file": 3, "count": 50})

    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "m"}'}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    extended = {**scope("/v1/chat/completions"), "extensions": {kind: {}}}
    await wrapped(extended, receive, send)
    assert [m["type"] for m in sent[1:]] == [kind] * (len(sent) - 1)
    (call,) = calls.ended
    assert (call.status_code, call.error_type) == (200, None)


async def test_hostile_a_client_that_left_before_the_answer_started_got_none_of_it(cleanup: list[Any]) -> None:
    """The client leaves while the app still works on its request (a raw ASGI app reads the ``http.disconnect``
    and answers all the same); the server drops the answer. It is a client disconnect, not a success."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        assert (await receive())["type"] == "http.disconnect"
        answer = b'{"model": "m", "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]}'
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": answer})

    wrapped, calls = observe(app)
    cleanup.append(wrapped)
    await request_then_leave(wrapped, b'{"model": "m"}')
    (call,) = calls.ended
    assert call.error_type == "client_disconnect"


def test_the_demo_answers_a_model_name_holding_a_lone_surrogate() -> None:
    """The demo echoes the request's model in its answers; a lone surrogate (valid JSON as an escape; the SDKs
    refuse to send one, a raw client does) made its non-stream answers a 500 with a traceback: it has no UTF-8
    form."""
    import httpx

    from llm_telemetry.demo.app import bare_app

    messages = ', "messages": [{"role": "user", "content": "hi"}]}'
    with serve(bare_app()) as base:
        for path, body in (
            ("/v1/chat/completions", '{"model": "demo-\\ud800"' + messages),
            ("/v1/embeddings", '{"model": "e-\\udfff", "input": "hi"}'),
            ("/v1/messages", '{"model": "c-\\ud800", "max_tokens": 5' + messages),
        ):
            answer = httpx.post(base + path, content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 200, (path, answer.text)
            assert answer.json()["model"] == json.loads(body)["model"]


def _chat_delta(text: str | None, finish: str | None = None, indent: int | None = None) -> bytes:
    """One chat chunk's JSON (``indent``: pretty-printed, over several lines); ``text`` None: no text, "": the
    role chunk that opens a stream."""
    delta: dict[str, str] = {} if text is None else {"content": text} if text else {"role": "assistant", "content": ""}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return json.dumps(chunk, indent=indent).encode() if indent else json.dumps(chunk, separators=(",", ":")).encode()


def _data_lines(*lines: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + line + end for line in lines) + end


@pytest.mark.parametrize(
    ("lines", "end"),
    [
        # Two chunks' JSON in one event: SSE joins the lines with LF, which is no JSON document; the SDK raises on it.
        ([_chat_delta(" two"), _chat_delta(" docs")], b"\n"),
        # One chunk pretty-printed over several data lines: one JSON document, which the SDK reads as a token.
        (_chat_delta(" pretty", indent=2).split(b"\n"), b"\n"),
        # The same two documents from a server whose lines end in CRLF, or CR (SSE allows both): still joined by LF.
        ([_chat_delta(" two"), _chat_delta(" docs")], b"\r\n"),
        ([_chat_delta(" two"), _chat_delta(" docs")], b"\r"),
    ],
    ids=["two-documents", "pretty-printed", "two-documents-crlf", "two-documents-cr"],
)
def test_hostile_chat_event_of_several_data_lines_counts_as_the_sdk_reads_it(
    cleanup: list[Any], lines: list[bytes], end: bytes
) -> None:
    """A chat stream without usage (its output tokens estimated from its text deltas) with, after its first token,
    one event of several data lines that holds a text delta's bytes: it counts as a token exactly when the official
    SDK yields one for it. Two documents in one event make the SDK raise (the client stops there): no token, as
    before the first token, where such an event was never counted."""
    import openai

    chunks = [_data_lines(_chat_delta(""), end=end), _data_lines(_chat_delta("Hello"), end=end)]
    chunks += [_data_lines(*lines, end=end), _data_lines(_chat_delta(None, "stop"), end=end), b"data: [DONE]" + 2 * end]

    wrapped = LLMTelemetryMiddleware(replying(200, SSE, *chunks), metrics_app_path="/metrics")
    cleanup.append(wrapped)
    texts = []
    with serve(wrapped) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        with contextlib.suppress(ValueError):  # (json.JSONDecodeError, on the event of two documents)
            for chunk in client.chat.completions.create(model="m", messages=[], stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    texts.append(chunk.choices[0].delta.content)
        metrics = settled(int(base.rsplit(":", 1)[1]), _one_request)
    shown = metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="estimated")
    assert shown == len(texts), (texts, metrics.text)
    assert internal_errors(metrics) == 0


def _one_request(metrics: Metrics) -> None:
    assert metrics.value("llm_requests_total") == 1


def _anthropic_delta(text: str, indent: int | None = None) -> bytes:
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return json.dumps(delta, indent=indent).encode() if indent else json.dumps(delta, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "data",
    [
        [_anthropic_delta(" two"), _anthropic_delta(" docs")],
        _anthropic_delta(" pretty", indent=2).split(b"\n"),
    ],
    ids=["two-documents", "pretty-printed"],
)
def test_hostile_anthropic_event_of_several_data_lines_counts_as_the_sdk_reads_it(
    cleanup: list[Any], data: list[bytes]
) -> None:
    """As for chat: an Anthropic stream cut before its message_delta (its output estimated from its deltas) with a
    content_block_delta event of several data lines counts it as a token exactly when the official SDK yields it."""
    import anthropic

    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
             "model": "claude-x", "content": [], "usage": {"input_tokens": 9, "output_tokens": 1}}}  # fmt: skip
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    chunks = [anthropic_events(start, block), b"event: content_block_delta\n" + _data_lines(_anthropic_delta("Hello"))]
    chunks.append(b"event: content_block_delta\n" + _data_lines(*data))

    wrapped = LLMTelemetryMiddleware(replying(200, SSE, *chunks), metrics_app_path="/metrics")
    cleanup.append(wrapped)
    texts = []
    with serve(wrapped) as base:
        client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        with contextlib.suppress(ValueError):  # (json.JSONDecodeError, on the event of two documents)
            messages = [{"role": "user", "content": "hi"}]
            for event in client.messages.create(model="claude-x", max_tokens=5, messages=messages, stream=True):
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    texts.append(event.delta.text)
        metrics = settled(int(base.rsplit(":", 1)[1]), _one_request)
    shown = metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="estimated")
    assert shown == len(texts), (texts, metrics.text)
    assert internal_errors(metrics) == 0
