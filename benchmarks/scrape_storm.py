"""A storm of scrapes under several workers: what it costs the app, on the app's own path and on the metrics port.

A real ``uvicorn --workers N`` serves the demo app (``tests/apps/workers_app.py``) wrapped in the middleware, with
the metrics port and ``LLM_TELEMETRY_METRICS_APP_PATH=/metrics``, and tenant attribution: ``--combos`` distinct
(model, tenant) pairs are recorded first through the official ``openai`` SDK, so the exposition is that of a service
with that many label combinations. Then, for each row, ``--scrapers`` client processes scrape one endpoint without
pause (each scrape a new connection, so any worker may take it) while the main process times chat completions
through the ``openai`` SDK, one after another, for ``--seconds``. Each row prints:

- scrapes answered per second, and 503s (each worker answers at most ``exposition.MAX_ANSWERS`` at once);
- the CPU time of the server's processes per scrape (the app requests' own CPU, from the row without scrapes,
  taken out) and in all, as a share of one core;
- the app requests' latency (p50, p99, max) and how many were made;
- the scrapes in which ``llm_requests_total`` was lower than in the scraper's scrape before (must be 0: Prometheus
  reads a counter that went down as a reset).

- how old the answers were: the most app requests completed before a scrape began that its ``llm_requests_total``
  did not hold yet (``lag``), and the most it was lower than in the scraper's scrape before (``drop``), each as the
  milliseconds those requests took the client at the row's rate.

``--formats`` chooses what the scrapers ask for: ``text`` (no ``Accept``), ``openmetrics`` (Prometheus' own
``Accept``, OpenMetrics first), ``mixed`` (every other scraper each, as where Prometheus servers of several
versions or ``scrape_protocols`` and other agents scrape the same target), or ``switching`` (every other scraper
each, as in ``mixed``, and each scraper of OpenMetrics asks for the text format every other scrape, as a client
that changes its format would); several, comma-separated, a row each.

    python benchmarks/scrape_storm.py [--workers 1,3] [--scrapers 4] [--combos 400] [--seconds 8]
                                       [--formats text] [--port P --metrics-port M] [--work DIR]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import itertools
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from procs import children, cpus, free_port, pin, wait_http  # noqa: E402

MESSAGES: Any = [{"role": "user", "content": "one two three four"}]
_TOTAL = re.compile(rb"^llm_requests_total\{[^}]*\} (\S+)$", re.M)
#: The ``Accept`` header of Prometheus 2's and 3's default scrape protocols: OpenMetrics first, then the text format.
OPENMETRICS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def scraper(port: int, path: str, accepts: list[str], completed: Any, ready: Any, stop: Any, results: Any) -> None:
    """Scrape ``path`` back to back until ``stop``, a new connection each time, asking for each of ``accepts`` in
    turn (none: ""); put (answered, 503s, other failures, scrapes whose llm_requests_total was lower than the one
    before, the most it was lower, the most requests ``completed`` before a scrape began that it did not hold) on
    ``results``."""
    answered = busy = failed = went_down = 0
    last, drop, lag = -1.0, 0.0, 0.0
    turns = itertools.cycle(accepts)
    ready.release()
    while not stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        accept = next(turns)
        done = completed.value
        try:
            connection.request("GET", path, headers={"Accept": accept} if accept else {})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            failed += 1
            time.sleep(0.01)
            continue
        finally:
            connection.close()
        if response.status == 503:
            busy += 1
            continue
        if response.status != 200:
            failed += 1
            continue
        answered += 1
        asked = "application/openmetrics-text" if accept else "text/plain"
        if not (response.getheader("Content-Type") or "").startswith(asked) or body.endswith(b"# EOF\n") != bool(
            accept
        ):
            failed += 1  # an answer in another format than the one asked for
        total = sum(float(value) for value in _TOTAL.findall(body))
        if total < last:
            went_down += 1
            drop = max(drop, last - total)
        lag = max(lag, done - total)
        last = total
    results.put((answered, busy, failed, went_down, drop, lag))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes, their ended threads included (the metrics port answers each
    connection in a thread of its own, which is gone by the time a row ends), from ``/proc/<pid>/stat``."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's workers (multiprocessing's resource tracker left out)."""
    found = []
    for pid in children(supervisor):
        try:
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def start_server(workers: int, port: int, metrics_port: int, work: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    env.update(
        LLM_TELEMETRY_METRICS_PORT=str(metrics_port),
        LLM_TELEMETRY_METRICS_HOST="127.0.0.1",
        LLM_TELEMETRY_METRICS_APP_PATH="/metrics",
        LLM_TELEMETRY_ATTRIBUTION_HEADERS="x-tenant-id=tenant",
        LLM_TELEMETRY_REQUEST_LOGS="false",
        OTEL_TRACES_EXPORTER="none",
        TMPDIR=str(work),  # the default state directory: in this run's own directory
        WORKERS_APP_FIRST_TOKEN_DELAY="0",
        WORKERS_APP_TOKEN_DELAY="0",
        PYTHONPATH=os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "uvicorn", "workers_app:app", "--app-dir", str(REPO / "tests" / "apps"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
               "--log-level", "warning"]  # fmt: skip
    with (work / f"server-{workers}.log").open("wb") as log:
        server = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if cpu is None else functools.partial(pin, cpu),
        )
    wait_http(f"http://127.0.0.1:{port}/healthz", server)
    wait_http(f"http://127.0.0.1:{metrics_port}/metrics", server)
    deadline = time.monotonic() + 60
    while workers > 1 and len(worker_pids(server.pid)) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start")
        time.sleep(0.1)
    return server


def row(
    title: str,
    server: subprocess.Popen[bytes],
    client: openai.OpenAI,
    target: tuple[int, str] | None,
    args: Any,
    formats: str = "text",
    made: int = 0,
) -> tuple[float, float, float, int, list[float], float, float]:
    """(scrapes per second, server CPU seconds per second, 503s per second, scrapes that went down, sorted app
    latencies, the most a scrape went down, the most requests a scrape lagged behind) of one row; ``made``: the
    requests made before it."""
    context = multiprocessing.get_context("fork")  # (no import of this module again in each scraper)
    results, ready, stop = context.Queue(), context.Semaphore(0), context.Event()
    completed = context.Value("d", float(made), lock=False)
    scrapers = []
    if target is not None:
        accepts = {
            "text": [[""]],
            "openmetrics": [[OPENMETRICS_ACCEPT]],
            "mixed": [[OPENMETRICS_ACCEPT], [""]],
            "switching": [[OPENMETRICS_ACCEPT, ""], [""]],
        }[formats]
        scrapers = [
            context.Process(target=scraper, args=(*target, accepts[n % len(accepts)], completed, ready, stop, results))
            for n in range(args.scrapers)
        ]
        for process in scrapers:
            process.start()
        for _ in scrapers:
            ready.acquire()
        time.sleep(0.5)  # the storm under way before the clock starts
    pids = [server.pid, *worker_pids(server.pid)]
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    latencies = []
    turn = 0
    while time.monotonic() < started + args.seconds:
        begun = time.perf_counter()
        client.chat.completions.create(model=f"model-{turn % 10}", messages=MESSAGES)
        latencies.append(time.perf_counter() - begun)
        turn += 1
        completed.value = made + turn
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pids) - cpu_before
    # Scrapes counted from before the clock started to a moment after it stopped: per second over that time.
    stop.set()
    answered = busy = failed = went_down = 0
    drop = lag = 0.0
    for _ in scrapers:
        one = results.get(timeout=120)
        answered, busy, failed, went_down = (
            a + b for a, b in zip((answered, busy, failed, went_down), one[:4], strict=True)
        )
        drop, lag = max(drop, one[4]), max(lag, one[5])
    storm = time.monotonic() - started + 0.5
    for process in scrapers:
        process.join(timeout=30)
    if failed:
        print(f"  ({title}: {failed} scrapes failed outright or came in another format)", flush=True)
    rate = answered / storm if target is not None else 0.0
    return rate, cpu / elapsed, busy / storm if target is not None else 0.0, went_down, sorted(latencies), drop, lag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,3", help="worker counts, one server each (1: a single process)")
    parser.add_argument("--scrapers", type=int, default=4, help="client processes scraping without pause")
    parser.add_argument("--combos", type=int, default=400, help="distinct (model, tenant) pairs recorded first")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each row")
    parser.add_argument(
        "--server-cpu",
        type=int,
        default=None,
        help="pin the server to this CPU and the clients to the others, as a server with one core of its own",
    )
    parser.add_argument(
        "--formats",
        default="text",
        help="what the scrapers ask for, a row each: text, openmetrics, mixed (every other scraper each), switching "
        "(as mixed, and the OpenMetrics scrapers ask for the text format every other scrape)",
    )
    parser.add_argument("--port", type=int, default=0, help="the app's port (default: a free one)")
    parser.add_argument("--metrics-port", type=int, default=0, help="the metrics port (default: a free one)")
    parser.add_argument("--work", type=Path, default=None, help="where the state and the server's log go")
    args = parser.parse_args()
    if args.server_cpu is not None:
        os.sched_setaffinity(0, set(cpus()) - {args.server_cpu})  # the clients (scrapers forked after this too)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llm-telemetry-storm-", dir=args.work))
    print(
        f"{args.scrapers} scrapers without pause, each scrape a new connection; {args.combos} label combinations; "
        f"{args.seconds:.0f} s a row"
        + (f"; the server on CPU {args.server_cpu}, the clients on the others" if args.server_cpu is not None else ""),
        flush=True,
    )
    header = (
        f"{'workers':>7}  {'scrapes of':<25} {'scrapes/s':>9} {'503/s':>6} {'CPU ms/scrape':>13} {'CPU %':>6} "
        f"{'app p50 ms':>10} {'p99 ms':>7} {'max ms':>7} {'app req/s':>8} {'went down':>9} {'drop ms':>7} {'lag ms':>6}"
    )
    lines = []
    for workers in (int(n) for n in args.workers.split(",")):
        port, metrics_port = args.port or free_port(), args.metrics_port or free_port()
        server = start_server(workers, port, metrics_port, work, args.server_cpu)
        try:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key="storm",
                max_retries=0,
                timeout=60,
                default_headers={"Connection": "close"},  # a new connection each: any worker may take it
            )
            tenants = max(1, args.combos // 100)
            for i in range(args.combos):
                client.chat.completions.create(
                    model=f"model-{i % 100}",
                    messages=MESSAGES,
                    extra_headers={"x-tenant-id": f"t{i // 100 % tenants}"},
                )
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60) as response:
                size = len(response.read())
            print(f"{workers} worker(s): exposition {size / 1024:,.0f} KiB", flush=True)
            per_request = 0.0  # server CPU seconds per app request, from the row without scrapes
            made = args.combos  # app requests made so far
            formats = args.formats.split(",")
            rows: list[tuple[str, tuple[int, str] | None, str]] = [("nothing", None, "text")]
            for kind in formats:
                suffix = f" ({kind})" if formats != ["text"] else ""
                rows.append((f"app path{suffix}", (port, "/metrics"), kind))
                rows.append((f"metrics port{suffix}", (metrics_port, "/metrics"), kind))
            for title, target, kind in rows:
                rate, cpu, busy, went_down, times, drop, lag = row(title, server, client, target, args, kind, made)
                made += len(times)
                requests = len(times) / args.seconds
                if target is None:
                    per_request = cpu / requests
                per_scrape = (cpu - per_request * requests) / rate * 1000 if rate else float("nan")
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
                line = (
                    f"{workers:7d}  {title:<25} {rate:9.1f} {busy:6.1f} {per_scrape:13.1f} {cpu * 100:6.0f} "
                    f"{statistics.median(times) * 1e3:10.1f} {p99 * 1e3:7.1f} {times[-1] * 1e3:7.1f} {requests:8.1f} "
                    f"{went_down if target else '':>9} {f'{drop / requests * 1e3:.0f}' if target else '':>7} "
                    f"{f'{lag / requests * 1e3:.0f}' if target else '':>6}"
                )
                lines.append(line)
                print(line, flush=True)
            client.close()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    print()
    print(header)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
