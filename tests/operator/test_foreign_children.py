"""Objects that carry a child's owner label but are not controlled by the resource: never written, never deleted.

The owner label (``llmtelemetry.dev/owner``) is how the operator finds children, not proof that one is its own:
anyone may put it on an object of theirs (a GitOps copy of a child), and children orphaned by
``kubectl delete --cascade=orphan`` keep it with no owner reference. Only the controller owner reference (the
resource's uid) makes an object a child to repair and delete. Against the kmock emulator.
"""

from __future__ import annotations

import copy
from typing import Any

from kopf_testing import (
    CONFIGMAPS,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PROMETHEUSRULES,
    SERVICEMONITORS,
    SERVICES,
    condition,
    deployment,
    eventually,
    get,
    install_prometheus_operator_crds,
    minimal_llmt,
    posted_events,
    ready,
    running_operator,
)
from test_operator_kmock import check_usage, hand, one_pass

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import reconcile as rec
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.kube import KubeClient, server_configuration
from llm_telemetry_operator.spec import parse_spec

LLMT_PATH = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
CONFIGMAPS_PATH = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
RULES_PATH = f"/apis/monitoring.coreos.com/v1/namespaces/{NAMESPACE}/prometheusrules"


def labels(owner: str, component: str) -> dict[str, str]:
    return {c.LABEL_MANAGED_BY: c.MANAGER, c.LABEL_OWNER: owner, c.LABEL_COMPONENT: component}


def team_b_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    """Team B's dashboard ConfigMap and PrometheusRule: named and labelled as the children of an LLMTelemetry
    ``teamb`` would be, but with no owner reference (a GitOps copy, or left by ``--cascade=orphan``)."""
    dashboard = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "teamb-llm-dashboard", "namespace": NAMESPACE, "labels": labels("teamb", "dashboard")},
        "data": {"teamb-own.json": '{"title": "team B"}', "notes": "kept by team B"},
    }
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "teamb-llm-telemetry", "namespace": NAMESPACE, "labels": labels("teamb", "alerts")},
        "spec": {"groups": [{"name": "team-b", "rules": [{"alert": "TeamBDown", "expr": "up == 0"}]}]},
    }
    return dashboard, rule


def team_b_cluster(emulator: Any, monitoring_crds: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "teamb"] = deployment("teamb", labels={"app": "teamb"})
    dashboard, rule = team_b_objects()
    emulator.objects[CONFIGMAPS, NAMESPACE, "teamb-llm-dashboard"] = copy.deepcopy(dashboard)
    emulator.objects[PROMETHEUSRULES, NAMESPACE, "teamb-llm-telemetry"] = copy.deepcopy(rule)
    return dashboard, rule


def tenant_resource() -> dict[str, Any]:
    return minimal_llmt("teamb", selector={"matchLabels": {"app": "teamb"}})


def unchanged(emulator: Any, resource: str, name: str, original: dict[str, Any]) -> None:
    now = get(emulator, resource, name)
    assert now is not None, f"{name} was deleted"
    assert "ownerReferences" not in now["metadata"], now["metadata"]
    assert now["metadata"]["labels"] == original["metadata"]["labels"]
    for part in ("data", "spec"):
        assert now.get(part) == original.get(part), f"{name}: {part} changed"


def operator_writes_to(emulator: Any, paths: set[str]) -> list[tuple[str, str]]:
    return [
        (req.method.value, str(req.url.path))
        for req in list(emulator)
        if not req.headers.get("X-Test-Hand")
        and req.method.value in ("PATCH", "PUT", "DELETE")
        and str(req.url.path) in paths
    ]


