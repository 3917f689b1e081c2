"""Two LLMTelemetry selecting one workload, against the kmock emulator: the oldest wins, visibly.

The rule (docs/operator.md): the oldest by ``creationTimestamp`` wins, ties go to the first by name. The winner
injects and owns the scrape, alerts and dashboard; the other reports ``Conflict`` naming the winner, posts a
Warning event, and keeps no ServiceMonitor, PrometheusRule or dashboard of its own.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from kopf_testing import (
    CONFIGMAPS,
    DENIED,
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
    running_operator,
)
from test_operator_kmock import check_usage, hand, passes_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r

OLDER, NEWER = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"
LLMT_PATH = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"


def created(name: str, timestamp: str) -> dict[str, Any]:
    body = minimal_llmt(name)
    body["metadata"]["creationTimestamp"] = timestamp
    return body


def children(kmock: Any, owner: str) -> dict[str, Any]:
    return {
        "service": get(kmock, SERVICES, "chat-llm-metrics"),
        "monitor": get(kmock, SERVICEMONITORS, f"{owner}-llm-telemetry"),
        "rules": get(kmock, PROMETHEUSRULES, f"{owner}-llm-telemetry"),
        "dashboard": get(kmock, CONFIGMAPS, f"{owner}-llm-dashboard"),
    }


def holder(kmock: Any) -> str | None:
    record = r.injected_record(get(kmock, DEPLOYMENTS, "chat") or {})
    return None if record is None else str(record.get("owner"))


def conflict_events(kmock: Any, owner: str) -> list[str]:
    return [
        str(event.get("message"))
        for event in posted_events(kmock, "Conflict")
        if event.get("involvedObject", {}).get("name") == owner
    ]


def reason(kmock: Any, owner: str, type_: str) -> str | None:
    return condition(get(kmock, LLMT, owner), type_).get("reason")


def contested(kmock: Any, monitoring_crds: Any) -> None:
    """One Deployment selected by two resources: "zeta" is older (and last by name, so age decides, not name)."""
    install_prometheus_operator_crds(kmock, monitoring_crds)
    kmock.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    kmock.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    kmock.objects[LLMT, NAMESPACE, "zeta"] = created("zeta", OLDER)


async def test_oldest_wins_and_the_other_stands_by_visibly(emulator: Any, monitoring_crds: Any) -> None:
    """Found together at startup: the older one wins."""
    contested(emulator, monitoring_crds)
    async with running_operator():
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "the older one Ready")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "the newer one in Conflict")
        assert holder(emulator) == "zeta"
        # (A pass of alpha's before zeta's injection says "won by zeta"; the one its injection starts, "served by".)
        injected = await eventually(
            lambda: (
                "served by zeta" in (found := condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED))["message"]
                and found
            ),
            "alpha says zeta serves the workload",
        )
        assert injected["status"] == "False"
        for type_ in (c.CONDITION_METRICS, c.CONDITION_ALERTS, c.CONDITION_DASHBOARD):
            assert reason(emulator, "alpha", type_) == "Conflict"
        assert get(emulator, LLMT, "alpha")["status"]["targets"] == []
        # kubectl describe llmt alpha: a Warning event naming the winner and the rule.
        events = await eventually(lambda: conflict_events(emulator, "alpha"), "Conflict event on alpha")
        assert "LLMTelemetry zeta, which wins it" in events[0] and "oldest" in events[0]
        assert conflict_events(emulator, "zeta") == []
        # Scraped, alerted and charted once: only the winner's children exist.
        assert all(children(emulator, "zeta").values())
        assert children(emulator, "zeta")["service"]["metadata"]["labels"][c.LABEL_OWNER] == "zeta"
        assert not any(v for k, v in children(emulator, "alpha").items() if k != "service")

        # The winner goes away: the other takes the workload over and builds its own children.
        await hand(emulator, "DELETE", f"{LLMT_PATH}/zeta")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready after zeta is gone")
        await eventually(lambda: holder(emulator) == "alpha", "alpha injected")
        await eventually(lambda: all(children(emulator, "alpha").values()), "alpha's children")
        await eventually(lambda: get(emulator, SERVICEMONITORS, "zeta-llm-telemetry") is None, "zeta's children gone")
    check_usage(emulator)


async def test_a_restart_posts_no_conflict_event_the_status_shows(emulator: Any, monitoring_crds: Any) -> None:
    """The newer resource's Conflict event names the workload and the winner; its condition sums up every workload
    it left. A restarted operator (or a standby replica taking over) resumes it with a pass that meets the same
    conflict, which the stored status shows already: no second event."""
    contested(emulator, monitoring_crds)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "the newer one in Conflict")
        await eventually(lambda: conflict_events(emulator, "alpha"), "Conflict event on alpha")
        await asyncio.sleep(1.0)  # every echo has arrived and been handled
        passes = passes_for(emulator, "chat")
    assert len(conflict_events(emulator, "alpha")) == 1
    async with running_operator():
        await eventually(lambda: passes_for(emulator, "chat") >= passes + 2, "both resumed with a pass")
        await asyncio.sleep(1.0)
    assert len(conflict_events(emulator, "alpha")) == 1
    assert reason(emulator, "alpha", "Ready") == "Conflict"


async def test_older_resource_arriving_later_takes_the_workload_over(emulator: Any, monitoring_crds: Any) -> None:
    """ "alpha" serves the workload alone; then "zeta", which ranks first, appears (same timestamp, name decides:
    here "aaa" ranks before "alpha"). The workload changes hands, and alpha's children are removed."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", OLDER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        assert all(children(emulator, "alpha").values())
        await hand(emulator, "POST", LLMT_PATH, created("aaa", OLDER))
        await eventually(lambda: holder(emulator) == "aaa", "aaa took the workload over")
        await eventually(lambda: reason(emulator, "aaa", "Ready") == "Ready", "aaa Ready")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(
            lambda: not any(v for k, v in children(emulator, "alpha").items() if k != "service"),
            "alpha's ServiceMonitor, PrometheusRule and dashboard removed",
        )
        await eventually(
            lambda: (
                (get(emulator, SERVICES, "chat-llm-metrics") or {})
                .get("metadata", {})
                .get("labels", {})
                .get(c.LABEL_OWNER)
                == "aaa"
            ),
            "the metrics Service is aaa's",
        )
        assert await eventually(lambda: conflict_events(emulator, "alpha"), "Conflict event on alpha")
    check_usage(emulator)


