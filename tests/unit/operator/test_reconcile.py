"""core.reconcile.decide: what the shell is told to apply and delete."""

from __future__ import annotations

import dataclasses

from op_builders import IDENT, NOW, healthy_pods, make_obs, make_spec
from tpi_operator.api.v1alpha1 import GroupStatus, TPInferenceClusterStatus
from tpi_operator.core import reconcile, render
from tpi_operator.core.observe import LeaseObs, StsObs


def real_obs(spec, **kw):
    obs = make_obs(spec, **kw)
    return dataclasses.replace(obs, hash_for=reconcile.hash_function(spec, IDENT, None))


def test_fresh_cluster_creates_everything():
    spec = make_spec(replicas=2)
    obs = dataclasses.replace(real_obs(spec), pods=[], statefulsets={})
    d = reconcile.decide(spec, IDENT, obs)
    kinds = [o["kind"] for o in d.apply]
    assert kinds.count("StatefulSet") == 2 and kinds.count("Lease") == 8
    assert {"ServiceAccount", "Role", "RoleBinding", "Service"} <= set(kinds)
    role = next(o for o in d.apply if o["kind"] == "Role")
    leases = sorted(o["metadata"]["name"] for o in d.apply if o["kind"] == "Lease")
    assert role["rules"][0]["resourceNames"] == leases  # exactly this cluster's Leases
    assert kinds.index("Role") < kinds.index("StatefulSet")  # granted before any rank starts
    assert d.delete_pods == [] and d.status.phase == "Pending"
    assert d.wake_after <= 2.0  # busy while starting


def test_recreate_deletes_every_pod_of_the_group():
    spec = make_spec()
    base = real_obs(spec)
    want = base.hash_for(4, 8)
    pods = [dataclasses.replace(p, template_hash=want) for p in healthy_pods()]
    pods[1] = dataclasses.replace(pods[1], restarts=1, exit_code=1)
    sts = {0: StsObs(group=0, replicas=4, template_hash=want)}
    status = TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4,
                                      groups=[GroupStatus(group=0)])  # fmt: skip
    d = reconcile.decide(spec, IDENT, dataclasses.replace(base, pods=pods, statefulsets=sts, status=status))
    assert [a.kind for a in d.actions if a.kind != "Wait"] == ["RecreateGroup"]
    assert sorted(d.delete_pods, key=lambda x: x.name) == [
        reconcile.PodDelete(f"demo-g0-{r}", f"u0-{r}-0", reconcile.BROKEN_GROUP_GRACE_SECONDS) for r in range(4)
    ]  # a broken group serves nothing: short grace; uid preconditions guard replacements
    assert [e.reason for e in d.events] == ["RecreateGroup"] and d.events[0].type == "Normal"
    applied = next(o for o in d.apply if o["kind"] == "StatefulSet")
    assert applied["spec"]["template"]["metadata"]["labels"][render.L_INCARNATION] == "1"
    assert d.status.phase == "Recovering" and d.status.restarts == 1


def test_degrade_removes_surplus_leases():
    spec = make_spec(failurePolicy={"scaleBackUp": False})
    base = real_obs(spec)
    status = TPInferenceClusterStatus(current_tensor_parallel_size=2, desired_tensor_parallel_size=4,
                                      groups=[GroupStatus(group=0)])  # fmt: skip
    want = base.hash_for(2, 8)
    pods = [dataclasses.replace(p, template_hash=want) for p in healthy_pods(tp=2)]
    sts = {0: StsObs(group=0, replicas=2, template_hash=want)}
    leases = {f"demo-g0-{r}": LeaseObs(f"demo-g0-{r}") for r in range(4)}
    obs = dataclasses.replace(base, pods=pods, statefulsets=sts, status=status, leases=leases)
    d = reconcile.decide(spec, IDENT, obs)
    assert d.delete_leases == ["demo-g0-2", "demo-g0-3"]
    assert d.status.phase == "Degraded" and d.status.tp == "2/4"


