{{/* Names, labels and URLs shared by the templates. */}}

{{- define "ncp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ncp.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ncp.labels" -}}
{{ include "ncp.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* image: (dict "root" . "repo" .Values.images.api) */}}
{{- define "ncp.image" -}}
{{- printf "%s%s:%s" .root.Values.images.registry .repo .root.Values.images.tag -}}
{{- end -}}

{{- define "ncp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ncp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ncp.claimName" -}}
{{- default (printf "%s-home" (include "ncp.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* Registry connection as NCP_* env. Bundled Postgres: separate fields, the URL is built (and
percent-quoted) by shared/settings.py, the one place for compose and the chart alike, so the
password may hold any character. External: the URL as given. Secret values only (.secret). */}}
{{- define "ncp.databaseSecretEnv" -}}
{{- if .Values.postgresql.enabled -}}
NCP_DB_PASSWORD: {{ required "postgresql.password is required when postgresql.enabled (or use externalDatabase.url)" .Values.postgresql.password | quote }}
{{- else -}}
NCP_DATABASE_URL: {{ required "externalDatabase.url is required when postgresql.enabled=false" .Values.externalDatabase.url | quote }}
{{- end -}}
{{- end -}}

{{- define "ncp.databaseConfigEnv" -}}
{{- if .Values.postgresql.enabled -}}
NCP_DB_HOST: {{ printf "%s-postgres" (include "ncp.fullname" .) | quote }}
NCP_DB_PORT: "5432"
NCP_DB_USER: {{ .Values.postgresql.user | quote }}
NCP_DB_NAME: {{ .Values.postgresql.database | quote }}
{{- end -}}
{{- end -}}

{{- define "ncp.brokerUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "ncp.fullname" .) -}}
{{- else -}}
{{- required "externalRedis.url is required when redis.enabled=false" .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{/* env of every platform container: NCP_* from the ConfigMap and the Secret. */}}
{{- define "ncp.envFrom" -}}
- configMapRef:
    name: {{ include "ncp.fullname" . }}-config
- secretRef:
    name: {{ include "ncp.fullname" . }}-secrets
{{- end -}}

{{- define "ncp.homeVolume" -}}
- name: ncp-home
  persistentVolumeClaim:
    claimName: {{ include "ncp.claimName" . }}
{{- end -}}

{{- define "ncp.homeMount" -}}
- name: ncp-home
  mountPath: {{ .Values.persistence.home }}
{{- end -}}

{{/* gpu.supplementalGroups: the NUMERIC GIDs owning /dev/kfd and /dev/dri on the GPU nodes. Required
with the AMD resource (a non-root pod cannot open the devices without them); names fail here. */}}
{{- define "ncp.gpuGroups" -}}
{{- $groups := .Values.gpu.supplementalGroups | default list -}}
{{- $usesGpus := or (gt (int (default 0 .Values.workers.train.gpus)) 0) (gt (int (default 0 .Values.workers.eval.gpus)) 0) .Values.inference.enabled .Values.multinode.enabled -}}
{{- if and $usesGpus (eq .Values.gpu.resource "amd.com/gpu") (not $groups) -}}
{{- fail "gpu.supplementalGroups is required with gpu.resource=amd.com/gpu: the numeric GIDs of the video and render groups on the GPU nodes (`getent group video render` prints name:x:GID:members), e.g. --set gpu.supplementalGroups='{44,110}'" -}}
{{- end -}}
{{- range $groups -}}
{{- if not (or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .)) -}}
{{- fail (printf "gpu.supplementalGroups: %q is not a number: give the numeric GIDs of the video and render groups on the GPU nodes (`getent group video render`)" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- toJson ($groups | default list) -}}
{{- end -}}

{{- define "ncp.gpuEnv" -}}
{{- range $k, $v := .Values.gpu.env }}
{{- if not (kindIs "invalid" $v) }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Multi-node names: must match services/train_worker/k8s.py resource_name(). */}}
{{- define "ncp.multinodeName" -}}
{{- $slug := regexReplaceAll "[^a-z0-9-]+" (lower .) "-" | trimAll "-" -}}
{{- regexReplaceAll "-+$" (printf "ncp-train-%s" $slug | trunc 50) "" -}}
{{- end -}}
