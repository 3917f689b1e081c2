"""One line in Starlette, FastAPI, Litestar and Quart (the last two not built on Starlette) gives the same metrics;
streams sent with ``sse-starlette`` are read too."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi import Request as FastAPIRequest
from litestar import Litestar, post
from litestar import Request as LitestarRequest
from litestar import Response as LitestarResponse
from litestar.middleware import DefineMiddleware
from litestar.response import Stream
from starlette.responses import JSONResponse, StreamingResponse

from llm_telemetry import LLMTelemetryMiddleware
from support import FRESH, RECORDED_WITHIN, Calls, Metrics, free_port, scrape, serve, wait_for, whole_after

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def completion(model: str) -> dict[str, Any]:
    return {
        "id": "c1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    }  # fmt: skip


async def chunks(model: str) -> AsyncIterator[bytes]:
    """A chat stream as OpenAI sends it: deltas, the finish reason, the usage, ``[DONE]``. (The finish reason makes
    the answer read to its own end: a client that closes right after ``[DONE]``, before the server's last empty
    message, is then no client disconnect, whatever the timing.)"""
    steps = ({"role": "assistant"}, None), ({"content": "one "}, None), ({"content": "two"}, None), ({}, "stop")
    for delta, finish in steps:
        obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        yield b"data: " + json.dumps(obj).encode() + b"\n\n"
    final = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}  # fmt: skip
    yield b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n"


def settled(metrics_port: int, requests: int) -> Metrics:
    """The scrape once ``requests`` LLM requests are counted (a call is recorded just after its response went out),
    or the last one after RECORDED_WITHIN seconds."""
    deadline = time.monotonic() + RECORDED_WITHIN
    while True:
        metrics = scrape(metrics_port)
        if metrics.value("llm_requests_total") >= requests:
            return whole_after(metrics_port)
        if time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def starlette_app(metrics_port: int) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(chunks(body["model"]), media_type="text/event-stream")
        return JSONResponse(completion(body["model"]))

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.add_middleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    return app


def fastapi_app(metrics_port: int) -> Any:
    app = FastAPI()

    @app.post("/openai/v1/chat/completions")  # a gateway prefix: matched by suffix
    async def chat(request: FastAPIRequest) -> Any:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(chunks(body["model"]), media_type="text/event-stream")
        return JSONResponse(completion(body["model"]))

    app.add_middleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    return app


def litestar_app(metrics_port: int, compression: Any = None) -> Any:
    @post("/v1/chat/completions", status_code=200)
    async def chat(request: LitestarRequest[Any, Any, Any]) -> LitestarResponse[Any] | Stream:
        body = await request.json()
        if body.get("stream"):
            return Stream(chunks(body["model"]), media_type="text/event-stream")
        return LitestarResponse(completion(body["model"]))

    middleware = DefineMiddleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    return Litestar(route_handlers=[chat], middleware=[middleware], compression_config=compression)


def litestar_brotli_app(metrics_port: int) -> Any:
    """Litestar compressing its answers with brotli, streams included (one flush per chunk)."""
    from litestar.config.compression import CompressionConfig

    return litestar_app(metrics_port, CompressionConfig(backend="brotli", minimum_size=1))


def quart_app(metrics_port: int) -> Any:
    """Quart (Flask's API on ASGI): the app object wrapped, as for any ASGI 3 app."""
    from quart import Quart, Response, request

    app = Quart(__name__)

    @app.post("/v1/chat/completions")
    async def chat() -> Any:
        body = await request.get_json()
        if body.get("stream"):
            return Response(chunks(body["model"]), mimetype="text/event-stream")
        return completion(body["model"])

    return LLMTelemetryMiddleware(app, metrics_port=metrics_port, metrics_host="127.0.0.1")


FRAMEWORKS: dict[str, tuple[Callable[[int], Any], str]] = {
    "starlette": (starlette_app, "/v1"),
    "fastapi": (fastapi_app, "/openai/v1"),
    "litestar": (litestar_app, "/v1"),
    "litestar+brotli": (litestar_brotli_app, "/v1"),
    "quart": (quart_app, "/v1"),
}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_framework_stream_and_non_stream(framework: str) -> None:
    build, prefix = FRAMEWORKS[framework]
    metrics_port = free_port()
    with serve(build(metrics_port)) as base:
        client = openai.OpenAI(base_url=base + prefix, api_key="t", max_retries=0)
        coding = "br" if framework.endswith("+brotli") else None
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers.get("content-encoding") == coding
        assert raw.parse().choices[0].message.content == "one two three"
        raw_stream = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert raw_stream.headers.get("content-encoding") == coding
        streamed = raw_stream.parse()
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "one two"
        metrics = settled(metrics_port, 2)
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o-mini", gen_ai_request_stream="false") == 1
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o-mini", gen_ai_request_stream="true") == 1
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input") == 10
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output") == 5
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count") == 1


def test_a_client_leaving_mid_stream_through_base_http_middleware_is_a_disconnect() -> None:
    """FastAPI's ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware) inside ours does not raise when the
    client leaves mid-stream: it ends the response early with a last empty message. That is still a client
    disconnect; whole streams, a chat answer and embeddings through the same stack are not."""
    import httpx

    from llm_telemetry.demo.app import bare_app
    from support import scrape_text

    api = FastAPI()

    @api.middleware("http")
    async def tag(request: FastAPIRequest, call_next: Callable[..., Any]) -> Any:
        response = await call_next(request)
        response.headers["x-tagged"] = "1"
        return response

    api.mount("/", bare_app(token_delay=0.02))
    app = LLMTelemetryMiddleware(api, metrics_port=0, metrics_app_path="/metrics", request_logs=False)
    with serve(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        for _ in range(3):
            stream = client.chat.completions.create(
                model="whole", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            assert len([chunk for chunk in stream]) > 5
        client.chat.completions.create(model="whole", messages=[{"role": "user", "content": "hi"}])
        client.embeddings.create(model="whole-embed", input=["one", "two"])
        body = {"model": "left", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body) as response:
            assert response.headers["x-tagged"] == "1"
            next(response.iter_raw())  # the first chunk, then the client goes
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while Metrics(scrape_text(port, FRESH)).value("llm_requests_total") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = Metrics(scrape_text(port, FRESH))
    assert metrics.value("llm_requests_total") == 6
    assert metrics.value("llm_errors_total", gen_ai_request_model="left", error_type="client_disconnect") == 1
    assert metrics.value("llm_errors_total") == 1


WHOLE_JSON = json.dumps(completion("m")).encode()
EMBEDDING = {"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}
EMBEDDINGS = json.dumps(
    {"object": "list", "data": [EMBEDDING], "model": "m", "usage": {"prompt_tokens": 3, "total_tokens": 3}}
).encode()
WHOLE_STREAM = [
    b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
]


@pytest.mark.parametrize(
    ("path", "content_type", "pieces", "error_type"),
    [
        ("/v1/chat/completions", "application/json", [WHOLE_JSON], None),
        ("/v1/chat/completions", "application/json", [WHOLE_JSON[:40]], "client_disconnect"),
        ("/v1/embeddings", "application/json", [EMBEDDINGS], None),  # no finish reason: the whole body tells
        ("/v1/embeddings", "application/json", [EMBEDDINGS[:60]], "client_disconnect"),
        ("/v1/chat/completions", "text/event-stream", WHOLE_STREAM, None),
        ("/v1/chat/completions", "text/event-stream", WHOLE_STREAM[:1], "client_disconnect"),
    ],
    ids=["json-whole", "json-cut", "embeddings-whole", "embeddings-cut", "stream-whole", "stream-cut"],
)
def test_an_answer_ended_after_the_client_left_is_a_disconnect_unless_it_was_whole(
    path: str, content_type: str, pieces: list[bytes], error_type: str | None
) -> None:
    """The server reports ``http.disconnect`` before the app's last (empty) message, as it does when a client
    leaves, or closes as soon as it has read what it needs: the call is a client disconnect unless the answer read
    had reached its own end (a finish reason, a JSON body read whole)."""
    import asyncio

    from support import Calls

    calls = Calls()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type.encode())]}
        )
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, request_logs=False, observers=[calls])
    incoming = [{"type": "http.request", "body": b'{"model": "m"}', "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    try:
        asyncio.run(wrapped(scope, receive, send))
    finally:
        wrapped.telemetry.shutdown()
    assert [call.error_type for call in calls.ended] == [error_type]


def test_sse_starlette_streams_with_pings_and_crlf_are_read() -> None:
    """``sse-starlette``'s ``EventSourceResponse``, which many Python LLM servers stream with: it ends lines with
    CRLF and sends ``: ping`` comments while the model is still thinking. A ping is not a first token, and both APIs'
    streams are read as the SDKs read them."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    thinking = 0.15  # before the first token, with a ping every 10 ms

    async def chat(request: Request) -> EventSourceResponse:
        model = (await request.json())["model"]

        async def events() -> AsyncIterator[str]:
            await asyncio.sleep(thinking)
            async for chunk in chunks(model):
                for event in chunk.decode().split("\n\n"):
                    if event:
                        yield event.removeprefix("data: ")

        return EventSourceResponse(events(), ping=0.01)

    async def messages(request: Request) -> EventSourceResponse:
        model = (await request.json())["model"]
        stream = [
            ("message_start", {"type": "message_start", "message": {
                "id": "m1", "type": "message", "role": "assistant", "model": model, "content": [],
                "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "one two"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 2}}),
            ("message_stop", {"type": "message_stop"}),
        ]  # fmt: skip

        async def events() -> AsyncIterator[dict[str, str]]:
            for kind, data in stream:
                if kind == "content_block_delta":
                    await asyncio.sleep(thinking)
                yield {"event": kind, "data": json.dumps(data)}

        return EventSourceResponse(events(), ping=0.01)

    calls = Calls()
    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/messages", messages, methods=["POST"])]
    app = LLMTelemetryMiddleware(Starlette(routes=routes), metrics_port=0, request_logs=False, observers=[calls])
    with serve(app) as base:
        raw = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "stream": True}).content
        assert b": ping" in raw.split(b"data:")[0] and b"\r\n\r\n" in raw  # what this test is about
        client = openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                stream=True)  # fmt: skip
        (usage,) = [chunk.usage for chunk in stream if chunk.usage]
        claude = anthropic.Anthropic(base_url=base, api_key="t", max_retries=0)
        with claude.messages.stream(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]) as s:
            message = s.get_final_message()
        deadline = time.monotonic() + RECORDED_WITHIN
        while len(calls.ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    _, openai_call, anthropic_call = calls.ended
    assert (openai_call.input_tokens, openai_call.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert (anthropic_call.input_tokens, anthropic_call.output_tokens) == (9, message.usage.output_tokens)
    assert anthropic_call.finish_reasons == ["end_turn"]
    for call in (openai_call, anthropic_call):
        assert call.usage_source == "reported" and call.error_type is None
        ttft = call.time_to_first_token
        assert ttft is not None and ttft >= thinking  # the pings before it are not tokens


def test_a_background_task_failing_after_a_whole_answer_leaves_the_call_a_success() -> None:
    """FastAPI's BackgroundTasks run after the response went out (a usage record written to a database, say). When
    one fails, the server logs it, but the client already had the whole answer: the LLM call succeeded, for a
    stream and a non-stream alike. An app failing before its answer was whole is still an ``app_exception``."""

    def record_usage() -> None:
        raise ConnectionError("usage database unreachable")

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: FastAPIRequest, tasks: BackgroundTasks) -> Any:
        body = await request.json()
        tasks.add_task(record_usage)
        if body.get("stream"):
            return StreamingResponse(chunks(body["model"]), media_type="text/event-stream", background=tasks)
        return JSONResponse(completion(body["model"]), background=tasks)

    @app.post("/v1/embeddings")
    async def broken(request: FastAPIRequest) -> Any:
        await request.json()
        raise RuntimeError("the app's own failure")

    metrics_port = free_port()
    app.add_middleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False)
    with serve(app) as base:

        def client() -> openai.OpenAI:  # a connection of its own: uvicorn closes one whose app raised
            return openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)

        answer = client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "one two three"
        stream = client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "one two"
        with pytest.raises(openai.InternalServerError):
            client().embeddings.create(model="text-embedding-3-small", input="x")
        metrics = settled(metrics_port, 3)
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o-mini", error_type="") == 2
    assert metrics.value("llm_errors_total", gen_ai_request_model="gpt-4o-mini") == 0
    assert (
        metrics.value("llm_errors_total", gen_ai_request_model="text-embedding-3-small", error_type="app_exception")
        == 1
    )


def test_several_instances_in_one_process_serve_one_set_of_metrics() -> None:
    """Litestar makes one middleware instance per route handler of ``middleware=[...]``, and an app may add the
    middleware to each of its mounted sub-apps: instances with the same settings record into the same metrics, on
    the one port, instead of all but the first failing to bind it and recording where nothing is scraped. One with
    other settings says so."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    litestar_port, fastapi_port = free_port(), free_port()

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: LitestarRequest[Any, Any, Any]) -> LitestarResponse[Any]:
        body = await request.json()
        usage = {"prompt_tokens": 2, "total_tokens": 2}
        return LitestarResponse({"object": "list", "data": [], "model": body["model"], "usage": usage})

    litestar = litestar_app(litestar_port)
    litestar.register(embeddings)  # a second handler: a second instance of the middleware

    def sub_app() -> FastAPI:
        sub = FastAPI()

        @sub.post("/v1/chat/completions")
        async def chat(request: FastAPIRequest) -> Any:
            return JSONResponse(completion((await request.json())["model"]))

        sub.add_middleware(LLMTelemetryMiddleware, metrics_port=fastapi_port, metrics_host="127.0.0.1")
        return sub

    outer = Starlette(routes=[Mount("/a", app=sub_app()), Mount("/b", app=sub_app())])
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with serve(litestar) as litestar_base, serve(outer) as outer_base:
        assert httpx.post(litestar_base + "/v1/chat/completions", json=body).status_code == 200
        embedded = httpx.post(litestar_base + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
        assert embedded.status_code == 200
        for prefix in ("/a", "/a", "/b", "/b", "/b"):
            assert httpx.post(outer_base + prefix + "/v1/chat/completions", json=body).status_code == 200
        counted = (
            settled(litestar_port, 2).value("llm_requests_total"),
            settled(fastapi_port, 5).value("llm_requests_total"),
        )
    assert counted == (2, 5)

    # (The servers' lifespans shut those down.) Now one instance holds the port, and another comes with other
    # settings: it cannot share, and says why its metrics will not be served.
    holder = LLMTelemetryMiddleware(
        lambda *a: None,  # type: ignore[arg-type]
        metrics_port=fastapi_port,
        metrics_host="127.0.0.1",
        max_label_values=7,
    )
    other = LLMTelemetryMiddleware(lambda *a: None, metrics_port=fastapi_port, metrics_host="127.0.0.1")  # type: ignore[arg-type]
    # (Litestar's logging setup replaces the root logger's handlers, pytest's capture among them: listen here.)
    warned: list[str] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("llm_telemetry").addHandler(listener)
    try:
        assert holder.telemetry is not other.telemetry
        assert any("with other settings" in message for message in warned)
        # And only that: not also a failed bind of the port this process holds (retried every second), whose advice
        # (several workers of one server) does not apply.
        assert not [message for message in warned if "listener" in message], warned
    finally:
        logging.getLogger("llm_telemetry").removeHandler(listener)
        for middleware in (other, holder):
            middleware.telemetry.shutdown()


def test_nested_instances_count_each_request_once() -> None:
    """The middleware around the whole app and again in a mounted sub-app (two teams each added it): each request
    is observed by the outer one only, so requests and tokens are what the client was answered, not twice that."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    port = free_port()
    sub = FastAPI()

    @sub.post("/v1/chat/completions")
    async def chat(request: FastAPIRequest) -> Any:
        return JSONResponse(completion((await request.json())["model"]))

    sub.add_middleware(LLMTelemetryMiddleware, metrics_port=port, metrics_host="127.0.0.1")
    outer = Starlette(routes=[Mount("/openai", app=sub)])
    outer.add_middleware(LLMTelemetryMiddleware, metrics_port=port, metrics_host="127.0.0.1")
    with serve(outer) as base:
        client = openai.OpenAI(base_url=base + "/openai/v1", api_key="sk-test", max_retries=0)
        answers = [
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            for _ in range(3)
        ]
        metrics = settled(port, 3)
        time.sleep(0.2)  # (a second count of the last request would be in by now)
        metrics = whole_after(port)
    assert metrics.value("llm_requests_total") == 3
    assert metrics.value("llm_tokens_total", gen_ai_token_type="input") == sum(a.usage.prompt_tokens for a in answers)
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output") == sum(
        a.usage.completion_tokens for a in answers
    )


def test_an_event_stream_labelled_as_json_is_read_as_the_stream_it_is() -> None:
    """Litestar sends a ``ServerSentEvent`` from a handler typed to return ``Any`` (as an endpoint answering JSON or a
    stream, by the request, is typed) with ``content-type: application/json``. The openai SDK reads it as a stream
    all the same; so must the middleware: tokens, first token, model."""
    from litestar.response import ServerSentEvent

    def events(model: str) -> Any:
        for chunk in chunks_list(model):
            yield chunk.removeprefix(b"data: ").strip().decode()

    @post("/v1/chat/completions", status_code=200)
    async def chat(data: dict[str, Any]) -> Any:
        return ServerSentEvent(events(data["model"]))

    metrics_port = free_port()
    app = LLMTelemetryMiddleware(
        Litestar(route_handlers=[chat]), metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False
    )
    with serve(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert raw.headers["content-type"].startswith("application/json")  # the label this test is about
        streamed = list(raw.parse())
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "one two"
        metrics = settled(metrics_port, 1)
    assert metrics.value("llm_requests_total", gen_ai_response_model="gpt-4o-mini", gen_ai_request_stream="true") == 1
    assert metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 2
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count") == 1


def chunks_list(model: str) -> list[bytes]:
    """The events of :func:`chunks`, one each (the last piece holds two: the usage and ``[DONE]``)."""

    async def collect() -> list[bytes]:
        return [piece async for piece in chunks(model)]

    pieces = asyncio.run(collect())
    return [event + b"\n\n" for piece in pieces for event in piece.split(b"\n\n") if event]


def test_a_websocket_session_passes_through_untouched_and_uncounted() -> None:
    """A Realtime-style WebSocket beside the HTTP routes (``/v1/realtime``): its frames arrive byte for byte, both
    ways, and nothing is counted for it, as docs/metrics.md says (the middleware reads HTTP requests only)."""
    from starlette.applications import Starlette
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket
    from websockets.sync.client import connect

    async def realtime(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="realtime")
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"][::-1])
            else:
                await websocket.send_text(message["text"].upper())

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse(completion("m"))

    calls = Calls()
    api = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), WebSocketRoute("/v1/realtime", realtime)]
    )
    app = LLMTelemetryMiddleware(
        api, metrics_port=0, metrics_app_path="/metrics", request_logs=False, observers=[calls]
    )
    event = json.dumps({"type": "response.create", "response": {"modalities": ["text"]}})
    with serve(app) as base:
        url = base.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
        with connect(url, subprotocols=["realtime"]) as websocket:  # type: ignore[list-item]
            assert websocket.subprotocol == "realtime"
            websocket.send(event)
            assert websocket.recv() == event.upper()
            websocket.send(b"\x00\xffaudio")
            assert websocket.recv() == b"oidua\xff\x00"
        openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        # The chat call is recorded just after its last byte went out: wait for it, then for its scrape.
        wait_for("the chat call recorded", lambda: calls.ended, RECORDED_WITHIN)
        metrics = whole_after(int(base.rsplit(":", 1)[1]), "/metrics")
    assert [call.path for call in calls.ended] == ["/v1/chat/completions"]
    assert metrics.value("llm_requests_total") == 1
