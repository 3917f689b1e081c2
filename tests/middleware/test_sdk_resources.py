"""Every resource method of the official SDKs through the middleware, as a service that is all of OpenAI's or
Anthropic's API sees them: files, uploads, images, audio, moderations, batches, fine-tuning, vector stores,
containers, conversations, evals, realtime secrets, videos, count_tokens, message batches, models... Each method is
called on a fake upstream served by real uvicorn, once alone and once wrapped in the middleware: the SDK gets the
same answer byte for byte, headers included, the app gets the request body the SDK sent (multipart uploads too), and
only the inference routes (chat completions, completions, embeddings, Responses, Anthropic messages, and the image
generations and edits and transcriptions, for their token usage) are counted, with their operation; everything else
passes through uncounted, and no id or file name reaches a label. The hostile variants (a 100 MB upload, binary
labelled as an event stream, JSON Lines labelled as JSON) leave the answer unchanged and the memory bounded."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import re
import tracemalloc
from collections.abc import Iterator
from itertools import count
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic._resource import SyncAPIResource as AnthropicResource
from anthropic.types import (
    Message,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
)
from openai._resource import SyncAPIResource as OpenAIResource
from openai.types import Completion, CreateEmbeddingResponse, ImagesResponse, ModerationCreateResponse
from openai.types.audio import Transcription, TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.image_edit_completed_event import ImageEditCompletedEvent
from openai.types.responses import Response as OpenAIResponse
from openai.types.responses import ResponseCompletedEvent, ResponseCreatedEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from support import Calls, Metrics, free_port, scrape, serve, wait_for

try:  # (the SDK's models of these, in its releases that have message batches and token counting)
    from anthropic.types import MessageTokensCount
    from anthropic.types.messages import MessageBatchIndividualResponse
except ImportError:  # pragma: no cover
    MessageTokensCount = MessageBatchIndividualResponse = None  # type: ignore[assignment,misc]
try:
    import httpx2  # the anthropic SDK's own fork of httpx, in its newer releases
except ImportError:  # pragma: no cover (older anthropic SDKs take httpx)
    httpx2 = httpx

MODEL = "model-asked"
ANSWERED = "model-answered"
#: What the app is asked to say it received, beside its answer: the body's SHA-256 (a header the comparison leaves out,
#: since a multipart body's boundary is drawn anew for every request).
RECEIVED = "x-received-sha256"

_OPENAI_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
_IMAGE_USAGE = {
    "input_tokens": 5,
    "output_tokens": 70,
    "total_tokens": 75,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 5},
}
_TRANSCRIPT_USAGE = {"type": "tokens", "input_tokens": 40, "output_tokens": 9, "total_tokens": 49}
_RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "model": ANSWERED,
    "output": [],
    "parallel_tool_calls": False,
    "tool_choice": "auto",
    "tools": [],
    "status": "completed",
    "usage": {
        "input_tokens": 11,
        "output_tokens": 7,
        "total_tokens": 18,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    },
}
_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": ANSWERED,
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "content": [{"type": "text", "text": "hi"}],
    "usage": {"input_tokens": 11, "output_tokens": 7},
}
#: Any other resource: an object most of the SDKs' models read (a page with no more pages, a finished job).
_GENERIC = {
    "id": "obj_1",
    "object": "thing",
    "status": "completed",
    "created_at": 1,
    "data": [],
    "has_more": False,
    "first_id": None,
    "last_id": None,
}


def _json(model: Any) -> bytes:
    return model.model_dump_json(exclude_none=True).encode()  # type: ignore[no-any-return]


def _sse(events: list[Any], done: bool = False) -> bytes:
    named = b"".join(
        (b"event: " + e.type.encode() + b"\n" if hasattr(e, "type") else b"") + b"data: " + _json(e) + b"\n\n"
        for e in events
    )
    return named + (b"data: [DONE]\n\n" if done else b"")


def _chat_chunk() -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": ANSWERED,
            "usage": _OPENAI_USAGE,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        }
    )


def _messages_stream() -> list[Any]:
    start = {**_MESSAGE, "content": [], "stop_reason": None, "usage": {"input_tokens": 11, "output_tokens": 1}}
    return [
        RawMessageStartEvent(type="message_start", message=Message.model_validate(start)),
        RawContentBlockStartEvent.model_validate(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        ),
        RawContentBlockDeltaEvent.model_validate(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
        ),
        RawContentBlockStopEvent(type="content_block_stop", index=0),
        RawMessageDeltaEvent.model_validate(
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}
        ),
        RawMessageStopEvent(type="message_stop"),
    ]


def _answer(method: str, path: str, stream: bool) -> tuple[bytes, str]:
    """The fake service's answer to a route: built from the SDKs' own response models where there are some."""
    if path.endswith("/audio/speech") or path.endswith("/content"):
        return bytes(range(256)) * 64, "application/octet-stream"  # speech, a file's or a container file's content
    if path.endswith("/results"):  # a message batch's results: JSON Lines
        line = {"custom_id": "r1", "result": {"type": "succeeded", "message": _MESSAGE}}
        record = (
            _json(MessageBatchIndividualResponse.model_validate(line))
            if MessageBatchIndividualResponse
            else json.dumps(line).encode()
        )
        return record + b"\n" + record + b"\n", "application/binary"
    if method != "POST":
        return json.dumps(_GENERIC).encode(), "application/json"
    if stream:
        if path.endswith("/chat/completions"):
            return _sse([_chat_chunk()], done=True), "text/event-stream"
        if path.endswith("/completions"):
            chunk = {
                "id": "c1",
                "object": "text_completion",
                "created": 1,
                "model": ANSWERED,
                "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
                "usage": _OPENAI_USAGE,
            }
            return _sse([Completion.model_validate(chunk)], done=True), "text/event-stream"
        if path.endswith("/messages"):
            return _sse(_messages_stream()), "text/event-stream"
        if path.endswith("/responses") or path.endswith("/responses/compact"):
            response = OpenAIResponse.model_validate(_RESPONSE)
            events = [
                ResponseCreatedEvent(type="response.created", sequence_number=0, response=response),
                ResponseCompletedEvent(type="response.completed", sequence_number=1, response=response),
            ]
            return _sse(events), "text/event-stream"
        if path.endswith("/audio/transcriptions"):
            events = [
                TranscriptionTextDeltaEvent(type="transcript.text.delta", delta="hel"),
                TranscriptionTextDoneEvent.model_validate(
                    {"type": "transcript.text.done", "text": "hello", "usage": _TRANSCRIPT_USAGE}
                ),
            ]
            return _sse(events), "text/event-stream"
        if path.endswith("/images/edits") or path.endswith("/images/generations"):
            done = {
                "type": "image_edit.completed",
                "b64_json": "aGk=",
                "created_at": 1,
                "background": "auto",
                "output_format": "png",
                "quality": "low",
                "size": "1024x1024",
                "usage": _IMAGE_USAGE,
            }
            return _sse([ImageEditCompletedEvent.model_validate(done)]), "text/event-stream"
        return b'data: {"type": "done"}\n\n', "text/event-stream"
    if path.endswith("/chat/completions"):
        body = {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": ANSWERED,
            "usage": _OPENAI_USAGE,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        }
        return _json(ChatCompletion.model_validate(body)), "application/json"
    if path.endswith("/completions"):
        body = {
            "id": "c1",
            "object": "text_completion",
            "created": 1,
            "model": ANSWERED,
            "usage": _OPENAI_USAGE,
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
        }
        return _json(Completion.model_validate(body)), "application/json"
    if path.endswith("/embeddings"):
        body = {
            "object": "list",
            "model": ANSWERED,
            "usage": {"prompt_tokens": 11, "total_tokens": 11},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
        }
        return _json(CreateEmbeddingResponse.model_validate(body)), "application/json"
    if path.endswith("/responses") or path.endswith("/responses/compact"):
        return _json(OpenAIResponse.model_validate(_RESPONSE)), "application/json"
    if path.endswith("/messages/count_tokens"):
        count = MessageTokensCount(input_tokens=11) if MessageTokensCount else None
        return (_json(count) if count else b'{"input_tokens": 11}'), "application/json"
    if path.endswith("/messages"):
        return _json(Message.model_validate(_MESSAGE)), "application/json"
    if path.endswith("/audio/transcriptions") or path.endswith("/audio/translations"):
        return _json(Transcription.model_validate({"text": "hello", "usage": _TRANSCRIPT_USAGE})), "application/json"
    if "/images/" in path:
        body = {"created": 1, "data": [{"b64_json": "aGk="}], "usage": _IMAGE_USAGE}
        return _json(ImagesResponse.model_validate(body)), "application/json"
    if path.endswith("/moderations"):
        body = {"id": "modr_1", "model": ANSWERED, "results": []}
        return _json(ModerationCreateResponse.model_validate(body)), "application/json"
    return json.dumps(_GENERIC).encode(), "application/json"


def _streamed(body: bytes, content_type: str) -> bool:
    if content_type.startswith("application/json"):
        try:
            return bool(json.loads(body).get("stream") is True)
        except (ValueError, AttributeError):
            return False
    return content_type.startswith("multipart/") and b'name="stream"\r\n\r\ntrue\r\n' in body


#: A megabyte of random bytes, the same in every answer that sends it.
NOISE = random.Random(7).randbytes(1 << 20)


async def _service(request: Request) -> Response:
    digest = hashlib.sha256()
    body = b""
    async for piece in request.stream():
        digest.update(piece)
        if len(body) < 1 << 20:
            body += piece
    headers = {RECEIVED: digest.hexdigest(), "x-upstream": "fake", "openai-version": "2020-10-01"}
    hostile = request.headers.get("x-answer")
    if hostile == "binary-as-event-stream":
        piece = NOISE

        async def pieces() -> Any:
            for _ in range(24):
                yield piece

        return StreamingResponse(pieces(), media_type="text/event-stream", headers=headers)
    if hostile == "json-lines-as-json":
        # Records of a batch's results, each with a usage of the API asked (120,000 of them: over 30 MiB, past the
        # 8 MiB a JSON answer is read whole).
        line: dict[str, Any] = {"custom_id": "r", "result": {"type": "succeeded", "message": _MESSAGE}}
        if request.url.path.endswith("/chat/completions"):
            line["usage"] = _OPENAI_USAGE
        record = (
            _json(MessageBatchIndividualResponse.model_validate(line))
            if MessageBatchIndividualResponse
            else json.dumps(line).encode()
        ) + b"\n"
        return Response(
            record * int(request.headers.get("x-records", "120000")), headers=headers, media_type="application/json"
        )
    content, content_type = _answer(
        request.method, request.url.path, _streamed(body, request.headers.get("content-type", ""))
    )
    return Response(content, media_type=content_type, headers=headers)


service = Starlette(routes=[Route("/{path:path}", _service, methods=["GET", "POST", "DELETE", "PUT", "PATCH"])])


# The SDKs' resources and methods, from the client objects -----------------------------------------------------------


def _resources(client: Any) -> Iterator[tuple[str, Any]]:
    """Every resource object under a client (``chat``, ``chat.completions``, ``beta.threads.messages``...)."""
    kinds = (OpenAIResource, AnthropicResource)
    seen: set[int] = set()

    def walk(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for name in dir(type(obj)):
            if name.startswith("_") or name in ("with_raw_response", "with_streaming_response"):
                continue
            if type(getattr(type(obj), name, None)).__name__ != "cached_property":
                continue
            value = getattr(obj, name)
            if isinstance(value, kinds) and id(value) not in seen:
                seen.add(id(value))
                yield prefix + name, value
                yield from walk(value, prefix + name + ".")

    yield from walk(client, "")


def _methods(resource: Any) -> list[tuple[str, Any]]:
    return [
        (name, getattr(resource, name))
        for name, _ in inspect.getmembers(type(resource), inspect.isfunction)
        if not name.startswith("_")
        and name not in ("with_raw_response", "with_streaming_response")
        # (Webhook helpers send nothing; pollers wait on a status; a realtime connection is a WebSocket.)
        and name not in ("connect", "unwrap", "verify_signature", "parse_unverified", "wait_for_processing")
        and "poll" not in name
    ]


#: A file, as the SDKs upload one: the name is one no label may show.
FILE_NAME = "private-recording-7d1f.wav"
UPLOAD = (FILE_NAME, b"RIFF" + bytes(range(256)) * 40, "audio/wav")
_LITERAL = re.compile(r"Literal\[['\"]([^'\"]+)")


def _argument(name: str, annotation: str) -> Any:
    """A value for a required parameter, from its name and annotation: any the SDK sends will do for the fake
    service; ids and names are strings no label may show."""
    if "FileTypes" in annotation or name in ("file", "image", "mask", "audio", "video"):
        return [UPLOAD] if "Sequence" in annotation or "List" in annotation else UPLOAD
    if name == "model":
        return MODEL
    if name.endswith("_id") or name in ("id", "name", "voice", "input", "prompt", "text"):
        return f"private-{name}-7d1f"
    literal = _LITERAL.search(annotation)
    if literal:
        return literal.group(1)
    if annotation.split("|")[0].strip() in ("int", "<class 'int'>"):
        return 1
    if "float" in annotation:
        return 1.0
    if "bool" in annotation:
        return False
    if any(kind in annotation for kind in ("Iterable", "List", "Sequence")):
        return []
    if any(kind in annotation for kind in ("Dict", "Param", "Mapping")):
        return {}
    return f"private-{name}-7d1f"


def _calls(method: Any) -> list[tuple[str, dict[str, Any]]]:
    """How to call ``method``: its required arguments, and once more with ``stream=True`` where it takes that."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return []
    arguments = {
        name: _argument(name, str(parameter.annotation))
        for name, parameter in signature.parameters.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    variants = [("", arguments)]
    if "stream" in signature.parameters and method.__name__ != "stream":
        variants.append((":stream", {**arguments, "stream": True}))
    return variants


def _clients(base: str, transport: Any, transport2: Any) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    return (
        openai.OpenAI(
            api_key="sk-test",
            base_url=base + "/v1",
            max_retries=0,
            http_client=httpx.Client(transport=transport, timeout=60),
            # (The administration resources need a key of their own, in the SDK's releases that have them.)
            **({"admin_api_key": "sk-admin"} if "admin_api_key" in inspect.signature(openai.OpenAI).parameters else {}),
        ),
        anthropic.Anthropic(
            api_key="sk-ant-test",
            base_url=base,
            max_retries=0,
            http_client=httpx2.Client(transport=transport2, timeout=60),
        ),
    )


_OFFLINE_OPENAI, _OFFLINE_ANTHROPIC = _clients("http://127.0.0.1:9", httpx.HTTPTransport(), httpx2.HTTPTransport())
RESOURCES = [f"openai.{name}" for name, _ in _resources(_OFFLINE_OPENAI)] + [
    f"anthropic.{name}" for name, _ in _resources(_OFFLINE_ANTHROPIC)
]


def _resource(client: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        client = getattr(client, name)
    return client


class Exchange:
    """One request and its answer as the SDK met them: method, path, the SHA-256 of the body sent, status, headers
    (but ``date`` and the app's note of what it received), body; and what the app says it received."""

    def __init__(self, request: Any, sent: bytes, response: Any, body: bytes) -> None:
        self.method = request.method
        self.path = request.url.path
        self.sent = hashlib.sha256(sent).hexdigest()
        self.received = response.headers.get(RECEIVED)
        drop = ("date", RECEIVED)
        self.answer = (
            response.status_code,
            [(k, v) for k, v in response.headers.multi_items() if k.lower() not in drop],
            body,
        )


def _recording(module: Any) -> type:
    class Recording(module.BaseTransport):  # type: ignore[misc,name-defined]
        """A real HTTP transport that keeps each exchange whole (the SDK then reads the same bytes from memory)."""

        def __init__(self, log: list[Exchange]) -> None:
            self.inner = module.HTTPTransport()
            self.log = log

        def handle_request(self, request: Any) -> Any:
            sent = request.read()
            response = self.inner.handle_request(request)
            try:
                body = response.read()
            finally:
                response.close()
            self.log.append(Exchange(request, sent, response, body))
            return module.Response(response.status_code, headers=response.headers, content=body, request=request)

    return Recording


def _call_every_method(base: str, dotted: str) -> dict[str, tuple[list[Exchange], str | None]]:
    """Each method of a resource, called through the SDK against ``base``: the exchanges it made, and the type of
    what it raised (the fake answers are not every model's, and that must be the same with and without the
    middleware)."""
    log: list[Exchange] = []
    oai, ant = _clients(base, _recording(httpx)(log), _recording(httpx2)(log))
    sdk, _, path = dotted.partition(".")
    resource = _resource(oai if sdk == "openai" else ant, path)
    made: dict[str, tuple[list[Exchange], str | None]] = {}
    for name, method in _methods(resource):
        for tag, arguments in _calls(method):
            first = len(log)
            raised = None
            try:
                result = method(**arguments)
                if hasattr(result, "__enter__"):
                    with result as stream:
                        for _ in stream:
                            pass
                elif type(result).__name__ == "Stream":
                    for _ in result:
                        pass
            except Exception as error:
                raised = type(error).__name__
            made[name + tag] = (log[first:], raised)
    return made


#: The routes the middleware counts, as the SDKs call them (POST only), with the operation and provider of each.
COUNTED = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/completions": ("text_completion", "openai"),
    "/v1/embeddings": ("embeddings", "openai"),
    "/v1/responses": ("chat", "openai"),
    "/v1/responses/compact": ("chat", "openai"),
    "/v1/messages": ("chat", "anthropic"),
    "/v1/images/generations": ("generate_content", "openai"),
    "/v1/images/edits": ("generate_content", "openai"),
    "/v1/audio/transcriptions": ("generate_content", "openai"),
}


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[str, str, int, Calls]]:
    port = free_port()
    calls = Calls()
    wrapped = LLMTelemetryMiddleware(service, metrics_port=port, metrics_host="127.0.0.1", observers=[calls])
    try:
        with serve(service) as bare, serve(wrapped) as observed:
            yield bare, observed, port, calls
    finally:
        wrapped.telemetry.shutdown()


