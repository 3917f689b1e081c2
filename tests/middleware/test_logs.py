"""JSON request logs: one line per LLM request on stdout, trace ids matching the exported spans, OTLP export."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.labels import valid_text
from llm_telemetry.logs import (
    FIELDS,
    MAX_LINE_BYTES,
    RECORD_ATTRIBUTE,
    REQUEST_LOGGER,
    JsonFormatter,
    RequestLogObserver,
)
from llm_telemetry.record import LLMCall
from llm_telemetry.redact import TRUNCATION_MARK
from otlp_receiver import OTLPReceiver, demo_server, isolated_env, otlp_receiver, tracing_env, wait_span
from support import free_port, request_log_lines, serve, settled, wait_for

REPO = Path(__file__).resolve().parents[2]

#: Request fields an OTLP record carries as its trace context rather than as attributes.
OTLP_TRACE_CONTEXT = ("trace_id", "span_id", "trace_sampled")


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)


def log_lines(text: str) -> list[dict[str, Any]]:
    """Every JSON object line of captured stdout (other output is ignored)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def line_for(lines: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    matches = [line for line in lines if line["request_id"] == request_id]
    assert len(matches) == 1, lines
    return matches[0]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with otlp_receiver() as r:
        yield r


def test_one_json_line_per_request_with_trace_ids_of_the_spans(
    receiver: OTLPReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    env = tracing_env(receiver, OTEL_SERVICE_NAME="llm-logs", LLM_TELEMETRY_ECHO_REQUEST_ID="true")
    with demo_server(env) as (_, base):
        sdk = client(base)
        stream = sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "log-stream-1"},
        )
        for _ in stream:
            pass
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        generated = raw.headers["x-request-id"]
        with pytest.raises(openai.RateLimitError) as failure:
            sdk.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-demo-fail": "rate_limit", "x-request-id": "log-429"},
            )
        assert failure.value.response.headers["x-request-id"] == "log-429"
        sdk.embeddings.create(model="text-embedding-3-small", input=["a b c"], extra_headers={"x-request-id": "e-1"})
    lines = log_lines(capsys.readouterr().out)
    assert len(lines) == 4

    streamed = line_for(lines, "log-stream-1")
    assert list(streamed) == list(FIELDS)  # every field, always, in the documented order
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", streamed["timestamp"])
    assert streamed["level"] == "info"
    assert streamed["message"] == "chat gpt-4o 200"
    assert streamed["service"] == "llm-logs"
    assert (streamed["operation"], streamed["provider"], streamed["model"]) == ("chat", "openai", "gpt-4o")
    assert streamed["stream"] is True and streamed["status_code"] == 200 and streamed["error_type"] is None
    assert (streamed["input_tokens"], streamed["output_tokens"]) == (3, 12)
    assert streamed["cost_usd"] > 0
    assert streamed["duration_ms"] >= streamed["ttft_ms"] > 0
    span = wait_span(receiver, **{"llm.request_id": "log-stream-1"})
    assert (streamed["trace_id"], streamed["span_id"]) == (span.trace_id, span.span_id)
    assert streamed["trace_sampled"] is True

    # No x-request-id from the client: one is generated and echoed, and it is the one logged.
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    plain = line_for(lines, generated)
    assert plain["stream"] is False and plain["ttft_ms"] is None and plain["model"] == "gpt-4o-mini"
    assert plain["trace_id"] == wait_span(receiver, **{"llm.request_id": generated}).trace_id

    failed = line_for(lines, "log-429")
    assert failed["level"] == "warning"
    assert (failed["status_code"], failed["error_type"]) == (429, "rate_limit")

    embedded = line_for(lines, "e-1")
    assert (embedded["operation"], embedded["input_tokens"], embedded["output_tokens"]) == ("embeddings", 3, None)


def test_a_line_says_its_trace_was_not_sampled(receiver: OTLPReceiver, capsys: pytest.CaptureFixture[str]) -> None:
    """A sampler that drops traces still gives them ids, which the line carries (the app's upstream calls share
    them); trace_sampled false tells a log viewer the trace behind the link was not kept."""
    env = tracing_env(receiver, OTEL_SERVICE_NAME="llm-unsampled", OTEL_TRACES_SAMPLER="always_off")
    with demo_server(env) as (app, base):
        client(base).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "unsampled"}
        )
        assert app.telemetry.tracing is not None and app.telemetry.tracing.force_flush()
    line = line_for(log_lines(capsys.readouterr().out), "unsampled")
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) and re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert line["trace_sampled"] is False
    assert not [s for s in receiver.spans if s.attributes.get("llm.request_id") == "unsampled"]


def test_logs_without_tracing_have_null_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    with demo_server({"OTEL_SERVICE_NAME": "llm-plain"}) as (app, base):
        assert app.telemetry.tracing is None
        response = httpx.post(
            base + "/v1/chat/completions", json={"model": "m", "messages": []}, headers={"x-request-id": "plain-1"}
        )
        assert "x-request-id" not in response.headers  # echoed only when asked to (LLM_TELEMETRY_ECHO_REQUEST_ID)
    line = line_for(log_lines(capsys.readouterr().out), "plain-1")
    assert line["trace_id"] is None and line["span_id"] is None and line["trace_sampled"] is None
    assert line["service"] == "llm-plain"


def own_lines_app(logger: logging.Logger) -> Any:
    """An app that logs through ``logger`` where apps log: in a stream's generator (sent from a task of its own), in
    a thread it hands work to, in a synchronous endpoint (Starlette's thread pool) and on a route that is no LLM's."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"

    def answer(request_id: str) -> dict[str, Any]:
        logger.info("in a thread %s", request_id)
        message = {"role": "assistant", "content": "hi"}
        return {"id": "c2", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}

    async def chat(request: Request) -> Any:
        body = await request.json()
        request_id = request.headers["x-request-id"]
        if not body.get("stream"):
            return JSONResponse(await run_in_threadpool(answer, request_id))

        async def events() -> Any:
            for word in ("a ", "b"):
                logger.info("in the stream %s", request_id)
                yield chunk({"content": word})
            yield chunk({}, "stop") + "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def embeddings(request: Request) -> JSONResponse:
        logger.info("in a sync endpoint %s", request.headers["x-request-id"])
        return JSONResponse({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]})

    def health(request: Request) -> JSONResponse:
        logger.info("on a route of no LLM")
        return JSONResponse({})

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/health", health),
    ]
    return Starlette(routes=routes)


def test_the_apps_own_lines_carry_the_ids_of_the_request_they_were_logged_in(receiver: OTLPReceiver) -> None:
    """docs/logging.md: ``JsonFormatter`` gives the app's own records ``trace_id``, ``span_id`` and ``trace_sampled``
    of the current span. Wherever the app logs while answering an LLM request (a stream's generator, a thread, a
    synchronous endpoint), its line names the request's LLM span, as the request's own line does; on a route that
    is no LLM's there is no span, and its line has no ids."""
    own = io.StringIO()
    handler = logging.StreamHandler(own)
    handler.setFormatter(JsonFormatter())
    app_logger = logging.getLogger("llm_telemetry_tests.own_lines")
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    app_logger.propagate = False
    try:
        with isolated_env(tracing_env(receiver, OTEL_SERVICE_NAME="llm-own-lines")):
            app = LLMTelemetryMiddleware(own_lines_app(app_logger), metrics_port=0)
            app.telemetry  # noqa: B018 - build the providers now, while the environment is in place
        with request_log_lines() as requests, serve(app) as base:
            llm = client(base)
            for _ in llm.chat.completions.create(
                model="m", messages=[], stream=True, extra_headers={"x-request-id": "own-stream"}
            ):
                pass
            llm.chat.completions.create(model="m", messages=[], extra_headers={"x-request-id": "own-thread"})
            llm.embeddings.create(model="e", input="x", extra_headers={"x-request-id": "own-sync"})
            assert httpx.get(base + "/health").status_code == 200
        app.telemetry.shutdown()
    finally:
        app_logger.removeHandler(handler)
    request_lines = log_lines(requests.getvalue())
    own_lines = log_lines(own.getvalue())
    for request_id, times in (("own-stream", 2), ("own-thread", 1), ("own-sync", 1)):
        request_line = line_for(request_lines, request_id)
        assert request_line["trace_sampled"] is True and request_line["span_id"]
        mine = [line for line in own_lines if line["message"].endswith(" " + request_id)]
        assert len(mine) == times, own_lines
        for line in mine:
            ids = (line["trace_id"], line["span_id"], line["trace_sampled"])
            assert ids == (request_line["trace_id"], request_line["span_id"], True), (line, request_line)
    (elsewhere,) = [line for line in own_lines if line["message"] == "on a route of no LLM"]
    assert set(elsewhere) == {"timestamp", "level", "message"}


