"""The Responses API's image generation tool in the cost. A response reports the tool's tokens apart from its own
``usage`` (``tool_usage.image_gen``): the tool is run by an image model of its own, billed at that model's prices.
They were in no cost and no unpriced count, so a user of the tool saw the text model's cost alone. Now they are
priced as the model the request's ``image_generation`` tool names, or counted as unpriced tokens when it names none
or one without a price.

A fake service answers as the API does, each body and event validated by the official SDK's own types; the client is
the official SDK against real uvicorn, the pricing a user's file; the dollars are read from real scrapes and from the
span's ``llm.cost_usd``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import Calls, Metrics, free_port, serve, settled, whole_after

#: A user's pricing file (USD per million tokens): a text model, and an image model whose text and image tokens
#: have prices of their own. ``gpt-image-unpriced`` is in no entry.
PRICING_YAML = """\
models:
  gpt-5: {input: 1.25, output: 10.0}
  gpt-image-1.5: {input: 5.0, output: 10.0, input_image: 8.0, output_image: 32.0}
  gpt-image-1: {input: 5.0, output: 40.0, cache_read: 1.25, input_image: 10.0, cache_read_image: 2.5,
                output_image: 40.0}
"""
TEXT_USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 140,
}
TEXT_COST = (100 * 1.25 + 40 * 10.0) / 1e6
#: The tool's tokens as the SDK's ``ToolUsageImageGen`` describes them: an edit of an image (1,500 image tokens in,
#: 100 of text) into one of 4,160 image tokens.
IMAGE_GEN = {
    "input_tokens": 1600,
    "input_tokens_details": {"image_tokens": 1500, "text_tokens": 100},
    "output_tokens": 4160,
    "total_tokens": 5760,
}
IMAGE_COST = (100 * 5.0 + 1500 * 8.0 + 4160 * 32.0) / 1e6
TOOL_USAGE = {"image_gen": IMAGE_GEN, "web_search": {"num_requests": 0}}

IMAGE_CALL = {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "aGk="}
MESSAGE = {
    "type": "message",
    "id": "msg_1",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "Here it is.", "annotations": []}],
}

#: What the service answers, by the request's model: a response object, streamed when the request asks.
ANSWERS: dict[str, dict[str, Any]] = {}
_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def response(model: str, tool_usage: Any, validate: bool = True, image: str = "aGk=") -> dict[str, Any]:
    body = {
        "id": "resp_img",
        "object": "response",
        "created_at": 1,
        "model": model,
        "status": "completed",
        "output": [{**IMAGE_CALL, "result": image}, MESSAGE],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [{"type": "image_generation"}],
        "usage": TEXT_USAGE,
        "tool_usage": tool_usage,
    }
    if not validate:  # (a hostile server's values, which the SDK's types refuse)
        return body
    return Response.model_validate(body).model_dump(mode="json", exclude_unset=True)


def _event(data: dict[str, Any], number: int) -> bytes:
    event = _EVENT.validate_python({**data, "sequence_number": number}).model_dump(mode="json", exclude_unset=True)
    return f"event: {data['type']}\ndata: {json.dumps(event)}\n\n".encode()


async def _stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
    created = {**body, "status": "in_progress", "output": [], "usage": None}
    created.pop("tool_usage", None)
    yield _event({"type": "response.created", "response": created}, 0)
    await asyncio.sleep(0.002)
    yield _event({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 1, "content_index": 0,
                  "delta": "Here it is.", "logprobs": []}, 1)  # fmt: skip
    await asyncio.sleep(0.002)
    yield _event({"type": "response.completed", "response": body}, 2)


async def answer(request: Request) -> HTTPResponse:
    sent = await request.json()
    body = ANSWERS[sent["model"]]
    if sent.get("stream"):
        return StreamingResponse(_stream(body), media_type="text/event-stream")
    return JSONResponse(body)


class Service:
    def __init__(self, base: str, port: int, calls: Calls, spans: InMemorySpanExporter) -> None:
        self.base, self.port, self.calls, self.spans = base, port, calls, spans

    def metrics(self, model: str) -> Metrics:
        settled(self.port, lambda m: _recorded(m, model) and None)
        assert any(c.request_model == model for c in self.calls.ended)
        return whole_after(self.port)

    def span_cost(self, model: str) -> Any:
        (span,) = [s for s in self.spans.get_finished_spans() if s.attributes.get("gen_ai.request.model") == model]
        return span.attributes.get("llm.cost_usd")


def _recorded(m: Metrics, model: str) -> None:
    assert m.value("llm_requests_total", gen_ai_request_model=model) == 1


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    pricing = Path(tmp_path_factory.mktemp("pricing")) / "prices.yaml"
    pricing.write_text(PRICING_YAML)
    port, calls, spans = free_port(), Calls(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/responses", answer, methods=["POST"])]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing=str(pricing),
        observers=[calls],
        tracer_provider=provider,
    )
    with serve(app) as base:
        yield Service(base, port, calls, spans)
    if app._telemetry is not None:
        app._telemetry.shutdown()


def ask(service: Service, model: str, tool: dict[str, Any], stream: bool) -> Any:
    """The response the official SDK returns (streamed: the one ``response.completed`` carries)."""
    client = openai.OpenAI(base_url=service.base + "/v1", api_key="test", max_retries=0)
    if not stream:
        return client.responses.create(model=model, input="Draw a cat", tools=[tool])  # type: ignore[list-item]
    with client.responses.create(model=model, input="Draw a cat", tools=[tool], stream=True) as events:  # type: ignore[list-item]
        last = list(events)[-1]
    assert last.type == "response.completed"
    return last.response


def check_cost(service: Service, model: str, cost: float, unpriced: int) -> None:
    m = service.metrics(model)
    assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == pytest.approx(cost, rel=1e-9)
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == unpriced
    # The tool's tokens are another model's: not counted as this call's tokens (they would carry its model's labels),
    # as the advisor tool's are not.
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input") == 100
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 40
    assert service.span_cost(model) == pytest.approx(cost, rel=1e-9)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_image_tools_tokens_are_priced_at_the_image_model_the_request_names(service: Service, stream: bool) -> None:
    model = f"gpt-5-draws-{stream}"
    ANSWERS[model] = response(model, TOOL_USAGE)
    answered = ask(service, model, {"type": "image_generation", "model": "gpt-image-1.5"}, stream)
    assert answered.tool_usage.image_gen.output_tokens == 4160
    # Before: TEXT_COST alone (0.000525 USD where the call was billed 0.146145).
    check_cost(service, model, TEXT_COST + IMAGE_COST, unpriced=0)


@pytest.mark.parametrize(("stream", "size"), [(False, 9 * 2**20), (True, 3 * 2**20)], ids=["json", "stream"])
def test_the_image_tools_tokens_are_priced_in_an_answer_too_large_to_read_whole(
    service: Service, stream: bool, size: int
) -> None:
    """An image's base64 makes the answer large: a streamed one's ``response.completed`` repeats it (larger than an
    event is read whole, 1 MiB), and a JSON answer of a few large images is past the 8 MiB read whole. Their usage is
    read from their last bytes: the tool's is too."""
    model = f"gpt-5-draws-large-{stream}"
    ANSWERS[model] = response(model, TOOL_USAGE, image="iVBO" * (size // 4))
    answered = ask(service, model, {"type": "image_generation", "model": "gpt-image-1.5"}, stream)
    assert len(answered.output[0].result) >= size
    check_cost(service, model, TEXT_COST + IMAGE_COST, unpriced=0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model_named", [None, "gpt-image-unpriced"], ids=["no-model", "unpriced-model"])
def test_the_image_tools_tokens_of_an_unknown_or_unpriced_model_are_unpriced_tokens(
    service: Service, stream: bool, model_named: str | None
) -> None:
    """Never priced as another model (the text model's prices, or a default image model's): counted as unpriced."""
    tool = {"type": "image_generation"} if model_named is None else {"type": "image_generation", "model": model_named}
    model = f"gpt-5-draws-{model_named}-{stream}"
    ANSWERS[model] = response(model, TOOL_USAGE)
    ask(service, model, tool, stream)
    check_cost(service, model, TEXT_COST, unpriced=1600 + 4160)


def test_the_image_tools_text_output_and_cached_input_are_priced_as_such(service: Service) -> None:
    model = "gpt-5-draws-details"
    usage = {
        **IMAGE_GEN,
        "output_tokens_details": {"image_tokens": 4000, "text_tokens": 160},
        "cached_tokens": 600,
        "cached_tokens_details": {"cached_image_tokens": 600, "cached_text_tokens": 0},
    }
    ANSWERS[model] = response(model, {**TOOL_USAGE, "image_gen": usage})
    ask(service, model, {"type": "image_generation", "model": "gpt-image-1.5"}, stream=False)
    # Of the 1,600 tokens in, 600 cached image tokens at the input price (the entry gives no cache_read price), then
    # 900 fresh image tokens and 100 of text; out: 4,000 image tokens and 160 of text.
    cost = (600 * 5.0 + 900 * 8.0 + 100 * 5.0 + 4000 * 32.0 + 160 * 10.0) / 1e6
    check_cost(service, model, TEXT_COST + cost, unpriced=0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_image_tools_cached_image_input_is_priced_at_its_own_cached_price(service: Service, stream: bool) -> None:
    """OpenAI lists gpt-image-1's cached input apart by modality: text $1.25, image $2.50 per million tokens (its
    fresh input $5 and $10). The tool's usage says which of its cached tokens were image tokens
    (``cached_tokens_details.cached_image_tokens``): priced at the entry's ``cache_read_image``. Before, every cached
    token was at ``cache_read``, the cached text price: 950 cached image tokens read $0.0012 under the bill."""
    model = f"gpt-5-draws-cached-{stream}"
    usage = {
        **IMAGE_GEN,
        "cached_tokens": 1000,
        "cached_tokens_details": {"cached_image_tokens": 950, "cached_text_tokens": 50},
    }
    ANSWERS[model] = response(model, {**TOOL_USAGE, "image_gen": usage})
    answered = ask(service, model, {"type": "image_generation", "model": "gpt-image-1"}, stream)
    assert answered.tool_usage.image_gen.cached_tokens_details.cached_image_tokens == 950
    # In: 1,500 image tokens (950 of them cached) and 100 of text (50 cached). Out: 4,160 image tokens.
    billed = (50 * 5.0 + 550 * 10.0 + 50 * 1.25 + 950 * 2.5 + 4160 * 40.0) / 1e6
    check_cost(service, model, TEXT_COST + billed, unpriced=0)


def test_a_table_without_a_cached_image_price_charges_what_it_charged() -> None:
    """``cache_read_image`` defaults to the entry's ``cache_read``: a table written before it prices the tool's cached
    image tokens as it did when they were not read apart (all cache reads at ``cache_read``), to the bit."""
    from llm_telemetry.pricing import PricingTable
    from llm_telemetry.record import LLMCall

    def cost(entry: dict[str, float], cached_image: int) -> float | None:
        table = PricingTable({"gpt-5": {"input": 1.25, "output": 10.0}, "gpt-image-1": entry})
        call = LLMCall("chat", "openai", start=0.0, request_model="gpt-5", input_tokens=100, output_tokens=40)
        call.image_tool_usage = (1600, 1000, 0, 0, 4160, (0, 550), (0, 4160), cached_image)
        call.image_tool_model = "gpt-image-1"
        return table.cost(call)

    before = {"input": 5.0, "output": 40.0, "cache_read": 1.25, "input_image": 10.0}
    assert cost(before, 950) == cost(before, 0)
    assert cost({**before, "cache_read_image": 2.5}, 950) == pytest.approx(cost(before, 0) + 950 * 1.25 / 1e6)


@pytest.mark.parametrize(("before", "priced"), [(255, True), (256, False)], ids=["on-the-bound", "past-it"])
def test_the_image_tool_is_looked_for_among_the_requests_first_256_tools(
    service: Service, before: int, priced: bool
) -> None:
    """The bound of docs/metrics.md: a request's 256th tool is read, the 257th is not (its tokens are unpriced)."""
    model = f"gpt-5-draws-after-{before}-tools"
    ANSWERS[model] = response(model, TOOL_USAGE)
    functions = [{"type": "function", "name": f"f{n}", "parameters": {}, "strict": False} for n in range(before)]
    tools = [*functions, {"type": "image_generation", "model": "gpt-image-1.5"}]
    answered = httpx.post(f"{service.base}/v1/responses", json={"model": model, "input": "?", "tools": tools})
    assert answered.status_code == 200
    check_cost(service, model, TEXT_COST + (IMAGE_COST if priced else 0), unpriced=0 if priced else 1600 + 4160)


HOSTILE = {
    "negative": ({**IMAGE_GEN, "input_tokens": -1600, "output_tokens": -4160}, 0.0, 0),
    "huge": ({**IMAGE_GEN, "input_tokens": 10**400, "output_tokens": 2**60}, 0.0, 0),
    "strings": ({**IMAGE_GEN, "input_tokens": "1600", "output_tokens": True}, 0.0, 0),
    "no-details": ({"input_tokens": 1600, "output_tokens": 4160}, (1600 * 5.0 + 4160 * 32.0) / 1e6, 0),
    "details-too-large": (
        {**IMAGE_GEN, "input_tokens_details": {"image_tokens": 2**53, "text_tokens": -5},
         "output_tokens_details": {"image_tokens": "x", "text_tokens": 2**53}, "cached_tokens": 2**53},
        (1600 * 5.0 + 4160 * 10.0) / 1e6, 0),
    "most": ({"input_tokens": 2**53, "output_tokens": 2**53}, (2**53 * 5.0 + 2**53 * 32.0) / 1e6, 0),
    "not-an-object": ("image_gen", 0.0, 0),
    "list": ([IMAGE_GEN], 0.0, 0),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_image_tool_usage_costs_a_finite_sum_never_below_zero(service: Service, case: str) -> None:
    usage, cost, unpriced = HOSTILE[case]
    model = f"gpt-5-draws-hostile-{case}"
    ANSWERS[model] = response(model, {"image_gen": usage, "web_search": {"num_requests": -3}}, validate=False)
    tools = [{"type": "image_generation", "model": "gpt-image-1.5"}]
    answered = httpx.post(f"{service.base}/v1/responses", json={"model": model, "input": "?", "tools": tools})
    assert answered.status_code == 200
    m = service.metrics(model)
    dollars = m.value("llm_cost_usd_total", gen_ai_request_model=model)
    assert math.isfinite(dollars) and dollars >= 0
    assert dollars == pytest.approx(TEXT_COST + cost, rel=1e-9)
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == unpriced
    assert service.span_cost(model) == pytest.approx(TEXT_COST + cost, rel=1e-9)
    # The rest of the response is read as it was (its status said how it ended).
    assert m.value("llm_finish_reasons_total", gen_ai_request_model=model, llm_finish_reason="stop") == 1
