"""Recovery: (spec, observation) -> actions, and actions -> the next status.  All pure.

The rules, one function each, in the order ``plan`` applies them:

1. ``rule_failed``: a Failed *group* is left alone (pods kept for debugging) until the generation
   or ``tpi.dev/restartedAt`` changes, which resets it; the other groups are healed and rolled as
   usual.  The cluster is Failed only when every group is (then a reset also undoes a degrade).
2. ``rule_node_lost``: a rank pod on a NotReady, unreachable or deleted node for
   ``nodeLostTimeoutSeconds``: the group's pods on that node are force-deleted (grace 0, even when
   already Terminating: no kubelet will finalize them) and the group is recreated elsewhere.  This
   is the infrastructure's failure: no restart budget, no backoff.  Until then the group is left
   alone by the other failure rules.  When every pod of the group's incarnation was on lost
   nodes, nothing is left to tell its replacements from, so the group keeps its incarnation
   (``keeps_incarnation``) and its StatefulSet is not written at all.
3. ``rule_failures``: a group with a crashed container, an OOM-killed container, a
   deleted/replaced rank pod or a hung rank (its Lease not seen renewed for
   ``heartbeatTimeoutSeconds`` while the pod runs, see ``core.heartbeat``) is recreated as a whole:
   every rank must re-form the process group.  Recreates back off exponentially
   (``backoffSeconds * 2^(n-1)``, capped), the first one is immediate.  An OOM halves *that
   group's* batch size (never below ``oomBatchSizeFloor``; a change of ``runtime.maxBatchSize``
   or ``tpi.dev/restartedAt`` resets it); a second OOM at the floor marks *that group* Failed.
   OOMs never shrink TP: a smaller TP puts more weights on each rank.
4. ``_over_budget``: a group recreated ``maxGroupRestarts`` times within ``restartWindowSeconds``
   (OOMs and lost nodes aside) degrades the cluster to the next smaller valid TP size >=
   ``minTensorParallelSize`` when ``allowDegrade``, else that group is marked Failed.  A group
   that never was Ready on the template it crashes on (a bad rollout, a bad first deploy) is the
   template's fault, not the hardware's: it is marked Failed (CrashLoopBackOff) instead, and TP
   is never degraded for it.
5. ``rule_unschedulable``: a rank Pending-unschedulable for ``unschedulableTimeoutSeconds``
   degrades to a size that fits (the group's scheduled pods plus free capacity, under the
   placement rules of ``core.capacity``).  When no smaller size fits and part of the group is
   bound, that part must not keep holding GPUs the rest cannot use (all-or-nothing): the group is
   *released* (``ReleaseGroup``: a new incarnation, its StatefulSet scaled to zero).
   ``rule_released`` scales it back up (``ResumeGroup``) only after a backoff with a per-group
   jitter *and* only while capacity for the whole group exists, so two groups that split the
   capacity between them do not split it again (docs/contracts.md, "All-or-nothing scheduling").
6. ``rule_grow_back``: a degraded cluster grows back (``scaleBackUp``) when every group is Ready,
   it has spent the hysteresis at the degraded size (``grow_back_after``, kept in status) and, for
   capacity degrades, free capacity holds what every group needs (replicas x the added ranks).
7. ``rule_roll``: groups whose pod template is out of date (spec change, new size or batch,
   ``restartedAt``) are rolled one at a time within ``maxUnavailable``; groups already down are
   rolled at once.  A group counts as done only when Ready.  With ``maxSurge`` (``rule_surge``),
   surge groups at the new template come up first and a Ready group goes down only while the Ready
   groups stay at ``replicas``; the surge groups go once every group is up to date and Ready.
   The roll is *held* (``roll_hold``) while ``updateStrategy.paused``, while a group on the new
   template shows that it cannot run (``rollout.template_problem``: ErrImagePull,
   CreateContainerConfigError, CrashLoopBackOff...),
   and once no group became Ready on it for ``progressDeadlineSeconds`` (time a group waits behind
   scheduling gates, in Kueue's queue, does not count: ``roll_queued``): then no further group
   is rolled, not even one that is down, and a group still on its old template that fails is
   recreated *in place* (``RecreateGroup.keep_template``), so it keeps serving the old template.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from tpi_contract import exitcodes

from tpi_operator.api.v1alpha1 import (
    HISTORY_LIMIT,
    GroupStatus,
    HistoryEntry,
    RolloutStatus,
    TPInferenceClusterSpec,
    TPInferenceClusterStatus,
)
from tpi_operator.core import layout, placement, rollout
from tpi_operator.core.capacity import Capacity
from tpi_operator.core.observe import NodeObs, Observation, PodObs, format_time, parse_time
from tpi_operator.core.sizing import next_smaller


# ----------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Action:
    """Base of everything ``plan`` can decide."""

    reason: str = ""
    message: str = ""

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class RecreateGroup(Action):
    """Delete every pod of a group (new incarnation) so all ranks re-form the process group.

    ``keep_template``: the group's roll is held, so it comes back on the template it runs now
    (only its incarnation changes) rather than on the wanted one.
    ``new_incarnation``: False when no pod of the group's incarnation is left (``keeps_incarnation``)."""

    group: int = 0
    keep_template: bool = False
    new_incarnation: bool = True


@dataclass(frozen=True)
class ForceDelete(Action):
    """Delete pods with grace period 0: their node is lost, no kubelet will ever finalize them."""

    group: int = 0
    node: str = ""
    pods: tuple[tuple[str, str], ...] = ()  # (name, uid)


def force_deleted(actions: list[Action]) -> dict[str, str]:
    """Name -> uid of every pod this pass force-deletes (a pod of several ranks appears once)."""
    return {name: uid for a in actions if isinstance(a, ForceDelete) for name, uid in a.pods}


@dataclass(frozen=True)
class HalveBatch(Action):
    group: int = 0
    from_size: int = 0
    to_size: int = 0


@dataclass(frozen=True)
class Degrade(Action):
    from_size: int = 0
    to_size: int = 0


@dataclass(frozen=True)
class ScaleUp(Action):
    from_size: int = 0
    to_size: int = 0


@dataclass(frozen=True)
class ReleaseGroup(Action):
    """Scale a partly scheduled group to zero (a new incarnation): it holds nothing until
    ``retry_at`` and capacity for all its ``pods`` pods."""

    group: int = 0
    pods: int = 0
    retry_at: dt.datetime | None = None


@dataclass(frozen=True)
class ResumeGroup(Action):
    """Scale a released group back up: its whole size fits now."""

    group: int = 0


@dataclass(frozen=True)
class RollGroup(Action):
    """Apply the group's current template and replace its out-of-date pods."""

    group: int = 0
    template_hash: str = ""


@dataclass(frozen=True)
class RemoveGroup(Action):
    group: int = 0


@dataclass(frozen=True)
class MarkFailed(Action):
    """Give up on a group: it is left alone, pods kept for debugging, the others carry on."""

    group: int = 0


@dataclass(frozen=True)
class Reset(Action):
    """Leave Failed: the spec changed or a restart was requested (group None: every group had
    failed, and the cluster starts over, degrade included)."""

    group: int | None = None


@dataclass(frozen=True)
class Hold(Action):
    """The roll is held (paused, halted by a failing template, past its deadline): no group is
    rolled; reported in the Progressing condition."""


