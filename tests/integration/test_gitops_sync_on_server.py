"""The chart as a GitOps tool deploys it, on a real API server: `helm template --include-crds` piped to `kubectl
apply` (server-side, and client-side), then the same again, as every sync of Argo CD does. Each apply succeeds, a
sync of an unchanged rendering changes nothing (no object is made anew, no generation moves, and kubectl's apply
does not write it again: a sync that writes every time is an object Argo CD never calls synced, and a watch event for
everyone watching it), the same
holds after the values change (two replicas, a PodDisruptionBudget, a Loki tenant), and the operator started with
the chart's ServiceAccount serves an LLMTelemetry afterwards."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
from typing import Any

import pytest
import yaml
from clusterkit import (
    CHART,
    _prometheus_crds,
    apply,
    start_chart_operator,
    stop,
    telemetry,
    tool_binary,
    uninstall,
    unique,
    wait_for,
)
from clusterkit import deployment as workload

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "llmtelemetry.dev", "v1alpha1", "llmtelemetries"
CRD = f"{PLURAL}.{GROUP}"


def _kubectl(kubeconfig: pathlib.Path, *args: str) -> str:
    result = subprocess.run(
        [tool_binary("kubectl"), *args], env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _template(namespace: str, out: pathlib.Path, *sets: str) -> list[dict[str, Any]]:
    options = [arg for value in sets for arg in ("--set", value)]
    result = subprocess.run(
        [tool_binary(), "template", namespace, str(CHART), "--namespace", namespace, "--include-crds", *options],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out.write_text(result.stdout)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _rules(node: Any) -> int:
    """How many x-kubernetes-validations lists a schema holds."""
    if isinstance(node, dict):
        return ("x-kubernetes-validations" in node) + sum(_rules(v) for v in node.values())
    if isinstance(node, list):
        return sum(_rules(v) for v in node)
    return 0


def _state(kubeconfig: pathlib.Path, manifest: pathlib.Path, skip: set[str]) -> dict[str, Any]:
    """Per applied object: its uid, generation and what kubectl's apply owns in it, with the time it last wrote
    it. (Not the resourceVersion: the controllers write statuses and a ServiceAccount's token of their own.)"""
    items = json.loads(_kubectl(kubeconfig, "get", "-f", str(manifest), "-o", "json", "--show-managed-fields"))
    return {
        f"{item['kind']}/{item['metadata']['name']}": (
            item["metadata"]["uid"],
            item["metadata"].get("generation"),
            [m for m in item["metadata"].get("managedFields") or [] if m["manager"].startswith("kubectl")],
        )
        for item in items["items"]
        if f"{item['kind']}/{item['metadata']['name']}" not in skip
    }


#: Server-side as Argo CD (ServerSideApply=true) and Flux apply, taking over fields another manager set (such as an
#: earlier client-side apply of the same CRD, which on an API server dropping its rules differs from it); and
#: client-side, kubectl's and Argo CD's default.
MODES = {"server-side": ("--server-side", "--force-conflicts"), "client-side": ("--server-side=false",)}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_template_and_apply_again_and_again_changes_nothing(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path, mode: str
) -> None:
    from kubernetes import client

    core, custom, extensions = client.CoreV1Api(api), client.CustomObjectsApi(api), client.ApiextensionsV1Api(api)
    namespace = unique("llmt-sync")
    # A peering object of its own (the cluster-wide default is shared by every cluster-wide release).
    common = (f"peering.name={namespace}", "resyncSeconds=5")
    # The ServiceMonitor and PrometheusRule the operator makes for a resource need the Prometheus Operator's CRDs.
    for path in sorted(_prometheus_crds().glob("monitoring.coreos.com_*.yaml")):
        apply(api, yaml.safe_load(path.read_text()))
    core.create_namespace({"metadata": {"name": namespace}})
    docs: list[dict[str, Any]] = []
    try:
        # A user's extraEnv entries written as people write them: an empty value, a fieldRef without its apiVersion, a
        # resourceFieldRef without its divisor (each stored otherwise, and applied again at every sync, before).
        extra = (
            "extraEnv[0].name=EMPTY_BY_USER", "extraEnv[0].value=",
            "extraEnv[1].name=POD_NAME_BY_USER", "extraEnv[1].valueFrom.fieldRef.fieldPath=metadata.name",
            "extraEnv[2].name=MEMORY_LIMIT", "extraEnv[2].valueFrom.resourceFieldRef.resource=limits.memory",
        )  # fmt: skip
        for sets in [
            common,
            (*common, "replicaCount=2", "podDisruptionBudget.enabled=true", "defaults.logsTenant=t", *extra),
        ]:
            manifest = tmp_path / "rendered.yaml"
            docs = _template(namespace, manifest, *sets)
            _kubectl(kubeconfig, "apply", *MODES[mode], "-f", str(manifest))
            # An API server whose CEL is off (before 1.25, or a build without it) drops the CRD's validation rules
            # on every write, and so counts every apply of the CRD as a change of it; one that keeps them does not.
            (rendered_crd,) = [d for d in docs if d["metadata"]["name"] == CRD]
            stored = api.sanitize_for_serialization(extensions.read_custom_resource_definition(CRD))
            dropped = _rules(stored["spec"]) < _rules(rendered_crd["spec"])
            skip = {f"CustomResourceDefinition/{CRD}"} if dropped else set()
            before = _state(kubeconfig, manifest, skip)
            assert len(before) == len(docs) - len(skip), sorted(before)
            for _ in range(3):
                # A write that only a new managedFields time tells apart lands only in a new second: the API server
                # skips one whose stored bytes equal the old, and the time is kept to the second.
                time.sleep(1.1)
                _kubectl(kubeconfig, "apply", *MODES[mode], "-f", str(manifest))
                assert _state(kubeconfig, manifest, skip) == before, f"a sync of {sets} changed something"

        # The operator, started as the chart's ServiceAccount with its environment, serves a resource.
        process, log, _, _ = start_chart_operator(api, kubeconfig, docs, namespace, tmp_path)
        try:
            client.AppsV1Api(api).create_namespaced_deployment(namespace, workload("chat", "chat"))
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, telemetry("chat", "chat"))

            def ready() -> bool:
                found = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")
                conditions = (found.get("status") or {}).get("conditions") or []
                return any(x["type"] == "Ready" and x["status"] == "True" for x in conditions)

            wait_for(ready, f"the resource served (operator log: {log})", timeout=120)
            core.read_namespaced_service("chat-llm-metrics", namespace)
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")

            def gone() -> bool:
                return not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

            wait_for(gone, "the resource deleted (its finalizer taken off)", timeout=120)
        finally:
            stop(process)
    finally:
        uninstall(api, docs, (namespace,))
        for doc in docs:
            if doc["kind"] == "ClusterKopfPeering":
                custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", doc["metadata"]["name"])
