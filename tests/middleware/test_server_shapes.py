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

from llm_telemetry.apis import APIS
from llm_telemetry.record import LLMCall

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


def llama_server(words: list[str], usage_every_chunk: bool) -> list[Event]:
    """llama.cpp's server as a recent build sends a stream whose client asked for the usage (seen from the build
    vendored by llama-cpp-python 0.3.36): the finish in an empty delta of its own, then the usage and ``timings`` in
    a chunk with no choices."""
    tail = {"created": 1796154475, "id": "chatcmpl-18994p27Ud", "model": "tiny", "system_fingerprint": "b1-0c1e570",
            "object": "chat.completion.chunk"}  # fmt: skip

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], **tail}

    events: list[Event] = [chunk({"role": "assistant", "content": None}, None)]
    events += [chunk({"content": word}, None) for word in words]
    usage = {"completion_tokens": len(words), "prompt_tokens": PROMPT_TOKENS,
             "total_tokens": PROMPT_TOKENS + len(words), "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    timings = {"cache_n": 0, "prompt_n": PROMPT_TOKENS, "prompt_ms": 1.778, "predicted_n": len(words)}
    return [*events, chunk({}, "stop"), {"choices": [], **tail, "usage": usage, "timings": timings}, "[DONE]"]


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


def llama_cpp_python(tokens: list[str], legacy: bool = False) -> list[Event]:
    """llama-cpp-python's own server (not llama.cpp's): the role alone in the first delta, then one delta per
    generated token, whose text is empty when the token ends inside a character (its bytes are held until the
    character is whole), the finish in an empty delta, and no usage at all (it has no ``stream_options``). Its legacy
    completions stream: one choice ``text`` per token, the finish with an empty text of its own."""
    if legacy:
        head = {"id": "cmpl-c232d78c", "object": "text_completion", "created": 1796149687, "model": "tiny-llama"}

        def text(value: str, finish: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"text": value, "index": 0, "logprobs": None, "finish_reason": finish}]}

        return [*(text(token, None) for token in tokens), text("", "length"), "[DONE]"]
    head = {"id": "chatcmpl-508b09c7", "model": "tiny-llama", "created": 1796149687, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    return [chunk({"role": "assistant"}, None), *(chunk({"content": t}, None) for t in tokens), chunk({}, "length"),
            "[DONE]"]  # fmt: skip


SERVERS: dict[str, Callable[[list[str], bool], list[Event]]] = {
    "vllm": vllm,
    "llama.cpp": llama_cpp,
    "llama-server": llama_server,
    "tgi": tgi,
}
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


@given(st.lists(st.sampled_from(["", "", " the", "x", "\u00fc", "\u6570", '"', "\\n"]), min_size=1, max_size=40),
       st.booleans(), st.booleans(), st.data())  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_llama_cpp_python_streams_estimate_one_token_per_delta(
    tokens: list[str], legacy: bool, spaced: bool, data: st.DataObject
) -> None:
    """Without a usage, the estimate is the deltas the tokens came in, the empty ones included (a real
    llama-cpp-python server agrees with its own non-stream usage: tests/test_llama_cpp_server.py); the first token
    is still the first delta with text."""
    api = "openai.completions" if legacy else "openai.chat"
    events = [encode(event, spaced) for event in llama_cpp_python(tokens, legacy)]
    call = through_exchange(data.draw(chunkings(events)), api)
    assert (call.output_tokens, call.usage_source, call.finish_reasons) == (len(tokens), "estimated", ["length"])
    spec = APIS[api]
    one = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(one, stream=True, capture=False)
    for i, event in enumerate(events):
        reader.feed(event, now=float(i))
    reader.finish(now=1000.0)
    first = next((i for i, token in enumerate(tokens) if token), None)
    assert one.first_token_at == (None if first is None else float(first + (0 if legacy else 1)))
    assert one.output_tokens == len(tokens)


@given(st.sampled_from(sorted(SERVERS)), words, st.booleans(), st.data())
@settings(max_examples=200, deadline=None)
def test_streams_without_usage_estimate_their_text_deltas(
    server: str, texts: list[str], spaced: bool, data: st.DataObject
) -> None:
    """A client that does not ask for the usage (``stream_options`` is opt-in) gets the same streams without it: the
    estimate counts the text deltas, not the opening role delta or the closing finish delta with empty content."""
    events: list[Event] = []
    for event in SERVERS[server](texts, False):
        if isinstance(event, dict):
            event = {key: value for key, value in event.items() if key not in ("usage", "timings")}
            if not event["choices"]:
                continue
        events.append(event)
    call = through_exchange(data.draw(chunkings([encode(event, spaced) for event in events])))
    assert (call.output_tokens, call.usage_source, call.finish_reasons) == (len(texts), "estimated", ["stop"])


def test_empty_deltas_before_the_first_text_are_not_set_aside_as_a_role_delta() -> None:
    """The opening role delta is set aside until the next event shows it redundant; an empty content delta without
    a role that follows it is a token, and must not be taken for another such delta and dropped."""
    events = [encode(event, False) for event in llama_cpp_python(["", "", " the", ""])]
    for chunks in (events, [b"".join(events)]):
        call = through_exchange(chunks)
        assert (call.output_tokens, call.usage_source) == (4, "estimated")


@given(st.lists(st.text(max_size=6), min_size=0, max_size=30), st.booleans(), st.data())
@settings(max_examples=200, deadline=None)
def test_a_tool_call_stream_without_usage_is_estimated_from_its_pieces(
    arguments: list[str], spaced: bool, data: st.DataObject
) -> None:
    """A stream that answers with a tool call only, as OpenAI sends one: the name in the first delta (with the role),
    then the arguments a piece a delta, then the finish. Without a usage, each piece is about a token, the first
    one too; before, such a stream recorded no output tokens at all."""
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1767225600, "model": "gpt-4o"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    events: list[Event] = [chunk({"role": "assistant", "content": None, "tool_calls": [first]})]
    events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in arguments]
    events += [chunk({}, "tool_calls"), "[DONE]"]
    call = through_exchange(data.draw(chunkings([encode(event, spaced) for event in events])))
    assert call.tool_calls == ["get_weather"] and call.finish_reasons == ["tool_calls"]
    assert (call.output_tokens, call.usage_source) == (len(arguments) + 1, "estimated")
