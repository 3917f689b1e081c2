"""Settings: constructor arguments first, ``LLM_TELEMETRY_*`` environment variables second, then defaults.

Every environment variable the middleware reads is declared here, named after its value, so that the
operator (which injects them into pods) and the docs use the same names.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from .apis import APIS

#: Port of the Prometheus endpoint served on its own listener. ``0`` disables the listener.
LLM_TELEMETRY_METRICS_PORT: Final = "LLM_TELEMETRY_METRICS_PORT"
#: Address the metrics listener binds to. ``::``, every address of the pod, IPv6 and IPv4, so a ServiceMonitor reaches
#: it in any cluster (``0.0.0.0`` where the host has no IPv6).
LLM_TELEMETRY_METRICS_HOST: Final = "LLM_TELEMETRY_METRICS_HOST"
#: Path at which ``/metrics`` is also answered on the application's own port (empty: off).
LLM_TELEMETRY_METRICS_APP_PATH: Final = "LLM_TELEMETRY_METRICS_APP_PATH"
#: Comma-separated metric exporters: ``prometheus`` (default), ``otlp``, ``none``.
LLM_TELEMETRY_METRICS_EXPORTER: Final = "LLM_TELEMETRY_METRICS_EXPORTER"
#: Path of a YAML or JSON pricing table (USD per million tokens by model).
LLM_TELEMETRY_PRICING: Final = "LLM_TELEMETRY_PRICING"
#: Request headers turned into metric labels: ``x-tenant-id=tenant,x-team=team``
#: gives the labels ``llm_metadata_tenant`` and ``llm_metadata_team``.
LLM_TELEMETRY_ATTRIBUTION_HEADERS: Final = "LLM_TELEMETRY_ATTRIBUTION_HEADERS"
#: Distinct values kept per label before the rest fold into ``other``.
LLM_TELEMETRY_MAX_LABEL_VALUES: Final = "LLM_TELEMETRY_MAX_LABEL_VALUES"
#: Largest request body (bytes) inspected; larger bodies are passed through unparsed.
LLM_TELEMETRY_MAX_REQUEST_BYTES: Final = "LLM_TELEMETRY_MAX_REQUEST_BYTES"
#: Bytes of request and JSON response bodies all requests of the process keep at once to read them; past it, a body
#: is passed through unread as one over its own limit is.
LLM_TELEMETRY_MAX_INSPECTED_BYTES: Final = "LLM_TELEMETRY_MAX_INSPECTED_BYTES"
#: Extra path suffix to parser mappings: ``/generate=openai.chat,/v1/complete=anthropic.messages``.
LLM_TELEMETRY_ROUTES: Final = "LLM_TELEMETRY_ROUTES"
#: Record prompt and completion text on spans (``true``/``false``); off by default.
LLM_TELEMETRY_CAPTURE_CONTENT: Final = "LLM_TELEMETRY_CAPTURE_CONTENT"
#: Characters of captured content kept per message.
LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS: Final = "LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS"
#: One JSON log line per LLM request (``true``/``false``).
LLM_TELEMETRY_REQUEST_LOGS: Final = "LLM_TELEMETRY_REQUEST_LOGS"
#: Add ``x-request-id`` to LLM responses that lack one (``true``/``false``): the id in the request log line.
LLM_TELEMETRY_ECHO_REQUEST_ID: Final = "LLM_TELEMETRY_ECHO_REQUEST_ID"
#: ``true``: trace each LLM request as two spans, OpenTelemetry's generic ASGI server span and the GenAI span
#: as its child; default ``false``: one span, the GenAI span as the server span (docs/tracing.md).
LLM_TELEMETRY_TRACING_HTTP_SPAN: Final = "LLM_TELEMETRY_TRACING_HTTP_SPAN"
#: Directory for the per-worker state that multi-worker servers merge on scrape.
LLM_TELEMETRY_MULTIPROC_DIR: Final = "LLM_TELEMETRY_MULTIPROC_DIR"
#: Set to ``false`` to turn the middleware into a pass-through.
LLM_TELEMETRY_ENABLED: Final = "LLM_TELEMETRY_ENABLED"

#: OpenTelemetry's own variable for content capture, honoured when ours is unset.
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

# Standard OpenTelemetry variables the middleware acts on, read by OTelEnvironment.resolve (below) for metrics,
# traces and logs alike (see docs/tracing.md and "Where the metrics go" in docs/metrics.md).
# The SDK and its exporters read the rest themselves: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
# OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG.
#: ``true`` turns every OpenTelemetry signal of the middleware off.
OTEL_SDK_DISABLED: Final = "OTEL_SDK_DISABLED"
#: Which measurements leave an exemplar: ``trace_based`` (default: those made in a sampled span), ``always_on``,
#: ``always_off``.
OTEL_METRICS_EXEMPLAR_FILTER: Final = "OTEL_METRICS_EXEMPLAR_FILTER"
#: Base OTLP endpoint for every signal; setting it turns tracing on.
OTEL_EXPORTER_OTLP_ENDPOINT: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
#: OTLP endpoint for spans only (a full URL for http/protobuf); setting it turns tracing on.
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: Final = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
#: ``grpc`` or ``http/protobuf`` (default) for every signal.
OTEL_EXPORTER_OTLP_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_PROTOCOL"
#: Protocol for spans only.
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
#: Protocol for metrics only (OTLP metrics are on with ``LLM_TELEMETRY_METRICS_EXPORTER=prometheus,otlp``).
OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
#: Protocol for logs only.
OTEL_EXPORTER_OTLP_LOGS_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"
#: Span exporters: ``otlp``, ``console`` or ``none``; unset means ``otlp`` when an endpoint is set.
OTEL_TRACES_EXPORTER: Final = "OTEL_TRACES_EXPORTER"
#: Log exporters: ``otlp`` also sends the request log lines over OTLP; unset or ``none``: stdout only.
OTEL_LOGS_EXPORTER: Final = "OTEL_LOGS_EXPORTER"

DEFAULT_OTLP_PROTOCOL: Final = "http/protobuf"
DEFAULT_METRICS_PORT: Final = 9464
DEFAULT_METRICS_HOST: Final = "::"
DEFAULT_MAX_LABEL_VALUES: Final = 100
DEFAULT_MAX_REQUEST_BYTES: Final = 8 * 1024 * 1024
DEFAULT_MAX_INSPECTED_BYTES: Final = 256 * 1024 * 1024
DEFAULT_CAPTURE_CONTENT_MAX_CHARS: Final = 4096


#: Request headers that never become attribution labels: credentials (each distinct key or cookie would be a label
#: value on every dashboard, readable by anyone who can query Prometheus, and an attribute of every span) and
#: per-request ids (a series each). See :func:`unlabelled_header` for the words that mark others.
UNLABELLED_HEADERS: Final = frozenset((
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-goog-api-key",
    "x-request-id", "traceparent", "tracestate",
))  # fmt: skip
#: Header names that identify the client or its user by value: its address, its mail, its certificate, the
#: principal a gateway authenticated.
_IDENTIFYING_HEADERS: Final = frozenset((
    "forwarded", "x-forwarded-for", "x-real-ip", "cf-connecting-ip", "true-client-ip", "x-client-ip",
    "x-forwarded-email", "x-forwarded-user", "x-forwarded-client-cert", "ssl-client-cert", "x-ssl-client-cert",
    "openai-user", "baggage", "sentry-trace", "elastic-apm-traceparent", "x-ot-span-context", "x-request-start",
    "x-cloud-trace-context", "uber-trace-id", "ssl-client-subject-dn", "ssl-client-issuer-dn",
    "x-envoy-external-address", "x-original-forwarded-for", "x-vercel-forwarded-for", "x-consumer-custom-id",
    "from", "eppn",
))  # fmt: skip
#: Parts of a header name (split at ``-`` and ``_``) that mark a credential wherever they stand.
_CREDENTIAL_PARTS: Final = frozenset((
    "authorization", "auth", "cookie", "password", "passwd", "secret", "signature", "credential", "credentials",
    "bearer", "jwt", "csrf", "xsrf", "apikey", "oidc", "principal", "session", "encryption",
))  # fmt: skip
#: Parts that name the user, their account or their certificate wherever they stand: an identity-aware proxy's
#: ``X-Goog-Authenticated-User-Email``, ``Cf-Access-Authenticated-User-Email``, oauth2-proxy's
#: ``X-Forwarded-Preferred-Username``, ``x-user-email``, Google's ``X-Endpoint-API-UserInfo``, a client
#: certificate's ``X-ARR-ClientCert`` or ``X-Client-Cert-Spiffe``.
_IDENTITY_PARTS: Final = frozenset((
    "email", "mail", "username", "upn", "authenticated", "userinfo", "cert", "clientcert", "certificate", "spiffe",
    "nickname", "claim", "claims", "authentik", "webauth",
))  # fmt: skip
#: Last parts that name the client's address (``Fastly-Client-IP``, ``X-Azure-SocketIP``, ``CloudFront-Viewer-Address``,
#: ``Remote-Addr``); not ``x-vercel-ip-country``, whose last part is the country.
_ADDRESS_ENDS: Final = frozenset((
    "ip", "ipv4", "ipv6", "addr", "address", "clientip", "socketip", "userip", "remoteip", "realip", "sourceip",
))  # fmt: skip
#: With a part naming TLS, the last parts that give the client certificate's subject or identity
#: (``X-SSL-Client-DN``, ``X-SSL-Client-Fingerprint``).
_TLS_PARTS: Final = frozenset(("ssl", "tls", "mtls"))
_CERTIFICATE_ENDS: Final = frozenset(("dn", "cn", "subject", "fingerprint", "sha1", "sha256", "serial", "issuer"))
#: Parts after ``user`` or ``remote`` that name the user (``Remote-Name``, ``Tailscale-User-Login``).
_USER_NAMES: Final = frozenset(("name", "login"))
#: Last parts that mark a credential. A ``key`` or ``keys`` is one too (``x-api-key``, ``x-functions-key``,
#: ``x-master-key``, ``ocp-apim-subscription-key``; an ``idempotency-key`` is an id per request), but for the kinds
#: below, which name a group of callers (``x-project-key``).
_CREDENTIAL_ENDS: Final = frozenset(("token", "tokens"))
_GROUP_KEY_KINDS: Final = frozenset((
    "project", "tenant", "team", "squad", "group", "org", "organization", "workspace", "customer", "department",
    "dept", "division", "unit", "lob", "center", "centre", "costcenter", "case", "usecase", "budget", "product", "plan",
    "tier", "region", "route", "routing", "partition", "shard", "feature", "experiment", "cohort", "segment",
    "category", "market", "locale",
))  # fmt: skip
#: Parts before ``id`` or ``ids`` that make a per-request, per-conversation or per-user id.
_ID_KINDS: Final = frozenset((
    "request", "correlation", "trace", "span", "parent", "message", "conversation", "thread", "run", "call",
    "session", "user", "device", "transaction", "event", "consumer",
))  # fmt: skip


def unlabelled_header(name: str) -> bool:
    """Whether request header ``name`` may never be an attribution label: it carries a credential, identifies the
    client or its user, or is an id per request (see UNLABELLED_HEADERS): ``x-auth-token``, ``x-amz-security-token``,
    ``x-goog-api-key``, ``x-user-id``, ``x-end-user``, ``x-correlation-id``, ``x-forwarded-for``, ``x-b3-traceid``...
    Not ``x-tenant-id``, ``x-user-tier``, ``user-agent``, ``x-token-budget`` or ``x-project-key``."""
    name = name.strip().lower()
    if name in UNLABELLED_HEADERS or name in _IDENTIFYING_HEADERS or name.startswith(("x-b3-", "x-datadog-")):
        return True
    parts = re.split(r"[-_]", name)
    if not (_CREDENTIAL_PARTS.isdisjoint(parts) and _IDENTITY_PARTS.isdisjoint(parts)):
        return True
    if parts[-1] in _CREDENTIAL_ENDS or parts[-1] == "user" or parts[-1] in _ADDRESS_ENDS:
        return True
    if parts[-1] in _CERTIFICATE_ENDS and not _TLS_PARTS.isdisjoint(parts):
        return True
    for before, part in itertools.pairwise(parts):
        if part in ("key", "keys") and before not in _GROUP_KEY_KINDS:
            return True
        if part in _USER_NAMES and before in ("user", "remote"):
            return True
        if part in ("dn", "cn") and before == "client":
            return True
        if part in ("id", "ids") and before in _ID_KINDS:
            return True
    # A kind of id spelt as one word: traceid, requestid, spanid.
    return any(part.endswith("id") and part[:-2] in _ID_KINDS for part in parts)


class ConfigurationError(ValueError):
    """A setting has a value the middleware cannot use; the message names the setting."""


class UnknownSettingError(ConfigurationError, TypeError):
    """An option the middleware does not have (a misspelling): a ``TypeError``, as for any unknown keyword, and a
    configuration error, so that it fails the server's startup like a bad value rather than every request."""