def test_a_utf8_request_id_is_logged_as_sent_and_echoed_byte_for_byte(capsys: pytest.CaptureFixture[str]) -> None:
    """Header values are bytes; clients send non-ASCII ones as UTF-8 (as the attribution headers are read)."""
    sent = "réq-ünïcode-1".encode()
    with demo_server({"LLM_TELEMETRY_ECHO_REQUEST_ID": "true"}) as (_, base):
        response = httpx.post(
            base + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=[(b"x-request-id", sent)]
        )
    assert (b"x-request-id", sent) in response.headers.raw
    assert line_for(log_lines(capsys.readouterr().out), "réq-ünïcode-1")["model"] == "m"


@pytest.mark.parametrize(("first", "logged"), [(b"from-client", "from-client"), (b"", None)], ids=["first", "empty"])
def test_of_two_request_ids_the_line_has_the_one_the_app_reads(first: bytes, logged: str | None) -> None:
    """A request with two ``x-request-id`` headers (a proxy that adds one beside the client's): the line carries the
    first, the one the app's ``request.headers["x-request-id"]`` gives, so the two can be joined. An empty first one
    is none to the app: the line has an id of the middleware's, not the second header's."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"model": "m", "choices": [], "seen": request.headers["x-request-id"]})

    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), metrics_port=0
    )
    try:
        with request_log_lines() as sink, serve(app) as base:
            response = httpx.post(
                base + "/v1/chat/completions",
                json={"model": "m"},
                headers=[(b"x-request-id", first), (b"x-request-id", b"from-proxy")],
            )
    finally:
        app.telemetry.shutdown()
    assert response.json()["seen"] == first.decode()
    [line] = log_lines(sink.getvalue())
    assert line["request_id"] == logged if logged else line["request_id"] not in ("", "from-proxy")


def test_request_logs_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    with demo_server({"LLM_TELEMETRY_REQUEST_LOGS": "false"}) as (app, base):
        httpx.post(base + "/v1/chat/completions", json={"model": "m", "messages": []})
        assert app.telemetry.request_logs is None
    assert log_lines(capsys.readouterr().out) == []


def test_request_logs_off_sends_no_otlp_record_either_and_a_null_handler_keeps_only_the_records(
    receiver: OTLPReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/logging.md: ``LLM_TELEMETRY_REQUEST_LOGS=false`` turns the OTLP record off with the stdout line (a
    service that turned its stdout line off that way, as the page advised, lost its OTLP records too, unsaid); an
    app that wants the records without the line gives the request logger a ``logging.NullHandler()``."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    env = tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_TRACES_EXPORTER="none")
    env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"
    with demo_server({**env, "LLM_TELEMETRY_REQUEST_LOGS": "false"}) as (_, base):
        assert httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": "off-1"}).is_success
    logger = logging.getLogger(REQUEST_LOGGER)
    previous = logger.handlers[:]
    logger.handlers[:] = [logging.NullHandler()]
    try:
        with demo_server(env) as (_, base):
            answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": "null-1"})
            assert answer.is_success
    finally:
        logger.handlers[:] = previous
    # Each server's pipeline is flushed as it stops, in order: once the second's record is in, the first's would be.
    assert receiver.wait_for(lambda r: any(rec.attributes.get("request_id") == "null-1" for rec in r.logs))
    assert not [rec for rec in receiver.logs if rec.attributes.get("request_id") == "off-1"]
    assert log_lines(capsys.readouterr().out) == []


@pytest.mark.parametrize("value", ["otlp_proto_http", "otpl"])
def test_a_logs_exporter_it_does_not_know_is_named_in_a_warning(
    value: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/logging.md: ``OTEL_LOGS_EXPORTER`` is ``otlp`` or unset. Any other value (the OpenTelemetry SDK's own
    ``otlp_proto_http``, a typo) sent no record and said nothing, where OTEL_TRACES_EXPORTER's named itself; now a
    WARNING names it, and the line still goes to stdout."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level("WARNING", logger="llm_telemetry"), demo_server({"OTEL_LOGS_EXPORTER": value}) as (_, base):
        answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": "unknown-exporter"})
        assert answer.is_success
    assert [r for r in caplog.records if "OTEL_LOGS_EXPORTER" in r.getMessage() and repr(value) in r.getMessage()], (
        caplog.text
    )
    assert line_for(log_lines(capsys.readouterr().out), "unknown-exporter")["model"] == "gpt-4o"


def test_no_logs_exporter_is_no_unknown_exporter(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/logging.md: ``OTEL_LOGS_EXPORTER=none``, OpenTelemetry's word for no exporter and what the operator
    injects into every pod whose resource keeps its logs on stdout, means stdout only, as unset does: no WARNING in
    those pods' logs, and the line is written."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level("WARNING", logger="llm_telemetry"), demo_server({"OTEL_LOGS_EXPORTER": "none"}) as (_, base):
        answer = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": "no-exporter"})
        assert answer.is_success
    assert [r for r in caplog.records if "OTEL_LOGS_EXPORTER" in r.getMessage()] == []
    assert line_for(log_lines(capsys.readouterr().out), "no-exporter")["model"] == "gpt-4o"


@pytest.mark.parametrize(
    ("named", "level"),
    [("", ""), ("llm_telemetry.requests", "INFO"), ("llm_telemetry", "WARNING")],
    ids=["root only", "the request logger named", "its parent named"],
)
def test_a_logging_configuration_the_app_applies_at_startup_leaves_the_lines_and_records_on(
    named: str, level: str, receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """An app that configures logging in its lifespan startup with ``dictConfig`` (as many do) disables every logger
    that exists then and that it does not name (``disable_existing_loggers``, true by default): the request logger,
    which the middleware had set up as the lifespan began, among them. No line was written and no OTLP record sent,
    and nothing said so, while the spans went on. One that names the request logger (to set its level), or
    ``llm_telemetry`` above it (to quiet the library's warnings), takes every handler off it, the OTLP one too, and
    the lines and records were lost the same way. Each ends as the same configuration applied before the middleware
    set up does. Real uvicorn, the openai SDK, streamed and not: one line each on stdout and one record each, with its
    span's ids."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    env.update(
        {
            **tracing_env(receiver, OTEL_LOGS_EXPORTER="otlp", OTEL_SERVICE_NAME="llm-dictconfig"),
            "OTEL_BLRP_SCHEDULE_DELAY": "20",
            "LLM_TELEMETRY_METRICS_PORT": "0",
            "DICTCONFIG_APP_LOGGER": named,
            "DICTCONFIG_APP_LEVEL": level,
            "PYTHONPATH": os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
        }
    )
    command = [sys.executable, "-m", "uvicorn", "dictconfig_app:app", "--app-dir", str(REPO / "tests" / "apps"),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    ids = (f"dictconfig-plain-{named}", f"dictconfig-stream-{named}")
    with (tmp_path / "stdout").open("wb") as out, (tmp_path / "stderr").open("wb") as err:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the app", lambda: httpx.get(base + "/healthz", timeout=5).status_code == 200)
        messages: Any = [{"role": "user", "content": "hi"}]
        answer = client(base).chat.completions.create(
            model="gpt-4o", messages=messages, extra_headers={"x-request-id": ids[0]}
        )
        assert answer.choices[0].message.content
        chunks = client(base).chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, extra_headers={"x-request-id": ids[1]}
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    lines = log_lines((tmp_path / "stdout").read_text())
    for request_id in ids:
        line = line_for(lines, request_id)
        span = wait_span(receiver, **{"llm.request_id": request_id})
        assert (line["trace_id"], line["span_id"]) == (span.trace_id, span.span_id)
        assert receiver.wait_for(lambda r, i=request_id: any(rec.attributes.get("request_id") == i for rec in r.logs))
        (record,) = [rec for rec in receiver.logs if rec.attributes.get("request_id") == request_id]
        assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)
    # The configuration did disable the other loggers it found: uvicorn's, which said nothing more after it ran. The
    # lines went to stdout as JSON only, not also to the root logger's plain handler.
    said = (tmp_path / "stderr").read_text()
    assert "Waiting for application startup" in said and "Application startup complete" not in said, said
    assert "chat gpt-4o 200" not in said, said


