"""SIGTERM (what Kubernetes sends on every rollout and scale-down) in the operator's first moments, on a real API
server: the operator run as the chart runs it, as the chart's ServiceAccount, through a proxy that holds one kind of
request so that the signal comes while that request is under way, whatever the machine's speed.

- kopf's first scan of the API groups runs in tasks that its stop does not cancel: a SIGTERM during it made kopf
  close its HTTP session under them, each logged ``Connector is closed`` at ERROR, and the process exited 1 with a
  traceback.
- A SIGTERM during the operator's own startup handler left the tasks it had started running (kopf runs no cleanup
  handler after a startup cut short) until kopf cancelled them after 5 s."""

from __future__ import annotations

import asyncio
import pathlib
import signal
from collections.abc import Callable
from typing import Any

import pytest
from clusterkit import (
    ApiProxy,
    api_server,
    deployment,
    install,
    start_chart_operator,
    telemetry,
    uninstall,
    unique,
    wait_for,
)

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL

#: kopf's DEBUG line when nothing was left running once its root tasks had stopped (else it waits up to 5 s for what
#: is, then cancels it and logs "Hung tasks are stopped").
NOTHING_LEFT = "Hung tasks stopping is skipped: no tasks given."


class HoldingProxy(ApiProxy):
    """The proxy to the API server, holding every request that ``holds`` picks (never answered: the operator stops)."""

    def __init__(self, server: str, ca_data: bytes, holds: Any) -> None:
        super().__init__(server, ca_data)
        self.holds = holds
        self.held = 0
        self._released = asyncio.Event()

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._released.set)
        super().__exit__(*exc)

    async def arrived(self, request: Any) -> None:
        if self.holds(request):
            self.held += 1
            await self._released.wait()
        return None


def _stopped_while_held(
    api: Any,
    kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
    holds: Any,
    prefix: str,
    setup: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """The operator started as the chart runs it (DEBUG on), signalled once the proxy holds a request ``holds``
    picks: its exit code and its output. ``setup``: called with the release's namespace before the operator starts."""
    system = unique(prefix)
    docs = install(api, system)
    server, ca = api_server(kubeconfig)
    try:
        if setup is not None:
            setup(system)
        with HoldingProxy(server, ca, holds) as proxy:
            process, log, _, _ = start_chart_operator(
                api, kubeconfig, docs, system, tmp_path, "--verbose", server=f"http://127.0.0.1:{proxy.port}"
            )
            try:
                wait_for(lambda: proxy.held > 0 or process.poll() is not None, "a request held", interval=0.02)
                assert process.poll() is None, log.read_text(errors="replace")[-4000:]
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return code, log.read_text(errors="replace")
    finally:
        uninstall(api, docs, (system,))


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[ERROR" in line or "Traceback" in line]


def test_sigterm_during_kopfs_first_scan_of_the_api_groups_exits_0(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The signal comes while kopf reads the operator's own API group version (its startup scan, which starts once
    the startup handler is done): exit 0, no ERROR line and no traceback."""

    def scan(request: Any) -> bool:
        return bool(request.method == "GET" and request.path == "/apis/llmtelemetry.dev/v1alpha1")

    code, text = _stopped_while_held(api, kubeconfig, tmp_path, scan, "llmt-stop-scan")
    assert "Activity 'startup' succeeded" in text, text[-4000:]
    assert (code, _errors(text)) == (0, []), text[-6000:]
    assert NOTHING_LEFT in text, text[-4000:]


def test_sigterm_during_the_startup_handler_leaves_nothing_running(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The signal comes while the startup handler waits for the permission check's first answers: the tasks it had
    started are stopped with it, so nothing is left for kopf to wait for; exit 0, no ERROR line."""

    def review(request: Any) -> bool:
        return bool(request.method == "POST" and request.path.endswith("/selfsubjectaccessreviews"))

    code, text = _stopped_while_held(api, kubeconfig, tmp_path, review, "llmt-stop-startup")
    assert "Activity 'startup' succeeded" not in text, text[-4000:]
    assert (code, _errors(text)) == (0, []), text[-6000:]
    assert NOTHING_LEFT in text, text[-4000:]


def test_sigterm_during_a_passs_read_of_a_collector_service_leaves_nothing_running(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The signal comes while a pass reads the Service of the resource's trace collector (a read the passes share,
    which the stop of one of them does not end): the cleanup ends it, so nothing is left for kopf to wait for (it
    waited its 5 s for that read, then cancelled it); exit 0, no ERROR line."""
    from kubernetes import client

    custom, made = client.CustomObjectsApi(api), []

    def setup(namespace: str) -> None:
        client.AppsV1Api(api).create_namespaced_deployment(namespace, deployment("chat", "chat"))
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, telemetry("chat", "chat"))
        made.append(namespace)

    def collector(request: Any) -> bool:
        return bool(request.method == "GET" and request.path.endswith("/services/jaeger"))

    try:
        code, text = _stopped_while_held(api, kubeconfig, tmp_path, collector, "llmt-stop-read", setup)
    finally:
        # No operator runs to release it: its finalizer would keep it (and its namespace) for the next test's.
        for namespace in made:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "chat", {"metadata": {"finalizers": None}}
            )
    assert "Activity 'cleanup' succeeded" in text, text[-4000:]
    assert (code, _errors(text)) == (0, []), text[-6000:]
    assert NOTHING_LEFT in text, text[-4000:]


def test_the_chart_runs_the_command_these_tests_run() -> None:
    """The tests above run ``python -m llm_telemetry_operator`` with the chart's environment: the same program as
    the Deployment's command, the console script."""
    from clusterkit import render_chart

    deployment = next(d for d in render_chart("x") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["llm-telemetry-operator"] and not container.get("args")
    project = (pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '\nllm-telemetry-operator = "llm_telemetry_operator.__main__:main"\n' in project
