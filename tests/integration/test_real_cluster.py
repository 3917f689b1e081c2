"""The operator against a real API server, as the chart runs it: the chart's CRDs and RBAC installed, the
operator running as the chart's ServiceAccount (a token from the TokenRequest API, the CA inline in its
kubeconfig), and what a user sees asserted through the API: children, injection, rollouts, repairs, clean-up,
conflicts, and never a 403."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from clusterkit import (
    deployment,
    install,
    refused_lines,
    section,
    set_name_limit,
    sh_blocks,
    start_chart_operator,
    stop,
    telemetry,
    tool_binary,
    uninstall,
    unique,
    wait_for,
)

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import kube
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import LLM_TELEMETRY_OPERATOR_PEERING, Timers
from llm_telemetry_operator.spec import parse_spec

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "llmtelemetry.dev", "v1alpha1", "llmtelemetries"
MONITORING = "monitoring.coreos.com"
#: The peering lifetime of this module's replicas (the chart's peering.lifetimeSeconds; 60 s by default): how long a
#: standby waits to take over from a frozen replica, and how long that one may stand by once running again.
PEERING_LIFETIME = "20"
#: The resync interval of this module's operators (``--resync-seconds``): each resource's resync comes 5 to 15 s
#: after its last pass (see schedule.py).
RESYNC_SECONDS = 10


@dataclasses.dataclass
class Operator:
    process: subprocess.Popen[bytes]
    log: pathlib.Path
    namespace: str
    #: The chart's ServiceAccount credentials, and the environment the chart's Deployment sets.
    kubeconfig: pathlib.Path
    env: dict[str, str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def assert_clean(self) -> None:
        """Alive, and never refused by the API server: the chart's RBAC covers everything it did."""
        text = self.output()
        assert self.process.poll() is None, f"operator exited ({self.process.returncode}):\n{text[-4000:]}"
        refused = refused_lines(text)
        assert not refused, "\n".join(refused[:20])


@pytest.fixture(scope="module")
def operator(api: Any, kubeconfig: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The chart installed (release namespace of its own), and the operator started as its ServiceAccount with the
    environment the chart's Deployment sets; a fresh namespace for the tests' workloads."""
    from kubernetes import client

    system = unique("llmt-it-system")
    docs = install(api, system)
    apps = unique("llmt-it")
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=apps)))
    workdir = tmp_path_factory.mktemp("operator")
    flags = ("--resync-seconds", str(RESYNC_SECONDS), "--peering-lifetime-seconds", PEERING_LIFETIME)
    process, log, operator_kubeconfig, env = start_chart_operator(api, kubeconfig, docs, system, workdir, *flags)
    running = Operator(process, log, apps, operator_kubeconfig, env)
    try:
        yield running
    finally:
        try:
            # The resources go while the operator still runs (their finalizers need it), then the namespaces.
            custom = client.CustomObjectsApi(api)
            for item in custom.list_namespaced_custom_object(GROUP, VERSION, apps, PLURAL)["items"]:
                custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, item["metadata"]["name"])
            wait_for(
                lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, apps, PLURAL)["items"],
                "LLMTelemetry resources deleted",
            )
        finally:
            stop(process)
        uninstall(api, docs, (apps, system))


def _absent_as_none(read: Any, *args: Any) -> Any:
    """``read(*args)``, or None when the API server answers 404."""
    from kubernetes.client.exceptions import ApiException

    try:
        return read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Cluster:
    """The test's hands and eyes, as the cluster admin."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def create(self, obj: dict[str, Any]) -> None:
        if obj["kind"] == "Deployment":
            self.apps.create_namespaced_deployment(self.namespace, obj)
        elif obj["kind"] == "StatefulSet":
            self.apps.create_namespaced_stateful_set(self.namespace, obj)
        else:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, obj)

    def llmt(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return result

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for cond in (self.llmt(name).get("status") or {}).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return {}

    def reported(self, name: str, type_: str, reason: str) -> dict[str, Any]:
        """The condition ``type_`` of ``name`` once it has ``reason``."""
        return wait_for(
            lambda: self.condition(name, type_).get("reason") == reason and self.condition(name, type_),
            f"{name}: {type_} {reason}",
        )

    def ready(self, name: str) -> dict[str, Any]:
        return wait_for(
            lambda: self.condition(name, "Ready").get("status") == "True" and self.llmt(name), f"{name} Ready"
        )

    def deployment(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.apps.api_client.sanitize_for_serialization(
            self.apps.read_namespaced_deployment(name, self.namespace)
        )
        return result

    def env(self, name: str) -> dict[str, Any]:
        container = self.deployment(name)["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}

    def config_hash(self, name: str) -> str | None:
        annotations = self.deployment(name)["spec"]["template"]["metadata"].get("annotations") or {}
        return annotations.get(c.ANNOTATION_CONFIG_HASH)

    def monitoring(self, plural: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _absent_as_none(
            self.custom.get_namespaced_custom_object, MONITORING, "v1", self.namespace, plural, name
        )
        return found

    def configmap(self, name: str) -> Any:
        return _absent_as_none(self.core.read_namespaced_config_map, name, self.namespace)

    def service(self, name: str) -> Any:
        return _absent_as_none(self.core.read_namespaced_service, name, self.namespace)

    def events(self, involved: str, reason: str) -> list[str]:
        found = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={involved}")
        return [e.message for e in found.items if e.reason == reason]


@pytest.fixture
def cluster(api: Any, operator: Operator) -> Iterator[Cluster]:
    yield Cluster(api, operator.namespace)
    operator.assert_clean()


def test_resource_is_wired_as_a_user_sees_it(cluster: Cluster, operator: Operator) -> None:
    cluster.create(deployment("chat", "chat"))
    cluster.create(telemetry("chat", "chat"))
    owner = cluster.ready("chat")
    # The operator's text log names the resource each pass is about, whichever ran it: kopf's handler ("[ns/name]"
    # before the message) or the operator's own schedule ("ns/name: " in it).
    named = re.compile(rf"(\[{cluster.namespace}/chat\] |{cluster.namespace}/chat: )reconciled \(")
    wait_for(lambda: named.search(operator.output()), "a log line naming the resource")
    passes = [line for line in operator.output().splitlines() if "reconciled (" in line]
    assert all(re.search(r"(\[[^\]/]+/[^\]]+\] |\S+/\S+: )reconciled \(", line) for line in passes), passes
    uid = owner["metadata"]["uid"]
    assert owner["status"]["targets"] == ["Deployment/chat"]
    assert c.FINALIZER in owner["metadata"]["finalizers"]

    # The pod template: the middleware's settings, the metrics port, the config hash.
    env = cluster.env("chat")
    assert env["LLM_TELEMETRY_METRICS_PORT"] == "9464"
    assert env["OTEL_SERVICE_NAME"] == "chat"
    ports = cluster.deployment("chat")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": c.METRICS_PORT_NAME, "containerPort": 9464, "protocol": "TCP"} in ports
    assert cluster.config_hash("chat")
    # managedFields name the operator as the writer of the injected part, the pod template's label with it.
    managed = cluster.deployment("chat")["metadata"]["managedFields"]
    managers = {entry["manager"] for entry in managed}
    assert kube.FIELD_MANAGER in managers, managers
    assert cluster.deployment("chat")["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] == (
        "chat-llm-metrics"
    )
    owners = [entry["manager"] for entry in managed if f"f:{c.LABEL_METRICS_SERVICE}" in json.dumps(entry)]
    assert owners == [kube.FIELD_MANAGER], owners

    # No Jaeger or Loki in this cluster: no exporter that would fail in every pod, and the user is told.
    assert (env["OTEL_TRACES_EXPORTER"], env["OTEL_LOGS_EXPORTER"]) == ("none", "none")
    collectors = cluster.condition("chat", c.CONDITION_COLLECTORS)
    assert (collectors["status"], collectors["reason"]) == ("False", "CollectorNotFound")
    assert "Service jaeger in" in collectors["message"] and "loki-gateway" in collectors["message"]
    assert wait_for(lambda: cluster.events("chat", "CollectorNotFound"), "CollectorNotFound event")

    # Children, owned by the resource (the API server accepted every one of them).
    service = cluster.service("chat-llm-metrics")
    assert service.spec.selector == {c.LABEL_METRICS_SERVICE: "chat-llm-metrics"}
    assert service.spec.ports[0].port == 9464
    assert service.spec.cluster_ip == "None"  # headless: no Service IP per target
    monitor = cluster.monitoring("servicemonitors", "chat-llm-telemetry")
    rules = cluster.monitoring("prometheusrules", "chat-llm-telemetry")
    dashboard = cluster.configmap("chat-llm-dashboard")
    assert monitor and rules and dashboard
    for refs in (
        service.metadata.owner_references,
        dashboard.metadata.owner_references,
    ):
        assert [(ref.kind, ref.uid) for ref in refs] == [("LLMTelemetry", uid)]
    for obj in (monitor, rules):
        assert [(ref["kind"], ref["uid"]) for ref in obj["metadata"]["ownerReferences"]] == [("LLMTelemetry", uid)]
    assert json.loads(next(iter(dashboard.data.values())))["panels"]


def test_config_change_rolls_the_pods(cluster: Cluster) -> None:
    from kubernetes import client

    cluster.create(deployment("roll", "roll"))
    cluster.create(telemetry("roll", "roll"))
    cluster.ready("roll")
    before = cluster.config_hash("roll")

    def rolled_out_hashes() -> set[str]:
        """The config hashes of the pod templates the Deployment controller made ReplicaSets for."""
        found = client.AppsV1Api(cluster.apps.api_client).list_namespaced_replica_set(
            cluster.namespace, label_selector="app=roll"
        )
        return {(rs.spec.template.metadata.annotations or {}).get(c.ANNOTATION_CONFIG_HASH) for rs in found.items}

    wait_for(lambda: before in rolled_out_hashes(), "a ReplicaSet for the injected pod template")
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "roll", {"spec": {"metrics": {"port": 9500}}}
    )
    wait_for(lambda: cluster.env("roll")["LLM_TELEMETRY_METRICS_PORT"] == "9500", "new port injected")
    after = cluster.config_hash("roll")
    assert after not in (None, before)
    # A new pod template: the Deployment controller rolls out a ReplicaSet for it.
    wait_for(lambda: after in rolled_out_hashes(), "a ReplicaSet for the new pod template")
    wait_for(lambda: cluster.service("roll-llm-metrics").spec.ports[0].port == 9500, "Service follows")


def test_hand_edits_are_repaired(cluster: Cluster) -> None:
    cluster.create(deployment("repair", "repair"))
    cluster.create(telemetry("repair", "repair"))
    cluster.ready("repair")
    monitor = cluster.monitoring("servicemonitors", "repair-llm-telemetry")
    assert monitor is not None
    cluster.core.delete_namespaced_service("repair-llm-metrics", cluster.namespace)
    cluster.custom.patch_namespaced_custom_object(
        MONITORING, "v1", cluster.namespace, "servicemonitors", "repair-llm-telemetry", {"spec": {"endpoints": []}}
    )
    container = cluster.deployment("repair")["spec"]["template"]["spec"]["containers"][0]
    cluster.apps.patch_namespaced_deployment(
        "repair",
        cluster.namespace,
        [{"op": "replace", "path": "/spec/template/spec/containers/0/env", "value": [{"name": "MINE", "value": "1"}]}],
    )
    assert "LLM_TELEMETRY_METRICS_PORT" in {e["name"] for e in container["env"]}
    # The dashboard as an earlier version keyed it (by the resource's name), beside a spoilt current one: Grafana's
    # sidecar would show both files. Only the current key may stay, with its content.
    (key,) = cluster.configmap("repair-llm-dashboard").data
    assert key == f"{r.dashboard_uid({'metadata': {'namespace': cluster.namespace, 'name': 'repair'}})}.json"
    cluster.core.patch_namespaced_config_map(
        "repair-llm-dashboard", cluster.namespace, {"data": {"repair.json": "{}", key: "{}"}}
    )
    wait_for(lambda: cluster.service("repair-llm-metrics"), "deleted Service recreated")
    dashboard = wait_for(
        lambda: (
            (cm := cluster.configmap("repair-llm-dashboard")) and list(cm.data) == [key] and cm.data[key] != "{}" and cm
        ),
        "dashboard ConfigMap repaired, the old key gone",
    )
    assert json.loads(dashboard.data[key])["panels"]
    wait_for(
        lambda: (
            cluster.monitoring("servicemonitors", "repair-llm-telemetry")["spec"]["endpoints"]
            == monitor["spec"]["endpoints"]
        ),
        "ServiceMonitor repaired",
    )
    env = wait_for(
        lambda: "LLM_TELEMETRY_METRICS_PORT" in cluster.env("repair") and cluster.env("repair"), "re-injected"
    )
    assert env["MINE"] == "1"  # the user's own variable stays


def _collected_kinds(cluster: Cluster) -> None:
    """Once the garbage collector handles ServiceMonitors and PrometheusRules: an owner's deletion removes a dependent
    of each kind. It finds the kinds of CRDs created after it started at its next discovery (every 30 s), and until
    then knows no object of theirs: an orphaning deletion left their owner references on them, and a cascading one
    left them until then. (On a fresh cluster the module installs the Prometheus Operator's CRDs moments before.)"""
    from kubernetes import client

    owner = cluster.core.create_namespaced_config_map(
        cluster.namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=unique("gc-probe")))
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid}
    specs = {"servicemonitors": {"selector": {}, "endpoints": []}, "prometheusrules": {"groups": []}}
    kinds = {"servicemonitors": "ServiceMonitor", "prometheusrules": "PrometheusRule"}
    for plural, spec in specs.items():
        probe = {"apiVersion": f"{MONITORING}/v1", "kind": kinds[plural], "spec": spec,
                 "metadata": {"name": owner.metadata.name, "ownerReferences": [ref]}}  # fmt: skip
        cluster.custom.create_namespaced_custom_object(MONITORING, "v1", cluster.namespace, plural, probe)
    cluster.core.delete_namespaced_config_map(owner.metadata.name, cluster.namespace)
    wait_for(
        lambda: all(cluster.monitoring(plural, owner.metadata.name) is None for plural in specs),
        "the garbage collector handling ServiceMonitors and PrometheusRules",
        timeout=120,
    )


def _gone(cluster: Cluster, name: str) -> bool:
    """Whether the LLMTelemetry ``name`` is gone from the API server."""
    from kubernetes.client.exceptions import ApiException

    try:
        cluster.llmt(name)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_delete_removes_injection_and_children(cluster: Cluster) -> None:
    cluster.create(deployment("gone", "gone"))
    original = cluster.deployment("gone")["spec"]["template"]["spec"]["containers"][0]
    cluster.create(telemetry("gone", "gone"))
    cluster.ready("gone")
    assert c.LABEL_METRICS_SERVICE in cluster.deployment("gone")["spec"]["template"]["metadata"]["labels"]
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "gone")
    wait_for(lambda: _gone(cluster, "gone"), "LLMTelemetry deleted (finalizer released)")
    wait_for(
        lambda: (
            cluster.service("gone-llm-metrics") is None
            and cluster.monitoring("servicemonitors", "gone-llm-telemetry") is None
            and cluster.monitoring("prometheusrules", "gone-llm-telemetry") is None
            and cluster.configmap("gone-llm-dashboard") is None
        ),
        "children deleted",
    )
    restored = cluster.deployment("gone")
    assert restored["spec"]["template"]["spec"]["containers"][0].get("env") == original.get("env")
    assert restored["spec"]["template"]["metadata"]["labels"] == {"app": "gone", "llm": "gone"}
    assert c.ANNOTATION_INJECTED not in (restored["metadata"].get("annotations") or {})
    assert c.ANNOTATION_CONFIG_HASH not in (restored["spec"]["template"]["metadata"].get("annotations") or {})


