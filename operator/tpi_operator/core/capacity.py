"""Free capacity, in ranks: how many more rank pods the nodes could take.  Pure.

A deliberately small model of the scheduler: node selector, taints vs tolerations, cordoning,
readiness and allocatable minus the requests of pods already bound.  Affinity is ignored, so the
answer is an upper bound; a wrong guess only costs one more unschedulable timeout.

The shell feeds it from watches and narrow queries, never a list of every pod: nodes come from
the operator's node index (``slim_node``), and what is bound to a node from a query selected on
``spec.nodeName`` (``node_usage``), made only for the nodes ``candidate_nodes`` keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec
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
