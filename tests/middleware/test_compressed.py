"""Responses the app compresses itself are read decompressed, and reach the client exactly as the app sent them.

The common case: Starlette's (FastAPI's) ``GZipMiddleware`` added before this middleware, so it runs inside it,
compresses every JSON answer of 500 bytes or more for a client that accepts gzip, as the official SDKs do. Apps
that use ``brotli-asgi`` or ``zstd-asgi`` instead compress streams too, chunk by chunk.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import anthropic
import brotli
import openai
import pytest
from backports import zstd
from brotli_asgi import BrotliMiddleware
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.middleware.gzip import GZipMiddleware
from zstd_asgi import ZstdMiddleware

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import APIS
from llm_telemetry.decoding import DecodingReader
from llm_telemetry.demo.app import bare_app
from llm_telemetry.record import LLMCall
from support import Metrics, serve, settled, whole_after


def _settled(port: int, name: str, want: float) -> Metrics:
    """A scrape taken once one showed ``want`` of ``name``: the scrape that first showed a call's request may have
    collected its tokens before the call was recorded (see support.whole_after)."""

    def counted(metrics: Metrics) -> None:
        assert metrics.value(name) >= want

    settled(port, counted)
    return whole_after(port)


@pytest.mark.parametrize("gzip_runs", ["inside", "outside"])
def test_answers_compressed_by_gzip_middleware_are_counted_for_the_official_sdks(gzip_runs: str) -> None:
    """GZip inside ours (added before it) hands us compressed bytes to decode; outside ours (added after it, the
    other usual order) it compresses what we hand on, and Starlette's responder does that by overwriting the very
    message we sent it: what we read must be what the app sent, whatever the outer middleware does with it."""
    options: dict[str, Any] = {"metrics_port": 0, "metrics_app_path": "/metrics", "request_logs": False}
    if gzip_runs == "inside":
        app: Any = LLMTelemetryMiddleware(GZipMiddleware(bare_app(reply_words=200), minimum_size=100), **options)
    else:
        app = GZipMiddleware(LLMTelemetryMiddleware(bare_app(reply_words=200), **options), minimum_size=100)
    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        chat = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0).chat.completions
        raw = chat.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one two"}])
        assert raw.headers["content-encoding"] == "gzip"  # what the app sent, as it sent it
        usage = raw.parse().usage
        assert usage is not None
        claude = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        raw_message = claude.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=300, messages=[{"role": "user", "content": "three"}]
        )
        assert raw_message.headers["content-encoding"] == "gzip"
        message = raw_message.parse()
        with pytest.raises(openai.BadRequestError):
            chat.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-demo-fail": "context_length"},
            )
        metrics = _settled(port, "llm_requests_total", 3)
    assert (
        metrics.value("llm_tokens_total", gen_ai_response_model="gpt-4o-mini", gen_ai_token_type="output")
        == usage.completion_tokens
    )
    assert metrics.value("llm_tokens_total", gen_ai_request_model="gpt-4o-mini", gen_ai_token_type="input") == (
        usage.prompt_tokens
    )
    assert metrics.value("llm_tokens_total", gen_ai_provider_name="anthropic", gen_ai_token_type="output") == (
        message.usage.output_tokens
    )
    # The error body, compressed too, still tells a context overflow from any other bad request.
    assert metrics.value("llm_errors_total", error_type="context_length") == 1
    assert metrics.value("llm_telemetry_internal_errors_total") == 0


@pytest.mark.parametrize("coding", ["br", "zstd"])
def test_streams_compressed_chunk_by_chunk_are_read_for_the_official_sdks(coding: str) -> None:
    """``brotli-asgi`` and ``zstd-asgi`` compress streams too, flushing every chunk: each event is read as it
    passes (tokens, time to first token), and the SDKs, which ask for both codings when they can
    decode them, get what the app sent."""
    compress: Any = BrotliMiddleware if coding == "br" else ZstdMiddleware
    app = LLMTelemetryMiddleware(
        compress(bare_app(reply_words=120), minimum_size=100),
        metrics_port=0,
        metrics_app_path="/metrics",
        request_logs=False,
    )
    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        chat = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0).chat.completions
        messages: Any = [{"role": "user", "content": "one two three"}]
        with chat.with_streaming_response.create(
            model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
        ) as raw:
            assert raw.headers["content-encoding"] == coding  # the stream as the app compressed it
            chunks = list(raw.parse())
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens > 1
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        plain = chat.create(model="gpt-4o-mini", messages=messages)  # compressed too, not streamed
        assert plain.usage is not None
        claude = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        with claude.messages.stream(
            model="claude-sonnet-4-5", max_tokens=300, messages=[{"role": "user", "content": "four"}]
        ) as stream:
            final = stream.get_final_message()
        metrics = _settled(port, "llm_requests_total", 3)
    assert text
    assert metrics.value("llm_tokens_total", gen_ai_request_model="gpt-4o-mini", gen_ai_token_type="output") == (
        usage.completion_tokens + plain.usage.completion_tokens
    )
    assert metrics.value("llm_tokens_total", gen_ai_provider_name="anthropic", gen_ai_token_type="output") == (
        final.usage.output_tokens
    )
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count") == 2  # both streams
    assert metrics.value("llm_telemetry_internal_errors_total") == 0


def _events(words: list[str], usage: bool) -> bytes:
    events = [{"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": w}}]} for w in words]
    events.append({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        events.append({"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _compress(coding: str, body: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(body, mtime=0)
    if coding == "gzip-members":  # a member per piece, as Django's GZipMiddleware compresses a streamed answer
        third = len(body) // 3 + 1
        return b"".join(gzip.compress(body[i : i + third], mtime=0) for i in range(0, len(body), third))
    if coding == "br":
        return bytes(brotli.compress(body))
    if coding == "zstd":
        return zstd.compress(body)
    if coding == "zstd-frames":  # one frame per third of the body: a valid stream, as a server may send it
        third = len(body) // 3 + 1
        return b"".join(zstd.compress(body[i : i + third]) for i in range(0, len(body), third))
    raw = coding == "raw-deflate"  # a bare deflate stream, which some servers send as ``deflate``
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()


def _read(body_pieces: list[bytes], stream: bool, coding: str | None) -> tuple[Any, ...]:
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader: Any = spec.response_reader(call, stream=stream, capture=False)
    if coding is not None:
        name = {"raw-deflate": "deflate", "zstd-frames": "zstd", "gzip-members": "gzip"}.get(coding, coding)
        reader = DecodingReader(reader, name.encode(), 1 << 30)
    for i, piece in enumerate(body_pieces):
        reader.feed(piece, now=1.0 + i)
    reader.finish(now=100.0)
    return call.input_tokens, call.output_tokens, call.usage_source, call.finish_reasons, call.response_model


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=20),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["gzip", "gzip-members", "deflate", "raw-deflate", "br", "zstd", "zstd-frames"]),
    st.lists(st.integers(min_value=0), max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_a_compressed_body_reads_as_the_same_body_uncompressed(
    words: list[str], stream: bool, usage: bool, coding: str, points: list[int]
) -> None:
    """Whatever the coding and wherever the compressed bytes are cut, the call read is the one the plain body
    gives; a JSON body too."""
    if stream:
        body = _events(words, usage)
    else:
        answer: dict[str, Any] = {"model": "m", "choices": [{"index": 0, "message": {"content": " ".join(words)}}]}
        answer["choices"][0]["finish_reason"] = "stop"
        if usage:
            answer["usage"] = {"prompt_tokens": 4, "completion_tokens": 9}
        body = json.dumps(answer).encode()
    plain = _read([body], stream, None)
    assert plain[4] == "m" and plain[3] == ["stop"]
    assert _read(_cuts(_compress(coding, body), points), stream, coding) == plain


def _serve_compressed(payload: bytes, coding: bytes, content_type: bytes = b"application/json") -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", content_type), (b"content-encoding", coding)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(0, len(payload), 65536):
            await send({"type": "http.response.body", "body": payload[i : i + 65536], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def _request_traced(app: Callable[..., Any], request: dict[str, Any]) -> tuple[bytes, int, Metrics]:
    """One request to ``app`` wrapped in the middleware, under uvicorn: the bytes the client got as sent (no
    decoding on its side either), the peak of memory traced meanwhile, and the metrics once it is recorded."""
    import httpx

    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, metrics_app_path="/metrics", request_logs=False)
    with serve(wrapped) as base:
        # The first request of the process imports httpx's transport (httpcore, h11, h2, hpack, certifi, idna: over
        # a MB of code objects): traced, it was part of the peak of whichever test ran first, not the request's. A
        # HEAD, which the middleware passes through unread (and the server answers with no body), makes them first.
        with httpx.Client(timeout=60) as client:
            client.head(base + "/warm-up")
        tracemalloc.start()
        try:
            port = int(base.rsplit(":", 1)[1])
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with httpx.Client(timeout=60) as client:
                with client.stream("POST", base + "/v1/chat/completions", json=request) as response:
                    got = b"".join(response.iter_raw())
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        return got, peak, _settled(port, "llm_requests_total", 1)


@pytest.mark.parametrize("case", ["bomb", "br-bomb", "zstd-bomb", "not-gzip", "not-brotli", "not-zstd"])
def test_a_body_that_inflates_too_far_or_is_not_what_it_says_passes_unread(case: str) -> None:
    """A JSON answer of 64 MB packed into a few KB is read no further than the JSON limit (memory kept stays
    bounded); a body whose coding is false reaches the client unchanged, with nothing read and no internal
    error."""

    pad = b'{"model": "m", "pad": "' + b" " * (64 << 20) + b'", "usage": {"prompt_tokens": 1}}'
    payload, coding = {
        "bomb": (gzip.compress(pad, compresslevel=9), b"gzip"),
        "br-bomb": (bytes(brotli.compress(pad, quality=5)), b"br"),
        "zstd-bomb": (zstd.compress(pad), b"zstd"),
        "not-gzip": (b'{"model": "m", "usage": {"prompt_tokens": 5, "completion_tokens": 6}}', b"gzip"),
        "not-brotli": (b"\x8b\x03\x80not really brotli\x03", b"br"),
        "not-zstd": (b"(\xb5/\xfd not really zstd", b"zstd"),
    }[case]
    del pad
    got, peak, metrics = _request_traced(_serve_compressed(payload, coding), {"model": "m", "messages": []})
    assert got == payload  # the compressed bytes, untouched
    assert metrics.value("llm_requests_total", gen_ai_request_model="m") == 1
    assert metrics.value("llm_errors_total") == 0
    assert metrics.value("llm_tokens_total", llm_usage_source="reported") == 0
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
    # The 8 MiB the JSON reader reads at most, once more while decompressing, and the client's copy of the payload.
    assert peak < 3 * (8 << 20) + 2 * len(payload)


def _one_long_line(coding: str, size: int) -> bytes:
    line = b"data: " + b"x" * size
    if coding == "br":
        return bytes(brotli.compress(line, quality=5))
    return gzip.compress(line, compresslevel=9) if coding == "gzip" else zstd.compress(line)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_a_stream_that_inflates_too_far_costs_no_more_than_a_step_of_it(coding: str) -> None:
    """An event stream of a few hundred KB that inflates to 96 MB of one line: decompressed a step at a time, each
    step read (and dropped, past the event size limit) before the next, never the 64 MiB stream limit at once and
    once more in the event reader's buffer. The client gets the compressed bytes untouched."""
    payload = _one_long_line(coding, 96 << 20)
    app = _serve_compressed(payload, coding.encode(), b"text/event-stream")
    got, peak, metrics = _request_traced(app, {"model": "m", "messages": [], "stream": True})
    assert got == payload
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
    # The event reader's limit for one event (1 MiB), a step or two, and the client's copy of the payload.
    assert peak < (4 << 20) + 2 * len(payload), peak


