#!/usr/bin/env bash
# A Debian bookworm base image for TPI's Dockerfile, made without any container registry:
# `debootstrap --variant=minbase` from this machine's apt mirror, then `docker import`.
#
#   hack/base-image.sh            make (or reuse) the image; prints its name on stdout
#   hack/base-image.sh dockerd    only make sure a docker engine answers (starts `dockerd` if needed)
#   hack/base-image.sh name       print the image name
#
# The rootfs tarball is cached in ~/.cache/tpi/images, keyed by suite, package list and mirror;
# the image carries the same key as a label, so a second run is a no-op (< 1 s).
# Environment: TPI_BASE_IMAGE (tpi/base:bookworm), TPI_BASE_SUITE (bookworm),
# TPI_BASE_PACKAGES (python3,python3-venv,ca-certificates), TPI_APT_MIRROR (default: the first
# http(s) Debian mirror in /etc/apt/sources.list*), DOCKER (docker).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" base-image # HACK, ROOT, ...; logs as [base-image]

IMAGE="${TPI_BASE_IMAGE:-$DEFAULT_BASE_IMAGE}"
SUITE="${TPI_BASE_SUITE:-bookworm}"
PACKAGES="${TPI_BASE_PACKAGES:-python3,python3-venv,ca-certificates}"
DOCKER="${DOCKER:-docker}"
LOGS="$CACHE/docker"
DOCKER_LOG="$LOGS/dockerd.log"

# Debian's docker.io client is 20.10; a newer static client in /usr/local/bin also works (it
# negotiates the API version down), so whichever `docker` is first on PATH is used.
docker_ok() { "$DOCKER" info >/dev/null 2>&1; }

ensure_dockerd() {
  docker_ok && return 0
  command -v dockerd >/dev/null || die "dockerd is missing (apt-get install docker.io)"
  if pgrep -x dockerd >/dev/null; then
    log "dockerd is starting; waiting"
  else
    mkdir -p "$(dirname "$DOCKER_LOG")"
    log "starting dockerd (log: $DOCKER_LOG)"
    # Its own supervised containerd (not the node's, which listens elsewhere: hack/node.sh).
    (close_inherited_fds; exec setsid nohup dockerd --host unix:///var/run/docker.sock >"$DOCKER_LOG" 2>&1 </dev/null) &
  fi
  wait_for "dockerd to answer" 60 docker_ok
}

apt_mirror() {
  if [[ -n "${TPI_APT_MIRROR:-}" ]]; then echo "$TPI_APT_MIRROR"; return; fi
  local m=""
  # One-line format: "deb [opts] URI SUITE COMPONENTS".
  m="$(grep -hsE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | sed -E 's/\[[^]]*\]//' | awk -v s="$SUITE" '$3 == s && $2 ~ /^https?:/ {print $2; exit}')"
  if [[ -z "$m" ]]; then
    # deb822 format: a stanza with "URIs:" and a "Suites:" line naming the suite itself.
    m="$(awk -v s="$SUITE" '
      /^[[:space:]]*$/ { if (uri != "" && hit) { print uri; exit } uri = ""; hit = 0; next }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) hit = 1 }
      END { if (uri != "" && hit) print uri }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
  fi
  [[ -n "$m" ]] || die "no Debian $SUITE mirror in /etc/apt/sources.list*; set TPI_APT_MIRROR"
  echo "$m"
}

make_image() {
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
  local mirror key tarball
  mirror="$(apt_mirror)"
  key="$(printf '%s\n' "$SUITE" "$PACKAGES" "$mirror" minbase v1 | sha256sum | cut -c1-16)"
  tarball="$IMAGES/base-$SUITE-$key.tar"

  ensure_dockerd
  if [[ "$("$DOCKER" image inspect -f '{{index .Config.Labels "dev.tpi.base-key"}}' "$IMAGE" 2>/dev/null)" == "$key" ]]; then
    log "$IMAGE is up to date (key $key)"
    echo "$IMAGE"; return 0
  fi

  mkdir -p "$IMAGES"
  if [[ ! -f "$tarball" ]]; then
    local t0 dir; t0=$(date +%s)
    dir="$(mktemp -d "$IMAGES/rootfs.XXXXXX")"
    log "debootstrap --variant=minbase --include=$PACKAGES $SUITE from $mirror"
    if ! nice debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$dir" "$mirror" \
        >"$IMAGES/debootstrap.log" 2>&1; then
      tail -20 "$IMAGES/debootstrap.log" >&2
      rm -rf "$dir"; die "debootstrap failed (log: $IMAGES/debootstrap.log)"
    fi
    # Slim it: no downloaded .debs, no package lists (an image that needs apt runs apt-get update),
    # no docs; keep the mirror in sources.list.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* \
      "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log "$dir"/tmp/*
    echo "deb $mirror $SUITE main" >"$dir/etc/apt/sources.list"
    tar --numeric-owner --xattrs -C "$dir" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
    log "rootfs tarball $(du -h "$tarball" | cut -f1) in $(( $(date +%s) - t0 ))s: $tarball"
  fi

  log "docker import $tarball as $IMAGE"
  "$DOCKER" import \
    --change "LABEL dev.tpi.base-key=$key" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8" \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$IMAGE" >/dev/null
  log "$IMAGE: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
  echo "$IMAGE"
}

case "${1:-make}" in
  make) make_image ;;
  dockerd) ensure_dockerd ;;
  name) echo "$IMAGE" ;;
  *) echo "usage: $0 [make|dockerd|name]" >&2; exit 2 ;;
esac
