"""Middleware overhead: every variant of ``apps.py`` under uvicorn, measured in interleaved rounds.

Method (see docs/performance.md): each variant runs in its own uvicorn process (uvloop, httptools, one
worker) pinned to the first core; the load generator (``loadgen.py``) and the OTLP sink run on the second.
All servers stay up for the whole run and take turns: in every round, every scenario is sent to every
variant (in a rotating order), so drift on a shared machine hits all of them alike. For each batch we
record the client's throughput and latency and the server process's CPU time (all threads, from /proc)
before and after; CPU per request is the headline figure. Ratios to the bare app are taken per round and
then the median over rounds is reported.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import procs
from apps import BENCH_METRICS_PORT, BENCH_OTLP_ENDPOINT, VARIANTS
from loadgen import SCENARIOS, LoadGenerator

SERVER_CPU = 0
CLIENT_CPU = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure.

    Args:
        rounds: interleaved rounds (each: every scenario on every variant).
        warmup: requests per scenario and variant before measuring.
        batch: requests per measured batch, by scenario.
        concurrency: connections the load generator keeps busy.
        settle: seconds to wait after each batch before reading CPU time, so work a variant defers
            (a span exporter's next batch) is charged to it.
        soak: total requests every variant has served when its memory is read (the rest of a variant's
            share is sent as non-stream chat after the rounds).
        workers_rounds: rounds of the two-worker comparison (0 to skip it).
        optional_variants: also run the variants marked optional (the smoke run checks that they work).
    """

    rounds: int
    warmup: int
    batch: dict[str, int]
    concurrency: int
    settle: float
    soak: int
    workers_rounds: int
    optional_variants: bool = False


SMOKE = Plan(
    rounds=1,
    warmup=5,
    batch={
        "chat": 20,
        "stream64": 6,
        "stream64o": 6,
        "stream256": 2,
        "stream4096": 1,
        "responses64": 6,
        "body1m": 2,
        "embeddings": 20,
    },
    concurrency=2,
    settle=0.0,
    soak=0,
    workers_rounds=1,
    optional_variants=True,
)
FULL = Plan(
    rounds=9,
    warmup=300,
    batch={
        # Batches of ~0.15-0.2 s of server CPU (1,000 chat requests, 200 64-chunk streams) swung by up to 2x
        # from round to round on a shared VM, in every variant; longer batches average a slow spell over more
        # requests.
        "chat": 4000,
        "stream64": 400,
        "stream64o": 400,
        "stream256": 120,
        "stream4096": 4,
        "responses64": 400,
        "body1m": 60,
        "embeddings": 2000,
    },
    concurrency=8,
    settle=0.3,
    soak=100_000,
    workers_rounds=2,
)

#: A shorter run (about 15 minutes on 2 cores) with the same scenarios: smaller batches, a 20,000-request soak and
#: no two-worker comparison. ``python benchmarks/middleware_bench.py --plan reduced``.
REDUCED = Plan(
    rounds=3,
    warmup=100,
    batch={
        "chat": 600,
        "stream64": 120,
        "stream64o": 120,
        "stream256": 40,
        "stream4096": 3,
        "responses64": 120,
        "body1m": 30,
        "embeddings": 300,
    },
    concurrency=8,
    settle=0.3,
    soak=20_000,
    workers_rounds=0,
)
#: The non-stream comparison alone, with many long batches: ``--plan chat --variants ours,instrumentator``.
CHAT = Plan(
    rounds=30,
    warmup=1000,
    batch={"chat": 5000},
    concurrency=8,
    settle=0.3,
    soak=0,
    workers_rounds=0,
)
PLANS = {"smoke": SMOKE, "reduced": REDUCED, "full": FULL, "chat": CHAT}

#: Scenarios of the two-worker comparison.
WORKER_SCENARIOS = ("chat", "stream64")


@dataclasses.dataclass
class Server:
    key: str
    port: int
    metrics_port: int
    workers: int
    process: Any
    sent: int = 0

    @property
    def pids(self) -> list[int]:
        return [self.process.pid, *procs.children(self.process.pid)]

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids)

    def memory(self) -> tuple[int, int]:
        """(RSS, peak RSS) in KiB, summed over the worker processes (or the one server process)."""
        pids = procs.children(self.process.pid) if self.workers > 1 else [self.process.pid]
        rss = [procs.memory_kib(pid) for pid in pids]
        return sum(r for r, _ in rss), sum(p for _, p in rss)


