"""A client's ``traceparent`` and ``tracestate`` headers, with tracing on. OpenTelemetry's W3C trace context propagator
logs a WARNING on every request whose ``traceparent`` is over 512 characters, whose ``tracestate`` is over 8,192
characters or has more than 32 members, and, with the member's text, for a ``tracestate`` with a malformed member (up
to 8 KB of a client's bytes in one line per request). The middleware hands the propagator what it would read without
the warning: the span's parent is the same, and nothing is logged per request."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.instrumentation.asgi import asgi_getter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from test_hostile_baggage import TRACEPARENT, global_propagators, opentelemetry_warnings, traced_requests

from llm_telemetry.tracing import _extract, _screened_scope

#: A traceparent of a later version, which may carry more fields: read when within 512 characters, ignored past.
LATER = "01" + TRACEPARENT[2:] + "-"


def propagators_context(headers: dict[str, list[str]]) -> Context:
    """What OpenTelemetry's own W3C propagators (the default pair) make of ``headers`` (their warnings included)."""
    composite = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    return composite.extract(headers, context=Context())


def asgi_headers(headers: dict[str, list[str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode("latin-1")) for name, values in headers.items() for value in values]


def same_context(read: Context, expected: Context) -> None:
    assert set(read) == set(expected)
    assert trace.get_current_span(read).get_span_context() == trace.get_current_span(expected).get_span_context()
    assert dict(trace.get_current_span(read).get_span_context().trace_state) == dict(
        trace.get_current_span(expected).get_span_context().trace_state
    )
    assert dict(baggage.get_all(read)) == dict(baggage.get_all(expected))


B3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
HOSTILE = {
    "long-traceparent": {"traceparent": [LATER + "a" * 600]},
    # (A B3 parent beside it, which the B3 propagators read when configured; the others ignore it.)
    "long-traceparent-b3": {"traceparent": [LATER + "a" * 600], "b3": [B3]},
    "malformed-tracestate": {"traceparent": [TRACEPARENT], "tracestate": ["congo=t61rcWkgMzE,Evil=" + "Z" * 7000]},
    "oversized-tracestate": {"traceparent": [TRACEPARENT], "tracestate": ["congo=" + "x" * 9000]},
    "33-members": {"traceparent": [TRACEPARENT], "tracestate": [",".join(f"k{i}=v" for i in range(33))]},
}


@pytest.mark.parametrize(
    ("propagators", "http_span"),
    [
        pytest.param("", False, id="default"),
        pytest.param("tracecontext", False, id="tracecontext"),
        pytest.param("baggage,tracecontext", False, id="baggage,tracecontext"),
        pytest.param("tracecontext,baggage,b3", False, id="tracecontext,baggage,b3"),
        pytest.param("b3multi,tracecontext", False, id="b3multi,tracecontext"),
        pytest.param("jaeger,tracecontext,baggage", False, id="jaeger,tracecontext,baggage"),
        pytest.param("", True, id="default-http-span"),
        pytest.param("b3multi,tracecontext", True, id="b3multi,tracecontext-http-span"),
    ],
)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_trace_context_gives_the_propagators_parent_and_no_warning_per_request(
    case: str, propagators: str, http_span: bool
) -> None:
    """Through real uvicorn and the openai SDK: each request logged one OpenTelemetry WARNING (the malformed
    ``tracestate`` member's 7 KB in it) before the middleware screened these headers. The B3 and Jaeger propagators
    read none of these headers and log nothing for their own: beside them the W3C headers were not screened. With
    the HTTP span (``LLM_TELEMETRY_TRACING_HTTP_SPAN``), OpenTelemetry's ASGI middleware reads the context itself,
    and logged the WARNING on every request before the headers it reads were screened too."""
    headers = HOSTILE[case]
    with global_propagators(propagators) as textmap:
        expected = trace.get_current_span(textmap.extract(headers, context=Context())).get_span_context()
    parents, warnings = traced_requests({name: values[0] for name, values in headers.items()}, propagators, http_span)
    assert [trace.get_current_span(parent).get_span_context() for parent in parents] == [expected] * 3
    assert dict(expected.trace_state) == {}
    # (The B3 parent is read by both B3 propagators: b3multi reads the single header too.)
    assert expected.is_valid is (case != "long-traceparent" and (case != "long-traceparent-b3" or "b3" in propagators))
    assert [r.getMessage()[:120] for r in warnings] == []


# tracestate members of every kind the propagator keeps or ignores (keys from a few, so that some repeat).
_KEY = st.sampled_from(["congo", "rojo", "k1", "a-b_c*d/e", "t@dt", "1234@vendor", "Upper", "9bad", "k" * 257])
_VALUE = st.one_of(
    st.sampled_from(["t61rcWkgMzE", "00f067aa0ba902b7", "a b", " lead", "trail ", "x" * 256, "x" * 257, "", "a=b"]),
    st.text("abcXYZ019!#$%&'()*+-./:;<>?@[]^_`{|}~ \t\u00e9", max_size=6),
)
_MEMBER = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", _KEY, _VALUE),
    st.builds(lambda k, v: f" \t{k}={v} ", _KEY, _VALUE),  # whitespace around a member
    _KEY,  # no "="
    st.just(""),
)


