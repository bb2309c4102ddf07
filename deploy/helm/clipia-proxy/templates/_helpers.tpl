{{/*
Names and labels. `labels` is for metadata, `selectorLabels` for selectors; they are never mixed.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "clipia-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object name prefix, cut to 63 characters (a DNS label). */}}
{{- define "clipia-proxy.fullname" -}}
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

{{/* fullname-SUFFIX, still at most 63 characters. Call with (dict "root" $ "suffix" "data"). */}}
{{- define "clipia-proxy.suffixedName" -}}
{{- $prefix := include "clipia-proxy.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix .suffix }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "clipia-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "clipia-proxy.labels" -}}
helm.sh/chart: {{ include "clipia-proxy.chart" . }}
{{ include "clipia-proxy.selectorLabels" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades, never extended. */}}
{{- define "clipia-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clipia-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "clipia-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clipia-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "clipia-proxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Facts derived from values, in one place.
*/}}

{{- define "clipia-proxy.isSidecar" -}}
{{- if eq .Values.mode "sidecar" }}true{{ end }}
{{- end }}

{{/* "true" when the central gateway is a StatefulSet (a claim per replica for its files). */}}
{{- define "clipia-proxy.isStatefulSet" -}}
{{- if and (eq .Values.workload "StatefulSet") (not (include "clipia-proxy.isSidecar" .)) }}true{{ end }}
{{- end }}

{{/* "true" when the environment: test teams' sandbox key comes from a Secret. */}}
{{- define "clipia-proxy.hasTestKey" -}}
{{- if or .Values.clipia.testExistingSecret .Values.clipia.testApiKey }}true{{ end }}
{{- end }}

{{- define "clipia-proxy.backend" -}}
{{- default "sqlite" (dig "store" "backend" "" .Values.config) }}
{{- end }}

{{- define "clipia-proxy.port" -}}
{{- $server := default (dict) .Values.config.server }}
{{- if hasKey $server "port" }}{{ $server.port | int }}{{ else }}8080{{ end }}
{{- end }}

{{- define "clipia-proxy.adminPort" -}}
{{- $server := default (dict) .Values.config.server }}
{{- if hasKey $server "admin_port" }}{{ $server.admin_port | int }}{{ else }}9090{{ end }}
{{- end }}

{{/* server.shutdown_grace_seconds rounded up to whole seconds (the gateway's default is 25). */}}
{{- define "clipia-proxy.shutdownGraceSeconds" -}}
{{- $server := default (dict) .Values.config.server }}
{{- if hasKey $server "shutdown_grace_seconds" }}{{ ceil $server.shutdown_grace_seconds | int }}{{ else }}25{{ end }}
{{- end }}

{{/* The smallest safe pod grace: preStop + shutdown_grace_seconds + headroom. */}}
{{- define "clipia-proxy.minTerminationGracePeriodSeconds" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (include "clipia-proxy.shutdownGraceSeconds" . | int) (int .Values.lifecycle.terminationGraceHeadroomSeconds) }}
{{- end }}

{{- define "clipia-proxy.terminationGracePeriodSeconds" -}}
{{- if .Values.lifecycle.terminationGracePeriodSeconds }}
{{- .Values.lifecycle.terminationGracePeriodSeconds | int }}
{{- else }}
{{- include "clipia-proxy.minTerminationGracePeriodSeconds" . }}
{{- end }}
{{- end }}

