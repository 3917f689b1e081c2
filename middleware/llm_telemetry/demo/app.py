"""A small, deterministic OpenAI- and Anthropic-compatible LLM service for the demo, tests and benchmarks.

It "generates" a fixed reply one word per token, so token counts are exact and known in advance:

- input tokens: the number of whitespace-separated words in all message contents (and the system prompt);
- output tokens: the number of words in the reply (``reply_words``, default 12), or 1 for a tool call turn.

Behaviour is steered per request:

- ``tools`` in the request, with no tool result after the last assistant turn: the model calls the first tool;
- header ``x-demo-fail``: ``rate_limit`` (429), ``context_length`` (400 ``context_length_exceeded``),
  ``server_error`` (500), ``exception`` (the app raises), ``stream_error`` (an error event mid-stream);
- header ``x-demo-words``: the number of words in the reply (e.g. 64 or 512 chunks for benchmarks);
- the request's output cap (``max_completion_tokens`` or ``max_tokens``; Anthropic's ``max_tokens``; the Responses
  API's ``max_output_tokens``) below the reply's words cuts the reply there, and the response says so as each API
  does: finish reason ``length``, stop reason ``max_tokens``, or an ``incomplete`` response;
- header ``x-demo-obfuscation: 1``: every streamed chat event ends with an ``"obfuscation"`` member, random letters
  and digits of random length (1 to 16), each event its own, as OpenAI adds by default (the same values for every
  stream, so runs repeat);
- stream usage is sent only when asked (``stream_options.include_usage``), as OpenAI does; Anthropic streams
  always report usage;
- ``/v1/responses`` (the OpenAI Responses API) streams as OpenAI does: named events, each numbered
  (``sequence_number``), and text deltas ending with an ``"obfuscation"`` member unless the request turns it off
  (``stream_options.include_obfuscation: false``); its usage always comes in the final ``response.completed``.
"""

from __future__ import annotations

import json
import random
import string
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

WORDS = (
    "Observability turns a black box into a glass box so that every token and every millisecond has a name "
    "and a place on a dashboard where the team can see it"
).split()


class JSONResponse(_StarletteJSON):
    """Starlette's JSON response, escaping non-ASCII characters: a request's model name is echoed back, and one
    holding a lone surrogate (valid JSON, ``"\\ud800"``) has no UTF-8 form, so Starlette's own rendering raised."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def _reply(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] + " " for i in range(count)]


def _capped(words: list[str], body: dict[str, Any], caps: tuple[str, ...]) -> tuple[list[str], bool]:
    """``words`` cut at the first of the request's output caps (fields ``caps``) it sets, and whether they were."""
    cap = next((v for k in caps if type(v := body.get(k)) is int and v > 0), None)
    if cap is None or len(words) <= cap:
        return words, False
    return words[:cap], True


def _count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v.get("text") or v.get("content") if isinstance(v, dict) else v) for v in value)
    return 0


def input_tokens(body: dict[str, Any]) -> int:
    """The demo's input token count: words in every message (and the system prompt / input / prompt)."""
    total = _count_words(body.get("system")) + _count_words(body.get("prompt")) + _count_words(body.get("instructions"))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            total += _count_words(message.get("content"))
    inp = body.get("input")
    if isinstance(inp, (str, list)):
        total += (
            _count_words(inp)
            if isinstance(inp, str)
            else sum(_count_words(i.get("content") or i.get("output")) for i in inp if isinstance(i, dict))
        )
    return total


def _wants_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    messages = body.get("messages") or body.get("input") or []
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict):
            if last.get("role") == "tool" or last.get("type") == "function_call_output":
                return None
            content = last.get("content")
            if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content
            ):
                return None
    tool = tools[0]
    if isinstance(tool, dict):
        name = tool.get("name") or (tool.get("function") or {}).get("name")
        return str(name) if name else None
    return None


def _obfuscation() -> Iterator[str]:
    """Values for the ``"obfuscation"`` member of a stream's events: random letters and digits of random length, the
    same sequence for every stream (seeded)."""
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits
    while True:
        yield "".join(rng.choices(alphabet, k=rng.randint(1, 16)))


