"""Every object the operator builds is one a real API server accepts, on every supported Kubernetes version.

The build_* functions run on realistic input (the full example resource, a Deployment and a StatefulSet as users
write them); core kinds validate against kubernetes-validate's schemas for each supported minor (strict: unknown
fields fail), the ServiceMonitor and PrometheusRule against the Prometheus Operator's schemas, the status against
the LLMTelemetry CRD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

import kube_schema
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec
from prometheus_operator import PrometheusOperatorSchemas

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO_ROOT / "crds" / "llmtelemetry.dev_llmtelemetries.yaml").read_text())
CONFIG = OperatorConfig(servicemonitor_labels={"release": "kube-prometheus-stack"})
FULL = yaml.safe_load((REPO_ROOT / "examples" / "llmtelemetry-full.yaml").read_text())
CONFIGMAP_PRICING = {
    "selector": {"matchLabels": {"app": "chat"}},
    "pricing": {"configMapRef": {"name": "llm-prices", "key": "prices.yaml"}},
    "tracing": {"enabled": False},
    "logs": {"mode": "stdout"},
}


def owner(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llmtelemetry.dev/v1alpha1",
        "kind": "LLMTelemetry",
        "metadata": {
            "name": "chat",
            "namespace": "llm",
            "uid": "6f1c2a8e-3b7d-4e0a-9c55-0d4b2f7e9a11",
            "generation": 3,
            "resourceVersion": "48213",
        },
        "spec": spec,
    }


def workload(kind: str) -> dict[str, Any]:
    """A workload as users write them: two containers, ports, env from a Secret, probes, resources."""
    labels = {"app.kubernetes.io/part-of": "assistant", "tier": "api", "app": "chat"}
    pod = {
        "containers": [
            {
                "name": "api",
                "image": "registry.example.com/assistant/api:2.4.1",
                "ports": [{"name": "http", "containerPort": 8000}],
                "env": [
                    {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}}},
                    {"name": "WORKERS", "value": "4"},
                ],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
            },
            {"name": "proxy", "image": "envoyproxy/envoy:v1.31.0", "ports": [{"containerPort": 9901}]},
        ],
    }
    spec: dict[str, Any] = {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "chat"}},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if kind == "StatefulSet":
        spec["serviceName"] = "chat"
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": "chat", "namespace": "llm", "labels": labels, "resourceVersion": "1017"},
        "spec": spec,
    }


def built(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything the operator writes for one resource selecting a Deployment and a StatefulSet."""
    llmt = owner(spec)
    parsed = parse_spec(spec)
    objects = [
        r.build_service_monitor(llmt, parsed, CONFIG),
        r.build_prometheus_rule(llmt, parsed, CONFIG),
        r.build_dashboard_configmap(llmt, parsed, CONFIG),
    ]
    if parsed.pricing.inline:
        objects.append(r.build_pricing_configmap(llmt, parsed))
    for kind in ("Deployment", "StatefulSet"):
        target = workload(kind)
        patch = r.build_workload_patch(target, r.build_injection(parsed, CONFIG, target, "chat"), "chat")
        assert patch is not None
        objects += [kube_schema.merge_patch(target, patch), r.build_metrics_service(llmt, parsed, target)]
    return objects


SPECS = {"full-example": FULL["spec"], "configmap-pricing": CONFIGMAP_PRICING}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("version", kube_schema.SUPPORTED_VERSIONS)
def test_built_core_objects_validate(name: str, version: str) -> None:
    objects = [o for o in built(SPECS[name]) if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Service", "Deployment", "StatefulSet"}
    failures = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_injected_workload_keeps_the_users_fields() -> None:
    """The validation above is only worth something if the injection really landed in the validated objects."""
    deployment = next(o for o in built(FULL["spec"]) if o["kind"] == "Deployment")
    api, proxy = deployment["spec"]["template"]["spec"]["containers"]
    assert {"OPENAI_API_KEY", "WORKERS", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"} <= {e["name"] for e in api["env"]}
    assert {p["containerPort"] for p in api["ports"]} == {8000, 9464}
    assert "env" not in proxy  # spec.containers names only "api"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_built_monitoring_objects_validate(name: str, prometheus_operator_schemas: PrometheusOperatorSchemas) -> None:
    objects = [o for o in built(SPECS[name]) if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(o["kind"] for o in objects) == ["PrometheusRule", "ServiceMonitor"]
    prometheus_operator_schemas.assert_valid(objects)


def test_built_status_validates_against_the_crd() -> None:
    conditions = [
        r.Condition("Ready", True, "Reconciled", "2 workloads instrumented"),
        r.Condition("Injected", True, "Injected", "Deployment/chat, StatefulSet/chat"),
        r.Condition("MetricsExposed", False, "ServiceMonitorCRDMissing", "install the Prometheus Operator CRDs"),
    ]
    status = r.build_status(
        conditions,
        generation=3,
        targets=["Deployment/chat", "StatefulSet/chat"],
        previous=None,
        now="2026-11-29T15:00:00Z",
        phase="Degraded",
    )
    obj = {**owner(FULL["spec"]), "status": status}
    assert kube_schema.validate_object(CRD, obj) == []
    schema = dict(kube_schema.versions(CRD))["v1alpha1"]
    assert kube_schema.prune_object(schema, obj) == obj, "the server would drop part of the status"
