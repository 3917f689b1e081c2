"""Fixtures for the operator tests: a kmock Kubernetes emulator with our CRD, and the operator running against it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import pathlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import jsonschema
import kopf
import pytest
import yaml

from llm_telemetry_operator.config import OperatorConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_CRDS = REPO_ROOT.parent / "shared" / "crds"
CRD_PATH = REPO_ROOT / "crds" / "llmtelemetry.dev_llmtelemetries.yaml"
NAMESPACE = "llm"
PEERING = "test-peering"

LLMT = "llmtelemetry.dev/v1alpha1/llmtelemetries"
DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
SERVICEMONITORS = "monitoring.coreos.com/v1/servicemonitors"
PROMETHEUSRULES = "monitoring.coreos.com/v1/prometheusrules"


def load_crd(path: pathlib.Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def crd_schema(crd: Mapping[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def crd_validator(crd: Mapping[str, Any]) -> jsonschema.Draft4Validator:
    # Kubernetes' structural schemas use draft-4 style booleans for exclusiveMinimum/Maximum.
    return jsonschema.Draft4Validator(crd_schema(crd))


@pytest.fixture(scope="session")
def shared_crds() -> dict[str, dict[str, Any]]:
    """The Prometheus Operator CRDs from ../shared/crds, by plural."""
    if not SHARED_CRDS.is_dir():
        pytest.skip(
            f"Prometheus Operator CRDs not found in {SHARED_CRDS.name}/ next to the repository (../shared/crds)"
        )
    crds = {}
    for path in SHARED_CRDS.glob("monitoring.coreos.com_*.yaml"):
        crd = load_crd(path)
        crds[crd["spec"]["names"]["plural"]] = crd
    return crds


def minimal_llmt(name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmtelemetry.dev/v1alpha1",
        "kind": "LLMTelemetry",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {"selector": {"matchLabels": {"app": "chat"}}, **spec},
    }


def deployment(
    name: str = "chat", labels: Mapping[str, str] | None = None, env: list[Any] | None = None
) -> dict[str, Any]:
    labels = dict(labels if labels is not None else {"app": "chat"})
    container: dict[str, Any] = {"name": "app", "image": "example/chat:1"}
    if env:
        container["env"] = env
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": labels,
            "uid": f"uid-deploy-{name}",
            "resourceVersion": "1",
        },
        "spec": {
            "selector": {"matchLabels": {"pod": name}},
            "template": {"metadata": {"labels": {"pod": name, **labels}}, "spec": {"containers": [container]}},
        },
    }


def get(kmock: Any, resource: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
    """The object's current state, or None (``key in kmock.objects`` is unreliable: index and catch)."""
    try:
        obj = kmock.objects[resource, namespace, name]
        return copy.deepcopy(dict(obj.raw))
    except (KeyError, ValueError):
        return None


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


async def eventually(check: Callable[[], Any], what: str, attempts: int = 300) -> Any:
    """Yield to the emulator (same event loop) until ``check()`` is truthy; fail naming ``what``."""
    for _ in range(attempts):
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def writes(kmock: Any) -> list[tuple[str, str]]:
    """(method, path) of every write request the emulator received so far."""
    return [
        (str(req.method), str(req.url.path))
        for req in list(kmock)
        if str(req.method) in ("POST", "PATCH", "PUT", "DELETE")
    ]


@pytest.fixture
def emulator(kmock: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """kmock with the namespaces, workloads, children and peering resources the operator needs."""
    r = kmock.resources
    r["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"})
    r["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create"})
    r["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
    )
    r["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"list", "watch", "patch", "get"}
    )
    r[LLMT] = kmock.ResourceInfo(
        kind="LLMTelemetry",
        namespaced=True,
        subresources={"status"},
        shortnames={"llmt"},
        verbs={"list", "watch", "patch", "get", "create", "delete"},
    )
    all_verbs = {"list", "watch", "patch", "get", "create", "delete"}
    for res, kind in (
        (DEPLOYMENTS, "Deployment"),
        (STATEFULSETS, "StatefulSet"),
        (SERVICES, "Service"),
        (CONFIGMAPS, "ConfigMap"),
    ):
        r[res] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=all_verbs)
    kmock.objects["v1/namespaces", None, NAMESPACE] = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE},
    }
    kmock.objects["kopf.dev/v1/clusterkopfpeerings", None, PEERING] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": PEERING},
    }
    crd = load_crd(CRD_PATH)
    kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = crd
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "kmock", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield kmock


def install_prometheus_operator_crds(kmock: Any, shared_crds: Mapping[str, Mapping[str, Any]]) -> None:
    verbs = {"list", "watch", "patch", "get", "create", "delete"}
    for plural in ("servicemonitors", "prometheusrules"):
        crd = shared_crds[plural]
        kmock.resources[f"monitoring.coreos.com/v1/{plural}"] = kmock.ResourceInfo(
            kind=crd["spec"]["names"]["kind"], namespaced=True, verbs=verbs
        )
        kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = dict(crd)


@contextlib.asynccontextmanager
async def running_operator(config: OperatorConfig | None = None) -> AsyncIterator[kopf.Memo]:
    """kopf's real operator loop, in-process, on the test's event loop (where kmock serves)."""
    from llm_telemetry_operator import handlers  # noqa: F401  (registers the handlers)

    # Cluster-wide: in namespaced mode kopf lists /api/v1/namespaces, a path kmock 0.8 cannot parse.
    config = config or OperatorConfig(peering=PEERING, metrics_port=0, health="")
    memo = kopf.Memo(config=config)
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            standalone=False,
            peering_name=config.peering,
            namespaces=list(config.namespaces),
            clusterwide=config.clusterwide,
            memo=memo,
            stop_flag=stop,
        )
    )
    try:
        yield memo
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
