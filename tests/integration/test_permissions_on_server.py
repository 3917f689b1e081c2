"""A ClusterRole trimmed by hand, against a real API server: the operator, run as the chart's ServiceAccount, names
the permission it lacks in one ERROR line, and a new LLMTelemetry it may not patch (so kopf cannot add its
finalizer and no handler of ours runs for it) says why in its status and in a Warning event instead of staying
silently idle; once the permission is granted again, the resource is served."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from clusterkit import install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL
MISSING = f"patch {PLURAL}.{GROUP} (cluster-wide)"


def _without_patch(rules: list[Any]) -> list[Any]:
    """The rules with ``patch`` taken off the LLMTelemetry resources themselves (their status keeps it)."""
    for rule in rules:
        if PLURAL in (rule.resources or []) and "patch" in rule.verbs:
            assert rule.resources == [PLURAL], rule
            rule.verbs = [verb for verb in rule.verbs if verb != "patch"]
            return rules
    raise AssertionError(f"no rule grants patch on {PLURAL}: {rules}")


def _condition(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond["type"] == c.CONDITION_READY:
            return dict(cond)
    return {}


def test_a_resource_the_operator_may_not_patch_says_why_and_the_log_names_the_permission(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(api)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    system, apps = unique("llmt-rbac-system"), unique("llmt-rbac")
    docs = install(api, system)
    role_names = [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"]
    assert len(role_names) == 1, role_names
    role = rbac.read_cluster_role(role_names[0])
    role.rules = _without_patch(role.rules)
    rbac.replace_cluster_role(role_names[0], role)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=apps)))
    name = unique("chat")
    # A resync interval longer than the test: the resource is told by the handler kopf runs for its watch event,
    # not by the operator's periodic check of its permissions.
    process, log, _, _ = start_chart_operator(
        api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "600", "--verbose"
    )
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, telemetry(name, name))
        ready = wait_for(
            lambda: _condition(custom, apps, name).get("reason") == "Forbidden" and _condition(custom, apps, name),
            "Ready False, reason Forbidden",
        )
        assert ready["status"] == "False"
        assert f"may not patch {PLURAL}.{GROUP}" in ready["message"]
        events = wait_for(
            lambda: [
                e
                for e in core.list_namespaced_event(apps, field_selector=f"involvedObject.name={name}").items
                if e.reason == "Forbidden"
            ],
            "a Forbidden event",
        )
        assert len(events) == 1 and events[0].type == "Warning", events
        assert f"may not patch {PLURAL}.{GROUP}" in events[0].message
        # kopf retries its refused finalizer patch (1, 1, 2, 3 s... then every 30 s, for as long as it is refused):
        # the permission named once at ERROR, the retries not at ERROR (one WARNING, the rest at DEBUG: --verbose).
        fifth = f"[{apps}/{name}] Request attempt #5 failed"
        wait_for(lambda: fifth in log.read_text(), "kopf's fifth attempt", timeout=30)
        text = log.read_text()
        errors = [line for line in text.splitlines() if MISSING in line and "[ERROR" in line]
        assert len(errors) == 1, errors
        assert "no pass runs for it" in errors[0], errors[0]
        refused = [line for line in text.splitlines() if "failed; will retry: PATCH" in line and f"/{PLURAL}/" in line]
        retries = [line for line in refused if f"/{name} ->" in line]
        assert len(retries) >= 5 and not any("[ERROR" in line for line in retries), retries
        # One WARNING for the permission, whichever resource's patch it was: this cluster-wide operator may meet a
        # resource another test left in a namespace of its own (being deleted, its finalizer still on) first.
        assert sum("[WARNING" in line for line in refused) == 1, refused
        assert process.poll() is None, text[-4000:]

        # Granted again: kopf's next retry of its finalizer patch goes through, and a pass serves the resource.
        role = rbac.read_cluster_role(role_names[0])
        role.rules = [
            {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["patch"]},
            *role.rules,
        ]
        rbac.replace_cluster_role(role_names[0], role)
        wait_for(
            lambda: _condition(custom, apps, name).get("reason") not in (None, "Forbidden"),
            "a pass of its own",
            timeout=120,
        )
        body = custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name)
        assert c.FINALIZER in body["metadata"].get("finalizers", [])
        custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name)
        wait_for(lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, apps, PLURAL)["items"], "deleted")
        assert process.poll() is None, log.read_text()[-4000:]
    finally:
        stop(process)
        uninstall(api, docs, (apps, system))
