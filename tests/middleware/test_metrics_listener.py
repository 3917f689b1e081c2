"""The metrics port against clients that hold it: ones that connect and send nothing, ones that send their request
a byte at a time, ones that never read the answer, and more of them than the listener serves at once. What they can
hold is bounded (connections served at once, seconds per connection); a scrape is answered again once they are gone;
the app's requests never wait. A scrape that fails on the server's side is logged."""

from __future__ import annotations

import gc
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_parse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import bare_app
from llm_telemetry.exposition import MAX_ANSWERS, MAX_CONNECTIONS, SHARE, serve_metrics
from support import free_port, scrape, scrape_text, serve, wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class _Large(Collector):
    """An exposition of about ``megabytes`` MB: far more than a socket's buffers hold."""

    def __init__(self, megabytes: int) -> None:
        self.series = megabytes * 1024 * 1024 // 100

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("llm_test_large", "Filler.", labels=["series"])
        for i in range(self.series):
            family.add_metric([f"{i:060d}"], 1.0)
        yield family


def _idle(port: int) -> socket.socket:
    """A client that connects and sends nothing."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    return True


def _status(port: int, path: str = "/metrics") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        assert exc.headers["Retry-After"] == "1"
        return exc.code


@contextmanager
def serving(registry: CollectorRegistry, **bounds: Any) -> Iterator[int]:
    """``registry`` served on a free port with ``bounds``; the port."""
    port = free_port()
    server, thread = serve_metrics(port, "127.0.0.1", registry, **bounds)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def listener() -> Iterator[int]:
    with serving(CollectorRegistry(), max_connections=2, request_seconds=1.0) as port:
        yield port


def test_clients_that_send_nothing_are_answered_busy_then_dropped(listener: int) -> None:
    idle = [_idle(listener) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted, each holding one of the two connections open at once
        assert _status(listener) == 503
        # Each had a second to send its request: the server closes them, and scrapes are answered again.
        for sock in idle:
            sock.settimeout(5)
            assert _closed_by_server(sock)
        assert wait_for("a scrape answered again", lambda: _status(listener) == 200, seconds=5)
    finally:
        for sock in idle:
            sock.close()


def test_a_request_sent_a_byte_at_a_time_gets_no_more_than_its_time(listener: int) -> None:
    """Each byte within the socket timeout, but the whole request never: shut down once its time is up."""
    trickling = [_idle(listener) for _ in range(2)]
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 1000:
            if stop.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    senders = [threading.Thread(target=trickle, args=(sock,), daemon=True) for sock in trickling]
    for sender in senders:
        sender.start()
    try:
        time.sleep(0.3)
        assert _status(listener) == 503
        assert wait_for("a scrape answered again", lambda: _status(listener) == 200, seconds=5)
    finally:
        stop.set()
        for sock in trickling:
            sock.close()


def _status_once_closed(port: int, path: str = "/metrics") -> int:
    """The status of a scrape read until the server closes its connection, which it does once the request's
    handler is done and has given its answer's place back. (A client that stops at the Content-Length can be done
    before the server's thread is: on a loaded machine two such scrapes in a row could still hold both places of
    two when a third came, which was answered 503.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    return int(received.split(b" ", 2)[1])


def test_a_few_slow_clients_do_not_keep_the_scrape_out() -> None:
    """Clients still sending their request hold a connection each, not an answer: the scrape is answered beside
    them as long as connections are left."""
    with serving(CollectorRegistry(), max_connections=8, max_answers=2) as port:
        slow = [_idle(port) for _ in range(4)]
        try:
            for sock in slow:
                sock.sendall(b"GET /metrics HTTP/1.0\r\n")  # and the rest never
            time.sleep(0.2)
            assert [_status_once_closed(port) for _ in range(3)] == [200, 200, 200]
        finally:
            for sock in slow:
                sock.close()


