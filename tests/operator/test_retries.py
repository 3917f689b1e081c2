"""Faults the API server throws at the operator: throttling and server errors retried by its client, failed passes
retried by the operator until they succeed (writing nothing while nothing changes), resyncs spread over their
interval, and deletes that read only the resource's own workloads. Against the kmock emulator over HTTP."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    SERVICES,
    cache_lagging,
    condition,
    consistent_reads,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    posted_events,
    ready,
    running_operator,
    writes,
)
from test_operator_kmock import env_of, hand

from llm_telemetry_operator import constants as c
from llm_telemetry_operator import kube
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ApiError
from llm_telemetry_operator.kube import KubeClient, Retry, server_configuration

STATUS_429 = {"kind": "Status", "status": "Failure", "reason": "TooManyRequests", "message": "slow down", "code": 429}
STATUS_500 = {"kind": "Status", "status": "Failure", "reason": "InternalError", "message": "etcd timeout", "code": 500}
LLMT_PATH = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
CRDS_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def owner_lists(emulator: Any, plural: str) -> list[Any]:
    """The operator's own list requests of ``plural`` (kopf's watches and listings, and the metadata-only lists its
    own watches start from, excluded)."""
    return [
        req
        for req in list(emulator)
        if req.method.value == "GET"
        and req.resource is not None
        and req.resource.plural == plural
        and req.name is None
        and "watch" not in req.params
        and "kopf" not in req.headers.get("User-Agent", "").lower()
        and "PartialObjectMetadataList" not in req.headers.get("Accept", "")
    ]


async def test_throttled_write_is_sent_again_after_retry_after(emulator: Any) -> None:
    """A PATCH (which urllib3 never retries on its own) answered 429 twice: sent again once Retry-After has
    passed each time, and applied."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    sent: list[float] = []
    throttle = emulator["patch apps/v1/deployments"][:2] << 429 << emulator.headers("Retry-After: 1") << STATUS_429
    throttle >> (lambda _: sent.append(time.monotonic()))
    client = KubeClient(server_configuration(str(emulator.url)))
    try:
        await client.patch(kube.DEPLOYMENTS, NAMESPACE, "chat", {"metadata": {"labels": {"tier": "gold"}}})
        sent.append(time.monotonic())  # the third attempt has been answered
    finally:
        await client.close()
    assert get(emulator, DEPLOYMENTS, "chat")["metadata"]["labels"]["tier"] == "gold"
    assert client.retried == {429: 2}
    assert len(sent) == 3
    # Each retry waited for what the server asked (the computed backoff would wait 0.25-0.5 s before the first).
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(sent)), sent


async def test_server_error_is_retried_then_reported(emulator: Any) -> None:
    """500 twice, then the real answer; and a server that keeps failing ends in the error after the attempts."""
    emulator.objects[SERVICES, NAMESPACE, "web"] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}
    emulator["fetch v1/services"][:2] << 500 << STATUS_500
    client = KubeClient(server_configuration(str(emulator.url)), retry=Retry(attempts=3, base=0.01))
    try:
        assert (await client.get(kube.SERVICES, NAMESPACE, "web"))["metadata"]["name"] == "web"
        assert client.retried == {500: 2}
        emulator["list v1/configmaps"] << 503 << STATUS_500
        with pytest.raises(ApiError) as failed:
            await client.list(kube.CONFIGMAPS, NAMESPACE)
        assert failed.value.status == 503
        assert client.retried == {500: 2, 503: 2}
    finally:
        await client.close()


