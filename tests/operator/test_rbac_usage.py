"""Every permission in rbac.PERMISSIONS (what the chart grants) is one the operator really uses, in one test.

One emulator, the operator run twice (cluster-wide, then namespaced): a resource wiring a Deployment and a
StatefulSet, one with a spec the operator refuses, conflicting writes on every kind it patches (so the re-read
after a 409 happens), a spec change that updates every child, a workload leaving the selector, the resource's
deletion, and namespaced mode's peering. The union of the operator's API calls must equal the declared
permissions: a grant nobody uses is a grant too many, and a call nobody declared is refused by the RBAC guard
(and by a real cluster).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from kopf_testing import (
    CONFIGMAPS,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    PROMETHEUSRULES,
    SERVICEMONITORS,
    SERVICES,
    STATEFULSETS,
    condition,
    deployment,
    eventually,
    get,
    minimal_llmt,
    running_operator,
)

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import rbac
from llm_telemetry_operator.config import OperatorConfig

#: kmock's action names to Kubernetes verbs.
VERBS = {"list": "list", "watch": "watch", "fetch": "get", "create": "create", "update": "patch", "delete": "delete"}
HAND = {"X-Test-Hand": "1"}
#: The Prometheus Operator's kinds, registered with the emulator so that it serves them. Their schemas play no
#: part here (tests/operator/test_schemas.py validates what the operator builds against them).
MONITORING = {"servicemonitors": "ServiceMonitor", "prometheusrules": "PrometheusRule"}


def register_monitoring_kinds(kmock: Any) -> None:
    for plural, kind in MONITORING.items():
        kmock.resources[f"monitoring.coreos.com/v1/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs={"list", "watch", "patch", "get", "create", "delete"}
        )
        name = f"{plural}.monitoring.coreos.com"
        kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, name] = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural},
                "versions": [{"name": "v1", "served": True, "storage": True}],
            },
        }


def named_usage(kmock: Any) -> set[tuple[str, str, str, str | None]]:
    """(api_group, resource, verb, name or None) of every API call the operator and kopf made (the test's own calls
    excluded)."""
    calls = set()
    for req in list(kmock):
        if req.headers.get("X-Test-Hand") or req.resource is None or req.resource.plural is None or req.action is None:
            continue
        plural = req.resource.plural + (f"/{req.subresource}" if req.subresource else "")
        calls.add((req.resource.group, plural, VERBS[str(req.action.value).lower()], req.name))
    return calls


def usage(kmock: Any) -> set[tuple[str, str, str]]:
    """(api_group, resource, verb) of every API call the operator made (the test's own calls excluded)."""
    return {call[:3] for call in named_usage(kmock)}


async def hand(kmock: Any, method: str, path: str, body: Any = None) -> None:
    """A write by someone else (kubectl, another controller)."""
    headers = {**HAND, "Content-Type": "application/merge-patch+json"}
    async with aiohttp.ClientSession() as session:
        url = str(kmock.url).rstrip("/") + path
        async with session.request(method, url, data=json.dumps(body) if body else None, headers=headers) as rsp:
            assert rsp.status < 400, await rsp.text()


def port_of(service: dict[str, Any] | None) -> Any:
    return (service or {}).get("spec", {}).get("ports", [{}])[0].get("port")


def annotations(obj: dict[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("metadata", {}).get("annotations") or {})


def foreign_label(name: str) -> dict[str, Any]:
    return {"metadata": {"labels": {"edited-by": name}}}


async def test_every_declared_permission_is_used_and_nothing_else(emulator: Any) -> None:
    register_monitoring_kinds(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[STATEFULSETS, NAMESPACE, "db"] = deployment("db", kind="StatefulSet")
    pricing = {"models": {"gpt-4o": {"input": 2.5, "output": 10}}}
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt(pricing=pricing)
    # One the operator refuses (the emulator, unlike an API server, does not apply the CRD's schema): an Event.
    emulator.objects[LLMT, NAMESPACE, "broken"] = minimal_llmt(
        "broken", selector={"matchLabels": {"app": "none"}}, alerts={"ttftObjectiveSeconds": 3}
    )
    # Someone else writes each workload between the operator's read and its patch: 409, re-read, retry.
    emulator.interfere["deployments", "chat"] = foreign_label("ci")
    emulator.interfere["statefulsets", "db"] = foreign_label("ci")
    base = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries/chat"

    async with running_operator():
        await eventually(
            lambda: (
                (get(emulator, LLMT, "chat") or {}).get("status", {}).get("targetCount") == 2
                and condition(get(emulator, LLMT, "chat"), "Ready").get("status") == "True"
            ),
            "Ready with both workloads",
        )
        assert get(emulator, CONFIGMAPS, "chat-llm-pricing") is not None
        await eventually(lambda: condition(get(emulator, LLMT, "broken"), "Ready").get("reason"), "broken refused")
        # Every child gets a foreign write right before the operator's next patch of it; then a spec change makes
        # the operator patch all of them (port: Service; interval: ServiceMonitor; thresholds: rules; folder and prices:
        # the ConfigMaps).
        for plural, name in (
            ("services", "chat-llm-metrics"),
            ("servicemonitors", "chat-llm-telemetry"),
            ("prometheusrules", "chat-llm-telemetry"),
            ("configmaps", "chat-llm-dashboard"),
            ("configmaps", "chat-llm-pricing"),
        ):
            emulator.interfere[plural, name] = foreign_label("gitops")
        change = {
            "metrics": {"port": 9500, "interval": "15s"},
            "alerts": {"errorRatio": 0.02},
            "dashboard": {"folder": "Assistant"},
            "pricing": {"models": {"gpt-4o": {"input": 2, "output": 8}}},
        }
        await hand(emulator, "PATCH", base, {"metadata": {"generation": 2}, "spec": change})
        await eventually(lambda: port_of(get(emulator, SERVICES, "chat-llm-metrics")) == 9500, "Service updated")
        await eventually(
            lambda: (
                annotations(get(emulator, CONFIGMAPS, "chat-llm-dashboard")).get(c.ANNOTATION_GRAFANA_FOLDER)
                == "Assistant"
            ),
            "dashboard moved",
        )
        await eventually(lambda: not emulator.interfere, "every scripted conflict met")
        # The StatefulSet leaves the selector: its injection and its Service go.
        await hand(
            emulator,
            "PATCH",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/db",
            {"metadata": {"labels": {"app": "batch"}}},
        )
        await eventually(lambda: get(emulator, SERVICES, "db-llm-metrics-sts") is None, "Service of db removed")
        # Deleting the resource: the finalizer undoes the injection and deletes the children.
        await hand(emulator, "DELETE", base)
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "LLMTelemetry gone")
        for resource, name in ((SERVICEMONITORS, "chat-llm-telemetry"), (PROMETHEUSRULES, "chat-llm-telemetry")):
            assert get(emulator, resource, name) is None, name

    # Namespaced mode: kopf watches the namespaces, and keeps its entry in the ClusterKopfPeering as before.
    config = OperatorConfig(namespaces=(NAMESPACE,), peering=PEERING, metrics_port=0, health="")
    async with running_operator(config):
        await eventually(lambda: ("", "namespaces", "watch") in usage(emulator), "kopf's watch of the namespaces")

    used, declared = usage(emulator), rbac.declared_triples()
    assert used <= declared, f"API calls missing from rbac.PERMISSIONS: {sorted(used - declared)}"
    # The owner's finalizers are checked by the API server's admission when a child is created, never called.
    unused = declared - used - rbac.ADMISSION_ONLY
    assert not unused, f"declared but never used: {sorted(unused)}"
    # A permission limited to named objects (the chart's resourceNames) is used on those only, by kopf too (whose
    # calls bypass the operator's client and its check): the peering object's keepalives and clean-ups go to the
    # operator's own ClusterKopfPeering and no other.
    limited = [p for p in rbac.PERMISSIONS if p.names is not None]
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in {
        (p.api_group, resource, verb) for p in limited for resource in p.resources for verb in p.verbs
    }
    for permission in limited:
        allowed = {"peering": PEERING}[permission.names]
        names = {
            name
            for group, resource, verb, name in named_usage(emulator)
            if group == permission.api_group and resource in permission.resources and verb in permission.verbs
        }
        assert names == {allowed}, f"{permission}: used on {sorted(map(str, names))}"
