"""The chart as GitOps tools use it: Argo CD renders it with `helm template` on every sync and applies the result,
and compares what it rendered with what the cluster stores. Two renderings of the same values must be the same
bytes (anything random or time-dependent would make every sync a change), and what is rendered must be what the API
server stores: a field it does not keep as sent (an empty string it drops, a default it fills in) makes every
server-side apply of the same manifest write the object again (kubectl apply --server-side, Argo CD's
ServerSideApply, Flux's kustomize-controller). tests/integration/test_gitops_sync_on_server.py applies it on a real
API server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chartkit import CHART, KUBE_VERSION, NAMESPACE, RELEASE, VALUE_SETS, Helm, one

ValuesFile = Callable[[dict[str, Any]], Path]


def _template(helm: Helm, values_file: ValuesFile, values: dict[str, Any]) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    return helm.run(*args, "--include-crds", "--values", str(values_file(values))).stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_template_renders_the_same_bytes_every_time(helm: Helm, values_file: ValuesFile, name: str) -> None:
    """Without a cluster `lookup` finds nothing, and nothing else may vary: no random string, no time, no generated
    certificate. Argo CD renders on every sync; a rendering that changes is a sync that never ends."""
    first = _template(helm, values_file, VALUE_SETS[name])
    assert "\nkind: Deployment\n" in first, first[:2000]
    for _ in range(2):
        assert _template(helm, values_file, VALUE_SETS[name]) == first


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{path}/{index}")
    else:
        yield path, node


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_are_stored_as_rendered(render: Callable[..., list[dict[str, Any]]], name: str) -> None:
    """The two things the API server changed in the chart's Deployment on every apply: an env entry's empty
    `value: ""` (not stored: an empty string is left out) and a fieldRef without its apiVersion (filled in as v1).
    Either made each `kubectl apply --server-side` of an unchanged rendering write the Deployment again (a new
    resourceVersion and managedFields time, on a real API server). No rendered field is an empty string."""
    values = dict(VALUE_SETS[name])
    # Every value that feeds an environment variable, empty where the schema admits it.
    values["defaults"] = {
        **values.get("defaults", {}),
        "logsTenant": "",
        "serviceMonitorLabels": {"release": None},
    }
    docs = [doc for doc in render(values) if doc["kind"] != "CustomResourceDefinition"]
    # (An item of a list, such as the core API group "" of a ClusterRole's rule, is stored as it is.)
    empty = [
        f"{doc['kind']}/{doc['metadata']['name']}{path}"
        for doc in docs
        for path, leaf in _leaves(doc)
        if leaf == "" and not path.rsplit("/", 1)[1].isdigit()
    ]
    assert empty == []
    references = {
        f"{doc['kind']}{path.rsplit('/', 1)[0]}": dict(_leaves(doc)).get(path.rsplit("/", 1)[0] + "/apiVersion")
        for doc in docs
        for path, _ in _leaves(doc)
        if "/fieldRef/" in path and path.endswith("/fieldPath")
    }
    assert references, "the chart's POD_ID comes from a fieldRef"
    assert {where: version for where, version in references.items() if version != "v1"} == {}


def test_a_users_extra_env_is_rendered_as_the_api_server_stores_it(render: Callable[..., list[dict[str, Any]]]) -> None:
    """`extraEnv` entries as a user writes them, each of which the API server stores otherwise: an empty (or null)
    value left out, a fieldRef's apiVersion filled in as v1, a resourceFieldRef's divisor as "0". Rendered as
    given, every server-side apply of the same rendering wrote the Deployment again (on a real API server: a new
    managedFields time on each sync). Nothing else of an entry changes."""
    memory = {"containerName": "operator", "resource": "limits.memory"}
    values = {
        "extraEnv": [
            {"name": "EMPTY", "value": ""},
            {"name": "NULL", "value": None},
            {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"apiVersion": "", "fieldPath": "spec.nodeName"}}},
            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}},
            {"name": "LIMIT", "valueFrom": {"resourceFieldRef": memory}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "PLAIN", "value": "0"},
        ]
    }
    (operator,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    extra = operator["env"][-len(values["extraEnv"]) :]
    assert extra == [
        {"name": "EMPTY"},
        {"name": "NULL"},
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}},
        {"name": "LIMIT", "valueFrom": {"resourceFieldRef": {**memory, "divisor": "0"}}},
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
        {"name": "PLAIN", "value": "0"},
    ]


@pytest.mark.parametrize("namespaces", [[], ["llm-prod"]], ids=["cluster-wide", "namespaced"])
def test_the_peering_object_is_a_plain_manifest_with_peering_hook_false(
    render: Callable[..., list[dict[str, Any]]], namespaces: list[str]
) -> None:
    """Argo CD maps a Helm hook to a PostSync hook of its own and deletes and recreates its object at every sync: a
    peering object made anew has forgotten its replicas, so a standby replica resumed beside the active one. With
    `peering.hook=false` the object is a plain manifest (no Helm hook annotation), rendered every time under the name
    the operator is given, and tells Argo CD to skip its dry run while the CRD that comes in the same sync is not
    served yet. The default stays a hook: `helm install` cannot create it before its CRD otherwise."""

    def peering(**values: Any) -> list[dict[str, Any]]:
        docs = render({"watchNamespaces": namespaces, "peering": values})
        (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        named = {e["name"]: e.get("value") for e in operator["env"]}["LLM_TELEMETRY_OPERATOR_PEERING"]
        found = [doc for doc in docs if doc["kind"] == "ClusterKopfPeering"]
        assert all(doc["metadata"]["name"] == named for doc in found)
        return found

    (hook,) = peering()
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (plain,) = peering(hook=False)
    assert plain["metadata"]["annotations"] == {"argocd.argoproj.io/sync-options": "SkipDryRunOnMissingResource=true"}
    assert {k: v for k, v in plain.items() if k != "metadata"} == {k: v for k, v in hook.items() if k != "metadata"}
    assert plain["metadata"]["labels"] == hook["metadata"]["labels"]
    assert peering(hook=False, create=False) == []