def test_children_are_garbage_collected_with_their_owner(cluster: Cluster) -> None:
    """The ownerReferences are real: with the finalizer out of the way, the API server's garbage collector alone
    removes the children (as it would after the operator was uninstalled)."""
    _collected_kinds(cluster)
    cluster.create(deployment("orphan", "orphan"))
    cluster.create(telemetry("orphan", "orphan"))
    cluster.ready("orphan")
    # Remove the finalizer and delete at once: the operator's delete handler never runs.
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "orphan", {"metadata": {"finalizers": None}}
    )
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "orphan")
    wait_for(
        lambda: (
            cluster.service("orphan-llm-metrics") is None
            and cluster.monitoring("servicemonitors", "orphan-llm-telemetry") is None
            and cluster.configmap("orphan-llm-dashboard") is None
        ),
        "children garbage-collected",
    )


def test_an_orphaning_delete_keeps_every_child(cluster: Cluster) -> None:
    """``kubectl delete --cascade=orphan``: the garbage collector takes the owner references off the children and
    they stay, all of them (the operator's clean-up deleted those it reached first); the injection is removed."""
    _collected_kinds(cluster)
    cluster.create(deployment("kept", "kept"))
    cluster.create(telemetry("kept", "kept"))
    cluster.ready("kept")
    children = {
        "Service": lambda: cluster.service("kept-llm-metrics"),
        "ServiceMonitor": lambda: cluster.monitoring("servicemonitors", "kept-llm-telemetry"),
        "PrometheusRule": lambda: cluster.monitoring("prometheusrules", "kept-llm-telemetry"),
        "dashboard ConfigMap": lambda: cluster.configmap("kept-llm-dashboard"),
    }
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "kept", propagation_policy="Orphan"
    )
    wait_for(lambda: _gone(cluster, "kept"), "LLMTelemetry deleted (both finalizers released)")
    wait_for(lambda: r.injected_record(cluster.deployment("kept")) is None, "injection removed")
    for kind, read in children.items():
        child = read()
        assert child is not None, f"the {kind} was deleted"
        meta = cluster.apps.api_client.sanitize_for_serialization(child)["metadata"]
        assert not meta.get("ownerReferences"), meta


def test_conflict_is_visible_and_not_duplicated(cluster: Cluster) -> None:
    cluster.create(deployment("shared", "shared"))
    cluster.create(telemetry("shared-a", "shared"))
    cluster.ready("shared-a")
    time.sleep(1.1)  # creationTimestamp has one-second resolution: make the second one younger
    cluster.create(telemetry("shared-b", "shared"))
    ready = cluster.reported("shared-b", "Ready", "Conflict")
    assert ready["status"] == "False" and "shared-a" in ready["message"]
    events = wait_for(lambda: cluster.events("shared-b", "Conflict"), "Conflict event on the younger resource")
    assert "LLMTelemetry shared-a, which wins it" in events[0]
    assert cluster.condition("shared-a", "Ready")["status"] == "True"
    # One injection, one scrape, one set of alerts, one dashboard.
    record = json.loads(cluster.deployment("shared")["metadata"]["annotations"][c.ANNOTATION_INJECTED])
    assert record["owner"] == "shared-a"
    assert cluster.monitoring("servicemonitors", "shared-b-llm-telemetry") is None
    assert cluster.monitoring("prometheusrules", "shared-b-llm-telemetry") is None
    assert cluster.configmap("shared-b-llm-dashboard") is None
    assert cluster.monitoring("servicemonitors", "shared-a-llm-telemetry") is not None

    # The winner deleted: shared-b takes the workload over in one step. The API server counts changes of the
    # Deployment's spec in its generation: one at most (none when both inject the same), where removing the
    # injection and injecting again made two rollouts; and the metrics Service is handed over, not recreated.
    generation = cluster.deployment("shared")["metadata"]["generation"]
    service_uid = cluster.service("shared-llm-metrics").metadata.uid
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "shared-a")
    cluster.reported("shared-b", "Ready", "Ready")

    def holder() -> str:
        return str(json.loads(cluster.deployment("shared")["metadata"]["annotations"][c.ANNOTATION_INJECTED])["owner"])

    wait_for(lambda: holder() == "shared-b", "shared-b holds the workload")
    assert cluster.deployment("shared")["metadata"]["generation"] <= generation + 1
    service = cluster.service("shared-llm-metrics")
    assert service.metadata.uid == service_uid
    assert service.metadata.labels[c.LABEL_OWNER] == "shared-b"
    assert [ref.name for ref in service.metadata.owner_references] == ["shared-b"]
    wait_for(lambda: cluster.monitoring("servicemonitors", "shared-b-llm-telemetry") is not None, "shared-b scrapes")


def test_collector_installed_later_is_injected(cluster: Cluster, operator: Operator) -> None:
    """The operator watches the collector Service it found missing: once created, the resource gets a pass at once
    (as the chart's ServiceAccount, allowed to watch it), not at its resync."""
    from kubernetes import client

    endpoint = f"http://collector.{cluster.namespace}.svc:4318"
    cluster.create(deployment("late", "late"))
    cluster.create(telemetry("late", "late", tracing={"endpoint": endpoint}, logs={"enabled": False}))
    cluster.ready("late")
    assert cluster.env("late")["OTEL_TRACES_EXPORTER"] == "none"
    assert cluster.condition("late", c.CONDITION_COLLECTORS)["reason"] == "CollectorNotFound"
    cluster.core.create_namespaced_service(
        cluster.namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="collector"),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=4318)], selector={"app": "collector"}),
        ),
    )
    # A pass patches the Deployment before it writes the status, so the condition is awaited too, not read the
    # moment the exporter shows.
    traces = endpoint + "/v1/traces"
    wait_for(lambda: cluster.env("late").get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == traces, "exporter injected", 60)
    wait_for(
        lambda: cluster.condition("late", c.CONDITION_COLLECTORS)["reason"] == "CollectorsFound",
        "CollectorsAvailable reason CollectorsFound",
        30,
    )
    # By a pass the Service's watch event started (the fixture's resync, 10 s, would have come too, later). The pass
    # logs its line once it has written the status: waited for, too.
    line = f"{cluster.namespace}/late: reconciled (collector): ready"
    wait_for(lambda: line in operator.output(), "the pass the Service's event started", 5)
    operator.assert_clean()


