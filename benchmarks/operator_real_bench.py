"""Operator scaling against a real kube-apiserver (etcd, RBAC, the garbage collector), when one is available.

The control plane is ``local-cluster.sh`` (found like the real-cluster tests find it: ``$LLM_TELEMETRY_LOCAL_CLUSTER``,
else ``../shared/tools/local-cluster.sh`` beside the checkout; see ``tests/integration/clusterkit.py``, whose helpers
this reuses). A cluster already up is used as it is; one started here is stopped at the end.

The chart's CRDs and RBAC are installed, and the operator runs as ``python -m llm_telemetry_operator`` with the
chart's ServiceAccount token and the environment the chart's Deployment sets. Its requests go through a small
counting proxy (plain HTTP in, TLS to the API server, the ServiceAccount's token passed through), so every request
it makes, kopf's included, is counted. For each N, in a fresh namespace: N Deployments (``replicas: 0``, so no
pods), then N LLMTelemetry each selecting one of them, created at once; timed until all are ``Ready=True`` (seen
through a watch, not polling). Then the CPU of kube-apiserver, etcd, the operator and this benchmark process
(the counting proxy, the watch, the creating client) from ``/proc/<pid>/stat`` (utime + stime), and the operator's
requests, per resource; writes while idle and after a restart (both should be zero; writes to the peering object,
kopf's heartbeat, are not counted, nor the SelfSubjectAccessReviews of the operator's startup permission check, which
store nothing); and the time to delete all N.

Each N is measured twice by default (``--modes proxied,direct``): *proxied*, as above, for the request counts;
and *direct*, the operator talking to the API server itself, as it does in a real deployment: the proxy's CPU
(about a tenth of the two cores at N=1,000) no longer competes with the rest, so that run's Ready time is the
figure a user gets. Without the proxy nothing is counted: the direct run reports times and CPU only, and takes
the operator as settled once its log has shown no pass other than a resync for :data:`QUIET` seconds (resyncs
of the first resources start two and a half minutes after their pass, so at N=1,000 the operator is never idle).

To tell work from waiting, each run also reports: when 50/90/99/100% of the resources were Ready (from the start
of the creates) and which were last; the operator's failed passes (its ``retrying in`` log lines) until all were
Ready; the API server's error answers over that time, by status, to every client (from its ``/metrics``: 409s,
429s, requests API priority and fairness rejected); etcd's WAL fsyncs; every 5 s the Ready count and the cores used
by kube-apiserver, etcd and the operator, by the whole machine and stolen by the host (``/proc/stat``); and the
processes that used the most CPU over the window, ours or not. ``OPERATOR_BENCH_KEEP_LOGS=<dir>`` keeps the
operator's log there.

By default the trace and log collector Services the operator's defaults point at (``jaeger`` port 4318
and ``loki-gateway`` port 80 in namespace ``observability``; see ``llm_telemetry_operator.config``) are created
first, headless and without pods, so the operator injects both exporters, as for a user with the documented
collectors. ``--no-collectors`` (``run(..., collectors=False)``) leaves them out: every resource then also gets a
``CollectorNotFound`` Warning event.

After the restart comes the *upgrade* (``--no-upgrade`` leaves it out): the operator is stopped and started again
with its default trace endpoint changed (``LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT``, as ``helm upgrade --set
defaults.tracesEndpoint=http://otel-collector.observability:4318`` sets it; that Service is created first, headless
like the others), so every resource's resume must write: each selected Deployment's injection changes, and its
status names the new endpoint. Reported: the seconds from the new operator's start until every Deployment carries
the new endpoint (read from the Deployments through a watch, not from any status) and every resource is Ready naming
it, and until the operator is quiet; its requests and writes per resource, with the lists of one LLMTelemetry by
name among the reads (a pass reading its resource again before a write while kopf's handler runs, from the watch
cache or consistent); Deployment writes and how much each Deployment's generation grew (each should be written,
and change, exactly once: those written more than once are listed, with the operator's log lines about them); the
operator's failed passes; the API server's 409s and 429s, to every client and to the operator; and the CPU of the
operator (its start included), the API server and etcd.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pathlib
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from typing import Any

import procs

INTEGRATION = procs.REPO_ROOT / "tests" / "integration"
FULL_SIZES = [50, 250, 1000]
#: The goal (issue 16): this many resources, applied at once, all Ready within this many seconds of the first create.
GOAL_N, GOAL_S = 1000, 60.0
GROUP, VERSION, PLURAL = "llmtelemetry.dev", "v1alpha1", "llmtelemetries"
WRITES = ("POST", "PATCH", "PUT", "DELETE")
#: POSTs that store nothing: the operator's startup permission check asks one SelfSubjectAccessReview per permission.
REVIEWS = "selfsubjectaccessreviews"
#: Seconds with no request from the operator after which a restart's resume is taken as finished.
QUIET = 5.0
#: In a direct run (no proxy to count requests), the operator's log lines that mark work other than a resync.
_WORK = re.compile(r"reconciled \((?!resync)|Resuming is processed|Deletion is processed")
MODES = ("proxied", "direct")
#: The Services behind the operator's default trace and log endpoints: namespace, [(name, port)].
COLLECTORS_NAMESPACE = "observability"
COLLECTOR_SERVICES = [("jaeger", 4318), ("loki-gateway", 80)]
#: The upgrade phase: the operator restarted with this setting changed, as ``helm upgrade --set
#: defaults.tracesEndpoint=...`` would (traces moved from Jaeger to an OpenTelemetry Collector Service, created first,
#: headless like the others), which changes every selected Deployment's injection.
UPGRADE_SETTING = "LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT"
UPGRADE_SERVICE = ("otel-collector", 4318)
UPGRADE_ENDPOINT = f"http://{UPGRADE_SERVICE[0]}.{COLLECTORS_NAMESPACE}:{UPGRADE_SERVICE[1]}"
#: The injected variable, and its value in every Deployment once the upgrade reached it.
UPGRADE_VARIABLE, UPGRADE_VALUE = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{UPGRADE_ENDPOINT}/v1/traces"


def missing() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if str(INTEGRATION) not in sys.path:
        sys.path.insert(0, str(INTEGRATION))
    try:
        import aiohttp  # noqa: F401
        import clusterkit
        import kubernetes  # noqa: F401
    except ImportError as exc:
        return f"cannot import what it needs: {exc}"
    reason: str | None = clusterkit._missing()
    return reason


class CountingProxy:
    """Plain HTTP on 127.0.0.1, forwarded over TLS to the API server; counts requests by method and resource."""

    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = ca_file
        self.port = procs.free_port()
        #: (time, method, path, watch, query string)
        self.requests: list[tuple[float, str, str, bool, str]] = []
        #: (time, method, path, status) of each answer of the API server's, when it came
        self.answers: list[tuple[float, str, str, int]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)

        asyncio.set_event_loop(self._loop)
        context = ssl.create_default_context(cafile=self.ca_file)

        async def setup() -> None:
            session = ClientSession(connector=TCPConnector(ssl=context, limit=0), timeout=ClientTimeout(total=None))

            async def handle(request: web.Request) -> web.StreamResponse:
                watch = request.query.get("watch") in ("true", "1")
                self.requests.append((time.monotonic(), request.method, request.path, watch, request.query_string))
                headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
                body = await request.read()
                async with session.request(
                    request.method, self.upstream + request.path_qs, headers=headers, data=body or None
                ) as upstream:
                    self.answers.append((time.monotonic(), request.method, request.path, upstream.status))
                    response = web.StreamResponse(status=upstream.status)
                    for key in ("Content-Type", "Retry-After"):
                        if key in upstream.headers:
                            response.headers[key] = upstream.headers[key]
                    await response.prepare(request)
                    try:
                        async for chunk in upstream.content.iter_any():
                            await response.write(chunk)
                        await response.write_eof()
                    except (ConnectionError, ClientError):
                        pass  # the operator closed a watch (or exited)
                    return response

            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()

        self._loop.run_until_complete(setup())
        self._loop.run_forever()

    def errors(self, start: float, end: float | None = None) -> dict[str, int]:
        """The API server's error answers (4xx, 5xx) to the operator's requests, by status, method and resource."""
        found = Counter(
            f"{status} {method} {_resource_of(path)}"
            for t, method, path, status in list(self.answers)
            if status >= 400 and t >= start and (end is None or t < end)
        )
        return dict(sorted(found.items()))

    def since(self, start: float, end: float | None = None) -> list[tuple[float, str, str, bool, str]]:
        return [r for r in list(self.requests) if r[0] >= start and (end is None or r[0] < end)]


def count(requests: list[tuple[float, str, str, bool, str]]) -> dict[str, Any]:
    """Requests, reads and writes (kopf's peering heartbeat left out of the writes, and the permission check's
    SelfSubjectAccessReviews, which store nothing, out of both reads and writes), each by kind; and the lists of one
    LLMTelemetry by name (``rereads``: from the watch cache, and consistent ones), which is how a pass reads its
    resource again before a write (``handlers._confirm_claim``) or after a watch's gap."""
    own = [r for r in requests if not r[3]]
    reviews = [r for r in own if REVIEWS in r[2]]
    writes = [r for r in own if r[1] in WRITES and "kopfpeerings" not in r[2] and REVIEWS not in r[2]]
    kinds = Counter(f"{m} {_resource_of(p)}" for _, m, p, *_ in writes)
    reads = Counter(f"{m} {_resource_of(p)}" for _, m, p, *_ in own if m not in WRITES)
    rereads: Counter[str] = Counter()
    for _, method, path, _, query in own:
        if method == "GET" and path.endswith("/" + PLURAL) and "metadata.name" in urllib.parse.unquote(query):
            rereads["cache" if "resourceVersion=0" in query else "consistent"] += 1
    return {
        "rereads": dict(rereads),
        "requests": len(own),
        "reads": len(own) - len(writes) - len(reviews),
        "writes": len(writes),
        "write_kinds": dict(kinds),
        "read_kinds": dict(reads),
    }


