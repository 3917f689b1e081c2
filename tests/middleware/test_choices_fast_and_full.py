"""A chat stream of several choices, of every shape a server sends them in, records through the reader's shortcuts
(text deltas recognised from their bytes, or counted from their parse without being read) what a full read of every
event records (content capture on turns the shortcuts off): in particular how many choices had output, which the
time per output token divides the output tokens by, whether a choice's first output comes as text, reasoning, a
refusal, audio or a tool call, with an index, without one, with a null one or one beyond those counted."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry.record import LLMCall
from support import read_stream

_MISSING = object()

#: How a choice gives its index: as it is, left out, null, or beyond the choices counted.
_INDEX = st.sampled_from(["int", "missing", "null", "huge"])
_OUTPUT = st.sampled_from(
    ["content", "content", "content", "reasoning_content", "reasoning", "refusal", "transcript", "audio-data",
     "tool", "empty", "null"]
)  # fmt: skip


def _index(style: str, choice: int) -> Any:
    return {"int": choice, "missing": _MISSING, "null": None, "huge": 4096 + choice}[style]


def _delta(kind: str, n: int) -> dict[str, Any]:
    if kind in ("content", "reasoning_content", "reasoning", "refusal"):
        return {kind: f" w{n}"} if kind == "content" else {"content": None, kind: f" w{n}"}
    if kind == "transcript":
        return {"audio": {"id": "audio_1", "transcript": f" w{n}"}}
    if kind == "audio-data":
        return {"audio": {"id": "audio_1", "data": "AAAA"}}
    if kind == "tool":
        call: dict[str, Any] = {"index": 0, "function": {"arguments": f'{{"a{n}'}}
        if n == 0:
            call.update(id="call_1", type="function", function={"name": "lookup", "arguments": ""})
        return {"tool_calls": [call]}
    return {"content": "" if kind == "empty" else None}


def _chunk(index: Any, delta: dict[str, Any], finish: str | None, spaced: bool, after: bool, obfuscate: bool) -> bytes:
    choice: dict[str, Any] = {"delta": delta, "logprobs": None, "finish_reason": finish}
    if index is not _MISSING:
        choice = {**choice, "index": index} if after else {"index": index, **choice}
    data: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [choice]}  # fmt: skip
    if obfuscate:
        data["obfuscation"] = "aB3"
    text = json.dumps(data) if spaced else json.dumps(data, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


@st.composite
def _streams(draw: st.DrawFn) -> list[bytes]:
    spaced, after, obfuscate = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    count = draw(st.integers(1, 4))
    styles = [draw(_INDEX) for _ in range(count)]
    # Each choice: what its deltas carry (mostly text, now and then something else), possibly nothing at all.
    plans = [draw(st.lists(_OUTPUT, max_size=8)) for _ in range(count)]
    chunks = [_chunk(_index(styles[c], c), {"role": "assistant", "content": ""}, None, spaced, after, obfuscate)
              for c in range(count) if draw(st.booleans())]  # fmt: skip
    cursors = [0] * count
    order = draw(st.permutations([c for c in range(count) for _ in plans[c]]))
    for c in order:
        chunks.append(_chunk(_index(styles[c], c), _delta(plans[c][cursors[c]], cursors[c]), None, spaced, after,
                             obfuscate))  # fmt: skip
        cursors[c] += 1
    for c in range(count):
        chunks.append(_chunk(_index(styles[c], c), {}, "stop", spaced, after, obfuscate))
    if draw(st.booleans()):
        usage = {"prompt_tokens": 3, "completion_tokens": draw(st.integers(0, 60)), "total_tokens": 9}
        chunks.append(b"data: " + json.dumps({"id": "chatcmpl-1", "choices": [], "usage": usage}).encode() + b"\n\n")
    return [*chunks, b"data: [DONE]\n\n"]


def _recorded(call: LLMCall) -> tuple[Any, ...]:
    call.end = 1000.0
    return (call.first_token_at, call.output_tokens, call.usage_source, call.finish_reasons, call.tool_calls,
            call.reasoning_shown, call.stream_choices, call.output_choices, call.first_output_whole,
            call.time_per_output_token)  # fmt: skip


_INDEXLESS_AFTER_ANOTHER = [
    # Choice 1 writes first; then a choice without an index (the first, 0, as a full read takes it) writes its
    # first text, after the first token.
    _chunk(1, {"content": " a"}, None, False, False, False),
    _chunk(_MISSING, {"content": " b"}, None, False, False, False),
    _chunk(1, {"content": " c"}, None, False, False, False),
    _chunk(_MISSING, {"content": " d"}, None, False, False, False),
    _chunk(1, {}, "stop", False, False, False),
    _chunk(_MISSING, {}, "stop", False, False, False),
    b"data: [DONE]\n\n",
]


@given(_streams(), st.lists(st.integers(1, 20), min_size=1, max_size=3))
@example(_INDEXLESS_AFTER_ANOTHER, [1])
@settings(max_examples=400, deadline=None)
def test_a_stream_of_several_choices_records_through_its_shortcuts_what_a_full_read_records(
    chunks: list[bytes], groups: list[int]
) -> None:
    reference = _recorded(read_stream("openai.chat", chunks, None, capture=True))
    assert _recorded(read_stream("openai.chat", chunks, None)) == reference
    assert _recorded(read_stream("openai.chat", chunks, groups)) == reference


def test_a_choice_without_an_index_that_writes_after_another_counts_as_a_choice_with_output() -> None:
    """Choice 1 writes first; then deltas without an index, which a full read takes as choice 0's: two choices had
    output, so the time per output token shares the tokens between them."""
    call = read_stream("openai.chat", _INDEXLESS_AFTER_ANOTHER, None)
    assert (call.stream_choices, call.output_choices) == (2, 2)


def _legacy_chunk(index: Any, text: str, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"text": text, "logprobs": None, "finish_reason": finish}
    if index is not _MISSING:
        choice = {"index": index, **choice}
    data = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


@st.composite
def _legacy_streams(draw: st.DrawFn) -> list[bytes]:
    count = draw(st.integers(1, 4))
    indexes = [_index(draw(_INDEX), c) for c in range(count)]
    order = draw(st.lists(st.integers(0, count - 1), max_size=16))
    chunks = [_legacy_chunk(indexes[c], draw(st.sampled_from([" w", " x", ""]))) for c in order]
    return [*chunks, *(_legacy_chunk(indexes[c], "", "stop") for c in range(count)), b"data: [DONE]\n\n"]


@given(_legacy_streams())
@example([_legacy_chunk(1, " a"), _legacy_chunk(_MISSING, " b"), _legacy_chunk(_MISSING, " c"), b"data: [DONE]\n\n"])
@settings(max_examples=300, deadline=None)
def test_a_legacy_completions_stream_of_several_choices_records_through_its_shortcuts_what_a_full_read_records(
    chunks: list[bytes],
) -> None:
    """The same for a legacy completions stream (a batch of prompts, or n choices), whose choices carry a text."""

    reference = _recorded(read_stream("openai.completions", chunks, None, capture=True))
    assert _recorded(read_stream("openai.completions", chunks, None)) == reference
