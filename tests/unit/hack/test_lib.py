"""hack/lib/common.sh: render_template and the config templates beside the scripts, the settings
it hands to make and Python. Plain bash, no cluster."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from tpikit.kube import BIN, HACK, K8S_VERSION, KUBECONFIG

LIB = HACK / "lib" / "common.sh"
TOKEN = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")
# bash -c RENDER render LIB TEMPLATE NAME=VALUE...: the template rendered with those variables.
RENDER = (
    'source "$1" test; tpl="$2"; shift 2; for kv in "$@"; do declare "$kv"; done; render_template "$tpl" - "${@%%=*}"'
)


def render(template: Path, **values: str) -> subprocess.CompletedProcess[str]:
    args = [f"{k}={v}" for k, v in values.items()]
    return subprocess.run(
        ["bash", "-c", RENDER, "render", str(LIB), str(template), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def tokens(template: Path) -> set[str]:
    return set(TOKEN.findall(template.read_text()))


def test_render_substitutes_listed_names_once_and_nothing_else(tmp_path: Path) -> None:
    tpl = tmp_path / "t"
    tpl.write_text("a=${A} b=${B} $A ${lower} \\n & \n\n")
    out = render(tpl, A="x&y\\z", B="${A}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a=x&y\\z b=${A} $A ${lower} \\n & \n\n"  # one pass, trailing newlines kept


def test_render_rejects_a_name_it_was_not_given(tmp_path: Path) -> None:
    tpl = tmp_path / "t"
    tpl.write_text("${A} ${MISSING}\n")
    out = render(tpl, A="1")
    assert out.returncode == 1
    assert "${MISSING} is not among the variables" in out.stderr


def test_render_rejects_a_missing_template(tmp_path: Path) -> None:
    out = render(tmp_path / "nothing-here")
    assert out.returncode == 1 and "no template" in out.stderr


def test_node_sh_renders_every_name_its_templates_use() -> None:
    listed = re.search(r"local vars=\(([^)]*)\)", (HACK / "node.sh").read_text())
    assert listed, "node.sh's write_configs lists the template variables in `local vars=(...)`"
    used = set().union(*(tokens(t) for t in (HACK / "node").iterdir()))
    assert used <= set(listed.group(1).split())


NODE_VALUES = {
    "APISERVER_PORT": "16443", "PKI": "/c/pki", "NODE_NAME": "tpi-node", "NODE_DIR": "/n", "RUN_DIR": "/run/tpi-node",
    "CONTAINERD_SOCK": "/run/tpi-node/containerd/containerd.sock", "CNI_BIN_DIR": "/usr/lib/cni",
    "CNI_STATE": "/var/lib/tpi-node/cni", "BRIDGE": "tpi0", "POD_CIDR": "10.88.0.0/16", "GATEWAY": "10.88.0.1",
    "CLUSTER_DOMAIN": "cluster.local", "KUBECONFIG_ADMIN": "/c/kubeconfig", "NODE_IP": "10.0.0.2",
    "PAUSE_IMAGE": "registry.k8s.io/pause:3.10.1", "RESTRICT_OOM_SCORE_ADJ": "true", "RUNC_BINARY_LINE": "",
    "REGISTER_TAINT_LINE": '- {key: "tpi.dev/real-node", value: "true", effect: "NoSchedule"}',
}  # fmt: skip


@pytest.mark.parametrize("name", ["kubeconfig.yaml", "containerd.toml", "10-tpi.conflist", "kubelet.yaml", "Corefile"])
def test_node_templates_render_to_valid_config(name: str) -> None:
    out = render(HACK / "node" / name, **NODE_VALUES)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    if name.endswith(".yaml"):
        doc = yaml.safe_load(text)
        if name == "kubelet.yaml":
            assert doc["registerWithTaints"] == [{"key": "tpi.dev/real-node", "value": "true", "effect": "NoSchedule"}]
            assert doc["clusterDNS"] == ["10.88.0.1"]
    elif name.endswith(".toml"):
        cri = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]
        assert cri["sandbox_image"] == "registry.k8s.io/pause:3.10.1" and cri["restrict_oom_score_adj"] is True
    elif name.endswith(".conflist"):
        ipam = json.loads(text)["plugins"][0]["ipam"]
        assert ipam["ranges"] == [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]]
    else:
        assert "bind 10.88.0.1" in text and "kubeconfig /c/kubeconfig tpi-local" in text


def test_cluster_and_kind_templates_render_to_yaml() -> None:
    kc = render(HACK / "cluster" / "kubeconfig.yaml", APISERVER_PORT="16443", PKI="/c/pki")
    assert yaml.safe_load(kc.stdout)["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:16443"
    node = render(
        HACK / "cluster" / "fake-node.yaml", NODE_INDEX="3", NODE_CPU="32", NODE_MEMORY="256Gi", NODE_GPUS="4"
    )
    (doc,) = [d for d in yaml.safe_load_all(node.stdout) if d]
    assert doc["metadata"]["name"] == "kwok-node-3" and doc["status"]["capacity"]["nvidia.com/gpu"] == "4"
    kind = render(HACK / "kind" / "cluster.yaml", REAL_NODE_LABEL="tpi.dev/real-node")
    worker = yaml.safe_load(kind.stdout)["nodes"][1]
    assert worker["labels"] == {"tpi.dev/real-node": "true"}


def test_python_reads_the_same_settings_as_the_scripts() -> None:
    out = subprocess.run(
        ["bash", str(LIB), "print", "K8S_VERSION", "BIN", "KUBECONFIG_ADMIN"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.split() == [K8S_VERSION, str(BIN), str(KUBECONFIG)]


def test_a_background_component_does_not_inherit_a_flock(tmp_path: Path) -> None:
    """`flock LOCK hack/e2e.sh` starts the node's daemons: they must not hold LOCK for their whole
    life (seen: every later e2e run waited forever for the lock a kubelet held)."""
    lock, pids = tmp_path / "lock", tmp_path / "pids"
    script = (
        f'source "{LIB}" test; PIDS="{pids}"; LOGS="{tmp_path}"; mkdir -p "$PIDS"; '
        'start_bg sleeper sleep 60; sleep 0.3; cat "$PIDS/sleeper"'
    )
    out = subprocess.run(
        ["flock", str(lock), "bash", "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    try:
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
        free = subprocess.run(["flock", "-n", str(lock), "true"], timeout=10, check=False)
        assert free.returncode == 0, "the daemon holds the caller's lock"
    finally:
        subprocess.run(["kill", str(pid)], check=False)