def test_lines_follow_handlers_the_app_configured(capsys: pytest.CaptureFixture[str]) -> None:
    """Rerouting: an app that gives the logger its own handler gets the lines there, not on stdout."""
    with request_log_lines() as sink, demo_server({}) as (_, base):
        httpx.post(base + "/v1/chat/completions", json={"model": "m"}, headers={"x-request-id": "rerouted"})
    assert line_for(log_lines(sink.getvalue()), "rerouted")["model"] == "m"
    assert log_lines(capsys.readouterr().out) == []


async def sets_its_own_request_id(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"from-the-app")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"model": "m", "choices": []}'})


def test_request_id_set_by_the_app_is_kept_and_logged() -> None:
    """An app that sets its own ``x-request-id`` (llama-cpp-python's server does) keeps it, alone. A request that
    came without one is logged under the app's id, the one its client sees; a request with one, under its own."""
    app = LLMTelemetryMiddleware(sets_its_own_request_id, metrics_port=0)
    try:
        with request_log_lines() as sink, serve(app) as base:
            plain = httpx.post(base + "/v1/chat/completions", json={"model": "without"})
            named = httpx.post(base + "/v1/chat/completions", json={"model": "with"}, headers={"x-request-id": "c-1"})
    finally:
        app.telemetry.shutdown()
    assert plain.headers.get_list("x-request-id") == named.headers.get_list("x-request-id") == ["from-the-app"]
    lines = log_lines(sink.getvalue())
    assert line_for(lines, "from-the-app")["model"] == "without"
    assert line_for(lines, "c-1")["model"] == "with"


async def answers_like_anthropic(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A Messages endpoint that names its answer by Anthropic's ``request-id`` header, as Anthropic's API and the
    services in front of it do; the request's ``x-request-id``, when there is one, comes back as ``x-client-id``."""
    while (await receive()).get("more_body"):
        pass
    sent = dict(scope["headers"]).get(b"x-request-id", b"")
    headers = [(b"content-type", b"application/json"), (b"request-id", b"req_011CTa9"), (b"x-client-id", sent)]
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "hi"}],
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@pytest.mark.parametrize("echo", [False, True])
def test_anthropics_request_id_is_the_one_logged_and_echoed(echo: bool) -> None:
    """The id the anthropic SDK shows for a response (``message._request_id``, from its ``request-id`` header) is
    the one logged when the client sent none, and the one echoed as ``x-request-id``; a client's own id still wins,
    and the response's headers are otherwise the app's."""
    import anthropic

    app = LLMTelemetryMiddleware(answers_like_anthropic, metrics_port=0, echo_request_id=echo)
    try:
        with request_log_lines() as sink, serve(app) as base:
            sdk = anthropic.Anthropic(base_url=base, api_key="sk-test", max_retries=0)
            ask = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            plain = sdk.messages.with_raw_response.create(**ask)
            named = sdk.messages.with_raw_response.create(**ask, extra_headers={"x-request-id": "c-7"})
    finally:
        app.telemetry.shutdown()
    assert plain.parse()._request_id == "req_011CTa9"
    lines = log_lines(sink.getvalue())
    assert line_for(lines, "req_011CTa9")["model"] == "claude-x"
    assert line_for(lines, "c-7")["model"] == "claude-x"
    assert plain.headers.get_list("x-request-id") == (["req_011CTa9"] if echo else [])
    assert named.headers.get_list("x-request-id") == (["c-7"] if echo else [])
    assert plain.headers.get_list("request-id") == named.headers.get_list("request-id") == ["req_011CTa9"]
    assert named.headers["x-client-id"] == "c-7"


def test_otlp_log_export(receiver: OTLPReceiver, capsys: pytest.CaptureFixture[str]) -> None:
    env = tracing_env(receiver, "grpc", OTEL_LOGS_EXPORTER="otlp", OTEL_SERVICE_NAME="llm-otlp-logs")
    env["OTEL_BLRP_SCHEDULE_DELAY"] = "20"
    with demo_server(env) as (_, base):
        client(base).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "otlp-log-1"}
        )
    span = wait_span(receiver, **{"llm.request_id": "otlp-log-1"})
    assert receiver.wait_for(lambda r: any(rec.attributes.get("request_id") == "otlp-log-1" for rec in r.logs))
    record = next(rec for rec in receiver.logs if rec.attributes.get("request_id") == "otlp-log-1")
    assert record.protocol == "grpc"
    assert record.body == "chat gpt-4o 200"
    assert record.severity_text == "INFO"
    assert record.resource["service.name"] == "llm-otlp-logs"
    assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)
    assert record.attributes["status_code"] == 200 and record.attributes["model"] == "gpt-4o"
    assert "error_type" not in record.attributes  # nulls are left out of OTLP attributes
    # stdout still gets its line too.
    assert line_for(log_lines(capsys.readouterr().out), "otlp-log-1")["trace_id"] == span.trace_id


