"""Free capacity, in ranks: how many more rank pods the nodes could take.  Pure.

A deliberately small model of the scheduler: node selector, taints vs tolerations, cordoning,
readiness and allocatable minus the requests of pods already bound.  Affinity is ignored, so the
answer is an upper bound; a wrong guess only costs one more unschedulable timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec
from tpi_operator.core.sizing import parse_quantity


def rank_request(spec: TPInferenceClusterSpec) -> dict[str, float]:
    req: dict[str, float] = {}
    if spec.resources.cpu:
        req["cpu"] = parse_quantity(spec.resources.cpu)
    if spec.resources.memory:
        req["memory"] = parse_quantity(spec.resources.memory)
    if spec.resources.gpus:
        req["nvidia.com/gpu"] = float(spec.resources.gpus)
    req["pods"] = 1.0
    return req


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


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    total: dict[str, float] = {"pods": 1.0}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            total[k] = total.get(k, 0.0) + parse_quantity(v)
    return total


def free_rank_slots(
    spec: TPInferenceClusterSpec, nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> int:
    """How many ranks of ``spec`` still fit on eligible nodes, given the bound pods."""
    used: dict[str, dict[str, float]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        bucket = used.setdefault(node, {})
        for k, v in pod_requests(pod).items():
            bucket[k] = bucket.get(k, 0.0) + v
    req = rank_request(spec)
    slots = 0
    for node in nodes:
        if not node_eligible(node, spec):
            continue
        name = (node.get("metadata") or {}).get("name", "")
        alloc = {
            k: parse_quantity(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()
        }
        fit = None
        for k, amount in req.items():
            free = alloc.get(k, 0.0) - used.get(name, {}).get(k, 0.0)
            n = int(free // amount) if amount > 0 else 0
            fit = n if fit is None else min(fit, n)
        slots += max(0, fit or 0)
    return slots
