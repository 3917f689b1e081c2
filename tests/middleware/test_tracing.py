"""Traces: spans from a real uvicorn server, driven by the openai/anthropic SDKs, received by a real OTLP receiver."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import httpx
import openai
import pytest
import starlette
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import create_app
from llm_telemetry.demo.run import DEMO_TOOLS
from llm_telemetry.redact import EMAIL_MASK, TRUNCATION_MARK, redact
from llm_telemetry.tracing import REDACTED_BEYOND_CAP, WINDOW_GROWTHS
from otlp_receiver import OTLPReceiver, demo_server, isolated_env, otlp_receiver, parent_of, tracing_env, wait_span
from support import free_port, serve

#: Starlette's router sets ``scope["route"]`` from 1.7 (FastAPI's always has): before it, a plain Starlette app's
#: spans have no ``http.route`` (docs/tracing.md).
STARLETTE_ROUTES = tuple(int(part) for part in starlette.__version__.split(".")[:2]) >= (1, 7)

SERVER, INTERNAL = 2, 1  # OTLP span kinds
UNSET, ERROR = 0, 2  # OTLP status codes


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def http_server(receiver: OTLPReceiver) -> Iterator[str]:
    with demo_server(tracing_env(receiver), token_delay=0.002) as (_, base):
        yield base


@pytest.fixture(scope="module")
def two_span_server(receiver: OTLPReceiver) -> Iterator[str]:
    env = tracing_env(receiver, LLM_TELEMETRY_TRACING_HTTP_SPAN="true")
    with demo_server(env, token_delay=0.002) as (_, base):
        yield base


@contextmanager
def traced_chat_app(
    receiver: OTLPReceiver,
    chat: Any,
    service: str,
    capture: bool = False,
    env: dict[str, str] | None = None,
    wrap: Callable[[Any], Any] | None = None,
    path: str = "/v1/chat/completions",
) -> Iterator[str]:
    """A chat-completions endpoint of a test's own under the middleware, its spans sent straight to ``receiver``,
    served by uvicorn; every span is exported by the time the block is left. ``env``: more of the middleware's
    variables; ``wrap``: what the served app is made of the middleware (an outer ASGI middleware, say); ``path``:
    the endpoint's (another API's)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from starlette.applications import Starlette
    from starlette.routing import Route

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    with isolated_env({**({"LLM_TELEMETRY_CAPTURE_CONTENT": "true"} if capture else {}), **(env or {})}):
        app = LLMTelemetryMiddleware(
            Starlette(routes=[Route(path, chat, methods=["POST"])]),
            metrics_port=0,
            tracer_provider=provider,
        )
        app.telemetry  # noqa: B018 - built while the environment is in place
    try:
        with serve(wrap(app) if wrap is not None else app) as base:
            yield base
    finally:
        app.telemetry.shutdown()
        provider.shutdown()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)


def test_llm_span_is_the_server_span_continuing_the_callers_trace(receiver: OTLPReceiver, http_server: str) -> None:
    trace_id, caller_span = "5cf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
    stream = client(http_server).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "say twelve words please"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
        extra_headers={"traceparent": f"00-{trace_id}-{caller_span}-01", "x-request-id": "trace-test-single"},
    )
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) == 12

    span = wait_span(receiver, **{"llm.request_id": "trace-test-single"})
    # One span for the request: the GenAI span is the server span, the caller's span its parent.
    assert span.name == "chat gpt-4o"
    assert span.kind == SERVER
    assert span.trace_id == trace_id and span.parent_span_id == caller_span
    # Spans are exported in the order they end: once a later request's span is in, any other span of this
    # request (an ASGI server span ends after the LLM span) would be too.
    client(http_server).embeddings.create(
        model="text-embedding-3-small", input=["x"], extra_headers={"x-request-id": "trace-test-single-next"}
    )
    wait_span(receiver, **{"llm.request_id": "trace-test-single-next"})
    assert [s.name for s in receiver.spans if s.trace_id == trace_id] == ["chat gpt-4o"]
    attrs = span.attributes
    host, port = http_server.removeprefix("http://").rsplit(":", 1)
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/v1/chat/completions"
    assert attrs["url.scheme"] == "http"
    if STARLETTE_ROUTES:
        assert attrs["http.route"] == "/v1/chat/completions"
    else:
        assert "http.route" not in attrs
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == host and attrs["server.port"] == int(port)
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o"
    assert attrs["gen_ai.request.max_tokens"] == 50
    assert attrs["gen_ai.usage.output_tokens"] == 12
    assert any(e[0] == "gen_ai.first_token" for e in span.events)


def test_without_traceparent_the_server_span_is_a_root(receiver: OTLPReceiver, http_server: str) -> None:
    client(http_server).embeddings.create(
        model="text-embedding-3-small", input=["a b c"], extra_headers={"x-request-id": "trace-test-root"}
    )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-root"})
    assert span.kind == SERVER
    assert span.name == "embeddings text-embedding-3-small"
    assert span.parent_span_id == ""


def test_two_span_option_nests_the_llm_span_under_the_asgi_span(receiver: OTLPReceiver, two_span_server: str) -> None:
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    stream = client(two_span_server).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "say twelve words please"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        extra_headers={"traceparent": f"00-{trace_id}-{caller_span}-01", "x-request-id": "trace-test-1"},
    )
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) == 12

    span = wait_span(receiver, **{"llm.request_id": "trace-test-1"})
    assert span.name == "chat gpt-4o"
    assert span.kind == INTERNAL
    attrs = span.attributes
    assert "url.path" not in attrs  # the HTTP attributes are on the ASGI server span
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o"
    assert attrs["gen_ai.request.max_tokens"] == 50
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.request.top_p"] == 0.9
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.response.model"] == "gpt-4o"
    assert attrs["gen_ai.response.id"].startswith("chatcmpl-demo")
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["gen_ai.usage.input_tokens"] == 4
    assert attrs["gen_ai.usage.output_tokens"] == 12
    assert attrs["http.response.status_code"] == 200
    assert "error.type" not in attrs and span.status_code != ERROR
    assert "gen_ai.input.messages" not in attrs and "gen_ai.output.messages" not in attrs  # content is opt-in
    # The first token is one event, inside the span; per-chunk receive/send spans are off.
    (event,) = [e for e in span.events if e[0] == "gen_ai.first_token"]
    assert span.start_ns <= event[2] <= span.end_ns
    assert 0 <= event[1]["gen_ai.response.time_to_first_chunk"] == attrs["gen_ai.response.time_to_first_chunk"]
    # Parent/child: caller's traceparent -> ASGI server span -> LLM span, in one trace.
    server = parent_of(receiver, span)
    assert server.kind == SERVER and server.scope.startswith("opentelemetry.instrumentation.asgi")
    assert server.trace_id == span.trace_id == trace_id
    assert server.parent_span_id == caller_span
    assert [s for s in receiver.spans if s.trace_id == trace_id and s.kind not in (SERVER, INTERNAL)] == []
    assert len([s for s in receiver.spans if s.trace_id == trace_id]) == 2
    # The standard variables: service name, resource attributes and exporter headers.
    assert span.resource["service.name"] == "llm-test"
    assert span.resource["deployment.environment"] == "test"
    assert span.protocol == "http"
    assert any(h.get("x-collector-token") == "secret123" for h in receiver.headers)


def test_tool_calls_are_visible_on_the_span(receiver: OTLPReceiver, http_server: str) -> None:
    client(http_server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather?"}],
        tools=DEMO_TOOLS,
        extra_headers={"x-request-id": "trace-test-tools"},
    )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-tools"})
    assert span.name == "chat gpt-4o-mini"
    assert span.attributes["llm.tool_calls.names"] == ["get_weather"]
    assert span.attributes["llm.tool_calls.count"] == 1
    assert span.attributes["gen_ai.response.finish_reasons"] == ["tool_calls"]
    # The GenAI conventions set it only on a streaming request: unset means not streaming.
    assert "gen_ai.request.stream" not in span.attributes


@pytest.mark.parametrize("two_spans", [False, True], ids=["one-span", "two-span"])
def test_a_4xx_answer_is_an_error_type_and_no_server_span_error(
    receiver: OTLPReceiver, http_server: str, two_span_server: str, two_spans: bool
) -> None:
    """The HTTP conventions leave a SERVER span's status unset for a 4xx answer (the caller's error); error.type
    names it all the same. The LLM span inside OpenTelemetry's server span (two spans) is an error, as the GenAI
    conventions have it; the 5xx and disconnect tests below hold both shapes to ERROR."""
    request_id = f"trace-test-429-{two_spans}"
    with pytest.raises(openai.RateLimitError):
        client(two_span_server if two_spans else http_server).chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-demo-fail": "rate_limit", "x-request-id": request_id},
        )
    span = wait_span(receiver, **{"llm.request_id": request_id})
    assert span.kind == (INTERNAL if two_spans else SERVER)
    assert span.status_code == (ERROR if two_spans else UNSET)
    assert span.status_message == ""  # error.type names it; the conventions advise against repeating it there
    assert span.attributes["error.type"] == "rate_limit"
    assert span.attributes["http.response.status_code"] == 429


def test_span_ends_when_the_app_raises(receiver: OTLPReceiver, http_server: str) -> None:
    response = httpx.post(
        http_server + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-demo-fail": "exception", "x-request-id": "trace-test-raise"},
        timeout=10,
    )
    assert response.status_code == 500
    span = wait_span(receiver, **{"llm.request_id": "trace-test-raise"})
    assert span.status_code == ERROR
    assert span.attributes["error.type"] == "app_exception"
    # The exception as the SDK records one leaving a span: an event with its traceback, the status described by it.
    assert span.status_message == "RuntimeError: demo: the app failed"
    [(_, attributes, at)] = [e for e in span.events if e[0] == "exception"]
    assert attributes["exception.type"] == "RuntimeError"
    assert attributes["exception.message"] == "demo: the app failed"
    assert attributes["exception.escaped"] == "True"
    assert 'raise RuntimeError("demo: the app failed")' in attributes["exception.stacktrace"]
    # Within the span, as a trace view draws it: not stamped when recorded, after the span's end (its last byte).
    assert span.end_ns >= at >= span.start_ns > 0
    assert span.kind == SERVER and span.attributes["http.response.status_code"] == 500


def test_span_ends_when_the_client_disconnects_mid_stream(receiver: OTLPReceiver, http_server: str) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "long story"}], "stream": True}
    headers = {"x-demo-words": "100000", "x-request-id": "trace-test-disconnect"}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", http_server + "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        chunks = response.iter_bytes()
        assert b"data:" in next(chunks)
        assert b"data:" in next(chunks)
    # Closing the connection after two chunks of a ~200 s stream: the span must still end, marked as such.
    span = wait_span(receiver, **{"llm.request_id": "trace-test-disconnect"})
    assert span.attributes["error.type"] == "client_disconnect"
    assert span.status_code == ERROR and span.status_message == ""
    assert not [e for e in span.events if e[0] == "exception"]  # the server cancelling the app is no app failure
    assert span.attributes["gen_ai.request.model"] == "gpt-4o"
    assert any(e[0] == "gen_ai.first_token" for e in span.events)


