"""Error events and tool calls in the shapes real servers send them, through a real uvicorn server and the official
openai SDK: what each SDK raises (or returns) is what the metrics say.

- OpenAI's Responses API documents an ``error`` event with the error's members on the event, and has also sent them
  nested in an ``error`` object, as its error bodies are: a rate limit either way.
- Hugging Face TGI sends an error inside a chat stream as ``{"error": "<message>", "error_type": "<kind>"}``.
- A Responses stream's closing event (``response.failed``, ``response.incomplete``, ``response.completed``) says how it
  ended, when the response in it says no status too (a proxy's may not), and its error is read as an error event's.
- A Responses stream cut off while the model was writing a tool call's arguments counts those pieces, estimated.
- With ``n`` choices, generated side by side, the time per output token is per choice.
- A stream an app labels ``text/plain`` (the SDKs read it as the stream the request asked for) is read as one, and so
  is one that opens with a blank line in a chunk of its own, or with a byte order mark.
- Anthropic: a context overflow as its API words it is ``context_length``; a stream that opens with redacted
  reasoning has its first token there; a call of a tool of an MCP server the API connects to is a tool call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import anthropic
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import Metrics, free_port, serve, settled, whole_after

#: Messages of Hugging Face TGI's errors, by kind.
TGI_MESSAGES = {
    "generation": "Request failed during generation: Server error: CUDA out of memory",
    "validation": "Input validation error: `temperature` must be strictly positive",
    # (-long: the validation error TGI gives a prompt too long, in its words)
    "validation-long": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 "
    "`inputs` tokens and 200 `max_new_tokens`",
    "overloaded": "Model is overloaded",
}
#: Seconds between two tokens of one choice, in the ``n`` stream.
GAP = 0.02
#: Tokens of each choice in the ``n`` stream.
PER_CHOICE = 6


def _sse(obj: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _chunk(model: str, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})  # fmt: skip


def _responses_head(model: str) -> list[bytes]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "output": [],
                "status": "in_progress"}  # fmt: skip
    return [_sse({"type": "response.created", "sequence_number": 0, "response": response}, "response.created")]


async def _led(events: AsyncIterator[bytes], lead: str) -> AsyncIterator[bytes]:
    """``events`` after a blank line sent alone (``lead="blank"``), or with a UTF-8 byte order mark before the first
    (``"bom"``), as some servers open a stream."""
    if lead == "blank":
        yield b"\r\n"
    async for event in events:
        yield b"\xef\xbb\xbf" + event if lead == "bom" else event
        lead = ""


async def _events(model: str, how: str, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    if how.startswith("responses-error-"):
        for event in _responses_head(model):
            yield event
        yield _sse({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0,
                    "content_index": 0, "delta": "Hi"}, "response.output_text.delta")  # fmt: skip
        code = how.removeprefix("responses-error-").removesuffix("-flat")
        error: dict[str, Any] = {"code": code, "message": "Rate limit reached for gpt-4.1 on tokens per min"}
        if code == "rate_limit_exceeded":
            error["type"] = "tokens"  # (as OpenAI sends it; the other case has only its code to say what it is)
        nested = {"type": "error", "sequence_number": 2, "error": error}
        flat = {"type": "error", "sequence_number": 2, "code": code, "message": error["message"], "param": None}
        yield _sse(flat if how.endswith("-flat") else nested, "error")
    elif how.startswith("responses-end-"):
        # The closing event as a proxy may send it: its response without the status OpenAI always puts there.
        for event in _responses_head(model):
            yield event
        yield _sse({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0,
                    "content_index": 0, "delta": "Hi"}, "response.output_text.delta")  # fmt: skip
        kind, _, what = how.removeprefix("responses-end-").partition("-")
        response: dict[str, Any] = {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "output": []}
        if what == "rate":  # (OpenAI's words and code for it)
            response["error"] = {"code": "rate_limit_exceeded", "message": "Rate limit reached for gpt-4.1"}
        elif what == "unknown":  # with its status, and an error code nothing here knows
            response.update(status="failed", error={"code": "upstream_mishap", "message": "Something went wrong"})
        elif what.startswith("code:"):  # with its status, and one of the codes the SDK's ResponseError lists
            response.update(status="failed", error={"code": what.removeprefix("code:"), "message": "Request failed"})
        elif kind == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        yield _sse({"type": f"response.{kind}", "sequence_number": 2, "response": response}, f"response.{kind}")
    elif how == "responses-tool-cut":
        for event in _responses_head(model):
            yield event
        item = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "",
                "status": "in_progress"}  # fmt: skip
        yield _sse({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item},
                   "response.output_item.added")  # fmt: skip
        for i, piece in enumerate(['{"', "city", '":"', "Paris", '"}']):
            yield _sse({"type": "response.function_call_arguments.delta", "sequence_number": i + 2, "item_id": "fc_1",
                        "output_index": 0, "delta": piece}, "response.function_call_arguments.delta")  # fmt: skip
        # ... and the upstream's connection dropped: the app ends its response with what came.
    elif how.startswith("tgi-"):
        # -first: the error comes before any token (after the chunk that opens the stream); -only: it is all there is.
        if "-only" not in how:
            yield _chunk(model, 0, {"role": "assistant", "content": ""})
        if "-first" not in how and "-only" not in how:
            yield _chunk(model, 0, {"content": "Hello"})
        kind = how.split("-")[1]
        message = TGI_MESSAGES[kind + "-long" if "-long" in how else kind]
        error = _sse({"error": message, "error_type": kind})
        yield error[:-1] if how.endswith("-open") else error  # -open: without the blank line that dispatches it
    elif how == "n":
        # x-choices: how many choices the server sends (it may ignore n); x-repeat-finish: each finish chunk twice,
        # as some gateways send it; x-empty-choices: how many of the last choices get no content at all (opened and
        # finished only).
        choices = range(int(headers.get("x-choices", "2")))
        writing = choices[: len(choices) - int(headers.get("x-empty-choices", "0"))]
        for index in choices:
            yield _chunk(model, index, {"role": "assistant", "content": ""})
        for token in range(PER_CHOICE):
            if token:
                await asyncio.sleep(GAP)
            for index in writing:
                yield _chunk(model, index, {"content": f" t{token}"})
        for index in choices:
            for _ in range(2 if headers.get("x-repeat-finish") else 1):
                yield _chunk(model, index, {}, "stop")
            if headers.get("x-cut-after-first-finish"):
                return  # the upstream dropped before the other choices finished
        tokens = len(writing) * PER_CHOICE
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        yield _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [], "usage": usage})  # fmt: skip
        yield _sse("[DONE]")


def _anthropic(model: str, how: str) -> list[bytes]:
    def block(index: int, content_block: dict[str, Any]) -> bytes:
        return _sse({"type": "content_block_start", "index": index, "content_block": content_block},
                    "content_block_start")  # fmt: skip

    events = [_sse({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": None, "usage": {"input_tokens": 9, "output_tokens": 1}}},
              "message_start")]  # fmt: skip
    if how == "redacted":  # reasoning the API hides: one block with its encrypted data, no deltas, and no text after
        events.append(block(0, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}))
        stop = "end_turn"
    else:  # "mcp": the API calls a tool of an MCP server it connects to
        events.append(block(0, {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "echo", "server_name": "tools",
                                "input": {}}))  # fmt: skip
        events.append(_sse({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "input_json_delta", "partial_json": '{"text":"hi"}'}},
                           "content_block_delta"))  # fmt: skip
        stop = "end_turn"
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    events.append(_sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                        "usage": {"output_tokens": 7}}, "message_delta"))  # fmt: skip
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events


async def messages(request: Request) -> Response:
    body = await request.json()
    how = request.headers["x-script"]
    if how == "overflow":
        message = "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease input length"
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return JSONResponse(error, status_code=400)
    if how == "mcp-json":
        content = [{"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "echo", "server_name": "tools", "input": {}}]
        return JSONResponse({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                             "content": content, "stop_reason": "end_turn", "stop_sequence": None,
                             "usage": {"input_tokens": 9, "output_tokens": 7}})  # fmt: skip
    events = _anthropic(body["model"], how)

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream")


async def scripted(request: Request) -> Response:
    body = await request.json()
    how = request.headers["x-script"]
    if how == "invalid-prompt":  # a reasoning model's refusal of a prompt, as OpenAI answers it
        error = {"message": "Invalid prompt: your prompt was flagged as potentially violating our usage policy.",
                 "type": "invalid_request_error", "param": None, "code": "invalid_prompt"}  # fmt: skip
        return JSONResponse({"error": error}, status_code=400)
    if how == "tgi-424":  # the same failure outside a stream
        return JSONResponse({"error": TGI_MESSAGES["generation"], "error_type": "generation"}, status_code=424)
    if how == "tgi-validation-long-422":
        return JSONResponse({"error": TGI_MESSAGES["validation-long"], "error_type": "validation"}, status_code=422)
    media_type = request.headers.get("x-media-type", "text/event-stream")
    events = _events(body["model"], how, request.headers)
    return StreamingResponse(_led(events, request.headers.get("x-lead", "")), media_type=media_type)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    metrics_port = free_port()
    routes = [Route(path, scripted, methods=["POST"]) for path in ("/v1/chat/completions", "/v1/responses")]
    routes.append(Route("/v1/messages", messages, methods=["POST"]))
    app = LLMTelemetryMiddleware(Starlette(routes=routes), metrics_port=metrics_port, metrics_host="127.0.0.1")
    with serve(app) as base:
        yield base, metrics_port
    app.telemetry.shutdown()


@pytest.fixture(scope="module")
def service(server: tuple[str, int]) -> tuple[openai.OpenAI, int]:
    base, port = server
    return openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0), port


@pytest.fixture(scope="module")
def claude(server: tuple[str, int]) -> tuple[anthropic.Anthropic, int]:
    base, port = server
    return anthropic.Anthropic(base_url=base, api_key="test", max_retries=0), port


def _once(metrics: Metrics, model: str, error_type: str, provider: str = "openai") -> None:
    labels = {"gen_ai_request_model": model, "error_type": error_type, "gen_ai_provider_name": provider}
    assert metrics.value("llm_errors_total", **labels) == 1, metrics.text


def _counted(port: int, model: str) -> Metrics:
    def recorded(metrics: Metrics) -> None:
        assert metrics.value("llm_requests_total", gen_ai_request_model=model) == 1

    settled(port, recorded)
    return whole_after(port)  # (the scrape that showed the request may lack the call's tokens)


@pytest.mark.parametrize("how", ["responses-error-rate_limit_exceeded", "responses-error-rate_limit_exceeded-flat",
                                 "responses-error-too_many_requests"])  # fmt: skip
def test_a_rate_limit_inside_a_responses_stream_is_a_rate_limit(service: tuple[openai.OpenAI, int], how: str) -> None:
    client, port = service
    model = how
    events = client.responses.create(model=model, input="Hi", stream=True, extra_headers={"x-script": how})
    if how.endswith("-flat"):  # the SDK hands the documented event on as one of the stream's
        assert [e.code for e in events if e.type == "error"] == ["rate_limit_exceeded"]
    else:  # and raises for the nested one
        with pytest.raises(openai.APIError, match="Rate limit reached"):
            list(events)
    metrics = _counted(port, model)
    assert metrics.value("llm_errors_total", gen_ai_request_model=model, error_type="rate_limit") == 1, metrics.text


@pytest.mark.parametrize(
    ("how", "error_type"),
    [
        ("tgi-generation", "server_error"),
        ("tgi-generation-open", "server_error"),
        ("tgi-validation-first-open", "invalid_request"),  # (what validation errors are: before any token)
        ("tgi-overloaded-only-open", "rate_limit"),
        ("tgi-validation-long-first", "context_length"),
        ("tgi-validation-long-422", "context_length"),  # the same error outside a stream: a 422 with that body
        ("tgi-validation", "invalid_request"),  # (TGI answers 422 to it outside a stream)
        ("tgi-overloaded", "rate_limit"),  # (a 429 outside a stream)
        ("tgi-424", "server_error"),  # the generation's failure outside a stream
    ],
)
def test_a_tgi_error_is_what_tgi_says_it_is(service: tuple[openai.OpenAI, int], how: str, error_type: str) -> None:
    """``-open``: the server leaves out the blank line after its last event. No SSE reader dispatches that event, so
    the SDK raises nothing and the stream just stops; the server still said it failed."""
    client, port = service
    refused = how in ("tgi-424", "tgi-validation-long-422")
    if refused:
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model=how, messages=[{"role": "user", "content": "Hi"}], extra_headers={"x-script": how}
            )
    else:
        stream = client.chat.completions.create(
            model=how, messages=[{"role": "user", "content": "Hi"}], stream=True, extra_headers={"x-script": how}
        )
        if how.endswith("-open"):
            said = "" if "-first" in how or "-only" in how else "Hello"
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == said
        else:
            with pytest.raises(openai.APIError):
                list(stream)
    # (A refused request's model is "other", as metrics.md says: each error type is found once there.)
    settled(port, lambda m: _once(m, "other" if refused else how, error_type))


@pytest.mark.parametrize(
    ("how", "error_type", "reason"),
    [
        ("responses-end-failed-rate", "rate_limit", None),  # the error in the response says what failed
        ("responses-end-failed", "server_error", None),  # nor any error: the event's name says it failed
        ("responses-end-failed-unknown", "server_error", None),  # an unknown code: as in an ``error`` event
        # What the caller sent or asked for, refused: not the service's failure (the availability alerts leave these
        # out), as the same refusals answered with a 400 are.
        ("responses-end-failed-code:invalid_prompt", "content_filter", None),
        ("responses-end-failed-code:bio_policy", "content_filter", None),
        ("responses-end-failed-code:misalignment_policy_violation", "content_filter", None),
        ("responses-end-failed-code:image_content_policy_violation", "content_filter", None),
        ("responses-end-failed-code:invalid_image_url", "invalid_request", None),
        ("responses-end-failed-code:failed_to_download_image", "invalid_request", None),
        ("responses-end-failed-code:image_too_large", "invalid_request", None),
        ("responses-end-failed-code:data_residency_mismatch", "invalid_request", None),
        ("responses-end-failed-code:vector_store_timeout", "timeout", None),
        ("responses-end-incomplete", None, "max_output_tokens"),
        ("responses-end-completed", None, "stop"),
    ],
)
def test_a_responses_streams_closing_event_says_how_it_ended(
    service: tuple[openai.OpenAI, int], how: str, error_type: str | None, reason: str | None
) -> None:
    """The status OpenAI puts in the closing event's response repeats the event's name; a proxy's may leave it out,
    and a ``response.failed`` so sent was a success. The SDK raises for none of them: it hands the event on."""
    client, port = service
    events = [
        e.type for e in client.responses.create(model=how, input="Hi", stream=True, extra_headers={"x-script": how})
    ]
    assert events[-1] == "response." + how.split("-")[2]

    def ended(metrics: Metrics) -> None:
        assert metrics.value("llm_requests_total", gen_ai_request_model=how) == 1
        errors = {s["error_type"] for s in metrics.series("llm_errors_total", gen_ai_request_model=how)}
        reasons = {s["llm_finish_reason"] for s in metrics.series("llm_finish_reasons_total", gen_ai_request_model=how)}
        assert (errors, reasons) == ({error_type} - {None}, {reason} - {None})

    settled(port, ended)


def test_a_prompt_refused_by_policy_is_a_content_filter(service: tuple[openai.OpenAI, int]) -> None:
    """OpenAI refuses a prompt it flags (its reasoning models) with a 400 whose code is ``invalid_prompt``: a refusal
    by policy, as a content filter's is, not a malformed request."""
    client, port = service
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="invalid-prompt",
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"x-script": "invalid-prompt"},
        )
    assert raised.value.code == "invalid_prompt"
    settled(port, lambda m: _once(m, "other", "content_filter"))


