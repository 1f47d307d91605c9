"""Table tests of the pure core for issue #10's faults: a lost node, OOM per group, heartbeat
clocks without spinning, and grow-back without flapping (a 10-minute soak in simulated time)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pydantic
import pytest
from op_builders import IDENT, NOW, hash_for, healthy_pods, make_obs, make_spec
from tpi_contract import defaults
from tpi_operator.api.v1alpha1 import GroupStatus, TPInferenceClusterSpec, TPInferenceClusterStatus
from tpi_operator.core import heartbeat, observe, reconcile, render
from tpi_operator.core import recovery as rc
from tpi_operator.core.observe import LeaseObs, NodeObs, format_time, node_obs


def kinds(actions):
    return [a.kind for a in actions if a.kind != "Wait"]


def status(replicas=1, tp=4, **group):
    group.setdefault("ready_hash", hash_for(tp, 8))  # every group ran (was Ready on) its template
    return TPInferenceClusterStatus(
        current_tensor_parallel_size=tp,
        desired_tensor_parallel_size=4,
        groups=[GroupStatus(group=g, **group) for g in range(replicas)],
    )


# ------------------------------------------------------------------------------- a lost node
def lost(seconds: float, why: str = "is unreachable (Ready Unknown)") -> NodeObs:
    return NodeObs("node-1", lost_since=NOW - dt.timedelta(seconds=seconds), why=why)


@pytest.mark.parametrize(
    ("node", "terminating", "expected"),
    [
        (NodeObs("node-1"), False, []),  # healthy
        (NodeObs("node-1"), True, []),  # merely Terminating on a healthy node: left alone
        (lost(30), False, []),  # within nodeLostTimeoutSeconds (default 60): wait
        (lost(30), True, []),  # evicted already (Terminating forever): still just wait, no PodDeleted
        (lost(61), False, ["ForceDelete", "RecreateGroup"]),
        (lost(61), True, ["ForceDelete", "RecreateGroup"]),
        (lost(61, "was deleted"), False, ["ForceDelete", "RecreateGroup"]),
    ],
)
def test_node_lost_table(node, terminating, expected):
    spec = make_spec()
    assert spec.failure_policy.node_lost_timeout_seconds == 60  # the default is what is tested
    pods = healthy_pods()
    pods[1] = dataclasses.replace(pods[1], deleting=terminating, ready=False)
    obs = make_obs(spec, pods=pods, status=status(), nodes={"node-1": node, "node-0": NodeObs("node-0")})
    actions = rc.plan(spec, obs)
    assert kinds(actions) == expected
    if not expected and node.lost_since is not None:
        wait = next(a for a in actions if isinstance(a, rc.Wait) and a.reason == "NodeLost")
        assert wait.until == node.lost_since + dt.timedelta(seconds=60)
        assert "node-1" in wait.message
    if expected:
        force, recreate = actions[0], actions[1]
        assert force.pods == (("demo-g0-1", "u0-1-0"),) and force.node == "node-1"
        assert recreate.reason == "NodeLost" and "node-1" in recreate.message


def test_node_lost_force_deletes_with_grace_0_and_does_not_count_as_a_crash():
    spec = make_spec()
    base = make_obs(spec)
    obs = dataclasses.replace(base, hash_for=reconcile.hash_function(spec, IDENT, None))
    want = obs.hash_for(4, 8)
    pods = [dataclasses.replace(p, template_hash=want) for p in healthy_pods()]
    pods[1] = dataclasses.replace(pods[1], deleting=True)  # evicted, Terminating forever
    sts = {0: dataclasses.replace(base.statefulsets[0], template_hash=want)}
    obs = dataclasses.replace(obs, pods=pods, statefulsets=sts, status=status(), nodes={"node-1": lost(90)})
    d = reconcile.decide(spec, IDENT, obs)
    # the lost node's pod goes first (before the status write), with grace 0, after the group's
    # StatefulSet of the new incarnation (its replacement is made from that); the rest drain briefly
    assert [(p.name, p.grace_seconds) for p in d.force_delete_pods] == [("demo-g0-1", 0)]
    assert [o["metadata"]["name"] for o in d.apply_first] == ["demo-g0"]
    assert d.apply_first[0]["spec"]["template"]["metadata"]["labels"]["tpi.dev/incarnation"] == "1"
    assert not [o for o in d.apply if o["kind"] == "StatefulSet"]
    grace = {p.name: p.grace_seconds for p in d.delete_pods}
    assert grace == {"demo-g0-0": 5, "demo-g0-2": 5, "demo-g0-3": 5}
    g = d.status.groups[0]
    assert g.restart_times == [] and g.incarnation == 1  # no restart budget used
    assert g.failure_reason == "NodeLost" and g.lost_node == "node-1"
    progressing = next(c for c in d.status.conditions if c.type == "Progressing")
    assert "node-1" in progressing.message
    warnings = [e for e in d.events if e.type == "Warning"]
    assert {e.reason for e in warnings} == {"ForceDelete", "RecreateGroup"}
    assert all("node-1" in e.message for e in warnings)
    # the next pass: the old pod is still there (Terminating) on the lost node -> force-deleted
    # again, but the group is not recreated a second time
    again = dataclasses.replace(obs, status=d.status)
    assert kinds(rc.plan(spec, again)) == ["ForceDelete"]


def apply_merge_patch(target: object, patch: object) -> object:
    """RFC 7386, as the API server applies a merge patch (the test's own, independent of render)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 3}}, {}),
        ({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5, "d": 3}}, {"b": {"c": 5}}),
        ({"a": 1, "b": {"c": 2}}, {"b": {"c": 2, "e": 4}}, {"a": None, "b": {"e": 4}}),
        ({"l": [1, 2, {"x": 1}]}, {"l": [1, 2, {"x": 2}]}, {"l": [1, 2, {"x": 2}]}),  # lists whole
        ({"m": {"k": "v"}}, {"m": "scalar"}, {"m": "scalar"}),
    ],
)
def test_merge_patch_is_the_rfc_7386_difference(old: dict, new: dict, patch: dict) -> None:
    assert render.merge_patch(old, new) == patch
    assert apply_merge_patch(old, patch) == new


