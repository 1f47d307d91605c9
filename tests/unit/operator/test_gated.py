"""A group whose pods a queue holds behind scheduling gates (Kueue's ``kueue.x-k8s.io/admission``):
observed as gated, never as unschedulable; left alone however long it waits; its status says why;
the rollout's progress deadline does not count the wait (it did: Degraded after 600 s in the queue).

What Kueue really does with such a group is checked by hack/kueue-try.sh (docs/kueue.md)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from op_builders import IDENT, NOW, hash_for, healthy_pods, make_obs, make_spec
from tpi_operator.api.v1alpha1 import GroupStatus, RolloutStatus, TPInferenceClusterStatus
from tpi_operator.core import recovery, rollout, status
from tpi_operator.core.observe import format_time, parse_time, pod_obs

GATE = "kueue.x-k8s.io/admission"


def raw_gated_pod(ordinal: int) -> dict:
    """A rank pod as the apiserver shows it while Kueue's gate holds it (kube-scheduler's condition)."""
    return {
        "metadata": {"name": f"demo-g0-{ordinal}", "uid": f"u{ordinal}",
                     "labels": {"tpi.dev/group": "0", "apps.kubernetes.io/pod-index": str(ordinal)}},
        "spec": {"schedulingGates": [{"name": GATE}]},
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
             "message": "Scheduling is blocked due to non-empty scheduling gates",
             "lastTransitionTime": "2025-01-01T11:00:00Z"}]},
    }  # fmt: skip


def test_a_gated_pod_is_observed_as_gated_not_unschedulable() -> None:
    pod = pod_obs(raw_gated_pod(1))
    assert pod is not None
    assert (pod.scheduling_gates, pod.unschedulable_since, pod.node) == ((GATE,), None, None)
    assert rollout.describe([pod]) == "demo-g0-1 SchedulingGated (not Ready)"


def pending(gated: bool, waited: dt.timedelta) -> list:
    """Group 0's 4 pods, created ``waited`` ago, bound to no node: gated, or unschedulable."""
    since = NOW - waited
    unschedulable = {"unschedulable_since": since, "unschedulable_message": "0/2 nodes are available"}
    changes = {"scheduling_gates": (GATE,)} if gated else unschedulable
    return [
        dataclasses.replace(p, phase="Pending", ready=False, node=None, started_at=None, **changes)
        for p in healthy_pods(0)
    ]


@pytest.mark.parametrize(
    ("gated", "waited", "reason"),
    [
        (True, dt.timedelta(seconds=1), "SchedulingGated"),
        (True, dt.timedelta(hours=2), "SchedulingGated"),  # far past unschedulableTimeoutSeconds
        (False, dt.timedelta(hours=2), "Reconciling"),  # unschedulable: the release rule acts
    ],
)
def test_a_group_waiting_for_admission_is_left_alone_and_says_why(
    gated: bool, waited: dt.timedelta, reason: str
) -> None:
    spec = make_spec(scheduling={"kueue": {"queueName": "team-a"}}, failurePolicy={"minTensorParallelSize": 4})
    st = TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4,
                                  groups=[GroupStatus(group=0)])  # fmt: skip
    obs = make_obs(spec, pods=pending(gated, waited), status=st)
    actions = recovery.plan(spec, obs)
    new, _ = status.compute(spec, IDENT, obs, recovery.transition(spec, obs, actions), actions)
    acted = {(a.kind, a.reason) for a in actions if a.kind != "Wait"}
    conds = {c.type: c for c in new.conditions}
    assert conds["Progressing"].reason == reason
    if gated:
        assert acted == set(), "a queued group is neither released, degraded nor recreated"
        assert conds["Degraded"].status == "False" and new.phase == "Pending"
        assert conds["Progressing"].message.startswith(f"group 0: 4 pod(s) held by scheduling gates ({GATE})")
    else:
        assert ("Blocked", "Unschedulable") in acted  # no smaller size allowed, nothing bound
        assert conds["Degraded"].status == "True"


@pytest.mark.parametrize(
    ("pods", "clock", "hold", "clock_after"),
    [
        # Two hours in Kueue's queue, with a clock an older pass left: no deadline, the clock stops.
        ("gated", dt.timedelta(hours=2), None, None),
        # Admitted (gates gone, weights loading): the clock starts now, not when the pods were created.
        ("admitted", None, None, dt.timedelta(0)),
        # Not gated and stalled for two hours: the deadline holds the roll (the rule still works).
        ("admitted", dt.timedelta(hours=2), "ProgressDeadlineExceeded", dt.timedelta(hours=2)),
    ],
)
def test_the_progress_deadline_never_counts_time_in_a_queue(
    pods: str, clock: dt.timedelta | None, hold: str | None, clock_after: dt.timedelta | None
) -> None:
    spec = make_spec(scheduling={"kueue": {"queueName": "team-a"}})
    key = rollout.key_of({0: hash_for(4, 8)})
    rec = RolloutStatus(key=key, progress_at=format_time(NOW - clock, micro=True)) if clock else None
    st = TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4,
                                  groups=[GroupStatus(group=0)], rollout=rec)  # fmt: skip
    group = pending(gated=True, waited=dt.timedelta(hours=2))
    if pods == "admitted":
        group = [dataclasses.replace(p, scheduling_gates=(), phase="Running", node="n0") for p in group]
    obs = make_obs(spec, pods=group, status=st)
    actions = recovery.plan(spec, obs)
    assert [a.reason for a in actions if isinstance(a, recovery.Hold)] == ([hold] if hold else [])
    after = recovery.transition(spec, obs, actions).rollout
    if clock_after is None:
        assert after is None
    else:
        assert after is not None and parse_time(after.progress_at) == NOW - clock_after
