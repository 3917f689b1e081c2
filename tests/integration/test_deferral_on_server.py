"""A Deployment changed by another client while the operator's patch of it is on its way, on a real API server: the
operator run as the chart runs it, as the chart's ServiceAccount, through a proxy that holds one PATCH of the
Deployment until the test has made its change, so the change always lands between the pass's list and its patch,
whatever the machine's speed.

The patch tests what the pass decided from (the Deployment's labels, generation, ...): the API server refuses it
(422), the pass reads the Deployment again, finds it in another state and leaves it to the pass that follows within
seconds (docs/operator.md, "A label change during a pass"). What a user sees of that:

- relabelled out of the selector: the Deployment is never injected, and the resource ends with no target, said once
  (one NoTargets event, by the pass after the one that deferred it); the operator writes the Deployment no more;
- scaled through its ``/scale`` subresource (as an HPA does): the pass after injects it, once, keeping its replicas;
- injected, relabelled out and back in while the removal is on its way: it keeps its injection and metrics Service."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Callable, Iterator
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
REVISION = "deployment.kubernetes.io/revision"
#: What the Injected condition's message says of a workload a pass left to the next one.
DEFERRED = "Deployment/chat (changed while this pass ran: the next one decides on it)"


class PatchHeld(ApiProxy):
    """The proxy to the API server, holding the PATCH of ``path`` that comes after ``passed`` others until
    :meth:`release`; it keeps every PATCH it forwards of a Deployment of ``namespace`` and of the resource's status,
    each with its body."""

    def __init__(self, server: str, ca_data: bytes, namespace: str, path: str, passed: int = 0) -> None:
        super().__init__(server, ca_data)
        self.path, self.passed = path, passed
        self.deployments = f"/apis/apps/v1/namespaces/{namespace}/deployments/"
        self.statuses = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/chat/status"
        self.held = 0
        #: (path, body) of each PATCH of a Deployment of ``namespace``, in the order they came.
        self.workload_patches: list[tuple[str, bytes]] = []
        #: The body of each PATCH of the resource's status, in the order they came.
        self.status_patches: list[bytes] = []
        self._released = asyncio.Event()

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    def wait_held(self, process: Any, log: pathlib.Path) -> None:
        wait_for(lambda: self.held or process.poll() is not None, "the operator's PATCH of Deployment chat held")
        assert process.poll() is None, log.read_text(errors="replace")[-4000:]

    def __exit__(self, *exc: object) -> None:
        self.release()
        super().__exit__(*exc)

    async def arrived(self, request: Any) -> None:
        if request.method != "PATCH":
            return None
        body = await request.read()  # (kept by aiohttp: forwarded as it came)
        if request.path.startswith(self.deployments):
            self.workload_patches.append((request.path, body))
            if [p for p, _ in self.workload_patches].count(self.path) == self.passed + 1 and request.path == self.path:
                self.held = 1
                await self._released.wait()
        elif request.path == self.statuses:
            self.status_patches.append(body)
        return None


def _synced(apps: Any, namespace: str) -> Any:
    """Deployment ``chat`` once the deployment controller has written it (its revision annotation and status): its
    updates after that change nothing the operator's patch tests, so the only refusal is the one the test makes."""

    def read() -> Any:
        dep = apps.read_namespaced_deployment("chat", namespace)
        synced = dep.status.observed_generation == dep.metadata.generation
        done = synced and REVISION in (dep.metadata.annotations or {})
        return dep if done else None

    return wait_for(read, "the deployment controller's first update of Deployment chat")


def _env(dep: Any) -> dict[str, Any]:
    return {e.name: e.value for e in dep.spec.template.spec.containers[0].env or []}


