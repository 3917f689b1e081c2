"""Names shared by the CRD, the handlers, the builders and the chart."""

from __future__ import annotations

from typing import Final

GROUP: Final = "llmtelemetry.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "LLMTelemetry"
PLURAL: Final = "llmtelemetries"
SHORT_NAME: Final = "llmt"

#: Value of ``app.kubernetes.io/managed-by`` on everything the operator creates.
MANAGER: Final = "llm-telemetry-operator"
#: Finalizer kopf puts on each LLMTelemetry so that injection is undone before it goes away.
FINALIZER: Final = f"{GROUP}/cleanup"

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
#: ``app.kubernetes.io/name`` of the operator's own Deployment (the chart's), which no LLMTelemetry injects.
OPERATOR_NAME: Final = "llm-telemetry-operator"
#: Label on children and injected workloads naming the LLMTelemetry that owns them.
LABEL_OWNER: Final = f"{GROUP}/owner"

#: Pod-template label the injection adds: the name of the workload's metrics Service, which selects on it alone, so
#: that it lists the pods of its own workload only (not those of a canary whose pods carry the same labels, injected
#: by another LLMTelemetry). The Service's name is unique per workload and a valid label value.
LABEL_METRICS_SERVICE: Final = f"{GROUP}/metrics-service"
#: Pod-template annotation: hash of the injected configuration; changing it rolls the pods.
ANNOTATION_CONFIG_HASH: Final = f"{GROUP}/config-hash"
#: Workload annotation: JSON record of what was injected, so it can be removed exactly.
ANNOTATION_INJECTED: Final = f"{GROUP}/injected"
#: Child annotation: the keys of the labels it carries from settings (``spec.metrics.labels``, the chart's), so that
#: one taken out of them is taken off the child too (a merge patch keeps the keys it does not name).
ANNOTATION_LABELS: Final = f"{GROUP}/labels"
#: Peering-object annotation: the namespaces the operator of that peering object watches, comma-separated, or ``*``
#: for every namespace. Another operator takes over a resource claimed by that one in a namespace it no longer
#: watches (see handlers._held_elsewhere).
ANNOTATION_WATCHED: Final = f"{GROUP}/watched-namespaces"
#: Peering-object annotation: the replica (its peering identity) that wrote ANNOTATION_WATCHED. The namespaces are
#: taken as said only while that replica has an entry in the object: after a rollback to an operator that writes no
#: annotation, what a newer one wrote no longer holds.
ANNOTATION_WATCHED_BY: Final = f"{GROUP}/watched-namespaces-by"
#: Peering-object annotation: when (ISO 8601, UTC) the operator's active replica last stopped. kopf removes a
#: replica's entry as it stops, so without it an operator being restarted would look long gone.
ANNOTATION_STOPPED: Final = f"{GROUP}/stopped-at"
#: Grafana sidecar folder annotation on the dashboard ConfigMap.
ANNOTATION_GRAFANA_FOLDER: Final = "grafana_folder"

#: Name of the container port added for the middleware's Prometheus listener.
METRICS_PORT_NAME: Final = "llm-metrics"
#: Volume and mount for an inline pricing table.
PRICING_VOLUME: Final = "llm-telemetry-pricing"
PRICING_MOUNT_PATH: Final = "/etc/llm-telemetry"
PRICING_FILE: Final = "pricing.yaml"
#: The file a ConfigMap key ending in ``.json`` is mounted as: the middleware reads a file by its name's format.
PRICING_FILE_JSON: Final = "pricing.json"

#: Condition types written to status.
CONDITION_READY: Final = "Ready"
CONDITION_INJECTED: Final = "Injected"
CONDITION_METRICS: Final = "MetricsExposed"
CONDITION_ALERTS: Final = "AlertsConfigured"
CONDITION_DASHBOARD: Final = "DashboardProvisioned"
#: Whether the trace/log collectors the exporters would send to exist (informational: does not block Ready).
CONDITION_COLLECTORS: Final = "CollectorsAvailable"
#: Whether every injected container sends the signals the resource routes (traces, OTLP logs) to its collectors, or
#: some route one themselves (informational: does not block Ready).
CONDITION_ROUTES: Final = "SignalsRouted"
