"""The chart grants exactly what operator/llm_telemetry_operator/rbac.py declares: nothing missing, nothing extra."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from chartkit import CHART, NAMESPACE, RELEASE, VALUE_SETS, Helm, find, one

from llm_telemetry_operator import rbac

Render = Callable[..., list[dict[str, Any]]]
#: (api group, resource, verb, the one object it is limited to or None for every object).
Grant = tuple[str, str, str, str | None]
#: The name of the release's ClusterKopfPeering with the default values, cluster-wide and namespaced.
PEERING = "llm-telemetry-operator"
NAMESPACED_PEERING = f"{NAMESPACE}-{RELEASE}-operator"


def declared(*, cluster_wide: bool | None = None, kind: str | None = None, peering: str = PEERING) -> set[Grant]:
    """What rbac.PERMISSIONS declares; a permission limited to the operator's own ClusterKopfPeering is limited to
    ``peering``."""
    return {
        (p.api_group, resource, verb, name)
        for p in rbac.PERMISSIONS
        if (cluster_wide is None or p.cluster_wide == cluster_wide) and (kind is None or p.kind == kind)
        for resource in p.resources
        for verb in p.verbs
        for name in ([None] if p.names is None else [{"peering": peering}[p.names]])
    }


def granted(role: dict[str, Any]) -> set[Grant]:
    grants: set[Grant] = set()
    for rule in role["rules"]:
        # Least privilege: no wildcards, no non-resource URLs.
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        names = rule.get("resourceNames", [None])
        assert names, rule  # an empty resourceNames grants every object
        grants |= {
            (g, r, v, n) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"] for n in names
        }
    return grants


def env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [operator] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in operator["env"]}


def grouped(rendered: str, kind: str, name: str) -> dict[str, set[Grant]]:
    """The rules of one rendered Role/ClusterRole split by their `# Framework:` / `# Application:` comments."""
    for text in rendered.split("\n---\n"):
        doc = yaml.safe_load(text)
        if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
            break
    else:
        raise AssertionError(f"no {kind}/{name} in the output")
    rules_text = text.split("\nrules:\n", 1)[1]
    groups: dict[str, set[Grant]] = {}
    for heading, body in re.findall(r"^\s*# (Framework|Application):[^\n]*\n((?:(?!\s*#).*\n?)*)", rules_text, re.M):
        groups.setdefault(heading.lower(), set())
        groups[heading.lower()] |= granted({"rules": yaml.safe_load(body) or []})
    assert set().union(*groups.values()) == granted(doc), "every rule must sit under a Framework/Application comment"
    return groups


def test_permissions_declare_both_kinds() -> None:
    # Guards the comparisons below against an empty or one-sided declaration.
    assert declared(kind="framework") and declared(kind="application")
    assert declared(cluster_wide=True) and declared(cluster_wide=False)


def test_cluster_mode_clusterrole_grants_exactly_the_declared_permissions(render: Render) -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    assert granted(role) == declared()
    assert find(docs, "Role") == [] and find(docs, "RoleBinding") == []
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def test_namespaced_mode_splits_permissions_by_scope(render: Render) -> None:
    namespaces = VALUE_SETS["namespaced"]["watchNamespaces"]
    docs = render(VALUE_SETS["namespaced"])
    assert granted(one(docs, "ClusterRole")) == declared(cluster_wide=True, peering=NAMESPACED_PEERING)
    # The LLMTelemetry resources are granted cluster-wide, so that their finalizers can come off after a watched
    # namespace's deletion has taken its Role; nothing else namespaced is (a SelfSubjectAccessReview is
    # cluster-scoped).
    framework = ("", "apiextensions.k8s.io", "kopf.dev", "authorization.k8s.io")
    assert {(g, r) for g, r, _, _ in declared(cluster_wide=True) if g not in framework} == {
        ("llmtelemetry.dev", "llmtelemetries"),
        ("llmtelemetry.dev", "llmtelemetries/status"),
    }
    roles = find(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    for role in roles:
        assert granted(role) == declared(cluster_wide=False)
    bindings = {b["metadata"]["namespace"]: b for b in find(docs, "RoleBinding")}
    assert sorted(bindings) == sorted(namespaces)
    for role in roles:
        binding = bindings[role["metadata"]["namespace"]]
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert env(docs)["LLM_TELEMETRY_OPERATOR_NAMESPACES"] == ",".join(namespaces)


@pytest.mark.parametrize(
    ("values", "peering"),
    [
        ({}, PEERING),
        ({"peering": {"name": "shared-peering"}}, "shared-peering"),
        (VALUE_SETS["namespaced"], NAMESPACED_PEERING),
        ({**VALUE_SETS["namespaced"], "peering": {"name": "team-a-peering"}}, "team-a-peering"),
    ],
)
def test_the_release_writes_only_its_own_peering_object(render: Render, values: dict[str, Any], peering: str) -> None:
    # A token of one release that may patch every ClusterKopfPeering writes a fake peer of top priority into another
    # release's, and that release's operator stands by for good. Its own peering object is the one the operator is
    # told to use, the one the chart creates; the others can still be read (kopf watches them all).
    docs = render(values)
    assert env(docs)["LLM_TELEMETRY_OPERATOR_PEERING"] == peering
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == peering
    peerings = {
        (v, n) for g, r, v, n in granted(one(docs, "ClusterRole")) if (g, r) == ("kopf.dev", "clusterkopfpeerings")
    }
    assert peerings == {("list", None), ("watch", None), ("patch", peering)}


def test_rules_are_grouped_into_framework_and_application(helm: Helm) -> None:
    cluster = helm.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE).stdout
    name = f"{RELEASE}-operator"
    groups = grouped(cluster, "ClusterRole", name)
    assert groups == {"framework": declared(kind="framework"), "application": declared(kind="application")}

    namespaced = helm.run(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", "watchNamespaces={llm}"
    ).stdout
    assert grouped(namespaced, "ClusterRole", name) == {
        "framework": declared(kind="framework", cluster_wide=True, peering=f"{NAMESPACE}-{name}"),
        "application": declared(kind="application", cluster_wide=True),
    }
    groups = grouped(namespaced, "Role", name)
    assert groups == {
        "framework": declared(kind="framework", cluster_wide=False),
        "application": declared(kind="application", cluster_wide=False),
    }


@pytest.mark.parametrize("name", ["defaults", "namespaced"])
def test_rbac_can_be_left_to_the_user(render: Render, name: str) -> None:
    docs = render({**VALUE_SETS[name], "rbac": {"create": False}})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {d["kind"] for d in docs}