def test_collector_without_the_endpoints_port_is_reported_until_it_has_it(cluster: Cluster, operator: Operator) -> None:
    """OTLP/gRPC at :4317 and a collector Service that serves only OTLP/HTTP's 4318: no exporter that would fail in
    every pod, and the condition says which ports the Service has; once it serves 4317, the exporter goes in."""
    from kubernetes import client

    endpoint = f"http://grpc-collector.{cluster.namespace}.svc:4317"
    cluster.core.create_namespaced_service(
        cluster.namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="grpc-collector"),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(name="http", port=4318)], selector={"app": "c"}),
        ),
    )
    cluster.create(deployment("grpc", "grpc"))
    cluster.create(
        telemetry("grpc", "grpc", tracing={"endpoint": endpoint, "protocol": "grpc"}, logs={"enabled": False})
    )
    cluster.ready("grpc")
    assert cluster.env("grpc")["OTEL_TRACES_EXPORTER"] == "none"
    collectors = cluster.condition("grpc", c.CONDITION_COLLECTORS)
    assert collectors["reason"] == "CollectorNotFound" and "has no port 4317 (it serves 4318)" in collectors["message"]
    ports = [{"name": "http", "port": 4318}, {"name": "grpc", "port": 4317}]
    cluster.core.patch_namespaced_service("grpc-collector", cluster.namespace, {"spec": {"ports": ports}})
    # The Service's watch event starts a pass, which reads it again (its lookup is otherwise kept 30 s).
    wait_for(lambda: cluster.env("grpc").get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == endpoint, "exporter injected", 30)
    wait_for(lambda: f"{cluster.namespace}/grpc: reconciled (collector)" in operator.output(), "a collector pass")
    operator.assert_clean()


async def test_inline_client_certificate_kubeconfig(kubeconfig: pathlib.Path) -> None:
    """The admin kubeconfig carries CA, certificate and key inline (base64 *-data): the client uses it as is."""
    client = kube.KubeClient(kube.load_configuration(str(kubeconfig)))
    try:
        services = await client.list(kube.SERVICES, "default")
    finally:
        await client.close()
    assert "kubernetes" in {s["metadata"]["name"] for s in services}


def test_the_replica_goes_by_its_pod_name_in_the_peering_object(operator: Operator, cluster: Cluster) -> None:
    """The chart's POD_ID (the pod's name) is what kopf writes in the ClusterKopfPeering for this replica, so no
    lookup of the container's user is made (an assigned UID has no entry to find)."""
    name = operator.env[LLM_TELEMETRY_OPERATOR_PEERING]
    peering = wait_for(
        lambda: (cluster.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
                 .get("status") or None),
        "the operator in its peering object",
    )  # fmt: skip
    assert list(peering) == [operator.env["POD_ID"]]
    # With the lifetime it was given, which the other replicas go by.
    assert peering[operator.env["POD_ID"]]["lifetime"] == int(PEERING_LIFETIME)


def _other_replica(operator: Operator, pod_id: str, priority: int, log: pathlib.Path) -> subprocess.Popen[bytes]:
    """Another replica of ``operator`` (same credentials and settings), named ``pod_id`` with peering ``priority``,
    its output in ``log``; resyncs every 10 s, and has the peering lifetime of the first."""
    env = {**os.environ, **operator.env, "POD_ID": pod_id, "LLM_TELEMETRY_OPERATOR_PRIORITY": str(priority)}
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "llm_telemetry_operator", "--kubeconfig", str(operator.kubeconfig),
             "--log-format", "text", "--metrics-port", "0", "--health", "", "--resync-seconds", str(RESYNC_SECONDS),
             "--peering-lifetime-seconds", PEERING_LIFETIME],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _metrics_port(cluster: Cluster, workload: str) -> int:
    """The metrics port injected into Deployment ``workload``."""
    container = cluster.deployment(workload)["spec"]["template"]["spec"]["containers"][0]
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == c.METRICS_PORT_NAME))


def _priority(cluster: Cluster, peering: str, pod_id: str) -> int:
    """The peering priority of replica ``pod_id``, once its entry is in the peering object: a replica frozen past
    its keepalive had its entry removed by the others, and writes it again at its next keepalive."""

    def entry() -> Any:
        status = cluster.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)["status"]
        return (status or {}).get(pod_id)

    return int(wait_for(entry, f"the entry of {pod_id} in the peering object", timeout=120)["priority"])


def test_a_standby_replica_runs_no_pass_of_its_own(
    operator: Operator, cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """A second replica with a higher priority takes over: the first stands by, with its resyncs and retries and
    the passes its watches start, not only kopf's handlers. A spec change is applied once, by the active replica,
    and the standby one (which kopf keeps from seeing the change) does not put the old spec back. Once the second
    replica stops, the first is the active one again and acts on changes."""
    name = operator.env[LLM_TELEMETRY_OPERATOR_PEERING]
    cluster.create(deployment("standby", "standby"))
    cluster.create(telemetry("standby", "standby"))
    cluster.ready("standby")
    first = _priority(cluster, name, operator.env["POD_ID"])
    log = tmp_path / "second.log"

    def port() -> int:
        return _metrics_port(cluster, "standby")

    def set_port(value: int) -> None:
        patch = {"spec": {"metrics": {"port": value}}}
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "standby", patch)

    # (Counted: a test before this one may have had the replica stand by and come back already.)
    stood, back = operator.output().count("this one stands by"), operator.output().count("this replica is active again")
    second = _other_replica(operator, "llm-telemetry-second-replica", first + 1, log)
    try:
        wait_for(lambda: operator.output().count("this one stands by") > stood, "the first replica standing by")
        standing = time.monotonic()
        set_port(9500)
        wait_for(lambda: port() == 9500, "the active replica applying the change")
        generation = cluster.deployment("standby")["metadata"]["generation"]
        # A replica standing by logs nothing of the passes it does not run: the window covers the latest its resync
        # can come, one and a half intervals after its last pass, which came before it stood by (see schedule.py).
        # A standby replica acting would put the spec it knew back, a rollout.
        time.sleep(max(0.0, standing + 1.5 * RESYNC_SECONDS + 3 - time.monotonic()))
        assert (cluster.deployment("standby")["metadata"]["generation"], port()) == (generation, 9500)
    finally:
        second.terminate()
        second.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert not refused_lines(text), text[-3000:]
    wait_for(lambda: operator.output().count("this replica is active again") > back, "the first replica active again")
    # It read the resources again: its first passes apply the spec as it is now, not the one it knew when it paused.
    since = operator.output().rindex("this replica is active again")
    wait_for(
        lambda: f"{cluster.namespace}/standby: reconciled (resume)" in operator.output()[since:],
        "the first replica's pass on becoming active again",
    )
    assert (cluster.deployment("standby")["metadata"]["generation"], port()) == (generation, 9500)
    set_port(9464)
    wait_for(lambda: port() == 9464, "the first replica applying a change again")


def test_a_replica_frozen_past_its_keepalive_does_not_put_an_old_spec_back(
    operator: Operator, cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """The active replica's process stops running (SIGSTOP here; a paused VM, a stalled node) past its peering
    keepalive: the standby takes over, and the spec changes meanwhile. Coming back, the frozen replica acted at once
    on what it knew before the freeze (its resync, the watch events queued meanwhile): the old metrics port put
    back, and the other replica put the new one back again, three rollouts where one was due. It now stands by until
    it has read the peering object, and, active again, the resources.

    What this proves (each defence taken out alone, and together, on this API server): coming back, the replica
    stands by on any one of three signs, its event loop stalled past frozen_seconds, its peering lease run out, or
    its own entry missing from the peering object. With all three gone it puts the old spec back at once (the passes
    of the Deployment's queued events) and never stands by, and the wait for it fails; with any one left, the old
    spec stays out. The read of the resources once active again is proved by tests/operator/test_standby.py: here
    kopf's watch, open through the freeze, has delivered the new spec by then."""
    name = operator.env[LLM_TELEMETRY_OPERATOR_PEERING]
    cluster.create(deployment("frozen", "frozen"))
    cluster.create(telemetry("frozen", "frozen"))
    cluster.ready("frozen")
    first = _priority(cluster, name, operator.env["POD_ID"])
    log = tmp_path / "standby.log"

    def port() -> int:
        return _metrics_port(cluster, "frozen")

    standby = _other_replica(operator, "llm-telemetry-standby-replica", first - 1, log)
    active_again = operator.output().count("this replica is active again")
    try:
        wait_for(lambda: "this one stands by" in log.read_text(errors="replace"), "the second replica standing by")
        os.kill(operator.process.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            wait_for(
                lambda: "this replica is active again" in log.read_text(errors="replace"),
                "the second replica taking over once the first one's keepalive ran out",
                timeout=150,
            )
            patch = {"spec": {"metrics": {"port": 9502}}}
            cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "frozen", patch)
            wait_for(lambda: port() == 9502, "the active replica applying the change")
            generation = cluster.deployment("frozen")["metadata"]["generation"]
            # Frozen past its resync (10 s) at least, however soon the other replica took over (its keepalive may
            # have been most of a lifetime old): a resync with the spec it knew is then due the moment it runs again.
            time.sleep(max(0.0, 12 - (time.monotonic() - frozen)))
        finally:
            os.kill(operator.process.pid, signal.SIGCONT)
        # Running again, it stands by (frozen past half its peering lifetime, or its entry past its lifetime: the
        # freeze can be the shorter, as the keepalive before it may be up to a lifetime old) until the peering object
        # shows its own entry alive (kopf, reading the events queued over the freeze, takes its renewed entry out
        # again until its next keepalive), then reads the resources again and acts, and the other replica stands by.
        wait_for(
            lambda: operator.output().count("this replica is active again") > active_again,
            "the first replica active again",
            timeout=120,
        )
        # Every pass it runs from here on knows the resource as it is now: the one its resume starts, those its
        # watches start for the events queued over the freeze, and its resync, which comes last (5 to 15 s after the
        # resume pass: see schedule.py). Its resync logged after it became active again proves all of them ran. The
        # other replica stands by, and knows the new spec anyway.
        back = operator.output().rindex("this replica is active again")
        wait_for(
            lambda: f"{cluster.namespace}/frozen: reconciled (resync)" in operator.output()[back:],
            "a resync of the first replica's since it became active again",
            timeout=90,
        )
        seen = (cluster.deployment("frozen")["metadata"]["generation"], port())
        standby_log = log.read_text(errors="replace")
        logs = f"first replica:\n{operator.output()[-6000:]}\nstandby replica:\n{standby_log[-6000:]}"
        assert seen == (generation, 9502), logs
    finally:
        stop(standby)
    _priority(cluster, name, operator.env["POD_ID"])  # the tests after this one find the replica as they expect


def test_run_by_hand_without_its_peering_object_says_so(operator: Operator, tmp_path: pathlib.Path) -> None:
    """Started by hand with peering on and no such peering object: a WARNING with the remedy, not a silent idle."""
    log = tmp_path / "by-hand.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_telemetry_operator", "--kubeconfig", str(operator.kubeconfig),
             "--peering", unique("nobody-made-this"), "--log-format", "text", "--metrics-port", "0", "--health", ""],
            env={**os.environ, **operator.env}, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        line = wait_for(
            lambda: next((x for x in log.read_text().splitlines() if "[WARNING" in x and "peering" in x), None),
            f"a startup warning about the missing peering object in {log}",
        )
    finally:
        stop(process)
    assert "ClusterKopfPeering" in line and "does not exist" in line
    assert "--standalone" in line and "helm" in line


