"""A resource whose spec.containers lists many long names, on a real API server. Such a spec once passed etcd's
limit for one object with its status (the NoContainer message named every name, in two conditions): every status
write was refused (``etcdserver: request is too large``), and the resource showed ApiError, retried for as long as it
existed. The CRD now bounds the list (32 names of at most 63 characters), so the API server refuses such a resource.
One stored before the CRD had the bound is still there after an upgrade: a server without validation ratcheting (this
one, 1.26; ratcheting is on by default from 1.30, and there the operator's own check says InvalidSpec) refuses every
update of it, so the operator says why in an UpdateRefused event naming the bound, and it can be deleted."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
from clusterkit import apply, deployment, install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s


def _conditions(custom: Any, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    body = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
    return {cond["type"]: cond for cond in (body.get("status") or {}).get("conditions") or []}


def _unbounded(crd: dict[str, Any]) -> dict[str, Any]:
    """``crd`` as it was before spec.containers had its bounds."""
    crd = copy.deepcopy(crd)
    for version in crd["spec"]["versions"]:
        containers = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["containers"]
        del containers["maxItems"], containers["items"]["maxLength"]
    return crd


def test_a_resource_stored_before_the_containers_bound_is_told_why_and_can_be_deleted(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    system, namespace = unique("llmt-long-system"), unique("llmt-long")
    docs = install(api, system)
    crd = next(doc for doc in docs if doc["kind"] == "CustomResourceDefinition" and doc["spec"]["group"] == c.GROUP)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    name = unique("chat")
    apps.create_namespaced_deployment(namespace, deployment(name, name))  # its one container: "app"
    # Some 600 KB of names, none of them the workload's: the resource itself is well within what the API server takes.
    containers = [f"c{i:05d}-" + "x" * 240 for i in range(2500)]
    body = telemetry(name, name, containers=containers)
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)
    assert refused.value.status == 422 and "spec.containers" in str(refused.value.body), refused.value.body
    process = None
    try:
        apply(api, _unbounded(crd))

        def stored() -> bool:  # (the API server takes the CRD's new schema a moment after it is written)
            try:
                custom.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, body)
            except ApiException as exc:
                if exc.status != 422:
                    raise
                return False
            return True

        wait_for(stored, "the resource stored under the CRD without the bound")
        apply(api, crd)  # the chart's CRD again, as an upgrade applies it
        process, log, _, _ = start_chart_operator(api, kubeconfig, docs, system, tmp_path)

        def events() -> list[str]:
            found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
            return [e.message for e in found.items if e.reason == "UpdateRefused"]

        [event] = wait_for(events, "an UpdateRefused event", timeout=90)
        assert "spec.containers" in event and "32" in event, event
        assert f"{namespace}/{name}: the API server refuses every update" in log.read_text(errors="replace")
        assert "request is too large" not in log.read_text(errors="replace")
        assert process.poll() is None
        # Deleted while the operator runs, it goes (the finalizer could not be added).
        custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
        wait_for(
            lambda: not custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL)["items"],
            "the resource deleted",
            timeout=90,
        )
    finally:
        apply(api, crd)
        if process is not None:
            stop(process)
        uninstall(api, docs, (namespace, system))