#: An app that names its service in code, on the tracer provider it installs globally at import or in its lifespan
#: startup (FastAPI's ``lifespan``), served by uvicorn with request logs exported over OTLP. In a process of its own:
#: a global provider is set once per process.
APP_NAMING_ITS_SERVICE = textwrap.dedent(
    """
    import contextlib, sys, threading, time, httpx, uvicorn
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from llm_telemetry import LLMTelemetryMiddleware
    from llm_telemetry.demo.app import bare_app

    port, traces, installed = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def install():
        provider = TracerProvider(resource=Resource({"service.name": "llm-named-in-code"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=traces)))
        trace.set_tracer_provider(provider)

    if installed == "import":
        install()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if installed == "lifespan":
            install()
        yield

    app = LLMTelemetryMiddleware(Starlette(lifespan=lifespan, routes=[Mount("/", app=bare_app())]), metrics_port=0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                          headers={"x-request-id": "named-" + installed})
    assert response.status_code == 200, response.text
    server.should_exit = True
    thread.join()
    """
)


@pytest.mark.parametrize("installed", ["import", "lifespan"])
def test_lines_and_otlp_records_name_the_service_the_app_names_in_code(installed: str, receiver: OTLPReceiver) -> None:
    """The ``service.name`` of the app's own tracer provider, the spans', is the lines' ``service`` and the OTLP
    records' resource (Loki labels them ``service_name``), not the environment's ``unknown_service:python``; the
    environment's resource attributes (the operator sets k8s.* there) stay on the records."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
    env.update(
        OTEL_LOGS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=receiver.http_endpoint + "/v1/logs",
        OTEL_RESOURCE_ATTRIBUTES="k8s.namespace.name=llm",
    )
    command = [sys.executable, "-c", APP_NAMING_ITS_SERVICE, str(free_port()), receiver.http_endpoint + "/v1/traces"]
    result = subprocess.run([*command, installed], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    request_id = "named-" + installed
    line = line_for(log_lines(result.stdout), request_id)
    span = wait_span(receiver, **{"llm.request_id": request_id})
    assert span.resource["service.name"] == "llm-named-in-code"
    assert (line["service"], line["span_id"]) == ("llm-named-in-code", span.span_id)
    assert receiver.wait_for(lambda r: any(rec.attributes.get("request_id") == request_id for rec in r.logs))
    record = next(rec for rec in receiver.logs if rec.attributes.get("request_id") == request_id)
    assert record.span_id == span.span_id
    assert record.resource["service.name"] == "llm-named-in-code"
    assert record.resource["k8s.namespace.name"] == "llm"


def test_otlp_records_name_the_service_of_a_tracer_provider_passed_in(
    receiver: OTLPReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tracer_provider=``: its ``service.name`` is the OTLP records' as it is the spans' and the lines', and the
    metrics' (``target_info`` on the metrics port, the resource of their OTLP push), over the environment's resource,
    whose k8s.* attributes (the operator's) stay."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from llm_telemetry.demo.app import bare_app

    provider = TracerProvider(resource=Resource({"service.name": "llm-passed-in"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")))
    env = {
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.http_endpoint + "/v1/logs",
        "OTEL_SERVICE_NAME": "llm-from-the-environment",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.namespace.name=llm,k8s.pod.name=chat-0",  # (as the operator sets them)
        "LLM_TELEMETRY_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.http_endpoint + "/v1/metrics",
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",  # exported at the shutdown below
    }
    metrics_port = free_port()
    with isolated_env(env):
        app = LLMTelemetryMiddleware(
            bare_app(), metrics_port=metrics_port, metrics_host="127.0.0.1", tracer_provider=provider
        )
        app.telemetry  # noqa: B018 - built while the environment is in place
    try:
        with serve(app) as base:
            sdk = client(base)
            sdk.chat.completions.create(model="gpt-4o", messages=[], extra_headers={"x-request-id": "passed-in"})
            (info,) = settled(metrics_port, lambda m: None).series("target_info")
            assert (info["service_name"], info["k8s_namespace_name"], info["k8s_pod_name"]) == (
                "llm-passed-in",
                "llm",
                "chat-0",
            )
    finally:
        app.telemetry.shutdown()
        provider.shutdown()
    assert receiver.wait_for(lambda r: any(p.name == "llm.requests" for p in r.metrics))
    resources = {(p.resource["service.name"], p.resource.get("k8s.pod.name")) for p in receiver.metrics}
    assert resources == {("llm-passed-in", "chat-0")}
    span = wait_span(receiver, **{"llm.request_id": "passed-in"})
    assert span.resource["service.name"] == "llm-passed-in"
    assert line_for(log_lines(capsys.readouterr().out), "passed-in")["service"] == "llm-passed-in"
    assert receiver.wait_for(lambda r: any(rec.attributes.get("request_id") == "passed-in" for rec in r.logs))
    record = next(rec for rec in receiver.logs if rec.attributes.get("request_id") == "passed-in")
    assert (record.resource["service.name"], record.span_id) == ("llm-passed-in", span.span_id)


@pytest.mark.parametrize(
    "created", [0.0, 1_700_000_000.0, 1_700_000_000.0004, 1_700_000_000.9994, 1_700_000_000.9999996, 1_700_000_059.5]
)
def test_timestamps_are_utc_milliseconds_like_datetime_formats_them(created: float) -> None:
    from datetime import datetime, timezone

    from llm_telemetry.logs import _timestamp

    moment = datetime.fromtimestamp(created, tz=timezone.utc)
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    assert _timestamp(created) == expected
    assert _timestamp(created) == expected  # the cached second gives the same text


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def observed_record(call: LLMCall, service: str, logger_name: str) -> logging.LogRecord:
    """The one record the request-log observer of ``service`` makes for ``call`` on the logger ``logger_name``."""
    logger = logging.getLogger(logger_name)
    captured = _Records()
    logger.addHandler(captured)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        RequestLogObserver(service, logger).end(call)
    finally:
        logger.removeHandler(captured)
    (record,) = captured.records
    return record


def test_the_line_is_one_record_of_the_request_logger_with_the_fields() -> None:
    from llm_telemetry.logs import RECORD_ATTRIBUTE
    from llm_telemetry.record import LLMCall

    call = LLMCall("chat", "openai", 1.0, request_id="rid-1", request_model="gpt-4o", status_code=429)
    call.error_type, call.end = "RateLimitError", 1.25
    record = observed_record(call, "svc", "llm_telemetry.requests.test")
    assert record.name == "llm_telemetry.requests.test"
    assert record.levelno == logging.WARNING and record.getMessage() == "chat gpt-4o 429"
    fields = getattr(record, RECORD_ATTRIBUTE)
    assert fields["request_id"] == "rid-1" and fields["duration_ms"] == 250.0 and fields["trace_id"] is None
    line = json.loads(JsonFormatter().format(record))
    assert list(line) == list(FIELDS) and line["level"] == "warning" and line["error_type"] == "RateLimitError"


@contextmanager
def records_made() -> Iterator[list[logging.LogRecord]]:
    """Every ``logging.LogRecord`` of the request logger made inside the block (the middleware's direct paths make
    none; records of other loggers, such as those of servers earlier tests left running, are not counted)."""
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.name == REQUEST_LOGGER:
            made.append(record)
        return record

    logging.setLogRecordFactory(counted)
    try:
        yield made
    finally:
        logging.setLogRecordFactory(factory)


@pytest.fixture
def request_logger() -> Iterator[logging.Logger]:
    """The request logger as a fresh process has it: without the handlers earlier tests left on it (the middleware
    adds its own handlers only to a logger that has none), and propagating (pytest attaches its capture handlers to
    every logger that does not, such as one a middleware left set up); both are put back afterwards."""
    logger = logging.getLogger(REQUEST_LOGGER)
    others, propagate = logger.handlers[:], logger.propagate
    for other in others:
        logger.removeHandler(other)
    logger.propagate = True
    try:
        yield logger
    finally:
        logger.propagate = propagate
        for other in others:
            logger.addHandler(other)


@pytest.mark.parametrize("error", [None, "rate_limit"])
@pytest.mark.usefixtures("request_logger")
def test_the_line_written_directly_is_the_line_logging_writes(
    error: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """With only its own stdout handler the middleware writes the line itself (no LogRecord); a filter on the
    handler sends it through logging instead: both write the same line."""
    from llm_telemetry.logs import RequestLogs
    from llm_telemetry.record import LLMCall

    call = LLMCall("chat", "openai", 1.0, request_id='r"\u00e9\ud800', request_model="m\n", status_code=200)
    call.end, call.first_token_at, call.stream, call.error_type = 1.2504, 1.1, True, error
    call.input_tokens, call.output_tokens, call.cost_usd = 12, 7, 0.000125
    logs = RequestLogs("svc", env={})
    handler = logs.logger.handlers[0]
    try:
        with records_made() as made:
            capsys.readouterr()
            logs.observer.end(call)
            direct, records_direct = capsys.readouterr().out, len(made)
            handler.addFilter(lambda record: True)
            logs.observer.end(call)
            through_logging = capsys.readouterr().out
    finally:
        logs.shutdown()
    assert records_direct == 0 and len(made) == 1
    assert direct.count("\n") == 1 and through_logging.count("\n") == 1
    first, second = json.loads(direct), json.loads(through_logging)
    assert first.pop("timestamp")[:10] == second.pop("timestamp")[:10]
    assert first == second and list(first) == list(FIELDS[1:])
    assert first["level"] == ("warning" if error else "info") and first["request_id"] == 'r"\u00e9\ufffd'


@pytest.mark.parametrize("error", [None, "rate_limit"])
@pytest.mark.usefixtures("request_logger")
def test_with_otlp_export_the_direct_path_sends_what_logging_sends(
    error: str | None, receiver: OTLPReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """With its stdout and OTLP handlers as set up, the middleware writes the line and emits the OTLP record itself
    (no LogRecord); a filter on the OTLP handler sends both through logging instead. The receiver gets the same
    record either way, in the call's trace context, and stdout the same line."""
    from opentelemetry import trace

    from llm_telemetry.logs import RequestLogs
    from llm_telemetry.record import LLMCall

    parent = trace.NonRecordingSpan(trace.SpanContext(0xABC, 0xDEF, False, trace.TraceFlags(1)))
    env = {
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.http_endpoint + "/v1/logs",
        "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf",
    }
    with isolated_env({**env, "OTEL_SERVICE_NAME": "llm-direct-logs"}):
        logs = RequestLogs("svc", env=env)
    lines = []
    try:
        for path in ("direct", "logging"):
            call = LLMCall("chat", "openai", 1.0, request_id=f"{path}-{error}", request_model="m", status_code=200)
            call.end, call.error_type, call.input_tokens = 1.25, error, 12
            call.otel_context = trace.set_span_in_context(parent)
            if path == "logging":
                logs.logger.handlers[1].addFilter(lambda record: True)
            with records_made() as made:
                capsys.readouterr()
                logs.observer.end(call)
                lines.append(json.loads(capsys.readouterr().out))
            assert len(made) == (0 if path == "direct" else 1)
        logs.force_flush()
    finally:
        logs.shutdown()
    ids = {f"direct-{error}", f"logging-{error}"}
    assert receiver.wait_for(lambda r: ids <= {rec.attributes.get("request_id") for rec in r.logs})
    direct, through_logging = (
        next(rec for rec in receiver.logs if rec.attributes.get("request_id") == f"{path}-{error}")
        for path in ("direct", "logging")
    )
    assert direct.trace_id == f"{0xABC:032x}" and direct.span_id == f"{0xDEF:016x}"
    assert direct.severity_text == ("WARN" if error else "INFO") and direct.body == "chat m 200"
    assert direct.resource["service.name"] == "llm-direct-logs"
    direct.attributes.pop("request_id"), through_logging.attributes.pop("request_id")
    assert direct == through_logging
    for line in lines:
        line.pop("timestamp"), line.pop("request_id")
    assert lines[0] == lines[1] and lines[0]["trace_id"] == f"{0xABC:032x}"


