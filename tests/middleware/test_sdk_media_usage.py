"""The token usage of OpenAI's image generations and edits (the GPT image models) and of its transcriptions
(``gpt-4o-transcribe``), counted and priced. A fake service answers as the real API does, every body and event built
from the official SDK's own types (the usage last, after the image's base64, as they order it); the client is the
official SDK against real uvicorn, the metrics come from real scrapes, the finished calls from the public
``observers`` hook. The readers are also fed the same streams cut at any byte (hypothesis), as a proxy may cut them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import ImagesResponse
from openai.types.audio import Transcription, TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent
from openai.types.image_edit_completed_event import ImageEditCompletedEvent
from openai.types.image_gen_completed_event import ImageGenCompletedEvent
from openai.types.image_gen_partial_image_event import ImageGenPartialImageEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import form_fields
from llm_telemetry.record import LLMCall
from support import Calls, Metrics, free_port, read_stream, serve, settled, whole_after

#: USD per million tokens. An entry of a table of one's own prices every model it prefixes (followed by ``-``): each
#: test's model is ``gpt-image-1-<test>``, priced as ``gpt-image-1``, its series its own.
PRICING = {
    "models": {
        "gpt-image-1": {"input": 10.0, "output": 40.0},
        "gpt-4o-transcribe": {"input": 6.0, "output": 10.0},
    }
}
IMAGE_USAGE = {
    "input_tokens": 50,
    "output_tokens": 4160,
    "total_tokens": 4210,
    "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
}
TRANSCRIPT_USAGE = {
    "type": "tokens",
    "input_tokens": 120,
    "output_tokens": 30,
    "total_tokens": 150,
    "input_token_details": {"audio_tokens": 110, "text_tokens": 10},
}
#: What the service answers, by the model the request names: the content type and the chunks of the body.
ANSWERS: dict[str, tuple[str, list[bytes]]] = {}
#: The models whose stream stops after its first event, until the client leaves.
STALLED: set[str] = set()


def b64(size: int) -> str:
    """An image's base64 of ``size`` characters (random bytes: a real image does not compress either)."""
    return base64.b64encode(random.Random(size).randbytes(size * 3 // 4)).decode()


def images_body(image: str, usage: dict[str, Any] | None) -> bytes:
    body = {"created": 1, "data": [{"b64_json": image}], "output_format": "png", "size": "1024x1024"}
    if usage is not None:
        body["usage"] = usage
    return ImagesResponse.model_validate(body).model_dump_json(exclude_none=True).encode()


def event(model: Any) -> bytes:
    return f"event: {model.type}\n".encode() + b"data: " + model.model_dump_json(exclude_none=True).encode() + b"\n\n"


def image_stream(image: str, usage: dict[str, Any], partials: int = 2, edit: bool = False) -> list[bytes]:
    common = {"background": "auto", "created_at": 1, "output_format": "png", "quality": "low", "size": "1024x1024"}
    chunks = [
        event(
            ImageGenPartialImageEvent.model_validate(
                {**common, "type": "image_generation.partial_image", "b64_json": b64(4000), "partial_image_index": i}
            )
        )
        for i in range(partials)
    ]
    done = {**common, "b64_json": image, "usage": usage}
    if edit:
        chunks.append(event(ImageEditCompletedEvent.model_validate({**done, "type": "image_edit.completed"})))
    else:
        chunks.append(event(ImageGenCompletedEvent.model_validate({**done, "type": "image_generation.completed"})))
    return chunks


def transcript_stream(usage: dict[str, Any] | None) -> list[bytes]:
    done: dict[str, Any] = {"type": "transcript.text.done", "text": "hello there"}
    if usage is not None:
        done["usage"] = usage
    return [
        event(TranscriptionTextDeltaEvent(type="transcript.text.delta", delta="hello")),
        event(TranscriptionTextDeltaEvent(type="transcript.text.delta", delta=" there")),
        event(TranscriptionTextDoneEvent.model_validate(done)),
    ]


async def _chunks(model: str, chunks: list[bytes]) -> AsyncIterator[bytes]:
    for i, chunk in enumerate(chunks):
        await asyncio.sleep(0.001)
        yield chunk
        if model in STALLED and i == 0:
            await asyncio.sleep(60)  # (until the client leaves: Starlette cancels the response then)


async def answer(request: Request) -> Response:
    if request.headers.get("content-type", "").startswith("multipart/"):
        # (The app's own reading of the form, apart from the middleware's: the part named "model".)
        found = re.search(rb'name="model"\r\n\r\n([^\r]*)\r\n', await request.body())
        assert found is not None
        model = found.group(1).decode()
    else:
        model = (await request.json())["model"]
    media, chunks = ANSWERS[model]
    return StreamingResponse(_chunks(model, chunks), media_type=media)


class Service:
    def __init__(self, base: str, port: int, calls: Calls) -> None:
        self.base, self.port, self.calls = base, port, calls
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)

    def metrics(self, model: str) -> Metrics:
        def recorded(m: Metrics) -> None:
            assert m.value("llm_requests_total", gen_ai_request_model=model) >= 1
            assert any(c.request_model == model for c in self.calls.ended)

        settled(self.port, recorded)
        return whole_after(self.port)

    def call(self, model: str) -> LLMCall:
        return next(c for c in reversed(self.calls.ended) if c.request_model == model)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    port, calls = free_port(), Calls()
    paths = ("/v1/images/generations", "/v1/images/edits", "/v1/audio/transcriptions")
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route(path, answer, methods=["POST"]) for path in paths]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing=PRICING,
        observers=[calls],
    )
    with serve(app) as base:
        yield Service(base, port, calls)
    if app._telemetry is not None:
        app._telemetry.shutdown()


