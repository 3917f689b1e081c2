"""The Responses API's SVG images in the cost. The image generation tool can make an SVG image (``output_format:
svg``), which a text model writes; each ``image_generation_call`` item then carries that model's tokens in its
``svg_usage`` (the official SDK's ``ImageGenerationCall.svg_usage``: ``model``, ``input_tokens``, ``output_tokens``,
``reasoning_tokens``), apart from the response's ``usage`` and the tool's ``tool_usage``. They were not read: a
response with two such images read $0.000525 (its text model's tokens) for a call billed $0.009125.

Each item's tokens are priced once at the prices of the model it names: a stream sends the item in its
``response.output_item.done`` event and again in ``response.completed``; an answer too large to read whole (a large
image beside them) is read from its last 64 KiB, as its usage is. A fake service answers as the API does, each body
and event validated by the official SDK's own types; the client is the official SDK against real uvicorn; the dollars
are read from real scrapes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import Calls, Metrics, free_port, serve, settled, whole_after

#: USD per million tokens: the text model and the SVG author (OpenAI's list prices for gpt-5 and gpt-5-mini).
PRICING = {"gpt-5": {"input": 1.25, "output": 10.0}, "gpt-5-mini": {"input": 0.25, "output": 2.0}}
TEXT_USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 140,
}
TEXT_COST = (100 * 1.25 + 40 * 10.0) / 1e6


def svg_item(item_id: str, model: str, tokens: tuple[int, int], result: str = "PHN2Zz4=") -> dict[str, Any]:
    usage = {"model": model, "input_tokens": tokens[0], "output_tokens": tokens[1], "reasoning_tokens": tokens[1] // 3,
             "total_tokens": sum(tokens)}  # fmt: skip
    return {"type": "image_generation_call", "id": item_id, "status": "completed", "result": result,
            "output_format": "svg", "svg_usage": usage}  # fmt: skip


SVG_A = svg_item("ig_a", "gpt-5-mini", (500, 3000))
SVG_B = svg_item("ig_b", "gpt-5-mini", (300, 1200))
COST_A, COST_B = (500 * 0.25 + 3000 * 2.0) / 1e6, (300 * 0.25 + 1200 * 2.0) / 1e6
#: A PNG image (no SVG author) large enough that its stream events are past what is read whole (1 MiB).
PNG = {"type": "image_generation_call", "id": "ig_png", "status": "completed", "result": "iVBO" * (3 * 2**18),
       "output_format": "png"}  # fmt: skip
MESSAGE = {
    "type": "message",
    "id": "msg_1",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "Here they are.", "annotations": []}],
}

#: What the service answers, by the request's model: the response's output items.
ANSWERS: dict[str, list[dict[str, Any]]] = {}
_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def response(model: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "id": "resp_svg", "object": "response", "created_at": 1, "model": model, "status": "completed",
        "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [{"type": "image_generation", "output_format": "svg"}], "usage": TEXT_USAGE,
    }  # fmt: skip
    return Response.model_validate(body).model_dump(mode="json", exclude_unset=True)


def _event(data: dict[str, Any], number: int) -> bytes:
    event = _EVENT.validate_python({**data, "sequence_number": number}).model_dump(mode="json", exclude_unset=True)
    return f"event: {data['type']}\ndata: {json.dumps(event)}\n\n".encode()


async def _stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The events of a response making images: each item added (in progress, without its image or usage), then done
    (whole), then the text, then ``response.completed`` repeating every item."""
    number = 0
    yield _event(
        {"type": "response.created", "response": {**body, "status": "in_progress", "output": [], "usage": None}}, number
    )
    for index, item in enumerate(body["output"]):
        if item["type"] == "message":
            for kind, data in [
                ("response.output_item.added", {"item": {**item, "status": "in_progress", "content": []}}),
                (
                    "response.output_text.delta",
                    {"item_id": item["id"], "content_index": 0, "delta": "Here they are.", "logprobs": []},
                ),
                ("response.output_item.done", {"item": item}),
            ]:
                number += 1
                yield _event({"type": kind, "output_index": index, **data}, number)
            continue
        started = {key: value for key, value in item.items() if key not in ("result", "svg_usage")}
        number += 1
        yield _event({"type": "response.output_item.added", "output_index": index,
                      "item": {**started, "status": "in_progress"}}, number)  # fmt: skip
        await asyncio.sleep(0.002)
        number += 1
        yield _event({"type": "response.output_item.done", "output_index": index, "item": item}, number)
    number += 1
    yield _event({"type": "response.completed", "response": body}, number)


async def answer(request: Request) -> HTTPResponse:
    sent = await request.json()
    body = response(sent["model"], ANSWERS[sent["model"]])
    if sent.get("stream"):
        return StreamingResponse(_stream(body), media_type="text/event-stream")
    return JSONResponse(body)


