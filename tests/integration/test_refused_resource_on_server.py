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
from clusterkit import install, set_name_limit, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import resources as r

pytestmark = pytest.mark.k8s


def test_a_resource_the_crd_now_refuses_every_update_of_is_told_so(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    system, namespace = unique("llmt-refused-system"), unique("llmt-refused")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))

    def set_limit(value: int | None) -> None:
        set_name_limit(api, namespace, value)

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