def test_grpc_export_and_anthropic_stream(receiver: OTLPReceiver) -> None:
    with demo_server(tracing_env(receiver, "grpc", OTEL_SERVICE_NAME="llm-grpc")) as (_, base):
        sdk = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
        with sdk.messages.stream(
            model="claude-test",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello there"}],
            extra_headers={"x-request-id": "trace-test-grpc"},
        ) as stream:
            assert len(stream.get_final_text().split()) == 12
    span = wait_span(receiver, **{"llm.request_id": "trace-test-grpc"})
    assert span.protocol == "grpc"
    assert span.name == "chat claude-test"
    assert span.resource["service.name"] == "llm-grpc"
    assert span.attributes["gen_ai.provider.name"] == "anthropic"
    assert span.attributes["gen_ai.usage.input_tokens"] == 2
    assert span.attributes["gen_ai.usage.output_tokens"] == 12
    assert span.attributes["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert span.attributes["gen_ai.request.max_tokens"] == 64
    assert span.kind == SERVER


def test_request_parameters_the_conventions_name_are_on_the_span(receiver: OTLPReceiver, http_server: str) -> None:
    """The GenAI conventions' request attributes, as the SDKs send the parameters: the seed, a choice count other
    than 1 and the output format (conditionally required), stop sequences, penalties and top_k (recommended)."""
    oai = client(http_server)
    oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "answer in JSON"}],
        seed=42,
        n=2,
        response_format={"type": "json_object"},
        stop=["END", "STOP"],
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        extra_headers={"x-request-id": "trace-test-params"},
    )
    oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        n=1,
        stop="\n\n",
        extra_headers={"x-request-id": "trace-test-params-plain"},
    )
    oai.responses.create(
        model="gpt-4o",
        input="hi",
        text={"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}},
        extra_headers={"x-request-id": "trace-test-params-responses"},
    )
    claude = anthropic.Anthropic(base_url=http_server, api_key="sk-ant-test", max_retries=0)
    claude.messages.create(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        stop_sequences=["Human:"],
        extra_body={"top_k": 40},  # (a sampling parameter this SDK version no longer takes as an argument)
        extra_headers={"x-request-id": "trace-test-params-anthropic"},
    )

    attrs = wait_span(receiver, **{"llm.request_id": "trace-test-params"}).attributes
    assert attrs["gen_ai.request.seed"] == 42
    assert attrs["gen_ai.request.choice.count"] == 2
    assert attrs["gen_ai.output.type"] == "json"
    assert attrs["gen_ai.request.stop_sequences"] == ["END", "STOP"]
    assert attrs["gen_ai.request.frequency_penalty"] == 0.5
    assert attrs["gen_ai.request.presence_penalty"] == -0.25
    assert attrs["openai.api.type"] == "chat_completions"
    plain = wait_span(receiver, **{"llm.request_id": "trace-test-params-plain"}).attributes
    assert plain["gen_ai.request.stop_sequences"] == ["\n\n"]
    for absent in ("gen_ai.request.seed", "gen_ai.request.choice.count", "gen_ai.output.type",
                   "gen_ai.request.frequency_penalty", "gen_ai.request.top_k"):  # fmt: skip
        assert absent not in plain, absent
    responses = wait_span(receiver, **{"llm.request_id": "trace-test-params-responses"}).attributes
    assert responses["gen_ai.output.type"] == "json"
    # Both OpenAI APIs are the operation chat (and so the span chat gpt-4o): this attribute tells them apart.
    assert responses["openai.api.type"] == "responses"
    claude_attrs = wait_span(receiver, **{"llm.request_id": "trace-test-params-anthropic"}).attributes
    assert claude_attrs["gen_ai.request.top_k"] == 40
    assert "openai.api.type" not in claude_attrs
    assert claude_attrs["gen_ai.request.stop_sequences"] == ["Human:"]


def test_embeddings_parameters_and_the_conversation_are_on_the_span(receiver: OTLPReceiver, http_server: str) -> None:
    """The conventions' embeddings request attributes (the SDK asks for base64 unless told otherwise) and the
    conversation a Responses request belongs to, given as an id or as an object."""
    oai = client(http_server)
    oai.embeddings.create(
        model="text-embedding-3-small", input=["x"], dimensions=256, extra_headers={"x-request-id": "trace-test-emb"}
    )
    oai.embeddings.create(
        model="text-embedding-3-small",
        input=["x"],
        encoding_format="float",
        extra_headers={"x-request-id": "trace-test-emb-float"},
    )
    oai.responses.create(
        model="gpt-4o", input="hi", conversation="conv_123", extra_headers={"x-request-id": "trace-test-conv"}
    )
    oai.responses.create(
        model="gpt-4o", input="hi", conversation={"id": "conv_456"}, extra_headers={"x-request-id": "trace-test-conv2"}
    )
    oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-request-id": "trace-test-noconv"},
    )

    embedded = wait_span(receiver, **{"llm.request_id": "trace-test-emb"}).attributes
    assert embedded["gen_ai.request.encoding_formats"] == ["base64"]
    assert embedded["gen_ai.embeddings.dimension.count"] == 256
    floats = wait_span(receiver, **{"llm.request_id": "trace-test-emb-float"}).attributes
    assert floats["gen_ai.request.encoding_formats"] == ["float"]
    assert "gen_ai.embeddings.dimension.count" not in floats
    assert (
        wait_span(receiver, **{"llm.request_id": "trace-test-conv"}).attributes["gen_ai.conversation.id"] == "conv_123"
    )
    assert (
        wait_span(receiver, **{"llm.request_id": "trace-test-conv2"}).attributes["gen_ai.conversation.id"] == "conv_456"
    )
    plain = wait_span(receiver, **{"llm.request_id": "trace-test-noconv"}).attributes
    for absent in ("gen_ai.conversation.id", "gen_ai.request.encoding_formats", "gen_ai.embeddings.dimension.count"):
        assert absent not in plain, absent


def test_captured_system_instructions_given_apart_have_their_own_attribute(receiver: OTLPReceiver) -> None:
    """Anthropic's ``system`` and the Responses API's ``instructions`` are not messages of the conversation: the
    conventions put them in ``gen_ai.system_instructions``. A system message inside ``messages`` stays a message."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    with demo_server(env) as (_, base):
        claude = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
        claude.messages.create(
            model="claude-test",
            max_tokens=64,
            system=[{"type": "text", "text": "You are terse."}],
            messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-request-id": "trace-test-system-anthropic"},
        )
        client(base).responses.create(
            model="gpt-4o",
            instructions="Answer in French.",
            input="hello",
            extra_headers={"x-request-id": "trace-test-system-responses"},
        )
    for request_id, instructions in (
        ("trace-test-system-anthropic", "You are terse."),
        ("trace-test-system-responses", "Answer in French."),
    ):
        attrs = wait_span(receiver, **{"llm.request_id": request_id}).attributes
        assert json.loads(attrs["gen_ai.system_instructions"]) == [{"type": "text", "content": instructions}]
        messages = json.loads(attrs["gen_ai.input.messages"])
        assert [m["role"] for m in messages] == ["user"], messages
        assert messages[0]["parts"][0]["content"] == "hello"


def test_captured_content_blocks_are_parts_in_their_order(receiver: OTLPReceiver) -> None:
    """A message given as a list of content blocks (OpenAI's content parts, Anthropic's blocks and its ``system``
    list) is one part per text block and per tool block, in the order sent, as the conventions keep them: text
    blocks had been run together with no separator ("Describein one word."), ahead of the tool calls wherever they
    stood. Images are not shown. The text blocks of a message share the capture cap."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS="100")
    with demo_server(env) as (_, base):
        client(base).chat.completions.create(
            model="gpt-4o",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                        {"type": "text", "text": "in one word."},
                    ],
                },
                {"role": "user", "content": [{"type": "text", "text": "a" * 60}, {"type": "text", "text": "b" * 60}]},
            ],
            extra_headers={"x-request-id": "trace-test-blocks-openai"},
        )
        anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0).messages.create(
            model="claude-test",
            max_tokens=64,
            system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
            messages=[
                {"role": "user", "content": "weather and time?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "text", "text": "And the time:"},
                        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "noon"},
                        {"type": "text", "text": "x" * 120},
                    ],
                },
            ],
            extra_headers={"x-request-id": "trace-test-blocks-anthropic"},
        )
    openai_attrs = wait_span(receiver, **{"llm.request_id": "trace-test-blocks-openai"}).attributes
    described, shared = json.loads(openai_attrs["gen_ai.input.messages"])
    assert described["parts"] == [{"type": "text", "content": "Describe"}, {"type": "text", "content": "in one word."}]
    assert shared["parts"] == [
        {"type": "text", "content": "a" * 60},
        {"type": "text", "content": "b" * 40 + TRUNCATION_MARK},
    ]
    claude_attrs = wait_span(receiver, **{"llm.request_id": "trace-test-blocks-anthropic"}).attributes
    assert json.loads(claude_attrs["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "You are terse."},
        {"type": "text", "content": "Answer in French."},
    ]
    *_, asked, results = json.loads(claude_attrs["gen_ai.input.messages"])  # (the oldest may be over the budget)
    assert asked["parts"] == [
        {"type": "text", "content": "Let me look."},
        {"type": "tool_call", "id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "text", "content": "And the time:"},
        {"type": "tool_call", "id": "toolu_2", "name": "get_time", "arguments": "{}"},
    ]
    assert results["parts"] == [
        {"type": "tool_call_response", "id": "toolu_1", "response": "18C"},
        {"type": "tool_call_response", "id": "toolu_2", "response": "noon"},
        {"type": "text", "content": "x" * 100 + TRUNCATION_MARK},
    ]


def test_captured_content_blocks_are_bounded_in_number() -> None:
    """However many blocks a message has, at most MAX_CAPTURED_TOOL_PARTS text parts and as many tool parts are
    shown, the text within one cap; text left out marks the last text part shown as cut."""
    from opentelemetry.trace import NoOpTracer

    from llm_telemetry.config import Settings
    from llm_telemetry.tracing import MAX_CAPTURED_TOOL_PARTS, SpanObserver

    observer = SpanObserver(NoOpTracer(), Settings.resolve(env={}, capture_content=True, capture_content_max_chars=100))
    blocks: list[Any] = []
    for i in range(1000):
        blocks += [{"type": "text", "text": "t"}, {"type": "tool_result", "tool_use_id": f"id{i}", "content": "r"}, i]
    parts = observer._parts({"role": "user", "content": blocks})
    texts = [p for p in parts if p["type"] == "text"]
    assert len(texts) == MAX_CAPTURED_TOOL_PARTS
    assert len(parts) - len(texts) == MAX_CAPTURED_TOOL_PARTS
    assert texts[-1]["content"] == "t" + TRUNCATION_MARK and texts[0]["content"] == "t"
    long = observer._parts({"role": "user", "content": [{"type": "text", "text": "w" * 90}] * 5})
    assert [p["content"] for p in long] == ["w" * 90, "w" * 10 + TRUNCATION_MARK]
    # Tool calls beside tool blocks count against the same bound.
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    both = observer._parts({"role": "assistant", "content": blocks, "tool_calls": [call] * 100})
    assert sum(p["type"] != "text" for p in both) == MAX_CAPTURED_TOOL_PARTS
    # System instructions are text, within one cap, whatever blocks a client sends there.
    from llm_telemetry.record import LLMCall

    attributes: dict[str, Any] = {}
    system = LLMCall("chat", "anthropic", start=0.0)
    system.system_instructions = [{"type": "text", "text": "s" * 90}, *blocks[:300]]
    observer._content(attributes, system)
    shown = json.loads(attributes["gen_ai.system_instructions"])
    assert {p["type"] for p in shown} == {"text"}
    assert sum(len(p["content"]) for p in shown) <= 100 + len(TRUNCATION_MARK)
    image_only = LLMCall("chat", "anthropic", start=0.0)
    image_only.system_instructions = [{"type": "image", "source": {}}]
    observer._content(attributes := {}, image_only)
    assert "gen_ai.system_instructions" not in attributes


@pytest.mark.parametrize("two_spans", [False, True], ids=["one-span", "two-span"])
def test_span_names_are_bounded_like_the_model_label(receiver: OTLPReceiver, two_spans: bool) -> None:
    """Trace backends index span names (Jaeger's operations, Tempo's span metrics), and a client can send any
    number of model names: past LLM_TELEMETRY_MAX_LABEL_VALUES models, or a model too long for a label or with a
    line break in it (which takes no place), the span is named ``chat other``, as the metrics label it; its
    gen_ai.request.model attribute keeps the model sent."""
    service = f"llm-bounded-{two_spans}"
    env = tracing_env(
        receiver,
        OTEL_SERVICE_NAME=service,
        LLM_TELEMETRY_MAX_LABEL_VALUES="2",
        LLM_TELEMETRY_TRACING_HTTP_SPAN=str(two_spans).lower(),
    )
    models = ["gpt-4o", "gpt-4o\nlevel=error", "gpt-4o-mini", "gpt-4o", "ft:gpt-4o:acme:1", "m" * 300, "gpt-4o-mini"]
    with demo_server(env) as (app, base):
        for index, model in enumerate(models):
            client(base).chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": f"{service}-{index}"},
            )
        assert app.telemetry.tracing is not None and app.telemetry.tracing.force_flush()
    names = []
    for index, model in enumerate(models):
        span = wait_span(receiver, **{"llm.request_id": f"{service}-{index}"})
        assert span.attributes["gen_ai.request.model"] == model
        names.append(span.name)
    expected = [
        "chat gpt-4o",
        "chat other",
        "chat gpt-4o-mini",
        "chat gpt-4o",
        "chat other",
        "chat other",
        "chat gpt-4o-mini",
    ]
    assert names == expected


def test_no_endpoint_means_no_tracing() -> None:
    with demo_server({}) as (app, base):
        assert app.telemetry.tracing is None  # no provider, no observer, no ASGI wrapper
        response = httpx.post(
            base + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert response.status_code == 200
        assert "traceresponse" not in response.headers


def test_sampler_always_off_exports_nothing(receiver: OTLPReceiver) -> None:
    env = tracing_env(receiver, OTEL_TRACES_SAMPLER="always_off", OTEL_SERVICE_NAME="llm-unsampled")
    with demo_server(env) as (app, base):
        client(base).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert app.telemetry.tracing is not None
        assert app.telemetry.tracing.force_flush()
    assert [s for s in receiver.spans if s.resource.get("service.name") == "llm-unsampled"] == []


def test_a_queue_smaller_than_the_default_batch_keeps_traces_logs_and_metrics(receiver: OTLPReceiver) -> None:
    """docs/tracing.md ("Cost"): a smaller ``OTEL_BSP_MAX_QUEUE_SIZE`` bounds the memory a down collector costs. Set
    alone, under the SDK's default batch of 512, the SDK refused it and the middleware served unobserved, metrics
    too; so did ``OTEL_BLRP_MAX_QUEUE_SIZE`` for the OTLP log records. The batch is cut to the queue instead."""
    from support import scrape_text

    name, port = "llm-small-queue", free_port()
    env = tracing_env(
        receiver,
        OTEL_SERVICE_NAME=name,
        OTEL_BSP_MAX_QUEUE_SIZE="4",
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_BLRP_MAX_QUEUE_SIZE="4",
        OTEL_BLRP_SCHEDULE_DELAY="20",
    )
    with demo_server(env, metrics_port=port) as (_, base):
        for i in range(3):
            client(base).chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": f"small-queue-{i}"},
            )
        assert "llm_requests_total{" in scrape_text(port)
    ids = {f"small-queue-{i}" for i in range(3)}
    assert receiver.wait_for(
        lambda r: {s.attributes.get("llm.request_id") for s in r.spans if s.resource.get("service.name") == name} >= ids
    )
    assert receiver.wait_for(lambda r: len([x for x in r.logs if x.resource.get("service.name") == name]) >= 3)


def test_a_span_processor_the_sdk_refuses_leaves_the_setup_failure_counted(receiver: OTLPReceiver) -> None:
    """docs/metrics.md ("Setup"): a failed setup is shown as ``llm_telemetry_internal_errors_total{...="setup"}``
    where a plain exposition can still be made. A batch span processor the SDK refuses (``OTEL_BSP_SCHEDULE_DELAY=0``)
    failed that plain setup too, which built the same tracing again: the port showed nothing at all."""
    from support import scrape

    port = free_port()
    env = tracing_env(receiver, OTEL_SERVICE_NAME="llm-refused-processor", OTEL_BSP_SCHEDULE_DELAY="0")
    with demo_server(env, metrics_port=port) as (app, base):
        answer = client(base).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content  # served, unobserved
        metrics = scrape(port)
        assert metrics.value("llm_telemetry_internal_errors_total", llm_telemetry_component="setup") == 1
        assert app.telemetry.tracing is None


def test_content_capture_is_opt_in_redacted_and_capped(receiver: OTLPReceiver) -> None:
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS="60")
    secret = "mail me at jane.doe@example.com with key sk-proj-abcdefghijklmnopqrstuvwxyz012345"
    with demo_server(env) as (_, base):
        client(base).chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": secret}],
            extra_headers={"x-request-id": "trace-test-content"},
        )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-content"})
    raw = span.attributes["gen_ai.input.messages"]
    assert "jane.doe@example.com" not in raw and "sk-proj-abc" not in raw
    messages = json.loads(raw)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["parts"] == [{"type": "text", "content": "be brief"}]
    user = messages[1]["parts"][0]["content"]
    assert user.startswith("mail me at [email] with key [key]")
    output = json.loads(span.attributes["gen_ai.output.messages"])
    assert output[0]["role"] == "assistant" and output[0]["finish_reason"] == "stop"
    text = output[0]["parts"][0]["content"]
    assert text.endswith(TRUNCATION_MARK) and len(text) == 60 + len(TRUNCATION_MARK)  # 12 demo words > 60 chars


