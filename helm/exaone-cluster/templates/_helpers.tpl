{{/* Names and labels. */}}
{{- define "exaone.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "exaone.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "exaone.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Redis password Secret's name (its key: redis.password.key). */}}
{{- define "exaone.redisSecret" -}}
{{- default (printf "%s-redis" (include "exaone.fullname" .)) .Values.redis.password.existingSecret -}}
{{- end -}}

{{/* Whether the chart creates the Redis password Secret: for the bundled Redis (with
redis.password.value, or a generated password), or for an external Redis with a value. */}}
{{- define "exaone.redisSecretCreated" -}}
{{- if and (not .Values.redis.password.existingSecret) (or .Values.redis.enabled .Values.redis.password.value) -}}
true
{{- end -}}
{{- end -}}

{{/* Whether the Ray pods get a Redis password (EXAONE_REDIS_PASSWORD) from a Secret. */}}
{{- define "exaone.redisPasswordSet" -}}
{{- if or .Values.redis.password.existingSecret (include "exaone.redisSecretCreated" .) -}}
true
{{- end -}}
{{- end -}}

{{/* The prefix cache MAC key Secret's name (its key: prefixCache.macKey.key). */}}
{{- define "exaone.macKeySecret" -}}
{{- default (printf "%s-prefix-cache" (include "exaone.fullname" .)) .Values.prefixCache.macKey.existingSecret -}}
{{- end -}}

{{/* The Ray auth token Secret's name. KubeRay reads the token from its key "auth_token" (for
its own dashboard requests) and sets RAY_AUTH_TOKEN from it in every Ray container. */}}
{{- define "exaone.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "exaone.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{/* A value for a chart-made Secret's data, base64: `value` if given, else the one the Secret
already holds in the cluster (`lookup`: kept across upgrades), else `length` random
alphanumerics. (`helm template` and --dry-run cannot look up: they show a new random value.) */}}
{{- define "exaone.secretData" -}}
{{- if .value -}}
{{- .value | b64enc -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- $data := dig "data" (dict) (default (dict) $existing) -}}
{{- $old := index $data .key -}}
{{- if $old -}}
{{- $old -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where the gRPC TLS Secret (grpc.tls.secretName) is mounted in the head's Ray container. */}}
{{- define "exaone.grpcTlsDir" -}}
/etc/exaone/grpc-tls
{{- end -}}

{{/* Pod security context: the values' podSecurityContext, with the RuntimeDefault seccomp
profile unless it names one. */}}
{{- define "exaone.podSecurityContext" -}}
{{- $context := deepCopy (default (dict) .) -}}
{{- if not $context.seccompProfile -}}
{{- $_ := set $context "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- end -}}
{{- toYaml $context -}}
{{- end -}}

{{/* Security context of every container the chart renders: read-only root filesystem (writes
go to emptyDir volumes), no privilege escalation, no capabilities. */}}
{{- define "exaone.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* XDG cache and config directories under /tmp (an emptyDir: the root filesystem is
read-only). */}}
{{- define "exaone.xdgEnv" -}}
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: XDG_CONFIG_HOME
  value: /tmp/.config
{{- end -}}

{{/* Environment that keeps every cache of a Ray container under /tmp (an emptyDir; the root
filesystem is read-only): our C kernels' build cache (replicas/kernels/cpu.py), Triton's
kernel cache, the CUDA driver's JIT cache, and everything that follows XDG (Hugging Face,
vLLM, torch). */}}
{{- define "exaone.cacheEnv" -}}
{{ include "exaone.xdgEnv" . }}
- name: EXAONE_KERNEL_CACHE
  value: /tmp/.cache/exaone-cluster/kernels
- name: TRITON_HOME
  value: /tmp
- name: TRITON_CACHE_DIR
  value: /tmp/.triton/cache
- name: CUDA_CACHE_PATH
  value: /tmp/.nv/ComputeCache
{{- end -}}

{{/* The prefix cache's Redis URL (no password: pods read it from the Secret). */}}
{{- define "exaone.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "exaone.fullname" .) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The Ray custom resource that only the head pod offers: Router replicas ask for it, so they
(and their client-facing gRPC server) run on the head, where the gRPC Service points. */}}
{{- define "exaone.ingressResource" -}}
exaone_ingress
{{- end -}}

{{/* exaone_ingress units on the head pod; each Router replica takes 1 by default, so up to this
many Router replicas fit there (they share the gRPC port with SO_REUSEPORT). */}}
{{- define "exaone.ingressSlots" -}}
1000
{{- end -}}

{{/* ClusterConfig for build_app: the values' config with model_path, the Redis URL and the
Router's gRPC and OpenAI HTTP servers (listening on every address of the head pod, on grpc.port
and openai.port, placed on the head by its custom resource; with grpc.tls.secretName, serving TLS
with the mounted tls.crt and tls.key). Router fields set in config.router win over these
defaults, except grpc_port and openai_port, which must equal grpc.port and openai.port (the
container ports, Services and NetworkPolicy), openai_api, which openai.enabled sets, and
tls_cert_file / tls_key_file, which go with grpc.tls.secretName. */}}
{{- define "exaone.clusterConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "model_path" .Values.model.mountPath -}}
{{- $router := default (dict) $config.router -}}
{{- if and (hasKey $router "grpc_port") (ne (int $router.grpc_port) (int .Values.grpc.port)) -}}
{{- fail (printf "config.router.grpc_port (%v) must equal grpc.port (%v), or be left unset: the head container's port, the gRPC Service and the NetworkPolicy use grpc.port" $router.grpc_port .Values.grpc.port) -}}
{{- end -}}
{{- if and (hasKey $router "openai_port") (ne (int $router.openai_port) (int .Values.openai.port)) -}}
{{- fail (printf "config.router.openai_port (%v) must equal openai.port (%v), or be left unset: the head container's port, the OpenAI Service and the NetworkPolicy use openai.port" $router.openai_port .Values.openai.port) -}}
{{- end -}}
{{- if and (hasKey $router "openai_api") (ne $router.openai_api .Values.openai.enabled) -}}
{{- fail "config.router.openai_api is set by openai.enabled: leave it unset" -}}
{{- end -}}
{{- $routerDefaults := dict
    "grpc_host" "0.0.0.0"
    "grpc_port" (int .Values.grpc.port)
    "openai_api" .Values.openai.enabled
    "openai_port" (int .Values.openai.port)
    "resources" (dict (include "exaone.ingressResource" .) 1) -}}
{{- range $key, $value := $routerDefaults -}}
{{- if not (hasKey $router $key) -}}
{{- $_ := set $router $key $value -}}
{{- end -}}
{{- end -}}
{{- with .Values.grpc.tls.secretName -}}
{{- if or $router.tls_cert_file $router.tls_key_file -}}
{{- fail "grpc.tls.secretName sets config.router.tls_cert_file and tls_key_file (to the mounted Secret's tls.crt and tls.key): leave them unset" -}}
{{- end -}}
{{- $dir := include "exaone.grpcTlsDir" $ -}}
{{- $_ := set $router "tls_cert_file" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $router "tls_key_file" (printf "%s/tls.key" $dir) -}}
{{- end -}}
{{- $_ := set $config "router" $router -}}
{{- $url := include "exaone.redisUrl" . -}}
{{- if $url -}}
{{- $prefix := default (dict) $config.prefix_cache -}}
{{- $_ := set $prefix "redis_url" $url -}}
{{- $_ := set $config "prefix_cache" $prefix -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Volumes of every Ray pod: the model (mounted read-only), /tmp (Ray's session files and
logs, caches: the root filesystem is read-only), the fetch hook's /tmp, and on the head
(.head) the gRPC TLS Secret. */}}
{{- define "exaone.rayVolumes" -}}
{{- $root := .root -}}
- name: model
{{- if $root.Values.model.pvc.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $root.Values.model.pvc.existingClaim }}
    readOnly: true
{{- else if $root.Values.model.pvc.create }}
  persistentVolumeClaim:
    claimName: {{ include "exaone.fullname" $root }}-model
    readOnly: true
{{- else if $root.Values.model.hostPath }}
  hostPath:
    path: {{ $root.Values.model.hostPath }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if $root.Values.model.fetch.enabled }}
- name: fetch-tmp
  emptyDir: {}
{{- end }}
{{- if and .head $root.Values.grpc.tls.secretName }}
- name: grpc-tls
  secret:
    secretName: {{ $root.Values.grpc.tls.secretName }}
    defaultMode: 288  # 0440: the owner and the pod's fsGroup read it
{{- end }}
{{- end -}}

{{/* The weights fetch hook: an init container writing into the model volume (its own /tmp,
and HOME there unless its env sets one: the root filesystem is read-only). */}}
{{- define "exaone.fetchInit" -}}
{{- if .Values.model.fetch.enabled }}
initContainers:
  - name: fetch-model
    image: {{ .Values.model.fetch.image }}
    command:
      {{- toYaml .Values.model.fetch.command | nindent 6 }}
    env:
      - name: MODEL_DIR
        value: {{ .Values.model.mountPath }}
      {{- $names := list }}
      {{- range .Values.model.fetch.env }}
      {{- $names = append $names .name }}
      {{- end }}
      {{- if not (has "HOME" $names) }}
      - name: HOME
        value: /tmp
      {{- end }}
      {{- with .Values.model.fetch.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.mountPath }}
      - name: fetch-tmp
        mountPath: /tmp
    securityContext:
      {{- include "exaone.containerSecurityContext" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* A Ray container: image, env (the prefix cache's secrets, caches under /tmp), mounts (model
read-only, /tmp, on the head the gRPC TLS Secret), security. No RAY_AUTH_MODE /
RAY_AUTH_TOKEN: KubeRay sets them from rayClusterConfig.authOptions. */}}
{{- define "exaone.rayContainer" -}}
image: "{{ .root.Values.image.repository }}:{{ .root.Values.image.tag }}"
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
env:
  # cluster/ray_env.py's RAY_ENV, which `exaone-cluster serve` sets too (why each: there).
  # Ray starts workers at niceness 15; the engine and expert replicas are the pod's work.
  - name: RAY_worker_niceness
    value: "0"
  - name: RAY_USAGE_STATS_ENABLED
    value: "0"
  # The rest cut what Ray and Serve do for nothing while a model is served (idle wake-ups).
  - name: RAY_SERVE_CONTROL_LOOP_INTERVAL_S
    value: "0.5"
  - name: RAY_prestart_worker_first_driver
    value: "0"
  - name: RAY_LOG_MONITOR_MANY_FILES_THRESHOLD
    value: "0"
  - name: LOG_NAME_UPDATE_INTERVAL_S
    value: "5"
  - name: RAY_SERVE_METRICS_EXPORT_INTERVAL_MS
    value: "1000"
  # A replica that failed its health checks is stopped at once, not drained.
  - name: RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS
    value: "1"
  {{- if include "exaone.redisPasswordSet" .root }}
  - name: EXAONE_REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "exaone.redisSecret" .root }}
        key: {{ .root.Values.redis.password.key }}
  {{- end }}
  # The key that seals the prefix cache's values in Redis (every replica shares it).
  - name: EXAONE_PREFIX_CACHE_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "exaone.macKeySecret" .root }}
        key: {{ .root.Values.prefixCache.macKey.key }}
  {{- include "exaone.cacheEnv" .root | nindent 2 }}
volumeMounts:
  - name: model
    mountPath: {{ .root.Values.model.mountPath }}
    readOnly: true
  - name: tmp
    mountPath: /tmp
  {{- if and .head .root.Values.grpc.tls.secretName }}
  - name: grpc-tls
    mountPath: {{ include "exaone.grpcTlsDir" .root }}
    readOnly: true
  {{- end }}
securityContext:
  {{- include "exaone.containerSecurityContext" .root | nindent 2 }}
resources:
  {{- $resources := deepCopy .group.resources }}
  {{- if .gpus }}
  {{- $_ := set $resources.limits "nvidia.com/gpu" (int .gpus) }}
  {{- $_ := set $resources.requests "nvidia.com/gpu" (int .gpus) }}
  {{- end }}
  {{- toYaml $resources | nindent 2 }}
{{- end -}}

{{/* A NetworkPolicy peer: the pods labelled `podLabels` (all if empty) in the namespace
`namespace` (any if empty). */}}
{{- define "exaone.peer" -}}
namespaceSelector:
  {{- if .namespace }}
  matchLabels:
    kubernetes.io/metadata.name: {{ .namespace }}
  {{- else }} {}
  {{- end }}
{{- with .podLabels }}
podSelector:
  matchLabels:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}
