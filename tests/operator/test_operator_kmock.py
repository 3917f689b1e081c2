"""The operator running for real (kopf's loop) against the kmock Kubernetes emulator over HTTP."""

from __future__ import annotations

from typing import Any

from conftest import (
    CONFIGMAPS, DEPLOYMENTS, LLMT, NAMESPACE, PROMETHEUSRULES, SERVICEMONITORS, SERVICES,
    condition, deployment, eventually, get, install_prometheus_operator_crds, minimal_llmt, running_operator,
)


async def test_minimal_resource_wires_everything(emulator: Any, shared_crds: Any) -> None:
    install_prometheus_operator_crds(emulator, shared_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment(env=[{"name": "OTEL_SERVICE_NAME", "value": "mine"}])
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await eventually(lambda: condition(get(emulator, LLMT, "chat"), "Ready").get("status") == "True", "Ready=True")
    dep = get(emulator, DEPLOYMENTS, "chat")
    print(dep)
    print(get(emulator, LLMT, "chat"))
