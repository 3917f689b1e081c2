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
import ssl
import threading
import urllib.request
from typing import Any

import pytest
from clusterkit import api_server, install, start_chart_operator, stop, telemetry, uninstall, unique, wait_for

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL


class HoldingProxy:
    """A plain-HTTP reverse proxy to the API server (as ``kubectl proxy`` is, but passing the client's own token on)
    that answers no SelfSubjectAccessReview until :meth:`release`; run on an event loop of its own thread."""

    def __init__(self, server: str, ca_data: bytes) -> None:
        self.server = server.rstrip("/")
        self.ca_data = ca_data
        self.held = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._released = asyncio.Event()
        self._stop = asyncio.Event()
        self._up = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    def __enter__(self) -> HoldingProxy:
        self._thread.start()
        assert self._up.wait(30), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        context = ssl.create_default_context(cadata=self.ca_data.decode())
        hop = {"host", "content-length", "transfer-encoding", "content-encoding", "connection"}

        async def forward(request: web.Request) -> web.StreamResponse:
            if request.method == "POST" and request.path.endswith("/selfsubjectaccessreviews"):
                self.held += 1
                await self._released.wait()
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
            async with session.request(
                request.method, self.server + request.path_qs, headers=headers, data=body or None
            ) as upstream:
                answer = web.StreamResponse(
                    status=upstream.status, headers={k: v for k, v in upstream.headers.items() if k.lower() not in hop}
                )
                with contextlib.suppress(ConnectionError):  # the operator closed a watch, or stopped
                    await answer.prepare(request)
                    async for chunk in upstream.content.iter_any():
                        await answer.write(chunk)
                return answer

        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=0), timeout=timeout, auto_decompress=False
        ) as session:
            app = web.Application(client_max_size=64 << 20)
            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._up.set()
            await self._stop.wait()
            # The watches it still forwards end now, not when the API server ends them (up to a minute).
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await runner.cleanup()


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
