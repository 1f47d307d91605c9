"""Ranks waiting for a peer that is not there yet (issue 10 item 2), as the operator's core sees them.

The runtime waits for its group without a deadline and renews its Lease only once the group has
formed (docs/contracts.md, "Rendezvous"). So, with the default failure policy, a waiting group is
Running-but-not-Ready ranks with Leases they never renewed, beside a Pending peer: the operator
must neither count that as a crash or a hang nor degrade it, except through the unschedulable
rule (capacity). Simulated reconcile passes every 5 s over 10 minutes, status fed back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from op_builders import NOW, healthy_pods, make_obs, make_spec
from tpi_operator.core import heartbeat as hb
from tpi_operator.core import recovery as rc
from tpi_operator.core.observe import LeaseObs, PodObs

STEP = dt.timedelta(seconds=5)
SOAK = dt.timedelta(minutes=10)


def default_spec(**policy: object):  # type: ignore[no-untyped-def]
    """TP 2 with the default failure policy (make_spec's test policy removed)."""
    spec = make_spec(tensorParallelSize=2)
    return spec.model_copy(update={"failure_policy": type(spec.failure_policy).model_validate(policy)})


def waiting_group(peer: dict[str, object], started: dt.datetime) -> list[PodObs]:
    """Rank 0 Running, not Ready (waiting for rank 1); rank 1 as ``peer`` says."""
    pods = healthy_pods(tp=2)
    waiting = dataclasses.replace(pods[0], ready=False, started_at=started)
    return [waiting, dataclasses.replace(pods[1], ready=False, started_at=None, **peer)]


def leftover_leases(pods: list[PodObs], started: dt.datetime) -> dict[str, LeaseObs]:
    """The previous incarnation renewed these Leases; the waiting rank has not (yet)."""
    return {p.name: LeaseObs(p.name, renew_time=started - dt.timedelta(minutes=1)) for p in pods}


def soak(spec, pods: list[PodObs], leases: dict[str, LeaseObs]):  # type: ignore[no-untyped-def]
    """Reconcile every STEP for SOAK (or until the first Degrade): [(seconds, actions), ...]."""
    status = make_obs(spec, pods=pods).status
    seen: dict[str, hb.Seen] = {}
    out = []
    t = dt.timedelta(0)
    while t <= SOAK:
        now = NOW + t
        seen = hb.track(seen, pods, leases, now)
        obs = make_obs(spec, pods=pods, status=status, now=now, leases=hb.with_since(leases, seen), free_rank_slots=0)
        actions = rc.plan(spec, obs)
        out.append((t.total_seconds(), actions))
        if any(isinstance(a, rc.Degrade) for a in actions):
            break
        status = rc.transition(spec, obs, actions)
        t += STEP
    return out


def counted(actions: list[rc.Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, rc.RecreateGroup | rc.MarkFailed | rc.HalveBatch | rc.Degrade)]


PEERS = [
    # id, rank 1's state, allowDegrade, expected: (seconds of the first Degrade or None, its reason)
    ("pulling-image", {"phase": "Pending", "waiting_reason": "ContainerCreating"}, True, None),
    ("loading-weights", {"phase": "Running"}, True, None),
    (
        "unschedulable",
        {"phase": "Pending", "node": None, "unschedulable_since": NOW, "unschedulable_message": "0/1 nodes"},
        True,
        (120.0, "Unschedulable"),
    ),
    (
        "unschedulable-no-degrade",
        {"phase": "Pending", "node": None, "unschedulable_since": NOW, "unschedulable_message": "0/1 nodes"},
        False,
        None,
    ),
]


@pytest.mark.parametrize(("peer", "allow", "degrade"), [c[1:] for c in PEERS], ids=[c[0] for c in PEERS])
def test_a_group_waiting_for_its_peer_is_never_a_crash_nor_a_hang(peer, allow, degrade):  # type: ignore[no-untyped-def]
    spec = default_spec(allowDegrade=allow, minTensorParallelSize=1)
    started = NOW - dt.timedelta(seconds=3)
    pods = waiting_group(peer, started)
    passes = soak(spec, pods, leftover_leases(pods, started))
    firsts = [(t, a) for t, actions in passes for a in actions if counted([a])]
    if degrade is None:
        assert firsts == [], firsts  # 10 minutes: no recreate, no hang, no Failed, no degrade
        assert passes[-1][0] == SOAK.total_seconds()
    else:
        (t, action), *_ = firsts
        assert (t, action.kind, action.reason) == (degrade[0], "Degrade", degrade[1]), firsts
        assert [a.kind for _, acts in passes[:-1] for a in acts if counted([a])] == []
    if not allow and "unschedulable_since" in peer:
        assert any(a.kind == "Blocked" for a in passes[-1][1])  # said, not acted on


def test_a_rank_hung_after_the_group_formed_still_is():
    """The same Leases, once the rank renewed them (the group formed), go stale: HeartbeatTimeout."""
    spec = default_spec()
    started = NOW - dt.timedelta(seconds=3)
    pods = [dataclasses.replace(p, started_at=started) for p in healthy_pods(tp=2)]
    renewed = {p.name: LeaseObs(p.name, renew_time=NOW, observed_at=NOW) for p in pods}
    seen = hb.track({}, pods, leftover_leases(pods, started), NOW - STEP)
    seen = hb.track(seen, pods, renewed, NOW)  # the runtime's first renewals
    later = NOW + dt.timedelta(seconds=spec.failure_policy.heartbeat_timeout_seconds + 1)
    obs = make_obs(spec, pods=pods, now=later, leases=hb.with_since(renewed, hb.track(seen, pods, renewed, later)))
    actions = rc.plan(spec, obs)
    assert [(a.kind, a.reason) for a in actions if counted([a])] == [("RecreateGroup", "HeartbeatTimeout")]


def test_rank_pods_get_the_collective_timeout_of_the_contract():
    """60 s with the default policy: the deadline a rendezvous used to have (test_rendezvous waits past it)."""
    from tpi_contract import defaults
    from tpi_operator.core import render

    for policy, want in (({}, "60"), ({"heartbeatTimeoutSeconds": 45}, "90")):
        spec = default_spec(**policy)
        args = render.runtime_args(spec, 8)
        assert args[args.index("--dist-timeout-seconds") + 1] == want
        assert want == str(defaults.collective_timeout_seconds(spec.failure_policy.heartbeat_timeout_seconds))
