{{/* Names, labels, images and the generated Secrets' names shared by the templates. */}}

{{- define "handler-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Base name: the operator's objects carry it; other parts replace its "-operator" suffix. */}}
{{- define "handler-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "handler-operator.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "handler-operator.partName" -}}
{{- $base := include "handler-operator.fullname" .ctx | trimSuffix "-operator" }}
{{- printf "%s-%s" $base .part | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "handler-operator.gatewayName" -}}
{{- include "handler-operator.partName" (dict "ctx" . "part" "gateway") }}
{{- end }}

{{- define "handler-operator.redisName" -}}
{{- include "handler-operator.partName" (dict "ctx" . "part" "redis") }}
{{- end }}

{{- define "handler-operator.gatewayKeysSecret" -}}
{{- .Values.gateway.auth.existingSecret | default (printf "%s-keys" (include "handler-operator.gatewayName" .)) }}
{{- end }}

{{- define "handler-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: handler-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* Selector labels of one part: (dict "ctx" . "component" "gateway") */}}
{{- define "handler-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "handler-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "handler-operator.componentLabels" -}}
{{ include "handler-operator.labels" .ctx }}
{{ include "handler-operator.selectorLabels" . }}
{{- end }}

{{/* An image reference: (dict "image" .Values.operator.image "ctx" .) */}}
{{- define "handler-operator.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .ctx.Chart.AppVersion) }}
{{- end }}

{{- define "handler-operator.gatewayUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "handler-operator.gatewayName" .) .Release.Namespace .Values.gateway.service.port }}
{{- end }}

{{/* The watched namespaces as a list (empty: cluster-wide). */}}
{{- define "handler-operator.workerNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.workerNamespaces | default .Values.watchNamespaces }}
{{- toJson ($namespaces | default list | uniq) }}
{{- end }}

{{/*
The Secrets the credentials hook generates, as a JSON list of "NAME=KEY[,KEY]": the gateway keys
and the bundled Redis's password, each unless an existingSecret names the user's own.
*/}}
{{- define "handler-operator.generatedSecrets" -}}
{{- $secrets := list }}
{{- if not .Values.gateway.auth.existingSecret }}
{{- $secrets = append $secrets (printf "%s=admin-key,api-key" (include "handler-operator.gatewayKeysSecret" .)) }}
{{- end }}
{{- if and (eq (include "handler-operator.redisMode" .) "internal") (not .Values.redis.auth.existingSecret) }}
{{- $secrets = append $secrets (printf "%s=%s" (include "handler-operator.redisPasswordSecret" .) .Values.redis.auth.passwordKey) }}
{{- end }}
{{- toJson $secrets }}
{{- end }}

{{/* Redis: which one, and the env a gateway container needs to reach it. */}}
{{- define "handler-operator.redisMode" -}}
{{- if and .Values.redis.enabled .Values.redis.external.url }}
{{- fail "redis.enabled=true and redis.external.url are exclusive: set redis.enabled=false to use an external Redis" }}
{{- else if .Values.redis.enabled }}internal
{{- else if .Values.redis.external.url }}external
{{- else }}memory
{{- end }}
{{- end }}

{{- define "handler-operator.redisPasswordSecret" -}}
{{- if eq (include "handler-operator.redisMode" .) "internal" }}
{{- .Values.redis.auth.existingSecret | default (include "handler-operator.redisName" .) }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "handler-operator.backendEnv" -}}
{{- $mode := include "handler-operator.redisMode" . }}
{{- if eq $mode "memory" }}
- name: HANDLER_GATEWAY_BACKEND
  value: memory://
{{- else }}
{{- $secret := include "handler-operator.redisPasswordSecret" . }}
{{- $key := ternary .Values.redis.auth.passwordKey .Values.redis.external.passwordKey (eq $mode "internal") }}
{{- $url := ternary (printf "redis://%s:6379/0" (include "handler-operator.redisName" .)) .Values.redis.external.url (eq $mode "internal") }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
- name: HANDLER_GATEWAY_BACKEND
  value: {{ regexReplaceAll "^(rediss?://|redis\\+sentinel://)" $url "${1}:$(REDIS_PASSWORD)@" | quote }}
{{- else }}
- name: HANDLER_GATEWAY_BACKEND
  value: {{ $url | quote }}
{{- end }}
- name: HANDLER_GATEWAY_REDIS_PREFIX
  value: {{ .Values.redis.keyPrefix | quote }}
{{- end }}
{{- end }}