@pytest.mark.parametrize("coding", ["gzip", "identity"])
@pytest.mark.parametrize("junk", [1000, 4_000_000])
def test_a_chunk_of_millions_of_empty_events_is_read_for_a_tenth_of_a_second_at_most(coding: str, junk: int) -> None:
    """Reading costs what the events cost: one chunk of millions of empty events (28 MB, sent whole, or packed by
    gzip into a few tens of KB) held the event loop, and every other request, for up to half a minute. One chunk is
    read for MAX_READ_SECONDS of CPU at most, then the rest of the answer is not read: its usage, after the junk, is
    not found, and what was read counts (the output estimated from the delta before the junk). The same answer with
    a thousand empty events is read to its usage. The client gets the bytes untouched."""
    delta = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    body = delta + b"data:\n\n" * junk + usage + b"data: [DONE]\n\n"
    payload = gzip.compress(body, compresslevel=6) if coding == "gzip" else body

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream"), (b"content-encoding", coding.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    got, _peak, metrics = _request_traced(app, {"model": "m", "messages": [], "stream": True})
    assert got == payload
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
    assert metrics.value("llm_tokens_total", llm_usage_source="reported") == (0 if junk > 1000 else 5)
    estimated = metrics.value("llm_tokens_total", llm_usage_source="estimated", gen_ai_token_type="output")
    assert estimated == (1 if junk > 1000 else 0)


