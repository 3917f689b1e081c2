"""What spans show of secrets a client or the app lets slip: the query string on OpenTelemetry's HTTP server span
(the two-span option), an exception's text, and captured tool input. Real uvicorn, the official SDKs, spans kept
in memory."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import httpx
import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import serve

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx"
GOOGLE_KEY = "AIzaSyAbCdEfGhIjKlMnOpQrStUvWxYz012345"


def completion(model: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    if body["model"] == "failing":
        # An app whose upstream call failed, its error quoting the URL it called, with its key.
        raise RuntimeError(f"upstream 400 for url 'https://upstream.example/v1/chat?key={GOOGLE_KEY}'")
    if body["model"] == "recording":
        # An app that handles its upstream error itself, recording it on the current span (the LLM span).
        try:
            raise RuntimeError(f"upstream 400 for url 'https://upstream.example/v1/chat?key={GOOGLE_KEY}'")
        except RuntimeError as error:
            trace.get_current_span().record_exception(error)
        return JSONResponse({"error": {"message": "bad gateway"}}, status_code=502)
    return JSONResponse(completion(body["model"]))


async def messages(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                         "content": [{"type": "text", "text": "noted"}], "stop_reason": "end_turn",
                         "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}})  # fmt: skip


async def responses(request: Request) -> JSONResponse:
    body = await request.json()
    text = {"type": "output_text", "text": "ok", "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    return JSONResponse({"id": "resp_1", "object": "response", "created_at": 1, "model": body["model"],
                         "status": "completed", "output": [message], "parallel_tool_calls": True,
                         "tool_choice": "auto", "tools": [],
                         "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}})  # fmt: skip


@contextmanager
def traced(http_span: bool) -> Iterator[tuple[str, InMemorySpanExporter]]:
    """The app served with tracing to memory: ``http_span``, the two-span option, else the LLM span only."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/openai/deployments/{deployment:path}/chat/completions", chat, methods=["POST"]),
    ]
    app = LLMTelemetryMiddleware(
        Starlette(routes=routes),
        metrics_port=0,
        request_logs=False,
        tracer_provider=provider,
        tracing_http_span=http_span,
        capture_content=True,
    )
    try:
        with serve(app) as base:
            yield base, spans
    finally:
        if app._telemetry is not None:
            app._telemetry.shutdown()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, InMemorySpanExporter]]:
    with traced(http_span=True) as served:
        yield served


def finished(spans: InMemorySpanExporter, model: str, count: int = 2) -> list[ReadableSpan]:
    """The spans of the request for ``model`` (the LLM span and the HTTP server span of its trace: ``count``), once
    ended."""
    deadline = time.monotonic() + 10
    while True:
        done = spans.get_finished_spans()
        llm = [s for s in done if s.attributes and s.attributes.get("gen_ai.request.model") == model]
        if llm:
            trace_id = llm[0].context.trace_id
            trace = [s for s in done if s.context.trace_id == trace_id]
            if len(trace) == count or time.monotonic() > deadline:
                return trace
        assert time.monotonic() < deadline, f"no span of {model}"
        time.sleep(0.02)


def shown(span: ReadableSpan) -> str:
    """Everything a span carries, as text: its attributes, its events' and its status description."""
    events = [{"name": e.name, **dict(e.attributes or {})} for e in span.events]
    return json.dumps([dict(span.attributes or {}), events, span.status.description], ensure_ascii=False)


