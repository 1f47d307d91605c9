"""Several ranks per pod (issue 11): the default rule, rendering, Leases, observing and healing."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from op_builders import IDENT, NOW, hash_for, make_spec
from tpi_contract import ranks
from tpi_operator.api.v1alpha1 import GroupStatus, TPInferenceClusterSpec, TPInferenceClusterStatus
from tpi_operator.core import capacity, heartbeat, layout, reconcile, render
from tpi_operator.core import recovery as rc
from tpi_operator.core import status as sc
from tpi_operator.core.observe import LeaseObs, Observation, StsObs, format_time, rank_obs

GPU = {"cpu": "2", "memory": "8Gi", "gpus": 1}
OOM_MESSAGE = (
    "local rank 1 (rank 1) exited 137: OOMKilled: the kernel's OOM killer struck in this container's "
    "cgroup (oom_kill 0 -> 1)\nlocal rank 0 (rank 0) exited 143 after the launcher stopped it: killed by SIGTERM"
)


def gpu_spec(**kw: Any) -> TPInferenceClusterSpec:
    return make_spec(resources=GPU, **kw)


# ------------------------------------------------------------------------------ default rule
@pytest.mark.parametrize(
    ("resources", "ranks_per_pod", "tp", "expected"),
    [
        ({}, None, 4, 1),  # CPU: one rank per pod, as before
        ({}, None, 2, 1),
        (GPU, None, 4, 4),  # GPU: the whole group in one pod
        (GPU, None, 2, 2),  # ... at a degraded size too
        (GPU, None, 1, 1),
        (GPU, 2, 4, 2),
        (GPU, 1, 4, 1),
        ({}, 4, 4, 4),  # CPU may ask for it
        ({}, 4, 2, 2),  # degraded: the largest divisor <= the spec's
        ({}, 2, 1, 1),
    ],
)
def test_ranks_per_pod_rule(resources, ranks_per_pod, tp, expected):
    over: dict[str, Any] = {"resources": resources} if resources else {}
    if ranks_per_pod is not None:
        over["ranksPerPod"] = ranks_per_pod
    spec = make_spec(**over)
    assert layout.ranks_per_pod(spec, tp) == expected
    assert layout.pods_per_group(spec, tp) == tp // expected


@pytest.mark.parametrize(
    ("tp", "ranks_per_pod", "problem"),
    [
        (4, None, None),
        (4, 2, None),
        (4, 4, None),
        (4, 3, "ranksPerPod=3 does not divide tensorParallelSize=4"),
        ("auto", 3, "(tensorParallelSize 'auto' resolved to 4)"),
    ],
)
def test_ranks_per_pod_validation(tp, ranks_per_pod, problem):
    spec = make_spec(tensorParallelSize=tp, **({"ranksPerPod": ranks_per_pod} if ranks_per_pod else {}))
    found = layout.problems(spec, 4)
    assert (found == []) if problem is None else (problem in found[0])


def test_ranks_per_pod_schema_bounds_and_rule():
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        make_spec(ranksPerPod=0)
    schema = TPInferenceClusterSpec.model_json_schema(by_alias=True)
    rules = [v["rule"] for v in schema["x-kubernetes-validations"]]
    assert any("self.tensorParallelSize % self.ranksPerPod == 0" in rule for rule in rules)


# ---------------------------------------------------------------------------------- rendering
def sts_of(spec: TPInferenceClusterSpec, tp: int = 4) -> dict[str, Any]:
    return render.statefulset(spec, IDENT, render.GroupSettings(group=1, tp=tp, batch=6, incarnation=2))


def container_of(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_one_rank_per_pod_renders_what_it_always_did():
    # An explicit ranksPerPod=1 and the CPU default are the same objects, with no trace of the feature.
    cpu, explicit = make_spec(), make_spec(ranksPerPod=1)
    assert sts_of(cpu) == sts_of(explicit)
    obj = sts_of(cpu)
    c = container_of(obj)
    assert obj["spec"]["replicas"] == 4 and c["command"] == ["python", "-m", "tpi_runtime", "serve"]
    assert "terminationMessagePath" not in c and render.A_RANKS_PER_POD not in obj["metadata"]["annotations"]
    names = [e["name"] for e in c["env"]]
    assert names[:8] == ["POD_NAME", "POD_NAMESPACE", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "LOCAL_RANK", "TPI_LEASE_NAME"]  # fmt: skip
    assert render.lease(cpu, IDENT, 0, 3)["metadata"]["name"] == "demo-g0-3"


@pytest.mark.parametrize(("ranks_per_pod", "replicas"), [(1, 4), (2, 2), (4, 1)])
def test_render_gpu_group(ranks_per_pod, replicas):
    spec = gpu_spec(ranksPerPod=ranks_per_pod)
    obj = sts_of(spec)
    c = container_of(obj)
    n = ranks_per_pod
    assert obj["spec"]["replicas"] == replicas
    res = c["resources"]
    assert res["limits"] == res["requests"] == {"cpu": str(2 * n), "memory": f"{8 * n}Gi", "nvidia.com/gpu": str(n)}
    env = {e["name"]: e for e in c["env"]}
    assert env["WORLD_SIZE"]["value"] == "4" and env["TPI_LEASE_NAME"]["value"] == "$(POD_NAME)"
    assert env["MASTER_ADDR"]["value"] == "demo-g1-0.demo-ranks.ns.svc.cluster.local"  # rank 0 = pod 0
    pod_index = "metadata.labels['apps.kubernetes.io/pod-index']"
    volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory"}}  # charged to n x memory
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    if n == 1:
        assert c["command"] == ["python", "-m", "tpi_runtime", "serve"]
        assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == pod_index
        return
    assert c["command"] == ["python", "-m", "tpi_runtime", "launch", "--ranks-per-pod", str(n), "serve"]
    assert c["args"] == render.runtime_args(spec, 6)  # the same serve flags
    assert env["TPI_POD_ORDINAL"]["valueFrom"]["fieldRef"]["fieldPath"] == pod_index
    assert "RANK" not in env and "LOCAL_RANK" not in env  # the launcher sets them per process
    assert c["terminationMessagePath"] == "/dev/termination-log" and c["terminationMessagePolicy"] == "File"
    assert obj["metadata"]["annotations"][render.A_RANKS_PER_POD] == str(n)
    assert obj["spec"]["template"]["metadata"]["annotations"][render.A_RANKS_PER_POD] == str(n)


def test_gpu_default_is_one_pod_and_degraded_sizes_recompute():
    obj = sts_of(gpu_spec())  # no ranksPerPod: the group in one pod
    assert obj["spec"]["replicas"] == 1 and container_of(obj)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    halved = sts_of(gpu_spec(ranksPerPod=4), tp=2)  # TP 4 at 4 per pod -> TP 2 at 2 per pod
    assert halved["spec"]["replicas"] == 1 and "--ranks-per-pod" in container_of(halved)["command"]
    assert container_of(halved)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    one = sts_of(gpu_spec(ranksPerPod=4), tp=1)  # TP 1: one rank, the plain runtime again
    assert container_of(one)["command"] == ["python", "-m", "tpi_runtime", "serve"]


@pytest.mark.parametrize(
    ("quantity", "times", "expected"),
    [("2", 1, "2"), ("2", 4, "8"), ("500m", 2, "1000m"), ("1.5Gi", 4, "6Gi"), ("0.5", 3, "1.5"), ("10", 2, "20"),
     ("1e3", 2, "2e3"), ("+1G", 2, "2G")],
)  # fmt: skip
def test_scale_quantity(quantity, times, expected):
    assert render.scale_quantity(quantity, times) == expected


def test_leases_and_role_name_every_rank():
    spec = gpu_spec(ranksPerPod=2)
    lease = render.lease(spec, IDENT, 0, 3, 2)  # rank 3 = local rank 1 of pod 1
    assert lease["metadata"]["name"] == "demo-g0-1-r1" and lease["spec"]["holderIdentity"] == "demo-g0-1"
    assert lease["metadata"]["annotations"][render.L_RANK] == "3"
    obs = Observation(now=NOW, generation=1, desired_tp=4, valid_sizes=[1, 2, 4],
                      status=TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4),
                      hash_for=hash_for)  # fmt: skip
    decision = reconcile.decide(spec, IDENT, obs)
    leases = sorted(o["metadata"]["name"] for o in decision.apply if o["kind"] == "Lease")
    assert leases == ["demo-g0-0-r0", "demo-g0-0-r1", "demo-g0-1-r0", "demo-g0-1-r1"]
    role = next(o for o in decision.apply if o["kind"] == "Role")
    assert role["rules"][0]["resourceNames"] == leases
    assert [ranks.lease_owner(n, 2) for n in leases] == [("demo-g0-0", 0), ("demo-g0-0", 1), ("demo-g0-1", 0),
                                                          ("demo-g0-1", 1)]  # fmt: skip


# ---------------------------------------------------------------------------------- observing
def raw_pod(spec: TPInferenceClusterSpec, ordinal: int = 0, *, tp: int = 4, ready: bool = True,
            terminated: dict[str, Any] | None = None, batch: int = 8) -> dict[str, Any]:  # fmt: skip
    template = render.pod_template(spec, IDENT, render.GroupSettings(group=0, tp=tp, batch=batch))
    meta = template["metadata"]
    meta["labels"][render.POD_INDEX_LABEL] = str(ordinal)
    running = {"running": {"startedAt": "2025-01-01T11:55:00Z"}}
    cs: dict[str, Any] = {"name": "runtime", "restartCount": 0, "state": running}
    if terminated is not None:
        cs["restartCount"] = 1
        cs["lastState"] = {"terminated": terminated}
    return {
        "metadata": {**meta, "name": f"demo-g0-{ordinal}", "uid": f"uid-{ordinal}"},
        "spec": {"nodeName": "gpu-node-0"},
        "status": {
            "phase": "Running",
            "startTime": "2025-01-01T11:55:00Z",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [cs],
        },
    }


def gpu_obs(spec: TPInferenceClusterSpec, pods: list[dict[str, Any]], **kw: Any) -> Observation:
    n = layout.ranks_per_pod(spec, 4)
    st = TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4,
                                  groups=[GroupStatus(group=0, ready_hash=None)])  # fmt: skip
    tmpl_hash = render.template_hash(spec, IDENT, render.GroupSettings(group=0, tp=4, batch=8))
    return Observation(
        now=NOW,
        generation=1,
        desired_tp=4,
        valid_sizes=[1, 2, 4],
        status=kw.pop("status", st),
        pods=[p for raw in pods for p in rank_obs(raw)],
        statefulsets={0: StsObs(group=0, replicas=4 // n, template_hash=tmpl_hash, ranks_per_pod=n)},
        hash_for=lambda tp, batch: render.template_hash(spec, IDENT, render.GroupSettings(group=0, tp=tp, batch=batch)),
        **kw,
    )


def test_a_pod_of_four_ranks_is_four_ranks_in_status():
    spec = gpu_spec()
    obs = gpu_obs(spec, [raw_pod(spec)])
    assert [(p.name, p.rank, p.local_rank, p.lease_name) for p in obs.pods] == [
        ("demo-g0-0", r, r, f"demo-g0-0-r{r}") for r in range(4)
    ]
    actions = rc.plan(spec, obs)
    final, _ = sc.compute(spec, IDENT, obs, rc.transition(spec, obs, actions), actions)
    assert (final.tp, final.ready, final.ready_ranks, final.total_ranks) == ("4/4", "4/4", 4, 4)
    assert final.phase == "Running" and final.ready_replicas == 1
    assert [(r.rank, r.pod, r.local_rank, r.node) for r in final.ranks] == [
        (r, "demo-g0-0", r, "gpu-node-0") for r in range(4)
    ]
    wire = final.wire()["ranks"][0]
    assert wire["localRank"] == 0 and "terminationMessage" not in wire


def test_one_rank_pods_status_has_no_local_rank():
    spec = make_spec()
    raw = [raw_pod(spec, o) for o in range(4)]
    obs = gpu_obs(spec, raw)
    actions = rc.plan(spec, obs)
    final, _ = sc.compute(spec, IDENT, obs, rc.transition(spec, obs, actions), actions)
    assert final.ready == "4/4" and all("localRank" not in r for r in final.wire()["ranks"])


def test_leases_map_back_to_their_rank_and_a_hung_local_rank_recreates_the_group():
    spec = gpu_spec(failurePolicy={"heartbeatTimeoutSeconds": 30})
    obs = gpu_obs(spec, [raw_pod(spec)])
    t0 = NOW - dt.timedelta(seconds=20)
    leases = {f"demo-g0-0-r{r}": LeaseObs(f"demo-g0-0-r{r}", renew_time=t0 - dt.timedelta(seconds=r)) for r in range(4)}
    seen = heartbeat.track({}, obs.pods, leases, t0)
    assert set(seen) == set(leases) and all(s.pod_uid == "uid-0" and s.since == t0 for s in seen.values())
    # 35 s later: local ranks 0, 1 and 3 renewed, local rank 2 did not
    now = NOW + dt.timedelta(seconds=15)
    renewed = {n: dataclasses.replace(lo, renew_time=now) if not n.endswith("-r2") else lo for n, lo in leases.items()}
    seen = heartbeat.track(seen, obs.pods, renewed, now)
    later = dataclasses.replace(obs, now=now, leases=heartbeat.with_since(renewed, seen))
    actions = rc.plan(spec, later)
    recreate = next(a for a in actions if isinstance(a, rc.RecreateGroup))
    assert recreate.reason == "HeartbeatTimeout" and "local rank 2, rank 2" in recreate.message


@pytest.mark.parametrize(
    ("terminated", "oom"),
    [
        ({"exitCode": 137, "reason": "Error", "message": OOM_MESSAGE}, True),  # the launcher's word
        ({"exitCode": 137, "reason": "OOMKilled"}, True),  # the kubelet's word
        ({"exitCode": 137, "reason": "OOMKilled", "message": OOM_MESSAGE}, True),  # both
        ({"exitCode": 4, "reason": "Error", "message": "local rank 1 (rank 1) exited 4: out of GPU memory"}, True),
        ({"exitCode": 137, "reason": "Error", "message": "local rank 1 (rank 1) exited 137: killed by SIGKILL"}, False),
        ({"exitCode": 1, "reason": "Error", "message": OOM_MESSAGE}, False),  # not the launcher's OOM exit
    ],
)
def test_oom_named_by_the_termination_message_halves_the_batch(terminated, oom):
    spec = gpu_spec(ranksPerPod=2)
    ended = {**terminated, "finishedAt": "2025-01-01T11:59:50Z"}
    obs = gpu_obs(spec, [raw_pod(spec, 0, terminated=ended), raw_pod(spec, 1)])
    assert all(p.oom == oom for p in obs.pods if p.name == "demo-g0-0")
    actions = rc.plan(spec, obs)
    kinds = [a.kind for a in actions if a.kind != "Wait"]
    assert kinds == (["HalveBatch", "RecreateGroup"] if oom else ["RecreateGroup"])
    st = rc.transition(spec, obs, actions)
    assert st.groups[0].max_batch_size == (4 if oom else None)
    decision = reconcile.decide(spec, IDENT, obs)
    deleted = [d.name for d in decision.delete_pods]
    assert sorted(deleted) == ["demo-g0-0", "demo-g0-1"]  # once each, though each holds 2 ranks
    recreate = next(a for a in actions if a.kind == "RecreateGroup")
    if "message" in terminated and terminated["message"].startswith("local rank 1"):
        # the history keeps which local rank ended it, also when the kubelet says OOMKilled itself
        assert terminated["message"].split("\n")[0] in recreate.message, recreate.message
    final, _ = sc.compute(spec, IDENT, obs, obs.status, [])  # what status showed before the recreate
    if "message" in terminated and terminated["message"].startswith("local rank 1"):
        by_rank = {r.rank: r for r in final.ranks}
        assert by_rank[1].termination_message == terminated["message"].split("\n")[0]
        assert by_rank[0].termination_message is None  # the cause is local rank 1's


# ----------------------------------------------------------------------------------- capacity
def node(name: str, gpus: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {}}, "spec": {},
            "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus), "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip


@pytest.mark.parametrize(
    ("gpus_per_node", "ranks_per_pod", "expected"),
    [([3, 3], 1, 6), ([3, 3], 2, 4), ([3, 3], 4, 0), ([4, 2], 4, 4), ([4, 2], 2, 6), ([8], 4, 8)],
)
def test_free_capacity_counts_whole_pods(gpus_per_node, ranks_per_pod, expected):
    spec = gpu_spec()
    nodes = [node(f"n{i}", g) for i, g in enumerate(gpus_per_node)]
    assert capacity.free_rank_slots(spec, nodes, {}, ranks_per_pod) == expected
    assert capacity.rank_request(spec, ranks_per_pod)["nvidia.com/gpu"] == ranks_per_pod


@pytest.mark.parametrize(
    ("free_in_pods", "expected"),
    [({2: 2}, ["Degrade", "RollGroup"]), ({2: 0}, ["Blocked"]), ({}, ["Blocked"])],
)
def test_unschedulable_one_pod_group_degrades_to_pods_that_fit(free_in_pods, expected):
    # TP 4 in one pod of 4 GPUs on 2-GPU nodes never schedules; a TP 2 pod of 2 GPUs does.
    spec = gpu_spec(failurePolicy={"unschedulableTimeoutSeconds": 120, "minTensorParallelSize": 2})
    raw = raw_pod(spec, ready=False)
    raw["spec"] = {}
    raw["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes",
         "lastTransitionTime": format_time(NOW - dt.timedelta(seconds=300))}]}  # fmt: skip
    obs = gpu_obs(spec, [raw], free_rank_slots=4, free_ranks_in_pods=free_in_pods)
    actions = rc.plan(spec, obs)
    assert [a.kind for a in actions if a.kind != "Wait"] == expected
    if expected[0] == "Degrade":
        assert (actions[0].from_size, actions[0].to_size) == (4, 2)


@pytest.mark.parametrize(
    ("tp", "gpus_per_rank", "node_gpus", "configured", "expected"),
    [
        (4, 1, 8, None, 4),  # the group fits one node: one pod
        (16, 1, 8, None, 8),  # it does not: the largest divisor that fits, 2 pods of 8
        (12, 1, 8, None, 6),  # 12 on 8-GPU nodes: 2 pods of 6 (8 does not divide 12)
        (8, 2, 8, None, 4),  # 2 GPUs per rank: 4 ranks fill a node
        (4, 1, 2, None, 2),
        (4, 4, 2, None, 1),  # no node holds even one rank: one per pod (it stays Pending, explained)
        (4, 1, None, None, None),  # no node reports GPUs: the spec is kept (the whole group)
        (16, 1, 8, 16, 16),  # a configured value is the user's, never overridden
        (4, 0, 8, None, None),  # CPU ranks: nothing to resolve
    ],
)
def test_gpu_default_fits_the_largest_node(tp, gpus_per_rank, node_gpus, configured, expected):
    spec = make_spec(tensorParallelSize=tp, ranksPerPod=configured, resources={"cpu": "1", "gpus": gpus_per_rank})
    assert layout.resolved(spec, tp, node_gpus).ranks_per_pod == expected


def test_most_gpus_on_a_node_counts_only_nodes_the_cluster_may_use():
    from test_capacity import node

    spec = make_spec(resources={"cpu": "1", "gpus": 1})
    nodes = [node("a", gpus=4), node("b", gpus=8, taints=[{"key": "k", "effect": "NoSchedule"}]),
             node("c", gpus=8, labels={"pool": "other"}), node("d")]  # fmt: skip
    pinned = make_spec(resources={"cpu": "1", "gpus": 1}, scheduling={"nodeSelector": {"pool": "main"}})
    assert capacity.most_gpus_on_a_node(spec, nodes) == 8  # c: no selector, any label will do
    assert capacity.most_gpus_on_a_node(pinned, nodes) is None
    assert capacity.most_gpus_on_a_node(spec, nodes[:2]) == 4  # b's taint is not tolerated
    assert capacity.most_gpus_on_a_node(spec, [node("d")]) is None
    # A node down or cordoned is still what the pool is made of: the layout does not move.
    down = node("e", gpus=8, ready="False", unschedulable=True,
                taints=[{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
                        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}])  # fmt: skip
    assert capacity.most_gpus_on_a_node(spec, [node("a", gpus=4), down]) == 8
