"""The operator's own Prometheus metrics (prometheus_client), served on LLM_TELEMETRY_OPERATOR_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

from llm_telemetry.exposition import ANY_ADDRESS, serve_metrics

#: Reconcile passes by trigger (create, update, resume, resync, retry, workload, child, collector, pricing: something
#: it waited for appeared; served: a kind of child found not served, the Prometheus Operator's CRDs, is served now;
#: handover: a peer being deleted hands its workloads over; conflict; resume also when a standby replica becomes the
#: active one) and result (ready; pending: phase Pending, no workload injected by it; degraded, invalid, error;
#: coalesced: answered by a pass that started after the request, so no pass of its own; namespace_leaving: a pass in
#: a namespace being deleted).
RECONCILES = Counter(
    "llm_telemetry_operator_reconciles",
    "Reconcile passes of LLMTelemetry resources.",
    ["trigger", "result"],
)
#: Failures found during passes, by condition reason (ServiceMonitorCRDMissing, InvalidSpec, ...).
RECONCILE_ERRORS = Counter(
    "llm_telemetry_operator_reconcile_errors",
    "Problems found while reconciling, by reason.",
    ["reason"],
)
RECONCILE_DURATION = Histogram(
    "llm_telemetry_operator_reconcile_duration_seconds",
    "Duration of reconcile passes.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_started: set[int] = set()


def serve(port: int) -> None:
    """Start the metrics listener once per process (0 disables it), on every address of the pod, IPv6 and IPv4 (the
    middleware's listener: see ``llm_telemetry.exposition.serve_metrics``)."""
    if port and port not in _started:
        serve_metrics(port, ANY_ADDRESS, REGISTRY)
        _started.add(port)
