"""Profile the middleware's hot path in-process: the demo app driven directly through ASGI, no sockets.

Usage: ``python benchmarks/profile_hot_path.py [--scenario stream64] [--requests 2000] [--variant ours[,...]]
[--top 25]`` (``--by-length``: the cost per request and per stream event instead, see :func:`by_length`;
``--per-chunk``: the send wrapper's cost per whole-chunk delta, see :func:`per_chunk`; ``--rechunked``: the reader's
cost per event of a re-chunked stream, see :func:`rechunked`). It
prints the CPU time per request (all threads of the process: a tracing variant's span export
is flushed and counted inside each timed window) of the chosen variants and of the bare app, measured
interleaved, and a cProfile listing of the last variant, sorted by own time (``--top 0``: none). Without the network and
uvicorn the per-request figures are smaller than in ``benchmarks/run``, but the difference between the two
is the middleware's cost, with far less noise, which makes it the tool for before/after comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pathlib
import pstats
import sys
import time
from collections.abc import Iterator
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs  # noqa: E402
from apps import BENCH_METRICS_PORT, BENCH_OTLP_ENDPOINT, BENCH_VARIANT, VARIANTS  # noqa: E402
from loadgen import SCENARIOS, Scenario, _stream  # noqa: E402


def _scope(scenario: Scenario) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer bench")]
    headers += [(k.encode(), v.encode()) for k, v in scenario.headers]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": scenario.path,
        "raw_path": scenario.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


#: Tracing variants flush their span processors this often (in requests) inside the timed window.
FLUSH_EVERY = 256


async def drive(app: Any, scenario: Scenario, requests: int, flush: Any = None) -> int:
    """Send ``requests`` requests straight into the ASGI app; return the response body messages seen.

    ``flush`` (a tracing variant's ``force_flush``) is called every :data:`FLUSH_EVERY` requests and at the end,
    so the spans of these requests are exported, and their CPU counted, before the caller reads its clock: the
    loop never yields to the batch processor's thread, which would otherwise do that work during a later
    measurement (or drop spans at its queue limit).

    Every answer must have status 200: a scenario the app refused would otherwise be measured as its error path,
    which costs a fraction of the LLM path (raises ``RuntimeError``).
    """
    body = json.dumps(scenario.body).encode()
    messages = 0

    for i in range(requests):
        if flush is not None and i and i % FLUSH_EVERY == 0:
            flush()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # a real server's receive blocks until the client disconnects
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal messages
            if message["type"] == "http.response.body":
                messages += 1
            elif message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"{scenario.key}: the app answered {message['status']}, not 200")

        await app(_scope(scenario), receive, send)
    if flush is not None:
        flush()
    return messages


def _ours_traces_unsampled() -> Any:
    """``ours+traces`` with a sampler that records nothing: what tracing costs besides the recorded span."""
    from apps import _metrics_port, _otlp_endpoint
    from llm_telemetry.demo.app import create_app

    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = _otlp_endpoint()
    os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_TRACES_SAMPLER"] = "always_off"
    return create_app(metrics_port=_metrics_port(), metrics_host="127.0.0.1", request_logs=False)


#: Variants of this profile only (not in benchmarks/run), beside those of apps.py.
PROFILE_VARIANTS: dict[str, Any] = {"ours+traces-unsampled": _ours_traces_unsampled}


def build(variant: str) -> Any:
    os.environ[BENCH_VARIANT] = variant
    os.environ.setdefault(BENCH_METRICS_PORT, "0")
    if variant in PROFILE_VARIANTS:
        return PROFILE_VARIANTS[variant]()
    return VARIANTS[variant].build()


def flusher(app: Any) -> Any:
    """A call that makes ``app`` export what it holds: the ``force_flush`` of the span processors behind it (ours
    or OpenTelemetry's ASGI middleware) and of our OTLP request-log export; None for an app that exports neither."""
    telemetry = getattr(app, "telemetry", None)  # LLMTelemetryMiddleware (built on first access)
    flushes = [f.force_flush for f in (getattr(telemetry, "tracing", None),) if f is not None]
    logs = getattr(telemetry, "request_logs", None)
    if logs is not None and "otlp" in os.environ.get("OTEL_LOGS_EXPORTER", ""):
        flushes.append(logs.force_flush)
    if flushes:
        return lambda: [flush() for flush in flushes]
    processor = getattr(getattr(app, "tracer", None), "span_processor", None)  # OpenTelemetryMiddleware
    return getattr(processor, "force_flush", None)


def cpu_per_request(
    app: Any, scenario: Scenario, requests: int, loop: asyncio.AbstractEventLoop, flush: Any = None
) -> float:
    """Process CPU (all threads) per request, the export of the spans of these requests included."""
    started = time.process_time()
    loop.run_until_complete(drive(app, scenario, requests, flush))
    return (time.process_time() - started) / requests


def _quiet_stdout() -> Any:
    # Request log lines (variant ours+logs) go to stdout: written to /dev/null, so their cost is still paid.
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # closed when the process exits


#: A content delta event as each server sends it (``--per-chunk --shape``): OpenAI's; vLLM's, with ``logprobs`` in
#: the choice; llama.cpp's server, ``choices`` first and a ``system_fingerprint``; TGI's, with the role and a null
#: ``tool_calls`` in every delta and a null usage on every chunk; a reasoning model's before its answer (DeepSeek's,
#: vLLM's with a reasoning parser), a null content and a piece of the reasoning.
DELTA_SHAPES: dict[str, Any] = {
    "openai": lambda text: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                            "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": text},
                                                                  "finish_reason": None}]},
    "vllm": lambda text: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen",
                          "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                       "finish_reason": None}]},
    "llama.cpp": lambda text: {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": text}}],
                               "created": 1, "id": "chatcmpl-1", "model": "gguf", "system_fingerprint": "b1",
                               "object": "chat.completion.chunk"},
    "reasoning": lambda text: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                               "model": "deepseek-reasoner", "choices": [{"index": 0, "delta": {
                                   "content": None, "reasoning_content": text}, "logprobs": None,
                                   "finish_reason": None}]},
    "tgi": lambda text: {"object": "chat.completion.chunk", "id": "", "created": 1, "model": "tgi",
                         "system_fingerprint": "3.0.0-native",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": text, "tool_calls": None},
                                      "logprobs": None, "finish_reason": None}], "usage": None},
}  # fmt: skip


