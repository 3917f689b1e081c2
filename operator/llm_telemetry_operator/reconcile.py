"""One reconcile pass for one LLMTelemetry: inject, create or repair children, write status.

Kept free of kopf so that tests (and kopf handlers) can run a pass directly. A pass writes only what differs
from the desired state, so running it twice in a row writes nothing the second time.
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from llm_telemetry.config import ConfigurationError
from llm_telemetry.pricing import PricingTable, parse_pricing_text
from llm_telemetry_operator import constants as c
from llm_telemetry_operator import kube
from llm_telemetry_operator import resources as r
from llm_telemetry_operator.collectors import CollectorCheck
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import (
    MAX_MESSAGE_CHARS,
    ApiError,
    ConflictError,
    Listed,
    NotFoundError,
    SpecError,
    bounded,
    clipped,
)
from llm_telemetry_operator.kube import KubeClient, Resource
from llm_telemetry_operator.spec import TelemetrySpec, parse_spec, shown

logger = logging.getLogger(__name__)

#: Attempts at a read-modify-write before giving up on repeated 409 conflicts.
CONFLICT_ATTEMPTS = 5


@dataclass
class Outcome:
    """What a pass achieved; handlers turn it into retries and events.

    Args:
        ready: every enabled part is in place.
        invalid: the spec is unusable (a :class:`SpecError`); retrying will not help until it changes.
        retry: something may fix itself (a CRD installed later, an API hiccup); try again later.
        failures: (reason, message) pairs worth a Warning event.
        notices: (reason, message) pairs worth a Normal event: a state that is not a failure but leaves the
            resource idle, which a user should hear of (a selector that matches nothing).
    """

    ready: bool = False
    invalid: bool = False
    retry: bool = False
    #: The phase written to the status (Ready, Pending, Degraded); empty when the pass wrote none of these.
    phase: str = ""
    targets: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    notices: list[tuple[str, str]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    #: (plural, name, resourceVersion) of every version of a workload or child this pass read and brought to
    #: (or found in) the desired state, and of every version it wrote. A watch event for one of these versions
    #: has been answered by this pass: it is its input or the echo of its own write.
    seen: set[tuple[str, str, str]] = field(default_factory=set)
    #: Of every workload this pass decided about (brought to or found in the desired state, or left to another
    #: LLMTelemetry): its :func:`workload_state` then, by (plural, name). A later version in the same state (its
    #: controller's status updates, a revision annotation) changes nothing the pass decided: its event needs no
    #: pass.
    settled: dict[tuple[str, str], WorkloadState] = field(default_factory=dict)
    #: Of every workload in ``settled``: its :func:`workload_state` in the version the pass decided from (as listed).
    #: Once the pass's patch raised its generation, another version in that state is an older one that differs only
    #: in status or other metadata (its controller's updates, read again after a conflict or not at all): its
    #: event needs no pass (see :func:`answers_older`).
    decided: dict[tuple[str, str], WorkloadState] = field(default_factory=dict)
    #: The (uid, generation) of the LLMTelemetry this pass worked from: which spec it applied.
    applied: tuple[str, Any] = ("", None)
    #: Exporters left out because their collector's Service does not exist (``traces``, ``logs``).
    without: frozenset[str] = frozenset()
    #: The (namespace, name) of each collector Service found missing, or without the endpoint's port: once it
    #: appears or changes, this resource needs a pass.
    awaiting: frozenset[tuple[str, str]] = frozenset()
    #: The (namespace, name) of the pricing ConfigMap (``spec.pricing.configMapRef``) found missing or unreadable
    #: while it holds workloads back: once it is created or changed, this resource needs a pass.
    awaiting_prices: frozenset[tuple[str, str]] = frozenset()
    #: Selected workloads left uninjected because their pods already use ``spec.metrics.port``, each with why.
    port_conflicts: list[str] = field(default_factory=list)
    #: Selected workloads left as they are because the pricing ConfigMap their pods would mount is missing.
    held: list[str] = field(default_factory=list)
    #: Targets whose pods do not carry the label their metrics Service selects by and are not rolled to it by
    #: their controller (held back for prices, paused, OnDelete, a partition): their Service selects their pods
    #: by the workload's selector until then (see ``resources.build_metrics_service``).
    unlabelled: set[str] = field(default_factory=set)
    #: Workloads not patched to mount the inline prices, whose ConfigMap could not be written in this pass.
    unpriced: list[str] = field(default_factory=list)
    #: Selected workloads this resource would inject but cannot yet: ``held``, and those whose pods use
    #: ``spec.metrics.port``.
    unable: set[str] = field(default_factory=set)
    #: The peers left to take over workloads this resource injected and no longer serves (see :func:`_inject`): each
    #: needs a pass, which swaps the injection in one patch.
    handed: set[str] = field(default_factory=set)
    #: The workloads (``Kind/name``) this resource lets go whose next server cannot inject them: their injection is
    #: removed, and their metrics Services go with it (nobody takes them over).
    untaken: set[str] = field(default_factory=set)
    #: (peer, workload) for each workload this resource wins but cannot inject yet (``held``, or its metrics port taken
    #: there) that the peer's injection is in: the peer keeps serving it (see ``kept_for``), and needs a pass to learn
    #: who wins it, as nothing is written to the workload.
    holders: set[tuple[str, str]] = field(default_factory=set)
    #: (winner, workload) for each workload this resource serves that a peer wins but cannot inject yet (its pricing
    #: ConfigMap missing, its metrics port taken in the pods): this resource keeps serving it until the winner can
    #: take it over in one patch.
    kept_for: set[tuple[str, str]] = field(default_factory=set)
    #: Of failures whose event words differ from their condition's (one Conflict event per workload, one condition
    #: for all): the words that condition shows for it. A restart's first pass posts no event for a failure the
    #: stored status already shows.
    shown: dict[tuple[str, str], str] = field(default_factory=dict)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class WorkloadState(NamedTuple):
    """What a pass's decision about a workload depends on (see :func:`workload_state`)."""

    uid: Any
    generation: Any
    labels: tuple[tuple[str, Any], ...]
    record: Any
    deletion: Any


def workload_state(workload: Mapping[str, Any]) -> WorkloadState:
    """What a pass's decision about a workload depends on: its spec (``metadata.generation``, which the API server
    bumps on every spec change), labels, our injection record and whether it is being deleted. Versions that
    differ only in status or other metadata share it."""
    meta = workload.get("metadata") or {}
    return WorkloadState(
        uid=meta.get("uid"),
        generation=meta.get("generation"),
        labels=tuple(sorted((meta.get("labels") or {}).items())),
        record=(meta.get("annotations") or {}).get(c.ANNOTATION_INJECTED),
        deletion=meta.get("deletionTimestamp"),
    )


def answers_older(outcome: Outcome, key: tuple[str, str], state: WorkloadState) -> bool:
    """Whether a workload event in :func:`workload_state` ``state`` is of a version older than the one the pass of
    ``outcome`` left, and in the state the pass decided from: the pass raised the generation (the API server only ever
    raises it), and the event's version has the generation, labels and record the pass decided on. Its controller's
    updates between the pass's read and its patch (which then failed), or a watch's first list at a start delivered
    after the pass read a newer version, are such. A version whose labels or record differ from those the pass decided
    on is not: the pass, which read it again only to retry its patch, has not decided on it."""
    left, decided = outcome.settled.get(key), outcome.decided.get(key)
    if left is None or decided is None or state != decided:
        return False
    generation, newer = decided.generation, left.generation
    return isinstance(generation, int) and isinstance(newer, int) and generation < newer


def workload_key(workload: Mapping[str, Any]) -> str:
    return f"{workload.get('kind') or 'Deployment'}/{workload['metadata']['name']}"


async def list_workloads(
    client: KubeClient, namespace: str, selector: kube.LabelQuery | None = None
) -> list[dict[str, Any]]:
    """The Deployments and StatefulSets of a namespace, or only those ``selector`` selects."""
    found: list[dict[str, Any]] = []
    for kind, resource in kube.WORKLOADS.items():
        for item in await client.list(resource, namespace, selector):
            found.append({**item, "kind": kind})  # list items may omit kind
    return sorted(found, key=workload_key)


async def _candidates(
    client: KubeClient,
    owner: Mapping[str, Any],
    spec: TelemetrySpec,
    injected: Iterable[str] = (),
    gone: Callable[[str], None] = lambda _workload: None,
) -> list[dict[str, Any]]:
    """The workloads a pass must look at: those the selector selects now, plus those it no longer selects
    (relabelled) whose injection must be removed: the targets of the last pass, and ``injected``, the workloads
    (``Kind/name``) whose injection record names this resource as the operator's watch of them last showed it.

    Listing by selector keeps a pass's cost independent of how many other workloads share the namespace; the
    previous targets come from the status this operator wrote, so they cost a GET only after a relabel. The
    records cover what the status does not: a removal that failed (a webhook refused it) leaves the workload out of
    the next status, and an injection whose status was never written (the operator killed, a status write failed)
    never entered it; without them no later pass, nor the deletion, looked at that workload again. ``gone`` is
    told of each of ``injected`` found gone (its deletion missed by the watch), to be read no more.
    """
    namespace = owner["metadata"]["namespace"]
    workloads = await list_workloads(client, namespace, spec.selector)
    listed = {workload_key(w) for w in workloads}
    injected = list(injected)
    for key in [*((owner.get("status") or {}).get("targets") or []), *injected]:
        kind, _, name = str(key).partition("/")
        if key in listed or kind not in kube.WORKLOADS or not name:
            continue
        listed.add(key)
        try:
            workloads.append({**await client.get(kube.WORKLOADS[kind], namespace, name), "kind": kind})
        except NotFoundError:
            if key in injected:
                gone(key)
            continue
    return sorted(workloads, key=workload_key)


#: Another LLMTelemetry of the same namespace: its body and parsed spec.
Peer = tuple[Mapping[str, Any], TelemetrySpec]


