"""The LLMTelemetry spec as typed values, with the CRD's defaults applied again.

The API server applies the schema defaults, but clients and emulators that skip them must not change the
outcome, and some rules (a TTFT objective on a bucket boundary, pricing from one source only) are not
expressible in the schema: those raise :class:`SpecError` naming the field.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from llm_telemetry.config import DEFAULT_MAX_LABEL_VALUES, DEFAULT_METRICS_PORT, unlabelled_header
from llm_telemetry.monitoring.dashboards import LOGS_MODES
from llm_telemetry.monitoring.rules import AlertThresholds
from llm_telemetry_operator import constants as c
from llm_telemetry_operator.errors import SpecError
from llm_telemetry_operator.labels import is_dns_subdomain, is_label_key, is_label_value

#: Prices a model entry may carry, in USD per million tokens.
PRICE_KINDS = (
    "input",
    "output",
    "cache_read",
    "cache_creation",
    "cache_creation_1h",
    "input_audio",
    "input_image",
    "output_audio",
    "output_image",
    "cache_read_image",
)
#: The highest price the middleware takes (``llm_telemetry.pricing.MAX_PRICE``, a dollar a token): a table with one
#: higher fails every pod's startup.
MAX_PRICE = 1_000_000.0
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
PROTOCOLS = ("grpc", "http/protobuf")
#: spec.logs.mode: how the request lines reach Loki, each with the dashboard query that finds them there.
LOG_MODES = LOGS_MODES
_DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
#: The longest scrape interval the rules' 5 minute rates work with: four scrapes in each window.
MAX_SCRAPE_INTERVAL_SECONDS = 75
#: The shortest scrape interval: every scrape is work in the app's own process, and faster than once a second
#: no query of the rules or the dashboard reads the difference.
MIN_SCRAPE_INTERVAL_SECONDS = 1
_ATTRIBUTION_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
_HEADER = re.compile(r"^[A-Za-z0-9-]+$")
#: A ConfigMap key, as the API server checks it.
_CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")
#: A Loki tenant id (X-Scope-OrgID): Loki's own rule, less '|', which separates tenants in a query.
_LOKI_TENANT = re.compile(r"[A-Za-z0-9!._*'()-]{1,150}")
#: One folder name, as the CRD has it: Grafana's dashboard sidecar joins the annotation to its own directory (an
#: absolute path or '..' would put the file anywhere the sidecar can write).
_FOLDER = re.compile(r"[^/\\\x00-\x1f]{1,63}")
#: Attribution labels a resource may have (the CRD's maxProperties): each multiplies the series and adds a variable
#: and panels to the dashboard, whose ConfigMap must stay under the API server's 1 MiB.
MAX_ATTRIBUTION_HEADERS = 10
#: The CRD's other bounds (maxItems, maxProperties, maxLength), checked here too for a resource stored before the CRD
#: had them: the CRD applied on an upgrade then refuses every update of it, the finalizer's removal included.
MAX_SELECTOR_REQUIREMENTS = 64
MAX_CHILD_LABELS = 64
MAX_INTERVAL_CHARS = 16
MAX_PRICED_MODELS = 500
#: Container names a resource may list, each a DNS-1123 label (at most 63 characters), as the API server has them.
MAX_CONTAINERS = 32
MAX_CONTAINER_NAME_CHARS = 63


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry of a label selector."""

    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selector:
    """A Kubernetes LabelSelector (``matchLabels`` and ``matchExpressions``, ANDed)."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True

    def to_query(self) -> str:
        """The selector in the API's ``labelSelector`` syntax, so lists return only the workloads it selects."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator in ("In", "NotIn"):
                parts.append(f"{req.key} {req.operator.lower()} ({','.join(sorted(req.values))})")
            else:
                parts.append(req.key if req.operator == "Exists" else f"!{req.key}")
        return ",".join(parts)


@dataclass(frozen=True)
class Metrics:
    port: int = DEFAULT_METRICS_PORT
    interval: str = "30s"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracing:
    enabled: bool = True
    #: None means the operator's default (LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT).
    endpoint: str | None = None
    protocol: str = "http/protobuf"
    sampling_ratio: float = 1.0


