"""The middleware's cost in machine instructions per request, counted by valgrind: reproducible to about 1%.

Usage: ``python benchmarks/instructions.py [--scenarios chat,stream64] [--variants bare,ours] [--warmup 30]
[--requests chat=200,stream64=40]``. CPU time on a shared machine differs between runs of the same code by more
than the differences we measure; the number of instructions executed does not. For each (scenario, variant)
pair a small driver runs twice under ``valgrind --tool=cachegrind --cache-sim=no``: it builds the app in-process
(``profile_hot_path.build``), sends ``--warmup`` requests straight through ASGI, then K more (or none), and
exits at once. The instructions per request are ``(I(K) - I(0)) / K``: start-up, imports and warm-up cancel
out. The pairs run one after another; a full run takes a few minutes. Needs valgrind
(``apt-get install valgrind``).

Variants that export spans (tracing) or request-log records (OTLP logs) pay for that export, to a local OTLP
sink, as a loaded server does: the batch processors send full batches of 512, so each span or record carries its
own encoding plus 1/512 of a request's fixed cost (an HTTP POST costs a few million instructions). A driver's last
batch is never full, so its POST would weigh 512/K times too much: both runs of a pair therefore send exactly one
batch at their end (after the warm-up, one more request's span or record is held back to go with it), which
cancels the POST out of ``I(K) - I(0)``, and a third run, the same as ``I(0)`` without that last export, measures
the POST. Its fixed part is then added back as ``POST x items per request / 512``, the items (spans and log
records) per request counted by the sink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs  # noqa: E402
from apps import BENCH_OTLP_ENDPOINT, VARIANTS  # noqa: E402
from loadgen import SCENARIOS  # noqa: E402

DEFAULT_SCENARIOS = ["chat", "stream64", "stream64o", "stream256", "responses64", "embeddings"]
DEFAULT_VARIANTS = ["bare", "ours", "ours+logs", "ours+otlplogs", "ours+traces", "instrumentator"]
#: K, the measured requests per scenario: fewer for long streams, whose requests cost more.
DEFAULT_REQUESTS = {"chat": 200, "embeddings": 200, "stream64": 40, "stream64o": 40, "stream256": 12,
                    "responses64": 40}  # fmt: skip
#: Items per export request of a loaded server: the batch processors' default (OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
#: OTEL_BLRP_MAX_EXPORT_BATCH_SIZE).
BATCH = 512
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def drive(scenario: str, variant: str, warmup: int, requests: int, export: bool) -> None:
    """The driver, run under valgrind: build, warm up, send one request more and ``requests`` more, export the
    spans or log records of those (when ``export``, and the variant exports any) in one batch, exit without tearing
    down."""
    import profile_hot_path

    sys.stdout = open(os.devnull, "w")  # request logs, if any, are still written, and counted
    app = profile_hot_path.build(variant)
    flush = profile_hot_path.flusher(app)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(profile_hot_path.drive(app, SCENARIOS[scenario], warmup, flush))
    # Unflushed (the batch processors' own timers never fire here): one span or record, or a few, that every run
    # exports.
    loop.run_until_complete(profile_hot_path.drive(app, SCENARIOS[scenario], 1 + requests))
    if export and flush is not None:
        flush()
    os._exit(0)


def instructions(
    scenario: str, variant: str, warmup: int, requests: int, env: dict[str, str], export: bool = True
) -> int:
    """Instructions executed by one driver process, from valgrind's summary."""
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--drive", scenario, variant, str(warmup), str(requests), str(int(export))]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    found = _IREFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{scenario}/{variant} driver failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def _exported(endpoint: str) -> int:
    """Spans and log records the sink has received so far."""
    counts = json.loads(procs.http_get(endpoint + "/count"))
    return int(counts["spans"]) + int(counts["logs"])