async def per_chunk(chunks: int = 20_000, repeats: int = 7, shape: str = "openai", created_every: int = 0) -> int:
    """The per-chunk floor: the middleware's ``send`` wrapper (with its reader's shape check) on content chunks
    of one stream (deltas as the server ``shape`` sends them), against the same loop calling the downstream
    ``send`` directly. Minimum over repeats: the figure least disturbed by whatever else the machine runs.
    ``created_every``: the deltas' ``created`` changes every that many chunks (llama.cpp and TGI send the second
    each chunk was made in: 50 is a model writing 50 tokens a second; 1, a stream whose bytes vary every chunk)."""
    from llm_telemetry.apis import APIS
    from llm_telemetry.middleware import _Exchange
    from llm_telemetry.record import LLMCall

    async def downstream(message: dict[str, Any]) -> None:
        pass

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def failsafe(component: str, exc: BaseException) -> None:
        raise exc

    def event(i: int) -> bytes:
        data = DELTA_SHAPES[shape](f" word{i % 10}")
        if created_every:
            data["created"] = 1733000000 + i // created_every
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    messages = [{"type": "http.response.body", "body": event(i), "more_body": True} for i in range(chunks)]
    wrapped, direct = [], []
    for _ in range(repeats):
        call = LLMCall("chat", "openai", time.perf_counter())
        exchange = _Exchange(APIS["openai.chat"], call, receive, downstream, 1 << 20, False, failsafe)  # type: ignore[arg-type]
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        await exchange.send(start)
        began = time.process_time()
        for message in messages:
            await exchange.send(message)
        wrapped.append((time.process_time() - began) / chunks)
        began = time.process_time()
        for message in messages:
            await downstream(message)
        direct.append((time.process_time() - began) / chunks)
    per = (min(wrapped) - min(direct)) * 1e6
    varying = f", created changing every {created_every} chunks" if created_every else ""
    print(f"send wrapper + shape check ({shape} deltas{varying}): {per:.2f} µs per chunk (min of {repeats})")
    return 0