_prefixes = count()


def _settle(base: str, calls: Calls) -> None:
    """Send a chat completion of its own and wait for it to be recorded: then so are the calls made before it (each
    is recorded as its answer's last byte is sent, and each answer was whole before the next call was made)."""
    path = f"/settle{next(_prefixes)}/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        client.post(base + path, json={"model": MODEL, "messages": []}).raise_for_status()
    wait_for("the last call recorded", lambda: any(c.path == path for c in calls.ended[-50:]) or None)


def _labels_bounded(metrics: Metrics) -> None:
    """No id, file name or other value a request of a non-inference route chose is a label value."""
    for sample in metrics.samples:
        if sample.name.startswith(("llm_", "gen_ai_")):
            for value in sample.labels.values():
                assert "private-" not in value and FILE_NAME not in value, sample


@pytest.mark.parametrize("dotted", RESOURCES)
def test_every_method_of_a_resource_gets_the_apps_answer_and_only_inference_is_counted(
    services: tuple[str, str, int, Calls], dotted: str
) -> None:
    bare, observed, port, calls = services
    prefix = f"/r{next(_prefixes)}"  # (a gateway's prefix: this test's calls are told apart by it)
    alone = _call_every_method(bare + prefix, dotted)
    through = _call_every_method(observed + prefix, dotted)
    assert through.keys() == alone.keys()
    sent: list[Exchange] = []
    for name, (exchanges, raised) in alone.items():
        wrapped, wrapped_raised = through[name]
        assert [(e.method, e.path, e.answer) for e in wrapped] == [(e.method, e.path, e.answer) for e in exchanges], (
            name
        )
        assert wrapped_raised == raised, name
        for exchange in exchanges + wrapped:
            assert exchange.received == exchange.sent, (name, exchange.path)  # the body reached the app unchanged
        sent += wrapped
    if alone and dotted != "anthropic.beta.webhooks":  # (its methods read a webhook's body: they send nothing)
        assert sent, f"no method of {dotted} made a request"
    _settle(observed, calls)
    mine = [c for c in list(calls.ended) if c.path.startswith(prefix + "/")]
    recorded = sorted((c.path.removeprefix(prefix), c.operation, c.provider) for c in mine)
    expected = sorted(
        (path, *COUNTED[path])
        for path in [e.path.removeprefix(prefix) for e in sent if e.method == "POST"]
        if path in COUNTED
    )
    assert recorded == expected, [(c.path, c.stream, c.request_model, c.status_code) for c in mine]
    for call in mine:
        assert call.request_model in (MODEL, ANSWERED, None), call.path
    _labels_bounded(scrape(port))


