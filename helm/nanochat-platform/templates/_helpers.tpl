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

{{- define "ncp.databaseUrl" -}}
{{- if .Values.postgresql.enabled -}}
{{- $pw := required "postgresql.password is required when postgresql.enabled (or use externalDatabase.url)" .Values.postgresql.password -}}
{{- printf "postgresql+psycopg://%s:%s@%s-postgres:5432/%s" .Values.postgresql.user (urlquery $pw) (include "ncp.fullname" .) .Values.postgresql.database -}}
{{- else -}}
{{- required "externalDatabase.url is required when postgresql.enabled=false" .Values.externalDatabase.url -}}
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
