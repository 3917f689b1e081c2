"""Responses API streams read by their shape: every event numbers itself (``sequence_number``) and OpenAI's end with
a random ``obfuscation`` member, so no two text deltas are alike byte for byte around their text as a chat stream's
are. The reader recognises a text-delta event by one pattern instead, keeps such chunks as chat ones are kept, and
must record exactly what parsing every event records, whatever the events, their members' order and the chunking.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry.apis import APIS
from llm_telemetry.record import LLMCall
from support import read_as_middleware

SPEC = APIS["openai.responses"]
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=10)
#: Random values of OpenAI's obfuscation member, and values that are not plain strings.
obfuscations = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", max_size=16) | texts


def response(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4.1-mini", "status": status,
            "output": [], **extra}  # fmt: skip


USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 7,
         "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 18}  # fmt: skip

#: Events that are not plain text deltas, put anywhere after the first one.
OTHERS: list[dict[str, Any]] = [
    {"type": "response.output_item.added", "output_index": 1,
     "item": {"id": "fc_1", "type": "function_call", "name": "get_weather", "arguments": "", "status": "in_progress"}},
    {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1, "delta": '{"city'},
    {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0, "delta": ""},
    {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0, "delta": "lp",
     "logprobs": [{"token": "lp", "logprob": -0.1, "top_logprobs": []}]},
    {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0, "delta": "x",
     "note": "a member of a \"quoted\" value"},
    {"type": "error", "code": "server_error", "message": "upstream failed"},
    {"type": "response.failed", "response": response("failed", error={"code": "rate_limit_exceeded", "message": "x"})},
    {"type": "response.incomplete", "response": response("incomplete", incomplete_details={"reason": "max_tokens"},
                                                         usage=USAGE)},
    {"type": "response.output_text.done", "item_id": "m", "output_index": 0, "content_index": 0, "text": "abc"},
]  # fmt: skip

#: Bytes put in place of a delta's text in an event of the text-delta shape: JSON that turns the event into another
#: (a second type or text, a second event), text that is no JSON string, and arbitrary bytes.
CRAFTED = [
    b'x","type":"error","y":"',
    b'x","delta":"',
    b'","delta":"x',
    b'x"}\n\ndata: {"type":"error","code":"server_error"}\n\ndata: {"a":"',
    b"bad \\q escape",
    b"short \\u00e escape",
    b"tab\there",
    b"\xff\xfe",
    b"",
]
middles = st.sampled_from(CRAFTED) | st.binary(max_size=12)

KEY_ORDERS = {
    # As OpenAI's API sends them.
    "openai": ["type", "sequence_number", "item_id", "output_index", "content_index", "delta", "logprobs",
               "obfuscation"],
    # As servers built on the openai package's models serialise them (alphabetical).
    "models": ["content_index", "delta", "item_id", "logprobs", "obfuscation", "output_index", "sequence_number",
               "type"],
}  # fmt: skip


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """A Responses stream: created, text deltas of arbitrary text (output, reasoning summary or refusal), other
    events anywhere after the first delta, events of the delta shape around crafted bytes, and the completion; its
    members in OpenAI's order or the models' one, compact or spaced, with or without event lines and obfuscation
    members; optionally re-chunked by a proxy at arbitrary cuts."""
    order = KEY_ORDERS[draw(st.sampled_from(sorted(KEY_ORDERS)))]
    separators = (", ", ": ") if draw(st.booleans()) else (",", ":")
    named, obfuscated, ascii_only = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    kinds = st.sampled_from(["output_text", "output_text", "reasoning_summary_text", "refusal"])
    events: list[dict[str, Any]] = [
        {"type": f"response.{draw(kinds)}.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "delta": text, "logprobs": []}
        for text in draw(st.lists(texts, min_size=1, max_size=30))
    ]  # fmt: skip
    for other in draw(st.lists(st.sampled_from(OTHERS), max_size=3)):
        events.insert(draw(st.integers(1, len(events))), other)
    events.insert(0, {"type": "response.created", "response": response("in_progress")})
    events.append({"type": "response.completed", "response": response("completed", usage=USAGE)})

    def encode(number: int, event: dict[str, Any], text: bytes | None = None) -> bytes:
        event = {**event, "sequence_number": number}
        if obfuscated:
            event["obfuscation"] = draw(obfuscations)
        ordered = {key: event[key] for key in order if key in event}
        ordered.update(event)
        if text is not None:
            ordered["delta"] = "MIDDLE"
        data = json.dumps(ordered, separators=separators, ensure_ascii=ascii_only).encode()
        if text is not None:
            data = data.replace(b"MIDDLE", text)
        return (f"event: {event['type']}\n".encode() if named else b"") + b"data: " + data + b"\n\n"

    chunks = [encode(number, event) for number, event in enumerate(events)]
    delta = events[1]
    for middle in draw(st.lists(middles, max_size=3)):
        chunks.insert(draw(st.integers(2, len(chunks))), encode(draw(st.integers(0, 10**6)), delta, middle))
    if draw(st.booleans()):
        lo = draw(st.integers(0, len(chunks) - 1))
        hi = draw(st.integers(lo + 1, len(chunks)))
        body = b"".join(chunks[lo:hi])
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6))))
        chunks[lo:hi] = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]
    return chunks


def recorded(call: LLMCall) -> tuple[Any, ...]:
    return (call.first_token_at, call.input_tokens, call.output_tokens, call.cache_read_tokens,
            call.reasoning_tokens, call.usage_source, call.finish_reasons, call.tool_calls, call.response_model,
            call.response_id, call.error_type)  # fmt: skip


def full_parse(chunks: list[bytes]) -> tuple[tuple[Any, ...], int]:
    """The reference: content capture turns every shortcut of the reader off, so every event is parsed."""
    call = LLMCall(SPEC.operation, SPEC.provider, start=0.0)
    reader = SPEC.response_reader(call, stream=True, capture=True)
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, now=1.0 + i)
    reader.finish(now=1000.0)
    return recorded(call), reader._chunks


def as_middleware_reads(chunks: list[bytes], groups: list[int]) -> tuple[tuple[Any, ...], int]:
    call = LLMCall(SPEC.operation, SPEC.provider, start=0.0)
    reader = SPEC.response_reader(call, stream=True, capture=False)
    read_as_middleware(reader, chunks, groups)
    return recorded(call), reader._chunks


def usual(words: list[str]) -> list[bytes]:
    """A stream as OpenAI sends it: numbered events with event lines, deltas ending with an obfuscation member."""
    events: list[dict[str, Any]] = [{"type": "response.created", "response": response("in_progress")}]
    events += [
        {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": word,
            "logprobs": [],
            "obfuscation": "Jv3jQ"[: 1 + i % 5],
        }
        for i, word in enumerate(words)
    ]
    events.append({"type": "response.completed", "response": response("completed", usage=USAGE)})  # fmt: skip
    return [f"event: {e['type']}\ndata: ".encode() + json.dumps({"type": e["type"], "sequence_number": n, **e},
            separators=(",", ":")).encode() + b"\n\n" for n, e in enumerate(events)]  # fmt: skip


def crafted_after(n: int, old: bytes, new: bytes) -> list[bytes]:
    """The first ``n`` events of a usual stream, then a delta of theirs with ``old`` replaced by ``new``."""
    return [*usual(["a", "b", "c"])[:n], usual(["x"])[1].replace(old, new)]


@given(streams(), st.lists(st.integers(1, 40), min_size=1, max_size=6))
@settings(max_examples=400, deadline=None)
@example(usual(["Hello", " there", ",", " you"]), [1])
# A delta whose text, or type, a second member of the same key replaces; a number that is no JSON.
@example(crafted_after(2, b'"delta":"x"', b'"delta":"x","delta":""'), [2])
@example(crafted_after(3, b'"obfuscation"', b'"type"'), [1])
@example(crafted_after(3, b'"output_index":0', b'"output_index":00'), [1])
def test_responses_streams_record_what_a_full_parse_records(chunks: list[bytes], groups: list[int]) -> None:
    """Chunks kept while the reader holds, read in groups of any size, and the others one by one: the first token
    and its time, the tokens and their source, finish reasons, tool calls, model, id and error of a full parse,
    and as many chunks of output counted."""
    assert as_middleware_reads(chunks, groups) == full_parse(chunks)


def test_openai_text_deltas_are_kept_and_read_in_bulk() -> None:
    """After the first token, OpenAI's text deltas (each numbered and obfuscated on its own) are of the stream's
    shape: the middleware keeps them, to be read in bulk, as it does a chat stream's."""
    chunks = usual([f" w{i}" for i in range(40)])
    call = LLMCall(SPEC.operation, SPEC.provider, start=0.0)
    reader = SPEC.response_reader(call, stream=True, capture=False)
    reader.feed(chunks[0], now=1.0)
    reader.feed(chunks[1], now=2.0)
    assert reader.holding
    reader.feed_held(chunks[2:-1])
    assert reader.holding  # every kept delta was of the shape
    reader.feed(chunks[-1], now=3.0)
    reader.finish(now=4.0)
    assert (call.first_token_at, call.output_tokens, call.finish_reasons) == (2.0, 7, ["stop"])
    assert reader._chunks == 40


