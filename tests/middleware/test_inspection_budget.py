"""The process-wide budget of bytes kept to be read (``max_inspected_bytes``): request bodies' pieces and JSON
answers' copies, over every request in flight. Each is bounded per request (``max_request_bytes``, 8 MiB of a JSON
answer); without this bound, N connections sending large bodies, or reading a large answer slowly, kept N times that
alive. A body past the budget is passed on unread, as one over its own limit is, and every byte a request took is
given back when it ends, however it ends: a byte kept for good would turn reading off for every later request.

Served by real uvicorn, called by the official openai SDK and raw HTTP clients; the interleavings (clients leaving,
apps raising or returning early, requests cancelled, mid-body and mid-answer) under hypothesis."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import UNCOUNTED_BYTES
from llm_telemetry.middleware import BODY_PIECE_OVERHEAD, BUDGET, STALLED_SECONDS
from support import Calls, free_port, scrape, serve, stop_process, wait_for

USAGE = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
UNREAD = "llm_telemetry_unread_bodies_total"
REQUESTS = "llm_requests_total"


def unread(port: int, body: str, reason: str) -> float:
    """``llm_telemetry_unread_bodies_total`` of ``body`` for ``reason`` on the metrics port ``port``."""
    return scrape(port).value(UNREAD, llm_telemetry_body=body, llm_telemetry_reason=reason)


class Gate:
    """Holds each request that arrives until ``n`` have: so that their bodies are all kept at the same time."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.event: asyncio.Event | None = None

    async def arrive(self) -> None:
        if self.event is None:
            self.event = asyncio.Event()  # (on the server's loop)
        self.count += 1
        if self.count >= self.n:
            self.event.set()
        await asyncio.wait_for(self.event.wait(), 30)


def _answer(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": USAGE,
    }


def _chat_app(gate: Gate) -> Starlette:
    async def chat(request: Request) -> Response:
        await request.body()
        await gate.arrive()
        return JSONResponse(_answer("served-model", "hello"))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_request_bodies_kept_at_once_over_all_connections_stay_within_the_budget() -> None:
    """Three concurrent requests of 400 KB each, held by the app until all three have been read, under a budget of
    600 KB: one body is read (its model is the one asked for), the other two pass unread, recorded without their
    request fields (the model that answered), as a body over ``max_request_bytes`` is. The SDK gets every answer
    whole. Once they end, the budget is whole again: a fourth request alone is read.
    ``llm_telemetry_unread_bodies_total`` counts the two bodies."""
    before = BUDGET.held
    calls = Calls()
    gate = Gate(3)
    port = free_port()
    app = LLMTelemetryMiddleware(_chat_app(gate), metrics_port=port, max_inspected_bytes=600_000, observers=[calls])
    prompt = "x" * 400_000

    async def ask(base: str, n: int) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
            answers = await asyncio.gather(*(
                client.chat.completions.create(model="asked-model", messages=[{"role": "user", "content": prompt}])
                for _ in range(n)
            ))  # fmt: skip
        return [answer.choices[0].message.content or "" for answer in answers]

    with serve(app, http="h11") as base:
        assert asyncio.run(ask(base, 3)) == ["hello"] * 3
        wait_for("three calls recorded", lambda: len(calls.ended) == 3)
        assert sorted(str(call.request_model) for call in calls.ended) == ["None", "None", "asked-model"]
        assert all(call.input_tokens == 7 and call.output_tokens == 9 for call in calls.ended)
        assert BUDGET.held == before
        assert (unread(port, "request", "budget"), unread(port, "response", "budget")) == (2, 0)

        gate.n = 1
        assert asyncio.run(ask(base, 1)) == ["hello"]
        wait_for("the fourth call recorded", lambda: len(calls.ended) == 4)
        assert calls.ended[3].request_model == "asked-model"
        assert unread(port, "request", "budget") == 2
    assert BUDGET.held == before


