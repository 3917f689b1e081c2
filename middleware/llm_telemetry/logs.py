"""JSON request logs: one line per LLM request through the ``logging`` module, optionally exported over OTLP.

Lines go to the logger :data:`REQUEST_LOGGER` (``llm_telemetry.requests``). When that logger has no handler of
its own at startup, the middleware gives it one that writes JSON to stdout and stops propagation (so a root
handler does not print every line twice). Give the logger your own handlers before the first request to send
the lines elsewhere; :class:`JsonFormatter` is public for that. Field names are listed in :data:`FIELDS` and
documented in ``docs/logging.md``; Loki queries depend on them, so they only ever grow.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any, Final

from opentelemetry import context, trace

from .config import OTEL_LOGS_EXPORTER, OTelEnvironment, batch_processor
from .labels import INVISIBLE, label_value, valid_text
from .record import LLMCall
from .redact import TRUNCATION_MARK

#: Fields an OTLP log record carries as its own trace context (trace id, span id, flags), not as attributes.
_RECORD_CONTEXT: Final = frozenset(("trace_id", "span_id", "trace_sampled"))

#: The logger every request line is written to.
REQUEST_LOGGER: Final = "llm_telemetry.requests"

#: Every field of a request line, in output order. Unknown values are JSON null, never missing.
FIELDS: Final = (
    "timestamp",
    "level",
    "message",
    "request_id",
    "trace_id",
    "span_id",
    "trace_sampled",
    "service",
    "operation",
    "provider",
    "model",
    "stream",
    "status_code",
    "error_type",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "duration_ms",
    "ttft_ms",
)

#: Attribute of a ``logging.LogRecord`` holding the request fields (pass it with ``extra=``).
RECORD_ATTRIBUTE: Final = "llm_request"
#: The OTLP handler of the instance logging a request record now (None: one that exports none). Every instance's
#: OTLP handler sits on the one request logger, and each exports its own instance's records only. Kept off the record:
#: an application's handlers pickle a record's attributes (``SocketHandler``, a multiprocessing ``QueueHandler``).
_SENDER: ContextVar[Any] = ContextVar("llm_telemetry_request_sender")

#: The most bytes a request line takes as written (UTF-8, with its newline): PIPE_BUF on Linux, the most one write to
#: a pipe puts in it at once. A longer write to a pipe whose reader is behind (a log agent under load) goes in by
#: parts, between which other processes' writes go in: with several workers on one stdout, a client's model name
#: written long (1,024 invisible characters, each a 6-byte escape) broke its own lines and other requests'.
MAX_LINE_BYTES: Final = 4096


#: The generator of request ids: seeded from the OS once, and again in every forked worker (so no two workers
#: share a sequence); ids need to be unique, not unpredictable, and this runs on every request.
_ids = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """A fresh request id (32 hex digits) for requests that arrive without ``x-request-id``."""
    # 128 random bits, like uuid4().hex, without a system call per request.
    return f"{_ids.getrandbits(128):032x}"


_second: list[Any] = [None, ""]  # the last second formatted, and its text: lines of one second share it


def _timestamp(created: float) -> str:
    """``created`` as UTC ISO 8601 with milliseconds (``2025-01-31T12:00:00.123Z``)."""
    second, micros = divmod(round(created * 1_000_000), 1_000_000)  # to the microsecond, as datetime rounds
    cached = _second
    if cached[0] != second:
        text = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        cached[0], cached[1] = second, text
    return f"{cached[1]}{micros // 1000:03d}Z"


# One encoder for every line (json.dumps with options builds a new one per call).
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def _line_encoder() -> Callable[[Any], str]:
    """``_JSON.encode``, or the C encoder it builds on every call built once (~8 k instructions of a request line's
    ~55 k), when ``json`` has it and it writes the same text on a sample. It checks no circular reference: a line's
    values are strings, numbers, booleans and what ``json.loads`` made, which has none."""
    try:
        from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]

        if c_make_encoder is None:
            return _JSON.encode
        # (markers, default, encoder, indent, key separator, item separator, sort_keys, skipkeys, allow_nan)
        encode_parts = c_make_encoder(None, str, encode_basestring, None, ":", ",", False, False, True)
        join = "".join

        def encode(line: Any) -> str:
            return join(encode_parts(line, 0))

        # Escapes, non-ASCII, numbers, nesting, NaN, and a value only ``default=str`` can write.
        sample = {"a": 'x\u00e9"\n\ud800', "b": [1, 2.5, None, True, ("t",)], "c": {"d": float("nan")}, "e": _JSON}
        if encode(sample) == _JSON.encode(sample):
            return encode
    except Exception:
        pass
    return _JSON.encode


_encode_line: Final = _line_encoder()


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``timestamp``, ``level``, ``message``, then the request fields.

    Records without request fields (any other logger) get ``trace_id``/``span_id``/``trace_sampled`` of the current
    span, when there is one, so the application's own lines can share the format. Usage::

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.getLogger("llm_telemetry.requests").addHandler(handler)
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, RECORD_ATTRIBUTE, None)
        if isinstance(fields, Mapping) and not record.exc_info:
            return _request_line(record.created, record.levelname, record.getMessage(), fields)
        line: dict[str, Any] = {
            "timestamp": _timestamp(record.created),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if isinstance(fields, Mapping):
            line.update(fields)
        else:
            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                line["trace_id"] = trace.format_trace_id(span_context.trace_id)
                line["span_id"] = trace.format_span_id(span_context.span_id)
                line["trace_sampled"] = span_context.trace_flags.sampled
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _line_text(_encode_line(line))


def _request_line(created: float, level: str, message: str, fields: Mapping[str, Any]) -> str:
    """A request line as :class:`JsonFormatter` writes it: at most :data:`MAX_LINE_BYTES` with its newline."""
    line = {"timestamp": _timestamp(created), "level": level.lower(), "message": message, **fields}
    text = _line_text(_encode_line(line))
    # A character takes at most 4 bytes, so a line this short fits whatever it holds: the one check most lines cost.
    if len(text) <= _SURELY_FITS or _size(text) <= _MAX_TEXT_BYTES:
        return text
    return _shortened(line, text)


#: Bytes of a line's text, without its newline; and the most characters that cannot take more.
_MAX_TEXT_BYTES: Final = MAX_LINE_BYTES - 1
_SURELY_FITS: Final = _MAX_TEXT_BYTES // 4


def _size(text: str) -> int:
    """The bytes ``text`` takes in UTF-8 (text as written: :func:`_line_text` replaced any lone surrogate)."""
    return len(text) if text.isascii() else len(text.encode())


def _written_size(value: str) -> int:
    """Bytes ``value`` takes in a line as written: quoted, escaped."""
    return _size(_line_text(_encode_line(value)))


def _shortened(line: dict[str, Any], text: str) -> str:
    """``line`` written within :data:`MAX_LINE_BYTES`, its longest strings cut (``text``: it written whole).

    The free text of a line is what a client sends or an app or its upstream names: the model (up to 1,024
    characters), the request id (128), and the message and the service. Written, a character takes up to 12 bytes
    (an invisible one beyond U+FFFF is escaped as a surrogate pair). The strings share what the rest of the line
    leaves: those shorter than an equal share stay whole, each longer one is cut to the share left, ending in
    ``...[truncated]`` (whole characters, cut before escaping, so a JSON reader gets the start of what was sent).
    Numbers, booleans and nulls stay as they are (the middleware's are short); a line whose other fields leave no
    room for the strings' marks (a mapping of the app's own, of hundreds of fields) is written longer, only its
    strings over :data:`_CUT_WHEN_NO_ROOM` bytes cut.
    """
    sizes = {key: _written_size(value) for key, value in line.items() if isinstance(value, str)}
    room = _MAX_TEXT_BYTES - (_size(text) - sum(sizes.values()))
    share = _share(sorted(sizes.values()), room)
    if share < 2 + len(TRUNCATION_MARK):
        # No room even for the strings' marks (an app's own mapping of hundreds of numbers): the line cannot be brought
        # within the bound. The long strings, the ones a client or an app can make long, are cut to a fixed length,
        # and the short ones (the timestamp, the level) stay whole.
        share = _CUT_WHEN_NO_ROOM
    for key, size in sizes.items():
        if size > share:
            line[key] = _cut(line[key], share, size)
    return _line_text(_encode_line(line))


def _share(sizes: list[int], room: int) -> int:
    """The most bytes each string may take so that all of them take at most ``room`` (``sizes`` ascending): those
    that fit an equal share of what the smaller ones leave stay whole."""
    left = len(sizes)
    for size in sizes:
        if size * left > room:
            return room // left
        room -= size
        left -= 1
    return room


#: The bytes a string keeps, written, on a line that cannot be brought within the bound (see :func:`_shortened`).
_CUT_WHEN_NO_ROOM: Final = 256
#: The most bytes one character takes written: an invisible one beyond U+FFFF, escaped as a surrogate pair.
_MOST_CHARACTER_BYTES: Final = 12


def _cut(value: str, most: int, size: int) -> str:
    """A start of ``value`` (``size``: the bytes it takes written) that, followed by :data:`TRUNCATION_MARK`, takes
    at most ``most`` bytes written; just the mark when none does. Escaped at most once more: the start is taken in
    proportion to what the whole takes, which fits a string escaped evenly; one that does not fit (some characters
    escaped, others not) gives way to as many characters as fit at the most bytes a character takes. Each escape of a
    hostile string costs about as much as writing the line, so a search of ten of them made such a line cost ten times
    that. A string escaped unevenly may keep fewer characters than would fit. (The mark is ASCII, written as it is.)"""
    budget = most - len(TRUNCATION_MARK)
    kept = len(value)
    if size > budget:
        kept = min(kept - 1, kept * budget // size)
        if kept > 0 and _written_size(value[:kept]) > budget:
            kept = min(kept, max(0, (budget - 2) // _MOST_CHARACTER_BYTES))  # (2: the quotes)
    return value[:kept] + TRUNCATION_MARK


#: Characters JSON lets stand unescaped in a string that a reader of the raw line should not meet raw (see
#: labels.INVISIBLE): DEL (a terminal shows nothing for it), the Unicode line breaks, the C1 controls and the invisible
#: format characters, with which a client's model name or request id could end the line, hide in it or turn the rest
#: of it around in a terminal. Escaped, one line stays one line and reads as written; a JSON reader gets them back.
_INVISIBLE: Final = re.compile("[\x7f" + INVISIBLE.pattern[1:])


def _escape(code: int) -> str:
    """The JSON escape of the character ``code``."""
    if code > 0xFFFF:  # (a tag character): JSON spells it as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _escape_table() -> dict[int, str]:
    """Each character :data:`_INVISIBLE` matches, to its escape (for ``str.translate``), read from its class: single
    characters and ``first-last`` ranges."""
    members = _INVISIBLE.pattern[1:-1]
    table: dict[int, str] = {}
    at = 0
    while at < len(members):
        first = last = ord(members[at])
        if members[at + 1 : at + 2] == "-":
            last, at = ord(members[at + 2]), at + 3
        else:
            at += 1
        table.update((code, _escape(code)) for code in range(first, last + 1))
    return table


#: Each invisible character to its escape, for ``str.translate`` on a run of them.
_ESCAPES: Final = _escape_table()
#: A run of invisible characters: one replacement call a run, not one a character (a client's model name of 1,024 of
#: them took ~0.4 ms in calls, one a character), and ``str.translate`` only over the run, whose every character is
#: in the table (over a whole line it looked up every other character too, and cost more for a line with one).
_INVISIBLE_RUNS: Final = re.compile(_INVISIBLE.pattern + "+")


def _escaped_run(found: re.Match[str]) -> str:
    return found.group().translate(_ESCAPES)


def _line_text(encoded: str) -> str:
    """An encoded line as written: lone surrogates (JSON allows them in any string a client sends, and they would
    make the handler's write fail) replaced, Unicode line breaks and invisible characters escaped. (The JSON's own
    structure is ASCII: these can only be inside strings, where the escape means the same character.)"""
    if encoded.isascii():
        return encoded if "\x7f" not in encoded else encoded.replace("\x7f", "\\u007f")
    return _INVISIBLE_RUNS.sub(_escaped_run, valid_text(encoded))


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is at emit time (test runners and daemons replace it), with
    :class:`JsonFormatter`."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        #: The middleware instances writing through it (see RequestLogs), and ``propagate`` before it was added.
        self.users = 0
        self.propagate_before = True

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stdout

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """A line through ``logging`` (a filter on the handler or the logger, another handler beside it), written as
        :func:`_write_line` writes it: after what the app left in stdout's buffers, which goes out by itself."""
        try:
            sys.stdout.flush()
        except Exception:
            self.handleError(record)
            return
        super().emit(record)


