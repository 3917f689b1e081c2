"""Helpers shared by the tests: real uvicorn servers on 127.0.0.1, real scrapes of /metrics, a stream fed to a
reader as the middleware feeds it."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llm_telemetry.logs import REQUEST_LOGGER, JsonFormatter
from llm_telemetry.record import LLMCall


def wait_for(what: str, check: Callable[[], Any], seconds: float = 60) -> Any:
    """Poll until ``check`` returns something truthy (exceptions count as not yet); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as exc:
            last = exc
        else:
            if result:
                return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def stop_process(process: subprocess.Popen[bytes], seconds: float = 15) -> None:
    """Stop a server the test started: SIGTERM, so that it shuts down cleanly, then SIGKILL after ``seconds``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


#: The ``server`` block of a Loki or Tempo config (their common server library): HTTP and gRPC on loopback.
LOOPBACK_SERVER_CONFIG = """server:
  http_listen_address: 127.0.0.1
  http_listen_port: {http}
  grpc_listen_address: 127.0.0.1
  grpc_listen_port: {grpc}
  log_level: warn
"""


@contextmanager
def config_file_server(what: str, binary: str, config: str, root: Path, base: str) -> Iterator[None]:
    """Run a server configured by one file, as Loki and Tempo are (``-config.file``), until the block ends: the
    config written under ``root``, its output in ``root/<what>.log``, ready once ``base``/ready answers 200."""
    (root / "config.yaml").write_text(config)
    log_path = root / f"{what.lower()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary, f"-config.file={root / 'config.yaml'}"], stdout=log, stderr=log)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited: {log_path.read_text()[-2000:]}")
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
                return bool(response.status == 200)

        wait_for(f"{what} to be ready", ready)
        yield
    finally:
        stop_process(process)


def _benchmark_procs() -> Any:
    """``benchmarks/procs.py``, whose ports the suite's servers take too: one policy for both, loaded by its path
    (the benchmarks are no package) under the name the benchmarks import it by, so that a process keeps one record
    of the ports it handed out."""
    if "procs" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "procs", Path(__file__).resolve().parents[1] / "benchmarks/procs.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["procs"] = module
        spec.loader.exec_module(module)
    return sys.modules["procs"]


_PROCS = _benchmark_procs()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts later: outside the kernel's ephemeral range, so that no
    client connection the suite opens meanwhile takes it as its local port (a port found with bind(0) can be, which
    failed runs with "address already in use"); under pytest-xdist from the worker's own share; never the same twice
    in a process (``procs.free_port``)."""
    port: int = _PROCS.free_port()
    return port