@dataclass(frozen=True)
class Blocked(Action):
    """Nothing can be done now (reported in conditions)."""


@dataclass(frozen=True)
class Wait(Action):
    """Reconcile again at ``until`` (None: only on a change)."""

    until: dt.datetime | None = None


#: Actions recorded in status history and emitted as Events.
RECORDED = (RecreateGroup, HalveBatch, Degrade, ScaleUp, MarkFailed, Reset, RemoveGroup, ReleaseGroup, ResumeGroup)
#: Failures that are the infrastructure's, not the group's: no restart budget, no backoff.
NOT_COUNTED = ("NodeLost",)


@dataclass(frozen=True)
class GroupFailure:
    group: int
    reason: str  # OOMKilled | Crash | PodDeleted | HeartbeatTimeout
    message: str


# ----------------------------------------------------------------------------------- helpers
def backoff_seconds(spec: TPInferenceClusterSpec, restarts_in_window: int) -> float:
    """Delay before the next recreate: none for the first, then base * 2^(n-1), capped."""
    fp = spec.failure_policy
    if restarts_in_window <= 0:
        return 0.0
    return float(min(fp.backoff_seconds * 2 ** (restarts_in_window - 1), fp.max_backoff_seconds))


def current_tp(status: TPInferenceClusterStatus, desired: int) -> int:
    """The size groups run at: the desired one unless degraded (a new desired size wins)."""
    if status.current_tensor_parallel_size is None or status.desired_tensor_parallel_size != desired:
        return desired
    return status.current_tensor_parallel_size


def group_status(status: TPInferenceClusterStatus, group: int) -> GroupStatus:
    return next((g for g in status.groups if g.group == group), GroupStatus(group=group))


def group_incarnation(status: TPInferenceClusterStatus, obs: Observation, group: int) -> int:
    sts = obs.statefulsets.get(group)
    return max(group_status(status, group).incarnation, sts.incarnation if sts else 0)


def current_pods(obs: Observation, group: int, incarnation: int) -> list[PodObs]:
    """Live pods of a group's current incarnation, by rank."""
    pods = [p for p in obs.pods if p.group == group and p.incarnation >= incarnation and not p.deleting]
    return sorted(pods, key=lambda p: p.rank)


def restarts_in_window(spec: TPInferenceClusterSpec, gs: GroupStatus, now: dt.datetime) -> list[dt.datetime]:
    window = dt.timedelta(seconds=spec.failure_policy.restart_window_seconds)
    times = [parse_time(t) for t in gs.restart_times]
    return sorted(t for t in times if t is not None and now - t < window)


def group_ready(obs: Observation, group: int, incarnation: int, size: int) -> bool:
    """All ranks present, Ready, of the current incarnation and of the StatefulSet's template."""
    sts = obs.statefulsets.get(group)
    if sts is None:
        return False
    pods = current_pods(obs, group, incarnation)
    return len(pods) == sts.ranks == size and all(p.ready and p.template_hash == sts.template_hash for p in pods)


#: A rank that exits ``COLLECTIVE_FAILED`` only says that a peer failed; the peer's own cause (an OOM
#: kill) reaches the API from its kubelet a moment later. Recreating the group on the first report
#: would lose that cause with the old pods (no batch halving, an OOM loop counted as crashes).
PEER_CAUSE_GRACE = dt.timedelta(seconds=5)


def awaiting_peer_cause(obs: Observation, group: int, incarnation: int) -> dt.datetime | None:
    """Until when to wait for the real cause, when the group's only failures are ranks reporting a
    failed peer (exit 3) that ended less than ``PEER_CAUSE_GRACE`` ago; None: decide now."""
    crashed = [p for p in current_pods(obs, group, incarnation) if p.crashed]
    if not crashed or any(p.oom or p.exit_code != exitcodes.COLLECTIVE_FAILED for p in crashed):
        return None
    ends = [p.finished_at for p in crashed if p.finished_at is not None]
    if not ends:
        return None
    until = max(ends) + PEER_CAUSE_GRACE
    return until if obs.now < until else None


def detect_failure(spec: TPInferenceClusterSpec, obs: Observation, group: int, incarnation: int) -> GroupFailure | None:
    """Why a group must be recreated, if it must."""
    pods = current_pods(obs, group, incarnation)
    for p in pods:
        if p.oom:
            what = "was OOMKilled" if p.termination_reason == "OOMKilled" else "ran out of GPU memory"
            if p.termination_cause:  # the launcher's line (which local rank, why) outlives the pod here
                what = f"was OOMKilled ({p.termination_cause})"
            return GroupFailure(group, "OOMKilled", f"container of {p.name} {what} (exit code {p.exit_code})")
    for p in pods:
        if p.crashed:
            code = f" (exit code {p.exit_code})" if p.exit_code is not None else ""
            what = p.waiting_reason or p.termination_reason or p.phase
            if p.termination_cause:
                what = f"{what} ({p.termination_cause})"
            return GroupFailure(group, "Crash", f"{p.name} crashed: {what}{code}, {p.restarts} restarts")
    recorded = group_status(obs.status, group).pod_uids
    sts = obs.statefulsets.get(group)
    if recorded and sts is not None and sts.ranks == len(recorded):
        by_rank = {p.rank: p for p in pods}
        for rank, uid in enumerate(recorded):
            pod = by_rank.get(rank)
            if pod is None:
                return GroupFailure(group, "PodDeleted", f"rank {rank} (pod uid {uid[:8]}) was deleted")
            if pod.uid and pod.uid != uid:
                return GroupFailure(
                    group, "PodDeleted", f"{pod.name} was replaced (pod uid {uid[:8]} -> {pod.uid[:8]})"
                )
    timeout = dt.timedelta(seconds=spec.failure_policy.heartbeat_timeout_seconds)
    for p, since in heartbeat_clocks(obs, pods):
        if obs.now - since > timeout:
            age = (obs.now - since).total_seconds()
            return GroupFailure(group, "HeartbeatTimeout", f"{p.who} hung: Lease not renewed for {age:.0f}s")
    return None


def evicted(obs: Observation, group: int) -> bool:
    """A rank of the group's current incarnation is terminating gracefully on a healthy node: an
    eviction (``kubectl drain``) or a plain delete, not a crash.  Until the kubelet stops it, the
    group still works, so its other ranks are stopped with their grace period and rank 0 drains."""
    incarnation = group_incarnation(obs.status, obs, group)
    return any(
        p.group == group and p.deleting and p.incarnation >= incarnation
        and not (p.node and (n := obs.nodes.get(p.node)) is not None and n.lost_since is not None)
        for p in obs.pods
    )  # fmt: skip


def heartbeat_clocks(obs: Observation, pods: list[PodObs]) -> list[tuple[PodObs, dt.datetime]]:
    """Running pods whose Lease counts, with the operator time of its last observed renewal.

    Only a heartbeat that this container renewed can go stale (see ``core.heartbeat``); one left
    over from a previous pod says nothing, and a runtime that never beats is the probes' business.
    """
    out = []
    for p in pods:
        lease = obs.leases.get(p.lease_name)
        if p.phase == "Running" and lease is not None and lease.since is not None:
            out.append((p, lease.since))
    return out


