"""The checked-in CRDs must be exactly what hack/gen_crds.py makes of the pydantic models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_crds", ROOT / "hack" / "gen_crds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crds_dir_matches_models():
    gen = _gen()
    path = ROOT / "crds" / gen.CRD_FILE
    assert path.read_text() == gen.render(), "crds/ is stale: run `python hack/gen_crds.py`"


def test_chart_crds_match_crds_dir():
    gen = _gen()
    chart = ROOT / "charts" / "tpi-operator" / "crds" / gen.CRD_FILE
    assert chart.read_text() == (ROOT / "crds" / gen.CRD_FILE).read_text(), (
        "charts/tpi-operator/crds/ differs from crds/: run `python hack/gen_crds.py`"
    )


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural():
    crd = yaml.safe_load((ROOT / "crds" / _gen().CRD_FILE).read_text())
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert "title" not in node or path.endswith(".properties"), path
        assert node.get("type") != "null", path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
    tp = schema["properties"]["spec"]["properties"]["tensorParallelSize"]
    assert tp["x-kubernetes-int-or-string"] is True
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["TP"]["jsonPath"] == ".status.tp"
    assert columns["Restarts"]["priority"] == 1 and columns["Last-Failure"]["priority"] == 1


def test_every_generated_file_is_checked_in():
    # the TPI CRD and kopf's peering CRDs, in crds/ and the chart's copy
    for path, text in _gen().outputs():
        assert path.read_text() == text, f"{path} is stale: run `python hack/gen_crds.py`"


def test_peering_crds_are_what_kopf_looks_for():
    gen = _gen()
    docs = [yaml.safe_load((ROOT / "crds" / name).read_text()) for name in gen.PEERING_FILES]
    names = {(d["spec"]["names"]["kind"], d["spec"]["scope"]) for d in docs}
    assert names == {("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")}
    for d in docs:
        assert d["spec"]["group"] == "zalando.org" and d["spec"]["versions"][0]["name"] == "v1"
        status = d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True  # kopf writes its peers there
