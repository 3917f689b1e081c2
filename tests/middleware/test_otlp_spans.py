"""The OTLP span encoding of our exporter: the same request as the SDK encoder's, and what a receiver gets."""

from __future__ import annotations

import gc
import logging
import tracemalloc
import weakref
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from llm_telemetry.otlp_spans import OTLPSpanExporter, encode_request, encode_spans
from otlp_receiver import OTLPReceiver, grpc_deliveries, otlp_receiver

REMOTE = SpanContext(0x5CF92F3577B34DA6A3CE929D0E0E4737, 0x10F067AA0BA902B8, True, TraceFlags(1))
LINKED = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1), TraceState([("vendor", "x1")])
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as r:
        yield r


def _spans() -> list[ReadableSpan]:
    """Spans of every shape the encoder handles: kinds, parents (remote, local, none), events, links, status,
    trace state, every attribute value type, dropped counts, two resources and several scopes."""
    memory = InMemorySpanExporter()
    limits = SpanLimits(max_span_attributes=12, max_events=1, max_links=1)
    provider = TracerProvider(resource=Resource.create({"service.name": "llm-test"}), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("llm_telemetry", "1.2.3")
    other = provider.get_tracer("app", None, schema_url="https://opentelemetry.io/schemas/1.26.0", attributes={"a": 1})
    parent = trace_context(REMOTE)
    server = tracer.start_span(
        "chat gpt-4o",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"gen_ai.operation.name": "chat", "server.port": 8000, "gen_ai.request.stream": True},
        start_time=1_700_000_000_000_000_000,
    )
    server.set_attributes(
        {
            "gen_ai.request.temperature": 0.5,
            "gen_ai.response.finish_reasons": ["stop", "length"],
            "llm.tool_calls.count": 0,
            "bytes": b"\x00\xff",
            "ints": [1, -2, 3],
            "bools": (True, False),
            "floats": [0.25],
            "empty": [],
            "unicode": "naïve ✓ \u0000",
            "negative": -(2**63),
        }
    )
    server.set_attribute("over.the.limit", "dropped-oldest")
    server.add_event("dropped", {"x": "max_events keeps the last"})
    server.add_event("gen_ai.first_token", {"gen_ai.response.time_to_first_chunk": 0.125}, timestamp=1_700_000_000_1)
    server.set_status(Status(StatusCode.ERROR, "RateLimitError"))
    server.end(end_time=1_700_000_001_000_000_000)
    from opentelemetry import trace

    child = other.start_span(
        "upstream",
        context=trace.set_span_in_context(server),
        kind=SpanKind.CLIENT,
        links=[Link(REMOTE), Link(LINKED, {"link.reason": "retry"})],  # the limit keeps the last
    )
    child.set_status(Status(StatusCode.OK))
    child.end()
    for kind in (SpanKind.INTERNAL, SpanKind.PRODUCER, SpanKind.CONSUMER):
        tracer.start_span(f"root {kind.name}", kind=kind, attributes={"mapping": "none"}).end()
    spans = list(memory.get_finished_spans())
    # A span of another resource, and one without an instrumentation scope, built directly.
    spans.append(
        ReadableSpan(
            name="elsewhere",
            context=SpanContext(1, 2, False, TraceFlags(1)),
            resource=Resource({"service.name": "other"}, "https://example.com/schema"),
            attributes={"k": "v", "none": None},
            kind=SpanKind.INTERNAL,
            start_time=10,
            end_time=20,
            instrumentation_scope=InstrumentationScope("scoped", "0.1", None, {"s": True}),
            events=[Event("e", {"n": 1}, timestamp=15)],
        )
    )
    spans.append(
        ReadableSpan(name="no scope", context=SpanContext(3, 4, False), resource=spans[0].resource, start_time=1)
    )
    # A span whose own context carries a trace state (as one continuing a caller's tracestate does).
    own_state = SpanContext(5, 6, False, TraceFlags(1), TraceState([("vendor", "x1"), ("other", "2")]))
    spans.append(ReadableSpan(name="trace state", context=own_state, resource=spans[0].resource, start_time=2))
    return spans


