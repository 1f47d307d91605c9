#!/usr/bin/env bash
# Build the TPI images with docker: the operator (tpi/operator:dev) and the runtime
# (tpi/runtime:dev), from the repository's Dockerfile.
#
#   hack/build-images.sh [--target operator|runtime|all] [--base-image IMG] [--wheelhouse] [--cache]
#                        [--prune] [--load none|containerd|kind] [--kind-cluster NAME] [--dry-run]
#
# Environment (flags win): BASE_IMAGE, OPERATOR_IMAGE, RUNTIME_IMAGE, TARGET, LOAD (none,
# containerd, kind), KIND_CLUSTER, WHEELHOUSE_BUILD=1, CACHE_BUILD=1, REBUILD=1, PRUNE=1, PYTHON
# (host python for the wheelhouse), WHEEL_PYTHON_VERSION (3.11), WHEEL_PLATFORM_ARCH (x86_64),
# CTR_NAMESPACE (k8s.io), DOCKER, TPI_DOCKER_BUILD_CACHE (12GB).
#
# --wheelhouse: first fill wheelhouse/ with wheels for the image's Python and platform from the
#   pyproject.toml extras: pip download (on this host, which must reach the package index) into
#   ~/.cache/tpi/wheelhouse once per set of requirements, hard-linked into the build context's
#   wheelhouse/; then build with WHEELHOUSE=required, so the docker build itself needs no network.
# --cache: skip a target whose image exists and whose inputs (Dockerfile, .dockerignore,
#   pyproject.toml, the target's sources, the base image's ID, the wheelhouse's wheels) are those of
#   its last build (stamps in ~/.cache/tpi/images/stamps); REBUILD=1 ignores the stamps.
# --prune: afterwards remove dangling images and bound BuildKit's cache (each runtime build leaves
#   a ~6 GB predecessor behind; a machine that builds often fills its disk).
# --load containerd: `docker save | ctr -n k8s.io images import -`, for a kubelet on this host.
# --load kind: `kind load docker-image` into the kind cluster KIND_CLUSTER (default "kind").
# --dry-run: print the commands instead of running them.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" build-images # HACK, ROOT, ...; logs as [build-images]

BASE_IMAGE="${BASE_IMAGE:-}"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-$DEFAULT_OPERATOR_IMAGE}"
RUNTIME_IMAGE="${RUNTIME_IMAGE:-$DEFAULT_RUNTIME_IMAGE}"
TARGET="${TARGET:-all}"
LOAD="${LOAD:-none}"
KIND_CLUSTER="${KIND_CLUSTER:-kind}"
WHEELHOUSE_BUILD="${WHEELHOUSE_BUILD:-0}"
CACHE_BUILD="${CACHE_BUILD:-0}"
PRUNE="${PRUNE:-0}"
PYTHON="${PYTHON:-python3}"
WHEEL_PYTHON_VERSION="${WHEEL_PYTHON_VERSION:-3.11}"
WHEEL_PLATFORM_ARCH="${WHEEL_PLATFORM_ARCH:-x86_64}"
CTR_NAMESPACE="${CTR_NAMESPACE:-k8s.io}"
DOCKER="${DOCKER:-docker}"
WHEELHOUSE_CACHE="$CACHE/wheelhouse"
DRY_RUN=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
# A bad command line: exit status 2, like the usage of any command.
usage_error() { usage >&2; echo "build-images: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) TARGET="${2:?--target needs a value}"; shift 2 ;;
    --target=*) TARGET="${1#*=}"; shift ;;
    --base-image) BASE_IMAGE="${2:?--base-image needs a value}"; shift 2 ;;
    --base-image=*) BASE_IMAGE="${1#*=}"; shift ;;
    --wheelhouse) WHEELHOUSE_BUILD=1; shift ;;
    --cache) CACHE_BUILD=1; shift ;;
    --prune) PRUNE=1; shift ;;
    --load) LOAD="${2:?--load needs a value}"; shift 2 ;;
    --load=*) LOAD="${1#*=}"; shift ;;
    --kind-cluster) KIND_CLUSTER="${2:?--kind-cluster needs a value}"; shift 2 ;;
    --kind-cluster=*) KIND_CLUSTER="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

