"""kopf handlers: thin functions that hand the work to :mod:`llm_telemetry_operator.reconcile`."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import datetime
import functools
import itertools
import logging
import math
import pathlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import kopf

from llm_telemetry_operator import access, kube, metrics, refusals
from llm_telemetry_operator import constants as c
from llm_telemetry_operator import reconcile as rec
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.childwatch import MetadataWatch
from llm_telemetry_operator.collectors import CACHE_SECONDS as COLLECTOR_CACHE_SECONDS
from llm_telemetry_operator.collectors import CollectorCheck
from llm_telemetry_operator.config import DEFAULT_PEERING_LIFETIME_SECONDS, OperatorConfig
from llm_telemetry_operator.diffbase import ObservedGenerationDiffBase
from llm_telemetry_operator.errors import (
    ApiError,
    ConflictError,
    NotFoundError,
    SpecError,
    WriteWithheld,
    clipped,
)
from llm_telemetry_operator.kube import KubeClient
from llm_telemetry_operator.labels import is_dns_label
from llm_telemetry_operator.owners import OwnerIndex
from llm_telemetry_operator.schedule import Schedule
from llm_telemetry_operator.spec import TelemetrySpec, parse_spec
from llm_telemetry_operator.standby import POLL_SECONDS as STANDBY_POLL_SECONDS
from llm_telemetry_operator.standby import alive_until, standing_by

#: Passes of the operator's own (retries, resyncs) running at once; more wait their turn.
SCHEDULED_PASSES = 4
#: Seconds without its event loop running after which a replica counts as having been frozen, as a share of the
#: peering lifetime (kopf keeps a silent replica's entry alive that long, 60 s by default: a standby may have taken
#: over meanwhile). Coming back, it would act on what it knew before the freeze: a resource's old spec put back over
#: the new one, which the other replica put back again. It stands by until it has read the peering object, and the
#: resources if it is active. See :func:`frozen_seconds`.
FROZEN_SHARE = 0.5
FROZEN_SECONDS = FROZEN_SHARE * DEFAULT_PEERING_LIFETIME_SECONDS
#: Polls a deletion waits for a replica standing by, past the peering lifetime a kopf keepalive may take, before kopf
#: retries it (35 with the default lifetime). See :func:`delete_wait_polls`.
DELETE_WAIT_POLLS_BEYOND = 5


def frozen_seconds(lifetime: float) -> float:
    """Seconds without its event loop running after which a replica with peering ``lifetime`` counts as frozen."""
    return FROZEN_SHARE * lifetime


def delete_wait_polls(lifetime: float) -> int:
    """Polls (STANDBY_POLL_SECONDS apart) a deletion waits for a replica standing by, with peering ``lifetime``."""
    return math.ceil(lifetime / STANDBY_POLL_SECONDS) + DELETE_WAIT_POLLS_BEYOND


DELETE_WAIT_POLLS = delete_wait_polls(DEFAULT_PEERING_LIFETIME_SECONDS)
#: Lists of the resources tried (one a STANDBY_POLL_SECONDS) before a replica active again acts without one.
RELIST_ATTEMPTS = 5
#: The RELOGIN_BURST-th login within RELOGIN_SECONDS, and the next ones, wait first (see _relogin_backoff), at most
#: RELOGIN_MOST_SECONDS, and say so once a RELOGIN_SAID_SECONDS.
RELOGIN_SECONDS = 10.0
RELOGIN_BURST = 3
RELOGIN_MOST_SECONDS = 60.0
RELOGIN_SAID_SECONDS = 60.0
#: Seconds between two lines saying the peering objects still cannot be read (the poll tries every
#: STANDBY_POLL_SECONDS): one line when it starts, one a minute while it lasts, one when it ends.
PEERING_UNREAD_LOG_SECONDS = 60.0
#: Seconds kopf waits before it calls a startup that failed again (its own default is 60 s). kopf answers the liveness
#: and readiness probes only once the startup is done, and the chart's liveness probe restarts a pod that has not
#: answered in some 50 s: after 60 s the retry never came in a pod, every failed startup was a container restart
#: (and CrashLoopBackOff's growing waits after a few). Within those 50 s, a failure that passes (an answer of the API
#: server's the startup could not read) is over by the next attempt, with no restart.
STARTUP_RETRY_SECONDS: Final = 10
#: Seconds the startup waits for the first check of the permissions to get an answer to a review before it goes on
#: without the check's result (the check goes on meanwhile): kopf answers the liveness and readiness probes only once
#: the startup is done, and the chart's liveness probe restarts a pod that has not answered in some 50 s, so a review
#: the API server leaves unanswered (a hung authorization webhook) would have each new pod restarted before it watched
#: anything. A check whose answers keep coming (many watched namespaces: 34 reviews each) is waited for, up to
#: ACCESS_STARTUP_LIMIT_SECONDS.
ACCESS_STARTUP_WAIT_SECONDS = 5.0
#: Seconds the startup waits at most for a first check of the permissions whose answers keep coming.
ACCESS_STARTUP_LIMIT_SECONDS = 30.0
#: Seconds between two ticks of the event loop's heartbeat (see _heartbeat).
HEARTBEAT_SECONDS = 1.0
# The timers of taking another operator's resources over (its peering object read at most once a
# ``holder_check_seconds``, its grace ``takeover_grace_seconds``, its confirmation ``takeover_confirm_seconds``), of the
# permission checks refusals start (``access_recheck_seconds``) and of the child watches' retries of a kind not served
# (``missing_retry_seconds``) are the config's (:class:`llm_telemetry_operator.config.Timers`), read at each use.

#: Seconds after which a first sighting of such an operator as gone no longer counts towards the confirmation: what it
#: did since is unknown, so a later sighting starts a new one.
TAKEOVER_CONFIRM_WINDOW_SECONDS = 120.0
#: How far ahead of this node's clock a stop mark may be and still count (clock skew); further is no mark.
STOP_MARK_SKEW_SECONDS = 60.0
#: Seconds from a kind of child being served again (the Prometheus Operator's CRDs installed) to the pass it starts
#: for each resource it concerns: the CRDs of both kinds, applied together, are found within this of each other (their
#: watches retry in step), and start one pass, not two.
SERVED_PASS_DELAY = 2.0
_CHILD_RESOURCES = (
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("monitoring.coreos.com", "v1", "servicemonitors"),
    ("monitoring.coreos.com", "v1", "prometheusrules"),
)
_MANAGED = {c.LABEL_MANAGED_BY: c.MANAGER}


@dataclass
class OperatorState:
    """What every handler of every object must see: the latest LLMTelemetry bodies and one lock per resource.

    kopf hands each object's handlers a *shallow copy* of the operator memo, made when the object is first
    seen (kopf ``docs/memos.rst``: "The memo is shared by all handlers of the same individual resource").
    A dict created later with ``memo.setdefault(...)`` in a resource handler therefore lives in that one
    object's copy only: a Deployment's or a child's handler would never see the LLMTelemetry bodies. So the
    state is created once, in the startup handler, on the operator-wide memo every copy refers to.
    """

    #: Latest body of every LLMTelemetry, by (namespace, name).
    bodies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: The parsed spec of each body (None when invalid), so a workload event does not re-parse every spec.
    specs: dict[tuple[str, str], TelemetrySpec | None] = field(default_factory=dict)
    #: The names of each namespace in order, and which of them a workload event may concern (see owners.py).
    index: OwnerIndex = field(default_factory=OwnerIndex)
    #: One lock per LLMTelemetry, so passes for the same resource never interleave, and how many passes (and looks,
    #: deletions) hold or wait for it. Kept only while one does (see :func:`_lock`), so the names of resources long
    #: deleted (one per preview environment, say) leave nothing behind.
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    lock_users: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Set first thing when the operator stops what it started (cleanup, a startup cut short or failed): from then on
    #: nothing starts a permission check or an event pass, which the stop would no longer cancel (see _stop_tasks).
    stopping: bool = False
    #: The status each LLMTelemetry (by uid) was last given by us. A pass compares against it rather than the
    #: status in the body it was handed, which lags behind our own write until its watch event arrives; without
    #: this, passes triggered in that window rewrite the same status again.
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: When the last successful pass for each LLMTelemetry started, and its outcome. A pass reads everything
    #: afresh, so a request for a pass made before the last one started is already answered by it (see
    #: :func:`_reconcile`).
    passes: dict[tuple[str, str], tuple[float, rec.Outcome]] = field(default_factory=dict)
    #: Collector Service lookups, shared by all passes (cached briefly).
    collectors: CollectorCheck = field(default_factory=CollectorCheck)
    #: When each resource gets its next retry or resync (see :mod:`llm_telemetry_operator.schedule`).
    schedule: Schedule = field(default_factory=lambda: Schedule(interval=300.0))
    #: Wakes the scheduler when a pass was scheduled earlier than what it waits for.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: The failures last reported in events, by resource: a pass that finds the same ones again posts none.
    reported: dict[tuple[str, str], frozenset[tuple[str, str]]] = field(default_factory=dict)
    #: Passes started by watch events of workloads and children, still running (cancelled at cleanup).
    event_passes: set[asyncio.Task[Any]] = field(default_factory=set)
    #: The watches of workloads and children (see :mod:`childwatch`), once started.
    watches: list[MetadataWatch] | None = None
    #: The collector Services each resource's last pass found missing (or without the endpoint's port), the
    #: resources waiting for each, and a watch of each such Service (see :func:`_await_collectors`).
    awaiting: dict[tuple[str, str], frozenset[tuple[str, str]]] = field(default_factory=dict)
    collector_waiters: dict[tuple[str, str], set[tuple[str, str]]] = field(default_factory=dict)
    collector_watches: dict[tuple[str, str], MetadataWatch] = field(default_factory=dict)
    #: The same for the pricing ConfigMaps (``spec.pricing.configMapRef``) passes found missing or unreadable while
    #: they held workloads back (see :func:`_await_pricing`).
    awaiting_prices: dict[tuple[str, str], frozenset[tuple[str, str]]] = field(default_factory=dict)
    pricing_waiters: dict[tuple[str, str], set[tuple[str, str]]] = field(default_factory=dict)
    pricing_watches: dict[tuple[str, str], MetadataWatch] = field(default_factory=dict)
    #: Whether the log said that more objects are waited for than are watched at once (see :func:`_watch_awaited`).
    awaited_cap_said: bool = False
    #: Collector Services seen created or changed since the waiting resources' last passes, and the timer that
    #: starts those passes once they have settled (see :func:`_collector_event`).
    collectors_changed: set[tuple[str, str]] = field(default_factory=set)
    collectors_settling: asyncio.TimerHandle | None = None
    #: Whether another replica is the active one (kopf's peering rule, see standby.py), or this one has not read the
    #: peering object since it was frozen (see frozen_seconds): no pass of our own runs.
    standby: bool = False
    #: When (time.monotonic()) the event loop's heartbeat last ticked; None while peering is off.
    ticked: float | None = None
    #: A stall of the event loop longer than this is a freeze (see :func:`frozen_seconds`; from the peering lifetime).
    frozen_seconds: float = FROZEN_SECONDS
    #: Polls a deletion waits for a replica standing by (see :func:`delete_wait_polls`).
    delete_wait_polls: int = DELETE_WAIT_POLLS
    #: Failed lists of the resources since this replica found itself active again (see _check_standby).
    relists_failed: int = 0
    #: When (time.monotonic()) reading the peering objects began to fail, and when that was last said; None: read.
    peering_unread_since: float | None = None
    peering_unread_said: float = 0.0
    #: Until when (time.time()) the other replicas see this one alive, by its entry in the peering object as last
    #: read; past it one of them may take over, so this one stands by until it reads its entry renewed. None
    #: without an entry of its own (then it acts only alone, see standby.standing_by).
    lease: float | None = None
    #: The context kopf processes a resource's events in: passes of our own (scheduled, or started by our watches)
    #: run in a copy of it, as kopf.warn finds kopf's settings and event queue in its context variables.
    kopf_context: contextvars.Context | None = None
    #: The operator's logger (the startup handler's), for passes not started by a kopf handler.
    logger: Any = None
    #: Other operators' peering objects, by name, as last read: when (time.monotonic()), whether one of their
    #: replicas was alive or had been within the takeover grace (``Timers.takeover_grace_seconds``), and the
    #: namespaces that operator watches (None: every one, or not said) (see _held_elsewhere).
    holders: dict[str, tuple[float, bool, frozenset[str] | None]] = field(default_factory=dict)
    #: How many of kopf's handlers run for each LLMTelemetry (a creation, a change of spec, a resume): kopf holds the
    #: resource's events meanwhile, so a claim by another operator reaches :attr:`bodies` only once they have ended
    #: (see :func:`_confirm_claim`).
    handling: dict[tuple[str, str], int] = field(default_factory=dict)
    #: When (time.monotonic()) each such operator was first seen with no live replica and no recent stop, since it
    #: was last seen otherwise (see ``Timers.takeover_confirm_seconds``).
    holders_gone: dict[str, float] = field(default_factory=dict)
    #: Such operators last read with no replica running now, though one ran (or said it stopped) within
    #: the takeover grace: a restart, or the operator of this very release under the peering name it had before a
    #: switch between cluster-wide and namespaced mode (see _leave_to).
    holders_idle: set[str] = field(default_factory=set)
    #: When (time.monotonic()) this replica last read the peering object and found itself the active one: the
    #: replica active until the operator stopped says so on the object (see _mark_stopped).
    active_seen: float | None = None
    #: The write of the watched namespaces under way, if any (see _publish_watched).
    publishing: asyncio.Task[None] | None = None
    #: Whether writing the watched namespaces on this operator's peering object was refused (403: the chart's RBAC
    #: from before it did so), and whether a failure to write them was said (see _publish_watched): a refusal is not
    #: tried again until the operator restarts; another failure is, at the next read of the peering object.
    publish_refused: bool = False
    publish_warned: bool = False
    #: The resources left to another operator: its name, and whether it was idle (no replica running, but one
    #: recently), as last said in the log and an event (see _leave_to).
    left: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict)
    #: The resources (by uid) this operator has claimed (see _claim), so that a pass before the watch has delivered
    #: the claim does not claim them again.
    claimed: set[str] = field(default_factory=set)
    #: The permissions the API server refused this operator at its last check (see _check_access); None: not
    #: known (not checked yet, or the check itself failed). And whether a failed check was said.
    lacking: tuple[access.Grant, ...] | None = None
    access_unknown_said: bool = False
    #: A check of the permissions started by a refusal the last check did not explain, and when the last one began
    #: (time.monotonic()), so that a burst of refusals asks at most once every ``Timers.access_recheck_seconds``.
    access_recheck: asyncio.Task[None] | None = None
    access_rechecked: float | None = None
    #: The watched namespaces whose Role's grants the check under way asks about (None: every one), and those where
    #: a call was refused meanwhile, to be asked about once it is done (see _recheck_access).
    access_checking: frozenset[str] | None = None
    access_wanted: set[str] = field(default_factory=set)
    #: The watched namespaces whose Role's grants a check was to ask about but could not (a review failed, or got no
    #: answer): each periodic check asks there too, until one has its answers.
    access_unasked: set[str] = field(default_factory=set)
    #: When a review of the check under way was last answered (time.monotonic()): see ACCESS_STARTUP_WAIT_SECONDS.
    access_answered: float | None = None
    #: The resources (by uid) told they cannot be served for want of ``patch`` on the LLMTelemetry resources.
    forbidden_said: set[str] = field(default_factory=set)
    #: The invalid resources without the finalizer (by uid) asked about once: whether the API server refuses every
    #: update of them (see _report_update_refused).
    refusal_asked: set[str] = field(default_factory=set)
    #: How many times a watch of the workloads or children failed (see :mod:`childwatch`: a connection broken, the API
    #: server out of reach, an expired version), by the namespace it watches (None: every namespace), and that count
    #: for its namespace (see _breaks) when each LLMTelemetry's body was last had from the API server: a body had
    #: before a failure may be one kopf's watch has yet to bring up to date (see _reread_after_gap).
    watch_breaks: dict[str | None, int] = field(default_factory=dict)
    tracked_breaks: dict[tuple[str, str], int] = field(default_factory=dict)
    #: The uid of each resource last found gone by a read though kopf's watch never said so (see
    #: _forget_unreported). An event of that uid kopf delivers after the read is older than it (a uid is never used
    #: again): taken, it tracked the resource again, for good, and its passes made children for an owner that no
    #: longer exists. One entry per name, replaced when another resource of that name is found gone. Never pruned
    #: otherwise: an entry (about 0.3 KB with its strings) is made only for a deletion the watch missed, and nothing the
    #: operator sees shows that such an event can no longer come: kopf queues each uid's events for a worker of that
    #: uid's own, so a later event of the stream (a newer resourceVersion, a new resource of that name) does not say
    #: that the old uid's worker has none left (a handler or a patch of kopf's under way for it holds them).
    gone: dict[tuple[str, str], str] = field(default_factory=dict)


#: The handlers kopf calls for every watch event of their kind (every LLMTelemetry change in the watched
#: namespaces; workloads and children are watched apart, see :mod:`childwatch`).
WATCH_EVENT_HANDLERS = frozenset({"llmtelemetry_track"})


class QuietWatchEventHandlers(logging.Filter):
    """Drops kopf's INFO line "Handler '...' succeeded." for :data:`WATCH_EVENT_HANDLERS`: a line per watch event
    of every such object, which says nothing (they log what they do themselves) and cost a noticeable share of
    the operator's CPU with many resources. Failures, and the lines of the LLMTelemetry handlers, stay."""

    _QUIET = frozenset(f"Handler {handler!r} succeeded." for handler in WATCH_EVENT_HANDLERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.INFO or record.msg not in self._QUIET


def _state(memo: Any) -> OperatorState:
    state = memo.get("state")
    if not isinstance(state, OperatorState):
        raise RuntimeError("operator state missing from memo: the startup handler did not run")
    return state


def _config(memo: Any) -> OperatorConfig:
    if memo.get("config") is None:
        memo["config"] = OperatorConfig.from_env()
    config: OperatorConfig = memo["config"]
    return config


def _client(memo: Any) -> KubeClient:
    if memo.get("client") is None:
        config = _config(memo)
        memo["client"] = KubeClient(
            loader=functools.partial(kube.load_configuration, config.kubeconfig, config.context),
            peering=None if config.standalone else config.peering,
        )
    client: KubeClient = memo["client"]
    return client


@contextlib.asynccontextmanager
async def _lock(memo: Any, namespace: str, name: str) -> AsyncIterator[None]:
    """Hold the lock of the LLMTelemetry ``namespace/name``. The lock is dropped once no one holds or waits for it:
    one made anew for the next holder is the same to it (nothing waits on the old one), so nothing is kept of a
    resource between its passes."""
    state = _state(memo)
    key = (namespace, name)
    lock = state.locks.setdefault(key, asyncio.Lock())
    state.lock_users[key] = state.lock_users.get(key, 0) + 1
    try:
        async with lock:
            yield
    finally:
        state.lock_users[key] -= 1
        if not state.lock_users[key]:
            del state.lock_users[key], state.locks[key]


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an LLMTelemetry body for the passes, without ``metadata.managedFields`` (no pass reads it, and on
    a resource with a status it is the largest part of the body, copied on every watch event)."""
    copied = {k: dict(v) if isinstance(v, Mapping) else v for k, v in body.items()}
    if isinstance(copied.get("metadata"), dict):
        copied["metadata"].pop("managedFields", None)
    return copy.deepcopy(copied)


#: kopf's own retry delays for an API request, then this one for as long as the API server stays away.
FIRST_BACKOFFS: Final = (1.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0)
OUTAGE_BACKOFF: Final = 30.0
#: The task kopf runs until it is told to stop (a signal, its stop flag).
_KOPF_RUNNING_TASK: Final = "stop-flag checker"


class OutageBackoffs:
    """kopf's ``error_backoffs``: the delays between retries of one failed API request. Each request iterates
    afresh: kopf's first delays, then :data:`OUTAGE_BACKOFF` without end, until the operator is stopping (kopf's
    ``stop-flag checker`` task is no longer running), when it gives up at once."""

    def __iter__(self) -> Iterator[float]:
        for delay in itertools.chain(FIRST_BACKOFFS, itertools.repeat(OUTAGE_BACKOFF)):
            if _stopping():
                return
            yield delay


def _stopping() -> bool:
    """Whether kopf is stopping: its task that waits for a stop has ended (or there is no loop to ask)."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return True
    return not any(task.get_name() == _KOPF_RUNNING_TASK for task in tasks)


