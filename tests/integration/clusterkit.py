"""A real Kubernetes API server for the ``k8s`` tests, with the chart's CRDs and RBAC installed (helpers, fixtures).

The cluster is the disposable control plane of ``local-cluster.sh`` (etcd, kube-apiserver with RBAC,
kube-controller-manager with the garbage collector; no kubelet, so pods never run). The script is found through
``$LLM_TELEMETRY_LOCAL_CLUSTER``, else at ``../shared/tools/local-cluster.sh`` beside the checkout; its binaries
in ``$K8S_BIN`` (default ``~/.cache/k8s-bin``). Without them every test here skips, saying why. A cluster that is
already up is used as it is, and one started here is stopped at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pathlib
import re
import shlex
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "llm-telemetry-operator"
RELEASE = "llmt-it"
INSTALL_DOCS = REPO_ROOT / "docs" / "install.md"


def _script() -> pathlib.Path:
    configured = os.environ.get("LLM_TELEMETRY_LOCAL_CLUSTER")
    return pathlib.Path(configured) if configured else REPO_ROOT.parent / "shared" / "tools" / "local-cluster.sh"


def _prometheus_crds() -> pathlib.Path:
    configured = os.environ.get("LLM_TELEMETRY_PROMETHEUS_CRDS")
    return pathlib.Path(configured) if configured else REPO_ROOT.parent / "shared" / "crds"


def _k8s_bin() -> pathlib.Path:
    return pathlib.Path(os.environ.get("K8S_BIN") or pathlib.Path.home() / ".cache" / "k8s-bin")


def _missing() -> str | None:
    """Why the real-cluster tests cannot run here, or None."""
    script = _script()
    if not script.is_file():
        return f"no local-cluster.sh (looked at {script}; set LLM_TELEMETRY_LOCAL_CLUSTER)"
    binaries = _k8s_bin()
    for name in ("kube-apiserver", "kube-controller-manager"):
        if not os.access(binaries / name, os.X_OK):
            return f"no {name} in {binaries} (set K8S_BIN)"
    if shutil.which(os.environ.get("ETCD") or "etcd") is None:
        return "no etcd on PATH (set ETCD)"
    if not any(_prometheus_crds().glob("monitoring.coreos.com_*.yaml")):
        return f"no Prometheus Operator CRDs in {_prometheus_crds()} (set LLM_TELEMETRY_PROMETHEUS_CRDS)"
    return None


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[pathlib.Path]:
    """An admin kubeconfig for the local cluster (client certificate and CA inline, as kind writes them)."""
    reason = _missing()
    if reason:
        pytest.skip(f"real-cluster tests need a local control plane: {reason}")
    script = str(_script())
    running = subprocess.run(["bash", script, "status"], capture_output=True, text=True, timeout=60).returncode == 0
    up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.fail(f"local-cluster.sh up failed:\n{up.stderr[-3000:]}")
    exported = [line for line in up.stdout.splitlines() if line.startswith("export KUBECONFIG=")]
    path = pathlib.Path(exported[-1].split("=", 1)[1]) if exported else _k8s_bin() / "kubeconfig"
    # Another `up` may still be starting the same cluster: its kubeconfig is written last.
    wait_for(lambda: path.is_file() and "server:" in path.read_text(), f"{path} written", timeout=180)
    try:
        yield path
    finally:
        if not running:
            subprocess.run(["bash", script, "down"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def api(kubeconfig: pathlib.Path) -> Any:
    """The official client as the cluster admin: the test's own hands."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


def tool_binary(name: str = "helm") -> str:
    """``helm`` or ``kubectl``: from PATH, else fetched by scripts/get-helm; the test skips without one."""
    found = shutil.which(name)
    if found:
        return found
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "get-helm"), name], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0 or not result.stdout.strip():
        pytest.skip(f"no {name} binary: not on PATH, and scripts/get-helm could not fetch one")
    return result.stdout.strip()