case "$TARGET" in
  operator) targets=(operator) ;;
  runtime) targets=(runtime) ;;
  all) targets=(operator runtime) ;;
  *) usage_error "--target must be operator, runtime or all, not '$TARGET'" ;;
esac
case "$LOAD" in none|containerd|kind) ;; *) usage_error "--load must be none, containerd or kind, not '$LOAD'" ;; esac

# Print a command (shell-quoted) and run it unless --dry-run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

image_for() { if [[ "$1" == operator ]]; then echo "$OPERATOR_IMAGE"; else echo "$RUNTIME_IMAGE"; fi; }

build_wheelhouse() {
  local req="$WHEELHOUSE_CACHE/requirements.txt" extras=() t key
  for t in "${targets[@]}"; do extras+=("$t"); done
  # The image installs from the same pyproject.toml extras (see Dockerfile).
  local script='import sys, tomllib
opt = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(sorted({d for e in sys.argv[2:] for d in opt[e]})))'
  local arch="$WHEEL_PLATFORM_ARCH" pyver="${WHEEL_PYTHON_VERSION//./}" platforms=() v
  # pip matches --platform tags exactly (no widening), and NVIDIA's wheels use manylinux_2_18 /
  # 2_27 tags: list every glibc up to bookworm's 2.36, or pip backtracks through old torch releases.
  for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_$arch"); done
  platforms+=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch" --platform "manylinux1_$arch"
              --platform "linux_$arch")
  local download=("$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE_CACHE" --requirement "$req"
                  --only-binary=:all: --python-version "$WHEEL_PYTHON_VERSION" --implementation cp --abi "cp$pyver"
                  "${platforms[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $PYTHON -c <extract ${extras[*]} extras from pyproject.toml> > $req"
    run "${download[@]}"
    echo "+ ln $WHEELHOUSE_CACHE/*.whl $ROOT/wheelhouse/"
    return 0
  fi
  mkdir -p "$WHEELHOUSE_CACHE" "$ROOT/wheelhouse"
  "$PYTHON" -c "$script" "$ROOT/pyproject.toml" "${extras[@]}" >"$req.new"
  # Downloaded once per set of requirements (pip download also skips the files it already has).
  key="$(sha256sum <"$req.new" | cut -c1-16)"
  if [[ -f "$WHEELHOUSE_CACHE/.complete-$key" ]]; then
    rm -f "$req.new"
  else
    mv "$req.new" "$req"
    log "pip download into $WHEELHOUSE_CACHE"
    run "${download[@]}"
    rm -f "$WHEELHOUSE_CACHE"/.complete-*
    touch "$WHEELHOUSE_CACHE/.complete-$key"
  fi
  local w n=0
  for w in "$WHEELHOUSE_CACHE"/*.whl; do
    [[ -e "$w" ]] || continue
    [[ -e "$ROOT/wheelhouse/${w##*/}" ]] || ln "$w" "$ROOT/wheelhouse/" 2>/dev/null || cp "$w" "$ROOT/wheelhouse/"
    n=$(( n + 1 ))
  done
  log "wheelhouse: $n wheels, $(du -sh "$WHEELHOUSE_CACHE" | cut -f1)"
}

# What a target's image is built from (--cache): the build files, the sources it copies, the base
# image and the wheels in the context.
# Called as `key="$(source_key ...)"`, where errexit is off: every step is chained with && so that
# a failure fails the whole (pipefail) and the assignment.
source_key() { # target, base image ID
  local paths=(Dockerfile .dockerignore pyproject.toml)
  case "$1" in
    operator) paths+=(operator/tpi_operator contract/tpi_contract) ;;
    runtime) paths+=(runtime/tpi_runtime contract/tpi_contract) ;;
  esac
  {
    cd "$ROOT" \
      && find "${paths[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum \
      && echo "base=$2" \
      && wheel_names
  } | sha256sum | cut -c1-16
}

