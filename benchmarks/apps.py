"""The benchmark variants: the same demo LLM service, wrapped (or not) in each kind of telemetry.

Each variant is built inside its own server process by :func:`from_env`, which uvicorn calls as an app
factory, so one variant's globals (the OpenTelemetry providers, prometheus_client's default registry) never
leak into another's. The parent tells the server which variant to build through environment variables:

- ``BENCH_VARIANT``: a key of :data:`VARIANTS`;
- ``BENCH_METRICS_PORT``: a free port for variants that serve Prometheus on a port of their own;
- ``BENCH_OTLP_ENDPOINT``: the local OTLP/HTTP sink (``http://127.0.0.1:<port>``) for variants that export spans
  or log records.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from llm_telemetry.demo.app import bare_app, create_app

BENCH_VARIANT = "BENCH_VARIANT"
BENCH_METRICS_PORT = "BENCH_METRICS_PORT"
BENCH_OTLP_ENDPOINT = "BENCH_OTLP_ENDPOINT"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of serving the demo service.

    Args:
        key: short name used on the command line and in tables.
        title: what the row shows.
        build: makes the ASGI app inside the server process.
        missing: returns why the variant cannot run here (a feature not merged yet), or None.
        traces: exports spans to the OTLP sink.
        logs: exports request-log records to the OTLP sink.
        llm_metrics: serves our LLM metric contract on ``BENCH_METRICS_PORT`` (checked after the run).
        optional: run only when asked for by name (``--variants``), not in a default run.
    """

    key: str
    title: str
    build: Callable[[], Any]
    missing: Callable[[], str | None] = lambda: None
    traces: bool = False
    logs: bool = False
    llm_metrics: bool = False
    optional: bool = False


def _metrics_port() -> int:
    return int(os.environ.get(BENCH_METRICS_PORT, "0"))


def _otlp_endpoint() -> str:
    return os.environ.get(BENCH_OTLP_ENDPOINT, "http://127.0.0.1:4318")


def _bare() -> Any:
    return bare_app()


def _ours() -> Any:
    # Metrics only: request logs off, so the row measures the metric path alone.
    return create_app(metrics_port=_metrics_port(), metrics_host="127.0.0.1", request_logs=False)


def _ours_logs() -> Any:
    # Metrics plus the JSON request-log line (to the server's stdout), to price the line itself.
    return create_app(metrics_port=_metrics_port(), metrics_host="127.0.0.1", request_logs=True)


def _ours_otlp_logs() -> Any:
    # Metrics plus the request-log line to stdout and, as the operator configures injected workloads, over OTLP
    # (OTEL_LOGS_EXPORTER=otlp). Only the logs endpoint is set: a general OTLP endpoint would turn tracing on too.
    os.environ["OTEL_LOGS_EXPORTER"] = "otlp"
    os.environ["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] = _otlp_endpoint() + "/v1/logs"
    os.environ["OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"] = "http/protobuf"
    return create_app(metrics_port=_metrics_port(), metrics_host="127.0.0.1", request_logs=True)


def _ours_tracing() -> Any:
    # Our tracing reads the standard OTEL_* variables, as a user would set them; every request is sampled.
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = _otlp_endpoint()
    os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
    return create_app(metrics_port=_metrics_port(), metrics_host="127.0.0.1", request_logs=False)


def _otel_asgi() -> Any:
    """opentelemetry-instrumentation-asgi with its defaults, an SDK tracer exporting to the sink, and its
    HTTP server metrics on a Prometheus reader (what a user of it would deploy)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from prometheus_client import start_http_server

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_otlp_endpoint() + "/v1/traces")))
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    if _metrics_port():
        start_http_server(_metrics_port(), "127.0.0.1")
    return OpenTelemetryMiddleware(bare_app(), tracer_provider=tracer_provider, meter_provider=meter_provider)


def _instrumentator() -> Any:
    """prometheus-fastapi-instrumentator's defaults on the demo's Starlette app, /metrics on the app port."""
    from prometheus_fastapi_instrumentator import Instrumentator

    app = bare_app()
    Instrumentator().instrument(app).expose(app)
    return app


def _instrumentator_missing() -> str | None:
    try:
        import prometheus_fastapi_instrumentator  # noqa: F401
    except ImportError:
        return "prometheus-fastapi-instrumentator is not installed"
    return None


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("bare", "bare demo app", _bare),
        Variant("ours", "llm-telemetry, metrics only", _ours, llm_metrics=True),
        Variant("ours+logs", "llm-telemetry, metrics + JSON request logs", _ours_logs, llm_metrics=True, optional=True),
        Variant(
            "ours+otlplogs",
            "llm-telemetry, metrics + JSON request logs to stdout and OTLP",
            _ours_otlp_logs,
            logs=True,
            llm_metrics=True,
            optional=True,
        ),
        Variant(
            "ours+traces",
            "llm-telemetry, metrics + traces to OTLP sink",
            _ours_tracing,
            traces=True,
            llm_metrics=True,
        ),
        Variant("otel-asgi", "opentelemetry-instrumentation-asgi", _otel_asgi, traces=True),
        Variant(
            "instrumentator", "prometheus-fastapi-instrumentator", _instrumentator, missing=_instrumentator_missing
        ),
    )
}


def from_env() -> Any:
    """uvicorn app factory: build the variant named by ``BENCH_VARIANT``."""
    return VARIANTS[os.environ[BENCH_VARIANT]].build()
