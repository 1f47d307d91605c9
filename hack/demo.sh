#!/usr/bin/env bash
# `make demo`: local control plane + a real kubelet node + images (hack/e2e.sh up), then
# hack/demo.py: helm install, a 2-rank TPInferenceCluster of a small checkpoint, one completion.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CACHE="${TPI_CACHE:-$HOME/.cache/tpi}"
VENV="${TPI_VENV:-$CACHE/venv}"
"$HERE/e2e.sh" up
cd "$ROOT"
PYTHONPATH="$ROOT:$ROOT/runtime:$ROOT/operator" "$VENV/bin/python" hack/demo.py