def _resource_of(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2 :]
        return rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
    return parts[-1] if parts else path


def component_pid(name: str) -> int:
    """A control-plane process's pid (``kube-apiserver``, ``etcd``): from ``local-cluster.sh status``, else by its
    command line in /proc."""
    import clusterkit

    status = subprocess.run(["bash", str(clusterkit._script()), "status"], capture_output=True, text=True)
    found = re.search(rf"^{re.escape(name)} pid (\d+)", status.stdout + status.stderr, re.MULTILINE)
    if found:
        return int(found.group(1))
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if pathlib.Path(os.fsdecode((proc / "cmdline").read_bytes().split(b"\0")[0])).name == name:
                    return int(proc.name)
            except OSError:
                continue
    raise RuntimeError(f"{name} process not found")


def apiserver_pid() -> int:
    """The kube-apiserver's pid."""
    return component_pid("kube-apiserver")


def create_collectors(api: Any, defaults: bool = True, upgrade: bool = False) -> list[str]:
    """Create the collector Services the operator's defaults point at (``defaults``) and the one the upgrade phase
    points the traces at (``upgrade``), those missing; the names of those created.

    Headless (no cluster IP) and without pods: the operator only checks that each Service exists."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=COLLECTORS_NAMESPACE)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    created = []
    for name, port in [*(COLLECTOR_SERVICES if defaults else []), *([UPGRADE_SERVICE] if upgrade else [])]:
        service = client.V1Service(
            metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "llmt-real-bench"}),
            spec=client.V1ServiceSpec(
                cluster_ip="None",
                selector={"app.kubernetes.io/name": name},
                ports=[client.V1ServicePort(name="http", port=port, protocol="TCP")],
            ),
        )
        try:
            core.create_namespaced_service(COLLECTORS_NAMESPACE, service)
            created.append(name)
        except ApiException as exc:
            if exc.status != 409:
                raise
    return created


def collectors_present(api: Any) -> bool:
    """Whether every collector Service of the operator's defaults exists."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api)
    for name, _ in COLLECTOR_SERVICES:
        try:
            core.read_namespaced_service(name, COLLECTORS_NAMESPACE)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
    return True


