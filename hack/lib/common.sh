# shellcheck shell=bash disable=SC2034 # the settings are for the scripts that source this file
# Sourced by every script in hack/ (after kind's hack/lib): the versions, the paths of the caches,
# `log`/`die`, `wait_for`, and the helpers that run a component in the background with a pid file.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" cluster    # logs as [cluster]
#
# The argument (always given: a sourced file without arguments would see the script's own) is the
# prefix of the script's messages.
#
# Every default can be overridden from the environment (K8S_VERSION, TPI_CACHE, TPI_VENV, TPI_BIN,
# TPI_CLUSTER_DIR, TPI_APISERVER_PORT, ...). The Makefile reads the same defaults from here
# (`bash hack/lib/common.sh print NAME...`), so each version and path is written down once.

# ----------------------------------------------------------------------------------- versions
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"

# -------------------------------------------------------------------------------------- paths
HACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(dirname "$HACK")"
CACHE="${TPI_CACHE:-$HOME/.cache/tpi}"                 # everything built or downloaded
VENV="${TPI_VENV:-$CACHE/venv}"
BIN="${TPI_BIN:-$CACHE/k8s-$K8S_VERSION/bin}"          # hack/build-tools.sh installs here
CLUSTER_DIR="${TPI_CLUSTER_DIR:-$CACHE/cluster}"       # hack/cluster.sh's state
KUBECONFIG_ADMIN="$CLUSTER_DIR/kubeconfig"
PKI="$CLUSTER_DIR/pki"
APISERVER_PORT="${TPI_APISERVER_PORT:-16443}"
IMAGES="$CACHE/images"                                 # base rootfs, pause image, build stamps
STAMPS="$IMAGES/stamps"                                # what hack/build-images.sh --cache built, what e2e.sh loaded

# The real node (hack/node.sh): what pods select and tolerate to land on it, and its containerd.
REAL_NODE_LABEL="tpi.dev/real-node"
NODE_RUN_DIR="/run/tpi-node"                           # sockets and runtime state (tmpfs)
CONTAINERD_SOCK="$NODE_RUN_DIR/containerd/containerd.sock"

# Image names (the e2e tier and the demo use the same; hack/tpikit/kube.py reads them from here).
DEFAULT_OPERATOR_IMAGE="tpi/operator:dev"
DEFAULT_RUNTIME_IMAGE="tpi/runtime:dev"
DEFAULT_BASE_IMAGE="tpi/base:bookworm"

# ---------------------------------------------------------------------------------- messages
LOG_PREFIX="${1:-hack}"
log() { echo "[$LOG_PREFIX] $*" >&2; }
die() { echo "[$LOG_PREFIX] error: $*" >&2; exit 1; }

# Seconds since a `date +%s.%N` timestamp, with one decimal (printf format optional).
since() { # t0 [format]
  awk "BEGIN{printf \"${2:-%.1f}\", $(date +%s.%N) - $1}"
}

# Poll a command (its output discarded) every 0.5 s until it succeeds; die after `seconds`.
# The command runs as an `until` condition, where `set -e` does not apply: it must report through
# its exit status (a predicate), which every caller's does.
wait_for() { # description, seconds, command...
  local what="$1" secs="$2"; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || die "timed out after ${secs}s waiting for $what${LOGS:+ (logs: $LOGS)}"
    sleep 0.5
  done
}

# ------------------------------------------------------------------- background components
# A component runs detached (setsid: its own session and process group) with its pid in
# $PIDS/<name> and its output in $LOGS/<name>.log; the calling script sets PIDS and LOGS.
running() { # name
  [[ -f "$PIDS/$1" ]] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null
}

# A daemon must not inherit the caller's other descriptors: under `flock LOCK hack/e2e.sh`, a
# kubelet or dockerd started by the run would hold LOCK for as long as it lives, and every later
# `flock LOCK ...` would wait forever.
close_inherited_fds() {
  local fd
  for fd in /proc/"$BASHPID"/fd/*; do
    fd="${fd##*/}"
    if (( fd > 2 )); then eval "exec ${fd}>&-"; fi
  done
  return 0
}

