"""A real OTLP receiver for the tests: gRPC TraceService/LogsService/MetricsService and HTTP ``/v1/traces``,
``/v1/logs`` and ``/v1/metrics``.

Both listen on 127.0.0.1 (random ports) and decode the real protobuf the OpenTelemetry exporters send, so
a test sees exactly what a collector, Jaeger or Loki would receive.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind is None:
        return None
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass
class Span:
    """One received span, ids as lower-case hex like the W3C ``traceparent`` header."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    events: list[tuple[str, dict[str, Any], int]]
    start_ns: int
    end_ns: int
    resource: dict[str, Any]
    scope: str
    protocol: str

    @property
    def is_error(self) -> bool:
        return self.status_code == 2  # STATUS_CODE_ERROR


@dataclass
class LogRecord:
    body: Any
    severity_text: str
    attributes: dict[str, Any]
    trace_id: str
    span_id: str
    resource: dict[str, Any]
    protocol: str


@dataclass
class MetricPoint:
    """One received sum or histogram point (a histogram's value is its count)."""

    name: str
    kind: str  # "sum" or "histogram"
    #: 1 delta, 2 cumulative (the proto's AggregationTemporality).
    temporality: int
    start_ns: int
    time_ns: int
    value: float
    attributes: dict[str, Any]
    #: The export request that carried it, counted from 0.
    export: int
    #: The resource's attributes (``service.name`` and the like).
    resource: dict[str, Any] = field(default_factory=dict)


