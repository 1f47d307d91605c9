#!/usr/bin/env bash
# `make e2e`: bring up a cluster with a real node, build and load the images, run tests/e2e.
#
#   hack/e2e.sh [pytest args...]   bring everything up, run the tier (e.g. hack/e2e.sh -k infra)
#   hack/e2e.sh up                 only bring everything up (cluster, node, images): hack/demo.sh
#   hack/e2e.sh down               stop the node (local) or delete the kind cluster
#
# Providers (TPI_E2E_PROVIDER):
#   local (default)  this machine, no registry needed: hack/cluster.sh (apiserver, controller-manager,
#                    scheduler, kwok) + hack/node.sh (containerd, kubelet, kube-proxy, CoreDNS) +
#                    images built by docker on a debootstrap base (hack/base-image.sh) from a
#                    wheelhouse, handed to containerd with `docker save | ctr import`.
#   kind             a kind cluster (created if missing: TPI_E2E_KIND_CLUSTER, default tpi-e2e);
#                    images built from the Dockerfile's default base (python:3.11-slim-bookworm,
#                    pulled) and loaded with `kind load docker-image`. Needs docker, kind, kubectl
#                    and helm on PATH (or helm/kubectl from `make tools`).
#
# Everything expensive is cached under ~/.cache/tpi: the base rootfs, the wheelhouse (keyed by the
# pyproject extras), the built images (keyed by a hash of the Dockerfile, pyproject.toml and the
# package sources), the images already imported into the node (keyed by docker image id).
# Other knobs: TPI_E2E_DOWN=1 (tear the node down afterwards), TPI_E2E_SKIP_BUILD=1 (use the
# images as they are), TPI_E2E_REBUILD=1 (ignore the image cache).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${TPI_CACHE:-$HOME/.cache/tpi}"
VENV="${TPI_VENV:-$CACHE/venv}"
BIN="${TPI_BIN:-$CACHE/k8s-$K8S_VERSION/bin}"
PROVIDER="${TPI_E2E_PROVIDER:-local}"
KIND_CLUSTER="${TPI_E2E_KIND_CLUSTER:-tpi-e2e}"
OPERATOR_IMAGE="${TPI_E2E_OPERATOR_IMAGE:-tpi/operator:dev}"
RUNTIME_IMAGE="${TPI_E2E_RUNTIME_IMAGE:-tpi/runtime:dev}"
WHEELHOUSE_CACHE="$CACHE/wheelhouse"
STAMPS="$CACHE/images/stamps"
export PATH="$BIN:$PATH" TPI_E2E_PROVIDER="$PROVIDER" TPI_E2E_OPERATOR_IMAGE="$OPERATOR_IMAGE" \
  TPI_E2E_RUNTIME_IMAGE="$RUNTIME_IMAGE"

