{{/* Names: everything is prefixed by the release, within Kubernetes' 63 characters. */}}
{{- define "unlocked.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "unlocked.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "unlocked.mlflowName" -}}
{{- printf "%s-mlflow" (include "unlocked.fullname" .) -}}
{{- end -}}

{{- define "unlocked.mlflowSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mlflow
{{- end -}}

{{/* The Secret holding MLflow's admin login (keys username, password, flask-secret-key). */}}
{{- define "unlocked.mlflowAuthSecret" -}}
{{- .Values.mlflow.auth.existingSecret | default (printf "%s-auth" (include "unlocked.mlflowName" .)) -}}
{{- end -}}

{{- define "unlocked.rayTokenSecret" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-token" (include "unlocked.fullname" .)) -}}
{{- end -}}

{{- define "unlocked.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "unlocked.mlflowName" .) .Release.Namespace (int .Values.mlflow.service.port) -}}
{{- else -}}
{{- .Values.mlflow.external.trackingUri -}}
{{- end -}}
{{- end -}}

{{/* A secret kept across upgrades: the live Secret's value when there is one, else new. */}}
{{- define "unlocked.keptSecret" -}}
{{- $live := lookup "v1" "Secret" .namespace .name -}}
{{- if and $live (index ($live.data | default dict) .key) -}}
{{- index $live.data .key -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* What every Ray container needs: where runs are tracked and kept (see deploy/runtime_env.yaml). */}}
{{- define "unlocked.rayEnv" -}}
# The image is read-only: caches (torch, matplotlib, ...) go under the writable /tmp.
- name: HOME
  value: /tmp
- name: MLFLOW_TRACKING_URI
  value: {{ include "unlocked.trackingUri" . | quote }}
{{- $secret := "" -}}
{{- if .Values.mlflow.enabled -}}
{{- if .Values.mlflow.auth.enabled -}}{{- $secret = include "unlocked.mlflowAuthSecret" . -}}{{- end -}}
{{- else -}}
{{- $secret = .Values.mlflow.external.existingSecret -}}
{{- end -}}
{{- if $secret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: username}}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: password}}
{{- end }}
- name: UNLOCKED_CHECKPOINT_ROOT
  value: {{ .Values.storage.checkpointRoot | default "/mnt/unlocked/checkpoints" | quote }}
- name: UNLOCKED_DATA_ROOT
  value: {{ .Values.storage.dataRoot | default "/mnt/unlocked/datasets" | quote }}
# A run whose checkpoints go to a bucket buffers its MLflow records on local disk.
- name: UNLOCKED_TRACKING_BUFFER
  value: /tmp/unlocked/mlflow-buffer
# `ray job stop` waits this long after SIGTERM: a run finishes its step and checkpoints.
- name: RAY_JOB_STOP_WAIT_TIME_S
  value: "60"
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "unlocked.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "unlocked.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
{{- end -}}

{{/* The chart's own containers also keep the image read-only: what Ray and MLflow write
     (sessions, logs, spilled objects, caches under $HOME) goes to the /tmp emptyDir. */}}
{{- define "unlocked.readOnlyContainerSecurity" -}}
{{- include "unlocked.containerSecurity" . }}
readOnlyRootFilesystem: true
{{- end -}}

{{/* Pods of this release: what the NetworkPolicy lets in, and what it guards. */}}
{{- define "unlocked.releaseSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A Ray pod template: args are (root context, group values, role, image tag). */}}
{{- define "unlocked.rayPod" -}}
{{- $ := index . 0 -}}{{- $group := index . 1 -}}{{- $role := index . 2 -}}{{- $tag := index . 3 -}}
metadata:
  labels:
    {{- include "unlocked.labels" $ | nindent 4 }}
    app.kubernetes.io/component: ray-{{ $role }}
spec:
  # Only the autoscaler (a container KubeRay adds to the head) talks to the Kubernetes API.
  automountServiceAccountToken: {{ and (eq $role "head") $.Values.ray.autoscaling.enabled }}
  securityContext:
    {{- include "unlocked.podSecurity" $ | nindent 4 }}
  {{- with $.Values.image.pullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ $role }}
      image: "{{ $.Values.image.repository }}:{{ $tag }}"
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      securityContext:
        {{- include "unlocked.readOnlyContainerSecurity" $ | nindent 8 }}
      {{- if eq $role "head" }}
      ports:
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
      {{- end }}
      env:
        {{- include "unlocked.rayEnv" $ | nindent 8 }}
      {{- with $.Values.ray.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- $resources := deepCopy $group.resources -}}
        {{- if gt (int ($group.gpus | default 0)) 0 -}}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int $group.gpus)) ($resources.limits | default dict)) -}}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: shm, mountPath: /dev/shm}
        {{- if $.Values.storage.volume.enabled }}
        - {name: shared, mountPath: /mnt/unlocked}
        {{- end }}
        {{- if and (eq $role "head") (eq $.Values.mode "job") }}
        - {name: run-config, mountPath: /etc/unlocked, readOnly: true}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir: {medium: Memory, sizeLimit: {{ $.Values.ray.shmSize }}}
    {{- if $.Values.storage.volume.enabled }}
    - name: shared
      persistentVolumeClaim:
        claimName: {{ $.Values.storage.volume.existingClaim | default (printf "%s-shared" (include "unlocked.fullname" $)) }}
    {{- end }}
    {{- if and (eq $role "head") (eq $.Values.mode "job") }}
    - name: run-config
      configMap: {name: {{ include "unlocked.fullname" $ }}-run-config}
    {{- end }}
{{- end -}}

