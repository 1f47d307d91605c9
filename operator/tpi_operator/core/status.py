"""Status: (spec, observation, post-action bookkeeping, actions) -> the status to write.  Pure.

Phase, in priority order: Failed (every group gave up) > Recovering (a group is being recreated)
> Degraded (running below the desired TP size, blocked, a halted rollout, or some groups Failed
while the others serve) > Running (every group Ready) > Loading (every rank pod runs, weights
loading / group forming) > Pending.

Conditions: Ready (every group Ready); Progressing (False: Complete, RolloutPaused,
ProgressDeadlineExceeded or Failed; True: Reconciling, SchedulingGated (pods held by scheduling
gates: a queue such as Kueue has not admitted their group yet), Recovering or RolloutHalted, whose
message names the group, the pod and the kubelet's reason); Degraded (why serving is below the spec).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from tpi_contract import termination

from tpi_operator.api.v1alpha1 import (
    Condition,
    RankStatus,
    TPInferenceClusterSpec,
    TPInferenceClusterStatus,
)
from tpi_operator.core import render as r
from tpi_operator.core.observe import Observation, format_time, parse_time
from tpi_operator.core.recovery import (
    Action,
    Blocked,
    Hold,
    RollGroup,
    current_pods,
    force_deleted,
    group_batch,
    group_ready,
    spec_digest,
)
from tpi_operator.core.rollout import MESSAGE_CHARS


@dataclass(frozen=True)
class Recovered:
    """A group Ready again after a failure: feeds the failure-to-Ready histogram."""

    group: int
    reason: str
    seconds: float


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: dt.datetime,
) -> list[Condition]:
    """Upsert a condition; lastTransitionTime only moves when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    when = old.last_transition_time if old is not None and old.status == value else format_time(now)
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message[:32000],
        observed_generation=generation,
        last_transition_time=when,
    )
    return [c for c in conditions if c.type != type_] + [new]


