"""OTLP span encoding for the OTLP/HTTP exporter of the tracer provider we create.

The OpenTelemetry exporter's own encoder (``opentelemetry.exporter.otlp.proto.common``) builds every attribute
as a separate protobuf message and then copies it into its parent, level by level (key/value into span, span into
scope, scope into resource): about 90 µs per span of the LLM span's shape (some twenty attributes), more than the
rest of tracing together, paid in the export thread of the serving process. :func:`encode_spans` builds the same
``ExportTraceServiceRequest`` in place, with the generated protobuf classes (``add()`` on repeated fields, so
nothing is copied), at about a third of that. The wire format stays the protobuf library's; the result equals the
SDK encoder's message field for field (the tests compare the two).

:class:`OTLPSpanExporter` is the SDK's OTLP/HTTP span exporter (endpoint, headers, TLS, compression, timeout
and retries from the same arguments and ``OTEL_EXPORTER_OTLP_*`` variables) with only the encoding replaced.
When the SDK exporter lacks the parts this relies on (a future release may rename them), it exports exactly as
the SDK does.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _SDKOTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

logger = logging.getLogger("llm_telemetry")

# OTLP's SpanKind numbers (the API's enum starts at INTERNAL = 0, OTLP's at UNSPECIFIED = 0).
_KINDS: Final = {
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}
# SpanFlags (fixed32): the context's remote flag is known, and (second bit) the parent or linked context is remote.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_FLAGS_LOCAL: Final = struct.pack("<I", _HAS_IS_REMOTE)
_FLAGS_REMOTE: Final = struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)

_SMALL: Final = [bytes((i,)) for i in range(128)]
_Q: Final[Callable[[int], bytes]] = struct.Struct("<Q").pack
_D: Final[Callable[[float], bytes]] = struct.Struct("<d").pack
_INT64: Final = range(-(2**63), 2**63)
_UINT64: Final = (1 << 64) - 1

#: Encoded ``KeyValue`` fields (length prefix included) of attribute values that recur from span to span (model,
#: route, status, token counts, ...), by (key, type, value); cleared when full, so bounded.
_CACHE_SIZE: Final = 4096
_cache: dict[tuple[str, type, Any], bytes] = {}


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    """An ``AnyValue`` message, with the SDK encoder's type order (None, bool, str, int, float, bytes, sequence,
    mapping); raises for a type or an integer OTLP cannot carry. Set oneof members are written even when zero."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode()
        return b"\x0a" + _varint(len(data)) + data
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int and value in _INT64:
        return b"\x18" + _varint(value & _UINT64)
    if kind is float:
        return b"\x21" + _D(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", str(value).encode())
    if isinstance(value, int):
        if value not in _INT64:
            raise ValueError(f"Value out of range: {value}")
        return b"\x18" + _varint(int(value) & _UINT64)
    if isinstance(value, float):
        return b"\x21" + _D(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message (an empty key is not written, as proto3 leaves out empty strings)."""
    encoded = key.encode()
    head = b"\x0a" + _varint(len(encoded)) + encoded if encoded else b""
    return head + _field(b"\x12", _value(value))


#: Encoded key fields (``KeyValue.key`` with its tag), by key; cleared when full.
_keys: dict[str, bytes] = {}


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None, parts: list[bytes]) -> None:
    """Append ``attributes`` as repeated ``KeyValue`` fields of ``tag``; one that cannot be encoded is logged and
    left out, as the SDK encoder does."""
    if not attributes:
        return
    cache = _cache
    for key, value in attributes.items():
        kind = type(value)
        # Values equal across types (1 == True, 0.0 == -0.0) must not share an entry: only str, int and bool
        # values are cached (by type too), and tuples of strings.
        cacheable = kind is str or kind is int or kind is bool or (kind is tuple and all(type(v) is str for v in value))
        entry = cache.get((key, kind, value)) if cacheable else None
        if entry is None:
            try:
                head = _keys.get(key)
                if head is None:
                    if len(_keys) >= _CACHE_SIZE:
                        _keys.clear()
                    encoded = str(key).encode()
                    head = _keys[key] = b"\x0a" + _varint(len(encoded)) + encoded if encoded else b""
                data = _value(value)
                pair = head + b"\x12" + _varint(len(data)) + data
                entry = _varint(len(pair)) + pair
            except Exception as error:
                logger.exception("llm-telemetry: failed to encode span attribute %s: %s", key, error)
                continue
            if cacheable:
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[(key, kind, value)] = entry
        parts.append(tag)
        parts.append(entry)


def _flags(context: Any) -> bytes:
    return _FLAGS_REMOTE if context is not None and context.is_remote else _FLAGS_LOCAL


def _encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message, fields in field-number order as the protobuf library writes them."""
    context = span.context
    assert context is not None
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    trace_state = context.trace_state
    if trace_state:
        parts.append(_field(b"\x1a", ",".join(f"{key}={value}" for key, value in trace_state.items()).encode()))
    parent = span.parent
    if parent:
        parts.append(b"\x22\x08")
        parts.append(parent.span_id.to_bytes(8, "big"))
    name = span.name
    if name:
        parts.append(_field(b"\x2a", name.encode()))
    parts.append(_KINDS[span.kind])
    if span.start_time:
        parts.append(b"\x39" + _Q(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _Q(span.end_time))
    _attributes(b"\x4a", span.attributes, parts)
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        pb_event = [b"\x09" + _Q(event.timestamp)] if event.timestamp else []
        if event.name:
            pb_event.append(_field(b"\x12", event.name.encode()))
        _attributes(b"\x1a", event.attributes, pb_event)
        if event.dropped_attributes:
            pb_event.append(b"\x20" + _varint(event.dropped_attributes))
        parts.append(_field(b"\x5a", b"".join(pb_event)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        linked = link.context
        pb_link = [b"\x0a\x10", linked.trace_id.to_bytes(16, "big"), b"\x12\x08", linked.span_id.to_bytes(8, "big")]
        _attributes(b"\x22", link.attributes, pb_link)
        if link.dropped_attributes:
            pb_link.append(b"\x28" + _varint(link.dropped_attributes))
        pb_link.append(b"\x35" + _flags(linked))
        parts.append(_field(b"\x6a", b"".join(pb_link)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    if status is not None:
        code = status.status_code.value
        message = status.description
        pb_status = (_field(b"\x12", message.encode()) if message else b"") + (b"\x18" + _varint(code) if code else b"")
        parts.append(_field(b"\x7a", pb_status))
    parts.append(b"\x85\x01" + _flags(parent))
    return b"".join(parts)


def _encode_resource(resource: Any) -> bytes:
    parts: list[bytes] = []
    _attributes(b"\x0a", resource.attributes, parts)
    return b"".join(parts)


def _encode_scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    parts = [_field(b"\x0a", scope.name.encode())] if scope.name else []
    if scope.version:
        parts.append(_field(b"\x12", scope.version.encode()))
    _attributes(b"\x1a", scope.attributes, parts)
    return b"".join(parts)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized OTLP ``ExportTraceServiceRequest`` for ``spans``: grouped by resource, then by
    instrumentation scope (in order of first appearance), each span as the SDK encoder makes it."""
    # Spans of one provider share one Resource object: look it up by identity, compare values only when new.
    resources: dict[int, dict[Any, list[Any]]] = {}
    known: list[tuple[Any, dict[Any, list[Any]]]] = []
    for span in spans:
        resource = span.resource
        scopes = resources.get(id(resource))
        if scopes is None:
            for other, other_scopes in known:
                if other == resource:
                    scopes = other_scopes
                    break
            else:
                scopes = {}
                known.append((resource, scopes))
            resources[id(resource)] = scopes
        scope = span.instrumentation_scope or None
        key = None if scope is None else (scope.name, scope.version, scope.schema_url)
        group = scopes.get(key)
        if group is None:
            group = scopes[key] = [scope]
        group.append(_encode_span(span))
    request: list[bytes] = []
    for resource, scopes in known:
        resource_spans = [_field(b"\x0a", _encode_resource(resource))]
        for scope, *encoded in scopes.values():
            scope_spans = [_field(b"\x0a", _encode_scope(scope))]
            for data in encoded:
                scope_spans.append(b"\x12" + _varint(len(data)))
                scope_spans.append(data)
            if scope is not None and scope.schema_url:
                scope_spans.append(_field(b"\x1a", scope.schema_url.encode()))
            resource_spans.append(_field(b"\x12", b"".join(scope_spans)))
        if resource.schema_url:
            resource_spans.append(_field(b"\x1a", resource.schema_url.encode()))
        request.append(_field(b"\x0a", b"".join(resource_spans)))
    return b"".join(request)


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """:func:`encode_request` as the protobuf message."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(encode_request(spans))
    return request


class OTLPSpanExporter(_SDKOTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter (same arguments and environment variables), encoding with
    :func:`encode_spans`. Requests that fail to encode, and SDK releases without the parts used here, take the
    SDK's own path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        client = getattr(self, "_client", None)
        self._own_encoding = (
            callable(getattr(client, "export", None))
            and hasattr(self, "_metrics")
            and isinstance(getattr(self, "_max_request_size", None), int)
            and isinstance(getattr(self, "_shutdown", None), bool)
        )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._own_encoding or self._shutdown:
            return super().export(spans)
        try:
            data = encode_request(spans)
        except Exception:
            return super().export(spans)  # the SDK encoder logs and records the failure its own way
        if 0 < self._max_request_size < len(data):
            return super().export(spans)  # the SDK drops it, with its warning and error metric
        with self._metrics.export_operation(len(spans)) as result:
            outcome = self._client.export(data)
            if not outcome.success:
                result.error = outcome.error
                if outcome.status_code is not None:
                    result.error_attrs = {"http.response.status_code": outcome.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
