"""Every condition and event message that lists workloads, containers or variables stays within MAX_MESSAGE_CHARS:
kopf cuts a longer event message in its middle, so a user would read half a name. A list that does not fit names its
first items whole and says how many more there are. And ``spec.containers`` naming a container twice is one name."""

from __future__ import annotations

import re
from typing import Any, Final

from hypothesis import given, settings
from hypothesis import strategies as st
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
from test_operator_kmock import check_usage, env_of

from llm_telemetry.config import DEFAULT_METRICS_PORT
from llm_telemetry_operator import constants as c
from llm_telemetry_operator.errors import MAX_MESSAGE_CHARS, Listed, bounded

#: Workload names of the longest kind Kubernetes allows (253 characters), eight of them: any message naming them all
#: passes the 1,024 characters kopf keeps of an event's message.
NAMES: Final = [f"{i}{'w' * 252}" for i in range(8)]


def long_workloads(emulator: Any, env: list[Any] | None = None, containers: int = 1, **extra: Any) -> None:
    for name in NAMES:
        workload = deployment(name, env=env)
        pod = workload["spec"]["template"]["spec"]
        pod["containers"] = [{**pod["containers"][0], "name": f"{'c' * 60}{i:03d}", **extra} for i in range(containers)]
        emulator.objects[DEPLOYMENTS, NAMESPACE, name] = workload


def counted(message: str, names: list[str] = NAMES) -> int:
    """How many of ``names`` the message names, checking it says how many more (or names them all)."""
    shown = sum(f"Deployment/{name}" in message for name in names)
    assert shown >= 1, message
    more = re.findall(r"and (\d+) more", message)  # (the workloads are the last list of these messages)
    assert (shown == len(names) and not more) or int(more[-1]) == len(names) - shown, message
    return shown


def said(emulator: Any, type_: str, reason: str) -> dict[str, Any]:
    cond = condition(get(emulator, LLMT, "chat"), type_)
    return cond if cond.get("reason") == reason else {}


async def test_no_container_in_many_long_named_workloads_is_said_whole(emulator: Any, monitoring_crds: Any) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    long_workloads(emulator, containers=3)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(containers=[f"{'m' * 62}{i}" for i in range(5)])
    async with running_operator():
        cond = await eventually(lambda: said(emulator, c.CONDITION_INJECTED, "NoContainer"), "NoContainer")
        posted = await eventually(lambda: posted_events(emulator, "NoContainer"), "the NoContainer event")
    message = cond["message"]
    # The event as stored is the condition's message, whole (kopf put "..." in the middle of one over 1,024).
    assert len(message) <= MAX_MESSAGE_CHARS and [e["message"] for e in posted] == [message]
    assert counted(message) < len(NAMES) and message.startswith(f"no container named {'m' * 62}0, ")
    assert re.search(r"\d, and \d more \(spec.containers\) in Deployment/0w+ \(its containers: c{60}000, ", message)
    check_usage(emulator)


async def test_settings_overridden_in_many_long_named_workloads_is_said_whole(
    emulator: Any, monitoring_crds: Any
) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    long_workloads(emulator, env=[{"name": "LLM_TELEMETRY_METRICS_PORT", "value": "9999"}])
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        cond = await eventually(lambda: said(emulator, c.CONDITION_METRICS, "SettingsOverridden"), "overridden")
        posted = await eventually(lambda: posted_events(emulator, "SettingsOverridden"), "the event")
        owner = get(emulator, LLMT, "chat")
    message = cond["message"]
    assert len(message) <= MAX_MESSAGE_CHARS and [e["message"] for e in posted] == [message]
    assert counted(message) < len(NAMES) and "LLM_TELEMETRY_METRICS_PORT" in message and message.endswith("to it)")
    # Injected into all eight: its condition names as many as fit (the status' targets list them all).
    injected = condition(owner, c.CONDITION_INJECTED)
    assert injected["reason"] == "Injected" and len(injected["message"]) <= MAX_MESSAGE_CHARS
    assert counted(injected["message"]) < len(NAMES) and len(owner["status"]["targets"]) == len(NAMES)
    assert condition(owner, c.CONDITION_READY)["message"] == message
    check_usage(emulator)


