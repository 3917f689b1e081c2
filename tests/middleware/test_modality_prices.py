"""Audio and image tokens at their own prices (``input_audio``, ``input_image``, ``output_audio``, ``output_image``):
OpenAI prices a spoken chat model's audio tokens at 16 times its text tokens and an image model's image input at
twice its text input, and its usage objects say how many of each a call had. A fake service answers as the real API
does, every body and event built from the official SDK's own types; the client is the official SDK against real
uvicorn; the dollars come from real scrapes, the span's ``llm.cost_usd`` and the request log line. Hypothesis feeds
the readers any detail counts a server may send; the pricing file's new keys are validated as the others are.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai.types import CompletionUsage, ImagesResponse
from openai.types.audio import Transcription, TranscriptionTextDoneEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.image_gen_completed_event import ImageGenCompletedEvent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.config import ConfigurationError
from llm_telemetry.pricing import PricingTable, _tokens_cost
from llm_telemetry.record import LLMCall
from support import Calls, Metrics, free_port, read_stream, request_log_lines, serve, settled, whole_after

#: USD per million tokens. gpt-4o-audio-preview's and gpt-image-1's are OpenAI's list prices (its model pages: text
#: $2.50 in and $10 out, audio $40 in and $80 out; text $5 in, image $10 in and $40 out); the transcription model's
#: are this test's own, as is the image model's price of a text output.
PRICING = {
    "models": {
        "gpt-4o-audio-preview": {"input": 2.5, "output": 10.0, "input_audio": 40.0, "output_audio": 80.0},
        "gpt-image-1": {"input": 5.0, "output": 12.0, "input_image": 10.0, "output_image": 40.0},
        "acme-transcribe": {"input": 2.5, "output": 10.0, "input_audio": 6.0},
        "acme-svg-author": {"input": 1.25, "output": 10.0},
    }
}
CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 800,
    "total_tokens": 2000,
    "prompt_tokens_details": {"audio_tokens": 1000, "cached_tokens": 0, "text_tokens": 200},
    "completion_tokens_details": {"audio_tokens": 700, "reasoning_tokens": 0, "text_tokens": 100},
}
#: What OpenAI's price list charges for CHAT_USAGE: the text and the audio tokens each at their own price.
CHAT_TRUTH = (200 * 2.5 + 1000 * 40 + 100 * 10 + 700 * 80) / 1e6
IMAGE_USAGE = {
    "input_tokens": 1600,
    "output_tokens": 4160,
    "total_tokens": 5760,
    "input_tokens_details": {"image_tokens": 1500, "text_tokens": 100},
}
IMAGE_TRUTH = (100 * 5 + 1500 * 10 + 4160 * 40) / 1e6
#: An image model that also writes text (``output_tokens_details``): the text at the output price.
IMAGE_TEXT_USAGE = {**IMAGE_USAGE, "output_tokens_details": {"image_tokens": 4000, "text_tokens": 160}}
IMAGE_TEXT_TRUTH = (100 * 5 + 1500 * 10 + 4000 * 40 + 160 * 12) / 1e6
TRANSCRIPT_USAGE = {
    "type": "tokens",
    "input_tokens": 620,
    "output_tokens": 30,
    "total_tokens": 650,
    "input_token_details": {"audio_tokens": 600, "text_tokens": 20},
}
TRANSCRIPT_TRUTH = (20 * 2.5 + 600 * 6 + 30 * 10) / 1e6

#: What the service answers, by the model the request names: the content type and the chunks of the body.
ANSWERS: dict[str, tuple[str, list[bytes]]] = {}


def chat_json(model: str, usage: dict[str, Any]) -> bytes:
    message = {
        "role": "assistant",
        "content": None,
        "audio": {"id": "audio_1", "data": "UklGRg==", "expires_at": 2, "transcript": "Hello there"},
    }
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        "usage": usage,
    }
    return ChatCompletion.model_validate(body).model_dump_json(exclude_none=True).encode()


def chat_stream(model: str, usage: dict[str, Any]) -> list[bytes]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = [
        {
            **head,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "audio": {"id": "audio_1", "transcript": "Hello"}}}
            ],
        },
        {**head, "choices": [{"index": 0, "delta": {"audio": {"data": "UklGRg==", "transcript": " there"}}}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": CompletionUsage.model_validate(usage).model_dump(exclude_none=True)},
    ]
    return [
        b"data: " + ChatCompletionChunk.model_validate(c).model_dump_json(exclude_none=True).encode() + b"\n\n"
        for c in chunks
    ] + [b"data: [DONE]\n\n"]


def images_json(usage: dict[str, Any]) -> bytes:
    body = {"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}], "output_format": "png", "usage": usage}
    return ImagesResponse.model_validate(body).model_dump_json(exclude_none=True).encode()


def svg_json(usage: dict[str, Any], svg_usage: dict[str, Any]) -> bytes:
    body = {"created": 1, "data": [{"b64_json": "PHN2Zy8+"}], "output_format": "svg", "usage": usage,
            "svg_usage": svg_usage}  # fmt: skip
    return ImagesResponse.model_validate(body).model_dump_json(exclude_none=True).encode()


def image_stream(usage: dict[str, Any]) -> list[bytes]:
    done = ImageGenCompletedEvent.model_validate(
        {
            "type": "image_generation.completed",
            "b64_json": "iVBORw0KGgo=",
            "background": "auto",
            "created_at": 1,
            "output_format": "png",
            "quality": "low",
            "size": "1024x1024",
            "usage": usage,
        }
    )
    return [b"event: image_generation.completed\ndata: " + done.model_dump_json(exclude_none=True).encode() + b"\n\n"]


def transcript_json(usage: dict[str, Any]) -> bytes:
    return Transcription.model_validate({"text": "hello", "usage": usage}).model_dump_json(exclude_none=True).encode()


def transcript_stream(usage: dict[str, Any]) -> list[bytes]:
    done = TranscriptionTextDoneEvent.model_validate({"type": "transcript.text.done", "text": "hello", "usage": usage})
    return [b"event: transcript.text.done\ndata: " + done.model_dump_json(exclude_none=True).encode() + b"\n\n"]


async def _chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0.001)
        yield chunk


async def answer(request: Request) -> Response:
    if request.headers.get("content-type", "").startswith("multipart/"):
        # (The app's own reading of the form, apart from the middleware's: the part named "model".)
        found = re.search(rb'name="model"\r\n\r\n([^\r]*)\r\n', await request.body())
        assert found is not None
        model = found.group(1).decode()
    else:
        model = (await request.json())["model"]
    media, chunks = ANSWERS[model]
    return StreamingResponse(_chunks(chunks), media_type=media)


class Service:
    def __init__(self, base: str, port: int, calls: Calls, spans: InMemorySpanExporter) -> None:
        self.base, self.port, self.calls, self.spans = base, port, calls, spans
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)

    def cost(self, model: str) -> float:
        """The scraped ``llm_cost_usd_total`` of ``model``, once its call is recorded; the span's ``llm.cost_usd``
        and the call's ``cost_usd`` (which the request log line carries) must say the same."""

        def recorded(m: Metrics) -> None:
            assert m.value("llm_requests_total", gen_ai_request_model=model) == 1
            assert any(c.request_model == model for c in self.calls.ended)

        settled(self.port, recorded)
        m = whole_after(self.port)
        assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == 0
        scraped = m.value("llm_cost_usd_total", gen_ai_request_model=model)
        (call,) = [c for c in self.calls.ended if c.request_model == model]
        (span,) = [
            s
            for s in self.spans.get_finished_spans()
            if (s.attributes or {}).get("gen_ai.request.model") == model and "llm.cost_usd" in (s.attributes or {})
        ]
        assert call.cost_usd == pytest.approx(scraped) and span.attributes["llm.cost_usd"] == pytest.approx(scraped)
        return scraped


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    port, calls, spans = free_port(), Calls(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    paths = ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/audio/transcriptions")
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route(path, answer, methods=["POST"]) for path in paths]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing=PRICING,
        observers=[calls],
        tracer_provider=provider,
    )
    with serve(app) as base:
        yield Service(base, port, calls, spans)
    if app._telemetry is not None:
        app._telemetry.shutdown()
    provider.shutdown()


