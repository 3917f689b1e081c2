"""Whatever names and labels users give their resources and workloads, what the operator writes is what a
kube-apiserver admits: names of the right form per kind, label keys and values, selectors, ConfigMap keys.

The OpenAPI schemas (test_schemas.py) type these as plain strings; the API server's own rules
(``kube_schema.object_errors``) are stricter, and neither kmock nor kubernetes-validate applies them. Hypothesis draws
the names: DNS subdomains up to the 253 characters the API server allows for a Deployment or a custom resource, with
dots, leading digits and long shared prefixes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import kube_schema
from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.collectors import port_of, service_of
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import SpecError
from llm_telemetry_operator.spec import parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO_ROOT / "crds" / "llmtelemetry.dev_llmtelemetries.yaml").read_text())
CONFIG = OperatorConfig(servicemonitor_labels={"release": "kube-prometheus-stack"})
FULL = yaml.safe_load((REPO_ROOT / "examples" / "llmtelemetry-full.yaml").read_text())["spec"]
SPECS = [FULL, {"selector": {"matchLabels": {"app": "chat"}}}]

dns_labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
#: DNS subdomains as users write names: short words, dotted ones, a leading digit, and long ones up to 253.
names = st.one_of(
    st.lists(dns_labels, min_size=1, max_size=4).map(".".join),
    st.integers(1, 253).map(lambda n: ("chat-assistant-production-" * 10)[:n].strip("-") or "x"),
    st.tuples(st.integers(0, 240), dns_labels).map(lambda t: ("a" * t[0] + t[1])[:253]),
).filter(kube_schema.is_dns_subdomain)
label_values = st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")


def llmtelemetry(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llmtelemetry.dev/v1alpha1",
        "kind": "LLMTelemetry",
        "metadata": {"name": name, "namespace": namespace, "uid": "6f1c2a8e-3b7d-4e0a-9c55-0d4b2f7e9a11"},
        "spec": copy.deepcopy(spec),
    }


def workload(kind: str, name: str, namespace: str, app_name: str | None) -> dict[str, Any]:
    labels = {"app": "chat", **({c.LABEL_NAME: app_name} if app_name is not None else {})}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "chat"}},
        "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "api", "image": "api:1"}]}},
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "chat"}},
        "spec": spec,
    }


def written(owner: dict[str, Any], targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a pass writes for ``owner`` selecting ``targets``: children, and each workload as patched."""
    spec = parse_spec(owner["spec"])
    name = owner["metadata"]["name"]
    objects = [
        r.build_service_monitor(owner, spec, CONFIG),
        r.build_prometheus_rule(owner, spec, CONFIG),
        r.build_dashboard_configmap(owner, spec, CONFIG),
    ]
    if spec.pricing.inline:
        objects.append(r.build_pricing_configmap(owner, spec))
    for target in targets:
        patch = r.build_workload_patch(target, r.build_injection(spec, CONFIG, target, name), name)
        assert patch is not None
        objects += [kube_schema.merge_patch(target, patch), r.build_metrics_service(owner, spec, target)]
    return objects


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(owner_name="chat", namespace="llm", workload_names=["1chat", "chat.v2"], app_name=None, spec=0)
@example(owner_name="chat", namespace="llm", workload_names=["same", "same"], app_name=None, spec=1)  # both kinds
@example(owner_name="chat", namespace="llm", workload_names=["w" * 60, "w" * 60], app_name=None, spec=1)
@example(owner_name="c" * 64, namespace="llm", workload_names=["w" * 70, "w" * 71], app_name=None, spec=1)
@given(
    owner_name=names,
    namespace=dns_labels,
    workload_names=st.lists(names, min_size=1, max_size=3, unique=True),
    app_name=st.none() | label_values,
    spec=st.sampled_from(range(len(SPECS))),
)
def test_whatever_the_names_the_api_server_admits_what_the_operator_writes(
    owner_name: str, namespace: str, workload_names: list[str], app_name: str | None, spec: int
) -> None:
    owner = llmtelemetry(owner_name, namespace, SPECS[spec])
    refused = kube_schema.validate_object(CRD, owner)
    if refused:
        # The CRD admits names of at most 63 characters: the operator's labels carry the name. An LLMTelemetry
        # stored before that rule (or written past it) is refused by the operator too, as an invalid spec.
        assert len(owner_name) > 63, refused
        with pytest.raises(SpecError, match=r"metadata\.name"):
            r.check_owner(owner)
        return
    r.check_owner(owner)
    kinds = ["Deployment", "StatefulSet"]
    targets = [workload(kinds[i % 2], name, namespace, app_name) for i, name in enumerate(workload_names)]
    objects = written(owner, targets)
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in objects for e in kube_schema.object_errors(o)]
    assert not errors, "\n".join(errors)
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    assert len(services) == len(targets), "two workloads got one metrics Service"


