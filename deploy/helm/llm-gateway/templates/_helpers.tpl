{{/*
Names and labels.
*/}}
{{- define "llm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix; 63 characters minus room for the "-warmup-config" style suffixes. */}}
{{- define "llm-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-gateway.labels" -}}
helm.sh/chart: {{ include "llm-gateway.chart" . }}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-gateway
{{- end }}

{{- define "llm-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Ports: the API port comes from the gateway config itself, so the config, the container, the probes
and the Service can never disagree.
*/}}
{{- define "llm-gateway.httpPort" -}}
{{- dig "server" "port" 8080 .Values.gateway | int }}
{{- end }}

{{- define "llm-gateway.adminPort" -}}
{{- $p := dig "server" "admin_port" nil .Values.gateway }}
{{- if $p }}{{ $p | int }}{{ end }}
{{- end }}

{{/* Named port the probes and the ServiceMonitor use: the admin listener when there is one. */}}
{{- define "llm-gateway.opsPortName" -}}
{{- if include "llm-gateway.adminPort" . }}admin{{ else }}http{{ end }}
{{- end }}

{{- define "llm-gateway.workers" -}}
{{- dig "server" "workers" 1 .Values.gateway | int }}
{{- end }}

{{/*
Termination: preStop sleep, then SIGTERM, then the gateway drains for drain_timeout_s. The kubelet's
grace period counts from the start of preStop, so it must cover both.
*/}}
{{- define "llm-gateway.drainSeconds" -}}
{{- dig "server" "drain_timeout_s" 30 .Values.gateway | float64 | ceil | int }}
{{- end }}

{{- define "llm-gateway.terminationGracePeriodSeconds" -}}
{{- $floor := add (int .Values.lifecycle.preStopSleepSeconds) (include "llm-gateway.drainSeconds" . | int) }}
{{- $explicit := .Values.lifecycle.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $explicit }}
{{- add $floor (int .Values.lifecycle.terminationMarginSeconds) }}
{{- else if le (int $explicit) $floor }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must be longer than lifecycle.preStopSleepSeconds + gateway.server.drain_timeout_s (%d), or the kubelet kills streams mid-drain" (int $explicit) $floor) }}
{{- else }}
{{- int $explicit }}
{{- end }}
{{- end }}

{{/*
Longest request any deployment allows, in seconds: timeouts.total_ms resolved the way the gateway
resolves it (deployment, then model, then model_defaults, then the gateway's default of 300 s).
*/}}
{{- define "llm-gateway.longestRequestSeconds" -}}
{{- $defaults := dig "model_defaults" "timeouts" "total_ms" 300000 .Values.gateway }}
{{- $max := 0.0 }}
{{- range $m := (.Values.gateway.models | default list) }}
{{- $modelTotal := dig "timeouts" "total_ms" $defaults $m }}
{{- range $d := ($m.deployments | default list) }}
{{- $t := dig "timeouts" "total_ms" $modelTotal $d | float64 }}
{{- if gt $t $max }}{{ $max = $t }}{{ end }}
{{- end }}
{{- end }}
{{- divf $max 1000.0 | ceil | int }}
{{- end }}

{{/* Redis URL the chart puts into state.redis_url, if any. */}}
{{- define "llm-gateway.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "llm-gateway.fullname" .) .Release.Namespace }}
{{- else if .Values.redis.url }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* state.redis_mode and the Sentinel keys, set from redis.mode and redis.sentinel. */}}
{{- define "llm-gateway.redisTopology" -}}
{{- $r := .Values.redis }}
{{- $state := .state }}
{{- if eq (default "standalone" $r.mode) "sentinel" }}
{{- $_ := set $state "backend" "redis" }}
{{- $_ := set $state "redis_mode" "sentinel" }}
{{- $_ := set $state "sentinels" $r.sentinel.hosts }}
{{- $_ := set $state "sentinel_master" $r.sentinel.masterSet }}
{{- if $r.sentinel.password }}
{{- $_ := set $state "sentinel_password" $r.sentinel.password }}
{{- end }}
{{- else if eq (default "standalone" $r.mode) "cluster" }}
{{- $_ := set $state "redis_mode" "cluster" }}
{{- end }}
{{- end }}

{{/*
The names the Service answers to in the cluster: the gateway refuses a request sent to a name it does
not know (DNS rebinding, docs/security.md), so they join gateway.server.allowed_hosts.
*/}}
{{- define "llm-gateway.serviceHosts" -}}
{{- $name := include "llm-gateway.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.%s" $name $ns .Values.clusterDomain) | toYaml }}
{{- end }}

{{/*
The gateway config as rendered into the ConfigMap: .Values.gateway, with state.backend and
state.redis_url set from the redis values when they name a Redis, and the Service's names added to
server.allowed_hosts.
*/}}
{{- define "llm-gateway.config" -}}
{{- $cfg := deepCopy .Values.gateway }}
{{- $server := deepCopy (default (dict) $cfg.server) }}
{{- $hosts := concat (default (list) $server.allowed_hosts) (include "llm-gateway.serviceHosts" . | fromYamlArray) }}
{{- $_ := set $server "allowed_hosts" (uniq $hosts) }}
{{- $_ := set $cfg "server" $server }}
{{- $state := deepCopy (default (dict) $cfg.state) }}
{{- $url := include "llm-gateway.redisUrl" . }}
{{- if $url }}
{{- $_ := set $state "backend" "redis" }}
{{- $_ := set $state "redis_url" $url }}
{{- end }}
{{- include "llm-gateway.redisTopology" (dict "Values" .Values "state" $state) }}
{{- $_ := set $cfg "state" $state }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Checks that need more than a JSON schema; each failure names the value to change.
*/}}
{{- define "llm-gateway.validate" -}}
{{- if and .Values.redis.enabled .Values.redis.url }}
{{- fail "redis.enabled and redis.url are mutually exclusive: use url for an existing Redis, enabled for a trial one" }}
{{- end }}
{{- $mode := default "standalone" .Values.redis.mode }}
{{- if and .Values.redis.enabled (ne $mode "standalone") }}
{{- fail (printf "redis.mode %s needs an existing Redis: the in-chart trial Redis (redis.enabled) is standalone" $mode) }}
{{- end }}
{{- if and (eq $mode "sentinel") (not .Values.redis.sentinel.hosts) }}
{{- fail "redis.mode is sentinel: list the sentinels in redis.sentinel.hosts (Bitnami: <release>-redis.<namespace>:26379)" }}
{{- end }}
{{- if and (eq $mode "cluster") (not .Values.redis.url) }}
{{- fail "redis.mode is cluster: set redis.url to a seed node of the cluster" }}
{{- end }}
{{- $state := default (dict) .Values.gateway.state }}
{{- if and (eq (toString (default "memory" $state.backend)) "redis") (not (include "llm-gateway.redisUrl" .)) (not $state.redis_url) (ne $mode "sentinel") }}
{{- fail "gateway.state.backend is redis but no Redis is named: set redis.url (or redis.enabled for a trial)" }}
{{- end }}
{{- range $i, $m := (.Values.gateway.models | default list) }}
{{- range $j, $d := ($m.deployments | default list) }}
{{- if and $d.api_key (not (regexMatch "^\\$\\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\\}$" (toString $d.api_key))) }}
{{- fail (printf "gateway.models[%d].deployments[%d].api_key must be an environment reference such as \"${OPENAI_API_KEY}\" filled from existingSecret; the chart never puts a provider key into a ConfigMap" $i $j) }}
{{- end }}
{{- end }}
{{- end }}
{{- $drain := dig "server" "drain_timeout_s" 30 .Values.gateway | float64 }}
{{- $longest := include "llm-gateway.longestRequestSeconds" . | int }}
{{- if and (lt $drain (float64 $longest)) (not .Values.lifecycle.allowDrainShorterThanRequests) }}
{{- fail (printf "gateway.server.drain_timeout_s (%v) is shorter than the longest request a model allows (%d s from timeouts.total_ms): a rollout would cut streams. Raise drain_timeout_s, lower total_ms, or set lifecycle.allowDrainShorterThanRequests=true" $drain $longest) }}
{{- end }}
{{- $_ := include "llm-gateway.terminationGracePeriodSeconds" . }}
{{- end }}

{{/*
Environment shared by the gateway container and the warm-up Job.
*/}}
{{- define "llm-gateway.env" -}}
{{- if .Values.region }}
- name: GATEWAY_REGION
  value: {{ .Values.region | quote }}
{{- else if .Values.regionFromAnnotation }}
- name: GATEWAY_REGION
  valueFrom:
    fieldRef:
      fieldPath: {{ printf "metadata.annotations['%s']" .Values.regionFromAnnotation }}
{{- end }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm-gateway.envFrom" -}}
{{- if .Values.existingSecret }}
- secretRef:
    name: {{ .Values.existingSecret }}
{{- end }}
{{- with .Values.envFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Port of the OTLP collector: the one in gateway.tracing.otlp_endpoint, else the URL scheme's default
when it names a scheme, else networkPolicy.egress.tracing.port.
*/}}
{{- define "llm-gateway.otlpPort" -}}
{{- $otlp := toString (dig "tracing" "otlp_endpoint" "" .Values.gateway) }}
{{- $port := "" }}
{{- if $otlp }}
{{- $u := urlParse $otlp }}
{{- $hostPort := splitList ":" (get $u "host") }}
{{- if gt (len $hostPort) 1 }}{{ $port = last $hostPort }}
{{- else if eq (get $u "scheme") "https" }}{{ $port = "443" }}
{{- else if eq (get $u "scheme") "http" }}{{ $port = "80" }}
{{- end }}
{{- end }}
{{- $port | default .Values.networkPolicy.egress.tracing.port }}
{{- end }}