def _parse_requests(text: str) -> dict[str, int]:
    requests = dict(DEFAULT_REQUESTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        requests[key] = int(value)
    return requests


def runnable(variants: list[str], log: Any) -> list[str]:
    """``bare`` first, then those of ``variants`` whose dependencies are installed (the others are logged)."""
    found = []
    for v in ["bare", *(v for v in variants if v != "bare")]:
        missing = VARIANTS[v].missing()
        if missing:
            log(f"skipping {v}: {missing}")
        else:
            found.append(v)
    return found


def start_sink() -> tuple[Any, str]:
    """A local OTLP/HTTP sink (``sink.py``), once it answers, and its endpoint."""
    port = procs.free_port()
    sink = procs.start("sink.py", ["--port", str(port)])
    endpoint = f"http://127.0.0.1:{port}"
    procs.wait_http(endpoint + "/count", sink)
    return sink, endpoint


def run(
    scenarios: list[str], variants: list[str], ks: dict[str, int], warmup: int = 30, log: Any = print
) -> dict[str, Any]:
    """Count every (scenario, variant) pair; the report's rows carry what :func:`middleware_bench.targets`
    reads (``cpu_ratio``, and the added cost in thousands of instructions in ``added_k``)."""
    report: dict[str, Any] = {"rows": [], "posts": [], "ks": ks, "warmup": warmup, "scenarios": scenarios}
    if shutil.which("valgrind") is None:
        report["skipped"] = "valgrind is not installed (apt-get install valgrind): no instruction counts"
        return report
    variants = runnable(variants, log)
    sink, endpoint = start_sink()
    try:
        # Deterministic hashing; the batch processor's timer never fires on its own: spans leave only on flush.
        env = dict(
            procs.environment(),
            PYTHONHASHSEED="0",
            OTEL_BSP_SCHEDULE_DELAY="3600000",
            OTEL_BLRP_SCHEDULE_DELAY="3600000",
        )
        env[BENCH_OTLP_ENDPOINT] = endpoint
        for scenario in scenarios:
            k, chunks = ks.get(scenario, 100), SCENARIOS[scenario].chunks
            bare = 0.0
            for variant in variants:
                items = _exported(endpoint)
                base = instructions(scenario, variant, warmup, 0, env)
                items_base = _exported(endpoint) - items
                measured = instructions(scenario, variant, warmup, k, env)
                per = (measured - base) / k
                if VARIANTS[variant].traces or VARIANTS[variant].logs:
                    per_request = (_exported(endpoint) - items - 2 * items_base) / k
                    post = base - instructions(scenario, variant, warmup, 0, env, export=False)
                    per += post * per_request / BATCH
                    report["posts"].append((scenario, variant, post, per_request))
                bare = per if variant == "bare" else bare
                added = per - bare
                row = {"scenario": scenario, "variant": variant, "kinstr": per / 1e3, "added_k": added / 1e3}
                row["cpu_ratio"] = per / bare if bare else 0.0
                row["added_per_chunk_k"] = added / chunks / 1e3 if chunks and variant != "bare" else None
                report["rows"].append(row)
                log(f"{scenario}/{variant}: {per / 1e3:.1f} k instructions per request")
    finally:
        procs.stop(sink)
    return report


def format_report(report: dict[str, Any], where: str = "in-process, straight through ASGI") -> str:
    from middleware_bench import targets

    lines = [f"== Middleware overhead in instructions, {where} (valgrind; reproducible to about 1%) =="]
    if "skipped" in report:
        return "\n".join([*lines, f"(not run: {report['skipped']})"])
    lines.append(f"{'scenario':<12} {'variant':<15} {'kinstr/req':>11} {'added':>10} {'x bare':>7} {'added/chunk':>12}")
    for row in report["rows"]:
        per_chunk = row["added_per_chunk_k"]
        lines.append(
            f"{row['scenario']:<12} {row['variant']:<15} {row['kinstr']:11.1f} {row['added_k']:+10.1f} "
            f"{row['cpu_ratio']:7.2f} {'' if per_chunk is None else format(per_chunk * 1e3, '.0f'):>12}"
        )
    ks = report["ks"]
    lines.append(
        f"K = {', '.join(f'{s} {ks.get(s, 100)}' for s in report['scenarios'])} requests after {report['warmup']} "
        "warm-up; thousands of instructions; chunks are SSE events per response."
    )
    if report["posts"]:
        lines.append(
            f"OTLP export, in batches of {BATCH} spans or log records (each POST's fixed cost shared by the batch):"
        )
        for scenario, variant, post, per_request in report["posts"]:
            lines.append(
                f"  {scenario}/{variant}: one POST {post / 1e3:,.0f} k; items per request: {per_request:g}; "
                f"{post * per_request / BATCH / 1e3:+.1f} k per request"
            )
    lines += ["", "Targets (this run, in instructions)"]
    for name, measured, verdict in targets(report, delta="added_k", unit="k"):
        lines.append(f"  {name:<52}{measured:<50}{verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help="comma-separated")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated; bare is added")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--requests", default="", help="K per scenario, e.g. chat=100,stream256=6")
    parser.add_argument("--drive", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        scenario, variant, warmup, requests, export = args.drive
        drive(scenario, variant, int(warmup), int(requests), export == "1")
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [s for s in scenarios if s not in SCENARIOS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown scenario(s) or variant(s): {', '.join(unknown)}")
    report = run(scenarios, variants, _parse_requests(args.requests), args.warmup, log=_stderr)
    print(format_report(report))
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
