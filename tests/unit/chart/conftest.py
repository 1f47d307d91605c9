"""Fixtures for the chart tests: a real helm binary and a renderer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tpikit.kube import BIN

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "tpi-operator"
DEFAULT_HELM = BIN / "helm"  # where hack/build-tools.sh installs it


def helm_path() -> Path:
    return Path(os.environ.get("TPI_HELM") or DEFAULT_HELM).expanduser()


@pytest.fixture(scope="session")
def helm() -> Path:
    path = helm_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"helm not found at {path}: build it with hack/build-tools.sh (it installs helm into "
            f"{BIN}) or point TPI_HELM at a helm v3 binary",
            pytrace=False,
        )
    return path


class Rendered(list):
    """The manifests of one `helm template` run, with lookups by kind and name."""

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.kinds(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
        return found[0]


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="session")
def render(helm: Path):
    cache: dict[tuple[str, ...], Rendered] = {}

    def _render(*sets: str, release: str = "tpi", namespace: str = "tpi-system") -> Rendered:
        key = (release, namespace, *sets)
        if key not in cache:
            args = ["template", release, str(CHART), "--namespace", namespace]
            for s in sets:
                args += ["--set", s]
            proc = run_helm(helm, *args)
            assert proc.returncode == 0, f"helm template {' '.join(sets)} failed:\n{proc.stderr}"
            cache[key] = Rendered(d for d in yaml.safe_load_all(proc.stdout) if d)
        return cache[key]

    return _render
