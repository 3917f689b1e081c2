"""OTLP span encoding, and the transport, of the OTLP/HTTP exporter of the tracer provider we create.

The OpenTelemetry exporter's own encoder (``opentelemetry.exporter.otlp.proto.common``) builds every attribute
as a separate protobuf message and then copies it into its parent, level by level (key/value into span, span into
scope, scope into resource): about 90 µs per span of the LLM span's shape (some twenty attributes), paid in the
export thread of the serving process. :func:`encode_request` writes the request's protobuf wire bytes directly,
with the encoded form of recurring attribute values cached; the bytes are the protobuf library's for the SDK
encoder's request (the tests compare them), and :func:`encode_spans` parses them into the message.

:class:`OTLPSpanExporter` is the SDK's OTLP/HTTP span exporter (endpoint, headers, TLS, compression, timeout
and retries from the same arguments and ``OTEL_EXPORTER_OTLP_*`` variables) with the encoding replaced and, for a
plain ``http://`` collector that no proxy or ``.netrc`` entry applies to, the SDK's urllib3 transport in place of
its ``requests`` one (see :func:`_plain_http_transport`). When the SDK exporter lacks the parts this relies on (a
future release may rename them), it exports exactly as the SDK does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import socket
import struct
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.http.transport._base import BaseHTTPResult
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _SDKOTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import DEFAULT_TRACE_STATE, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

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

#: Encoded ``KeyValue`` fields of attribute values that recur from span to span (model, route, status, token
#: counts, ...), one table per enclosing field tag (the tag and length prefix included), by (key, type, value);
#: cleared when full, so bounded.
_CACHE_SIZE: Final = 4096
#: The longest encoded field a cache keeps. Captured content (tens of kilobytes a value, seldom the same twice) is
#: encoded each time: kept, 4096 such values and their strings would stay in memory.
_CACHED_FIELD_BYTES: Final = 1024
_caches: dict[bytes, _Cache] = {}
#: Attribute keys whose value has failed to encode (logged in full once each).
_unencodable: set[str] = set()


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    if n < 0x4000:  # two bytes (a span's length, a long value's)
        return bytes(((n & 0x7F) | 0x80, n >> 7))
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


def _cacheable(kind: type, value: Any) -> bool:
    """Whether an encoding may be found again by (key, type, value): only where equal values of one type have
    equal encodings. Not 0.0 (equal to -0.0) or NaN (equal to nothing), and tuples only of strings (a tuple's
    type says nothing of its items': (1,) == (True,))."""
    if kind is str or kind is int or kind is bool:
        return True
    if kind is float:
        return bool(value != 0.0 and value == value)
    return kind is tuple and all(type(v) is str for v in value)


class _Cache(dict[tuple[str, type, Any], bytes]):
    """The encoded ``KeyValue`` fields of one enclosing field tag, by (key, type, value). Looking up one that is
    missing (``cache[...]``) encodes it then and there, and keeps it when it may be found again: so a set of
    attributes is encoded by one ``map`` over it, whether its values recur or not."""

    __slots__ = ("heads", "lookup", "tag")

    def __init__(self, tag: bytes) -> None:
        super().__init__()
        self.tag = tag
        #: ``self.__getitem__``, made once (not a new method wrapper per attribute set).
        self.lookup: Callable[[tuple[str, type, Any]], bytes] = self.__getitem__
        #: By key: the ``KeyValue`` bytes before the value's length (the key field and the value's tag), the
        #: length those and the value's one-byte length take, and for a float the whole field before its 8 bytes.
        self.heads: dict[str, tuple[bytes, int, bytes | None]] = {}

    def __missing__(self, item: tuple[str, type, Any]) -> bytes:
        key, kind, value = item
        head = self.heads.get(key) if type(key) is str else None
        if head is not None:
            # A value that is new (a response or request id, a token count, a time) costs only this: the
            # common kinds whose encoding has one-byte lengths are put together here, the others by _entry.
            prefix, size, float_prefix = head
            entry = None
            if kind is str:
                n = len(value)  # characters: the encoding is at least as long
                if n + size < 126 and value.isascii():
                    text: bytes = value.encode()
                    entry = b"".join((self.tag, _SMALL[n + size + 2], prefix, _STR_HEADS[n], text))
            elif kind is float:
                if float_prefix is not None:
                    entry = float_prefix + _D(value)
                    if value != 0.0 and value == value:  # (0.0 equals -0.0, NaN equals nothing)
                        if len(self) >= _CACHE_SIZE:
                            self.clear()
                        self[item] = entry
                    return entry
            elif kind is int:
                if 0 <= value < 0x80 and size < 126:
                    entry = b"".join((self.tag, _SMALL[size + 2], prefix, b"\x02\x18", _SMALL[value]))
            elif kind is bool and size < 126:
                entry = b"".join((self.tag, _SMALL[size + 2], prefix, b"\x02\x10\x01" if value else b"\x02\x10\x00"))
            if entry is None:
                entry = _entry(self.tag, key, kind, value)
        else:
            entry = _entry(self.tag, key, kind, value)
            if entry and type(key) is str:
                self._head(key)
        if (
            entry
            and len(entry) <= _CACHED_FIELD_BYTES
            and (kind is str or kind is int or kind is bool or _cacheable(kind, value))
        ):
            if len(self) >= _CACHE_SIZE:
                self.clear()
            self[item] = entry
        return entry

    def _head(self, key: str) -> None:
        if len(self.heads) >= _CACHE_SIZE:
            self.heads.clear()
        encoded = key.encode()
        prefix = (b"\x0a" + _varint(len(encoded)) + encoded if encoded else b"") + b"\x12"
        size = len(prefix) + 1
        float_prefix = self.tag + _SMALL[size + 9] + prefix + b"\x09\x21" if size + 9 < 128 else None
        self.heads[key] = (prefix, size, float_prefix)


#: By a string's encoded length n: the ``AnyValue`` length (n + 2), its string tag and n, as the cache writes them.
_STR_HEADS: Final = [bytes((n + 2, 0x0A, n)) for n in range(126)]


def _entry(tag: bytes, key: str, kind: type, value: Any) -> bytes:
    """One ``KeyValue`` field of ``tag``; b"" (logged) for a value that cannot be encoded, as the SDK encoder
    leaves it out."""
    small = _SMALL
    try:
        head = _keys.get(key)
        if head is None:
            if len(_keys) >= _CACHE_SIZE:
                _keys.clear()
            encoded = str(key).encode()
            head = _keys[key] = b"\x0a" + _varint(len(encoded)) + encoded if encoded else b""
        # The common kinds inline (one-byte lengths without a call); the others as _value writes them.
        if kind is str:
            text: bytes = value.encode()
            n = len(text)
            data = b"\x0a" + (small[n] if n < 128 else _varint(n)) + text
        elif kind is float:
            data = b"\x21" + _D(value)
        else:
            data = _value(value)
        n = len(data)
        pair = head + b"\x12" + (small[n] if n < 128 else _varint(n)) + data
        n = len(pair)
        return tag + (small[n] if n < 128 else _varint(n)) + pair
    except Exception as error:
        # With its traceback once per attribute key, then in one line at DEBUG: a value a client sends on every
        # request must not flood the log. The key is written escaped (%r): one OTLP cannot carry may hold a lone
        # surrogate, which a handler writing strict UTF-8 (a stdout StreamHandler) would fail to write.
        if key in _unencodable or len(_unencodable) >= _CACHE_SIZE:
            logger.debug("llm-telemetry: failed to encode OTLP attribute %r: %s", key, error)
        else:
            _unencodable.add(key)
            logger.exception("llm-telemetry: failed to encode OTLP attribute %r: %s (logged once per key)", key, error)
        return b""


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None, parts: list[bytes]) -> None:
    """Append ``attributes`` as repeated ``KeyValue`` fields of ``tag``; one that cannot be encoded is logged and
    left out, as the SDK encoder does."""
    if not attributes:
        return
    if type(attributes) is not dict:
        attributes = dict(attributes)
    cache = _caches.get(tag)
    if cache is None:
        cache = _caches[tag] = _Cache(tag)
    values = attributes.values()
    # Recurring values are found all at once, without a Python step per attribute; the others are encoded by
    # the cache's __missing__ as they are met.
    start = len(parts)
    try:
        parts += map(cache.lookup, zip(attributes, map(type, values), values, strict=True))
    except TypeError:  # an unhashable value (a list in a hand-made span): each one on its own
        del parts[start:]
        for key, value in attributes.items():
            item = (key, type(value), value)
            try:
                parts.append(cache[item])
            except TypeError:
                parts.append(_entry(tag, key, type(value), value))


