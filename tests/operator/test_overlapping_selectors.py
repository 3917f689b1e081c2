"""Workloads of one resource whose selectors overlap (a canary selected by ``app: chat`` and by ``app: chat, track:
canary``). Kubernetes asks that selectors not overlap, and the operator says so. (The metrics Services no longer
scrape such pods twice: each selects the label the injection puts on its own workload's pods, see
test_metrics_service_label.py.)"""

from __future__ import annotations

from typing import Any

from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    condition,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    posted_events,
    ready,
    running_operator,
)

from llm_telemetry_operator import constants as c


def selecting(name: str, pods: dict[str, str]) -> dict[str, Any]:
    """A Deployment labelled ``app: chat`` whose selector and pods are ``pods``."""
    workload = deployment(name)
    workload["spec"]["selector"] = {"matchLabels": dict(pods)}
    workload["spec"]["template"]["metadata"]["labels"] = dict(pods)
    return workload


async def test_a_workload_whose_service_selects_anothers_pods_is_reported(emulator: Any, monitoring_crds: Any) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = selecting("chat", {"app": "chat"})
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat-canary"] = selecting(
        "chat-canary", {"app": "chat", "track": "canary"}
    )
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        metrics = await eventually(
            lambda: (
                condition(get(emulator, LLMT, "chat"), c.CONDITION_METRICS).get("reason") == "SelectorsOverlap"
                and condition(get(emulator, LLMT, "chat"), c.CONDITION_METRICS)
            ),
            "MetricsExposed=False, SelectorsOverlap",
        )
        assert metrics["status"] == "False"
        assert "Deployment/chat selects the pods of Deployment/chat-canary" in metrics["message"]
        assert "chat-canary selects" not in metrics["message"]  # the canary's selector does not match chat's pods
        assert condition(get(emulator, LLMT, "chat"), "Ready")["reason"] == "SelectorsOverlap"
        await eventually(lambda: posted_events(emulator, "SelectorsOverlap"), "a SelectorsOverlap Warning event")


async def test_workloads_with_selectors_apart_are_ready(emulator: Any, monitoring_crds: Any) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = selecting("chat", {"app": "chat", "track": "stable"})
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat-canary"] = selecting(
        "chat-canary", {"app": "chat", "track": "canary"}
    )
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        owner = await ready(emulator)
    assert owner["status"]["targets"] == ["Deployment/chat", "Deployment/chat-canary"]
