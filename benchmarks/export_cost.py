"""CPU time of exporting LLM spans and request-log records over OTLP/HTTP, per export request and per item: the
SDK's exporters as they ship, and ours (our encoding, and the SDK's urllib3 transport for a plain ``http://``
collector) with either transport; and of building the request of the OTLP/gRPC exporters, the SDK's and ours.

The exporters run in the serving process (the batch processors' threads), holding the GIL while they work,
so its CPU is the serving process's. A loaded server sends full batches (512 spans by default); a quieter one sends
whatever ended within ``OTEL_BSP_SCHEDULE_DELAY`` (5 s by default; ``benchmarks/run`` uses 100 ms), so the fixed cost
of one POST is shared by fewer items.

Usage: ``python benchmarks/export_cost.py [--batches 1,50,512] [--exports 300] [--signals spans,logs]``. Exports
go to the benchmark's OTLP sink (``sink.py``) on 127.0.0.1; with two cores or more the sink and this process run on
different ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import requests
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as sdk_encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as SDKLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as SDKSpanExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

import procs
from llm_telemetry.otlp_logs import OTLPLogExporter, encode_logs
from llm_telemetry.otlp_spans import OTLPSpanExporter, encode_spans

RESOURCE = Resource.create({"service.name": "bench", "deployment.environment": "bench"})
SCOPE = InstrumentationScope("llm_telemetry", "0")


def llm_span(i: int) -> ReadableSpan:
    """A span of the middleware's LLM span shape: a streamed chat, its server and GenAI attributes, one event."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.id": f"chatcmpl-{i:012d}",
        "gen_ai.request.stream": True,
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 64 + i % 7,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.response.time_to_first_chunk": 0.0123 + i * 1e-6,
        "llm.cost.usd": 0.000041 + i * 1e-9,
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "url.path": "/v1/chat/completions",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": 8000,
        "client.address": "127.0.0.1",
        "network.protocol.version": "1.1",
    }
    context = SpanContext(0x5CF92F3577B34DA6A3CE929D0E0E4737 + i, 0x10F067AA0BA902B8 + i, False, TraceFlags(1))
    start = 1_700_000_000_000_000_000 + i * 1_000_000
    return ReadableSpan(
        name="chat gpt-4o-mini",
        context=context,
        kind=SpanKind.SERVER,
        attributes=attributes,
        events=[Event("gen_ai.first_token", {"gen_ai.response.time_to_first_chunk": 0.0123}, start + 12_300_000)],
        resource=RESOURCE,
        instrumentation_scope=SCOPE,
        start_time=start,
        end_time=start + 900_000_000,
    )


def log_record(i: int) -> ReadableLogRecord:
    """A request-log record as the middleware emits it: the line's message, its non-null fields as attributes."""
    attributes: dict[str, Any] = {
        "request_id": f"{i:032x}",
        "service": "bench",
        "operation": "chat",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "stream": True,
        "status_code": 200,
        "input_tokens": 12,
        "output_tokens": 64 + i % 7,
        "cost_usd": 0.000041 + i * 1e-9,
        "duration_ms": 912.345 + i,
        "ttft_ms": 12.3 + i % 5,
    }
    start = 1_700_000_000_000_000_000 + i * 1_000_000
    record = LogRecord(
        timestamp=start,
        observed_timestamp=start + 1000,
        severity_text="INFO",
        severity_number=SeverityNumber.INFO,
        body="chat gpt-4o-mini 200",
        attributes=attributes,
    )
    return ReadableLogRecord(record, RESOURCE, InstrumentationScope("llm_telemetry.requests"))


def exporters(endpoint: str, signal: str) -> dict[str, Any]:
    url = f"{endpoint}/v1/{'traces' if signal == 'spans' else 'logs'}"
    sdk, ours = (SDKSpanExporter, OTLPSpanExporter) if signal == "spans" else (SDKLogExporter, OTLPLogExporter)
    return {
        f"{signal}: SDK exporter (SDK encoder, requests)": sdk(endpoint=url),
        f"{signal}: ours, requests (a session given)": ours(endpoint=url, session=requests.Session()),
        f"{signal}: ours (plain http: urllib3)": ours(endpoint=url),
    }


def _export(exporter: Any) -> Any:
    def call(items: list[Any]) -> None:
        if exporter.export(items).name != "SUCCESS":
            raise SystemExit("an export failed: is the sink up?")

    return call


def _build(encode: Any) -> Any:
    return lambda items: encode(items).SerializeToString()


def cpu_per_call(call: Any, items: list[Any], calls: int) -> float:
    """CPU µs of this thread per ``call(items)``, after a warm-up."""
    for _ in range(min(20, calls)):
        call(items)
    start = time.thread_time()
    for _ in range(calls):
        call(items)
    return (time.thread_time() - start) / calls * 1e6


def print_rows(signal: str, calls: dict[str, Any], batches: list[int], args: argparse.Namespace) -> None:
    """One row per (batch size, named call): the median over rounds, per call and per item."""
    make = llm_span if signal == "spans" else log_record
    for size in batches:
        items = [make(i) for i in range(size)]
        count = max(10, args.exports * 50 // max(size, 50))
        for name, call in calls.items():
            per_call = statistics.median(cpu_per_call(call, items, count) for _ in range(args.rounds))
            print(f"{name:<44} {size:>12} {per_call:>14.0f} {per_call / size:>12.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,50,512", help="items per export request, comma-separated")
    parser.add_argument("--exports", type=int, default=300, help="export requests per measurement (fewer for 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--signals", default="spans,logs", help="spans, logs or both, comma-separated")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    procs.drop_settings()  # the exporters as the benchmark configures them (no compression or headers of the shell)
    cores = procs.cpus()
    port = procs.free_port()
    sink = procs.start("sink.py", ["--port", str(port), "--cpu", str(cores[-1])])
    try:
        if len(cores) > 1:
            procs.pin(cores[0])
        procs.wait_http(f"http://127.0.0.1:{port}/count", sink)
        endpoint = f"http://127.0.0.1:{port}"
        print(f"{'exporter':<44} {'items/export':>12} {'CPU us/export':>14} {'CPU us/item':>12}")
        print("-" * 85)
        for signal in args.signals.split(","):
            chosen = exporters(endpoint, signal)
            print_rows(signal, {name: _export(exporter) for name, exporter in chosen.items()}, batches, args)
            for exporter in chosen.values():
                exporter.shutdown()
        print()
        print("the gRPC exporters' request, built and serialised as their client stub does (no sending):")
        for signal in args.signals.split(","):
            sdk, ours = (sdk_encode_spans, encode_spans) if signal == "spans" else (sdk_encode_logs, encode_logs)
            builders = {f"{signal}: SDK encoder": _build(sdk), f"{signal}: ours (otlp_grpc)": _build(ours)}
            print_rows(signal, builders, batches, args)
        print(f"median of {args.rounds} rounds; CPU time of the exporting thread (time.thread_time)")
    finally:
        procs.stop(sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
