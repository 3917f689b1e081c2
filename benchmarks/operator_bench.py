"""Operator scaling: the real operator process against kmock's Kubernetes emulator over HTTP.

For each N, a fresh emulator (in this process, on the client core) holds our CRD, the Prometheus Operator CRDs
(as the operator tests register them) and N Deployments. The operator runs as ``python -m
llm_telemetry_operator`` on the server core, configured like the Helm chart does (environment variables, a
kubeconfig). Once it watches, N LLMTelemetry resources are created through the API, each selecting its own
Deployment, and we time how long until every one is ``Ready=True`` with its metrics Service and ServiceMonitor
in place, counting the API requests the operator made and its memory.

Then two second passes with nothing changed, both of which should write nothing:
- idle: the operator keeps running for a while;
- restart: a new operator process resumes every resource (kopf's ``on.resume``).
Writes to kopf's own (Cluster)KopfPeering object (its heartbeat) are not counted as the operator's writes, nor are
the SelfSubjectAccessReviews of its startup permission check (POSTs that store nothing); both are in the requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import yaml

import procs

if TYPE_CHECKING:
    import bench_emulator  # imports kmock, which missing() checks for first

#: One resource, a busy namespace, a large one: N=500 takes about 2 minutes on 2 cores (Ready, idle, restart).
FULL_SIZES = [1, 50, 500]
SMOKE_SIZES = [1]
NAMESPACE = "bench"
PEERING = "bench-peering"
#: The operator tests' helpers, for the Prometheus Operator CRDs the emulator registers.
OPERATOR_TESTS = procs.REPO_ROOT / "tests" / "operator"
CRD_PATH = procs.REPO_ROOT / "crds" / "llmtelemetry.dev_llmtelemetries.yaml"
LLMT = "llmtelemetry.dev/v1alpha1/llmtelemetries"
LLMT_PATH = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
DEPLOYMENTS_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
OWNER_LABEL = "llmtelemetry.dev/owner"
CHILDREN = {
    "v1/services": "Service",
    "v1/configmaps": "ConfigMap",
    "monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
    "monitoring.coreos.com/v1/prometheusrules": "PrometheusRule",
}
WRITES = ("POST", "PATCH", "PUT", "DELETE")
#: POSTs that store nothing: the operator's startup permission check asks the API server one
#: SelfSubjectAccessReview per permission (a question, answered and forgotten), so they are no writes.
REVIEWS = "selfsubjectaccessreviews"
#: The bench's own requests carry this User-Agent, so they are not counted as the operator's.
BENCH_AGENT = "llm-telemetry-benchmark"
OPERATOR_CPU = 0
EMULATOR_CPU = 1


def _setup(emu: Any, kmock: Any) -> None:
    r = emu.resources
    verbs = {"list", "watch", "patch", "get", "create", "delete"}
    r["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"})
    r["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create"})
    r["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
    )
    r["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(kind="ClusterKopfPeering", namespaced=False, verbs=verbs)
    r[LLMT] = kmock.ResourceInfo(
        kind="LLMTelemetry", namespaced=True, subresources={"status"}, shortnames={"llmt"}, verbs=verbs
    )
    for resource, kind in (("apps/v1/deployments", "Deployment"), ("apps/v1/statefulsets", "StatefulSet")):
        r[resource] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs)
    for resource, kind in CHILDREN.items():
        r[resource] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs)
    emu.objects["v1/namespaces", None, NAMESPACE] = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE},
    }
    emu.objects["kopf.dev/v1/clusterkopfpeerings", None, PEERING] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": PEERING},
    }
    if str(OPERATOR_TESTS) not in sys.path:
        sys.path.insert(0, str(OPERATOR_TESTS))
    from kopf_testing import load_monitoring_crds

    crds = [yaml.safe_load(CRD_PATH.read_text()), *load_monitoring_crds().values()]
    for crd in crds:
        emu.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = crd


def deployment(i: int) -> dict[str, Any]:
    labels = {"app": f"chat-{i}"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"chat-{i}",
            "namespace": NAMESPACE,
            "labels": labels,
            "uid": f"uid-deploy-{i}",
            "resourceVersion": "1",
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "example/chat:1"}]},
            },
        },
    }


def llmtelemetry(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "llmtelemetry.dev/v1alpha1",
        "kind": "LLMTelemetry",
        "metadata": {
            "name": f"chat-{i}",
            "namespace": NAMESPACE,
            "uid": f"uid-llmt-{i}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {"selector": {"matchLabels": {"app": f"chat-{i}"}}},
    }


def _objects(emu: Any, resource: str) -> list[dict[str, Any]]:
    # Filter on the keys first: building an object's current state in kmock is not free.
    plural = resource.rsplit("/", 1)[1]
    found = []
    for key in list(emu.objects.keys()):
        if key[0].plural == plural:
            obj = emu.objects[key]
            if not obj.deleted:
                found.append(obj.raw)
    return found


def _ready(emu: Any, n: int) -> bool:
    ready = 0
    for obj in _objects(emu, LLMT):
        for cond in (obj.get("status") or {}).get("conditions") or ():
            if cond.get("type") == "Ready" and cond.get("status") == "True":
                ready += 1
    if ready < n:
        return False
    for resource in ("v1/services", "monitoring.coreos.com/v1/servicemonitors"):
        owners = {(o["metadata"].get("labels") or {}).get(OWNER_LABEL) for o in _objects(emu, resource)}
        if len(owners - {None}) < n:
            return False
    return True


def _children(emu: Any) -> int:
    return sum(
        1
        for resource in CHILDREN
        for obj in _objects(emu, resource)
        if (obj["metadata"].get("labels") or {}).get(OWNER_LABEL)
    )


def _log(emu: Any) -> list[bench_emulator.Seen]:
    """Every request the emulator received, in order (see :mod:`bench_emulator` for why not kmock's own log)."""
    seen: list[bench_emulator.Seen] = emu.seen
    return seen


def _operator_requests(emu: Any, since: int) -> list[bench_emulator.Seen]:
    return [req for req in _log(emu)[since:] if req.agent != BENCH_AGENT]


def _count(requests: list[bench_emulator.Seen]) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    others: Counter[str] = Counter()  # reads, watches, the heartbeat and the permission check (in --json only)
    for r in requests:
        write = r.method in WRITES and "kopfpeerings" not in r.path and REVIEWS not in r.path
        (kinds if write else others)[f"{r.method}{' watch' if r.watch else ''} {_resource_of(r.path)}"] += 1
    return {
        "requests": len(requests),
        "writes": kinds.total(),
        "write_kinds": dict(kinds),
        "other_kinds": dict(others),
    }


def _resource_of(path: str) -> str:
    parts = path.strip("/").split("/")
    if "namespaces" in parts:
        i = parts.index("namespaces")
        tail = parts[i + 2 :]
        return "/".join(tail[:1] + tail[2:3])  # plural, plus a subresource such as status
    return parts[-1]


def _start_operator(kubeconfig: pathlib.Path) -> subprocess.Popen[bytes]:
    env = {
        "KUBECONFIG": str(kubeconfig),
        # Cluster-wide (the chart's default): in namespaced mode kopf lists /api/v1/namespaces, a path
        # kmock 0.8 cannot parse.
        "LLM_TELEMETRY_OPERATOR_NAMESPACES": "",
        "LLM_TELEMETRY_OPERATOR_PEERING": PEERING,
        "LLM_TELEMETRY_OPERATOR_METRICS_PORT": "0",
        "LLM_TELEMETRY_OPERATOR_HEALTH": "",
    }
    full_env = {**os.environ, **env}
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_telemetry_operator"],
        env=full_env,
        cwd=str(procs.REPO_ROOT),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: procs.pin(OPERATOR_CPU),
    )
    procs._logs[process.pid] = log
    return process


