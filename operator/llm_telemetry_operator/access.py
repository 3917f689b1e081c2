"""Which of its declared permissions the operator lacks, as the API server says.

An admin who trims the chart's ClusterRole, or a chart older than the operator, leaves the operator refused (403)
on some calls. kopf retries a refused call for as long as the operator runs, one line every 30 s (ERROR, but for a
permission already named, see refusals.py), and when the call refused is its finalizer patch of a new LLMTelemetry,
no handler runs for that resource: no status, no event, a resource silently idle. So the operator asks, with one
SelfSubjectAccessReview per permission of
:data:`rbac.PERMISSIONS` in each scope it uses it in, which ones it lacks, and says so: one ERROR naming each
missing permission and what breaks without it (see ``handlers._check_access``), and, while it may not patch the
LLMTelemetry resources, ``Ready`` False with reason ``Forbidden`` and a Warning event on each one it sees (as far as
it may write those).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from llm_telemetry_operator import rbac
from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.kube import KubeClient

#: The group of the review itself: never asked about (answered at all, it is granted).
_REVIEWS = ("authorization.k8s.io", "selfsubjectaccessreviews")

#: Reviews of one check under way at once (each holds one of the client's worker threads while it waits): half the
#: client's 32 threads. Each round costs a round trip (the whole check, ceil(45 / this) of them; 11 + 34 per watched
#: namespace in namespaced mode), or, with a slow authorization webhook, the webhook's delay; reviews left
#: unanswered fail the check at their read timeout, with no further round (see missing).
REVIEWS_AT_ONCE = 16

#: The reason of the condition and the event of a resource the operator may not patch.
REASON: str = "Forbidden"


@dataclass(frozen=True)
class Grant:
    """One verb on one resource in one scope, as a SelfSubjectAccessReview asks about it.

    Args:
        api_group: ``""`` for the core group.
        resource: the plural name, with ``/status`` or ``/finalizers`` for a subresource.
        verb: the Kubernetes verb.
        namespace: the namespace, or None for every namespace (a ClusterRole's grant) or a cluster-scoped object.
        name: the one object the permission is limited to, if any.
    """

    api_group: str
    resource: str
    verb: str
    namespace: str | None = None
    name: str | None = None

    def describe(self) -> str:
        """The permission as a user grants it: ``patch llmtelemetries.llmtelemetry.dev (cluster-wide)``."""
        group = f".{self.api_group}" if self.api_group else ""
        named = f" named {self.name}" if self.name else ""
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {self.resource}{group}{named} ({where})"

    def attributes(self) -> dict[str, str]:
        """The review's ``resourceAttributes``."""
        plural, _, subresource = self.resource.partition("/")
        attributes = {"group": self.api_group, "resource": plural, "verb": self.verb}
        if subresource:
            attributes["subresource"] = subresource
        if self.namespace:
            attributes["namespace"] = self.namespace
        if self.name:
            attributes["name"] = self.name
        return attributes


#: What stops working without a permission, by (api_group, resource); the verb is named with the permission.
_IMPACT: dict[tuple[str, str], str] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): "kopf cannot tell whether the LLMTelemetry CRD is installed",
    ("", "namespaces"): "kopf cannot follow the watched namespaces",
    ("kopf.dev", "clusterkopfpeerings"): "peering: replicas cannot agree which one is active (kopf retries for good)",
    ("", "events"): "no Kubernetes event is posted (kopf tries each one 9 times)",
    ("llmtelemetry.dev", "llmtelemetries"): "no LLMTelemetry resource is seen",
    ("llmtelemetry.dev", "llmtelemetries/status"): "no status is written: `kubectl get llmt` shows nothing",
    ("llmtelemetry.dev", "llmtelemetries/finalizers"): (
        "children are refused where the OwnerReferencesPermissionEnforcement admission is on (OpenShift)"
    ),
    ("apps", "deployments"): "Deployments cannot be injected with the middleware's environment",
    ("apps", "statefulsets"): "StatefulSets cannot be injected with the middleware's environment",
    ("", "services"): "the metrics Services cannot be kept",
    ("", "configmaps"): "the dashboard and pricing ConfigMaps cannot be kept",
    ("monitoring.coreos.com", "servicemonitors"): "the ServiceMonitors cannot be kept",
    ("monitoring.coreos.com", "prometheusrules"): "the PrometheusRules cannot be kept",
}


#: The same, where one verb breaks something else than the resource's other verbs.
_VERB_IMPACT: dict[tuple[str, str, str], str] = {
    ("kopf.dev", "clusterkopfpeerings", "patch"): (
        "this replica cannot keep its entry in its peering object (kopf logs an ERROR every 30 s)"
    ),
    ("llmtelemetry.dev", "llmtelemetries", "patch"): (
        "kopf cannot add its finalizer to a new LLMTelemetry, so no pass runs for it: each such resource is marked "
        "Ready=False, reason Forbidden, with a Warning event, as far as the status and events may be written; nor "
        "take it off a deleted one, whose deletion then waits (a Forbidden event says how to get out)"
    ),
}


