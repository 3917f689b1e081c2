"""Two LLMTelemetry select one Deployment on a real API server, and the winner's injection lands between the loser's
list of the workloads and its patch, ordered by a proxy that holds the loser's patch until the winner's own pass has
injected the Deployment (no sleeps decide the order).

"second" (created after "first", and after it by name) selects the Deployment and its pass decides to inject it, as
no other resource selects it then; "first" then comes to select it (its selector widened) and injects it in a pass
of its own. second's patch, released, fails its ``test`` of the injection record (422); the version read again carries
first's record, so the pass leaves it to the next one, which leaves the Deployment to first. What a user relies on:
one rollout (first's injection alone), both statuses and second's events say who serves the Deployment, second keeps
no children of its own, and nothing is written again after that."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from typing import Any

import pytest
from clusterkit import (
    ApiProxy,
    api_server,
    deployment,
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


class FirstPatchHeld(ApiProxy):
    """The proxy to the API server, holding the first PATCH of ``path`` until :meth:`release`; it counts every
    PATCH of ``path`` and keeps the answers' status codes."""

    def __init__(self, server: str, ca_data: bytes, path: str) -> None:
        super().__init__(server, ca_data)
        self.path = path
        self.patches: list[str] = []
        self._released = asyncio.Event()

    @property
    def held(self) -> bool:
        return bool(self.patches)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    def __exit__(self, *exc: object) -> None:
        self.release()
        super().__exit__(*exc)

    async def arrived(self, request: Any) -> None:
        if request.method == "PATCH" and request.path == self.path:
            body = await request.read()  # (kept by aiohttp for the forward)
            self.patches.append(body.decode(errors="replace"))
            if len(self.patches) == 1:
                await self._released.wait()
        return None


def _record_owner(dep: dict[str, Any]) -> str | None:
    raw = ((dep.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_INJECTED)
    return None if not raw else str(json.loads(raw).get("owner"))


def _patch_owner(body: str) -> str | None:
    """The owner the injection record of a JSON patch's text names (None: it writes none)."""
    for op in json.loads(body):
        if op.get("op") in ("add", "replace") and op.get("path", "").startswith("/metadata/annotations"):
            value = op.get("value")
            text = value.get(c.ANNOTATION_INJECTED) if isinstance(value, dict) else value
            if isinstance(text, str) and text.startswith("{"):
                return str(json.loads(text).get("owner"))
    return None


def _condition(custom: Any, namespace: str, name: str, type_: str) -> dict[str, Any]:
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return next((x for x in (body.get("status") or {}).get("conditions") or [] if x["type"] == type_), {})


def test_the_winners_pass_injecting_during_the_losers_pass_keeps_the_deployment(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps, core, custom = client.AppsV1Api(api), client.CoreV1Api(api), client.CustomObjectsApi(api)
    system = unique("llmt-loser")
    docs = install(api, system)
    server, ca = api_server(kubeconfig)
    chat_path = f"/apis/apps/v1/namespaces/{system}/deployments/chat"

    def chat() -> dict[str, Any]:
        return dict(api.sanitize_for_serialization(apps.read_namespaced_deployment("chat", system)))

    def events(involved: str, reason: str) -> list[str]:
        found = core.list_namespaced_event(system, field_selector=f"involvedObject.name={involved}").items
        return [e.message for e in found if e.reason == reason]

    try:
        apps.create_namespaced_deployment(system, deployment("chat", "chat"))
        # first is older, or as old and first by name: it wins the Deployment once it selects it.
        custom.create_namespaced_custom_object(GROUP, VERSION, system, PLURAL, telemetry("first", "elsewhere"))
        custom.create_namespaced_custom_object(GROUP, VERSION, system, PLURAL, telemetry("second", "chat"))
        with FirstPatchHeld(server, ca, chat_path) as proxy:
            process, log, _, _ = start_chart_operator(
                api, kubeconfig, docs, system, tmp_path, server=f"http://127.0.0.1:{proxy.port}"
            )
            try:
                wait_for(lambda: proxy.held or process.poll() is not None, "second's patch held", interval=0.05)
                assert process.poll() is None, log.read_text(errors="replace")[-4000:]
                assert _patch_owner(proxy.patches[0]) == "second"
                widened = {"spec": {"selector": {"matchLabels": {"llm": "chat"}}}}
                custom.patch_namespaced_custom_object(GROUP, VERSION, system, PLURAL, "first", widened)
                wait_for(lambda: _record_owner(chat()) == "first", "first's own pass injected the Deployment")
                assert chat()["metadata"]["generation"] == 2
                proxy.release()  # second's patch reaches the API server, after first's

                def second_left_it() -> bool:
                    injected = _condition(custom, system, "second", c.CONDITION_INJECTED)
                    return injected.get("reason") == "Conflict" and "served by first" in injected.get("message", "")

                wait_for(second_left_it, "second says first serves the Deployment")
                wait_for(lambda: events("second", "Conflict"), "a Conflict event on second")
                wait_for(
                    lambda: _condition(custom, system, "first", c.CONDITION_READY).get("status") == "True",
                    "first Ready",
                )
                version, patches = chat()["metadata"]["resourceVersion"], len(proxy.patches)
                time.sleep(6)  # past the follow-up pass a deferral asks for (within 5 s), and its echoes
                dep = chat()
                assert dep["metadata"]["resourceVersion"] == version and len(proxy.patches) == patches
                # Two patches: second's (held, then refused) and first's; one rollout, to first's injection.
                assert len(proxy.patches) == 2, proxy.patches
                assert dep["metadata"]["generation"] == 2
                assert _record_owner(dep) == "first"
                text = log.read_text(errors="replace")
                first = custom.get_namespaced_custom_object(GROUP, VERSION, system, PLURAL, "first")
                second = custom.get_namespaced_custom_object(GROUP, VERSION, system, PLURAL, "second")
                assert first["status"]["targets"] == ["Deployment/chat"]
                assert second["status"]["targets"] == []
                assert _condition(custom, system, "second", c.CONDITION_READY)["reason"] == "Conflict"
                (event,) = events("second", "Conflict")
                assert "LLMTelemetry first, which wins it" in event
                assert events("first", "Conflict") == [] and events("second", "NoTargets") == []
                # Scraped, alerted and charted once: second keeps none of its own (its deferring pass made them).
                monitoring = ("monitoring.coreos.com", "v1")
                for plural in ("servicemonitors", "prometheusrules"):
                    with pytest.raises(ApiException) as gone:
                        custom.get_namespaced_custom_object(*monitoring, system, plural, "second-llm-telemetry")
                    assert gone.value.status == 404
                    custom.get_namespaced_custom_object(*monitoring, system, plural, "first-llm-telemetry")
                with pytest.raises(ApiException) as gone:
                    core.read_namespaced_config_map("second-llm-dashboard", system)
                assert gone.value.status == 404
                service = core.read_namespaced_service("chat-llm-metrics", system)
                assert service.metadata.labels[c.LABEL_OWNER] == "first"
                assert [line for line in text.splitlines() if "[ERROR" in line or "Traceback" in line] == []
            finally:
                stop(process)
    finally:
        uninstall(api, docs, (system,))