async def test_labelled_objects_without_an_owner_reference_are_reported_not_written(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A tenant creates an LLMTelemetry named after team B's labelled objects: its first pass (children created, a
    409 read back) and its later ones (children listed by the label) write neither, and its status says why."""
    dashboard, rule = team_b_cluster(emulator, monitoring_crds)
    emulator.objects[LLMT, NAMESPACE, "teamb"] = tenant_resource()
    paths = {f"{CONFIGMAPS_PATH}/teamb-llm-dashboard", f"{RULES_PATH}/teamb-llm-telemetry"}
    for _ in range(2):  # the first pass (no status yet: creates) and the next (lists the children by label)
        outcome = await one_pass(emulator, "teamb")
        assert not outcome.ready
        unchanged(emulator, CONFIGMAPS, "teamb-llm-dashboard", dashboard)
        unchanged(emulator, PROMETHEUSRULES, "teamb-llm-telemetry", rule)
        assert operator_writes_to(emulator, paths) == []
        owner = get(emulator, LLMT, "teamb")
        for type_, reason in ((c.CONDITION_DASHBOARD, "ConfigMapFailed"), (c.CONDITION_ALERTS, "PrometheusRuleFailed")):
            found = condition(owner, type_)
            assert found["status"] == "False" and found["reason"] == reason, found
            assert "not this LLMTelemetry's" in found["message"]
            assert "--cascade=orphan" in found["message"] and "delete it" in found["message"]
        assert condition(owner, "Ready")["status"] == "False"
    # What is the resource's own is made as usual.
    assert get(emulator, SERVICEMONITORS, "teamb-llm-telemetry")["metadata"]["ownerReferences"][0]["uid"] == "uid-teamb"


async def test_labelled_objects_without_an_owner_reference_survive_the_resource(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Run by kopf: the tenant's resource reports the objects (Warning event), and deleting it (its finalizer's
    clean-up) leaves them as they were, while its own children go."""
    dashboard, rule = team_b_cluster(emulator, monitoring_crds)
    async with running_operator():
        await hand(emulator, "POST", LLMT_PATH, tenant_resource())
        await eventually(
            lambda: condition(get(emulator, LLMT, "teamb"), c.CONDITION_ALERTS).get("reason") == "PrometheusRuleFailed",
            "the rule reported",
        )
        await eventually(
            lambda: [e for e in posted_events(emulator) if "not this LLMTelemetry's" in str(e.get("message"))],
            "a Warning event about team B's objects",
        )
        await eventually(lambda: get(emulator, SERVICEMONITORS, "teamb-llm-telemetry"), "its own ServiceMonitor")
        await hand(emulator, "DELETE", f"{LLMT_PATH}/teamb")
        await eventually(lambda: get(emulator, LLMT, "teamb") is None, "the tenant's resource gone")
    assert get(emulator, SERVICEMONITORS, "teamb-llm-telemetry") is None  # its own child: deleted
    unchanged(emulator, CONFIGMAPS, "teamb-llm-dashboard", dashboard)
    unchanged(emulator, PROMETHEUSRULES, "teamb-llm-telemetry", rule)
    paths = {f"{CONFIGMAPS_PATH}/teamb-llm-dashboard", f"{RULES_PATH}/teamb-llm-telemetry"}
    assert operator_writes_to(emulator, paths) == []
    check_usage(emulator)


async def test_a_resource_made_again_after_an_orphaning_delete_is_told_to_delete_the_old_children(
    emulator: Any, monitoring_crds: Any
) -> None:
    """``kubectl delete --cascade=orphan`` and the resource created again under its name: the old children (labelled,
    no owner reference) are reported, not taken; deleted as the message says, they are made anew as its own."""
    team_b_cluster(emulator, monitoring_crds)
    emulator.objects[LLMT, NAMESPACE, "teamb"] = tenant_resource()
    await one_pass(emulator, "teamb")
    message = condition(get(emulator, LLMT, "teamb"), c.CONDITION_DASHBOARD)["message"]
    assert "delete it" in message and "--cascade=orphan" in message
    await hand(emulator, "DELETE", f"{CONFIGMAPS_PATH}/teamb-llm-dashboard")
    await hand(emulator, "DELETE", f"{RULES_PATH}/teamb-llm-telemetry")
    outcome = await one_pass(emulator, "teamb")
    assert outcome.ready, outcome.failures
    for resource, name in ((CONFIGMAPS, "teamb-llm-dashboard"), (PROMETHEUSRULES, "teamb-llm-telemetry")):
        refs = get(emulator, resource, name)["metadata"]["ownerReferences"]
        assert [(ref["uid"], ref["controller"]) for ref in refs] == [("uid-teamb", True)]


