"""API types: defaults, validation, wire format."""

from __future__ import annotations

import pydantic
import pytest
from op_builders import make_spec
from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec


def test_defaults_and_wire_names():
    spec = make_spec()
    wire = spec.wire()
    assert wire["failurePolicy"]["heartbeatTimeoutSeconds"] == 30
    assert wire["runtime"]["maxBatchSize"] == 8 and wire["backend"] == "auto"
    assert TPInferenceClusterSpec.model_validate(wire) == spec


@pytest.mark.parametrize(
    "overrides",
    [
        {"tensorParallelSize": "big"},
        {"tensorParallelSize": 0},
        {"replicas": -1},
        {"backend": "mpi"},
        {"resources": {"memory": "lots"}},
        {"runtime": {"maxBatchSize": 0}},
    ],
)
def test_invalid_specs_are_rejected(overrides):
    if overrides.get("tensorParallelSize") == 0:
        pytest.skip("bounds on int-or-string are enforced by CEL in the API server")
    with pytest.raises(pydantic.ValidationError):
        make_spec(**overrides)