def rechunked(events: int = 4000, repeats: int = 7) -> int:
    """The reader's cost per event of streams whose events do not come one to a chunk (two a chunk, as a proxy
    re-chunks a stream), so that the whole-chunk shape path does not take them: events whose bytes are those of the
    learnt shape around another text, and events whose bytes vary outside it too (a ``created`` or block index of
    its own), which are parsed. Chat (OpenAI's deltas) and Anthropic ``text_delta`` events; minimum over repeats."""
    from llm_telemetry.apis import AnthropicMessagesReader, OpenAIChatReader, ResponseReader
    from llm_telemetry.record import LLMCall

    def chat(i: int, vary: bool) -> bytes:
        data = DELTA_SHAPES["openai"](f" word{i % 10}")
        data["created"] += i if vary else 0
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    def anthropic(i: int, vary: bool) -> bytes:
        data = {"type": "content_block_delta", "index": i if vary else 0}
        data["delta"] = {"type": "text_delta", "text": f" word{i % 10}"}
        return b"event: content_block_delta\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    readers: dict[str, tuple[type[ResponseReader], Any]] = {
        "chat": (OpenAIChatReader, chat),
        "anthropic": (AnthropicMessagesReader, anthropic),
    }
    print(f"{'stream':<10} {'events':<22} µs per event (min of {repeats})")
    for name, (reader, make) in readers.items():
        for vary in (False, True):
            stream = [make(i, vary) for i in range(events + 1)]
            pairs = [stream[i] + stream[i + 1] for i in range(1, events, 2)]
            best = float("inf")
            for _ in range(repeats):
                call = LLMCall("chat", "openai", time.perf_counter())
                read = reader(call, stream=True)
                read.feed(stream[0], now=1.0)  # the first token, in a chunk of its own: its shape is learnt
                began = time.process_time()
                for chunk in pairs:
                    read.feed(chunk, now=2.0)
                best = min(best, (time.process_time() - began) / (2 * len(pairs)))
                if call.first_token_at is None:
                    raise SystemExit(f"the {name} stream had no first token")
            print(f"{name:<10} {'varying' if vary else 'of the learnt shape':<22} {best * 1e6:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="stream64", choices=sorted(SCENARIOS))
    known = sorted([*VARIANTS, *PROFILE_VARIANTS])
    parser.add_argument(
        "--variant", default="ours", help=f"one or more, comma-separated, measured interleaved: {', '.join(known)}"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--per-chunk", action="store_true", help="time only the send wrapper and shape check on streamed chunks"
    )
    parser.add_argument(
        "--shape", default="openai", choices=sorted(DELTA_SHAPES), help="with --per-chunk: whose deltas to send"
    )
    parser.add_argument(
        "--created-every",
        type=int,
        default=0,
        metavar="N",
        help="with --per-chunk: the deltas' created changes every N chunks (llama.cpp's and TGI's clock second)",
    )
    parser.add_argument(
        "--rechunked",
        action="store_true",
        help="time the reader on stream events that come two to a chunk (of the learnt shape, and varying)",
    )
    parser.add_argument(
        "--by-length",
        action="store_true",
        help="split the cost into a part per request and a part per stream event (chat and streams of "
        + ", ".join(map(str, LENGTHS))
        + " words)",
    )
    args = parser.parse_args(argv)
    procs.drop_settings()  # the variants as the benchmark configures them, not as the shell would
    unknown = [v for v in args.variant.split(",") if v not in known]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    if args.per_chunk:
        return asyncio.run(per_chunk(shape=args.shape, created_every=args.created_every))
    if args.rechunked:
        return rechunked()
    if args.by_length:
        with _sink():
            real_stdout = sys.stdout
            with _quiet_stdout():
                return by_length(args, real_stdout)

    scenario = SCENARIOS[args.scenario]
    with _sink():
        real_stdout = sys.stdout
        with _quiet_stdout():
            return _profile(args, scenario, real_stdout)


@contextlib.contextmanager
def _sink() -> Iterator[None]:
    """Tracing variants export to the same local OTLP sink as in benchmarks/run, so the export is measured too."""
    sink = procs.start("sink.py", ["--port", str(port := procs.free_port())])
    try:
        os.environ[BENCH_OTLP_ENDPOINT] = f"http://127.0.0.1:{port}"
        procs.wait_http(os.environ[BENCH_OTLP_ENDPOINT] + "/count", sink)
        yield
    finally:
        procs.stop(sink)


#: Words per stream in ``--by-length`` (each stream has four events more: role, finish, usage, [DONE]).
LENGTHS = (1, 8, 64, 256)


def by_length(args: argparse.Namespace, stdout: Any) -> int:
    """What the variants add per request and per stream event: chat, then streams of :data:`LENGTHS` words,
    measured interleaved as in :func:`_profile`, and a least-squares line through the streams' added cost,
    ``fixed + per_event * events``. The fixed part is what every stream pays once (reading its request, its first
    and last events, recording its metrics); the part per event is the ``send`` wrapper and the bulk read of the
    kept chunks."""
    loop = asyncio.new_event_loop()
    keys = ["bare", *(v for v in args.variant.split(",") if v != "bare")]
    scenarios = [SCENARIOS["chat"], *(_stream(words) for words in LENGTHS)]
    apps, flushes = {}, {}
    for key in keys:
        apps[key] = build(key)
        for scenario in scenarios:
            loop.run_until_complete(drive(apps[key], scenario, 50))
        flushes[key] = flusher(apps[key])
        if flushes[key] is not None:
            flushes[key]()
    # As many requests per batch in every scenario: a tracing variant exports at the end of each batch (see
    # :func:`drive`), so its share of an export per request is then the same whatever the stream's length.
    times: dict[tuple[str, str], list[float]] = {(k, s.key): [] for k in keys for s in scenarios}
    for r in range(args.rounds):
        for scenario in scenarios:
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                cpu = cpu_per_request(apps[key], scenario, args.requests, loop, flushes[key])
                times[key, scenario.key].append(cpu * 1e6)
    loop.close()

    def added(key: str, scenario: str) -> float:
        # The median over rounds of the difference to bare in the same round.
        deltas = sorted(v - b for v, b in zip(times[key, scenario], times["bare", scenario], strict=True))
        return deltas[len(deltas) // 2]

    header = f"{'scenario':<10} {'events':>6} {'bare µs':>9}" + "".join(f" {'+µs ' + k:>18}" for k in keys[1:])
    print(f"CPU per request in-process (median of {args.rounds} rounds; +µs: over bare, same round)", file=stdout)
    print(header, file=stdout)
    print("-" * len(header), file=stdout)
    for scenario in scenarios:
        bare = sorted(times["bare", scenario.key])[args.rounds // 2]
        cells = "".join(f" {added(k, scenario.key):18.1f}" for k in keys[1:])
        print(f"{scenario.key:<10} {scenario.chunks:6d} {bare:9.1f}{cells}", file=stdout)
    streams = scenarios[1:]
    xs = [float(s.chunks) for s in streams]
    mean_x = sum(xs) / len(xs)
    for key in keys[1:]:
        ys = [added(key, s.key) for s in streams]
        mean_y = sum(ys) / len(ys)
        covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
        slope = covariance / sum((x - mean_x) ** 2 for x in xs)
        fixed = mean_y - slope * mean_x
        chat = added(key, "chat")
        print(
            f"{key}: a stream adds {fixed:.1f} µs once and {slope:.2f} µs per event (a non-stream chat: {chat:.1f} µs)",
            file=stdout,
        )
    return 0


def _profile(args: argparse.Namespace, scenario: Scenario, stdout: Any) -> int:
    loop = asyncio.new_event_loop()
    keys = ["bare", *(v for v in args.variant.split(",") if v != "bare")]
    apps, flushes = {}, {}
    for key in keys:
        # Built and warmed up one by one: the middleware reads the OTEL_* variables on its first request.
        apps[key] = build(key)
        loop.run_until_complete(drive(apps[key], scenario, 50))
        flushes[key] = flusher(apps[key])
        if flushes[key] is not None:
            flushes[key]()
    times: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(args.rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # the order rotates each round
            times[key].append(cpu_per_request(apps[key], scenario, args.requests, loop, flushes[key]))
    # The median, and the minimum: on a shared machine other work only adds time, so the minimum over many
    # rounds is the steadier estimate of a variant's own cost.
    median = {key: sorted(t)[len(t) // 2] * 1e6 for key, t in times.items()}
    least = {key: min(t) * 1e6 for key, t in times.items()}
    b, bl = median["bare"], least["bare"]
    print(f"{args.scenario}: bare {b:.1f} µs/request (median of {args.rounds} rounds; minimum {bl:.1f})", file=stdout)
    for key in keys[1:]:
        m, ml = median[key], least[key]
        per_chunk = f", {(m - b) / scenario.chunks:.2f} µs per chunk" if scenario.chunks else ""
        print(
            f"  {key:<24} {m:8.1f} µs/request (+{m - b:.1f} µs{per_chunk}); minimum {ml:.1f} (+{ml - bl:.1f} µs)",
            file=stdout,
        )

    if args.top:
        key = keys[-1]
        profiler = cProfile.Profile()
        profiler.enable()
        loop.run_until_complete(drive(apps[key], scenario, args.requests, flushes[key]))
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"cProfile of {key}:", out.getvalue(), file=stdout)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