# --- through the SDK ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_spoken_chat_answers_audio_tokens_are_priced_at_the_audio_price(service: Service, stream: bool) -> None:
    """A prompt of 1,000 audio tokens and an answer of 700, to gpt-4o-audio-preview: $0.0975 at OpenAI's prices.
    At the text price alone (what a table without audio prices charges, and all the middleware charged before) it
    was $0.011, a ninth of the bill."""
    model = f"gpt-4o-audio-preview-{stream}"
    if stream:
        ANSWERS[model] = ("text/event-stream", chat_stream(model, CHAT_USAGE))
        events = list(
            service.client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                modalities=["text", "audio"],
                audio={"voice": "alloy", "format": "pcm16"},
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert events[-1].usage is not None and events[-1].usage.prompt_tokens_details is not None
        assert events[-1].usage.prompt_tokens_details.audio_tokens == 1000
    else:
        ANSWERS[model] = ("application/json", [chat_json(model, CHAT_USAGE)])
        answer = service.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "wav"},
        )
        assert answer.choices[0].message.audio is not None
    assert service.cost(model) == pytest.approx(CHAT_TRUTH)
    # The tokens are counted as before: all input and all output, whatever their modality.
    m = whole_after(service.port)
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="input") == 1200
    assert m.value("llm_tokens_total", gen_ai_request_model=model, gen_ai_token_type="output") == 800