async def test_failed_pass_is_retried_until_it_succeeds_without_writes_meanwhile(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Creating the metrics Service fails (500) for a while: the resource says so once (status and one event),
    the operator retries the pass with backoff (no kopf retry patches, no repeated events or status writes), and
    once the server accepts the Service the resource becomes Ready."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    # Three passes' worth of failures: each pass's list of its Services is tried twice by the client.
    failing = 6
    emulator[f"get /api/v1/namespaces/{NAMESPACE}/services"][:failing] << 500 << STATUS_500
    client = KubeClient(retry=Retry(attempts=2, base=0.01))
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=2)
    async with running_operator(config, client=client):
        # A resource with a status already (one a pass has seen before): its passes list their children. The
        # first pass of a brand-new resource creates them without a list.
        await _create(emulator, {**minimal_llmt(), "status": {"phase": "Pending"}})
        owner = await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_METRICS).get("reason") == "ServiceFailed",
            "ServiceFailed reported",
        )
        assert owner
        await ready(emulator, what="Ready once the Service could be created", attempts=600)
    service_lists = owner_lists(emulator, "services")
    assert len(service_lists) > failing  # the failures were used up by retried passes, then a list succeeded
    service_posts = [w for w in writes(emulator) if w == ("POST", f"/api/v1/namespaces/{NAMESPACE}/services")]
    assert len(service_posts) == 1
    llmt = [path for method, path in writes(emulator) if method == "PATCH" and path.startswith(LLMT_PATH)]
    status_writes = [path for path in llmt if path.endswith("/status")]
    # The claim (status.operator), the failure once, then Ready: the retries that met the same failure wrote nothing.
    assert len(status_writes) == 3, llmt
    # kopf's own: the finalizer, and the record that the create handler is done. No retry bookkeeping.
    assert len(llmt) - len(status_writes) <= 2, llmt
    reasons = [event.get("reason") for event in posted_events(emulator)]
    assert reasons.count("ServiceFailed") == 1, reasons


async def test_a_blip_of_two_seconds_is_retried_seconds_later(emulator: Any, monitoring_crds: Any) -> None:
    """The API server fails every status write for two seconds right after an injection. The failed pass's own
    writes echo back as watch events, each starting a pass that fails too: counted as failures in a row, they
    doubled the retry's wait a dozen times, and the resource was Ready only four minutes after the server was
    back. The retry scheduled after the first failure stands."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = {**minimal_llmt(), "status": {"phase": "Pending"}}
    client = KubeClient(retry=Retry(attempts=2, base=0.01))
    # From the injection on (the first update of the Deployment).
    failing = {("llmtelemetries/status", "chat"): (500, "InternalError", "etcdserver: request timed out")}
    emulator.deny_after[("deployments", "chat")] = failing
    async with running_operator(OperatorConfig(peering=PEERING, metrics_port=0, health=""), client=client):
        await eventually(lambda: "LLM_TELEMETRY_METRICS_PORT" in env_of(get(emulator, DEPLOYMENTS, "chat")), "injected")
        await asyncio.sleep(2)
        emulator.deny.clear()
        await ready(emulator, what="Ready within a retry or two of the server's return", attempts=400)


async def test_resyncs_are_spread_over_their_interval(emulator: Any, monitoring_crds: Any) -> None:
    """Ten resources created at once do not resync at once: each at its own place in the interval."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    names = [f"r{i}" for i in range(10)]
    for name in names:
        emulator.objects[DEPLOYMENTS, NAMESPACE, name] = deployment(name, labels={"app": name})
        # Fixed uids (uid-r0...), so each resource's place in the interval is the same on every run.
        emulator.objects[LLMT, NAMESPACE, name] = minimal_llmt(name, selector={"matchLabels": {"app": name}})
    interval = 3.0
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=interval)
    async with running_operator(config):
        await eventually(
            lambda: all(condition(get(emulator, LLMT, n), c.CONDITION_READY).get("status") == "True" for n in names),
            "all Ready",
        )
        settled, seen = time.monotonic(), len(list(emulator))
        # Each pass lists the Deployments its resource selects (app=<name>): note when each such list arrives (to
        # the nearest 50 ms), until each resource has had one. A resync comes at most 1.5 intervals after a
        # resource's last pass; the deadline leaves room for passes slowed by a busy machine (a load of 13 on two
        # cores took more than three intervals, and once more than ten). The loop ends at the last resource's first
        # pass, so the deadline costs nothing when the passes come.
        passes: list[tuple[float, str]] = []
        # Each resource's first pass after the creations settled: its resync.
        first: dict[str, float] = {}
        while time.monotonic() < settled + 30 * interval and len(first) < len(names):
            await asyncio.sleep(0.05)
            requests = list(emulator)
            new, seen = requests[seen:], len(requests)
            for req in new:
                if req in owner_lists(emulator, "deployments"):
                    selector = req.params.get("labelSelector", "")
                    passes.append((time.monotonic(), selector))
                    owner = selector.partition("app=")[2].split(",")[0]
                    if owner in names:
                        first.setdefault(owner, passes[-1][0])
    assert sorted(first) == sorted(names), passes
    # All created together; resynced over most of an interval (the daemon it replaced fired them within ms).
    assert max(first.values()) - min(first.values()) >= interval / 3, sorted(first.values())


