{{/* Names. `fullnameOverride` replaces the release-derived name outright. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "herald.labels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "herald.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The headless Service every pod resolves through, ready or not. */}}
{{- define "herald.gossipHost" -}}
{{- printf "%s-gossip.%s.svc.%s" (include "herald.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/*
Spread edges across zones and nodes: losing a zone or a node then drops only
its share of streams, which resume on the others. ScheduleAnyway by default,
so a single-zone or small cluster still schedules every pod.
`topologySpreadConstraints` in values replaces these outright.
*/}}
{{- define "herald.topologySpreadConstraints" -}}
{{- if .Values.topologySpreadConstraints -}}
topologySpreadConstraints:
  {{- toYaml .Values.topologySpreadConstraints | nindent 2 }}
{{- else if .Values.defaultTopologySpread.enabled -}}
topologySpreadConstraints:
  {{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: 1
    topologyKey: {{ $key }}
    whenUnsatisfiable: {{ $.Values.defaultTopologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "herald.selectorLabels" $ | nindent 8 }}
    # Count only pods of the same ReplicaSet, so a rolling update spreads too.
    matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end -}}
{{- end -}}

{{/* What the public may reach: the Ingress and HTTPRoute route these only. */}}
{{- define "herald.publicPaths" -}}
- /v1/stream
- /v1/publish
{{- end -}}

{{/* Whether the helm test pod mints its own tokens (HS256 secret, HS256 accepted). */}}
{{- define "herald.tests.mint" -}}
{{- if and (not .Values.tests.existingSecret) (include "herald.auth.hs256" .) (or (not .Values.auth.algorithms) (has "HS256" .Values.auth.algorithms)) }}true{{ end -}}
{{- end -}}
