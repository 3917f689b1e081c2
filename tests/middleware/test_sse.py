"""The SSE decoder: events survive any split, line endings of every kind, and memory stays bounded."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry.apis import usage_in_tail
from llm_telemetry.sse import SSEDecoder

STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
    b"event: content_block_delta\n"
    b'data: {"text":"h\xc3\xa9llo"}\n\n'
    b"data: line one\n"
    b"data: line two\n\n"
    b"data:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ("message", b'{"choices":[{"delta":{"role":"assistant"}}]}'),
    ("content_block_delta", b'{"text":"h\xc3\xa9llo"}'),
    ("message", b"line one\nline two"),
    ("message", b"no-space"),
    ("message", b"[DONE]"),
]


def decode(chunks: list[bytes], decoder: SSEDecoder | None = None) -> list[tuple[str, bytes]]:
    decoder = decoder or SSEDecoder()
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def test_sse_decodes_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@settings(max_examples=300, deadline=None)
@example(cuts=[500, 849])  # an event: line ending one chunk, its data: line starting the next
def test_sse_split_at_any_byte_gives_same_events(cuts: list[int]) -> None:
    assert decode(split_at(STREAM, cuts)) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40), st.sampled_from([b"\r\n", b"\r", b"\n"]))
@settings(max_examples=300, deadline=None)
def test_sse_any_line_ending_split_anywhere(cuts: list[int], newline: bytes) -> None:
    data = STREAM.replace(b"\n", newline)
    assert decode(split_at(data, cuts)) == EXPECTED


def mixed_endings(newlines: list[bytes]) -> bytes:
    """STREAM with each line ended by the next of ``newlines`` (cycled): a CR never followed by a LF that ends an
    empty line, which would make the two one CRLF."""
    data = b""
    for line, newline in zip(STREAM.split(b"\n")[:-1], itertools.cycle(newlines), strict=False):
        if data.endswith(b"\r") and not line and newline == b"\n":
            newline = b"\r\n"
        data += line + newline
    return data


@given(
    st.lists(st.sampled_from([b"\r\n", b"\r", b"\n"]), min_size=1, max_size=14),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
@settings(max_examples=300, deadline=None)
# A CRLF cut between its CR and LF, then (a chunk later) a LF starting a chunk: a line break of its own.
@example(newlines=[b"\r\n", b"\r\n", b"\n"], cuts=[21, 74])
def test_sse_line_endings_mixed_in_one_stream_split_anywhere(newlines: list[bytes], cuts: list[int]) -> None:
    data = mixed_endings(newlines)
    assert decode(split_at(data, cuts)) == EXPECTED


@given(
    st.lists(
        st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=4),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.integers(min_value=0, max_value=100_000), max_size=30),
)
@settings(max_examples=200, deadline=None)
def test_sse_round_trips_arbitrary_json_payloads(payloads: list[dict[str, str]], cuts: list[int]) -> None:
    data = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    events = decode(split_at(data, cuts))
    assert [json.loads(body) for _, body in events] == payloads


def test_sse_one_byte_at_a_time() -> None:
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_sse_oversized_event_is_dropped_and_the_stream_recovers() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    huge = b"data: " + b"x" * 1000 + b"\n\n"
    events = decode([b"data: a\n\n", huge[:300], huge[300:], b"data: b\n\n"], decoder)
    assert events == [("message", b"a"), ("message", b"b")]
    assert decoder.dropped_events == 1


def test_sse_buffer_stays_bounded_without_newlines() -> None:
    decoder = SSEDecoder(max_event_bytes=1024)
    for _ in range(1000):
        decoder.feed(b"y" * 100)
        assert len(decoder._buffer) <= 1024
    assert decoder.dropped_events >= 1


def test_sse_unterminated_event_at_close_is_not_dispatched() -> None:
    # The spec discards an event that never saw its blank line.
    assert decode([b"data: a\n\ndata: partial"]) == [("message", b"a")]


@pytest.mark.parametrize("end", [b"", b"\n", b"\r\n", b"\r"], ids=["open-line", "LF", "CRLF", "CR"])
def test_sse_event_without_its_blank_line_is_not_dispatched_at_close_but_is_unfinished(end: bytes) -> None:
    """Whether or not its last line ended, an event whose blank line never came is not dispatched at close (no SSE
    reader does); it is what :meth:`SSEDecoder.unfinished` gives, name and data."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\nevent: last\ndata: x\ndata: y" + end) == [("message", b"a")]
    assert decoder.close() == []
    assert decoder.unfinished() == ("last", b"x\ny")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["", "event: delta\n", "event:\n", "event:  spaced\n", ": comment\n"]),
            st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
        ),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=300, deadline=None)
def test_sse_whole_event_chunks_decode_like_byte_by_byte(events: list[tuple[str, bytes]]) -> None:
    # Whole-event chunks take a fast path; it must agree with the general decoder fed one byte at a time.
    data = b"".join(head.encode() + b"data: " + body + b"\n\n" for head, body in events)
    assert decode([data]) == decode([data[i : i + 1] for i in range(len(data))])


