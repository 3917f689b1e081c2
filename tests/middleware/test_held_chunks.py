"""Stream chunks kept by the middleware's ``send`` and read later in bulk (``ResponseReader.feed_held``) give the
numbers reading them one by one gives, and those of a full parse, whatever the texts and the chunking."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_telemetry.apis import APIS
from llm_telemetry.middleware import MAX_HELD_BYTES, MAX_HELD_CHUNK_BYTES, MAX_HELD_CHUNKS, _Exchange
from llm_telemetry.record import LLMCall
from support import read_as_middleware

texts = st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=10)


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def encode(obj: dict[str, Any] | str, spaced: bool, ascii_only: bool) -> bytes:
    if isinstance(obj, str):
        return b"data: " + obj.encode() + b"\n\n"
    separators = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(obj, separators=separators, ensure_ascii=ascii_only).encode() + b"\n\n"


#: Events that are not plain text deltas, put anywhere in a stream.
OTHERS: list[dict[str, Any] | str] = [
    chat_chunk({}, "stop"),
    chat_chunk({"content": "x"}, "length"),
    chat_chunk(
        {"tool_calls": [{"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    ),
    chat_chunk({"content": ""}),
    chat_chunk({"content": "a"}, None, usage={"prompt_tokens": 3, "completion_tokens": 4}),
    {"id": "c1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}},
    {"error": {"message": "boom", "type": "server_error"}},
    {"id": "c1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "y"}}, {"index": 1}]},
    "[DONE]",
    "not json",
]


#: Middles that turn a delta's head and tail into other JSON, or into several events.
CRAFTED = [
    b'x","tool_calls":[{"index":0,"function":{"name":"f"}}],"y":"',
    b'x"},"finish_reason":"length"},{"index":1,"delta":{"content":"',
    b'x\\"},"finish_reason":"length"},{"index":1,"delta":{"content":"',
    b'x\n\ndata: {"error":{"type":"overloaded_error"}}\n\ndata: {"a":"',
    b'x\r\rdata: {"error":{"type":"overloaded_error"}}\r\rdata: {"a":"',
]

#: Bytes between a delta's head and tail: arbitrary, made of the bytes that decide whether they can only be the
#: inside of one JSON string, or crafted.
middles = (
    st.sampled_from(CRAFTED)
    | st.binary(max_size=12)
    | st.lists(
        st.sampled_from([b'"', b"\\", b"\n", b"\r", b"a", b"\xff", b"\\u00e9", b'\\"', b"\x00", b"\\\\"]), max_size=5
    ).map(b"".join)
)


#: Obfuscation values (the member OpenAI adds last to every streamed event): the usual letters and digits, and any.
obfuscations = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", max_size=24) | texts


@st.composite
def streams(draw: st.DrawFn, obfuscated: bool = False) -> list[bytes]:
    """A chat stream: role chunk, text deltas of arbitrary text, other events anywhere, and chunks of the deltas'
    shape around arbitrary bytes; optionally re-chunked by a proxy at arbitrary cuts. ``obfuscated``: every JSON
    event ends with an obfuscation member of its own value, and the deltas' shape has arbitrary bytes in place of
    the value too."""
    spaced, ascii_only = draw(st.booleans()), draw(st.booleans())
    events: list[dict[str, Any] | str] = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": text}) for text in draw(st.lists(texts, min_size=1, max_size=40))]
    for other in draw(st.lists(st.sampled_from(OTHERS), max_size=4)):
        events.insert(draw(st.integers(1, len(events))), other)
    if obfuscated:
        events = [event if isinstance(event, str) else {**event, "obfuscation": draw(obfuscations)} for event in events]
    chunks = [encode(event, spaced, ascii_only) for event in events]
    shape = chat_chunk({"content": "MIDDLE"}, **({"obfuscation": "VALUE"} if obfuscated else {}))
    head, _, tail = encode(shape, spaced, ascii_only).partition(b"MIDDLE")
    for middle in draw(st.lists(middles, max_size=4)):
        value = draw(middles) if obfuscated and draw(st.booleans()) else b"v"
        chunks.insert(draw(st.integers(2, len(chunks))), head + middle + tail.replace(b"VALUE", value))
    if draw(st.booleans()):
        # A proxy re-chunks a stretch of the stream: pieces that start or end inside events.
        lo = draw(st.integers(0, len(chunks) - 1))
        hi = draw(st.integers(lo + 1, len(chunks)))
        body = b"".join(chunks[lo:hi])
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6))))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]
        chunks[lo:hi] = pieces
    return chunks


def numbers(call: LLMCall) -> tuple[Any, ...]:
    return (
        call.response_model,
        call.response_id,
        call.finish_reasons,
        call.output_tokens,
        call.input_tokens,
        call.usage_source,
        call.tool_calls,
        call.error_type,
        call.first_token_at,
    )


def one_by_one(chunks: list[bytes], capture: bool = False) -> tuple[LLMCall, int]:
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=capture)
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, now=1.0 + i)
    reader.finish(now=1000.0)
    return call, reader._chunks


@given(streams(), st.lists(st.integers(1, 50), min_size=1, max_size=10))
@settings(max_examples=300, deadline=None)
def test_held_chunks_read_in_bulk_like_one_by_one(chunks: list[bytes], groups: list[int]) -> None:
    """Whatever is kept while the reader is holding, read in groups of any size, gives what feeding every chunk as
    it came gives (the texts of the learnt shape counted in bulk, everything else read one by one)."""
    read_held_like_one_by_one(chunks, groups)


@given(streams(obfuscated=True), st.lists(st.integers(1, 50), min_size=1, max_size=10))
@settings(max_examples=300, deadline=None)
def test_obfuscated_held_chunks_read_in_bulk_like_one_by_one(chunks: list[bytes], groups: list[int]) -> None:
    """The same for streams whose events carry obfuscation members (the learnt shape's chunks are checked one by
    one there, each with its own value)."""
    read_held_like_one_by_one(chunks, groups)


def read_held_like_one_by_one(chunks: list[bytes], groups: list[int]) -> None:
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    read_as_middleware(reader, chunks, groups)
    expected, counted = one_by_one(chunks)
    assert numbers(call) == numbers(expected)
    assert reader._chunks == counted


@given(st.lists(texts.filter(bool), min_size=1, max_size=40), st.booleans(), st.booleans(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_held_stream_agrees_with_full_parsing(words: list[str], spaced: bool, ascii_only: bool, usage: bool) -> None:
    """A valid stream through the middleware's ``send``: the same numbers as a full parse (the fast paths off)."""
    events: list[dict[str, Any] | str] = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": word}) for word in words]
    events.append(chat_chunk({}, "stop"))
    if usage:
        events.append({"id": "c1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}})
    events.append("[DONE]")
    chunks = [encode(event, spaced, ascii_only) for event in events]
    call = through_exchange(chunks)
    full, _ = one_by_one(chunks, capture=True)  # capture turns the fast paths off
    assert numbers(call)[:-1] == numbers(full)[:-1]
    assert call.first_token_at is not None and full.first_token_at == 2.0


def exchange_to(server_send: Any, api: str = "openai.chat") -> tuple[LLMCall, _Exchange]:
    """The middleware's per-request exchange in front of ``server_send``; any internal failure fails the test."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def failsafe(component: str, exc: BaseException) -> None:
        raise AssertionError(f"{component}: {exc!r}")

    spec = APIS[api]
    call = LLMCall(spec.operation, spec.provider, time.perf_counter())
    return call, _Exchange(spec, call, receive, server_send, 1 << 20, False, failsafe)  # type: ignore[arg-type]


def through_exchange(chunks: list[bytes], api: str = "openai.chat") -> LLMCall:
    """Send ``chunks`` through a real ``_Exchange`` as an app would (then an empty last body), like a server."""
    sent: list[bytes] = []

    async def server_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    call, exchange = exchange_to(server_send, api)

    async def app() -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        await exchange.send(start)
        for chunk in chunks:
            await exchange.send({"type": "http.response.body", "body": chunk, "more_body": True})
        await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})

    asyncio.run(app())
    exchange.finish(None)
    assert b"".join(sent) == b"".join(chunks)  # the client gets every byte, unchanged
    return call


def test_a_long_stream_is_read_in_bounded_batches_and_counts_exactly() -> None:
    """Far more than MAX_HELD_BYTES of deltas: kept chunks are read whenever they reach the bound, never more."""
    words = [f" w{i}" for i in range(3 * MAX_HELD_BYTES // 60)]
    events: list[dict[str, Any] | str] = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": word}) for word in words]
    events += [chat_chunk({}, "stop"), "[DONE]"]
    chunks = [encode(event, False, True) for event in events]
    assert sum(map(len, chunks)) > 2 * MAX_HELD_BYTES
    call = through_exchange(chunks)
    assert (call.output_tokens, call.usage_source, call.finish_reasons) == (len(words), "estimated", ["stop"])
    assert call.response_model == "gpt-4o-mini" and call.first_token_at is not None


def test_anthropic_deltas_are_held_and_counted() -> None:
    def event(name: str, obj: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    start = {"type": "message_start", "message": {"id": "m", "model": "claude", "usage": {"input_tokens": 3}}}
    chunks = [event("message_start", start)]
    for i in range(50):
        delta = {"type": "text_delta", "text": f'w{i} "q" \\ \n'}
        chunks.append(event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    chunks.append(event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}))
    call = through_exchange(chunks, "anthropic.messages")
    assert (call.output_tokens, call.usage_source, call.finish_reasons) == (50, "estimated", ["end_turn"])
    assert call.input_tokens == 3 and call.first_token_at is not None


@st.composite
def body_messages(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[bytes]]:
    """A chat stream as the app's body messages, in the forms ASGI allows: bytes or bytearray bodies, chunks
    larger than the biggest one kept, empty bodies and messages without a body. Also the chunks it carries."""
    words = draw(st.lists(texts.filter(bool) | st.integers(100, 700).map(lambda n: "w" * n), min_size=1, max_size=80))
    events: list[dict[str, Any] | str] = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": word}) for word in words]
    events += [chat_chunk({}, "stop"), "[DONE]"]
    messages: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for event in events:
        chunk = encode(event, False, True)
        chunks.append(chunk)
        form = draw(st.sampled_from(["bytes"] * 6 + ["bytearray", "empty", "no body"]))
        if form == "empty":
            messages.append({"type": "http.response.body", "body": b"", "more_body": True})
        elif form == "no body":
            messages.append({"type": "http.response.body", "more_body": True})
        messages.append(
            {
                "type": "http.response.body",
                "body": bytearray(chunk) if form == "bytearray" else chunk,
                "more_body": True,
            }
        )
    return messages, chunks


@given(body_messages())
@settings(max_examples=200, deadline=None)
def test_send_keeps_few_small_chunks_and_reads_like_one_by_one(
    stream: tuple[list[dict[str, Any]], list[bytes]],
) -> None:
    """Whatever form the app's messages take, ``send`` keeps at most MAX_HELD_CHUNKS chunks of at most
    MAX_HELD_CHUNK_BYTES each, the client gets every byte unchanged, and the numbers are those of feeding every
    chunk one by one."""
    messages, chunks = stream
    sent: list[bytes] = []
    exchange: _Exchange | None = None

    async def server_send(message: dict[str, Any]) -> None:
        assert exchange is not None
        held = exchange.held or []
        assert len(held) <= MAX_HELD_CHUNKS and all(len(chunk) <= MAX_HELD_CHUNK_BYTES for chunk in held)
        if message["type"] == "http.response.body":
            sent.append(bytes(message.get("body", b"")))

    call, exchange = exchange_to(server_send)

    async def app() -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        await exchange.send(start)
        for message in messages:
            await exchange.send(message)
        await exchange.send({"type": "http.response.body"})  # the last one: no more_body

    asyncio.run(app())
    exchange.finish(None)
    assert b"".join(sent) == b"".join(chunks)
    expected, _ = one_by_one(chunks)
    assert numbers(call)[:-1] == numbers(expected)[:-1]
    assert call.first_token_at is not None and exchange.complete


# --- obfuscated runs checked in bulk --------------------------------------------------------------------------


def obfuscated_shape(spaced: bool) -> tuple[Any, Any]:
    """A reader that has learnt the shape of an obfuscated stream's text deltas, and the parts of that shape: the
    bytes before the text, between the text and the value, and after the value."""
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    reader.feed(encode({**chat_chunk({"role": "assistant", "content": ""}), "obfuscation": "r0"}, spaced, True), 1.0)
    reader.feed(encode({**chat_chunk({"content": "Hi"}), "obfuscation": "Qx7"}, spaced, True), 2.0)
    assert reader.holding and reader._fast[4] is not None  # the obfuscated shape is known: the deltas are held
    head, tail, _, _, middle = reader._fast
    return reader, (head, middle, tail)


#: Bytes that decide whether a chunk is of an obfuscated shape, and crafted ones.
hostile = st.lists(
    st.sampled_from(
        [b"a", b"Z", b"0", b" ", b"~", b"}", b'"', b"\\", b"\n", b"\r", b"\x00", b"\x1f", b"\x7f", b"\xff", b"\xc3\xa9",
         b'\\"', b"\\\\", b"\\u0041", b'"}', b'"}\n\n', b',"obfuscation":"', b'"},"finish_reason":null}]']
    ),
    max_size=6,
).map(b"".join)  # fmt: skip
#: The inside of a JSON string as json.dumps writes it (escapes included), never empty.
json_texts = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12).map(
    lambda text: json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "surrogatepass")
)
#: Obfuscation values that can only be the inside of a JSON string: printable ASCII without quote or backslash.
plain_values = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\'], max_size=24).map(str.encode)
#: Values of printable ASCII, quotes and backslashes included (so some are not of the shape).
printable_values = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)], max_size=8).map(str.encode) | st.lists(
    st.sampled_from([b"a", b"~", b" ", b"\\", b'"']), min_size=1, max_size=4
).map(b"".join)


@st.composite
def near_shape_chunks(draw: st.DrawFn, parts: tuple[bytes, bytes, bytes]) -> bytes:
    """A chunk near the learnt obfuscated shape: hostile text or value, a part cut short, dropped, doubled or
    replaced, two chunks in one, or an empty chunk (some of these are still of the shape)."""
    head, middle, tail = parts
    pieces = [head, draw(json_texts | hostile), middle, draw(plain_values | printable_values | hostile), tail]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, 4))
        how = draw(st.sampled_from(["cut", "drop", "double", "replace"]))
        piece = pieces[at]
        if how == "cut" and piece:
            pieces[at] = piece[: draw(st.integers(0, len(piece) - 1))] if draw(st.booleans()) else piece[1:]
        elif how == "drop":
            pieces[at] = b""
        elif how == "double":
            pieces[at] = piece + piece
        else:
            pieces[at] = draw(hostile)
    chunk = b"".join(pieces)
    if draw(st.integers(0, 9)) == 0:
        chunk += head + draw(json_texts) + middle + draw(plain_values) + tail
    return chunk if draw(st.integers(0, 19)) else b""


@st.composite
def near_shape_runs(draw: st.DrawFn, parts: tuple[bytes, bytes, bytes]) -> list[bytes]:
    """Text deltas of the learnt obfuscated shape (any text, any value of the shape) with up to two chunks near
    that shape anywhere among them."""
    head, middle, tail = parts
    deltas = draw(st.lists(st.tuples(json_texts, plain_values), max_size=12))
    run = [head + text + middle + value + tail for text, value in deltas]
    for near in draw(st.lists(near_shape_chunks(parts), min_size=0 if run else 1, max_size=2)):
        run.insert(draw(st.integers(0, len(run))), near)
    return run


@given(st.booleans(), st.data())
@settings(max_examples=500, deadline=None)
def test_obfuscated_runs_checked_in_bulk_say_what_each_chunk_says(spaced: bool, data: st.DataObject) -> None:
    """For any run of chunks, valid ones and ones near the obfuscated shape: the bulk check of the run says that
    all its chunks are of the shape exactly when checking each one by one says so of every one."""
    from llm_telemetry.apis import _obfuscated_run

    reader, parts = obfuscated_shape(spaced)
    run = data.draw(near_shape_runs(parts))
    assert _obfuscated_run(reader._fast, run) == all(map(reader._shaped, run))


#: Values with a byte no value of the shape has: a backslash, a quote, a control or non-ASCII byte.
BAD_VALUES = (b"a\\b", b"\\", b'a"b', b"a\x7fb", b"\x1f", b"\xc3\xa9", b"\n")
#: Chunks next to the obfuscated shape (given its head, middle and tail), each not of it.
ODD_CHUNKS: list[Any] = [
    *(lambda h, m, t, v=v: h + b"w" + m + v + t for v in BAD_VALUES),
    lambda h, m, t: h + b"w" + m + b"ok",  # no tail
    lambda h, m, t: h + b"w" + m + b"ok}",  # the tail's place taken by bytes a value may have
    lambda h, m, t: h + b"w" + m + b"ok" + t[:-1],
    lambda h, m, t: h + b"w" + m + b"ok" + t + t,
    lambda h, m, t: h + b"" + m + b"ok" + t,  # no text
    lambda h, m, t: h + b'w"' + m + b"ok" + t,
    lambda h, m, t: h + b"w\\" + m + b"ok" + t,
    lambda h, m, t: h[1:] + b"w" + m + b"ok" + t,
    lambda h, m, t: h + b"w" + m[1:] + b"ok" + t,
    lambda h, m, t: h + b"w" + m + b"ok" + t + h + b"x" + m + b"ok" + t,  # two events in one chunk
    lambda h, m, t: b"",
]


@given(st.booleans(), st.sampled_from(ODD_CHUNKS), st.integers(0, 3))
@settings(max_examples=100, deadline=None)
def test_an_obfuscated_run_with_one_chunk_not_of_the_shape_is_not_counted_in_bulk(
    spaced: bool, odd: Any, at: int
) -> None:
    """One chunk next to the shape (a value with a byte no value of the shape has, the tail missing, cut, doubled
    or replaced, an empty or unescaped text, a part cut short, two events in one chunk) among deltas of the shape:
    the bulk check rejects the run, as checking that chunk alone does."""
    from llm_telemetry.apis import _obfuscated_run

    reader, (head, middle, tail) = obfuscated_shape(spaced)
    run = [head + b"w" + middle + b"ok" + tail] * 3
    run.insert(at, odd(head, middle, tail))
    assert not reader._shaped(run[at])
    assert not _obfuscated_run(reader._fast, run)


@pytest.mark.parametrize("obfuscated", [False, True], ids=["plain", "obfuscated"])
@pytest.mark.parametrize("groups", [[1], [3], [2, 5]])
def test_a_delta_whose_last_line_break_does_not_end_its_event_is_no_delta_of_the_shape(
    obfuscated: bool, groups: list[int]
) -> None:
    """A chunk with the bytes of a learnt text delta up to its last two, which are CR LF instead of the blank line:
    its line ends there but its event does not, so the error event after it is a second data line of that event (not
    JSON, nothing to read) and the stream ends without a finish. Read as the middleware reads it (one by one or
    held), it records what reading the whole body at once records: no error, the four tokens before it, cut short;
    not a fifth token and the server's error, as when the shape is matched on its head alone."""

    def event(delta: dict[str, Any], n: int) -> bytes:
        extra = {"obfuscation": "xyz"[: n % 3 + 1]} if obfuscated else {}
        return encode(chat_chunk(delta, **extra), spaced=False, ascii_only=True)

    chunks = [event({"role": "assistant", "content": ""}, 0)]
    chunks += [event({"content": word}, n) for n, word in enumerate(["a", "b", "c", "d"])]
    chunks += [
        event({"content": "e"}, 1)[:-2] + b"\r\n",
        b'data: {"error":{"message":"x","type":"overloaded_error"}}\n\n',
    ]
    spec = APIS["openai.chat"]
    recorded = []
    for pieces, sizes in ((chunks, groups), ([b"".join(chunks)], [1])):
        call = LLMCall(spec.operation, spec.provider, start=0.0)
        reader = spec.response_reader(call, stream=True, capture=False)
        read_as_middleware(reader, pieces, sizes)
        assert (call.error_type, call.output_tokens, call.usage_source, reader.cut_short()) == (
            None,
            4,
            "estimated",
            True,
        )
        recorded.append(numbers(call)[:-1])  # (the first token's time: when its chunk came)
    assert recorded[0] == recorded[1]


@given(st.booleans(), st.lists(st.tuples(json_texts, plain_values), min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_obfuscated_deltas_of_any_text_and_value_are_counted_in_bulk(
    spaced: bool, deltas: list[tuple[bytes, bytes]]
) -> None:
    """A run of text deltas of the obfuscated shape, whatever their texts (escapes, unicode) and values, passes the
    bulk check (it is not left to the one-by-one reading), and is counted one token per delta."""
    from llm_telemetry.apis import _obfuscated_run

    reader, (head, middle, tail) = obfuscated_shape(spaced)
    run = [head + text + middle + value + tail for text, value in deltas]
    assert _obfuscated_run(reader._fast, run)
    counted = reader._chunks
    reader.feed_held(run)
    assert reader._chunks == counted + len(run) and reader.holding


def test_a_chunk_of_many_events_reaches_the_client_before_it_is_read() -> None:
    """Reading a chunk of thousands of events takes milliseconds: the server gets such a chunk before the reader
    looks at it (the first token is not known yet when the bytes go out), and its time is still the one the chunk
    was handed over at."""
    from llm_telemetry import LLMTelemetryMiddleware

    calls: list[LLMCall] = []

    class Keep:
        def start(self, call: LLMCall) -> None:
            calls.append(call)

        def end(self, call: LLMCall) -> None:
            pass

    role = encode(chat_chunk({"role": "assistant", "content": ""}), False, True)
    many = b"".join(encode(chat_chunk({"content": f"w{i} "}), False, True) for i in range(2000))
    small = encode(chat_chunk({"content": "small"}), False, True)
    end = encode(chat_chunk({}, "stop"), False, True) + b"data: [DONE]\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in (role, many, small, end):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    seen: list[tuple[bytes, float | None, float]] = []  # each chunk, the first token's time known then, and now

    async def server_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            seen.append((message["body"], calls[0].first_token_at, time.perf_counter()))

    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode()
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, request_logs=False, observers=[Keep()])
    try:
        asyncio.run(wrapped(scope, receive, server_send))
    finally:
        wrapped.telemetry.shutdown()
    assert [chunk for chunk, _, _ in seen] == [role, many, small, end]  # byte for byte, in order
    _, known_at_many, sent_many = seen[1]
    assert known_at_many is None  # handed on before it was read
    call = calls[0]
    assert call.first_token_at is not None and call.first_token_at <= sent_many
    assert seen[3][1] is not None and call.output_tokens == 2001 and call.finish_reasons == ["stop"]
