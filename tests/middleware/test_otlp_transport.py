"""How our OTLP/HTTP span and log exporters reach a collector: what a user's network setup (keep-alive connections a
collector closes, retries it asks for, a proxy or a ``.netrc`` entry in the environment) gets from them.

Each test runs, for spans and for request-log records, against a real HTTP/1.1 server on 127.0.0.1 that decodes the
protobuf requests it receives."""

from __future__ import annotations

import gzip
import io
import logging
import pathlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import brotli
import openai
import pytest
import requests
import requests.adapters
import urllib3.response
from opentelemetry._logs import LogRecord
from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as SDKLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as SDKSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult, MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

from llm_telemetry.otlp_logs import OTLPLogExporter
from llm_telemetry.otlp_spans import OTLPSpanExporter
from llm_telemetry.telemetry import _otlp_metric_exporter
from otlp_receiver import demo_server
from support import wait_for


@dataclass
class Collector:
    """What a :func:`collector` received: one entry per request."""

    url: str = ""
    #: The request target as sent: a path, or an absolute URL when the request came as to a proxy.
    targets: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: The names of the spans, or the bodies of the log records, received.
    items: list[str] = field(default_factory=list)
    connections: list[socket.socket] = field(default_factory=list)
    #: Answer this many requests with 503 and ``Retry-After: 0`` before accepting any.
    refuse: int = 0

    def drop_connections(self) -> None:
        """Close every open connection from the server's side, as a collector does with idle ones."""
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    yield from _serve(Collector())


@pytest.fixture
def proxy() -> Iterator[Collector]:
    yield from _serve(Collector())