async def _wait(check: Any, timeout: float, what: str, process: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    while not check():
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def _quiet(emu: Any, seconds: float, timeout: float) -> None:
    """Wait until no request has arrived for ``seconds`` (or ``timeout`` passed)."""
    started = time.monotonic()
    seen, since = len(_log(emu)), time.monotonic()
    while time.monotonic() - started < timeout:
        await asyncio.sleep(0.1)
        now = len(_log(emu))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return


def _watching(emu: Any) -> bool:
    return _watching_since(emu, 0)


async def _measure(n: int, idle: float, log: Any) -> dict[str, Any]:
    import kmock

    import bench_emulator

    result: dict[str, Any] = {"n": n, "killed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        async with bench_emulator.BenchEmulator() as emu, kmock.Server(emu, user_agent=BENCH_AGENT) as server:
            _setup(emu, kmock)
            kubeconfig = pathlib.Path(tmp) / "kubeconfig"
            cluster = {"server": str(server.url).rstrip("/")}
            kubeconfig.write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "current-context": "kmock",
                        "clusters": [{"name": "kmock", "cluster": cluster}],
                        "users": [{"name": "kmock", "user": {"token": "bench-token"}}],
                        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                    }
                )
            )
            for i in range(n):
                async with emu.post(DEPLOYMENTS_PATH, json=deployment(i)) as response:
                    response.raise_for_status()
            operator = _start_operator(kubeconfig)
            try:
                await _wait(lambda: _watching(emu), 60, "the operator to watch LLMTelemetry", operator)
                await _quiet(emu, 0.5, 30)
                mark = len(_log(emu))
                cpu0 = procs.cpu_seconds([operator.pid])
                started = time.monotonic()
                for i in range(n):
                    async with emu.post(LLMT_PATH, json=llmtelemetry(i)) as response:
                        response.raise_for_status()
                result["create_s"] = time.monotonic() - started
                await _wait(lambda: _ready(emu, n), 60 + n * 2, f"{n} LLMTelemetry Ready", operator)
                result["ready_s"] = time.monotonic() - started
                result["cpu_s"] = procs.cpu_seconds([operator.pid]) - cpu0
                first = _count(_operator_requests(emu, mark))
                result["first"] = first
                result["children"] = _children(emu)
                await _quiet(emu, 1.0, 30 + n / 2)  # at N=500 kopf is still patching well after Ready
                settled = _count(_operator_requests(emu, mark))
                result["settled"] = settled
                result["rss_kib"], result["peak_kib"] = procs.memory_kib(operator.pid)
                log(f"operator N={n}: ready in {result['ready_s']:.1f} s; idle pass")
                mark = len(_log(emu))
                await asyncio.sleep(idle)
                result["idle"] = _count(_operator_requests(emu, mark))
            finally:
                result["log_tail"] = await _stop(operator, result)
            log(f"operator N={n}: restart pass")
            mark = len(_log(emu))
            operator = _start_operator(kubeconfig)
            tail = ""
            try:
                started = time.monotonic()
                # A restarted kopf lists every resource and resumes all N objects before (at N=500, well after)
                # it opens the LLMTelemetry watch.
                watching = lambda: _watching_since(emu, mark)  # noqa: E731
                await _wait(watching, 60 + n / 2, "the restarted operator to watch", operator)
                await _quiet(emu, max(1.0, idle / 2), 60 + n)
                result["restart_s"] = time.monotonic() - started
                result["restart"] = _count(_operator_requests(emu, mark))
                result["restart_peak_kib"] = procs.memory_kib(operator.pid)[1]
            except (RuntimeError, TimeoutError) as exc:
                tail = await _stop(operator, result)
                raise type(exc)(f"{exc}; restarted operator's log ends: {tail[-600:]}") from exc
            finally:
                if not tail:
                    await _stop(operator, result)
    return result


