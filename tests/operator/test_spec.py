"""parse_spec: the CRD's defaults applied again, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_telemetry.config import ConfigurationError, Settings
from llm_telemetry_operator.errors import MAX_MESSAGE_CHARS, SpecError
from llm_telemetry_operator.spec import PRICE_KINDS, parse_spec

SELECTOR = {"matchLabels": {"app": "chat"}}


def test_spec_minimal_gets_every_default() -> None:
    spec = parse_spec({"selector": SELECTOR})
    assert spec.selector.match_labels == {"app": "chat"}
    assert spec.containers == ()
    assert (spec.metrics.port, spec.metrics.interval, dict(spec.metrics.labels)) == (9464, "30s", {})
    assert spec.tracing.enabled and spec.tracing.endpoint is None
    assert (spec.tracing.protocol, spec.tracing.sampling_ratio) == ("http/protobuf", 1.0)
    assert spec.logs.enabled and spec.logs.mode == "otlp" and spec.logs.endpoint is None
    assert not spec.pricing.inline and spec.pricing.config_map is None
    assert dict(spec.attribution_headers) == {} and spec.max_label_values == 100
    assert spec.alerts.enabled
    a = spec.alerts.thresholds
    assert (a.error_ratio, a.p95_request_duration_seconds, a.p95_ttft_seconds) == (0.05, 81.92, 2.5)
    assert (a.tool_failure_ratio, a.cost_per_hour_usd) == (0.2, None)
    assert (a.availability_objective, a.ttft_objective, a.ttft_objective_seconds) == (0.99, 0.99, 2.5)
    assert spec.dashboard.enabled and spec.dashboard.folder == "LLM"


def test_spec_selector_match_expressions() -> None:
    spec = parse_spec(
        {
            "selector": {
                "matchLabels": {"app": "chat"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                ],
            }
        }
    )
    assert spec.selector.matches({"app": "chat", "tier": "gold"})
    assert not spec.selector.matches({"app": "chat", "tier": "bronze"})
    assert not spec.selector.matches({"app": "chat", "tier": "gold", "canary": "1"})
    assert not spec.selector.matches({"tier": "gold"})
    # Sent to the API server as a list's labelSelector, in its own syntax.
    assert spec.selector.to_query() == "app=chat,tier in (gold,silver),!canary"


@pytest.mark.parametrize(
    ("expression", "selected"),
    [
        # Each operator as Kubernetes defines it, over: no such label, the label with a listed value, with another.
        ({"key": "track", "operator": "In", "values": ["stable", "beta"]}, (False, True, False)),
        ({"key": "track", "operator": "NotIn", "values": ["stable", "beta"]}, (True, False, True)),
        ({"key": "track", "operator": "Exists"}, (False, True, True)),
        ({"key": "track", "operator": "DoesNotExist"}, (True, False, False)),
    ],
)
def test_selector_matches_each_operator_as_kubernetes_defines_it(
    expression: dict[str, Any], selected: tuple[bool, bool, bool]
) -> None:
    """``matches`` decides whether a workload the operator injected is still selected after a relabel (and which
    peers a resource has): a workload relabelled into a NotIn value must be let go, as the API server's list would."""
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}, "matchExpressions": [expression]}})
    labels = ({"app": "chat"}, {"app": "chat", "track": "stable"}, {"app": "chat", "track": "canary"})
    assert tuple(spec.selector.matches(one) for one in labels) == selected
    assert not any(spec.selector.matches({**one, "app": "other"}) for one in labels)  # and matchLabels still holds