def _flags(context: Any) -> bytes:
    return _FLAGS_REMOTE if context is not None and context.is_remote else _FLAGS_LOCAL


_IDS: Final[Callable[..., bytes]] = struct.Struct(">2sQQ2sQ").pack
_M64: Final = (1 << 64) - 1
_TIMES: Final[Callable[..., bytes]] = struct.Struct("<1sQ1sQ").pack
_END_LOCAL: Final = b"\x85\x01" + _FLAGS_LOCAL
_END_REMOTE: Final = b"\x85\x01" + _FLAGS_REMOTE
#: Encoded ``Span.status`` fields by ``Status`` object (spans share a few: unset, ok, an error per error type).
_statuses: dict[Any, bytes] = {}
_STATUS_CODES: Final = {code: code.value for code in StatusCode}
#: The ``Span.kind`` fields by the id of the SpanKind member (a lookup by the member itself would call the
#: Python-level ``Enum.__hash__``).
_KIND_FIELDS: Final = {id(kind): field for kind, field in _KINDS.items()}
#: The empty trace state the API gives contexts made without one (``len`` of a TraceState is a Python call).
_NO_TRACE_STATE: Final = DEFAULT_TRACE_STATE
#: Encoded ``Span.name`` fields by name (span names recur: ``chat gpt-4o-mini``); cleared when full.
_names: dict[str, bytes] = {}


def _status(status: Any) -> bytes:
    found = _statuses.get(status) if type(status) is Status else None
    if found is not None:
        return found
    code = status.status_code
    code = _STATUS_CODES[code] if type(code) is StatusCode else code.value
    message = status.description
    pb_status = (_field(b"\x12", message.encode()) if message else b"") + (b"\x18" + _varint(code) if code else b"")
    found = _field(b"\x7a", pb_status)
    if type(status) is Status:
        if len(_statuses) >= 256:
            _statuses.clear()
        _statuses[status] = found
    return found


def _readable_fields(span: ReadableSpan) -> tuple[Any, ...]:
    """What :func:`_encode_span` reads of a span that is not the SDK's own ``ReadableSpan`` (whose private
    fields it reads itself): the public properties."""
    return (
        span.context,
        span.parent,
        span.name,
        span.kind,
        span.start_time,
        span.end_time,
        span.attributes,
        span.dropped_attributes,
        span.events,
        span.dropped_events,
        span.links,
        span.dropped_links,
        span.status,
    )


