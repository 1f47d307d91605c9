#!/usr/bin/env bash
# An opt-in check of docs/kueue.md against a real Kueue (not part of `make test`: building Kueue
# takes minutes). On a PRIVATE control plane (hack/cluster.sh with its own directory and ports,
# never the shared one): Kueue's manager built from the Go module proxy and run as a process, its
# webhooks served on 127.0.0.1; the operator of this checkout; two kwok nodes of 4 GPUs; a quota
# of 4 GPUs; two TPInferenceClusters of one group of 2 pods x 2 GPUs. Expected: one group admitted
# whole, the other gated (holding nothing, not released, not degraded, its status saying why)
# until the first is deleted; a recreated group (new incarnation, new pod-group name) and a rolled
# one (same name) admitted again. Prints PASS/FAIL per expectation, exits 1 if any failed.
# docs/kueue.md says what a run showed. About 8 minutes the first time (the build), 3.5 after.
#
#   hack/kueue-try.sh           build (cached), up, check, down
#   hack/kueue-try.sh build     build Kueue's manager into $TPI_CACHE/kueue/<version>
#   hack/kueue-try.sh up        the private cluster, Kueue and the operator
#   hack/kueue-try.sh check     the expectations (on a cluster that is up)
#   hack/kueue-try.sh down      stop everything this script started, delete the private state
#   hack/kueue-try.sh env       print `export KUBECONFIG=...` for the private cluster
#
# Everything runs under `nice -n 19` (the machine may be measuring something else).
set -euo pipefail

# The private control plane: its own directory and ports (TPI_KUEUE_* to change them).
export TPI_CLUSTER_DIR="${TPI_KUEUE_CLUSTER_DIR:-/tmp/tpi-kueue-cluster}"
export TPI_APISERVER_PORT="${TPI_KUEUE_APISERVER_PORT:-17443}" # +1..+3: controller-manager, scheduler, kwok
export TPI_ETCD_PORT="${TPI_KUEUE_ETCD_PORT:-13379}"
export TPI_FAKE_NODES=2 TPI_FAKE_NODE_GPUS=4

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" kueue

KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"
KUEUE_HOME="$CACHE/kueue/$KUEUE_VERSION"
KUEUE_BIN="$KUEUE_HOME/bin/kueue"
KUEUE_SRC="$KUEUE_HOME/src"                       # a writable copy of the module (the cache is read-only)
STATE="$CLUSTER_DIR/kueue"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
# shellcheck disable=SC2034 # read by name: render_template fills hack/kueue/config.yaml with them
{
  KUEUE_WEBHOOK_PORT="${TPI_KUEUE_WEBHOOK_PORT:-17450}"
  KUEUE_HEALTH_PORT="${TPI_KUEUE_HEALTH_PORT:-17451}"
  KUEUE_CERT_DIR="$STATE/webhook-certs"
}
OPERATOR_METRICS_PORT="${TPI_KUEUE_OPERATOR_METRICS_PORT:-17452}"
# The manager reads its metrics certificate from this fixed path when it does not manage its own
# certificates (cmd/kueue/main.go; in a cluster a Secret is mounted there).
METRICS_CERTS=/etc/kueue/metrics/certs
NS=inference
TEMPLATES="$HACK/kueue"
NICE=(nice -n 19)
FAILED=0

# ----------------------------------------------------------------------------------------- build
build() {
  if [[ -x "$KUEUE_BIN" ]]; then return 0; fi
  command -v go >/dev/null || die "go is missing (Kueue's manager is built from the Go module proxy)"
  local mod t0; t0=$(date +%s.%N)
  mod="$(go_module_dir "sigs.k8s.io/kueue@$KUEUE_VERSION")"
  log "building Kueue $KUEUE_VERSION's manager from $mod (minutes)"
  rm -rf "$KUEUE_SRC" && mkdir -p "$KUEUE_HOME/bin"
  cp -r "$mod" "$KUEUE_SRC" && chmod -R u+w "$KUEUE_SRC"
  (cd "$KUEUE_SRC" && "${NICE[@]}" go build -o "$KUEUE_BIN.tmp" ./cmd/kueue)
  mv "$KUEUE_BIN.tmp" "$KUEUE_BIN"
  log "built $KUEUE_BIN in $(since "$t0" %.0f)s"
}

