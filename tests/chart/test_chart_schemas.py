"""Everything the chart renders is accepted by every supported Kubernetes version, without a cluster.

Core kinds validate against the OpenAPI schemas kubernetes-validate carries for each supported minor; the CRDs
pass the API server's structural-schema rules; the ServiceMonitor validates against the Prometheus Operator's
schemas (npm @kubernetes-models/prometheus-operator).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from chartkit import CHART, NAMESPACE, REPO_ROOT, VALUE_SETS, one

from kube_schema import SUPPORTED_VERSIONS, object_errors, structural_errors
from prometheus_operator import KINDS, PrometheusOperatorSchemas

Render = Callable[..., list[dict[str, Any]]]
#: Custom kinds the chart renders, each checked against its own CRD instead (test_chart_render.py).
KOPF_KINDS = {"ClusterKopfPeering", "KopfPeering"}


def kubernetes_errors(doc: dict[str, Any], version: str) -> str | None:
    try:
        # strict: an unknown field (a misspelt key in a template) is an error, as under kubectl's strict validation.
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return f"{doc['kind']}/{doc['metadata']['name']} on {version}, at {path}: {exc.message}"
    return None


def test_every_supported_version_has_schemas() -> None:
    for version in SUPPORTED_VERSIONS:
        doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
        assert kubernetes_errors(doc, version) is None
        assert kubernetes_errors({**doc, "data": {"a": 1}}, version) is not None


def test_chart_declares_the_oldest_supported_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={SUPPORTED_VERSIONS[0]}-0"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_validate_on_every_supported_version(render: Render, name: str) -> None:
    docs = render(VALUE_SETS[name], include_crds=True)
    core = [d for d in docs if d["kind"] not in KOPF_KINDS and d["kind"] not in KINDS]
    assert core
    failures = [error for version in SUPPORTED_VERSIONS for d in core if (error := kubernetes_errors(d, version))]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
@pytest.mark.parametrize("release", ["llm-telemetry", "r" * 53, "1.llm"])
def test_rendered_names_and_labels_are_ones_the_api_server_admits(render: Render, name: str, release: str) -> None:
    """Names, label keys and values, selectors: rules the OpenAPI schemas leave out (Helm allows release names of up
    to 53 characters, with dots and a leading digit)."""
    docs = render(VALUE_SETS[name], include_crds=True, release=release)
    failures = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs for e in object_errors(d)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["defaults", "namespaced"])
def test_rendered_crds_are_structural(render: Render, name: str) -> None:
    crds = [d for d in render(VALUE_SETS[name], include_crds=True) if d["kind"] == "CustomResourceDefinition"]
    assert {d["spec"]["names"]["kind"] for d in crds} >= {"LLMTelemetry", *KOPF_KINDS}
    for crd in crds:
        assert structural_errors(crd) == [], crd["metadata"]["name"]


def test_servicemonitor_validates_against_the_prometheus_operator_schema(
    render: Render, prometheus_operator_schemas: PrometheusOperatorSchemas
) -> None:
    monitor = one(render(VALUE_SETS["pdb-servicemonitor"]), "ServiceMonitor")
    prometheus_operator_schemas.assert_valid([monitor])
    broken = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "interval": "soon"}]}}
    assert prometheus_operator_schemas.errors([broken]) != [None], "the schemas must catch a bad interval"
    # A field the schemas do not name would be dropped by the API server: a misspelt one, here or in a rule, is an
    # error, though the schemas themselves allow unknown fields. The labels under metadata are free.
    endpoint = {**monitor["spec"]["endpoints"][0], "metricsPath": "/metrics"}
    misspelt = {**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint], "jobLabl": "x"}}
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r", "labels": {"anything": "goes"}},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m", "severty": "x"}]}]},
    }
    errors = prometheus_operator_schemas.errors(
        [misspelt, rule, {**rule, "spec": {"groups": [{"name": "g", "rules": []}]}}]
    )
    assert errors[0] is not None and "spec.endpoints.0.metricsPath" in errors[0] and "spec.jobLabl" in errors[0]
    assert errors[1] is not None and errors[1].endswith("spec.groups.0.rules.0.severty")
    assert errors[2] is None


def documented_admission_policy() -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding that docs/install.md offers cluster administrators."""
    text = (REPO_ROOT / "docs" / "install.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: ValidatingAdmissionPolicy\n" in b]
    return [doc for doc in yaml.safe_load_all(block) if doc]


def test_the_documented_admission_policy_fits_the_api_and_the_chart(render: Render) -> None:
    # admissionregistration.k8s.io/v1 serves ValidatingAdmissionPolicy from 1.30 on, as the page says. Only its shape
    # is checked here: no API server of the tests has ValidatingAdmissionPolicy, so its CEL has not run.
    policy, binding = documented_admission_policy()
    newer = [v for v in SUPPORTED_VERSIONS if tuple(map(int, v.split(".")[:2])) >= (1, 30)]
    assert newer
    failures = [error for version in newer for d in (policy, binding) if (error := kubernetes_errors(d, version))]
    assert not failures, "\n".join(failures)
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    # It guards the chart's LLMTelemetry resources, whose status the operator writes through the status subresource
    # (which takes no spec change: the policy leaves it alone), against the ServiceAccount of the page's install.
    docs = render(include_crds=True)
    [crd] = [
        d for d in docs if d["kind"] == "CustomResourceDefinition" and d["spec"]["names"]["kind"] == "LLMTelemetry"
    ]
    assert all("status" in (v.get("subresources") or {}) for v in crd["spec"]["versions"])
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (
        [crd["spec"]["group"]],
        [crd["spec"]["names"]["plural"]],
        ["UPDATE"],
    )
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    [condition] = policy["spec"]["matchConditions"]
    assert f"'system:serviceaccount:{NAMESPACE}:{account}'" in condition["expression"]
    assert [v["expression"] for v in policy["spec"]["validations"]] == ["object.spec == oldObject.spec"]
