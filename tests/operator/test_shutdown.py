"""``llm-telemetry-operator`` as a process: SIGTERM (what Kubernetes sends a pod) while it is busy ends it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kopf
import pytest
from kopf._cogs.structs.references import Insights  # kopf.operator's ``insights``, which kopf does not re-export
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    PEERING,
    SERVICES,
    condition,
    deployment,
    eventually,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    ready,
    running_operator,
)

from llm_telemetry_operator import handlers
from llm_telemetry_operator.__main__ import kopf_options
from llm_telemetry_operator.config import OperatorConfig

#: What kopf says of a failed startup it will call again.
RETRY_SAID = f"will try again in {handlers.STARTUP_RETRY_SECONDS} seconds"


async def test_sigterm_while_busy_exits_cleanly(emulator: Any, monitoring_crds: Any) -> None:
    """Resources still arriving, passes and resyncs running (1 s interval): SIGTERM ends the process with exit
    code 0 and no traceback (a per-resource daemon started during shutdown used to end it in a TimeoutError)."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    names = [f"r{i}" for i in range(12)]
    for name in names:
        emulator.objects[DEPLOYMENTS, NAMESPACE, name] = deployment(name, labels={"app": name})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_telemetry_operator", "--standalone", "--log-format", "text",
        "--metrics-port", "0", "--health", "", "--resync-seconds", "1",
        env={**os.environ}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output = asyncio.ensure_future(process.stdout.read())
    try:
        for name in names[:6]:
            emulator.objects[LLMT, NAMESPACE, name] = minimal_llmt(name, selector={"matchLabels": {"app": name}})
        await eventually(
            lambda: condition(get(emulator, LLMT, "r0"), "Ready").get("status") == "True", "first Ready", attempts=600
        )
        # More resources while the first ones resync; then the pod is told to stop.
        for name in names[6:]:
            emulator.objects[LLMT, NAMESPACE, name] = minimal_llmt(name, selector={"matchLabels": {"app": name}})
        await asyncio.sleep(1.5)
        # Watch events keep coming while it stops: labels edited on every resource, again and again.
        churn = asyncio.ensure_future(_churn(emulator, names))
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=60)
        churn.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = (await output).decode(errors="replace")
    assert code == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "TimeoutError" not in text, text[-4000:]


async def _churn(emulator: Any, names: list[str]) -> None:
    base = f"{str(emulator.url).rstrip('/')}/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
    async with aiohttp.ClientSession() as session:
        for round_ in itertools.count():
            for name in names:
                url = f"{base}/{name}"
                body = json.dumps({"metadata": {"labels": {"round": str(round_)}}})
                headers = {"Content-Type": "application/merge-patch+json", "X-Test-Hand": "1"}
                async with session.patch(url, data=body, headers=headers) as rsp:
                    await rsp.read()
            await asyncio.sleep(0.05)


