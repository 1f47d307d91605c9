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

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${TPI_CACHE:-$HOME/.cache/tpi}"
OUT_DIR="$CACHE/images"

die() { echo "[pause] error: $*" >&2; exit 1; }

src_dir() {
  local dir
  dir="$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
        | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  [[ -f "$dir/build/pause/linux/pause.c" ]] || die "no build/pause/linux/pause.c in k8s.io/kubernetes@$K8S_VERSION"
  echo "$dir"
}

version() { # the pause TAG from build/pause/Makefile, e.g. 3.10.1
  sed -n 's/^TAG ?= *//p' "$1/build/pause/Makefile"
}

name() { echo "registry.k8s.io/pause:$(version "$(src_dir)")"; }

build() {
  command -v gcc >/dev/null || die "gcc is missing (apt-get install gcc libc6-dev)"
  local src ver image tarball
  src="$(src_dir)"; ver="$(version "$src")"; image="registry.k8s.io/pause:$ver"
  tarball="$OUT_DIR/pause-$ver.tar"
  if [[ -f "$tarball" ]]; then echo "$tarball"; return 0; fi
  mkdir -p "$OUT_DIR"
  local work; work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  gcc -Os -Wall -Werror -static -DVERSION="v$ver-tpi-$K8S_VERSION" \
    -o "$work/pause" "$src/build/pause/linux/pause.c"
  strip "$work/pause"
  "${PYTHON:-python3}" "$HERE/mkimage.py" --binary "$work/pause" --name "$image" --out "$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  echo "[pause] $image: $(du -h "$tarball" | cut -f1) at $tarball" >&2
  echo "$tarball"
}

case "${1:-build}" in
  build) build ;;
  name) name ;;
  *) echo "usage: $0 [build|name]" >&2; exit 2 ;;
esac