# -------------------------------------------------------------------------------------------- up
kueue_ready() { curl -sf "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null; }
crds_established() {
  kc wait --for=condition=Established --timeout=5s crd/workloads.kueue.x-k8s.io \
    crd/clusterqueues.kueue.x-k8s.io crd/localqueues.kueue.x-k8s.io crd/resourceflavors.kueue.x-k8s.io \
    crd/tpinferenceclusters.tpi.dev >/dev/null
}

certs() {
  mkdir -p "$KUEUE_CERT_DIR"
  if [[ ! -f "$KUEUE_CERT_DIR/tls.crt" ]]; then
    (cd "$KUEUE_CERT_DIR" && printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >tls.ext \
      && sign_cert tls "/CN=kueue-webhook" tls.ext)
  fi
  if [[ ! -f "$METRICS_CERTS/tls.crt" ]]; then
    [[ -w /etc ]] || die "Kueue's manager needs $METRICS_CERTS/tls.{crt,key} (a fixed path) and /etc is not writable"
    log "writing $METRICS_CERTS (the manager reads its metrics certificate there; removed by down)"
    mkdir -p "$METRICS_CERTS"
    cp "$KUEUE_CERT_DIR/tls.crt" "$KUEUE_CERT_DIR/tls.key" "$METRICS_CERTS/"
    touch "$STATE/created-metrics-certs"
  fi
}

up() {
  build
  "${NICE[@]}" bash "$HACK/cluster.sh" up
  mkdir -p "$STATE" "$LOGS" "$PIDS"
  certs
  "$VENV/bin/python" "$TEMPLATES/local_manifests.py" "$KUEUE_SRC" "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" \
    "$PKI/ca.crt" >"$STATE/kueue-manifests.yaml"
  # The CRDs first (the manager watches them), the webhooks once it serves them (failurePolicy Fail).
  "$VENV/bin/python" -c 'import sys, yaml; sys.stdout.write(yaml.safe_dump_all(
    [d for d in yaml.safe_load_all(sys.stdin) if d["kind"] == sys.argv[1]]))' CustomResourceDefinition \
    <"$STATE/kueue-manifests.yaml" | kc apply --server-side --force-conflicts -f - >/dev/null
  kc apply --server-side --force-conflicts -f "$ROOT/crds/tpi.dev_tpinferenceclusters.yaml" >/dev/null
  wait_for "the CRDs" 60 crds_established
  kc get namespace kueue-system >/dev/null 2>&1 || kc create namespace kueue-system >/dev/null
  render_template "$TEMPLATES/config.yaml" "$STATE/config.yaml" KUEUE_HEALTH_PORT KUEUE_WEBHOOK_PORT KUEUE_CERT_DIR
  start_bg kueue "${NICE[@]}" "$KUEUE_BIN" --config "$STATE/config.yaml" --kubeconfig "$KUBECONFIG_ADMIN" \
    --zap-log-level=2
  wait_for "Kueue's manager (readyz)" 120 kueue_ready
  kc apply --server-side --force-conflicts -f "$STATE/kueue-manifests.yaml" >/dev/null
  kc get namespace "$NS" >/dev/null 2>&1 || kc create namespace "$NS" >/dev/null
  kc label namespace "$NS" tpi.dev/kueue=true --overwrite >/dev/null
  start_bg operator env PYTHONPATH="$ROOT/operator:$ROOT/contract" "${NICE[@]}" "$VENV/bin/python" -m tpi_operator \
    --namespace "$NS" --kubeconfig "$KUBECONFIG_ADMIN" --metrics-port "$OPERATOR_METRICS_PORT" --liveness-port 0 \
    --log-format plain
  log "up; KUBECONFIG=$KUBECONFIG_ADMIN (logs: $LOGS)"
}

down() {
  stop_bg operator kueue
  if [[ -f "$STATE/created-metrics-certs" ]]; then rm -rf /etc/kueue; fi
  bash "$HACK/cluster.sh" down
  rm -rf "$CLUSTER_DIR"
}

# ----------------------------------------------------------------------------------------- check
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }

# `within SECONDS DESCRIPTION COMMAND...`: PASS once the command succeeds, FAIL after SECONDS (the
# check goes on either way: later expectations say more about what went wrong).
within() {
  local secs="$1" what="$2" t0; shift 2
  t0=$(date +%s.%N)
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then fail "$what (not within ${secs}s)"; return 0; fi
    sleep 1
  done
  pass "$what (after $(since "$t0")s)"
}