async def test_the_winner_deleted_hands_its_workload_over_in_one_step(emulator: Any, monitoring_crds: Any) -> None:
    """The next in line takes the workload over from the resource being deleted before that one's injection is
    removed: the pod template changes once, not twice (removed, then injected again: two rollouts and pods without
    telemetry in between), and the metrics Service changes owner instead of being deleted and created again."""
    contested(emulator, monitoring_crds)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
        generation = get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"]
        before = len(list(emulator))
        await hand(emulator, "DELETE", f"{LLMT_PATH}/zeta")
        await eventually(lambda: get(emulator, LLMT, "zeta") is None, "zeta deleted")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        assert holder(emulator) == "alpha"
        assert get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"] <= generation + 1
        service_path = f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics"
        after = [(req.method.value, str(req.url.path)) for req in list(emulator)[before:]]
        assert ("DELETE", service_path) not in after
        assert (get(emulator, SERVICES, "chat-llm-metrics") or {})["metadata"]["labels"][c.LABEL_OWNER] == "alpha"
        # The Service no longer names the deleted resource as its owner (the garbage collector would delete it).
        references = get(emulator, SERVICES, "chat-llm-metrics")["metadata"].get("ownerReferences") or []
        assert [ref["name"] for ref in references] == ["alpha"]
    check_usage(emulator)


