"""The LiteLLM proxy, a real gateway, behind the middleware: its traffic and its errors as it really sends them.

The proxy (``litellm[proxy]``, run offline in its own process) fronts an upstream OpenAI-compatible app of ours.
Fronting the demo service, it re-encodes every chunk in its own shape: the middleware must record the usage the
proxy's clients receive, a time to first token for each stream, and the tool calls, on its OpenAI route and on
its Anthropic one (which answers in Anthropic's shapes what it asked of an OpenAI-compatible upstream).
Fronting an upstream that either drops its connection in the middle of a stream or answers 429, LiteLLM turns the
first into an error event inside a 200 stream, ``{"error": {"type": null, "code": "500", ...}}``, and the second
into a 429 with ``{"error": {"type": "throttling_error", "code": "429", ...}}``. The middleware must record
``server_error`` and ``rate_limit``, not ``other``. One proxy, started once for the module (see ``gateway``), fronts
all of these upstreams, each test calling models of its own.

LiteLLM is a large install with pins of its own, so it is not in the ``dev`` extra: ``scripts/get-litellm`` (which
``.ci/run`` calls) installs it into a virtualenv of its own, and the proxy runs on that interpreter with the
checkout's ``middleware/`` first on its path. ``LLM_TELEMETRY_LITELLM_PYTHON`` names another interpreter; one that has
neither makes these tests skip and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import APIS
from llm_telemetry.demo.app import bare_app
from llm_telemetry.demo.run import DEMO_TOOLS
from llm_telemetry.record import LLMCall
from support import FRESH, Metrics, free_port, request_body, scrape_text, serve, whole_after

REPO = Path(__file__).resolve().parents[2]


def litellm_python() -> str | None:
    """The interpreter that runs the proxy: ``LLM_TELEMETRY_LITELLM_PYTHON``, else the one ``scripts/get-litellm``
    made, else this one if it has LiteLLM."""
    named = os.environ.get("LLM_TELEMETRY_LITELLM_PYTHON")
    if named:
        return named
    own = REPO / ".tools" / "litellm" / "bin" / "python"
    if own.exists():
        return str(own)
    return sys.executable if importlib.util.find_spec("litellm") is not None else None


PYTHON = litellm_python()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PYTHON is None, reason="litellm[proxy] is not installed (scripts/get-litellm installs it)"),
]
MASTER_KEY = "sk-test-" + "7c1e" * 8
#: Seconds LiteLLM waits for the upstream of the models named "...-timeout".
UPSTREAM_TIMEOUT = 1


async def _two_words(send: Any) -> None:
    """The start of a stream: a 200 and two content chunks, with no finish reason."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for word in ("Hello", " there"):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
                 "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}  # fmt: skip
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True})  # fmt: skip


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An OpenAI-compatible upstream: "throttle" in the prompt gets a 429, "dawdle" no answer within LiteLLM's
    timeout, anything else a stream that breaks."""
    if scope["type"] != "http":
        return
    body = await request_body(receive)
    if b"dawdle" in body:
        await asyncio.sleep(UPSTREAM_TIMEOUT * 3)
    if b"throttle" in body:
        error = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
        await send({"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(error).encode()})
        return
    await _two_words(send)
    raise RuntimeError("the upstream connection drops mid-stream")


def chat(base: str, prompt: str, model: str = "up") -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {MASTER_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


#: A model of the gateway's: (its name for clients, LiteLLM's model, the upstream's base URL, whether LiteLLM gives
#: up on the upstream after UPSTREAM_TIMEOUT).
Route = tuple[str, str, str, bool]


def routes_to(base: str) -> list[Route]:
    """Every kind of model the tests use, all fronting the upstream at ``base``: "up" (OpenAI), "up-messages" (for
    clients of its Anthropic route: LiteLLM sends those to an OpenAI model's Responses API, which the demo lacks, and
    to an OpenAI-compatible server's, vLLM's, chat completions), the same two with a timeout for the upstream's answer,
    "claude-up" (an Anthropic upstream), "claude-up-1h" (the same, its cache writes made to the one-hour cache) and
    "up-text" (for clients of the legacy completions API)."""
    return [
        ("up", "openai/up", f"{base}/v1", False),
        ("up-messages", "hosted_vllm/up", f"{base}/v1", False),
        ("up-timeout", "openai/up", f"{base}/v1", True),
        ("up-messages-timeout", "hosted_vllm/up", f"{base}/v1", True),
        ("claude-up", "anthropic/claude-up", base, False),
        ("claude-up-1h", "anthropic/claude-up-1h", base, False),
        ("up-text", "text-completion-openai/up", f"{base}/v1", False),
    ]


@contextlib.contextmanager
def litellm_proxy(
    tmp_path: Path, upstream: str | list[Route], extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """The LiteLLM proxy, wrapped in the middleware, fronting the upstream at base URL ``upstream`` as each of
    :func:`routes_to`'s models (or the models of the ``upstream`` routes given): (base URL, metrics port)."""
    config = tmp_path / "litellm.yaml"
    models = []
    for name, model, api_base, timeout in routes_to(upstream) if isinstance(upstream, str) else upstream:
        key = "sk-ant-upstream" if model.startswith("anthropic/") else "sk-upstream"
        models.append(
            f"  - model_name: {name}\n    litellm_params:\n      model: {model}\n"
            f"      api_base: {api_base}\n      api_key: {key}\n      max_retries: 0\n"
            + (f"      timeout: {UPSTREAM_TIMEOUT}\n      stream_timeout: {UPSTREAM_TIMEOUT}\n" if timeout else "")
        )
    config.write_text("model_list:\n" + "".join(models) + "litellm_settings:\n  num_retries: 0\n")
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "LITELLM_"))}
    env.update(
        CONFIG_FILE_PATH=str(config),
        LITELLM_MASTER_KEY=MASTER_KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PROXY_PORT=str(port),
        LLM_TELEMETRY_METRICS_PORT=str(metrics_port),
        LLM_TELEMETRY_METRICS_HOST="127.0.0.1",
        LLM_TELEMETRY_REQUEST_LOGS="false",
        PYTHONPATH=os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
    )
    env.update(extra_env or {})
    log = (tmp_path / "proxy.log").open("wb")
    proxy = subprocess.Popen(
        [str(PYTHON), str(REPO / "tests" / "apps" / "litellm_proxy.py")], env=env, stdout=log, stderr=log
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health/liveliness", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise AssertionError((tmp_path / "proxy.log").read_text(errors="replace")[-3000:]) from None
                time.sleep(0.5)
        yield base, metrics_port
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        log.close()


def settled(metrics_port: int, requests: int, model: str = "up") -> Metrics:
    """The scrape once ``requests`` calls to ``model`` are recorded; fails if they are not within 30 s (a wait that
    ran out and went on with the last scrape hid a test waiting on a model it never called, 30 s each run)."""
    deadline = time.monotonic() + 30
    while True:
        metrics = Metrics(scrape_text(metrics_port, FRESH))
        recorded = metrics.value("llm_requests_total", gen_ai_request_model=model)
        if recorded >= requests:
            return whole_after(metrics_port)
        if time.monotonic() > deadline:
            raise AssertionError(f"{recorded:g} of {requests} calls to {model} recorded in 30 s:\n{metrics.text}")
        time.sleep(0.2)


@dataclasses.dataclass(frozen=True)
class Gateway:
    """The module's LiteLLM proxy: its base URL and its middleware's metrics port, and the metrics port of the
    middleware in the upstream that cuts its streams."""

    base: str
    metrics_port: int
    relay_metrics_port: int

    def internal_errors(self) -> float:
        """The middleware's internal errors so far (the module's tests share its process)."""
        return Metrics(scrape_text(self.metrics_port, FRESH)).value("llm_telemetry_internal_errors_total")

    @contextlib.contextmanager
    def used(self) -> Iterator[tuple[str, int, float]]:
        """(base URL, metrics port, the internal errors so far), for a test's block of calls."""
        yield self.base, self.metrics_port, self.internal_errors()


#: The gateway's prices: those of the cache-writing upstream's two models, each an entry of its own.
PRICING = (
    "models:\n  claude-up: {input: 3.0, output: 15.0, cache_read: 0.3, cache_creation: 3.75}\n"
    "  claude-up-1h: {input: 3.0, output: 15.0, cache_read: 0.3, cache_creation: 3.75, cache_creation_1h: 6.0}\n"
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One LiteLLM proxy for the module's tests, as a gateway fronts many upstreams (it takes 10 s and more to start,
    once per test before). Each test calls models no other test calls, and its assertions name them, so what one test
    recorded is told from another's whatever order they run in; the internal errors, which name no model, are
    counted from where each test found them."""
    tmp = tmp_path_factory.mktemp("litellm")
    pricing = tmp / "pricing.yaml"
    pricing.write_text(PRICING)
    relay_metrics = free_port()
    relay = LLMTelemetryMiddleware(cut_upstream, metrics_port=relay_metrics, metrics_host="127.0.0.1")
    try:
        with contextlib.ExitStack() as stack:
            failing = stack.enter_context(serve(upstream))
            caching = stack.enter_context(serve(anthropic_upstream))
            demo = stack.enter_context(serve(bare_app()))
            legacy = stack.enter_context(serve(completions_upstream))
            cut = stack.enter_context(serve(relay))
            routes: list[Route] = [
                ("flaky", "openai/up", f"{failing}/v1", False),
                ("up-timeout", "openai/up", f"{failing}/v1", True),
                ("up-messages-timeout", "hosted_vllm/up", f"{failing}/v1", True),
                ("claude-up", "anthropic/claude-up", caching, False),
                ("claude-up-1h", "anthropic/claude-up-1h", caching, False),
                ("up", "openai/up", f"{demo}/v1", False),
                ("up-messages", "hosted_vllm/up", f"{demo}/v1", False),
                ("up-responses", "openai/up", f"{demo}/v1", False),
                ("up-text", "text-completion-openai/up", f"{legacy}/v1", False),
                ("up-cut", "openai/up", f"{cut}/v1", False),
            ]
            env = {"LLM_TELEMETRY_PRICING": str(pricing)}
            base, metrics_port = stack.enter_context(litellm_proxy(tmp, routes, env))
            yield Gateway(base, metrics_port, relay_metrics)
    finally:
        relay.telemetry.shutdown()


def test_hostile_litellm_proxy_errors_are_classified(gateway: Gateway) -> None:
    internal = gateway.internal_errors()
    status, body = chat(gateway.base, "hi", model="flaky")
    assert status == 200
    error = json.loads(body.split(b"data: ")[-1])["error"]
    assert (error["type"], error["code"]) == (None, "500")  # LiteLLM's wire format, as documented above

    status, body = chat(gateway.base, "throttle", model="flaky")
    assert status == 429
    assert json.loads(body)["error"]["code"] == "429"

    metrics = settled(gateway.metrics_port, 2, model="flaky")
    flaky = {"gen_ai_request_model": "flaky"}
    assert metrics.value("llm_errors_total", error_type="server_error", gen_ai_request_stream="true", **flaky) == 1
    assert metrics.value("llm_errors_total", error_type="rate_limit", **flaky) == 1
    assert metrics.value("llm_errors_total", error_type="other", **flaky) == 0
    assert metrics.value("llm_telemetry_internal_errors_total") == internal


def test_litellm_proxy_timeouts_are_recorded_as_timeouts(gateway: Gateway) -> None:
    """LiteLLM answers an upstream that does not answer in time with a 408 and a broad error type on both routes
    (``invalid_request_error`` on its OpenAI one, ``api_error`` on its Anthropic one): the status says timeout."""
    status, body = chat(gateway.base, "dawdle", model="up-timeout")
    assert status == 408, body
    assert json.loads(body)["error"]["type"] == "invalid_request_error"  # the broad type, as documented above

    client = anthropic.Anthropic(base_url=gateway.base, api_key=MASTER_KEY, max_retries=0, timeout=60)
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(
            model="up-messages-timeout", max_tokens=16, messages=[{"role": "user", "content": "dawdle"}]
        )
    assert raised.value.status_code == 408, raised.value.body
    assert raised.value.body["error"]["type"] == "api_error"

    metrics = settled(gateway.metrics_port, 1, model="up-messages-timeout")
    for model in ("up-timeout", "up-messages-timeout"):
        assert metrics.value("llm_errors_total", error_type="timeout", gen_ai_request_model=model) == 1
        assert metrics.value("llm_errors_total", gen_ai_request_model=model) == 1


#: What the Anthropic upstream below reports for every call: fresh input, cache reads, cache writes, output.
CACHED_USAGE = {"input_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2, "output_tokens": 7}
#: What it reports for its model "claude-up-1h": three of its four cache writes made to the one-hour cache.
ONE_HOUR_USAGE = {"input_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 4, "output_tokens": 7,
                  "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 3}}  # fmt: skip


async def anthropic_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An Anthropic Messages API upstream whose every answer reads from and writes to the prompt cache."""
    if scope["type"] != "http":
        return
    raw = await request_body(receive)
    body = json.loads(raw) if raw else {}
    model = "claude-up-1h" if body.get("model") == "claude-up-1h" else "claude-up"
    usage = ONE_HOUR_USAGE if model == "claude-up-1h" else CACHED_USAGE
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "stop_sequence": None}
    if not body.get("stream"):
        answer = {**message, "content": [{"type": "text", "text": "Sunny."}], "stop_reason": "end_turn",
                  "usage": usage}  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
        return
    events = [
        ("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                       "usage": {**usage, "output_tokens": 1}}}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Sunny."}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": usage["output_tokens"]}}),
        ("message_stop", {}),
    ]  # fmt: skip
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for name, data in events:
        event = f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_litellm_openai_clients_of_a_caching_provider_have_its_cache_writes_counted_and_priced(
    gateway: Gateway,
) -> None:
    """OpenAI SDK clients of the gateway, in front of a provider that bills prompt-cache writes (Anthropic): LiteLLM
    reports the writes in OpenAI-shaped usage (``prompt_tokens_details.cache_creation_tokens``, the Responses API's
    ``input_tokens_details.cache_write_tokens``). They are counted as cache_creation and priced at its price, as the
    same call on the gateway's Anthropic route is."""
    # (The gateway's pricing: claude-up at these prices.)
    base = gateway.base
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    usages = [client.chat.completions.create(model="claude-up", messages=messages).usage]
    stream = client.chat.completions.create(
        model="claude-up", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    usages += [chunk.usage for chunk in stream if chunk.usage]
    usages.append(client.responses.create(model="claude-up", input="What is the weather in Paris?").usage)
    anthropic.Anthropic(base_url=base, api_key=MASTER_KEY, max_retries=0).messages.create(
        model="claude-up", max_tokens=16, messages=messages
    )
    metrics = settled(gateway.metrics_port, 4, model="claude-up")
    assert len(usages) == 3 and all(usages)
    calls = 4
    detail = {"gen_ai_request_model": "claude-up", "gen_ai_token_type": "input"}
    assert metrics.value("llm_token_details_total", llm_token_detail="cache_creation", **detail) == 2 * calls
    assert metrics.value("llm_token_details_total", llm_token_detail="cache_read", **detail) == 3 * calls
    assert metrics.value("llm_tokens_total", **detail) == 10 * calls
    one = (5 * 3.0 + 3 * 0.3 + 2 * 3.75 + 7 * 15.0) / 1_000_000
    assert math.isclose(metrics.value("llm_cost_usd_total", gen_ai_request_model="claude-up"), one * calls)
    assert metrics.value("llm_errors_total", gen_ai_request_model="claude-up") == 0


def test_litellm_openai_clients_of_a_caching_provider_have_its_one_hour_cache_writes_priced_as_such(
    gateway: Gateway,
) -> None:
    """LiteLLM passes Anthropic's split of the cache writes by lifetime on to its OpenAI chat clients
    (``prompt_tokens_details.cache_creation_token_details``): the one-hour writes are priced at the table's
    ``cache_creation_1h`` price there, as on its Anthropic route, not at the five-minute price."""
    # (The gateway's pricing: claude-up-1h at these prices, its one-hour cache writes at 6.0.)
    model, base = "claude-up-1h", gateway.base
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    usages = [client.chat.completions.create(model=model, messages=messages).usage]
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    usages += [chunk.usage for chunk in stream if chunk.usage]
    anthropic.Anthropic(base_url=base, api_key=MASTER_KEY, max_retries=0).messages.create(
        model=model, max_tokens=16, messages=messages
    )
    metrics = settled(gateway.metrics_port, 3, model=model)
    # What the chat clients were told: the writes and their split, as the upstream reported them.
    assert len(usages) == 2
    for usage in usages:
        assert usage is not None and usage.prompt_tokens == 12
        assert (usage.model_extra or {}).get("cache_creation_input_tokens") == 4
    one = (5 * 3.0 + 3 * 0.3 + 1 * 3.75 + 3 * 6.0 + 7 * 15.0) / 1_000_000
    for provider in ("openai", "anthropic"):
        calls = 2 if provider == "openai" else 1
        labels = {"gen_ai_request_model": model, "gen_ai_provider_name": provider}
        assert metrics.value("llm_requests_total", **labels) == calls
        assert math.isclose(metrics.value("llm_cost_usd_total", **labels), one * calls), provider
    assert metrics.value("llm_errors_total", gen_ai_request_model=model) == 0


def test_litellm_proxy_traffic_is_measured_as_its_clients_see_it(gateway: Gateway) -> None:
    """Successful calls through the gateway, in the chunk shapes LiteLLM re-encodes: the tokens recorded are the
    usage its clients (the official SDK) receive, streams get a time to first token, tool calls are counted."""
    with gateway.used() as (base, metrics_port, internal):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
        messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
        usages = []
        for _ in range(2):
            stream = client.chat.completions.create(
                model="up", messages=messages, stream=True, stream_options={"include_usage": True}
            )
            (usage,) = [chunk.usage for chunk in stream if chunk.usage]
            usages.append(usage)
        answer = client.chat.completions.create(model="up", messages=messages)
        usages.append(answer.usage)
        stream = client.chat.completions.create(model="up", messages=messages, tools=DEMO_TOOLS, stream=True)
        named = [call.function.name for chunk in stream for choice in chunk.choices
                 for call in choice.delta.tool_calls or () if call.function and call.function.name]  # fmt: skip
        assert named == ["get_weather"]

        metrics = settled(metrics_port, 4)
        model = {"gen_ai_request_model": "up"}
        assert metrics.value("llm_requests_total", **model) == 4
        for kind, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            reported = metrics.value("llm_tokens_total", gen_ai_token_type=kind, llm_usage_source="reported", **model)
            assert reported == sum(getattr(u, field) for u in usages), kind
        assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", **model) == 3
        assert metrics.value("llm_tool_calls_total", gen_ai_tool_name="get_weather", **model) == 1
        assert metrics.value("llm_errors_total", **model) == 0
        assert metrics.value("llm_telemetry_internal_errors_total") == internal


COMPLETION_WORDS = ("Once", " upon", " a", " time")


async def completions_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A legacy completions stream as OpenAI sends one to a client that did not ask for the usage: text chunks, a
    finish reason, no usage."""
    if scope["type"] != "http":
        return
    await request_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i, word in enumerate(COMPLETION_WORDS):
        last = i == len(COMPLETION_WORDS) - 1
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "up",
                 "choices": [{"index": 0, "text": word, "finish_reason": "stop" if last else None}]}  # fmt: skip
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True})  # fmt: skip
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def test_litellm_legacy_completions_stream_without_usage_has_its_tokens_estimated(gateway: Gateway) -> None:
    """A legacy completions stream whose client did not ask for the usage: LiteLLM puts a usage of zeros in every
    chunk. Those zeros are no count: the text its client received is estimated as any stream without usage is,
    rather than recorded as no tokens and no cost."""
    with gateway.used() as (base, metrics_port, internal):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
        chunks = list(client.completions.create(model="up-text", prompt="Say something", stream=True))
        texts = [choice.text for chunk in chunks for choice in chunk.choices if choice.text]
        assert "".join(texts) == "".join(COMPLETION_WORDS)
        placeholders = [chunk.usage for chunk in chunks if chunk.usage is not None]
        assert placeholders and all(u.prompt_tokens == u.completion_tokens == 0 for u in placeholders)

        metrics = settled(metrics_port, 1, model="up-text")
        model = {"gen_ai_request_model": "up-text", "gen_ai_operation_name": "text_completion"}
        assert metrics.value("llm_requests_total", **model) == 1
        assert metrics.value("llm_tokens_total", llm_usage_source="reported", **model) == 0
        estimated = {"llm_usage_source": "estimated", **model}
        # One text delta is about one token; the input is estimated from the prompt.
        assert metrics.value("llm_tokens_total", gen_ai_token_type="output", **estimated) == len(texts)
        assert metrics.value("llm_tokens_total", gen_ai_token_type="input", **estimated) > 0
        assert metrics.value("llm_telemetry_internal_errors_total") == internal


def test_litellm_anthropic_route_is_measured_as_its_clients_see_it(gateway: Gateway) -> None:
    """Clients of the Anthropic API (the ``anthropic`` SDK, and tools built on it) pointed at the gateway: LiteLLM
    answers them in Anthropic's shapes, translated from an OpenAI-compatible upstream. Recorded as Anthropic calls,
    with the usage those clients receive and a time to first token for the stream."""
    with gateway.used() as (base, metrics_port, internal):
        client = anthropic.Anthropic(base_url=base, api_key=MASTER_KEY, max_retries=0)
        messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
        answer = client.messages.create(model="up-messages", max_tokens=200, messages=messages)
        with client.messages.stream(model="up-messages", max_tokens=200, messages=messages) as stream:
            text = stream.get_final_text()
            streamed = stream.get_final_message()
        assert text

        metrics = settled(metrics_port, 2, model="up-messages")
    model = {"gen_ai_request_model": "up-messages", "gen_ai_provider_name": "anthropic"}
    assert metrics.value("llm_requests_total", **model) == 2
    for kind, field in (("input", "input_tokens"), ("output", "output_tokens")):
        reported = metrics.value("llm_tokens_total", gen_ai_token_type=kind, llm_usage_source="reported", **model)
        assert reported == getattr(answer.usage, field) + getattr(streamed.usage, field), kind
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", **model) == 1
    assert metrics.value("llm_errors_total", gen_ai_request_model="up-messages") == 0
    assert metrics.value("llm_telemetry_internal_errors_total") == internal


def test_litellm_responses_route_is_measured_and_read_by_shape(gateway: Gateway) -> None:
    """The Responses API through the gateway, which re-encodes every event in an order of its own and adds a
    ``model`` member: the usage its clients receive, a time to first token per stream, and text deltas read by their
    shape (the reader holds them, to be checked in bulk) with the numbers of a full parse."""
    with gateway.used() as (base, metrics_port, internal):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
        answer = client.responses.create(model="up-responses", input="What is the weather in Paris?")
        events = list(client.responses.create(model="up-responses", input="What is the weather in Paris?", stream=True))
        (done,) = [event.response for event in events if event.type == "response.completed"]
        request = urllib.request.Request(
            f"{base}/v1/responses",
            data=json.dumps({"model": "up-responses", "input": "hi", "stream": True}).encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {MASTER_KEY}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        metrics = settled(metrics_port, 3, model="up-responses")
    usages = [answer.usage, done.usage]
    assert all(usages)
    model = {"gen_ai_request_model": "up-responses", "llm_usage_source": "reported"}
    for kind, field in (("input", "input_tokens"), ("output", "output_tokens")):
        recorded = metrics.value("llm_tokens_total", gen_ai_token_type=kind, **model)
        assert recorded == sum(getattr(u, field) for u in usages) + raw_usage(raw, field), kind
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="up-responses") == 2
    assert metrics.value("llm_errors_total", gen_ai_request_model="up-responses") == 0
    assert metrics.value("llm_telemetry_internal_errors_total") == internal

    chunks = [event + b"\n\n" for event in raw.split(b"\n\n") if event.strip()]
    deltas = [i for i, chunk in enumerate(chunks) if b'"response.output_text.delta"' in chunk]
    assert len(deltas) > 9 and b'"model"' in chunks[deltas[0]]  # the gateway's own shape
    spec = APIS["openai.responses"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.response_reader(call, stream=True, capture=False)
    for i, chunk in enumerate(chunks[: deltas[-1] + 1]):
        reader.feed(chunk, now=float(i))
    assert reader.holding  # every delta was of the stream's shape (a reader that misses nine drops it)
    reference = LLMCall(spec.operation, spec.provider, start=0.0)
    full = spec.response_reader(reference, stream=True, capture=True)
    for i, chunk in enumerate(chunks):
        full.feed(chunk, now=float(i))
    full.finish(now=1000.0)
    reader.feed_held(chunks[deltas[-1] + 1 :])
    reader.finish(now=1000.0)
    assert (call.output_tokens, call.input_tokens, call.first_token_at, call.finish_reasons) == (
        reference.output_tokens, reference.input_tokens, reference.first_token_at, reference.finish_reasons
    )  # fmt: skip


def raw_usage(raw: bytes, field: str) -> int:
    """``field`` of the usage in the completed event of a raw Responses stream."""
    (completed,) = [event for event in raw.split(b"\n\n") if b'"response.completed"' in event]
    value: int = json.loads(completed.split(b"data: ", 1)[1])["response"]["usage"][field]
    return value


def test_litellm_before_a_real_model_server_is_measured_as_its_clients_see_it(tmp_path: Path) -> None:
    """A real model server behind the gateway: llama-cpp-python's, which streams no usage (tests/tiny_llama.py's
    model; skipped without llama-cpp-python and gguf). On the gateway the middleware records what the gateway's
    clients get: LiteLLM passes on only the deltas with text, so those are the estimate, and when a client asks for
    a stream's usage LiteLLM counts the tokens itself, so that count is what is reported. Neither is the model's own
    count; the middleware in the model server records that one (tests/test_llama_cpp_server.py)."""
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
    pytest.importorskip("gguf", reason="needs the gguf package to write the model")
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from tiny_llama import write_model

    write_model(tmp_path / "tiny.gguf")
    settings = ModelSettings(model=str(tmp_path / "tiny.gguf"), model_alias="up", n_threads=1, seed=1, verbose=False)
    model_server = create_app(server_settings=ServerSettings(), model_settings=[settings])
    with serve(model_server) as upstream_base, litellm_proxy(tmp_path, upstream_base) as (base, metrics_port):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
        request: Any = {"model": "up", "messages": [{"role": "user", "content": "naïve time"}], "max_tokens": 24,
                        "temperature": 0}  # fmt: skip
        texts = [choice.delta.content for chunk in client.chat.completions.create(**request, stream=True)
                 for choice in chunk.choices if choice.delta.content is not None]  # fmt: skip
        asked = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        (usage,) = [chunk.usage for chunk in asked if chunk.usage]
        metrics = settled(metrics_port, 2)
    output = {"gen_ai_request_model": "up", "gen_ai_token_type": "output"}
    assert metrics.value("llm_tokens_total", llm_usage_source="estimated", **output) == len(texts) > 0
    assert metrics.value("llm_tokens_total", llm_usage_source="reported", **output) == usage.completion_tokens
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="up") == 2
    assert metrics.value("llm_telemetry_internal_errors_total") == 0


async def cut_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An OpenAI-compatible upstream whose answer stops after two words: no finish reason, no usage, no [DONE], and
    a response ended normally (a relay whose own provider dropped the connection)."""
    if scope["type"] != "http":
        return
    await request_body(receive)
    await _two_words(send)
    await send({"type": "http.response.body", "body": b""})


def test_a_stream_cut_behind_the_gateway_is_an_incomplete_stream_where_it_was_cut(gateway: Gateway) -> None:
    """The upstream's own middleware sees its stream end before the end of its answer. The gateway makes up the end
    (a finish reason of its own), so its clients, and the middleware in front of it, see a whole answer."""
    # (The upstream, cut_upstream in a middleware of its own, is the gateway's model "up-cut", which it calls "up".)
    client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key=MASTER_KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="up-cut", messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    front = settled(gateway.metrics_port, 1, model="up-cut")
    upstream = settled(gateway.relay_metrics_port, 1)
    assert upstream.value("llm_errors_total", error_type="incomplete_stream") == 1
    assert finishes  # the gateway's own ending ...
    assert front.value("llm_errors_total", gen_ai_request_model="up-cut") == 0  # ... all a middleware before it has
