"""core.status.invalid: a spec the operator cannot act on is reported once, not re-stamped."""

from __future__ import annotations

import datetime as dt

import pytest
from op_builders import NOW
from tpi_operator.api.v1alpha1 import TPInferenceClusterStatus
from tpi_operator.core import status


@pytest.mark.parametrize(
    ("reason", "message", "keeps_time"),
    [
        ("InvalidTensorParallelSize", "tp=4 cannot shard", True),  # same failure: same status
        ("InvalidTensorParallelSize", "tp=8 cannot shard", False),  # new message: new time
        ("ModelTooLarge", "tp=4 cannot shard", False),  # new reason: new time
    ],
)
def test_invalid_keeps_the_time_of_an_unchanged_failure(reason: str, message: str, keeps_time: bool) -> None:
    first = status.invalid(
        TPInferenceClusterStatus(), 1, "InvalidTensorParallelSize", "tp=4 cannot shard", NOW, phase="Failed"
    )
    later = NOW + dt.timedelta(seconds=30)
    again = status.invalid(first, 1, reason, message, later, phase="Failed")
    assert (again == first) is keeps_time
    assert again.last_failure.endswith(f"{reason}: {message}")
    assert {c.type: c.status for c in again.conditions} == {"Ready": "False", "Progressing": "False",
                                                           "Degraded": "True"}  # fmt: skip
