"""Kill and replace workers of a multi-worker server many times under traffic, and watch what the scrapes say.

A real ``uvicorn --workers N`` (or ``gunicorn -w N -k uvicorn.workers.UvicornWorker``) serves the demo app
(``tests/apps/workers_app.py``) wrapped in the middleware, with ``LLM_TELEMETRY_MULTIPROC_DIR`` set. Client threads
send streamed and plain chat completions through the official ``openai`` SDK, each on a new connection; one thread
scrapes the metrics port and another the app's own ``/metrics`` path, back to back. The main thread SIGKILLs a
worker (in turn: the one serving the metrics port, one with a stream in flight, any) and waits for the supervisor
to replace it, ``--cycles`` times. It prints, every ``--every`` cycles, the state directory's file count and size,
the scrape time and the processes' resident memory, and at the end:

- the scrapes that were not answered 200, by kind, and any counter sample that went down between two scrapes;
- the requests the clients completed against ``llm_requests_total``, with the requests in flight on a worker when
  it was killed (those are in no counter: their clients see a dropped connection);
- how the server ended on SIGTERM.

    python benchmarks/worker_churn.py [--server uvicorn|gunicorn] [--workers 3] [--cycles 200]
                                      [--port P --metrics-port M] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from procs import children, free_port, memory_kib  # noqa: E402

MESSAGES: Any = [{"role": "user", "content": "one two three four"}]
#: Streams long enough (words x token delay) that a kill often lands in one.
STREAM_WORDS = "40"
COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


@dataclass
class Ledger:
    """What the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    failed: int = 0
    #: Requests in flight: id -> the worker pid that answered their headers (None before the headers).
    inflight: dict[int, int | None] = field(default_factory=dict)
    #: (pid, monotonic time) of each completed request, to tell a completion just before its worker's kill.
    done: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Scrapes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: int = 0
    not_ok: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    decreases: list[str] = field(default_factory=list)
    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    last_text: str = ""
    #: Scrapes in which some counter sample was lower than in the scrape before, or missing.
    went_down: int = 0
    #: Scrapes answered 200 with an empty body (a header cut short by a kill, read by a lenient client).
    empty: int = 0
    #: Where the first scrapes that went down are written (with the one before each), or None.
    keep: Path | None = None
    kept: list[Path] = field(default_factory=list)


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            if sample.name.endswith(COUNTER_SUFFIXES):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def requests_total(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llm_requests_total"
    )


def scrape_loop(url: str, record: Scrapes, stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=15) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as exc:
            status, text = exc.code, ""
        except (OSError, http.client.HTTPException) as exc:
            # Refused while no worker serves the port, or cut by the kill of the one answering (an IncompleteRead).
            reason = getattr(exc, "reason", exc)
            with record.lock:
                key = type(reason).__name__
                record.not_ok[key] = record.not_ok.get(key, 0) + 1
            time.sleep(0.05)
            continue
        elapsed = time.monotonic() - started
        with record.lock:
            if status != 200:
                record.not_ok[str(status)] = record.not_ok.get(str(status), 0) + 1
                continue
            record.answered += 1
            record.seconds.append(elapsed)
            now = counters(text)
            if any(now.get(key, -1.0) < before for key, before in record.last.items()):
                record.went_down += 1
            if not text:
                record.empty += 1
            for key, before in record.last.items():
                after = now.get(key)
                if after is None or after < before:
                    record.decreases.append(f"{key[0]}{dict(key[1])}: {before} -> {after}")
                    if record.keep is not None and len(record.kept) < 3:
                        record.kept.append(record.keep / f"went-down-{len(record.kept)}")
                        record.kept[-1].with_suffix(".before").write_text(record.last_text)
                        record.kept[-1].with_suffix(".after").write_text(text)
            record.last = now
            record.last_text = text


def client_loop(base: str, ledger: Ledger, stop: threading.Event, ids: Any) -> None:
    client = openai.OpenAI(
        base_url=f"{base}/v1", api_key="churn", max_retries=0, timeout=30, default_headers={"Connection": "close"}
    )
    for turn in itertools.count():
        if stop.is_set():
            break
        ident = next(ids)
        with ledger.lock:
            ledger.inflight[ident] = None
        pid = None
        try:
            if turn % 2 == 0:
                with client.chat.completions.with_streaming_response.create(
                    model="demo",
                    messages=MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers={"x-demo-words": STREAM_WORDS},
                ) as response:
                    pid = int(response.headers["x-worker-pid"])
                    with ledger.lock:
                        ledger.inflight[ident] = pid
                    chunks = list(response.parse())
                if not chunks or chunks[-1].usage is None:
                    raise RuntimeError("stream ended without its usage chunk")
            else:
                raw = client.chat.completions.with_raw_response.create(model="demo", messages=MESSAGES)
                pid = int(raw.headers["x-worker-pid"])
                if raw.parse().usage is None:
                    raise RuntimeError("answer without usage")
        except Exception:
            with ledger.lock:
                ledger.failed += 1
                ledger.inflight.pop(ident, None)
            time.sleep(0.02)
            continue
        with ledger.lock:
            ledger.ok += 1
            ledger.inflight.pop(ident, None)
            ledger.done.append((pid, time.monotonic()))
    client.close()