def stat_cpu(pid: int) -> float:
    """utime + stime of a process from ``/proc/<pid>/stat``, in seconds (threads that have exited included)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def deployment(i: int) -> dict[str, Any]:
    name = f"app-{i}"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"bench": name}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"pod": name}},
            "template": {
                "metadata": {"labels": {"pod": name, "bench": name}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/chat:1"}]},
            },
        },
    }


def llmtelemetry(i: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMTelemetry",
        "metadata": {"name": f"app-{i}"},
        "spec": {"selector": {"matchLabels": {"bench": f"app-{i}"}}},
    }


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class Watcher:
    """A watch on the namespace's LLMTelemetry: which are Ready, which are gone (no polling lists)."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client, watch

        self.ready: set[str] = set()
        #: When each resource was first seen Ready (monotonic seconds).
        self.ready_at: dict[str, float] = {}
        self.seen: set[str] = set()
        self.deleted: set[str] = set()
        #: The newest body of each resource seen.
        self.bodies: dict[str, dict[str, Any]] = {}
        self._watch = watch.Watch()
        custom = client.CustomObjectsApi(api)

        def run() -> None:
            while not self._stopped:
                try:
                    # A list first, then a watch from its version: what was seen before and is no longer listed
                    # was deleted while no watch was open (a watch ends every few minutes).
                    listing = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                    listed = {item["metadata"]["name"] for item in listing["items"]}
                    self.deleted.update(self.seen - listed)
                    self.ready.difference_update(self.seen - listed)
                    for item in listing["items"]:
                        self.seen.add(item["metadata"]["name"])
                        self.bodies[item["metadata"]["name"]] = item
                        if _ready(item):
                            self.ready.add(item["metadata"]["name"])
                            self.ready_at.setdefault(item["metadata"]["name"], time.monotonic())
                    for event in self._watch.stream(
                        custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, timeout_seconds=300,
                        resource_version=listing["metadata"]["resourceVersion"],
                    ):  # fmt: skip
                        name = event["object"]["metadata"]["name"]
                        self.seen.add(name)
                        self.bodies[name] = event["object"]
                        if event["type"] == "DELETED":
                            self.deleted.add(name)
                            self.ready.discard(name)
                        elif _ready(event["object"]):
                            self.ready.add(name)
                            self.ready_at.setdefault(name, time.monotonic())
                except Exception:  # a dropped stream: watch again (the re-list replays what is there)
                    time.sleep(0.5)

        self._stopped = False
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def _injected(deployment: dict[str, Any], variable: str) -> str | None:
    """The value of ``variable`` in the first container of a Deployment (a dict as the API server answers)."""
    containers = ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    for entry in (containers[0].get("env") or []) if containers else []:
        if entry.get("name") == variable:
            return entry.get("value")
    return None


