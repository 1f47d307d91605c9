"""The Dockerfile's structure (no docker engine needed) and hack/build-images.sh's commands."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
BUILD_IMAGES = REPO / "hack" / "build-images.sh"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse(text: str) -> tuple[list[tuple[str, str]], dict[str, Stage]]:
    """(instructions before the first FROM, stages by name), joining continuation lines."""
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    preamble: list[tuple[str, str]] = []
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for instr in logical:
        keyword, _, arg = instr.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arg.strip(), flags=re.I)
            assert m, f"every stage is named: FROM {arg}"
            current = Stage(name=m.group(2), base=m.group(1))
            assert current.name not in stages, f"stage {current.name} defined twice"
            stages[current.name] = current
        elif current is None:
            preamble.append((keyword, arg.strip()))
        else:
            current.instructions.append((keyword, arg.strip()))
    return preamble, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[tuple[str, str]], dict[str, Stage]]:
    return parse(DOCKERFILE.read_text())


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage, the stages it is built FROM, and those it COPYs --from (recursively)."""
    seen: dict[str, Stage] = {}
    todo = [name]
    while todo:
        n = todo.pop()
        if n in seen or n not in stages:
            continue
        st = seen[n] = stages[n]
        todo.append(st.base)
        todo += re.findall(r"--from=(\S+)", " ".join(st.all("COPY")))
    return list(seen.values())


def extras() -> dict[str, list[str]]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def req_name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower()


def test_base_image_is_an_arg(dockerfile) -> None:
    preamble, stages = dockerfile
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in preamble
    assert stages["base"].base == "${BASE_IMAGE}"
    # Every other stage builds on `base` (directly or through the builder), never on a second image.
    for st in stages.values():
        if st.name != "base":
            assert st.base in stages, f"stage {st.name} is FROM {st.base}, not a stage of this file"


def test_classic_builder_compatible() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax=", text, flags=re.M), "a syntax line pulls a frontend from a registry"
    assert "--mount=" not in text, "RUN --mount needs BuildKit"
    assert "<<" not in text, "heredocs need BuildKit"


