{{/*
Expand the name of the chart.
*/}}
{{- define "activity-events.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "activity-events.fullname" -}}
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

{{/*
Name of a component object: the full name plus a suffix, still within 63 chars.
Usage: include "activity-events.componentName" (list . "headless")
*/}}
{{- define "activity-events.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "activity-events.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "activity-events.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "activity-events.labels" -}}
helm.sh/chart: {{ include "activity-events.chart" . }}
{{ include "activity-events.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "activity-events.selectorLabels" -}}
app.kubernetes.io/name: {{ include "activity-events.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "activity-events.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "activity-events.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The server image: repository and tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "activity-events.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Name of the Secret holding the Redis URL and password: an existing one, or the chart's own.
*/}}
{{- define "activity-events.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- include "activity-events.fullname" . }}
{{- end }}
{{- end }}

{{/*
Whether the chart renders its own Secret (no existing Secret named).
*/}}
{{- define "activity-events.createSecret" -}}
{{- if not .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/*
Name of the dev-only Redis (Deployment and Service).
*/}}
{{- define "activity-events.devRedisName" -}}
{{- include "activity-events.componentName" (list . "redis") }}
{{- end }}

{{/*
The Redis URL the chart's Secret carries: the dev Redis when enabled, else redis.url.
*/}}
{{- define "activity-events.redisUrl" -}}
{{- if .Values.devRedis.enabled }}
{{- printf "redis://%s:%d/0" (include "activity-events.devRedisName" .) (int .Values.devRedis.port) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
Settings rendered into the ConfigMap as ACTIVITY_<NAME> variables. The keys of
.Values.settings are the server's setting names (see values.schema.json).
*/}}
{{- define "activity-events.configData" -}}
PORT: {{ .Values.service.port | quote }}
ACTIVITY_HOST: {{ .Values.server.host | quote }}
ACTIVITY_METRICS_PORT: {{ .Values.metrics.port | quote }}
ACTIVITY_METRICS_HOST: {{ .Values.metrics.host | quote }}
ACTIVITY_DATA_DIR: {{ .Values.dataDir.mountPath | quote }}
{{- if .Values.tls.enabled }}
ACTIVITY_TLS_CERT_FILE: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
ACTIVITY_TLS_KEY_FILE: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
{{- if .Values.tls.clientAuth }}
ACTIVITY_TLS_CLIENT_CA_FILE: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
ACTIVITY_AUTH_TOKENS_FILE: {{ printf "%s/%s" .Values.auth.mountPath .Values.auth.key | quote }}
{{- end }}
{{- with .Values.redis.username }}
ACTIVITY_REDIS_USERNAME: {{ . | quote }}
{{- end }}
{{- if .Values.redis.tlsSecret }}
ACTIVITY_REDIS_TLS_CA_FILE: {{ printf "%s/ca.crt" (include "activity-events.redisTlsPath" .) | quote }}
{{- if .Values.redis.tlsClientAuth }}
ACTIVITY_REDIS_TLS_CERT_FILE: {{ printf "%s/tls.crt" (include "activity-events.redisTlsPath" .) | quote }}
ACTIVITY_REDIS_TLS_KEY_FILE: {{ printf "%s/tls.key" (include "activity-events.redisTlsPath" .) | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := .Values.settings }}
{{- if not (kindIs "invalid" $value) }}
{{- $text := toString $value }}
{{- /* Numbers from values arrive as float64: print whole ones without an exponent. */}}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
{{- $text = toString (int64 $value) }}
{{- end }}
{{ printf "ACTIVITY_%s" (upper $name) }}: {{ $text | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fail early on combinations that would roll out a broken or unsafe release.
*/}}
{{- define "activity-events.validate" -}}
{{- if and (not .Values.devRedis.enabled) (not .Values.redis.existingSecret) (not .Values.redis.url) }}
{{- fail "activity-events: set redis.url, redis.existingSecret or (for local development only) devRedis.enabled=true; without a Redis every replica would run its own embedded Redis" }}
{{- end }}
{{- $grace := .Values.settings.grace_seconds | default 10 | float64 }}
{{- $needed := addf .Values.lifecycle.preStopSleepSeconds $grace }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "activity-events: terminationGracePeriodSeconds (%v) must be greater than lifecycle.preStopSleepSeconds + settings.grace_seconds (%v)" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "activity-events: tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- fail "activity-events: auth.enabled needs auth.existingSecret (a Secret with the tokens file)" }}
{{- end }}
{{- end }}

{{/*
Selector labels of the server pods: the chart's selector labels plus the
component, so the dev Redis (same release) is never selected with them.
*/}}
{{- define "activity-events.serverSelectorLabels" -}}
{{ include "activity-events.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Keys of the Redis URL and password in the Secret the pods read.
*/}}
{{- define "activity-events.redisUrlKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretUrlKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{- define "activity-events.redisPasswordKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretPasswordKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/*
Where the Redis TLS Secret is mounted.
*/}}
{{- define "activity-events.redisTlsPath" -}}
/etc/activity-events/redis-tls
{{- end }}