def workers_of(supervisor: int) -> set[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker left out)."""
    found = set()
    for pid in children(supervisor):
        try:
            if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            found.add(pid)
    return found


def joined(state_dir: Path, pid: int) -> bool:
    """Whether worker ``pid`` has set up its state (its liveness file is in the directory)."""
    try:
        return any(name.startswith(f"w{pid}-") and name.endswith(".alive") for name in os.listdir(state_dir))
    except OSError:
        return False


def dir_usage(state_dir: Path) -> tuple[int, int]:
    files = size = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(state_dir):
            with contextlib.suppress(OSError):
                size += entry.stat().st_blocks * 512
                files += 1
    return files, size


def port_holder(state_dir: Path) -> int | None:
    try:
        stem = (state_dir / "port").read_text().strip()
    except OSError:
        return None
    return int(stem[1:].partition("-")[0]) if stem[1:].partition("-")[0].isdigit() else None


def wait_until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("uvicorn", "gunicorn"), default="uvicorn")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="print a row every this many cycles")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=None, help="where the state, the server's log and the scrapes that went down go "
        "(default: a new directory in the temp dir, left for reading)"
    )  # fmt: skip
    args = parser.parse_args()
    rng = random.Random(args.seed)
    port = args.port or free_port()
    metrics_port = args.metrics_port or free_port()
    base = f"http://127.0.0.1:{port}"
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llm-telemetry-churn-", dir=args.work))
    state_dir = work / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    env.update(
        LLM_TELEMETRY_MULTIPROC_DIR=str(state_dir),
        LLM_TELEMETRY_METRICS_PORT=str(metrics_port),
        LLM_TELEMETRY_METRICS_HOST="127.0.0.1",
        LLM_TELEMETRY_METRICS_APP_PATH="/metrics",
        LLM_TELEMETRY_REQUEST_LOGS="false",
        OTEL_TRACES_EXPORTER="none",
        WORKERS_APP_FIRST_TOKEN_DELAY="0.01",
        WORKERS_APP_TOKEN_DELAY="0.01",
        PYTHONPATH=os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
    )
    apps = str(REPO / "tests" / "apps")
    if args.server == "uvicorn":
        command = [sys.executable, "-m", "uvicorn", "workers_app:app", "--app-dir", apps, "--host", "127.0.0.1",
                   "--port", str(port), "--workers", str(args.workers)]  # fmt: skip
    else:
        command = [sys.executable, "-m", "gunicorn", "workers_app:app", "--chdir", apps, "-w", str(args.workers),
                   "-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}",
                   "--graceful-timeout", "5"]  # fmt: skip
    log_path = work / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        wait_until(lambda: len(workers_of(server.pid)) == args.workers, 60, "the workers")
        wait_until(lambda: all(joined(state_dir, pid) for pid in workers_of(server.pid)), 60, "every worker's state")

        def metrics_up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(metrics_up, 60, "the metrics port")
        ledger = Ledger()
        on_port, on_app = Scrapes(keep=work / "port"), Scrapes(keep=work / "app")
        for record in (on_port, on_app):
            assert record.keep is not None
            record.keep.mkdir()
        ids = itertools.count()
        threads = [
            threading.Thread(target=scrape_loop, args=(f"http://127.0.0.1:{metrics_port}/metrics", on_port, stop)),
            threading.Thread(target=scrape_loop, args=(f"{base}/metrics", on_app, stop)),
        ]
        threads += [threading.Thread(target=client_loop, args=(base, ledger, stop, ids)) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        kills: list[tuple[int, float, int, int]] = []  # victim, time, in flight with its pid, in flight unknown
        how = {"port holder": 0, "mid-stream": 0, "any": 0}
        rows = []
        window_start = 0
        print(f"{args.server} --workers {args.workers}, {args.clients} clients, state in {state_dir}", flush=True)
        for cycle in range(1, args.cycles + 1):
            live = workers_of(server.pid)
            with ledger.lock:
                streaming = [pid for pid in ledger.inflight.values() if pid in live]
            holder = port_holder(state_dir)
            turn = cycle % 3
            if turn == 0 and holder in live:
                victim, kind = holder, "port holder"
            elif turn == 1 and streaming:
                victim, kind = rng.choice(streaming), "mid-stream"
            else:
                victim, kind = rng.choice(sorted(live)), "any"
            how[kind] += 1
            with ledger.lock:
                held = sum(1 for pid in ledger.inflight.values() if pid == victim)
                unknown = sum(1 for pid in ledger.inflight.values() if pid is None)
                os.kill(victim, signal.SIGKILL)
                kills.append((victim, time.monotonic(), held, unknown))

            def replaced(victim: int = victim) -> bool:
                live = workers_of(server.pid)
                return victim not in live and len(live) == args.workers

            wait_until(replaced, 60, f"a replacement for worker {victim}")
            wait_until(
                lambda: all(joined(state_dir, pid) for pid in workers_of(server.pid)), 60, "the new worker's state"
            )
            time.sleep(rng.uniform(0.2, 0.6))
            if cycle % args.every == 0 or cycle == 1:
                files, size = dir_usage(state_dir)
                live = workers_of(server.pid)
                rss = sorted(memory_kib(pid)[0] for pid in live)
                with on_port.lock:
                    took = on_port.seconds[window_start:]
                    window_start = len(on_port.seconds)
                p50 = statistics.median(took) * 1000 if took else float("nan")
                worst = max(took) * 1000 if took else float("nan")
                rows.append((cycle, files, size, p50, worst, memory_kib(server.pid)[0], rss))
                print(
                    f"cycle {cycle:4d}: {files} files, {size / 1024:.0f} KiB, scrape p50 {rows[-1][3]:.1f} ms, "
                    f"supervisor {rows[-1][5] / 1024:.1f} MiB, workers {[round(r / 1024, 1) for r in rss]} MiB",
                    flush=True,
                )
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        time.sleep(1.5)  # the last requests' counts, and any worker folding
        final_text = ""
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=15) as response:
                final_text = response.read().decode()
            time.sleep(0.5)
        counted = requests_total(final_text)
        # A completion within this long before its worker's kill may have been answered and not yet counted.
        near = 0
        for victim, when, _held, _unknown in kills:
            near += sum(1 for pid, done in ledger.done if pid == victim and when - 0.5 <= done <= when)
        print()
        print("cycle  files  state KiB  scrape p50 ms  scrape max ms  supervisor MiB  workers RSS MiB")
        for cycle, files, size, p50, worst, sup, rss in rows:
            workers_rss = " ".join(f"{r / 1024:.1f}" for r in rss)
            print(
                f"{cycle:5d}  {files:5d}  {size / 1024:9.0f}  {p50:13.1f}  {worst:13.1f}  {sup / 1024:14.1f}  "
                f"{workers_rss}"
            )
        print()
        print(f"kills: {len(kills)} ({', '.join(f'{n} {k}' for k, n in how.items())})")
        for name, record in (("metrics port", on_port), ("app /metrics", on_app)):
            print(
                f"scrapes of the {name}: {record.answered} answered 200, not answered 200: {record.not_ok or 'none'}; "
                f"scrapes in which a counter went down or was missing: {record.went_down} ({len(record.decreases)} "
                f"samples; answered 200 with an empty body: {record.empty})"
            )
            for line in record.decreases[:4]:
                print("   ", line)
            if record.kept:
                print(f"    the first such scrapes, with the one before each: {record.kept[0].parent}")
        held = sum(k[2] for k in kills)
        unknown = sum(k[3] for k in kills)
        print(
            f"client requests: {ledger.ok} completed, {ledger.failed} failed; in flight at the kills: {held} on the "
            f"victim, {unknown} before their headers (any worker)"
        )
        print(
            f"llm_requests_total at the end: {counted:.0f}; completed - counted = {ledger.ok - counted:.0f} "
            f"(completions within 0.5 s before their worker's kill: {near})"
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            code = server.wait()
            print("the server did not exit within 60 s of SIGTERM: killed")
        took = time.monotonic() - started
        text = log_path.read_text(errors="replace")
        print(f"SIGTERM: exit code {code} after {took:.1f} s; tracebacks in the log: {text.count('Traceback')}")
        files, size = dir_usage(state_dir)
        print(f"state directory after exit: {files} files, {size / 1024:.0f} KiB; server log: {log_path}")


if __name__ == "__main__":
    main()
