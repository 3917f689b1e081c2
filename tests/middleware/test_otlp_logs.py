"""The OTLP log encoding of our exporter: the same request bytes as the SDK encoder's, and what a receiver gets."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context, trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as sdk_encode_logs
from opentelemetry.sdk._logs import (
    LoggerProvider,
    LoggingHandler,
    LogRecordDroppedAttributesWarning,
    LogRecordLimits,
    ReadableLogRecord,
)
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, LogRecordExportResult, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from llm_telemetry.logs import RECORD_ATTRIBUTE, OTLPLogHandler
from llm_telemetry.otlp_logs import OTLPLogExporter, encode_logs, encode_logs_request
from otlp_receiver import OTLPReceiver, demo_server, grpc_deliveries, otlp_receiver, tracing_env, wait_span
from support import free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]

TRACE_ID, SPAN_ID = 0x5CF92F3577B34DA6A3CE929D0E0E4737, 0x10F067AA0BA902B8
RESOURCE = Resource({"service.name": "llm-test", "deployment.environment": "test"})


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as r:
        yield r


def in_span(trace_id: int, span_id: int, flags: int = 1) -> Any:
    return trace.set_span_in_context(NonRecordingSpan(SpanContext(trace_id, span_id, True, TraceFlags(flags))))


def sdk_bytes(records: list[ReadableLogRecord]) -> bytes:
    return sdk_encode_logs(records).SerializeToString()


def request_log_records() -> list[ReadableLogRecord]:
    """Records as the middleware's handler makes them (through the SDK logger provider): the request-log shape at
    each level, in a span and outside one, plus the other shapes a provider hands an exporter (event names, bodies
    of every type, no severity, limits dropping attributes, a second logger with a scope schema and attributes)."""
    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=RESOURCE)
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    bounded = LoggerProvider(resource=RESOURCE, log_record_limits=LogRecordLimits(max_attributes=3))
    bounded.add_log_record_processor(SimpleLogRecordProcessor(memory))
    handler = OTLPLogHandler(provider)
    fields = {
        "request_id": "9b2f0c5e8d7a4f3e9c1b2a3d4e5f6071",
        "trace_id": "ignored",
        "span_id": "ignored",
        "service": "llm-test",
        "operation": "chat",
        "provider": "openai",
        "model": "gpt-4o",
        "stream": True,
        "status_code": 200,
        "error_type": None,
        "input_tokens": 12,
        "output_tokens": 240,
        "cost_usd": 0.00245,
        "duration_ms": 812.345,
        "ttft_ms": 95.5,
    }
    for level, extra in ((logging.INFO, {}), (logging.WARNING, {"status_code": 429, "error_type": "rate_limit"})):
        record = logging.makeLogRecord(
            {
                "levelno": level,
                "levelname": logging.getLevelName(level),
                "msg": "chat gpt-4o 200",
                RECORD_ATTRIBUTE: {**fields, **extra},
            }
        )
        token = context.attach(in_span(TRACE_ID, SPAN_ID))
        try:
            handler.emit(record)
        finally:
            context.detach(token)
        handler.emit(record)  # outside any span: no trace context
    with pytest.warns(LogRecordDroppedAttributesWarning):
        bounded.get_logger("limited").emit(body="over the limit", attributes={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    other = provider.get_logger("app", "1.0", "https://opentelemetry.io/schemas/1.26.0", {"scope.attr": True})
    other.emit(
        event_name="gen_ai.client.inference.operation.details",
        body={"messages": [{"role": "user", "parts": ["hi", 2, 2.5, True, None, b"\x00\xff"]}], "n": -(2**63)},
        severity_number=SeverityNumber.ERROR4,
        severity_text="ERROR",
        timestamp=1_700_000_000_000_000_001,
        context=in_span(TRACE_ID, SPAN_ID, flags=0),
    )
    other.emit(body=None)
    other.emit(body=b"raw")
    other.emit(body=["a", ("b", 3)], attributes={"nested": {"k": [1, {"deep": "x"}]}, "list": [1.5, 2.5]})
    provider.shutdown()
    bounded.shutdown()
    return [*memory.get_finished_logs()]


def test_the_request_logs_bytes_are_the_sdk_encoders() -> None:
    records = request_log_records()
    assert encode_logs_request(records) == sdk_bytes(records)
    assert encode_logs_request(records) == sdk_bytes(records)  # again, recurring values now from the caches
    request = encode_logs(records)
    assert request == sdk_encode_logs(records)
    # The batch covers what it claims: trace context in and out, dropped attributes, an event, a second scope.
    (resource_logs,) = request.resource_logs
    scopes = {s.scope.name: s for s in resource_logs.scope_logs}
    first = scopes["llm_telemetry.requests"].log_records[0]
    assert first.trace_id.hex() == f"{TRACE_ID:032x}" and first.span_id.hex() == f"{SPAN_ID:016x}"
    assert first.flags == 1 and first.severity_number == SeverityNumber.INFO.value and first.severity_text == "INFO"
    assert first.body.string_value == "chat gpt-4o 200"
    assert {kv.key for kv in first.attributes} >= {"request_id", "model", "cost_usd", "stream"}
    assert scopes["llm_telemetry.requests"].log_records[1].trace_id == b""
    assert scopes["limited"].log_records[0].dropped_attributes_count == 2
    event = scopes["app"].log_records[0]
    assert event.event_name == "gen_ai.client.inference.operation.details" and event.flags == 0
    assert scopes["app"].schema_url == "https://opentelemetry.io/schemas/1.26.0"
    assert scopes["app"].scope.attributes[0].key == "scope.attr"


def readable(
    body: Any = "b",
    attributes: Any = None,
    resource: Resource = RESOURCE,
    scope: InstrumentationScope | None = None,
    **fields: Any,
) -> ReadableLogRecord:
    return ReadableLogRecord(LogRecord(body=body, attributes=attributes, **fields), resource, scope)


def test_resources_are_grouped_as_the_sdk_groups_them() -> None:
    """An equal Resource object joins the first one's entry; one that is equal but hashes differently (``1`` and
    ``True`` compare equal, their JSON differs) gets its own, as the SDK encoder's dict of resources does; a scope
    of the same name and version but other attributes is a scope of its own, an equal one joins the first."""
    scope = InstrumentationScope("s", "1")
    records = [
        readable(resource=Resource({"a": 1})),
        readable(resource=Resource({"a": 2}, "https://example.com/schema"), scope=scope),
        readable(resource=Resource({"a": 1}), scope=InstrumentationScope("s", "1", None, {"other": "attrs"})),
        readable(resource=Resource({"a": True})),
        readable(resource=Resource({"a": 1}), scope=scope),
    ]
    assert encode_logs_request(records) == sdk_bytes(records)
    assert [len(r.scope_logs) for r in encode_logs(records).resource_logs] == [3, 1, 1]
    equal_scope = readable(resource=Resource({"a": 1}), scope=InstrumentationScope("s", "1"))  # other objects
    assert encode_logs_request([*records, equal_scope]) == sdk_bytes([*records, equal_scope])
    assert [len(s.log_records) for s in encode_logs([*records, equal_scope]).resource_logs[0].scope_logs] == [1, 1, 2]


def test_values_the_sdk_encoder_cannot_carry() -> None:
    """An attribute OTLP cannot carry is left out (and logged), as the SDK encoder does; a body or a time it cannot
    carry makes the whole request fail to encode, for both."""
    records = [readable(attributes={"before": 1, "huge": 2**70, "bad\ud800": "x", "after": "kept"})]
    assert encode_logs_request(records) == sdk_bytes(records)
    assert [kv.key for kv in encode_logs(records).resource_logs[0].scope_logs[0].log_records[0].attributes] == [
        "before",
        "after",
    ]
    for bad in (readable(body=2**64), readable(body="\ud800"), readable(body=object()), readable(timestamp=2**64)):
        with pytest.raises(Exception):  # noqa: B017 - the SDK encoder raises Exception itself for some
            sdk_bytes([bad])
        with pytest.raises((ValueError, TypeError, OverflowError, struct.error)):
            encode_logs_request([bad])


def test_an_attribute_key_otlp_cannot_carry_is_logged_by_a_handler_writing_strict_utf8() -> None:
    """The warning about an attribute left out names its key escaped: a lone surrogate written as is fails a
    handler that writes strict UTF-8, as a StreamHandler on a UTF-8 stdout does ("--- Logging error ---" on stderr,
    and the warning lost)."""
    failures: list[logging.LogRecord] = []

    class Counting(logging.StreamHandler):  # type: ignore[type-arg]
        def handleError(self, record: logging.LogRecord) -> None:
            failures.append(record)

    written = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    handler = Counting(written)
    logger = logging.getLogger("llm_telemetry")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        # A key of its own, met twice: the first time with its traceback, then in one line at DEBUG; each is
        # written escaped.
        key = f"strict\ud800-{id(handler)}"
        for _ in range(2):
            encode_logs_request([readable(attributes={key: "x", "kept": 1})])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert failures == []
    text = written.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert text.count(f"failed to encode OTLP attribute 'strict\\ud800-{id(handler)}'") == 2, text


_keys = st.text(max_size=8) | st.sampled_from(["", "k" * 127, "k" * 128, "é" * 63, "é" * 64, "k" * 120, "\ud800"])
_strings = (
    st.text(max_size=20)
    | st.text(st.characters(max_codepoint=127), min_size=100, max_size=140)
    | st.sampled_from(["", "x" * 125, "x" * 126, "x" * 127, "x" * 128, "ü" * 64, "z" * 20_000, "chat gpt-4o 200"])
)
_scalars = (
    _strings
    | st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=140)
    | st.sampled_from([0, 1, True, False, 0.0, -0.0, 127, 128, 2**63 - 1])
)
_any_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple) | st.dictionaries(_keys, inner),
    max_leaves=8,
)
_attribute_sets = st.none() | st.dictionaries(_keys, _any_values, max_size=5)
_resources = st.sampled_from(
    [
        RESOURCE,
        Resource({"service.name": "llm-test", "deployment.environment": "test"}),
        Resource({}, "https://s"),
        Resource({"k" * 127: "v" * 128, "n": 1}),
    ]
)
_scopes = st.sampled_from(
    [
        None,
        InstrumentationScope("llm_telemetry.requests"),
        InstrumentationScope("app", "1.0", "https://opentelemetry.io/schemas/1.26.0", {"scope.attr": [1, 2]}),
        InstrumentationScope("app", "1.0", "https://opentelemetry.io/schemas/1.26.0"),
        InstrumentationScope("", None, None, {"x": "y"}),
    ]
)
_times = st.none() | st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(min_value=0, max_value=2**64 - 1)
_ids = st.sampled_from([0, 1]) | st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def _records(draw: st.DrawFn) -> ReadableLogRecord:
    trace_id = draw(st.sampled_from([0, TRACE_ID, 2**128 - 1]) | st.integers(min_value=0, max_value=2**128 - 1))
    span_id, flags = draw(_ids), draw(st.sampled_from([0, 1, 0xFF]))
    attributes = draw(_attribute_sets)
    if attributes is not None and draw(st.booleans()):  # as a provider hands them: bounded, some dropped
        attributes = BoundedAttributes(draw(st.sampled_from([None, 0, 1, 3])), attributes, immutable=False)
    log = LogRecord(
        timestamp=draw(_times),
        observed_timestamp=draw(_times),
        context=in_span(trace_id, span_id, flags),
        severity_number=draw(st.none() | st.sampled_from([*SeverityNumber, 9])),  # a plain int: not sent
        severity_text=draw(st.none() | _strings),
        body=draw(_any_values),
        attributes=attributes,
        event_name=draw(st.none() | _strings),
    )
    return ReadableLogRecord(log, draw(_resources), draw(_scopes))


@settings(max_examples=400, deadline=None)
@given(st.lists(_records(), min_size=1, max_size=6))
def test_arbitrary_records_are_encoded_as_the_sdk_encodes_them(records: list[ReadableLogRecord]) -> None:
    """Bodies and attribute values of every AnyValue type (nested lists, tuples and maps, integers beyond int64,
    NaN, bytes), keys and strings either side of one-byte lengths, severities (none too), times, trace contexts
    valid or not, event names, dropped attributes, several resources and scopes: our bytes are the protobuf
    library's for the SDK encoder's request, and where the SDK encoder fails, ours fails too."""
    logging.disable(logging.CRITICAL)  # attributes that cannot be encoded are logged, by both encoders
    try:
        try:
            expected = sdk_bytes(records)
        except Exception:
            with pytest.raises(Exception):  # noqa: B017
                encode_logs_request(records)
            return
        for _ in range(2):
            assert encode_logs_request(records) == expected
    finally:
        logging.disable(logging.NOTSET)


def test_the_exporter_delivers_to_an_otlp_receiver(receiver: OTLPReceiver) -> None:
    records = request_log_records()
    exporter = OTLPLogExporter(endpoint=receiver.http_endpoint + "/v1/logs", headers={"x-token": "logs-1"})
    assert exporter._own_encoding
    assert exporter.export(records) is LogRecordExportResult.SUCCESS
    assert receiver.wait_for(lambda r: sum(rec.attributes.get("model") == "gpt-4o" for rec in r.logs) >= 4)
    got = [rec for rec in receiver.logs if rec.attributes.get("request_id") == "9b2f0c5e8d7a4f3e9c1b2a3d4e5f6071"]
    assert [(rec.severity_text, rec.attributes["status_code"]) for rec in got[:3:2]] == [("INFO", 200), ("WARN", 429)]
    assert (got[0].trace_id, got[0].span_id) == (f"{TRACE_ID:032x}", f"{SPAN_ID:016x}")
    assert got[0].body == "chat gpt-4o 200" and got[0].resource["service.name"] == "llm-test"
    assert got[0].attributes["cost_usd"] == 0.00245 and got[0].attributes["stream"] is True
    assert receiver.wait_for(lambda r: any(rec.body == b"raw" for rec in r.logs))
    assert any(h.get("x-token") == "logs-1" for h in receiver.headers)
    exporter.shutdown()
    assert exporter.export(records) is LogRecordExportResult.FAILURE  # after shutdown, as the SDK exporter answers


def test_a_batch_our_encoder_cannot_encode_takes_the_sdks_path(
    receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = OTLPLogExporter(endpoint=receiver.http_endpoint + "/v1/logs")
    with caplog.at_level(logging.ERROR):
        assert exporter.export([readable(body=2**64)]) is LogRecordExportResult.FAILURE
    assert "Failed to encode logs batch" in caplog.text  # the SDK exporter's own report
    exporter.shutdown()


def test_a_request_over_the_size_limit_is_dropped_as_the_sdk_drops_it(
    receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = OTLPLogExporter(endpoint=receiver.http_endpoint + "/v1/logs", max_request_size=200)
    with caplog.at_level(logging.WARNING):
        assert exporter.export([readable(body="too long " * 20)]) is LogRecordExportResult.FAILURE
    assert "exceeds max_request_size" in caplog.text
    assert exporter.export([readable(body="fits")]) is LogRecordExportResult.SUCCESS
    assert receiver.wait_for(lambda r: any(rec.body == "fits" for rec in r.logs))
    assert not any(rec.body == "too long " * 20 for rec in receiver.logs)
    exporter.shutdown()


def test_without_the_sdk_parts_it_relies_on_the_exporter_is_the_sdks(receiver: OTLPReceiver) -> None:
    exporter = OTLPLogExporter(endpoint=receiver.http_endpoint + "/v1/logs")
    exporter._own_encoding = False
    assert exporter.export([readable(body="sdk path")]) is LogRecordExportResult.SUCCESS
    assert receiver.wait_for(lambda r: any(rec.body == "sdk path" for rec in r.logs))
    exporter.shutdown()


def test_a_request_log_over_otlp_http_arrives_with_its_trace_ids(receiver: OTLPReceiver) -> None:
    """End to end: the demo app with ``OTEL_LOGS_EXPORTER=otlp`` over http/protobuf exports through our exporter,
    and the record arrives with the line's body, attributes and the LLM span's ids."""
    env = tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_SERVICE_NAME="llm-otlp-http-logs")
    env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"
    with demo_server(env) as (app, base):
        provider = app.telemetry.request_logs._provider
        (processor,) = provider._multi_log_record_processor._log_record_processors
        assert type(processor._batch_processor._exporter) is OTLPLogExporter
        response = httpx.post(
            base + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-request-id": "otlp-http-log-1", "authorization": "Bearer sk-test"},
        )
        assert response.status_code == 200
    span = wait_span(receiver, **{"llm.request_id": "otlp-http-log-1"})
    assert receiver.wait_for(lambda r: any(rec.attributes.get("request_id") == "otlp-http-log-1" for rec in r.logs))
    record = next(rec for rec in receiver.logs if rec.attributes.get("request_id") == "otlp-http-log-1")
    assert record.protocol == "http" and record.body == "chat gpt-4o 200" and record.severity_text == "INFO"
    assert record.resource["service.name"] == "llm-otlp-http-logs"
    assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)
    assert record.attributes["model"] == "gpt-4o" and record.attributes["status_code"] == 200
    assert record.attributes["operation"] == "chat" and record.attributes["provider"] == "openai"
    assert "error_type" not in record.attributes and "trace_id" not in record.attributes
    assert any(h.get("x-collector-token") == "secret123" for h in receiver.headers)


def test_two_instances_that_share_no_pipeline_export_each_request_log_once(receiver: OTLPReceiver) -> None:
    """Two instances in one process that share no pipeline (metrics on no port of their own, as with OTLP metrics
    only, or with other settings) each put their OTLP handler on the one request logger: each request's record was
    exported by both, the second time under the other instance's resource."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with contextlib.ExitStack() as stack:
        bases = []
        for name in ("llm-logs-a", "llm-logs-b"):
            env = tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_SERVICE_NAME=name, OTEL_TRACES_EXPORTER="none")
            env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"
            bases.append(stack.enter_context(demo_server(env))[1])
        for base, request_id in zip(bases, ("twice-a", "twice-b"), strict=True):
            answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": request_id})
            assert answer.status_code == 200
    # (both pipelines shut down on leaving: what they held is exported)
    records = [(rec.attributes.get("request_id"), rec.resource["service.name"]) for rec in receiver.logs]
    mine = sorted(record for record in records if record[0] in ("twice-a", "twice-b"))
    assert mine == [("twice-a", "llm-logs-a"), ("twice-b", "llm-logs-b")]