def _meant(name: str, names: list[str]) -> str:
    """``name`` with the setting it is closest to, if any is close: ``metrics_prot (did you mean metrics_port?)``."""
    close = difflib.get_close_matches(name, names, 1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def _env_bool(name: str, value: str) -> bool:
    # Blank text is no answer (an argument's: a variable's is caught before, see _not_blank); it was read as false.
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name}={value!r}: expected true or false")


def _otel_capture(value: str) -> bool:
    """OpenTelemetry's variable, which other instrumentations read too, never stops the app: ``true`` or, as
    ``opentelemetry-util-genai`` spells it, ``SPAN_ONLY`` or ``SPAN_AND_EVENT`` capture content on spans; anything
    else (``false``, ``NO_CONTENT``, ``EVENT_ONLY``) does not."""
    return value.strip().lower() in ("1", "true", "yes", "on", "span_only", "span_and_event")


def _not_blank(name: str, value: str) -> str:
    """A variable's text, unless it is blank (spaces, a line break: a template's missing value). Read on, a blank
    LLM_TELEMETRY_ENABLED or REQUEST_LOGS was false and turned the middleware or its log lines off, a blank
    METRICS_EXPORTER named no exporter and turned every metric off, all without a word. An empty variable is unset
    and never gets here."""
    if not value.strip():
        raise ConfigurationError(f"{name} is blank: give it a value, or leave it unset (or empty) for its default")
    return value


