#!/usr/bin/env bash
# A real Kubernetes node on this machine, joined to the local control plane of hack/cluster.sh:
# Debian's containerd (CRI) + runc + CNI bridge, the kubelet, kube-proxy (iptables) and CoreDNS,
# all host processes. Pods get IPs on the bridge $BRIDGE ($POD_CIDR, gateway $GATEWAY); ClusterIP
# Services work through kube-proxy; CoreDNS answers cluster.local on the gateway address.
#
#   hack/node.sh up        bring it up (idempotent; needs `hack/cluster.sh up` first); waits for Ready
#   hack/node.sh down      drain, stop every component, delete the Node; keeps imported images
#   hack/node.sh purge     down, then also delete containerd's image store
#   hack/node.sh status    which components run
#   hack/node.sh import TARBALL...   `ctr images import` into the node's containerd
#   hack/node.sh env       print the exports (CONTAINERD_ADDRESS for ctr, KUBECONFIG, PATH)
#
# The node is labelled tpi.dev/real-node=true and tainted tpi.dev/real-node=true:NoSchedule, so
# only pods that ask for it (nodeSelector + toleration) land here, and the kwok tiers are not
# disturbed. kwok leaves it alone (it only manages nodes annotated kwok.x-k8s.io/node=fake).
#
# Needs root, apt packages containerd runc containernetworking-plugins iptables conntrack, and
# kubelet, kube-proxy, coredns in $BIN (hack/build-tools.sh).
#
# The config files (kubeconfig, containerd, CNI, kubelet, CoreDNS) are the templates in hack/node/,
# rendered into $NODE_DIR by write_configs.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" node # HACK, ROOT, ...; logs as [node]

NODE_NAME="${TPI_NODE_NAME:-tpi-node}"
NODE_DIR="${TPI_NODE_DIR:-$CACHE/node}"          # config, certs, logs, containerd's image store
RUN_DIR="$NODE_RUN_DIR"
KUBELET_ROOT="/var/lib/tpi-node/kubelet"          # pod volumes (tmpfs mounts live here)
CNI_STATE="/var/lib/tpi-node/cni"
POD_CIDR="${TPI_POD_CIDR:-10.88.0.0/16}"          # kwok's fake pod IPs use 10.244.0.0/16
GATEWAY="${TPI_POD_GATEWAY:-10.88.0.1}"
BRIDGE="${TPI_BRIDGE:-tpi0}"
# shellcheck disable=SC2034 # read by name: the templates use it (render_template)
CLUSTER_DOMAIN="cluster.local"
NODE_TAINT="${TPI_NODE_TAINT-$REAL_NODE_LABEL=true:NoSchedule}"
NODE_LABELS="${TPI_NODE_LABELS:-$REAL_NODE_LABEL=true}"
CNI_BIN_DIR="${TPI_CNI_BIN_DIR:-/usr/lib/cni}"
TEMPLATES="$HACK/node"                           # the config files, rendered into $NODE_DIR
LOGS="$NODE_DIR/logs"
PIDS="$NODE_DIR/pids"
COMPONENTS=(containerd coredns kube-proxy kubelet)

ctr_() { ctr --address "$CONTAINERD_SOCK" "$@"; }

check_prereqs() {
  [[ $(id -u) -eq 0 ]] || die "the node needs root (kubelet, containerd, iptables)"
  local b
  for b in kubelet kube-proxy coredns kubectl; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing: run hack/build-tools.sh"
  done
  for b in containerd containerd-shim-runc-v2 runc ctr iptables conntrack ip; do
    command -v "$b" >/dev/null || die "$b is missing: apt-get install containerd runc iptables conntrack iproute2"
  done
  for b in bridge host-local loopback portmap; do
    [[ -x "$CNI_BIN_DIR/$b" ]] || die "CNI plugin $CNI_BIN_DIR/$b is missing: apt-get install containernetworking-plugins"
  done
  [[ -f "$KUBECONFIG_ADMIN" && -f "$PKI/ca.key" ]] || die "no cluster at $CLUSTER_DIR: run hack/cluster.sh up first"
  kc get --raw /readyz >/dev/null 2>&1 || die "the apiserver does not answer: run hack/cluster.sh up first"
}

gen_certs() { # a kubelet client cert (system:node:<name>, O=system:nodes) and a serving cert
  local dir="$NODE_DIR/pki" ip; ip="$(host_ip)"
  mkdir -p "$dir"
  # Re-sign when the cluster CA changed (cluster.sh down + up with a wiped cache).
  if [[ -f "$dir/kubelet-client.crt" ]] && openssl verify -CAfile "$PKI/ca.crt" "$dir/kubelet-client.crt" >/dev/null 2>&1 \
     && openssl x509 -in "$dir/kubelet-client.crt" -noout -subject | grep "system:node:$NODE_NAME" >/dev/null; then
    return 0
  fi
  log "signing node certificates for system:node:$NODE_NAME"
  (
    cd "$dir"
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    printf 'extendedKeyUsage=serverAuth\nsubjectAltName=DNS:%s,IP:%s,IP:127.0.0.1\n' "$NODE_NAME" "$ip" >serving.ext
    sign_cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" client.ext
    sign_cert kubelet-serving "/CN=$NODE_NAME" serving.ext
  )
}