@dataclass
class OTLPReceiver:
    """What arrived, by either protocol; use :meth:`wait_for` rather than reading the lists straight away."""

    spans: list[Span] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    metrics: list[MetricPoint] = field(default_factory=list)
    #: Metric export requests received.
    metric_exports: int = 0
    #: Request metadata (gRPC) or headers (HTTP) of every export call, lower-cased keys.
    headers: list[dict[str, str]] = field(default_factory=list)
    grpc_endpoint: str = ""
    http_endpoint: str = ""
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes=_attributes(s.attributes),
                            status_code=s.status.code,
                            status_message=s.status.message,
                            events=[(e.name, _attributes(e.attributes), e.time_unix_nano) for e in s.events],
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            resource=resource,
                            scope=scope_spans.scope.name,
                            protocol=protocol,
                        )
                    )
        with self._lock:
            self.spans.extend(spans)
            self._lock.notify_all()

    def add_logs(self, request: logs_service_pb2.ExportLogsServiceRequest, protocol: str) -> None:
        records = []
        for resource_logs in request.resource_logs:
            resource = _attributes(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for r in scope_logs.log_records:
                    records.append(
                        LogRecord(
                            body=_value(r.body),
                            severity_text=r.severity_text,
                            attributes=_attributes(r.attributes),
                            trace_id=r.trace_id.hex(),
                            span_id=r.span_id.hex(),
                            resource=resource,
                            protocol=protocol,
                        )
                    )
        with self._lock:
            self.logs.extend(records)
            self._lock.notify_all()

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        points = []
        with self._lock:
            export = self.metric_exports
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for m in scope_metrics.metrics:
                    kind = m.WhichOneof("data")
                    if kind not in ("sum", "histogram"):
                        continue
                    data = getattr(m, kind)
                    for p in data.data_points:
                        value = p.count if kind == "histogram" else getattr(p, p.WhichOneof("value"))
                        points.append(
                            MetricPoint(
                                name=m.name,
                                kind=kind,
                                temporality=data.aggregation_temporality,
                                start_ns=p.start_time_unix_nano,
                                time_ns=p.time_unix_nano,
                                value=value,
                                attributes=_attributes(p.attributes),
                                export=export,
                                resource=resource,
                            )
                        )
        with self._lock:
            self.metrics.extend(points)
            self.metric_exports += 1
            self._lock.notify_all()

    def add_headers(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.headers.append(headers)

    def wait_for(self, predicate: Callable[[OTLPReceiver], bool], timeout: float = 15.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on each arrival) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    def spans_named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_headers({k.lower(): v for k, v in context.invocation_metadata()})
        self.receiver.add_traces(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_headers({k.lower(): v for k, v in context.invocation_metadata()})
        self.receiver.add_logs(request, "grpc")
        return logs_service_pb2.ExportLogsServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add_headers({k.lower(): v for k, v in context.invocation_metadata()})
        self.receiver.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _http_handler(receiver: OTLPReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            receiver.add_headers({k.lower(): v for k, v in self.headers.items()})
            if self.path == "/v1/traces":
                receiver.add_traces(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/logs":
                receiver.add_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body), "http")
                reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                receiver.add_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """Start both receivers; yield the :class:`OTLPReceiver` with ``grpc_endpoint`` and ``http_endpoint`` set."""
    receiver = OTLPReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(receiver), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(receiver), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(receiver))
    http.daemon_threads = True
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    receiver.grpc_endpoint = f"http://127.0.0.1:{grpc_port}"
    receiver.http_endpoint = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        yield receiver
    finally:
        http.shutdown()
        http.server_close()
        thread.join(timeout=5)
        server.stop(grace=None).wait(5)


def grpc_deliveries(exporters: tuple[Any, ...], items: list[Any], kind: str, encode: Callable[[Any], Any]) -> list[Any]:
    """Export ``items`` with each gRPC exporter class in turn to a receiver of its own (nothing another test sends
    arrives in between); the ``kind`` (``spans`` or ``logs``) each delivered. Each exporter's request must equal
    ``encode(items)``, the SDK encoder's, and its export succeed."""
    delivered = []
    with otlp_receiver() as receiver:
        for exporter_class in exporters:
            exporter = exporter_class(endpoint=receiver.grpc_endpoint, insecure=True, headers={"x-token": "g1"})
            assert exporter._translate_data(items) == encode(items)
            before = len(getattr(receiver, kind))
            assert exporter.export(items).name == "SUCCESS"
            assert receiver.wait_for(lambda r, before=before: len(getattr(r, kind)) >= before + len(items))
            delivered.append(getattr(receiver, kind)[before : before + len(items)])
            exporter.shutdown()
        assert all(h.get("x-token") == "g1" for h in receiver.headers)
    return delivered


# --- a traced demo server ----------------------------------------------------------------------------


@contextmanager
def isolated_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` as the only OTEL_* and LLM_TELEMETRY_* variables, so the host environment cannot leak in."""
    with mock.patch.dict(os.environ, env):
        for var in list(os.environ):
            if var.startswith(("OTEL_", "LLM_TELEMETRY_")) and var not in env:
                del os.environ[var]
        yield


def tracing_env(receiver: OTLPReceiver, protocol: str = "http/protobuf", **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_SERVICE_NAME": "llm-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=secret123",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        **extra,
    }


@contextmanager
def demo_server(env: dict[str, str], **options: Any) -> Iterator[tuple[Any, str]]:
    """The demo LLM with the middleware, built under ``env`` (only), served by uvicorn; yields (app, base URL)."""
    from support import serve

    options.setdefault("metrics_port", 0)
    with isolated_env(env):
        from llm_telemetry.demo.app import create_app

        app = create_app(token_delay=options.pop("token_delay", 0.0), **options)
        app.telemetry  # noqa: B018 - build the providers now, while the environment is in place
    try:
        with serve(app) as base:
            yield app, base
    finally:
        app.telemetry.shutdown()


def wait_span(receiver: OTLPReceiver, **attributes: Any) -> Span:
    """The first received LLM span whose attributes include ``attributes``."""

    def find(r: OTLPReceiver) -> Span | None:
        for span in r.spans:
            if span.scope == "llm_telemetry" and all(span.attributes.get(k) == v for k, v in attributes.items()):
                return span
        return None

    assert receiver.wait_for(lambda r: find(r) is not None), f"no LLM span with {attributes}: {receiver.spans}"
    span = find(receiver)
    assert span is not None
    return span


def parent_of(receiver: OTLPReceiver, span: Span) -> Span:
    assert receiver.wait_for(lambda r: any(s.span_id == span.parent_span_id for s in r.spans))
    return next(s for s in receiver.spans if s.span_id == span.parent_span_id)
