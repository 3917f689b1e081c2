"""Traces: the tracer provider (created here and nowhere else) and one span per LLM call.

Tracing is on when a tracer provider is passed to the middleware, when the application has already installed
a global SDK ``TracerProvider`` (it is used, never replaced), or when the standard OpenTelemetry variables ask
for an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or an explicit
``OTEL_TRACES_EXPORTER``). Otherwise :meth:`Tracing.create` returns None and the middleware adds neither an
observer nor the ASGI wrapper, so tracing costs nothing per request.

The LLM span is named ``{gen_ai.operation.name} {gen_ai.request.model}`` and carries the GenAI semantic
convention attributes, filled from the :class:`~llm_telemetry.record.LLMCall` the middleware already built (the
bodies are never parsed twice). It is started before the app runs and ended, with its attributes, in the
middleware's ``finally``: when the stream ends, when the client disconnects, and when the app raises.

By default it is the request's only span: kind SERVER, with the HTTP server attributes, continuing the caller's
``traceparent`` (read with the globally configured propagator). When a span is already current (the app is
instrumented outside the middleware), the LLM span is its INTERNAL child instead. With
``tracing_http_span=True`` the middleware wraps LLM requests in OpenTelemetry's ASGI middleware, whose server
span is then the parent (the shape before single-span tracing, and twice the SDK work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import sys
import traceback
from collections import deque
from collections.abc import Mapping
from time import perf_counter, time_ns
from typing import Any, Final, NamedTuple

from opentelemetry import context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from . import instruments as names
from .apis import RESPONSES_HOSTED_ITEMS, RESPONSES_HOSTED_OUTPUTS, hosted_shell
from .config import OTEL_TRACES_EXPORTER, OTelEnvironment, Settings, batch_processor
from .labels import field_text, label_value, mask_keys, valid_text
from .record import MAX_TOOL_CALL_IDS, LLMCall
from .redact import TRUNCATION_MARK, Redactor, cap, redact
from .types import ASGIApp, Receive, Scope, Send
from .version import __version__

logger = logging.getLogger("llm_telemetry")

TRACER_NAME: Final = "llm_telemetry"

# GenAI semantic-convention span attributes (those shared with the metrics come from instruments.py).
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_REQUEST_TOP_K: Final = "gen_ai.request.top_k"
GEN_AI_REQUEST_FREQUENCY_PENALTY: Final = "gen_ai.request.frequency_penalty"
GEN_AI_REQUEST_PRESENCE_PENALTY: Final = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_SEED: Final = "gen_ai.request.seed"
GEN_AI_REQUEST_ENCODING_FORMATS: Final = "gen_ai.request.encoding_formats"
GEN_AI_EMBEDDINGS_DIMENSION_COUNT: Final = "gen_ai.embeddings.dimension.count"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_REQUEST_CHOICE_COUNT: Final = "gen_ai.request.choice.count"
GEN_AI_REQUEST_STOP_SEQUENCES: Final = "gen_ai.request.stop_sequences"
GEN_AI_OUTPUT_TYPE: Final = "gen_ai.output.type"
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
OPENAI_REQUEST_SERVICE_TIER: Final = "openai.request.service_tier"
OPENAI_RESPONSE_SERVICE_TIER: Final = "openai.response.service_tier"
OPENAI_RESPONSE_SYSTEM_FINGERPRINT: Final = "openai.response.system_fingerprint"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: Final = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
EXCEPTION_MESSAGE: Final = "exception.message"
#: Longest exception message and traceback recorded on a span: an app's message may quote a whole request (a
#: 10 MB prompt made spans of three copies of it, which a batch export then failed to send).
MAX_EXCEPTION_MESSAGE_CHARS: Final = 1024
MAX_EXCEPTION_STACKTRACE_CHARS: Final = 8192
OPENAI_API_TYPE: Final = "openai.api.type"
# HTTP server attributes of the single (SERVER) span.
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_ROUTE: Final = "http.route"
URL_PATH: Final = "url.path"
URL_SCHEME: Final = "url.scheme"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CLIENT_ADDRESS: Final = "client.address"
NETWORK_PROTOCOL_VERSION: Final = "network.protocol.version"
# Our own attributes, for what the conventions do not (yet) name.
LLM_TOOL_CALLS_NAMES: Final = "llm.tool_calls.names"
LLM_TOOL_CALLS_COUNT: Final = "llm.tool_calls.count"
LLM_COST_USD: Final = "llm.cost_usd"
LLM_REQUEST_ID: Final = "llm.request_id"
#: With content capture on: how many of the request's messages were left out of ``gen_ai.input.messages``.
LLM_INPUT_MESSAGES_OMITTED: Final = "llm.input.messages.omitted"

#: With content capture on, ``gen_ai.input.messages`` keeps the system prompt and the most recent messages, each cut
#: to ``capture_content_max_chars``, while their content adds up to at most this many times that (the last message
#: is always kept), and never more than :data:`MAX_CAPTURED_MESSAGES`: a span stays small however long the
#: conversation, and so does the export queue holding thousands of them.
CAPTURED_INPUT_MESSAGES_BUDGET: Final = 4
MAX_CAPTURED_MESSAGES: Final = 32
#: Characters past ``capture_content_max_chars`` a message is redacted with before it is cut to that: more than any
#: value the default redactor masks (an e-mail address, a key, a card number) needs, so one that starts before the
#: cut is still recognised and masked whole.
REDACTED_BEYOND_CAP: Final = 1024
#: How many times the window a message is redacted in grows when masks shortened it below the cap plus that margin
#: (each time by what they took): bounded work, however many values a message holds; what is shown always keeps
#: the margin before the window's edge.
WINDOW_GROWTHS: Final = 3
#: Roles of a first message kept whatever the budget.
_INSTRUCTION_ROLES: Final = frozenset({"system", "developer"})
#: Longest message role shown in captured messages (``user``, ``assistant``, ``tool``, ...); a longer one is cut.
MAX_ROLE_CHARS: Final = 64


#: Tool calls and tool results shown per captured message (a message may carry any number of them).
MAX_CAPTURED_TOOL_PARTS: Final = 16
#: Longest tool call id or tool name shown in captured messages.
MAX_TOOL_FIELD_CHARS: Final = 256

#: The providers' finish reasons as the conventions' ``FinishReason`` values name them in an output message's
#: ``finish_reason`` (``gen_ai.response.finish_reasons`` keeps the provider's words); any other is shown as sent.
_FINISH_REASONS: Final = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "max_tokens": "length",
    "max_output_tokens": "length",
    "model_context_window_exceeded": "length",
    "content_filter": "content_filter",
    "refusal": "content_filter",
    "tool_calls": "tool_call",
    "function_call": "tool_call",
    "tool_use": "tool_call",
    "error": "error",
}

#: Anthropic's content blocks of the tools it runs itself (a call, and each tool's result block, ``*_tool_result``).
_SERVER_TOOL_BLOCKS: Final = frozenset(("server_tool_use", "mcp_tool_use"))
#: The Responses API's items of the tools the application runs for the model (and a tool search it runs itself,
#: ``execution: client``): the tool each calls, named as in an answer, and the member holding what it asks for.
_CLIENT_TOOL_ITEMS: Final = {
    "computer_call": ("computer", "action"),
    "shell_call": ("shell", "action"),
    "local_shell_call": ("local_shell", "action"),
    "apply_patch_call": ("apply_patch", "operation"),
    "tool_search_call": ("tool_search", "arguments"),
}


def _server_output(item: Mapping[str, Any], hosted_shells: frozenset[str] = frozenset()) -> bool:
    """Whether a Responses API input item is the output of a tool the API ran itself, sent back: a tool search's (the
    application's own outputs carry no ``execution``, or ``client``), a program's it ran for programmatic tool calling,
    or a shell's it ran in its own container (its call's ``call_id`` among ``hosted_shells``)."""
    kind = item.get("type")
    if kind == "shell_call_output":
        call_id = item.get("call_id")
        return isinstance(call_id, str) and call_id in hosted_shells
    return kind == "program_output" or (kind == "tool_search_output" and item.get("execution") == "server")


class _Conversation(NamedTuple):
    """What showing one message of a conversation needs from the others."""

    #: The ``call_id`` of each shell the API ran in its own container: their outputs sent back are its results.
    hosted_shells: frozenset[str]
    #: For a tool search's output sent back without a ``call_id`` (it may be null), by ``id()`` of the item: the id
    #: of the call it answers, the first server tool search before it not yet answered (as in an answer, see
    #: ``apis._server_output``).
    answers: dict[int, str]


_ALONE: Final = _Conversation(frozenset(), {})


def _conversation(messages: list[dict[str, Any]]) -> _Conversation:
    shells = frozenset(str(m["call_id"]) for m in messages if hosted_shell(m) and isinstance(m.get("call_id"), str))
    answers: dict[int, str] = {}
    searches: deque[str] = deque()  # the ids of the server tool searches so far, in order (answered ones skipped)
    answered: set[str] = set()
    for m in messages:
        kind = m.get("type")
        if kind == "tool_search_call" and m.get("execution") != "client":
            made = m.get("call_id") or m.get("id")
            if isinstance(made, str):
                searches.append(made)
        elif kind == "tool_search_output" and m.get("execution") == "server":
            call_id = m.get("call_id")
            if not call_id:
                while searches and searches[0] in answered:
                    searches.popleft()
                if not searches:
                    continue
                call_id = answers[id(m)] = searches.popleft()
            if isinstance(call_id, str):
                answered.add(call_id)
    return _Conversation(shells, answers)


#: Distinct tool names in ``llm.tool_calls.names`` (``llm.tool_calls.count`` counts every call): with each name cut to
#: MAX_TOOL_FIELD_CHARS, a span carries at most 16 KiB of them, however many calls a response makes.
MAX_SPAN_TOOL_NAMES: Final = 64


def _tool_names(names: list[str]) -> tuple[str, ...]:
    """The names of the tools called, each once, in the order first called, bounded in number and length."""
    shown: dict[str, None] = {}
    for name in names:
        shown[field_text(name, MAX_TOOL_FIELD_CHARS)] = None
        if len(shown) >= MAX_SPAN_TOOL_NAMES:
            break
    return tuple(shown)


def _short(value: Any) -> str | None:
    """A tool call's id or name as shown: a string, bounded and valid UTF-8; None for anything else."""
    return field_text(value, MAX_TOOL_FIELD_CHARS) if isinstance(value, str) else None


#: Characters a captured message's tool part is counted for beyond its values and its type (its keys and
#: punctuation in the JSON, about), for the messages' budget: many tool parts with little in them add up too. (A text
#: part is counted for its text only: a message's text parts share one cap, at most 16 of them.)
PART_OVERHEAD_CHARS: Final = 32


def _shown_chars(message: Mapping[str, Any]) -> int:
    """The characters a captured message shows, for the messages' budget: its text, and its tool parts about as long
    as their JSON (arguments, results, ids and names, the part's type, a server tool part's kind, and
    PART_OVERHEAD_CHARS)."""
    shown = 0
    for part in message["parts"]:
        shown += sum(len(part.get(key) or "") for key in ("content", "arguments", "response", "id", "name"))
        kind = part["type"]
        if kind != "text":
            shown += PART_OVERHEAD_CHARS + len(kind)
            server = part.get(kind)  # (a server tool part's kind, under a key named as its type)
            if isinstance(server, dict):
                shown += len(kind) + len(server["type"])
    return shown