def trace_context(span_context: SpanContext) -> object:
    from opentelemetry import trace

    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def test_the_request_equals_the_sdk_encoders_field_for_field() -> None:
    spans = _spans()
    ours, sdk = encode_spans(spans), sdk_encode_spans(spans)
    assert ours == sdk
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)
    # The batch really covers what it claims: two resources, scopes, dropped counts, links, error status.
    assert len(ours.resource_spans) == 2
    first = ours.resource_spans[0].scope_spans[0].spans[0]
    assert first.dropped_attributes_count == 2 and first.dropped_events_count == 1
    assert first.status.code == 2 and first.status.message == "RateLimitError"
    assert first.flags == 0x300  # the parent is remote
    upstream = ours.resource_spans[0].scope_spans[1].spans[0]
    assert upstream.dropped_links_count == 1 and upstream.links[0].attributes[0].key == "link.reason"
    assert upstream.links[0].flags == 0x300 and upstream.parent_span_id == first.span_id and upstream.flags == 0x100


def test_the_bytes_are_the_protobuf_librarys_for_the_sdk_encoders_request() -> None:
    spans = _spans()
    assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()
    # Again, now that recurring values come from the cache.
    assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()


def test_values_equal_across_types_are_not_confused_by_the_cache() -> None:
    resource = Resource({})
    values: list[object] = [1, True, 1.0, 0.0, -0.0, ("a",), ["a"], "1", b"1", 0, False]
    spans = [
        ReadableSpan(name="v", context=SpanContext(13, 14 + i, False), resource=resource, attributes={"k": v})
        for i, v in enumerate(values)
    ]
    for _ in range(2):
        assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()


