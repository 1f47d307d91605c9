"""Issue 11 against the real control plane: a GPU group runs as one pod of several ranks.

kwok plays 4-GPU fake nodes of this test's own (labelled and tainted so only its pods land there),
with a kwok process that loads this checkout's fault stages (the ``exit`` fault: an exit code and a
termination message, as ``python -m tpi_runtime launch`` writes them). No runtime runs: the test
renews the per-rank heartbeat Leases itself. The failure policy is the default one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from tpikit.kube import kubectl, wait_until

from tests.integration.conftest import inject_exit
from tests.integration.test_faults import TEST_LABEL, FakeNodes, apply_crd
from tests.integration.test_operator import Operator, apply, get, pods, renew_leases, status, wait_phase
from tests.integration.test_rollout import op, stages  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
LEASES = [f"demo-g0-0-r{r}" for r in range(4)]
OOM_MESSAGE = (
    "local rank 2 (rank 2) exited 137: OOMKilled: the kernel's OOM killer struck in this container's cgroup "
    "(oom_kill 0 -> 1)\nlocal rank 0 (rank 0) exited 143 after the launcher stopped it: killed by SIGTERM"
)


@pytest.fixture()
def bare_nodes(kubeconfig: str, tmp_path: Path) -> Iterator[FakeNodes]:
    """This test's kwok (this checkout's stages) with no node yet: the test adds its own."""
    fake = FakeNodes(kubeconfig, tmp_path)
    fake.living.config = stages(tmp_path)
    fake.living.start()
    try:
        yield fake
    finally:
        fake.cleanup()


@pytest.fixture()
def gpu_nodes(bare_nodes: FakeNodes) -> FakeNodes:
    """Two 4-GPU fake nodes played by a kwok of this test's own (this checkout's stages)."""
    for i in range(2):
        bare_nodes.add(f"gpu-{i}", "a", dies=False, cpu="16", gpus=4)
    return bare_nodes


def gpu_cluster(fake: FakeNodes, **spec: object) -> str:
    """A TP=4 cluster of 1-GPU ranks on this test's nodes; no ranksPerPod (the GPU default)."""
    base: dict = {
        "image": "tpi-runtime:test",
        "model": {"source": {"image": {"path": "/models/tiny"}}},
        "tensorParallelSize": 4,
        "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
        "runtime": {"maxBatchSize": 8},
        "scheduling": {
            "nodeSelector": {TEST_LABEL: fake.id},
            "tolerations": [{"key": TEST_LABEL, "operator": "Equal", "value": fake.id, "effect": "NoSchedule"}],
        },
        **spec,
    }
    return json.dumps({"apiVersion": "tpi.dev/v1alpha1", "kind": "TPInferenceCluster",
                       "metadata": {"name": "demo"}, "spec": base})  # fmt: skip


def lease_names(namespace: str) -> list[str]:
    items = json.loads(kubectl("get", "leases", "-n", namespace, "-l", "tpi.dev/cluster=demo", "-o", "json"))
    return sorted(i["metadata"]["name"] for i in items["items"])