def _role(message: Mapping[str, Any], hosted_shells: frozenset[str] = frozenset()) -> str:
    """A captured message's role as a client sent it, bounded and valid UTF-8 like every other captured field. A
    Responses API input item has none unless it is a message: a tool's output (``function_call_output``, any
    ``*_output``) is the tool's, the model's own items sent back (a tool call, its reasoning) the assistant's."""
    role = message.get("role")
    if not role:
        kind = message.get("type")
        if not isinstance(kind, str):
            return "user"
        return "tool" if kind.endswith("_output") and not _server_output(message, hosted_shells) else "assistant"
    return field_text(role, MAX_ROLE_CHARS) if isinstance(role, str) else "user"


#: Responses API tool outputs that are an image (a computer call's screenshot), not shown as text.
_IMAGE_OUTPUTS: Final = frozenset(("computer_screenshot", "input_image", "input_file"))


def _tool_output(item: Mapping[str, Any]) -> Any:
    """What a Responses API tool output item shows: its ``output`` (text, or content parts whose text is kept), a
    shell call's commands' stdout and stderr, nothing for a screenshot or a missing output."""
    output = item.get("output")
    if output is None or (
        isinstance(output, dict) and isinstance(output.get("type"), str) and output["type"] in _IMAGE_OUTPUTS
    ):
        return ""
    if isinstance(output, list) and not any(isinstance(p, dict) and "text" in p for p in output):
        runs = [p for p in output[:MAX_CAPTURED_TOOL_PARTS] if isinstance(p, dict)]
        return "".join(f"{p.get('stdout') or ''}{p.get('stderr') or ''}" for p in runs)
    return output


def _finish_reason(reason: str) -> str:
    """An output message's ``finish_reason``: the conventions' value for a provider's word that has one."""
    return _FINISH_REASONS.get(reason, reason)


def _server_tool_call(call_id: Any, name: Any, kind: str) -> dict[str, Any]:
    """A call of a tool the provider runs itself (``kind``: ``web_search``, ``code_interpreter``, ``mcp``, ...), as
    the conventions' ``server_tool_call`` part."""
    return {
        "type": "server_tool_call",
        "id": _short(call_id),
        "name": _short(name) or kind,
        "server_tool_call": {"type": field_text(kind, MAX_TOOL_FIELD_CHARS)},
    }


def _server_tool_result(call_id: Any, kind: str) -> dict[str, Any]:
    """The result of a tool the provider ran itself, as the conventions' ``server_tool_call_response`` part (its
    content, search results and the like, is not shown)."""
    return {
        "type": "server_tool_call_response",
        "id": _short(call_id),
        "server_tool_call_response": {"type": field_text(kind, MAX_TOOL_FIELD_CHARS)},
    }


#: The span event marking the first generated token (or tool call) of a stream.
FIRST_TOKEN_EVENT: Final = "gen_ai.first_token"


def _span_exporter(kind: str, protocol: str) -> Any:
    """A span exporter for one ``OTEL_TRACES_EXPORTER`` entry; endpoint, headers and TLS come from the env."""
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if protocol == "grpc":
        from .otlp_grpc import OTLPGrpcSpanExporter  # the SDK's, with our span encoding

        return OTLPGrpcSpanExporter()
    from .otlp_spans import OTLPSpanExporter as HttpSpanExporter  # the SDK's, with a cheaper span encoding

    return HttpSpanExporter()


class Tracing:
    """The tracer provider and tracer of one middleware instance.

    Args:
        provider: the tracer provider to use.
        owned: True when we created it (then :meth:`shutdown` shuts it down).
        settings: resolved middleware settings (content capture, redaction).

    Build it with :meth:`create`, which returns None when tracing is off::

        tracing = Tracing.create(settings)
        if tracing is not None:
            app = tracing.wrap(app)
    """

    def __init__(self, provider: TracerProvider, owned: bool, settings: Settings) -> None:
        self.provider = provider
        self.owned = owned
        self.tracer: Tracer = provider.get_tracer(TRACER_NAME, __version__)
        self.observer = SpanObserver(self.tracer, settings, server_span=not settings.tracing_http_span)

    @classmethod
    def create(
        cls,
        settings: Settings,
        provider: TracerProvider | None = None,
        env: Mapping[str, str] | None = None,
        otel: OTelEnvironment | None = None,
    ) -> Tracing | None:
        """Decide whether tracing is on and find or build the provider; None means off. ``otel``: ``env`` read
        already (by the middleware's setup, which warns once of a value it does not know)."""
        otel = otel or OTelEnvironment.resolve(env)
        if provider is not None:
            return cls(provider, False, settings)
        if otel.sdk_disabled:
            return None
        from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider

        current = trace.get_tracer_provider()
        if isinstance(current, SDKTracerProvider):
            return cls(current, False, settings)  # the application's own provider: use it, never replace it
        exporters = otel.traces_exporters
        if not exporters:
            return None  # nothing configured: nothing exported, nothing slowed
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the SDK provider reads
        # OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG itself.
        # Flushed at exit by Telemetry's handler, within a bound; the SDK's own would wait 30 s on a silent collector.
        sdk_provider = SDKTracerProvider(resource=Resource.create(), shutdown_on_exit=False)
        for kind in exporters:
            if kind not in ("otlp", "console"):
                logger.warning("llm-telemetry: %s: unsupported exporter %r ignored", OTEL_TRACES_EXPORTER, kind)
                continue
            sdk_provider.add_span_processor(
                batch_processor(BatchSpanProcessor, _span_exporter(kind, otel.traces_protocol), "OTEL_BSP")
            )
        # Deliberately not installed as the global provider: the application owns that choice.
        return cls(sdk_provider, True, settings)

    @property
    def resource(self) -> Any:
        """The provider's SDK ``Resource`` (its spans', ``service.name`` among it), or None for a provider that has
        none."""
        from opentelemetry.sdk.resources import Resource

        resource = getattr(self.provider, "resource", None)
        return resource if isinstance(resource, Resource) else None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """Wrap ``app`` in OpenTelemetry's ASGI middleware: the HTTP server span and ``traceparent`` extraction.

        Its per-message ``receive``/``send`` spans are turned off: they cost about 100 µs per streamed chunk.
        Its HTTP metrics go to a no-op meter: the LLM metrics are ours, and the app may record HTTP ones itself.
        An exception leaving the app is recorded on its span as on the LLM span, bounded and redacted
        (:class:`_HTTPSpan`); its query string's values are hidden (:func:`_scrub_query`).
        It reads the caller's context itself, with a getter of its own: a trace context or baggage header the W3C
        propagators would ignore with a WARNING on every request is screened out of the headers it reads it from
        (:func:`_screened_scope`), and the request's own headers are put back before the app sees them.
        """
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware, asgi_getter
        from opentelemetry.metrics import NoOpMeterProvider

        async def unscreened(scope: Scope, receive: Receive, send: Send) -> None:
            sent = scope.pop(_SENT_HEADERS, None)
            if sent is not None:
                scope["headers"] = sent
            await app(scope, receive, send)

        async def screened(scope: Scope, receive: Receive, send: Send) -> None:
            headers = _screened_scope(scope["headers"], asgi_getter)
            if headers is None:
                await wrapped(scope, receive, send)
                return
            scope[_SENT_HEADERS], scope["headers"] = scope["headers"], headers
            try:
                await wrapped(scope, receive, send)
            finally:
                sent = scope.pop(_SENT_HEADERS, None)  # (the middleware failed before the app)
                if sent is not None:
                    scope["headers"] = sent

        wrapped = OpenTelemetryMiddleware(
            unscreened,
            tracer_provider=self.provider,
            meter_provider=NoOpMeterProvider(),
            exclude_spans=["receive", "send"],
            server_request_hook=_scrub_query,
        )
        # Its own tracer (its instrumentation scope and schema URL kept), whose spans record exceptions our way.
        wrapped.tracer = _HTTPTracer(wrapped.tracer, self.observer.redact)
        return screened

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        flush = getattr(self.provider, "force_flush", None)
        return bool(flush(timeout_millis)) if flush is not None else True

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()  # type: ignore[attr-defined]


class _HTTPTracer(trace.Tracer):
    """The tracer OpenTelemetry's ASGI middleware opens its HTTP server span with: its own, the span wrapped in an
    :class:`_HTTPSpan`."""

    def __init__(self, tracer: Tracer, redact: Redactor) -> None:
        self._tracer = tracer
        self._redact = redact

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return _HTTPSpan(self._tracer.start_span(*args, **kwargs), self._redact)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer.start_as_current_span(*args, **kwargs)


class _HTTPSpan(trace.Span):
    """OpenTelemetry's HTTP server span (the SDK's), but an exception is recorded on it as on the LLM span: the
    ``exception`` event and the status description bounded and redacted (:func:`exception_attributes`), where
    ``trace.use_span``, around the app, records them whole (an app's error may quote a key, or the prompt).
    Everything else is the SDK span's (``attributes``, ``kind``, ...)."""

    def __init__(self, span: trace.Span, redact: Redactor) -> None:
        self._span = span
        self._redact = redact
        #: The status description of the last exception recorded, as shown.
        self._described: str | None = None
        # (Called about 10 and 6 times a request: the SDK span's own, without a call through this one's.)
        self.set_attribute = span.set_attribute  # type: ignore[method-assign]
        self.is_recording = span.is_recording  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        if name == "_span":
            raise AttributeError(name)
        return getattr(self._span, name)

    # (Read on every request, by the instrumentation and by _scrub_query: direct, without __getattr__'s failed lookup
    # first, which cost about 1 µs each.)
    @property
    def kind(self) -> Any:
        return self._span.kind  # type: ignore[attr-defined]

    @property
    def attributes(self) -> Any:
        return self._span.attributes  # type: ignore[attr-defined]

    def get_span_context(self) -> trace.SpanContext:
        return self._span.get_span_context()

    def is_recording(self) -> bool:
        return self._span.is_recording()

    def update_name(self, name: str) -> None:
        self._span.update_name(name)

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self._span.set_attributes(attributes)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        self._span.add_event(name, attributes, timestamp)

    def add_link(self, context: trace.SpanContext, attributes: Any = None) -> None:
        self._span.add_link(context, attributes)

    def end(self, end_time: int | None = None) -> None:
        self._span.end(end_time)

    def record_exception(
        self, exception: BaseException, attributes: Any = None, timestamp: int | None = None, escaped: bool = False
    ) -> None:
        recorded = exception_attributes(exception, escaped, self._redact)
        self._described = f"{type(exception).__name__}: {recorded[EXCEPTION_MESSAGE]}"
        if attributes:
            recorded.update(attributes)
        self._span.add_event("exception", recorded, timestamp)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if description:
            # ``use_span`` describes the status with the exception it just recorded, whole: shown as recorded.
            # (Otherwise the instrumentation's own, an odd status code: bounded and redacted as a message.)
            try:
                described = self._described or _head(description, MAX_EXCEPTION_MESSAGE_CHARS, self._redact)
            except Exception:
                described = None
            description = valid_text(described) if described else None
        self._span.set_status(code, description)


