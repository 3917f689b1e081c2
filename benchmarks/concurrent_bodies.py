"""Memory the middleware holds across many concurrent connections with large bodies: RSS of a real uvicorn server.

    python benchmarks/concurrent_bodies.py [--connections 50,100,200] [--http h11,httptools]
        [--scenarios fast-parse,fast-proxy,drip-parse,answer-unread,answer-stalled] [--body-mib 8] [--settle 0.3]

Each row starts a fresh uvicorn (the chosen HTTP implementation) serving one raw ASGI app, bare or wrapped in the
middleware (defaults, no metrics listener), opens N connections at once with raw sockets and, once every request
has reached the point the scenario holds it at, reads the server's RSS (``VmRSS``) and compares it with its RSS
before the load. The app then lets every request go. The scenarios:

- ``fast-parse``: a ``--body-mib`` (7.75 MiB: within the 8 MiB limit with each piece's count) JSON request sent
  at once; the app reads it whole, joins and parses it (as
  Starlette's ``request.json()`` does), then waits (the model working) before a small answer.
- ``fast-proxy``: the same body, read by an app that hands each piece on and keeps none (a gateway forwarding the
  body upstream), then waits.
- ``drip-parse``: a ``--drip-mib`` body written 1 KiB at a time with a pause between writes; parsed, then waits.
- ``answer-unread``: a small request answered with an 8 MiB JSON body (just under the reader's limit) sent in
  64 KiB pieces, to a client that reads nothing.
- ``answer-stalled``: the same answer to a client that reads ``--stall-mib`` (2 MiB) of it and then stops reading
  (more, and the kernel's socket buffers take the rest: the answer ends).

The ``added`` column is the RSS the load added, ``trimmed`` the same once the server has handed the memory it freed
back to the kernel (glibc's ``malloc_trim``: what is alive, where ``added`` also shows what the allocator keeps for
reuse), ``ours - bare`` the middleware's share of each, and ``per conn`` its share of what is alive divided by N.
A fresh process per row: glibc keeps freed large blocks for reuse, so a second load in the same process would start
from another baseline. The budget of the middleware's bytes kept to be read is the environment's
(``LLM_TELEMETRY_MAX_INSPECTED_BYTES``, 256 MiB by default): set it to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import socket
import sys
import time
from typing import Any

import procs

#: The JSON answer of the answer-* scenarios: just under the reader's 8 MiB limit, so all of it is kept to be read.
ANSWER_BYTES = 8 * 1024 * 1024 - 4096
ANSWER_PIECE = 64 * 1024
DRIP_PIECE = 1024


def _answer() -> bytes:
    head = b'{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant",'
    tail = b'},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}'
    filler = ANSWER_BYTES - len(head) - len(tail) - len(b'"content":""')
    return head + b'"content":"' + b"x" * filler + b'"' + tail


def _trim() -> None:
    """Hand the memory freed so far back to the kernel (glibc's ``malloc_trim``), so that RSS shows what is alive."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_app(kind: str, variant: str) -> Any:
    holding = 0
    release = asyncio.Event()
    answer = _answer() if kind.startswith("answer") else b""

    async def small(send: Any, body: bytes, status: int = 200) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal holding
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/_state":
            if scope["query_string"] == b"trim":
                _trim()
            await small(send, json.dumps({"holding": holding}).encode())
            return
        if path == "/_release":
            release.set()
            await small(send, b"{}")
            return
        if kind.endswith("proxy"):
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
        else:
            chunks = []
            more = True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks)
            del chunks
            request = json.loads(body) if body else None  # noqa: F841 (held, as an app holds its parsed request)
        if kind.startswith("answer"):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            holding += 1
            for at in range(0, len(answer), ANSWER_PIECE):
                await send({"type": "http.response.body", "body": answer[at : at + ANSWER_PIECE], "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        holding += 1
        await release.wait()
        await small(send, b'{"id":"x","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}')

    if variant == "bare":
        return app
    from llm_telemetry import LLMTelemetryMiddleware

    return LLMTelemetryMiddleware(app, metrics_port=0)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(
        build_app(args.app, args.variant), host="127.0.0.1", port=args.port, http=args.http, log_level="warning"
    )


def _request_head(length: int, port: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\nconnection: close\r\n\r\n"
    ).encode()


def _body(size: int) -> bytes:
    head = b'{"model":"m","messages":[{"role":"user","content":"'
    tail = b'"}]}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


async def _client(
    port: int, scenario: str, body: bytes, stop: asyncio.Event, ready: list[int], stall_mib: float
) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, _request_head(len(body), port))
        if scenario.startswith("drip"):
            view = memoryview(body)
            for at in range(0, len(body), DRIP_PIECE):
                await loop.sock_sendall(sock, view[at : at + DRIP_PIECE])
                await asyncio.sleep(0.002)
        else:
            await loop.sock_sendall(sock, memoryview(body))  # (a view: no copy of the body per connection)
        if scenario == "answer-unread":
            await stop.wait()
            return
        if scenario == "answer-stalled":
            buffer = bytearray(256 * 1024)
            left = int(stall_mib * 1024 * 1024)
            while left > 0:
                got = await loop.sock_recv_into(sock, buffer)
                if not got:
                    break
                left -= got
            ready.append(1)
            await stop.wait()
            return
        while await loop.sock_recv(sock, 65536):
            pass
    finally:
        sock.close()


def _state(port: int, query: str = "") -> int:
    """Requests holding; -1 while the server is too busy to answer (parsing 200 bodies of 8 MiB on two cores)."""
    try:
        holding: int = json.loads(procs.http_get(f"http://127.0.0.1:{port}/_state{query}", timeout=30))["holding"]
    except OSError:
        return -1
    return holding


def _settled_rss(pid: int, every: float = 0.3) -> int:
    """VmRSS once three readings ``every`` seconds apart agree within 1 MiB (a connection's bytes still arriving)."""
    last = procs.memory_kib(pid)[0]
    steady = 0
    for _ in range(100):
        time.sleep(every)
        now = procs.memory_kib(pid)[0]
        steady = steady + 1 if abs(now - last) < 1024 else 0
        last = now
        if steady >= 2:
            break
    return last


async def _load(args: argparse.Namespace, port: int, pid: int, scenario: str, n: int) -> tuple[int, int]:
    if scenario.startswith("answer"):
        body = _body(200)
    elif scenario.startswith("drip"):
        body = _body(int(args.drip_mib * 1024 * 1024))
    else:
        body = _body(int(args.body_mib * 1024 * 1024))
    stop = asyncio.Event()
    ready: list[int] = []
    started = time.monotonic()
    tasks = [asyncio.create_task(_client(port, scenario, body, stop, ready, args.stall_mib)) for _ in range(n)]
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.2)
        done = [t for t in tasks if t.done() and t.exception() is not None]
        if done:
            raise RuntimeError(f"a client failed: {done[0].exception()!r}")
        holding = await loop.run_in_executor(None, _state, port)
        if holding >= n and (scenario != "answer-stalled" or len(ready) >= n):
            break
        if time.monotonic() - started > 300:
            raise RuntimeError(f"only {holding} of {n} requests reached the hold in 300 s")
    rss = await loop.run_in_executor(None, _settled_rss, pid, args.settle)
    await loop.run_in_executor(None, _state, port, "?trim")
    trimmed = await loop.run_in_executor(None, _settled_rss, pid, args.settle)
    await loop.run_in_executor(None, lambda: procs.http_get(f"http://127.0.0.1:{port}/_release", timeout=60))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return rss, trimmed


