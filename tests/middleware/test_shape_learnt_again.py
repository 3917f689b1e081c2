"""A stream whose text deltas change now and then outside their text keeps being read by its text-delta shape.

llama.cpp's server and Hugging Face TGI put the second the chunk was made in every delta (``created``), and an
Anthropic answer that thinks first sends its text deltas in a block of another index and type than its thinking: the
bytes around the text change once, then stay the same for many deltas. The reader learns the shape again from the
first delta of the new bytes (one it parsed, and found to be a text delta with nothing else in it), so the deltas
after it are recognised from their bytes again (the reader holds them: see ``ResponseReader.holding``) instead of
being parsed to the end of the stream. What it records is what a full parse of every event records (content capture
on turns every shortcut off), whatever the chunks are kept in groups of, as the middleware keeps them.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_telemetry.apis import APIS
from llm_telemetry.record import LLMCall
from support import read_as_middleware, read_stream


def _event(data: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _llama_cpp(delta: dict[str, Any], created: int, finish: str | None = None) -> bytes:
    """A chat chunk as llama.cpp's server writes it: ``choices`` first, the second it was made in after the text."""
    choice = {"finish_reason": finish, "index": 0, "delta": delta}
    return _event({"choices": [choice], "created": created, "id": "chatcmpl-x", "model": "gguf",
                   "system_fingerprint": "b4500-1a2b3c", "object": "chat.completion.chunk"})  # fmt: skip


def _tgi(delta: dict[str, Any], created: int, finish: str | None = None) -> bytes:
    """A chat chunk as TGI writes it: the role and null tool calls in every delta, the second it was made in first."""
    choice = {"index": 0, "delta": {"role": "assistant", "tool_calls": None, **delta}, "logprobs": None,
              "finish_reason": finish}  # fmt: skip
    return _event({"object": "chat.completion.chunk", "id": "", "created": created, "model": "tgi",
                   "system_fingerprint": "3.0.0-native", "choices": [choice], "usage": None})  # fmt: skip


