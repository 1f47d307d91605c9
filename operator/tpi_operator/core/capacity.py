"""Free capacity, in ranks: how many more rank pods the nodes could take.  Pure.

A deliberately small model of the scheduler: node selector, taints vs tolerations, cordoning,
readiness and allocatable minus the requests of pods already bound, and the operator's own
placement rules (``Capacity``: a topologyKey domain must hold a whole group, exclusive domains hold
one group).  The user's own affinity is ignored, so the answer is an upper bound; a wrong guess
only costs one more unschedulable timeout.

The shell feeds it from watches and narrow queries, never a list of every pod: nodes come from
the operator's node index (``slim_node``), and what is bound to a node from a query selected on
``spec.nodeName`` (``node_usage``), made only for the nodes ``candidate_nodes`` keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tpi_contract import keys

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec
from tpi_operator.core import placement
from tpi_operator.core.sizing import parse_quantity

#: resource -> amount: what one pod requests, or what is bound to one node.
Amounts = Mapping[str, float]


def rank_request(spec: TPInferenceClusterSpec, ranks_per_pod: int = 1) -> dict[str, float]:
    """What one pod of ``ranks_per_pod`` ranks requests (``ranks_per_pod`` x each rank's)."""
    req: dict[str, float] = {}
    if spec.resources.cpu:
        req["cpu"] = parse_quantity(spec.resources.cpu)
    if spec.resources.memory:
        req["memory"] = parse_quantity(spec.resources.memory)
    if spec.resources.gpus:
        req["nvidia.com/gpu"] = float(spec.resources.gpus)
    req = {k: v * ranks_per_pod for k, v in req.items()}
    req["pods"] = 1.0
    return req


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """What capacity and node-loss detection read of a Node (kept per node in the operator's index:
    its images, addresses and other conditions would only cost memory)."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    ready = [dict(c) for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {
        "metadata": {"name": meta.get("name", ""), "labels": dict(meta.get("labels") or {})},
        "spec": {
            "unschedulable": bool(spec.get("unschedulable")),
            "taints": [dict(t) for t in spec.get("taints") or []],
        },
        "status": {"allocatable": dict(status.get("allocatable") or {}), "conditions": ready},
    }


def _tolerated(taint: Mapping[str, Any], tolerations: list[dict[str, Any]]) -> bool:
    if taint.get("effect") == "PreferNoSchedule":
        return True
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_eligible(node: Mapping[str, Any], spec: TPInferenceClusterSpec) -> bool:
    meta, nspec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    if nspec.get("unschedulable"):
        return False
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("status") != "True":
        return False
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in spec.scheduling.node_selector.items()):
        return False
    tolerations = [t.wire() for t in spec.scheduling.tolerations]
    return all(_tolerated(t, tolerations) for t in nspec.get("taints") or [])


def allocatable(node: Mapping[str, Any]) -> dict[str, float]:
    return {k: parse_quantity(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()}


def slots_on(req: Amounts, alloc: Amounts, used: Amounts) -> int:
    """Ranks of request ``req`` that still fit in ``alloc`` once ``used`` is taken."""
    fit: int | None = None
    for k, amount in req.items():
        free = alloc.get(k, 0.0) - used.get(k, 0.0)
        n = int(free // amount) if amount > 0 else 0
        fit = n if fit is None else min(fit, n)
    return max(0, fit or 0)


#: Taints the node lifecycle sets by itself (not ready, unreachable, cordoned): they say how a
#: node is now, not what it is, so they do not move the default layout.
_LIFECYCLE_TAINTS = "node.kubernetes.io/"


def most_gpus_on_a_node(spec: TPInferenceClusterSpec, nodes: Iterable[Mapping[str, Any]]) -> int | None:
    """The most ``nvidia.com/gpu`` any node this cluster's ranks may use offers (None: none offers
    any): what the default ranks per pod must fit (``layout.resolved``).  Nodes count by their
    labels and taints, not their health: a node that dies or is cordoned for a while does not
    re-lay every group out."""
    tolerations = [t.wire() for t in spec.scheduling.tolerations]
    found = [0.0]
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in spec.scheduling.node_selector.items()):
            continue
        taints = (node.get("spec") or {}).get("taints") or []
        if all(_tolerated(t, tolerations) for t in taints if not str(t.get("key", "")).startswith(_LIFECYCLE_TAINTS)):
            found.append(allocatable(node).get("nvidia.com/gpu", 0.0))
    return int(max(found)) or None


def candidate_nodes(spec: TPInferenceClusterSpec, nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """The nodes whose usage must be read: eligible, and roomy enough for one rank when empty.
    (A node that could not take a rank even empty needs no query.)"""
    req = rank_request(spec)
    return sorted(
        (node.get("metadata") or {}).get("name", "")
        for node in nodes
        if node_eligible(node, spec) and slots_on(req, allocatable(node), {}) > 0
    )


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    total: dict[str, float] = {"pods": 1.0}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            total[k] = total.get(k, 0.0) + parse_quantity(v)
    return total


def node_usage(pods: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """node name -> the summed requests of the pods bound there and not finished."""
    used: dict[str, dict[str, float]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        bucket = used.setdefault(node, {})
        for k, v in pod_requests(pod).items():
            bucket[k] = bucket.get(k, 0.0) + v
    return used


def free_rank_slots(
    spec: TPInferenceClusterSpec,
    nodes: Iterable[Mapping[str, Any]],
    used: Mapping[str, Amounts],
    ranks_per_pod: int = 1,
) -> int:
    """How many ranks of ``spec`` still fit on eligible nodes, given what is bound to each, when
    they run ``ranks_per_pod`` to a pod: whole pods only (a node with 3 free GPUs holds one pod
    of 2 GPU ranks, so 2 ranks, not 3)."""
    req = rank_request(spec, ranks_per_pod)
    slots = 0
    for node in nodes:
        if node_eligible(node, spec):
            name = (node.get("metadata") or {}).get("name", "")
            slots += slots_on(req, allocatable(node), used.get(name, {})) * ranks_per_pod
    return slots


# ------------------------------------------------------------------------------ placement rules
@dataclass(frozen=True)
class NodeRoom:
    """One eligible node: how many more pods of the spec it takes, and where it is."""

    name: str
    slots: int
    domain: str | None = None  # its topologyKey label (None: unset, or no topologyKey)
    #: group ids of the pods of exclusive groups (on the same key) bound here
    exclusive_groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Capacity:
    """Free room under the placement rules (``core.placement``): does a group of N pods fit?

    Without ``topologyKey`` a group may spread over any nodes, so the free slots are summed (the
    co-location preference never makes a group unschedulable).  With it, one domain must hold the
    whole group; with ``exclusive``, a domain holding no pod of another exclusive group.  A group's
    own bound pods count as room (degrade and grow-back recreate it).  Pods of other groups that were
    just created and not yet tried by the scheduler (``arriving``) will take slots first: a released
    group must not rescale into room another group is about to fill.
    """

    rooms: tuple[NodeRoom, ...] = ()
    topology_key: str | None = None
    exclusive: bool = False
    arriving: int = 0

    @staticmethod
    def counting(free: int) -> Capacity:
        """Only a number of free slots known (no topology rules)."""
        return Capacity(rooms=(NodeRoom("*", free),))

    @property
    def free(self) -> int:
        return max(0, sum(r.slots for r in self.rooms) - self.arriving)

    def _domains(self, own: Mapping[str, int], group_ids: frozenset[str]) -> dict[str, int]:
        """Room per domain for groups ``group_ids`` whose bound pods ``own`` (node -> pods) go."""
        rooms: dict[str, int] = {}
        barred: set[str] = set()
        for r in self.rooms:
            if r.domain is None:
                continue  # required affinity on a key the node lacks: never in a domain
            rooms[r.domain] = rooms.get(r.domain, 0) + r.slots + own.get(r.name, 0)
            if self.exclusive and r.exclusive_groups - group_ids:
                barred.add(r.domain)
        return {d: n for d, n in rooms.items() if d not in barred}

    def fits(self, pods: int, own: Mapping[str, int] | None = None, group_id: str = "") -> bool:
        """Can one group of ``pods`` pods run (its bound pods ``own`` freed first)?"""
        own = own or {}
        if pods <= 0:
            return True
        if not self.topology_key:
            return sum(own.values()) + self.free >= pods
        return any(n >= pods for n in self._domains(own, frozenset({group_id})).values())

    def fits_all(self, pods: int, groups: Mapping[str, Mapping[str, int]]) -> bool:
        """Can every group (group id -> its bound pods) run at ``pods`` pods at once (grow-back)?"""
        if not self.topology_key:
            return sum(sum(o.values()) for o in groups.values()) + self.free >= pods * len(groups)
        own: dict[str, int] = {}
        for o in groups.values():
            for node, n in o.items():
                own[node] = own.get(node, 0) + n
        rooms = sorted(self._domains(own, frozenset(groups)).values(), reverse=True)
        for _ in groups:  # first fit, biggest domain first; exclusive: one group per domain
            i = next((i for i, n in enumerate(rooms) if n >= pods), None)
            if i is None:
                return False
            if self.exclusive:
                rooms.pop(i)
            else:
                rooms[i] -= pods
                rooms.sort(reverse=True)
        return True


def combined_usage(
    listed: Mapping[str, Amounts], rank_pods: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per node, the larger of each amount: the (cached) listing of what is bound there and the
    rank pods the operator's watch shows now (fresher: a group bound a second ago counts)."""
    fresh = node_usage(rank_pods)
    out: dict[str, dict[str, float]] = {}
    for name in set(listed) | set(fresh):
        a, b = listed.get(name, {}), fresh.get(name, {})
        out[name] = {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}
    return out