async def test_ready_and_port_conflicts_of_many_long_named_workloads_are_said_whole(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Ready's "telemetry wired for" names the workloads; then each declares the metrics port under another name:
    PortConflict on Injected and MetricsExposed, one Warning event, the NoTargets notes naming them too."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    long_workloads(emulator)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        owner = await ready(emulator)
        wired = condition(owner, c.CONDITION_READY)["message"]
        assert len(wired) <= MAX_MESSAGE_CHARS and wired.startswith("telemetry wired for Deployment/0")
        assert counted(wired) < len(NAMES)
    for name in NAMES:
        workload = get(emulator, DEPLOYMENTS, name)
        workload["spec"]["template"]["spec"]["containers"][0]["ports"] = [
            {"name": "app", "containerPort": DEFAULT_METRICS_PORT}
        ]
        emulator.objects[DEPLOYMENTS, NAMESPACE, name] = workload
    async with running_operator():
        cond = await eventually(lambda: said(emulator, c.CONDITION_INJECTED, "PortConflict"), "PortConflict")
        posted = await eventually(lambda: posted_events(emulator, "PortConflict"), "the PortConflict event")
        metrics = condition(get(emulator, LLMT, "chat"), c.CONDITION_METRICS)
    message = cond["message"]
    assert len(message) <= MAX_MESSAGE_CHARS and [e["message"] for e in posted] == [message]
    assert counted(message) < len(NAMES) and metrics["message"] == message
    check_usage(emulator)


async def test_a_container_named_twice_in_spec_containers_is_one_name(emulator: Any, monitoring_crds: Any) -> None:
    """``spec.containers`` is a set of names: one given twice is injected once and named once in every message."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    chat = deployment("chat")
    chat["spec"]["template"]["spec"]["containers"].append({"name": "side", "image": "example/side:1"})
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = chat
    other = deployment("other")
    other["spec"]["template"]["spec"]["containers"][0]["name"] = "proxy"
    emulator.objects[DEPLOYMENTS, NAMESPACE, "other"] = other
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(containers=["app", "gone", "app", "gone"])
    async with running_operator():
        injected = await eventually(lambda: said(emulator, c.CONDITION_INJECTED, "Injected"), "injected")
        posted = await eventually(lambda: posted_events(emulator, "NoContainer"), "the NoContainer event")
        pod = get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["spec"]
    assert [e["message"] for e in posted] == [
        "no container named app, gone (spec.containers) in Deployment/other (its containers: proxy)"
    ]
    assert injected["message"] == (
        "injected into Deployment/chat; skipped Deployment/other (its containers: proxy), none named in"
        " spec.containers; Deployment/chat has no container gone (spec.containers)"
    )
    app, side = pod["containers"]
    assert "OTEL_SERVICE_NAME" in env_of(get(emulator, DEPLOYMENTS, "chat")) and "env" not in side
    assert len([e["name"] for e in app["env"]]) == len({e["name"] for e in app["env"]})  # (each variable once)
    assert [p["name"] for p in app["ports"]].count(c.METRICS_PORT_NAME) == 1
    check_usage(emulator)


@settings(max_examples=300, deadline=None)
@given(
    lists=st.lists(
        st.tuples(
            st.lists(st.text(alphabet="ab/-.", min_size=1, max_size=300), max_size=60), st.sampled_from([", ", "; "])
        ),
        min_size=1,
        max_size=4,
    ),
    words=st.text(alphabet="xy :", max_size=60),
    most=st.one_of(st.none(), st.integers(min_value=1, max_value=8)),
    limit=st.integers(min_value=400, max_value=MAX_MESSAGE_CHARS),
)
def test_bounded_names_whole_items_within_the_bound_and_counts_the_rest(
    lists: list[tuple[list[str], str]], words: str, most: int | None, limit: int
) -> None:
    """Never over the bound, never a cut name, and for each list the names shown and the N of "and N more" add up to
    its length. (The names hold no digits nor "and"; each list is put between « and », so it can be read back.)"""
    parts: list[str | Listed] = []
    for i, (items, sep) in enumerate(lists):
        parts += [words, "«", Listed(items, sep, most if i == 0 else None), "»"]
    text = bounded(*parts, limit=limit)
    assert len(text) <= limit
    shown = re.findall("«([^»]*)»", text)
    assert len(shown) == len(lists)
    for i, ((items, sep), said) in enumerate(zip(lists, shown, strict=True)):
        more = re.fullmatch(rf"(?:(.*){re.escape(sep)})?and (\d+) more", said)
        if more is None:
            assert said == sep.join(items) and (i or most is None or len(items) <= most)
            continue
        named = more.group(1).split(sep) if more.group(1) is not None else []
        assert named == items[: len(named)]  # (whole names, in order)
        assert len(named) + int(more.group(2)) == len(items) and int(more.group(2)) > 0
        assert i or most is None or len(named) <= most
        if len(lists) == 1 and limit - len(words) - 2 >= len(items[0]) + len(f"{sep}and {len(items)} more"):
            assert named  # (the first name, when it fits)
