"""The harness tells the truth: a failing e2e test fails `make e2e` (hence `make test` and
`.ci/run`), and a passing selection passes.

Runs the real entry point (make -> hack/e2e.sh -> pytest) on the canaries of tests/harness; the
bring-up steps are already done by this run, so each call only re-checks them (seconds).
"""

from __future__ import annotations

import subprocess

from tpikit.kube import nested_make


def _make_e2e(selection: str) -> subprocess.CompletedProcess[str]:
    return nested_make("e2e", timeout=600, TPI_E2E_TESTS="tests/harness", E2E_ARGS=f"-k {selection}")


def test_a_failing_e2e_test_fails_make_e2e() -> None:
    result = _make_e2e("canary_fails_on_purpose")
    out = result.stdout + result.stderr
    assert "1 failed" in out, f"the canary did not run: {out[-3000:]}"
    assert result.returncode != 0, f"make e2e exited 0 although a test failed:\n{out[-3000:]}"
    assert "FAILED (exit 1)" in out, "hack/e2e.sh did not report the failing step"


def test_a_passing_selection_passes_make_e2e() -> None:
    result = _make_e2e("canary_passes")
    out = result.stdout + result.stderr
    assert "1 passed" in out, f"the canary did not run: {out[-3000:]}"
    assert result.returncode == 0, f"make e2e failed on a passing selection:\n{out[-3000:]}"