def test_captured_tool_round_trips_show_the_calls_and_results(receiver: OTLPReceiver) -> None:
    """With content capture on, a tool round trip is shown as the GenAI conventions shape it, in all three APIs:
    the model's tool call as a ``tool_call`` part (id, name, arguments), the tool's answer as a
    ``tool_call_response`` part (id, result), and an answer that calls a tool as a ``tool_call`` part by name.
    Before, the call was the text ``null``, the result a text without its id, and the answer had no output at all."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    secret = "mail jane.doe@example.com"
    with demo_server(env) as (_, base):
        openai_client = client(base)
        openai_client.chat.completions.create(
            model="gpt-4o",
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": f"18C; {secret}"},
            ],
            tools=DEMO_TOOLS,
            extra_headers={"x-request-id": "trace-test-tools-chat"},
        )
        openai_client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "weather?"}],
            tools=DEMO_TOOLS,
            stream=True,
            extra_headers={"x-request-id": "trace-test-tools-answer"},
        ).close()
        anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0).messages.create(
            model="claude-test",
            max_tokens=64,
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]},
            ],
            extra_headers={"x-request-id": "trace-test-tools-anthropic"},
        )
        openai_client.responses.create(
            model="gpt-4o",
            input=[
                {"type": "reasoning", "id": "rs_1", "summary": []},  # (the model's reasoning, sent back)
                {"type": "function_call", "call_id": "fc_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call_output", "call_id": "fc_1", "output": "18C"},
                {"type": "custom_tool_call", "call_id": "ct_1", "name": "grep", "input": "TODO"},
                {"type": "custom_tool_call_output", "call_id": "ct_1", "output": "3 lines"},
                {"type": "item_reference", "id": "msg_0"},
                {
                    "type": "shell_call_output",
                    "call_id": "sh_1",
                    "output": [{"stdout": "a.txt\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}],
                },
                {
                    "type": "computer_call_output",
                    "call_id": "cu_1",
                    "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                },
                {"type": "apply_patch_call_output", "call_id": "ap_1", "status": "completed"},
            ],
            extra_headers={"x-request-id": "trace-test-tools-responses"},
        )

    def messages(request_id: str, attribute: str = "gen_ai.input.messages") -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(
            wait_span(receiver, **{"llm.request_id": request_id}).attributes[attribute]
        )
        return found

    chat = messages("trace-test-tools-chat")
    assert chat[1] == {"role": "assistant", "parts": [
        {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]}  # fmt: skip
    assert chat[2] == {"role": "tool", "parts": [
        {"type": "tool_call_response", "id": "call_1", "response": "18C; mail [email]"}]}  # fmt: skip  # redacted
    answer = messages("trace-test-tools-answer", "gen_ai.output.messages")
    # (The call's id as the stream gave it; the finish reason as the conventions name it, tool_calls being OpenAI's.)
    assert answer == [{"role": "assistant", "finish_reason": "tool_call", "parts": [
        {"type": "tool_call", "id": "call_demo1", "name": "get_weather"}]}]  # fmt: skip
    claude = messages("trace-test-tools-anthropic")
    assert claude[1]["parts"] == [
        {"type": "text", "content": "Let me look."},
        {"type": "tool_call", "id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    ]
    assert claude[2]["parts"] == [{"type": "tool_call_response", "id": "toolu_1", "response": "18C"}]
    responses = messages("trace-test-tools-responses")
    # Items with no role are the model's own (its reasoning, its tool call) or a tool's output, as the conventions'
    # roles name them.
    assert [m["role"] for m in responses] == ["assistant", "assistant", "tool", "assistant", "tool", "assistant"] + [
        "tool"
    ] * 3
    assert [m["parts"] for m in responses] == [
        [],
        [{"type": "tool_call", "id": "fc_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
        [{"type": "tool_call_response", "id": "fc_1", "response": "18C"}],
        [{"type": "tool_call", "id": "ct_1", "name": "grep", "arguments": "TODO"}],  # (a custom tool's input)
        [{"type": "tool_call_response", "id": "ct_1", "response": "3 lines"}],
        [],  # (a reference to an item stored before: nothing to show)
        [{"type": "tool_call_response", "id": "sh_1", "response": "a.txt\n"}],  # a shell command's output
        [{"type": "tool_call_response", "id": "cu_1", "response": ""}],  # (a screenshot: images are not shown)
        [{"type": "tool_call_response", "id": "ap_1", "response": ""}],  # (no output)
    ]


def test_a_stream_that_failed_before_its_finish_has_the_finish_reason_error(receiver: OTLPReceiver) -> None:
    """The conventions require each output message's ``finish_reason``, a string: a stream whose server failed
    midway, after some text, says ``error`` there (null is no finish reason a reader of the schema accepts)."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    with demo_server(env) as (_, base):
        stream = client(base).chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-request-id": "trace-test-failed-midway", "x-demo-fail": "stream_error"},
        )
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
    span = wait_span(receiver, **{"llm.request_id": "trace-test-failed-midway"})
    (output,) = json.loads(span.attributes["gen_ai.output.messages"])
    assert output["finish_reason"] == "error" and output["parts"][0]["content"]


def test_tool_calls_ids_and_names_count_in_the_captured_messages_budget(receiver: OTLPReceiver) -> None:
    """Tool calls' ids and names are shown too, up to 256 characters each: they count in the budget of the messages
    shown (32 turns of 16 such calls were shown whole, ~300,000 characters against a budget of a few thousand)."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS="100")
    calls = [
        {
            "id": f"call_{i}_{'x' * 240}",
            "type": "function",
            "function": {"name": f"tool_{i}_{'n' * 200}", "arguments": "{}"},
        }
        for i in range(16)
    ]
    turns = [{"role": "assistant", "content": None, "tool_calls": calls} for _ in range(32)]
    with demo_server(env) as (_, base):
        client(base).chat.completions.create(
            model="gpt-4o",
            messages=[*turns, {"role": "user", "content": "and now?"}],  # type: ignore[list-item]
            extra_headers={"x-request-id": "trace-test-tool-budget"},
        )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-tool-budget"})
    shown = json.loads(span.attributes["gen_ai.input.messages"])
    assert [m["role"] for m in shown] == ["user"]  # the newest alone: one turn of those calls is over the budget
    assert span.attributes["llm.input.messages.omitted"] == 32


def test_client_strings_on_the_span_are_valid_utf8_and_bounded(receiver: OTLPReceiver) -> None:
    """A message role and stop sequences as any client may send them (a lone surrogate, which JSON allows; a
    megabyte; not a string): every attribute is on the span, repaired (U+FFFD) and cut, none dropped."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    bodies = {
        "trace-test-role-surrogate": {"messages": [{"role": "\ud800", "content": "hi"}], "stop": ["\ud800END"]},
        "trace-test-role-long": {"messages": [{"role": "r" * 1_000_000, "content": "hi"}], "stop": "s" * 100_000},
        "trace-test-role-object": {"messages": [{"role": {"name": "x" * 100_000}, "content": "hi"}]},
    }
    with demo_server(env) as (_, base):
        for request_id, body in bodies.items():
            answer = httpx.post(
                base + "/v1/chat/completions",
                content=json.dumps({"model": "gpt-4o", **body}),  # ensure_ascii: a lone surrogate as its escape
                headers={"content-type": "application/json", "x-request-id": request_id},
            )
            assert answer.status_code == 200, answer.text
    spans = {request_id: wait_span(receiver, **{"llm.request_id": request_id}).attributes for request_id in bodies}
    roles = {request_id: json.loads(attrs["gen_ai.input.messages"])[0]["role"] for request_id, attrs in spans.items()}
    assert roles == {
        "trace-test-role-surrogate": "\ufffd",
        "trace-test-role-long": "r" * 64,
        "trace-test-role-object": "user",
    }
    assert spans["trace-test-role-surrogate"]["gen_ai.request.stop_sequences"] == ["\ufffdEND"]
    assert spans["trace-test-role-long"]["gen_ai.request.stop_sequences"] == ["s" * 64]


def test_captured_content_at_the_cap_is_whole_and_valid_utf8(receiver: OTLPReceiver) -> None:
    """Content of exactly the cap is shown whole and unmarked, one character more is cut to the cap and marked; a
    lone surrogate (which JSON allows) in content shown whole or cut is U+FFFD on the span, never lost with it."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS="50")
    contents = {
        "trace-test-cap-exact": ("e" * 50, "e" * 50),
        "trace-test-cap-over": ("o" * 51, "o" * 50 + TRUNCATION_MARK),
        "trace-test-cap-surrogate": ("a\ud800b", "a\ufffdb"),
        "trace-test-cap-surrogate-cut": ("\udc00" + "x" * 59, "\ufffd" + "x" * 49 + TRUNCATION_MARK),
    }
    with demo_server(env) as (_, base):
        for request_id, (content, _) in contents.items():
            answer = httpx.post(
                base + "/v1/chat/completions",
                content=json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}),
                headers={"content-type": "application/json", "x-request-id": request_id},
            )
            assert answer.status_code == 200, answer.text
    spans = {request_id: wait_span(receiver, **{"llm.request_id": request_id}) for request_id in contents}
    shown = {request_id: json.loads(span.attributes["gen_ai.input.messages"]) for request_id, span in spans.items()}
    assert shown == {
        request_id: [{"role": "user", "parts": [{"type": "text", "content": expected}]}]
        for request_id, (_, expected) in contents.items()
    }


def test_captured_conversation_keeps_the_system_prompt_and_the_newest_messages(receiver: OTLPReceiver) -> None:
    """A long conversation keeps a span small: the system prompt, then the newest messages while their content fits
    in four times the per-message cap, at most 32 messages, and the number left out."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS="50")
    system = {"role": "system", "content": "be brief"}
    long = [{"role": ("user", "assistant")[i % 2], "content": f"message {i:03} " + "x" * 90} for i in range(300)]
    short = [{"role": "user", "content": f"m{i:02}"} for i in range(100)]
    with demo_server(env) as (_, base):
        for request_id, messages in (("trace-test-long", long), ("trace-test-short", short)):
            client(base).chat.completions.create(
                model="gpt-4o", messages=[system, *messages], extra_headers={"x-request-id": request_id}
            )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-long"})
    captured = json.loads(span.attributes["gen_ai.input.messages"])
    cut = 50 + len(TRUNCATION_MARK)  # each long message, cut
    kept = (4 * 50 - len("be brief")) // cut
    assert captured[0] == {"role": "system", "parts": [{"type": "text", "content": "be brief"}]}
    assert [m["parts"][0]["content"] for m in captured[1:]] == [
        m["content"][:50] + TRUNCATION_MARK for m in long[-kept:]
    ]
    assert [m["role"] for m in captured[1:]] == [m["role"] for m in long[-kept:]]
    assert span.attributes["llm.input.messages.omitted"] == 300 - kept

    span = wait_span(receiver, **{"llm.request_id": "trace-test-short"})
    captured = json.loads(span.attributes["gen_ai.input.messages"])
    assert len(captured) == 32 and captured[0]["role"] == "system"
    assert [m["parts"][0]["content"] for m in captured[1:]] == [m["content"] for m in short[-31:]]
    assert span.attributes["llm.input.messages.omitted"] == 100 - 31


