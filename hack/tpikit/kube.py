"""Settings of the local cluster (hack/lib/common.sh's) and kubectl helpers, shared by the demo
(hack/demo.py), the test tiers and the benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

HACK = Path(__file__).resolve().parent.parent
REPO = HACK.parent
_SETTINGS = (
    "K8S_VERSION", "CACHE", "BIN", "CLUSTER_DIR", "KUBECONFIG_ADMIN", "DEFAULT_OPERATOR_IMAGE", "DEFAULT_RUNTIME_IMAGE",
    "DEFAULT_BASE_IMAGE", "REAL_NODE_LABEL", "CONTAINERD_SOCK",
)  # fmt: skip


def _hack_settings() -> dict[str, str]:
    """hack/lib/common.sh's values (its defaults, or the TPI_* environment): written down once."""
    out = subprocess.run(
        ["bash", str(HACK / "lib" / "common.sh"), "print", *_SETTINGS],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return dict(zip(_SETTINGS, out.stdout.splitlines(), strict=True))


_S = _hack_settings()
K8S_VERSION = _S["K8S_VERSION"]
CACHE = Path(_S["CACHE"])
BIN = Path(_S["BIN"])
CLUSTER_DIR = Path(_S["CLUSTER_DIR"])  # hack/cluster.sh's state: logs/, pids/
KUBECONFIG = Path(_S["KUBECONFIG_ADMIN"])
DEFAULT_OPERATOR_IMAGE = _S["DEFAULT_OPERATOR_IMAGE"]
DEFAULT_RUNTIME_IMAGE = _S["DEFAULT_RUNTIME_IMAGE"]
DEFAULT_BASE_IMAGE = _S["DEFAULT_BASE_IMAGE"]
REAL_NODE_LABEL = _S["REAL_NODE_LABEL"]
CONTAINERD_SOCK = _S["CONTAINERD_SOCK"]

T = TypeVar("T")


def tool(name: str) -> str:
    """Path of a cluster tool; fails loudly (never skips) when it has not been built."""
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found and name != "kubectl":  # a random kubectl on PATH may not match the server
        return found
    raise RuntimeError(f"{name} not found at {path}: run `make tools` (hack/build-tools.sh)")


def kubectl(*args: str, check: bool = True, input: str | None = None, timeout: float = 60) -> str:
    """kubectl against the local cluster of hack/cluster.sh."""
    return run_kubectl(tool("kubectl"), str(KUBECONFIG), *args, check=check, input=input, timeout=timeout)


def run_kubectl(
    kubectl_bin: str, kubeconfig: str, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
) -> str:
    """Run kubectl; with check, a non-zero exit raises with kubectl's own message."""
    result = subprocess.run(
        [kubectl_bin, "--kubeconfig", kubeconfig, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def nested_make(target: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """`make -C REPO target` from a test that `make test` runs: on the images this run already put
    on the node (TPI_E2E_SKIP_BUILD=1), without the outer make's jobserver; ``env`` on top."""
    child = {**os.environ, "TPI_E2E_SKIP_BUILD": "1", **env}
    child.pop("MAKEFLAGS", None)
    child.pop("MAKELEVEL", None)
    return subprocess.run(
        ["make", "-C", str(REPO), target], env=child, capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_until(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.5, what: str = "") -> T:
    """Poll until predicate returns a truthy value; raise with the last value on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last value: {last!r}")
