"""Two releases of the operator whose watched namespaces overlap (one cluster-wide, one for a team's namespaces):
each sees the resources there. The status names the operator that serves a resource (by its peering object);
another leaves the resource to it while a replica of it runs, and takes it over once none does. On a real API
server, without this, the two put their own settings back over each other's, dozens of rollouts a second."""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import pytest
from kopf_testing import (
    CLUSTERKOPFPEERINGS,
    DENIED,
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    NAMESPACES,
    PEERING,
    SERVICES,
    by_name,
    consistent_reads,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    is_write,
    minimal_llmt,
    namespace_object,
    posted_events,
    ready,
    running_operator,
)
from test_operator_kmock import env_of, hand

from llm_telemetry_operator import constants as c
from llm_telemetry_operator.config import OperatorConfig, Timers

OTHER = "team-a-llm-telemetry-operator"
#: The resources' collection in the test namespace, and the resource the tests serve.
LLMTS = f"/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
CHAT = f"{LLMTS}/chat"
#: The operator's timers as they run (the tests below that do not shorten them).
DEFAULT_TIMERS = Timers()
#: Polls (of 0.05 s) to wait for a takeover of an operator seen gone: it is confirmed by a second look
#: takeover_confirm_seconds later (kopf takes a stopping replica's entry out before its stop can be said).
CONFIRMED = int((DEFAULT_TIMERS.takeover_confirm_seconds + 10) / 0.05)


def other_operator(
    emulator: Any,
    seen: datetime.timedelta | None,
    lifetime: int = 60,
    watched: str | None = None,
    by: str = "other-pod",
    stopped: datetime.timedelta | None = None,
) -> None:
    """The other release's peering object, with one replica last seen ``seen`` ago, alive for ``lifetime`` seconds
    after (None: no replica, as kopf leaves it once the last one has stopped); ``watched``: the namespaces it says
    that operator watches (None: an operator from before it said so), written by replica ``by``; ``stopped``: how
    long ago it says its active replica stopped."""
    now = datetime.datetime.now(datetime.UTC)
    metadata: dict[str, Any] = {"name": OTHER, "annotations": {}}
    if watched is not None:
        metadata["annotations"] |= {c.ANNOTATION_WATCHED: watched, c.ANNOTATION_WATCHED_BY: by}
    if stopped is not None:
        metadata["annotations"][c.ANNOTATION_STOPPED] = (now - stopped).isoformat(timespec="seconds")
    status = (
        {}
        if seen is None
        else {"other-pod": {"priority": 0, "lastseen": (now - seen).isoformat(), "lifetime": lifetime}}
    )
    emulator.objects[CLUSTERKOPFPEERINGS, None, OTHER] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": metadata,
        "status": status,
    }


@pytest.fixture
def monitoring(emulator: Any, monitoring_crds: Any) -> None:
    """A cluster with the Prometheus Operator's CRDs and the default collectors: what a resource is served with."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)


def served_here(emulator: Any) -> None:
    """A new resource, "chat", and the Deployment it selects: this operator serves it once it runs."""
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()


def chat_env(emulator: Any) -> dict[str, str]:
    """The environment of the Deployment's container: what an injection sets."""
    return env_of(get(emulator, DEPLOYMENTS, "chat"))


def served_by_other(emulator: Any) -> None:
    """A resource the other operator has served: its status, its finalizer and its injection."""
    resource = minimal_llmt()
    resource["metadata"]["finalizers"] = [c.FINALIZER]
    resource["status"] = {"operator": OTHER, "phase": "Ready", "targets": ["Deployment/chat"], "targetCount": 1}
    emulator.objects[LLMT, NAMESPACE, "chat"] = resource
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()


def writes_since(emulator: Any, seen: int) -> list[tuple[str, str]]:
    """The writes made after the first ``seen`` requests, but for events and the peering objects' keepalives."""
    return [
        (r.method.value, str(r.url.path))
        for r in list(emulator)[seen:]
        if is_write(r) and "kopfpeerings" not in str(r.url.path) and not str(r.url.path).endswith("/events")
    ]