class DeploymentWatcher:
    """A watch on the namespace's Deployments: when each was first seen with ``value`` in its injected ``variable``
    (read from the Deployments themselves, not from any status), and its generation then."""

    def __init__(self, api: Any, namespace: str, variable: str, value: str) -> None:
        from kubernetes import client, watch

        #: name -> (monotonic seconds when first seen with the value, its generation then)
        self.changed: dict[str, tuple[float, int]] = {}
        self._watch = watch.Watch()
        apps = client.AppsV1Api(api)
        self._stopped = False

        def see(item: Any) -> None:
            item = api.sanitize_for_serialization(item)
            name = item["metadata"]["name"]
            if name not in self.changed and _injected(item, variable) == value:
                self.changed[name] = (time.monotonic(), int(item["metadata"].get("generation") or 0))

        def run() -> None:
            while not self._stopped:
                try:
                    listing = apps.list_namespaced_deployment(namespace)
                    for item in listing.items:
                        see(item)
                    for event in self._watch.stream(
                        apps.list_namespaced_deployment, namespace, timeout_seconds=300,
                        resource_version=listing.metadata.resource_version,
                    ):  # fmt: skip
                        if event["type"] != "DELETED":
                            see(event["object"])
                except Exception:  # a dropped stream: watch again
                    time.sleep(0.5)

        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def _wait(check: Any, timeout: float, what: str, every: float = 0.2) -> float:
    """Seconds until ``check()``, looked at every ``every`` seconds; TimeoutError past ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


def _quiet(proxy: CountingProxy | None, since: float, timeout: float, log: pathlib.Path | None = None) -> float:
    """Wait until the operator has made no request for :data:`QUIET` seconds; the time of its last one.

    Without a proxy (a direct run): until its log ``log`` has shown no pass but resyncs for :data:`QUIET` seconds;
    when the last such line was first seen."""
    deadline = time.monotonic() + timeout
    if proxy is None and log is not None:
        seen, changed = -1, since
        while time.monotonic() < deadline:
            work = len(_WORK.findall(log.read_text(errors="replace")))
            if work != seen:
                seen, changed = work, time.monotonic()
            elif time.monotonic() - changed >= QUIET:
                return changed
            time.sleep(0.5)
        raise TimeoutError("the operator never went quiet")
    while time.monotonic() < deadline:
        requests = [r for r in proxy.since(since) if not r[3] and "kopfpeerings" not in r[2]]
        last = requests[-1][0] if requests else since
        if time.monotonic() - last >= QUIET:
            return last
        time.sleep(0.5)
    raise TimeoutError("the operator never went quiet")


def run(
    sizes: list[int],
    log: Any = print,
    idle: float = 20.0,
    collectors: bool = True,
    modes: tuple[str, ...] | list[str] = MODES,
    upgrade: bool = True,
) -> dict[str, Any]:
    """Measure every size in ``sizes`` on the local cluster; ``{"skipped": reason}`` when there is none.

    ``collectors``: create the default collector Services first; ``modes``: ``proxied`` (requests counted),
    ``direct`` (the operator talks to the API server itself), or both, each size in each (see the module's
    docstring); ``upgrade``: after the restart, the upgrade phase (see :func:`_upgrade`)."""
    reason = missing()
    if reason:
        return {"skipped": reason, "results": []}
    import clusterkit

    script = str(clusterkit._script())
    running = subprocess.run(["bash", script, "status"], capture_output=True, text=True).returncode == 0
    up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        return {"skipped": f"local-cluster.sh up failed: {up.stderr[-500:]}", "results": []}
    exported = [line for line in up.stdout.splitlines() if line.startswith("export KUBECONFIG=")]
    kubeconfig = pathlib.Path(exported[-1].split("=", 1)[1]) if exported else clusterkit._k8s_bin() / "kubeconfig"
    try:
        report: dict[str, Any] = {"collectors_requested": collectors}
        report["upgrade"] = upgrade
        report["results"] = _run(kubeconfig, sizes, log, idle, collectors, report, tuple(modes), upgrade)
        return report
    finally:
        if not running:
            subprocess.run(["bash", script, "down"], capture_output=True, text=True, timeout=120)


def _run(
    kubeconfig: pathlib.Path,
    sizes: list[int],
    log: Any,
    idle: float,
    collectors: bool,
    report: dict[str, Any],
    modes: tuple[str, ...] = MODES,
    upgrade: bool = True,
) -> list[dict[str, Any]]:
    import clusterkit
    import yaml
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    api = client.ApiClient(configuration)
    created = create_collectors(api, collectors, upgrade)
    report["collectors"] = collectors_present(api)
    info = client.VersionApi(api).get_code()
    report["server"] = f"{info.git_version} ({info.go_version}, built {info.build_date})"
    log(f"operator (real API server): collector Services {'present' if report['collectors'] else 'absent'}")
    system = f"llmt-bench-system-{uuid.uuid4().hex[:6]}"
    docs = clusterkit.install(api, system)
    chart_deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = chart_deployment["spec"]["template"]["spec"]
    env = {e["name"]: str(e["value"]) for e in pod["containers"][0].get("env") or [] if "value" in e}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="llmt-real-bench-"))
    sa_kubeconfig = workdir / "sa-kubeconfig"
    clusterkit.service_account_kubeconfig(api, kubeconfig, system, pod["serviceAccountName"], sa_kubeconfig)
    sa = yaml.safe_load(sa_kubeconfig.read_text())
    ca_file = workdir / "ca.crt"
    import base64

    ca_file.write_bytes(base64.b64decode(sa["clusters"][0]["cluster"]["certificate-authority-data"]))
    proxy = CountingProxy(sa["clusters"][0]["cluster"]["server"], str(ca_file))
    proxy.start()
    sa["clusters"][0]["cluster"] = {"server": f"http://127.0.0.1:{proxy.port}"}
    proxied_kubeconfig = workdir / "kubeconfig"
    proxied_kubeconfig.write_text(yaml.safe_dump(sa))
    results = []
    try:
        for n in sizes:
            for mode in modes:
                log(f"operator (real API server): N={n}, {mode}")
                direct = mode == "direct"
                try:
                    measured = _measure(
                        api, n, env, sa_kubeconfig if direct else proxied_kubeconfig, None if direct else proxy,
                        workdir, log, idle, upgrade,
                    )  # fmt: skip
                except (RuntimeError, TimeoutError) as exc:
                    measured = {"n": n, "error": str(exc)}
                results.append({**measured, "mode": mode})
    finally:
        proxy.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the operator's logs and a ServiceAccount token
        client.CoreV1Api(api).delete_namespace(system)
        for name in created:
            client.CoreV1Api(api).delete_namespaced_service(name, COLLECTORS_NAMESPACE)
        rbac = client.RbacAuthorizationV1Api(api)
        for doc in docs:
            if doc["kind"] == "ClusterRole":
                rbac.delete_cluster_role(doc["metadata"]["name"])
            elif doc["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(doc["metadata"]["name"])
    return results


def _start(env: dict[str, str], kubeconfig: pathlib.Path, log_path: pathlib.Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "llm_telemetry_operator", "--kubeconfig", str(kubeconfig), "--log-format", "text",
             "--metrics-port", "0", "--health", ""],
            env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return -9


def _measure(
    api: Any,
    n: int,
    env: dict[str, str],
    kubeconfig: pathlib.Path,
    proxy: CountingProxy | None,
    workdir: pathlib.Path,
    log: Any,
    idle: float,
    upgrade: bool = True,
) -> dict[str, Any]:
    from kubernetes import client

    namespace = f"llmt-bench-{n}-{uuid.uuid4().hex[:4]}"
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    pool = concurrent.futures.ThreadPoolExecutor(16)
    list(pool.map(lambda i: apps.create_namespaced_deployment(namespace, deployment(i)), range(n)))
    apiserver, etcd = apiserver_pid(), component_pid("etcd")
    log_path = workdir / f"operator-{n}.log"
    operator = _start({**env, "LLM_TELEMETRY_OPERATOR_NAMESPACES": ""}, kubeconfig, log_path)
    watcher = Watcher(api, namespace)
    result: dict[str, Any] = {"n": n}
    try:
        _wait(lambda: "watching" in log_path.read_text(errors="replace"), 60, "operator started")
        time.sleep(2)  # its first listings and watches
        cpu0, etcd0, op0, own0 = stat_cpu(apiserver), stat_cpu(etcd), stat_cpu(operator.pid), stat_cpu(os.getpid())
        codes0, fsync0, machine0, procs0 = request_codes(api), etcd_fsync(), machine_cpu(), processes_cpu()
        sampler = Sampler(watcher, [apiserver, etcd, operator.pid])
        t0 = time.monotonic()
        list(pool.map(lambda i: custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                       llmtelemetry(i)), range(n)))  # fmt: skip
        result["create_s"] = time.monotonic() - t0
        result["ready_end_s"] = _wait(lambda: len(watcher.ready) >= n, 600, f"all {n} Ready")
        # What a user who applies all N at once sees: from the first create until the last is Ready.
        result["ready_s"] = result["create_s"] + result["ready_end_s"]
        result["timeline"] = timeline(watcher.ready_at, t0, n)
        result["samples"] = sampler.stop()
        result["machine"] = machine_cores(machine0, machine_cpu(), time.monotonic() - t0)
        result["top"] = top_processes(procs0, time.monotonic() - t0)
        fsync = etcd_fsync()
        result["etcd_fsync"] = (round(fsync[0] - fsync0[0], 2), fsync[1] - fsync0[1])
        result["failed_passes"] = failed_passes(log_path.read_text(errors="replace"))
        codes = request_codes(api)
        codes.subtract(codes0)
        result["error_codes"] = {k: v for k, v in sorted(codes.items()) if v and (k[0] in "45" or k == "apf-rejected")}
        t1 = _quiet(proxy, t0, 300, log_path)
        if proxy is not None:
            result["settled"] = count(proxy.since(t0, t1 + 0.001))
        result["apiserver_cpu_s"] = stat_cpu(apiserver) - cpu0
        result["operator_cpu_s"] = stat_cpu(operator.pid) - op0
        result["etcd_cpu_s"] = stat_cpu(etcd) - etcd0
        result["bench_cpu_s"] = stat_cpu(os.getpid()) - own0
        result["settle_s"] = t1 - t0
        result["cpu_window_s"] = time.monotonic() - t0  # the CPU figures above cover this, the quiet wait included
        log(
            f"  Ready {result['ready_s']:.1f} s from the first create ({result['ready_end_s']:.1f} s after the "
            f"{result['create_s']:.1f} s of creates); idle {idle:.0f} s"
        )
        i0 = time.monotonic()
        time.sleep(idle)
        if proxy is not None:
            result["idle"] = count(proxy.since(i0))
        result["exit_code"] = _stop(operator)
        r0 = time.monotonic()
        before = log_path.read_text(errors="replace").count("Resuming is processed")
        operator = _start({**env, "LLM_TELEMETRY_OPERATOR_NAMESPACES": ""}, kubeconfig, log_path)
        # Every resource resumed (kopf logs each), then nothing more for a while.
        _wait(
            lambda: log_path.read_text(errors="replace").count("Resuming is processed") - before >= n,
            600,
            f"all {n} resumed",
        )
        r1 = _quiet(proxy, r0, 600, log_path)
        result["restart_s"] = r1 - r0
        if proxy is not None:
            result["restart"] = count(proxy.since(r0, r1 + 0.001))
        if upgrade:
            log(f"  restart settled in {result['restart_s']:.1f} s; upgrade ({UPGRADE_SETTING}={UPGRADE_ENDPOINT})")
            result["exit_code_restart"] = _stop(operator)
            operator, result["upgrade"] = _upgrade(
                api, n, namespace, env, kubeconfig, proxy, log_path, watcher, [apiserver, etcd]
            )
            u = result["upgrade"]
            log(
                f"  upgraded in {u['ready_s']:.1f} s (settled {u['settle_s']:.1f} s); Deployment generations +1: "
                f"{u['generations'].get(1, 0)}, more: {sum(v for k, v in u['generations'].items() if k > 1)}"
            )
        d0 = time.monotonic()
        list(pool.map(lambda i: custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                       f"app-{i}"), range(n)))  # fmt: skip
        result["delete_s"] = _wait(lambda: len(watcher.deleted) >= n, 600, f"all {n} deleted")
        if proxy is not None:
            result["delete"] = count(proxy.since(d0))
        log(f"  deleted in {result['delete_s']:.1f} s")
    finally:
        code = _stop(operator)
        result.setdefault("exit_code", code)
        result["exit_code_last"] = code
        text = log_path.read_text(errors="replace")
        if os.environ.get("OPERATOR_BENCH_KEEP_LOGS"):  # a directory to keep the operator's log in
            shutil.copy(log_path, pathlib.Path(os.environ["OPERATOR_BENCH_KEEP_LOGS"]) / f"{namespace}.log")
        result["tracebacks"] = text.count("Traceback")
        result["forbidden"] = sum(1 for line in text.splitlines() if " 403" in line or "Forbidden" in line)
        watcher.stop()
        pool.shutdown(wait=False)
        core.delete_namespace(namespace)
    return result


def _upgrade(
    api: Any,
    n: int,
    namespace: str,
    env: dict[str, str],
    kubeconfig: pathlib.Path,
    proxy: CountingProxy | None,
    log_path: pathlib.Path,
    watcher: Watcher,
    pids: list[int],
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """The upgrade phase, the operator stopped: start it again with :data:`UPGRADE_SETTING` changed (every resource's
    resume must now write), and measure until every Deployment carries the new endpoint (read from the Deployments)
    and every resource is Ready with a status naming it; then until the operator is quiet. The operator started, and
    what was measured: seconds, requests (re-reads among them), Deployment writes and generations (each Deployment
    should be written, and change, exactly once), failed passes, the API server's 409s and 429s, CPU."""
    from kubernetes import client

    apps = client.AppsV1Api(api)
    before = {
        d.metadata.name: int(d.metadata.generation or 0) for d in apps.list_namespaced_deployment(namespace).items
    }
    deployments = DeploymentWatcher(api, namespace, UPGRADE_VARIABLE, UPGRADE_VALUE)
    offset = len(log_path.read_bytes())
    codes0, cpu0 = request_codes(api), [stat_cpu(pid) for pid in pids]

    def upgraded() -> bool:
        if len(deployments.changed) < n or len(watcher.ready) < n:
            return False
        for body in list(watcher.bodies.values()):
            conditions = (body.get("status") or {}).get("conditions") or []
            if not any(c.get("type") == "CollectorsAvailable" and UPGRADE_ENDPOINT in str(c.get("message"))
                       for c in conditions):  # fmt: skip
                return False
        return True

    u0 = time.monotonic()
    operator = _start({**env, "LLM_TELEMETRY_OPERATOR_NAMESPACES": "", UPGRADE_SETTING: UPGRADE_ENDPOINT},
                      kubeconfig, log_path)  # fmt: skip
    result: dict[str, Any] = {}
    try:
        try:
            result["ready_s"] = _wait(upgraded, 600, f"all {n} upgraded")
        except TimeoutError:
            _stop(operator)
            raise
        result["timeline"] = timeline({k: t for k, (t, _) in deployments.changed.items()}, u0, n)
        codes = request_codes(api)
        codes.subtract(codes0)
        result["error_codes"] = {k: v for k, v in sorted(codes.items()) if v and (k[0] in "45" or k == "apf-rejected")}
        u1 = _quiet(proxy, u0, 600, log_path)
        result["settle_s"] = u1 - u0
        result["operator_cpu_s"] = stat_cpu(operator.pid)  # a new process: its start included
        result["apiserver_cpu_s"], result["etcd_cpu_s"] = (stat_cpu(p) - c for p, c in zip(pids, cpu0, strict=True))
        after = {
            d.metadata.name: int(d.metadata.generation or 0) for d in apps.list_namespaced_deployment(namespace).items
        }
        grown = {name: after[name] - before.get(name, 0) for name in after}
        result["generations"] = dict(Counter(grown.values()))
        text = log_path.read_bytes()[offset:].decode(errors="replace")
        result["failed_passes"] = failed_passes(text)
        result["passes"] = dict(Counter(re.findall(r"reconciled \((\w+)\)", text)))
        result["withheld"] = len(re.findall(r"pass \(\w+\) stopped", text))
        twice = sorted(name for name, grew in grown.items() if grew > 1)
        if proxy is not None:
            counted = count(proxy.since(u0, u1 + 0.001))
            result.update(counted)
            patched = Counter(p for _, m, p, *_ in proxy.since(u0, u1 + 0.001) if m in WRITES and "/deployments/" in p)
            result["deployment_writes"] = sum(patched.values())
            result["operator_errors"] = proxy.errors(u0, u1 + 0.001)
            twice = sorted(set(twice) | {p.rsplit("/", 1)[1] for p, k in patched.items() if k > 1})
        result["written_twice"] = twice
        # What the log says of the first few written twice: which passes wrote, and why.
        result["twice_log"] = [
            line for name in twice[:3] for line in text.splitlines() if f"{namespace}/{name}:" in line
        ][:40]
        result["unchanged"] = sorted(name for name, grew in grown.items() if grew < 1)[:10]
    finally:
        deployments.stop()
    return operator, result


