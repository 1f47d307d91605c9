"""``tpi.dev/*`` label and annotation keys, and who writes each.

The batch size has two names on purpose: the operator *assigns* one (``ASSIGNED_BATCH_FLAG`` on
the runtime's command line, also kept in the cluster's status), and the runtime *reports* the one
it runs with now (``LEASE_LIVE_BATCH_SIZE`` on its Lease), which drops below the assigned one after
an in-process out-of-memory halving.
"""

from __future__ import annotations

PREFIX = "tpi.dev/"

# -- labels the operator puts on what it renders -----------------------------------------------
CLUSTER = PREFIX + "cluster"
GROUP = PREFIX + "group"
RANK = PREFIX + "rank"
INCARNATION = PREFIX + "incarnation"
TEMPLATE_HASH = PREFIX + "template-hash"
#: A group's pods in one incarnation: ``<cluster>-g<group>-i<incarnation>`` (gang schedulers' unit).
POD_GROUP = PREFIX + "pod-group"
#: A group across incarnations and namespaces (a short hash): exclusive placement tells groups apart by it.
GROUP_ID = PREFIX + "group-id"
#: On the pods of an exclusive group: a short hash of its topologyKey.
EXCLUSIVE_TOPOLOGY = PREFIX + "exclusive-topology"

# -- annotations the operator writes --------------------------------------------------------------
OBJECT_HASH = PREFIX + "object-hash"
WORLD_SIZE = PREFIX + "world-size"
#: Set by users on a TPInferenceCluster to restart it (and copied onto the pod template).
RESTARTED_AT = PREFIX + "restartedAt"
#: On every rank pod: how many pods its group has (the pod-group's total count).
POD_GROUP_TOTAL_COUNT = PREFIX + "pod-group-total-count"

#: The runtime flag that carries the batch size the operator assigns to a group.
ASSIGNED_BATCH_FLAG = "--effective-batch-size"

# -- annotations the runtime writes on its Lease at every renewal ----------------------------------
LEASE_RANK = RANK
LEASE_STEP = PREFIX + "step"
LEASE_LAST_ERROR = PREFIX + "last-error"
LEASE_OOM_COUNT = PREFIX + "oom-count"
#: The batch size the runtime runs with now (it halves on an in-process out-of-memory).
LEASE_LIVE_BATCH_SIZE = PREFIX + "live-batch-size"
#: Ranks each pod of a StatefulSet (its metadata) or a pod (its template) runs; absent: 1.
RANKS_PER_POD = PREFIX + "ranks-per-pod"
