"""The SDK's OTLP/gRPC span and log exporters, building their export requests with our encoders.

The gRPC exporters hand the request message to the generated client stub, which serialises it. The SDK builds that
message with its own encoders (about 160 µs per LLM span and 100 µs per request-log record on a small machine,
``benchmarks/export_cost.py``); these exporters build it from the bytes :mod:`llm_telemetry.otlp_spans` and
:mod:`llm_telemetry.otlp_logs` write (the protobuf library parses them in C), and everything else (channel,
credentials, compression, headers, retries, timeouts) stays the SDK's. A batch our encoder cannot encode is handed
to the SDK's encoder, which then fails, or succeeds, its own way.

Kept apart from the HTTP exporters so that ``grpc`` is imported only when gRPC export is configured.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as _SDKLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as _SDKSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.trace import ReadableSpan

from .otlp_logs import encode_logs
from .otlp_spans import encode_spans


class OTLPGrpcSpanExporter(_SDKSpanExporter):
    """The SDK's OTLP/gRPC span exporter (same arguments and ``OTEL_EXPORTER_OTLP_*`` variables), with the request
    built by :func:`llm_telemetry.otlp_spans.encode_spans`."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        try:
            return encode_spans(data)
        except Exception:
            return super()._translate_data(data)


class OTLPGrpcLogExporter(_SDKLogExporter):
    """The SDK's OTLP/gRPC log exporter (same arguments and ``OTEL_EXPORTER_OTLP_*`` variables), with the request
    built by :func:`llm_telemetry.otlp_logs.encode_logs`."""

    def _translate_data(self, data: Sequence[ReadableLogRecord]) -> ExportLogsServiceRequest:
        try:
            return encode_logs(data)
        except Exception:
            return super()._translate_data(data)
