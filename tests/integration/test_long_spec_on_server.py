"""A resource whose spec.containers lists many long names (the schema bounds neither the list nor the names), on a
real API server: the NoContainer message names them all, in two conditions, and a status that large beside the spec
passed etcd's limit for one object. Every status write was refused (``etcdserver: request is too large``), and the
resource showed ApiError, retried for as long as it existed, instead of saying that no selected workload has those
containers."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from clusterkit import deployment, install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r

pytestmark = pytest.mark.k8s


def _conditions(custom: Any, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    body = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
    return {cond["type"]: cond for cond in (body.get("status") or {}).get("conditions") or []}


def test_a_spec_naming_many_long_containers_still_gets_its_status(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client

    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    system, namespace = unique("llmt-long-system"), unique("llmt-long")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    name = unique("chat")
    apps.create_namespaced_deployment(namespace, deployment(name, name))  # its one container: "app"
    # Some 600 KB of names, none of them the workload's: the resource itself is well within what the API server takes.
    containers = [f"c{i:05d}-" + "x" * 240 for i in range(2500)]
    process = None
    try:
        process, log, _, _ = start_chart_operator(api, kubeconfig, docs, system, tmp_path)
        custom.create_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, telemetry(name, name, containers=containers)
        )
        injected = wait_for(
            lambda: _conditions(custom, namespace, name).get(c.CONDITION_INJECTED), "an Injected condition", timeout=90
        )
        ready = _conditions(custom, namespace, name)[c.CONDITION_READY]
        assert (injected["reason"], ready["reason"]) == ("NoContainer", "NoContainer"), (injected, ready)
        assert injected["message"].startswith(f"no container named {containers[0]}, {containers[1]}")
        assert len(injected["message"]) == r.MAX_CONDITION_MESSAGE_CHARS and injected["message"].endswith("…")
        assert "request is too large" not in log.read_text(errors="replace")
        assert process.poll() is None
        # Deleted while the operator runs, such a resource goes: its finalizer comes off like any other's.
        custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
        wait_for(
            lambda: not custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL)["items"],
            "the resource deleted (its finalizer taken off)",
            timeout=90,
        )
    finally:
        if process is not None:
            stop(process)
        uninstall(api, docs, (namespace, system))