async def test_a_stop_during_kopfs_first_scan_of_the_api_groups_ends_without_an_error(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """kopf reads each API group version of its first scan in a task of its own that its stop does not cancel: the
    operator stopped while one is under way had kopf close its session under it (``Connector is closed``, logged at
    ERROR and raised by kopf.operator as it ends). The cleanup cancels those reads, found by the module kopf keeps
    them in: this runs where no cluster does (CI), so a kopf that moves them elsewhere fails here too."""
    caplog.set_level(logging.DEBUG)
    group_version = "/apis/llmtelemetry.dev/v1alpha1"
    emulator.holds = lambda request: request.method == "GET" and request.path.rstrip("/") == group_version
    try:
        async with running_operator():
            await eventually(lambda: emulator.held > 0, "kopf's scan reading the operator's group version")
    finally:
        emulator.released.set()
    assert "Connector is closed" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_failed_startup_leaves_nothing_running_until_kopf_tries_it_again(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """kopf calls a startup handler that raised again after its backoff, and the next attempt starts
    everything anew on a new state: what the failed one had started (its schedule, permission check, heartbeat and
    standby watch) ran on beside the next attempt's, two of each for the operator's life. Here the metrics port is
    taken, the startup's last step that can fail."""
    async with _after_a_failed_startup(emulator, caplog, resync_seconds=1):
        left = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("llm-telemetry-"))
        assert left == []


async def test_a_failed_startup_leaves_no_write_of_the_watched_namespaces_running(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The startup's read of the peering object starts the write of the watched namespaces on it, in a task of its own.
    A failed startup stopped its other tasks, not that one: on an API server slow to answer it (held here) it ran on
    beside kopf's backoff and the next attempt's own write, and past the operator's end if stopped in that backoff.
    (Whether the write had reached the emulator by the failure varies: the task is left running either way, waiting
    for its held answer or for a thread of the client to send it.)"""
    emulator.holds = lambda request: request.method == "PATCH" and "/clusterkopfpeerings/" in request.path
    try:
        async with _after_a_failed_startup(emulator, caplog, resync_seconds=3600):
            left = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("llm-telemetry-"))
            assert left == []
    finally:
        emulator.released.set()


async def test_after_a_failed_startup_the_next_attempt_serves_and_stops_cleanly(
    emulator: Any, monitoring_crds: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The attempt after a failed one (after kopf's backoff, STARTUP_RETRY_SECONDS: this test waits it out) runs on
    a state of its own, with one schedule, permission check, heartbeat and standby watch, and serves: the failed
    attempt's stop (its state marked stopping) must not reach it, or the passes started by watch events (a child
    deleted by hand) would never run. The resync is an hour, so that only such a pass can put the child back."""
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    async with _after_a_failed_startup(emulator, caplog, resync_seconds=3600) as taken:
        taken.close()  # free for the next attempt
        await ready(emulator, what="Ready after kopf's retry of the startup", attempts=2400)
        running = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("llm-telemetry-"))
        assert running == [
            "llm-telemetry-access",
            "llm-telemetry-heartbeat",
            "llm-telemetry-schedule",
            "llm-telemetry-standby",
        ]
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics"), "the metrics Service made")
        url = f"{str(emulator.url).rstrip('/')}/api/v1/namespaces/{NAMESPACE}/services/chat-llm-metrics"
        async with aiohttp.ClientSession() as session:
            async with session.delete(url, headers={"X-Test-Hand": "1"}) as rsp:
                assert rsp.status < 400, await rsp.text()
        await eventually(lambda: get(emulator, SERVICES, "chat-llm-metrics"), "the metrics Service put back")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [m for m in errors if f"{RETRY_SAID}: [Errno 98]" not in m] == []


@contextlib.asynccontextmanager
async def _after_a_failed_startup(
    emulator: Any, caplog: pytest.LogCaptureFixture, resync_seconds: float
) -> AsyncIterator[socket.socket]:
    """The operator running (one LLMTelemetry and its Deployment stored) once its startup has failed: its metrics
    port is taken by the socket yielded (listening on all of IPv6 and IPv4), closed at the end of the block."""
    caplog.set_level(logging.INFO)
    taken = _taken_port()
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    config = OperatorConfig(
        peering=PEERING, metrics_port=taken.getsockname()[1], health="", resync_seconds=resync_seconds
    )
    try:
        async with running_operator(config):
            await eventually(
                lambda: any("will try again" in r.getMessage() for r in caplog.records), "the startup failed"
            )
            yield taken
    finally:
        taken.close()


async def test_a_pass_ending_as_the_cleanup_begins_starts_no_watch(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The cleanup stops the watches, then cancels the passes started by watch events, and the schedule's passes only
    after that: a scheduled pass ending in between, having found a collector Service missing, started a watch of it
    that nothing stopped. Its thread listed with the client still open, then went on past the cleanup, retrying on the
    closed client with a WARNING each time. Here what a pass does as it ends is done as the cleanup begins: the
    operator's record that the resource waits for a collector it did not wait for before."""
    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    collector = ("observability", "tempo")
    async with running_operator() as memo:
        await eventually(lambda: condition(get(emulator, LLMT, "chat"), "Ready"), "a first pass")
        state = memo["state"]
        ending = asyncio.ensure_future(_ending_as_the_cleanup_begins(memo, state, (NAMESPACE, "chat"), collector))
    await ending
    watching = [t.name for t in threading.enumerate() if t.name.startswith("watch-services-tempo-")]
    for watch in state.collector_watches.values():
        watch.stop()
    asked = [str(r.url) for r in list(emulator) if r.params.get("fieldSelector") == "metadata.name=tempo"]
    assert watching == [] and asked == [], (watching, asked)
    assert not [r.getMessage() for r in caplog.records if "the client is closed" in r.getMessage()]


async def _ending_as_the_cleanup_begins(
    memo: Any, state: handlers.OperatorState, key: tuple[str, str], collector: tuple[str, str]
) -> None:
    """Once the cleanup has begun (checked at every turn of the loop), what a pass ending then records: ``key`` waits
    for ``collector``."""
    await _turn_by_turn(lambda: state.stopping)
    handlers._await_collectors(memo, state, key, frozenset({collector}))


async def test_a_stop_while_a_failed_startup_stops_its_tasks_stops_the_operator(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed startup stops what it started, awaiting each task's end, before kopf retries it. A stop (SIGTERM)
    arriving then reached the startup as the cancellation of one of those awaits, which took it for that task's own:
    the startup's failure was raised as if no stop had come, and kopf waited its backoff and ran the startup
    again instead of stopping (in a pod, until the kubelet killed it). The stop flag is raised as the failed startup's
    stop begins, then one loop turn later at each attempt, until it lands once that stop is done (kopf then says it
    will try again, and the stop cuts its backoff short): every turn of the window, however many turns kopf takes to
    pass the flag on, and at least one of them (the metrics port taken, as in _after_a_failed_startup)."""
    caplog.set_level(logging.INFO)
    taken = _taken_port()
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    config = OperatorConfig(peering=PEERING, metrics_port=taken.getsockname()[1], health="", resync_seconds=3600)
    told = 0
    try:
        for turns in range(50):
            caplog.clear()
            options = kopf_options(config)
            memo, stop = options["memo"], asyncio.Event()
            task = asyncio.create_task(kopf.operator(stop_flag=stop, insights=Insights(), **options))
            await _turn_by_turn(functools.partial(_stopping, memo))  # the failed startup begins its stop
            for _ in range(turns):
                await asyncio.sleep(0)
            stop.set()
            # Stopped: not held by kopf's backoff, after which it would run the startup again.
            await asyncio.wait_for(task, timeout=30)
            left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("llm-telemetry-")]
            assert left == [], (turns, left)
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            if any(RETRY_SAID in r.getMessage() for r in errors):
                break  # past the window: the failure was raised, and the stop came in kopf's backoff
            # The stop came while the startup stopped its tasks: its failure is said all the same, with its cause.
            assert [r.getMessage() for r in errors] == [
                f"the startup failed as the operator was told to stop ([Errno {errno.EADDRINUSE}] "
                f"{os.strerror(errno.EADDRINUSE)}); stopping"
            ], (turns, caplog.text[-4000:])
            told += 1
        else:
            pytest.fail("the stop never came after the failed startup's stop was done")
    finally:
        taken.close()
    assert told > 0, "no stop came while the failed startup stopped its tasks: the test misses the window"


async def test_a_collector_read_under_way_as_the_operator_stops_ends_with_its_cleanup(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass's read of a collector Service is shared with the passes that look it up meanwhile, shielded from the
    stop of any one of them: the cleanup cancelled the passes and the read went on past it. On an API server that did
    not answer, kopf waited its 5 s for it (a hung task, said at DEBUG only) before cancelling it. Here the emulator
    holds the read of the trace collector's Service until the operator has stopped; as kopf says the cleanup is done,
    no such read is left."""
    caplog.set_level(logging.INFO)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    emulator.objects[LLMT, NAMESPACE, "chat"] = minimal_llmt()
    emulator.holds = lambda request: request.method == "GET" and request.path.endswith("/services/jaeger")
    done = _AtCleanupDone()
    logging.getLogger("kopf.activities.cleanup").addHandler(done)
    try:
        async with running_operator():
            await eventually(lambda: emulator.held > 0, "the pass's read of the trace collector's Service, held")
    finally:
        logging.getLogger("kopf.activities.cleanup").removeHandler(done)
        emulator.released.set()
    assert done.reads == [], done.reads


class _AtCleanupDone(logging.Handler):
    """Notes, as kopf says the cleanup handler is done, the collector reads still under way (``reads``; None: kopf
    never said it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reads: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "Activity 'cleanup' succeeded.":
            self.reads = [
                task.get_name()
                for task in asyncio.all_tasks()
                if not task.done() and getattr(task.get_coro(), "__qualname__", "") == "CollectorCheck._read"
            ]


async def _turn_by_turn(check: Callable[[], bool]) -> None:
    """Return in the first turn of the event loop in which ``check()`` holds (``eventually`` looks every 50 ms, and
    what is awaited here lasts a few turns)."""
    for _ in itertools.count():
        if check():
            return
        await asyncio.sleep(0)


def _stopping(memo: Any) -> bool:
    state = memo.get("state")
    return isinstance(state, handlers.OperatorState) and state.stopping


def _taken_port() -> socket.socket:
    """A socket listening on all of IPv6 and IPv4 at a port of its own: the operator's metrics port, taken."""
    taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    taken.bind(("::", 0))
    taken.listen()
    return taken