def _pieces_app(gate: Gate, answer: bytes, seen: list[int]) -> Starlette:
    async def chat(request: Request) -> Response:
        await request.body()

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(answer), 65536):
                yield answer[at : at + 65536]
            if gate.count == gate.n - 1:
                seen.append(BUDGET.held)  # the last to arrive: every answer kept as it is while both are in flight
            await gate.arrive()  # every answer sent (and kept) but for its closing message, before any ends

        return StreamingResponse(pieces(), media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_json_answers_sent_in_pieces_share_the_budget(http: str) -> None:
    """Two JSON answers of 400 KB sent in 64 KiB pieces at once, under a budget of 600 KB: the one that would pass it
    is read as an answer over 8 MiB is, for its usage alone (its tokens are counted, its model is not read), and gives
    back what it had kept at once; the other is read whole. Each client gets the app's bytes exactly. Afterwards the
    budget is whole again."""
    before = BUDGET.held
    calls = Calls()
    gate = Gate(2)
    answer = json.dumps(_answer("served-model", "y" * 400_000)).encode()
    seen: list[int] = []
    port = free_port()
    app = LLMTelemetryMiddleware(
        _pieces_app(gate, answer, seen), metrics_port=port, max_inspected_bytes=600_000, observers=[calls]
    )

    async def ask(base: str, n: int) -> list[bytes]:
        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(*(
                client.post(f"{base}/v1/chat/completions", json={"model": "asked-model", "messages": []})
                for _ in range(n)
            ))  # fmt: skip
        return [reply.content for reply in replies]

    with serve(app, http=http) as base:
        assert asyncio.run(ask(base, 2)) == [answer, answer]
        wait_for("two calls recorded", lambda: len(calls.ended) == 2)
        assert sorted(str(call.response_model) for call in calls.ended) == ["None", "served-model"]
        assert all(call.input_tokens == 7 and call.output_tokens == 9 for call in calls.ended)
        assert all(call.request_model == "asked-model" for call in calls.ended)
        # While both were in flight, only the answer read whole was counted: the other gave back what it had kept
        # when it stopped keeping it (the first UNCOUNTED_BYTES of each are never counted; the requests are small).
        assert [held - before for held in seen] == [len(answer) - UNCOUNTED_BYTES]
        assert BUDGET.held == before
        assert (unread(port, "response", "budget"), unread(port, "request", "budget")) == (1, 0)

        gate.n = 1
        assert asyncio.run(ask(base, 1)) == [answer]
        wait_for("the third call recorded", lambda: len(calls.ended) == 3)
        assert calls.ended[2].response_model == "served-model"
    assert BUDGET.held == before


# --- hostile interleavings ------------------------------------------------------------------------------------


class ClientGone(OSError):
    """What a server's ``send`` raises once the client has left."""


#: What an app does with its request: read the body whole and answer in pieces; or stop after ``stop`` pieces of the
#: body, or of the answer, by raising, by returning, or by being cancelled.
ENDINGS = ["answer", "raise_in_body", "return_in_body", "raise_in_answer", "cancel"]

requests_strategy = st.lists(
    st.fixed_dictionaries({
        "pieces": st.lists(st.integers(1, 60_000), min_size=1, max_size=6),
        "answer": st.lists(st.integers(1, 60_000), min_size=1, max_size=5),
        "ending": st.sampled_from(ENDINGS),
        "stop": st.integers(0, 8),
        "client_leaves_at": st.none() | st.integers(0, 8),
        "streamed": st.booleans(),
    }),
    min_size=1,
    max_size=6,
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=requests_strategy, limit=st.integers(0, 300_000), ticks=st.lists(st.integers(0, 3), max_size=12))
def test_every_byte_taken_is_given_back_however_the_requests_end(
    requests: list[dict[str, Any]], limit: int, ticks: list[int]
) -> None:
    """Concurrent requests on one event loop, interleaved at every body piece and answer piece: clients that leave
    mid-body (``http.disconnect``) or mid-answer (``send`` raising), apps that raise or return before reading the
    whole body, raise mid-answer, or are cancelled at any point. At every step the bytes kept stay within the budget;
    when all have ended, every byte taken is given back; and each client got the app's bytes as sent."""
    before = BUDGET.held
    checks: list[int] = []

    def check() -> None:
        checks.append(BUDGET.held - before)  # (asserted at the end: raised here, the app would take it for its own)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        spec = scope["spec"]
        ending, stop = spec["ending"], spec["stop"]
        got = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
            got += 1
            if ending in ("raise_in_body", "return_in_body") and got > stop:
                if ending == "raise_in_body":
                    raise RuntimeError("the app failed mid-body")
                return
        content_type = b"text/event-stream" if spec["streamed"] else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        pieces = spec["answer"]
        for n, size in enumerate(pieces):
            if ending == "raise_in_answer" and n == stop:
                raise RuntimeError("the app failed mid-answer")
            piece = (b"data: {}\n\n" if spec["streamed"] else b" ") * size
            await send({"type": "http.response.body", "body": piece, "more_body": n < len(pieces) - 1})

    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, max_inspected_bytes=limit, request_logs=False)

    async def one(spec: dict[str, Any]) -> None:
        pieces = spec["pieces"]
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "z" * sum(pieces)}]}).encode()
        cuts = [0, *(min(len(body), sum(pieces[: i + 1])) for i in range(len(pieces) - 1)), len(body)]
        leaves = spec["client_leaves_at"]
        delivered = 0
        sent = 0

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            check()
            await asyncio.sleep(0)
            if (leaves is not None and delivered >= leaves) or delivered >= len(cuts) - 1:
                if delivered < len(cuts) - 1 or leaves is not None:
                    return {"type": "http.disconnect"}
                await asyncio.sleep(3600)  # a real server's receive waits for the client to leave
            piece = body[cuts[delivered] : cuts[delivered + 1]]
            delivered += 1
            return {"type": "http.request", "body": piece, "more_body": delivered < len(cuts) - 1}

        async def send(message: dict[str, Any]) -> None:
            nonlocal sent
            check()
            await asyncio.sleep(0)
            if message["type"] == "http.response.body":
                sent += 1
                if leaves is not None and sent > leaves:
                    raise ClientGone("the client left mid-answer")

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 2), "spec": spec}  # fmt: skip
        await wrapped(scope, receive, send)

    async def run() -> None:
        tasks = [asyncio.create_task(one(spec)) for spec in requests]
        for tick, (spec, task) in zip(ticks, zip(requests, tasks, strict=True), strict=False):
            for _ in range(tick):
                await asyncio.sleep(0)
            if spec["ending"] == "cancel":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    check()
    assert all(0 <= held <= limit for held in checks), checks
    assert BUDGET.held == before


