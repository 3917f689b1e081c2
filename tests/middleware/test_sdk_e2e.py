"""End to end: the demo service under real uvicorn, driven by the official openai and anthropic SDKs,
checked through real scrapes of the middleware's own metrics port.

Each test uses its own model name so that the tests sharing one server do not see each other's series.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.demo.app import create_app
from support import FRESH, RECORDED_WITHIN, Metrics, free_port, request_body, scrape, serve, whole_after

FIRST_TOKEN_DELAY = 0.15
TOKEN_DELAY = 0.002
REPLY_WORDS = 12
PROMPT = "How fast is the first token today?"  # 7 words: the demo counts 7 input tokens
PROMPT_TOKENS = 7
TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, int]]:
    metrics_port = free_port()
    app = create_app(
        first_token_delay=FIRST_TOKEN_DELAY,
        token_delay=TOKEN_DELAY,
        reply_words=REPLY_WORDS,
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
        attribution_headers={"x-tenant-id": "tenant"},
    )
    with serve(app) as base:
        yield base, metrics_port
    app.telemetry.shutdown()


@pytest.fixture
def oai(service: tuple[str, int]) -> openai.OpenAI:
    return openai.OpenAI(base_url=service[0] + "/v1", api_key="test", max_retries=0)


@pytest.fixture
def claude(service: tuple[str, int]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=service[0], api_key="test", max_retries=0)


def eventually(service: tuple[str, int], check: Callable[[Metrics], bool]) -> Metrics:
    """Metrics are recorded just after the last byte is sent; poll briefly until they show up."""
    deadline = time.monotonic() + RECORDED_WITHIN
    while True:
        metrics = scrape(service[1])
        if check(metrics):
            return whole_after(service[1])
        if time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def requests_of(model: str, count: int) -> Callable[[Metrics], bool]:
    return lambda m: m.value("llm_requests_total", gen_ai_request_model=model) >= count


def test_openai_stream_with_usage_reports_exact_tokens_and_ttft(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "gpt-4o-2024-11-20"  # a snapshot of gpt-4o: priced as gpt-4o
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == REPLY_WORDS

    m = eventually(service, requests_of(model, 1))
    assert m.value("llm_requests_total", gen_ai_request_model=model, gen_ai_request_stream="true") == 1
    tokens = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **tokens) == PROMPT_TOKENS
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **tokens) == REPLY_WORDS
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    ttft = m.value("gen_ai_server_time_to_first_token_seconds_sum", gen_ai_request_model=model)
    assert FIRST_TOKEN_DELAY <= ttft < FIRST_TOKEN_DELAY + 1.0
    # The role-only first chunk is sent before the delay; TTFT must not count it as the first token.
    assert m.value("gen_ai_server_time_to_first_token_seconds_bucket", gen_ai_request_model=model, le="0.1") == 0
    duration = m.value("gen_ai_server_request_duration_seconds_sum", gen_ai_request_model=model)
    assert duration >= ttft + (REPLY_WORDS - 1) * TOKEN_DELAY
    tpot = m.value("gen_ai_server_time_per_output_token_seconds_sum", gen_ai_request_model=model)
    assert TOKEN_DELAY <= tpot < 0.5
    assert m.series("llm_requests_total", gen_ai_request_model=model)[0]["gen_ai_response_model"] == model
    # $2.50 in, $10 out per million tokens.
    cost = m.value("llm_cost_usd_total", gen_ai_request_model=model)
    assert cost == pytest.approx((PROMPT_TOKENS * 2.5 + REPLY_WORDS * 10.0) / 1e6)
    assert m.value("llm_errors_total", gen_ai_request_model=model) == 0


def test_openai_stream_without_usage_is_estimated(service: tuple[str, int], oai: openai.OpenAI) -> None:
    """The openai SDK's default stream reports no usage: output is counted by its deltas, input from the request's
    text at ~4 characters a token, both labelled estimated, and both priced (input used to count none, and the cost
    of a long prompt went missing)."""
    model = "gpt-4o-2024-08-06"  # a snapshot of gpt-4o: priced as gpt-4o
    prompt = "Summarise this. " + "lorem ipsum " * 500  # 6,016 characters: 1,504 tokens by the estimate
    list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], stream=True))
    m = eventually(service, requests_of(model, 1))
    estimated = {"gen_ai_request_model": model, "llm_usage_source": "estimated"}
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **estimated) == REPLY_WORDS
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **estimated) == 1504
    assert m.value("llm_tokens_total", gen_ai_request_model=model, llm_usage_source="reported") == 0
    # $2.50 in, $10 out per million tokens.
    assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == pytest.approx(
        (1504 * 2.5 + REPLY_WORDS * 10.0) / 1e6
    )


def test_openai_non_stream_records_no_ttft(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "gpt-4o-plain"
    reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}])
    assert reply.usage is not None and reply.usage.completion_tokens == REPLY_WORDS
    m = eventually(service, requests_of(model, 1))
    assert m.value("llm_requests_total", gen_ai_request_model=model, gen_ai_request_stream="false") == 1
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == REPLY_WORDS
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 0
    assert m.value("gen_ai_server_request_duration_seconds_sum", gen_ai_request_model=model) >= FIRST_TOKEN_DELAY


def test_openai_responses_api_stream_and_non_stream(service: tuple[str, int], oai: openai.OpenAI) -> None:
    """The Responses API as OpenAI streams it (numbered events, obfuscated deltas): the usage the SDK receives, a
    time to first token after the events that open the stream, and a tool call by name."""
    model = "gpt-4.1-responses"
    reply = oai.responses.create(model=model, input=PROMPT)
    events = list(oai.responses.create(model=model, input=PROMPT, stream=True))
    (done,) = [e.response for e in events if e.type == "response.completed"]
    # (From the output items: the SDK's ``output_text`` shortcut is newer than the floor of openai, 1.99.2.)
    text = "".join(
        c.text for item in done.output if item.type == "message" for c in item.content if c.type == "output_text"
    )
    assert len(text.split()) == REPLY_WORDS
    assert sum(e.type == "response.output_text.delta" for e in events) == REPLY_WORDS
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    list(oai.responses.create(model=model, input="Weather in Paris?", tools=tools, stream=True))

    m = eventually(service, requests_of(model, 3))
    assert reply.usage is not None and done.usage is not None
    tokens = {"gen_ai_request_model": model, "llm_usage_source": "reported"}
    assert m.value("llm_requests_total", gen_ai_request_model=model, gen_ai_request_stream="true") == 2
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **tokens) == (
        reply.usage.output_tokens + done.usage.output_tokens + 1
    )  # the tool call turn is one token
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **tokens) == PROMPT_TOKENS * 2 + 3
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 2
    assert m.value("gen_ai_server_time_to_first_token_seconds_bucket", gen_ai_request_model=model, le="0.1") == 0
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="get_weather") == 1
    assert m.value("llm_errors_total", gen_ai_request_model=model) == 0


def test_responses_tool_output_sent_with_previous_response_id_is_named(
    service: tuple[str, int], oai: openai.OpenAI
) -> None:
    """The Responses API's stateful way (OpenAI's advice): the next turn sends only the tool's output and
    previous_response_id, not the call. The call's name comes from the response that made it."""
    model = "gpt-4.1-stateful"
    tools: Any = [{"type": "function", "name": "get_tide", "parameters": {"type": "object", "properties": {}}}]
    first = oai.responses.create(model=model, input="Tide in Brest?", tools=tools)
    [call] = [item for item in first.output if item.type == "function_call"]
    output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": '{"error": "no tide data"}'}]
    oai.responses.create(model=model, previous_response_id=first.id, input=output, tools=tools)
    m = eventually(service, requests_of(model, 2))
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="get_tide") == 1
    assert m.value("llm_tool_results_total", gen_ai_tool_name="get_tide", llm_tool_status="error") == 1