def _in_pieces(body: bytes, coding: str, piece: int) -> list[bytes]:
    """``body`` in chunks of ``piece`` bytes; gzip: each piece compressed and flushed on its own, as a relay of a
    compressed upstream (or Starlette's GZipMiddleware, per body message) sends it."""
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)]
    if coding == "identity":
        return pieces
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return [packer.compress(p) + packer.flush(zlib.Z_SYNC_FLUSH) for p in pieces] + [packer.flush()]


@pytest.mark.parametrize(("coding", "piece"), [("identity", 4 << 10), ("identity", 40 << 10), ("gzip", 32 << 10)])
@pytest.mark.parametrize("junk", [1000, 4_000_000])
def test_millions_of_empty_events_in_many_small_chunks_are_read_for_a_bounded_time_in_all(
    coding: str, piece: int, junk: int
) -> None:
    """The time limit of one chunk bounded nothing when the same junk came in many chunks, each read within it: 28
    MB of empty events in 4 KB chunks, or 94 KB of gzip in 241 chunks, kept the event loop (and every other request)
    for tens of seconds, and the client's stream crawled. A response is read for READ_BUDGET_SECONDS in all (and a
    share of its own time), then no further: its usage, after the junk, is not found, and what was read counts. The
    same answer with a thousand empty events is read to its usage. The client gets the bytes untouched, in the
    chunks the app sent."""
    delta = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
    rest = _in_pieces(b"data:\n\n" * junk + usage + b"data: [DONE]\n\n", "identity", piece)
    chunks = [delta, *rest] if coding == "identity" else _in_pieces(delta + b"".join(rest), coding, piece)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream"), (b"content-encoding", coding.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    got, _peak, metrics = _request_traced(app, {"model": "m", "messages": [], "stream": True})
    assert got == b"".join(chunks)
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
    assert metrics.value("llm_errors_total") == 0
    assert metrics.value("llm_tokens_total", llm_usage_source="reported") == (0 if junk > 1000 else 5)
    estimated = metrics.value("llm_tokens_total", llm_usage_source="estimated", gen_ai_token_type="output")
    assert estimated == (1 if junk > 1000 else 0)