def _arriving(pod: Mapping[str, Any]) -> bool:
    """Created, not bound, not yet found unschedulable: the scheduler is about to place it."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if (pod.get("spec") or {}).get("nodeName") or meta.get("deletionTimestamp"):
        return False
    if status.get("phase") not in (None, "Pending"):
        return False
    conditions = status.get("conditions") or []
    return not any(c.get("type") == "PodScheduled" and c.get("status") == "False" for c in conditions)


def snapshot(
    spec: TPInferenceClusterSpec,
    nodes: Iterable[Mapping[str, Any]],
    used: Mapping[str, Amounts],
    rank_pods: Iterable[Mapping[str, Any]],
    own_groups: frozenset[str],
    ranks_per_pod: int = 1,
) -> Capacity:
    """The room for ``spec``'s pods of ``ranks_per_pod`` ranks under its placement rules (in pods).
    ``rank_pods``: every rank pod the operator sees (all clusters); ``own_groups``: this cluster's
    group ids (``placement.group_id``)."""
    key = spec.scheduling.topology_key
    exclusive = bool(spec.scheduling.exclusive and key)
    pods = list(rank_pods)
    usage = combined_usage(used, pods)
    req = rank_request(spec, ranks_per_pod)
    held: dict[str, set[str]] = {}
    if exclusive and key:
        topo = placement.topology_id(key)
        for p in pods:
            labels = (p.get("metadata") or {}).get("labels") or {}
            node = (p.get("spec") or {}).get("nodeName")
            if node and labels.get(keys.EXCLUSIVE_TOPOLOGY) == topo and labels.get(keys.GROUP_ID):
                held.setdefault(node, set()).add(labels[keys.GROUP_ID])
    rooms = []
    for node in nodes:
        if not node_eligible(node, spec):
            continue
        name = (node.get("metadata") or {}).get("name", "")
        labels = (node.get("metadata") or {}).get("labels") or {}
        rooms.append(
            NodeRoom(
                name,
                slots_on(req, allocatable(node), usage.get(name, {})),
                labels.get(key) if key else None,
                frozenset(held.get(name, set())),
            )
        )
    arriving = sum(
        1 for p in pods
        if _arriving(p) and ((p.get("metadata") or {}).get("labels") or {}).get(keys.GROUP_ID) not in own_groups
    )  # fmt: skip
    return Capacity(tuple(sorted(rooms, key=lambda r: r.name)), key, exclusive, arriving)