def _provider_with_memory(limits: Any = None) -> tuple[Any, Any]:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, InMemoryLogRecordExporter
    from opentelemetry.sdk.resources import Resource

    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource({"service.name": "llm-direct"}), log_record_limits=limits)
    provider.add_log_record_processor(BatchLogRecordProcessor(memory, schedule_delay_millis=3_600_000))
    return provider, memory


def _exported_view(record: Any) -> dict[str, Any]:
    """What an exporter reads from a record, but the observed time (the moment it was made)."""
    view = json.loads(record.to_json())
    view.pop("observed_timestamp")
    log_record = record.log_record
    view.update(
        attributes=dict(log_record.attributes or {}),
        types={k: type(v).__name__ for k, v in (log_record.attributes or {}).items()},
        context=dict(log_record.context or {}),
        scope=record.instrumentation_scope,
        limits=vars(record.limits),
        exception=log_record.exception,
        event_name=log_record.event_name,
    )
    return view


_field_values = st.one_of(
    st.none(), st.text(max_size=40), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.booleans()
)


def _send_both_ways(provider: Any, fields: dict[str, Any], level: int, message: str, otel_context: Any) -> None:
    """The record of these values sent by the OTLP handler, then by the SDK's ``Logger.emit`` itself."""
    from llm_telemetry.logs import OTLPLogHandler

    handler = OTLPLogHandler(provider)
    handler.send(1_700_000_000.25, level, message, fields, otel_context)
    name = "WARN" if level == logging.WARNING else logging.getLevelName(level)
    handler._otel_logger.emit(
        timestamp=int(1_700_000_000.25 * 1e9),
        context=otel_context,
        severity_number=handler._severity[level],
        severity_text=name,
        body=message,
        attributes={k: v for k, v in fields.items() if v is not None and k not in OTLP_TRACE_CONTEXT},
    )


