"""Chat streams shaped as OpenAI-compatible servers other than OpenAI send them (docs/metrics.md names vLLM, TGI,
llama.cpp and LiteLLM): their members in other orders, a role or ``logprobs`` in every delta, a usage object on every
chunk, timings beside the usage. Through the middleware's ``send`` (chunks kept and read in bulk where they allow it)
each gives the numbers the stream says, the same as a full parse, whatever the texts and the chunking."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_held_chunks import numbers, one_by_one, through_exchange

Event = dict[str, Any] | str
PROMPT_TOKENS = 17


def vllm(words: list[str], usage_every_chunk: bool) -> list[Event]:
    """vLLM: ``logprobs`` in each choice, an empty first content, the finish with ``stop_reason``; with
    ``continuous_usage_stats`` each chunk carries the usage so far."""
    head = {"id": "chatcmpl-7f3a", "object": "chat.completion.chunk", "created": 1767225600, "model": "qwen"}

    def chunk(delta: dict[str, Any], finish: str | None, done: int, **choice: Any) -> dict[str, Any]:
        event = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **choice}]}
        if usage_every_chunk:
            event["usage"] = {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + done,
                              "completion_tokens": done}  # fmt: skip
        return event

    events: list[Event] = [chunk({"role": "assistant", "content": ""}, None, 0)]
    events += [chunk({"content": word}, None, i + 1) for i, word in enumerate(words)]
    events.append(chunk({"content": ""}, "stop", len(words), stop_reason=None))
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + len(words),
        "completion_tokens": len(words),
    }
    return [*events, {**head, "choices": [], "usage": usage}, "[DONE]"]


def llama_cpp(words: list[str], usage_every_chunk: bool) -> list[Event]:
    """llama.cpp's server: ``choices`` first, a ``system_fingerprint``, the finish with an empty delta, and the usage
    and ``timings`` on the finish chunk itself."""
    tail = {"created": 1767225600, "id": "chatcmpl-Qx1", "model": "gguf", "system_fingerprint": "b6000-1a2b3c",
            "object": "chat.completion.chunk"}  # fmt: skip

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], **tail}

    events: list[Event] = [chunk({"role": "assistant", "content": None}, None)]
    events += [chunk({"content": word}, None) for word in words]
    usage = {
        "completion_tokens": len(words),
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + len(words),
    }
    timings = {"prompt_n": PROMPT_TOKENS, "prompt_ms": 12.5, "predicted_n": len(words), "predicted_ms": 80.25}
    return [*events, {**chunk({}, "stop"), "usage": usage, "timings": timings}, "[DONE]"]


def tgi(words: list[str], usage_every_chunk: bool) -> list[Event]:
    """Text Generation Inference's Messages API: the role in every delta, ``"usage": null`` on every chunk but the
    last, whose usage follows the finish in a chunk of its own."""
    head = {"object": "chat.completion.chunk", "id": "", "created": 1767225600, "model": "tgi",
            "system_fingerprint": "3.0.0-native"}  # fmt: skip

    def chunk(content: str, finish: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": content, "tool_calls": None}
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None}  # fmt: skip

    events: list[Event] = [chunk(word, None) for word in words]
    events.append(chunk("", "stop"))
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": len(words),
        "total_tokens": PROMPT_TOKENS + len(words),
    }
    return [*events, {**head, "choices": [], "usage": usage}, "[DONE]"]


SERVERS: dict[str, Callable[[list[str], bool], list[Event]]] = {"vllm": vllm, "llama.cpp": llama_cpp, "tgi": tgi}
words = st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8), min_size=1, max_size=30)


def encode(event: Event, spaced: bool) -> bytes:
    if isinstance(event, str):
        return b"data: " + event.encode() + b"\n\n"
    separators = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(event, separators=separators, ensure_ascii=False).encode() + b"\n\n"


@st.composite
def chunkings(draw: st.DrawFn, events: list[bytes]) -> list[bytes]:
    """The stream's bytes as a proxy may pass them on: event by event, or cut anywhere, or several together."""
    if draw(st.booleans()):
        return events
    body = b"".join(events)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(body) - 1), max_size=12))))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


@given(st.sampled_from(sorted(SERVERS)), words, st.booleans(), st.booleans(), st.data())
@settings(max_examples=300, deadline=None)
def test_other_servers_streams_give_their_numbers(
    server: str, texts: list[str], spaced: bool, usage_every_chunk: bool, data: st.DataObject
) -> None:
    events = [encode(event, spaced) for event in SERVERS[server](texts, usage_every_chunk)]
    chunks = data.draw(chunkings(events))
    call = through_exchange(chunks)
    # What the stream says: the last usage (never a sum of the running ones), one finish reason, a first token.
    assert (call.input_tokens, call.output_tokens, call.usage_source) == (PROMPT_TOKENS, len(texts), "reported")
    assert call.finish_reasons == ["stop"]
    assert call.error_type is None and call.first_token_at is not None
    full, _ = one_by_one(chunks, capture=True)  # capture turns the fast paths off
    assert numbers(call)[:-1] == numbers(full)[:-1]


@given(words, st.integers(0, 30), st.booleans())
@settings(max_examples=100, deadline=None)
def test_a_tool_call_among_tgis_null_tool_calls_is_counted(texts: list[str], at: int, spaced: bool) -> None:
    """TGI's deltas carry ``"tool_calls": null``, read as plain text deltas; one delta with a real tool call among
    them, text and all, is still read in full and counted."""
    events = tgi(texts, False)
    call_delta = {"role": "assistant", "content": "Let me check.",
                  "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": "{}"}}]}  # fmt: skip
    tool = {**events[0], "choices": [{"index": 0, "delta": call_delta, "logprobs": None, "finish_reason": None}]}
    events.insert(min(at, len(texts)), tool)
    call = through_exchange([encode(event, spaced) for event in events])
    assert call.tool_calls == ["get_weather"]
    assert (call.input_tokens, call.output_tokens, call.finish_reasons) == (PROMPT_TOKENS, len(texts), ["stop"])
