"""Recovery: (spec, observation) -> actions, and actions -> the next status.  All pure.

The rules, in the order ``plan`` applies them:

1. A Failed cluster does nothing (pods are kept for debugging) until its generation changes or
   ``tpi.dev/restartedAt`` changes, which resets it.
2. A group with a crashed container, an OOM-killed container, a deleted/replaced rank pod or a
   hung rank (Lease not renewed for ``heartbeatTimeoutSeconds`` while the pod runs) is recreated
   as a whole: every rank must re-form the process group.  OOM also halves the effective batch
   size (never below ``oomBatchSizeFloor``).  Recreates back off exponentially
   (``backoffSeconds * 2^(n-1)``, capped), the first one is immediate.
3. A group recreated ``maxGroupRestarts`` times within ``restartWindowSeconds`` degrades the
   cluster to the next smaller valid TP size >= ``minTensorParallelSize`` when ``allowDegrade``,
   else the cluster is marked Failed with a message saying why.
4. A rank Pending-unschedulable for ``unschedulableTimeoutSeconds`` degrades to a size that fits
   (the group's scheduled ranks plus free capacity).
5. A degraded cluster grows back (``scaleBackUp``) when every group is Ready and, for capacity
   degrades, capacity is free, for crash degrades, after a quiet ``restartWindowSeconds``.
6. Groups whose pod template is out of date (spec change, new size or batch, ``restartedAt``) are
   rolled one at a time within ``maxUnavailable``; groups already down are rolled at once.  A
   group counts as done only when Ready.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from tpi_operator.api.v1alpha1 import (
    HISTORY_LIMIT,
    GroupStatus,
    HistoryEntry,
    TPInferenceClusterSpec,
    TPInferenceClusterStatus,
)
from tpi_operator.core.observe import Observation, PodObs, format_time, parse_time
from tpi_operator.core.sizing import next_smaller

#: A Lease renewed at most this much before the container started still counts for it.
_CLOCK_SLACK = dt.timedelta(seconds=1)


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
    """Delete every pod of a group (new incarnation) so all ranks re-form the process group."""

    group: int = 0


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
class RollGroup(Action):
    """Apply the group's current template and replace its out-of-date pods."""

    group: int = 0
    template_hash: str = ""


@dataclass(frozen=True)
class RemoveGroup(Action):
    group: int = 0


@dataclass(frozen=True)
class MarkFailed(Action):
    pass


@dataclass(frozen=True)
class Reset(Action):
    """Leave Failed: the spec changed or a restart was requested."""


@dataclass(frozen=True)
class Blocked(Action):
    """Nothing can be done now (reported in conditions)."""


@dataclass(frozen=True)
class Wait(Action):
    """Reconcile again at ``until`` (None: only on a change)."""

    until: dt.datetime | None = None


#: Actions recorded in status history and emitted as Events.
RECORDED = (RecreateGroup, HalveBatch, Degrade, ScaleUp, MarkFailed, Reset, RemoveGroup)


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


def effective_batch(spec: TPInferenceClusterSpec, status: TPInferenceClusterStatus) -> int:
    eff = status.effective_max_batch_size or spec.runtime.max_batch_size
    return max(1, min(eff, spec.runtime.max_batch_size))


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
    return len(pods) == sts.replicas == size and all(
        p.ready and p.template_hash == sts.template_hash for p in pods
    )