def section(heading: str) -> str:
    """The text of the section ``## heading`` of docs/install.md."""
    text = INSTALL_DOCS.read_text()
    assert f"\n## {heading}\n" in text, f"docs/install.md has no section {heading!r}"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def sh_blocks(heading: str) -> list[list[list[str]]]:
    """The ```sh blocks of a section, each as its commands (argv lists; comments and continuations handled)."""
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", section(heading), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        blocks.append([argv for argv in (shlex.split(line, comments=True) for line in lines) if argv])
    return blocks


def render_chart(namespace: str, release: str = RELEASE, *sets: str) -> list[dict[str, Any]]:
    """``helm template`` of the chart with its CRDs, as a release in ``namespace`` (``sets``: ``--set`` values)."""
    options = [arg for value in sets for arg in ("--set", value)]
    result = subprocess.run(
        [tool_binary(), "template", release, str(CHART), "--namespace", namespace, "--include-crds", *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def apply(api: Any, obj: dict[str, Any], namespace: str | None = None) -> None:
    """Create ``obj``, or replace what is there (kubectl apply, without the last-applied bookkeeping)."""
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException

    resource = dynamic.DynamicClient(api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    ns = (obj["metadata"].get("namespace") or namespace) if resource.namespaced else None
    try:
        resource.create(body=obj, namespace=ns)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = resource.get(name=obj["metadata"]["name"], namespace=ns)
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current.metadata.resourceVersion}}
        resource.replace(body=obj, namespace=ns)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"never happened within {timeout:.0f} s: {what} (last: {last!r})")


def install(api: Any, namespace: str, release: str = RELEASE, *sets: str) -> list[dict[str, Any]]:
    """The chart's CRDs first (and the Prometheus Operator's), then everything else it renders."""
    from kubernetes import client

    docs = render_chart(namespace, release, *sets)
    crds = [doc for doc in docs if doc["kind"] == "CustomResourceDefinition"]
    for path in sorted(_prometheus_crds().glob("monitoring.coreos.com_*.yaml")):
        crds.append(yaml.safe_load(path.read_text()))
    for crd in crds:
        apply(api, crd)
    extensions = client.ApiextensionsV1Api(api)

    def established() -> bool:
        for crd in crds:
            status = extensions.read_custom_resource_definition(crd["metadata"]["name"]).status
            if not any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
                return False
        return True

    wait_for(established, "CRDs established")
    apply(api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for doc in docs:
        if doc["kind"] != "CustomResourceDefinition":
            apply(api, doc, namespace)
    return docs


def api_server(kubeconfig: pathlib.Path) -> tuple[str, bytes]:
    """The API server's address in ``kubeconfig`` (its first cluster) and the CA certificate it is checked with."""
    cluster = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]
    ca = cluster.get("certificate-authority-data")
    return cluster["server"], (
        base64.b64decode(ca) if ca else pathlib.Path(cluster["certificate-authority"]).read_bytes()
    )


_Proxy = TypeVar("_Proxy", bound="ApiProxy")