def test_spec_pricing_reference_and_attribution() -> None:
    spec = parse_spec(
        {
            "selector": SELECTOR,
            "pricing": {"configMapRef": {"name": "prices"}},
            "attribution": {"headers": {"X-Tenant-Id": "tenant"}},
        }
    )
    assert (spec.pricing.config_map, spec.pricing.config_map_key) == ("prices", "pricing.yaml")
    assert dict(spec.attribution_headers) == {"x-tenant-id": "tenant"}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.selector"),
        ({"selector": {}}, "spec.selector"),
        (
            {"selector": SELECTOR, "attribution": {"headers": {"Authorization": "a"}}},
            "spec.attribution.headers.Authorization",
        ),
        ({"selector": SELECTOR, "attribution": {"headers": {"cookie": "session"}}}, "spec.attribution.headers.cookie"),
        ({"selector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}}, "spec.selector"),
        ({"selector": {"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}}, "spec.selector"),
        ({"selector": "app=chat"}, "spec.selector"),
        (
            {"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            "spec.selector.matchExpressions[0].values",
        ),
        (
            {"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
            "spec.selector.matchExpressions[0].operator",
        ),
        ({"selector": {"matchLabels": {"app": "chat,env=prod"}}}, "spec.selector.matchLabels.app"),
        ({"selector": {"matchLabels": {"bad key": "x"}}}, "spec.selector.matchLabels"),
        (
            {"selector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a b"]}]}},
            "spec.selector.matchExpressions[0].values",
        ),
        ({"metrics": {"port": 70000}}, "spec.metrics.port"),
        ({"metrics": {"port": "9464"}}, "spec.metrics.port"),
        ({"metrics": {"interval": "often"}}, "spec.metrics.interval"),
        ({"tracing": {"endpoint": "jaeger:4318"}}, "spec.tracing.endpoint"),
        ({"tracing": {"endpoint": "http://[oops:4318"}}, "spec.tracing.endpoint"),
        ({"tracing": {"endpoint": "http://jaeger:99999"}}, "spec.tracing.endpoint"),
        ({"tracing": {"endpoint": "http://collector.example.com:4318/a b"}}, "spec.tracing.endpoint"),
        ({"tracing": {"endpoint": "http://collector.example.com:0"}}, "spec.tracing.endpoint"),
        ({"tracing": {"endpoint": "http://collector.obs.svc:/x"}}, "spec.tracing.endpoint"),
        ({"logs": {"endpoint": "http://jäger.observability.svc:4318"}}, "spec.logs.endpoint"),
        ({"logs": {"endpoint": "http://loki:port/otlp"}}, "spec.logs.endpoint"),
        ({"logs": {"endpoint": "http://:3100/otlp"}}, "spec.logs.endpoint"),
        ({"metrics": {"labels": {"bad key!": "x"}}}, "spec.metrics.labels"),
        ({"metrics": {"labels": {"release": "has space"}}}, "spec.metrics.labels.release"),
        ({"tracing": {"samplingRatio": 2}}, "spec.tracing.samplingRatio"),
        ({"tracing": {"protocol": "thrift"}}, "spec.tracing.protocol"),
        ({"logs": {"enabled": "yes"}}, "spec.logs.enabled"),
        ({"pricing": {"models": {"m": {"input": 1}}, "configMapRef": {"name": "p"}}}, "spec.pricing"),
        ({"pricing": {"models": {"m": {"tokens": 1}}}}, "spec.pricing.models.m.tokens"),
        ({"pricing": {"models": {"m": {"input": -1}}}}, "spec.pricing.models.m.input"),
        ({"attribution": {"headers": {"x-a": "Bad-Label"}}}, "spec.attribution.headers.x-a"),
        ({"attribution": {"headers": {"x-a": "t", "x-b": "t"}}}, "spec.attribution.headers"),
        ({"attribution": {"headers": {"X-Tenant": "tenant", "x-tenant": "team"}}}, "spec.attribution.headers"),
        ({"attribution": {"maxLabelValues": 0}}, "spec.attribution.maxLabelValues"),
        ({"alerts": {"availabilityObjective": 1}}, "spec.alerts.availabilityObjective"),
        ({"alerts": {"p95TtftSeconds": 41}}, "spec.alerts.p95TtftSeconds"),
        ({"metrics": {"interval": "2m"}}, "spec.metrics.interval"),
        ({"metrics": {"interval": "0s"}}, "spec.metrics.interval"),
        ({"metrics": {"interval": "999ms"}}, "spec.metrics.interval"),
        ({"alerts": {"p95RequestDurationSeconds": 600}}, "spec.alerts.p95RequestDurationSeconds"),
        ({"dashboard": {"folder": ""}}, "spec.dashboard.folder"),
        # A final newline, which YAML's `key: |` gives a value, and which the API server refuses in a label: not
        # passed on to a child that would be refused on every write, nor to a selector the server reads without it.
        ({"metrics": {"labels": {"release": "kube-prometheus-stack\n"}}}, "spec.metrics.labels.release"),
        ({"metrics": {"labels": {"release\n": "kps"}}}, "spec.metrics.labels"),
        ({"selector": {"matchLabels": {"app": "chat\n"}}}, "spec.selector.matchLabels.app"),
        (
            {"selector": {"matchExpressions": [{"key": "app\n", "operator": "Exists"}]}},
            "spec.selector.matchExpressions[0].key",
        ),
        (
            {"attribution": {"headers": {"X-Tenant": "tenant", "x-tenant\n": "team"}}},
            "spec.attribution.headers.x-tenant\n",
        ),
        ({"metrics": {"interval": "30s\n"}}, "spec.metrics.interval"),
        (
            {"selector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["chat"]}]}},
            "spec.selector.matchExpressions[0].values",
        ),
        (
            {"selector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]}},
            "spec.selector.matchExpressions[0].values",
        ),
        ({"pricing": {"configMapRef": {"name": "prices-50%"}}}, "spec.pricing.configMapRef.name"),
        ({"pricing": {"configMapRef": {"name": "../prices"}}}, "spec.pricing.configMapRef.name"),
        ({"pricing": {"configMapRef": {"name": "prices", "key": "a/b"}}}, "spec.pricing.configMapRef.key"),
        ({"pricing": {"configMapRef": {"name": "prices", "key": "..data"}}}, "spec.pricing.configMapRef.key"),
        ({"pricing": {"configMapRef": {"name": "prices", "key": "."}}}, "spec.pricing.configMapRef.key"),
        ({"logs": {"endpoint": "http://loki:3100/otlp?tenant=a"}}, "spec.logs.endpoint"),
        ({"tracing": {"endpoint": "http://collector:4318/v1/logs"}}, "spec.tracing.endpoint"),
        ({"logs": {"endpoint": "http://loki:3100/otlp/v1/traces"}}, "spec.logs.endpoint"),
    ],
)
def test_spec_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    raw = {"selector": SELECTOR, **spec} if "selector" not in spec and spec else spec
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://jaeger:4318", "http://jaeger:4318"),
        ("http://jaeger:4318/", "http://jaeger:4318"),
        ("http://jaeger:4318/v1/traces", "http://jaeger:4318"),
        ("https://gateway.example/otel/v1/traces/", "https://gateway.example/otel"),
    ],
)
def test_otlp_endpoints_given_with_the_signals_path_lose_it(given: str, base: str) -> None:
    """The exporter adds /v1/traces (and the operator /v1/logs) to the base: the signal's own URL, as collectors
    document it, would otherwise be sent to with the path twice."""
    spec = parse_spec({"selector": SELECTOR, "tracing": {"endpoint": given}, "logs": {"endpoint": f"{given}/otlp"}})
    assert spec.tracing.endpoint == base
    logs = parse_spec({"selector": SELECTOR, "logs": {"endpoint": given.replace("traces", "logs")}}).logs.endpoint
    assert logs == base


def test_spec_selector_accepts_prefixed_keys_and_empty_values() -> None:
    spec = parse_spec({"selector": {"matchLabels": {"app.kubernetes.io/name": "chat", "canary": ""}}})
    assert spec.selector.matches({"app.kubernetes.io/name": "chat", "canary": ""})
    assert spec.selector.to_query() == "app.kubernetes.io/name=chat,canary="


#: Any JSON value, long strings included.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.just("x" * 5000),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10) | st.just("k" * 3000), inner),
    max_leaves=10,
)
#: Where a hostile or mistaken value may sit: every field the spec reads, and the sections themselves.
SPEC_PATHS = [
    ("selector",), ("selector", "matchLabels"), ("selector", "matchExpressions"), ("containers",),
    ("metrics",), ("metrics", "port"), ("metrics", "interval"), ("metrics", "labels"),
    ("tracing",), ("tracing", "enabled"), ("tracing", "endpoint"), ("tracing", "protocol"),
    ("tracing", "samplingRatio"),
    ("logs",), ("logs", "enabled"), ("logs", "mode"), ("logs", "endpoint"),
    ("pricing",), ("pricing", "models"), ("pricing", "configMapRef"),
    ("attribution",), ("attribution", "headers"), ("attribution", "maxLabelValues"),
    ("alerts",), ("alerts", "errorRatio"), ("alerts", "costPerHourUsd"), ("alerts", "ttftObjectiveSeconds"),
    ("alerts", "availabilityObjective"), ("dashboard",), ("dashboard", "enabled"), ("dashboard", "folder"),
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SPEC_PATHS), json_values), min_size=1, max_size=4))
def test_any_value_anywhere_parses_or_is_a_spec_error(changes: list[tuple[tuple[str, ...], Any]]) -> None:
    """An API server without the CRD's schema (or a client writing past it) may store any JSON: the operator then
    parses the spec or refuses it with a SpecError (an Invalid status and an event), never another exception,
    which would only fail the pass again and again; and its message stays short enough for a condition."""
    spec: dict[str, Any] = {"selector": dict(SELECTOR)}
    for path, value in changes:
        node = spec
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    try:
        parse_spec(spec)
    except SpecError as exc:
        assert exc.field.startswith("spec")
        assert len(str(exc)) <= MAX_MESSAGE_CHARS


