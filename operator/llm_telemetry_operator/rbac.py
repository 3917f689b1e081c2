"""Every Kubernetes API permission the operator uses, declared once.

The Helm chart renders its ClusterRole/Role from :data:`PERMISSIONS`, and the operator's own API client
(:mod:`llm_telemetry_operator.kube`) refuses any call that is not declared here, so the two cannot drift.
``framework`` entries are what kopf itself needs (watching CRDs and namespaces, peering, posting events);
``application`` entries are what our handlers read and write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Permission:
    """One RBAC rule: verbs on resources of one API group.

    Args:
        api_group: ``""`` for the core group.
        resources: plural resource names, with ``/status`` for subresources.
        verbs: Kubernetes verbs (``get``, ``list``, ``watch``, ``create``, ``patch``, ``delete``).
        kind: ``framework`` for what kopf needs, ``application`` for what our handlers touch.
        cluster_wide: granted by the chart's ClusterRole in namespaced mode too, rather than by a Role in each
            watched namespace: cluster-scoped objects, which only a ClusterRole can grant, and the LLMTelemetry
            resources themselves. Deleting a watched namespace deletes its Role along with everything else, often
            before the operator has taken its finalizer off the LLMTelemetry resources there; without a grant that
            outlives the Role, their finalizers (and with them the namespace) would stay until removed by hand.
        names: the objects the rule is limited to (the ClusterRole's ``resourceNames``), or None for every object.
            ``"peering"`` is this operator's own ClusterKopfPeering, whose name only the release knows (the chart's
            ``peering.name``, the operator's ``config.peering``). Only verbs on one named object can be limited
            this way: RBAC cannot limit a list or a watch by name.
    """

    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    kind: Literal["framework", "application"]
    cluster_wide: bool = False
    names: Literal["peering"] | None = None


PERMISSIONS: tuple[Permission, ...] = (
    # Framework: kopf notices CRDs and namespaces appearing and disappearing.
    Permission("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch"), "framework", True),
    Permission("", ("namespaces",), ("list", "watch"), "framework", True),
    # Framework: peering, so that standby replicas stay idle while one replica is active. One ClusterKopfPeering in
    # either mode: a KopfPeering in each watched namespace would go with the namespace, and kopf stops the whole
    # operator when it cannot keep its entry in one. Written only in this operator's own: a patch of another release's
    # (a fake peer of top priority in it) would keep that release's operator standing by for good. Read in every one:
    # kopf lists and watches them all (and picks its own by name), the operator reads another's to tell whether it is
    # alive (see handlers.py), and RBAC cannot limit a list or a watch by name anyway.
    Permission("kopf.dev", ("clusterkopfpeerings",), ("list", "watch"), "framework", True),
    Permission("kopf.dev", ("clusterkopfpeerings",), ("patch",), "framework", True, names="peering"),
    # Framework: kopf posts events about handler progress and failures (ours go the same way).
    Permission("", ("events",), ("create",), "framework"),
    # Framework: the operator asks the API server which of these permissions it lacks (see access.py), so that a
    # trimmed ClusterRole is named in the log and the resources' status instead of leaving them silently idle. Any
    # authenticated user may create one by default (the system:basic-user ClusterRole); declared so the chart grants
    # it where that default binding was taken away.
    Permission("authorization.k8s.io", ("selfsubjectaccessreviews",), ("create",), "framework", True),
    # Application: the LLMTelemetry resources themselves (finalizers, progress annotations, status).
    Permission("llmtelemetry.dev", ("llmtelemetries",), ("list", "watch", "patch"), "application", True),
    Permission("llmtelemetry.dev", ("llmtelemetries/status",), ("patch",), "application", True),
    # Application: never called, but checked by the API server's OwnerReferencesPermissionEnforcement admission (on
    # in OpenShift and some hardened clusters): a child whose owner reference has blockOwnerDeletion is refused
    # unless its creator may update the owner's finalizers.
    Permission("llmtelemetry.dev", ("llmtelemetries/finalizers",), ("update",), "application"),
    # Application: the workloads whose pod templates get the middleware's environment.
    Permission("apps", ("deployments", "statefulsets"), ("get", "list", "watch", "patch"), "application"),
    # Application: children owned by an LLMTelemetry (metrics Service, dashboard and pricing ConfigMaps).
    Permission("", ("services", "configmaps"), ("get", "list", "watch", "create", "patch", "delete"), "application"),
    # Application: Prometheus Operator objects; a 404 here means its CRDs are not installed.
    Permission(
        "monitoring.coreos.com",
        ("servicemonitors", "prometheusrules"),
        ("get", "list", "watch", "create", "patch", "delete"),
        "application",
    ),
)


def is_declared(
    api_group: str, resource: str, verb: str, name: str | None = None, *, peering: str | None = None
) -> bool:
    """Whether ``verb`` on ``resource`` of ``api_group`` is covered by :data:`PERMISSIONS`: for a permission limited
    to named objects (:attr:`Permission.names`), only a call on one of them (``name``), given the name of this
    operator's ClusterKopfPeering as ``peering``."""

    def covers(p: Permission) -> bool:
        if p.api_group != api_group or resource not in p.resources or verb not in p.verbs:
            return False
        return p.names is None or (name is not None and name == {"peering": peering}[p.names])

    return any(covers(p) for p in PERMISSIONS)


#: Permissions the API server checks for the operator's writes (see above) but no call of the operator's uses.
ADMISSION_ONLY = frozenset({("llmtelemetry.dev", "llmtelemetries/finalizers", "update")})


def declared_triples() -> frozenset[tuple[str, str, str]]:
    """All ``(api_group, resource, verb)`` triples in :data:`PERMISSIONS`."""
    return frozenset((p.api_group, r, v) for p in PERMISSIONS for r in p.resources for v in p.verbs)
