{{/*
Names and labels, as every prometheus-community chart builds them.
*/}}

{{/* The chart name, or nameOverride; at most 63 characters (a label value). */}}
{{- define "aiops-plugin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources: fullnameOverride, or <release>-<chart> unless the
release name already contains the chart name. At most 63 characters (DNS label).
*/}}
{{- define "aiops-plugin.fullname" -}}
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

{{/* chart: name-version, for the helm.sh/chart label. */}}
{{- define "aiops-plugin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "aiops-plugin.labels" -}}
helm.sh/chart: {{ include "aiops-plugin.chart" . }}
{{ include "aiops-plugin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aiops-plugin
{{- end }}

{{/* Labels that select the agent's pod (immutable in a Deployment: never add to them). */}}
{{- define "aiops-plugin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aiops-plugin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/* The service account's name. */}}
{{- define "aiops-plugin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aiops-plugin.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, the tag defaulting to appVersion, the GPU suffix added. */}}
{{- define "aiops-plugin.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .Values.gpu.imageTagSuffix }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Secret holding tokens and the store URL: the existing one, or the chart's. */}}
{{- define "aiops-plugin.secretName" -}}
{{- default (include "aiops-plugin.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
Environment variable -> Secret key -> value in values, for the secrets the agent reads from its
environment (aiops_plugin.config: AIOPS_PROMETHEUS_TOKEN, AIOPS_LOGS_TOKEN, AIOPS_GRAFANA_TOKEN,
AIOPS_FEEDBACK_TOKEN, AIOPS_STORE_URL). A list of [env, key, value, required] as JSON.
*/}}
{{- define "aiops-plugin.secretEntries" -}}
{{- $postgresql := eq .Values.store.type "postgresql" }}
{{- $entries := list
  (list "AIOPS_PROMETHEUS_TOKEN" "prometheus-token" .Values.secrets.prometheusToken false)
  (list "AIOPS_LOGS_TOKEN" "logs-token" .Values.secrets.logsToken false)
  (list "AIOPS_GRAFANA_TOKEN" "grafana-token" .Values.secrets.grafanaToken false)
  (list "AIOPS_FEEDBACK_TOKEN" "feedback-token" .Values.secrets.feedbackToken false) }}
{{- if $postgresql }}
{{- $entries = append $entries (list "AIOPS_STORE_URL" "store-url" .Values.store.postgresql.url true) }}
{{- end }}
{{- toJson $entries }}
{{- end }}

{{/* Whether the chart creates its own Secret: no existing one, and some value to hold. */}}
{{- define "aiops-plugin.createSecret" -}}
{{- if not .Values.secrets.existingSecret }}
{{- range (include "aiops-plugin.secretEntries" . | fromJsonArray) }}
{{- if index . 2 }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The agent configuration file: .Values.config plus the sections the chart owns (server: the pod's
port; store: the SQLite directory on the volume, or nothing, the URL coming from AIOPS_STORE_URL).
*/}}
{{- define "aiops-plugin.agentConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "server" (dict "host" "0.0.0.0" "port" (int .Values.containerPort)) }}
{{- if eq .Values.store.type "sqlite" }}
{{- $_ := set $config "store" (dict "data_dir" "/var/lib/aiops-plugin") }}
{{- end }}
{{- if gt (int .Values.shards) 1 }}
{{- $_ := set $config "sharding" (dict "shards" (int .Values.shards)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Checks of values that the schema cannot express; each fails with the values to change. */}}
{{- define "aiops-plugin.validate" -}}
{{- if and (eq .Values.store.type "postgresql") (not .Values.store.postgresql.url) (not .Values.secrets.existingSecret) }}
{{- fail "store.type=postgresql needs the database URL: set store.postgresql.url, or secrets.existingSecret naming a Secret with the key store-url" }}
{{- end }}
{{- if gt (int .Values.shards) 1 }}
{{- if ne .Values.store.type "postgresql" }}
{{- fail "shards > 1 needs store.type=postgresql: the shards share one store" }}
{{- end }}
{{- end }}
{{- end }}
