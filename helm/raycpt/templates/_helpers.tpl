{{/*
Names, labels and the shared pieces of every Ray pod. Templates stay declarative: the
decisions live here.
*/}}

{{- define "raycpt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: release-chart, or the release name when it holds the chart name. */}}
{{- define "raycpt.fullname" -}}
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
A KubeRay object name: the fullname cut to `max` characters, which must then be a DNS-1035
label (KubeRay rejects anything else).
*/}}
{{- define "raycpt.kuberayName" -}}
{{- $name := include "raycpt.fullname" .root | trunc (int .max) | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "%s name %q is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter); set fullnameOverride" .kind $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
RayCluster name. KubeRay validates <= 53 characters (63 minus "-serve-svc"), but its pod-name
prefix and the generated auth Secret's name (utils.PodName / utils.CheckName) keep only 50
characters, so 50 keeps every derived name intact.
*/}}
{{- define "raycpt.clusterName" -}}
{{- include "raycpt.kuberayName" (dict "root" . "max" 50 "kind" "RayCluster") }}
{{- end }}

{{/* RayJob name: KubeRay allows 47 (53 minus the "-xxxxx" suffix of the RayCluster it creates). */}}
{{- define "raycpt.rayJobName" -}}
{{- include "raycpt.kuberayName" (dict "root" . "max" 47 "kind" "RayJob") }}
{{- end }}

