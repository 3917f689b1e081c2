"""Exact metrics across worker processes: real uvicorn and gunicorn servers with several workers on 127.0.0.1.

The multi-worker tests start ``tests/apps/workers_app.py`` under ``uvicorn --workers N`` and
``gunicorn -w N -k uvicorn.workers.UvicornWorker``, drive it with the ``openai`` SDK and scrape the metrics port,
which one worker serves for all of them. The fast tests compare the single-process and the shared-state
exposition in one process, and check that a single-process server never touches the shared-state machinery.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import http.server
import itertools
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from llm_telemetry import multiproc
from llm_telemetry.config import Settings
from llm_telemetry.demo.app import create_app
from llm_telemetry.exposition import SHARE
from llm_telemetry.telemetry import Telemetry
from support import FRESH, Metrics, free_port, scrape_text, serve, wait_for

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "apps"

#: The demo counts one input token per word and replies with 12 words.
MESSAGES: Any = [{"role": "user", "content": "one two three four"}]
INPUT_TOKENS = 4
OUTPUT_TOKENS = 12
EMBED_INPUT = ["alpha beta"]
EMBED_TOKENS = 2
#: USD per million tokens of the priced model; the slow streams use an unpriced model.
PRICES = {"models": {"demo-priced": {"input": 1.0, "output": 2.0}}}
FIRST_TOKEN_DELAY = 0.02


@dataclass
class Traffic:
    """Requests sent and completed, from which every expected total follows."""

    streams: int = 0
    plains: int = 0
    rate_limited: int = 0
    embeddings: int = 0
    #: Slow streams the client closed while a live worker was still sending them.
    disconnected: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, ...]:
        return (self.streams, self.plains, self.rate_limited, self.embeddings, self.disconnected)


def assert_totals(metrics: Metrics, sent: Traffic, active: int = 0) -> None:
    """Every counter, histogram count and the active gauge equal what ``sent`` implies, exactly."""
    chats = sent.streams + sent.plains
    priced = {"gen_ai_request_model": "demo-priced"}
    assert metrics.value("llm_requests_total", **priced) == chats + sent.rate_limited
    assert metrics.value("llm_requests_total", gen_ai_request_stream="true", **priced) == sent.streams
    assert metrics.value("llm_requests_total", gen_ai_request_model="demo-embed") == sent.embeddings
    assert metrics.value("llm_requests_total", gen_ai_request_model="demo-slow") == sent.disconnected
    assert metrics.value("llm_errors_total", error_type="rate_limit") == sent.rate_limited
    assert metrics.value("llm_errors_total", error_type="client_disconnect") == sent.disconnected
    reported = {"llm_usage_source": "reported"}
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input", **reported, **priced) == chats * INPUT_TOKENS
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output", **reported, **priced) == chats * OUTPUT_TOKENS
    assert (
        metrics.value("llm_tokens_total", gen_ai_token_type="input", gen_ai_request_model="demo-embed")
        == sent.embeddings * EMBED_TOKENS
    )
    assert metrics.value("llm_cost_usd_total") == pytest.approx(
        chats * (INPUT_TOKENS * 1.0 + OUTPUT_TOKENS * 2.0) / 1e6
    )
    histograms = {
        "gen_ai_server_request_duration_seconds": chats + sent.rate_limited,
        "gen_ai_server_time_to_first_token_seconds": sent.streams,
        "gen_ai_server_time_per_output_token_seconds": sent.streams,
    }
    for name, count in histograms.items():
        assert metrics.value(f"{name}_count", **priced) == count, name
        assert metrics.value(f"{name}_bucket", le="+Inf", **priced) == count, name
        buckets = sorted(
            (float(s["le"]), metrics.value(f"{name}_bucket", le=s["le"], **priced)) for s in _les(metrics, name)
        )
        assert [c for _, c in buckets] == sorted(c for _, c in buckets), f"{name} buckets are not cumulative"
        assert (metrics.value(f"{name}_sum", **priced) > 0) == (count > 0), name
    # The demo waits FIRST_TOKEN_DELAY before the first token: no stream can land below it.
    for le, value in _bucket_values(metrics, "gen_ai_server_time_to_first_token_seconds", **priced):
        if le < FIRST_TOKEN_DELAY:
            assert value == 0
    assert metrics.value("llm_requests_active") == active


def settle(server: Server, sent: Traffic) -> None:
    """Wait until the last responses are recorded: a worker records a call just after its last byte is sent."""

    def recorded() -> bool:
        assert_totals(server.scrape(), sent)
        return True

    wait_for("the last requests to be recorded", recorded)


def _les(metrics: Metrics, name: str) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for labels in metrics.series(f"{name}_bucket"):
        seen.setdefault(labels["le"], labels)
    return list(seen.values())


def _bucket_values(metrics: Metrics, name: str, **labels: str) -> list[tuple[float, float]]:
    return [(float(s["le"]), metrics.value(f"{name}_bucket", le=s["le"], **labels)) for s in _les(metrics, name)]


def _client(base: str) -> openai.OpenAI:
    # "Connection: close" makes every request a new connection, which any worker may accept.
    return openai.OpenAI(base_url=f"{base}/v1", api_key="test", max_retries=0, default_headers={"Connection": "close"})


def drive(base: str, streams: int, plains: int, rate_limited: int, embeddings: int) -> tuple[Traffic, set[int]]:
    """Send a mix concurrently through the openai SDK; return what was sent and the pids of the answering workers."""
    client = _client(base)
    pids: set[int] = set()

    def stream() -> None:
        with client.chat.completions.with_streaming_response.create(
            model="demo-priced", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ) as response:
            pids.add(int(response.headers["x-worker-pid"]))
            chunks = list(response.parse())
        assert chunks[-1].usage is not None

    def plain() -> None:
        raw = client.chat.completions.with_raw_response.create(model="demo-priced", messages=MESSAGES)
        pids.add(int(raw.headers["x-worker-pid"]))
        assert raw.parse().usage is not None

    def limited() -> None:
        with pytest.raises(openai.RateLimitError) as failure:
            client.chat.completions.create(
                model="demo-priced", messages=MESSAGES, extra_headers={"x-demo-fail": "rate_limit"}
            )
        pids.add(int(failure.value.response.headers["x-worker-pid"]))

    def embed() -> None:
        raw = client.embeddings.with_raw_response.create(model="demo-embed", input=EMBED_INPUT)
        pids.add(int(raw.headers["x-worker-pid"]))

    jobs: list[Callable[[], None]] = [stream] * streams + [plain] * plains + [limited] * rate_limited
    jobs += [embed] * embeddings
    jobs = jobs[::2] + jobs[1::2]  # interleave the kinds
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    client.close()
    return Traffic(streams, plains, rate_limited, embeddings), pids


class SlowStreams:
    """Streams that stay in flight (100 000 words) until closed; each remembers the worker serving it."""

    def __init__(self, base: str) -> None:
        self.client = _client(base)
        self.stack = contextlib.ExitStack()
        self.open: list[tuple[int, Any]] = []

    def start(self) -> int:
        response = self.stack.enter_context(
            self.client.chat.completions.with_streaming_response.create(
                model="demo-slow", messages=MESSAGES, stream=True, extra_headers={"x-demo-words": "100000"}
            )
        )
        pid = int(response.headers["x-worker-pid"])
        chunks = iter(response.parse())
        next(chunks)  # the server is now inside the request
        self.open.append((pid, chunks))
        return pid

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()
        self.client.close()


def process_children(pid: int) -> set[int]:
    """The server's worker processes (not multiprocessing's resource tracker, which uvicorn's spawn starts)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmdline:
                children.add(int(entry.name))
    return children