def test_a_body_past_the_budget_gives_back_what_it_had_taken_at_once() -> None:
    """A request whose body stops being kept part-way (the budget full) gives back the pieces it had kept then, not
    when it ends: while its app works on it, it keeps nothing. A body costs its length and the overhead each piece is
    counted with, past the first UNCOUNTED_BYTES a request keeps uncounted; given back once the answer is whole (the
    app may go on, with background tasks)."""
    before = BUDGET.held
    kept: list[int] = []
    after: list[int] = []
    calls = Calls()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        kept.append(BUDGET.held - before)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(_answer("served-model", "ok")).encode()})
        after.append(BUDGET.held - before)  # (what the app does after its answer: Starlette's background tasks)

    limit = 100_000
    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, max_inspected_bytes=limit, observers=[calls])

    def receiver(pieces: list[bytes]) -> Any:
        async def receive() -> dict[str, Any]:
            if pieces:
                piece = pieces.pop(0)
                return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        return receive

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    big = json.dumps({"model": "big-model", "messages": [{"role": "user", "content": "b" * 200_000}]}).encode()
    small = json.dumps({"model": "small-model", "messages": [{"role": "user", "content": "s" * 100_000}]}).encode()

    async def run() -> None:
        # The big body's first piece fits, its second does not: dropped, and what it kept given back at once.
        await wrapped(dict(scope), receiver([big[:100_000], big[100_000:]]), send)
        await wrapped(dict(scope), receiver([small]), send)

    asyncio.run(run())
    assert kept[0] == 0  # the big body's first piece given back when its second did not fit
    assert kept[1] == len(small) + BODY_PIECE_OVERHEAD - UNCOUNTED_BYTES
    assert after == [0, 0]  # given back once the answer is whole, not when the app returns
    assert [call.request_model for call in calls.ended] == [None, "small-model"]
    assert BUDGET.held == before


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_body_read_in_part_is_let_go_of_once_the_answer_is_whole(http: str) -> None:
    """An app that reads part of a large body, answers, and goes on working (a background task): the call is recorded
    when its answer is whole, and its budget given back then; so the pieces it had kept must be let go of then too,
    or they stay alive uncounted for as long as the app runs (every such request up to ``max_request_bytes`` past
    the budget). While the background task runs, nothing but the app holds the pieces it read."""
    before = BUDGET.held
    calls = Calls()
    held: list[int] = []
    holders: list[list[str]] = []

    async def chat(request: Request) -> Response:
        mine: list[bytes] = []
        async for piece in request.stream():
            mine.append(piece)
            if sum(map(len, mine)) > 1_000_000:
                break  # (an app that stops reading part-way: an upstream that failed early, say)

        def later() -> None:
            gc.collect()
            held.append(BUDGET.held)
            holders.append([type(holder).__name__ for holder in gc.get_referrers(*mine) if holder is not mine])

        return JSONResponse(_answer("served-model", "ok"), background=BackgroundTask(later))

    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), metrics_port=0, observers=[calls]
    )
    prompt = "x" * 3_000_000

    async def ask(base: str) -> str:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
            answer = await client.chat.completions.create(
                model="asked-model", messages=[{"role": "user", "content": prompt}]
            )
        return answer.choices[0].message.content or ""

    with serve(app, http=http) as base:
        assert asyncio.run(ask(base)) == "ok"
        wait_for("the background task run", lambda: holders)
        wait_for("the call recorded", lambda: calls.ended)
    assert calls.ended[0].request_model is None  # (the body was not read whole: not read)
    assert calls.ended[0].input_tokens == 7
    assert held == [before]
    assert holders == [[]]
    assert BUDGET.held == before