def test_a_recreate_of_an_unchanged_statefulset_is_a_small_merge_patch_not_a_whole_apply():
    """A lost node's 43 groups each re-applying a whole StatefulSet cost the API server twice the
    CPU of a merge patch while their deletes waited: when the running StatefulSet is our rendering
    at the previous incarnation (its object hash), the recreate patches the difference."""
    spec = make_spec()
    old = render.statefulset(spec, IDENT, render.GroupSettings(group=0, tp=4, batch=8, incarnation=0))
    base = make_obs(spec)
    obs = dataclasses.replace(base, hash_for=reconcile.hash_function(spec, IDENT, None))
    want = obs.hash_for(4, 8)
    pods = [dataclasses.replace(p, template_hash=want) for p in healthy_pods()]
    running = observe.sts_obs(old)
    assert running is not None and running.template_hash == want
    obs = dataclasses.replace(obs, pods=pods, statefulsets={0: running}, status=status(), nodes={"node-1": lost(90)})
    d = reconcile.decide(spec, IDENT, obs)
    assert [p.name for p in d.force_delete_pods] == ["demo-g0-1"]
    assert not [o for o in [*d.apply_first, *d.apply] if o["kind"] == "StatefulSet"]
    [(name, patch)] = d.patch_statefulsets
    new = render.statefulset(spec, IDENT, render.GroupSettings(group=0, tp=4, batch=8, incarnation=1))
    assert name == "demo-g0" and apply_merge_patch(old, patch) == new
    assert set(patch) == {"metadata", "spec"} and set(patch["spec"]) == {"template"}
    assert set(patch["spec"]["template"]) == {"metadata"}  # labels and annotations, never the pod spec
    # the next pass sees the patched object: nothing more to write
    again = dataclasses.replace(obs, status=d.status, statefulsets={0: observe.sts_obs(new)})
    assert not reconcile.decide(spec, IDENT, again).patch_statefulsets

    # anything else changed as well (here the image: a roll): the whole object is applied
    rolled = make_spec(image="example.com/tpi-runtime:other")
    obs = dataclasses.replace(obs, hash_for=reconcile.hash_function(rolled, IDENT, None))
    d = reconcile.decide(rolled, IDENT, obs)
    assert not d.patch_statefulsets
    assert [o["metadata"]["name"] for o in d.apply_first] == ["demo-g0"]


