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

import json
import logging
from collections.abc import Mapping
from time import perf_counter, time_ns
from typing import Any, Final

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from . import instruments as names
from .config import OTEL_TRACES_EXPORTER, OTelEnvironment, Settings
from .record import LLMCall
from .redact import Redactor, cap, redact
from .types import ASGIApp
from .version import __version__

logger = logging.getLogger("llm_telemetry")

TRACER_NAME: Final = "llm_telemetry"

# GenAI semantic-convention span attributes (those shared with the metrics come from instruments.py).
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
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
#: The span event marking the first generated token (or tool call) of a stream.
FIRST_TOKEN_EVENT: Final = "gen_ai.first_token"

_USAGE_FIELDS: Final = (
    (GEN_AI_USAGE_INPUT_TOKENS, "input_tokens"),
    (GEN_AI_USAGE_OUTPUT_TOKENS, "output_tokens"),
    (GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, "cache_read_tokens"),
    (GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, "cache_creation_tokens"),
    (GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, "reasoning_tokens"),
)


def _span_exporter(kind: str, protocol: str) -> Any:
    """A span exporter for one ``OTEL_TRACES_EXPORTER`` entry; endpoint, headers and TLS come from the env."""
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
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
        cls, settings: Settings, provider: TracerProvider | None = None, env: Mapping[str, str] | None = None
    ) -> Tracing | None:
        """Decide whether tracing is on and find or build the provider; None means off."""
        otel = OTelEnvironment.resolve(env)
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
        sdk_provider = SDKTracerProvider(resource=Resource.create())
        for kind in exporters:
            if kind not in ("otlp", "console"):
                logger.warning("llm-telemetry: %s: unsupported exporter %r ignored", OTEL_TRACES_EXPORTER, kind)
                continue
            sdk_provider.add_span_processor(BatchSpanProcessor(_span_exporter(kind, otel.traces_protocol)))
        # Deliberately not installed as the global provider: the application owns that choice.
        return cls(sdk_provider, True, settings)

    @property
    def service_name(self) -> str | None:
        resource = getattr(self.provider, "resource", None)
        value = resource.attributes.get("service.name") if resource is not None else None
        return str(value) if value is not None else None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """Wrap ``app`` in OpenTelemetry's ASGI middleware: the HTTP server span and ``traceparent`` extraction.

        Its per-message ``receive``/``send`` spans are turned off: they cost about 100 µs per streamed chunk.
        Its HTTP metrics go to a no-op meter: the LLM metrics are ours, and the app may record HTTP ones itself.
        """
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.metrics import NoOpMeterProvider

        wrapped: ASGIApp = OpenTelemetryMiddleware(
            app,
            tracer_provider=self.provider,
            meter_provider=NoOpMeterProvider(),
            exclude_spans=["receive", "send"],
        )
        return wrapped

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        flush = getattr(self.provider, "force_flush", None)
        return bool(flush(timeout_millis)) if flush is not None else True

    def shutdown(self) -> None:
        if self.owned:
            self.provider.shutdown()  # type: ignore[attr-defined]


def _wall_ns(reading: float, now_perf: float, now_ns: int) -> int:
    """Convert a ``perf_counter`` reading to epoch nanoseconds, relative to a (perf, epoch) pair taken together."""
    return now_ns - int((now_perf - reading) * 1e9)