class ApiProxy:
    """A plain-HTTP reverse proxy to the API server (as ``kubectl proxy`` is, but passing the client's own token on),
    run on an event loop of its own thread. :meth:`off` cuts it off (it listens no more, and every request it was
    forwarding, the watches, ends) and :meth:`on` listens again on the same port; a subclass can hold a request, or
    answer it itself, in :meth:`arrived`."""

    #: Headers of one hop, not passed on (the body passes as it came, compressed or not).
    HOP = frozenset({"host", "content-length", "transfer-encoding", "connection"})

    def __init__(self, server: str, ca_data: bytes) -> None:
        self.server = server.rstrip("/")
        self.ca_data = ca_data
        self.port = 0
        self.listening = False
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._up = threading.Event()
        self._site: Any = None
        self._runner: Any = None
        self._forwarding: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    def __enter__(self: _Proxy) -> _Proxy:
        self._thread.start()
        assert self._up.wait(30), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def arrived(self, request: Any) -> Any:
        """Called for each request before it is forwarded (on the proxy's loop): an answer to send instead of the API
        server's, or None to forward it (here: always)."""
        return None

    def off(self) -> None:
        asyncio.run_coroutine_threadsafe(self._off(), self._loop).result(30)

    def on(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(30)

    async def _off(self) -> None:
        self.listening = False
        await self._site.stop()
        for task in list(self._forwarding):
            task.cancel()
        # Idle keep-alive connections too: a client would send its next request on one, and get through.
        for connection in self._runner.server.connections:
            connection.force_close()

    async def _listen(self) -> None:
        from aiohttp import web

        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.listening = True
        self.port = self._site._server.sockets[0].getsockname()[1]

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        async def forward(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self._forwarding.add(task)
            try:
                own = await self.arrived(request)
                if own is not None:
                    return own
                body = await request.read()
                headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
                async with session.request(
                    request.method, self.server + request.path_qs, headers=headers, data=body or None
                ) as upstream:
                    answer = web.StreamResponse(
                        status=upstream.status,
                        headers={k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP},
                    )
                    with contextlib.suppress(ConnectionError):  # the client closed a watch, or stopped
                        await answer.prepare(request)
                        async for chunk in upstream.content.iter_any():
                            await answer.write(chunk)
                    return answer
            finally:
                self._forwarding.discard(task)

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cadata=self.ca_data.decode()), limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
        ) as session:
            app = web.Application(client_max_size=64 << 20)
            app.router.add_route("*", "/{tail:.*}", forward)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
            await self._runner.setup()
            await self._listen()
            self._up.set()
            await self._stop.wait()
            # The watches it still forwards end now, not when the API server ends them (up to a minute).
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await self._runner.cleanup()


def service_account_kubeconfig(
    api: Any, kubeconfig: pathlib.Path, namespace: str, account: str, out: pathlib.Path
) -> None:
    """A kubeconfig for the chart's ServiceAccount: a TokenRequest token, and the CA inline (base64 *-data)."""
    from kubernetes import client

    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=7200))
    token = client.CoreV1Api(api).create_namespaced_service_account_token(account, namespace, request).status.token
    server, ca = api_server(kubeconfig)
    out.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "operator",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()},
                    }
                ],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": "operator", "context": {"cluster": "local", "user": account}}],
            }
        )
    )


