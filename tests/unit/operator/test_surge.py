"""maxSurge rolls, evicted groups' drains and the disruption budget: recovery, reconcile, render."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from op_builders import IDENT, NOW, healthy_pods, make_obs, make_spec
from tpi_contract import defaults
from tpi_operator.api.v1alpha1 import GroupStatus, TPInferenceClusterStatus
from tpi_operator.core import reconcile, render
from tpi_operator.core import recovery as rc
from tpi_operator.core.observe import LeaseObs, StsObs

OLD, NEW = "h4-8", "new"


def status(replicas=1, **kw):
    groups = [GroupStatus(group=g, pod_uids=[f"u{g}-{r}-0" for r in range(4)]) for g in range(replicas)]
    return TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4,
                                    groups=groups, **kw)  # fmt: skip


def rolling(replicas=1, surge=1, *, groups=None, surge_groups=None, **kw):
    """A roll in progress: ``groups`` / ``surge_groups`` map an index to (template, ready)."""
    spec = make_spec(replicas=replicas, updateStrategy={"maxSurge": surge})
    groups = {g: (OLD, True) for g in range(replicas)} if groups is None else groups
    all_groups = {**groups, **(surge_groups or {})}
    pods = [dataclasses.replace(p, template_hash=t, ready=ready)
            for g, (t, ready) in all_groups.items() for p in healthy_pods(g)]  # fmt: skip
    sts = {g: StsObs(group=g, replicas=4, template_hash=t) for g, (t, _) in all_groups.items()}
    obs = make_obs(spec, pods=pods, status=status(replicas), **kw)
    return spec, dataclasses.replace(obs, statefulsets=sts, hash_for=lambda tp, b: NEW)


def summary(actions):
    # The rollout's progress-deadline timer (test_rollout.py tests it) runs beside every roll.
    return [(a.kind, a.reason, getattr(a, "group", None)) for a in actions if a.reason != "ProgressDeadline"]


# ------------------------------------------------------------------------ the roll, step by step
SURGE_STEPS = [
    # id, groups, surge groups, expected actions (Waits included: they explain the hold)
    ("surge group first", {0: (OLD, True)}, {}, [("RollGroup", "Surge", 1), ("Wait", "RollingUpdate", None)]),
    (
        "old group serves until the surge group is Ready",
        {0: (OLD, True)},
        {1: (NEW, False)},
        [("Wait", "Surge", None), ("Wait", "RollingUpdate", None)],
    ),
    ("surge Ready: the old group goes", {0: (OLD, True)}, {1: (NEW, True)}, [("RollGroup", "Update", 0)]),
    ("surge kept while the rolled group loads", {0: (NEW, False)}, {1: (NEW, True)}, []),
    (
        "all up to date and Ready: the surge group goes",
        {0: (NEW, True)},
        {1: (NEW, True)},
        [("RemoveGroup", "SurgeDone", 1)],
    ),
    ("nothing to roll, no surge group", {0: (NEW, True)}, {}, []),
    (
        "a stale surge group is updated",
        {0: (OLD, True)},
        {1: (OLD, True)},
        [("RollGroup", "Surge", 1), ("Wait", "RollingUpdate", None)],
    ),
]


@pytest.mark.parametrize(("groups", "surge", "expected"), [c[1:] for c in SURGE_STEPS], ids=[c[0] for c in SURGE_STEPS])
def test_replicas_1_max_surge_1_never_goes_below_one_ready_group(groups, surge, expected):
    spec, obs = rolling(groups=groups, surge_groups=surge)
    assert summary(rc.plan(spec, obs)) == expected


def test_max_surge_0_rolls_in_place_as_before():
    spec, obs = rolling(surge=0)
    assert summary(rc.plan(spec, obs)) == [("RollGroup", "Update", 0)]


def test_max_surge_1_of_3_groups_rolls_one_at_a_time_behind_one_surge_group():
    groups = {0: (NEW, False), 1: (OLD, True), 2: (OLD, True)}
    spec, obs = rolling(replicas=3, groups=groups, surge_groups={3: (NEW, True)})
    # 2 Ready + 1 Ready surge = 3 = replicas: nothing more may go down while group 0 loads
    assert [a.kind for a in rc.plan(spec, obs) if a.kind != "Wait"] == []
    groups[0] = (NEW, True)
    spec, obs = rolling(replicas=3, groups=groups, surge_groups={3: (NEW, True)})
    assert summary(a for a in rc.plan(spec, obs) if a.kind != "Wait") == [("RollGroup", "Update", 1)]


def test_max_surge_2_brings_up_two_surge_groups_for_two_stale_groups():
    spec, obs = rolling(replicas=2, surge=2)
    assert [(a.reason, a.group) for a in rc.plan(spec, obs) if a.kind == "RollGroup"] == [("Surge", 2), ("Surge", 3)]


def test_groups_already_down_are_rolled_at_once_without_waiting_for_surge():
    spec, obs = rolling(groups={0: (OLD, False)})
    assert ("RollGroup", "Update", 0) in summary(rc.plan(spec, obs))


@pytest.mark.parametrize("scale_back_up", [False, True])
def test_a_degraded_or_growing_cluster_does_not_surge(scale_back_up):
    """Running at 4 of a desired 8: capacity is short; growing back is a resize, rolled in place."""
    spec, obs = rolling(desired_tp=8, groups={0: ("t4", True)})
    obs = dataclasses.replace(obs, hash_for=lambda tp, b: f"t{tp}")
    spec = spec.model_copy(update={"failure_policy": spec.failure_policy.model_copy(
        update={"scale_back_up": scale_back_up, "restart_window_seconds": 1})})  # fmt: skip
    st = obs.status.model_copy(update={"desired_tensor_parallel_size": 8, "degraded_reason": "CrashLoop",
                                       "degraded_since": "2024-01-01T00:00:00Z"})  # fmt: skip
    obs = dataclasses.replace(obs, status=st)
    assert rc.current_tp(obs.status, 8) == 4
    actions = rc.plan(spec, obs)
    assert [a.kind for a in actions if a.kind != "Wait"] == (["ScaleUp", "RollGroup"] if scale_back_up else [])
    assert not [a for a in actions if a.reason == "Surge"]


def test_surge_group_that_cannot_schedule_is_reported_and_the_old_group_keeps_serving():
    spec, obs = rolling(surge_groups={1: (NEW, False)})
    stuck_since = NOW - dt.timedelta(seconds=spec.failure_policy.unschedulable_timeout_seconds)
    pods = [dataclasses.replace(p, phase="Pending", node=None, unschedulable_since=stuck_since,
                                unschedulable_message="0/3 nodes have free nvidia.com/gpu")
            if p.group == 1 else p for p in obs.pods]  # fmt: skip
    actions = rc.plan(spec, dataclasses.replace(obs, pods=pods))
    blocked = [a for a in actions if isinstance(a, rc.Blocked)]
    assert [a.reason for a in blocked] == ["SurgeUnschedulable"] and "maxSurge: 0" in blocked[0].message
    assert not [a for a in actions if isinstance(a, rc.RollGroup | rc.RecreateGroup | rc.Degrade)]


def test_a_crashed_surge_group_is_started_afresh():
    spec, obs = rolling(surge_groups={1: (NEW, False)})
    pods = [dataclasses.replace(p, restarts=1, exit_code=3) if p.name == "demo-g1-2" else p for p in obs.pods]
    actions = rc.plan(spec, dataclasses.replace(obs, pods=pods))
    assert ("RemoveGroup", "SurgeFailed", 1) in summary(actions)
    assert ("RollGroup", "Update", 0) not in summary(actions)


def test_surge_groups_stay_out_of_status_groups():
    spec, obs = rolling(surge_groups={1: (NEW, True)})
    actions = rc.plan(spec, obs)
    st = rc.transition(spec, obs, actions)
    assert [g.group for g in st.groups] == [0]


# ------------------------------------------------------------------------------- reconcile
def real_rolling(**kw):
    spec, obs = rolling(**kw)
    real = reconcile.hash_function(spec, IDENT, None)
    new = real(4, 8)

    def fix(h):
        return new if h == NEW else h

    pods = [dataclasses.replace(p, template_hash=fix(p.template_hash)) for p in obs.pods]
    sts = {g: dataclasses.replace(s, template_hash=fix(s.template_hash)) for g, s in obs.statefulsets.items()}
    return spec, dataclasses.replace(obs, pods=pods, statefulsets=sts, hash_for=real)


def test_decide_renders_the_surge_group_with_its_leases_and_keeps_the_old_group():
    spec, obs = real_rolling()
    obs = dataclasses.replace(obs, statefulsets={0: StsObs(group=0, replicas=4, template_hash=OLD)})
    d = reconcile.decide(spec, IDENT, obs)
    stses = [o["metadata"]["name"] for o in d.apply if o["kind"] == "StatefulSet"]
    assert stses == ["demo-g1"]
    leases = {o["metadata"]["name"] for o in d.apply if o["kind"] == "Lease"}
    assert {f"demo-g1-{r}" for r in range(4)} <= leases
    role = next(o for o in d.apply if o["kind"] == "Role")
    assert "demo-g1-3" in role["rules"][0]["resourceNames"]
    assert d.delete_pods == [] and d.delete_statefulsets == []


def test_decide_deletes_the_surge_statefulset_once_the_roll_is_done():
    spec, obs = real_rolling(groups={0: (NEW, True)}, surge_groups={1: (NEW, True)})
    obs = dataclasses.replace(obs, leases={p.name: LeaseObs(p.name) for p in obs.pods})
    d = reconcile.decide(spec, IDENT, obs)
    assert d.delete_statefulsets == ["demo-g1"]
    assert "demo-g1-0" in d.delete_leases


def test_a_rolled_group_drains_with_its_grace_period():
    spec, obs = real_rolling(surge_groups={1: (NEW, True)})
    d = reconcile.decide(spec, IDENT, obs)
    assert sorted(p.name for p in d.delete_pods) == [f"demo-g0-{r}" for r in range(4)]
    assert {p.grace_seconds for p in d.delete_pods} == {None}


# ------------------------------------------------------------------------------- eviction
def test_an_evicted_rank_recreates_its_group_and_lets_rank_0_drain():
    """kubectl drain evicts one rank: the group is recreated, but its other ranks get their full
    grace period (rank 0 finishes its streams) instead of a broken group's 5 s."""
    spec = make_spec()
    base = dataclasses.replace(make_obs(spec), hash_for=reconcile.hash_function(spec, IDENT, None))
    want = base.hash_for(4, 8)
    pods = [dataclasses.replace(p, template_hash=want) for p in healthy_pods()]
    sts = {0: StsObs(group=0, replicas=4, template_hash=want)}
    obs = dataclasses.replace(base, pods=pods, statefulsets=sts, status=status())
    assert reconcile.decide(spec, IDENT, obs).delete_pods == []
    evicted = [dataclasses.replace(p, deleting=True, ready=False) if p.rank == 1 else p for p in pods]
    d = reconcile.decide(spec, IDENT, dataclasses.replace(obs, pods=evicted))
    assert [a.kind for a in d.actions if a.kind != "Wait"] == ["RecreateGroup"]
    assert sorted((p.name, p.grace_seconds) for p in d.delete_pods) == [
        ("demo-g0-0", None), ("demo-g0-2", None), ("demo-g0-3", None)]  # fmt: skip
    crashed = [dataclasses.replace(p, restarts=1, exit_code=1) if p.rank == 1 else p for p in pods]
    d = reconcile.decide(spec, IDENT, dataclasses.replace(obs, pods=crashed))
    assert {p.grace_seconds for p in d.delete_pods} == {reconcile.BROKEN_GROUP_GRACE_SECONDS}