start_bg() { # [--append] name command...: start unless running (the log is truncated unless --append)
  local append=0
  if [[ "$1" == --append ]]; then append=1; shift; fi
  local name="$1"; shift
  running "$name" && return 0
  log "starting $name"
  if [[ $append == 1 ]]; then
    (close_inherited_fds; exec setsid nohup "$@" >>"$LOGS/$name.log" 2>&1 </dev/null) &
  else
    (close_inherited_fds; exec setsid nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null) &
  fi
  echo $! >"$PIDS/$name"
}

stop_bg() { # name...: SIGTERM to each one's process group, wait up to 10 s each, then SIGKILL
  local name pid i
  for name in "$@"; do
    running "$name" || continue
    pid="$(cat "$PIDS/$name")"
    log "stopping $name"
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  done
  for name in "$@"; do
    for (( i = 0; i < 50; i++ )); do running "$name" || break; sleep 0.2; done
    if running "$name"; then kill -9 "$(cat "$PIDS/$name")" 2>/dev/null || true; fi
    rm -f "$PIDS/$name"
  done
}

status_bg() { # name...: one line each, "NAME running (pid N)" or "NAME stopped"
  local name
  for name in "$@"; do
    if running "$name"; then echo "$name running (pid $(cat "$PIDS/$name"))"; else echo "$name stopped"; fi
  done
}

# ------------------------------------------------------------------------------------ cluster
# The address the apiserver advertises and the node registers with: a non-loopback IPv4 address
# (Endpoints may not hold 127.0.0.0/8).
host_ip() {
  local ip
  # `|| ip=""`: no route is not an error here (the next line tries another way), also where
  # errexit is on (a call outside a command substitution).
  ip="$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for(i=1;i<NF;i++) if($i=="src"){print $(i+1); exit}}')" || ip=""
  [[ -n "$ip" ]] || ip="$(hostname -I 2>/dev/null | awk '{print $1}')" || ip=""
  [[ -n "$ip" ]] || die "cannot find a non-loopback IPv4 address for the apiserver to advertise"
  echo "$ip"
}

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; } # kubectl as the cluster's admin

api_ready() { kc get --raw /readyz >/dev/null 2>&1; }

# A key and a certificate signed by the cluster's CA ($PKI/ca.*), in the current directory.
sign_cert() { # name, subject, extfile
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$3" -out "$1.crt" 2>/dev/null
}

# The directory of a Go module's sources in the module cache (downloaded if needed).
go_module_dir() { # module@version
  local dir
  dir="$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  [[ -d "$dir" ]] || die "cannot download the Go module $1"
  echo "$dir"
}

# ---------------------------------------------------------------------------------- templates
# Render a template: each `${NAME}` (upper case) becomes the value of the variable NAME, which must
# be among the listed ones (an unlisted one is an error, never a silent empty string). One pass, so
# a value is never substituted again; nothing else (`$x`, `${lower}`, backslashes, quotes) changes.
render_template() { # template, output (- for stdout), NAME...
  local tpl="$1" out="$2" text rendered="" re='\$\{([A-Z_][A-Z0-9_]*)\}' token name
  shift 2
  [[ -f "$tpl" && -r "$tpl" ]] || die "no template $tpl"
  # The whole file, trailing newlines included (read returns 1 at the end of the file: not an error).
  IFS= read -r -d '' text <"$tpl" || true
  while [[ "$text" =~ $re ]]; do
    token="${BASH_REMATCH[0]}" name="${BASH_REMATCH[1]}"
    [[ " $* " == *" $name "* ]] || die "$tpl: $token is not among the variables it is rendered with ($*)"
    rendered+="${text%%"$token"*}${!name}"
    text="${text#*"$token"}"
  done
  rendered+="$text"
  if [[ "$out" == - ]]; then printf '%s' "$rendered"; else printf '%s' "$rendered" >"$out"; fi
}

# `bash hack/lib/common.sh print NAME...`: the values, one a line (the Makefile reads its defaults
# this way).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  [[ "${1:-}" == print ]] || { echo "usage: bash $0 print NAME..." >&2; exit 2; }
  shift
  for name in "$@"; do echo "${!name}"; done
fi