#: The share of resources Ready at which the timeline reports the time.
TIMELINE = (0.5, 0.9, 0.99, 1.0)
_FAILED = re.compile(r"pass \((\w+)\) failed: (.*); retrying in (\d+) s")


def request_codes(api: Any) -> Counter[str]:
    """The API server's answers so far by status code, from its metrics (``apiserver_request_total``), plus the
    requests API priority and fairness rejected (``apf-rejected``)."""
    method, url, headers, body, post = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response = api.call_api(method, url, headers, body, post)
    response.read()
    text = response.data.decode()
    codes: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            code = re.search(r'code="(\d+)"', line)
            if code:
                codes[code.group(1)] += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("apiserver_flowcontrol_rejected_requests_total{"):
            codes["apf-rejected"] += int(float(line.rsplit(" ", 1)[1]))
    return codes


def etcd_fsync() -> tuple[float, int]:
    """etcd's WAL fsyncs so far: (seconds spent, count), from its metrics (``local-cluster.sh``'s default port)."""
    import urllib.request

    port = os.environ.get("K8S_ETCD_PORT", "2379")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = dict(re.findall(r"^etcd_disk_wal_fsync_duration_seconds_(sum|count) (\S+)$", text, re.MULTILINE))
    return float(total.get("sum", 0)), int(float(total.get("count", 0)))