@pytest.mark.parametrize("watched", [None, "*", f"team-b,{NAMESPACE}"])
@pytest.mark.usefixtures("monitoring")
async def test_a_resource_another_running_operator_serves_is_left_to_it(emulator: Any, watched: str | None) -> None:
    """Nothing injected, made or written: one Warning event and a log line say why and what to change. So whether
    the other operator says it watches every namespace, this one among others, or nothing (an older operator)."""
    other_operator(emulator, datetime.timedelta(seconds=5), watched=watched)
    served_by_other(emulator)
    async with running_operator():
        (event,) = await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        assert event["type"] == "Warning"
        assert OTHER in event["message"] and PEERING in event["message"] and "watchNamespaces" in event["message"]
        # The other name may be this release's own from before a switch between cluster-wide and namespaced mode,
        # whose stopped pods' entries stay alive for up to a minute (seen so on a real API server).
        assert "former peering name" in event["message"] and "delete that peering object" in event["message"]
        seen = len(list(emulator))
        await asyncio.sleep(3)
        assert [w for w in writes_since(emulator, 0) if "llmtelemetries" not in w[1] or "status" in w[1]] == []
        assert writes_since(emulator, seen) == []
        assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in chat_env(emulator)
        assert get(emulator, SERVICES, "chat-llm-metrics") is None
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER
        assert len(posted_events(emulator, "WatchedTwice")) == 1  # said once, not at every pass


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_whose_operator_no_longer_runs_is_taken_over(emulator: Any) -> None:
    """Its operator's replicas all dead (uninstalled, say): this operator serves the resource, and its status then
    names this operator."""
    other_operator(emulator, datetime.timedelta(minutes=10))
    served_by_other(emulator)
    async with running_operator():
        found = await ready(emulator, attempts=CONFIRMED)
        assert found["status"]["operator"] == PEERING
        assert chat_env(emulator)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
        assert posted_events(emulator, "WatchedTwice") == []


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_whose_operators_peering_object_is_gone_is_taken_over(emulator: Any) -> None:
    """No peering object of that name: no operator runs under it (a release switched between cluster-wide and
    namespaced mode runs under another name; deleting its old object hands its resources over without the wait)."""
    served_by_other(emulator)
    async with running_operator():
        found = await ready(emulator, attempts=CONFIRMED)
        assert found["status"]["operator"] == PEERING
        assert posted_events(emulator, "WatchedTwice") == []


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_in_a_namespace_its_operator_no_longer_watches_is_taken_over(emulator: Any) -> None:
    """Its operator runs, but its release's watchNamespaces no longer has the namespace, as its peering object says:
    nothing serves the resource there but this operator, which takes it over at once and says so in its status."""
    other_operator(emulator, datetime.timedelta(seconds=5), watched="team-b,team-c")
    served_by_other(emulator)
    async with running_operator():
        found = await ready(emulator)
        assert found["status"]["operator"] == PEERING
        assert chat_env(emulator)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
        assert posted_events(emulator, "WatchedTwice") == []


@pytest.mark.usefixtures("monitoring")
async def test_a_deletion_in_a_namespace_its_operator_no_longer_watches_is_done_here(emulator: Any) -> None:
    """Deleted while this operator was away, after the operator that served it stopped watching the namespace: that
    one does not see the deletion, so this one cleans up and takes the shared finalizer off, without waiting."""
    other_operator(emulator, datetime.timedelta(seconds=5), watched="team-b")
    served_by_other(emulator)
    emulator.objects[LLMT, NAMESPACE, "chat"] = {
        **get(emulator, LLMT, "chat"),
        "metadata": {**get(emulator, LLMT, "chat")["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"},
    }
    async with running_operator():
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "finalizer taken off")
        assert posted_events(emulator, "WatchedTwice") == []


@pytest.mark.parametrize(("namespaces", "said"), [((), "*"), ((NAMESPACE, "team-b"), f"{NAMESPACE},team-b")])
async def test_the_operator_says_on_its_peering_object_which_namespaces_it_watches(
    emulator: Any, namespaces: tuple[str, ...], said: str
) -> None:
    """What another operator reads to tell whether this one still serves a namespace (``*``: every one)."""
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", namespaces=namespaces)
    async with running_operator(config):
        await eventually(
            lambda: (
                (get(emulator, CLUSTERKOPFPEERINGS, PEERING, namespace=None)["metadata"].get("annotations") or {}).get(
                    c.ANNOTATION_WATCHED
                )
                == said
            ),
            "watched namespaces written",
        )


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_this_operator_serves_names_it_in_its_status(emulator: Any) -> None:
    served_here(emulator)
    async with running_operator():
        assert (await ready(emulator))["status"]["operator"] == PEERING