def _gitops_apply(cluster: Cluster, manifest: dict[str, Any]) -> None:
    """Server-side apply ``manifest`` as a GitOps controller does on every sync: its own field manager, forcing."""
    cluster.apps.patch_namespaced_deployment(
        manifest["metadata"]["name"],
        cluster.namespace,
        manifest,
        field_manager="gitops",
        force=True,
        _content_type="application/apply-patch+yaml",
    )


def test_gitops_reapply_keeps_the_injection(cluster: Cluster) -> None:
    """A GitOps controller that server-side applies the Deployment (its own field manager) re-applies its manifest:
    the injection, written by the operator's field manager, is not its to remove, so nothing is undone and the
    pods do not roll."""
    manifest = deployment("gitops", "gitops")

    def gitops_apply() -> None:
        _gitops_apply(cluster, manifest)

    gitops_apply()
    cluster.create(telemetry("gitops", "gitops"))
    cluster.ready("gitops")
    injected = cluster.deployment("gitops")
    gitops_apply()
    after = cluster.deployment("gitops")
    assert "LLM_TELEMETRY_METRICS_PORT" in cluster.env("gitops")
    assert after["metadata"]["generation"] == injected["metadata"]["generation"]
    assert after["spec"]["template"] == injected["spec"]["template"]
    # The label the metrics Service selects is the operator's too: the apply leaves it.
    assert after["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] == "gitops-llm-metrics"


def test_a_gitops_manifest_that_sets_the_metrics_service_label_itself_is_not_fought(cluster: Cluster) -> None:
    """A manifest copied from another injected workload's live YAML sets the label its metrics Service selects by
    (to ``chat-llm-metrics``), and GitOps server-side applies it with ``--force-conflicts`` on every sync: the
    operator replaced the value at every pass and each sync set it back, two rollouts per sync. It leaves a value
    it did not write, says so, and its deletion leaves it too."""
    manifest = deployment("relabelled", "relabelled")
    manifest["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] = "chat-llm-metrics"

    def gitops_apply() -> None:
        _gitops_apply(cluster, manifest)

    gitops_apply()
    cluster.create(telemetry("relabelled", "relabelled"))
    metrics = cluster.reported("relabelled", c.CONDITION_METRICS, "ServiceLabelOverridden")
    assert "Deployment/relabelled sets it to 'chat-llm-metrics'" in metrics["message"]
    assert wait_for(lambda: cluster.events("relabelled", "ServiceLabelOverridden"), "ServiceLabelOverridden event")
    injected = wait_for(
        lambda: "LLM_TELEMETRY_METRICS_PORT" in cluster.env("relabelled") and cluster.deployment("relabelled"),
        "injected",
    )
    assert injected["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] == "chat-llm-metrics"
    assert cluster.service("relabelled-llm-metrics").spec.selector == {"app": "relabelled"}
    gitops_apply()  # the next sync: the same template, nothing rolls
    assert cluster.deployment("relabelled")["metadata"]["generation"] == injected["metadata"]["generation"]
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "relabelled")
    wait_for(lambda: "LLM_TELEMETRY_METRICS_PORT" not in cluster.env("relabelled"), "injection removed")
    assert cluster.deployment("relabelled")["spec"]["template"]["metadata"]["labels"] == {
        "app": "relabelled",
        "llm": "relabelled",
        c.LABEL_METRICS_SERVICE: "chat-llm-metrics",
    }


def test_an_override_a_gitops_commit_drops_again_gets_the_injected_value_back(cluster: Cluster) -> None:
    """A GitOps tool server-side applies with ``--force-conflicts`` (Argo CD, Flux): a commit overrides an injected
    variable, a later commit drops the override. The apply gives up the value it took over but not the entry's name,
    which the operator's patch wrote: the entry is left with no value, unset to the SDK (the sampler at 1.0, traces
    to localhost). The operator puts its value back, as for a variable never declared."""
    manifest = deployment("ssa", "ssa")
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "MODEL", "value": "gpt"}]

    def gitops_apply(env: list[dict[str, str]]) -> None:
        container["env"] = env
        cluster.apps.patch_namespaced_deployment(
            "ssa",
            cluster.namespace,
            manifest,
            field_manager="argocd",
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    first = [{"name": "MODEL", "value": "gpt"}]
    gitops_apply(first)
    cluster.create(telemetry("ssa", "ssa"))
    cluster.ready("ssa")
    injected = wait_for(lambda: cluster.env("ssa").get("OTEL_SERVICE_NAME") == "ssa" and cluster.env("ssa"), "env")
    assert injected["OTEL_TRACES_EXPORTER"] == "none"  # no collector in this cluster
    gitops_apply([*first, {"name": "OTEL_SERVICE_NAME", "value": "mine"}])
    assert cluster.env("ssa")["OTEL_SERVICE_NAME"] == "mine"
    gitops_apply(first)
    wait_for(lambda: cluster.env("ssa") == injected, "the injected values back after the override was dropped")
    entries = cluster.deployment("ssa")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert len(entries) == len({e["name"] for e in entries})


def test_an_injected_variable_a_manifest_declares_empty_is_the_users(
    cluster: Cluster, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """``kubectl apply`` (client-side) of a manifest that declares an injected variable with ``value: ""``: the
    apply empties it, and it stays the user's, with no rollout at the next applies. (The apply changes no field the
    API server could count it as the owner of; the manifest kubectl keeps on the object says it is the user's.)
    The same variable emptied by ``kubectl set env`` is refilled, as one removed by hand is re-injected."""
    kubectl = tool_binary("kubectl")
    manifest = deployment("declared", "declared")
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    path = tmp_path / "declared.json"

    def apply(env: list[dict[str, str]]) -> None:
        container["env"] = env
        path.write_text(json.dumps(manifest))
        command = [kubectl, "--kubeconfig", str(kubeconfig), "-n", cluster.namespace, "apply", "-f", str(path)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    apply([{"name": "MODEL", "value": "gpt"}])
    cluster.create(telemetry("declared", "declared"))
    cluster.ready("declared")
    wait_for(lambda: cluster.env("declared").get("OTEL_SERVICE_NAME") == "declared", "injected")
    apply([{"name": "MODEL", "value": "gpt"}, {"name": "OTEL_SERVICE_NAME", "value": ""}])
    assert not cluster.env("declared")["OTEL_SERVICE_NAME"]
    time.sleep(5)  # the operator's pass on the change has run
    generation = cluster.deployment("declared")["metadata"]["generation"]
    for _ in range(2):
        apply([{"name": "MODEL", "value": "gpt"}, {"name": "OTEL_SERVICE_NAME", "value": ""}])
        time.sleep(3)
    assert not cluster.env("declared")["OTEL_SERVICE_NAME"]
    assert cluster.deployment("declared")["metadata"]["generation"] == generation
    # Emptied by hand, an injected variable is refilled.
    apply([{"name": "MODEL", "value": "gpt"}])
    wait_for(lambda: cluster.env("declared").get("OTEL_SERVICE_NAME") == "declared", "re-injected")
    set_env = [kubectl, "--kubeconfig", str(kubeconfig), "-n", cluster.namespace, "set", "env", "deployment/declared"]
    subprocess.run([*set_env, "OTEL_SERVICE_NAME="], check=True, capture_output=True, timeout=60)
    wait_for(lambda: cluster.env("declared").get("OTEL_SERVICE_NAME") == "declared", "refilled")


def test_failed_pass_is_retried_until_the_cause_is_gone(cluster: Cluster) -> None:
    """Someone else's Service holds the metrics Service's name: the resource says so (and is not Ready); once
    that Service is removed, the operator's own retry (the resource itself does not change) creates the metrics
    Service and the resource becomes Ready."""
    from kubernetes import client

    cluster.core.create_namespaced_service(
        cluster.namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="blocked-llm-metrics", labels={"team": "someone-else"}),
            spec=client.V1ServiceSpec(selector={"app": "other"}, ports=[client.V1ServicePort(port=80)]),
        ),
    )
    cluster.create(deployment("blocked", "blocked"))
    cluster.create(telemetry("blocked", "blocked"))
    failed = cluster.reported("blocked", c.CONDITION_METRICS, "ServiceFailed")
    assert "not this LLMTelemetry's" in failed["message"]
    assert cluster.condition("blocked", "Ready")["status"] == "False"
    generation = cluster.llmt("blocked")["metadata"]["generation"]
    cluster.core.delete_namespaced_service("blocked-llm-metrics", cluster.namespace)
    owner = cluster.ready("blocked")
    assert owner["metadata"]["generation"] == generation  # retried by the operator, not by a change
    service = wait_for(lambda: cluster.service("blocked-llm-metrics"), "metrics Service")
    assert (service.metadata.labels or {}).get(c.LABEL_OWNER) == "blocked"
    # The failure was told once, however many retries met it. (Events are posted from kopf's queue after the pass
    # has written the status: the first one awaited, then counted.)
    assert len(wait_for(lambda: cluster.events("blocked", "ServiceFailed"), "ServiceFailed event")) == 1


def test_pricing_the_pods_cannot_mount_holds_ready_back(cluster: Cluster) -> None:
    """A configMapRef to a ConfigMap that does not exist: the pods would sit in ContainerCreating, so the workload is
    left as it is and the resource is not Ready, and says why; once the ConfigMap is created, the operator's retries
    inject it and make it Ready."""
    from kubernetes import client

    cluster.create(deployment("priced", "priced"))
    cluster.create(telemetry("priced", "priced", pricing={"configMapRef": {"name": "priced-prices"}}))
    missing = cluster.reported("priced", c.CONDITION_INJECTED, "PricingConfigMapNotFound")
    assert "priced-prices" in missing["message"] and cluster.condition("priced", "Ready")["status"] == "False"
    assert "LLM_TELEMETRY_PRICING" not in cluster.env("priced")
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="priced-prices"), data={"pricing.yaml": "{}"}),
    )
    cluster.ready("priced")
    assert cluster.env("priced")["LLM_TELEMETRY_PRICING"].endswith("pricing.yaml")
    # The workload was selected all along, only held back: no event said the selector matched nothing. (Events are
    # posted from kopf's queue after the pass has written the status: awaited.)
    assert wait_for(lambda: cluster.events("priced", "PricingConfigMapNotFound"), "PricingConfigMapNotFound event")
    assert not cluster.events("priced", "NoTargets")


