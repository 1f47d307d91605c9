"""core.capacity: the free-capacity estimate, table-tested (nodes from the index, usage per node)."""

from __future__ import annotations

from typing import Any

import pytest
from op_builders import make_spec
from tpi_operator.core import capacity


def node(name: str, cpu: str = "4", memory: str = "16Gi", gpus: int | None = None, ready: str | None = "True",
         labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None,
         unschedulable: bool = False) -> dict[str, Any]:  # fmt: skip
    alloc = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus is not None:
        alloc["nvidia.com/gpu"] = str(gpus)
    conds = [{"type": "MemoryPressure", "status": "False"}]
    if ready is not None:
        conds.append({"type": "Ready", "status": ready, "lastTransitionTime": "2025-01-01T00:00:00Z"})
    return {
        "metadata": {"name": name, "labels": labels or {}, "annotations": {"big": "x" * 100}},
        "spec": {"unschedulable": unschedulable, "taints": taints or [], "podCIDR": "10.0.0.0/24"},
        "status": {"allocatable": alloc, "capacity": alloc, "conditions": conds, "images": [{"names": ["a"]}]},
    }


def pod(node_name: str | None, cpu: str = "1", memory: str = "1Gi", phase: str = "Running") -> dict[str, Any]:
    return {
        "spec": {"nodeName": node_name, "containers": [{"resources": {"requests": {"cpu": cpu, "memory": memory}}}]},
        "status": {"phase": phase},
    }


RANK = {"resources": {"cpu": "1", "memory": "1Gi"}}
GPU_RANK = {"resources": {"cpu": "1", "memory": "1Gi", "gpus": 1}}


@pytest.mark.parametrize(
    ("spec_kw", "nodes", "pods", "free"),
    [
        ({**RANK}, [node("a")], [], 4),  # cpu-bound: 4 cpus
        ({**RANK}, [node("a", memory="2Gi")], [], 2),  # memory-bound
        ({**RANK}, [node("a"), node("b")], [pod("a"), pod("a"), pod("b")], 2 + 3),  # a: 2 left, b: 3 left
        ({**RANK}, [node("a")], [pod("a", phase="Succeeded"), pod("a", phase="Failed")], 4),  # finished: free
        ({**RANK}, [node("a")], [pod(None)], 4),  # unbound pods take nothing
        ({**RANK}, [node("a")], [pod("a", cpu="3500m")], 0),  # 0.5 cpu left: no rank fits
        ({**RANK}, [node("a", ready="False"), node("b", ready="Unknown")], [], 0),  # not Ready
        ({**RANK}, [node("a", ready=None)], [], 4),  # no Ready condition yet: counted
        ({**RANK}, [node("a", unschedulable=True)], [], 0),  # cordoned
        ({**GPU_RANK}, [node("a"), node("b", gpus=2)], [], 2),  # only GPU nodes, 2 GPUs
        ({**RANK, "scheduling": {"nodeSelector": {"pool": "x"}}}, [node("a"), node("b", labels={"pool": "x"})], [], 4),
        ({**RANK}, [node("a", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}])], [], 0),
        (
            {
                **RANK,
                "scheduling": {
                    "tolerations": [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}]
                },
            },
            [node("a", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}])],
            [],
            4,
        ),
        ({**RANK}, [node("a", taints=[{"key": "k", "effect": "PreferNoSchedule"}])], [], 4),
    ],
)
def test_free_rank_slots(spec_kw: dict, nodes: list[dict], pods: list[dict], free: int) -> None:
    spec = make_spec(**spec_kw)
    slim = [capacity.slim_node(n) for n in nodes]
    assert capacity.free_rank_slots(spec, slim, capacity.node_usage(pods)) == free
    # the slim node (what the index keeps) gives the same answer as the full object
    assert capacity.free_rank_slots(spec, nodes, capacity.node_usage(pods)) == free


def test_slim_node_keeps_only_what_is_read() -> None:
    slim = capacity.slim_node(node("a", labels={"zone": "z"}, taints=[{"key": "k", "effect": "NoSchedule"}]))
    assert slim == {
        "metadata": {"name": "a", "labels": {"zone": "z"}},
        "spec": {"unschedulable": False, "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"cpu": "4", "memory": "16Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        },
    }


@pytest.mark.parametrize(
    ("nodes", "names"),
    [
        ([node("b"), node("a")], ["a", "b"]),
        ([node("a", cpu="500m"), node("b")], ["b"]),  # too small even when empty: no query for it
        ([node("a", ready="False"), node("b", unschedulable=True), node("c")], ["c"]),
        ([node("a", taints=[{"key": "gpu", "effect": "NoSchedule"}])], []),
    ],
)
def test_candidate_nodes(nodes: list[dict], names: list[str]) -> None:
    assert capacity.candidate_nodes(make_spec(**RANK), nodes) == names


@pytest.mark.parametrize(
    ("req", "alloc", "used", "slots"),
    [
        ({"cpu": 1.0, "pods": 1.0}, {"cpu": 4.0, "pods": 110.0}, {}, 4),
        ({"cpu": 1.0, "pods": 1.0}, {"cpu": 4.0, "pods": 2.0}, {}, 2),  # pod count caps it
        ({"cpu": 1.0, "pods": 1.0}, {"cpu": 4.0, "pods": 110.0}, {"cpu": 5.0}, 0),  # overcommitted: never negative
        ({"nvidia.com/gpu": 1.0, "pods": 1.0}, {"cpu": 4.0, "pods": 110.0}, {}, 0),  # resource the node lacks
    ],
)
def test_slots_on(req: dict, alloc: dict, used: dict, slots: int) -> None:
    assert capacity.slots_on(req, alloc, used) == slots


def test_node_usage_sums_requests_per_node() -> None:
    used = capacity.node_usage([pod("a"), pod("a", cpu="500m", memory="2Gi"), pod("b"), pod(None)])
    assert used == {
        "a": {"pods": 2.0, "cpu": 1.5, "memory": 3 * 2**30},
        "b": {"pods": 1.0, "cpu": 1.0, "memory": 2**30},
    }