def test_a_tp4_gpu_group_is_one_pod_of_four_ranks(
    op: Operator,  # noqa: F811
    namespace: str,
    gpu_nodes: FakeNodes,
) -> None:
    apply(namespace, gpu_cluster(gpu_nodes))
    st = wait_phase(namespace, "Running")
    live = pods(namespace)
    assert len(live) == 1, [p["metadata"]["name"] for p in live]
    pod = live[0]
    c = pod["spec"]["containers"][0]
    four = {"cpu": "4", "memory": "4Gi", "nvidia.com/gpu": "4"}  # 4 x the per-rank resources
    assert c["resources"]["limits"] == four == c["resources"]["requests"]
    assert c["command"] == ["python", "-m", "tpi_runtime", "launch", "--ranks-per-pod", "4", "serve"]
    assert pod["spec"]["nodeName"] in gpu_nodes.names
    assert get(namespace, "statefulset", "demo-g0")["spec"]["replicas"] == 1
    assert lease_names(namespace) == LEASES
    role = get(namespace, "role", "demo-runtime")
    assert sorted(role["rules"][0]["resourceNames"]) == LEASES
    for name in LEASES:  # the runtime writes holderIdentity = the pod name; the operator sets it too
        assert get(namespace, "lease", name)["spec"]["holderIdentity"] == "demo-g0-0"
    assert [(r["rank"], r["pod"], r["localRank"], r["node"]) for r in st["ranks"]] == [
        (r, "demo-g0-0", r, pod["spec"]["nodeName"]) for r in range(4)
    ]
    assert (st["readyRanks"], st["totalRanks"], st["ready"], st["tp"]) == (4, 4, "4/4", "4/4")
    rows = [line.split() for line in kubectl("get", "tpic", "-n", namespace).splitlines()]
    assert rows[1][:4] == ["demo", "4/4", "4/4", "Running"]