def test_a_json_answers_request_is_freed_without_the_garbage_collector() -> None:
    """Each request's state (its body's pieces, its answer's copy) goes when the request ends, by reference counting
    alone: the reader of a JSON answer counts its copy against the budget through the request's state, and a cycle
    between the two left to the garbage collector would keep every answer's state alive until a collection (and
    without one, for good). With the collector off, none of the requests' states is left once they are recorded."""
    from llm_telemetry.middleware import _Exchange

    calls = Calls()
    app = LLMTelemetryMiddleware(_chat_app(Gate(1)), metrics_port=0, observers=[calls])

    def alive() -> int:
        """The states of this test's requests still alive (other tests' in this process are not looked at)."""
        ours = {id(call) for call in calls.ended}
        return sum(type(thing) is _Exchange and id(thing.call) in ours for thing in gc.get_objects())

    async def ask(base: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
            answers = [
                await client.chat.completions.create(model="asked-model", messages=[{"role": "user", "content": p}])
                for p in ("short", "y" * (UNCOUNTED_BYTES + 10_000))  # (the second's body is counted: see hold)
            ]
        return [answer.choices[0].message.content or "" for answer in answers]

    with serve(app) as base:
        gc.collect()
        gc.disable()
        try:
            assert asyncio.run(ask(base)) == ["hello", "hello"]
            wait_for("the calls recorded", lambda: len(calls.ended) == 2)
            wait_for("no request state left with the garbage collector off", lambda: alive() == 0, seconds=5)
        finally:
            gc.enable()


# --- clients that stall: they do not read their answer, or stop sending their body ---------------------------------


def _tool_answer(model: str, content: str) -> bytes:
    answer = _answer(model, content)
    answer["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    ]
    answer["choices"][0]["finish_reason"] = "tool_calls"
    return json.dumps(answer).encode()


def _gateway_app(sizes: dict[str, int]) -> Starlette:
    """A gateway: it hands on its upstream's JSON answer in 64 KiB pieces, as they come, with a tool call in it (the
    answer's size by the model asked for)."""

    async def chat(request: Request) -> Response:
        asked = (await request.json())["model"]
        answer = _tool_answer(f"{asked}-served", "y" * sizes.get(asked, 10))

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(answer), 65536):
                yield answer[at : at + 65536]

        return StreamingResponse(pieces(), media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def _post(base: str, body: bytes, length: int | None = None) -> socket.socket:
    """A raw connection that sends a chat request's head and ``body`` (declaring ``length`` bytes) and reads nothing."""
    port = int(base.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body) if length is None else length}\r\nconnection: close\r\n\r\n"
    )
    connection.sendall(head.encode() + body)
    return connection


