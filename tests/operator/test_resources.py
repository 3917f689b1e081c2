"""The pure build_* functions: injected environment, workload patches, children, status."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kopf_testing import deployment, minimal_llmt

from kube_schema import merge_patch
from kubelet import container_env
from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec

CONFIG = OperatorConfig(servicemonitor_labels={"release": "kube-prometheus-stack"})


def inject(workload: dict[str, Any], spec: dict[str, Any] | None = None, owner: str = "chat") -> dict[str, Any]:
    parsed = parse_spec(spec or {"selector": {"matchLabels": {"app": "chat"}}})
    patch = r.build_workload_patch(workload, r.build_injection(parsed, CONFIG, workload, owner), owner)
    assert patch is not None
    return dict(merge_patch(workload, patch))


def env_of(workload: dict[str, Any], index: int = 0) -> dict[str, Any]:
    container = workload["spec"]["template"]["spec"]["containers"][index]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_env_carries_middleware_and_otel_settings() -> None:
    spec = parse_spec(
        {
            "selector": {"matchLabels": {"app": "chat"}},
            "metrics": {"port": 9500},
            "tracing": {"endpoint": "http://tempo:4318/", "protocol": "grpc", "samplingRatio": 0.25},
            "attribution": {"headers": {"X-Tenant-Id": "tenant"}, "maxLabelValues": 50},
        }
    )
    env = {e["name"]: e.get("value") for e in r.build_env(spec, CONFIG, deployment(), "chat")}
    assert env["LLM_TELEMETRY_METRICS_PORT"] == "9500"
    assert env["LLM_TELEMETRY_MAX_LABEL_VALUES"] == "50"
    assert env["LLM_TELEMETRY_ATTRIBUTION_HEADERS"] == "x-tenant-id=tenant"
    assert env["OTEL_SERVICE_NAME"] == "chat"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    # The traces' own variables, never the generic ones, which the app's other signals would follow too. Over gRPC
    # the endpoint is the collector's URL (its scheme says whether to use TLS), with no signal path.
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://tempo:4318"
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"
    assert not {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"} & set(env)
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    # Loki takes OTLP over HTTP only, whatever the traces use.
    assert env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] == "http://loki-gateway.observability/otlp/v1/logs"
    assert env["OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"] == "http/protobuf"
    # No tenant unless one is set, and no headers (not even the app's own OTEL_EXPORTER_OTLP_HEADERS).
    assert env["OTEL_EXPORTER_OTLP_LOGS_HEADERS"] == env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == ","
    assert not [name for name in env if name.startswith("OTEL_EXPORTER_OTLP_METRICS_")]  # (theirs go where they went)


@pytest.mark.parametrize(
    ("spec_endpoint", "default", "protocol", "injected"),
    [
        (None, "http://jaeger.observability:4318", "grpc", "http://jaeger.observability:4317"),
        (None, "https://u:p@[fd00::1]:4318/otlp", "grpc", "https://u:p@[fd00::1]:4317/otlp"),
        (None, "http://jaeger.observability:4318", "http/protobuf", "http://jaeger.observability:4318/v1/traces"),
        (None, "https://u:p@[fd00::1]:4318/otlp", "http/protobuf", "https://u:p@[fd00::1]:4318/otlp/v1/traces"),
        (None, "http://collector.observability:55681", "grpc", "http://collector.observability:55681"),
        ("http://tempo:4318", "http://jaeger.observability:4318", "grpc", "http://tempo:4318"),  # as the user says
        ("http://tempo:4318/", "http://jaeger.observability:4318", "http/protobuf", "http://tempo:4318/v1/traces"),
    ],
)
def test_grpc_takes_a_default_endpoint_on_otlps_http_port_at_its_grpc_port(
    spec_endpoint: str | None, default: str, protocol: str, injected: str
) -> None:
    tracing = {"protocol": protocol} | ({"endpoint": spec_endpoint} if spec_endpoint else {})
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "tracing": tracing})
    config = dataclasses.replace(CONFIG, traces_endpoint=default)
    env = {e["name"]: e.get("value") for e in r.build_env(spec, config, deployment(), "chat")}
    assert (env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]) == (
        injected,
        protocol,
    )


@pytest.mark.parametrize(
    ("spec_tenant", "default_tenant", "header"),
    [
        (None, "", ","),  # none at all (an empty list: an empty variable would be read as unset)
        ("team-a", "", "X-Scope-OrgID=team-a"),
        (None, "platform", "X-Scope-OrgID=platform"),
        ("team-a", "platform", "X-Scope-OrgID=team-a"),
        ("", "platform", ","),  # the resource opts out of the default
    ],
)
def test_logs_name_their_loki_tenant(spec_tenant: str | None, default_tenant: str, header: str) -> None:
    """A multi-tenant Loki (its Helm chart's default) answers 401 to a push that names no tenant."""
    logs = {} if spec_tenant is None else {"tenant": spec_tenant}
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "logs": logs})
    config = dataclasses.replace(CONFIG, logs_tenant=default_tenant)
    env = {e["name"]: e.get("value") for e in r.build_env(spec, config, deployment(), "chat")}
    assert env["OTEL_EXPORTER_OTLP_LOGS_HEADERS"] == header
    stdout = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "logs": {**logs, "mode": "stdout"}})
    # Logs to stdout go to no Loki, so no tenant, and nothing routes the logs: the app's own OTLP logs go where they
    # went (no generic endpoint of the traces takes them to the traces collector).
    stdout_env = {e["name"]: e.get("value") for e in r.build_env(stdout, config, deployment(), "c")}
    assert not [name for name in stdout_env if name.startswith("OTEL_EXPORTER_OTLP_LOGS_")]
    assert stdout_env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == ","