def test_openai_tool_calls_stream_and_non_stream(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "gpt-4o-tools"
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    list(oai.chat.completions.create(model=model, messages=messages, tools=TOOLS, stream=True))
    first = oai.chat.completions.create(model=model, messages=messages, tools=TOOLS)
    call = (first.choices[0].message.tool_calls or [])[0]
    follow_up: Any = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"error": "weather service unavailable"}'},
    ]
    oai.chat.completions.create(model=model, messages=follow_up, tools=TOOLS)
    m = eventually(service, requests_of(model, 3))
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="get_weather") == 2
    # The stream's tool call is its first "token": TTFT is measured for it.
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    assert m.value("llm_tool_results_total", gen_ai_tool_name="get_weather", llm_tool_status="error") == 1


@pytest.mark.parametrize(
    ("fail", "status", "error_type"),
    [
        ("rate_limit", 429, "rate_limit"),
        ("context_length", 400, "context_length"),
        ("server_error", 500, "server_error"),
        ("exception", 500, "app_exception"),
    ],
)
def test_openai_errors_are_classified(
    service: tuple[str, int], oai: openai.OpenAI, fail: str, status: int, error_type: str
) -> None:
    model = f"gpt-4o-fail-{fail}"
    # A model in service (a refused request's model name takes no label place of its own: test_hostile_inputs).
    answered = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}]).usage
    assert answered is not None
    with pytest.raises(openai.APIStatusError) as raised:
        oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], extra_headers={"x-demo-fail": fail}
        )
    assert raised.value.status_code == status
    m = eventually(service, requests_of(model, 2))
    assert m.value("llm_errors_total", gen_ai_request_model=model, error_type=error_type) == 1
    assert m.value("llm_requests_total", gen_ai_request_model=model, error_type=error_type) == 1
    assert m.value("llm_tokens_total", gen_ai_request_model=model) == answered.total_tokens