def test_an_apps_own_handler_on_the_request_logger_gets_a_record_it_can_pickle(receiver: OTLPReceiver) -> None:
    """docs/logging.md: an application may add its own handlers to the request logger. Those that pickle a record's
    attributes (``SocketHandler``, a multiprocessing ``QueueHandler``) failed on every request once an OTLP handler
    rode on the record to say which instance sent it; the record carries the request fields and nothing of ours
    besides, and the OTLP record goes out once."""
    env = tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_TRACES_EXPORTER="none")
    env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"
    pickled: list[dict[str, Any]] = []

    class Pickling(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # as SocketHandler.makePickle does, and it raised
            pickled.append(pickle.loads(pickle.dumps(dict(record.__dict__, args=None, exc_info=None, msg="m"))))

    own = Pickling()
    logger = logging.getLogger("llm_telemetry.requests")
    logger.addHandler(own)
    try:
        with demo_server(env) as (_app, base):
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": "pickled-1"})
            assert answer.status_code == 200
    finally:
        logger.removeHandler(own)
    (record,) = pickled
    assert record["llm_request"]["request_id"] == "pickled-1"
    assert not {key for key in record if key.startswith("llm_")} - {"llm_request"}
    assert [rec.attributes.get("request_id") for rec in receiver.logs].count("pickled-1") == 1


@pytest.mark.parametrize("added", ["before the start", "while serving"])
def test_an_apps_handler_that_raises_keeps_neither_the_answer_nor_the_otlp_record_from_the_client(
    added: str, receiver: OTLPReceiver
) -> None:
    """docs/logging.md: with ``OTEL_LOGS_EXPORTER=otlp`` the record goes out whatever handlers the request logger has.
    A handler the app put on it before the first request that raises (rather than report its failure as logging's
    own handlers do) kept the handlers after it, the OTLP one among them, from every record: the answers were whole,
    and no request sent a record. Through the openai SDK, streamed and not, each record arrives once (one added while
    serving comes after the OTLP handler) with its span's ids."""
    import openai

    env = tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_SERVICE_NAME="llm-raising-handler")
    env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"
    ids = {kind: f"raising-{kind}-{added}" for kind in ("plain", "stream", "429")}

    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("the app's handler failed")

    own = Raising()
    logger = logging.getLogger("llm_telemetry.requests")
    if added == "before the start":
        logger.addHandler(own)
    try:
        with demo_server(env) as (_app, base):
            logger.addHandler(own)  # (a second time changes nothing)
            client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
            messages: Any = [{"role": "user", "content": "hi"}]
            answer = client.chat.completions.create(
                model="gpt-4o", messages=messages, extra_headers={"x-request-id": ids["plain"]}
            )
            assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens == 12
            chunks = client.chat.completions.create(
                model="gpt-4o", messages=messages, stream=True, extra_headers={"x-request-id": ids["stream"]}
            )
            assert (
                "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                == answer.choices[0].message.content
            )
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(
                    model="gpt-4o",
                    messages=messages,
                    extra_headers={"x-request-id": ids["429"], "x-demo-fail": "rate_limit"},
                )
    finally:
        logger.removeHandler(own)
    for request_id, severity in ((ids["plain"], "INFO"), (ids["stream"], "INFO"), (ids["429"], "WARN")):
        span = wait_span(receiver, **{"llm.request_id": request_id})
        assert receiver.wait_for(lambda r, i=request_id: any(rec.attributes.get("request_id") == i for rec in r.logs))
        (record,) = [rec for rec in receiver.logs if rec.attributes.get("request_id") == request_id]
        assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)
        assert record.severity_text == severity and record.resource["service.name"] == "llm-raising-handler"