def _serve(record: Collector) -> Iterator[Collector]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as collectors serve

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            record.targets.append(self.path)
            record.headers.append({k.lower(): v for k, v in self.headers.items()})
            if record.refuse > 0:
                record.refuse -= 1
                self.send_response(503)
                self.send_header("retry-after", "0")
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if self.path.endswith("/v1/logs"):
                logs = ExportLogsServiceRequest.FromString(body)
                record.items += [
                    x.body.string_value for r in logs.resource_logs for s in r.scope_logs for x in s.log_records
                ]
                reply = ExportLogsServiceResponse().SerializeToString()
            else:
                spans = ExportTraceServiceRequest.FromString(body)
                record.items += [x.name for r in spans.resource_spans for s in r.scope_spans for x in s.spans]
                reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, Any]:
            conn, address = super().get_request()
            record.connections.append(conn)
            return conn, address

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    record.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy_or_netrc(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The host's proxy and credential settings stay out, unless a test sets its own."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture(params=["spans", "logs"])
def signal(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _path(signal: str) -> str:
    return "/v1/traces" if signal == "spans" else "/v1/logs"


def _exporter(signal: str, collector: Collector, **options: Any) -> Any:
    exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    return exporter(endpoint=collector.url + _path(signal), **options)


def _items(signal: str, name: str) -> list[Any]:
    """One span named ``name``, or one log record with ``name`` as its body."""
    if signal == "spans":
        return [ReadableSpan(name=name, context=SpanContext(7, 8, False), resource=Resource({}), start_time=1)]
    return [ReadableLogRecord(LogRecord(timestamp=1, body=name), Resource({}))]


def _sent(exporter: Any, items: list[Any]) -> bool:
    return bool(exporter.export(items).name == "SUCCESS")


def test_exports_share_a_connection_and_go_on_after_the_collector_closes_it(signal: str, collector: Collector) -> None:
    exporter = _exporter(signal, collector, timeout=5)
    for name in ("one", "two", "three"):
        assert _sent(exporter, _items(signal, name))
    assert len(collector.connections) == 1  # kept alive, not a connection per export
    collector.drop_connections()
    assert _sent(exporter, _items(signal, "after the close"))
    assert collector.items == ["one", "two", "three", "after the close"]
    assert collector.targets == [_path(signal)] * 4
    assert collector.headers[0]["content-type"] == "application/x-protobuf"
    exporter.shutdown()


def test_a_collector_asking_to_retry_gets_the_items_again(signal: str, collector: Collector) -> None:
    collector.refuse = 2
    exporter = _exporter(signal, collector, timeout=10)
    assert _sent(exporter, _items(signal, "retried"))
    assert len(collector.targets) == 3 and collector.items == ["retried"]
    exporter.shutdown()


def test_gzip_compression_and_headers_from_the_environment_reach_the_collector(
    signal: str, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=blue")
    exporter = _exporter(signal, collector, timeout=5)
    assert _sent(exporter, _items(signal, "zipped"))
    assert collector.items == ["zipped"]
    assert collector.headers[0]["content-encoding"] == "gzip" and collector.headers[0]["x-tenant"] == "blue"
    exporter.shutdown()


def test_a_proxy_named_in_the_environment_carries_the_export(
    signal: str, collector: Collector, proxy: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    exporter = _exporter(signal, collector, timeout=5)
    assert _sent(exporter, _items(signal, "via the proxy"))
    assert proxy.targets == [collector.url + _path(signal)] and proxy.items == ["via the proxy"]
    assert collector.targets == []
    exporter.shutdown()


def test_a_host_the_environment_exempts_from_the_proxy_is_reached_directly(
    signal: str, collector: Collector, proxy: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    exporter = _exporter(signal, collector, timeout=5)
    assert _sent(exporter, _items(signal, "direct"))
    assert collector.items == ["direct"] and proxy.targets == []
    exporter.shutdown()


def test_netrc_credentials_for_the_collector_are_sent(
    signal: str, collector: Collector, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login otel password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    exporter = _exporter(signal, collector, timeout=5)
    assert _sent(exporter, _items(signal, "with credentials"))
    assert collector.headers[0]["authorization"] == "Basic b3RlbDpzM2NyZXQ="  # otel:s3cret
    exporter.shutdown()


#: What the flooding endpoint below offers as each answer's body: far more than an exporter should read.
FLOOD_BYTES = 256 * 1024 * 1024


@dataclass
class Flood:
    """What :func:`flooding_endpoint` sent: per request path, the bytes of each answer's body taken by the client."""

    url: str = ""
    taken: dict[str, list[int]] = field(default_factory=dict)


@contextmanager
def accepting(listener: socket.socket, serve: Callable[[socket.socket], None], scheme: str) -> Iterator[str]:
    """Each connection ``listener`` accepts served by ``serve`` in a thread of its own; yields the endpoint's URL and
    closes the listener when done."""

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"{scheme}://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@contextmanager
def raw_endpoint(answer: Callable[[socket.socket, str], bool]) -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 written on sockets, to answer as no HTTP server library would: each request on a
    connection is read whole and ``answer(conn, path)`` sends the answer, returning whether the connection goes on.
    Yields the endpoint's URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            while True:
                request = reader.readline().split()
                if len(request) < 2:
                    return
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reader.read(length)
                try:
                    if not answer(conn, request[1].decode()):
                        return
                except OSError:  # the client closed the connection
                    return

    with accepting(listener, serve, "http") as url:
        yield url


@contextmanager
def held_endpoint(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A :func:`raw_endpoint` that answers each connection once, with ``answer(conn, closing)``: ``closing`` is set
    as the endpoint closes, for an answer that holds its connection (or paces its bytes) until then."""
    closing = threading.Event()

    def once(conn: socket.socket, path: str) -> bool:
        answer(conn, closing)
        return False

    try:
        with raw_endpoint(once) as url:
            yield url
    finally:
        closing.set()


@contextmanager
def flooding_endpoint(
    size: int = FLOOD_BYTES, piece_bytes: int = 1 << 20, pause: float = 0.0, status: bytes = b"200 OK"
) -> Iterator[Flood]:
    """An HTTP endpoint on 127.0.0.1 that answers every request with ``status`` and a body of ``size`` bytes (as
    something else listening at a collector's address, or a broken proxy, may), sent in pieces ``pause`` seconds
    apart until the client closes. A redirect (3xx) names the same address as its location."""
    flood = Flood()
    piece = b"\0" * piece_bytes

    def answer(conn: socket.socket, path: str) -> bool:
        sent = flood.taken.setdefault(path, [])
        sent.append(0)
        conn.sendall(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/x-protobuf\r\n")
        if status.startswith(b"3"):
            conn.sendall(b"location: " + path.encode() + b"\r\n")
        conn.sendall(f"content-length: {size}\r\n\r\n".encode())
        for _ in range(size // len(piece)):
            conn.sendall(piece)
            sent[-1] += len(piece)
            time.sleep(pause)
        return True

    with raw_endpoint(answer) as flood.url:
        yield flood


def test_an_endpoint_answering_with_an_endless_body_is_read_no_further_than_an_answer_needs() -> None:
    """Each signal's exporter reads a bounded part of an answer and leaves the rest: the SDK's transports read a
    whole body into the serving process, and an endpoint answering with gigabytes grew the app by gigabytes. The
    service answers throughout, and every signal goes on exporting (a second export of each reaches the endpoint)."""
    with flooding_endpoint() as flood:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": flood.url,
            "OTEL_LOGS_EXPORTER": "otlp",
            "LLM_TELEMETRY_METRICS_EXPORTER": "otlp",
            "OTEL_METRIC_EXPORT_INTERVAL": "100",
            "OTEL_BSP_SCHEDULE_DELAY": "20",
            "OTEL_BLRP_SCHEDULE_DELAY": "20",
        }
        with demo_server(env) as (_, base):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="test", max_retries=0, timeout=30)
            paths = ("/v1/traces", "/v1/logs", "/v1/metrics")

            hello = [{"role": "user", "content": "hi"}]

            def exported_twice() -> bool:
                reply = client.chat.completions.create(model="gpt-4o-mini", messages=hello)
                assert reply.choices[0].message.content
                return all(len(flood.taken.get(path, ())) >= 2 for path in paths)

            wait_for("two exports of each signal", exported_twice, seconds=60)
        for path in paths:
            # The first answer is over: the exporter sent again. What it took of it is its read and the socket
            # buffers' few MiB, not the body.
            assert flood.taken[path][0] < FLOOD_BYTES // 8, (path, flood.taken[path])


@pytest.mark.parametrize("status", [b"307 Temporary Redirect", b"301 Moved Permanently"])
def test_a_redirect_with_an_endless_body_is_read_no_further_through_requests(signal: str, status: bytes) -> None:
    """A redirect answer (the exporters follow none) through the ``requests`` transport (a session given; also
    https, a proxy, credentials): ``requests`` reads a redirect's whole body itself, before the caller sees it and
    whether or not it streams, so an endpoint redirecting with gigabytes grew the app by all of them. Its body is
    bounded like any other answer's, and the export is what the SDK makes of a 3xx: delivered."""
    with flooding_endpoint(status=status) as flood:
        exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
        session, hooked = requests.Session(), []
        session.hooks["response"].append(lambda response, **_: hooked.append(response.status_code))
        sender = exporter(endpoint=flood.url + _path(signal), session=session, timeout=30)
        assert _sent(sender, _items(signal, "redirected"))
        assert _sent(sender, _items(signal, "redirected again"))
        sender.shutdown()
    assert hooked == [int(status.split()[0])] * 2  # the session's own response hooks still run
    taken = flood.taken[_path(signal)]
    assert len(taken) == 2
    assert taken[0] < FLOOD_BYTES // 8, taken


def test_an_answer_trickling_in_ends_the_export_at_its_timeout(signal: str) -> None:
    """The exporter's timeout bounds the whole answer: the SDK's transports time each read, so a body that comes a
    byte at a time (here 1,000 bytes, 0.2 s apart) held the export thread for as long as it took, while spans and
    records queued up and were dropped."""
    with flooding_endpoint(size=1000, piece_bytes=1, pause=0.2) as endpoint:
        exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
        sender = exporter(endpoint=endpoint.url + _path(signal), timeout=1)
        results: list[bool] = []
        thread = threading.Thread(target=lambda: results.append(_sent(sender, _items(signal, "slow"))), daemon=True)
        thread.start()
        thread.join(timeout=60)  # the body alone takes 200 s to come
        assert results == [True]  # a 200 answer is an export delivered, whatever its body


@dataclass
class Breaking:
    """What :func:`breaking_endpoint` answered."""

    url: str = ""
    #: The requests it received (every one answered with a broken body).
    requests: int = 0


@contextmanager
def breaking_endpoint() -> Iterator[Breaking]:
    """An HTTP endpoint on 127.0.0.1 whose every answer breaks in its body: 200 and a content-length of 100, then
    3 bytes and the connection closed."""
    breaking = Breaking()

    def answer(conn: socket.socket, path: str) -> bool:
        breaking.requests += 1
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 100\r\n\r\nabc")
        return False

    with raw_endpoint(answer) as breaking.url:
        yield breaking


def _export_error_types(exporter_class: type[Any], signal: str, endpoint: str, **options: Any) -> set[str]:
    """The ``error.type`` values of the exporter's own SDK metric after one export of one item to ``endpoint``."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    exporter = exporter_class(endpoint=endpoint + _path(signal), timeout=2, meter_provider=provider, **options)
    assert not _sent(exporter, _items(signal, "broken"))
    exporter.shutdown()
    data = reader.get_metrics_data()
    assert data is not None
    return {
        str(point.attributes["error.type"])
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if point.attributes and "error.type" in point.attributes
    }


def _transport_options(transport: str) -> dict[str, Any]:
    """The exporter arguments of each way to send: the default (``requests``, for which ours sends through urllib3
    to a plain-http collector), a session given, or the SDK's urllib3 transport given."""
    if transport == "session-given":
        return {"session": requests.Session()}
    if transport == "urllib3-given":
        return {"_transport": Urllib3HTTPTransport()}
    return {}


@pytest.mark.parametrize("transport", ["plain-http", "session-given", "urllib3-given"])
def test_an_answer_breaking_in_its_body_fails_the_export_as_the_sdk_exporter_fails_it(
    signal: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer cut off in its body fails the export as the SDK's own exporter, sending the same way, fails it:
    with the same error (the SDK decides on a retry by the error's type and names it in its export metric), and as
    often. To a plain-http collector ours sends through urllib3 where the SDK's exporter sends through ``requests``,
    which fails such an answer once, with a ``requests`` error: ours did too, not the five more times (the batch
    sent again to a collector that had answered 200) the SDK's urllib3 transport makes of urllib3's error."""
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")  # the exporters' own metrics
    ours = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    sdks = SDKSpanExporter if signal == "spans" else SDKLogExporter
    with breaking_endpoint() as reference, breaking_endpoint() as endpoint:
        expected = _export_error_types(sdks, signal, reference.url, **_transport_options(transport))
        assert len(expected) == 1  # the SDK exporter's, as the reference
        assert _export_error_types(ours, signal, endpoint.url, **_transport_options(transport)) == expected
    if transport == "urllib3-given":  # the SDK client retries urllib3's error: at once, then after a backoff
        assert reference.requests > 1 and endpoint.requests > 1
    else:
        assert reference.requests == endpoint.requests == 1


class _AnsweringAdapter(requests.adapters.BaseAdapter):
    """A ``requests`` transport adapter of a session's own (as sessions mount for other schemes, sockets or test
    doubles) answering each request with 200 and a body from memory, not through urllib3; it keeps the bodies sent."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        assert isinstance(request.body, bytes)
        self.bodies.append(request.body)
        response = requests.Response()
        response.status_code, response.reason, response.url, response.request = 200, "OK", str(request.url), request
        response.headers["content-type"] = "application/x-protobuf"
        response.raw = io.BytesIO(b"")
        return response

    def close(self) -> None:
        pass


def test_a_session_answering_through_an_adapter_of_its_own_exports(signal: str) -> None:
    """A session given to the exporter may mount an adapter that answers otherwise than through urllib3: its
    answer is read as ``requests`` reads it, and the export is delivered, as with the SDK's exporter (reading the
    answer as urllib3's failed every such export)."""
    adapter = _AnsweringAdapter()
    session = requests.Session()
    session.mount("http://", adapter)
    exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    sender = exporter(endpoint="http://collector.invalid:4318" + _path(signal), session=session, timeout=5)
    assert _sent(sender, _items(signal, "through the adapter"))
    assert len(adapter.bodies) == 1
    if signal == "spans":
        assert [
            s.name
            for r in ExportTraceServiceRequest.FromString(adapter.bodies[0]).resource_spans
            for sc in r.scope_spans
            for s in sc.spans
        ] == ["through the adapter"]
    else:
        logs = ExportLogsServiceRequest.FromString(adapter.bodies[0])
        assert [x.body.string_value for r in logs.resource_logs for sc in r.scope_logs for x in sc.log_records] == [
            "through the adapter"
        ]
    sender.shutdown()


@contextmanager
def stalling_endpoint() -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 whose every answer stops in its body: 200, a content-length of 100 and 10 bytes
    of it at once, then nothing more while the connection stays open (until the endpoint is closed)."""

    def answer(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 100\r\n\r\n")
        conn.sendall(b"0123456789")
        done.wait(120)

    with held_endpoint(answer) as url:
        yield url


@pytest.mark.parametrize("transport", ["plain-http", "session-given"])
def test_an_answer_whose_body_stops_coming_is_delivered_at_the_timeout(signal: str, transport: str) -> None:
    """The timeout ends a read under way as it ends the reading between two reads: a 200 whose body stops coming
    is a delivered export once the time is up, as a body still trickling in is. Before, the read under way waited
    out the transport's own read timeout (up to the whole timeout again after a body that trickled in until just
    before the deadline) and failed the export with it."""
    exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    with stalling_endpoint() as url:
        sender = exporter(endpoint=url + _path(signal), timeout=1, **_transport_options(transport))
        assert _sent(sender, _items(signal, "stalled"))
        sender.shutdown()


def test_a_metric_answer_whose_body_stops_coming_is_delivered_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The metric exporter (the SDK's, through its ``requests`` transport, with the bounded reading) alike."""
    with stalling_endpoint() as url:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", url + "/v1/metrics")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1")
        exporter = _otlp_metric_exporter("http/protobuf")
        assert exporter.export(MetricsData(resource_metrics=[])) == MetricExportResult.SUCCESS
        exporter.shutdown()


@contextmanager
def encoded_trickling_endpoint() -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 whose every answer is 200 with a gzip body (content-length 1000) that comes as
    bytes decoding to nothing: a gzip header naming a file, then the name a byte every 0.2 s, 20 of them, and the
    connection closed short of the body."""

    def answer(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-encoding: gzip\r\n"
            b"content-length: 1000\r\n\r\n"
        )
        conn.sendall(bytes([0x1F, 0x8B, 8, 8, 0, 0, 0, 0, 0, 3]))  # the flags name a file: its name follows
        for _ in range(20):
            if done.wait(0.2):
                break
            conn.sendall(b"a")

    with held_endpoint(answer) as url:
        yield url


@pytest.mark.parametrize("transport", ["plain-http", "session-given"])
def test_an_encoded_answer_whose_bytes_decode_to_nothing_is_delivered_at_the_timeout(
    signal: str, transport: str
) -> None:
    """An encoded body is bounded by the timeout as a plain one is. Decoding as it read, urllib3 read on, each socket
    read with the time left when the read began, until the decoder gave something: bytes that decode to nothing
    (a gzip header's file name) held the export for as long as they came (here 4 s against a 1 s timeout), and
    the connection closing short of the body then failed it. A 200 is a delivered export once the time is up."""
    exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    with encoded_trickling_endpoint() as url:
        sender = exporter(endpoint=url + _path(signal), timeout=1, **_transport_options(transport))
        assert _sent(sender, _items(signal, "encoded"))
        sender.shutdown()


#: Heads of answers that end their connection: ``Connection: close`` with a content-length, and HTTP/1.0 whose body
#: ends where the connection does.
CLOSING_HEADS = {
    "connection-close": b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 100\r\n\r\n",
    "http-1.0": b"HTTP/1.0 200 OK\r\ncontent-type: application/x-protobuf\r\n\r\n",
}


@contextmanager
def closing_stalling_endpoint(head: bytes) -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 whose every answer ends its connection (``head``, one of
    :data:`CLOSING_HEADS`) and stops in its body: 10 bytes of it, then nothing more (until the endpoint is closed)."""

    def answer(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(head + b"0123456789")
        done.wait(120)

    with held_endpoint(answer) as url:
        yield url


@pytest.mark.parametrize("transport", ["plain-http", "session-given"])
@pytest.mark.parametrize("closing", sorted(CLOSING_HEADS))
def test_an_answer_that_ends_its_connection_and_stops_coming_is_delivered_at_the_timeout(
    signal: str, transport: str, closing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer that ends its connection (``Connection: close``, HTTP/1.0) is timed as one that keeps it: a 200
    whose body stops coming is a delivered export once the time is up. ``http.client`` hands such a connection's
    socket over to the answer, and the connection no longer names it: the read under way waited out the transport's
    own read timeout (with a 2 s timeout, a body that stopped at 1.8 s held the export 3.8 s) and failed the export,
    as the SDK's exporter still does (the reference here)."""
    ours = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    sdks = SDKSpanExporter if signal == "spans" else SDKLogExporter
    # The SDK exporter's logger drops a line that repeats the one before it (its DuplicateFilter): a line before
    # its export lets that one's through.
    sdk_logger = logging.getLogger(sdks.__module__)
    with closing_stalling_endpoint(CLOSING_HEADS[closing]) as url:
        sender = sdks(endpoint=url + _path(signal), timeout=1, **_transport_options(transport))
        with caplog.at_level(logging.ERROR):
            sdk_logger.error("exporting through the SDK's exporter")
            assert not _sent(sender, _items(signal, "timed out"))
        assert "due to timeout" in caplog.records[-1].getMessage()
        sender.shutdown()
        sender = ours(endpoint=url + _path(signal), timeout=1, **_transport_options(transport))
        assert _sent(sender, _items(signal, "delivered"))
        sender.shutdown()


@pytest.fixture
def certificate(tmp_path: pathlib.Path) -> pathlib.Path:
    """A self-signed certificate for 127.0.0.1 (``cert.pem``, its key ``key.pem`` beside it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH: cannot make the test's certificate")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    return tmp_path / "cert.pem"


def _whole_request(received: bytes) -> bool:
    """Whether ``received`` holds a whole HTTP request: its head, and as much body as its content-length says."""
    head, found, body = received.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    return bool(found) and len(body) >= int(fields.get(b"content-length", b"0"))


@contextmanager
def tls_stalling_endpoint(head: bytes, certificate: pathlib.Path) -> Iterator[str]:
    """An HTTPS endpoint on 127.0.0.1 whose every answer is ``head`` in one TLS record, then 10 bytes of its body in
    a record of which only the first half is sent: the client's read waits in the middle of a TLS record, until
    the endpoint is closed. TLS is done in memory (``ssl.MemoryBIO``), so the records can be cut."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, certificate.parent / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    closing = threading.Event()

    def serve(conn: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)

        def step(operation: Callable[[], Any]) -> Any:
            """``operation`` on the TLS object, fed from the socket until it has what it needs."""
            while True:
                try:
                    return operation()
                except ssl.SSLWantReadError:
                    conn.sendall(outgoing.read())
                    data = conn.recv(65536)
                    if not data:
                        raise ConnectionResetError from None
                    incoming.write(data)

        with conn:
            try:
                step(tls.do_handshake)
                request = b""
                while not _whole_request(request):
                    request += step(lambda: tls.read(65536))
                tls.write(head)
                conn.sendall(outgoing.read())
                tls.write(b"0123456789")
                record = outgoing.read()
                conn.sendall(record[: len(record) // 2])
                closing.wait(120)
            except (OSError, ssl.SSLError):  # the client closed the connection
                return

    try:
        with accepting(listener, serve, "https") as url:
            yield url
    finally:
        closing.set()


@pytest.mark.parametrize("transport", ["default", "session-given"])
@pytest.mark.parametrize("closing", ["keep-alive", *sorted(CLOSING_HEADS)])
def test_an_https_answer_stopping_in_a_tls_record_is_delivered_at_the_timeout(
    signal: str, transport: str, closing: str, certificate: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over https the socket read from is TLS (an ``ssl.SSLSocket``, under ``http.client``'s file for an answer
    that ends its connection): a body that stops in the middle of a TLS record is cut at the deadline as over plain
    http, and the 200 is a delivered export, for an answer that keeps its connection and for one that ends it
    (found only through ``http.client``'s file); the SDK's exporter waits out its read timeout and fails."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # they override the session's CA file in requests
        monkeypatch.delenv(name, raising=False)
    head = CLOSING_HEADS.get(closing, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
    ours = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    sdks = SDKSpanExporter if signal == "spans" else SDKLogExporter
    options = {"certificate_file": str(certificate), **_transport_options(transport)}
    with tls_stalling_endpoint(head, certificate) as url:
        sender = sdks(endpoint=url + _path(signal), timeout=1, **options)
        assert not _sent(sender, _items(signal, "timed out"))  # the reference: the endpoint answered and stalled
        sender.shutdown()
        options = {"certificate_file": str(certificate), **_transport_options(transport)}
        sender = ours(endpoint=url + _path(signal), timeout=1, **options)
        assert _sent(sender, _items(signal, "delivered"))
        sender.shutdown()


@contextmanager
def failing_before_the_answer(kind: str) -> Iterator[str]:
    """An address at which a request gets no answer: ``refused`` (nothing listens there), ``silent`` (an endpoint
    that reads the request and sends nothing, until the test ends) or ``closing`` (one that closes the connection
    without answering)."""
    if kind == "refused":
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        return

    def answer(conn: socket.socket, done: threading.Event) -> None:
        if kind == "silent":
            done.wait(120)

    with held_endpoint(answer) as url:
        yield url


@pytest.mark.parametrize("kind", ["refused", "silent", "closing"])
def test_a_request_that_gets_no_answer_fails_as_the_sdk_default_fails_it(
    signal: str, kind: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """To a plain-http collector ours sends through urllib3 where the SDK's exporter sends through ``requests``:
    a request that gets no answer fails with the error ``requests`` reports (the SDK's export metric names its type as
    ``error.type``) and as that transport's retry rule judges it. urllib3's own errors were reported: ``MaxRetryError``
    and ``ProtocolError`` where the default says ``ConnectionError``, and a read timeout waiting for the headers as
    ``ReadTimeoutError``, which the urllib3 transport's rule takes for no connection error (the export failed as
    for an error not worth retrying, where the default's ``ReadTimeout`` is one it retries while time is left)."""
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")  # the exporters' own metrics
    ours = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    sdks = SDKSpanExporter if signal == "spans" else SDKLogExporter
    sdk_logger = logging.getLogger(sdks.__module__)  # its DuplicateFilter: see the test above
    failures: dict[str, list[str]] = {}
    types: dict[str, set[str]] = {}
    with failing_before_the_answer(kind) as url:
        for name, exporter in (("sdk", sdks), ("ours", ours)):
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                sdk_logger.error("exporting through %s", name)
                types[name] = _export_error_types(exporter, signal, url)
            failures[name] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Failed to export")]
    assert len(types["sdk"]) == 1 and failures["sdk"]  # the SDK exporter's, as the reference
    assert types["ours"] == types["sdk"]
    assert failures["ours"] == failures["sdk"]


def _gzip_of_zeros(size: int) -> bytes:
    """A gzip member of ``size`` zero bytes, compressed piece by piece (about a thousandth of the size)."""
    compressor, zeros = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 24)
    return b"".join([*(compressor.compress(zeros) for _ in range(size // len(zeros))), compressor.flush()])


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip"])
def test_an_encoded_answer_that_decodes_to_far_more_is_decoded_no_further_than_an_answer_needs(
    signal: str, encoding: str
) -> None:
    """A 200 whose small encoded body decodes to hundreds of MiB (a decompression bomb; here 64 KiB of gzip that is
    64 MiB of zeros, and 0.5 KiB of gzip of gzip that is 256 MiB of them) is decoded no further than the 64 KiB an
    answer is read to, in memory too (the SDK's exporter reads and decodes all of it)."""
    body = _gzip_of_zeros(64 << 20) if encoding == "gzip" else gzip.compress(_gzip_of_zeros(256 << 20), 9)
    peak = _delivered_peak(signal, body, encoding)
    assert peak < 16 << 20, peak


def _delivered_peak(signal: str, body: bytes, encoding: str) -> int:
    """The traced peak of memory while an export is sent to an endpoint answering 200 with ``body`` as ``encoding``;
    the export must be delivered."""
    with answering_with(body, encoding) as url:
        exporter = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
        sender = exporter(endpoint=url + _path(signal), timeout=30)
        tracemalloc.start()
        try:
            assert _sent(sender, _items(signal, "bombed"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        sender.shutdown()
    return peak


def _brotli_of_zeros(size: int) -> bytes:
    """Brotli of ``size`` zero bytes, compressed piece by piece (a few hundred bytes for 256 MiB)."""
    compressor, zeros = brotli.Compressor(quality=5), bytes(1 << 24)
    return b"".join([*(compressor.process(zeros) for _ in range(size // len(zeros))), compressor.finish()])


@contextmanager
def answering_with(body: bytes, encoding: str) -> Iterator[str]:
    """A :func:`raw_endpoint` answering every request with 200 and ``body`` as ``encoding`` (``Content-Encoding``)."""

    def answer(conn: socket.socket, path: str) -> bool:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-encoding: "
            + encoding.encode()
            + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return True

    with raw_endpoint(answer) as url:
        yield url


class _BrotliBefore12:
    """The ``brotli`` module as urllib3 finds it before Brotli 1.2: the installed one's decoding, through a
    ``Decompressor`` whose ``process`` takes no output limit (``output_buffer_limit`` came in 1.2)."""

    error = brotli.error

    class Decompressor:
        def __init__(self) -> None:
            self._decompressor = brotli.Decompressor()

        def process(self, data: bytes) -> bytes:
            return bytes(self._decompressor.process(data))

        def is_finished(self) -> bool:
            return bool(self._decompressor.is_finished())


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.DependencyWarning")
@pytest.mark.parametrize("encoding", ["br", "br, gzip"])
def test_a_br_answer_is_not_decoded_whole_with_a_brotli_that_cannot_bound_its_output(
    signal: str, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """urllib3 bounds a ``br`` read only with Brotli 1.2 or later; with an older one (an app may pin one) it warns
    and decodes each read whole: 405 bytes of ``br`` that are 256 MiB of zeros took 557 MiB at the export's peak.
    Such an answer is left as sent (64 KiB at most), and a 200 is a delivered export."""
    from llm_telemetry.otlp_spans import _brotli_bounded

    _brotli_bounded.cache_clear()  # what this process found of the installed brotli
    monkeypatch.setattr(urllib3.response, "brotli", _BrotliBefore12)
    body = _brotli_of_zeros(256 << 20)
    if encoding == "br, gzip":
        body = gzip.compress(body)
    try:
        peak = _delivered_peak(signal, body, encoding)
    finally:
        monkeypatch.undo()
        _brotli_bounded.cache_clear()
    assert peak < 16 << 20, peak


def test_a_br_answer_that_does_not_decode_fails_the_export_as_the_sdk_exporter_fails_it(signal: str) -> None:
    """With the Brotli the tests install (1.2 or later, whose output urllib3 bounds) a ``br`` answer is decoded, as
    the SDK's transports decode it: one that is not brotli fails the export, ours and the SDK's alike."""
    ours = OTLPSpanExporter if signal == "spans" else OTLPLogExporter
    sdks = SDKSpanExporter if signal == "spans" else SDKLogExporter
    with answering_with(b"\x8b\x03\x80not really brotli\x03", "br") as url:
        for exporter in (sdks, ours):
            sender = exporter(endpoint=url + _path(signal), timeout=5)
            assert not _sent(sender, _items(signal, "undecodable"))
            sender.shutdown()


def test_one_exporter_used_from_two_threads_delivers_every_export(signal: str) -> None:
    """Two threads exporting through one exporter (a SimpleSpanProcessor exports from each thread that ends a span)
    share its connection pool: the connection one export's answer frees goes to the next export, maybe the other
    thread's, while the first is still finishing its reading. Its socket is no longer the first one's to time: a
    timeout set on it then failed an export with EBADF (the other thread had closed it), 3 in 6,300."""
    received: list[int] = []
    reply = b"an answer"  # a body, read in the reading's loop (an empty one ends before it)

    def answer(conn: socket.socket, path: str) -> bool:
        received.append(1)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: %d\r\n\r\n%s"
            % (len(reply), reply)
        )
        return True

    failed: list[str] = []
    with raw_endpoint(answer) as url:
        exporter = (OTLPSpanExporter if signal == "spans" else OTLPLogExporter)(endpoint=url + _path(signal), timeout=5)

        def export(name: str, times: int) -> None:
            for _ in range(times):
                if not _sent(exporter, _items(signal, name)):
                    failed.append(name)

        threads = [threading.Thread(target=export, args=(name, times)) for name, times in (("one", 300), ("two", 6000))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        exporter.shutdown()
    assert failed == []
    assert len(received) == 6300
