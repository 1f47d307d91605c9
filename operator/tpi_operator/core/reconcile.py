"""The functional core's entry point: (spec, identity, observation) -> a Decision for the shell.

The shell (``handlers.py``) only reads state into an ``Observation``, calls ``decide`` and carries
the decision out: apply objects, delete pods (with the grace period and uid precondition given
here) and objects, write status, post the Events listed here.  It decides nothing itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec, TPInferenceClusterStatus
from tpi_operator.core import layout, recovery, render, status
from tpi_operator.core.observe import Observation, StsObs
from tpi_operator.core.status import Recovered

#: Grace period of the pods of a broken group: it serves nothing, so it need not drain long.
BROKEN_GROUP_GRACE_SECONDS = 5


@dataclass(frozen=True)
class PodDelete:
    """One pod to delete: ``uid`` is a precondition (a lagging cache must not delete a replacement);
    ``grace_seconds`` None keeps the pod's own terminationGracePeriodSeconds (a rolled group drains)."""

    name: str
    uid: str = ""
    grace_seconds: int | None = None


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Decision:
    actions: list[recovery.Action]
    status: TPInferenceClusterStatus
    recovered: list[Recovered]
    apply: list[dict[str, Any]] = field(default_factory=list)  # server-side apply, in order
    delete_pods: list[PodDelete] = field(default_factory=list)
    #: Pods on a lost node (grace 0), deleted before the status write, right after their groups'
    #: new templates (``apply_first``, ``patch_statefulsets``): the deletion is the recovery's first
    #: step (nodeLostTimeoutSeconds -> action), and repeating it is harmless (no kubelet will
    #: finalize them), so it does not wait behind the bookkeeping.
    force_delete_pods: list[PodDelete] = field(default_factory=list)
    #: The StatefulSets of groups with ``force_delete_pods``, applied before them.
    apply_first: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    delete_statefulsets: list[str] = field(default_factory=list)
    #: (StatefulSet, merge patch), before the pod deletes: a group healed in place gets its new
    #: incarnation on the template it already runs (its roll is held), and a recreate whose
    #: StatefulSet is otherwise unchanged moves it to the new incarnation (``incarnation_move``).
    patch_statefulsets: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    delete_leases: list[str] = field(default_factory=list)
    wake_after: float = 30.0


def settings_for(
    spec: TPInferenceClusterSpec, st: TPInferenceClusterStatus, group: int, restarted_at: str | None
) -> render.GroupSettings:
    gs = recovery.group_status(st, group)
    return render.GroupSettings(
        group=group,
        tp=st.current_tensor_parallel_size or 1,
        batch=recovery.group_batch(spec, st, group, restarted_at),
        incarnation=gs.incarnation,
        restarted_at=restarted_at,
    )


def hash_function(
    spec: TPInferenceClusterSpec, ident: render.Identity, restarted_at: str | None
) -> Callable[[int, int], str]:
    @functools.cache  # a pass asks for the same (tp, batch) several times; each renders a pod template
    def hash_for(tp: int, batch: int) -> str:
        gs = render.GroupSettings(group=0, tp=tp, batch=batch, restarted_at=restarted_at)
        return render.template_hash(spec, ident, gs)

    return hash_for


