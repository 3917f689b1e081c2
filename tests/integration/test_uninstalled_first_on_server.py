"""The operator uninstalled before its LLMTelemetry resources, on a real API server, with the real ``helm`` and
``kubectl``: each resource keeps the operator's finalizer with nothing left to take it off, so deleting it, or its
namespace, waits for good (the namespace stays ``Terminating``). docs/install.md ("Uninstalled before its
resources") says what the user sees and the two ways out, which are run here as the page writes them: the finalizer
taken off by hand (the garbage collector then deletes the children; the injection stays in the workload), and the
chart installed again (the new operator finishes the deletion, and the namespace goes)."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shlex
from typing import Any

import pytest
import yaml
from clusterkit import REPO_ROOT, _prometheus_crds, apply, section, sh_blocks, start_chart_operator, stop, wait_for
from test_helm_lifecycle import APP_NAMESPACE, EXAMPLE, RELEASE_NAMESPACE, Shell, _absent, chart_copy, fresh

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

__all__ = ["fresh"]  # the fixture, used by name

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL
#: A second namespace of the user's, whose resource is deleted (not its namespace).
KEPT_NAMESPACE = "llm-kept"
UNINSTALLED_FIRST = "**Uninstalled before its resources**"
#: The operators' peering lifetime here (the chart's peering.lifetimeSeconds, 60 s by default): how long the new
#: operator may stand by for the entry the uninstalled one could not take out.
PEERING_LIFETIME = ("--peering-lifetime-seconds", "20")


def _paragraph() -> str:
    text = section("Upgrading and uninstalling")
    assert UNINSTALLED_FIRST in text, f"docs/install.md no longer has the paragraph {UNINSTALLED_FIRST}"
    return text.split(UNINSTALLED_FIRST, 1)[1].split("\n\n", 1)[0]


def _documented_fix(namespace: str, name: str) -> list[str]:
    """The page's command that takes the finalizer off a resource, for ``name`` in ``namespace``."""
    commands = re.findall(r"`(kubectl -n <namespace> patch llmt <name> [^`]+)`", _paragraph())
    assert len(commands) == 1, commands
    return [{"<namespace>": namespace, "<name>": name}.get(arg, arg) for arg in shlex.split(commands[0])]


def test_the_documented_fix_takes_the_operators_finalizer_off() -> None:
    """Without a cluster: the page names the operator's finalizer, and its command is a merge patch that removes the
    resource's finalizers."""
    paragraph = " ".join(_paragraph().split())
    assert f"`{c.FINALIZER}`" in paragraph
    assert f"finalizers remaining: {c.FINALIZER} in 1 resource instances" in paragraph
    argv = _documented_fix("llm", "chat")
    assert argv[:6] == ["kubectl", "-n", "llm", "patch", "llmt", "chat"], argv
    assert argv[6:8] == ["--type=merge", "-p"], argv
    assert json.loads(argv[8]) == {"metadata": {"finalizers": None}}


