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
        {"replicas": -1},
        {"backend": "mpi"},
        {"resources": {"memory": "lots"}},
        {"runtime": {"maxBatchSize": 0}},
    ],
)
def test_invalid_specs_are_rejected(overrides):
    with pytest.raises(pydantic.ValidationError):
        make_spec(**overrides)


def test_tensor_parallel_bounds_are_a_cel_rule_in_the_crd():
    # int-or-string bounds cannot be OpenAPI minimum/maximum; the API server enforces them with CEL
    # (tests/integration/test_operator.py applies tensorParallelSize: 0 and sees it rejected).
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[3]
    crd = yaml.safe_load((repo / "crds" / "tpi.dev_tpinferenceclusters.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    tp = spec["properties"]["tensorParallelSize"]
    assert tp["x-kubernetes-int-or-string"] is True
    rules = [v["rule"] for v in tp["x-kubernetes-validations"]]
    assert any("self >= 1" in r and "'auto'" in r for r in rules), rules
