{{/* Names, labels, images and the security settings every Kiln pod shares. */}}

{{- define "kiln.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release> when it already contains "kiln", else <release>-kiln; 63 characters at most. */}}
{{- define "kiln.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiln
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kiln.componentLabels" -}}
{{ include "kiln.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Object name of a component: <fullname>-<component>. */}}
{{- define "kiln.componentName" -}}
{{- printf "%s-%s" (include "kiln.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ServiceAccount of a component; call with (dict "ctx" $ "component" "operator" "values" .Values.operator). */}}
{{- define "kiln.serviceAccountName" -}}
{{- if .values.serviceAccount.create -}}
{{- default (include "kiln.componentName" .) .values.serviceAccount.name -}}
{{- else -}}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .key .key) .values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference of a component: its own repository/tag/digest, else the global ones. */}}
{{- define "kiln.image" -}}
{{- $repository := default .ctx.Values.image.repository .values.image.repository -}}
{{- $digest := default .ctx.Values.image.digest .values.image.digest -}}
{{- $tag := default (default .ctx.Chart.AppVersion .ctx.Values.image.tag) .values.image.tag -}}
{{- if $digest -}}
{{- printf "%s@%s" $repository $digest -}}
{{- else -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Pod Security Standards "restricted": non-root, seccomp RuntimeDefault. */}}
{{- define "kiln.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every container: read-only root filesystem, no privilege escalation, no capabilities. */}}
{{- define "kiln.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The downward-API environment every component reads (identity for leases and events). */}}
{{- define "kiln.podEnv" -}}
# POD_IP: where a component binds when pods share the host's network (the local process node).
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: KILN_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: KILN_LOG_LEVEL
  value: {{ upper .Values.logLevel | quote }}
{{- with .Values.watchNamespaces }}
- name: KILN_WATCH_NAMESPACES
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{/* "true" when Prometheus Operator objects are rendered (forced, or auto and the API is served). */}}
{{- define "kiln.prometheusOperator" -}}
{{- $mode := .Values.monitoring.prometheusOperator -}}
{{- if or (eq $mode "enabled") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end -}}
{{- end -}}

{{/* Checks across values that a JSON schema cannot express; each message names the value. */}}
{{- define "kiln.validate" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) -}}
{{- fail (printf "operator.replicas is %d but operator.leaderElection.enabled is false: two operators without leader election would fight over every object. Enable leader election or set operator.replicas to 1." (int .Values.operator.replicas)) -}}
{{- end -}}
{{- if and .Values.autoscaler.enabled (gt (int .Values.autoscaler.replicas) 1) (not .Values.autoscaler.leaderElection.enabled) -}}
{{- fail (printf "autoscaler.replicas is %d but autoscaler.leaderElection.enabled is false: two autoscalers would both scale. Enable leader election or set autoscaler.replicas to 1." (int .Values.autoscaler.replicas)) -}}
{{- end -}}
{{- if and .Values.autoscaler.enabled (eq .Values.autoscaler.metricsSource "prometheus") (not .Values.autoscaler.prometheus.url) -}}
{{- fail "autoscaler.prometheus.url is empty but autoscaler.metricsSource is prometheus: set the URL of your Prometheus (e.g. http://prometheus-operated.monitoring.svc:9090)." -}}
{{- end -}}
{{- $le := .Values.operator.leaderElection -}}
{{- if and $le.enabled (le (int $le.leaseDuration) (int $le.renewDeadline)) -}}
{{- fail (printf "operator.leaderElection.leaseDuration (%v) must be greater than operator.leaderElection.renewDeadline (%v)." $le.leaseDuration $le.renewDeadline) -}}
{{- end -}}
{{- $ale := .Values.autoscaler.leaderElection -}}
{{- if and .Values.autoscaler.enabled $ale.enabled (le (int $ale.leaseDuration) (int $ale.renewDeadline)) -}}
{{- fail (printf "autoscaler.leaderElection.leaseDuration (%v) must be greater than autoscaler.leaderElection.renewDeadline (%v)." $ale.leaseDuration $ale.renewDeadline) -}}
{{- end -}}
{{- end -}}

{{/* Binds a component's namespaced ClusterRole: cluster-wide, or in each of watchNamespaces.
Call with (dict "ctx" $ "component" "operator" "role" <ClusterRole name> "serviceAccount" <name>). */}}
{{- define "kiln.bindNamespacedRole" -}}
{{- $ctx := .ctx -}}
{{- if not $ctx.Values.watchNamespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .role }}
  labels:
    {{- include "kiln.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .role }}
subjects:
  - kind: ServiceAccount
    name: {{ .serviceAccount }}
    namespace: {{ $ctx.Release.Namespace }}
{{- else }}
{{- range $namespace := $ctx.Values.watchNamespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $.role }}
  namespace: {{ $namespace }}
  labels:
    {{- include "kiln.componentLabels" (dict "ctx" $ctx "component" $.component) | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $.role }}
subjects:
  - kind: ServiceAccount
    name: {{ $.serviceAccount }}
    namespace: {{ $ctx.Release.Namespace }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Role + RoleBinding for leader election (Leases) in the release namespace; "verbs" defaults
to what a client-go or kopf-style elector uses. */}}
{{- define "kiln.leaderElectionRole" -}}
{{- $ctx := .ctx -}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ .role }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "kiln.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
rules:
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: {{ toJson (.verbs | default (list "get" "create" "update" "patch")) }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ .role }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "kiln.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ .role }}
subjects:
  - kind: ServiceAccount
    name: {{ .serviceAccount }}
    namespace: {{ $ctx.Release.Namespace }}
{{- end -}}

{{/* NetworkPolicy egress every component needs: cluster DNS and the API server. */}}
{{- define "kiln.egressDNSAndAPI" -}}
- to:
    - namespaceSelector:
        {{- toYaml .dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .dns.podSelector | nindent 8 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
- to:
    {{- range .apiServer.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range .apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end -}}
{{- define "kiln.ingressMetrics" -}}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .from }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
