"""A real API server whose SelfSubjectAccessReviews go unanswered (a hung authorization webhook, which the API server
asks for each review): the operator, run as the chart's ServiceAccount through a proxy that holds every review,
still starts, answers its health endpoint and serves a resource, and says that its permission check is pending.

kopf opens the health endpoint (the chart's liveness and readiness probes) only once the startup handler is done;
the startup used to wait for all 45 reviews, two 60 s read timeouts behind a proxy that held them, past the chart's
liveness probe, so each new pod would have been restarted before it watched anything."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import urllib.request
from typing import Any

import pytest
from clusterkit import ApiProxy, api_server, install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL


class HoldingProxy(ApiProxy):
    """The proxy to the API server, answering no SelfSubjectAccessReview until :meth:`release`."""

    def __init__(self, server: str, ca_data: bytes) -> None:
        super().__init__(server, ca_data)
        self.held = 0
        self._released = asyncio.Event()

    def __exit__(self, *exc: object) -> None:
        self.release()
        super().__exit__(*exc)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    async def arrived(self, request: Any) -> None:
        if request.method == "POST" and request.path.endswith("/selfsubjectaccessreviews"):
            self.held += 1
            await self._released.wait()
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bool(answer.status == 200)
    return False


def test_reviews_the_api_server_leaves_unanswered_hold_up_neither_the_startup_nor_a_pass(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    system, apps = unique("llmt-ssar-system"), unique("llmt-ssar")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=apps)))
    server, ca = api_server(kubeconfig)
    name = unique("chat")
    custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, telemetry(name, name))
    health = f"http://127.0.0.1:{_free_port()}/healthz"
    try:
        with HoldingProxy(server, ca) as proxy:
            process, log, _, _ = start_chart_operator(
                api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "600", "--health", health,
                server=f"http://127.0.0.1:{proxy.port}",
            )  # fmt: skip
            try:
                # Every review held all along: the probes answer and a pass serves the resource all the same.
                wait_for(lambda: _healthy(health), "the health endpoint answers")
                wait_for(
                    lambda: (
                        (
                            custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name).get("status") or {}
                        ).get("observedGeneration")
                        == 1
                    ),
                    "the resource's status written by a pass",
                )
                assert proxy.held > 0
                text = log.read_text()
                assert "has not answered this operator's permission check" in text, text[-4000:]
                assert "could not ask the API server which permissions" not in text, text[-4000:]
                proxy.release()
                # Its finalizer comes off while the operator runs, so the namespace can go.
                custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name)
                wait_for(
                    lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, apps, PLURAL)["items"], "deleted"
                )
                assert process.poll() is None, log.read_text()[-4000:]
            finally:
                stop(process)
    finally:
        uninstall(api, docs, (apps, system))
