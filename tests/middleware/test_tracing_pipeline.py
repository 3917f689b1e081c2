"""The LLM span the middleware records itself, on an SDK provider whose pipeline it can reproduce: the same span
the SDK's own span would have been, the provider's sampler, ids, limits, resource and processors honoured, and
whatever the application does with the current span kept."""

from __future__ import annotations

import asyncio
import json
import random
import time
import types
from typing import Any

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.propagators.textmap import DefaultGetter, DefaultSetter, TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo import app as demo_app
from llm_telemetry.demo.app import bare_app
from llm_telemetry.tracing import LLMSpan
from support import Calls

CALLER_TRACE, CALLER_SPAN = 0x5CF92F3577B34DA6A3CE929D0E0E4737, 0x10F067AA0BA902B8
GETTER, SETTER = DefaultGetter(), DefaultSetter()  # type: ignore[var-annotated]
ODD = object()  # not an attribute type: the SDK replaces it
TRACEPARENT = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"


class Sequential(IdGenerator):
    """Ids 1, 2, 3, ...: two providers given the same requests give the same ids."""

    def __init__(self) -> None:
        self.next = 0

    def _id(self) -> int:
        self.next += 1
        return self.next

    def generate_span_id(self) -> int:
        return self._id()

    def generate_trace_id(self) -> int:
        return self._id()


class Watching(SpanProcessor):
    """An application's own processor: it sees the live span, so the middleware leaves the span to the SDK."""

    def __init__(self) -> None:
        self.started: list[Any] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append(span)


def provider(*processors: SpanProcessor, **options: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    options.setdefault("id_generator", Sequential())
    result = TracerProvider(resource=Resource.create({"service.name": "pipeline-test"}), **options)
    result.add_span_processor(SimpleSpanProcessor(memory))
    for processor in processors:
        result.add_span_processor(processor)
    return result, memory


def chat_body(stream: bool = False, **extra: Any) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body | extra).encode()