#: Endpoints as users mistype them: brackets, ports out of range or not numbers, no host, and any text after the scheme.
endpoints = st.sampled_from(
    ["http://[oops:4318", "http://[::1]:4318", "http://jaeger:99999", "http://jaeger:43a8", "http://:4318", "https://x"]
) | st.text(max_size=30).map(lambda tail: "http://" + tail)
#: Label keys and values as users write them: valid ones, and any text.
label_text = st.text(max_size=70) | label_values | st.sampled_from(["release", "example.com/team", "a" * 64])


@settings(max_examples=300, deadline=None)
@example(tracing="http://[oops:4318", logs="http://loki:99999", labels={"bad key!": "x"}, headers={})
@example(tracing="https://x", logs="https://x", labels={"release": "has space"}, headers={"X-T": "a", "x-t": "b"})
@given(
    tracing=endpoints,
    logs=endpoints,
    labels=st.dictionaries(label_text, label_text, max_size=3),
    headers=st.dictionaries(st.sampled_from(["X-Tenant", "x-tenant", "x-team", "X-TEAM"]), st.sampled_from("abc")),
)
def test_a_spec_the_operator_accepts_is_one_a_pass_can_write(
    tracing: str, logs: str, labels: dict[str, str], headers: dict[str, str]
) -> None:
    """What parse_spec accepts, a pass can act on: the collectors' Services are looked up from the endpoints, and every
    object written is one the API server admits. What it cannot act on is a SpecError (an InvalidSpec condition and an
    event), never an exception later in the pass, which would fail every retry without a word in the status."""
    raw = {
        "selector": {"matchLabels": {"app": "chat"}},
        "tracing": {"endpoint": tracing},
        "logs": {"mode": "otlp", "endpoint": logs},
        "metrics": {"labels": labels},
        "attribution": {"headers": headers},
    }
    try:
        spec = parse_spec(raw)
    except SpecError:
        return
    for endpoint in (spec.tracing.endpoint, spec.logs.endpoint):
        assert endpoint is not None
        service_of(endpoint)
        port_of(endpoint)
    assert len(spec.attribution_headers) == len(headers)  # no header's label silently dropped
    objects = written(llmtelemetry("chat", "llm", raw), [workload("Deployment", "chat", "llm", None)])
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in objects for e in kube_schema.object_errors(o)]
    assert not errors, "\n".join(errors)


@settings(max_examples=300, deadline=None)
@example(names=["a" * 49 + "-x", "a" * 49 + "-y"])
@example(names=["a" * 48 + ".b" + "c" * 10, "a" * 48 + ".b" + "c" * 11])
@given(names=st.lists(names.filter(lambda n: len(n) <= 63), min_size=2, max_size=2, unique=True))
def test_two_resources_never_share_a_child(names: list[str]) -> None:
    """Children are named after their LLMTelemetry, cut to fit 63 characters: two whose names share their first
    characters must still get children of their own (one would otherwise overwrite the other's)."""
    children = []
    for name in names:
        owner = llmtelemetry(name, "llm", SPECS[0])
        children.append(written(owner, []))
    for a, b in zip(*children, strict=True):
        assert a["kind"] == b["kind"] and a["metadata"]["name"] != b["metadata"]["name"]
        assert kube_schema.object_errors(a) == [] and kube_schema.object_errors(b) == []


#: What users' containers already carry that meets the injection: the metrics port taken, by number or by name, the
#: middleware's variables set by hand, a volume and mounts of their own.
PORTS = [
    {"name": "http", "containerPort": 8000},
    {"containerPort": 9464},
    {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
    {"name": c.METRICS_PORT_NAME, "containerPort": 9999},
]
ENV = [
    {"name": "OTEL_SERVICE_NAME", "value": "mine"},
    {"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9100"},
    {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "key"}}},
]


@st.composite
def user_workloads(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(dns_labels, min_size=1, max_size=3, unique=True))
    containers = []
    for name in names:
        container: dict[str, Any] = {"name": name, "image": f"{name}:1"}
        ports = draw(st.lists(st.sampled_from(PORTS), max_size=3, unique_by=lambda p: p.get("name", "")))
        env = draw(st.lists(st.sampled_from(ENV), max_size=3, unique_by=lambda e: e["name"]))
        if len(env) > 1 and draw(st.booleans()):
            env.append({"name": env[0]["name"], "value": "again"})  # a name twice: admitted, with a warning
        if ports:
            container["ports"] = copy.deepcopy(ports)
        if env:
            container["env"] = copy.deepcopy(env)
        if draw(st.booleans()):
            container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        containers.append(container)
    target = workload(draw(st.sampled_from(["Deployment", "StatefulSet"])), "chat", "llm", None)
    pod = target["spec"]["template"]["spec"]
    pod["containers"] = containers
    if any("volumeMounts" in ct for ct in containers):
        pod["volumes"] = [{"name": "data", "emptyDir": {}}]
    if draw(st.booleans()):
        target["spec"]["template"]["metadata"]["annotations"] = {"team": "ml"}
    if draw(st.booleans()):
        pod["hostNetwork"] = True  # every port is a host port, its hostPort filled in by the API server
    return target