@settings(max_examples=60, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from(FIELDS[3:]), _field_values, max_size=len(FIELDS)),
    level=st.sampled_from([logging.INFO, logging.WARNING, logging.ERROR]),
    message=st.text(max_size=40),
    traced=st.booleans(),
)
def test_records_handed_to_the_batch_processor_directly_are_the_sdks(
    fields: dict[str, Any], level: int, message: str, traced: bool
) -> None:
    """The record the OTLP handler queues itself is, to an exporter, the one the SDK's ``Logger.emit`` queues."""
    from opentelemetry import context, trace

    from llm_telemetry.logs import OTLPLogHandler

    provider, memory = _provider_with_memory()
    assert OTLPLogHandler(provider)._direct is not None  # the pipeline it takes the direct path for
    span = trace.NonRecordingSpan(trace.SpanContext(0x1234, 0x5678, False, trace.TraceFlags(1)))
    otel_context = trace.set_span_in_context(span) if traced else context.Context()
    try:
        _send_both_ways(provider, fields, level, message, otel_context)
        provider.force_flush()
        direct, sdk = memory.get_finished_logs()
    finally:
        provider.shutdown()
    assert _exported_view(direct) == _exported_view(sdk)


def test_a_processor_added_later_gets_the_records_too() -> None:
    from opentelemetry import context
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from llm_telemetry.logs import OTLPLogHandler

    provider, memory = _provider_with_memory()
    handler = OTLPLogHandler(provider)
    handler.send(1.0, logging.INFO, "before", {"model": "m"}, context.Context())
    later = InMemoryLogRecordExporter()
    provider.add_log_record_processor(SimpleLogRecordProcessor(later))
    handler.send(2.0, logging.INFO, "after", {"model": "m"}, context.Context())
    provider.force_flush()
    try:
        assert [r.log_record.body for r in memory.get_finished_logs()] == ["before", "after"]
        assert [r.log_record.body for r in later.get_finished_logs()] == ["after"]
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    "limits", [{"max_attribute_length": 3}, {"max_attributes": 2}, {"max_log_record_attributes": 4}]
)
def test_attribute_limits_apply_as_the_sdk_applies_them(limits: dict[str, int]) -> None:
    from opentelemetry import context
    from opentelemetry.sdk._logs import LogRecordDroppedAttributesWarning, LogRecordLimits

    provider, memory = _provider_with_memory(LogRecordLimits(**limits))
    fields = {"model": "gpt-4o-mini", "operation": "chat", "status_code": 200, "stream": True, "cost_usd": 0.5}
    dropping = "max_attribute_length" not in limits  # five attributes, more than the count limits allow
    try:
        with pytest.warns(LogRecordDroppedAttributesWarning) if dropping else contextlib.nullcontext() as warned:
            _send_both_ways(provider, fields, logging.INFO, "chat gpt-4o-mini 200", context.Context())
        provider.force_flush()
        direct, sdk = memory.get_finished_logs()
    finally:
        provider.shutdown()
    assert _exported_view(direct) == _exported_view(sdk)
    assert direct.dropped_attributes == sdk.dropped_attributes == (len(fields) - len(direct.log_record.attributes))
    assert warned is None or len(warned) == 2  # the SDK's warning, once for each


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=12), _JSON_VALUES | st.tuples(st.text()), max_size=8))
@settings(max_examples=300, deadline=None)
@example({"model": "a\u202eb\u061cc\u00add\U000e0041e\u2028f\x85g\ufeffh", "\u2066": ["\U000110bd"]})
@example({"\x7f": ("",)})
def test_a_request_line_is_the_json_module_s_text(fields: dict[str, Any]) -> None:
    """The line the formatter writes is ``json.dumps`` of the same fields (compact, non-ASCII kept, anything else
    through ``str``), whatever the fields hold: NaN and infinities, lone surrogates (made writable), nesting. And it
    stays one line for every reader, with nothing invisible in it: the Unicode line breaks and format characters JSON
    lets stand in a string are escaped. (Unless it would not fit in one write to a pipe: see the tests below.)"""
    record = logging.LogRecord(REQUEST_LOGGER, logging.INFO, __file__, 1, "llm request", None, None)
    setattr(record, RECORD_ATTRIBUTE, fields)
    line = JsonFormatter().format(record)
    timestamp = json.loads(line)["timestamp"] if "timestamp" not in fields else fields["timestamp"]
    expected = {"timestamp": timestamp, "level": "info", "message": "llm request", **fields}
    text = valid_text(json.dumps(expected, ensure_ascii=False, separators=(",", ":"), default=str))
    if TRUNCATION_MARK in line and TRUNCATION_MARK not in text:  # cut to MAX_LINE_BYTES
        assert len(line.encode()) < MAX_LINE_BYTES and len(line.splitlines()) == 1
        return
    # The same JSON, with nothing invisible left raw: the C1 controls (NEL among them), the Unicode line breaks and
    # every format character (zero-width ones, bidirectional overrides and isolates, tags) are escapes.
    assert json.dumps(json.loads(line)) == json.dumps(json.loads(text))  # (NaN is no equal of itself)
    assert not [ch for ch in line if ord(ch) > 0x7F and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]
    assert len(line.splitlines()) == 1
    if text.isascii():
        assert line == text.replace("\x7f", "\\u007f")  # (DEL, invisible too, is written as its escape)


def test_a_model_name_with_unicode_line_breaks_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A client can send any model name; U+2028, U+2029 and NEL end a line for Python's ``splitlines`` and many log
    readers. Every line written is still one JSON object, and the name reads back as sent."""
    model = 'gpt\u2028{"forged": true}\u2029x\x85y'
    with demo_server({}) as (_, base):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-request-id": "line-breaks"}
        assert httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=10).status_code == 200
    out = capsys.readouterr().out
    assert all(isinstance(json.loads(part), dict) for part in out.splitlines() if part.strip())
    assert line_for(log_lines(out), "line-breaks")["model"] == model


@pytest.mark.parametrize(
    ("model", "escaped"),
    [
        ('gpt-4o\u202e}"eslaf":"nimda"{\u200bx\u2066y\ufeff\x7f', "\\u202e"),
        ("gpt-4o\x7f-mini\x7f\x7f", "\\u007f"),  # ASCII only: DEL, which JSON lets stand raw
    ],
    ids=["beyond-ascii", "ascii-del"],
)
def test_a_model_name_with_invisible_characters_shows_them_escaped_in_the_raw_line(
    model: str, escaped: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A right-to-left override (U+202E) raw in a line turns the rest of it around in a terminal (`kubectl logs`),
    and zero-width characters hide in it, as DEL does (a terminal shows nothing for it: `gpt-4o<DEL>` read as
    `gpt-4o`): the raw line spells them out, a JSON reader gets the name back as sent."""
    with demo_server({}) as (_, base):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-request-id": "invisible"}
        assert httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=10).status_code == 200
    out = capsys.readouterr().out
    (raw,) = [part for part in out.splitlines() if '"invisible"' in part]
    assert not any(char in raw for char in "\u202e\u200b\u2066\ufeff\x7f")
    assert escaped in raw
    assert json.loads(raw)["model"] == model