def test_a_users_copy_of_a_child_is_left_alone(cluster: Cluster) -> None:
    """A copy of the dashboard ConfigMap made to customise it, labels and all, is the user's: passes that prune the
    resource's children (a spec change here) leave it."""
    from kubernetes import client

    cluster.create(deployment("copied", "copied"))
    cluster.create(telemetry("copied", "copied"))
    cluster.ready("copied")
    original = cluster.configmap("copied-llm-dashboard")
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="my-dashboard", labels=original.metadata.labels), data=original.data
        ),
    )
    changed = cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "copied", {"spec": {"metrics": {"port": 9601}}}
    )
    wait_for(lambda: cluster.env("copied").get("LLM_TELEMETRY_METRICS_PORT") == "9601", "the change applied")
    # The pass patches the workload first and prunes the children after it: the status it writes last, for the
    # changed generation, says it is done (the resource was Ready from before, so Ready alone would not).
    generation = changed["metadata"]["generation"]
    wait_for(
        lambda: (cluster.llmt("copied").get("status") or {}).get("observedGeneration") == generation,
        "the pass on the change done",
    )
    cluster.ready("copied")
    assert cluster.configmap("my-dashboard") is not None


def test_a_spec_the_schema_admits_but_no_pass_can_use_is_reported_once(cluster: Cluster) -> None:
    """The CRD's pattern admits an endpoint no URL parser reads: the resource says which field (InvalidSpec, one
    Warning event), and kopf's handler retries never start (they would patch the resource on every attempt)."""
    cluster.create(deployment("badurl", "badurl"))
    cluster.create(telemetry("badurl", "badurl", tracing={"endpoint": "http://[oops:4318"}))
    ready = cluster.reported("badurl", "Ready", "InvalidSpec")
    assert ready["status"] == "False" and ready["message"].startswith("spec.tracing.endpoint: ")
    assert wait_for(lambda: cluster.events("badurl", "InvalidSpec"), "InvalidSpec event")
    time.sleep(6)  # past the operator's first retry (5 s): had the pass failed, it would have been retried by now
    assert len(cluster.events("badurl", "InvalidSpec")) == 1
    annotations = cluster.llmt("badurl")["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.startswith("kopf.zalando.org/")], annotations
    assert "LLM_TELEMETRY_METRICS_PORT" not in cluster.env("badurl")


def test_workloads_of_one_name_and_a_containers_own_port(cluster: Cluster) -> None:
    """A Deployment and a StatefulSet named alike each get a metrics Service selecting their own pods. The
    Deployment's container sets its own metrics port, which wins over the injection: the resource says the Service
    would scrape nothing there until the variable is removed."""
    dep = deployment("twin", "twin")
    dep["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9999"}]
    sts = deployment("twin", "twin")
    sts["kind"] = "StatefulSet"
    sts["spec"]["serviceName"] = "twin"
    sts["spec"]["selector"]["matchLabels"] = {"app": "twin-db"}
    sts["spec"]["template"]["metadata"]["labels"]["app"] = "twin-db"
    cluster.create(dep)
    cluster.create(sts)
    cluster.create(telemetry("twin", "twin"))
    metrics = cluster.reported("twin", c.CONDITION_METRICS, "SettingsOverridden")
    assert "Deployment/twin: container app sets LLM_TELEMETRY_METRICS_PORT=9999" in metrics["message"]
    assert wait_for(lambda: cluster.events("twin", "SettingsOverridden"), "SettingsOverridden event")
    assert cluster.llmt("twin")["status"]["targets"] == ["Deployment/twin", "StatefulSet/twin"]
    assert cluster.service("twin-llm-metrics").spec.selector == {c.LABEL_METRICS_SERVICE: "twin-llm-metrics"}
    assert cluster.service("twin-llm-metrics-sts").spec.selector == {c.LABEL_METRICS_SERVICE: "twin-llm-metrics-sts"}
    env = cluster.deployment("twin")["spec"]["template"]["spec"]["containers"][0]["env"]
    mine = next(i for i, e in enumerate(env) if e == {"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9999"})
    # A JSON patch (a list): the user removes their own variable and nothing else.
    cluster.apps.patch_namespaced_deployment(
        "twin", cluster.namespace, [{"op": "remove", "path": f"/spec/template/spec/containers/0/env/{mine}"}]
    )
    cluster.ready("twin")
    assert cluster.env("twin")["LLM_TELEMETRY_METRICS_PORT"] == "9464"


def test_the_documented_resource_and_checks_work_as_written(
    api: Any, kubeconfig: pathlib.Path, operator: Operator
) -> None:
    """docs/install.md, "3. Describe an LLM service" and "4. Verify", run with the real kubectl in a namespace of the
    test's own instead of ``llm``: the resource as the page writes it, then each check the page lists that does not
    need a running pod or the chart's Deployment (the operator runs beside the cluster here), with what it shows."""
    from kubernetes import client

    namespace = unique("llm-docs")
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    kubectl = tool_binary("kubectl")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def run(argv: list[str], stdin: str | None = None) -> str:
        argv = [kubectl] + [namespace if arg == "llm" and argv[i] == "-n" else arg for i, arg in enumerate(argv[1:])]
        result = subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stderr}"
        return result.stdout

    try:
        chat = deployment("chat", "chat")
        chat["metadata"]["labels"] = {"app": "chat"}
        client.AppsV1Api(api).create_namespaced_deployment(namespace, chat)
        (describe,) = re.findall(
            r"```sh\nkubectl apply -f - <<'YAML'\n(.*?)YAML\n```", section("3. Describe an LLM service"), re.S
        )
        resource = describe.replace("namespace: llm\n", f"namespace: {namespace}\n")
        assert resource != describe
        run(["kubectl", "apply", "-f", "-"], resource)

        (checks,) = sh_blocks("4. Verify")
        ours = [argv for argv in checks if argv[:3] == ["kubectl", "-n", "llm"] and "port-forward" not in argv]
        assert len(ours) == 4, ours
        wait_for(lambda: "Ready=True " in run(ours[1]), "the documented condition check shows Ready=True")
        outputs = [run(argv) for argv in ours]
        header, row = outputs[0].splitlines()
        assert header.split()[:4] == ["NAME", "TARGETS", "READY", "AGE"] and row.split()[:3] == ["chat", "1", "True"]
        conditions = dict(line.split(" ")[0].split("=") for line in outputs[1].splitlines())
        assert conditions["Ready"] == conditions["MetricsExposed"] == "True", outputs[1]
        created = sorted(line.split()[0] for line in outputs[2].splitlines() if line and not line.startswith("NAME"))
        assert created == sorted([
            "service/chat-llm-metrics", "servicemonitor.monitoring.coreos.com/chat-llm-telemetry",
            "prometheusrule.monitoring.coreos.com/chat-llm-telemetry", "configmap/chat-llm-dashboard",
        ]), outputs[2]  # fmt: skip
        assert {"LLM_TELEMETRY_METRICS_PORT", "OTEL_SERVICE_NAME"} <= set(outputs[3].split())
        (events,) = re.findall(r"`(kubectl -n llm get events [^`]+)`", section("4. Verify"))
        # The event is posted from kopf's queue after the pass has written the status the checks above read: awaited.
        wait_for(lambda: "CollectorNotFound" in run(shlex.split(events)), "the documented events check lists it")
    finally:
        custom = client.CustomObjectsApi(api)
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")
        wait_for(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"], "gone")
        core.delete_namespace(namespace)
    operator.assert_clean()


def test_a_sidecar_on_the_metrics_port_holds_the_injection_back(cluster: Cluster) -> None:
    """A sidecar already declares spec.metrics.port: the workload is not injected (its pods would roll into a listener,
    or an app, that cannot bind), the resource says which container (one Warning event), and it is served once the
    port is changed. When the sidecar later moves onto the new port, the API server takes the pod template with two
    containers declaring it, and the operator takes its injection back out."""
    dep = deployment("portclash", "portclash")
    dep["spec"]["template"]["spec"]["containers"].append(
        {"name": "proxy", "image": "example.invalid/proxy:1", "ports": [{"name": "admin", "containerPort": 9464}]}
    )
    cluster.create(dep)
    cluster.create(telemetry("portclash", "portclash"))
    metrics = cluster.reported("portclash", c.CONDITION_METRICS, "PortConflict")
    assert metrics["status"] == "False"
    assert "Deployment/portclash: container proxy declares port 9464 (admin)" in metrics["message"]
    assert cluster.condition("portclash", "Ready")["status"] == "False"
    assert cluster.condition("portclash", c.CONDITION_INJECTED)["reason"] == "PortConflict"
    assert "LLM_TELEMETRY_METRICS_PORT" not in cluster.env("portclash")
    assert cluster.service("portclash-llm-metrics") is None
    assert wait_for(lambda: cluster.events("portclash", "PortConflict"), "PortConflict event")

    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "portclash", {"spec": {"metrics": {"port": 9500}}}
    )
    cluster.ready("portclash")
    assert cluster.env("portclash")["LLM_TELEMETRY_METRICS_PORT"] == "9500"
    assert len(cluster.events("portclash", "PortConflict")) == 1

    cluster.apps.patch_namespaced_deployment(
        "portclash",
        cluster.namespace,
        [{"op": "replace", "path": "/spec/template/spec/containers/1/ports/0/containerPort", "value": 9500}],
    )
    wait_for(lambda: "LLM_TELEMETRY_METRICS_PORT" not in cluster.env("portclash"), "injection taken out")
    again = cluster.reported("portclash", c.CONDITION_METRICS, "PortConflict")
    assert "container proxy declares port 9500 (admin)" in again["message"]
    app = cluster.deployment("portclash")["spec"]["template"]["spec"]["containers"][0]
    assert not [p for p in app.get("ports") or [] if p.get("name") == c.METRICS_PORT_NAME], app
    wait_for(lambda: cluster.service("portclash-llm-metrics") is None, "the metrics Service removed")


def test_labels_taken_out_of_the_settings_come_off_the_children(cluster: Cluster) -> None:
    """Labels from spec.metrics.labels go on the children; one taken out of the spec comes off them again (a merge
    or strategic merge patch alone would keep it), while a label someone else put on a child stays."""
    cluster.create(deployment("relabel", "relabel"))
    cluster.create(telemetry("relabel", "relabel", metrics={"labels": {"release": "kps", "team": "ml"}}))
    cluster.ready("relabel")

    def labels() -> dict[str, dict[str, str]]:
        monitor = cluster.monitoring("servicemonitors", "relabel-llm-telemetry") or {}
        rules = cluster.monitoring("prometheusrules", "relabel-llm-telemetry") or {}
        return {
            "servicemonitor": monitor.get("metadata", {}).get("labels") or {},
            "prometheusrule": rules.get("metadata", {}).get("labels") or {},
        }

    for kind, found in labels().items():
        assert {"release": "kps", "team": "ml"}.items() <= found.items(), (kind, found)
    cluster.custom.patch_namespaced_custom_object(
        MONITORING,
        "v1",
        cluster.namespace,
        "servicemonitors",
        "relabel-llm-telemetry",
        {"metadata": {"labels": {"argocd.argoproj.io/instance": "apps"}}},
    )
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "relabel", {"spec": {"metrics": {"labels": {"team": None}}}}
    )
    wait_for(lambda: all("team" not in found for found in labels().values()), "team label taken off the children")
    found = labels()
    assert found["servicemonitor"]["release"] == found["prometheusrule"]["release"] == "kps"
    assert found["servicemonitor"]["argocd.argoproj.io/instance"] == "apps"
    assert found["servicemonitor"][c.LABEL_OWNER] == "relabel"