def whole_group_on(node: str, spec: TPInferenceClusterSpec) -> tuple[reconcile.Decision, observe.Observation]:
    """Every rank of group 0 on ``node`` (lost 90 s ago), its StatefulSet our own rendering."""
    running = observe.sts_obs(render.statefulset(spec, IDENT, render.GroupSettings(group=0, tp=4, batch=8)))
    assert running is not None
    pods = [dataclasses.replace(p, template_hash=running.template_hash, node=node) for p in healthy_pods()]
    obs = make_obs(spec, pods=pods, status=status(), nodes={node: lost(90)})
    obs = dataclasses.replace(obs, hash_for=reconcile.hash_function(spec, IDENT, None), statefulsets={0: running})
    return reconcile.decide(spec, IDENT, obs), obs


def test_a_group_wholly_on_the_lost_node_comes_back_without_a_statefulset_write():
    """No pod of the group is left to tell its replacements from: it keeps its incarnation and its
    StatefulSet, whose controller re-creates the pods.  A node's death then costs the API server no
    StatefulSet write, ControllerRevision or StatefulSet status per group ahead of the deletes."""
    spec = make_spec()
    d, obs = whole_group_on("node-1", spec)
    assert [(p.name, p.grace_seconds) for p in d.force_delete_pods] == [(f"demo-g0-{r}", 0) for r in range(4)]
    assert not d.apply_first and not d.patch_statefulsets and not d.delete_pods
    assert not [o for o in d.apply if o["kind"] == "StatefulSet"]
    [recreate] = [a for a in d.actions if isinstance(a, rc.RecreateGroup)]
    assert not recreate.new_incarnation and "rank(s) 0, 1, 2, 3" in recreate.message
    g = d.status.groups[0]
    assert g.incarnation == 0 and g.pod_uids == [] and g.restart_times == []
    assert g.failure_reason == "NodeLost" and g.lost_node == "node-1"
    assert {e.reason for e in d.events if e.type == "Warning"} == {"ForceDelete", "RecreateGroup"}

    # A pod that outlives its force delete (a finalizer) is deleted again, not a second loss.
    again = dataclasses.replace(obs, status=d.status)
    assert kinds(rc.plan(spec, again)) == ["ForceDelete"]
    # The replacements, same incarnation, on a living node: a group coming up, not a failure.
    fresh = [dataclasses.replace(p, uid=f"new-{p.rank}", node="node-9", phase="Pending", ready=False)
             for p in obs.pods]  # fmt: skip
    later = dataclasses.replace(again, pods=fresh, nodes={"node-9": NodeObs("node-9")})
    d2 = reconcile.decide(spec, IDENT, later)
    assert not [a for a in d2.actions if isinstance(a, rc.RecreateGroup)]
    assert not d2.delete_pods and not d2.force_delete_pods and not d2.patch_statefulsets
    # ... and once they serve, a later loss of their node is a new loss, recorded again.
    serving = [dataclasses.replace(p, phase="Running", ready=True) for p in fresh]
    ready = reconcile.decide(spec, IDENT, dataclasses.replace(later, pods=serving)).status
    assert ready.groups[0].failing_since is None
    gone = dataclasses.replace(later, pods=serving, status=ready, nodes={"node-9": lost(61)})
    assert kinds(rc.plan(spec, gone)) == ["ForceDelete", "RecreateGroup"]