def _reply(connection: socket.socket) -> bytes:
    """The body of the answer on ``connection``, read now (de-chunked)."""
    reply = http.client.HTTPResponse(connection)
    reply.begin()
    body = reply.read()
    connection.close()
    return body


def _settled_held() -> int:
    """BUDGET.held once it has stopped moving (the clients' connections took what they could)."""
    last = -1
    while BUDGET.held != last:
        last = BUDGET.held
        time.sleep(0.5)
    return last


def test_clients_that_do_not_read_their_answers_give_the_budget_up_once_stalled() -> None:
    """Two clients ask a gateway for JSON answers of 8 MB, sent in pieces, and read none of them: each holds what the
    kernel's socket buffers took of its answer (~3 MiB) in the budget, for as long as its connection lives. A client
    of the openai SDK asking later for an answer larger than what is left of the budget (a tool call in it) still gets
    that answer read whole, its tool call and served model counted: the stalled answers (no progress for
    STALLED_SECONDS) give their copies up to it, and are read from then on as an answer past the budget is, for their
    usage (counted in ``llm_telemetry_unread_bodies_total`` as stalled). Every client gets the app's bytes exactly;
    afterwards the budget is whole again. (Before, the stalled
    clients kept the budget, and the later answer was read only for its usage: no tool call, no served model.)"""
    before = BUDGET.held
    calls = Calls()
    limit = 8 * 1024 * 1024
    sizes = {"hog": 8_000_000}
    port = free_port()
    app = LLMTelemetryMiddleware(_gateway_app(sizes), metrics_port=port, max_inspected_bytes=limit, observers=[calls])
    request = json.dumps({"model": "hog", "messages": [{"role": "user", "content": "x"}]}).encode()
    with serve(app, http="h11") as base:
        hogs = [_post(base, request) for _ in range(2)]
        try:
            held = _settled_held() - before
            assert held > 2 * 1024 * 1024, "the clients that do not read hold too little of the budget to test"
            refused = unread(port, "response", "budget")  # (none, unless one filled the budget itself)
            time.sleep(STALLED_SECONDS)
            sizes["honest"] = limit - held + 1024 * 1024  # past what is left of the budget

            async def ask() -> Any:
                async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
                    return await client.chat.completions.create(
                        model="honest", messages=[{"role": "user", "content": "hi"}]
                    )

            answer = asyncio.run(ask())
            assert len(answer.choices[0].message.content or "") == sizes["honest"]
            wait_for("the honest call recorded", lambda: calls.ended)
            honest = calls.ended[0]
            assert (honest.request_model, honest.response_model) == ("honest", "honest-served")
            assert honest.tool_calls == ["lookup"] and honest.finish_reasons == ["tool_calls"]
            assert BUDGET.held - before < held  # the stalled answers gave their copies up
            assert unread(port, "response", "budget") == refused
            assert unread(port, "response", "stalled") == 2 - refused

            for hog in hogs:
                assert _reply(hog) == _tool_answer("hog-served", "y" * sizes["hog"])
            wait_for("the stalled calls recorded", lambda: len(calls.ended) == 3)
            for call in calls.ended[1:]:
                assert call.request_model == "hog"
                assert (call.input_tokens, call.output_tokens) == (7, 9)  # (their usage, read from their last bytes)
        finally:
            for hog in hogs:
                hog.close()
    assert BUDGET.held == before