async def test_delete_reads_only_its_own_workloads(emulator: Any, monitoring_crds: Any) -> None:
    """Deleting a resource in a namespace with many other workloads lists only what its selector selects."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    for i in range(5):
        emulator.objects[DEPLOYMENTS, NAMESPACE, f"batch-{i}"] = deployment(f"batch-{i}", labels={"app": "batch"})
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    async with running_operator():
        await eventually(
            lambda: condition(get(emulator, LLMT, "chat"), c.CONDITION_READY).get("status") == "True", "Ready"
        )
        await _delete(emulator, "chat")
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "deleted")
    assert c.ANNOTATION_CONFIG_HASH not in (
        get(emulator, DEPLOYMENTS, "chat")["spec"]["template"]["metadata"].get("annotations") or {}
    )
    lists = owner_lists(emulator, "deployments")
    assert lists
    assert all(req.params.get("labelSelector") == "app=chat" for req in lists), [str(r.url) for r in lists]
    # Served from the API server's watch cache, not read from etcd.
    assert all(req.params.get("resourceVersion") == "0" for req in lists)


STATUS_404 = {"kind": "Status", "status": "Failure", "reason": "NotFound", "message": "not found", "code": 404}


async def test_a_workload_deleted_while_its_injection_is_removed_does_not_hold_up_the_delete(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A resource and its workloads deleted together (a namespace going): a workload gone between the delete's
    list and its patch answers 404. Nothing is left to undo there: the delete goes on, and the resource is gone
    at once (a failure here went to kopf, whose handler retry waits 60 s, holding up the namespace too)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    # The second patch of the Deployment (the first injects): the one that would remove the injection.
    emulator["patch apps/v1/deployments"][1:2] << 404 << STATUS_404
    async with running_operator():
        await ready(emulator)
        started = time.monotonic()
        await _delete(emulator, "chat")
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "deleted")
        assert time.monotonic() - started < 10


def _one_resource(emulator: Any, monitoring_crds: Any) -> None:
    """Resource ``chat`` selecting Deployment ``chat``, with the Prometheus Operator's CRDs and the collectors."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()


def _kind_not_served(emulator: Any) -> None:
    """The operator's look for resource ``chat`` (a list by name) answers 404, as for a kind not served."""
    lookup = emulator[
        lambda request: (
            request.method == "GET"
            and request.url.path == LLMT_PATH
            and request.params.get("fieldSelector") == "metadata.name=chat"
        )
    ]
    lookup << 404 << STATUS_404


def _crd_gone(emulator: Any) -> None:
    """The operator's look for resource ``chat`` answers 404 and the CRDs' list is empty: its CRD is gone."""
    _kind_not_served(emulator)
    emulator[lambda request: request.url.path == CRDS_PATH] << 200 << {"kind": "List", "items": []}


async def test_a_child_deleted_once_the_crd_is_gone_is_not_made_again(emulator: Any, monitoring_crds: Any) -> None:
    """With the LLMTelemetry CRD deleted (its resources gone with it, their finalizers taken off as install.md says),
    the garbage collector deletes their children, and each deletion reached a pass that made the child again, owned
    by a resource that no longer exists, which the collector then left (it cannot resolve the owner's kind): on a
    real cluster ~230 Services, ServiceMonitors, rules and dashboards came back for 166 resources. Asked to put a
    child back, the operator finds the kind gone (its list answers 404, and the CRD is not there), forgets the
    resource and makes nothing."""
    _one_resource(emulator, monitoring_crds)
    async with running_operator() as memo:
        await ready(emulator)
        _crd_gone(emulator)
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(lambda: (NAMESPACE, "chat") not in memo["state"].bodies, "the resource forgotten")
        await asyncio.sleep(1)
        assert get(emulator, SERVICES, "chat-llm-metrics") is None


async def _finalizer_put_back(emulator: Any) -> None:
    """Take resource ``chat``'s finalizer off by hand and wait until kopf has put it back: kopf does that after the
    operator's handler of the same watch event (``llmtelemetry_track``) has run, so the operator has had that event."""
    await hand(emulator, "PATCH", f"{LLMT_PATH}/chat", {"metadata": {"finalizers": None}})
    await eventually(
        lambda: c.FINALIZER in ((get(emulator, LLMT, "chat") or {}).get("metadata") or {}).get("finalizers", ()),
        "the finalizer put back",
    )