def test_custom_redactor_replaces_the_default(receiver: OTLPReceiver) -> None:
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    with demo_server(env, redact=lambda text: text.replace("Paris", "<city>")) as (_, base):
        client(base).chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Paris, bob@example.com"}],
            extra_headers={"x-request-id": "trace-test-redactor"},
        )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-redactor"})
    assert json.loads(span.attributes["gen_ai.input.messages"])[0]["parts"][0]["content"] == "<city>, bob@example.com"


def test_a_long_message_is_redacted_only_as_far_as_it_can_be_shown(receiver: OTLPReceiver) -> None:
    """The redactor gets each message cut to the cap plus REDACTED_BEYOND_CAP characters, not a long-context prompt
    whole; a value that starts before the cut is still masked whole. Masks that shorten the window below that make
    it grow by what they took, a bounded number of times (here to the whole of the second message)."""
    seen: list[int] = []

    def counting(text: str) -> str:
        seen.append(len(text))
        return redact(text)

    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS="60")
    straddling = "x" * 50 + " bob.smith@example.com " + "y" * 200_000
    masked = "sk-" + "k" * 2000 + " tail"  # a key past the cut: masked, it leaves less than the cap
    with demo_server(env, redact=counting) as (_, base):
        client(base).chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": straddling}, {"role": "user", "content": masked}],
            extra_headers={"x-request-id": "trace-test-long-redaction"},
        )
    span = wait_span(receiver, **{"llm.request_id": "trace-test-long-redaction"})
    contents = [m["parts"][0]["content"] for m in json.loads(span.attributes["gen_ai.input.messages"])]
    assert contents[0] == ("x" * 50 + " [email] yyyyyyyyyyyyyyyyy")[:60] + TRUNCATION_MARK
    assert contents[1] == "[key] tail"
    # The long-context message is redacted in its window (grown by the 14 characters its mask took), never whole.
    assert max(seen) <= min(2008, (WINDOW_GROWTHS + 1) * (60 + REDACTED_BEYOND_CAP))
    assert 60 + REDACTED_BEYOND_CAP in seen


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=80),
    st.sampled_from(["sk-proj-HALFKEYVISIBLE_REST_OF_THE_KEY_IS_HIDDEN_0123456789", "alice.private@example.com",
                     "4111 1111 1111 1111"]),
    st.integers(min_value=1, max_value=40),
    st.sampled_from([60, 4096]),
)  # fmt: skip
def test_a_value_cut_by_the_redaction_window_is_never_shown_in_part(
    fillers: int, secret: str, inside: int, max_chars: int
) -> None:
    """Masks shorten the window a message is redacted in (the cap plus REDACTED_BEYOND_CAP): however many masked
    values come first, a value the window's edge cuts in two (so the redactor cannot recognise it) is not shown,
    not even its first characters, and what is shown is what the whole message redacted would show."""
    from opentelemetry.trace import NoOpTracer

    from llm_telemetry.config import Settings
    from llm_telemetry.tracing import SpanObserver

    settings = Settings.resolve(env={}, capture_content=True, capture_content_max_chars=max_chars)
    tracing = SpanObserver(NoOpTracer(), settings)
    keys = " ".join(f"sk-FILLERKEY{i:03d}abcdefghijklmnopqrstuvwxyz0123" for i in range(fillers)) + " "
    window = max_chars + REDACTED_BEYOND_CAP
    pad = max(window - len(keys) - inside - 1, 0)
    message = keys + "x" * pad + " " + secret + " tail " + "y" * 10_000
    shown = tracing._text(message)
    assert shown.endswith(TRUNCATION_MARK)
    text = shown.removesuffix(TRUNCATION_MARK)
    assert len(text) <= max_chars
    assert redact(message).startswith(text), (text[-80:], secret)
    for length in range(4, len(secret) + 1):
        assert secret[:length] not in text or secret[:length] in redact(message)[: len(text)], secret[:length]


@settings(max_examples=300, deadline=None)
@example("a@ex.com and b@ex.c, -x.y@ex.com.com@ex.com")
@example("a@a.ab1@ex.com")  # the second address starts where the first ends, inside a run
@given(
    st.lists(st.sampled_from(["a", "b1", "-", ".", "_%+", "@", "@ex", ".com", ".c", " ", "\n"]), max_size=30).map(
        "".join
    )
)
def test_default_redactor_masks_the_emails_its_unanchored_pattern_would(text: str) -> None:
    """Addresses are searched for where a run of local-part characters starts, or where the previous one ended
    (which keeps the search linear in the text's length): masked exactly as the plain pattern, searched from every
    character, masks them."""
    plain = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
    assert redact(text) == redact(plain.sub(EMAIL_MASK, text))


def test_explicit_provider_and_an_outer_server_span(receiver: OTLPReceiver) -> None:
    """When the app is already instrumented outside us, the LLM span joins that server span: no second one."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "llm-outer"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    with isolated_env({}):
        inner = create_app(metrics_port=0, tracer_provider=provider)
    outer = OpenTelemetryMiddleware(inner, tracer_provider=provider, exclude_spans=["receive", "send"])
    with serve(outer) as base:
        client(base).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "outer-1"}
        )
    inner.telemetry.shutdown()
    span = wait_span(receiver, **{"llm.request_id": "outer-1"})
    server = parent_of(receiver, span)
    assert server.kind == SERVER
    assert len([s for s in receiver.spans if s.trace_id == span.trace_id and s.kind == SERVER]) == 1
    provider.shutdown()


def test_tracing_http_span_argument_beats_the_environment(receiver: OTLPReceiver) -> None:
    """The constructor argument asks for the two-span shape even when the environment says one span."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "llm-two-spans"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    with isolated_env({"LLM_TELEMETRY_TRACING_HTTP_SPAN": "false"}):
        app = create_app(metrics_port=0, tracer_provider=provider, tracing_http_span=True)
    with serve(app) as base:
        client(base).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "arg-1"}
        )
    app.telemetry.shutdown()
    span = wait_span(receiver, **{"llm.request_id": "arg-1"})
    assert span.kind == INTERNAL
    server = parent_of(receiver, span)
    assert server.kind == SERVER and server.scope.startswith("opentelemetry.instrumentation.asgi")
    provider.shutdown()


@pytest.mark.parametrize("extra", [{}, {"OTEL_TRACES_EXPORTER": "none"}], ids=["", "OTEL_TRACES_EXPORTER=none"])
def test_global_sdk_tracer_provider_is_used_and_neither_global_provider_replaced(extra: dict[str, str]) -> None:
    """An app that installed its own SDK TracerProvider and MeterProvider keeps them; ours go through them. So does
    one whose environment says ``OTEL_TRACES_EXPORTER=none`` (docs/tracing.md): that names the exporters the SDK's own
    setup builds, not whether an application's provider is used."""
    script = textwrap.dedent(
        """
        import asyncio, httpx
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from llm_telemetry.demo.app import create_app

        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        app = create_app(metrics_port=0)

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                r = await http.post("/v1/chat/completions", json={"model": "m", "messages": []})
                assert r.status_code == 200

        asyncio.run(main())
        assert trace.get_tracer_provider() is provider
        assert app.telemetry.tracing.provider is provider
        # The global MeterProvider is left alone, but metrics get a provider of the middleware's own, so that its
        # Prometheus endpoint is never empty (docs/metrics.md; tests/middleware/test_telemetry.py serves it).
        assert metrics.get_meter_provider() is meter_provider and app.telemetry.meter_provider is not meter_provider
        data = reader.get_metrics_data()
        recorded = {m.name for rm in (data.resource_metrics if data else [])
                    for sm in rm.scope_metrics if sm.scope.name == "llm_telemetry" for m in sm.metrics}
        assert recorded == set(), recorded
        print(sorted(s.name for s in exporter.get_finished_spans()))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | extra
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    names = result.stdout.strip().splitlines()[-1]
    assert names == "['chat m']"  # one span per LLM request: the GenAI span is the server span


def test_a_tracer_provider_the_app_installs_in_its_lifespan_startup_is_used() -> None:
    """FastAPI's ``lifespan`` is where apps commonly set up OpenTelemetry. The middleware sets itself up as the
    lifespan begins, before the app's startup runs, found no provider, and made no LLM span at all; it now takes up
    the provider as the app reports its startup complete. Served by real uvicorn, in a process of its own (a global
    provider is set once per process)."""
    script = textwrap.dedent(
        """
        import contextlib, sys, threading, time, httpx, uvicorn
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from starlette.applications import Starlette
        from starlette.routing import Mount
        from llm_telemetry import LLMTelemetryMiddleware
        from llm_telemetry.demo.app import bare_app

        exporter = InMemorySpanExporter()

        @contextlib.asynccontextmanager
        async def lifespan(app):
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            yield

        app = LLMTelemetryMiddleware(Starlette(lifespan=lifespan, routes=[Mount("/", app=bare_app())]), metrics_port=0)
        port = int(sys.argv[1])
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                              json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, response.text
        server.should_exit = True
        thread.join()
        print(sorted(span.name for span in exporter.get_finished_spans()))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    command = [sys.executable, "-c", script, str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['chat gpt-4o']"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to bob.smith+x@mail.example.co.uk now", "write to [email] now"),
        # Capitals anywhere, a hyphen in the domain, a JSON escape in capitals before a key.
        ("to ALICE.Smith@Mail-Host.Example.COM, Z9@a-b.IO", "to [email], [email]"),
        (r'{"note": "\uFF1Ask-proj-AbCdEfGhIjKlMnOpQrSt"}', r'{"note": "\uFF1A[key]"}'),
        ("key sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv and sk-1234567890abcdefghij", "key [key] and [key]"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "Authorization: Bearer [key]"),
        ("card 4111 1111 1111 1111 or 5500-0000-0000-0004", "card [card] or [card]"),
        ("order 12345 on 2024-05-01, call +1 555 0100", "order 12345 on 2024-05-01, call +1 555 0100"),
        # A file in a tool result, as JSON text: the key follows an escaped tab or newline.
        (
            '{"content": "# env\\nOPENAI_API_KEY\\tsk-proj-AbCdEfGhIjKlMnOpQrSt"}',
            '{"content": "# env\\nOPENAI_API_KEY\\t[key]"}',
        ),
        (
            "authorization: bearer abcdefghijklmnopqrstuv, BEARER abcdefghijklmnopqrstuv",
            "authorization: bearer [key], BEARER [key]",
        ),
        ("a task-abcdefghijklmnopqrstuv is no key", "a task-abcdefghijklmnopqrstuv is no key"),
        # After a word of another script, and in JSON that escapes non-ASCII characters (Python's json.dumps).
        ("API密钥sk-proj-AbCdEfGhIjKlMnOpQrSt", "API密钥[key]"),
        (json.dumps({"note": "密钥\uff1ask-proj-AbCdEfGhIjKlMnOpQrSt"}), '{"note": "\\u5bc6\\u94a5\\uff1a[key]"}'),
        (json.dumps("\u00a0AKIAABCDEFGHIJKLMNOP ghp_abcdefghijklmnopqrstuvwx"), '"\\u00a0[key] [key]"'),
        # Card numbers at 13 and 19 digits are masked, 12 and 20 kept, and so is a run a hyphen joins to digits.
        ("4111111111111 4111111111111111111", "[card] [card]"),
        (
            "411111111111 41111111111111111111 2024-4111111111111111",
            "411111111111 41111111111111111111 2024-4111111111111111",
        ),
        # A key after each JSON escape of a control character; a bearer token at 16 characters of every kind.
        ('"a\\nsk-proj-AbCdEfGhIjKlMnOpQrSt\\rsk-proj-AbCdEfGhIjKlMnOpQrSt"', '"a\\n[key]\\r[key]"'),
        ('"a\\bsk-proj-AbCdEfGhIjKlMnOpQrSt\\fsk-proj-AbCdEfGhIjKlMnOpQrSt"', '"a\\b[key]\\f[key]"'),
        ("Bearer a._~+/-bcdefghij, Bearer abcdefghijklmno", "Bearer [key], Bearer abcdefghijklmno"),
    ],
)
def test_default_redactor_masks_emails_keys_and_cards(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.skipif(not STARLETTE_ROUTES, reason="Starlette sets scope['route'] from 1.7 on")
def test_the_route_of_an_llm_app_under_a_mount_carries_the_mounts_prefix(receiver: OTLPReceiver) -> None:
    """``http.route`` is the route of the whole path: an LLM app mounted at /openai (Starlette's Mount, FastAPI's
    app.mount), whose router sets the route relative to the mount, is traced as /openai/v1/chat/completions."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from llm_telemetry.demo.app import bare_app

    provider = TracerProvider(resource=Resource.create({"service.name": "llm-mounted"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    mounted = Starlette(routes=[Mount("/openai", app=bare_app()), Mount("/", app=bare_app())])
    with isolated_env({}):
        app = LLMTelemetryMiddleware(mounted, metrics_port=0, tracer_provider=provider)
    with serve(app) as base:
        for prefix, request_id in (("/openai", "mounted-1"), ("", "mounted-2")):
            openai.OpenAI(base_url=base + prefix + "/v1", api_key="sk-test", max_retries=0).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": request_id}
            )
    span = wait_span(receiver, **{"llm.request_id": "mounted-1"})
    assert span.attributes["url.path"] == "/openai/v1/chat/completions"
    assert span.attributes["http.route"] == "/openai/v1/chat/completions"
    assert wait_span(receiver, **{"llm.request_id": "mounted-2"}).attributes["http.route"] == "/v1/chat/completions"
    provider.shutdown()


def test_a_response_of_a_thousand_tool_calls_keeps_its_span_small(receiver: OTLPReceiver) -> None:
    """A model (or a hostile upstream) calling 1,100 tools with 3,000-character names put ~1 MiB of names on one span,
    enough to make a collector's 4 MiB gRPC limit refuse whole batches: names are listed once each, bounded."""
    from starlette.responses import JSONResponse

    names = [f"tool{i % 100}" + "x" * 3000 for i in range(1100)]

    async def chat(request: Any) -> JSONResponse:
        calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}
            for i, name in enumerate(names)
        ]
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        return JSONResponse(
            {
                "id": "chatcmpl-many",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5000, "total_tokens": 5005},
            }
        )

    with traced_chat_app(receiver, chat, "llm-many-tools") as base:
        response = client(base).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "go"}], extra_headers={"x-request-id": "tools-1100"}
        )
    assert len(response.choices[0].message.tool_calls or []) == 1100  # the client got every call, unchanged
    span = wait_span(receiver, **{"llm.request_id": "tools-1100"})
    shown = span.attributes["llm.tool_calls.names"]
    assert shown == [(f"tool{i}" + "x" * 3000)[:256] for i in range(64)]
    assert span.attributes["llm.tool_calls.count"] == 1024  # every call counted, up to the middleware's bound
    assert sum(len(n) for n in shown) <= 64 * 256


