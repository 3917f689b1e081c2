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
import json
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
from llm_telemetry.middleware import BODY_PIECE_OVERHEAD, BUDGET
from support import Calls, serve, wait_for

USAGE = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}


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
    whole. Once they end, the budget is whole again: a fourth request alone is read."""
    before = BUDGET.held
    calls = Calls()
    gate = Gate(3)
    app = LLMTelemetryMiddleware(_chat_app(gate), metrics_port=0, max_inspected_bytes=600_000, observers=[calls])
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

        gate.n = 1
        assert asyncio.run(ask(base, 1)) == ["hello"]
        wait_for("the fourth call recorded", lambda: len(calls.ended) == 4)
        assert calls.ended[3].request_model == "asked-model"
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
    app = LLMTelemetryMiddleware(
        _pieces_app(gate, answer, seen), metrics_port=0, max_inspected_bytes=600_000, observers=[calls]
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