async def test_a_resource_found_gone_is_not_tracked_again_by_a_late_watch_event(
    emulator: Any, monitoring_crds: Any
) -> None:
    """kopf delivers each watch event a moment after the API server sent it (kopf 1.38 held every event 0.1 s for
    more of the same object): the operator's own status write, say, reached its tracking after a child's deletion
    had the resource found gone and forgotten, and tracked it again, for good (kopf never reports a deletion it
    did not see), where workload events started passes that made its children again. Events of a resource found
    gone are older than that finding: a spec change among them runs no pass, and none tracks it again. Here the
    emulator keeps the resource and delivers such events on demand (edits by hand), answering only the operator's
    look as for a kind no longer served."""
    _one_resource(emulator, monitoring_crds)
    async with running_operator() as memo:
        await ready(emulator)
        _crd_gone(emulator)
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(lambda: (NAMESPACE, "chat") not in memo["state"].bodies, "the resource forgotten")
        await _finalizer_put_back(emulator)
        assert (NAMESPACE, "chat") not in memo["state"].bodies
        # A spec change: kopf runs the operator's pass handler for it (in this event's cycle, or in that of the
        # finalizer's return), and the next finalizer's return comes after that cycle.
        await hand(emulator, "PATCH", f"{LLMT_PATH}/chat", {"spec": {"metrics": {"port": 9465}}})
        assert get(emulator, LLMT, "chat")["metadata"]["generation"] == 2
        await _finalizer_put_back(emulator)
        await _finalizer_put_back(emulator)
        assert (NAMESPACE, "chat") not in memo["state"].bodies
        assert get(emulator, SERVICES, "chat-llm-metrics") is None


async def test_a_resource_found_gone_while_its_pass_runs_keeps_nothing_of_that_pass(
    emulator: Any, monitoring_crds: Any
) -> None:
    """A child deleted while a pass of its resource is under way, and the resource found gone (its CRD deleted): that
    pass's outcome, status, reports and served workloads were filed under the resource after it was forgotten, for
    good, as the look ran beside the pass. The look waits for the pass, as passes do; the pass here is held at its
    list of the workloads, and let go once the resource is forgotten, or once the look has had ample time to."""
    _one_resource(emulator, monitoring_crds)
    key = (NAMESPACE, "chat")
    holding, arrived, release = [False], asyncio.Event(), asyncio.Event()

    async def hold(_request: Any) -> None:
        arrived.set()
        await release.wait()

    def held(request: Any) -> bool:
        return holding[0] and request in owner_lists(emulator, "deployments")

    async with running_operator() as memo:
        await ready(emulator)
        state = memo["state"]
        emulator[held] >> hold
        holding[0] = True
        await hand(emulator, "PATCH", f"{LLMT_PATH}/chat", {"spec": {"metrics": {"port": 9465}}})
        await eventually(arrived.is_set, "the pass at its list of the workloads")
        holding[0] = False
        _crd_gone(emulator)
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        try:  # (the look waits for the pass, so this wait ends unmet; the look used to forget it here)
            await eventually(lambda: key not in state.bodies, "the resource forgotten", attempts=60)
        except AssertionError:
            pass
        release.set()
        await eventually(lambda: key not in state.bodies and key not in state.locks, "forgotten, no pass")
        assert key not in state.passes
        assert key not in state.reported
        assert "uid-chat" not in state.statuses
        assert state.index.candidates(NAMESPACE, {}, "Deployment/chat") == []