{{/* The RayCluster spec, shared by mode cluster (a RayCluster) and mode job (a RayJob). */}}
{{- define "unlocked.rayClusterSpec" -}}
rayVersion: {{ .Values.ray.version | quote }}
{{- if .Values.ray.auth.enabled }}
authOptions:
  mode: token
  secretName: {{ include "unlocked.rayTokenSecret" . }}
{{- end }}
{{- if .Values.ray.autoscaling.enabled }}
enableInTreeAutoscaling: true
autoscalerOptions:
  upscalingMode: {{ .Values.ray.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ .Values.ray.autoscaling.idleTimeoutSeconds }}
  # KubeRay's own container: not read-only, since where it writes is KubeRay's choice.
  securityContext:
    {{- include "unlocked.containerSecurity" . | nindent 4 }}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    {{- toYaml (.Values.ray.head.rayStartParams | default dict) | nindent 4 }}
  template:
    {{- include "unlocked.rayPod" (list . .Values.ray.head "head" .Values.image.tag) | nindent 4 }}
workerGroupSpecs:
{{- range .Values.ray.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams:
      {{- toYaml (.rayStartParams | default dict) | nindent 6 }}
    template:
      {{- $tag := ternary $.Values.image.gpuTag $.Values.image.tag (gt (int (.gpus | default 0)) 0) }}
      {{- include "unlocked.rayPod" (list $ . "worker" $tag) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* What a JSON schema cannot say: relations between values. Each failure names the fix. */}}
{{- define "unlocked.validate" -}}
{{- range .Values.ray.workerGroups -}}
{{- if or (gt (int .minReplicas) (int .replicas)) (gt (int .replicas) (int .maxReplicas)) -}}
{{- fail (printf "ray.workerGroups[%s]: needs minReplicas <= replicas <= maxReplicas (got %d, %d, %d)" .name (int .minReplicas) (int .replicas) (int .maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ray.auth.enabled (semverCompare "<2.52.0" .Values.ray.version) -}}
{{- fail (printf "ray.auth.enabled: Ray token authentication needs Ray >= 2.52.0 but ray.version is %s; use a newer image or set ray.auth.enabled=false" .Values.ray.version) -}}
{{- end -}}
{{- if and (not .Values.storage.volume.enabled) (or (not .Values.storage.checkpointRoot) (not .Values.storage.dataRoot)) -}}
{{- fail "storage: with storage.volume.enabled=false, set storage.checkpointRoot and storage.dataRoot (e.g. s3://bucket/unlocked/...) so runs keep their checkpoints and data" -}}
{{- end -}}
{{- end -}}