@dataclass(frozen=True)
class Logs:
    enabled: bool = True
    mode: str = "otlp"
    #: None means the operator's default (LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT).
    endpoint: str | None = None
    #: Loki tenant (``X-Scope-OrgID``); None means the operator's default (LLM_TELEMETRY_OPERATOR_LOGS_TENANT), ""
    #: none.
    tenant: str | None = None


@dataclass(frozen=True)
class Pricing:
    #: Inline table, ``{"gpt-4o": {"input": 2.5, "output": 10}}``; rendered into a ConfigMap we own.
    models: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: An existing ConfigMap holding the table, and its key.
    config_map: str | None = None
    config_map_key: str = "pricing.yaml"

    @property
    def inline(self) -> bool:
        return bool(self.models)

    @functools.cached_property
    def document(self) -> str:
        """The inline table as the pricing file (:func:`pricing_document`), rendered once per parsed spec: its size
        is checked when the spec is parsed, and each pass hashes and writes it."""
        return pricing_document(self.models)


@dataclass(frozen=True)
class Alerts:
    enabled: bool = True
    #: The middleware's own thresholds type, so the defaults live in one place (``llm_telemetry.monitoring.rules``).
    thresholds: AlertThresholds = field(default_factory=AlertThresholds)


@dataclass(frozen=True)
class Dashboard:
    enabled: bool = True
    folder: str = "LLM"


@dataclass(frozen=True)
class TelemetrySpec:
    """A parsed, defaulted LLMTelemetry ``spec``; build with :func:`parse_spec`."""

    selector: Selector
    containers: tuple[str, ...] = ()
    metrics: Metrics = field(default_factory=Metrics)
    tracing: Tracing = field(default_factory=Tracing)
    logs: Logs = field(default_factory=Logs)
    pricing: Pricing = field(default_factory=Pricing)
    attribution_headers: Mapping[str, str] = field(default_factory=dict)
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES
    alerts: Alerts = field(default_factory=Alerts)
    dashboard: Dashboard = field(default_factory=Dashboard)


def parse_spec(spec: Mapping[str, Any]) -> TelemetrySpec:
    """Validate and default a raw ``spec``; raises :class:`SpecError` naming the first bad field."""
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "must be an object")
    return TelemetrySpec(
        selector=_selector(_section(spec, "selector", "spec.selector", required=True)),
        containers=_containers(spec.get("containers")),
        metrics=_metrics(_section(spec, "metrics", "spec.metrics")),
        tracing=_tracing(_section(spec, "tracing", "spec.tracing")),
        logs=_logs(_section(spec, "logs", "spec.logs")),
        pricing=_pricing(_section(spec, "pricing", "spec.pricing")),
        attribution_headers=_attribution(_section(spec, "attribution", "spec.attribution")),
        max_label_values=_int(
            _section(spec, "attribution", "spec.attribution"),
            "maxLabelValues",
            "spec.attribution.maxLabelValues",
            DEFAULT_MAX_LABEL_VALUES,
            1,
            MAX_LABEL_VALUES,
        ),
        alerts=_alerts(_section(spec, "alerts", "spec.alerts")),
        dashboard=_dashboard(_section(spec, "dashboard", "spec.dashboard")),
    )


