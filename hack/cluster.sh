#!/usr/bin/env bash
# A real Kubernetes control plane on this machine, from the binaries hack/build-tools.sh builds:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, plus kwok playing N fake nodes
# (cpu, memory and nvidia.com/gpu capacity) with the fault stages in hack/kwok/fault-stages.yaml.
#
#   hack/cluster.sh up          bring it up (idempotent; waits until the API answers)
#   hack/cluster.sh down        stop every component and delete its state
#   hack/cluster.sh status      which components run
#   hack/cluster.sh kubeconfig  print the kubeconfig path
#   hack/cluster.sh env         print `export KUBECONFIG=... PATH=...` for a shell
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
CACHE="${TPI_CACHE:-$HOME/.cache/tpi}"
BIN="${TPI_BIN:-$CACHE/k8s-$K8S_VERSION/bin}"
STATE="${TPI_CLUSTER_DIR:-$CACHE/cluster}"
KUBECONFIG_PATH="$STATE/kubeconfig"
APISERVER_PORT="${TPI_APISERVER_PORT:-16443}"
ETCD_PORT="${TPI_ETCD_PORT:-12379}"
NODES="${TPI_FAKE_NODES:-4}"
NODE_GPUS="${TPI_FAKE_NODE_GPUS:-4}"
NODE_CPU="${TPI_FAKE_NODE_CPU:-32}"
NODE_MEMORY="${TPI_FAKE_NODE_MEMORY:-256Gi}"
SERVICE_CIDR="10.96.0.0/16"
PKI="$STATE/pki"
LOGS="$STATE/logs"
PIDS="$STATE/pids"

