"""Fixtures for the e2e tier: real pods on a real node (see hack/tpikit/provider.py).

hack/e2e.sh brings the cluster, the node and the images up and then runs this suite; the fixtures
here only check that they are there (and fail loudly, never skip, when they are not). The
Kubernetes plumbing the fixtures and tests use (Kube, Operator, Client, tpic, ...) is
hack/tpikit/cluster.py, shared with the demo.

Environment:
  TPI_E2E_PROVIDER        local (default) | kind
  TPI_E2E_RUNTIME_IMAGE   runtime image on the node (tpi/runtime:dev)
  TPI_E2E_OPERATOR_IMAGE  operator image on the node (tpi/operator:dev)
  TPI_E2E_SMOKE_IMAGE     any image with python3 for the infrastructure smoke test
                          (local: tpi/base:bookworm, kind: the runtime image)
  TPI_E2E_TIMINGS         JSON file the measured timings are appended to (_out/e2e-timings.json)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tpikit.cluster import MAX_TOKENS, PROMPT_IDS, RUNTIME_IMAGE, Kube, Operator, dump_namespace
from tpikit.kube import DEFAULT_BASE_IMAGE, REPO, wait_until
from tpikit.provider import Provider, get_provider

TIMINGS = Path(os.environ.get("TPI_E2E_TIMINGS", REPO / "_out" / "e2e-timings.json"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)
    # `make demo` re-installs the operator watching only the demo's namespace: it goes last.
    items.sort(key=lambda item: item.path.name == "test_demo.py")


def smoke_image(provider: Provider) -> str:
    default = DEFAULT_BASE_IMAGE if provider.name == "local" else RUNTIME_IMAGE
    return os.environ.get("TPI_E2E_SMOKE_IMAGE", default)


def record_timing(name: str, seconds: float, **extra: Any) -> None:
    """Print a measured time and append it to TIMINGS (the README and reports quote these)."""
    print(f"\n[e2e timing] {name}: {seconds:.1f}s {extra or ''}")
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else []
    entries.append({"name": name, "seconds": round(seconds, 2), "at": time.time(), **extra})
    TIMINGS.write_text(json.dumps(entries, indent=1))


# ------------------------------------------------------------------------------------ cluster
@pytest.fixture(scope="session")
def provider() -> Provider:
    p = get_provider()
    node = p.node_name()
    ready = p.kubectl("get", "node", node, "-o", 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')
    assert ready == "True", f"node {node} is not Ready: run hack/e2e.sh (or hack/node.sh up)"
    return p


@pytest.fixture(scope="session")
def kube(provider: Provider) -> Kube:
    return Kube(provider)


def _make_namespace(kube: Kube, base: str) -> str:
    name = f"{re.sub(r'[^a-z0-9-]', '-', base.lower())[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    kube("create", "namespace", name)
    kube("label", "namespace", name, "tpi.dev/e2e=true")
    wait_until(
        lambda: kube.p.kubectl("get", "serviceaccount", "default", "-n", name, check=False).strip(),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    return name


def _delete_namespace(kube: Kube, name: str) -> None:
    """Delete and wait until its pods are gone, so the next test gets the node's capacity back.

    The pods are force-deleted once the namespace is Terminating (no new pod can be created in
    it then): a graceful delete would drain each rank (preStop delay, then the in-flight requests),
    ~15 s per test that only tears down. The tests that check draining do it in their own body.
    """
    kube("delete", "namespace", name, "--wait=false", check=False)
    kube("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force", "--wait=false", check=False)
    try:
        wait_until(
            lambda: not kube.p.kubectl("get", "pods", "-n", name, "-o", "name", check=False).strip(),
            timeout=120,
            what=f"pods of namespace {name} gone",
        )
    except AssertionError as e:  # report, but do not mask the test's own result
        print(f"warning: {e}")


@pytest.fixture()
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted (pods waited for) afterwards."""
    name = _make_namespace(kube, request.node.name)
    yield name
    _dump_on_failure(kube, name, request)
    _delete_namespace(kube, name)


@pytest.fixture(scope="module")
def module_namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _make_namespace(kube, request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    yield name
    _delete_namespace(kube, name)


def _dump_on_failure(kube: Kube, namespace: str, request: pytest.FixtureRequest) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed:
        return
    dump_namespace(kube, namespace)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


# ----------------------------------------------------------------------------------- operator
@pytest.fixture(scope="session")
def operator(provider: Provider) -> Iterator[Operator]:
    op = Operator(provider)
    seconds = op.install()
    record_timing("helm install (operator Available)", seconds)
    yield op
    if op.installed:
        try:
            op.uninstall()
        except RuntimeError as e:
            print(f"warning: {e}")


# --------------------------------------------------------------------------------- checkpoint
def _venv_python() -> str:
    import sys

    return sys.executable


def reference_generation(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from one local process: `python -m tpi_runtime generate` (world size 1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "runtime"), str(REPO / "contract"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [
            _venv_python(), "-m", "tpi_runtime", "generate", "--model", str(model_dir),
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-tokens", str(max_tokens),
            "--temperature", "0", "--dtype", "float32", "--device", "cpu",
        ],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"local generate failed: {out.stderr[-2000:]}"
    m = re.search(r"^token_ids: *([0-9, ]*)$", out.stdout, re.M)
    assert m, f"no token_ids in the generate output: {out.stdout!r}"
    return [int(x) for x in m.group(1).split(",") if x.strip()]


class Checkpoint:
    def __init__(self, local: Path, node_path: str, reference: list[int]) -> None:
        self.local, self.node_path, self.reference = local, node_path, reference


@pytest.fixture(scope="session")
def checkpoint(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A tiny Llama checkpoint made here, copied onto the node, with its single-process reference."""
    from tpi_runtime.testing import make_tiny_checkpoint

    local = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_tiny_checkpoint(local, seed=1234)
    node_path = provider.stage_dir(local, f"tiny-{uuid.uuid4().hex[:6]}")
    return Checkpoint(local, node_path, reference_generation(local, PROMPT_IDS, MAX_TOKENS))