def _section(parent: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise SpecError(path, "is required")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(path, "must be an object")
    return value


def _strings(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(path, "must be a list of non-empty strings")
    return list(value)


def _containers(value: Any) -> tuple[str, ...]:
    names = _strings(value, "spec.containers")
    if len(names) > MAX_CONTAINERS:
        raise SpecError("spec.containers", f"has {len(names)} names; at most {MAX_CONTAINERS}")
    for i, name in enumerate(names):
        if len(name) > MAX_CONTAINER_NAME_CHARS:
            raise SpecError(
                f"spec.containers[{i}]",
                f"has {len(name)} characters; a container name has at most {MAX_CONTAINER_NAME_CHARS}",
            )
    # A set of names (a pod's containers have unique names): one given twice is one, injected and named once.
    return tuple(dict.fromkeys(names))


def _string_map(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise SpecError(path, "must map strings to strings")
    return {str(k): v for k, v in value.items()}


def _given(section: Mapping[str, Any], key: str, default: Any) -> Any:
    """The field's value; its default when it is absent or null (the API server prunes a null it is not told to
    keep, then applies the default)."""
    value = section.get(key)
    return default if value is None else value


def _bool(section: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = _given(section, key, default)
    if not isinstance(value, bool):
        raise SpecError(path, "must be true or false")
    return value


def _int(
    section: Mapping[str, Any], key: str, path: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    value = _given(section, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, "must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise SpecError(path, f"must be {bound}, got {value}")
    return value


def _number(
    section: Mapping[str, Any],
    key: str,
    path: str,
    default: float | None,
    *,
    minimum: float = 0.0,
    maximum: float | None = None,
    exclusive: bool = False,
) -> float | None:
    value = _given(section, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, "must be a number")
    low_ok = value > minimum if exclusive else value >= minimum
    high_ok = maximum is None or (value < maximum if exclusive else value <= maximum)
    if not (low_ok and high_ok):
        raise SpecError(path, f"{value} is out of range")
    return float(value)


def _choice(section: Mapping[str, Any], key: str, path: str, default: str, choices: tuple[str, ...]) -> str:
    value = _given(section, key, default)
    if value not in choices:
        raise SpecError(path, f"must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _url(section: Mapping[str, Any], key: str, path: str, signal: str) -> str | None:
    """An OTLP endpoint's base URL, to which the exporter adds ``/v1/<signal>``: one given with that path already
    (the signal's own URL, as collectors document it) loses it, or the path would be sent twice."""
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
        raise SpecError(path, f"must be an http(s) URL, got {shown(value) if isinstance(value, str) else value!r}")
    try:
        # The schema's pattern lets through what no URL parser reads (``http://[oops:4318``, a port of 99999):
        # refused here, or every pass would fail on it later.
        parts = urlsplit(value)
        host, _ = parts.hostname, parts.port
    except ValueError as exc:
        raise SpecError(path, f"is not a valid URL ({exc}): {shown(value)!r}") from None
    if not host:
        raise SpecError(path, f"has no host: {shown(value)!r}")
    # What a URL parser reads but no exporter connects to, or that requests would send differently.
    if any(ch.isspace() for ch in value):
        raise SpecError(path, f"holds whitespace: {shown(value)!r}")
    if not host.isascii():
        raise SpecError(path, f"has a host that is not ASCII (give its IDNA form, xn--...): {shown(value)!r}")
    if parts.port == 0 or parts.netloc.endswith(":"):
        raise SpecError(path, f"has no usable port (0 or empty): {shown(value)!r}")
    try:
        return otlp_base(value, signal)
    except ValueError as exc:
        raise SpecError(path, f"{exc}: {shown(value)!r}") from None


def shown(url: str) -> str:
    """``url`` as a status or event may show it: credentials in it (``http://user:secret@host``, a token as the user)
    as ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{scheme}{sep}***@{netloc.rsplit('@', 1)[1]}{slash}{path}"


def otlp_base(url: str, signal: str) -> str:
    """The base URL of an OTLP endpoint (a parseable http(s) URL), to which the exporter adds ``/v1/<signal>``: one
    given with that path already loses it. ValueError saying why for one with a query or fragment (the path would
    come after it) or with the other signal's path. Used for the spec's endpoints and the operator's defaults."""
    parts = urlsplit(url)
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("must have no query or fragment (the exporter adds a path after it)")
    path = parts.path.rstrip("/")
    other = "logs" if signal == "traces" else "traces"
    if path.endswith(f"/v1/{other}"):
        raise ValueError(f"is the URL of the {other}, not of the {signal}")
    url = url.rstrip("/")
    return url.removesuffix(f"/v1/{signal}") if path.endswith(f"/v1/{signal}") else url


#: The labels the operator puts on every child (it finds them by these): not for spec.metrics.labels to set.
OWN_LABELS = frozenset(
    (c.LABEL_NAME, c.LABEL_INSTANCE, c.LABEL_COMPONENT, c.LABEL_PART_OF, c.LABEL_MANAGED_BY, c.LABEL_OWNER)
)


def _label_key(key: str, path: str) -> None:
    if not is_label_key(key):
        raise SpecError(path, f"{key!r} is not a valid label key")


def _label_value(value: str, path: str) -> None:
    if not is_label_value(value):
        raise SpecError(path, f"{value!r} is not a valid label value (63 characters: letters, digits, - _ .)")


def _selector(raw: Mapping[str, Any]) -> Selector:
    labels = _string_map(raw.get("matchLabels"), "spec.selector.matchLabels")
    for key, value in labels.items():
        _label_key(key, "spec.selector.matchLabels")
        _label_value(value, f"spec.selector.matchLabels.{key}")
    listed = raw.get("matchExpressions") or []
    if not isinstance(listed, list):
        raise SpecError("spec.selector.matchExpressions", "must be a list")
    if len(listed) > MAX_SELECTOR_REQUIREMENTS:
        raise SpecError(
            "spec.selector.matchExpressions", f"has {len(listed)} requirements; at most {MAX_SELECTOR_REQUIREMENTS}"
        )
    expressions = []
    for i, item in enumerate(listed):
        path = f"spec.selector.matchExpressions[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("key"), str):
            raise SpecError(path, "needs a key")
        op = item.get("operator")
        if op not in SELECTOR_OPERATORS:
            raise SpecError(f"{path}.operator", f"must be one of {', '.join(SELECTOR_OPERATORS)}")
        values = tuple(_strings(item.get("values"), f"{path}.values"))
        if op in ("In", "NotIn") and not values:
            raise SpecError(f"{path}.values", f"must not be empty for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise SpecError(f"{path}.values", f"must be empty for {op}")
        _label_key(item["key"], f"{path}.key")
        for value in values:
            _label_value(value, f"{path}.values")
        expressions.append(Requirement(item["key"], op, values))
    if not labels and not any(e.operator in ("In", "Exists") for e in expressions):
        # An empty selector would inject into every workload of the namespace, and one of only NotIn and
        # DoesNotExist into every workload but a few (each injection restarts its pods): almost certainly a mistake.
        raise SpecError(
            "spec.selector",
            "must name the workloads it selects: a matchLabels entry, or a matchExpressions requirement with In or"
            " Exists (NotIn and DoesNotExist alone select every other workload of the namespace)",
        )
    return Selector(labels, tuple(expressions))


def _metrics(raw: Mapping[str, Any]) -> Metrics:
    interval = _given(raw, "interval", "30s")
    if not isinstance(interval, str) or not _DURATION.fullmatch(interval) or len(interval) > MAX_INTERVAL_CHARS:
        raise SpecError(
            "spec.metrics.interval",
            f"must be a duration like 30s, of at most {MAX_INTERVAL_CHARS} characters, got {interval[:64]!r}"
            if isinstance(interval, str)
            else f"must be a duration like 30s, got {interval!r}",
        )
    seconds = int(interval.rstrip("msh")) * _DURATION_UNITS[interval.lstrip("0123456789")]
    if not MIN_SCRAPE_INTERVAL_SECONDS <= seconds <= MAX_SCRAPE_INTERVAL_SECONDS:
        # The CRD says so too; this is for resources stored before it did.
        raise SpecError(
            "spec.metrics.interval",
            f"must be at least {MIN_SCRAPE_INTERVAL_SECONDS}s (each scrape is work in the app's process) and at most "
            f"{MAX_SCRAPE_INTERVAL_SECONDS}s (the alert and recording rules rate over 5 minutes, which takes four "
            f"scrapes in each window), got {interval}",
        )
    labels = _string_map(raw.get("labels"), "spec.metrics.labels")
    if len(labels) > MAX_CHILD_LABELS:
        raise SpecError("spec.metrics.labels", f"has {len(labels)} labels; at most {MAX_CHILD_LABELS}")
    for key, value in labels.items():  # they label the ServiceMonitor and PrometheusRule
        _label_key(key, "spec.metrics.labels")
        _label_value(value, f"spec.metrics.labels.{key}")
        if key in OWN_LABELS:
            raise SpecError(f"spec.metrics.labels.{key}", "is a label the operator sets on its children itself")
    return Metrics(
        port=_int(raw, "port", "spec.metrics.port", DEFAULT_METRICS_PORT, 1, 65535),
        interval=interval,
        labels=labels,
    )


def _tracing(raw: Mapping[str, Any]) -> Tracing:
    ratio = _number(raw, "samplingRatio", "spec.tracing.samplingRatio", 1.0, maximum=1.0)
    assert ratio is not None
    return Tracing(
        enabled=_bool(raw, "enabled", "spec.tracing.enabled", True),
        endpoint=_url(raw, "endpoint", "spec.tracing.endpoint", "traces"),
        protocol=_choice(raw, "protocol", "spec.tracing.protocol", "http/protobuf", PROTOCOLS),
        sampling_ratio=ratio,
    )


def _logs(raw: Mapping[str, Any]) -> Logs:
    return Logs(
        enabled=_bool(raw, "enabled", "spec.logs.enabled", True),
        mode=_choice(raw, "mode", "spec.logs.mode", "otlp", LOG_MODES),
        endpoint=_url(raw, "endpoint", "spec.logs.endpoint", "logs"),
        tenant=_tenant(raw.get("tenant"), "spec.logs.tenant"),
    )


def loki_tenant_problem(tenant: str) -> str | None:
    """Why Loki would refuse ``tenant`` as a tenant id (its own rule), or None."""
    if not _LOKI_TENANT.fullmatch(tenant) or tenant in (".", ".."):
        return "must be a Loki tenant id: 1 to 150 of letters, digits and !-_.*'(), not . or .."
    return None


def _tenant(value: Any, where: str) -> str | None:
    """None: the operator's default; "": no tenant, whatever the default."""
    if value is None:
        return None
    if value == "":
        return ""
    problem = "must be a string" if not isinstance(value, str) else loki_tenant_problem(value)
    if problem:
        raise SpecError(where, problem)
    return str(value)


#: The pricing file's largest size: a ConfigMap's data is 1 MiB at most, less room for its metadata.
MAX_PRICING_BYTES = 1_000_000


def pricing_document(models: Mapping[str, Mapping[str, float]]) -> str:
    """The inline pricing table as the YAML file the middleware reads (``LLM_TELEMETRY_PRICING``); names as they
    are (escaped, a non-ASCII character took up to ten bytes), unless one would not read back so."""
    table = {model: dict(prices) for model, prices in sorted(models.items())}
    document = yaml.safe_dump({"models": table}, sort_keys=True, allow_unicode=True)
    if not document.isascii() and yaml.safe_load(document) != {"models": table}:
        # A character YAML reads as a line break (NEL, U+2028) would fold into a space: those names escaped.
        document = yaml.safe_dump({"models": table}, sort_keys=True)
    return document


def _pricing(raw: Mapping[str, Any]) -> Pricing:
    models_raw = raw.get("models")
    ref = raw.get("configMapRef")
    if models_raw and ref:
        raise SpecError("spec.pricing", "set either models or configMapRef, not both")
    models: dict[str, dict[str, float]] = {}
    pricing = Pricing()
    if models_raw is not None:
        if not isinstance(models_raw, Mapping):
            raise SpecError("spec.pricing.models", "must map model names to prices")
        if len(models_raw) > MAX_PRICED_MODELS:
            raise SpecError(
                "spec.pricing.models",
                f"has {len(models_raw)} models; at most {MAX_PRICED_MODELS} (use configMapRef for a larger table)",
            )
        for model, prices in models_raw.items():
            path = f"spec.pricing.models.{model}"
            if not isinstance(prices, Mapping) or not prices:
                raise SpecError(path, "must map price kinds to numbers")
            entry: dict[str, float] = {}
            for kind in prices:
                if kind not in PRICE_KINDS:
                    raise SpecError(f"{path}.{kind}", f"unknown price kind; expected one of {', '.join(PRICE_KINDS)}")
                value = _number(prices, kind, f"{path}.{kind}", None, maximum=MAX_PRICE)
                if value is None:  # null: the API server drops it where the CRD's schema applies
                    raise SpecError(f"{path}.{kind}", "must be a number")
                entry[kind] = value
            missing = [kind for kind in ("input", "output") if kind not in entry]
            if missing:  # the middleware refuses such a table at startup: every pod would fail to start
                raise SpecError(path, f"needs the {' and '.join(missing)} price")
            models[str(model)] = entry
        pricing = Pricing(models=models)
        size = len(pricing.document.encode())
        if size > MAX_PRICING_BYTES:
            raise SpecError(
                "spec.pricing.models",
                f"makes a pricing file of {size} bytes; its ConfigMap holds {MAX_PRICING_BYTES} at most (use "
                "configMapRef, or fewer or shorter model names)",
            )
    if ref is not None:
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref["name"]:
            raise SpecError("spec.pricing.configMapRef.name", "is required")
        if not is_dns_subdomain(ref["name"]):
            raise SpecError("spec.pricing.configMapRef.name", f"{ref['name']!r} is not a ConfigMap name")
        key = ref.get("key", "pricing.yaml")
        if (
            not isinstance(key, str)
            or len(key) > 253
            or not _CONFIGMAP_KEY.fullmatch(key)
            or key == "."
            or key.startswith("..")
        ):
            raise SpecError(
                "spec.pricing.configMapRef.key", f"must be a ConfigMap key (letters, digits, - _ .), got {key!r}"
            )
        return Pricing(config_map=ref["name"], config_map_key=key)
    return pricing


#: The most distinct values a resource may keep per attribution label (the CRD's maximum too): each one is a series
#: of every metric the label is on, in every Prometheus that scrapes the pods.
MAX_LABEL_VALUES = 10_000


def _attribution(raw: Mapping[str, Any]) -> dict[str, str]:
    headers = _string_map(raw.get("headers"), "spec.attribution.headers")
    if len(headers) > MAX_ATTRIBUTION_HEADERS:
        raise SpecError("spec.attribution.headers", f"has {len(headers)} headers; at most {MAX_ATTRIBUTION_HEADERS}")
    result: dict[str, str] = {}
    for header, label in headers.items():
        if not _HEADER.fullmatch(header):
            raise SpecError(f"spec.attribution.headers.{header}", "is not a valid HTTP header name")
        if unlabelled_header(header):
            raise SpecError(
                f"spec.attribution.headers.{header}",
                "carries credentials, names the client or its user, or is an id per request: never a label value",
            )
        if not _ATTRIBUTION_LABEL.fullmatch(label) or len(label) > 63:
            raise SpecError(
                f"spec.attribution.headers.{header}", f"label {label!r} must match [a-z][a-z0-9_]* (63 at most)"
            )
        if header.lower() in result:
            raise SpecError("spec.attribution.headers", f"{header!r} is given twice (header names ignore case)")
        result[header.lower()] = label
    if len(set(result.values())) != len(result):
        raise SpecError("spec.attribution.headers", "two headers map to the same label")
    return result


#: CRD field names under spec.alerts, and the AlertThresholds attributes they set.
_ALERT_FIELDS = {
    "errorRatio": "error_ratio",
    "p95RequestDurationSeconds": "p95_request_duration_seconds",
    "p95TtftSeconds": "p95_ttft_seconds",
    "toolFailureRatio": "tool_failure_ratio",
    "costPerHourUsd": "cost_per_hour_usd",
    "availabilityObjective": "availability_objective",
    "ttftObjective": "ttft_objective",
    "ttftObjectiveSeconds": "ttft_objective_seconds",
}
_RATIOS = {"errorRatio", "toolFailureRatio", "availabilityObjective", "ttftObjective"}
_EXCLUSIVE = {"availabilityObjective", "ttftObjective", "ttftObjectiveSeconds"}


def _alerts(raw: Mapping[str, Any]) -> Alerts:
    defaults = AlertThresholds()
    values: dict[str, Any] = {}
    for key, attribute in _ALERT_FIELDS.items():
        default = getattr(defaults, attribute)
        value = _number(
            raw,
            key,
            f"spec.alerts.{key}",
            default,
            maximum=1.0 if key in _RATIOS else None,
            exclusive=key in _EXCLUSIVE,
        )
        values[attribute] = default if value is None else value
    try:
        thresholds = AlertThresholds(**values)
    except ValueError as exc:
        # The middleware validates too (e.g. the TTFT objective must be a bucket boundary): name the CRD field.
        text = str(exc)
        for key, attribute in _ALERT_FIELDS.items():
            if f".{attribute}=" in text:
                raise SpecError(f"spec.alerts.{key}", text) from None
        raise SpecError("spec.alerts", text) from None
    return Alerts(enabled=_bool(raw, "enabled", "spec.alerts.enabled", True), thresholds=thresholds)


def _dashboard(raw: Mapping[str, Any]) -> Dashboard:
    folder = raw.get("folder", "LLM")
    if not isinstance(folder, str) or not _FOLDER.fullmatch(folder) or folder in (".", ".."):
        raise SpecError(
            "spec.dashboard.folder",
            "must be one folder name of 1 to 63 characters: no '/', '\\', control characters, '.' or '..'",
        )
    return Dashboard(enabled=_bool(raw, "enabled", "spec.dashboard.enabled", True), folder=folder)
