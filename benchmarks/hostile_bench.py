"""Cost of pathological inputs, which must grow linearly with their size (docs/metrics.md, "Bounds").

Each input is fed through the real middleware in-process (no network: the cost measured is ours alone), at
several sizes. A linear cost shows as a constant time per unit (the ``per unit`` column): a quadratic one would
grow with the size, tenfold per row. Peak memory is the Python heap allocated during the request
(``tracemalloc``), which must stay bounded by the input and the documented caps.

    python benchmarks/hostile_bench.py [--repeat 3] [--scale 1]

After each input's rows, a line compares the added cost per unit at its largest size with the one at its smallest:
a linear (or bounded) cost keeps that ratio near 1 or below; a quadratic one multiplies it by the size ratio (100x
over the three sizes). ``--scale`` shrinks every size (0.01 for a quick check that the script runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import statistics
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

from llm_telemetry import LLMTelemetryMiddleware

Case = tuple[str, str, Callable[[int], tuple[bytes, list[bytes]]], list[int], str]


def many_data_lines(n: int) -> tuple[bytes, list[bytes]]:
    """One SSE event of ``n`` data lines (16 bytes each), sent as one chunk."""
    return b'{"stream": true}', [b"data: 0123456789abcdef\n" * n + b"\n"]


def empty_data_lines(n: int) -> tuple[bytes, list[bytes]]:
    """``n`` empty ``data:`` lines that never end their event, in 4 KiB chunks."""
    body = b"data:\n" * n
    return b'{"stream": true}', [body[i : i + 4096] for i in range(0, len(body), 4096)]


def long_line_tiny_chunks(n: int) -> tuple[bytes, list[bytes]]:
    """One ``n``-byte line delivered 16 bytes at a time (the buffer must not be copied per chunk)."""
    line = b"data: " + b"x" * n
    return b'{"stream": true}', [line[i : i + 16] for i in range(0, len(line), 16)] + [b"\n\n"]


def text_deltas(n: int) -> tuple[bytes, list[bytes]]:
    """A normal stream of ``n`` chat text deltas, one per chunk (the reference: the common case)."""
    event = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"word"},"finish_reason":null}]}\n\n'
    return b'{"stream": true}', [event] * n


def request_body(n: int) -> tuple[bytes, list[bytes]]:
    """A JSON request of ``n`` bytes (a long conversation), answered with a small JSON body."""
    message = {"role": "user", "content": "x" * 1000}
    count = max(1, n // 1030)
    return json.dumps({"model": "m", "messages": [message] * count}).encode(), [b'{"model": "m"}']


def tool_results(n: int) -> tuple[bytes, list[bytes]]:
    """A request reporting ``n`` tool results of three tools (each a message of its own, ~50 bytes)."""
    turn = {"role": "assistant", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": f"tool{i}", "arguments": "{}"}} for i in range(3)
    ]}  # fmt: skip
    results = [{"role": "tool", "tool_call_id": f"c{i % 3}", "content": "ok"} for i in range(n)]
    return json.dumps({"model": "m", "messages": [turn, *results]}).encode(), [b'{"model": "m"}']


def deep_request(n: int) -> tuple[bytes, list[bytes]]:
    """A request body of ``n`` opening brackets (refused at the parser's depth limit)."""
    return b"[" * n, [b'{"model": "m"}']


def gzip_bomb(n: int) -> tuple[bytes, list[bytes]]:
    """A gzipped JSON answer that inflates to ``n`` bytes (spaces, ~1,000:1), in 64 KiB chunks: decompressed for
    reading only up to the JSON limit, so the cost stops growing there."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * (1 << 20)
    packed = [packer.compress(b'{"model": "m", "pad": "')]
    packed += [packer.compress(block) for _ in range(n >> 20)]
    packed.append(packer.compress(b'"}') + packer.flush())
    body = b"".join(packed)
    return b'{"model": "m"}', [body[i : i + 65536] for i in range(0, len(body), 65536)]


def gzip_one_chunk(n: int) -> tuple[bytes, list[bytes]]:
    """An event stream of ``n`` bytes of text deltas that do not compress (gzip's stored blocks), in one chunk:
    decompressed a step at a time up to the stream limit, each step must not copy what remains of the chunk (which
    made the cost grow with the square of the size: 9 s at 64 MiB)."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 900 + b'"}}]}\n\n'
    return b'{"model": "m"}', [gzip.compress(event * (n // len(event)), 0)]


def empty_events_in_chunks(n: int) -> tuple[bytes, list[bytes]]:
    """``n`` empty events (``data:`` and a blank line), 16 KiB a chunk: each chunk reads quickly, and only the time
    limit of the whole answer (``apis.READ_BUDGET_SECONDS``) bounds their sum, so our time stops growing there."""
    body = b"data:\n\n" * n
    return b'{"stream": true}', [body[i : i + 16384] for i in range(0, len(body), 16384)]


def gzip_events_in_chunks(n: int) -> tuple[bytes, list[bytes]]:
    """The same ``n`` empty events gzipped, each 256 KiB of them compressed and flushed on its own (~400 bytes a
    chunk, inflating to 256 KiB: as a relay of a compressed upstream sends them)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    body = b"data:\n\n" * n
    step = 256 << 10
    chunks = [packer.compress(body[i : i + step]) + packer.flush(zlib.Z_SYNC_FLUSH) for i in range(0, len(body), step)]
    return b'{"stream": true}', [*chunks, packer.flush()]


def gzip_empty_flushes(n: int) -> tuple[bytes, list[bytes]]:
    """A gzipped stream whose ``n`` chunks after the first inflate to nothing: a relay flushing its compressor with
    nothing new may send an empty block each time (5 bytes). The app's own cost grows with them too (a send each)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = packer.compress(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n') + packer.flush(zlib.Z_SYNC_FLUSH)
    empty = b"\x00\x00\x00\xff\xff"  # a stored block of no bytes (zlib's own flush gives nothing when nothing is new)
    return b'{"stream": true}', [first, *[empty] * n, packer.flush()]


CASES: list[Case] = [
    ("SSE: data lines in one event", "line", many_data_lines, [3_000, 30_000, 300_000], "text/event-stream"),
    ("SSE: empty data lines, no event end", "line", empty_data_lines, [10_000, 100_000, 1_000_000],
     "text/event-stream"),
    ("SSE: one line in 16-byte chunks", "KiB", long_line_tiny_chunks, [64_000, 256_000, 1_000_000],
     "text/event-stream"),
    ("SSE: plain text deltas (reference)", "event", text_deltas, [1_000, 10_000, 100_000], "text/event-stream"),
    ("JSON request body", "MiB", request_body, [1 << 20, 2 << 20, 4 << 20], "application/json"),
    ("request of nested brackets", "MiB", deep_request, [1 << 20, 2 << 20, 4 << 20], "application/json"),
    ("request with tool results", "result", tool_results, [1_000, 10_000, 100_000], "application/json"),
    ("gzip answer inflating to (bomb)", "MiB", gzip_bomb, [8 << 20, 64 << 20, 512 << 20], "application/json|gzip"),
    ("gzip stream in one chunk", "MiB", gzip_one_chunk, [4 << 20, 16 << 20, 64 << 20], "text/event-stream|gzip"),
    ("SSE: empty events, 16 KiB chunks", "event", empty_events_in_chunks, [100_000, 1_000_000, 4_000_000],
     "text/event-stream"),
    ("gzip: empty events, chunk by chunk", "event", gzip_events_in_chunks, [100_000, 1_000_000, 8_000_000],
     "text/event-stream|gzip"),
    ("gzip: chunks inflating to nothing", "chunk", gzip_empty_flushes, [10_000, 100_000, 1_000_000],
     "text/event-stream|gzip"),
]  # fmt: skip

UNITS = {"line": 1, "event": 1, "chunk": 1, "result": 1, "KiB": 1024, "MiB": 1 << 20}


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    content_type, _, coding = _ANSWER["type"].partition(b"|")
    headers = [(b"content-type", content_type)] + ([(b"content-encoding", coding)] if coding else [])
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in _ANSWER["chunks"]:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


_ANSWER: dict[str, Any] = {}


async def _one(app: Any, body: bytes) -> None:
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}  # fmt: skip
    await app(scope, receive, send)


def measure(app: Any, body: bytes, repeat: int) -> tuple[float, float]:
    """Median seconds over ``repeat`` requests, and peak traced heap (MiB) of one."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        asyncio.run(_one(app, body))
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    asyncio.run(_one(app, body))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="requests per size; the median is reported")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every input size by this")
    parser.add_argument("--only", metavar="TEXT", default="", help="only the inputs whose title contains TEXT")
    args = parser.parse_args()
    import procs  # (beside this script)

    procs.drop_settings()  # metrics only, as configured here: no tracing turned on by the shell's OTEL_* settings
    middleware = LLMTelemetryMiddleware(_app, metrics_port=0, request_logs=False)
    print(f"{'input':38} {'size':>10} {'bare ms':>9} {'ours ms':>9} {'added µs/unit':>14} {'peak MiB':>9}")
    for title, unit, make, sizes, content_type in CASES:
        if args.only not in title:
            continue
        per_unit = []
        for size in (max(UNITS[unit], int(size * args.scale)) for size in sizes):
            body, chunks = make(size)
            _ANSWER.update(type=content_type.encode(), chunks=chunks)
            bare, _ = measure(_app, body, args.repeat)
            ours, peak = measure(middleware, body, args.repeat)
            units = size / UNITS[unit]
            shown = f"{units:,.0f} {unit}"
            added = (ours - bare) / units * 1e6
            per_unit.append(ours / units)
            print(f"{title:38} {shown:>10} {bare * 1e3:9.1f} {ours * 1e3:9.1f} {added:14.3f} {peak:9.1f}")
        growth = per_unit[-1] / per_unit[0]
        verdict = "linear or better" if growth <= 3 else "GROWS FASTER THAN LINEAR"
        print(f"{'':38} {'':>10} our time per unit, largest size / smallest: x{growth:.2f} ({verdict})")
    middleware.telemetry.shutdown()


if __name__ == "__main__":
    main()
