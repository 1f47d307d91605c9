"""Table-driven tests of recovery.plan / transition and status.compute."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from op_builders import IDENT, NOW, hash_for, healthy_pods, make_obs, make_spec
from tpi_operator.api.v1alpha1 import GroupStatus, TPInferenceClusterStatus
from tpi_operator.core import recovery as rc
from tpi_operator.core import status as sc
from tpi_operator.core.observe import LeaseObs, format_time


def kinds(actions):
    return [a.kind for a in actions if a.kind != "Wait"]


def status_with(restarts=0, group=0, current=4, desired=4, batch=8, **kw):
    """Status of one group; ``batch`` below the spec's default 8 is that group's OOM-halved size."""
    times = [format_time(NOW - dt.timedelta(seconds=60 * (i + 1)), micro=True) for i in range(restarts)]
    if batch != 8:
        kw = {"max_batch_size": batch, "batch_basis": "8@", **kw}
    kw.setdefault("ready_hash", hash_for(current, batch))  # a group that ran (was Ready on) its template
    return TPInferenceClusterStatus(
        current_tensor_parallel_size=current,
        desired_tensor_parallel_size=desired,
        effective_max_batch_size=batch,
        groups=[GroupStatus(group=group, restart_times=times, **kw)],
    )


def with_pod(pods, rank, **changes):
    return [dataclasses.replace(p, **changes) if p.rank == rank else p for p in pods]


# ----------------------------------------------------------------------------- failure table
CASES = [
    # id, pod changes on rank 1, prior restarts in window, expected action kinds
    ("healthy", {}, 0, []),
    ("crash", {"restarts": 1, "exit_code": 1, "termination_reason": "Error"}, 0, ["RecreateGroup"]),
    ("crashloop-waiting", {"waiting_reason": "CrashLoopBackOff", "restarts": 3}, 1, ["RecreateGroup"]),
    ("pod-failed", {"phase": "Failed"}, 0, ["RecreateGroup"]),
    (
        "oom",
        {"restarts": 1, "termination_reason": "OOMKilled", "exit_code": 137},
        0,
        ["HalveBatch", "RecreateGroup"],
    ),
    (
        "gpu-oom-mid-forward",
        {"restarts": 1, "termination_reason": "Error", "exit_code": 4},
        0,
        ["HalveBatch", "RecreateGroup"],
    ),
    ("budget-exhausted-degrades", {"restarts": 1, "exit_code": 1}, 3, ["Degrade", "RollGroup"]),
]


@pytest.mark.parametrize(("changes", "prior", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_failure_table(changes, prior, expected):
    spec = make_spec(failurePolicy={"backoffSeconds": 1})
    pods = with_pod(healthy_pods(), 1, **changes)
    obs = make_obs(spec, pods=pods, status=status_with(prior))
    assert kinds(rc.plan(spec, obs)) == expected


def test_first_recreate_is_immediate_later_ones_back_off():
    spec = make_spec(failurePolicy={"backoffSeconds": 10, "maxBackoffSeconds": 25})
    assert [rc.backoff_seconds(spec, n) for n in range(5)] == [0, 10, 20, 25, 25]
    pods = with_pod(healthy_pods(), 0, restarts=1, exit_code=1)
    st = status_with(0)
    st.groups[0].restart_times = [format_time(NOW - dt.timedelta(seconds=15), micro=True)]
    st.groups[0].restart_times.insert(0, format_time(NOW - dt.timedelta(seconds=100), micro=True))
    actions = rc.plan(spec, make_obs(spec, pods=pods, status=st))
    # two restarts in the window -> 20 s backoff after the last (15 s ago): wait 5 s more
    assert kinds(actions) == []
    wait = next(a for a in actions if isinstance(a, rc.Wait) and a.reason == "Crash")
    assert wait.until == NOW + dt.timedelta(seconds=5)
    assert rc.next_wake(actions, NOW, 30) == pytest.approx(5)


def test_oom_halves_down_to_floor_then_only_recreates():
    spec = make_spec(runtime={"maxBatchSize": 8}, failurePolicy={"oomBatchSizeFloor": 3})
    pods = with_pod(healthy_pods(batch=4), 2, termination_reason="OOMKilled", restarts=1)
    obs = make_obs(spec, pods=pods, status=status_with(batch=4), batch=4)
    actions = rc.plan(spec, obs)
    halve = next(a for a in actions if isinstance(a, rc.HalveBatch))
    assert (halve.from_size, halve.to_size) == (4, 3)
    st = rc.transition(spec, obs, actions)
    assert st.effective_max_batch_size == 3 and st.groups[0].max_batch_size == 3
    assert st.groups[0].incarnation == 1 and st.restarts == 1
    assert [h.action for h in st.history] == ["HalveBatch", "RecreateGroup"]
    # at the floor: no more halving, one more try...
    obs = make_obs(spec, pods=with_pod(healthy_pods(batch=3), 0, termination_reason="OOMKilled"),
                   status=status_with(batch=3), batch=3)  # fmt: skip
    actions = rc.plan(spec, obs)
    assert kinds(actions) == ["RecreateGroup"]
    assert rc.transition(spec, obs, actions).groups[0].floor_ooms == 1
    # ...and a second OOM at the floor fails the cluster, never shrinking TP
    obs = dataclasses.replace(obs, status=status_with(batch=3, floor_ooms=1))
    actions = rc.plan(spec, obs)
    assert kinds(actions) == ["MarkFailed"] and actions[0].reason == "OOMAtBatchFloor"


@pytest.mark.parametrize(
    ("policy", "current", "expected", "message"),
    [
        ({"minTensorParallelSize": 2}, 4, "Degrade", "4 -> 2"),
        ({"minTensorParallelSize": 2}, 2, "MarkFailed", "minTensorParallelSize=2"),
        ({"minTensorParallelSize": 1, "allowDegrade": False}, 4, "MarkFailed", "allowDegrade: false"),
        ({"minTensorParallelSize": 1}, 2, "Degrade", "2 -> 1"),
    ],
)
def test_restart_budget(policy, current, expected, message):
    spec = make_spec(failurePolicy={"maxGroupRestarts": 2, **policy})
    pods = with_pod(healthy_pods(tp=current), 0, restarts=2, exit_code=1)
    obs = make_obs(spec, pods=pods, status=status_with(2, current=current), tp=current)
    actions = rc.plan(spec, obs)
    assert kinds(actions)[0] == expected
    assert message in actions[0].message
    st = rc.transition(spec, obs, actions)
    if expected == "MarkFailed":
        assert st.groups[0].failed_generation == 1 and st.groups[0].failure_reason == "RestartBudgetExhausted"
        final, _ = sc.compute(spec, IDENT, obs, st, actions)
        assert final.phase == "Failed"
        cond = {c.type: c for c in final.conditions}
        assert cond["Ready"].status == "False" and message in cond["Degraded"].message
        assert kinds(rc.plan(spec, dataclasses.replace(obs, status=final))) == []  # no more restarts
        # a new generation retries from scratch
        retry = rc.plan(spec, dataclasses.replace(obs, status=final, generation=2))
        assert kinds(retry)[0] == "Reset"
    else:
        assert st.current_tensor_parallel_size < current
        assert st.groups[0].restart_times == []  # fresh budget at the new size


def test_degrade_rolls_all_groups_to_new_size():
    spec = make_spec(replicas=2, failurePolicy={"maxGroupRestarts": 1})
    pods = with_pod(healthy_pods(0), 1, restarts=1, exit_code=1) + healthy_pods(1)
    obs = make_obs(spec, pods=pods, status=status_with(1))
    actions = rc.plan(spec, obs)
    # group 0 is down: rolled at once; group 1 is healthy and maxUnavailable=1 is used up
    assert kinds(actions) == ["Degrade", "RollGroup"]
    assert actions[1].group == 0 and actions[1].template_hash == "h2-8"


def test_stale_lease_means_hang():
    spec = make_spec(failurePolicy={"heartbeatTimeoutSeconds": 10})
    pods = healthy_pods()
    # ``since``: the operator's own time of the last renewal it saw (core.heartbeat tracks it)
    leases = {p.name: LeaseObs(p.name, since=NOW - dt.timedelta(seconds=1)) for p in pods}
    fresh = make_obs(spec, pods=pods, leases=leases, status=status_with())
    assert kinds(rc.plan(spec, fresh)) == []
    assert rc.next_wake(rc.plan(spec, fresh), NOW, 30) == pytest.approx(9.1)
    leases["demo-g0-3"] = LeaseObs("demo-g0-3", since=NOW - dt.timedelta(seconds=11))
    actions = rc.plan(spec, dataclasses.replace(fresh, leases=leases))
    assert kinds(actions) == ["RecreateGroup"] and actions[0].reason == "HeartbeatTimeout"


def test_lease_not_renewed_for_this_pod_is_not_a_hang_nor_a_deadline():
    spec = make_spec(failurePolicy={"heartbeatTimeoutSeconds": 10})
    pods = [dataclasses.replace(p, started_at=NOW - dt.timedelta(seconds=5)) for p in healthy_pods()]
    leases = {p.name: LeaseObs(p.name, renew_time=NOW - dt.timedelta(minutes=3)) for p in pods}
    actions = rc.plan(spec, make_obs(spec, pods=pods, leases=leases, status=status_with()))
    assert kinds(actions) == []
    assert rc.next_wake(actions, NOW, 30) == 30  # no past deadline: no spin


def test_replaced_pod_breaks_the_group():
    spec = make_spec()
    pods = healthy_pods()
    st = status_with(pod_uids=[p.uid for p in pods])
    assert kinds(rc.plan(spec, make_obs(spec, pods=pods, status=st))) == []
    replaced = with_pod(pods, 2, uid="new-uid", ready=False)
    actions = rc.plan(spec, make_obs(spec, pods=replaced, status=st))
    assert kinds(actions) == ["RecreateGroup"] and actions[0].reason == "PodDeleted"
    missing = [p for p in pods if p.rank != 2]
    assert kinds(rc.plan(spec, make_obs(spec, pods=missing, status=st))) == ["RecreateGroup"]


@pytest.mark.parametrize(
    ("age", "scheduled", "free", "expected"),
    [
        (10, 2, None, []),  # not yet timed out
        (200, 2, None, ["Degrade", "RollGroup"]),  # 2 ranks fit -> 4 -> 2
        (200, 1, 0, ["ReleaseGroup", "Blocked"]),  # only 1 fits, min is 2: the bound one goes
        (200, 0, 1, ["Blocked"]),  # nothing bound: nothing to release
        (200, 1, 1, ["Degrade", "RollGroup"]),  # 1 scheduled + 1 free = 2
    ],
)
def test_unschedulable(age, scheduled, free, expected):
    spec = make_spec(failurePolicy={"unschedulableTimeoutSeconds": 120})
    pods = healthy_pods()
    for r in range(scheduled, 4):
        pods = with_pod(pods, r, phase="Pending", ready=False, node=None,
                        unschedulable_since=NOW - dt.timedelta(seconds=age),
                        unschedulable_message="0/3 nodes are available")  # fmt: skip
    obs = make_obs(spec, pods=pods, status=status_with(), free_rank_slots=free)
    actions = rc.plan(spec, obs)
    assert kinds(actions) == expected
    if expected[:1] == ["Degrade"]:
        assert actions[0].to_size == 2
    if expected[-1:] == ["Blocked"]:
        final, _ = sc.compute(spec, IDENT, obs, rc.transition(spec, obs, actions), actions)
        assert final.phase == "Degraded"
        assert "unschedulable" in {c.type: c for c in final.conditions}["Degraded"].message


@pytest.mark.parametrize(
    ("reason", "free", "degraded_ago", "expected"),
    [
        ("Unschedulable", 2, 70, ["ScaleUp"]),  # capacity is back, scaleBackUpDelaySeconds (60) spent
        ("Unschedulable", 2, 10, []),  # capacity is back, but the hysteresis is not spent
        ("Unschedulable", 1, 70, []),  # not enough yet
        ("CrashLoop", None, 10, []),  # crash degrade: wait for a quiet window
        ("CrashLoop", None, 700, ["ScaleUp"]),
    ],
)
def test_scale_back_up(reason, free, degraded_ago, expected):
    spec = make_spec()
    st = status_with(current=2, desired=4, degraded_reason=None)
    st.degraded_reason = reason
    # the hysteresis is kept in status, not searched for in the (bounded) history
    st.degraded_since = format_time(NOW - dt.timedelta(seconds=degraded_ago))
    obs = make_obs(spec, tp=2, status=st, free_rank_slots=free)
    actions = rc.plan(spec, obs)
    assert kinds(actions)[:1] == expected
    if expected:
        assert actions[0].to_size == 4 and kinds(actions) == ["ScaleUp", "RollGroup"]


@pytest.mark.parametrize(
    ("replicas", "max_unavailable", "not_ready", "expected_groups"),
    [
        (3, 1, set(), [0]),
        (3, 2, set(), [0, 1]),
        (3, 1, {2}, [2]),  # a down group is updated at once and uses up the budget
        (3, 1, {0, 2}, [0, 2]),
    ],
)
def test_rolling_respects_max_unavailable(replicas, max_unavailable, not_ready, expected_groups):
    spec = make_spec(replicas=replicas, updateStrategy={"maxUnavailable": max_unavailable})
    pods = [p for g in range(replicas) for p in healthy_pods(g, batch=8)]
    pods = [dataclasses.replace(p, ready=False) if p.group in not_ready else p for p in pods]
    # spec changed: the wanted hash is new for every group
    obs = dataclasses.replace(make_obs(spec, pods=pods, status=status_with()), hash_for=lambda tp, b: "new")
    rolled = [a.group for a in rc.plan(spec, obs) if isinstance(a, rc.RollGroup)]
    assert rolled == expected_groups


def test_status_running_and_printer_strings():
    spec = make_spec(replicas=2)
    obs = make_obs(spec, status=status_with())
    actions = rc.plan(spec, obs)
    final, recovered = sc.compute(spec, IDENT, obs, rc.transition(spec, obs, actions), actions)
    assert final.phase == "Running"
    assert (final.tp, final.ready, final.ready_replicas) == ("4/4", "8/8", 2)
    assert final.endpoint == "http://demo.ns.svc.cluster.local:8000"
    assert final.selector == "tpi.dev/cluster=demo,apps.kubernetes.io/pod-index=0"
    assert {c.type: c.status for c in final.conditions} == {"Ready": "True", "Progressing": "False",
                                                            "Degraded": "False"}  # fmt: skip
    assert recovered == [] and len(final.ranks) == 8
    assert all(g.pod_uids for g in final.groups)  # formed groups are remembered


def test_recovery_time_is_reported_once_ready_again():
    spec = make_spec()
    st = status_with(failing_since=format_time(NOW - dt.timedelta(seconds=7), micro=True))
    st.groups[0].failure_reason = "Crash"
    obs = make_obs(spec, status=st)
    final, recovered = sc.compute(spec, IDENT, obs, rc.transition(spec, obs, []), [])
    assert recovered == [sc.Recovered(0, "Crash", 7.0)]
    assert final.groups[0].failing_since is None and final.phase == "Running"


@pytest.mark.parametrize(
    ("pods_phase", "ready", "expected"),
    [("Pending", False, "Pending"), ("Running", False, "Loading"), ("Running", True, "Running")],
)
def test_phases(pods_phase, ready, expected):
    spec = make_spec()
    pods = [dataclasses.replace(p, phase=pods_phase, ready=ready) for p in healthy_pods()]
    obs = make_obs(spec, pods=pods, status=status_with())
    final, _ = sc.compute(spec, IDENT, obs, rc.transition(spec, obs, []), [])
    assert final.phase == expected


def test_history_is_bounded():
    spec = make_spec(failurePolicy={"maxGroupRestarts": 20, "backoffSeconds": 0})
    st = status_with()
    for i in range(50):
        pods = with_pod(healthy_pods(incarnation=st.groups[0].incarnation), 0, restarts=1)
        obs = make_obs(spec, pods=pods, status=st, now=NOW + dt.timedelta(hours=i))
        st = rc.transition(spec, obs, rc.plan(spec, obs))
    assert len(st.history) == 30 and st.restarts == 50
    assert len(st.groups[0].restart_times) <= 21


# ------------------------------------------------------------- a rank reports a failed peer
PEER = {"restarts": 1, "termination_reason": "Error", "exit_code": 3}
OOM = {"restarts": 1, "termination_reason": "OOMKilled", "exit_code": 137}


@pytest.mark.parametrize(
    ("rank1", "rank0", "ended_ago", "expected", "waits"),
    [
        # Only "my peer failed" (exit 3), just now: wait for the peer's own cause, nothing counted yet.
        ("peer", None, 1, [], True),
        # The peer's OOM kill arrives in the grace: the group's batch is halved, as for any OOM.
        ("peer", "oom", 1, ["HalveBatch", "RecreateGroup"], False),
        # No cause arrived within the grace: a crash like any other.
        ("peer", None, 6, ["RecreateGroup"], False),
        # A crash of its own (exit 1) is never deferred.
        ("crash", None, 1, ["RecreateGroup"], False),
    ],
)
def test_a_failed_peer_report_waits_briefly_for_the_peers_own_cause(rank1, rank0, ended_ago, expected, waits):
    spec = make_spec(failurePolicy={"backoffSeconds": 1})
    ended = NOW - dt.timedelta(seconds=ended_ago)
    r1 = PEER if rank1 == "peer" else {"restarts": 1, "termination_reason": "Error", "exit_code": 1}
    pods = with_pod(healthy_pods(), 1, finished_at=ended, **r1)
    if rank0 == "oom":
        pods = with_pod(pods, 0, finished_at=ended, **OOM)
    actions = rc.plan(spec, make_obs(spec, pods=pods, status=status_with(0)))
    assert kinds(actions) == expected
    peer_waits = [a for a in actions if a.reason == "PeerCause"]
    assert bool(peer_waits) == waits
    if waits:
        assert peer_waits[0].until == ended + rc.PEER_CAUSE_GRACE


def force(group: int, *pods: tuple[str, str]) -> rc.ForceDelete:
    return rc.ForceDelete("NodeLost", "", group, "n1", pods)


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        ([], {}),
        ([rc.Hold("Paused", "")], {}),
        ([force(0, ("c-g0-0", "u0"), ("c-g0-1", "u1"))], {"c-g0-0": "u0", "c-g0-1": "u1"}),
        ([force(0, ("c-g0-0", "u0")), force(1, ("c-g1-0", "u2"))], {"c-g0-0": "u0", "c-g1-0": "u2"}),
        # a pod named twice (a pod of several ranks is observed once per rank) is deleted once
        ([force(0, ("p", "u"), ("p", "u"))], {"p": "u"}),
    ],
)
def test_force_deleted_names_every_pod_once(actions: list[rc.Action], expected: dict[str, str]) -> None:
    assert rc.force_deleted(actions) == expected