_scalars = (
    st.text(max_size=40)
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True)
    | st.sampled_from(["stop", "chat", "gpt-4o", "", 0, 1, True, False, 0.0, -0.0, 1.0, 200, 2**40])
    | st.sampled_from(["x" * 127, "y" * 128, "ü" * 70, "z" * 20_000])  # lengths of one, two and three bytes
)
_equal_tuples = st.sampled_from([(1,), (True,), (1.0,), (0.0,), (-0.0,), ("a",), ("a", "b")])
_values = (
    _scalars
    | _equal_tuples
    | st.lists(st.text(max_size=8), max_size=3).map(tuple)
    | st.lists(_scalars, max_size=3).map(tuple)
)
_attribute_sets = st.dictionaries(
    st.sampled_from(["k", "model", "n", "", "gen_ai.x", "ü", "long." * 30]) | st.text(max_size=6), _values
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_attribute_sets, st.lists(_attribute_sets, max_size=2), st.booleans()), min_size=1, max_size=4),
    st.sampled_from([None, StatusCode.OK, StatusCode.ERROR]),
)
def test_arbitrary_spans_are_encoded_as_the_sdk_encodes_them(
    shapes: list[tuple[dict[str, object], list[dict[str, object]], bool]], code: StatusCode | None
) -> None:
    """Any attribute values (recurring ones come from the cache the second time), events, status, whether the
    span is the SDK's own ``ReadableSpan`` (read by its fields) or one recorded by the SDK tracer (read by its
    properties, attributes bounded): the bytes are the SDK encoder's."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "prop"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("prop", "1")
    status = Status(StatusCode.UNSET) if code is None else Status(code, "boom" if code is StatusCode.ERROR else None)
    spans: list[ReadableSpan] = []
    for i, (attributes, events, recorded) in enumerate(shapes):
        if recorded:
            span = tracer.start_span(f"s{i}", attributes=attributes, start_time=100 + i)
            for event in events:
                span.add_event("e", event, timestamp=7)
            span.set_status(status)
            span.end(end_time=200 + i)
        else:
            spans.append(
                ReadableSpan(
                    name=f"s{i}",
                    context=SpanContext(2**127 + i, 2**63 + i, False, TraceFlags(1)),
                    parent=REMOTE if i % 2 else None,
                    resource=Resource({"service.name": "prop"}),
                    attributes=attributes,
                    events=[Event("e", event, timestamp=7) for event in events],
                    kind=SpanKind.SERVER,
                    status=status,
                    start_time=100 + i,
                    end_time=200 + i,
                    instrumentation_scope=InstrumentationScope("prop", "1"),
                )
            )
    spans += memory.get_finished_spans()
    for _ in range(2):
        assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()


_event_names = st.sampled_from(["gen_ai.first_token", "e", "x" * 200]) | st.text(max_size=12)
_event_keys = st.sampled_from(["gen_ai.response.time_to_first_chunk", "", "k" * 130]) | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            _event_names,
            _event_keys,
            st.floats(allow_nan=True) | st.sampled_from([0.0, -0.0, 0.125]),
            st.integers(min_value=0, max_value=2**64 - 1),
            st.sampled_from([None, 1, "1", True, 0.5]),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_events_with_one_float_attribute_are_encoded_as_the_sdk_encodes_them(
    events: list[tuple[str, str, float, int, object]],
) -> None:
    """The first-token event's shape (a timestamp and one float attribute) is encoded in one piece per (name,
    key): any name, key, float and timestamp (zero: no timestamp field) give the SDK encoder's bytes, as do
    events beside it with a second attribute of another type."""
    recorded = []
    for name, key, value, timestamp, other in events:
        attributes: dict[str, object] = {key: value}
        if other is not None and key != "other":
            attributes["other"] = other
        recorded.append(Event(name, {key: value}, timestamp=timestamp))
        recorded.append(Event(name, attributes, timestamp=timestamp))
    span = ReadableSpan(
        name="events",
        context=SpanContext(21, 22, False),
        resource=Resource({}),
        events=recorded,
        start_time=1,
        end_time=2,
    )
    for _ in range(2):
        assert encode_request([span]) == sdk_encode_spans([span]).SerializeToString()


# Keys whose KeyValue head takes a few bytes or nearly all of a one-byte length, values on both sides of the
# lengths and ranges the encoder writes without a call (strings, small integers, floats after a long key).
_head_keys = st.text(max_size=12) | st.sampled_from(
    ["", "k" * 100, "k" * 110, "k" * 115, "k" * 116, "k" * 117, "k" * 124]
)
_new_values = (
    st.text(st.characters(max_codepoint=127), min_size=95, max_size=130)
    | st.text(max_size=130)
    | st.integers(min_value=-3, max_value=200)
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.sampled_from([0.0, -0.0, 1.0, 1, True, 0, False, 127, 128])
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_head_keys, st.lists(_new_values, min_size=1, max_size=4)), min_size=1, max_size=5))
def test_new_values_of_keys_already_seen_are_encoded_as_the_sdk_encodes_them(
    keyed: list[tuple[str, list[object]]],
) -> None:
    """A key's first value is encoded in full; the values that follow under a known key (a response id, a token
    count, a time: new in every span) are put together from the key's encoded head. Whatever the key's and the
    value's lengths, the bytes are the SDK encoder's."""
    resource = Resource({})
    spans = [
        ReadableSpan(
            name="known keys",
            context=SpanContext(31, 32 + i, False),
            resource=resource,
            attributes={key: values[min(i, len(values) - 1)] for key, values in keyed},
            start_time=1,
        )
        for i in range(max(len(values) for _, values in keyed))
    ]
    for _ in range(2):
        assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()


def test_every_length_at_the_one_byte_boundaries_is_encoded_as_the_sdk_encodes_it() -> None:
    """Keys of every length a one-byte KeyValue length allows, each with new values (strings of every length up
    to past the one-byte limit, integers either side of 128, booleans, floats): the same bytes as the SDK."""
    resource = Resource({})
    spans = []
    for length in sorted({*range(0, 110, 5), *range(110, 130)}):
        key = "k" * length
        values: list[object] = ["v" * n for n in range(0, 131)]
        values += [*range(-2, 131), True, False, 0.5, -0.0, 0.0, 2.5e-05]
        for i, value in enumerate(values):
            spans.append(
                ReadableSpan(
                    name="lengths",
                    context=SpanContext(41, 42 + i, False),
                    resource=resource,
                    attributes={key: value, "other": value},
                    start_time=1,
                )
            )
    for _ in range(2):
        assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()


def test_the_spans_of_one_resource_object_or_an_equal_one_share_one_entry() -> None:
    spans = _spans()
    copy = Resource(dict(spans[0].resource.attributes), spans[0].resource.schema_url)
    again = ReadableSpan(name="equal resource", context=SpanContext(5, 6, False), resource=copy, start_time=1)
    request = encode_spans([*spans, again])
    assert request == sdk_encode_spans([*spans, again])
    assert len(request.resource_spans) == 2


def test_resources_and_scopes_are_grouped_as_the_sdk_groups_them() -> None:
    """A resource equal to an earlier one but hashing apart (``1`` and ``True`` compare equal, their JSON differs)
    gets its own entry, as in the SDK encoder's dict of resources; a scope of the same name and version but other
    attributes is a scope of its own; an equal scope, another object, joins the first."""
    scope = InstrumentationScope("s", "1")

    def span(name: str, resource: Resource, scope: InstrumentationScope | None = None) -> ReadableSpan:
        context = SpanContext(len(name), 7, False)
        return ReadableSpan(name=name, context=context, resource=resource, instrumentation_scope=scope, start_time=1)

    spans = [
        span("a", Resource({"a": 1})),
        span("b", Resource({"a": 2}, "https://example.com/schema"), scope),
        span("c", Resource({"a": 1}), InstrumentationScope("s", "1", None, {"other": "attrs"})),
        span("d", Resource({"a": True})),
        span("e", Resource({"a": 1}), scope),
        span("f", Resource({"a": 1}), InstrumentationScope("s", "1")),
    ]
    request = encode_spans(spans)
    assert request == sdk_encode_spans(spans)
    assert encode_request(spans) == sdk_encode_spans(spans).SerializeToString()
    assert [[len(s.spans) for s in r.scope_spans] for r in request.resource_spans] == [[1, 1, 2], [1], [1]]


def test_an_attribute_that_cannot_be_encoded_is_left_out_like_the_sdk_does(caplog: pytest.LogCaptureFixture) -> None:
    span = ReadableSpan(
        name="too big",
        context=SpanContext(7, 8, False),
        resource=Resource({}),
        attributes={"before": 1, "huge": 2**70, "after": "kept"},
        start_time=1,
    )
    with caplog.at_level(logging.ERROR):
        request = encode_spans([span])
    assert request == sdk_encode_spans([span])
    pairs = request.resource_spans[0].scope_spans[0].spans[0].attributes
    assert [kv.key for kv in pairs] == ["before", "after"]
    assert "huge" in caplog.text


def test_an_attribute_failing_on_every_span_is_logged_with_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    """A value a client sends on every request must not put a traceback in the log per request."""
    spans = [
        ReadableSpan(
            name=f"span {i}",
            context=SpanContext(7, 8 + i, False),
            resource=Resource({}),
            attributes={"too.big.each.time": 2**70 + i, "kept": i},
            start_time=1,
        )
        for i in range(5)
    ]
    with caplog.at_level(logging.ERROR, logger="llm_telemetry"):
        request = encode_spans(spans)
    assert [[kv.key for kv in span.attributes] for span in request.resource_spans[0].scope_spans[0].spans] == [
        ["kept"]
    ] * 5
    assert [record.exc_info is not None for record in caplog.records if "too.big.each.time" in record.getMessage()] == [
        True
    ]


def test_the_exporter_delivers_to_an_otlp_receiver(receiver: OTLPReceiver) -> None:
    spans = _spans()
    exporter = OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces", headers={"x-token": "t1"})
    assert exporter._own_encoding
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert receiver.wait_for(lambda r: len(r.spans) >= len(spans))
    got = {s.name: s for s in receiver.spans}
    server = got["chat gpt-4o"]
    assert server.kind == 2 and server.parent_span_id == "10f067aa0ba902b8"
    assert server.attributes["gen_ai.response.finish_reasons"] == ["stop", "length"]
    assert server.attributes["bytes"] == b"\x00\xff"
    assert server.events[0][:2] == ("gen_ai.first_token", {"gen_ai.response.time_to_first_chunk": 0.125})
    assert server.resource["service.name"] == "llm-test" and server.scope == "llm_telemetry"
    assert got["elsewhere"].resource == {"service.name": "other"} and got["elsewhere"].attributes["none"] is None
    assert any(h.get("x-token") == "t1" for h in receiver.headers)
    exporter.shutdown()
    assert exporter.export(spans) is SpanExportResult.FAILURE  # after shutdown, as the SDK exporter answers


def test_without_the_sdk_parts_it_relies_on_the_exporter_is_the_sdks(receiver: OTLPReceiver) -> None:
    exporter = OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")
    exporter._own_encoding = False
    span = ReadableSpan(name="sdk path", context=SpanContext(9, 10, False), resource=Resource({}), start_time=1)
    assert exporter.export([span]) is SpanExportResult.SUCCESS
    assert receiver.wait_for(lambda r: any(s.name == "sdk path" for s in r.spans))
    exporter.shutdown()


def test_an_unreachable_endpoint_is_a_failed_export() -> None:
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=0.2)
    span = ReadableSpan(name="lost", context=SpanContext(11, 12, False), resource=Resource({}), start_time=1)
    assert exporter.export([span]) is SpanExportResult.FAILURE
    exporter.shutdown()


def test_the_grpc_exporter_sends_the_request_the_sdks_sends() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as SDKGrpcSpanExporter

    from llm_telemetry.otlp_grpc import OTLPGrpcSpanExporter

    spans = _spans()
    received = grpc_deliveries((OTLPGrpcSpanExporter, SDKGrpcSpanExporter), spans, "spans", sdk_encode_spans)
    ours, sdk = received
    assert ours == sdk and {s.protocol for s in ours} == {"grpc"}


def test_a_failed_export_leaves_its_spans_to_be_freed_without_the_cyclic_collector() -> None:
    """With the collector down, each failed attempt's exception (urllib3 keeps it in a local of a frame of its own
    traceback) used to hold, through its frames' callers, the encoded request and the batch: freed only by a full
    cyclic collection, which an idle process seldom runs. With content capture on, RSS passed a gigabyte."""
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=0.2)
    spans = [
        ReadableSpan(name="lost", context=SpanContext(11, n + 1, False), resource=Resource({}), start_time=1)
        for n in range(8)
    ]
    alive = [weakref.ref(span) for span in spans]
    gc.collect()
    gc.disable()
    try:
        assert exporter.export(spans) is SpanExportResult.FAILURE
        del spans
        assert [ref for ref in alive if ref() is not None] == []
    finally:
        gc.enable()
        exporter.shutdown()


def test_captured_content_is_not_kept_by_the_encoder() -> None:
    """Recurring values (model, route, counts) are kept encoded for the next span; long values, such as captured
    prompts, are encoded each time and not kept, or thousands of them would stay in memory."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(64):
            prompt = f"{n:04d}" + "x" * 40_000
            span = ReadableSpan(
                name="chat m",
                context=SpanContext(13, n + 1, False),
                resource=Resource({}),
                attributes={"gen_ai.input.messages": prompt, "gen_ai.request.model": "m"},
                start_time=1,
            )
            assert prompt.encode() in encode_request([span])
            del span, prompt
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 512 * 1024, f"{kept} bytes kept after encoding 64 spans of 40 kB prompts (2.5 MB)"