#: The HTTP server span's attributes that carry the request's path.
_PATH_ATTRIBUTES: Final = ("http.url", "url.full", "http.target", "url.path")
#: The HTTP server span's attributes that carry the request's query string, and whether they hold the URL around it.
_QUERY_ATTRIBUTES: Final = (("http.url", True), ("url.full", True), ("http.target", True), ("url.query", False))


def _scrub_query(span: Any, scope: Mapping[str, Any]) -> None:
    """OpenTelemetry's ASGI middleware puts the query string on its HTTP server span, and a query may carry a key
    (``?key=``, ``?api_key=``): every parameter's value is shown as ``REDACTED``, its name kept, as the HTTP
    conventions redact the values they know to be secret; a part without ``=`` is all value, and shows as
    ``REDACTED`` (a bare ``?sk-...``: nothing tells a flag from a key). A key in the path (one sent as an Azure
    deployment's name), in its attributes and its name, shows as ``[key]``, as on the LLM span."""
    attributes = getattr(span, "attributes", None)
    if attributes is None:
        return
    path = scope.get("path")
    masked = mask_keys(path) if isinstance(path, str) else None
    if path and masked and masked != path:
        for key in _PATH_ATTRIBUTES:
            value = attributes.get(key)
            if isinstance(value, str) and path in value:
                span.set_attribute(key, value.replace(path, masked))
        name = getattr(span, "name", None)
        if isinstance(name, str) and path in name:
            span.update_name(name.replace(path, masked))
    query = scope.get("query_string")
    if not query:
        return
    # (As the instrumentation decodes it.)
    text = query.decode("utf-8", errors="replace") if isinstance(query, bytes) else str(query)
    scrubbed = "&".join(
        f"{part.split('=', 1)[0]}=REDACTED" if "=" in part else "REDACTED" if part else part for part in text.split("&")
    )
    for key, in_url in _QUERY_ATTRIBUTES:
        value = attributes.get(key)
        if isinstance(value, str) and value:
            if in_url:
                # (The URL up to the query: after the path where it is found, which may hold a decoded "?" itself;
                # in a URL, past its scheme, while a target starts with the path.)
                start = 0 if value.startswith("/") or "://" not in value else value.find("://") + 3
                end = value.find(masked, start) if masked else -1
                head = value[: end + len(masked)] if masked and end >= 0 else value.split("?", 1)[0]
                span.set_attribute(key, f"{head}?{scrubbed}")
            else:
                span.set_attribute(key, scrubbed)


def _wall_ns(reading: float, now_perf: float, now_ns: int) -> int:
    """Convert a ``perf_counter`` reading to epoch nanoseconds, relative to a (perf, epoch) pair taken together."""
    return now_ns - int((now_perf - reading) * 1e9)


class _HeaderGetter(Getter[Any]):
    """Reads propagation headers from ASGI ``scope["headers"]`` for :func:`opentelemetry.propagate.extract`."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        wanted = key.encode("latin-1")
        values: list[str] | None = None
        for name, value in carrier:  # (a loop: on Python 3.11 a comprehension is a call of its own)
            if name == wanted:
                if values is None:
                    values = [value.decode("latin-1")]
                else:
                    values.append(value.decode("latin-1"))
        return values

    def keys(self, carrier: Any) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


class _ScreeningGetter(_HeaderGetter):
    """:class:`_HeaderGetter` handing OpenTelemetry's W3C propagators only what they keep without a warning: the
    members of the ``baggage`` header the baggage propagator keeps (see :func:`_screened_baggage`), no
    ``traceparent`` the trace context propagator ignores for its length, and a ``tracestate`` it ignores as no
    ``tracestate`` or an empty one, as it would read it (see :func:`_screened_tracestate`). The screening is done as a
    propagator asks for the header, on the values its own lookup finds: a request without one costs nothing more."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        wanted = key.encode("latin-1")
        values: list[str] | None = None
        for name, value in carrier:  # (as _HeaderGetter.get, inline: a call of it would cost as much as the screen)
            if name == wanted:
                if values is None:
                    values = [value.decode("latin-1")]
                else:
                    values.append(value.decode("latin-1"))
        return None if values is None else _screened(key, values)


def _screened(key: str, values: list[str]) -> list[str] | None:
    """What the screening getter hands a W3C propagator of the header ``key`` (its ``values``, decoded): ``values``
    themselves when the propagator reads them without a warning."""
    if key == "traceparent":
        if len(values[0]) > _TRACEPARENT_CHARS:  # (the one the propagator reads)
            _refused(_TRACE_CONTEXT_REFUSED)
            return None  # (ignored: as if not sent)
    elif key == "tracestate":
        screened = _screened_tracestate(values)
        if screened is not values:
            _refused(_TRACE_CONTEXT_REFUSED)
            return screened
    elif key == "baggage":
        kept = _screened_baggage(values[0])  # (the one the propagator reads)
        if kept is not None:
            _refused(_BAGGAGE_REFUSED)
            return [kept, *values[1:]]
    return values


_HEADERS = _HeaderGetter()
_SCREENING = _ScreeningGetter()
#: The request headers the default propagators (W3C trace context and baggage) read a context from.
_PROPAGATION_HEADERS: Final = frozenset((b"traceparent", b"baggage"))
#: The request headers the screening getter screens.
_SCREENED_HEADERS: Final = ("traceparent", "tracestate", "baggage")
_SCREENED_NAMES: Final = frozenset(name.encode() for name in _SCREENED_HEADERS)
_EMPTY_CONTEXT: Final = context.Context()
#: The ASGI scope key the request's own headers wait under while OpenTelemetry's ASGI middleware reads the screened
#: ones (see Tracing.wrap).
_SENT_HEADERS: Final = "llm_telemetry.sent_headers"
#: The global propagator last looked at, whether it is the default, and the getter it is given: one tuple, replaced
#: whole, so that a thread reading it while another replaces it (a propagator set while requests are served) gets
#: the three of one propagator, never some of each.
_textmap_seen: tuple[Any, bool, _HeaderGetter] = (None, False, _HEADERS)


def _looked_at(textmap: Any) -> tuple[Any, bool, _HeaderGetter]:
    """Look at the global propagator ``textmap`` (see ``_textmap_seen``)."""
    global _textmap_seen
    getter = _SCREENING if _screens_headers(textmap) else _HEADERS
    seen = _textmap_seen = (textmap, _is_default_textmap(textmap), getter)
    return seen


def _is_default_textmap(textmap: Any) -> bool:
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    inner = getattr(textmap, "_propagators", None)
    return (
        type(textmap) is CompositePropagator
        and isinstance(inner, (list, tuple))
        and [type(p) for p in inner] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    )


#: Propagators that read none of the headers the screening getter screens (``traceparent``, ``tracestate``,
#: ``baggage``), by module and class name: the B3 ones read ``b3`` and ``x-b3-*``, Jaeger's ``uber-trace-id`` and
#: ``uberctx-*`` (packages of their own, which the application installs). Exactly these classes: a subclass may
#: read more.
_BLIND_PROPAGATORS: Final = frozenset(
    (
        ("opentelemetry.propagators.b3", "B3MultiFormat"),
        ("opentelemetry.propagators.b3", "B3SingleFormat"),
        ("opentelemetry.propagators.jaeger", "JaegerPropagator"),
    )
)


def _screens_headers(textmap: Any) -> bool:
    """Whether ``textmap`` is given the screening getter: OpenTelemetry's W3C trace context or baggage propagator, or
    a composite of them (``OTEL_PROPAGATORS`` naming ``tracecontext``, ``baggage`` or both, in either order), alone or
    beside propagators that read none of their headers (``b3``, ``b3multi``, ``jaeger``). Another propagator beside
    them might read the headers by rules of its own, and gets them as sent."""
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    inner = getattr(textmap, "_propagators", None) if type(textmap) is CompositePropagator else [textmap]
    if not isinstance(inner, (list, tuple)):
        return False
    w3c = {W3CBaggagePropagator, TraceContextTextMapPropagator}
    kinds = {type(p) for p in inner}
    return bool(kinds & w3c) and all(
        kind in w3c or (kind.__module__, kind.__qualname__) in _BLIND_PROPAGATORS for kind in kinds
    )


def _baggage_rules() -> tuple[Any, Any, Any] | None:
    """The W3C baggage propagator's own splitting pattern and member check, and a pattern of headers it keeps whole
    (or None where it cannot be made), or None where this API has neither."""
    try:
        from opentelemetry.baggage import _is_valid_pair
        from opentelemetry.util.re import _DELIMITER_PATTERN, _KEY_FORMAT, _VALUE_FORMAT
    except ImportError:  # pragma: no cover - another API version: its propagator reads the header as it is
        return None
    return _DELIMITER_PATTERN, _is_valid_pair, _plain_baggage(_KEY_FORMAT, _VALUE_FORMAT)


def _plain_baggage(key: str, value: str) -> re.Pattern[str] | None:
    """A pattern matching only headers whose every member the W3C baggage propagator keeps: members of its own key
    and value characters (``key=value``, then properties ``;key`` or ``;key=value``) and nothing else, no whitespace,
    no empty member. Such a header, within its limits, is handed over as sent, checked once by a C-level match
    rather than member by member. None when a key may hold a delimiter (``=``, ``;``, ``,``) or a value ``;`` or
    ``,``: then what the members are would not be plain."""
    if any(re.fullmatch(key, c) for c in "=;, \t") or any(re.fullmatch(value, c) for c in ";, \t"):
        return None  # pragma: no cover - not with any API version so far
    member = f"(?:{key})=(?:{value})(?:;(?:{key})(?:=(?:{value}))?)*"
    return re.compile(f"{member}(?:,{member})*")


_BAGGAGE_RULES: Final = _baggage_rules()
#: The W3C baggage propagator's limits, read from it (``W3CBaggagePropagator``; the values of API 1.45 where it has
#: none): a header over this many bytes is ignored whole; a member over this many characters, or past this many
#: members, is ignored.
_BAGGAGE_HEADER_BYTES: Final[int] = getattr(W3CBaggagePropagator, "_MAX_HEADER_LENGTH", 8192)
_BAGGAGE_MEMBER_CHARS: Final[int] = getattr(W3CBaggagePropagator, "_MAX_PAIR_LENGTH", 4096)
_BAGGAGE_MEMBERS: Final[int] = getattr(W3CBaggagePropagator, "_MAX_PAIRS", 180)