@pytest.mark.usefixtures("monitoring")
async def test_a_deletion_is_left_to_the_operator_serving_the_resource(emulator: Any) -> None:
    """The finalizer is shared: taken off here, the resource would go before the operator serving it removed its
    injection. This operator waits, writing nothing, and cleans up itself only once that operator is gone."""
    other_operator(emulator, datetime.timedelta(seconds=5))
    served_by_other(emulator)
    async with running_operator():
        await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        seen = len(list(emulator))
        await hand(emulator, "DELETE", CHAT)
        await asyncio.sleep(4)
        assert [w for w in writes_since(emulator, seen) if w[0] != "DELETE"] == []
        assert c.FINALIZER in get(emulator, LLMT, "chat")["metadata"]["finalizers"]


@pytest.mark.parametrize("left", ["stop said", "stale entry"])
@pytest.mark.usefixtures("monitoring")
async def test_a_resource_whose_operator_is_restarting_is_not_taken_over(emulator: Any, left: str) -> None:
    """Its only replica stopped a minute ago: kopf took its entry out, and the operator said when it stopped (or,
    after a switch between cluster-wide and namespaced mode, the old pods could not take their entry out, and it
    expired a minute ago). A restart, or a rollout of one replica, leaves none alive for a while, and taking its
    resources over then would move them to this release's settings for good. They are left to it until it has been
    gone for a while."""
    if left == "stop said":
        other_operator(emulator, None, stopped=datetime.timedelta(minutes=1))
    else:
        other_operator(emulator, datetime.timedelta(minutes=2), lifetime=60)
    served_by_other(emulator)
    async with running_operator():
        (event,) = await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        # No second release to take the namespace out of: the other name may be this release's own, from before a
        # switch between cluster-wide and namespaced mode (seen so on a real API server), and the event says so.
        assert "no replica running now" in event["message"] and "Two releases" not in event["message"]
        # Nothing starts a pass when the grace ends: the takeover waits for the resource's resync.
        assert "takes the resource over at its first resync after" in event["message"], event["message"]
        assert "delete that peering object" in event["message"] and OTHER in event["message"]
        await asyncio.sleep(1)
        assert "LLM_TELEMETRY_METRICS_PORT" not in chat_env(emulator)
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER


@pytest.mark.usefixtures("monitoring")
async def test_an_operator_back_from_a_restart_is_told_apart_from_one_restarting(emulator: Any) -> None:
    """A resource met while the other operator had no replica running is told it counts as restarting; one met once
    that operator runs again (a replica's entry renewed, read past the cache of its peering object) is told two
    releases watch the namespace, not that the other is restarting."""
    other_operator(emulator, None, stopped=datetime.timedelta(minutes=1))
    served_by_other(emulator)
    async with running_operator():
        (event,) = await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        assert "no replica running now" in event["message"], event["message"]
        other_operator(emulator, datetime.timedelta(seconds=0))
        await asyncio.sleep(DEFAULT_TIMERS.holder_check_seconds + 1)
        again = minimal_llmt("chat2")
        again["status"] = {"operator": OTHER}
        await hand(emulator, "POST", LLMTS, again)
        events = await eventually(
            lambda: (found := posted_events(emulator, "WatchedTwice")) and len(found) == 2 and found,
            "a second WatchedTwice event",
        )
        second = next(e for e in events if "chat2" in str(e.get("regarding") or e.get("involvedObject")))
        assert "Two releases" in second["message"] and "no replica running now" not in second["message"], second
        assert get(emulator, LLMT, "chat2")["status"]["operator"] == OTHER


