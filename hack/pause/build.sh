#!/usr/bin/env bash
# The pod sandbox ("pause") image, built from the Kubernetes source with no registry:
# build/pause/linux/pause.c from the k8s.io/kubernetes module (Go module proxy), compiled
# statically with gcc, packed as a one-layer docker-archive tarball that `ctr images import`
# (and `docker load`) accept, named like the upstream image so containerd's default
# sandbox_image and kubelet agree on it.
#
#   hack/pause/build.sh            build (cached) and print the tarball path
#   hack/pause/build.sh name       print the image name
#
# Cached in ~/.cache/tpi/images/pause-<version>.tar; a second run is a no-op.
set -euo pipefail

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh" pause # HACK, ROOT, ...; logs as [pause]
OUT_DIR="$IMAGES"

src_dir() {
  local dir
  dir="$(go_module_dir "k8s.io/kubernetes@$K8S_VERSION")"
  [[ -f "$dir/build/pause/linux/pause.c" ]] || die "no build/pause/linux/pause.c in k8s.io/kubernetes@$K8S_VERSION"
  echo "$dir"
}

version() { # the pause TAG from build/pause/Makefile, e.g. 3.10.1
  local ver
  ver="$(sed -n 's/^TAG ?= *//p' "$1/build/pause/Makefile")"
  [[ -n "$ver" ]] || die "no TAG in $1/build/pause/Makefile"
  echo "$ver"
}

# Step by step, not `echo "...:$(version "$(src_dir)")"`: echo would exit 0 with an empty version
# when the module download fails.
name() {
  local src ver
  src="$(src_dir)"
  ver="$(version "$src")"
  echo "registry.k8s.io/pause:$ver"
}

build() {
  command -v gcc >/dev/null || die "gcc is missing (apt-get install gcc libc6-dev)"
  local src ver image tarball
  src="$(src_dir)"; ver="$(version "$src")"; image="registry.k8s.io/pause:$ver"
  tarball="$OUT_DIR/pause-$ver.tar"
  if [[ -f "$tarball" ]]; then echo "$tarball"; return 0; fi
  mkdir -p "$OUT_DIR"
  local work; work="$(mktemp -d)"
  # Removed when build returns; the trap then unsets itself (it would fire on every later return).
  trap 'rm -rf "$work"; trap - RETURN' RETURN
  gcc -Os -Wall -Werror -static -DVERSION="v$ver-tpi-$K8S_VERSION" \
    -o "$work/pause" "$src/build/pause/linux/pause.c"
  strip "$work/pause"
  "${PYTHON:-python3}" "$HACK/pause/mkimage.py" --binary "$work/pause" --name "$image" --out "$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  log "$image: $(du -h "$tarball" | cut -f1) at $tarball"
  echo "$tarball"
}

case "${1:-build}" in
  build) build ;;
  name) name ;;
  *) echo "usage: $0 [build|name]" >&2; exit 2 ;;
esac