def start_server(key: str, otlp: str, workers: int = 1) -> Server:
    port, metrics_port = procs.free_port(), procs.free_port()
    env = {
        BENCH_METRICS_PORT: str(metrics_port),
        BENCH_OTLP_ENDPOINT: otlp,
        # Export spans and log records soon after they end, so a batch's are exported (and charged) within ``settle``.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": f"bench-{key}",
    }
    args = ["--variant", key, "--port", str(port), "--workers", str(workers)]
    if workers == 1:
        args += ["--cpu", str(SERVER_CPU)]
    process = procs.start("serve.py", args, env)
    return Server(key, port, metrics_port, workers, process)


def scrape_counts(server: Server, settle: float = 5.0) -> dict[str, float]:
    """Requests our middleware counted, and its internal errors, from its Prometheus endpoint.

    A client has its whole answer a moment before the middleware records the call, and a scrape shortly after
    another may share its rendering, so this scrapes afresh (`?fresh`) until every request sent shows or
    ``settle`` seconds have passed; a count still short then is what the table prints."""
    deadline = time.monotonic() + settle
    while True:
        text = procs.http_get(f"http://127.0.0.1:{server.metrics_port}/metrics?fresh").decode()
        counted = {"requests": 0.0, "internal_errors": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "llm_requests_total":
                    counted["requests"] += sample.value
                elif sample.name == "llm_telemetry_internal_errors_total":
                    counted["internal_errors"] += sample.value
        if counted["requests"] >= server.sent or time.monotonic() > deadline:
            return counted
        time.sleep(0.1)


def _median(values: Iterable[float]) -> float:
    items = [v for v in values if v == v]
    return statistics.median(items) if items else float("nan")


def measure(load: LoadGenerator, server: Server, scenario: str, requests: int, plan: Plan) -> dict[str, Any]:
    before = server.cpu()
    result = load.run(server.port, scenario, requests, plan.concurrency)
    if plan.settle:
        time.sleep(plan.settle)
    cpu = server.cpu() - before
    server.sent += result.requests
    return {
        "variant": server.key,
        "scenario": scenario,
        "requests": result.requests,
        "failures": result.failures,
        "rate": result.rate,
        "p50": result.quantile(0.5),
        "p99": result.quantile(0.99),
        "cpu_per_request": cpu / max(result.requests, 1),
    }


def _fastest(batches: list[dict[str, Any]]) -> float:
    return float(min(b["cpu_per_request"] for b in batches))


def summarise(batches: list[dict[str, Any]], keys: list[str], scenarios: Iterable[str]) -> list[dict[str, Any]]:
    """One row per (scenario, variant): medians over rounds, ratios to bare paired by round."""
    rows = []
    for scenario in scenarios:
        bare = [b for b in batches if b["scenario"] == scenario and b["variant"] == "bare"]
        for key in keys:
            mine = [b for b in batches if b["scenario"] == scenario and b["variant"] == key]
            if not mine:
                continue
            pairs = list(zip(mine, bare, strict=False))
            chunks = SCENARIOS[scenario].chunks
            cpu = _median(b["cpu_per_request"] for b in mine)
            fastest, bare_fastest = _fastest(mine), (_fastest(bare) if bare else None)
            delta = _median(m["cpu_per_request"] - b["cpu_per_request"] for m, b in pairs)
            rows.append(
                {
                    "scenario": scenario,
                    "variant": key,
                    "rate": _median(b["rate"] for b in mine),
                    "rate_ratio": _median(m["rate"] / b["rate"] for m, b in pairs if b["rate"]),
                    "p50": _median(b["p50"] for b in mine),
                    "p99": _median(b["p99"] for b in mine),
                    "cpu_us": cpu * 1e6,
                    "cpu_ratio": _median(
                        m["cpu_per_request"] / b["cpu_per_request"] for m, b in pairs if b["cpu_per_request"]
                    ),
                    "cpu_delta_us": delta * 1e6,
                    # The fastest batch of each against bare's: a batch caught in a slow spell of a shared VM only
                    # ever costs more, so this one is the least disturbed (a second reading of the same rounds).
                    "fastest_ratio": fastest / bare_fastest if bare_fastest else None,
                    "fastest_delta_us": (fastest - bare_fastest) * 1e6 if bare_fastest else None,
                    "cpu_per_chunk_us": cpu * 1e6 / chunks if chunks else None,
                    "delta_per_chunk_us": delta * 1e6 / chunks if chunks else None,
                    "failures": sum(b["failures"] for b in mine),
                }
            )
    return rows


def run(plan: Plan, only: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    """Run the middleware benchmark; returns everything measured (see :func:`format_report`)."""
    keys = [
        k
        for k in VARIANTS
        if (k in only if only else plan.optional_variants or not VARIANTS[k].optional) or k == "bare"
    ]
    skipped = {}
    for key in list(keys):
        reason = VARIANTS[key].missing()
        if reason:
            skipped[key] = reason
            keys.remove(key)
    report: dict[str, Any] = {"plan": dataclasses.asdict(plan), "skipped": skipped, "notes": []}
    sink_port = procs.free_port()
    sink = procs.start("sink.py", ["--port", str(sink_port), "--cpu", str(CLIENT_CPU)])
    otlp = f"http://127.0.0.1:{sink_port}"
    servers: dict[str, Server] = {}
    try:
        procs.pin(CLIENT_CPU)
        procs.wait_http(otlp + "/count", sink)
        for key in keys:
            servers[key] = start_server(key, otlp)
        for server in servers.values():
            procs.wait_http(f"http://127.0.0.1:{server.port}/healthz", server.process)
        with LoadGenerator(cpu=CLIENT_CPU) as load:
            log(f"middleware: warming up {', '.join(keys)}")
            for server in servers.values():
                for scenario, requests in plan.batch.items():
                    warmup = min(plan.warmup, requests)  # a few 4,096-chunk streams warm up as well as 300
                    load.run(server.port, scenario, warmup, plan.concurrency)
                    server.sent += warmup
            memory: dict[str, dict[str, Any]] = {
                key: {"after_warmup": s.memory()[0], "warmup_requests": s.sent} for key, s in servers.items()
            }
            batches: list[dict[str, Any]] = []
            for round_no in range(plan.rounds):
                log(f"middleware: round {round_no + 1}/{plan.rounds}")
                for scenario, requests in plan.batch.items():
                    order = keys[round_no % len(keys) :] + keys[: round_no % len(keys)]
                    for key in order:
                        batches.append({**measure(load, servers[key], scenario, requests, plan), "round": round_no})
            report["batches"] = batches
            report["rows"] = summarise(batches, keys, plan.batch)
            for key, server in servers.items():
                memory[key]["after_rounds"] = server.memory()[0]
                memory[key]["rounds_requests"] = server.sent
            for key in keys:
                if servers[key].sent >= plan.soak:
                    continue
                server = servers[key]
                log(f"middleware: memory soak of {key} up to {plan.soak} requests")
                checkpoints = []
                while server.sent < plan.soak:
                    step = min(plan.soak - server.sent, max(plan.soak // 5, 1))
                    result = load.run(server.port, "chat", step, plan.concurrency)
                    server.sent += result.requests
                    checkpoints.append((server.sent, server.memory()[0]))
                memory[key]["soak"] = checkpoints
            for key, server in servers.items():
                rss, peak = server.memory()
                memory[key].update(final=rss, peak=peak, requests=server.sent)
                if VARIANTS[key].llm_metrics:
                    counted = scrape_counts(server)
                    memory[key].update(counted=counted["requests"], internal_errors=counted["internal_errors"])
            report["memory"] = memory
            traced = [k for k in keys if VARIANTS[k].traces]
            logging = [k for k in keys if VARIANTS[k].logs]
            if traced or logging:
                time.sleep(1.0)  # the last scheduled exports
                counts = json.loads(procs.http_get(otlp + "/count"))
                report["spans_received"] = counts["spans"]
                report["spans"] = {
                    key: {"requests": servers[key].sent, "received": counts["by_service"].get(f"bench-{key}", 0)}
                    for key in traced
                }
                report["log_records"] = {
                    key: {"requests": servers[key].sent, "received": counts["logs_by_service"].get(f"bench-{key}", 0)}
                    for key in logging
                }
            if plan.workers_rounds:
                report["workers"] = run_workers(plan, load, otlp, log)
    finally:
        for key, server in servers.items():
            err = procs.stop(server.process)
            if "Traceback" in err or "internal error" in err:
                report["notes"].append(f"{key} server stderr: {err.strip()[-800:]}")
        procs.stop(sink)
    return report


def run_workers(plan: Plan, load: LoadGenerator, otlp: str, log: Any) -> dict[str, Any]:
    """bare and ours with ``--workers 2`` (workers not pinned: they share both cores with the client)."""
    keys = ["bare", "ours"]
    log("middleware: two-worker comparison")
    servers = {key: start_server(key, otlp, workers=2) for key in keys}
    result: dict[str, Any] = {"notes": []}
    try:
        for server in servers.values():
            procs.wait_http(f"http://127.0.0.1:{server.port}/healthz", server.process)
            # uvicorn answers as soon as one worker is up; give the second one time to start as well.
            deadline = time.monotonic() + 30
            while len(procs.children(server.process.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        for server in servers.values():
            for scenario in WORKER_SCENARIOS:
                load.run(server.port, scenario, plan.warmup, plan.concurrency * 2)
                server.sent += plan.warmup
        batches = []
        for round_no in range(plan.workers_rounds):
            for scenario in WORKER_SCENARIOS:
                for key in keys if round_no % 2 == 0 else keys[::-1]:
                    wide = dataclasses.replace(plan, concurrency=plan.concurrency * 2)
                    batches.append(measure(load, servers[key], scenario, plan.batch[scenario] * 2, wide))
        result["rows"] = summarise(batches, keys, WORKER_SCENARIOS)
        server = servers["ours"]
        try:
            counted = scrape_counts(server)
            result["counted"], result["sent"] = counted["requests"], server.sent
        except OSError as exc:
            result["notes"].append(f"could not scrape the two-worker server's metrics: {exc}")
        result["memory"] = {key: s.memory() for key, s in servers.items()}
    finally:
        for key, server in servers.items():
            err = procs.stop(server.process)
            if "Traceback" in err:
                result["notes"].append(f"{key} (2 workers) stderr: {err.strip()[-800:]}")
    return result


# --- formatting -----------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    header = (
        f"{'scenario':<12}{'variant':<16}{'req/s':>8}{'x bare':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU us/req':>12}{'x bare':>8}{'+us/req':>9}{'us/chunk':>10}{'+us/chunk':>11}{'fail':>6}"
    )
    lines = [header, "-" * len(header)]
    last = None
    for row in rows:
        if last is not None and row["scenario"] != last:
            lines.append("")
        last = row["scenario"]
        lines.append(
            f"{row['scenario']:<12}{row['variant']:<16}{_fmt(row['rate'], '.0f'):>8}{_fmt(row['rate_ratio'], '.2f'):>8}"
            f"{_fmt(row['p50'] * 1e3, '.2f'):>9}{_fmt(row['p99'] * 1e3, '.2f'):>9}"
            f"{_fmt(row['cpu_us'], '.0f'):>12}{_fmt(row['cpu_ratio'], '.2f'):>8}{_fmt(row['cpu_delta_us'], '+.0f'):>9}"
            f"{_fmt(row['cpu_per_chunk_us'], '.1f'):>10}{_fmt(row['delta_per_chunk_us'], '+.2f'):>11}"
            f"{row['failures']:>6}"
        )
    return lines


def targets(report: dict[str, Any], delta: str = "cpu_delta_us", unit: str = "us") -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the targets of docs/performance.md, from this run's numbers: server CPU
    (``cpu_delta_us``, in us) or, for the instruction counts, the added thousands of instructions."""
    rows = {(r["scenario"], r["variant"]): r for r in report.get("rows", [])}
    found: list[tuple[str, str, str]] = []

    def check(
        name: str, ok: bool | None, measured: str, fastest_ok: bool | None = None, *of: dict[str, Any] | None
    ) -> None:
        failed = sum((row or {}).get("failures", 0) for row in of)
        if failed:
            verdict = f"invalid: {failed} failed"  # a failed request is not the path the target is about
        elif ok is None:
            verdict = "n/a"
        elif fastest_ok is not None and fastest_ok != ok:
            verdict = "unsettled"  # the two readings of the same rounds disagree: the run cannot tell
        else:
            verdict = "met" if ok else "NOT met"
        found.append((name, measured, verdict))

    def bare(scenario: str) -> dict[str, Any] | None:
        return rows.get((scenario, "bare"))

    def fastest(row: dict[str, Any], limit: float) -> bool | None:
        ratio = row.get("fastest_ratio")  # rows of server CPU only (not the instruction counts')
        return None if ratio is None else ratio <= limit

    ours, instrumentator = rows.get(("chat", "ours")), rows.get(("chat", "instrumentator"))
    if ours and instrumentator:
        measured = f"{ours[delta]:+.0f} {unit} vs {instrumentator[delta]:+.0f} {unit}"
        wins = _rounds_cheaper(report.get("batches", []), "chat", "ours", "instrumentator")
        if wins is not None:
            measured += f" (cheaper in {wins[0]} of {wins[1]} rounds)"
        fastest_ok = None
        if ours.get("fastest_delta_us") is not None and instrumentator.get("fastest_delta_us") is not None:
            mine, theirs = ours["fastest_delta_us"], instrumentator["fastest_delta_us"]
            measured += f"; fastest {mine:+.1f} vs {theirs:+.1f}"
            fastest_ok = mine <= theirs
        ok = ours[delta] <= instrumentator[delta]
        check(
            "metrics only, chat: +CPU <= instrumentator's", ok, measured, fastest_ok, ours, instrumentator, bare("chat")
        )
    for scenario in ("stream64", "stream256"):
        row = rows.get((scenario, "ours"))
        if row:
            over = (row["cpu_ratio"] - 1) * 100
            per_chunk = row[delta] / SCENARIOS[scenario].chunks
            measured = f"{over:+.1f}% ({per_chunk:+.2f} {unit}/chunk)" + _fastest_note(row)
            check(f"metrics only, {scenario}: CPU <= +5%", over <= 5, measured, fastest(row, 1.05), row, bare(scenario))
    row = rows.get(("chat", "ours+traces"))
    if row:
        measured = f"{row['cpu_ratio']:.2f}x" + _fastest_note(row, as_times=True)
        check("traces, chat: CPU <= 3x bare", row["cpu_ratio"] <= 3, measured, fastest(row, 3.0), row, bare("chat"))
    for scenario in ("stream64", "stream256"):
        row = rows.get((scenario, "ours+traces"))
        if row:
            over = (row["cpu_ratio"] - 1) * 100
            measured = f"{over:+.1f}%" + _fastest_note(row)
            check(f"traces, {scenario}: CPU <= +15%", over <= 15, measured, fastest(row, 1.15), row, bare(scenario))
            otel = rows.get((scenario, "otel-asgi"))
            if otel:
                times = otel[delta] / row[delta] if row[delta] > 0 else float("inf")
                cheaper = f"traces, {scenario}: >= 10x cheaper than otel-asgi"
                check(cheaper, times >= 10, f"{times:.1f}x cheaper", None, row, otel, bare(scenario))
        elif "ours+traces" in report.get("skipped", {}):
            check(f"traces, {scenario}: CPU <= +15%", None, "variant not available")
    for key, mem in report.get("memory", {}).items():
        if "final" in mem:
            # Over the soak (non-stream chat after every scenario has run, so the 1 MB bodies and 4,096-chunk
            # streams have already set the allocator's high-water mark): more than 2 MiB (or 5%) is growth.
            growth = (mem["final"] - mem["after_rounds"]) / 1024
            served = mem["requests"] - mem["rounds_requests"]
            ok = growth <= max(2.0, mem["after_rounds"] / 1024 * 0.05) if served >= 10_000 else None
            check(f"{key}: flat RSS", ok, f"{growth:+.1f} MiB over {served} req")
    for key, records in report.get("log_records", {}).items():
        # One request-log record per LLM request: whatever did not arrive was dropped at the processor's queue.
        check(
            f"{key}: every log record exported",
            records["requests"] == records["received"],
            f"{records['received']} of {records['requests']} records",
        )
    for key, spans in report.get("spans", {}).items():
        if key == "ours+traces":
            # One span per LLM request, every request is one: whatever did not arrive was dropped.
            dropped = spans["requests"] - spans["received"]
            check(f"{key}: every span exported", dropped == 0, f"{spans['received']} of {spans['requests']} spans")
    return found


def _bare_spread(batches: list[dict[str, Any]]) -> dict[str, float]:
    """Per scenario, the bare app's slowest batch over its fastest: the same code, so all of it is the machine."""
    cpu: dict[str, list[float]] = {}
    for b in batches:
        if b.get("variant") == "bare" and b.get("cpu_per_request"):
            cpu.setdefault(b["scenario"], []).append(b["cpu_per_request"])
    return {scenario: max(v) / min(v) for scenario, v in cpu.items() if len(v) > 1}


def _fastest_note(row: dict[str, Any], as_times: bool = False) -> str:
    """The row's figure from the fastest batches (server CPU only), beside the median of per-round ratios."""
    fastest = row.get("fastest_ratio")
    if fastest is None:
        return ""
    return f"; fastest {fastest:.2f}x" if as_times else f"; fastest {(fastest - 1) * 100:+.1f}%"


def _rounds_cheaper(batches: list[dict[str, Any]], scenario: str, mine: str, other: str) -> tuple[int, int] | None:
    """In how many rounds ``mine`` cost less server CPU per request than ``other`` (both ran in every round, a
    few seconds apart), out of the rounds both ran in: how far the median's verdict can be trusted."""
    cpu = {(b["round"], b["variant"]): b["cpu_per_request"] for b in batches if b.get("scenario") == scenario}
    rounds = sorted({r for r, v in cpu if v == mine and (r, other) in cpu})
    if not rounds:
        return None
    return sum(cpu[r, mine] <= cpu[r, other] for r in rounds), len(rounds)


def format_report(report: dict[str, Any]) -> str:
    lines = ["== Middleware overhead (server CPU per request is the headline; ratios are to bare, same round) =="]
    lines += format_rows(report.get("rows", []))
    for key, reason in report.get("skipped", {}).items():
        lines.append(f"(variant {key} not run: {reason})")
    spread = _bare_spread(report.get("batches", []))
    if spread:
        lines += ["", "How disturbed the machine was: the bare app's slowest batch over its fastest, per scenario"]
        lines.append("  " + ", ".join(f"{scenario} {ratio:.2f}x" for scenario, ratio in spread.items()))
    lines += ["", "Memory (KiB of RSS in the server process)"]
    lines.append(
        f"{'variant':<16}{'after warm-up':>14}{'after rounds':>14}{'final':>10}{'peak':>10}"
        f"{'requests':>10}{'counted':>10}"
    )
    for key, mem in report.get("memory", {}).items():
        counted = mem.get("counted")
        lines.append(
            f"{key:<16}{mem['after_warmup']:>14}{mem['after_rounds']:>14}{mem['final']:>10}{mem['peak']:>10}"
            f"{mem['requests']:>10}{'-' if counted is None else format(counted, '.0f'):>10}"
        )
        if mem.get("soak"):
            lines.append("    soak: " + ", ".join(f"{n} req -> {rss} KiB" for n, rss in mem["soak"]))
    if "spans_received" in report:
        lines.append(f"OTLP sink received {report['spans_received']} spans")
        for key, spans in report.get("spans", {}).items():
            per = spans["received"] / spans["requests"] if spans["requests"] else float("nan")
            lines.append(
                f"    {key}: {spans['received']} spans for {spans['requests']} requests ({per:.2f} per request)"
            )
    for key, records in report.get("log_records", {}).items():
        lines.append(
            f"OTLP sink received {records['received']} log records from {key} for {records['requests']} requests"
        )
    workers = report.get("workers")
    if workers:
        lines += ["", "Two uvicorn workers (not pinned; share both cores with the load generator)"]
        lines += format_rows(workers.get("rows", []))
        if "counted" in workers:
            lines.append(
                f"ours with 2 workers: {workers['counted']:.0f} of {workers['sent']} requests counted in one scrape"
            )
        lines += workers.get("notes", [])
    lines += ["", "Targets (this run)"]
    for name, measured, verdict in targets(report):
        lines.append(f"  {name:<52}{measured:<72}{verdict}")
    lines += report.get("notes", [])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The middleware table alone, with a choice of plan (``benchmarks/run`` runs ``full`` or ``smoke``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=sorted(PLANS), default="reduced")
    parser.add_argument("--variants", help="comma-separated variants (bare is always included)")
    parser.add_argument(
        "--scenarios", help="comma-separated: only these scenarios of the plan (then no soak and no two-worker part)"
    )
    parser.add_argument("--rounds", type=int, help="rounds instead of the plan's")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    only = args.variants.split(",") if args.variants else None
    plan = PLANS[args.plan]
    if args.scenarios:
        wanted = args.scenarios.split(",")
        unknown = [s for s in wanted if s not in plan.batch]
        if unknown:
            parser.error(f"not in plan {args.plan}: {', '.join(unknown)} (it has {', '.join(plan.batch)})")
        batch = {s: n for s, n in plan.batch.items() if s in wanted}
        plan = dataclasses.replace(plan, batch=batch, soak=0, workers_rounds=0)
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    report = run(plan, only, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(report))
    print(f"\nplan {args.plan}, finished in {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
