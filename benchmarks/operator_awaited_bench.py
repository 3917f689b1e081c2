"""The operator's threads and memory while many resources wait for collector Services that do not exist, on a real
kube-apiserver (``local-cluster.sh``, found as ``operator_real_bench.py`` finds it).

The chart's CRDs and RBAC are installed and the operator runs as ``python -m llm_telemetry_operator`` with the
chart's ServiceAccount token and environment, talking to the API server itself. It is measured idle first (no
resource), then N LLMTelemetry are created, each in a namespace of its own and each sending its traces to a Service
of its own that does not exist (``http://collector-<i>.<namespace>.svc:4318``; logs off, no workload): the case of a
typo rolled out to every namespace, or a tenant making such resources on purpose. Once every one says
``CollectorNotFound`` and the operator has settled (``--settle`` seconds), its thread count and resident memory are
read from ``/proc/<pid>/status`` every 2 s, five times, and the watches of Services open on the API server from its
``/metrics`` (``apiserver_longrunning_requests``). Each Service waited for is watched by name until the cap
(``config.MAX_AWAITED_WATCHES``) is reached: this shows what the cap holds back. Everything made is deleted at the end.

    python benchmarks/operator_awaited_bench.py          # N=300
    python benchmarks/operator_awaited_bench.py 100
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import operator_real_bench as real
import procs
from llm_telemetry_operator.constants import CONDITION_COLLECTORS

GROUP, VERSION, PLURAL = real.GROUP, real.VERSION, real.PLURAL
#: Samples of the operator's threads and memory at steady state, this many seconds apart.
SAMPLES, SAMPLE_SECONDS = 5, 2.0
#: Seconds between the waits' looks at the resources: each look lists every one of them.
LIST_EVERY = 2.0


def threads_of(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def service_watches(api: Any) -> int:
    """Watches of Services open on the API server now, from every client (its ``/metrics``)."""
    method, url, headers, body, post = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response = api.call_api(method, url, headers, body, post)
    response.read()
    total = 0
    for line in response.data.decode().splitlines():
        if (
            line.startswith("apiserver_longrunning_requests{")
            and 'verb="WATCH"' in line
            and 'resource="services"' in line
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def sample(api: Any, pid: int) -> dict[str, Any]:
    """Threads, resident memory (MiB; and its peak) and open Service watches, SAMPLES times; the largest of each."""
    threads, rss, watches, peak = [], [], [], 0
    for _ in range(SAMPLES):
        threads.append(threads_of(pid))
        now, high = procs.memory_kib(pid)
        rss.append(now / 1024)
        peak = max(peak, high)
        watches.append(service_watches(api))
        time.sleep(SAMPLE_SECONDS)
    return {"threads": max(threads), "rss_mib": max(rss), "peak_mib": peak / 1024, "service_watches": max(watches)}


def telemetry(i: int, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMTelemetry",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"bench": "none"}},
            "tracing": {"endpoint": f"http://collector-{i}.{namespace}.svc:4318"},
            "logs": {"enabled": False},
        },
    }


def _absent_as_none(call: Any, *args: Any) -> Any:
    """``call(*args)``, None where the object is already gone (404)."""
    from kubernetes import client

    try:
        return call(*args)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        return None


def _collector_reason(obj: dict[str, Any]) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == CONDITION_COLLECTORS:
            return str(condition.get("reason"))
    return None


def measure(n: int, settle: float, log: Any = print) -> dict[str, Any]:
    reason = real.missing()
    if reason:
        return {"skipped": reason}
    import clusterkit

    script = str(clusterkit._script())
    running = subprocess.run(["bash", script, "status"], capture_output=True, text=True).returncode == 0
    up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        return {"skipped": f"local-cluster.sh up failed: {up.stderr[-500:]}"}
    exported = [line for line in up.stdout.splitlines() if line.startswith("export KUBECONFIG=")]
    kubeconfig = pathlib.Path(exported[-1].split("=", 1)[1]) if exported else clusterkit._k8s_bin() / "kubeconfig"
    try:
        return _measure(kubeconfig, n, settle, log)
    finally:
        if not running:
            subprocess.run(["bash", script, "down"], capture_output=True, text=True, timeout=120)


def _measure(kubeconfig: pathlib.Path, n: int, settle: float, log: Any) -> dict[str, Any]:
    import clusterkit
    from kubernetes import client, config

    from llm_telemetry_operator.config import MAX_AWAITED_WATCHES

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = 16
    api = client.ApiClient(configuration)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    tag = uuid.uuid4().hex[:6]
    system = f"llmt-awaited-system-{tag}"
    namespaces = [f"llmt-awaited-{tag}-{i}" for i in range(n)]
    docs = clusterkit.install(api, system)
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: str(e["value"]) for e in pod["containers"][0].get("env") or [] if "value" in e}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="llmt-awaited-bench-"))
    sa_kubeconfig = workdir / "kubeconfig"
    clusterkit.service_account_kubeconfig(api, kubeconfig, system, pod["serviceAccountName"], sa_kubeconfig)
    log_path = workdir / "operator.log"
    process = real._start(env, sa_kubeconfig, log_path)
    pool = concurrent.futures.ThreadPoolExecutor(8)
    result: dict[str, Any] = {"n": n, "cap": MAX_AWAITED_WATCHES}
    try:
        real._wait(lambda: "Activity 'startup' succeeded" in log_path.read_text(errors="replace"), 120, "startup")
        time.sleep(settle)
        result["idle"] = sample(api, process.pid)
        log(f"idle: {result['idle']}")

        def make(i: int) -> None:
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespaces[i])))
            custom.create_namespaced_custom_object(GROUP, VERSION, namespaces[i], PLURAL, telemetry(i, namespaces[i]))

        started = time.monotonic()
        list(pool.map(make, range(n)))

        def waiting() -> bool:
            items = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
            found = [o for o in items if o["metadata"]["namespace"].startswith(f"llmt-awaited-{tag}-")]
            return len(found) == n and all(_collector_reason(o) == "CollectorNotFound" for o in found)

        real._wait(waiting, 600, f"all {n} resources CollectorNotFound", every=LIST_EVERY)
        result["all_waiting_s"] = time.monotonic() - started
        time.sleep(settle)
        result["waiting"] = sample(api, process.pid)
        log(f"{n} waiting: {result['waiting']}")
        text = log_path.read_text(errors="replace")
        result["cap_said"] = len(re.findall(r"watched at once", text))
        result["errors"] = len(re.findall(r"\[(ERROR|CRITICAL)", text))

    finally:
        # The resources go while the operator runs (the finalizer is its), then it stops, then the namespaces.
        def unmake(i: int) -> None:
            _absent_as_none(custom.delete_namespaced_custom_object, GROUP, VERSION, namespaces[i], PLURAL, "app")

        list(pool.map(unmake, range(n)))
        real._wait(
            lambda: (
                not [
                    o
                    for o in custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
                    if o["metadata"]["namespace"].startswith(f"llmt-awaited-{tag}-")
                ]
            ),
            600,
            "resources deleted",
            every=LIST_EVERY,
        )
        result["exit"] = real._stop(process)
        list(pool.map(lambda name: _absent_as_none(core.delete_namespace, name), namespaces))
        pool.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)  # the operator's log and a ServiceAccount token
        core.delete_namespace(system)
        rbac = client.RbacAuthorizationV1Api(api)
        for doc in docs:
            if doc["kind"] == "ClusterRole":
                rbac.delete_cluster_role(doc["metadata"]["name"])
            elif doc["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(doc["metadata"]["name"])
    return result


def format_result(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    rows = [
        "| operator | threads | RSS MiB | peak RSS MiB | Service watches on the API server |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in (("idle, no resource", "idle"), (f"{result['n']} resources waiting", "waiting")):
        s = result[key]
        rows.append(f"| {label} | {s['threads']} | {s['rss_mib']:.0f} | {s['peak_mib']:.0f} | {s['service_watches']} |")
    rows.append(
        f"\ncap {result['cap']}; all {result['n']} CollectorNotFound {result['all_waiting_s']:.0f} s after the first"
        f" create; cap WARNING lines {result['cap_said']}, ERROR lines {result['errors']};"
        f" operator exit {result['exit']}"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=300, help="resources, each in a namespace of its own")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds to wait before sampling (default 15)")
    args = parser.parse_args()
    print(format_result(measure(args.n, args.settle, log=lambda m: print(m, file=sys.stderr, flush=True))))