@pytest.mark.parametrize("spec", ["selector", 3, [SELECTOR], True])
def test_a_spec_that_is_no_object_is_a_spec_error(spec: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.field == "spec"


def test_null_fields_take_their_defaults_as_the_api_server_gives_them() -> None:
    """The API server prunes a null it is not told to keep and applies the default; so does the operator."""
    nulls = {"metrics": {"interval": None, "port": None}, "tracing": {"samplingRatio": None, "enabled": None}}
    assert parse_spec({"selector": SELECTOR, **nulls}) == parse_spec({"selector": SELECTOR})


def test_spec_error_messages_stay_short_whatever_they_quote() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"selector": {"matchLabels": {"app": "x" * 100_000}}})
    assert info.value.field == "spec.selector.matchLabels.app" and len(str(info.value)) <= MAX_MESSAGE_CHARS


def test_credentials_in_an_endpoint_are_never_shown() -> None:
    """A password (or a token as the user) in an endpoint URL is masked in what the status and events say."""
    from llm_telemetry_operator.spec import shown

    assert shown("http://user:s3cret@collector.obs.svc:4318/x@y") == "http://***@collector.obs.svc:4318/x@y"
    assert shown("https://tok@h") == "https://***@h" and shown("http://h:4318/a@b") == "http://h:4318/a@b"
    with pytest.raises(SpecError) as info:
        parse_spec({"selector": SELECTOR, "tracing": {"endpoint": "http://user:s3cret@collector:99999"}})
    assert "s3cret" not in str(info.value)