declare -a TIMES=()
CURRENT_STEP="" CURRENT_T0=""
log() { echo "[e2e] $*" >&2; }
die() { echo "[e2e] error: $*" >&2; exit 1; }
elapsed() { awk "BEGIN{printf \"%7.1fs\", $(date +%s.%N) - $1}"; }
# Run a step and record how long it took. Never call it in a `||`/`&&` list or an `if`
# condition: bash then ignores `set -e` inside the whole call, so a failing step would go on and
# the step would return the status of its last line (the timing) instead of the command's.
# A failing step ends the script with its own status; on_exit records it as FAILED.
step() { # name, command...
  CURRENT_STEP="$1" CURRENT_T0=$(date +%s.%N)
  shift
  log "== $CURRENT_STEP"
  "$@"
  TIMES+=("$(elapsed "$CURRENT_T0")  $CURRENT_STEP")
  CURRENT_STEP=""
}
on_exit() {
  local rc=$? t
  [[ -z "$CURRENT_STEP" ]] || TIMES+=("$(elapsed "$CURRENT_T0")  $CURRENT_STEP: FAILED (exit $rc)")
  if [[ -n "${TPI_E2E_DOWN:-}" && "$PROVIDER" == local && "${E2E_STARTED_NODE:-}" == 1 ]]; then
    "$HERE/node.sh" down || log "node down failed"
  fi
  if [[ ${#TIMES[@]} -gt 0 ]]; then
    log "timings:"
    for t in "${TIMES[@]}"; do echo "    $t" >&2; done
  fi
  [[ $rc -eq 0 ]] || log "failed with exit status $rc"
  exit "$rc"
}
trap on_exit EXIT

# ------------------------------------------------------------------------------ images (local)
# What an image is built from: the build files and the sources its target copies.
source_key() { # target
  local paths=(Dockerfile .dockerignore pyproject.toml)
  case "$1" in
    operator) paths+=(operator/tpi_operator) ;;
    runtime) paths+=(runtime/tpi_runtime) ;;
  esac
  (
    cd "$ROOT"
    find "${paths[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
    echo "base=${BASE_IMAGE_ID:-}"
    ls "$ROOT/wheelhouse" 2>/dev/null | grep '\.whl$' || true
  ) | sha256sum | cut -c1-16
}

ensure_wheelhouse() {
  # pip download on the host (pip's cache and the host's CA bundle), for the image's Python (3.11)
  # and platform, once per set of requirements; hard-linked into the build context's wheelhouse/.
  # Every manylinux_2_x tag up to bookworm's glibc (2.36) is listed: pip does not expand
  # --platform, and NVIDIA's wheels use manylinux_2_18/2_27 tags.
  local req key plats=() v
  mkdir -p "$WHEELHOUSE_CACHE"
  req="$("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
opt = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(sorted({d for e in ("operator", "runtime") for d in opt[e]})))
PY
)"
  key="$(echo "$req" | sha256sum | cut -c1-16)"
  if [[ ! -f "$WHEELHOUSE_CACHE/.complete-$key" ]]; then
    echo "$req" >"$WHEELHOUSE_CACHE/requirements.txt"
    for v in $(seq 36 -1 17); do plats+=(--platform "manylinux_2_${v}_x86_64"); done
    plats+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
            --platform linux_x86_64)
    log "pip download into $WHEELHOUSE_CACHE"
    "$VENV/bin/python" -m pip download --quiet --dest "$WHEELHOUSE_CACHE" -r "$WHEELHOUSE_CACHE/requirements.txt" \
      --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${plats[@]}"
    rm -f "$WHEELHOUSE_CACHE"/.complete-* && touch "$WHEELHOUSE_CACHE/.complete-$key"
  fi
  mkdir -p "$ROOT/wheelhouse"
  local w
  for w in "$WHEELHOUSE_CACHE"/*.whl; do
    [[ -e "$ROOT/wheelhouse/${w##*/}" ]] || ln "$w" "$ROOT/wheelhouse/" 2>/dev/null || cp "$w" "$ROOT/wheelhouse/"
  done
  log "wheelhouse: $(ls "$ROOT/wheelhouse" | grep -c '\.whl$') wheels, $(du -sh "$WHEELHOUSE_CACHE" | cut -f1)"
}

image_for() { if [[ "$1" == operator ]]; then echo "$OPERATOR_IMAGE"; else echo "$RUNTIME_IMAGE"; fi; }

build_images_local() {
  local base docker
  docker="$(command -v /usr/bin/docker || command -v docker)"
  base="$("$HERE/base-image.sh")"
  BASE_IMAGE_ID="$("$docker" image inspect -f '{{.Id}}' "$base")"
  ensure_wheelhouse
  mkdir -p "$STAMPS"
  local t key image
  for t in operator runtime; do
    image="$(image_for "$t")"
    key="$(source_key "$t")"
    if [[ -z "${TPI_E2E_REBUILD:-}" && "$(cat "$STAMPS/built-$t" 2>/dev/null)" == "$key" ]] \
       && "$docker" image inspect "$image" >/dev/null 2>&1; then
      log "$image is up to date (sources $key)"
      continue
    fi
    local t0; t0=$(date +%s)
    # Debian's 20.10 client with BuildKit: context sent incrementally, no frontend image pulled.
    DOCKER="$docker" DOCKER_BUILDKIT=1 OPERATOR_IMAGE="$OPERATOR_IMAGE" RUNTIME_IMAGE="$RUNTIME_IMAGE" \
      "$HERE/build-images.sh" --base-image "$base" --target "$t"
    echo "$key" >"$STAMPS/built-$t"
    log "$image built in $(( $(date +%s) - t0 ))s: $("$docker" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')"
  done
}

