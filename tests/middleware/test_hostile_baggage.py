"""A client's ``baggage`` header, with tracing on. OpenTelemetry's W3C baggage propagator logs a WARNING for each
member it ignores (most with the member's text) and, for a header over its size limit, one with the whole header: a
client could make every request write 180 log lines, or one of tens of KB, and take several times the CPU a request
costs. The middleware hands the propagator only the members it keeps: the span's parent has the same baggage, and
nothing is logged per request."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.instrumentation.asgi import asgi_getter
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import bare_app
from llm_telemetry.tracing import _extract, _screened_scope
from otlp_receiver import isolated_env
from support import serve

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@contextmanager
def opentelemetry_warnings() -> Iterator[list[logging.LogRecord]]:
    """The records of WARNING and above that OpenTelemetry's loggers emit meanwhile, from any thread."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    otel = logging.getLogger("opentelemetry")
    otel.addHandler(handler)
    try:
        yield records
    finally:
        otel.removeHandler(handler)


def propagators_baggage(header: str) -> dict[str, object]:
    """What OpenTelemetry's own W3C baggage propagator makes of ``header`` (its warnings included)."""
    return dict(baggage.get_all(W3CBaggagePropagator().extract({"baggage": header}, context=Context())))


class ParentContexts(SpanProcessor):
    """A span processor keeping the parent context of each server span (the LLM span, or with
    ``LLM_TELEMETRY_TRACING_HTTP_SPAN`` the HTTP span of OpenTelemetry's ASGI middleware), as the exported span's
    parent and a baggage span processor read it."""

    def __init__(self) -> None:
        self.seen: list[Context] = []

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        if span.kind is SpanKind.SERVER:
            self.seen.append(parent_context if parent_context is not None else Context())


#: 180 malformed members (no "="), then valid ones the propagator keeps; a header past the size limit.
MALFORMED = ",".join(["x" * 40] * 170 + ["team=search", "tier=gold;p=1", "bad key=v", 'quote=a"b'])
OVERSIZED = "k=" + "v" * 60_000


@contextmanager
def global_propagators(names: str) -> Iterator[TextMapPropagator]:
    """The global propagator made of ``names`` as ``OTEL_PROPAGATORS`` names them, loaded as OpenTelemetry loads
    them (by entry point: ``b3``, ``b3multi`` and ``jaeger`` are packages of their own); "" leaves the default."""
    from opentelemetry import propagate
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.util._importlib_metadata import entry_points

    before = propagate.get_global_textmap()
    if names:
        found = [next(iter(entry_points(group="opentelemetry_propagator", name=n)), None) for n in names.split(",")]
        if any(entry is None for entry in found):
            pytest.skip(f"a propagator of {names} is not installed")
        propagate.set_global_textmap(CompositePropagator([entry.load()() for entry in found if entry is not None]))
    try:
        yield propagate.get_global_textmap()
    finally:
        propagate.set_global_textmap(before)


def traced_requests(
    headers: dict[str, str], propagators: str, http_span: bool = False
) -> tuple[list[Context], list[logging.LogRecord]]:
    """Three chat requests sent with ``headers`` through real uvicorn and the openai SDK, tracing on (``http_span``:
    with OpenTelemetry's ASGI middleware's HTTP span around the LLM span), under the propagators ``propagators``
    names: the parent context of each request's server span, and the WARNINGs OpenTelemetry logged meanwhile. The
    app gets the headers as sent."""
    from opentelemetry.sdk.trace import TracerProvider

    parents = ParentContexts()
    provider = TracerProvider()
    provider.add_span_processor(parents)
    demo = bare_app()
    seen: list[Any] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        seen.append(list(scope["headers"]))
        await demo(scope, receive, send)

    with isolated_env({"LLM_TELEMETRY_TRACING_HTTP_SPAN": str(http_span).lower()}):
        app = LLMTelemetryMiddleware(recording, metrics_port=0, tracer_provider=provider)
        app.telemetry  # noqa: B018 - built while the environment is in place
    try:
        with serve(app) as base, global_propagators(propagators), opentelemetry_warnings() as warnings:
            client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
            for _ in range(3):
                reply = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
                )
                assert reply.choices[0].message.content
    finally:
        app.telemetry.shutdown()
        provider.shutdown()
    sent = [(name.encode(), value.encode("latin-1")) for name, value in headers.items()]
    assert [[header for header in got if header in sent] for got in seen] == [sent] * 3
    return parents.seen, warnings


