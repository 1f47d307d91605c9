#!/usr/bin/env bash
# Build the TPI images with docker: the operator (tpi/operator:dev) and the runtime
# (tpi/runtime:dev), from the repository's Dockerfile.
#
#   hack/build-images.sh [--target operator|runtime|all] [--base-image IMG] [--wheelhouse]
#                        [--load none|containerd|kind] [--kind-cluster NAME] [--dry-run]
#
# Environment (flags win): BASE_IMAGE, OPERATOR_IMAGE, RUNTIME_IMAGE, TARGET, LOAD (none,
# containerd, kind), KIND_CLUSTER, WHEELHOUSE_BUILD=1, PYTHON (host python for the wheelhouse),
# WHEEL_PYTHON_VERSION (3.11), WHEEL_PLATFORM_ARCH (x86_64), CTR_NAMESPACE (k8s.io), DOCKER.
#
# --wheelhouse: first fill wheelhouse/ with wheels for the image's Python and platform from the
#   pyproject.toml extras (pip download, on this host, which must reach the package index), then
#   build with WHEELHOUSE=required, so the docker build itself needs no network.
# --load containerd: `docker save | ctr -n k8s.io images import -`, for a kubelet on this host.
# --load kind: `kind load docker-image` into the kind cluster KIND_CLUSTER (default "kind").
# --dry-run: print the commands instead of running them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

BASE_IMAGE="${BASE_IMAGE:-}"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-tpi/operator:dev}"
RUNTIME_IMAGE="${RUNTIME_IMAGE:-tpi/runtime:dev}"
TARGET="${TARGET:-all}"
LOAD="${LOAD:-none}"
KIND_CLUSTER="${KIND_CLUSTER:-kind}"
WHEELHOUSE_BUILD="${WHEELHOUSE_BUILD:-0}"
PYTHON="${PYTHON:-python3}"
WHEEL_PYTHON_VERSION="${WHEEL_PYTHON_VERSION:-3.11}"
WHEEL_PLATFORM_ARCH="${WHEEL_PLATFORM_ARCH:-x86_64}"
CTR_NAMESPACE="${CTR_NAMESPACE:-k8s.io}"
DOCKER="${DOCKER:-docker}"
DRY_RUN=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "build-images: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) TARGET="${2:?--target needs a value}"; shift 2 ;;
    --target=*) TARGET="${1#*=}"; shift ;;
    --base-image) BASE_IMAGE="${2:?--base-image needs a value}"; shift 2 ;;
    --base-image=*) BASE_IMAGE="${1#*=}"; shift ;;
    --wheelhouse) WHEELHOUSE_BUILD=1; shift ;;
    --load) LOAD="${2:?--load needs a value}"; shift 2 ;;
    --load=*) LOAD="${1#*=}"; shift ;;
    --kind-cluster) KIND_CLUSTER="${2:?--kind-cluster needs a value}"; shift 2 ;;
    --kind-cluster=*) KIND_CLUSTER="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

case "$TARGET" in
  operator) targets=(operator) ;;
  runtime) targets=(runtime) ;;
  all) targets=(operator runtime) ;;
  *) die "--target must be operator, runtime or all, not '$TARGET'" ;;
esac
case "$LOAD" in none|containerd|kind) ;; *) die "--load must be none, containerd or kind, not '$LOAD'" ;; esac

# Print a command (shell-quoted) and run it unless --dry-run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

image_for() { if [[ "$1" == operator ]]; then echo "$OPERATOR_IMAGE"; else echo "$RUNTIME_IMAGE"; fi; }

build_wheelhouse() {
  local req="$ROOT/wheelhouse/requirements.txt" extras=()
  for t in "${targets[@]}"; do extras+=("$t"); done
  run mkdir -p "$ROOT/wheelhouse"
  # The image installs from the same pyproject.toml extras (see Dockerfile).
  local script='import sys, tomllib
opt = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(sorted({d for e in sys.argv[2:] for d in opt[e]})))'
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $PYTHON -c <extract ${extras[*]} extras from pyproject.toml> > $req"
  else
    "$PYTHON" -c "$script" "$ROOT/pyproject.toml" "${extras[@]}" > "$req"
  fi
  local arch="$WHEEL_PLATFORM_ARCH" pyver="${WHEEL_PYTHON_VERSION//./}" platforms=() v
  # pip matches --platform tags exactly (no widening), and NVIDIA's wheels use manylinux_2_18 /
  # 2_27 tags: list every glibc up to bookworm's 2.36, or pip backtracks through old torch releases.
  for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_$arch"); done
  run "$PYTHON" -m pip download --dest "$ROOT/wheelhouse" --requirement "$req" \
    --only-binary=:all: --python-version "$WHEEL_PYTHON_VERSION" --implementation cp --abi "cp$pyver" \
    "${platforms[@]}" --platform "manylinux2014_$arch" --platform "linux_$arch"
}

build_image() {
  local target="$1" image
  image="$(image_for "$target")"
  local args=(build --target "$target" --tag "$image")
  [[ -n "$BASE_IMAGE" ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [[ "$WHEELHOUSE_BUILD" == 1 ]] && args+=(--build-arg "WHEELHOUSE=required")
  args+=(--file "$ROOT/Dockerfile" "$ROOT")
  run "$DOCKER" "${args[@]}"
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
for t in "${targets[@]}"; do
  load_image "$(image_for "$t")"
done
echo "built ${targets[*]} in $(( $(date +%s) - start ))s"