#: Held while instances share or let go of the stdout handler on the request logger.
_SHARED: Final = threading.Lock()


def _write_line(handler: _StdoutHandler, text: str) -> None:
    """What ``handler.emit`` does with a formatted line: write it and flush, under the handler's lock. What the app
    wrote to stdout and left in its buffers is flushed first, by itself: joined to the line, one write could take it
    past :data:`MAX_LINE_BYTES`, and a pipe takes such a write by parts (a flush of empty buffers writes nothing)."""
    handler.acquire()
    try:
        stream = sys.stdout
        stream.flush()
        stream.write(text + handler.terminator)
        stream.flush()
    except Exception:
        # As the handler reports a failed write (to stderr, when logging.raiseExceptions), never to the app.
        handler.handleError(logging.makeLogRecord({"msg": text, "name": REQUEST_LOGGER}))
    finally:
        handler.release()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class RequestLogObserver:
    """Writes one line per finished LLM call to :data:`REQUEST_LOGGER`.

    Args:
        service: the ``service`` field (the OpenTelemetry ``service.name``).
        logger: where to write; default ``logging.getLogger(REQUEST_LOGGER)``.

    Successful calls log at INFO, failed ones (``error_type`` set) at WARNING.
    """

    def __init__(self, service: str, logger: logging.Logger | None = None) -> None:
        self.service = service
        self.logger = logger or logging.getLogger(REQUEST_LOGGER)
        #: The stdout handler the middleware gave the logger, and its OTLP handler (when it exports over OTLP).
        self._direct: _StdoutHandler | None = None
        self._otlp: OTLPLogHandler | None = None
        #: Set when the middleware's handlers were taken off at shutdown.
        self._closed = False

    def start(self, call: LLMCall) -> None:
        pass

    def end(self, call: LLMCall) -> None:
        level = logging.WARNING if call.error_type else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        trace_id = span_id = sampled = None
        span = call.span if call.span is not None else trace.get_current_span(call.otel_context)
        span_context = span.get_span_context()
        if span_context.is_valid:
            trace_id = trace.format_trace_id(span_context.trace_id)
            span_id = trace.format_span_id(span_context.span_id)
            # A sampler that drops the trace still gives it ids (propagated to the app's upstream calls): a log
            # viewer's link from the line to the trace finds it only when this is true.
            sampled = span_context.trace_flags.sampled
        model = call.request_model or call.response_model
        fields = {
            "request_id": call.request_id,
            "trace_id": trace_id,
            "span_id": span_id,
            "trace_sampled": sampled,
            "service": self.service,
            "operation": call.operation,
            "provider": call.provider,
            "model": model,
            "stream": call.stream,
            "status_code": call.status_code,
            "error_type": call.error_type,
            "input_tokens": call.input_tokens,
            "output_tokens": call.output_tokens,
            "cost_usd": call.cost_usd,
            "duration_ms": _ms(call.duration),
            "ttft_ms": _ms(call.time_to_first_token),
        }
        # The message (the OTLP record's body) is printed raw by log viewers: the model in it is ``other`` when it
        # could not be a label value (too long, or holding a line break or other control character).
        shown = label_value(model) if model else "unknown"
        message = f"{call.operation} {shown} {call.status_code if call.status_code is not None else '-'}"
        logger = self.logger
        handler = self._direct
        otlp = self._otlp
        handlers = logger.handlers
        if (
            handler is not None
            and (handlers == [handler] or (otlp is not None and handlers == [handler, otlp] and not otlp.filters))
            and not logger.filters
            and not logger.propagate
            and not handler.filters
            and type(handler.formatter) is JsonFormatter
        ):
            # Only our handlers, as set up: the line the stdout handler would write, written as it would write it,
            # and the record the OTLP handler would emit, without a LogRecord and the logging machinery's dispatch
            # (about a third of a line's cost).
            created = time.time()
            if level >= handler.level:
                _write_line(handler, _request_line(created, logging.getLevelName(level), message, fields))
            if otlp is not None and len(handlers) == 2 and level >= otlp.level:
                try:
                    otel_context = call.otel_context if call.otel_context is not None else context.get_current()
                    otlp.send(created, level, message, fields, otel_context)
                except Exception:
                    otlp.handleError(logging.makeLogRecord({"msg": message, "name": REQUEST_LOGGER}))
            return
        if self._closed and handler is not None:
            # A request that ended after the shutdown took our handlers off (one the server cancelled and the
            # shutdown did not wait for): its line still goes to stdout as JSON, not to logging's plain stderr.
            _write_line(handler, _request_line(time.time(), logging.getLevelName(level), message, fields))
            return
        # Current while logging, so OpenTelemetry-aware handlers (ours for OTLP, or the app's) see the LLM span.
        # What Logger.log does, minus finding the caller's source line (which no request line shows).
        record = logger.makeRecord(
            logger.name,
            level,
            __file__,
            0,
            message,
            (),
            None,
            "end",
            {RECORD_ATTRIBUTE: fields},
        )
        token = context.attach(call.otel_context) if call.otel_context is not None else None
        sender = _SENDER.set(otlp)
        try:
            try:
                logger.handle(record)
            except Exception:
                # A handler of the app's raised (logging's own report a failure to stderr instead) and so kept the
                # handlers after it from the record: the OTLP record still goes out, as it does whatever handlers the
                # logger has. (The OTLP handler, having sent it, takes itself off _SENDER.)
                if otlp is not None and _SENDER.get(None) is otlp and otlp in logger.handlers:
                    if record.levelno >= otlp.level:
                        otlp.handle(record)
                raise
        finally:
            _SENDER.reset(sender)
            if token is not None:
                context.detach(token)


