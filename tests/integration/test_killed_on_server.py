"""The operator SIGKILLed in the middle of a pass (a pod lost with its node, an OOM kill), then started again, on a real
API server, as the chart runs it: mid-injection of a resource's many workloads, and mid-way through a deletion's
clean-up. The new process finishes what the killed one began: every workload injected once (one rollout each, none
put back or doubled), each child made once and owned by the resource alone, the status and the finalizer right, no
event repeated; and the deletion's clean-up done, the finalizer released."""

from __future__ import annotations

import collections
import pathlib
import signal
import subprocess
from typing import Any

import pytest
from clusterkit import deployment, install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL
#: Enough workloads that one pass over them takes a while (about 1.5 s on two cores), so the kill comes inside it.
WORKLOADS = 150


def _errors(log: pathlib.Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "[ERROR" in line or "Traceback" in line]


def test_a_restart_after_a_kill_mid_pass_finishes_the_pass_and_the_deletion(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    system, namespace = unique("llmt-kill-system"), unique("llmt-kill")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    name = "many"
    for i in range(WORKLOADS):
        apps.create_namespaced_deployment(namespace, deployment(f"chat-{i:03d}", name))

    def workloads() -> list[Any]:
        return list(apps.list_namespaced_deployment(namespace, label_selector=f"llm={name}").items)

    def injected() -> int:
        return sum(c.ANNOTATION_INJECTED in (d.metadata.annotations or {}) for d in workloads())

    def metrics_services() -> list[Any]:
        return [s for s in core.list_namespaced_service(namespace).items if s.metadata.name.endswith("-llm-metrics")]

    def resource() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def conditions() -> dict[str, str]:
        status = (resource() or {}).get("status") or {}
        return {cond["type"]: cond["status"] for cond in status.get("conditions") or []}

    def started(tag: str) -> tuple[subprocess.Popen[bytes], pathlib.Path]:
        (tmp_path / tag).mkdir()
        process, log, _, _ = start_chart_operator(api, kubeconfig, docs, system, tmp_path / tag)
        wait_for(lambda: "watching all namespaces" in log.read_text(errors="replace"), f"the {tag} operator started")
        return process, log

    def killed(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    try:
        first, _ = started("first")
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, telemetry(name, name))
            wait_for(lambda: injected() >= WORKLOADS // 10, "a tenth of the workloads injected", interval=0.02)
        finally:
            killed(first)
        # Killed inside the pass: its status never written.
        assert conditions().get(c.CONDITION_READY) != "True", resource()

        second, second_log = started("second")
        try:
            wait_for(lambda: conditions().get(c.CONDITION_READY) == "True", "Ready after the restart", timeout=120)
            owner = resource()
            assert owner is not None
            uid = owner["metadata"]["uid"]
            assert owner["metadata"]["finalizers"] == [c.FINALIZER]
            assert owner["status"]["observedGeneration"] == owner["metadata"]["generation"]
            assert len(owner["status"]["targets"]) == WORKLOADS
            assert set(conditions().values()) <= {"True", "False"}, owner["status"]
            assert all(
                conditions()[kind] == "True"
                for kind in (c.CONDITION_INJECTED, c.CONDITION_METRICS, c.CONDITION_ALERTS, c.CONDITION_DASHBOARD)
            ), owner["status"]
            # Injected once: one patch of the pod template each (generation 1 at creation), no name twice in a
            # container's environment or ports.
            generations = collections.Counter(d.metadata.generation for d in workloads())
            assert generations == {2: WORKLOADS}, generations
            for workload in workloads():
                container = workload.spec.template.spec.containers[0]
                env = [e.name for e in container.env or []]
                assert len(env) == len(set(env)), (workload.metadata.name, env)
                ports = [p.name for p in container.ports or []]
                assert ports.count(c.METRICS_PORT_NAME) == 1, (workload.metadata.name, ports)
            # Each child once, owned by the resource alone.
            services = metrics_services()
            assert len(services) == WORKLOADS
            for service in services:
                refs = [(ref.kind, ref.uid, ref.controller) for ref in service.metadata.owner_references or []]
                assert refs == [("LLMTelemetry", uid, True)], (service.metadata.name, refs)
            for plural in ("servicemonitors", "prometheusrules"):
                items = custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, plural)["items"]
                assert [[ref["uid"] for ref in i["metadata"]["ownerReferences"]] for i in items] == [[uid]], plural
            dashboards = [m for m in core.list_namespaced_config_map(namespace).items if m.metadata.owner_references]
            assert [[ref.uid for ref in m.metadata.owner_references] for m in dashboards] == [[uid]]
            # No event twice (the collectors' absence, said by the first process, is not said again by the second).
            events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
            reasons = collections.Counter(e.reason for e in events)
            assert all(e.count in (None, 1) for e in events) and max(reasons.values()) == 1, reasons

            # The deletion's clean-up killed once under way: the resource stays, held by its finalizer.
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            wait_for(lambda: injected() < WORKLOADS, "an injection removed", interval=0.02)
        finally:
            killed(second)
        assert _errors(second_log) == []
        remaining = injected()
        assert remaining > 0 and (resource() or {}).get("metadata", {}).get("finalizers") == [c.FINALIZER], remaining

        third, third_log = started("third")
        try:
            wait_for(lambda: resource() is None, "the resource deleted after the restart", timeout=120)
            assert injected() == 0
            for workload in workloads():
                assert workload.spec.template.metadata.labels == {"app": workload.metadata.name, "llm": name}
                assert not [e.name for e in workload.spec.template.spec.containers[0].env or []]
            wait_for(lambda: not metrics_services(), "the metrics Services gone")
        finally:
            stop(third)
        assert _errors(third_log) == []
    finally:
        uninstall(api, docs, (namespace, system))
