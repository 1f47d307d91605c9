"""Canaries for the test harness itself, never collected by a normal run (tests/e2e/test_harness.py
runs them through `make e2e` with TPI_E2E_TESTS=tests/harness).

One passes and one fails on purpose: a harness that reports success for the failing one would let
every real failure through, as hack/e2e.sh once did.
"""

import pytest

pytestmark = pytest.mark.e2e


def test_canary_passes() -> None:
    assert 2 + 2 == 4


def test_canary_fails_on_purpose() -> None:
    pytest.fail("deliberate failure: the harness must report it with a non-zero exit status")
