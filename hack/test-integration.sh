#!/usr/bin/env bash
# `make test-integration`: the integration tier against the local control plane (hack/cluster.sh up).
#
# The grow-back soak (test_grow_back.py: 10 minutes of waiting on fake nodes, a kwok process and an
# operator of its own) runs alongside the rest of the tier instead of after it; its output follows
# the tier's, and either failing fails the tier. Only the soak: with the placement tests
# (test_placement.py) alongside too, the 2 cores fell behind and a kwok restart the rest of the
# tier waits for took over 30 s.
#
#   hack/test-integration.sh [pytest args...]   extra args go to every run
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" integration # HACK, ROOT, VENV, ...

ALONGSIDE=(tests/integration/test_grow_back.py)
logdir="$(mktemp -d -t tpi-integration.XXXXXX)"
trap 'rm -rf "$logdir"' EXIT

cd "$ROOT"
pids=()
ignore=()
for file in "${ALONGSIDE[@]}"; do
  "$VENV/bin/python" -m pytest "$file" -q -m integration -p no:cacheprovider "$@" \
    >"$logdir/$(basename "$file").log" 2>&1 &
  pids+=("$!")
  ignore+=("--ignore=$file")
done
failed=0
"$VENV/bin/python" -m pytest tests/integration -q -m integration "${ignore[@]}" "$@" || failed=1
for i in "${!ALONGSIDE[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  log "${ALONGSIDE[$i]} (alongside), exit $rc:"
  cat "$logdir/$(basename "${ALONGSIDE[$i]}").log"
  ((rc == 0)) || failed=1
done
((failed == 0)) || die "integration tier failed"
