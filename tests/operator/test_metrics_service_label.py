"""Each metrics Service lists the pods of its own workload only: it selects the label the injection puts on that
workload's pod template (``llmtelemetry.dev/metrics-service: <the Service's name>``), not the workload's pod
selector. In the usual canary layout (``chat`` with pods ``app: chat`` and ``chat-canary`` with pods ``app: chat,
track: canary``, each served by an LLMTelemetry of its own) the pod selector of ``chat`` matches the canary's pods
too, which declare the metrics port once the other resource injects them: Prometheus scraped them twice, under the
jobs of both resources, and neither resource said so."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from kopf_testing import (
    DENIED,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    SERVICES,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    posted_events,
    ready,
    reported,
    running_operator,
    writes,
)
from test_operator_kmock import hand

from kube_schema import merge_patch
from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec

DEPLOYMENT_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"


def selecting(name: str, labels: dict[str, str], pods: dict[str, str]) -> dict[str, Any]:
    """A Deployment labelled ``labels`` whose selector and pod template labels are ``pods``."""
    workload = deployment(name, labels=labels)
    workload["spec"]["selector"] = {"matchLabels": dict(pods)}
    workload["spec"]["template"]["metadata"]["labels"] = dict(pods)
    return workload


def pod_labels(workload: Mapping[str, Any] | None) -> dict[str, str]:
    return dict((workload or {})["spec"]["template"]["metadata"].get("labels") or {})


def selects(service: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a Service's selector (equality on every key) selects pods labelled ``labels``."""
    selector = (service or {})["spec"]["selector"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


async def test_in_the_canary_layout_each_metrics_service_selects_its_own_workloads_pods_only(
    emulator: Any, monitoring_crds: Any
) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = selecting("chat", {"app": "chat"}, {"app": "chat"})
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat-canary"] = selecting(
        "chat-canary", {"app": "chat-canary"}, {"app": "chat", "track": "canary"}
    )
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt("chat")
    emulator.objects[LLMT, NAMESPACE, "canary"] = minimal_llmt(
        "canary", selector={"matchLabels": {"app": "chat-canary"}}
    )
    async with running_operator():
        for name in ("chat", "canary"):
            await ready(emulator, name)
        stable, canary = get(emulator, DEPLOYMENTS, "chat"), get(emulator, DEPLOYMENTS, "chat-canary")
        stable_service = get(emulator, SERVICES, "chat-llm-metrics")
        canary_service = get(emulator, SERVICES, "chat-canary-llm-metrics")
    # The pod template of each carries the label, naming its own Service, and each Service selects on it alone.
    assert pod_labels(stable)[c.LABEL_METRICS_SERVICE] == "chat-llm-metrics"
    assert pod_labels(canary)[c.LABEL_METRICS_SERVICE] == "chat-canary-llm-metrics"
    assert (stable_service or {})["spec"]["selector"] == {c.LABEL_METRICS_SERVICE: "chat-llm-metrics"}
    assert (canary_service or {})["spec"]["selector"] == {c.LABEL_METRICS_SERVICE: "chat-canary-llm-metrics"}
    # Each selects its own workload's pods and not the other's (the canary's pods, app: chat, are not chat's).
    assert selects(stable_service, pod_labels(stable)) and not selects(stable_service, pod_labels(canary))
    assert selects(canary_service, pod_labels(canary)) and not selects(canary_service, pod_labels(stable))
    # And no pod can be selected by both: the two selectors ask one key for two values.
    both = {**stable_service["spec"]["selector"], **canary_service["spec"]["selector"]}  # type: ignore[index]
    assert not (selects(stable_service, both) and selects(canary_service, both))


