{{/* Chart name, bounded for label values. */}}
{{- define "usage-backfill-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name of every object. */}}
{{- define "usage-backfill-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "usage-backfill-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "usage-backfill-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "usage-backfill-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "usage-backfill-operator.labels" -}}
helm.sh/chart: {{ include "usage-backfill-operator.chart" . }}
{{ include "usage-backfill-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: usage-backfill
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "usage-backfill-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "usage-backfill-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "usage-backfill-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
What the controller does in a watched namespace, verb by verb: watch
UsageBackfills (list, watch), read one before acting on it (get), patch its
finalizer, apply its status (patch), read the Secrets they reference (by
name: get only), create Events (events.k8s.io only), and keep the walk's
progress records (ConfigMaps usage-backfill-progress-*, read by name,
written by server-side apply, which creates, deleted once stamped) that a
recreated UsageBackfill resumes from. Nothing is ever updated (PUT).
*/}}
{{- define "usage-backfill-operator.watchRules" -}}
- apiGroups: ["usage.multica.ai"]
  resources: ["usagebackfills"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["usage.multica.ai"]
  resources: ["usagebackfills/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}

{{/*
Added to watchRules with secrets.watch (--watch-secrets): the Secret
metadata watch and its paginated lists, over every Secret of the namespace.
*/}}
{{- define "usage-backfill-operator.secretWatchRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch"]
{{- end }}
