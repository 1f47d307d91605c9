#!/usr/bin/env bash
# Install what a fresh machine lacks: Debian packages, the Python virtualenv with the project's
# extras, and the Kubernetes tool chain (built from Go modules, cached in ~/.cache/tpi).
#   hack/ensure-deps.sh [apt] [venv] [tools]     (default: all three)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" deps # HACK, ROOT, ...; logs as [deps]
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(openssl iproute2 procps ca-certificates shellcheck)
steps=("$@"); [[ ${#steps[@]} -gt 0 ]] || steps=(apt venv tools)

ensure_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}" ${TPI_EXTRA_APT:-}; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  log "apt-get install ${missing[*]}"
  local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_venv() {
  # The stamp is keyed by pyproject.toml, so a dependency change reinstalls and nothing else does.
  local stamp
  stamp="$VENV/.tpi-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-$(echo "$ROOT" | sha256sum | cut -c1-8)"
  [[ -f "$stamp" ]] && return
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  log "pip install -e .[dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "${ROOT}[dev]"
  rm -f "$VENV"/.tpi-* && touch "$stamp"
}

ensure_tools() {
  command -v go >/dev/null || die "go is missing: install Go >= 1.24 (apt-get install golang-go is too old)"
  "$HACK/build-tools.sh"
}

for s in "${steps[@]}"; do "ensure_$s"; done