def test_a_client_that_stops_sending_its_body_gives_the_budget_up_once_stalled() -> None:
    """A client that sends most of a 2 MB body and then nothing more holds it in the budget while the app waits for
    the rest. A later request of the openai SDK whose body does not fit beside it is still read whole (its model
    asked for counted): the stalled body is given up to it, and counted so in ``llm_telemetry_unread_bodies_total``.
    When the stalled client sends the rest, the app gets every byte and answers; that call is recorded without its
    request fields (as a body past the budget is)."""
    before = BUDGET.held
    calls = Calls()
    port = free_port()
    app = LLMTelemetryMiddleware(
        _chat_app(Gate(1)), metrics_port=port, max_inspected_bytes=3_000_000, observers=[calls]
    )
    body = json.dumps({"model": "dripped", "messages": [{"role": "user", "content": "d" * 2_000_000}]}).encode()
    with serve(app, http="h11") as base:
        dripper = _post(base, body[:-100], length=len(body))
        try:
            assert _settled_held() - before > 1_500_000  # (the first part of the body kept, and no more coming)
            time.sleep(STALLED_SECONDS)

            async def ask() -> str:
                async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
                    answer = await client.chat.completions.create(
                        model="asked-model", messages=[{"role": "user", "content": "p" * 2_000_000}]
                    )
                return answer.choices[0].message.content or ""

            assert asyncio.run(ask()) == "hello"
            wait_for("the honest call recorded", lambda: calls.ended)
            assert calls.ended[0].request_model == "asked-model"
            assert (unread(port, "request", "stalled"), unread(port, "request", "budget")) == (1, 0)
            dripper.sendall(body[-100:])
            assert json.loads(_reply(dripper))["choices"][0]["message"]["content"] == "hello"
            wait_for("the stalled call recorded", lambda: len(calls.ended) == 2)
            assert calls.ended[1].request_model is None
            assert calls.ended[1].input_tokens == 7
        finally:
            dripper.close()
    assert BUDGET.held == before