class OTLPLogHandler(logging.Handler):
    """Sends request lines to an OpenTelemetry logger provider: body = message, attributes = non-null fields.

    Args:
        provider: an SDK ``LoggerProvider``.
    """

    def __init__(self, provider: Any) -> None:
        super().__init__()
        from opentelemetry._logs import SeverityNumber

        self.provider = provider
        self._otel_logger = provider.get_logger(REQUEST_LOGGER)
        self._direct = _DirectEmit.of(self._otel_logger)
        self._severity = {
            logging.DEBUG: SeverityNumber.DEBUG,
            logging.INFO: SeverityNumber.INFO,
            logging.WARNING: SeverityNumber.WARN,
            logging.ERROR: SeverityNumber.ERROR,
            logging.CRITICAL: SeverityNumber.FATAL,
        }

    def emit(self, record: logging.LogRecord) -> None:
        if _SENDER.get(self) is not self:
            return  # another instance's request (under its own resource, through its own handler, or by none)
        if _SENDER.get(None) is self:
            _SENDER.set(None)  # sent, for the observer that set it (and resets it once the logger is done)
        try:
            fields = getattr(record, RECORD_ATTRIBUTE, None) or {}
            self.send(record.created, record.levelno, record.getMessage(), fields, context.get_current())
        except Exception:
            self.handleError(record)

    def send(
        self, created: float, level: int, message: str, fields: Mapping[str, Any], otel_context: context.Context
    ) -> None:
        """Emit one record: what :meth:`emit` sends for a ``logging`` record of these values, in ``otel_context``."""
        name = logging.getLevelName(level)
        values = {
            "timestamp": int(created * 1e9),
            "context": otel_context,
            "severity_number": self._severity.get(level),
            "severity_text": "WARN" if name == "WARNING" else name,
            "body": message,
            "attributes": {k: v for k, v in fields.items() if v is not None and k not in _RECORD_CONTEXT},
        }
        direct = self._direct
        if direct is None or not direct.emit(values):
            self._otel_logger.emit(**values)