# --------------------------------------------------------------------------------- render
@pytest.mark.parametrize(("replicas", "tp", "max_unavailable"), [(2, 4, 1), (3, 2, 2), (1, 1, 1)])
def test_disruption_budget_counts_groups_not_ranks(replicas, tp, max_unavailable):
    spec = make_spec(replicas=replicas, tensorParallelSize=tp, updateStrategy={"maxUnavailable": max_unavailable},
                     failurePolicy={"minTensorParallelSize": 1})  # fmt: skip
    pdb = next(o for o in render.shared_objects(spec, IDENT, []) if o["kind"] == "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["name"] == "demo"
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == IDENT.uid
    # one pod per group's worth of budget: an eviction breaks a whole group (see disruption_budget)
    assert pdb["spec"]["maxUnavailable"] == max_unavailable
    assert pdb["spec"]["selector"] == {"matchLabels": {"tpi.dev/cluster": "demo"}}
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize(("grace", "drain"), [(None, 45), (120, 105), (defaults.MIN_GRACE_SECONDS, 5)])
def test_grace_period_prestop_and_drain_fit_together(grace, drain):
    spec = make_spec(**({} if grace is None else {"terminationGracePeriodSeconds": grace}))
    pod = render.pod_template(spec, IDENT, render.GroupSettings(0, 4, 8))["spec"]
    (c,) = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] == (grace or 60)
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": defaults.PRESTOP_SECONDS}}}
    assert c["args"][c["args"].index("--drain-seconds") + 1] == str(drain)
    # preStop + rank 0's drain + a follower's extra wait + margin = the grace period
    total = defaults.PRESTOP_SECONDS + drain + defaults.FOLLOWER_EXTRA_SECONDS + defaults.GRACE_MARGIN_SECONDS
    assert total == (grace or 60)


def test_grace_period_below_the_timeline_is_refused():
    with pytest.raises(ValueError, match="terminationGracePeriodSeconds"):
        make_spec(terminationGracePeriodSeconds=defaults.MIN_GRACE_SECONDS - 1)
