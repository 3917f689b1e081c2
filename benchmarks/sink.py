"""A local OTLP/HTTP sink: accepts trace, metric and log exports, counts the spans and the log records (in all
and by the ``service.name`` of their resource), answers ``GET /count``.

Usage: ``python benchmarks/sink.py --port 4318 [--cpu 1]``. It stands in for a collector on the same host
so variants that export spans or log records pay for serialising and sending them, as they would in production,
without a network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class _State:
    lock = threading.Lock()
    spans = 0
    exports = 0
    by_service: dict[str, int] = {}
    logs = 0
    logs_by_service: dict[str, int] = {}


def _by_service(groups: Iterable[tuple[Any, Any, str]]) -> dict[str, int]:
    """Items (spans or log records) per ``service.name``, from (resource, scope groups, item field) triples."""
    counts: dict[str, int] = {}
    for resource, scopes, items in groups:
        service = next((a.value.string_value for a in resource.attributes if a.key == "service.name"), "")
        counts[service] = counts.get(service, 0) + sum(len(getattr(scope, items)) for scope in scopes)
    return counts


def _add(totals: dict[str, int], counts: dict[str, int]) -> None:
    for service, n in counts.items():
        totals[service] = totals.get(service, 0) + n


#: Per export path: the request message, its field of resource groups, their field of scope groups, the scopes'
#: field of items, and the totals of :class:`_State` it adds to.
_SIGNALS: dict[str, tuple[Any, str, str, str, str, str]] = {
    "/v1/traces": (ExportTraceServiceRequest, "resource_spans", "scope_spans", "spans", "spans", "by_service"),
    "/v1/logs": (ExportLogsServiceRequest, "resource_logs", "scope_logs", "log_records", "logs", "logs_by_service"),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        signal = _SIGNALS.get(self.path)
        if signal is not None:
            message, groups, scopes, items, total, by_service = signal
            request = message()
            request.ParseFromString(body)
            counts = _by_service((r.resource, getattr(r, scopes), items) for r in getattr(request, groups))
            with _State.lock:
                setattr(_State, total, getattr(_State, total) + sum(counts.values()))
                _State.exports += 1
                _add(getattr(_State, by_service), counts)
        self._answer(b"", "application/x-protobuf")

    def do_GET(self) -> None:
        with _State.lock:
            payload = json.dumps(
                {
                    "spans": _State.spans,
                    "exports": _State.exports,
                    "by_service": _State.by_service,
                    "logs": _State.logs,
                    "logs_by_service": _State.logs_by_service,
                }
            ).encode()
        self._answer(payload, "application/json")

    def _answer(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