@pytest.mark.parametrize("when", ["import", "lifespan", "lifespan, nested"])
def test_a_logger_provider_the_app_installs_is_the_one_its_records_go_through(
    when: str, receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """docs/logging.md: a global SDK ``LoggerProvider`` the application installed is used instead of a new one, with
    its own resource, as a tracer provider is (docs/tracing.md), at import or in its lifespan startup. One installed
    in the lifespan startup, with tracing on from the environment, was passed over: the records went through a
    provider of the middleware's own, under the environment's service and to its endpoint. With two instances, one
    inside the other, sharing a metrics port (README: they record into one pipeline), the inner one set the request
    logs up anew and the outer one, which observes the requests, kept the old ones', shut down: no record went out.
    Real uvicorn, the openai SDK, streamed and not: each record arrives once, through the app's provider, with its
    span's ids."""
    import openai

    port = free_port()
    nested = when.endswith("nested")
    when = when.split(",")[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    env.update(
        {
            **tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_SERVICE_NAME="llm-environment"),
            "OTEL_BLRP_SCHEDULE_DELAY": "20",
            "LLM_TELEMETRY_METRICS_PORT": str(free_port()) if nested else "0",
            "LLM_TELEMETRY_METRICS_HOST": "127.0.0.1",
            "LOGGER_PROVIDER_APP_NESTED": "1" if nested else "0",
            "LOGGER_PROVIDER_APP_WHEN": when,
            "LOGGER_PROVIDER_APP_SERVICE": f"llm-app-provider-{when}",
            "LOGGER_PROVIDER_APP_ENDPOINT": receiver.http_endpoint + "/v1/logs",
            "PYTHONPATH": os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
        }
    )
    command = [sys.executable, "-m", "uvicorn", "logger_provider_app:app", "--app-dir", str(REPO / "tests" / "apps"),
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    kind = f"{when}-nested" if nested else when
    ids = {"plain": f"app-provider-{kind}-plain", "stream": f"app-provider-{kind}-stream"}
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the app", lambda: httpx.get(base + "/healthz", timeout=5).status_code == 200)
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        messages: Any = [{"role": "user", "content": "hi"}]
        answer = client.chat.completions.create(
            model="gpt-4o", messages=messages, extra_headers={"x-request-id": ids["plain"]}
        )
        assert answer.choices[0].message.content
        chunks = client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, extra_headers={"x-request-id": ids["stream"]}
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
        )
    finally:
        stop_process(server)  # the lifespan shutdown flushes both providers
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    for request_id in ids.values():
        span = wait_span(receiver, **{"llm.request_id": request_id})
        assert receiver.wait_for(lambda r, i=request_id: any(rec.attributes.get("request_id") == i for rec in r.logs))
        (record,) = [rec for rec in receiver.logs if rec.attributes.get("request_id") == request_id]
        assert record.resource["service.name"] == f"llm-app-provider-{when}"
        assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)


