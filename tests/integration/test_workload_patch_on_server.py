"""A pass's patch of a Deployment on a real API server when another client writes the Deployment between the pass's
read of it and its patch, in that order (the test reads, writes, then patches: no timing).

The patch tests only what the pass decided from (uid, generation, labels, injection record, deletion): a write of
status and of the controller's revision annotation, as the deployment controller makes after every rollout, no longer
makes it fail (a ``resourceVersion`` precondition on the whole object did: a 409, a second read and the patch
again); a change of labels or of spec still does, and the pass reads the Deployment again: a removal patches that
version, an injection decided from the first read leaves it to the next pass."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from clusterkit import deployment, unique, wait_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import kube
from llm_telemetry_operator import reconcile as rc
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.spec import parse_spec

pytestmark = pytest.mark.k8s

REVISION = "deployment.kubernetes.io/revision"


@pytest.fixture
def namespace(api: Any) -> Iterator[str]:
    from kubernetes import client

    name = unique("patch")
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    yield name
    client.CoreV1Api(api).delete_namespace(name)


def _synced(api: Any, namespace: str) -> dict[str, Any]:
    """The Deployment ``chat`` once the deployment controller has written it (its revision annotation and status)."""
    from kubernetes import client

    apps = client.AppsV1Api(api)

    def read() -> dict[str, Any] | None:
        dep = api.sanitize_for_serialization(apps.read_namespaced_deployment("chat", namespace))
        meta, status = dep["metadata"], dep.get("status") or {}
        done = REVISION in (meta.get("annotations") or {}) and status.get("observedGeneration") == meta["generation"]
        return {**dep, "kind": "Deployment"} if done else None

    synced: dict[str, Any] = wait_for(read, "the deployment controller's first update")
    return synced


async def _patched(kubeconfig: Any, namespace: str, workload: dict[str, Any], decided: bool = False) -> tuple[Any, Any]:
    """The pass's patch of ``workload`` (as it read it) injecting LLMTelemetry ``chat``: what it answered (None when
    left unpatched), and the version the pass read last (``workload`` itself unless it read it again)."""
    client = kube.KubeClient(kube.load_configuration(str(kubeconfig)))
    owner = {"metadata": {"name": "chat", "namespace": namespace}}
    spec = parse_spec({"selector": {"matchLabels": {"llm": "chat"}}})
    try:
        return await rc._patch_workload(client, OperatorConfig(), owner, spec, workload, decided=decided)
    finally:
        await client.close()


def _read_then_changed(api: Any, namespace: str, change: str) -> tuple[Any, dict[str, Any]]:
    """Deployment ``chat`` as a pass reads it, then changed by another client (``labels`` or ``spec``: its image)."""
    from kubernetes import client

    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment("chat", "chat"))
    read = _synced(api, namespace)
    if change == "labels":
        apps.patch_namespaced_deployment("chat", namespace, {"metadata": {"labels": {"team": "search"}}})
    else:
        image = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example.invalid/chat:2"}]}}}}
        apps.patch_namespaced_deployment("chat", namespace, image)
    return apps, read


def _env(dep: Any) -> dict[str, Any]:
    container = dep["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env") or []}


async def test_the_controllers_update_between_a_pass_read_and_its_patch_costs_no_conflict(
    api: Any, kubeconfig: Any, namespace: str
) -> None:
    from kubernetes import client

    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment("chat", "chat"))
    read = _synced(api, namespace)
    # What the deployment controller writes after a rollout, through the status subresource: status and its revision
    # annotation; the spec, labels and record stay, the generation too.
    moved = {"metadata": {"annotations": {REVISION: "7"}}, "status": {"collisionCount": 1}}
    written = apps.patch_namespaced_deployment_status("chat", namespace, moved)
    assert written.metadata.resource_version != read["metadata"]["resourceVersion"]
    assert written.metadata.generation == read["metadata"]["generation"]

    after, last = await _patched(kubeconfig, namespace, read)

    assert last is read  # no 409, no second read: the first patch applied
    assert after["metadata"]["generation"] == read["metadata"]["generation"] + 1
    stored = api.sanitize_for_serialization(apps.read_namespaced_deployment("chat", namespace))
    assert _env(stored)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
    assert json.loads(stored["metadata"]["annotations"][c.ANNOTATION_INJECTED])["owner"] == "chat"
    # (What the controller wrote is its own to rewrite after the rollout the patch starts: not compared here.)


@pytest.mark.parametrize("change", ["labels", "spec"])
async def test_a_change_of_labels_or_spec_between_a_pass_read_and_its_patch_is_read_again(
    api: Any, kubeconfig: Any, namespace: str, change: str
) -> None:
    """A write the pass's decision depends on fails the patch (the API server answers 422 to a ``test`` not met, taken
    as a conflict): the pass reads the Deployment again and patches that version, keeping the other client's
    change (a new image stays: the patch's container list is built from the version read again)."""
    apps, read = _read_then_changed(api, namespace, change)

    after, last = await _patched(kubeconfig, namespace, read)

    assert last is not read and after is not None
    stored = api.sanitize_for_serialization(apps.read_namespaced_deployment("chat", namespace))
    assert _env(stored)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
    if change == "labels":
        assert last["metadata"]["labels"] == stored["metadata"]["labels"] == {"llm": "chat", "team": "search"}
    else:
        assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == "example.invalid/chat:2"
        assert stored["metadata"]["generation"] == read["metadata"]["generation"] + 2


@pytest.mark.parametrize("change", ["labels", "spec"])
async def test_an_injection_decided_from_a_read_leaves_a_workload_changed_before_its_patch_unpatched(
    api: Any, kubeconfig: Any, namespace: str, change: str
) -> None:
    """A pass's injection is decided from the version it listed; a write of labels or spec before its patch fails the
    patch, and the version read again, in another state, is left as it is for the next pass to decide on (no rollout
    for a decision made from a version that is gone)."""
    apps, read = _read_then_changed(api, namespace, change)

    after, last = await _patched(kubeconfig, namespace, read, decided=True)

    assert after is None and last is not read
    stored = api.sanitize_for_serialization(apps.read_namespaced_deployment("chat", namespace))
    assert "LLM_TELEMETRY_METRICS_PORT" not in _env(stored)
    assert c.ANNOTATION_INJECTED not in (stored["metadata"].get("annotations") or {})
    assert stored["metadata"]["generation"] == last["metadata"]["generation"]  # (the other client's write, no more)