@contextmanager
def serve(app: Any, event_loop: str = "asyncio", **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on 127.0.0.1 in a thread, on an ``event_loop`` of asyncio's or
    ``uvloop``'s; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto", **config)
    )

    def run() -> None:
        if event_loop == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(server.serve())
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def scrape_text(port: int, path: str = "/metrics", accept: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


class Metrics:
    """A parsed scrape: ``value(name, **labels)`` sums the samples whose labels include the given ones."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def series(self, name: str, **labels: str) -> list[dict[str, str]]:
        return [
            dict(s.labels)
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


#: The path of a scrape rendered afresh: the query string keeps it from sharing another scrape's rendering (see scrape).
FRESH = "/metrics?fresh"


def scrape(port: int) -> Metrics:
    """A scrape rendered afresh (a query string). A plain scrape may get the rendering an earlier one made, which the
    listener keeps for SHARE (4) times what making it took (``exposition.py``): a rendering slowed by a pause of the
    process (a full garbage collection on a loaded machine, say) answers every plain scrape for four times as long,
    with the numbers from before a call a test is waiting for. A test polling until its call shows reads those until
    its deadline (a full collection during a rendering made test_sdk_shapes read a custom tool call as 0 so)."""
    return Metrics(scrape_text(port, FRESH))


def settled(port: int, check: Callable[[Metrics], None], path: str = "/metrics", seconds: float = 10) -> Metrics:
    """The first scrape on which ``check`` passes (it raises AssertionError until then), each one rendered afresh
    (a query string: a plain scrape may get the rendering another one just had).

    A call is recorded just after its last byte is sent, and an SDK may be done with the answer before that; a
    scrape taken while a call is recorded can show some of its points and not yet others. A test asserting on a
    scrape taken once, at once, fails now and then on a loaded machine."""

    def passed() -> Metrics:
        metrics = Metrics(scrape_text(port, f"{path}?fresh"))
        check(metrics)
        return metrics

    result: Metrics = wait_for("a scrape showing the calls whole", passed, seconds)
    return result


#: Seconds a test waits for a call to be recorded (just after its response's last byte) before it reads what there
#: is: generous, as it costs time only when a test fails. (A wait of 5 s failed once with the suite and two other
#: jobs on two cores; polls reading a shared rendering made before the call, which ``scrape`` no longer takes, fail
#: so when a rendering is slowed by 1.25 s, the likeliest cause found; it was not caught in the act.)
RECORDED_WITHIN = 60.0


def whole_after(port: int, path: str = "/metrics") -> Metrics:
    """A scrape rendered afresh, taken once one showed the calls a test waits for. One middleware process records a
    call's points under one lock, but a scrape collects each metric in turn: the scrape that first showed the
    call's request may have collected its tokens before the call was recorded. The next one shows all of it."""
    return Metrics(scrape_text(port, f"{path}?fresh"))


class Calls:
    """An observer keeping every finished call (the middleware's public ``observers`` hook)."""

    def __init__(self) -> None:
        self.ended: list[LLMCall] = []

    def start(self, call: LLMCall) -> None:
        pass

    def end(self, call: LLMCall) -> None:
        self.ended.append(call)


def read_as_middleware(reader: Any, chunks: list[bytes], groups: list[int]) -> None:
    """Feed a stream reader ``chunks`` as the middleware does: one by one, and while it is holding, kept in groups
    (of the sizes in ``groups``, in turn) and read in bulk; then finish it."""
    held: list[bytes] | None = None
    sizes = iter(groups * (len(chunks) + 1))
    size = next(sizes)
    for i, chunk in enumerate(chunks):
        if held is not None:
            held.append(chunk)
            if len(held) >= size:
                reader.feed_held(held)
                held, size = ([] if reader.holding else None), next(sizes)
            continue
        reader.feed(chunk, now=1.0 + i)
        if reader.holding:
            held = []
    if held:
        reader.feed_held(held)
    reader.finish(now=1000.0)


def read_stream(api: str, chunks: list[bytes], groups: list[int] | None, capture: bool = False) -> LLMCall:
    """What the stream reader of ``api`` (a key of ``APIS``) records of ``chunks``: fed as the middleware feeds it
    (kept in ``groups``, see :func:`read_as_middleware`), or with ``groups`` None one by one. ``capture`` turns
    content capture on, which turns every shortcut off: a full read."""
    from llm_telemetry.apis import APIS

    spec = APIS[api]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.reader(call, stream=True, capture=capture)
    if groups is not None:
        read_as_middleware(reader, chunks, groups)
    else:
        for i, chunk in enumerate(chunks):
            reader.feed(chunk, now=1.0 + i)
        reader.finish(now=1000.0)
    return call


async def request_body(receive: Callable[[], Any]) -> bytes:
    """The whole body of an ASGI request, read from ``receive`` as an app reads it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


@contextmanager
def request_log_lines() -> Iterator[io.StringIO]:
    """The middleware's request-log lines, in JSON, written to the yielded buffer instead of wherever the request
    logger sends them (other middleware instances in this process may have given it handlers already: they are put
    back after the block)."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(REQUEST_LOGGER)
    previous = logger.handlers[:]
    logger.handlers[:] = [handler]
    try:
        yield sink
    finally:
        logger.handlers[:] = previous


def operator_records(state: Any) -> dict[str, list[Any]]:
    """Every key of every record an operator's state keeps (``llm_telemetry_operator.handlers.OperatorState``: its
    own, the workloads' index, the collector lookups, the schedule), by where it is kept: what must go back to none
    once the resources are gone."""
    holders = {"state": state, "index": state.index, "collectors": state.collectors, "schedule": state.schedule}
    found: dict[str, list[Any]] = {}
    for where, holder in holders.items():
        for name, value in vars(holder).items():
            if isinstance(value, (dict, set, frozenset)):
                found[f"{where}.{name}"] = list(value)
    return found
