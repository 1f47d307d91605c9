#!/usr/bin/env bash
# `make demo`: local control plane + a real kubelet node + images (hack/e2e.sh up), then
# hack/demo.py: helm install, a 3-rank TPInferenceCluster serving SmolLM2-135M-Instruct (GGUF), one
# chat answer.
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" demo # HACK, ROOT, ...; logs as [demo]
"$HACK/e2e.sh" up
cd "$ROOT"
# hack/ for tpikit (the Kubernetes plumbing the demo shares with tests/e2e).
PYTHONPATH="$ROOT:$HACK:$ROOT/runtime:$ROOT/operator:$ROOT/contract" "$VENV/bin/python" hack/demo.py