# shellcheck disable=SC2034 # the template variables are read by name (render_template)
# Not called in a command substitution (`x="$(write_configs)"`): errexit is off in there, so a
# failing step inside would go unnoticed. Sets PAUSE_TAR, the pause image's tarball.
write_configs() { # renders hack/node/* into $NODE_DIR
  PAUSE_TAR="$("$HACK/pause/build.sh")"
  mkdir -p "$NODE_DIR/cni" "$NODE_DIR/containerd-root"
  # What the templates use besides the settings above.
  local NODE_IP PAUSE_IMAGE RESTRICT_OOM_SCORE_ADJ=true RUNC_BINARY_LINE="" REGISTER_TAINT_LINE=""
  NODE_IP="$(host_ip)"
  PAUSE_IMAGE="$("$HACK/pause/build.sh" name)"
  # No CAP_SYS_RESOURCE (some sandboxes/VMs): runc cannot lower oom_score_adj, containerd must clamp.
  if (echo -1 >/proc/self/oom_score_adj) 2>/dev/null; then RESTRICT_OOM_SCORE_ADJ=false; fi
  if [[ -n "${TPI_NODE_RUNC:-}" ]]; then RUNC_BINARY_LINE="        BinaryName = \"$TPI_NODE_RUNC\""; fi
  if [[ -n "$NODE_TAINT" ]]; then
    local k v e rest
    k="${NODE_TAINT%%=*}"; rest="${NODE_TAINT#*=}"; v="${rest%%:*}"; e="${rest##*:}"
    REGISTER_TAINT_LINE="- {key: \"$k\", value: \"$v\", effect: \"$e\"}"
  fi
  local vars=(APISERVER_PORT PKI NODE_NAME NODE_DIR RUN_DIR CONTAINERD_SOCK CNI_BIN_DIR CNI_STATE BRIDGE
              POD_CIDR GATEWAY CLUSTER_DOMAIN KUBECONFIG_ADMIN NODE_IP PAUSE_IMAGE RESTRICT_OOM_SCORE_ADJ
              RUNC_BINARY_LINE REGISTER_TAINT_LINE)
  render_template "$TEMPLATES/kubeconfig.yaml" "$NODE_DIR/kubeconfig" "${vars[@]}"
  render_template "$TEMPLATES/containerd.toml" "$NODE_DIR/containerd.toml" "${vars[@]}"
  render_template "$TEMPLATES/10-tpi.conflist" "$NODE_DIR/cni/10-tpi.conflist" "${vars[@]}"
  render_template "$TEMPLATES/kubelet.yaml" "$NODE_DIR/kubelet.yaml" "${vars[@]}"
  render_template "$TEMPLATES/Corefile" "$NODE_DIR/Corefile" "${vars[@]}"
  # Pods with dnsPolicy Default get no upstream resolver: nothing here may leave the machine.
  printf 'options ndots:1\n' >"$NODE_DIR/resolv.conf"
}

ensure_network() {
  # The bridge exists before the first pod so CoreDNS can bind the gateway address.
  # (grep without -q below and in gen_certs: under pipefail, a writer killed by SIGPIPE when grep -q
  # stops early would turn a match into a failure.)
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr show dev "$BRIDGE" | grep "inet $GATEWAY/" >/dev/null || ip addr add "$GATEWAY/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  sysctl -qw net.ipv4.ip_forward=1
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  # docker sets FORWARD's policy to DROP: let pod traffic through (inside the pod CIDR only; pods
  # are not masqueraded, so nothing from a pod can leave the machine).
  local dir
  for dir in -s -d; do
    iptables -C FORWARD "$dir" "$POD_CIDR" -j ACCEPT 2>/dev/null || iptables -I FORWARD 1 "$dir" "$POD_CIDR" -j ACCEPT
  done
}

# The apiserver reaches kubelets by their Hostname address first (logs, exec, port-forward); the
# node's name must resolve on this machine. (With --kubelet-preferred-address-types=InternalIP,...
# on the apiserver this entry would not be needed.)
HOSTS_MARK="# hack/node.sh: $NODE_NAME"
ensure_hosts_entry() {
  local ip; ip="$(host_ip)"
  grep -qxF "$ip $NODE_NAME $HOSTS_MARK" /etc/hosts && return 0
  remove_hosts_entry
  echo "$ip $NODE_NAME $HOSTS_MARK" >>/etc/hosts
}
remove_hosts_entry() {
  # /etc/hosts may be a bind mount: rewrite it in place.
  local rest; rest="$(grep -vF "$HOSTS_MARK" /etc/hosts || true)"
  printf '%s\n' "$rest" >/etc/hosts
}