def test_env_resource_attributes_use_the_downward_api() -> None:
    env = r.build_env(parse_spec({"selector": {"matchLabels": {"a": "b"}}}), CONFIG, deployment(), "chat")
    names = [e["name"] for e in env]
    by_name = {e["name"]: e for e in env}
    for var, path in (
        (r.ENV_POD_NAMESPACE, "metadata.namespace"),
        (r.ENV_POD_NAME, "metadata.name"),
        (r.ENV_POD_UID, "metadata.uid"),
    ):
        assert by_name[var]["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}
        # $(VAR) only expands if VAR is defined earlier in the list.
        assert names.index(var) < names.index("OTEL_RESOURCE_ATTRIBUTES")
    attributes = by_name["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(",")
    assert attributes == [
        "k8s.namespace.name=$(K8S_NAMESPACE_NAME)",
        "k8s.deployment.name=chat",
        "k8s.pod.name=$(K8S_POD_NAME)",
        "k8s.pod.uid=$(K8S_POD_UID)",
    ]


def test_env_statefulset_attribute_and_service_name_label() -> None:
    sts = {**deployment("db"), "kind": "StatefulSet"}
    sts["spec"]["template"]["metadata"]["labels"][c.LABEL_NAME] = "vector-db"
    env = {e["name"]: e.get("value") for e in r.build_env(parse_spec(minimal_llmt()["spec"]), CONFIG, sts, "x")}
    assert "k8s.statefulset.name=db" in env["OTEL_RESOURCE_ATTRIBUTES"]
    assert env["OTEL_SERVICE_NAME"] == "vector-db"


def test_env_disabled_tracing_and_stdout_logs() -> None:
    spec = parse_spec(
        {"selector": {"matchLabels": {"a": "b"}}, "tracing": {"enabled": False}, "logs": {"mode": "stdout"}}
    )
    env = {e["name"]: e.get("value") for e in r.build_env(spec, CONFIG, deployment(), "chat")}
    assert env["OTEL_TRACES_EXPORTER"] == "none"
    assert env["OTEL_LOGS_EXPORTER"] == "none"
    assert env["LLM_TELEMETRY_REQUEST_LOGS"] == "true"
    assert not [name for name in env if name.startswith("OTEL_EXPORTER_OTLP_")]


def test_injection_user_env_wins_and_port_and_hash_are_added() -> None:
    workload = deployment(env=[{"name": "OTEL_SERVICE_NAME", "value": "mine"}])
    injected = inject(workload)
    container = injected["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert names.count("OTEL_SERVICE_NAME") == 1
    assert env_of(injected)["OTEL_SERVICE_NAME"] == "mine"
    assert env_of(injected)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
    assert container["ports"] == [{"name": c.METRICS_PORT_NAME, "containerPort": 9464, "protocol": "TCP"}]
    assert len(injected["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]) == 16
    assert json.loads(injected["metadata"]["annotations"][c.ANNOTATION_INJECTED])["owner"] == "chat"


def test_injection_second_pass_changes_nothing() -> None:
    injected = inject(deployment())
    spec = parse_spec(minimal_llmt()["spec"])
    assert r.build_workload_patch(injected, r.build_injection(spec, CONFIG, injected, "chat"), "chat") is None


def test_a_variable_the_user_adds_after_ours_rolls_the_pods_once() -> None:
    """Server-side apply, ``helm upgrade`` and ``kubectl set env`` add a new variable after the injected ones: that
    edit is one rollout, and the next pass must not move the variable ahead of ours (a second template, a second
    rollout, for the same settings). A change of ours in the same pass keeps the order too."""
    spec = parse_spec(minimal_llmt()["spec"])
    injected = inject(deployment())
    edited = json.loads(json.dumps(injected))
    edited["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "FOO", "value": "bar"})
    assert r.build_workload_patch(edited, r.build_injection(spec, CONFIG, edited, "chat"), "chat") is None

    moved = inject(edited, {"selector": {"matchLabels": {"app": "chat"}}, "metrics": {"port": 9500}})
    names = [e["name"] for e in moved["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names == [e["name"] for e in edited["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names[-1] == "FOO" and env_of(moved)["LLM_TELEMETRY_METRICS_PORT"] == "9500"


def test_injection_config_change_changes_the_hash() -> None:
    first = inject(deployment())
    second = inject(first, {"selector": {"matchLabels": {"app": "chat"}}, "metrics": {"port": 9500}})
    hash_of = lambda w: w["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]  # noqa: E731
    assert hash_of(first) != hash_of(second)
    assert env_of(second)["LLM_TELEMETRY_METRICS_PORT"] == "9500"
    ports = second["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert ports == [{"name": c.METRICS_PORT_NAME, "containerPort": 9500, "protocol": "TCP"}]
    # Inline prices reach the pods through a mounted file, so they count in the hash too.
    priced = inject(
        first, {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"models": {"m": {"input": 1, "output": 2}}}}
    )
    assert hash_of(priced) != hash_of(first)


def test_injection_selected_containers_only() -> None:
    workload = deployment()
    workload["spec"]["template"]["spec"]["containers"].append({"name": "model", "image": "vllm"})
    injected = inject(workload, {"selector": {"matchLabels": {"app": "chat"}}, "containers": ["model"]})
    assert "LLM_TELEMETRY_METRICS_PORT" not in env_of(injected, 0)
    assert "LLM_TELEMETRY_METRICS_PORT" in env_of(injected, 1)


def test_injection_pricing_configmap_is_mounted() -> None:
    injected = inject(
        deployment(),
        {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"models": {"m": {"input": 1, "output": 2}}}},
    )
    pod = injected["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {
            "name": c.PRICING_VOLUME,
            "configMap": {
                "name": "chat-llm-pricing",
                "items": [{"key": c.PRICING_FILE, "path": c.PRICING_FILE}],
                "defaultMode": 0o644,  # as the API server would fill it in: a later pass then finds nothing to patch
            },
        }
    ]
    assert {"name": c.PRICING_VOLUME, "mountPath": c.PRICING_MOUNT_PATH, "readOnly": True} in pod["containers"][0][
        "volumeMounts"
    ]
    assert env_of(injected)["LLM_TELEMETRY_PRICING"] == f"{c.PRICING_MOUNT_PATH}/{c.PRICING_FILE}"


def test_removal_patch_restores_the_original() -> None:
    original = deployment(env=[{"name": "APP_MODE", "value": "prod"}])
    original["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8000}]
    injected = inject(
        original,
        {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"models": {"m": {"input": 1, "output": 2}}}},
    )
    removal = r.build_workload_patch(injected, None, "chat")
    assert removal is not None
    restored = merge_patch(injected, removal)
    assert restored["spec"]["template"]["spec"] == original["spec"]["template"]["spec"]
    # The label the metrics Service selects goes with the rest.
    assert injected["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] == "chat-llm-metrics"
    assert restored["spec"]["template"]["metadata"]["labels"] == original["spec"]["template"]["metadata"]["labels"]
    assert c.ANNOTATION_CONFIG_HASH not in (restored["spec"]["template"]["metadata"].get("annotations") or {})
    assert c.ANNOTATION_INJECTED not in (restored["metadata"].get("annotations") or {})
    assert r.build_workload_patch(restored, None, "chat") is None


def test_an_injection_without_the_label_gets_it_and_nothing_else() -> None:
    """A workload an earlier version injected, before the pod template got the label its metrics Service selects:
    the next pass adds the label alone (one rollout), and the pass after changes nothing."""
    earlier = inject(deployment())
    del earlier["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE]
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}})
    patch = r.build_workload_patch(earlier, r.build_injection(spec, CONFIG, earlier, "chat"), "chat")
    assert patch is not None
    assert patch["spec"]["template"]["metadata"] == {"labels": {c.LABEL_METRICS_SERVICE: "chat-llm-metrics"}}
    upgraded = merge_patch(earlier, patch)
    assert upgraded["spec"]["template"]["spec"] == earlier["spec"]["template"]["spec"]
    assert r.build_workload_patch(upgraded, r.build_injection(spec, CONFIG, upgraded, "chat"), "chat") is None


def test_removal_keeps_values_the_user_changed_since() -> None:
    injected = inject(deployment())
    container = injected["spec"]["template"]["spec"]["containers"][0]
    for entry in container["env"]:
        if entry["name"] == "LLM_TELEMETRY_METRICS_PORT":
            entry["value"] = "7000"  # edited by the user after injection: theirs now
    removal = r.build_workload_patch(injected, None, "chat")
    assert removal is not None
    assert env_of(merge_patch(injected, removal)) == {"LLM_TELEMETRY_METRICS_PORT": "7000"}


def test_a_users_value_keeps_the_injected_variables_it_refers_to() -> None:
    """The user extends the injected OTEL_RESOURCE_ATTRIBUTES (kubectl set env ...,team=search): theirs now, and it
    refers to the injected downward-API variables ($(K8S_POD_NAME), ...). Removing the injection keeps those too,
    in their places before it, or the pods would get the references as literal text. The rest goes."""
    injected = inject(deployment())
    container = injected["spec"]["template"]["spec"]["containers"][0]
    for entry in container["env"]:
        if entry["name"] == "OTEL_RESOURCE_ATTRIBUTES":
            entry["value"] += ",team=search"
            extended = entry["value"]
    referred = {r.ENV_POD_NAMESPACE, r.ENV_POD_NAME, r.ENV_POD_UID}
    assert all(f"$({name})" in extended for name in referred)
    removal = r.build_workload_patch(injected, None, "chat")
    assert removal is not None
    left = merge_patch(injected, removal)["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in left]
    assert set(names) == referred | {"OTEL_RESOURCE_ATTRIBUTES"}, names
    assert names[-1] == "OTEL_RESOURCE_ATTRIBUTES" and left[-1]["value"] == extended
    assert {e["name"]: e for e in left}[r.ENV_POD_NAME]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    # While the injection stays, a pass leaves the pod template as it is (no rollout), the variables now the user's.
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}})
    again = r.build_workload_patch(injected, r.build_injection(spec, CONFIG, injected, "chat"), "chat")
    if again is not None:
        assert merge_patch(injected, again)["spec"]["template"] == injected["spec"]["template"]


def test_a_variable_the_user_refers_to_stays_the_operators_to_change() -> None:
    """``kubectl set env deploy/chat 'TRACES_URL=$(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)'``: a variable of the
    user's that refers to an injected one. The next pass took the injected one for the user's (dropped from the
    record), so a new endpoint never reached the pods, turning tracing off left them exporting, and the deletion left
    the endpoint behind. It stays the operator's, in its place before the reference, which keeps resolving."""
    pod = {"metadata.name": "chat-1", "metadata.namespace": "llm", "metadata.uid": "u-1"}

    def step(workload: dict[str, Any], tracing: dict[str, Any] | None) -> dict[str, Any]:
        injection = None
        if tracing is not None:
            spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "tracing": tracing})
            injection = r.build_injection(spec, CONFIG, workload, "chat")
        patch = r.build_workload_patch(workload, injection, "chat")
        return workload if patch is None else dict(merge_patch(workload, patch))

    def seen(workload: dict[str, Any]) -> dict[str, str]:
        return container_env(workload["spec"]["template"]["spec"]["containers"][0], pod)

    a, b = "http://collector-a.obs:4318", "http://collector-b.obs:4318"
    injected = step(deployment(), {"endpoint": a})
    injected["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "TRACES_URL", "value": "$(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"}
    )
    again = step(injected, {"endpoint": a})
    assert again["spec"]["template"] == injected["spec"]["template"]  # no rollout
    assert seen(again)["TRACES_URL"] == a + "/v1/traces"
    moved = step(again, {"endpoint": b})
    assert seen(moved)["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == b + "/v1/traces"
    assert seen(moved)["TRACES_URL"] == b + "/v1/traces"  # (still after the variable it refers to)
    off = step(moved, {"enabled": False})
    assert seen(off)["OTEL_TRACES_EXPORTER"] == "none"
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in seen(off)
    # Removed while the reference stands: the variable it refers to stays for it (as any injected variable a
    # value of the user's refers to), the rest goes.
    removed = step(moved, None)
    assert set(seen(removed)) == {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "TRACES_URL"}


def test_workload_patch_never_fights_another_owner() -> None:
    injected = inject(deployment(), owner="first")
    spec = parse_spec(minimal_llmt()["spec"])
    assert r.build_workload_patch(injected, r.build_injection(spec, CONFIG, injected, "second"), "second") is None


def test_workload_patch_carries_resource_version_for_optimistic_concurrency() -> None:
    workload = deployment()
    workload["metadata"]["resourceVersion"] = "42"
    spec = parse_spec(minimal_llmt()["spec"])
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat"), "chat")
    assert patch is not None and patch["metadata"]["resourceVersion"] == "42"


PRICED: Final = {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"models": {"m": {"input": 1, "output": 2}}}}


def _guarded_cases() -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(what, workload as read, LLMTelemetry spec or None to remove the injection) for :func:`r.guarded_patch`."""
    plain = deployment()
    annotated = deployment()
    annotated["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "3", "a/b~c": "x"}
    unlabelled = deployment(labels={})
    del unlabelled["metadata"]["labels"]
    priced = inject(deployment(), PRICED)
    emptied = deployment(env=[{"name": "LLM_TELEMETRY_METRICS_PORT"}])
    return [
        ("first injection, no annotations", plain, {}),
        ("first injection beside the controller's annotation", annotated, {}),
        ("no labels", unlabelled, {}),
        ("prices mounted", deployment(), PRICED),
        ("another port, prices unmounted", priced, {"metrics": {"port": 9500}}),
        ("removed, with its volume", priced, None),
        ("an empty entry of a variable injected", emptied, {}),
    ]


@pytest.mark.parametrize(("what", "workload", "spec"), _guarded_cases(), ids=[case[0] for case in _guarded_cases()])
def test_the_guarded_json_patch_does_what_the_merge_patch_does(
    what: str, workload: dict[str, Any], spec: dict[str, Any] | None
) -> None:
    """On the version read, the JSON patch (its tests met as the API server judges them) gives the workload the merge
    patch gives it; a write of status or of another annotation meets its tests, a write of labels, spec or the
    record does not."""
    import jsonpatch  # type: ignore[import-untyped]
    from kopf_testing import _met

    workload = json.loads(json.dumps(workload))
    workload["metadata"]["resourceVersion"] = "41"
    parsed = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, **(spec or {})}) if spec is not None else None
    injection = r.build_injection(parsed, CONFIG, workload, "chat") if parsed is not None else None
    patch = r.build_workload_patch(workload, injection, "chat")
    assert patch is not None
    guarded = r.guarded_patch(workload, patch)
    tests = [op for op in guarded if op["op"] == "test"]
    changes = [op for op in guarded if op["op"] != "test"]
    assert changes and all(op["op"] in ("add", "remove") for op in changes)

    def applied(version: dict[str, Any]) -> dict[str, Any] | None:
        if not all(_met(version, op) for op in tests):
            return None
        result: dict[str, Any] = jsonpatch.apply_patch(version, changes)
        return result

    merged = dict(merge_patch(workload, {**patch, "metadata": {**patch["metadata"], "resourceVersion": None}}))
    merged["metadata"]["resourceVersion"] = "41"
    assert applied(workload) == merged
    pinned = any(op["path"] == "/metadata/resourceVersion" for op in tests)
    assert pinned == (what == "an empty entry of a variable injected")
    # What the workload's controller writes: its status and its revision annotation (no annotation before: the map
    # is tested as absent, the record's place in it being unknown).
    controller = dict(
        merge_patch(workload, {"status": {"observedGeneration": 1}, "metadata": {"resourceVersion": "42"}})
    )
    assert (applied(controller) is None) == pinned
    revised = dict(merge_patch(controller, {"metadata": {"annotations": {"deployment.kubernetes.io/revision": "4"}}}))
    assert (applied(revised) is None) == (pinned or not workload["metadata"].get("annotations"))
    for change in (
        {"metadata": {"labels": {"team": "search"}}},
        {"metadata": {"generation": workload["metadata"]["generation"] + 1}},
        {"metadata": {"annotations": {c.ANNOTATION_INJECTED: json.dumps({"owner": "other"})}}},
        {"metadata": {"uid": "another"}},
        {"metadata": {"deletionTimestamp": "2026-12-07T00:00:00Z"}},
    ):
        assert applied(dict(merge_patch(workload, change))) is None, change


#: Keys of the generated objects: JSON pointer's escapes (``/``, ``~``) among them.
_KEYS = st.sampled_from(["a", "b", "env", "a/b", "c~d", "~1", ""])
_LEAVES = st.one_of(
    st.booleans(), st.integers(-2, 2), st.text("xy", max_size=2), st.lists(st.integers(0, 2), max_size=2)
)
_DOCS = st.recursive(_LEAVES, lambda inner: st.dictionaries(_KEYS, inner, max_size=3), max_leaves=8)
_CHANGES = st.recursive(
    st.one_of(st.none(), _LEAVES), lambda inner: st.dictionaries(_KEYS, inner, max_size=3), max_leaves=8
)


def _creates_nothing(change: Any, current: Any) -> bool:
    """Whether the merge patch ``change`` has, where ``current`` has no object, an object with no member to add (the
    merge patch makes it empty; the JSON patch, like the API server storing it, leaves it out)."""
    if not isinstance(change, dict):
        return False
    here = current if isinstance(current, dict) else {}
    return any(
        isinstance(value, dict)
        and (
            (not isinstance(here.get(key), dict) and not any(v is not None for v in value.values()))
            or _creates_nothing(value, here.get(key))
        )
        for key, value in change.items()
    )


@settings(max_examples=300, deadline=None)
@given(spec=st.dictionaries(_KEYS, _DOCS, max_size=4), change=st.dictionaries(_KEYS, _CHANGES, min_size=1, max_size=4))
def test_the_guarded_json_patch_applies_any_merge_patch_as_the_merge_patch_does(
    spec: dict[str, Any], change: dict[str, Any]
) -> None:
    """Whatever the objects and the merge patch (nested objects, lists, nulls, keys that need a JSON pointer's
    escapes), the operations of :func:`r.guarded_patch` after its tests give the object the merge patch gives it."""
    import jsonpatch  # type: ignore[import-untyped]

    workload = {"metadata": {"uid": "u", "generation": 2, "labels": {"app": "chat"}}, "spec": spec}
    patch = {"spec": change}
    assume(not _creates_nothing(patch, workload))
    operations = [op for op in r.guarded_patch(workload, patch) if op["op"] != "test"]
    assert jsonpatch.apply_patch(workload, operations) == merge_patch(workload, patch)


def assert_child_metadata(obj: dict[str, Any], component: str) -> None:
    meta = obj["metadata"]
    assert meta["namespace"] == "llm"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "llmtelemetry.dev/v1alpha1",
            "kind": "LLMTelemetry",
            "name": "chat",
            "uid": "uid-chat",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = meta["labels"]
    assert labels[c.LABEL_MANAGED_BY] == "llm-telemetry-operator"
    assert labels[c.LABEL_INSTANCE] == "chat"
    assert labels[c.LABEL_PART_OF] == "llm-telemetry"
    assert labels[c.LABEL_COMPONENT] == component
    assert labels[c.LABEL_OWNER] == "chat"


def test_metrics_service_selects_the_workload_pods() -> None:
    owner = minimal_llmt()
    svc = r.build_metrics_service(owner, parse_spec({**owner["spec"], "metrics": {"port": 9500}}), deployment())
    assert_child_metadata(svc, "metrics")
    assert svc["metadata"]["name"] == "chat-llm-metrics"
    # By the label the injection puts on the pod template alone, not the pod selector (a canary's pods match that).
    assert svc["spec"]["selector"] == {c.LABEL_METRICS_SERVICE: "chat-llm-metrics"}
    assert inject(deployment())["spec"]["template"]["metadata"]["labels"] == {
        "pod": "chat",
        "app": "chat",
        c.LABEL_METRICS_SERVICE: "chat-llm-metrics",
    }
    # The port by the name of the injected one: pods that were not injected are no endpoints of it.
    assert svc["spec"]["ports"] == [
        {"name": c.METRICS_PORT_NAME, "port": 9500, "targetPort": c.METRICS_PORT_NAME, "protocol": "TCP"}
    ]


def test_a_workloads_pod_selector_is_said_by_equality_as_narrowly_as_it_can_be() -> None:
    """For the ``SelectorsOverlap`` check: a workload whose selector has expressions gets, for each key they name,
    the value of its pod template, so the pods of a sibling (its canary) are not taken for its own."""
    workload = deployment(labels={"tier": "mixed", "track": "stable", "zone": "a", "version": "v2"})
    workload["spec"]["selector"] = {
        "matchLabels": {"tier": "mixed"},
        "matchExpressions": [
            {"key": "track", "operator": "NotIn", "values": ["canary"]},
            {"key": "zone", "operator": "In", "values": ["a"]},
            # Values that may change from one rollout to the next: not selected on.
            {"key": "version", "operator": "In", "values": ["v1", "v2"]},
            {"key": "absent", "operator": "DoesNotExist"},
        ],
    }
    selector = r.workload_pod_selector(workload)
    assert selector == {"tier": "mixed", "track": "stable", "zone": "a"}
    canary = {"tier": "mixed", "track": "canary"}
    assert not all(canary.get(k) == v for k, v in selector.items())


def test_a_deployment_and_a_statefulset_of_one_name_get_a_metrics_service_each() -> None:
    owner = minimal_llmt()
    spec = parse_spec(owner["spec"])
    services = [
        r.build_metrics_service(owner, spec, deployment("same", kind=kind)) for kind in ("Deployment", "StatefulSet")
    ]
    assert [s["metadata"]["name"] for s in services] == ["same-llm-metrics", "same-llm-metrics-sts"]
    # Each selects the pods of its own workload, whose template the injection labels with the Service's name.
    for service, kind in zip(services, ("Deployment", "StatefulSet"), strict=True):
        pods = inject(deployment("same", kind=kind))["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"] == {c.LABEL_METRICS_SERVICE: pods[c.LABEL_METRICS_SERVICE]}
    # Names cut to fit keep the kind apart too.
    long = "w" * 60
    assert r.service_name(long, "Deployment") != r.service_name(long, "StatefulSet")
    assert all(len(r.service_name(long, kind)) <= 63 for kind in ("Deployment", "StatefulSet"))


@pytest.mark.parametrize(
    ("env", "spec", "found"),
    [
        ([], {}, []),
        ([{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9464"}], {}, []),
        ([{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9999"}], {}, ["LLM_TELEMETRY_METRICS_PORT=9999"]),
        # Spellings the middleware reads as 9464 (an integer, as Python reads one) bind spec.metrics.port.
        *(([{"name": "LLM_TELEMETRY_METRICS_PORT", "value": port}], {}, []) for port in ("09464", "+9464", " 9464")),
        ([{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9464x"}], {}, ["LLM_TELEMETRY_METRICS_PORT=9464x"]),
        ([{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9999"}], {"metrics": {"port": 9999}}, []),
        ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": "127.0.0.1"}], {}, ["LLM_TELEMETRY_METRICS_HOST=127.0.0.1"]),
        ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": "::1"}], {}, ["LLM_TELEMETRY_METRICS_HOST=::1"]),
        ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": "[::1]"}], {}, ["LLM_TELEMETRY_METRICS_HOST=[::1]"]),
        ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": "localhost"}], {}, ["LLM_TELEMETRY_METRICS_HOST=localhost"]),
        ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": "0.0.0.0"}], {}, []),
        # Loopback in the other spellings the socket layer takes.
        *(
            ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": host}], {}, [f"LLM_TELEMETRY_METRICS_HOST={host}"])
            for host in ("127.0.0.2", "127.1", "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1", "localhost.")
        ),
        ([{"name": "LLM_TELEMETRY_METRICS_HOST", "value": "10.0.0.7"}], {}, []),
        # Every OpenTelemetry signal off, the metrics listener with them (as LLM_TELEMETRY_ENABLED=false).
        ([{"name": "OTEL_SDK_DISABLED", "value": "true"}], {}, ["OTEL_SDK_DISABLED=true"]),
        ([{"name": "OTEL_SDK_DISABLED", "value": "false"}], {}, []),
        # An empty value is unset to the middleware: its default, as if the variable were not declared.
        ([{"name": "LLM_TELEMETRY_ENABLED", "value": ""}], {}, []),
        ([{"name": "LLM_TELEMETRY_METRICS_EXPORTER", "value": "otlp"}], {}, ["LLM_TELEMETRY_METRICS_EXPORTER=otlp"]),
        ([{"name": "LLM_TELEMETRY_METRICS_EXPORTER", "value": "prometheus,otlp"}], {}, []),
        ([{"name": "LLM_TELEMETRY_ENABLED", "value": "false"}], {}, ["LLM_TELEMETRY_ENABLED=false"]),
        ([{"name": "LLM_TELEMETRY_ENABLED", "value": "true"}], {}, []),
        # A value from elsewhere cannot be judged; a container the injection does not choose does not count.
        ([{"name": "LLM_TELEMETRY_METRICS_PORT", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "p"}}}], {}, []),
        ([{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9999"}], {"containers": ["sidecar"]}, []),
    ],
)
def test_a_containers_own_settings_that_leave_nothing_to_scrape_are_found(
    env: list[dict[str, Any]], spec: dict[str, Any], found: list[str]
) -> None:
    workload = deployment(env=env)
    workload["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "proxy:1"})
    parsed = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, **spec})
    assert r.unscrapeable_settings(workload, parsed) == [f"container app sets {what}" for what in found]
    # The operator's own injected value (from a pass under an older spec) is not the user's.
    assert (
        r.unscrapeable_settings(inject(deployment()), parse_spec({**minimal_llmt()["spec"], "metrics": {"port": 9500}}))
        == []
    )


def test_an_injected_variable_the_user_changed_is_theirs_before_the_record_says_so() -> None:
    """``kubectl set env`` on an injected variable: the pass that sees it reads the workload before its own patch
    rewrites the record, which still lists the variable as injected. The changed value is the user's already, and
    one that leaves nothing to scrape is reported by that pass (it had waited for the next resync)."""
    injected = inject(deployment())
    container = injected["spec"]["template"]["spec"]["containers"][0]
    for entry in container["env"]:
        if entry["name"] == "LLM_TELEMETRY_METRICS_PORT":
            entry["value"] = "9999"
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}})
    assert r.unscrapeable_settings(injected, spec) == ["container app sets LLM_TELEMETRY_METRICS_PORT=9999"]


@pytest.mark.parametrize(
    ("app_ports", "sidecar", "found"),
    [
        ([], None, []),
        # The app's own port given as the metrics port: the middleware would take it before the app binds it.
        ([{"name": "http", "containerPort": 9464}], None, ["container app declares port 9464 (http)"]),
        ([{"containerPort": 9464}], None, ["container app declares port 9464"]),
        # The middleware's listener declared by hand, under the injection's name: no clash.
        ([{"name": "llm-metrics", "containerPort": 9464}], None, []),
        ([{"name": "dns", "containerPort": 9464, "protocol": "UDP"}], None, []),
        ([{"name": "http", "containerPort": 8000}], None, []),
        # A sidecar on the port, as a container or as an init container that keeps running; one that runs to
        # completion before the app starts holds no port.
        ([], {"ports": [{"name": "prom", "containerPort": 9464}]}, ["container proxy declares port 9464 (prom)"]),
        (
            [],
            {"ports": [{"containerPort": 9464}], "restartPolicy": "Always", "init": True},
            ["container proxy declares port 9464"],
        ),
        ([], {"ports": [{"containerPort": 9464}], "init": True}, []),
        # The name of the middleware's listener in a container it is not injected into: that one's own listener
        # would bind the port beside the injected one.
        (
            [],
            {"ports": [{"name": "llm-metrics", "containerPort": 9464}]},
            ["container proxy declares port 9464 (llm-metrics)"],
        ),
    ],
)
def test_a_port_the_pods_already_use_is_found(
    app_ports: list[dict[str, Any]], sidecar: dict[str, Any] | None, found: list[str]
) -> None:
    workload = deployment()
    pod = workload["spec"]["template"]["spec"]
    if app_ports:
        pod["containers"][0]["ports"] = app_ports
    if sidecar is not None:
        container = {"name": "proxy", "image": "proxy:1", **{k: v for k, v in sidecar.items() if k != "init"}}
        pod.setdefault("initContainers" if sidecar.get("init") else "containers", []).append(container)
    spec = parse_spec(minimal_llmt()["spec"])
    assert r.port_conflicts(workload, spec) == found
    # Injected, the workload's pods carry the middleware's own port beside the rest: no clash with itself.
    assert r.port_conflicts(inject(workload), spec) == found
    # Another port for the listener frees it.
    assert r.port_conflicts(workload, parse_spec({**minimal_llmt()["spec"], "metrics": {"port": 9500}})) == []


def test_the_listener_an_injection_declared_is_no_conflict_once_another_container_is_chosen() -> None:
    """``spec.containers`` changed from the app to its sidecar: the port the last injection declared in the app is
    the operator's own, removed by the pass that injects the sidecar, not a port the pods use for something else."""
    workload = deployment()
    workload["spec"]["template"]["spec"]["containers"].append({"name": "proxy", "image": "proxy:1"})
    injected = inject(workload)
    assert injected["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] == c.METRICS_PORT_NAME
    spec = parse_spec({**minimal_llmt()["spec"], "containers": ["proxy"]})
    assert r.port_conflicts(injected, spec) == []


@pytest.mark.parametrize(("declared", "port", "found"), [(9464, 9464, []), (9464, 9500, [9464]), (9999, 9464, [9999])])
def test_a_listener_port_declared_by_hand_on_another_number_leaves_nothing_to_scrape(
    declared: int, port: int, found: list[int]
) -> None:
    """A port the user named ``llm-metrics`` is theirs: the injection adds none beside it, and the metrics Service
    targets it by name. On another number than ``spec.metrics.port``, where the injected variable makes the
    middleware listen, the Service reaches nothing; said so, as for a variable of the user's that wins."""
    workload = deployment()
    workload["spec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"name": c.METRICS_PORT_NAME, "containerPort": declared}
    ]
    raw = {**minimal_llmt()["spec"], "metrics": {"port": port}}
    spec = parse_spec(raw)
    expected = [f"container app declares port {c.METRICS_PORT_NAME} as {number}" for number in found]
    assert r.unscrapeable_settings(workload, spec) == expected
    injected = inject(workload, raw)
    assert [p["containerPort"] for p in injected["spec"]["template"]["spec"]["containers"][0]["ports"]] == [declared]
    assert r.unscrapeable_settings(injected, spec) == expected


def test_service_monitor_scrapes_metrics_services_with_extra_labels() -> None:
    owner = minimal_llmt(metrics={"interval": "15s", "labels": {"team": "ml"}})
    sm = r.build_service_monitor(owner, parse_spec(owner["spec"]), CONFIG)
    assert_child_metadata(sm, "scrape")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["metadata"]["labels"]["team"] == "ml"
    assert sm["spec"]["selector"]["matchLabels"][c.LABEL_COMPONENT] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"][c.LABEL_OWNER] == "chat"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    assert sm["spec"]["endpoints"][0]["port"] == c.METRICS_PORT_NAME
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    # The job label is the owner label's value, the LLMTelemetry name the rules select on.
    assert sm["spec"]["jobLabel"] == c.LABEL_OWNER


def test_prometheus_rule_is_scoped_to_the_resource_and_follows_thresholds() -> None:
    owner = minimal_llmt(alerts={"errorRatio": 0.1, "costPerHourUsd": 5})
    rule = r.build_prometheus_rule(owner, parse_spec(owner["spec"]), CONFIG)
    assert_child_metadata(rule, "alerts")
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["name"] == "chat-llm-telemetry"
    exprs = [rl["expr"] for g in rule["spec"]["groups"] for rl in g["rules"]]
    alerts = {rl.get("alert") for g in rule["spec"]["groups"] for rl in g["rules"]}
    assert any('namespace="llm",job="chat"' in e for e in exprs)
    assert any("0.1" in e for e in exprs)
    assert "LLMCostBudgetExceeded" in alerts
    without_cost = r.build_prometheus_rule(
        owner | {"spec": minimal_llmt()["spec"]}, parse_spec(minimal_llmt()["spec"]), CONFIG
    )
    assert "LLMCostBudgetExceeded" not in {rl.get("alert") for g in without_cost["spec"]["groups"] for rl in g["rules"]}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_prometheus_rule_reads_only_the_targets_of_its_servicemonitor(tmp_path: Path) -> None:
    """The team's own ServiceMonitor of the app's Service, named as the LLMTelemetry is, gives its targets the same
    job; the Prometheus Operator labels each target with its endpoint's port name, which tells ours apart. Only our
    endpoint being down is LLMTargetDown ("cannot scrape LLM metrics"), in promtool's evaluation of the rule."""
    owner = minimal_llmt()
    spec = parse_spec(owner["spec"])
    rule = r.build_prometheus_rule(owner, spec, CONFIG)
    (tmp_path / "rule.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    # The labels the Prometheus Operator gives the targets of our ServiceMonitor: its endpoint's port name.
    [endpoint] = r.build_service_monitor(owner, spec, CONFIG)["spec"]["endpoints"]
    target = {"namespace": "llm", "job": "chat", "service": "chat"}
    ours = {**target, "endpoint": endpoint["port"], "instance": "10.0.0.1:9464", "service": "chat-llm-metrics"}
    theirs = {**target, "endpoint": "http", "instance": "10.0.0.1:8080"}

    def series(labels: dict[str, str]) -> str:
        return "up{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"

    inputs = [{"series": series(ours), "values": "0x10"}, {"series": series(theirs), "values": "0x10"}]
    annotations = {
        "summary": "Prometheus cannot scrape LLM metrics from 10.0.0.1:9464 (llm/chat)",
        "description": "The metrics endpoint has failed every scrape for 5 minutes; the other LLM alerts are blind.",
        "runbook_url": f"{CONFIG.runbook_url}#llmtargetdown",
    }
    expected = [{"exp_labels": {**ours, "severity": "critical"}, "exp_annotations": annotations}]
    down = {"alertname": "LLMTargetDown", "eval_time": "6m", "exp_alerts": expected}
    test = {
        "rule_files": ["rule.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": [down]}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = subprocess.run(
        ["promtool", "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_for_grafana_sidecar() -> None:
    owner = minimal_llmt(dashboard={"folder": "Team ML"})
    cm = r.build_dashboard_configmap(owner, parse_spec(owner["spec"]), CONFIG)
    assert_child_metadata(cm, "dashboard")
    assert cm["metadata"]["name"] == "chat-llm-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Team ML"
    (key,) = cm["data"]
    assert key == "llmt_llm_chat.json"  # the sidecar's file name: one per resource in the cluster
    dashboard = json.loads(cm["data"][key])
    assert dashboard["uid"] == "llmt_llm_chat"
    assert dashboard["title"] == "LLM: llm/chat"


_NAMESPACES = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
_NAMES = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,80}[a-z0-9])?", fullmatch=True)
_GRAFANA_UID = re.compile(r"[a-zA-Z0-9_-]{1,40}")  # what Grafana accepts as a dashboard uid
_CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


@settings(max_examples=300, deadline=None)
@given(first=st.tuples(_NAMESPACES, _NAMES), second=st.tuples(_NAMESPACES, _NAMES))
def test_dashboard_uid_is_one_grafana_takes_and_no_two_resources_share(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    """Grafana refuses a uid with a dot (a resource's name may have one), and two dashboards of one uid, or of one
    file name in the sidecar's folder, are one dashboard."""

    def uid(pair: tuple[str, str]) -> str:
        return r.dashboard_uid({"metadata": {"namespace": pair[0], "name": pair[1]}})

    for pair in (first, second):
        assert _GRAFANA_UID.fullmatch(uid(pair)), uid(pair)
        owner = minimal_llmt(pair[1]) | {"metadata": {**minimal_llmt(pair[1])["metadata"], "namespace": pair[0]}}
        (key,) = r.build_dashboard_configmap(owner, parse_spec(owner["spec"]), CONFIG)["data"]
        assert _CONFIGMAP_KEY.fullmatch(key) and key == f"{uid(pair)}.json"
    assert (uid(first) == uid(second)) == (first == second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("team-a", "chat"), ("team", "a-chat")),
        (("llm", "chat.v2"), ("llm", "chat-v2")),
        (("prod", "chat"), ("staging", "chat")),
    ],
)
def test_dashboard_uids_of_look_alike_resources_differ(first: tuple[str, str], second: tuple[str, str]) -> None:
    uids = {r.dashboard_uid({"metadata": {"namespace": ns, "name": name}}) for ns, name in (first, second)}
    assert len(uids) == 2 and all(_GRAFANA_UID.fullmatch(u) for u in uids), uids


def test_dashboard_from_the_cached_template_is_the_dashboard_built_afresh() -> None:
    """Each resource's dashboard JSON is the cached one with its title, uid, namespace and job put in: byte for byte
    what building and encoding it for that resource gives (opening on the endpoint its ServiceMonitor scrapes)."""
    from llm_telemetry.monitoring.dashboards import build_dashboard

    for namespace, name, attribution, logs_mode, datasources in (
        ("llm", "chat", ("tenant",), "otlp", ("jaeger", "loki")),
        ("a-very-long-namespace-name-for-the-uid", "chat-with-a-long-name", ("team", "tenant"), "otlp", ("j", "l")),
        ("llm", "embed", ("tenant",), "stdout", ("jaeger", "loki")),
        ("llm", "chat", ("tenant",), "stdout", ("jaeger", "P8E80F9AEF21F6940")),
    ):
        owner = {"metadata": {"namespace": namespace, "name": name, "uid": "u"}}
        title, uid = f"LLM: {namespace}/{name}", r.dashboard_uid(owner)
        jaeger, loki = datasources
        fresh = build_dashboard(
            title=title,
            uid=uid,
            attribution_labels=attribution,
            logs_mode=logs_mode,
            jaeger_uid=jaeger,
            loki_uid=loki,
            namespace=namespace,
            job=name,
            endpoint="llm-metrics",
        )
        expected = json.dumps(fresh, sort_keys=True, separators=(",", ":"))
        assert r.dashboard_json(title, uid, attribution, logs_mode, jaeger, loki, namespace, name) == expected


def test_dashboards_and_alerts_take_the_operators_grafana_datasources_and_runbook_url() -> None:
    """Grafana names a datasource made in its UI with a generated uid: the operator-wide settings reach every
    dashboard's Loki panel and trace links, and every alert's runbook link."""
    config = OperatorConfig(
        jaeger_datasource_uid="P14A4C8C6B8A2B0D1",
        loki_datasource_uid="P8E80F9AEF21F6940",
        runbook_url="https://x.example/rb",
    )
    owner = minimal_llmt()
    spec = parse_spec(owner["spec"])
    (text,) = r.build_dashboard_configmap(owner, spec, config)["data"].values()
    (logs,) = [p for p in json.loads(text)["panels"] if p["type"] == "logs"]
    assert logs["datasource"] == {"type": "loki", "uid": "P8E80F9AEF21F6940"}
    assert "P14A4C8C6B8A2B0D1" in text and '"uid":"jaeger"' not in text and '"uid":"loki"' not in text
    alerts = [rule for g in r.build_prometheus_rule(owner, spec, config)["spec"]["groups"] for rule in g["rules"]]
    links = {rule["annotations"]["runbook_url"] for rule in alerts if "alert" in rule}
    assert links and all(link.startswith("https://x.example/rb#llm") for link in links)


@pytest.mark.parametrize("mode", ["otlp", "stdout"])
def test_dashboard_log_panel_queries_loki_as_the_resource_sends_logs(mode: str) -> None:
    """The error log panel of a resource's dashboard finds the lines where its ``spec.logs.mode`` puts them: as
    OTLP records (Loki's stream label for the namespace is ``k8s_namespace_name``) or as JSON lines on stdout."""
    from llm_telemetry.monitoring.dashboards import ERROR_LOG_QUERIES
    from logql import selector

    owner = minimal_llmt(logs={"mode": mode})
    spec = parse_spec(owner["spec"])
    cm = r.build_dashboard_configmap(owner, spec, OperatorConfig())
    (text,) = cm["data"].values()
    (panel,) = [p for p in json.loads(text)["panels"] if p["type"] == "logs"]
    expr = panel["targets"][0]["expr"]
    assert expr == ERROR_LOG_QUERIES[mode]
    env = {e["name"]: e.get("value") for e in r.build_env(spec, CONFIG, deployment(), "chat")}
    assert env["OTEL_LOGS_EXPORTER"] == ("otlp" if mode == "otlp" else "none")
    if mode == "otlp":
        # Loki's OTLP endpoint labels a stream with the resource attributes k8s.namespace.name and service.name, as
        # k8s_namespace_name and service_name: the attributes the injection sets are the ones the panel selects on.
        attributes = dict(pair.split("=", 1) for pair in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
        assert "k8s.namespace.name" in attributes and env["OTEL_SERVICE_NAME"]
        assert {label for label, _, _ in selector(expr)} == {"k8s_namespace_name", "service_name"}


def test_pricing_configmap_holds_the_inline_table() -> None:
    owner = minimal_llmt(pricing={"models": {"gpt-4o": {"input": 2.5, "output": 10}}})
    cm = r.build_pricing_configmap(owner, parse_spec(owner["spec"]))
    assert_child_metadata(cm, "pricing")
    assert cm["metadata"]["name"] == "chat-llm-pricing"
    assert yaml.safe_load(cm["data"][c.PRICING_FILE]) == {"models": {"gpt-4o": {"input": 2.5, "output": 10.0}}}


def test_pricing_configmap_of_the_largest_table_the_crd_admits_fits_and_reads_back(tmp_path: Path) -> None:
    """500 models (the CRD's most) with long non-ASCII names: the file keeps them as they are (escaped, each character
    took ten bytes and the ConfigMap outgrew its 1 MiB, refused on every pass while the pods mounted it), and the
    middleware reads the same prices back. A table that cannot fit is InvalidSpec."""
    from kube_schema import object_errors
    from llm_telemetry.pricing import PricingTable
    from llm_telemetry_operator.errors import SpecError

    models = {f"{i:03d}" + "😀" * 200: {"input": 1.5, "output": 2.0} for i in range(500)}
    owner = minimal_llmt(pricing={"models": models})
    cm = r.build_pricing_configmap(owner, parse_spec(owner["spec"]))
    assert object_errors(cm) == []
    (tmp_path / "pricing.yaml").write_text(cm["data"][c.PRICING_FILE], encoding="utf-8")
    table = PricingTable(str(tmp_path / "pricing.yaml"))
    assert all(table.price(model) is not None for model in models)

    # Characters YAML reads as line breaks (NEL, the Unicode line separator) are escaped, or they would fold.
    odd = {"claude\x85x": {"input": 3.0, "output": 15.0}, "gpt\u2028y": {"input": 2.0, "output": 8.0}}
    owner = minimal_llmt(pricing={"models": {**odd, "éclair": {"input": 1.0, "output": 1.0}}})
    (tmp_path / "odd.yaml").write_text(
        r.build_pricing_configmap(owner, parse_spec(owner["spec"]))["data"][c.PRICING_FILE]
    )
    table = PricingTable(str(tmp_path / "odd.yaml"))
    assert all(table.price(model) is not None for model in [*odd, "éclair"]) and table.price("claude x") is None

    bigger = {f"{i:03d}" + "😀" * 600: {"input": 1.5, "output": 2.0} for i in range(500)}
    with pytest.raises(SpecError, match=r"spec\.pricing\.models"):
        parse_spec(minimal_llmt(pricing={"models": bigger})["spec"])


#: Prices as a resource may hold them: mostly numbers the CRD admits (any size, 0 included), sometimes not.
_PRICE = st.one_of(
    st.integers(0, 10**12),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([-1, "2", None, True]),
)
_ENTRY = st.fixed_dictionaries(
    {"input": _PRICE, "output": _PRICE},
    optional={
        kind: _PRICE
        for kind in ("cache_read", "cache_creation", "cache_creation_1h", "input_audio", "output_image", "cached")
    },
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=40), st.one_of(_ENTRY, _ENTRY, _ENTRY, _PRICE), max_size=4))
def test_an_inline_table_the_operator_takes_is_one_the_middleware_reads(models: dict[str, Any]) -> None:
    """The middleware refuses a table it cannot use at startup, so every pod it is mounted into would fail to start:
    what the operator does not refuse as InvalidSpec, the middleware must read, each model at its prices."""
    import tempfile

    from llm_telemetry.pricing import PricingTable
    from llm_telemetry_operator.errors import SpecError

    owner = minimal_llmt(pricing={"models": models})
    try:
        spec = parse_spec(owner["spec"])
    except SpecError:
        return
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "pricing.yaml"
        path.write_text(r.build_pricing_configmap(owner, spec)["data"][c.PRICING_FILE], encoding="utf-8")
        table = PricingTable(str(path))
    for model, prices in models.items():
        if not model:
            continue  # an entry for "" is read but inert: a request without a model is priced as nothing
        price = table.price(model)
        assert price is not None and (price.input, price.output) == (prices["input"], prices["output"]), model


def test_a_lost_record_is_rebuilt_only_from_the_containers_injected() -> None:
    """The injection record removed by hand: what equals the injection's values is taken back as the injection's,
    but only in the containers the injection goes into; a sidecar that sets the same variables itself keeps them."""
    target = deployment()
    sidecar = {"name": "collector", "image": "otel:1", "env": [{"name": "OTEL_TRACES_EXPORTER", "value": "otlp"}]}
    target["spec"]["template"]["spec"]["containers"].append(sidecar)
    spec = parse_spec(minimal_llmt()["spec"])
    injection = r.build_injection(spec, OperatorConfig(), target, "chat")
    injected = merge_patch(target, r.build_workload_patch(target, injection, "chat"))
    del injected["metadata"]["annotations"][c.ANNOTATION_INJECTED]
    # The traces' endpoint it injected is still its own, not a route of the container's (SignalsRouted names none).
    assert r.own_routes(injected, injection) == {}
    rewrite = r.build_workload_patch(injected, injection, "chat")
    assert rewrite is not None
    after = merge_patch(injected, rewrite)
    assert after["spec"]["template"]["spec"]["containers"][1] == sidecar
    removed = merge_patch(after, r.build_workload_patch(after, None, "chat"))
    assert removed["spec"]["template"]["spec"]["containers"] == target["spec"]["template"]["spec"]["containers"]


def test_child_names_fit_a_dns_label() -> None:
    long = "a" * 70
    for name in (r.service_name(long), r.service_monitor_name(long), r.dashboard_configmap_name(long)):
        assert len(name) <= 63
    assert len(r.dashboard_uid(minimal_llmt("b" * 60))) <= 40


def test_a_condition_message_quoting_a_long_spec_is_cut_to_what_a_condition_holds() -> None:
    """spec.containers is unbounded, and a NoContainer message names every container in it: uncut, two such
    conditions beside the spec passed etcd's limit for one object, and no status was written at all."""
    long = "no container named " + ", ".join(f"c{i:05d}-" + "x" * 240 for i in range(2500))
    conditions = [r.Condition("Injected", False, "NoContainer", long), r.Condition("Ready", True, "Ready", "ok")]
    status = r.build_status(conditions, generation=1, targets=[], previous=None, now="t1", phase="Pending")
    cut, short = (cond["message"] for cond in status["conditions"])
    assert len(cut) == r.MAX_CONDITION_MESSAGE_CHARS == 32768  # metav1.Condition's own bound
    assert cut == long[: r.MAX_CONDITION_MESSAGE_CHARS - 1] + "…"
    assert short == "ok"
    exact = "y" * r.MAX_CONDITION_MESSAGE_CHARS
    status = r.build_status(
        [r.Condition("Ready", False, "X", exact)], generation=1, targets=[], previous=None, now="t1", phase="Pending"
    )
    assert status["conditions"][0]["message"] == exact


def test_status_keeps_transition_time_until_a_condition_flips() -> None:
    cond = [r.Condition("Ready", True, "Ready", "ok")]
    first = r.build_status(cond, generation=3, targets=["Deployment/chat"], previous=None, now="t1", phase="Ready")
    assert first["observedGeneration"] == 3 and first["targetCount"] == 1
    same = r.build_status(cond, generation=3, targets=["Deployment/chat"], previous=first, now="t2", phase="Ready")
    assert same["conditions"][0]["lastTransitionTime"] == "t1"
    flipped = r.build_status(
        [r.Condition("Ready", False, "NoTargets", "none")],
        generation=3,
        targets=[],
        previous=first,
        now="t3",
        phase="Pending",
    )
    assert flipped["conditions"][0]["lastTransitionTime"] == "t3"


def test_the_volumes_default_mode_changes_no_hash() -> None:
    """defaultMode, which the API server fills in anyway, is left out of the config hash: writing it changed nothing
    in the pods, so an upgrade that started writing it rolls nothing out."""
    spec = parse_spec(
        {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"models": {"m": {"input": 1, "output": 2}}}}
    )
    injection = r.build_injection(spec, CONFIG, deployment(), "chat")
    assert injection.volume is not None and injection.volume["configMap"]["defaultMode"] == 0o644
    without = {**injection.volume, "configMap": {**injection.volume["configMap"]}}
    del without["configMap"]["defaultMode"]
    assert dataclasses.replace(injection, volume=without).digest == injection.digest
    other = {**without, "configMap": {**without["configMap"], "name": "other"}}
    assert dataclasses.replace(injection, volume=other).digest != injection.digest


@pytest.mark.parametrize("chosen", [(), ("app",)], ids=["first-container", "named-container"])
def test_a_container_renamed_after_the_injection_keeps_it_as_ours(chosen: tuple[str, ...]) -> None:
    """``app`` renamed ``server`` (kubectl edit, a chart upgrade) keeps the injected variables and port: they are
    still the injection's, replaced by the next pass and removed with the resource, never taken for the user's own
    (which blamed the user's settings for the operator's old values, and left them behind on delete)."""
    target = deployment()
    fields: dict[str, Any] = {"containers": list(chosen)} if chosen else {}
    spec = parse_spec(minimal_llmt(**fields)["spec"])
    injection = r.build_injection(spec, OperatorConfig(), target, "chat")
    injected = merge_patch(target, r.build_workload_patch(target, injection, "chat"))
    renamed = json.loads(json.dumps(injected))
    renamed["spec"]["template"]["spec"]["containers"][0]["name"] = "server"
    assert r.unscrapeable_settings(renamed, spec) == []
    assert r.own_routes(renamed, injection) == {}  # (its injected traces' endpoint is no route of its own)
    removed = merge_patch(renamed, r.build_workload_patch(renamed, None, "chat"))
    (left,) = removed["spec"]["template"]["spec"]["containers"]
    original = dict(target["spec"]["template"]["spec"]["containers"][0], name="server")
    assert left == original
    if not chosen:  # the first container is still the one the injection goes into: it stays, recorded under its name
        again = merge_patch(renamed, r.build_workload_patch(renamed, injection, "chat"))
        record = json.loads(again["metadata"]["annotations"][c.ANNOTATION_INJECTED])
        assert set(record["containers"]) == {"server"} and record["containers"]["server"]["env"]
        assert again["spec"]["template"]["spec"] == renamed["spec"]["template"]["spec"]
        moved = parse_spec(minimal_llmt(metrics={"port": 9470})["spec"])
        other = r.build_injection(moved, OperatorConfig(), again, "chat")
        rewritten = merge_patch(again, r.build_workload_patch(again, other, "chat"))
        env = {e["name"]: e.get("value") for e in rewritten["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["LLM_TELEMETRY_METRICS_PORT"] == "9470"


def test_a_container_with_its_own_otlp_endpoint_keeps_its_pipeline_on() -> None:
    """With the LLMTelemetry's collector missing (or the signal off), the operator switches the exporter off
    (``none``); a container that sends to an endpoint of its own must not have its own pipeline switched off."""
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}})
    without = frozenset({"traces", "logs"})
    own = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.example:4318"}]
    workload = deployment(env=own)
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat", without), "chat")
    assert patch is not None
    env = env_of(dict(merge_patch(workload, patch)))
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.example:4318"
    assert "OTEL_TRACES_EXPORTER" not in env and "OTEL_LOGS_EXPORTER" not in env
    # Only the signal the container's own endpoint is for.
    workload = deployment(env=[{"name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "value": "http://mine:4318/v1/traces"}])
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat", without), "chat")
    assert patch is not None
    env = env_of(dict(merge_patch(workload, patch)))
    assert "OTEL_TRACES_EXPORTER" not in env and env["OTEL_LOGS_EXPORTER"] == "none"
    # Without an endpoint of its own, the exporters are off, as before.
    workload = deployment()
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat", without), "chat")
    assert patch is not None
    env = env_of(dict(merge_patch(workload, patch)))
    assert (env["OTEL_TRACES_EXPORTER"], env["OTEL_LOGS_EXPORTER"]) == ("none", "none")


TRACES_ROUTE: Final = ("http://jaeger.observability:4318/v1/traces", "http/protobuf", ",")
LOGS_ROUTE: Final = ("http://loki-gateway.observability/otlp/v1/logs", "http/protobuf", ",")


@pytest.mark.parametrize(
    ("own", "traces", "logs"),
    [
        ({}, TRACES_ROUTE, LOGS_ROUTE),  # neither takes OTEL_EXPORTER_OTLP_HEADERS along
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://vendor.example"}, None, LOGS_ROUTE),  # logs: their own wins
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://vendor.example/v1/traces"}, None, LOGS_ROUTE),
        ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "https://vendor.example/v1/logs"}, TRACES_ROUTE, None),
        # The app's own metrics keep their endpoint, protocol and headers: nothing of theirs is injected.
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://vendor.example:4317"}, TRACES_ROUTE, LOGS_ROUTE),
        # Declared empty (a chart's ``value: ""``): the name is the container's, so the rest of the route stays out.
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}, None, LOGS_ROUTE),
    ],
)
def test_a_signals_endpoint_protocol_and_headers_go_in_together(
    own: dict[str, str], traces: tuple[str, str, str] | None, logs: tuple[str, str, str] | None
) -> None:
    """The app's OTEL_EXPORTER_OTLP_HEADERS (a vendor's key) would reach the collectors the operator injects; where
    the app sends a signal to an endpoint of its own, the injected headers and protocol would replace those it sends
    there with. Nothing generic is injected, which the app's other signals would follow."""
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}})
    workload = deployment(env=[{"name": name, "value": value} for name, value in own.items()])
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat"), "chat")
    assert patch is not None
    env = env_of(dict(merge_patch(workload, patch)))
    for signal, route in (("TRACES", traces), ("LOGS", logs)):
        names = [f"OTEL_EXPORTER_OTLP_{signal}_{part}" for part in ("ENDPOINT", "PROTOCOL", "HEADERS")]
        injected = tuple(env[name] for name in names if name in env and name not in own)
        assert injected == (route or ()), (signal, env)
    assert not {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"} - set(own) & set(env)


SECRET_HEADERS: Final = {"valueFrom": {"secretKeyRef": {"name": "vendor", "key": "headers"}}}
ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")


@pytest.mark.parametrize(
    ("own", "logs", "injected"),
    [
        # A signal's headers of its own, from a Secret, its endpoint from envFrom or the SDK's default: that signal's
        # endpoint and what goes with it stay out (the other signal's go in).
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": SECRET_HEADERS}, {}, ENDPOINTS[1:]),
        ({"OTEL_EXPORTER_OTLP_LOGS_HEADERS": SECRET_HEADERS}, {}, ENDPOINTS[:1]),
        ({"OTEL_EXPORTER_OTLP_LOGS_HEADERS": SECRET_HEADERS}, {"mode": "stdout"}, ENDPOINTS[:1]),
        # Declared empty (a chart's ``value: ""``), which the SDK reads as unset: it would send the app's
        # OTEL_EXPORTER_OTLP_HEADERS to an endpoint injected beside it, so it counts as the container's too.
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": {"value": ""}}, {}, ENDPOINTS[1:]),
        # The metrics' are no concern of the injection, which routes no metrics.
        ({"OTEL_EXPORTER_OTLP_METRICS_HEADERS": {"value": "api-key=vendor"}}, {}, ENDPOINTS),
        # With the signal's endpoint in its env, the headers go there: the other endpoint is injected as before.
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": SECRET_HEADERS,
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": {"value": "https://vendor.example/v1/traces"},
            },
            {},
            ENDPOINTS,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_LOGS_HEADERS": SECRET_HEADERS,
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": {"value": "https://vendor.example/v1/logs"},
            },
            {},
            ENDPOINTS,
        ),
        # Headers declared as none (``,``, as the injection writes them) carry nothing: the route goes in.
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": {"value": ","}}, {}, ENDPOINTS),
        ({"OTEL_EXPORTER_OTLP_HEADERS": SECRET_HEADERS}, {}, ENDPOINTS),  # the generic ones: each signal's ``,`` wins
    ],
    ids=[
        "traces headers",
        "logs headers",
        "logs headers, logs to stdout",
        "empty headers",
        "metrics headers",
        "traces headers and endpoint",
        "logs headers and endpoint",
        "no headers",
        "generic headers",
    ],
)
def test_a_signals_own_headers_keep_the_endpoints_it_would_follow_out(
    own: dict[str, dict[str, Any]], logs: dict[str, Any], injected: tuple[str, ...]
) -> None:
    """A container that sets a signal's headers (a vendor's key) gets its endpoint from somewhere the operator does
    not read (``envFrom``, or the SDK's default): an endpoint injected for that signal would win over it and take the
    signal and the key to the collector this resource names. The container keeps that signal's pipeline, as one that
    sets the endpoint in its env: the exporters stay on, and the sampler and the middleware's settings go in."""
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "logs": logs})
    workload = deployment(env=[{"name": name, **entry} for name, entry in own.items()])
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat"), "chat")
    assert patch is not None
    env = env_of(dict(merge_patch(workload, patch)))
    expected = tuple(name for name in ENDPOINTS if name in injected or name in own)
    assert tuple(name for name in ENDPOINTS if name in env) == expected
    assert {name: env[name] for name in own} == {
        name: entry.get("value", entry.get("valueFrom")) for name, entry in own.items()
    }
    for endpoint in set(ENDPOINTS) - set(injected):  # nor what goes with it
        signal = endpoint.removesuffix("_ENDPOINT")
        assert not {f"{signal}_PROTOCOL", f"{signal}_HEADERS"} - set(own) & set(env), env
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["LLM_TELEMETRY_METRICS_EXPORTER"] == "prometheus"


