"""The operator against the real local control plane with kwok fake nodes (hack/cluster.sh).

The operator runs as a subprocess (``python -m tpi_operator --namespace <ns>``), exactly as in a
pod, so tests can also kill and restart it.  kwok plays the rank pods (no runtime runs), so tests
renew the heartbeat Leases themselves and inject container faults with pod annotations.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from tpi_contract import keys
from tpikit.kube import REPO, kubectl, wait_until
from tpikit.ports import free_port

from tests.integration.conftest import inject_fault

pytestmark = pytest.mark.integration
CRD = REPO / "crds" / "tpi.dev_tpinferenceclusters.yaml"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def crd(kubeconfig: str) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/tpinferenceclusters.tpi.dev", "--timeout=60s")


class Operator:
    def __init__(self, kubeconfig: str, namespace: str, log: Path, extra: tuple[str, ...] = ()) -> None:
        self.kubeconfig, self.namespace, self.log, self.extra = kubeconfig, namespace, log, extra
        self.proc: subprocess.Popen | None = None
        self.metrics_port = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'contract'}:{REPO}"}
        env.pop("KUBECONFIG", None)  # --kubeconfig alone must be enough
        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "tpi_operator", "--namespace", self.namespace, "--kubeconfig",
               self.kubeconfig, "--metrics-port", str(self.metrics_port), "--liveness-port", "0",
               "--log-format", "plain", "--busy-seconds", "0.5", "--idle-seconds", "3",
               "--allowed-host-path", tempfile.gettempdir(), *self.extra]  # tmp_path checkpoints  # fmt: skip
        out = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics_text(self, name: str) -> list[str]:
        """The samples of one metric, as exposition lines."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return [line for line in text.splitlines() if line.startswith((name + "{", name + " "))]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus counter's samples matching labels (0 when absent)."""
        total = 0.0
        for line in self.metrics_text(name):
            sample, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                total += float(value)
        return total


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


def report_live_batch(api: client.ApiClient, namespace: str, names: list[str], batch: int) -> None:
    """What each runtime does at every renewal: publish its live batch size on its Lease."""
    coord = client.CoordinationV1Api(api)
    for n in names:
        patch = {"metadata": {"annotations": {keys.LEASE_LIVE_BATCH_SIZE: str(batch)}}}
        coord.patch_namespaced_lease(n, namespace, patch)


def sts_hash(namespace: str, group: int) -> str:
    return get(namespace, "statefulset", f"demo-g{group}")["metadata"]["annotations"]["tpi.dev/template-hash"]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def group_done(namespace: str, group: int, thash: str, size: int = 2) -> bool:
    live = pods(namespace, group)
    return len(live) == size and all(
        p["metadata"]["labels"].get("tpi.dev/template-hash") == thash and _ready(p) for p in live
    )


def pod_restarts(namespace: str, name: str) -> int:
    statuses = get(namespace, "pod", name).get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("restartCount", 0)


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
    for lease in json.loads(kubectl("get", "leases", "-n", namespace, "-o", "json"))["items"]:
        assert lease["spec"]["holderIdentity"] == lease["metadata"]["name"]
        assert lease["metadata"]["ownerReferences"][0]["kind"] == "TPInferenceCluster"
    st = wait_phase(namespace, "Running")
    assert st["tp"] == "2/2" and st["ready"] == "4/4" and st["readyReplicas"] == 2
    # RANK comes from the ordinal: the StatefulSet controller's pod-index label on each pod
    for pod in pods(namespace):
        name = pod["metadata"]["name"]
        assert pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"] == name.rsplit("-", 1)[1]
    endpoint = f"http://demo.{namespace}.svc.cluster.local:8000"
    assert st["endpoint"] == endpoint
    rows = [line.split() for line in kubectl("get", "tpic", "-n", namespace).splitlines()]
    assert rows[0] == ["NAME", "TP", "READY", "PHASE", "ENDPOINT", "AGE"]
    assert rows[1][:5] == ["demo", "2/2", "4/4", "Running", endpoint]
    wide = [line.split() for line in kubectl("get", "tpic", "-n", namespace, "-o", "wide").splitlines()]
    assert wide[0] == ["NAME", "TP", "READY", "PHASE", "ENDPOINT", "AGE", "RESTARTS", "LAST-FAILURE"]
    assert wide[1][:5] == rows[1][:5] and wide[1][6] == "0"


def test_oom_halves_batch_and_recreates_group(operator: Operator, namespace: str, api_client: client.ApiClient) -> None:
    apply(namespace, cluster_yaml(runtime={"maxBatchSize": 8}))
    wait_phase(namespace, "Running")
    inject_fault(namespace, "demo-g0-1", "oom")
    wait_until(lambda: status(namespace).get("effectiveMaxBatchSize") == 4, timeout=30, what="batch halved")
    assert {"HalveBatch", "RecreateGroup"} <= {h["action"] for h in history(namespace)}
    wait_until(lambda: all(p["metadata"]["labels"]["tpi.dev/incarnation"] == "1" for p in pods(namespace))
               and len(pods(namespace)) == 2, timeout=30, what="new incarnation")  # fmt: skip
    wait_phase(namespace, "Running")
    for pod in pods(namespace):  # the assigned batch reaches the ranks as their flag
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--effective-batch-size") + 1] == "4"
    # Per-rank status shows the batch each runtime reports on its Lease, not what was assigned.
    # Lease renewals do not wake the reconciler (that would be a reconcile per renewal): the value
    # shows up at the next reconcile, within the operator's idle period (30 s).
    report_live_batch(api_client, namespace, ["demo-g0-0", "demo-g0-1"], 4)
    wait_until(lambda: [r.get("effectiveBatchSize") for r in status(namespace)["ranks"]] == [4, 4],
               timeout=60, what="live batch in status")  # fmt: skip


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


def test_stale_lease_recreates_group(operator: Operator, namespace: str, api_client: client.ApiClient) -> None:
    apply(namespace, cluster_yaml(failurePolicy={"heartbeatTimeoutSeconds": 8}))  # the CRD minimum
    wait_phase(namespace, "Running")
    renew_leases(api_client, namespace, ["demo-g0-0", "demo-g0-1"])
    time.sleep(1.5)
    renew_leases(api_client, namespace, ["demo-g0-0", "demo-g0-1"])  # healthy so far
    assert status(namespace).get("restarts", 0) == 0

    # rank 1 stops renewing (a hang) while rank 0 keeps beating
    def hung() -> dict | None:
        # look first: a beat sent after the recreate would belong to the new rank 0, which then
        # (no runtime here) goes stale in turn
        found = next((h for h in history(namespace) if h["reason"] == "HeartbeatTimeout"), None)
        if found is None:
            renew_leases(api_client, namespace, ["demo-g0-0"])
        return found

    entry = wait_until(hung, timeout=40, interval=1, what="HeartbeatTimeout recreate")
    assert entry["action"] == "RecreateGroup" and "demo-g0-1 hung" in entry["message"], entry
    st = wait_phase(namespace, "Running")
    assert st["restarts"] == 1
    assert {p["metadata"]["labels"]["tpi.dev/incarnation"] for p in pods(namespace)} == {"1"}
    # The recreate moved the StatefulSet to incarnation 1 with a merge patch (an Update of the
    # operator's field manager; its applies are Apply), not by re-applying the whole object.
    sts = json.loads(kubectl("get", "statefulset", "demo-g0", "-n", namespace, "-o", "json", "--show-managed-fields"))
    assert sts["spec"]["template"]["metadata"]["labels"]["tpi.dev/incarnation"] == "1"
    managed = sts["metadata"]["managedFields"]
    updates = [m for m in managed if m["manager"] == "tpi-operator" and m["operation"] == "Update"]
    assert updates and "f:template" in json.dumps(updates[0]["fieldsV1"]), managed


def test_unschedulable_rank_degrades(operator: Operator, namespace: str) -> None:
    # 4 fake nodes of 32 CPUs: 20-CPU ranks fit one per node, so 4 of 8 ranks stay Pending.
    fp = {"unschedulableTimeoutSeconds": 2, "minTensorParallelSize": 1, "scaleBackUp": False}
    # Pinned to kwok-node-0..3 (more fake nodes may exist: the bench can add some).
    four = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                               "values": [f"kwok-node-{i}" for i in range(4)]}]}]}}}  # fmt: skip
    apply(namespace, cluster_yaml(tensorParallelSize=8, resources={"cpu": "20"}, failurePolicy=fp,
                                  scheduling={"affinity": four}))  # fmt: skip
    st = wait_until(lambda: (s := status(namespace)).get("currentTensorParallelSize") == 4 and s, timeout=60,
                    what="degraded to 4")  # fmt: skip
    assert st["desiredTensorParallelSize"] == 8
    st = wait_phase(namespace, "Degraded")
    assert st["tp"] == "4/8"
    degrade = next(h for h in st["history"] if h["action"] == "Degrade")
    assert degrade["reason"] == "Unschedulable" and "Insufficient cpu" in degrade["message"]
    wait_until(lambda: status(namespace).get("readyRanks") == 4, timeout=60, what="4 ranks ready")
    assert len(pods(namespace)) == 4 and get(namespace, "statefulset", "demo-g0")["spec"]["replicas"] == 4