def _members(prefix: str, chars: int) -> str:
    """Valid tracestate members, keys beginning with ``prefix``, joined: ``chars`` characters."""
    members = []
    while chars > 0:
        size = min(chars, 513) if chars - 513 != 1 else 511  # (513: a key and a value of 256; none of 1 is left)
        key = f"{prefix}{len(members):02d}".ljust(min(size - 2, 256), "x")
        members.append(key + "=" + "v" * (size - len(key) - 1))
        chars -= size + 1
    return ",".join(members)


#: Valid members, 8,193 characters (8,192 is the limit), in one field or (``WIDE_FIELDS``) two, joined by a comma.
WIDE_FIELDS = [_members("a", 4096), _members("b", 4096)]
WIDE = ",".join(WIDE_FIELDS)
assert len(WIDE) == 8193 and WIDE.count(",") < 32

_FIELD = st.builds(
    lambda members, pad: ",".join(members) + ("," + "p=" + "v" * pad if pad else ""),
    st.lists(_MEMBER, max_size=36),
    st.sampled_from([0, 0, 0, 250, 9000]),
)
_TRACEPARENT = st.one_of(
    st.none(),
    st.just(TRACEPARENT),
    st.builds(lambda n: LATER + "a" * n, st.sampled_from([0, 1, 200, 455, 456, 457, 458, 600, 20_000])),
    st.sampled_from(["00-" + "0" * 32 + "-b7ad6b7169203331-01", "garbage", TRACEPARENT.upper(), TRACEPARENT + "-x"]),
)


@settings(max_examples=400, deadline=None)
@example(traceparent=LATER + "a" * (512 - len(LATER)), tracestate=None, bag=None)  # 512 characters: read
@example(traceparent=LATER + "a" * (513 - len(LATER)), tracestate=None, bag=None)  # 513: ignored
@example(traceparent=TRACEPARENT, tracestate=[",".join(f"k{i}=v" for i in range(33))], bag=None)
@example(traceparent=TRACEPARENT, tracestate=[",".join(f"k{i}=v" for i in range(32)), ""], bag=None)
@example(traceparent=TRACEPARENT, tracestate=[",".join(f"k{i}=v" for i in range(17))] * 2, bag="team=search")
@example(traceparent=TRACEPARENT, tracestate=["congo=a,congo=b,Evil"], bag=None)  # a duplicate before the fault
# One member the propagator refuses among plain ones: a key not in lower case, a value too long, one holding "=".
@example(traceparent=TRACEPARENT, tracestate=["congo=t61rcWkgMzE,Rojo=00f067aa0ba902b7"], bag=None)
@example(traceparent=TRACEPARENT, tracestate=["congo=t61rcWkgMzE,rojo=" + "x" * 257], bag=None)
@example(traceparent=TRACEPARENT, tracestate=["congo=t61rcWkgMzE,rojo=a=b"], bag=None)
@example(traceparent=TRACEPARENT, tracestate=[WIDE], bag=None)  # plain members, 8,193 characters
@example(traceparent=TRACEPARENT, tracestate=WIDE_FIELDS, bag=None)  # two fields, 8,193 joined
@given(
    traceparent=_TRACEPARENT,
    tracestate=st.one_of(st.none(), st.lists(_FIELD, min_size=1, max_size=3)),
    bag=st.sampled_from([None, "team=search,tier=gold;p=1", "bad key=v,team=search"]),
)
def test_the_context_read_is_the_propagators_without_their_warnings(
    traceparent: str | None, tracestate: list[str] | None, bag: str | None
) -> None:
    headers: dict[str, list[str]] = {}
    if traceparent is not None:
        headers["traceparent"] = [traceparent]
    if tracestate is not None:
        headers["tracestate"] = tracestate
    if bag is not None:
        headers["baggage"] = [bag]
    expected = propagators_context(headers)
    with opentelemetry_warnings() as warnings:
        read = _extract(asgi_headers(headers), apart=True)
    same_context(read, expected)
    assert warnings == []
    # What OpenTelemetry's ASGI middleware reads (with the HTTP span): the same, from the headers screened for it.
    sent = asgi_headers(headers)
    screened = _screened_scope(sent, asgi_getter)
    with opentelemetry_warnings() as warnings:
        asgi = propagate.extract({"headers": sent if screened is None else screened}, Context(), getter=asgi_getter)
    same_context(asgi, expected)
    assert warnings == []
