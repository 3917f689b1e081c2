"""A small closed-loop HTTP/1.1 load generator on raw asyncio sockets (uvloop when available).

Why not httpx or the openai SDK: their per-request cost (a few hundred microseconds) is of the same order
as the server's, so they could not saturate one server core from one client core. This client writes a
pre-built request and only finds where each response ends (``Content-Length`` or the last chunk of a
chunked body), which costs a few microseconds, so the server is always the bottleneck. It also checks every
response: status 200 and, for streams, the end of the stream (``data: [DONE]``, or a Responses stream's usage).

It runs in its own process (see :class:`LoadGenerator`), pinned to another core than the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
from time import perf_counter
from typing import Any, cast


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One kind of request.

    Args:
        key: short name for tables.
        path: request path.
        body: JSON request body.
        headers: extra request headers.
        chunks: SSE events in each response (0 for a JSON response).
        end: bytes the last 64 of a stream's response hold when it ended as it should.
    """

    key: str
    path: str
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    chunks: int = 0
    end: bytes = b"data: [DONE]"

    @property
    def stream(self) -> bool:
        return self.chunks > 0

    def request_bytes(self, port: int) -> bytes:
        body = json.dumps(self.body, separators=(",", ":")).encode()
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json",
            "Authorization: Bearer bench",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_MESSAGES = [{"role": "user", "content": "How do I know my p95 time to first token?"}]


def _stream(words: int, obfuscated: bool = False) -> Scenario:
    # The demo sends a role chunk, one chunk per word, a finish chunk, a usage chunk and [DONE]; ``obfuscated``:
    # each of those events (but [DONE]) ends with an "obfuscation" member of its own value, as OpenAI's do.
    headers = (("x-demo-words", str(words)),) + ((("x-demo-obfuscation", "1"),) if obfuscated else ())
    return Scenario(
        f"stream{words}{'o' if obfuscated else ''}",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": _MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
        headers,
        chunks=words + 4,
    )


def _responses_stream(words: int) -> Scenario:
    # A Responses API stream as OpenAI sends it (see the demo): created, in_progress, the item and its content part
    # added, one delta per word (each numbered, with its own obfuscation value), text, part and item done, and the
    # completed response with the usage, whose last member is "total_tokens".
    return Scenario(
        f"responses{words}",
        "/v1/responses",
        {"model": "gpt-4.1-mini", "input": _MESSAGES[0]["content"], "stream": True},
        (("x-demo-words", str(words)),),
        chunks=words + 8,
        end=b'"total_tokens":',
    )


def _long_context(size: int) -> Scenario:
    # A non-stream chat whose prompt is ``size`` bytes of words: a long-context or multimodal request body.
    words = ("lorem ipsum dolor sit amet " * (size // 26 + 1))[:size]
    return Scenario(
        "body1m", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}]}
    )


SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario("chat", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": _MESSAGES}),
        _stream(64),
        _stream(64, obfuscated=True),
        _stream(256),
        _stream(4096),
        _responses_stream(64),
        _long_context(1 << 20),
        Scenario(
            "embeddings",
            "/v1/embeddings",
            {"model": "text-embedding-3-small", "input": ["one two three", "four five six"]},
        ),
    )
}


@dataclasses.dataclass
class LoadResult:
    """What one measured batch produced, from the client's side."""

    requests: int
    failures: int
    elapsed: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends and waits for one whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._head_end = -1
        self._length: int | None = None
        self._chunked = False
        self._status = 0
        self._done: asyncio.Future[bytes] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self._parts, self._size, self._head_end, self._length, self._chunked = [], 0, -1, None, False
        self._done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        tail = await self._done
        return self._status, tail

    def data_received(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._head_end < 0:
            joined = b"".join(self._parts)
            self._parts = [joined]
            end = joined.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head_end = end + 4
            head = joined[:end].decode("latin-1").lower()
            self._status = int(head[9:12])
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name == "content-length":
                    self._length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    self._chunked = True
        if self._length is not None:
            if self._size - self._head_end >= self._length:
                self._finish()
        elif self._chunked:
            # The last chunk is "0" CRLF CRLF; a response is complete when the stream ends with it.
            if data.endswith(b"\r\n0\r\n\r\n") or b"".join(self._parts[-2:]).endswith(b"\r\n0\r\n\r\n"):
                self._finish()

    def _finish(self) -> None:
        tail = b"".join(self._parts[-3:])[-64:]
        if self._done is not None and not self._done.done():
            self._done.set_result(tail)


async def _worker(
    port: int, data: bytes, end: bytes, budget: list[int], latencies: list[float], failures: list[int]
) -> None:
    """Send ``data`` until the budget is spent; a response fails unless its status is 200 and, when ``end`` is not
    empty, its last bytes hold ``end``."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
    try:
        while budget[0] > 0:
            budget[0] -= 1
            started = perf_counter()
            status, tail = await conn.request(data)
            latencies.append(perf_counter() - started)
            if status != 200 or (end and end not in tail):
                failures[0] += 1
    finally:
        assert conn.transport is not None
        conn.transport.close()


async def run_load(port: int, scenario: Scenario, requests: int, concurrency: int) -> LoadResult:
    """Send ``requests`` requests over ``concurrency`` keep-alive connections, each waiting for its answer."""
    data = scenario.request_bytes(port)
    budget = [requests]
    latencies: list[float] = []
    failures = [0]
    started = perf_counter()
    await asyncio.gather(
        *(
            _worker(port, data, scenario.end if scenario.stream else b"", budget, latencies, failures)
            for _ in range(concurrency)
        )
    )
    return LoadResult(len(latencies), failures[0], perf_counter() - started, latencies)


def _serve(conn: multiprocessing.connection.Connection, cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    while True:
        command = conn.recv()
        if command is None:
            return
        port, key, requests, concurrency = command
        try:
            result = runner(run_load(port, SCENARIOS[key], requests, concurrency))
        except Exception as exc:
            conn.send(exc)
        else:
            conn.send(result)


class LoadGenerator:
    """The load generator in its own process, pinned to ``cpu``; one batch at a time.

    Example::

        with LoadGenerator(cpu=1) as load:
            result = load.run(8000, "stream64", requests=500, concurrency=8)
    """

    def __init__(self, cpu: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, cpu), daemon=True, name="bench-loadgen")

    def __enter__(self) -> LoadGenerator:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def run(self, port: int, scenario: str, requests: int, concurrency: int) -> LoadResult:
        self._conn.send((port, scenario, requests, concurrency))
        result = self._conn.recv()
        if isinstance(result, Exception):
            raise result
        assert isinstance(result, LoadResult)
        return result