def completion_of(answers: list[tuple[str, str]]) -> dict[str, Any]:
    """A chat completion of one choice per (text, finish reason) of ``answers``."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        for i, (text, finish) in enumerate(answers)
    ]
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": choices}


def ask_and_read(base: str, request_id: str, stream: bool, **fields: Any) -> None:
    """One chat request of model ``m`` saying ``hi`` (``fields`` added), its stream read to its end."""
    reply = client(base).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=stream,
        extra_headers={"x-request-id": request_id}, **fields,
    )  # fmt: skip
    if stream:
        list(reply)  # type: ignore[arg-type]


def test_each_choice_is_its_own_output_message_with_its_finish_reason(receiver: OTLPReceiver) -> None:
    """``n`` choices are ``n`` output messages, as the conventions define gen_ai.output.messages (one per choice),
    each with its own text and finish reason: streamed (deltas of the choices interleaved) and not."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    answers = [("Hello world!", "stop"), ("HELLO WORLD!", "length")]

    async def chat(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(completion_of(answers))

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        async def stream() -> Any:
            for i in range(2):
                yield chunk(i, {"role": "assistant", "content": ""})
            for word in range(2):  # the choices' deltas interleaved, as OpenAI sends them
                for i, (text, _) in enumerate(answers):
                    yield chunk(i, {"content": text.split(" ")[word] + ("" if word else " ")})
            for i, (_, finish) in enumerate(answers):
                yield chunk(i, {}, finish)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    with traced_chat_app(receiver, chat, "llm-choices", capture=True) as base:
        for stream in (False, True):
            ask_and_read(base, f"choices-{stream}", stream, n=2)
    for stream in (False, True):
        span = wait_span(receiver, **{"llm.request_id": f"choices-{stream}"})
        messages = json.loads(span.attributes["gen_ai.output.messages"])
        shown = [(m["parts"][0]["content"], m["finish_reason"]) for m in messages]
        assert shown == answers, (stream, messages)


def _answered_with_choices(receiver: OTLPReceiver, choices: list[dict[str, Any]], request_id: str) -> tuple[Any, Any]:
    """A JSON chat answer of ``choices`` to the openai SDK asking for as many (``n``), with content capture on: the
    attributes of the call's span and the answer the client read."""
    from starlette.responses import JSONResponse

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": choices})

    with traced_chat_app(receiver, chat, f"llm-{request_id}", capture=True) as base:
        answer = client(base).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], n=len(choices),
            extra_headers={"x-request-id": request_id},
        )  # fmt: skip
    return wait_span(receiver, **{"llm.request_id": request_id}).attributes, answer


def test_choices_share_the_capture_cap_and_each_keeps_its_tool_calls(receiver: OTLPReceiver) -> None:
    """Sixteen choices of 10,000 characters show at most the cap between them (it bounds a span's output, as
    documented), and a tool call is in the message of the choice that made it."""
    choices: list[dict[str, Any]] = [
        {"index": i, "message": {"role": "assistant", "content": chr(97 + i) * 10_000}, "finish_reason": "stop"}
        for i in range(15)
    ]
    tool = {"id": "t", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    choices.append({"index": 15, "message": {"role": "assistant", "content": None, "tool_calls": [tool]},
                    "finish_reason": "tool_calls"})  # fmt: skip

    attributes, _ = _answered_with_choices(receiver, choices, "cap-16")
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert len(messages) == 16
    shown = sum(len(p.get("content", "")) for m in messages for p in m["parts"] if p["type"] == "text")
    assert 4096 <= shown <= 4096 + len(TRUNCATION_MARK)
    assert messages[15]["parts"] == [{"type": "tool_call", "id": "t", "name": "get_weather"}]
    assert messages[15]["finish_reason"] == "tool_call"
    assert all(p["type"] == "text" for p in messages[0]["parts"])


def test_a_tool_call_of_a_choice_past_those_shown_is_in_the_first_message(receiver: OTLPReceiver) -> None:
    """Seventeen choices (``n=17``), one more than a span shows: the last calls a tool. Its message is not shown, and
    its call is in the first message, not the last shown (a mutation audit could put it in the last with every test
    passing)."""
    choices: list[dict[str, Any]] = [
        {"index": i, "message": {"role": "assistant", "content": chr(97 + i)}, "finish_reason": "stop"}
        for i in range(16)
    ]
    tool = {"id": "t", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    choices.append({"index": 16, "message": {"role": "assistant", "content": None, "tool_calls": [tool]},
                    "finish_reason": "tool_calls"})  # fmt: skip

    attributes, _ = _answered_with_choices(receiver, choices, "past-16")
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert len(messages) == 16
    assert messages[0]["parts"] == [
        {"type": "text", "content": "a"},
        {"type": "tool_call", "id": "t", "name": "get_weather"},
    ]
    assert all(m["parts"] == [{"type": "text", "content": chr(97 + i)}] for i, m in enumerate(messages[1:], 1))


def _chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _streamed_to_seventeen(receiver: OTLPReceiver, events: list[bytes], request_id: str) -> tuple[Any, list[Any]]:
    """``events`` streamed to the openai SDK asking for seventeen choices (``n=17``), with content capture on: the
    attributes of the call's span and the chunks the client read."""
    from starlette.responses import StreamingResponse

    async def chat(request: Any) -> StreamingResponse:
        return StreamingResponse(iter(events), media_type="text/event-stream")

    with traced_chat_app(receiver, chat, f"llm-{request_id}", capture=True) as base:
        stream = client(base).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], n=17, stream=True,
            extra_headers={"x-request-id": request_id},
        )  # fmt: skip
        chunks = list(stream)
    return wait_span(receiver, **{"llm.request_id": request_id}).attributes, chunks


def test_the_sixteen_choices_a_span_shows_are_the_first_sixteen_that_came(receiver: OTLPReceiver) -> None:
    """Seventeen streamed choices (``n=17``), one more than a span shows, the first choice's text and finish last
    of all: the span shows the sixteen that came first, each with its own text and its last finish (the second
    choice reports a second finish once sixteen are held, and it replaces its first). The first choice is not shown,
    and no message is made of a choice whose text was not kept; its finish is still among the span's finish reasons.
    (A mutation audit could drop the cap of the choices whose text is kept, keep the finish of a seventeenth choice
    or keep a held choice's first finish with every test passing.)"""
    events = [_chunk(i, {"role": "assistant", "content": ""}) for i in range(17)]
    events += [_chunk(i, {"content": chr(97 + i)}) for i in range(1, 17)]
    events.append(_chunk(0, {"content": "a"}))
    events += [_chunk(i, {}, "stop") for i in range(1, 17)]
    events.append(_chunk(1, {}, "length"))  # (a second finish of a choice held, once sixteen are)
    events.append(_chunk(0, {}, "content_filter"))
    events.append(b"data: [DONE]\n\n")

    attributes, chunks = _streamed_to_seventeen(receiver, events, "stream-past-16")
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {i: chr(97 + i) for i in range(17)}  # (the client got every choice whole)
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert messages == [
        {"role": "assistant", "parts": [{"type": "text", "content": chr(97 + i)}],
         "finish_reason": "length" if i == 1 else "stop"}
        for i in range(1, 17)
    ]  # fmt: skip
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["content_filter", "length"] + ["stop"] * 15


def test_a_choice_whose_text_is_not_kept_is_not_shown_for_its_finish(receiver: OTLPReceiver) -> None:
    """Seventeen streamed choices (``n=17``): the first choice's text comes after sixteen others', and its finish
    before theirs. Its finish is not kept either, and the span shows the sixteen whose text came first, not an empty
    message for the first choice in place of the seventeenth's text (it did before: text and finishes were capped
    apart, and a choice's finish made it shown without the text it had)."""
    events = [_chunk(i, {"role": "assistant", "content": ""}) for i in range(17)]
    events += [_chunk(i, {"content": chr(97 + i)}) for i in range(1, 17)]
    events += [_chunk(0, {"content": "a"}), _chunk(0, {}, "length")]
    events += [_chunk(i, {}, "stop") for i in range(1, 17)]
    events.append(b"data: [DONE]\n\n")

    attributes, _ = _streamed_to_seventeen(receiver, events, "stream-unkept-0")
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert messages == [
        {"role": "assistant", "parts": [{"type": "text", "content": chr(97 + i)}], "finish_reason": "stop"}
        for i in range(1, 17)
    ]
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["length"] + ["stop"] * 16


def test_a_choice_that_finished_without_text_is_one_of_the_sixteen_shown(receiver: OTLPReceiver) -> None:
    """Seventeen streamed choices (``n=17``): the second stops (``content_filter``) before any text, fifteen others
    answer, and then the first: the second is one of the sixteen choices shown, by its finish alone, and the first,
    the seventeenth read, is not. (Before, the choices with text kept and those with a finish kept were counted
    apart, and the first, the sixteenth with text, was shown in place of the seventeenth; counting only the former
    still did that with every other test passing.)"""
    events = [_chunk(i, {"role": "assistant", "content": ""}) for i in range(17)]
    events.append(_chunk(1, {}, "content_filter"))
    events += [_chunk(i, {"content": chr(97 + i)}) for i in range(2, 17)]
    events.append(_chunk(0, {"content": "a"}))
    events += [_chunk(i, {}, "stop") for i in [*range(2, 17), 0]]
    events.append(b"data: [DONE]\n\n")

    attributes, _ = _streamed_to_seventeen(receiver, events, "stream-no-text-1")
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert messages == [{"role": "assistant", "parts": [], "finish_reason": "content_filter"}] + [
        {"role": "assistant", "parts": [{"type": "text", "content": chr(97 + i)}], "finish_reason": "stop"}
        for i in range(2, 17)
    ]