log() { echo "[cluster] $*" >&2; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

host_ip() {
  # The apiserver advertises a non-loopback address (Endpoints may not hold 127.0.0.0/8).
  local ip
  ip="$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for(i=1;i<NF;i++) if($i=="src"){print $(i+1); exit}}')"
  [[ -n "$ip" ]] || ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
  [[ -n "$ip" ]] || die "cannot find a non-loopback IPv4 address for the apiserver to advertise"
  echo "$ip"
}

running() { [[ -f "$PIDS/$1" ]] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null; }

start() { # name, command...
  local name="$1"; shift
  running "$name" && return 0
  log "starting $name"
  setsid nohup "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$PIDS/$name"
}

gen_pki() {
  [[ -f "$PKI/admin.crt" ]] && return 0
  command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
  mkdir -p "$PKI" && cd "$PKI"
  local ip; ip="$(host_ip)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tpi-local-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  cat >apiserver.ext <<EXT
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:$ip
extendedKeyUsage=serverAuth,clientAuth
EXT
  sign() { # name, subject, extfile?
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      ${3:+-extfile "$3"} -out "$1.crt" 2>/dev/null
  }
  sign apiserver "/CN=kube-apiserver" apiserver.ext
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  sign admin "/O=system:masters/CN=tpi-admin" client.ext
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
}

write_kubeconfig() {
  cat >"$KUBECONFIG_PATH" <<KC
apiVersion: v1
kind: Config
clusters:
- name: tpi-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: tpi-admin
  user:
    client-certificate: $PKI/admin.crt
    client-key: $PKI/admin.key
contexts:
- name: tpi-local
  context: {cluster: tpi-local, user: tpi-admin}
current-context: tpi-local
KC
}

api_ready() {
  "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" get --raw /readyz >/dev/null 2>&1
}

wait_for() { # description, seconds, command...
  local what="$1" secs="$2"; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@"; do
    (( $(date +%s) < deadline )) || die "timed out after ${secs}s waiting for $what (logs: $LOGS)"
    sleep 0.5
  done
}

kwok_stages() {
  local dir
  dir="$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  [[ -d "$dir" ]] || die "cannot find kwok $KWOK_VERSION sources for its default stages"
  local s="$dir/kustomize/stage"
  for f in "$s/node/fast/node-initialize.yaml" "$s/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
           "$s/pod/fast/pod-ready.yaml" "$s/pod/fast/pod-complete.yaml" "$s/pod/fast/pod-delete.yaml" \
           "$HERE/kwok/fault-stages.yaml"; do
    echo "---"; cat "$f"
  done
}

fake_nodes() {
  local i
  for (( i = 0; i < NODES; i++ )); do
    cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    tpi.dev/fake-node: "true"
status:
  allocatable: {cpu: "$NODE_CPU", memory: "$NODE_MEMORY", pods: "110", nvidia.com/gpu: "$NODE_GPUS"}
  capacity: {cpu: "$NODE_CPU", memory: "$NODE_MEMORY", pods: "110", nvidia.com/gpu: "$NODE_GPUS"}
NODE
  done
}

up() {
  local t0; t0=$(date +%s.%N)
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubectl; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing: run hack/build-tools.sh first"
  done
  mkdir -p "$STATE" "$LOGS" "$PIDS"
  gen_pki
  write_kubeconfig
  local ip; ip="$(host_ip)"

  start etcd "$BIN/etcd" --name tpi --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "tpi=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 0.0.0.0 --secure-port "$APISERVER_PORT" --advertise-address "$ip" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/admin.crt" --kubelet-client-key "$PKI/admin.key" \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --enable-admission-plugins NodeRestriction \
    --profiling=false --v=1

  wait_for "kube-apiserver" 90 api_ready

  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$KUBECONFIG_PATH" --authentication-kubeconfig "$KUBECONFIG_PATH" \
    --authorization-kubeconfig "$KUBECONFIG_PATH" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$((APISERVER_PORT + 1))" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials=false --controllers '*,-nodeipam' \
    --concurrent-statefulset-syncs 10 --kube-api-qps 200 --kube-api-burst 400 --v=1

  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG_PATH" --authentication-kubeconfig "$KUBECONFIG_PATH" \
    --authorization-kubeconfig "$KUBECONFIG_PATH" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$((APISERVER_PORT + 2))" --v=1

  if ! running kwok; then
    kwok_stages >"$STATE/kwok.yaml"
  fi
  start kwok "$BIN/kwok" --kubeconfig "$KUBECONFIG_PATH" --config "$STATE/kwok.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --cidr 10.244.0.0/16 --node-ip "$ip" --server-address "127.0.0.1:$((APISERVER_PORT + 3))" \
    --node-lease-duration-seconds 40

  fake_nodes | "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" apply -f - >/dev/null
  wait_for "the default ServiceAccount" 60 default_sa_exists
  wait_for "$NODES fake nodes Ready" 60 nodes_ready
  log "up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}")s; KUBECONFIG=$KUBECONFIG_PATH"
}

default_sa_exists() {
  "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" get serviceaccount default -n default -o name >/dev/null 2>&1
}

nodes_ready() {
  local n
  n="$("$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" get nodes -l tpi.dev/fake-node=true \
      -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null \
      | grep -c True || true)"
  (( n >= NODES ))
}

down() {
  local name
  for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if running "$name"; then
      log "stopping $name"
      kill -- "-$(cat "$PIDS/$name")" 2>/dev/null || kill "$(cat "$PIDS/$name")" 2>/dev/null || true
    fi
  done
  for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    local i
    for (( i = 0; i < 50; i++ )); do running "$name" || break; sleep 0.2; done
    running "$name" && kill -9 "$(cat "$PIDS/$name")" 2>/dev/null || true
  done
  rm -rf "$STATE/etcd" "$PIDS" "$STATE/kwok.yaml"
  log "down"
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    if running "$name"; then echo "$name running (pid $(cat "$PIDS/$name"))"; else echo "$name stopped"; fi
  done
  api_ready && echo "API ready at https://127.0.0.1:$APISERVER_PORT" || echo "API not answering"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_PATH PATH=$BIN:\$PATH" ;;
  *) echo "usage: $0 up|down|status|kubeconfig|env" >&2; exit 2 ;;
esac
