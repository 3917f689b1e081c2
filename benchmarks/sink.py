"""A local OTLP/HTTP sink: accepts trace, metric and log exports, counts the spans (in all and by the
``service.name`` of their resource), answers ``GET /count``.

Usage: ``python benchmarks/sink.py --port 4318 [--cpu 1]``. It stands in for a collector on the same host
so tracing variants pay for serialising and sending spans, as they would in production, without a network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _State:
    lock = threading.Lock()
    spans = 0
    exports = 0
    by_service: dict[str, int] = {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/v1/traces":
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            counts: dict[str, int] = {}
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                )
                counts[service] = counts.get(service, 0) + sum(len(scope.spans) for scope in resource.scope_spans)
            with _State.lock:
                _State.spans += sum(counts.values())
                _State.exports += 1
                for service, n in counts.items():
                    _State.by_service[service] = _State.by_service.get(service, 0) + n
        self._answer(b"", "application/x-protobuf")

    def do_GET(self) -> None:
        with _State.lock:
            payload = json.dumps(
                {"spans": _State.spans, "exports": _State.exports, "by_service": _State.by_service}
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
