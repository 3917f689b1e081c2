{{/*
The operator's RBAC rules, split by scope. They mirror operator/llm_telemetry_operator/rbac.py (PERMISSIONS) rule
for rule, a rule limited to named objects there (`names`) by resourceNames here; tests/chart/test_chart_rbac.py
renders the chart and fails on anything missing or extra in either direction.
Cluster-wide mode grants both lists in one ClusterRole; namespaced mode grants the first list in a ClusterRole and
the second in a Role per watched namespace. The first holds the cluster-scoped objects and the LLMTelemetry resources
themselves: deleting a watched namespace deletes its Role too, often before the operator has taken its finalizer off
the resources there, and only a grant that outlives the Role lets it do so (and the namespace go).
*/}}

{{- define "llm-telemetry-operator.rules.clusterWide" -}}
# Framework: kopf notices CRDs and namespaces appearing and disappearing.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- /*
The ClusterKopfPeerings are read in every one (kopf watches them all; RBAC cannot limit a list or a watch by name)
and written only in this release's: a write in another release's (a fake peer of top priority) would keep that
release's operator paused.
*/}}
# Framework: peering through one ClusterKopfPeering, so that standby replicas stay paused while one replica is active.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [patch]
  resourceNames: [{{ include "llm-telemetry-operator.peeringName" . | quote }}]
# Framework: asking the API server which of these permissions the operator lacks (SelfSubjectAccessReview).
- apiGroups: [authorization.k8s.io]
  resources: [selfsubjectaccessreviews]
  verbs: [create]
# Application: the LLMTelemetry resources (finalizers, progress annotations) and their status.
- apiGroups: [llmtelemetry.dev]
  resources: [llmtelemetries]
  verbs: [list, watch, patch]
- apiGroups: [llmtelemetry.dev]
  resources: [llmtelemetries/status]
  verbs: [patch]
{{- end }}

{{- define "llm-telemetry-operator.rules.namespaced" -}}
# Framework: events about handler progress and failures.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Application: never called; OwnerReferencesPermissionEnforcement (OpenShift) checks it for blockOwnerDeletion.
- apiGroups: [llmtelemetry.dev]
  resources: [llmtelemetries/finalizers]
  verbs: [update]
# Application: workloads whose pod templates receive the middleware's environment.
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get, list, watch, patch]
# Application: children owned by an LLMTelemetry (metrics Service, dashboard and pricing ConfigMaps).
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, delete]
# Application: Prometheus Operator objects (ServiceMonitor, PrometheusRule).
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors, prometheusrules]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