class Run:
    """What the test reads while the operator runs: the resource, its events, the Deployment, the operator's log."""

    def __init__(self, api: Any, namespace: str, log: pathlib.Path) -> None:
        from kubernetes import client

        self.namespace, self.log = namespace, log
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def owner(self) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, "chat")
        return found

    def injected(self) -> dict[str, Any]:
        conditions = (self.owner().get("status") or {}).get("conditions") or []
        return next((x for x in conditions if x["type"] == c.CONDITION_INJECTED), {})

    def events(self) -> list[tuple[str, str]]:
        """(reason, message) of every event about the resource."""
        found = self.core.list_namespaced_event(self.namespace, field_selector="involvedObject.name=chat")
        return [(e.reason, e.message) for e in found.items if e.involved_object.kind == "LLMTelemetry"]

    def passes(self) -> list[str]:
        """The operator's log lines of its passes of the resource that ended, in order."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if "reconciled (" in line and f"{self.namespace}/chat" in line]

    def deployment(self) -> Any:
        return self.apps.read_namespaced_deployment("chat", self.namespace)


@pytest.fixture
def held(api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[Callable[..., Any]]:
    """Start the operator (as the chart runs it, resyncing every 8 s) through a proxy holding its PATCH of Deployment
    ``chat`` that comes after ``passed`` others (the first by default), a synced Deployment selected by LLMTelemetry
    ``chat``: returns the proxy, the test's view of the run and the process."""
    from kubernetes import client

    system, apps_ns = unique("llmt-defer-system"), unique("llmt-defer")
    docs = install(api, system)
    client.CoreV1Api(api).create_namespace({"metadata": {"name": apps_ns}})
    server, ca = api_server(kubeconfig)
    running: list[Any] = []

    def start(passed: int = 0) -> tuple[PatchHeld, Run, Any]:
        run_apps = client.AppsV1Api(api)
        run_apps.create_namespaced_deployment(apps_ns, deployment("chat", "chat"))
        _synced(run_apps, apps_ns)
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, apps_ns, PLURAL, telemetry("chat", "chat")
        )
        proxy = PatchHeld(server, ca, apps_ns, f"/apis/apps/v1/namespaces/{apps_ns}/deployments/chat", passed)
        running.append(proxy.__enter__())
        process, log, _, _ = start_chart_operator(
            api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "8", server=f"http://127.0.0.1:{proxy.port}"
        )
        running.append(process)
        return proxy, Run(api, apps_ns, log), process

    try:
        yield start
    finally:
        for item in reversed(running):
            if isinstance(item, ApiProxy):
                item.__exit__(None, None, None)
            else:
                stop(item)
        uninstall(api, docs, (apps_ns, system))


def _later_pass(run: Run, process: Any, after: int) -> None:
    """Until a resync (4 to 12 s after the last pass) has ended after the first ``after`` passes of the log. A pass
    that deferred a workload has a retry take the place of the resync, so a resync ending after it comes after the
    pass that decided on the workload (or is that pass): what a later pass would write has been written."""
    wait_for(
        lambda: process.poll() is not None or any("reconciled (resync)" in line for line in run.passes()[after:]),
        "a resync after the pass that decided on the changed Deployment",
        timeout=60,
    )
    assert process.poll() is None, run.log.read_text(errors="replace")[-6000:]


def test_a_deployment_relabelled_out_of_the_selector_while_its_injection_is_on_its_way_is_never_injected(
    held: Callable[..., Any],
) -> None:
    proxy, run, process = held()
    proxy.wait_held(process, run.log)
    relabelled = run.apps.patch_namespaced_deployment("chat", run.namespace, {"metadata": {"labels": {"llm": "other"}}})
    proxy.release()

    def decided() -> dict[str, Any] | None:
        condition = run.injected()
        return condition if condition.get("reason") == "NoTargets" and "deferred" not in condition["message"] else None

    condition = wait_for(decided, "the pass after the deferral finding nothing to inject")
    assert condition["status"] == "False"
    _later_pass(run, process, len(run.passes()))
    # The relabelling's watch event named no resource (not selected, not injected): the pass after the one that
    # deferred was its retry (within 5 s), or one of a watch event queued meanwhile; not a resync (minutes away by
    # default).
    assert "reconciled (resync)" not in run.passes()[1], run.passes()

    dep = run.deployment()
    assert dep.metadata.labels == {"llm": "other"}
    assert dep.metadata.generation == relabelled.metadata.generation  # no rollout: the spec never changed
    assert "LLM_TELEMETRY_METRICS_PORT" not in _env(dep)
    assert c.ANNOTATION_INJECTED not in (dep.metadata.annotations or {})
    owner = run.owner()
    assert (owner["status"]["targets"], owner["status"]["phase"]) == ([], "Pending")
    ready = next(x for x in owner["status"]["conditions"] if x["type"] == c.CONDITION_READY)
    assert (ready["status"], ready["reason"]) == ("False", "NoTargets"), ready  # nothing to serve, nothing failed
    # One PATCH of the Deployment, the one refused: none after it, by the pass that decided nor by the resync.
    assert [path for path, _ in proxy.workload_patches] == [proxy.path], proxy.workload_patches
    # The pass whose PATCH met the relabelling said so in the status it wrote, in the seconds before the next pass.
    assert any(DEFERRED in body.decode() for body in proxy.status_patches), proxy.status_patches
    # One NoTargets event, by the pass that decided with the new labels (none by the pass that deferred), no Warning.
    events = run.events()
    assert [reason for reason, _ in events if reason == "NoTargets"] == ["NoTargets"], events
    assert not [message for _, message in events if "deferred" in message], events
    assert not [reason for reason, _ in events if reason in ("InjectionFailed", "ApiError", "InternalError")], events
    assert process.poll() is None