def _event_target(body: Mapping[str, Any]) -> kopf.Body:
    """What kopf.warn needs to address an event: the object's identity only (passes may hold a plain dict)."""
    meta = body.get("metadata", {})
    raw: kopf.RawBody = {
        "apiVersion": str(body.get("apiVersion", c.API_VERSION)),
        "kind": str(body.get("kind", c.KIND)),
        "metadata": {"name": meta.get("name", ""), "namespace": meta.get("namespace", ""), "uid": meta.get("uid", "")},
    }
    return kopf.Body(raw)


@kopf.on.startup(backoff=STARTUP_RETRY_SECONDS)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    try:
        await _start(settings, memo, logger)
    except asyncio.CancelledError:
        # Stopped (SIGTERM) before the startup was done: kopf runs no cleanup handler then, and the tasks started
        # so far (the schedule, the permission check, the peering watch) held the exit up for kopf's 5 s wait.
        await _stop_all(memo)
        raise
    except Exception as failure:
        # Failed (a bug, or the metrics port taken when run in-process through kopf.operator: the command binds it
        # before kopf runs, and exits 2 if it cannot): kopf calls the startup again after its backoff, which starts
        # all of it anew on a new state. The tasks this attempt started would run on beside the next attempt's (a
        # second schedule, permission check, heartbeat and standby watch on a state of their own) for the operator's
        # life. The client stays open for the next attempt (and a stop during kopf's backoff closes it: kopf runs the
        # cleanup handler then).
        task = asyncio.current_task()
        asked = task.cancelling() if task is not None else 0
        try:
            await _stop_tasks(memo)
            told = task is not None and task.cancelling() > asked
        except asyncio.CancelledError:
            told = True
        if told:
            # Told to stop (SIGTERM) while stopping those tasks: awaiting each one's end takes the cancellation in, and
            # the failure raised would have kopf wait its backoff and start the operator again, SIGTERM or not.
            # Said as kopf says a failed startup's: with its cause in the line (and the traceback after it).
            logger.error("the startup failed as the operator was told to stop (%s); stopping", failure, exc_info=True)
            await _stop_all(memo)
            raise asyncio.CancelledError() from None
        raise


async def _start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger) -> None:
    config = _config(memo)
    _client(memo)
    # Shared by all objects' handlers only because it is put on the operator memo here (see OperatorState).
    # A lookup is shared by the passes of one burst, and never outlives half a resync interval, so the resync
    # notices a collector installed meanwhile.
    ttl = min(COLLECTOR_CACHE_SECONDS, config.resync_seconds / 2)
    state = memo["state"] = OperatorState(
        collectors=CollectorCheck(config.namespaces, ttl=ttl),
        schedule=Schedule(interval=config.resync_seconds),
        frozen_seconds=frozen_seconds(config.peering_lifetime_seconds),
        delete_wait_polls=delete_wait_polls(config.peering_lifetime_seconds),
    )
    # Retries and resyncs: one task for the whole operator, cancelled at cleanup (see schedule.py for why not
    # kopf's per-resource daemons, timers or TemporaryError retries).
    memo["scheduler"] = asyncio.create_task(_run_schedule(memo, state, logger), name="llm-telemetry-schedule")
    # Our own finalizer name, so `kubectl get -o yaml` tells users who holds the object.
    settings.persistence.finalizer = c.FINALIZER
    # kopf's record of the last handled spec is status.observedGeneration, which every pass writes anyway,
    # not an annotation patched after every change (see diffbase.py).
    # Or in the status it last wrote itself, which a body's may lag behind (the echo of a new resource's claim).
    settings.persistence.diffbase_storage = ObservedGenerationDiffBase(written=state.statuses.get)
    # Only failures (and an idle resource's NoTargets) become Kubernetes events; a success event per handler is
    # noise in `kubectl describe`.
    settings.posting.level = logging.WARNING
    # Who says so, in `kubectl describe` ("From") and the events' reporting fields: this operator, and which replica
    # (a pod's host name is its name), not kopf's defaults ("kopf", "dev") that every kopf operator shares.
    settings.posting.reporting_component = c.OPERATOR_NAME
    settings.posting.reporting_instance = socket.gethostname()[:128]
    # Nor a line per probe: kopf's liveness endpoint is an aiohttp server, whose access log said every kubelet probe
    # at INFO (the chart probes liveness every 20 s and readiness every 10 s: some 13,000 lines a day saying
    # nothing). Failures still show: a probe that fails is the kubelet's to report. With --verbose they stay.
    access_logger = logging.getLogger("aiohttp.access")
    if access_logger.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        access_logger.setLevel(logging.WARNING)
    # Nor a log line per watch event (kopf's per-object messages go to the "kopf.objects" logger).
    objects_logger = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietWatchEventHandlers) for f in objects_logger.filters):
        objects_logger.addFilter(QuietWatchEventHandlers())
    # Long-lived watches get cut by load balancers without notice; let the server close them first
    # (kopf docs "Configuration: API timeouts", nolar/kopf#585), and give a connection that died without a word up
    # within a minute and a half (as childwatch does; kopf goes on from the last version seen).
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 30
    # kopf's API retries give up after 1+1+2+3+5+8+13+21 s, and then the whole operator exits: an API server away
    # for two minutes (an upgrade, an etcd failover) stopped every replica. These keep retrying, every 30 s, for
    # as long as the operator runs; once it is stopping, they give up at once (its last writes to an API server
    # that is gone no longer hold its exit up for a minute).
    settings.networking.error_backoffs = OutageBackoffs()
    # One ClusterKopfPeering in namespaced mode too (kopf would keep a KopfPeering in each watched namespace): a
    # watched namespace being deleted takes its KopfPeering and the chart's Role there with it, and kopf stops the
    # whole operator once it cannot keep its entry in one. kopf starts its peering only after the startup handlers.
    settings.peering.clusterwide = True
    # How long the other replicas count this one alive after its last keepalive (kopf renews it 5 to 10 s before
    # then): the longest a standby waits to take over from a replica that went silent.
    settings.peering.lifetime = config.peering_lifetime_seconds
    state.logger = logger
    # kopf logs each retry of a refused call at ERROR, every 30 s for as long as it is refused: once the permission is
    # named (below), such retries are logged at WARNING now and then, not at ERROR (see refusals.py); a refusal not
    # explained by the last check stays an ERROR and has the permissions checked again.
    refusals.install(
        refusals.KnownRefusals(lambda: state.lacking, unknown=lambda ns: _recheck_access(memo, state, logger, ns))
    )

    # Which declared permissions the API server refuses, said before kopf starts its watches (and so before a
    # refused finalizer patch leaves a resource idle), then again at each resync interval. Reviews store nothing:
    # asked before the standby check, so that a replica found active goes on with no further wait.
    # Waited for as long as its answers keep coming (up to ACCESS_STARTUP_LIMIT_SECONDS): an answer that does not
    # come (a hung authorization webhook) must not hold the startup, and so kopf's probes, up (see
    # ACCESS_STARTUP_WAIT_SECONDS). A check still under way is left to finish (it says what it finds then, as a later
    # check does) and counts as the one recheck under way (_recheck_access).
    began = time.monotonic()
    first = _start_access_check(memo, state, logger, None)
    while not first.done():
        now = time.monotonic()
        stalled = max(began, state.access_answered or began) + ACCESS_STARTUP_WAIT_SECONDS - now
        limit = began + ACCESS_STARTUP_LIMIT_SECONDS - now
        if stalled <= 0:
            logger.warning(
                "the API server has not answered this operator's permission check (SelfSubjectAccessReviews) in "
                "%.0f s; starting without it, the check goes on",
                ACCESS_STARTUP_WAIT_SECONDS,
            )
            break
        if limit <= 0:
            logger.info(
                "the check of this operator's permissions (SelfSubjectAccessReviews) goes on after %.0f s; starting "
                "meanwhile",
                ACCESS_STARTUP_LIMIT_SECONDS,
            )
            break
        await asyncio.wait({first}, timeout=min(stalled, limit))
    memo["access"] = asyncio.create_task(_watch_access(memo, state, logger), name="llm-telemetry-access")
    identity = memo.get("identity")
    if identity and not config.standalone:
        # No write while this replica stands by, not even one of a pass already under way when it began to.
        # Nor one of a pass that took the resource as this operator's while another operator claimed it since.
        _client(memo).writable = lambda: not _paused(state) and _claim_holds(state, config)
        _client(memo).confirm = functools.partial(_confirm_claim, memo)
        await _check_standby(_client(memo), config, state, str(identity), logger)
        memo["heartbeat"] = asyncio.create_task(_heartbeat(state), name="llm-telemetry-heartbeat")
        memo["standby"] = asyncio.create_task(
            _watch_standby(_client(memo), config, state, str(identity), logger), name="llm-telemetry-standby"
        )
    await _track_existing(_client(memo), config, state, logger)
    if config.namespaces:
        await _release_in_leaving_namespaces(memo, state, logger)
    metrics.serve(config.metrics_port)
    logger.info("watching %s", ", ".join(config.namespaces) or "all namespaces")
    if not config.standalone:
        for warning in await missing_peering(_client(memo), config):
            logger.warning("%s", warning)


async def missing_peering(client: KubeClient, config: OperatorConfig) -> list[str]:
    """Warnings for each peering object kopf will wait for that does not exist (or cannot be read).

    With peering on, kopf pauses the operator until its ClusterKopfPeering exists, and says so
    only at DEBUG level: without this check an operator started by hand just sits there.
    """
    remedy = (
        "install the chart's peering CRDs and objects (helm install/upgrade of llm-telemetry-operator creates "
        "them), create the object by hand, or run with --standalone (LLM_TELEMETRY_OPERATOR_STANDALONE=true)"
    )
    try:
        found = await client.list(kube.CLUSTERKOPFPEERINGS, None, fields={"metadata.name": config.peering})
    except NotFoundError:
        return [
            "peering is on but the clusterkopfpeerings.kopf.dev CRD is not installed: the operator will stand by and "
            f"do nothing; {remedy}"
        ]
    except ApiError as exc:
        return [f"peering is on but ClusterKopfPeering {config.peering!r} could not be checked ({exc}); {remedy}"]
    if not found:
        return [
            f"peering is on but ClusterKopfPeering {config.peering!r} does not exist: the operator will stand by and "
            f"do nothing until it does; {remedy}"
        ]
    return []