def scope(headers: list[tuple[bytes, bytes]] | None = None, path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"req-1"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def call(app: Any, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    """One request straight through the ASGI app; the messages it sent."""
    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # as a server's receive: nothing more until the client goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope(headers), receive, send))
    return sent


def middleware(app: Any, tracer_provider: TracerProvider) -> Any:
    return LLMTelemetryMiddleware(app, metrics_port=0, request_logs=False, tracer_provider=tracer_provider)


TIMINGS = {"gen_ai.response.time_to_first_chunk"}


def timeless(attributes: Any) -> dict[str, Any]:
    return {k: (type(v) if k in TIMINGS else v) for k, v in (attributes or {}).items()}


def shape(span: ReadableSpan) -> dict[str, Any]:
    """Everything of a finished span except its times (two runs cannot share them)."""
    return {
        "name": span.name,
        "context": span.context,
        "parent": span.parent,
        "kind": span.kind,
        "attributes": timeless(span.attributes),
        "events": [(e.name, timeless(e.attributes)) for e in span.events],
        "links": list(span.links),
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource,
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
    }


@pytest.mark.parametrize(
    "body, headers",
    [
        (chat_body(), [(b"traceparent", TRACEPARENT.encode())]),
        (chat_body(stream=True), []),
        (chat_body(stream=True), [(b"traceparent", TRACEPARENT.encode()), (b"baggage", b"tenant=acme")]),
        (chat_body(model="gpt-4o-mini"), [(b"x-demo-fail", b"rate_limit")]),
    ],
    ids=["non-stream with traceparent", "stream, root", "stream with baggage", "provider error"],
)
def test_the_span_equals_the_sdk_spans(
    body: bytes, headers: list[tuple[bytes, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo stamps each response's `created` and id with the wall clock's second: two calls either side of a
    # second's turn would differ in their bytes and their response id, whatever the middleware does.
    monkeypatch.setattr(demo_app, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    light_provider, light = provider()
    sdk_provider, sdk = provider(Watching())  # an application processor: the SDK's span
    light_app, sdk_app = middleware(bare_app(), light_provider), middleware(bare_app(), sdk_provider)
    assert call(light_app, body, headers) == call(sdk_app, body, headers)  # the app's bytes, untouched
    (ours,), (theirs,) = light.get_finished_spans(), sdk.get_finished_spans()
    assert shape(ours) == shape(theirs)
    assert ours.start_time is not None and ours.end_time is not None and ours.start_time <= ours.end_time
    assert ours.kind is SpanKind.SERVER and ours.attributes["llm.request_id"] == "req-1"
    if headers and headers[0][0] == b"traceparent":
        assert ours.context.trace_id == CALLER_TRACE and ours.parent is not None
        assert ours.parent.span_id == CALLER_SPAN and ours.parent.is_remote
    else:
        assert ours.parent is None and ours.context.trace_id == 1  # from the provider's id generator


def test_an_app_exception_is_recorded_as_the_sdk_records_it() -> None:
    """The app raising: the span the middleware records itself carries the same exception event (type, message,
    traceback) and the same described ERROR status as the SDK's span does."""
    light_provider, light = provider()
    sdk_provider, sdk = provider(Watching())
    body, headers = chat_body(), [(b"x-demo-fail", b"exception")]
    for app in (middleware(bare_app(), light_provider), middleware(bare_app(), sdk_provider)):
        with pytest.raises(RuntimeError):
            call(app, body, headers)
    (ours,), (theirs,) = light.get_finished_spans(), sdk.get_finished_spans()

    def stackless(span: ReadableSpan) -> dict[str, Any]:
        found = shape(span)
        # Each raise has a traceback of its own (the frames of its own call); its first and last lines agree.
        found["events"] = [
            (name, {**attributes, "exception.stacktrace": attributes["exception.stacktrace"].splitlines()[::-1][:1]})
            if name == "exception"
            else (name, attributes)
            for name, attributes in found["events"]
        ]
        return found

    assert stackless(ours) == stackless(theirs)
    assert ours.status.status_code is StatusCode.ERROR
    assert ours.status.description == "RuntimeError: demo: the app failed"
    [event] = [e for e in ours.events if e.name == "exception"]
    assert event.attributes is not None and event.attributes["exception.type"] == "RuntimeError"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for this one")


@pytest.mark.parametrize(
    "raised, message",
    [
        (RuntimeError("upstream refused the prompt: " + "p" * 10_000_000), "upstream refused the prompt: " + "p" * 995),
        (Unprintable(), "<Unprintable object, unprintable>"),
    ],
    ids=["10-MB message", "str raises"],
)
def test_an_app_exception_is_recorded_within_bounds(raised: Exception, message: str) -> None:
    """An app's exception message may quote the whole request: recorded in full, each span carried three copies of
    a 10 MB prompt (message, traceback, status), which a batch export could not send. On both the span the
    middleware records itself and the SDK's, the message is cut to 1,024 characters and the traceback to 8 KiB (its
    first and last parts); an exception whose str() raises is still recorded, by its type."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        raise raised

    for processors in ((), (Watching(),)):
        tracer_provider, memory = provider(*processors)
        with pytest.raises(type(raised)):
            call(middleware(app, tracer_provider), chat_body())
        (span,) = memory.get_finished_spans()
        [event] = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.message"] == message
        stack = event.attributes["exception.stacktrace"]
        assert isinstance(stack, str) and len(stack) <= 8192 + 64 and stack.startswith("Traceback")
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == f"{type(raised).__name__}: {message}"


class Fixed(IdGenerator):
    """The same (possibly invalid) ids every time."""

    def __init__(self, trace_id: int, span_id: int) -> None:
        self.trace_id, self.span_id = trace_id, span_id

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


@pytest.mark.parametrize(
    "trace_id, span_id", [(7, 9), (0, 9), (7, 0), (2**128, 9), (7, 2**64), (2**128 - 1, 2**64 - 1)]
)
def test_the_span_context_is_the_sdks_whatever_ids_the_generator_gives(trace_id: int, span_id: int) -> None:
    """The middleware makes the span's context at once (not through the SpanContext constructor): its ids, flags,
    trace state and validity are the SDK span's, out-of-range ids included."""
    light_provider, light = provider(id_generator=Fixed(trace_id, span_id))
    sdk_provider, sdk = provider(Watching(), id_generator=Fixed(trace_id, span_id))
    for provider_ in (light_provider, sdk_provider):
        call(middleware(bare_app(), provider_), chat_body(stream=True))
    (ours,), (theirs,) = light.get_finished_spans(), sdk.get_finished_spans()
    assert type(ours.context) is type(theirs.context) and ours.context == theirs.context
    assert ours.context.is_valid is theirs.context.is_valid
    assert ours.context.is_valid == (0 < trace_id < 2**128 and 0 < span_id < 2**64)
    assert ours.context.trace_state == theirs.context.trace_state and ours.context.trace_flags.sampled
    assert [(e.name, type(e)) for e in ours.events] == [(e.name, type(e)) for e in theirs.events]


def test_the_middleware_records_the_span_only_on_a_pipeline_it_can_reproduce() -> None:
    calls = Calls()
    for processors, expected in [((), LLMSpan), ((BatchSpanProcessor(InMemorySpanExporter()),), LLMSpan)]:
        tracer_provider, _ = provider(*processors)
        app = LLMTelemetryMiddleware(
            bare_app(), metrics_port=0, request_logs=False, tracer_provider=tracer_provider, observers=[calls]
        )
        call(app, chat_body())
        assert type(calls.ended[-1].span) is expected
        # A processor of the application's, added later, sees the next span live: the SDK's.
        watching = Watching()
        tracer_provider.add_span_processor(watching)
        call(app, chat_body())
        assert type(calls.ended[-1].span) is not LLMSpan and watching.started == [calls.ended[-1].span]
        tracer_provider.shutdown()


def test_the_providers_sampler_decides() -> None:
    off_provider, off = provider(sampler=ALWAYS_OFF)
    call(middleware(bare_app(), off_provider), chat_body())
    assert off.get_finished_spans() == ()

    # Ratio 0 for roots, but a sampled caller is followed (parent-based), and its trace state kept.
    ratio_provider, ratio = provider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    app = middleware(bare_app(), ratio_provider)
    call(app, chat_body())
    assert ratio.get_finished_spans() == ()
    call(app, chat_body(), [(b"traceparent", TRACEPARENT.encode()), (b"tracestate", b"vendor=x1")])
    (span,) = ratio.get_finished_spans()
    assert span.context.trace_id == CALLER_TRACE and span.context.trace_flags.sampled
    assert span.context.trace_state.get("vendor") == "x1"


class RecordOnly(Sampler):
    """Records every span without sampling it: the application sees a recording span, no exporter gets it."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY, {"sampler.note": "kept"})

    def get_description(self) -> str:
        return "RecordOnly"


def test_a_span_recorded_but_not_sampled_reaches_no_exporter() -> None:
    batch = InMemorySpanExporter()
    record_only, simple = provider(BatchSpanProcessor(batch), sampler=RecordOnly())
    seen: list[tuple[bool, bool, bool]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        span = trace.get_current_span()  # the middleware's own span, recording, not sampled
        seen.append((type(span) is LLMSpan, span.is_recording(), span.get_span_context().trace_flags.sampled))
        await demo_app.bare_app()(scope, receive, send)

    wrapped = middleware(app, record_only)
    call(wrapped, chat_body())
    call(wrapped, chat_body(stream=True))
    record_only.force_flush()
    assert seen == [(True, True, False)] * 2
    assert simple.get_finished_spans() == () and batch.get_finished_spans() == ()

    # The same pipeline with every span sampled: both processors export both spans.
    batch_on = InMemorySpanExporter()
    sampled, simple_on = provider(BatchSpanProcessor(batch_on), sampler=ALWAYS_ON)
    app_on = middleware(bare_app(), sampled)
    call(app_on, chat_body())
    call(app_on, chat_body(stream=True))
    sampled.force_flush()
    assert len(simple_on.get_finished_spans()) == 2 and len(batch_on.get_finished_spans()) == 2


@pytest.mark.parametrize(
    "sampler",
    [
        ALWAYS_ON,
        ALWAYS_OFF,
        ParentBased(ALWAYS_ON),
        ParentBased(ALWAYS_OFF),
        ParentBased(ALWAYS_ON, ALWAYS_OFF, ALWAYS_ON),
    ],
    ids=["always_on", "always_off", "parentbased_always_on", "parentbased_always_off", "parentbased_mixed"],
)
@pytest.mark.parametrize("parent", ["none", "remote sampled", "remote unsampled", "local sampled", "local unsampled"])
def test_static_samplers_decide_as_in_the_sdk(sampler: Sampler, parent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The always-on/off samplers, alone or as the delegates of a parent-based one, whose decision the middleware
    takes without asking them: for every kind of parent, the same spans, flags, trace state and parent as the
    SDK's own span."""
    monkeypatch.setattr(demo_app, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    flags = "00" if "unsampled" in parent else "01"
    headers: list[tuple[bytes, bytes]] = []
    if parent.startswith("remote"):
        headers = [(b"traceparent", f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-{flags}".encode())]
        headers.append((b"tracestate", b"vendor=x1"))
    light_provider, light = provider(sampler=sampler)
    sdk_provider, sdk = provider(Watching(), sampler=sampler)
    current = trace.INVALID_SPAN
    if parent.startswith("local"):
        state = trace.TraceState([("local", "y")])
        current = trace.NonRecordingSpan(
            trace.SpanContext(CALLER_TRACE, CALLER_SPAN, False, trace.TraceFlags(int(flags)), state)
        )
    with trace.use_span(current):
        call(middleware(bare_app(), light_provider), chat_body(), headers)
        call(middleware(bare_app(), sdk_provider), chat_body(), headers)
    ours, theirs = light.get_finished_spans(), sdk.get_finished_spans()
    assert [shape(s) for s in ours] == [shape(s) for s in theirs]
    if ours:
        assert type(ours[0]) is ReadableSpan  # recorded by the middleware, not the SDK
        context = ours[0].context
        assert (context.trace_flags, context.trace_state) == (
            theirs[0].context.trace_flags,
            theirs[0].context.trace_state,
        )
    if sampler is ALWAYS_ON or sampler is ALWAYS_OFF:
        assert bool(ours) is (sampler is ALWAYS_ON)


def test_ids_of_the_sdks_default_generator_are_the_ones_the_sdk_would_draw() -> None:
    """With the SDK's RandomIdGenerator (every provider's default), the middleware draws the span's ids from the
    random module itself: from the same generator state, the same trace and span ids as the SDK's span."""
    light_provider, light = provider(id_generator=RandomIdGenerator())
    sdk_provider, sdk = provider(Watching(), id_generator=RandomIdGenerator())
    apps = [middleware(bare_app(), p) for p in (light_provider, sdk_provider)]
    state = random.getstate()
    try:
        for app in apps:
            call(app, chat_body())  # set up (and a first span) before the seed
            random.seed(1234)
            call(app, chat_body(stream=True))
    finally:
        random.setstate(state)
    ours, theirs = light.get_finished_spans()[-1], sdk.get_finished_spans()[-1]
    assert (ours.context.trace_id, ours.context.span_id) == (theirs.context.trace_id, theirs.context.span_id)
    assert ours.context.trace_flags == theirs.context.trace_flags and ours.context.trace_flags.random_trace_id
    assert light.get_finished_spans()[0].context.trace_id != ours.context.trace_id


def test_the_span_reports_the_time_to_first_token_the_metrics_record() -> None:
    """The span's time-to-first-chunk attribute and its first-token event carry the very value the TTFT
    histogram records for the call (one subtraction of the same clock readings)."""
    calls: list[Any] = []

    class Keep:
        def start(self, llm_call: Any) -> None:
            pass

        def end(self, llm_call: Any) -> None:
            calls.append(llm_call)

    tracer_provider, memory = provider()
    app = LLMTelemetryMiddleware(
        bare_app(), metrics_port=0, request_logs=False, tracer_provider=tracer_provider, observers=[Keep()]
    )
    call(app, chat_body(stream=True))
    (span,), (llm_call,) = memory.get_finished_spans(), calls
    ttft = llm_call.time_to_first_token
    assert ttft is not None and span.attributes["gen_ai.response.time_to_first_chunk"] == ttft
    (event,) = span.events
    assert event.name == "gen_ai.first_token" and dict(event.attributes) == {
        "gen_ai.response.time_to_first_chunk": ttft
    }
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= event.timestamp <= span.end_time


def test_once_the_middleware_returns_the_context_is_the_callers_again() -> None:
    """The LLM span is current while the app runs, and no longer once the middleware returns: code around it in
    the same task (an outer middleware, a test client) finds its own context, and its own span, again."""
    tracer_provider, memory = provider()
    inner = middleware(bare_app(), tracer_provider)
    seen: list[Any] = []

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        with trace.get_tracer("outer", tracer_provider=tracer_provider).start_as_current_span("outer") as span:
            before = context.get_current()
            await inner(scope, receive, send)
            seen.append((before, context.get_current(), span, trace.get_current_span()))
        seen.append(context.get_current())

    call(outer, chat_body(stream=True))
    (before, after, outer_span, current), outside = seen
    assert after is before and current is outer_span
    assert trace.get_current_span(outside) is trace.INVALID_SPAN
    llm, outer_finished = memory.get_finished_spans()
    assert llm.parent is not None and llm.parent.span_id == outer_finished.context.span_id
    assert llm.kind is SpanKind.INTERNAL  # a span was current: the LLM span is its child


def test_span_limits_apply() -> None:
    limited_provider, memory = provider(span_limits=SpanLimits(max_span_attributes=5, max_span_attribute_length=4))
    call(middleware(bare_app(), limited_provider), chat_body())
    (span,) = memory.get_finished_spans()
    assert len(span.attributes) == 5 and span.dropped_attributes > 0
    assert all(len(v) <= 4 for v in span.attributes.values() if isinstance(v, str))


def test_what_the_app_does_with_the_current_span_is_kept() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        span = trace.get_current_span()
        assert span.is_recording()
        span.set_attribute("app.user_tier", "gold")
        span.set_attributes({"app.list": ["a", "b"], "app.odd": ODD})
        span.add_event("app.cache_miss", {"key": "k1"})
        span.record_exception(ValueError("upstream slow"))
        span.set_status(StatusCode.OK)
        span.set_status(StatusCode.ERROR, "ignored after OK")
        # A child span the app makes (an upstream call) joins the LLM span's trace.
        trace.get_tracer("app", tracer_provider=tracer_provider).start_span("upstream", kind=SpanKind.CLIENT).end()
        body = json.dumps(
            {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [], "usage": None}
        ).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    tracer_provider, memory = provider()
    call(middleware(app, tracer_provider), chat_body())
    upstream, llm = memory.get_finished_spans()
    assert upstream.parent is not None and upstream.parent.span_id == llm.context.span_id
    assert upstream.context.trace_id == llm.context.trace_id
    assert llm.attributes["app.user_tier"] == "gold" and llm.attributes["app.list"] == ("a", "b")
    assert llm.attributes["app.odd"] == BoundedAttributes(None, {"app.odd": ODD})["app.odd"]  # as the SDK cleans it
    assert [e.name for e in llm.events] == ["app.cache_miss", "exception"]
    assert llm.events[1].attributes["exception.type"] == "ValueError"
    assert llm.status.status_code is StatusCode.OK


def test_a_propagator_of_the_applications_is_asked() -> None:
    class Fixed(TextMapPropagator):
        """Reads the caller's context from a header of its own."""

        def extract(self, carrier: Any, context: Any = None, getter: Any = GETTER) -> Any:
            if not getter.get(carrier, "x-caller"):
                return context
            caller = trace.SpanContext(CALLER_TRACE, CALLER_SPAN, is_remote=True, trace_flags=trace.TraceFlags(1))
            return trace.set_span_in_context(trace.NonRecordingSpan(caller), context)

        def inject(self, carrier: Any, context: Any = None, setter: Any = SETTER) -> None:
            pass

        @property
        def fields(self) -> set[str]:
            return {"x-caller"}

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(Fixed())
    try:
        tracer_provider, memory = provider()
        call(middleware(bare_app(), tracer_provider), chat_body(), [(b"x-caller", b"1")])
    finally:
        propagate.set_global_textmap(previous)
    (span,) = memory.get_finished_spans()
    assert span.context.trace_id == CALLER_TRACE and span.parent is not None and span.parent.span_id == CALLER_SPAN


def _traceparents() -> Any:
    from hypothesis import strategies as st

    hexes = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=34)
    ids = st.one_of(st.just("0" * 32), st.integers(0, 2**128 - 1).map(lambda n: f"{n:032x}"), hexes)
    spans = st.one_of(st.just("0" * 16), st.integers(0, 2**64 - 1).map(lambda n: f"{n:016x}"), hexes)
    valid = st.builds(
        lambda trace_id, span_id, sampled: f"00-{trace_id:032x}-{span_id:016x}-{sampled:02x}",
        st.integers(1, 2**128 - 1),
        st.integers(1, 2**64 - 1),
        st.sampled_from([0, 1]),
    )
    return st.one_of(
        valid,
        st.builds(
            lambda version, trace_id, span_id, flags, rest: f"{version}-{trace_id}-{span_id}-{flags}{rest}",
            st.sampled_from(["00", "01", "ff", "0g", "0"]),
            ids,
            spans,
            st.sampled_from(["00", "01", "03", "ff", "x1", "1"]),
            st.sampled_from(["", "-extra", "-", " "]),
        ),
        st.text(max_size=60),
    )


def test_the_callers_context_is_read_exactly_as_the_sdk_propagators_read_it() -> None:
    """With the default global propagators the middleware skips them for a request with neither ``traceparent``
    nor ``baggage``: for any headers, the caller's span context and baggage are those ``propagate.extract``
    gives."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from opentelemetry import baggage

    from llm_telemetry.tracing import _extract, _HeaderGetter

    values = {
        b"traceparent": _traceparents(),
        b"tracestate": st.one_of(
            st.lists(st.sampled_from(["vendor=x1", "rojo=00f067aa0ba902b7", "t@k=v", "a=1"]), max_size=3).map(",".join),
            st.sampled_from(["=bad", "UPPER=x", "a=1,a=2", " ", ""]),
            st.text(max_size=30),
        ),
        b"baggage": st.sampled_from(["tenant=acme", "a=1,b=2", "", "bad"]),
        b"x-other": st.text(max_size=10),
    }
    header = st.sampled_from(sorted(values)).flatmap(
        lambda name: values[name].map(lambda value: (name, value.encode("latin-1", "replace")))
    )

    @settings(max_examples=400, deadline=None)
    @given(st.lists(header, max_size=5))
    def check(headers: list[tuple[bytes, bytes]]) -> None:
        ours = _extract(headers)
        sdk = propagate.extract(headers, getter=_HeaderGetter())
        ours_span, sdk_span = (
            trace.get_current_span(ours).get_span_context(),
            trace.get_current_span(sdk).get_span_context(),
        )
        assert (ours_span.trace_id, ours_span.span_id, ours_span.is_remote, ours_span.trace_flags) == (
            sdk_span.trace_id,
            sdk_span.span_id,
            sdk_span.is_remote,
            sdk_span.trace_flags,
        )
        assert dict(ours_span.trace_state or {}) == dict(sdk_span.trace_state or {})
        assert baggage.get_all(ours) == baggage.get_all(sdk)

    check()


def test_the_span_starts_and_ends_at_the_calls_own_times() -> None:
    """The span's start and end are the call's perf_counter readings on the wall clock, however long before
    the observer sees them they were taken."""
    from llm_telemetry.config import Settings
    from llm_telemetry.record import LLMCall
    from llm_telemetry.tracing import SpanObserver

    tracer_provider, memory = provider()
    observer = SpanObserver(tracer_provider.get_tracer("test"), Settings.resolve(metrics_port=0))
    llm_call = LLMCall("chat", "openai", time.perf_counter() - 0.5, request_model="m")
    wall = time.time_ns()
    observer.start(llm_call)
    assert type(llm_call.span) is LLMSpan
    llm_call.end = time.perf_counter() - 0.25
    observer.end(llm_call)
    (span,) = memory.get_finished_spans()
    assert span.start_time is not None and span.end_time is not None
    assert abs(span.start_time - (wall - 500_000_000)) < 50_000_000
    assert abs(span.end_time - span.start_time - 250_000_000) < 10_000_000
    tracer_provider.shutdown()


def test_a_tracer_disabled_after_a_span_records_no_more_spans() -> None:
    """A tracer the provider's configurator disables later starts non-recording spans, as the SDK's does."""
    from opentelemetry.sdk.trace import _disable_tracer_configurator

    calls = Calls()
    tracer_provider, memory = provider()
    app = LLMTelemetryMiddleware(
        bare_app(), metrics_port=0, request_logs=False, tracer_provider=tracer_provider, observers=[calls]
    )
    call(app, chat_body())
    assert type(calls.ended[-1].span) is LLMSpan and len(memory.get_finished_spans()) == 1
    tracer_provider._set_tracer_configurator(tracer_configurator=_disable_tracer_configurator)
    call(app, chat_body())
    assert not calls.ended[-1].span.is_recording() and len(memory.get_finished_spans()) == 1
    tracer_provider.shutdown()