def test_openai_error_event_mid_stream(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "gpt-4o-stream-error"
    with pytest.raises(openai.APIError):
        list(
            oai.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                extra_headers={"x-demo-fail": "stream_error"},
            )
        )
    m = eventually(service, requests_of(model, 1))
    assert m.value("llm_errors_total", gen_ai_request_model=model, error_type="server_error") == 1
    # Tokens came before the error, but the GenAI conventions time first and later tokens of successful responses
    # only: a failed stream is in the error counts, not in the latency histograms.
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") > 0
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 0
    assert m.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model) == 0


def test_embeddings_count_input_tokens(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "text-embedding-3-small-e2e"
    oai.embeddings.create(model=model, input=["one two three", "four five"])
    m = eventually(service, requests_of(model, 1))
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input") == 5
    assert m.series("llm_requests_total", gen_ai_request_model=model)[0]["gen_ai_operation_name"] == "embeddings"


def test_anthropic_stream_and_non_stream(service: tuple[str, int], claude: anthropic.Anthropic) -> None:
    model = "claude-sonnet-4-20250514"
    with claude.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": PROMPT}]) as s:
        text = "".join(s.text_stream)
    assert len(text.split()) == REPLY_WORDS
    reply = claude.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": PROMPT}])
    assert reply.usage.output_tokens == REPLY_WORDS
    m = eventually(service, requests_of(model, 2))
    base = {"gen_ai_request_model": model, "gen_ai_provider_name": "anthropic", "llm_usage_source": "reported"}
    assert m.value("llm_tokens_total", gen_ai_token_type="input", **base) == 2 * PROMPT_TOKENS
    assert m.value("llm_tokens_total", gen_ai_token_type="output", **base) == 2 * REPLY_WORDS
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
    assert m.value("gen_ai_server_time_to_first_token_seconds_sum", gen_ai_request_model=model) >= FIRST_TOKEN_DELAY
    # A snapshot of claude-sonnet-4: $3 in, $15 out per million.
    cost = m.value("llm_cost_usd_total", gen_ai_request_model=model)
    assert cost == pytest.approx(2 * (PROMPT_TOKENS * 3.0 + REPLY_WORDS * 15.0) / 1e6)


def test_anthropic_tool_use_and_rate_limit(service: tuple[str, int], claude: anthropic.Anthropic) -> None:
    model = "claude-3-5-haiku-e2e"
    tools: Any = [{"name": "lookup_order", "input_schema": {"type": "object", "properties": {}}}]
    first = claude.messages.create(
        model=model, max_tokens=50, tools=tools, messages=[{"role": "user", "content": "Where is my order?"}]
    )
    assert first.stop_reason == "tool_use"
    tool_use = next(block for block in first.content if block.type == "tool_use")
    claude.messages.create(
        model=model,
        max_tokens=50,
        tools=tools,
        messages=[
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": [tool_use.model_dump()]},  # type: ignore[list-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "shipped"}],
            },
        ],
    )
    with pytest.raises(anthropic.RateLimitError):
        claude.messages.create(
            model=model,
            max_tokens=50,
            messages=[{"role": "user", "content": PROMPT}],
            extra_headers={"x-demo-fail": "rate_limit"},
        )
    m = eventually(service, requests_of(model, 3))
    assert m.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="lookup_order") == 1
    assert m.value("llm_tool_results_total", gen_ai_tool_name="lookup_order", llm_tool_status="success") == 1
    assert m.value("llm_errors_total", gen_ai_request_model=model, error_type="rate_limit") == 1