def test_events_and_items_whose_type_is_not_text_are_skipped_and_the_rest_is_read() -> None:
    """A ``type`` that is a list or an object (JSON allows it; no frozenset lookup does) is an event or item of no
    known kind: skipped, and the usage after it still counted."""
    call = LLMCall(SPEC.operation, SPEC.provider, start=0.0)
    reader = SPEC.response_reader(call, stream=True, capture=False)
    events = [{"type": ["x"]}, {"type": {"a": 1}, "delta": "hi"},
              {"type": "response.output_item.added", "item": {"type": ["function_call"], "name": "f"}},
              {"type": "response.completed", "response": response("completed", usage=USAGE)}]  # fmt: skip
    read_as_middleware(reader, [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events], [1])
    assert (call.input_tokens, call.output_tokens, call.tool_calls) == (11, 7, [])
    call = LLMCall(SPEC.operation, SPEC.provider, start=0.0)
    reader = SPEC.response_reader(call, stream=False, capture=False)
    answer = response("completed", usage=USAGE, output=[{"type": {}}, {"type": ["function_call"], "name": "f"}])
    reader.feed(json.dumps(answer).encode(), now=1.0)
    reader.finish(now=2.0)
    assert (call.input_tokens, call.output_tokens, call.tool_calls) == (11, 7, [])