def test_a_choice_shown_for_its_tool_call_alone_has_its_own_finish(receiver: OTLPReceiver) -> None:
    """Seventeen streamed choices (``n=17``): sixteen answer in text, and the second, whose turn comes after them,
    only calls a tool. Its message is one of the sixteen shown (for its call), and its finish is its own,
    ``tool_call``, as in ``gen_ai.response.finish_reasons``; before, it showed the first choice's ``stop``."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    answered = [0, *range(2, 17)]
    events = [_chunk(i, {"role": "assistant", "content": ""}) for i in range(17)]
    events += [_chunk(i, {"content": chr(97 + i)}) for i in answered]
    events.append(_chunk(1, {"content": None, "tool_calls": [call]}))
    events += [_chunk(i, {}, "stop") for i in answered]
    events += [_chunk(1, {}, "tool_calls"), b"data: [DONE]\n\n"]

    attributes, chunks = _streamed_to_seventeen(receiver, events, "stream-tool-past")
    called = [c.index for chunk in chunks for c in chunk.choices if c.delta.tool_calls]
    assert called == [1]
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert messages == [
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "get_weather"}]
         if i == 1 else [{"type": "text", "content": chr(97 + i)}], "finish_reason": "tool_call" if i == 1 else "stop"}
        for i in range(16)
    ]  # fmt: skip
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop", "tool_calls"] + ["stop"] * 15


def test_a_json_answer_shows_the_first_sixteen_choices_it_lists(receiver: OTLPReceiver) -> None:
    """A JSON answer of seventeen choices (``n=17``) that lists the first choice last: the span shows the sixteen
    listed first, in their order, and not the first choice's text or finish (a mutation audit could keep either with
    every test passing, and show the first choice in place of the seventeenth)."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": chr(97 + i)}, "finish_reason": "stop"}
        for i in [*range(1, 17), 0]
    ]
    choices[-1]["finish_reason"] = "length"

    attributes, answer = _answered_with_choices(receiver, choices, "json-17")
    assert len(answer.choices) == 17
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert messages == [
        {"role": "assistant", "parts": [{"type": "text", "content": chr(97 + i)}], "finish_reason": "stop"}
        for i in range(1, 17)
    ]
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["length"] + ["stop"] * 16


def test_a_streamed_tool_call_is_in_the_message_of_the_choice_that_made_it(receiver: OTLPReceiver) -> None:
    """Two streamed choices (``n=2``): the first answers in text, the second calls a tool. Each output message has
    its own parts and finish reason, the call in the second's."""
    from starlette.responses import StreamingResponse

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    events = [
        chunk(0, {"role": "assistant", "content": ""}),
        chunk(1, {"role": "assistant", "content": None}),
        chunk(0, {"content": "Sunny"}),
        chunk(1, {"tool_calls": [call]}),
        chunk(1, {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk(0, {}, "stop"),
        chunk(1, {}, "tool_calls"),
        b"data: [DONE]\n\n",
    ]

    async def chat(request: Any) -> StreamingResponse:
        return StreamingResponse(iter(events), media_type="text/event-stream")

    with traced_chat_app(receiver, chat, "llm-stream-choices", capture=True) as base:
        stream = client(base).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], n=2, stream=True,
            extra_headers={"x-request-id": "stream-choices"},
        )  # fmt: skip
        for _ in stream:
            pass
    attributes = wait_span(receiver, **{"llm.request_id": "stream-choices"}).attributes
    messages = json.loads(attributes["gen_ai.output.messages"])
    assert messages == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Sunny"}], "finish_reason": "stop"},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "get_weather"}],
         "finish_reason": "tool_call"},
    ]  # fmt: skip


def test_openai_service_tier_and_system_fingerprint_are_on_the_span(receiver: OTLPReceiver) -> None:
    """The conventions' OpenAI attributes: the service tier asked for and the one that served the request
    (conditionally required), and the system fingerprint, from a JSON answer and from a stream's chunks. A request
    asking for ``auto`` (the default) has no request tier on its span, as the conventions ask."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    head = {"id": "c", "created": 0, "model": "gpt-4o", "service_tier": "default", "system_fingerprint": "fp_9a2b"}

    async def chat(request: Request) -> Response:
        if not (await request.json()).get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice]})

        async def stream() -> Any:
            for delta, finish in (
                ({"role": "assistant", "content": ""}, None),
                ({"content": "hi"}, None),
                ({}, "stop"),
            ):
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                yield b"data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [choice]}).encode()
                yield b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    with traced_chat_app(receiver, chat, "llm-tiers") as base:
        for stream in (False, True):
            for tier in ("flex", "auto"):
                reply = client(base).chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=stream, service_tier=tier,
                    extra_headers={"x-request-id": f"tier-{stream}-{tier}"},
                )  # fmt: skip
                if stream:
                    list(reply)  # type: ignore[arg-type]
    for stream in (False, True):
        asked_auto = wait_span(receiver, **{"llm.request_id": f"tier-{stream}-auto"}).attributes
        assert "openai.request.service_tier" not in asked_auto
        assert asked_auto["openai.response.service_tier"] == "default"
        attributes = wait_span(receiver, **{"llm.request_id": f"tier-{stream}-flex"}).attributes
        assert attributes["openai.request.service_tier"] == "flex"
        assert attributes["openai.response.service_tier"] == "default"
        assert attributes["openai.response.system_fingerprint"] == "fp_9a2b"


@pytest.mark.parametrize("two_spans", [False, True], ids=["one-span", "two-spans"])
def test_an_outer_asgi_instrumentation_without_an_sdk_leaves_the_span_shape_as_it_is(
    receiver: OTLPReceiver, two_spans: bool
) -> None:
    """OpenTelemetry's ASGI middleware around the app with no SDK of its own (tracing set up for the middleware
    alone) makes the caller's span context current when the request has a ``traceparent``, as a non-recording span.
    That is no server span of this service: the trace has the same shape with and without the header, the LLM span
    (or, with two spans, OpenTelemetry's) the server span with the HTTP attributes, continuing the caller's trace.
    It used to become an INTERNAL span hanging from the caller, with no server span in the service at all."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.trace import NoOpTracerProvider
    from starlette.responses import JSONResponse

    async def chat(request: Any) -> JSONResponse:
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]})

    env = {"LLM_TELEMETRY_TRACING_HTTP_SPAN": "true"} if two_spans else {}
    trace_id, caller = "7cf92f3577b34da6a3ce929d0e0e4731", "30f067aa0ba902b9"
    tag = "two" if two_spans else "one"
    outer = lambda app: OpenTelemetryMiddleware(app, tracer_provider=NoOpTracerProvider())  # noqa: E731
    with traced_chat_app(receiver, chat, "llm-outer-noop", env=env, wrap=outer) as base:
        for headers in ({}, {"traceparent": f"00-{trace_id}-{caller}-01"}):
            client(base).chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={**headers, "x-request-id": f"outer-noop-{tag}-{len(headers)}"},
            )
    for continued in (False, True):
        span = wait_span(receiver, **{"llm.request_id": f"outer-noop-{tag}-{int(continued)}"})
        server = parent_of(receiver, span) if two_spans else span
        assert server.kind == SERVER
        assert (server.trace_id, server.parent_span_id) == ((trace_id, caller) if continued else (span.trace_id, ""))
        if two_spans:
            assert server.scope.startswith("opentelemetry.instrumentation.asgi") and span.kind == INTERNAL
        else:
            assert server.attributes["http.request.method"] == "POST"
            assert server.attributes["url.path"] == "/v1/chat/completions"


def _output_messages_of_the_conventions(messages: list[dict[str, Any]]) -> None:
    """What the conventions' output-message schema (v1.41.1) requires of each message and of its parts."""
    for message in messages:
        assert isinstance(message["role"], str) and isinstance(message["finish_reason"], str), message
        for part in message["parts"]:
            required = {
                "text": ("content",),
                "tool_call": ("name",),
                "server_tool_call": ("name", "server_tool_call"),
                "server_tool_call_response": ("server_tool_call_response",),
            }[part["type"]]
            assert all(key in part for key in required), part
            for key in ("server_tool_call", "server_tool_call_response"):
                if key in part:
                    assert isinstance(part[key]["type"], str), part
            assert part.get("id") is None or isinstance(part["id"], str), part


def test_output_tool_calls_have_the_providers_ids_and_the_conventions_finish_reasons(receiver: OTLPReceiver) -> None:
    """An answer's tool call shows the id the provider gave it (OpenAI's ``tool_calls[].id``, the Responses API's
    ``call_id``, Anthropic's ``tool_use`` id), streamed and not, so a trace can tie it to the tool's result in the
    next request; each output message's finish reason is the conventions' word for the provider's (``tool_call``,
    ``stop``), while ``gen_ai.response.finish_reasons`` keeps the provider's own, as the conventions' examples do."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    with demo_server(env) as (_, base):
        openai_client = client(base)
        claude = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
        for stream in (False, True):
            ask = {"messages": [{"role": "user", "content": "weather?"}], "tools": DEMO_TOOLS, "stream": stream}
            reply: Any = openai_client.chat.completions.create(
                model="gpt-4o", **ask, extra_headers={"x-request-id": f"ids-chat-{stream}"}
            )
            list(reply) if stream else None
            tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
            reply = openai_client.responses.create(
                model="gpt-4o", input="weather?", tools=[tool], stream=stream,  # type: ignore[list-item]
                extra_headers={"x-request-id": f"ids-responses-{stream}"},
            )  # fmt: skip
            list(reply) if stream else None
            claude_tool = {"name": "get_weather", "input_schema": {"type": "object"}}
            for tools, name in (([claude_tool], "tools"), ([], "text")):
                reply = claude.messages.create(
                    model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "weather?"}],
                    tools=tools, stream=stream, extra_headers={"x-request-id": f"ids-claude-{name}-{stream}"},
                )  # type: ignore[call-overload]  # fmt: skip
                list(reply) if stream else None

    for stream in (False, True):
        shown = {}
        for api in ("chat", "responses", "claude-tools", "claude-text"):
            span = wait_span(receiver, **{"llm.request_id": f"ids-{api}-{stream}"})
            messages = json.loads(span.attributes["gen_ai.output.messages"])
            _output_messages_of_the_conventions(messages)
            shown[api] = (messages, list(span.attributes["gen_ai.response.finish_reasons"]))
        call = {"type": "tool_call", "id": "call_demo1", "name": "get_weather"}
        assert shown["chat"] == (
            [{"role": "assistant", "parts": [call], "finish_reason": "tool_call"}],
            ["tool_calls"],
        ), stream
        assert shown["responses"][0] == [{"role": "assistant", "parts": [call], "finish_reason": "stop"}], stream
        assert shown["claude-tools"] == (
            [{"role": "assistant", "parts": [{**call, "id": "toolu_demo1"}], "finish_reason": "tool_call"}],
            ["tool_use"],
        ), stream
        [text] = shown["claude-text"][0]
        assert (text["finish_reason"], shown["claude-text"][1]) == ("stop", ["end_turn"]), stream


def test_output_messages_finish_reasons_are_the_conventions_words(receiver: OTLPReceiver) -> None:
    """Each output message's ``finish_reason`` is the conventions' word (``stop``, ``length``, ``tool_call``) for the
    provider's (Anthropic's ``end_turn``, ``max_tokens``, ``tool_use``; OpenAI's ``tool_calls``), streamed and not, as
    the conventions' tool-call example shows it; ``gen_ai.response.finish_reasons`` keeps the provider's own words,
    as that example does."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    claude_tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    with demo_server(env) as (_, base):
        claude = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
        for stream in (False, True):
            reply: Any = client(base).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "weather?"}], tools=DEMO_TOOLS, stream=stream,
                extra_headers={"x-request-id": f"words-chat-{stream}"},
            )  # fmt: skip
            list(reply) if stream else None
            for name, tools, max_tokens in (("tool", [claude_tool], 64), ("text", [], 64), ("cut", [], 3)):
                reply = claude.messages.create(
                    model="claude-test", max_tokens=max_tokens, messages=[{"role": "user", "content": "weather?"}],
                    tools=tools, stream=stream, extra_headers={"x-request-id": f"words-{name}-{stream}"},
                )  # type: ignore[call-overload]  # fmt: skip
                list(reply) if stream else None
    for stream in (False, True):
        for name, word, provider in (
            ("chat", "tool_call", "tool_calls"), ("tool", "tool_call", "tool_use"), ("text", "stop", "end_turn"),
            ("cut", "length", "max_tokens"),
        ):  # fmt: skip
            attributes = wait_span(receiver, **{"llm.request_id": f"words-{name}-{stream}"}).attributes
            [message] = json.loads(attributes["gen_ai.output.messages"])
            assert message["finish_reason"] == word, (name, stream, message)
            assert attributes["gen_ai.response.finish_reasons"] == [provider], (name, stream)