def test_answers_cut_at_their_token_limit_are_counted_by_finish_reason(
    service: tuple[str, int], oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    """Each API's way of saying the output hit its cap (the demo cuts its 12-word reply at the request's cap), as
    the SDKs hand it to the caller, is the ``llm_finish_reason`` counted; whole answers count their own reason."""
    cap = 5
    messages: Any = [{"role": "user", "content": PROMPT}]
    model = "gpt-4o-cut"
    answer = oai.chat.completions.create(model=model, messages=messages, max_completion_tokens=cap)
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=cap, stream=True))
    whole = oai.chat.completions.create(model=model, messages=messages)
    seen = [answer.choices[0].finish_reason, *(c.choices[0].finish_reason for c in chunks if c.choices)]
    assert [reason for reason in seen if reason] == ["length", "length"]
    assert whole.choices[0].finish_reason == "stop"
    responses_model = "gpt-4.1-cut"
    cut = oai.responses.create(model=responses_model, input=PROMPT, max_output_tokens=cap)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    claude_model = "claude-cut"
    with claude.messages.stream(model=claude_model, max_tokens=cap, messages=messages) as stream:
        streamed = stream.get_final_message()
    created = claude.messages.create(model=claude_model, max_tokens=100, messages=messages)
    assert (streamed.stop_reason, created.stop_reason) == ("max_tokens", "end_turn")

    m = eventually(service, lambda m: m.value("llm_requests_total", gen_ai_request_model=claude_model) >= 2)
    assert m.value("llm_finish_reasons_total", gen_ai_request_model=model, llm_finish_reason="length") == 2
    assert m.value("llm_finish_reasons_total", gen_ai_request_model=model, llm_finish_reason="stop") == 1
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 2 * cap + 12
    reasons = {"gen_ai_request_model": responses_model, "llm_finish_reason": "max_output_tokens"}
    assert m.value("llm_finish_reasons_total", **reasons) == 1
    assert m.value("llm_finish_reasons_total", gen_ai_request_model=claude_model, llm_finish_reason="max_tokens") == 1
    assert m.value("llm_finish_reasons_total", gen_ai_request_model=claude_model, llm_finish_reason="end_turn") == 1
    assert m.value("llm_finish_reasons_total", gen_ai_request_model=claude_model) == 2


def test_attribution_header_becomes_a_bounded_label() -> None:
    metrics_port = free_port()
    app = create_app(metrics_port=metrics_port, attribution_headers={"x-tenant-id": "tenant"}, max_label_values=3)
    with serve(app) as base:
        oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        for tenant in ("acme", "globex", "initech", "umbrella", "hooli", "acme"):
            oai.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": PROMPT}], extra_headers={"x-tenant-id": tenant}
            )
        m = eventually(("", metrics_port), lambda m: m.value("llm_requests_total") >= 6)
    app.telemetry.shutdown()
    # max_label_values=3: the first three tenants keep their names, later ones fold into "other".
    assert m.label_values("llm_requests_total", "llm_metadata_tenant") == {"acme", "globex", "initech", "other"}
    assert m.value("llm_requests_total", llm_metadata_tenant="acme") == 2
    assert m.value("llm_requests_total", llm_metadata_tenant="other") == 2
    assert m.value("llm_tokens_total", llm_metadata_tenant="other", gen_ai_token_type="output") == 2 * REPLY_WORDS


def test_an_attribution_header_in_utf_8_keeps_its_characters() -> None:
    """HTTP carries header values as bytes; clients send non-ASCII ones in UTF-8 (``café``, ``東京``), which must read
    back as sent, not as Latin-1 mojibake. A value that is no UTF-8 is still read, as Latin-1."""
    metrics_port = free_port()
    app = create_app(metrics_port=metrics_port, attribution_headers={"x-tenant-id": "tenant"})
    with serve(app) as base:
        for tenant in ("café".encode(), "東京".encode(), b"caf\xe9"):
            response = httpx.post(
                base + "/v1/chat/completions",
                json={"model": "gpt-4o-utf8", "messages": [{"role": "user", "content": PROMPT}]},
                headers=[(b"x-tenant-id", tenant)],
            )
            assert response.status_code == 200
        m = eventually(("", metrics_port), lambda m: m.value("llm_requests_total") >= 3)
    app.telemetry.shutdown()
    assert m.label_values("llm_requests_total", "llm_metadata_tenant") == {"café", "東京"}
    assert m.value("llm_requests_total", llm_metadata_tenant="café") == 2  # UTF-8 and Latin-1 bytes alike