def compute(
    spec: TPInferenceClusterSpec,
    ident: r.Identity,
    obs: Observation,
    st: TPInferenceClusterStatus,
    actions: list[Action],
) -> tuple[TPInferenceClusterStatus, list[Recovered]]:
    """Fill the observed parts of ``st`` (the result of ``recovery.transition``)."""
    st = st.model_copy(deep=True)
    now = obs.now
    # Pods force-deleted by this pass are gone: a group that keeps its incarnation (a lost node's,
    # ``recovery.keeps_incarnation``) must not look Ready on them.
    forced = set(force_deleted(actions).values())
    obs = replace(obs, pods=[p for p in obs.pods if p.uid not in forced]) if forced else obs
    recovered: list[Recovered] = []
    rolled = {a.group for a in actions if isinstance(a, RollGroup)}
    ranks: list[RankStatus] = []
    ready_groups = 0
    total = ready_ranks = 0
    all_running = True
    for gs in st.groups:
        sts = obs.statefulsets.get(gs.group)
        size = sts.ranks if sts is not None and gs.group not in rolled else st.current_tensor_parallel_size
        size = size or 0
        total += size
        pods = current_pods(obs, gs.group, gs.incarnation)
        for p in pods:
            lease = obs.leases.get(p.lease_name)
            several = p.ranks_per_pod > 1  # the fields of several ranks per pod (absent otherwise)
            cause = termination.parse(p.termination_cause)
            ranks.append(
                RankStatus(
                    group=p.group,
                    rank=p.rank,
                    pod=p.name,
                    local_rank=p.local_rank if several else None,
                    # the launcher's message names the local rank that ended the pod: shown on it
                    termination_message=p.termination_cause
                    if several and (cause is None or cause.local_rank == p.local_rank)
                    else None,
                    node=p.node,
                    phase=p.phase,
                    ready=p.ready,
                    restarts=p.restarts,
                    last_termination_reason=p.termination_reason,
                    last_exit_code=p.exit_code,
                    waiting_reason=p.waiting_reason,
                    waiting_message=p.waiting_message[:MESSAGE_CHARS] if p.waiting_message else None,
                    last_heartbeat=format_time(lease.renew_time) if lease and lease.renew_time else None,
                    effective_batch_size=lease.live_batch if lease else None,
                )
            )
            ready_ranks += 1 if p.ready and p.rank < size else 0
        if len(pods) < size or any(p.phase != "Running" for p in pods):
            all_running = False
        ready = sts is not None and group_ready(obs, gs.group, gs.incarnation, sts.ranks)
        ready = ready and gs.group not in rolled
        gs.ready = ready
        if ready and sts is not None:
            gs.ready_hash = sts.template_hash
            batch = group_batch(spec, st, gs.group, obs.restarted_at)
            if sts.template_hash == obs.hash_for(st.current_tensor_parallel_size or sts.ranks, batch):
                st.ready_spec = spec_digest(obs)  # this spec works (at some size and batch)
        if ready:
            ready_groups += 1
            if not gs.pod_uids:  # the formed group: a replaced rank pod from now on breaks it
                gs.pod_uids = [p.uid for p in pods]
            if gs.failing_since:
                since = parse_time(gs.failing_since)
                if since is not None:
                    recovered.append(Recovered(gs.group, gs.failure_reason or "", (now - since).total_seconds()))
                gs.failing_since = None
                gs.failure_reason = None
    st.ranks = ranks
    st.ready_ranks, st.total_ranks = ready_ranks, total
    st.replicas = len([g for g in st.groups if g.group in obs.statefulsets or g.group in rolled])
    st.ready_replicas = ready_groups
    st.observed_generation = obs.generation
    st.selector = r.rank0_selector(ident.name)
    st.endpoint = r.endpoint(spec, ident) if ready_groups else None
    st.tp = f"{st.current_tensor_parallel_size}/{st.desired_tensor_parallel_size}"
    st.ready = f"{ready_ranks}/{total}"

    blocked = next((a for a in actions if isinstance(a, Blocked)), None)
    hold = next((a for a in actions if isinstance(a, Hold)), None)
    failed = [g for g in st.groups if g.failed_generation is not None]
    failed_msg = "; ".join(f"group {g.group} Failed: {g.failure_reason}: {g.failure_message}" for g in failed)
    recovering = [g for g in st.groups if g.failing_since and g.failed_generation is None]
    degraded = (st.current_tensor_parallel_size or 0) < (st.desired_tensor_parallel_size or 0)
    all_ready = ready_groups == spec.replicas
    if failed and len(failed) == spec.replicas:
        st.phase = "Failed"
    elif recovering:
        st.phase = "Recovering"
    elif degraded or blocked or failed:
        st.phase = "Degraded"
    elif all_ready:
        st.phase = "Running"
    elif all_running:
        st.phase = "Loading"
    else:
        st.phase = "Pending"

    gen = obs.generation
    conds = st.conditions
    conds = set_condition(
        conds,
        "Ready",
        all_ready and st.phase != "Failed",
        "AllGroupsReady" if all_ready else "GroupsNotReady",
        f"{ready_groups}/{spec.replicas} groups ready, {ready_ranks}/{total} ranks ready",
        gen,
        now,
    )
    if st.phase == "Failed":
        conds = set_condition(conds, "Progressing", False, "Failed", failed_msg, gen, now)
    elif hold is not None:
        halted = hold.reason == "RolloutHalted"  # still trying: False once paused or past the deadline
        conds = set_condition(conds, "Progressing", halted, hold.reason, hold.message, gen, now)
    elif recovering:
        g = recovering[0]
        off = f" off lost node {g.lost_node}" if g.failure_reason == "NodeLost" and g.lost_node else ""
        conds = set_condition(
            conds,
            "Progressing",
            True,
            "Recovering",
            f"recreating group {g.group}{off} ({g.failure_reason})",
            gen,
            now,
        )
    elif (gated := gated_message(obs, st)) is not None:
        conds = set_condition(conds, "Progressing", True, "SchedulingGated", gated, gen, now)
    elif not all_ready or rolled:
        conds = set_condition(conds, "Progressing", True, "Reconciling", "groups are starting or rolling", gen, now)
    else:
        conds = set_condition(conds, "Progressing", False, "Complete", "all groups are up to date", gen, now)
    if st.phase == "Failed":
        conds = set_condition(conds, "Degraded", True, "Failed", failed_msg, gen, now)
    elif blocked:
        conds = set_condition(conds, "Degraded", True, blocked.reason, blocked.message, gen, now)
    elif failed:
        msg = f"{failed_msg}; the other groups serve"
        conds = set_condition(conds, "Degraded", True, "GroupFailed", msg, gen, now)
    elif degraded:
        conds = set_condition(
            conds,
            "Degraded",
            True,
            st.degraded_reason or "Degraded",
            f"running at tensorParallelSize {st.current_tensor_parallel_size} instead of "
            f"{st.desired_tensor_parallel_size}",
            gen,
            now,
        )
    else:
        conds = set_condition(conds, "Degraded", False, "AsDesired", "running at the desired size", gen, now)
    st.conditions = conds
    return st, recovered


def gated_message(obs: Observation, st: TPInferenceClusterStatus) -> str | None:
    """Which groups wait behind scheduling gates, and why that is not a failure (None: none do).

    A gated pod is not unschedulable: the scheduler has not even looked at it, and it holds no
    node. With Kueue (``scheduling.kueue``), the group's pods stay gated until its Workload gets
    quota, however long that takes."""
    parts = []
    for gs in st.groups:
        pods = {p.name: p for p in current_pods(obs, gs.group, gs.incarnation) if p.scheduling_gates and not p.deleting}
        if pods:
            gates = sorted({g for p in pods.values() for g in p.scheduling_gates})
            parts.append(f"group {gs.group}: {len(pods)} pod(s) held by scheduling gates ({', '.join(gates)})")
    if not parts:
        return None
    return (
        "; ".join(parts) + ": not admitted yet by the queue or gang scheduler that set the gates "
        "(Kueue: see the group's Workload); they hold no node and are never released for waiting"
    )


def invalid(
    status: TPInferenceClusterStatus,
    generation: int,
    reason: str,
    message: str,
    now: dt.datetime,
    *,
    phase: str,
) -> TPInferenceClusterStatus:
    """Status for a spec the operator cannot act on (sizing error, unparsable spec)."""
    st = status.model_copy(deep=True)
    st.phase = phase  # type: ignore[assignment]
    st.observed_generation = generation
    if not (st.last_failure or "").endswith(f" {reason}: {message}"):
        st.last_failure = f"{format_time(now)} {reason}: {message}"  # same failure: keep its time
    conds = set_condition(st.conditions, "Ready", False, reason, message, generation, now)
    conds = set_condition(conds, "Progressing", False, reason, message, generation, now)
    st.conditions = set_condition(conds, "Degraded", True, reason, message, generation, now)
    return st