def test_an_older_resource_naming_no_container_of_the_workload_does_not_hold_it(cluster: Cluster) -> None:
    """The older resource names a container the workload lacks, so the newer one serves it. Once the workload gets
    that container the older takes it over, and when the container goes again the newer takes it back, with the same
    metrics Service object throughout: handed over, never deleted and made anew (a gap in the scrapes)."""
    cluster.create(deployment("handover", "handover"))
    older = telemetry("handover-zeta", "handover", containers=["worker"])
    cluster.create(older)
    time.sleep(1.1)  # creationTimestamp has a resolution of one second; the conflict rule goes by it
    cluster.create(telemetry("handover-alpha", "handover"))
    cluster.ready("handover-alpha")
    cluster.reported("handover-zeta", c.CONDITION_INJECTED, "NoContainer")
    assert cluster.events("handover-alpha", "Conflict") == []
    service = cluster.service("handover-llm-metrics")
    assert service.metadata.labels[c.LABEL_OWNER] == "handover-alpha"
    uid = service.metadata.uid

    containers = cluster.deployment("handover")["spec"]["template"]["spec"]["containers"]
    worker = {"name": "worker", "image": "example.invalid/worker:1"}
    cluster.apps.patch_namespaced_deployment(
        "handover", cluster.namespace, [{"op": "add", "path": "/spec/template/spec/containers/-", "value": worker}]
    )
    cluster.ready("handover-zeta")
    cluster.reported("handover-alpha", "Ready", "Conflict")
    wait_for(
        lambda: cluster.service("handover-llm-metrics").metadata.labels[c.LABEL_OWNER] == "handover-zeta",
        "the metrics Service handed to the older resource",
    )
    assert cluster.service("handover-llm-metrics").metadata.uid == uid

    cluster.apps.patch_namespaced_deployment(
        "handover",
        cluster.namespace,
        [{"op": "remove", "path": f"/spec/template/spec/containers/{len(containers)}"}],
    )
    cluster.ready("handover-alpha")
    wait_for(
        lambda: cluster.service("handover-llm-metrics").metadata.labels[c.LABEL_OWNER] == "handover-alpha",
        "the metrics Service handed back",
    )
    assert cluster.service("handover-llm-metrics").metadata.uid == uid
    assert cluster.events("handover-alpha", "ServiceFailed") == []


def test_a_paused_deployment_is_said_to_be_paused_until_resumed(cluster: Cluster) -> None:
    """A paused Deployment gets the injection in its template, but the Deployment controller rolls no pod until it is
    resumed: the Injected condition says so, and how. Resumed, the controller makes a ReplicaSet of the injected
    template and the note goes."""
    from kubernetes import client

    note = "; paused (its pods get it once resumed with kubectl rollout resume): Deployment/paused"
    dep = deployment("paused", "paused")
    dep["spec"]["paused"] = True
    cluster.create(dep)
    cluster.create(telemetry("paused", "paused"))
    cluster.ready("paused")
    assert cluster.condition("paused", c.CONDITION_INJECTED)["message"].endswith(note)
    injected = cluster.config_hash("paused")
    assert injected

    def rolled_out() -> bool:
        found = client.AppsV1Api(cluster.apps.api_client).list_namespaced_replica_set(
            cluster.namespace, label_selector="app=paused"
        )
        return any((rs.spec.template.metadata.annotations or {}).get(c.ANNOTATION_CONFIG_HASH) == injected
                   for rs in found.items)  # fmt: skip

    assert not rolled_out()
    cluster.apps.patch_namespaced_deployment("paused", cluster.namespace, {"spec": {"paused": False}})
    wait_for(rolled_out, "a ReplicaSet of the injected template once resumed")
    wait_for(lambda: not cluster.condition("paused", c.CONDITION_INJECTED)["message"].endswith(note), "the note gone")
    assert cluster.condition("paused", "Ready")["status"] == "True"


def test_an_on_delete_statefulset_is_said_to_roll_only_as_its_pods_are_deleted(cluster: Cluster) -> None:
    """A StatefulSet with updateStrategy OnDelete: the StatefulSet controller leaves its pod on the old template after
    the injection, and the Injected message says so. Once the pod is deleted, the controller makes it anew from the
    injected template, its status counts it updated, and the note goes (at the latest with the next resync)."""
    sts = deployment("manual", "manual")
    sts["kind"] = "StatefulSet"
    sts["spec"]["serviceName"] = "manual"
    sts["spec"]["updateStrategy"] = {"type": "OnDelete"}
    cluster.create(sts)
    wait_for(lambda: cluster.core.read_namespaced_pod("manual-0", cluster.namespace), "the StatefulSet's pod made")
    cluster.create(telemetry("manual", "manual"))
    cluster.ready("manual")
    note = "; updateStrategy OnDelete (each pod gets it once deleted): StatefulSet/manual"
    assert cluster.condition("manual", c.CONDITION_INJECTED)["message"].endswith(note)
    old = cluster.core.read_namespaced_pod("manual-0", cluster.namespace)
    assert c.ANNOTATION_CONFIG_HASH not in (old.metadata.annotations or {})

    cluster.core.delete_namespaced_pod("manual-0", cluster.namespace, grace_period_seconds=0)

    def replaced() -> bool:
        pod = _absent_as_none(cluster.core.read_namespaced_pod, "manual-0", cluster.namespace)
        return pod is not None and c.ANNOTATION_CONFIG_HASH in (pod.metadata.annotations or {})

    wait_for(replaced, "the pod made anew from the injected template")
    wait_for(
        lambda: not cluster.condition("manual", c.CONDITION_INJECTED)["message"].endswith(note),
        "the note gone",
        timeout=90,
    )


def test_workloads_whose_selectors_overlap_are_reported(cluster: Cluster, operator: Operator) -> None:
    """A Deployment selecting ``app: ov`` beside a canary whose pods are ``app: ov, track: canary`` (the API server
    takes both): Kubernetes asks that selectors not overlap, and the resource says so."""
    for name, pods in (("ov", {"app": "ov"}), ("ov-canary", {"app": "ov", "track": "canary"})):
        workload = deployment(name, "ov")
        workload["spec"]["selector"] = {"matchLabels": pods}
        workload["spec"]["template"]["metadata"]["labels"] = {**pods, "llm": "ov"}
        cluster.create(workload)
    cluster.create(telemetry("ov", "ov"))
    metrics = cluster.reported("ov", c.CONDITION_METRICS, "SelectorsOverlap")
    assert "Deployment/ov selects the pods of Deployment/ov-canary" in metrics["message"]
    assert wait_for(lambda: cluster.events("ov", "SelectorsOverlap"), "SelectorsOverlap event")
    operator.assert_clean()


def test_in_the_canary_layout_each_metrics_service_lists_its_own_workloads_pods_only(
    cluster: Cluster, api: Any
) -> None:
    """``cn`` (pods ``app: cn``) and ``cn-canary`` (pods ``app: cn, track: canary``), each served by an LLMTelemetry of
    its own. The canary's pods match the pod selector of ``cn`` and declare the metrics port (injected by the other
    resource): a Service on that selector listed them, and Prometheus scraped them under both jobs. Each Service
    selects the label the injection puts on its own workload's pods: the endpoints controllers list its pods only.
    (No kubelet here: the pods are bound to a Node object and given a Ready status with an address by hand.)"""
    from kubernetes import client

    for name, pods in (("cn", {"app": "cn"}), ("cn-canary", {"app": "cn", "track": "canary"})):
        workload = deployment(name, name)
        workload["spec"]["selector"] = {"matchLabels": pods}
        workload["spec"]["template"]["metadata"]["labels"] = pods
        cluster.create(workload)
        cluster.create(telemetry(name, name))
    for name in ("cn", "cn-canary"):
        cluster.ready(name)

    def injected_pods(selector: str) -> list[Any]:
        """The live pods (by a label selector) that declare the metrics port: those of the injected template."""
        found = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector).items
        return [
            pod
            for pod in found
            if pod.metadata.deletion_timestamp is None
            and any(port.name == c.METRICS_PORT_NAME for ct in pod.spec.containers for port in ct.ports or [])
        ]

    stable = wait_for(lambda: len(injected_pods("app=cn,!track")) == 1 and injected_pods("app=cn,!track"), "cn pod")
    canary = wait_for(
        lambda: len(injected_pods("app=cn,track=canary")) == 1 and injected_pods("app=cn,track=canary"),
        "cn-canary pod",
    )
    node = unique("llmt-it-node")
    cluster.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    try:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        addresses = {"cn": "10.250.0.1", "cn-canary": "10.250.0.2"}
        for workload, (pod,) in (("cn", stable), ("cn-canary", canary)):
            binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.metadata.name},
                       "target": {"apiVersion": "v1", "kind": "Node", "name": node}}  # fmt: skip
            cluster.core.create_namespaced_binding(cluster.namespace, binding, _preload_content=False)
            ip = addresses[workload]
            status = {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "hostIP": "10.250.255.1",
                "startTime": now,
                "conditions": [
                    {"type": kind, "status": "True", "lastTransitionTime": now}
                    for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {"name": "app", "ready": True, "restartCount": 0, "image": "example.invalid/chat:1",
                     "imageID": "", "started": True, "state": {"running": {"startedAt": now}}}
                ],
            }  # fmt: skip
            cluster.core.patch_namespaced_pod_status(pod.metadata.name, cluster.namespace, {"status": status})

        def listed(service: str) -> tuple[set[str], set[str]]:
            """The addresses the Service's Endpoints and its EndpointSlices list (ready or not)."""
            endpoints = _absent_as_none(cluster.core.read_namespaced_endpoints, service, cluster.namespace)
            legacy = {
                address.ip
                for subset in (endpoints.subsets if endpoints else None) or []
                for address in [*(subset.addresses or []), *(subset.not_ready_addresses or [])]
            }
            slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
                cluster.namespace, label_selector=f"kubernetes.io/service-name={service}"
            )
            sliced = {address for item in slices.items for point in item.endpoints or [] for address in point.addresses}
            return legacy, sliced

        seen: dict[str, tuple[set[str], set[str]]] = {}

        def lists_its_own(workload: str) -> bool:
            own = {addresses[workload]}
            seen[workload] = listed(f"{workload}-llm-metrics")
            return seen[workload] == (own, own)

        for workload in ("cn", "cn-canary"):
            try:
                wait_for(lambda w=workload: lists_its_own(w), f"{workload}-llm-metrics listing its own pod only")
            except AssertionError:
                raise AssertionError(f"{workload}-llm-metrics lists (Endpoints, EndpointSlices) {seen[workload]}, "
                                     f"the pods' addresses being {addresses}") from None  # fmt: skip
    finally:
        cluster.core.delete_node(node)