def test_requests_at_work_are_not_taken_for_stalled() -> None:
    """Requests that keep their large bodies while their app works (a non-streamed answer the model takes seconds to
    write) or while their answer streams are not stalled, however long that takes: a request finding the budget full
    meanwhile is the one read without its request fields, and they keep theirs."""
    before = BUDGET.held
    calls = Calls()
    release = threading.Event()

    async def chat(request: Request) -> Response:
        body = await request.json()
        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                chunk = {"id": "c", "object": "chat.completion.chunk", "model": "streamed-served", "choices": []}
                while not release.is_set():
                    delta = {"index": 0, "delta": {"content": "t"}, "finish_reason": None}
                    yield f"data: {json.dumps({**chunk, 'choices': [delta]})}\n\n"
                    await asyncio.sleep(0.05)
                done = {"index": 0, "delta": {}, "finish_reason": "stop"}
                yield f"data: {json.dumps({**chunk, 'choices': [done], 'usage': USAGE})}\n\ndata: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        while body["model"] == "slow" and not release.is_set():  # noqa: ASYNC110 - set from the client's thread
            await asyncio.sleep(0.05)
        return JSONResponse(_answer(f"{body['model']}-served", "hello"))

    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
        metrics_port=0,
        max_inspected_bytes=2_500_000,
        observers=[calls],
    )
    prompt = "p" * 1_000_000

    async def ask(client: openai.AsyncOpenAI, model: str, stream: bool = False) -> str:
        messages: Any = [{"role": "user", "content": prompt}]
        if not stream:
            answer = await client.chat.completions.create(model=model, messages=messages)
            return answer.choices[0].message.content or ""
        text = ""
        async for chunk in await client.chat.completions.create(model=model, messages=messages, stream=True):
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
        return text

    async def run(base: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
            at_work = [asyncio.create_task(ask(client, "slow")), asyncio.create_task(ask(client, "streamed", True))]
            while BUDGET.held - before < 1_800_000:  # noqa: ASYNC110 - (both bodies kept: counted in the server's thread)
                await asyncio.sleep(0.05)
            await asyncio.sleep(STALLED_SECONDS + 1)
            late = await ask(client, "late")
            release.set()
            return [late, *await asyncio.gather(*at_work)]

    with serve(app, http="h11") as base:
        late, slow, streamed = asyncio.run(run(base))
        assert (late, slow) == ("hello", "hello") and streamed.startswith("t")
        wait_for("three calls recorded", lambda: len(calls.ended) == 3)
    models = {str(call.response_model): call.request_model for call in calls.ended}
    assert models == {"late-served": None, "slow-served": "slow", "streamed-served": "streamed"}
    assert BUDGET.held == before


#: A gateway as in _gateway_app, in raw ASGI, served by Granian's thread workers (below): each answer names the worker
#: thread that served it (``x-thread``), and ``/held`` answers the process's BUDGET.held and that thread.
THREADED_APP = """
import json
import sys
import threading

from granian.server import MTServer
from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.middleware import BUDGET


async def gateway(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = "startup" if message["type"] == "lifespan.startup" else "shutdown"
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    thread = str(threading.get_ident()).encode()
    if scope["path"] == "/held":
        answer = json.dumps({"held": BUDGET.held}).encode()
    else:
        asked = json.loads(body)["model"]
        answer = json.dumps({
            "id": "c1", "object": "chat.completion", "created": 1, "model": asked + "-served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "y" * (8_000_000 if asked == "hog"
                         else 10)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
        }).encode()
    headers = [(b"content-type", b"application/json"), (b"x-thread", thread)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for at in range(0, len(answer), 65536):
        await send({"type": "http.response.body", "body": answer[at : at + 65536], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


app = LLMTelemetryMiddleware(gateway, metrics_port=int(sys.argv[2]), metrics_host="127.0.0.1",
                             max_inspected_bytes=int(sys.argv[3]), request_logs=False)


class ThreadWorkers(MTServer):
    # What Granian runs on a free-threaded Python (its workers are threads of one process, each with its event loop);
    # it refuses a build with the interpreter lock only by this check, and runs the same there otherwise.
    def _check_gil(self):
        pass


if __name__ == "__main__":
    ThreadWorkers("app:app", address="127.0.0.1", port=int(sys.argv[1]), interface="asgi", workers=2).serve()
"""


def test_stalled_requests_of_another_event_loop_give_the_budget_up_to_the_next_body() -> None:
    """Granian's thread workers (what it runs on a free-threaded Python) serve one process from two threads, each
    with its own event loop, sharing the budget. A client on one thread reads nothing of an 8 MB JSON answer, holding
    what the socket took of it in the budget; once it is stalled, request bodies on the other thread that do not fit
    beside it are left unread only until that thread asks the stalled request's own loop to give its bytes back: the
    first such body is left unread (counted ``budget``), the stalled answer then gives its copy up (counted
    ``stalled``), and the next body is read, its model asked for counted. (Before, only the stalled requests of the
    asking thread gave theirs up: every later body on the other thread was left unread for as long as the client stayed
    connected.)"""
    granian = pytest.importorskip("granian")
    assert granian is not None
    port, metrics, limit = free_port(), free_port(), 8 * 1024 * 1024
    with tempfile.TemporaryDirectory() as directory:
        (pathlib.Path(directory) / "app.py").write_text(THREADED_APP)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_TELEMETRY_"))}
        command = [sys.executable, "app.py", str(port), str(metrics), str(limit)]
        process = subprocess.Popen(command, cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        connections: dict[str, http.client.HTTPConnection] = {}
        try:

            def held(connection: http.client.HTTPConnection) -> tuple[str, int]:
                connection.request("GET", "/held")
                response = connection.getresponse()
                return response.getheader("x-thread") or "", json.loads(response.read())["held"]

            def one_per_thread() -> bool:
                # Keep-alive connections stay with the worker that accepted them: one on each thread.
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited: {process.stderr.read().decode() if process.stderr else ''}")
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                thread = held(connection)[0]
                connections.setdefault(thread, connection)
                return len(connections) == 2

            wait_for("a connection to each worker thread", one_per_thread)
            (hog_thread, hog), (asking_thread, asking) = connections.items()
            hog.request("POST", "/v1/chat/completions", json.dumps({"model": "hog", "messages": []}))  # read nothing

            def settled() -> int | None:
                first = held(asking)[1]
                time.sleep(0.5)
                return first if held(asking)[1] == first and first > 2 * 1024 * 1024 else None

            kept = wait_for("the client that does not read holding the budget", settled)
            time.sleep(STALLED_SECONDS)
            content = "x" * (limit - kept + 1024 * 1024)  # past what is left of the budget

            def ask() -> str:
                asking.request("POST", "/v1/chat/completions", json.dumps({"model": "asked", "messages": content}))
                response = asking.getresponse()
                response.read()
                assert response.getheader("x-thread") == asking_thread != hog_thread
                return response.getheader("x-thread") or ""

            ask()
            assert unread(metrics, "request", "budget") == 1
            wait_for("the stalled answer given up", lambda: unread(metrics, "response", "stalled") == 1, seconds=10)
            ask()
            wait_for("the second body's call", lambda: scrape(metrics).value(REQUESTS, gen_ai_request_model="asked"))
            assert unread(metrics, "request", "budget") == 1
        finally:
            for connection in connections.values():
                connection.close()
            stop_process(process)
