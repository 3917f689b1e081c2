"""The middleware in a real LLM server: llama-cpp-python's OpenAI-compatible server (FastAPI, sse-starlette, a real
llama.cpp model behind it) with the one line added, under uvicorn, asked through the openai SDK.

The model is a tiny Llama with random weights, written by ``tiny_llama.write_model`` with the ``gguf`` package: a
vocabulary of our own (byte tokens, some words, CJK and accented pieces), two layers. Greedy decoding makes every answer
deterministic, so the server's own non-stream usage is the ground truth for the same request streamed. Random
weights pick byte tokens often, so the streams hold many tokens that end inside a UTF-8 character: the server sends
an empty delta for each, which is what an output-token estimate has to count. A forced tool choice makes the server
constrain the output to a real tool call (its chat format's grammar), and a prompt longer than the context gets its
real 400.

Needs ``llama-cpp-python[server]`` (built from source: PyPI has no wheel) and ``gguf``; skipped otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] (pip install it; builds llama.cpp)")
pytest.importorskip("gguf", reason="needs the gguf package to write the test's model")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llm_telemetry import LLMTelemetryMiddleware  # noqa: E402
from support import free_port, request_log_lines, scrape, serve, wait_for  # noqa: E402
from tiny_llama import CONTEXT, write_model  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
EMBEDDINGS = "tiny-llama-embeddings"
PROMPTS = ("hello world", "the cat", "数据 über", "red blue dog", "naïve time", "ok yes no", "日本", "fast slow model")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    """llama-cpp-python's app as its ``python -m llama_cpp.server`` builds it, plus our middleware, under uvicorn."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    path = tmp_path_factory.mktemp("model") / "tiny-llama.gguf"
    write_model(path)
    # The chat format that answers a forced tool choice with a real tool call (a grammar constrains the output).
    common = {"model": str(path), "n_ctx": CONTEXT, "n_threads": 1, "seed": 1, "verbose": False}
    settings = [
        ModelSettings(**common, model_alias=MODEL, chat_format="chatml-function-calling"),
        # The same file for embeddings, under another name (the server loads the one a request names).
        ModelSettings(**common, model_alias=EMBEDDINGS, embedding=True),
    ]
    app = create_app(server_settings=ServerSettings(), model_settings=settings)
    metrics_port = free_port()
    app.add_middleware(LLMTelemetryMiddleware, metrics_port=metrics_port, metrics_host="127.0.0.1")
    with serve(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), metrics_port


def output_tokens(port: int, source: str, requests: int) -> float:
    """Output tokens counted so far, once ``requests`` LLM requests are recorded (after their last byte is sent)."""
    metrics = wait_for(
        f"{requests} requests recorded",
        lambda: (m := scrape(port)).value("llm_requests_total") == requests and m,
        seconds=10,
    )
    return metrics.value("llm_tokens_total", gen_ai_token_type="output", llm_usage_source=source)


def test_streams_without_usage_are_estimated_from_every_delta(server: tuple[Any, int]) -> None:
    client, port = server
    truth = estimated = deltas = visible = 0
    start = scrape(port)  # after the module's other tests, in whatever order they ran
    done = int(start.value("llm_requests_total"))
    for i, prompt in enumerate(PROMPTS):
        request = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24,
            "temperature": 0,
        }
        before = output_tokens(port, "reported", done + 2 * i)
        answer = client.chat.completions.create(**request)
        # Its own count, read from its usage: exactly what the server reported.
        assert output_tokens(port, "reported", done + 2 * i + 1) - before == answer.usage.completion_tokens
        truth += answer.usage.completion_tokens

        before = output_tokens(port, "estimated", done + 2 * i + 1)
        for chunk in client.chat.completions.create(**request, stream=True):
            assert chunk.usage is None  # this server has no stream usage: the estimate is all there is
            for choice in chunk.choices:
                if choice.delta.content is not None:
                    deltas += 1
                    visible += bool(choice.delta.content)
        estimated += output_tokens(port, "estimated", done + 2 * i + 2) - before
    # One token per delta, empty ones included, as the server sent them.
    assert estimated == deltas
    # Against the ground truth: the server holds back a token that starts a character until the character is whole
    # (one delta for several tokens), so the estimate may fall a little short, never far. Counting only the deltas
    # with text would have missed about a third of these tokens.
    assert 0.9 * truth <= estimated <= truth, (estimated, truth)
    assert visible < 0.8 * truth  # the streams do exercise the empty deltas

    metrics = scrape(port)

    def added(name: str, **labels: str) -> float:
        return metrics.value(name, **labels) - start.value(name, **labels)

    model = {"gen_ai_request_model": MODEL}
    assert added("llm_requests_total", gen_ai_request_stream="true", **model) == len(PROMPTS)
    assert added("llm_requests_total", gen_ai_response_model=MODEL) == 2 * len(PROMPTS)
    assert added("gen_ai_server_time_to_first_token_seconds_count", **model) == len(PROMPTS)
    assert added("gen_ai_server_time_per_output_token_seconds_count", **model) == len(PROMPTS)