def _dropped(items: Any, bounded: type[Any]) -> int:
    dropped: int = items.dropped if isinstance(items, bounded) else 0
    return dropped


def _private_fields() -> bool:
    """Whether the SDK's ``ReadableSpan`` and ``Event`` keep what their properties return in the private fields
    read above (a later release may not)."""
    try:
        span = ReadableSpan(name="probe", attributes={"a": 1}, events=(), links=(), start_time=1, end_time=2)
        names = ("context", "parent", "name", "kind", "start_time", "end_time", "status", "resource")
        event = Event("probe", {"a": 1}, 3)
        return (
            all(getattr(span, "_" + name) == getattr(span, name) for name in (*names, "instrumentation_scope"))
            and (dict(span._attributes or {}), tuple(span._events), tuple(span._links))
            == (dict(span.attributes or {}), tuple(span.events), tuple(span.links))
            and (event._name, event._attributes, event._timestamp) == (event.name, event.attributes, event.timestamp)
        )
    except Exception:
        return False


_PRIVATE_FIELDS: Final = _private_fields()


def _context_tuple() -> bool:
    """Whether the API's ``SpanContext`` (a tuple) keeps the trace id, span id, remote flag, trace flags and trace
    state at indexes 0 to 4, where its properties read them (each property is a Python call)."""
    try:
        state = TraceState([("k", "v")])
        context = SpanContext(3, 2, True, TraceFlags(1), state)
        fields = (context.trace_id, context.span_id, context.is_remote, context.trace_flags, context.trace_state)
        return context[:5] == fields and context[4] is state
    except Exception:
        return False


_CONTEXT_TUPLE: Final = _context_tuple()


#: By (event name, attribute key): the parts of an ``Event`` with a timestamp and that one float attribute, around
#: the timestamp and the value, as one ``struct`` format (the span's ``events`` field included); cleared when full.
_float_events: dict[tuple[str, str], tuple[Callable[..., bytes], bytes, bytes]] = {}


def _float_event_parts(name: str, key: str) -> tuple[Callable[..., bytes], bytes, bytes]:
    """The ``struct`` packer and the bytes around the timestamp and the value of the ``Span.events`` field of
    an event with a (non-zero) timestamp and one float attribute, such as the first-token event of a stream:
    only the timestamp and the value differ from one such event to the next (a double is always 8 bytes, so
    the lengths are known in advance)."""
    encoded_key = key.encode()
    key_value = (b"\x0a" + _varint(len(encoded_key)) + encoded_key if encoded_key else b"") + b"\x12\x09\x21"
    attribute = b"\x1a" + _varint(len(key_value) + 8) + key_value  # the 8 bytes of the value follow
    name_field = _field(b"\x12", name.encode())
    size = 9 + len(name_field) + len(attribute) + 8  # timestamp field (tag, fixed64), name, attribute
    head = b"\x5a" + _varint(size) + b"\x09"
    middle = name_field + attribute
    pack = struct.Struct(f"<{len(head)}sQ{len(middle)}sd").pack
    if len(_float_events) >= 256:
        _float_events.clear()
    found = _float_events[(name, key)] = (pack, head, middle)
    return found


