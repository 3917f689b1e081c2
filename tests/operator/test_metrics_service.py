"""The metrics Service is headless: no Service IP per target; one made with an IP by an earlier version is replaced."""

from __future__ import annotations

from typing import Any

from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    SERVICES,
    condition,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    running_operator,
)

from llm_telemetry_operator import constants as c
from llm_telemetry_operator.resources import build_owner_reference


async def test_metrics_service_with_a_cluster_ip_is_replaced_by_a_headless_one(
    emulator: Any, monitoring_crds: Any
) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[DEPLOYMENTS, NAMESPACE, "embed"] = deployment("embed", labels={"app": "chat"})
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    # What an earlier version made: the same Service, with a cluster IP.
    emulator.objects[SERVICES, NAMESPACE, "chat-llm-metrics"] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "chat-llm-metrics",
            "namespace": NAMESPACE,
            "resourceVersion": "7",
            "labels": {c.LABEL_MANAGED_BY: c.MANAGER, c.LABEL_OWNER: "chat", c.LABEL_COMPONENT: "metrics"},
            # Every version made its children controlled by the resource (one without it is someone else's).
            "ownerReferences": [build_owner_reference(minimal_llmt())],
        },
        "spec": {"clusterIP": "10.0.0.5", "selector": {"pod": "chat"}, "ports": [{"name": "llm-metrics", "port": 1}]},
    }
    async with running_operator():
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_READY).get("status") == "True", "Ready"
        )
        for name in ("chat-llm-metrics", "embed-llm-metrics"):
            service = await eventually(
                lambda name=name: (
                    (get(emulator, SERVICES, name) or {}).get("spec", {}).get("clusterIP") == "None"
                    and get(emulator, SERVICES, name)
                ),
                f"{name} headless",
            )
            assert service["spec"]["ports"][0]["port"] == 9464
    deletes = [
        r for r in list(emulator) if r.method.value == "DELETE" and r.resource and r.resource.plural == "services"
    ]
    assert [r.name for r in deletes] == ["chat-llm-metrics"]