def test_a_query_strings_values_are_redacted_on_the_http_server_span(
    served: tuple[str, InMemorySpanExporter],
) -> None:
    """OpenTelemetry's ASGI middleware puts the query on its span; a client of a gateway that takes its key there
    (``?key=``, ``?api_key=``) must not leave it in the trace. The parameters' names stay."""
    base, spans = served
    client = openai.OpenAI(
        base_url=base + "/v1", api_key="k", max_retries=0, default_query={"api_key": KEY, "api-version": "2024-10-21"}
    )
    client.chat.completions.create(model="queried", messages=[{"role": "user", "content": "hi"}])
    # A part without "=" is all value: a key sent bare shows no more than a named one.
    httpx.post(base + f"/v1/chat/completions?key={GOOGLE_KEY}&{KEY}", json={"model": "queried-raw", "messages": []})
    for model in ("queried", "queried-raw"):
        trace = finished(spans, model)
        assert len(trace) == 2, [s.name for s in trace]
        for span in trace:
            assert KEY not in shown(span) and GOOGLE_KEY not in shown(span), shown(span)
        (http,) = [s for s in trace if "gen_ai.request.model" not in (s.attributes or {})]
        query = [v for k, v in (http.attributes or {}).items() if k in ("http.target", "http.url", "url.query")]
        assert query, http.attributes
        expected = "api_key=REDACTED&api-version=REDACTED" if model == "queried" else "key=REDACTED&REDACTED"
        assert all(str(value).endswith(expected) for value in query), query


def test_a_key_sent_as_an_azure_deployments_name_shows_on_no_span(served: tuple[str, InMemorySpanExporter]) -> None:
    """A client that swapped its key and Azure deployment settings sends its key in the path: the LLM span's
    ``url.path``, and the HTTP server span's path attributes and name, show it as ``[key]``, as the model name."""
    key = KEY + "Yz0123"  # (a label holds a key of 32 characters or more after its sk-)
    body = {"model": "deployed", "messages": [{"role": "user", "content": "hi"}]}
    path = "/openai/deployments/[key]/chat/completions"
    base, spans = served
    httpx.post(base + f"/openai/deployments/{key}/chat/completions?api-version=2024-10-21", json=body)
    trace = finished(spans, "deployed")
    assert len(trace) == 2, [s.name for s in trace]
    for span in trace:
        assert key[:12] not in shown(span) + span.name, (span.name, shown(span))
    (http,) = [s for s in trace if "gen_ai.request.model" not in (s.attributes or {})]
    assert path in http.name and (http.attributes or {}).get("url.path", path) == path, (http.name, http.attributes)
    # One span, the LLM span the server span: its url.path.
    with traced(http_span=False) as (base, spans):
        httpx.post(base + f"/openai/deployments/{key}/chat/completions", json=body)
        (llm,) = finished(spans, "deployed", count=1)
    assert (llm.attributes or {})["url.path"] == path


def test_a_path_holding_a_question_mark_keeps_its_whole_path_when_the_query_is_redacted(
    served: tuple[str, InMemorySpanExporter],
) -> None:
    """A path with an encoded ``?`` (``%3F``), decoded in the URL the instrumentation shows: the query's values are
    redacted after the whole path, not after that ``?`` (which cut the path short)."""
    base, spans = served
    for model, deployment in (("marked", "what%3Fnow"), ("proxied", "https:%2F%2Fhost%3Fnow")):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        httpx.post(base + f"/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21", json=body)
        (http,) = [s for s in finished(spans, model) if "gen_ai.request.model" not in (s.attributes or {})]
        urls = [v for k, v in (http.attributes or {}).items() if k in ("http.url", "url.full", "http.target")]
        assert urls, http.attributes
        path = "/openai/deployments/" + deployment.replace("%3F", "?").replace("%2F", "/") + "/chat/completions"
        assert all(str(url).endswith(f"{path}?api-version=REDACTED") for url in urls), urls


def test_an_exceptions_text_on_the_span_is_redacted(served: tuple[str, InMemorySpanExporter]) -> None:
    """An app error quoting a URL with its key reaches the LLM span's exception event and status: masked there, as
    captured content is, whether content capture is on or not."""
    base, spans = served
    response = httpx.post(base + "/v1/chat/completions", json={"model": "failing", "messages": []})
    assert response.status_code == 500
    trace = finished(spans, "failing")
    assert all(GOOGLE_KEY not in shown(span) for span in trace), [shown(span) for span in trace]
    (llm,) = [s for s in trace if (s.attributes or {}).get("gen_ai.request.model") == "failing"]
    (event,) = [e for e in llm.events if e.name == "exception"]
    assert str((event.attributes or {})["exception.message"]).endswith("v1/chat?key=[key]'")


