"""Upgrading to the dashboard uids and child names that no other resource's can spell (see resources.dashboard_uid
and resources._name): what an earlier version wrote under the old uid or names goes in the first pass."""

from __future__ import annotations

import hashlib
from typing import Any

from kopf_testing import (
    CONFIGMAPS,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PROMETHEUSRULES,
    SERVICEMONITORS,
    deployment,
    get,
    install_prometheus_operator_crds,
    minimal_llmt,
)
from test_operator_kmock import one_pass

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r


def earlier_child(kind: str, api_version: str, name: str, owner: dict[str, Any], component: str) -> dict[str, Any]:
    """A child as an earlier version made it: labelled and controlled by ``owner``."""
    labels = {c.LABEL_MANAGED_BY: c.MANAGER, c.LABEL_OWNER: owner["metadata"]["name"], c.LABEL_COMPONENT: component}
    meta = {"name": name, "namespace": NAMESPACE, "labels": labels}
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {**meta, "ownerReferences": [r.build_owner_reference(owner)]},
    }


async def test_a_dashboard_under_its_earlier_uid_is_moved_to_the_new_one(emulator: Any, monitoring_crds: Any) -> None:
    """A name too long for an uncut uid: the dashboard ConfigMap's key was the earlier cut uid; the pass writes the
    dashboard under the new uid and removes the old key (Grafana's sidecar then removes the old dashboard's file)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    name = "customer-support-assistant-production"
    owner = minimal_llmt(name)
    emulator.objects[LLMT, NAMESPACE, name] = owner
    text = f"llmt_{NAMESPACE}_{name}"
    old_key = f"{text[:31]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}.json"
    cm = earlier_child("ConfigMap", "v1", r.dashboard_configmap_name(name), owner, "dashboard")
    cm["data"] = {old_key: '{"uid": "old"}'}
    emulator.objects[CONFIGMAPS, NAMESPACE, r.dashboard_configmap_name(name)] = cm
    outcome = await one_pass(emulator, name)
    assert outcome.ready, outcome.failures
    data = get(emulator, CONFIGMAPS, r.dashboard_configmap_name(name))["data"]
    assert list(data) == [f"{r.dashboard_uid(owner)}.json"] and old_key not in data


async def test_children_under_their_earlier_names_are_replaced(emulator: Any, monitoring_crds: Any) -> None:
    """A resource whose name ends in ``-`` and 8 hex digits had its children under the plain names, and now has them
    under the cut form: the pass makes the new ones and deletes the old (they are its own)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    name = "chat-0badcafe"
    owner = minimal_llmt(name, pricing={"models": {"gpt-4o": {"input": 2, "output": 8}}})
    emulator.objects[LLMT, NAMESPACE, name] = owner
    monitoring = "monitoring.coreos.com/v1"
    old = {
        (SERVICEMONITORS, f"{name}-llm-telemetry"): earlier_child(
            "ServiceMonitor", monitoring, f"{name}-llm-telemetry", owner, "metrics"
        ),
        (PROMETHEUSRULES, f"{name}-llm-telemetry"): earlier_child(
            "PrometheusRule", monitoring, f"{name}-llm-telemetry", owner, "alerts"
        ),
        (CONFIGMAPS, f"{name}-llm-dashboard"): earlier_child(
            "ConfigMap", "v1", f"{name}-llm-dashboard", owner, "dashboard"
        ),
        (CONFIGMAPS, f"{name}-llm-pricing"): earlier_child("ConfigMap", "v1", f"{name}-llm-pricing", owner, "pricing"),
    }
    for (resource, child), body in old.items():
        emulator.objects[resource, NAMESPACE, child] = body
    owner["status"] = {"phase": "Ready"}  # passes ran before: children are listed (and pruned), not only created
    emulator.objects[LLMT, NAMESPACE, name] = owner
    outcome = await one_pass(emulator, name)
    assert outcome.ready, outcome.failures
    for resource, new in (
        (SERVICEMONITORS, r.service_monitor_name(name)),
        (PROMETHEUSRULES, r.prometheus_rule_name(name)),
        (CONFIGMAPS, r.dashboard_configmap_name(name)),
        (CONFIGMAPS, r.pricing_configmap_name(name)),
    ):
        assert get(emulator, resource, new) is not None, new
    for resource, child in old:
        assert get(emulator, resource, child) is None, child
