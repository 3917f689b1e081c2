"""A real API server the operator loses for a few seconds, while its resource's spec changes and its workload is put
back as its manifest has it (a GitOps re-apply, which drops the injection): once the operator reaches the API server
again, the workload gets the injection of the new spec in one rollout.

The workload's watch, back first, started a pass with the resource's body as kopf's watch had last delivered it,
from before the gap: the workload got the old spec's injection first and the new one about a second later, when
kopf's watch delivered the new body (two rollouts of the Deployment instead of one). That read after the gap comes
from an API server's watch cache: one lagging behind, which does not have the resource yet, does not make the operator
forget it."""

from __future__ import annotations

import contextlib
import pathlib
import threading
import time
from typing import Any

import pytest
from clusterkit import (
    ApiProxy,
    api_server,
    apply,
    install,
    start_chart_operator,
    stop,
    telemetry,
    uninstall,
    unique,
    wait_for,
)

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL


class LaggingCacheProxy(ApiProxy):
    """The proxy to the API server, answering a list of the LLMTelemetry resources by name from the watch cache
    (``resourceVersion=0``) while :attr:`lagging` as a cache lagging behind the others would (several API servers,
    each with its own): without the resource, as if it had been made after the cache's version."""

    lagging = False
    lagged = 0

    async def arrived(self, request: Any) -> Any:
        from aiohttp import web

        if (
            self.lagging
            and request.method == "GET"
            and request.path.endswith(f"/{PLURAL}")
            and request.query.get("resourceVersion") == "0"
            and request.query.get("fieldSelector", "").startswith("metadata.name=")
        ):
            self.lagged += 1
            empty = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMTelemetryList", "metadata": {}, "items": []}
            return web.json_response({**empty, "metadata": {"resourceVersion": "1"}})
        return None


def _deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"llm": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }


def _port(deployment: Any) -> str | None:
    """The metrics port injected into the Deployment's pod template, or None without an injection."""
    env = deployment.spec.template.spec.containers[0].env or []
    return next((e.value for e in env if e.name == "LLM_TELEMETRY_METRICS_PORT"), None)


@pytest.mark.parametrize("gap", ["edited", "deleted", "cache lagging"])
def test_a_spec_changed_while_the_api_server_was_away_is_applied_in_one_rollout(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path, gap: str
) -> None:
    """``edited``: the spec changed in the gap is injected in one rollout. ``deleted``: the resource deleted in the
    gap (its finalizer holds it) gets no injection again before its deletion's handler runs (the read after the gap
    found it being deleted, and the pass went on with it: the re-applied Deployment was injected, then undone).
    ``cache lagging``: the resource unchanged, but the watch cache the read after the gap is served from does not
    have it: it is not taken for gone (it was forgotten, and the re-applied Deployment never injected again)."""
    from kubernetes import client, watch

    core, apps_api = client.CoreV1Api(api), client.AppsV1Api(api)
    custom = client.CustomObjectsApi(api)
    system, apps = unique("llmt-gap-system"), unique("llmt-gap")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=apps)))
    server, ca = api_server(kubeconfig)
    name = unique("chat")
    apps_api.create_namespaced_deployment(apps, _deployment(name))
    custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, telemetry(name, name))
    try:
        with LaggingCacheProxy(server, ca) as proxy:
            process, log, _, _ = start_chart_operator(
                api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "600",
                server=f"http://127.0.0.1:{proxy.port}",
            )  # fmt: skip
            try:
                wait_for(lambda: _port(apps_api.read_namespaced_deployment(name, apps)) == "9464", "injected")
                # Settled: the operator's last pass is done (its status written).
                wait_for(
                    lambda: (
                        (
                            (
                                custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name).get("status")
                                or {}
                            ).get("observedGeneration")
                        )
                        == 1
                    ),
                    "the resource's status written",
                )
                time.sleep(2)
                proxy.off()
                cut = time.monotonic()
                time.sleep(2)  # the operator's watches have ended, and their retries fail
                if gap == "edited":
                    custom.patch_namespaced_custom_object(
                        GROUP, VERSION, apps, PLURAL, name, {"spec": {"metrics": {"port": 9500}}}
                    )
                elif gap == "deleted":
                    custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name)
                else:
                    proxy.lagging = True
                apply(api, {**_deployment(name), "metadata": {**_deployment(name)["metadata"], "namespace": apps}})
                replaced = apps_api.read_namespaced_deployment(name, apps)
                assert _port(replaced) is None
                # Every pod template the Deployment is given from now on, in order.
                templates: list[str | None] = []
                watcher = watch.Watch()

                def follow() -> None:
                    with contextlib.suppress(Exception):  # (the stream cut when the test stops it)
                        _follow()

                def _follow() -> None:
                    for event in watcher.stream(
                        apps_api.list_namespaced_deployment,
                        apps,
                        field_selector=f"metadata.name={name}",
                        resource_version=replaced.metadata.resource_version,
                        timeout_seconds=120,
                    ):
                        deployment = event["object"]
                        port = _port(deployment)
                        if not templates or templates[-1] != port:
                            templates.append(port)

                follower = threading.Thread(target=follow, daemon=True)
                follower.start()
                # Back after some 13 s: the workloads' watch, retrying after 1, 2, 4 and 8 s, is back at about 15 s;
                # kopf's watch, retrying after 1, 1, 2, 3, 5 and 8 s, at about 20 s. (With a gap of a few seconds
                # either may come back first.)
                time.sleep(max(0.0, 13.0 - (time.monotonic() - cut)))
                proxy.on()
                if gap != "deleted":
                    want = "9500" if gap == "edited" else "9464"
                    wait_for(lambda: templates and templates[-1] == want, "the spec's injection", timeout=120)
                else:
                    wait_for(
                        lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, apps, PLURAL)["items"],
                        "the deletion handled",
                        timeout=120,
                    )
                time.sleep(5)  # any later change of the pod template would show now
                watcher.stop()
                # (The Deployment controller's status updates carry the same template: only changes are kept.)
                changes = [port for port in templates if port is not None]
                expected = {"edited": ["9500"], "deleted": [], "cache lagging": ["9464"]}[gap]
                assert changes == expected, (templates, log.read_text()[-4000:])
                assert (proxy.lagged > 0) == (gap == "cache lagging")
                if gap == "cache lagging":
                    assert "is gone, though its deletion was never reported" not in log.read_text()
                assert process.poll() is None, log.read_text()[-4000:]
            finally:
                # Its finalizer taken off by the operator (reachable again), so that the namespace can go.
                if not proxy.listening:
                    proxy.on()
                proxy.lagging = False
                _delete_all(custom, apps, (name,))
                stop(process)
    finally:
        uninstall(api, docs, (apps, system))


