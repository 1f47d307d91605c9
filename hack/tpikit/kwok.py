"""kwok processes of a test's or a benchmark's own, beside the local cluster's: each plays only the
fake nodes annotated ``kwok.x-k8s.io/node=<selector>``, so killing one is a dead kubelet (its node
Leases stop, and kube-controller-manager marks its nodes Unknown)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from .kube import BIN, CACHE
from .ports import free_port

#: The stages hack/cluster.sh renders for its own kwok (pods turn Running and Ready, nodes renew).
STAGES = CACHE / "cluster" / "kwok.yaml"


class Kwok:
    """One kwok process playing the nodes annotated ``kwok.x-k8s.io/node=<selector>``."""

    def __init__(self, kubeconfig: str | Path, selector: str, cidr: str, log: Path, config: Path = STAGES) -> None:
        self.kubeconfig, self.selector, self.cidr, self.log = str(kubeconfig), selector, cidr, log
        self.config = config
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(BIN / "kwok"), "--kubeconfig", self.kubeconfig, "--config", str(self.config),
               "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector",
               f"kwok.x-k8s.io/node={self.selector}", "--cidr", self.cidr,
               "--server-address", f"127.0.0.1:{free_port()}", "--node-lease-duration-seconds", "40"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """A dead kubelet: no goodbye, the node Leases just stop."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