async def test_an_older_resource_naming_no_container_of_the_workload_does_not_hold_it(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The older "zeta" names a container the workload does not have: it does not inject it (``NoContainer``), so it
    does not win it either, and "alpha" serves it. Once the workload gets zeta's container, zeta takes it over."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    zeta = created("zeta", OLDER)
    zeta["spec"]["containers"] = ["worker"]
    emulator.objects[LLMT, NAMESPACE, "zeta"] = zeta
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        await eventually(lambda: reason(emulator, "zeta", c.CONDITION_INJECTED) == "NoContainer", "zeta NoContainer")
        assert holder(emulator) == "alpha"
        assert conflict_events(emulator, "alpha") == []

        worker = {"name": "worker", "image": "example/worker:1"}
        containers = [*get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"]["containers"], worker]
        await hand(
            emulator,
            "PATCH",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat",
            {"spec": {"template": {"spec": {"containers": containers}}}},
        )
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over")
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: service_owner(emulator) == "zeta", "the metrics Service is zeta's")

        # The container goes again: alpha takes the workload back, and its metrics Service with it, in one step
        # (whichever pass runs first), not deleted and made anew, nor refused as someone else's.
        before = len(list(emulator))
        await hand(
            emulator,
            "PATCH",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat",
            {"spec": {"template": {"spec": {"containers": containers[:-1]}}}},
        )
        await eventually(lambda: holder(emulator) == "alpha", "alpha took the workload back")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        await eventually(lambda: service_owner(emulator) == "alpha", "the metrics Service is alpha's")
        writes = [
            (r.method.value, str(r.url.path)) for r in list(emulator)[before:] if not r.headers.get("X-Test-Hand")
        ]
        assert ("DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics") not in writes
        assert posted_events(emulator, "ServiceFailed") == []
    check_usage(emulator)


async def test_a_newer_resource_naming_no_container_says_so_not_conflict(emulator: Any, monitoring_crds: Any) -> None:
    """The newer "alpha" names a container the workload lacks, while the older "zeta" serves it: alpha could not
    inject it whoever served it, so it says NoContainer (deleting zeta would not help), with no Conflict event."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "zeta"] = created("zeta", OLDER)
    alpha = created("alpha", NEWER)
    alpha["spec"]["containers"] = ["worker"]
    emulator.objects[LLMT, NAMESPACE, "alpha"] = alpha
    async with running_operator():
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        await eventually(lambda: reason(emulator, "alpha", c.CONDITION_INJECTED) == "NoContainer", "alpha NoContainer")
        injected = condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED)
        assert "no container named worker" in injected["message"] and "zeta" not in injected["message"]
        # The event is posted once the pass has written the status; then every echo has a second to arrive.
        await eventually(
            lambda: [e for e in posted_events(emulator, "NoContainer") if e["involvedObject"]["name"] == "alpha"],
            "alpha's NoContainer event",
        )
        await asyncio.sleep(1.0)
        assert conflict_events(emulator, "alpha") == []
        assert holder(emulator) == "zeta"
    check_usage(emulator)


def service_owner(kmock: Any) -> str | None:
    service = get(kmock, SERVICES, "chat-llm-metrics")
    return None if service is None else service["metadata"]["labels"].get(c.LABEL_OWNER)


def test_a_peer_known_only_after_a_pass_began_keeps_the_metrics_services_of_the_workloads_it_wins() -> None:
    """Resources applied together: a pass of the broad one began before the narrow one, older by name, was known,
    and counts the narrow one's workload among its targets. The metrics Service the narrow one made for it is not
    the broad pass's to take over (it was, as the Service of a peer serving none of its targets, and the workload
    was then scraped under the wrong job): the peer is judged as the operator knows it when the Service is met."""
    from llm_telemetry_operator import reconcile as rec
    from llm_telemetry_operator.spec import parse_spec

    stamp = "2026-12-03T01:57:41Z"
    broad = minimal_llmt("z-broad", selector={"matchLabels": {"grp": "all"}})
    narrow = minimal_llmt("a6", selector={"matchLabels": {"app": "w6"}})
    for body in (broad, narrow):
        body["metadata"]["creationTimestamp"] = stamp  # the same second: the first by name wins
    workload = deployment("w6")
    workload["metadata"]["labels"] = {"app": "w6", "grp": "all"}
    known: dict[str, Any] = {}
    peers = rec.PeerView(selecting=lambda labels: [], named=known.get)  # the narrow one not indexed at the start
    outranked = rec._Outranked(broad, peers, [workload])
    assert "a6" not in outranked  # unknown and not being deleted: never taken over
    known["a6"] = (narrow, parse_spec(narrow["spec"]))  # known now, while the pass runs
    assert "a6" not in outranked  # it wins w6: its Service stays its own
    other = deployment("w7")
    other["metadata"]["labels"] = {"app": "w7", "grp": "all"}
    assert "a6" in rec._Outranked(broad, peers, [other])  # it serves none of these targets: taken over with them


async def test_a_winner_gone_unseen_is_forgotten_once_its_children_are_collected(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The winner deleted while the operator's watch did not see it (its finalizer removed by hand, and the watch
    listed anew after its history expired: kopf reports no deletion then). The garbage collector deletes its
    children; the operator, finding it gone, forgets it instead of making them again without end, and the
    resource next in line takes the workload over."""
    contested(emulator, monitoring_crds)
    async with running_operator():
        await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: all(children(emulator, "zeta").values()), "zeta's children")
        del emulator.objects[LLMT, NAMESPACE, "zeta"]  # gone, with no watch event
        # The garbage collector removes its children: their owner references name a uid that no longer exists.
        monitoring = f"/apis/monitoring.coreos.com/v1/namespaces/{NAMESPACE}"
        for path in (
            f"{monitoring}/servicemonitors/zeta-llm-telemetry",
            f"{monitoring}/prometheusrules/zeta-llm-telemetry",
            f"/api/v1/namespaces/{NAMESPACE}/configmaps/zeta-llm-dashboard",
            f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics",
        ):
            await hand(emulator, "DELETE", path)
        # A pass of zeta's already under way as it was forgotten may have made a child again (the metrics Service
        # among them, which alpha cannot take from a resource it does not know is gone); the garbage collector
        # deletes such a one too, and then it stays gone: no pass makes it again.
        zeta_children = {
            SERVICEMONITORS: f"{monitoring}/servicemonitors/zeta-llm-telemetry",
            PROMETHEUSRULES: f"{monitoring}/prometheusrules/zeta-llm-telemetry",
            CONFIGMAPS: f"/api/v1/namespaces/{NAMESPACE}/configmaps/zeta-llm-dashboard",
        }

        async def collect() -> None:
            for kind, path in zeta_children.items():
                if get(emulator, kind, path.rsplit("/", 1)[1]) is not None:
                    await hand(emulator, "DELETE", path)
            if service_owner(emulator) == "zeta":
                await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")

        await eventually(lambda: holder(emulator) == "alpha", "alpha took the workload over")
        for _ in range(600):
            await collect()
            if reason(emulator, "alpha", "Ready") == "Ready":
                break
            await asyncio.sleep(0.05)
        assert reason(emulator, "alpha", "Ready") == "Ready", condition(get(emulator, LLMT, "alpha"), "Ready")
        for _ in range(3):
            await asyncio.sleep(0.5)
            await collect()
        await asyncio.sleep(1.5)
        again = [path for kind, path in zeta_children.items() if get(emulator, kind, path.rsplit("/", 1)[1])]
        assert not again, f"made again for an owner that is gone: {again}"
        assert get(emulator, SERVICEMONITORS, "alpha-llm-telemetry") is not None


async def test_the_winner_selecting_the_workload_no_more_hands_it_over_in_one_step(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The older "zeta" serves the workload that "alpha" selects too; then zeta's selector stops selecting it.
    alpha takes it over in one patch: zeta's injection is not removed first and then made again (two pod template
    changes, two rollouts and pods without telemetry in between). Here both inject the same settings, so the pod
    template does not change at all: only the record says who injected it."""
    contested(emulator, monitoring_crds)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        template = get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]
        generation = get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"]
        before = len(list(emulator))
        await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"selector": {"matchLabels": {"app": "other"}}}})
        await eventually(lambda: holder(emulator) == "alpha", "alpha took the workload over")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        await eventually(lambda: reason(emulator, "zeta", c.CONDITION_INJECTED) == "NoTargets", "zeta NoTargets")
        await asyncio.sleep(1.0)  # every pass the change started has run
        deployment_path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat"
        patches = [
            req
            for req in list(emulator)[before:]
            if req.method.value == "PATCH" and str(req.url.path) == deployment_path
        ]
        assert len(patches) == 1, [req.data for req in patches]
        assert get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"] == generation
        assert get(emulator, DEPLOYMENTS, "chat")["spec"]["template"] == template
        assert service_owner(emulator) == "alpha"
    check_usage(emulator)


async def test_a_workload_left_to_a_peer_that_does_not_take_it_is_given_back(
    emulator: Any, monitoring_crds: Any
) -> None:
    """As above, but "alpha" cannot inject the workload (its pricing ConfigMap is missing): zeta's next pass, a few
    seconds later, removes its injection all the same, and gives the user's pod template back."""
    contested(emulator, monitoring_crds)
    alpha = created("alpha", NEWER)
    alpha["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
    emulator.objects[LLMT, NAMESPACE, "alpha"] = alpha
    async with running_operator():
        await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"selector": {"matchLabels": {"app": "other"}}}})
        await eventually(lambda: holder(emulator) is None, "zeta's injection removed", attempts=400)
        assert (
            get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"] == deployment()["spec"]["template"]["spec"]
        )
        await eventually(
            lambda: reason(emulator, "alpha", c.CONDITION_INJECTED) == "PricingConfigMapNotFound", "alpha waits"
        )
        # Its metrics Service too: alpha would take it over with the workload, but alpha takes nothing (it stayed,
        # with no endpoints, until zeta's resync).
        await eventually(lambda: service_owner(emulator) is None, "zeta's metrics Service deleted")
    check_usage(emulator)