@pytest.mark.parametrize(("target", "module"), [("operator", "tpi_operator"), ("runtime", "tpi_runtime")])
def test_final_stages(dockerfile, target: str, module: str) -> None:
    _, stages = dockerfile
    st = stages[target]
    assert st.base == "base", "final stages start from the plain base, without the builder's tools"
    users = st.all("USER")
    assert users, f"{target} sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 10001, f"{target} runs as {users[-1]}, not uid 10001"
    last_user = max(i for i, (kw, _) in enumerate(st.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in st.instructions[last_user:]), "RUN after USER"
    assert json.loads(st.all("ENTRYPOINT")[-1]) == ["python", "-m", module]
    # No package managers or compilers in the final image: nothing is installed there at all.
    assert not st.all("RUN"), f"{target} must only COPY the built venv and code"
    copies = st.all("COPY")
    assert any(c.startswith("--from=") and c.endswith("/opt/venv /opt/venv") for c in copies)
    src = f"{target}/{module}"
    assert f"{src} /app/{module}" in copies
    assert (REPO / target / module).is_dir()
    assert "contract/tpi_contract /app/tpi_contract" in copies, "both images import the contract package"
    envs = " ".join(e for s in lineage(stages, target) for e in s.all("ENV"))
    assert "PYTHONUNBUFFERED=1" in envs
    assert "PYTHONPATH=/app" in envs and "PATH=/opt/venv/bin:$PATH" in envs


def test_operator_image_has_no_torch(dockerfile) -> None:
    _, stages = dockerfile
    chain = lineage(stages, "operator")
    names = {s.name for s in chain}
    assert "runtime-builder" not in names and "runtime" not in names
    for st in chain:
        for kw, arg in st.instructions:
            assert "torch" not in arg.lower() or "must not be in the operator image" in arg, f"{st.name}: {kw} {arg}"
    runs = " ".join(stages["operator-builder"].all("RUN"))
    assert "extra-requirements.py operator" in runs
    assert not [r for r in extras()["operator"] if req_name(r) == "torch"], "pyproject's operator extra pulls torch"


def test_runtime_installs_torch_in_an_early_layer(dockerfile) -> None:
    _, stages = dockerfile
    st = stages["runtime-builder"]
    kinds = [(kw, arg) for kw, arg in st.instructions if kw in ("RUN", "COPY")]
    torch_at = next(i for i, (kw, arg) in enumerate(kinds) if kw == "RUN" and "TORCH_REQUIREMENT" in arg)
    pyproject_at = next(i for i, (kw, arg) in enumerate(kinds) if kw == "COPY" and "pyproject.toml" in arg)
    assert torch_at < pyproject_at, "torch must be installed before pyproject.toml (and code) is copied"
    assert "extra-requirements.py runtime torch" in " ".join(st.all("RUN"))
    (arg,) = [a for a in st.all("ARG") if a.startswith("TORCH_REQUIREMENT=")]
    torch_req = shlex.split(arg.partition("=")[2])[0]
    assert torch_req in extras()["runtime"], f"TORCH_REQUIREMENT {torch_req} differs from pyproject's runtime extra"
    wanted = {req_name(r) for r in extras()["runtime"]}
    assert {"torch", "safetensors", "nvidia-ml-py", "tokenizers", "prometheus-client", "kubernetes"} <= wanted


def test_wheelhouse_mode_and_no_build_leftovers(dockerfile) -> None:
    _, stages = dockerfile
    builder = stages["builder"]
    assert "WHEELHOUSE=" in builder.all("ARG")
    assert "Dockerfile wheelhouse* /wheelhouse/" in builder.all("COPY")
    runs = " ".join(builder.all("RUN"))
    assert "--no-index --find-links /wheelhouse" in runs
    assert "python3 -m venv /opt/venv" in runs
    assert "PIP_NO_CACHE_DIR=1" in " ".join(builder.all("ENV"))
    # Each builder strips pip/setuptools/wheel from the venv after its last install.
    for name in ("operator-builder", "runtime-builder"):
        last_run = stages[name].all("RUN")[-1]
        assert last_run.rstrip().endswith("strip-venv"), name
    assert "pip uninstall -y pip setuptools wheel" in runs


def test_dockerignore_allow_list() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "start from nothing (no .git, tests or caches in the build context)"
    for needed in ("!Dockerfile", "!pyproject.toml", "!operator/", "!runtime/", "!contract/", "!wheelhouse/"):
        assert needed in rules


# --- hack/build-images.sh -----------------------------------------------------------------------


def build_images(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD_IMAGES), "--dry-run", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **(env or {})},
    )  # fmt: skip


def commands(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("+ ")]


def test_build_images_script_syntax() -> None:
    proc = subprocess.run(["bash", "-n", str(BUILD_IMAGES)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_build_images_defaults() -> None:
    cmds = commands(build_images())
    root = shlex.quote(str(REPO))
    assert cmds == [
        f"docker build --target operator --tag tpi/operator:dev --file {root}/Dockerfile {root}",
        f"docker build --target runtime --tag tpi/runtime:dev --file {root}/Dockerfile {root}",
    ]


def test_build_images_base_wheelhouse_and_containerd() -> None:
    cmds = commands(build_images("--target", "runtime", "--wheelhouse", "--load", "containerd",
                                 env={"BASE_IMAGE": "tpi/base:bookworm"}))  # fmt: skip
    download = [c for c in cmds if " -m pip download " in c]
    assert len(download) == 1 and "--only-binary=:all:" in download[0] and "--python-version 3.11" in download[0]
    (build,) = [c for c in cmds if c.startswith("docker build")]
    assert "--target runtime" in build and "--tag tpi/runtime:dev" in build
    assert "--build-arg BASE_IMAGE=tpi/base:bookworm" in build
    assert "--build-arg WHEELHOUSE=required" in build
    assert cmds.index(download[0]) < cmds.index(build), "the wheelhouse is filled before the build"
    assert cmds[-1] == "docker save tpi/runtime:dev | ctr -n k8s.io images import -"


def test_build_images_kind() -> None:
    cmds = commands(build_images("--target=operator", "--load=kind", "--kind-cluster", "tpi"))
    assert cmds[-1] == "kind load docker-image tpi/operator:dev --name tpi"


@pytest.mark.parametrize("args", [["--load", "nowhere"], ["--target", "both"], ["--bogus"]])
def test_build_images_rejects_bad_arguments(args: list[str]) -> None:
    proc = build_images(*args)
    assert proc.returncode == 2
    assert "build-images:" in proc.stderr
