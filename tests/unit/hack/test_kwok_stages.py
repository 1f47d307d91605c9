"""hack/kwok/fault-stages.yaml: the container fault and restart stages patch only the pod they
matched.  kwok plays a delayed or retried stage by namespace/name from the object it matched, so a
patch without the pod's uid could land on the StatefulSet's replacement of the same name (a crash
it never had).  The real API server refusing such a patch is tests/integration/test_cluster.py's."""

from __future__ import annotations

import re

import pytest
import yaml
from tpikit.kube import HACK

STAGES = HACK / "kwok" / "fault-stages.yaml"
UID = "{{ .metadata.uid | Quote }}"


def stage_patches(name: str) -> list[dict]:
    stages = {d["metadata"]["name"]: d for d in yaml.safe_load_all(STAGES.read_text()) if d}
    return stages[name]["spec"]["next"]["patches"]


@pytest.mark.parametrize("stage", ["tpi-container-fault", "tpi-container-restart"])
def test_every_patch_names_the_pod_uid(stage: str) -> None:
    patches = stage_patches(stage)
    assert len(patches) == 2  # the status, then the annotations
    for patch in patches:
        template = patch["template"]
        if patch.get("root") == "metadata":
            assert re.search(rf"^uid: {re.escape(UID)}$", template, re.M), template
        else:
            # no root: the patch is the whole object, so it can carry metadata.uid beside status
            assert "root" not in patch and patch["subresource"] == "status"
            assert re.search(rf"^metadata:\n  uid: {re.escape(UID)}$", template, re.M), template
            assert re.search(r"^status:$", template, re.M), template