class Service:
    def __init__(self, base: str, port: int, calls: Calls) -> None:
        self.base, self.port, self.calls = base, port, calls

    def ask(self, model: str, output: list[dict[str, Any]], stream: bool) -> list[Any]:
        """The output items the official SDK returns (streamed: those ``response.completed`` carries)."""
        ANSWERS[model] = output
        client = openai.OpenAI(base_url=self.base + "/v1", api_key="sk-test", max_retries=0)
        tools: Any = [{"type": "image_generation", "output_format": "svg"}]
        if not stream:
            return list(client.responses.create(model=model, input="Draw two cats", tools=tools).output)
        with client.responses.create(model=model, input="Draw two cats", tools=tools, stream=True) as events:
            last = list(events)[-1]
        assert last.type == "response.completed"
        return list(last.response.output)

    def metrics(self, model: str) -> Metrics:
        def recorded(m: Metrics) -> None:
            assert m.value("llm_requests_total", gen_ai_request_model=model) == 1
            assert any(c.request_model == model for c in self.calls.ended)

        settled(self.port, recorded)
        return whole_after(self.port)

    def check(self, model: str, cost: float, unpriced: int = 0) -> None:
        m = self.metrics(model)
        assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == pytest.approx(cost, rel=1e-9)
        assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == unpriced
        # (The author's tokens are another model's: not this call's tokens, as the image tool's are not.)
        assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 40
        (call,) = [c for c in self.calls.ended if c.request_model == model]
        assert call.cost_usd == pytest.approx(cost, rel=1e-9)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    port, calls = free_port(), Calls()
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/responses", answer, methods=["POST"])]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing=PRICING,
        observers=[calls],
    )
    try:
        with serve(app) as base:
            yield Service(base, port, calls)
    finally:
        if app._telemetry is not None:
            app._telemetry.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_each_svg_images_author_tokens_are_priced_once_at_its_models_prices(service: Service, stream: bool) -> None:
    model = f"gpt-5-svg-{stream}"
    output = service.ask(model, [SVG_A, SVG_B, MESSAGE], stream)
    assert [item.svg_usage.output_tokens for item in output[:2]] == [3000, 1200]
    # Before: TEXT_COST alone (0.000525 USD; with the two authors' 0.0086, 0.009125).
    service.check(model, TEXT_COST + COST_A + COST_B)


@pytest.mark.parametrize("png_first", [False, True], ids=["png-last", "png-first"])
def test_a_stream_too_large_to_read_whole_prices_each_svg_image_once(service: Service, png_first: bool) -> None:
    """A large PNG image beside the SVG ones makes its own ``response.output_item.done`` event and the closing
    ``response.completed`` too large to read whole (over 1 MiB): the SVG images' tokens are read from their own
    events. After the SVG items (png-last) the closing event's last bytes hold none of them; before them
    (png-first) they hold both again, which are not counted a second time."""
    model = f"gpt-5-svg-large-{png_first}"
    items = [PNG, SVG_A, SVG_B] if png_first else [SVG_A, SVG_B, PNG]
    output = service.ask(model, [*items, MESSAGE], stream=True)
    assert len(output[2 if png_first else 0].model_dump_json()) > 0 and len(PNG["result"]) > 2**20
    service.check(model, TEXT_COST + COST_A + COST_B)


def test_an_svg_image_whose_own_events_are_too_large_is_priced_from_the_closing_events_tail(service: Service) -> None:
    """An SVG image large enough that its ``response.output_item.done`` is not read whole either: its tokens are
    read from the last 64 KiB of ``response.completed``, where its item ends, as the usage is."""
    model = "gpt-5-svg-large-item"
    large = svg_item("ig_large", "gpt-5-mini", (500, 3000), result="PHN2" * (3 * 2**18))
    service.ask(model, [large, MESSAGE], stream=True)
    service.check(model, TEXT_COST + COST_A)


def test_a_json_answer_too_large_to_read_whole_prices_the_svg_images_in_its_tail(service: Service) -> None:
    """Past the 8 MiB a JSON answer is read whole: the SVG items that end in its last 64 KiB are priced, each once."""
    model = "gpt-5-svg-large-json"
    huge = {**PNG, "result": "iVBO" * (9 * 2**18)}
    service.ask(model, [huge, SVG_A, SVG_B, MESSAGE], stream=False)
    service.check(model, TEXT_COST + COST_A + COST_B)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_svg_author_without_a_price_is_unpriced_tokens(service: Service, stream: bool) -> None:
    model = f"gpt-5-svg-unpriced-{stream}"
    service.ask(model, [SVG_A, svg_item("ig_c", "acme-svg-author", (200, 900)), MESSAGE], stream)
    service.check(model, TEXT_COST + COST_A, unpriced=200 + 900)