def decide(
    spec: TPInferenceClusterSpec,
    ident: render.Identity,
    obs: Observation,
    *,
    idle_seconds: float = 30.0,
    busy_seconds: float = 2.0,
) -> Decision:
    """Plan, move the bookkeeping forward, and list what the shell must do."""
    actions = recovery.plan(spec, obs)
    conflict = conflict_action(obs)
    if conflict is not None:
        actions.insert(0, conflict)  # the Degraded condition reports the first Blocked
    st = recovery.transition(spec, obs, actions)
    new_status, recovered = status.compute(spec, ident, obs, st, actions)
    decision = Decision(
        actions=actions, status=new_status, recovered=recovered, events=events_for(obs, actions, recovered)
    )
    if conflict is not None and not _reported(obs.status, conflict):
        decision.events.append(Event("Warning", "Conflict", conflict.message))
    hold = next((a for a in actions if isinstance(a, recovery.Hold)), None)
    if hold is not None and _progressing_reason(obs.status) != hold.reason:  # once, when it starts
        kind = "Normal" if hold.reason == "RolloutPaused" else "Warning"
        decision.events.append(Event(kind, hold.reason, hold.message))
    if new_status.phase == "Failed":
        decision.wake_after = idle_seconds * 4  # nothing to do; pods kept for debugging
        return decision

    shared_at = len(decision.apply)
    touched = {
        a.group: a for a in actions
        if isinstance(a, recovery.RollGroup | recovery.ReleaseGroup | recovery.ResumeGroup)
        or (isinstance(a, recovery.RecreateGroup) and not a.keep_template)
    }  # fmt: skip
    released = {g.group for g in st.groups if g.released_at is not None}  # held at zero pods
    broken = {a.group for a in actions if isinstance(a, recovery.RecreateGroup)}
    in_place = {a.group for a in actions if isinstance(a, recovery.RecreateGroup) and a.keep_template}
    failed = {g.group for g in st.groups if g.failed_generation is not None}  # left alone for debugging
    forced = recovery.force_deleted(actions)
    decision.force_delete_pods = [PodDelete(name, uid, 0) for name, uid in sorted(forced.items())]
    drained = {a.group for a in actions if isinstance(a, recovery.RecreateGroup) and recovery.evicted(obs, a.group)}
    surge = recovery.surge_groups(spec, obs, actions)
    for g in [*range(spec.replicas), *sorted(surge)]:
        gs = settings_for(spec, st, g, obs.restarted_at)
        want = obs.hash_for(gs.tp, gs.batch)
        sts_obs = obs.statefulsets.get(g)
        if g in failed:
            continue
        if g in released:  # all-or-nothing: scaled to zero, every pod goes (none serves)
            desired = render.with_replicas(render.statefulset(spec, ident, gs), 0)
            if sts_obs is None or sts_obs.object_hash != desired["metadata"]["annotations"][render.A_OBJECT_HASH]:
                decision.apply.append(desired)
            decision.delete_pods.extend(
                PodDelete(p.name, p.uid, BROKEN_GROUP_GRACE_SECONDS) for p in obs.pods
                if p.group == g and not p.deleting and p.name not in forced
            )  # fmt: skip
            continue
        stale = [
            PodDelete(p.name, p.uid, BROKEN_GROUP_GRACE_SECONDS) for p in obs.pods
            if p.group == g and not p.deleting and p.name not in forced and p.incarnation < gs.incarnation
        ]  # fmt: skip
        if g in in_place:
            pods = sts_obs.replicas if sts_obs is not None else None
            if sts_obs is None or sts_obs.incarnation != gs.incarnation:  # a lost node's group may keep it
                patch = incarnation_patch(*render.incarnation_metadata(spec, ident, gs, pods))
                decision.patch_statefulsets.append((render.sts_name(ident.name, g), patch))
            decision.delete_pods.extend(stale)
            continue
        # Untouched groups whose template is out of date keep their StatefulSet until rolled (pods
        # of an older incarnation go: a heal in place that a lagging cache has not shown yet).
        if g not in touched and (sts_obs is None or sts_obs.template_hash != want):
            if sts_obs is not None and sts_obs.incarnation >= gs.incarnation:
                decision.delete_pods.extend(stale)
            continue
        desired = render.statefulset(spec, ident, gs)
        if sts_obs is None or sts_obs.object_hash != desired["metadata"]["annotations"][render.A_OBJECT_HASH]:
            move = incarnation_move(spec, ident, gs, sts_obs, desired)
            if move is not None:
                decision.patch_statefulsets.append((render.sts_name(ident.name, g), move))
            else:
                decision.apply.append(desired)
        live_hash = desired["spec"]["template"]["metadata"]["labels"][render.L_TEMPLATE_HASH]
        for p in obs.pods:
            if p.group != g or p.deleting or p.name in forced:
                continue
            if p.incarnation < gs.incarnation or p.template_hash != live_hash:
                # A group broken by an eviction still serves: its rank 0 drains like a rolled one.
                grace = BROKEN_GROUP_GRACE_SECONDS if g in broken and g not in drained else None
                decision.delete_pods.append(PodDelete(p.name, p.uid, grace))
    # Leases for every rank of every group at its (possibly not yet rolled) size.
    # One Lease per rank, named per local rank when pods run several (tpi_contract.ranks); an
    # untouched group keeps its running StatefulSet's Leases too.
    wanted_leases = set()
    for g in [*range(spec.replicas), *sorted(surge)]:
        sts_obs = obs.statefulsets.get(g)
        size = st.current_tensor_parallel_size or 1
        layouts = {(size, layout.ranks_per_pod(spec, size))}
        if g not in touched and sts_obs is not None:
            layouts.add((sts_obs.ranks, sts_obs.ranks_per_pod))
        for group_size, n in sorted(layouts):
            for rank in range(group_size):
                lease = render.lease(spec, ident, g, rank, n)
                name = lease["metadata"]["name"]
                if name in wanted_leases:
                    continue
                wanted_leases.add(name)
                have = obs.leases.get(name)
                if have is None or have.annotations.get(render.A_OBJECT_HASH) != _hash(lease):
                    decision.apply.append(lease)
    decision.delete_leases = sorted(set(obs.leases) - wanted_leases)
    # first in order: the runtime's Role must name a Lease before its rank renews it
    # Objects of our names that this cluster does not own are left untouched: never adopted (and so
    # never garbage-collected with the cluster).
    shared = [
        o for o in render.shared_objects(spec, ident, sorted(wanted_leases))
        if (o["kind"], o["metadata"]["name"]) not in obs.foreign
    ]  # fmt: skip
    decision.apply[shared_at:shared_at] = shared
    decision.delete_statefulsets = [
        render.sts_name(ident.name, a.group) for a in actions if isinstance(a, recovery.RemoveGroup)
    ]
    # The replacements of a lost node's pods must be made from the new incarnation's template: a
    # StatefulSet re-applied for such a group goes first, with the force deletes.
    forced_sts = {render.sts_name(ident.name, a.group) for a in actions if isinstance(a, recovery.ForceDelete)}

    def goes_first(o: dict[str, Any]) -> bool:
        return o["kind"] == "StatefulSet" and o["metadata"]["name"] in forced_sts

    decision.apply_first = [o for o in decision.apply if goes_first(o)]
    decision.apply = [o for o in decision.apply if not goes_first(o)]
    # One delete per pod (a pod of several ranks is observed once per rank); the first wins.
    first: dict[str, PodDelete] = {}
    for d in decision.delete_pods:
        first.setdefault(d.name, d)
    decision.delete_pods = list(first.values())
    # Busy (re-check soon) only after changing something; otherwise watch events (pods,
    # StatefulSets, the cluster) and the actions' own deadlines (backoff, heartbeat, timeouts) wake
    # the reconciler. A cluster that is stuck (blocked, degraded, never-ready) must not poll.
    changed = [o for o in [*decision.apply_first, *decision.apply] if o["kind"] in ("StatefulSet", "Lease")]
    busy = bool(
        changed
        or decision.delete_pods
        or decision.force_delete_pods
        or decision.delete_statefulsets
        or decision.delete_leases
        or decision.patch_statefulsets
    )
    decision.wake_after = recovery.next_wake(actions, obs.now, busy_seconds if busy else idle_seconds)
    return decision


