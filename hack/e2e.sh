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
# Images are built by hack/build-images.sh (--wheelhouse --cache --prune). Everything expensive is
# cached under ~/.cache/tpi: the base rootfs, the wheelhouse (keyed by the pyproject extras), the
# built images (keyed by a hash of the Dockerfile, pyproject.toml and the package sources), the
# images already imported into the node (keyed by docker image id).
# Other knobs: TPI_E2E_DOWN=1 (tear the node down afterwards), TPI_E2E_SKIP_BUILD=1 (use the
# images as they are), TPI_E2E_REBUILD=1 (ignore the image cache).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" e2e # HACK, ROOT, ...; logs as [e2e]

PROVIDER="${TPI_E2E_PROVIDER:-local}"
KIND_CLUSTER="${TPI_E2E_KIND_CLUSTER:-tpi-e2e}"
OPERATOR_IMAGE="${TPI_E2E_OPERATOR_IMAGE:-$DEFAULT_OPERATOR_IMAGE}"
RUNTIME_IMAGE="${TPI_E2E_RUNTIME_IMAGE:-$DEFAULT_RUNTIME_IMAGE}"
export PATH="$BIN:$PATH" TPI_E2E_PROVIDER="$PROVIDER" TPI_E2E_OPERATOR_IMAGE="$OPERATOR_IMAGE" \
  TPI_E2E_RUNTIME_IMAGE="$RUNTIME_IMAGE"