@dataclass(frozen=True)
class PeerView:
    """The other live LLMTelemetry of the namespace with valid specs, looked up as a pass needs them.

    A pass needs the peers that may select each of its workloads and, by name, the one an injection record or a
    child's owner label names; never all of them. With a thousand resources in a namespace, building the full
    list for every pass made the passes cost the square of the resources (the operator keeps them indexed by
    selector, see :mod:`owners`).

    Args:
        selecting: the peers that may select a workload with these labels (a superset; each is checked).
        named: the peer of that name, or None.
        leaving: whether an LLMTelemetry of that name is being deleted. Its workloads and their metrics Services
            go to the peer that wins them next in one step, a change of injection (see :func:`successors`), not
            a removal and then an injection: two rollouts and a gap in the telemetry.
        uid: the uid of the LLMTelemetry of that name the operator knows (live or being deleted), or None. A child
            is taken over from a peer only if that peer controls it (see :meth:`_Outranked.adopts`). Default: that
            of the live peer ``named`` gives.
    """

    selecting: Callable[[Mapping[str, str]], Iterable[Peer]]
    named: Callable[[str], Peer | None]
    leaving: Callable[[str], bool] = lambda _name: False
    uid: Callable[[str], str | None] | None = None

    @classmethod
    def of(cls, peers: Sequence[Peer]) -> PeerView:
        """A view of a plain list of peers."""
        by_name = {body["metadata"]["name"]: (body, spec) for body, spec in peers}
        return cls(selecting=lambda _labels: peers, named=by_name.get)

    def uid_of(self, name: str) -> str | None:
        """The uid of the LLMTelemetry ``name`` as the operator knows it (see ``uid``)."""
        if self.uid is not None:
            return self.uid(name)
        peer = self.named(name)
        return None if peer is None else str((peer[0].get("metadata") or {}).get("uid") or "") or None


