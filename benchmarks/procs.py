"""Process helpers for the benchmarks: free ports, child processes, CPU time and memory from /proc."""

from __future__ import annotations

import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
_logs: dict[int, IO[bytes]] = {}
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _candidate_ports() -> list[int]:
    """Ports a benchmark may hand its servers: none in the kernel's ephemeral range, and under pytest-xdist (the
    smoke tests run the benchmarks from a test worker) only every Nth, starting at the worker's number."""
    try:
        low, high = map(int, pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    ports = [port for port in range(10000, 65000) if not low <= port <= high]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or "1")
    if count > 1 and worker.startswith("gw") and worker[2:].isdigit():
        ports = ports[int(worker[2:]) % count :: count]
    return ports


_PORTS = _candidate_ports()
_next_port = random.Random(os.getpid()).randrange(len(_PORTS))
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 for a server started a moment later.

    The port comes from outside the kernel's ephemeral range: a port found with bind(0) and closed is the next
    bind(0) of any other process too, and a server of another test took one between the check and the benchmark
    server's bind (the scrape of the benchmark's metrics port reached it and got a 404). This process never hands
    the same port out twice (a server and its metrics listener on one port answered the scrape with the app's 404).
    """
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port outside the kernel's ephemeral range")


def cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of the processes (all their threads), in seconds.

    Each thread's ``schedstat`` gives nanoseconds on CPU; ``stat``'s utime+stime (clock ticks, 10 ms) is the
    fallback when schedstat is not available.
    """
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            total += sum(int(pathlib.Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks)
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS * 1e9
    return total / 1e9


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: current and peak resident memory."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (uvicorn's workers), found through /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode}")  # type: ignore[arg-type]
        try:
            http_get(url, timeout=2)
            return
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered {url} within {timeout:.0f} s") from None
            time.sleep(0.1)


#: Settings of OpenTelemetry's SDK and of the middleware. A variant is configured by the benchmark alone: one of these
#: in the shell that runs it (an ``OTEL_EXPORTER_OTLP_ENDPOINT``, say) would turn tracing on in the metrics-only
#: variant, which would then be measured and printed as metrics only.
SETTINGS = ("OTEL_", "LLM_TELEMETRY_")


def environment() -> dict[str, str]:
    """This process's environment without :data:`SETTINGS`: the base of every benchmarked process's."""
    return {key: value for key, value in os.environ.items() if not key.startswith(SETTINGS)}


def drop_settings() -> None:
    """Take :data:`SETTINGS` out of this process's environment, for a benchmark that builds its variants in-process."""
    for key in [key for key in os.environ if key.startswith(SETTINGS)]:
        del os.environ[key]


def start(script: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python benchmarks/<script> <args>`` with the repository's interpreter, in :func:`environment` with
    ``env`` added."""
    full_env = environment()
    full_env.update(env or {})
    # stderr goes to a file, not a pipe: a chatty child must never block on a full pipe mid-benchmark.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        env=full_env,
        cwd=str(REPO_ROOT),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    _logs[process.pid] = log
    return process


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> str:
    """Stop a child we started (SIGTERM, then SIGKILL); return what it wrote to stderr."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = _logs.pop(process.pid, None)
    if log is None:
        return ""
    with log:
        log.seek(0)
        return log.read().decode(errors="replace")