def _watching_since(emu: Any, mark: int) -> bool:
    return any("llmtelemetries" in r.path and r.watch for r in _operator_requests(emu, mark))


async def _stop(process: subprocess.Popen[bytes], result: dict[str, Any], timeout: float = 10) -> str:
    """Stop the operator (SIGTERM, then SIGKILL after ``timeout``, counted in ``result["killed"]``) and return the end
    of its log, waiting on the event loop: the emulator answering the operator runs on it, and kopf's last write as
    it stops (its peering object's) must be answered. Waited for in a blocking call, it never was: every stop took
    ``timeout`` seconds and ended in a SIGKILL, and the restart pass followed an operator killed, not stopped."""
    if process.poll() is None:
        process.terminate()
        try:
            await asyncio.get_running_loop().run_in_executor(None, process.wait, timeout)
        except subprocess.TimeoutExpired:
            result["killed"] = result.get("killed", 0) + 1
    return procs.stop(process)[-2000:]


def missing() -> str | None:
    try:
        import kmock  # noqa: F401

        import llm_telemetry_operator.handlers  # noqa: F401
    except ImportError as exc:
        return f"cannot import the operator or kmock: {exc}"
    return None


def run(sizes: list[int], log: Any = print, idle: float | None = None) -> dict[str, Any]:
    """Measure every size in ``sizes``; returns everything measured (see :func:`format_report`)."""
    reason = missing()
    if reason:
        return {"skipped": reason, "results": []}
    procs.pin(EMULATOR_CPU)
    results = []
    for n in sizes:
        log(f"operator: N={n}")
        try:
            results.append(asyncio.run(_measure(n, idle if idle is not None else (3.0 if n > 5 else 1.5), log)))
        except (RuntimeError, TimeoutError) as exc:
            results.append({"n": n, "error": str(exc)})
    return {"results": results}