{{- define "raycpt.configMapName" -}}
{{- printf "%s-config" (include "raycpt.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "raycpt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "raycpt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raycpt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raycpt.labels" -}}
helm.sh/chart: {{ include "raycpt.chart" . }}
{{ include "raycpt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raycpt
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the Ray pods; empty means "let KubeRay pick" (it makes one per cluster). */}}
{{- define "raycpt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raycpt.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "raycpt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Path of the run config inside the pods, or "" when the chart renders none. */}}
{{- define "raycpt.configPath" -}}
{{- if .Values.rayJob.configPath }}
{{- .Values.rayJob.configPath }}
{{- else if .Values.config.content }}
{{- printf "%s/%s" (trimSuffix "/" .Values.config.mountPath) .Values.config.fileName }}
{{- end }}
{{- end }}

{{- define "raycpt.entrypoint" -}}
{{- if .Values.rayJob.entrypoint }}
{{- .Values.rayJob.entrypoint }}
{{- else }}
{{- $path := include "raycpt.configPath" . }}
{{- if not $path }}
{{- fail "rayJob.enabled needs a run config: set config.content (rendered into a ConfigMap), rayJob.configPath (a file inside the image) or rayJob.entrypoint" }}
{{- end }}
{{- printf "python ray_jobs/cpt.py --config %s" $path }}
{{- end }}
{{- end }}

{{/* RayJob settings KubeRay's controller would reject (ValidateRayJobSpec). */}}
{{- define "raycpt.validateRayJob" -}}
{{- if and (eq .Values.rayJob.submissionMode "InteractiveMode") (gt (int .Values.rayJob.backoffLimit) 0) }}
{{- fail "rayJob.backoffLimit must be 0 with submissionMode InteractiveMode: KubeRay does not retry interactive jobs" }}
{{- end }}
{{- end }}

{{/*
Worker groups after applying workerGroupDefaults, keyed by name, disabled ones dropped.
Call with (dict "root" $ "out" $dict); the result is written into $dict. The merge is shallow
and per key (a group's nodeSelector replaces the default one); unlike mergeOverwrite it lets a
group set 0, false or "" over a non-empty default.
*/}}
{{- define "raycpt.resolveWorkerGroups" -}}
{{- range $name, $group := .root.Values.workerGroups }}
{{- $merged := deepCopy $.root.Values.workerGroupDefaults }}
{{- range $key, $value := $group }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- if $merged.enabled }}
{{- $min := int $merged.minReplicas }}
{{- $max := int $merged.maxReplicas }}
{{- $replicas := int $merged.replicas }}
{{- if gt $min $max }}
{{- fail (printf "workerGroups.%s: minReplicas (%d) must not exceed maxReplicas (%d)" $name $min $max) }}
{{- end }}
{{- if or (lt $replicas $min) (gt $replicas $max) }}
{{- fail (printf "workerGroups.%s: replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $name $replicas $min $max) }}
{{- end }}
{{- $_ := set $.out $name $merged }}
{{- end }}
{{- end }}
{{- end }}

{{/*
rayStartParams as KubeRay wants them (a map of strings). Custom Ray resources become the
`resources` flag, single-quoted because KubeRay pastes the value into a bash `ray start` line.
*/}}
{{- define "raycpt.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := .rayStartParams }}
{{- $_ := set $params $key ($value | toString) }}
{{- end }}
{{- with .rayResources }}
{{- $_ := set $params "resources" (printf "'%s'" (toJson .)) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* The restricted Pod Security Standard, at pod level. */}}
{{- define "raycpt.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The restricted Pod Security Standard, at container level. No readOnlyRootFilesystem: Ray
writes its session files, logs and spilled objects under /tmp/ray and the home directory.
*/}}
{{- define "raycpt.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container resources; `gpus` adds the GPU resource to requests and limits alike. */}}
{{- define "raycpt.resources" -}}
{{- $resources := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $resources.requests .gpuResourceName (int .gpus) }}
{{- $_ := set $resources.limits .gpuResourceName (int .gpus) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Environment of every Ray container: caches on scratch, object storage, user extras. */}}
{{- define "raycpt.env" -}}
{{- $root := .root }}
{{- $scratch := trimSuffix "/" $root.Values.scratch.mountPath -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" $scratch | quote }}
- name: RAYCPT_CACHE_DIR
  value: {{ printf "%s/raycpt" $scratch | quote }}
- name: TORCH_EXTENSIONS_DIR
  value: {{ printf "%s/torch_extensions" $scratch | quote }}
{{- with $root.Values.objectStorage.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.objectStorage.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.objectStorage.credentials }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- if .sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .sessionTokenKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .group.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod template of a Ray node. Called with (dict "root" $ "role" "head"|"worker" "group" $values
"component" "head"|"worker-<name>").
*/}}
{{- define "raycpt.podTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $isHead := eq .role "head" -}}
metadata:
  labels:
    {{- include "raycpt.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with include "raycpt.serviceAccountName" $root }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- if not $isHead }}
  # Only the head needs an API token (its autoscaler sidecar patches the RayCluster);
  # IRSA and GKE Workload Identity inject their own credentials without it.
  automountServiceAccountToken: false
  # Time a worker gets between SIGTERM (pre-emption, scale-down, node drain) and SIGKILL:
  # long enough for the training loop to write a pre-emption checkpoint.
  terminationGracePeriodSeconds: {{ $group.terminationGracePeriodSeconds }}
  {{- end }}
  securityContext:
    {{- include "raycpt.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $isHead }}
      image: {{ include "raycpt.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      workingDir: {{ $root.Values.image.workingDir }}
      {{- if $isHead }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: metrics
          containerPort: 8080
      {{- end }}
      env:
        {{- include "raycpt.env" (dict "root" $root "group" $group) | nindent 8 }}
      resources:
        {{- include "raycpt.resources" (dict "resources" $group.resources "gpus" (default 0 $group.gpus) "gpuResourceName" $root.Values.gpuResourceName) | nindent 8 }}
      securityContext:
        {{- include "raycpt.containerSecurityContext" $root | nindent 8 }}
      {{- if not $isHead }}
      # Kubernetes would SIGTERM `ray start`, which takes the training processes down before
      # they can checkpoint. `raycpt drain` runs first: it signals this pod's Ray Train workers
      # and waits (within the grace period, 15 s left for Ray itself) for their checkpoint.
      lifecycle:
        preStop:
          exec:
            command: ["raycpt", "drain", "--timeout", "{{ max 1 (sub (int $group.terminationGracePeriodSeconds) 15) }}"]
      {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: scratch
          mountPath: {{ $root.Values.scratch.mountPath }}
        {{- if $root.Values.config.content }}
        - name: run-config
          mountPath: {{ $root.Values.config.mountPath }}
          readOnly: true
        {{- end }}
  volumes:
    # Ray's object store and PyTorch's data-loader workers live in /dev/shm; the container
    # runtime's default of 64Mi is far too small.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSizeLimit }}
    # Node-local scratch: model downloads, Hugging Face cache, compiled DeepSpeed ops.
    - name: scratch
      emptyDir:
        {{- with $root.Values.scratch.medium }}
        medium: {{ . }}
        {{- end }}
        sizeLimit: {{ $group.scratchSizeLimit }}
    {{- if $root.Values.config.content }}
    - name: run-config
      configMap:
        name: {{ include "raycpt.configMapName" $root }}
    {{- end }}
{{- end }}

{{/* spec of the RayCluster, shared by the standalone RayCluster and RayJob.spec.rayClusterSpec. */}}
{{- define "raycpt.rayClusterSpec" -}}
{{- $groups := dict }}
{{- $_ := include "raycpt.resolveWorkerGroups" (dict "root" . "out" $groups) -}}
rayVersion: {{ .Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ .Values.autoscaler.enabled }}
{{- if .Values.autoscaler.enabled }}
autoscalerOptions:
  {{- with .Values.autoscaler.version }}
  version: {{ . }}
  {{- end }}
  upscalingMode: {{ .Values.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ .Values.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  resources:
    {{- toYaml .Values.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- include "raycpt.containerSecurityContext" . | nindent 4 }}
{{- end }}
authOptions:
  mode: {{ .Values.auth.mode }}
headGroupSpec:
  serviceType: {{ .Values.head.serviceType }}
  rayStartParams:
    {{- include "raycpt.rayStartParams" .Values.head | nindent 4 }}
  template:
    {{- include "raycpt.podTemplate" (dict "root" . "role" "head" "group" .Values.head "component" "head") | nindent 4 }}
{{- if $groups }}
workerGroupSpecs:
  {{- range $name, $group := $groups }}
  - groupName: {{ $name }}
    replicas: {{ $group.replicas }}
    minReplicas: {{ $group.minReplicas }}
    maxReplicas: {{ $group.maxReplicas }}
    rayStartParams:
      {{- include "raycpt.rayStartParams" $group | nindent 6 }}
    template:
      {{- include "raycpt.podTemplate" (dict "root" $ "role" "worker" "group" $group "component" (printf "worker-%s" $name)) | nindent 6 }}
  {{- end }}
{{- else }}
workerGroupSpecs: []
{{- end }}
{{- end }}
