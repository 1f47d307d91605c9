{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "tpi-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, with the chart name unless the release already
contains it. Truncated to 63 characters.
*/}}
{{- define "tpi-operator.fullname" -}}
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

{{- define "tpi-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tpi-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tpi-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tpi-operator.labels" -}}
helm.sh/chart: {{ include "tpi-operator.chart" . }}
{{ include "tpi-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tpi
app.kubernetes.io/component: operator
{{- end }}

{{- define "tpi-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tpi-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
True ("true") when the operator watches every namespace.
*/}}
{{- define "tpi-operator.clusterWide" -}}
{{- if empty .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
Rules for the namespaced resources the operator reconciles. Bound cluster-wide (ClusterRole) or per
watched namespace (Role). No wildcards: every group, resource and verb is named.
*/}}
{{- define "tpi-operator.namespacedRules" -}}
# The custom resource: watch it, patch its finalizers/annotations (kopf's progress) and status.
- apiGroups: ["tpi.dev"]
  resources: ["tpinferenceclusters"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["tpi.dev"]
  resources: ["tpinferenceclusters/status", "tpinferenceclusters/scale"]
  verbs: ["get", "patch", "update"]
# OwnerReferences with blockOwnerDeletion need update on the owner's finalizers where the
# OwnerReferencesPermissionEnforcement admission plugin runs.
- apiGroups: ["tpi.dev"]
  resources: ["tpinferenceclusters/finalizers"]
  verbs: ["update"]
# What a TPInferenceCluster is rendered into.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["create", "get", "list", "watch", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["create", "get", "list", "watch", "patch", "update", "delete"]
# Per-rank heartbeat Leases. The operator grants the runtime's Role lease verbs, so RBAC's
# escalation check requires it to hold them itself.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create", "get", "list", "watch", "patch", "update", "delete"]
# The per-cluster Role (Leases only) and RoleBinding for the rank pods' ServiceAccount.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "get", "list", "watch", "patch", "update", "delete"]
# One PodDisruptionBudget per cluster: server-side apply (patch; create when it is new) and a
# read for the ownership check. Never listed, watched or deleted: owner references clean it up.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
# Rank pods: observe them and delete a stuck or failed rank to restart it.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
# Events about reconciliation (kopf posts core events; the operator may post events.k8s.io ones).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if and .Values.peering.enabled (not (include "tpi-operator.clusterWide" .)) }}
# kopf peering between operator replicas (namespaced peering objects, per watched namespace).
- apiGroups: [{{ .Values.peering.apiGroup | quote }}]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Cluster-scoped rules, whatever the watched namespaces are.
*/}}
{{- define "tpi-operator.clusterScopedRules" -}}
# kopf scans CRDs to resolve the resources it serves.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
# kopf observes namespaces to start and stop its per-namespace watchers.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
# The operator's node index (a watch): is a rank's node lost (NotReady, unreachable, deleted)?
# And allocatable, labels and taints for the free-capacity estimate of a degraded cluster.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
{{- if and .Values.rbac.listPodsClusterWide (not (include "tpi-operator.clusterWide" .)) }}
# Opt-in (rbac.listPodsClusterWide): count every namespace's pods in that estimate (one query per
# candidate node, selected on spec.nodeName).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}
{{- if and .Values.peering.enabled (include "tpi-operator.clusterWide" .) }}
# kopf peering for a cluster-wide operator (cluster-scoped peering objects).
- apiGroups: [{{ .Values.peering.apiGroup | quote }}]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/*
Arguments of `python -m tpi_operator` (operator/tpi_operator/__main__.py). No --namespace at all
means cluster-wide.
*/}}
{{- define "tpi-operator.args" -}}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
- --liveness-port={{ .Values.liveness.port }}
- --metrics-port={{ .Values.metrics.port }}
{{- if .Values.peering.enabled }}
- --peering={{ .Values.peering.name }}
{{- end }}
{{- range .Values.allowedHostPaths }}
- --allowed-host-path={{ . }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
With peering, every replica needs its own kopf priority (equal priorities would all stay active):
a POSIX-shell wrapper derives it from the pod name (CRC-32 via cksum) and execs the operator.
*/}}
{{- define "tpi-operator.priorityWrapper" -}}
exec python -m tpi_operator --priority="$(printf '%s' "$POD_NAME" | cksum | cut -d ' ' -f 1)" "$@"
{{- end }}