def detect_failure(
    spec: TPInferenceClusterSpec, obs: Observation, group: int, incarnation: int
) -> GroupFailure | None:
    """Why a group must be recreated, if it must."""
    pods = current_pods(obs, group, incarnation)
    for p in pods:
        if p.oom:
            what = "was OOMKilled" if p.termination_reason == "OOMKilled" else "ran out of GPU memory"
            return GroupFailure(group, "OOMKilled", f"container of {p.name} {what} (exit code {p.exit_code})")
    for p in pods:
        if p.crashed:
            code = f" (exit code {p.exit_code})" if p.exit_code is not None else ""
            what = p.waiting_reason or p.termination_reason or p.phase
            return GroupFailure(group, "Crash", f"{p.name} crashed: {what}{code}, {p.restarts} restarts")
    recorded = group_status(obs.status, group).pod_uids
    sts = obs.statefulsets.get(group)
    if recorded and sts is not None and sts.replicas == len(recorded):
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
    for p in pods:
        lease = obs.leases.get(p.name)
        if p.phase != "Running" or lease is None or lease.renew_time is None:
            continue
        # Only a heartbeat that started in this container can go stale: one left over from a
        # previous pod says nothing, and a runtime that never beats is the probes' business.
        started = p.started_at is None or lease.renew_time >= p.started_at - _CLOCK_SLACK
        if started and obs.now - lease.renew_time > timeout:
            age = (obs.now - lease.renew_time).total_seconds()
            return GroupFailure(group, "HeartbeatTimeout", f"{p.name} hung: Lease not renewed for {age:.0f}s")
    return None


def next_heartbeat_deadline(spec: TPInferenceClusterSpec, obs: Observation) -> dt.datetime | None:
    timeout = dt.timedelta(seconds=spec.failure_policy.heartbeat_timeout_seconds)
    deadlines = [
        lease.renew_time + timeout + dt.timedelta(milliseconds=100)
        for p in obs.pods
        if p.phase == "Running" and not p.deleting
        and (lease := obs.leases.get(p.name)) is not None and lease.renew_time is not None
    ]  # fmt: skip
    return min(deadlines) if deadlines else None


# -------------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    actions: list[Action] = field(default_factory=list)

    def add(self, action: Action) -> None:
        self.actions.append(action)