def is_running(pid: int) -> bool:
    """False once ``pid`` has exited, even if its parent has not reaped it yet (a zombie holds no files)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


class Server:
    """A real uvicorn or gunicorn server with ``workers`` worker processes, in its own session."""

    def __init__(
        self,
        kind: str,
        workers: int,
        port: int,
        metrics_port: int,
        env: dict[str, str],
        log: Path,
        options: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.workers = workers
        self.port = port
        self.metrics_port = metrics_port
        self.env = env
        self.log = log
        #: More of the server's own command-line options.
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{port}"

    def _startups(self) -> int:
        """How many worker startups the server's log has said (uvicorn's line, for each worker of either server)."""
        return self.log.read_bytes().count(b"Application startup complete") if self.log.exists() else 0

    def command(self) -> list[str]:
        if self.kind == "uvicorn":
            return [sys.executable, "-m", "uvicorn", "workers_app:app", "--app-dir", str(APPS),
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
                    *self.options]  # fmt: skip
        return [sys.executable, "-m", "gunicorn", "workers_app:app", "--chdir", str(APPS),
                "-w", str(self.workers), "-k", "uvicorn.workers.UvicornWorker",
                "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5", *self.options]  # fmt: skip

    def start(self) -> Server:
        started = self._startups()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for("the server's workers", lambda: len(process_children(self.pid)) == self.workers)
        # Every worker through its startup, not only the first to accept: on a busy machine a worker still importing
        # the app left every request to the other, and the tests that need both to answer ran out of tries.
        wait_for("every worker's startup", lambda: self._startups() - started >= self.workers)
        wait_for("the app", lambda: urllib.request.urlopen(f"{self.base}/healthz", timeout=5).status == 200)
        # (Answered: a worker that keeps its own numbers, the shared state off, has nothing to show before a request.)
        wait_for("the metrics port", lambda: scrape_text(self.metrics_port) is not None)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def scrape(self, fresh: bool = False) -> Metrics:
        """A scrape; ``fresh``: rendered for it (a query string), not one another scrape just had."""
        return Metrics(scrape_text(self.metrics_port, "/metrics?fresh" if fresh else "/metrics"))

    def scrape_app(self) -> tuple[Metrics, int]:
        """A scrape of the app's own path (``LLM_TELEMETRY_METRICS_APP_PATH=/metrics``) over a new connection, which
        any worker may accept, as Prometheus makes it; and the worker that answered (the app's ``x-worker-pid``)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("GET", "/metrics")
            with connection.getresponse() as response:
                text, answering = response.read().decode(), int(response.headers["x-worker-pid"])
        finally:
            connection.close()
        return Metrics(text), answering

    def serving_pid(self, metrics: Metrics) -> int:
        """The worker that answered this scrape: its ``service.instance.id`` ends with its pid."""
        (info,) = metrics.series("target_info")
        return int(info["service_instance_id"].rsplit("-", 1)[1])


def _server_env(tmp_path: Path, metrics_port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    (tmp_path / "prices.json").write_text(json.dumps(PRICES))
    env.update(
        {
            "LLM_TELEMETRY_METRICS_PORT": str(metrics_port),
            "LLM_TELEMETRY_METRICS_HOST": "127.0.0.1",
            "LLM_TELEMETRY_PRICING": str(tmp_path / "prices.json"),
            "LLM_TELEMETRY_REQUEST_LOGS": "false",
            "OTEL_TRACES_EXPORTER": "none",
            # The default shared directory lives under the temp dir; keep it inside this test's directory.
            "TMPDIR": str(tmp_path / "tmp"),
            "PYTHONPATH": os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
            "WORKERS_APP_FIRST_TOKEN_DELAY": str(FIRST_TOKEN_DELAY),
            **extra,
        }
    )
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def new_server(
    tmp_path: Path,
    kind: str = "uvicorn",
    workers: int = 2,
    log: str = "server.log",
    options: Sequence[str] = (),
    server: type[Server] = Server,
    **extra: str,
) -> Server:
    """A ``server`` not yet started: ``kind`` with ``workers`` workers and ``options`` on a free port and a free
    metrics port, the test's environment (:func:`_server_env`) with ``extra`` on top, its output in
    ``tmp_path / log``."""
    port, metrics_port = free_port(), free_port()
    env = _server_env(tmp_path, metrics_port, extra)
    return server(kind, workers, port, metrics_port, env, tmp_path / log, options)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server.start()
    finally:
        server.stop()


#: The tests that find the server's workers (and which one answered) in ``/proc``.
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads worker pids from /proc")

CASES = [
    pytest.param("uvicorn", 2, "default", id="uvicorn-2"),
    pytest.param("uvicorn", 4, "default", id="uvicorn-4"),
    pytest.param("gunicorn", 2, "prometheus-dir", id="gunicorn-2"),
    pytest.param("gunicorn", 4, "default", id="gunicorn-4"),
]


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize(("kind", "workers", "state_dir"), CASES)
def test_workers_scrapes_are_exact_across_kill_and_restart(
    kind: str, workers: int, state_dir: str, tmp_path: Path
) -> None:
    extra = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")} if state_dir == "prometheus-dir" else {}
    server = new_server(tmp_path, kind, workers, **extra)

    with running(server):
        first_workers = process_children(server.pid)
        sent, pids = drive(server.base, streams=8 * workers, plains=6 * workers, rate_limited=2, embeddings=2)
        for _ in range(20):  # the kernel picks the accepting worker; make sure the merge has several to add up
            if len(pids) >= 2:
                break
            more, more_pids = drive(server.base, streams=2, plains=6, rate_limited=0, embeddings=0)
            sent, pids = sent + more, pids | more_pids
        assert len(pids) >= 2, f"all traffic went to one worker ({pids}); the merge is not exercised"
        settle(server, sent)
        scrapes = [server.scrape(fresh=True) for _ in range(3)]
        for metrics in scrapes:
            assert_totals(metrics, sent)
        # Idle, so every scrape is the same merge, byte for byte (buckets and sums included).
        assert scrapes[0].text == scrapes[1].text == scrapes[2].text

        # Streams in flight on several workers: the active gauge is their live sum.
        slow = SlowStreams(server.base)
        try:
            for _ in range(2 * workers):
                slow.start()
            assert_totals(server.scrape(fresh=True), sent, active=len(slow.open))

            # SIGKILL the worker serving the metrics port, and a worker holding streams if that is another one.
            holder = server.serving_pid(server.scrape())
            assert holder in first_workers
            victims = {holder}
            if holder not in {pid for pid, _ in slow.open}:
                victims.add(slow.open[0][0])
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            for pid in victims:  # the signal is asynchronous: wait until the kernel has closed its files
                wait_for(f"worker {pid} to die", lambda pid=pid: not is_running(pid))
            survivors = [(pid, chunks) for pid, chunks in slow.open if pid not in victims]

            # Another worker takes the port over; nothing counted is lost, the dead workers' streams are gone.
            after = wait_for("another worker to serve the metrics", lambda: server.scrape())
            assert server.serving_pid(after) not in victims
            assert_totals(after, sent, active=len(survivors))
            assert_totals(server.scrape(), sent, active=len(survivors))
        finally:
            slow.close()
        # Closing the surviving streams ends them as client disconnects on their (live) workers.
        sent.disconnected += len(survivors)

        # A call's points (the gauge, then the request, then its error) are written one after another, and a scrape
        # reading the workers' files meanwhile sees some of them: wait until a scrape has them all.
        settle(server, sent)

        # The replacements join: keep sending until one of them has answered, counting everything sent.
        def replaced() -> set[int]:
            fresh = process_children(server.pid) - first_workers
            return fresh if len(fresh) == len(victims) else set()

        replacements = wait_for("replacement workers", replaced)
        served: set[int] = set()
        for _ in range(40):
            more, pids = drive(server.base, streams=2, plains=6, rate_limited=0, embeddings=0)
            sent += more
            served |= pids
            if served & replacements:
                break
        assert served & replacements, "no replacement worker answered any request"
        settle(server, sent)
        for _ in range(2):
            assert_totals(server.scrape(), sent)
        old_state = sorted(p.name for p in (tmp_path / "tmp").glob("llm-telemetry-*/*"))

    log = server.log.read_text(errors="replace")
    assert "address already in use" not in log.lower()
    assert "errno 98" not in log.lower()

    # A restart of the whole service starts from zero: state left by the previous run is not added in.
    server.log = tmp_path / "restart.log"
    with running(server):
        fresh, _ = drive(server.base, streams=2, plains=2, rate_limited=1, embeddings=1)
        settle(server, fresh)
        assert_totals(server.scrape(), fresh)
        if state_dir == "default":
            new_state = sorted(p.name for p in (tmp_path / "tmp").glob("llm-telemetry-*/*"))
            namespace = f"-{multiproc.pid_namespace()}" if multiproc.pid_namespace() else ""
            expected = [f"{kind}-{server.pid}{namespace}"]
            assert new_state == expected and old_state != new_state, (old_state, new_state)
    assert "address already in use" not in server.log.read_text(errors="replace").lower()


def _drive_until_answered(server: Server, by: set[int], sent: Traffic) -> Traffic:
    """Send traffic until one of the workers ``by`` has answered some of it; return ``sent`` plus all of it."""
    for _ in range(40):  # the kernel picks the accepting worker
        more, pids = drive(server.base, streams=2, plains=4, rate_limited=0, embeddings=0)
        sent += more
        if pids & by:
            return sent
    raise AssertionError(f"none of the workers {by} answered a request")


@pytest.mark.slow
@linux_only
def test_workers_gunicorn_ttin_ttou_and_hup_keep_every_count(tmp_path: Path) -> None:
    """gunicorn adds a worker (``TTIN``), removes one (``TTOU``) and replaces them all (``HUP``) under the same
    arbiter: what the removed workers counted stays in every total, nothing is counted twice, and the streams a
    removed worker held drop out of ``llm_requests_active``."""
    # A worker stopped with a stream in flight waits for it to end until gunicorn aborts it, --timeout after.
    server = new_server(tmp_path, "gunicorn", 2, options=("--timeout", "10"))
    with running(server):
        sent = _drive_until_answered(server, process_children(server.pid), Traffic())
        os.kill(server.pid, signal.SIGTTIN)
        added = wait_for(
            "a third worker", lambda: len(process_children(server.pid)) == 3 and process_children(server.pid)
        )
        # Every worker counts some of it: the one TTOU removes (the oldest) included.
        for worker in added:
            sent = _drive_until_answered(server, {worker}, sent)
        settle(server, sent)

        slow = SlowStreams(server.base)
        try:
            for _ in range(30):  # until every worker holds a stream: the one TTOU removes among them
                slow.start()
                if {pid for pid, _ in slow.open} == added:
                    break
            assert {pid for pid, _ in slow.open} == added, "a worker holds no stream"
            assert_totals(server.scrape(fresh=True), sent, active=len(slow.open))
            os.kill(server.pid, signal.SIGTTOU)
            wait_for("a worker removed", lambda: len(process_children(server.pid)) == 2)
            (removed,) = added - process_children(server.pid)
            survivors = [pid for pid, _ in slow.open if pid != removed]
            # (Refused for a second or so if the removed worker served the metrics port.)
            assert_totals(wait_for("the metrics port", lambda: server.scrape(fresh=True)), sent, active=len(survivors))
        finally:
            slow.close()
        sent.disconnected += len(survivors)  # (closed by the client on live workers: counted as disconnects)
        settle(server, sent)

        before = process_children(server.pid)
        os.kill(server.pid, signal.SIGHUP)
        wait_for(
            "new workers", lambda: not process_children(server.pid) & before and len(process_children(server.pid)) == 2
        )
        sent = _drive_until_answered(server, process_children(server.pid), sent)
        settle(server, sent)
        for _ in range(2):
            assert_totals(server.scrape(), sent)


class _ScriptServer(Server):
    """gunicorn started by its ``gunicorn`` script. ``USR2`` runs the arbiter's command again, and ``python -m
    gunicorn``'s puts gunicorn's package directory first on ``sys.path``: the new arbiter's workers then fail to
    boot."""

    def command(self) -> list[str]:
        return [str(Path(sys.executable).parent / "gunicorn"), *super().command()[3:]]


@pytest.mark.slow
@linux_only
def test_workers_gunicorn_upgrade_on_an_explicit_directory_keeps_every_count(tmp_path: Path) -> None:
    """gunicorn's binary upgrade (``USR2``, then ``TERM`` to the old arbiter) with ``LLM_TELEMETRY_MULTIPROC_DIR``:
    the new arbiter's workers join the old ones' directory, so a scrape answered by a worker of either arbiter has
    every count, none goes down when the old arbiter stops, and no worker takes the old ones for another service on
    the metrics port. (In the default location the new arbiter is another server, and its totals start from zero:
    docs/workers.md.)"""
    state = str(tmp_path / "state")
    server = new_server(
        tmp_path, "gunicorn", 2, server=_ScriptServer, LLM_TELEMETRY_MULTIPROC_DIR=state,
        LLM_TELEMETRY_METRICS_APP_PATH="/metrics",
    )  # fmt: skip
    with running(server), _arbiters_stopped() as arbiters:
        old, old_workers = server.pid, process_children(server.pid)
        sent = _drive_until_answered(server, old_workers, Traffic())
        settle(server, sent)
        _, new_workers = _upgrade(server, old, old_workers, arbiters)
        sent = _drive_until_answered(server, new_workers, sent)
        sent = _drive_until_answered(server, old_workers, sent)
        settle(server, sent)

        # The app's path, answered by workers of both arbiters: each has every count.
        answered: set[int] = set()
        for _ in range(200):
            metrics, pid = server.scrape_app()
            assert_totals(metrics, sent)
            answered.add(pid)
            if answered & old_workers and answered & new_workers:
                break
        assert answered & old_workers and answered & new_workers, answered

        server.stop()  # TERM to the old arbiter, which stops its workers and exits
        # A new worker takes the metrics port over, with every count.
        after = wait_for(
            "a new worker on the metrics port",
            lambda: (m := server.scrape()) and server.serving_pid(m) in new_workers and m,
        )
        assert_totals(after, sent)
    log = server.log.read_text(errors="replace")
    assert "is held by a process that is not a worker of this server" not in log


def _promtool_accepts(text: str, tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        return
    scraped = tmp_path / "scrape.txt"
    scraped.write_text(text)
    with scraped.open() as stdin:
        checked = subprocess.run(["promtool", "check", "metrics"], stdin=stdin, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


class _Shown:
    """A test's scrapes: each has every count sent (and promtool accepts it, given ``promtool_in``); ``totals`` has
    the requests each showed, in the order taken."""

    def __init__(self, promtool_in: Path | None = None) -> None:
        self.promtool_in = promtool_in
        self.totals: list[float] = []

    def __call__(self, metrics: Metrics, sent: Traffic) -> None:
        assert_totals(metrics, sent)
        self.totals.append(metrics.value("llm_requests_total", gen_ai_request_model="demo-priced"))
        if self.promtool_in is not None:
            _promtool_accepts(metrics.text, self.promtool_in)


@contextlib.contextmanager
def _arbiters_stopped() -> Iterator[list[int]]:
    """The list of the arbiters a test's ``USR2`` started: each is stopped (``TERM``) at the end."""
    arbiters: list[int] = []
    try:
        yield arbiters
    finally:
        for arbiter in arbiters:
            with contextlib.suppress(ProcessLookupError):
                os.kill(arbiter, signal.SIGTERM)
            wait_for("the arbiter to stop", lambda arbiter=arbiter: not is_running(arbiter))


def _upgrade(server: Server, arbiter: int, workers: set[int], arbiters: list[int]) -> tuple[int, set[int]]:
    """``USR2`` to ``arbiter`` (its workers: ``workers``): the new arbiter (added to ``arbiters``) and its two
    workers, once they have started."""
    started = server.log.read_bytes().count(b"Application startup complete")
    os.kill(arbiter, signal.SIGUSR2)
    new = wait_for("the new arbiter", lambda: next(iter(process_children(arbiter) - workers)))
    arbiters.append(new)
    wait_for(
        "its workers' startup",
        lambda: server.log.read_bytes().count(b"Application startup complete") >= started + 2,
    )
    new_workers = process_children(new)
    assert len(new_workers) == 2
    return new, new_workers


@pytest.mark.slow
@linux_only
def test_workers_gunicorn_upgrade_in_the_default_location_keeps_every_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn's binary upgrade (``USR2``, then ``QUIT`` to the old arbiter) with the state in the default location:
    the new arbiter's workers continue the old arbiter's directory, so every scrape, of the metrics port or of the
    app's path, answered by a worker of either arbiter, has every count; none goes down when the old arbiter stops;
    a worker the new arbiter starts after it was promoted (``TTIN``, no ``GUNICORN_PID`` left) counts on in the same
    totals; and a later start's sweep removes the directory and its link once both arbiters are gone."""
    server = new_server(tmp_path, "gunicorn", 2, server=_ScriptServer, LLM_TELEMETRY_METRICS_APP_PATH="/metrics")
    base = tmp_path / "tmp" / f"llm-telemetry-{os.getuid()}"
    scraped = _Shown(promtool_in=tmp_path)

    def app_path_of(workers: set[int], sent: Traffic) -> None:
        """Scrapes of the app's path until a worker of ``workers`` answered one; each has every count."""
        for _ in range(200):
            metrics, pid = server.scrape_app()
            scraped(metrics, sent)
            if pid in workers:
                return
        raise AssertionError(f"no scrape of the app's path answered by {workers}")

    with running(server), _arbiters_stopped() as arbiters:
        old, old_workers = server.pid, process_children(server.pid)
        sent = _drive_until_answered(server, old_workers, Traffic())
        settle(server, sent)
        scraped(server.scrape(), sent)
        new, new_workers = _upgrade(server, old, old_workers, arbiters)
        (link,) = base.glob(f"gunicorn-{new}-*")
        assert link.is_symlink() and link.resolve() == next(base.glob(f"gunicorn-{old}-*")).resolve()

        # During the upgrade: requests to the workers of both arbiters, scrapes answered by either.
        sent = _drive_until_answered(server, new_workers, sent)
        sent = _drive_until_answered(server, old_workers, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)
        app_path_of(old_workers, sent)
        app_path_of(new_workers, sent)

        os.kill(old, signal.SIGQUIT)
        assert server.process is not None
        server.process.wait(timeout=30)
        wait_for("the promotion", lambda: b"Master has been promoted" in server.log.read_bytes())
        after = wait_for(
            "a new worker on the metrics port",
            lambda: (m := server.scrape()) and server.serving_pid(m) in new_workers and m,
        )
        scraped(after, sent)

        # A worker started after the promotion counts on in the same totals.
        started = server.log.read_bytes().count(b"Application startup complete")
        os.kill(new, signal.SIGTTIN)
        wait_for("the third worker", lambda: len(process_children(new)) == 3)
        wait_for("its startup", lambda: server.log.read_bytes().count(b"Application startup complete") >= started + 1)
        (third,) = process_children(new) - new_workers
        sent = _drive_until_answered(server, {third}, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)
        app_path_of({third}, sent)
    assert scraped.totals == sorted(scraped.totals), scraped.totals
    log = server.log.read_text(errors="replace")
    assert "is held by a process that is not a worker of this server" not in log
    assert "were removed" not in log  # (a sweep that took the directory from under the new arbiter's workers)

    # Both arbiters gone (reaped: a zombie's pid and start time still read as its process): the next start in the
    # default location removes the directory and the link.
    wait_for("the new arbiter to be reaped", lambda: not Path(f"/proc/{new}").exists())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    multiproc.default_directory(multiproc.Supervisor("gunicorn", os.getpid()))
    assert sorted(base.iterdir()) == []


@pytest.mark.slow
@linux_only
def test_workers_gunicorn_second_upgrade_and_its_rollback_in_the_default_location_keep_every_count(
    tmp_path: Path,
) -> None:
    """Two ``USR2`` upgrades in a row with the state in the default location (``QUIT`` to the first arbiter once the
    second serves), the second rolled back (``QUIT`` to the third arbiter, ``TTIN`` to the second): the third arbiter
    links to the first one's directory too, and the totals go on across all three arbiters, every scrape of the
    metrics port and of the app's path has every count, and none shows less than one before it."""
    server = new_server(tmp_path, "gunicorn", 2, server=_ScriptServer, LLM_TELEMETRY_METRICS_APP_PATH="/metrics")
    base = tmp_path / "tmp" / f"llm-telemetry-{os.getuid()}"
    scraped = _Shown()
    with running(server), _arbiters_stopped() as arbiters:
        first, first_workers = server.pid, process_children(server.pid)
        sent = _drive_until_answered(server, first_workers, Traffic())
        second, second_workers = _upgrade(server, first, first_workers, arbiters)
        os.kill(first, signal.SIGQUIT)
        assert server.process is not None
        server.process.wait(timeout=30)
        sent = _drive_until_answered(server, second_workers, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)

        third, third_workers = _upgrade(server, second, second_workers, arbiters)
        (directory,) = (path for path in base.iterdir() if not path.is_symlink())
        assert directory.name.startswith(f"gunicorn-{first}-")
        assert next(base.glob(f"gunicorn-{third}-*")).resolve() == directory.resolve()
        sent = _drive_until_answered(server, third_workers, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)
        scraped(server.scrape_app()[0], sent)

        # The rollback: the third arbiter stopped, the second goes on and adds a worker back.
        os.kill(third, signal.SIGQUIT)
        wait_for("the third arbiter to stop", lambda: not is_running(third))
        started = server.log.read_bytes().count(b"Application startup complete")
        os.kill(second, signal.SIGTTIN)
        wait_for("a third worker", lambda: len(process_children(second)) == 3)
        wait_for("its startup", lambda: server.log.read_bytes().count(b"Application startup complete") > started)
        (added,) = process_children(second) - second_workers
        sent = _drive_until_answered(server, {added}, sent)
        settle(server, sent)
        scraped(wait_for("the metrics port", lambda: server.scrape()), sent)
        scraped(server.scrape_app()[0], sent)
    assert scraped.totals == sorted(scraped.totals), scraped.totals
    log = server.log.read_text(errors="replace")
    assert "is held by a process that is not a worker of this server" not in log


@pytest.mark.slow
@linux_only
def test_workers_gunicorn_upgrade_link_removed_by_a_temp_cleaner_keeps_every_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temp cleaner removes the link a gunicorn upgrade made in the default location (an age-based one takes the
    link first: its time never changes, while the files of the directory it names are written), long after the
    promotion, just after ``TTOU`` stopped a worker that no merge has folded yet: every scrape of the metrics port and
    of the app's path, before and after a worker is killed and replaced, has every count, none goes down, and the
    next start removes the directory and the link. Before, the workers each made a directory of their own in the
    link's place and moved there: the stopped worker's counts stayed behind (36 requests shown, then 25 for good),
    and a worker taking the metrics port over as the link went ended its thread with a traceback."""
    server = new_server(tmp_path, "gunicorn", 2, server=_ScriptServer, LLM_TELEMETRY_METRICS_APP_PATH="/metrics")
    base = tmp_path / "tmp" / f"llm-telemetry-{os.getuid()}"
    scraped = _Shown(promtool_in=tmp_path)

    def looked_at(sent: Traffic) -> None:
        """Scrapes of the metrics port and of the app's path, over a few of the workers' once-a-second looks."""
        for _ in range(15):
            scraped(wait_for("the metrics port", lambda: server.scrape()), sent)
            scraped(server.scrape_app()[0], sent)
            time.sleep(0.2)

    with running(server), _arbiters_stopped() as arbiters:
        old, old_workers = server.pid, process_children(server.pid)
        sent = _drive_until_answered(server, old_workers, Traffic())
        new, _ = _upgrade(server, old, old_workers, arbiters)
        os.kill(old, signal.SIGQUIT)
        assert server.process is not None
        server.process.wait(timeout=30)
        wait_for("the promotion", lambda: b"Master has been promoted" in server.log.read_bytes())
        (link,) = base.glob(f"gunicorn-{new}-*")
        directory = link.resolve()

        # A third worker; each of the three counts some requests, then TTOU stops one.
        started = server.log.read_bytes().count(b"Application startup complete")
        os.kill(new, signal.SIGTTIN)
        wait_for(
            "the third worker's startup",
            lambda: server.log.read_bytes().count(b"Application startup complete") > started,
        )
        for worker in process_children(new):
            sent = _drive_until_answered(server, {worker}, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)
        os.kill(new, signal.SIGTTOU)
        wait_for("a worker to stop", lambda: len(process_children(new)) == 2)
        link.unlink()  # the cleaner (no merge since the worker stopped)
        looked_at(sent)
        assert link.is_symlink() and link.resolve() == directory

        # A worker killed: the arbiter's replacement counts on in the same totals.
        workers = process_children(new)
        started = server.log.read_bytes().count(b"Application startup complete")
        os.kill(min(workers), signal.SIGKILL)
        wait_for(
            "the replacement's startup",
            lambda: server.log.read_bytes().count(b"Application startup complete") > started,
        )
        (replacement,) = process_children(new) - workers
        sent = _drive_until_answered(server, {replacement}, sent)
        settle(server, sent)
        looked_at(sent)
    assert scraped.totals == sorted(scraped.totals), scraped.totals
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert "were removed" not in log  # (nothing but the link was, and that is put back)

    # Every arbiter gone: the next start removes the directory and the link.
    wait_for("the new arbiter to be reaped", lambda: not Path(f"/proc/{new}").exists())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    multiproc.default_directory(multiproc.Supervisor("gunicorn", os.getpid()))
    assert sorted(base.iterdir()) == []


@pytest.mark.slow
@linux_only
def test_workers_gunicorn_worker_started_while_the_upgrade_link_and_its_record_are_removed_keeps_every_count(
    tmp_path: Path,
) -> None:
    """An age-based temp cleaner removes a gunicorn upgrade's link in one pass with the files made as old (the ``run``
    record naming the new arbiter, the workers' liveness files), and the arbiter starts a worker (``TTIN``) before the
    others put them back (held stopped here, ``SIGSTOP``, so that the start is surely inside that second): the new
    worker joins the directory where its siblings hold their locks, the link is put back to it, and every scrape has
    every count, a worker ``TTOU`` stopped before the cleaner's pass (not folded yet) included. Before, the new worker
    made a directory of its own in the link's place, the link could not be put back, the others moved their own files
    there, and the stopped worker's counts were gone for good."""
    server = new_server(tmp_path, "gunicorn", 2, server=_ScriptServer, LLM_TELEMETRY_METRICS_APP_PATH="/metrics")
    base = tmp_path / "tmp" / f"llm-telemetry-{os.getuid()}"
    scraped = _Shown(promtool_in=tmp_path)

    def startup(arbiter: int, signal_number: int) -> None:
        started = server.log.read_bytes().count(b"Application startup complete")
        os.kill(arbiter, signal_number)
        wait_for("a worker's startup", lambda: server.log.read_bytes().count(b"Application startup complete") > started)

    with running(server), _arbiters_stopped() as arbiters:
        old, old_workers = server.pid, process_children(server.pid)
        sent = _drive_until_answered(server, old_workers, Traffic())
        new, _ = _upgrade(server, old, old_workers, arbiters)
        os.kill(old, signal.SIGQUIT)
        assert server.process is not None
        server.process.wait(timeout=30)
        wait_for("the promotion", lambda: b"Master has been promoted" in server.log.read_bytes())
        (link,) = base.glob(f"gunicorn-{new}-*")
        directory = link.resolve()
        startup(new, signal.SIGTTIN)
        for worker in process_children(new):
            sent = _drive_until_answered(server, {worker}, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)
        os.kill(new, signal.SIGTTOU)
        wait_for("a worker to stop", lambda: len(process_children(new)) == 2)

        siblings = process_children(new)
        for worker in siblings:
            os.kill(worker, signal.SIGSTOP)
        try:
            link.unlink()  # the cleaner's pass
            (directory / "run").unlink()
            for alive in directory.glob("*.alive"):
                alive.unlink()
            startup(new, signal.SIGTTIN)
        finally:
            for worker in siblings:
                os.kill(worker, signal.SIGCONT)
        assert link.is_symlink() and link.resolve() == directory
        (started,) = process_children(new) - siblings
        sent = _drive_until_answered(server, {started}, sent)
        settle(server, sent)
        for _ in range(15):  # over a few of the workers' once-a-second looks
            scraped(wait_for("the metrics port", lambda: server.scrape()), sent)
            scraped(server.scrape_app()[0], sent)
            time.sleep(0.2)
        assert link.is_symlink() and link.resolve() == directory
    assert scraped.totals == sorted(scraped.totals), scraped.totals
    assert "Traceback" not in server.log.read_text(errors="replace")


#: A gunicorn configuration whose new arbiter, started by USR2 (GUNICORN_PID set), waits before it starts any worker
#: until the old arbiter has exited: its first worker then starts with the old arbiter gone, as when the old one is
#: stopped (or killed) right after USR2, before the new one's workers have booted.
_AFTER_THE_OLD_ARBITER = """
import os, time

def on_starting(server):
    old = os.environ.get("GUNICORN_PID")
    deadline = time.monotonic() + 60
    while old and os.getppid() == int(old) and time.monotonic() < deadline:
        time.sleep(0.05)
"""


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("stop", ["QUIT", "TERM"])
def test_workers_gunicorn_upgrade_whose_workers_start_after_the_old_arbiter_exited_keeps_every_count(
    tmp_path: Path, stop: str
) -> None:
    """gunicorn's ``USR2`` with the state in the default location, the old arbiter stopped (``QUIT`` or ``TERM``)
    before any worker of the new one started: the new workers still continue the old arbiter's directory (by the
    old arbiter's record, no longer by their arbiter's parent), so the totals go on from the old ones; they did
    start from zero, the old directory swept by the first new worker."""
    (tmp_path / "conf.py").write_text(_AFTER_THE_OLD_ARBITER)
    server = new_server(
        tmp_path, "gunicorn", 2, server=_ScriptServer, options=("-c", str(tmp_path / "conf.py")),
        LLM_TELEMETRY_METRICS_APP_PATH="/metrics",
    )  # fmt: skip
    base = tmp_path / "tmp" / f"llm-telemetry-{os.getuid()}"
    scraped = _Shown(promtool_in=tmp_path)
    with running(server), _arbiters_stopped() as arbiters:
        old, old_workers = server.pid, process_children(server.pid)
        sent = _drive_until_answered(server, old_workers, Traffic())
        settle(server, sent)
        scraped(server.scrape(), sent)
        started = server.log.read_bytes().count(b"Application startup complete")
        os.kill(old, signal.SIGUSR2)
        new = wait_for("the new arbiter", lambda: next(iter(process_children(old) - old_workers)))
        arbiters.append(new)
        os.kill(old, getattr(signal, f"SIG{stop}"))
        assert server.process is not None
        server.process.wait(timeout=30)
        wait_for(
            "the new workers' startup",
            lambda: server.log.read_bytes().count(b"Application startup complete") >= started + 2,
        )
        new_workers = process_children(new)
        assert len(new_workers) == 2
        (link,) = base.glob(f"gunicorn-{new}-*")
        assert link.is_symlink() and link.resolve() == next(base.glob(f"gunicorn-{old}-*")).resolve()

        after = wait_for(
            "a new worker on the metrics port",
            lambda: (m := server.scrape()) and server.serving_pid(m) in new_workers and m,
        )
        scraped(after, sent)
        sent = _drive_until_answered(server, new_workers, sent)
        settle(server, sent)
        scraped(server.scrape(), sent)
        scraped(server.scrape_app()[0], sent)
    assert scraped.totals == sorted(scraped.totals), scraped.totals
    log = server.log.read_text(errors="replace")
    assert "is held by a process that is not a worker of this server" not in log


# --- one process ------------------------------------------------------------------------------------------


def _families(text: str, openmetrics: bool = False) -> dict[str, tuple[str, str, set[frozenset[str]], set[str]]]:
    """name -> (type, unit, label-name sets, bucket bounds) of a scrape, minus target_info."""
    parse = parse_openmetrics if openmetrics else text_string_to_metric_families
    result = {}
    for family in parse(text):
        if family.name.startswith("target"):
            continue
        labels = {frozenset(k for k in s.labels if k != "le") for s in family.samples}
        les = {s.labels["le"] for s in family.samples if "le" in s.labels}
        result[family.name] = (family.type, family.unit, labels, les)
    return result


def _drive_in_process(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="test", max_retries=0)
    for _ in client.chat.completions.create(
        model="demo-priced", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ):
        pass
    client.chat.completions.create(model="demo-priced", messages=MESSAGES)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-tenant": "acme"})
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="demo-priced", messages=MESSAGES, extra_headers={"x-demo-fail": "rate_limit"}
        )
    client.embeddings.create(model="demo-embed", input=EMBED_INPUT)
    client.close()


def test_workers_exposition_matches_single_process(tmp_path: Path) -> None:
    """Same traffic, both modes: same families, types, units, label sets, buckets and counter values."""
    texts: dict[str, dict[str, str]] = {}
    modes: list[tuple[str, dict[str, Any]]] = [("single", {}), ("shared", {"multiproc_dir": str(tmp_path / "state")})]
    for mode, options in modes:
        app = create_app(
            metrics_port=0,
            metrics_app_path="/metrics",
            pricing=PRICES,
            attribution_headers={"x-tenant": "tenant"},
            request_logs=False,
            **options,
        )
        with serve(app) as base:
            _drive_in_process(base)
            port = int(base.rsplit(":", 1)[1])
            # The last call is recorded just after its response went out.
            wait_for(
                "5 recorded requests", lambda p=port: Metrics(scrape_text(p, FRESH)).value("llm_requests_total") == 5
            )
            texts[mode] = {
                "text": scrape_text(port, FRESH),
                "openmetrics": scrape_text(port, accept="application/openmetrics-text; version=1.0.0"),
            }
        app.telemetry.shutdown()
        assert (app.telemetry.workers is not None) == (mode == "shared")
    assert any(name.endswith(".db") for name in os.listdir(tmp_path / "state"))

    single, shared = texts["single"], texts["shared"]
    assert _families(single["text"]) == _families(shared["text"])
    assert _families(single["openmetrics"], True) == _families(shared["openmetrics"], True)
    assert "llm_metadata_tenant" in {k for f in _families(single["text"]).values() for s in f[2] for k in s}
    one, many = Metrics(single["text"]), Metrics(shared["text"])
    for name in ("llm_requests_total", "llm_tokens_total", "llm_errors_total", "llm_cost_usd_total"):
        assert sorted((sorted(s.labels.items()), s.value) for s in one.samples if s.name == name) == sorted(
            (sorted(s.labels.items()), s.value) for s in many.samples if s.name == name
        ), name
    for name in ("gen_ai_server_request_duration_seconds_count", "gen_ai_server_time_to_first_token_seconds_count"):
        assert one.value(name) == many.value(name) > 0


def test_workers_single_process_pays_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No supervisor, no explicit directory: the plain OpenTelemetry path, and no files anywhere."""
    for var in ("PROMETHEUS_MULTIPROC_DIR", "LLM_TELEMETRY_MULTIPROC_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert multiproc.detect_supervisor() is None
    telemetry = Telemetry(Settings.resolve(metrics_port=0, request_logs=False))
    try:
        assert telemetry.workers is None
        # The in-process instruments, not the shared-file ones of multiproc.py.
        assert type(telemetry.instruments.tokens).__module__ != multiproc.__name__
        assert type(telemetry.instruments.request_duration).__module__ != multiproc.__name__
    finally:
        telemetry.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_workers_explicit_off_wins_over_prometheus_dir(tmp_path: Path) -> None:
    settings = Settings.resolve(metrics_port=0, multiproc_dir="off")
    assert multiproc.activate(settings, env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) is None
    assert list(tmp_path.iterdir()) == []


def test_workers_state_of_a_previous_server_is_wiped(tmp_path: Path) -> None:
    """Same directory, another supervisor (a restarted service): the old numbers are not added in."""
    settings = Settings.resolve(metrics_port=0, request_logs=False, multiproc_dir=str(tmp_path))
    before = multiproc.SharedState(str(tmp_path), multiproc.Supervisor("parent", os.getpid()))
    before.add(json.dumps(["llm.requests", "c", []]), 5)
    before.close()
    # The pid of the supervisor of the next run: a process that has exited, so its identity no longer matches.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    after = multiproc.SharedState(str(tmp_path), multiproc.Supervisor("parent", int(gone.stdout)))
    try:
        assert after.merged() == {}
    finally:
        after.close()
    mode = multiproc.activate(settings)
    assert mode is not None and mode.state is not None
    mode.close()


def test_workers_dead_worker_counters_kept_gauges_dropped(tmp_path: Path) -> None:
    """A real second process records and is SIGKILLed: its counters stay, its live gauge share goes."""
    supervisor = multiproc.Supervisor("parent", os.getpid())
    mine = multiproc.SharedState(str(tmp_path), supervisor)
    counter, gauge = json.dumps(["llm.requests", "c", []]), json.dumps(["llm.requests.active", "g", []])
    mine.add(counter, 1)
    mine.add(gauge, 1)
    script = (
        "import os, sys, time\n"
        "from llm_telemetry import multiproc\n"
        f"state = multiproc.SharedState({str(tmp_path)!r}, multiproc.Supervisor('parent', {os.getpid()}))\n"
        f"state.add({counter!r}, 2); state.add({gauge!r}, 3)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline() == b"ready\n"
        assert mine.merged() == {counter: 3, gauge: 4}
        other.kill()
        other.wait(timeout=10)
        assert mine.merged() == {counter: 3, gauge: 1}
        assert mine.merged() == {counter: 3, gauge: 1}  # folded into the archive once, not twice
        assert sorted(p.suffix for p in tmp_path.iterdir() if p.name.startswith("w")) == [".alive", ".db"]
    finally:
        other.kill()
        other.wait(timeout=10)
        mine.close()


#: Three costs in US$ whose float sum depends on the order of the additions: only the first two added first round to
#: the exact sum; the third added first (as when its worker has died and is folded into the archive) is one unit in
#: the last place lower.
ORDERED_COSTS = (0.0004199, 0.0002434, 0.0003231)


def test_workers_float_totals_are_the_same_from_every_worker_and_never_go_down_when_one_dies(tmp_path: Path) -> None:
    """A cost (and every histogram's ``_sum``) is the sum of the workers' shares, and float addition depends on its
    order. Summed in the order a worker lists the files in (a set, in another order in each worker: uvicorn's workers
    are fresh interpreters, each with its own hash seed) or with a dead worker's share folded first, the same costs
    came out one unit in the last place apart: the total changed with the worker answering the scrape, and went down
    when a worker died, which Prometheus reads as a counter reset (``increase()`` then counts the whole total again).
    Every worker shows the correctly rounded exact sum, before and after the others are killed."""
    cost, requests = multiproc._key("llm.cost", "c", ()), multiproc._key("llm.requests", "c", ())
    exact = math.fsum(ORDERED_COSTS)
    assert exact == float(sum(map(Fraction, ORDERED_COSTS)))  # fsum rounds the exact sum once
    assert exact > (ORDERED_COSTS[2] + ORDERED_COSTS[0]) + ORDERED_COSTS[1]  # folded first, the third lowered it
    script = (
        "import json, sys\n"
        "from llm_telemetry import multiproc\n"
        f"state = multiproc.SharedState({str(tmp_path)!r}, multiproc.Supervisor('parent', {os.getpid()}))\n"
        f"state.add({cost!r}, float(sys.argv[1]))\n"
        f"state.add({requests!r}, 1)\n"
        "print('ready', flush=True)\n"
        "for _ in sys.stdin:\n"
        "    merged = state.merged()\n"
        f"    print(json.dumps([merged[{cost!r}], merged[{requests!r}]]), flush=True)\n"
    )
    path = os.pathsep.join(filter(None, [str(REPO / "middleware"), os.environ.get("PYTHONPATH")]))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, repr(amount)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": path},
        )
        for seed, amount in enumerate(ORDERED_COSTS)
    ]

    def shown(worker: subprocess.Popen[str]) -> list[float]:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write("merge\n")
        worker.stdin.flush()
        return list(json.loads(worker.stdout.readline()))

    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        assert [shown(worker) for worker in workers] == [[exact, 3]] * 3
        for victim in (2, 0):  # the third cost's worker first: folded first, it lowered the total
            workers[victim].kill()
            workers[victim].wait(timeout=10)
            alive = [worker for worker in workers if worker.poll() is None]
            assert [shown(worker) for worker in alive] == [[exact, 3]] * len(alive)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=10)


def test_workers_float_total_kept_exact_when_a_worker_that_never_saw_the_archive_makes_it_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive removed under a running server (a /tmp cleaner), and a worker joining makes a new one, folding a
    worker that died meanwhile: the scraping worker adds its own copy (the workers dead before) to it. That sum is
    exact too, so the cost shown does not go down across it."""
    monkeypatch.setattr(multiproc.SharedState, "_keep", lambda self: None)  # nothing puts the archive back
    supervisor = multiproc.Supervisor("parent", os.getpid())
    cost = multiproc._key("llm.cost", "c", ())
    first, second, third = ORDERED_COSTS
    scraper = multiproc.SharedState(str(tmp_path), supervisor)
    try:
        dead = multiproc.SharedState(str(tmp_path), supervisor)
        dead.add(cost, third)
        dead.close()
        assert scraper.merged()[cost] == third  # folded into the archive the scraper keeps a copy of
        (tmp_path / "archive.json").unlink()
        (tmp_path / "archive.json.version").unlink()
        gone = multiproc.SharedState(str(tmp_path), supervisor)
        gone.add(cost, first)
        gone.close()
        joining = multiproc.SharedState(str(tmp_path), supervisor)  # folds ``gone`` into a new archive
        try:
            joining.add(cost, second)
            assert scraper.merged()[cost] == math.fsum(ORDERED_COSTS)
        finally:
            joining.close()
        assert scraper.merged()[cost] == math.fsum(ORDERED_COSTS)
    finally:
        scraper.close()


@settings(max_examples=100, deadline=None)
@given(
    shares=st.lists(
        st.lists(st.floats(min_value=0.0, max_value=100.0, allow_subnormal=False), min_size=1, max_size=4),
        min_size=2,
        max_size=5,
    ),
    data=st.data(),
)
def test_workers_float_total_is_the_exact_sum_and_never_goes_down_whatever_order_workers_die_in(
    shares: list[list[float]], data: st.DataObject
) -> None:
    """Workers record amounts (each keeps its own running float sum, its share), then die one by one in any order,
    and any worker still alive answers each scrape: the total shown is always the correctly rounded sum of the
    shares, so it never goes down."""
    cost = multiproc._key("llm.cost", "c", ())
    supervisor = multiproc.Supervisor("parent", os.getpid())
    deaths = data.draw(st.permutations(range(len(shares))), label="order of deaths")
    answering = data.draw(
        st.lists(st.integers(min_value=0, max_value=len(shares)), min_size=len(shares)), label="workers answering"
    )
    with tempfile.TemporaryDirectory() as directory:
        scraper = multiproc.SharedState(directory, supervisor)  # the worker holding the metrics port, all along
        workers = [multiproc.SharedState(directory, supervisor) for _ in shares]
        try:
            totals = []
            for worker, amounts in zip(workers, shares, strict=True):
                total = 0.0
                for amount in amounts:
                    worker.add(cost, amount)
                    total += amount
                totals.append(total)
            exact = math.fsum(totals)
            before = scraper.merged()[cost]
            assert before == exact
            alive = [scraper, *workers]
            for victim, pick in zip(deaths, answering, strict=False):
                workers[victim].close()
                alive.remove(workers[victim])
                after = alive[pick % len(alive)].merged()[cost]
                assert after >= before
                assert after == exact
                before = after
        finally:
            for worker in [scraper, *workers]:
                worker.close()


class _OTLPReceiver:
    """A real OTLP/HTTP metrics endpoint: keeps the latest cumulative ``llm.requests`` total and request duration
    count per instance id."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        self.requests: dict[str, float] = {}
        self.durations: dict[str, int] = {}
        #: (instance, total before, total pushed after it) for each pushed total lower than the one before it.
        self.went_down: list[tuple[str, float, float]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                export = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in export.resource_metrics:
                    attributes = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
                    instance = attributes["service.instance.id"]
                    for scope_metrics in resource_metrics.scope_metrics:
                        for metric in scope_metrics.metrics:
                            if metric.name == "llm.requests":
                                points = metric.sum.data_points
                                pushed = sum(p.as_int or p.as_double for p in points)
                                before = receiver.requests.get(instance, 0.0)
                                if pushed < before:
                                    receiver.went_down.append((instance, before, pushed))
                                receiver.requests[instance] = pushed
                            elif metric.name == "gen_ai.server.request.duration":
                                durations = metric.histogram.data_points
                                receiver.durations[instance] = sum(p.count for p in durations)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("shared", [True, False], ids=["shared-state", "shared-state-off"])
def test_workers_otlp_push_has_one_instance_per_worker(tmp_path: Path, shared: bool) -> None:
    """With OTLP on as well, each worker pushes its own cumulative numbers under its own service.instance.id; so too
    with the shared state turned off (``LLM_TELEMETRY_MULTIPROC_DIR=off``), where the workers pushed under the one
    configured id: the receiver saw one worker's count at a time, a series going up and down with each export."""
    receiver = _OTLPReceiver()
    extra = {
        "LLM_TELEMETRY_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/metrics",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        # Even an instance id set for the whole service comes out distinct per worker.
        "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=pod-a",
    }
    if not shared:
        extra["LLM_TELEMETRY_MULTIPROC_DIR"] = "off"
    try:
        with running(new_server(tmp_path, **extra)) as server:
            workers = process_children(server.pid)
            sent, pids = Traffic(), set()
            for _ in range(5):  # until both workers have answered (each request is a new connection)
                more, answered = drive(server.base, streams=8, plains=12, rate_limited=2, embeddings=2)
                sent, pids = sent + more, pids | answered
                if len(pids) == 2:
                    break
            assert pids == workers
            total = sent.streams + sent.plains + sent.rate_limited + sent.embeddings
            if shared:  # (with it off, the port shows one worker's numbers)
                settle(server, sent)
                assert_totals(server.scrape(), sent)
            wait_for("every request to be pushed", lambda: sum(receiver.requests.values()) == total)
            wait_for("every duration to be pushed", lambda: sum(receiver.durations.values()) == total)
            instances = {instance for instance, count in receiver.requests.items() if count}
            assert all(i.startswith("pod-a-") for i in instances), instances
            assert {int(i.rsplit("-", 1)[1]) for i in instances} == pids
            assert receiver.went_down == [], "a worker's pushed total went down"
    finally:
        receiver.close()


# --- hostile traffic across workers -----------------------------------------------------------------------------


def _chat_models(base: str, models: list[str], hold: float = 0) -> set[int]:
    """One plain chat call per model (new connection each); the pids of the workers that answered. ``hold``: each
    call first blocks its worker that long (tests/apps/workers_app.py)."""
    client = _client(base)
    pids = set()
    headers = {"x-hold-worker": str(hold)} if hold else None
    for model in models:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, extra_headers=headers)
        pids.add(int(raw.headers["x-worker-pid"]))
    client.close()
    return pids


def _chat_on_both_workers(base: str, models: Iterator[str]) -> tuple[set[int], int]:
    """Chat calls, two at a time, until both workers of a two-worker server have answered one; returns their pids
    and the number of calls. Sequential calls may all go to one worker (the kernel hands a new connection to
    whichever worker accepts first; on a loaded machine, 40 in a row did): the first call of each pair holds its
    worker, so the second goes to the other."""
    pids: set[int] = set()
    calls = 0
    with ThreadPoolExecutor(1) as pool:
        for _ in range(10):
            held = pool.submit(_chat_models, base, [next(models)], 1.0)
            time.sleep(0.2)  # the held call reaches its worker first
            pids |= _chat_models(base, [next(models)])
            pids |= held.result()
            calls += 2
            if len(pids) == 2:
                break
    assert len(pids) == 2, f"all traffic went to one worker ({pids})"
    return pids, calls


@pytest.mark.slow
@linux_only
def test_workers_label_caps_hold_across_worker_kill_and_restart(tmp_path: Path) -> None:
    """The distinct-value bound is per deployment of workers: neither another worker nor a replacement worker
    admits values past it, and nothing counted is lost on the way."""
    server = new_server(tmp_path, LLM_TELEMETRY_MAX_LABEL_VALUES="3")
    with running(server):
        first_workers = process_children(server.pid)
        admitted = ["m-a", "m-b", "m-c"]
        _chat_models(server.base, admitted)
        sent = 3
        # Past the cap, on every worker.
        _, calls = _chat_on_both_workers(server.base, (f"late-{i}" for i in itertools.count()))
        sent += calls

        def totals() -> bool:
            metrics = server.scrape()
            assert metrics.value("llm_requests_total") == sent
            assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {*admitted, "other"}
            return True

        wait_for("every request to be counted", totals)

        victim = next(iter(first_workers))
        os.kill(victim, signal.SIGKILL)
        wait_for(f"worker {victim} to die", lambda: not is_running(victim))
        replacement = wait_for(
            "a replacement worker",
            lambda: (process_children(server.pid) - first_workers) if len(process_children(server.pid)) == 2 else 0,
        )
        served, calls = _chat_on_both_workers(server.base, (f"after-restart-{i}" for i in itertools.count()))
        sent += calls
        assert served & replacement, "the replacement worker answered nothing"
        wait_for("the totals after the restart", totals)
        metrics = server.scrape()
        assert metrics.value("llm_telemetry_internal_errors_total") == 0


def _app_path_scrape_rounds(
    tmp_path: Path, rounds: int, meanwhile: Callable[[], contextlib.AbstractContextManager[object]], **env: str
) -> tuple[list[tuple[float, int, int]], set[int]]:
    """Scrapes of the app's own path (``LLM_TELEMETRY_METRICS_APP_PATH``) under ``uvicorn --workers 2``, each over a
    kept-alive connection to a worker chosen, in ``rounds`` of: a pause longer than a rendering is shared (so the next
    scrape renders anew), the second worker twice (scrapes close together: the second rendering is shared with the
    other worker too), then within ``meanwhile()`` a request (the totals move on) and the first worker, then the second
    again, well within the time a rendering is shared (exposition.SHARE times what it took). Of each round, the last
    three scrapes are returned:
    the (llm_requests_total, the worker that answered, the worker whose rendering it was) of each, in order, and the
    two workers."""
    # No delay before the reply: the request between the second worker's two scrapes takes ~2 ms, not ~25.
    extra = {"LLM_TELEMETRY_METRICS_APP_PATH": "/metrics", "WORKERS_APP_FIRST_TOKEN_DELAY": "0", **env}
    server = new_server(tmp_path, log="s.log", **extra)
    port = server.port
    with running(server), contextlib.ExitStack() as stack:
        # Series enough that a rendering takes a while (~50 ms), and is shared for a while.
        _chat_models(server.base, [f"model-{i}" for i in range(100)])
        client = stack.enter_context(_client(server.base))

        def scrape(connection: http.client.HTTPConnection, path: str = "/metrics") -> tuple[str, int]:
            """The scrape's text and the worker that answered it (the app's ``x-worker-pid`` header)."""
            connection.request("GET", path)  # no query, as Prometheus asks: a rendering may be shared
            with connection.getresponse() as response:
                return response.read().decode(), int(response.headers["x-worker-pid"])

        def read(answer: tuple[str, int]) -> tuple[float, int, int]:
            text, answering = answer
            metrics = Metrics(text)
            return metrics.value("llm_requests_total"), answering, server.serving_pid(metrics)

        workers: dict[int, http.client.HTTPConnection] = {}
        for _ in range(100):
            connection = stack.enter_context(contextlib.closing(http.client.HTTPConnection("127.0.0.1", port)))
            workers.setdefault(scrape(connection, "/metrics?fresh")[1], connection)
            if len(workers) == 2:
                break
        first, second = workers.values()
        scrape(first, "/metrics?fresh")  # (a query: rendered for it; the first one is slower)
        started = time.monotonic()
        scrape(first, "/metrics?fresh")  # what a rendering takes, to pace the rounds
        # Under uvicorn's keep-alive timeout (5 s), or the server closes the connections between the rounds.
        pause = min(2 * (SHARE + 1) * (time.monotonic() - started), 2.0)
        answers = []  # (read after: parsing takes longer than a rendering is shared)
        for _ in range(rounds):
            time.sleep(pause)
            scrape(second)
            answers.append(scrape(second))  # (close after the one before: shared with the other worker too)
            with meanwhile():
                client.chat.completions.create(model="model-0", messages=MESSAGES)
                answers.append(scrape(first))
            answers.append(scrape(second))
        return [read(answer) for answer in answers], set(workers)


def _went_down(shown: list[tuple[float, int, int]]) -> list[tuple[tuple[float, int, int], tuple[float, int, int]]]:
    """The scrapes of :func:`_app_path_scrape_rounds` whose ``llm_requests_total`` is lower than the one before's."""
    return [(before, after) for before, after in itertools.pairwise(shown) if after[0] < before[0]]


@pytest.mark.slow
@linux_only
def test_workers_scrapes_of_the_app_path_never_go_down_whichever_worker_answers(tmp_path: Path) -> None:
    """Any worker answers a scrape of the app's own path (``LLM_TELEMETRY_METRICS_APP_PATH``), and each keeps its
    newest rendering to share with the scrapes that follow it: one worker's kept rendering, older than the one another
    worker has just answered, must not be answered again (its counters lower, which Prometheus reads as a reset)."""
    shown, workers = _app_path_scrape_rounds(tmp_path, 10, contextlib.nullcontext)
    assert {pid for _, pid, _ in shown} == workers, shown
    went_down = _went_down(shown)
    assert not went_down, f"llm_requests_total went down between scrapes (total, worker, renderer): {went_down[:5]}"


@pytest.mark.slow
@linux_only
def test_workers_app_path_scrapes_share_one_rendering_across_workers(tmp_path: Path) -> None:
    """A scrape of the app's own path that one worker answers right after another worker rendered one gets that
    rendering (its ``target_info`` names the worker that rendered it) rather than merging and rendering again: each
    worker sharing only its own, a storm of scrapes, which reaches every worker, made nearly every scrape a merge and
    a rendering (~200 ms of CPU for a 3 MB exposition, against ~6 ms on the metrics port; benchmarks/scrape_storm.py)
    and cut the scrapes answered six-fold."""
    shown, workers = _app_path_scrape_rounds(tmp_path, 10, contextlib.nullcontext)
    assert {pid for _, pid, _ in shown} == workers, shown
    # The first worker's scrape in each round comes right after the second worker rendered anew (after the pause).
    firsts = shown[1::3]
    shared = [(answering, renderer) for _, answering, renderer in firsts if renderer != answering]
    # (Not every round: on a busy machine the first worker's scrape may come after the rendering is no longer fresh.)
    assert shared, f"no worker answered another's rendering (total, worker, renderer): {firsts}"


@pytest.mark.slow
@linux_only
def test_workers_app_path_scrapes_never_go_down_while_the_state_directory_is_full(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    """A merge that cannot record itself in the ``merge`` file (the state directory's file system full) must leave no
    other worker taking its kept rendering for the newest: that worker's older numbers, answered after the newer ones
    of the worker whose merge went unrecorded, would make a counter go down, which Prometheus reads as a reset."""
    fill = small_tmpfs / "fill"

    @contextlib.contextmanager
    def full() -> Iterator[None]:
        """The file system full: no room for a file's first page (the series in place need none)."""
        fill.write_bytes(b"\0" * shutil.disk_usage(small_tmpfs).free)
        try:
            yield
        finally:
            fill.unlink()

    shown, workers = _app_path_scrape_rounds(tmp_path, 10, full, LLM_TELEMETRY_MULTIPROC_DIR=str(small_tmpfs / "state"))
    assert {pid for _, pid, _ in shown} == workers, shown
    went_down = _went_down(shown)
    assert not went_down, f"llm_requests_total went down between scrapes (total, worker, renderer): {went_down[:5]}"


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("breakage", ["symlink", "file"])
def test_workers_unusable_state_directory_leaves_the_app_serving(tmp_path: Path, breakage: str) -> None:
    """A shared directory that cannot be used (a planted symlink in the temp dir, or a file where the directory
    should be) costs the merged numbers, never a request: every worker serves, the failure is counted."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if breakage == "symlink":
        server = new_server(tmp_path)
        (tmp_path / "tmp" / f"llm-telemetry-{os.getuid()}").symlink_to(elsewhere)
    else:
        (tmp_path / "not-a-dir").write_text("")
        server = new_server(tmp_path, LLM_TELEMETRY_MULTIPROC_DIR=str(tmp_path / "not-a-dir"))
    with running(server):
        _chat_on_both_workers(server.base, itertools.repeat("demo-priced"))
        with urllib.request.urlopen(f"{server.base}/healthz", timeout=10) as health:
            assert health.status == 200
        # The serving worker's own share (a call is recorded just after its response went out).
        metrics = wait_for("a recorded request", lambda: (m := server.scrape()).value("llm_requests_total") and m)
        assert metrics.value("llm_telemetry_internal_errors_total", llm_telemetry_component="multiproc_setup") == 1
    assert list(elsewhere.iterdir()) == []  # nothing was written through the planted link
    log = server.log.read_text(errors="replace")
    assert "Exception in ASGI application" not in log
    # Each worker's WARNING names the setting to change: the variable that gave the directory, or, for the default
    # location, the variable that sets another.
    warnings = [line for line in log.splitlines() if "multi-worker state directory" in line]
    assert len(warnings) == 2, warnings
    named = "LLM_TELEMETRY_MULTIPROC_DIR (or multiproc_dir=)" if breakage == "file" else "the default location"
    assert all(named in line and "LLM_TELEMETRY_MULTIPROC_DIR" in line for line in warnings), warnings


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, as a small ``emptyDir`` with ``medium: Memory``; skips where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_workers_values_file_on_a_full_file_system_raises_instead_of_killing(small_tmpfs: Path) -> None:
    """A worker's values file growing on a full file system: an OSError the recording survives (counted as an
    internal error), never the SIGBUS of writing a page that has no block behind it."""
    code = textwrap.dedent(
        f"""
        import subprocess
        from llm_telemetry.multiproc import MmapedDict
        values = MmapedDict({str(small_tmpfs / "w.db")!r})
        values.write_value("in-place", 1.0, 0.0)
        subprocess.run(["dd", "if=/dev/zero", "of={small_tmpfs / "fill"}", "bs=64k"], capture_output=True)
        try:
            for i in range(100_000):
                values.write_value(f"key-{{i}}-" + "x" * 150, 1.0, 0.0)
        except OSError as error:
            values.write_value("in-place", 2.0, 0.0)  # a series in place is still written
            print("refused", error.errno, values.read_value("in-place")[0])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "middleware")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS): {done.stderr}"
    assert done.stdout.split() == ["refused", "28", "2.0"]  # ENOSPC


def test_workers_worker_that_cannot_make_its_files_leaves_nothing_behind(small_tmpfs: Path) -> None:
    """A worker starting while the state directory's file system is full (a small in-memory emptyDir, other files
    on it) cannot make its values file: it says so and keeps its own numbers, and leaves nothing in the directory.
    It left an empty values file, and its liveness lock held (by the error kept for its warning) for as long as it
    lived: every merge read that file, and every scrape of the other workers was answered 500 until the server was
    restarted; workers started later failed their setup on it too."""
    directory = small_tmpfs / "state"
    serving = multiproc.SharedState(str(directory), multiproc.Supervisor("parent", os.getpid()))
    try:
        serving.add(multiproc._key("llm.requests", "c", (("model", "a"),)), 2.0)
        assert serving.merged()
        free = shutil.disk_usage(small_tmpfs).free
        (small_tmpfs / "fill").write_bytes(b"\0" * (free - 16 * 1024))  # no room for another values file
        code = textwrap.dedent(
            f"""
            import sys
            from llm_telemetry import multiproc
            from llm_telemetry.config import Settings
            mode = multiproc.activate(Settings(multiproc_dir={str(directory)!r}))
            print(mode.state is None, getattr(mode.error, "errno", None), flush=True)
            sys.stdin.read()  # alive, the error kept, until the test is done
            """
        )
        env = {**os.environ, "PYTHONPATH": str(REPO / "middleware")}
        with subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        ) as worker:
            try:
                assert worker.stdout is not None
                assert worker.stdout.readline().split() == ["True", "28"]  # no state: ENOSPC
                assert sorted(p.name for p in directory.iterdir() if p.name.startswith("w")) == [
                    serving._stem + ".alive",
                    serving._stem + ".db",
                ]
                merged = serving.merged()  # (a scrape)
            finally:
                worker.communicate("", timeout=30)
        assert merged[multiproc._key("llm.requests", "c", (("model", "a"),))] == 2.0
        (small_tmpfs / "fill").unlink()
        joining = multiproc.SharedState(str(directory), multiproc.Supervisor("parent", os.getpid()))
        joining.add(multiproc._key("llm.requests", "c", (("model", "a"),)), 1.0)
        assert serving.merged()[multiproc._key("llm.requests", "c", (("model", "a"),))] == 3.0
        joining.close()
    finally:
        serving.close()