def test_requests_without_the_header_are_labelled_none(service: tuple[str, int], oai: openai.OpenAI) -> None:
    model = "gpt-4o-no-tenant"
    oai.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}])
    m = eventually(service, requests_of(model, 1))
    assert m.value("llm_requests_total", gen_ai_request_model=model, llm_metadata_tenant="none") == 1


def test_client_disconnect_mid_stream_is_recorded(service: tuple[str, int]) -> None:
    model = "gpt-4o-disconnect"
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", service[0] + "/v1/chat/completions", json=body, headers={"x-demo-words": "2000"}) as r,
    ):
        for _ in r.iter_raw():
            break  # read the first chunk, then hang up
    m = eventually(service, lambda m: m.value("llm_errors_total", gen_ai_request_model=model) >= 1)
    assert m.value("llm_errors_total", gen_ai_request_model=model, error_type="client_disconnect") == 1
    assert m.value("llm_requests_active") == 0


def test_a_stream_left_before_its_first_token_records_the_wait(service: tuple[str, int], oai: openai.OpenAI) -> None:
    """A client that gives up on a stream before its first token (a stalled upstream, an impatient user) is a
    client_disconnect with no time to first token: its wait goes to llm_server_time_to_abandonment_seconds, so
    the TTFT objective can count it (see docs/alerts.md). A client leaving after the first token waited for none."""
    model = "gpt-4o-abandoned"
    # A first token a second away, a client giving up after 0.3 s: the wait recorded is the client's, well clear of
    # the second (a loaded machine notices the leave late by tens of milliseconds).
    stalled_port, first_token, patience = free_port(), 1.0, 0.3
    stalled = create_app(first_token_delay=first_token, metrics_port=stalled_port, metrics_host="127.0.0.1")
    try:
        with serve(stalled) as base:
            impatient = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0, timeout=patience)
            with pytest.raises(openai.APITimeoutError):
                for _chunk in impatient.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPT}], stream=True
                ):
                    pass
            stalled_service = (base, stalled_port)
            m = eventually(stalled_service, lambda m: m.value("llm_errors_total", gen_ai_request_model=model) >= 1)
    finally:
        stalled.telemetry.shutdown()
    assert m.value("llm_errors_total", gen_ai_request_model=model, error_type="client_disconnect") == 1
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 0
    assert m.value("llm_server_time_to_abandonment_seconds_count", gen_ai_request_model=model) == 1
    waited = m.value("llm_server_time_to_abandonment_seconds_sum", gen_ai_request_model=model)
    assert patience <= waited < first_token

    after = "gpt-4o-left-after-first-token"
    with oai.chat.completions.create(
        model=after,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        extra_headers={"x-demo-words": "2000"},
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first token came: leave
    m = eventually(service, lambda m: m.value("llm_errors_total", gen_ai_request_model=after) >= 1)
    assert m.value("llm_errors_total", gen_ai_request_model=after, error_type="client_disconnect") == 1
    assert m.value("llm_server_time_to_abandonment_seconds_count", gen_ai_request_model=after) == 0


def test_metrics_served_on_own_port_only_by_default(service: tuple[str, int], oai: openai.OpenAI) -> None:
    # A request of its own first: series exist only once something was recorded, whatever ran before.
    oai.chat.completions.create(model="gpt-4o-own-port", messages=[{"role": "user", "content": PROMPT}])
    eventually(service, requests_of("gpt-4o-own-port", 1))
    assert httpx.get(service[0] + "/metrics").status_code == 404
    text = httpx.get(f"http://127.0.0.1:{service[1]}/metrics").text
    assert "# TYPE llm_requests_total counter" in text
    assert "# TYPE gen_ai_server_request_duration_seconds histogram" in text


def test_metrics_on_app_path_when_asked() -> None:
    app = create_app(metrics_port=0, metrics_app_path="/metrics")
    with serve(app) as base:
        oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        oai.chat.completions.create(model="gpt-4o-app-path", messages=[{"role": "user", "content": PROMPT}])
        deadline = time.monotonic() + RECORDED_WITHIN
        while "gpt-4o-app-path" not in httpx.get(base + FRESH).text and time.monotonic() < deadline:
            time.sleep(0.02)
        metrics = Metrics(httpx.get(base + FRESH).text)
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o-app-path") == 1
    app.telemetry.shutdown()


def reasoning_app(metrics_port: int) -> Any:
    """A reasoning model's stream as OpenAI sends it (the reasoning hidden: a pause, then the answer) and as open
    models' servers do (the reasoning streamed as ``reasoning_content`` deltas first), each ten deltas 30 ms apart
    and a usage that counts the reasoning tokens."""

    async def chat(request: Request) -> StreamingResponse:
        model = (await request.json())["model"]
        hidden = model == "o-hidden"

        async def events() -> Any:
            head = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1767225600, "model": model}

            def chunk(delta: dict[str, Any], **extra: Any) -> bytes:
                event = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra}
                return b"data: " + json.dumps(event).encode() + b"\n\n"

            yield chunk({"role": "assistant", "content": ""})
            if hidden:
                await asyncio.sleep(0.3)  # 1,000 reasoning tokens nobody sees
            for i in range(10):
                key = "content" if hidden or i >= 5 else "reasoning_content"
                yield chunk({key: f"w{i} "})
                await asyncio.sleep(0.03)
            reasoning = 1000 if hidden else 5
            usage = {"prompt_tokens": 3, "completion_tokens": 10 + (1000 if hidden else 0), "total_tokens": 0,
                     "completion_tokens_details": {"reasoning_tokens": reasoning}}  # fmt: skip
            yield b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return chat_app(chat, metrics_port)


