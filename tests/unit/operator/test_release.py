"""All-or-nothing scheduling: a partly scheduled group is released (scaled to zero) and scaled back
up only after a jittered backoff, once its whole size fits (core.recovery rule_released)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from tpi_operator.api.v1alpha1 import GroupStatus, TPInferenceClusterStatus
from tpi_operator.core import reconcile, render
from tpi_operator.core import recovery as rc
from tpi_operator.core.capacity import Capacity, NodeRoom
from tpi_operator.core.observe import StsObs, format_time

from tests.unit.operator.op_builders import IDENT, NOW, healthy_pods, make_obs, make_spec

TIMEOUT = 120  # the default unschedulableTimeoutSeconds


def spec_min4(**fp: object):
    return make_spec(failurePolicy={"minTensorParallelSize": 4, **fp})


def partial(scheduled: int = 3, age: float = TIMEOUT + 1, incarnation: int = 0):
    """A TP=4 group with ``scheduled`` pods bound, the others unschedulable for ``age`` seconds."""
    pods = healthy_pods(incarnation=incarnation)
    return [
        p if p.rank < scheduled else dataclasses.replace(
            p, phase="Pending", ready=False, node=None, unschedulable_since=NOW - dt.timedelta(seconds=age),
            unschedulable_message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu")
        for p in pods
    ]  # fmt: skip


def status(**group: object) -> TPInferenceClusterStatus:
    return TPInferenceClusterStatus(
        current_tensor_parallel_size=4, desired_tensor_parallel_size=4, groups=[GroupStatus(group=0, **group)]
    )


def released(retry_in: float, releases: int = 1, incarnation: int = 1, pods: int = 4) -> TPInferenceClusterStatus:
    return status(incarnation=incarnation, released_at=format_time(NOW - dt.timedelta(seconds=30), micro=True),
                  retry_at=format_time(NOW + dt.timedelta(seconds=retry_in), micro=True),
                  releases=releases, release_pods=pods)  # fmt: skip


def of(actions: list[rc.Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


@pytest.mark.parametrize(
    ("scheduled", "age", "free", "fp", "expected"),
    [
        (3, 10, 0, {}, []),  # not yet timed out
        (3, TIMEOUT + 1, 0, {}, ["ReleaseGroup", "Blocked"]),  # min TP 4: no smaller size, the 3 go
        (3, TIMEOUT + 1, 0, {"allowDegrade": False}, ["ReleaseGroup", "Blocked"]),
        (0, TIMEOUT + 1, 0, {}, ["Blocked"]),  # holds nothing: nothing to release
        (3, TIMEOUT + 1, 0, {"minTensorParallelSize": 2}, ["Degrade", "RollGroup"]),  # 2 fit: degrade wins
    ],
)
def test_release_decision(scheduled: int, age: float, free: int, fp: dict, expected: list[str]) -> None:
    spec = spec_min4(**fp)
    obs = make_obs(spec, pods=partial(scheduled, age), status=status(), free_rank_slots=free)
    assert [a.kind for a in rc.plan(spec, obs) if a.kind != "Wait"] == expected


def test_a_released_group_is_scaled_to_zero_under_a_new_incarnation() -> None:
    spec = spec_min4()
    obs = make_obs(spec, pods=partial(), status=status(), free_rank_slots=0)
    decision = reconcile.decide(spec, IDENT, obs)
    [release] = of(decision.actions, rc.ReleaseGroup)
    delay = (release.retry_at - NOW).total_seconds()
    assert 5 <= delay < 5 + TIMEOUT / 2  # backoffSeconds, plus a jitter over unschedulableTimeout / 2
    assert "3 hold resources" in release.message and "releasing the group" in release.message
    g = decision.status.groups[0]
    assert (g.incarnation, g.releases, g.release_pods, g.pod_uids) == (1, 1, 4, [])
    assert g.released_at == format_time(NOW, micro=True) and g.retry_at == format_time(release.retry_at, micro=True)
    [sts] = [o for o in decision.apply if o["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 0 and sts["metadata"]["annotations"][render.L_INCARNATION] == "1"
    assert {d.name: d.grace_seconds for d in decision.delete_pods} == {
        f"demo-g0-{r}": reconcile.BROKEN_GROUP_GRACE_SECONDS for r in range(4)}  # fmt: skip
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "ReleaseGroup")]
    assert decision.status.phase == "Degraded"
    assert "releasing the group" in {c.type: c for c in decision.status.conditions}["Degraded"].message
    assert decision.status.history[-1].action == "ReleaseGroup"


def test_a_released_group_waits_out_its_retry_time_holding_nothing() -> None:
    spec = spec_min4()
    obs = make_obs(spec, pods=[], status=released(retry_in=20), free_rank_slots=8,
                   sts_tp={0: 0})  # fmt: skip
    actions = rc.plan(spec, obs)
    assert [a.kind for a in actions if a.kind != "Wait"] == ["Blocked"]
    assert NOW + dt.timedelta(seconds=20) in [a.until for a in of(actions, rc.Wait)]
    decision = reconcile.decide(spec, IDENT, obs)
    for sts in (o for o in decision.apply if o["kind"] == "StatefulSet"):
        assert sts["spec"]["replicas"] == 0  # never scaled up early


@pytest.mark.parametrize(
    ("cap", "fp", "expected"),
    [
        (Capacity.counting(4), {}, ["ResumeGroup"]),  # the whole group fits
        (Capacity.counting(3), {}, ["Blocked"]),  # not yet: it stays at zero and looks again
        (Capacity((NodeRoom("n", 6),), arriving=4), {}, ["Blocked"]),  # another group's pods are arriving
        (Capacity.counting(2), {"minTensorParallelSize": 2}, ["Degrade", "ResumeGroup"]),  # a smaller size fits
        (None, {}, ["Blocked"]),  # capacity unknown: never guess
    ],
)  # fmt: skip
def test_retry_scales_back_up_only_when_the_whole_group_fits(cap: Capacity | None, fp: dict, expected: list) -> None:
    spec = spec_min4(**fp)
    obs = make_obs(spec, pods=[], status=released(retry_in=-1), capacities={1: cap} if cap else {}, sts_tp={0: 0})
    actions = rc.plan(spec, obs)
    assert [a.kind for a in actions if a.kind not in ("Wait", "RollGroup")] == expected
    decision = reconcile.decide(spec, IDENT, obs)
    [sts] = [o for o in decision.apply if o["kind"] == "StatefulSet"] or [None]
    if "ResumeGroup" in expected:
        assert sts is not None and sts["spec"]["replicas"] == decision.status.current_tensor_parallel_size
        assert decision.status.groups[0].released_at is None
    else:
        assert sts is None or sts["spec"]["replicas"] == 0
        assert decision.status.groups[0].released_at is not None
        waits = [a.until for a in of(actions, rc.Wait) if a.reason == "GroupReleased"]
        assert waits == [NOW + dt.timedelta(seconds=rc.RELEASED_RECHECK_SECONDS)]


def test_two_groups_released_together_retry_apart_and_the_later_sees_the_first() -> None:
    spec = make_spec()
    delays = {gid: rc.release_delay(spec, 1, gid, 1) for gid in ("ns/a/0", "ns/b/0")}
    assert abs(delays["ns/a/0"] - delays["ns/b/0"]) > 1.0  # apart by more than a pod watch's lag
    assert rc.release_delay(spec, 1, "ns/a/0", 1) == delays["ns/a/0"]  # fixed per group and incarnation
    assert rc.release_delay(spec, 3, "ns/a/0", 1) >= 20  # later releases back off exponentially
    # 6 slots, the first group's 4 pods just created: the second must not take the other 2 + wait
    first_scaled = Capacity((NodeRoom("n", 6),), arriving=4)
    assert not first_scaled.fits(4) and Capacity((NodeRoom("n", 6),)).fits(4)


def test_a_ready_group_starts_its_release_backoff_afresh() -> None:
    spec = spec_min4()
    st = status(incarnation=2, releases=3)
    obs = make_obs(spec, pods=healthy_pods(incarnation=2), status=st)
    assert rc.transition(spec, obs, rc.plan(spec, obs)).groups[0].releases == 0


def test_a_group_of_two_ranks_per_pod_is_released_and_counted_in_pods() -> None:
    spec = make_spec(resources={"gpus": 1}, ranksPerPod=2, failurePolicy={"minTensorParallelSize": 4})
    bound = {"node": "node-0"}
    stuck = {"phase": "Pending", "ready": False, "node": None,
             "unschedulable_since": NOW - dt.timedelta(seconds=TIMEOUT + 1)}  # fmt: skip
    pods = [
        dataclasses.replace(p, name=f"demo-g0-{p.rank // 2}", local_rank=p.rank % 2, ranks_per_pod=2,
                            **(bound if p.rank < 2 else stuck))
        for p in healthy_pods()
    ]  # fmt: skip
    obs = make_obs(spec, pods=pods, status=status(), sts_tp={}, capacities={2: Capacity.counting(0)})
    obs = dataclasses.replace(obs, statefulsets={0: StsObs(group=0, replicas=2, template_hash="x", ranks_per_pod=2)})
    [release] = of(rc.plan(spec, obs), rc.ReleaseGroup)
    assert release.pods == 2 and "1 of its 2 pods" not in release.message  # ranks 2 and 3 are one pod
    assert "while 1 hold resources (1 on node-0)" in release.message
    # it comes back only when a pod of 2 ranks fits twice
    back = make_obs(spec, pods=[], status=released(-1, pods=2), sts_tp={}, capacities={2: Capacity.counting(1)})
    assert not of(rc.plan(spec, back), rc.ResumeGroup)
    back = dataclasses.replace(back, capacities={2: Capacity.counting(2)})
    assert of(rc.plan(spec, back), rc.ResumeGroup)