@pytest.mark.parametrize(
    ("case", "usage", "truth"),
    [
        ("json", IMAGE_USAGE, IMAGE_TRUTH),
        ("stream", IMAGE_USAGE, IMAGE_TRUTH),
        ("text-output", IMAGE_TEXT_USAGE, IMAGE_TEXT_TRUTH),
        ("edit", IMAGE_USAGE, IMAGE_TRUTH),
    ],
)
def test_an_images_image_tokens_are_priced_at_the_image_prices(
    service: Service, case: str, usage: dict[str, Any], truth: float
) -> None:
    """An image's input image tokens at the image input price, its text at the text price, its output (the image,
    unless ``output_tokens_details`` counts text in it) at the image output price."""
    model = f"gpt-image-1-{case}"
    if case == "stream":
        ANSWERS[model] = ("text/event-stream", image_stream(usage))
        events = list(service.client.images.generate(model=model, prompt="a red fox", stream=True))
        assert events[-1].type == "image_generation.completed"
    elif case == "edit":
        ANSWERS[model] = ("application/json", [images_json(usage)])
        service.client.images.edit(model=model, prompt="add a hat", image=("fox.png", b"\x89PNG" + bytes(3000)))
    else:
        ANSWERS[model] = ("application/json", [images_json(usage)])
        assert service.client.images.generate(model=model, prompt="a red fox").usage is not None
    assert service.cost(model) == pytest.approx(truth)


#: The tokens of the model that wrote an SVG image, which the answer reports apart from the image's usage.
SVG_USAGE = {"model": "acme-svg-author", "input_tokens": 900, "output_tokens": 3000, "reasoning_tokens": 1000,
             "total_tokens": 3900}  # fmt: skip


@pytest.mark.parametrize("large", [False, True])
def test_an_svg_images_author_model_tokens_are_priced_at_its_prices(service: Service, large: bool) -> None:
    """An SVG image (``output_format: svg``) is written by a text model the request names (``svg.model``); the
    answer's ``svg_usage`` reports its tokens apart from the image's ``usage``, and it bills them at that model's
    prices: they are priced at its entry, on top of the image's tokens, in an answer read whole or too large to be."""
    model = f"gpt-image-1-svg-{large}"
    body = svg_json(IMAGE_USAGE, SVG_USAGE)
    if large:
        # (A reference image before the usage, past the 8 MB an answer is read whole up to.)
        body = body.replace(b'"data":[', b'"data":[{"b64_json":"' + b"A" * 9_000_000 + b'"},', 1)
    ANSWERS[model] = ("application/json", [body])
    answer = service.client.images.generate(
        model=model, prompt="a red fox", output_format="svg", extra_body={"svg": {"model": "acme-svg-author"}}
    )
    assert answer.svg_usage is not None and answer.svg_usage.output_tokens == 3000
    assert service.cost(model) == pytest.approx(IMAGE_TRUTH + (900 * 1.25 + 3000 * 10.0) / 1e6)


def test_an_svg_author_model_without_a_price_is_unpriced_tokens(service: Service) -> None:
    model = "gpt-image-1-svg-unpriced"
    ANSWERS[model] = ("application/json", [svg_json(IMAGE_USAGE, {**SVG_USAGE, "model": "acme-unknown-author"})])
    service.client.images.generate(model=model, prompt="a red fox", output_format="svg")

    def recorded(m: Metrics) -> None:
        assert m.value("llm_requests_total", gen_ai_request_model=model) == 1

    settled(service.port, recorded)
    m = whole_after(service.port)
    assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == pytest.approx(IMAGE_TRUTH)
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == 3900


