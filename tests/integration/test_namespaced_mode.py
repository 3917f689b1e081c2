"""Namespaced mode against a real API server: a watched namespace deleted with its Role, and created again.

Its own module: the cluster-wide operator of test_real_cluster.py watches every namespace, and would act on this
test's resources too while its module runs (the suite is shuffled by module, so the two never overlap)."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import pytest
from clusterkit import (
    apply,
    deployment,
    install,
    refused_lines,
    start_chart_operator,
    stop,
    telemetry,
    uninstall,
    unique,
    wait_for,
)
from test_real_cluster import GROUP, PLURAL, VERSION

from llm_telemetry_operator.collectors import CACHE_SECONDS
from llm_telemetry_operator.config import LLM_TELEMETRY_OPERATOR_PEERING

pytestmark = pytest.mark.k8s


def test_namespaced_mode_lets_a_watched_namespace_be_deleted(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Namespaced mode grants most of its access through a Role in each watched namespace, and deleting the
    namespace deletes the Role with everything else. The namespace still goes (the operator takes its finalizer
    off the LLMTelemetry there), and the operator goes on serving the other namespace, its peering held in the
    release's ClusterKopfPeering rather than in a KopfPeering of each namespace, a resource there that exports its
    traces to a collector in the deleted namespace included (after a minute of refused reads, the collector is left
    unchecked). Created again, the namespace has no Role until the chart is applied again: a resource there says so
    in its status, and is served once it is."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, custom, apps = client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)
    system, kept, doomed = unique("llmt-ns-system"), unique("llmt-ns-kept"), unique("llmt-ns-doomed")
    for namespace in (kept, doomed):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    docs = install(api, system, unique("llmt-ns"), f"watchNamespaces={{{kept},{doomed}}}")
    [peering] = [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterKopfPeering"]
    process, log, _, env = start_chart_operator(api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "10")

    def condition(namespace: str, kind: str = "Ready") -> dict[str, Any]:
        found = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")
        conditions = (found.get("status") or {}).get("conditions") or []
        return next((cond for cond in conditions if cond["type"] == kind), {})

    def collectors() -> dict[str, Any]:
        return condition(kept, "CollectorsAvailable")

    def ready(namespace: str) -> bool:
        return condition(namespace).get("status") == "True"

    def gone(namespace: str) -> bool:
        try:
            core.read_namespace(namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    def port(namespace: str) -> str | None:
        container = apps.read_namespaced_deployment("chat", namespace).spec.template.spec.containers[0]
        return next((e.value for e in container.env or [] if e.name == "LLM_TELEMETRY_METRICS_PORT"), None)

    collector = client.V1Service(
        metadata=client.V1ObjectMeta(name="jaeger"),
        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=4318)], selector={"app": "jaeger"}),
    )
    try:
        core.create_namespaced_service(doomed, collector)
        traced = telemetry("chat", "chat", tracing={"endpoint": f"http://jaeger.{doomed}.svc:4318"})
        for namespace, resource in ((kept, traced), (doomed, telemetry("chat", "chat"))):
            apps.create_namespaced_deployment(namespace, deployment("chat", "chat"))
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, resource)
        for namespace in (kept, doomed):
            wait_for(lambda namespace=namespace: ready(namespace), f"Ready in {namespace}")
        assert "jaeger" in condition(kept, "CollectorsAvailable")["message"]
        assert env[LLM_TELEMETRY_OPERATOR_PEERING] == peering
        wait_for(
            lambda: (
                env["POD_ID"]
                in (
                    custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering).get("status")
                    or {}
                )
            ),
            f"the operator in the ClusterKopfPeering {peering}",
        )

        core.delete_namespace(doomed)
        wait_for(lambda: gone(doomed), f"namespace {doomed} deleted, not held by a finalizer", timeout=120)
        # The collector's Service as last read stays good for the operator's cache time: a pass within it (the
        # namespace goes in seconds) is served from the cache, and never meets a refusal.
        time.sleep(CACHE_SECONDS)

        custom.patch_namespaced_custom_object(
            GROUP, VERSION, kept, PLURAL, "chat", {"spec": {"metrics": {"port": 9600}}}
        )
        # Its collector's reads refused from then on, the resource in the namespace kept fails its passes for a
        # minute (a refusal may be the RBAC cache filling after a restart), then is served with it unchecked.
        # (The pass patches the workload before it writes the status: both are awaited, or the condition read
        # may be the one from before the namespace went.)
        wait_for(
            lambda: port(kept) == "9600" and f"namespace {doomed} has been refused" in collectors()["message"],
            f"a change in {kept} applied after {doomed} went, its collector unchecked",
            timeout=180,
        )
        assert collectors()["reason"] == "NotChecked", collectors()
        assert ready(kept), condition(kept)
        assert process.poll() is None, log.read_text(errors="replace")[-4000:]
        text = log.read_text(errors="replace")
        refused = [x for x in refused_lines(text) if doomed not in x]
        assert not refused, "\n".join(refused[:20])

        # Created again, the namespace has no Role until the chart's objects are applied again (helm upgrade), and
        # no event can be posted there: the status says why nothing happens.
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=doomed)))
        apps.create_namespaced_deployment(doomed, deployment("chat", "chat"))
        custom.create_namespaced_custom_object(GROUP, VERSION, doomed, PLURAL, telemetry("chat", "chat"))
        refusal = wait_for(lambda: condition(doomed).get("reason") == "ApiError" and condition(doomed), "refusal shown")
        assert refusal["status"] == "False" and "forbidden" in refusal["message"], refusal
        for doc in docs:
            if doc["kind"] in ("Role", "RoleBinding") and doc["metadata"].get("namespace") == doomed:
                apply(api, doc, doomed)
        wait_for(lambda: ready(doomed), f"Ready in {doomed} once its Role is back")
    finally:
        try:
            # Both resources go while the operator still runs: their finalizers need it, and a namespace holding one
            # would never finish deleting (nor would the CRD, for the tests that come after).
            for namespace in (kept, doomed):
                try:
                    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                wait_for(
                    lambda namespace=namespace: (
                        not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
                    ),
                    f"the resource in {namespace} gone",
                )
        finally:
            stop(process)
        uninstall(api, docs, (kept, system) if gone(doomed) else (kept, system, doomed))
        custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