def test_spec_edit_rolls_groups_one_at_a_time(operator: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(replicas=3))
    wait_phase(namespace, "Running")
    old = {g: sts_hash(namespace, g) for g in range(3)}
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"image":"tpi-runtime:v2"}}')
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
    ({"tensorParallelSize": 0}, "tensorParallelSize must be an integer between 1 and 256"),
    ({"tensorParallelSize": 2, "failurePolicy": {"minTensorParallelSize": 4}},
     "failurePolicy.minTensorParallelSize must be <= tensorParallelSize"),
    ({"model": {"source": {"pvc": {"claimName": "a"}, "image": {"path": "/x"}}}}, "exactly one of"),
    ({"replicas": -1}, "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0"),
    ({"runtime": {"dtype": "int4"}}, 'spec.runtime.dtype: Unsupported value: "int4"'),
    ({"resources": {"cpu": "lots"}}, "spec.resources.cpu in body should match"),
    ({"scheduling": {"exclusive": True}}, "scheduling.exclusive needs scheduling.topologyKey"),
    ({"scheduling": {"topologyKey": "not a key"}}, "spec.scheduling.topologyKey in body should match"),
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
    """Recovery state lives in status and the live objects, so a new operator picks it up."""
    apply(namespace, cluster_yaml(failurePolicy={"backoffSeconds": 8, "maxGroupRestarts": 5}))
    wait_phase(namespace, "Running")
    # 1. a rank fails while the operator is down: found and recovered after the restart
    operator.stop()
    inject_fault(namespace, "demo-g0-0", "crash")
    wait_until(lambda: pod_restarts(namespace, "demo-g0-0") == 1, timeout=30, what="crash played")
    operator.start()
    wait_until(lambda: status(namespace).get("restarts") == 1, timeout=60, what="recreate after restart")
    st = wait_phase(namespace, "Running")
    first = dt.datetime.fromisoformat(st["groups"][0]["restartTimes"][0].replace("Z", "+00:00"))
    # 2. the next failure falls in the 8 s backoff (restartTimes in status). The operator is
    #    SIGKILLed while it waits; its successor must still wait out the backoff, then recreate.
    inject_fault(namespace, "demo-g0-1", "crash", restart=False)
    wait_until(lambda: get(namespace, "pod", "demo-g0-1")["status"]["containerStatuses"][0]["state"]
               .get("terminated"), timeout=30, what="rank 1 terminated")  # fmt: skip
    time.sleep(1)  # seen by the operator, which now backs off
    assert status(namespace)["restarts"] == 1
    operator.stop(signal.SIGKILL)
    operator.start()
    wait_until(lambda: status(namespace).get("restarts") == 2, timeout=60, what="second recreate")
    st = wait_phase(namespace, "Running")
    recreates = [h for h in st["history"] if h["action"] == "RecreateGroup"]
    second = dt.datetime.fromisoformat(recreates[-1]["time"].replace("Z", "+00:00"))
    assert len(recreates) == 2 and recreates[-1]["reason"] == "Crash"
    assert second - first >= dt.timedelta(seconds=8), (first, second)  # backoff survived the restart
    assert {p["metadata"]["labels"]["tpi.dev/incarnation"] for p in pods(namespace)} == {"2"}
    assert len(st["groups"][0]["podUids"]) == 2 and "failingSince" not in st["groups"][0]


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
            items = json.loads(kubectl("get", kind, "-n", namespace, "-l", "tpi.dev/cluster=demo", "-o", "json"))
            if items["items"]:
                return False
        return True

    wait_until(gone, timeout=60, what="garbage collection of owned objects")


