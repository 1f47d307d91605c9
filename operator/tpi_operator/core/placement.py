"""Placement of a group's pods and the gang-scheduler hooks: pure, table-tested.

* Default: the pods of one group are *preferred* onto one node (pod affinity on
  ``kubernetes.io/hostname`` to the pods of the same group and incarnation), so NCCL can use
  P2P/NVLink instead of sockets; a group of one pod needs nothing.
* ``scheduling.topologyKey``: *required* pod affinity, so all pods of a group share one domain.
* ``scheduling.exclusive``: one group per domain, as LeaderWorkerSet's exclusive topology: the
  pods carry ``tpi.dev/exclusive-topology=<hash of the key>`` and a required anti-affinity keeps
  them out of domains holding pods of *other* groups (any cluster, any namespace) exclusive on the
  same key.

"The same group and incarnation" is ``matchLabelKeys: [tpi.dev/pod-group]`` (Kubernetes >= 1.31,
MatchLabelKeysInPodAffinity): the scheduler takes the value from the incoming pod's own label, so
the terms are the same for every group and incarnation (one template hash), and a group healed in
place (only its labels patched) stays consistent.  "Other groups" is ``mismatchLabelKeys:
[tpi.dev/group-id]``: a group's id never changes across its incarnations, so its own terminating
pods never repel it.

A user's ``scheduling.affinity`` is kept: the operator's terms are appended to its lists.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from tpi_contract import keys

from tpi_operator.api.v1alpha1 import SchedulingSpec

HOSTNAME = "kubernetes.io/hostname"
#: The weight of the default co-location preference (the most a preference may weigh).
PACK_WEIGHT = 100
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT = "kueue.x-k8s.io/pod-group-total-count"
#: A failed group is never retried by Kueue: the operator recreates it as a new pod group.
KUEUE_RETRIABLE = "kueue.x-k8s.io/retriable-in-group"


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def pod_group_name(cluster: str, group: int, incarnation: int) -> str:
    """One group's pods in one incarnation: a recreate is a new pod group for a gang scheduler."""
    return f"{cluster}-g{group}-i{incarnation}"


def group_id(namespace: str, cluster: str, group: int) -> str:
    """A group, the same across incarnations, unique across namespaces (a label value)."""
    return _short_hash(namespace, cluster, str(group))


def topology_id(topology_key: str) -> str:
    """A topology key as a label value (keys hold '/', values may not)."""
    return _short_hash(topology_key)


def _group_term(cluster: str, topology_key: str) -> dict[str, Any]:
    return {
        "labelSelector": {"matchLabels": {keys.CLUSTER: cluster}},
        "matchLabelKeys": [keys.POD_GROUP],
        "topologyKey": topology_key,
    }


def operator_affinity(sched: SchedulingSpec, cluster: str, pods: int) -> dict[str, Any]:
    """The operator's own affinity terms for a group of ``pods`` pods (empty: none needed)."""
    out: dict[str, Any] = {}
    affinity: dict[str, Any] = {}
    if pods > 1 and sched.topology_key:
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = [_group_term(cluster, sched.topology_key)]
    if pods > 1 and sched.topology_key != HOSTNAME:
        # Preferred, not required: a group bigger than a node must still be able to run.
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": PACK_WEIGHT, "podAffinityTerm": _group_term(cluster, HOSTNAME)}
        ]
    if affinity:
        out["podAffinity"] = affinity
    if sched.exclusive and sched.topology_key:
        out["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchExpressions": [
                            {"key": keys.EXCLUSIVE_TOPOLOGY, "operator": "In",
                             "values": [topology_id(sched.topology_key)]},
                        ]
                    },
                    "mismatchLabelKeys": [keys.GROUP_ID],
                    "namespaceSelector": {},  # every namespace: one group per domain, whoever owns it
                    "topologyKey": sched.topology_key,
                }
            ]
        }  # fmt: skip
    return out


def merge_affinity(user: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any] | None:
    """The user's affinity with the operator's pod (anti-)affinity terms appended (never replaced)."""
    merged = copy.deepcopy(user) if user else {}
    for kind, terms in extra.items():
        into = merged.setdefault(kind, {})
        for when, items in terms.items():
            into[when] = [*(into.get(when) or []), *items]
    return merged or None


def affinity(sched: SchedulingSpec, cluster: str, pods: int) -> dict[str, Any] | None:
    """The rank pods' ``spec.affinity``."""
    return merge_affinity(sched.affinity, operator_affinity(sched, cluster, pods))


def static_labels(sched: SchedulingSpec, namespace: str, cluster: str, group: int) -> dict[str, str]:
    """Labels that never change for a group: its id and, when exclusive, its topology."""
    labels = {keys.GROUP_ID: group_id(namespace, cluster, group)}
    if sched.exclusive and sched.topology_key:
        labels[keys.EXCLUSIVE_TOPOLOGY] = topology_id(sched.topology_key)
    if sched.kueue is not None:
        labels[KUEUE_QUEUE] = sched.kueue.queue_name
    return labels


def group_metadata(
    sched: SchedulingSpec, cluster: str, group: int, incarnation: int, pods: int
) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) naming the pod group of one incarnation and its pod count, under
    tpi.dev's keys, Kueue's (``scheduling.kueue``) and the user's (``scheduling.podGroup``)."""
    name, count = pod_group_name(cluster, group, incarnation), str(pods)
    labels = {keys.POD_GROUP: name}
    annotations = {keys.POD_GROUP_TOTAL_COUNT: count}
    if sched.kueue is not None:
        labels[KUEUE_POD_GROUP] = name
        annotations[KUEUE_TOTAL_COUNT] = count
        annotations[KUEUE_RETRIABLE] = "false"
    for key in sched.pod_group.name_labels:
        labels[key] = name
    for key in sched.pod_group.name_annotations:
        annotations[key] = name
    for key in sched.pod_group.count_annotations:
        annotations[key] = count
    return labels, annotations


def gang_scheduled(sched: SchedulingSpec) -> bool:
    """Does a gang scheduler or queue admit a group by the pod-group name ``group_metadata`` writes
    (one per incarnation), or may a scheduler of the user's read it?"""
    keys = sched.pod_group
    return bool(
        sched.kueue is not None or sched.scheduler_name
        or keys.name_labels or keys.name_annotations or keys.count_annotations
    )  # fmt: skip
