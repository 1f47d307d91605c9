"""How many ranks each pod of a group runs, at a given group size.  Pure.

``spec.ranksPerPod`` when set; unset, the default rule:

* GPU ranks (an ``nvidia.com/gpu`` request): the whole group in one pod whenever it fits one node,
  so its ranks share the node's NVLink/P2P and ``/dev/shm``. ``resolved`` decides it from the most
  GPUs any node the cluster may use offers (the node index): the largest divisor of the group
  that fits such a node, so a TP 16 group on 8-GPU nodes runs 2 pods of 8. No node reports GPUs
  (none yet, or a pool scaled to zero): the whole group, as the issue's rule for unknown nodes;
* CPU ranks: one rank per pod. CPU ranks gain nothing from sharing a pod (gloo has no P2P
  transport to gain, and the pod's cores would only be split between them), one pod per rank lets
  the scheduler spread the cores over nodes, and it keeps every existing CPU cluster unchanged.

At a degraded (halved) size the pods hold ``tpi_contract.ranks.ranks_per_pod_at`` ranks: the
largest divisor of the size that is at most the configured value, so a pod never holds more ranks
(GPUs) than the spec allows and a grow-back returns to the spec's value.
"""

from __future__ import annotations

from tpi_contract import ranks

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec


def resolved(spec: TPInferenceClusterSpec, desired_tp: int, node_gpus: int | None) -> TPInferenceClusterSpec:
    """The spec with the GPU default decided: unset ``ranksPerPod`` on GPU ranks becomes the
    largest divisor of ``desired_tp`` whose pod fits a node of ``node_gpus`` GPUs (the most any
    eligible node offers; None: unknown, the spec is kept and the whole group is one pod).

    A degraded size then uses ``ranks_per_pod_at`` of this value, as for a configured one. The
    value follows the nodes: when the largest eligible node changes, the groups roll to the new
    layout (their template changes); set ``ranksPerPod`` to pin it."""
    if spec.ranks_per_pod is not None or not spec.resources.gpus or not node_gpus:
        return spec
    fit = max(1, node_gpus // spec.resources.gpus)
    return spec.model_copy(update={"ranks_per_pod": ranks.ranks_per_pod_at(desired_tp, min(fit, desired_tp))})


def configured(spec: TPInferenceClusterSpec, desired_tp: int) -> int:
    """The ranks per pod at the desired size: the spec's value, or the default rule's."""
    if spec.ranks_per_pod is not None:
        return spec.ranks_per_pod
    return desired_tp if spec.resources.gpus else 1


def ranks_per_pod(spec: TPInferenceClusterSpec, tp: int) -> int:
    """The ranks each pod of a group of ``tp`` ranks runs.

    Unset on GPUs the default is the group itself at any size (``tp``); otherwise the spec's value
    recomputed for ``tp`` (a degraded size), 1 on CPU."""
    if spec.ranks_per_pod is None:
        return tp if spec.resources.gpus else 1
    return ranks.ranks_per_pod_at(tp, spec.ranks_per_pod)


def pods_per_group(spec: TPInferenceClusterSpec, tp: int) -> int:
    """The StatefulSet's replicas for a group of ``tp`` ranks."""
    return ranks.pods_per_group(tp, ranks_per_pod(spec, tp))


def problems(spec: TPInferenceClusterSpec, desired_tp: int) -> list[str]:
    """Why ``spec.ranksPerPod`` cannot split the desired size ([] when it can; the API server
    checks an integer tensorParallelSize, this also covers 'auto' once it is resolved)."""
    if spec.ranks_per_pod is None:
        return []
    found = ranks.ranks_per_pod_problems(desired_tp, spec.ranks_per_pod)
    if found and spec.tensor_parallel_size == "auto":
        return [f"{found[0]} (tensorParallelSize 'auto' resolved to {desired_tp})"]
    return found