#: The types of request-line field values (nulls are left out): attribute values the SDK keeps as they are.
_PLAIN: Final = (str, int, float, bool)


class _DirectEmit:
    """Hands our log records to the SDK's batch processor as the SDK's own ``Logger.emit`` would, minus the work
    that changes nothing for them: when the logger's only processor is the SDK's ``BatchLogRecordProcessor``, no
    attribute length limit is set and a record's attributes are within the count limit, the SDK wraps them in
    ``BoundedAttributes`` (cleaning each value: ours are already strings, numbers and booleans), builds a
    read-write record and then a copy of it; this builds the read-only record the processor queues, once (about
    30 µs of CPU per record less, in one timing). Any other pipeline or record, and a logger the provider disables,
    take the SDK's path."""

    __slots__ = ("context", "logger", "max_attributes", "processors", "queue", "readable", "record")

    def __init__(self, logger: Any, processors: Any, queue: Any, record: Any, readable: Any, empty: Any) -> None:
        self.logger = logger
        self.processors = processors
        self.queue = queue
        self.record = record
        self.readable = readable
        self.context = empty
        self.max_attributes = logger._log_record_limits.max_log_record_attributes

    @classmethod
    def of(cls, logger: Any) -> _DirectEmit | None:
        try:
            from opentelemetry._logs import LogRecord
            from opentelemetry.context import Context
            from opentelemetry.sdk._logs import LogRecordLimits, ReadableLogRecord
            from opentelemetry.sdk._logs._internal import Logger
            from opentelemetry.sdk._logs._internal._logger_metrics import NoOpLoggerMetrics
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

            if type(logger) is not Logger or type(logger._logger_metrics) is not NoOpLoggerMetrics:
                return None
            limits = logger._log_record_limits
            if (
                type(limits) is not LogRecordLimits
                or limits.max_log_record_attribute_length is not None
                or type(limits.max_log_record_attributes) is not int
            ):
                return None
            processors = logger._multi_log_record_processor._log_record_processors
            if len(processors) != 1 or type(processors[0]) is not BatchLogRecordProcessor:
                return None
            queue = processors[0]._batch_processor.emit
            if not callable(queue) or not isinstance(logger._is_enabled(), bool):
                return None
            return cls(logger, processors, queue, LogRecord, ReadableLogRecord, Context)
        except Exception:  # an SDK release without these parts: its own path
            return None

    def emit(self, values: dict[str, Any]) -> bool:
        """Queue the record of ``values`` (the arguments of ``Logger.emit``); False, having done nothing, when it
        must take the SDK's path."""
        logger = self.logger
        attributes = values["attributes"]
        if (
            logger._multi_log_record_processor._log_record_processors is not self.processors
            or not logger._logger_config.is_enabled
            or len(attributes) > self.max_attributes
            or not all(type(v) in _PLAIN for v in attributes.values())
        ):
            return False
        record = self.record(**values)
        record.context = self.context()  # as the batch processor's copy: no reference to the request's context
        self.queue(self.readable(record, logger._resource, logger._instrumentation_scope, logger._log_record_limits))
        return True