def _screened_baggage(header: str) -> str | None:
    """The members of a ``baggage`` header that the W3C baggage propagator keeps, joined by commas (``""``: none),
    or None when it keeps all of them. The propagator logs a WARNING for each member it ignores, most of them with
    the member's text, and for a header over its size limit with the whole header: a client sending 180 malformed
    members in 7 KB made 180 log lines and took 3.1 ms of the server's CPU per request (0.4 ms without it), and
    a 60 KB header a 60 KB line. Given only the members it keeps, it builds the same baggage and logs nothing."""
    rules = _BAGGAGE_RULES
    if rules is None:
        return None
    delimiter, valid_pair, plain = rules
    if (
        plain is not None
        and len(header) <= _BAGGAGE_HEADER_BYTES
        and header.count(",") < _BAGGAGE_MEMBERS
        and plain.fullmatch(header) is not None
        and (len(header) <= _BAGGAGE_MEMBER_CHARS or max(map(len, header.split(","))) <= _BAGGAGE_MEMBER_CHARS)
    ):
        # Plain members, each of them kept: the propagator checks them, once (member by member here too, they
        # were checked twice: a valid three-member header cost 36 k instructions more than the propagator's own).
        return None
    if len(header.encode()) > _BAGGAGE_HEADER_BYTES:
        return ""
    kept: list[str] = []
    refused = False
    members = 0
    for entry in delimiter.split(header):
        if not entry:
            continue  # (an empty member is no fault)
        if not entry.isascii() or len(entry) > _BAGGAGE_MEMBER_CHARS:
            refused = True
            continue
        if members >= _BAGGAGE_MEMBERS:
            refused = True
            break
        members += 1
        # (The members kept, joined, are never longer than the header: within its size limit.)
        name, sep, value = entry.partition("=")
        if not sep or not valid_pair(name.strip(" \t"), value.strip(" \t")):
            refused = True
            continue
        kept.append(entry)
    return ",".join(kept) if refused else None


def _trace_context_rules() -> tuple[int, Any, int, int] | None:
    """The W3C trace context propagator's limits and member pattern: the longest ``traceparent`` it reads, its
    ``tracestate`` member pattern, the longest ``tracestate`` (its fields joined) and the most members it keeps; None
    where this API has none of them."""
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        from opentelemetry.trace.span import (
            _TRACECONTEXT_MAXIMUM_TRACESTATE_KEYS,
            _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH,
            _member_pattern,
        )
    except ImportError:  # pragma: no cover - another API version: its propagator reads the headers as they are
        return None
    longest = getattr(TraceContextTextMapPropagator, "_TRACEPARENT_MAXIMUM_LENGTH", None)
    if not isinstance(longest, int):  # pragma: no cover - likewise
        return None
    return longest, _member_pattern, _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH, _TRACECONTEXT_MAXIMUM_TRACESTATE_KEYS


_TRACE_CONTEXT_RULES: Final = _trace_context_rules()
#: Past this many characters the trace context propagator ignores a ``traceparent`` with a WARNING.
_TRACEPARENT_CHARS: Final[int] = _TRACE_CONTEXT_RULES[0] if _TRACE_CONTEXT_RULES else sys.maxsize
#: ``tracestate`` members every version of the W3C rules keeps: a key, ``=``, and 1 to 256 printable characters
#: without whitespace, ``,`` or ``=``; no whitespace around them and no empty member.
_PLAIN_TRACESTATE_MEMBER: Final = (
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x21-\x2b\x2d-\x3c\x3e-\x7e]{1,256}"
)
_PLAIN_TRACESTATE: Final = re.compile(f"{_PLAIN_TRACESTATE_MEMBER}(?:,{_PLAIN_TRACESTATE_MEMBER})*")


def _screened_tracestate(fields: list[str]) -> list[str] | None:
    """What the trace context propagator is given of the request's ``tracestate`` fields so that it reads the same
    trace state without a WARNING: ``fields`` themselves when it reads them without one; None (no header) for fields
    over its length limit, which it ignores, logging so; ``[""]`` (an empty trace state) for fields with a
    malformed member, or more members than it keeps, which it reads as an empty trace state, logging so, the first
    malformed member's text in the line (up to 8 KB of a client's bytes on every request)."""
    rules = _TRACE_CONTEXT_RULES
    if rules is None:
        return fields
    _, member, longest, most = rules
    if (
        len(fields) == 1
        and len(fields[0]) <= longest
        and fields[0].count(",") < most
        and _PLAIN_TRACESTATE.fullmatch(fields[0]) is not None
    ):
        return fields  # (plain members, fewer than it keeps: the common case, checked by one C-level match)
    if sum(len(field) for field in fields) + len(fields) - 1 > longest:
        return None
    keys: set[str] = set()
    for field in fields:  # (as TraceState.from_header reads them)
        for entry in field.split(","):
            entry = entry.strip(" \t")
            if not entry:
                continue
            match = member.fullmatch(entry)
            if match is None:
                return [""]
            if match.group(1) in keys:
                return fields  # (a duplicate key: it reads an empty trace state, without a warning)
            keys.add(match.group(1))
    return [""] if len(keys) > most else fields


#: What was refused, each said once per process (see :func:`_refused`).
_BAGGAGE_REFUSED: Final = (
    "llm-telemetry: a request's baggage header had members the W3C baggage propagator ignores "
    "(malformed, non-ASCII, too long or too many); they are ignored without a warning for each (logged once)"
)
_TRACE_CONTEXT_REFUSED: Final = (
    "llm-telemetry: a request's traceparent or tracestate header was one the W3C trace context propagator ignores "
    "(too long, or a malformed tracestate or one of too many members); it is ignored without a warning for each "
    "request (logged once)"
)
_refusals_logged: set[str] = set()


def _refused(message: str) -> None:
    """Log ``message``, once per process."""
    if message not in _refusals_logged:
        _refusals_logged.add(message)
        logger.warning(message)


def _extract(headers: Any, apart: bool = False) -> context.Context:
    """``propagate.extract`` of the request headers. With the default propagators and neither a ``traceparent``
    nor a ``baggage`` header, what it would return (an empty context) without asking it. With the W3C propagators
    only (these, or either alone), they are handed the headers screened of what they would ignore with a WARNING on
    every request (see :class:`_ScreeningGetter`): the same context, without the warnings.
    ``apart``: into an empty context rather than the current one."""
    textmap = propagate.get_global_textmap()
    seen = _textmap_seen
    if textmap is not seen[0]:
        seen = _looked_at(textmap)
    if seen[1]:
        for key, _ in headers:
            if key in _PROPAGATION_HEADERS:
                break
        else:
            return _EMPTY_CONTEXT
    # (The propagator looked at, as propagate.extract would call it: not the global one again, which another thread
    # may have replaced since.)
    return textmap.extract(headers, _EMPTY_CONTEXT if apart else None, getter=seen[2])  # type: ignore[no-any-return]


def _screened_scope(headers: Any, getter: Any) -> list[tuple[bytes, bytes]] | None:
    """An ASGI request's ``headers`` as OpenTelemetry's ASGI middleware is to read its context from them: with the
    headers the screening getter screens as it hands them to the W3C propagators (see :class:`_ScreeningGetter`),
    each read as the middleware's own ``getter`` reads it; None when that is ``headers`` themselves (nothing screened
    out, or global propagators it does not screen for). The propagators read the same context from them, without the
    warnings. (The screened ones come last; what the propagators keep of them is ASCII, which the middleware reads
    back as it is.)"""
    for name, _ in headers:
        if name in _SCREENED_NAMES:
            break
    else:
        return None
    textmap = propagate.get_global_textmap()
    seen = _textmap_seen
    if textmap is not seen[0]:
        seen = _looked_at(textmap)
    if seen[2] is not _SCREENING:
        return None
    carrier = {"headers": headers}
    changed: dict[bytes, list[str] | None] = {}
    for key in _SCREENED_HEADERS:
        values = getter.get(carrier, key)
        if values:
            screened = _screened(key, values)
            if screened is not values:
                changed[key.encode()] = screened
    if not changed:
        return None
    kept = [(name, value) for name, value in headers if name.lower() not in changed]
    for name, values in changed.items():
        kept.extend((name, value.encode("utf-8", "surrogatepass")) for value in values or ())
    return kept


class _RuntimeContext:
    """The current-context operations the LLM span needs (is a span current; set the span in a new context and
    make that current; restore), done on the API's ``ContextVar`` directly when the API keeps the current
    context in one (its default runtime context; checked here on a sample), else through the API's functions.
    Directly, each skips three or four Python calls of the API's wrappers."""

    __slots__ = ("runtime", "span_key", "var")

    def __init__(self) -> None:
        self.runtime: Any = None
        self.var: Any = None
        self.span_key: Any = None
        try:
            from contextvars import ContextVar

            from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
            from opentelemetry.trace.propagation import _SPAN_KEY

            runtime = context._RUNTIME_CONTEXT
            var = getattr(runtime, "_current_context", None)
            if type(runtime) is not ContextVarsRuntimeContext or type(var) is not ContextVar:
                return
            probe = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
            base = context.set_value("llm_telemetry.probe", 1)
            expected = trace.set_span_in_context(probe, base)
            values = base.copy()
            values[_SPAN_KEY] = probe
            made = context.Context(values)
            if type(made) is not type(expected) or made != expected or trace.get_current_span(made) is not probe:
                return
            token = var.set(made)
            try:
                if context.get_current() is not made:
                    return
            finally:
                var.reset(token)
        except Exception:
            return
        self.runtime, self.var, self.span_key = runtime, var, _SPAN_KEY

    def current_span_context(self) -> trace.SpanContext | None:
        """``trace.get_current_span().get_span_context()`` when it is valid, else None."""
        if self.runtime is not None and context._RUNTIME_CONTEXT is self.runtime:
            if self.var.get().get(self.span_key) is None:
                return None  # what get_current_span gives then: the invalid span
        found = trace.get_current_span().get_span_context()
        return found if found.is_valid else None

    def attach_span(self, span: trace.Span, call: LLMCall) -> tuple[context.Context, Any]:
        """``ctx = trace.set_span_in_context(span)`` and ``context.attach(ctx)``: (ctx, token). The task that made it
        current, and its call, are kept beside it (see :meth:`leaked`)."""
        made = (_current_task(), call)
        if self.runtime is not None and context._RUNTIME_CONTEXT is self.runtime:
            var = self.var
            values = var.get().copy()
            values[self.span_key] = span
            values[_TASK_KEY] = made
            ctx = context.Context(values)
            return ctx, var.set(ctx)
        ctx = context.set_value(_TASK_KEY, made, trace.set_span_in_context(span))
        return ctx, context.attach(ctx)

    def leaked(self) -> bool:
        """Whether the current context is one this middleware made current for a request that has since answered,
        in another task: an earlier request's, which uvicorn passes on to the next request on a connection when that
        one's body paused its reading (over 64 KiB, on asyncio's event loop) or when requests are pipelined (CPython
        #140947). Its span, and any span made in it since, is no parent of the new request, which is another server
        span. An app that calls itself in process (through httpx's ASGI transport, say, one call after another or
        several at once in tasks of their own) does so while its own request is still answering: that call is a
        child."""
        if self.runtime is not None and context._RUNTIME_CONTEXT is self.runtime:
            made = self.var.get().get(_TASK_KEY)
        else:
            made = context.get_value(_TASK_KEY)
        return made is not None and made[1].end is not None and made[0] is not _current_task()

    def detach(self, token: Any) -> None:
        """``context.detach(token)``: a token it cannot restore is logged by the API, as there."""
        if self.runtime is not None and context._RUNTIME_CONTEXT is self.runtime:
            try:
                self.var.reset(token)
                return
            except Exception:
                pass  # the API's detach fails the same way and logs it
        context.detach(token)


#: The context key of the task in which this middleware made its LLM span current, and of that request's call.
_TASK_KEY: Final = context.create_key("llm_telemetry.task")


def _current_task() -> Any:
    """The running asyncio task, or None (no event loop running here, or another async library's)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


_CONTEXT: Final = _RuntimeContext()


def detach(token: Any) -> None:
    """Restore the context the LLM span's ``attach_span`` replaced (as ``context.detach(token)``)."""
    _CONTEXT.detach(token)