def format_report(report: dict[str, Any]) -> str:
    lines = ["== Operator against the kmock emulator (fewer requests is better; second passes should write 0) =="]
    if report.get("skipped"):
        lines.append(f"(not run: {report['skipped']})")
        return "\n".join(lines)
    header = (
        f"{'N':>5}{'ready s':>9}{'req':>7}{'req/res':>9}{'writes/res':>11}{'children':>10}{'CPU ms/res':>12}"
        f"{'RSS MiB':>9}{'peak MiB':>10}{'idle writes':>13}{'restart writes':>16}{'restart s':>11}"
    )
    lines += [header, "-" * len(header)]
    notes = []
    for res in report.get("results", []):
        n = res["n"]
        if "error" in res:
            lines.append(f"{n:>5}  failed: {res['error']}")
            if res.get("log_tail"):
                notes.append(f"N={n} operator log tail: {res['log_tail'][-600:]}")
            continue
        settled = res["settled"]
        lines.append(
            f"{n:>5}{res['ready_s']:>9.2f}{settled['requests']:>7}{settled['requests'] / n:>9.1f}"
            f"{settled['writes'] / n:>11.1f}{res['children']:>10}{res['cpu_s'] * 1e3 / n:>12.1f}"
            f"{res['rss_kib'] / 1024:>9.1f}{res['peak_kib'] / 1024:>10.1f}{res['idle']['writes']:>13}"
            f"{res['restart']['writes']:>16}{res['restart_s']:>11.2f}"
        )
        notes.append(f"N={n} writes by kind until settled: {_kinds(settled)}")
        if res.get("killed"):
            notes.append(f"N={n} operator killed: {res['killed']} of its 2 runs did not stop within 10 s of SIGTERM")
        if res["restart"]["writes"] or res["idle"]["writes"]:
            notes.append(f"N={n} second-pass writes: idle {_kinds(res['idle'])}; restart {_kinds(res['restart'])}")
    lines += ["", *notes]
    return "\n".join(lines)


def _kinds(counted: dict[str, Any]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counted["write_kinds"].items())) or "none"