def _chat_stream(server: str, texts: list[str], every: int) -> list[bytes]:
    """A chat stream of ``texts``, its clock's second changing every ``every`` deltas."""
    chunk = _llama_cpp if server == "llama.cpp" else _tgi
    start = 1733000000
    chunks = [chunk({"role": "assistant", "content": None}, start)] if server == "llama.cpp" else []
    chunks += [chunk({"content": text}, start + i // every) for i, text in enumerate(texts)]
    chunks += [chunk({"content": ""} if server == "tgi" else {}, start + len(texts) // every, "stop")]
    return [*chunks, b"data: [DONE]\n\n"]


def _anthropic_stream(thinking: list[str], texts: list[str], pieces: list[str]) -> list[bytes]:
    """An Anthropic stream that thinks, answers and calls a tool, without usage in its message_delta."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
               "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}  # fmt: skip
    chunks = [_event({"type": "message_start", "message": message}, "message_start")]
    blocks: list[tuple[dict[str, Any], str, str, list[str]]] = [
        ({"type": "thinking", "thinking": "", "signature": ""}, "thinking_delta", "thinking", thinking),
        ({"type": "text", "text": ""}, "text_delta", "text", texts),
        ({"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}, "input_json_delta", "partial_json",
         pieces),
    ]  # fmt: skip
    for index, (block, kind, key, values) in enumerate(blocks):
        chunks.append(_event({"type": "content_block_start", "index": index, "content_block": block},
                             "content_block_start"))  # fmt: skip
        for value in values:
            delta = {"type": "content_block_delta", "index": index, "delta": {"type": kind, key: value}}
            chunks.append(_event(delta, "content_block_delta"))
        if kind == "thinking_delta":
            signature = {"type": "signature_delta", "signature": "EqQBCkYIBxgCKkA"}
            chunks.append(_event({"type": "content_block_delta", "index": index, "delta": signature},
                                 "content_block_delta"))  # fmt: skip
        chunks.append(_event({"type": "content_block_stop", "index": index}, "content_block_stop"))
    chunks.append(_event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}}, "message_delta"))
    return [*chunks, _event({"type": "message_stop"}, "message_stop")]


def _recorded(call: LLMCall) -> tuple[Any, ...]:
    return (call.first_token_at, call.output_tokens, call.usage_source, call.finish_reasons, call.tool_calls,
            call.response_model, call.reasoning_shown, call.stream_choices, call.output_choices)  # fmt: skip


def _held(api: str, chunks: list[bytes]) -> list[bool]:
    """Whether the reader holds the stream's chunks (recognises its text deltas from their bytes) after each."""
    spec = APIS[api]
    reader = spec.reader(LLMCall(spec.operation, spec.provider, start=0.0), stream=True, capture=False)
    holding = []
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, now=1.0 + i)
        holding.append(reader.holding)
    return holding


words = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6)


@given(
    st.sampled_from(["llama.cpp", "tgi"]),
    st.lists(words, min_size=1, max_size=120) | st.lists(words, min_size=60, max_size=120),
    st.integers(1, 40),
    st.lists(st.integers(1, 130), min_size=1, max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_a_chat_stream_whose_clock_changes_records_what_a_full_parse_records(
    server: str, texts: list[str], every: int, groups: list[int]
) -> None:
    """Texts of any characters, a second that changes every 1 to 40 deltas (one a delta: a stream that varies
    in every chunk, which stops trying a shape), kept in any groups: the estimate is one token a delta. Changing no
    more often than every 5 deltas, the reader knows the shape (holds the chunks) at every delta."""
    chunks = _chat_stream(server, texts, every)
    if every >= 5:
        first = 1 if server == "llama.cpp" else 0  # (llama.cpp's role delta comes first)
        assert all(_held("openai.chat", chunks)[first : first + len(texts)])
    reference = _recorded(read_stream("openai.chat", chunks, None, capture=True))
    assert reference[1:4] == (len(texts), "estimated", ["stop"])
    assert _recorded(read_stream("openai.chat", chunks, groups)) == reference
    assert _recorded(read_stream("openai.chat", chunks, None)) == reference


def test_a_chat_stream_whose_clock_changes_is_read_by_its_shape_again() -> None:
    """A llama.cpp or TGI stream of 200 deltas at 20 a second: every delta from the first on is recognised from
    its bytes (its chunks held), the second changing ten times; before, from the ninth delta after the first change
    on, every delta was parsed."""
    texts = [f" w{i}" for i in range(200)]
    for server in ("llama.cpp", "tgi"):
        chunks = _chat_stream(server, texts, 20)
        first = 1 if server == "llama.cpp" else 0  # (llama.cpp's role delta comes first)
        assert all(_held("openai.chat", chunks)[first : first + len(texts)]), server
        assert _recorded(read_stream("openai.chat", chunks, [128]))[1] == len(texts)
        # Kept in groups, as the middleware keeps a stream's chunks while the reader holds them (the change of
        # second then often falls among the last chunks of a group, which are read one by one): the same.
        for size in (16, 50, 128):
            spec = APIS["openai.chat"]
            reader = spec.reader(LLMCall(spec.operation, spec.provider, start=0.0), stream=True, capture=False)
            read_as_middleware(reader, chunks[: first + len(texts)], [size])
            assert reader.holding, (server, size)


@given(
    st.lists(words, min_size=1, max_size=40),
    st.lists(words, min_size=1, max_size=40),
    st.lists(words, max_size=12),
    st.lists(st.integers(1, 130), min_size=1, max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_an_anthropic_stream_that_thinks_records_what_a_full_parse_records(
    thinking: list[str], texts: list[str], pieces: list[str], groups: list[int]
) -> None:
    """Any thinking, text and tool input, kept in any groups; the text deltas after the thinking are recognised
    from their bytes."""
    chunks = _anthropic_stream(thinking, texts, pieces)
    held = _held("anthropic.messages", chunks)
    assert all(held[i] for i, chunk in enumerate(chunks) if b'"text_delta"' in chunk)
    reference = _recorded(read_stream("anthropic.messages", chunks, None, capture=True))
    assert reference[1:5] == (len(thinking) + len(texts) + len(pieces), "estimated", ["tool_use"], ["lookup"])
    assert _recorded(read_stream("anthropic.messages", chunks, groups)) == reference
    assert _recorded(read_stream("anthropic.messages", chunks, None)) == reference


def test_an_anthropic_answer_after_its_thinking_is_read_by_its_shape() -> None:
    """30 thinking deltas, then 100 text deltas: the text deltas are recognised from their bytes too, from the
    first on (before, the shape of the thinking deltas was given up on the ninth text delta, and the rest parsed)."""
    thinking = [f" t{i}" for i in range(30)]
    texts = [f" w{i}" for i in range(100)]
    chunks = _anthropic_stream(thinking, texts, [])
    held = _held("anthropic.messages", chunks)
    text_deltas = [i for i, chunk in enumerate(chunks) if b'"text_delta"' in chunk]
    assert len(text_deltas) == len(texts) and all(held[i] for i in text_deltas)


def _reasoning_stream(key: str, thoughts: list[str], texts: list[str], spaced: bool) -> list[bytes]:
    """A reasoning model's chat stream: deltas with a null content and a piece of the reasoning in ``key``, then the
    answer's deltas, compact (DeepSeek's, vLLM's) or spaced JSON."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-reasoner",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
        raw = json.dumps(data) if spaced else json.dumps(data, separators=(",", ":"))
        return b"data: " + raw.encode() + b"\n\n"

    chunks = [chunk({"role": "assistant", "content": None})]
    chunks += [chunk({"content": None, key: thought}) for thought in thoughts]
    chunks += [chunk({"content": text}) for text in texts]
    return [*chunks, chunk({"content": None}, "stop"), b"data: [DONE]\n\n"]


@given(
    st.sampled_from(["reasoning_content", "reasoning"]),
    st.lists(words, min_size=1, max_size=60),
    st.lists(words, max_size=60),
    st.booleans(),
    st.lists(st.integers(1, 130), min_size=1, max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_a_reasoning_stream_is_read_by_its_shape_and_records_what_a_full_parse_records(
    key: str, thoughts: list[str], texts: list[str], spaced: bool, groups: list[int]
) -> None:
    """The reasoning deltas before the answer are of a shape too (they were each parsed): the reader knows it at
    every delta, reasoning and answer alike, and records what a full parse records, one token a delta."""
    chunks = _reasoning_stream(key, thoughts, texts, spaced)
    held = _held("openai.chat", chunks)
    assert all(held[1 : 1 + len(thoughts) + len(texts)])
    reference = _recorded(read_stream("openai.chat", chunks, None, capture=True))
    assert reference[1:4] == (len(thoughts) + len(texts), "estimated", ["stop"]) and reference[6] is True
    assert _recorded(read_stream("openai.chat", chunks, groups)) == reference
    assert _recorded(read_stream("openai.chat", chunks, None)) == reference
