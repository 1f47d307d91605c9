#!/usr/bin/env bash
# `make test-integration`: the integration tier against the local control plane (hack/cluster.sh up).
#
# The grow-back soak (tests/integration/test_grow_back.py) is 10 minutes of waiting on fake nodes and
# a kwok process of its own, with an operator of its own: it runs alongside the rest of the tier
# instead of after it, and its output follows the tier's. Either failing fails the tier.
#
#   hack/test-integration.sh [pytest args...]   extra args go to both runs
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" integration # HACK, ROOT, VENV, ...

SOAK=tests/integration/test_grow_back.py
soak_log="$(mktemp -t tpi-soak.XXXXXX)"
trap 'rm -f "$soak_log"' EXIT

cd "$ROOT"
"$VENV/bin/python" -m pytest "$SOAK" -q -m integration -p no:cacheprovider "$@" >"$soak_log" 2>&1 &
soak_pid=$!
rest_rc=0
"$VENV/bin/python" -m pytest tests/integration -q -m integration --ignore="$SOAK" "$@" || rest_rc=$?
soak_rc=0
wait "$soak_pid" || soak_rc=$?
log "grow-back soak ($SOAK), exit $soak_rc:"
cat "$soak_log"
if ((rest_rc != 0 || soak_rc != 0)); then
  die "integration tier failed (rest: exit $rest_rc, soak: exit $soak_rc)"
fi
