"""A resource stored under a CRD that allowed it, then a stricter CRD applied before the operator saw it (the upgrade
order docs/install.md warns against), on a real API server: without validation ratcheting the server refuses every
update of it, so kopf cannot add its finalizer (kopf says so at DEBUG only) and no handler runs. The operator says
why, once: an ERROR line and a Warning event UpdateRefused with the server's refusal. Before, such a resource showed
nothing at all: no status, no event, no log line."""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any

import pytest
from clusterkit import install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r

pytestmark = pytest.mark.k8s

CRD_NAME = f"{c.PLURAL}.{c.GROUP}"
NAME_LIMIT = "/spec/versions/0/schema/openAPIV3Schema/properties/metadata/properties/name/maxLength"


def test_a_resource_the_crd_now_refuses_every_update_of_is_told_so(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    extensions = client.ApiextensionsV1Api(api)
    system, namespace = unique("llmt-refused-system"), unique("llmt-refused")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))

    def admits(name: str) -> bool:
        """Whether the API server, as it serves the CRD now, takes a resource of that name (a server-side dry run)."""
        try:
            custom.create_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, telemetry(name, "nothing-here"), dry_run="All"
            )
        except ApiException as exc:
            if exc.status != 422:
                raise
            return False
        return True

    def set_limit(value: int | None) -> None:
        patch = [{"op": "add", "path": NAME_LIMIT, "value": value}] if value else [{"op": "remove", "path": NAME_LIMIT}]
        extensions.patch_custom_resource_definition(CRD_NAME, patch)
        wait_for(lambda: admits("b" * 70) == (value is None), f"the API server serving the name limit {value}")

    def events() -> list[str]:
        found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={long_name}")
        return [e.message for e in found.items if e.reason == "UpdateRefused"]

    long_name = "a" * 70
    process = None
    set_limit(None)
    try:
        custom.create_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, telemetry(long_name, "nothing-here")
        )
        set_limit(r.MAX_OWNER_NAME)
        process, log, _kubeconfig, _env = start_chart_operator(api, kubeconfig, docs, system, tmp_path)
        [event] = wait_for(events, "an UpdateRefused event", timeout=60)
        assert "kopf's finalizer cannot be added" in event and "metadata.name" in event and "63" in event, event
        assert f"{namespace}/{long_name}: the API server refuses every update" in log.read_text(errors="replace")
        stored = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, long_name)
        assert not stored["metadata"].get("finalizers") and not stored.get("status"), stored
        assert process.poll() is None
    finally:
        # Without the finalizer it goes at once, whatever the CRD.
        with contextlib.suppress(ApiException):
            custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, long_name)
        set_limit(r.MAX_OWNER_NAME)
        if process is not None:
            stop(process)
        uninstall(api, docs, (namespace, system))
