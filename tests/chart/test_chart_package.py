"""What ties the chart to the rest of the project: version, CRD copy, the image and the locked-down Deployment."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from chartkit import CHART, NAMESPACE, REPO_ROOT, VALUE_SETS, Helm, find, one

from kube_schema import SUPPORTED_VERSIONS
from llm_telemetry_operator.config import OperatorConfig

Render = Callable[..., list[dict[str, Any]]]
TOP_CRDS = REPO_ROOT / "crds"
CHART_CRDS = CHART / "crds"
DOCKERFILE = REPO_ROOT / "Dockerfile"


def package_version() -> str:
    tree = ast.parse((REPO_ROOT / "middleware" / "llm_telemetry" / "version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise AssertionError("version.py sets no __version__")


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [operator] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(operator)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == package_version()


def test_chart_crds_are_an_exact_copy_of_the_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in TOP_CRDS.glob("*.yaml")}
    assert top, "crds/ at the repository root holds no CRD"
    copy = {p.name: p.read_bytes() for p in CHART_CRDS.glob("*.yaml")}
    assert sorted(copy) == sorted(top), "the chart's crds/ must hold the same files as crds/: run scripts/sync-crds"
    for name, content in top.items():
        assert copy[name] == content, f"the chart's copy of {name} differs from crds/: run scripts/sync-crds"


@pytest.mark.parametrize("path", sorted(CHART_CRDS.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_validates_against_the_apiextensions_schema(path: Any) -> None:
    for crd in yaml.safe_load_all(path.read_text()):
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["kind"] == "CustomResourceDefinition"
        for version in SUPPORTED_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)


def test_notes_example_is_a_valid_llmtelemetry(helm: Helm) -> None:
    notes = helm.run("install", "--dry-run=client", "x", str(CHART), "--namespace", NAMESPACE).stdout
    example_text = notes.split("<<'YAML'\n", 1)[1].split("YAML\n", 1)[0]
    example = yaml.safe_load(example_text)
    [crd] = [c for p in CHART_CRDS.glob("*.yaml") for c in yaml.safe_load_all(p.read_text())]
    assert example["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert example["kind"] == crd["spec"]["names"]["kind"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(example)


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["llm"]}, {"replicaCount": 2}])
def test_deployment_is_locked_down(render: Render, values: dict[str, Any]) -> None:
    docs = render(values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    operator = container(docs)
    pod_sc, sc = pod["securityContext"], operator["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert isinstance(pod_sc["runAsUser"], int) and pod_sc["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"} == sc["seccompProfile"]
    assert operator["resources"]["requests"] and operator["resources"]["limits"]["memory"]
    # The read-only root still leaves Python a writable /tmp.
    mounts = {m["mountPath"]: m["name"] for m in operator["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/tmp"]]


def test_an_assigned_uid_is_a_values_change(render: Render) -> None:
    """Where the platform assigns the UID (OpenShift's restricted SCC refuses a pod that asks for 10001), nulling the
    pod's user, group and fsGroup leaves a pod that still refuses root and takes the UID it is given."""
    docs = render(VALUE_SETS["assigned-uid"])
    pod_sc = one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container(docs)["securityContext"]["runAsNonRoot"] is True


def test_deployment_runs_the_operator_entry_point_with_its_settings(render: Render) -> None:
    operator = container(render())
    assert operator["command"] == ["llm-telemetry-operator"]
    assert operator["image"] == f"llm-telemetry-operator:{package_version()}"
    env = {e["name"]: e["valueFrom"] if "valueFrom" in e else e.get("value", "") for e in operator["env"]}
    assert env == {
        "LLM_TELEMETRY_OPERATOR_NAMESPACES": "",
        "LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT": "http://jaeger.observability:4318",
        "LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT": "http://loki-gateway.observability/otlp",
        "LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS": "release=kube-prometheus-stack",
        "LLM_TELEMETRY_OPERATOR_LOGS_TENANT": "",
        "LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL": "grafana_dashboard=1",
        "LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID": "jaeger",
        "LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID": "loki",
        "LLM_TELEMETRY_OPERATOR_RUNBOOK_URL": "docs/runbooks.md",
        "LLM_TELEMETRY_OPERATOR_PEERING": "llm-telemetry-operator",
        "LLM_TELEMETRY_OPERATOR_PRIORITY": "auto",
        "LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS": "60",
        "LLM_TELEMETRY_OPERATOR_METRICS_PORT": "9465",
        "LLM_TELEMETRY_OPERATOR_HEALTH": "http://0.0.0.0:8080/healthz",
        "LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS": "300",
        # kopf's name for the replica in the peering object (else it looks the user up: see the next test).
        "POD_ID": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
    }
    # Liveness and readiness probe kopf's health endpoint, on the port the operator is told to listen on.
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    for probe in (operator["livenessProbe"], operator["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz"
        assert ports[probe["httpGet"]["port"]] == 8080


def test_custom_endpoints_reach_the_operator(render: Render) -> None:
    values = {
        "defaults": {
            "tracesEndpoint": "http://tempo.tracing:4318",
            "logsEndpoint": "https://loki.example.com/otlp",
            "serviceMonitorLabels": {"release": None, "prometheus": "main", "team": "ml"},
            "dashboardLabel": "grafana=yes",
        },
        "peering": {"name": "llm-canary", "priority": 5},
        "healthPort": 8181,
    }
    docs = render(values)
    env = {e["name"]: e.get("value", "") for e in container(docs)["env"]}
    assert env["LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT"] == "http://tempo.tracing:4318"
    assert env["LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT"] == "https://loki.example.com/otlp"
    assert env["LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS"] == "prometheus=main,team=ml"
    assert env["LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL"] == "grafana=yes"
    assert env["LLM_TELEMETRY_OPERATOR_PEERING"] == "llm-canary"
    assert env["LLM_TELEMETRY_OPERATOR_PRIORITY"] == "5"
    assert env["LLM_TELEMETRY_OPERATOR_HEALTH"] == "http://0.0.0.0:8181/healthz"
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "llm-canary"


def test_namespaced_releases_get_peering_objects_of_their_own(render: Render) -> None:
    """Namespaced releases coordinate through a ClusterKopfPeering too, each its own unless peering.name is set:
    two releases watching different namespaces through one object would pause each other."""
    names = set()
    for release, namespaces in (("team-a", ["llm-a"]), ("team-b", ["llm-b"])):
        docs = render({"watchNamespaces": namespaces, "fullnameOverride": release})
        [peering] = find(docs, "ClusterKopfPeering")
        env = {e["name"]: e.get("value", "") for e in container(docs)["env"]}
        assert env["LLM_TELEMETRY_OPERATOR_PEERING"] == peering["metadata"]["name"]
        names.add(peering["metadata"]["name"])
    assert len(names) == 2
    assert all(name.startswith(f"{NAMESPACE}-team-") for name in names), names
    docs = render({"watchNamespaces": ["llm-a"], "peering": {"name": "llm-canary"}})
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "llm-canary"
    # `helm upgrade --reuse-values` from a chart before this one carries peering.name=llm-telemetry-operator, the
    # cluster-wide default: a namespaced release still gets its own name.
    for release in ("team-a", "team-b"):
        docs = render(
            {"watchNamespaces": ["llm-a"], "fullnameOverride": release, "peering": {"name": "llm-telemetry-operator"}}
        )
        assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == f"{NAMESPACE}-{release}"
    # Names long enough that a cut at 63 characters would make two releases share one are not cut.
    long = [f"team-payments-chat-{i}-{'x' * 40}" for i in (1, 2)]
    found = {
        one(render({"watchNamespaces": ["a"], "fullnameOverride": n}), "ClusterKopfPeering")["metadata"]["name"]
        for n in long
    }
    assert len(found) == 2, found


def test_values_a_release_before_them_lacks_keep_their_defaults(render: Render) -> None:
    """``helm upgrade --reuse-values`` (docs/install.md) reuses the old release's values, without keys added to
    the chart since: the Deployment still gives the operator its defaults."""
    unset = {"jaegerDatasourceUid": None, "lokiDatasourceUid": None, "runbookUrl": None, "logsTenant": None}
    env = {e["name"]: e.get("value", "") for e in container(render({"defaults": unset, "healthAddress": None}))["env"]}
    config = OperatorConfig.from_env(env)
    assert config.health == "http://0.0.0.0:8080/healthz"
    assert (config.jaeger_datasource_uid, config.loki_datasource_uid) == ("jaeger", "loki")
    assert config.runbook_url == "docs/runbooks.md"
    assert config.logs_tenant == ""


def test_an_ipv6_cluster_gets_its_health_endpoint_on_ipv6(render: Render) -> None:
    """The kubelet probes the pod's own address: in a cluster whose pods have IPv6 addresses first, ``healthAddress:
    "::"`` makes kopf listen there (the test of the operator's command checks that it answers on IPv6)."""
    env = {e["name"]: e.get("value", "") for e in container(render({"healthAddress": "::"}))["env"]}
    assert OperatorConfig.from_env(env).health == "http://[::]:8080/healthz"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_operator_accepts_the_environment_the_chart_sets(render: Render, name: str) -> None:
    values = VALUE_SETS[name]
    env = {e["name"]: e.get("value", "") for e in container(render(values))["env"]}
    config = OperatorConfig.from_env(env)
    assert config.namespaces == tuple(values.get("watchNamespaces", ()))
    defaults = values.get("defaults", {})
    assert config.traces_endpoint == defaults.get("tracesEndpoint", "http://jaeger.observability:4318")
    assert config.servicemonitor_labels == defaults.get("serviceMonitorLabels", {"release": "kube-prometheus-stack"})
    assert "=".join(config.dashboard_label) == defaults.get("dashboardLabel", "grafana_dashboard=1")
    assert config.jaeger_datasource_uid == defaults.get("jaegerDatasourceUid", "jaeger")
    assert config.loki_datasource_uid == defaults.get("lokiDatasourceUid", "loki")
    assert config.runbook_url == defaults.get("runbookUrl", "docs/runbooks.md")
    assert config.logs_tenant == defaults.get("logsTenant", "")
    assert config.metrics_port == 9465
    assert config.health == "http://0.0.0.0:8080/healthz"


def test_dockerfile_builds_a_slim_non_root_operator_image() -> None:
    instructions = dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms and all(re.match(r"python:\S*-slim\b", f) for f in froms), froms
    [user] = [args for op, args in instructions if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be numeric so that runAsNonRoot can be enforced"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"pip install ['\"]?\.\[operator\]", runs)
    [entrypoint] = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["llm-telemetry-operator"]
    assert values["image"]["repository"] == "llm-telemetry-operator"