def _crd_bounds() -> dict[str, tuple[str, int]]:
    """Each bound on a count or a length in the CRD's spec schema (maxItems, maxProperties, maxLength), by path."""
    import pathlib

    import yaml

    crd = next(pathlib.Path(__file__).parents[2].glob("crds/*.yaml"))
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bounds: dict[str, tuple[str, int]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        for keyword in ("maxItems", "maxProperties", "maxLength"):
            if keyword in node:
                bounds[path] = (keyword, node[keyword])
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        for key, suffix in (("additionalProperties", ".*"), ("items", "[*]")):
            if isinstance(node.get(key), dict):
                walk(node[key], path + suffix)

    walk(schema["properties"]["spec"], "spec")
    return bounds


def _over(path: str, n: int) -> dict[str, Any]:
    """A spec valid but for ``path``, which has ``n`` items, properties or characters."""
    price = {"input": 1, "output": 2}
    given: dict[str, Any] = {
        "spec.selector.matchExpressions": {
            "selector": {"matchExpressions": [{"key": f"k{i}", "operator": "Exists"} for i in range(n)]}
        },
        # An enum: no value of the bound's length is valid; one within it is.
        "spec.selector.matchExpressions[*].operator": {
            "selector": {
                "matchExpressions": [{"key": "app", "operator": "In" if n <= 16 else "I" * n, "values": ["a"]}]
            }
        },
        "spec.containers": {"containers": [f"c{i}" for i in range(n)]},
        "spec.containers[*]": {"containers": ["app", "c" * n]},
        "spec.metrics.interval": {"metrics": {"interval": "3s".rjust(n, "0")}},
        "spec.metrics.labels": {"metrics": {"labels": {f"team{i}": "x" for i in range(n)}}},
        "spec.logs.tenant": {"logs": {"tenant": "t" * n}},
        "spec.pricing.models": {"pricing": {"models": {f"model-{i}": price for i in range(n)}}},
        "spec.pricing.models.*": {"pricing": {"models": {"m": {kind: 1 for kind in [*PRICE_KINDS, "other"][:n]}}}},
        "spec.attribution.headers": {"attribution": {"headers": {f"X-H{i}": f"h{i}" for i in range(n)}}},
        "spec.attribution.headers.*": {"attribution": {"headers": {"X-Tenant": "t" * n}}},
        "spec.dashboard.folder": {"dashboard": {"folder": "f" * n}},
    }[path]
    return {"selector": SELECTOR, **given}


@pytest.mark.parametrize(("path", "bound"), sorted(_crd_bounds().items()))
def test_every_bound_of_the_crd_is_checked_by_the_operator_too(path: str, bound: tuple[str, int]) -> None:
    """A resource stored before the CRD had a bound (or on a server that did not check it) is refused by the
    operator, with the field named, rather than served: the CRD applied on the upgrade refuses every update of it,
    so its deletion would hang on the finalizer. At the bound it is accepted."""
    _, most = bound
    parse_spec(_over(path, most))
    with pytest.raises(SpecError) as refused:
        parse_spec(_over(path, most + 1))
    assert refused.value.field.startswith(path.split("[")[0].split(".*")[0]), refused.value


@pytest.mark.parametrize(
    "header",
    [
        # credentials by another name
        "x-auth-token", "x-amz-security-token", "ocp-apim-subscription-key", "x-csrf-token", "x-access-token",
        "x-client-secret", "x-session-id", "x-signature", "x-jwt-assertion", "x-access-key-id", "x-api-keys",
        "x-amzn-oidc-data", "x-ms-client-principal-name", "x-forwarded-client-cert", "X-Auth-Token",
        "x-functions-key", "x-master-key", "x-admin-key",
        # the client or its user
        "x-user-id", "openai-user", "x-end-user", "x-forwarded-for", "x-real-ip", "cf-connecting-ip", "forwarded",
        "x-forwarded-email", "X-Goog-Authenticated-User-Email", "Cf-Access-Authenticated-User-Email",
        "X-Forwarded-Preferred-Username", "x-user-email", "x-username", "x-user-name", "x-authenticated-userid",
        "ssl-client-subject-dn", "x-arr-clientcert", "x-client-cert-spiffe", "x-client-cert-dnsname-san",
        "x-endpoint-api-userinfo", "x-apigateway-api-userinfo", "x-userinfo", "x-envoy-external-address",
        "x-original-forwarded-for", "Fastly-Client-IP", "Fly-Client-IP", "X-Azure-ClientIP", "X-Azure-SocketIP",
        "CloudFront-Viewer-Address", "X-Cluster-Client-IP", "X-AppEngine-User-IP", "CF-Connecting-IPv6",
        "X-Vercel-Forwarded-For", "X-Originating-IP", "Remote-Addr", "X-SSL-Client-DN", "X-SSL-Client-S-DN",
        "X-SSL-Client-CN", "X-SSL-Client-SHA1", "X-SSL-Client-Fingerprint", "X-Client-DN", "X-Client-Certificate",
        "Remote-Name", "X-Webauth-Name", "Tailscale-User-Login", "X-authentik-name", "X-authentik-uid",
        "X-Pomerium-Claim-Sub", "X-AppEngine-User-Nickname", "X-Consumer-ID", "X-Consumer-Custom-ID", "From", "eppn",
        # keys that are credentials: an app's (DD-APPLICATION-KEY's kind), an SDK's environment key, an encryption key
        "x-app-key", "x-application-key", "x-environment-key", "x-amz-server-side-encryption-customer-key",
        # per-request, per-conversation and per-trace ids
        "x-correlation-id", "x-amzn-trace-id", "x-b3-traceid", "request-id", "uber-trace-id", "x-cloud-trace-context",
        "x-message-id", "x-conversation-id", "x-thread-id", "x-run-id", "x-litellm-call-id", "baggage",
        "sentry-trace", "x-datadog-parent-id", "x-request-start", "idempotency-key",
    ],
)  # fmt: skip
def test_headers_that_name_credentials_users_or_requests_are_never_labels(header: str) -> None:
    """Their values would be label values anyone who queries Prometheus reads, and attributes of every span."""
    with pytest.raises(ConfigurationError, match="carries credentials"):
        Settings.resolve(env={}, attribution_headers={header: "label"})
    with pytest.raises(SpecError, match="carries credentials"):
        parse_spec({"selector": {"matchLabels": {"a": "b"}}, "attribution": {"headers": {header: "label"}}})


@pytest.mark.parametrize(
    "header",
    [
        "x-tenant-id", "x-team", "x-feature", "x-llm-app", "x-project", "x-environment", "x-org", "x-customer",
        "x-use-case", "x-model-route", "x-client-name", "user-agent", "x-user-tier", "x-user-role", "x-project-key",
        "x-token-budget", "x-author", "x-tenant-key", "x-feature-key", "x-group-key", "x-customer-key",
        "x-department-key", "x-cost-center-key", "x-costcenter-key", "x-business-unit-key", "x-use-case-key",
        "x-usecase-key", "x-squad-key", "x-budget-key", "x-vercel-ip-country", "cf-ipcountry", "x-membership-tier",
    ],
)  # fmt: skip
def test_headers_that_name_a_tenant_or_a_feature_are_labels(header: str) -> None:
    assert Settings.resolve(env={}, attribution_headers={header: "label"}).attribution_headers
    assert parse_spec({"selector": {"matchLabels": {"a": "b"}}, "attribution": {"headers": {header: "label"}}})


def test_a_label_keeps_at_most_ten_thousand_values() -> None:
    """Each value is a series of every metric the label is on, in every Prometheus that scrapes the pods."""
    spec = {"selector": {"matchLabels": {"a": "b"}}, "attribution": {"maxLabelValues": 10_000}}
    assert parse_spec(spec).max_label_values == 10_000
    spec["attribution"] = {"maxLabelValues": 1_000_000_000}
    with pytest.raises(SpecError, match=r"spec\.attribution\.maxLabelValues"):
        parse_spec(spec)


def test_the_runbooks_name_the_llmtelemetry_field_of_every_threshold_they_tell_to_change() -> None:
    """docs/runbooks.md is read by whoever an alert pages, and the operator made most of those alerts: a step that
    names only an ``AlertThresholds`` attribute (``error_ratio``) sends them looking for a field no LLMTelemetry
    has. Each threshold a section names comes with its ``spec.alerts`` field, or the word that it has none."""
    import dataclasses
    import pathlib
    import re

    import yaml

    from llm_telemetry.monitoring.rules import AlertThresholds

    root = pathlib.Path(__file__).resolve().parents[2]
    crd = yaml.safe_load((root / "crds" / "llmtelemetry.dev_llmtelemetries.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    alerts = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["alerts"]["properties"]
    fields = {re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(): name for name in alerts if name != "enabled"}
    thresholds = {f.name for f in dataclasses.fields(AlertThresholds)}
    assert set(fields) <= thresholds, set(fields) - thresholds
    runbooks = (root / "docs" / "runbooks.md").read_text()
    checked = 0
    for section in runbooks.split("\n## ")[1:]:
        heading = section.splitlines()[0]
        for threshold in sorted(set(re.findall(r"`([a-z0-9_]+)`", section)) & thresholds):
            checked += 1
            if threshold in fields:
                assert f"`spec.alerts.{fields[threshold]}`" in section, (heading, threshold)
            else:
                assert "an `LLMTelemetry` has no field for" in section, (heading, threshold)
    assert checked >= 5