@settings(max_examples=300, deadline=None)
@given(
    target=user_workloads(),
    spec=st.sampled_from(range(len(SPECS))),
    pick=st.lists(st.integers(0, 2), max_size=2),
    lose_record=st.booleans(),
)
def test_any_workload_is_injected_validly_once_and_restored_exactly(
    target: dict[str, Any], spec: int, pick: list[int], lose_record: bool
) -> None:
    """Whatever a workload's containers already carry: the injected workload is one the API server admits, a second
    pass finds nothing to write (no endless rollouts), and removing the injection gives the user's workload back;
    also after the injection record was removed by hand and a pass wrote it again (without it, the injected values
    were taken for the user's, and stayed on the workload after the LLMTelemetry was deleted)."""
    assume(kube_schema.object_errors(kube_schema.with_server_defaults(target)) == [])  # the user's own is valid
    names = [ct["name"] for ct in target["spec"]["template"]["spec"]["containers"]]
    raw = copy.deepcopy(SPECS[spec])
    raw.pop("containers", None)  # (a spec naming none of the workload's containers injects nothing: see reconcile)
    chosen = sorted({names[i] for i in pick if i < len(names)})
    if chosen:
        raw["containers"] = chosen
    parsed = parse_spec(raw)
    injection = r.build_injection(parsed, CONFIG, target, "chat")
    patch = r.build_workload_patch(target, injection, "chat")
    assert patch is not None
    # As a real API server stores it: with the defaults it fills in, which an exact comparison must expect.
    injected = kube_schema.with_server_defaults(kube_schema.merge_patch(target, patch))
    assert kube_schema.object_errors(injected) == []
    assert r.build_workload_patch(injected, r.build_injection(parsed, CONFIG, injected, "chat"), "chat") is None
    if lose_record:
        annotations = injected["metadata"]["annotations"]
        del annotations[c.ANNOTATION_INJECTED]
        rewrite = r.build_workload_patch(injected, r.build_injection(parsed, CONFIG, injected, "chat"), "chat")
        assert rewrite is not None
        rewritten = kube_schema.with_server_defaults(kube_schema.merge_patch(injected, rewrite))
        assert rewritten["spec"] == injected["spec"], "the record is written again, and nothing else (no rollout)"
        injected = rewritten
    removal = r.build_workload_patch(injected, None, "chat")
    assert removal is not None
    restored = kube_schema.merge_patch(injected, removal)
    template_meta = restored["spec"]["template"]["metadata"]
    if template_meta.get("annotations") == {}:
        del template_meta["annotations"]  # an empty map is not stored (Go's omitempty), as if never there
    assert restored["spec"] == kube_schema.with_server_defaults(target)["spec"]
    assert r.build_workload_patch(restored, None, "chat") is None


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["app", "env", "x"]), inner, max_size=3)
    ),
    max_leaves=12,
)
_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "owner": st.none() | st.sampled_from(["chat", "other"]) | _JSON,
        "volume": _JSON,
        "containers": _JSON
        | st.dictionaries(
            st.sampled_from(["app", "x"]),
            _JSON | st.fixed_dictionaries({}, optional={"env": _JSON, "port": _JSON, "mount": _JSON}),
            max_size=2,
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(record=_RECORD | _JSON)
def test_an_injection_record_of_any_shape_never_fails_a_pass(record: Any) -> None:
    """The record annotation is there for anyone who can annotate a workload to write: one of another shape reads
    as no record, and injecting and removing still work (a record whose inner types were wrong used to raise
    AttributeError on every pass, and block the LLMTelemetry's deletion)."""
    target = workload("Deployment", "chat", "llm", None)
    target["metadata"]["annotations"] = {c.ANNOTATION_INJECTED: json.dumps(record)}
    parsed = parse_spec(SPECS[0])
    r.build_workload_patch(target, r.build_injection(parsed, CONFIG, target, "chat"), "chat")
    r.build_workload_patch(target, None, "chat")


def test_the_largest_spec_the_crd_admits_still_fits_the_api_servers_limits() -> None:
    """Ten attribution labels of 63 characters (the CRD's bounds), the longest names: the dashboard ConfigMap, which
    grows with each label, stays under the API server's 1 MiB; one label more is refused as the CRD refuses it."""
    headers = {f"x-{'h' * 250}{i}": f"{'l' * 61}{i:02d}" for i in range(10)}
    spec = {"selector": {"matchLabels": {"app": "chat"}}, "attribution": {"headers": headers}}
    owner = llmtelemetry("c" * 63, "n" * 63, spec)
    assert kube_schema.validate_object(CRD, owner) == []
    objects = written(owner, [workload("Deployment", "w" * 253, "n" * 63, None)])
    assert [e for o in objects for e in kube_schema.object_errors(o)] == []
    more = llmtelemetry("chat", "llm", {**spec, "attribution": {"headers": {**headers, "x-one-more": "more"}}})
    assert kube_schema.validate_object(CRD, more) != []
    with pytest.raises(SpecError, match="at most 10"):
        parse_spec(more["spec"])
