"""The operator against the real local control plane with kwok fake nodes (hack/cluster.sh).

The operator runs as a subprocess (``python -m tpi_operator --namespace <ns>``), exactly as in a
pod, so tests can also kill and restart it.  kwok plays the rank pods (no runtime runs), so tests
renew the heartbeat Leases themselves and inject container faults with pod annotations.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.integration.conftest import inject_fault
from tests.kube import REPO, kubectl, wait_until

pytestmark = pytest.mark.integration
CRD = REPO / "crds" / "tpi.dev_tpinferenceclusters.yaml"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def crd(kubeconfig: str) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/tpinferenceclusters.tpi.dev", "--timeout=60s")


class Operator:
    def __init__(self, kubeconfig: str, namespace: str, log: Path) -> None:
        self.kubeconfig, self.namespace, self.log = kubeconfig, namespace, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO}"}
        cmd = [sys.executable, "-m", "tpi_operator", "--namespace", self.namespace, "--kubeconfig",
               self.kubeconfig, "--metrics-port", "0", "--liveness-port", "0", "--log-format", "plain",
               "--busy-seconds", "0.5", "--idle-seconds", "3"]  # fmt: skip
        out = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def operator(kubeconfig: str, namespace: str, crd: None, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(kubeconfig, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    # Delete clusters while the operator still runs: kopf's daemon finalizer must be released.
    kubectl("delete", "tpic", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
    op.stop()
    print((tmp_path / "operator.log").read_text()[-5000:])


# ------------------------------------------------------------------------------------- helpers
def cluster_yaml(name: str = "demo", **spec: object) -> str:
    base: dict = {
        "image": "tpi-runtime:test",
        # weights "in the image": no volume, so the real scheduler has nothing to wait for
        "model": {"source": {"image": {"path": "/models/tiny"}}},
        "tensorParallelSize": 2,
        "replicas": 1,
        "resources": {"cpu": "1", "memory": "1Gi"},
        "failurePolicy": {"backoffSeconds": 0, "maxGroupRestarts": 3, "minTensorParallelSize": 1},
    }
    for k, v in spec.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return json.dumps({"apiVersion": "tpi.dev/v1alpha1", "kind": "TPInferenceCluster",
                       "metadata": {"name": name}, "spec": base})  # fmt: skip


def apply(namespace: str, manifest: str) -> str:
    return kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def get(namespace: str, kind: str, name: str) -> dict:
    out = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out) if out else {}


def status(namespace: str, name: str = "demo") -> dict:
    return get(namespace, "tpic", name).get("status", {})


def pods(namespace: str, group: int | None = None) -> list[dict]:
    sel = "tpi.dev/cluster=demo" + (f",tpi.dev/group={group}" if group is not None else "")
    items = json.loads(kubectl("get", "pods", "-n", namespace, "-l", sel, "-o", "json"))["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def wait_phase(namespace: str, phase: str, timeout: float = 90) -> dict:
    return wait_until(lambda: (s := status(namespace)).get("phase") == phase and s, timeout=timeout,
                      what=f"phase {phase}")  # fmt: skip


def renew_leases(api: client.ApiClient, namespace: str, names: list[str]) -> None:
    coord = client.CoordinationV1Api(api)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for n in names:
        coord.patch_namespaced_lease(n, namespace, {"spec": {"renewTime": now}})


def sts_hash(namespace: str, group: int) -> str:
    return get(namespace, "statefulset", f"demo-g{group}")["metadata"]["annotations"]["tpi.dev/template-hash"]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def group_done(namespace: str, group: int, thash: str, size: int = 2) -> bool:
    live = pods(namespace, group)
    return len(live) == size and all(
        p["metadata"]["labels"].get("tpi.dev/template-hash") == thash and _ready(p) for p in live
    )


def history(namespace: str) -> list[dict]:
    return status(namespace).get("history", [])


# --------------------------------------------------------------------------------------- tests
def test_apply_creates_objects_and_reaches_running(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(replicas=2))
    for g in (0, 1):
        sts = wait_until(lambda g=g: get(namespace, "statefulset", f"demo-g{g}"), timeout=30, what="sts")
        assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
        env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["WORLD_SIZE"]["value"] == "2"
        assert env["MASTER_ADDR"]["value"] == f"demo-g{g}-0.demo-ranks.{namespace}.svc.cluster.local"
        assert "apps.kubernetes.io/pod-index" in env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert get(namespace, "service", "demo-ranks")["spec"]["clusterIP"] == "None"
    assert get(namespace, "service", "demo")["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"
    wait_until(lambda: len(json.loads(kubectl("get", "leases", "-n", namespace, "-o", "json"))["items"]) == 4,
               timeout=30, what="4 leases")  # fmt: skip
    st = wait_phase(namespace, "Running")
    assert st["tp"] == "2/2" and st["ready"] == "4/4"
    table = kubectl("get", "tpic", "-n", namespace, "-o", "wide")
    header = table.splitlines()[0].split()
    assert header[:5] == ["NAME", "TP", "READY", "PHASE", "ENDPOINT"] and "RESTARTS" in header
    assert "2/2" in table and "4/4" in table and "Running" in table


def test_oom_halves_batch_and_recreates_group(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(runtime={"maxBatchSize": 8}))
    wait_phase(namespace, "Running")
    inject_fault(namespace, "demo-g0-1", "oom")
    wait_until(lambda: status(namespace).get("effectiveMaxBatchSize") == 4, timeout=30, what="batch halved")
    assert {"HalveBatch", "RecreateGroup"} <= {h["action"] for h in history(namespace)}
    wait_until(lambda: all(p["metadata"]["labels"]["tpi.dev/incarnation"] == "1" for p in pods(namespace))
               and len(pods(namespace)) == 2, timeout=30, what="new incarnation")  # fmt: skip
    st = wait_phase(namespace, "Running")
    assert any(r.get("effectiveBatchSize") == 4 for r in st["ranks"])


def test_crash_loop_degrades_then_fails(operator: Operator, namespace: str) -> None:
    fp = {
        "maxGroupRestarts": 1,
        "minTensorParallelSize": 2,
        "restartWindowSeconds": 600,
        "scaleBackUp": False,
    }
    apply(namespace, cluster_yaml(tensorParallelSize=4, failurePolicy=fp))
    wait_phase(namespace, "Running")
    seen_tp = set()
    deadline = time.monotonic() + 180
    while (st := status(namespace)).get("phase") != "Failed":
        assert time.monotonic() < deadline, f"never failed: {st}"
        seen_tp.add(st.get("tp"))
        live = [p for p in pods(namespace) if p["status"].get("phase") == "Running"]
        ready = st.get("phase") in ("Running", "Degraded") and st.get("readyRanks") == st.get("totalRanks")
        if live and ready:
            inject_fault(namespace, live[0]["metadata"]["name"], "crash")
            time.sleep(2)
        time.sleep(0.5)
    assert "2/4" in seen_tp | {st.get("tp")}
    conds = {c["type"]: c for c in st["conditions"]}
    assert "minTensorParallelSize=2" in conds["Degraded"]["message"]
    assert {"Degrade", "MarkFailed"} <= {h["action"] for h in st["history"]}
    # Failed: no more restarts, pods kept for debugging
    restarts = st["restarts"]
    time.sleep(4)
    assert status(namespace)["restarts"] == restarts and pods(namespace)


def test_stale_lease_recreates_group(
    operator: Operator, namespace: str, api_client: client.ApiClient
) -> None:
    apply(namespace, cluster_yaml(failurePolicy={"heartbeatTimeoutSeconds": 3}))
    wait_phase(namespace, "Running")
    renew_leases(api_client, namespace, ["demo-g0-0", "demo-g0-1"])
    time.sleep(1.5)
    renew_leases(api_client, namespace, ["demo-g0-0", "demo-g0-1"])  # healthy so far
    assert status(namespace).get("restarts", 0) == 0
    # rank 1 stops renewing: a hang
    renew_leases(api_client, namespace, ["demo-g0-0"])
    wait_until(lambda: any(h["reason"] == "HeartbeatTimeout" for h in history(namespace)), timeout=20,
               what="HeartbeatTimeout recreate")  # fmt: skip
    wait_phase(namespace, "Running")


def test_unschedulable_rank_degrades(operator: Operator, namespace: str) -> None:
    # 4 fake nodes of 32 CPUs: 20-CPU ranks fit one per node, so 4 of 8 ranks stay Pending.
    fp = {"unschedulableTimeoutSeconds": 2, "minTensorParallelSize": 1, "scaleBackUp": False}
    apply(namespace, cluster_yaml(tensorParallelSize=8, resources={"cpu": "20"}, failurePolicy=fp))
    st = wait_until(lambda: (s := status(namespace)).get("currentTensorParallelSize") == 4 and s, timeout=60,
                    what="degraded to 4")  # fmt: skip
    assert st["desiredTensorParallelSize"] == 8
    st = wait_phase(namespace, "Degraded")
    assert st["tp"] == "4/8"
    wait_until(lambda: status(namespace).get("readyRanks") == 4, timeout=60, what="4 ranks ready")


def test_spec_edit_rolls_groups_one_at_a_time(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(replicas=3))
    wait_phase(namespace, "Running")
    old = {g: sts_hash(namespace, g) for g in range(3)}
    kubectl(
        "patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"image":"tpi-runtime:v2"}}'
    )
    max_rolling = 0
    deadline = time.monotonic() + 120
    while True:
        hashes = {g: sts_hash(namespace, g) for g in range(3)}
        rolling = [g for g in range(3) if hashes[g] != old[g] and not group_done(namespace, g, hashes[g])]
        max_rolling = max(max_rolling, len(rolling))
        if all(hashes[g] != old[g] for g in range(3)) and not rolling:
            break
        assert time.monotonic() < deadline, "rollout did not finish"
        time.sleep(0.2)
    assert max_rolling <= 1
    assert [h["group"] for h in history(namespace) if h["action"] == "RollGroup"] == [0, 1, 2]
    wait_phase(namespace, "Running")


INVALID = [
    # (spec overrides, part of the API server's message): OpenAPI bounds and CEL rules
    ({"tensorParallelSize": "big"}, "tensorParallelSize must be an integer between 1 and 256 or the string 'auto'"),
    ({"tensorParallelSize": 512}, "tensorParallelSize must be an integer between 1 and 256"),
    ({"tensorParallelSize": 2, "failurePolicy": {"minTensorParallelSize": 4}},
     "failurePolicy.minTensorParallelSize must be <= tensorParallelSize"),
    ({"model": {"source": {"pvc": {"claimName": "a"}, "image": {"path": "/x"}}}}, "exactly one of"),
    ({"replicas": -1}, "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0"),
    ({"runtime": {"dtype": "int4"}}, 'spec.runtime.dtype: Unsupported value: "int4"'),
    ({"resources": {"cpu": "lots"}}, "spec.resources.cpu in body should match"),
]  # fmt: skip


def test_invalid_cluster_is_rejected(crd: None, namespace: str) -> None:
    # One test for all cases (a parametrized test id holds '[', which namespace names cannot).
    for spec, message in INVALID:
        with pytest.raises(RuntimeError) as err:
            apply(namespace, cluster_yaml(**spec))
        assert message in str(err.value), (spec, str(err.value))
    with pytest.raises(RuntimeError) as err:
        apply(namespace, cluster_yaml(name="x" * 41))
    assert "metadata.name must be a DNS-1035 label of at most 40 characters" in str(err.value)
    assert not json.loads(kubectl("get", "tpic", "-n", namespace, "-o", "json"))["items"]


def test_model_source_is_immutable(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml())
    with pytest.raises(RuntimeError) as err:
        kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge",
                "-p", '{"spec":{"model":{"source":{"pvc":{"claimName":"other"}}}}}')  # fmt: skip
    assert "model.source is immutable" in str(err.value)


def test_operator_restart_mid_recovery_resumes(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml())
    wait_phase(namespace, "Running")
    operator.stop()
    inject_fault(namespace, "demo-g0-0", "crash")
    time.sleep(3)
    operator.start()
    wait_until(lambda: any(h["action"] == "RecreateGroup" for h in history(namespace)), timeout=60,
               what="recreate after restart")  # fmt: skip
    st = wait_phase(namespace, "Running")
    assert st["restarts"] == 1


def test_deleting_cluster_removes_everything(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml())
    wait_phase(namespace, "Running")
    kubectl("delete", "tpic", "demo", "-n", namespace, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        for kind in (
            "statefulsets",
            "services",
            "leases",
            "serviceaccounts",
            "roles",
            "rolebindings",
            "pods",
        ):
            items = json.loads(
                kubectl("get", kind, "-n", namespace, "-l", "tpi.dev/cluster=demo", "-o", "json")
            )
            if items["items"]:
                return False
        return True

    wait_until(gone, timeout=60, what="garbage collection of owned objects")
