"""The chat stream reader's once-per-stream shortcuts record what parsing every event in full records.

Three events of a chat stream are usually read without a full JSON parse: the role chunk that opens it (set aside,
then found redundant by the first token, whose bytes it repeats), and the finish and usage chunks at its end
(recognised from templates learnt from the first token). The reference here is the same reader with content capture
on, which turns every shortcut off and parses every event. For arbitrary chat streams (random ids, models, texts with
escapes and unicode, spaced or compact JSON, keys in any order, extra keys, null or missing fields, empty strings,
several choices, tool calls, errors, garbage) and arbitrary chunkings, both must record the same numbers.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry.apis import _ROLE_DELTAS, _ROLE_MEMBERS, APIS
from llm_telemetry.record import LLMCall
from support import read_as_middleware

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | st.sampled_from(
    ["", " word", 'say "hi"', "back\\slash", "line\nbreak", "é", "你好", '"content":"x"', '","finish_reason":"stop']
)
names = st.sampled_from(["gpt-4o-mini", "gpt-4o-mini-2024-07-18", "m", "", "chatcmpl-1", 'q"uote', "é"])
REASONS = ["stop", "length", "tool_calls", "content_filter", "function_call", "", "STOP", "end_turn", "x\\y"]


def _maybe(draw: st.DrawFn, obj: dict[str, Any], key: str, value: Any, p_missing: int = 4) -> None:
    """Set ``key`` unless the draw leaves it out (about one time in ``p_missing``)."""
    if draw(st.integers(0, p_missing - 1)):
        obj[key] = value


@st.composite
def chat_event(
    draw: st.DrawFn, kind: str, ident: Any, model: Any, extra: dict[str, Any], consistent: bool
) -> dict[str, Any] | str:
    if kind == "done":
        return "[DONE]"
    if kind == "garbage":
        return draw(st.sampled_from(["not json", '{"id":"c1"', "[1,2]", "{}", '{"choices":null}', "null"]))
    if kind == "error":
        return {"error": {"message": draw(texts), "type": draw(st.sampled_from(["server_error", "rate_limit", "x"]))}}
    obj: dict[str, Any] = {}
    if consistent:
        obj["id"] = ident
    else:
        _maybe(draw, obj, "id", ident, 8)
    obj["object"] = "chat.completion.chunk"
    _maybe(draw, obj, "created", 1)
    if consistent:
        obj["model"] = model
    else:
        _maybe(draw, obj, "model", model, 8)
    obj.update(extra)
    delta: dict[str, Any] = {}
    finish: Any = None
    if kind == "role":
        delta["role"] = draw(st.sampled_from(["assistant", "tool"]))
        _maybe(draw, delta, "content", draw(st.sampled_from(["", None])), 2)
        _maybe(draw, delta, "refusal", None, 2)
    elif kind == "token":
        delta["content"] = draw(texts)
        if draw(st.integers(0, 5)) == 0:
            delta["role"] = "assistant"
    elif kind == "reasoning":
        delta[draw(st.sampled_from(["reasoning_content", "reasoning"]))] = draw(
            texts.filter(bool) if consistent else texts
        )
        _maybe(draw, delta, "content", None, 2)
    elif kind == "tool":
        function = {"name": draw(st.sampled_from(["get_weather", "", "f"])), "arguments": draw(texts)}
        delta["tool_calls"] = [{"index": draw(st.integers(0, 1)), "id": "call_1", "function": function}]
    elif kind == "finish":
        finish = draw(st.sampled_from(REASONS))
        if draw(st.integers(0, 3)) == 0:
            delta["content"] = draw(st.sampled_from(["", "tail"]))
    choice: dict[str, Any] = {"index": 0, "delta": delta}
    _maybe(draw, choice, "logprobs", None, 2)
    _maybe(draw, choice, "finish_reason", finish, 6 if finish is None else 12)
    choices = [choice]
    if draw(st.integers(0, 6)) == 0 and not consistent:
        # A second choice in the same event: empty, or carrying text or a finish reason of its own.
        other = draw(
            st.sampled_from([{"index": 1}, {"index": 1, "delta": {"content": "b"}}, {"finish_reason": "length"}])
        )
        choices.append(other)
    if kind == "usage":
        choices = []
    obj["choices"] = choices
    if kind == "usage":
        usage: Any = {"prompt_tokens": draw(st.integers(0, 10**6)), "completion_tokens": draw(st.integers(0, 10**6))}
        if draw(st.booleans()):
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if draw(st.booleans()):
            usage["prompt_tokens_details"] = {"cached_tokens": draw(st.integers(0, 99))}
            usage["completion_tokens_details"] = {"reasoning_tokens": draw(st.sampled_from([0, 7, None, "x"]))}
        obj["usage"] = draw(st.sampled_from([usage, usage, usage, None, {}, "x"]))
    elif "usage" in extra or draw(st.integers(0, 5)) == 0:
        obj["usage"] = None
    if draw(st.integers(0, 4)) == 0:
        # Keys in another order.
        keys = draw(st.permutations(list(obj)))
        obj = {key: obj[key] for key in keys}
    return obj


#: Values of the member OpenAI adds to every streamed event (random letters and digits of random length), and others.
obfuscations = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", max_size=40) | (
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
    | st.sampled_from(["", "x" * 300, '"', "\\", "a\nb", "\r", "\u2028", '"},"finish_reason":"length', '\\"', "\x00"])
)


@st.composite
def chat_streams(
    draw: st.DrawFn, consistent: bool = False, obfuscated: bool = False, several_lines: bool = False
) -> list[bytes]:
    """A chat stream's chunks: mostly the usual order (role, tokens, finish, usage, [DONE]) with the same id and
    model, sometimes other kinds of events anywhere and other ids or models, in any JSON style and chunking.
    ``consistent``: every event spells the stream's id and model, every event has one choice and reasoning ones
    are not empty (see test_shortcuts_record_what_a_full_parse_records). ``obfuscated``: every event ends with an
    obfuscation member (mostly), each with its own value. ``several_lines``: lines end in LF, CRLF or CR, and some
    events have several data lines: one JSON document pretty-printed, or two documents (an event's data line and
    the next one's, in one event)."""
    spaced, ascii_only = draw(st.booleans()), draw(st.booleans())
    ident, model = draw(names), draw(names)
    extra: dict[str, Any] = draw(
        st.sampled_from([{}, {"system_fingerprint": "fp_1"}, {"usage": None}, {"service_tier": "default"}])
    )
    kinds = ["role"] if draw(st.integers(0, 5)) else []
    kinds += ["token"] * draw(st.integers(0, 6))
    kinds += ["finish"] if draw(st.integers(0, 4)) else []
    kinds += ["usage"] if draw(st.booleans()) else []
    kinds += ["done"] if draw(st.integers(0, 3)) else []
    for other in draw(
        st.lists(st.sampled_from(["role", "reasoning", "tool", "error", "garbage", "done", "usage"]), max_size=3)
    ):
        kinds.insert(draw(st.integers(0, len(kinds))), other)
    separators = (", ", ": ") if spaced else (",", ":")
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"])) if several_lines else b"\n"
    events: list[list[str]] = []  # each event's data lines
    for kind in kinds:
        if draw(st.integers(0, 7)) == 0 and not consistent:
            ident_here, model_here = draw(names), draw(names)  # another id or model than the stream's
        else:
            ident_here, model_here = ident, model
        event = draw(chat_event(kind, ident_here, model_here, extra, consistent))
        if obfuscated and isinstance(event, dict):
            if draw(st.integers(0, 9)):
                event = {**event, "obfuscation": draw(obfuscations)}  # last, as OpenAI sends it
            else:
                event = {"obfuscation": draw(obfuscations), **event}
        data = event if isinstance(event, str) else json.dumps(event, separators=separators, ensure_ascii=ascii_only)
        way = draw(st.integers(0, 4)) if several_lines else 0
        if way == 1 and isinstance(event, dict):
            events.append(json.dumps(event, indent=draw(st.integers(0, 2)), ensure_ascii=ascii_only).split("\n"))
        elif way == 2 and events:
            events[-1].append(data)
        else:
            events.append([data])
    chunks = [
        b"".join(b"data: " + line.encode("utf-8", "surrogatepass") + ending for line in lines) + ending
        for lines in events
    ]
    if chunks and draw(st.integers(0, 3)) == 0:
        # A proxy re-chunks the stream: pieces that start or end inside events.
        body = b"".join(chunks)
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6))))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]
    return chunks