async def _check_standby(
    client: KubeClient, config: OperatorConfig, state: OperatorState, identity: str, logger: Any
) -> None:
    """Read the peering object and stand by, or resume, as kopf does (see standby.py)."""
    try:
        found = await client.list(kube.CLUSTERKOPFPEERINGS, None, fields={"metadata.name": config.peering})
    except ApiError as exc:
        _peering_unread(state, config, exc, logger)
        return  # unknown: keep the last decision (kopf's own pause holds its handlers meanwhile)
    if state.peering_unread_since is not None:
        logger.info(
            "ClusterKopfPeering %r is read again (after %.0f s)",
            config.peering,
            time.monotonic() - state.peering_unread_since,
        )
        state.peering_unread_since = None
    standby = any(standing_by(peering.get("status"), identity, config.priority) for peering in found)
    # An entry already dead (a pod of the same name before a restart) is no lease: kopf writes it anew shortly.
    leases = [until.timestamp() for p in found if (until := alive_until(p.get("status"), identity)) is not None]
    state.lease = max((until for until in leases if until > time.time()), default=None)
    if not standby and found:
        state.active_seen = time.monotonic()
    if not standby and not _paused(state) and found and (state.publishing is None or state.publishing.done()):
        # Apart: a slow write (429s, say) must not hold up noticing a change of the active replica.
        state.publishing = asyncio.create_task(
            _publish_watched(client, config, state, identity, found[0], logger), name="llm-telemetry-publish"
        )
    if standby == state.standby:
        return
    if standby:
        state.standby = True
        logger.info("another replica is active: this one stands by (no retries, resyncs or passes of its own)")
        return
    logger.info("this replica is active again: every resource gets a pass")
    # What this replica knew is as old as its pause (kopf's watch paused with it): the resources are read again, one
    # that is gone is forgotten, no answer from a pass made before counts, and every resource gets a fresh pass.
    # It stands by until then: a pass started meanwhile would act on what it knew before.
    known = set(state.bodies)
    present = await _track_existing(client, config, state, logger)
    if present is None and state.relists_failed < RELIST_ATTEMPTS:
        state.relists_failed += 1
        return  # still standing by: the next look tries again (_track_existing said why)
    if present is None:
        logger.warning(
            "the resources could not be listed again after %d tries: active on what this replica knew, and what its"
            " watch delivers",
            RELIST_ATTEMPTS,
        )
    state.relists_failed = 0
    for key in known - (known if present is None else present):
        _forget(state, key, state.bodies.get(key, {}))
    state.passes.clear()
    state.standby = False
    for key in list(state.bodies):
        state.schedule.resume(key)
    state.wake.set()


def _peering_unread(state: OperatorState, config: OperatorConfig, exc: ApiError, logger: Any) -> None:
    """Say that the peering object could not be read: when it first fails, then once a PEERING_UNREAD_LOG_SECONDS
    while it goes on failing (the poll tries every STANDBY_POLL_SECONDS), not at every poll."""
    now = time.monotonic()
    if state.peering_unread_since is None:
        state.peering_unread_since = state.peering_unread_said = now
        logger.warning(
            "cannot read ClusterKopfPeering %r (%s): this replica keeps standing by or acting as it last read, and"
            " tries again every %.0f s",
            config.peering,
            exc,
            STANDBY_POLL_SECONDS,
        )
    elif now - state.peering_unread_said >= PEERING_UNREAD_LOG_SECONDS:
        state.peering_unread_said = now
        logger.warning(
            "still cannot read ClusterKopfPeering %r, for %.0f s now (%s)",
            config.peering,
            now - state.peering_unread_since,
            exc,
        )


async def _publish_watched(
    client: KubeClient,
    config: OperatorConfig,
    state: OperatorState,
    identity: str,
    peering: Mapping[str, Any],
    logger: Any,
) -> None:
    """Write the namespaces this operator watches on its peering object, and this replica as the one that says so,
    unless the object says so already: another operator whose watched namespaces overlap leaves the resources this
    one claimed to it, but only in namespaces this one still watches (see :func:`_held_elsewhere`). Written by the
    active replica, as it reads the object anyway."""
    watched = ",".join(config.namespaces) or "*"
    annotations = _annotations(peering)
    said = (annotations.get(c.ANNOTATION_WATCHED), annotations.get(c.ANNOTATION_WATCHED_BY))
    if state.publish_refused or said == (watched, identity):
        return
    patch = {"metadata": {"annotations": {c.ANNOTATION_WATCHED: watched, c.ANNOTATION_WATCHED_BY: identity}}}
    try:
        await client.patch(kube.CLUSTERKOPFPEERINGS, None, config.peering, patch, metadata_only=True)
    except WriteWithheld:
        return  # began to stand by meanwhile: the active replica writes it
    except ApiError as exc:
        # Refused (RBAC, an admission policy): asked again, the same. Anything else is tried again.
        state.publish_refused = exc.status in (400, 403, 422)
        if not state.publish_warned:
            state.publish_warned = True
            logger.warning(
                "could not write the watched namespaces on ClusterKopfPeering %r (%s)%s: until it is written, another "
                "operator watching a namespace this one no longer watches leaves the resources this one served there "
                "alone while this one runs",
                config.peering,
                exc,
                "" if state.publish_refused else "; trying again at the next read of the peering object",
            )
        return
    state.publish_warned = False
    logger.info("peering object %r now says this operator watches %s", config.peering, watched)


async def _mark_stopped(client: KubeClient, config: OperatorConfig, state: OperatorState, logger: Any) -> None:
    """Say on the peering object when the active replica stopped: kopf takes its entry out as it stops, and another
    operator would otherwise take the resources this one claimed over, though it is only restarting (see
    :func:`_held_elsewhere`). Written by the replica that was active until the stop: kopf has taken its entry out
    by now, so the last reads may have shown it another replica's standby."""
    active = state.active_seen is not None and time.monotonic() - state.active_seen < 3 * STANDBY_POLL_SECONDS
    if config.standalone or not active:
        return
    stopped = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    patch = {"metadata": {"annotations": {c.ANNOTATION_STOPPED: stopped}}}
    client.writable = client.confirm = None  # the operator's passes have stopped; this write is its last
    try:
        # Within the pod's grace period (30 s by default), of which kopf's own exit takes a few.
        await asyncio.wait_for(
            client.patch(kube.CLUSTERKOPFPEERINGS, None, config.peering, patch, metadata_only=True), 15.0
        )
    except (ApiError, asyncio.TimeoutError) as exc:
        logger.warning("could not say on ClusterKopfPeering %r that this operator stopped: %r", config.peering, exc)


def _paused(state: OperatorState) -> bool:
    """Whether this replica must not act (no pass, no write): another replica is active; or this one was frozen
    (its event loop did not run for frozen_seconds), or its entry in the peering object has not been read renewed
    before the others would see it dead, and it has not read the peering object since. Checked as a pass is about to
    start and before every write, so that nothing started before or over a freeze runs ahead of the peering watch."""
    if state.standby:
        return True
    stalled = time.monotonic() - state.ticked if state.ticked is not None else 0.0
    if stalled > state.frozen_seconds:
        # Frozen (SIGSTOP, a paused VM, a stalled node) past the point where another replica may have taken over and
        # changed what this one knew: stand by until _watch_standby reads the peering object (and, if active, the
        # resources) again.
        state.standby = True
        if state.logger is not None:
            state.logger.warning(
                "this replica did not run for %.0f s: it reads the peering object and the resources again before"
                " any pass",
                stalled,
            )
    elif state.lease is not None and time.time() > state.lease:
        # Its keepalive was due before a freeze too short to tell, or the peering object could not be read: another
        # replica may have taken over meanwhile.
        state.standby = True
        if state.logger is not None:
            state.logger.warning(
                "this replica's peering entry was not seen renewed before it expired: it stands by until it reads"
                " the peering object and the resources again"
            )
    return state.standby


async def _check_access(
    memo: Any, state: OperatorState, logger: Any, *, namespaced: bool = True, namespaces: Collection[str] | None = None
) -> bool:
    """Ask the API server which declared permissions this operator lacks (see access.py). A change is said once:
    an ERROR naming each missing permission and what breaks without it, or an INFO line once none is missing
    any more. While ``patch`` on the LLMTelemetry resources is missing, each one seen is told so (see
    :func:`_report_forbidden`). With ``namespaced`` False, only the cluster-wide grants are asked about, and with
    ``namespaces``, only those and the Role's grants in these watched namespaces (in namespaced mode a Role's are
    asked about in each watched namespace at startup; then, see _watch_access and _recheck_access, only where one
    was found missing or a call was refused); what the last check found of the others stands. Whether the API
    server answered the check (False: a review failed, and nothing is known of what it asked)."""
    try:
        config = _config(memo)
        if not namespaced:
            namespaces = ()

        def answered() -> None:
            state.access_answered = time.monotonic()

        found = set(await access.missing(_client(memo), config, namespaces=namespaces, answered=answered))
        if namespaces is not None:
            kept = [grant for grant in state.lacking or () if grant.namespace not in (None, *namespaces)]
            found.update(kept)
        lacking = tuple(grant for grant in access.needed(config) if grant in found)
    except ApiError as exc:
        if not state.access_unknown_said:
            state.access_unknown_said = True
            logger.warning(
                "could not ask the API server which permissions this operator lacks (SelfSubjectAccessReview: %s); "
                "a refused call is logged as it happens",
                exc,
            )
        return False
    state.access_unknown_said = False
    if lacking != state.lacking:
        if lacking:
            logger.error("%s", access.error_message(lacking))
        elif state.lacking:
            logger.info("the API server grants this operator every permission it needs again")
    state.lacking = lacking
    if _forbidden_patch(state, None) is None:
        state.forbidden_said.clear()
    elif state.kopf_context is not None:  # (else no resource delivered yet: llmtelemetry_track tells each one)
        for key, body in list(state.bodies.items()):
            _spawn_event_pass(state, key, "forbidden", _report_forbidden(memo, state, body))
    return True


async def _watch_access(memo: Any, state: OperatorState, logger: Any) -> None:
    while True:
        await asyncio.sleep(_config(memo).resync_seconds)
        if state.access_recheck is not None and not state.access_recheck.done():
            # One check at a time: the first one (still waiting for its answers, see startup) or a recheck is under
            # way, and a check beside it would have its answers and that one's said in whichever order they came,
            # an older answer last.
            logger.debug("the permissions' last check is still under way: no other one beside it")
            continue
        await _start_access_check(memo, state, logger, _periodic_namespaces(state))


def _periodic_namespaces(state: OperatorState) -> set[str]:
    """The watched namespaces whose Role a periodic check asks about besides the cluster-wide grants: those where
    one was last found missing (so that its return is noticed), or where a check could not ask (34 reviews a
    namespace for all of them would come in a burst)."""
    where = {grant.namespace for grant in state.lacking or () if grant.namespace is not None}
    return where | state.access_unasked


def _recheck_access(memo: Any, state: OperatorState, logger: Any, namespace: str | None = None) -> None:
    """Check the permissions again soon, the cluster-wide ones and a Role's in ``namespace``: a call was refused
    that the last check did not find missing (a Role or ClusterRole changed since). At most one check at a time,
    and one every ``Timers.access_recheck_seconds``: one asked for sooner waits for its turn."""
    if state.stopping:
        return  # (a check started now would outlive the stop: see _stop_tasks)
    now = time.monotonic()
    where = {namespace} if namespace and namespace in _config(memo).namespaces else set()
    if state.access_recheck is not None and not state.access_recheck.done():
        if state.access_checking is not None and not where <= state.access_checking:
            # The check under way does not ask about this namespace's Role (in namespaced mode the periodic check asks
            # about the cluster-wide grants only): it is asked about once that check is done. Dropped, the refusal of a
            # call made once was never explained, and with checks slower than the resync interval, never any.
            state.access_wanted |= where
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    # Too soon after the last one: this check waits for its turn (and counts as the one under way meanwhile, so that
    # refusals elsewhere join it). Dropped, the refusal of a call made once was never explained, nor its namespace
    # asked about again.
    interval = _config(memo).timers.access_recheck_seconds
    due = now if state.access_rechecked is None else max(now, state.access_rechecked + interval)
    state.access_rechecked = due
    logger = state.logger or logger  # the operator's, not the pass's that met the refusal: it is no resource's
    _start_access_check(memo, state, logger, where, delay=due - now)


def _start_access_check(
    memo: Any, state: OperatorState, logger: Any, where: set[str] | None, delay: float = 0.0
) -> asyncio.Task[None]:
    """One check of the permissions in a task of its own, the one under way (``state.access_recheck``), after
    ``delay`` seconds; ``where``: see _check_access's ``namespaces``."""

    async def check() -> None:
        nonlocal where
        if delay > 0:
            await asyncio.sleep(delay)
            if where is not None:
                # It held back the periodic checks while it waited (_watch_access skips while a check is under
                # way): it asks what they ask too. Else, with refusals that keep coming (each one starting a check
                # that waits for its turn), the namespaces where a grant was found missing or could not be asked
                # about would be asked about only when a periodic check fell between two of these.
                where = where | _periodic_namespaces(state)
                state.access_checking = frozenset(where)
        if where is not None and state.access_wanted:
            # Refused elsewhere while this check waited for its turn: asked about in it.
            where, state.access_wanted = where | state.access_wanted, set()
            state.access_checking = frozenset(where)
        asked = set(_config(memo).namespaces if where is None else where)
        answered = False
        try:
            answered = await _check_access(memo, state, logger, namespaces=where)
        except Exception:
            logger.exception("checking the operator's permissions failed")
        if answered:
            state.access_unasked -= asked
        else:
            # Not asked after all: the periodic checks ask there (a check started again at once would follow itself
            # in a loop for as long as the reviews fail).
            state.access_unasked |= asked
        if state.access_wanted and not state.stopping:
            # Refused meanwhile where this check did not ask: a check there now (the next check under way).
            wanted, state.access_wanted = set(state.access_wanted), set()
            state.access_rechecked = time.monotonic()
            _start_access_check(memo, state, logger, wanted)

    state.access_checking = None if where is None else frozenset(where)
    state.access_recheck = asyncio.get_running_loop().create_task(check(), name="llm-telemetry-access-recheck")
    return state.access_recheck


def _forbidden_patch(state: OperatorState, namespace: str | None) -> access.Grant | None:
    """The refused ``patch`` on the LLMTelemetry resources that covers ``namespace`` (None: any), if any."""
    for grant in state.lacking or ():
        if (grant.api_group, grant.resource, grant.verb) == (c.GROUP, c.PLURAL, "patch") and (
            namespace is None or grant.namespace in (None, namespace)
        ):
            return grant
    return None


async def _report_forbidden(memo: Any, state: OperatorState, body: Mapping[str, Any]) -> None:
    """Tell one LLMTelemetry, once, that it is not served because this operator may not patch it (kopf's finalizer
    patch is refused, so no handler runs for it): ``Ready`` False with reason Forbidden, if the operator may
    write the status, and a Warning event, if it may post events. One that already has the finalizer, or is being
    deleted, has passes of its own, which report their own failures."""
    meta = body.get("metadata") or {}
    namespace, uid = meta.get("namespace") or "", meta.get("uid") or ""
    grant = _forbidden_patch(state, namespace)
    if grant is None or not uid or uid in state.forbidden_said or _paused(state):
        return
    if c.FINALIZER in (meta.get("finalizers") or []) or meta.get("deletionTimestamp"):
        return
    state.forbidden_said.add(uid)
    if not await _still_refused(memo, access.Grant(c.GROUP, c.PLURAL, "patch", namespace or None)):
        # Granted since the last check, or in this namespace (a Role there): kopf's finalizer patch goes through.
        state.forbidden_said.discard(uid)
        return
    latest = state.bodies.get((namespace, str(meta.get("name") or "")))
    latest_meta = (latest or {}).get("metadata") or {}
    if (
        _paused(state)  # began to stand by during the review: kopf posts the event past the client's check of writes
        or latest_meta.get("uid") != uid  # deleted meanwhile (its uid would be remembered for good)
        or c.FINALIZER in (latest_meta.get("finalizers") or [])
    ):
        state.forbidden_said.discard(uid)
        return
    lacking = state.lacking or ()
    await _report_failure(
        memo,
        body,
        access.REASON,
        access.forbidden_message(grant),
        event=access.may(lacking, "", "events", "create", namespace),
        write_status=access.may(lacking, c.GROUP, f"{c.PLURAL}/status", "patch", namespace),
    )


