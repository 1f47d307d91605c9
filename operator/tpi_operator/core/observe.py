"""Observations: the few facts recovery needs, parsed (purely) from raw Kubernetes objects.

Recovery and status never look at raw objects; tests build these dataclasses directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tpi_contract import exitcodes, keys, ranks, termination

from tpi_operator.api.v1alpha1 import TPInferenceClusterStatus
from tpi_operator.core import render as r
from tpi_operator.core.capacity import Capacity


# ------------------------------------------------------------------------------------- time
def parse_time(value: str | dt.datetime | None) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def format_time(value: dt.datetime, micro: bool = False) -> str:
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# ------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class PodObs:
    """One rank, and the pod it runs in.

    A pod of several ranks (``ranksPerPod`` > 1) is observed as one ``PodObs`` per local rank
    (``rank_obs``), all with the pod's name, uid and container state, so everything that counts or
    lists ranks (status, readiness, group size) counts ranks, and each rank has its own Lease."""

    name: str
    group: int
    rank: int  # the global rank: ordinal x ranks_per_pod + local_rank
    uid: str = ""
    incarnation: int = 0
    template_hash: str | None = None
    phase: str = "Pending"
    ready: bool = False
    deleting: bool = False
    node: str | None = None
    restarts: int = 0
    termination_reason: str | None = None  # current or last container termination
    exit_code: int | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    unschedulable_since: dt.datetime | None = None
    unschedulable_message: str | None = None
    #: ``spec.schedulingGates`` (e.g. Kueue's ``kueue.x-k8s.io/admission``): the pod waits for
    #: whoever set them to admit it, holding no node; not unschedulable, so no release rule applies.
    scheduling_gates: tuple[str, ...] = ()
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None  # of the current or last container termination
    local_rank: int = 0
    ranks_per_pod: int = 1
    #: The first line of the launcher's termination message (which local rank ended the pod, how).
    termination_cause: str | None = None

    @property
    def lease_name(self) -> str:
        """This rank's heartbeat Lease (``tpi_contract.ranks.lease_name``)."""
        return ranks.lease_name(self.name, self.local_rank, self.ranks_per_pod)

    @property
    def who(self) -> str:
        """The rank, as messages name it."""
        if self.ranks_per_pod == 1:
            return self.name
        return f"{self.name} (local rank {self.local_rank}, rank {self.rank})"

    @property
    def oom(self) -> bool:
        """Killed by the kernel's OOM killer, or the runtime ran out of GPU memory mid-step.

        With several ranks per pod the launcher exits 137 when the OOM killer struck one of its
        ranks and says so in the termination message: the container's reason may then be Error."""
        if self.termination_reason == "OOMKilled" or exitcodes.is_out_of_memory(self.exit_code):
            return True
        cause = termination.parse(self.termination_cause)
        return self.exit_code == 137 and cause is not None and cause.oom_killed

    @property
    def crashed(self) -> bool:
        return (
            self.restarts > 0
            or self.phase == "Failed"
            or self.waiting_reason == "CrashLoopBackOff"
            or (self.exit_code is not None and self.exit_code != 0)
        )


@dataclass(frozen=True)
class LeaseObs:
    name: str
    renew_time: dt.datetime | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Operator's clock: when its watch delivered this version of the Lease (None: unknown).
    observed_at: dt.datetime | None = None
    #: Operator's clock: when it last saw renewTime change for the current pod (None: not since
    #: this pod exists, so the Lease says nothing about it yet).  Filled by ``heartbeat.track``.
    since: dt.datetime | None = None

    @property
    def live_batch(self) -> int | None:
        """The batch size the rank runs with now, as its runtime last reported it."""
        return _int(self.annotations.get(keys.LEASE_LIVE_BATCH_SIZE))


@dataclass(frozen=True)
class StsObs:
    group: int
    replicas: int
    template_hash: str | None = None
    incarnation: int = 0
    object_hash: str | None = None
    ranks_per_pod: int = 1

    @property
    def ranks(self) -> int:
        """The group size the StatefulSet runs: its pods x the ranks of each."""
        return self.replicas * self.ranks_per_pod


@dataclass(frozen=True)
class NodeObs:
    """A node hosting rank pods, as far as node loss goes."""

    name: str
    #: When the node stopped being usable (Ready False/Unknown: the node controller's transition
    #: time; deleted: when the operator first missed it); None while it is Ready.
    lost_since: dt.datetime | None = None
    why: str = ""


@dataclass(frozen=True)
class Observation:
    """Everything ``recovery.plan`` and ``status.compute`` read, at one instant."""

    now: dt.datetime
    generation: int
    desired_tp: int
    valid_sizes: list[int]
    status: TPInferenceClusterStatus
    pods: list[PodObs] = field(default_factory=list)
    leases: Mapping[str, LeaseObs] = field(default_factory=dict)
    statefulsets: Mapping[int, StsObs] = field(default_factory=dict)
    restarted_at: str | None = None
    free_rank_slots: int | None = None  # None: capacity unknown
    #: Ranks that fit as pods of n ranks, per n > 1 (whole pods only; absent: unknown).
    free_ranks_in_pods: Mapping[int, int] = field(default_factory=dict)
    #: Room under the placement rules for pods of n ranks, per n (absent: only the counts above).
    capacities: Mapping[int, Capacity] = field(default_factory=dict)
    #: A group's id (``placement.group_id``): it tells groups apart in capacity and seeds jitter.
    group_id: Callable[[int], str] = lambda group: f"g{group}"
    #: Nodes of the rank pods (only those; a node not listed is taken as healthy).
    nodes: Mapping[str, NodeObs] = field(default_factory=dict)
    #: (kind, name) of shared objects that exist but are not this cluster's -> who has them.
    foreign: Mapping[tuple[str, str], str] = field(default_factory=dict)
    #: Template hash a group would get at (tp, batch); closes over spec and identity.
    hash_for: Callable[[int, int], str] = lambda tp, batch: f"{tp}-{batch}"

    def free_ranks(self, ranks_per_pod: int) -> int | None:
        """Free capacity in ranks, when they run ``ranks_per_pod`` to a pod (None: unknown)."""
        if ranks_per_pod == 1 or self.free_rank_slots is None:
            return self.free_rank_slots
        return self.free_ranks_in_pods.get(ranks_per_pod)