def _deployment(name: str) -> dict[str, Any]:
    """What ``kubectl create deployment chat`` makes: the labels the example selects on the workload and its pods."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/chat:1"}]},
            },
        },
    }


def test_resources_left_by_an_uninstall_are_let_go_as_documented(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path, fresh: None
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    run = Shell(kubeconfig, chart_copy(api, tmp_path), tmp_path / "helm")
    example = yaml.safe_load(EXAMPLE.read_text())
    name = example["metadata"]["name"]
    assert example["metadata"]["namespace"] == APP_NAMESPACE
    children = {
        "Service": lambda ns: core.read_namespaced_service(f"{name}-llm-metrics", ns),
        "ConfigMap": lambda ns: core.read_namespaced_config_map(f"{name}-llm-dashboard", ns),
        "ServiceMonitor": lambda ns: custom.get_namespaced_custom_object(
            "monitoring.coreos.com", "v1", ns, "servicemonitors", f"{name}-llm-telemetry"
        ),
        "PrometheusRule": lambda ns: custom.get_namespaced_custom_object(
            "monitoring.coreos.com", "v1", ns, "prometheusrules", f"{name}-llm-telemetry"
        ),
    }

    def resource(namespace: str) -> Any:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def injected(namespace: str) -> bool:
        annotations = apps.read_namespaced_deployment(name, namespace).metadata.annotations or {}
        return c.ANNOTATION_INJECTED in annotations

    def namespace_held() -> str:
        """The namespace controller's word on what holds the app's namespace back ('' while it has none)."""
        conditions = core.read_namespace(APP_NAMESPACE).status.conditions or []
        return next(
            (x.message for x in conditions if x.type == "NamespaceFinalizersRemaining" and x.status == "True"), ""
        )

    # The Prometheus Operator's CRDs, which a cluster with kube-prometheus-stack has: the children are all made.
    for path in sorted(_prometheus_crds().glob("monitoring.coreos.com_*.yaml")):
        apply(api, yaml.safe_load(path.read_text()))
    wait_for(
        lambda: custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", "default", "prometheusrules"),
        "the Prometheus Operator's CRDs served",
    )
    (install,) = sh_blocks("2. Install the chart")[0]
    (uninstall,) = re.findall(r"`(helm uninstall [^`]+)`", section("Upgrading and uninstalling"))
    run(install)
    docs = [
        d
        for d in yaml.safe_load_all(run(["helm", "get", "manifest", "llm-telemetry", "-n", RELEASE_NAMESPACE]).stdout)
        if d
    ]
    for namespace in (APP_NAMESPACE, KEPT_NAMESPACE):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        apps.create_namespaced_deployment(namespace, _deployment(name))
    try:
        run(["kubectl", "apply", "-f", str(EXAMPLE.relative_to(REPO_ROOT))])
        custom.create_namespaced_custom_object(
            GROUP, VERSION, KEPT_NAMESPACE, PLURAL, {**example, "metadata": {"name": name}}
        )
        (tmp_path / "first").mkdir()
        first, log, _, _ = start_chart_operator(
            api, kubeconfig, docs, RELEASE_NAMESPACE, tmp_path / "first", *PEERING_LIFETIME
        )
        try:
            for namespace in (APP_NAMESPACE, KEPT_NAMESPACE):
                wait_for(lambda ns=namespace: injected(ns), f"{namespace}/{name} injected")
                for kind, read in children.items():
                    wait_for(lambda read=read, ns=namespace: read(ns), f"{kind} of {namespace}/{name} made")
            # The uninstall, as a user runs it with the resources still there: the operator's pod stops meanwhile.
            run(shlex.split(uninstall))
        finally:
            stop(first)

        # What the user then sees: each deletion waits on the operator's finalizer.
        custom.delete_namespaced_custom_object(GROUP, VERSION, KEPT_NAMESPACE, PLURAL, name)
        run(["kubectl", "delete", "namespace", APP_NAMESPACE, "--wait=false"])
        message = wait_for(namespace_held, "the namespace controller saying what holds the namespace", timeout=120)
        assert c.FINALIZER in message, message
        assert " ".join(message.split()) in " ".join(_paragraph().split()), message
        assert core.read_namespace(APP_NAMESPACE).status.phase == "Terminating"
        for namespace in (APP_NAMESPACE, KEPT_NAMESPACE):
            held = resource(namespace)["metadata"]
            assert held.get("deletionTimestamp") and c.FINALIZER in held["finalizers"], held

        # By hand: the resource goes, its children are garbage-collected, its injection stays in the workload.
        run(_documented_fix(KEPT_NAMESPACE, name))
        wait_for(lambda: _absent(resource, KEPT_NAMESPACE), "the resource gone once its finalizer is off")
        for kind, read in children.items():
            wait_for(lambda read=read: _absent(read, KEPT_NAMESPACE), f"{kind} garbage-collected", timeout=120)
        assert injected(KEPT_NAMESPACE)

        # The chart installed again: its operator (a new pod, of another name) finishes the namespace's deletion.
        run(install)
        docs = [
            d
            for d in yaml.safe_load_all(
                run(["helm", "get", "manifest", "llm-telemetry", "-n", RELEASE_NAMESPACE]).stdout
            )
            if d
        ]
        renamed = copy.deepcopy(docs)
        next(d for d in renamed if d["kind"] == "Deployment")["metadata"]["name"] += "-again"
        (tmp_path / "again").mkdir()
        again, log, _, _ = start_chart_operator(
            api, kubeconfig, renamed, RELEASE_NAMESPACE, tmp_path / "again", *PEERING_LIFETIME
        )
        try:
            # Up to a lifetime's standby: the stopped operator's entry in the peering object lives on until it expires.
            wait_for(lambda: _absent(core.read_namespace, APP_NAMESPACE), "the namespace gone", timeout=180)
        finally:
            stop(again)
        text = log.read_text(errors="replace")
        assert "Deletion is processed: 1 succeeded" in text, text[-4000:]
    finally:
        try:
            core.delete_namespace(KEPT_NAMESPACE)
        except ApiException as exc:
            if exc.status != 404:
                raise
        for namespace in (APP_NAMESPACE, KEPT_NAMESPACE):
            try:
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        wait_for(lambda: _absent(core.read_namespace, KEPT_NAMESPACE), f"{KEPT_NAMESPACE} deleted", timeout=180)
