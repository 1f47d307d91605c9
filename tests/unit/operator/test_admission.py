"""core.admission: hostPath model sources only under the operator's allow-list."""

from __future__ import annotations

import pytest
from op_builders import make_spec
from tpi_operator.core.admission import host_path_refusal


def spec_with(path: str):
    return make_spec(model={"source": {"hostPath": {"path": path}}})


@pytest.mark.parametrize(
    ("path", "allowed", "refused"),
    [
        ("/var/lib/tpi-e2e/model", (), "allows no host paths"),  # the default: none
        ("/var/lib/tpi-e2e/model", ("/var/lib/tpi-e2e",), None),
        ("/var/lib/tpi-e2e", ("/var/lib/tpi-e2e/",), None),
        ("/var/lib/tpi-e2e-other/x", ("/var/lib/tpi-e2e",), "not under an allowed host path"),  # no prefix trick
        ("/var/lib/tpi-e2e/../../etc", ("/var/lib/tpi-e2e",), "not under an allowed host path"),  # no escape
        ("/etc", ("/var/lib/tpi-e2e", "/data"), "not under"),
        ("/data/m", ("/var/lib/tpi-e2e", "/data"), None),
    ],
)
def test_host_path_allow_list(path, allowed, refused):
    why = host_path_refusal(spec_with(path), allowed)
    assert (why is None) == (refused is None)
    if refused:
        assert refused in why and path in why


def test_other_sources_are_not_affected():
    assert host_path_refusal(make_spec(), ()) is None  # pvc