def test_a_responses_tool_call_cut_off_counts_its_pieces(service: tuple[openai.OpenAI, int]) -> None:
    client, port = service
    model = "responses-tool-cut"
    events = client.responses.create(model=model, input="Weather?", stream=True, extra_headers={"x-script": model})
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == '{"city":"Paris"}'  # the SDK returns what came, and raises nothing
    metrics = _counted(port, model)
    assert metrics.value("llm_errors_total", gen_ai_request_model=model, error_type="incomplete_stream") == 1
    # Each piece of the arguments is about a token, as a piece of text is; the input is estimated with them.
    assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 5
    assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input") > 0
    assert metrics.value("llm_tool_calls_total", gen_ai_request_model=model, gen_ai_tool_name="get_weather") == 1


@pytest.mark.parametrize("choices", [2, 1])
def test_a_stream_cut_before_each_of_its_choices_finished_is_incomplete(
    service: tuple[openai.OpenAI, int], choices: int
) -> None:
    """With ``n=2``, a stream whose upstream dropped after the first choice finished left the second one cut; the
    client's SDK says nothing. One finish reason for each choice the stream had makes the answer whole: a server
    that ignores ``n`` (one choice) is not cut when its only choice finished."""
    client, port = service
    model = f"cut-n2-choices{choices}"
    headers = {"x-script": "n", "x-choices": str(choices), "x-cut-after-first-finish": "1"}
    finished = {
        choice.index: choice.finish_reason
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], n=2, stream=True, extra_headers=headers
        )
        for choice in chunk.choices
        if choice.finish_reason
    }
    assert finished == {0: "stop"}
    metrics = _counted(port, model)
    errors = metrics.value("llm_errors_total", gen_ai_request_model=model, error_type="incomplete_stream")
    assert errors == (1 if choices == 2 else 0)