def test_a_group_bigger_than_a_node_gets_one_pod_per_node(
    op: Operator,  # noqa: F811
    namespace: str,
    gpu_nodes: FakeNodes,
) -> None:
    """No ranksPerPod on 4-GPU nodes: a TP 8 group runs as 2 pods of 4 ranks, not one pod of 8
    that no node can hold."""
    apply(namespace, gpu_cluster(gpu_nodes, tensorParallelSize=8))
    st = wait_phase(namespace, "Running")
    live = pods(namespace)
    assert len(live) == 2 and get(namespace, "statefulset", "demo-g0")["spec"]["replicas"] == 2
    for pod in live:
        c = pod["spec"]["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "4"
        assert c["command"] == ["python", "-m", "tpi_runtime", "launch", "--ranks-per-pod", "4", "serve"]
    assert sorted(p["spec"]["nodeName"] for p in live) == sorted(gpu_nodes.names)
    assert [(r["rank"], r["pod"], r["localRank"]) for r in st["ranks"]] == [
        (r, f"demo-g0-{r // 4}", r % 4) for r in range(8)
    ]
    assert (st["readyRanks"], st["tp"]) == (8, "8/8")


def test_a_stale_lease_of_local_rank_2_recreates_the_group(
    op: Operator,  # noqa: F811
    namespace: str,
    gpu_nodes: FakeNodes,
    api_client: client.ApiClient,
) -> None:
    apply(namespace, gpu_cluster(gpu_nodes))  # default heartbeatTimeoutSeconds (30)
    wait_phase(namespace, "Running")
    wait_until(lambda: lease_names(namespace) == LEASES, timeout=30, what="the 4 Leases")
    renew_leases(api_client, namespace, LEASES)  # every rank beats: its Lease counts from now
    time.sleep(1.5)
    renew_leases(api_client, namespace, LEASES)
    assert status(namespace).get("restarts", 0) == 0

    def hung() -> dict | None:
        found = next((h for h in status(namespace).get("history", []) if h["reason"] == "HeartbeatTimeout"), None)
        if found is None:  # local ranks 0, 1 and 3 keep beating; local rank 2 is hung
            renew_leases(api_client, namespace, [n for n in LEASES if not n.endswith("-r2")])
        return found

    entry = wait_until(hung, timeout=90, interval=1, what="HeartbeatTimeout recreate")
    assert entry["action"] == "RecreateGroup", entry
    assert "demo-g0-0 (local rank 2, rank 2) hung" in entry["message"], entry
    wait_until(lambda: [p["metadata"]["labels"]["tpi.dev/incarnation"] for p in pods(namespace)] == ["1"],
               timeout=60, what="the group recreated")  # fmt: skip
    assert wait_phase(namespace, "Running")["restarts"] == 1


def test_launcher_exit_137_with_an_oom_message_halves_the_batch(
    op: Operator,  # noqa: F811
    namespace: str,
    gpu_nodes: FakeNodes,
) -> None:
    apply(namespace, gpu_cluster(gpu_nodes))
    wait_phase(namespace, "Running")
    inject_exit(namespace, "demo-g0-0", 137, OOM_MESSAGE)  # the kubelet says Error, the launcher OOMKilled
    wait_until(lambda: status(namespace).get("effectiveMaxBatchSize") == 4, timeout=60, what="batch halved")
    entries = status(namespace)["history"]
    assert {"HalveBatch", "RecreateGroup"} <= {h["action"] for h in entries}, entries
    recreate = next(h for h in entries if h["action"] == "RecreateGroup")
    assert recreate["reason"] == "OOMKilled" and "local rank 2 (rank 2) exited 137" in recreate["message"]
    wait_until(lambda: [p["metadata"]["labels"]["tpi.dev/incarnation"] for p in pods(namespace)] == ["1"],
               timeout=60, what="the group recreated")  # fmt: skip
    wait_phase(namespace, "Running")
    args = pods(namespace)[0]["spec"]["containers"][0]["args"]
    assert args[args.index("--effective-batch-size") + 1] == "4"


def group_pods(namespace: str, group: int) -> dict[str, tuple[str, str]]:
    """name -> (uid, image) of the group's live pods."""
    return {p["metadata"]["name"]: (p["metadata"]["uid"], p["spec"]["containers"][0]["image"])
            for p in pods(namespace, group) if not p["metadata"].get("deletionTimestamp")}  # fmt: skip


def test_a_spec_edit_rolls_four_rank_pods_one_group_at_a_time_and_scale_in_removes_one(
    op: Operator,  # noqa: F811
    namespace: str,
    gpu_nodes: FakeNodes,
) -> None:
    """2 groups of one 4-rank pod fill both 4-GPU nodes: the roll replaces group 0's pod, waits
    until it is Ready, then group 1's; one group serves throughout, and the layout is kept. Then
    replicas 2 -> 1 removes group 1 whole."""
    apply(namespace, gpu_cluster(gpu_nodes, replicas=2))
    wait_phase(namespace, "Running")
    before = {g: group_pods(namespace, g) for g in (0, 1)}
    assert [len(before[g]) for g in (0, 1)] == [1, 1], before
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"image":"tpi-runtime:v2"}}')
    min_ready, deadline = 2, time.monotonic() + 180
    while True:
        st = status(namespace)
        now = {g: group_pods(namespace, g) for g in (0, 1)}
        if all(images == {"tpi-runtime:v2"} for images in ({i for _, i in now[g].values()} for g in (0, 1))) and (
            st.get("phase") == "Running" and st.get("readyReplicas") == 2
        ):
            break
        min_ready = min(min_ready, st.get("readyReplicas", 0))
        if {i for _, i in now[0].values()} != {"tpi-runtime:v2"}:  # group 0 first: group 1 untouched
            assert now[1] == before[1], (now, before)
        assert time.monotonic() < deadline, f"roll did not finish: {st.get('conditions')}"
        time.sleep(0.5)
    assert min_ready >= 1, "both groups were down at once"
    assert [h["group"] for h in st["history"] if h["action"] == "RollGroup"] == [0, 1], st["history"]
    for g in (0, 1):
        (pod,) = pods(namespace, g)
        assert pod["spec"]["containers"][0]["command"][-3:] == ["--ranks-per-pod", "4", "serve"]
        assert pod["metadata"]["uid"] not in {u for u, _ in before[g].values()}
    assert lease_names(namespace) == sorted(f"demo-g{g}-0-r{r}" for g in (0, 1) for r in range(4))
    assert [(r["group"], r["rank"], r["localRank"]) for r in st["ranks"]] == [
        (g, r, r) for g in (0, 1) for r in range(4)
    ]
    # scale in: group 1's StatefulSet and its 4 Leases go, and the runtime's Role names only group 0's
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":1}}')
    wait_until(lambda: lease_names(namespace) == LEASES and not get(namespace, "statefulset", "demo-g1"),
               timeout=60, what="group 1 removed")  # fmt: skip
    assert sorted(get(namespace, "role", "demo-runtime")["rules"][0]["resourceNames"]) == LEASES
    st = wait_phase(namespace, "Running")
    assert (st["readyReplicas"], st["readyRanks"], st["totalRanks"]) == (1, 4, 4)


