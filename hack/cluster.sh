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
#
# The admin kubeconfig and the fake nodes are the templates in hack/cluster/.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" cluster # HACK, ROOT, ...; logs as [cluster]

STATE="$CLUSTER_DIR"
ETCD_PORT="${TPI_ETCD_PORT:-12379}"
NODES="${TPI_FAKE_NODES:-4}"
# shellcheck disable=SC2034 # read by name: render_template fills hack/cluster/fake-node.yaml with them
{
  NODE_GPUS="${TPI_FAKE_NODE_GPUS:-4}"
  NODE_CPU="${TPI_FAKE_NODE_CPU:-32}"
  NODE_MEMORY="${TPI_FAKE_NODE_MEMORY:-256Gi}"
}
SERVICE_CIDR="10.96.0.0/16"
TEMPLATES="$HACK/cluster"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

gen_pki() {
  [[ -f "$PKI/admin.crt" ]] && return 0
  command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
  mkdir -p "$PKI"
  cd "$PKI"
  local ip; ip="$(host_ip)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tpi-local-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  cat >apiserver.ext <<EXT
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:$ip
extendedKeyUsage=serverAuth,clientAuth
EXT
  sign_cert apiserver "/CN=kube-apiserver" apiserver.ext
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  sign_cert admin "/O=system:masters/CN=tpi-admin" client.ext
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
}

write_kubeconfig() {
  render_template "$TEMPLATES/kubeconfig.yaml" "$KUBECONFIG_ADMIN" APISERVER_PORT PKI
}

kwok_stages() {
  local dir f
  dir="$(go_module_dir "sigs.k8s.io/kwok@$KWOK_VERSION")"
  local s="$dir/kustomize/stage"
  for f in "$s/node/fast/node-initialize.yaml" "$s/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
           "$s/pod/fast/pod-ready.yaml" "$s/pod/fast/pod-complete.yaml" "$s/pod/fast/pod-delete.yaml" \
           "$HACK/kwok/fault-stages.yaml"; do
    echo "---"; cat "$f"
  done
}

fake_nodes() {
  local NODE_INDEX
  for (( NODE_INDEX = 0; NODE_INDEX < NODES; NODE_INDEX++ )); do
    render_template "$TEMPLATES/fake-node.yaml" - NODE_INDEX NODE_CPU NODE_MEMORY NODE_GPUS
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

  start_bg etcd "$BIN/etcd" --name tpi --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "tpi=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn

  start_bg kube-apiserver "$BIN/kube-apiserver" \
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

  start_bg kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$KUBECONFIG_ADMIN" --authentication-kubeconfig "$KUBECONFIG_ADMIN" \
    --authorization-kubeconfig "$KUBECONFIG_ADMIN" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$((APISERVER_PORT + 1))" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials=false --controllers '*,-nodeipam' \
    --concurrent-statefulset-syncs 10 --kube-api-qps 200 --kube-api-burst 400 --v=1

  start_bg kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG_ADMIN" --authentication-kubeconfig "$KUBECONFIG_ADMIN" \
    --authorization-kubeconfig "$KUBECONFIG_ADMIN" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$((APISERVER_PORT + 2))" --v=1

  if ! running kwok; then
    kwok_stages >"$STATE/kwok.yaml"
  fi
  start_bg kwok "$BIN/kwok" --kubeconfig "$KUBECONFIG_ADMIN" --config "$STATE/kwok.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --cidr 10.244.0.0/16 --node-ip "$ip" --server-address "127.0.0.1:$((APISERVER_PORT + 3))" \
    --node-lease-duration-seconds 40

  fake_nodes | kc apply -f - >/dev/null
  wait_for "the default ServiceAccount" 60 default_sa_exists
  wait_for "$NODES fake nodes Ready" 60 nodes_ready
  log "up in $(since "$t0")s; KUBECONFIG=$KUBECONFIG_ADMIN"
}

default_sa_exists() {
  kc get serviceaccount default -n default -o name >/dev/null 2>&1
}

nodes_ready() {
  local n
  n="$(kc get nodes -l tpi.dev/fake-node=true \
      -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null \
      | grep -c True || true)"
  (( n >= NODES ))
}

down() {
  stop_bg kwok kube-scheduler kube-controller-manager kube-apiserver etcd
  rm -rf "$STATE/etcd" "$PIDS" "$STATE/kwok.yaml"
  log "down"
}

status() {
  status_bg "${COMPONENTS[@]}"
  if api_ready; then echo "API ready at https://127.0.0.1:$APISERVER_PORT"; else echo "API not answering"; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  kubeconfig) echo "$KUBECONFIG_ADMIN" ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_ADMIN PATH=$BIN:\$PATH" ;;
  *) echo "usage: $0 up|down|status|kubeconfig|env" >&2; exit 2 ;;
esac
