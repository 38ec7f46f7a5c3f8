{{/* Name of every object of the release: `<release>-agent` (`mesh-agent` for release `mesh`). */}}
{{- define "mesh.fullname" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels selecting the agent's pods. */}}
{{- define "mesh.selectorLabels" -}}
app.kubernetes.io/name: mesh-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "mesh.labels" -}}
{{ include "mesh.selectorLabels" . }}
app.kubernetes.io/part-of: mesh
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The agent's image reference. */}}
{{- define "mesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