def test_a_four_rank_pod_degrades_to_one_pod_of_two_and_grows_back(
    op: Operator,  # noqa: F811
    namespace: str,
    bare_nodes: FakeNodes,
) -> None:
    """ranksPerPod 4 on a cluster whose only node has 2 GPUs: the pod of 4 GPUs cannot schedule, so
    the group degrades to TP 2 as one pod of 2 ranks (never 2 pods of 1); a 4-GPU node joins and
    the group grows back to one pod of 4 there. Short timeouts: the defaults are test_grow_back's."""
    bare_nodes.add("gpu-small", "a", dies=False, cpu="16", gpus=2)
    fp = {"unschedulableTimeoutSeconds": 3, "scaleBackUpDelaySeconds": 5, "minTensorParallelSize": 1}
    apply(namespace, gpu_cluster(bare_nodes, ranksPerPod=4, failurePolicy=fp))
    st = wait_until(lambda: (s := status(namespace)).get("currentTensorParallelSize") == 2
                    and s.get("readyRanks") == 2 and s, timeout=120, what="degraded to TP 2 and serving")  # fmt: skip
    degrade = next(h for h in st["history"] if h["action"] == "Degrade")
    assert degrade["reason"] == "Unschedulable" and "nvidia.com/gpu" in degrade["message"], degrade
    assert st["phase"] == "Degraded" and st["tp"] == "2/4"
    (pod,) = [p for p in pods(namespace) if not p["metadata"].get("deletionTimestamp")]
    c = pod["spec"]["containers"][0]
    assert c["command"][-3:] == ["--ranks-per-pod", "2", "serve"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert get(namespace, "statefulset", "demo-g0")["spec"]["replicas"] == 1
    assert [(r["rank"], r["pod"], r["localRank"]) for r in st["ranks"]] == [(0, "demo-g0-0", 0), (1, "demo-g0-0", 1)]
    big = bare_nodes.add("gpu-big", "a", dies=False, cpu="16", gpus=4)

    def grown_back() -> dict | None:
        s = status(namespace)
        return (
            s
            if (s.get("phase"), s.get("readyRanks"), s.get("currentTensorParallelSize")) == ("Running", 4, 4)
            else None
        )

    st = wait_until(grown_back, timeout=180, what="grown back to TP 4")
    assert [h["action"] for h in st["history"] if h["action"] in ("Degrade", "ScaleUp")] == ["Degrade", "ScaleUp"]
    (pod,) = [p for p in pods(namespace) if not p["metadata"].get("deletionTimestamp")]
    assert pod["spec"]["nodeName"] == big
    assert pod["spec"]["containers"][0]["command"][-3:] == ["--ranks-per-pod", "4", "serve"]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert st["tp"] == "4/4" and lease_names(namespace) == LEASES


def test_ranks_per_pod_must_divide_the_group(namespace: str, kubeconfig: str) -> None:
    apply_crd()
    for rpp, message in [(3, "ranksPerPod must divide tensorParallelSize"), (0, "spec.ranksPerPod")]:
        bad = {"apiVersion": "tpi.dev/v1alpha1", "kind": "TPInferenceCluster", "metadata": {"name": "bad"},
               "spec": {"image": "x", "model": {"source": {"image": {"path": "/m"}}}, "tensorParallelSize": 4,
                        "ranksPerPod": rpp}}  # fmt: skip
        with pytest.raises(RuntimeError) as err:
            apply(namespace, json.dumps(bad))
        assert message in str(err.value), str(err.value)
    assert not json.loads(kubectl("get", "tpic", "-n", namespace, "-o", "json"))["items"]
