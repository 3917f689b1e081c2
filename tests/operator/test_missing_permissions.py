"""A permission the operator declares but the API server refuses it (a trimmed ClusterRole): the operator asks with
SelfSubjectAccessReviews, names each missing permission in one ERROR line, and a resource it may not patch (kopf's
finalizer patch refused, so no handler of ours runs for it) says so in its status and a Warning event, as far as
the operator may write those, instead of staying silently idle."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import aiohttp
import pytest
from kopf_testing import (
    LLMT,
    NAMESPACE,
    condition,
    eventually,
    get,
    minimal_llmt,
    posted_events,
    reported,
    running_operator,
)

from llm_telemetry_operator import access
from llm_telemetry_operator import constants as c
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ApiError
from llm_telemetry_operator.kube import KubeClient, Retry, server_configuration

PATCH = (c.GROUP, c.PLURAL, "patch", None)
STATUS = (c.GROUP, f"{c.PLURAL}/status", "patch", None)
EVENTS = ("", "events", "create", None)
HAND = {"X-Test-Hand": "1"}
NAMED = f"patch {c.PLURAL}.{c.GROUP} (cluster-wide)"


def refused(name: str) -> tuple[int, str, str]:
    """What RBAC answers a patch of ``name`` without the grant."""
    return (403, "Forbidden", f'{c.PLURAL}.{c.GROUP} "{name}" is forbidden: cannot patch resource "{c.PLURAL}"')


def errors_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]


def status_writes(emulator: Any, name: str) -> int:
    return sum(
        1
        for req in list(emulator)
        if req.method.value == "PATCH" and str(req.url.path).endswith(f"/{c.PLURAL}/{name}/status")
    )


@pytest.mark.parametrize(
    "also_missing",
    [(), (EVENTS,), (STATUS,)],
    ids=["status-and-event", "status-only", "event-only"],
)
async def test_a_resource_the_operator_may_not_patch_says_why(
    emulator: Any, caplog: pytest.LogCaptureFixture, also_missing: tuple[tuple[str, str, str, None], ...]
) -> None:
    emulator.unauthorized.update({PATCH, *also_missing})
    emulator.deny[(c.PLURAL, "chat")] = refused("chat")
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kopf.objects")  # kopf's retries of a refusal already named: DEBUG
    async with running_operator():
        await eventually(lambda: errors_naming(caplog, NAMED), "the ERROR naming the permission")
        if STATUS in also_missing:
            await eventually(lambda: posted_events(emulator, "Forbidden"), "the Forbidden event")
        else:
            found = await reported(emulator, c.CONDITION_READY, "Forbidden", "Ready False, Forbidden")
            assert found["status"] == "False"
            assert f"may not patch {c.PLURAL}.{c.GROUP}" in found["message"]
        # kopf keeps retrying its finalizer patch meanwhile; the resource is told once.
        await eventually(
            lambda: sum(1 for r in caplog.records if "Request attempt #3 failed" in r.getMessage()),
            "kopf's third attempt",
        )
    events = posted_events(emulator, "Forbidden")
    if EVENTS in also_missing:
        assert events == []
    else:
        assert len(events) == 1 and events[0]["type"] == "Warning", events
        assert f"may not patch {c.PLURAL}.{c.GROUP}" in events[0]["message"]
    if STATUS in also_missing:
        assert status_writes(emulator, "chat") == 0
        assert condition(get(emulator, LLMT, "chat"), c.CONDITION_READY) == {}
    else:
        assert status_writes(emulator, "chat") == 1
    (error,) = errors_naming(caplog, NAMED)
    assert "no pass runs for it" in error
    for missing in also_missing:
        assert f"{missing[2]} {missing[1]}" in error
    # kopf's retries of the refused patch: not an ERROR every time (every 30 s, for good, once past its first
    # delays), as the permission was named: one WARNING, the rest at DEBUG.
    retries = [r for r in caplog.records if "failed; will retry" in str(r.msg) and "/chat -> " in str(r.msg)]
    assert len(retries) >= 3, retries
    assert [r.levelno for r in retries if r.levelno > logging.DEBUG] == [logging.WARNING], retries
    assert f"for want of {NAMED}, already reported" in retries[0].getMessage()


def reviews(emulator: Any) -> int:
    """SelfSubjectAccessReviews the operator made."""
    return sum(1 for req in list(emulator) if str(req.url.path).endswith("/selfsubjectaccessreviews"))


def reviews_in(emulator: Any, namespace: str) -> int:
    """SelfSubjectAccessReviews the operator made of its grants in ``namespace`` (a Role's, in namespaced mode)."""
    return sum(
        1
        for req in list(emulator)
        if str(req.url.path).endswith("/selfsubjectaccessreviews")
        and isinstance(req.data, dict)
        and ((req.data.get("spec") or {}).get("resourceAttributes") or {}).get("namespace") == namespace
    )


async def create(emulator: Any, body: dict[str, Any]) -> None:
    """A resource created by a user, over HTTP, while the operator runs."""
    url = f"{str(emulator.url).rstrip('/')}/apis/{c.GROUP}/{c.VERSION}/namespaces/{NAMESPACE}/{c.PLURAL}"
    async with aiohttp.ClientSession() as session:
        headers = {**HAND, "Content-Type": "application/json"}
        async with session.post(url, data=json.dumps(body), headers=headers) as rsp:
            assert rsp.status < 400, await rsp.text()


async def started(caplog: pytest.LogCaptureFixture) -> None:
    """Wait until kopf says the operator's startup handler (and so its first permission check) is done."""
    await eventually(lambda: any("Activity 'startup' succeeded" in r.getMessage() for r in caplog.records), "up")


#: An operator that checks its permissions again every second (at each resync).
RESYNC_EVERY_SECOND = OperatorConfig(peering="test-peering", metrics_port=0, health="", resync_seconds=1)


async def create_named(emulator: Any, name: str) -> None:
    await create(emulator, {**minimal_llmt(name), "metadata": {"name": name, "namespace": NAMESPACE}})


async def served(emulator: Any, name: str) -> None:
    """Wait until a pass of the resource's own has set its Ready condition to something other than Forbidden."""
    await eventually(
        lambda: condition(get(emulator, LLMT, name), c.CONDITION_READY).get("reason") not in (None, "Forbidden"),
        "a pass of its own",
    )


async def test_a_permission_check_the_api_server_leaves_unanswered_holds_up_neither_the_startup_nor_the_passes(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Every review hangs (a hung authorization webhook) for longer than the liveness probe waits: the operator starts
    # all the same and serves the resource, and says what the check finds once the answers come.
    emulator.reviews_held = asyncio.Event()
    emulator.unauthorized.add(STATUS)
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    caplog.set_level(logging.INFO)
    async with running_operator():
        await started(caplog)
        await served(emulator, "chat")
        assert any("has not answered this operator's permission check" in r.getMessage() for r in caplog.records)
        assert not errors_naming(caplog, "llmtelemetries/status")
        emulator.reviews_held.set()
        await eventually(lambda: errors_naming(caplog, "llmtelemetries/status"), "the ERROR once the reviews answer")


async def test_a_permission_check_whose_answers_keep_coming_is_waited_for_and_raises_no_alarm(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Each review answered, but slowly (an API server far away, or many watched namespaces): the whole check takes
    # longer than the startup waits for a review's answer. A check that goes on is no hung one: no WARNING, and its
    # finding is said before kopf starts its watches, as the docs promise.
    emulator.review_delay = 2.5  # three rounds of reviews: 7.5 s
    emulator.unauthorized.add(STATUS)
    caplog.set_level(logging.INFO)
    async with running_operator():
        await started(caplog)
        messages = [r.getMessage() for r in caplog.records]
        assert not [m for m in messages if "has not answered this operator's permission check" in m]
        up = next(i for i, m in enumerate(messages) if "Activity 'startup' succeeded" in m)
        assert [m for m in messages[:up] if "llmtelemetries/status" in m], messages[:up]
    assert reviews(emulator) == len(access.needed(OperatorConfig(peering="test-peering")))


async def test_a_check_whose_reviews_go_unanswered_asks_no_more_once_one_has_failed(emulator: Any) -> None:
    # Reviews the API server leaves unanswered fail at the client's read timeout, a few at a time: the first
    # failure fails the check, and the reviews not yet asked are not asked (each round would cost another timeout).
    emulator.reviews_held = asyncio.Event()
    client = KubeClient(server_configuration(str(emulator.url)), timeout=(2, 0.5))
    try:
        with pytest.raises(ApiError):
            await access.missing(client, OperatorConfig(peering="test-peering"))
        assert reviews(emulator) == access.REVIEWS_AT_ONCE
    finally:
        emulator.reviews_held.set()
        await client.close()


async def test_a_check_fails_with_its_first_failure_not_one_that_came_later(emulator: Any) -> None:
    # One review of the first round fails at once (a webhook's error); the ones before it are held, and fail later
    # at the client's read timeout: the check fails with the first error, the one that stopped it.
    config = OperatorConfig(peering="test-peering")
    last = access.needed(config)[access.REVIEWS_AT_ONCE - 1]
    emulator.reviews_held = asyncio.Event()
    emulator.reviews_failing[(last.api_group, last.resource, last.verb, last.namespace)] = (400, "BadRequest", "no")
    client = KubeClient(server_configuration(str(emulator.url)), timeout=(2, 0.5))
    try:
        with pytest.raises(ApiError) as raised:
            await access.missing(client, config)
        assert raised.value.status == 400, raised.value
        assert reviews(emulator) == access.REVIEWS_AT_ONCE
    finally:
        emulator.reviews_held.set()
        await client.close()


#: A process that asks one review, waits for a line on its stdin, closes its client and ends (a read timeout of 10
#: minutes: the exit must not wait for it).
ASK_AND_CLOSE = """
import asyncio, sys
from llm_telemetry_operator.kube import KubeClient, Retry, server_configuration

async def main():
    client = KubeClient(server_configuration(sys.argv[1]), timeout=(5, 600))
    asked = asyncio.ensure_future(client.review({"group": "", "resource": "pods", "verb": "get"}))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await client.close()
    asked.cancel()

asyncio.run(main())
"""


async def test_a_review_left_unanswered_does_not_hold_the_exit_up(emulator: Any) -> None:
    # The operator stopped (SIGTERM) while a review waits for an answer that does not come: its clean-up closes the
    # client, and the process ends then, not at the review's read timeout (the kubelet kills it after 30 s).
    emulator.reviews_held = asyncio.Event()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ASK_AND_CLOSE, str(emulator.url), stdin=asyncio.subprocess.PIPE
    )
    try:
        await eventually(lambda: reviews(emulator) == 1, "the review asked")
        assert process.stdin is not None
        process.stdin.write(b"stop\n")
        await process.stdin.drain()
        assert await asyncio.wait_for(process.wait(), timeout=120) == 0
    finally:
        emulator.reviews_held.set()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_no_periodic_check_runs_beside_a_first_check_still_waiting_for_its_answers(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The first check hangs past several resync intervals: the periodic check does not start another beside it
    # (two checks at once would have their findings said in whichever order their answers came, the older last).
    emulator.reviews_held = asyncio.Event()
    caplog.set_level(logging.DEBUG)
    async with running_operator(RESYNC_EVERY_SECOND):
        await started(caplog)
        await eventually(
            lambda: (
                sum(1 for r in caplog.records if "last check is still under way" in r.getMessage()) >= 3
                or reviews(emulator) > access.REVIEWS_AT_ONCE
            ),
            "three periodic checks put off, or another check begun",
        )
        assert reviews(emulator) == access.REVIEWS_AT_ONCE  # the first check's first round, unanswered
        emulator.reviews_held.set()
        await eventually(lambda: reviews(emulator) > len(access.needed(RESYNC_EVERY_SECOND)), "a periodic check")


async def test_a_permission_taken_away_while_the_operator_runs_is_noticed_and_so_is_its_return(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = RESYNC_EVERY_SECOND
    async with running_operator(config):
        await started(caplog)
        assert not errors_naming(caplog, NAMED)
        emulator.unauthorized.add(PATCH)
        emulator.deny[(c.PLURAL, "late")] = refused("late")
        await eventually(lambda: errors_naming(caplog, NAMED), "the ERROR naming the permission")
        await create_named(emulator, "late")
        await reported(emulator, c.CONDITION_READY, "Forbidden", "late: Ready False, Forbidden", name="late")
        # Another whole check since, which finds the same permission missing: no second ERROR for it.
        asked = reviews(emulator)
        await eventually(lambda: reviews(emulator) >= asked + len(access.needed(config)), "another check")
        emulator.unauthorized.clear()
        emulator.deny.clear()
        await eventually(
            lambda: any("every permission it needs again" in r.getMessage() for r in caplog.records),
            "the permission seen back",
        )
        await eventually(
            lambda: c.FINALIZER in ((get(emulator, LLMT, "late") or {}).get("metadata") or {}).get("finalizers", []),
            "kopf's finalizer added at its next retry",
        )
        await served(emulator, "late")
    assert len(errors_naming(caplog, NAMED)) == 1


async def test_a_resource_created_once_the_permission_is_back_is_not_told_it_is_forbidden(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The last check (at startup; the next one is a resync interval away) found patch missing; it is granted again
    # before the resource is created, so kopf's finalizer patch goes through and the resource is served.
    emulator.unauthorized.add(PATCH)
    caplog.set_level(logging.INFO)
    async with running_operator():
        await eventually(lambda: errors_naming(caplog, NAMED), "the ERROR naming the permission")
        emulator.unauthorized.clear()
        await create_named(emulator, "back")
        await served(emulator, "back")
    assert posted_events(emulator, "Forbidden") == []
    assert status_writes(emulator, "back") >= 1


async def test_a_resource_seen_before_the_check_found_patch_missing_is_told_by_the_next_check(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Refused after the last check said all was granted: the watch-event handler ran for the new resource with
    # nothing known missing, and kopf's finalizer patch is retried with no new watch event. The next check tells it.
    caplog.set_level(logging.INFO)
    config = RESYNC_EVERY_SECOND
    async with running_operator(config):
        await started(caplog)
        emulator.deny[(c.PLURAL, "early")] = refused("early")
        await create_named(emulator, "early")
        await eventually(
            lambda: any(
                req.method.value == "PATCH" and str(req.url.path).endswith(f"/{c.PLURAL}/early")
                for req in list(emulator)
            ),
            "kopf's finalizer patch tried (and refused)",
        )
        emulator.unauthorized.add(PATCH)
        found = await reported(emulator, c.CONDITION_READY, "Forbidden", "early: Ready False, Forbidden", name="early")
        assert found["status"] == "False"
    events = posted_events(emulator, "Forbidden")
    assert len(events) == 1 and events[0]["type"] == "Warning", events


def test_in_namespaced_mode_the_periodic_check_asks_only_about_the_cluster_wide_grants() -> None:
    """A Role's permissions are asked about in each watched namespace at startup only: every resync interval, 34
    reviews a namespace (6,811 for 200 namespaces) would come in a burst. The cluster-wide ones, ``patch`` on the
    resources (whose loss leaves a new one idle) among them, are asked about every time."""
    namespaces = ("team-a", "team-b", "team-c")
    config = OperatorConfig(peering="test-peering", metrics_port=0, health="", namespaces=namespaces)
    every = access.needed(config)
    periodic = access.needed(config, namespaced=False)
    assert {grant.namespace for grant in periodic} == {None}
    assert (c.GROUP, c.PLURAL, "patch") in {(g.api_group, g.resource, g.verb) for g in periodic}
    assert periodic == [grant for grant in every if grant.namespace is None]
    per_namespace = [grant for grant in every if grant.namespace is not None]
    assert per_namespace and {grant.namespace for grant in per_namespace} == set(namespaces)


async def test_a_refusal_the_last_check_did_not_find_stays_an_error_and_is_named(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A permission taken away after a check (a ClusterRole or Role changed while the operator runs, long before its
    next periodic check): kopf's first refused attempt is an ERROR, as a new failure should be, and has the
    permissions asked about again, which names the one missing and tells the resource; kopf's further retries of it
    are then no ERROR."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kopf.objects")
    config = OperatorConfig(peering="test-peering", metrics_port=0, health="", resync_seconds=600)
    async with running_operator(config):
        await started(caplog)
        emulator.unauthorized.add(PATCH)
        emulator.deny[(c.PLURAL, "late")] = refused("late")
        await create_named(emulator, "late")
        await eventually(lambda: errors_naming(caplog, NAMED), "the ERROR naming the permission")
        await reported(emulator, c.CONDITION_READY, "Forbidden", "late: Ready False, Forbidden", name="late")
        await eventually(
            lambda: sum(1 for r in caplog.records if "Request attempt #4 failed" in r.getMessage()), "more retries"
        )
    retries = [r for r in caplog.records if "failed; will retry" in str(r.msg) and "/late -> " in str(r.msg)]
    named = next(i for i, r in enumerate(caplog.records) if r.levelno == logging.ERROR and NAMED in r.getMessage())
    assert retries[0].levelno == logging.ERROR, retries
    later = [r for r in retries if caplog.records.index(r) > named]
    assert later and all(r.levelno < logging.ERROR for r in later), later


async def test_a_roles_verb_taken_away_in_namespaced_mode_is_named_and_its_return_noticed(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Namespaced mode: the periodic check asks only about the cluster-wide grants (a Role's, 34 reviews a namespace,
    at startup). A verb taken off a watched namespace's Role while the operator runs shows in the resource's status
    (InjectionFailed, the API server's refusal); the refusal also has the permissions in that namespace asked about
    again, which names the one missing, and the next periodic checks ask there too, so that its return is said."""
    from kopf_testing import DEPLOYMENTS, deployment

    caplog.set_level(logging.INFO)
    config = OperatorConfig(
        peering="test-peering", metrics_port=0, health="", resync_seconds=1, namespaces=(NAMESPACE,)
    )
    named = f"patch deployments.apps (in namespace {NAMESPACE})"
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    async with running_operator(config):
        await started(caplog)
        assert not [r for r in caplog.records if r.levelno == logging.ERROR]
        emulator.unauthorized.add(("apps", "deployments", "patch", NAMESPACE))
        emulator.deny[("deployments", "chat")] = (
            403,
            "Forbidden",
            'deployments.apps "chat" is forbidden: cannot patch resource "deployments" in API group "apps"',
        )
        await create_named(emulator, "chat")
        await reported(emulator, c.CONDITION_INJECTED, "InjectionFailed", "Injected False, InjectionFailed")
        await eventually(lambda: errors_naming(caplog, named), "the ERROR naming the Role's permission")
        emulator.unauthorized.clear()
        emulator.deny.clear()
        await eventually(
            lambda: any("every permission it needs again" in r.getMessage() for r in caplog.records),
            "the INFO line saying it is granted again",
        )
        await reported(emulator, c.CONDITION_INJECTED, "Injected", "Injected again")
    assert len(errors_naming(caplog, named)) == 1


async def test_a_deletion_the_operator_may_not_finish_says_how_to_get_out(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``patch`` on the resources taken away once a resource has the finalizer: its deletion runs the clean-up, and
    kopf's removal of the finalizer is refused (retried every 30 s, for good), so ``kubectl delete`` waits. A
    Warning event (and an ERROR line) says so, once, and how to get out: grant it, or take the finalizer off by hand.
    Granted again, the deletion finishes."""
    from kopf_testing import DEPLOYMENTS, deployment
    from test_operator_kmock import env_of, hand

    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    config = OperatorConfig(peering="test-peering", metrics_port=0, health="", resync_seconds=600)
    async with running_operator(config):
        await started(caplog)
        await create_named(emulator, "chat")
        await eventually(lambda: "LLM_TELEMETRY_METRICS_PORT" in env_of(get(emulator, DEPLOYMENTS, "chat")), "injected")
        emulator.unauthorized.add(PATCH)
        emulator.deny[(c.PLURAL, "chat")] = refused("chat")
        await hand(emulator, "DELETE", f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{NAMESPACE}/{c.PLURAL}/chat")
        (event,) = await eventually(lambda: posted_events(emulator, "Forbidden"), "the Forbidden event")
        assert event["type"] == "Warning"
        assert "cannot take its finalizer off and the deletion waits" in event["message"], event["message"]
        assert f"kubectl -n {NAMESPACE} patch llmt chat --type=merge" in event["message"]
        assert "LLM_TELEMETRY_METRICS_PORT" not in env_of(get(emulator, DEPLOYMENTS, "chat"))  # cleaned up
        assert get(emulator, LLMT, "chat")["metadata"]["deletionTimestamp"]
        emulator.unauthorized.clear()
        emulator.deny.clear()
        await eventually(lambda: get(emulator, LLMT, "chat") is None, "gone once granted again")
    assert len(posted_events(emulator, "Forbidden")) == 1


async def test_a_pass_refused_by_an_admission_step_starts_no_permission_check(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A 403 that is no permission's (a ResourceQuota exceeded for Services; a webhook would read the same) fails the
    pass and is reported, as any refusal is, but has no check of the permissions made: none would find anything,
    and a quota that stays exceeded would have 34 reviews and more asked every minute for as long as it lasts."""
    from kopf_testing import DEPLOYMENTS, deployment

    caplog.set_level(logging.INFO)
    config = OperatorConfig(
        peering="test-peering", metrics_port=0, health="", resync_seconds=1, namespaces=(NAMESPACE,)
    )
    quota = "exceeded quota: q, requested: services=1, used: services=0, limited: services=0"
    emulator.deny[("services", "chat-llm-metrics")] = (
        403,
        "Forbidden",
        f'services "chat-llm-metrics" is forbidden: {quota}',
    )
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    async with running_operator(config):
        await started(caplog)
        asked = reviews_in(emulator, NAMESPACE)  # the Role's grants, at startup
        assert asked
        await create_named(emulator, "chat")
        await eventually(lambda: quota in json.dumps(get(emulator, LLMT, "chat")), "the refusal in the status")
        # Passes retried (a second a resync, so a retry within one): each meets the quota again.
        await eventually(
            lambda: sum("reconciled (retry)" in r.getMessage() for r in caplog.records) >= 3, "three retries"
        )
    # (The periodic check, every second here, asks about the cluster-wide grants only.)
    assert reviews_in(emulator, NAMESPACE) == asked
    assert not errors_naming(caplog, "permission(s) it needs")


async def test_a_refusal_met_while_a_check_that_does_not_ask_there_is_under_way_has_that_namespace_asked_after_it(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Namespaced mode: the periodic check asks only about the cluster-wide grants. A call refused in a watched
    namespace while such a check is under way (its reviews slow to come) started no check there: the one under way
    was taken for it. The refusal seen once (the verb back on the call, not in the reviews: the call is not made
    again), its namespace was never asked about, and the missing permission never named. Now it is asked about
    once the check under way is done."""
    from kopf_testing import DEPLOYMENTS, deployment

    caplog.set_level(logging.INFO)
    config = OperatorConfig(
        peering="test-peering", metrics_port=0, health="", resync_seconds=1, namespaces=(NAMESPACE,)
    )
    named = f"patch deployments.apps (in namespace {NAMESPACE})"
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    async with running_operator(config):
        await started(caplog)
        await periodic_check_held(emulator)
        in_namespace = reviews_in(emulator, NAMESPACE)
        emulator.unauthorized.add(("apps", "deployments", "patch", NAMESPACE))
        emulator.deny[("deployments", "chat")] = (
            403,
            "Forbidden",
            'deployments.apps "chat" is forbidden: cannot patch resource "deployments" in API group "apps"',
        )
        await create_named(emulator, "chat")
        await reported(emulator, c.CONDITION_INJECTED, "InjectionFailed", "Injected False, InjectionFailed")
        assert reviews_in(emulator, NAMESPACE) == in_namespace  # (the check under way does not ask there)
        emulator.deny.clear()
        emulator.reviews_held.set()
        await eventually(lambda: errors_naming(caplog, named), "the ERROR naming the Role's permission")
        assert reviews_in(emulator, NAMESPACE) > in_namespace


#: A Role's verb in the watched namespace, as a review names it, and as the ERROR line names it.
ROLE_PATCH = ("apps", "deployments", "patch", NAMESPACE)
ROLE_NAMED = f"patch deployments.apps (in namespace {NAMESPACE})"
#: What RBAC answers the operator's patch of the Deployment "chat" without that verb.
DEPLOYMENT_REFUSED = (
    403,
    "Forbidden",
    'deployments.apps "chat" is forbidden: cannot patch resource "deployments" in API group "apps"',
)


def reviews_of(emulator: Any, key: tuple[str, str, str, str | None]) -> int:
    """SelfSubjectAccessReviews the operator made of one permission (``key`` as in ``emulator.unauthorized``)."""
    group, resource, verb, namespace = key
    plural, _, subresource = resource.partition("/")
    wanted = {"group": group, "resource": plural, "verb": verb}
    wanted |= {"subresource": subresource} if subresource else {}
    wanted |= {"namespace": namespace} if namespace else {}
    return sum(
        1
        for req in list(emulator)
        if str(req.url.path).endswith("/selfsubjectaccessreviews")
        and isinstance(req.data, dict)
        and ((req.data.get("spec") or {}).get("resourceAttributes") or {}) == wanted
    )


async def periodic_check_held(emulator: Any) -> None:
    """Once the first check has asked about the Role, wait for a periodic check to start, its answers held (until
    ``emulator.reviews_held`` is set)."""
    await eventually(lambda: reviews_in(emulator, NAMESPACE) > 0, "the first check asks about the Role")
    emulator.reviews_held = asyncio.Event()
    asked = reviews(emulator)
    await eventually(lambda: reviews(emulator) > asked, "a periodic check under way, its answers held")


def deployment_patches(emulator: Any) -> int:
    return sum(
        1 for req in list(emulator) if req.method.value == "PATCH" and str(req.url.path).endswith("/deployments/chat")
    )


async def test_a_refusal_met_soon_after_a_recheck_has_its_check_in_its_turn(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Namespaced mode: refusals the last check did not explain start a check at most once every
    access_recheck_seconds. One met sooner after the last such check (a verb taken off the Role just then) started
    none and was dropped: where the refused call was not made again, the permission was never named, nor its
    namespace asked about again (the periodic check asks about the cluster-wide grants only). Now that check waits
    for its turn: one check, however many refusals meanwhile. And as the periodic checks skip while it waits, it
    asks what they ask too (where a grant was last found missing): with refusals that kept coming, each starting
    the next such check, a grant given back there went unnoticed until a periodic check fell between two of them
    (they are 600 s apart here: only that check can notice it). The interval is a minute in the operator; 15 s here,
    three times the longest wait before a failed pass's first retry (schedule.RETRY_BASE), so that the retry below
    is refused well within it: what is tested is what a refusal met that soon starts, not the minute."""
    from kopf_testing import DEPLOYMENTS, deployment

    from llm_telemetry_operator.config import Timers
    from llm_telemetry_operator.schedule import RETRY_BASE

    caplog.set_level(logging.INFO)
    other = "other"
    other_patch, other_named = ("apps", "deployments", "patch", other), f"patch deployments.apps (in namespace {other})"
    recheck = 3 * RETRY_BASE
    config = OperatorConfig(
        peering="test-peering",
        metrics_port=0,
        health="",
        resync_seconds=600,
        namespaces=(NAMESPACE, other),
        timers=Timers(access_recheck_seconds=recheck),
    )
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.unauthorized.add(other_patch)
    async with running_operator(config):
        await started(caplog)
        await eventually(lambda: errors_naming(caplog, other_named), "the ERROR naming the other namespace's")
        # A refusal no review explains (every one allows it: an authorizer's cache behind, say): a check there now.
        emulator.deny[("deployments", "chat")] = DEPLOYMENT_REFUSED
        await create_named(emulator, "chat")
        await eventually(lambda: reviews_of(emulator, ROLE_PATCH) == 2, "the check the refusal started asks there")
        # The verb taken off the Role right after: the pass's retry, within the interval, is refused for want of it,
        # and the call is then let through (a call not made again, as for a workload deleted meanwhile). The other
        # namespace's grant is given back meanwhile.
        emulator.unauthorized.add(ROLE_PATCH)
        emulator.unauthorized.discard(other_patch)
        refused_before = deployment_patches(emulator)
        await eventually(lambda: deployment_patches(emulator) > refused_before, "the pass's retry refused")
        emulator.deny.clear()
        await eventually(
            lambda: errors_naming(caplog, ROLE_NAMED),
            "the ERROR naming the Role's permission",
            attempts=int((recheck + 30) / 0.05),
        )
        assert reviews_of(emulator, ROLE_PATCH) == 3
        assert reviews_of(emulator, other_patch) == 2
    named = errors_naming(caplog, ROLE_NAMED)
    assert len(named) == 1
    assert other_named not in named[0]


async def test_a_namespace_a_failed_check_was_to_ask_about_is_asked_about_by_the_periodic_checks(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Namespaced mode: a call refused in a watched namespace while a check that does not ask there is under way has
    that namespace asked about once that check is done. That check failing (its reviews answered with an error by an
    authorization webhook, or with none at all) dropped the namespace: the refused call not made again, the
    permission was never named, as the periodic checks ask about the cluster-wide grants only. Now they ask there
    too, until a check has its answers."""
    from kopf_testing import DEPLOYMENTS, deployment

    caplog.set_level(logging.INFO)
    config = OperatorConfig(
        peering="test-peering", metrics_port=0, health="", resync_seconds=1, namespaces=(NAMESPACE,)
    )
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    # The operator's client, its retries of a 500 as many, their waits (half a second doubling: 8-15 s in all) short:
    # what is tested is what follows the failed check, not the client's backoff.
    client = KubeClient(peering=config.peering, retry=Retry(base=0.01))
    async with running_operator(config, client=client):
        await started(caplog)
        await periodic_check_held(emulator)
        emulator.unauthorized.add(ROLE_PATCH)
        emulator.deny[("deployments", "chat")] = DEPLOYMENT_REFUSED
        await create_named(emulator, "chat")
        await reported(emulator, c.CONDITION_INJECTED, "InjectionFailed", "Injected False, InjectionFailed")
        emulator.deny.clear()
        emulator.reviews_failing[ROLE_PATCH] = (500, "InternalError", 'failed calling webhook "authz": timeout')
        emulator.reviews_held.set()
        await eventually(
            lambda: any("could not ask the API server which permissions" in r.getMessage() for r in caplog.records),
            "the check asking there failed",
            attempts=900,  # (the client retries a 500 a few times first)
        )
        failed = reviews_of(emulator, ROLE_PATCH)
        del emulator.reviews_failing[ROLE_PATCH]
        await eventually(lambda: errors_naming(caplog, ROLE_NAMED), "the ERROR naming the Role's permission")
        assert reviews_of(emulator, ROLE_PATCH) > failed