class _Counting(Collector):
    """A collector that takes ``seconds`` and tells how many times it was collected."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.collected = seconds, 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        time.sleep(self.seconds)
        self.collected += 1
        yield GaugeMetricFamily("llm_test_collections", "Times collected.", value=self.collected)


def test_scrapes_that_come_without_pause_share_a_rendering() -> None:
    """Scrapers that come back without pause would keep the exposition, which holds the interpreter's lock,
    rendering all the time, and the app beside it slowed twenty to fifty times. Plain scrapes that come while a
    rendering is made, or soon after, get that rendering; another format or a filter gets one of its own; a plain
    scrape once the last rendering is no longer fresh gets a new one."""
    collector = _Counting(0.3)
    registry = CollectorRegistry()
    registry.register(collector)
    with serving(registry) as port:
        together: list[str] = []
        scrapers = [threading.Thread(target=lambda: together.append(scrape_text(port))) for _ in range(3)]
        for scraper in scrapers:
            scraper.start()
        for scraper in scrapers:
            scraper.join()
        first = together[0]
        again = [scrape_text(port) for _ in range(3)]
        assert collector.collected == 1 and together == [first] * 3 and again == [first] * 3
        gzipped = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert gzipped.headers["content-encoding"] == "gzip" and gzipped.text == first  # (httpx inflates it)
        assert collector.collected == 1
        # Another format, then a filter: each a rendering of its own.
        asked = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}, timeout=10)
        assert asked.headers["content-type"].startswith("application/openmetrics-text")
        assert "llm_test_collections 2.0" in asked.text and collector.collected == 2
        query = httpx.get(f"http://127.0.0.1:{port}/metrics?name[]=llm_test_collections", timeout=10).text
        assert "llm_test_collections 3.0" in query and collector.collected == 3
        time.sleep(SHARE * 0.3 + 0.5)  # the last rendering no longer fresh
        assert "llm_test_collections 4.0" in scrape_text(port)


def test_scrapers_of_the_two_formats_each_share_their_own_rendering() -> None:
    """A text scraper and an OpenMetrics one scraping without pause, in turn: each gets its own format, valid, and the
    rendering of its format that the first scrape of it made (two renderings for eight scrapes). One rendering kept
    for both had each scrape of the one format replace the other's: every scrape rendered anew, nothing shared."""
    collector = _Counting(1.0)  # a rendering that takes a second: plain scrapes share it for four more
    registry = CollectorRegistry()
    registry.register(collector)
    answers: dict[str, list[httpx.Response]] = {"text": [], "openmetrics": []}
    with serving(registry) as port:
        for _ in range(4):
            for kind, accept in (("text", "text/plain"), ("openmetrics", OPENMETRICS)):
                answer = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept}, timeout=10)
                answers[kind].append(answer)
    assert collector.collected == 2
    for kind, parse, value in (("text", text_string_to_metric_families, 1), ("openmetrics", openmetrics_parse, 2)):
        assert {answer.headers["content-type"].split(";")[0] for answer in answers[kind]} == {
            "text/plain" if kind == "text" else "application/openmetrics-text"
        }
        assert len({answer.text for answer in answers[kind]}) == 1
        samples = [sample for family in parse(answers[kind][0].text) for sample in family.samples]
        assert [(sample.name, sample.value) for sample in samples] == [("llm_test_collections", value)]


def test_the_suites_scrape_is_never_a_rendering_made_before_it() -> None:
    """Tests poll with ``support.scrape`` until the call they made shows. A plain scrape made just before the call,
    whose rendering was slow (a pause of the process as it was made), answers the plain scrapes of the next
    SHARE times as long: a poll reading it would see the numbers from before the call until its deadline."""
    collector = _Counting(1.0)  # a rendering that takes a second: plain scrapes share it for four more
    registry = CollectorRegistry()
    registry.register(collector)
    with serving(registry) as port:
        assert "llm_test_collections 1.0" in scrape_text(port)
        assert scrape(port).value("llm_test_collections") == 2