@pytest.mark.parametrize("stream", [False, True])
def test_a_transcriptions_audio_tokens_are_priced_at_the_audio_price(service: Service, stream: bool) -> None:
    """A transcription's usage spells its details ``input_token_details``: its audio tokens at the audio price."""
    model = f"acme-transcribe-{stream}"
    audio = ("hello.wav", b"RIFF" + bytes(4000), "audio/wav")
    if stream:
        ANSWERS[model] = ("text/event-stream", transcript_stream(TRANSCRIPT_USAGE))
        events = list(service.client.audio.transcriptions.create(model=model, file=audio, stream=True))
        assert events[-1].type == "transcript.text.done"
    else:
        ANSWERS[model] = ("application/json", [transcript_json(TRANSCRIPT_USAGE)])
        assert service.client.audio.transcriptions.create(model=model, file=audio).text == "hello"
    assert service.cost(model) == pytest.approx(TRANSCRIPT_TRUTH)


def test_a_table_without_modality_prices_charges_what_it_charged_before() -> None:
    """An existing table means what it meant: without ``input_audio`` and the rest, every token is at the plain
    input or output price, as the usage's totals (this is what each call cost before the modality prices)."""
    table = PricingTable({"gpt-4o-audio-preview": {"input": 2.5, "output": 10.0, "cache_read": 1.25}})
    call = read_json("openai.chat", chat_json("gpt-4o-audio-preview", CHAT_USAGE))
    assert (call.input_audio_tokens, call.output_audio_tokens) == (1000, 700)
    assert table.cost(call) == pytest.approx((1200 * 2.5 + 800 * 10) / 1e6)
    price = table.price("gpt-4o-audio-preview")
    assert price is not None
    assert (price.input_audio, price.input_image, price.output_audio, price.output_image) == (2.5, 2.5, 10.0, 10.0)


def test_cache_reads_keep_their_price_and_the_modalities_share_the_rest() -> None:
    """Cached input is priced at ``cache_read`` whatever it holds; the audio and image tokens are of the rest."""
    table = PricingTable({"m": {"input": 1, "output": 2, "cache_read": 0.5, "input_audio": 10, "input_image": 4}})
    call = LLMCall(
        "chat",
        "openai",
        start=0.0,
        request_model="m",
        input_tokens=1000,
        cache_read_tokens=400,
        input_audio_tokens=500,
        input_image_tokens=300,
        output_tokens=0,
    )
    # Fresh input 600: 500 audio, then the 100 the audio leaves of it as image tokens, no text.
    assert table.cost(call) == pytest.approx((400 * 0.5 + 500 * 10 + 100 * 4) / 1e6)


# --- any counts a server may send -----------------------------------------------------------------------------------


def read_json(api: str, body: bytes) -> LLMCall:
    from llm_telemetry.apis import APIS

    spec = APIS[api]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.reader(call, stream=False)
    reader.feed(body, now=1.0)
    reader.finish(now=2.0)
    return call


#: Values a server may put where a count belongs.
counts = st.one_of(
    st.none(),
    st.integers(0, 5000),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**53, 2**53 + 1, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
)


def details(*keys: str) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries({}, optional=dict.fromkeys(keys, counts)) | counts


chat_usages = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": counts,
        "completion_tokens": counts,
        "prompt_tokens_details": details("audio_tokens", "image_tokens", "cached_tokens", "text_tokens"),
        "completion_tokens_details": details("audio_tokens", "reasoning_tokens", "text_tokens"),
    },
)
media_usages = st.fixed_dictionaries(
    {},
    optional={
        "input_tokens": counts,
        "output_tokens": counts,
        "input_tokens_details": details("image_tokens", "text_tokens", "audio_tokens"),
        "input_token_details": details("audio_tokens", "text_tokens"),
        "output_tokens_details": details("image_tokens", "text_tokens", "audio_tokens"),
    },
)
#: Prices from nothing to far above any list's, each kind apart.
prices = st.fixed_dictionaries(
    {"input": st.sampled_from([0.0, 0.1, 2.5, 1e6]), "output": st.sampled_from([0.0, 10.0, 1e6])},
    optional={
        kind: st.sampled_from([0.0, 0.05, 40.0, 1e6])
        for kind in ("cache_read", "input_audio", "input_image", "output_audio", "output_image")
    },
)


