{{/*
Names and labels follow `helm create`. Most helpers take a context
(dict "root" $ "component" "<name>").
*/}}

{{- define "speechmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "speechmesh.fullname" -}}
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

{{- define "speechmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>. */}}
{{- define "speechmesh.componentName" -}}
{{- printf "%s-%s" (include "speechmesh.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selects every pod of the release (name + instance). */}}
{{- define "speechmesh.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "speechmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selects one component's pods (name + instance + component). */}}
{{- define "speechmesh.selectorLabels" -}}
{{ include "speechmesh.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "speechmesh.labels" -}}
helm.sh/chart: {{ include "speechmesh.chart" .root }}
{{ include "speechmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .version | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "speechmesh.name" .root }}
{{- end }}

{{- define "speechmesh.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
An image reference. Context: (dict "root" $ "image" <{repository, tag}> "suffix" "-models");
an empty repository means image.repository, an empty tag the main tag plus the suffix.
*/}}
{{- define "speechmesh.image" -}}
{{- $repository := .image.repository | default .root.Values.image.repository }}
{{- $tag := .image.tag | default (printf "%s%s" (include "speechmesh.imageTag" .root) (.suffix | default "")) }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
Merges `src` into `dst` in place: maps key by key, anything else (lists, false, 0 included)
replaces. Sprig's merge/mergeOverwrite skip "empty" values, so `enabled: false` in a service
could not override `enabled: true` in defaults with them.
*/}}
{{- define "speechmesh.mergeInto" -}}
{{- $dst := index . 0 }}
{{- range $key, $value := index . 1 }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) }}
{{- include "speechmesh.mergeInto" (list (get $dst $key) $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fills `out` with one service's settings: `defaults` overlaid with `services.<name>`.
Usage: {{- $svc := dict }}{{- $_ := include "speechmesh.service" (dict "root" $ "name" $name "out" $svc) }}
*/}}
{{- define "speechmesh.service" -}}
{{- include "speechmesh.mergeInto" (list .out (deepCopy .root.Values.defaults)) }}
{{- include "speechmesh.mergeInto" (list .out (deepCopy (index .root.Values.services .name))) }}
{{- end }}

{{/* Names of the enabled services, comma-separated, sorted. */}}
{{- define "speechmesh.enabledServices" -}}
{{- $names := list }}
{{- range $name, $svc := .Values.services }}
{{- if $svc.enabled }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/* Pod-level security context: non-root with fixed ids, RuntimeDefault seccomp. */}}
{{- define "speechmesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: read-only root, no escalation, no capabilities. */}}
{{- define "speechmesh.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Native gRPC probes (grpc.health.v1). Context: (dict "svc" <merged service>).
Startup and liveness check the overall service "" (SERVING once models are loaded, for as long
as the process lives); readiness checks the full service name, which follows the service's
dependencies.
*/}}
{{- define "speechmesh.probes" -}}
{{- $svc := .svc }}
{{- range $probe, $service := dict "startupProbe" "" "livenessProbe" "" "readinessProbe" $svc.grpcService }}
{{ $probe }}:
  grpc:
    port: {{ $svc.port }}
    service: {{ $service | quote }}
  {{- toYaml (get $svc $probe) | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Secret with the admin key, JWT secret and hash pepper. */}}
{{- define "speechmesh.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "speechmesh.fullname" .) }}
{{- end }}

{{/* Where the Redis URL lives: (name, key) of a Secret. */}}
{{- define "speechmesh.redisSecretName" -}}
{{- if .Values.redis.existingSecret.name }}
{{- .Values.redis.existingSecret.name }}
{{- else }}
{{- include "speechmesh.componentName" (dict "root" . "component" "redis") }}
{{- end }}
{{- end }}

{{- define "speechmesh.redisSecretKey" -}}
{{- if .Values.redis.existingSecret.name }}{{ .Values.redis.existingSecret.key }}{{ else }}redis-url{{ end }}
{{- end }}

{{/* Fails unless exactly one way of reaching Redis is configured. */}}
{{- define "speechmesh.validateRedis" -}}
{{- $ways := 0 }}
{{- if .Values.redis.enabled }}{{ $ways = add1 $ways }}{{ end }}
{{- if .Values.redis.url }}{{ $ways = add1 $ways }}{{ end }}
{{- if .Values.redis.existingSecret.name }}{{ $ways = add1 $ways }}{{ end }}
{{- if ne (int $ways) 1 }}
{{- fail "redis: set exactly one of redis.enabled=true, redis.url or redis.existingSecret.name" }}
{{- end }}
{{- end }}

{{/*
A secret value, base64-encoded: the one already stored in the cluster if the Secret exists
(so upgrades keep it), else a new random one. Context: (dict "root" $ "name" <secret> "key" <key>).
*/}}
{{- define "speechmesh.persistentRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- $data := dig "data" dict ($existing | default dict) }}
{{- if hasKey $data .key }}
{{- index $data .key }}
{{- else }}
{{- randAlphaNum 48 | b64enc }}
{{- end }}
{{- end }}

{{/* Environment of one service. Context: (dict "root" $ "name" <name> "svc" <merged service>). */}}
{{- define "speechmesh.env" -}}
{{- $root := .root }}
{{- $svc := .svc }}
{{- $prefix := printf "SPEECHMESH_%s_" (upper .name) -}}
- name: {{ $prefix }}PORT
  value: {{ $svc.port | quote }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ $svc.metricsPort | quote }}
- name: {{ $prefix }}HOST
  value: {{ $svc.host | quote }}
- name: {{ $prefix }}ENVIRONMENT
  value: {{ $root.Values.environment | quote }}
- name: {{ $prefix }}LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: {{ $prefix }}GRACE_PERIOD_S
  value: {{ $svc.gracePeriodSeconds | quote }}
- name: {{ $prefix }}SHUTDOWN_DELAY_S
  value: {{ $svc.shutdownDelaySeconds | quote }}
- name: HOME
  value: /tmp
{{- if $svc.redis }}
- name: {{ $prefix }}REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "speechmesh.redisSecretName" $root }}
      key: {{ include "speechmesh.redisSecretKey" $root }}
{{- end }}
{{- if $svc.models }}
- name: SPEECHMESH_MODEL_CACHE_DIR
  value: {{ $root.Values.models.mountPath | quote }}
{{- end }}
{{- if eq .name "auth" }}
{{- $secret := include "speechmesh.secretName" $root }}
{{- range $env, $key := dict "SPEECHMESH_ADMIN_KEY" $root.Values.secrets.keys.adminKey "SPEECHMESH_AUTH_JWT_SECRET" $root.Values.secrets.keys.jwtSecret "SPEECHMESH_AUTH_HASH_PEPPER" $root.Values.secrets.keys.hashPepper }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- if eq .name "gateway" }}
{{- range $downstream := list "auth" "asr" "mt" }}
- name: SPEECHMESH_GATEWAY_{{ upper $downstream }}_TARGET
  value: {{ printf "%s:%v" (include "speechmesh.componentName" (dict "root" $root "component" $downstream)) (index $root.Values.services $downstream).port | quote }}
{{- end }}
{{- end }}
{{- range $key, $value := $svc.env }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Volume mounts every mesh container has; context as for speechmesh.env plus "readOnlyModels". */}}
{{- define "speechmesh.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .svc.models (eq .root.Values.models.source "initContainer") }}
- name: models
  mountPath: {{ .root.Values.models.mountPath }}
  readOnly: {{ .readOnlyModels }}
{{- end }}
{{- end }}