def recorded(call: LLMCall) -> tuple[Any, ...]:
    return (
        call.first_token_at,
        call.input_tokens,
        call.output_tokens,
        call.cache_read_tokens,
        call.reasoning_tokens,
        call.usage_source,
        call.finish_reasons,
        call.tool_calls,
        call.response_model,
        call.response_id,
        call.error_type,
    )


def full_parse(chunks: list[bytes]) -> LLMCall:
    """The reference: content capture turns every shortcut of the reader off, so every event is parsed."""
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=True)
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, now=1.0 + i)
    reader.finish(now=1000.0)
    return call


def as_middleware_reads(chunks: list[bytes], groups: list[int], shortcuts: bool = True) -> LLMCall:
    """The reader (with or without its once-per-stream shortcuts) fed as the middleware feeds it: one by one, and
    while it is holding, in kept groups (of the given sizes) read in bulk."""
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.reader(call, stream=True, capture=False, shortcuts=shortcuts)
    read_as_middleware(reader, chunks, groups)
    return call


def _chunk(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _demo(delta: dict[str, Any], finish: str | None = None, **top: Any) -> dict[str, Any]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    return {**head, **top, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _tail_model(delta: dict[str, Any], model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": delta, "finish_reason": None}], "model": model}


USUAL = [
    _chunk(_demo({"role": "assistant", "content": ""})),
    _chunk(_demo({"content": "Hello"})),
    _chunk(_demo({"content": " world"})),
    _chunk(_demo({}, "stop")),
    _chunk({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
    b"data: [DONE]\n\n",
]  # fmt: skip


@given(chat_streams(), st.lists(st.integers(1, 9), min_size=1, max_size=4))
@settings(max_examples=500, deadline=None)
@example([_chunk(_demo({"tool_calls": [{"index": 0, "function": {"name": "f"}}]})), *USUAL[1:]], [1])
@example(
    [
        _chunk(_demo({"tool_calls": [{"index": 0, "function": {"name": "f"}}]})),
        _chunk(
            {
                **_demo({"content": "a"}),
                "choices": [{"index": 0, "delta": {"content": "a"}}, {"delta": {"content": "b"}}],
            }
        ),
        USUAL[3],
        USUAL[5],
    ],
    [1],
)
@example(
    [_chunk(_tail_model({"role": "assistant"}, "a")), _chunk(_tail_model({"content": "Hi"}, "b")), *USUAL[3:]], [1]
)
@example([_chunk(_demo({"role": "assistant", "reasoning": "r"})), *USUAL[1:]], [1])
@example([_chunk(_demo({"role": "assistant", "content": ""}, "stop")), *USUAL[1:]], [1])
@example([_chunk(_demo({"role": "assistant", "content": ""}, usage={"prompt_tokens": 1})), *USUAL[1:]], [1])
@example([_chunk(_demo({"role": "assistant", "content": ""}, error={"type": "x"})), *USUAL[1:]], [1])
@example(USUAL, [1])
@example([_chunk(_demo({"role": "assistant", "content": ""}, model="a")), *USUAL[1:]], [1])
@example([_chunk(_demo({"role": "assistant", "content": ""}, id="r")), *USUAL[1:]], [3])
# A role chunk whose model or id differs from the first token's, spelled with as many bytes: not redundant.
@example([_chunk(_demo({"role": "assistant", "content": ""}, model="gpt-4o-mino")), *USUAL[1:]], [1])
@example([_chunk(_demo({"role": "assistant", "content": ""}, id="chatcmpl-2")), *USUAL[1:]], [1])
@example([USUAL[0], _chunk(_demo({"content": "Hi"}, model="")), *USUAL[2:]], [2])
@example([*USUAL[:3], _chunk(_demo({}, "tool_calls")), *USUAL[4:]], [1])
@example([*USUAL[:3], _chunk(_demo({}, "weird")), *USUAL[4:]], [1])
@example([*USUAL[:4], _chunk({**json.loads(USUAL[4][6:]), "usage": None}), USUAL[5]], [1])
@example([*USUAL[:4], USUAL[4].replace(b'"usage":{', b'"usage":[{').replace(b"}}", b"}]}"), USUAL[5]], [1])
def test_shortcuts_change_nothing_recorded(chunks: list[bytes], groups: list[int]) -> None:
    """Whatever the stream, hostile ones included, and its chunking: the first token and its time, the token
    counts and their source, the finish reasons, tool calls, response model and id, and the error are those the
    same reader records with its once-per-stream shortcuts off (every event before the first token, and every
    event after it that is not a plain text delta, parsed in full)."""
    assert recorded(as_middleware_reads(chunks, groups)) == recorded(as_middleware_reads(chunks, groups, False))


#: An event of two data lines, each a text delta's JSON: SSE joins them with LF, which is no JSON document (the
#: SDKs raise on it), and one pretty-printed over several lines, which is one.
TWO_DOCUMENTS = b"data: " + USUAL[1][6:-2] + b"\ndata: " + USUAL[2][6:-2] + b"\n\n"
PRETTY = b"".join(
    b"data: " + line + b"\n" for line in json.dumps(_demo({"content": "!"}), indent=1).encode().split(b"\n")
)


@given(chat_streams(consistent=True), st.lists(st.integers(1, 9), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
@example([*USUAL[:3], TWO_DOCUMENTS, USUAL[3], USUAL[5]], [1])
@example([*USUAL[:3], TWO_DOCUMENTS, USUAL[3], USUAL[5]], [3])
@example([*USUAL[:3], PRETTY + b"\n", USUAL[3], USUAL[5]], [1])
def test_shortcuts_record_what_a_full_parse_records(chunks: list[bytes], groups: list[int]) -> None:
    """Against parsing every event (content capture turns every shortcut off, per-chunk ones included), for streams
    that spell their id and model in every event, put one choice in a text delta and no empty reasoning delta: the
    per-chunk shortcuts, older than these, read a text delta from its bytes (its id, model or other choices
    unread, an empty reasoning text counted), so only such streams are held to it."""
    assert recorded(as_middleware_reads(chunks, groups)) == recorded(full_parse(chunks))


@given(chat_streams(consistent=True, several_lines=True), st.lists(st.integers(1, 9), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_events_of_several_data_lines_record_what_a_full_parse_records(chunks: list[bytes], groups: list[int]) -> None:
    """As above, for streams with some events of several data lines (two JSON documents, on which the SDKs raise
    and a full parse finds nothing, or one pretty-printed) and lines ending in LF, CRLF or CR, in any chunking:
    neither the per-chunk shortcuts, the held chunks read in bulk nor the templates count what a full parse does
    not."""
    assert recorded(as_middleware_reads(chunks, groups)) == recorded(full_parse(chunks))


@given(
    st.lists(texts.filter(bool), min_size=1, max_size=6),
    st.sampled_from(["stop", "length", "tool_calls", "content_filter"]),
    st.booleans(),
    st.booleans(),
    names,
    names,
)
@settings(max_examples=200, deadline=None)
def test_the_usual_stream_agrees_with_a_full_parse(
    words: list[str], reason: str, spaced: bool, usage_null: bool, ident: str, model: str
) -> None:
    """The usual shape of a chat stream (role chunk, tokens, finish, usage with details, [DONE]), compact or spaced,
    read in one held group: the numbers of a full parse."""
    top = {"usage": None} if usage_null else {}
    separators = (", ", ": ") if spaced else (",", ":")

    def encode(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=separators).encode() + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": 1, "model": model, **top,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

    usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words),
             "prompt_tokens_details": {"cached_tokens": 3},
             "completion_tokens_details": {"reasoning_tokens": 1}}  # fmt: skip
    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": word}) for word in words]
    events += [chunk({}, reason), {"id": ident, "object": "chat.completion.chunk", "created": 1, "model": model,
                                   "choices": [], "usage": usage}]  # fmt: skip
    chunks = [encode(event) for event in events] + [b"data: [DONE]\n\n"]
    call = as_middleware_reads(chunks, [len(chunks)])
    assert recorded(call) == recorded(full_parse(chunks))
    assert (call.finish_reasons, call.input_tokens, call.cache_read_tokens) == ([reason], 9, 3)


def test_the_common_role_deltas_are_role_deltas() -> None:
    """The role deltas recognised by lookup are ones the pattern of role deltas (scalars only) accepts: the lookup
    is a shortcut of the pattern, never wider."""
    assert _ROLE_DELTAS and all(_ROLE_MEMBERS.fullmatch(delta) for delta in _ROLE_DELTAS)


def _obfuscated(obj: dict[str, Any], value: str) -> bytes:
    return _chunk({**obj, "obfuscation": value})


def test_an_obfuscated_stream_is_read_by_its_shape() -> None:
    """A stream whose events each end with an obfuscation member of its own value (as OpenAI sends them by default):
    from the first token on, the reader holds its chunks (their texts are recognised from their bytes, whatever the
    value), and records what a full parse records."""
    letters = "aZ3kQx9Lm0"
    tokens = [_obfuscated(_demo({"content": f" w{i}"}, usage=None), letters[: i % 11]) for i in range(64)]
    chunks = [_obfuscated(_demo({"role": "assistant", "content": ""}, usage=None), "Qp"), *tokens]
    chunks += [_obfuscated(_demo({}, "stop", usage=None), "k"), USUAL[4], USUAL[5]]
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    reader.feed(chunks[0], now=1.0)
    reader.feed(chunks[1], now=2.0)
    assert reader.holding
    for i in range(2, 64, 8):
        reader.feed_held(chunks[i : i + 8])
        assert reader.holding
    for chunk in chunks[64:]:
        reader.feed(chunk)
    reader.finish(now=1000.0)
    assert recorded(call) == recorded(full_parse(chunks))
    assert (call.output_tokens, call.finish_reasons, call.first_token_at) == (2, ["stop"], 2.0)
    # With a value that is not the inside of a JSON string in one token, that token is read in full: not counted.
    broken = [*chunks[:10], tokens[10].replace(b'"obfuscation":"', b'"obfuscation":"\\""'), *chunks[11:]]
    assert recorded(as_middleware_reads(broken, [8])) == recorded(full_parse(broken))


@given(chat_streams(obfuscated=True), st.lists(st.integers(1, 9), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_obfuscated_streams_shortcuts_change_nothing_recorded(chunks: list[bytes], groups: list[int]) -> None:
    """As test_shortcuts_change_nothing_recorded, for streams whose events carry obfuscation members."""
    assert recorded(as_middleware_reads(chunks, groups)) == recorded(as_middleware_reads(chunks, groups, False))


@given(chat_streams(consistent=True, obfuscated=True), st.lists(st.integers(1, 9), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_obfuscated_streams_record_what_a_full_parse_records(chunks: list[bytes], groups: list[int]) -> None:
    """As test_shortcuts_record_what_a_full_parse_records, for streams whose events carry obfuscation members of
    arbitrary values (quotes, backslashes, line breaks, unicode, empty, long)."""
    assert recorded(as_middleware_reads(chunks, groups)) == recorded(full_parse(chunks))


#: Bytes put in place of an obfuscation value in a text delta of the stream's shape: anything, crafted ones included
#: (some make the event other JSON: an error, usage, a finish reason, another event).
raw_values = st.binary(max_size=8) | st.lists(
    st.sampled_from(
        [b'"', b"\\", b"\n", b"\r", b"a", b"\xff", b"\x00", b'\\"', b"\t", b"\\u0041", b'"}\n\ndata: {"a":"',
         b'x","error":{"type":"e"},"y":"', b'x","usage":{"prompt_tokens":7,"completion_tokens":1},"y":"',
         b'x","choices":[{"index":0,"delta":{},"finish_reason":"length"}],"y":"']
    ),
    max_size=4,
).map(b"".join)  # fmt: skip


def unshaped(chunks: list[bytes]) -> LLMCall:
    """The reader as it reads a stream whose text deltas never have the learnt shape: every chunk decoded."""
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, 1.0 + i, False)
    reader.finish(now=1000.0)
    return call


@given(
    st.lists(obfuscations, min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(2, 12), st.sampled_from(["", "x", " y", "é", 'q\\"']), raw_values), max_size=4),
    st.lists(st.integers(1, 9), min_size=1, max_size=4),
    st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_obfuscation_values_that_could_hide_structure_are_not_of_the_shape(
    values: list[str], crafted: list[tuple[int, str, bytes]], groups: list[int], spaced: bool
) -> None:
    """Text deltas of an obfuscated stream's shape with arbitrary bytes in place of the value, put anywhere after
    the first token: read as they are when no shape is known (each event decoded), so only values that are the
    inside of a JSON string with nothing to decode count as text deltas of the shape; and when every event is JSON,
    as a full parse reads them."""
    separators = (", ", ": ") if spaced else (",", ":")

    def encode(obj: dict[str, Any], value: str) -> bytes:
        return b"data: " + json.dumps({**obj, "obfuscation": value}, separators=separators).encode() + b"\n\n"

    chunks = [encode(_demo({"role": "assistant", "content": ""}, usage=None), "r")]
    chunks += [encode(_demo({"content": f"w{i}"}, usage=None), value) for i, value in enumerate(values)]
    for at, text, value in crafted:
        head, _, tail = encode(_demo({"content": text}, usage=None), "VALUE").partition(b"VALUE")
        chunks.insert(min(at, len(chunks)), head + value + tail)
    chunks += [encode(_demo({}, "stop", usage=None), ""), USUAL[4], USUAL[5]]
    call = as_middleware_reads(chunks, groups)
    assert recorded(call) == recorded(unshaped(chunks))
    if all(_is_json(chunk[6:]) for chunk in chunks[:-1]):
        assert recorded(call) == recorded(full_parse(chunks))


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _ending(obj: dict[str, Any], value: bytes | None, spaced: bool, key_spaced: bool) -> bytes:
    """``obj`` as an event that ends with an obfuscation member whose value is the raw bytes ``value`` (None: none)."""
    separators = (", ", ": ") if spaced else (",", ":")
    data = json.dumps(obj, separators=separators).encode()
    if value is not None:
        data = data[:-1] + (b', "obfuscation": "' if key_spaced else b',"obfuscation":"') + value + b'"}'
    return b"data: " + data + b"\n\n"


_USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini", "choices": [],
          "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}  # fmt: skip
#: Values of the stream's ends: the usual letters and digits, none (the member left out), anything.
end_values = st.sampled_from([b"k", b"", b"Zq81", None, b"~ !#[]{}"]) | raw_values


@given(
    st.tuples(end_values, end_values, end_values),
    st.lists(obfuscations, min_size=1, max_size=4),
    st.sampled_from(REASONS),
    st.tuples(st.booleans(), st.booleans(), st.booleans()),
    st.sampled_from(["gpt-4o-mini", "gpt-4o-mino", "g"]),
    st.sampled_from(["", "finish", "usage"]),
    st.lists(st.integers(1, 9), min_size=1, max_size=4),
)
@settings(max_examples=500, deadline=None)
@example((b"Qp", b"", b"z"), ["a"], "stop", (False, False, False), "gpt-4o-mini", "", [1])
@example((b"Qp", None, None), ["a"], "stop", (False, False, False), "gpt-4o-mini", "", [1])
@example((None, b"k", b"k"), ["a"], "length", (False, False, True), "gpt-4o-mini", "", [1])
@example((b"Qp", b"k", b"k"), ["a"], "stop", (True, True, False), "gpt-4o-mino", "", [1])
# A role event that differs from the first token after the text's member (besides the value), in bytes of the same
# length (a finish reason "xy" where the first token has null): read, not dropped.
@example((b"Qp", b"k", b"k"), ["a"], "stop", (False, False, False), "gpt-4o-mini", "finish", [1])
@example((b"Qp", b"k", b"k"), ["a"], "stop", (True, True, False), "gpt-4o-mini", "finish", [1])
@example((b"Qp", b"k", b"k"), ["a"], "stop", (True, False, False), "gpt-4o-mini", "usage", [1])
@example((b'x"', b'x","usage":{"prompt_tokens":7},"y":"', b'x"},"z":"'), ["a"], "stop", (False,) * 3, "g", "", [2])
@example((b"r", b'x","choices":[{"index":0,"delta":{},"finish_reason":"length"}],"y":"', b"\\"), ["a"], "stop",
         (False, False, False), "gpt-4o-mini", "", [1])  # fmt: skip
def test_obfuscated_stream_ends_record_what_a_full_parse_records(
    values: tuple[bytes | None, bytes | None, bytes | None],
    tokens: list[str],
    reason: str,
    spacing: tuple[bool, bool, bool],
    role_model: str,
    role_after: str,
    groups: list[int],
) -> None:
    """An obfuscated stream whose role, finish and usage events end with obfuscation members of any raw bytes (the
    usual letters and digits, none, crafted ones that would hide structure or make the event other JSON), spelled
    compact or spaced, the role event sometimes with another model of the same length, or with a finish reason or
    usage after its delta: the reader with its once-per-stream shortcuts records what it records with them off,
    and, when every event is JSON, what a full parse records."""
    role_value, finish_value, usage_value = values
    spaced, key_spaced, usage_key_spaced = spacing
    role = _demo({"role": "assistant", "content": ""}, "xy" if role_after == "finish" else None, model=role_model)
    if role_after == "usage":
        role["usage"] = {"prompt_tokens": 3, "completion_tokens": 1}
    chunks = [_ending(role, role_value, spaced, key_spaced)]
    chunks += [_ending(_demo({"content": f"w{i}"}), value.encode(), spaced, key_spaced) for i, value in
               enumerate(json.dumps(v)[1:-1] for v in tokens)]  # fmt: skip
    chunks += [_ending(_demo({}, reason), finish_value, spaced, key_spaced)]
    chunks += [_ending(_USAGE, usage_value, spaced, usage_key_spaced), USUAL[5]]
    assert recorded(as_middleware_reads(chunks, groups)) == recorded(as_middleware_reads(chunks, groups, False))
    if all(_is_json(chunk[6:]) for chunk in chunks[:-1]):
        assert recorded(as_middleware_reads(chunks, groups)) == recorded(full_parse(chunks))