def test_tool_calls_and_a_context_overflow_as_the_server_sends_them(server: tuple[Any, int]) -> None:
    client, port = server
    before = scrape(port)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    request = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": tools,
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 24,
               "temperature": 0}  # fmt: skip
    answer = client.chat.completions.create(**request)
    seen = [call.function.name for call in answer.choices[0].message.tool_calls]
    # Streamed, every delta of the call repeats its index and name: one call still.
    pieces = [(call.index, call.function.name)
              for chunk in client.chat.completions.create(**request, stream=True)
              for choice in chunk.choices for call in choice.delta.tool_calls or []]  # fmt: skip
    assert seen == ["get_weather"] and set(pieces) == {(0, "get_weather")}

    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello " * CONTEXT}], max_tokens=8
        )

    def recorded() -> Any:
        metrics = scrape(port)
        done = metrics.value("llm_requests_total") - before.value("llm_requests_total") == 3
        return done and metrics

    metrics = wait_for("3 requests recorded", recorded, seconds=10)

    def added(name: str, **labels: str) -> float:
        return metrics.value(name, **labels) - before.value(name, **labels)

    assert added("llm_tool_calls_total", gen_ai_tool_name="get_weather") == 2
    # The stream has no usage: each piece of the call is about a token of the model's count for the same request.
    estimated = added("llm_tokens_total", gen_ai_token_type="output", llm_usage_source="estimated")
    truth = answer.usage.completion_tokens
    assert estimated == len(pieces) and 0.7 * truth <= estimated <= truth, (estimated, truth)
    assert added("llm_errors_total", error_type="context_length", gen_ai_request_model=MODEL) == 1
    assert added("llm_errors_total") == 1


def test_legacy_completions_and_embeddings(server: tuple[Any, int]) -> None:
    """The two other APIs the server offers: a legacy completions stream is estimated from its ``text`` pieces as
    the chat stream is from its deltas (the server's non-stream usage for the same request is the truth); an
    embeddings request counts the input tokens the server reports."""
    client, port = server
    before = scrape(port)
    request = {"model": MODEL, "prompt": "the cat 数据", "max_tokens": 16, "temperature": 0}
    truth = client.completions.create(**request).usage.completion_tokens
    choices = [choice for chunk in client.completions.create(**request, stream=True) for choice in chunk.choices]
    pieces = len(choices)
    assert any(choice.text == "" and choice.finish_reason is None for choice in choices)  # tokens without text
    embedded = client.embeddings.create(model=EMBEDDINGS, input=["hello world", "日本 über"])

    def recorded() -> Any:
        metrics = scrape(port)
        return metrics.value("llm_requests_total") - before.value("llm_requests_total") == 3 and metrics

    metrics = wait_for("3 requests recorded", recorded, seconds=10)

    def added(**labels: str) -> float:
        return metrics.value("llm_tokens_total", **labels) - before.value("llm_tokens_total", **labels)

    legacy = {"gen_ai_operation_name": "text_completion", "gen_ai_token_type": "output"}
    assert added(**legacy, llm_usage_source="reported") == truth
    # Every piece but the last, which carries the finish reason with an empty text, is a token (the server may send
    # one piece for two tokens, as in the chat test).
    estimated = added(**legacy, llm_usage_source="estimated")
    assert estimated == pieces - 1 and truth - 2 <= estimated <= truth, (estimated, pieces, truth)
    assert added(gen_ai_operation_name="embeddings", gen_ai_token_type="input") == embedded.usage.prompt_tokens > 0


def test_clients_that_leave_mid_stream(server: tuple[Any, int]) -> None:
    """Clients that hang up after a few events of a long answer: each is a ``client_disconnect``, nothing stays
    active, and the server goes on answering."""
    client, port = server
    before = scrape(port)
    base = str(client.base_url).rstrip("/")
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", f"{base}/chat/completions", json=request, timeout=30) as response:
            for i, _line in enumerate(response.iter_lines()):
                if i == 5:
                    break
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].finish_reason == "length"

    def recorded() -> Any:
        metrics = scrape(port)
        return metrics.value("llm_requests_total") - before.value("llm_requests_total") == 4 and metrics

    metrics = wait_for("4 requests recorded", recorded, seconds=30)
    disconnects = {"error_type": "client_disconnect", "gen_ai_request_stream": "true"}
    assert metrics.value("llm_errors_total", **disconnects) - before.value("llm_errors_total", **disconnects) == 3
    assert metrics.value("llm_errors_total") - before.value("llm_errors_total") == 3
    assert metrics.value("llm_requests_active") == 0
    assert metrics.value("llm_telemetry_internal_errors_total") == 0


def test_the_logged_request_id_is_the_one_the_client_gets(server: tuple[Any, int]) -> None:
    """The server sets its own ``x-request-id`` on every response: a request sent without one is logged under the
    server's id, and one sent with an id under that id."""
    import json
    import uuid

    client, _ = server
    messages = [{"role": "user", "content": "hi"}]
    chosen = uuid.uuid4().hex  # (the server refuses an id that is not a UUID)
    with request_log_lines() as sink:
        plain = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=2)
        named = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=2, extra_headers={"x-request-id": chosen}
        )
        wait_for("two log lines", lambda: sink.getvalue().count("\n") >= 2, seconds=10)
    logged = [json.loads(line)["request_id"] for line in sink.getvalue().splitlines()]
    server_id = plain.headers["x-request-id"]
    assert server_id and logged == [server_id, chosen], (logged, server_id)
    assert named.headers.get_list("x-request-id") == [chosen]