prune_docker() {
  # Each runtime build leaves a ~6 GB predecessor and BuildKit cache behind; on a CI machine that
  # builds often the disk fills up (seen: ctr import failing with ENOSPC). Keep the tagged images
  # and a bounded build cache.
  local docker
  docker="$(command -v /usr/bin/docker || command -v docker)"
  "$docker" image prune -f >/dev/null
  "$docker" builder prune -f --keep-storage "${TPI_DOCKER_BUILD_CACHE:-12GB}" >/dev/null 2>&1 || true
  log "disk: $(df -h "$CACHE" | awk 'NR==2{print $4}') free"
}

load_images_local() {
  local docker t image id ref pass missing
  docker="$(command -v /usr/bin/docker || command -v docker)"
  eval "$("$HERE/node.sh" env)"
  # Two passes: a kubelet under disk pressure (say, during the 6 GB runtime import) reclaims space
  # by deleting images no pod uses, which includes the ones imported a moment before.
  for pass in 1 2; do
    missing=""
    for image in "$(image_for operator)" "$(image_for runtime)" "$("$HERE/base-image.sh" name)"; do
      id="$("$docker" image inspect -f '{{.Id}}' "$image")"
      ref="$image"; [[ "$ref" == */*/* || "$ref" == *.*/* ]] || ref="docker.io/$ref"
      t="$(echo "$image" | tr '/:' '__')"
      if [[ "$(cat "$STAMPS/loaded-$t" 2>/dev/null)" == "$id" ]] \
         && ctr -n k8s.io images ls -q "name==$ref" | grep -qx "$ref"; then
        [[ $pass == 1 ]] && log "$image already in the node's containerd"
        continue
      fi
      [[ $pass == 2 ]] && log "$image is gone from containerd again (kubelet image GC under disk pressure?)"
      missing+=" $image"
      local t0; t0=$(date +%s)
      # Drop the previous build first: containerd then collects its ~12 GB (content + unpacked
      # snapshot) before the new one is written, instead of holding both at the peak.
      ctr -n k8s.io images rm --sync "$ref" >/dev/null 2>&1 || true
      "$docker" save "$image" | ctr -n k8s.io images import - >/dev/null
      echo "$id" >"$STAMPS/loaded-$t"
      log "$image imported into containerd in $(( $(date +%s) - t0 ))s"
    done
    [[ -z "$missing" ]] && return 0
  done
  for image in $missing; do
    ref="$image"; [[ "$ref" == */*/* || "$ref" == *.*/* ]] || ref="docker.io/$ref"
    ctr -n k8s.io images ls -q "name==$ref" | grep -qx "$ref" \
      || die "$image keeps disappearing from the node's containerd: the kubelet deletes unused images under disk pressure ($(df -h "$CACHE" | awk 'NR==2{print $4}') free)"
  done
}

local_up() {
  [[ $(id -u) -eq 0 ]] || die "the local provider runs a kubelet: needs root"
  step "apt packages" env TPI_EXTRA_APT="${TPI_EXTRA_APT:-} containerd runc containernetworking-plugins iptables conntrack docker.io debootstrap gcc libc6-dev curl" \
    "$HERE/ensure-deps.sh" apt
  step "venv + tools" "$HERE/ensure-deps.sh" venv tools
  step "control plane (hack/cluster.sh up)" "$HERE/cluster.sh" up
  step "real node (hack/node.sh up)" "$HERE/node.sh" up
  E2E_STARTED_NODE=1
  # One image build/import at a time (make demo and make e2e may run side by side).
  mkdir -p "$STAMPS"
  exec 9>"$STAMPS/.lock"
  flock 9
  if [[ -z "${TPI_E2E_SKIP_BUILD:-}" ]]; then
    step "images (build, cached)" build_images_local
    step "docker disk hygiene" prune_docker
  fi
  step "images into the node's containerd" load_images_local
  flock -u 9
}