def test_captured_tool_input_keeps_its_characters_and_masks_a_key_after_them(
    served: tuple[str, InMemorySpanExporter],
) -> None:
    """A tool's input object sent back is shown as JSON with its characters as they are (escaped, each took six
    characters of the cap and hid a key after a full-width colon from the redactor)."""
    base, spans = served
    use = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "remember",
        "input": {"note": "密钥\uff1a" + KEY, "city": "東京"},
    }
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "saved"}
    claude = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
    claude.messages.create(
        model="claude-tools",
        max_tokens=16,
        messages=[
            {"role": "user", "content": "note it"},
            {"role": "assistant", "content": [use]},  # type: ignore[list-item]
            {"role": "user", "content": [result]},  # type: ignore[list-item]
        ],
    )
    (llm,) = [s for s in finished(spans, "claude-tools") if "gen_ai.input.messages" in (s.attributes or {})]
    assert KEY not in shown(llm), shown(llm)
    sent = json.loads(str((llm.attributes or {})["gen_ai.input.messages"]))
    (call,) = [part for message in sent for part in message["parts"] if part["type"] == "tool_call"]
    assert "東京" in json.dumps(call["arguments"], ensure_ascii=False) and "[key]" in str(call["arguments"])


def test_a_tool_output_of_a_strange_type_leaves_the_captured_conversation_shown(
    served: tuple[str, InMemorySpanExporter],
) -> None:
    """A Responses tool output whose ``type`` is an object (no API sends one; a hostile client may) is shown as any
    output is, and the conversation with it (it stopped the capture of the whole span)."""
    base, spans = served
    given: Any = [
        {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": {"type": {"a": 1}}},
    ]
    openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0).responses.create(model="strange", input=given)
    (llm,) = [s for s in finished(spans, "strange") if (s.attributes or {}).get("gen_ai.request.model") == "strange"]
    assert "gen_ai.input.messages" in (llm.attributes or {}), llm.attributes


