"""The chart lints, renders with every value set, and every rendered manifest is valid Kubernetes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from chartkit import CHART, KUBE_VERSION, NAMESPACE, VALUE_SETS, Helm, find, one

Render = Callable[..., list[dict[str, Any]]]

#: Kinds that kubernetes-validate has no schema for; each is checked against its CRD's schema below instead.
CUSTOM_KINDS = {("kopf.dev/v1", "ClusterKopfPeering"), ("kopf.dev/v1", "KopfPeering")}
SERVICEMONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")


def crd_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """A CRD version's openAPIV3Schema; validate with Draft 4, whose keywords OpenAPI 3.0 schemas follow."""
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{crd['metadata']['name']} has no version {version}")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_strictly(helm: Helm, values_file: Callable[[dict[str, Any]], Path], name: str) -> None:
    result = helm.run(
        "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--values", str(values_file(VALUE_SETS[name]))
    )
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_validate_against_kubernetes_schemas(render: Render, name: str) -> None:
    docs = render(VALUE_SETS[name], include_crds=True)
    assert find(docs, "Deployment"), "the chart must always render the operator Deployment"
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM_KINDS or key == SERVICEMONITOR:
            continue
        try:
            # strict: unknown fields (a misspelled key in a template) fail too.
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid at {path}: {exc.message}")


@pytest.mark.parametrize("name", ["defaults", "namespaced"])
def test_peering_objects_match_the_rendered_peering_crds(render: Render, name: str) -> None:
    docs = render(VALUE_SETS[name])
    crds = {d["spec"]["names"]["kind"]: d for d in find(docs, "CustomResourceDefinition")}
    assert set(crds) == {"ClusterKopfPeering", "KopfPeering"}
    peerings = [d for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS]
    # One ClusterKopfPeering in either mode: a KopfPeering in a watched namespace would go with the namespace.
    assert [d["kind"] for d in peerings] == ["ClusterKopfPeering"]
    for peering in peerings:
        crd = crds[peering["kind"]]
        assert crd["spec"]["group"] == peering["apiVersion"].split("/")[0]
        # kopf writes its peers into `status` through the main resource: no status subresource may swallow it.
        assert "subresources" not in crd["spec"]["versions"][0]
        assert "namespace" not in peering["metadata"] and crd["spec"]["scope"] == "Cluster"
        jsonschema.Draft4Validator(crd_schema(crd, "v1")).validate(peering)


def test_servicemonitor_validates_against_the_prometheus_operator_crd(render: Render, shared_crds: Path) -> None:
    crd = yaml.safe_load((shared_crds / "monitoring.coreos.com_servicemonitors.yaml").read_text())
    docs = render(VALUE_SETS["pdb-servicemonitor"])
    monitor = one(docs, "ServiceMonitor")
    jsonschema.Draft4Validator(crd_schema(crd, "v1")).validate(monitor)
    with pytest.raises(jsonschema.ValidationError):
        broken = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "interval": "soon"}]}}
        jsonschema.Draft4Validator(crd_schema(crd, "v1")).validate(broken)


def test_servicemonitor_scrapes_the_operator_metrics_port(render: Render) -> None:
    docs = render(VALUE_SETS["pdb-servicemonitor"])
    monitor, service, deployment = one(docs, "ServiceMonitor"), one(docs, "Service"), one(docs, "Deployment")
    # The monitor selects the Service, the Service selects the pods, and the named ports line up.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = service["spec"]["ports"]
    assert endpoint["port"] == port["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    assert ports[port["targetPort"]] == int(env["LLM_TELEMETRY_OPERATOR_METRICS_PORT"]) == 9465
    # kube-prometheus-stack only picks up monitors carrying its release label.
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["team"] == "ml-platform"
    assert endpoint["scrapeTimeout"] == "10s"


def test_pdb_selects_the_operator_pods(render: Render) -> None:
    docs = render(VALUE_SETS["pdb-servicemonitor"])
    pdb, deployment = one(docs, "PodDisruptionBudget"), one(docs, "Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert deployment["spec"]["replicas"] == 2
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    ("budget", "spec"),
    [
        ({"maxUnavailable": 1}, {"maxUnavailable": 1}),  # alone: minAvailable keeps its default of 1
        ({"maxUnavailable": "50%", "minAvailable": None}, {"maxUnavailable": "50%"}),
        ({"minAvailable": "60%"}, {"minAvailable": "60%"}),
    ],
)
def test_pdb_takes_the_budget_that_is_set(render: Render, budget: dict[str, Any], spec: dict[str, Any]) -> None:
    """maxUnavailable set alone is used: it was dropped for minAvailable's default."""
    docs = render({"replicaCount": 2, "podDisruptionBudget": {"enabled": True, **budget}})
    pdb = one(docs, "PodDisruptionBudget")
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == spec


def test_optional_objects_are_off_by_default(render: Render) -> None:
    kinds = {d["kind"] for d in render()}
    assert "PodDisruptionBudget" not in kinds
    assert "ServiceMonitor" not in kinds
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= kinds


def test_minimal_values_render_only_the_deployment_and_nothing_cluster_wide(render: Render) -> None:
    docs = render(VALUE_SETS["minimal"])
    assert [d["kind"] for d in docs] == ["Deployment"]
    pod = docs[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing-operator"
    assert pod["containers"][0]["image"] == "llm-telemetry-operator@sha256:" + "0" * 64


def test_servicemonitor_without_metrics_service_is_refused(helm: Helm, values_file: Callable[..., Path]) -> None:
    values = {"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}}
    result = helm.run("template", "x", str(CHART), "--values", str(values_file(values)), check=False)
    assert result.returncode != 0
    assert "metrics.service.enabled" in result.stderr


def test_notes_name_the_next_step(helm: Helm) -> None:
    result = helm.run("install", "--dry-run=client", "llm-telemetry", str(CHART), "--namespace", NAMESPACE)
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kind: LLMTelemetry" in notes
    assert "kubectl apply" in notes
    assert "rollout status deployment/llm-telemetry-operator" in notes