def _may_be_refused(state: OperatorState, body: Mapping[str, Any]) -> bool:
    """Whether a resource may be one the API server refuses every update of, not asked about yet: without the
    finalizer, not being deleted, and invalid by the operator's own checks, which mirror the CRD's rules (a name over
    63 characters, a spec a rule added since refuses)."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid") or ""
    if not uid or uid in state.refusal_asked or c.FINALIZER in (meta.get("finalizers") or []):
        return False
    return (
        not meta.get("deletionTimestamp")
        and state.specs.get((str(meta.get("namespace")), str(meta.get("name")))) is None
    )


async def _report_update_refused(memo: Any, state: OperatorState, body: Mapping[str, Any]) -> None:
    """Tell one invalid LLMTelemetry, once, that the API server refuses every update of it (422: it breaks a rule of
    the CRD installed since it was stored, on a server without validation ratcheting). kopf's finalizer patch is then
    refused, at DEBUG only in kopf's log, and retried at each event: no handler runs, and its status cannot be
    written. Without this it showed nothing at all, no status, event nor log line. An ERROR line and a Warning
    event say so (an event is an object of its own, which the API server takes)."""
    meta = body["metadata"]
    uid = str(meta.get("uid") or "")
    if uid in state.refusal_asked or _paused(state):
        return
    state.refusal_asked.add(uid)
    try:
        refusal = await rec.update_refused(_client(memo), body)
    except WriteWithheld:  # began to stand by: asked again at its next event once active
        state.refusal_asked.discard(uid)
        return
    if refusal is None or _paused(state):
        return
    message = (
        "the API server refuses every update of this resource, so the operator can neither serve it nor write its "
        "status (kopf's finalizer cannot be added); fix it while the CRD that stored it is installed, or delete it"
        " (see Upgrading in docs/install.md): " + refusal
    )
    message = clipped(message)
    (state.logger or logging.getLogger(__name__)).error("%s/%s: %s", meta.get("namespace"), meta.get("name"), message)
    kopf.warn(_event_target(body), reason="UpdateRefused", message=message)


async def _still_refused(memo: Any, grant: access.Grant, unknown: bool = True) -> bool:
    """Whether the API server refuses ``grant`` now, asked again just before a resource is told it is not served:
    the last check may be a resync interval old, and a cluster-wide refusal says nothing of a namespace's own
    grant. A review that fails leaves the last check's word standing: ``unknown``."""
    try:
        return not await _client(memo).review(grant.attributes())
    except ApiError:
        return unknown


def _nothing_known_missing(state: OperatorState, namespace: str) -> bool:
    """Whether the last check of the permissions found none missing that covers ``namespace``: a refusal there is
    then news (a Role or ClusterRole changed since)."""
    return not any(grant.namespace in (None, namespace) for grant in state.lacking or ())


async def _heartbeat(state: OperatorState) -> None:
    """Tick every HEARTBEAT_SECONDS while the event loop runs: a tick overdue by frozen_seconds is a freeze (see
    :func:`_paused`), told from a slow API call, which the loop runs beside."""
    while True:
        _paused(state)  # a freeze is noticed (and said) before the tick below hides it
        state.ticked = time.monotonic()
        await asyncio.sleep(HEARTBEAT_SECONDS)


async def _watch_standby(
    client: KubeClient, config: OperatorConfig, state: OperatorState, identity: str, logger: Any
) -> None:
    while True:
        await asyncio.sleep(STANDBY_POLL_SECONDS)
        try:
            await _check_standby(client, config, state, identity, logger)
        except Exception:
            logger.exception("reading the peering objects failed")


@kopf.on.login()
async def login(memo: kopf.Memo, logger: Any, **_: Any) -> kopf.ConnectionInfo:
    """One set of credentials for kopf's watches and our client, loaded by the ``kubernetes`` package (every
    kubeconfig form, in-cluster tokens). kopf calls this again when its credentials stop working: when the API
    server answered 401 to them. Loaded again, they are new (a rotated token, an exec plugin's fresh one), or the
    same, which kopf refuses ("Ran out of valid credentials"), and the operator stops: said here, with what to do."""
    config = _config(memo)
    try:
        configuration = await asyncio.to_thread(kube.load_configuration, config.kubeconfig, config.context)
    except Exception as exc:  # ConfigException, a failing exec plugin, an unreadable file
        raise kopf.LoginError(f"cannot load Kubernetes credentials: {exc}") from exc
    info = kube.connection_info(configuration)
    credentials = await asyncio.to_thread(_credentials, info)
    if credentials == memo.get("credentials"):
        if memo.get("refused_said") != credentials:
            memo["refused_said"] = credentials  # once: kopf may ask again while it retries
            logger.error("%s", _refused_message(config, info))
    else:
        await _relogin_backoff(memo, config, logger)
    memo["credentials"] = credentials
    _client(memo).configure(configuration)
    return info


async def _relogin_backoff(memo: kopf.Memo, config: OperatorConfig, logger: Any) -> None:
    """Wait before handing kopf new credentials when it has asked for them RELOGIN_BURST times within
    RELOGIN_SECONDS: new credentials refused at once (an exec plugin, ``aws eks get-token`` say, gives a fresh
    token each time, for an identity the cluster no longer admits) made kopf log in again in a tight loop, about 40
    times a second, each login running the plugin. (kopf also asks when the API server closes its connection: once
    or twice in a while is no loop.) The wait doubles from 1 s up to RELOGIN_MOST_SECONDS while it goes on; said at
    its start and once a minute."""
    now = time.monotonic()
    recent = [t for t in memo.get("logins") or () if now - t < RELOGIN_SECONDS]
    wait = relogin_wait(recent, memo.get("login_at"), float(memo.get("login_wait") or 0.0), now)
    memo["login_wait"] = wait
    if wait:
        if now - float(memo.get("login_wait_said") or -RELOGIN_SAID_SECONDS) >= RELOGIN_SAID_SECONDS:
            memo["login_wait_said"] = now
            logger.error(
                "kopf keeps asking for new credentials, one login right after another: the API server refuses"
                " the ones %s gives (check that the identity they are for may still use the cluster), or keeps"
                " closing the connection; logging in again in %.0f s, and at most every %.0f s while it lasts",
                kube.credentials_source(config.kubeconfig, config.context),
                wait,
                RELOGIN_MOST_SECONDS,
            )
        await asyncio.sleep(wait)
    memo["login_at"] = time.monotonic()
    memo["logins"] = [*recent, memo["login_at"]]


def relogin_wait(logins: Sequence[float], last_at: float | None, last_wait: float, now: float) -> float:
    """Seconds to wait before a login at ``now``, given the times of the logins before it (``logins``, the last one
    ``last_at``, after its wait of ``last_wait``): none for the first RELOGIN_BURST - 1 within RELOGIN_SECONDS, then
    1 s, doubling while logins keep following each other within RELOGIN_SECONDS, up to RELOGIN_MOST_SECONDS."""
    if last_wait and last_at is not None and now - last_at < RELOGIN_SECONDS:
        return min(last_wait * 2, RELOGIN_MOST_SECONDS)  # still going on: the last login's wait is no quiet spell
    recent = sum(1 for t in logins if now - t < RELOGIN_SECONDS)
    return 1.0 if recent + 1 >= RELOGIN_BURST else 0.0


def _credentials(info: kopf.ConnectionInfo) -> tuple[Any, ...]:
    """What identifies the client to the API server: token, user and password, client certificate and key (their
    content: the ``kubernetes`` package writes inline ones to a new temporary file at every load)."""

    def content(path: Any) -> bytes | None:
        try:
            return pathlib.Path(path).read_bytes() if path else None
        except OSError:
            return None

    return (info.token, info.username, info.password, content(info.certificate_path), content(info.private_key_path))


def _refused_message(config: OperatorConfig, info: kopf.ConnectionInfo) -> str:
    source = kube.credentials_source(config.kubeconfig, config.context)
    message = (
        f"the API server {info.server} refused this operator's credentials (401 Unauthorized), and {source} holds"
        " no new ones"
    )
    if not kube.in_cluster(config.kubeconfig, config.context):
        return (
            message + ": renew that kubeconfig's credentials (token, client certificate, exec plugin login) and start"
            " the operator again"
        )
    account = kube.token_service_account(info.token)
    named = f"ServiceAccount {account}" if account else "the pod's ServiceAccount (spec.serviceAccountName)"
    check = f" (kubectl get serviceaccount -n {account.replace('/', ' ')})" if account else ""
    return (
        message + f": its token was revoked, or {named} deleted. The operator stops and its pod restarts with"
        f" the token the kubelet holds now; check that {named} exists{check}, and if it was deleted and created"
        " again, restart the operator's pods (kubectl rollout restart) so that they get a token of the new one"
    )


#: kopf's module that reads the API groups (its startup scan, and again for each CRD that comes or goes).
_KOPF_SCANNING_MODULE: Final = "kopf._cogs.clients.scanning"


def _kopf_scans() -> list[asyncio.Task[Any]]:
    """The running tasks of kopf's reads of the API groups.

    kopf reads each group version in a task of its own (``asyncio.as_completed``), and stopping the task that
    awaits them does not cancel them: a SIGTERM during its first scan (the first second of a pod) left them running,
    kopf closed its HTTP session under them at its cleanup, and each failed with ``Connector is closed``, logged at
    ERROR, which kopf then raised: the process exited 1 with a traceback."""
    found = []
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if not task.done() and frame is not None and frame.f_globals.get("__name__") == _KOPF_SCANNING_MODULE:
            found.append(task)
    return found


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await _stop_all(memo)


async def _stop_all(memo: Any) -> None:
    """Stop what the startup began (the cleanup handler's work, and a startup's cut short)."""
    # First, before anything else awaits: kopf closes its session right after this handler.
    state = memo.get("state")
    if isinstance(state, OperatorState):
        state.stopping = True
    scans = _kopf_scans()
    for task in scans:
        task.cancel()
    await asyncio.gather(*scans, return_exceptions=True)
    await _stop_tasks(memo)
    if isinstance(state, OperatorState):
        if memo.get("identity"):
            await _mark_stopped(_client(memo), _config(memo), state, state.logger or logging.getLogger(__name__))
    await _client(memo).close()


async def _stop_tasks(memo: Any) -> None:
    """Stop the tasks the startup began (the watches, the passes, the schedule, the permission checks...)."""
    state = memo.get("state")
    if isinstance(state, OperatorState):
        state.stopping = True
        for watch in [*(state.watches or ()), *state.collector_watches.values(), *state.pricing_watches.values()]:
            watch.stop()
        if state.collectors_settling is not None:
            state.collectors_settling.cancel()
        if state.access_recheck is not None:
            state.access_recheck.cancel()
        for task in list(state.event_passes):
            task.cancel()
        await asyncio.gather(*state.event_passes, return_exceptions=True)
    # The schedule's passes and the periodic permission check run on until cancelled below (while the event passes
    # above are awaited): ``stopping`` keeps a refused pass from starting a check then, but the periodic one starts
    # its check all the same. So the check under way is cancelled again once nothing is left to start one: left
    # running, it failed with the client closed under it (a traceback at exit), or held the exit up for kopf's 5 s.
    for name in ("scheduler", "standby", "heartbeat", "releasing", "access"):
        background = memo.get(name)
        if isinstance(background, asyncio.Task):
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
    if isinstance(state, OperatorState) and state.access_recheck is not None:
        state.access_recheck.cancel()
        await asyncio.gather(state.access_recheck, return_exceptions=True)
    if isinstance(state, OperatorState):
        # Once no pass is left to start one: the collector reads the passes shared, which their stop does not end.
        await state.collectors.stop()
        # And once the standby watch, which starts it, is stopped: the write of the watched namespaces on the peering
        # object (a failed startup's ran on beside kopf's backoff and the next attempt's own write).
        if state.publishing is not None:
            state.publishing.cancel()
            await asyncio.gather(state.publishing, return_exceptions=True)