def test_a_scrape_that_fails_on_the_server_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Collector):
        def collect(self) -> Iterable[GaugeMetricFamily]:
            raise RuntimeError("a collector broke")

    registry = CollectorRegistry()
    registry.register(Broken())
    with serving(registry) as port:
        with pytest.raises(urllib.error.HTTPError) as answer:
            scrape_text(port)
        assert answer.value.code == 500
        errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "llm_telemetry.exposition"]
        assert errors and "a collector broke" in errors[0].getMessage()


def test_a_client_that_never_reads_is_dropped_and_frees_its_copy() -> None:
    registry = CollectorRegistry()
    large = _Large(16)
    registry.register(large)
    baseline = threading.active_count()
    with serving(registry, max_answers=1, answer_seconds=1.0) as port:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        reader.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        # It reads nothing while the server sends; the one answer served at once is its until its time is up. A
        # scrape meanwhile waits its turn (up to QUEUE_SECONDS): refused, or answered only once the reader is dropped
        # (so not within the 0.7 s still left of its second; slower on a loaded machine, never faster).
        time.sleep(0.3)
        asked = time.monotonic()
        # (A scrape of one name only, rendered in no time: a wait is the queue's, not the 16 MB rendering's.)
        assert _status(port, "/metrics?name[]=up") == 503 or time.monotonic() - asked >= 0.5
        # After the second it had to take the answer, the server gives up on it: what it can still read is at most
        # the part the server sent before (nothing, when encoding the exposition took the whole second), never all.
        time.sleep(1.5)
        received = 0
        reader.settimeout(5)
        while chunk := reader.recv(1 << 20):
            received += len(chunk)
        reader.close()
        assert received < 16 * 1024 * 1024
        # A scrape now answered well within the second a request is given here: once the large rendering under way
        # ends (the answer slot is held while it is made, which can take seconds on a loaded machine), and rendered
        # afresh (a query string), not the large one a plain scrape may share.
        large.series = 10
        assert wait_for("a scrape answered again", lambda: _status(port, "/metrics?fresh") == 200, seconds=60)
        assert wait_for("no thread left for it", lambda: threading.active_count() <= baseline + 1, seconds=5)


def test_the_middlewares_port_stays_bounded_and_the_app_unaffected() -> None:
    """The real middleware under uvicorn, its port held by more idle clients than it serves at once."""
    metrics_port = free_port()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=metrics_port, request_logs=False)
    with serve(app) as base:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code == 200
        wait_for("the metrics port", lambda: "llm_requests_total" in scrape_text(metrics_port))
        idle = [_idle(metrics_port) for _ in range(MAX_CONNECTIONS + 4)]
        try:
            time.sleep(0.2)
            assert _status(metrics_port) == 503
            started = time.monotonic()
            assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code == 200
            assert time.monotonic() - started < 5
        finally:
            for sock in idle:
                sock.close()
        text = wait_for("a scrape answered again", lambda: scrape_text(metrics_port), seconds=10)
        assert "llm_requests_total{" in text


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback address")
def test_the_metrics_port_answers_on_ipv6_and_ipv4_addresses_by_default() -> None:
    """In an IPv6 cluster Prometheus scrapes the pod's IPv6 address, in an IPv4 one its IPv4 address: by default the
    listener answers on both (bound to 0.0.0.0, as it was, it refused every scrape of an IPv6 pod)."""
    metrics_port = free_port()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=metrics_port, request_logs=False)
    with serve(app) as base:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code == 200
        for host in ("127.0.0.1", "[::1]"):
            url = f"http://{host}:{metrics_port}/metrics"
            assert "llm_requests_total{" in wait_for(url, lambda url=url: httpx.get(url, timeout=5).text), host
    app.telemetry.shutdown()