async def test_a_conflict_with_a_winner_that_holds_the_workload_uninjected_says_so(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The older "zeta" wins the workload but injects nothing until its pricing ConfigMap exists: "alpha"'s Conflict
    does not say the workload is served by zeta (nobody serves it), but that zeta wins it and has not injected it.
    Once zeta injects it, the words are "served by" again."""
    contested(emulator, monitoring_crds)
    zeta = created("zeta", OLDER)
    zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
    emulator.objects[LLMT, NAMESPACE, "zeta"] = zeta
    async with running_operator():
        await eventually(
            lambda: reason(emulator, "zeta", c.CONDITION_INJECTED) == "PricingConfigMapNotFound", "zeta waits"
        )
        await eventually(lambda: reason(emulator, "alpha", c.CONDITION_INJECTED) == "Conflict", "alpha in Conflict")
        message = condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED)["message"]
        assert holder(emulator) is None
        assert "served by" not in message, message
        assert "Deployment/chat (won by zeta, which has not injected it" in message, message
        await _create_prices(emulator)
        await eventually(lambda: holder(emulator) == "zeta", "zeta injected once its ConfigMap exists", attempts=600)
        await eventually(
            lambda: (
                "Deployment/chat (served by zeta)"
                in condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED)["message"]
            ),
            "alpha says served by zeta",
        )


async def _zeta_hands_over_while_alpha_is_refused(emulator: Any) -> None:
    """zeta serves the workload; its selector moves away, and alpha's updates of the workload are refused (an
    admission webhook): zeta's injection stays for alpha to take over, and its status says so."""
    await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
    await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
    emulator.deny[("deployments", "chat")] = DENIED
    await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"selector": {"matchLabels": {"app": "other"}}}})
    await eventually(
        lambda: "handing over Deployment/chat (to alpha" in _injected_message(emulator, "zeta"), "zeta says so"
    )


async def _create_prices(emulator: Any) -> None:
    """The user creates ConfigMap "prices", the pricing table zeta's ``configMapRef`` names."""
    prices = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prices", "namespace": NAMESPACE},
              "data": {"pricing.yaml": "gpt-4o: {input: 2.5, output: 10}\n"}}  # fmt: skip
    await hand(emulator, "POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps", prices)


async def _alpha_keeps_what_zeta_wins(emulator: Any) -> None:
    """alpha says at once that zeta wins the workload, and a while after still serves it, Ready."""
    await eventually(
        lambda: "won by zeta" in condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED)["message"],
        "alpha says zeta wins the workload",
    )
    await asyncio.sleep(1.5)  # (every pass that saying started has run)
    assert holder(emulator) == "alpha"
    assert reason(emulator, "alpha", "Ready") == "Ready"


async def test_a_winner_that_cannot_inject_yet_leaves_the_workload_to_the_one_serving_it(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "alpha" serves the workload; then "zeta", which ranks first, comes to select it, but its pricing ConfigMap is
    missing, so it cannot inject it. alpha keeps serving it, and learns at once (not at its resync, minutes away) that
    zeta wins it: handed to zeta, it had its injection removed and no telemetry at all until zeta's ConfigMap came.
    Once the ConfigMap exists, zeta takes the workload over in one patch, its metrics Service included."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        assert holder(emulator) == "alpha"
        zeta = created("zeta", OLDER)
        zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await eventually(
            lambda: reason(emulator, "zeta", c.CONDITION_INJECTED) == "PricingConfigMapNotFound", "zeta waits"
        )
        await _alpha_keeps_what_zeta_wins(emulator)
        assert get(emulator, LLMT, "alpha")["status"]["targets"] == ["Deployment/chat"]
        assert service_owner(emulator) == "alpha"
        message = condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED)["message"]
        assert "Deployment/chat (won by zeta, which cannot inject it yet: see its status)" in message, message

        before = len(list(emulator))
        await _create_prices(emulator)
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over", attempts=600)
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: service_owner(emulator) == "zeta", "the metrics Service is zeta's")
        await asyncio.sleep(1.0)  # every pass the takeover started has run
        writes = [(req.method.value, str(req.url.path)) for req in list(emulator)[before:]]
        assert writes.count(("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat")) == 1
        assert ("DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics") not in writes
    check_usage(emulator)