@pytest.mark.usefixtures("monitoring")
async def test_an_operator_seen_gone_once_is_not_taken_over_before_it_is_seen_so_again(emulator: Any) -> None:
    """kopf takes a stopping replica's entry out before the operator's cleanup writes its stop mark: a look in
    between finds neither. The resource is taken over only if a second look, takeover_confirm_seconds later, finds
    the same; here the mark arrives meanwhile (a restart), and the resource stays with its operator."""
    other_operator(emulator, None)
    served_by_other(emulator)
    async with running_operator():
        await asyncio.sleep(2)
        other_operator(emulator, None, stopped=datetime.timedelta(seconds=2))
        await asyncio.sleep(DEFAULT_TIMERS.takeover_confirm_seconds + 6)
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER
        assert "LLM_TELEMETRY_METRICS_PORT" not in chat_env(emulator)


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_whose_operator_stopped_long_ago_is_taken_over(emulator: Any) -> None:
    other_operator(emulator, None, stopped=datetime.timedelta(minutes=10))
    served_by_other(emulator)
    async with running_operator():
        assert (await ready(emulator, attempts=CONFIRMED))["status"]["operator"] == PEERING


async def test_the_active_replica_says_when_it_stopped(emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    """So that another operator leaves the resources this one claimed alone while it restarts (kopf removes the
    replica's entry as it stops). Stopped once its startup is over: kopf runs no cleanup for an operator stopped
    during it (the watched namespaces are published while the startup goes on)."""
    caplog.set_level(logging.INFO)
    async with running_operator():
        await eventually(
            lambda: (
                get(emulator, CLUSTERKOPFPEERINGS, PEERING, namespace=None)["metadata"].get("annotations") or {}
            ).get(c.ANNOTATION_WATCHED),
            "active",
        )
        await eventually(
            lambda: any(r.getMessage() == "Activity 'startup' succeeded." for r in caplog.records), "started"
        )
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    said = (get(emulator, CLUSTERKOPFPEERINGS, PEERING, namespace=None)["metadata"].get("annotations") or {}).get(
        c.ANNOTATION_STOPPED
    )
    assert said is not None and datetime.datetime.fromisoformat(said) >= before


@pytest.mark.parametrize(
    ("watched", "by"),
    [
        ("team-b", "a-replica-gone"),
        ("", "other-pod"),
        (",", "other-pod"),
        ("*,team-b", "other-pod"),
        ("llm*", "other-pod"),
    ],
)
@pytest.mark.usefixtures("monitoring")
async def test_a_namespace_list_not_to_rely_on_leaves_the_resource_to_its_running_operator(
    emulator: Any, watched: str, by: str
) -> None:
    """Written by a replica with no entry now (a rollback to an operator that writes none: what a newer one wrote is
    stale), or not a list of namespace names: the operator is taken to watch every namespace."""
    other_operator(emulator, datetime.timedelta(seconds=5), watched=watched, by=by)
    served_by_other(emulator)
    async with running_operator():
        await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_taken_back_gets_this_operators_status_again(emulator: Any) -> None:
    """This operator served it; another claimed it and wrote a status of its own, then went for good. Taking it
    back, this operator writes its own status again, not comparing against the one it wrote last."""
    served_here(emulator)
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=1)
    async with running_operator(config):
        await ready(emulator, attempts=CONFIRMED)
        other_operator(emulator, datetime.timedelta(minutes=10))
        theirs = {"operator": OTHER, "phase": "Pending", "targets": [], "targetCount": 0, "conditions": []}
        path = f"{CHAT}/status"
        await hand(emulator, "PATCH", path, {"status": theirs})
        found = await eventually(
            lambda: (
                (get(emulator, LLMT, "chat").get("status") or {}).get("operator") == PEERING
                and get(emulator, LLMT, "chat")
            ),
            "taken back",
            CONFIRMED,
        )
        found = await ready(emulator, attempts=CONFIRMED)
        assert found["status"]["targetCount"] == 1 and found["status"]["phase"] == "Ready"


@pytest.mark.usefixtures("monitoring")
async def test_a_deletion_left_to_the_other_operator_ends_when_it_is_done(emulator: Any) -> None:
    """The other operator cleans up and takes the finalizer off; the resource is then made anew, by a user, for
    this operator. The wait ends there: it reads the resource from the API server (kopf hands its next events to
    this operator only once the handler returns), finds another uid, and leaves the new resource as it is, where
    acting on the old body would have removed the new one's injection."""
    other_operator(emulator, datetime.timedelta(seconds=5))
    served_by_other(emulator)
    path = LLMTS
    async with running_operator():
        await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        await hand(emulator, "DELETE", f"{path}/chat")
        await asyncio.sleep(1)
        await hand(emulator, "PATCH", f"{path}/chat", {"metadata": {"finalizers": None}})
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "gone once its finalizer is off")
        again = minimal_llmt()
        again["metadata"]["uid"] = "uid-chat-again"
        await hand(emulator, "POST", path, again)
        injected = await ready(emulator)
        assert injected["metadata"]["uid"] == "uid-chat-again"
        await asyncio.sleep(4)  # past the old deletion's next look (every 2 s)
        assert chat_env(emulator)["LLM_TELEMETRY_METRICS_PORT"] == "9464"
        assert get(emulator, SERVICES, "chat-llm-metrics") is not None