def chat_app(chat: Any, metrics_port: int, **options: Any) -> LLMTelemetryMiddleware:
    """A Starlette app serving ``chat`` at /v1/chat/completions, wrapped in the middleware (metrics on
    ``metrics_port``; ``options``: more of the middleware's)."""
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    return LLMTelemetryMiddleware(app, metrics_port=metrics_port, metrics_host="127.0.0.1", **options)


def test_time_per_output_token_of_reasoning_models_is_the_gap_between_the_tokens_streamed() -> None:
    """Reasoning tokens the stream does not show are generated before its first token: the time after it is spread
    over the tokens that follow it, not over a thousand that came before (which read 100 times too fast)."""
    metrics_port = free_port()
    app = reasoning_app(metrics_port)
    with serve(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        for model in ("o-hidden", "open-reasoner"):
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "think"}], stream=True
            )
            assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta) == 11
        metrics = eventually(("", metrics_port), lambda m: m.value("llm_requests_total") >= 2)
    app.telemetry.shutdown()
    for model in ("o-hidden", "open-reasoner"):
        tpot = metrics.value("gen_ai_server_time_per_output_token_seconds_sum", gen_ai_request_model=model)
        # Nine gaps of 30 ms over nine tokens (plus scheduling): about 0.03 s each.
        assert 0.025 <= tpot < 0.1, (model, tpot)


