{{/* The name of every object the chart creates. */}}
{{- define "bulkhead.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the agent's pods; they never change on upgrade. */}}
{{- define "bulkhead.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "bulkhead.labels" -}}
{{ include "bulkhead.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "bulkhead.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The host the kubelet probes /healthz and /readyz on. The agent shares the
node's network namespace, so a wildcard listener is reachable on loopback,
and a specific address only on itself.
*/}}
{{- define "bulkhead.probeHost" -}}
{{- $a := .Values.metrics.address -}}
{{- if has $a (list "0.0.0.0" "::" "[::]") -}}127.0.0.1{{- else -}}{{ trimPrefix "[" (trimSuffix "]" $a) }}{{- end -}}
{{- end -}}

{{- define "bulkhead.metricsAddr" -}}
{{- $a := .Values.metrics.address -}}
{{- if and (contains ":" $a) (not (hasPrefix "[" $a)) -}}
{{- printf "[%s]:%d" $a (int .Values.metrics.port) -}}
{{- else -}}
{{- printf "%s:%d" $a (int .Values.metrics.port) -}}
{{- end -}}
{{- end -}}
