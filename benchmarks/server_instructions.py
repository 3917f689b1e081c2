"""The middleware's cost in instructions inside a real server: uvicorn (uvloop, httptools) under valgrind, sent
requests over loopback by the load generator with 8 connections in flight.

Usage: ``python benchmarks/server_instructions.py [--scenarios chat,stream64] [--variants ours,instrumentator]
[--requests chat=2000] [--cache-sim]``.

``instructions.py`` drives the app in-process, one request at a time; this counts the same thing where it runs in
production: the server's sockets, HTTP parsing and event loop, and requests interleaved on one loop. For each
(scenario, variant) pair the variant's server (``serve.py``) is started twice under ``valgrind --tool=cachegrind``,
sent 200 warm-up requests, then K requests more (or none), and stopped; ``(I(K) - I(0)) / K`` is one request. The
two runs of a pair go side by side. Two counts of the same code agree to about 0.1%.

Variants that export spans or log records send them to a local OTLP sink in full batches of 512 only (the schedule
delay is an hour), as a loaded server does; the partial batch left at shutdown is sent by both runs and cancels out.

``--cache-sim`` also simulates the caches and branch predictor (cachegrind's model of this machine's, slower) and
adds the misses per request: what instruction counts cannot see, read from a model, not measured. Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs  # noqa: E402
from apps import BENCH_METRICS_PORT, BENCH_OTLP_ENDPOINT, VARIANTS  # noqa: E402
from instructions import runnable, start_sink  # noqa: E402
from loadgen import SCENARIOS, run_load  # noqa: E402

DEFAULT_SCENARIOS = ["chat", "stream64"]
DEFAULT_VARIANTS = ["bare", "ours", "ours+traces", "instrumentator"]
#: K per scenario; under valgrind a chat request takes ~20 ms, a 64-chunk stream ~150 ms.
DEFAULT_REQUESTS = {"chat": 2000, "embeddings": 2000, "stream64": 200, "stream256": 60}
WARMUP = 200
CONCURRENCY = 8
#: Summary lines of cachegrind: instructions, and with the simulation the misses (first-level instruction and
#: data caches, last level, branch mispredictions).
_COUNTS = {
    "instr": re.compile(r"I\s+refs:\s+([\d,]+)"),
    "i1_miss": re.compile(r"I1\s+misses:\s+([\d,]+)"),
    "d1_miss": re.compile(r"D1\s+misses:\s+([\d,]+)"),
    "ll_miss": re.compile(r"LL misses:\s+([\d,]+)"),
    "mispredict": re.compile(r"Mispredicts:\s+([\d,]+)"),
}


def count(scenario: str, variant: str, requests: int, otlp: str, cache_sim: bool) -> dict[str, int]:
    """Counts of one server process that served the warm-up and ``requests`` more."""
    port = procs.free_port()
    env = dict(
        procs.environment(),
        BENCH_VARIANT=variant,
        PYTHONHASHSEED="0",
        OTEL_BSP_SCHEDULE_DELAY="3600000",
        OTEL_BLRP_SCHEDULE_DELAY="3600000",
        OTEL_SERVICE_NAME=f"vg-{variant}",
    )
    env[BENCH_METRICS_PORT] = str(procs.free_port())
    env[BENCH_OTLP_ENDPOINT] = otlp
    sim = "yes" if cache_sim else "no"
    command = ["valgrind", "--tool=cachegrind", f"--cache-sim={sim}", f"--branch-sim={sim}"]
    command += ["--cachegrind-out-file=/dev/null", sys.executable, str(HERE / "serve.py")]
    command += ["--variant", variant, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout=300)  # type: ignore[arg-type]
        for batch in (WARMUP, requests):
            if batch:
                result = asyncio.run(run_load(port, SCENARIOS[scenario], batch, CONCURRENCY))
                if result.failures or result.requests != batch:
                    raise RuntimeError(f"{scenario}/{variant}: {result.failures} of {batch} requests failed")
        process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly; valgrind then prints its summary
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    counts = {}
    for key, pattern in _COUNTS.items():
        found = pattern.search(stderr)
        if found:
            counts[key] = int(found.group(1).replace(",", ""))
    if "instr" not in counts:
        raise RuntimeError(f"{scenario}/{variant}: no valgrind summary ({process.returncode}):\n{stderr[-2000:]}")
    return counts


def run(
    scenarios: list[str], variants: list[str], ks: dict[str, int], cache_sim: bool = False, log: Any = print
) -> dict[str, Any]:
    """Count every (scenario, variant) pair; rows shaped like ``instructions.run``'s, plus simulated misses."""
    report: dict[str, Any] = {"rows": [], "ks": ks, "warmup": WARMUP, "scenarios": scenarios, "posts": []}
    if shutil.which("valgrind") is None:
        report["skipped"] = "valgrind is not installed (apt-get install valgrind): no instruction counts"
        return report
    variants = runnable(variants, log)
    sink, otlp = start_sink()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for scenario in scenarios:
                k, chunks = ks.get(scenario, 200), SCENARIOS[scenario].chunks
                bare: dict[str, float] = {}
                for variant in variants:
                    runs = [pool.submit(count, scenario, variant, n, otlp, cache_sim) for n in (0, k)]
                    base, measured = (r.result() for r in runs)
                    per = {key: (measured[key] - base[key]) / k for key in measured}
                    if variant == "bare":
                        bare = per
                    added = per["instr"] - bare["instr"]
                    row = {"scenario": scenario, "variant": variant, "kinstr": per["instr"] / 1e3}
                    row["added_k"] = added / 1e3
                    row["cpu_ratio"] = per["instr"] / bare["instr"]
                    row["added_per_chunk_k"] = added / chunks / 1e3 if chunks and variant != "bare" else None
                    row["misses"] = {key: per[key] - bare[key] for key in per if key != "instr"}
                    report["rows"].append(row)
                    log(f"{scenario}/{variant}: {per['instr'] / 1e3:.1f} k instructions per request")
    finally:
        procs.stop(sink)
    return report


def format_report(report: dict[str, Any]) -> str:
    from instructions import format_report as instruction_table

    text = instruction_table(report, "in a real uvicorn server with 8 connections")
    misses = [row for row in report.get("rows", []) if row.get("misses") and row["variant"] != "bare"]
    if not misses:
        return text
    lines = ["", "Simulated misses added per request over bare (cachegrind's model of the caches and predictor)"]
    lines.append(f"{'scenario':<12} {'variant':<15} {'I1':>8} {'D1':>8} {'LL':>8} {'branch':>8}")
    for row in misses:
        m = row["misses"]
        lines.append(
            f"{row['scenario']:<12} {row['variant']:<15} {m['i1_miss']:+8.0f} {m['d1_miss']:+8.0f} "
            f"{m['ll_miss']:+8.0f} {m['mispredict']:+8.0f}"
        )
    return text + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help="comma-separated")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated; bare is added")
    parser.add_argument("--requests", default="", help="K per scenario, e.g. chat=1000,stream64=100")
    parser.add_argument("--cache-sim", action="store_true", help="also simulate caches and branch prediction")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [s for s in scenarios if s not in SCENARIOS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown scenario(s) or variant(s): {', '.join(unknown)}")
    ks = dict(DEFAULT_REQUESTS)
    for item in filter(None, args.requests.split(",")):
        key, _, value = item.partition("=")
        ks[key] = int(value)
    report = run(scenarios, variants, ks, args.cache_sim, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