def _settled(spec, obs):
    """obs with every Lease as the operator renders it (nothing left to apply)."""
    leases = {}
    for g in range(spec.replicas):
        for r in range(obs.statefulsets[g].replicas):
            lease = render.lease(spec, IDENT, g, r)
            name = lease["metadata"]["name"]
            leases[name] = LeaseObs(name, annotations=lease["metadata"]["annotations"])
    return dataclasses.replace(obs, leases=leases)


def test_stuck_cluster_sleeps_until_an_event_or_deadline():
    # Blocked: ranks unschedulable, nothing smaller fits. Nothing to change, so no polling.
    spec = make_spec(failurePolicy={"unschedulableTimeoutSeconds": 0, "minTensorParallelSize": 4})
    base = real_obs(spec)
    want = base.hash_for(4, 8)
    pods = [dataclasses.replace(p, template_hash=want, phase="Pending", ready=False, node=None,
                                unschedulable_since=NOW, unschedulable_message="0/4 nodes")
            for p in healthy_pods()]  # fmt: skip
    sts = {0: StsObs(group=0, replicas=4, template_hash=want, object_hash=None)}
    status = TPInferenceClusterStatus(current_tensor_parallel_size=4, desired_tensor_parallel_size=4,
                                      groups=[GroupStatus(group=0, template_hash=want)])  # fmt: skip
    obs = _settled(spec, dataclasses.replace(base, pods=pods, statefulsets=sts, status=status, free_rank_slots=0))
    applied_sts = render.statefulset(spec, IDENT, reconcile.settings_for(spec, status, 0, None))
    sts = {0: dataclasses.replace(sts[0], object_hash=applied_sts["metadata"]["annotations"][render.A_OBJECT_HASH])}
    d = reconcile.decide(spec, IDENT, dataclasses.replace(obs, statefulsets=sts), idle_seconds=30, busy_seconds=2)
    assert "Blocked" in [a.kind for a in d.actions] and d.status.phase == "Degraded"
    assert not [o for o in d.apply if o["kind"] in ("StatefulSet", "Lease")] and not d.delete_pods
    assert d.wake_after == 30


def test_changing_something_rechecks_soon():
    spec = make_spec()
    obs = dataclasses.replace(real_obs(spec), pods=[], statefulsets={})
    assert reconcile.decide(spec, IDENT, obs, idle_seconds=30, busy_seconds=2).wake_after == 2


def test_objects_of_our_names_owned_by_others_are_left_alone_and_reported():
    spec = make_spec()
    obs = dataclasses.replace(real_obs(spec), pods=[], statefulsets={},
                              foreign={("Service", "demo"): "(not owned by this cluster)"})  # fmt: skip
    d = reconcile.decide(spec, IDENT, obs)
    assert ("Service", "demo") not in {(o["kind"], o["metadata"]["name"]) for o in d.apply}  # never adopted
    assert ("Service", "demo-ranks") in {(o["kind"], o["metadata"]["name"]) for o in d.apply}
    degraded = next(c for c in d.status.conditions if c.type == "Degraded")
    assert degraded.reason == "Conflict" and "Service demo (not owned by this cluster)" in degraded.message
    assert [e.reason for e in d.events if e.type == "Warning"] == ["Conflict"]
    # reported once: the next pass (same conflict, already in status) posts no new Event
    again = reconcile.decide(spec, IDENT, dataclasses.replace(obs, status=d.status))
    assert "Conflict" not in [e.reason for e in again.events]


def test_a_pass_renders_each_template_hash_once(monkeypatch):
    """decide compares every group with the template it should run, several times a pass: the
    pod template behind a (tp, batch) is rendered once per pass, not once per question."""
    rendered: list[tuple[int, int]] = []
    real = render.template_hash

    def counting(spec, ident, gs):
        rendered.append((gs.tp, gs.batch))
        return real(spec, ident, gs)

    monkeypatch.setattr(render, "template_hash", counting)
    spec = make_spec(replicas=3)
    obs = real_obs(spec)
    reconcile.decide(spec, IDENT, obs)
    assert rendered and len(rendered) == len(set(rendered))
    assert obs.hash_for(4, 8) == real(spec, IDENT, render.GroupSettings(group=0, tp=4, batch=8, restarted_at=None))