@pytest.mark.parametrize(
    ("n", "choices", "repeat", "empty"),
    # four choices side by side; a server that ignores n and repeats its finish reason; two choices, one of which
    # says nothing (opened and finished without content: all the tokens are the other's)
    [(4, 4, False, 0), (2, 1, True, 0), (2, 2, False, 1)],
)
def test_time_per_output_token_with_n_choices_is_per_choice(
    service: tuple[openai.OpenAI, int], n: int, choices: int, repeat: bool, empty: int
) -> None:
    """Each choice with output gets a token every GAP seconds: the time per output token is that of one choice, as
    the client saw its tokens come (the usage counts the tokens of all of them). Compared with what the client
    measured, so a slow machine, which makes every gap longer, changes both alike."""
    client, port = service
    model = f"n{n}-choices{choices}{'-repeat' if repeat else ''}{f'-empty{empty}' if empty else ''}"
    headers = {"x-script": "n", "x-choices": str(choices), "x-empty-choices": str(empty),
               **({"x-repeat-finish": "1"} if repeat else {})}  # fmt: skip
    arrivals: list[float] = []
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], n=n, stream=True,
        stream_options={"include_usage": True}, extra_headers=headers,
    ):  # fmt: skip
        if chunk.choices and chunk.choices[0].index == 0 and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    assert len(arrivals) == PER_CHOICE
    seen = (arrivals[-1] - arrivals[0]) / (PER_CHOICE - 1)
    metrics = _counted(port, model)
    count = metrics.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model)
    total = metrics.value("gen_ai_server_time_per_output_token_seconds_sum", gen_ai_request_model=model)
    assert count == 1
    assert seen / 1.5 <= total <= seen * 1.5, f"{total:.4f} s per token; the client saw one every {seen:.4f} s"