async def test_a_child_taken_over_during_a_pass_is_not_written_back(cluster: Cluster, kubeconfig: pathlib.Path) -> None:
    """Two resources created together, the younger one's pass begun before the older one was known: meanwhile the
    older one takes the workload's metrics Service over. The younger pass's write of it, made on the version it read,
    is refused by the API server (409); re-read, the Service is another LLMTelemetry's now, and is left so: the pass
    fails and is retried knowing both, instead of relabelling the Service its own (nothing scraped it under the
    winner's job then, and deleting the loser deleted the winner's Service)."""
    from kubernetes import client as k8s

    from llm_telemetry_operator import reconcile as rec
    from llm_telemetry_operator.errors import ConflictError

    def owner_of(name: str) -> dict[str, Any]:
        made = cluster.core.create_namespaced_config_map(
            cluster.namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name))
        )
        return {"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": made.metadata.uid, "controller": True}

    loser, winner = owner_of("race-loser"), owner_of("race-winner")

    def service(owner: dict[str, Any], label: str, note: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "race-llm-metrics", "labels": {c.LABEL_OWNER: label},
                         "annotations": {"note": note}, "ownerReferences": [owner]},
            "spec": {"clusterIP": "None", "selector": {"app": "race"}, "ports": [{"name": "m", "port": 9464}]},
        }  # fmt: skip

    api = kube.KubeClient(kube.load_configuration(str(kubeconfig)))
    try:
        await api.create(kube.SERVICES, cluster.namespace, service(loser, "race-loser", "made by the loser"))
        read = await api.get(kube.SERVICES, cluster.namespace, "race-llm-metrics")
        # The winner's pass takes it over (as _apply does for an outranked peer's Service).
        await api.patch(
            kube.SERVICES, cluster.namespace, "race-llm-metrics",
            {"metadata": {"labels": {c.LABEL_OWNER: "race-winner"}, "ownerReferences": [winner]}},
        )  # fmt: skip
        with pytest.raises(ConflictError, match="taken over by LLMTelemetry race-winner meanwhile"):
            await rec._apply(api, kube.SERVICES, cluster.namespace, service(loser, "race-loser", "repaired"), read)
        now = await api.get(kube.SERVICES, cluster.namespace, "race-llm-metrics")
    finally:
        await api.close()
    assert now["metadata"]["labels"][c.LABEL_OWNER] == "race-winner"
    assert [ref["uid"] for ref in now["metadata"]["ownerReferences"]] == [winner["uid"]]


def test_a_resource_a_newer_crd_refuses_says_why_it_cannot_be_deleted(cluster: Cluster, api: Any) -> None:
    """The upgrade that skipped the documented order: a resource stored under a CRD that allowed it (here a name of
    70 characters; the CRD allows 63 now), then the stricter CRD applied. Without validation ratcheting the API
    server refuses every update of it, its finalizer's removal included, so it cannot be deleted; kopf says nothing
    of that. The operator says it: an UpdateRefused Warning event naming the refusal. Putting the looser CRD back
    lets it go, as docs/install.md says."""
    from kubernetes import client

    limit = client.ApiextensionsV1Api(api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    schema = limit.spec.versions[0].schema.open_apiv3_schema
    assert schema.properties["metadata"].properties["name"].max_length == r.MAX_OWNER_NAME

    def set_limit(value: int | None) -> None:
        set_name_limit(api, cluster.namespace, value)

    long_name = "a" * 70
    set_limit(None)
    try:
        cluster.create(telemetry(long_name, "nothing-here"))
        refused = cluster.reported(long_name, "Ready", "InvalidSpec")
        assert "metadata.name" in refused["message"]
        set_limit(r.MAX_OWNER_NAME)
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, long_name)
        [event] = wait_for(lambda: cluster.events(long_name, "UpdateRefused"), "UpdateRefused event")
        assert "finalizer cannot be removed" in event and "63" in event
        assert cluster.llmt(long_name)["metadata"]["finalizers"] == [c.FINALIZER]  # still there, Terminating
        set_limit(None)
        wait_for(lambda: _gone(cluster, long_name), "deleted once the CRD admits it again")
    finally:
        # (Failed half-way: let it go before the CRD is strict again, or it stays for good.)
        if not _gone(cluster, long_name):
            with contextlib.suppress(Exception):
                set_limit(None)
            cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, long_name)
            wait_for(lambda: _gone(cluster, long_name), "the long-named resource deleted")
        set_limit(r.MAX_OWNER_NAME)


def test_a_users_volume_under_the_pricing_volumes_name_fails_the_injection_and_own_otlp_stays_on(
    cluster: Cluster,
) -> None:
    """On the real API server: a pod template with a volume of its own named llm-telemetry-pricing is not injected
    (the prices could not be mounted, and the middleware would not start), and the resource says so; renamed, the
    workload is injected. A container with an OTLP endpoint of its own keeps its exporters (the default collectors
    do not exist in this cluster, so the operator would otherwise set them to none)."""
    workload = deployment("volumed", "volumed")
    pod = workload["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "llm-telemetry-pricing", "emptyDir": {}}]
    pod["containers"][0]["volumeMounts"] = [{"name": "llm-telemetry-pricing", "mountPath": "/data"}]
    pod["containers"][0]["env"] = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel.example:4318"}]
    cluster.create(workload)
    cluster.create(telemetry("volumed", "volumed", pricing={"models": {"m": {"input": 1, "output": 2}}}))
    failed = cluster.reported("volumed", c.CONDITION_INJECTED, "InjectionFailed")
    assert "llm-telemetry-pricing" in failed["message"] and "rename it" in failed["message"]
    assert cluster.condition("volumed", "Ready")["status"] == "False"
    assert "LLM_TELEMETRY_PRICING" not in cluster.env("volumed")
    # kopf posts a pass's events from a queue, after the pass has written the status: awaited, not read at once.
    assert wait_for(lambda: cluster.events("volumed", "InjectionFailed"), "InjectionFailed event")
    # Renamed: injected, the prices mounted, and the container's own trace pipeline left on.
    # A JSON patch, not a read and a replace: the Deployment controller writes the Deployment's status meanwhile (a
    # replace with the version read is then refused, 409).
    volume, mount = "/spec/template/spec/volumes/0/name", "/spec/template/spec/containers/0/volumeMounts/0/name"
    cluster.apps.patch_namespaced_deployment(
        "volumed",
        cluster.namespace,
        [{"op": "test", "path": path, "value": "llm-telemetry-pricing"} for path in (volume, mount)]
        + [{"op": "replace", "path": path, "value": "data"} for path in (volume, mount)],
    )
    cluster.ready("volumed")
    env = cluster.env("volumed")
    assert env["LLM_TELEMETRY_PRICING"].endswith("pricing.yaml")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel.example:4318"
    assert "OTEL_TRACES_EXPORTER" not in env and "OTEL_LOGS_EXPORTER" not in env


def test_a_container_routing_its_traces_itself_is_told_once_and_cleared(cluster: Cluster, operator: Operator) -> None:
    """On the real API server: a container whose env declares its own traces endpoint gets none of the traces'
    injected variables, so its spans never reach the collector the resource names. The resource stays Ready and says
    so in SignalsRouted and one Normal event, naming workload, container, signal and variable, never the value; a
    resync posts no second event; once the container no longer routes them, the condition clears and the traces'
    endpoint is injected."""
    secret = "s3cret-vendor-key"
    workload = deployment("own-route", "own-route")
    own = {
        "name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "value": f"https://vendor.example.invalid/v1/traces?k={secret}",
    }
    workload["spec"]["template"]["spec"]["containers"][0]["env"] = [own]
    cluster.create(workload)
    # (An endpoint outside the cluster is injected unchecked: no collector needs to run here.)
    collector = "http://collector.example.invalid:4318"
    cluster.create(telemetry("own-route", "own-route", tracing={"endpoint": collector}, logs={"enabled": False}))
    owner = cluster.ready("own-route")
    assert owner["status"]["phase"] == "Ready"
    said = cluster.reported("own-route", c.CONDITION_ROUTES, "RoutedByContainer")
    assert said["status"] == "False"
    assert "Deployment/own-route container app: traces (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)" in said["message"]
    assert secret not in said["message"] and "vendor.example" not in said["message"]
    events = wait_for(lambda: cluster.events("own-route", "RoutedByContainer"), "RoutedByContainer event")
    assert events == [said["message"]]
    assert cluster.env("own-route")["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == own["value"]

    # A resync (every 10 s here) finds the same and posts nothing more.
    passes = re.compile(rf"(\[{cluster.namespace}/own-route\] |{cluster.namespace}/own-route: )reconciled \(")
    before = len(passes.findall(operator.output()))
    wait_for(lambda: len(passes.findall(operator.output())) >= before + 2, "two more passes", 40)
    assert cluster.events("own-route", "RoutedByContainer") == [said["message"]]

    # The variable taken out (a JSON patch: the Deployment controller writes the status meanwhile): cleared, and the
    # traces go to the resource's collector.
    env = cluster.deployment("own-route")["spec"]["template"]["spec"]["containers"][0]["env"]
    at = [e["name"] for e in env].index(own["name"])
    path = f"/spec/template/spec/containers/0/env/{at}"
    cluster.apps.patch_namespaced_deployment(
        "own-route", cluster.namespace, [{"op": "test", "path": path, "value": own}, {"op": "remove", "path": path}]
    )
    cleared = cluster.reported("own-route", c.CONDITION_ROUTES, "Routed")
    assert cleared["status"] == "True" and "own-route" not in cleared["message"]
    wait_for(
        lambda: cluster.env("own-route").get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == f"{collector}/v1/traces",
        "the traces' endpoint injected",
    )
    assert cluster.events("own-route", "RoutedByContainer") == [said["message"]]


def test_selectors_match_what_the_api_server_lists(api: Any) -> None:
    """The operator sends a resource's selector to the API server as a list's labelSelector (``to_query``) and
    judges a workload it already holds with ``matches`` (after a relabel, say): both select what the API server
    selects, for every operator, over objects with and without each label."""
    import itertools

    from kubernetes import client

    core = client.CoreV1Api(api)
    namespace = unique("llmt-selectors")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    try:
        labelled = {}
        for i, (app, track) in enumerate(itertools.product(["chat", "other", None], ["stable", "canary", None])):
            labels = {k: v for k, v in (("app", app), ("track", track)) if v is not None}
            labelled[f"o{i}"] = labels
            core.create_namespaced_config_map(
                namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"o{i}", labels=labels or None))
            )
        expressions = [
            {"key": "track", "operator": "In", "values": ["stable", "beta"]},
            {"key": "track", "operator": "NotIn", "values": ["canary"]},
            {"key": "track", "operator": "Exists"},
            {"key": "track", "operator": "DoesNotExist"},
        ]
        selectors = [{"matchLabels": {"app": "chat"}, "matchExpressions": [e]} for e in expressions]
        selectors += [{"matchExpressions": [e, expressions[1]]} for e in (expressions[0], expressions[2])]
        selectors.append({"matchExpressions": [{"key": "app", "operator": "In", "values": ["chat", "other"]}]})
        for raw in selectors:
            selector = parse_spec({"selector": raw}).selector
            listed = core.list_namespaced_config_map(namespace, label_selector=selector.to_query()).items
            assert {item.metadata.name for item in listed} == {
                name for name, labels in labelled.items() if selector.matches(labels)
            }, raw
    finally:
        core.delete_namespace(namespace)


