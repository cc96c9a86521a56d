{{/* Names, labels and the pieces every pod shares. */}}

{{- define "entrokv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "entrokv.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "entrokv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "entrokv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "worker") */}}
{{- define "entrokv.selector" -}}
app.kubernetes.io/name: {{ include "entrokv.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "entrokv.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "entrokv.workerService" -}}{{ include "entrokv.fullname" . }}-worker{{- end -}}
{{- define "entrokv.kvstoreService" -}}{{ include "entrokv.fullname" . }}-kvstore{{- end -}}

{{- define "entrokv.modelPath" -}}
{{ .Values.model.mountPath }}/{{ .Values.model.file }}
{{- end -}}

{{- define "entrokv.tokenSecret" -}}
{{- .Values.kvstore.token.existingSecret | default (printf "%s-kvstore-token" (include "entrokv.fullname" .)) -}}
{{- end -}}

{{/* Seconds Kubernetes waits after SIGTERM before SIGKILL: the drain
     timeout (counted from the signal; the grace lies inside it) and 10 s
     for the process to stop. */}}
{{- define "entrokv.terminationGrace" -}}
{{ add .Values.serving.drainTimeout 10 }}
{{- end -}}

{{/* The drain settings come from the environment (docs/serving.md). */}}
{{- define "entrokv.drainEnv" -}}
- name: ENTROKV_DRAIN_GRACE
  value: {{ .Values.serving.drainGrace | quote }}
- name: ENTROKV_DRAIN_TIMEOUT
  value: {{ .Values.serving.drainTimeout | quote }}
{{- end -}}

{{- define "entrokv.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end -}}

{{/* The model volume (PVC, hostPath, or an emptyDir the init container fills). */}}
{{- define "entrokv.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName | default (printf "%s-models" (include "entrokv.fullname" .)) }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.fetch.sizeLimit }}
{{- end }}
{{- end -}}

{{/* `entrokv fetch-model` into the emptyDir, before the main container. */}}
{{- define "entrokv.fetchInit" -}}
{{- if eq .Values.model.source "fetch" }}
initContainers:
  - name: fetch-model
    image: {{ include "entrokv.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["entrokv"]
    args: ["fetch-model", "--dir", {{ .Values.model.mountPath | quote }}]
    env:
      # pip, which fetch-model runs, needs a writable home
      - name: HOME
        value: /tmp
    {{- include "entrokv.containerSecurity" . | nindent 4 }}
    resources:
      requests: {cpu: 100m, memory: 128Mi}
      limits: {cpu: "1", memory: 512Mi}
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.mountPath }}
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}

{{/* checkov (tests/deploy) findings this chart accepts, with the reason,
     on every workload. (dict "ctx" $ "hostNetwork" bool) */}}
{{- define "entrokv.checkovSkips" -}}
{{- if not .ctx.Values.image.digest }}
checkov.io/skip1: CKV_K8S_43=image.digest pins the image by digest; a tag is the default so the chart works with a locally built image
{{- end }}
{{- if ne .ctx.Values.image.pullPolicy "Always" }}
checkov.io/skip2: CKV_K8S_15=release tags are immutable; IfNotPresent avoids a registry round trip per pod start (set image.pullPolicy Always for moving tags)
{{- end }}
{{- if .hostNetwork }}
checkov.io/skip3: CKV_K8S_19=kvstore.hostNetwork was asked for (UCX over the node's RDMA devices); the daemon still runs non-root without capabilities
{{- end }}
{{- end -}}