def test_sse_a_dropped_event_keeps_its_name_and_last_bytes() -> None:
    """An event over the limit is dropped, but its name and last TAIL_BYTES are kept: the Responses API puts a
    stream's usage at the end of its last event, which repeats the whole response (image results and all)."""
    decoder = SSEDecoder(max_event_bytes=1024)
    big = b'{"type":"response.completed","response":{"output":"' + b"A" * 5000 + b'","usage":{"input_tokens":7}}}'
    events = decode([b"event: response.created\ndata: {}\n\n"], decoder)
    assert events == [("response.created", b"{}")]
    assert (decoder.dropped_events, decoder.dropped_event, decoder.dropped_tail()) == (0, "", b"")
    events = decode(
        [b"event: response.completed\n", b"data: " + big[:3000], big[3000:] + b"\n\n", b"data: ok\n\n"], decoder
    )
    assert events == [("message", b"ok")]
    assert decoder.dropped_event == "response.completed"
    assert decoder.dropped_tail().endswith(b'"usage":{"input_tokens":7}}}')


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "line-by-line"])
def test_sse_a_dropped_events_later_data_lines_are_in_its_tail(split: bool) -> None:
    """A multi-line event whose first line is over the limit keeps its later lines in the tail, each after a LF
    (as sent, field name and all): the usage, sent last on a line of its own, is there to read."""
    decoder = SSEDecoder(max_event_bytes=1024)
    lines = [
        b"event: response.completed\n",
        b'data: {"output":"' + b"A" * 5000 + b'",\n',
        b'data: "usage":{"input_tokens":7}}\n',
        b"\n",
    ]
    events = decode(lines if split else [b"".join(lines)], decoder) + decode([b"data: ok\n\n"], decoder)
    assert events == [("message", b"ok")]
    assert decoder.dropped_event == "response.completed"
    assert decoder.dropped_tail().endswith(b'A",\ndata: "usage":{"input_tokens":7}}')
    assert usage_in_tail(decoder.dropped_tail()) == {"input_tokens": 7}


def test_sse_a_dropped_tail_is_bounded() -> None:
    from llm_telemetry.sse import TAIL_BYTES

    decoder = SSEDecoder(max_event_bytes=1024)
    for _ in range(100):
        decoder.feed(b"data: " + b"x" * 10_000)
        assert len(decoder._tail) <= 2 * TAIL_BYTES + 10_006
    decoder.feed(b"END\n\n")
    assert decoder.dropped_events == 1
    assert len(decoder.dropped_tail()) == TAIL_BYTES and decoder.dropped_tail().endswith(b"xEND")


def test_sse_lines_after_a_drop_are_only_kept_in_its_tail() -> None:
    """The data lines of a dropped event that come after the line that dropped it are skipped: kept in its tail as
    they came, never assembled again (so they cannot drop it a second time and lose the tail)."""
    decoder = SSEDecoder(max_event_bytes=16)
    later = b"data: 0123456789\n" * 3
    assert decode([b"data: " + b"x" * 20 + b"\n" + later + b"\ndata: ok\n\n"], decoder) == [("message", b"ok")]
    assert decoder.dropped_events == 1
    assert decoder.dropped_tail() == b"data: " + b"x" * 20 + b"\n" + later[:-1]


def test_sse_a_dropped_events_later_overlong_line_follows_a_line_break_in_its_tail_however_it_is_cut() -> None:
    """A later line of a dropped event that is over the limit itself, arriving in pieces, goes to the tail after a
    LF as it does when it arrives whole."""
    body = b"data: " + b"x" * 20 + b"\ndata: " + b"y" * 20 + b"\n\n"
    whole = SSEDecoder(max_event_bytes=16)
    pieces = SSEDecoder(max_event_bytes=16)
    assert decode([body], whole) == decode([body[i : i + 1] for i in range(len(body))], pieces) == []
    assert whole.dropped_tail() == pieces.dropped_tail() == b"data: " + b"x" * 20 + b"\ndata: " + b"y" * 20


@pytest.mark.parametrize(
    "chunk",
    [b"data: a\rdata: b\n\n", b"data: a\r\n\r\n", b"event: e\rdata: a\n\n", b"data: a\n\rdata: b\r\n\n"],
)
def test_sse_a_whole_chunk_with_carriage_returns_decodes_like_byte_by_byte(chunk: bytes) -> None:
    """A CR is a line break wherever it is: a chunk ending in a blank line with a CR in it is no whole-event chunk of
    LF-ended lines (the fast path), and decodes as its bytes fed one by one do."""
    assert decode([chunk]) == decode([chunk[i : i + 1] for i in range(len(chunk))])


@given(
    body=st.lists(
        st.sampled_from(
            [b"data: ", b"data:", b"event: big\n", b"x" * 7, b"\n", b"\r\n", b"\r", b"\n\n", b": c\n", b"y"]
        ),
        max_size=60,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 400), max_size=12),
    limit=st.sampled_from([8, 16, 64]),
)
@settings(max_examples=400, deadline=None)
@example(body=b"event: big\ndata: " + b"x" * 7 * 4 + b"\n\n", cuts=[20], limit=16)
@example(body=b"data: " + b"x" * 7 * 3 + b"\ndata: y\r\n\r\n", cuts=[3, 30], limit=8)
def test_sse_what_a_dropped_event_leaves_does_not_depend_on_chunking(body: bytes, cuts: list[int], limit: int) -> None:
    def run(chunks: list[bytes]) -> tuple[object, ...]:
        decoder = SSEDecoder(max_event_bytes=limit)
        events = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.close()
        return events, decoder.dropped_events, decoder.dropped_event, decoder.dropped_tail()

    edges = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    assert run([body[a:b] for a, b in itertools.pairwise(edges)]) == run([body])