def test_finish_reasons_are_one_per_choice_in_choice_order(receiver: OTLPReceiver) -> None:
    """``gen_ai.response.finish_reasons`` has one reason per choice received, in the choices' order (the
    conventions' ``["stop", "stop"]`` for two choices that both stopped), with content capture on and off, streamed
    and not; a finish a gateway repeats for one choice is that choice's one reason."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    answers = [("Hello", "stop"), ("HELLO", "length"), ("Hi", "stop")]

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    async def chat(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(completion_of(answers))
        events = [chunk(i, {"role": "assistant", "content": ""}) for i in range(3)]
        # The last choice's text comes first (the stream's first token), and it finishes first; the first one's
        # finish is sent twice (as gateways repeat it).
        events += [chunk(i, {"content": answers[i][0]}) for i in (2, 1, 0)]
        events += [chunk(i, {}, answers[i][1]) for i in (2, 1, 0, 0)]
        return StreamingResponse(iter([*events, b"data: [DONE]\n\n"]), media_type="text/event-stream")

    for capture in (False, True):
        with traced_chat_app(receiver, chat, "llm-finishes", capture=capture) as base:
            for stream in (False, True):
                ask_and_read(base, f"finishes-{capture}-{stream}", stream, n=3)
        for stream in (False, True):
            span = wait_span(receiver, **{"llm.request_id": f"finishes-{capture}-{stream}"})
            assert span.attributes["gen_ai.response.finish_reasons"] == ["stop", "length", "stop"], (capture, stream)


#: Anthropic's answer that searched the web (a hosted tool) before answering.
_SEARCHED = [
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "Paris weather"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
        {"type": "web_search_result", "url": "https://example.com", "title": "Paris", "encrypted_content": "x"}]},
    {"type": "text", "text": "Sunny."},
]  # fmt: skip


def test_finish_reasons_of_many_choices_keep_the_span_small(receiver: OTLPReceiver) -> None:
    """An upstream answering 200 choices, each with a 1,000-character finish reason: the span lists the first 128
    choices' reasons (OpenAI's largest ``n``), each cut to 64 characters."""
    from starlette.responses import JSONResponse

    choices = [
        {"index": i, "message": {"role": "assistant", "content": "a"}, "finish_reason": str(i) + "x" * 1000}
        for i in range(200)
    ]

    async def chat(request: Any) -> JSONResponse:
        await request.json()
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": choices})

    with traced_chat_app(receiver, chat, "llm-many-finishes") as base:
        client(base).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            n=128,
            extra_headers={"x-request-id": "finishes-200"},
        )
    reasons = wait_span(receiver, **{"llm.request_id": "finishes-200"}).attributes["gen_ai.response.finish_reasons"]
    assert reasons == [(str(i) + "x" * 1000)[:64] for i in range(128)]


def test_hosted_tools_are_server_tool_calls(receiver: OTLPReceiver) -> None:
    """A tool the provider runs itself (Anthropic's web search, the Responses API's web search) is a
    ``server_tool_call`` part, as the conventions tell it from the client's own tools: in the answer (streamed and
    not) and in the conversation sent back, where its result is a ``server_tool_call_response`` part."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    usage = {"input_tokens": 5, "output_tokens": 3}

    def event(kind: str, **members: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **members})}\n\n".encode()

    async def messages(request: Request) -> Response:
        body = await request.json()
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test"}
        if not body.get("stream"):
            return JSONResponse({**message, "content": _SEARCHED, "stop_reason": "end_turn", "usage": usage})
        events = [event("message_start", message={**message, "content": [], "stop_reason": None, "usage": usage})]
        for i, block in enumerate(_SEARCHED):
            if block["type"] == "text":
                events.append(event("content_block_start", index=i, content_block={"type": "text", "text": ""}))
                events.append(event("content_block_delta", index=i, delta={"type": "text_delta", "text": "Sunny."}))
            else:
                start = {**block, "input": {}} if block["type"] == "server_tool_use" else block
                events.append(event("content_block_start", index=i, content_block=start))
            events.append(event("content_block_stop", index=i))
        events.append(event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3}))
        events.append(event("message_stop"))
        return StreamingResponse(iter(events), media_type="text/event-stream")

    searched = {"type": "server_tool_call", "id": "srvtoolu_1", "name": "web_search",
                "server_tool_call": {"type": "web_search"}}  # fmt: skip
    result = {"type": "server_tool_call_response", "id": "srvtoolu_1",
              "server_tool_call_response": {"type": "web_search"}}  # fmt: skip
    with traced_chat_app(receiver, messages, "llm-hosted", capture=True, path="/v1/messages") as base:
        claude = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
        for stream in (False, True):
            reply: Any = claude.messages.create(
                model="claude-test", max_tokens=64, stream=stream,  # type: ignore[call-overload]
                messages=[{"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "content": _SEARCHED},
                          {"role": "user", "content": "and tomorrow?"}],
                extra_headers={"x-request-id": f"hosted-claude-{stream}"},
            )  # fmt: skip
            list(reply) if stream else None
    for stream in (False, True):
        attributes = wait_span(receiver, **{"llm.request_id": f"hosted-claude-{stream}"}).attributes
        [answer] = json.loads(attributes["gen_ai.output.messages"])
        _output_messages_of_the_conventions([answer])
        # (The answer's text first, as for any answer; the search's result after its call.)
        assert answer["parts"] == [{"type": "text", "content": "Sunny."}, searched, result], answer
        sent = json.loads(attributes["gen_ai.input.messages"])[1]
        assert sent["parts"] == [searched, result, {"type": "text", "content": "Sunny."}]

    item = {"id": "ws_1", "type": "web_search_call", "status": "completed",
            "action": {"type": "search", "query": "Paris weather"}}  # fmt: skip
    text = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}]}  # fmt: skip

    searched_by_client = {"type": "tool_search_call", "id": "ts_1", "call_id": "call_ts", "execution": "client",
                          "arguments": {}, "status": "completed"}  # fmt: skip

    async def responses(request: Request) -> Response:
        body = await request.json()
        usage = {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}
        done = {"id": "resp_1", "object": "response", "created_at": 0, "model": "gpt-4o", "status": "completed",
                "output": [item, text], "usage": usage}  # fmt: skip
        if not body.get("stream"):
            return JSONResponse(done)
        events = [
            event("response.created", response={**done, "status": "in_progress", "output": [], "usage": None}),
            event("response.output_item.added", output_index=0, item={**item, "status": "in_progress"}),
            event("response.output_item.done", output_index=0, item=item),
            event("response.output_item.added", output_index=1, item={**text, "content": []}),
            event("response.output_text.delta", output_index=1, content_index=0, item_id="msg_1", delta="Sunny."),
            event("response.output_item.done", output_index=1, item=text),
            event("response.completed", response=done),
        ]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    web = {"type": "server_tool_call", "id": "ws_1", "name": "web_search", "server_tool_call": {"type": "web_search"}}
    with traced_chat_app(receiver, responses, "llm-hosted-responses", capture=True, path="/v1/responses") as base:
        for stream in (False, True):
            reply = client(base).responses.create(
                model="gpt-4o",
                input=[{"role": "user", "content": "weather?"}, item, text, searched_by_client],  # type: ignore[list-item]
                tools=[{"type": "web_search"}], stream=stream,
                extra_headers={"x-request-id": f"hosted-responses-{stream}"},
            )  # fmt: skip
            list(reply) if stream else None
    for stream in (False, True):
        attributes = wait_span(receiver, **{"llm.request_id": f"hosted-responses-{stream}"}).attributes
        [answer] = json.loads(attributes["gen_ai.output.messages"])
        _output_messages_of_the_conventions([answer])
        assert answer["parts"] == [{"type": "text", "content": "Sunny."}, web], stream
        sent = json.loads(attributes["gen_ai.input.messages"])
        assert sent[1] == {"role": "assistant", "parts": [web]}, stream
        # (The client's own tool search: a tool call, not OpenAI's, as in an answer.)
        assert sent[3] == {"role": "assistant", "parts": [
            {"type": "tool_call", "id": "call_ts", "name": "tool_search", "arguments": "{}"}]}, stream  # fmt: skip


def _chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One chat-completions stream event of choice ``index``."""
    event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def test_choices_that_only_call_tools_are_one_output_message_each(receiver: OTLPReceiver) -> None:
    """``n=2`` choices that both only call a tool (no text in either) are two output messages, each with its own
    call and finish reason, streamed and not, and in a stream that reported no finish (both calls were in one
    message)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    def call(i: int) -> dict[str, Any]:
        return {"id": f"call_{i}", "type": "function", "function": {"name": f"tool_{i}", "arguments": "{}"}}

    async def chat(request: Request) -> Response:
        if not (await request.json()).get("stream"):
            choices = [{"index": i, "message": {"role": "assistant", "content": None, "tool_calls": [call(i)]},
                        "finish_reason": "tool_calls"} for i in range(2)]  # fmt: skip
            answer = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": choices}
            return JSONResponse(answer)
        events = [_chunk(i, {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call(i)}]})
                  for i in range(2)]  # fmt: skip
        if request.headers["x-request-id"] != "tool-choices-unfinished":
            events += [_chunk(i, {}, "tool_calls") for i in range(2)]
        return StreamingResponse(iter([*events, b"data: [DONE]\n\n"]), media_type="text/event-stream")

    with traced_chat_app(receiver, chat, "llm-tool-choices", capture=True) as base:
        for stream, name in ((False, "False"), (True, "True"), (True, "unfinished")):
            reply = client(base).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], n=2, stream=stream,
                extra_headers={"x-request-id": f"tool-choices-{name}"},
            )  # fmt: skip
            if stream:
                list(reply)  # type: ignore[arg-type]
    for name in ("False", "True", "unfinished"):
        attributes = wait_span(receiver, **{"llm.request_id": f"tool-choices-{name}"}).attributes
        messages = json.loads(attributes["gen_ai.output.messages"])
        assert messages == [
            {"role": "assistant", "parts": [{"type": "tool_call", "id": f"call_{i}", "name": f"tool_{i}"}],
             "finish_reason": "" if name == "unfinished" else "tool_call"}
            for i in range(2)
        ], name  # fmt: skip


def test_a_finish_repeated_with_another_word_shows_the_last_one_everywhere(receiver: OTLPReceiver) -> None:
    """A gateway that sends a choice's finish twice with different words (an early one, then its final word): the
    span's ``gen_ai.response.finish_reasons`` and the output message both show the last, as the OpenAI SDK's stream
    helper ends up with it (the attribute kept the first and the message the last)."""
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    tool = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    streams = {
        "text": [_chunk(0, {"role": "assistant", "content": "Hello"}), _chunk(0, {}, "length"), _chunk(0, {}, "stop")],
        "tool": [_chunk(0, {"role": "assistant", "tool_calls": [tool]}), _chunk(0, {}, "tool_calls"),
                 _chunk(0, {}, "stop")],
    }  # fmt: skip

    async def chat(request: Request) -> Response:
        events = streams[request.headers["x-request-id"].split("-")[1]]
        return StreamingResponse(iter([*events, b"data: [DONE]\n\n"]), media_type="text/event-stream")

    sdk = {}
    for capture in (False, True):
        with traced_chat_app(receiver, chat, "llm-finish-twice", capture=capture) as base:
            for kind in streams:
                with client(base).chat.completions.stream(
                    model="m", messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-request-id": f"twice-{kind}-{capture}"},
                ) as stream:  # fmt: skip
                    sdk[kind] = stream.get_final_completion().choices[0].finish_reason
    assert sdk == {"text": "stop", "tool": "stop"}  # what the application's SDK reads

    def event(kind: str, **members: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **members})}\n\n".encode()

    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
               "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
    claude_events = [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hello"}),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 1}),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 1}),
        event("message_stop"),
    ]

    async def messages(request: Request) -> Response:
        await request.body()
        return StreamingResponse(iter(claude_events), media_type="text/event-stream")

    with traced_chat_app(receiver, messages, "llm-finish-twice-claude", capture=True, path="/v1/messages") as base:
        with anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0).messages.stream(
            model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "twice-claude-True"},
        ) as claude_stream:  # fmt: skip
            sdk["claude"] = claude_stream.get_final_message().stop_reason
    assert sdk["claude"] == "end_turn"
    for capture in (False, True):
        for kind in [*streams, "claude"] if capture else streams:
            attributes = wait_span(receiver, **{"llm.request_id": f"twice-{kind}-{capture}"}).attributes
            last = "end_turn" if kind == "claude" else "stop"
            assert attributes["gen_ai.response.finish_reasons"] == [last], (kind, capture)
            if capture:
                [shown] = json.loads(attributes["gen_ai.output.messages"])
                assert shown["finish_reason"] == "stop", kind  # (the conventions' word for end_turn too)