def test_unworkable_clusters_are_explained_without_hot_looping(
    operator: Operator, namespace: str, tmp_path: Path
) -> None:
    """Objects that pass the schema but cannot work: a condition says why, the operator stays up
    and quiet (bounded reconciles, no status writes) instead of crashing or spinning."""
    ckpt = tmp_path / "ckpt"  # hostPath: the operator reads config.json itself
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_attention_heads": 6, "num_key_value_heads": 2,
                                                  "intermediate_size": 1536, "hidden_size": 384}))  # fmt: skip
    apply(namespace, cluster_yaml("heads", tensorParallelSize=4,
                                  model={"source": {"hostPath": {"path": str(ckpt)}}}))  # fmt: skip
    apply(
        namespace,
        cluster_yaml(
            "huge",
            resources={"cpu": "1000"},
            failurePolicy={"minTensorParallelSize": 2, "unschedulableTimeoutSeconds": 1},
        ),
    )
    apply(namespace, cluster_yaml("auto", tensorParallelSize="auto"))

    def condition(name: str, ctype: str = "Degraded") -> dict:
        return next((c for c in status(namespace, name).get("conditions", []) if c["type"] == ctype), {})

    expected = {
        "heads": ("Failed", "InvalidTensorParallelSize", "num_attention_heads=6 is not divisible by 4"),
        "huge": ("Degraded", "Unschedulable",
                 "no smaller valid size >= minTensorParallelSize=2 fits"),
        "auto": ("Pending", "SizingUnavailable", "set spec.model.sizeBytes"),
    }  # fmt: skip
    for name, (phase, reason, message) in expected.items():
        wait_until(lambda n=name, r=reason: condition(n).get("reason") == r, timeout=60, what=f"{name}: {reason}")
        st, cond = status(namespace, name), condition(name)
        assert st["phase"] == phase and cond["status"] == "True" and message in cond["message"], (name, st)
    assert "Insufficient cpu" in condition("huge")["message"]
    time.sleep(2)  # let the last writes land
    reconciles = operator.metric("tpi_operator_reconciles_total")
    writes = operator.metrics_text("tpi_operator_api_requests_total")
    time.sleep(12)
    assert operator.proc is not None and operator.proc.poll() is None, "operator died"
    # idle resync is 3 s here: ~4 per cluster in 12 s, plus a few for scheduler retries
    assert operator.metric("tpi_operator_reconciles_total") - reconciles <= 24
    # nothing written: no status churn, no re-applies (reads of node capacity are allowed)
    after = operator.metrics_text("tpi_operator_api_requests_total")
    assert [x for x in after if 'method="PATCH"' in x] == [x for x in writes if 'method="PATCH"' in x]
    assert operator.metric("tpi_operator_reconciles_total", result="error") == 0