async def test_a_genuine_child_edited_by_hand_is_still_repaired(emulator: Any, monitoring_crds: Any) -> None:
    """A child the resource controls is repaired whatever was edited: a key added to the dashboard ConfigMap, the
    rule's groups replaced, its owner label changed."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    assert (await one_pass(emulator, "chat")).ready
    made_dashboard = get(emulator, CONFIGMAPS, "chat-llm-dashboard")
    made_rule = get(emulator, PROMETHEUSRULES, "chat-llm-telemetry")
    await hand(emulator, "PATCH", f"{CONFIGMAPS_PATH}/chat-llm-dashboard", {"data": {"extra.json": "{}"}})
    await hand(
        emulator,
        "PATCH",
        f"{RULES_PATH}/chat-llm-telemetry",
        {"metadata": {"labels": {c.LABEL_OWNER: "someone"}}, "spec": {"groups": [{"name": "x", "rules": []}]}},
    )
    assert (await one_pass(emulator, "chat")).ready
    assert get(emulator, CONFIGMAPS, "chat-llm-dashboard")["data"] == made_dashboard["data"]
    repaired = get(emulator, PROMETHEUSRULES, "chat-llm-telemetry")
    assert repaired["spec"] == made_rule["spec"]
    assert repaired["metadata"]["labels"][c.LABEL_OWNER] == "chat"


def test_a_peers_service_is_taken_over_only_if_that_peer_controls_it() -> None:
    """The hand-over of a metrics Service from a peer this resource outranks (or one being deleted) takes only what
    that peer controls: the peer's label on an object with no owner reference, or with another's, is not enough."""
    mine = minimal_llmt("aaa")
    peer = minimal_llmt("zeta")
    mine["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    peer["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    peers = rec.PeerView.of([(peer, parse_spec(peer["spec"]))])
    outranked = rec._Outranked(mine, peers, [deployment()])
    assert "zeta" in outranked

    def service(references: list[dict[str, Any]]) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": "chat-llm-metrics", "labels": labels("zeta", "metrics")}
        if references:
            meta["ownerReferences"] = references
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta}

    assert outranked.adopts(service([r.build_owner_reference(peer)]))
    assert not outranked.adopts(service([]))
    stranger = {**r.build_owner_reference(peer), "uid": "uid-someone-else"}
    assert not outranked.adopts(service([stranger]))
    desired = r.build_metrics_service(mine, parse_spec(mine["spec"]), deployment())
    assert not rec._ours(service([]), desired, outranked.adopts)
    assert rec._ours(service([r.build_owner_reference(mine)]), desired, outranked.adopts)
    # Being deleted, a peer is known by its uid all the same (the operator's PeerView has it).
    leaving = rec.PeerView(
        selecting=lambda _labels: [],
        named=lambda _name: None,
        leaving=lambda name: name == "zeta",
        uid=lambda name: "uid-zeta" if name == "zeta" else None,
    )
    gone = rec._Outranked(mine, leaving, [deployment()])
    assert gone.adopts(service([r.build_owner_reference(peer)]))
    assert not gone.adopts(service([]))


async def test_the_clean_up_deletes_only_what_the_resource_controls(emulator: Any, monitoring_crds: Any) -> None:
    """The finalizer's clean-up (``delete_children``) deletes the resource's children, found by the owner label, but
    not an object labelled so that the resource does not control."""
    dashboard, rule = team_b_cluster(emulator, monitoring_crds)
    owner = tenant_resource()
    emulator.objects[LLMT, NAMESPACE, "teamb"] = owner
    await one_pass(emulator, "teamb")
    assert get(emulator, SERVICEMONITORS, "teamb-llm-telemetry") is not None
    client = KubeClient(server_configuration(str(emulator.url)))
    try:
        await rec.delete_children(client, owner)
    finally:
        await client.close()
    assert get(emulator, SERVICEMONITORS, "teamb-llm-telemetry") is None
    unchanged(emulator, CONFIGMAPS, "teamb-llm-dashboard", dashboard)
    unchanged(emulator, PROMETHEUSRULES, "teamb-llm-telemetry", rule)


async def test_an_orphaning_delete_leaves_every_child(emulator: Any, monitoring_crds: Any) -> None:
    """``kubectl delete --cascade=orphan``: the API server adds its finalizer ``orphan``, and its garbage collector
    takes the owner references off the children, which stay. The operator removes its injection (workloads are
    not the resource's children) and its own finalizer, and deletes no child: on a real API server it raced the
    garbage collector and deleted those not reached yet, a random part of them."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    made = {
        (SERVICES, "chat-llm-metrics"),
        (SERVICEMONITORS, "chat-llm-telemetry"),
        (PROMETHEUSRULES, "chat-llm-telemetry"),
        (CONFIGMAPS, "chat-llm-dashboard"),
    }
    async with running_operator():
        await ready(emulator)
        assert all(get(emulator, resource, name) is not None for resource, name in made)
        await hand(emulator, "PATCH", f"{LLMT_PATH}/chat", {"metadata": {"finalizers": [c.FINALIZER, "orphan"]}})
        await hand(emulator, "DELETE", f"{LLMT_PATH}/chat")
        await eventually(
            lambda: get(emulator, LLMT, "chat")["metadata"]["finalizers"] == ["orphan"], "the operator's finalizer off"
        )
        assert r.injected_record(get(emulator, DEPLOYMENTS, "chat")) is None
        assert {(resource, name) for resource, name in made if get(emulator, resource, name) is not None} == made
    check_usage(emulator)