{{/* How many gateway processes share the store (written to store.replicas). */}}
{{- define "clipia-proxy.storeReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas | int }}{{ else }}{{ .Values.replicaCount | int }}{{ end }}
{{- end }}

{{/* The chart's own Secret: the Clipia key unless existingSecret, the Redis URL unless redis.existingSecret. */}}
{{- define "clipia-proxy.secretData" -}}
{{- if and (not .Values.clipia.existingSecret) .Values.clipia.apiKey }}
clipia-api-key: {{ .Values.clipia.apiKey | b64enc | quote }}
{{- end }}
{{- if and (not .Values.clipia.testExistingSecret) .Values.clipia.testApiKey }}
clipia-test-api-key: {{ .Values.clipia.testApiKey | b64enc | quote }}
{{- end }}
{{- if and (eq (include "clipia-proxy.backend" .) "redis") (not .Values.redis.existingSecret) .Values.redis.url }}
redis-url: {{ .Values.redis.url | b64enc | quote }}
{{- end }}
{{- if and (not .Values.postgres.existingSecret) .Values.postgres.dsn }}
ledger-dsn: {{ .Values.postgres.dsn | b64enc | quote }}
{{- end }}
{{- end }}

{{/* "true" when the ledger is in PostgreSQL (postgres.dsn or postgres.existingSecret). */}}
{{- define "clipia-proxy.hasPostgres" -}}
{{- if or .Values.postgres.dsn .Values.postgres.existingSecret }}true{{ end }}
{{- end }}

{{- define "clipia-proxy.postgresSecretRef" -}}
{{- if .Values.postgres.existingSecret -}}
name: {{ .Values.postgres.existingSecret }}
key: {{ .Values.postgres.existingSecretKey }}
{{- else -}}
name: {{ include "clipia-proxy.fullname" . }}
key: ledger-dsn
{{- end }}
{{- end }}

{{- define "clipia-proxy.clipiaSecretRef" -}}
{{- if .Values.clipia.existingSecret -}}
name: {{ .Values.clipia.existingSecret }}
key: {{ .Values.clipia.existingSecretKey }}
{{- else -}}
name: {{ include "clipia-proxy.fullname" . }}
key: clipia-api-key
{{- end }}
{{- end }}

{{- define "clipia-proxy.clipiaTestSecretRef" -}}
{{- if .Values.clipia.testExistingSecret -}}
name: {{ .Values.clipia.testExistingSecret }}
key: {{ .Values.clipia.testExistingSecretKey }}
{{- else -}}
name: {{ include "clipia-proxy.fullname" . }}
key: clipia-test-api-key
{{- end }}
{{- end }}

{{- define "clipia-proxy.redisSecretRef" -}}
{{- if .Values.redis.existingSecret -}}
name: {{ .Values.redis.existingSecret }}
key: {{ .Values.redis.existingSecretKey }}
{{- else -}}
name: {{ include "clipia-proxy.fullname" . }}
key: redis-url
{{- end }}
{{- end }}

{{/*
The gateway's config.yaml: the values' `config` plus what the pod dictates. Policy only:
the Clipia key and the Redis URL are named (env vars), never written here.
*/}}
{{- define "clipia-proxy.config" -}}
{{- $v := .Values.config }}
{{- $sidecar := include "clipia-proxy.isSidecar" . }}
{{- $backend := include "clipia-proxy.backend" . }}
{{- $server := deepCopy (default (dict) $v.server) }}
{{- if $sidecar }}
{{- $_ := set $server "host" "127.0.0.1" }}
{{- if and .Values.metrics.enabled (not (hasKey $server "admin_host")) }}
{{- $_ := set $server "admin_host" "0.0.0.0" }}
{{- end }}
{{- end }}
{{- if .Values.adminToken.existingSecret }}
{{- $_ := set $server "admin_token_env" "CLIPIA_ADMIN_TOKEN" }}
{{- end }}
{{- $upstream := deepCopy (default (dict) $v.upstream) }}
{{- $_ := set $upstream "api_key_env" "CLIPIA_API_KEY" }}
{{- $_ := unset $upstream "api_key_file" }}
{{- if include "clipia-proxy.hasTestKey" . }}
{{- $_ := set $upstream "test_api_key_env" "CLIPIA_TEST_API_KEY" }}
{{- end }}
{{- if .Values.egressProxy.existingSecret }}
{{- $_ := set $upstream "trust_env" true }}
{{- end }}
{{- $store := deepCopy (default (dict) $v.store) }}
{{- $_ := set $store "backend" $backend }}
{{- if eq $backend "sqlite" }}
{{- $_ := set $store "sqlite_path" "/var/lib/clipia-proxy/clipia-proxy.db" }}
{{- end }}
{{- if eq $backend "redis" }}
{{- $_ := set $store "redis_url_env" "REDIS_URL" }}
{{- end }}
{{- /* Per-replica files (outage journal, key usage snapshots) on the data volume. */}}
{{- $_ := set $store "journal_path" "/var/lib/clipia-proxy/clipia-proxy-outage.jsonl" }}
{{- if not $sidecar }}
{{- $_ := set $store "replicas" (include "clipia-proxy.storeReplicas" . | int) }}
{{- end }}
{{- $auth := deepCopy (default (dict) $v.auth) }}
{{- if $sidecar }}
{{- $_ := set $auth "mode" "fixed" }}
{{- end }}
{{- if not $auth.team }}
{{- $_ := unset $auth "team" }}
{{- end }}
{{- $config := dict "server" $server "upstream" $upstream "store" $store "auth" $auth }}
{{- $ledger := deepCopy (default (dict) $v.ledger) }}
{{- if include "clipia-proxy.hasPostgres" . }}
{{- $_ := set $ledger "backend" "postgres" }}
{{- $_ := set $ledger "postgres_dsn_env" "CLIPIA_LEDGER_DSN" }}
{{- end }}
{{- if $ledger }}
{{- $_ := set $config "ledger" $ledger }}
{{- end }}
{{- $_ := set $config "catalog" (default (dict) $v.catalog) }}
{{- $accounting := deepCopy (default (dict) $v.accounting) }}
{{- $_ := set $accounting "key_usage_path" "/var/lib/clipia-proxy/clipia-proxy-key-usage.jsonl" }}
{{- $_ := set $config "accounting" $accounting }}
{{- $attribution := deepCopy (default (dict) $v.attribution) }}
{{- if .Values.endUserHashKey.existingSecret }}
{{- $_ := set $attribution "end_user_hash_key_env" "CLIPIA_PROXY_USER_HASH_KEY" }}
{{- end }}
{{- if $attribution }}
{{- $_ := set $config "attribution" $attribution }}
{{- end }}
{{- with $v.mcp }}
{{- $_ := set $config "mcp" . }}
{{- end }}
{{- $_ := set $config "logging" (default (dict) $v.logging) }}
{{- $_ := set $config "teams" (default (list) $v.teams) }}
{{- toYaml $config }}
{{- end }}

{{/*
Probes on the admin port, over HTTP. A sidecar's admin port is on the pod network only with
metrics.enabled (port clipia-admin); without it, it listens on 127.0.0.1, which the kubelet
cannot reach, so it is probed from inside with the image's python.
Call with (dict "root" $ "sidecar" BOOL "path" "/readyz" "probe" .Values.readinessProbe).
*/}}
{{- define "clipia-proxy.probe" -}}
{{- $port := include "clipia-proxy.adminPort" .root }}
{{- if and .sidecar .root.Values.metrics.enabled }}
httpGet:
  path: {{ .path }}
  port: clipia-admin
{{- else if .sidecar }}
exec:
  command:
    - python
    - -c
    - {{ printf "import urllib.request; urllib.request.urlopen('http://127.0.0.1:%s%s', timeout=%d)" $port .path (int (default 2 .probe.timeoutSeconds)) | quote }}
{{- else }}
httpGet:
  path: {{ .path }}
  port: admin
{{- end }}
{{- range $key := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "failureThreshold" "successThreshold" }}
{{- if hasKey $.probe $key }}
{{ $key }}: {{ index $.probe $key | int }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The gateway container, shared by the Deployment and the sidecar snippet.
Call with (dict "root" $ "sidecar" BOOL).
*/}}
{{- define "clipia-proxy.container" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $sidecar := .sidecar }}
{{- $backend := include "clipia-proxy.backend" $root }}
name: clipia-proxy
image: {{ include "clipia-proxy.image" $root | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  - serve
  - --config
  - /etc/clipia-proxy/config.yaml
{{- if not $sidecar }}
ports:
  - name: http
    containerPort: {{ include "clipia-proxy.port" $root }}
    protocol: TCP
  - name: admin
    containerPort: {{ include "clipia-proxy.adminPort" $root }}
    protocol: TCP
{{- else if $v.metrics.enabled }}
ports:
  - name: clipia-admin
    containerPort: {{ include "clipia-proxy.adminPort" $root }}
    protocol: TCP
{{- end }}
env:
  - name: CLIPIA_API_KEY
    valueFrom:
      secretKeyRef:
        {{- include "clipia-proxy.clipiaSecretRef" $root | nindent 8 }}
  {{- with include "clipia-proxy.adminTokenEnv" $root | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with include "clipia-proxy.optionalSecretEnv" $root | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- if eq $backend "redis" }}
  - name: REDIS_URL
    valueFrom:
      secretKeyRef:
        {{- include "clipia-proxy.redisSecretRef" $root | nindent 8 }}
  {{- end }}
  {{- if include "clipia-proxy.hasPostgres" $root }}
  - name: CLIPIA_LEDGER_DSN
    valueFrom:
      secretKeyRef:
        {{- include "clipia-proxy.postgresSecretRef" $root | nindent 8 }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if $v.startupProbe.enabled }}
startupProbe:
  {{- include "clipia-proxy.probe" (dict "root" $root "sidecar" $sidecar "path" "/healthz" "probe" $v.startupProbe) | trim | nindent 2 }}
{{- end }}
{{- if $v.livenessProbe.enabled }}
livenessProbe:
  {{- include "clipia-proxy.probe" (dict "root" $root "sidecar" $sidecar "path" "/healthz" "probe" $v.livenessProbe) | trim | nindent 2 }}
{{- end }}
{{- if $v.readinessProbe.enabled }}
readinessProbe:
  {{- include "clipia-proxy.probe" (dict "root" $root "sidecar" $sidecar "path" "/readyz" "probe" $v.readinessProbe) | trim | nindent 2 }}
{{- end }}
{{- if gt (int $v.lifecycle.preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command:
        - sleep
        - {{ $v.lifecycle.preStopSleepSeconds | int | quote }}
{{- end }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
volumeMounts:
  - name: clipia-proxy-config
    mountPath: /etc/clipia-proxy
    readOnly: true
  - name: clipia-proxy-tmp
    mountPath: /tmp
  # The SQLite ledger (backend sqlite) and the per-replica files: outage journal, key usage.
  - name: clipia-proxy-data
    mountPath: /var/lib/clipia-proxy
{{- end }}

{{/* The init container applying the PostgreSQL ledger's migrations (central mode). */}}
{{- define "clipia-proxy.migrateContainer" -}}
{{- $v := .Values }}
name: clipia-proxy-migrate
image: {{ include "clipia-proxy.image" . | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  - migrate
  - --config
  - /etc/clipia-proxy/config.yaml
env:
  - name: CLIPIA_API_KEY
    valueFrom:
      secretKeyRef:
        {{- include "clipia-proxy.clipiaSecretRef" . | nindent 8 }}
  {{- with include "clipia-proxy.adminTokenEnv" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with include "clipia-proxy.optionalSecretEnv" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  - name: CLIPIA_LEDGER_DSN
    valueFrom:
      secretKeyRef:
        {{- include "clipia-proxy.postgresSecretRef" . | nindent 8 }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
volumeMounts:
  - name: clipia-proxy-config
    mountPath: /etc/clipia-proxy
    readOnly: true
  - name: clipia-proxy-tmp
    mountPath: /tmp
{{- end }}

{{/* The volumes the container mounts (the config as a directory, never subPath, so updates reach it). */}}
{{- define "clipia-proxy.volumes" -}}
{{- $root := .root }}
- name: clipia-proxy-config
  configMap:
    name: {{ include "clipia-proxy.fullname" $root }}
- name: clipia-proxy-tmp
  emptyDir:
    sizeLimit: {{ $root.Values.tmpSizeLimit }}
{{- $sqlite := and (not .sidecar) (eq (include "clipia-proxy.backend" $root) "sqlite") }}
{{- if and (include "clipia-proxy.isStatefulSet" $root) $root.Values.persistence.enabled (not .sidecar) }}
{{- /* clipia-proxy-data: the StatefulSet's volumeClaimTemplates, a claim per replica. */}}
{{- else if and $sqlite $root.Values.persistence.enabled }}
- name: clipia-proxy-data
  persistentVolumeClaim:
    claimName: {{ default (include "clipia-proxy.suffixedName" (dict "root" $root "suffix" "data")) $root.Values.persistence.existingClaim }}
{{- else if $sqlite }}
- name: clipia-proxy-data
  emptyDir: {}
{{- else }}
# Survives container restarts (the journal is replayed on start), not the pod's deletion.
- name: clipia-proxy-data
  emptyDir:
    sizeLimit: {{ $root.Values.stateVolume.sizeLimit }}
{{- end }}
{{- end }}

{{/*
Sidecar mode, for app charts. With this chart as a dependency, pass the subchart's context:
  containers:
    - {{- include "clipia-proxy.sidecarContainer" (index .Subcharts "clipia-proxy") | nindent 6 }}
  volumes:
    {{- include "clipia-proxy.sidecarVolumes" (index .Subcharts "clipia-proxy") | nindent 4 }}
  annotations:
    {{- include "clipia-proxy.sidecarPodAnnotations" (index .Subcharts "clipia-proxy") | nindent 4 }}
*/}}
{{- define "clipia-proxy.sidecarContainer" -}}
{{- include "clipia-proxy.container" (dict "root" . "sidecar" true) | trim }}
{{- end }}

{{- define "clipia-proxy.sidecarVolumes" -}}
{{- include "clipia-proxy.volumes" (dict "root" . "sidecar" true) | trim }}
{{- end }}

{{/* Rolls the app pods when the gateway's config or the chart's Secret changes. */}}
{{- define "clipia-proxy.sidecarPodAnnotations" -}}
checksum/clipia-proxy-config: {{ include "clipia-proxy.restartConfig" . | sha256sum }}
checksum/clipia-proxy-secret: {{ include "clipia-proxy.secretData" . | sha256sum }}
{{- end }}

{{/*
Refuse values that cannot work, listing every problem at once.
*/}}
{{- define "clipia-proxy.validateValues" -}}
{{- $v := .Values }}
{{- $problems := list }}
{{- $backend := include "clipia-proxy.backend" . }}
{{- $sidecar := include "clipia-proxy.isSidecar" . }}
{{- $auth := default (dict) $v.config.auth }}
{{- $team := default "" $auth.team }}
{{- $teamIds := list }}
{{- range $index, $t := $v.config.teams }}
{{- $teamIds = append $teamIds (toString $t.id) }}
{{- $caps := default (dict) $t.caps }}
{{- if or (hasKey $caps "false") (hasKey $caps "true") }}
{{- $problems = append $problems (printf "config.teams[%d].caps: quote the key n (\"n\": 1); YAML reads a bare n as false" $index) }}
{{- end }}
{{- end }}
{{- $testTeams := list }}
{{- range $index, $t := $v.config.teams }}
{{- if eq (toString (default "live" $t.environment)) "test" }}
{{- $testTeams = append $testTeams (toString $t.id) }}
{{- end }}
{{- end }}
{{- if and $testTeams (not (include "clipia-proxy.hasTestKey" .)) }}
{{- $problems = append $problems (printf "config.teams %s have environment: test and need Clipia's sandbox key: set clipia.testExistingSecret (or clipia.testApiKey)" (join ", " $testTeams)) }}
{{- end }}
{{- range $key := list "upstream.api_key_env" "upstream.api_key_file" "upstream.test_api_key_env" "store.sqlite_path" "store.redis_url_env" "store.replicas" "store.journal_path" "ledger.backend" "ledger.postgres_dsn_env" "server.admin_token_env" "accounting.key_usage_path" "attribution.end_user_hash_key_env" }}
{{- $parts := splitList "." $key }}
{{- if hasKey (default (dict) (index $v.config (first $parts))) (last $parts) }}
{{- $problems = append $problems (printf "config.%s is set by the chart (from clipia.*, redis.*, postgres.*, adminToken.*, endUserHashKey.*, the data volume and the replica count); remove it" $key) }}
{{- end }}
{{- end }}
{{- if regexMatch "clipia_(live|test)_|cpx_[A-Za-z0-9]|Bearer\\s" (toYaml $v.config) }}
{{- $problems = append $problems "config holds something that looks like a secret (a Clipia key, a team key or a Bearer token); the ConfigMap is policy only: use clipia.existingSecret, and sha256 hashes for team keys" }}
{{- end }}
{{- $upstream := default (dict) $v.config.upstream }}
{{- if and $upstream.proxy_url (regexMatch "^[a-z]+://[^/]*@" (toString $upstream.proxy_url)) }}
{{- $problems = append $problems "config.upstream.proxy_url carries a user and password: put the proxy URL in a Secret and name it with egressProxy.existingSecret" }}
{{- end }}
{{- if and $v.egressProxy.existingSecret $upstream.proxy_url }}
{{- $problems = append $problems "egressProxy.existingSecret and config.upstream.proxy_url both name the egress proxy; keep one" }}
{{- end }}
{{- if and $v.egressProxy.existingSecret (hasKey $upstream "trust_env") (not $upstream.trust_env) }}
{{- $problems = append $problems "egressProxy.existingSecret needs config.upstream.trust_env (the chart sets it true); remove trust_env: false" }}
{{- end }}
{{- if and (eq (toString $v.workload) "StatefulSet") $v.persistence.existingClaim }}
{{- $problems = append $problems "workload StatefulSet gives each replica its own claim: persistence.existingClaim cannot be shared; remove it" }}
{{- end }}
{{- if and (eq (toString $v.workload) "StatefulSet") $sidecar }}
{{- $problems = append $problems "workload StatefulSet needs mode central: a sidecar runs in its app's pods" }}
{{- end }}
{{- if not (has $v.mode (list "central" "sidecar")) }}
{{- $problems = append $problems (printf "mode must be central or sidecar (got %q)" (toString $v.mode)) }}
{{- end }}
{{- if not (has $backend (list "sqlite" "redis" "memory")) }}
{{- $problems = append $problems (printf "config.store.backend must be sqlite, redis or memory (got %q)" $backend) }}
{{- end }}
{{- if not (or $v.clipia.existingSecret $v.clipia.apiKey) }}
{{- $problems = append $problems "the Clipia key is missing: set clipia.existingSecret (a Secret you created) or clipia.apiKey" }}
{{- end }}
{{- if $sidecar }}
{{- if ne $backend "redis" }}
{{- $problems = append $problems (printf "mode sidecar needs config.store.backend redis: every sidecar and replica of a team must share one budget (got %s)" $backend) }}
{{- end }}
{{- if not $team }}
{{- $problems = append $problems "mode sidecar needs config.auth.team: the team every request of the pod belongs to" }}
{{- end }}
{{- if $v.serviceMonitor.enabled }}
{{- $problems = append $problems "serviceMonitor.enabled needs mode central: sidecars have no Service (scrape them with a PodMonitor)" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- $problems = append $problems "autoscaling.enabled needs mode central: sidecars scale with their app" }}
{{- end }}
{{- if $v.networkPolicy.enabled }}
{{- $problems = append $problems "networkPolicy.enabled needs mode central: a sidecar shares its app pod's policy" }}
{{- end }}
{{- else }}
{{- if and (eq $backend "sqlite") (gt (int $v.replicaCount) 1) (not $v.autoscaling.enabled) }}
{{- $problems = append $problems (printf "config.store.backend sqlite serves one replica only (replicaCount is %d); use redis" (int $v.replicaCount)) }}
{{- end }}
{{- if and (eq $backend "memory") (gt (int $v.replicaCount) 1) (not $v.autoscaling.enabled) }}
{{- $problems = append $problems (printf "config.store.backend memory serves one replica only (replicaCount is %d); use redis" (int $v.replicaCount)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (ne $backend "redis") }}
{{- $problems = append $problems (printf "autoscaling.enabled needs config.store.backend redis: %s serves one replica only" $backend) }}
{{- end }}
{{- if and (eq (default "keys" $auth.mode) "fixed") (not $team) }}
{{- $problems = append $problems "config.auth.mode fixed needs config.auth.team: the team every request belongs to" }}
{{- end }}
{{- if and $v.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- $problems = append $problems "serviceMonitor.enabled needs metrics.enabled: the ServiceMonitor scrapes the admin port the Service exposes" }}
{{- end }}
{{- end }}
{{- if and (eq $backend "redis") (not (or $v.redis.url $v.redis.existingSecret)) }}
{{- $problems = append $problems "config.store.backend redis needs redis.url or redis.existingSecret (the chart never deploys Redis)" }}
{{- end }}
{{- if and (eq $backend "redis") (not (include "clipia-proxy.hasPostgres" .)) }}
{{- $problems = append $problems "config.store.backend redis needs the PostgreSQL ledger (Redis keeps no records): set postgres.dsn or postgres.existingSecret" }}
{{- end }}
{{- if and $team (not $sidecar) (ne (default "keys" $auth.mode) "fixed") }}
{{- $problems = append $problems "config.auth.team is only used with config.auth.mode fixed (or mode sidecar)" }}
{{- end }}
{{- if and $team (not (has (toString $team) $teamIds)) }}
{{- $problems = append $problems (printf "config.auth.team %q is not the id of any config.teams entry" (toString $team)) }}
{{- end }}
{{- if eq (include "clipia-proxy.port" .) (include "clipia-proxy.adminPort" .) }}
{{- $problems = append $problems "config.server.admin_port must differ from config.server.port" }}
{{- end }}
{{- $minGrace := include "clipia-proxy.minTerminationGracePeriodSeconds" . | int }}
{{- $grace := include "clipia-proxy.terminationGracePeriodSeconds" . | int }}
{{- if lt $grace $minGrace }}
{{- $problems = append $problems (printf "lifecycle.terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + config.server.shutdown_grace_seconds + terminationGraceHeadroomSeconds (%d), or the kubelet kills streams mid-drain" $grace $minGrace) }}
{{- end }}
{{- if $problems }}
{{- fail (printf "\n\nclipia-proxy: invalid values:\n  - %s\n" (join "\n  - " $problems)) }}
{{- end }}
{{- end }}

{{/*
The config sections a hot reload cannot apply (server, upstream, store): their checksum rolls
the pods; everything else reaches running pods through the mounted ConfigMap and the reload.
*/}}
{{- define "clipia-proxy.restartConfig" -}}
{{- $config := include "clipia-proxy.config" . | fromYaml -}}
{{- pick $config "server" "upstream" "store" | toYaml -}}
{{- end -}}

{{/* The sandbox key, the egress proxy and the end-user hash key, each when its Secret is set. */}}
{{- define "clipia-proxy.optionalSecretEnv" -}}
{{- if include "clipia-proxy.hasTestKey" . }}
- name: CLIPIA_TEST_API_KEY
  valueFrom:
    secretKeyRef:
      {{- include "clipia-proxy.clipiaTestSecretRef" . | nindent 6 }}
{{- end }}
{{- with .Values.egressProxy.existingSecret }}
{{- range $name := list "HTTPS_PROXY" "HTTP_PROXY" }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.egressProxy.existingSecret }}
      key: {{ $.Values.egressProxy.key }}
{{- end }}
{{- with $.Values.egressProxy.noProxy }}
- name: NO_PROXY
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.endUserHashKey.existingSecret }}
- name: CLIPIA_PROXY_USER_HASH_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.endUserHashKey.key }}
{{- end }}
{{- end }}

{{/* The admin token's env var (server.admin_token_env), when adminToken.existingSecret is set. */}}
{{- define "clipia-proxy.adminTokenEnv" -}}
{{- with .Values.adminToken.existingSecret }}
- name: CLIPIA_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.adminToken.key }}
{{- end }}
{{- end }}