@pytest.mark.parametrize(
    "scheduling",
    [
        {"kueue": {"queueName": "gpus"}},  # Kueue admits each incarnation's pod group once
        {"podGroup": {"nameLabels": ["scheduling.x-k8s.io/pod-group"]}},
        {"schedulerName": "volcano"},
    ],
)
def test_a_gang_scheduled_group_gets_a_new_pod_group_even_when_wholly_lost(scheduling):
    spec = make_spec(scheduling=scheduling)
    d, _ = whole_group_on("node-1", spec)
    [recreate] = [a for a in d.actions if isinstance(a, rc.RecreateGroup)]
    assert recreate.new_incarnation and d.status.groups[0].incarnation == 1
    [(name, patch)] = d.patch_statefulsets
    assert name == "demo-g0" and patch["spec"]["template"]["metadata"]["labels"]["tpi.dev/incarnation"] == "1"


def test_a_rank_elsewhere_makes_the_lost_nodes_group_a_new_incarnation():
    """A rank of the incarnation not on the lost node (here Pending, on no node) must be told apart
    from the replacements: the group is recreated in a new incarnation, as before."""
    spec = make_spec()
    d, obs = whole_group_on("node-1", spec)
    pods = [*obs.pods[:3], dataclasses.replace(obs.pods[3], node=None, phase="Pending", ready=False)]
    d = reconcile.decide(spec, IDENT, dataclasses.replace(obs, pods=pods))
    [recreate] = [a for a in d.actions if isinstance(a, rc.RecreateGroup)]
    assert recreate.new_incarnation and d.status.groups[0].incarnation == 1
    assert [p.name for p in d.force_delete_pods] == ["demo-g0-0", "demo-g0-1", "demo-g0-2"]
    assert [p.name for p in d.delete_pods] == ["demo-g0-3"] and d.patch_statefulsets


def test_node_lost_budget_untouched_even_at_the_limit():
    spec = make_spec(failurePolicy={"maxGroupRestarts": 1})
    times = [format_time(NOW - dt.timedelta(seconds=30), micro=True)]
    obs = make_obs(spec, status=status(restart_times=times), nodes={"node-1": lost(61)})
    assert kinds(rc.plan(spec, obs)) == ["ForceDelete", "RecreateGroup"]  # no Degrade


@pytest.mark.parametrize(
    ("raw", "lost_since", "why"),
    [
        ({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, None, ""),
        (
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "Unknown",
                            "reason": "NodeStatusUnknown",
                            "lastTransitionTime": "2025-01-01T11:59:00Z",
                        }
                    ]
                }
            },
            NOW - dt.timedelta(seconds=60),
            "is unreachable (Ready Unknown): NodeStatusUnknown",
        ),
        (
            {
                "status": {
                    "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "2025-01-01T11:59:30Z"}]
                }
            },
            NOW - dt.timedelta(seconds=30),
            "is NotReady",
        ),
        (None, NOW, "was deleted"),
    ],
)
def test_node_obs(raw, lost_since, why):
    node = node_obs("n", raw, NOW)
    assert (node.lost_since, node.why) == (lost_since, why)


# ---------------------------------------------------------------------------- OOM per group
def test_oom_halves_only_that_group_and_a_spec_change_resets_it():
    spec = make_spec(replicas=2)
    pods = healthy_pods(0) + healthy_pods(1)
    pods[1] = dataclasses.replace(pods[1], termination_reason="OOMKilled", exit_code=137, restarts=1)
    obs = make_obs(spec, pods=pods, status=status(replicas=2))
    actions = rc.plan(spec, obs)
    assert kinds(actions) == ["HalveBatch", "RecreateGroup"]  # group 1 is neither halved nor rolled
    st = rc.transition(spec, obs, actions)
    assert [g.max_batch_size for g in st.groups] == [4, None]
    assert rc.group_batch(spec, st, 0, None) == 4 and rc.group_batch(spec, st, 1, None) == 8
    assert st.groups[0].template_hash == "h4-4"
    # an edit of maxBatchSize resets the halving (and rolls group 0 back to the full batch)
    edited = make_spec(replicas=2, runtime={"maxBatchSize": 16})
    assert rc.group_batch(edited, st, 0, None) == 16
    # so does tpi.dev/restartedAt
    assert rc.group_batch(spec, st, 0, "2025-01-01T00:00:00Z") == 8
    healed = make_obs(spec, status=st, restarted_at="2025-01-01T00:00:00Z")
    assert rc.transition(spec, healed, []).groups[0].max_batch_size is None