def test_a_query_strings_names_show_as_sent_in_utf_8() -> None:
    """A parameter's name of non-ASCII characters, sent raw, shows as the instrumentation decodes the query: UTF-8
    (it showed as Latin-1, ``nÃ¤me``). uvicorn and hypercorn answer such a request 400 themselves; granian hands it
    to the app, its query string as sent: called here as granian calls it."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
        metrics_port=0,
        request_logs=False,
        tracer_provider=provider,
        tracing_http_span=True,
    )
    body = json.dumps({"model": "utf8-query", "messages": [{"role": "user", "content": "hi"}]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "",
             "query_string": f"n\u00e4me={KEY}".encode(), "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")]}  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    try:
        asyncio.run(app(scope, receive, send))
    finally:
        if app._telemetry is not None:
            app._telemetry.shutdown()
    trace = finished(spans, "utf8-query")
    (http,) = [s for s in trace if "gen_ai.request.model" not in (s.attributes or {})]
    target = str((http.attributes or {}).get("http.target"))
    assert target.endswith("?n\u00e4me=REDACTED"), target


def test_an_exception_the_app_records_on_the_llm_span_is_redacted(served: tuple[str, InMemorySpanExporter]) -> None:
    """An app calling ``trace.get_current_span().record_exception(e)`` within an LLM request records on the LLM
    span: its text masked there too, as an exception leaving the app is."""
    base, spans = served
    with pytest.raises(openai.APIStatusError):
        openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="recording", messages=[{"role": "user", "content": "hi"}]
        )
    trace = finished(spans, "recording")
    (llm,) = [s for s in trace if (s.attributes or {}).get("gen_ai.request.model") == "recording"]
    (event,) = [e for e in llm.events if e.name == "exception"]
    assert str((event.attributes or {})["exception.message"]).endswith("v1/chat?key=[key]'"), shown(llm)
    assert all(GOOGLE_KEY not in shown(span) for span in trace), [shown(span) for span in trace]


#: A longer key, one that the cut of an exception's message or traceback may go through.
LONG_KEY = "sk-proj-" + "Q7x9LmN2pR4tV6wY8zA1bC3dE5fG7hJ9kL0" * 4
#: What an app that raises before answering raises, by the model asked for.
RAISED = {
    "long": f"upstream failed: GET https://upstream.example/v1?key={KEY} " + "x" * 5000,
    "message-cut": "x" * 1005 + " " + LONG_KEY,  # across the message's cut, at 1,024 characters
    "stack-cut": "y" * 9000 + " " + LONG_KEY + " " + "z" * 3950,  # across the traceback's cut, before its last 4 KiB
}


async def raising(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An app that raises before it answers (uvicorn answers 500): the exception leaves the HTTP server span open."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    raise RuntimeError(RAISED[json.loads(b"".join(chunks))["model"]])


@contextmanager
def raising_app(redact: Callable[[str], Any] | None = None) -> Iterator[tuple[openai.OpenAI, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = LLMTelemetryMiddleware(
        raising, metrics_port=0, request_logs=False, tracer_provider=provider, tracing_http_span=True, redact=redact
    )
    try:
        with serve(app) as base:
            yield openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0), spans
    finally:
        if app._telemetry is not None:
            app._telemetry.shutdown()


def exception_of(span: ReadableSpan) -> dict[str, Any]:
    (event,) = [e for e in span.events if e.name == "exception"]
    return dict(event.attributes or {})


def failed_trace(model: str, redact: Any = None) -> list[ReadableSpan]:
    """The two spans (HTTP server, LLM) of a request for ``model`` to :func:`raising_app`, which fails it."""
    with raising_app(redact) as (client, spans):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        trace = finished(spans, model)
    assert len(trace) == 2, [s.name for s in trace]
    return trace


def test_an_exception_leaving_the_app_is_bounded_and_redacted_on_the_http_server_span_too() -> None:
    """OpenTelemetry's ASGI middleware records an exception leaving the app on its span (``trace.use_span``): as
    on the LLM span, cut to its bounds and masked (it showed the key, and 5 KB of message, three times)."""
    for span in failed_trace("long"):
        assert KEY not in shown(span), shown(span)
        recorded = exception_of(span)
        assert recorded["exception.message"].startswith("upstream failed: GET https://upstream.example/v1?key=[key]")
        assert len(recorded["exception.message"]) <= 1024
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == f"RuntimeError: {recorded['exception.message']}"


@pytest.mark.parametrize("model", ["message-cut", "stack-cut"])
def test_a_key_the_exceptions_cut_goes_through_shows_none_of_it(model: str) -> None:
    """A key that the cut of the message (at 1,024 characters) or of the traceback (its first and last 4 KiB) goes
    through is masked whole: the redactor sees more than is kept (it saw the cut part, no longer a key)."""
    secret = LONG_KEY.removeprefix("sk-proj-")
    for span in failed_trace(model):
        text = shown(span)
        assert not [i for i in range(len(secret) - 8) if secret[i : i + 8] in text], text


@pytest.mark.parametrize("returned", ["None", "bytes"])
def test_a_redactor_returning_no_text_withholds_the_exceptions_text(returned: str) -> None:
    """A custom redactor that returns anything but text is taken as failed, as one that raises: the exception is
    still recorded, its text withheld, and the span's status is ERROR (with ``None`` the span lost both)."""
    redactor = (lambda text: None) if returned == "None" else (lambda text: text.encode())
    for span in failed_trace("long", redactor):
        assert KEY not in shown(span), shown(span)
        assert exception_of(span)["exception.message"] == "<RuntimeError message withheld: the redactor failed>"
        assert span.status.status_code is StatusCode.ERROR