def impact(grant: Grant) -> str:
    """What breaks without ``grant``."""
    specific = _VERB_IMPACT.get((grant.api_group, grant.resource, grant.verb))
    return specific or _IMPACT.get((grant.api_group, grant.resource), "the operator's calls of it are refused")


def needed(
    config: OperatorConfig, *, namespaced: bool = True, namespaces: Collection[str] | None = None
) -> list[Grant]:
    """Every permission of :data:`rbac.PERMISSIONS` in each scope this operator uses it in: cluster-wide, or in
    each watched namespace for what namespaced mode grants by a Role there (left out with ``namespaced`` False: 34
    reviews a namespace; only in ``namespaces`` of the watched ones, if given); the peering patch on this operator's
    own peering object only, and not at all when it runs without peering."""
    grants: list[Grant] = []
    for permission in rbac.PERMISSIONS:
        name = None
        if permission.names == "peering":
            if config.standalone:
                continue
            name = config.peering
        scopes: Sequence[str | None] = (
            (None,) if permission.cluster_wide or not config.namespaces else config.namespaces
        )
        if scopes != (None,):
            if not namespaced:
                continue
            if namespaces is not None:
                scopes = [scope for scope in scopes if scope in namespaces]
        for resource in permission.resources:
            if (permission.api_group, resource) == _REVIEWS:
                continue
            for verb in permission.verbs:
                grants.extend(Grant(permission.api_group, resource, verb, scope, name) for scope in scopes)
    return grants


async def missing(
    client: KubeClient,
    config: OperatorConfig,
    *,
    namespaced: bool = True,
    namespaces: Collection[str] | None = None,
    answered: Callable[[], None] | None = None,
) -> list[Grant]:
    """The permissions of :func:`needed` the API server refuses this operator, in the order declared. Raises the
    client's :class:`~llm_telemetry_operator.errors.ApiError` when a review itself fails (refused, or no answer).
    ``answered``, if given, is called as each review is answered (so a caller can tell a long check that goes on
    from one that gets no answer)."""
    grants = needed(config, namespaced=namespaced, namespaces=namespaces)
    # A few at a time: the client's threads are shared with every pass, and reviews the API server leaves
    # unanswered (a hung authorization webhook) would hold them all until their read timeout.
    at_once = asyncio.Semaphore(REVIEWS_AT_ONCE)
    failed: list[BaseException] = []

    async def review(grant: Grant) -> bool | None:
        async with at_once:
            if failed:
                # The check fails with the first failure: the reviews not yet asked are not asked at all. Each
                # round of reviews left unanswered costs a read timeout (a minute): asking them all, a few at a
                # time, would hold the check (and every check after it) for that many minutes.
                return None
            try:
                ok = await client.review(grant.attributes())
            except BaseException as exc:
                failed.append(exc)
                raise
        if answered is not None:
            answered()
        return ok

    # Every review started is awaited, failed or not: none is left running (or its error unread) once one has failed.
    # The check fails with the first failure in time, the one that stopped it: the reviews under way beside it may
    # fail later, each with an error of its own (a read timeout behind a webhook that erred at once on another).
    answers = await asyncio.gather(*(review(grant) for grant in grants), return_exceptions=True)
    if failed:
        raise failed[0]
    for answer in answers:
        if isinstance(answer, BaseException):  # raised by ``answered``
            raise answer
    return [grant for grant, ok in zip(grants, answers, strict=True) if ok is False]


def may(lacking: Iterable[Grant], api_group: str, resource: str, verb: str, namespace: str | None) -> bool:
    """Whether ``verb`` on ``resource`` in ``namespace`` is not among ``lacking`` (a cluster-wide refusal counts
    in every namespace)."""
    return not any(
        (g.api_group, g.resource, g.verb) == (api_group, resource, verb) and g.namespace in (None, namespace)
        for g in lacking
    )


def error_message(lacking: Sequence[Grant]) -> str:
    """The one log line for ``lacking``: each permission, and what breaks without it."""
    items = "; ".join(f"{grant.describe()}: {impact(grant)}" for grant in lacking)
    return (
        f"the API server refuses this operator {len(lacking)} permission(s) it needs (the Helm chart's ClusterRole/"
        f"Role grant them; an upgrade of the release puts them back): {items}"
    )


def forbidden_message(grant: Grant) -> str:
    """The condition's and the event's message for a resource the operator may not patch."""
    return (
        f"the operator may not {grant.verb} {grant.resource}.{grant.api_group}, so it cannot add its finalizer and "
        "no pass runs for this resource: grant the permission (the Helm chart's ClusterRole has it)"
    )


def finalizer_message(namespace: str, name: str) -> str:
    """The log line's and the event's message for a deleted resource whose finalizer the operator may not take off:
    its clean-up is done, and what to do."""
    return (
        "cleaned up, but the operator may not patch llmtelemetries.llmtelemetry.dev, so it cannot take its finalizer "
        "off and the deletion waits (kopf retries every 30 s): grant the permission (the Helm chart's ClusterRole has "
        "it), or, as the clean-up is done, remove the finalizer by hand: "
        f'kubectl -n {namespace} patch llmt {name} --type=merge -p \'{{"metadata":{{"finalizers":null}}}}\''
    )