async def test_a_resource_another_running_operator_serves_is_not_let_go_at_start(
    emulator: Any, monitoring_crds: Any
) -> None:
    """Namespaced mode lets go of resources being deleted in a namespace being deleted, found at its start (kopf
    watches no such namespace): not of one another running operator serves, whose own deletion handler runs."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    other_operator(emulator, datetime.timedelta(seconds=5), watched=NAMESPACE)
    served_by_other(emulator)
    await hand(emulator, "DELETE", CHAT)
    namespace = namespace_object(NAMESPACE)
    namespace["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    namespace["status"] = {"phase": "Terminating"}
    emulator.objects[NAMESPACES, None, NAMESPACE] = namespace
    seen = len(list(emulator))
    config = OperatorConfig(namespaces=(NAMESPACE,), peering=PEERING, metrics_port=0, health="")
    async with running_operator(config):
        await asyncio.sleep(2)
    assert c.FINALIZER in get(emulator, LLMT, "chat")["metadata"]["finalizers"]
    assert not [w for w in writes_since(emulator, seen) if "llmtelemetries" in w[1]]


@pytest.mark.parametrize("refused", [False, True])
async def test_a_resource_left_at_start_to_an_operator_since_gone_for_good_is_let_go(
    emulator: Any, monitoring_crds: Any, refused: bool
) -> None:
    """As above, but the other operator had stopped a moment before (a restart, as far as anyone can tell: its
    resources are left to it for its grace), and never comes back. The resource is looked at again: once the grace
    has passed, and that operator is confirmed gone, it is let go, and the namespace can go. (The grace and the
    looks are shortened here, through the config's timers: 6 s, then a look every second; by default 5 minutes,
    then a look every 25 s. The grace is looked at past two looks and their confirmation, well before it ends.)
    ``refused``: the first release is refused (a webhook, a conflict): looked at again, not dropped with the
    namespace left Terminating."""
    timers = Timers(takeover_grace_seconds=6.0, takeover_confirm_seconds=0.5, holder_check_seconds=0.5)
    assert timers.release_recheck_seconds == 1.0
    install_prometheus_operator_crds(emulator, monitoring_crds)
    other_operator(emulator, None, stopped=datetime.timedelta(seconds=1))
    served_by_other(emulator)
    await hand(emulator, "DELETE", CHAT)
    namespace = namespace_object(NAMESPACE)
    namespace["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    # As the namespace controller says it is held up (kopf then watches no such namespace when it starts).
    remaining = {
        "type": "NamespaceFinalizersRemaining",
        "status": "True",
        "reason": "SomeFinalizersRemain",
        "message": f"Some content in the namespace has finalizers remaining: {c.FINALIZER} in 1 resource instances",
    }
    namespace["status"] = {"phase": "Terminating", "conditions": [remaining]}
    emulator.objects[NAMESPACES, None, NAMESPACE] = namespace
    config = OperatorConfig(namespaces=(NAMESPACE,), peering=PEERING, metrics_port=0, health="", timers=timers)
    if refused:
        emulator.deny[("llmtelemetries", "chat")] = DENIED
    seen = len(list(emulator))
    async with running_operator(config):
        await asyncio.sleep(2.5)
        assert c.FINALIZER in get(emulator, LLMT, "chat")["metadata"]["finalizers"]  # within the grace: left to it
        if refused:
            await eventually(
                lambda: ("PATCH", CHAT) in writes_since(emulator, seen),
                "a release tried",
                attempts=400,
            )
            await asyncio.sleep(0.5)
            assert get(emulator, LLMT, "chat") is not None
            emulator.deny.clear()
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "let go once its operator is gone for good")


@pytest.mark.usefixtures("monitoring")
async def test_a_resource_told_its_operator_was_restarting_is_told_again_once_that_operator_runs(emulator: Any) -> None:
    """The first event said the other operator counts as restarting, and that the resource is taken over if it stays
    gone; it came back instead, so two releases watch the namespace, which the user has to settle: the same resource
    is told so, once, at its next pass (not only a resource first met after)."""
    other_operator(emulator, None, stopped=datetime.timedelta(minutes=1))
    served_by_other(emulator)
    config = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=2)
    async with running_operator(config):
        (event,) = await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        assert "no replica running now" in event["message"], event["message"]
        other_operator(emulator, datetime.timedelta(seconds=0))
        events = await eventually(
            lambda: (found := posted_events(emulator, "WatchedTwice")) and len(found) == 2 and found,
            "a second WatchedTwice event for the same resource",
            attempts=int((DEFAULT_TIMERS.holder_check_seconds + 20) / 0.05),
        )
        assert "Two releases" in events[1]["message"] and "no replica running now" not in events[1]["message"]
        # Idle again (a restart of the other): nothing new to say, through some more passes.
        other_operator(emulator, None, stopped=datetime.timedelta(seconds=1))
        passes = sum(1 for r in list(emulator) if str(r.url.path).endswith("/clusterkopfpeerings"))
        await eventually(
            lambda: sum(1 for r in list(emulator) if str(r.url.path).endswith("/clusterkopfpeerings")) > passes + 2,
            "the other operator's peering object read again",
            attempts=int((DEFAULT_TIMERS.holder_check_seconds * 3 + 20) / 0.05),
        )
        assert len(posted_events(emulator, "WatchedTwice")) == 2
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER


#: The pass's read of the workloads its selector picks: after it, the pass patches the Deployment.
WORKLOADS_READ = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
CLAIM_LOST = f"stopped: the resource is served by operator '{OTHER}' now"
#: The other operator's claim, and a change of spec that this operator's handler would apply.
CLAIMED = {"status": {"operator": OTHER}}
LOGS_OFF = {"spec": {"logs": {"enabled": False}}}


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The operator's log, from INFO: where it says why a pass stopped."""
    caplog.set_level(logging.INFO)
    return caplog