node_ready() {
  [[ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

up() {
  local t0; t0=$(date +%s.%N)
  check_prereqs
  mkdir -p "$NODE_DIR" "$LOGS" "$PIDS" "$RUN_DIR" "$KUBELET_ROOT" "$CNI_STATE"
  gen_certs
  write_configs
  ensure_network
  ensure_hosts_entry
  local ip; ip="$(host_ip)"

  # A control plane brought down and up again (hack/cluster.sh down wipes etcd) has lost this
  # Node, and a running kubelet only registers once: restart the API clients.
  if running kubelet && ! kc get node "$NODE_NAME" >/dev/null 2>&1; then
    log "the cluster has no Node $NODE_NAME any more (control plane recreated?): restarting the node's API clients"
    stop_bg kubelet kube-proxy coredns
  fi
  start_bg --append containerd containerd --config "$NODE_DIR/containerd.toml"
  wait_for "containerd" 30 ctr_ version
  local pause_image; pause_image="$("$HACK/pause/build.sh" name)"
  # grep reads the whole list (not -q): with pipefail, ctr killed by SIGPIPE would fail the test.
  if ! ctr_ -n k8s.io images ls -q | grep -x "$pause_image" >/dev/null; then
    ctr_ -n k8s.io images import "$PAUSE_TAR" >/dev/null
  fi

  start_bg --append coredns "$BIN/coredns" -conf "$NODE_DIR/Corefile"
  start_bg --append kube-proxy "$BIN/kube-proxy" --kubeconfig "$KUBECONFIG_ADMIN" \
    --hostname-override "$NODE_NAME" --proxy-mode iptables --cluster-cidr "$POD_CIDR" \
    --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
    --conntrack-max-per-core 0 --v=1

  start_bg --append kubelet "$BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$NODE_DIR/kubeconfig" \
    --root-dir "$KUBELET_ROOT" --hostname-override "$NODE_NAME" --node-ip "$ip" \
    --node-labels "$NODE_LABELS" --v=1

  wait_for "node $NODE_NAME Ready" 120 node_ready
  wait_for "CoreDNS ready" 60 curl -fsS http://127.0.0.1:18181/ready
  log "up in $(since "$t0")s: node $NODE_NAME, pods $POD_CIDR, DNS $GATEWAY"
}

cleanup_containers() { # whatever the kubelet left: kill tasks, delete containers (by their ids)
  ctr_ version >/dev/null 2>&1 || return 0
  local c
  for c in $(ctr_ -n k8s.io containers ls -q 2>/dev/null); do
    ctr_ -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
  done
  sleep 0.5
  for c in $(ctr_ -n k8s.io containers ls -q 2>/dev/null); do
    ctr_ -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
    ctr_ -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
  done
}

down() {
  mkdir -p "$PIDS"
  if running kubelet && kc get node "$NODE_NAME" >/dev/null 2>&1; then
    # Let the kubelet tear its pods down properly (CNI DEL, volume unmounts).
    log "deleting the pods on $NODE_NAME"
    kc delete pods --all-namespaces --field-selector "spec.nodeName=$NODE_NAME" --wait=false \
      --grace-period=1 >/dev/null 2>&1 || true
    local i
    for (( i = 0; i < 60; i++ )); do
      [[ -z "$(kc get pods -A --field-selector "spec.nodeName=$NODE_NAME" -o name 2>/dev/null)" ]] && break
      sleep 0.5
    done
  fi
  stop_bg kubelet
  cleanup_containers
  stop_bg kube-proxy
  stop_bg coredns
  stop_bg containerd
  # Shims outlive containerd; end the ones that belong to this node's containerd (by pid).
  local pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" || true); do
    kill -9 "$pid" 2>/dev/null || true
  done
  kc delete node "$NODE_NAME" --ignore-not-found >/dev/null 2>&1 || true
  # Unmount what pods left (tmpfs volumes, netns), then drop the state.
  local m
  for m in $(findmnt -rn -o TARGET | grep -E "^($KUBELET_ROOT|$RUN_DIR|/run/netns/cni-)" | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -f /run/netns/cni-* 2>/dev/null || true
  rm -rf "$KUBELET_ROOT" "$CNI_STATE" "$RUN_DIR"
  ip link del "$BRIDGE" 2>/dev/null || true
  remove_hosts_entry
  log "down (images kept in $NODE_DIR/containerd-root; 'purge' deletes them)"
}

status() {
  status_bg "${COMPONENTS[@]}"
  if node_ready; then echo "node $NODE_NAME Ready"; else echo "node $NODE_NAME not Ready"; fi
}

import_images() {
  running containerd || die "containerd is not running: hack/node.sh up"
  local t
  for t in "$@"; do
    log "importing $t"
    ctr_ -n k8s.io images import "$t" >/dev/null
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  purge) down; rm -rf "$NODE_DIR/containerd-root"; log "purged" ;;
  status) status ;;
  import) shift; import_images "$@" ;;
  env) echo "export CONTAINERD_ADDRESS=$CONTAINERD_SOCK CONTAINERD_NAMESPACE=k8s.io KUBECONFIG=$KUBECONFIG_ADMIN PATH=$BIN:\$PATH" ;;
  *) echo "usage: $0 up|down|purge|status|import TARBALL...|env" >&2; exit 2 ;;
esac