def plan(spec: TPInferenceClusterSpec, obs: Observation) -> list[Action]:
    """Decide what to do about the observed cluster; see the module docstring for the rules."""
    st, now, fp = obs.status, obs.now, spec.failure_policy
    out = _Plan()

    if st.failed_generation is not None:
        restart_requested = obs.restarted_at is not None and obs.restarted_at != st.restarted_at
        if obs.generation <= st.failed_generation and not restart_requested:
            return [Wait(reason="Failed", message="cluster failed; edit the spec or set tpi.dev/restartedAt")]
        out.add(Reset("Retry", "spec changed" if not restart_requested else "restart requested"))
        st = st.model_copy(update={"groups": [], "current_tensor_parallel_size": None})

    desired = obs.desired_tp
    tp = current_tp(st, desired)
    batch = effective_batch(spec, st)
    groups = range(spec.replicas)
    incarnations = {g: group_incarnation(st, obs, g) for g in groups}
    resized = False

    # --- failures: recreate with backoff, degrade or fail past the budget -------------------
    recreated: set[int] = set()
    for g in groups:
        failure = detect_failure(spec, obs, g, incarnations[g])
        if failure is None:
            continue
        recent = restarts_in_window(spec, group_status(st, g), now)
        if len(recent) >= fp.max_group_restarts:
            why = (
                f"group {g} was recreated {len(recent)} times within {fp.restart_window_seconds}s "
                f"(last: {failure.reason}: {failure.message})"
            )
            to = next_smaller(obs.valid_sizes, tp, fp.min_tensor_parallel_size) if fp.allow_degrade else None
            if to is not None:
                out.add(Degrade("CrashLoop", f"{why}; degrading tensor parallelism {tp} -> {to}", tp, to))
                tp, resized = to, True
                break
            if not fp.allow_degrade:
                cannot = "degrading is disabled (failurePolicy.allowDegrade: false)"
            else:
                cannot = (
                    f"no valid tensor-parallel size below {tp} is >= "
                    f"minTensorParallelSize={fp.min_tensor_parallel_size}"
                )
            out.add(MarkFailed("RestartBudgetExhausted", f"{why}; {cannot}; pods kept for debugging"))
            return out.actions
        delay = dt.timedelta(seconds=backoff_seconds(spec, len(recent)))
        if recent and now < recent[-1] + delay:
            out.add(
                Wait(failure.reason, f"group {g} backing off: {failure.message}", until=recent[-1] + delay)
            )
            continue
        if failure.reason == "OOMKilled" and batch > fp.oom_batch_size_floor:
            new = max(fp.oom_batch_size_floor, batch // 2)
            out.add(HalveBatch("OOMKilled", f"effective batch size {batch} -> {new}", g, batch, new))
            batch = new
        out.add(RecreateGroup(failure.reason, failure.message, g))
        recreated.add(g)

    # --- unschedulable ranks: degrade to what fits -------------------------------------------
    timeout = dt.timedelta(seconds=fp.unschedulable_timeout_seconds)
    unschedulable = False
    for g in groups:
        if resized or g in recreated:
            continue
        pods = current_pods(obs, g, incarnations[g])
        stuck = [p for p in pods if p.phase == "Pending" and p.unschedulable_since is not None]
        if not stuck:
            continue
        unschedulable = True
        since = min(p.unschedulable_since for p in stuck if p.unschedulable_since is not None)
        if now - since < timeout:
            out.add(
                Wait("Unschedulable", f"group {g}: {len(stuck)} rank(s) unschedulable", until=since + timeout)
            )
            continue
        scheduled = sum(1 for p in pods if p.node)
        fit = scheduled + (obs.free_rank_slots or 0)
        detail = stuck[0].unschedulable_message or "no node fits"
        to = (
            next_smaller(obs.valid_sizes, tp, fp.min_tensor_parallel_size, at_most=fit)
            if fp.allow_degrade
            else None
        )
        if to is not None:
            msg = (
                f"group {g}: {len(stuck)} rank(s) unschedulable for {timeout.seconds}s ({detail}); "
                f"degrading tensor parallelism {tp} -> {to}"
            )
            out.add(Degrade("Unschedulable", msg, tp, to))
            tp, resized = to, True
            break
        out.add(
            Blocked(
                "Unschedulable",
                f"group {g}: {len(stuck)} rank(s) unschedulable ({detail}) and no smaller valid size "
                f">= minTensorParallelSize={fp.min_tensor_parallel_size} fits {fit} rank(s)",
            )
        )

    # --- grow back ------------------------------------------------------------------------------
    if not resized and not recreated and not unschedulable and fp.scale_back_up and tp < desired:
        all_ready = all(group_ready(obs, g, incarnations[g], tp) for g in groups)
        degraded = (parse_time(h.time) for h in st.history if h.action == "Degrade")
        last = max((t for t in degraded if t is not None), default=None)  # an unparsable time counts not
        quiet = last is None or (now - last).total_seconds() >= fp.restart_window_seconds
        bigger = [s for s in obs.valid_sizes if tp < s <= desired]
        if st.degraded_reason == "Unschedulable" and obs.free_rank_slots is not None:
            bigger = [s for s in bigger if s - tp <= obs.free_rank_slots]
            quiet = True
        if all_ready and bigger and quiet:
            to = max(bigger)
            out.add(ScaleUp("CapacityAvailable", f"growing tensor parallelism back {tp} -> {to}", tp, to))
            tp, resized = to, True
        elif all_ready and bigger and last is not None:
            until = last + dt.timedelta(seconds=fp.restart_window_seconds)
            out.add(Wait("ScaleUpPending", "waiting for a quiet window before growing back", until=until))

    # --- rolling ----------------------------------------------------------------------------------
    want = obs.hash_for(tp, batch)

    def is_unavailable(g: int) -> bool:
        sts = obs.statefulsets.get(g)
        return g in recreated or sts is None or not group_ready(obs, g, incarnations[g], sts.replicas)

    unavailable = {g for g in groups if is_unavailable(g)}
    budget = spec.update_strategy.max_unavailable
    for g in groups:
        if g in recreated:
            continue
        sts = obs.statefulsets.get(g)
        if sts is None:
            out.add(RollGroup("Create", f"creating group {g}", g, want))
            continue
        if sts.template_hash == want:
            continue  # up to date, or rolling already: the shell replaces stale pods
        if g in unavailable:
            out.add(RollGroup("Update", f"updating group {g} (not ready)", g, want))
        elif len(unavailable) < budget:
            out.add(RollGroup("Update", f"rolling group {g}", g, want))
            unavailable.add(g)
        else:
            out.add(Wait("RollingUpdate", f"group {g} waits for maxUnavailable={budget}"))
    for g in sorted(obs.statefulsets):
        if g >= spec.replicas:
            out.add(RemoveGroup("ScaleDown", f"removing group {g}", g))

    deadline = next_heartbeat_deadline(spec, obs)
    if deadline is not None:
        out.add(Wait("Heartbeat", "next heartbeat deadline", until=deadline))
    return out.actions


# -------------------------------------------------------------------------------- transition
def transition(
    spec: TPInferenceClusterSpec, obs: Observation, actions: list[Action]
) -> TPInferenceClusterStatus:
    """The status after ``actions``: bookkeeping only (pods are the shell's business)."""
    st = obs.status.model_copy(deep=True)
    now = obs.now
    stamp = format_time(now, micro=True)
    if any(isinstance(a, Reset) for a in actions):
        st.failed_generation = None
        st.groups = []
        st.current_tensor_parallel_size = None
        st.degraded_reason = None
    st.current_tensor_parallel_size = current_tp(st, obs.desired_tp)
    st.desired_tensor_parallel_size = obs.desired_tp
    st.effective_max_batch_size = effective_batch(spec, st)
    if obs.restarted_at is not None:
        st.restarted_at = obs.restarted_at
    groups = {g.group: g for g in st.groups}

    def gs(index: int) -> GroupStatus:
        if index not in groups:
            groups[index] = GroupStatus(group=index, incarnation=group_incarnation(obs.status, obs, index))
        return groups[index]

    touched: set[int] = set()
    for a in actions:
        group = getattr(a, "group", None)
        if isinstance(a, RecreateGroup):
            g = gs(a.group)
            g.incarnation = max(g.incarnation, group_incarnation(obs.status, obs, a.group)) + 1
            g.restart_times = [format_time(t, micro=True) for t in restarts_in_window(spec, g, now)] + [stamp]
            g.restart_times = g.restart_times[-(spec.failure_policy.max_group_restarts + 1) :]
            g.failing_since = g.failing_since or stamp
            g.failure_reason = a.reason
            g.pod_uids = []
            touched.add(a.group)
            st.restarts += 1
            st.last_failure = f"{format_time(now)} group {a.group}: {a.reason}: {a.message}"
        elif isinstance(a, HalveBatch):
            st.effective_max_batch_size = a.to_size
        elif isinstance(a, Degrade | ScaleUp):
            st.current_tensor_parallel_size = a.to_size
            st.degraded_reason = a.reason if isinstance(a, Degrade) else None
            for g in groups.values():
                g.restart_times = []  # a new size gets a fresh budget
            if isinstance(a, Degrade):
                st.last_failure = f"{format_time(now)} degraded: {a.message}"
        elif isinstance(a, RollGroup):
            gs(a.group).pod_uids = []
            touched.add(a.group)
        elif isinstance(a, RemoveGroup):
            groups.pop(a.group, None)
        elif isinstance(a, MarkFailed):
            st.failed_generation = obs.generation
            st.last_failure = f"{format_time(now)} {a.message}"
        if isinstance(a, RECORDED) or (isinstance(a, RollGroup) and a.reason != "Create"):
            st.history.append(
                HistoryEntry(time=stamp, group=group, reason=a.reason, action=a.kind, message=a.message[:512])
            )
    if st.current_tensor_parallel_size >= st.desired_tensor_parallel_size:
        st.degraded_reason = None
    for index in touched & groups.keys():
        groups[index].template_hash = obs.hash_for(
            st.current_tensor_parallel_size, st.effective_max_batch_size
        )
    for index in range(spec.replicas):
        gs(index)
    st.groups = [groups[g] for g in sorted(groups) if g < spec.replicas]
    st.history = st.history[-HISTORY_LIMIT:]
    return st


def next_wake(actions: list[Action], now: dt.datetime, default: float) -> float:
    """Seconds until the next reconcile is needed (``default`` when nothing is scheduled sooner)."""
    times = [(a.until - now).total_seconds() for a in actions if isinstance(a, Wait) and a.until is not None]
    return max(0.05, min([default, *times]))