@pytest.mark.parametrize(
    ("propagators", "http_span"),
    [
        pytest.param("", False, id="default"),
        pytest.param("baggage,tracecontext", False, id="baggage,tracecontext"),
        pytest.param("baggage", False, id="baggage"),
        pytest.param("", True, id="default-http-span"),
        pytest.param("baggage", True, id="baggage-http-span"),
    ],
)
@pytest.mark.parametrize("header", [MALFORMED, OVERSIZED], ids=["malformed-members", "oversized"])
def test_a_hostile_baggage_header_gives_the_propagators_baggage_and_no_warning_per_request(
    header: str, propagators: str, http_span: bool
) -> None:
    """With OTEL_PROPAGATORS naming the W3C baggage propagator in another order or without trace context's, it logged
    a WARNING per member ignored on every request as before (the screen was for the default pair only). With the
    HTTP span (``LLM_TELEMETRY_TRACING_HTTP_SPAN``), OpenTelemetry's ASGI middleware reads the context itself, and
    logged them all on every request (516 lines for three requests with MALFORMED) before the headers it reads were
    screened too."""
    expected = propagators_baggage(header)
    parents, warnings = traced_requests({"traceparent": TRACEPARENT, "baggage": header}, propagators, http_span)
    assert [dict(baggage.get_all(parent)) for parent in parents] == [expected] * 3
    assert expected == ({"team": "search", "tier": "gold;p=1"} if header is MALFORMED else {})
    assert [r.getMessage()[:120] for r in warnings] == []


# Members of a baggage header, of every kind the propagator keeps or ignores.
_KEY = st.text("abcXYZ019!#$%&'*+-.^_`|~", min_size=1, max_size=8)
_VALUE = st.text("abcXYZ019!#$%&'()*+-./:<>?@[]^_`{|}~=", max_size=8)
_VALID = st.builds(lambda k, v, p: f"{k}={v}{p}", _KEY, _VALUE, st.sampled_from(["", ";p", ";p=1", " ;p=1"]))
_MEMBER = st.one_of(
    _VALID,
    _VALID.map(lambda m: f" \t{m} "),  # whitespace around a member
    _KEY,  # no "="
    st.builds(lambda k, v: f"{k} {k}={v}", _KEY, _VALUE),  # a space inside the key
    st.builds(lambda k: f'{k}=a"b', _KEY),  # a quote in the value
    st.builds(lambda m, p: m + p, _VALID, st.sampled_from([";", ";;p", ';p="x"', ";p q", ";p=a,"])),  # a bad property
    st.builds(lambda k: f"{k}=\u00e9", _KEY),  # not ASCII
    st.builds(lambda k: f"{k}=" + "v" * 4095, _KEY),  # longer than a member may be
    st.just(""),
    st.just(" "),
)


@settings(max_examples=300, deadline=None)
# Past the propagator's 180 members (the first 180 are kept); members it ignores before they count toward them.
@example(members=[f"k{i}=v" for i in range(200)], separators=",", traceparent_first=False, pad=0)
@example(members=["a=\u00e9"] * 10 + [f"k{i}=v" for i in range(180)], separators=",", traceparent_first=True, pad=0)
@example(members=["a=" + "v" * 4095] + [f"k{i}=v" for i in range(180)], separators=",", traceparent_first=True, pad=0)
@example(members=[" \tteam=search ", "tier=gold ;p=1"], separators=" , ", traceparent_first=False, pad=0)
# Plain members the propagator keeps but for their number (181), their size together (9,008 bytes), or one's length.
@example(members=[f"k{i}=v" for i in range(181)], separators=",", traceparent_first=True, pad=0)
@example(members=[f"k{i}=" + "v" * 3000 for i in range(3)], separators=",", traceparent_first=True, pad=0)
@example(members=["a=" + "v" * 4095, "b=1"], separators=",", traceparent_first=True, pad=0)
@example(members=["team=search", 'tier=gold;p="x"', "k=v;;p"], separators=",", traceparent_first=True, pad=0)
@given(
    members=st.lists(_MEMBER, max_size=200),
    separators=st.sampled_from([",", " , ", ",\t", ",,"]),
    traceparent_first=st.booleans(),
    pad=st.sampled_from([0, 0, 0, 9000]),
)
def test_the_baggage_read_is_the_propagators_without_its_warnings(
    members: list[str], separators: str, traceparent_first: bool, pad: int
) -> None:
    header = separators.join(members) + ("," + "p=" + "v" * pad if pad else "")
    expected = propagators_baggage(header)
    headers = [(b"baggage", header.encode("latin-1"))]
    if traceparent_first:
        headers.insert(0, (b"traceparent", TRACEPARENT.encode()))
    with opentelemetry_warnings() as warnings:
        read = _extract(headers, apart=True)
    assert dict(baggage.get_all(read)) == expected
    assert warnings == []
    # What OpenTelemetry's ASGI middleware reads (with the HTTP span): the same, from the headers screened for it.
    screened = _screened_scope(headers, asgi_getter)
    with opentelemetry_warnings() as warnings:
        asgi = propagate.extract({"headers": headers if screened is None else screened}, Context(), getter=asgi_getter)
    assert dict(baggage.get_all(asgi)) == expected
    assert warnings == []
    assert trace.get_current_span(asgi).get_span_context() == trace.get_current_span(read).get_span_context()
    parent = trace.get_current_span(read).get_span_context()
    assert parent.is_valid is traceparent_first
    if traceparent_first:
        assert (
            parent
            == trace.get_current_span(
                TraceContextTextMapPropagator().extract({"traceparent": TRACEPARENT}, context=Context())
            ).get_span_context()
        )