# Hostile variants -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(100 << 20)


def _peak(run: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _upload_file(client: openai.OpenAI, big: bytes) -> int:
    response = client.files.with_raw_response.create(file=("big.jsonl", big, "application/jsonl"), purpose="batch")
    return response.http_response.status_code


def _upload_transcription(client: openai.OpenAI, big: bytes) -> int:
    response = client.audio.transcriptions.with_raw_response.create(file=("big.wav", big, "audio/wav"), model=MODEL)
    return response.http_response.status_code


def _upload_to_chat(client: openai.OpenAI, big: bytes) -> int:
    # The SDK's own multipart, sent to an inference route: read up to max_request_bytes, then passed on unread.
    response = client.post(
        "/chat/completions",
        cast_to=httpx.Response,
        body={"model": MODEL},
        files=[("file", ("big.bin", big, "application/octet-stream"))],
        options={"headers": {"Content-Type": "multipart/form-data"}},
    )
    return response.status_code


class Hashing(httpx.BaseTransport):
    """A real HTTP transport that hashes a request body as it is sent, keeping none of it."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[str] = []
        self.received: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        digest = hashlib.sha256()
        body = request.stream
        assert isinstance(body, httpx.SyncByteStream)

        class Hashed(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for piece in body:
                    digest.update(piece)
                    yield piece

        sending = httpx.Request(request.method, request.url, headers=request.headers, stream=Hashed())
        response = self.inner.handle_request(sending)
        content = response.read()
        response.close()
        self.sent.append(digest.hexdigest())
        self.received.append(response.headers.get(RECEIVED))
        return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)


@pytest.mark.parametrize("upload", [_upload_file, _upload_transcription, _upload_to_chat])
def test_a_100_mb_multipart_upload_reaches_the_app_whole_and_the_middleware_keeps_no_copy(
    services: tuple[str, str, int, Calls], big: bytes, upload: Any
) -> None:
    """Measured with tracemalloc around the upload to a real uvicorn server in this process (the app hashes the body
    as it comes, the SDK sends it from the caller's bytes): well under the body's size, where a copy would be 100 MB."""
    _, observed, _, _ = services
    transport = Hashing()
    client, _ = _clients(observed, transport, httpx2.HTTPTransport())
    status, peak = _peak(lambda: upload(client, big))
    assert status == 200
    assert len(transport.sent) == 1 and transport.received == transport.sent  # the whole body, boundaries and all
    assert peak < 24 << 20 < len(big)


def _answers(base: str, run: Any) -> tuple[str | None, list[Exchange]]:
    log: list[Exchange] = []
    client, anthropic_client = _clients(base, _recording(httpx)(log), _recording(httpx2)(log))
    try:
        run(client, anthropic_client)
    except Exception as error:
        return type(error).__name__, log
    return None, log


def _binary_chat_stream(client: openai.OpenAI, _: anthropic.Anthropic) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[], stream=True, extra_headers={"x-answer": "binary-as-event-stream"}
    )
    for _ in stream:
        pass


def _binary_speech(client: openai.OpenAI, _: anthropic.Anthropic) -> None:
    client.audio.speech.create(
        model=MODEL, voice="alloy", input="hi", extra_headers={"x-answer": "binary-as-event-stream"}
    ).read()


def _json_lines_message(_: openai.OpenAI, client: anthropic.Anthropic) -> None:
    client.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, messages=[], extra_headers={"x-answer": "json-lines-as-json"}
    )


def _json_lines_chat(client: openai.OpenAI, _: anthropic.Anthropic) -> None:
    client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[], extra_headers={"x-answer": "json-lines-as-json"}
    )


def _short_json_lines_chat(client: openai.OpenAI, _: anthropic.Anthropic) -> None:
    client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[], extra_headers={"x-answer": "json-lines-as-json", "x-records": "100"}
    )


def _batch_results(_: openai.OpenAI, client: anthropic.Anthropic) -> None:
    assert [r.custom_id for r in client.messages.batches.results("msgbatch_1")] == ["r1", "r1"]


@pytest.mark.parametrize(
    "run",
    [
        _binary_chat_stream,
        _binary_speech,
        _json_lines_message,
        _json_lines_chat,
        _short_json_lines_chat,
        pytest.param(
            _batch_results,
            marks=pytest.mark.skipif(
                not hasattr(anthropic.resources.messages, "Batches"), reason="this anthropic SDK has no message batches"
            ),
        ),
    ],
)
def test_a_hostile_answer_reaches_the_sdk_unchanged_and_counts_no_tokens(
    services: tuple[str, str, int, Calls], caplog: pytest.LogCaptureFixture, run: Any
) -> None:
    """Binary labelled as an event stream (on a chat stream and on speech), JSON Lines labelled as JSON (an
    inference route's answer of over 30 MiB, past what is read whole, and a short one; a message batch's results):
    the SDK meets the app's answer, and no usage of a record of it is counted as the call's (a JSON Lines body is no
    answer of the API, whichever record's usage its last bytes show)."""
    bare, observed, port, calls = services
    before = scrape(port)
    alone = _answers(bare, run)
    through = _answers(observed, run)
    assert through[0] == alone[0]
    assert [(e.method, e.path, e.answer) for e in through[1]] == [(e.method, e.path, e.answer) for e in alone[1]]
    _settle(observed, calls)
    after = scrape(port)
    # The only tokens counted are those of _settle's call (11 in, 7 out).
    assert after.value("llm_tokens_total") - before.value("llm_tokens_total") == 18
    assert after.value("llm_telemetry_internal_errors_total") == before.value("llm_telemetry_internal_errors_total")
    assert not [r for r in caplog.records if r.name.startswith("llm_telemetry") and r.exc_info], caplog.records