def assert_counted(m: Metrics, model: str, usage: dict[str, Any], price: dict[str, float], stream: str) -> None:
    labels = {"gen_ai_request_model": model, "gen_ai_operation_name": "generate_content"}
    assert m.value("llm_requests_total", **labels, gen_ai_provider_name="openai", gen_ai_request_stream=stream) == 1
    assert m.series("llm_requests_total", gen_ai_request_model=model)[0].get("error_type", "") == ""
    for kind in ("input", "output"):
        tokens = m.value("llm_tokens_total", **labels, gen_ai_token_type=kind, llm_usage_source="reported")
        assert tokens == usage[f"{kind}_tokens"], kind
    cost = (usage["input_tokens"] * price["input"] + usage["output_tokens"] * price["output"]) / 1e6
    assert m.value("llm_cost_usd_total", **labels) == pytest.approx(cost)
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == 0
    # No first token: an image's or a transcript's waits stay out of the streams' time to first token.
    assert m.value("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model=model) == 0
    assert m.value("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model=model) == 0


IMAGE_PRICE = PRICING["models"]["gpt-image-1"]
TRANSCRIBE_PRICE = PRICING["models"]["gpt-4o-transcribe"]


# --- image generations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1_000, 5_000_000, 9_500_000], ids=["small", "5MB", "past-the-8MiB-read"])
def test_an_image_generations_tokens_and_cost_are_counted_wherever_its_usage_ends(service: Service, size: int) -> None:
    """The usage comes after the image: in a 5 MB answer (read whole) and in one past the 8 MiB a JSON answer is read
    whole (read from its last bytes), it is counted as in a small one, and the SDK gets the image unchanged."""
    model, image = f"gpt-image-1-json-{size}", b64(size)
    ANSWERS[model] = ("application/json", [images_body(image, IMAGE_USAGE)])
    result = service.client.images.generate(model=model, prompt="a red fox")
    assert result.data is not None and result.data[0].b64_json == image
    assert result.usage is not None and result.usage.output_tokens == IMAGE_USAGE["output_tokens"]
    assert_counted(service.metrics(model), model, IMAGE_USAGE, IMAGE_PRICE, "false")


@pytest.mark.parametrize("size", [1_000, 1_500_000], ids=["small", "past-the-1MiB-event"])
def test_a_streamed_image_generations_tokens_are_counted_and_its_stream_is_whole(service: Service, size: int) -> None:
    """``stream=True``: partial images, then ``image_generation.completed`` with the image and the usage. An image of
    1.5 MB makes that event larger than an event is read (1 MiB): its usage is read from its last bytes. The stream
    ends with that event (no ``[DONE]``): it is whole, not an ``incomplete_stream``."""
    model, image = f"gpt-image-1-stream-{size}", b64(size)
    ANSWERS[model] = ("text/event-stream", image_stream(image, IMAGE_USAGE))
    events = list(service.client.images.generate(model=model, prompt="a red fox", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert events[-1].b64_json == image
    assert_counted(service.metrics(model), model, IMAGE_USAGE, IMAGE_PRICE, "true")


def test_an_image_without_usage_counts_the_request_and_no_tokens(service: Service) -> None:
    """DALL-E's answers carry no usage: nothing is estimated (an image says nothing of its tokens)."""
    model = "gpt-image-1-no-usage"
    ANSWERS[model] = ("application/json", [images_body(b64(1000), None)])
    service.client.images.generate(model=model, prompt="a red fox")
    m = service.metrics(model)
    assert m.value("llm_requests_total", gen_ai_request_model=model, gen_ai_operation_name="generate_content") == 1
    assert m.value("llm_tokens_total", gen_ai_request_model=model) == 0
    assert m.value("llm_cost_usd_total", gen_ai_request_model=model) == 0


def test_an_image_stream_its_client_leaves_is_no_abandoned_wait_for_a_first_token(service: Service) -> None:
    """A client that stops reading an image stream after its first partial image: a client_disconnect, and no
    sample of the time to abandonment (which counts against the time-to-first-token objective of the streams)."""
    model = "gpt-image-1-left"
    STALLED.add(model)
    ANSWERS[model] = ("text/event-stream", image_stream(b64(1000), IMAGE_USAGE))
    stream = service.client.images.generate(model=model, prompt="a red fox", stream=True, partial_images=2)
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    stream.close()

    def recorded(m: Metrics) -> None:
        assert m.value("llm_requests_total", gen_ai_request_model=model, error_type="client_disconnect") == 1

    settled(service.port, recorded)
    m = whole_after(service.port)
    assert m.value("llm_server_time_to_abandonment_seconds_count", gen_ai_request_model=model) == 0


# --- image edits: a multipart form ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_image_edits_model_is_read_from_its_form_and_its_tokens_counted(service: Service, stream: bool) -> None:
    model = f"gpt-image-1-edit-{stream}"
    if stream:
        ANSWERS[model] = ("text/event-stream", image_stream(b64(1000), IMAGE_USAGE, partials=0, edit=True))
        events = list(
            service.client.images.edit(
                model=model, prompt="add a hat", image=("fox.png", b"\x89PNG" + bytes(5000), "image/png"), stream=True
            )
        )
        assert events[-1].type == "image_edit.completed"
    else:
        ANSWERS[model] = ("application/json", [images_body(b64(1000), IMAGE_USAGE)])
        service.client.images.edit(model=model, prompt="add a hat", image=("fox.png", b"\x89PNG" + bytes(5000)))
    assert_counted(service.metrics(model), model, IMAGE_USAGE, IMAGE_PRICE, str(stream).lower())


# --- transcriptions -------------------------------------------------------------------------------------------------

AUDIO = ("hello.wav", b"RIFF" + bytes(20_000), "audio/wav")


@pytest.mark.parametrize("stream", [False, True])
def test_a_transcriptions_tokens_and_cost_are_counted(service: Service, stream: bool) -> None:
    model = f"gpt-4o-transcribe-{stream}"
    if stream:
        ANSWERS[model] = ("text/event-stream", transcript_stream(TRANSCRIPT_USAGE))
        events = list(service.client.audio.transcriptions.create(model=model, file=AUDIO, stream=True))
        assert events[-1].type == "transcript.text.done"
    else:
        body = Transcription.model_validate({"text": "hello there", "usage": TRANSCRIPT_USAGE})
        ANSWERS[model] = ("application/json", [body.model_dump_json(exclude_none=True).encode()])
        assert service.client.audio.transcriptions.create(model=model, file=AUDIO).text == "hello there"
    assert_counted(service.metrics(model), model, TRANSCRIPT_USAGE, TRANSCRIBE_PRICE, str(stream).lower())


@pytest.mark.parametrize("budget", [False, True], ids=["past-the-8MiB-read", "no-room-in-the-budget"])
def test_a_recording_too_large_to_read_still_names_its_model_from_the_forms_head(budget: bool) -> None:
    """A form past the 8 MiB a request body is read (a long recording, 12 MB), or one the process's budget for bodies
    kept has no room for: the fields come before the file, and the model is read from the form's first bytes, so its
    tokens are labelled and priced by it (not ``unknown`` and unpriced). The app gets the body unchanged."""
    port, calls = free_port(), Calls()
    received: list[bytes] = []

    async def transcribe(request: Request) -> Response:
        received.append(await request.body())
        body = Transcription.model_validate({"text": "hello there", "usage": TRANSCRIPT_USAGE})
        return Response(body.model_dump_json(exclude_none=True), media_type="application/json")

    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/audio/transcriptions", transcribe, methods=["POST"])]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing=PRICING,
        observers=[calls],
        **({"max_inspected_bytes": 1 << 20} if budget else {}),
    )
    recording = ("long.wav", b"RIFF" + random.Random(3).randbytes(12_000_000), "audio/wav")
    try:
        with serve(app) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
            assert client.audio.transcriptions.create(model="gpt-4o-transcribe", file=recording).text == "hello there"
            service = Service(base, port, calls)
            assert_counted(service.metrics("gpt-4o-transcribe"), "gpt-4o-transcribe", TRANSCRIPT_USAGE,
                           TRANSCRIBE_PRICE, "false")  # fmt: skip
    finally:
        if app._telemetry is not None:
            app._telemetry.shutdown()
    assert recording[1] in received[0]


def test_a_transcription_billed_by_duration_counts_no_tokens(service: Service) -> None:
    """``whisper-1`` reports ``type: duration`` (seconds of audio): no tokens, none estimated from the text."""
    model = "whisper-1"
    body = Transcription.model_validate({"text": "hello there", "usage": {"type": "duration", "seconds": 3}})
    ANSWERS[model] = ("application/json", [body.model_dump_json(exclude_none=True).encode()])
    service.client.audio.transcriptions.create(model=model, file=AUDIO)
    m = service.metrics(model)
    assert m.value("llm_requests_total", gen_ai_request_model=model, gen_ai_operation_name="generate_content") == 1
    assert m.value("llm_tokens_total", gen_ai_request_model=model) == 0
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model=model) == 0


# --- the form's fields ----------------------------------------------------------------------------------------------


def _form(parts: list[tuple[str, bytes, str | None]], boundary: bytes = b"b0undary") -> bytes:
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--" + boundary + f"\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def test_a_forms_model_and_stream_are_read_wherever_they_are_among_its_parts() -> None:
    audio = b"RIFF" + bytes(range(256)) * 100 + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nnot-this'
    assert form_fields(_form([("file", audio, "a.wav"), ("model", b"gpt-4o-transcribe", None)])) == {
        "model": "gpt-4o-transcribe"
    }
    assert form_fields(_form([("stream", b"true", None), ("model", b"m", None)])) == {"stream": True, "model": "m"}
    # A file part named "model" is a file, not the field; a value over 1 KiB is none a client names a model with.
    assert form_fields(_form([("model", b"gpt-image-1", "model.txt")])) == {}
    assert form_fields(_form([("model", b"m" * 1025, None)])) == {}
    assert form_fields(b'{"model": "m"}') is None
    assert form_fields(b"--\r\n") is None


# --- streams cut anywhere -------------------------------------------------------------------------------------------

STREAMS = {
    "image": ("openai.images", b"".join(image_stream(b64(200), IMAGE_USAGE)), IMAGE_USAGE),
    "edit": ("openai.images", b"".join(image_stream(b64(200), IMAGE_USAGE, partials=0, edit=True)), IMAGE_USAGE),
    "transcript": ("openai.transcriptions", b"".join(transcript_stream(TRANSCRIPT_USAGE)), TRANSCRIPT_USAGE),
    # (the image's last event larger than an event is read: its usage from its last bytes)
    "large": ("openai.images", b"".join(image_stream(b64(1_100_000), IMAGE_USAGE, partials=0)), IMAGE_USAGE),
}


def _cut(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(
    kind=st.sampled_from(sorted(STREAMS)),
    cuts=st.lists(st.integers(0, 2**31), max_size=30),
    groups=st.none() | st.lists(st.integers(1, 8), min_size=1, max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_a_media_streams_usage_is_read_however_it_is_cut(kind: str, cuts: list[int], groups: list[int] | None) -> None:
    api, body, usage = STREAMS[kind]
    call = read_stream(api, _cut(body, cuts), groups)
    assert (call.input_tokens, call.output_tokens, call.usage_source) == (
        usage["input_tokens"],
        usage["output_tokens"],
        "reported",
    )
    assert call.first_token_at is None and call.error_type is None


def test_every_byte_boundary_of_an_image_stream_reads_its_usage() -> None:
    """Each cut of the (small) image stream into two pieces, at every byte."""
    api, body, usage = STREAMS["image"]
    for cut in range(len(body) + 1):
        call = read_stream(api, [p for p in (body[:cut], body[cut:]) if p], None)
        assert (call.input_tokens, call.output_tokens) == (usage["input_tokens"], usage["output_tokens"]), cut


def test_an_image_stream_cut_before_its_last_event_is_incomplete() -> None:
    """What makes a stream whole is its last event: cut before it, the stream is cut short (``incomplete_stream``),
    as any other whose closing event never came."""
    from llm_telemetry.apis import APIS

    body = b"".join(image_stream(b64(200), IMAGE_USAGE)[:-1])
    spec = APIS["openai.images"]
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.reader(call, stream=True)
    reader.feed(body, now=1.0)
    reader.finish(now=2.0)
    assert reader.cut_short() and call.input_tokens is None
    whole = b"".join(image_stream(b64(200), IMAGE_USAGE))
    call = LLMCall(spec.operation, spec.provider, start=0.0)
    reader = spec.reader(call, stream=True)
    reader.feed(whole, now=1.0)
    reader.finish(now=2.0)
    assert not reader.cut_short() and reader.closed
    assert json.loads(whole.split(b"data: ")[-1])["usage"]["output_tokens"] == call.output_tokens