def test_a_scrape_can_ask_for_some_series_by_name() -> None:
    """``/metrics?name[]=...``, prometheus_client's filter by sample name, on the real middleware's port: only the
    series asked for, each as a full scrape has it."""
    metrics_port = free_port()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=metrics_port, request_logs=False)
    with serve(app) as base:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code == 200

        def counted() -> str:
            text = scrape_text(metrics_port)
            return text if "llm_requests_total{" in text else ""

        full = wait_for("the request counted", counted)
        wanted = ("llm_requests_total", "gen_ai_server_request_duration_seconds_count")
        query = "&".join(f"name[]={name}" for name in wanted)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics?{query}", timeout=10).text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples
    assert {line.split("{")[0].split(" ")[0] for line in samples} == set(wanted)
    assert set(samples) <= set(full.splitlines())
    assert "# TYPE llm_requests_total counter" in text


def test_an_accept_header_with_a_version_prometheus_client_cannot_read_gets_the_text_format() -> None:
    """prometheus_client compares an asked format's version as numbers, and fails on ``version=1.x``: any client
    could make the scrape answer 500 (and log a traceback) on the metrics port and the app's path. Such a header is
    answered as no ``Accept`` at all: 200, the text format; a readable one keeps its format."""
    metrics_port = free_port()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=metrics_port, metrics_app_path="/metrics", request_logs=False)
    unreadable = ["application/openmetrics-text; version=1.x", "text/plain; version=abc", "text/plain; version=.1"]
    with serve(app) as base:
        plain = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        for where in (f"http://127.0.0.1:{metrics_port}", base):
            for accept in unreadable:
                answer = httpx.get(f"{where}/metrics", headers={"Accept": accept}, timeout=10)
                assert answer.status_code == 200, (where, accept, answer.text[:200])
                assert answer.headers["content-type"] == plain.headers["content-type"], (where, accept)
            asked = httpx.get(f"{where}/metrics", headers={"Accept": OPENMETRICS}, timeout=10)
            assert asked.status_code == 200 and asked.headers["content-type"].startswith("application/openmetrics-text")


def test_a_scrape_on_the_apps_own_path_is_answered_as_on_the_metrics_port() -> None:
    """``LLM_TELEMETRY_METRICS_APP_PATH`` answers what the metrics port does, for each way a scraper may ask: the
    ``name[]`` filter, OpenMetrics, gzip."""
    metrics_port = free_port()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=metrics_port, metrics_app_path="/metrics", request_logs=False)
    asks: list[tuple[str, dict[str, str]]] = [
        ("?name[]=llm_requests_total&name[]=gen_ai_server_request_duration_seconds_count", {}),
        ("", {"Accept": "application/openmetrics-text; version=1.0.0"}),
        ("", {"Accept-Encoding": "gzip"}),
    ]
    with serve(app) as base:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code == 200
        wait_for("the request counted", lambda: "llm_requests_total{" in scrape_text(metrics_port))
        for query, headers in asks:
            answers = [
                httpx.get(f"{where}/metrics{query}", headers=headers, timeout=10)
                for where in (f"http://127.0.0.1:{metrics_port}", base)
            ]
            port, path = ((a.status_code, a.headers.get("content-type"), a.headers.get("content-encoding"), a.text)
                          for a in answers)  # fmt: skip
            assert port[0] == 200 and port == path, (query, headers)
        # What the app path answered before it used the exposition app: any method gets what a GET gets.
        head = httpx.head(f"{base}/metrics", timeout=10)
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert httpx.post(f"{base}/metrics", timeout=10).status_code == 200


