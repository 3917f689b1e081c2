"""A message naming many long-named workloads, on a real API server: the NoContainer Warning event as the server
stores it is the condition's message, whole, within the bound kopf keeps uncut (it puts "..." in the middle of a
longer one, and a user would read half a workload's name), naming the first workloads and how many more."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest
from clusterkit import install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator.errors import MAX_MESSAGE_CHARS

pytestmark = pytest.mark.k8s


def _deployment(name: str, selects: str) -> dict[str, Any]:
    """A Deployment of a name as long as Kubernetes allows (stored only: no kubelet runs its pod); its pods' labels
    are short, a label value having at most 63 characters."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"llm": selects}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"pod": name[:8]}},
            "template": {
                "metadata": {"labels": {"pod": name[:8]}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/chat:1"}]},
            },
        },
    }


def test_a_no_container_event_naming_many_long_workloads_is_stored_whole(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client

    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    system, namespace = unique("llmt-msg-system"), unique("llmt-msg")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    name = unique("chat")
    workloads = [f"w{i}-" + "x" * 250 for i in range(8)]  # 253 characters each
    for workload in workloads:
        apps.create_namespaced_deployment(namespace, _deployment(workload, name))
    missing = [f"m{i}-" + "y" * 60 for i in range(5)]  # none of them the workloads' "app"
    custom.create_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL, telemetry(name, name, containers=missing)
    )
    process = None
    try:
        process, _, _, _ = start_chart_operator(api, kubeconfig, docs, system, tmp_path)

        def events() -> list[str]:
            found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
            return [e.message for e in found.items if e.reason == "NoContainer"]

        [event] = wait_for(events, "a NoContainer event", timeout=90)
        body = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
        [injected] = [x for x in body["status"]["conditions"] if x["type"] == c.CONDITION_INJECTED]
        assert injected["reason"] == "NoContainer" and injected["message"] == event, (event, injected)
        assert len(event) <= MAX_MESSAGE_CHARS and "..." not in event, event
        shown = [w for w in workloads if f"Deployment/{w} (its containers: app)" in event]
        more = re.search(r", and (\d+) more$", event)
        assert shown and more is not None and len(shown) + int(more.group(1)) == len(workloads), event
        assert event.startswith(f"no container named {missing[0]}, "), event
        assert process.poll() is None
    finally:
        if process is not None:
            stop(process)
        uninstall(api, docs, (namespace, system))