def test_a_long_real_stream_sent_at_once_is_read_whole() -> None:
    """The limit on reading a whole answer leaves real ones alone: 20,000 deltas of the Responses API cut by a proxy
    into 8 KiB pieces (so that every chunk is read in full, none by the shortcut for a text delta), sent as fast as
    a cache replays them, through real uvicorn, are read to their usage."""
    import httpx

    def event(obj: dict[str, Any]) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"

    head = {"id": "r", "object": "response", "model": "gpt-4.1", "status": "in_progress", "output": []}
    chunks = [event({"type": "response.created", "sequence_number": 0, "response": head})]
    chunks += [
        event({"type": "response.output_text.delta", "sequence_number": i, "item_id": "m", "output_index": 0,
               "content_index": 0, "delta": " word", "logprobs": []})
        for i in range(1, 20_001)
    ]  # fmt: skip
    usage = {"input_tokens": 5, "output_tokens": 20_000, "total_tokens": 20_005}
    done = {**head, "status": "completed", "usage": usage}
    chunks.append(event({"type": "response.completed", "sequence_number": 20_001, "response": done}))

    body = b"".join(chunks)
    chunks = [body[i : i + 8192] for i in range(0, len(body), 8192)]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, metrics_app_path="/metrics", request_logs=False)
    with serve(wrapped) as base:
        with httpx.Client(timeout=60) as client:
            got = client.post(base + "/v1/responses", json={"model": "gpt-4.1", "input": "hi", "stream": True})
        metrics = _settled(int(base.rsplit(":", 1)[1]), "llm_requests_total", 1)
    wrapped.telemetry.shutdown()
    assert got.content == b"".join(chunks)
    assert metrics.value("llm_tokens_total", llm_usage_source="reported", gen_ai_token_type="output") == 20_000


