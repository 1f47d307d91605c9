"""Table tests of issue #10 item 6: a bad rollout is halted at its first group and explained, a
paused roll stays paused, a stalled one hits its progress deadline, and Failed is per group."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from op_builders import IDENT, NOW, hash_for, healthy_pods, make_obs, make_spec
from tpi_operator.api.v1alpha1 import GroupStatus, RolloutStatus, TPInferenceClusterStatus
from tpi_operator.core import reconcile, rollout
from tpi_operator.core import recovery as rc
from tpi_operator.core import status as sc
from tpi_operator.core.observe import StsObs, format_time, pod_obs

OLD, NEW = hash_for(4, 8), "new"


def kinds(actions):
    return [a.kind for a in actions if a.kind != "Wait"]


def group(g: int, ready_hash: str | None = OLD, **kw) -> GroupStatus:
    return GroupStatus(group=g, ready_hash=ready_hash, **kw)


def cluster(replicas=3, rolled=(0,), pod_changes=None, groups=None, spec=None, **kw):
    """``replicas`` groups, those in ``rolled`` on the NEW template (never Ready on it yet), the
    others Ready on the OLD one; ``pod_changes`` applies to every pod of group 0."""
    spec = spec or make_spec(replicas=replicas)
    pods, sts = [], {}
    for g in range(replicas):
        thash = NEW if g in rolled else OLD
        gpods = [dataclasses.replace(p, template_hash=thash) for p in healthy_pods(g)]
        if g in rolled:
            gpods = [dataclasses.replace(p, ready=False, **(pod_changes or {})) for p in gpods]
        pods += gpods
        sts[g] = StsObs(group=g, replicas=4, template_hash=thash)
    st = TPInferenceClusterStatus(
        current_tensor_parallel_size=4,
        desired_tensor_parallel_size=4,
        groups=groups if groups is not None else [group(g) for g in range(replicas)],
        **kw.pop("status", {}),
    )
    obs = make_obs(spec, pods=pods, status=st, **kw)
    return spec, dataclasses.replace(obs, statefulsets=sts, hash_for=lambda tp, b: NEW)


def decide_status(spec, obs, actions):
    return sc.compute(spec, IDENT, obs, rc.transition(spec, obs, actions), actions)[0]


def conditions(st):
    return {c.type: c for c in st.conditions}


# ------------------------------------------------------------------------ what a bad pod says
@pytest.mark.parametrize(
    ("changes", "reason", "says"),
    [
        ({"phase": "Pending", "waiting_reason": "ErrImagePull", "waiting_message": "not found"},
         "ErrImagePull", "pod demo-g0-0: ErrImagePull: not found"),
        ({"phase": "Pending", "waiting_reason": "ImagePullBackOff", "waiting_message": "x" * 999},
         "ImagePullBackOff", "ImagePullBackOff: " + "x" * rollout.MESSAGE_CHARS),
        ({"phase": "Pending", "waiting_reason": "CreateContainerConfigError",
          "waiting_message": 'secret "hf-token" not found'}, "CreateContainerConfigError", 'secret "hf-token"'),
        ({"waiting_reason": "CrashLoopBackOff", "restarts": 2, "exit_code": 3, "termination_reason": "Error"},
         "CrashLoopBackOff", "CrashLoopBackOff (Error, last exit code 3, 2 restarts)"),
        ({"phase": "Pending", "waiting_reason": "ContainerCreating"}, None, None),  # merely starting
        ({"phase": "Running"}, None, None),  # loading
    ],
)  # fmt: skip
def test_pod_problem(changes, reason, says):
    pod = dataclasses.replace(healthy_pods()[0], ready=False, **changes)
    found = rollout.pod_problem(pod)
    assert (found[0] if found else None) == reason
    if says is not None:
        assert says in found[1] and "x" * (rollout.MESSAGE_CHARS + 1) not in found[1]


def test_waiting_reason_and_message_are_parsed_and_shown_per_rank():
    raw = {
        "metadata": {"name": "demo-g0-1", "labels": {"tpi.dev/group": "0", "apps.kubernetes.io/pod-index": "1"}},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "runtime", "restartCount": 0, "state": {
            "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image " + "y" * 600}}}]},
    }  # fmt: skip
    pod = pod_obs(raw)
    assert pod is not None and pod.waiting_reason == "ImagePullBackOff" and pod.waiting_message.startswith("Back-off")
    crashed = dataclasses.replace(pod, rank=0, name="demo-g0-0", waiting_reason="CrashLoopBackOff",
                                  waiting_message=None, exit_code=3, termination_reason="Error",
                                  restarts=4)  # fmt: skip
    spec, obs = cluster(replicas=1, rolled=(0,))
    obs = dataclasses.replace(obs, pods=[crashed, pod, *[p for p in obs.pods if p.rank > 1]])
    st = decide_status(spec, obs, [])  # as observed, before the crash's recreate
    ranks = {r.pod: r for r in st.ranks}
    assert ranks["demo-g0-1"].waiting_reason == "ImagePullBackOff"
    assert len(ranks["demo-g0-1"].waiting_message) == rollout.MESSAGE_CHARS
    assert (ranks["demo-g0-0"].waiting_reason, ranks["demo-g0-0"].last_exit_code) == ("CrashLoopBackOff", 3)


# ------------------------------------------------------------------------------- halted roll
PULL = {"phase": "Pending", "waiting_reason": "ImagePullBackOff", "waiting_message": 'pulling "tpi:nope"'}
CRASH = {"waiting_reason": "CrashLoopBackOff", "restarts": 1, "exit_code": 3, "termination_reason": "Error"}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (PULL, "ImagePullBackOff"),
        ({"phase": "Pending", "waiting_reason": "ErrImagePull"}, "ErrImagePull"),
        ({"phase": "Pending", "waiting_reason": "CreateContainerConfigError"}, "CreateContainerConfigError"),
        (CRASH, "CrashLoopBackOff"),
    ],
)
def test_bad_template_halts_the_roll_at_the_first_group(changes, reason):
    spec, obs = cluster(pod_changes=changes)
    # group 2 is down too: without the halt it would be "updated at once" to the bad template
    obs = dataclasses.replace(obs, pods=[dataclasses.replace(p, ready=False) if p.group == 2 else p for p in obs.pods])
    actions = rc.plan(spec, obs)
    assert not [a for a in actions if isinstance(a, rc.RollGroup)]
    hold = next(a for a in actions if isinstance(a, rc.Hold))
    assert hold.reason == "RolloutHalted" and "group 0" in hold.message
    assert "pod demo-g0-0" in hold.message and reason in hold.message
    assert not [a for a in actions if isinstance(a, rc.Degrade)]
    st = decide_status(spec, obs, actions)
    cond = conditions(st)
    assert cond["Progressing"].reason == "RolloutHalted" and "pod demo-g0-0" in cond["Progressing"].message
    assert cond["Degraded"].status == "True" and reason in cond["Degraded"].message
    assert st.phase in ("Degraded", "Recovering") and st.ready_replicas == 1  # group 1 serves
    if reason == "CrashLoopBackOff":
        assert "last exit code 3" in cond["Progressing"].message


def test_a_healthy_rolled_group_loading_does_not_halt_and_the_roll_goes_on_when_ready():
    spec, obs = cluster(pod_changes={"phase": "Running"})  # group 0 loads on the new template
    actions = rc.plan(spec, obs)
    assert kinds(actions) == [] and not any(isinstance(a, rc.Hold) for a in actions)
    assert any(isinstance(a, rc.Wait) and a.reason == "RollingUpdate" for a in actions)
    ready = dataclasses.replace(obs, pods=[dataclasses.replace(p, ready=True) for p in obs.pods])
    rolled = [a.group for a in rc.plan(spec, ready) if isinstance(a, rc.RollGroup)]
    assert rolled == [1]


def test_failing_old_template_group_is_healed_in_place_while_the_roll_is_halted():
    spec, obs = cluster(pod_changes=PULL)
    obs = dataclasses.replace(obs, pods=[
        dataclasses.replace(p, restarts=1, exit_code=1, ready=False) if p.group == 1 and p.rank == 2 else p
        for p in obs.pods])  # fmt: skip
    actions = rc.plan(spec, obs)
    recreate = next(a for a in actions if isinstance(a, rc.RecreateGroup))
    assert (recreate.group, recreate.keep_template) == (1, True)
    assert not [a for a in actions if isinstance(a, rc.RollGroup)]
    decision = reconcile.decide(spec, IDENT, obs)
    [(name, patch)] = decision.patch_statefulsets
    labels = patch["spec"]["template"]["metadata"]["labels"]
    assert name == "demo-g1" and patch["metadata"]["annotations"] == {"tpi.dev/incarnation": "1"}
    # the pod-group name follows the incarnation; its count is the StatefulSet's pods
    assert labels == {"tpi.dev/incarnation": "1", "tpi.dev/pod-group": "demo-g1-i1"}
    assert patch["spec"]["template"]["metadata"]["annotations"] == {"tpi.dev/pod-group-total-count": "4"}
    assert "demo-g1" not in [o["metadata"]["name"] for o in decision.apply if o["kind"] == "StatefulSet"]
    # (group 0's pods look stale here only because the test's hash_for is not render's)
    g1 = {d.name: d.grace_seconds for d in decision.delete_pods if d.name.startswith("demo-g1")}
    assert g1 == {f"demo-g1-{r}": reconcile.BROKEN_GROUP_GRACE_SECONDS for r in range(4)}
    assert decision.status.groups[1].incarnation == 1 and decision.status.groups[1].template_hash is None


def test_without_a_hold_a_down_out_of_date_group_is_recreated_on_the_new_template():
    spec, obs = cluster(rolled=())
    obs = dataclasses.replace(
        obs,
        pods=[dataclasses.replace(p, restarts=1, exit_code=1) if p.group == 1 and p.rank == 2 else p for p in obs.pods],
    )
    recreate = next(a for a in rc.plan(spec, obs) if isinstance(a, rc.RecreateGroup))
    assert not recreate.keep_template


# ----------------------------------------------------------- a crash-looping new template
def test_crash_looping_new_template_fails_its_group_and_never_degrades():
    spec = make_spec(replicas=2, failurePolicy={"maxGroupRestarts": 2, "minTensorParallelSize": 1})
    times = [format_time(NOW - dt.timedelta(seconds=s), micro=True) for s in (200, 100)]
    groups = [group(0, restart_times=times, failure_reason="Crash", failing_since=times[0]), group(1)]
    spec, obs = cluster(replicas=2, pod_changes=CRASH, groups=groups, spec=spec)
    actions = rc.plan(spec, obs)
    assert kinds(actions) == ["MarkFailed", "Hold", "Blocked"]  # the roll stays halted at group 0
    failed = actions[0]
    assert failed.group == 0 and failed.reason == "CrashLoopBackOff" and "not degraded" in failed.message
    st = decide_status(spec, obs, actions)
    assert st.groups[0].failed_generation == 1 and st.groups[1].failed_generation is None
    assert st.phase == "Degraded" and st.ready_replicas == 1 and st.current_tensor_parallel_size == 4
    assert "last exit code 3" in conditions(st)["Progressing"].message
    # the same crash loop on a template the group was Ready on is the hardware's: TP degrades
    proven = dataclasses.replace(obs, status=obs.status.model_copy(
        update={"groups": [group(0, ready_hash=NEW, restart_times=times), group(1)]}))  # fmt: skip
    assert kinds(rc.plan(spec, proven))[:1] == ["Degrade"]
    # ...and so is one on a size recovery picked for a spec some group was Ready on (a degrade
    # went on crashing): the degrade ladder goes on, it is not a bad rollout
    resized = dataclasses.replace(obs, status=obs.status.model_copy(update={"ready_spec": rc.spec_digest(obs)}))
    assert kinds(rc.plan(spec, resized))[:1] == ["Degrade"]


def test_a_group_ready_on_the_current_spec_proves_it():
    spec, obs = cluster(replicas=2, rolled=(0, 1))
    obs = dataclasses.replace(obs, pods=[dataclasses.replace(p, ready=True) if p.group == 0 else p
                                         for p in obs.pods])  # fmt: skip
    st = decide_status(spec, obs, rc.plan(spec, obs))
    assert st.ready_spec == rc.spec_digest(obs) and st.groups[0].ready_hash == NEW
    assert st.groups[1].ready_hash == OLD  # group 1 was Ready on the old one only
    old_only = cluster(replicas=2, rolled=(0,))[1]
    assert decide_status(spec, old_only, []).ready_spec is None  # Ready on an old template proves nothing new


# ---------------------------------------------------------------------------- the deadline
@pytest.mark.parametrize(
    ("age", "updated", "expected"),
    [
        (599, 0, None),  # within progressDeadlineSeconds (default 600)
        (601, 0, "ProgressDeadlineExceeded"),
        (601, 1, None),  # one more group became Ready since: progress, the clock restarts
    ],
)
def test_progress_deadline(age, updated, expected):
    spec, obs = cluster(rolled=(0,), pod_changes={"phase": "Running"})
    assert spec.update_strategy.progress_deadline_seconds == 600
    key = rollout.key_of(dict.fromkeys(range(3), NEW))
    rec = RolloutStatus(key=key, progress_at=format_time(NOW - dt.timedelta(seconds=age), micro=True))
    if updated:  # group 1 rolled out meanwhile
        obs = dataclasses.replace(obs, statefulsets={**obs.statefulsets, 1: StsObs(1, 4, NEW)},
                                  pods=[dataclasses.replace(p, template_hash=NEW) if p.group == 1 else p
                                        for p in obs.pods])  # fmt: skip
    obs = dataclasses.replace(obs, status=obs.status.model_copy(update={"rollout": rec}))
    actions = rc.plan(spec, obs)
    hold = next((a for a in actions if isinstance(a, rc.Hold)), None)
    assert (hold.reason if hold else None) == expected
    st = decide_status(spec, obs, actions)
    if expected:
        assert not [a for a in actions if isinstance(a, rc.RollGroup)]
        cond = conditions(st)["Progressing"]
        assert cond.status == "False" and "halted at group 0: demo-g0-0 Running (not Ready)" in cond.message
        assert st.rollout == rec  # the clock stays: only progress or a new spec moves it
    else:
        wait = next(a for a in actions if isinstance(a, rc.Wait) and a.reason == "ProgressDeadline")
        assert wait.until > NOW
    if updated:
        assert st.rollout.updated_ready == 1 and st.rollout.progress_at == format_time(NOW, micro=True)


def test_a_spec_change_resumes_a_stalled_roll():
    spec, obs = cluster(rolled=(0,), pod_changes=PULL)
    key = rollout.key_of(dict.fromkeys(range(3), NEW))
    old = RolloutStatus(key=key, progress_at=format_time(NOW - dt.timedelta(hours=1)))
    obs = dataclasses.replace(obs, status=obs.status.model_copy(update={"rollout": old}), generation=2,
                              hash_for=lambda tp, b: OLD)  # rolled back to the good template  # fmt: skip
    actions = rc.plan(spec, obs)
    assert not any(isinstance(a, rc.Hold) for a in actions)
    assert [(a.group, a.template_hash) for a in actions if isinstance(a, rc.RollGroup)] == [(0, OLD)]
    assert rc.transition(spec, obs, actions).rollout.key != old.key


def test_rollout_clock():
    t = NOW
    first = rollout.track(None, "k", 0, False, t)
    assert first.progress_at == format_time(t, micro=True)
    assert rollout.track(first, "k", 0, False, t + dt.timedelta(seconds=5)) == first
    assert rollout.track(first, "k", 1, False, t + dt.timedelta(seconds=5)).updated_ready == 1
    assert rollout.track(first, "k2", 0, False, t + dt.timedelta(seconds=5)).key == "k2"
    assert rollout.track(first, "k", 3, True, t) is None


# ----------------------------------------------------------------------------------- paused
def test_paused_rolls_nothing_but_still_creates_and_heals():
    spec = make_spec(replicas=3, updateStrategy={"paused": True})
    spec, obs = cluster(rolled=(), spec=spec)
    stses = dict(obs.statefulsets)
    del stses[2]  # a new group (scale-up) is created even while paused
    obs = dataclasses.replace(obs, statefulsets=stses, pods=[
        dataclasses.replace(p, restarts=1, exit_code=1) if p.group == 1 and p.rank == 0 else p
        for p in obs.pods if p.group != 2])  # fmt: skip
    actions = rc.plan(spec, obs)
    assert [(a.kind, a.group) for a in actions if isinstance(a, rc.RollGroup | rc.RecreateGroup)] == [
        ("RecreateGroup", 1), ("RollGroup", 2)]  # fmt: skip
    assert next(a for a in actions if isinstance(a, rc.RecreateGroup)).keep_template
    hold = next(a for a in actions if isinstance(a, rc.Hold))
    assert hold.reason == "RolloutPaused" and not any(isinstance(a, rc.Blocked) for a in actions)
    st = decide_status(spec, obs, actions)
    cond = conditions(st)["Progressing"]
    assert (cond.status, cond.reason) == ("False", "RolloutPaused")
    assert st.rollout is None  # a pause is not a stall: no deadline runs
    # unpaused: the roll goes on
    spec = make_spec(replicas=3)
    _, obs = cluster(rolled=(), spec=spec)
    assert [a.group for a in rc.plan(spec, obs) if isinstance(a, rc.RollGroup)] == [0]


# ------------------------------------------------------------------------- Failed per group
def test_a_failed_group_does_not_freeze_the_others():
    spec = make_spec(replicas=2)
    groups = [group(0), group(1, failed_generation=1, failure_reason="OOMAtBatchFloor", failure_message="oom")]
    spec, obs = cluster(replicas=2, rolled=(), groups=groups, spec=spec)
    # both crash; group 1's pods are not Ready (its crash loop goes on, left alone)
    pods = [dataclasses.replace(p, restarts=1, exit_code=1) if p.rank == 1 else p for p in obs.pods]
    pods = [dataclasses.replace(p, ready=False) if p.group == 1 else p for p in pods]
    obs = dataclasses.replace(obs, pods=pods, hash_for=lambda tp, b: OLD)
    actions = rc.plan(spec, obs)
    assert [(a.kind, a.group) for a in actions if a.kind != "Wait"] == [("RecreateGroup", 0)]
    decision = reconcile.decide(spec, IDENT, obs)
    assert {d.name for d in decision.delete_pods} == {f"demo-g0-{r}" for r in range(4)}  # group 1: kept
    assert decision.status.phase == "Recovering"
    # group 0 Ready again: the cluster serves, Degraded because group 1 is Failed
    healthy = dataclasses.replace(obs, pods=[p for p in obs.pods if p.group == 1] + healthy_pods(0))
    st = decide_status(spec, healthy, rc.plan(spec, healthy))
    assert st.phase == "Degraded" and st.ready_replicas == 1
    assert conditions(st)["Degraded"].reason == "GroupFailed" and "group 1 Failed: OOMAtBatchFloor" in conditions(
        st)["Degraded"].message  # fmt: skip
    # a new generation retries group 1 alone
    retry = rc.plan(spec, dataclasses.replace(healthy, generation=2))
    reset = next(a for a in retry if isinstance(a, rc.Reset))
    assert reset.group == 1
    assert rc.transition(spec, dataclasses.replace(healthy, generation=2), retry).groups[1].failed_generation is None


def test_repeated_oom_at_the_floor_fails_that_group_only():
    spec = make_spec(replicas=2, runtime={"maxBatchSize": 8}, failurePolicy={"oomBatchSizeFloor": 8})
    groups = [group(0), group(1, floor_ooms=1)]
    spec, obs = cluster(replicas=2, rolled=(), groups=groups, spec=spec)
    pods = [dataclasses.replace(p, termination_reason="OOMKilled", exit_code=137, restarts=1, ready=False)
            if p.group == 1 else p for p in obs.pods]  # fmt: skip
    obs = dataclasses.replace(obs, pods=pods, hash_for=lambda tp, b: OLD)
    actions = rc.plan(spec, obs)
    assert [(a.kind, a.group, a.reason) for a in actions if a.kind != "Wait"] == [
        ("MarkFailed", 1, "OOMAtBatchFloor")]  # fmt: skip
    st = decide_status(spec, obs, actions)
    assert st.phase == "Degraded" and st.ready_replicas == 1 and st.current_tensor_parallel_size == 4
    # ...and when every group has failed, the cluster is Failed (and a new spec starts it over)
    both = [group(0, failed_generation=1, failure_reason="OOMAtBatchFloor", failure_message="oom"), st.groups[1]]
    obs = dataclasses.replace(obs, status=st.model_copy(update={"groups": both}))
    final = decide_status(spec, obs, rc.plan(spec, obs))
    assert final.phase == "Failed" and conditions(final)["Ready"].status == "False"
    retry = rc.plan(spec, dataclasses.replace(obs, generation=2))
    assert kinds(retry)[:1] == ["Reset"] and retry[0].group is None


def test_all_failed_decision_touches_nothing():
    spec = make_spec(replicas=1)
    groups = [group(0, failed_generation=1, failure_reason="CrashLoopBackOff", failure_message="bad")]
    spec, obs = cluster(replicas=1, rolled=(0,), pod_changes=CRASH, groups=groups, spec=spec)
    decision = reconcile.decide(spec, IDENT, obs)
    assert decision.status.phase == "Failed" and not decision.delete_pods and not decision.patch_statefulsets
    assert "bad" in conditions(decision.status)["Degraded"].message


def test_hold_event_is_posted_once():
    spec, obs = cluster(pod_changes=PULL)
    first = reconcile.decide(spec, IDENT, obs)
    assert [e.reason for e in first.events if e.type == "Warning"] == ["RolloutHalted"]
    again = reconcile.decide(spec, IDENT, dataclasses.replace(obs, status=first.status))
    assert "RolloutHalted" not in [e.reason for e in again.events]


def test_paused_with_nothing_out_of_date_holds_nothing_but_still_explains_a_bad_template():
    spec = make_spec(replicas=2, updateStrategy={"paused": True})
    spec, obs = cluster(replicas=2, rolled=(), spec=spec)
    obs = dataclasses.replace(obs, hash_for=lambda tp, b: OLD)  # every group up to date
    assert not any(isinstance(a, rc.Hold) for a in rc.plan(spec, obs))
    spec, bad = cluster(replicas=2, rolled=(0, 1), pod_changes=PULL, spec=spec)  # a first deploy that cannot pull
    hold = next(a for a in rc.plan(spec, bad) if isinstance(a, rc.Hold))
    assert hold.reason == "RolloutHalted" and "ImagePullBackOff" in hold.message
