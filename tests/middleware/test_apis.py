"""The API readers, fed the payloads the providers document, and the Responses API end to end."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import APIS, loads
from llm_telemetry.errors import classify_error_body
from llm_telemetry.record import LLMCall
from support import RECORDED_WITHIN, free_port, scrape, serve


def sse(*events: dict[str, Any], named: bool = False) -> bytes:
    out = b""
    for event in events:
        if named:
            out += f"event: {event['type']}\n".encode()
        out += b"data: " + json.dumps(event).encode() + b"\n\n"
    return out


def read(api: str, body: bytes, *, stream: bool, request: dict[str, Any] | None = None) -> LLMCall:
    spec = APIS[api]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    if request is not None:
        spec.read_request(call, request, capture=False)
    reader = spec.response_reader(call, stream=stream, capture=False)
    for i in range(0, len(body), 7):  # small uneven pieces, as a network would deliver them
        reader.feed(body[i : i + 7], now=1.0 + i)
    reader.finish(now=10_000.0)
    return call


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "model": "gpt-4o-2024-08-06", "choices": [choice], **extra}


def test_openai_chat_stream_parallel_tool_calls_and_detailed_usage() -> None:
    body = (
        sse(
            chat_chunk({"role": "assistant", "content": None}),
            chat_chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "search", "arguments": ""}}]}),
            chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}),
            chat_chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "fetch", "arguments": ""}}]}),
            chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": "1}"}}]}),
            chat_chunk({}, "tool_calls"),
            {
                "id": "c1",
                "model": "gpt-4o-2024-08-06",
                "choices": [],
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": 30,
                    "prompt_tokens_details": {"cached_tokens": 64},
                    "completion_tokens_details": {"reasoning_tokens": 12},
                },
            },
        )
        + b"data: [DONE]\n\n"
    )
    call = read("openai.chat", body, stream=True, request={"model": "gpt-4o", "stream": True, "max_tokens": 50})
    assert call.tool_calls == ["search", "fetch"]
    assert call.finish_reasons == ["tool_calls"]
    assert (call.input_tokens, call.output_tokens, call.cache_read_tokens, call.reasoning_tokens) == (100, 30, 64, 12)
    assert call.usage_source == "reported"
    assert call.response_model == "gpt-4o-2024-08-06" and call.request_model == "gpt-4o"
    assert call.first_token_at is not None and call.first_token_at > 1.0  # not the role-only chunk at offset 0
    assert call.max_tokens == 50


def test_openai_chat_role_only_and_empty_chunks_are_not_the_first_token() -> None:
    body = sse(
        chat_chunk({"role": "assistant", "content": ""}), chat_chunk({"content": ""}), chat_chunk({"content": "Hi"})
    )
    call = read("openai.chat", body, stream=True)
    first_real = body.index(b'"Hi"')
    assert call.first_token_at is not None and call.first_token_at >= 1.0 + first_real - 7
    # The estimate counts the empty delta without a role (a token whose bytes are not a whole character yet, as
    # llama-cpp-python sends it), not the opening one with the role.
    assert call.output_tokens == 2 and call.usage_source == "estimated"


def test_openai_reasoning_content_counts_as_first_token() -> None:
    call = read("openai.chat", sse(chat_chunk({"reasoning_content": "thinking"})), stream=True)
    assert call.first_token_at is not None


@pytest.mark.parametrize(
    ("first", "output", "reasoning", "tpot"),
    [
        ({"content": "hi"}, 1010, 1000, 900.0 / 9),  # hidden reasoning, before the first token: left out
        ({"reasoning_content": "hm"}, 1010, 1000, 900.0 / 1009),  # streamed reasoning follows the first token
        ({"content": "hi"}, 10, 500, 900.0 / 9),  # more reasoning than output: a provider counting them apart
        ({"content": "hi"}, 10, 9, None),  # one token after the first: no gap to measure
    ],
    ids=["hidden", "streamed", "counted-apart", "too-few"],
)
def test_time_per_output_token_counts_the_tokens_after_the_first(
    first: dict[str, Any], output: int, reasoning: int, tpot: float | None
) -> None:
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": output,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    call = read("openai.chat", sse(chat_chunk(first), {"id": "c1", "choices": [], "usage": usage}), stream=True)
    call.first_token_at, call.end = 100.0, 1000.0
    assert call.time_per_output_token == (pytest.approx(tpot) if tpot is not None else None)


def test_openai_legacy_completions_stream() -> None:
    body = sse({"id": "x", "model": "m", "choices": [{"index": 0, "text": "hello", "finish_reason": None}]},
               {"id": "x", "model": "m", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})  # fmt: skip
    call = read("openai.completions", body, stream=True)
    assert call.finish_reasons == ["length"] and call.output_tokens == 1 and call.first_token_at is not None


@pytest.mark.parametrize(
    ("lead", "apart"),
    [(b"", False), (b"\n", True), (b"\r\n\r\n", True), (b"\xef\xbb\xbf", False), (b"\xef\xbb\xbf", True),
     (b"\xef\xbb\xbf\n", True)],
)  # fmt: skip
def test_a_body_is_an_event_stream_only_when_its_first_bytes_say_so(lead: bytes, apart: bool) -> None:
    """A body labelled JSON or text is read as an event stream when it starts with a field, after blank lines or a
    byte order mark (in chunks of their own too: ``apart``); JSON and plain text after the same are read as they
    were."""
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    # (The event a mark is put before is unread, as the SDKs leave it unread: a field they do not know.)
    role, token = chat_chunk({"role": "assistant", "content": ""}), chat_chunk({"content": "Hi"})
    events = sse(role, token, {"id": "c1", "choices": [], "usage": usage})
    answer = json.dumps({"model": "m", "choices": [{"message": {"content": "Hi"}}], "usage": usage}).encode()
    for body, stream in [(events, True), (answer, False), (b"hello: world\ndata is here\n", False)]:
        spec = APIS["openai.chat"]
        call = LLMCall(spec.operation, spec.provider, start=0.0)
        reader = spec.response_reader(call, stream=False, capture=False)
        for chunk in [lead, body] if apart else [lead + body]:
            reader.feed(chunk, now=2.0)
        reader.finish(now=3.0)
        assert call.stream is stream
        assert call.output_tokens == (None if body.startswith(b"hello") else 2)
        assert (call.first_token_at is not None) is stream


@pytest.mark.parametrize(("error", "expected"), [(None, "rate_limit"), ({"code": "server_error"}, "server_error")])
def test_a_responses_failure_after_an_error_event_keeps_its_type_unless_it_says_its_own(
    error: dict[str, Any] | None, expected: str
) -> None:
    """An ``error`` event (a rate limit), then the stream's ``response.failed`` whose response, as a proxy sends it,
    has no status and no error of its own: the rate limit stands (it was taken for a server error). One whose
    response says its own error is that error."""
    head = {"id": "r", "object": "response", "model": "gpt-4.1", "status": "in_progress", "output": []}
    body = sse(
        {"type": "response.created", "sequence_number": 0, "response": head},
        {"type": "error", "sequence_number": 1, "error": {"code": "rate_limit_exceeded", "message": "Rate limit"}},
        {"type": "response.failed", "sequence_number": 2, "response": {"id": "r", "model": "gpt-4.1", "error": error}},
        named=True,
    )
    call = read("openai.responses", body, stream=True)
    assert call.error_type == expected


def test_openai_json_without_usage_is_estimated_from_text() -> None:
    body = json.dumps({"model": "m", "choices": [{"message": {"content": "x" * 40}, "finish_reason": "stop"}]})
    call = read("openai.chat", body.encode(), stream=False)
    assert call.output_tokens == 10 and call.usage_source == "estimated"


def test_openai_legacy_completions_json_without_usage_is_estimated_from_its_text() -> None:
    body = json.dumps({"model": "m", "choices": [{"index": 0, "text": "x" * 40, "finish_reason": "stop"}]})
    call = read("openai.completions", body.encode(), stream=False)
    assert (call.output_tokens, call.usage_source, call.finish_reasons) == (10, "estimated", ["stop"])


@settings(max_examples=60)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=90))
def test_a_json_answer_without_usage_is_estimated_at_four_characters_a_token_rounded_up(text: str) -> None:
    """The estimate is the answer's characters over four, rounded up, whatever their count modulo four (the two
    tests above, of 40 characters, held under a count started one below zero: 39 rounds up to 10 too)."""
    expected = -(-len(text) // 4)
    chat = json.dumps({"model": "m", "choices": [{"message": {"content": text}, "finish_reason": "stop"}]})
    legacy = json.dumps({"model": "m", "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})
    for api, body in (("openai.chat", chat), ("openai.completions", legacy)):
        call = read(api, body.encode(), stream=False)
        assert (call.output_tokens, call.usage_source) == (expected, "estimated"), api


@pytest.mark.parametrize(
    ("api", "request_body"),
    [
        ("openai.chat", {"messages": [{"role": "user", "content": "x" * 40}]}),
        ("anthropic.messages", {"system": "y" * 20, "messages": [{"role": "user", "content": "x" * 20}]}),
        ("openai.responses", {"instructions": "y" * 10, "input": "x" * 30}),
        ("openai.responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 40}]}]}),
        ("openai.completions", {"prompt": ["x" * 20, "y" * 20]}),
        # Tool results sent back count as a chat request's tool messages do.
        (
            "anthropic.messages",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x" * 25}]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "u", "content": [{"type": "text", "text": "y" * 15}]}
                        ],
                    },
                ]
            },
        ),
        (
            "openai.responses",
            {
                "input": [
                    {"type": "function_call_output", "call_id": "c", "output": "x" * 20},
                    {
                        "type": "custom_tool_call_output",
                        "call_id": "d",
                        "output": [{"type": "input_text", "text": "y" * 10}],
                    },
                    {
                        "type": "shell_call_output",
                        "call_id": "e",
                        "output": [{"stdout": "z" * 6, "stderr": "w" * 4, "outcome": {"type": "exit", "exit_code": 1}}],
                    },
                ]
            },
        ),
        # A search result a tool returns: the text of its own content blocks.
        (
            "anthropic.messages",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [
                                    {
                                        "type": "search_result",
                                        "source": "https://example.com/a",
                                        "title": "A",
                                        "content": [{"type": "text", "text": "x" * 40}],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            },
        ),
    ],
)
def test_input_tokens_of_an_answer_without_usage_are_estimated_from_the_request(
    api: str, request_body: dict[str, Any]
) -> None:
    """An answer that reports no usage (a stream cut before it, a server that sends none) still counts its input,
    from the text the request sent at ~4 characters a token: 40 characters here, 10 tokens, in every API."""
    assert APIS[api].estimate_input_tokens(request_body) == 10
    assert APIS["openai.embeddings"].estimate_input_tokens({"input": "x" * 40}) is None  # always reported


def test_anthropic_stream_with_cache_and_thinking() -> None:
    body = sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "model": "claude-sonnet-4-20250514",
                "usage": {
                    "input_tokens": 10,
                    "cache_read_input_tokens": 1000,
                    "cache_creation_input_tokens": 50,
                    "output_tokens": 1,
                },
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "calc"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 42}},
        {"type": "message_stop"},
        named=True,
    )
    call = read("anthropic.messages", body, stream=True)
    assert call.input_tokens == 1060  # fresh + cache read + cache creation, as the semantic conventions count
    assert (call.cache_read_tokens, call.cache_creation_tokens, call.output_tokens) == (1000, 50, 42)
    assert call.tool_calls == ["calc"] and call.finish_reasons == ["tool_use"]
    assert call.response_id == "msg_1" and call.response_model == "claude-sonnet-4-20250514"


def test_anthropic_overloaded_error_event_mid_stream() -> None:
    body = sse(
        {"type": "message_start", "message": {"id": "m", "model": "claude", "usage": {"input_tokens": 3}}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        named=True,
    )
    assert read("anthropic.messages", body, stream=True).error_type == "server_error"


def test_responses_api_json_with_function_call() -> None:
    body = {
        "id": "resp_1", "model": "gpt-4.1", "status": "completed",
        "output": [{"type": "function_call", "call_id": "c", "name": "lookup", "arguments": "{}"}],
        "usage": {"input_tokens": 20, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 8},
                  "output_tokens_details": {"reasoning_tokens": 2}},
    }  # fmt: skip
    call = read("openai.responses", json.dumps(body).encode(), stream=False)
    assert call.tool_calls == ["lookup"]
    assert (call.input_tokens, call.output_tokens, call.cache_read_tokens, call.reasoning_tokens) == (20, 5, 8, 2)


def test_malformed_json_chunks_are_skipped_not_fatal() -> None:
    body = b"data: {not json\n\n" + sse(chat_chunk({"content": "ok"})) + b"data: \xff\xfe\n\n"
    call = read("openai.chat", body, stream=True)
    assert call.first_token_at is not None and call.output_tokens == 1


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"error": {"code": "context_length_exceeded", "type": "invalid_request_error", "message": "x"}}, 400,
         "context_length"),
        ({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 1 > 0"}}, 400,
         "context_length"),
        # llama.cpp's server, as it answers a prompt longer than its context.
        ({"error": {"code": 400, "message": "request (3652 tokens) exceeds the available context size (512 tokens), "
                    "try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 3652, "n_ctx": 512}},
         400, "context_length"),
        ({"error": {"code": 400, "message": "x", "type": "exceed_context_size_error"}}, 400, "context_length"),
        ({"error": {"code": 400, "message": "the request exceeds the available context size", "type": "?"}}, 400,
         "context_length"),
        ({"error": {"code": "content_policy_violation", "message": "x"}}, 400, "content_filter"),
        ({"error": {"type": "invalid_request_error", "code": None,
                    "message": "Your request was rejected as a result of our safety system."}}, 400, "content_filter"),
        ({"error": {"message": "Output blocked by moderation"}}, 400, "content_filter"),
        # A parameter whose name holds a refusal's word: no refusal.
        ({"error": {"type": "invalid_request_error", "code": "invalid_type", "param": "safety_identifier",
                    "message": "Invalid type for 'safety_identifier': expected a string"}}, 400, "invalid_request"),
        ({"error": {"type": "invalid_request_error",
                    "message": "Unrecognized request argument supplied: moderation_level"}}, 400, "invalid_request"),
        ({"error": {"type": "invalid_request_error", "message": "bad temperature"}}, 400, "invalid_request"),
        ({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}, 429, "rate_limit"),
        ({"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}, 401, "auth"),
        ({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, 529, "server_error"),
        ({"detail": "Not Found"}, 404, "not_found"),
        ({"detail": "?"}, 418, "invalid_request"),
        # A 402 is an account out of credit, whatever else its body says (a gateway's broad type, words of a limit).
        ({"detail": "Payment Required"}, 402, "rate_limit"),
        ({"error": {"type": "invalid_request_error", "message": "spend exceeds the context limit"}}, 402,
         "rate_limit"),
        # The LiteLLM proxy puts a broad type on any error, with the status as it answered: the status decides.
        ({"error": {"message": "litellm.Timeout: Request timed out", "type": "invalid_request_error", "param": None,
                    "code": "408"}}, 408, "timeout"),
        ({"error": {"message": "litellm.NotFoundError: x", "type": "invalid_request_error", "param": None,
                    "code": "404"}}, 404, "not_found"),
        ({"error": {"message": "x", "type": "invalid_request_error", "param": None, "code": "413"}}, 413,
         "context_length"),
        ({"type": "error", "error": {"type": "api_error", "message": "litellm.Timeout: x"}}, 504, "timeout"),
        ({"type": "error", "error": {"type": "api_error", "message": "x"}}, 422, "invalid_request"),
        ({"type": "error", "error": {"type": "api_error", "message": "x"}}, 500, "server_error"),
        ({"error": {"type": "invalid_request_error", "message": "x"}}, 500, "server_error"),
        # A status that says what failed wins over a message's words: Bedrock's throttling ("too many tokens"), a
        # gateway's 404 or 5xx naming a moderation model or a safety service, a 401 whose project name has the words.
        ({"error": {"message": "Too many tokens, please wait before trying again.", "type": None, "code": None}},
         429, "rate_limit"),
        ({"error": {"message": "The model `omni-moderation-latest` does not exist", "type": "invalid_request_error",
                    "code": "404"}}, 404, "not_found"),
        ({"error": {"message": "Upstream safety service unavailable", "type": "server_error"}}, 503, "server_error"),
        ({"error": {"message": "litellm.InternalServerError: llama-guard-safety: boom",
                    "type": "internal_server_error"}}, 500, "server_error"),
        ({"error": {"message": "Invalid API key for project 'context size tests'"}}, 401, "auth"),
        ({"error": {"message": "request timed out: context length 9000"}}, 408, "timeout"),
        ({"error": {"message": "Too many tokens in flight", "code": "429"}}, 200, "rate_limit"),
        # Of a 400, 413 or 422 the words say more.
        ({"error": {"message": "This model's maximum context length is 8192 tokens"}}, 422, "context_length"),
        ({"error": {"message": "prompt is too long: 250000 tokens"}}, 413, "context_length"),
        # An error event in a stream that answered 200: the status carried as the code, else the type.
        ({"error": {"type": "invalid_request_error", "message": "x", "code": "408"}}, 200, "timeout"),
        ({"error": {"type": "invalid_request_error", "message": "x"}}, 200, "invalid_request"),
    ],
)  # fmt: skip
def test_error_bodies_map_to_the_fixed_error_types(body: dict[str, Any], status: int, expected: str) -> None:
    assert classify_error_body(body, status) == expected


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # Anthropic's error types (its errors page), as an `error` event inside a stream.
        ("invalid_request_error", "invalid_request"),
        ("authentication_error", "auth"),
        ("permission_error", "auth"),
        ("not_found_error", "not_found"),
        ("request_too_large", "context_length"),
        ("rate_limit_error", "rate_limit"),
        ("billing_error", "rate_limit"),
        ("api_error", "server_error"),
        ("overloaded_error", "server_error"),
        ("timeout_error", "timeout"),
        # OpenAI's types and codes, in a stream's error event or a Realtime-style error.
        ("server_error", "server_error"),
        ("internal_error", "server_error"),
        ("tokens", "rate_limit"),
        ("requests", "rate_limit"),
        ("insufficient_quota", "rate_limit"),
        ("rate_limit_exceeded", "rate_limit"),
        ("context_length_exceeded", "context_length"),
        ("string_above_max_length", "context_length"),
        ("content_filter", "content_filter"),
        ("invalid_api_key", "auth"),
        ("model_not_found", "not_found"),
        ("timeout", "timeout"),
        # Other servers and gateways (Bedrock through a gateway, vLLM, llama.cpp).
        ("throttling_error", "rate_limit"),
        ("service_unavailable", "server_error"),
        ("exceed_context_size_error", "context_length"),
    ],
)
@pytest.mark.parametrize("status", [None, 200], ids=["no-status", "stream-said-200"])
def test_an_error_inside_a_stream_is_typed_by_its_code_alone(kind: str, expected: str, status: int | None) -> None:
    """An error event inside a stream whose response said 200 has only its type or code to go by (no HTTP status
    to fall back on): each documented one maps to its error type, not to the stream default ``server_error``."""
    for body in ({"type": "error", "error": {"type": kind, "message": "x"}}, {"error": {"code": kind, "message": "x"}}):
        assert classify_error_body(body, status, default="unknown") == expected, body


# --- the Responses API stream through the real openai SDK -----------------------------------------------

RESPONSES_EVENTS = [
    {"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_9", "object": "response", "created_at": 1, "model": "gpt-4.1-mini", "status": "in_progress",
        "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}},
    {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m", "output_index": 0,
     "content_index": 0, "delta": "Hello", "logprobs": []},
    {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "m", "output_index": 0,
     "content_index": 0, "delta": " there", "logprobs": []},
    {"type": "response.completed", "sequence_number": 3, "response": {
        "id": "resp_9", "object": "response", "created_at": 1, "model": "gpt-4.1-mini", "status": "completed",
        "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": 11, "output_tokens": 2, "total_tokens": 13,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}},
]  # fmt: skip


async def responses_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in RESPONSES_EVENTS:
        await send({"type": "http.response.body", "body": sse(event, named=True), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_responses_api_stream_through_the_openai_sdk() -> None:
    port = free_port()
    app = LLMTelemetryMiddleware(responses_app, metrics_port=port, metrics_host="127.0.0.1")
    with serve(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="t", max_retries=0)
        text = "".join(
            e.delta for e in client.responses.create(model="gpt-4.1-mini", input="hi", stream=True)
            if e.type == "response.output_text.delta"
        )  # fmt: skip
        assert text == "Hello there"
        deadline = time.monotonic() + RECORDED_WITHIN
        while (m := scrape(port)).value("llm_requests_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    app.telemetry.shutdown()
    assert m.value("llm_tokens_total", gen_ai_token_type="input", gen_ai_request_model="gpt-4.1-mini") == 11
    assert m.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="reported") == 2
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_operation_name="chat") == 1
    assert m.value("llm_cost_usd_total") == pytest.approx((11 * 0.4 + 2 * 1.6) / 1e6)


# --- the byte-level fast paths agree with full parsing ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def _json_loads_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


@given(json_values, st.sampled_from(["", " ", "\n", " \r\n\t", " x", "}", "\x00"]), st.booleans())
@settings(max_examples=300, deadline=None)
def test_loads_agrees_with_json_loads_on_documents(value: Any, trailer: str, spaced: bool) -> None:
    data = (json.dumps(value, separators=(", ", ": ") if spaced else (",", ":")) + trailer).encode()
    assert loads(data) == _json_loads_or_none(data)


@given(st.binary(max_size=40), st.sampled_from([b"", b"{", b"[", b'{"a":', b"[1,"]))
@settings(max_examples=300, deadline=None)
def test_loads_agrees_with_json_loads_on_any_bytes(data: bytes, prefix: bytes) -> None:
    data = prefix + data
    assert repr(loads(data)) == repr(_json_loads_or_none(data))  # repr: NaN != NaN


texts = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)


def _chat_events(words: list[str], spaced: bool, twin_finish: bool) -> list[dict[str, Any]]:
    events = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": word}) for word in words]
    if twin_finish:
        # Two choices in one chunk: the first one finishes while the second still streams text.
        events.append(
            {
                "id": "c1",
                "model": "gpt-4o-2024-08-06",
                "choices": [
                    {"index": 0, "delta": {"content": "x"}, "finish_reason": "length"},
                    {"index": 1, "delta": {"content": "y"}, "finish_reason": None},
                ],
            }
        )
    events.append(chat_chunk({}, "stop"))
    if twin_finish:
        events[-1]["choices"][0]["index"] = 1  # then the second choice finishes, in a chunk shaped as the first's
    return events


@given(
    st.lists(texts, min_size=1, max_size=30),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.none() | st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.sampled_from(["content_filter", "stop"])),
)
@settings(max_examples=150, deadline=None)
@example(["a"], False, False, False, (4096, 0, "content_filter"))  # a first token of choice 4096 (MAX_STREAM_CHOICES)
def test_stream_fast_paths_agree_with_full_parsing(
    words: list[str], spaced: bool, twin: bool, usage: bool, other: tuple[int, int, str] | None
) -> None:
    events = _chat_events(words, spaced, twin)
    if other is not None and not twin:
        # The stream's one choice at any index (a server may number it as it likes), and another choice's finish
        # (or the same choice's, repeated with another word) before its own.
        index, other_index, reason = other
        for event in events:
            event["choices"][0]["index"] = index
        events.insert(-1, {"id": "c1", "model": "gpt-4o-2024-08-06",
                           "choices": [{"index": other_index, "delta": {}, "finish_reason": reason}]})  # fmt: skip
    if usage:
        events.append({"id": "c1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}})
    separators = (", ", ": ") if spaced else (",", ":")
    chunks = [b"data: " + json.dumps(e, separators=separators).encode() + b"\n\n" for e in events]

    def run(capture: bool) -> LLMCall:
        spec = APIS["openai.chat"]
        call = LLMCall(spec.operation, spec.provider, start=0.0)
        reader = spec.response_reader(call, stream=True, capture=capture)  # capture turns the fast paths off
        for i, chunk in enumerate(chunks):
            reader.feed(chunk, now=1.0 + i)
        reader.finish(now=100.0)
        return call

    fast, full = run(False), run(True)
    assert fast.finish_reasons == full.finish_reasons
    assert fast.choice_finishes == full.choice_finishes  # the span's one finish reason per choice
    assert (fast.output_tokens, fast.usage_source) == (full.output_tokens, full.usage_source)
    assert fast.first_token_at == full.first_token_at == 2.0
    if twin:
        assert "length" in fast.finish_reasons
        assert fast.choice_finishes == {0: "length", 1: "stop"}


@given(st.binary(max_size=24), st.booleans())
@settings(max_examples=400, deadline=None)
def test_shape_fast_path_takes_only_the_inside_of_one_json_string(middle: bytes, spaced: bool) -> None:
    """Once a stream's text-delta shape is learnt, a chunk with the same bytes around an arbitrary middle is
    counted without parsing exactly when the middle can only be the inside of one JSON string; anything else
    (a raw quote, backslash or line break that could change the structure) goes to the full parse."""
    separators = (", ", ": ") if spaced else (",", ":")

    def chunk(text: str) -> bytes:
        return b"data: " + json.dumps(chat_chunk({"content": text}), separators=separators).encode() + b"\n\n"

    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    for i, text in enumerate(["", "first", "second"]):
        reader.feed(chunk(text) if i else b"data: " + json.dumps(chat_chunk({"role": "assistant"})).encode() + b"\n\n")
    assert reader._fast is not None
    head, _, tail = chunk("MIDDLE").partition(b"MIDDLE")
    chunks, misses = reader._chunks, reader._misses
    reader.feed(head + middle + tail)
    inside_one_string = re.fullmatch(rb'(?:[^"\\\r\n]|\\[^\r\n])*', middle) is not None and middle != b""
    fast = reader._misses == misses  # a miss is counted before the chunk goes to the full parse
    assert fast == inside_one_string
    if fast:
        assert reader._chunks == chunks + 1


def test_a_chunk_of_the_learnt_shape_that_ends_an_event_begun_earlier_is_read_as_part_of_it() -> None:
    """The learnt text-delta shape applies only to a chunk that starts between events. A chunk shaped exactly like a
    text delta that is the second data line of an event begun in the chunk before is part of that event, and goes to
    the decoder with it: the event after it is then read on its own, its finish reason kept."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + json.dumps(chat_chunk(delta, finish)).encode() + b"\n\n"

    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "first"}), chunk({"content": "second"})]
    chunks += [b'data: {"note": 1}\n', chunk({"content": "third"}), chunk({}, "stop"), b"data: [DONE]\n\n"]
    for i, piece in enumerate(chunks):
        reader.feed(piece, now=1.0 + i)
    reader.finish(now=100.0)
    assert call.finish_reasons == ["stop"]
    assert not reader.cut_short()