def _encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message, fields in field-number order as the protobuf library writes them."""
    if type(span) is ReadableSpan and _PRIVATE_FIELDS:
        # The SDK's own ReadableSpan: what its properties return, without a call and a copy each.
        context, parent, name, kind = span._context, span._parent, span._name, span._kind
        start_time, end_time, status = span._start_time, span._end_time, span._status
        attributes, events, links = span._attributes, span._events, span._links
        dropped_attributes = 0 if type(attributes) is dict else _dropped(attributes, BoundedAttributes)
        dropped_events = 0 if type(events) is list else _dropped(events, BoundedList)
        dropped_links = 0 if type(links) is list else _dropped(links, BoundedList)
    else:
        (
            context,
            parent,
            name,
            kind,
            start_time,
            end_time,
            attributes,
            dropped_attributes,
            events,
            dropped_events,
            links,
            dropped_links,
            status,
        ) = _readable_fields(span)
    assert context is not None
    if type(context) is SpanContext and _CONTEXT_TUPLE:
        trace_id, span_id, trace_state = context[0], context[1], context[4]
    else:
        trace_id, span_id, trace_state = context.trace_id, context.span_id, context.trace_state
    parts = [_IDS(b"\x0a\x10", trace_id >> 64, trace_id & _M64, b"\x12\x08", span_id)]
    if trace_state is not _NO_TRACE_STATE and trace_state:
        parts.append(_field(b"\x1a", ",".join(f"{key}={value}" for key, value in trace_state.items()).encode()))
    if parent:
        parts.append(b"\x22\x08")
        parts.append(parent.span_id.to_bytes(8, "big"))
    if name:
        field = _names.get(name) if type(name) is str else None
        if field is None:
            field = _field(b"\x2a", name.encode())
            if type(name) is str:
                if len(_names) >= _CACHE_SIZE:
                    _names.clear()
                _names[name] = field
        parts.append(field)
    parts.append(_KIND_FIELDS.get(id(kind)) or _KINDS[kind])  # by identity: SpanKind's hash is Python code
    if start_time and end_time:
        parts.append(_TIMES(b"\x39", start_time, b"\x41", end_time))
    else:
        if start_time:
            parts.append(b"\x39" + _Q(start_time))
        if end_time:
            parts.append(b"\x41" + _Q(end_time))
    _attributes(b"\x4a", attributes, parts)
    if dropped_attributes:
        parts.append(b"\x50" + _varint(dropped_attributes))
    for event in events:
        if type(event) is Event and _PRIVATE_FIELDS:
            timestamp, event_name, event_attributes = event._timestamp, event._name, event._attributes
            if type(event_attributes) is dict:
                if len(event_attributes) == 1 and timestamp and event_name:
                    ((key, value),) = event_attributes.items()
                    if type(value) is float and type(key) is str and type(event_name) is str:
                        found = _float_events.get((event_name, key)) or _float_event_parts(event_name, key)
                        parts.append(found[0](found[1], timestamp, found[2], value))
                        continue
                dropped = 0
            else:
                dropped = _dropped(event_attributes, BoundedAttributes)
        else:
            timestamp, event_name, event_attributes = event.timestamp, event.name, event.attributes
            dropped = event.dropped_attributes
        pb_event = [b"\x09" + _Q(timestamp)] if timestamp else []
        if event_name:
            pb_event.append(_field(b"\x12", event_name.encode()))
        _attributes(b"\x1a", event_attributes, pb_event)
        if dropped:
            pb_event.append(b"\x20" + _varint(dropped))
        parts.append(_field(b"\x5a", b"".join(pb_event)))
    if dropped_events:
        parts.append(b"\x60" + _varint(dropped_events))
    for link in links:
        linked = link.context
        pb_link = [b"\x0a\x10", linked.trace_id.to_bytes(16, "big"), b"\x12\x08", linked.span_id.to_bytes(8, "big")]
        _attributes(b"\x22", link.attributes, pb_link)
        if link.dropped_attributes:
            pb_link.append(b"\x28" + _varint(link.dropped_attributes))
        pb_link.append(b"\x35" + _flags(linked))
        parts.append(_field(b"\x6a", b"".join(pb_link)))
    if dropped_links:
        parts.append(b"\x70" + _varint(dropped_links))
    if status is not None:
        parts.append((_statuses.get(status) if type(status) is Status else None) or _status(status))
    parts.append(_END_REMOTE if parent is not None and parent.is_remote else _END_LOCAL)
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


class _Groups:
    """Encoded items (spans or log records) grouped by resource, then by instrumentation scope, in order of first
    appearance, with the resources' and scopes' own hash and equality, as the SDK encoders group them (so
    ``Resource({"a": 1})`` and ``Resource({"a": True})``, equal but hashing apart, stay apart, and scopes differing
    only in their attributes too). The items of one provider share one Resource object and one scope object per
    tracer or logger: those are found again by identity."""

    __slots__ = ("alive", "by_id", "by_value", "groups")

    def __init__(self) -> None:
        self.by_id: dict[int, dict[Any, list[Any]]] = {}
        self.by_value: dict[Any, dict[Any, list[Any]]] = {}
        self.groups: dict[tuple[int, int], list[Any]] = {}  # by the ids of (resource, scope)
        self.alive: list[Any] = []  # the objects whose ids are keys above, kept while they are

    def of(self, resource: Any, scope: Any) -> list[Any]:
        """The list to append the items of ``resource`` and ``scope`` to (its first element is the scope)."""
        ident = (id(resource), id(scope))
        group = self.groups.get(ident)
        if group is None:
            self.alive.append((resource, scope))
            scopes = self.by_id.get(id(resource))
            if scopes is None:
                scopes = self.by_value.get(resource)
                if scopes is None:
                    scopes = self.by_value[resource] = {}
                self.by_id[id(resource)] = scopes
            scope = scope or None
            group = scopes.get(scope)
            if group is None:
                group = scopes[scope] = [scope]
            self.groups[ident] = group
        return group

    def request(self) -> bytes:
        """The export request's bytes: its resource groups (``ResourceSpans`` and ``ResourceLogs`` number their
        fields alike, as do ``ScopeSpans`` and ``ScopeLogs``), each with its scope groups and their items."""
        request: list[bytes] = []
        for resource, scopes in self.by_value.items():
            resource_group = [_field(b"\x0a", _encode_resource(resource))]
            for scope, *encoded in scopes.values():
                scope_group = [_field(b"\x0a", _encode_scope(scope))]
                for data in encoded:
                    n = len(data)
                    scope_group.append(b"\x12" + (_SMALL[n] if n < 128 else _varint(n)))
                    scope_group.append(data)
                if scope is not None and scope.schema_url:
                    scope_group.append(_field(b"\x1a", scope.schema_url.encode()))
                resource_group.append(_field(b"\x12", b"".join(scope_group)))
            if resource.schema_url:
                resource_group.append(_field(b"\x1a", resource.schema_url.encode()))
            request.append(_field(b"\x0a", b"".join(resource_group)))
        return b"".join(request)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized OTLP ``ExportTraceServiceRequest`` for ``spans``: grouped by resource, then by
    instrumentation scope (see :class:`_Groups`), each span as the SDK encoder makes it."""
    groups = _Groups()
    fast = _PRIVATE_FIELDS
    for span in spans:
        if fast and type(span) is ReadableSpan:
            groups.of(span._resource, span._instrumentation_scope).append(_encode_span(span))
        else:
            groups.of(span.resource, span.instrumentation_scope).append(_encode_span(span))
    return groups.request()


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """:func:`encode_request` as the protobuf message."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(encode_request(spans))
    return request


#: Position of ``session`` among the SDK exporter's arguments (endpoint, three certificate files, headers, timeout,
#: compression, session).
_SESSION_ARG: Final = 7
#: Variables naming a credential provider, whose session (from an entry point) the SDK sends through.
_CREDENTIAL_PROVIDERS: Final = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)


def _plain_http_transport(client: Any, endpoint: Any, providers: Sequence[str] = _CREDENTIAL_PROVIDERS) -> bool:
    """Send through the SDK's urllib3 transport instead of its default, a ``requests`` session, where the two do the
    same: a plain ``http://`` endpoint (a local collector or agent) that no proxy variable and no ``.netrc`` entry
    applies to, and no session given or named by a credential provider (``providers``: the variables the signal's
    SDK exporter reads for one; the span exporter's by default).

    Per export, ``requests`` reads the proxy variables (walking the whole environment twice) and looks for a
    ``.netrc`` file before urllib3 sends: about 1.5 ms of CPU per POST on a small machine, against about 0.46 ms
    through urllib3 alone (``benchmarks/export_cost.py``). The export thread holds the GIL for that time, so the
    serving thread pays for it too. Retries, backoff, compression and headers stay the SDK client's. Anything else
    (``https``, whose certificate store differs between the two; a proxy; credentials), and an SDK without these
    parts, keeps the SDK's default. Whether it sent through urllib3: the export then reports an answer whose body
    broke with the ``requests`` error the SDK's default reports (and so does not retry it, as the default does not)."""
    if not isinstance(endpoint, str) or not endpoint.lower().startswith("http://"):
        return False
    if any(os.environ.get(name) for name in providers):
        return False
    try:
        import requests.utils
        from opentelemetry.exporter.http.transport import _load_http_transport_factory
        from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport

        current = getattr(client, "_transport", None)
        if type(current) is not RequestsHTTPTransport:
            return False
        if requests.utils.select_proxy(endpoint, requests.utils.get_environ_proxies(endpoint)):
            return False
        if requests.utils.get_netrc_auth(endpoint):
            return False
        client._transport = _load_http_transport_factory("urllib3")(verify=True, cert=None)
    except Exception as exc:  # an SDK or requests release without these parts: the SDK's default stays
        logger.debug("llm-telemetry: keeping the SDK's OTLP/HTTP transport: %r", exc)
        return False
    current.close()
    return True


def _forget_frames(error: BaseException | None, handled: BaseException | None) -> None:
    """Take the tracebacks off ``error`` and the exceptions it chains, their frames' locals cleared first.

    A refused connection's exception is kept by urllib3 in a local of a frame of its own traceback (``new_e`` in
    ``HTTPConnectionPool.urlopen``): a reference cycle, which through each frame's caller (``f_back``) holds the
    exporter's frames too, and their locals: the encoded request and the batch of spans or log records. Only the
    cyclic garbage collector frees that, seldom in an idle process, and with the collector down every attempt of
    every export made one more: over a gigabyte with content capture on. The SDK uses the error for its log line
    and the error type of its export metric, neither of which needs the traceback. ``handled``: the exception being
    handled where the export was called (an app's, when a record is exported from its ``except`` block), which the
    chain reaches as a ``__context__`` and which stays as it is, with what it chains."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        exc = pending.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen or exc is handled:
            continue
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        pending += (exc.__cause__, exc.__context__, getattr(exc, "reason", None))


#: The most of a collector's answer read, in bytes: of its body as sent, and (an encoded one) of it decoded. The SDK
#: reads nothing of it; an OTLP answer is a partial-success message of a few hundred bytes at most.
ANSWER_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Answer(BaseHTTPResult):
    """A collector's answer as :func:`_bounded_request` read it, or the error of a request that got none."""

    body: bytes = b""
    header_map: Mapping[str, str] = field(default_factory=dict)

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        return self.header_map


def _mapped(error: Exception, pairs: Sequence[tuple[Any, Any]], judged: object = None) -> Exception:
    """``error`` as the ``requests`` type paired with the first urllib3 type (or types) of ``pairs`` that ``judged``
    (``error`` itself unless given) is, as ``requests`` raises it (the original its context: :func:`_forget_frames`
    reaches it there); ``error`` itself when none is."""
    judged = error if judged is None else judged
    for source, target in pairs:
        if isinstance(judged, source):
            mapped: Exception = target(error)
            mapped.__context__ = error
            return mapped
    return error


def _as_requests_error(error: Exception) -> Exception:
    """``error``, raised by urllib3 reading an answer's body, as ``requests`` raises it when it reads the body
    itself (``Response.iter_content``): the SDK's ``requests`` transport decides on a retry by these types (a read
    timeout is a ``requests`` connection error, retried; urllib3's own is not), and its export metric names the
    type as ``error.type``. Anything else as it is."""
    import requests.exceptions as theirs
    import urllib3.exceptions as ours

    return _mapped(
        error,
        (
            (ours.ProtocolError, theirs.ChunkedEncodingError),
            (ours.DecodeError, theirs.ContentDecodingError),
            (ours.ReadTimeoutError, theirs.ConnectionError),
            (ours.SSLError, theirs.SSLError),
        ),
    )


def _as_requests_request_error(error: Exception) -> Exception:
    """``error``, raised by urllib3 before an answer came (no connection, none made, no status line, a read timeout
    waiting for the headers), as ``requests``' adapter raises it: the SDK's ``requests`` transport judges a retry by
    these types, and its export metric names the type as ``error.type`` (``ConnectionError``, not urllib3's
    ``MaxRetryError`` or ``ProtocolError``; ``ReadTimeout``, which it retries, not ``ReadTimeoutError``, which the
    urllib3 transport's rule does not). Anything else as it is."""
    import requests.exceptions as theirs
    import urllib3.exceptions as ours

    if isinstance(error, ours.MaxRetryError):  # judged by why the retries ran out
        return _mapped(
            error,
            (
                (ours.NewConnectionError, theirs.ConnectionError),  # (a ConnectTimeoutError too, in urllib3)
                (ours.ConnectTimeoutError, theirs.ConnectTimeout),
                (ours.ResponseError, theirs.RetryError),
                (ours.ProxyError, theirs.ProxyError),
                (ours.SSLError, theirs.SSLError),
                (object, theirs.ConnectionError),
            ),
            judged=error.reason,
        )
    return _mapped(
        error,
        (
            ((ours.ProtocolError, OSError, ours.ClosedPoolError), theirs.ConnectionError),
            (ours.ProxyError, theirs.ProxyError),
            (ours.SSLError, theirs.SSLError),
            (ours.ReadTimeoutError, theirs.ReadTimeout),
        ),
    )


def _answer_through_requests(response: Any) -> _Answer:
    """At most :data:`ANSWER_BYTES` of ``response`` (``requests``), read the way ``requests`` reads any body, for
    an answer that does not come from urllib3: a session given to the exporter may mount an adapter of its own."""
    body = b""
    try:
        for piece in response.iter_content(chunk_size=ANSWER_BYTES + 1):
            body += piece
            if len(body) > ANSWER_BYTES:
                break
    except Exception as error:
        return _Answer(error=error)
    finally:
        response.close()
    return _Answer(
        status_code=response.status_code, reason=response.reason, body=body[:ANSWER_BYTES], header_map=response.headers
    )


def _socket_of(raw: Any) -> Any:
    """The socket ``raw`` (urllib3's answer) is read from, if it can be timed: ``None`` otherwise (its body read to
    the end, or an answer of no socket). An answer that ends its connection (``Connection: close``,
    HTTP/1.0) is one ``http.client`` hands over to the answer: the connection no longer names its socket, but the
    answer still reads from it, through the file ``http.client`` made of it (``HTTPResponse.fp``, a buffered reader
    of a ``socket.SocketIO``), until the body's end closes that file. Only that answer reads from such a socket
    (no pool holds it), so its timeout is this reading's to set."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        reader = getattr(getattr(raw, "_fp", None), "fp", None)  # http.client's file of the socket, None once read
        stream = getattr(reader, "raw", None)
        sock = getattr(stream, "_sock", None) if isinstance(stream, socket.SocketIO) else None
    if callable(getattr(sock, "gettimeout", None)) and callable(getattr(sock, "settimeout", None)):
        return sock
    return None


#: 1 MiB of zeros as brotli: what :func:`_brotli_bounded` asks urllib3's brotli decoder for one byte of (brotli's
#: output grows in blocks of tens of KiB: a bounded decoder gives a block, an unbounded one all of it).
_BROTLI_ZEROS: Final = bytes.fromhex("5bffff8f7f02201e0b0472ef1f00")


@functools.cache
def _brotli_bounded() -> bool:
    """Whether urllib3's ``br`` decoder gives no more than it is asked for, as its gzip, deflate and zstd ones do:
    only with a brotli module (``brotli`` or ``brotlicffi``, whichever urllib3 imported) of 1.2 or later, whose
    output can be bounded. With an older one urllib3 warns and decodes each read whole (421 bytes of ``br`` were
    256 MiB at once, 557 MiB traced). True where urllib3 decodes no ``br`` (the body then stays as sent)."""
    import urllib3.response

    decoder = getattr(urllib3.response, "BrotliDecoder", None)
    if decoder is None:
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # urllib3's DependencyWarning for an older brotli
        try:
            return len(decoder().decompress(_BROTLI_ZEROS, max_length=1)) <= ANSWER_BYTES
        except Exception:
            return False


def _decoded(body: bytes, encoding: str) -> bytes:
    """At most :data:`ANSWER_BYTES` + 1 bytes of ``body`` (an answer's body as sent) decoded as its
    ``Content-Encoding`` says, by urllib3's own decoders (as the SDK's transports decode it): ``DecodeError`` for
    one that is not. An encoding urllib3 does not know leaves the body as it is, as it does in a transport, and so
    does ``br`` where urllib3's brotli decoder cannot bound its output (see :func:`_brotli_bounded`): the SDK does
    nothing with an answer's body but fail on one that does not decode."""
    import urllib3

    if "br" in {coding.strip() for coding in encoding.lower().split(",")} and not _brotli_bounded():
        return body
    answer = urllib3.HTTPResponse(
        body=io.BytesIO(body), headers={"content-encoding": encoding}, preload_content=False, decode_content=True
    )
    # A read of urllib3 (2.6 and later) decodes no more than it is asked for: 64 KiB of gzip-compressed zeros are
    # not 64 MiB at once, nor 1.8 KiB of gzip of gzip a GiB (urllib3 1.26 decoded each read whole: 2 GiB traced).
    return answer.read(ANSWER_BYTES + 1)


def _read_answer(raw: Any, status: int, deadline: float | None, through_requests: bool) -> _Answer:
    """At most :data:`ANSWER_BYTES` of ``raw`` (urllib3's answer), read until ``deadline``; the connection of an
    answer not read whole is closed, not used again. ``through_requests``: errors as ``requests`` raises them."""
    import urllib3.exceptions

    # The transports' timeout bounds each read, not the body: one that trickled in held the export for as long as it
    # took. Each read here waits no longer than the time left (the socket's timeout is lowered to it): a read under
    # way at the deadline ends there, as reaching it between two reads does, and the status decides the outcome.
    # A read timeout of the transport's own that comes first (a shorter one) stays what it is: an error.
    # read1: what has arrived, without waiting for a whole piece.
    # An encoded body (gzip, deflate, ...) is read as sent and decoded once read: read1 decoding as it reads goes on
    # reading, each socket read with the time left when it began, until the decoder gives something, and bytes
    # that decode to nothing (a gzip header's name, empty deflate blocks) sent a few a second held the export for
    # as long as they came. As sent, it is bounded as a plain body is, at ANSWER_BYTES of it.
    encoding = raw.headers.get("content-encoding", "")
    sock = _socket_of(raw) if deadline is not None else None
    own_timeout = sock.gettimeout() if sock is not None else None
    body, whole, cut = b"", False, False
    try:
        try:
            while len(body) <= ANSWER_BYTES:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if sock is not None and _socket_of(raw) is sock:
                        cut = own_timeout is None or left < own_timeout
                        sock.settimeout(left if cut else own_timeout)
                piece = raw.read1(ANSWER_BYTES + 1 - len(body), decode_content=not encoding)
                if not piece:  # the end of the body (read1 returns nothing else empty)
                    whole = True
                    break
                body += piece
        except urllib3.exceptions.ReadTimeoutError:
            if not cut:  # the transport's own read timeout: the request failed, as in the SDK transports
                raise
        finally:
            # The socket's own timeout goes back while the answer holds its connection. urllib3 puts a connection
            # back in its pool as it reads the end of the body, in the read that gets it: from then on it is the
            # pool's, and the next export's, maybe in another thread (a SimpleSpanProcessor exports from the
            # threads that end spans), which may be using its socket or have closed it. Setting a timeout on it
            # then failed that export with EBADF (3 in 6,300 exports from two threads through one exporter) or
            # changed another's read timeout. Left lowered, it is harmless: urllib3 sets a reused connection's
            # socket timeout before it sends.
            if sock is not None and _socket_of(raw) is sock:
                with contextlib.suppress(OSError):  # a socket closed meanwhile has no timeout to set
                    sock.settimeout(own_timeout)
        if encoding:  # what came (before the deadline), decoded
            body = _decoded(body, encoding)
    except Exception as error:  # the connection broke in the body, where the SDK transports fail the request too
        raw.close()
        return _Answer(error=_as_requests_error(error) if through_requests else error)
    if not whole:
        raw.close()  # the rest stays unread (too long, or too slow): the connection is not used again
    else:
        raw.release_conn()  # a connection whose answer was read whole serves the next export
    return _Answer(status_code=status, reason=raw.reason, body=body[:ANSWER_BYTES], header_map=raw.headers)


def _bounded_request(
    transport: Any, method: str, url: str, *, requests_errors: bool = False, **kwargs: Any
) -> _Answer | None:
    """``transport.request`` for the SDK's urllib3 and ``requests`` transports, reading at most
    :data:`ANSWER_BYTES` of the answer's body; the connection of a longer one is closed, not used again. Both SDK
    transports read the whole body into memory, in an export thread of the serving process: an endpoint answering
    with a huge or endless body (a wrong address, a broken proxy) grew the process by all of it, gigabytes, until it
    was killed (the timeout bounds each read, not the body). ``None`` for another transport, to be asked itself.
    ``requests_errors``: the urllib3 transport stands in for the SDK's default, ``requests``, whose errors reading a
    body (and so whether the SDK client retries them) are the ones reported."""
    import urllib3
    import urllib3.response
    from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
    from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

    headers, timeout, data = kwargs.get("headers"), kwargs.get("timeout"), kwargs.get("data")
    # The timeout is the request's (what is left of the export's): the body's reading ends where it ends, counted
    # from the sending, not from the answer's headers, which may themselves have taken most of it.
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if type(transport) is Urllib3HTTPTransport and hasattr(transport, "_pool"):
            wait = urllib3.Timeout(total=timeout) if timeout is not None else None
            raw = transport._pool.request(
                method=method, url=url, headers=headers, body=data, timeout=wait, preload_content=False
            )
        elif type(transport) is RequestsHTTPTransport and hasattr(transport, "_session"):
            session = transport._session
            read: list[_Answer] = []

            def bounded(response: Any, **_: Any) -> Any:
                # Read as the answer arrives, before ``requests`` goes on: it reads a redirect's whole body itself
                # (to free its connection, streaming or not, followed or not), which this leaves nothing of.
                if isinstance(response.raw, urllib3.response.BaseHTTPResponse):
                    read.append(_read_answer(response.raw, response.status_code, deadline, through_requests=True))
                else:  # a session's own adapter, answering otherwise
                    read.append(_answer_through_requests(response))
                response._content, response._content_consumed = read[-1].body, True
                return response

            # A session's own response hooks run first, as they would without this one.
            hooks = getattr(session, "hooks", None) or {}
            given = hooks.get("response") or []
            response_hooks = [given] if callable(given) else list(given)
            response = session.request(
                method=method,
                url=url,
                headers=headers,
                data=data,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
                hooks={"response": [*response_hooks, bounded]},
            )
            if not read:  # a session that answered without its response hooks
                return _answer_through_requests(response)
            return read[-1]
        else:
            return None
    except Exception as error:  # no answer: a failed request, as the SDK transports report it
        return _Answer(error=_as_requests_request_error(error) if requests_errors else error)
    return _read_answer(raw, raw.status, deadline, through_requests=requests_errors)


class _ForgetfulTransport:
    """The SDK client's HTTP transport, with the frames of a failed request's exceptions let go (see
    :func:`_forget_frames`) and at most :data:`ANSWER_BYTES` of an answer read (see :func:`_bounded_request`);
    anything else is the transport's own. ``requests_errors``: see :func:`_bounded_request`."""

    def __init__(self, transport: Any, requests_errors: bool = False) -> None:
        self._transport = transport
        self._requests_errors = requests_errors

    def request(self, *args: Any, **kwargs: Any) -> Any:
        handled = sys.exc_info()[1]
        result = None
        if len(args) == 2 and set(kwargs) <= {"headers", "timeout", "data"}:
            try:
                result = _bounded_request(self._transport, *args, requests_errors=self._requests_errors, **kwargs)
            except ImportError:  # an SDK without these transports: its own reads the answer
                result = None
        if result is None:
            result = self._transport.request(*args, **kwargs)
        error = getattr(result, "error", None)
        if error is not None:
            _forget_frames(error, handled)
        return result

    def is_connection_error(self, exception: Exception | None) -> bool:
        """Whether the SDK client takes ``exception`` for a connection error (and retries it): the transport's own
        rule, or, for an error reported as ``requests`` reports it (``requests_errors``), the SDK's ``requests``
        transport's rule, as the default it stands in for judges it. The urllib3 transport's rule knows none of
        ``requests``' errors: a body's read timeout, which the default retries as a connection error, was not."""
        if self._requests_errors:
            try:
                import requests.exceptions
                from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
            except ImportError:  # an SDK without it: the transport's own rule
                pass
            else:
                if isinstance(exception, requests.exceptions.RequestException):
                    return bool(RequestsHTTPTransport.is_connection_error(self._transport, exception))
        return bool(self._transport.is_connection_error(exception))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def bounded_answers(exporter: Any, requests_errors: bool = False) -> Any:
    """``exporter`` (an SDK OTLP/HTTP exporter) reading at most :data:`ANSWER_BYTES` of each answer and letting go
    of failed requests' frames, as the middleware's own span and log exporters do (:class:`_ForgetfulTransport`).
    ``requests_errors``: its urllib3 transport stands in for the SDK's ``requests`` one (see
    :func:`_plain_http_transport`)."""
    client = getattr(exporter, "_client", None)
    transport = getattr(client, "_transport", None)
    if client is not None and callable(getattr(transport, "request", None)):
        client._transport = _ForgetfulTransport(transport, requests_errors)
    return exporter


def _own_path(exporter: Any, args: Sequence[Any], kwargs: Mapping[str, Any], providers: Sequence[str]) -> bool:
    """For our subclasses of the SDK's OTLP/HTTP exporters, once the SDK's ``__init__`` has run: the plain-http
    transport where it applies (no session given; ``providers``, the signal's credential-provider variables), and
    whether the SDK parts that :func:`_export_encoded` uses are there."""
    client = getattr(exporter, "_client", None)
    stand_in = False
    if len(args) < _SESSION_ARG and kwargs.get("session") is None and kwargs.get("_transport") is None:
        stand_in = _plain_http_transport(client, getattr(exporter, "_endpoint", None), providers)
    bounded_answers(exporter, requests_errors=stand_in)
    return (
        callable(getattr(client, "export", None))
        and hasattr(exporter, "_metrics")
        and isinstance(getattr(exporter, "_max_request_size", None), int)
        and isinstance(getattr(exporter, "_shutdown", None), bool)
    )


def _export_encoded(
    exporter: Any, items: Sequence[Any], encode: Callable[[Any], bytes], sdk_export: Callable[[Any], Any], results: Any
) -> Any:
    """Export ``items`` our way: ``encode`` them, and send the bytes as the SDK exporter sends its own (its client,
    with its retries, and its export metrics); ``results`` are the signal's (success, failure) answers. The SDK's
    own path, ``sdk_export``, where the SDK parts are missing (see :func:`_own_path`) or the exporter is shut down."""
    success, failure = results
    if not exporter._own_encoding or exporter._shutdown:
        return sdk_export(items)
    try:
        data = encode(items)
    except Exception:
        return sdk_export(items)  # the SDK encoder logs and records the failure its own way
    if 0 < exporter._max_request_size < len(data):
        return sdk_export(items)  # the SDK drops it, with its warning and error metric
    with exporter._metrics.export_operation(len(items)) as result:
        outcome = exporter._client.export(data)
        if not outcome.success:
            result.error = outcome.error
            if outcome.status_code is not None:
                result.error_attrs = {"http.response.status_code": outcome.status_code}
            return failure
    return success


class OTLPSpanExporter(_SDKOTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter (same arguments and environment variables), encoding with
    :func:`encode_spans`. Requests that fail to encode, and SDK releases without the parts used here, take the
    SDK's own path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._own_encoding = _own_path(self, args, kwargs, _CREDENTIAL_PROVIDERS)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        results = (SpanExportResult.SUCCESS, SpanExportResult.FAILURE)
        return _export_encoded(self, spans, encode_request, super().export, results)  # type: ignore[no-any-return]
