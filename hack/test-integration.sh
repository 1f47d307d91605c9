#!/usr/bin/env bash
# `make test-integration`: the integration tier against the local control plane (hack/cluster.sh up).
#
# Runs alongside the tier, in the background; each one's output follows the tier's, and any of them
# failing fails the tier:
#   - the grow-back soak (test_grow_back.py: 10 minutes of waiting on fake nodes, a kwok process and
#     an operator of its own). Only the soak: with the placement tests (test_placement.py)
#     alongside too, the 2 cores fell behind and a kwok restart the rest of the tier waits for took
#     over 30 s.
#   - with --with-unit (`make test`), the unit tier, at a lower CPU priority. The integration tier
#     mostly waits on the operator's and Kubernetes' timers (0.31 of the 2 cores on average,
#     sampled over a whole run), so the unit tier fills the idle cores instead of taking ~8.5
#     minutes of its own, and `nice` keeps the control plane, kwok and the operators first
#     whenever both want a core.
#
#   hack/test-integration.sh [--with-unit] [pytest args...]   extra args go to every integration run
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" integration # HACK, ROOT, VENV, ...

SOAK=tests/integration/test_grow_back.py
UNIT_NICENESS=10
with_unit=0
if [[ "${1:-}" == --with-unit ]]; then
  with_unit=1
  shift
fi
logdir="$(mktemp -d -t tpi-integration.XXXXXX)"
trap 'rm -rf "$logdir"' EXIT

cd "$ROOT"
names=() pids=()
alongside() { # name, command...: start it in the background, its output to $logdir/<index>.log
  local name="$1"
  shift
  "$@" >"$logdir/${#names[@]}.log" 2>&1 &
  names+=("$name")
  pids+=("$!")
}
alongside "$SOAK" "$VENV/bin/python" -m pytest "$SOAK" -q -m integration -p no:cacheprovider "$@"
if ((with_unit)); then
  alongside "the unit tier (hack/test-unit.sh)" nice -n "$UNIT_NICENESS" "$HACK/test-unit.sh"
fi
failed=0
"$VENV/bin/python" -m pytest tests/integration -q -m integration "--ignore=$SOAK" "$@" || failed=1
for i in "${!names[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  log "${names[$i]} (alongside), exit $rc:"
  cat "$logdir/$i.log"
  ((rc == 0)) || failed=1
done
((failed == 0)) || die "integration tier failed"