def test_anthropic_text_deltas_take_the_fast_path_and_count_exactly() -> None:
    deltas = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f'w{i} "q" \\ \n'}}
        for i in range(40)
    ]
    body_events = [
        {"type": "message_start", "message": {"id": "m", "model": "claude", "usage": {"input_tokens": 3}}},
        *deltas,
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}},
    ]
    spec = APIS["anthropic.messages"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    for i, event in enumerate(body_events):
        reader.feed(sse(event, named=True), now=1.0 + i)
    reader.finish(now=100.0)
    assert call.first_token_at == 2.0 and call.output_tokens == 40 and call.finish_reasons == ["end_turn"]
    assert reader._chunks == 40


def test_openai_chat_stream_parallel_tool_calls_sent_whole_at_one_index_each_count() -> None:
    """Parallel calls each sent whole in one delta, with no index (Gemini's OpenAI-compatible streams) or all at
    index 0 (the LiteLLM proxy re-emitting them): each has an id of its own, and each is counted. A server that
    repeats a call's id and name on its later deltas still counts it once."""

    def whole(name: str, call_id: str, index: int | None) -> dict[str, Any]:
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}
        return chat_chunk({"tool_calls": [call if index is None else {"index": index, **call}]})

    for index in (None, 0):
        body = sse(whole("get_weather", "call_a", index), whole("get_time", "call_b", index), chat_chunk({}, "stop"))
        assert read("openai.chat", body, stream=True).tool_calls == ["get_weather", "get_time"], index
    repeated = [{"index": 0, "id": "call_a", "function": {"name": "search", "arguments": piece}} for piece in "{}"]
    body = sse(*(chat_chunk({"tool_calls": [delta]}) for delta in repeated), chat_chunk({}, "tool_calls"))
    assert read("openai.chat", body, stream=True).tool_calls == ["search"]
    # Two calls at index 0, their argument deltas interleaved, each repeating its id and name: two calls.
    interleaved = [
        {"index": 0, "id": call_id, "function": {"name": name, "arguments": piece}}
        for piece in "{}"
        for call_id, name in (("call_a", "search"), ("call_b", "fetch"))
    ]
    body = sse(chat_chunk({"tool_calls": interleaved}), chat_chunk({}, "tool_calls"))
    assert read("openai.chat", body, stream=True).tool_calls == ["search", "fetch"]
    body = sse(*(chat_chunk({"tool_calls": [delta]}) for delta in interleaved), chat_chunk({}, "tool_calls"))
    assert read("openai.chat", body, stream=True).tool_calls == ["search", "fetch"]


