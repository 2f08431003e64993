{{/* Chart name. */}}
{{- define "rebasin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-based, DNS-label safe). */}}
{{- define "rebasin.fullname" -}}
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

{{- define "rebasin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "rebasin.labels" -}}
helm.sh/chart: {{ include "rebasin.chart" . }}
{{ include "rebasin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rebasin
{{- end }}

{{- define "rebasin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rebasin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rebasin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rebasin.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images: CPU build for API / migrations / CPU workers, CUDA build for GPU workers. */}}
{{- define "rebasin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{- define "rebasin.cudaImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.image.cudaTag) }}
{{- end }}

{{/* Secret names (existingSecret or the documented default name). */}}
{{- define "rebasin.databaseSecret" -}}
{{- default (printf "%s-database" (include "rebasin.fullname" .)) .Values.database.existingSecret }}
{{- end }}
{{- define "rebasin.redisSecret" -}}
{{- default (printf "%s-redis" (include "rebasin.fullname" .)) .Values.redis.existingSecret }}
{{- end }}
{{- define "rebasin.s3Secret" -}}
{{- default (printf "%s-s3" (include "rebasin.fullname" .)) .Values.s3.existingSecret }}
{{- end }}
{{- define "rebasin.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "rebasin.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/*
Non-secret settings: one "KEY: value" line per variable. Used as the
ConfigMap's data and, inline, by the migrations hook Job (which runs before
the release's ConfigMap exists).
*/}}
{{- define "rebasin.configData" -}}
REBASIN_DATA_DIR: {{ .Values.config.dataDir | quote }}
REBASIN_ARTIFACT_URI: {{ required "s3.artifactUri is required (s3://bucket/prefix)" .Values.s3.artifactUri | quote }}
{{- with .Values.s3.endpointUrl }}
REBASIN_S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
AWS_DEFAULT_REGION: {{ . | quote }}
{{- end }}
REBASIN_MAX_UPLOAD_BYTES: {{ .Values.config.maxUploadBytes | int64 | toString | quote }}
REBASIN_ARCHIVE_MAX_MEMBERS: {{ .Values.config.archiveMaxMembers | int64 | toString | quote }}
REBASIN_ARCHIVE_MAX_UNPACKED_BYTES: {{ .Values.config.archiveMaxUnpackedBytes | int64 | toString | quote }}
REBASIN_STALE_UPLOAD_AFTER_S: {{ .Values.config.staleUploadAfterS | int64 | toString | quote }}
REBASIN_STORAGE_SWEEP_INTERVAL_S: {{ .Values.config.storageSweepIntervalS | int64 | toString | quote }}
REBASIN_DIRECT_UPLOAD_PART_BYTES: {{ .Values.config.directUploadPartBytes | int64 | toString | quote }}
REBASIN_JOB_MAX_ATTEMPTS: {{ .Values.config.jobMaxAttempts | int64 | toString | quote }}
REBASIN_WORKER_DEVICE: {{ .Values.config.workerDevice | quote }}
REBASIN_JOB_TIME_LIMIT_S: {{ .Values.config.jobTimeLimitS | int64 | toString | quote }}
REBASIN_JOB_HEARTBEAT_TIMEOUT_S: {{ .Values.config.jobHeartbeatTimeoutS | toString | quote }}
REBASIN_JOB_SWEEP_INTERVAL_S: {{ .Values.config.jobSweepIntervalS | toString | quote }}
REBASIN_TENANT_MAX_ACTIVE_JOBS: {{ .Values.config.tenantMaxActiveJobs | int64 | toString | quote }}
REBASIN_TENANT_MAX_STORED_BYTES: {{ .Values.config.tenantMaxStoredBytes | int64 | toString | quote }}
REBASIN_TENANT_REQUESTS_PER_S: {{ .Values.config.tenantRequestsPerS | toString | quote }}
REBASIN_TENANT_REQUEST_BURST: {{ .Values.config.tenantRequestBurst | int64 | toString | quote }}
REBASIN_S3_MAX_ATTEMPTS: {{ .Values.config.s3MaxAttempts | int64 | toString | quote }}
{{- if .Values.config.workerMemoryBytes }}
REBASIN_WORKER_MEMORY_BYTES: {{ .Values.config.workerMemoryBytes | int64 | toString | quote }}
{{- end }}
REBASIN_WORKER_MAX_MEMORY_PER_CHILD_MB: {{ .Values.config.workerMaxMemoryPerChildMb | int64 | toString | quote }}
REBASIN_CALLBACK_ALLOW_PRIVATE: {{ .Values.config.callbackAllowPrivate | toString | quote }}
REBASIN_IMPORT_S3_BUCKETS: {{ .Values.config.importS3Buckets | quote }}
REBASIN_IMPORT_HTTP_HOSTS: {{ .Values.config.importHttpHosts | quote }}
REBASIN_IMPORT_HTTP_ALLOWED_NETWORKS: {{ .Values.config.importHttpAllowedNetworks | quote }}
REBASIN_IMPORT_ALLOW_PLAIN_HTTP: {{ .Values.config.importAllowPlainHttp | toString | quote }}
REBASIN_IMPORT_TIMEOUT_S: {{ .Values.config.importTimeoutS | toString | quote }}
{{- with .Values.config.mlflowTrackingUri }}
REBASIN_MLFLOW_TRACKING_URI: {{ . | quote }}
{{- end }}
REBASIN_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
REBASIN_AUTH_CACHE_S: {{ .Values.config.authCacheS | toString | quote }}
REBASIN_SESSION_IDLE_S: {{ .Values.config.sessionIdleS | int64 | toString | quote }}
REBASIN_SESSION_MAX_S: {{ .Values.config.sessionMaxS | int64 | toString | quote }}
REBASIN_AUDIT_RETENTION_DAYS: {{ .Values.config.auditRetentionDays | int64 | toString | quote }}
{{- with .Values.oidc.issuer }}
REBASIN_OIDC_ISSUER: {{ . | quote }}
{{- end }}
REBASIN_OIDC_AUDIENCE: {{ .Values.oidc.audience | quote }}
REBASIN_OIDC_TENANT_CLAIM: {{ .Values.oidc.tenantClaim | quote }}
REBASIN_OIDC_SCOPE_CLAIM: {{ .Values.oidc.scopeClaim | quote }}
REBASIN_OIDC_JWKS_CACHE_S: {{ .Values.oidc.jwksCacheS | int64 | toString | quote }}
{{- end }}

{{/* The database URL, as a container env entry (all the migrations Job needs). */}}
{{- define "rebasin.databaseEnv" -}}
- name: REBASIN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "rebasin.databaseSecret" . }}
      key: {{ .Values.database.urlKey }}
{{- end }}

{{/*
Secret settings, as container env entries. Argument: (dict "root" $ "apiKeys" bool);
only the API gets the API keys and the key pepper (optional, set only with keyPepper.existingSecret).
The callback secret is optional (set only with
callbacks.existingSecret) and goes to the API and the workers.
*/}}
{{- define "rebasin.secretEnv" -}}
{{- $root := .root }}
{{- with $root }}
{{ include "rebasin.databaseEnv" . }}
- name: REBASIN_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "rebasin.redisSecret" . }}
      key: {{ .Values.redis.urlKey }}
{{- if .Values.s3.staticCredentials }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "rebasin.s3Secret" . }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "rebasin.s3Secret" . }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.callbacks.existingSecret }}
- name: REBASIN_CALLBACK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.callbacks.key }}
{{- end }}
{{- end }}
{{- if .apiKeys }}
- name: REBASIN_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "rebasin.apiKeysSecret" $root }}
      key: {{ $root.Values.apiKeys.key }}
{{- with $root.Values.keyPepper.existingSecret }}
- name: REBASIN_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.keyPepper.key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
envFrom + env for long-running containers (settings from the ConfigMap).
Argument: (dict "root" $ "apiKeys" bool).
*/}}
{{- define "rebasin.containerEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "rebasin.fullname" .root }}
{{- with .root.Values.extraEnvFrom }}
{{ toYaml . | indent 2 }}
{{- end }}
env:
{{ include "rebasin.secretEnv" . | indent 2 }}
{{- with .root.Values.extraEnv }}
{{ toYaml . | indent 2 }}
{{- end }}
{{- end }}

{{/* Writable scratch volumes (the root filesystem is read-only). */}}
{{- define "rebasin.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ .Values.config.dataDir }}
{{- end }}

{{- define "rebasin.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
- name: data
  emptyDir:
    # Uploads are staged here (REBASIN_DATA_DIR/staging) while they are validated.
    sizeLimit: {{ .tmpSizeLimit }}
{{- end }}

{{/* Pod-template checksum so that pods roll when the settings change. */}}
{{- define "rebasin.configChecksum" -}}
checksum/config: {{ include "rebasin.configData" . | sha256sum }}
{{- end }}