def errors(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]


def hold_workload_reads(emulator: Any) -> None:
    """The API server answers a pass's read of the workloads only once the test sets ``emulator.released``."""
    emulator.holds = lambda request: (
        request.method == "GET" and request.path == WORKLOADS_READ and "labelSelector" in request.query
    )


async def take_injection_out(emulator: Any) -> None:
    """Someone takes the injection out of the Deployment: the pass its event starts would put it back."""
    bare = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example/chat:1"}]}}}}
    await hand(emulator, "PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/chat", bare)


async def stopped_or_written(emulator: Any, log: pytest.LogCaptureFixture, seen: int) -> None:
    await eventually(
        lambda: any(CLAIM_LOST in r.getMessage() for r in log.records) or writes_since(emulator, seen),
        "the pass stopped, or written on",
    )


def passes_writes(emulator: Any, seen: int) -> list[tuple[str, str]]:
    """:func:`writes_since`, but for kopf's record on the resource of the spec it handled: its own write, no pass's."""
    return [w for w in writes_since(emulator, seen) if w != ("PATCH", CHAT)]


@pytest.mark.usefixtures("monitoring")
async def test_a_pass_under_way_when_another_operator_claims_the_resource_writes_nothing_more(
    emulator: Any, log: pytest.LogCaptureFixture
) -> None:
    """This operator serves "chat". Its Deployment changes, and while the pass that asks for is under way (it has
    read the workloads), another operator that runs claims the resource (its name in the status). The pass went on
    and wrote what it worked out, its injection and its status, over the other operator's: the workload rolled
    twice, to this operator's settings and back to the other's. It now writes nothing more, says why, and its next
    pass leaves the resource to the other operator."""
    served_here(emulator)
    other_operator(emulator, datetime.timedelta(seconds=5))
    async with running_operator() as memo:
        await ready(emulator)
        assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in chat_env(emulator)
        hold_workload_reads(emulator)
        await take_injection_out(emulator)
        await eventually(lambda: emulator.held, "the pass's read of the workloads under way")
        await hand(emulator, "PATCH", f"{CHAT}/status", CLAIMED)
        state = memo["state"]
        await eventually(
            lambda: (state.bodies[NAMESPACE, "chat"].get("status") or {}).get("operator") == OTHER,
            "the other operator's claim seen here",
        )
        seen = len(list(emulator))
        emulator.released.set()  # the read answered: the pass goes on, with what it read
        await stopped_or_written(emulator, log, seen)
        assert writes_since(emulator, seen) == []
        assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in chat_env(emulator)
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER
        assert errors(log) == []
        # Its next pass (the spec changed again) leaves the resource to the other operator, and says so.
        await hand(emulator, "PATCH", CHAT, LOGS_OFF)
        await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        assert passes_writes(emulator, seen) == []
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER


@pytest.mark.usefixtures("monitoring")
async def test_a_handler_pass_under_way_when_another_operator_claims_the_resource_writes_nothing_more(
    emulator: Any, log: pytest.LogCaptureFixture
) -> None:
    """This operator serves "chat". Its spec changes, and while the pass of kopf's handler for it is under way (it
    has read the workloads), another operator that runs claims the resource. kopf holds the resource's events while
    its handler runs, so the claim reached this operator only once the pass had ended: the pass wrote its injection
    and a status naming this operator over the claim, and on a real API server the two operators then put their own
    settings back over each other's (four rollouts for one change of spec). The pass now reads the resource again
    before each write while kopf holds its events: it writes nothing, and says why."""
    served_here(emulator)
    other_operator(emulator, datetime.timedelta(seconds=5))
    async with running_operator():
        await ready(emulator)
        before = chat_env(emulator)
        assert "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" in before
        hold_workload_reads(emulator)
        await hand(emulator, "PATCH", CHAT, LOGS_OFF)
        await eventually(lambda: emulator.held, "the handler pass's read of the workloads under way")
        await hand(emulator, "PATCH", f"{CHAT}/status", CLAIMED)
        seen = len(list(emulator))
        emulator.released.set()  # the read answered: the pass goes on, with what it read
        await stopped_or_written(emulator, log, seen)
        assert passes_writes(emulator, seen) == []
        assert chat_env(emulator) == before
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER
        assert errors(log) == []
        # Its events delivered since, the resource is left to the other operator, which it says once.
        await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
        assert passes_writes(emulator, seen) == []
        assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER


async def claimed_while_held(emulator: Any, log: pytest.LogCaptureFixture, stopped: str) -> None:
    """The other operator claims the resource while a pass's read of the workloads is held, then the read is
    answered. Nothing is written over the claim (but kopf's record of the spec it handled), the Deployment stays as
    it was, the pass for ``stopped`` says it stopped and why, the status names the other operator, and one
    WatchedTwice event says that the resource is left to it."""
    await hand(emulator, "PATCH", f"{CHAT}/status", CLAIMED)
    before, seen = chat_env(emulator), len(list(emulator))
    emulator.released.set()
    await stopped_or_written(emulator, log, seen)
    assert passes_writes(emulator, seen) == []
    (event,) = await eventually(lambda: posted_events(emulator, "WatchedTwice"), "WatchedTwice event")
    assert OTHER in event["message"]
    assert any(r.getMessage().endswith(f"pass ({stopped}) {CLAIM_LOST}") for r in log.records)
    assert passes_writes(emulator, seen) == []
    assert chat_env(emulator) == before
    assert get(emulator, LLMT, "chat")["status"]["operator"] == OTHER
    assert errors(log) == []


async def handler_waiting(emulator: Any, memo: Any) -> None:
    """Change the spec while a pass of the operator's own holds the resource's lock: kopf's handler for the change
    waits for that pass, and kopf holds the resource's events (the claim below among them) until the handler ends."""
    await hand(emulator, "PATCH", CHAT, LOGS_OFF)
    await eventually(lambda: memo["state"].handling.get((NAMESPACE, "chat")), "kopf's handler waiting for the lock")