wheel_names() { # the wheels in the build context, one a line (nothing when there are none)
  local w
  for w in "$ROOT"/wheelhouse/*.whl; do
    if [[ -e "$w" ]]; then echo "${w##*/}"; fi
  done
}

build_image() {
  local target="$1" image key="" base_id=""
  image="$(image_for "$target")"
  if [[ "$CACHE_BUILD" == 1 && "$DRY_RUN" != 1 ]]; then
    if [[ -n "$BASE_IMAGE" ]]; then base_id="$("$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE")"; fi
    key="$(source_key "$target" "$base_id")"
    if [[ "${REBUILD:-0}" != 1 && "$(cat "$STAMPS/built-$target" 2>/dev/null)" == "$key" ]] \
       && "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
      log "$image is up to date (sources $key)"
      return 0
    fi
  fi
  local args=(build --target "$target" --tag "$image") t0
  [[ -n "$BASE_IMAGE" ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [[ "$WHEELHOUSE_BUILD" == 1 ]] && args+=(--build-arg "WHEELHOUSE=required")
  args+=(--file "$ROOT/Dockerfile" "$ROOT")
  t0=$(date +%s)
  run "$DOCKER" "${args[@]}"
  [[ "$DRY_RUN" != 1 ]] || return 0
  if [[ -n "$key" ]]; then mkdir -p "$STAMPS"; echo "$key" >"$STAMPS/built-$target"; fi
  log "$image built in $(( $(date +%s) - t0 ))s: $("$DOCKER" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')"
}

prune() {
  # Keep the tagged images and a bounded build cache.
  printf '+ %q image prune -f; %q builder prune -f --keep-storage %q\n' "$DOCKER" "$DOCKER" "${TPI_DOCKER_BUILD_CACHE:-12GB}"
  [[ "$DRY_RUN" != 1 ]] || return 0
  "$DOCKER" image prune -f >/dev/null
  "$DOCKER" builder prune -f --keep-storage "${TPI_DOCKER_BUILD_CACHE:-12GB}" >/dev/null 2>&1 || true
  log "disk: $(df -h "$CACHE" | awk 'NR==2{print $4}') free"
}

load_image() {
  local image="$1"
  case "$LOAD" in
    none) ;;
    containerd)
      printf '+ %q save %q | ctr -n %q images import -\n' "$DOCKER" "$image" "$CTR_NAMESPACE"
      [[ "$DRY_RUN" == 1 ]] || "$DOCKER" save "$image" | ctr -n "$CTR_NAMESPACE" images import -
      ;;
    kind) run kind load docker-image "$image" --name "$KIND_CLUSTER" ;;
  esac
}

if [[ "$DRY_RUN" != 1 ]]; then
  command -v "$DOCKER" >/dev/null || die "'$DOCKER' not found"
  [[ "$LOAD" != containerd ]] || command -v ctr >/dev/null || die "--load containerd needs ctr"
  [[ "$LOAD" != kind ]] || command -v kind >/dev/null || die "--load kind needs kind"
fi

start=$(date +%s)
# Not `[[ ]] && build_wheelhouse`: bash ignores `set -e` inside a function called in a `&&` list.
if [[ "$WHEELHOUSE_BUILD" == 1 ]]; then build_wheelhouse; fi
for t in "${targets[@]}"; do
  build_image "$t"
done
if [[ "$PRUNE" == 1 ]]; then prune; fi
for t in "${targets[@]}"; do
  load_image "$(image_for "$t")"
done
log "done: ${targets[*]} in $(( $(date +%s) - start ))s"