def _otlp_logger_provider(protocol: str, resource: Any = None) -> tuple[Any, bool]:
    """The application's global SDK LoggerProvider, or a new one of ``resource`` (default: the environment's)
    exporting over OTLP (owned by us)."""
    from opentelemetry._logs import get_logger_provider
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    current = get_logger_provider()
    if isinstance(current, LoggerProvider):
        return current, False
    if resource is None:
        from opentelemetry.sdk.resources import Resource

        resource = Resource.create()
    provider = LoggerProvider(resource=resource, shutdown_on_exit=False)  # see Telemetry's exit handler
    exporter: Any
    if protocol == "grpc":
        from .otlp_grpc import OTLPGrpcLogExporter  # the SDK's, with our log encoding

        exporter = OTLPGrpcLogExporter()
    else:
        from .otlp_logs import OTLPLogExporter  # the SDK's, with a faster encoding (and transport)

        exporter = OTLPLogExporter()
    provider.add_log_record_processor(batch_processor(BatchLogRecordProcessor, exporter, "OTEL_BLRP"))
    return provider, True


class RequestLogs:
    """Request logging for one middleware instance: the observer, the stdout handler and optional OTLP export.

    Args:
        service: the ``service`` field of every line.
        env: environment (``OTEL_LOGS_EXPORTER``, OTLP protocol); default ``os.environ``.
        resource: the SDK ``Resource`` of the OTLP records, when the logger provider is ours (a global SDK one the
            application installed keeps its own); default the environment's (``Resource.create()``).
        otel: ``env`` read already (by the middleware's setup, which warns once of a value it does not know).
    """

    def __init__(
        self,
        service: str,
        env: Mapping[str, str] | None = None,
        resource: Any = None,
        otel: OTelEnvironment | None = None,
    ) -> None:
        otel = otel or OTelEnvironment.resolve(env)
        self.logger = logging.getLogger(REQUEST_LOGGER)
        self.observer = RequestLogObserver(service, self.logger)
        self._handlers: list[logging.Handler] = []
        self._provider: Any = None
        self._owns_provider = False
        #: The stdout handler this instance uses, shared by every instance that found it on the logger: the last of
        #: them to shut down takes it off and puts ``propagate`` back (one shut down earlier left the others
        #: writing to no handler at all, their lines lost or plain on stderr).
        self._stdout: _StdoutHandler | None = None
        with _SHARED:
            handler = next((h for h in self.logger.handlers if isinstance(h, _StdoutHandler)), None)
            if handler is None and not self.logger.handlers:
                handler = _StdoutHandler()
                handler.propagate_before, self.logger.propagate = self.logger.propagate, False
                self.logger.addHandler(handler)
            if handler is not None:
                handler.users += 1
                self._stdout = self.observer._direct = handler
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.INFO)
        for kind in otel.logs_exporters:
            if kind not in ("otlp", "console"):  # (console: the lines are on stdout already)
                # Ignored without a word, a typo or the SDK's otlp_proto_http left the records unsent, unsaid.
                logging.getLogger("llm_telemetry").warning(
                    "llm-telemetry: %s: unsupported exporter %r ignored (otlp sends the request log records over OTLP)",
                    OTEL_LOGS_EXPORTER,
                    kind,
                )
        if "otlp" in otel.logs_exporters:  # never when OTEL_SDK_DISABLED=true
            self._provider, self._owns_provider = _otlp_logger_provider(otel.logs_protocol, resource)
            otlp = OTLPLogHandler(self._provider)
            self._add(otlp)
            self.observer._otlp = otlp

    def _add(self, handler: logging.Handler) -> None:
        self.logger.addHandler(handler)
        self._handlers.append(handler)

    def keep_enabled(self) -> None:
        """Undo what a logging configuration the application applied in its startup did to the request logger as a
        side effect, leaving it as the same configuration applied before the middleware set up would have.
        ``logging.config.dictConfig`` and ``fileConfig`` disable every logger that exists and that they do not name
        (``disable_existing_loggers``, true unless told otherwise), which this one does once the middleware has set
        up; and they take every handler off a logger they name, and off the loggers below one they name (naming
        ``llm_telemetry`` to set its level, say), whose level they reset too. Disabled, or left without its handlers
        (and not propagating, as the middleware set it), it wrote no line and sent no OTLP record, and said nothing
        (the ``llm_telemetry`` logger, which would say it, is disabled alike). The OTLP handler is put back whatever
        handlers the configuration gave the logger; the stdout handler when it gave it none. The request lines are
        turned off with ``LLM_TELEMETRY_REQUEST_LOGS``."""
        logger = self.logger
        logger.disabled = False
        with _SHARED:
            stdout = self._stdout
            handlers = logger.handlers
            if stdout is not None and stdout not in handlers and all(h in self._handlers for h in handlers):
                # Taken off, with no handler of the app's put in its place: back as the setup adds it, first.
                for handler in self._handlers:
                    logger.removeHandler(handler)
                logger.addHandler(stdout)
                logger.propagate = False
        for handler in self._handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)

    def global_provider_installed(self) -> bool:
        """Whether the records go through a logger provider of ours while the application has since installed a
        global SDK one (in its lifespan startup), which they would go through were this set up now."""
        if self._provider is None or not self._owns_provider:
            return False
        from opentelemetry._logs import get_logger_provider
        from opentelemetry.sdk._logs import LoggerProvider

        return isinstance(get_logger_provider(), LoggerProvider)

    def force_flush(self) -> None:
        if self._provider is not None:
            self._provider.force_flush()

    def shutdown(self) -> None:
        """Remove the handlers we added (the stdout handler once no instance uses it) and shut down the logger
        provider we created."""
        for handler in self._handlers:
            self.logger.removeHandler(handler)
        self._handlers.clear()
        self.observer._closed = True
        with _SHARED:
            stdout, self._stdout = self._stdout, None
            if stdout is not None:
                stdout.users -= 1
                if stdout.users == 0:
                    self.logger.removeHandler(stdout)
                    self.logger.propagate = stdout.propagate_before
        if self._provider is not None and self._owns_provider:
            self._provider.shutdown()
        self._provider = None