async def test_a_workload_handed_over_stays_as_it_is_until_the_winner_takes_it(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "alpha" keeps serving the workload that "zeta" wins but cannot inject yet (as above). The ConfigMap comes, and
    a pass of alpha's (its spec edited) finds first that zeta can inject now: alpha leaves the workload to zeta and
    stands by, deleting its ServiceMonitor, PrometheusRule and dashboard. Their events start passes of alpha's at
    once, before zeta's takes the workload over: those passes leave it as it is too. One of them removed alpha's
    injection, and zeta's made its own again: the pods rolled twice, and ran without telemetry in between."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        zeta = created("zeta", OLDER)
        zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await eventually(
            lambda: "won by zeta" in condition(get(emulator, LLMT, "alpha"), c.CONDITION_INJECTED)["message"],
            "alpha says zeta wins the workload",
        )
        await asyncio.sleep(0.5)
        before = len(list(emulator))
        await _create_prices(emulator)
        await hand(emulator, "PATCH", f"{LLMT_PATH}/alpha", {"spec": {"dashboard": {"folder": "Chat"}}})
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over", attempts=600)
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await asyncio.sleep(1.0)  # every pass the takeover started has run
        writes = [(req.method.value, str(req.url.path)) for req in list(emulator)[before:]]
        assert writes.count(("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat")) == 1
        assert get(emulator, SERVICEMONITORS, "alpha-llm-telemetry") is None  # (alpha stood by)
    check_usage(emulator)


async def test_the_winner_whose_port_comes_to_be_taken_removes_its_injection(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "zeta" serves the workload, "alpha" (another metrics port) selects it too; then the pods come to declare
    zeta's port (a sidecar, an admin port). zeta's injection goes, as its PortConflict says: alpha defers to zeta,
    which still wins the workload, so nobody would take it over. It was left to alpha for good, the middleware's
    listener and the sidecar both wanting the port."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "zeta"] = created("zeta", OLDER)
    alpha = created("alpha", NEWER)
    alpha["spec"]["metrics"] = {"port": 9465}
    emulator.objects[LLMT, NAMESPACE, "alpha"] = alpha
    async with running_operator():
        await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        containers = copy.deepcopy(get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"]["containers"])
        containers.append(
            {"name": "admin", "image": "example/admin:1", "ports": [{"name": "admin", "containerPort": 9464}]}
        )
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat"
        await hand(emulator, "PATCH", path, {"spec": {"template": {"spec": {"containers": containers}}}})
        await eventually(lambda: holder(emulator) is None, "zeta's injection removed", attempts=400)
        await eventually(lambda: reason(emulator, "zeta", c.CONDITION_METRICS) == "PortConflict", "zeta says why")
    check_usage(emulator)


async def test_a_workload_handed_over_and_not_taken_is_said_so_and_given_back_when_the_taker_goes(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "zeta" serves the workload; its selector moves away, and "alpha", which selects it too, is left to take it
    over, but every update of the workload is refused (an admission webhook): zeta's injection stays meanwhile, and
    its status says so (it said only that nothing matched its selector). Then alpha is deleted: zeta's injection is
    removed at once, not at its resync minutes later."""
    contested(emulator, monitoring_crds)
    async with running_operator():
        await _zeta_hands_over_while_alpha_is_refused(emulator)
        assert holder(emulator) == "zeta"
        await hand(emulator, "DELETE", f"{LLMT_PATH}/alpha")
        await eventually(lambda: get(emulator, LLMT, "alpha") is None, "alpha gone")
        emulator.deny.clear()
        await eventually(lambda: holder(emulator) is None, "zeta's injection removed", attempts=300)
        assert (
            get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"] == deployment()["spec"]["template"]["spec"]
        )


def _injected_message(kmock: Any, name: str) -> str:
    return str(condition(get(kmock, LLMT, name), c.CONDITION_INJECTED).get("message"))


@pytest.mark.parametrize("change", ["deleted", "unselects", "widens"])
async def test_what_a_resource_keeps_for_a_winner_follows_the_winner(
    emulator: Any, monitoring_crds: Any, change: str
) -> None:
    """ "alpha" serves Deployments chat and chat2; "zeta", which ranks first but cannot inject yet (its pricing
    ConfigMap missing), selects chat: alpha keeps it, saying so. Then zeta is deleted, or stops selecting chat, or
    comes to select chat2 as well: alpha's status follows at once (a pass of its own), not at its resync minutes
    later. It said zeta won chat after zeta was gone, and left chat2 out."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment(labels={"app": "chat", "w": "one"})
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat2"] = deployment("chat2", labels={"app": "chat", "w": "two"})
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        zeta = created("zeta", OLDER)
        zeta["spec"]["selector"] = {"matchLabels": {"app": "chat", "w": "one"}}
        zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await eventually(lambda: "Deployment/chat (won by zeta" in _injected_message(emulator, "alpha"), "chat kept")
        if change == "deleted":
            await hand(emulator, "DELETE", f"{LLMT_PATH}/zeta")
        else:
            selector = {"app": "other"} if change == "unselects" else {"app": "chat", "w": None}
            await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"selector": {"matchLabels": selector}}})
        if change == "widens":
            await eventually(
                lambda: "Deployment/chat2 (won by zeta" in _injected_message(emulator, "alpha"), "chat2 kept too"
            )
            assert "Deployment/chat (won by zeta" in _injected_message(emulator, "alpha")
        else:
            await eventually(lambda: "won by zeta" not in _injected_message(emulator, "alpha"), "alpha says so no more")
        assert holder(emulator) == "alpha"
    check_usage(emulator)


async def test_a_winner_whose_metrics_port_is_taken_leaves_the_workload_to_the_one_serving_it(
    emulator: Any, monitoring_crds: Any
) -> None:
    """As above, but "zeta" cannot inject the workload because its spec.metrics.port is taken in the pods
    (``PortConflict``): alpha keeps serving it, and zeta takes it over in one patch once its port is free."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    chat = deployment()
    chat["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"name": "admin", "containerPort": 9100}]
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = chat
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        zeta = created("zeta", OLDER)
        zeta["spec"]["metrics"] = {"port": 9100}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await eventually(lambda: reason(emulator, "zeta", c.CONDITION_METRICS) == "PortConflict", "zeta's port taken")
        await _alpha_keeps_what_zeta_wins(emulator)

        before = len(list(emulator))
        await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"metrics": {"port": 9464}}})
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: service_owner(emulator) == "zeta", "the metrics Service is zeta's")
        await asyncio.sleep(1.0)  # every pass the takeover started has run
        writes = [(req.method.value, str(req.url.path)) for req in list(emulator)[before:]]
        assert writes.count(("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat")) == 1
    check_usage(emulator)


@pytest.mark.parametrize("why", ["pricing", "port"])
async def test_a_winner_that_cannot_inject_yet_makes_no_children_beside_the_keepers(
    emulator: Any, monitoring_crds: Any, why: str
) -> None:
    """ "alpha" serves the workload and keeps it for "zeta", which wins it but cannot inject it yet (its pricing
    ConfigMap missing, or its metrics port taken in the pods). alpha's ServiceMonitor, PrometheusRule and dashboard
    serve the workload meanwhile; zeta makes none of its own until it takes the workload over (then, in that pass,
    it makes them, and alpha's go). zeta published a second, empty dashboard of the same service in Grafana."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    chat = deployment()
    if why == "port":
        chat["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"name": "admin", "containerPort": 9100}]
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = chat
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        zeta = created("zeta", OLDER)
        if why == "port":
            zeta["spec"]["metrics"] = {"port": 9100}
        else:
            zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await _alpha_keeps_what_zeta_wins(emulator)
        await eventually(lambda: reason(emulator, "zeta", c.CONDITION_DASHBOARD) == "Conflict", "zeta says why")
        kept = children(emulator, "zeta")
        assert (kept["monitor"], kept["rules"], kept["dashboard"]) == (None, None, None), kept
        assert all(children(emulator, "alpha").values())
        message = condition(get(emulator, LLMT, "zeta"), c.CONDITION_DASHBOARD)["message"]
        assert message.startswith("no children while Deployment/chat is kept by alpha"), message
        expected = "PortConflict" if why == "port" else "PricingConfigMapNotFound"
        assert reason(emulator, "zeta", c.CONDITION_INJECTED) == expected

        if why == "port":
            await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"metrics": {"port": 9464}}})
        else:
            await _create_prices(emulator)
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over", attempts=600)
        await eventually(lambda: all(children(emulator, "zeta").values()), "zeta's children made")
        await eventually(lambda: children(emulator, "alpha")["dashboard"] is None, "alpha's children gone")
    check_usage(emulator)