#: What a client may send that a line writes long, or that could break it: C0 and C1 controls and line breaks
#: (6-byte escapes), quotes and backslashes (2), invisible characters (6; 12 beyond U+FFFF, as a surrogate pair), lone
#: surrogates, 4-byte UTF-8; and any other character.
_HOSTILE_CHARACTERS = st.sampled_from(
    list('\x00\n\r\x1b\x7f\x85\u2028\u2029\u202e\u2066\u200b\ufeff\U000e0041\ud800\udfff"\\\u00e9\U0001f600a')
) | st.characters(codec=None)
#: Short strings of them, and long runs: the middleware keeps 1,024 characters of a model and 128 of a request id,
#: but an app's own records or its service name have no such cap.
_HOSTILE_TEXT = st.text(_HOSTILE_CHARACTERS, max_size=64) | st.lists(
    st.tuples(_HOSTILE_CHARACTERS, st.integers(1, 1500)), min_size=1, max_size=4
).map(lambda runs: "".join(character * count for character, count in runs))


def _sent_or_cut(logged: str, sent: str) -> bool:
    """Whether a logged string is the one sent (lone surrogates replaced), or a start of it ending in the mark."""
    sent = valid_text(sent)
    if logged == sent:
        return True
    return logged.endswith(TRUNCATION_MARK) and sent.startswith(logged[: -len(TRUNCATION_MARK)])


@given(request_id=_HOSTILE_TEXT, model=_HOSTILE_TEXT, response_model=st.none() | _HOSTILE_TEXT, service=_HOSTILE_TEXT)
@settings(max_examples=200, deadline=None)
@example(request_id="h0-0", model="\u202e" * 1024, response_model=None, service="svc")  # the audit's 6.5 KB line
@example(request_id="\U000e0041" * 128, model="\U000e0041" * 1024, response_model=None, service="s")  # 14 KB
@example(request_id="r" * 4000, model="", response_model="\x00" * 700, service="\u00e9" * 3000)
@example(request_id="r", model="\U000e0041" * 310 + "a" * 629, response_model=None, service="s")  # escaped unevenly
def test_a_request_line_fits_one_write_to_a_pipe_whatever_the_client_sends(
    request_id: str, model: str, response_model: str | None, service: str
) -> None:
    """A write of at most PIPE_BUF bytes goes into a pipe whole; a longer one can go in by parts, with other
    processes' lines between them. Whatever the strings, the line with its newline is at most MAX_LINE_BYTES, one
    line, valid JSON with every field; each string is as sent, or a start of it and the mark."""
    call = LLMCall("chat", "openai", 1.0, request_id=request_id, request_model=model, status_code=200)
    call.response_model, call.end = response_model, 1.5
    record = observed_record(call, service, "llm_telemetry.requests.test-bound")
    line = JsonFormatter().format(record)
    assert len((line + "\n").encode()) <= MAX_LINE_BYTES
    assert len(line.splitlines()) == 1
    parsed = json.loads(line)
    assert list(parsed) == list(FIELDS)
    assert _sent_or_cut(parsed["request_id"], request_id) and _sent_or_cut(parsed["service"], service)
    assert parsed["model"] is None or _sent_or_cut(parsed["model"], model or response_model or "")


@pytest.mark.parametrize("model", ["gpt-4o", "\U000e0041" * 1024], ids=["short-strings", "a-hostile-model"])
def test_a_line_long_for_fields_that_are_not_text_keeps_its_short_strings_whole(model: str) -> None:
    """An app's own mapping of hundreds of numbers: no cut of its strings would bring the line within the bound.
    Its short strings (the timestamp, the level, the message) stay whole rather than cut to the mark; a long one
    (a client's model of 1,024 tag characters, 12 bytes each written) is still cut, to 256 bytes written."""
    fields = {f"n{i}": i for i in range(400)} | {"model": model}
    record = logging.LogRecord(REQUEST_LOGGER, logging.INFO, __file__, 1, "llm request", None, None)
    setattr(record, RECORD_ATTRIBUTE, fields)
    text = JsonFormatter().format(record)
    line = json.loads(text)
    assert (line["level"], line["message"]) == ("info", "llm request")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
    assert all(line[f"n{i}"] == i for i in range(400))
    if model == "gpt-4o":
        assert line["model"] == model
    else:
        assert _sent_or_cut(line["model"], model) and line["model"] != model
        assert len(json.dumps(line["model"]).encode()) <= 256
        assert len(text.encode()) < 2 * MAX_LINE_BYTES  # (whole, the model alone took 12 KB)


def test_lines_escape_every_invisible_character_and_no_other() -> None:
    """Runs of invisible characters are escaped by ``str.translate`` with a table read from their class (a regular
    expression's replacement call for each of them cost ~0.4 ms for a model of 1,024): the table holds each character
    the class matches, and DEL besides (ASCII, which JSON lets stand raw), and only those, each spelled as JSON spells
    it."""
    from llm_telemetry.labels import INVISIBLE
    from llm_telemetry.logs import _ESCAPES

    matched = {0x7F} | {code for code in range(0x80, 0x110000) if INVISIBLE.fullmatch(chr(code))}
    assert set(_ESCAPES) == matched
    assert all(json.loads(f'"{escape}"') == chr(code) for code, escape in _ESCAPES.items())