def next_heartbeat_deadline(
    spec: TPInferenceClusterSpec, obs: Observation, incarnations: dict[int, int]
) -> dt.datetime | None:
    """When the first counted Lease would go stale: the same pods ``detect_failure`` checks."""
    timeout = dt.timedelta(seconds=spec.failure_policy.heartbeat_timeout_seconds)
    pods = [p for g, inc in incarnations.items() for p in current_pods(obs, g, inc)]
    deadlines = [since + timeout + dt.timedelta(milliseconds=100) for _, since in heartbeat_clocks(obs, pods)]
    # A past deadline was acted on already (recreate, or a backoff Wait with its own time):
    # waking for it again would spin.
    future = [d for d in deadlines if d > obs.now]
    return min(future) if future else None


# ---------------------------------------------------------------------- all-or-nothing helpers
#: How often a released group that does not fit looks at the capacity again (at least).
RELEASED_RECHECK_SECONDS = 10.0


def pods_at(spec: TPInferenceClusterSpec, tp: int) -> int:
    """A group's pods at size ``tp`` (its StatefulSet's replicas: ``tp / ranksPerPod``)."""
    return layout.pods_per_group(spec, tp)


def capacity_at(obs: Observation, spec: TPInferenceClusterSpec, tp: int) -> Capacity | None:
    """The room, in pods of the ranks a group of ``tp`` runs to a pod, under the placement rules;
    or only a count of free slots; or None (unknown)."""
    n = layout.ranks_per_pod(spec, tp)
    if n in obs.capacities:
        return obs.capacities[n]
    free = obs.free_ranks(n)
    return None if free is None else Capacity.counting(free // n)


def own_bound(obs: Observation, group: int, incarnation: int) -> dict[str, int]:
    """node -> the group's current pods bound there (they go when the group is recreated).
    Counted in pods (a pod of several ranks is observed once per rank); a pod of another size
    counts as one pod of the new size, which can only underestimate the room it frees."""
    pods: dict[str, str] = {}
    for p in current_pods(obs, group, incarnation):
        if p.node:
            pods[p.name] = p.node
    out: dict[str, int] = {}
    for node in pods.values():
        out[node] = out.get(node, 0) + 1
    return out


def jitter_fraction(group_id: str, incarnation: int) -> float:
    """A fraction in [0, 1), fixed per group and incarnation, different between groups."""
    digest = hashlib.sha256(f"{group_id}/{incarnation}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def release_delay(spec: TPInferenceClusterSpec, releases: int, group_id: str, incarnation: int) -> float:
    """Seconds before a released group may scale back up: the restart backoff for its ``releases``-th
    release plus a jitter over max(that backoff, unschedulableTimeoutSeconds / 2, 10 s).

    Why the spread is that wide: two groups released together must not look at the free capacity
    in the same instant, or both see room for themselves and split it again.  The first one to
    retry scales up; its pods show up in the operator's pod watch well under a second later, and
    the second one, seeing them (bound or about to be: ``Capacity.arriving``), waits.
    """
    fp = spec.failure_policy
    base = max(backoff_seconds(spec, max(1, releases)), float(fp.backoff_seconds))
    span = max(base, fp.unschedulable_timeout_seconds / 2, 10.0)
    return base + jitter_fraction(group_id, incarnation) * span


# -------------------------------------------------------------------------------------- plan
@dataclass
class _Ctx:
    """What the rules share while planning one pass; each rule reads and narrows it."""

    spec: TPInferenceClusterSpec
    obs: Observation
    st: TPInferenceClusterStatus
    tp: int
    incarnations: dict[int, int]
    out: list[Action] = field(default_factory=list)
    resized: bool = False
    recreated: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)  # groups waiting on a lost node: no other rule
    failed: set[int] = field(default_factory=set)  # Failed groups: left alone by every rule
    released: set[int] = field(default_factory=set)  # scaled to zero (all-or-nothing): held at 0
    unschedulable: bool = False
    want: dict[int, str] = field(default_factory=dict)  # each group's wanted template (pass start)
    hold: Hold | None = None  # the roll is held: nothing is rolled, failed groups heal in place
    roll_deadline: dt.datetime | None = None  # when the rollout in flight runs out of time

    @property
    def groups(self) -> range:
        return range(self.spec.replicas)

    def add(self, action: Action) -> None:
        self.out.append(action)


def batch_basis(spec: TPInferenceClusterSpec, restarted_at: str | None) -> str:
    """What a group's OOM-halved batch was derived from; a change of either resets the halving."""
    return f"{spec.runtime.max_batch_size}@{restarted_at or ''}"


def group_batch(
    spec: TPInferenceClusterSpec, st: TPInferenceClusterStatus, group: int, restarted_at: str | None
) -> int:
    """The batch size a group runs with: its own OOM-halved size, else the spec's."""
    gs = group_status(st, group)
    if gs.max_batch_size is None or gs.batch_basis != batch_basis(spec, restarted_at):
        return spec.runtime.max_batch_size
    return max(1, min(gs.max_batch_size, spec.runtime.max_batch_size))


def wanted_templates(
    spec: TPInferenceClusterSpec, obs: Observation, st: TPInferenceClusterStatus, tp: int
) -> dict[int, str]:
    """The template hash every group should run, at size ``tp`` and its own batch."""
    return {g: obs.hash_for(tp, group_batch(spec, st, g, obs.restarted_at)) for g in range(spec.replicas)}


def plan(spec: TPInferenceClusterSpec, obs: Observation) -> list[Action]:
    """Decide what to do about the observed cluster: the module docstring's rules, in order."""
    st = obs.status
    ctx = _Ctx(spec=spec, obs=obs, st=st, tp=current_tp(st, obs.desired_tp), incarnations={})
    rule_failed(ctx)
    ctx.incarnations = {g: group_incarnation(ctx.st, obs, g) for g in ctx.groups}
    ctx.want = wanted_templates(spec, obs, ctx.st, ctx.tp)
    ctx.hold = roll_hold(ctx)
    rule_node_lost(ctx)
    rule_released(ctx)
    rule_failures(ctx)
    rule_unschedulable(ctx)
    rule_grow_back(ctx)
    rule_roll(ctx)
    deadline = next_heartbeat_deadline(spec, obs, {g: i for g, i in ctx.incarnations.items() if g not in ctx.failed})
    if deadline is not None:
        ctx.add(Wait(reason="Heartbeat", message="next heartbeat deadline", until=deadline))
    return ctx.out


def rule_failed(ctx: _Ctx) -> None:
    """Rule 1: Failed groups are left alone until a new generation or restartedAt resets them."""
    obs, st = ctx.obs, ctx.st
    failed = {g.group: g for g in st.groups if g.failed_generation is not None and g.group < ctx.spec.replicas}
    if not failed:
        return
    restart = obs.restarted_at is not None and obs.restarted_at != st.restarted_at
    retry = {g for g, gs in failed.items() if restart or obs.generation > (gs.failed_generation or 0)}
    why = "restart requested" if restart else "spec changed"
    if len(failed) == ctx.spec.replicas and retry == set(failed):  # the whole cluster had failed
        ctx.add(Reset("Retry", why))
        ctx.st = st.model_copy(update={"groups": [], "current_tensor_parallel_size": None})
        ctx.tp = current_tp(ctx.st, obs.desired_tp)
        return
    groups = []
    for gs in st.groups:
        if gs.group in retry:
            ctx.add(Reset("Retry", f"group {gs.group}: {why}", gs.group))
            gs = fresh_group(gs)
        elif gs.group in failed:
            ctx.failed.add(gs.group)
        groups.append(gs)
    ctx.st = st.model_copy(update={"groups": groups})


def fresh_group(gs: GroupStatus) -> GroupStatus:
    """A group's bookkeeping after a reset: only what identifies its pods survives."""
    return GroupStatus(
        group=gs.group, incarnation=gs.incarnation, template_hash=gs.template_hash, ready_hash=gs.ready_hash
    )


def rule_node_lost(ctx: _Ctx) -> None:
    """Rule 2: ranks on a lost node are force-deleted after nodeLostTimeoutSeconds, the group recreated.

    Every pod of the group on that node goes, whatever its incarnation and even when already
    Terminating: no kubelet will finalize it, and a StatefulSet never replaces a pod that exists.
    """
    obs, timeout = ctx.obs, dt.timedelta(seconds=ctx.spec.failure_policy.node_lost_timeout_seconds)
    for g in ctx.groups:
        if g in ctx.failed:
            continue
        lost = [
            (p, node) for p in obs.pods
            if p.group == g and p.node and (node := obs.nodes.get(p.node)) is not None
            and node.lost_since is not None
        ]  # fmt: skip
        if not lost:
            continue
        ctx.held.add(g)
        since = min(node.lost_since for _, node in lost if node.lost_since is not None)
        node = min((n for _, n in lost), key=lambda n: n.lost_since or obs.now)
        if obs.now - since < timeout:
            ctx.add(Wait("NodeLost", f"group {g}: node {node.name} {node.why}", until=since + timeout))
            continue
        by_node: dict[str, list[PodObs]] = {}
        for p, n in lost:
            by_node.setdefault(n.name, []).append(p)
        for name, pods in sorted(by_node.items()):
            ctx.add(ForceDelete("NodeLost", f"group {g}: node {name} lost", g, name,
                                tuple(dict.fromkeys((p.name, p.uid) for p in pods))))  # fmt: skip
        current = [p for p, _ in lost if p.incarnation >= ctx.incarnations[g]]
        keep = keeps_incarnation(ctx, g, lost)
        if current and not (keep and recreated_for(group_status(ctx.st, g), {n.name for _, n in lost})):
            ranks = ", ".join(str(p.rank) for p in sorted(current, key=lambda p: p.rank))
            secs = (obs.now - since).total_seconds()
            msg = f"node {node.name} {node.why} for {secs:.0f}s; rank(s) {ranks} of group {g} were on it"
            ctx.add(RecreateGroup("NodeLost", msg, g, keep_template=heals_in_place(ctx, g), new_incarnation=not keep))
            ctx.recreated.add(g)


def keeps_incarnation(ctx: _Ctx, g: int, lost: list[tuple[PodObs, NodeObs]]) -> bool:
    """Can a lost node's group come back in the incarnation it has?  Yes when every pod of that
    incarnation is on a lost node (force-deleted now): no pod is left that its replacements must be
    told apart from, and a pod-group name is not reused for a gang scheduler.  Then the StatefulSet
    is left as it is and re-creates the pods from its template: no StatefulSet write, no
    ControllerRevision and no StatefulSet status per group ahead of the deletes (when a node dies,
    the bulk of the API server's work: bench/bench_operator.py)."""
    if placement.gang_scheduled(ctx.spec.scheduling):
        return False
    on_lost = {(p.name, p.rank) for p, _ in lost}
    incarnation = ctx.incarnations[g]
    return not any(
        p.group == g and p.incarnation >= incarnation and (p.name, p.rank) not in on_lost for p in ctx.obs.pods
    )


def recreated_for(gs: GroupStatus, nodes: set[str]) -> bool:
    """Was the group already recreated, in its incarnation, for the loss of one of ``nodes`` and not
    Ready since?  A pod that outlives its force delete (a finalizer) is then not a second loss."""
    return gs.failure_reason == "NodeLost" and gs.failing_since is not None and gs.lost_node in nodes


def rule_failures(ctx: _Ctx) -> None:
    """Rules 3-4: recreate broken groups with backoff; OOM halves that group's batch; past the
    restart budget degrade, or mark the group Failed."""
    spec, obs, fp, now = ctx.spec, ctx.obs, ctx.spec.failure_policy, ctx.obs.now
    for g in ctx.groups:
        if g in ctx.held or g in ctx.failed or g in ctx.released:
            continue
        until = awaiting_peer_cause(obs, g, ctx.incarnations[g])
        if until is not None:
            why = f"group {g}: a rank reports a failed peer; waiting for the peer's own cause"
            ctx.add(Wait("PeerCause", why, until=until))
            continue
        failure = detect_failure(spec, obs, g, ctx.incarnations[g])
        if failure is None:
            continue
        gs = group_status(ctx.st, g)
        recent = restarts_in_window(spec, gs, now)
        oom = failure.reason == "OOMKilled"
        batch = group_batch(spec, ctx.st, g, obs.restarted_at)
        if oom and batch <= fp.oom_batch_size_floor and gs.floor_ooms >= 1:
            # A smaller TP would put more weights on each rank: never the answer to an OOM.
            ctx.add(MarkFailed("OOMAtBatchFloor", (
                f"group {g} ran out of memory again at the batch size floor {fp.oom_batch_size_floor} "
                f"({failure.message}); lower runtime.maxModelLen, raise memory or use larger GPUs; "
                "pods kept for debugging, the other groups serve"), g))  # fmt: skip
            ctx.failed.add(g)
            continue
        if not oom and len(recent) >= fp.max_group_restarts:
            if not proven(ctx, g):
                ctx.add(template_failed(ctx, g, recent, failure))
                ctx.failed.add(g)
                continue
            if not _over_budget(ctx, g, recent, failure):
                continue
            break
        delay = dt.timedelta(seconds=backoff_seconds(spec, len(recent)))
        if recent and now < recent[-1] + delay:
            ctx.add(Wait(failure.reason, f"group {g} backing off: {failure.message}", until=recent[-1] + delay))
            continue
        keep = heals_in_place(ctx, g)
        if oom and batch > fp.oom_batch_size_floor and not keep:  # a held group keeps its template
            new = max(fp.oom_batch_size_floor, batch // 2)
            ctx.add(HalveBatch("OOMKilled", f"group {g}: effective batch size {batch} -> {new}", g, batch, new))
        ctx.add(RecreateGroup(failure.reason, failure.message, g, keep_template=keep))
        ctx.recreated.add(g)


def spec_digest(obs: Observation) -> str:
    """The spec and restartedAt, without the size and batch that recovery picks (fixed at 1, 1)."""
    return obs.hash_for(1, 1)


def proven(ctx: _Ctx, g: int) -> bool:
    """Does the group run a template known to work: one it was Ready on, or the current spec at a
    size or batch recovery picked when some group was Ready on that spec?  If not, its crashes
    are the template's (a bad rollout), not the hardware's."""
    sts = ctx.obs.statefulsets.get(g)
    if sts is None or sts.template_hash is None:
        return False
    if group_status(ctx.st, g).ready_hash == sts.template_hash:
        return True
    return sts.template_hash == ctx.want.get(g) and ctx.st.ready_spec == spec_digest(ctx.obs)


def template_failed(ctx: _Ctx, g: int, recent: list[dt.datetime], failure: GroupFailure) -> MarkFailed:
    """A group that crash-loops on a template it never ran: Failed, never a TP degrade."""
    fp = ctx.spec.failure_policy
    return MarkFailed("CrashLoopBackOff", (
        f"group {g} never became Ready on its current template and was recreated {len(recent)} times "
        f"within {fp.restart_window_seconds}s (last: {failure.message}); a template that crash-loops is "
        "not a capacity or hardware problem, so tensor parallelism is not degraded: fix the spec "
        "(image, args, resources); pods kept for debugging"), g)  # fmt: skip


def _over_budget(ctx: _Ctx, g: int, recent: list[dt.datetime], failure: GroupFailure) -> bool:
    """Degrade past the restart budget when allowed (True); else mark the group Failed."""
    fp, tp = ctx.spec.failure_policy, ctx.tp
    why = (
        f"group {g} was recreated {len(recent)} times within {fp.restart_window_seconds}s "
        f"(last: {failure.reason}: {failure.message})"
    )
    to = next_smaller(ctx.obs.valid_sizes, tp, fp.min_tensor_parallel_size) if fp.allow_degrade else None
    if to is not None:
        ctx.add(Degrade("CrashLoop", f"{why}; degrading tensor parallelism {tp} -> {to}", tp, to))
        ctx.tp, ctx.resized = to, True
        return True
    if not fp.allow_degrade:
        cannot = "degrading is disabled (failurePolicy.allowDegrade: false)"
    else:
        cannot = f"no valid tensor-parallel size below {tp} is >= minTensorParallelSize={fp.min_tensor_parallel_size}"
    ctx.add(MarkFailed("RestartBudgetExhausted", f"{why}; {cannot}; pods kept for debugging", g))
    ctx.failed.add(g)
    return False


def rule_unschedulable(ctx: _Ctx) -> None:
    """Rule 5: a rank Pending-unschedulable for unschedulableTimeoutSeconds degrades to what fits."""
    obs, fp, now = ctx.obs, ctx.spec.failure_policy, ctx.obs.now
    timeout = dt.timedelta(seconds=fp.unschedulable_timeout_seconds)
    for g in ctx.groups:
        if ctx.resized or g in ctx.recreated or g in ctx.held or g in ctx.failed or g in ctx.released:
            continue
        pods = current_pods(obs, g, ctx.incarnations[g])
        stuck = [p for p in pods if p.phase == "Pending" and p.unschedulable_since is not None]
        if not stuck:
            continue
        ctx.unschedulable = True
        since = min(p.unschedulable_since for p in stuck if p.unschedulable_since is not None)
        if now - since < timeout:
            ctx.add(Wait("Unschedulable", f"group {g}: {len(stuck)} rank(s) unschedulable", until=since + timeout))
            continue
        bound = own_bound(obs, g, ctx.incarnations[g])
        detail = stuck[0].unschedulable_message or "no node fits"
        tp = ctx.tp
        to = smaller_fitting(ctx, g, bound)
        if to is not None:
            msg = (
                f"group {g}: {len(stuck)} rank(s) unschedulable for {timeout.seconds}s ({detail}); "
                f"degrading tensor parallelism {tp} -> {to}"
            )
            ctx.add(Degrade("Unschedulable", msg, tp, to))
            ctx.tp, ctx.resized = to, True
            break
        no_size = (
            f"no smaller valid size >= minTensorParallelSize={fp.min_tensor_parallel_size} fits"
            if fp.allow_degrade else "degrading is disabled (failurePolicy.allowDegrade: false)"
        )  # fmt: skip
        if bound:  # all-or-nothing: the bound part holds what the rest can never use
            sts = obs.statefulsets.get(g)
            count = sts.replicas if sts is not None and sts.replicas else len({p.name for p in pods})
            inc = ctx.incarnations[g] + 1
            gs = group_status(ctx.st, g)
            delay = release_delay(ctx.spec, gs.releases + 1, obs.group_id(g), inc)
            held = ", ".join(f"{n} on {node}" for node, n in sorted(bound.items()))
            msg = (
                f"group {g}: {len(stuck)} of its {count} pods unschedulable for {timeout.seconds}s ({detail}) "
                f"while {sum(bound.values())} hold resources ({held}); {no_size}: releasing the group "
                f"(scaled to zero) so it holds nothing; it scales back up after {delay:.0f}s, once all "
                f"{count} pods fit"
            )
            ctx.add(ReleaseGroup("Unschedulable", msg, g, count, now + dt.timedelta(seconds=delay)))
            ctx.add(Blocked("GroupReleased", msg))  # the Degraded condition says why at once
            ctx.released.add(g)
            continue
        ctx.add(Blocked("Unschedulable", (
            f"group {g}: {len(stuck)} rank(s) unschedulable ({detail}) and {no_size}")))  # fmt: skip


def smaller_fitting(ctx: _Ctx, g: int, bound: dict[str, int]) -> int | None:
    """The largest valid size below the current one (>= minTensorParallelSize) at which group ``g``
    fits under the placement rules, its own bound pods freed; None: none, or degrading is off."""
    fp, obs = ctx.spec.failure_policy, ctx.obs
    if not fp.allow_degrade:
        return None
    sizes = [s for s in obs.valid_sizes if fp.min_tensor_parallel_size <= s < ctx.tp]
    fitting = [
        s for s in sizes  # unknown capacity: only the room of the group's own pods
        if (capacity_at(obs, ctx.spec, s) or Capacity.counting(0)).fits(pods_at(ctx.spec, s), bound, obs.group_id(g))
    ]  # fmt: skip
    return max(fitting) if fitting else None


def rule_released(ctx: _Ctx) -> None:
    """A released group stays at zero pods until its retry time; then it scales back up once its
    whole size fits (or, when allowed, degrades to a size that fits); until then it holds nothing."""
    obs, now = ctx.obs, ctx.obs.now
    for g in ctx.groups:
        gs = group_status(ctx.st, g)
        if gs.released_at is None or g in ctx.failed:
            continue
        ctx.released.add(g)
        count = gs.release_pods or pods_at(ctx.spec, ctx.tp)
        retry = parse_time(gs.retry_at) or now
        if now < retry:
            # (a time, not a countdown: the condition's message must not change every pass)
            why = f"group {g} was released (all-or-nothing) and holds no pods; it retries at {format_time(retry)}"
            ctx.add(Wait("GroupReleased", why, until=retry))
            ctx.add(Blocked("GroupReleased", why))
            continue
        cap = capacity_at(obs, ctx.spec, ctx.tp)
        if cap is not None and cap.fits(count, {}, obs.group_id(g)):
            msg = f"group {g}: room for all its {count} pods; scaling it back up"
            ctx.add(ResumeGroup("CapacityAvailable", msg, g))
            ctx.released.discard(g)
            continue
        to = None if ctx.resized else smaller_fitting(ctx, g, {})
        if to is not None:
            ctx.add(Degrade("Unschedulable", (
                f"group {g} was released and its {count} pods still do not fit; degrading tensor "
                f"parallelism {ctx.tp} -> {to}"), ctx.tp, to))  # fmt: skip
            ctx.add(ResumeGroup("Degraded", f"group {g}: scaling it back up at size {to}", g))
            ctx.tp, ctx.resized = to, True
            ctx.released.discard(g)
            continue
        why = (
            f"group {g} was released (all-or-nothing) and holds no pods: its {count} pods do not fit "
            f"the free capacity{' under the placement rules' if cap is not None and cap.topology_key else ''}; "
            "it scales back up once they do"
        )
        recheck = max(RELEASED_RECHECK_SECONDS, float(ctx.spec.failure_policy.backoff_seconds))
        ctx.add(Wait("GroupReleased", why, until=now + dt.timedelta(seconds=recheck)))
        ctx.add(Blocked("GroupReleased", why))


def rule_grow_back(ctx: _Ctx) -> None:
    """Rule 6: grow back when every (not Failed) group is Ready, after the hysteresis, and
    (capacity degrades) when the free capacity holds what *every* group needs to grow."""
    spec, obs, fp, st, now = ctx.spec, ctx.obs, ctx.spec.failure_policy, ctx.st, ctx.obs.now
    desired, tp = obs.desired_tp, ctx.tp
    if ctx.resized or ctx.recreated or ctx.unschedulable or ctx.held or ctx.released:
        return
    if not fp.scale_back_up or tp >= desired:
        return
    live = [g for g in ctx.groups if g not in ctx.failed]
    if not live or not all(group_ready(obs, g, ctx.incarnations[g], tp) for g in live):
        return
    bigger = [s for s in obs.valid_sizes if tp < s <= desired]
    if st.degraded_reason == "Unschedulable":
        groups = {obs.group_id(g): own_bound(obs, g, ctx.incarnations[g]) for g in live}
        bigger = [
            s for s in bigger
            if (cap := capacity_at(obs, spec, s)) is not None and cap.fits_all(pods_at(spec, s), groups)
        ]  # fmt: skip
    if not bigger:
        return
    until = grow_back_after(spec, st)
    if until is not None and now < until:
        ctx.add(Wait("ScaleUpPending", "waiting out the hysteresis before growing back", until=until))
        return
    to = max(bigger)
    ctx.add(ScaleUp("CapacityAvailable", f"growing tensor parallelism back {tp} -> {to}", tp, to))
    ctx.tp, ctx.resized = to, True


def grow_back_after(spec: TPInferenceClusterSpec, st: TPInferenceClusterStatus) -> dt.datetime | None:
    """The earliest grow-back: scaleBackUpDelaySeconds (capacity) or restartWindowSeconds (crashes)
    at the degraded size, doubled for every grow-back that went back down (capped at 8x), so a
    grow-back that cannot hold does not loop."""
    since = parse_time(st.degraded_since)
    if since is None:
        return None
    fp = spec.failure_policy
    base = fp.scale_back_up_delay_seconds if st.degraded_reason == "Unschedulable" else fp.restart_window_seconds
    return since + dt.timedelta(seconds=base * 2 ** min(st.failed_grow_backs, 3))


# ------------------------------------------------------------------------------ roll holding
def heals_in_place(ctx: _Ctx, g: int) -> bool:
    """A group recreated while the roll is held keeps the template it runs (if out of date)."""
    sts = ctx.obs.statefulsets.get(g)
    return ctx.hold is not None and sts is not None and sts.template_hash != ctx.want.get(g)


def template_problem(ctx: _Ctx, g: int) -> str | None:
    """Why a group on its wanted template, never Ready on it, cannot run it (None: no sign yet)."""
    sts = ctx.obs.statefulsets.get(g)
    if sts is None or sts.template_hash != ctx.want[g] or proven(ctx, g):
        return None
    if group_ready(ctx.obs, g, ctx.incarnations[g], sts.ranks):
        return None
    for p in current_pods(ctx.obs, g, ctx.incarnations[g]):
        found = rollout.pod_problem(p)
        if found is not None:
            return found[1]
    gs = group_status(ctx.st, g)  # its crashed pods are gone already: recreated, or Failed
    if gs.failure_reason in ("Crash", "CrashLoopBackOff") and (gs.failing_since or gs.failed_generation):
        return f"CrashLoopBackOff: {gs.failure_message or 'crashed'}"
    return None


def rolled_out(obs: Observation, st: TPInferenceClusterStatus, g: int, want: str) -> bool:
    """Does the group run its wanted template, and was it Ready on it (now or since it runs it)?
    A group that crashes on a template it was Ready on is recovering, not rolling."""
    sts = obs.statefulsets.get(g)
    if sts is None or sts.template_hash != want:
        return False
    return group_status(st, g).ready_hash == want or group_ready(obs, g, group_incarnation(st, obs, g), sts.ranks)


def roll_progress(
    spec: TPInferenceClusterSpec, obs: Observation, st: TPInferenceClusterStatus, want: dict[int, str]
) -> tuple[str, int, bool]:
    """(rollout key, groups rolled out, every group that has not Failed rolled out)."""
    failed = {g.group for g in st.groups if g.failed_generation is not None}
    done = {g for g in range(spec.replicas) if rolled_out(obs, st, g, want[g])}
    return rollout.key_of(want), len(done), all(g in done or g in failed for g in range(spec.replicas))


def roll_queued(
    spec: TPInferenceClusterSpec, obs: Observation, st: TPInferenceClusterStatus, want: dict[int, str]
) -> bool:
    """Does a group on its wanted template, not rolled out yet, wait behind scheduling gates (a
    queue such as Kueue has not admitted it)?  That wait is the queue's, not the template's."""
    for g in range(spec.replicas):
        sts = obs.statefulsets.get(g)
        if sts is None or sts.template_hash != want[g] or rolled_out(obs, st, g, want[g]):
            continue
        if any(p.scheduling_gates and not p.deleting for p in current_pods(obs, g, group_incarnation(st, obs, g))):
            return True
    return False


def roll_hold(ctx: _Ctx) -> Hold | None:
    """Is the roll held, and why: paused, a group that cannot run the new template, the deadline."""
    us = ctx.spec.update_strategy
    if us.paused:
        stale = [g for g, s in ctx.obs.statefulsets.items() if g in ctx.want and s.template_hash != ctx.want[g]]
        if stale:
            return Hold("RolloutPaused", f"updateStrategy.paused: {len(stale)} group(s) keep their old template")
    for g in ctx.groups:
        problem = template_problem(ctx, g)
        if problem is not None:
            return Hold("RolloutHalted", f"rollout halted at group {g}: {problem}")
    if us.paused:
        return None  # no deadline runs while paused
    key, updated, complete = roll_progress(ctx.spec, ctx.obs, ctx.st, ctx.want)
    queued = roll_queued(ctx.spec, ctx.obs, ctx.st, ctx.want)
    rec = rollout.track(ctx.st.rollout, key, updated, complete, ctx.obs.now, queued)
    until = rollout.deadline(rec, us.progress_deadline_seconds)
    if until is None:
        return None
    if ctx.obs.now < until:
        ctx.roll_deadline = until
        return None
    stuck = next(
        (g for g in ctx.groups if g not in ctx.failed and (s := ctx.obs.statefulsets.get(g)) is not None
         and s.template_hash == ctx.want[g] and not group_ready(ctx.obs, g, ctx.incarnations[g], s.ranks)),
        None,
    )  # fmt: skip
    where = (
        f"; halted at group {stuck}: {rollout.describe(current_pods(ctx.obs, stuck, ctx.incarnations[stuck]))}"
        if stuck is not None else ""
    )  # fmt: skip
    return Hold(
        "ProgressDeadlineExceeded",
        f"no group became Ready on the new template for {us.progress_deadline_seconds}s "
        f"(updateStrategy.progressDeadlineSeconds){where}",
    )


def rule_roll(ctx: _Ctx) -> None:
    """Rule 7: roll out-of-date groups within maxUnavailable; groups already down at once.
    With ``maxSurge``, Ready groups are rolled only while surge groups stand in (``rule_surge``).
    While the roll is held, only new groups are created."""
    spec, obs = ctx.spec, ctx.obs
    want = {g: obs.hash_for(ctx.tp, group_batch(spec, ctx.st, g, obs.restarted_at)) for g in ctx.groups}
    for a in ctx.out:  # this pass's halving
        if isinstance(a, HalveBatch):
            want[a.group] = obs.hash_for(ctx.tp, a.to_size)

    def is_unavailable(g: int) -> bool:
        sts = obs.statefulsets.get(g)
        return g in ctx.recreated or sts is None or not group_ready(obs, g, ctx.incarnations[g], sts.ranks)

    unavailable = {g for g in ctx.groups if is_unavailable(g)}
    budget = spec.update_strategy.max_unavailable
    surge = rule_surge(ctx, want, unavailable) if ctx.hold is None else None  # held: no new surge group
    for g in ctx.groups:
        if g in ctx.recreated or g in ctx.failed or g in ctx.released:
            continue
        sts = obs.statefulsets.get(g)
        if sts is None:
            ctx.add(RollGroup("Create", f"creating group {g}", g, want[g]))
            continue
        if sts.template_hash == want[g]:
            continue  # up to date, or rolling already: the shell replaces stale pods
        if ctx.hold is not None:
            continue  # reported once below
        if g in unavailable:
            ctx.add(RollGroup("Update", f"updating group {g} (not ready)", g, want[g]))
        elif surge is not None:
            surge_take_down(ctx, surge, g, want[g])
        elif len(unavailable) < budget:
            ctx.add(RollGroup("Update", f"rolling group {g}", g, want[g]))
            unavailable.add(g)
        else:
            ctx.add(Wait("RollingUpdate", f"group {g} waits for maxUnavailable={budget}"))
    if surge is not None:
        kept = surge.kept
    elif ctx.hold is not None and ctx.hold.reason == "RolloutPaused":
        kept = set(surge_slots(spec)) & set(obs.statefulsets)  # paused: standing surge groups serve on
    else:
        kept = set()  # no surge, or a halted roll: a surge group on a template that cannot run goes
    report_hold(ctx)
    for g in sorted(obs.statefulsets):
        if g >= spec.replicas and g not in kept:
            ctx.add(RemoveGroup("ScaleDown" if g not in surge_slots(spec) else "SurgeDone", f"removing group {g}", g))


# ------------------------------------------------------------------------------------- surge
@dataclass
class Surge:
    """Surge groups of this pass: the slots kept, and how many Ready groups may still go down."""

    kept: set[int]
    spare: int


def surge_slots(spec: TPInferenceClusterSpec) -> range:
    """Surge groups take the indices just past the spec's groups (StatefulSets ``<c>-g<replicas+i>``)."""
    return range(spec.replicas, spec.replicas + spec.update_strategy.max_surge)


def surge_groups(spec: TPInferenceClusterSpec, obs: Observation, actions: list[Action]) -> set[int]:
    """The surge groups that exist after ``actions`` (the shell renders and heals them too)."""
    slots = set(surge_slots(spec))
    made = {a.group for a in actions if isinstance(a, RollGroup) and a.group in slots}
    gone = {a.group for a in actions if isinstance(a, RemoveGroup)}
    return ((slots & set(obs.statefulsets)) | made) - gone


def rule_surge(ctx: _Ctx, want: dict[int, str], unavailable: set[int]) -> Surge | None:
    """``maxSurge``: bring up surge groups at the new template before any Ready group goes down.

    None when surging does not apply: maxSurge 0, a degraded cluster or a resize (degrade,
    grow-back): capacity is short or the groups are sick, and a surge group would compete for it.
    Surge groups are kept until every group is up to date and Ready; Ready groups go down only
    while Ready groups (surge ones included) stay at least ``replicas``, so serving capacity never
    drops during a roll.
    """
    spec, obs = ctx.spec, ctx.obs
    slots = list(surge_slots(spec))
    if not slots or ctx.tp < obs.desired_tp:
        return None
    stale = [g for g in ctx.groups if g not in ctx.recreated and (s := obs.statefulsets.get(g)) is not None
             and s.template_hash != want[g]]  # fmt: skip
    if ctx.resized or any(obs.statefulsets[g].ranks != ctx.tp for g in stale):
        return None  # a resize (degrade, grow-back) is about capacity: no extra group on top
    if not stale and not unavailable:
        return Surge(kept=set(), spare=0)  # roll done: the surge groups go
    existing = [g for g in slots if g in obs.statefulsets]
    kept = set(slots[: min(len(slots), len(stale))]) if stale else set(existing)
    target = obs.hash_for(ctx.tp, spec.runtime.max_batch_size)
    ready = 0
    for g in sorted(kept):
        sts = obs.statefulsets.get(g)
        if sts is None:
            ctx.add(RollGroup("Surge", f"bringing up surge group {g} before rolling a Ready group", g, target))
            continue
        if sts.template_hash != target:
            ctx.add(RollGroup("Surge", f"updating surge group {g}", g, target))
            continue
        inc = sts.incarnation
        failure = detect_failure(spec, obs, g, inc)
        if failure is not None:  # start it afresh: a broken group never becomes Ready
            ctx.add(RemoveGroup("SurgeFailed", f"surge group {g} failed ({failure.message}); recreating it", g))
            kept.discard(g)
        elif group_ready(obs, g, inc, sts.ranks):
            ready += 1
        else:
            why = _surge_unschedulable(ctx, g, inc)
            ctx.add(Blocked("SurgeUnschedulable", why) if why else Wait("Surge", f"surge group {g} is not Ready yet"))
    ready_groups = len([g for g in ctx.groups if g not in unavailable])
    return Surge(kept=kept, spare=ready_groups + ready - spec.replicas)


def _surge_unschedulable(ctx: _Ctx, g: int, incarnation: int) -> str | None:
    """Why a surge group cannot start, once a rank is unschedulable past the timeout."""
    timeout = dt.timedelta(seconds=ctx.spec.failure_policy.unschedulable_timeout_seconds)
    for p in current_pods(ctx.obs, g, incarnation):
        if p.unschedulable_since is not None and ctx.obs.now - p.unschedulable_since >= timeout:
            return (f"surge group {g} cannot be scheduled ({p.unschedulable_message or 'no node fits'}); "
                    "the roll waits: free capacity for one more group or set updateStrategy.maxSurge: 0")  # fmt: skip
    return None


def surge_take_down(ctx: _Ctx, surge: Surge, g: int, template: str) -> None:
    """Roll a Ready group only while Ready groups (surge ones included) stay at ``replicas``."""
    if surge.spare > 0:
        ctx.add(RollGroup("Update", f"rolling group {g} (surge groups serve meanwhile)", g, template))
        surge.spare -= 1
    else:
        ctx.add(Wait("RollingUpdate", f"group {g} waits for a Ready surge group (maxSurge)"))


def report_hold(ctx: _Ctx) -> None:
    """A held roll is reported (Progressing); a halted one also blocks (Degraded: it is a failure)."""
    if ctx.roll_deadline is not None:
        ctx.add(Wait("ProgressDeadline", "rollout progress deadline", until=ctx.roll_deadline))
    if ctx.hold is None:
        return
    ctx.add(ctx.hold)
    if ctx.hold.reason != "RolloutPaused":
        ctx.add(Blocked(ctx.hold.reason, ctx.hold.message))


# -------------------------------------------------------------------------------- transition
def transition(spec: TPInferenceClusterSpec, obs: Observation, actions: list[Action]) -> TPInferenceClusterStatus:
    """The status after ``actions``: bookkeeping only (pods are the shell's business)."""
    st = obs.status.model_copy(deep=True)
    now = obs.now
    stamp = format_time(now, micro=True)
    if any(isinstance(a, Reset) and a.group is None for a in actions):  # every group had failed
        st.groups = []
        st.current_tensor_parallel_size = None
        st.degraded_reason = st.degraded_since = st.grown_back_at = None
        st.failed_grow_backs = 0
    st.current_tensor_parallel_size = current_tp(st, obs.desired_tp)
    st.desired_tensor_parallel_size = obs.desired_tp
    if obs.restarted_at is not None:
        st.restarted_at = obs.restarted_at
    basis = batch_basis(spec, obs.restarted_at)
    groups = {g.group: g for g in st.groups}
    for g in groups.values():
        if g.batch_basis is not None and g.batch_basis != basis:  # maxBatchSize or restartedAt changed
            g.max_batch_size, g.batch_basis, g.floor_ooms = None, None, 0

    def gs(index: int) -> GroupStatus:
        if index not in groups:
            groups[index] = GroupStatus(group=index, incarnation=group_incarnation(obs.status, obs, index))
        return groups[index]

    halved = {a.group for a in actions if isinstance(a, HalveBatch)}
    lost_nodes = {a.group: a.node for a in actions if isinstance(a, ForceDelete)}
    touched: set[int] = set()
    for a in actions:
        group = getattr(a, "group", None)
        if isinstance(a, Reset) and a.group is not None:
            groups[a.group] = fresh_group(gs(a.group))
        elif isinstance(a, RecreateGroup):
            g = gs(a.group)
            g.incarnation = max(g.incarnation, group_incarnation(obs.status, obs, a.group)) + int(a.new_incarnation)
            if a.reason not in NOT_COUNTED:  # a lost node is not the group's crash loop
                g.restart_times = [format_time(t, micro=True) for t in restarts_in_window(spec, g, now)] + [stamp]
                g.restart_times = g.restart_times[-(spec.failure_policy.max_group_restarts + 1) :]
            if a.reason == "OOMKilled" and a.group not in halved:
                g.floor_ooms += 1
            g.lost_node = lost_nodes.get(a.group) if a.reason == "NodeLost" else None
            g.failing_since = g.failing_since or stamp
            g.failure_reason, g.failure_message = a.reason, a.message[:1024]
            g.pod_uids = []
            if not a.keep_template:  # healed in place: it keeps the template it has
                touched.add(a.group)
            st.restarts += 1
            st.last_failure = f"{format_time(now)} group {a.group}: {a.reason}: {a.message}"
        elif isinstance(a, ReleaseGroup):
            g = gs(a.group)
            g.incarnation = max(g.incarnation, group_incarnation(obs.status, obs, a.group)) + 1
            g.released_at = stamp
            g.retry_at = format_time(a.retry_at or now, micro=True)
            g.releases += 1
            g.release_pods = a.pods
            g.failure_reason, g.failure_message = a.reason, a.message[:1024]
            g.pod_uids = []
            touched.add(a.group)
        elif isinstance(a, ResumeGroup):
            g = gs(a.group)
            g.released_at = g.retry_at = None
            g.release_pods = None
            touched.add(a.group)
        elif isinstance(a, HalveBatch):
            g = gs(a.group)
            g.max_batch_size, g.batch_basis = a.to_size, basis
        elif isinstance(a, Degrade | ScaleUp):
            st.current_tensor_parallel_size = a.to_size
            st.degraded_reason = a.reason if isinstance(a, Degrade) else st.degraded_reason
            st.degraded_since = stamp
            for g in groups.values():
                g.restart_times = []  # a new size gets a fresh budget
            if isinstance(a, Degrade):
                if st.grown_back_at is not None:  # the last grow-back did not hold
                    st.failed_grow_backs += 1
                st.grown_back_at = None
                st.last_failure = f"{format_time(now)} degraded: {a.message}"
            else:
                st.grown_back_at = stamp
        elif isinstance(a, RollGroup):
            gs(a.group).pod_uids = []
            touched.add(a.group)
        elif isinstance(a, RemoveGroup):
            groups.pop(a.group, None)
        elif isinstance(a, MarkFailed):
            g = gs(a.group)
            g.failed_generation = obs.generation
            g.failure_reason, g.failure_message = a.reason, a.message[:1024]
            g.failing_since = g.failing_since or stamp
            st.last_failure = f"{format_time(now)} {a.message}"
        if isinstance(a, RECORDED) or (isinstance(a, RollGroup) and a.reason != "Create"):
            st.history.append(
                HistoryEntry(time=stamp, group=group, reason=a.reason, action=a.kind, message=a.message[:512])
            )
    tp = st.current_tensor_parallel_size
    if tp >= st.desired_tensor_parallel_size:
        st.degraded_reason = st.degraded_since = None
        resized = any(isinstance(a, Degrade | ScaleUp) for a in actions)
        live = [g.group for g in st.groups if g.failed_generation is None and g.group < spec.replicas]
        ready = all(group_ready(obs, g, group_incarnation(st, obs, g), tp) for g in live)
        if st.grown_back_at is not None and ready and not resized:  # the grow-back held
            st.grown_back_at, st.failed_grow_backs = None, 0
    for index in range(spec.replicas):
        gs(index)
    for g in groups.values():  # a group Ready again starts its release backoff afresh
        if g.releases and g.released_at is None and group_ready(obs, g.group, g.incarnation, tp):
            g.releases = 0
    st.groups = [groups[g] for g in sorted(groups) if g < spec.replicas]
    for index in touched & groups.keys():
        groups[index].template_hash = obs.hash_for(tp, group_batch(spec, st, index, obs.restarted_at))
    st.effective_max_batch_size = min(
        (group_batch(spec, st, g.group, obs.restarted_at) for g in st.groups), default=spec.runtime.max_batch_size
    )
    st.history = st.history[-HISTORY_LIMIT:]
    st.rollout = track_rollout(spec, obs, st)
    return st


def track_rollout(spec: TPInferenceClusterSpec, obs: Observation, st: TPInferenceClusterStatus) -> RolloutStatus | None:
    """The progress clock of the rollout after this pass (none while paused: a pause is not a stall;
    none while a queue holds a group's pods: a queue is not a stall either)."""
    if spec.update_strategy.paused:
        return None
    want = wanted_templates(spec, obs, st, st.current_tensor_parallel_size or obs.desired_tp)
    key, done, complete = roll_progress(spec, obs, st, want)
    return rollout.track(obs.status.rollout, key, done, complete, obs.now, roll_queued(spec, obs, st, want))


def next_wake(actions: list[Action], now: dt.datetime, default: float) -> float:
    """Seconds until the next reconcile is needed (``default`` when nothing is scheduled sooner)."""
    times = [(a.until - now).total_seconds() for a in actions if isinstance(a, Wait) and a.until is not None]
    return max(0.05, min([default, *times]))