def refused_lines(text: str) -> list[str]:
    """The lines of an operator's log saying the API server refused it a request (403 Forbidden): what the chart's
    RBAC does not cover. Not a refusal of the API server's NamespaceLifecycle admission, also a 403 Forbidden ("unable
    to create new content in namespace ... because it is being terminated"), which a child pass meets in a namespace
    being deleted whatever its permissions: the namespace of another test run beside, say."""
    return [
        line
        for line in text.splitlines()
        if (" 403" in line or "Forbidden" in line) and "because it is being terminated" not in line
    ]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def start_chart_operator(
    api: Any,
    kubeconfig: pathlib.Path,
    docs: list[dict[str, Any]],
    system: str,
    workdir: pathlib.Path,
    *args: str,
    server: str | None = None,
) -> tuple[subprocess.Popen[bytes], pathlib.Path, pathlib.Path, dict[str, str]]:
    """The operator started as the chart's ServiceAccount (release in ``system``, rendered as ``docs``) with the
    environment the chart's Deployment sets, logging to ``workdir``; ``args``: more command-line flags; ``server``:
    a plain-http address the operator reaches the API server through (a proxy) instead of the API server's own.

    Returns the process, its log, its kubeconfig and that environment."""
    import sys

    chart_deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = chart_deployment["spec"]["template"]["spec"]
    # The chart's environment as the kubelet gives it: values, and the pod's name for its one field reference (a
    # user's extraEnv from the container's resources is left out: no kubelet here to say them).
    pod_fields = {"metadata.name": f"{chart_deployment['metadata']['name']}-5f7d9c6b8-x2x8q"}
    env = {
        e["name"]: pod_fields[e["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in e else str(e.get("value", ""))
        for e in pod["containers"][0].get("env") or []
        if "resourceFieldRef" not in e.get("valueFrom", {})
    }
    operator_kubeconfig = workdir / "kubeconfig"
    service_account_kubeconfig(api, kubeconfig, system, pod["serviceAccountName"], operator_kubeconfig)
    if server is not None:
        config = yaml.safe_load(operator_kubeconfig.read_text())
        config["clusters"][0]["cluster"] = {"server": server}
        operator_kubeconfig.write_text(yaml.safe_dump(config))
    log = workdir / "operator.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_telemetry_operator", "--kubeconfig", str(operator_kubeconfig),
             "--log-format", "text", "--metrics-port", "0", "--health", "", *args],
            env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, log, operator_kubeconfig, env


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def let_go(api: Any, namespace: str | None = None) -> None:
    """Take the operator's finalizer off every LLMTelemetry left in ``namespace`` (all namespaces with None), as
    docs/install.md tells a user whose operator is gone. A test that stops its operator before deleting its resources
    leaves them held: their namespace stays Terminating, and the CRD, once deleted by a later test, waits on them for
    good. No CRD (a test removed it): nothing is left."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from llm_telemetry_operator import constants as c

    custom = client.CustomObjectsApi(api)
    try:
        if namespace is None:
            items = custom.list_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL)["items"]
        else:
            items = custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL)["items"]
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    for item in items:
        meta = item["metadata"]
        if meta.get("finalizers"):
            with contextlib.suppress(ApiException):  # gone meanwhile
                custom.patch_namespaced_custom_object(
                    c.GROUP, c.VERSION, meta["namespace"], c.PLURAL, meta["name"], {"metadata": {"finalizers": None}}
                )


def uninstall(api: Any, docs: list[dict[str, Any]], namespaces: tuple[str, ...]) -> None:
    """Remove the namespaces and the release's cluster-wide RBAC; CRDs stay (other releases may use them). An
    LLMTelemetry still in one of them once its test has stopped the operator is let go first (:func:`let_go`)."""
    from kubernetes import client

    for namespace in namespaces:
        let_go(api, namespace)
        client.CoreV1Api(api).delete_namespace(namespace)
    rbac = client.RbacAuthorizationV1Api(api)
    for doc in docs:
        if doc["kind"] == "ClusterRole":
            rbac.delete_cluster_role(doc["metadata"]["name"])
        elif doc["kind"] == "ClusterRoleBinding":
            rbac.delete_cluster_role_binding(doc["metadata"]["name"])


def telemetry(name: str, selects: str, **spec: Any) -> dict[str, Any]:
    """An LLMTelemetry named ``name`` selecting the workloads labelled ``llm=<selects>``; ``spec``: more of its spec."""
    from llm_telemetry_operator import constants as c

    return {
        "apiVersion": f"{c.GROUP}/{c.VERSION}",
        "kind": "LLMTelemetry",
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"llm": selects}}, **spec},
    }


def set_name_limit(api: Any, namespace: str, value: int | None) -> None:
    """Give the installed LLMTelemetry CRD the limit ``value`` on resource names (None: no limit), as an older or a
    newer CRD would, and wait until the API server serves it. No condition says when it does: the wait asks it (a
    server-side dry run in ``namespace``) whether it takes a name of 70 characters."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from llm_telemetry_operator import constants as c

    path = "/spec/versions/0/schema/openAPIV3Schema/properties/metadata/properties/name/maxLength"
    patch = [{"op": "add", "path": path, "value": value}] if value else [{"op": "remove", "path": path}]
    client.ApiextensionsV1Api(api).patch_custom_resource_definition(f"{c.PLURAL}.{c.GROUP}", patch)
    custom = client.CustomObjectsApi(api)

    def admits(name: str) -> bool:
        try:
            custom.create_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, telemetry(name, "nothing-here"), dry_run="All"
            )
        except ApiException as exc:
            if exc.status != 422:
                raise
            return False
        return True

    wait_for(lambda: admits("b" * 70) == (value is None), f"the API server serving the name limit {value}")


def deployment(name: str, selects: str) -> dict[str, Any]:
    """A Deployment named ``name`` labelled ``llm=<selects>`` (stored only: no kubelet runs its pod)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"llm": selects}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "llm": selects}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/chat:1"}]},
            },
        },
    }