def test_a_second_release_watching_the_namespace_leaves_its_resources_to_the_first(
    api: Any, kubeconfig: pathlib.Path, operator: Operator, cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """A team's namespaced release beside the cluster-wide one, watching one of its namespaces, with settings of
    its own (a traces endpoint). Before, the two put their own injection back over each other's, dozens of
    rollouts a second. Now the second leaves what the first serves to it and says so in one Warning event; a
    resource created while both run is served by one of them, and its workload stops rolling."""
    first = operator.env[LLM_TELEMETRY_OPERATOR_PEERING]
    cluster.create(deployment("twice", "twice"))
    cluster.create(telemetry("twice", "twice"))
    assert cluster.ready("twice")["status"]["operator"] == first
    env = cluster.env("twice")
    system = unique("llmt-it-team")
    sets = (f"watchNamespaces={{{cluster.namespace}}}", "defaults.tracesEndpoint=http://otel.example:4318")
    docs = install(api, system, "llm-telemetry-team", *sets)
    process, log, _, team_env = start_chart_operator(
        api, kubeconfig, docs, system, tmp_path, "--resync-seconds", str(RESYNC_SECONDS)
    )
    second = team_env[LLM_TELEMETRY_OPERATOR_PEERING]
    assert second != first
    try:
        (said,) = wait_for(lambda: cluster.events("twice", "WatchedTwice"), "the second release's event", timeout=90)
        assert first in said and second in said, said
        cluster.create(deployment("twice-new", "twice-new"))
        cluster.create(telemetry("twice-new", "twice-new"))
        serving = cluster.ready("twice-new")["status"]["operator"]
        assert serving in (first, second)
        # From the moment it is Ready on, nothing rolls: not the new resource's first passes in the other operator,
        # nor either operator's next resyncs over both resources. The operator that leaves a resource to the other
        # logs no pass of it, so the window covers the latest a resync can come: one and a half intervals after a
        # resource's last pass (see schedule.py), which came before this point, and a margin.
        generations = {name: cluster.deployment(name)["metadata"]["generation"] for name in ("twice", "twice-new")}
        time.sleep(1.5 * RESYNC_SECONDS + 3)
        assert {name: cluster.deployment(name)["metadata"]["generation"] for name in generations} == generations
        # Claimed by one operator before either injected it: one rollout, under the settings of the one serving it.
        assert generations["twice-new"] == 2, generations
        assert cluster.env("twice") == env
        assert cluster.llmt("twice-new")["status"]["operator"] == serving
        assert len(cluster.events("twice", "WatchedTwice")) == 1
        text = log.read_text(errors="replace")
        assert not refused_lines(text), text[-3000:]
    finally:
        stop(process)
        names = ("twice", "twice-new")
        for name in names:
            # One the second release claimed would be left to it for 5 minutes after its stop (a restart, as far as
            # the first can tell): its claim is removed, as install.md says to hand a resource over.
            if (_absent_as_none(cluster.llmt, name) or {}).get("status", {}).get("operator") == second:
                cluster.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, cluster.namespace, PLURAL, name, {"status": {"operator": None}}
                )
            _absent_as_none(
                cluster.custom.delete_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL, name
            )
        read = cluster.custom.get_namespaced_custom_object
        wait_for(
            lambda: all(_absent_as_none(read, GROUP, VERSION, cluster.namespace, PLURAL, n) is None for n in names),
            "both resources deleted",
        )
        uninstall(api, docs, (system,))


def test_narrowing_the_claimants_watched_namespaces_hands_its_resources_to_the_other_operator(
    api: Any, kubeconfig: pathlib.Path, operator: Operator, cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """A team's namespaced release serves a resource the cluster-wide one watches too, and keeps it over a restart;
    the team's release is then upgraded to watch another namespace. Its operator says so on its peering object as
    it starts, and the cluster-wide operator takes the resource over at its next pass: its own settings injected
    again, its name in the status. Before, the resource stayed claimed by an operator that no longer watched it,
    for as long as that one ran; and a restart handed it over at once (kopf takes a stopping replica's entry out)."""
    from kubernetes import client

    first = operator.env[LLM_TELEMETRY_OPERATOR_PEERING]
    cluster.create(deployment("handed", "handed"))
    cluster.create(telemetry("handed", "handed"))
    assert cluster.ready("handed")["status"]["operator"] == first
    env = cluster.env("handed")
    system, elsewhere = unique("llmt-it-team"), unique("llmt-it-elsewhere")
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=elsewhere)))
    team = ("llm-telemetry-team", "defaults.tracesEndpoint=http://otel.example:4318")
    docs = install(api, system, team[0], f"watchNamespaces={{{cluster.namespace}}}", team[1])
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    process, before, _, team_env = start_chart_operator(
        api, kubeconfig, docs, system, tmp_path / "before", "--resync-seconds", str(RESYNC_SECONDS)
    )
    second = team_env[LLM_TELEMETRY_OPERATOR_PEERING]
    peerings = cluster.custom.get_cluster_custom_object

    def says(namespaces: str) -> bool:
        annotations = peerings("kopf.dev", "v1", "clusterkopfpeerings", second)["metadata"].get("annotations") or {}
        return bool(annotations.get(c.ANNOTATION_WATCHED) == namespaces)

    try:
        wait_for(lambda: says(cluster.namespace), "the team's operator says which namespace it watches")
        # The team's operator serves it (as if it had claimed it first): its settings go in.
        cluster.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, cluster.namespace, PLURAL, "handed", {"status": {"operator": second}}
        )
        wait_for(
            lambda: (
                cluster.env("handed").get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "http://otel.example:4318/v1/traces"
            ),
            "the team's settings injected",
        )
        # A restart of the team's operator (kopf takes its entry out of the peering object as it stops) leaves the
        # resource to it. The cluster-wide operator logs nothing when a pass leaves a resource to another operator,
        # so the team's operator stays stopped for as long as a takeover would take at most without the stop mark it
        # writes: a pass (up to one and a half resync intervals after the last: see schedule.py) seeing its entry
        # gone, where the pass before may have read the peering object too recently to read it again (its cache,
        # Timers.holder_check_seconds), then the pass that confirms it, takeover_confirm_seconds and one later.
        timers = Timers()
        down = 1.5 * RESYNC_SECONDS + max(1.5 * RESYNC_SECONDS, timers.holder_check_seconds)
        down += timers.takeover_confirm_seconds + 1 + 5
        generation = cluster.deployment("handed")["metadata"]["generation"]
        stop(process)
        stopped = time.monotonic()
        (tmp_path / "restarted").mkdir()
        time.sleep(max(0.0, down - (time.monotonic() - stopped)))
        process, restarted, _, _ = start_chart_operator(
            api, kubeconfig, docs, system, tmp_path / "restarted", "--resync-seconds", str(RESYNC_SECONDS)
        )
        assert cluster.llmt("handed")["status"]["operator"] == second
        # Running again, it serves the resource as before: its resume pass, then its resync, roll nothing.
        wait_for(
            lambda: f"{cluster.namespace}/handed: reconciled (resync)" in restarted.read_text(errors="replace"),
            "a resync of the restarted team's operator",
            timeout=90,
        )
        assert cluster.llmt("handed")["status"]["operator"] == second
        logs = "\n".join(  # (what each operator said of this resource and of its peering, should a rollout come)
            f"{who}:\n" + "\n".join(x for x in text.splitlines() if "handed" in x or "peering" in x or "stop" in x)
            for who, text in (
                ("cluster-wide operator", operator.output()),
                ("team's operator before its restart", before.read_text(errors="replace")),
                ("team's operator restarted", restarted.read_text(errors="replace")),
            )
        )
        assert cluster.deployment("handed")["metadata"]["generation"] == generation, logs
        # The team's release upgraded to watch another namespace: its Role here goes, its operator restarts.
        stop(process)
        narrowed = install(api, system, team[0], f"watchNamespaces={{{elsewhere}}}", team[1])
        kept = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in narrowed}
        rbac = client.RbacAuthorizationV1Api(api)
        for doc in docs:
            meta = doc["metadata"]
            if (doc["kind"], meta.get("namespace"), meta["name"]) in kept or meta.get("namespace") != cluster.namespace:
                continue
            if doc["kind"] == "Role":
                rbac.delete_namespaced_role(meta["name"], cluster.namespace)
            elif doc["kind"] == "RoleBinding":
                rbac.delete_namespaced_role_binding(meta["name"], cluster.namespace)
        process, log, _, _ = start_chart_operator(
            api, kubeconfig, narrowed, system, tmp_path / "after", "--resync-seconds", str(RESYNC_SECONDS)
        )
        wait_for(lambda: says(elsewhere), "the team's operator says it watches the other namespace now")
        found = wait_for(
            lambda: cluster.llmt("handed")["status"].get("operator") == first and cluster.llmt("handed"),
            "taken over by the cluster-wide operator",
            timeout=60,
        )
        assert found["status"]["phase"] == "Ready"
        wait_for(lambda: cluster.env("handed") == env, "the cluster-wide operator's settings injected again")
        assert "no longer watches namespace" in operator.output()
        generation = cluster.deployment("handed")["metadata"]["generation"]
        # No more rollouts: the team's operator no longer watches this namespace, and the cluster-wide operator's
        # resyncs change nothing. The first resync logged from here on may be the pass that took the resource over
        # (its line comes after its writes); the second started after it (see schedule.py), so after this point.
        mark = len(operator.output())
        wait_for(
            lambda: operator.output()[mark:].count(f"{cluster.namespace}/handed: reconciled (resync)") >= 2,
            "two resyncs of the cluster-wide operator's since the takeover",
            timeout=90,
        )
        assert cluster.deployment("handed")["metadata"]["generation"] == generation
        text = log.read_text(errors="replace")
        assert not refused_lines(text), text[-3000:]
    finally:
        stop(process)
        # Left to no one that runs, its deletion would wait for the team's operator's takeover grace to pass.
        _absent_as_none(
            cluster.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, cluster.namespace, PLURAL, "handed", {"status": {"operator": None}},
        )  # fmt: skip
        _absent_as_none(
            cluster.custom.delete_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL, "handed"
        )
        read = cluster.custom.get_namespaced_custom_object
        wait_for(
            lambda: _absent_as_none(read, GROUP, VERSION, cluster.namespace, PLURAL, "handed") is None,
            "the resource deleted",
        )
        uninstall(api, docs, (system, elsewhere))