PROMPT: list[Any] = [{"role": "user", "content": "Hi"}]


def test_anthropics_context_overflow_is_context_length(claude: tuple[anthropic.Anthropic, int]) -> None:
    client, port = claude
    with pytest.raises(anthropic.BadRequestError, match="exceed context limit"):
        client.messages.create(
            model="overflow", max_tokens=1024, messages=PROMPT, extra_headers={"x-script": "overflow"}
        )
    settled(port, lambda m: _once(m, "other", "context_length", "anthropic"))  # (a refused request's model: "other")


def test_a_stream_that_opens_with_redacted_reasoning_has_its_first_token_there(
    claude: tuple[anthropic.Anthropic, int],
) -> None:
    """The only output is the hidden reasoning: before, the stream had no first token at all."""
    client, port = claude
    with client.messages.stream(model="redacted", max_tokens=10, messages=PROMPT,
                                extra_headers={"x-script": "redacted"}) as streamed:  # fmt: skip
        message = streamed.get_final_message()
    assert [block.type for block in message.content] == ["redacted_thinking"]
    metrics = _counted(port, "redacted")
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="redacted") == 1


@pytest.mark.parametrize("how", ["mcp", "mcp-json"])
def test_a_call_of_an_mcp_servers_tool_is_a_tool_call(claude: tuple[anthropic.Anthropic, int], how: str) -> None:
    client, port = claude
    if how == "mcp":
        events = client.messages.create(model=how, max_tokens=10, messages=PROMPT, stream=True,
                                        extra_headers={"x-script": how})  # fmt: skip
        assert "content_block_start" in [event.type for event in events]
    else:
        client.messages.create(model=how, max_tokens=10, messages=PROMPT, extra_headers={"x-script": how})
    metrics = _counted(port, how)
    assert metrics.value("llm_tool_calls_total", gen_ai_request_model=how, gen_ai_tool_name="echo") == 1, metrics.text


@pytest.mark.parametrize("lead", ["", "blank", "bom"])
def test_a_stream_labelled_text_plain_is_read_as_the_stream_it_is(
    service: tuple[openai.OpenAI, int], lead: str
) -> None:
    """``blank``: a blank line, alone in the body's first chunk, before the first event; ``bom``: a byte order mark
    before it. Both hid the stream from the middleware (its first bytes said no field), and its tokens were lost."""
    client, port = service
    model = f"plain-{lead}" if lead else "plain"
    headers = {"x-script": "n", "x-media-type": "text/plain", "x-lead": lead}
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], n=2, stream=True,
            stream_options={"include_usage": True}, extra_headers=headers,
        )
    )  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2 * PER_CHOICE
    metrics = _counted(port, model)
    assert metrics.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 2 * PER_CHOICE
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 1
