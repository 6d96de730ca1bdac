{{/*
Token verification (docs/security.md). Every auth.* value becomes a
HERALD__AUTH__* variable here, and key files are mounted from the Secret or
ConfigMap that holds them, whole (no subPath), so a rotated JWKS reaches the
pod and is re-read every auth.jwks.refreshSecs.
*/}}

{{- define "herald.auth.hs256" -}}
{{- if or .Values.auth.hs256Secret .Values.auth.existingSecret }}true{{ end -}}
{{- end -}}

{{- define "herald.auth.hs256SecretName" -}}
{{- default (include "herald.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The key in that Secret: the chart's own Secret uses hs256-secret. */}}
{{- define "herald.auth.hs256SecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}hs256-secret{{ end -}}
{{- end -}}

{{/* Key files: name → (value, mount directory). */}}
{{- define "herald.auth.files" -}}
publicKey: { dir: /etc/herald-auth/public-key, env: HERALD__AUTH__PUBLIC_KEY_FILE }
jwks: { dir: /etc/herald-auth/jwks, env: HERALD__AUTH__JWKS_FILE }
jwksCa: { dir: /etc/herald-auth/jwks-ca, env: HERALD__AUTH__JWKS_CA_FILE }
{{- end -}}

{{- define "herald.auth.hasSource" -}}
{{- if or .existingSecret .existingConfigMap }}true{{ end -}}
{{- end -}}

{{- define "herald.auth.asymmetric" -}}
{{- $a := .Values.auth -}}
{{- if or (include "herald.auth.hasSource" $a.publicKey) (include "herald.auth.hasSource" $a.jwks) $a.jwksUrl $a.oidcIssuer }}true{{ end -}}
{{- end -}}

{{/* auth.algorithms, or HS256 with a secret plus RS256 with public keys. */}}
{{- define "herald.auth.algorithms" -}}
{{- $algorithms := .Values.auth.algorithms -}}
{{- if not $algorithms -}}
{{- if include "herald.auth.hs256" . }}{{ $algorithms = append $algorithms "HS256" }}{{ end -}}
{{- if include "herald.auth.asymmetric" . }}{{ $algorithms = append $algorithms "RS256" }}{{ end -}}
{{- end -}}
{{- join "," $algorithms -}}
{{- end -}}

{{- define "herald.auth.validate" -}}
{{- $a := .Values.auth -}}
{{- if not (or (include "herald.auth.hs256" .) (include "herald.auth.asymmetric" .) $a.issuers) -}}
{{- fail "auth: set a key source: auth.hs256Secret or auth.existingSecret (HS256), auth.publicKey, auth.jwks, auth.jwksUrl, auth.oidcIssuer or auth.issuers" -}}
{{- end -}}
{{- range $name, $_ := include "herald.auth.files" . | fromYaml -}}
{{- $source := index $a $name -}}
{{- if and $source.existingSecret $source.existingConfigMap -}}
{{- fail (printf "auth.%s: set existingSecret or existingConfigMap, not both" $name) -}}
{{- end -}}
{{- end -}}
{{- if and $a.issuer $a.oidcIssuer -}}
{{- fail "auth.issuer: leave it empty with auth.oidcIssuer, which is the iss the provider's tokens must carry (an HS256 secret beside it verifies tokens of any other iss)" -}}
{{- end -}}
{{- if and (include "herald.auth.hasSource" $a.jwksCa) (not (or $a.jwksUrl $a.oidcIssuer)) -}}
{{- fail "auth.jwksCa is only used with auth.jwksUrl or auth.oidcIssuer" -}}
{{- end -}}
{{- end -}}

{{/* The container's HERALD__AUTH__* variables. */}}
{{- define "herald.auth.env" -}}
{{- $a := .Values.auth -}}
- name: HERALD__AUTH__ALGORITHMS
  value: {{ include "herald.auth.algorithms" . | quote }}
{{- if include "herald.auth.hs256" . }}
- name: HERALD__AUTH__HS256_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "herald.auth.hs256SecretName" . }}
      key: {{ include "herald.auth.hs256SecretKey" . }}
{{- end }}
{{- range $name, $file := include "herald.auth.files" . | fromYaml }}
{{- $source := index $a $name }}
{{- if include "herald.auth.hasSource" $source }}
- name: {{ $file.env }}
  value: {{ printf "%s/%s" $file.dir $source.key | quote }}
{{- end }}
{{- end }}
{{- if include "herald.auth.hasSource" $a.jwks }}
- name: HERALD__AUTH__JWKS_REFRESH_SECS
  value: {{ $a.jwks.refreshSecs | quote }}
{{- end }}
{{- with $a.jwksUrl }}
- name: HERALD__AUTH__JWKS_URL
  value: {{ . | quote }}
{{- end }}
{{- with $a.oidcIssuer }}
- name: HERALD__AUTH__OIDC_ISSUER
  value: {{ . | quote }}
{{- end }}
{{- if or $a.jwksUrl $a.oidcIssuer $a.issuers }}
- name: HERALD__AUTH__JWKS_MIN_REFRESH_SECS
  value: {{ $a.jwksFetch.minRefreshSecs | quote }}
- name: HERALD__AUTH__JWKS_MAX_REFRESH_SECS
  value: {{ $a.jwksFetch.maxRefreshSecs | quote }}
- name: HERALD__AUTH__JWKS_START_WAIT_SECS
  value: {{ $a.jwksFetch.startWaitSecs | quote }}
{{- end }}
{{- include "herald.auth.claimsEnv" . }}
{{- end -}}

{{/* iss and aud: also given to the helm test pod, whose tokens must carry them. */}}
{{- define "herald.auth.claimsEnv" -}}
{{- with .Values.auth.issuer }}
- name: HERALD__AUTH__ISSUER
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.audience }}
- name: HERALD__AUTH__AUDIENCE
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "herald.auth.volumeMounts" -}}
{{- range $name, $file := include "herald.auth.files" . | fromYaml }}
{{- if include "herald.auth.hasSource" (index $.Values.auth $name) }}
- { name: auth-{{ $name | kebabcase }}, mountPath: {{ $file.dir }}, readOnly: true }
{{- end }}
{{- end }}
{{- end -}}

