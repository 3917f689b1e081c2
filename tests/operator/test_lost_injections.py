"""An injection whose removal failed once, or whose status was never written, is still removed: by a later pass,
and by the resource's deletion. A pass looked at the workloads its selector selects and the targets its last status
named; a workload it no longer selected dropped out of both when its removal was refused (an admission webhook, a
conflict after the client's retries), and one injected by a pass whose status write then failed never entered
them. No pass, resync or deletion looked at it again, though its injection record names the resource: its pods
kept exporting, and once the resource was deleted they mounted a pricing ConfigMap that no longer exists. The
operator's watch of the workloads shows their records; the passes look at those too. Against the kmock emulator.
"""

from __future__ import annotations

from typing import Any

from kopf_testing import (
    CONFIGMAPS,
    DENIED,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    condition,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    ready,
    running_operator,
)
from test_operator_kmock import env_of, hand

from llm_telemetry_operator import constants as c
from llm_telemetry_operator.config import OperatorConfig

LLMT_PATH = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
PRICES = {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}


def _injected(emulator: Any, name: str) -> bool:
    workload = get(emulator, DEPLOYMENTS, name) or {}
    annotations = (workload.get("metadata") or {}).get("annotations") or {}
    return "LLM_TELEMETRY_METRICS_PORT" in env_of(workload) or c.ANNOTATION_INJECTED in annotations


def _two_workloads(emulator: Any, monitoring_crds: Any) -> None:
    """Resource ``chat`` (with inline prices, so its workloads mount its pricing ConfigMap) selecting Deployment
    ``chat``; Deployment ``embed`` waits under another label."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[DEPLOYMENTS, NAMESPACE, "embed"] = deployment("embed", labels={"app": "embed"})
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(pricing=PRICES)


async def _move_selector_with_the_removal_refused(emulator: Any) -> None:
    """Point resource ``chat`` at Deployment ``embed`` while every update of Deployment ``chat`` (the removal of
    its injection) is refused, until the refusal is reported and the other workload injected."""
    emulator.deny[("deployments", "chat")] = DENIED
    await hand(emulator, "PATCH", f"{LLMT_PATH}/chat", {"spec": {"selector": {"matchLabels": {"app": "embed"}}}})
    await eventually(lambda: _injected(emulator, "embed"), "the resource's new workload injected")
    await eventually(
        lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_INJECTED).get("reason") == "InjectionFailed",
        "the refusal reported",
    )
    assert _injected(emulator, "chat")
    emulator.deny.clear()


async def test_a_removal_refused_once_is_tried_again(emulator: Any, monitoring_crds: Any) -> None:
    _two_workloads(emulator, monitoring_crds)
    async with running_operator(OperatorConfig(peering=PEERING, metrics_port=0, health="")):
        await ready(emulator)
        assert _injected(emulator, "chat")
        await _move_selector_with_the_removal_refused(emulator)
        # The retry after the refusal (5 s) looks at the workload whose record names the resource.
        await eventually(lambda: not _injected(emulator, "chat"), "the injection removed once allowed", attempts=600)
        owner = await eventually(
            lambda: (
                (o := get(emulator, LLMT, "chat")) and condition(o, c.CONDITION_INJECTED)["reason"] == "Injected" and o
            ),
            "the resource ready again",
        )
    assert owner["status"]["targets"] == ["Deployment/embed"]
    assert condition(owner, c.CONDITION_INJECTED)["reason"] == "Injected"
    # The user's pod spec, as it was.
    assert get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"] == deployment()["spec"]["template"]["spec"]


async def test_deleting_the_resource_removes_an_injection_whose_removal_was_refused(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Deleted before the retry: the deletion removes it, and no workload is left mounting the pricing ConfigMap
    the deletion takes away."""
    _two_workloads(emulator, monitoring_crds)
    async with running_operator(OperatorConfig(peering=PEERING, metrics_port=0, health="")):
        await ready(emulator)
        await _move_selector_with_the_removal_refused(emulator)
        await hand(emulator, "DELETE", f"{LLMT_PATH}/chat")
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "the resource deleted")
    assert not _injected(emulator, "chat") and not _injected(emulator, "embed")
    assert get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"] == deployment()["spec"]["template"]["spec"]
    assert get(emulator, CONFIGMAPS, "chat-llm-pricing") is None


async def test_an_injection_whose_status_was_never_written_is_removed_after_a_relabel(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The operator was killed between injecting Deployment ``chat`` and writing the status that names it (here: a
    status without it), and the workload was relabelled while the operator was down: its only trace is its own
    record, which the next operator finds."""
    _two_workloads(emulator, monitoring_crds)
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="")
    async with running_operator(config):
        await ready(emulator)
    assert _injected(emulator, "chat")
    await hand(emulator, "PATCH", f"{LLMT_PATH}/chat/status", {"status": {"targets": [], "phase": "Pending"}})
    await hand(emulator, "PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat",
               {"metadata": {"labels": {"app": "moved"}}})  # fmt: skip
    async with running_operator(config):
        await eventually(lambda: not _injected(emulator, "chat"), "the injection removed", attempts=900)
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_INJECTED).get("reason") == "NoTargets",
            "no targets reported",
        )
    assert get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"] == deployment()["spec"]["template"]["spec"]


async def test_a_workload_whose_deletion_was_missed_is_read_once(emulator: Any, monitoring_crds: Any) -> None:
    """Deployment ``chat``, injected, is deleted while the operator's watch of it is away (a reconnect after its
    history expired reports nothing of what went meanwhile): its record stays known, and the resource's next pass
    reads the workload it names, which is gone. It is forgotten then: the passes after read it no more (each read
    one GET more, for good)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat"

    def reads() -> int:
        return sum(1 for req in list(emulator) if req.method.value == "GET" and str(req.url.path) == path)

    async with running_operator(OperatorConfig(peering=PEERING, metrics_port=0, health="")) as memo:
        await ready(emulator)
        await eventually(lambda: memo["state"].index.recorded((NAMESPACE, "chat")), "the record seen")
        del emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"]  # gone, with no watch event
        before = reads()
        for generation, interval in ((2, "20s"), (3, "40s")):
            await hand(emulator, "PATCH", f"{LLMT_PATH}/chat", {"spec": {"metrics": {"interval": interval}}})
            await eventually(
                lambda g=generation: (get(emulator, LLMT, "chat")["status"] or {}).get("observedGeneration") == g,
                f"generation {generation} applied",
            )
    assert reads() - before == 1