def test_workers_empty_values_file_of_a_dead_worker_is_read_as_none(tmp_path: Path) -> None:
    """A worker killed between making its values file and reserving its blocks leaves it empty: merges (scrapes),
    and the setup of workers started later, read it as no values and remove it, rather than fail on it for good."""
    directory = tmp_path / "state"
    serving = multiproc.SharedState(str(directory), multiproc.Supervisor("parent", os.getpid()))
    try:
        serving.add(multiproc._key("llm.requests", "c", (("model", "a"),)), 2.0)
        (directory / "w1-deadbeef.db").write_bytes(b"")
        (directory / "w1-deadbeef.alive").write_bytes(b"")
        assert serving.merged()[multiproc._key("llm.requests", "c", (("model", "a"),))] == 2.0
        assert not (directory / "w1-deadbeef.db").exists()
        (directory / "w2-deadbeef.db").write_bytes(b"\x01")
        multiproc.SharedState(str(directory), multiproc.Supervisor("parent", os.getpid())).close()
        assert not (directory / "w2-deadbeef.db").exists()
    finally:
        serving.close()


def test_workers_archive_that_cannot_be_written_is_not_taken_for_removed(
    small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file system full when a merge saves the archive: the directory keeps the older version, this worker's
    copy stays the newest (it is written at the next merge that can). Its once-a-second look must not take that
    older version for removed files: no WARNING saying so, no put-back (which would also make every scrape wait)."""
    monkeypatch.setattr(multiproc.SharedState, "_keep", lambda self: None)  # the test looks, as the keeper would
    state = multiproc.SharedState(str(small_tmpfs / "state"), multiproc.Supervisor("parent", os.getpid()))
    try:
        state.add(multiproc._key("llm.requests", "c", (("model", "a"),)), 1.0)
        state.merged()  # saved: version 1
        subprocess.run(["dd", "if=/dev/zero", f"of={small_tmpfs / 'fill'}", "bs=64k"], capture_output=True)
        with caplog.at_level("WARNING", logger="llm_telemetry"):
            state.add(multiproc._key("llm.requests", "c", (("model", "b"),)), 1.0)
            state.merged()  # version 2 cannot be written
            assert "cannot be written" in caplog.text
            assert [state.restore() for _ in range(3)] == [False, False, False]
            assert "were removed" not in caplog.text
    finally:
        state.close()


def _two_workers_states(directory: Path) -> tuple[multiproc.SharedState, multiproc.SharedState]:
    """Two workers' states in one directory, as two workers of a server have (each its own files and locks)."""
    supervisor = multiproc.Supervisor("parent", os.getpid())
    return multiproc.SharedState(str(directory), supervisor), multiproc.SharedState(str(directory), supervisor)


#: A shared rendering's content type and headers, as prometheus_client's exposition app gives them.
_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_HEADERS = [("Content-Type", _TEXT)]


_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_OPENMETRICS_HEADERS = [("Content-Type", _OPENMETRICS)]


def _crowd(state: multiproc.SharedState, content_type: str = _TEXT) -> None:
    """A scrape's rendering, still fresh: the next one comes close after it, and its rendering is shared whole."""
    state.merged()
    state.publish(content_type, time.monotonic() + 600, "200 OK", [("Content-Type", content_type)], b"")


def test_workers_renderings_of_the_text_format_and_of_openmetrics_are_shared_side_by_side(tmp_path: Path) -> None:
    """Scrapers of the text format and of OpenMetrics on the app's own path at once (Prometheus asks for OpenMetrics,
    other agents for the text format): each format's newest rendering is shared with that format's scrapes that
    follow, in any worker, whatever the other format's scrapes publish meanwhile. (One rendering for both had each
    scrape of the one format replace the other's, and a storm of both shared none of them: 100 ms of CPU a scrape
    under two workers, against 13-15 ms of one format alone; benchmarks/scrape_storm.py --formats.) A rendering not
    shared (a scrape with a query) takes both away: either, answered after its newer numbers, would go back."""
    first, second = _two_workers_states(tmp_path / "state")
    until = time.monotonic() + 600
    try:
        _crowd(first)
        _crowd(second, _OPENMETRICS)
        first.merged()
        first.publish(_TEXT, until, "200 OK", _HEADERS, b"text of merge 3")
        second.merged()
        second.publish(_OPENMETRICS, until, "200 OK", _OPENMETRICS_HEADERS, b"openmetrics of merge 4")
        for state in (first, second):
            assert state.shared(_TEXT) == ("200 OK", _HEADERS, b"text of merge 3")
            assert state.shared(_OPENMETRICS) == ("200 OK", _OPENMETRICS_HEADERS, b"openmetrics of merge 4")
        first.merged()
        first.publish(_TEXT, until, "200 OK", _HEADERS, b"text of merge 5")
        assert second.shared(_TEXT) == ("200 OK", _HEADERS, b"text of merge 5")
        assert second.shared(_OPENMETRICS) == ("200 OK", _OPENMETRICS_HEADERS, b"openmetrics of merge 4")
        # Another version of OpenMetrics than the one rendered is rendered for itself, not answered that one.
        assert second.shared("application/openmetrics-text; version=0.0.1; charset=utf-8") is None
        second.merged()
        second.supersede()
        assert first.shared(_TEXT) is None
        assert first.shared(_OPENMETRICS) is None
    finally:
        first.close()
        second.close()


def test_workers_rendering_is_written_whole_only_for_scrapes_close_together(tmp_path: Path) -> None:
    """A Prometheus scraping the app's own path every few seconds gets a fresh rendering each time, which no other
    scrape would share: no copy of the exposition is written to the state directory per scrape (a disk, or the memory
    of an ``emptyDir``), only the merge's order and times. Scrapes close together share the rendering whole."""
    first, second = _two_workers_states(tmp_path / "state")
    rendering = tmp_path / "state" / "rendering"
    body = b"llm_requests_total 1.0\n" * 10_000
    try:
        first.merged()
        first.publish(_TEXT, time.monotonic() + 0.01, "200 OK", _HEADERS, body)  # shared for 10 ms
        time.sleep(0.05)  # the next scrape 40 ms after that: further apart than the time it was shared
        second.merged()
        second.publish(_TEXT, time.monotonic() + 600, "200 OK", _HEADERS, body)
        assert rendering.stat().st_size < 1000
        assert first.shared(_TEXT) is None
        first.merged()  # within the 600 s the one before is shared
        first.publish(_TEXT, time.monotonic() + 600, "200 OK", _HEADERS, body)
        assert rendering.stat().st_size > len(body)
        assert second.shared(_TEXT) == ("200 OK", _HEADERS, body)
    finally:
        first.close()
        second.close()


def test_workers_rendering_of_an_earlier_merge_never_replaces_a_later_ones(tmp_path: Path) -> None:
    """Two workers merge, one after the other, for scrapes of the app's own path, and the one that merged first
    renders more slowly: the later merge's rendering, published (and answered) first, must stay the one shared.
    Replaced by the earlier merge's, a scrape that follows would show a counter lower than the one answered before."""
    first, second = _two_workers_states(tmp_path / "state")
    key = multiproc._key("llm.requests", "c", (("model", "a"),))
    until = time.monotonic() + 600
    try:
        _crowd(first)
        first.add(key, 1.0)
        first.merged()
        first.add(key, 1.0)
        second.merged()  # sees 2
        second.publish(_TEXT, until, "200 OK", _HEADERS, b"llm_requests_total 2.0\n")
        first.publish(_TEXT, until, "200 OK", _HEADERS, b"llm_requests_total 1.0\n")
        for state in (first, second):
            assert state.shared(_TEXT) == ("200 OK", _HEADERS, b"llm_requests_total 2.0\n")
        first.merged()  # a later merge's rendering does replace it
        first.publish(_TEXT, until, "200 OK", _HEADERS, b"llm_requests_total 3.0\n")
        assert second.shared(_TEXT) == ("200 OK", _HEADERS, b"llm_requests_total 3.0\n")
        assert second.shared("application/openmetrics-text; version=1.0.0; charset=utf-8") is None
    finally:
        first.close()
        second.close()


def test_workers_rendering_not_shared_takes_an_earlier_ones_place_away(small_tmpfs: Path) -> None:
    """A merge whose rendering is not shared (the file system full; a scrape with a query, rendered for it alone)
    must leave no earlier merge's rendering shared: answered after this merge's newer numbers, it would show a
    counter going down, which Prometheus reads as a reset."""
    first, second = _two_workers_states(small_tmpfs / "state")
    until = time.monotonic() + 600
    try:
        _crowd(first)
        first.merged()
        first.publish(_TEXT, until, "200 OK", _HEADERS, b"one")
        second.merged()
        second.supersede()  # a query's rendering
        assert first.shared(_TEXT) is None
        _crowd(first)
        first.merged()
        first.publish(_TEXT, until, "200 OK", _HEADERS, b"two")
        assert second.shared(_TEXT) == ("200 OK", _HEADERS, b"two")
        second.merged()
        (small_tmpfs / "fill").write_bytes(b"\0" * shutil.disk_usage(small_tmpfs).free)
        second.publish(_TEXT, until, "200 OK", _HEADERS, b"three" * 10_000)  # no room to write it
        assert first.shared(_TEXT) is None
        assert not [path.name for path in (small_tmpfs / "state").iterdir() if path.name.endswith(".tmp")]
    finally:
        first.close()
        second.close()


@pytest.mark.skipif(shutil.which("strace") is None or sys.platform != "linux", reason="strace kills at the rename")
def test_workers_rendering_of_a_worker_killed_as_it_published_is_not_left_behind(tmp_path: Path) -> None:
    """A worker killed (SIGKILL: the OOM killer, a liveness probe) between writing the rendering it publishes and
    putting it in place leaves its temporary file, the size of an exposition, in the state directory: nothing ever
    wrote it again, so each such kill left one more for as long as the server ran. The merge that folds the dead
    worker removes it, as it removes the worker's own files."""
    directory = tmp_path / "state"
    supervisor = multiproc.Supervisor("parent", os.getpid())
    survivor = multiproc.SharedState(str(directory), supervisor)
    script = (
        "import sys\n"
        "from llm_telemetry import multiproc\n"
        f"state = multiproc.SharedState({str(directory)!r}, multiproc.Supervisor('parent', {os.getpid()}))\n"
        "state.merged()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        f"state.publish({_TEXT!r}, 1e12, '200 OK', {_HEADERS!r}, b'llm_requests_total 1.0\\n' * 10_000)\n"
    )
    path = os.pathsep.join(filter(None, [str(REPO / "middleware"), os.environ.get("PYTHONPATH")]))
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    tracer: subprocess.Popen[str] | None = None
    try:
        assert worker.stdin is not None and worker.stdout is not None
        assert worker.stdout.readline() == "ready\n"
        # SIGKILL at the worker's next rename: that of its rendering, written, onto the shared one.
        tracer = subprocess.Popen(
            ["strace", "-f", "-p", str(worker.pid), "-e", "trace=rename,renameat,renameat2",
             "-e", "inject=rename,renameat,renameat2:signal=SIGKILL", "-o", os.devnull],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert tracer.stderr is not None
        if "attached" not in tracer.stderr.readline():
            pytest.skip("strace cannot trace a process here (ptrace not permitted)")
        worker.stdin.write("publish\n")
        worker.stdin.flush()
        assert worker.wait(timeout=30) == -signal.SIGKILL
        left = [name for name in os.listdir(directory) if name.startswith("rendering.")]
        assert left, "the worker was not killed between writing its rendering and putting it in place"
        survivor.merged()  # folds the dead worker
        assert not [name for name in os.listdir(directory) if name.endswith(".tmp")], os.listdir(directory)
    finally:
        survivor.close()
        worker.kill()
        worker.wait(timeout=10)
        if tracer is not None:
            tracer.kill()
            tracer.wait(timeout=10)


@pytest.mark.slow
def test_workers_state_directory_filling_up_kills_no_worker(tmp_path: Path, small_tmpfs: Path) -> None:
    """The state directory's file system full (a small in-memory emptyDir): a request that brings a new series
    cannot grow its worker's file, and the worker goes on serving. Its file's pages are reserved before they are
    mapped; a write to an unreserved page of a full file system was a SIGBUS that killed the worker, losing what it
    held. The series already in place keep counting exactly."""
    server = new_server(tmp_path, LLM_TELEMETRY_MULTIPROC_DIR=str(small_tmpfs / "state"))
    with running(server):
        # Answered, so counted (an existing series needs no new page of the files).
        pids, counted = _chat_on_both_workers(server.base, itertools.repeat("demo-priced"))
        subprocess.run(["dd", "if=/dev/zero", f"of={small_tmpfs / 'fill'}", "bs=64k"], capture_output=True)
        answered: set[int] = set()
        for i in range(300):  # each a new series, past what the files' reserved pages hold
            answered |= _chat_models(server.base, [f"new-model-{i:03d}-" + "x" * 100])
        assert answered <= pids, f"a worker died and was replaced: {answered - pids}"
        for _ in range(20):
            answered |= _chat_models(server.base, ["demo-priced"])
        assert answered <= pids
        expected = counted + 20
        metrics = wait_for(
            "the series in place counted",
            lambda: (
                (m := server.scrape()).value("llm_requests_total", gen_ai_request_model="demo-priced") == expected and m
            ),
        )
        assert metrics.value("llm_requests_total", gen_ai_request_model="demo-priced") == expected
    assert "died" not in server.log.read_text(errors="replace")


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("removal", ["tmp-cleaner", "rm-rf", "archive-after-a-death"])
def test_workers_state_files_removed_under_a_running_server_are_put_back(tmp_path: Path, removal: str) -> None:
    """An age-based /tmp cleaner (systemd-tmpfiles, tmpreaper) removes the files that never change first: the run
    record, the liveness files and the port claim; then a worker dies and its replacement joins. Or the
    whole directory goes (``rm -rf``). Or the archive goes just after a replacement folded a dead worker into it.
    Nothing counted before or after is lost or counted twice, and every scrape answers: the workers put their files
    back, and a joining worker does not take live workers' state for an earlier run's."""
    state = tmp_path / "state"
    server = new_server(tmp_path, LLM_TELEMETRY_MULTIPROC_DIR=str(state))
    with running(server):
        first_workers = process_children(server.pid)
        sent = Traffic()
        pids: set[int] = set()
        for _ in range(20):
            more, answered = drive(server.base, streams=2, plains=6, rate_limited=1, embeddings=1)
            sent, pids = sent + more, pids | answered
            if len(pids) == 2:
                break
        assert len(pids) == 2, "all traffic went to one worker"
        settle(server, sent)

        if removal == "rm-rf":
            shutil.rmtree(state)
        elif removal == "archive-after-a-death":
            # The replacement folds the dead worker into the archive as it joins; then the archive goes, before the
            # worker serving the port (whose copy lacks the dead worker) has read it again.
            (victim,) = first_workers - {server.serving_pid(server.scrape())}
            os.kill(victim, signal.SIGKILL)
            wait_for("a replacement worker", lambda: len(process_children(server.pid) - first_workers) == 1)
            wait_for("the dead worker folded", lambda: not list(state.glob(f"w{victim}-*")))
            (state / "archive.json").unlink()
            # The workers put their copies back within a second, the newest winning. (A scrape within that second
            # can keep the older copy: docs/workers.md says what that loses.)
            time.sleep(3.5)
        else:
            for path in state.iterdir():
                if path.name in ("run", "port") or path.suffix == ".alive":
                    path.unlink()
            victim = min(first_workers)
            os.kill(victim, signal.SIGKILL)
            wait_for("a replacement worker", lambda: len(process_children(server.pid) - first_workers) == 1)
        for _ in range(3):
            more, _ = drive(server.base, streams=2, plains=6, rate_limited=1, embeddings=1)
            sent += more
        settle(server, sent)
        for _ in range(3):
            assert_totals(server.scrape(), sent)
    assert "Exception in ASGI application" not in server.log.read_text(errors="replace")


@pytest.mark.slow
@linux_only
def test_workers_scrapes_never_go_down_while_the_removed_state_directory_is_put_back(tmp_path: Path) -> None:
    """The whole state directory removed under a running server (``rm -rf``): each worker puts its own files back
    within a second, and a merge waits for the others when it finds files missing. A worker whose own files were
    already back (put back by its thread that looks each second) found nothing missing of a worker that had not
    looked yet, as nothing of that one was left: its merges showed that worker's counts gone (``llm_requests_total``
    at 0 on every series the other worker had counted), which Prometheus reads as a reset, and counts again as they
    come back."""
    state = tmp_path / "state"
    extra = {"LLM_TELEMETRY_METRICS_APP_PATH": "/metrics", "LLM_TELEMETRY_MULTIPROC_DIR": str(state)}
    server = new_server(tmp_path, workers=3, log="s.log", **extra)
    with running(server):
        # Over one kept-alive connection: every request counted by one worker, none by the others.
        with openai.OpenAI(base_url=f"{server.base}/v1", api_key="test", max_retries=0) as client:
            for i in range(50):
                client.chat.completions.create(model=f"model-{i}", messages=MESSAGES)
        sent = 50.0
        # (A request is counted as its response ends: the last one may come just after its client has it.)
        wait_for("the requests counted", lambda: server.scrape().value("llm_requests_total") == sent)
        shown: list[tuple[float, int]] = []
        stop = threading.Event()

        def scrapes() -> None:
            """Scrapes back to back, each a new connection (any worker), as Prometheus asks."""
            while not stop.is_set():
                metrics, answering = server.scrape_app()
                shown.append((metrics.value("llm_requests_total"), answering))

        with ThreadPoolExecutor(2) as pool:  # (two scrapers: one waiting in a merge does not hold up the other)
            scraping = [pool.submit(scrapes) for _ in range(2)]
            try:
                for round in range(3):
                    time.sleep(2 * multiproc.BIND_RETRY_SECONDS)
                    # rm -rf, at once (the workers put files back as rmtree goes, which then finds the directory
                    # not empty)
                    os.rename(state, tmp_path / f"removed-{round}")
                    shutil.rmtree(tmp_path / f"removed-{round}")
                time.sleep(4 * multiproc.BIND_RETRY_SECONDS)
            finally:
                stop.set()
            for future in scraping:
                future.result()
        assert len({answering for _, answering in shown}) == 3, "a worker answered no scrape"
        short = [total for total, _ in shown if total < sent]
        assert not short, f"{len(short)} of {len(shown)} scrapes showed llm_requests_total below {sent}: {short[:5]}"


@pytest.mark.slow
@linux_only
def test_workers_rendering_that_waited_for_removed_files_is_not_shared_for_longer(tmp_path: Path) -> None:
    """After ``rm -rf`` of the state directory, a scrape of the metrics port waits two seconds for the workers to put
    their files back. That wait is no part of what its rendering took to make: counted in, the rendering answered the
    plain scrapes that followed for eight seconds more, without the requests counted meanwhile."""
    state = tmp_path / "state"
    server = new_server(tmp_path, LLM_TELEMETRY_MULTIPROC_DIR=str(state))
    with running(server):
        sent, _ = drive(server.base, streams=1, plains=3, rate_limited=0, embeddings=0)
        settle(server, sent)
        time.sleep(multiproc.BIND_RETRY_SECONDS)  # (the rendering settle's scrape got, no longer fresh)
        shutil.rmtree(state)
        assert_totals(server.scrape(), sent)  # (this scrape waits for the files)
        more, _ = drive(server.base, streams=1, plains=3, rate_limited=0, embeddings=0)
        sent += more

        def recorded() -> bool:
            assert_totals(server.scrape(fresh=True), sent)  # (a query: merged anew, never a kept rendering)
            return True

        wait_for("the last requests to be recorded", recorded)
        assert_totals(server.scrape(), sent)


def test_workers_label_values_are_counted_per_deployment(tmp_path: Path) -> None:
    """Workers sharing a directory admit ``max_values`` values together; a replacement worker (a new limiter on
    the same directory) gets the same values, not a fresh allowance."""
    from llm_telemetry.labels import LabelLimiter

    supervisor = multiproc.Supervisor("parent", os.getpid())
    states = [multiproc.SharedState(str(tmp_path / "state"), supervisor) for _ in range(3)]
    first, second, replacement = (LabelLimiter(3) for _ in states)
    for limiter, state in zip((first, second, replacement), states, strict=True):
        limiter.share(state)
    try:
        assert [first("model", m) for m in ("a", "b")] == ["a", "b"]
        assert [second("model", m) for m in ("c", "d", "a")] == ["c", "other", "a"]
        assert [first("model", m) for m in ("c", "e")] == ["c", "other"]
        states[0].close()  # the first worker dies; its replacement joins
        assert [replacement("model", m) for m in ("f", "a", "b", "c")] == ["other", "a", "b", "c"]
        assert second("tool", "x") == "x"  # each label has its own allowance
    finally:
        for state in states[1:]:
            state.close()


def test_workers_lock_holds_while_a_temp_cleaner_removes_the_files_that_never_change(tmp_path: Path) -> None:
    """A worker inside the directory's lock (a merge folding dead workers into the archive) keeps the others out
    even when an age-based temp cleaner removes every file in the directory nobody writes to meanwhile."""
    supervisor = multiproc.Supervisor("parent", os.getpid())
    directory = tmp_path / "state"
    states = [multiproc.SharedState(str(directory), supervisor) for _ in range(2)]
    entered = threading.Event()

    def merge_of_the_other_worker() -> None:
        with states[1]._locked():
            entered.set()

    try:
        with states[0]._locked():
            for path in directory.iterdir():
                if path.suffix != ".db":
                    path.unlink()
            other = threading.Thread(target=merge_of_the_other_worker, daemon=True)
            other.start()
            assert not entered.wait(1.5), "another worker got inside the lock while one held it"
        assert entered.wait(10), "the lock was never released to the other worker"
        other.join(10)
    finally:
        for state in states:
            state.close()


def test_workers_archive_saved_while_a_worker_looks_is_not_taken_for_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's once-a-second look for removed files may read ``archive.json.version`` while a merge of the same
    worker (another thread, inside the directory's lock) is saving the archive: its copy is one version ahead of the
    file then. Nothing was removed: no WARNING, nothing put back. Files really removed still are, with the WARNING.
    The interleaving is driven: the save is held just before it writes, until the look has read the file."""
    monkeypatch.setattr(multiproc.SharedState, "_keep", lambda self: None)  # the test looks, in the racing order
    state = multiproc.SharedState(str(tmp_path / "state"), multiproc.Supervisor("parent", os.getpid()))
    saving, looked, go = threading.Event(), threading.Event(), threading.Event()

    def held_open(file: str, *args: Any, **kwargs: Any) -> Any:
        if file.endswith(multiproc._ARCHIVE + ".tmp") and not go.is_set():
            saving.set()
            assert go.wait(10), "the look never read the version file"
        return open(file, *args, **kwargs)

    behind = state._archive_behind

    def look() -> bool:
        try:
            return behind()
        finally:
            looked.set()

    try:
        state.add(multiproc._key("llm.requests", "c", (("model", "a"),)), 1.0)
        state.merged()  # the series takes a place in the archive: saved, version 1
        state.add(multiproc._key("llm.requests", "c", (("model", "b"),)), 1.0)
        monkeypatch.setattr(multiproc, "open", held_open, raising=False)
        monkeypatch.setattr(state, "_archive_behind", look)
        with ThreadPoolExecutor(2) as pool, caplog.at_level("WARNING", logger="llm_telemetry"):
            merge = pool.submit(state.merged)  # places the new series: saves version 2
            assert saving.wait(10), "the merge never saved the archive"
            looked.clear()  # the merge's own look, before its save
            restored = pool.submit(state.restore)
            assert looked.wait(10), "the look never read the version file"
            go.set()
            assert merge.result(10)
            assert restored.result(10) is False, "a save under way was taken for removed files"
        assert not [r for r in caplog.records if "were removed" in r.getMessage()]
        version = (tmp_path / "state" / "archive.json.version").read_text()
        assert version.endswith(" 2")

        for name in ("archive.json", "archive.json.version"):
            (tmp_path / "state" / name).unlink()
        with caplog.at_level("WARNING", logger="llm_telemetry"):
            assert state.restore() is True
        assert [r for r in caplog.records if "were removed" in r.getMessage()]
        assert (tmp_path / "state" / "archive.json.version").read_text() == version
    finally:
        state.close()


def _unshare_works() -> bool:
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class _ContainerServer(Server):
    """A server that is pid 1 of a PID namespace of its own, as in a container (``unshare``)."""

    def command(self) -> list[str]:
        return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM", *super().command()]

    @property
    def pid(self) -> int:
        """The supervisor (the only child of ``unshare``), whose children are the workers."""
        assert self.process is not None
        found = process_children(self.process.pid)
        return next(iter(found)) if len(found) == 1 else -1

    def stop(self) -> None:
        """SIGTERM to the supervisor, as the container runtime sends it to pid 1 (``unshare`` forwards none)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the namespace's processes die with its pid 1
            self.process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --pid --fork --mount-proc (root or user namespaces)")
def test_workers_servers_in_two_containers_sharing_tmp_keep_their_own_numbers(tmp_path: Path) -> None:
    """Two containers of one pod, each running gunicorn as pid 1, with one ``emptyDir`` on ``/tmp``: both
    supervisors are pid 1, so the pid alone would give them one state directory, each start would wipe the other's
    numbers and they would export each other's traffic."""
    first_port, second_port = free_port(), free_port()
    env = _server_env(tmp_path, first_port, {})
    first = _ContainerServer("gunicorn", 2, free_port(), first_port, env, tmp_path / "first.log")
    second = _ContainerServer(
        "gunicorn", 2, free_port(), second_port, {**env, "LLM_TELEMETRY_METRICS_PORT": str(second_port)},
        tmp_path / "second.log",
    )  # fmt: skip
    with running(first):
        one, _ = drive(first.base, streams=2, plains=3, rate_limited=1, embeddings=0)
        settle(first, one)
        with running(second):
            assert_totals(first.scrape(), one)  # not wiped by the second start
            two, _ = drive(second.base, streams=1, plains=1, rate_limited=0, embeddings=1)
            settle(second, two)
            assert_totals(first.scrape(), one)  # nor showing the second's traffic
            more, _ = drive(first.base, streams=1, plains=0, rate_limited=0, embeddings=0)
            settle(first, one + more)
            assert_totals(second.scrape(), two)
        assert len(list((tmp_path / "tmp").glob("llm-telemetry-*/gunicorn-1-*"))) == 2


@pytest.mark.slow
def test_workers_metrics_port_held_by_another_service_is_reported(tmp_path: Path) -> None:
    """Another process (a second service on the host, another exporter) holds the metrics port: the workers
    cannot tell it from a sibling at first, but once no worker of theirs has claimed the port they say so."""
    server = new_server(tmp_path)

    class Exporter(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"# someone else's metrics\n")

        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", server.metrics_port), Exporter)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        with running(server):
            wait_for(
                "the warning",
                lambda: "is held by a process that is not a worker of this server" in server.log.read_text(),
            )
            assert "set LLM_TELEMETRY_METRICS_PORT to a free one" in server.log.read_text()
    finally:
        other.shutdown()
        other.server_close()


@linux_only
def test_workers_only_the_arbiter_a_usr2_upgrade_started_from_is_continued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default directory continues the one of the arbiter named by ``GUNICORN_PID`` only when that is the
    supervisor's parent (gunicorn's ``USR2``: the new arbiter is the old one's child) and that directory's record is
    that process's; else, and once both are gone, the supervisor starts a directory of its own. (This process plays
    the new arbiter, its parent the old one.)"""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    old, new = multiproc.Supervisor("gunicorn", os.getppid()), multiproc.Supervisor("gunicorn", os.getpid())
    old_directory = multiproc.default_directory(old)
    held = multiproc.SharedState(old_directory, old)  # a worker of the old arbiter, its record written
    try:
        # Not its parent (pid 1's parent is 0): an arbiter of its own.
        other = multiproc.Supervisor("gunicorn", 1)
        assert not Path(multiproc.default_directory(other, {"GUNICORN_PID": str(os.getppid())})).is_symlink()
        assert not Path(multiproc.default_directory(new, {})).is_symlink()
        # The parent, but its directory's record is another process's (its pid reused since): no link either.
        run = Path(old_directory) / "run"
        kept = run.read_text()
        run.write_text(f"{os.getppid()}@1@{multiproc.pid_namespace()}")
        assert not Path(multiproc.default_directory(new, {"GUNICORN_PID": str(os.getppid())})).is_symlink()
        run.write_text(kept)
        # The upgrade: linked, and the old directory's record names both arbiters.
        linked = Path(multiproc.default_directory(new, {"GUNICORN_PID": str(os.getppid())}))
        assert linked.is_symlink() and linked.resolve() == Path(old_directory).resolve()
        assert run.read_text().split() == [multiproc.process_token(os.getppid()), multiproc.process_token(os.getpid())]
        # A later worker, without the variable (after the promotion), finds the link.
        assert multiproc.default_directory(new, {}) == str(linked)
    finally:
        held.close()


@linux_only
def test_workers_usr2_upgrade_continues_the_directory_of_an_old_arbiter_that_has_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new arbiter whose first worker starts once the old arbiter (named by ``GUNICORN_PID``) has exited, its
    workers too, continues the old directory: that arbiter's record names a process of that pid that has exited and
    started before the new arbiter. Not when the record's process of that pid started after the new arbiter (the
    pid taken again since)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    # The old arbiter, then the new one (started later, as gunicorn forks it); neither this process's parent.
    arbiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    upgrade = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = multiproc.Supervisor("gunicorn", arbiter.pid)
        new = multiproc.Supervisor("gunicorn", upgrade.pid)
        old_directory = Path(multiproc.default_directory(old))
        multiproc.SharedState(str(old_directory), old).close()  # a worker of the old arbiter came and went
        old_token = multiproc.process_token(arbiter.pid)
        arbiter.kill()
        arbiter.wait()
        environment = {"GUNICORN_PID": str(arbiter.pid)}

        # A process of that pid that started after the new arbiter: not the one that forked it.
        run = old_directory / "run"
        pid, _, rest = old_token.partition("@")
        namespace = rest.partition("@")[2]
        later = int(multiproc.process_token(upgrade.pid).split("@")[1]) + 1
        run.write_text(f"{pid}@{later}" + (f"@{namespace}" if namespace else ""))
        assert not Path(multiproc.default_directory(new, environment)).is_symlink()
        run.write_text(old_token)

        linked = Path(multiproc.default_directory(new, environment))
        assert linked.is_symlink() and linked.resolve() == old_directory.resolve()
        assert run.read_text().split() == [multiproc.process_token(upgrade.pid)]  # (the old one's gone: dropped)
        # Another start's sweep leaves it while the new arbiter runs, and removes both once it is gone.
        other = multiproc.Supervisor("gunicorn", os.getpid())
        multiproc.default_directory(other, {})
        assert linked.is_symlink() and old_directory.is_dir()
        upgrade.kill()
        upgrade.wait()
        multiproc.default_directory(other, {})
        assert not linked.exists() and not linked.is_symlink() and not old_directory.exists()
    finally:
        for process in (arbiter, upgrade):
            process.kill()
            process.wait()


@linux_only
def test_workers_directory_behind_an_upgrade_link_removed_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temp cleaner removes the directory a gunicorn upgrade's link names (``rm -rf`` of the old arbiter's, after
    the promotion): the new arbiter's workers make it again through the link and put their counts back. Before,
    making it through the dangling link failed, and every scrape of the metrics port answered 500 from then on
    (measured with a real gunicorn)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    old, new = multiproc.Supervisor("gunicorn", os.getppid()), multiproc.Supervisor("gunicorn", os.getpid())
    old_directory = multiproc.default_directory(old)
    multiproc.SharedState(old_directory, old).close()  # a worker of the old arbiter came and went
    linked = multiproc.default_directory(new, {"GUNICORN_PID": str(os.getppid())})
    assert Path(linked).is_symlink()
    state = multiproc.SharedState(linked, new)
    try:
        counter = json.dumps(["llm.requests", "c", []])
        state.add(counter, 2)
        assert state.merged() == {counter: 2}
        shutil.rmtree(old_directory)
        assert state.restore()
        assert Path(old_directory).is_dir() and Path(linked).resolve() == Path(old_directory).resolve()
        state.add(counter, 1)
        assert state.merged() == {counter: 3}
    finally:
        state.close()


@linux_only
def test_workers_upgrade_link_removed_is_put_back_to_the_directory_with_the_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temp cleaner removes a gunicorn upgrade's link itself (an age-based one takes it first: a link's time never
    changes, while the files of the directory it names are written): the workers put the link back, to the directory
    where their files are, with those of a worker that stopped there and is not folded yet. Before, each worker made a
    directory of its own in the link's place and moved its own files there: that worker's counts were left behind,
    and the totals went down for good (36 requests shown, then 25, under a real gunicorn)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    old, new = multiproc.Supervisor("gunicorn", os.getppid()), multiproc.Supervisor("gunicorn", os.getpid())
    old_directory = multiproc.default_directory(old)
    multiproc.SharedState(old_directory, old).close()  # a worker of the old arbiter came and went
    linked = multiproc.default_directory(new, {"GUNICORN_PID": str(os.getppid())})
    assert Path(linked).is_symlink()
    counter = json.dumps(["llm.requests", "c", []])
    state = multiproc.SharedState(linked, new)
    try:
        stopped = multiproc.SharedState(linked, new)  # another worker of the new arbiter (TTOU stops it)
        stopped.add(counter, 5)
        state.add(counter, 2)
        assert state.merged() == {counter: 7}
        stopped.close()  # stopped; folded at the next merge
        os.unlink(linked)
        state.restore()
        state.add(counter, 1)
        assert state.merged() == {counter: 8}
        assert Path(linked).is_symlink() and Path(linked).resolve() == Path(old_directory).resolve()
        # A worker the arbiter starts while the link is gone (before a worker put it back) joins the same directory.
        os.unlink(linked)
        assert multiproc.default_directory(new, {}) == linked
        assert Path(linked).is_symlink() and Path(linked).resolve() == Path(old_directory).resolve()
    finally:
        state.close()


@linux_only
def test_workers_start_while_the_upgrade_link_and_its_record_are_removed_joins_the_upgrade_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An age-based temp cleaner removes a gunicorn upgrade's link in the same pass as the files made with it (the
    ``run`` record naming the new arbiter, and its workers' liveness files), and the arbiter starts a worker before
    the others put them back (within a second): that worker finds the directory by the locks its siblings (the
    arbiter's other workers) hold there, and joins them. Before, it found no record naming its arbiter and made a
    directory of its own in the link's place, so the link could not be put back: the arbiter's workers moved their
    own files there, a stopped worker's counts not yet folded stayed behind, and the totals went down for good."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    old, new = multiproc.Supervisor("gunicorn", os.getppid()), multiproc.Supervisor("gunicorn", os.getpid())
    old_directory = multiproc.default_directory(old)
    multiproc.SharedState(old_directory, old).close()  # a worker of the old arbiter came and went
    linked = multiproc.default_directory(new, {"GUNICORN_PID": str(os.getppid())})
    assert Path(linked).is_symlink()
    counter = json.dumps(["llm.requests", "c", []])
    stopped = multiproc.SharedState(linked, new)  # a worker of the new arbiter that TTOU stopped, not folded yet
    stopped.add(counter, 5)
    stopped.close()
    # Another worker of the new arbiter (this process is the arbiter): a child, as gunicorn forks them.
    sibling = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, os, sys; from llm_telemetry import multiproc\n"
            f"state = multiproc.SharedState({linked!r}, multiproc.Supervisor('gunicorn', os.getppid()))\n"
            "state.add(json.dumps(['llm.requests', 'c', []]), 2)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    state = None
    try:
        assert sibling.stdout is not None and sibling.stdout.readline() == "ready\n"
        # The cleaner's pass, then a worker's start before any worker looked again.
        os.unlink(linked)
        os.unlink(Path(old_directory) / "run")
        for alive in Path(old_directory).glob("*.alive"):
            alive.unlink()
        assert multiproc.default_directory(new, {}) == linked
        assert Path(linked).is_symlink() and Path(linked).resolve() == Path(old_directory).resolve()
        state = multiproc.SharedState(linked, new)
        state.add(counter, 1)
        assert state.merged() == {counter: 8}
    finally:
        if state is not None:
            state.close()
        sibling.communicate("")


@linux_only
def test_workers_fresh_server_whose_directory_is_missing_joins_no_other_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh server's first worker (its directory not there yet) looks for a removed upgrade link's directory: one
    whose record names its arbiter, or where a worker of its arbiter holds a lock. A directory where another server's
    worker holds its locks, its record removed by a temp cleaner, is not that: the fresh server starts its own
    directory, and never shows the other's totals."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    running = multiproc.Supervisor("gunicorn", os.getppid())
    directory = multiproc.default_directory(running)
    state = multiproc.SharedState(directory, running)  # a worker of a running server
    arbiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.unlink(Path(directory) / "run")
        fresh = multiproc.Supervisor("gunicorn", arbiter.pid)
        path = multiproc.default_directory(fresh, {})
        assert not os.path.lexists(path)
        assert Path(directory).is_dir() and not Path(directory).is_symlink()
    finally:
        arbiter.kill()
        arbiter.wait()
        state.close()


def test_workers_explicit_directory_that_is_a_link_removed_is_put_back_with_the_counts(tmp_path: Path) -> None:
    """``LLM_TELEMETRY_MULTIPROC_DIR`` names a symbolic link (an absolute one, to a volume's directory, say), and a
    temp cleaner removes the link alone: the workers put the same link back, to the directory where their files are
    and those of a stopped worker not folded yet, whose counts stay in the totals. A directory made in the link's
    place would have left them behind."""
    target = tmp_path / "volume" / "state"
    target.mkdir(parents=True)
    link = tmp_path / "state"
    link.symlink_to(target)
    supervisor = multiproc.Supervisor("parent", os.getppid())
    counter = json.dumps(["llm.requests", "c", []])
    state = multiproc.SharedState(str(link), supervisor)
    try:
        stopped = multiproc.SharedState(str(link), supervisor)
        stopped.add(counter, 5)
        stopped.close()  # stopped; folded at the next merge
        state.add(counter, 2)
        link.unlink()
        state.restore()
        assert link.is_symlink() and os.readlink(link) == str(target)
        state.add(counter, 1)
        assert state.merged() == {counter: 8}
    finally:
        state.close()


def test_workers_port_claimed_while_the_directory_is_removed_is_recorded_once_it_is_back(tmp_path: Path) -> None:
    """A worker that takes the metrics port over while the state directory is gone (removed by a temp cleaner, not yet
    put back) serves it, and its claim is recorded with its files once they are back. Before, the claim's write
    raised: a traceback ended the thread that had just taken the port (seen under a real gunicorn, its upgrade link
    removed as the worker serving the port stopped)."""
    directory = tmp_path / "state"
    state = multiproc.SharedState(str(directory), multiproc.Supervisor("parent", os.getppid()))
    try:
        shutil.rmtree(directory)
        state.claim_port()
        assert state.restore()
        assert state.port_held_by_worker()
    finally:
        state.close()


def test_workers_temp_dir_wiped_the_default_location_is_made_again_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wipe of the temp dir under a running server (``rm -rf /tmp/*``) takes the default location's
    ``llm-telemetry-<uid>`` with the server's directory: the workers make both again, and the one above theirs is again
    readable by this user only, as a start makes it (it was made with the default mode, 0755 under the usual umask,
    so every local user could read the service's counts)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    supervisor = multiproc.Supervisor("parent", os.getppid())
    directory = Path(multiproc.default_directory(supervisor))
    state = multiproc.SharedState(str(directory), supervisor)
    try:
        base = directory.parent
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        shutil.rmtree(base)
        assert state.restore()
        assert directory.is_dir()
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    finally:
        state.close()


@linux_only
def test_workers_sweep_leaves_a_directory_an_upgrade_joined_after_the_sweep_read_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start's sweep that found a directory's record naming only supervisors gone removes it only if, once it holds
    the directory's lock, the record still says so: a gunicorn upgrade adds its new arbiter to the record under that
    lock (another process, between the sweep's reading and its removing), and its workers then count in it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    arbiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = multiproc.Supervisor("gunicorn", arbiter.pid)
        directory = Path(multiproc.default_directory(gone))
        multiproc.SharedState(str(directory), gone).close()
    finally:
        arbiter.kill()
        arbiter.wait()
    sweeper: list[int] = []

    def sweep() -> None:
        sweeper.append(threading.get_native_id())
        multiproc.default_directory(multiproc.Supervisor("uvicorn", os.getpid()), {})

    def waits_for_the_lock() -> bool:
        # Where the kernel has the thread wait ("0" while it runs): flock's wait, locks_lock_inode_wait.
        return "lock" in Path(f"/proc/self/task/{sweeper[0]}/wchan").read_text()

    lock = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the upgrade's first worker holds it
        thread = threading.Thread(target=sweep)
        thread.start()
        wait_for(
            "the sweep to wait for the lock, or to end",
            lambda: sweeper and (not thread.is_alive() or waits_for_the_lock()),
        )
        if thread.is_alive():
            (directory / "run").write_text(
                "\n".join([(directory / "run").read_text(), multiproc.process_token(os.getpid())])
            )
    finally:
        os.close(lock)
    thread.join()
    assert directory.is_dir(), "the sweep removed a directory an upgrade had joined"


def test_workers_sweep_leaves_another_namespaces_live_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory whose supervisor lives in another PID namespace (another container on the shared ``/tmp``) is
    removed only once no worker holds its liveness lock and it has not changed for a while."""
    import fcntl

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches the temp dir; let it read TMPDIR again
    supervisor = multiproc.Supervisor("gunicorn", os.getpid())
    mine = multiproc.default_directory(supervisor)
    base = Path(mine).parent
    theirs = base / "gunicorn-1-1"
    theirs.mkdir()
    (theirs / "run").write_text(f"1@12345@{multiproc.pid_namespace()}0")  # pid 1 of a namespace not ours
    alive = open(theirs / "w7-abc.alive", "wb")  # held open: the worker's lock
    fcntl.flock(alive.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    old = 10 * multiproc.ABANDONED_SECONDS
    os.utime(theirs, (os.stat(theirs).st_atime - old, os.stat(theirs).st_mtime - old))
    assert multiproc.default_directory(supervisor) == mine
    assert theirs.is_dir(), "a live worker's directory was removed"
    alive.close()  # its last worker is gone
    os.utime(theirs, (os.stat(theirs).st_atime, os.stat(theirs).st_mtime - old))
    multiproc.default_directory(supervisor)
    assert not theirs.exists(), "a left-behind directory stayed"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_workers_a_storm_of_scrapes_is_answered_not_refused(kind: str, tmp_path: Path) -> None:
    """Six clients scraping without pause under three workers, on the metrics port and on the app's own path: more
    scrapes at once than the answers a listener makes at once (exposition.MAX_ANSWERS), each scrape answered in
    milliseconds. A scrape past those answers waits its turn and is answered; answered 503 at once (as before), a
    fifth to a third of an HA pair of Prometheus servers' scrapes beside such clients were refused, each an
    ``up == 0`` that an alert on ``up`` reads as the target down."""
    extra = {"LLM_TELEMETRY_METRICS_APP_PATH": "/metrics", "WORKERS_APP_FIRST_TOKEN_DELAY": "0"}
    server = new_server(tmp_path, kind, 3, log="s.log", **extra)
    with running(server):
        _chat_models(server.base, [f"model-{i}" for i in range(40)])

        def storm(target: int) -> list[int]:
            statuses = []
            for _ in range(50):
                connection = http.client.HTTPConnection("127.0.0.1", target, timeout=60)  # a new one each time
                try:
                    connection.request("GET", "/metrics")
                    with connection.getresponse() as response:
                        response.read()
                        statuses.append(response.status)
                finally:
                    connection.close()
            return statuses

        for target in (server.metrics_port, server.port):
            with ThreadPoolExecutor(6) as pool:
                statuses = [status for done in pool.map(storm, [target] * 6) for status in done]
            refused = statuses.count(503)
            assert statuses == [200] * len(statuses), f"{refused} of {len(statuses)} scrapes of :{target} refused"