def _pricing_reads(kmock: Any) -> int:
    """Reads of ConfigMap "prices" by name (each pass of a resource waiting for it makes one)."""
    path = f"/api/v1/namespaces/{NAMESPACE}/configmaps/prices"
    return sum(1 for req in list(kmock) if req.method.value == "GET" and str(req.url.path) == path)


async def test_a_winner_waiting_for_its_pricing_configmap_takes_the_workload_as_soon_as_it_is_created(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "zeta" wins the workload "alpha" keeps for it, and waits for its pricing ConfigMap. Its passes back off
    (5 s, 10, 20, ... up to the resync interval, 5 minutes): it took the workload over only at its next retry after
    the ConfigMap was created, minutes after for one that had waited long. The ConfigMap it waits for is watched
    by name: zeta takes the workload over as soon as it is created, and the watch stops."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator() as memo:
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        zeta = created("zeta", OLDER)
        zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await _alpha_keeps_what_zeta_wins(emulator)
        # zeta's first retry has come (2.5 to 5 s after its first pass): its next is 5 to 10 s away.
        reads = _pricing_reads(emulator)
        await eventually(lambda: _pricing_reads(emulator) > reads, "zeta's first retry", attempts=200)
        await asyncio.sleep(0.5)
        await _create_prices(emulator)
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over at once", attempts=60)
        await eventually(lambda: not memo["state"].pricing_watches, "the ConfigMap no longer watched")
    check_usage(emulator)


async def test_a_restart_between_a_hand_over_and_the_deletion_swaps_the_injection_in_one_patch(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "zeta" lets the workload go to "alpha" (its selector moved away), whose patch of it is refused for now (an
    admission webhook): zeta's injection stays for alpha to swap. The operator is restarted, and zeta is deleted
    meanwhile. The deletion finds the workload only by its injection record, which the restarted operator learns
    from its watch of the workloads: it found it only once its removal was under way, so the injection was removed
    and alpha injected its own, two rollouts. It waits for the workloads' watch, and alpha swaps the injection in one
    patch."""
    contested(emulator, monitoring_crds)
    for n in range(20):  # (others in the namespace: the watch's first list takes the time a real one would)
        emulator.objects[DEPLOYMENTS, NAMESPACE, f"other{n}"] = deployment(f"other{n}", labels={"app": f"other{n}"})
    async with running_operator():
        await _zeta_hands_over_while_alpha_is_refused(emulator)
    await hand(emulator, "DELETE", f"{LLMT_PATH}/zeta")
    emulator.deny.clear()
    before = len(list(emulator))
    async with running_operator():
        await eventually(lambda: get(emulator, LLMT, "zeta") is None, "zeta gone")
        await eventually(lambda: holder(emulator) == "alpha", "alpha took the workload over")
        await asyncio.sleep(1.0)  # every pass the takeover started has run
        writes = [(req.method.value, str(req.url.path)) for req in list(emulator)[before:]]
    assert writes.count(("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat")) == 1
    assert service_owner(emulator) == "alpha"


async def test_a_winner_that_also_loses_another_workload_still_waits_for_its_pricing_configmap(
    emulator: Any, monitoring_crds: Any
) -> None:
    """ "zeta" wins Deployment/chat, which "alpha" keeps for it while zeta's pricing ConfigMap is missing, and loses
    Deployment/other to the older "aaa". Counted as a loser only, it neither said it waits for the ConfigMap nor
    watched it: it took chat over at its resync, minutes later. It says why it holds chat back, and takes it over
    as soon as the ConfigMap is created."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[DEPLOYMENTS, NAMESPACE, "other"] = deployment("other", labels={"app": "other"})
    aaa = created("aaa", "2025-12-01T00:00:00Z")
    aaa["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    emulator.objects[LLMT, NAMESPACE, "aaa"] = aaa
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        await eventually(lambda: reason(emulator, "aaa", "Ready") == "Ready", "aaa Ready")
        zeta = created("zeta", OLDER)
        zeta["spec"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["chat", "other"]}]}
        zeta["spec"]["pricing"] = {"configMapRef": {"name": "prices"}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await _alpha_keeps_what_zeta_wins(emulator)
        await eventually(
            lambda: reason(emulator, "zeta", c.CONDITION_INJECTED) == "PricingConfigMapNotFound", "zeta says why"
        )
        assert "Deployment/chat" in _injected_message(emulator, "zeta")
        assert children(emulator, "zeta")["dashboard"] is None  # (alpha's serve chat meanwhile)
        await _create_prices(emulator)
        await eventually(lambda: holder(emulator) == "zeta", "zeta took chat over at once", attempts=60)
        other = r.injected_record(get(emulator, DEPLOYMENTS, "other") or {})
        assert other is not None and other.get("owner") == "aaa"
    check_usage(emulator)


def _prices_before_mounts(kmock: Any, owner: str) -> list[str]:
    """The operator's writes of ConfigMap ``<owner>-llm-pricing`` and of Deployment chat's injection by ``owner``,
    in the order the API server received them."""
    prices = r.pricing_configmap_name(owner)
    seen: list[str] = []
    for req in list(kmock):
        path, data = str(req.url.path), req.data  # (a workload's patch is a JSON patch: a list of operations)
        if req.headers.get("X-Test-Hand"):
            continue
        if req.method.value == "POST" and path.endswith("/configmaps") and data["metadata"]["name"] == prices:
            seen.append("prices created")
        elif req.method.value == "PATCH" and path.endswith("/deployments/chat") and prices in json.dumps(data):
            seen.append("workload mounts them")
    return seen


@pytest.mark.parametrize("how", ["created", "taken over"])
async def test_the_inline_prices_configmap_exists_before_the_workload_mounts_it(
    emulator: Any, monitoring_crds: Any, how: str
) -> None:
    """Pods of a rollout that mount a ConfigMap not yet there cannot start: the ConfigMap of ``spec.pricing.models``
    is created before the patch that makes the workload mount it, on a first injection as on taking the workload
    over from the older resource that held it (which kept alpha from making one while it lost)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    alpha = created("alpha", NEWER)
    alpha["spec"]["pricing"] = {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}
    emulator.objects[LLMT, NAMESPACE, "alpha"] = alpha
    if how == "taken over":
        emulator.objects[LLMT, NAMESPACE, "zeta"] = created("zeta", OLDER)
    async with running_operator():
        if how == "taken over":
            await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
            await eventually(lambda: holder(emulator) == "zeta", "zeta injected")
            assert get(emulator, CONFIGMAPS, r.pricing_configmap_name("alpha")) is None
            await hand(emulator, "DELETE", f"{LLMT_PATH}/zeta")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        assert holder(emulator) == "alpha"
    assert _prices_before_mounts(emulator, "alpha") == ["prices created", "workload mounts them"]
    check_usage(emulator)


async def test_a_workload_is_not_made_to_mount_prices_that_could_not_be_written(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A ConfigMap of the inline prices' name that is another's (or a create refused by a quota or a webhook): the
    workload is not patched to mount it, since its pods could not read their prices and would not start; the status
    says why. Once the name is free, the prices are written and the workload injected."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    prices = r.pricing_configmap_name("alpha")
    emulator.objects[CONFIGMAPS, NAMESPACE, prices] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": prices, "namespace": NAMESPACE},
        "data": {"x": "1"},
    }
    alpha = created("alpha", NEWER)
    alpha["spec"]["pricing"] = {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}
    emulator.objects[LLMT, NAMESPACE, "alpha"] = alpha
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Injected") == "PricingConfigMapFailed", "refused")
        said = condition(get(emulator, LLMT, "alpha"), "Injected")["message"]
        assert "not this LLMTelemetry's" in said and said.endswith("(left as they were): Deployment/chat")
        assert holder(emulator) is None
        assert "volumes" not in get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"]
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{prices}")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        assert holder(emulator) == "alpha"
    assert _prices_before_mounts(emulator, "alpha")[-2:] == ["prices created", "workload mounts them"]
    check_usage(emulator)


@pytest.mark.parametrize("refused", ["by a ConfigMap of its name", "by a quota"])
async def test_a_winner_whose_inline_prices_cannot_be_written_leaves_the_workload_to_its_holder(
    emulator: Any, monitoring_crds: Any, refused: str
) -> None:
    """zeta, older, wins chat from alpha, but its prices' ConfigMap cannot be written (a ConfigMap of that name is
    another's, or a quota refuses it): it cannot inject chat, so alpha keeps serving it (its injection, metrics
    Service, ServiceMonitor, rules and dashboard) and zeta publishes none of its own, as for a winner whose
    configMapRef is missing; once the name is free, zeta takes chat over."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    prices = r.pricing_configmap_name("zeta")
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": prices, "namespace": NAMESPACE}}
    if refused == "by a quota":
        quota = "exceeded quota: cm-quota, requested: count/configmaps=1, used: count/configmaps=10"
        emulator.deny[("configmaps", prices)] = (403, "Forbidden", f'configmaps "{prices}" is forbidden: {quota}')
    else:
        emulator.objects[CONFIGMAPS, NAMESPACE, prices] = {**foreign, "data": {"x": "1"}}
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        zeta = created("zeta", OLDER)
        zeta["spec"]["pricing"] = {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}
        await hand(emulator, "POST", LLMT_PATH, zeta)
        await eventually(lambda: reason(emulator, "zeta", "Injected") == "PricingConfigMapFailed", "zeta refused")
        await hand(emulator, "PATCH", f"{LLMT_PATH}/alpha", {"spec": {"dashboard": {"folder": "Chat"}}})  # a pass
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha still Ready")
        assert holder(emulator) == service_owner(emulator) == "alpha"
        assert all(child is not None for child in children(emulator, "alpha").values())
        assert all(child is None for name, child in children(emulator, "zeta").items() if name != "service")
        if refused == "by a quota":
            del emulator.deny[("configmaps", prices)]
        else:
            await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{prices}")
        await eventually(lambda: holder(emulator) == "zeta", "zeta takes chat over", attempts=800)
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
    check_usage(emulator)


async def test_prices_that_cannot_be_written_do_not_hide_a_failed_injection(
    emulator: Any, monitoring_crds: Any
) -> None:
    """In one pass the inline prices' ConfigMap is refused (a webhook) and the removal of the injection from a
    workload no longer selected fails too: the status says both, not only the prices."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat2"] = deployment("chat2", labels={"app": "chat2"})
    alpha = created("alpha", NEWER)
    alpha["spec"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["chat", "chat2"]}]}
    alpha["spec"]["pricing"] = {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}
    emulator.objects[LLMT, NAMESPACE, "alpha"] = alpha
    async with running_operator():
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
        emulator.deny[("configmaps", r.pricing_configmap_name("alpha"))] = DENIED
        emulator.deny[("deployments", "chat2")] = DENIED
        spec = {
            "selector": {"matchLabels": {"app": "chat"}},
            "pricing": {"models": {"gpt-4o": {"input": 3, "output": 12}}},
        }
        await hand(emulator, "PATCH", f"{LLMT_PATH}/alpha", {"spec": spec})

        def said() -> str:
            injected = condition(get(emulator, LLMT, "alpha"), "Injected")
            return str(injected.get("message")) if injected.get("reason") == "PricingConfigMapFailed" else ""

        message = await eventually(said, "the prices refused")
        assert "left as they were): Deployment/chat;" in message and "Deployment/chat2: 403" in message, message


async def test_a_losers_injection_written_between_the_winners_read_and_patch_is_taken_over_in_one_patch(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The older "zeta" lists the workload uninjected and decides to inject it; before its patch, the injection of
    the newer "alpha" lands in it (an operator that had not seen zeta yet). zeta's patch meets a 409, and the version
    read again carries alpha's record: zeta leaves it as it is for the next pass, which takes it over from alpha in
    one patch, as a fresh pass would. Then nobody patches it again: no rollout back and forth."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    async with running_operator():  # what alpha's injection is, as alpha makes it
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Ready", "alpha Ready")
    by_alpha = get(emulator, DEPLOYMENTS, "chat")
    assert holder(emulator) == "alpha"
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()  # the workload uninjected again
    emulator.objects[LLMT, NAMESPACE, "zeta"] = created("zeta", OLDER)
    emulator.interfere["deployments", "chat"] = {
        "metadata": {"annotations": by_alpha["metadata"]["annotations"]},
        "spec": {"template": by_alpha["spec"]["template"]},
    }
    before = len(list(emulator))

    def patches() -> list[Any]:
        return [
            req
            for req in list(emulator)[before:]
            if not req.headers.get("X-Test-Hand")
            and req.method.value == "PATCH"
            and str(req.url.path).endswith("/deployments/chat")
        ]

    async with running_operator():
        await eventually(lambda: holder(emulator) == "zeta", "zeta took the workload over", attempts=400)
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await asyncio.sleep(1.0)  # every echo of the passes' own writes has been handled
        dep = get(emulator, DEPLOYMENTS, "chat")
        assert len(patches()) == 2  # zeta's refused with the 409, and the next pass's take-over
        # alpha's injection (2); zeta's, in its place, is the same pod template (their specs are alike): no rollout
        assert dep["metadata"]["generation"] == 2
        assert holder(emulator) == "zeta"
        assert get(emulator, LLMT, "zeta")["status"]["targets"] == ["Deployment/chat"]
        assert get(emulator, LLMT, "alpha")["status"]["targets"] == []
        statuses = [
            json.dumps(req.data)
            for req in list(emulator)[before:]
            if req.method.value == "PATCH" and str(req.url.path).endswith("/llmtelemetries/zeta/status")
        ]
        assert any("Deployment/chat (changed while this pass ran" in s for s in statuses)