async def test_the_label_comes_off_with_the_injection(emulator: Any, monitoring_crds: Any) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await ready(emulator)
        assert pod_labels(get(emulator, DEPLOYMENTS, "chat"))[c.LABEL_METRICS_SERVICE] == "chat-llm-metrics"
        # No longer selected (relabelled): the injection is removed, the label with it, and the Service goes.
        relabel = {"metadata": {"labels": {"app": "other"}}}
        await hand(emulator, "PATCH", f"{DEPLOYMENT_PATH}/chat", relabel)
        workload = await eventually(
            lambda: (
                c.ANNOTATION_INJECTED not in (get(emulator, DEPLOYMENTS, "chat")["metadata"].get("annotations") or {})
                and get(emulator, DEPLOYMENTS, "chat")
            ),
            "the injection removed",
        )
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics") is None, "the metrics Service deleted")
    assert pod_labels(workload) == pod_labels(deployment())


async def test_a_workload_injected_before_the_label_gets_it_and_then_its_service_selects_it(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A workload and a metrics Service as an earlier version left them (the injection without the label, the
    Service on the pod selector): the next pass adds the label to the pod template (one rollout), and only then
    switches the Service's selector to it, taking the old keys off."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="")
    plain = deployment()
    spec = parse_spec(minimal_llmt()["spec"])
    patch = r.build_workload_patch(plain, r.build_injection(spec, config, plain, "chat"), "chat")
    earlier = merge_patch(plain, patch)
    del earlier["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE]
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = earlier
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    emulator.objects[SERVICES, NAMESPACE, "chat-llm-metrics"] = {
        **r.build_metrics_service(minimal_llmt(), spec, plain),
        "spec": {"clusterIP": "None", "selector": {"pod": "chat"}, "ports": [{"name": "llm-metrics", "port": 9464}]},
    }
    async with running_operator():
        await ready(emulator)
        service = await eventually(
            lambda: (
                get(emulator, SERVICES, "chat-llm-metrics")["spec"]["selector"]  # type: ignore[index]
                == {c.LABEL_METRICS_SERVICE: "chat-llm-metrics"}
                and get(emulator, SERVICES, "chat-llm-metrics")
            ),
            "the Service on the label alone",
        )
        upgraded = get(emulator, DEPLOYMENTS, "chat")
    assert pod_labels(upgraded)[c.LABEL_METRICS_SERVICE] == "chat-llm-metrics"
    assert selects(service, pod_labels(upgraded))
    # The same injection otherwise: the label is all the rollout brings.
    assert upgraded["spec"]["template"]["spec"] == earlier["spec"]["template"]["spec"]  # type: ignore[index]
    # The workload first, then the Service: old pods drop out of the Service as the rollout replaces them.
    done = writes(emulator)
    workload_patch = done.index(("PATCH", f"{DEPLOYMENT_PATH}/chat"))
    service_patch = done.index(("PATCH", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics"))
    assert workload_patch < service_patch


def _injected_before(plain: dict[str, Any], spec: Any) -> dict[str, Any]:
    """``plain`` as an earlier version injected it: the injection without the label."""
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="")
    earlier = merge_patch(plain, r.build_workload_patch(plain, r.build_injection(spec, config, plain, "chat"), "chat"))
    del earlier["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE]
    return earlier


async def test_a_paused_workload_injected_before_the_label_keeps_its_pods_scraped(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A paused Deployment's controller rolls no pod: its template gets the label, its pods (injected by an earlier
    version, without it) keep running as they are, and its Service keeps selecting them by the workload's selector
    (on the label alone it listed none, and the status still said it was scraped)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    earlier = _injected_before(deployment(), parse_spec(minimal_llmt()["spec"]))
    earlier["spec"]["paused"] = True
    earlier["spec"]["replicas"] = 1
    earlier["status"] = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 0}  # (the pods of before)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = earlier
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await ready(emulator)
        await eventually(
            lambda: c.LABEL_METRICS_SERVICE in pod_labels(get(emulator, DEPLOYMENTS, "chat")), "the template labelled"
        )
        service = await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics"), "the metrics Service")
    assert selects(service, pod_labels(earlier))  # the pods it runs, without the label


async def test_a_workload_injected_before_the_label_and_held_for_its_prices_keeps_its_pods_scraped(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Its pricing ConfigMap is missing, so the workload is left as it is (injected by an earlier version, without
    the label): its Service keeps selecting its pods by the workload's selector until it can be injected again."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    pricing = {"configMapRef": {"name": "prices", "key": "prices.yaml"}}
    earlier = _injected_before(deployment(), parse_spec(minimal_llmt(pricing=pricing)["spec"]))
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = earlier
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(pricing=pricing)
    async with running_operator():
        service = await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics"), "the metrics Service")
        still = get(emulator, DEPLOYMENTS, "chat")
    assert c.LABEL_METRICS_SERVICE not in pod_labels(still)  # left as it was
    assert selects(service, pod_labels(earlier))


async def test_a_paused_workload_labelled_but_not_rolled_and_held_for_its_prices_keeps_its_pods_scraped(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A paused Deployment whose template this version labelled while its pods did not roll, then held back because
    its pricing ConfigMap is missing: its pods (without the label) are still selected."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    pricing = {"configMapRef": {"name": "prices", "key": "prices.yaml"}}
    spec = parse_spec(minimal_llmt(pricing=pricing)["spec"])
    plain = deployment()
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="")
    labelled = merge_patch(plain, r.build_workload_patch(plain, r.build_injection(spec, config, plain, "chat"), "chat"))
    labelled["spec"].update(paused=True, replicas=1)
    labelled["metadata"]["generation"] = 2
    labelled["status"] = {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 0}  # (pods of before)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = labelled
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(pricing=pricing)
    running = {k: v for k, v in pod_labels(labelled).items() if k != c.LABEL_METRICS_SERVICE}
    async with running_operator():
        service = await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics"), "the metrics Service")
    assert selects(service, running)


def _label_writes(emulator: Any, name: str) -> list[Any]:
    """The label's values in the operator's patches of the Deployment ``name`` (a key set to None: removed)."""
    found = []
    for req in list(emulator):
        if req.method.value != "PATCH" or str(req.url.path) != f"{DEPLOYMENT_PATH}/{name}":
            continue
        if req.headers.get("X-Test-Hand"):
            continue  # (the user's)
        labels = "/spec/template/metadata/labels"
        key = c.LABEL_METRICS_SERVICE.replace("~", "~0").replace("/", "~1")
        for op in req.data:  # a JSON patch: what it does to the label
            if op["op"] == "add" and op["path"] == f"{labels}/{key}":
                found.append(op["value"])
            elif op["op"] == "add" and op["path"] == labels and c.LABEL_METRICS_SERVICE in op["value"]:
                found.append(op["value"][c.LABEL_METRICS_SERVICE])
            elif op["op"] == "remove" and op["path"] == f"{labels}/{key}":
                found.append(None)
    return found


async def test_a_label_value_the_manifest_sets_itself_is_left_as_it_is_and_reported(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A manifest copied from another injected workload's live YAML (``chat-v2`` with ``chat``'s label value), applied
    again by GitOps on every sync: the operator replaced the value with its own at every pass and each sync set it
    back, two rollouts per sync; and the removal deleted it. The value it did not write is left (and kept on removal),
    the Service selects the pods by the workload's selector, and the status and a Warning event say so."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    copied = deployment("chat-v2")
    copied["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] = "chat-llm-metrics"
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat-v2"] = copied
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        metrics = await reported(emulator, c.CONDITION_METRICS, "ServiceLabelOverridden", "the user's label reported")
        injected = await eventually(
            lambda: (
                c.ANNOTATION_INJECTED in (get(emulator, DEPLOYMENTS, "chat-v2")["metadata"].get("annotations") or {})
                and get(emulator, DEPLOYMENTS, "chat-v2")
            ),
            "the workload injected",
        )
        service = await eventually(lambda: get(emulator, SERVICES, "chat-v2-llm-metrics"), "its metrics Service")
        events = await eventually(lambda: posted_events(emulator, "ServiceLabelOverridden"), "a Warning event")
        # The user's sync again: nothing for the operator to set back.
        await hand(emulator, "PATCH", f"{DEPLOYMENT_PATH}/chat-v2", {"spec": copied["spec"]})
        # No longer selected: the injection is removed, the user's label is not.
        await hand(emulator, "PATCH", f"{DEPLOYMENT_PATH}/chat-v2", {"metadata": {"labels": {"app": "other"}}})
        removed = await eventually(
            lambda: (
                c.ANNOTATION_INJECTED
                not in (get(emulator, DEPLOYMENTS, "chat-v2")["metadata"].get("annotations") or {})
                and get(emulator, DEPLOYMENTS, "chat-v2")
            ),
            "the injection removed",
        )
    assert "Deployment/chat-v2 sets it to 'chat-llm-metrics'" in metrics["message"], metrics
    assert c.LABEL_METRICS_SERVICE in metrics["message"]
    assert events and events[0]["type"] == "Warning" and "Deployment/chat-v2" in events[0]["message"]
    # Injected, with the user's value as it was: one rollout (the injection), no value of the operator's written.
    assert pod_labels(injected) == pod_labels(copied)
    assert injected["metadata"]["generation"] == 2
    assert _label_writes(emulator, "chat-v2") == []
    # Its Service lists its pods by the workload's selector, not by the label (which names chat's Service).
    assert service["spec"]["selector"] == {"pod": "chat-v2"}
    assert selects(service, pod_labels(injected))
    # What the user wrote stays.
    assert pod_labels(removed) == pod_labels(copied)
    assert removed["spec"]["template"]["spec"] == copied["spec"]["template"]["spec"]


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "labelled-by-an-earlier-version"])
async def test_the_pods_of_a_workload_that_loses_its_metrics_service_name_do_not_carry_the_winners(
    emulator: Any, monitoring_crds: Any, earlier: bool
) -> None:
    """``chat.v2``'s metrics Service is named from a hash, which ``chat-v2-f5101bcf``'s plain name equals: the first
    by kind and name has the Service (ServiceNameClash), and the other's pods carried its name in the label that
    Service selects by, so it listed them too (a second workload's pods scraped under the first's Service). They are
    injected without it; pods an earlier version labelled so have it taken off."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    shared = r.service_name("chat.v2")
    winner = shared[: -len("-llm-metrics")]
    loser = deployment("chat.v2")
    if earlier:
        config = OperatorConfig(peering=PEERING, metrics_port=0, health="")
        spec = parse_spec(minimal_llmt()["spec"])
        loser = merge_patch(
            loser, r.build_workload_patch(loser, r.build_injection(spec, config, loser, "chat"), "chat")
        )
        assert pod_labels(loser)[c.LABEL_METRICS_SERVICE] == shared  # (as it was)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat.v2"] = loser
    emulator.objects[DEPLOYMENTS, NAMESPACE, winner] = deployment(winner)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        metrics = await reported(emulator, c.CONDITION_METRICS, "ServiceNameClash", "the clash reported")
        service = await eventually(lambda: get(emulator, SERVICES, shared), "the winner's metrics Service")
        lost = await eventually(
            lambda: (
                c.LABEL_METRICS_SERVICE not in pod_labels(get(emulator, DEPLOYMENTS, "chat.v2"))
                and c.ANNOTATION_CONFIG_HASH
                in get(emulator, DEPLOYMENTS, "chat.v2")["spec"]["template"]["metadata"]["annotations"]
                and get(emulator, DEPLOYMENTS, "chat.v2")
            ),
            "the loser injected, its pods without the label",
        )
        won = get(emulator, DEPLOYMENTS, winner)
    assert f"Deployment/chat.v2 would share Service {shared} with Deployment/{winner}" in metrics["message"]
    # Both injected (the loser's traces and logs go on); the Service lists the winner's pods only.
    for workload in (lost, won):
        assert c.ANNOTATION_INJECTED in workload["metadata"]["annotations"]
        assert c.ANNOTATION_CONFIG_HASH in workload["spec"]["template"]["metadata"]["annotations"]
    assert pod_labels(won)[c.LABEL_METRICS_SERVICE] == shared
    assert selects(service, pod_labels(won)) and not selects(service, pod_labels(lost))


@pytest.mark.parametrize("change", ["edited", "deselected"])
async def test_while_a_clash_winners_patch_is_refused_the_loser_does_not_take_its_name(
    emulator: Any, monitoring_crds: Any, change: str
) -> None:
    """An admission webhook refuses the operator's patches of the clash's winner, injected before: edited since (a
    deploy dropped a variable), or no longer selected (its injection to remove). Its pods keep the label naming the
    shared Service, and the loser neither gets that label nor rolls (it rolled twice: labelled while the refusal
    lasted, then not; and one Service listed both workloads' pods); edited, the winner keeps its Service."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    shared = r.service_name("chat.v2")
    winner = shared[: -len("-llm-metrics")]
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat.v2"] = deployment("chat.v2")
    emulator.objects[DEPLOYMENTS, NAMESPACE, winner] = deployment(winner)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await reported(emulator, c.CONDITION_METRICS, "ServiceNameClash", "the clash reported")
        await asyncio.sleep(1.0)
        generation = get(emulator, DEPLOYMENTS, "chat.v2")["metadata"]["generation"]
        emulator.deny[("deployments", winner)] = DENIED
        edit: dict[str, Any] = {"metadata": {"labels": {"app": "other"}}}
        if change == "edited":
            container = get(emulator, DEPLOYMENTS, winner)["spec"]["template"]["spec"]["containers"][0]
            kept = [e for e in container["env"] if e["name"] != "OTEL_SERVICE_NAME"]
            edit = {"spec": {"template": {"spec": {"containers": [{**container, "env": kept}]}}}}
        await hand(emulator, "PATCH", f"{DEPLOYMENT_PATH}/{winner}", edit)
        await reported(emulator, c.CONDITION_INJECTED, "InjectionFailed", "the refusal reported")
        await asyncio.sleep(1.0)
        lost = get(emulator, DEPLOYMENTS, "chat.v2")
        service = get(emulator, SERVICES, shared)
    assert lost["metadata"]["generation"] == generation
    assert c.LABEL_METRICS_SERVICE not in pod_labels(lost)
    if change == "edited":
        assert selects(service, pod_labels(get(emulator, DEPLOYMENTS, winner)))
        assert (service or {})["metadata"]["labels"]["app.kubernetes.io/name"] == winner


def test_a_label_the_manifest_sets_to_the_services_own_name_stays_after_the_removal() -> None:
    """The manifest of the workload itself sets the label to its Service's name before the first injection: the same
    value as the injection's, which nothing then changes; the record says it was there before, so removing the
    injection leaves it. (Set after the injection, from an export of the live YAML, it cannot be told from the
    operator's: docs/operator.md says so.)"""
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="")
    spec = parse_spec(minimal_llmt()["spec"])
    own = deployment()
    own["spec"]["template"]["metadata"]["labels"][c.LABEL_METRICS_SERVICE] = "chat-llm-metrics"
    injected = merge_patch(own, r.build_workload_patch(own, r.build_injection(spec, config, own, "chat"), "chat"))
    assert pod_labels(injected) == pod_labels(own)
    removed = merge_patch(injected, r.build_workload_patch(injected, None, "chat"))
    assert c.ANNOTATION_INJECTED not in (removed["metadata"].get("annotations") or {})
    assert pod_labels(removed) == pod_labels(own)
    # One the injection put there goes with it.
    plain = deployment()
    ours = merge_patch(plain, r.build_workload_patch(plain, r.build_injection(spec, config, plain, "chat"), "chat"))
    assert pod_labels(ours)[c.LABEL_METRICS_SERVICE] == "chat-llm-metrics"
    assert pod_labels(merge_patch(ours, r.build_workload_patch(ours, None, "chat"))) == pod_labels(plain)
