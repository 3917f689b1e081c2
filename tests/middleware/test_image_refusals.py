"""OpenAI's images API refuses a prompt (or an input image) its moderation blocks with ``code: moderation_blocked``:
a 400 whose body is ``{"error": {"code": "moderation_blocked", "type": "image_generation_user_error", ...}}``, or,
in a stream, an ``error`` event. The official SDK against real uvicorn; the error type from real scrapes (a 400's
model is labelled ``other`` unless already in place, so the scrape is read by error type, the call by its model).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import Calls, free_port, scrape, serve, wait_for

#: The refusal reworded, as a gateway in front of OpenAI may word it. (OpenAI's own words, "Your request was rejected
#: by the safety system", name its safety system, and were read as a content filter's by them before the code was.)
WORDED = {"reworded": "Image generation blocked for this prompt.", "empty": ""}


def refusal(message: str) -> dict[str, object]:
    return {"message": message, "type": "image_generation_user_error", "param": None, "code": "moderation_blocked"}


async def images(request: Request) -> Response:
    model = json.loads(await request.body())["model"]
    wording, _, kind = model.removeprefix("gpt-image-1-").partition("-")
    error = refusal(WORDED[wording])
    if kind == "json":
        return Response(json.dumps({"error": error}), status_code=400, media_type="application/json")

    async def events() -> AsyncIterator[bytes]:
        yield b"event: error\ndata: " + json.dumps({"type": "error", "error": error}).encode() + b"\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[openai.OpenAI, int, Calls]]:
    port, calls = free_port(), Calls()
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/images/generations", images, methods=["POST"])]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        observers=[calls],
    )
    with serve(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0), port, calls
    if app._telemetry is not None:
        app._telemetry.shutdown()


@pytest.mark.parametrize("wording", sorted(WORDED))
@pytest.mark.parametrize("kind", ["json", "stream"])
def test_an_image_prompt_the_moderation_blocks_is_a_content_filter_refusal(
    service: tuple[openai.OpenAI, int, Calls], wording: str, kind: str
) -> None:
    """By its code, whatever its message says: reworded, it was counted as ``invalid_request`` (a 400) or, as an event
    of a stream that had answered 200, ``server_error``, which the availability alerts count against the service."""
    client, port, calls = service
    model = f"gpt-image-1-{wording}-{kind}"
    refused = scrape(port).value("llm_requests_total", error_type="content_filter")
    if kind == "json":
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.generate(model=model, prompt="a fox")
        assert raised.value.code == "moderation_blocked"
    else:
        with pytest.raises(openai.APIError):
            list(client.images.generate(model=model, prompt="a fox", stream=True))

    call = wait_for("the call", lambda: next((c for c in calls.ended if c.request_model == model), None))
    assert call.error_type == "content_filter"
    wait_for(
        "the refusal's count",
        lambda: scrape(port).value("llm_requests_total", error_type="content_filter") == refused + 1,
    )