def test_scrapes_on_the_apps_own_path_that_are_not_read_hold_a_bounded_number_of_places() -> None:
    """The app's own port is the one every API client reaches. A client that asks for the metrics and never reads
    holds one of MAX_ANSWERS places (its answer waits in pieces, the server taking one at a time), so the copies of
    the exposition held are bounded however many such clients come; past them a scrape is answered 503 at once, and
    the places come back as those clients go."""
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=0, metrics_app_path="/metrics", request_logs=False)
    with serve(app) as base:
        app.telemetry.registry.register(_Large(12))
        port = int(base.rsplit(":", 1)[1])
        readers = []
        for i in range(MAX_ANSWERS):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", port))
            reader.sendall(f"GET /metrics?fresh-{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            readers.append(reader)
        for reader in readers:
            reader.settimeout(60)
            assert reader.recv(12) == b"HTTP/1.1 200"  # its answer started: rendered, and being sent
        time.sleep(0.5)
        assert _status(port, "/metrics?fresh") == 503
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200  # the app itself is served meanwhile
        for reader in readers:
            reader.close()
        assert wait_for("the app's path answering again", lambda: _status(port, "/metrics?fresh") == 200, seconds=60)


#: A process serving an exposition of the size it is given (in MB) on the port it is given, which stops accepting
#: when told to, then closes its server and exits when told again.
CLOSING_SERVER = """
import sys
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_parse
from prometheus_client.parser import text_string_to_metric_families
from llm_telemetry.exposition import serve_metrics

class Large:
    def collect(self):
        family = GaugeMetricFamily("llm_test_large", "Filler.", labels=["series"])
        for i in range(int(sys.argv[2]) * 1024 * 1024 // 100):
            family.add_metric([f"{i:060d}"], 1.0)
        yield family

registry = CollectorRegistry()
registry.register(Large())
server, thread = serve_metrics(int(sys.argv[1]), "127.0.0.1", registry)
print("serving", flush=True)
sys.stdin.readline()
server.shutdown()
print("stopped", flush=True)
sys.stdin.readline()
server.server_close()
"""


def test_a_scrape_under_way_when_the_server_closes_gets_its_whole_answer() -> None:
    """A worker that serves the port and is recycled (gunicorn's ``--max-requests``) closes its server and exits:
    the answer being sent then is finished first, not cut off by the interpreter's exit."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", CLOSING_SERVER, str(port), "12"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "serving\n"
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        head = client.recv(4096)
        assert head.startswith(b"HTTP/1.0 200")  # rendered, and being sent
        assert server.stdin is not None
        server.stdin.write("stop\nclose\n")  # it closes and exits while the answer is under way
        server.stdin.flush()
        received = head
        while chunk := client.recv(1 << 17):
            received += chunk
            time.sleep(0.01)  # a client reading at its pace: about a second for the rest
        client.close()
        assert server.wait(timeout=30) == 0
        headers, body = received.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: (\d+)", headers)[1])  # type: ignore[index]
        assert len(body) == length > 10 * 1024 * 1024
    finally:
        server.kill()
        server.wait()


STRACE = shutil.which("strace")


@pytest.mark.skipif(STRACE is None or sys.platform != "linux", reason="strace shows the server's sends")
def test_the_status_line_and_the_headers_of_an_answer_leave_in_one_send(tmp_path: Path) -> None:
    """The worker serving the port, killed (SIGKILL) between the sends of an answer's head, left its client a 200
    whose headers ended early, without Content-Length, which a lenient client (Python's http.client) reads as an
    empty exposition. The whole head leaves in one send: a kill leaves the client nothing, or a head with its
    Content-Length, and then a body too short for it, which the client's read fails on."""
    assert STRACE is not None
    port = free_port()
    trace = tmp_path / "strace.txt"
    server = subprocess.Popen(
        [STRACE, "-f", "-qq", "-e", "trace=sendto,sendmsg,write", "-s", "1024", "-o", str(trace),
         sys.executable, "-c", CLOSING_SERVER, str(port), "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdin is not None
        if server.stdout.readline() != "serving\n":
            pytest.skip("strace cannot trace a process here (ptrace not permitted)")
        assert "llm_test_large" in scrape_text(port)
        server.stdin.write("stop\nclose\n")
        server.stdin.flush()
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
        server.wait()
    heads = [line for line in trace.read_text().splitlines() if '"HTTP/1.0 200 OK' in line]
    assert len(heads) == 1, heads
    assert "Content-Length: " in heads[0] and r"\r\n\r\n" in heads[0], heads[0]


def test_scrapes_waiting_to_be_accepted_when_the_server_closes_are_answered() -> None:
    """Connections the server has not accepted yet when it closes (its loop stopped, the listening socket still
    open: the kernel completed their handshakes, their requests are sent) are taken and answered, not reset by the
    close. A recycled worker otherwise failed a third of the scrapes of a client scraping every 0.3 s."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", CLOSING_SERVER, str(port), "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline() == "serving\n"
        server.stdin.write("stop\n")
        server.stdin.flush()
        assert server.stdout.readline() == "stopped\n"  # no longer accepting
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        for client in clients:
            client.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        server.stdin.write("close\n")
        server.stdin.flush()
        for client in clients:
            received = b""
            while chunk := client.recv(1 << 17):
                received += chunk
            client.close()
            assert received.startswith(b"HTTP/1.0 200") and b"llm_test_large" in received
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()


def test_a_metrics_port_busy_at_startup_is_served_once_it_is_free(caplog: pytest.LogCaptureFixture) -> None:
    """A restart whose old process still holds the port (uvicorn's reload, a rolling restart on a host port): the
    port is tried again every second, and served once the other process lets it go."""
    metrics_port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", metrics_port))
    holder.listen()
    app = LLMTelemetryMiddleware(bare_app(), metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False)
    try:
        with caplog.at_level("WARNING", logger="llm_telemetry"), serve(app) as base:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code == 200
            (warning,) = [r.getMessage() for r in caplog.records if "trying again every second" in r.getMessage()]
            assert "LLM_TELEMETRY_MULTIPROC_DIR" in warning  # (several workers the server does not say it has)
            holder.close()
            text = wait_for("the port served", lambda: _scraped(metrics_port), seconds=10)
            assert "llm_requests_total{" in text
    finally:
        holder.close()
        app.telemetry.shutdown()


def _scraped(port: int) -> str:
    try:
        return scrape_text(port)
    except OSError:
        return ""


class _SlowLabel(Collector):
    """A collector whose exposition is about ``size`` bytes, each collection taking ``seconds``."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size, self.seconds = size, seconds

    def collect(self) -> Iterable[GaugeMetricFamily]:
        time.sleep(self.seconds)
        family = GaugeMetricFamily("llm_test_large", "A large label value.", labels=["v"])
        family.add_metric(["x" * self.size], 1.0)
        yield family


def test_scrapes_asking_for_many_format_versions_keep_two_renderings_at_most() -> None:
    """Each OpenMetrics version a scraper asks for (its content type carries it) gets a rendering of its own; the
    listener keeps the newest of two formats at most, so scrapers asking for a new version each time, while the
    renderings are fresh, keep no more than two copies of the exposition in memory (with no bound, all those still
    fresh: five of these 4 MB ones). Measured once the answers are let go of (the server's threads may hold the
    last one a moment after the client has it)."""
    size = 4_000_000
    registry = CollectorRegistry()
    registry.register(_SlowLabel(size, 0.3))  # (fresh for four times that after each)
    accepts = [f"application/openmetrics-text; version=1.0.{n}" for n in range(8)]
    with serving(registry) as port:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)  # (the listener's first scrape, imports made)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for accept in accepts:
                answer = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept}, timeout=30)
                assert answer.headers["content-type"].startswith(accept) and len(answer.content) > size
                del answer

            def held() -> int:
                gc.collect()
                return tracemalloc.get_traced_memory()[0] - before

            wait_for("the answers let go of", lambda: held() < 2.5 * size, seconds=10)
            # (The newest is kept whatever the time; the one before it only while still fresh, which a slow machine
            # may outlast between two scrapes.)
            assert held() > 0.5 * size
        finally:
            tracemalloc.stop()