def test_the_grpc_exporter_sends_the_request_the_sdks_sends() -> None:
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as sdk_encode_logs
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as SDKGrpcLogExporter

    from llm_telemetry.otlp_grpc import OTLPGrpcLogExporter

    records = request_log_records()
    received = grpc_deliveries((OTLPGrpcLogExporter, SDKGrpcLogExporter), records, "logs", sdk_encode_logs)
    ours, sdk = received
    assert ours == sdk and {r.protocol for r in ours} == {"grpc"}


def test_a_record_exported_from_an_apps_except_block_leaves_the_apps_traceback_alone() -> None:
    """A failed export lets go of its own exceptions' tracebacks (they held batches in reference cycles), but an
    app that logs from its ``except`` block, with a synchronous processor and the collector down, still re-raises
    its exception with every frame and local."""
    provider = LoggerProvider()
    exporter = OTLPLogExporter(endpoint="http://127.0.0.1:9/v1/logs", timeout=0.2)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    log = logging.getLogger("llm_telemetry_tests.app_except")
    log.propagate = False
    handler = LoggingHandler(logger_provider=provider)
    log.addHandler(handler)

    def inner() -> None:
        kept = "a local of the app's"  # noqa: F841  (read back from the traceback below)
        raise ValueError("boom")

    try:
        with pytest.raises(ValueError) as raised:
            try:
                inner()
            except ValueError:
                log.exception("request failed")
                raise
        frames = [
            (frame.f_code.co_name, dict(frame.f_locals)) for frame, _ in traceback.walk_tb(raised.value.__traceback__)
        ]
        assert [name for name, _ in frames][-1] == "inner"
        assert frames[-1][1].get("kept") == "a local of the app's"
    finally:
        log.removeHandler(handler)
        provider.shutdown()
