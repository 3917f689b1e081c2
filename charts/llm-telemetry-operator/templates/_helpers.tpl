{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "llm-telemetry-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix for resource names: <release>-<chart>; just <release> when the release name already contains the chart name,
and just the chart name when it starts with the release name, so that both `helm install llm-telemetry-operator`
and the documented `helm install llm-telemetry` give llm-telemetry-operator rather than a doubled name.
*/}}
{{- define "llm-telemetry-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix .Release.Name $name }}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the operator's metrics Service: <fullname>-metrics as a DNS-1035 label, as a Service's name must be (at most 63
characters, no dots, a letter first), whatever the release name (Helm allows 53 characters, dots and a leading digit).
*/}}
{{- define "llm-telemetry-operator.metricsServiceName" -}}
{{- $name := include "llm-telemetry-operator.fullname" . | replace "." "-" | trunc 55 | trimSuffix "-" }}
{{- if regexMatch "^[a-z]" $name }}
{{- printf "%s-metrics" $name }}
{{- else }}
{{- printf "s%s-metrics" ($name | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/*
Name of the release's ClusterKopfPeering: peering.name when set; otherwise llm-telemetry-operator for a cluster-wide
release, and <release namespace>-<fullname> for a namespaced one, so that releases watching different namespaces do
not pause each other through one peering object. A namespaced release given llm-telemetry-operator gets its own name
too: that is the cluster-wide default, and what `helm upgrade --reuse-values` carries over from charts before this one
(whose namespaced releases each had KopfPeerings of that name in their own namespaces).
*/}}
{{- define "llm-telemetry-operator.peeringName" -}}
{{- $default := "llm-telemetry-operator" }}
{{- $name := .Values.peering.name | default "" }}
{{- if and .Values.watchNamespaces (or (not $name) (eq $name $default)) }}
{{- printf "%s-%s" .Release.Namespace (include "llm-telemetry-operator.fullname" .) | replace "." "-" }}
{{- else }}
{{- $name | default $default }}
{{- end }}
{{- end }}

{{/*
Value of the helm.sh/chart label.
*/}}
{{- define "llm-telemetry-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the release.
*/}}
{{- define "llm-telemetry-operator.labels" -}}
helm.sh/chart: {{ include "llm-telemetry-operator.chart" . }}
{{ include "llm-telemetry-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-telemetry
{{- end }}

{{/*
Labels that select the operator pods; they must never change between upgrades.
*/}}
{{- define "llm-telemetry-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-telemetry-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "llm-telemetry-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-telemetry-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository, then @digest if pinned, else :tag (the appVersion unless overridden).
*/}}
{{- define "llm-telemetry-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
A map rendered as the operator's `k=v,k2=v2` environment format (keys sorted, as Go templates range over maps). A key
whose value is empty is left out: that is how a default label is dropped where a null would bring the chart's default
back (`helm upgrade --reset-then-reuse-values`).
*/}}
{{- define "llm-telemetry-operator.kvList" -}}
{{- $pairs := list }}
{{- range $key, $value := . }}
{{- if ne (toString $value) "" }}
{{- $pairs = append $pairs (printf "%s=%s" $key (toString $value)) }}
{{- end }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
The same map without its empty values, as labels.
*/}}
{{- define "llm-telemetry-operator.nonEmpty" -}}
{{- $kept := dict }}
{{- range $key, $value := . }}
{{- if ne (toString $value) "" }}
{{- $_ := set $kept $key $value }}
{{- end }}
{{- end }}
{{- if $kept }}
{{- toYaml $kept }}
{{- end }}
{{- end }}