def incarnation_patch(labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    """A merge patch moving a StatefulSet to a new incarnation and nothing else: the pods'
    incarnation label and their pod-group name and count (``render.incarnation_metadata``)."""
    return {
        "metadata": {"annotations": {render.L_INCARNATION: labels[render.L_INCARNATION]}},
        "spec": {"template": {"metadata": {"labels": labels, "annotations": annotations}}},
    }


def incarnation_move(
    spec: TPInferenceClusterSpec,
    ident: render.Identity,
    gs: render.GroupSettings,
    running: StsObs | None,
    desired: dict[str, Any],
) -> dict[str, Any] | None:
    """The merge patch to ``desired`` when the running StatefulSet is exactly our rendering of the
    same settings at an older incarnation (its object hash says so), i.e. a recreate: it changes a
    few labels and annotations (~200 bytes against the whole object's ~3.6 KB), which cost the
    API server 0.83x the CPU and 0.88x the latency of re-applying it all
    (bench/bench_statefulset_writes.py), while a lost node's groups all recover at once.
    None: anything else differs (a roll, a resize), apply it all."""
    if running is None or running.object_hash is None or running.incarnation == gs.incarnation:
        return None
    before = render.statefulset(spec, ident, replace(gs, incarnation=running.incarnation))
    if before["metadata"]["annotations"][render.A_OBJECT_HASH] != running.object_hash:
        return None
    return render.merge_patch(before, desired)


def conflict_action(obs: Observation) -> recovery.Blocked | None:
    """A Blocked action naming the objects of our names that belong to someone else."""
    if not obs.foreign:
        return None
    what = "; ".join(f"{kind} {name} {owner}" for (kind, name), owner in sorted(obs.foreign.items()))
    return recovery.Blocked("Conflict", f"existing objects are not this cluster's and are left untouched: {what}")


def _progressing_reason(prev: TPInferenceClusterStatus) -> str | None:
    return next((c.reason for c in prev.conditions if c.type == "Progressing"), None)


def _reported(prev: TPInferenceClusterStatus, conflict: recovery.Blocked) -> bool:
    cond = next((c for c in prev.conditions if c.type == "Degraded"), None)
    return cond is not None and cond.reason == "Conflict" and cond.message == conflict.message


def events_for(obs: Observation, actions: list[recovery.Action], recovered: list[Recovered]) -> list[Event]:
    """The Events of one pass: one per recorded action, one per group Ready again."""
    events = []
    for a in actions:
        if isinstance(a, recovery.RECORDED) or (isinstance(a, recovery.RollGroup) and a.reason != "Create"):
            warn = isinstance(a, recovery.MarkFailed | recovery.Degrade | recovery.ReleaseGroup)
            warn = warn or a.reason == "NodeLost"
            events.append(Event("Warning" if warn else "Normal", a.kind, f"{a.reason}: {a.message}"))
        elif isinstance(a, recovery.ForceDelete):
            pods = ", ".join(name for name, _ in a.pods)
            events.append(Event("Warning", "ForceDelete", f"NodeLost: node {a.node} is lost; force-deleting {pods}"))
    for rec in recovered:
        events.append(
            Event("Normal", "Recovered", f"group {rec.group} Ready again {rec.seconds:.1f}s after {rec.reason}")
        )
    return events


def _hash(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["annotations"][render.A_OBJECT_HASH])
