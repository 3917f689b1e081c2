"""OTLP log record encoding, and the transport, of the OTLP/HTTP log exporter of the logger provider we create.

The OpenTelemetry exporter's own encoder (``opentelemetry.exporter.otlp.proto.common._log_encoder``) builds every
attribute as a separate protobuf message and copies it level by level into the request, and hashes each record's
resource (a JSON dump of its attributes) to group the records: about 115 µs per request-log record, paid in the
export thread of the serving process. :func:`encode_logs_request` writes the request's protobuf wire bytes
directly with the attribute and value encoding of :mod:`llm_telemetry.otlp_spans` (its bounded caches of
recurring attribute values included); the bytes are the protobuf library's for the SDK encoder's request (the
tests compare them).

:class:`OTLPLogExporter` is the SDK's OTLP/HTTP log exporter (endpoint, headers, TLS, compression, timeout and
retries from the same arguments and ``OTEL_EXPORTER_OTLP_*`` variables) with the encoding replaced and, for a plain
``http://`` collector that no proxy or ``.netrc`` entry applies to, the SDK's urllib3 transport in place of its
``requests`` one, as the span exporter does. When the SDK exporter lacks the parts this relies on, it exports
exactly as the SDK does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from opentelemetry._logs import SeverityNumber
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as _SDKOTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExportResult

from .otlp_spans import (
    _CACHE_SIZE,
    _CACHED_FIELD_BYTES,
    _attributes,
    _export_encoded,
    _field,
    _Groups,
    _own_path,
    _value,
    _varint,
)

_Q: Final[Callable[[int], bytes]] = struct.Struct("<Q").pack
_I: Final[Callable[[int], bytes]] = struct.Struct("<I").pack
#: The ``trace_id`` and ``span_id`` fields of a record in a valid span context, in one ``struct`` call.
_IDS: Final[Callable[..., bytes]] = struct.Struct(">2sQQ2sQ").pack
_M64: Final = (1 << 64) - 1
_UINT32: Final = 1 << 32
_INT32: Final = range(-(2**31), 2**31)

#: The ``LogRecord.severity_number`` fields of the API's severities, by the member's id (a lookup by the member
#: itself would call the Python-level ``Enum.__hash__``).
_SEVERITIES: Final = {id(number): b"\x10" + _varint(number.value) if number.value else b"" for number in SeverityNumber}
#: ``LogRecord.flags`` fields by trace flags value (sampled or not, as every SDK span context has).
_FLAGS: Final = {0: b"", 1: b"\x45" + _I(1)}
#: Encoded ``severity_text`` and (string) ``body`` fields by text: request-log records share a few of each
#: (``INFO``; ``chat gpt-4o 200``); cleared when full.
_texts: dict[str, bytes] = {}
_bodies: dict[str, bytes] = {}


def _severity(number: Any) -> bytes:
    """The ``severity_number`` field of a severity that is not one of the API's members: the SDK encoder sends
    ``number.value`` (nothing for an object without one, such as a plain ``int``)."""
    value = getattr(number, "value", None)
    if value is None:
        return b""
    if type(value) is not int or value not in _INT32:
        raise ValueError(f"invalid severity number {value!r}")
    return b"\x10" + _varint(value & _M64) if value else b""


def _text_field(tag: bytes, text: Any, cache: dict[str, bytes]) -> bytes:
    field = _field(tag, text.encode())
    if type(text) is str:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[text] = field
    return field


def _body(body: Any) -> bytes:
    """The ``body`` field (always written, an empty ``AnyValue`` for no body, as the SDK encoder sets it)."""
    if type(body) is str:
        found = _bodies.get(body)
        if found is None:
            found = _field(b"\x2a", _value(body))
            if len(found) <= _CACHED_FIELD_BYTES:  # a long body (an app's traceback, say) is not kept
                if len(_bodies) >= _CACHE_SIZE:
                    _bodies.clear()
                _bodies[body] = found
        return found
    return _field(b"\x2a", _value(body))


def _encode_log(record: ReadableLogRecord) -> bytes:
    """One ``LogRecord`` message, fields in field-number order as the protobuf library writes them. Raises where
    the SDK encoder raises (a value OTLP cannot carry in the body, a time or id out of range)."""
    log = record.log_record
    parts: list[bytes] = []
    timestamp = log.timestamp
    if timestamp:
        parts.append(b"\x09" + _Q(timestamp))
    number = log.severity_number
    if number is not None:
        severity = _SEVERITIES.get(id(number))
        parts.append(_severity(number) if severity is None else severity)
    text = log.severity_text
    if text:
        parts.append(_texts.get(text) or _text_field(b"\x1a", text, _texts))
    parts.append(_body(log.body))
    attributes = log.attributes
    if type(attributes) is BoundedAttributes:
        attributes = attributes.copy()  # its dict, copied in one call (not a Python step per key)
    _attributes(b"\x32", attributes, parts)
    dropped = record.dropped_attributes
    if dropped:
        if not 0 < dropped < _UINT32:
            raise ValueError(f"invalid dropped attributes count {dropped!r}")
        parts.append(b"\x38" + _varint(dropped))
    flags = int(log.trace_flags)
    found = _FLAGS.get(flags)
    parts.append(b"\x45" + _I(flags) if found is None else found)
    trace_id, span_id = log.trace_id, log.span_id
    if trace_id != 0 and span_id != 0 and type(trace_id) is int and type(span_id) is int:
        parts.append(_IDS(b"\x4a\x10", trace_id >> 64, trace_id & _M64, b"\x52\x08", span_id))
    else:
        if trace_id != 0:
            parts.append(b"\x4a\x10" + trace_id.to_bytes(16, "big"))
        if span_id != 0:
            parts.append(b"\x52\x08" + span_id.to_bytes(8, "big"))
    observed = log.observed_timestamp
    if observed:
        parts.append(b"\x59" + _Q(observed))
    event_name = log.event_name
    if event_name:
        parts.append(_field(b"\x62", event_name.encode()))
    return b"".join(parts)


def encode_logs_request(records: Sequence[ReadableLogRecord]) -> bytes:
    """The serialized OTLP ``ExportLogsServiceRequest`` for ``records``: grouped by resource, then by
    instrumentation scope as the SDK encoder groups them (see ``otlp_spans._Groups``), each record as the SDK
    encoder makes it."""
    groups = _Groups()
    for record in records:
        groups.of(record.resource, record.instrumentation_scope).append(_encode_log(record))
    return groups.request()


def encode_logs(records: Sequence[ReadableLogRecord]) -> ExportLogsServiceRequest:
    """:func:`encode_logs_request` as the protobuf message."""
    request = ExportLogsServiceRequest()
    request.ParseFromString(encode_logs_request(records))
    return request


#: Variables naming a credential provider, whose session (from an entry point) the SDK log exporter sends through.
_CREDENTIAL_PROVIDERS: Final = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_LOGS_CREDENTIAL_PROVIDER",
)


class OTLPLogExporter(_SDKOTLPLogExporter):
    """The SDK's OTLP/HTTP log exporter (same arguments and environment variables), encoding with
    :func:`encode_logs_request`. Batches that fail to encode, and SDK releases without the parts used here, take
    the SDK's own path.

    Args:
        *args, **kwargs: as the SDK's ``OTLPLogExporter``.

    Usage::

        provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._own_encoding = _own_path(self, args, kwargs, _CREDENTIAL_PROVIDERS)

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        results = (LogRecordExportResult.SUCCESS, LogRecordExportResult.FAILURE)
        return _export_encoded(self, batch, encode_logs_request, super().export, results)  # type: ignore[no-any-return]
