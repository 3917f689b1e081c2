"""Two LLMTelemetry select one workload, and the winner's injection lands between the loser's list and its patch.

The newer resource ("alpha") is in a pass that has listed the workload uninjected and decided to inject it, as no
other resource selected it then; the older one ("zeta") comes to select it (its selector widened) and injects it,
through a pass of its own, before alpha's patch arrives. alpha's patch fails its ``test`` of the injection record, the
version read again carries zeta's record, and alpha leaves the workload to its next pass (docs/operator.md, "A label
change during a pass"). What a user relies on: that next pass leaves the workload to zeta (no patch, no rollout), the
workload ends with zeta's injection alone and one rollout, both statuses and alpha's events say who serves it, and
nothing is written again after that.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    condition,
    deployment,
    eventually,
    get,
    install_prometheus_operator_crds,
    is_write,
    posted_events,
    running_operator,
)
from test_conflicts import LLMT_PATH, NEWER, OLDER, children, conflict_events, created, holder, reason
from test_operator_kmock import check_usage, hand
from test_two_operators import OTHER, other_operator

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec

CHAT = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat"
#: zeta's selector before it is widened: nothing in the namespace carries that label.
ELSEWHERE = {"matchLabels": {"app": "elsewhere"}}


def hold_first_patch_of_chat(emulator: Any) -> None:
    """The API server answers the first PATCH of the Deployment (alpha's injection) only once the test sets
    ``emulator.released``; the PATCHes after it are answered at once."""
    taken: list[bool] = []

    def first(request: Any) -> bool:
        if request.method != "PATCH" or request.path != CHAT or taken:
            return False
        taken.append(True)
        return True

    emulator.holds = first


def operator_patches(emulator: Any, seen: int = 0) -> list[Any]:
    """The operator's PATCHes of the Deployment after the first ``seen`` requests, in order."""
    return [
        req
        for req in list(emulator)[seen:]
        if not req.headers.get("X-Test-Hand") and req.method.value == "PATCH" and str(req.url.path) == CHAT
    ]


def record_owner(patch: Any) -> str | None:
    """The owner the injection record of a JSON patch names (None: it writes none)."""
    for op in patch.data if isinstance(patch.data, list) else []:
        if op.get("op") in ("add", "replace") and op.get("path", "").startswith("/metadata/annotations"):
            value = op.get("value")
            text = value.get(c.ANNOTATION_INJECTED) if isinstance(value, dict) else value
            if isinstance(text, str) and text.startswith("{"):
                return str(json.loads(text).get("owner"))
    return None


def writes(emulator: Any, seen: int) -> list[tuple[str, str]]:
    """The operator's writes after the first ``seen`` requests, but for events and the peering's keepalives."""
    return [
        (req.method.value, str(req.url.path))
        for req in list(emulator)[seen:]
        if is_write(req)
        and not req.headers.get("X-Test-Hand")
        and "kopfpeerings" not in str(req.url.path)
        and not str(req.url.path).endswith("/events")
    ]


def injected_message(emulator: Any, owner: str) -> str:
    return str(condition(get(emulator, LLMT, owner), c.CONDITION_INJECTED).get("message"))


def statuses(emulator: Any, owner: str) -> list[str]:
    """The status patches the operator sent for ``owner``, as text."""
    return [
        json.dumps(req.data)
        for req in list(emulator)
        if req.method.value == "PATCH" and str(req.url.path).endswith(f"/llmtelemetries/{owner}/status")
    ]


async def test_the_winners_own_pass_injecting_during_the_losers_pass_keeps_the_workload(
    emulator: Any, monitoring_crds: Any
) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    zeta = created("zeta", OLDER)
    zeta["spec"]["selector"] = ELSEWHERE
    emulator.objects[LLMT, NAMESPACE, "zeta"] = zeta
    hold_first_patch_of_chat(emulator)
    async with running_operator():
        await eventually(lambda: emulator.held, "alpha's injection of chat sent, not answered yet")
        # zeta now selects chat too, and wins it: its own pass injects it while alpha's patch waits.
        await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": {"selector": {"matchLabels": {"app": "chat"}}}})
        await eventually(lambda: holder(emulator) == "zeta", "zeta's pass injected chat")
        assert get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"] == 2
        emulator.released.set()  # alpha's patch arrives: its test of the (absent) record fails
        await eventually(lambda: "served by zeta" in injected_message(emulator, "alpha"), "alpha says zeta serves chat")
        await eventually(lambda: reason(emulator, "alpha", "Ready") == "Conflict", "alpha in Conflict")
        await eventually(lambda: reason(emulator, "zeta", "Ready") == "Ready", "zeta Ready")
        # alpha's pass said so: it left chat to the next pass. chat still matches its selector: not said otherwise.
        (deferring,) = [s for s in statuses(emulator, "alpha") if "Deployment/chat (changed while this pass ran" in s]
        assert "no Deployment or StatefulSet in namespace llm is injected by this resource yet" in deferring
        assert "matches spec.selector" not in deferring
        await eventually(lambda: conflict_events(emulator, "alpha"), "a Conflict event on alpha")
        seen = len(list(emulator))
        await asyncio.sleep(6.0)  # past the follow-up a deferral asks for (within 5 s), and its echoes
        assert writes(emulator, seen) == []  # nothing loops
        dep = get(emulator, DEPLOYMENTS, "chat")
        # Two patches: alpha's, refused, and zeta's (the emulator logs alpha's once answered, after zeta's); none
        # after them, so one rollout (generation 1 to 2).
        assert [record_owner(p) for p in operator_patches(emulator)] == ["zeta", "alpha"]
        assert dep["metadata"]["generation"] == 2
        assert holder(emulator) == "zeta"
        assert get(emulator, LLMT, "zeta")["status"]["targets"] == ["Deployment/chat"]
        assert get(emulator, LLMT, "alpha")["status"]["targets"] == []
        for type_ in (c.CONDITION_METRICS, c.CONDITION_ALERTS, c.CONDITION_DASHBOARD):
            assert reason(emulator, "alpha", type_) == "Conflict"
        # Scraped, alerted and charted once: alpha keeps no children (it deleted any its deferring pass made).
        assert all(children(emulator, "zeta").values())
        assert children(emulator, "zeta")["service"]["metadata"]["labels"][c.LABEL_OWNER] == "zeta"
        assert not any(v for k, v in children(emulator, "alpha").items() if k != "service")
        events = conflict_events(emulator, "alpha")
        assert len(events) == 1 and "LLMTelemetry zeta, which wins it" in events[0]
        assert conflict_events(emulator, "zeta") == []
        assert [e for e in posted_events(emulator, "NoTargets") if e["involvedObject"]["name"] == "alpha"] == []
    check_usage(emulator)


def injected_by_the_other_operator(emulator: Any, owner: dict[str, Any]) -> dict[str, Any]:
    """The merge patch the other operator's pass for ``owner`` sends to inject the Deployment as it now is: built by
    the operator's own code, with the settings the chart gives every release (but its peering name)."""
    chat = get(emulator, DEPLOYMENTS, "chat")
    config = OperatorConfig(peering=OTHER, metrics_port=0, health="")
    injection = r.build_injection(parse_spec(owner["spec"]), config, chat, owner["metadata"]["name"])
    patch = r.build_workload_patch(chat, injection, owner["metadata"]["name"])
    assert patch is not None
    return patch


def zeta_selector_here(memo: Any) -> Any:
    """zeta's selector as this operator knows it (from the watch events it has handled)."""
    return memo["state"].bodies[NAMESPACE, "zeta"]["spec"]["selector"]


@pytest.mark.parametrize("seen", [True, False], ids=["spec seen here first", "spec not seen here yet"])
async def test_the_winner_of_another_operator_injecting_during_the_losers_pass_keeps_the_workload(
    emulator: Any, monitoring_crds: Any, seen: bool
) -> None:
    """As above, but zeta is served by another operator that runs (its name in zeta's status): this operator runs no
    pass of zeta's, and learns of zeta's widened selector and of its injection by their watch events, which arrive
    independently. With ``seen`` False, zeta's injection lands before this operator has the event of zeta's new
    selector (kopf holds each event of the resources for a moment, its own watch of the workloads does not): alpha's
    next pass, by what it knows of zeta, finds chat injected by an older resource that does not select it, as when
    zeta lets chat go, and took it over (a rollout), then gave it back once zeta's event arrived (another)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    other_operator(emulator, datetime.timedelta(seconds=5))
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "alpha"] = created("alpha", NEWER)
    zeta = created("zeta", OLDER)
    zeta["spec"]["selector"] = ELSEWHERE
    zeta["metadata"]["finalizers"] = [c.FINALIZER]
    zeta["status"] = {"operator": OTHER, "phase": "Pending", "targets": [], "targetCount": 0}
    emulator.objects[LLMT, NAMESPACE, "zeta"] = zeta
    hold_first_patch_of_chat(emulator)
    async with running_operator() as memo:
        await eventually(lambda: emulator.held, "alpha's injection of chat sent, not answered yet")
        widened = get(emulator, LLMT, "zeta")
        widened["spec"]["selector"] = {"matchLabels": {"app": "chat"}}
        widened["metadata"]["generation"] = 2
        if seen:
            await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta", {"spec": widened["spec"]})
            bodies = memo["state"].bodies
            await eventually(
                lambda: bodies[NAMESPACE, "zeta"]["spec"]["selector"] == widened["spec"]["selector"],
                "zeta's new selector seen here",
            )
        else:
            emulator.write_unseen(LLMT, NAMESPACE, "zeta", widened)
        await hand(emulator, "PATCH", CHAT, injected_by_the_other_operator(emulator, widened))
        assert holder(emulator) == "zeta"
        emulator.released.set()  # alpha's patch arrives: its test of the (absent) record fails
        await eventually(
            lambda: any("Deployment/chat (changed while this pass ran" in s for s in statuses(emulator, "alpha")),
            "alpha's pass left chat to the next one",
        )
        if not seen:
            # alpha's next pass decides before this operator has the event of zeta's change: from its own read of zeta.
            await eventually(
                lambda: "served by zeta" in injected_message(emulator, "alpha") or holder(emulator) != "zeta",
                "alpha's next pass decided on chat, zeta's change not seen here",
            )
            assert holder(emulator) == "zeta"
            assert zeta_selector_here(memo) == ELSEWHERE
            # The event of zeta's change arrives here now (its next write: the other operator's status, say).
            await hand(emulator, "PATCH", f"{LLMT_PATH}/zeta/status", {"status": {"targets": ["Deployment/chat"]}})
        await eventually(lambda: "served by zeta" in injected_message(emulator, "alpha"), "alpha says zeta serves chat")
        await eventually(lambda: conflict_events(emulator, "alpha"), "a Conflict event on alpha")
        mark = len(list(emulator))
        await asyncio.sleep(6.0)  # past the follow-up a deferral asks for (within 5 s), and its echoes
        assert writes(emulator, mark) == []  # nothing loops
        # One patch from this operator, alpha's, refused: chat rolled once, to zeta's injection.
        assert [record_owner(p) for p in operator_patches(emulator)] == ["alpha"]
        assert get(emulator, DEPLOYMENTS, "chat")["metadata"]["generation"] == 2
        assert holder(emulator) == "zeta"
        assert reason(emulator, "alpha", "Ready") == "Conflict"
        assert get(emulator, LLMT, "alpha")["status"]["targets"] == []
        assert get(emulator, LLMT, "alpha")["status"]["operator"] == PEERING
        assert not any(v for k, v in children(emulator, "alpha").items() if k != "service")
        events = conflict_events(emulator, "alpha")
        assert len(events) == 1 and "LLMTelemetry zeta, which wins it" in events[0]
        # This operator wrote nothing of zeta's: it is the other operator's.
        assert [w for w in writes(emulator, 0) if "/llmtelemetries/zeta" in w[1]] == []
    check_usage(emulator)
