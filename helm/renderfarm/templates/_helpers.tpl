{{/* Names. Kept short: KubeRay derives the head Service's name from the RayCluster's. */}}
{{- define "renderfarm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "renderfarm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "renderfarm.rayClusterName" -}}
{{- include "renderfarm.fullname" . }}-ray
{{- end }}

{{/* KubeRay names the head Service <RayCluster name>-head-svc; 6379 is the GCS port. */}}
{{- define "renderfarm.rayAddress" -}}
{{- include "renderfarm.rayClusterName" . }}-head-svc:6379
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "renderfarm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "renderfarm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels of every pod of the release: the NetworkPolicies admit Ray traffic from these alone. */}}
{{- define "renderfarm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "renderfarm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The metrics Service's labels, and the part of them the ServiceMonitor selects it by (not the users' Service). */}}
{{- define "renderfarm.metricsServiceSelector" -}}
{{ include "renderfarm.selectorLabels" . }}
app.kubernetes.io/component: scheduler-metrics
{{- end }}

{{- define "renderfarm.metricsServiceLabels" -}}
{{ include "renderfarm.labels" . }}
app.kubernetes.io/component: scheduler-metrics
{{- end }}

{{- define "renderfarm.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Paths inside the containers; farm.toml names the same ones. */}}
{{- define "renderfarm.configDir" -}}/etc/renderfarm{{- end }}
{{- define "renderfarm.stateDir" -}}/var/lib/renderfarm/state{{- end }}
{{- define "renderfarm.outputDir" -}}/var/lib/renderfarm/output{{- end }}
{{- define "renderfarm.modelCacheDir" -}}/var/cache/renderfarm/models{{- end }}

{{/* farm.toml's `output` with storage.s3.bucket: s3://BUCKET, or s3://BUCKET/PREFIX without edge slashes. */}}
{{- define "renderfarm.s3Output" -}}
{{- with .Values.storage.s3 }}
{{- printf "s3://%s" .bucket }}
{{- with trimAll "/" .prefix }}/{{ . }}{{ end }}
{{- end }}
{{- end }}

{{/* The Secrets' mounts sit outside configDir: its read-only ConfigMap mount leaves no room for mount points. */}}
{{- define "renderfarm.keysDir" -}}/var/run/secrets/renderfarm/keys{{- end }}
{{- define "renderfarm.tlsDir" -}}/var/run/secrets/renderfarm/tls{{- end }}
{{- define "renderfarm.clientCaDir" -}}/var/run/secrets/renderfarm/client-ca{{- end }}

{{/* Kubernetes' gRPC probes cannot speak TLS: with TLS on, they use the plaintext health port. */}}
{{- define "renderfarm.probePort" -}}
{{- if .Values.secrets.tls.existingSecret }}
{{- .Values.scheduler.healthPort }}
{{- else }}
{{- .Values.scheduler.port }}
{{- end }}
{{- end }}

{{/* A farm.toml value: TOML spells strings, numbers and booleans as JSON does. */}}
{{- define "renderfarm.tomlValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) }}
{{- fail (printf "farm: %s is not a string, number or boolean, which is all farm.toml holds" (toJson .)) }}
{{- end }}
{{- toJson . }}
{{- end }}

{{/* `ray start` parameters as KubeRay takes them: a map of strings. */}}
{{- define "renderfarm.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toJson $params }}
{{- end }}

{{/* Pod security: non-root uid 1000 (the image's user), no privilege escalation, RuntimeDefault seccomp. */}}
{{- define "renderfarm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The root filesystem is read-only; /tmp (Ray's session directory, HOME) is an emptyDir. */}}
{{- define "renderfarm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Environment of the scheduler and the Ray workers: a writable HOME, the model cache as
Hugging Face's cache, the S3 endpoint, and the referenced Secrets.
*/}}
{{- define "renderfarm.env" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: {{ include "renderfarm.modelCacheDir" . }}/huggingface
{{- with .Values.secrets.objectStore }}
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
{{- end }}
{{- end }}
{{- with .Values.storage.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.secrets.huggingface }}
{{- if .existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes every Ray-running pod needs: /tmp, /dev/shm of the given size, the model cache. */}}
{{- define "renderfarm.volumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: model-cache
{{- with .root.Values.persistence.modelCache }}
{{- if .enabled }}
  persistentVolumeClaim:
    claimName: {{ .existingClaim | default (printf "%s-model-cache" (include "renderfarm.fullname" $.root)) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end }}

{{- define "renderfarm.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ include "renderfarm.modelCacheDir" . }}
{{- end }}
