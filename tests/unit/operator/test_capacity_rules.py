"""Capacity under the placement rules (core.capacity.Capacity, snapshot): a size fits only if it
fits the way the scheduler will place it."""

from __future__ import annotations

import pytest
from tpi_contract import keys
from tpi_operator.core import capacity, placement
from tpi_operator.core.capacity import Capacity, NodeRoom

from tests.unit.operator.op_builders import make_spec

RACK = "example.com/rack"


def rooms(*spec: tuple[str, int, str | None] | tuple[str, int, str | None, frozenset[str]]) -> tuple[NodeRoom, ...]:
    return tuple(NodeRoom(*s) for s in spec)


# two racks of two 2-GPU nodes; rack b's nodes are half full
RACKS = rooms(("a1", 2, "a"), ("a2", 2, "a"), ("b1", 1, "b"), ("b2", 1, "b"), ("x", 4, None))


@pytest.mark.parametrize(
    ("cap", "pods", "own", "gid", "fits"),
    [
        # no topology key: free slots anywhere count (co-location is only preferred)
        (Capacity(RACKS), 10, {}, "g", True),
        (Capacity(RACKS), 11, {}, "g", False),
        (Capacity(RACKS), 11, {"b1": 1}, "g", True),  # its own bound pod goes when it is recreated
        (Capacity(RACKS, arriving=3), 8, {}, "g", False),  # pods about to bind take slots first
        # topology key: one domain must hold the whole group; a node without the label is in none
        (Capacity(RACKS, RACK), 4, {}, "g", True),
        (Capacity(RACKS, RACK), 5, {}, "g", False),  # 10 free in all, 4 in the biggest rack
        (Capacity(RACKS, RACK), 3, {"b1": 1}, "g", True),  # rack b: 2 free + its own 1
        # exclusive: a rack holding another group's pod is out, even with room
        (Capacity(rooms(("a1", 2, "a", frozenset({"other"}))) + RACKS[1:], RACK, True), 3, {}, "g", False),
        (Capacity(rooms(("a1", 2, "a", frozenset({"other"}))) + RACKS[1:], RACK, True), 2, {}, "g", True),
        (Capacity(rooms(("a1", 2, "a", frozenset({"g"}))) + RACKS[1:], RACK, True), 4, {}, "g", True),  # its own
        (Capacity(rooms(("a1", 2, "a", frozenset({"other"}))) + RACKS[1:], RACK, False), 4, {}, "g", True),
        (Capacity(), 0, {}, "g", True),
    ],
)  # fmt: skip
def test_fits(cap: Capacity, pods: int, own: dict, gid: str, fits: bool) -> None:
    assert cap.fits(pods, own, gid) is fits


@pytest.mark.parametrize(
    ("cap", "pods", "groups", "fits"),
    [
        (Capacity(RACKS), 5, {"g0": {}, "g1": {}}, True),  # 10 free
        (Capacity(RACKS), 6, {"g0": {}, "g1": {}}, False),
        (Capacity(RACKS, RACK), 2, {"g0": {}, "g1": {}}, True),  # both in rack a, or one per rack
        (Capacity(RACKS, RACK), 3, {"g0": {}, "g1": {}}, False),  # rack b holds 2
        (Capacity(RACKS, RACK), 3, {"g0": {}, "g1": {"b1": 1}}, True),  # g1's own pod frees rack b's third
        (Capacity(RACKS, RACK, True), 2, {"g0": {}, "g1": {}}, True),  # one rack each
        (Capacity(RACKS, RACK, True), 1, {"g0": {}, "g1": {}, "g2": {}}, False),  # two racks, three groups
        (Capacity(RACKS, RACK, False), 1, {"g0": {}, "g1": {}, "g2": {}}, True),
    ],
)  # fmt: skip
def test_fits_all(cap: Capacity, pods: int, groups: dict, fits: bool) -> None:
    assert cap.fits_all(pods, groups) is fits


def node(name: str, gpus: int, rack: str | None = None) -> dict:
    labels = {"kubernetes.io/hostname": name, **({RACK: rack} if rack else {})}
    alloc = {"cpu": "8", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {"metadata": {"name": name, "labels": labels}, "spec": {}, "status": {"allocatable": alloc}}


def rank_pod(node_name: str | None, gid: str, exclusive: str | None = None, scheduled: str | None = None) -> dict:
    labels = {keys.CLUSTER: "x", keys.GROUP_ID: gid, **({keys.EXCLUSIVE_TOPOLOGY: exclusive} if exclusive else {})}
    conditions = [{"type": "PodScheduled", "status": scheduled}] if scheduled else []
    return {"metadata": {"labels": labels}, "spec": {"nodeName": node_name,
            "containers": [{"resources": {"requests": {"nvidia.com/gpu": "1"}}}]},
            "status": {"phase": "Pending" if node_name is None else "Running", "conditions": conditions}}  # fmt: skip


def test_snapshot_counts_fresh_rank_pods_exclusive_domains_and_arriving_pods() -> None:
    spec = make_spec(resources={"gpus": 1}, scheduling={"topologyKey": RACK, "exclusive": True})
    nodes = [node("a1", 4, "a"), node("b1", 4, "b"), node("c1", 4)]
    topo = placement.topology_id(RACK)
    pods = [
        rank_pod("a1", "other", topo),  # another exclusive group holds rack a
        rank_pod("b1", "plain"), rank_pod("b1", "plain"),  # bound a moment ago: not yet in the listing
        rank_pod(None, "late"),  # created, not yet tried: it will take a slot
        rank_pod(None, "stuck", scheduled="False"),  # found unschedulable already: it takes nothing
        rank_pod(None, "mine"),  # this cluster's own pod is no rival
    ]  # fmt: skip
    cap = capacity.snapshot(spec, nodes, {"a1": {"nvidia.com/gpu": 1.0, "pods": 1.0}}, pods, frozenset({"mine"}))
    by_name = {r.name: r for r in cap.rooms}
    assert (by_name["a1"].slots, by_name["b1"].slots, by_name["c1"].slots) == (3, 2, 4)
    assert by_name["a1"].exclusive_groups == frozenset({"other"}) and by_name["c1"].domain is None
    assert cap.arriving == 1
    assert not cap.fits(3, {}, "g")  # rack a is another group's, rack b has 2
    assert cap.fits(2, {}, "g")
    assert cap.fits(3, {}, "other")  # the group that holds rack a still fits there
