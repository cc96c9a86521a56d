{{/* The worker container and volumes, shared by the StatefulSet and the
     LeaderWorkerSet variant. Called with (dict "ctx" $ "leader" bool). */}}

{{- define "entrokv.kvstorePeers" -}}
{{- if .Values.kvstore.peers -}}
{{ join "," .Values.kvstore.peers }}
{{- else -}}
{{ include "entrokv.kvstoreService" . }}:{{ .Values.kvstore.port }}
{{- end -}}
{{- end -}}

{{- define "entrokv.workerArgs" -}}
- worker
- --config
- /etc/entrokv/worker.json
- --listen
- 0.0.0.0:{{ .Values.workers.port }}
{{- if .Values.kvstore.enabled }}
- --kvstore-peers
- {{ include "entrokv.kvstorePeers" . }}
{{- end }}
{{- end -}}

{{- define "entrokv.workerEnv" -}}
{{ include "entrokv.drainEnv" . }}
{{- if .Values.kvstore.enabled }}
- name: UCX_TLS
  value: {{ .Values.kvstore.ucx.tls | quote }}
{{- with .Values.kvstore.ucx.netDevices }}
- name: UCX_NET_DEVICES
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.workers.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "entrokv.workerResources" -}}
{{- $r := deepCopy .Values.workers.resources -}}
{{- if .Values.workers.gpu.enabled -}}
{{- $limits := $r.limits | default dict -}}
{{- $requests := $r.requests | default dict -}}
{{- $_ := set $limits .Values.workers.gpu.resourceName .Values.workers.tensorParallel -}}
{{- $_ := set $requests .Values.workers.gpu.resourceName .Values.workers.tensorParallel -}}
{{- $_ := set $r "limits" $limits -}}
{{- $_ := set $r "requests" $requests -}}
{{- end -}}
{{ toYaml $r }}
{{- end -}}

{{/* Probes: the native gRPC probe on the Worker service (NOT_SERVING
     while draining) for readiness, the overall status for liveness. */}}
{{- define "entrokv.workerProbes" -}}
startupProbe:
  grpc:
    port: {{ .Values.workers.port }}
  periodSeconds: 2
  failureThreshold: 300
livenessProbe:
  grpc:
    port: {{ .Values.workers.port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ .Values.workers.port }}
    service: entrokv.v1.Worker
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 1
{{- end -}}

{{- define "entrokv.workerMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
- name: config
  mountPath: /etc/entrokv
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.kvstore.enabled }}
- name: kvstore-token
  mountPath: /var/run/secrets/entrokv
  readOnly: true
{{- end }}
{{- if .Values.workers.gpu.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{- define "entrokv.workerVolumes" -}}
{{ include "entrokv.modelVolume" . }}
- name: config
  configMap:
    name: {{ include "entrokv.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if .Values.kvstore.enabled }}
- name: kvstore-token
  secret:
    secretName: {{ include "entrokv.tokenSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.kvstore.token.key }}
        path: kvstore-token
{{- end }}
{{- if .Values.workers.gpu.enabled }}
# NCCL and the CUDA IPC between the ranks of a group use /dev/shm.
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: 1Gi
{{- end }}
{{- end -}}

{{- define "entrokv.workerScheduling" -}}
{{- with .Values.workers.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.workers.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.workers.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