def leaked_into() -> bool:
    """Whether the current context is an earlier request's, passed on by the server (see
    ``_RuntimeContext.leaked``)."""
    return _CONTEXT.leaked()


def _server_attributes(scope: Mapping[str, Any], path: str, attributes: dict[str, Any]) -> None:
    """The HTTP server attributes readable from the ASGI scope without looking at the headers."""
    attributes[HTTP_REQUEST_METHOD] = scope.get("method", "POST")
    # The client's path, already bounded by the middleware; a key in it (a client that sent its key as an Azure
    # deployment's name) shown as ``[key]``, as in the model name taken from it.
    attributes[URL_PATH] = mask_keys(path) or path
    attributes[URL_SCHEME] = scope.get("scheme", "http")
    version = scope.get("http_version")
    if version:
        attributes[NETWORK_PROTOCOL_VERSION] = version
    server = scope.get("server")
    if server:
        attributes[SERVER_ADDRESS] = server[0]
        if len(server) > 1 and server[1] is not None:
            attributes[SERVER_PORT] = server[1]
    client = scope.get("client")
    if client:
        attributes[CLIENT_ADDRESS] = client[0]


class _Pipeline:
    """What the SDK's ``Tracer.start_span`` and ``Span.end`` use, read from an SDK tracer, when every part of it
    is one whose behaviour the middleware can reproduce: then the LLM span is an :class:`LLMSpan`, recorded
    without the SDK span's lock and per-attribute cleaning, and handed as the SDK's own ``ReadableSpan`` to the
    provider's span processors.

    The provider's sampler, id generator, resource, span limits and instrumentation scope are used as the SDK
    uses them. The span processors must be the SDK's batch or simple processors (whose ``on_start`` does
    nothing): an application's own processor may look at the live span, so with one (or a tracer that is not the
    SDK's, a disabled tracer, the SDK's internal metrics on, or an SDK release without these parts) the span is
    the SDK's. Processors added later are noticed on the next request.
    """

    __slots__ = (
        "_processors",
        "ends",
        "event",
        "make_readable",
        "multi",
        "random_ids",
        "redact",
        "span_context",
        "static_samplers",
        "tracer",
    )

    def __init__(self, tracer: Any, multi: Any, redact: Redactor) -> None:
        from opentelemetry.sdk.trace import Event

        self.tracer = tracer
        self.multi = multi
        #: What masks an exception the app records on the LLM span (:meth:`LLMSpan.record_exception`).
        self.redact = redact
        self._processors = multi._span_processors
        #: What each processor does with a sampled span that ends (see :func:`_sampled_end`).
        self.ends = tuple(map(_sampled_end, self._processors))
        self.event = _event_maker(Event)
        self.span_context = _span_context_maker()
        self.make_readable = _readable_maker()
        #: The SDK's parent-based and static sampler classes, when they keep their parts where
        #: :func:`_static_decision` reads them (then their decision is taken without a call and a
        #: ``SamplingResult``); else None.
        self.static_samplers = _static_samplers()
        #: The SDK's ``RandomIdGenerator`` class, when its ids are the random module's draws (checked on a
        #: sample); else None.
        self.random_ids = _random_ids()

    @classmethod
    def of(cls, tracer: Any, redact: Redactor) -> _Pipeline | None:
        try:
            from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor
            from opentelemetry.sdk.trace import Tracer as SDKTracer
            from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            return None
        if type(tracer) is not SDKTracer or not hasattr(trace.TraceFlags, "RANDOM_TRACE_ID"):
            return None
        try:
            multi = tracer.span_processor
            if type(multi) is not SynchronousMultiSpanProcessor or not tracer._is_enabled():
                return None
            if any(type(p) not in (BatchSpanProcessor, SimpleSpanProcessor) for p in multi._span_processors):
                return None
            if type(tracer._tracer_metrics) is not NoOpTracerMetrics:
                return None
            tracer.sampler, tracer.id_generator, tracer.resource, tracer._instrumentation_scope  # noqa: B018
            tracer._span_limits.max_span_attributes, tracer._span_limits.max_span_attribute_length  # noqa: B018
        except AttributeError:
            return None
        return cls(tracer, multi, redact)

    def current(self) -> bool:
        """Still as checked: no processor added since, the tracer still enabled."""
        return self.multi._span_processors is self._processors and bool(self.tracer._is_enabled())

    def start_span(
        self, name: str, parent: Any, kind: SpanKind, attributes: dict[str, Any], start_time: int
    ) -> trace.Span:
        """As the SDK's ``Tracer.start_span``: the parent from ``parent`` (or the current context), ids from the
        provider's generator, the decision (and any attributes and trace state) from its sampler."""
        tracer = self.tracer
        if parent is _EMPTY_CONTEXT:  # no traceparent: what get_current_span would find in it
            parent_span = trace.INVALID_SPAN_CONTEXT
        else:
            parent_span = trace.get_current_span(parent).get_span_context()
        # is_valid, read once: the API's SpanContext tuple keeps it at index 5 (its property is Python code).
        valid = parent_span[5] if type(parent_span) is trace.SpanContext else parent_span.is_valid
        ids = tracer.id_generator
        # The SDK's default generator: its draws from the random module's generator, without its two calls.
        getrandbits = random.getrandbits if type(ids) is self.random_ids else None
        if valid:
            trace_id = parent_span.trace_id
            random_id = parent_span.trace_flags.random_trace_id
            parent_context = parent_span
        elif getrandbits is not None:
            trace_id = getrandbits(128) or ids.generate_trace_id()  # (it draws again for the invalid id 0)
            random_id = True
            parent_context = None
        else:
            trace_id = ids.generate_trace_id()
            random_id = ids.is_trace_id_random()
            parent_context = None
        sampler = tracer.sampler
        static = self.static_samplers
        decision = _static_decision(sampler, parent_span, valid, *static) if static is not None else None
        if decision is not None:
            # The SDK's StaticSampler: its decision, the attributes as given, the parent's trace state.
            trace_state = parent_span.trace_state if valid else None
        else:
            result = sampler.should_sample(parent, trace_id, name, kind, attributes, ())
            decision = result.decision
            trace_state = result.trace_state
            if result.attributes != attributes:  # the sampler changed them: clean as the SDK would
                attributes = _cleaned(result.attributes, None)
        recording, sampled = _DECISIONS[id(decision)]  # (by id: Decision's hash is Python code)
        span_id = (getrandbits(64) or ids.generate_span_id()) if getrandbits is not None else ids.generate_span_id()
        flags = _FLAGS[sampled, bool(random_id)]
        make_span_context = self.span_context
        span_context = make_span_context(trace_id, span_id, flags, trace_state)
        if not recording:
            return trace.NonRecordingSpan(span_context)
        return LLMSpan(self, name, span_context, parent_context, kind, attributes, start_time, sampled)


