"""Cluster providers for the e2e tier and the demo: one suite, two ways to get a real node.

``TPI_E2E_PROVIDER=local`` (default): the control plane of hack/cluster.sh plus the real kubelet
node of hack/node.sh on this machine (containerd, CNI bridge, kube-proxy, CoreDNS as host
processes). ``TPI_E2E_PROVIDER=kind``: an existing kind cluster (``TPI_E2E_KIND_CLUSTER``, default
``kind``) on a workstation or CI runner with docker; hack/e2e.sh creates it, loads the images with
``kind load docker-image`` and labels/taints a worker like the local node.

The suite only needs what differs between the two from here: the kubeconfig and kubectl, how a
directory gets onto the node (hostPath checkpoints), and how to signal a container's main process
on the node (SIGSTOP for the hung-rank test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tpikit.kube import BIN, CONTAINERD_SOCK, KUBECONFIG, REAL_NODE_LABEL, REPO, run_kubectl

NODE_LABEL = REAL_NODE_LABEL
#: What every e2e pod carries to land on the real node (and nowhere else).
NODE_SELECTOR = {NODE_LABEL: "true"}
TOLERATIONS = [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}]
#: Where test data (checkpoints) lives on the node; hostPath volumes point here.
NODE_DATA_DIR = os.environ.get("TPI_E2E_NODE_DATA_DIR", "/var/lib/tpi-e2e")


def _run(cmd: list[str], timeout: float = 120, input: str | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


class Provider:
    name = "base"

    def __init__(self) -> None:
        self.kubeconfig = ""
        self.kubectl_bin = ""

    # -- cluster access -------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60) -> str:
        return run_kubectl(self.kubectl_bin, self.kubeconfig, *args, check=check, input=input, timeout=timeout)

    def helm(self, *args: str, timeout: float = 300) -> str:
        helm = str(BIN / "helm") if (BIN / "helm").is_file() else shutil.which("helm")
        if not helm:
            raise RuntimeError("helm not found: run `make tools`")
        return _run([helm, "--kubeconfig", self.kubeconfig, *args], timeout=timeout)

    def node_name(self) -> str:
        out = self.kubectl("get", "nodes", "-l", f"{NODE_LABEL}=true", "-o", "jsonpath={.items[*].metadata.name}")
        names = out.split()
        if not names:
            raise RuntimeError(f"no node labelled {NODE_LABEL}=true: run hack/e2e.sh (or hack/node.sh up)")
        return names[0]

    # -- node access ----------------------------------------------------------------------
    def stage_dir(self, local: Path, name: str) -> str:
        """Copy a local directory onto the node under NODE_DATA_DIR/name; returns the node path."""
        raise NotImplementedError

    def signal_container(self, container_id: str, signal: str) -> int:
        """Send a signal to a container's main process on the node; returns its host PID."""
        raise NotImplementedError


class LocalProvider(Provider):
    """hack/cluster.sh + hack/node.sh: the node is this machine."""

    name = "local"

    def __init__(self) -> None:
        super().__init__()
        self.kubeconfig = os.environ.get("TPI_E2E_KUBECONFIG", str(KUBECONFIG))
        self.kubectl_bin = str(BIN / "kubectl")
        self.containerd = os.environ.get("CONTAINERD_ADDRESS", CONTAINERD_SOCK)

    def stage_dir(self, local: Path, name: str) -> str:
        dest = Path(NODE_DATA_DIR) / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, dest)
        # The rank containers run as uid 10001: world-readable files, traversable directories.
        Path(NODE_DATA_DIR).chmod(0o755)
        for p in [dest, *dest.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        return str(dest)

    def container_pid(self, container_id: str) -> int:
        out = _run(["ctr", "--address", self.containerd, "-n", "k8s.io", "tasks", "ls"])
        for line in out.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == container_id:
                return int(parts[1])
        raise RuntimeError(f"container {container_id} has no running task in the node's containerd")

    def signal_container(self, container_id: str, signal: str) -> int:
        pid = self.container_pid(container_id)
        _run(["kill", f"-{signal}", str(pid)])
        return pid


class KindProvider(Provider):
    """A kind cluster: nodes are docker containers; kubectl and docker come from PATH."""

    name = "kind"

    def __init__(self) -> None:
        super().__init__()
        self.cluster = os.environ.get("TPI_E2E_KIND_CLUSTER", "kind")
        self.kubeconfig = os.environ.get("TPI_E2E_KUBECONFIG") or os.environ.get("KUBECONFIG", "")
        if not self.kubeconfig:
            path = REPO / "_out" / f"kind-{self.cluster}.kubeconfig"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_run(["kind", "get", "kubeconfig", "--name", self.cluster]))
            self.kubeconfig = str(path)
        self.kubectl_bin = shutil.which("kubectl") or str(BIN / "kubectl")

    def _node_container(self) -> str:
        return self.node_name()  # kind names the docker container after the node

    def stage_dir(self, local: Path, name: str) -> str:
        node = self._node_container()
        dest = f"{NODE_DATA_DIR}/{name}"
        _run(["docker", "exec", node, "sh", "-c", f"rm -rf '{dest}' && mkdir -p '{NODE_DATA_DIR}'"])
        _run(["docker", "cp", f"{local}/.", f"{node}:{dest}"], timeout=600)
        _run(["docker", "exec", node, "sh", "-c", f"chmod -R a+rX '{NODE_DATA_DIR}'"])
        return dest

    def signal_container(self, container_id: str, signal: str) -> int:
        node = self._node_container()
        info = json.loads(_run(["docker", "exec", node, "crictl", "inspect", container_id]))
        pid = int(info["info"]["pid"])
        _run(["docker", "exec", node, "kill", f"-{signal}", str(pid)])
        return pid


def get_provider() -> Provider:
    name = os.environ.get("TPI_E2E_PROVIDER", "local")
    if name == "local":
        return LocalProvider()
    if name == "kind":
        return KindProvider()
    raise RuntimeError(f"TPI_E2E_PROVIDER must be 'local' or 'kind', not {name!r}")