def test_oom_never_degrades_tp_even_past_the_restart_budget():
    spec = make_spec(failurePolicy={"maxGroupRestarts": 1, "backoffSeconds": 0})
    times = [format_time(NOW - dt.timedelta(seconds=30), micro=True)]
    pods = healthy_pods()
    pods[0] = dataclasses.replace(pods[0], termination_reason="OOMKilled", restarts=1)
    obs = make_obs(spec, pods=pods, status=status(restart_times=times))
    assert kinds(rc.plan(spec, obs)) == ["HalveBatch", "RecreateGroup"]


# ----------------------------------------------------------------------------- heartbeats
T0 = NOW - dt.timedelta(minutes=1)
S = dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("prev", "renew", "started", "expected"),
    [
        # first sight (operator restart): counts from now only if this container renewed it
        (None, NOW - 3 * S, NOW - 60 * S, NOW),
        (None, NOW - 300 * S, NOW - 60 * S, None),  # a leftover
        (None, NOW - 59.5 * S, NOW - 60 * S, None),  # within the start's whole-second truncation
        (None, NOW - 3 * S, None, None),  # no start time: cannot tell
        # same pod, renewTime moved: the operator's time of seeing it
        (heartbeat.Seen("u0-0-0", NOW - 9 * S, T0), NOW - 7 * S, None, T0 + 50 * S),
        # same pod, renewTime unchanged: the clock keeps running from the last change
        (heartbeat.Seen("u0-0-0", NOW - 9 * S, T0), NOW - 9 * S, None, T0),
        # a new pod of the same name with the old pod's Lease: does not count (no deadline, no spin)
        (heartbeat.Seen("old-uid", NOW - 9 * S, T0), NOW - 9 * S, NOW - 2 * S, None),
        # ...even when renewed just before the new container started (whole-second start times)
        (heartbeat.Seen("old-uid", NOW - 9 * S, T0), NOW - 1.5 * S, NOW - 2 * S, None),
    ],
)
def test_heartbeat_track(prev, renew, started, expected):
    pod = dataclasses.replace(healthy_pods()[0], started_at=started)
    lease = LeaseObs(pod.name, renew_time=renew, observed_at=T0 + dt.timedelta(seconds=50))
    seen = heartbeat.track({pod.name: prev} if prev else {}, [pod], {pod.name: lease}, NOW)
    assert seen[pod.name].since == expected


def test_skewed_node_clock_neither_fakes_nor_hides_a_hang():
    """renewTime an hour in the future or past: only the operator's own observation times count."""
    spec = make_spec()
    pods = healthy_pods()
    for skew in (dt.timedelta(hours=1), -dt.timedelta(hours=1)):
        prev = {p.name: heartbeat.Seen(p.uid, NOW + skew - dt.timedelta(seconds=4), NOW - dt.timedelta(seconds=12))
                for p in pods}  # fmt: skip
        leases = {p.name: LeaseObs(p.name, renew_time=NOW + skew, observed_at=NOW - dt.timedelta(seconds=2))
                  for p in pods}  # fmt: skip
        seen = heartbeat.track(prev, pods, leases, NOW)
        obs = make_obs(spec, pods=pods, status=status(), leases=heartbeat.with_since(leases, seen))
        actions = rc.plan(spec, obs)
        assert kinds(actions) == []
        assert rc.next_wake(actions, NOW, 300) == pytest.approx(28.1)  # 30 s after it was seen


def test_no_spin_after_a_recreate_while_weights_load():
    """The previous incarnation's Lease must not make the next deadline already past."""
    spec = make_spec()
    pods = [dataclasses.replace(p, ready=False, incarnation=1, uid=f"new-{p.rank}",
                                started_at=NOW - dt.timedelta(seconds=40)) for p in healthy_pods()]  # fmt: skip
    old = {p.name: heartbeat.Seen(f"u0-{p.rank}-0", NOW - dt.timedelta(minutes=2), NOW - dt.timedelta(minutes=2))
           for p in pods}  # fmt: skip
    leases = {p.name: LeaseObs(p.name, renew_time=NOW - dt.timedelta(minutes=2)) for p in pods}
    seen = heartbeat.track(old, pods, leases, NOW)
    obs = make_obs(spec, pods=pods, status=status(incarnation=1), leases=heartbeat.with_since(leases, seen))
    actions = rc.plan(spec, obs)
    assert kinds(actions) == [] and rc.next_wake(actions, NOW, 30) == 30