def body_of(api: str, usage: dict[str, Any], stream: bool) -> list[bytes]:
    if api == "openai.chat":
        if not stream:
            return [
                json.dumps(
                    {"id": "c", "object": "chat.completion", "model": "m", "choices": [], "usage": usage}
                ).encode()
            ]
        return [
            b"data: "
            + json.dumps(
                {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": usage}
            ).encode()
            + b"\n\n",
            b"data: [DONE]\n\n",
        ]
    if not stream:
        return [json.dumps({"created": 1, "usage": usage}).encode()]
    kind = "image_generation.completed" if api == "openai.images" else "transcript.text.done"
    return [f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, "usage": usage}).encode() + b"\n\n"]


@settings(max_examples=300, deadline=None)
@example(
    api="openai.chat",
    usage={
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "prompt_tokens_details": {"audio_tokens": 40, "image_tokens": 40},
        "completion_tokens_details": {"audio_tokens": 2**53},
    },
    price={"input": 0.0, "output": 0.0, "input_audio": 1e6, "input_image": 1e6, "output_audio": 1e6},
    stream=False,
)
@example(
    api="openai.images",
    usage={
        "input_tokens": 7,
        "output_tokens": 3,
        "input_tokens_details": {"image_tokens": 9, "text_tokens": 1},
        "output_tokens_details": {"image_tokens": None, "text_tokens": 1},
    },
    price={"input": 1e6, "output": 1e6, "input_image": 0.0, "output_image": 0.0},
    stream=True,
)
@given(
    api=st.sampled_from(["openai.chat", "openai.images", "openai.transcriptions"]),
    usage=st.one_of(chat_usages, media_usages),
    price=prices,
    stream=st.booleans(),
)
def test_any_detail_counts_price_finite_non_negative_dollars_within_their_totals(
    api: str, usage: dict[str, Any], price: dict[str, float], stream: bool
) -> None:
    """Detail counts missing, null, negative, huge, of the wrong type, or adding up to more than their total (a server
    reporting more audio tokens than prompt tokens): each modality count is a whole number within its total (the
    image count within what the audio count leaves), and the cost is finite, at least zero, and at most the tokens
    the totals report at the highest price of the entry."""
    body = body_of(api, usage, stream)
    call = read_stream(api, body, None) if stream else read_json(api, body[0])
    parts = (
        (call.input_tokens, call.input_audio_tokens, call.input_image_tokens),
        (call.output_tokens, call.output_audio_tokens, call.output_image_tokens),
    )
    for total, audio, image in parts:
        for count in (audio, image):
            assert count is None or (type(count) is int and count >= 0), count
        if total is None:
            assert audio is None and image is None
        else:
            assert (audio or 0) + (image or 0) <= total, (total, audio, image)
    call.request_model = "m"
    table = PricingTable({"m": price})
    cost = table.cost(call)
    if call.input_tokens is None and call.output_tokens is None:
        assert cost is None
        return
    entry = table.price("m")
    assert entry is not None and cost is not None and math.isfinite(cost) and cost >= 0, cost
    highest = max(entry.input, entry.output, entry.cache_read, entry.input_audio, entry.input_image,
                  entry.output_audio, entry.output_image)  # fmt: skip
    # (Cache reads are priced as reported, even past the input total: a rule older than the modalities.)
    tokens = max(call.input_tokens or 0, call.cache_read_tokens or 0) + (call.output_tokens or 0)
    assert cost <= tokens * highest / 1e6 * (1 + 1e-9)


#: The token counts of an LLMCall that its cost reads.
COUNT_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "cache_creation_1h_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)