def _host(name: str, value: str) -> str:
    """The metrics listener's address; blank (as an argument), it failed only as the listener started, in a warning
    that named ``http://:9464`` and no setting, and the metrics were not served."""
    if not value.strip():
        raise ConfigurationError(
            f"{name} is blank: give the address the metrics listener binds to, or leave it unset for '::'"
        )
    return value.strip()


def _env_int(name: str, value: str, minimum: int) -> int:
    try:
        parsed = int(value.strip())
    except ValueError:
        raise ConfigurationError(f"{name}={value!r}: expected an integer") from None
    if parsed < minimum:
        raise ConfigurationError(f"{name}={value!r}: must be at least {minimum}")
    return parsed


def parse_mapping(name: str, value: str) -> dict[str, str]:
    """Parse ``a=b,c=d`` into a dict; used for attribution headers and routes."""
    result: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ConfigurationError(f"{name}: {item!r} is not of the form key=value")
        result[key.strip()] = val.strip()
    return result


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved middleware settings.

    Build with :meth:`Settings.resolve`, which applies constructor arguments, then the environment,
    then the defaults.
    """

    #: False turns the middleware into a pass-through.
    enabled: bool = True
    #: Port of the separate Prometheus listener; 0 disables it.
    metrics_port: int = DEFAULT_METRICS_PORT
    #: Address of the separate Prometheus listener.
    metrics_host: str = DEFAULT_METRICS_HOST
    #: Path answered with the metrics on the application's own port, or None.
    metrics_app_path: str | None = None
    #: Metric exporters in use: a subset of {"prometheus", "otlp"}.
    metrics_exporters: tuple[str, ...] = ("prometheus",)
    #: Pricing source: a file path, a mapping, or None for the embedded default table.
    pricing: str | Mapping[str, Any] | None = None
    #: Request header (lower case) to label suffix, e.g. {"x-tenant-id": "tenant"}.
    attribution_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Distinct values per label before folding into "other".
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES
    #: Request bodies larger than this are not parsed (they still pass through intact).
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Bytes of bodies kept to be read (request bodies' pieces, JSON answers' copies) by all requests of the
    #: process at once; a body that would take more is passed through unread, as one over its own limit is.
    max_inspected_bytes: int = DEFAULT_MAX_INSPECTED_BYTES
    #: Extra path suffix to parser name mappings.
    routes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Record prompt and completion text on spans.
    capture_content: bool = False
    #: Characters kept per captured message.
    capture_content_max_chars: int = DEFAULT_CAPTURE_CONTENT_MAX_CHARS
    #: Emit one JSON log line per LLM request.
    request_logs: bool = True
    #: Add the request id (``x-request-id``) to LLM responses that have none. Off by default: the client gets the
    #: app's response unchanged, headers included.
    echo_request_id: bool = False
    #: Trace LLM requests as two spans (OpenTelemetry's ASGI server span, the GenAI span as its child) instead of
    #: one GenAI span of kind SERVER.
    tracing_http_span: bool = False
    #: Directory for multi-worker shared state, or None to choose automatically.
    multiproc_dir: str | None = None
    #: Redactor applied to captured content, ``Callable[[str], str]``; None: the default (llm_telemetry.redact).
    redact: Callable[[str], str] | None = None

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Combine explicit arguments (``None`` means unset), the environment and the defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        #: The variable each setting read from the environment came from, for the checks' messages.
        variables: dict[str, str] = {}

        def pick(field: str, var: str, convert: Any) -> None:
            given = overrides.get(field)
            if isinstance(given, str):
                values[field] = convert(field, given)  # an argument written as its variable would be
            elif given is not None:
                values[field] = _argument(field, given)
            elif env.get(var) not in (None, ""):
                values[field] = convert(var, _not_blank(var, env[var]))
                variables[field] = var

        pick("enabled", LLM_TELEMETRY_ENABLED, _env_bool)
        pick("metrics_port", LLM_TELEMETRY_METRICS_PORT, lambda n, v: _env_int(n, v, 0))
        pick("metrics_host", LLM_TELEMETRY_METRICS_HOST, _host)
        pick("metrics_app_path", LLM_TELEMETRY_METRICS_APP_PATH, lambda n, v: v.strip())
        pick("metrics_exporters", LLM_TELEMETRY_METRICS_EXPORTER, _parse_exporters)
        pick("pricing", LLM_TELEMETRY_PRICING, lambda n, v: v.strip())
        pick("attribution_headers", LLM_TELEMETRY_ATTRIBUTION_HEADERS, parse_mapping)
        pick("max_label_values", LLM_TELEMETRY_MAX_LABEL_VALUES, lambda n, v: _env_int(n, v, 1))
        pick("max_request_bytes", LLM_TELEMETRY_MAX_REQUEST_BYTES, lambda n, v: _env_int(n, v, 0))
        pick("max_inspected_bytes", LLM_TELEMETRY_MAX_INSPECTED_BYTES, lambda n, v: _env_int(n, v, 0))
        pick("routes", LLM_TELEMETRY_ROUTES, parse_mapping)
        pick("capture_content_max_chars", LLM_TELEMETRY_CAPTURE_CONTENT_MAX_CHARS, lambda n, v: _env_int(n, v, 0))
        pick("request_logs", LLM_TELEMETRY_REQUEST_LOGS, _env_bool)
        pick("echo_request_id", LLM_TELEMETRY_ECHO_REQUEST_ID, _env_bool)
        pick("tracing_http_span", LLM_TELEMETRY_TRACING_HTTP_SPAN, _env_bool)
        if overrides.get("redact") is not None:
            values["redact"] = overrides["redact"]  # a function: no environment variable
        pick("multiproc_dir", LLM_TELEMETRY_MULTIPROC_DIR, lambda n, v: v.strip())
        if isinstance(overrides.get("capture_content"), str):
            values["capture_content"] = _env_bool("capture_content", overrides["capture_content"])
        elif overrides.get("capture_content") is not None:
            values["capture_content"] = _argument("capture_content", overrides["capture_content"])
        elif env.get(LLM_TELEMETRY_CAPTURE_CONTENT):
            value = _not_blank(LLM_TELEMETRY_CAPTURE_CONTENT, env[LLM_TELEMETRY_CAPTURE_CONTENT])
            values["capture_content"] = _env_bool(LLM_TELEMETRY_CAPTURE_CONTENT, value)
        elif env.get(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT):
            values["capture_content"] = _otel_capture(env[OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT])

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise UnknownSettingError(f"unknown settings: {', '.join(_meant(name, names) for name in unknown)}")
        settings = cls(**values)
        settings._validate(variables)
        return settings

    def _validate(self, variables: Mapping[str, str]) -> None:
        """Check the values together; a message names the setting as it was given (``variables``: the environment
        variable of each setting read from there)."""
        if not 0 <= self.metrics_port <= 65535:
            name = variables.get("metrics_port", "metrics_port")
            raise ConfigurationError(f"{name}={self.metrics_port}: must be between 0 and 65535")
        if isinstance(self.pricing, str) and not self.pricing:
            # (Read as a path, it named the working directory: "pricing file '.': Is a directory".)
            name = variables.get("pricing", "pricing")
            raise ConfigurationError(
                f"{name} is blank: give the path of a YAML or JSON pricing file, or leave it unset for the embedded"
                " table"
            )
        if self.metrics_app_path is not None and self.metrics_app_path and not self.metrics_app_path.startswith("/"):
            name = variables.get("metrics_app_path", "metrics_app_path")
            raise ConfigurationError(f"{name}={self.metrics_app_path!r}: must start with '/'")
        if self.routes:
            for suffix, api in self.routes.items():
                if api not in APIS:
                    # (Router checks them too, as the middleware is built, in a message that named no setting.)
                    name = variables.get("routes", "routes")
                    raise ConfigurationError(
                        f"{name}: route {suffix!r} names unknown API {api!r}; known: {', '.join(APIS)}"
                    )
        for exporter in self.metrics_exporters:
            if exporter not in ("prometheus", "otlp"):
                raise ConfigurationError(f"metrics exporter {exporter!r}: expected prometheus, otlp or none")
        for header, label in self.attribution_headers.items():
            if unlabelled_header(header):
                name = variables.get("attribution_headers", "attribution_headers")
                raise ConfigurationError(
                    f"{name}: header {header!r} carries credentials, names the client or its user, or is an id per"
                    " request: never a label value"
                )
            if not label.isascii() or not label.replace("_", "").isalnum() or not label[0].isalpha():
                # (ASCII: a Prometheus label name is; other letters came out of the exposition dropped)
                name = variables.get("attribution_headers", "attribution_headers")
                raise ConfigurationError(
                    f"{name}: header {header!r} maps to {label!r}: a label is ASCII letters, digits and '_'"
                )


#: The type each argument that is not text must have (text is read as its environment variable would be).
_ARGUMENT_TYPES: dict[str, str] = {
    "enabled": "bool",
    "request_logs": "bool",
    "echo_request_id": "bool",
    "tracing_http_span": "bool",
    "capture_content": "bool",
    "metrics_port": "int",
    "max_label_values": "int",
    "max_request_bytes": "int",
    "max_inspected_bytes": "int",
    "capture_content_max_chars": "int",
    "attribution_headers": "mapping",
    "routes": "mapping",
    "metrics_exporters": "exporters",
    "pricing": "mapping",
}


def _argument(name: str, value: Any) -> Any:
    """A constructor argument that is not text, checked now: a wrong type would otherwise fail every request."""
    kind = _ARGUMENT_TYPES.get(name)
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r}: expected True or False")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{name}={value!r}: expected an integer")
        return _env_int(name, str(value), 1 if name == "max_label_values" else 0)
    if name == "pricing" and isinstance(value, os.PathLike):
        return os.fspath(value)
    if kind == "mapping":
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{name}={value!r}: expected a mapping, or text as its variable takes")
        if name != "pricing":
            if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()):
                raise ConfigurationError(f"{name}={value!r}: keys and values must be non-empty text")
            return {k.strip(): v.strip() for k, v in value.items()}
    if kind == "exporters":
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigurationError(f"{name}={value!r}: expected a list of names, or text as its variable takes")
        return _parse_exporters(name, ",".join(value)) if value else ()
    return value


def _parse_exporters(name: str, value: str) -> tuple[str, ...]:
    items = tuple(item.strip().lower() for item in value.split(",") if item.strip())
    if not items:
        # (Read as no exporter at all, a blank variable or a stray comma silently turned every metric off.)
        raise ConfigurationError(f"{name}={value!r}: names no exporter; expected prometheus, otlp (or both) or none")
    if items == ("none",):
        return ()
    for item in items:
        if item == "none":
            raise ConfigurationError(f"{name}={value!r}: none turns every exporter off and stands alone")
        if item not in ("prometheus", "otlp"):
            raise ConfigurationError(f"{name}={value!r}: {item!r} is not one of prometheus, otlp, none")
    return items


def _exporter_list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in (value or "").split(",") if item.strip())


@dataclasses.dataclass(frozen=True)
class OTelEnvironment:
    """The standard ``OTEL_*`` variables the middleware acts on, read in one place for metrics, traces and logs.

    Build with :meth:`resolve`. With ``OTEL_SDK_DISABLED=true`` every signal is off: no spans, no OTLP log
    records, and no metrics (neither the Prometheus endpoint nor OTLP), as the OpenTelemetry SDK itself does
    when it is disabled. The SDK and its exporters read the remaining variables themselves (endpoints, headers,
    ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, samplers).
    """

    #: ``OTEL_SDK_DISABLED=true``.
    sdk_disabled: bool = False
    #: Span exporters to build (``otlp``, ``console``, ...); empty: tracing is off unless a provider is given.
    traces_exporters: tuple[str, ...] = ()
    #: Log exporters besides stdout (``otlp``); empty: stdout only.
    logs_exporters: tuple[str, ...] = ()
    #: OTLP protocol per signal: ``grpc`` or ``http/protobuf``.
    traces_protocol: str = DEFAULT_OTLP_PROTOCOL
    metrics_protocol: str = DEFAULT_OTLP_PROTOCOL
    logs_protocol: str = DEFAULT_OTLP_PROTOCOL
    #: Exemplar filter of the metrics: ``trace_based``, ``always_on`` or ``always_off`` (any other value: the
    #: default, ``trace_based``).
    metrics_exemplar_filter: str = "trace_based"

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None) -> OTelEnvironment:
        """Read ``env`` (default ``os.environ``)."""
        env = os.environ if env is None else env
        warned: set[str] = set()  # the variables warned of (the generic one serves three signals: said once)

        def protocol(signal_var: str) -> str:
            value = (env.get(signal_var) or env.get(OTEL_EXPORTER_OTLP_PROTOCOL) or DEFAULT_OTLP_PROTOCOL).strip()
            if value not in ("grpc", DEFAULT_OTLP_PROTOCOL):
                source = signal_var if env.get(signal_var) else OTEL_EXPORTER_OTLP_PROTOCOL
                if source not in warned:
                    warned.add(source)
                    # http/json is a valid value the OpenTelemetry Python exporters do not implement; a typo is none.
                    logging.getLogger("llm_telemetry").warning(
                        "llm-telemetry: OTLP protocol %r (%s) is not one of grpc, http/protobuf; using http/protobuf",
                        value,
                        source,
                    )
                return DEFAULT_OTLP_PROTOCOL
            return value

        disabled = env.get(OTEL_SDK_DISABLED, "").strip().lower() == "true"
        traces = _exporter_list(env.get(OTEL_TRACES_EXPORTER))
        if not traces and (env.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or env.get(OTEL_EXPORTER_OTLP_ENDPOINT)):
            traces = ("otlp",)  # an endpoint alone turns tracing on
        logs = _exporter_list(env.get(OTEL_LOGS_EXPORTER))
        exemplars = env.get(OTEL_METRICS_EXEMPLAR_FILTER, "").strip().lower()
        if exemplars not in ("", "trace_based", "always_on", "always_off"):
            # (Taken as the default without a word, "alwaysoff" kept every exemplar it was set to drop.)
            logging.getLogger("llm_telemetry").warning(
                "llm-telemetry: %s=%r is not one of trace_based, always_on, always_off; using trace_based",
                OTEL_METRICS_EXEMPLAR_FILTER,
                env[OTEL_METRICS_EXEMPLAR_FILTER],
            )
        return cls(
            sdk_disabled=disabled,
            traces_exporters=() if disabled else tuple(t for t in traces if t != "none"),
            logs_exporters=() if disabled else tuple(x for x in logs if x != "none"),
            traces_protocol=protocol(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL),
            metrics_protocol=protocol(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL),
            logs_protocol=protocol(OTEL_EXPORTER_OTLP_LOGS_PROTOCOL),
            metrics_exemplar_filter=exemplars if exemplars in ("always_on", "always_off") else "trace_based",
        )


def batch_processor(processor_class: Any, exporter: Any, variables: str) -> Any:
    """``processor_class(exporter)`` (the SDK's ``BatchSpanProcessor`` or ``BatchLogRecordProcessor``), its queue and
    batch sizes read from the environment as the SDK reads them (``variables``: ``OTEL_BSP`` or ``OTEL_BLRP``), but
    with a batch no larger than the queue. The SDK refuses a batch size over the queue size with a ValueError, and its
    default batch is 512: a queue of fewer spans or records set alone (``OTEL_BSP_MAX_QUEUE_SIZE=256``, to bound the
    memory a down collector costs) took tracing, logs and metrics down with it. The batch is cut to the queue's size,
    as the OpenTelemetry Go and Java SDKs do, and a WARNING names the variables."""
    sizes = (getattr(processor_class, "_default_max_queue_size", None),
             getattr(processor_class, "_default_max_export_batch_size", None))  # fmt: skip
    if sizes[0] is None or sizes[1] is None:  # an SDK without them: its own reading and checks
        return processor_class(exporter)
    queue, batch = sizes[0](), sizes[1]()
    if isinstance(queue, int) and isinstance(batch, int) and 0 < queue < batch:
        logging.getLogger("llm_telemetry").warning(
            "llm-telemetry: %s_MAX_EXPORT_BATCH_SIZE (%d) is over %s_MAX_QUEUE_SIZE (%d): batches of %d are exported",
            variables,
            batch,
            variables,
            queue,
            queue,
        )
        return processor_class(exporter, max_queue_size=queue, max_export_batch_size=queue)
    return processor_class(exporter)