def test_tensor_parallel_size_is_checked_against_a_gguf_header(
    operator: Operator, namespace: str, tmp_path: Path
) -> None:
    """A hostPath directory holding one GGUF file (no config.json): the operator reads the head
    counts from the GGUF header (tpi_contract.gguf_header) and refuses a size they cannot split."""
    import numpy as np
    from gguf import GGUFWriter

    ckpt = tmp_path / "gguf"
    ckpt.mkdir()
    w = GGUFWriter(str(ckpt / "model.gguf"), "llama")
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_feed_forward_length(1536)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = {"source": {"hostPath": {"path": str(ckpt)}}}
    apply(namespace, cluster_yaml("gguf-tp2", tensorParallelSize=2, model=source))
    apply(namespace, cluster_yaml("gguf-tp3", tensorParallelSize=3, model=source))

    def condition(name: str) -> dict:
        return next((c for c in status(namespace, name).get("conditions", []) if c["type"] == "Degraded"), {})

    wait_until(lambda: condition("gguf-tp2").get("reason") == "InvalidTensorParallelSize", timeout=60,
               what="gguf-tp2: InvalidTensorParallelSize")  # fmt: skip
    assert "num_attention_heads=9 is not divisible by 2" in condition("gguf-tp2")["message"]
    assert "valid sizes: [1, 3]" in condition("gguf-tp2")["message"]
    # TP=3 splits 9 heads / 3 KV heads: the operator renders the 3-rank group.
    sts = wait_until(lambda: get(namespace, "statefulset", "gguf-tp3-g0"), timeout=60, what="gguf-tp3 StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert condition("gguf-tp3").get("reason") != "InvalidTensorParallelSize"


def test_peering_with_the_generated_peering_crds(crd: None, kubeconfig: str, namespace: str, tmp_path: Path) -> None:
    """crds/ holds kopf's peering CRDs: with them and a KopfPeering, --peering works (chart: peering.enabled)."""
    for name in ("zalando.org_clusterkopfpeerings.yaml", "zalando.org_kopfpeerings.yaml"):
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / name))
    kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.zalando.org", "--timeout=60s")
    apply(namespace, json.dumps({"apiVersion": "zalando.org/v1", "kind": "KopfPeering", "metadata": {"name": "tpi"}}))
    op = Operator(kubeconfig, namespace, tmp_path / "operator.log", extra=("--peering", "tpi", "--priority", "10"))
    op.start()
    try:
        apply(namespace, cluster_yaml())
        st = wait_phase(namespace, "Running")
        assert st["tp"] == "2/2"
        peers = wait_until(lambda: get(namespace, "kopfpeering", "tpi").get("status"), timeout=30, what="peer")
        assert any(p.get("priority") == 10 for p in peers.values()), peers  # kopf announced itself
        kubectl("delete", "tpic", "demo", "-n", namespace, "--wait=true", "--timeout=60s")
    finally:
        op.stop()
        print((tmp_path / "operator.log").read_text()[-3000:])
