"""How long a scrape holds up the app's requests, on the app's own port (``metrics_app_path``) and on the separate
metrics port.

The demo app runs wrapped under uvicorn in a process of its own, with tenant attribution; ``--combos`` distinct
(model, tenant) pairs are recorded first, so the exposition is that of a service with that many label combinations.
Then a client times a cheap request of the app (``GET /v1/models``, not an LLM call) one after another: with no
scrape running, then while another client scrapes each endpoint back to back. A scrape encoded on the event loop
would show as requests waiting for it.

    python benchmarks/scrape_stall.py [--combos 400] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procs import free_port  # noqa: E402

SERVER = """
from llm_telemetry.demo.app import create_app
app = create_app(metrics_port={metrics}, metrics_host="127.0.0.1", metrics_app_path="/metrics",
                 attribution_headers={{"x-tenant-id": "tenant"}}, request_logs=False)
"""


def _wait(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def _latencies(client: httpx.Client, url: str, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        client.get(url).raise_for_status()
        out.append(time.perf_counter() - start)
    return out


def _during_scrapes(client: httpx.Client, url: str, scrape_url: str | None, seconds: float) -> tuple[list[float], int]:
    """Sorted latencies of requests to ``url`` while another client scrapes ``scrape_url`` back to back (or
    nothing), and the scrapes made."""
    stop = threading.Event()
    scrapes = 0

    def scrape() -> None:
        nonlocal scrapes
        with httpx.Client(timeout=120) as scraper:
            while scrape_url is not None and not stop.is_set():
                scraper.get(scrape_url).raise_for_status()
                scrapes += 1

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    times = sorted(_latencies(client, url, seconds))
    stop.set()
    thread.join()
    return times, scrapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--combos", type=int, default=400, help="distinct (model, tenant) pairs recorded first")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per row")
    args = parser.parse_args()
    port, metrics = free_port(), free_port()
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"scrape-stall-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stall_app.py").write_text(SERVER.format(metrics=metrics))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    command = [sys.executable, "-m", "uvicorn", "stall_app:app", "--port", str(port), "--log-level", "warning"]
    # The checkout's middleware first, as in scrape_storm.py: the code measured is this checkout's, whatever copy the
    # interpreter has installed.
    path = os.pathsep.join([str(directory), str(HERE.parent / "middleware"), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(command, cwd=directory, env={**env, "PYTHONPATH": path})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base + "/v1/models", server)
        tenants = max(1, args.combos // 100)
        with httpx.Client(timeout=60) as client:
            for i in range(args.combos):
                body = {"model": f"model-{i % 100}", "messages": [{"role": "user", "content": "hi"}]}
                client.post(base + "/v1/chat/completions", json=body, headers={"x-tenant-id": f"t{i // 100 % tenants}"})
            size = len(client.get(base + "/metrics").content)
            print(f"{args.combos} label combinations: exposition {size / 1024:,.0f} KiB")
            print(f"{'scrapes running':32} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'scrapes':>8}")
            rows = [("none", None), ("app port (metrics_app_path)", base + "/metrics"),
                    ("metrics port", f"http://127.0.0.1:{metrics}/metrics")]  # fmt: skip
            for title, scrape_url in rows:
                times, scrapes = _during_scrapes(client, base + "/v1/models", scrape_url, args.seconds)
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
                print(
                    f"{title:32} {len(times):9d} {statistics.median(times) * 1e3:8.2f} {p99 * 1e3:8.2f} "
                    f"{times[-1] * 1e3:8.2f} {scrapes:8d}"
                )
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)  # the app module written for this run


if __name__ == "__main__":
    main()