def test_a_record_of_a_resource_a_lagging_watch_cache_misses_still_holds_its_workload(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A workload whose injection record names an LLMTelemetry that exists, one with an invalid spec (so no peer the
    operator knows), is held by it. Whether it exists was asked of the watch cache alone: one lagging behind, without
    it, had the resource selecting the workload take it over (a rollout of the Deployment, from a holder that is
    there)."""
    import json

    from kubernetes import client

    core, apps_api = client.CoreV1Api(api), client.AppsV1Api(api)
    custom = client.CustomObjectsApi(api)
    system, apps = unique("llmt-lag-system"), unique("llmt-lag")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=apps)))
    server, ca = api_server(kubeconfig)
    name, holder = unique("chat"), unique("broken")
    held = _deployment(name)
    record = {"containers": {}, "owner": holder, "volume": False}
    held["metadata"]["annotations"] = {c.ANNOTATION_INJECTED: json.dumps(record)}
    apps_api.create_namespaced_deployment(apps, held)
    # Valid for the CRD's schema, not for the operator (no peer): its record is checked by a list by name.
    invalid = telemetry(holder, unique("none"), tracing={"endpoint": "http://[oops:4318"})
    custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, invalid)
    custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, telemetry(name, name))
    try:
        with LaggingCacheProxy(server, ca) as proxy:
            proxy.lagging = True
            process, log, _, _ = start_chart_operator(
                api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "600",
                server=f"http://127.0.0.1:{proxy.port}",
            )  # fmt: skip
            try:

                def injected() -> str | None:
                    body = custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name)
                    conditions = (body.get("status") or {}).get("conditions") or []
                    said = [x for x in conditions if x.get("type") == c.CONDITION_INJECTED]
                    return str(said[0].get("message")) if said else None

                message = wait_for(injected, "the resource's Injected condition written")
                assert f"held by {holder}" in message, (message, log.read_text()[-4000:])
                deployment = apps_api.read_namespaced_deployment(name, apps)
                assert _port(deployment) is None
                assert json.loads(deployment.metadata.annotations[c.ANNOTATION_INJECTED])["owner"] == holder
                assert proxy.lagged > 0
                assert process.poll() is None, log.read_text()[-4000:]
            finally:
                proxy.lagging = False
                _delete_all(custom, apps, (name, holder))
                stop(process)
    finally:
        uninstall(api, docs, (apps, system))


def _delete_all(custom: Any, namespace: str, names: tuple[str, ...]) -> None:
    """Delete the LLMTelemetry resources ``names`` (the operator takes their finalizers off) and wait until none is
    left in ``namespace``, so that it can go; a failure here leaves the test's own outcome to stand."""
    with contextlib.suppress(Exception):
        for name in names:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        wait_for(
            lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"], "deleted"
        )
