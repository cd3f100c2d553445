{{/* The release's resource name prefix. */}}
{{- define "runplane.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "runplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "scheduler"). */}}
{{- define "runplane.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "runplane.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "runplane.scheme" -}}
{{ if .Values.tls.existingSecret }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}

{{/* The settings every service reads: NATS, the other services' addresses, TLS, env. */}}
{{- define "runplane.env" -}}
{{- $name := include "runplane.fullname" . -}}
{{- $http := ternary "https" "http" (ne .Values.tls.existingSecret "") -}}
- name: RUNPLANE_NATS_URL
  value: {{ .Values.nats.url | quote }}
- name: RUNPLANE_NATS_REPLICAS
  value: {{ .Values.nats.replicas | quote }}
- name: RUNPLANE_API_URL
  value: "{{ $name }}-scheduler:7070"
- name: RUNPLANE_REALTIME_URL
  value: "{{ $name }}-realtime:7071"
- name: RUNPLANE_REALTIME_HTTP_URL
  value: "{{ $http }}://{{ $name }}-realtime:7072"
{{- if .Values.tls.existingSecret }}
- name: RUNPLANE_TLS_CERT
  value: /etc/runplane/tls/tls.crt
- name: RUNPLANE_TLS_KEY
  value: /etc/runplane/tls/tls.key
- name: RUNPLANE_TLS_CA
  value: /etc/runplane/tls/ca.crt
{{- end }}
{{- range $key, $value := .Values.env }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "runplane.databaseEnv" -}}
- name: RUNPLANE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret: the Secret holding the database URL" .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end -}}

{{/* /tmp (the root filesystem is read-only) and the TLS files. */}}
{{- define "runplane.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /etc/runplane/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "runplane.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
{{- end }}
{{- end -}}

{{/* Liveness on /healthz and readiness on /readyz of a component's HTTP port. */}}
{{- define "runplane.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: http, scheme: {{ include "runplane.scheme" .root }}}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http, scheme: {{ include "runplane.scheme" .root }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
startupProbe:
  httpGet: {path: /healthz, port: http, scheme: {{ include "runplane.scheme" .root }}}
  periodSeconds: 2
  failureThreshold: 60
{{- end -}}

{{- define "runplane.podSpecCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  {{- include "runplane.volumes" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