def test_tool_results_count_only_the_latest_turn_in_every_api() -> None:
    def results(api: str, body: dict[str, Any]) -> list[tuple[str, bool]]:
        spec = APIS[api]
        call = LLMCall(spec.operation, spec.provider, start=0.0)
        spec.read_request(call, body, capture=False)
        return [(r.name, r.is_error) for r in call.tool_results]

    openai_history = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "search"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "old result"},
        {"role": "assistant", "tool_calls": [{"id": "b", "function": {"name": "fetch"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "Error: timed out"},
    ]
    assert results("openai.chat", {"messages": openai_history}) == [("fetch", True)]
    anthropic_history = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "search", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "old"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "b", "name": "fetch", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "b", "is_error": True}]},
    ]
    assert results("anthropic.messages", {"messages": anthropic_history}) == [("fetch", True)]
    # A later model turn given as a plain string (the Messages API allows it) ends the turn as well: the results
    # before it were sent, and counted, with the request that asked for that turn.
    answered = [
        *anthropic_history,
        {"role": "assistant", "content": "It timed out."},
        {"role": "user", "content": "ok"},
    ]
    assert results("anthropic.messages", {"messages": answered}) == []
    responses_history = [
        {"type": "function_call", "call_id": "a", "name": "search", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "old"},
        {"type": "function_call", "call_id": "b", "name": "fetch", "arguments": "{}"},
        {"type": "function_call", "call_id": "c", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "b", "output": '{"error": "no such page"}'},
        {"type": "function_call_output", "call_id": "c", "output": "found"},
    ]
    assert results("openai.responses", {"input": responses_history}) == [("fetch", True), ("lookup", False)]
    # Custom tools (free-form input): their results are named after them too.
    custom_chat = [
        {"role": "assistant", "tool_calls": [{"id": "x", "type": "custom", "custom": {"name": "code_exec"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "42"},
    ]
    assert results("openai.chat", {"messages": custom_chat}) == [("code_exec", False)]
    custom_responses = [
        {"type": "custom_tool_call", "call_id": "x", "name": "code_exec", "input": "print(6 * 7)"},
        {"type": "custom_tool_call_output", "call_id": "x", "output": "42"},
    ]
    assert results("openai.responses", {"input": custom_responses}) == [("code_exec", False)]
    # An assistant turn that ends the messages is a prefill the model continues: the results before it are new.
    prefilled_anthropic = [*anthropic_history, {"role": "assistant", "content": "The fetch"}]
    assert results("anthropic.messages", {"messages": prefilled_anthropic}) == [("fetch", True)]
    prefilled_openai = [*openai_history, {"role": "assistant", "content": "The fetch"}]
    assert results("openai.chat", {"messages": prefilled_openai}) == [("fetch", True)]


@pytest.mark.parametrize(("finished", "cut"), [(128, True), (199, True), (200, False)])
def test_a_stream_of_more_choices_than_kept_apart_ends_once_each_has_finished(finished: int, cut: bool) -> None:
    """A server that takes ``n`` over 128 (OpenAI refuses it): past the 128 choices whose finish reasons the span
    keeps, the stream still ends only once every choice has finished; cut before, it is cut short."""
    spec = APIS["openai.chat"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    # Each choice opens with its role chunk, as OpenAI's n>1 streams do, then says something.
    events = [chat_chunk({}) | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]}
              for i in range(200)]  # fmt: skip
    events += [chat_chunk({}) | {"choices": [{"index": i, "delta": {"content": "x"}}]} for i in range(200)]
    events += [chat_chunk({}, "stop") | {"choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}
               for i in range(finished)]  # fmt: skip
    for i, event in enumerate(events):
        reader.feed(b"data: " + json.dumps(event).encode() + b"\n\n", now=1.0 + i)
    reader.finish(now=1000.0)
    assert reader.cut_short() is cut