declare -a TIMES=()
CURRENT_STEP="" CURRENT_T0=""
# Run a step and record how long it took. Never call it in a `||`/`&&` list or an `if`
# condition: bash then ignores `set -e` inside the whole call, so a failing step would go on and
# the step would return the status of its last line (the timing) instead of the command's.
# A failing step ends the script with its own status; on_exit records it as FAILED.
step() { # name, command...
  CURRENT_STEP="$1" CURRENT_T0=$(date +%s.%N)
  shift
  log "== $CURRENT_STEP"
  "$@"
  TIMES+=("$(since "$CURRENT_T0" "%7.1fs")  $CURRENT_STEP")
  CURRENT_STEP=""
}
on_exit() {
  local rc=$? t
  [[ -z "$CURRENT_STEP" ]] || TIMES+=("$(since "$CURRENT_T0" "%7.1fs")  $CURRENT_STEP: FAILED (exit $rc)")
  if [[ -n "${TPI_E2E_DOWN:-}" && "$PROVIDER" == local && "${E2E_STARTED_NODE:-}" == 1 ]]; then
    "$HACK/node.sh" down || log "node down failed"
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
# Debian's 20.10 client first (with BuildKit: context sent incrementally, no frontend image
# pulled), else whichever docker is on PATH.
docker_bin() { command -v /usr/bin/docker || command -v docker; }

build_images_local() {
  local base docker
  docker="$(docker_bin)"
  base="$("$HACK/base-image.sh")"
  # Cached by a hash of the sources, the base image and the wheels (see hack/build-images.sh).
  DOCKER="$docker" DOCKER_BUILDKIT=1 OPERATOR_IMAGE="$OPERATOR_IMAGE" RUNTIME_IMAGE="$RUNTIME_IMAGE" \
    PYTHON="$VENV/bin/python" REBUILD="${TPI_E2E_REBUILD:+1}" \
    "$HACK/build-images.sh" --base-image "$base" --wheelhouse --cache --prune
}

containerd_ref() { # docker's short name -> containerd's full reference
  if [[ "$1" == */*/* || "$1" == *.*/* ]]; then echo "$1"; else echo "docker.io/$1"; fi
}

# Not `grep -q`: with pipefail, ctr killed by SIGPIPE would read as "not there".
in_containerd() { ctr -n k8s.io images ls -q "name==$1" | grep -x "$1" >/dev/null; }

load_images_local() {
  local docker t image id old_id ref pass missing node_env base pause
  docker="$(docker_bin)"
  base="$("$HACK/base-image.sh" name)"
  pause="$("$HACK/pause/build.sh" name)"
  # Not `eval "$(node.sh env)"`: eval would hide node.sh's exit status.
  node_env="$("$HACK/node.sh" env)"
  eval "$node_env"
  # Two passes: a kubelet under disk pressure (say, during the 6 GB runtime import) reclaims space
  # by deleting images no pod uses, which includes the ones imported a moment before.
  for pass in 1 2; do
    missing=""
    for image in "$OPERATOR_IMAGE" "$RUNTIME_IMAGE" "$base"; do
      id="$("$docker" image inspect -f '{{.Id}}' "$image")"
      ref="$(containerd_ref "$image")"
      t="$(echo "$image" | tr '/:' '__')"
      if [[ "$(cat "$STAMPS/loaded-$t" 2>/dev/null)" == "$id" ]] && in_containerd "$ref"; then
        if [[ $pass == 1 ]]; then log "$image already in the node's containerd"; fi
        continue
      fi
      if [[ $pass == 2 ]]; then log "$image is gone from containerd again (kubelet image GC under disk pressure?)"; fi
      missing+=" $image"
      local t0; t0=$(date +%s)
      # Drop the previous build first: containerd then collects its ~12 GB (content + unpacked
      # snapshot) before the new one is written, instead of holding both at the peak. The import
      # also names each image by its config digest: drop the previous one's too, or every rebuild
      # leaks a whole image (seen: 5.6 GiB each) until the kubelet starts reclaiming under pressure.
      old_id="$(cat "$STAMPS/loaded-$t" 2>/dev/null || true)"
      ctr -n k8s.io images rm --sync "$ref" ${old_id:+"$old_id"} >/dev/null 2>&1 || true
      "$docker" save "$image" | ctr -n k8s.io images import - >/dev/null
      echo "$id" >"$STAMPS/loaded-$t"
      log "$image imported into containerd in $(( $(date +%s) - t0 ))s"
    done
    # The sandbox image too: containerd 1.6 does not pin it, so a kubelet reclaiming disk space
    # may delete it, and no registry can give it back (every new pod then fails to start).
    if ! in_containerd "$pause"; then
      log "the pause image $pause is gone from containerd (kubelet image reclaim?): importing it again"
      ctr -n k8s.io images import "$("$HACK/pause/build.sh")" >/dev/null
      missing+=" $pause"
    fi
    [[ -n "$missing" ]] || return 0
  done
  for image in $missing; do
    in_containerd "$(containerd_ref "$image")" \
      || die "$image keeps disappearing from the node's containerd: the kubelet deletes unused images under disk pressure ($(df -h "$CACHE" | awk 'NR==2{print $4}') free)"
  done
}

local_up() {
  [[ $(id -u) -eq 0 ]] || die "the local provider runs a kubelet: needs root"
  step "apt packages" env TPI_EXTRA_APT="${TPI_EXTRA_APT:-} containerd runc containernetworking-plugins iptables conntrack docker.io debootstrap gcc libc6-dev curl" \
    "$HACK/ensure-deps.sh" apt
  step "venv + tools" "$HACK/ensure-deps.sh" venv tools
  step "control plane (hack/cluster.sh up)" "$HACK/cluster.sh" up
  step "real node (hack/node.sh up)" "$HACK/node.sh" up
  E2E_STARTED_NODE=1
  # One image build/import at a time (make demo and make e2e may run side by side).
  mkdir -p "$STAMPS"
  exec 9>"$STAMPS/.lock"
  flock 9
  if [[ -z "${TPI_E2E_SKIP_BUILD:-}" ]]; then
    step "images (build if changed, prune docker)" build_images_local
  fi
  step "images into the node's containerd" load_images_local
  flock -u 9
}

# -------------------------------------------------------------------------------------- kind
kind_up() {
  local k
  for k in docker kind; do command -v "$k" >/dev/null || die "$k is not on PATH (needed by TPI_E2E_PROVIDER=kind)"; done
  mkdir -p "$ROOT/_out"
  if ! kind get clusters 2>/dev/null | grep -x "$KIND_CLUSTER" >/dev/null; then
    # One worker plays the real node: labelled and tainted like hack/node.sh's.
    render_template "$HACK/kind/cluster.yaml" "$ROOT/_out/kind-$KIND_CLUSTER.yaml" REAL_NODE_LABEL
    step "kind create cluster $KIND_CLUSTER" kind create cluster --name "$KIND_CLUSTER" --wait 120s \
      --config "$ROOT/_out/kind-$KIND_CLUSTER.yaml"
  fi
  kind get kubeconfig --name "$KIND_CLUSTER" >"$ROOT/_out/kind-$KIND_CLUSTER.kubeconfig"
  export TPI_E2E_KUBECONFIG="$ROOT/_out/kind-$KIND_CLUSTER.kubeconfig" TPI_E2E_KIND_CLUSTER="$KIND_CLUSTER"
  if [[ -z "${TPI_E2E_SKIP_BUILD:-}" ]]; then
    step "images (docker build)" env OPERATOR_IMAGE="$OPERATOR_IMAGE" RUNTIME_IMAGE="$RUNTIME_IMAGE" \
      "$HACK/build-images.sh" ${TPI_E2E_BASE_IMAGE:+--base-image "$TPI_E2E_BASE_IMAGE"}
  fi
  step "kind load docker-image" kind load docker-image "$OPERATOR_IMAGE" "$RUNTIME_IMAGE" --name "$KIND_CLUSTER"
}

# -------------------------------------------------------------------------------------- main
case "$PROVIDER" in local|kind) ;; *) die "TPI_E2E_PROVIDER must be local or kind, not '$PROVIDER'" ;; esac
if [[ "${1:-}" == down ]]; then
  if [[ "$PROVIDER" == local ]]; then "$HACK/node.sh" down; else kind delete cluster --name "$KIND_CLUSTER"; fi
  exit 0
fi
if [[ "$PROVIDER" == local ]]; then local_up; else kind_up; fi
if [[ "${1:-}" == up ]]; then exit 0; fi

# The e2e tier needs the real node's CPU: the demo's cluster (make demo) would keep rank pods of
# the tests Pending. Stop it, loudly; `make demo` brings it back.
make_room() {
  local kcfg="${TPI_E2E_KUBECONFIG:-$KUBECONFIG_ADMIN}" kubectl namespaces ns names
  kubectl="$(command -v kubectl)"
  namespaces="$("$kubectl" --kubeconfig "$kcfg" get namespaces -l tpi.dev/demo=true -o name)"
  for ns in $namespaces; do
    ns="${ns#namespace/}"
    names="$("$kubectl" --kubeconfig "$kcfg" -n "$ns" get tpinferenceclusters -o name | tr '\n' ' ')"
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