def test_heartbeat_timeout_below_the_runtime_cadence_is_rejected():
    minimum = defaults.min_heartbeat_timeout_seconds()
    assert minimum == 8  # 3 stalled intervals of 2 s, plus one interval for the last renewal
    base = {"image": "i", "model": {"source": {"pvc": {"claimName": "m"}}}}
    TPInferenceClusterSpec.model_validate({**base, "failurePolicy": {"heartbeatTimeoutSeconds": minimum}})
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 8"):
        TPInferenceClusterSpec.model_validate({**base, "failurePolicy": {"heartbeatTimeoutSeconds": minimum - 1}})


# ------------------------------------------------------------------------------- grow-back
def simulate(total_slots: int, estimate_slots: int, minutes: int = 10) -> list[tuple[float, str]]:
    """Drive plan/transition every 5 s of simulated time over a 2-group cluster (desired TP 4).

    The world: ``total_slots`` ranks fit on the nodes; ranks beyond that stay Pending-unschedulable
    since the size was set; Ready otherwise.  The operator's free-capacity estimate is
    ``estimate_slots`` minus the ranks placed (an upper bound, as core.capacity's is).
    """
    spec = make_spec(replicas=2, failurePolicy={"minTensorParallelSize": 1})
    st = status(replicas=2, tp=4)
    size_since = NOW
    log = []
    for step in range(minutes * 12 + 1):
        now = NOW + dt.timedelta(seconds=5 * step)
        tp = st.current_tensor_parallel_size
        pods, placed = [], 0
        for g in range(2):
            for p in healthy_pods(g, tp, incarnation=st.groups[g].incarnation):
                if placed < total_slots:
                    placed += 1
                    pods.append(p)
                else:
                    pods.append(dataclasses.replace(p, phase="Pending", ready=False, node=None,
                                                    unschedulable_since=size_since))  # fmt: skip
        obs = make_obs(spec, pods=pods, status=st, tp=tp, now=now, free_rank_slots=max(0, estimate_slots - placed))
        actions = rc.plan(spec, obs)
        st = rc.transition(spec, obs, actions)
        for a in actions:
            if isinstance(a, rc.Degrade | rc.ScaleUp):
                log.append(((now - NOW).total_seconds(), a.kind))
                size_since = now
    return log


def test_grow_back_counts_every_group_and_does_not_flap():
    """Capacity for exactly one grown group (6 rank slots, 2 groups of desired TP 4).

    The issue's acceptance is 'at most 1 Degrade and 0 ScaleUp over 10 minutes'; a 10-minute
    integration test is too long for CI, so the soak runs here, in simulated time, through the
    same plan/transition the operator runs (defaults: unschedulableTimeoutSeconds 120,
    scaleBackUpDelaySeconds 60).  Growing back needs 2 groups x 2 more ranks = 4 free slots; only
    2 are free, so it never grows.
    """
    log = simulate(total_slots=6, estimate_slots=6)
    assert [k for _, k in log] == ["Degrade"]


def test_grow_back_that_cannot_hold_backs_off():
    """The estimate says it fits (e.g. affinity the estimate ignores) but it does not: the grow-back
    goes down once, and the next try waits twice as long (hysteresis kept in status)."""
    log = simulate(total_slots=6, estimate_slots=8)
    kinds_ = [k for _, k in log]
    assert kinds_[:4] == ["Degrade", "ScaleUp", "Degrade", "ScaleUp"]
    times = [t for t, _ in log]
    first_wait, second_wait = times[1] - times[0], times[3] - times[2]
    assert first_wait >= 60 and second_wait >= 2 * first_wait