def run_row(args: argparse.Namespace, scenario: str, http: str, variant: str, n: int) -> tuple[float, float]:
    port = args.port or procs.free_port()
    app = "answer" if scenario.startswith("answer") else scenario.split("-", 1)[1]
    env = dict(args.env)
    server = procs.start(
        "concurrent_bodies.py",
        ["--serve", "--app", app, "--variant", variant, "--http", http, "--port", str(port)],
        env=env,
    )
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/_state?trim", server)
        idle = _settled_rss(server.pid, args.settle)
        rss, trimmed = asyncio.run(_load(args, port, server.pid, scenario, n))
        return (rss - idle) / 1024, (trimmed - idle) / 1024
    finally:
        log = procs.stop(server)
        if server.returncode not in (0, -15) and log:
            print(log, file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--app", default="parse", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="bare", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--http", default="h11,httptools")
    parser.add_argument("--connections", default="50,100,200")
    parser.add_argument("--scenarios", default="fast-parse,fast-proxy,drip-parse,answer-unread,answer-stalled")
    parser.add_argument("--variants", default="bare,ours")
    parser.add_argument("--body-mib", type=float, default=7.75)
    parser.add_argument("--drip-mib", type=float, default=1.0)
    parser.add_argument("--stall-mib", type=float, default=2.0)
    parser.add_argument(
        "--settle", type=float, default=0.3, help="seconds between the RSS readings that must agree (default 0.3)"
    )
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return 0
    args.env = {k: v for k, v in os.environ.items() if k.startswith("LLM_TELEMETRY_")}
    variants = args.variants.split(",")
    print("MiB of RSS added by the load (trimmed: after malloc_trim, what is alive)")
    head = " ".join(f"{v + ' added':>12} {'trimmed':>8}" for v in variants)
    print(f"{'scenario':15} {'http':9} {'N':>4} {head} {'ours - bare':>11} {'trimmed':>8} {'per conn':>8}")
    for scenario in args.scenarios.split(","):
        for http in args.http.split(","):
            for n in map(int, args.connections.split(",")):
                added = {variant: run_row(args, scenario, http, variant, n) for variant in variants}
                cells = " ".join(f"{added[v][0]:>12.1f} {added[v][1]:>8.1f}" for v in variants)
                extra = ""
                if "bare" in added and "ours" in added:
                    share, live = added["ours"][0] - added["bare"][0], added["ours"][1] - added["bare"][1]
                    extra = f" {share:>11.1f} {live:>8.1f} {live / n:>8.2f}"
                print(f"{scenario:15} {http:9} {n:>4} {cells}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
