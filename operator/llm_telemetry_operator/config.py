"""Operator settings from ``LLM_TELEMETRY_OPERATOR_*`` environment variables (the Helm chart sets them)."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from llm_telemetry.monitoring.rules import DEFAULT_RUNBOOK_URL  # a path in this repository: no link in a notification
from llm_telemetry_operator.errors import ConfigurationError
from llm_telemetry_operator.labels import is_label_key, is_label_value
from llm_telemetry_operator.spec import loki_tenant_problem, otlp_base

#: Comma-separated namespaces to watch; empty means every namespace (cluster-wide).
LLM_TELEMETRY_OPERATOR_NAMESPACES: Final = "LLM_TELEMETRY_OPERATOR_NAMESPACES"
#: OTLP endpoint for traces when a resource does not set ``spec.tracing.endpoint``.
LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT: Final = "LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT"
#: Loki's OTLP base URL for logs when a resource does not set ``spec.logs.endpoint``.
LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT: Final = "LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT"
#: Loki tenant (``X-Scope-OrgID``) for logs when a resource does not set ``spec.logs.tenant``; empty: none.
LLM_TELEMETRY_OPERATOR_LOGS_TENANT: Final = "LLM_TELEMETRY_OPERATOR_LOGS_TENANT"
#: ``k=v,k=v`` labels added to every ServiceMonitor and PrometheusRule (kube-prometheus-stack selects on ``release``).
LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS: Final = "LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS"
#: ``k=v`` label that Grafana's dashboard sidecar looks for.
LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL: Final = "LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL"
#: uid of the Grafana Jaeger datasource the dashboards' trace links open.
LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID: Final = "LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID"
#: uid of the Grafana Loki datasource of the dashboards' error log panel.
LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID: Final = "LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID"
#: Base of the alerts' ``runbook_url`` annotation (``<base>#<alert name in lower case>``).
LLM_TELEMETRY_OPERATOR_RUNBOOK_URL: Final = "LLM_TELEMETRY_OPERATOR_RUNBOOK_URL"
#: Name of the ClusterKopfPeering object (in namespaced mode too).
LLM_TELEMETRY_OPERATOR_PEERING: Final = "LLM_TELEMETRY_OPERATOR_PEERING"
#: kopf peering priority: an integer, or ``auto`` for a random one per pod (one replica active, the rest standby).
LLM_TELEMETRY_OPERATOR_PRIORITY: Final = "LLM_TELEMETRY_OPERATOR_PRIORITY"
#: Seconds the other replicas count a replica alive after its last peering keepalive (kopf's peering lifetime):
#: how long a replica that stopped without a word (killed, frozen, its node lost) keeps a standby from taking over.
LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS: Final = "LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS"
#: Port of the operator's own Prometheus metrics; 0 turns them off.
LLM_TELEMETRY_OPERATOR_METRICS_PORT: Final = "LLM_TELEMETRY_OPERATOR_METRICS_PORT"
#: kopf liveness endpoint URL; empty turns it off.
LLM_TELEMETRY_OPERATOR_HEALTH: Final = "LLM_TELEMETRY_OPERATOR_HEALTH"
#: Seconds between full re-reconciles of every resource, which also retries degraded ones.
LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS: Final = "LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS"
#: ``true`` runs without peering (no ClusterKopfPeering needed; run a single replica only).
LLM_TELEMETRY_OPERATOR_STANDALONE: Final = "LLM_TELEMETRY_OPERATOR_STANDALONE"

#: Jaeger v2 as its Helm chart installs it (``helm install jaeger jaegertracing/jaeger -n observability``): one
#: Service, named after the release, with OTLP on 4317 and 4318 and the UI on 16686. (Jaeger v1's chart named its
#: collector Service ``jaeger-collector``; the OpenTelemetry Operator names one ``<collector>-collector``.)
DEFAULT_TRACES_ENDPOINT: Final = "http://jaeger.observability:4318"
#: OTLP's ports by convention: HTTP on 4318, gRPC on 4317 (Jaeger, Tempo and the OpenTelemetry Collector serve them).
OTLP_HTTP_PORT: Final = 4318
OTLP_GRPC_PORT: Final = 4317
DEFAULT_LOGS_ENDPOINT: Final = "http://loki-gateway.observability/otlp"


def grpc_default(endpoint: str) -> str:
    """A default traces endpoint as ``protocol: grpc`` takes it: on OTLP's gRPC port if it names OTLP's HTTP port (gRPC
    sent to the HTTP port is refused, every trace lost, while the collector's Service, serving both, looks found)."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # (refused at start as the default)
        return endpoint
    if port != OTLP_HTTP_PORT:
        return endpoint
    return parts._replace(netloc=f"{parts.netloc.rpartition(':')[0]}:{OTLP_GRPC_PORT}").geturl()


DEFAULT_DASHBOARD_LABEL: Final = "grafana_dashboard=1"
DEFAULT_JAEGER_DATASOURCE_UID: Final = "jaeger"
DEFAULT_LOKI_DATASOURCE_UID: Final = "loki"
DEFAULT_PEERING: Final = "llm-telemetry-operator"
DEFAULT_PRIORITY: Final = "auto"
#: Range "auto" draws from. kopf pauses every operator whose priority equals another's, so the range is wide
#: enough that two replicas practically never draw the same number.
AUTO_PRIORITY_RANGE: Final = (1, 2**31 - 1)
#: kopf's own default. kopf renews a replica's entry 5 to 10 s before it runs out, so a lifetime needs room for that.
DEFAULT_PEERING_LIFETIME_SECONDS: Final = 60
PEERING_LIFETIME_RANGE: Final = (15, 3600)
DEFAULT_METRICS_PORT: Final = 9465
DEFAULT_HEALTH: Final = "http://0.0.0.0:8080/healthz"
DEFAULT_RESYNC_SECONDS: Final = 300.0
#: The most objects waited for (collector Services and pricing ConfigMaps, together) watched by name at once, each
#: a thread and a connection of the operator's and a watch on the API server (see ``handlers._watch_awaited``):
#: a handful is what a cluster has; hundreds are typos or abuse, whose resources get their retries and resyncs.
MAX_AWAITED_WATCHES: Final = 100

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: What Grafana accepts as a uid.
_GRAFANA_UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


@dataclasses.dataclass(frozen=True)
class Timers:
    """The operator's internal timers, in seconds. Not settings: no environment variable, flag or chart value sets
    them, and :meth:`OperatorConfig.from_env` always takes the defaults, which are what runs. They are here so that
    tests, and programs that embed the operator, can set them (shorter waits where their length is not what a test
    proves) without changing the operator's module constants.

    Example::

        config = OperatorConfig(timers=Timers(takeover_grace_seconds=4.0))
    """

    #: Seconds another operator's peering object, read to tell whether it is alive, is taken as read (see
    #: ``handlers._held_elsewhere``): passes for the resources it serves come in bursts, one per event of its writes.
    holder_check_seconds: float = 10.0
    #: Seconds the operator serving a resource may have no live replica before another operator takes the resource
    #: over: a restart, or a rollout of a single replica (the chart's Recreate strategy), leaves none alive for a while
    #: (kopf takes a stopping replica's entry out; the operator says when it stopped, see ``handlers._mark_stopped``).
    takeover_grace_seconds: float = 300.0
    #: Seconds another operator, once seen with no live replica and no recent stop, must still be seen so before its
    #: resources are taken over: kopf takes a stopping replica's entry out before the operator's cleanup can say it
    #: stopped, and a read in between would take the resources of a mere restart.
    takeover_confirm_seconds: float = 15.0
    #: Seconds between two checks of the permissions started by refusals the last check did not explain (see
    #: ``handlers._recheck_access``): kopf retries each refused call, so refusals come in bursts. One met sooner after
    #: the last such check waits for its turn, up to this long.
    access_recheck_seconds: float = 60.0
    #: Seconds before a watch of workloads or children (see :mod:`llm_telemetry_operator.childwatch`) tries again a
    #: kind that is not served (404): the Prometheus Operator's CRDs not installed yet.
    missing_retry_seconds: float = 30.0

    def __post_init__(self) -> None:
        for timer in dataclasses.fields(self):
            seconds = getattr(self, timer.name)
            if not seconds > 0 or math.isinf(seconds):
                raise ValueError(f"Timers.{timer.name}={seconds!r}: must be a positive number of seconds")

    @property
    def release_recheck_seconds(self) -> float:
        """Seconds between two looks at a resource to let go at startup (its namespace being deleted) that another
        operator serves (see ``handlers._release_in_leaving_namespaces``): past the cache of that operator's peering
        object, and the confirmation that it is gone."""
        return self.holder_check_seconds + self.takeover_confirm_seconds


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Resolved operator settings; build with :meth:`OperatorConfig.from_env`.

    Args:
        namespaces: namespaces to watch; empty means cluster-wide.
        traces_endpoint: default OTLP endpoint for traces.
        logs_endpoint: default Loki OTLP base URL.
        logs_tenant: default Loki tenant ("": no ``X-Scope-OrgID`` header).
        servicemonitor_labels: labels put on every ServiceMonitor and PrometheusRule.
        dashboard_label: the (key, value) label Grafana's sidecar selects dashboards by.
        jaeger_datasource_uid: uid of the Grafana Jaeger datasource of the dashboards' trace links.
        loki_datasource_uid: uid of the Grafana Loki datasource of the dashboards' error log panel.
        runbook_url: base of the alerts' runbook links.
        peering: name of the kopf peering object.
        priority: kopf peering priority; the highest live one is active, lower ones stand by.
        peering_lifetime_seconds: seconds a replica counts as alive after its last peering keepalive.
        metrics_port: port of the operator's own metrics (0: off).
        health: liveness endpoint URL ("" : off).
        resync_seconds: interval of the periodic re-reconcile.
        kubeconfig: kubeconfig file (None: in-cluster, ``$KUBECONFIG`` or ``~/.kube/config``).
        context: kubeconfig context (None: the current one).
        standalone: run without peering.
        timers: the operator's internal timers (see :class:`Timers`): no setting, the defaults are what runs.
        awaited_watches: the most objects waited for watched at once (see :data:`MAX_AWAITED_WATCHES`): no setting
            either, :data:`MAX_AWAITED_WATCHES` is what runs (tests set fewer).

    Example::

        config = OperatorConfig.from_env({"LLM_TELEMETRY_OPERATOR_NAMESPACES": "llm,staging"})
    """

    #: Namespaces to watch; empty means cluster-wide.
    namespaces: tuple[str, ...] = ()
    #: Default OTLP endpoint for traces.
    traces_endpoint: str = DEFAULT_TRACES_ENDPOINT
    #: Default Loki OTLP base URL (the SDK gets ``<base>/v1/logs``).
    logs_endpoint: str = DEFAULT_LOGS_ENDPOINT
    #: Default Loki tenant, sent as ``X-Scope-OrgID`` (a multi-tenant Loki, as its Helm chart installs it, refuses
    #: pushes without one); empty sends none.
    logs_tenant: str = ""
    #: Labels put on every ServiceMonitor and PrometheusRule.
    servicemonitor_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Label Grafana's dashboard sidecar selects ConfigMaps by.
    dashboard_label: tuple[str, str] = ("grafana_dashboard", "1")
    #: uid of the Grafana Jaeger datasource the dashboards' trace links open.
    jaeger_datasource_uid: str = DEFAULT_JAEGER_DATASOURCE_UID
    #: uid of the Grafana Loki datasource of the dashboards' error log panel.
    loki_datasource_uid: str = DEFAULT_LOKI_DATASOURCE_UID
    #: Base of the alerts' ``runbook_url`` annotation.
    runbook_url: str = DEFAULT_RUNBOOK_URL
    #: Name of the ClusterKopfPeering.
    peering: str = DEFAULT_PEERING
    #: kopf peering priority. ``LLM_TELEMETRY_OPERATOR_PRIORITY=auto`` resolves to a random number per process, so
    #: that of several replicas exactly one (the highest) runs and the others stand by.
    priority: int = 0
    #: Seconds the other replicas count this one alive after its last peering keepalive (kopf's
    #: ``settings.peering.lifetime``): a standby takes over this long at most after an active replica went silent.
    peering_lifetime_seconds: int = DEFAULT_PEERING_LIFETIME_SECONDS
    #: Port of the operator's own Prometheus metrics; 0 turns them off.
    metrics_port: int = DEFAULT_METRICS_PORT
    #: kopf liveness endpoint; empty turns it off.
    health: str = DEFAULT_HEALTH
    #: Seconds between periodic re-reconciles (drift repair, retries of degraded resources).
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    #: Kubeconfig file to use; None: in-cluster credentials in a pod, else ``$KUBECONFIG`` or ``~/.kube/config``.
    kubeconfig: str | None = None
    #: Kubeconfig context to use; None: the file's current context.
    context: str | None = None
    #: Run without peering (no ClusterKopfPeering needed); only one replica may then run.
    standalone: bool = False
    #: The operator's internal timers; no environment variable sets them (see :class:`Timers`).
    timers: Timers = Timers()
    #: The most objects waited for watched at once; no environment variable sets it (see :data:`MAX_AWAITED_WATCHES`).
    awaited_watches: int = MAX_AWAITED_WATCHES

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read the ``LLM_TELEMETRY_OPERATOR_*`` variables; raise :class:`ConfigurationError` on bad values."""
        env = os.environ if env is None else env

        def get(name: str, default: str) -> str:
            value = env.get(name)
            return default if value is None else value.strip()

        # Each namespace once, in the order first given: a name listed twice ("a,b,a", or `-n a -n a`) had every
        # watch of the workloads and children started twice there (each event handled twice), its Role's grants
        # asked about twice at startup, and the resources there listed twice.
        listed = (ns.strip() for ns in get(LLM_TELEMETRY_OPERATOR_NAMESPACES, "").split(","))
        namespaces = tuple(dict.fromkeys(ns for ns in listed if ns))
        for ns in namespaces:
            if not _DNS_LABEL.fullmatch(ns) or len(ns) > 63:
                raise ConfigurationError(f"{LLM_TELEMETRY_OPERATOR_NAMESPACES}: {ns!r} is not a namespace name")
        traces = get(LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT, DEFAULT_TRACES_ENDPOINT) or DEFAULT_TRACES_ENDPOINT
        logs = get(LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT, DEFAULT_LOGS_ENDPOINT) or DEFAULT_LOGS_ENDPOINT
        traces = _otlp_base(LLM_TELEMETRY_OPERATOR_TRACES_ENDPOINT, traces, "traces")
        logs = _otlp_base(LLM_TELEMETRY_OPERATOR_LOGS_ENDPOINT, logs, "logs")
        logs_tenant = get(LLM_TELEMETRY_OPERATOR_LOGS_TENANT, "")
        if logs_tenant and (problem := loki_tenant_problem(logs_tenant)):
            raise ConfigurationError(f"{LLM_TELEMETRY_OPERATOR_LOGS_TENANT}={logs_tenant!r}: {problem}")
        sm_labels = parse_labels(
            LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS, get(LLM_TELEMETRY_OPERATOR_SERVICEMONITOR_LABELS, "")
        )
        dashboard = parse_labels(
            LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL, get(LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL, DEFAULT_DASHBOARD_LABEL)
        )
        if len(dashboard) != 1:
            raise ConfigurationError(f"{LLM_TELEMETRY_OPERATOR_DASHBOARD_LABEL}: expected exactly one key=value")
        uids = {}
        for name, default in (
            (LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID, DEFAULT_JAEGER_DATASOURCE_UID),
            (LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID, DEFAULT_LOKI_DATASOURCE_UID),
        ):
            uids[name] = get(name, default) or default
            if not _GRAFANA_UID.fullmatch(uids[name]):
                raise ConfigurationError(
                    f"{name}={uids[name]!r}: a Grafana uid is 1 to 40 letters, digits, '-' and '_'"
                )
        runbook_url = get(LLM_TELEMETRY_OPERATOR_RUNBOOK_URL, DEFAULT_RUNBOOK_URL) or DEFAULT_RUNBOOK_URL
        if any(ch.isspace() for ch in runbook_url) or "#" in runbook_url:
            raise ConfigurationError(
                f"{LLM_TELEMETRY_OPERATOR_RUNBOOK_URL}={runbook_url!r}: expected a URL without spaces or a fragment"
            )
        peering = get(LLM_TELEMETRY_OPERATOR_PEERING, DEFAULT_PEERING)
        if not _DNS_LABEL.fullmatch(peering):
            raise ConfigurationError(f"{LLM_TELEMETRY_OPERATOR_PEERING}: {peering!r} is not a valid object name")
        priority_text = get(LLM_TELEMETRY_OPERATOR_PRIORITY, DEFAULT_PRIORITY) or DEFAULT_PRIORITY
        if priority_text.lower() == "auto":
            priority = random.SystemRandom().randint(*AUTO_PRIORITY_RANGE)
        else:
            try:
                priority = _int(LLM_TELEMETRY_OPERATOR_PRIORITY, priority_text)
            except ConfigurationError:
                raise ConfigurationError(
                    f"{LLM_TELEMETRY_OPERATOR_PRIORITY}={priority_text!r}: expected an integer or auto"
                ) from None
        lifetime_text = get(LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS, "") or str(
            DEFAULT_PEERING_LIFETIME_SECONDS
        )
        try:
            lifetime = _int(LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS, lifetime_text)
        except ConfigurationError:
            raise ConfigurationError(
                f"{LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS}={lifetime_text!r}: expected whole seconds"
            ) from None
        low, high = PEERING_LIFETIME_RANGE
        if not low <= lifetime <= high:
            raise ConfigurationError(
                f"{LLM_TELEMETRY_OPERATOR_PEERING_LIFETIME_SECONDS}={lifetime_text!r}: must be between {low} and"
                f" {high} seconds (kopf renews an entry 5 to 10 s before it runs out)"
            )
        port = _int(
            LLM_TELEMETRY_OPERATOR_METRICS_PORT, get(LLM_TELEMETRY_OPERATOR_METRICS_PORT, str(DEFAULT_METRICS_PORT))
        )
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"{LLM_TELEMETRY_OPERATOR_METRICS_PORT}={port}: must be between 0 and 65535")
        health = get(LLM_TELEMETRY_OPERATOR_HEALTH, DEFAULT_HEALTH)
        if health:
            _check_url(LLM_TELEMETRY_OPERATOR_HEALTH, health)
            if port and urlsplit(health).port == port:
                raise ConfigurationError(
                    f"{LLM_TELEMETRY_OPERATOR_HEALTH}={health!r}: the same port as "
                    f"{LLM_TELEMETRY_OPERATOR_METRICS_PORT}={port}; each needs a listener of its own"
                )
        resync_text = get(LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS, str(DEFAULT_RESYNC_SECONDS))
        try:
            resync = float(resync_text)
        except ValueError:
            raise ConfigurationError(
                f"{LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS}={resync_text!r}: expected seconds"
            ) from None
        if not resync > 0 or math.isinf(resync):  # float() also reads "nan" and "inf", and no interval is either
            raise ConfigurationError(
                f"{LLM_TELEMETRY_OPERATOR_RESYNC_SECONDS}={resync_text!r}: must be a positive number of seconds"
            )
        standalone_text = get(LLM_TELEMETRY_OPERATOR_STANDALONE, "false").lower()
        if standalone_text not in ("true", "false", "1", "0", ""):
            raise ConfigurationError(f"{LLM_TELEMETRY_OPERATOR_STANDALONE}={standalone_text!r}: expected true or false")
        return cls(
            standalone=standalone_text in ("true", "1"),
            namespaces=namespaces,
            traces_endpoint=traces,
            logs_endpoint=logs,
            logs_tenant=logs_tenant,
            servicemonitor_labels=sm_labels,
            dashboard_label=next(iter(dashboard.items())),
            jaeger_datasource_uid=uids[LLM_TELEMETRY_OPERATOR_JAEGER_DATASOURCE_UID],
            loki_datasource_uid=uids[LLM_TELEMETRY_OPERATOR_LOKI_DATASOURCE_UID],
            runbook_url=runbook_url,
            peering=peering,
            priority=priority,
            peering_lifetime_seconds=lifetime,
            metrics_port=port,
            health=health,
            resync_seconds=resync,
        )


def parse_labels(name: str, value: str) -> dict[str, str]:
    """Parse ``k=v,k=v`` into Kubernetes labels, validating keys and values."""
    labels: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not is_label_key(key) or not is_label_value(val):
            raise ConfigurationError(f"{name}: {item!r} is not a valid label key=value")
        labels[key] = val
    return labels


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(f"{name}={value!r}: expected an integer") from None


def _check_url(name: str, value: str) -> None:
    try:
        # (The port is read too: a bracket left open or a port past 65535 is a ValueError only then.)
        parts = urlsplit(value)
        host, _ = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{name}={value!r}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError(f"{name}={value!r}: expected an http(s) URL")


def _otlp_base(name: str, value: str, signal: str) -> str:
    """An OTLP endpoint's base URL, to which the exporter adds ``/v1/<signal>`` (see :func:`spec.otlp_base`)."""
    _check_url(name, value)
    try:
        return otlp_base(value, signal)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={value!r}: {exc}") from None