# `holds SECONDS DESCRIPTION COMMAND...`: PASS if the command keeps succeeding for SECONDS.
holds() {
  local secs="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s) + secs ))
  while (( $(date +%s) < deadline )); do
    if ! "$@" >/dev/null 2>&1; then fail "$what (broke after $(( secs - deadline + $(date +%s) ))s)"; return 0; fi
    sleep 2
  done
  pass "$what (for ${secs}s)"
}

# The pods of one pod group as "name phase node gates" lines.
group_pods() { # pod-group-name
  kc -n "$NS" get pods -l "kueue.x-k8s.io/pod-group-name=$1" -o \
    jsonpath='{range .items[*]}{.metadata.name} {.status.phase} {.spec.nodeName}- {range .spec.schedulingGates[*]}{.name},{end}{"\n"}{end}'
}
# Every pod of the group (2) Running on a node with no scheduling gate left.
group_running() { # pod-group-name
  local lines; lines="$(group_pods "$1")"
  [[ "$(grep -c ' Running kwok-node-[0-9]*- $' <<<"$lines")" == 2 ]]
}
# Every pod of the group (2) held by Kueue's admission gate, on no node.
group_gated() { # pod-group-name
  local lines; lines="$(group_pods "$1")"
  [[ "$(grep -c ' Pending - .*kueue.x-k8s.io/admission' <<<"$lines")" == 2 ]]
}
wl_condition() { # workload condition-type
  kc -n "$NS" get workload "$1" -o jsonpath="{.status.conditions[?(@.type==\"$2\")].status}" 2>/dev/null
}
wl_admitted() { [[ "$(wl_condition "$1" Admitted)" == True ]]; }
wl_pending() { [[ "$(wl_condition "$1" QuotaReserved)" != True ]] && kc -n "$NS" get workload "$1" >/dev/null; }
wl_finished_or_gone() { ! kc -n "$NS" get workload "$1" >/dev/null 2>&1 || [[ "$(wl_condition "$1" Finished)" == True ]]; }
tpic() { # name jsonpath
  kc -n "$NS" get tpic "$1" -o jsonpath="$2" 2>/dev/null
}
# Not degraded, not released, and saying why it waits: what a group Kueue merely queues must show.
not_degraded() { # cluster
  [[ "$(tpic "$1" '{.status.conditions[?(@.type=="Degraded")].status}')" != True ]] &&
    [[ -z "$(tpic "$1" '{.status.groups[0].releasedAt}')" ]] &&
    [[ "$(tpic "$1" '{.status.conditions[?(@.type=="Progressing")].reason}')" == SchedulingGated ]]
}
rolled() { group_running "$1" && group_image "$1" "$2" && phase_is "${1%-g0-*}" Running; } # pod-group image
phase_is() { [[ "$(tpic "$1" '{.status.phase}')" == "$2" ]]; } # cluster phase
queued() { group_gated "$1-g0-i0" && not_degraded "$1"; } # cluster
cq_active() {
  [[ "$(kc get clusterqueue inference -o jsonpath='{.status.conditions[?(@.type=="Active")].status}')" == True ]]
}
show() { # cluster: its status, its pods, the workloads
  echo "  --- $1: phase=$(tpic "$1" '{.status.phase}') tp=$(tpic "$1" '{.status.tp}') ready=$(tpic "$1" '{.status.ready}')"
  tpic "$1" '{range .status.conditions[*]}    {.type}={.status} {.reason}: {.message}{"\n"}{end}'
  kc -n "$NS" get pods -l "tpi.dev/cluster=$1" -o wide --no-headers 2>/dev/null | sed 's/^/    /'
  echo "  --- workloads:"
  kc -n "$NS" get workloads -o wide --no-headers 2>/dev/null | sed 's/^/    /'
}
create_cluster() { # name [progressDeadlineSeconds [image]]
  # shellcheck disable=SC2034 # read by name: render_template fills hack/kueue/cluster.yaml with them
  local NAME="$1" NAMESPACE="$NS" DEADLINE="${2:-600}" IMAGE="${3:-tpi/runtime:dev}"
  render_template "$TEMPLATES/cluster.yaml" - NAME NAMESPACE DEADLINE IMAGE | kc apply -f - >/dev/null
}
# The group's pods all run this image (a roll went through).
group_image() { # pod-group-name image
  local images; images="$(kc -n "$NS" get pods -l "kueue.x-k8s.io/pod-group-name=$1" \
    -o jsonpath='{range .items[*]}{.spec.containers[0].image}{"\n"}{end}')"
  [[ "$(grep -cx "$2" <<<"$images")" == 2 ]]
}
pod_of() { # pod-group-name: the name of its first pod
  kc -n "$NS" get pods -l "kueue.x-k8s.io/pod-group-name=$1" -o jsonpath='{.items[0].metadata.name}'
}

