"""Resources made and deleted on a real API server, in namespaces never used again (a namespace per preview
environment, each with its own trace collector): nothing of them stays in the operator's memory. The operator runs
in-process here (kopf's own loop, as the chart's ServiceAccount, with the environment the chart renders for
``--set resyncSeconds=0.5``), so that what it keeps can be read; the real command is the same program
(test_stop_on_server.py checks that the chart runs it)."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
from typing import Any

import kopf
import pytest
from clusterkit import install, service_account_kubeconfig, telemetry, uninstall, unique
from kopf._cogs.structs.references import Insights  # kopf.operator's ``insights``, which kopf does not re-export

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import handlers
from llm_telemetry_operator.__main__ import kopf_options
from llm_telemetry_operator.config import OperatorConfig
from support import operator_records

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL


async def until(check: Any, what: str, timeout: float = 60.0) -> Any:
    """Wait, letting the operator run on this loop, until ``check()`` is truthy; fail naming ``what``."""
    for _ in range(int(timeout / 0.2)):
        result = await asyncio.to_thread(check)  # (the API calls block: off the loop the operator runs on)
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"never happened within {timeout:.0f} s: {what}")


async def test_nothing_is_kept_of_resources_deleted_with_their_namespaces(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    release = unique("llmt-prune")
    docs = install(api, release, release, "resyncSeconds=0.5")
    previews = [unique("llmt-preview") for _ in range(3)]
    try:
        chart = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        env = {e["name"]: str(e.get("value", "")) for e in chart["containers"][0]["env"] if "valueFrom" not in e}
        operator_kubeconfig = tmp_path / "kubeconfig"
        service_account_kubeconfig(api, kubeconfig, release, chart["serviceAccountName"], operator_kubeconfig)
        config = dataclasses.replace(
            OperatorConfig.from_env(env), kubeconfig=str(operator_kubeconfig), metrics_port=0, health=""
        )
        assert config.resync_seconds == 0.5  # what `helm install --set resyncSeconds=0.5` hands the operator
        options = kopf_options(config)
        memo, stop = options["memo"], asyncio.Event()
        operator = asyncio.create_task(kopf.operator(stop_flag=stop, insights=Insights(), **options))
        try:
            state = await until(
                lambda: isinstance(memo.get("state"), handlers.OperatorState) and memo["state"], "a start"
            )
            # A resource that stays, as an operator serving anything has: its passes (every resync) go on reading.
            steady = telemetry("steady", "nothing-here")
            await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION, release, PLURAL, steady)
            uids = []
            for preview in previews:
                await asyncio.to_thread(core.create_namespace, {"metadata": {"name": preview}})
                body = telemetry("chat", "nothing-here", tracing={"endpoint": f"http://otel.{preview}.svc:4318"})
                made = await asyncio.to_thread(
                    custom.create_namespaced_custom_object, GROUP, VERSION, preview, PLURAL, body
                )
                uids.append(made["metadata"]["uid"])

                def served(preview: str = preview) -> bool:
                    found = custom.get_namespaced_custom_object(GROUP, VERSION, preview, PLURAL, "chat")
                    return any(x["type"] == "Ready" for x in (found.get("status") or {}).get("conditions") or [])

                await until(served, f"the resource in {preview} served")
                if preview != previews[-1]:  # (the last one's collector never comes: its lookup says "missing")
                    # Its collector comes (watched for while the resource waits for it): a change the operator sees.
                    otel = {"metadata": {"name": "otel"}, "spec": {"ports": [{"port": 4318}]}}
                    await asyncio.to_thread(core.create_namespaced_service, preview, otel)
                await asyncio.to_thread(custom.delete_namespaced_custom_object, GROUP, VERSION, preview, PLURAL, "chat")

                def gone(preview: str = preview) -> bool:
                    try:
                        custom.get_namespaced_custom_object(GROUP, VERSION, preview, PLURAL, "chat")
                    except ApiException as exc:
                        return exc.status == 404
                    return False

                await until(gone, f"the resource in {preview} deleted (its finalizer taken off)")
                await asyncio.to_thread(core.delete_namespace, preview)

            def kept() -> dict[str, list[Any]]:
                return {
                    where: found
                    for where, keys in operator_records(state).items()
                    if (found := [k for k in keys if any(x in str(k) for x in [*previews, *uids])])
                }

            left: dict[str, list[Any]] = {}
            for _ in range(300):  # the collector lookups last half the resync interval: 0.25 s
                left = kept()
                if not left:
                    break
                await asyncio.sleep(0.2)
            assert left == {}
            assert (release, "steady") in state.bodies and state.index.names(release) == ["steady"]
            await asyncio.to_thread(custom.delete_namespaced_custom_object, GROUP, VERSION, release, PLURAL, "steady")
            await until(lambda: (release, "steady") not in state.bodies, "the steady resource deleted")
        finally:
            stop.set()
            await asyncio.wait_for(operator, timeout=60)
    finally:
        uninstall(api, docs, (release,))
        for preview in previews:
            try:
                await asyncio.to_thread(core.delete_namespace, preview)
            except ApiException as exc:
                if exc.status != 404:
                    raise