# ----------------------------------------------------------------------------------- parsers
def rank_obs(pod: Mapping[str, Any]) -> list[PodObs]:
    """Every rank a pod runs (one per local rank, ``tpi.dev/ranks-per-pod``); [] for pods that
    are not rank pods."""
    first = pod_obs(pod)
    if first is None or first.ranks_per_pod == 1:
        return [first] if first is not None else []
    n = first.ranks_per_pod
    return [dataclasses.replace(first, rank=first.rank + local, local_rank=local) for local in range(n)]


def pod_obs(pod: Mapping[str, Any]) -> PodObs | None:
    """A rank pod from its raw object (its local rank 0); None for pods that are not rank pods."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    group = _int(labels.get(r.L_GROUP))
    ordinal = _int(labels.get(r.POD_INDEX_LABEL))
    if ordinal is None:  # older clusters: the ordinal is the name's suffix
        ordinal = _int(str(meta.get("name", "")).rsplit("-", 1)[-1])
    if group is None or ordinal is None:
        return None
    n = max(1, _int((meta.get("annotations") or {}).get(r.A_RANKS_PER_POD), 1) or 1)
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    sched = conditions.get("PodScheduled") or {}
    unsched_since = unsched_msg = None
    if sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        unsched_since = parse_time(sched.get("lastTransitionTime"))
        unsched_msg = sched.get("message")
    gates = tuple(str(g.get("name", "")) for g in (pod.get("spec") or {}).get("schedulingGates") or [])
    cstatuses = status.get("containerStatuses") or []
    cs = next((c for c in cstatuses if c.get("name") == "runtime"), cstatuses[0] if cstatuses else {})
    state = cs.get("state") or {}
    last = (cs.get("lastState") or {}).get("terminated") or {}
    term = state.get("terminated") or {}
    started = parse_time((state.get("running") or {}).get("startedAt")) or parse_time(status.get("startTime"))
    message = (term or last).get("message")
    return PodObs(
        name=meta.get("name", ""),
        group=group,
        rank=ordinal * n,
        uid=meta.get("uid", ""),
        incarnation=_int(labels.get(r.L_INCARNATION), 0) or 0,
        template_hash=labels.get(r.L_TEMPLATE_HASH),
        phase=status.get("phase") or "Pending",
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        node=(pod.get("spec") or {}).get("nodeName"),
        restarts=_int(cs.get("restartCount"), 0) or 0,
        termination_reason=term.get("reason") or last.get("reason"),
        exit_code=_int(term.get("exitCode")) if term else _int(last.get("exitCode")),
        waiting_reason=(state.get("waiting") or {}).get("reason"),
        waiting_message=(state.get("waiting") or {}).get("message"),
        unschedulable_since=unsched_since,
        unschedulable_message=unsched_msg,
        scheduling_gates=gates,
        started_at=started,
        finished_at=parse_time((term or last).get("finishedAt")),
        ranks_per_pod=n,
        termination_cause=message.split("\n", 1)[0][:512] if n > 1 and message else None,
    )


def lease_obs(lease: Mapping[str, Any]) -> LeaseObs:
    meta = lease.get("metadata") or {}
    spec = lease.get("spec") or {}
    return LeaseObs(
        name=meta.get("name", ""),
        renew_time=parse_time(spec.get("renewTime")),
        annotations=dict(meta.get("annotations") or {}),
        observed_at=parse_time(lease.get("observedAt")),
    )


def sts_obs(sts: Mapping[str, Any]) -> StsObs | None:
    meta = sts.get("metadata") or {}
    group = _int((meta.get("labels") or {}).get(r.L_GROUP))
    if group is None:
        return None
    annotations = meta.get("annotations") or {}
    return StsObs(
        group=group,
        replicas=_int((sts.get("spec") or {}).get("replicas"), 0) or 0,
        template_hash=annotations.get(r.L_TEMPLATE_HASH),
        incarnation=_int(annotations.get(r.L_INCARNATION), 0) or 0,
        object_hash=annotations.get(r.A_OBJECT_HASH),
        ranks_per_pod=max(1, _int(annotations.get(r.A_RANKS_PER_POD), 1) or 1),
    )


def node_obs(name: str, node: Mapping[str, Any] | None, missing_since: dt.datetime | None) -> NodeObs:
    """A node from its raw object (None: it does not exist, first missed at ``missing_since``)."""
    if node is None:
        return NodeObs(name, lost_since=missing_since, why="was deleted")
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") == "True":
        return NodeObs(name)
    state = "NotReady" if ready.get("status") == "False" else "unreachable (Ready Unknown)"
    reason = f": {ready['reason']}" if ready.get("reason") else ""
    return NodeObs(name, lost_since=parse_time(ready.get("lastTransitionTime")), why=f"is {state}{reason}")


def foreign_owner(obj: Mapping[str, Any], uid: str) -> str | None:
    """Why an existing object of our name is not ours (None: controlled by the cluster ``uid``)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    if any(ref.get("uid") == uid for ref in refs):
        return None
    owner = next((ref for ref in refs if ref.get("controller")), None)
    return f"(owned by {owner.get('kind')} {owner.get('name')})" if owner else "(not owned by this cluster)"