class _Writes(io.RawIOBase):
    """The file under ``sys.stdout``: records what each write call (one write(2) on a pipe) puts in."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.calls.append(bytes(data))
        return len(data)


@pytest.mark.parametrize(
    ("printed", "model"),
    [
        pytest.param("", "\u202e" * 1024, id="a-long-line"),
        pytest.param("x" * 3900 + "\n", "gpt-4o", id="after-the-app-s-own-output"),
        pytest.param("started\n", "\U000e0041" * 1024, id="a-long-line-after-the-app-s-own-output"),
    ],
)
@pytest.mark.parametrize("through_logging", [False, True], ids=["direct", "through-logging"])
@pytest.mark.usefixtures("request_logger")
def test_each_line_goes_to_stdout_in_one_write_of_its_own(printed: str, model: str, through_logging: bool) -> None:
    """stdout on a pipe, as Python opens it (a 4096-byte buffer, flushed only when full): the line goes out in a
    write call of its own, what the app printed and left in the buffer before it in another, so no write holding a
    line is over MAX_LINE_BYTES. Written directly, and through ``logging`` (a filter on the handler)."""
    from llm_telemetry.logs import RequestLogs

    written = _Writes()
    stdout = io.TextIOWrapper(io.BufferedWriter(written, buffer_size=4096), encoding="utf-8")
    call = LLMCall("chat", "openai", 1.0, request_id="one-write", request_model=model, status_code=200)
    call.end = 1.5
    logs = RequestLogs("svc", env={})
    if through_logging:
        logs.logger.handlers[0].addFilter(lambda record: True)
    try:
        with contextlib.redirect_stdout(stdout):
            print(printed, end="")
            logs.observer.end(call)
    finally:
        logs.shutdown()
    (line,) = [data for data in written.calls if b'"one-write"' in data]
    assert line.startswith(b"{") and line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) <= MAX_LINE_BYTES
    assert b"".join(written.calls) == printed.encode() + line


#: The model a hostile client sends: 1,024 right-to-left overrides, each written as a 6-byte escape.
_LONG_MODEL = "\u202e" * 1024


@pytest.mark.slow
def test_lines_of_several_workers_on_one_slow_pipe_stay_whole(tmp_path: Path) -> None:
    """Three uvicorn workers write to one stdout, a pipe read slowly (a log agent under load: the pipe fills up),
    while half the clients send a model written in over 6 KB. Writes to a full pipe wait for room; one of at most
    PIPE_BUF bytes then goes in whole, a longer one by parts, other workers' lines between them: every line read
    back is whole, one per request, those of the other clients as they sent them."""
    from llm_telemetry.labels import MAX_FIELD_CHARS

    assert len(_LONG_MODEL) == MAX_FIELD_CHARS  # all of it is kept
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    env.update(
        {
            "LLM_TELEMETRY_METRICS_PORT": str(metrics_port),
            "LLM_TELEMETRY_METRICS_HOST": "127.0.0.1",
            "OTEL_TRACES_EXPORTER": "none",
            "TMPDIR": str(tmp_path),  # the workers' shared state
            "PYTHONPATH": os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
            "WORKERS_APP_FIRST_TOKEN_DELAY": "0",
            "WORKERS_APP_TOKEN_DELAY": "0",
        }
    )
    command = [sys.executable, "-m", "uvicorn", "workers_app:app", "--app-dir", str(REPO / "tests" / "apps"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "3", "--no-access-log"]  # fmt: skip
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    assert server.stdout is not None
    read = bytearray()

    def slow_reader(pipe: int) -> None:  # till every process writing to the pipe has exited
        while chunk := os.read(pipe, 700):
            read.extend(chunk)
            time.sleep(0.0005)

    reader = threading.Thread(target=slow_reader, args=(server.stdout.fileno(),))
    reader.start()
    base = f"http://127.0.0.1:{port}"
    sent: dict[str, str] = {}

    def send_requests(number: int) -> None:
        model = _LONG_MODEL if number % 2 else "gpt-4o-mini"
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(40):
                request_id = f"client-{number}-{i}"
                sent[request_id] = model
                response = http.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id})
                assert response.status_code == 200

    try:
        wait_for("the app", lambda: httpx.get(base + "/healthz", timeout=5).status_code == 200)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send_requests, range(8)))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        reader.join()
        server.stdout.close()
    lines = bytes(read).split(b"\n")
    assert lines.pop() == b""  # every line ends with its newline
    logged: dict[str, Any] = {}
    broken = []
    for line in lines:
        try:
            parsed = json.loads(line)
            logged[parsed["request_id"]] = parsed["model"]
        except (ValueError, TypeError, KeyError):
            broken.append(line[:80])
    assert not broken, f"{len(broken)} of {len(lines)} lines broken, e.g. {broken[:3]}"
    assert max(map(len, lines)) < MAX_LINE_BYTES
    assert len(logged) == len(lines) and set(logged) == set(sent)
    for request_id, model in sent.items():
        assert _sent_or_cut(logged[request_id], model), request_id
        assert (logged[request_id] == model) == (model != _LONG_MODEL)


def test_a_request_that_ends_after_the_shutdown_is_still_one_json_line_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A request the server cancelled may end after the middleware's shutdown took its stdout handler off (the
    shutdown waits for such requests, within a bound): its line is JSON on stdout still, not logging's last-resort
    plain text on stderr."""
    from llm_telemetry.logs import RequestLogs

    logger = logging.getLogger(REQUEST_LOGGER)
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers[:] = []
    try:
        logs = RequestLogs("late", env={})
        logs.shutdown()
        assert logger.handlers == []
        call = LLMCall("chat", "openai", 1.0, request_id="late-1", request_model="m", status_code=200)
        call.error_type = "client_disconnect"
        logs.observer.end(call)
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
    captured = capsys.readouterr()
    assert line_for(log_lines(captured.out), "late-1")["error_type"] == "client_disconnect"
    assert "late-1" not in captured.err and "chat m" not in captured.err


def test_an_instance_still_serving_keeps_its_lines_when_the_one_whose_handler_it_shares_shuts_down(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two instances on pipelines of their own share the stdout handler the first put on the request logger. The
    first shutting down took it off while the second still served: the second's lines went to no handler (an INFO
    line lost, an error line plain on stderr). The handler stays until the last instance using it shuts down."""
    from llm_telemetry.logs import RequestLogs

    logger = logging.getLogger(REQUEST_LOGGER)
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers[:], logger.propagate = [], True
    try:
        first, second = RequestLogs("first", env={}), RequestLogs("second", env={})
        first.shutdown()
        for request_id, status in (("live-ok", 200), ("live-err", 502)):
            call = LLMCall("chat", "openai", 1.0, request_id=request_id, request_model="m", status_code=status)
            second.observer.end(call)
        second.shutdown()
        assert (logger.handlers, logger.propagate) == ([], True)
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
    captured = capsys.readouterr()
    lines = log_lines(captured.out)
    assert line_for(lines, "live-ok")["status_code"] == 200 and line_for(lines, "live-err")["status_code"] == 502
    assert captured.err == ""


@pytest.mark.parametrize("order", ["first instance first", "second instance first"])
def test_two_instances_late_lines_are_json_and_the_logger_is_left_as_found(
    capsys: pytest.CaptureFixture[str], order: str
) -> None:
    """Two instances on pipelines of their own: the second finds the first's stdout handler and adds none. Once
    both shut down, a late request of the second was logging's plain last-resort text on stderr; and the logger's
    ``propagate`` ended as the second found it (off), when the second was shut down last."""
    from llm_telemetry.logs import RequestLogs

    logger = logging.getLogger(REQUEST_LOGGER)
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers[:], logger.propagate = [], True
    try:
        first, second = RequestLogs("first", env={}), RequestLogs("second", env={})
        for logs in (first, second) if order == "first instance first" else (second, first):
            logs.shutdown()
        assert (logger.handlers, logger.propagate) == ([], True)
        for name, logs in (("a", first), ("b", second)):
            call = LLMCall("chat", "openai", 1.0, request_id=f"late-{name}", request_model="m", status_code=200)
            call.error_type = "client_disconnect"
            logs.observer.end(call)
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
    captured = capsys.readouterr()
    lines = log_lines(captured.out)
    assert line_for(lines, "late-a")["error_type"] == line_for(lines, "late-b")["error_type"] == "client_disconnect"
    assert "chat m" not in captured.err