{{- define "herald.auth.volumes" -}}
{{- range $name, $_ := include "herald.auth.files" . | fromYaml }}
{{- $source := index $.Values.auth $name }}
{{- if $source.existingSecret }}
- name: auth-{{ $name | kebabcase }}
  secret:
    secretName: {{ $source.existingSecret }}
    items: [{ key: {{ $source.key | quote }}, path: {{ $source.key | quote }} }]
{{- else if $source.existingConfigMap }}
- name: auth-{{ $name | kebabcase }}
  configMap:
    name: {{ $source.existingConfigMap }}
    items: [{ key: {{ $source.key | quote }}, path: {{ $source.key | quote }} }]
{{- end }}
{{- end }}
{{- end -}}

{{/* auth.issuers as [[auth.issuers]] tables of herald.toml (lists cannot be
environment variables). */}}
{{- define "herald.auth.issuersToml" -}}
{{- range $n, $_ := .Values.auth.issuers }}
{{- if $n }}{{ "\n\n" }}{{ end -}}
[[auth.issuers]]
{{- with .issuer }}
issuer = {{ . | quote }}
{{- end }}
{{- with .oidcIssuer }}
oidc_issuer = {{ . | quote }}
{{- end }}
{{- with .jwksUrl }}
jwks_url = {{ . | quote }}
{{- end }}
{{- with .jwksCaFile }}
jwks_ca_file = {{ . | quote }}
{{- end }}
{{- with .audience }}
audience = {{ . | quote }}
{{- end }}
{{- with .algorithms }}
algorithms = [{{ range $i, $algorithm := . }}{{ if $i }}, {{ end }}{{ $algorithm | quote }}{{ end }}]
{{- end }}
{{- end }}
{{- end -}}