class _Outranked:
    """The names of the peers whose metrics Services ``owner`` may take over with its targets (``name in
    outranked``), looked up one at a time: those it outranks, those being deleted, and those that no longer serve
    any of its targets (a peer whose selector or containers changed has yet to notice in a pass of its own).

    Each is judged as the operator knows the peer at that moment, not as the pass began: a peer created meanwhile
    (two resources applied together) is not taken for one that serves none of the targets."""

    def __init__(self, owner: Mapping[str, Any], peers: PeerView, targets: Sequence[Mapping[str, Any]] = ()) -> None:
        self._rank = precedence(owner)
        self._peers = peers
        self._targets = targets

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        peer = self._peers.named(name)
        if peer is None:
            return self._peers.leaving(name)
        return precedence(peer[0]) > self._rank or not any(_serves(peer, w) for w in self._targets)

    def adopts(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` is a child of a peer this resource may take over (``name in outranked``): labelled as that
        peer's *and* controlled by it (that peer's uid in its controller owner reference). The label alone is no
        proof: anyone may copy it onto an object of theirs, which is then not the peer's to hand over."""
        label = ((obj.get("metadata") or {}).get("labels") or {}).get(c.LABEL_OWNER)
        controller = _controller_uid(obj)
        if not isinstance(label, str) or controller is None or label not in self:
            return False
        return self._peers.uid_of(label) == controller


def precedence(owner: Mapping[str, Any]) -> tuple[str, str]:
    """The conflict rule: of several LLMTelemetry selecting one workload, the oldest (``creationTimestamp``)
    wins, and of equally old ones the first by name. The winner injects and serves the workload; the others
    leave it alone."""
    meta = owner.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def _rival(owner: Mapping[str, Any], serving: Sequence[Peer]) -> Mapping[str, Any] | None:
    """The peer of those ``serving`` a workload (see :func:`_serving`) that wins it over ``owner``, or None if
    ``owner`` wins it."""
    best = min((body for body, _spec in serving), key=precedence, default=None)
    return best if best is not None and precedence(best) < precedence(owner) else None


async def _cannot_inject(
    client: KubeClient,
    owner: Mapping[str, Any],
    workload: Mapping[str, Any],
    serving: Sequence[Peer],
    rival: Mapping[str, Any],
    known: dict[tuple[Any, Any], bool],
) -> bool:
    """Whether ``rival``, of the peers ``serving`` ``workload``, cannot inject it now: its ``spec.metrics.port`` is
    taken in the workload's pods (see :func:`resources.port_conflicts`), or the pricing ConfigMap its pods would mount
    is missing or unreadable (see :func:`_missing_pricing`). ``known``: the answers of this pass so far, by ConfigMap
    name and key."""
    spec = next(spec for body, spec in serving if body is rival)
    if r.port_conflicts(workload, spec):
        return True
    if spec.pricing.inline:
        # Its prices' ConfigMap could not be written (a quota, a webhook: its status says so for its spec as it is),
        # or is another's (whoever made one of that name, seen before the rival's first pass has said anything): it
        # does not inject (see reconcile's write_prices).
        status = rival.get("status") or {}
        injected: Mapping[str, Any] = next(
            (x for x in status.get("conditions") or () if x.get("type") == c.CONDITION_INJECTED), {}
        )
        if injected.get("reason") == "PricingConfigMapFailed" and injected.get("observedGeneration") == (
            rival.get("metadata") or {}
        ).get("generation"):
            return True
        prices = r.build_pricing_configmap(rival, spec)
        key = (prices["metadata"]["name"], None)
        if key not in known:
            try:
                current = await client.get(kube.CONFIGMAPS, owner["metadata"]["namespace"], prices["metadata"]["name"])
            except NotFoundError:
                known[key] = False
            else:
                known[key] = not _ours(current, prices, lambda _obj: False)
        return known[key]
    if not spec.pricing.config_map:
        return False
    ref = (spec.pricing.config_map, spec.pricing.config_map_key)
    if ref not in known:
        known[ref] = await _missing_pricing(client, owner["metadata"]["namespace"], spec) is not None
    return known[ref]


def _serving(workload: Mapping[str, Any], peers: PeerView) -> list[Peer]:
    """The peers that would inject ``workload``: their selector selects it and, if they name containers, it has
    one of them. One that names none of its containers does not inject it (``NoContainer``), so it cannot hold
    the workload against another that would."""
    labels = (workload.get("metadata") or {}).get("labels") or {}
    return [peer for peer in peers.selecting(labels) if _serves(peer, workload)]


def _serves(peer: Peer, workload: Mapping[str, Any]) -> bool:
    """Whether ``peer`` would inject ``workload`` (see :func:`_serving`)."""
    labels = (workload.get("metadata") or {}).get("labels") or {}
    spec = peer[1]
    if not spec.selector.matches(labels):
        return False
    return not spec.containers or not {ct.get("name") for ct in _pod_containers(workload)}.isdisjoint(spec.containers)


async def reconcile(
    client: KubeClient,
    config: OperatorConfig,
    owner: Mapping[str, Any],
    peers: Sequence[Peer] | PeerView = (),
    collectors: CollectorCheck | None = None,
    injected: Iterable[str] = (),
    gone: Callable[[str], None] = lambda _workload: None,
) -> Outcome:
    """Bring the cluster in line with one LLMTelemetry and write its status.

    ``peers`` are the other live LLMTelemetry of the namespace with valid specs; a workload that one of them
    also selects goes to the winner under :func:`precedence`. ``collectors`` looks up the collectors' Services
    (a shared one caches them; default: a fresh lookup). ``injected``: the workloads whose injection record names
    this resource, as the operator last saw them, and ``gone`` told of each found gone (see :func:`_candidates`).
    """
    meta = owner["metadata"]
    name = meta["name"]
    outcome = Outcome(applied=(meta.get("uid") or "", meta.get("generation")))
    peers = peers if isinstance(peers, PeerView) else PeerView.of(peers)
    try:
        spec = parse_spec(owner.get("spec") or {})
        r.check_owner(owner)
    except SpecError as exc:
        outcome.invalid = True
        outcome.failures.append(("InvalidSpec", str(exc)))
        invalid = [r.Condition(t, False, "InvalidSpec", str(exc)) for t in _CONDITION_TYPES]
        # Nothing is changed until the spec is fixed: the workloads injected before keep their injection (and their
        # metrics Services and ServiceMonitor their scrapes), and the status still counts them.
        kept = [t for t in (owner.get("status") or {}).get("targets") or [] if isinstance(t, str)]
        if kept:
            note = bounded(f"{exc}; left as the last valid spec made them until it is fixed: ", Listed(kept))
            invalid = [r.Condition(c.CONDITION_INJECTED, False, "InvalidSpec", note) if i.type == c.CONDITION_INJECTED
                       else i for i in invalid]  # fmt: skip
        await _write_status(client, config, owner, invalid, kept, "Invalid", outcome)
        return outcome

    conditions: dict[str, r.Condition] = {}
    conditions[c.CONDITION_COLLECTORS] = await _collectors(client, config, spec, collectors, outcome)
    workloads = await _candidates(client, owner, spec, injected, gone)
    # The peers that would inject each workload: who wins it, and whose metrics Service may be taken over.
    serving = {id(w): _serving(w, peers) for w in workloads}
    # The pricing volume names the user's ConfigMap: injected while it (or its key) is missing, the rollout would
    # make pods that cannot start. So nothing is injected until it exists; what was injected before is left.
    missing_prices = await _missing_pricing(client, meta["namespace"], spec) if spec.pricing.config_map else None
    # The inline prices' ConfigMap the injection mounts is written before the first workload is patched to mount it
    # (pods made by the rollout before it exists cannot start); once per pass, and only by a pass that injects. One
    # that cannot be written (another's of that name, a quota, a webhook) holds the workloads back as a missing
    # configMapRef does (see _inject), and the status says why (PricingConfigMapFailed).
    prices_written: list[ApiError | None] = []  # (once written: None; refused: why)

    async def write_prices() -> None:
        if not spec.pricing.inline:
            return
        if not prices_written:
            prices = r.build_pricing_configmap(owner, spec)
            try:
                version = await _apply(client, kube.CONFIGMAPS, meta["namespace"], prices, None)
            except ApiError as exc:
                prices_written.append(exc)
            else:
                prices_written.append(None)
                _remember(outcome, kube.CONFIGMAPS, prices["metadata"]["name"], None, version)
        if prices_written[0] is not None:
            raise _PricesUnwritten()

    targets = await _inject(
        client,
        config,
        owner,
        spec,
        workloads,
        conditions,
        outcome,
        peers,
        serving,
        blocked=missing_prices,
        before_injecting=write_prices,
    )
    outcome.targets = [workload_key(w) for w in targets]
    # Every workload it selects is served by an older LLMTelemetry: no children of its own, so nothing is
    # scraped, alerted on or charted twice (any it made before the conflict are removed).
    # (Not one that also wins workloads it holds back for its pricing ConfigMap: it says so, and waits for it.)
    conflicted = not targets and conditions[c.CONDITION_INJECTED].reason == "Conflict" and not outcome.held
    # Or it wins them but cannot inject them yet, and the peers serving them keep them meanwhile (see ``kept_for``):
    # their ServiceMonitor, rules and dashboard are the ones in use until it takes the workloads over (then in the
    # same pass it makes its own), not a second, empty dashboard of the same service beside them.
    kept_by_peers = {workload for _peer, workload in outcome.holders}
    keeping = not targets and bool(outcome.unable) and outcome.unable <= kept_by_peers
    standby = conflicted or keeping

    # Children: Services for each target, then the optional ConfigMaps, then the Prometheus Operator objects.
    # A resource no pass has written a status for yet (just created) has had no children made for it, so its
    # first pass creates them without listing each kind first; one that exists all the same (a pass that failed
    # after creating it, before writing the status) answers 409 and is read and compared as a listed one is. The
    # claim an operator writes before its first pass (``status.operator``, see handlers._claim) is no pass's status.
    fresh = not [key for key in owner.get("status") or {} if key != "operator"]
    # Pods whose template sets the label its Service selects by to a value of the user's own, which the injection
    # leaves (it would fight the manifest): their Service selects them by their workload's selector instead.
    user_labelled = [(w, value) for w in targets if (value := r.user_service_label(w)) is not None]
    outcome.unlabelled |= {workload_key(w) for w, _value in user_labelled}
    services, name_clashes = _unique_services(
        [
            (workload_key(w), r.build_metrics_service(owner, spec, w, workload_key(w) not in outcome.unlabelled))
            for w in targets
        ]
    )
    # A workload's metrics Service is named after the workload: one that a lower-ranked peer made while it held
    # the workload is taken over with it.
    outranked = _Outranked(owner, peers, targets)
    # A workload another resource serves now (this one's selector or containers no longer fit it): its Service is
    # left for that one to take over with the workload, in one step, rather than deleted and made anew (a gap).
    served = {id(w) for w in targets}
    handed = {
        r.service_name(w["metadata"]["name"], str(w.get("kind") or "Deployment"))
        for w in workloads
        if id(w) not in served and serving[id(w)] and workload_key(w) not in outcome.untaken
    }
    service_error = await _sync_children(
        client, kube.SERVICES, owner, services, "metrics", outcome, outranked.adopts, fresh, keep=handed
    )
    configmaps: list[dict[str, Any]] = []
    # (A first pass that injected has written the inline prices already, above: not created a second time, which
    # would answer 409 and be read again. A later pass lists them, so keeps them among those wanted, never pruned.)
    if spec.pricing.inline and not standby and not (fresh and prices_written == [None]):
        configmaps.append(r.build_pricing_configmap(owner, spec))
    dashboard_error: str | None = None
    if spec.dashboard.enabled and not standby:
        try:
            configmaps.append(r.build_dashboard_configmap(owner, spec, config))
        except ImportError as exc:  # the dashboards module ships with the middleware; a broken install only
            dashboard_error = f"dashboard could not be rendered: {exc}"
    failed: dict[str, str] = {}
    # Workloads left as they were while the configMapRef is missing may still mount the inline prices' ConfigMap
    # (the spec switched from inline prices): it stays until they are injected anew, or their pods could not start.
    spared = frozenset({r.pricing_configmap_name(name)}) if missing_prices and outcome.held and targets else frozenset()
    cm_error = await _sync_children(
        client, kube.CONFIGMAPS, owner, configmaps, None, outcome, fresh=fresh, failed=failed, keep=spared
    )
    pricing_error = failed.pop(r.pricing_configmap_name(name), None)
    cm_error = bounded(Listed(list(failed.values()), "; ")) or None

    monitor = [] if standby else [r.build_service_monitor(owner, spec, config)]
    monitor_error = await _sync_children(client, kube.SERVICEMONITORS, owner, monitor, None, outcome, fresh=fresh)
    rules = [r.build_prometheus_rule(owner, spec, config)] if spec.alerts.enabled and not standby else []
    rules_error = await _sync_children(client, kube.PROMETHEUSRULES, owner, rules, None, outcome, fresh=fresh)

    # The injected pricing volume names a ConfigMap: without it (or its key) the pods cannot start.
    if outcome.unpriced:
        outcome.retry = True  # (also when standing by, which syncs no ConfigMap: nothing else retries it)
        earlier = conditions.get(c.CONDITION_INJECTED)
        message = bounded(
            f"the inline prices' ConfigMap could not be written: {pricing_error or prices_written[0]}",
            "; until it is, these are not made to mount it (left as they were): ",
            Listed(outcome.unpriced),
            # (said here too, not hidden by this)
            *(
                ["; and the injection failed: ", earlier.message]
                if earlier and earlier.reason == "InjectionFailed"
                else []
            ),
        )
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "PricingConfigMapFailed", message)
    elif targets and pricing_error:
        conditions[c.CONDITION_INJECTED] = r.Condition(
            c.CONDITION_INJECTED,
            False,
            "PricingConfigMapFailed",
            clipped(f"the pricing volume's ConfigMap could not be written, so the pods cannot start: {pricing_error}"),
        )
    elif missing_prices and not conflicted and (targets or outcome.held):
        # Its creation or change is watched (by name, see handlers._await_pricing); the retries with backoff stay,
        # should the watch fail.
        outcome.retry = True
        outcome.awaiting_prices = frozenset({(str(meta["namespace"]), str(spec.pricing.config_map))})
        left: list[str | Listed] = ["; left as they were: ", Listed([workload_key(w) for w in targets])]
        message = bounded(
            missing_prices, "; until then no workload is injected: ", Listed(outcome.held), *(left if targets else [])
        )
        why = "PricingConfigMapInvalid" if _UNREADABLE_PRICES in missing_prices else "PricingConfigMapNotFound"
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, why, message)

    conditions[c.CONDITION_ROUTES] = _routes_condition(config, spec, name, targets, outcome)
    if not conditions[c.CONDITION_ROUTES].status and conditions[c.CONDITION_ROUTES].reason == ROUTED_BY_CONTAINER:
        # Not a failure (the workload chose), but traces the user expects in the collector may never arrive there: one
        # Normal event per change of what the condition says (a pass that finds the same posts none).
        outcome.notices.append((ROUTED_BY_CONTAINER, conditions[c.CONDITION_ROUTES].message))

    # The user's own settings win over the injection: ones that leave the Service's port with nothing to scrape.
    unscrapeable = [
        bounded(f"{workload_key(w)}: ", Listed(found), limit=_NESTED_CHARS)
        for w in targets
        if (found := r.unscrapeable_settings(w, spec))
    ]
    clashes = outcome.port_conflicts
    overlaps = _overlapping(targets)
    if service_error:
        conditions[c.CONDITION_METRICS] = r.Condition(c.CONDITION_METRICS, False, "ServiceFailed", service_error)
    elif clashes:
        conditions[c.CONDITION_METRICS] = r.Condition(
            c.CONDITION_METRICS, False, "PortConflict", _port_conflict_message(spec, clashes)
        )
    elif unscrapeable:
        message = bounded(
            f"the metrics Services scrape port {spec.metrics.port}, where these workloads serve no metrics: ",
            Listed(unscrapeable, "; "),
            f" (a container's own variables and its own port named {c.METRICS_PORT_NAME} win over the injection:"
            " remove these, or for a port set spec.metrics.port to it)",
        )
        conditions[c.CONDITION_METRICS] = r.Condition(c.CONDITION_METRICS, False, "SettingsOverridden", message)
    elif user_labelled:
        message = bounded(
            f"the pod template of these workloads sets the label {c.LABEL_METRICS_SERVICE} itself, which the"
            " injection puts on the pods with the name of their metrics Service; the operator leaves the value it did"
            " not write: ",
            Listed(
                [
                    f"{workload_key(w)} sets it to {value!r} (its metrics Service is {_service_of(w)})"
                    for w, value in user_labelled
                ],
                "; ",
            ),
            ". So their metrics Services select their pods by the workload's selector, which also lists the pods"
            " of any other workload it matches (a canary's), and a metrics Service of that name, if there is one,"
            " lists these pods too: scraped twice (remove the label from the workload's manifest)",
        )
        conditions[c.CONDITION_METRICS] = r.Condition(c.CONDITION_METRICS, False, "ServiceLabelOverridden", message)
    elif name_clashes:
        message = bounded(
            "two workloads would share one metrics Service, and only the first (by kind and name) has it: ",
            Listed(name_clashes, "; "),
            " (the other is injected, but its pods do not get the label that Service selects by, so its metrics"
            " are not scraped; a workload name with a dot, a leading digit or too long for a Service name gets one"
            " made of a part of it and a hash, which another workload's name can equal: rename one)",
        )
        conditions[c.CONDITION_METRICS] = r.Condition(c.CONDITION_METRICS, False, "ServiceNameClash", message)
    elif overlaps:
        message = bounded(
            "the selector of one workload matches the pods of another: ",
            Listed(overlaps, "; "),
            " (Kubernetes asks that workloads' selectors not overlap, or their controllers may act on each other's"
            " pods: give each a label the others' pods lack)",
        )
        conditions[c.CONDITION_METRICS] = r.Condition(c.CONDITION_METRICS, False, "SelectorsOverlap", message)
    else:
        conditions[c.CONDITION_METRICS] = _monitoring_condition(
            c.CONDITION_METRICS,
            "ServiceMonitor",
            monitor_error,
            outcome,
            ready=(
                f"{len(services)} metrics Service(s) scraped by ServiceMonitor {r.service_monitor_name(name)}"
                if services
                else f"ServiceMonitor {r.service_monitor_name(name)} is in place; no selected workload has a metrics"
                " Service to scrape yet"
            ),
            missing_prefix="metrics Services exist, but " if services else "",
        )

    if not spec.alerts.enabled:
        conditions[c.CONDITION_ALERTS] = r.Condition(
            c.CONDITION_ALERTS, False, "Disabled", "spec.alerts.enabled is false"
        )
    else:
        conditions[c.CONDITION_ALERTS] = _monitoring_condition(
            c.CONDITION_ALERTS,
            "PrometheusRule",
            rules_error,
            outcome,
            ready=f"alert rules in PrometheusRule {r.prometheus_rule_name(name)}",
        )

    if not spec.dashboard.enabled:
        conditions[c.CONDITION_DASHBOARD] = r.Condition(
            c.CONDITION_DASHBOARD, False, "Disabled", "spec.dashboard.enabled is false"
        )
    elif dashboard_error or cm_error:
        conditions[c.CONDITION_DASHBOARD] = r.Condition(
            c.CONDITION_DASHBOARD, False, "ConfigMapFailed", str(dashboard_error or cm_error)
        )
    else:
        conditions[c.CONDITION_DASHBOARD] = r.Condition(
            c.CONDITION_DASHBOARD,
            True,
            "ConfigMapReady",
            f"dashboard ConfigMap {r.dashboard_configmap_name(name)} in folder {spec.dashboard.folder!r}",
        )

    if standby:
        message = "no children while " + conditions[c.CONDITION_INJECTED].message
        if keeping:
            message = bounded(
                "no children while ",
                Listed([f"{workload} is kept by {peer}" for peer, workload in sorted(outcome.holders)]),
                ", whose children serve it until this resource can inject it (see Injected)",
            )
        for type_ in (c.CONDITION_METRICS, c.CONDITION_ALERTS, c.CONDITION_DASHBOARD):
            if not (keeping and conditions[type_].reason == "PortConflict"):  # (said where the port is taken)
                conditions[type_] = r.Condition(type_, False, "Conflict", message)
    for type_, cond in conditions.items():
        if type_ == c.CONDITION_ROUTES:
            continue  # (informational: its Normal event is a notice, above)
        # Conflicts have one event per workload lost, posted by _inject.
        failure = (cond.reason, cond.message)
        # One event per failure: _inject has already listed a missing container (the same words as its condition).
        if (
            not cond.status
            and cond.reason not in ("Disabled", "NoTargets", "Conflict")
            and failure not in outcome.failures
        ):
            outcome.failures.append(failure)
        if cond.reason.endswith("Failed"):
            outcome.retry = True
    required = [
        cond
        for t, cond in conditions.items()
        if cond.reason != "Disabled" and t not in (c.CONDITION_COLLECTORS, c.CONDITION_ROUTES)
    ]
    blocking = [cond for cond in required if not cond.status]
    outcome.ready = not blocking
    if outcome.ready:
        ready = r.Condition(c.CONDITION_READY, True, "Ready", bounded("telemetry wired for ", Listed(outcome.targets)))
    else:
        first = blocking[0]
        ready = r.Condition(c.CONDITION_READY, False, first.reason, first.message)
    phase = outcome.phase = "Ready" if outcome.ready else ("Pending" if not targets else "Degraded")
    ordered = [ready] + [conditions[t] for t in _CONDITION_TYPES[1:]]
    await _write_status(client, config, owner, ordered, outcome.targets, phase, outcome)
    return outcome


_CONDITION_TYPES = (
    c.CONDITION_READY,
    c.CONDITION_INJECTED,
    c.CONDITION_METRICS,
    c.CONDITION_ALERTS,
    c.CONDITION_DASHBOARD,
    c.CONDITION_COLLECTORS,
    c.CONDITION_ROUTES,
)

#: The most characters of a list inside an item of a message's list (a workload's containers, the workloads whose
#: pods its selector matches): the item stays short enough for the message to name it and others (see ``bounded``).
_NESTED_CHARS: Final = 400
#: The most characters of one API error in a message listing errors: whole, it leaves room for ``; and N more``.
_ERROR_CHARS: Final = MAX_MESSAGE_CHARS - 100

#: The reason of a ``SignalsRouted`` condition (and its Normal event) when an injected container routes a signal the
#: resource routes itself.
ROUTED_BY_CONTAINER: Final = "RoutedByContainer"
#: The most containers a ``RoutedByContainer`` message names; it names fewer when they would take it past
#: MAX_MESSAGE_CHARS (kopf cuts a longer event message in its middle), and says how many more there are.
ROUTES_NAMED: Final = 5


def _routes_condition(
    config: OperatorConfig, spec: TelemetrySpec, owner_name: str, targets: Sequence[Mapping[str, Any]], outcome: Outcome
) -> r.Condition:
    """Whether every injected container sends the signals this resource routes to its collectors. One that routes a
    signal itself (its ``env`` declares the signal's own OTLP endpoint or headers, or for traces the generic
    endpoint) gets none of that signal's injected endpoint, protocol and headers, so as never to send an app's own
    credentials to the collector (see ``resources._apply``): its signal stays on its own pipeline, which the user who
    set the collector should hear of. The message names workloads, containers, signals and variables, never a
    value (a URL or headers may hold a key)."""
    wanted = [signal for signal, on in (("traces", spec.tracing.enabled), ("logs", _otlp_logs(spec))) if on]
    if not wanted:
        return r.Condition(c.CONDITION_ROUTES, False, "Disabled", "neither traces nor OTLP logs are enabled")
    routed = [signal for signal in wanted if signal not in outcome.without]
    if not routed:
        message = f"no collector to route {' and '.join(wanted)} to: see {c.CONDITION_COLLECTORS}"
        return r.Condition(c.CONDITION_ROUTES, False, "CollectorNotFound", message)
    if not targets:
        return r.Condition(c.CONDITION_ROUTES, False, "NoTargets", "no workload is injected")
    # (The variables that route a signal are the same in every workload's injection: one serves for all.)
    injection = r.build_injection(spec, config, targets[0], owner_name, outcome.without)
    found = [
        f"{workload_key(w)} container {container}: "
        + ", ".join(f"{signal.lower()} ({', '.join(names)})" for signal, names in signals.items())
        for w in targets
        for container, signals in r.own_routes(w, injection).items()
    ]
    if found:
        head = (
            "these containers route a signal themselves (in their env), so the operator injects none of its endpoint,"
            " protocol or headers there, and it goes where their own settings say, not to this resource's collector"
            " unless those name it: "
        )
        tail = (
            " (a container's own headers, say a vendor's key, never go to the collector; to send a signal here, take"
            " those variables out of the container's env)"
        )
        message = bounded(head, Listed(found, "; ", most=ROUTES_NAMED), tail)
        return r.Condition(c.CONDITION_ROUTES, False, ROUTED_BY_CONTAINER, message)
    missing = [signal for signal in wanted if signal not in routed]
    note = f" ({' and '.join(missing)}: no collector, see {c.CONDITION_COLLECTORS})" if missing else ""
    return r.Condition(
        c.CONDITION_ROUTES,
        True,
        "Routed",
        f"every injected container sends {' and '.join(routed)} to this resource's collector{note}",
    )


def _otlp_logs(spec: TelemetrySpec) -> bool:
    return spec.logs.enabled and spec.logs.mode == "otlp"


async def _collectors(
    client: KubeClient,
    config: OperatorConfig,
    spec: TelemetrySpec,
    check: CollectorCheck | None,
    outcome: Outcome,
) -> r.Condition:
    """Look up the Services of the collectors the enabled exporters would send to; leave out (``outcome.without``)
    each exporter whose Service is missing, and say so in the condition (see :mod:`collectors`)."""
    check = check or CollectorCheck(config.namespaces)
    wanted = []
    if spec.tracing.enabled:
        wanted.append(("traces", r.traces_endpoint(spec, config), "spec.tracing.endpoint"))
    if spec.logs.enabled and spec.logs.mode == "otlp":
        wanted.append(("logs", spec.logs.endpoint or config.logs_endpoint, "spec.logs.endpoint"))
    if not wanted:
        return r.Condition(c.CONDITION_COLLECTORS, False, "Disabled", "neither traces nor OTLP logs are enabled")
    missing, found, unchecked = [], [], []
    for signal, endpoint, spec_field in wanted:
        lookup = await check.lookup(client, endpoint)
        if lookup.found is False and lookup.service is not None:
            namespace, name = lookup.service
            outcome.without |= {signal}
            outcome.awaiting |= {lookup.service}
            if lookup.ports:
                serves = ", ".join(map(str, lookup.ports))
                problem = f"{lookup.note} (it serves {serves}), so no {signal} exporter is injected"
                remedy = f"point {spec_field} at one of its ports"
                if signal == "traces" and spec.tracing.protocol == "grpc":
                    # (OTLP's HTTP port refuses gRPC: the port to point at, or to open, is the gRPC one)
                    remedy = f"open the collector's OTLP/gRPC port there, or point {spec_field} at its gRPC port"
            else:
                problem = f"does not exist, so no {signal} exporter is injected"
                remedy = f"install the collector there or point {spec_field} at one"
            missing.append(f"{signal}: Service {name} in namespace {namespace} ({shown(endpoint)}) {problem}; {remedy}")
        elif lookup.found:
            found.append(f"{signal}: {shown(endpoint)}")
        else:
            unchecked.append(f"{signal}: {shown(endpoint)} ({lookup.note})")
    if missing:
        return r.Condition(c.CONDITION_COLLECTORS, False, "CollectorNotFound", bounded(Listed(missing, "; ")))
    if unchecked:
        return r.Condition(c.CONDITION_COLLECTORS, True, "NotChecked", bounded(Listed(found + unchecked, "; ")))
    return r.Condition(c.CONDITION_COLLECTORS, True, "CollectorsFound", bounded(Listed(found, "; ")))


_CRD_MISSING = "crd-missing"


class _PricesUnwritten(Exception):
    """The inline prices' ConfigMap could not be written: the workload is not patched to mount it."""


async def _inject(
    client: KubeClient,
    config: OperatorConfig,
    owner: Mapping[str, Any],
    spec: TelemetrySpec,
    workloads: list[dict[str, Any]],
    conditions: dict[str, r.Condition],
    outcome: Outcome,
    peers: PeerView,
    serving: Mapping[int, Sequence[Peer]],
    blocked: str | None = None,
    before_injecting: Callable[[], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Inject or remove the injection of each workload; returns the targets (those injected). ``serving``: the
    peers that would inject each workload, by ``id``. ``blocked``: why no workload may be injected now (the pricing
    ConfigMap missing): the selected ones are left as they are, and those this resource had injected before stay
    its targets. ``before_injecting``: awaited before each patch that injects (what the injection mounts is made)."""
    name = owner["metadata"]["name"]
    targets: list[dict[str, Any]] = []
    skipped: list[str] = []
    lost: list[str] = []
    kept: list[str] = []
    handing: list[str] = []
    deferred: list[str] = []
    #: Whether each pricing ConfigMap (name, key) a winning peer mounts is missing, as looked up by this pass.
    peer_prices: dict[tuple[Any, Any], bool] = {}
    errors: list[str] = []
    missing: list[str] = []
    paused: list[str] = []
    on_delete: list[str] = []
    partitioned: list[str] = []
    partly: list[str] = []
    #: The metrics Service names of the targets so far, each the first by kind and name to have it: the workloads
    #: come in that order, so a later one of the same name loses the Service (ServiceNameClash, see
    #: ``_unique_services``), and its pods do not get the label the winner's Service selects by.
    claimed: set[str] = set()
    for workload in workloads:
        settled = (kube.WORKLOADS[workload["kind"]].plural, workload["metadata"]["name"])
        if (workload.get("metadata") or {}).get("generation") is not None:
            # Decided in this state (left alone, or already as desired); a patch below replaces it by the state after.
            outcome.settled[settled] = workload_state(workload)
        labels = workload.get("metadata", {}).get("labels") or {}
        record = r.injected_record(workload)
        mine = record is not None and record.get("owner") == name
        selected = spec.selector.matches(labels) and workload.get("metadata", {}).get("deletionTimestamp") is None
        if selected and labels.get(c.LABEL_NAME) == c.OPERATOR_NAME:
            # The operator itself (no LLM service): injected, its own pods would roll, and roll again on every change.
            skipped.append(f"{workload_key(workload)} (the operator itself)")
            selected = False
            if not mine:
                continue
        if selected and spec.containers:
            present = [ct.get("name") for ct in _pod_containers(workload)]
            if not set(spec.containers) & set(present):
                # Nothing to inject into (a misspelt or renamed container): said so, not counted as a target, and
                # whoever else serves the workload is no rival of this resource's.
                its = bounded(Listed([str(name) for name in present]), limit=_NESTED_CHARS)
                missing.append(f"{workload_key(workload)} (its containers: {its})")
                selected = False
                if not mine:
                    continue
            elif absent := [n for n in spec.containers if n not in present]:
                # Some named, not all: the others may be misspelt, which injecting the rest would otherwise hide.
                partly.append(
                    f"{workload_key(workload)} has no container {bounded(Listed(absent), limit=_NESTED_CHARS)}"
                )
        rival = _rival(owner, serving[id(workload)]) if selected else None
        if (
            rival is not None
            and mine
            and await _cannot_inject(client, owner, workload, serving[id(workload)], rival, peer_prices)
        ):
            # The winner cannot inject it yet: left to it now, the workload would have no telemetry until it can. So
            # it is kept, and the winner takes it over in one patch once it can (see ``holders``).
            winner = rival["metadata"]["name"]
            kept.append(f"{workload_key(workload)} (won by {winner}, which cannot inject it yet: see its status)")
            outcome.kept_for.add((winner, workload_key(workload)))
            rival = None
        if rival is not None:
            winner = rival["metadata"]["name"]
            message = _won_by(workload, rival)
            if record is not None and record.get("owner") == winner:
                lost.append(f"{workload_key(workload)} (served by {winner})")
            else:  # it holds the workload uninjected (its pricing ConfigMap missing, say), or has yet to inject it
                lost.append(f"{workload_key(workload)} (won by {winner}, which has not injected it: see its status)")
            outcome.failures.append(("Conflict", message))
            outcome.shown[("Conflict", message)] = lost[-1]
            selected = False  # remove our injection, if we had made it before the winner appeared
            if not mine:
                continue
        if selected and (found := r.port_conflicts(workload, spec)):
            # The middleware's listener and that port cannot both be served (when the middleware binds first, the
            # app cannot start): not injected, its injection removed if it had one, until the port is free.
            outcome.port_conflicts.append(f"{workload_key(workload)}: {bounded(Listed(found), limit=_NESTED_CHARS)}")
            outcome.unable.add(workload_key(workload))
            skipped.append(f"{workload_key(workload)} (port {spec.metrics.port} taken)")
            selected = False
            if not mine:
                if record is not None and peers.named(str(record.get("owner"))) is not None:
                    # It keeps serving the workload (see ``kept_for``).
                    outcome.holders.add((str(record.get("owner")), workload_key(workload)))
                continue
        holder = None if record is None or mine else str(record.get("owner"))
        take_over = False
        if holder is not None:
            # Injected by another: ours only if that one is a live peer this resource wins the workload from, or
            # one being deleted (which this resource wins the workload from too, being its best live selector).
            beaten = peers.named(holder) is not None or peers.leaving(holder)
            if selected and not beaten and not await _exists(client, owner["metadata"]["namespace"], holder):
                # A record of an LLMTelemetry that is gone (a manifest copied with its annotations, a finalizer
                # removed by hand): nobody serves the workload, so it is this resource's to take.
                beaten = True
            if not (selected and beaten):
                if selected:
                    # Its injector is there but no peer: its spec is invalid (it keeps what its last valid spec
                    # made), or it is too new to be read yet. A conflict all the same, said as one: this resource
                    # does not serve a workload it selects.
                    message = (
                        f"{workload_key(workload)} is injected by LLMTelemetry {holder}, whose spec is not valid (or"
                        f" not read yet); it keeps the workload as its last valid spec made it, and this resource"
                        f" leaves it alone until {holder} is fixed or deleted"
                    )
                    lost.append(f"{workload_key(workload)} (held by {holder}, not valid or not read yet)")
                    outcome.failures.append(("Conflict", message))
                    outcome.shown[("Conflict", message)] = lost[-1]
                continue
            if (
                selected
                and not peers.leaving(holder)
                and (known := peers.named(holder)) is not None
                and precedence(known[0]) < precedence(owner)
                and (fresh := await _serving_now(client, owner["metadata"]["namespace"], holder, workload)) is not None
                and precedence(fresh) < precedence(owner)
            ):
                # An older peer whose spec, as this operator knows it, does not select the workload (else it would be
                # the rival above), yet its injection is in it: it let the workload go (taken over below), or its
                # spec changed and its injection came before the watch event of that change reached this operator
                # (another operator serves it). Read again, it serves the workload: left to it, as to any winner.
                message = _won_by(workload, fresh)
                lost.append(f"{workload_key(workload)} (served by {holder})")
                outcome.failures.append(("Conflict", message))
                outcome.shown[("Conflict", message)] = lost[-1]
                continue
            take_over = True
        if not selected and not mine:
            continue
        # Its peers defer to it while it still selects the workload and outranks them: none would take it over
        # (its metrics port taken in the pods, say), so its injection is removed here.
        deferred_to = (
            spec.selector.matches(labels)
            and _serves((owner, spec), workload)
            and _rival(owner, serving[id(workload)]) is None
        )
        if not selected and serving[id(workload)] and labels.get(c.LABEL_NAME) != c.OPERATOR_NAME and not deferred_to:
            # A peer serves it now: left for that one to take over in one patch (its pass starts at once), rather
            # than removed here and injected there (two rollouts, and pods without telemetry in between). Every pass
            # of this resource leaves it so until then: one coming first (its children's events, say) removed it.
            # A peer that cannot inject it (its pricing ConfigMap missing, its port taken) would not take it: the
            # injection is removed now.
            best = min(serving[id(workload)], key=lambda peer: precedence(peer[0]))
            if not await _cannot_inject(client, owner, workload, serving[id(workload)], best[0], peer_prices):
                outcome.handed.add(best[0]["metadata"]["name"])
                # Its injection is still in it until then: said so (a status of no targets alone would hide it).
                handing.append(
                    f"{workload_key(workload)} (to {best[0]['metadata']['name']}, its injection still in it)"
                )
                continue
            outcome.untaken.add(workload_key(workload))
        if blocked is not None and selected:
            outcome.held.append(workload_key(workload))
            outcome.unable.add(workload_key(workload))
            if holder is not None and peers.named(holder) is not None:
                # It keeps serving the workload until this resource can take it over.
                outcome.holders.add((holder, workload_key(workload)))
            if mine:
                targets.append(workload)  # injected before: its pods run as they are, not rolled to ones that fail
                claimed.add(_service_of(workload))
                if _unrolled(workload):
                    outcome.unlabelled.add(workload_key(workload))
            continue
        try:
            after, read = await _patch_workload(
                client,
                config,
                owner,
                spec if selected else None,
                workload,
                take_over=take_over,
                without=outcome.without,
                before=before_injecting if selected else None,
                label=_service_of(workload) not in claimed,
                decided=True,
            )
        except _PricesUnwritten:
            # Held back as for a missing configMapRef (above): a holder keeps serving it until this one can.
            outcome.unpriced.append(workload_key(workload))
            outcome.held.append(workload_key(workload))
            outcome.unable.add(workload_key(workload))
            if holder is not None and peers.named(holder) is not None:
                outcome.holders.add((holder, workload_key(workload)))
            if mine:
                targets.append(workload)  # (already mounting them: see the ConfigMaps' sync)
                claimed.add(_service_of(workload))
                if _unrolled(workload):
                    outcome.unlabelled.add(workload_key(workload))
            continue
        except NotFoundError:
            # Deleted since the list this pass decided from (its patch, or the read again after a conflict, met a 404):
            # gone, not failed. No target, nothing to report; its metrics Service goes with it.
            outcome.settled.pop(settled, None)
            continue
        except (ApiError, r.InjectionConflict) as exc:
            errors.append(clipped(f"{workload_key(workload)}: {exc}", _ERROR_CHARS))
            outcome.settled.pop(settled, None)  # not as desired: an event for it is worth a pass
            if mine and selected:
                # Injected before, as it still is: its metrics Service and that name stay its own (a workload whose
                # Service name it shares does not take them, nor the label, for as long as its patch is refused).
                targets.append(workload)
                claimed.add(_service_of(workload))
                if _unrolled(workload):
                    outcome.unlabelled.add(workload_key(workload))
            elif mine and r.carries_service_label(workload):
                claimed.add(_service_of(workload))  # (its removal refused: its pods keep the label, and that name)
            continue
        if after is None:
            # Its labels, record or spec changed between the list this pass decided from and its patch (read again
            # after the conflict): left as it now is, not settled, and decided again by a pass in a few seconds, rather
            # than patched as decided and patched back then (a rollout in and one out for a deselected one). The
            # watch event of that change came while this pass ran, and may have named no resource then.
            outcome.settled.pop(settled, None)
            outcome.retry = True
            deferred.append(f"{workload_key(workload)} (changed while this pass ran: the next one decides on it)")
            now = r.injected_record(read)
            if now is not None and now.get("owner") == name:
                # Its injection, by this resource, is still in it: its metrics Service and that name stay its own.
                targets.append(dict(read))
                claimed.add(_service_of(read))
                if _unrolled(read):
                    outcome.unlabelled.add(workload_key(read))
            continue
        _remember(outcome, kube.WORKLOADS[workload["kind"]], workload["metadata"]["name"], workload, _version(after))
        if (after.get("metadata") or {}).get("generation") is not None:
            outcome.settled[settled] = workload_state(after)
            outcome.decided[settled] = workload_state(workload)
        else:
            outcome.settled.pop(settled, None)
        if selected:
            targets.append(workload)
            claimed.add(_service_of(workload))
            why = _held_back(workload, patched=after is not read)
            if why is not None:
                {"paused": paused, "on_delete": on_delete, "partition": partitioned}[why].append(workload_key(workload))
                # Its pods keep the template they have, which may lack the label (injected by an earlier version).
                outcome.unlabelled.add(workload_key(workload))
    namespace = owner["metadata"]["namespace"]
    named = Listed(spec.containers)
    no_container = bounded("no container named ", named, " (spec.containers) in ", Listed(missing))
    if missing:
        outcome.failures.append(("NoContainer", no_container))
        skipped += [f"{item}, none named in spec.containers" for item in missing]
    notes: list[str | Listed] = []
    for what, items in (
        ("skipped", skipped),
        ("left", lost),
        ("kept", kept),
        ("handing over", handing),
        ("deferred", deferred),
    ):
        if items:
            notes += [f"; {what} ", Listed(items)]
    if errors:
        conditions[c.CONDITION_INJECTED] = r.Condition(
            c.CONDITION_INJECTED, False, "InjectionFailed", bounded(Listed(errors, "; "))
        )
    elif not targets and lost:
        message = bounded("every selected workload is left to another LLMTelemetry: ", Listed(lost))
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "Conflict", message)
    elif not targets and missing:
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "NoContainer", no_container)
    elif not targets and outcome.port_conflicts:
        message = _port_conflict_message(spec, outcome.port_conflicts)  # the words of MetricsExposed: one event
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "PortConflict", message)
    elif outcome.unpriced:
        # Left unpatched, the inline prices' ConfigMap unwritten: the pass says why once it has synced the ConfigMaps
        # (PricingConfigMapFailed), with no NoTargets event.
        message = bounded(
            "no workload is made to mount the prices until their ConfigMap is written: ", Listed(outcome.unpriced)
        )
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "PricingConfigMapFailed", message)
    elif not targets and outcome.held:
        # Selected, but left as they are until the pricing ConfigMap can be had: the pass says why once it has
        # looked at the ConfigMap (PricingConfigMapNotFound or PricingConfigMapInvalid), with no NoTargets event.
        message = bounded("no workload is injected until the pricing ConfigMap can be read: ", Listed(outcome.held))
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "PricingConfigMapNotFound", message)
    elif not targets and skipped:
        message = bounded(f"no Deployment or StatefulSet it selects in namespace {namespace} is one to inject", *notes)
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "NoTargets", message)
        if not deferred:  # (else the next pass, in seconds, says whether it still has none)
            outcome.notices.append(("NoTargets", message))
    elif not targets:
        # A deferred workload may match the selector still: the message says only what is sure until the next pass.
        nothing = (
            f"no Deployment or StatefulSet in namespace {namespace} is injected by this resource yet"
            if deferred
            else f"no Deployment or StatefulSet matches spec.selector in namespace {namespace} (by the workload's own"
            " labels, not its pod template's)"
        )
        message = bounded(nothing, *notes)
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, False, "NoTargets", message)
        if not deferred:  # (else the next pass, in seconds, says whether it still has none)
            outcome.notices.append(("NoTargets", message))
    else:
        if paused:
            # Its pod template has the injection, but no pod rolls until the Deployment is resumed.
            notes += ["; paused (its pods get it once resumed with kubectl rollout resume): ", Listed(paused)]
        if on_delete:
            # Its controller replaces a pod only once someone deletes it.
            notes += ["; updateStrategy OnDelete (each pod gets it once deleted): ", Listed(on_delete)]
        if partly:
            notes += ["; ", Listed(partly, "; "), " (spec.containers)"]
        if partitioned:
            # Its controller rolls only the pods whose ordinal is at least the partition.
            notes += [
                "; rollingUpdate.partition (pods with an ordinal below it keep the old template until it is lowered): ",
                Listed(partitioned),
            ]
        message = bounded("injected into ", Listed([workload_key(w) for w in targets]), *notes)
        conditions[c.CONDITION_INJECTED] = r.Condition(c.CONDITION_INJECTED, True, "Injected", message)
    return targets


def _port_conflict_message(spec: TelemetrySpec, conflicts: list[str]) -> str:
    return bounded(
        f"spec.metrics.port {spec.metrics.port} is taken in these pods, and the middleware's listener cannot share"
        " it: ",
        Listed(conflicts, "; "),
        " (they are not injected until it is free: set spec.metrics.port to a free port; a port that is the"
        f" middleware's own listener, declared by hand, is named {c.METRICS_PORT_NAME})",
    )


def _service_of(workload: Mapping[str, Any]) -> str:
    return r.service_name(workload["metadata"]["name"], str(workload.get("kind") or "Deployment"))


def _unrolled(workload: Mapping[str, Any]) -> bool:
    """Whether a workload left as it is may run pods without the label its metrics Service selects by: its template
    lacks it (injected by an earlier version), or its controller has yet to roll its pods to that template."""
    return not r.carries_service_label(workload) or _held_back(workload, patched=False) is not None


def _held_back(workload: Mapping[str, Any], patched: bool) -> str | None:
    """Why a workload's pods have yet to get its template, or None: a paused Deployment (``"paused"``), a
    StatefulSet whose update strategy is OnDelete (``"on_delete"``), whose controllers roll no pod by themselves, or
    one rolling only the pods from its ``rollingUpdate.partition`` up (``"partition"``), while this pass changed the
    template or the status counts fewer pods of the current template than it wants (one paused after its pods
    rolled is not held back)."""
    spec = workload.get("spec") or {}
    if workload.get("kind") == "StatefulSet":
        strategy = spec.get("updateStrategy") or {}
        partition = (strategy.get("rollingUpdate") or {}).get("partition") if isinstance(strategy, Mapping) else None
        if strategy.get("type") == "OnDelete":
            why = "on_delete"
        elif isinstance(partition, int) and not isinstance(partition, bool) and partition > 0:
            why = "partition"
        else:
            return None
    elif spec.get("paused") is True:
        why = "paused"
    else:
        return None
    status = workload.get("status")
    if patched or not isinstance(status, Mapping):
        return why if patched else None
    wanted = spec.get("replicas")
    stale = (status.get("observedGeneration") or 0) < ((workload.get("metadata") or {}).get("generation") or 0)
    behind = int(status.get("updatedReplicas") or 0) < (wanted if isinstance(wanted, int) else 1)
    return why if stale or behind else None


def _unique_services(built: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The metrics Services to keep, one per name, the first by workload (kind and name) winning each, and what
    lost: two workloads whose Services would share a name would otherwise rewrite it on every pass."""
    owners: dict[str, str] = {}
    kept: list[dict[str, Any]] = []
    clashes: list[str] = []
    for key, service in sorted(built, key=lambda pair: pair[0]):
        name = service["metadata"]["name"]
        if name in owners:
            clashes.append(f"{key} would share Service {name} with {owners[name]}")
            continue
        owners[name] = key
        kept.append(service)
    return kept, clashes


def _overlapping(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """Of the targets, each whose selector also matches another's pods, and whose. (Its metrics Service selects its
    own pods only, by the label the injection adds: this is Kubernetes' rule, not a second scrape.)"""
    found = []
    for workload in targets:
        selector = r.workload_pod_selector(workload)
        if not selector:
            continue
        others = [
            workload_key(other)
            for other in targets
            if other is not workload and all(_pod_labels(other).get(k) == v for k, v in selector.items())
        ]
        if others:
            found.append(bounded(f"{workload_key(workload)} selects the pods of ", Listed(others), limit=_NESTED_CHARS))
    return found


def _pod_labels(workload: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = (((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _pod_containers(workload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    containers = ((workload.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers")
    return [ct for ct in containers or [] if isinstance(ct, Mapping)]


async def _patch_workload(
    client: KubeClient,
    config: OperatorConfig,
    owner: Mapping[str, Any],
    spec: TelemetrySpec | None,
    workload: dict[str, Any],
    *,
    take_over: bool = False,
    without: frozenset[str] = frozenset(),
    before: Callable[[], Awaitable[None]] | None = None,
    label: bool = True,
    decided: bool = False,
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any]]:
    """Inject (or with ``spec`` None, remove) the telemetry; returns the workload after (the answer to the patch,
    which may hold its metadata only, or the workload as read when it needed none), and the workload as last read:
    ``workload``, or the version read again after a conflict (a 409, or a 422 for a failed ``test``).
    ``take_over``: replace another LLMTelemetry's injection (this one won the workload from it).
    ``before``: awaited once a patch is to be sent, before it is.
    ``label``: whether its pods get the label its metrics Service selects by (see ``r.build_workload_patch``).
    ``decided``: the patch carries a decision made from ``workload`` as given (its labels, record and spec). A
    version read again after a conflict in another :func:`workload_state` is then not patched: it is returned as read,
    with None for the workload after, for a later pass to decide on."""
    name = owner["metadata"]["name"]
    resource = kube.WORKLOADS[workload["kind"]]
    namespace, wl_name = workload["metadata"]["namespace"], workload["metadata"]["name"]
    state = workload_state(workload)
    for attempt in range(CONFLICT_ATTEMPTS):
        if decided and workload_state(workload) != state:
            return None, workload
        injection = r.build_injection(spec, config, workload, name, without) if spec is not None else None
        patch = r.build_workload_patch(workload, injection, name, take_over=take_over, label=label)
        if patch is None:
            return workload, workload
        if before is not None:
            await before()
        try:
            # Preconditions on what the pass decided from only: the workload controller's own updates in between
            # (its status, its revision annotation) no longer fail it (see ``r.guarded_patch``).
            guarded = r.guarded_patch(workload, patch)
            patched = await client.patch(resource, namespace, wl_name, guarded, metadata_only=True)
            logger.info("%s %s/%s", "injected into" if spec else "removed injection from", workload["kind"], wl_name)
            return patched, workload
        except ConflictError:
            if attempt == CONFLICT_ATTEMPTS - 1:
                raise
            workload = {**await client.get(resource, namespace, wl_name), "kind": workload["kind"]}
    return None, workload


async def successors(
    client: KubeClient, owner: Mapping[str, Any], peers: PeerView, injected: Iterable[str] = ()
) -> list[Peer]:
    """The live peers that win the workloads ``owner`` injected, once it is gone (it is being deleted), in
    precedence order. A pass of each of them before ``owner``'s injection is removed takes those workloads over
    from it in one patch each (``peers.leaving``), so their pods roll once, to the new injection, and their
    metrics Services stay."""
    name = owner["metadata"]["name"]
    try:
        workloads = await _candidates(client, owner, parse_spec(owner.get("spec") or {}), injected)
    except SpecError:
        return []  # no selector to go by: its injection, if any, is removed as before
    found: dict[str, Peer] = {}
    for workload in workloads:
        record = r.injected_record(workload)
        if record is None or record.get("owner") != name:
            continue
        selecting = _serving(workload, peers)
        if selecting:
            best = min(selecting, key=lambda peer: precedence(peer[0]))
            found.setdefault(best[0]["metadata"]["name"], best)
    return sorted(found.values(), key=lambda peer: precedence(peer[0]))


async def remove_injection(
    client: KubeClient, config: OperatorConfig, owner: Mapping[str, Any], injected: Iterable[str] = ()
) -> list[str]:
    """Undo injection into every workload this LLMTelemetry injected; returns the workloads touched.

    The workloads looked at are those its selector selects, the targets its last status names and ``injected``
    (the same reads as a pass, see :func:`_candidates`), so deleting many resources costs each one the reads of
    its own workloads, not a list of the whole namespace. Only a spec that cannot be parsed (no selector to go by)
    falls back to every workload of the namespace.
    """
    name = owner["metadata"]["name"]
    touched = []
    try:
        workloads = await _candidates(client, owner, parse_spec(owner.get("spec") or {}), injected)
    except SpecError:
        workloads = await list_workloads(client, owner["metadata"]["namespace"])
    for workload in workloads:
        record = r.injected_record(workload)
        if record is not None and record.get("owner") == name:
            try:
                await _patch_workload(client, config, owner, None, workload)
            except NotFoundError:
                continue  # deleted since it was listed (a namespace going, say): nothing left to undo
            touched.append(workload_key(workload))
    return touched


async def delete_children(client: KubeClient, owner: Mapping[str, Any]) -> int:
    """Delete every child of this LLMTelemetry (the API server's garbage collector would too, eventually): every
    object labelled as its child that it controls (its uid in the controller owner reference); one labelled so
    without that reference is someone else's (see :func:`_ours`) and stays."""
    meta = owner["metadata"]
    deleted = 0
    if len(meta["name"]) > r.MAX_OWNER_NAME:
        # No label value holds the name (a resource stored before the CRD limited it): no child carries it, and
        # the API server refuses a selector for it, which would hold the deletion up for good.
        return deleted
    for resource in (kube.SERVICES, kube.CONFIGMAPS, kube.SERVICEMONITORS, kube.PROMETHEUSRULES):
        try:
            children = await client.list(resource, meta["namespace"], labels=r.owner_selector(meta["name"]))
        except NotFoundError:
            continue  # the CRD is not installed: nothing of ours there
        for child in children:
            if _controller_uid(child) != meta.get("uid"):
                continue  # labelled as its child but not controlled by it (a copy, an orphan): someone else's
            deleted += await client.delete(resource, meta["namespace"], child["metadata"]["name"])
    return deleted


async def update_refused(client: KubeClient, owner: Mapping[str, Any]) -> str | None:
    """Why the API server refuses any update of this LLMTelemetry (422: it breaks a rule of the CRD installed since it
    was stored, on a server without validation ratcheting), or None. Its finalizer cannot be removed then, and kopf
    says nothing of it: an empty patch, dry run, asks."""
    meta = owner["metadata"]
    try:
        await client.patch(kube.LLMTELEMETRIES, meta["namespace"], meta["name"], {"metadata": {}}, dry_run=True)
    except ApiError as exc:
        if exc.status == 422:
            return str(exc)
    return None


async def _exists(client: KubeClient, namespace: str, name: str) -> bool:
    """Whether the LLMTelemetry ``name`` exists in ``namespace`` (an invalid one too, which is no peer). An answer
    that it does not exist, on which its workload is taken from it, is confirmed (see :func:`named_resources`): a
    cache lagging behind had a workload taken over from a holder that exists (a rollout, and another when the holder
    took it back)."""
    found = await named_resources(client, namespace, name, lambda item: item["metadata"].get("name") == name)
    return any((item.get("metadata") or {}).get("name") == name for item in found)


def _won_by(workload: Mapping[str, Any], winner: Mapping[str, Any]) -> str:
    """The Conflict message of a workload that LLMTelemetry ``winner`` wins from the resource of the pass."""
    created = winner["metadata"].get("creationTimestamp") or "the same time"
    return (
        f"{workload_key(workload)} is also selected by LLMTelemetry {winner['metadata']['name']}, which wins it (the"
        f" oldest wins: created {created}, then by name); this resource leaves it alone"
    )


async def _serving_now(
    client: KubeClient, namespace: str, name: str, workload: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """The LLMTelemetry ``name`` as the API server has it now (a consistent list by name: a watch cache may lag as
    this operator's watch does), if it would inject ``workload`` (see :func:`_serves`) and is not being deleted;
    else None (gone, being deleted, an invalid spec, or not selecting it)."""
    found = await client.list(kube.LLMTELEMETRIES, namespace, fields={"metadata.name": name}, consistent=True)
    for item in found:
        meta = item.get("metadata") or {}
        if meta.get("name") != name or meta.get("deletionTimestamp"):
            continue
        try:
            spec = parse_spec(item.get("spec") or {})
        except SpecError:
            return None
        return item if _serves((item, spec), workload) else None
    return None


async def named_resources(
    client: KubeClient, namespace: str, name: str, wanted: Callable[[Mapping[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The LLMTelemetry resources named ``name`` in ``namespace``: a list by name (the operator's role lists these
    resources, and has no need to get them), from the API server's watch cache first; when none is ``wanted``, a
    consistent list, as the caller would take that for a resource gone. Behind several API servers, each with its
    own cache, one may lag behind the others and miss a resource made moments ago (or still hold the one its name had
    before). One more list only in that rare case."""
    found = await client.list(kube.LLMTELEMETRIES, namespace, fields={"metadata.name": name})
    if any(wanted(item) for item in found if item.get("metadata")):
        return found
    return await client.list(kube.LLMTELEMETRIES, namespace, fields={"metadata.name": name}, consistent=True)


#: What the message of a configMapRef whose key holds no prices says (the condition's reason is then
#: ``PricingConfigMapInvalid``).
_UNREADABLE_PRICES = "is no pricing table the middleware reads"


async def _missing_pricing(client: KubeClient, namespace: str, spec: TelemetrySpec) -> str | None:
    """Why ``spec.pricing.configMapRef`` cannot be mounted (the ConfigMap or its key missing) or read (its content
    no pricing table the middleware takes: every pod would fail its startup, or pass requests through unmeasured),
    or None."""
    name, key = spec.pricing.config_map, spec.pricing.config_map_key
    try:
        found = await client.get(kube.CONFIGMAPS, namespace, str(name))
    except NotFoundError:
        return (
            f"ConfigMap {name} (spec.pricing.configMapRef) does not exist in {namespace}: the pods would mount it, "
            "and could not start"
        )
    data, binary = found.get("data") or {}, found.get("binaryData") or {}
    if key not in data and key not in binary:
        return (
            f"ConfigMap {name} (spec.pricing.configMapRef) has no key {key!r}: the pods would mount it, and could not "
            "start"
        )
    try:
        text = data[key] if key in data else base64.b64decode(binary[key]).decode("utf-8")
        document = parse_pricing_text(text, key)
        if not isinstance(document, Mapping):
            # (Never a path to open: a string from a ConfigMap would have the operator read its own files.)
            raise ConfigurationError("not a mapping")
        PricingTable(document)
    except (ValueError, ConfigurationError, RecursionError) as exc:  # (UnicodeDecodeError, binascii.Error: ValueErrors)
        return (
            f"ConfigMap {name} (spec.pricing.configMapRef) key {key!r} {_UNREADABLE_PRICES}"
            f" ({_unreadable(exc, key, key not in data)}):"
            " the pods would fail their startup, or serve unmeasured"
        )
    return None


def _unreadable(error: Exception, key: str, binary: bool) -> str:
    """What is wrong with a pricing key, without a word of its content: whoever may read the resource's status may
    not be allowed to read the ConfigMap (the pods' startup error, in the app's log, says more)."""
    cause = error.__cause__ or error
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "binaryData that is not UTF-8 text"
    mark = getattr(cause, "problem_mark", None)
    if mark is not None:
        return f"not YAML: line {mark.line + 1}, column {mark.column + 1}"
    if hasattr(cause, "lineno") and hasattr(cause, "colno"):
        return f"not JSON: line {cause.lineno}, column {cause.colno}"
    if binary and isinstance(cause, ValueError) and not isinstance(cause, ConfigurationError):
        return "binaryData that is not base64"
    kind = "JSON" if key.endswith(".json") else "YAML"
    return (
        f"not a {kind} mapping of model names to prices in USD per million tokens: input and output, and optionally "
        "cache_read, cache_creation, cache_creation_1h, input_audio, input_image, output_audio, output_image and "
        "cache_read_image, each a number from 0 to 1000000 (a dollar a token)"
    )


async def _sync_children(
    client: KubeClient,
    resource: Resource,
    owner: Mapping[str, Any],
    desired: list[dict[str, Any]],
    component: str | None,
    outcome: Outcome,
    adoptable: Callable[[Mapping[str, Any]], bool] = lambda _obj: False,
    fresh: bool = False,
    failed: dict[str, str] | None = None,
    keep: Container[str] = frozenset(),
) -> str | None:
    """Create, repair and prune one kind of child; returns an error message, ``_CRD_MISSING``, or None.
    Children named in ``keep`` are not pruned.
    Only an object this LLMTelemetry controls (its uid in the controller owner reference) is written; a same-named
    one that ``adoptable`` accepts (a child of a peer it takes over from) is taken over; anyone else's, whatever its
    labels, is an error and left as it is (see :func:`_ours`).
    ``fresh``: the owner cannot have children yet, so none are listed (nothing to prune); each is created, and
    one found to exist all the same (409) is read and repaired. ``failed`` gets each desired child's error by name.
    Only what this LLMTelemetry controls (its uid in the controller owner reference) is pruned: a copy someone
    made of a child, labels and all, is theirs."""
    meta = owner["metadata"]
    namespace = meta["namespace"]
    missing = _CRD_MISSING if resource.group == "monitoring.coreos.com" else f"{resource.plural} not found"
    try:
        existing = [] if fresh else await client.list(resource, namespace, labels=r.owner_selector(meta["name"]))
    except NotFoundError:
        return missing
    except ApiError as exc:
        return f"listing {resource.plural}: {exc}"
    by_name = {obj["metadata"]["name"]: obj for obj in existing}
    wanted = {obj["metadata"]["name"] for obj in desired}
    errors = []
    for obj in desired:
        try:
            version = await _apply(client, resource, namespace, obj, by_name.get(obj["metadata"]["name"]), adoptable)
            _remember(outcome, resource, obj["metadata"]["name"], by_name.get(obj["metadata"]["name"]), version)
        except NotFoundError as exc:
            if fresh and missing == _CRD_MISSING:  # a create answered 404: the kind is not served (no CRD)
                return missing
            errors.append(clipped(f"{obj['kind']} {obj['metadata']['name']}: {exc}", _ERROR_CHARS))
        except ApiError as exc:
            errors.append(clipped(f"{obj['kind']} {obj['metadata']['name']}: {exc}", _ERROR_CHARS))
        if failed is not None and len(errors) > len(failed):
            failed[obj["metadata"]["name"]] = errors[-1]
    for obj_name, obj in by_name.items():
        labels = obj["metadata"].get("labels") or {}
        if obj_name in wanted or obj_name in keep:
            continue
        if component is not None and labels.get(c.LABEL_COMPONENT) != component:
            continue
        if resource == kube.CONFIGMAPS and labels.get(c.LABEL_COMPONENT) not in ("pricing", "dashboard"):
            continue
        if _controller_uid(obj) != meta.get("uid"):
            continue
        try:
            # Only the version listed: one changed since (say relabelled by the LLMTelemetry that took its
            # workload over) is for the next pass to judge.
            await client.delete(resource, namespace, obj_name, resource_version=_version(obj))
            logger.info("deleted %s %s/%s (no longer wanted)", resource.plural, namespace, obj_name)
        except ConflictError:
            continue
        except ApiError as exc:
            errors.append(clipped(f"deleting {obj_name}: {exc}", _ERROR_CHARS))
    return bounded(Listed(errors, "; ")) or None


async def _apply(
    client: KubeClient,
    resource: Resource,
    namespace: str,
    desired: dict[str, Any],
    current: dict[str, Any] | None,
    adoptable: Callable[[Mapping[str, Any]], bool] = lambda _obj: False,
) -> str | None:
    """Create or repair one child; returns its resourceVersion once it is as desired (None if not known).
    ``current`` (as listed by the owner label, or read after a create met it) is written only if it is ours (see
    :func:`_ours`); else the child fails with a :class:`ConflictError` saying so, and nothing is written."""
    name = desired["metadata"]["name"]
    for attempt in range(CONFLICT_ATTEMPTS):
        if current is None:
            try:
                created = await client.create(resource, namespace, desired, metadata_only=True)
                logger.info("created %s %s/%s", desired["kind"], namespace, name)
                return _version(created)
            except ConflictError:
                current = await client.get(resource, namespace, name)
                if not _ours(current, desired, adoptable):
                    raise ConflictError(409, "AlreadyExists", _foreign_message(current)) from None
        elif attempt == 0 and not _ours(current, desired, adoptable):
            # As listed by the owner label, which anyone may put on an object of theirs.
            raise ConflictError(409, "AlreadyExists", _foreign_message(current))
        patch = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
        stale = _stale_keys(current, desired)
        stale_metadata = _stale_metadata(current, desired)
        stale_selector = _stale_selector(current, desired)
        if not stale and not stale_metadata and not stale_selector and r.contains(current, patch):
            return _version(current)
        # A merge patch keeps the keys it does not name; null removes them.
        if stale:
            patch["data"] = {**patch["data"], **dict.fromkeys(stale)}
        if stale_selector:
            patch["spec"] = {
                **patch["spec"],
                "selector": {**patch["spec"]["selector"], **dict.fromkeys(stale_selector)},
            }
        for part, keys in stale_metadata.items():
            patch["metadata"] = {
                **patch["metadata"],
                part: {**patch["metadata"].get(part, {}), **dict.fromkeys(keys)},
            }
        if _immutable_differs(current, desired):
            # Only this version of it: one changed meanwhile is for the next pass to judge.
            await client.delete(resource, namespace, name, resource_version=_version(current))
            logger.info("replacing %s %s/%s (an immutable field differs)", desired["kind"], namespace, name)
            current = None
            continue
        resource_version = current.get("metadata", {}).get("resourceVersion")
        if resource_version:
            patch = {**patch, "metadata": {**patch["metadata"], "resourceVersion": resource_version}}
        try:
            patched = await client.patch(resource, namespace, name, patch, metadata_only=True)
            logger.info("repaired %s %s/%s", desired["kind"], namespace, name)
            return _version(patched)
        except NotFoundError:
            current = None  # deleted in between: create it again
        except ConflictError:
            if attempt == CONFLICT_ATTEMPTS - 1:
                raise
            current = await client.get(resource, namespace, name)
            if not _ours(current, desired, adoptable):
                # Changed meanwhile by another LLMTelemetry that took it over (this pass began before that one was
                # known): not written back; the retry, knowing it, decides who serves the workload.
                owner_label = (current.get("metadata", {}).get("labels") or {}).get(c.LABEL_OWNER)
                raise ConflictError(409, "Conflict", f"taken over by LLMTelemetry {owner_label} meanwhile") from None
    return None


def _ours(
    current: Mapping[str, Any], desired: Mapping[str, Any], adoptable: Callable[[Mapping[str, Any]], bool]
) -> bool:
    """Whether ``current`` is this LLMTelemetry's to write as ``desired``: controlled by it (its uid in the
    controller owner reference, whatever the labels say: a child whose labels someone edited is still repaired), or
    a child of a peer it takes over (``adoptable``: controlled by that peer). The owner label alone proves nothing:
    a copy of a child (a GitOps manifest of it), or a child orphaned by ``kubectl delete --cascade=orphan``, carries
    it with no owner reference, and is someone else's to keep: never written, nor deleted."""
    controller = _controller_uid(current)
    if controller is not None and controller == _controller_uid(desired):
        return True
    return adoptable(current)


def _foreign_message(current: Mapping[str, Any]) -> str:
    """What a child's condition says of an object of its name that is not this LLMTelemetry's (see :func:`_ours`)."""
    labels = (current.get("metadata") or {}).get("labels") or {}
    if labels.get(c.LABEL_OWNER) is None:
        return "exists and is not this LLMTelemetry's (not labelled or owned by it): rename or delete it"
    return (
        f"exists and is not this LLMTelemetry's: it is labelled {c.LABEL_OWNER}={labels[c.LABEL_OWNER]} but has"
        " no controller owner reference to this resource (a copy of a child, or one left by an LLMTelemetry of this"
        " name deleted with --cascade=orphan), so it is left as it is: delete it (or rename it) and the next pass"
        " makes this resource's own"
    )


def _stale_keys(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[str]:
    """Keys of one of our ConfigMaps that it should not hold: its data is ours alone. Grafana's sidecar makes a
    file of every key, so a dashboard left under an old key (an earlier version's) would stay in Grafana."""
    if desired.get("kind") != "ConfigMap":
        return []
    return sorted(set(current.get("data") or {}) - set(desired.get("data") or {}))


def _stale_selector(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[str]:
    """Keys of a metrics Service's selector it should not have: a selector is all ours, and one key too many (a pod
    template label the workload's selector no longer names) would select none of its pods."""
    if desired.get("kind") != "Service":
        return []
    have = (current.get("spec") or {}).get("selector") or {}
    want = (desired.get("spec") or {}).get("selector") or {}
    return sorted(set(have) - set(want)) if isinstance(have, Mapping) else []


def _stale_metadata(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, list[str]]:
    """Labels a child carries from settings that no longer name them (the annotation lists the ones it was given),
    and that annotation itself once it lists none."""
    current_meta = current.get("metadata") or {}
    desired_meta = desired.get("metadata") or {}
    given = ((current_meta.get("annotations") or {}).get(c.ANNOTATION_LABELS) or "").split(",")
    have = current_meta.get("labels") or {}
    want = desired_meta.get("labels") or {}
    stale: dict[str, list[str]] = {}
    labels = sorted(key for key in given if key and key in have and key not in want)
    if labels:
        stale["labels"] = labels
    if c.ANNOTATION_LABELS in (current_meta.get("annotations") or {}) and c.ANNOTATION_LABELS not in (
        desired_meta.get("annotations") or {}
    ):
        stale["annotations"] = [c.ANNOTATION_LABELS]
    return stale


def _immutable_differs(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """A Service's ``clusterIP`` (headless or not) cannot be patched; the Service has to be made anew."""
    if desired.get("kind") != "Service":
        return False
    want = (desired.get("spec") or {}).get("clusterIP")
    have = (current.get("spec") or {}).get("clusterIP")
    return want is not None and have is not None and (want == "None") != (have == "None")


def _remember(
    outcome: Outcome, resource: Resource, name: str, read: Mapping[str, Any] | None, written: str | None
) -> None:
    """Note the version a pass read of an object and the version it left, once that is as desired."""
    if written is None:
        return
    for version in (_version(read), written):
        if version:
            outcome.seen.add((resource.plural, name, version))


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid in an object's controller owner reference, if it has one."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def _version(obj: Mapping[str, Any] | None) -> str | None:
    version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


def _monitoring_condition(
    type_: str, kind: str, error: str | None, outcome: Outcome, *, ready: str, missing_prefix: str = ""
) -> r.Condition:
    """The condition for a Prometheus Operator child (``kind``): ready, failed, or its CRD not installed yet
    (then the pass is retried later, so installing the Prometheus Operator afterwards is picked up)."""
    if error == _CRD_MISSING:
        outcome.retry = True
        message = f"{missing_prefix}monitoring.coreos.com/v1 {kind} is not installed; retrying later"
        return r.Condition(type_, False, f"{kind}CRDMissing", message)
    if error:
        return r.Condition(type_, False, f"{kind}Failed", error)
    return r.Condition(type_, True, f"{kind}Ready", ready)


async def write_failure(
    client: KubeClient, owner: Mapping[str, Any], reason: str, message: str
) -> dict[str, Any] | None:
    """Say in the status that a pass failed before it could write its own (an API error after the client's
    retries, say a write refused with 403): ``Ready`` False with the failure, phase ``Degraded``, the other
    conditions and the targets as last written. ``observedGeneration``, which kopf reads as "this spec was
    applied" (see diffbase.py), is left as it was. Returns the status now stored, or None when it already said
    so or could not be written (the failure is in the operator's log either way)."""
    meta = owner["metadata"]
    previous = owner.get("status") or {}
    failed = r.Condition(c.CONDITION_READY, False, reason, message)
    built = r.build_status(
        [failed],
        generation=meta.get("generation"),
        targets=previous.get("targets") or [],
        previous=previous,
        now=_now(),
        phase="Degraded",
    )
    others = [cond for cond in previous.get("conditions") or [] if cond.get("type") != c.CONDITION_READY]
    patch = {"phase": built["phase"], "conditions": built["conditions"] + others}
    if r.contains(previous, patch):
        return None
    try:
        await _patch_status(client, meta, patch)
    except Exception as exc:  # an outage refuses this too; the next failed pass tries again
        logger.debug(
            "LLMTelemetry %s/%s: the failure could not be written to its status: %s",
            meta["namespace"],
            meta["name"],
            exc,
        )
        return None
    return {**previous, **patch}


async def _patch_status(client: KubeClient, meta: Mapping[str, Any], status: Mapping[str, Any]) -> None:
    """Merge ``status`` into the resource's status subresource."""
    await client.patch(
        kube.LLMTELEMETRIES,
        meta["namespace"],
        meta["name"],
        {"status": status},
        subresource="status",
        metadata_only=True,
    )


async def _write_status(
    client: KubeClient,
    config: OperatorConfig,
    owner: Mapping[str, Any],
    conditions: list[r.Condition],
    targets: list[str],
    phase: str,
    outcome: Outcome,
) -> None:
    meta = owner["metadata"]
    previous = owner.get("status") or {}
    status = r.build_status(
        conditions, generation=meta.get("generation"), targets=targets, previous=previous, now=_now(), phase=phase
    )
    # Which operator serves the resource, by its peering object: another one watching the namespace too leaves it
    # alone while that operator runs (see handlers._claim). Not said with peering off: no other can tell it runs.
    if not config.standalone:
        status["operator"] = config.peering
    outcome.status = status
    if r.contains(previous, status):
        return
    try:
        await _patch_status(client, meta, status)
    except NotFoundError:
        logger.info("LLMTelemetry %s/%s is gone; status not written", meta["namespace"], meta["name"])