def test_an_earlier_injection_of_the_generic_endpoint_is_replaced_by_the_traces_own_on_upgrade() -> None:
    """Earlier versions injected OTEL_EXPORTER_OTLP_ENDPOINT and, with it, empty headers for the metrics (and the logs
    where none were shipped over OTLP), recorded as injected: the first pass after the upgrade takes them out and puts
    the traces' own variables in (one rollout), and the next pass finds nothing to change."""
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "logs": {"mode": "stdout"}})
    earlier = [
        {"name": "OTEL_TRACES_EXPORTER", "value": "otlp"},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://jaeger.observability:4318"},
        {"name": "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "value": "http/protobuf"},
        {"name": "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "value": ","},
        {"name": "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "value": ","},
        {"name": "OTEL_LOGS_EXPORTER", "value": "none"},
        {"name": "OTEL_EXPORTER_OTLP_LOGS_HEADERS", "value": ","},
    ]
    workload = deployment(env=[{"name": "MODEL", "value": "gpt"}, *earlier])
    record = {"owner": "chat", "containers": {"app": {"env": {e["name"]: r._env_key(e) for e in earlier}}}}
    workload["metadata"].setdefault("annotations", {})[c.ANNOTATION_INJECTED] = json.dumps(record)
    injection = r.build_injection(spec, CONFIG, workload, "chat")
    upgraded = dict(merge_patch(workload, r.build_workload_patch(workload, injection, "chat")))
    env = env_of(upgraded)
    otlp = {name: value for name, value in env.items() if name.startswith("OTEL_EXPORTER_OTLP_")}
    assert otlp == {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger.observability:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": ",",
    }
    assert env["MODEL"] == "gpt" and env["OTEL_LOGS_EXPORTER"] == "none"
    assert r.build_workload_patch(upgraded, injection, "chat") is None


def test_a_signals_own_headers_keep_its_pipeline_on_when_the_resource_turns_its_exporter_off() -> None:
    """Tracing off injects ``OTEL_TRACES_EXPORTER=none``, which would switch off the app's own traces, whose endpoint
    the operator does not see: a container with the traces' headers of its own keeps them on."""
    spec = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "tracing": {"enabled": False}})
    workload = deployment(env=[{"name": "OTEL_EXPORTER_OTLP_TRACES_HEADERS", **SECRET_HEADERS}])
    patch = r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat"), "chat")
    assert patch is not None
    env = env_of(dict(merge_patch(workload, patch)))
    assert "OTEL_TRACES_EXPORTER" not in env and env["OTEL_LOGS_EXPORTER"] == "otlp"


def managed(manager: str, *names: str, container: str = "app") -> dict[str, Any]:
    """A managedFields entry: ``manager`` owns the env entries ``names`` of ``container`` in the pod template."""
    env = {f'k:{{"name":"{name}"}}': {".": {}, "f:name": {}} for name in names}
    fields = {"f:spec": {"f:template": {"f:spec": {"f:containers": {f'k:{{"name":"{container}"}}': {"f:env": env}}}}}}
    return {"manager": manager, "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": fields}


def test_an_override_dropped_by_a_server_side_apply_gets_the_injected_value_back() -> None:
    """A GitOps tool's server-side apply (``--force-conflicts``) overrode injected variables, then a commit dropped
    the override: the apply gives up the values it took over, not the entries the operator's patch wrote, which are
    left with no value and owned by the operator alone. An empty variable is unset to the OpenTelemetry SDK and the
    middleware (traces to localhost, the sampler at 1.0): such an entry goes and the injected one comes back, after
    the variables it refers to. An empty entry another manager owns (a chart's ``value: ""``) stays theirs."""
    spec = parse_spec(minimal_llmt(tracing={"samplingRatio": 0.25})["spec"])
    leftovers = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER_ARG", "OTEL_RESOURCE_ATTRIBUTES")
    workload = deployment(
        env=[
            {"name": "OTEL_RESOURCE_ATTRIBUTES"},
            {"name": "MODEL", "value": "gpt"},
            {"name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"},
            {"name": "OTEL_TRACES_SAMPLER_ARG", "value": ""},
            {"name": "OTEL_TRACES_SAMPLER_ARG"},  # declared twice (the API server admits it): both are left over
            {"name": "OTEL_SERVICE_NAME", "value": ""},
        ]
    )
    workload["metadata"]["managedFields"] = [
        managed("argocd", "MODEL"),
        managed("helm", "OTEL_SERVICE_NAME"),
        managed(c.OPERATOR_NAME, *leftovers, "OTEL_SERVICE_NAME"),
    ]
    injection = r.build_injection(spec, CONFIG, workload, "chat")
    # (Nor does such an entry count as the container's own route: no SignalsRouted report of it.)
    assert r.own_routes(workload, injection) == {}
    injected = merge_patch(workload, r.build_workload_patch(workload, injection, "chat"))
    entries = injected["spec"]["template"]["spec"]["containers"][0]["env"]
    env = env_of(dict(injected))
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://jaeger.observability:4318/v1/traces"
    assert env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == ","  # (the routing goes in whole)
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    assert not env["OTEL_SERVICE_NAME"]  # the chart's empty value is the chart's
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))
    # The kubelet expands $(K8S_POD_NAME) only from a variable declared before: they come first.
    attributes = names.index("OTEL_RESOURCE_ATTRIBUTES")
    for referred in re.findall(r"\$\(([A-Z_]+)\)", env["OTEL_RESOURCE_ATTRIBUTES"]):
        assert names.index(referred) < attributes, referred
    # They are the injection's now: the next pass changes nothing, and removing the resource removes them.
    assert r.build_workload_patch(injected, injection, "chat") is None
    removed = merge_patch(injected, r.build_workload_patch(injected, None, "chat"))
    left = {e["name"] for e in removed["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert left == {"MODEL", "OTEL_SERVICE_NAME"}
    # A manifest applied client-side that declares the variable empty (after the injection: the apply changes no
    # field it could be counted as the owner of) is the user's: kept, not fought over on every apply.
    declared = json.loads(json.dumps(workload))
    applied = {"spec": {"template": {"spec": {"containers": [{"name": "app", "env": [
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": ""}]}]}}}}  # fmt: skip
    declared["metadata"].setdefault("annotations", {})[r._LAST_APPLIED] = json.dumps(applied)
    kept = merge_patch(declared, r.build_workload_patch(declared, injection, "chat"))
    assert not env_of(dict(kept))["OTEL_TRACES_SAMPLER_ARG"]
    assert env_of(dict(kept))["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://jaeger.observability:4318/v1/traces"
    # Without managedFields nothing is known to be left over: an empty entry is kept as the user's, as before.
    del workload["metadata"]["managedFields"]
    kept = merge_patch(workload, r.build_workload_patch(workload, injection, "chat"))
    assert not env_of(dict(kept))["OTEL_TRACES_SAMPLER_ARG"]
    # (And the empty traces endpoint, the user's then, routes the traces itself: it is named.)
    assert r.own_routes(workload, injection) == {"app": {"TRACES": ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]}}
    # With the collector missing, an empty endpoint is no endpoint of the container's own: the exporter goes off.
    workload = deployment(env=[{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": ""}])
    without = r.build_injection(spec, CONFIG, workload, "chat", frozenset({"traces", "logs"}))
    env = env_of(dict(merge_patch(workload, r.build_workload_patch(workload, without, "chat"))))
    assert (env["OTEL_TRACES_EXPORTER"], env["OTEL_LOGS_EXPORTER"]) == ("none", "none")


def test_a_restored_env_order_never_puts_a_reference_before_its_variable() -> None:
    """Env order is kept as the workload has it (no rollout for a reordering), but not where that would put
    ``$(K8S_POD_NAME)`` before the variable: the kubelet would leave the reference as literal text."""
    spec = parse_spec(minimal_llmt()["spec"])
    workload = deployment()
    injection = r.build_injection(spec, CONFIG, workload, "chat")
    # (Nor does such an entry count as the container's own route: no SignalsRouted report of it.)
    assert r.own_routes(workload, injection) == {}
    injected = merge_patch(workload, r.build_workload_patch(workload, injection, "chat"))
    entries = injected["spec"]["template"]["spec"]["containers"][0]["env"]
    at = next(i for i, e in enumerate(entries) if e["name"] == "OTEL_RESOURCE_ATTRIBUTES")
    moved = json.loads(json.dumps(injected))
    moved_env = moved["spec"]["template"]["spec"]["containers"][0]["env"]
    moved_env.insert(0, moved_env.pop(at))  # someone moved it first (by hand; kept as the user's order otherwise)
    patch = r.build_workload_patch(moved, injection, "chat")
    assert patch is not None
    names = [e["name"] for e in merge_patch(moved, patch)["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names.index("OTEL_RESOURCE_ATTRIBUTES") > names.index("K8S_POD_NAME")


@pytest.mark.parametrize("where", ["volume", "mount"])
def test_a_volume_of_the_users_own_under_the_pricing_volumes_name_is_refused_not_skipped(where: str) -> None:
    """Skipped, the prices would not be mounted where LLM_TELEMETRY_PRICING points, and the middleware would not
    start: the injection is refused with a message saying why (the pass reports it as InjectionFailed)."""
    workload = deployment()
    pod = workload["spec"]["template"]["spec"]
    if where == "volume":
        pod["volumes"] = [{"name": c.PRICING_VOLUME, "emptyDir": {}}]
    else:
        pod["containers"][0]["volumeMounts"] = [{"name": c.PRICING_VOLUME, "mountPath": "/data"}]
    spec = parse_spec(
        {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"models": {"m": {"input": 1, "output": 2}}}}
    )
    with pytest.raises(r.InjectionConflict, match=f"named {c.PRICING_VOLUME} of its own"):
        r.build_workload_patch(workload, r.build_injection(spec, CONFIG, workload, "chat"), "chat")
    # Without prices nothing is mounted, and the workload is injected as usual.
    plain = parse_spec({"selector": {"matchLabels": {"app": "chat"}}})
    assert r.build_workload_patch(workload, r.build_injection(plain, CONFIG, workload, "chat"), "chat") is not None


def test_a_udp_port_of_the_metrics_ports_number_gets_the_metrics_port_beside_it() -> None:
    """A statsd listener on UDP 9464 is another port: the metrics port is declared beside it, by its name, which
    the metrics Service targets (without it, the pods would be no endpoints of the Service)."""
    workload = deployment()
    workload["spec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"name": "statsd", "containerPort": 9464, "protocol": "UDP"}
    ]
    spec = parse_spec(minimal_llmt()["spec"])
    assert r.port_conflicts(workload, spec) == []
    ports = inject(workload)["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": c.METRICS_PORT_NAME, "containerPort": 9464, "protocol": "TCP"} in ports
    svc = r.build_metrics_service(minimal_llmt(), spec, workload)
    assert svc["spec"]["ports"][0]["targetPort"] == c.METRICS_PORT_NAME


def test_an_injected_pricing_volume_whose_record_was_lost_is_replaced_not_taken_for_the_users() -> None:
    """The record annotation removed by hand, and the prices' ConfigMap changed before a pass could rebuild it: the
    pricing volume and mount, shaped as an injection makes them, are the injection's, replaced (no InjectionFailed
    asking the user to rename a volume that is not theirs)."""
    first = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"configMapRef": {"name": "a"}}})
    injected = inject(
        deployment(), {"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"configMapRef": {"name": "a"}}}
    )
    del injected["metadata"]["annotations"][c.ANNOTATION_INJECTED]
    later = parse_spec({"selector": {"matchLabels": {"app": "chat"}}, "pricing": {"configMapRef": {"name": "b"}}})
    assert first != later
    patch = r.build_workload_patch(injected, r.build_injection(later, CONFIG, injected, "chat"), "chat")
    assert patch is not None
    pod = dict(merge_patch(injected, patch))["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == c.PRICING_VOLUME]
    assert volume["configMap"]["name"] == "b"
    assert [m["name"] for m in pod["containers"][0]["volumeMounts"]].count(c.PRICING_VOLUME) == 1


def _container_env(workload: dict[str, Any], resolved: dict[str, str]) -> dict[str, str]:
    """The variables the container starts with, as the kubelet makes them: in order, each value's ``$(NAME)``
    replaced by a variable declared before it (``resolved``: the values of those set from secrets or fields), ``$$``
    by one ``$``, and any other reference left as written."""
    made: dict[str, str] = {}
    for entry in workload["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "valueFrom" in entry:
            made[entry["name"]] = resolved[entry["name"]]
            continue

        def expand(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            return made.get(match.group(1), match.group(0))

        made[entry["name"]] = re.sub(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)", expand, entry["value"])
    return made


def test_a_spec_value_is_taken_literally_and_never_expands_the_apps_variables() -> None:
    """Kubernetes expands ``$(NAME)`` in a variable's value from the variables declared before it. An endpoint of
    ``.../$(OPENAI_API_KEY)`` (a spec anyone who may edit LLMTelemetry resources writes) would have sent the app's
    key, which the workload sets from a Secret, to that endpoint. The pod's own variables in the resource
    attributes still expand."""
    secret = {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "key"}}}
    workload = inject(
        deployment(env=[secret]),
        {
            "selector": {"matchLabels": {"app": "chat"}},
            "tracing": {"endpoint": "http://collector.example:4318/k/$(OPENAI_API_KEY)"},
            "logs": {"endpoint": "http://$(OPENAI_API_KEY).logs.example/otlp", "tenant": "team-a"},
        },
    )
    resolved = {"OPENAI_API_KEY": "sk-secret", "K8S_NAMESPACE_NAME": "llm", "K8S_POD_NAME": "chat-1",
                "K8S_POD_UID": "u-1"}  # fmt: skip
    started = _container_env(workload, resolved)
    assert (
        started["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://collector.example:4318/k/$(OPENAI_API_KEY)/v1/traces"
    )
    assert started["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] == "http://$(OPENAI_API_KEY).logs.example/otlp/v1/logs"
    assert "sk-secret" not in json.dumps({name: v for name, v in started.items() if name != "OPENAI_API_KEY"})
    assert "k8s.pod.name=chat-1" in started["OTEL_RESOURCE_ATTRIBUTES"].split(",")


def _earlier_uid(namespace: str, name: str) -> str:
    """The dashboard uid the earlier scheme gave: cut at 31 characters, then ``_`` and 8 hex digits of a hash."""
    text = f"llmt_{namespace}_{name.replace('.', '_')}"
    return text if len(text) <= 40 else text[:31] + "_" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _uid_look_alikes() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Pairs of resources whose dashboards shared a uid: the second's short uid spells the first's cut one."""
    pairs = []
    # The same namespace: a name with a dot (an underscore in the uid) ending in the first one's hash.
    victim = ("team-a", "customer-support-assistant-prod")
    digest = _earlier_uid(*victim).rsplit("_", 1)[1]
    pairs.append((victim, ("team-a", f"customer-support-as.{digest}")))
    # Two namespaces, one the first 26 characters of the other: a resource named after the hash.
    victim = ("a" * 26 + "-prod", "chat")
    pairs.append((victim, ("a" * 26, _earlier_uid(*victim).rsplit("_", 1)[1])))
    return pairs


@pytest.mark.parametrize(("first", "second"), _uid_look_alikes(), ids=["same-namespace", "namespace-prefix"])
def test_a_short_uid_spelling_a_cut_one_is_not_that_dashboard(first: tuple[str, str], second: tuple[str, str]) -> None:
    """A resource named so that its uncut uid reads as another's cut one (the readable part, ``_`` and that one's
    hash) shared that one's dashboard: Grafana showed one of the two. Each gets its own, within 40 characters."""
    assert _earlier_uid(*first) == _earlier_uid(*second)  # the collision this guards against
    uids = [r.dashboard_uid({"metadata": {"namespace": ns, "name": name}}) for ns, name in (first, second)]
    assert uids[0] != uids[1], uids
    assert all(_GRAFANA_UID.fullmatch(u) for u in uids), uids


def test_a_dashboard_uid_that_fits_is_unchanged() -> None:
    """Only uids longer than Grafana's 40 characters changed form: the rest keep the dashboards they name."""
    assert r.dashboard_uid({"metadata": {"namespace": "llm", "name": "chat.v2"}}) == "llmt_llm_chat_v2"
    fits = {"metadata": {"namespace": "team-a", "name": "customer-support-assistant"}}
    assert r.dashboard_uid(fits) == "llmt_team-a_customer-support-assistant"
    cut = r.dashboard_uid({"metadata": {"namespace": "team-a", "name": "customer-support-assistant-prod"}})
    assert len(cut) == 40 and cut.startswith("llmt_team-a_customer-s__")


def _child_look_alike(long_name: str, suffix: str) -> str:
    """The shorter name whose plain child name was, to the letter, the cut child name of ``long_name`` (its first
    characters, ``-`` and the 8 hex digits of its hash)."""
    digest = hashlib.sha256(long_name.encode()).hexdigest()[:8]
    return f"{long_name[: 63 - len(suffix) - 10].rstrip('-.')}-{digest}"


@pytest.mark.parametrize(
    "long_name",
    ["customer-support-assistant-production-eu-west-1-blue-green-can", "abc" + "-" * 40 + "d" * 20],
    ids=["49-beside-63", "cut-at-dashes"],
)
@pytest.mark.parametrize(
    ("child", "suffix"),
    [
        (r.service_monitor_name, "llm-telemetry"),
        (r.prometheus_rule_name, "llm-telemetry"),
        (r.dashboard_configmap_name, "llm-dashboard"),
        (r.pricing_configmap_name, "llm-pricing"),
    ],
)
def test_a_name_spelling_a_cut_child_name_gets_children_of_its_own(long_name: str, child: Any, suffix: str) -> None:
    """A resource named ``<the first characters of another's>-<its hash>`` had, uncut, the other's cut child names:
    the two claimed one ServiceMonitor, PrometheusRule and ConfigMaps (the later one reported them as someone else's).
    A name that ends as a cut name does (``-`` and 8 hex digits) gets the cut form too."""
    short = _child_look_alike(long_name, suffix)
    assert len(long_name) <= 63 and len(f"{short}-{suffix}") <= 63
    assert child(long_name) == f"{short}-{suffix}"  # the long one's child name, which the short one's was
    assert child(short) != child(long_name)
    assert len(child(short)) <= 63
    assert child("chat") == f"chat-{suffix}"  # names that do not end so keep their children's names
    assert child("chat-2026") == f"chat-2026-{suffix}"