def test_a_streamed_tool_calls_id_given_after_its_name_is_shown(receiver: OTLPReceiver) -> None:
    """A streamed tool call whose first delta names the function without an id, the id coming in a later delta (with
    the name again, or alone): the output message shows that id, as the OpenAI SDK puts the call together (it
    showed ``"id": null``)."""
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    named = {"index": 0, "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    later = {
        "with-name": {"index": 0, "id": "call_late", "function": {"name": "get_weather", "arguments": "{}"}},
        "alone": {"index": 0, "id": "call_late", "function": {"arguments": "{}"}},
    }

    async def chat(request: Request) -> Response:
        events = [
            _chunk(0, {"role": "assistant", "tool_calls": [named]}),
            _chunk(0, {"tool_calls": [later[request.headers["x-request-id"].removeprefix("late-id-")]]}),
            _chunk(0, {}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    with traced_chat_app(receiver, chat, "llm-late-id", capture=True) as base:
        for kind in later:
            with client(base).chat.completions.stream(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-request-id": f"late-id-{kind}"},
            ) as stream:
                [sdk_call] = stream.get_final_completion().choices[0].message.tool_calls or []
                assert sdk_call.id == "call_late"
    for kind in later:
        attributes = wait_span(receiver, **{"llm.request_id": f"late-id-{kind}"}).attributes
        [message] = json.loads(attributes["gen_ai.output.messages"])
        assert message["parts"] == [{"type": "tool_call", "id": "call_late", "name": "get_weather"}], kind


def test_tools_the_client_ran_sent_back_in_a_responses_conversation_are_tool_calls(receiver: OTLPReceiver) -> None:
    """The Responses API's calls of tools the application runs (computer, shell, local shell, apply_patch, its own
    tool search), sent back with their outputs, are ``tool_call`` parts named as in an answer, with the ``call_id``
    their outputs name (they were messages with no parts); a tool search the API ran itself is a ``server_tool_call``
    with the same id as in the answer (its ``call_id``), and its output sent back a ``server_tool_call_response``."""
    from starlette.responses import JSONResponse

    calls = [
        ({"type": "computer_call", "id": "cu_1", "call_id": "call_cu", "action": {"type": "click", "x": 1, "y": 2},
          "pending_safety_checks": [], "status": "completed"}, "computer", '{"type": "click", "x": 1, "y": 2}'),
        ({"type": "shell_call", "id": "sh_1", "call_id": "call_sh", "action": {"commands": ["ls"]},
          "status": "completed"}, "shell", '{"commands": ["ls"]}'),
        ({"type": "local_shell_call", "id": "ls_1", "call_id": "call_ls", "status": "completed",
          "action": {"type": "exec", "command": ["pwd"], "env": {}}}, "local_shell",
         '{"type": "exec", "command": ["pwd"], "env": {}}'),
        ({"type": "apply_patch_call", "id": "ap_1", "call_id": "call_ap", "status": "completed",
          "operation": {"type": "delete_file", "path": "a.txt"}}, "apply_patch",
         '{"type": "delete_file", "path": "a.txt"}'),
        ({"type": "tool_search_call", "id": "ts_1", "call_id": "call_ts", "execution": "client",
          "arguments": {"query": "weather"}, "status": "completed"}, "tool_search", '{"query": "weather"}'),
    ]  # fmt: skip
    outputs = [
        {"type": "computer_call_output", "call_id": "call_cu",
         "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,AA=="}},
        {"type": "shell_call_output", "call_id": "call_sh",
         "output": [{"stdout": "a.txt", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]},
        {"type": "local_shell_call_output", "id": "call_ls", "output": "/home"},
        {"type": "apply_patch_call_output", "call_id": "call_ap", "status": "completed", "output": "done"},
        {"type": "tool_search_output", "call_id": "call_ts", "execution": "client", "tools": []},
    ]  # fmt: skip
    searched = {"type": "tool_search_call", "id": "tsc_1", "call_id": "call_srv", "execution": "server",
                "arguments": {"query": "maps"}, "status": "completed"}  # fmt: skip
    found = {"type": "tool_search_output", "id": "tso_1", "call_id": "call_srv", "execution": "server", "tools": [],
             "status": "completed"}  # fmt: skip

    async def responses(request: Any) -> JSONResponse:
        await request.body()  # (the middleware reads the request as the app does)
        return JSONResponse({"id": "resp_1", "object": "response", "created_at": 0, "model": "gpt-4o",
                             "status": "completed", "output": [searched, found],
                             "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}})  # fmt: skip

    with traced_chat_app(receiver, responses, "llm-client-tools", capture=True, path="/v1/responses") as base:
        client(base).responses.create(
            model="gpt-4o",
            input=[{"role": "user", "content": "go"}, *(c for c, _, _ in calls), *outputs, searched, found],  # type: ignore[list-item]
            extra_headers={"x-request-id": "client-tools"},
        )
    attributes = wait_span(receiver, **{"llm.request_id": "client-tools"}).attributes
    sent = json.loads(attributes["gen_ai.input.messages"])
    assert sent[1:6] == [
        {"role": "assistant", "parts": [{"type": "tool_call", "id": item["call_id"], "name": name, "arguments": asked}]}
        for item, name, asked in calls
    ]
    assert [m["parts"][0]["id"] for m in sent[6:11]] == [c["call_id"] for c, _, _ in calls]  # their outputs
    assert all(m["role"] == "tool" and m["parts"][0]["type"] == "tool_call_response" for m in sent[6:11])
    server_call = {"type": "server_tool_call", "id": "call_srv", "name": "tool_search",
                   "server_tool_call": {"type": "tool_search"}}  # fmt: skip
    assert sent[11:] == [
        {"role": "assistant", "parts": [server_call]},
        {"role": "assistant", "parts": [{"type": "server_tool_call_response", "id": "call_srv",
                                         "server_tool_call_response": {"type": "tool_search"}}]},
    ]  # fmt: skip
    [answer] = json.loads(attributes["gen_ai.output.messages"])
    # The same id in the answer as sent back; the search's output after its call, as sent back.
    assert answer["parts"] == [server_call, sent[12]["parts"][0]]


def test_a_shell_the_api_ran_in_its_container_sent_back_is_a_server_tool_call(receiver: OTLPReceiver) -> None:
    """The shell tool with a container of the API's (``environment.type: container_reference``): its call and its
    output sent back are the API's, a ``server_tool_call`` and its ``server_tool_call_response``, as the metrics count
    no tool result of the application's for it; a shell the application ran stays a ``tool_call``."""
    from starlette.responses import JSONResponse

    hosted = {
        "type": "shell_call",
        "id": "sh_1",
        "call_id": "call_hosted",
        "action": {"commands": ["ls"]},
        "status": "completed",
        "environment": {"type": "container_reference", "container_id": "cntr_1"},
    }
    own = {
        "type": "shell_call",
        "id": "sh_2",
        "call_id": "call_own",
        "action": {"commands": ["pwd"]},
        "status": "completed",
    }
    ran = [{"stdout": "a.txt", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]
    given = [{"role": "user", "content": "go"}, hosted,
             {"type": "shell_call_output", "call_id": "call_hosted", "output": ran},
             own, {"type": "shell_call_output", "call_id": "call_own", "output": ran}]  # fmt: skip
    text = {"type": "output_text", "text": "done", "annotations": []}

    async def responses(request: Any) -> JSONResponse:
        await request.body()
        message = {"type": "message", "id": "m1", "role": "assistant", "status": "completed", "content": [text]}
        return JSONResponse({"id": "resp_1", "object": "response", "created_at": 0, "model": "gpt-4o",
                             "status": "completed", "output": [message],
                             "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}})  # fmt: skip

    with traced_chat_app(receiver, responses, "llm-hosted-shell", capture=True, path="/v1/responses") as base:
        client(base).responses.create(model="gpt-4o", input=given, extra_headers={"x-request-id": "hosted-shell"})  # type: ignore[arg-type]
    sent = json.loads(wait_span(receiver, **{"llm.request_id": "hosted-shell"}).attributes["gen_ai.input.messages"])
    assert [(m["role"], m["parts"][0]["type"], m["parts"][0]["id"]) for m in sent[1:]] == [
        ("assistant", "server_tool_call", "call_hosted"),
        ("assistant", "server_tool_call_response", "call_hosted"),
        ("assistant", "tool_call", "call_own"),
        ("tool", "tool_call_response", "call_own"),
    ]


def test_server_tool_parts_count_in_the_captured_messages_budget(receiver: OTLPReceiver) -> None:
    """A conversation of many messages full of results of tools the provider ran (Anthropic's ``*_tool_result``
    blocks, shown as ``server_tool_call_response`` parts with their kind): the parts count in the budget of the
    messages shown, so ``gen_ai.input.messages`` stays near four times the cap (it was 48 KB with short kinds and
    163 KB with long ones, at the default cap of 4,096)."""
    env = tracing_env(receiver, LLM_TELEMETRY_CAPTURE_CONTENT="true")
    with demo_server(env) as (_, base):
        claude = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
        for kind in (1, 240):
            blocks = [{"type": "k" * kind + f"{j:02d}_tool_result", "tool_use_id": f"srvtoolu_{j}", "content": []}
                      for j in range(16)]  # fmt: skip
            claude.messages.create(
                model="claude-test", max_tokens=16,
                messages=[*[{"role": "assistant", "content": blocks}] * 200, {"role": "user", "content": "hi"}],  # type: ignore[list-item]
                extra_headers={"x-request-id": f"server-budget-{kind}"},
            )  # fmt: skip
    for kind in (1, 240):
        attributes = wait_span(receiver, **{"llm.request_id": f"server-budget-{kind}"}).attributes
        shown = attributes["gen_ai.input.messages"]
        assert len(shown) <= 4 * 4096 * 1.25, (kind, len(shown))
        assert attributes["llm.input.messages.omitted"] > 200 - 32, kind
        assert json.loads(shown)[-2]["parts"][0]["type"] == "server_tool_call_response"


def test_app_exceptions_under_an_applications_own_span_processor(receiver: OTLPReceiver) -> None:
    """With a span processor of the application's beside the exporter's (the span is then the SDK's), an exception
    the app raises, before its answer or in the middle of a stream, is on the LLM span once, as documented: an
    ``exception`` event with its type, message (redacted) and traceback, and the status ERROR described by it; one the
    app records itself and then raises is there twice (its own record, then the one leaving the span), as the SDK's
    ``start_as_current_span`` has it. The processor sees every span once."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    class Tagging(SpanProcessor):
        def __init__(self) -> None:
            self.ended: list[str] = []

        def on_start(self, span: Span, parent_context: Any = None) -> None:
            span.set_attribute("app.tagged", True)

        def on_end(self, span: ReadableSpan) -> None:
            self.ended.append(str(span.attributes.get("llm.request_id")))

    async def chat(request: Request) -> Any:
        how = request.headers["x-request-id"].removeprefix("custom-processor-")
        if how == "raise":
            raise RuntimeError("upstream refused key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789")
        if how == "record-and-raise":
            error = ValueError("recorded by the app")
            trace.get_current_span().record_exception(error)
            raise error

        async def cut() -> Any:
            delta = {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [delta]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            raise RuntimeError("the upstream stream broke")

        return StreamingResponse(cut(), media_type="text/event-stream")

    tagging = Tagging()
    provider = TracerProvider()
    provider.add_span_processor(tagging)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    with isolated_env({}):
        app = LLMTelemetryMiddleware(
            Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
            metrics_port=0,
            tracer_provider=provider,
        )
        app.telemetry  # noqa: B018 - built while the environment is in place
    try:
        with serve(app) as base:
            for how in ("raise", "record-and-raise", "stream-raise"):
                sdk = client(base)  # (a connection of its own: uvicorn closes the one a failure was answered on)
                with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
                    if how == "stream-raise":
                        for _ in sdk.chat.completions.create(
                            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
                            extra_headers={"x-request-id": f"custom-processor-{how}"},
                        ):  # fmt: skip
                            pass
                    else:
                        sdk.chat.completions.create(
                            model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                            extra_headers={"x-request-id": f"custom-processor-{how}"},
                        )  # fmt: skip
            provider.force_flush()
    finally:
        app.telemetry.shutdown()
        provider.shutdown()

    def exceptions(how: str) -> tuple[Any, list[dict[str, Any]]]:
        span = wait_span(receiver, **{"llm.request_id": f"custom-processor-{how}"})
        assert span.attributes["app.tagged"] is True  # the application's processor saw it start
        assert span.attributes["error.type"] == "app_exception" and span.status_code == ERROR
        return span, [attributes for name, attributes, _ in span.events if name == "exception"]

    span, [raised] = exceptions("raise")
    assert span.status_message == "RuntimeError: upstream refused key [key]"
    assert raised["exception.type"] == "RuntimeError" and raised["exception.message"] == "upstream refused key [key]"
    assert raised["exception.escaped"] == "True"
    assert "in chat" in raised["exception.stacktrace"] and "sk-proj-" not in raised["exception.stacktrace"]
    span, [cut] = exceptions("stream-raise")
    assert span.status_message == "RuntimeError: the upstream stream broke"
    assert cut["exception.message"] == "the upstream stream broke" and "in cut" in cut["exception.stacktrace"]
    assert any(name == "gen_ai.first_token" for name, _, _ in span.events)
    span, [own, leaving] = exceptions("record-and-raise")
    assert (own["exception.escaped"], leaving["exception.escaped"]) == ("False", "True")
    assert own["exception.message"] == leaving["exception.message"] == "recorded by the app"
    assert span.status_message == "ValueError: recorded by the app"
    assert sorted(tagging.ended) == sorted(
        f"custom-processor-{how}" for how in ("raise", "record-and-raise", "stream-raise")
    )