# -------------------------------------------------------------------------------------- kind
kind_up() {
  local k
  for k in docker kind; do command -v "$k" >/dev/null || die "$k is not on PATH (needed by TPI_E2E_PROVIDER=kind)"; done
  mkdir -p "$ROOT/_out"
  if ! kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
    # One worker plays the real node: labelled and tainted like hack/node.sh's.
    cat >"$ROOT/_out/kind-$KIND_CLUSTER.yaml" <<'YAML'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
  labels:
    tpi.dev/real-node: "true"
  kubeadmConfigPatches:
  - |
    kind: JoinConfiguration
    nodeRegistration:
      taints:
      - {key: tpi.dev/real-node, value: "true", effect: NoSchedule}
YAML
    step "kind create cluster $KIND_CLUSTER" kind create cluster --name "$KIND_CLUSTER" --wait 120s \
      --config "$ROOT/_out/kind-$KIND_CLUSTER.yaml"
  fi
  kind get kubeconfig --name "$KIND_CLUSTER" >"$ROOT/_out/kind-$KIND_CLUSTER.kubeconfig"
  export TPI_E2E_KUBECONFIG="$ROOT/_out/kind-$KIND_CLUSTER.kubeconfig" TPI_E2E_KIND_CLUSTER="$KIND_CLUSTER"
  if [[ -z "${TPI_E2E_SKIP_BUILD:-}" ]]; then
    step "images (docker build)" env OPERATOR_IMAGE="$OPERATOR_IMAGE" RUNTIME_IMAGE="$RUNTIME_IMAGE" \
      "$HERE/build-images.sh" ${TPI_E2E_BASE_IMAGE:+--base-image "$TPI_E2E_BASE_IMAGE"}
  fi
  step "kind load docker-image" kind load docker-image "$OPERATOR_IMAGE" "$RUNTIME_IMAGE" --name "$KIND_CLUSTER"
}

# -------------------------------------------------------------------------------------- main
case "$PROVIDER" in local|kind) ;; *) die "TPI_E2E_PROVIDER must be local or kind, not '$PROVIDER'" ;; esac
if [[ "${1:-}" == down ]]; then
  if [[ "$PROVIDER" == local ]]; then "$HERE/node.sh" down; else kind delete cluster --name "$KIND_CLUSTER"; fi
  exit 0
fi
if [[ "$PROVIDER" == local ]]; then local_up; else kind_up; fi
[[ "${1:-}" == up ]] && exit 0

# The e2e tier needs the real node's CPU: the demo's cluster (make demo) would keep rank pods of
# the tests Pending. Stop it, loudly; `make demo` brings it back.
make_room() {
  local kcfg="${TPI_E2E_KUBECONFIG:-${TPI_CLUSTER_DIR:-$CACHE/cluster}/kubeconfig}" kubectl namespaces ns names
  kubectl="$(command -v kubectl)"
  namespaces="$("$kubectl" --kubeconfig "$kcfg" get namespaces -l tpi.dev/demo=true -o name)"
  for ns in $namespaces; do
    ns="${ns#namespace/}"
    names="$("$kubectl" --kubeconfig "$kcfg" -n "$ns" get tpinferenceclusters -o name 2>/dev/null | tr '\n' ' ')"
    [[ -n "$names" ]] || continue
    log "MAKING ROOM on the node for the e2e tier: deleting the demo's ${names}in namespace $ns" \
        "(its rank pods hold the node's CPU); run \`make demo\` again to bring it back"
    "$kubectl" --kubeconfig "$kcfg" -n "$ns" delete tpinferenceclusters --all --wait=true --timeout=120s >/dev/null
    "$kubectl" --kubeconfig "$kcfg" -n "$ns" wait pods -l tpi.dev/cluster --for=delete --timeout=120s >/dev/null
  done
}
step "make room on the node" make_room

cd "$ROOT"
# TPI_E2E_TESTS: what pytest collects (default tests/e2e); tests/e2e/test_harness.py points it at
# tests/harness to prove that a failing test fails this script, make e2e and make test.
step "pytest ${TPI_E2E_TESTS:-tests/e2e}" "$VENV/bin/python" -m pytest "${TPI_E2E_TESTS:-tests/e2e}" -m e2e -v -rA \
  --durations=0 -p no:cacheprovider "$@"