def _openai_error(status: int, message: str, kind: str, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _anthropic_error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


class DemoLLM:
    """The demo service as a Starlette app.

    Args:
        first_token_delay: seconds before the first token of a stream (and before a non-stream reply).
        token_delay: seconds between streamed tokens.
        reply_words: words (= output tokens) in a text reply.
    """

    def __init__(self, first_token_delay: float = 0.0, token_delay: float = 0.0, reply_words: int = 12) -> None:
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.reply_words = reply_words
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/healthz", self.health, methods=["GET"]),
            ]
        )

    async def health(self, request: Request) -> Response:
        return Response("ok")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "demo-mini", "object": "model", "owned_by": "demo"}]})

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await anyio.sleep(seconds)  # (anyio: the demo also runs under trio)

    def _words(self, request: Request) -> int:
        header = request.headers.get("x-demo-words")
        return int(header) if header and header.isdigit() else self.reply_words

    def _turn(
        self, request: Request, body: dict[str, Any], model: str, *caps: str
    ) -> tuple[str, int, str | None, list[str], int, bool]:
        """How the demo answers ``body``: the model (``model`` when it names none), the input tokens, the tool it
        calls (or None), the words of its reply (none for a tool call), the output tokens (1 for a tool call), and
        whether the reply was cut at the first of the request's fields ``caps`` that it sets."""
        tool = _wants_tool(body)
        words, cut = _capped([] if tool else _reply(self._words(request)), body, caps)
        return body.get("model", model), input_tokens(body), tool, words, 1 if tool else len(words), cut

    def _failure(self, request: Request, anthropic: bool = False) -> Response | None:
        fail = request.headers.get("x-demo-fail")
        if fail == "rate_limit":
            if anthropic:
                return _anthropic_error(429, "rate_limit_error", "Number of requests has exceeded your rate limit")
            return _openai_error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded")
        if fail == "context_length":
            if anthropic:
                return _anthropic_error(400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000")
            return _openai_error(
                400,
                "This model's maximum context length is 8192 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
            )
        if fail == "server_error":
            if anthropic:
                return _anthropic_error(500, "api_error", "Internal server error")
            return _openai_error(500, "The server had an error", "server_error", None)
        if fail == "exception":
            raise RuntimeError("demo: the app failed")
        return None

    # --- OpenAI chat completions -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        failure = self._failure(request)
        if failure is not None:
            return failure
        model, prompt_tokens, tool, words, completion_tokens, cut = self._turn(
            request, body, "demo-mini", "max_completion_tokens", "max_tokens"
        )
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        created = int(time.time())
        ident = f"chatcmpl-demo{created}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            fail_midway = request.headers.get("x-demo-fail") == "stream_error"
            obfuscation = _obfuscation() if request.headers.get("x-demo-obfuscation") == "1" else None
            stream = self._chat_stream(
                ident, model, created, words, tool, usage if include_usage else None, fail_midway, obfuscation, cut
            )
            return StreamingResponse(stream, media_type="text/event-stream")
        await self._sleep(self.first_token_delay)
        message: dict[str, Any] = {"role": "assistant", "content": None if tool else "".join(words)}
        if tool:
            message["tool_calls"] = [{"id": "call_demo1", "type": "function",
                                      "function": {"name": tool, "arguments": "{\"city\": \"Paris\"}"}}]  # fmt: skip
        return JSONResponse(
            {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if tool else "length" if cut else "stop"}],
                "usage": usage,
            }
        )  # fmt: skip

    async def _chat_stream(
        self,
        ident: str,
        model: str,
        created: int,
        words: list[str],
        tool: str | None,
        usage: dict[str, int] | None,
        fail_midway: bool,
        obfuscation: Iterator[str] | None = None,
        cut: bool = False,
    ) -> AsyncIterator[bytes]:
        def encode(obj: dict[str, Any]) -> bytes:
            if obfuscation is not None:
                obj["obfuscation"] = next(obfuscation)  # last, as OpenAI sends it
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return encode({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

        yield chunk({"role": "assistant", "content": ""})
        await self._sleep(self.first_token_delay)
        if tool:
            yield chunk({"tool_calls": [{"index": 0, "id": "call_demo1", "type": "function",
                                         "function": {"name": tool, "arguments": ""}}]})  # fmt: skip
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]})
            yield chunk({}, "tool_calls")
        else:
            for i, word in enumerate(words):
                if i:
                    await self._sleep(self.token_delay)
                if fail_midway and i == len(words) // 2:
                    err = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
                    yield b"data: " + json.dumps(err).encode() + b"\n\n"
                    return
                yield chunk({"content": word})
            yield chunk({}, "length" if cut else "stop")
        if usage is not None:
            yield encode({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [], "usage": usage})  # fmt: skip
        yield b"data: [DONE]\n\n"

    # --- OpenAI Responses API -----------------------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        body = await request.json()
        failure = self._failure(request)
        if failure is not None:
            return failure
        model, prompt_tokens, tool, words, output_tokens, cut = self._turn(
            request, body, "demo-mini", "max_output_tokens"
        )
        created = int(time.time())
        head = {"id": f"resp_demo{created}", "object": "response", "created_at": created, "model": model,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}  # fmt: skip
        usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt_tokens + output_tokens}  # fmt: skip
        item: dict[str, Any] = (
            {"id": "fc_demo1", "type": "function_call", "status": "completed", "call_id": "call_demo1", "name": tool,
             "arguments": '{"city": "Paris"}'}
            if tool
            else {"id": "msg_demo1", "type": "message", "status": "incomplete" if cut else "completed",
                  "role": "assistant",
                  "content": [{"type": "output_text", "text": "".join(words), "annotations": [], "logprobs": []}]}
        )  # fmt: skip
        done = {**head, "status": "completed", "output": [item], "usage": usage}
        if cut:
            done.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        if body.get("stream"):
            obfuscated = (body.get("stream_options") or {}).get("include_obfuscation", True) is not False
            stream = self._responses_stream(head, done, words, item, _obfuscation() if obfuscated else None)
            return StreamingResponse(stream, media_type="text/event-stream")
        await self._sleep(self.first_token_delay)
        return JSONResponse(done)

    async def _responses_stream(
        self,
        head: dict[str, Any],
        done: dict[str, Any],
        words: list[str],
        item: dict[str, Any],
        obfuscation: Iterator[str] | None,
    ) -> AsyncIterator[bytes]:
        numbers = iter(range(1 << 30))

        def event(kind: str, **members: Any) -> bytes:
            obj = {"type": kind, "sequence_number": next(numbers), **members}
            return f"event: {kind}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        yield event("response.created", response={**head, "status": "in_progress", "output": [], "usage": None})
        yield event("response.in_progress", response={**head, "status": "in_progress", "output": [], "usage": None})
        await self._sleep(self.first_token_delay)
        where = {"item_id": item["id"], "output_index": 0}
        if item["type"] == "function_call":
            yield event("response.output_item.added", output_index=0, item={**item, "status": "in_progress",
                                                                            "arguments": ""})  # fmt: skip
            yield event("response.function_call_arguments.delta", **where, delta=item["arguments"])
            yield event("response.function_call_arguments.done", **where, arguments=item["arguments"])
        else:
            yield event("response.output_item.added", output_index=0, item={**item, "status": "in_progress",
                                                                            "content": []})  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield event("response.content_part.added", **where, content_index=0, part=part)
            for i, word in enumerate(words):
                if i:
                    await self._sleep(self.token_delay)
                extra = {"obfuscation": next(obfuscation)} if obfuscation is not None else {}
                yield event("response.output_text.delta", **where, content_index=0, delta=word, logprobs=[], **extra)
            text = "".join(words)
            yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            yield event("response.content_part.done", **where, content_index=0, part={**part, "text": text})
        yield event("response.output_item.done", output_index=0, item=item)
        yield event(f"response.{done['status']}", response=done)

    # --- OpenAI legacy completions and embeddings -----------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        failure = self._failure(request)
        if failure is not None:
            return failure
        words, cut = _capped(_reply(self._words(request)), body, ("max_tokens",))
        prompt_tokens = input_tokens(body)
        await self._sleep(self.first_token_delay)
        return JSONResponse(
            {
                "id": "cmpl-demo", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", "demo-mini"),
                "choices": [{"index": 0, "text": "".join(words), "finish_reason": "length" if cut else "stop",
                             "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                          "total_tokens": prompt_tokens + len(words)},
            }
        )  # fmt: skip

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        failure = self._failure(request)
        if failure is not None:
            return failure
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        tokens = sum(_count_words(i) for i in items)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.125, -0.5, 0.25]} for i in range(len(items))
                ],
                "model": body.get("model", "demo-embed"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # --- Anthropic messages ------------------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        body = await request.json()
        failure = self._failure(request, anthropic=True)
        if failure is not None:
            return failure
        model, prompt_tokens, tool, words, output_tokens, cut = self._turn(request, body, "demo-claude", "max_tokens")
        stop = "tool_use" if tool else "max_tokens" if cut else "end_turn"
        if body.get("stream"):
            return StreamingResponse(
                self._messages_stream(model, prompt_tokens, words, tool, output_tokens, stop),
                media_type="text/event-stream",
            )
        await self._sleep(self.first_token_delay)
        content: list[dict[str, Any]] = (
            [{"type": "tool_use", "id": "toolu_demo1", "name": tool, "input": {"city": "Paris"}}]
            if tool
            else [{"type": "text", "text": "".join(words)}]
        )
        return JSONResponse(
            {
                "id": "msg_demo1", "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            }
        )  # fmt: skip

    async def _messages_stream(
        self, model: str, prompt_tokens: int, words: list[str], tool: str | None, output_tokens: int, stop: str
    ) -> AsyncIterator[bytes]:
        def event(name: str, obj: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        yield event("message_start", {"type": "message_start", "message": {
            "id": "msg_demo1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}})  # fmt: skip
        await self._sleep(self.first_token_delay)
        if tool:
            yield event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_demo1", "name": tool, "input": {}}})  # fmt: skip
            yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Paris\"}"}})  # fmt: skip
        else:
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}})  # fmt: skip
            for i, word in enumerate(words):
                if i:
                    await self._sleep(self.token_delay)
                yield event("content_block_delta", {"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": word}})  # fmt: skip
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield event("message_delta", {"type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens}})  # fmt: skip
        yield event("message_stop", {"type": "message_stop"})


def create_app(
    first_token_delay: float = 0.0, token_delay: float = 0.0, reply_words: int = 12, **middleware: Any
) -> Any:
    """The demo service wrapped in :class:`~llm_telemetry.LLMTelemetryMiddleware` (options passed through)."""
    from ..middleware import LLMTelemetryMiddleware

    demo = DemoLLM(first_token_delay, token_delay, reply_words)
    return LLMTelemetryMiddleware(demo.app, **middleware)


def bare_app(first_token_delay: float = 0.0, token_delay: float = 0.0, reply_words: int = 12) -> Any:
    """The demo service without any middleware (the benchmarks' baseline)."""
    return DemoLLM(first_token_delay, token_delay, reply_words).app