class _HeaderGetter(Getter[Any]):
    """Reads propagation headers from ASGI ``scope["headers"]`` for :func:`opentelemetry.propagate.extract`."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        wanted = key.encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == wanted]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_HEADERS = _HeaderGetter()


def _server_attributes(scope: Mapping[str, Any], path: str, attributes: dict[str, Any]) -> None:
    """The HTTP server attributes readable from the ASGI scope without looking at the headers."""
    attributes[HTTP_REQUEST_METHOD] = scope.get("method", "POST")
    attributes[URL_PATH] = path  # the client's path, already bounded by the middleware
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

    def start(self, call: LLMCall) -> None:
        now_perf, now_ns = perf_counter(), time_ns()
        attributes: dict[str, Any] = {
            names.GEN_AI_OPERATION_NAME: call.operation,
            names.GEN_AI_PROVIDER_NAME: call.provider,
        }
        kind = SpanKind.INTERNAL
        parent = None
        scope = call.scope
        if self.server_span and scope is not None and not trace.get_current_span().get_span_context().is_valid:
            kind = SpanKind.SERVER
            # The caller's trace context (W3C traceparent by default; whatever propagator the app configured).
            parent = propagate.extract(scope.get("headers") or (), getter=_HEADERS)
            _server_attributes(scope, call.path, attributes)
        span = self.tracer.start_span(
            call.operation,
            context=parent,
            kind=kind,
            attributes=attributes,
            start_time=_wall_ns(call.start, now_perf, now_ns),
        )
        call.span = span
        ctx = trace.set_span_in_context(span)
        call.otel_context = ctx
        # The app runs inside the LLM span, so its own spans (an upstream HTTP call, say) become children.
        call.otel_token = context.attach(ctx)

    def end(self, call: LLMCall) -> None:
        span = call.span
        if span is None:
            return
        now_perf, now_ns = perf_counter(), time_ns()
        try:
            if call.otel_token is not None:
                token, call.otel_token = call.otel_token, None
                context.detach(token)
            if span.is_recording():
                self._fill(span, call, now_perf, now_ns)
        finally:
            span.end(end_time=_wall_ns(call.end if call.end is not None else now_perf, now_perf, now_ns))

    def _fill(self, span: Any, call: LLMCall, now_perf: float, now_ns: int) -> None:
        if call.request_model:
            span.update_name(f"{call.operation} {call.request_model}")
        attributes: dict[str, Any] = {GEN_AI_REQUEST_STREAM: call.stream}
        if call.request_model:
            attributes[names.GEN_AI_REQUEST_MODEL] = call.request_model
        if call.max_tokens is not None:
            attributes[GEN_AI_REQUEST_MAX_TOKENS] = call.max_tokens
        if call.temperature is not None:
            attributes[GEN_AI_REQUEST_TEMPERATURE] = call.temperature
        if call.top_p is not None:
            attributes[GEN_AI_REQUEST_TOP_P] = call.top_p
        if call.response_model:
            attributes[names.GEN_AI_RESPONSE_MODEL] = call.response_model
        if call.response_id:
            attributes[GEN_AI_RESPONSE_ID] = call.response_id
        if call.finish_reasons:
            attributes[GEN_AI_RESPONSE_FINISH_REASONS] = list(call.finish_reasons)
        for key, field in _USAGE_FIELDS:
            value = getattr(call, field)
            if value is not None:
                attributes[key] = value
        if call.usage_source != "reported" and call.output_tokens is not None:
            attributes[names.LLM_USAGE_SOURCE] = call.usage_source
        if call.tool_calls:
            attributes[LLM_TOOL_CALLS_NAMES] = list(call.tool_calls)
            attributes[LLM_TOOL_CALLS_COUNT] = len(call.tool_calls)
        if call.cost_usd is not None:
            attributes[LLM_COST_USD] = call.cost_usd
        if call.status_code is not None:
            attributes[HTTP_RESPONSE_STATUS_CODE] = call.status_code
        scope = call.scope
        if scope is not None:
            # Set by the app's router as it routed (FastAPI's APIRoute): the template, when there is one.
            route = getattr(scope.get("route"), "path", None)
            if isinstance(route, str):
                attributes[HTTP_ROUTE] = route
        if call.request_id:
            attributes[LLM_REQUEST_ID] = call.request_id
        for label, value in call.attribution.items():
            attributes[names.LLM_METADATA_PREFIX + label] = value
        ttft = call.time_to_first_token
        if ttft is not None and call.first_token_at is not None:
            attributes[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = ttft
            span.add_event(
                FIRST_TOKEN_EVENT,
                {GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: ttft},
                timestamp=_wall_ns(call.first_token_at, now_perf, now_ns),
            )
        if self.capture:
            self._content(attributes, call)
        span.set_attributes(attributes)
        if call.error_type:
            span.set_attribute(names.ERROR_TYPE, call.error_type)
            span.set_status(Status(StatusCode.ERROR, call.error_type))

    def _text(self, value: Any) -> str:
        if not isinstance(value, str):
            if isinstance(value, list):  # content parts: keep their text
                value = "".join(
                    p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            else:
                value = json.dumps(value, default=str)
        return cap(self.redact(value), self.max_chars)

    def _content(self, attributes: dict[str, Any], call: LLMCall) -> None:
        if call.input_messages:
            messages = [
                {
                    "role": str(m.get("role") or m.get("type") or "user"),
                    "parts": [{"type": "text", "content": self._text(m.get("content", m.get("output", "")))}],
                }
                for m in call.input_messages
            ]
            attributes[GEN_AI_INPUT_MESSAGES] = json.dumps(messages, ensure_ascii=False)
        if call.output_text:
            finish = call.finish_reasons[0] if call.finish_reasons else None
            output = [
                {"role": "assistant", "parts": [{"type": "text", "content": self._text(t)}], "finish_reason": finish}
                for t in call.output_text
            ]
            attributes[GEN_AI_OUTPUT_MESSAGES] = json.dumps(output, ensure_ascii=False)