def machine_cpu() -> dict[str, float]:
    """The machine's CPU seconds so far, from ``/proc/stat``: busy (user, system, interrupts), iowait, steal (a
    virtual machine's CPUs waiting for the host's) and idle."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "busy": (user + nice + system + irq + softirq) / hz,
        "iowait": iowait / hz,
        "steal": steal / hz,
        "idle": idle / hz,
    }


def processes_cpu() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds so far (utime + stime), from ``/proc``."""
    found = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        found[int(stat.parent.name)] = (name, (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK"))
    return found


def top_processes(before: dict[int, tuple[str, float]], seconds: float, count: int = 6) -> list[tuple[str, float]]:
    """The processes that used the most CPU since ``before`` (a :func:`processes_cpu`), in cores on average."""
    used = [(name, cpu - before.get(pid, (name, 0.0))[1]) for pid, (name, cpu) in processes_cpu().items()]
    return [(f"{name}", round(cpu / seconds, 2)) for name, cpu in sorted(used, key=lambda x: -x[1])[:count]]


def machine_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores on average in each state of :func:`machine_cpu` between two readings ``seconds`` apart."""
    return {k: round((after[k] - before[k]) / seconds, 2) for k in before}


class Sampler:
    """Every ``period`` seconds: resources Ready and the cores kube-apiserver, etcd and the operator used."""

    def __init__(self, watcher: Watcher, pids: list[int], period: float = 5.0) -> None:
        self.samples: list[tuple[float, int, float, float, float]] = []
        self._stopped = threading.Event()

        def run() -> None:
            last, t, machine = sum(stat_cpu(p) for p in pids), time.monotonic(), machine_cpu()
            while not self._stopped.wait(period):
                cpu, now, machine_now = sum(stat_cpu(p) for p in pids), time.monotonic(), machine_cpu()
                cores = machine_cores(machine, machine_now, now - t)
                ours = round((cpu - last) / (now - t), 2)
                self.samples.append((round(now - start, 1), len(watcher.ready), ours, cores["busy"], cores["steal"]))
                last, t, machine = cpu, now, machine_now

        start = time.monotonic()
        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> list[tuple[float, int, float, float, float]]:
        self._stopped.set()
        return self.samples


def timeline(ready_at: dict[str, float], t0: float, n: int) -> dict[str, Any]:
    """Seconds from the creates until 50/90/99/100% of the ``n`` resources were Ready, and the last few to be."""
    times = sorted((t - t0, name) for name, t in ready_at.items())
    at = {
        f"{share:.0%}": round(times[max(0, int(share * n) - 1)][0], 1) for share in TIMELINE if len(times) >= share * n
    }
    return {**at, "last": [(name, round(t, 1)) for t, name in times[-5:]]}


def failed_passes(text: str) -> dict[str, Any]:
    """The operator's failed passes in its log: how many, by error (status and reason), and their retry waits."""
    found = _FAILED.findall(text)
    errors = Counter(re.sub(r"[\w.-]+/[\w.-]+", "*", error)[:120] for _, error, _ in found)
    return {"count": len(found), "errors": dict(errors.most_common(5)), "waits": sorted(int(w) for *_, w in found)}


def format_report(report: dict[str, Any]) -> str:
    lines = ["== Operator against a real kube-apiserver (local-cluster.sh; flat per-resource columns are the goal) =="]
    if report.get("skipped"):
        lines.append(f"(not run: {report['skipped']})")
        return "\n".join(lines)
    header = (
        f"{'N':>5}{'mode':>8}{'ready s':>9}{'(end)':>7}{'goal':>9}{'req/res':>9}{'reads/res':>11}{'writes/res':>12}"
        f"{'API CPU ms/res':>16}"
        f"{'op CPU ms/res':>15}{'etcd CPU ms/res':>17}{'bench CPU ms/res':>18}{'idle writes':>13}"
        f"{'restart writes':>16}{'restart s':>11}{'delete s':>10}{'exit':>6}"
    )
    lines += [header, "-" * len(header)]
    legend = (
        "ready s: from the first create until all N were Ready, as a user who applies them at once sees it; (end): "
        f"from the end of the creates; goal: {GOAL_N:,} or more Ready within {GOAL_S:.0f} s of the first create"
    )
    present = report.get("collectors")
    notes = [
        legend,
        "collector Services (jaeger, loki-gateway in observability): "
        + ("unknown" if present is None else "present" if present else "absent (a CollectorNotFound event each)"),
        f"API server: {report.get('server', 'unknown')}",
    ]
    for res in report.get("results", []):
        n, mode = res["n"], res.get("mode", "proxied")
        if "error" in res:
            lines.append(f"{n:>5}{mode:>8}  failed: {res['error']}")
            continue
        nan = float("nan")
        if "settled" in res:
            s = res["settled"]
            counts = f"{s['requests'] / n:>9.1f}{s['reads'] / n:>11.1f}{s['writes'] / n:>12.1f}"
            written = f"{res['idle']['writes']:>13}{res['restart']['writes']:>16}"
        else:  # a direct run: nothing counted
            counts, written = f"{'-':>9}{'-':>11}{'-':>12}", f"{'-':>13}{'-':>16}"
        if n < GOAL_N:
            goal = "-"
        else:
            goal = "met" if res["ready_s"] < GOAL_S else "NOT met"
        lines.append(
            f"{n:>5}{mode:>8}{res['ready_s']:>9.1f}{res.get('ready_end_s', nan):>7.1f}{goal:>9}{counts}"
            f"{res['apiserver_cpu_s'] * 1e3 / n:>16.1f}{res['operator_cpu_s'] * 1e3 / n:>15.1f}"
            f"{res.get('etcd_cpu_s', nan) * 1e3 / n:>17.1f}{res.get('bench_cpu_s', nan) * 1e3 / n:>18.1f}"
            f"{written}{res['restart_s']:>11.1f}{res['delete_s']:>10.1f}{res['exit_code']:>6}"
        )
        if "settled" not in res:
            notes.append(
                f"N={n} {mode}: the operator talked to the API server directly (no counting proxy): times and CPU only"
            )
        if "cpu_window_s" in res:
            cpu = {k: res[f"{k}_cpu_s"] for k in ("apiserver", "etcd", "operator", "bench")}
            notes.append(
                f"N={n} {mode} CPU from create to {res['cpu_window_s']:.1f} s (settled at {res['settle_s']:.1f} s): "
                + ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
                + f"; {sum(cpu.values()) / res['cpu_window_s']:.2f} cores busy on average"
                " (controller-manager not counted)"
            )
        notes.append(f"N={n} {mode}: tracebacks in log {res['tracebacks']}, 403s {res['forbidden']}")
        if "timeline" in res:
            notes.append(
                f"N={n} {mode} Ready timeline (s after the first create; the creates took {res['create_s']:.1f} s): "
                f"{res['timeline']}"
            )
            notes.append(f"N={n} {mode} failed passes until all Ready: {res['failed_passes']}")
            notes.append(
                f"N={n} {mode} every 5 s (s, Ready, cores used by API server+etcd+operator, by the machine, stolen "
                f"by the host): {res['samples']}"
            )
            notes.append(f"N={n} {mode} machine cores on average until all Ready: {res['machine']}")
            notes.append(f"N={n} {mode} processes using the most cores until all Ready: {res['top']}")
            notes.append(f"N={n} {mode} etcd WAL fsyncs until all Ready (s spent, count): {res['etcd_fsync']}")
            notes.append(f"N={n} {mode} API server error answers until all Ready (all clients): {res['error_codes']}")
        if "settled" not in res:
            continue
        notes.append(f"N={n} writes by kind until settled: {_kinds(s)}")
        notes.append(
            f"N={n} restart: {res['restart']['requests']} requests ({_kinds(res['restart'], 'read_kinds')}); "
            f"delete: {res['delete']['requests']} requests ({_kinds(res['delete'])})"
        )
        if res["idle"]["writes"] or res["restart"]["writes"]:
            notes.append(f"N={n} second-pass writes: idle {_kinds(res['idle'])}; restart {_kinds(res['restart'])}")
    lines += ["", *notes]
    upgrades = [res for res in report.get("results", []) if "upgrade" in res]
    if upgrades:
        lines += [
            "",
            f"Upgrade: the operator restarted with {UPGRADE_SETTING}={UPGRADE_ENDPOINT} (every injection changes)",
        ]
        header = (
            f"{'N':>5}{'mode':>8}{'upgraded s':>12}{'settled s':>11}{'req/res':>9}{'reads/res':>11}{'re-reads/res':>14}"
            f"{'writes/res':>12}{'Deployment writes':>19}{'gen +1':>8}{'gen +2..':>10}{'failed':>8}{'409 all':>9}"
            f"{'409 op':>8}{'429':>6}{'op CPU ms/res':>15}{'API CPU ms/res':>16}"
        )
        lines += [header, "-" * len(header)]
        legend = (
            "upgraded s: from the new operator's start until every Deployment carried the new endpoint (read from the"
            " Deployments) and every resource was Ready naming it; settled s: until the operator was quiet; gen +1 /"
            " +2..: Deployments whose generation grew by one / by more (each should by exactly one); 409 all: the API"
            " server's 409 answers to every client (the controller-manager's too), 409 op: to the operator"
        )
        upgrade_notes = [legend]
        for res in upgrades:
            n, mode, u = res["n"], res.get("mode", "proxied"), res["upgrade"]
            if "requests" in u:
                rereads = sum(u["rereads"].values())
                counts = (
                    f"{u['requests'] / n:>9.1f}{u['reads'] / n:>11.1f}{rereads / n:>14.1f}{u['writes'] / n:>12.1f}"
                    f"{u['deployment_writes']:>19}"
                )
            else:
                counts = f"{'-':>9}{'-':>11}{'-':>14}{'-':>12}{'-':>19}"
            gens = u["generations"]
            errors = u["error_codes"]
            op409 = (
                str(sum(v for k, v in u["operator_errors"].items() if k.startswith("409 ")))
                if "operator_errors" in u
                else "-"
            )
            lines.append(
                f"{n:>5}{mode:>8}{u['ready_s']:>12.1f}{u['settle_s']:>11.1f}{counts}{gens.get(1, 0):>8}"
                f"{sum(v for k, v in gens.items() if k > 1):>10}{u['failed_passes']['count']:>8}"
                f"{errors.get('409', 0):>9}{op409:>8}{errors.get('429', 0):>6}{u['operator_cpu_s'] * 1e3 / n:>15.1f}"
                f"{u['apiserver_cpu_s'] * 1e3 / n:>16.1f}"
            )
            unotes = [
                f"N={n} {mode} upgrade: Deployments carrying the new endpoint (s after the start): {u['timeline']}",
                f"N={n} {mode} upgrade: passes logged {u['passes']}, stopped (withheld) {u['withheld']}, failed "
                f"{u['failed_passes']}; API server error answers {errors}; generations grew by {gens}",
            ]
            if "requests" in u:
                unotes.append(
                    f"N={n} {mode} upgrade: re-reads (lists of one LLMTelemetry by name) {u['rereads']}; writes "
                    f"{_kinds(u)}; reads {_kinds(u, 'read_kinds')}; the API server's error answers to the operator "
                    f"{u['operator_errors'] or 'none'}"
                )
            if u["written_twice"]:
                unotes.append(f"N={n} {mode} upgrade: written more than once: {u['written_twice'][:20]}")
                unotes += [f"    {line}" for line in u["twice_log"]]
            if u["unchanged"]:
                unotes.append(f"N={n} {mode} upgrade: generation unchanged: {u['unchanged']}")
            upgrade_notes += unotes
        lines += ["", *upgrade_notes]
    return "\n".join(lines)


def _kinds(counted: dict[str, Any], which: str = "write_kinds") -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counted.get(which, {}).items())) or "none"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="?", help="comma-separated sizes N (default 50,250,1000)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="proxied (requests counted), direct (the operator talks to the API server itself), or both (default)",
    )
    parser.add_argument(
        "--no-collectors",
        action="store_true",
        help="do not create the default collector Services (each resource then gets a CollectorNotFound event)",
    )
    parser.add_argument(
        "--no-upgrade",
        action="store_true",
        help=f"leave out the upgrade phase (the operator restarted with {UPGRADE_SETTING} changed, after the restart)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else FULL_SIZES
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: one or more of {', '.join(MODES)}")
    report = run(
        sizes,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        collectors=not args.no_collectors,
        modes=modes,
        upgrade=not args.no_upgrade,
    )
    print(format_report(report))