def test_a_deployment_scaled_while_its_injection_is_on_its_way_is_injected_once_by_the_next_pass(
    held: Callable[..., Any],
) -> None:
    proxy, run, process = held()
    proxy.wait_held(process, run.log)
    before = run.deployment().metadata.generation
    scaled = run.apps.patch_namespaced_deployment_scale("chat", run.namespace, {"spec": {"replicas": 3}})
    assert scaled.spec.replicas == 3
    generation = run.deployment().metadata.generation
    assert generation == before + 1  # a spec change: what the operator's patch tests no longer holds
    proxy.release()

    def decided() -> dict[str, Any] | None:
        condition = run.injected()
        return condition if condition.get("reason") == "Injected" and "deferred" not in condition["message"] else None

    condition = wait_for(decided, "the pass after the deferral injecting Deployment chat")
    assert condition["status"] == "True" and condition["message"].startswith("injected into Deployment/chat")
    _later_pass(run, process, len(run.passes()))

    dep = run.deployment()
    assert dep.spec.replicas == 3  # the injection kept the scaling
    assert dep.metadata.generation == generation + 1  # injected once, after the scaling
    assert _env(dep)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
    assert json.loads(dep.metadata.annotations[c.ANNOTATION_INJECTED])["owner"] == "chat"
    status = run.owner()["status"]
    assert (status["targets"], status["phase"]) == (["Deployment/chat"], "Ready"), status
    # Two PATCHes of the Deployment: the one refused, and the next pass's; none after it.
    assert [path for path, _ in proxy.workload_patches] == [proxy.path] * 2, proxy.workload_patches
    # The pass whose PATCH met the scaling left the Deployment to the next one, and said so.
    assert any(DEFERRED in body.decode() for body in proxy.status_patches), proxy.status_patches
    events = run.events()
    assert not [reason for reason, _ in events if reason in ("NoTargets", "InjectionFailed", "ApiError")], events
    assert process.poll() is None


def test_a_deployment_relabelled_out_and_back_in_while_its_removal_is_on_its_way_keeps_its_injection(
    held: Callable[..., Any],
) -> None:
    """The other direction: a user relabels an injected Deployment out of the selector, and back into it while the
    removal's PATCH of the pass that followed is on its way. The pass leaves the version it reads again as it is: the
    injection stays, with no rollout out and back in, and the metrics Service stays."""
    proxy, run, process = held(passed=1)
    wait_for(lambda: run.injected().get("reason") == "Injected", "Deployment chat injected")
    injected = run.deployment().metadata.generation
    (service,) = run.core.list_namespaced_service(run.namespace, label_selector=f"{c.LABEL_OWNER}=chat").items
    run.apps.patch_namespaced_deployment("chat", run.namespace, {"metadata": {"labels": {"llm": "other"}}})
    proxy.wait_held(process, run.log)
    run.apps.patch_namespaced_deployment("chat", run.namespace, {"metadata": {"labels": {"llm": "chat"}}})
    before = len(run.passes())  # (the pass whose PATCH is held has not ended)
    proxy.release()
    _later_pass(run, process, before)

    dep = run.deployment()
    assert dep.metadata.generation == injected  # no rollout out and back in
    assert _env(dep)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
    status = run.owner()["status"]
    assert (status["targets"], status["phase"]) == (["Deployment/chat"], "Ready"), status
    assert [path for path, _ in proxy.workload_patches] == [proxy.path] * 2, proxy.workload_patches
    assert any(DEFERRED in body.decode() for body in proxy.status_patches), proxy.status_patches
    condition = run.injected()
    assert (condition["reason"], condition["message"]) == ("Injected", "injected into Deployment/chat"), condition
    (kept,) = run.core.list_namespaced_service(run.namespace, label_selector=f"{c.LABEL_OWNER}=chat").items
    assert kept.metadata.uid == service.metadata.uid  # its metrics Service stayed
    assert not [reason for reason, _ in run.events() if reason in ("NoTargets", "InjectionFailed", "ApiError")]
    assert process.poll() is None