@pytest.mark.parametrize("own", ["workload", "resync"])
@pytest.mark.usefixtures("monitoring")
async def test_a_claim_during_an_own_pass_that_a_handler_waits_behind_stops_both(
    emulator: Any, log: pytest.LogCaptureFixture, own: str
) -> None:
    """This operator serves "chat". A pass of its own is under way (for a workload's event, or the resync), with the
    injection to put back (someone took it out of the Deployment), when the spec changes: kopf's handler waits
    behind that pass. Another operator that runs claims the resource meanwhile; kopf holds the claim's event until
    its handler ends, so the watch has not brought it here. A handler waiting counts as one running: the own pass
    reads the resource again before its first write, and stops, saying why. The passes waiting behind it find the
    claim and leave the resource to the other operator, which one WatchedTwice event says. Nothing is written over
    the claim, and no status names this operator after it."""
    served_here(emulator)
    other_operator(emulator, datetime.timedelta(seconds=5))
    resyncing = OperatorConfig(peering=PEERING, metrics_port=0, health="", resync_seconds=2)
    async with running_operator(resyncing if own == "resync" else None) as memo:
        await ready(emulator)
        hold_workload_reads(emulator)
        if own == "workload":
            await take_injection_out(emulator)
        await eventually(lambda: emulator.held, f"the {own} pass's read of the workloads under way")
        if own == "resync":
            # Taken out before the resync's read is answered: that pass has the injection to put back (a resync
            # with nothing to change writes nothing). The pass the Deployment's event asks for waits behind it too.
            await take_injection_out(emulator)
        await handler_waiting(emulator, memo)
        await claimed_while_held(emulator, log, stopped=own)


@pytest.mark.usefixtures("monitoring")
async def test_a_handler_that_waited_behind_an_own_pass_stops_at_a_claim_made_after_that_pass(
    emulator: Any, log: pytest.LogCaptureFixture
) -> None:
    """As above, but the claim comes once the own pass has ended (it put the injection back, as the resource was
    still this operator's), before the waiting handler's pass has read the workloads. The handler's pass starts from
    the body kopf gave it, which names this operator (kopf still holds the claim's event): it reads the resource again
    before its first write, writes nothing (the spec's change neither), and the resource is left to the other
    operator."""
    served_here(emulator)
    other_operator(emulator, datetime.timedelta(seconds=5))
    async with running_operator() as memo:
        await ready(emulator)
        hold_workload_reads(emulator)
        await take_injection_out(emulator)
        await eventually(lambda: emulator.held, "the workload pass's read of the workloads under way")
        await handler_waiting(emulator, memo)
        # The own pass's read answered; the handler's pass's (next) is held in turn.
        own, emulator.released = emulator.released, asyncio.Event()
        own.set()
        await eventually(lambda: emulator.held == 2, "the handler pass's read of the workloads under way")
        assert any(
            r.getMessage().endswith("reconciled (workload): ready, targets ['Deployment/chat']") for r in log.records
        )
        # Put back, with the spec the own pass began with.
        assert "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" in chat_env(emulator)
        await claimed_while_held(emulator, log, stopped="update")


@pytest.mark.usefixtures("monitoring")
async def test_a_handler_pass_is_not_stopped_by_a_lagging_cache_naming_another_operator(
    emulator: Any, log: pytest.LogCaptureFixture
) -> None:
    """Behind several API servers, one's cache may lag and still show an operator whose claim is over (this operator
    took the resource over since). A pass of kopf's handler that reads such a body before a write confirms it with a
    consistent list: the resource is this operator's, and the change of spec is applied."""
    served_here(emulator)
    other_operator(emulator, datetime.timedelta(seconds=5))
    async with running_operator():
        await ready(emulator)
        assert "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" in chat_env(emulator)
        stale = get(emulator, LLMT, "chat")
        stale["status"] = {**stale["status"], "operator": OTHER}
        lagging = {"kind": "LLMTelemetryList", "metadata": {"resourceVersion": "1"}, "items": [stale]}
        emulator[lambda request: by_name(request) and request.params.get("resourceVersion") == "0"] << 200 << lagging
        confirmed = len(consistent_reads(emulator))
        await hand(emulator, "PATCH", CHAT, LOGS_OFF)
        await eventually(
            lambda: (
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" not in chat_env(emulator)
                or any("stopped" in r.getMessage() for r in log.records)
            ),
            "the change of spec applied, or the pass stopped",
        )
        assert [r.getMessage() for r in log.records if "stopped" in r.getMessage()] == []
        assert "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT" not in chat_env(emulator)
        assert len(consistent_reads(emulator)) > confirmed
        await eventually(
            lambda: get(emulator, LLMT, "chat")["status"].get("observedGeneration") == 2, "the change's status"
        )
        assert get(emulator, LLMT, "chat")["status"]["operator"] == PEERING