def _sampled_end(processor: Any) -> Any:
    """What ``processor.on_end`` does with a sampled span: for the SDK's batch processor, its queue's ``emit`` (its
    ``on_end`` only reads the span's sampled flag through three properties, then calls that); else ``on_end``."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if type(processor) is BatchSpanProcessor:
        emit = getattr(getattr(processor, "_batch_processor", None), "emit", None)
        if callable(emit):
            return emit
    return processor.on_end


def _static_decision(sampler: Any, parent: trace.SpanContext, valid: bool, parent_based: Any, static: Any) -> Any:
    """The decision of the SDK's ``StaticSampler`` (always on or off), directly or as the delegate
    ``ParentBased`` picks for ``parent`` (``valid``: its ``is_valid``; as its ``should_sample`` picks it); None for
    any other sampler."""
    if type(sampler) is parent_based:
        if valid:
            if parent.is_remote:
                if parent.trace_flags.sampled:
                    sampler = sampler._remote_parent_sampled
                else:
                    sampler = sampler._remote_parent_not_sampled
            elif parent.trace_flags.sampled:
                sampler = sampler._local_parent_sampled
            else:
                sampler = sampler._local_parent_not_sampled
        else:
            sampler = sampler._root
    if type(sampler) is static:
        return sampler._decision
    return None


def _static_samplers() -> tuple[Any, Any] | None:
    try:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased, StaticSampler

        parent_based = ParentBased(ALWAYS_ON)
        delegates = (
            parent_based._root,
            parent_based._remote_parent_sampled,
            parent_based._remote_parent_not_sampled,
            parent_based._local_parent_sampled,
            parent_based._local_parent_not_sampled,
        )
        readable = (
            delegates == (ALWAYS_ON, ALWAYS_ON, ALWAYS_OFF, ALWAYS_ON, ALWAYS_OFF)
            and type(ALWAYS_ON) is StaticSampler
            and ALWAYS_ON._decision is Decision.RECORD_AND_SAMPLE
            and ALWAYS_OFF._decision is Decision.DROP
            and set(_DECISIONS) == {id(decision) for decision in Decision}
        )
    except (ImportError, AttributeError):
        return None
    return (ParentBased, StaticSampler) if readable else None


def _random_ids() -> type | None:
    """The SDK's ``RandomIdGenerator`` when its trace and span ids are ``random.getrandbits(128)`` and ``(64)``
    drawn again while 0 (compared on samples from one state of the random module's generator), else None."""
    try:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        ids = RandomIdGenerator()
        state = random.getstate()
        try:
            drawn = [ids.generate_trace_id(), ids.generate_span_id(), ids.is_trace_id_random()]
            random.setstate(state)
            expected = [random.getrandbits(128), random.getrandbits(64), True]
        finally:
            random.setstate(state)  # the application's sequence, as if never sampled here
    except Exception:
        return None
    return RandomIdGenerator if drawn == expected else None


def _decisions() -> dict[int, tuple[bool, bool]]:
    from opentelemetry.sdk.trace.sampling import Decision

    found: dict[int, tuple[bool, bool]] = {}
    for decision in Decision:
        item: Any = decision  # the SDK leaves these methods unannotated
        found[id(decision)] = (bool(item.is_recording()), bool(item.is_sampled()))
    return found


#: (recording, sampled) by the id of the sampling decision.
_DECISIONS: Final = _decisions()


def _span_context_maker() -> Any:
    """A function making a local ``SpanContext`` from (trace id, span id, flags, trace state or None): the
    constructor, or, when the tuple it makes holds just these and the validity (checked here on samples), that
    tuple made at once."""
    new = tuple.__new__
    span_context = trace.SpanContext
    default_state = trace.DEFAULT_TRACE_STATE
    max_trace, max_span = (1 << 128) - 1, (1 << 64) - 1

    def construct(trace_id: int, span_id: int, flags: Any, trace_state: Any) -> Any:
        return span_context(trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=trace_state)

    def make(trace_id: int, span_id: int, flags: Any, trace_state: Any) -> Any:
        if trace_state is None:
            trace_state = default_state
        valid = 0 < trace_id <= max_trace and 0 < span_id <= max_span
        return new(span_context, (trace_id, span_id, False, flags, trace_state, valid))

    try:
        state = trace.TraceState([("k", "v")])
        for sample in ((1, 2, _FLAGS[True, True], None), (0, 2, _FLAGS[False, False], state), (1 << 128, 0, 0, None)):
            made, constructed = make(*sample), construct(*sample)
            if type(made) is not type(constructed) or tuple(made) != tuple(constructed):
                return construct
            fields = ("trace_id", "span_id", "is_remote", "trace_flags", "trace_state", "is_valid")
            if any(getattr(made, f) != getattr(constructed, f) for f in fields):
                return construct
    except Exception:
        return construct
    return make


def _event_maker(event: Any) -> Any:
    """A function making the SDK's ``Event`` from (name, attributes, timestamp): the constructor, or, when the
    constructor only stores its arguments (checked here on a sample), the object with those fields set at once."""
    new = object.__new__

    def make(name: str, attributes: Any, timestamp: int) -> Any:
        made = new(event)
        made._name, made._attributes, made._timestamp = name, attributes, timestamp
        return made

    try:
        if vars(make("n", {"a": 1.5}, 7)) == vars(event("n", {"a": 1.5}, 7)):
            return make
    except Exception:
        pass
    return event


def _readable_maker() -> Any:
    """A function making the SDK's ``ReadableSpan`` from its fields in :data:`_READABLE_FIELDS` order: the
    constructor, or, when the constructor only stores its arguments (checked here on a sample: the same fields,
    values and order), the object with those fields stored one by one, as the constructor stores them."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan

    def construct(*values: Any) -> Any:
        return ReadableSpan(**dict(zip(_READABLE_FIELDS, values, strict=True)))

    new = object.__new__

    def make(
        name: Any,
        context: Any,
        kind: Any,
        instrumentation_info: Any,
        instrumentation_scope: Any,
        parent: Any,
        start_time: Any,
        end_time: Any,
        attributes: Any,
        events: Any,
        links: Any,
        resource: Any,
        status: Any,
    ) -> Any:
        span = new(ReadableSpan)
        span._name = name
        span._context = context
        span._kind = kind
        span._instrumentation_info = instrumentation_info
        span._instrumentation_scope = instrumentation_scope
        span._parent = parent
        span._start_time = start_time
        span._end_time = end_time
        span._attributes = attributes
        span._events = events
        span._links = links
        span._resource = resource
        span._status = status
        return span

    try:
        context = trace.SpanContext(1, 2, False)
        sample: tuple[Any, ...] = ("n", context, SpanKind.SERVER, None, None, None, 1, 2, {"a": 1}, [], [])
        sample += (Resource({}), _UNSET)
        made, constructed = vars(make(*sample)), vars(construct(*sample))
        if made == constructed and list(made) == list(constructed):
            return make
    except Exception:
        pass
    return construct


#: The fields of the SDK's ``ReadableSpan``, in the order :class:`LLMSpan` passes them.
_READABLE_FIELDS: Final = (
    "name",
    "context",
    "kind",
    "instrumentation_info",
    "instrumentation_scope",
    "parent",
    "start_time",
    "end_time",
    "attributes",
    "events",
    "links",
    "resource",
    "status",
)


def _cleaned(attributes: Any, limits: Any, max_len: int | None = None) -> dict[str, Any]:
    from opentelemetry.attributes import BoundedAttributes

    return dict(BoundedAttributes(limits, attributes, immutable=False, max_value_len=max_len))


_FLAGS: Final = {
    (sampled, random): trace.TraceFlags(
        (trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
        | (getattr(trace.TraceFlags, "RANDOM_TRACE_ID", 0) if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


def _masked(text: str, redact: Redactor) -> str:
    """``redact(text)``, or an error when the redactor returns anything but text (the caller then withholds)."""
    shown = redact(text)
    if not isinstance(shown, str):
        raise TypeError(f"the redactor returned {type(shown).__name__}, not str")
    return shown


def _head(text: str, keep: int, redact: Redactor | None) -> str:
    """``text``'s first ``keep`` characters as shown: redacted over :data:`REDACTED_BEYOND_CAP` more, so that a value
    the cut goes through is recognised whole, and what is shown stops that far before the redacted window's edge
    (masks only shorten)."""
    if redact is None:
        return text[:keep]
    if len(text) <= keep + REDACTED_BEYOND_CAP:
        return _masked(text, redact)[:keep]
    shown = _masked(text[: keep + REDACTED_BEYOND_CAP], redact)
    return shown[: min(keep, max(len(shown) - REDACTED_BEYOND_CAP, 0))]


def _tail(text: str, keep: int, redact: Redactor | None) -> str:
    """``text``'s last ``keep`` characters as shown, as :func:`_head` its first."""
    if redact is None:
        return text[-keep:]
    if len(text) <= keep + REDACTED_BEYOND_CAP:
        return _masked(text, redact)[-keep:]
    shown = _masked(text[-(keep + REDACTED_BEYOND_CAP) :], redact)
    kept = min(keep, max(len(shown) - REDACTED_BEYOND_CAP, 0))
    return shown[len(shown) - kept :]


def exception_attributes(exception: BaseException, escaped: bool, redact: Redactor | None = None) -> dict[str, Any]:
    """The ``exception`` event's attributes, as the SDK's ``record_exception`` makes them, but bounded: the message
    cut to :data:`MAX_EXCEPTION_MESSAGE_CHARS`, the traceback to its first and last parts within
    :data:`MAX_EXCEPTION_STACKTRACE_CHARS`; an exception whose ``str`` raises is named by its type. ``redact``
    masks the message and the traceback (an error that quotes a URL with its ``?key=``, or the prompt), before
    they are cut and over more than is kept (a key the cut goes through is masked whole); a redactor that raises or
    returns anything but text withholds them."""
    kind = type(exception)
    module, qualname = kind.__module__, kind.__qualname__
    try:
        message = str(exception)
    except Exception:
        message = f"<{qualname} object, unprintable>"
    try:
        stack = "".join(traceback.format_exception(exception))
    except Exception:
        stack = f"{qualname}: {message[:MAX_EXCEPTION_MESSAGE_CHARS]}"
    try:
        shown = _head(message, MAX_EXCEPTION_MESSAGE_CHARS, redact)
        if len(stack) > MAX_EXCEPTION_STACKTRACE_CHARS:
            half = MAX_EXCEPTION_STACKTRACE_CHARS // 2
            head, tail = _head(stack, half, redact), _tail(stack, half, redact)
            stack = f"{head}\n... {len(stack) - 2 * half} characters left out ...\n{tail}"
        elif redact is not None:
            stack = _masked(stack, redact)
    except Exception:
        shown, stack = f"<{qualname} message withheld: the redactor failed>", qualname
    return {
        "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
        EXCEPTION_MESSAGE: valid_text(shown),
        "exception.stacktrace": valid_text(stack),
        "exception.escaped": str(escaped),
    }


class LLMSpan(trace.Span):
    """The LLM span as the middleware records it: a plain recording span, made into the SDK's ``ReadableSpan``
    and handed to the provider's span processors when it ends (see :class:`_Pipeline`).

    The middleware fills :attr:`attributes` with values already of OpenTelemetry's types. What the application
    sets on it while it is current (``trace.get_current_span().set_attribute(...)``, events, links, status,
    exceptions) is cleaned and bounded as the SDK does; span limits are applied when it ends.
    """

    __slots__ = (
        "_pipeline",
        "attributes",
        "context",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "sampled",
        "start_time",
        "status",
    )

    def __init__(
        self,
        pipeline: _Pipeline,
        name: str,
        span_context: trace.SpanContext,
        parent: trace.SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start_time: int,
        sampled: bool,
    ) -> None:
        self._pipeline = pipeline
        self.sampled = sampled
        self.name = name
        self.context = span_context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.start_time = start_time
        self.end_time: int | None = None
        self.events: list[Any] = []
        self.links: list[Any] = []
        self.status = _UNSET

    def get_span_context(self) -> trace.SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.end_time is None:
            self.attributes.update(_cleaned(attributes, None))

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self.end_time is not None:
            return
        from opentelemetry.attributes import BoundedAttributes
        from opentelemetry.sdk.trace import Event

        limits = self._pipeline.tracer._span_limits
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        self.events.append(Event(name, bounded, time_ns() if timestamp is None else timestamp))

    def add_link(self, context: trace.SpanContext, attributes: Any = None) -> None:
        if self.end_time is not None or (not context.is_valid and not attributes and not context.trace_state):
            return
        from opentelemetry.attributes import BoundedAttributes

        limits = self._pipeline.tracer._span_limits
        bounded = BoundedAttributes(
            limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        self.links.append(trace.Link(context, bounded))

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self.status = status
        elif status is not StatusCode.UNSET:
            self.status = Status(status, description)

    def record_exception(
        self, exception: BaseException, attributes: Any = None, timestamp: int | None = None, escaped: bool = False
    ) -> None:
        recorded = exception_attributes(exception, escaped, self._pipeline.redact)
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time = time_ns() if end_time is None else end_time
        pipeline = self._pipeline
        tracer = pipeline.tracer
        limits = tracer._span_limits
        attributes: Any = self.attributes
        most, longest = limits.max_span_attributes, limits.max_span_attribute_length
        if longest is not None or (most is not None and len(attributes) > most):
            from opentelemetry.attributes import BoundedAttributes

            attributes = BoundedAttributes(most, attributes, immutable=False, max_value_len=longest)
        events: Any = self.events
        if len(events) > limits.max_events or len(self.links) > limits.max_links:
            from opentelemetry.sdk.util import BoundedList

            events = BoundedList.from_seq(limits.max_events, events)
            self.links = BoundedList.from_seq(limits.max_links, self.links)  # type: ignore[assignment]
        resource = tracer.resource
        if resource is None:  # the SDK's ReadableSpan then makes an empty one
            from opentelemetry.sdk.resources import Resource

            resource = Resource.create({})
        make_readable = pipeline.make_readable  # (a call through the slot itself would not be specialised)
        readable = make_readable(
            self.name,
            self.context,
            self.kind,
            None,
            tracer._instrumentation_scope,
            self.parent,
            self.start_time,
            end_time,
            attributes,
            events,
            self.links,
            resource,
            self.status,
        )
        # What the SDK's SynchronousMultiSpanProcessor.on_end does. Its batch and simple processors drop a span
        # that is not sampled (recorded only); a sampled one goes to each as _sampled_end found.
        if self.sampled:
            for end in pipeline.ends:
                end(readable)


_UNSET: Final = Status(StatusCode.UNSET)
#: The kinds, as module globals (read on every request; an enum member read through its class is a slower lookup).
_INTERNAL: Final = SpanKind.INTERNAL
_SERVER: Final = SpanKind.SERVER


class SpanObserver:
    """Starts the LLM span when a call starts and fills and ends it when the call ends.

    Args:
        tracer: where spans come from.
        settings: content capture switch, size cap and redactor.
        server_span: when no span is current, make the LLM span the request's SERVER span (continuing the
            caller's ``traceparent``, with the HTTP server attributes); False: always an INTERNAL span.
    """

    def __init__(self, tracer: Tracer, settings: Settings, server_span: bool = True) -> None:
        self.tracer = tracer
        self.capture = settings.capture_content
        self.max_chars = settings.capture_content_max_chars
        self.redact: Redactor = settings.redact or redact
        self.server_span = server_span
        self._light: _Pipeline | None = None
        self._light_checked = False

    def start(self, call: LLMCall) -> None:
        now_perf, now_ns = perf_counter(), time_ns()
        attributes: dict[str, Any] = {
            names.GEN_AI_OPERATION_NAME: call.operation,
            names.GEN_AI_PROVIDER_NAME: call.provider,
        }
        if call.api_type is not None:
            attributes[OPENAI_API_TYPE] = call.api_type
        kind = _INTERNAL
        parent = None
        scope = call.scope
        if scope is not None:
            call.root_path = scope.get("root_path") or ""
        if self.server_span and scope is not None:
            current = _CONTEXT.current_span_context()
            leaked = current is not None and not current.is_remote and _CONTEXT.leaked()
            if leaked:
                current = None  # (and the headers are read into a context of their own: see leaked())
            if current is None or current.is_remote:
                # No span of this process is current: the LLM span is the server span. Its parent is the caller's
                # context: the one code further out made current, if any (OpenTelemetry's ASGI middleware without
                # an SDK leaves the caller's span context alone current), else the request's headers (W3C
                # traceparent by default; whatever propagator the app configured).
                kind = _SERVER
                parent = _extract(scope.get("headers") or (), leaked) if current is None else None
                _server_attributes(scope, call.path, attributes)
        start_time = now_ns - int((now_perf - call.start) * 1e9)  # _wall_ns(call.start, now_perf, now_ns)
        pipeline = self._light
        if pipeline is None or not (  # pipeline.current(), inline; else as self._pipeline() decides
            pipeline.multi._span_processors is pipeline._processors and pipeline.tracer._is_enabled()
        ):
            pipeline = self._pipeline()
        span: trace.Span
        if pipeline is not None:
            span = pipeline.start_span(call.operation, parent, kind, attributes, start_time)
        else:
            span = self.tracer.start_span(
                call.operation, context=parent, kind=kind, attributes=attributes, start_time=start_time
            )
        call.span = span
        # The app runs inside the LLM span, so its own spans (an upstream HTTP call, say) become children.
        call.otel_context, call.otel_token = _CONTEXT.attach_span(span, call)

    def _pipeline(self) -> _Pipeline | None:
        """The provider's pipeline when the middleware may record the span itself, else None (the SDK's way)."""
        pipeline = self._light
        if pipeline is not None and pipeline.current():
            return pipeline
        if pipeline is None and self._light_checked:
            return None
        self._light_checked = True
        self._light = pipeline = _Pipeline.of(self.tracer, self.redact)
        return pipeline

    def end(self, call: LLMCall) -> None:
        span = call.span
        if span is None:
            return
        now_perf, now_ns = perf_counter(), time_ns()
        light = type(span) is LLMSpan
        try:
            if call.otel_token is not None:
                token, call.otel_token = call.otel_token, None
                _CONTEXT.detach(token)
            if span.end_time is None if light else span.is_recording():
                self._fill(span, call, now_perf, now_ns)
        finally:
            end_time = now_ns - int((now_perf - (call.end if call.end is not None else now_perf)) * 1e9)  # _wall_ns
            if light:
                span.end(end_time)
            else:
                span.end(end_time=end_time)

    def _fill(self, span: Any, call: LLMCall, now_perf: float, now_ns: int) -> None:
        light = type(span) is LLMSpan
        if call.request_model:
            # Named by the model's bounded label value: a backend indexes span names (Jaeger's operations, Tempo's
            # span metrics), and a client can send any number of model names. The attribute keeps the model sent.
            name = f"{call.operation} {call.model_label or label_value(call.request_model)}"
            if light:
                span.name = name  # recording: update_name's condition
            else:
                span.update_name(name)
        # Values are of OpenTelemetry's attribute types already (sequences as tuples, as the SDK stores them):
        # the span the middleware records itself takes them as they are.
        attributes: dict[str, Any] = span.attributes if light else {}
        if call.stream:  # the conventions: set only on a streaming request; unset means not streaming
            attributes[GEN_AI_REQUEST_STREAM] = True
        if call.request_model:
            attributes[names.GEN_AI_REQUEST_MODEL] = call.request_model
        if call.max_tokens is not None:
            attributes[GEN_AI_REQUEST_MAX_TOKENS] = call.max_tokens
        if call.temperature is not None:
            attributes[GEN_AI_REQUEST_TEMPERATURE] = call.temperature
        if call.top_p is not None:
            attributes[GEN_AI_REQUEST_TOP_P] = call.top_p
        if call.top_k is not None:
            attributes[GEN_AI_REQUEST_TOP_K] = call.top_k
        if call.frequency_penalty is not None:
            attributes[GEN_AI_REQUEST_FREQUENCY_PENALTY] = call.frequency_penalty
        if call.presence_penalty is not None:
            attributes[GEN_AI_REQUEST_PRESENCE_PENALTY] = call.presence_penalty
        if call.seed is not None:
            attributes[GEN_AI_REQUEST_SEED] = call.seed
        if call.choice_count is not None:
            attributes[GEN_AI_REQUEST_CHOICE_COUNT] = call.choice_count
        if call.stop_sequences is not None:
            attributes[GEN_AI_REQUEST_STOP_SEQUENCES] = call.stop_sequences
        if call.output_type is not None:
            attributes[GEN_AI_OUTPUT_TYPE] = call.output_type
        if call.operation == "embeddings":
            if call.encoding_format is not None:
                attributes[GEN_AI_REQUEST_ENCODING_FORMATS] = (call.encoding_format,)
            if call.dimension_count is not None:
                attributes[GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = call.dimension_count
        if call.conversation_id is not None:
            attributes[GEN_AI_CONVERSATION_ID] = call.conversation_id
        if call.response_model:
            attributes[names.GEN_AI_RESPONSE_MODEL] = call.response_model
        if call.response_id:
            attributes[GEN_AI_RESPONSE_ID] = call.response_id
        if call.provider == "openai":
            if call.service_tier is not None:
                attributes[OPENAI_REQUEST_SERVICE_TIER] = call.service_tier
            tier = _short(call.response_service_tier)
            if tier:
                attributes[OPENAI_RESPONSE_SERVICE_TIER] = tier
            fingerprint = _short(call.system_fingerprint)
            if fingerprint:
                attributes[OPENAI_RESPONSE_SYSTEM_FINGERPRINT] = fingerprint
        if call.choice_finishes:
            # One per choice (generation), in their order, as the conventions define it.
            finishes = call.choice_finishes
            attributes[GEN_AI_RESPONSE_FINISH_REASONS] = tuple(finishes[i] for i in sorted(finishes))
        elif call.finish_reasons:
            attributes[GEN_AI_RESPONSE_FINISH_REASONS] = tuple(call.finish_reasons)
        if call.input_tokens is not None:
            attributes[GEN_AI_USAGE_INPUT_TOKENS] = call.input_tokens
        if call.output_tokens is not None:
            attributes[GEN_AI_USAGE_OUTPUT_TOKENS] = call.output_tokens
        if call.cache_read_tokens is not None:
            attributes[GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = call.cache_read_tokens
        if call.cache_creation_tokens is not None:
            attributes[GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = call.cache_creation_tokens
        if call.reasoning_tokens is not None:
            attributes[GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = call.reasoning_tokens
        if call.usage_source != "reported" and call.output_tokens is not None:
            attributes[names.LLM_USAGE_SOURCE] = call.usage_source
        if call.tool_calls:
            attributes[LLM_TOOL_CALLS_NAMES] = _tool_names(call.tool_calls)
            attributes[LLM_TOOL_CALLS_COUNT] = len(call.tool_calls)
        if call.cost_usd is not None:
            attributes[LLM_COST_USD] = call.cost_usd
        if call.status_code is not None:
            attributes[HTTP_RESPONSE_STATUS_CODE] = call.status_code
        scope = call.scope
        if scope is not None:
            # Set by the app's router as it routed (FastAPI's APIRoute): the template, when there is one. A router
            # inside a mount (Starlette's Mount, FastAPI's app.mount) sets it relative to the mount, whose prefix
            # routing added to root_path: put back, as the route of the whole path.
            route = getattr(scope.get("route"), "path", None)
            if isinstance(route, str):
                root = scope.get("root_path") or ""
                if root != call.root_path and root.startswith(call.root_path):
                    route = root[len(call.root_path) :] + route
                attributes[HTTP_ROUTE] = route
        if call.request_id:
            attributes[LLM_REQUEST_ID] = call.request_id
        for label, value in call.attribution.items():
            attributes[names.LLM_METADATA_PREFIX + label] = value
        first_token_at = call.first_token_at
        if first_token_at is not None:
            ttft = first_token_at - call.start  # call.time_to_first_token
            attributes[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = ttft
            timestamp = now_ns - int((now_perf - first_token_at) * 1e9)  # _wall_ns
            if light:
                make_event = span._pipeline.event
                span.events.append(
                    make_event(FIRST_TOKEN_EVENT, {GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: ttft}, timestamp)
                )
            else:
                span.add_event(FIRST_TOKEN_EVENT, {GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: ttft}, timestamp=timestamp)
        if self.capture:
            self._content(attributes, call)
        if not light:
            span.set_attributes(attributes)
        if call.error_type:
            span.set_attribute(names.ERROR_TYPE, call.error_type)
            # The HTTP conventions: a server span's status is not an error for a 4xx answer (the client's error,
            # which error.type still names); an LLM span inside another server span is, as the GenAI ones have it.
            status = call.status_code
            exc = call.exception
            if exc is not None:
                # As the SDK records an exception leaving a span: an event with its type, message and traceback,
                # and the status described by it. Otherwise no description: error.type says it already, and the
                # conventions advise against repeating it there.
                recorded = exception_attributes(exc, escaped=True, redact=self.redact)
                # At the span's end (its last byte sent), not now: the exception reaches here after it, and an event
                # stamped later is drawn outside the span.
                end = call.end if call.end is not None else now_perf
                span.add_event("exception", recorded, timestamp=now_ns - int((now_perf - end) * 1e9))  # _wall_ns
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {recorded[EXCEPTION_MESSAGE]}"))
            elif not (span.kind is _SERVER and status is not None and 400 <= status < 500):
                span.set_status(Status(StatusCode.ERROR))

    def _text(self, value: Any, max_chars: int | None = None) -> str:
        """``value`` as shown: redacted, and cut to ``max_chars`` (default: the capture cap)."""
        limit = self.max_chars if max_chars is None else max_chars
        if not isinstance(value, str):
            if isinstance(value, list):  # content parts: keep their text
                value = "".join(
                    p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            else:
                # (Non-ASCII characters as they are: escaped, each took six characters of the cap.)
                value = json.dumps(value, default=str, ensure_ascii=False)
        # Only what may be shown is redacted: redacting a long-context prompt or a long answer whole cost ~0.1-0.2 µs
        # a character, on the loop. A text cut here is marked as cut, however short the redactor leaves it.
        full = limit + REDACTED_BEYOND_CAP
        window = full
        for _ in range(WINDOW_GROWTHS + 1):
            if len(value) <= window:
                return cap(self.redact(value), limit)
            shown = self.redact(value[:window])
            if len(shown) >= full:
                break
            window += full - len(shown)  # masks shortened it: redact further, a bounded number of times
        # At least REDACTED_BEYOND_CAP characters of the redacted window stay unshown after what is shown: masks only
        # shorten, so what is shown ends at least that far before the window's edge, and a value cut by the edge
        # (which the redactor could not recognise) is never shown. Text dense with masked values shows less.
        return valid_text(shown[: min(limit, max(len(shown) - REDACTED_BEYOND_CAP, 0))]) + TRUNCATION_MARK

    def _message(self, message: dict[str, Any], context: _Conversation = _ALONE) -> dict[str, Any]:
        return {"role": _role(message, context.hosted_shells), "parts": self._parts(message, context)}

    def _parts(self, message: dict[str, Any], context: _Conversation = _ALONE) -> list[dict[str, Any]]:
        """A request message's parts as the GenAI conventions shape them: text, and the tool calls and tool results
        of the three APIs (OpenAI's ``tool_calls`` and ``tool`` role, Anthropic's ``tool_use`` and ``tool_result``
        blocks, the Responses API's ``function_call`` and ``function_call_output`` items). Arguments and results
        are content: redacted and cut like text."""
        kind = message.get("type")
        if kind == "function_call" or kind == "custom_tool_call":
            arguments = message.get("arguments" if kind == "function_call" else "input")
            return [self._tool_call(message.get("call_id"), message.get("name"), arguments)]
        if hosted_shell(message):
            # A shell the API ran in its own container, sent back: its call, as a hosted tool's (not the app's).
            return [_server_tool_call(message.get("call_id") or message.get("id"), "shell", "shell")]
        if isinstance(kind, str) and kind in RESPONSES_HOSTED_ITEMS and message.get("execution") != "client":
            # A call of a tool OpenAI ran itself, sent back (its results are not shown; a tool search may be the
            # client's). Its id as in the answer: the call's ``call_id`` (a tool search's, which its output names),
            # else the item's.
            hosted = RESPONSES_HOSTED_ITEMS[kind]
            return [_server_tool_call(message.get("call_id") or message.get("id"), message.get("name"), hosted)]
        if isinstance(kind, str) and kind in _CLIENT_TOOL_ITEMS:
            # A call of a tool the application ran for the model (computer, shell, patch, its own tool search), sent
            # back: a tool call, as in the answer, whose output follows as a tool_call_response.
            name, asked = _CLIENT_TOOL_ITEMS[kind]
            return [self._tool_call(message.get("call_id") or message.get("id"), name, message.get(asked))]
        if _server_output(message, context.hosted_shells):
            # What a tool the API ran itself (a tool search, a program, a shell in its container) gave, sent back: its
            # result, as in the answer (not shown), under its call's id.
            call_id = message.get("call_id") or context.answers.get(id(message)) or message.get("id")
            return [_server_tool_result(call_id, RESPONSES_HOSTED_OUTPUTS[str(kind)])]
        if kind == "reasoning":
            return []  # (the model's reasoning sent back, encrypted or summarised: no part of the conversation's text)
        if isinstance(kind, str) and kind.endswith("_output") and not message.get("role"):
            # A tool's output (``function_call_output``, ``custom_tool_call_output``, a computer or shell call's).
            return [self._tool_result(message.get("call_id") or message.get("id"), _tool_output(message))]
        content = message.get("content", message.get("output"))
        if content is None and kind is not None and not message.get("role"):
            return []  # an item with nothing to show (``item_reference``, an approval): no empty text part
        if message.get("role") == "tool":
            return [self._tool_result(message.get("tool_call_id"), content)]
        calls = message.get("tool_calls")
        calls = calls if isinstance(calls, list) else []
        parts: list[dict[str, Any]] = []
        if isinstance(content, list):
            parts = self._blocks(content)
        elif content is not None or not calls:
            parts.append({"type": "text", "content": self._text("" if content is None else content)})
        # (The tool calls beside tool blocks count against the same bound per message.)
        calls = calls[: MAX_CAPTURED_TOOL_PARTS - sum(p["type"] != "text" for p in parts)]
        for tool_call in calls:
            if isinstance(tool_call, dict):
                function = tool_call.get("function")
                function = function if isinstance(function, dict) else {}
                parts.append(self._tool_call(tool_call.get("id"), function.get("name"), function.get("arguments")))
        return parts

    def _blocks(self, blocks: list[Any], tools: bool = True) -> list[dict[str, Any]]:
        """A list of content blocks as parts, in their order: each text block a text part (OpenAI's content parts,
        the Responses API's ``input_text``, Anthropic's text blocks), Anthropic's ``tool_use`` and ``tool_result``
        blocks tool parts, and its hosted tools' calls and results server tool parts (unless not ``tools``);
        images, audio and documents are not shown. The text parts share the cap, as one text would; at most
        :data:`MAX_CAPTURED_TOOL_PARTS` of each kind are shown, and text left out marks the last text part shown as
        cut."""
        parts: list[dict[str, Any]] = []
        budget = self.max_chars
        texts = 0
        calls = 0 if tools else MAX_CAPTURED_TOOL_PARTS
        last: dict[str, Any] | None = None
        for block in blocks:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            server = isinstance(kind, str) and (kind in _SERVER_TOOL_BLOCKS or kind.endswith("_tool_result"))
            if kind == "tool_use" or kind == "tool_result" or server:
                if calls < MAX_CAPTURED_TOOL_PARTS:
                    calls += 1
                    if kind == "tool_use":
                        parts.append(self._tool_call(block.get("id"), block.get("name"), block.get("input")))
                    elif kind == "tool_result":
                        parts.append(self._tool_result(block.get("tool_use_id"), block.get("content")))
                    elif kind in _SERVER_TOOL_BLOCKS:
                        # A call of a tool Anthropic runs itself (web search, code execution, an MCP server's tool).
                        name = block.get("name")
                        hosted = "mcp" if kind == "mcp_tool_use" else name if isinstance(name, str) else "unknown"
                        parts.append(_server_tool_call(block.get("id"), name, hosted))
                    else:  # its result (``web_search_tool_result``, ``mcp_tool_result``, ...)
                        hosted = str(kind)[: -len("_tool_result")]
                        parts.append(_server_tool_result(block.get("tool_use_id"), hosted))
            elif isinstance(text := block.get("text"), str):
                if texts < MAX_CAPTURED_TOOL_PARTS and budget > 0:
                    texts += 1
                    last = {"type": "text", "content": self._text(text, budget)}
                    budget -= len(last["content"])
                    parts.append(last)
                elif text and last is not None and not last["content"].endswith(TRUNCATION_MARK):
                    last["content"] += TRUNCATION_MARK
        return parts

    def _tool_call(self, call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "tool_call", "id": _short(call_id), "name": _short(name) or "unknown"}
        if arguments is not None:
            part["arguments"] = self._text(arguments)
        return part

    def _tool_result(self, call_id: Any, result: Any) -> dict[str, Any]:
        # (``response``: the conventions' name for a tool's result in a ``tool_call_response`` part.)
        return {"type": "tool_call_response", "id": _short(call_id), "response": self._text(result)}

    def _input_messages(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """The messages ``gen_ai.input.messages`` shows (see :data:`CAPTURED_INPUT_MESSAGES_BUDGET`), and how many
        were left out. Only the messages shown are redacted and cut, newest first, so the work is bounded too."""
        budget = self.max_chars * CAPTURED_INPUT_MESSAGES_BUDGET
        head: list[dict[str, Any]] = []
        rest = messages
        context = _conversation(messages)
        if str(messages[0].get("role")) in _INSTRUCTION_ROLES:
            head, rest = [self._message(messages[0])], messages[1:]
            budget -= _shown_chars(head[0])
        newest: list[dict[str, Any]] = []
        for message in reversed(rest):
            if len(head) + len(newest) >= MAX_CAPTURED_MESSAGES:
                break
            entry = self._message(message, context)
            size = _shown_chars(entry)
            if newest and size > budget:
                break
            newest.append(entry)
            budget -= size
        return head + newest[::-1], len(rest) - len(newest)

    def _content(self, attributes: dict[str, Any], call: LLMCall) -> None:
        if call.system_instructions:
            system = call.system_instructions
            # Text only, within one cap, whatever blocks a client puts there.
            parts = (
                self._blocks(system, tools=False)
                if isinstance(system, list)
                else [{"type": "text", "content": self._text(system)}]
            )
            if parts:
                attributes[GEN_AI_SYSTEM_INSTRUCTIONS] = json.dumps(parts, ensure_ascii=False)
        if call.input_messages:
            messages, omitted = self._input_messages(call.input_messages)
            attributes[GEN_AI_INPUT_MESSAGES] = json.dumps(messages, ensure_ascii=False)
            if omitted:
                attributes[LLM_INPUT_MESSAGES_OMITTED] = omitted
        if call.output_text or call.tool_calls or call.server_tool_results:
            # One message per choice (``n`` of them), each with its own finish reason where one was reported.
            # (A message whose choice's finish is not kept apart shows the first choice's, the last word it sent.)
            choices = call.choice_finishes
            finish = choices[min(choices)] if choices else call.finish_reasons[0] if call.finish_reasons else None
            finishes = call.output_finish_reasons or ()
            # The choices share the cap: the first ones' text is shown whole, up to it, the rest as far as it goes.
            budget = self.max_chars
            texts: list[list[dict[str, Any]]] = []
            for text in call.output_text or ():
                shown = self._text(text, budget) if text and budget > 0 else ""
                budget -= len(shown)
                texts.append([{"type": "text", "content": shown}] if shown else [])
            texts = texts or [[]]
            # The tool calls the model made, by id and name (the readers keep no arguments of the answer's calls),
            # each in the message of its choice; a call of a tool the provider runs itself a server tool call.
            owners = call.output_tool_messages or ()
            ids = call.tool_call_ids or ()
            for n, name in enumerate(call.tool_calls[: min(MAX_CAPTURED_TOOL_PARTS, MAX_TOOL_CALL_IDS)]):
                at = owners[n] if n < len(owners) and owners[n] < len(texts) else 0
                call_id, hosted = ids[n] if n < len(ids) else (None, None)
                if hosted is None:
                    texts[at].append({"type": "tool_call", "id": _short(call_id), "name": _short(name) or "unknown"})
                else:
                    texts[at].append(_server_tool_call(call_id, name, hosted))
            # The results of the tools the provider ran itself, each after its call. One whose call is not shown:
            # when the answer made more calls than are shown, it may be one of those, and is not shown either; else
            # its call was made in an earlier turn (Anthropic's code execution runs on across requests), and it is
            # shown after the rest.
            hidden = len(call.tool_calls) > min(MAX_CAPTURED_TOOL_PARTS, MAX_TOOL_CALL_IDS)
            for call_id, kind in call.server_tool_results or ():
                result = _server_tool_result(call_id, kind)
                parts = texts[0]
                at = next(
                    (i + 1 for i, p in enumerate(parts) if p.get("server_tool_call") and p["id"] == result["id"]), 0
                )
                if at:
                    parts.insert(at, result)
                elif not hidden:
                    parts.append(result)
            output = [
                {
                    "role": "assistant",
                    "parts": parts,
                    # (Required by the conventions, a string: "error" for a call that failed before any was
                    # reported, "" when the answer reported none.)
                    "finish_reason": _finish_reason(
                        (finishes[i] if i < len(finishes) else None) or finish or ("error" if call.error_type else "")
                    ),
                }
                for i, parts in enumerate(texts)
            ]
            attributes[GEN_AI_OUTPUT_MESSAGES] = json.dumps(output, ensure_ascii=False)