def test_reasoning_streamed_before_the_answer_is_among_the_tokens_timed() -> None:
    """Three output tokens, two of them reasoning: streamed as ``reasoning_content`` deltas they are the first token
    and the ones after it (three tokens, so a time per output token); hidden, the answer's one token is all the stream
    shows after its first (no time per output token: one token gives no gap), and so is a tool call's when it is the
    first output after hidden reasoning. Counts, not times: whether the stream
    has a time per output token at all is what the reasoning shown decides here."""

    async def chat(request: Request) -> StreamingResponse:
        model = (await request.json())["model"]
        head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1767225600, "model": model}

        def chunk(delta: dict[str, Any]) -> bytes:
            event = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        async def events() -> Any:
            yield chunk({"role": "assistant", "content": ""})
            if model == "shown-reasoner":
                yield chunk({"reasoning_content": "Let me"})
                yield chunk({"reasoning_content": " see."})
            if model == "hidden-reasoner-tool":
                call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                yield chunk({"tool_calls": [call]})
            else:
                yield chunk({"content": "Yes."})
            usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                     "completion_tokens_details": {"reasoning_tokens": 2}}  # fmt: skip
            yield b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    metrics_port = free_port()
    app = chat_app(chat, metrics_port)
    with serve(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        for model in ("shown-reasoner", "hidden-reasoner", "hidden-reasoner-tool"):
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            assert [chunk.usage.completion_tokens for chunk in stream if chunk.usage] == [3]
        metrics = eventually(("", metrics_port), lambda m: m.value("llm_requests_total") >= 3)
    app.telemetry.shutdown()
    for model, timed in (("shown-reasoner", 1), ("hidden-reasoner", 0), ("hidden-reasoner-tool", 0)):
        assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
        count = metrics.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model)
        assert count == timed, model


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_of_no_tokens_keeps_the_input_its_usage_reports(stream: bool) -> None:
    """A model that answers nothing (a stop sequence at once, say) reports its input and no output: the usage is the
    provider's, not the placeholder of nothing in and nothing out that is read as none (LiteLLM's), so its input
    counts as reported rather than estimated from the request."""

    usage = {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}

    async def chat(request: Request) -> Response:
        model = (await request.json())["model"]
        head = {"id": "chatcmpl-e", "created": 1767225600, "model": model}
        if not stream:
            message = {"role": "assistant", "content": ""}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
            return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

        def chunk(**body: Any) -> bytes:
            return b"data: " + json.dumps({**head, "object": "chat.completion.chunk", **body}).encode() + b"\n\n"

        async def events() -> Any:
            yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
            yield chunk(choices=[], usage=usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    metrics_port = free_port()
    app = chat_app(chat, metrics_port)
    model = "silent-model"
    with serve(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        messages: Any = [{"role": "user", "content": "Say nothing at all, please."}]
        if stream:
            options: Any = {"include_usage": True}
            chunks = client.chat.completions.create(model=model, messages=messages, stream=True, stream_options=options)
            assert [chunk.usage.prompt_tokens for chunk in chunks if chunk.usage] == [12]
        else:
            answer = client.chat.completions.create(model=model, messages=messages)
            assert answer.usage is not None and answer.usage.prompt_tokens == 12
        metrics = eventually(("", metrics_port), lambda m: m.value("llm_requests_total") >= 1)
    app.telemetry.shutdown()
    tokens = {"gen_ai_request_model": model, "gen_ai_token_type": "input"}
    assert metrics.value("llm_tokens_total", llm_usage_source="reported", **tokens) == 12
    assert metrics.series("llm_tokens_total", llm_usage_source="estimated", gen_ai_request_model=model) == []


def test_a_model_named_only_by_the_path_is_the_request_model() -> None:
    """Azure OpenAI's REST API names the deployment in the path and takes no ``model`` in the body (the legacy
    ``/engines/{model}/`` paths too): the request model is that name, not ``unknown``; a body's model still wins."""

    async def azure(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await request_body(receive)
        choice = {"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        answer = {"object": "chat.completion", "model": "gpt-4o", "choices": [choice], "usage": usage}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    metrics_port = free_port()
    app = LLMTelemetryMiddleware(azure, metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False)
    messages = [{"role": "user", "content": PROMPT}]
    with serve(app) as base:
        with httpx.Client(base_url=base, headers={"api-key": "k"}) as client:
            path = "/openai/deployments/chat-prod/chat/completions"
            assert client.post(path, params={"api-version": "2024-10-21"}, json={"messages": messages}).is_success
            assert client.post("/v1/engines/legacy-model/completions", json={"prompt": PROMPT}).is_success
            assert client.post(path, json={"model": "named-in-body", "messages": messages}).is_success
        azure_sdk = openai.AzureOpenAI(azure_endpoint=base, api_key="k", api_version="2024-10-21", max_retries=0)
        azure_sdk.chat.completions.create(model="sdk-deployment", messages=messages)  # type: ignore[arg-type]
        metrics = eventually((base, metrics_port), lambda m: m.value("llm_requests_total") >= 4)
    app.telemetry.shutdown()
    for model in ("chat-prod", "legacy-model", "named-in-body", "sdk-deployment"):
        assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 1, model
    assert metrics.value("llm_requests_total", gen_ai_request_model="unknown") == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_request_too_large_to_read_is_counted_under_the_model_that_answered(stream: bool) -> None:
    """A body over the read limit (a multimodal request with large images, say) passes unread, and its model with
    it: the model that answered stands for it, as in the log line, so such traffic stays on the per-model panels
    and alerts instead of under ``unknown``."""
    metrics_port = free_port()
    app = create_app(metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False, max_request_bytes=4096)
    with serve(app) as base:
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        big = [{"role": "user", "content": "x" * 20_000}]
        reply = sdk.chat.completions.create(model="gpt-4o", messages=big, stream=stream)  # type: ignore[call-overload]
        if stream:
            list(reply)
        metrics = eventually((base, metrics_port), lambda m: m.value("llm_requests_total") >= 1)
    app.telemetry.shutdown()
    assert metrics.value("llm_requests_total", gen_ai_request_model="gpt-4o") == 1
    assert metrics.value("llm_requests_total", gen_ai_request_model="unknown") == 0


async def out_of_credit(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Anthropic's answer to an account whose credit balance is spent: a 402 with a ``billing_error``."""
    while (await receive()).get("more_body"):
        pass
    message = "Your credit balance is too low to access the Anthropic API."
    body = {"type": "error", "error": {"type": "billing_error", "message": message}}
    await send({"type": "http.response.start", "status": 402, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def test_an_account_out_of_credit_is_a_rate_limit_as_openais_spent_quota_is() -> None:
    """A provider refusing work for want of credit is the service's outage, not the caller's bad request: Anthropic's
    402 ``billing_error`` is ``rate_limit``, the type OpenAI's ``insufficient_quota`` (a 429) has, which spends the
    availability budget."""

    metrics_port = free_port()
    app = LLMTelemetryMiddleware(out_of_credit, metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False)
    with serve(app) as base:
        sdk = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as raised:
            sdk.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        metrics = eventually((base, metrics_port), lambda m: m.value("llm_requests_total") >= 1)
    app.telemetry.shutdown()
    assert raised.value.status_code == 402
    # (Under the model ``other``: a refused request admits no new model name to the label.)
    assert metrics.value("llm_errors_total", gen_ai_provider_name="anthropic", error_type="rate_limit") == 1
    assert metrics.value("llm_errors_total") == 1


def test_anthropic_stream_cut_before_its_only_input_count_has_its_input_estimated() -> None:
    """A gateway translating another provider's stream into Anthropic's (the LiteLLM proxy) reports 0 input in
    ``message_start`` and the real count only in ``message_delta``. Cut before that (an error event), the stream has
    its input estimated from the request, as a stream without usage has: not 0 input labelled ``reported``."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    async def gateway(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await request_body(receive)
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "translated", "content": [],
                   "stop_reason": None, "usage": {"input_tokens": 0, "output_tokens": 0}}  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in (
            event("message_start", {"message": message}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Sunny"}}),
            event("error", {"error": {"type": "overloaded_error", "message": "upstream went away"}}),
        ):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    metrics_port = free_port()
    app = LLMTelemetryMiddleware(gateway, metrics_port=metrics_port, metrics_host="127.0.0.1", request_logs=False)
    system, prompt = "Answer in one word.", "What is the weather in Paris today?"
    with serve(app) as base:
        client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError):
            with client.messages.stream(
                model="claude-via-gateway", max_tokens=64, system=system, messages=[{"role": "user", "content": prompt}]
            ) as stream:
                for _ in stream:
                    pass
        metrics = eventually((base, metrics_port), lambda m: m.value("llm_requests_total") >= 1)
    app.telemetry.shutdown()
    model = {"gen_ai_request_model": "claude-via-gateway", "gen_ai_token_type": "input"}
    expected = -(-(len(system) + len(prompt)) // 4)
    assert metrics.value("llm_tokens_total", llm_usage_source="estimated", **model) == expected
    assert metrics.value("llm_tokens_total", llm_usage_source="reported", **model) == 0
    assert metrics.value("llm_errors_total", error_type="server_error") == 1


def test_a_stream_left_while_the_app_waits_to_answer_records_the_wait() -> None:
    """A proxy waits for its upstream's headers before it starts its own answer: its client gives up first. The
    answer then goes out after the client left (uvicorn's send takes a gone client's bytes without a word), so no
    token reached the client: the stream has no time to first token, and its wait, until the app answered (the
    earliest its first token could have come), is the time to abandonment."""

    stall = 0.8

    async def chat(request: Request) -> StreamingResponse:
        await request.body()
        await asyncio.sleep(stall)  # the upstream's headers are late

        async def events() -> Any:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": []}
            for delta, finish in (({"role": "assistant"}, None), ({"content": "hi"}, None), ({}, "stop")):
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                yield f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    metrics_port = free_port()
    app = chat_app(chat, metrics_port, request_logs=False)
    with serve(app) as base:
        impatient = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0, timeout=stall / 4)
        with pytest.raises(openai.APITimeoutError):
            for _chunk in impatient.chat.completions.create(
                model="gpt-4o-proxied", messages=[{"role": "user", "content": PROMPT}], stream=True
            ):
                pass
        m = eventually(("", metrics_port), lambda m: m.value("llm_requests_total") >= 1)
    app.telemetry.shutdown()
    model = {"gen_ai_request_model": "gpt-4o-proxied"}
    assert m.value("llm_errors_total", error_type="client_disconnect", **model) == 1
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", **model) == 0
    assert m.value("llm_server_time_to_abandonment_seconds_count", **model) == 1
    assert m.value("llm_server_time_to_abandonment_seconds_sum", **model) >= stall * 0.9
