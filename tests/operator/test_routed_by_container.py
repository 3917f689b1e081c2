"""A container that routes a signal itself (its ``env`` declares the signal's own OTLP endpoint or headers, or for the
traces the generic endpoint) gets none of that signal's injected endpoint, protocol and headers, so its spans never
reach the collector the resource names: the resource says so in its ``SignalsRouted`` condition and in one Normal
event per change, naming workload, container, signal and variables, never a value."""

from __future__ import annotations

import asyncio
from typing import Any, Final

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
from test_operator_kmock import check_usage, env_of, hand, passes_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator.errors import MAX_MESSAGE_CHARS

#: Values of the app's own that must never show in a status or an event.
SECRET: Final = "s3cret-vendor-key"
VENDOR: Final = f"https://vendor.example:4318/v1/traces?key={SECRET}"
ROUTED: Final = "RoutedByContainer"


def routes(emulator: Any, name: str = "chat") -> dict[str, Any]:
    return condition(get(emulator, LLMT, name), c.CONDITION_ROUTES)


def events(emulator: Any) -> list[dict[str, Any]]:
    return posted_events(emulator, ROUTED)


async def test_a_container_routing_its_traces_itself_is_named_once_and_cleared_when_it_stops(
    emulator: Any, monitoring_crds: Any
) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    own = [
        {"name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "value": VENDOR},
        {"name": "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "value": f"authorization=Bearer {SECRET}"},
    ]
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment(env=own)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(tracing={"endpoint": "http://jaeger.observability:4318"})
    async with running_operator():
        # Not an error of the resource (the workload chose): Ready stays True, and the condition says why the traces
        # of that container never reach Jaeger.
        owner = await ready(emulator)
        said = await eventually(lambda: routes(emulator).get("reason") == ROUTED and routes(emulator), "the condition")
        assert said["status"] == "False" and owner["status"]["phase"] == "Ready"
        assert (
            "Deployment/chat container app: traces (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,"
            " OTEL_EXPORTER_OTLP_TRACES_HEADERS)" in said["message"]
        )
        assert "logs (" not in said["message"]  # (the logs do go to Loki)
        assert SECRET not in said["message"] and "vendor.example" not in said["message"]
        posted = await eventually(lambda: events(emulator), "the event")
        assert [(e["type"], e["message"]) for e in posted] == [("Normal", said["message"])]
        assert env_of(get(emulator, DEPLOYMENTS, "chat"))["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == VENDOR

        # Another pass that finds the same (a spec change elsewhere) posts no second event.
        passes = passes_for(emulator, "chat")
        await hand(emulator, "PATCH", f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries/chat",
                   {"spec": {"metrics": {"interval": "15s"}}})  # fmt: skip
        await eventually(lambda: passes_for(emulator, "chat") > passes, "a second pass")
        await eventually(lambda: get(emulator, LLMT, "chat")["status"].get("observedGeneration") == 2, "generation 2")
        await asyncio.sleep(1.0)  # every echo of the pass's own writes has been handled
        assert len(events(emulator)) == 1 and routes(emulator)["message"] == said["message"]

        # The container routes its logs too (the injected endpoint set to one of its own, as `kubectl set env`
        # does): the message changes, and one more event says so.
        workload = get(emulator, DEPLOYMENTS, "chat")
        containers = workload["spec"]["template"]["spec"]["containers"]
        logs = next(e for e in containers[0]["env"] if e["name"] == "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
        logs["value"] = VENDOR
        await hand(emulator, "PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat",
                   {"spec": {"template": {"spec": {"containers": containers}}}})  # fmt: skip
        both = await eventually(
            lambda: (
                "logs (OTEL_EXPORTER_OTLP_LOGS_ENDPOINT)" in routes(emulator).get("message", "") and routes(emulator)
            ),
            "the logs named too",
        )
        await eventually(lambda: len(events(emulator)) == 2, "a second event")
        assert events(emulator)[1]["message"] == both["message"] and SECRET not in both["message"]

    # A restarted operator posts nothing for what the status already shows.
    async with running_operator():
        passes = passes_for(emulator, "chat")
        await eventually(lambda: passes_for(emulator, "chat") > passes, "resumed with a pass")
        await asyncio.sleep(1.0)
        assert len(events(emulator)) == 2

        # The container stops routing them itself: the condition clears, and the injection routes them to the
        # resource's collectors.
        workload = get(emulator, DEPLOYMENTS, "chat")
        containers = workload["spec"]["template"]["spec"]["containers"]
        containers[0]["env"] = [e for e in containers[0]["env"] if e["name"] not in {x["name"] for x in own}
                                and e["name"] != "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"]  # fmt: skip
        await hand(emulator, "PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat",
                   {"spec": {"template": {"spec": {"containers": containers}}}})  # fmt: skip
        cleared = await eventually(lambda: routes(emulator).get("status") == "True" and routes(emulator), "cleared")
        assert cleared["reason"] == "Routed" and "Deployment/chat" not in cleared["message"]
        env = await eventually(
            lambda: (
                env_of(get(emulator, DEPLOYMENTS, "chat")).get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                == "http://jaeger.observability:4318/v1/traces"
                and env_of(get(emulator, DEPLOYMENTS, "chat"))
            ),
            "the traces injected",
        )
        assert env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] == "http://loki-gateway.observability/otlp/v1/logs"
        await asyncio.sleep(1.0)
        assert len(events(emulator)) == 2
    check_usage(emulator)


async def test_many_containers_routing_themselves_are_named_up_to_a_bound_and_counted(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Eight workloads of the longest names, each with a container routing its traces through the generic endpoint:
    the message names the first ones and says how many more, and stays within what an event holds uncut."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    generic = [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": VENDOR},
        {"name": "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "valueFrom": {"secretKeyRef": {"name": "own", "key": "h"}}},
        {"name": "OTEL_EXPORTER_OTLP_LOGS_HEADERS", "value": f"authorization=Bearer {SECRET}"},
    ]
    names = [f"{i}{'x' * 252}" for i in range(8)]
    for name in names:
        workload = deployment(name, env=generic)
        workload["spec"]["template"]["spec"]["containers"][0]["name"] = "a" * 63
        emulator.objects[DEPLOYMENTS, NAMESPACE, name] = workload
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        said = await eventually(lambda: routes(emulator).get("reason") == ROUTED and routes(emulator), "the condition")
        posted = await eventually(lambda: events(emulator), "the event")
    message = said["message"]
    assert len(message) <= MAX_MESSAGE_CHARS and posted[0]["message"] == message  # (kopf cuts longer ones)
    assert f"Deployment/{names[0]} container {'a' * 63}: traces (OTEL_EXPORTER_OTLP_TRACES_HEADERS," in message
    assert "OTEL_EXPORTER_OTLP_ENDPOINT), logs (OTEL_EXPORTER_OTLP_LOGS_HEADERS)" in message
    shown = sum(f"Deployment/{name} " in message for name in names)
    assert shown >= 1 and f"; and {len(names) - shown} more" in message
    assert SECRET not in message and "vendor.example" not in message
    check_usage(emulator)


async def test_traces_off_and_logs_on_stdout_route_nothing_to_tell(emulator: Any, monitoring_crds: Any) -> None:
    """A container routing its traces itself says nothing to a resource that routes no traces: nothing was kept
    from it."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    own = [{"name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "value": VENDOR}]
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment(env=own)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(tracing={"enabled": False}, logs={"mode": "stdout"})
    async with running_operator():
        await ready(emulator)
        said = await eventually(lambda: routes(emulator), "the condition")
        await asyncio.sleep(0.5)
    assert (said["status"], said["reason"]) == ("False", "Disabled")
    assert not events(emulator)