async def test_a_resource_found_gone_then_deleted_with_the_finalizer_is_cleaned_up_and_let_go(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Found gone by a read that was wrong (here the emulator answers the look as for a kind no longer served, and
    then serves it again), then deleted with the operator's finalizer on it: kopf's deletion reaches the operator's
    deletion handler, which undoes the injection, and the finalizer comes off (a finalizer left on holds the
    resource, and its namespace's deletion, for good). Events of the uid found gone are skipped by the tracking
    and the passes only."""
    _one_resource(emulator, monitoring_crds)
    looking_gone = [True]

    def look(request: Any) -> bool:
        return (
            looking_gone[0]
            and request.method == "GET"
            and request.url.path == LLMT_PATH
            and request.params.get("fieldSelector") == "metadata.name=chat"
        )

    async with running_operator() as memo:
        await ready(emulator)
        assert env_of(get(emulator, DEPLOYMENTS, "chat"))
        emulator[look] << 404 << STATUS_404
        emulator[lambda request: looking_gone[0] and request.url.path == CRDS_PATH] << 200 << {"kind": "List"}
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(lambda: (NAMESPACE, "chat") not in memo["state"].bodies, "the resource forgotten")
        looking_gone[0] = False
        assert c.FINALIZER in get(emulator, LLMT, "chat")["metadata"]["finalizers"]
        await _delete(emulator, "chat")
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "the finalizer taken off, the resource gone")
        assert not any(name.startswith("OTEL_") for name in env_of(get(emulator, DEPLOYMENTS, "chat")))


async def test_a_child_deleted_while_the_kind_is_not_served_and_the_watch_cache_lags_is_made_again(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The kind answering 404 (an API server just restarted) while the watch cache behind the CRD list lags (several
    API servers, one cache without the CRD): the CRD exists, so the resource is not taken for gone (forgotten for
    good), and the pass makes the child again. Whether the CRD is gone is asked with a consistent list."""
    _one_resource(emulator, monitoring_crds)
    async with running_operator() as memo:
        await ready(emulator)
        _kind_not_served(emulator)
        cached = {"kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}
        (
            emulator[lambda request: request.url.path == CRDS_PATH and request.params.get("resourceVersion") == "0"]
            << 200
            << cached
        )
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics") is not None, "the child made again")
        assert (NAMESPACE, "chat") in memo["state"].bodies


async def test_a_child_deleted_while_the_kind_is_not_served_yet_is_made_again(
    emulator: Any, monitoring_crds: Any
) -> None:
    """An API server just restarted may answer 404 for a kind whose CRD it has not loaded yet: with the CRD there,
    the resource is not taken for gone (forgotten, its workloads handed to the next in line); the pass decides, and
    the child is made again."""
    _one_resource(emulator, monitoring_crds)
    async with running_operator() as memo:
        await ready(emulator)
        _kind_not_served(emulator)
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics") is not None, "the child made again")
        assert (NAMESPACE, "chat") in memo["state"].bodies


async def test_a_child_deleted_while_the_watch_cache_lags_is_made_again(emulator: Any, monitoring_crds: Any) -> None:
    """Asked to put a deleted child back, the operator first looks its resource up by name, in the API server's
    watch cache; a cache lagging behind (several API servers) may not have it yet: the resource was forgotten (its
    workloads handed to the next in line, no pass until its next change) and the child not made again. A
    consistent list now confirms such an answer first."""
    _one_resource(emulator, monitoring_crds)
    async with running_operator() as memo:
        await ready(emulator)
        cache_lagging(emulator)
        await hand(emulator, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics")
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics") is not None, "the child made again")
        assert (NAMESPACE, "chat") in memo["state"].bodies
        assert consistent_reads(emulator)


async def _create(emulator: Any, body: dict[str, Any]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = str(emulator.url).rstrip("/") + LLMT_PATH
        async with session.post(url, json=body, headers={"X-Test-Hand": "1"}) as rsp:
            assert rsp.status < 400, await rsp.text()


async def _delete(emulator: Any, name: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = str(emulator.url).rstrip("/") + f"{LLMT_PATH}/{name}"
        async with session.delete(url, headers={"X-Test-Hand": "1"}) as rsp:
            assert rsp.status < 400, await rsp.text()


async def test_a_pass_failing_on_what_no_check_foresaw_is_reported_and_retried_by_the_operator(
    emulator: Any, monitoring_crds: Any
) -> None:
    """The API server answers the workload list with a body the operator cannot read (items that are not objects):
    the pass fails with an exception of no known kind. It is reported like an API error, one InternalError event,
    and retried by the operator's schedule, not left to kopf (whose handler retries would patch the resource on each
    attempt and show nothing in its events); once the answers are readable again, the resource becomes Ready."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    garbled = {"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {}, "items": ["not an object"]}
    emulator[f"get /apis/apps/v1/namespaces/{NAMESPACE}/deployments"][:3] << 200 << garbled
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=2)
    async with running_operator(config, client=KubeClient(retry=Retry(attempts=2, base=0.01))):
        await _create(emulator, minimal_llmt())
        await ready(emulator, what="Ready once the workload list could be read", attempts=600)
    internal = posted_events(emulator, "InternalError")
    assert len(internal) == 1, [event.get("reason") for event in posted_events(emulator)]
    annotations = get(emulator, LLMT, "chat")["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.startswith("kopf.zalando.org/llmtelemetry_reconcile")], annotations