check() {
  api_ready || die "the private cluster is not up: run $0 up"
  kueue_ready || die "Kueue's manager is not ready: run $0 up"
  # shellcheck disable=SC2034 # read by name by render_template
  local NAMESPACE="$NS"
  render_template "$TEMPLATES/queues.yaml" - NAMESPACE | kc apply --server-side -f - >/dev/null
  within 60 "ClusterQueue inference is Active" cq_active

  log "1. llama-a: its group (2 pods x 2 GPUs) fits the quota of 4 GPUs"
  create_cluster llama-a
  within 120 "llama-a's pod group llama-a-g0-i0 admitted whole: both pods ungated and Running" group_running llama-a-g0-i0
  within 30 "Workload llama-a-g0-i0 Admitted" wl_admitted llama-a-g0-i0
  within 60 "llama-a Running" phase_is llama-a Running

  log "2. llama-b: its group does not fit what is left of the quota (0 GPUs): it waits, gated"
  # progressDeadlineSeconds 60: time in the queue must not count (it did: Degraded after 600 s).
  create_cluster llama-b 60
  within 60 "llama-b's pods created and gated by kueue.x-k8s.io/admission" group_gated llama-b-g0-i0
  within 30 "Workload llama-b-g0-i0 pending on quota (QuotaReserved not True)" wl_pending llama-b-g0-i0
  # Past unschedulableTimeoutSeconds (120 s) and its progress deadline (60 s): a queued group must
  # not be released or degraded, and its status must say that it waits for admission.
  holds "${TPI_KUEUE_HOLD_SECONDS:-150}" \
    "llama-b stays gated, holds no node, is neither released nor degraded, Progressing=SchedulingGated" \
    queued llama-b
  show llama-b

  log "3. deleting llama-a frees the quota: llama-b is admitted"
  kc -n "$NS" delete tpic llama-a --wait=false >/dev/null
  within 120 "Workload llama-a-g0-i0 finished or deleted" wl_finished_or_gone llama-a-g0-i0
  within 120 "llama-b's pod group admitted whole: both pods Running" group_running llama-b-g0-i0
  within 60 "llama-b Running" phase_is llama-b Running

  log "4. a pod of llama-b's group deleted: the operator recreates the group as incarnation 1"
  kc -n "$NS" delete pod "$(pod_of llama-b-g0-i0)" --wait=false >/dev/null
  within 120 "the old pod group's Workload llama-b-g0-i0 finished or deleted (quota freed)" wl_finished_or_gone llama-b-g0-i0
  within 180 "the new pod group llama-b-g0-i1 admitted whole: both pods Running" group_running llama-b-g0-i1
  within 30 "Workload llama-b-g0-i1 Admitted" wl_admitted llama-b-g0-i1
  within 120 "llama-b Running again" phase_is llama-b Running
  show llama-b

  log "5. a roll (new image): the group keeps its pod-group name; Kueue replaces the finished Workload"
  create_cluster llama-b 60 tpi/runtime:v2
  within 180 "the roll: pod group llama-b-g0-i1 (same name) admitted whole on tpi/runtime:v2, llama-b Running" \
    rolled llama-b-g0-i1 tpi/runtime:v2
  within 30 "Workload llama-b-g0-i1 Admitted" wl_admitted llama-b-g0-i1
  show llama-b

  kc -n "$NS" delete tpic --all --wait=true --timeout=120s >/dev/null || true
  if (( FAILED )); then echo "$FAILED expectation(s) FAILED"; return 1; fi
  echo "all expectations PASSED"
}

case "${1:-all}" in
  build) build ;;
  up) up ;;
  check) check ;;
  down) down ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_ADMIN PATH=$BIN:\$PATH" ;;
  all)
    up
    rc=0; check || rc=$?
    down
    exit "$rc"
    ;;
  *) echo "usage: $0 [build|up|check|down|env|all]" >&2; exit 2 ;;
esac
