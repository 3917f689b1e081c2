"""Properties of the real middleware under arbitrary input (hypothesis).

Whatever the chunking of a real OpenAI, Anthropic or Responses stream (cuts inside CRLF, inside multi-byte UTF-8,
chunks carrying one event plus the head of the next), whatever request body, and whatever label values:

* the client gets the bytes and headers the bare app sends;
* the call's numbers are those of the whole stream parsed at once;
* nothing is counted in ``llm_telemetry_internal_errors_total``;
* ``/metrics`` answers 200, below a size bound.

The same properties run with a much larger example budget under the ``fuzz`` marker (test_hostile_fuzz.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import pytest
from backports import zstd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.labels import MAX_LABEL_CHARS
from llm_telemetry.record import LLMCall
from support import Calls, Metrics, request_body

#: Distinct values per label in these tests, and the scrape size that bound implies (generously).
MAX_VALUES = 10
MAX_SCRAPE_BYTES = 1 << 20

# --- real streams, as the providers document them --------------------------------------------------------------

TEXTS = ["Bonjour", " à", " tous", " — ", "你好", "世界", " 🎉", "\n", ' "quoted"', " fin"]


def _openai_chat(usage: bool) -> list[tuple[str | None, dict[str, Any] | str]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini-2024-07-18",
                "system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                "finish_reason": finish}], **({"usage": None} if usage else {})}  # fmt: skip

    events: list[tuple[str | None, dict[str, Any] | str]] = [(None, chunk({"role": "assistant", "content": ""}))]
    events += [(None, chunk({"content": text})) for text in TEXTS]
    events.append((None, chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                "function": {"name": "get_weather", "arguments": ""}}]})))  # fmt: skip
    events.append((None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Zürich"}'}}]})))
    events.append((None, chunk({}, "tool_calls")))
    if usage:
        events.append((None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                              "model": "gpt-4o-mini-2024-07-18", "choices": [], "usage": {"prompt_tokens": 21,
                              "completion_tokens": 17, "total_tokens": 38,
                              "prompt_tokens_details": {"cached_tokens": 8},
                              "completion_tokens_details": {"reasoning_tokens": 0}}}))  # fmt: skip
    events.append((None, "[DONE]"))
    return events


def _anthropic(complete: bool) -> list[tuple[str | None, dict[str, Any] | str]]:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
         "model": "claude-sonnet-4-20250514", "content": [], "stop_reason": None, "stop_sequence": None,
         "usage": {"input_tokens": 25, "cache_read_input_tokens": 4, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]  # fmt: skip
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in TEXTS]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
         "name": "get_weather", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
         "partial_json": '{"city": "Zürich"}'}},
        {"type": "content_block_stop", "index": 1},
    ]  # fmt: skip
    if complete:
        events += [
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
             "usage": {"output_tokens": 42}},
            {"type": "message_stop"},
        ]  # fmt: skip
    return [(e["type"], e) for e in events]


#: A web search result's location, as a ``citations_delta`` of an answer's text cites it.
_CITATION = {"type": "web_search_result_location", "url": "https://example.org/", "title": "Example",
             "encrypted_index": "Eo8B", "cited_text": "text_delta"}  # fmt: skip


def _anthropic_searched(complete: bool) -> list[tuple[str | None, dict[str, Any] | str]]:
    """A Claude stream that thinks (its thinking shown, then signed), searches the web with the API's tool, and
    answers with citations of what it found."""

    def block(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"type": "content_block_start", "index": index, "content_block": start},
            *({"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas),
            {"type": "content_block_stop", "index": index},
        ]

    result = {"type": "web_search_result", "url": "https://example.org/", "title": "Example",
              "encrypted_content": "Eq", "page_age": None}  # fmt: skip
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_2", "type": "message", "role": "assistant",
         "model": "claude-sonnet-4-5", "content": [], "stop_reason": None, "stop_sequence": None,
         "usage": {"input_tokens": 40, "output_tokens": 1}}},
        *block(0, {"type": "thinking", "thinking": "", "signature": ""},
               [{"type": "thinking_delta", "thinking": t} for t in TEXTS[:3]]
               + [{"type": "signature_delta", "signature": "EqQBCkgIARABGAIiQ"}]),
        *block(1, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
               [{"type": "input_json_delta", "partial_json": p} for p in ["", '{"query": "Zürich"}']]),
        *block(2, {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [result]}, []),
        *block(3, {"type": "text", "text": "", "citations": []},
               [{"type": "citations_delta", "citation": _CITATION}, *({"type": "text_delta", "text": t} for t in TEXTS),
                {"type": "citations_delta", "citation": _CITATION}]),
    ]  # fmt: skip
    if complete:
        events += [
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 310, "server_tool_use": {"web_search_requests": 1}}},
            {"type": "message_stop"},
        ]  # fmt: skip
    return [(e["type"], e) for e in events]


def _responses() -> list[tuple[str | None, dict[str, Any] | str]]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4.1-2025-04-14", "output": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": {**response, "status": "in_progress",
         "usage": None}},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
         "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}},
    ]  # fmt: skip
    events += [
        {"type": "response.output_text.delta", "sequence_number": 2 + i, "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": text}
        for i, text in enumerate(TEXTS)
    ]  # fmt: skip
    events += [
        {"type": "response.output_item.added", "sequence_number": 20, "output_index": 1,
         "item": {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather",
                  "arguments": ""}},
        {"type": "response.completed", "sequence_number": 21, "response": {**response, "status": "completed",
         "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 19,
                   "output_tokens_details": {"reasoning_tokens": 6}, "total_tokens": 49}}},
    ]  # fmt: skip
    return [(e["type"], e) for e in events]


STREAMS = {
    "openai-usage": ("/v1/chat/completions", _openai_chat(usage=True)),
    "openai-estimated": ("/v1/chat/completions", _openai_chat(usage=False)),
    "anthropic": ("/v1/messages", _anthropic(complete=True)),
    "anthropic-cut": ("/v1/messages", _anthropic(complete=False)),
    "anthropic-searched": ("/v1/messages", _anthropic_searched(complete=True)),
    "anthropic-searched-cut": ("/v1/messages", _anthropic_searched(complete=False)),
    "responses": ("/v1/responses", _responses()),
}


def encode(events: list[tuple[str | None, dict[str, Any] | str]], newline: bytes, spaced: bool) -> bytes:
    out = b""
    for name, data in events:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if spaced and not isinstance(data, str):
            payload = json.dumps(data, ensure_ascii=False)
        if name is not None:
            out += b"event: " + name.encode() + newline
        out += b"data: " + payload.encode() + newline + newline
    return out


def interesting_cuts(body: bytes) -> list[int]:
    """Offsets a hostile chunking likes: inside CRLF, inside multi-byte UTF-8, just after an event boundary."""
    cuts = []
    for i in range(1, len(body)):
        if body[i - 1 : i + 1] == b"\r\n" or 0x80 <= body[i] < 0xC0:
            cuts.append(i)
        elif body[i - 2 : i] == b"\n\n" or body[i - 4 : i] == b"\r\n\r\n":
            cuts += [i, i + 1, i + 7]  # the next event's first bytes ride along with this one
    return [c for c in cuts if 0 < c < len(body)]


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[str, str, bytes, list[bytes]]:
    name = draw(st.sampled_from(sorted(STREAMS)))
    path, events = STREAMS[name]
    body = encode(events, draw(st.sampled_from([b"\n", b"\r\n"])), draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        # A proxy that sends the head of the next event early, every other event, and nothing else: chunks of one
        # whole event plus the next one's first bytes, each followed by the rest of that next event, so each chunk
        # of the first kind starts between events and has the shape of the ones of its kind before it.
        ahead = draw(st.integers(1, 60))
        ends = [i for i in range(2, len(body)) if body[i - 2 : i] == b"\n\n" or body[i - 4 : i] == b"\r\n\r\n"]
        first = draw(st.integers(0, 2))
        cuts = {end + ahead for end in ends[first::2] if end + ahead < len(body)} | set(
            ends[first + 1 :: 2] + ends[:first]
        )
    else:
        cuts = set(draw(st.lists(st.sampled_from(interesting_cuts(body)), max_size=40)))
        cuts |= set(draw(st.lists(st.integers(1, len(body) - 1), max_size=40)))
        if draw(st.booleans()):  # a re-chunking proxy: the same size throughout, whatever the boundaries
            size = draw(st.integers(1, 400))
            cuts |= set(range(size, len(body), size))
    edges = [0, *sorted(cuts), len(body)]
    return name, path, body, [body[a:b] for a, b in itertools.pairwise(edges)]


# --- the app and the middleware under test ---------------------------------------------------------------------

#: What the app answers next: status, headers, body chunks. Set by each example before its request.
ANSWER: dict[str, Any] = {}


async def scripted_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = await request_body(receive)
    headers = [*ANSWER["headers"], (b"x-body-sha256", hashlib.sha256(body).hexdigest().encode())]
    await send({"type": "http.response.start", "status": ANSWER["status"], "headers": headers})
    for chunk in ANSWER["chunks"]:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture(scope="module")
def observed() -> Iterator[tuple[LLMTelemetryMiddleware, Calls]]:
    calls = Calls()
    wrapped = LLMTelemetryMiddleware(
        scripted_app,
        metrics_port=0,
        metrics_app_path="/metrics",
        request_logs=False,
        echo_request_id=False,
        max_label_values=MAX_VALUES,
        attribution_headers={"x-tenant": "tenant"},
        observers=[calls],
    )
    yield wrapped, calls
    wrapped.telemetry.shutdown()


def request(
    app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, method: str = "POST"
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One exchange in a fresh event loop; what the server would put on the wire."""
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers or [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def numbers(call: LLMCall) -> tuple[Any, ...]:
    return (call.request_model, call.response_model, call.response_id, call.stream, call.input_tokens,
            call.output_tokens, call.cache_read_tokens, call.cache_creation_tokens, call.reasoning_tokens,
            call.usage_source, call.finish_reasons, call.tool_calls, call.error_type, call.status_code)  # fmt: skip


def check_scrape(wrapped: LLMTelemetryMiddleware) -> Metrics:
    status, _, body = request(wrapped, "/metrics", b"", method="GET")
    assert status == 200
    assert len(body) < MAX_SCRAPE_BYTES
    metrics = Metrics(body.decode("utf-8"))  # strict: the exposition is valid UTF-8
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
    for sample in metrics.samples:
        assert all(len(value) <= MAX_LABEL_CHARS for value in sample.labels.values())
    return metrics


def through_both(
    observed: tuple[LLMTelemetryMiddleware, Calls],
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> LLMCall:
    """The exchange with and without the middleware: same bytes and headers; the one call it recorded."""
    wrapped, calls = observed
    expected = request(scripted_app, path, body, headers)
    before = len(calls.ended)
    assert request(wrapped, path, body, headers) == expected
    assert len(calls.ended) == before + 1
    return calls.ended[-1]


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
WHOLE: dict[tuple[str, bytes], tuple[Any, ...]] = {}


def whole_stream_numbers(observed: tuple[LLMTelemetryMiddleware, Calls], path: str, body: bytes) -> tuple[Any, ...]:
    if (path, body) not in WHOLE:
        ANSWER.update(status=200, headers=SSE_HEADERS, chunks=[body])
        WHOLE[(path, body)] = numbers(through_both(observed, path, b'{"model": "m", "stream": true}'))
    return WHOLE[(path, body)]


PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(stream=chunked_streams())
def test_hostile_any_chunking_gives_the_same_bytes_and_numbers(
    observed: tuple[LLMTelemetryMiddleware, Calls], stream: tuple[str, str, bytes, list[bytes]]
) -> None:
    check_chunking(observed, stream)


def check_chunking(observed: tuple[LLMTelemetryMiddleware, Calls], stream: tuple[str, str, bytes, list[bytes]]) -> None:
    name, path, body, chunks = stream
    whole = whole_stream_numbers(observed, path, body)
    ANSWER.update(status=200, headers=SSE_HEADERS, chunks=chunks)
    call = through_both(observed, path, b'{"model": "m", "stream": true}')
    assert numbers(call) == whole, name
    check_scrape(observed[0])


# --- streams the app compresses itself -----------------------------------------------------------------------------

#: The codings read, each as the stream compressors send it: every chunk compressed and flushed as it passes.
CODINGS = ["gzip", "deflate", "br", "zstd"]


def compress_as_sent(coding: str, chunks: list[bytes]) -> list[bytes]:
    """``chunks`` compressed as one body, flushed after each (as brotli-asgi and zstd-asgi do), then its end."""
    if coding == "br":
        brotli_packer = brotli.Compressor()
        return [bytes(brotli_packer.process(c)) + bytes(brotli_packer.flush()) for c in chunks] + [
            bytes(brotli_packer.finish())
        ]
    if coding == "zstd":
        zstd_packer = zstd.ZstdCompressor()
        return [zstd_packer.compress(c, zstd.ZstdCompressor.FLUSH_BLOCK) for c in chunks] + [
            zstd_packer.compress(b"", zstd.ZstdCompressor.FLUSH_FRAME)
        ]
    packer = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
    return [packer.compress(c) + packer.flush(zlib.Z_SYNC_FLUSH) for c in chunks] + [packer.flush()]


@st.composite
def compressed_streams(draw: st.DrawFn) -> tuple[str, str, bytes, str, str, list[bytes]]:
    """A real stream in any chunking, compressed in any coding read; intact, or damaged as a broken or hostile app
    might send it: cut short, a byte changed, or bytes that are not the coding's appended."""
    name, path, body, chunks = draw(chunked_streams())
    coding = draw(st.sampled_from(CODINGS))
    packed = [c for c in compress_as_sent(coding, chunks) if c]
    damage = draw(st.sampled_from(["none", "none", "cut", "changed", "appended"]))
    at = draw(st.integers(0, len(packed) - 1))
    if damage == "cut":
        packed = [*packed[:at], packed[at][: draw(st.integers(0, len(packed[at]) - 1))]]
    elif damage == "changed":
        i = draw(st.integers(0, len(packed[at]) - 1))
        changed = packed[at][i] ^ draw(st.integers(1, 255))
        packed[at] = packed[at][:i] + bytes([changed]) + packed[at][i + 1 :]
    elif damage == "appended":
        packed[at] += draw(st.binary(min_size=1, max_size=64))
    return name, path, body, coding, damage, [c for c in packed if c]


@PROPERTY_SETTINGS
@given(stream=compressed_streams())
def test_hostile_compressed_streams_pass_unchanged_and_read_as_plain_ones(
    observed: tuple[LLMTelemetryMiddleware, Calls], stream: tuple[str, str, bytes, str, str, list[bytes]]
) -> None:
    check_compressed(observed, stream)


def check_compressed(
    observed: tuple[LLMTelemetryMiddleware, Calls], stream: tuple[str, str, bytes, str, str, list[bytes]]
) -> None:
    """The client gets the app's compressed bytes; an intact stream reads as its plain body does, a damaged one
    is read as far as it decodes, and neither counts an internal error."""
    name, path, body, coding, damage, packed = stream
    whole = whole_stream_numbers(observed, path, body)
    ANSWER.update(status=200, headers=[*SSE_HEADERS, (b"content-encoding", coding.encode())], chunks=packed)
    call = through_both(observed, path, b'{"model": "m", "stream": true}')
    if damage == "none":
        assert numbers(call) == whole, (name, coding)
    check_scrape(observed[0])


def test_hostile_whole_streams_read_as_documented(observed: tuple[LLMTelemetryMiddleware, Calls]) -> None:
    """The reference the chunkings are compared with is itself right."""
    expected = {
        "openai-usage": (21, 17, "reported", ["tool_calls"], ["get_weather"]),
        # A delta is about a token: the text deltas and the tool call's two pieces.
        "openai-estimated": (None, len(TEXTS) + 2, "estimated", ["tool_calls"], ["get_weather"]),
        "anthropic": (29, 42, "reported", ["tool_use"], ["get_weather"]),
        "anthropic-cut": (29, len(TEXTS) + 1, "estimated", [], ["get_weather"]),
        "anthropic-searched": (40, 310, "reported", ["end_turn"], ["web_search"]),
        # The pieces of thinking, of the search's input and of text; the signature and the citations carry none.
        "anthropic-searched-cut": (40, 3 + 1 + len(TEXTS), "estimated", [], ["web_search"]),
        "responses": (30, 19, "reported", ["stop"], ["get_weather"]),
    }
    for name, (path, events) in STREAMS.items():
        got = whole_stream_numbers(observed, path, encode(events, b"\n", False))
        assert (got[4], got[5], got[9], got[10], got[11]) == expected[name], name


# --- answers with one value of the wrong type ---------------------------------------------------------------------

#: Whole JSON answers, as the APIs document them, beside the streams above.
JSON_ANSWERS = {
    "openai-json": ("/v1/chat/completions", {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o", "choices": [
            {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Hi",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                  "prompt_tokens_details": {"cached_tokens": 1}}}),
    "anthropic-json": ("/v1/messages", {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
        "content": [{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                     "input": {}}],
        "usage": {"input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 1}}),
    "responses-json": ("/v1/responses", {
        "id": "resp_1", "object": "response", "model": "gpt-4.1", "status": "completed", "output": [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}],
        "usage": {"input_tokens": 5, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}}}),
}  # fmt: skip
#: What a broken or hostile server puts where a value belongs: each type JSON has, and the extremes of each.
WRONG_VALUES = [None, True, -1, 2**70, 1e308, "", "x" * 300, [], ["text"], {}, {"type": "text"}]


def _places(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value inside ``value`` (keys and list indexes)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield (*at, key)
        yield from _places(item, (*at, key))


def _with(value: Any, place: tuple[Any, ...], new: Any) -> Any:
    copy = json.loads(json.dumps(value))
    target = copy
    for key in place[:-1]:
        target = target[key]
    target[place[-1]] = new
    return copy


@st.composite
def answers_with_a_wrong_value(draw: st.DrawFn) -> tuple[str, str, list[bytes]]:
    """A real answer (a stream, or a JSON body) with one value anywhere in it replaced by one of another type."""
    name = draw(st.sampled_from(sorted(STREAMS) + sorted(JSON_ANSWERS)))
    new = draw(st.sampled_from(WRONG_VALUES))
    if name in JSON_ANSWERS:
        path, answer = JSON_ANSWERS[name]
        place = draw(st.sampled_from(list(_places(answer))))
        return f"{name} {place} = {new!r:.20}", path, [json.dumps(_with(answer, place, new)).encode()]
    path, events = STREAMS[name]
    index = draw(st.sampled_from([i for i, (_, data) in enumerate(events) if isinstance(data, dict)]))
    event, data = events[index]
    place = draw(st.sampled_from(list(_places(data))))
    changed = [*events[:index], (event, _with(data, place, new)), *events[index + 1 :]]
    return f"{name} #{index} {place} = {new!r:.20}", path, [encode([e], b"\n", False) for e in changed]


def _block_types_as_lists() -> tuple[str, str, list[bytes]]:
    """The Anthropic stream with every content block's type a list."""
    events = [(e, _with(d, ("content_block", "type"), ["text"]) if "content_block" in d else d)
              for e, d in _anthropic(complete=True) if isinstance(d, dict)]  # fmt: skip
    return "anthropic block types", "/v1/messages", [encode([event], b"\n", False) for event in events]


@PROPERTY_SETTINGS
@example(answer=_block_types_as_lists())
@given(answer=answers_with_a_wrong_value())
def test_hostile_a_value_of_the_wrong_type_anywhere_is_no_internal_error(
    observed: tuple[LLMTelemetryMiddleware, Calls], answer: tuple[str, str, list[bytes]]
) -> None:
    """Whatever value of whatever type a server puts anywhere in a real answer (a list where a block's type belongs,
    an object for a token count), the client gets the bytes the bare app sends, one call is recorded, and nothing
    in the middleware fails: the reader reads the rest of the answer. (A content block whose type was a list
    stopped the Anthropic reader for the rest of the stream: its usage and finish reason were lost.)"""
    name, path, chunks = answer
    headers = [(b"content-type", b"application/json")] if name.split(" ")[0].endswith("-json") else SSE_HEADERS
    ANSWER.update(status=200, headers=headers, chunks=chunks)
    through_both(observed, path, b'{"model": "m", "stream": true}')
    check_scrape(observed[0])


# --- request bodies and label values ------------------------------------------------------------------------------

#: Strings as JSON can carry them: any code point, lone surrogates included, sometimes very long.
hostile_text = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=40),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\ud800"]), st.integers(200, 5000)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text | st.sampled_from(
        ["model", "messages", "role", "content", "tool_calls", "tool_call_id", "id", "input", "call_id", "type",
         "stream", "max_tokens", "temperature", "function", "name", "tool_use_id", "is_error"]), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip
request_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(
        lambda n, c: c * n,
        st.sampled_from([1, 999, 1001, 5000, 100_000]) | st.integers(1, 200_000),
        st.sampled_from([b"[", b"{", b'{"a":', b'{"messages":[{"content":"{"x":[']),
    ),
    st.builds(
        lambda role, key, value: json.dumps({"model": "m", "messages": [{"role": role, key: value}]}).encode(),
        st.sampled_from(["tool", "assistant", "user"]),
        st.sampled_from(["tool_call_id", "tool_calls", "content", "id"]),
        json_values,
    ),
    st.builds(
        lambda model, messages: json.dumps({"model": model, "messages": messages, "stream": False}).encode(),
        hostile_text,
        json_values,
    ),
)


@PROPERTY_SETTINGS
@example(body=b"[" * 100_000, path="/v1/chat/completions")
@example(body=b'{"messages": [{"role": "tool", "tool_call_id": [1]}]}', path="/v1/chat/completions")
@given(body=request_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/responses"]))
def test_hostile_any_request_body_reaches_the_app_intact(
    observed: tuple[LLMTelemetryMiddleware, Calls], body: bytes, path: str
) -> None:
    check_request_body(observed, body, path)


def check_request_body(observed: tuple[LLMTelemetryMiddleware, Calls], body: bytes, path: str) -> None:
    ANSWER.update(status=200, headers=[(b"content-type", b"application/json")], chunks=[b'{"model": "m"}'])
    through_both(observed, path, body)
    check_scrape(observed[0])


#: Header values as a server passes them on: any bytes but CR and LF, no surrounding whitespace.
header_values = st.binary(min_size=1, max_size=600).filter(lambda b: b.strip() == b and not {13, 10} & set(b))


@PROPERTY_SETTINGS
@given(
    model=hostile_text,
    response_model=hostile_text,
    tool=hostile_text,
    tenant=header_values,
)
def test_hostile_label_values_keep_the_scrape_valid_and_bounded(
    observed: tuple[LLMTelemetryMiddleware, Calls], model: str, response_model: str, tool: str, tenant: bytes
) -> None:
    check_label_values(observed, model, response_model, tool, tenant)


def check_label_values(
    observed: tuple[LLMTelemetryMiddleware, Calls], model: str, response_model: str, tool: str, tenant: bytes
) -> None:
    answer = {"model": response_model, "choices": [{"index": 0, "finish_reason": tool, "message": {"role": "assistant",
              "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": tool}}]}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1}}  # fmt: skip
    ANSWER.update(status=200, headers=[(b"content-type", b"application/json")], chunks=[json.dumps(answer).encode()])
    body = json.dumps({"model": model, "messages": [{"role": "tool", "tool_call_id": "c", "content": "x"}]}).encode()
    through_both(observed, "/v1/chat/completions", body, [(b"x-tenant", tenant)])
    metrics = check_scrape(observed[0])
    for label in ("gen_ai_request_model", "llm_metadata_tenant"):
        # "other" (past a bound) and "none" (no header) are the two reserved values besides the admitted ones.
        assert len(metrics.label_values("llm_requests_total", label) - {"other", "none"}) <= MAX_VALUES


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: apt-get install prometheus)")
def test_hostile_label_values_parse_with_prometheus_own_parser(observed: tuple[LLMTelemetryMiddleware, Calls]) -> None:
    """Quotes, backslashes, line breaks, lone surrogates, markup and long values as models, tools and tenants: the
    exposition still parses with Prometheus's own text parser (``promtool check metrics``), lint included."""
    for value in ['a"b', "c\\d", "e\nf", "g\ud800h", "ü🎉", "", " ", "x" * 300, "{}", "# HELP x y", 'q="}']:
        check_label_values(observed, value, value + "r", value + "t", b'ten"a\\nt')
    status, _, body = request(observed[0], "/metrics", b"", method="GET")
    assert status == 200
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


# --- streams cut short ---------------------------------------------------------------------------------------------


def _ends_answer(data: dict[str, Any] | str) -> bool:
    """Whether an event says the answer ended: a finish reason, Anthropic's stop reason or a completed response."""
    if isinstance(data, str):
        return data == "[DONE]"
    choices, delta = data.get("choices") or [{}], data.get("delta")
    return bool(
        choices[0].get("finish_reason")
        or data.get("type") in ("message_stop", "response.completed")
        or (isinstance(delta, dict) and delta.get("stop_reason"))
    )


@st.composite
def cut_streams(draw: st.DrawFn) -> tuple[str, str, int, int, list[bytes]]:
    """A whole stream cut anywhere (most often near the end of the event that ends its answer), in any chunking:
    its name and path, where its answer's end is dispatched, where it was cut, and the chunks before the cut."""
    name = draw(st.sampled_from(sorted(n for n in STREAMS if not n.endswith("-cut"))))
    path, events = STREAMS[name]
    newline, spaced = draw(st.sampled_from([b"\n", b"\r\n"])), draw(st.booleans())
    body = encode(events, newline, spaced)
    first_end = next(i for i, (_, data) in enumerate(events) if _ends_answer(data))
    # Its data line whole is enough: a stream that stops there, without the line break and blank line that would
    # have dispatched the event, is a server leaving them out as much as a cut.
    end = len(encode(events[: first_end + 1], newline, spaced)) - 2 * len(newline)
    cut = draw(st.sampled_from([end - 2, end - 1, end, end + 1]) | st.integers(0, len(body)))
    kept = body[: max(0, min(cut, len(body)))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(kept) - 1)), max_size=20))))
    edges = [0, *(c for c in cuts if c < len(kept)), len(kept)]
    return name, path, end, len(kept), [kept[a:b] for a, b in itertools.pairwise(edges) if b > a]


@PROPERTY_SETTINGS
@example(stream=("openai-estimated", "/v1/chat/completions", 10, 0, []))
@given(stream=cut_streams())
def test_a_stream_cut_before_the_end_of_its_answer_is_an_incomplete_stream(
    observed: tuple[LLMTelemetryMiddleware, Calls], stream: tuple[str, str, int, int, list[bytes]]
) -> None:
    """An upstream that stops mid-answer, passed on by an app that ends its response normally: the client's SDK
    ends the stream without a word, and the call is ``incomplete_stream`` exactly when the data of the event that
    ends the answer (a finish reason, a stop reason, a completed response) did not come whole. The bytes pass
    unchanged."""
    name, path, end, cut, chunks = stream
    ANSWER.update(status=200, headers=SSE_HEADERS, chunks=chunks)
    call = through_both(observed, path, b'{"model": "m", "stream": true}')
    assert call.error_type == (None if cut >= end else "incomplete_stream"), (name, end, cut)
    assert call.status_code == 200
    check_scrape(observed[0])