@settings(max_examples=300, deadline=None)
# Audio and image tokens each within their total, together past it, in the input and in the output: the image tokens
# get only what the audio tokens leave, at prices far above the text's.
@example(
    counts={**dict.fromkeys(COUNT_FIELDS), "input_tokens": 10, "input_audio_tokens": 8, "input_image_tokens": 8,
            "output_tokens": 4, "output_audio_tokens": 3, "output_image_tokens": 3},
    price={"input": 0.0, "output": 0.0, "input_audio": 1e6, "input_image": 1e6, "output_audio": 1e6,
           "output_image": 1e6},
)  # fmt: skip
@given(
    counts=st.fixed_dictionaries(
        {field: st.none() | st.integers(0, 2**53) | st.integers(0, 50) for field in COUNT_FIELDS}
    ),
    price=prices,
)
def test_the_cost_of_any_counts_is_finite_non_negative_and_bounded_by_the_totals(
    counts: dict[str, int | None], price: dict[str, float]
) -> None:
    """The pricing holds without the readers' bounds too (a call an observer or another reader fills): parts larger
    than their totals price no more tokens than the totals, at any prices."""
    table = PricingTable({"m": price})
    cost = table.cost(LLMCall("chat", "openai", start=0.0, request_model="m", **counts))
    if counts["input_tokens"] is None and counts["output_tokens"] is None:
        assert cost is None
        return
    entry = table.price("m")
    assert entry is not None and cost is not None and math.isfinite(cost) and cost >= 0
    highest_in = max(
        entry.input,
        entry.cache_read,
        entry.cache_creation,
        entry.cache_creation_1h,
        entry.input_audio,
        entry.input_image,
    )
    highest_out = max(entry.output, entry.output_audio, entry.output_image)
    # (Cache reads and writes are priced as reported, even past the input total: a rule older than the modalities.)
    cached = (counts["cache_read_tokens"] or 0) + (counts["cache_creation_tokens"] or 0)
    tokens = max(counts["input_tokens"] or 0, cached)
    bound = (tokens * highest_in + (counts["output_tokens"] or 0) * highest_out) / 1e6
    assert cost <= bound * (1 + 1e-9), (cost, bound)


@settings(max_examples=300, deadline=None)
@given(
    counts=st.tuples(*[st.integers(0, 2**53) | st.integers(0, 50) for _ in range(5)]),
    price=prices.map(lambda entry: {**entry, "cache_creation": 3.75, "cache_creation_1h": 5.0}),
)
def test_a_text_calls_cost_is_the_full_sum_with_zero_audio_and_image_tokens(
    counts: tuple[int, int, int, int, int], price: dict[str, float]
) -> None:
    """A call without audio or image tokens (most calls) is priced without the modalities' terms, which take as many
    instructions again: its cost is the full sum's with zero such tokens, bit for bit, whatever the other counts."""
    entry = PricingTable({"m": price}).price("m")
    assert entry is not None
    no_parts = tuple([0, 0])  # (zero tokens, but not the default: the full sum)
    assert _tokens_cost(entry, *counts) == _tokens_cost(entry, *counts, no_parts, no_parts)


# --- the pricing file's new keys ------------------------------------------------------------------------------------

MODALITY_KINDS = ("input_audio", "input_image", "output_audio", "output_image")


@pytest.mark.parametrize("kind", MODALITY_KINDS)
@pytest.mark.parametrize("value", ["-1", ".nan", ".inf", "true", "'40'", "[40]", "1" + "0" * 400])
def test_a_wrong_modality_price_fails_at_startup_naming_it(tmp_path: Path, kind: str, value: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(f"models:\n  gpt-4o-audio-preview: {{input: 2.5, output: 10, {kind}: {value}}}\n")
    with pytest.raises(ConfigurationError, match=f"'gpt-4o-audio-preview': {kind} must be a non-negative number"):
        PricingTable(path)


def test_a_misspelt_modality_price_is_refused_and_the_allowed_keys_named(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"gpt-image-1": {"input": 5, "output": 40, "image_input": 10}}}))
    with pytest.raises(ConfigurationError, match=r"unknown keys \['image_input'\]") as raised:
        PricingTable(path)
    assert all(kind in str(raised.value) for kind in MODALITY_KINDS)


def test_modality_prices_are_read_from_a_file_and_zero_is_a_price(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "models:\n  m: {input: 1, output: 2, input_audio: 0, input_image: 3, output_audio: 4.5, output_image: 0}\n"
    )
    price = PricingTable(path).price("m-2025-01-01")
    assert price is not None
    assert (price.input_audio, price.input_image, price.output_audio, price.output_image) == (0.0, 3.0, 4.5, 0.0)


def test_the_request_log_line_carries_the_modality_priced_cost(service: Service) -> None:
    model = "gpt-4o-audio-preview-logged"
    ANSWERS[model] = ("application/json", [chat_json(model, CHAT_USAGE)])
    with request_log_lines() as lines:
        service.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        service.cost(model)
    (line,) = [json.loads(x) for x in lines.getvalue().splitlines() if json.loads(x).get("model") == model]
    assert line["cost_usd"] == pytest.approx(CHAT_TRUTH)
