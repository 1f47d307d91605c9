"""Placement terms (core.placement) and how render puts them on a group's pods."""

from __future__ import annotations

import pydantic
import pytest
from tpi_contract import keys
from tpi_operator.api.v1alpha1 import SchedulingSpec
from tpi_operator.core import placement, render

from tests.unit.operator.op_builders import IDENT, make_spec

HOST = "kubernetes.io/hostname"
RACK = "example.com/rack"


def sched(**kw: object) -> SchedulingSpec:
    return SchedulingSpec.model_validate(kw)


def own_term(key: str) -> dict:
    return {"labelSelector": {"matchLabels": {keys.CLUSTER: "demo"}}, "matchLabelKeys": [keys.POD_GROUP],
            "topologyKey": key}  # fmt: skip


PACK = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": own_term(HOST)}]}


@pytest.mark.parametrize(
    ("spec", "pods", "expected"),
    [
        ({}, 1, {}),  # one pod: nothing to keep together
        ({}, 2, {"podAffinity": PACK}),  # default: preferred onto one node
        ({"topologyKey": RACK}, 1, {}),
        ({"topologyKey": RACK}, 4, {"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [own_term(RACK)], **PACK}}),
        # the domain is the node: the requirement says it all
        ({"topologyKey": HOST}, 2,
         {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [own_term(HOST)]}}),
    ],
)  # fmt: skip
def test_operator_affinity(spec: dict, pods: int, expected: dict) -> None:
    assert placement.operator_affinity(sched(**spec), "demo", pods) == expected


def test_exclusive_repels_other_groups_on_the_same_key_in_every_namespace() -> None:
    out = placement.operator_affinity(sched(topologyKey=RACK, exclusive=True), "demo", 1)
    [term] = out["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == RACK and term["namespaceSelector"] == {}
    assert term["mismatchLabelKeys"] == [keys.GROUP_ID]  # its own group (any incarnation) is no rival
    assert term["labelSelector"]["matchExpressions"] == [
        {"key": keys.EXCLUSIVE_TOPOLOGY, "operator": "In", "values": [placement.topology_id(RACK)]}
    ]
    assert "podAffinity" not in out  # a group of one pod needs no affinity to itself
    assert placement.topology_id(RACK) != placement.topology_id("other/key")


def test_exclusive_needs_a_topology_key() -> None:
    assert placement.operator_affinity(sched(exclusive=True), "demo", 2) == {"podAffinity": PACK}


def test_a_users_affinity_is_merged_not_replaced() -> None:
    user = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}},
        "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 5, "podAffinityTerm": {}}]},
    }
    merged = placement.affinity(sched(affinity=user, topologyKey=RACK), "demo", 2)
    assert merged is not None
    assert merged["nodeAffinity"] == user["nodeAffinity"]
    assert merged["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 5, "podAffinityTerm": {}}, *PACK["preferredDuringSchedulingIgnoredDuringExecution"]]  # fmt: skip
    assert merged["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [own_term(RACK)]
    assert len(user["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]) == 1  # not mutated
    assert placement.affinity(sched(), "demo", 1) is None


@pytest.mark.parametrize(
    ("spec", "labels", "annotations"),
    [
        ({}, {keys.POD_GROUP: "demo-g1-i3"}, {keys.POD_GROUP_TOTAL_COUNT: "4"}),
        ({"kueue": {"queueName": "team"}},
         {keys.POD_GROUP: "demo-g1-i3", "kueue.x-k8s.io/pod-group-name": "demo-g1-i3"},
         {keys.POD_GROUP_TOTAL_COUNT: "4", "kueue.x-k8s.io/pod-group-total-count": "4",
          "kueue.x-k8s.io/retriable-in-group": "false"}),
        ({"podGroup": {"nameLabels": ["scheduling.x-k8s.io/pod-group"],
                       "nameAnnotations": ["scheduling.k8s.io/group-name"], "countAnnotations": ["x/count"]}},
         {keys.POD_GROUP: "demo-g1-i3", "scheduling.x-k8s.io/pod-group": "demo-g1-i3"},
         {keys.POD_GROUP_TOTAL_COUNT: "4", "scheduling.k8s.io/group-name": "demo-g1-i3", "x/count": "4"}),
    ],
)  # fmt: skip
def test_pod_group_metadata(spec: dict, labels: dict, annotations: dict) -> None:
    assert placement.group_metadata(sched(**spec), "demo", 1, 3, 4) == (labels, annotations)


def test_rendered_group_carries_placement_scheduler_and_pod_group() -> None:
    spec = make_spec(scheduling={"topologyKey": RACK, "exclusive": True, "schedulerName": "volcano",
                                 "kueue": {"queueName": "team"}})  # fmt: skip
    sts = render.statefulset(spec, IDENT, render.GroupSettings(group=1, tp=4, batch=8, incarnation=2))
    tmpl = sts["spec"]["template"]
    pod, labels = tmpl["spec"], tmpl["metadata"]["labels"]
    assert pod["schedulerName"] == "volcano"
    assert pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [own_term(RACK)]
    assert "podAntiAffinity" in pod["affinity"]
    assert labels[keys.POD_GROUP] == labels["kueue.x-k8s.io/pod-group-name"] == "demo-g1-i2"
    assert labels[keys.GROUP_ID] == placement.group_id("ns", "demo", 1)
    assert labels[keys.EXCLUSIVE_TOPOLOGY] == placement.topology_id(RACK)
    assert labels["kueue.x-k8s.io/queue-name"] == "team"
    assert tmpl["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "4"
    # the StatefulSet itself carries no queue label: only its pods are Kueue's (pod integration)
    assert "kueue.x-k8s.io/queue-name" not in sts["metadata"]["labels"]


def test_template_hash_ignores_group_and_incarnation_of_the_placement_labels() -> None:
    spec = make_spec(scheduling={"topologyKey": RACK, "exclusive": True, "kueue": {"queueName": "q"}})

    def h(group: int, incarnation: int) -> str:
        gs = render.GroupSettings(group=group, tp=4, batch=8, incarnation=incarnation)
        return render.template_hash(spec, IDENT, gs)

    assert h(0, 0) == h(3, 0) == h(0, 7)
    assert h(0, 0) != render.template_hash(make_spec(), IDENT, render.GroupSettings(group=0, tp=4, batch=8))


def test_released_statefulset_is_the_same_object_at_zero_replicas() -> None:
    sts = render.statefulset(make_spec(), IDENT, render.GroupSettings(group=0, tp=4, batch=8))
    zero = render.with_replicas(sts, 0)
    assert zero["spec"]["replicas"] == 0 and sts["spec"]["replicas"] == 4
    assert zero["spec"]["template"] == sts["spec"]["template"]
    assert zero["metadata"]["annotations"][render.A_OBJECT_HASH] != sts["metadata"]["annotations"][render.A_OBJECT_HASH]


def test_api_rejects_a_topology_key_that_is_no_label_key() -> None:
    with pytest.raises(pydantic.ValidationError):
        sched(topologyKey="not a key")
    assert sched(topologyKey="topology.kubernetes.io/zone").topology_key == "topology.kubernetes.io/zone"


@pytest.mark.parametrize(
    ("ranks_per_pod", "pods", "packed"),
    [(None, 1, False), (2, 2, True), (1, 4, True), (4, 1, False)],  # None: a GPU group's default, one pod
)
def test_placement_and_pod_group_count_follow_the_pods_not_the_ranks(
    ranks_per_pod: int | None, pods: int, packed: bool
) -> None:
    spec = make_spec(resources={"gpus": 1}, **({"ranksPerPod": ranks_per_pod} if ranks_per_pod else {}))
    sts = render.statefulset(spec, IDENT, render.GroupSettings(group=0, tp=4, batch=8))
    tmpl = sts["spec"]["template"]
    assert sts["spec"]["replicas"] == pods
    assert tmpl["metadata"]["annotations"][keys.POD_GROUP_TOTAL_COUNT] == str(pods)
    assert ("podAffinity" in (tmpl["spec"].get("affinity") or {})) is packed