def _chat_chunk(delta: dict[str, Any]) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    return b"data: " + json.dumps({"id": "c", "model": "m", "choices": [choice]}).encode() + b"\n\n"


def _read_with_stalls(stall: Callable[[], None], chunks: int) -> Any:
    """A chat stream of ``chunks`` chunks of two deltas each (read in full, not by the shortcut), each of whose
    first look by the event decoder runs ``stall``, then its usage; the call as recorded."""
    from llm_telemetry.apis import APIS
    from llm_telemetry.record import LLMCall

    class Stalling(bytes):
        def __getitem__(self, key: Any) -> Any:
            if key == slice(None, 6):  # (the event decoder's first look at a chunk)
                stall()
            return bytes.__getitem__(self, key)

    call = LLMCall("chat", "openai", time.perf_counter())
    reader = APIS["openai.chat"].response_reader(call, stream=True, capture=False)
    reader.feed(_chat_chunk({"role": "assistant", "content": ""}))
    for i in range(chunks):
        reader.feed(Stalling(_chat_chunk({"content": f"w{i}"}) + _chat_chunk({"content": " x"})))
    usage = {"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2 * chunks}}
    reader.feed(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    reader.finish(time.perf_counter())
    return call


def test_one_pause_while_a_chunk_is_read_does_not_cut_the_stream_short() -> None:
    """A full garbage collection of a large heap takes the process's CPU for half a second, and may do so inside
    the reading of one chunk. Counted whole, that one pause spent the budget of the whole answer at its start, and
    the stream's usage was lost without a word (tokens estimated, cost too low): a chunk adds to it no more than its
    reading can cost. The pause here is the chunk's own: bytes whose first slicing keeps the CPU busy 0.7 s."""

    def busy() -> None:
        until = time.thread_time() + 0.7
        while time.thread_time() < until:
            pass

    calls = iter([busy])
    call = _read_with_stalls(lambda: next(calls, lambda: None)(), 4)
    assert (call.input_tokens, call.output_tokens, call.usage_source) == (3, 8, "reported")


def test_waiting_while_a_chunk_is_read_does_not_count() -> None:
    """Another thread of the app holding the interpreter (a sync endpoint in the thread pool, CPU-heavy Python
    work), or a throttled container, makes the reading of every chunk wait. Counted by the clock, those waits cut a
    real stream replayed at once short (a quarter of its output estimated, its cost too low); the budget counts the
    reading thread's CPU time. The wait here: each chunk's first slicing sleeps a millisecond."""
    call = _read_with_stalls(lambda: time.sleep(0.001), 1000)
    assert (call.input_tokens, call.output_tokens, call.usage_source) == (3, 2000, "reported")


def _busy(seconds: float) -> None:
    """Keep this thread's CPU busy for ``seconds``, as a full garbage collection of a large heap does."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_one_pause_while_a_large_chunk_is_read_does_not_stop_its_reading() -> None:
    """A chunk over READ_STEP (an event of a long tool call's arguments, or a proxy's large pieces) is read a step
    at a time for MAX_READ_SECONDS of CPU at most. A garbage collection inside one step counted whole and passed
    that limit: the rest of the answer went unread, and its usage, after the large event, was lost (the output
    estimated). Through real uvicorn: the chunk's first step costs 0.3 s of CPU (bytes whose first slicing keeps
    the CPU busy), the answer is still read to its usage, and the client gets the bytes untouched."""
    import httpx

    from llm_telemetry.decoding import READ_STEP

    class Pausing(bytes):
        def __getitem__(self, key: Any) -> Any:
            if key == slice(0, READ_STEP):  # (the first step of the reading)
                _busy(0.3)
            return bytes.__getitem__(self, key)

    body = (
        _chat_chunk({"role": "assistant", "content": ""})
        + _chat_chunk({"content": "x" * 100_000})
        + b'data: {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        + b'data: {"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}\n\n'
        + b"data: [DONE]\n\n"
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": Pausing(body), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    wrapped = LLMTelemetryMiddleware(app, metrics_port=0, metrics_app_path="/metrics", request_logs=False)
    with serve(wrapped) as base:
        with httpx.Client(timeout=60) as client:
            got = client.post(base + "/v1/chat/completions", json={"model": "m", "messages": [], "stream": True})
        metrics = _settled(int(base.rsplit(":", 1)[1]), "llm_requests_total", 1)
    wrapped.telemetry.shutdown()
    assert got.content == body
    assert metrics.value("llm_tokens_total", llm_usage_source="reported", gen_ai_token_type="output") == 7
    assert metrics.value("llm_tokens_total", llm_usage_source="estimated") == 0


class _Collect:
    """The reader a DecodingReader feeds, keeping what it is given."""

    def __init__(self) -> None:
        self.data = b""
        self.finished = False

    def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
        self.data += chunk

    def finish(self, now: float) -> None:
        self.finished = True


@pytest.mark.parametrize("coding", [b"gzip", b"br", b"zstd"])
def test_one_pause_while_a_compressed_chunk_is_inflated_does_not_stop_its_reading(coding: bytes) -> None:
    """A compressed chunk is inflated a piece at a time for MAX_READ_SECONDS of CPU at most; one garbage collection
    inside one piece's reading counts no more than that piece can cost. Here 1 MB of real events in one compressed
    chunk, the second piece's reading taking 0.3 s of CPU: every byte reaches the reader behind."""

    class Pausing(_Collect):
        paused = False

        def feed(self, chunk: bytes, now: float | None = None, shaped: bool = True) -> None:
            if self.data and not self.paused:
                self.paused = True
                _busy(0.3)
            super().feed(chunk, now, shaped)

    body = b"".join(_chat_chunk({"content": f"w{i}"}) for i in range(15_000))
    assert len(body) > 1_000_000
    collect = Pausing()
    reader = DecodingReader(collect, coding, 64 << 20)  # type: ignore[arg-type]
    reader.feed(_compress(coding.decode(), body))
    reader.finish(1.0)
    assert collect.paused
    assert collect.data == body


def _packed_in_two(coding: bytes, first: bytes, rest: bytes) -> tuple[bytes, bytes]:
    """``first`` and ``rest`` compressed as one body, cut where the bytes decode to exactly ``first``."""
    if coding == b"gzip":
        packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        return packer.compress(first) + packer.flush(zlib.Z_SYNC_FLUSH), packer.compress(rest) + packer.flush()
    if coding == b"br":
        brotli_packer = brotli.Compressor()
        return brotli_packer.process(first) + brotli_packer.flush(), brotli_packer.process(
            rest
        ) + brotli_packer.finish()
    zstd_packer = zstd.ZstdCompressor()
    return (
        zstd_packer.compress(first, zstd.ZstdCompressor.FLUSH_BLOCK),
        zstd_packer.compress(rest, zstd.ZstdCompressor.FLUSH_FRAME),
    )


@pytest.mark.parametrize("coding", [b"gzip", b"br", b"zstd"])
@pytest.mark.parametrize("split", ["at-the-limit", "past-the-limit", "one-chunk"])
def test_decoding_hands_on_no_more_than_its_limit_wherever_the_chunks_end(split: str, coding: bytes) -> None:
    """100 bytes, then 4 MB that compress to almost nothing: the reader behind gets the 100 bytes and no more,
    whether a chunk ends exactly where the output reaches the limit, past it, or the body is one chunk."""
    first, rest = b"x" * 100, b" " * (4 << 20)
    head, tail = _packed_in_two(coding, first, rest)
    chunks = {
        "at-the-limit": [head, *_cuts(tail, [7, 30])],
        "past-the-limit": [head + tail[:5], tail[5:]],
        "one-chunk": [head + tail],
    }[split]
    collect = _Collect()
    reader = DecodingReader(collect, coding, 100)  # type: ignore[arg-type]
    for chunk in chunks:
        reader.feed(chunk)
    reader.finish(1.0)
    assert collect.data == first and collect.finished


@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=1, max_value=400_000),
    st.sampled_from(["gzip", "gzip-members", "deflate", "raw-deflate", "br", "zstd", "zstd-frames"]),
    st.lists(st.integers(min_value=0), max_size=6),
)
@settings(max_examples=60, deadline=None)
def test_bytes_that_do_not_compress_are_decoded_whole_in_steps_wherever_the_chunks_end(
    seed: int, size: int, coding: str, points: list[int]
) -> None:
    """Random bytes compress to about their own size, so a chunk of hundreds of kilobytes is decompressed over many
    steps, each one a piece of the chunk; runs of one byte between them inflate a piece past a step, which leaves
    part of it for the next: the reader behind gets every byte, in order, once."""
    rnd = random.Random(seed)
    parts: list[bytes] = []
    while sum(map(len, parts)) < size:
        parts += [rnd.randbytes(rnd.randint(1, 20_000)), bytes([rnd.randrange(256)]) * rnd.randint(1, 200_000)]
    body = b"".join(parts)[:size]
    name = {"raw-deflate": "deflate", "zstd-frames": "zstd", "gzip-members": "gzip"}.get(coding, coding)
    collect = _Collect()
    reader = DecodingReader(collect, name.encode(), 1 << 30)  # type: ignore[arg-type]
    for chunk in _cuts(_compress(coding, body), points):
        reader.feed(chunk)
    reader.finish(1.0)
    assert collect.data == body


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "zstd-frames"])
def test_a_large_answer_in_one_compressed_chunk_is_read_whole(coding: str) -> None:
    """A JSON answer of ~2 MB sent as one compressed chunk (it packs into a few KB) is read whole, although its
    decompressor hands it over in pieces."""
    answer = {
        "model": "m",
        "choices": [{"index": 0, "message": {"content": "word " * 400_000}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 400_000},
    }
    body = json.dumps(answer).encode()
    packed = _compress(coding, body)
    assert len(packed) < len(body) // 100
    assert _read([packed], False, coding) == _read([body], False, None) == (4, 400_000, "reported", ["stop"], "m")


def test_without_a_decoder_a_coding_passes_unread() -> None:
    """Where ``brotli`` or the Zstandard module is not installed (or, for brotli, too old to bound its output),
    only ``gzip`` and ``deflate`` are read. A coding not read, here two at once, reaches the client untouched."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['brotli'] = sys.modules['backports.zstd'] = sys.modules['compression.zstd'] = None\n"
        "from llm_telemetry.decoding import CODINGS\n"
        "print(sorted(c.decode() for c in CODINGS))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["['deflate',", "'gzip',", "'x-gzip']"]
    zstd_body = zstd.compress(b'{"model": "m", "usage": {"prompt_tokens": 5, "completion_tokens": 6}}')
    app = LLMTelemetryMiddleware(
        _serve_compressed(zstd_body, b"zstd, gzip"), metrics_port=0, metrics_app_path="/metrics", request_logs=False
    )
    import httpx

    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", base + "/v1/chat/completions", json={"model": "m"}) as response:
                got = b"".join(response.iter_raw())
        metrics = _settled(port, "llm_requests_total", 1)
    assert got == zstd_body
    assert metrics.value("llm_requests_total", gen_ai_request_model="m") == 1
    assert metrics.value("llm_tokens_total") == 0  # two codings at once: not read, rather than misread
    assert metrics.value("llm_telemetry_internal_errors_total") == 0
