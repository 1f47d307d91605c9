"""Several ranks per pod: where a rank lives, and the name of its heartbeat Lease.  Pure.

A group of ``tp`` ranks runs in ``tp / ranks_per_pod`` pods (the StatefulSet's replicas); pod
ordinal ``p`` runs local ranks ``0 .. ranks_per_pod - 1`` (``tpi_runtime.launcher`` starts one
process each), and local rank ``l`` of pod ``p`` is global rank ``p * ranks_per_pod + l``. With
``ranks_per_pod == 1`` this is today's layout: the ordinal is the rank, and the Lease is named
after the pod.

The operator renders and observes with these functions, the launcher computes its children's
environment with them, so both agree on every name and number.
"""

from __future__ import annotations

#: What separates a pod's name from a local rank's index in that rank's Lease name.
LEASE_LOCAL_RANK_SEP = "-r"


def ranks_per_pod_problems(tp: int, ranks_per_pod: int) -> list[str]:
    """Why ``ranks_per_pod`` cannot split a group of ``tp`` ranks into equal pods ([] when it can)."""
    if ranks_per_pod < 1:
        return [f"ranksPerPod={ranks_per_pod} must be >= 1"]
    if tp < 1:
        return [f"tensor-parallel size {tp} must be >= 1"]
    if tp % ranks_per_pod:
        return [f"ranksPerPod={ranks_per_pod} does not divide tensorParallelSize={tp}: pods would hold unequal ranks"]
    return []


def pods_per_group(tp: int, ranks_per_pod: int) -> int:
    """How many pods a group of ``tp`` ranks needs (ValueError when ``ranks_per_pod`` does not divide it)."""
    if problems := ranks_per_pod_problems(tp, ranks_per_pod):
        raise ValueError(problems[0])
    return tp // ranks_per_pod


def ranks_per_pod_at(tp: int, configured: int) -> int:
    """The ranks per pod a group of ``tp`` ranks runs with when the spec asks for ``configured``.

    At the spec's own size this is ``configured``. At a degraded (halved) size it is the largest
    divisor of ``tp`` that is at most ``configured``: a group that fit in one pod still fits in
    one pod (``tp <= configured`` gives ``tp``), and a pod never holds more ranks (so more GPUs)
    than the spec allows. Always computed from the spec's value, so a grow-back returns to it.
    """
    if tp < 1 or configured < 1:
        raise ValueError(f"tensor-parallel size {tp} and ranksPerPod {configured} must be >= 1")
    return max(d for d in range(1, min(tp, configured) + 1) if tp % d == 0)


def global_rank(pod_ordinal: int, ranks_per_pod: int, local_rank: int) -> int:
    """``RANK`` of local rank ``local_rank`` in pod ``pod_ordinal``."""
    if not 0 <= local_rank < ranks_per_pod:
        raise ValueError(f"local rank {local_rank} is outside 0..{ranks_per_pod - 1}")
    if pod_ordinal < 0:
        raise ValueError(f"pod ordinal {pod_ordinal} must be >= 0")
    return pod_ordinal * ranks_per_pod + local_rank


def placement(rank: int, ranks_per_pod: int) -> tuple[int, int]:
    """(pod ordinal, local rank) of global ``rank``: the inverse of ``global_rank``."""
    if rank < 0 or ranks_per_pod < 1:
        raise ValueError(f"rank {rank} must be >= 0 and ranksPerPod {ranks_per_pod} >= 1")
    return divmod(rank, ranks_per_pod)


def lease_name(pod_name: str, local_rank: int, ranks_per_pod: int) -> str:
    """The heartbeat Lease of one local rank: unique per rank, so a hung rank inside a healthy pod
    is still found. ``<pod>`` when the pod runs one rank (today's name, nothing changes),
    ``<pod>-r<local rank>`` otherwise (a pod name ends in its ordinal's digits, never in
    ``-r<digits>``, so a rank's Lease never takes another pod's name)."""
    if not 0 <= local_rank < ranks_per_pod:
        raise ValueError(f"local rank {local_rank} is outside 0..{ranks_per_pod - 1}")
    return pod_name if ranks_per_pod == 1 else f"{pod_name}{LEASE_LOCAL_RANK_SEP}{local_rank}"


def lease_names(pod_name: str, ranks_per_pod: int) -> list[str]:
    """Every Lease of one pod, in local-rank order (the operator creates them and grants each)."""
    return [lease_name(pod_name, local, ranks_per_pod) for local in range(ranks_per_pod)]


def lease_owner(name: str, ranks_per_pod: int) -> tuple[str, int]:
    """(pod name, local rank) of a Lease named by ``lease_name``: how the operator maps a Lease
    back to the pod whose container renews it (ValueError for a name it did not make)."""
    if ranks_per_pod == 1:
        return name, 0
    pod, sep, local = name.rpartition(LEASE_LOCAL_RANK_SEP)
    if not sep or not pod or not local.isdigit() or str(int(local)) != local or int(local) >= ranks_per_pod:
        raise ValueError(f"Lease {name!r} is not a local rank's Lease for ranksPerPod={ranks_per_pod}")
    return pod, int(local)
