{{/* The name of the release's objects: the release name, or shoal. */}}
{{- define "shoal.fullname" -}}
{{- if contains "shoal" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-shoal" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "shoal.labels" -}}
app.kubernetes.io/name: shoal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The labels that select the daemon's pods. */}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: shoal
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Where the pod mounts the swarm key's Secret. */}}
{{- define "shoal.keyDir" -}}/var/run/secrets/shoal{{- end -}}

{{/*
The daemon's config.yaml, built as data and rendered with toYaml so that
values cannot break its syntax; the daemon reads it strictly.
*/}}
{{- define "shoal.config" -}}
{{- $p2p := dict "listen" (list (printf "/ip4/0.0.0.0/tcp/%d" (int .Values.p2p.port))) "bootstrap" .Values.p2p.bootstrap "psk_file" (printf "%s/%s" (include "shoal.keyDir" .) .Values.swarmKey.key) "upload_streams" (int .Values.p2p.uploadStreams) "upload_bytes_per_sec" (int64 .Values.p2p.uploadBytesPerSec) -}}
{{- $cfg := dict "state_dir" .Values.stateDir "metrics_addr" "127.0.0.1:9464" "plain_http" false "cache_quota" (int64 .Values.cacheQuota) "p2p" $p2p "snapshotter" (dict "socket" (printf "%s/snapshotter.sock" .Values.stateDir)) "keeper_socket" "/run/shoal/keeper.sock" -}}
{{- if .Values.mirror.enabled -}}
{{- $_ := set $cfg "mirror" (dict "listen" .Values.mirror.listen "upstreams" .Values.mirror.upstreams) -}}
{{- end -}}
{{- if .Values.cri.enabled -}}
{{- $_ := set $cfg "cri" (dict "image_socket" .Values.cri.imageSocket "runtime_endpoint" .Values.cri.runtimeEndpoint) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
