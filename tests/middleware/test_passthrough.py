"""The middleware never changes what the client sees: the same bytes, with and without it, whatever arrives."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_telemetry import LLMTelemetryMiddleware
from support import RECORDED_WITHIN, free_port, request_body, scrape, serve

SSE_BODY = [
    b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"Hel',  # an event split mid-JSON
    b'lo"},"finish_reason":null}]}\r\n\r\ndata: {"id":"c","model":"m","choices":[{"index":0,"delta":{"cont',
    b'ent":" w\xc3',  # a UTF-8 character split across chunks
    b'\xa9"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
]


async def fixed_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request deterministically; the response depends on the path and echoes the request body."""
    if scope["type"] != "http":
        return
    body = await request_body(receive)
    path = scope["path"]
    digest = hashlib.sha256(body).hexdigest().encode()
    if path.endswith("/raise/chat/completions"):
        raise RuntimeError("the app failed")
    if path.endswith("/stream/chat/completions"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"x-body-sha256", digest)]})  # fmt: skip
        for chunk in SSE_BODY:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if path.endswith("/gzip/chat/completions"):
        payload = gzip.compress(json.dumps({"model": "m", "usage": {"prompt_tokens": 1}}).encode(), mtime=0)
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return
    if path.endswith("/garbage/chat/completions"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"\xff\xfe{not json", "more_body": True})
        await send({"type": "http.response.body", "body": b"\x00" * 1000})
        return
    if path.endswith("/error/chat/completions"):
        await send({"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {"code": "rate_limit_exceeded"'})  # truncated
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"sha256": "' + digest + b'", "length": %d}' % len(body)})


def raw_exchange(base: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 exchange over a plain socket; the response exactly as it came off the wire, minus ``date``."""
    host, port = base.removeprefix("http://").split(":")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    for key, value in (headers or {}).items():
        head += f"{key}: {value}\r\n"
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    lines = response.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(b"date:"))


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str, int]]:
    port = free_port()
    # The request-id echo is the one deliberate change to a response; it is off here and tested on its own below.
    wrapped = LLMTelemetryMiddleware(
        fixed_app, metrics_port=port, metrics_host="127.0.0.1", max_request_bytes=1 << 20, echo_request_id=False
    )
    with serve(fixed_app) as bare, serve(wrapped) as observed:
        yield bare, observed, port
    wrapped.telemetry.shutdown()


CASES = [
    ("POST", "/v1/stream/chat/completions", json.dumps({"model": "m", "stream": True}).encode(), {}),
    ("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode(), {}),
    ("POST", "/v1/chat/completions", b"{malformed json", {}),
    ("POST", "/v1/chat/completions", b"\xff\xfe\x00 not utf-8", {}),
    ("POST", "/v1/chat/completions", b'{"model": "big", "pad": "' + b"x" * (3 << 20) + b'"}', {}),  # over the cap
    ("POST", "/v1/chat/completions", gzip.compress(b'{"model": "z"}'), {"Content-Encoding": "gzip"}),
    ("POST", "/v1/gzip/chat/completions", b"{}", {}),
    ("POST", "/v1/garbage/chat/completions", b"{}", {}),
    ("POST", "/v1/error/chat/completions", b"{}", {}),
    ("GET", "/v1/chat/completions", b"", {}),
    ("POST", "/not/an/llm/route", b"hello", {}),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"), CASES, ids=[c[1] + f"#{i}" for i, c in enumerate(CASES)]
)
def test_responses_are_byte_identical_with_and_without_middleware(
    servers: tuple[str, str, int], method: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    bare, observed, _ = servers
    expected = raw_exchange(bare, method, path, body, headers)
    assert raw_exchange(observed, method, path, body, headers) == expected
    if method == "POST" and path.endswith("/v1/chat/completions"):
        # The echoed digest proves the request body reached the app intact.
        assert hashlib.sha256(body).hexdigest().encode() in expected


def test_app_exception_is_recorded_and_reraised(servers: tuple[str, str, int]) -> None:
    bare, observed, port = servers
    before = scrape(port).value("llm_errors_total", error_type="app_exception")
    expected = raw_exchange(bare, "POST", "/v1/raise/chat/completions", b'{"model": "m"}')
    assert expected.startswith(b"HTTP/1.1 500")
    assert raw_exchange(observed, "POST", "/v1/raise/chat/completions", b'{"model": "m"}') == expected
    deadline = time.monotonic() + RECORDED_WITHIN
    while scrape(port).value("llm_errors_total", error_type="app_exception") == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scrape(port).value("llm_errors_total", error_type="app_exception") == before + 1


def test_bad_input_is_recorded_without_internal_errors(servers: tuple[str, str, int]) -> None:
    _, observed, port = servers
    before = scrape(port).value("llm_requests_total")
    raw_exchange(observed, "POST", "/v1/garbage/chat/completions", b"{}")
    raw_exchange(observed, "POST", "/v1/error/chat/completions", b"{}")
    # A call is recorded just after its response went out (the client may see the connection close first).
    deadline = time.monotonic() + RECORDED_WITHIN
    while (metrics := scrape(port)).value("llm_requests_total") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    # Garbage we cannot read is a fact of life, not a failure of ours: nothing counted as an internal error.
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
    # A truncated error body still classifies by status.
    assert metrics.value("llm_errors_total", error_type="rate_limit") >= 1


def test_by_default_an_llm_response_is_the_apps_byte_for_byte(servers: tuple[str, str, int]) -> None:
    """With every default (request logs on, so each request has an id), the client gets the app's response as the
    app sent it, headers included, whether or not it sent an id of its own."""
    bare = servers[0]
    wrapped = LLMTelemetryMiddleware(fixed_app, metrics_port=0)
    body = json.dumps({"model": "m", "stream": True}).encode()
    with serve(wrapped) as observed:
        for headers in ({}, {"X-Request-Id": "req-42"}):
            expected = raw_exchange(bare, "POST", "/v1/stream/chat/completions", body, headers)
            assert raw_exchange(observed, "POST", "/v1/stream/chat/completions", body, headers) == expected
    wrapped.telemetry.shutdown()


def test_request_id_echo_adds_only_that_header(servers: tuple[str, str, int]) -> None:
    bare = servers[0]
    port = free_port()
    wrapped = LLMTelemetryMiddleware(fixed_app, metrics_port=port, metrics_host="127.0.0.1", echo_request_id=True)
    body = json.dumps({"model": "m", "stream": True}).encode()
    with serve(wrapped) as observed:
        expected = raw_exchange(bare, "POST", "/v1/stream/chat/completions", body)
        got = raw_exchange(observed, "POST", "/v1/stream/chat/completions", body)
        kept = raw_exchange(observed, "POST", "/v1/stream/chat/completions", body, {"X-Request-Id": "req-42"})
    wrapped.telemetry.shutdown()
    for response, echoed in ((got, None), (kept, b"req-42")):
        added = [line for line in response.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        assert len(added) == 1
        value = added[0].split(b":", 1)[1].strip()
        assert value == echoed if echoed else len(value) >= 16  # the client's id back, or a generated one
        assert b"\r\n".join(line for line in response.split(b"\r\n") if line not in added) == expected


#: One start message for every response, as an app may keep it (a module-level constant): whatever the middleware adds
#: to a response must not land in the app's own dict, or the next response (another client's) would carry it.
SHARED_START: dict[str, Any] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json")],
}


async def shared_start_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await request_body(receive)
    await send(SHARED_START)
    await send({"type": "http.response.body", "body": b'{"id":"c","model":"m","choices":[]}'})


def test_the_echoed_request_id_is_each_requests_own_when_the_app_reuses_its_start_message() -> None:
    wrapped = LLMTelemetryMiddleware(shared_start_app, metrics_port=0, request_logs=False, echo_request_id=True)
    ids = []
    with serve(wrapped) as base, httpx.Client(base_url=base) as client:
        for sent in ("aaa", "bbb", None, None):
            headers = {"x-request-id": sent} if sent else {}
            response = client.post("/v1/chat/completions", json={"model": "m"}, headers=headers)
            ids.append((sent, response.headers.get_list("x-request-id")))
    wrapped.telemetry.shutdown()
    assert ids[:2] == [("aaa", ["aaa"]), ("bbb", ["bbb"])]
    generated = [echoed for _, echoed in ids[2:]]
    assert all(len(echoed) == 1 and len(echoed[0]) >= 16 for echoed in generated) and generated[0] != generated[1]
    assert SHARED_START["headers"] == [(b"content-type", b"application/json")]