class _ObjectLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Names the resource in each line of a pass the schedule runs (kopf does so for its handlers' loggers)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['object']}: {msg}" if self.extra else msg, kwargs


async def _run_schedule(memo: Any, state: OperatorState, logger: logging.Logger | Any) -> None:
    """Run each resource's retry or resync when it is due, a few at a time, until cancelled."""
    running: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(SCHEDULED_PASSES)

    async def one(key: tuple[str, str], why: str) -> None:
        async with slots:
            if _paused(state):
                return  # another replica is active; all get a pass when this one resumes
            owner = state.bodies.get(key)
            if owner is None or owner["metadata"].get("deletionTimestamp"):
                state.schedule.forget(key)
                return
            try:
                await _reconcile(memo, owner, why, _ObjectLog(logger, {"object": "/".join(key)}))
            except Exception:  # a bug, not an API error: keep retrying the resource rather than lose it
                logger.exception("pass (%s) for %s/%s failed", why, *key)
                state.schedule.failed(key)

    try:
        while True:
            state.wake.clear()
            for key, why in state.schedule.pop_due():
                context = state.kopf_context.copy() if state.kopf_context is not None else None
                task = asyncio.create_task(one(key, why), context=context)
                running.add(task)
                task.add_done_callback(running.discard)
            when = state.schedule.next_time()
            timeout = None if when is None else max(0.0, when - state.schedule.clock())
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives just as the
            # event is set (CPython gh-86296), and then cleanup would wait for this task forever.
            waiter = asyncio.ensure_future(state.wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _reconcile(
    memo: Any,
    body: Mapping[str, Any],
    trigger: str,
    logger: logging.Logger | Any,
    answered: Callable[[rec.Outcome], bool] | None = None,
) -> rec.Outcome | None:
    """Run a pass for one LLMTelemetry, unless the last pass already answers this request; None when the pass
    failed on an API error (reported, and retried later), or when this replica stands by (then the replica gives
    every resource a pass when it resumes, see :func:`_check_standby`).

    Events come in bursts (a pass's own writes, a restart's listings, four children per resource); the
    passes they ask for wait on the resource's lock, and each pass lists and reads everything afresh. So a
    pass that *started* after a request arrived has seen at least the state that request was about, and the
    request is answered with its outcome instead of a pass of its own. ``answered`` lets a caller say what
    else in the last pass's outcome answers it; it is asked once the lock is held, after any pass in flight.

    Every pass schedules the resource's next one of the operator's own: a retry with backoff when it failed or
    left something to retry, else its resync. Events are posted for failures the last pass did not report, so a
    retry that meets the same failure writes nothing.
    """
    meta = body["metadata"]
    requested = time.monotonic()
    state = _state(memo)
    key = (meta["namespace"], meta["name"])
    uid = meta.get("uid") or ""
    async with _lock(memo, *key):
        if _paused(state):
            # kopf's own handlers run here too: kopf holds them while another replica is active, but not while this
            # one has yet to look at the peering object again after a freeze, or stands by as its entry is missing.
            return None
        if uid and state.gone.get(key) == uid:
            return None  # found gone: this body is older than that read (see OperatorState.gone)
        last = state.passes.get(key)
        if last is not None and (last[0] > requested or (answered is not None and answered(last[1]))):
            metrics.RECONCILES.labels(trigger, "coalesced").inc()
            return last[1]
        started = time.monotonic()
        state.passes.pop(key, None)
        # The newest body seen (a spec may have changed while this request waited), with our own last status.
        latest = state.bodies.get(key)
        if latest is not None and (latest["metadata"].get("uid") or "") == uid:
            body = latest
        if state.tracked_breaks.get(key, 0) < _breaks(state, key[0]):
            reread = await _reread_after_gap(memo, state, key, body, logger)
            if reread is None:
                # Gone, or made anew, while the watches were away: a pass with the body had before would inject the
                # old spec again (a rollout) for a resource that no longer wants it. Forgotten, as kopf's watch, had
                # it listed anew after a 410, would never say it went (a new one of that name it does deliver).
                _forget_unreported(memo, state.logger or logger, state, key, uid)
                return None
            body = reread
        if body["metadata"].get("deletionTimestamp"):
            # Being deleted: the body this pass was asked for predates it, and kopf's watch (or the read after a
            # gap) brought the deletion while the pass waited. The deletion's handler undoes what the passes did; a
            # pass now would redo it first (an injection, a rollout each way).
            logger.info("being deleted: no pass (the deletion's handler undoes what the passes did)")
            return None
        held: contextvars.Token[Any] | None = None
        try:
            claimed = await _claim(memo, body, logger)
            if claimed is None:
                if _holder(state.bodies.get(key) or body) in state.holders_gone:
                    # That operator was seen gone once: looked at again once that can be confirmed.
                    state.schedule.again(key, _config(memo).timers.takeover_confirm_seconds + 1)
                else:
                    state.schedule.succeeded(key, uid)  # looked at again at the resync: the other operator may go
                state.wake.set()
                return None
            if claimed is not body:
                # Claimed now: the pass compares against the status stored (which may name another operator), not
                # against the one this operator last wrote.
                state.statuses.pop(uid, None)
                body = claimed
            else:
                # Taken as this operator's from the body known: its writes stop should another operator claim it now.
                held = _PASS_HELD.set((asyncio.current_task(), key))
            written = state.statuses.get(uid)
            outcome = await rec.reconcile(
                _client(memo),
                _config(memo),
                body if written is None else {**body, "status": written},
                _peers(memo, key),
                state.collectors,
                state.index.recorded(key),
                functools.partial(state.index.gone, key),
            )
            if uid and outcome.status:
                state.statuses[uid] = outcome.status
            state.passes[key] = (started, outcome)
            state.index.serve(key, outcome.targets)
            if key in state.bodies:
                _await_collectors(memo, state, key, outcome.awaiting)
                _await_pricing(memo, state, key, outcome.awaiting_prices)
            else:  # deleted while this pass ran (_forget has stopped its watches): start none for it
                _await_collectors(memo, state, key, frozenset())
                _await_pricing(memo, state, key, frozenset())
        except WriteWithheld:
            holder = _holder(state.bodies.get(key) or body)
            if not state.standby and holder is not None and holder != _config(memo).peering:
                # Another operator claimed the resource while this pass ran: that one writes now, and the next pass
                # here leaves the resource to it (and says so).
                logger.info("pass (%s) stopped: the resource is served by operator %r now", trigger, holder)
                state.schedule.succeeded(key, uid)
                state.wake.set()
                return None
            # This replica began to stand by while the pass ran: what it worked out is not written.
            logger.info("pass (%s) stopped: this replica stands by", trigger)
            return None
        except Exception as exc:
            # An API error after the client's retries; or a defect of ours, which kopf must not see either: its
            # handler retries would patch the resource on every attempt, with nothing in the status or events.
            api = isinstance(exc, ApiError)
            if api and TERMINATING in str(exc) and await _namespace_leaving(_client(memo), key[0]):
                _leave_be(state, key, uid, trigger, str(exc))
                return None
            if isinstance(exc, ApiError) and exc.status == 403 and _nothing_known_missing(state, key[0]):
                # Refused, with nothing known missing here: a Role or ClusterRole changed since the last check,
                # which then names what is missing, once (and the periodic check notices its return).
                _recheck_access(memo, state, logger, key[0])
            reason = "ApiError" if api else "InternalError"
            message = clipped(str(exc) if api else f"{type(exc).__name__}: {exc}")
            metrics.RECONCILES.labels(trigger, "error").inc()
            metrics.RECONCILE_ERRORS.labels(reason).inc()
            when = state.schedule.failed(key, exc.retry_after if isinstance(exc, ApiError) else None)
            new = await _report_failure(memo, body, reason, message)
            state.wake.set()
            wait = when - state.schedule.clock()
            if api:
                logger.warning("pass (%s) failed: %s; retrying in %.0f s", trigger, exc, wait)
            else:
                # The traceback once per distinct failure; retries that meet it again say so in one line.
                logger.error("pass (%s) failed: %s; retrying in %.0f s", trigger, message, wait, exc_info=new)
            return None
        finally:
            if held is not None:
                _PASS_HELD.reset(held)
            metrics.RECONCILE_DURATION.observe(time.monotonic() - started)
    if any(TERMINATING in message for _, message in outcome.failures) and await _namespace_leaving(
        _client(memo), key[0]
    ):
        # The namespace controller deletes the children before the resource: recreating them is refused, and so
        # would the events be. Nothing to repair or report there; the resource's own deletion comes next.
        _leave_be(state, key, uid, trigger, "; ".join(m for _, m in outcome.failures if TERMINATING in m))
        return outcome
    if _nothing_known_missing(state, key[0]) and any(
        FORBIDDEN in message and refusals.authorization_refusal(message) for _, message in outcome.failures
    ):
        # A part of the pass refused by the authorizer (a workload's patch, a child's write), with nothing known
        # missing here. An admission step's 403 (a quota exceeded, a webhook's denial) is no permission's: a check
        # would find nothing, and a quota that stays exceeded would have one made every access_recheck_seconds.
        _recheck_access(memo, state, logger, key[0])
    if outcome.retry:
        state.schedule.failed(key)
    else:
        state.schedule.succeeded(key, uid)
    for peer in sorted(outcome.handed):
        handed = state.bodies.get((key[0], peer))
        if handed is not None and not handed["metadata"].get("deletionTimestamp"):
            _start_pass(memo, logger, state, (key[0], peer), handed, "handover", lambda _outcome: False)
    _tell_keepers(memo, logger, state, key, outcome.holders)
    state.wake.set()
    result = "ready" if outcome.ready else "invalid" if outcome.invalid else "degraded"
    if result == "degraded" and outcome.phase == "Pending":
        result = "pending"  # nothing injected by it (see the CRD's phase): an alert on degraded passes is not for it
    metrics.RECONCILES.labels(trigger, result).inc()
    # What the stored status already says was reported before (a restart's resume posts no event for a failure the
    # resource shows already, also when the first pass after it failed), and what this operator posted since.
    reported = state.reported[key] if key in state.reported else _stored_reports(body)
    stored = [str(x.get("message")) for x in (body.get("status") or {}).get("conditions") or []]
    reported |= {f for f, words in outcome.shown.items() if any(words in message for message in stored)}
    for reason, message in outcome.failures:
        metrics.RECONCILE_ERRORS.labels(reason).inc()
        if (reason, message) not in reported:
            kopf.warn(_event_target(body), reason=reason, message=message)
    for reason, message in outcome.notices:
        if (reason, message) not in reported:
            kopf.event(_event_target(body), type="Normal", reason=reason, message=message)
    state.reported[key] = frozenset(outcome.failures + outcome.notices)
    if outcome.invalid:
        # The targets of an invalid spec are the last valid one's, kept as they were: the log says why instead.
        logger.warning("reconciled (%s): invalid: %s", trigger, "; ".join(message for _, message in outcome.failures))
    else:
        logger.info("reconciled (%s): %s, targets %s", trigger, result, outcome.targets)
    return outcome


@kopf.on.resume(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.create(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.update(c.GROUP, c.VERSION, c.PLURAL)
async def llmtelemetry_reconcile(body: kopf.Body, reason: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    # Answered by a pass that already applied this very spec (say one a workload event ran first).
    applied = (body["metadata"].get("uid") or "", body["metadata"].get("generation"))
    answered = (lambda outcome: outcome.applied == applied) if applied[0] and applied[1] is not None else None
    trigger = str(reason)
    if trigger == "create" and (body.get("status") or {}).get("observedGeneration") is not None:
        trigger = "update"  # kopf's create: the generation is not the observed one (see diffbase.py)
    # A failed or degraded pass is retried by the schedule (no kopf retry: see schedule.py); an invalid spec waits
    # for the spec to change. Either way the handler returns: the status, the event and the pass's log line say what
    # went wrong, where a kopf PermanentError added an ERROR line ("failed permanently") at every operator start for
    # a mistake in a user's resource, which is no error of the operator's.
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    handling = _state(memo).handling
    handling[key] = handling.get(key, 0) + 1
    try:
        await _reconcile(memo, body, trigger, logger, answered=answered)
    finally:
        handling[key] -= 1
        if not handling[key]:
            del handling[key]


@kopf.on.delete(c.GROUP, c.VERSION, c.PLURAL)
async def llmtelemetry_delete(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, retry: int = 0, **_: Any) -> None:
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    # Not done, nor the finalizer removed, while this replica stands by: the active replica does it (kopf there sees
    # the deletion too), or this one once it is active again. Waited for here: each kopf retry patches the resource
    # twice (its progress annotations), one every poll would be a write a second.
    polls = 0
    while _paused(_state(memo)):
        if polls == _state(memo).delete_wait_polls:
            raise kopf.TemporaryError("this replica stands by", delay=STANDBY_POLL_SECONDS)
        await asyncio.sleep(STANDBY_POLL_SECONDS)
        polls += 1
    # Served by another operator that runs (see _held_elsewhere): that one cleans up and takes the finalizer off,
    # which both share; taken off here first, what that one injected would stay.
    polls = 0
    seen: Mapping[str, Any] = body
    while (holder := await _held_elsewhere(memo, seen)) is not None:
        if polls == _state(memo).delete_wait_polls:
            raise kopf.TemporaryError(f"left to operator {holder!r}", delay=STANDBY_POLL_SECONDS)
        await asyncio.sleep(STANDBY_POLL_SECONDS)
        polls += 1
        # Read from the API server: kopf delivers this resource's next events only once this handler returns.
        current = await _read_again(memo, key, meta.get("uid") or "")
        if current is None:
            return  # gone (that operator cleaned up and took the finalizer off), or made anew: not this one's
        seen = current
    _track(_state(memo), body)  # known as leaving to the passes below, whatever the watch has delivered yet
    await _records_listed(_state(memo), key[0])
    try:
        # The peers that win its workloads next take them over first, each in one patch (see PeerView.leaving);
        # what is left is undone below. Their passes take their own locks, and none of them waits on this one's.
        recorded = _state(memo).index.recorded(key)
        for successor, _spec in await rec.successors(_client(memo), body, _peers(memo, key), recorded):
            await _reconcile(memo, successor, "handover", logger)
        async with _lock(memo, *key):
            touched = await rec.remove_injection(_client(memo), _config(memo), body, _state(memo).index.recorded(key))
            # Deleted with propagationPolicy=Orphan (`kubectl delete --cascade=orphan`), the API server's finalizer
            # "orphan" has the garbage collector take the owner references off the children, which stay: deleting
            # those it has not reached yet would leave a random part of them.
            orphaning = "orphan" in (meta.get("finalizers") or ())
            deleted = 0 if orphaning else await rec.delete_children(_client(memo), body)
        logger.info("removed injection from %s and deleted %d children", touched or "no workloads", deleted)
        refusal = await rec.update_refused(_client(memo), body)
        if refusal is not None:
            message = (
                "the API server refuses every update of this resource, so its finalizer cannot be removed and it "
                "stays until the CRD admits it again (see Upgrading in docs/install.md): " + refusal
            )
            message = clipped(message)
            logger.error("%s", message)
            kopf.warn(_event_target(body), reason="UpdateRefused", message=message)
        elif await _still_refused(
            memo,
            access.Grant(c.GROUP, c.PLURAL, "patch", key[0]),
            unknown=_forbidden_patch(_state(memo), key[0]) is not None,
        ):
            # kopf's removal of the finalizer, next, is refused (and retried every 30 s): without a word here the
            # deletion just hangs (`kubectl delete` waits), the resource showing only its deletionTimestamp.
            message = access.finalizer_message(*key)
            logger.error("%s", message)
            kopf.warn(_event_target(body), reason=access.REASON, message=message)
    except WriteWithheld as exc:
        raise kopf.TemporaryError("this replica stands by", delay=STANDBY_POLL_SECONDS) from exc
    except Exception as exc:
        # In a namespace being deleted, everything the resource made goes with the namespace; in namespaced mode
        # the chart's Role there may already be gone (403), and retrying would hold the namespace up for good.
        if not isinstance(exc, ApiError) or not await _namespace_leaving(_client(memo), key[0]):
            await _cleanup_failed(memo, body, logger, exc, retry)
        logger.info("namespace %s is being deleted, and with it what this resource made (%s)", key[0], exc)
    _state(memo).bodies.pop(key, None)
    _state(memo).specs.pop(key, None)
    _state(memo).index.remove(key)
    _state(memo).schedule.forget(key)
    state = _state(memo)
    for peer_key, (_started, outcome) in list(state.passes.items()):
        # A peer that left workloads to this one, which had yet to take them: they are its own to undo or keep.
        peer = state.bodies.get(peer_key)
        if peer_key[0] == key[0] and key[1] in outcome.handed and peer is not None:
            _start_pass(memo, logger, state, peer_key, peer, "handover", lambda _outcome: False)
    state.passes.pop(key, None)
    _tell_keepers(memo, logger, state, key, ())  # (those that kept a workload it won: it wins none now)


#: The longest a deletion waits for the workloads' watches to have listed them (see _records_listed).
RECORDS_WAIT_SECONDS: Final = 10.0


async def _records_listed(state: OperatorState, namespace: str) -> None:
    """Wait (up to RECORDS_WAIT_SECONDS) until the watches of the workloads of ``namespace`` have delivered their first
    lists, so that the injection records are known: a deletion finds the workloads its selector no longer selects (one
    it was handing over) only by their records. Just after a start, it found such a workload only once its removal was
    under way: the injection was removed, and the resource next in line injected its own, two rollouts instead of one
    swap (or, with no resource next in line, the injection stayed, its record naming a resource that is gone)."""
    watches = [
        watch
        for watch in state.watches or ()
        if watch.resource in kube.WORKLOADS.values()
        and watch.namespace in (None, namespace)
        and not watch.listed.is_set()
    ]
    if not watches:
        return
    waits = [asyncio.ensure_future(watch.listed.wait()) for watch in watches]
    try:
        await asyncio.wait(waits, timeout=RECORDS_WAIT_SECONDS)
    finally:
        for wait in waits:
            wait.cancel()
    for watch in watches:
        # Waited for once: a watch that cannot list (refused, say) holds no later deletion up.
        watch.listed.set()


def _tell_keepers(
    memo: Any, logger: Any, state: OperatorState, key: tuple[str, str], holders: Collection[tuple[str, str]]
) -> None:
    """Start a pass of each peer whose status is not as ``holders`` (see ``Outcome.holders``; none when the resource
    is deleted) has it: one that keeps serving a workload this resource wins but cannot inject yet says so, and one
    that said so of a workload this resource no longer wins (deleted, its selector changed) says so no more. Nothing
    is written to the workload either way, so no watch event would start those passes; the peer's resync would."""
    namespace, winner = key
    told = {(namespace, peer) for peer, _workload in holders}
    for peer_key, (_started, outcome) in list(state.passes.items()):
        if peer_key[0] == namespace and peer_key != key and any(w == winner for w, _ in outcome.kept_for):
            told.add(peer_key)
    for peer_key in sorted(told):
        wanted = {(winner, workload) for peer, workload in holders if peer == peer_key[1]}
        body = state.bodies.get(peer_key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            continue
        seen = state.passes.get(peer_key)
        if seen is not None and {(w, wl) for w, wl in seen[1].kept_for if w == winner} == wanted:
            continue  # its status says so already

        def answered(outcome: rec.Outcome, wanted: set[tuple[str, str]] = wanted) -> bool:
            return {(w, wl) for w, wl in outcome.kept_for if w == winner} == wanted

        _start_pass(memo, logger, state, peer_key, body, "conflict", answered)


def _holder(body: Mapping[str, Any]) -> str | None:
    """The operator that serves the resource, as its status says (by the name of its peering object)."""
    holder = (body.get("status") or {}).get("operator")
    return holder if isinstance(holder, str) and holder else None


#: The resource whose pass runs in this task, when the pass took it as this operator's from the body it knew (see
#: :func:`_claim`, read by :func:`_claim_holds`), with that task: a task started meanwhile (a watch's delivery, a
#: pass of another resource) inherits the variable, and is not that pass.
_PASS_HELD: contextvars.ContextVar[tuple[asyncio.Task[Any] | None, tuple[str, str]] | None] = contextvars.ContextVar(
    "llmt_pass_held", default=None
)


def _claim_holds(state: OperatorState, config: OperatorConfig) -> bool:
    """Whether the pass running here may still write: unless the resource's status has named another operator since
    the pass took the resource as this one's. Asked before every write (with the standby, see the startup).

    A pass takes a resource it knows as its own without reading it again (see :func:`_claim`), and runs for a while
    (reads, then writes). Another operator's claim meanwhile (a status saying that operator serves it, which the
    watch brings here) made the two operators each write their own injection, two rollouts of its workloads: the pass
    under way here, which read the claim before, then the other operator putting its own back. The status reaches
    this operator through its watch of the resources, which delivers it in order: any body newer than the one the
    pass began with that names another operator is that operator's claim."""
    held = _PASS_HELD.get()
    if held is None or held[0] is not asyncio.current_task():
        return True
    key = held[1]
    latest = state.bodies.get(key)
    holder = _holder(latest) if latest is not None else None
    return holder is None or holder == config.peering


async def _confirm_claim(memo: Any) -> None:
    """Before a write of the pass running here, while kopf's handler for its resource runs: read the resource again,
    and refuse the write (:class:`WriteWithheld`) when its status names another operator now.

    :func:`_claim_holds` judges by the body kopf's watch last delivered, but kopf holds a resource's events while
    its handler for it runs (a creation, a change of spec, a resume), and the pass of that handler, or one of this
    operator's own waiting on it, heard of another operator's claim only once it had ended. Tested on a real API
    server: a claim 30 ms after a change of spec, and the pass of it wrote its injection and a status naming
    this operator after it; the two operators then put their own settings back over each other's (four rollouts
    of the workload). One list by name per write then (a second, consistent, when it names another operator), and
    none at all when kopf runs no handler for the resource: a pass that finds nothing to change writes nothing, and
    reads nothing more."""
    held = _PASS_HELD.get()
    if held is None or held[0] is not asyncio.current_task():
        return
    state, key = _state(memo), held[1]
    if not state.handling.get(key):
        return
    known = state.bodies.get(key)
    if known is None:
        return
    uid = known["metadata"].get("uid") or ""
    current: Mapping[str, Any] | None = None
    try:
        current = await _read_again(memo, key, uid)
        if current is not None and _holder(current) not in (None, _config(memo).peering):
            # Confirmed by a consistent list before the pass stops: behind several API servers, one's cache may lag
            # and still show the operator this one took the resource over from.
            found = await _client(memo).list(
                kube.LLMTELEMETRIES, key[0], fields={"metadata.name": key[1]}, consistent=True
            )
            current = next((item for item in found if (item["metadata"].get("uid") or "") == uid), None)
    except ApiError:
        return  # unknown: the write goes ahead, and fails too if the API server is away
    holder = _holder(current) if current is not None else None
    if current is None or holder is None or holder == _config(memo).peering:
        return
    if _generation(current) >= _generation(known):
        _track(state, current)  # as kopf's watch will deliver it: the pass's end and the next pass read it
    raise WriteWithheld(f"the resource is served by operator {holder!r} now")


async def _held_elsewhere(memo: Any, body: Mapping[str, Any]) -> str | None:
    """The name of another operator serving this resource, unless it has been without a live replica for its grace,
    ``Timers.takeover_grace_seconds`` (or its peering object is gone), or its peering object says it no longer watches
    the resource's namespace; else None. Always None with peering off.

    Two releases of the operator whose watched namespaces overlap (one cluster-wide, one for a team's namespaces)
    each see the resources there, and their settings differ (endpoints, labels): each would put its own injection
    back over the other's, a rollout a pass, without end. The status names the operator that claimed the resource
    (see :func:`_claim`), by its peering object; another operator leaves the resource to it while it runs and
    watches the namespace (see :func:`_publish_watched`)."""
    config = _config(memo)
    holder = _holder(body)
    if config.standalone or holder is None or holder == config.peering:
        return None
    state = _state(memo)
    timers = config.timers
    now = time.monotonic()
    checked = state.holders.get(holder)
    if checked is None or now - checked[0] > timers.holder_check_seconds:
        try:
            found = await _client(memo).list(kube.CLUSTERKOPFPEERINGS, None, fields={"metadata.name": holder})
        except NotFoundError:
            found = []  # no peering CRD: no operator of that name runs with peering
        except ApiError:
            return holder  # unknown: left alone this time, looked at again at the next pass
        current = datetime.datetime.now(datetime.UTC)
        horizon = current - datetime.timedelta(seconds=timers.takeover_grace_seconds)
        lives = [
            until
            for peering in found
            for peer in (peering.get("status") or {})
            if (until := alive_until(peering.get("status"), peer)) is not None
        ]
        alive = any(until > horizon for until in lives) or any(
            stopped > horizon for peering in found if (stopped := _stopped_at(peering)) is not None
        )
        if any(until > current for until in lives):
            state.holders_idle.discard(holder)
        else:
            state.holders_idle.add(holder)
        if alive:
            state.holders_gone.pop(holder, None)
        else:
            # Seen gone once: maybe between kopf taking a stopping replica's entry out and the operator's cleanup
            # saying it stopped. Taken as gone only once seen so again, takeover_confirm_seconds later.
            first = state.holders_gone.get(holder)
            if first is None or now - first > timers.takeover_confirm_seconds + TAKEOVER_CONFIRM_WINDOW_SECONDS:
                first = state.holders_gone[holder] = now
            alive = now - first < timers.takeover_confirm_seconds
        checked = state.holders[holder] = (now, alive, _watched(found))
    _, alive, watched = checked
    return holder if alive and (watched is None or body["metadata"]["namespace"] in watched) else None


def _watched(peerings: list[dict[str, Any]]) -> frozenset[str] | None:
    """The namespaces the operator of a peering object watches, as the object says (see :func:`_publish_watched`);
    None for every namespace, or when it does not say so in a way to rely on: no annotation (an operator from
    before it said so), one that is not a list of namespace names, or one written by a replica with no entry in the
    object now (a rollback to such an operator)."""
    for peering in peerings:
        annotations = _annotations(peering)
        said, by = annotations.get(c.ANNOTATION_WATCHED), annotations.get(c.ANNOTATION_WATCHED_BY)
        if not isinstance(said, str) or by not in (peering.get("status") or {}):
            continue
        names = [name.strip() for name in said.split(",")]
        if names and all(is_dns_label(name) for name in names):
            return frozenset(names)
    return None


def _annotations(peering: Mapping[str, Any]) -> Mapping[str, Any]:
    """A peering object's annotations (none when it has none)."""
    return (peering.get("metadata") or {}).get("annotations") or {}


def _stopped_at(peering: Mapping[str, Any]) -> datetime.datetime | None:
    """When the operator of a peering object last stopped, as the object says (see :func:`_mark_stopped`)."""
    said = _annotations(peering).get(c.ANNOTATION_STOPPED)
    try:
        when = datetime.datetime.fromisoformat(str(said))
    except ValueError:
        return None
    when = when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
    ahead = when - datetime.datetime.now(datetime.UTC)
    return None if ahead.total_seconds() > STOP_MARK_SKEW_SECONDS else when  # a future one would hold for ever


async def _read_again(memo: Any, key: tuple[str, str], uid: str) -> dict[str, Any] | None:
    """The LLMTelemetry ``key`` as the API server has it now (see :func:`_named`), or None when it is gone or is
    another resource of that name (``uid``)."""
    found = await _named(memo, key, uid)
    return found[0] if found and (found[0]["metadata"].get("uid") or "") == uid else None


async def _named(memo: Any, key: tuple[str, str], uid: str | None) -> list[dict[str, Any]]:
    """The LLMTelemetry resources named ``key``, which a caller that finds none of ``uid`` among them takes for gone,
    and forgets: confirmed by a consistent list then (see :func:`reconcile.named_resources`). Forgotten while it
    exists, a resource got no pass until its next change and its workloads went to the next in line."""
    return await rec.named_resources(_client(memo), key[0], key[1], lambda item: item["metadata"].get("uid") == uid)


async def _reread_after_gap(
    memo: Any, state: OperatorState, key: tuple[str, str], body: Mapping[str, Any], logger: Any
) -> Mapping[str, Any] | None:
    """The LLMTelemetry ``key`` read again, for a pass to run with, when its body was last had before a watch failed;
    None when it is gone or another resource has its name (no pass is to run with ``body`` then).

    The watches of the workloads and children resume by themselves, often before kopf's watch of the LLMTelemetry
    resources has listed them again after the same gap (kopf's retries wait longer); their events then started
    passes with a body from before the gap, so a spec edited meanwhile was applied in its old form first and in its
    new one a second later, when kopf's watch delivered it: a rollout of every workload too many. One list by name
    per resource after each failure of the watches; none otherwise. When it fails, the pass runs with ``body``, as it
    did before, and the next pass tries again."""
    breaks = _breaks(state, key[0])
    uid = body["metadata"].get("uid") or ""
    had = state.bodies.get(key)
    try:
        current = await _read_again(memo, key, uid)
    except ApiError as exc:
        logger.debug("could not read the resource again after a watch failed (%s); passing with the last body", exc)
        return body
    if state.bodies.get(key) is not had:
        # kopf's watch delivered it meanwhile (as new as the read, or newer), or that it is gone (forgotten), or a
        # new resource of that name (its own handlers give it its passes: this one's uid is not its uid).
        newer = state.bodies.get(key)
        return newer if newer is not None and (newer["metadata"].get("uid") or "") == uid else None
    if current is None:
        return None  # deleted meanwhile (its finalizer taken off by hand, or by another operator), or made anew
    state.tracked_breaks[key] = breaks
    if _generation(current) < _generation(body):
        # The list is served from an API server's watch cache, which may lag behind the one kopf's watch reads
        # (several API servers): an older body than the one had is not taken back. (A deletion raises the
        # generation too, so none is taken back either.)
        return body
    _track(state, current)
    state.tracked_breaks[key] = breaks
    return state.bodies[key]


def _generation(body: Mapping[str, Any]) -> int:
    """A resource's ``metadata.generation`` (0 when it has none), which every change of its spec raises."""
    generation = body.get("metadata", {}).get("generation")
    return generation if isinstance(generation, int) else 0


def _watch_broken(memo: Any, namespace: str | None) -> None:
    """A watch of the workloads or children of ``namespace`` (None: of every namespace) failed (see
    :mod:`childwatch`): every LLMTelemetry body of that namespace had before may be stale until it is read again (see
    _reread_after_gap).

    Of that namespace only: an outage of the API server (or its history expired) breaks every watch, each watched
    namespace's included, while one watch's own failure (a connection reset) says nothing of kopf's watches of the
    other namespaces, whose workloads' events come through watches that did not fail. (With one watch per namespace,
    a namespace's failure had every resource of every namespace listed again at its next pass.)"""
    breaks = _state(memo).watch_breaks
    breaks[namespace] = breaks.get(namespace, 0) + 1


def _breaks(state: OperatorState, namespace: str) -> int:
    """How many times a watch covering ``namespace`` failed: its own, or one of every namespace."""
    return state.watch_breaks.get(None, 0) + state.watch_breaks.get(namespace, 0)


async def _claim(memo: Any, body: Mapping[str, Any], logger: Any) -> Mapping[str, Any] | None:
    """The resource's body once this operator has claimed it (``body`` itself when it had), or None when another
    operator serves it (said once, see :func:`_leave_to`) or it is gone.

    The claim is the operator's name in ``status.operator``, written only over the resource version just read: of
    two operators claiming a new resource at once, the API server lets one write it (409 for the other, which then
    reads it and leaves the resource alone). Both injecting would be rollouts under both settings."""
    config = _config(memo)
    state = _state(memo)
    meta = body["metadata"]
    key, uid = (meta["namespace"], meta["name"]), meta.get("uid") or ""
    holder = _holder(body)
    if config.standalone or holder == config.peering or (holder is None and uid in state.claimed):
        state.left.pop(key, None)
        return body
    client = _client(memo)
    for _ in range(3):
        # Read afresh: the body a handler is given predates kopf's finalizer, say, and another claim may be newer.
        current = await _read_again(memo, key, uid)
        if current is None:
            return None
        body = current
        holder = _holder(body)
        if holder == config.peering:
            break
        if holder is not None and (await _held_elsewhere(memo, body)) is not None:
            if holder not in state.holders_gone:  # (else it looks gone: no event while that is confirmed)
                _leave_to(memo, body, holder, logger)
            return None
        patch = {
            "metadata": {"resourceVersion": body["metadata"].get("resourceVersion")},
            "status": {"operator": config.peering},
        }
        try:
            await client.patch(kube.LLMTELEMETRIES, *key, patch, subresource="status", metadata_only=True)
        except ConflictError:
            continue  # written meanwhile: read it again
        except NotFoundError:
            return None
        if holder is not None:
            alive = state.holders.get(holder, (0.0, False, None))[1]
            gone = f"no longer watches namespace {key[0]}" if alive else "has not run for a while"
            logger.info("took this resource over from operator %r, which %s", holder, gone)
        break
    else:
        return None  # written between each read and claim: the resync looks again
    state.left.pop(key, None)
    state.claimed.add(uid)
    return {**body, "status": {**(body.get("status") or {}), "operator": config.peering}}


#: The characters of a peering name a WatchedTwice message quotes; a longer one (they may have 253) is cut, with a
#: marker, so that the whole message, with its four names, stays within MAX_MESSAGE_CHARS (kopf cuts a longer event
#: message in its middle, and the operator cut its own at the end, mid-sentence).
NAME_IN_MESSAGE_CHARS = 120


def _quoted(name: str) -> str:
    """``name`` in quotes, cut to NAME_IN_MESSAGE_CHARS with a ``…`` where it is longer."""
    if len(name) > NAME_IN_MESSAGE_CHARS:
        name = name[: NAME_IN_MESSAGE_CHARS - 1] + "…"
    return f"'{name}'"


def watched_twice_message(holder: str, own: str, namespace: str, idle: bool, grace_seconds: float) -> str:
    """The WatchedTwice event's (and log line's) words: the resource in ``namespace`` is left to the operator of
    peering object ``holder`` (with no replica running now, but one recently: ``idle``) by this one, ``own``, which
    takes it over once that one has been gone ``grace_seconds`` (``Timers.takeover_grace_seconds``)."""
    other, this = _quoted(holder), _quoted(own)
    if not idle:
        return (
            f"served by the operator of peering object {other}; this operator ({this}) watches namespace {namespace}"
            " too and leaves the resource to it while it runs. Two releases of the operator watch this namespace:"
            " take it out of the watchNamespaces of the release not meant to serve it. If that name is this"
            " release's own former peering name (a switch between cluster-wide and namespaced mode: the old pods'"
            " entries outlive them by up to their peering lifetime, a minute by default), there is no second"
            " release: delete that peering object once its pods are gone, and the resource is taken over at its next"
            " resync"
        )
    grace = f"{grace_seconds / 60:g} minutes"
    return (
        f"left to the operator of peering object {other}, which has no replica running now but had one within {grace}"
        f" (a restart, or a rollout), so it counts as restarting; this operator ({this}) takes the resource over at"
        f" its first resync after that has been gone {grace}. If that name is this release's own former peering name"
        " (a switch between cluster-wide and namespaced mode), delete that peering object once its pods are gone:"
        " the resource is then taken over at its next resync"
    )


def _leave_to(memo: Any, body: Mapping[str, Any], holder: str, logger: Any) -> None:
    """Say that this operator leaves the resource to another one: once per resource and holder, and once more if
    the holder was idle when first said (counting as restarting) and is found running since, which is then a
    second release watching the namespace, for the user to act on."""
    state = _state(memo)
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    idle = holder in state.holders_idle
    said = state.left.get(key)
    if said is not None and said[0] == holder and (said[1] == idle or not said[1]):
        return  # said so already (running then, idle now: a restart of the other, which says nothing new)
    state.left[key] = (holder, idle)
    config = _config(memo)
    message = watched_twice_message(holder, config.peering, key[0], idle, config.timers.takeover_grace_seconds)
    message = clipped(message)
    logger.warning("%s", message)
    kopf.warn(_event_target(body), reason="WatchedTwice", message=message)


async def _report_failure(
    memo: Any, body: Mapping[str, Any], reason: str, message: str, *, event: bool = True, write_status: bool = True
) -> bool:
    """A failed pass or clean-up, where a user looks: a Warning event once per distinct failure, and Ready False
    with it in the status (in a namespace where no event can be posted, namespaced mode's watched namespace
    created again with no Role until the chart is upgraded, the status is all a user can see). Returns whether
    the failure is new (not the one reported last). ``event``, ``write_status``: False where the operator knows it may
    not write that (see :func:`_report_forbidden`)."""
    state = _state(memo)
    meta = body["metadata"]
    key, uid = (meta["namespace"], meta["name"]), meta.get("uid") or ""
    failure = (reason, message)
    # What was reported before stays reported: a failed pass keeps the other conditions in the status, so the next
    # pass that gets through posts no event again for a failure the resource still shows.
    reported = state.reported[key] if key in state.reported else _stored_reports(body)
    new = failure not in reported
    if new:
        if event:
            kopf.warn(_event_target(body), reason=reason, message=message)
        if len(reported) >= MAX_REPORTED:
            # Failures of a pass each differ (an API error's message names what it was doing): kept bounded.
            reported = _stored_reports(body)
    state.reported[key] = reported | {failure}
    if not write_status:
        return new
    shown = {**body, "status": state.statuses[uid]} if uid in state.statuses else body
    status = await rec.write_failure(_client(memo), shown, reason, message)
    if uid and status is not None:
        state.statuses[uid] = status
    return new


#: Distinct failures remembered as reported for one resource while its passes fail.
MAX_REPORTED: Final = 64
#: What the API server says when refusing to create anything in a namespace being deleted.
TERMINATING: Final = "because it is being terminated"
#: How a refusal (403) reads in a failure's message (the client's ApiError: "<status> <reason>: <message>").
FORBIDDEN: Final = "403 Forbidden:"


def _leave_be(state: OperatorState, key: tuple[str, str], uid: str, trigger: str, why: str) -> None:
    """A pass in a namespace being deleted: no retry, no event (none could be posted there), a line in the log."""
    state.schedule.succeeded(key, uid)
    state.wake.set()
    metrics.RECONCILES.labels(trigger, "namespace_leaving").inc()
    logging.getLogger(__name__).info(
        "%s/%s: pass (%s): namespace being deleted, nothing repaired or reported (%s)", *key, trigger, why
    )


def _stored_reports(body: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The (reason, message) of each condition in the stored status: reported already, by this operator or one
    before a restart."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return frozenset((str(x.get("reason")), str(x.get("message"))) for x in conditions)


async def _cleanup_failed(memo: Any, body: kopf.Body, logger: Any, exc: Exception, retry: int) -> NoReturn:
    """A clean-up refused (an admission policy on the workload, an API error) or failed: the resource stays, with
    its finalizer, and says why where a user looks (its Ready condition, a Warning event once per failure); kopf
    retries it with backoff, with no traceback for an API error."""
    api = isinstance(exc, ApiError)
    reason = "CleanupFailed" if api else "InternalError"
    error = str(exc) if api else f"{type(exc).__name__}: {exc}"
    message = clipped(f"clean-up failed, so the resource stays until it succeeds: {error}")
    await _report_failure(memo, body, reason, message)
    delay = min(300, 5 * 2 ** min(retry, 6))
    logger.warning("clean-up failed: %s; retrying in %d s", error, delay, exc_info=not api and retry == 0)
    raise kopf.TemporaryError(message, delay=delay)


async def _release_in_leaving_namespaces(memo: Any, state: OperatorState, logger: Any) -> None:
    """Take this operator's finalizer off the resources being deleted in watched namespaces that are being deleted
    too, found at startup (namespaced mode). kopf watches no namespace that is already being deleted when it
    starts, so such a resource's deletion never reached a handler, and the namespace stayed Terminating for good (a
    namespace deleted while the operator's pod was being replaced). Everything the resource made goes with the
    namespace: there is nothing to undo. One another running operator serves is left to it, and looked at again
    every ``Timers.release_recheck_seconds``: that operator may be gone for good, and once it has been for its grace
    (see :func:`_held_elsewhere`) the resource is let go here."""
    held = await _release(memo, list(state.bodies.values()), logger)
    if held:
        memo["releasing"] = asyncio.create_task(_release_held(memo, state, held, logger), name="llm-telemetry-release")


async def _release_held(memo: Any, state: OperatorState, held: list[Mapping[str, Any]], logger: Any) -> None:
    """Look again at the resources :func:`_release_in_leaving_namespaces` left to another operator, read afresh,
    until each is let go or gone (that operator cleaned up itself), or its namespace no longer being deleted."""
    while held:
        await asyncio.sleep(_config(memo).timers.release_recheck_seconds)
        if _paused(state):
            continue  # the active replica does it
        current, unread = [], []
        for body in held:
            meta = body["metadata"]
            try:
                found = await _read_again(memo, (meta["namespace"], meta["name"]), meta.get("uid") or "")
            except ApiError:
                unread.append(body)
                continue
            if found is not None:
                current.append(found)
        held = unread + await _release(memo, current, logger)


async def _release(memo: Any, bodies: Sequence[Mapping[str, Any]], logger: Any) -> list[Mapping[str, Any]]:
    """Let go of each of ``bodies`` being deleted in a namespace being deleted (see
    :func:`_release_in_leaving_namespaces`); returns those to look at again: left to another operator that serves
    them, or whose release failed."""
    client = _client(memo)
    leaving: dict[str, bool] = {}
    held = []
    for body in bodies:
        meta = body["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        if not meta.get("deletionTimestamp") or c.FINALIZER not in (meta.get("finalizers") or ()):
            continue
        if namespace not in leaving:
            leaving[namespace] = await _namespace_leaving(client, namespace)
        if not leaving[namespace]:
            continue
        if await _held_elsewhere(memo, body) is not None:
            held.append(body)
            continue
        finalizers = [f for f in meta.get("finalizers") or () if f != c.FINALIZER]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta.get("resourceVersion")}}
        try:
            await client.patch(kube.LLMTELEMETRIES, namespace, name, patch, metadata_only=True)
        except NotFoundError:
            continue
        except (ApiError, WriteWithheld) as exc:
            logger.warning(
                "%s/%s: could not release it in namespace %s, being deleted (%s); trying again in %g s",
                namespace,
                name,
                namespace,
                exc,
                _config(memo).timers.release_recheck_seconds,
            )
            held.append(body)  # (looked at again, read afresh)
            continue
        logger.info(
            "%s/%s: released (its finalizer taken off): namespace %s is being deleted, and with it everything the "
            "resource made",
            namespace,
            name,
            namespace,
        )
    return held


async def _namespace_leaving(client: KubeClient, namespace: str) -> bool:
    """Whether ``namespace`` is being deleted, or is gone (read with the cluster-wide grant kopf needs anyway).

    Read from the API server's watch cache, which can miss a namespace created milliseconds before (seen once in 60
    on a real API server): harmless here, as every caller asks about the namespace of a resource this operator had
    already served there (a namespace cannot be made anew while a resource of its previous life keeps it deleting),
    so the namespace had been in the cache for at least a pass by then."""
    try:
        found = await client.list(kube.NAMESPACES, None, fields={"metadata.name": namespace})
    except ApiError:
        return False
    return not found or bool((found[0].get("metadata") or {}).get("deletionTimestamp"))


def _track(state: OperatorState, body: Mapping[str, Any]) -> None:
    """Remember the latest body of one LLMTelemetry (and its parsed spec)."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if meta.get("uid") and state.gone.get(key) == meta["uid"]:
        return  # a late event of a resource found gone (see OperatorState.gone)
    previous = state.bodies.get(key)
    state.bodies[key] = snapshot = _snapshot(body)
    state.tracked_breaks[key] = _breaks(state, key[0])
    if previous is None or previous.get("spec") != snapshot.get("spec") or key not in state.specs:
        try:
            state.specs[key] = parse_spec(snapshot.get("spec") or {})
            r.check_owner_name(meta["name"])  # one that cannot have children is no peer of the others
        except SpecError:
            state.specs[key] = None
        state.index.put(key, state.specs[key])


async def _track_existing(
    client: KubeClient, config: OperatorConfig, state: OperatorState, logger: Any
) -> set[tuple[str, str]] | None:
    """Read every LLMTelemetry once at startup, before kopf starts its watches and calls any handler.

    So the first pass of any resource, whatever event starts it (a workload's, say, which may arrive before the
    LLMTelemetry watch has delivered an older peer), already knows every peer it may conflict with. One list,
    instead of a kopf indexing handler: kopf holds every handler until each object of an indexed kind has been
    indexed, and wakes all the waiting workers per object, which grows with the square of the resources. Returns
    the (namespace, name) of every one found, or None when they could not be listed.
    """
    found: set[tuple[str, str]] = set()
    try:
        for namespace in config.namespaces or (None,):
            for body in await client.list(kube.LLMTELEMETRIES, namespace):
                meta = body.get("metadata") or {}
                if meta.get("namespace"):
                    _track(state, body)
                    found.add((meta["namespace"], meta["name"]))
        return found
    except NotFoundError:
        # kopf says only that the resource is unresolved; say which CRD and how it gets installed.
        logger.warning(
            "the %s.%s CRD is not installed: apply crds/ (the Helm chart installs it); resources are served once it "
            "exists",
            c.PLURAL,
            c.GROUP,
        )
    except ApiError as exc:
        logger.warning("could not list LLMTelemetry resources (%s); learning them from the watch", exc)
    return None


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
async def llmtelemetry_track(
    type: str, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Keep the latest body of every LLMTelemetry, for passes triggered by workloads and children; forget a
    deleted one."""
    if namespace is None:
        return
    state = _state(memo)
    if state.watches is None:
        # Started from here, not at startup: passes started by their events run in (a copy of) this context.
        state.kopf_context = contextvars.copy_context()
        state.watches = _start_watches(memo, _config(memo), state.logger)
    if type != "DELETED":
        _track(state, body)
        if state.lacking and _forbidden_patch(state, namespace) is not None:
            # No other handler of ours runs for it while kopf's finalizer patch is refused: say so where a user looks.
            await _report_forbidden(memo, state, _snapshot(body))
        elif _may_be_refused(state, body):
            _spawn_event_pass(state, (namespace, name), "refused", _report_update_refused(memo, state, _snapshot(body)))
        return
    _forget(state, (namespace, name), body, memo)


def _forget(state: OperatorState, key: tuple[str, str], body: Mapping[str, Any], memo: Any = None) -> None:
    """Drop everything kept about a deleted LLMTelemetry; the watches of what it alone waited for stop, their places
    going to objects waiting for one (``memo`` given, see :func:`_watch_awaited`)."""
    state.bodies.pop(key, None)
    state.tracked_breaks.pop(key, None)
    state.specs.pop(key, None)
    state.index.remove(key)
    state.passes.pop(key, None)
    state.statuses.pop(body.get("metadata", {}).get("uid") or "", None)
    state.reported.pop(key, None)
    state.left.pop(key, None)
    state.claimed.discard(body.get("metadata", {}).get("uid") or "")
    state.forbidden_said.discard(body.get("metadata", {}).get("uid") or "")
    state.refusal_asked.discard(body.get("metadata", {}).get("uid") or "")
    state.schedule.forget(key)
    _await_collectors(memo, state, key, frozenset())
    _await_pricing(memo, state, key, frozenset())


def _owners(
    memo: Any, namespace: str, names: list[str] | None = None
) -> list[tuple[dict[str, Any], TelemetrySpec | None]]:
    """The live LLMTelemetry bodies of a namespace (those of ``names`` only, if given) with their parsed specs, in
    name order."""
    state = _state(memo)
    found = []
    for name in state.index.names(namespace) if names is None else names:
        body = state.bodies.get((namespace, name))
        if body is not None and not body["metadata"].get("deletionTimestamp"):
            found.append((body, state.specs.get((namespace, name))))
    return found


def _peers(memo: Any, key: tuple[str, str]) -> rec.PeerView:
    """The other live LLMTelemetry of the namespace with valid specs, as a pass asks for them: those that may
    select a workload (found through the index), or one by name."""
    state = _state(memo)
    namespace, me = key

    def selecting(labels: Mapping[str, str]) -> list[rec.Peer]:
        names = [name for name in state.index.candidates(namespace, labels) if name != me]
        return [(body, spec) for body, spec in _owners(memo, namespace, names) if spec is not None]

    def named(name: str) -> rec.Peer | None:
        body, spec = state.bodies.get((namespace, name)), state.specs.get((namespace, name))
        if name == me or body is None or spec is None or body["metadata"].get("deletionTimestamp"):
            return None
        return body, spec

    def leaving(name: str) -> bool:
        body = state.bodies.get((namespace, name))
        return name != me and body is not None and bool(body["metadata"].get("deletionTimestamp"))

    def uid(name: str) -> str | None:
        body = state.bodies.get((namespace, name))
        return None if name == me or body is None else (body["metadata"].get("uid") or None)

    return rec.PeerView(selecting=selecting, named=named, leaving=leaving, uid=uid)


def _workload_event(memo: Any, logger: Any, kind: str, type: str, meta: dict[str, Any]) -> None:
    """A workload appeared, changed or went away: re-run the passes whose outcome it may change.

    The workloads are watched metadata only (see :mod:`childwatch`): what an event is checked against is in the
    metadata (labels, our injection record, ``generation``, ``resourceVersion``). A pass is started for each
    LLMTelemetry the workload can concern unless its last pass answers the event: it read or wrote this very
    version, or left the workload in the state this version is in (:func:`reconcile.workload_state`: the same
    spec, labels and record; the workload controller's status and revision updates after an injection), or this
    version is older than the one it left and in the state it decided from (:func:`reconcile.answers_older`). The
    pass reads the workload and decides (it writes nothing when nothing differs).
    """
    namespace = meta.get("namespace")
    if not namespace:
        return
    resource = kube.WORKLOADS[kind]
    name = str(meta.get("name") or "")
    labels = dict(meta.get("labels") or {})
    record = r.injected_record({"metadata": meta})
    key = f"{kind}/{name}"
    injector = record.get("owner") if record is not None else None
    _state(memo).index.record(namespace, key, str(injector) if injector and type != "DELETED" else None)
    seen = _answered_by(type, resource.plural, meta)
    settled = ((resource.plural, name), rec.workload_state({"metadata": meta}))

    def answered(outcome: rec.Outcome) -> bool:
        if seen(outcome):
            return True
        if type == "DELETED":
            return False  # (never answered by a pass: it saw the workload, not its deletion)
        # The state the pass left the workload in, or an older version in the state the pass decided from.
        return outcome.settled.get(settled[0]) == settled[1] or rec.answers_older(outcome, *settled)

    state = _state(memo)
    # Only the LLMTelemetry this workload can concern: its selector may select it, its record names it, or its
    # last pass served it; for any other, the checks below find no pass needed.
    names = state.index.candidates(namespace, labels, key, record.get("owner") if record is not None else None)
    for owner, spec in _owners(memo, namespace, names):
        owner_name = owner["metadata"]["name"]
        if spec is None:
            continue
        last = state.passes.get((namespace, owner_name))
        if last is not None and answered(last[1]):
            continue  # the echo of its own patch, or a later version in the state its last pass left it in
        mine = record is not None and record.get("owner") == owner_name
        if type == "DELETED":
            needed = mine
        else:
            # Selected (to inject, or to lose to an older peer), injected by it, or a target of its last pass that
            # it no longer holds (another LLMTelemetry took it over): a pass to update its children and status.
            needed = mine or spec.selector.matches(labels) or (last is not None and key in last[1].targets)
        if needed:
            _start_pass(memo, logger, state, (namespace, owner_name), owner, "workload", answered)


def _start_pass(
    memo: Any,
    logger: Any,
    state: OperatorState,
    key: tuple[str, str],
    owner: Mapping[str, Any],
    trigger: str,
    answered: Callable[[rec.Outcome], bool],
) -> None:
    """Run a pass for a watch event in a task of its own (it waits for the resource's lock, then may find the
    event answered by the pass that held it); none while another replica is active."""
    if _paused(state):
        return
    log = _ObjectLog(logger, {"object": "/".join(key)})
    _spawn_event_pass(state, key, trigger, _reconcile(memo, owner, trigger, log, answered=answered))


def _spawn_event_pass(state: OperatorState, key: tuple[str, str], trigger: str, work: Any) -> None:
    """Run ``work`` (a pass, or what decides on one) for a watch event in a task of its own, in kopf's context,
    cancelled at cleanup with the other event passes; none once the operator is stopping."""
    if state.stopping:
        work.close()
        return
    context = state.kopf_context.copy() if state.kopf_context is not None else None
    task = asyncio.create_task(work, context=context)
    state.event_passes.add(task)
    task.add_done_callback(functools.partial(_event_pass_done, state, key, trigger))


def _event_pass_done(state: OperatorState, key: tuple[str, str], trigger: str, task: asyncio.Task[Any]) -> None:
    state.event_passes.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # A bug, not an API error (those are handled in the pass): keep retrying the resource rather than lose it.
        logging.getLogger(__name__).error("pass (%s) for %s/%s failed", trigger, *key, exc_info=task.exception())
        state.schedule.failed(key)
        state.wake.set()


def _answered_by(type: str, plural: str, meta: Mapping[str, Any]) -> Callable[[rec.Outcome], bool]:
    """Whether a pass's outcome answers a watch event: the pass read or wrote the version the event carries.
    A deletion is never answered (the pass saw the object, so it did not see it gone)."""
    seen = (plural, str(meta.get("name") or ""), str(meta.get("resourceVersion") or ""))
    return lambda outcome: type != "DELETED" and bool(seen[2]) and seen in outcome.seen


def _start_watches(memo: Any, config: OperatorConfig, logger: Any) -> list[MetadataWatch]:
    """Watch the workloads and every kind of child, metadata only (see :mod:`childwatch`), in each watched
    namespace."""
    loop = asyncio.get_running_loop()
    namespaces = config.namespaces or (None,)
    watches = [
        MetadataWatch(
            _client(memo), kube.Resource(group, version, plural), namespace, _MANAGED,
            functools.partial(_child_event, memo, logger, plural), loop,
            served=functools.partial(_kind_served, memo, logger, plural, namespace),
            broken=functools.partial(_watch_broken, memo, namespace),
            missing_retry=config.timers.missing_retry_seconds,
        )
        for group, version, plural in _CHILD_RESOURCES
        for namespace in namespaces
    ] + [
        MetadataWatch(
            _client(memo), resource, namespace, {}, functools.partial(_workload_event, memo, logger, kind), loop,
            broken=functools.partial(_watch_broken, memo, namespace),
            missing_retry=config.timers.missing_retry_seconds,
        )
        for kind, resource in kube.WORKLOADS.items()
        for namespace in namespaces
    ]  # fmt: skip
    for watch in watches:
        watch.start()
    return watches


def _kind_served(memo: Any, logger: Any, plural: str, namespace: str | None) -> None:
    """A kind of child found not served (its CRD missing) is served now: a pass soon for every resource its watch
    covers (of ``namespace``, or all), rather than at each one's next retry, which the backoff stretches to the resync
    interval. Every one, not only those whose last pass found the CRD missing: a pass is idempotent (one that finds all
    as desired writes nothing), a kind comes to be served rarely (one burst per CRD installed, each watch calls this
    once per 404 that ends), and a resource whose failed pass is still running, or was never run, is not left out."""
    state = _state(memo)
    if _paused(state):
        return  # another replica is active; all get a pass when this one resumes
    keys = [
        key
        for key, body in state.bodies.items()
        if namespace in (None, key[0]) and not body["metadata"].get("deletionTimestamp")
    ]
    for key in keys:
        state.schedule.again(key, SERVED_PASS_DELAY, "served")
    state.wake.set()
    logger.info(
        "%s served now in %s: a pass for each of its %d LLMTelemetry resources",
        plural,
        namespace or "all namespaces",
        len(keys),
    )


def _child_event(memo: Any, logger: Any, plural: str, type: str, meta: dict[str, Any]) -> None:
    """A child was edited or deleted by hand: put it back.

    Every event type counts: after a watch starts again, an edit made meanwhile arrives as ADDED. Only the echo of
    a pass's own work is skipped: an event for the very resourceVersion the last pass created, repaired or found
    as desired. Anything else runs a pass (idempotent: it may write nothing).
    """
    namespace = meta.get("namespace")
    if not namespace:
        return
    owner_name = (meta.get("labels") or {}).get(c.LABEL_OWNER)
    if not isinstance(owner_name, str):
        # The owner label removed by hand (it is what the ServiceMonitor selects the metrics Services by): the
        # child's owner reference still names its LLMTelemetry, whose pass puts the label back.
        owner_name = next(
            (
                str(ref.get("name"))
                for ref in meta.get("ownerReferences") or []
                if isinstance(ref, dict)
                and ref.get("kind") == "LLMTelemetry"
                and str(ref.get("apiVersion", "")).startswith("llmtelemetry.dev/")
            ),
            None,
        )
        if owner_name is None:
            return
    state = _state(memo)
    owner = state.bodies.get((namespace, owner_name))
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    answered = _answered_by(type, plural, meta)
    last = state.passes.get((namespace, owner_name))
    if last is not None and answered(last[1]):
        return  # the echo of the last pass's own work, with no pass in flight that could change it
    if type == "DELETED" and not state.standby:
        # Deleted by hand, or by the garbage collector because its owner is gone: then a pass would make it again
        # for an owner that no longer exists, and the collector delete it again, without end.
        key = (namespace, owner_name)
        _spawn_event_pass(state, key, "child", _child_deleted(memo, logger, key, owner, answered))
        return
    _start_pass(memo, logger, state, (namespace, owner_name), owner, "child", answered)


async def _child_deleted(
    memo: Any, logger: Any, key: tuple[str, str], owner: Mapping[str, Any], answered: Callable[[rec.Outcome], bool]
) -> None:
    """A child was deleted: a pass puts it back, unless its LLMTelemetry is gone. The operator hears of a deletion
    from kopf's watch, but a watch that starts again after its history expired (410 Gone, an API server restart)
    lists what exists and reports nothing of what went meanwhile: the resource would live on here, its children
    made again by every pass for the collector to delete, and its workloads held from the resources next in line."""
    state = _state(memo)
    log = _ObjectLog(logger, {"object": "/".join(key)})
    uid = owner["metadata"].get("uid")
    found: list[dict[str, Any]] | None
    # Under the resource's lock, as the passes: a pass in flight ends before the resource is forgotten. Forgotten
    # while one ran, that pass then filed its outcome, status, reports and served workloads under the forgotten
    # resource, for good (a resource of that name made later inherited them).
    async with _lock(memo, *key):
        try:
            found = await _named(memo, key, uid)
        except NotFoundError:
            # The kind itself is not served: gone with its CRD (then so is every resource of it), or an API server
            # still starting, which serves the CRD but not yet its kind (then nothing can be told).
            found = [] if await _crd_gone(memo) else None
        except ApiError:
            found = None  # cannot tell: the pass decides, as for any child event
        if found is not None and not any((item.get("metadata") or {}).get("uid") == uid for item in found):
            _forget_unreported(memo, logger, state, key, uid)
            return
    await _reconcile(memo, owner, "child", log, answered=answered)


def _forget_unreported(memo: Any, logger: Any, state: OperatorState, key: tuple[str, str], uid: str | None) -> None:
    """Forget the LLMTelemetry ``key`` of ``uid``, found gone though kopf's watch never said so (it lists anew after
    a 410 and reports nothing of what went meanwhile), and have the resources next in line take over what it held
    (an injection record naming an LLMTelemetry that does not exist holds its workload for nobody)."""
    owner = state.bodies.get(key)
    if owner is None or owner["metadata"].get("uid") != uid:
        return
    _forget(state, key, owner, memo)
    if uid:
        state.gone[key] = uid
    _ObjectLog(logger, {"object": "/".join(key)}).info(
        "is gone, though its deletion was never reported (a watch listed anew); forgotten"
    )
    for peer, body in sorted(state.bodies.items()):
        if peer[0] == key[0] and not body["metadata"].get("deletionTimestamp"):
            _start_pass(memo, logger, state, peer, body, "handover", lambda outcome: False)


async def _crd_gone(memo: Any) -> bool:
    """Whether the LLMTelemetry CRD no longer exists (False when that cannot be read either). A consistent list, not
    one from the API server's watch cache: asked only after the kind answered 404, and the resource is then forgotten
    for good (see OperatorState.gone), which a cache lagging behind the others (several API servers) must not
    decide."""
    try:
        crds = await _client(memo).list(
            kube.CRDS, None, fields={"metadata.name": f"{c.PLURAL}.{c.GROUP}"}, consistent=True
        )
    except ApiError:
        return False
    return not crds


def _await_collectors(
    memo: Any, state: OperatorState, key: tuple[str, str], services: frozenset[tuple[str, str]]
) -> None:
    """Record that resource ``key`` waits for the collector ``services`` (its last pass found them missing, or
    without the endpoint's port), and watch each of them, so that the resource gets a pass as soon as one is
    created or changed rather than at its resync; stop watching a Service once no resource waits for it (see
    :func:`_follow`)."""
    _follow(memo, state, key, kube.SERVICES, services, state.awaiting, state.collector_waiters,
            state.collector_watches, _collector_event)  # fmt: skip


def _await_pricing(
    memo: Any, state: OperatorState, key: tuple[str, str], configmaps: frozenset[tuple[str, str]]
) -> None:
    """Record that resource ``key`` waits for its pricing ``configmaps`` (its last pass found them missing or
    unreadable while it held workloads back), and watch each, so that the resource gets a pass as soon as one is
    created or changed rather than at its next retry, which backs off up to the resync interval (see
    :func:`_follow`). The operator watches no ConfigMap of its users otherwise."""
    _follow(memo, state, key, kube.CONFIGMAPS, configmaps, state.awaiting_prices, state.pricing_waiters,
            state.pricing_watches, _pricing_event)  # fmt: skip


def _follow(
    memo: Any,
    state: OperatorState,
    key: tuple[str, str],
    resource: kube.Resource,
    wanted: frozenset[tuple[str, str]],
    awaiting: dict[tuple[str, str], frozenset[tuple[str, str]]],
    waiters: dict[tuple[str, str], set[tuple[str, str]]],
    watches: dict[tuple[str, str], MetadataWatch],
    deliver: Callable[[Any, Any, tuple[str, str], str, dict[str, Any]], None],
) -> None:
    """Resource ``key`` now waits for the objects ``wanted`` of ``resource`` (recorded in ``awaiting``, by resource),
    no longer for the others it waited for: each wanted object is watched (see :func:`_watch_awaited`), one watch per
    object whatever the resources waiting for it (``waiters``, by object), and a watch stops once no resource waits
    for its object, its place going to an object waiting for one."""
    before = awaiting.pop(key, frozenset())
    if wanted:
        awaiting[key] = wanted
    for obj in before - wanted:
        keys = waiters.get(obj)
        if keys is not None:
            keys.discard(key)
        if not keys:
            waiters.pop(obj, None)
            watch = watches.pop(obj, None)
            if watch is not None:
                watch.stop()
    for obj in wanted:
        waiters.setdefault(obj, set()).add(key)
    _watch_awaited(memo, state)


def _watch_awaited(memo: Any, state: OperatorState) -> None:
    """Watch the objects waited for that are not watched yet, up to ``awaited_watches`` (collector Services and
    pricing ConfigMaps together): those waited for longest first, Services before ConfigMaps.

    Each watch is a thread and a connection of the operator's, and a watch on the API server: resources each naming
    a Service of their own that does not exist (a typo rolled out to every namespace, or a tenant making them on
    purpose) made one each, without bound. Past the cap an object is not watched, and the resources waiting for it
    get their pass at their next retry (a pricing ConfigMap's) or resync (a collector's) instead, said once in the
    log until every object waited for is watched again. A watch, once started, runs until no resource waits for its
    object (no churn of watches at every pass); then the place it leaves goes to an object still waiting for one,
    whose watch starts with a list: an object created meanwhile is heard of then.

    An object is watched by name, metadata only, like the workloads (see :mod:`childwatch`), once the operator's
    other watches run (``memo`` None: none is started), and not once the operator is stopping: a pass that ends while
    the cleanup stops the others (the schedule's passes run until it is cancelled) would start a watch nothing stops,
    its thread going on past the cleanup and failing on the closed client. A watch starts with a list, so an object
    created between the pass and the watch is not missed."""
    kinds = (
        (kube.SERVICES, state.collector_waiters, state.collector_watches, _collector_event),
        (kube.CONFIGMAPS, state.pricing_waiters, state.pricing_watches, _pricing_event),
    )
    if all(len(waiters) == len(watches) for _, waiters, watches, _ in kinds):
        state.awaited_cap_said = False  # every object waited for is watched (watches are kept of waited ones only)
        return
    if memo is None or state.watches is None or state.stopping:
        return
    cap = _config(memo).awaited_watches
    for resource, waiters, watches, deliver in kinds:
        if len(waiters) == len(watches):
            continue
        for obj in waiters:
            if obj in watches:
                continue
            if len(state.collector_watches) + len(state.pricing_watches) >= cap:
                if not state.awaited_cap_said:
                    state.awaited_cap_said = True
                    state.logger.warning(
                        "%d collector Services and pricing ConfigMaps are waited for by resources, more than the %d"
                        " watched at once: the others are not watched, and the resources waiting for them get their"
                        " pass at their next retry or resync rather than as soon as the object is created",
                        sum(len(w) for _, w, _, _ in kinds),
                        cap,
                    )
                return
            namespace, name = obj
            watch = MetadataWatch(
                _client(memo), resource, namespace, {},
                functools.partial(deliver, memo, state.logger, obj), asyncio.get_running_loop(), name,
                missing_retry=_config(memo).timers.missing_retry_seconds,
            )  # fmt: skip
            watches[obj] = watch
            watch.start()


def _pricing_event(memo: Any, logger: Any, configmap: tuple[str, str], type: str, meta: dict[str, Any]) -> None:
    """A pricing ConfigMap some resources wait for was created or changed: each of them gets a pass, which reads it
    again (a deletion changes nothing for a resource that found it missing or unreadable)."""
    if type == "DELETED":
        return
    state = _state(memo)
    for key in sorted(state.pricing_waiters.get(configmap, ())):
        owner = state.bodies.get(key)
        if owner is not None and not owner["metadata"].get("deletionTimestamp"):
            _start_pass(memo, logger, state, key, owner, "pricing", lambda _outcome: False)


#: Seconds a collector Service's creation waits for others before the resources waiting for it get their passes.
COLLECTOR_SETTLE_SECONDS: Final = 2.0


def _collector_event(memo: Any, logger: Any, service: tuple[str, str], type: str, meta: dict[str, Any]) -> None:
    """A collector Service some resources wait for was created or changed: each of them gets a pass, which reads
    it again (a deletion changes nothing for a resource that found it missing). Collectors are installed together
    (Jaeger and Loki in one apply, one Service a few milliseconds after the other): the passes start
    COLLECTOR_SETTLE_SECONDS after the first one's event, for every collector seen by then, so a workload rolls
    once, to both exporters, and no Warning says the second is missing."""
    if type == "DELETED":
        return
    state = _state(memo)
    state.collectors.forget(service)
    state.collectors_changed.add(service)
    if (
        state.collectors_settling is None
    ):  # (a window from the first one: a Service changing all the time waits no more)
        state.collectors_settling = asyncio.get_running_loop().call_later(
            COLLECTOR_SETTLE_SECONDS, _collectors_settled, memo, logger, context=contextvars.copy_context()
        )


def _collectors_settled(memo: Any, logger: Any) -> None:
    state = _state(memo)
    state.collectors_settling = None
    changed, state.collectors_changed = frozenset(state.collectors_changed), set()
    # Every awaited collector is read again, not just those seen: the passes must not take another's "missing"
    # from before.
    for awaited in {*changed, *state.collector_waiters}:
        state.collectors.forget(awaited)

    def answered(outcome: rec.Outcome) -> bool:
        return changed.isdisjoint(outcome.awaiting)  # a pass after the change found them (it reads them afresh)

    waiting = {key for service in changed for key in state.collector_waiters.get(service, ())}
    for key in sorted(waiting):
        owner = state.bodies.get(key)
        if owner is not None and not owner["metadata"].get("deletionTimestamp"):
            _start_pass(memo, logger, state, key, owner, "collector", answered)
