#!/usr/bin/env bash
# `make test-unit`: the unit tier (pure functions, the runtime on real gloo processes, the chart with
# real helm). hack/test-integration.sh --with-unit runs this same script beside the integration tier.
#
#   hack/test-unit.sh [pytest args...]
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" unit # ROOT, VENV

cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests/unit -q "$@"
