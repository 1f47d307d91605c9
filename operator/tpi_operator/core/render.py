"""Rendering: (spec, identity, group settings) -> the Kubernetes objects of a TPInferenceCluster.

Pure functions returning plain dicts ready for server-side apply.  Every object carries an owner
reference to the cluster (deleting the cluster garbage-collects everything) and a
``tpi.dev/object-hash`` annotation so the shell can skip applying unchanged objects.

Layout, for a cluster ``c`` in namespace ``ns``:

* ``StatefulSet c-g<group>``: one per TP group, ``replicas`` = TP size / ranks per pod
  (``core.layout``; with one rank per pod the ordinal is the rank, with ``n`` the pod runs
  ``python -m tpi_runtime launch --ranks-per-pod n`` and ranks ``ordinal x n .. + n - 1``),
  ``podManagementPolicy: Parallel`` (ranks start together) and ``updateStrategy: OnDelete``: the
  operator alone decides when pods are replaced, because a group only works when *all* its
  ranks are replaced together;
* ``Service c-ranks`` (headless, ``publishNotReadyAddresses``): stable DNS per rank, so rank 0 is
  ``MASTER_ADDR`` before anything is Ready;
* ``Service c`` (the endpoint): rank-0 pods only; their readiness (``/readyz``) means the group
  is formed, so only ready groups receive traffic;
* ``Lease <pod>`` per rank (``<pod>-r<local rank>`` with several ranks per pod),
  ``ServiceAccount``/``Role``/``RoleBinding c-runtime`` for heartbeats;
* ``PodDisruptionBudget c``: evictions take at most ``maxUnavailable`` groups (``disruption_budget``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from tpi_contract import defaults, env, keys, ranks, termination

from tpi_operator.api.v1alpha1 import API_VERSION, KIND, TPInferenceClusterSpec
from tpi_operator.core import layout, placement

MASTER_PORT = defaults.RENDEZVOUS_PORT
MODEL_MOUNT = "/models"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
RUNTIME_UID = 10001  # the runtime image's user (Dockerfile)

# Short local names for the contract's keys (tpi_contract.keys).
L_CLUSTER = keys.CLUSTER
L_GROUP = keys.GROUP
L_RANK = keys.RANK
L_INCARNATION = keys.INCARNATION
L_TEMPLATE_HASH = keys.TEMPLATE_HASH
A_OBJECT_HASH = keys.OBJECT_HASH
A_RESTARTED_AT = keys.RESTARTED_AT
A_WORLD_SIZE = keys.WORLD_SIZE
A_RANKS_PER_POD = keys.RANKS_PER_POD


@dataclass(frozen=True)
class Identity:
    """The owning TPInferenceCluster."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class GroupSettings:
    """What varies per group and over time (decided by recovery, stored in status)."""

    group: int
    tp: int
    batch: int
    incarnation: int = 0
    restarted_at: str | None = None

    def ranks_per_pod(self, spec: TPInferenceClusterSpec) -> int:
        return layout.ranks_per_pod(spec, self.tp)


def group_pods(spec: TPInferenceClusterSpec, gs: GroupSettings) -> int:
    """The pods of a group (its StatefulSet's replicas, ``tp / ranksPerPod``): placement and the
    pod-group count read it, never ``tp``."""
    return ranks.pods_per_group(gs.tp, gs.ranks_per_pod(spec))


# ------------------------------------------------------------------------------------ names
def sts_name(name: str, group: int) -> str:
    return f"{name}-g{group}"


def pod_name(name: str, group: int, rank: int) -> str:
    return f"{sts_name(name, group)}-{rank}"


def headless_name(name: str) -> str:
    return f"{name}-ranks"


def runtime_sa_name(name: str) -> str:
    return f"{name}-runtime"


def endpoint(spec: TPInferenceClusterSpec, ident: Identity) -> str:
    return f"http://{ident.name}.{ident.namespace}.svc.cluster.local:{spec.runtime.port}"


def rank0_selector(name: str) -> str:
    """Label selector of the rank-0 pods (one per group), for the scale subresource."""
    return f"{L_CLUSTER}={name},{POD_INDEX_LABEL}=0"


# ---------------------------------------------------------------------------------- helpers
def content_hash(obj: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def cluster_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tpi-runtime",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/part-of": "tpi",
        "app.kubernetes.io/managed-by": "tpi-operator",
        L_CLUSTER: name,
    }


def owner_reference(ident: Identity) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ident.name,
        "uid": ident.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(ident: Identity, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ident.namespace,
        "labels": {**cluster_labels(ident.name), **(labels or {})},
        "ownerReferences": [owner_reference(ident)],
    }


def _stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """Add the object-hash annotation (hash of everything else)."""
    obj["metadata"].setdefault("annotations", {})[A_OBJECT_HASH] = content_hash(obj)
    return obj


def model_dir(spec: TPInferenceClusterSpec) -> str:
    source = spec.model.source
    if source.pvc:
        sub = source.pvc.path.strip("/")
        return f"{MODEL_MOUNT}/{sub}" if sub else MODEL_MOUNT
    if source.host_path:
        return MODEL_MOUNT
    assert source.image is not None
    return f"{MODEL_MOUNT}{source.image.path}" if source.image.reference else source.image.path


def _model_volume(spec: TPInferenceClusterSpec) -> dict[str, Any] | None:
    source = spec.model.source
    if source.pvc:
        return {
            "name": "model",
            "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True},
        }
    if source.host_path:
        return {"name": "model", "hostPath": {"path": source.host_path.path, "type": "Directory"}}
    if source.image and source.image.reference:
        return {
            "name": "model",
            "image": {"reference": source.image.reference, "pullPolicy": spec.image_pull_policy},
        }
    return None  # weights baked into the runtime image


# ------------------------------------------------------------------------------ pod template
def runtime_args(spec: TPInferenceClusterSpec, batch: int) -> list[str]:
    rt = spec.runtime
    args = [
        "--model", model_dir(spec),
        "--host", "0.0.0.0",
        "--port", str(rt.port),
        "--dtype", rt.dtype,
        "--max-batch-size", str(rt.max_batch_size),
        keys.ASSIGNED_BATCH_FLAG, str(batch),  # the one way the assigned batch reaches a rank
        "--backend", spec.backend,
        # A collective stuck longer than the heartbeat timeout is a hang: die rather than wait.
        # It runs only once every rank joined: waiting for a Pending peer has no deadline.
        "--dist-timeout-seconds",
        str(defaults.collective_timeout_seconds(spec.failure_policy.heartbeat_timeout_seconds)),
        # The drain fits the pod's grace period after the preStop delay (docs/contracts.md).
        "--drain-seconds", str(defaults.drain_seconds(spec.termination_grace_period_seconds)),
    ]  # fmt: skip
    if rt.max_model_len:
        args += ["--max-model-len", str(rt.max_model_len)]
    if spec.model.served_model_name:
        args += ["--served-model-name", spec.model.served_model_name]
    return args + list(rt.extra_args)


def runtime_env(spec: TPInferenceClusterSpec, ident: Identity, gs: GroupSettings) -> list[dict[str, Any]]:
    """The rank environment of docs/contracts.md."""
    master = f"{pod_name(ident.name, gs.group, 0)}.{headless_name(ident.name)}.{ident.namespace}.svc.cluster.local"

    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    if gs.ranks_per_pod(spec) > 1:
        # The launcher sets RANK and LOCAL_RANK per process from the pod's ordinal (the same
        # label that gives RANK to a one-rank pod) and gives each local rank its own Lease name.
        rank_env = [{"name": env.POD_ORDINAL, **field(f"metadata.labels['{POD_INDEX_LABEL}']")}]
        local_env: list[dict[str, Any]] = []
    else:
        rank_env = [{"name": env.RANK, **field(f"metadata.labels['{POD_INDEX_LABEL}']")}]
        local_env = [{"name": env.LOCAL_RANK, "value": "0"}]
    return [
        {"name": env.POD_NAME, **field("metadata.name")},
        {"name": env.POD_NAMESPACE, **field("metadata.namespace")},
        *rank_env,
        {"name": env.WORLD_SIZE, "value": str(gs.tp)},
        {"name": env.MASTER_ADDR, "value": master},
        {"name": env.MASTER_PORT, "value": str(MASTER_PORT)},
        *local_env,
        {"name": env.LEASE_NAME, "value": f"$({env.POD_NAME})"},
        {"name": env.HEARTBEAT_INTERVAL_SECONDS, "value": f"{defaults.HEARTBEAT_INTERVAL_SECONDS:g}"},
        {"name": "HOME", "value": "/tmp"},
    ]


def scale_quantity(quantity: str, times: int) -> str:
    """``times`` x a resource quantity, in its own unit ("4" x 2 = "8", "1.5Gi" x 4 = "6Gi")."""
    if times == 1:
        return quantity
    text = quantity.lstrip("+")
    digits = len(text) - len(text.lstrip("0123456789."))
    try:
        number = Decimal(text[:digits]) * times
    except InvalidOperation:
        raise ValueError(f"cannot scale the quantity {quantity!r}") from None
    out = format(number.normalize(), "f")
    return out + text[digits:]


def _resources(spec: TPInferenceClusterSpec, n: int = 1) -> dict[str, Any]:
    """Requests = limits: ``n`` x the per-rank amounts, for a pod of ``n`` ranks (every local rank
    sees all of the pod's GPUs, so NCCL can use P2P/NVLink between them)."""
    amounts: dict[str, Any] = {}
    if spec.resources.cpu:
        amounts["cpu"] = scale_quantity(spec.resources.cpu, n)
    if spec.resources.memory:
        amounts["memory"] = scale_quantity(spec.resources.memory, n)
    if spec.resources.gpus:
        amounts["nvidia.com/gpu"] = str(spec.resources.gpus * n)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_template(spec: TPInferenceClusterSpec, ident: Identity, gs: GroupSettings) -> dict[str, Any]:
    """The pod template of a group, labelled with its template hash and incarnation.

    The hash covers everything that needs new pods (spec, TP size, batch, restartedAt) but neither
    the incarnation (a recreate is not a rollout) nor the group index: what differs between groups
    (their label, MASTER_ADDR) never changes for a given group, so every group of one revision
    carries the same hash and ``Observation.hash_for(tp, batch)`` can compare any group against it.
    """
    template = _template(spec, ident, gs)
    neutral = template if gs.group == 0 else _template(spec, ident, replace(gs, group=0))
    thash = content_hash(neutral)
    template["metadata"]["labels"][L_TEMPLATE_HASH] = thash
    labels, annotations = incarnation_metadata(spec, ident, gs)
    template["metadata"]["labels"].update(labels)
    template["metadata"]["annotations"].update(annotations)
    return template


def incarnation_metadata(
    spec: TPInferenceClusterSpec, ident: Identity, gs: GroupSettings, pods: int | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The pod labels and annotations that change with the incarnation (outside the template hash:
    a recreate is not a rollout): the incarnation, the pod-group name and count (gang schedulers).
    ``pods``: the group's pod count when it is not the one ``gs`` renders (a group healed in place
    keeps its StatefulSet's)."""
    count = group_pods(spec, gs) if pods is None else pods
    labels, annotations = placement.group_metadata(spec.scheduling, ident.name, gs.group, gs.incarnation, count)
    return {**labels, L_INCARNATION: str(gs.incarnation)}, annotations


def _template(spec: TPInferenceClusterSpec, ident: Identity, gs: GroupSettings) -> dict[str, Any]:
    port = spec.runtime.port
    n = gs.ranks_per_pod(spec)
    http_probe = {"httpGet": {"path": "/healthz", "port": "http"}}
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    # NCCL and gloo exchange tensors through /dev/shm; the container default of 64Mi is too small.
    # No sizeLimit: the tmpfs is charged to the container's memory limit, which is n x per rank,
    # so it grows with the ranks that share it.
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if (volume := _model_volume(spec)) is not None:
        volumes.append(volume)
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    container: dict[str, Any] = {
        "name": "runtime",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", "tpi_runtime", "serve"]
        if n == 1
        else ["python", "-m", "tpi_runtime", "launch", "--ranks-per-pod", str(n), "serve"],
        "args": runtime_args(spec, gs.batch),
        "env": runtime_env(spec, ident, gs),
        "ports": [
            {"name": "http", "containerPort": port, "protocol": "TCP"},
            {"name": "dist", "containerPort": MASTER_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(spec, n),
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {**http_probe, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
        # Loading big checkpoints takes minutes: liveness only starts once /healthz answered.
        "startupProbe": {**http_probe, "periodSeconds": 5, "failureThreshold": 180},
        # Keep serving while the endpoint leaves every Service (a native sleep: the image needs no
        # sleep binary); SIGTERM, and with it the drain's 503s, come only after.
        "lifecycle": {"preStop": {"sleep": {"seconds": defaults.PRESTOP_SECONDS}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    if n > 1:  # the launcher names the local rank that ended the pod there (tpi_contract.termination)
        container["terminationMessagePath"] = termination.DEFAULT_PATH
        container["terminationMessagePolicy"] = "File"
    sched = spec.scheduling
    pod_spec: dict[str, Any] = {
        "serviceAccountName": runtime_sa_name(ident.name),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if sched.node_selector:
        pod_spec["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in sched.tolerations]
    affinity = placement.affinity(sched, ident.name, group_pods(spec, gs))
    if affinity:
        pod_spec["affinity"] = affinity
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if sched.scheduler_name:
        pod_spec["schedulerName"] = sched.scheduler_name
    annotations = {A_WORLD_SIZE: str(gs.tp)}
    if n > 1:
        annotations[A_RANKS_PER_POD] = str(n)
    if gs.restarted_at:
        annotations[A_RESTARTED_AT] = gs.restarted_at
    return {
        "metadata": {
            "labels": {
                **cluster_labels(ident.name),
                L_GROUP: str(gs.group),
                **placement.static_labels(sched, ident.namespace, ident.name, gs.group),
            },
            "annotations": annotations,
        },
        "spec": pod_spec,
    }


def template_hash(spec: TPInferenceClusterSpec, ident: Identity, gs: GroupSettings) -> str:
    return str(pod_template(spec, ident, gs)["metadata"]["labels"][L_TEMPLATE_HASH])


# ---------------------------------------------------------------------------------- objects
def statefulset(spec: TPInferenceClusterSpec, ident: Identity, gs: GroupSettings) -> dict[str, Any]:
    template = pod_template(spec, ident, gs)
    labels = template["metadata"]["labels"]
    n = gs.ranks_per_pod(spec)
    annotations = {L_TEMPLATE_HASH: labels[L_TEMPLATE_HASH], L_INCARNATION: labels[L_INCARNATION]}
    if n > 1:  # observe reads it (the operator's StatefulSet index keeps metadata, not the template)
        annotations[A_RANKS_PER_POD] = str(n)
    return _stamp(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {
                **_meta(ident, sts_name(ident.name, gs.group), {L_GROUP: str(gs.group)}),
                "annotations": annotations,
            },
            "spec": {
                "serviceName": headless_name(ident.name),
                "replicas": group_pods(spec, gs),
                "podManagementPolicy": "Parallel",
                "updateStrategy": {"type": "OnDelete"},
                "selector": {"matchLabels": {L_CLUSTER: ident.name, L_GROUP: str(gs.group)}},
                "template": template,
            },
        }
    )


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys, None for
    removed ones, lists whole.  (Rendered objects hold no nulls, which a merge patch reads as
    removals.)"""
    out: dict[str, Any] = dict.fromkeys(old.keys() - new.keys())
    for key, value in new.items():
        was = old.get(key)
        if isinstance(value, dict) and isinstance(was, dict):
            if sub := merge_patch(was, value):
                out[key] = sub
        elif key not in old or was != value:
            out[key] = value
    return out


def with_replicas(sts: dict[str, Any], replicas: int) -> dict[str, Any]:
    """A rendered StatefulSet at another size (a released group: 0), stamped anew."""
    out = json.loads(json.dumps(sts))
    out["spec"]["replicas"] = replicas
    out["metadata"]["annotations"].pop(A_OBJECT_HASH, None)
    return _stamp(out)


def headless_service(spec: TPInferenceClusterSpec, ident: Identity) -> dict[str, Any]:
    return _stamp(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ident, headless_name(ident.name)),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {L_CLUSTER: ident.name},
                "ports": [
                    {"name": "dist", "port": MASTER_PORT, "targetPort": "dist", "protocol": "TCP"},
                    {"name": "http", "port": spec.runtime.port, "targetPort": "http", "protocol": "TCP"},
                ],
            },
        }
    )


def client_service(spec: TPInferenceClusterSpec, ident: Identity) -> dict[str, Any]:
    return _stamp(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ident, ident.name),
            "spec": {
                "type": "ClusterIP",
                "selector": {L_CLUSTER: ident.name, POD_INDEX_LABEL: "0"},
                "ports": [{"name": "http", "port": spec.runtime.port, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def pdb_name(name: str) -> str:
    return name


def disruption_budget(spec: TPInferenceClusterSpec, ident: Identity) -> dict[str, Any]:
    """The cluster's PodDisruptionBudget: evictions (``kubectl drain``) take at most
    ``maxUnavailable`` groups, never a further group while one is down.

    It counts pods while the budget is in groups.  One evicted rank breaks its group, and the
    operator then recreates the whole group, so all of that group's ranks go unready.  The budget is
    ``maxUnavailable`` *pods*, not groupSize x maxUnavailable: evictions arrive concurrently
    (``kubectl drain`` evicts every pod of a node at once), and a pod budget of groupSize would let
    the first evictions hit groupSize different groups before the operator takes any group down.
    With ``maxUnavailable`` pods, each eviction can cost at most one group; once a group is down its
    unready ranks use up the budget, so no pod of another group is evicted until it is Ready again.
    The evicted group's other ranks need no eviction: the operator deletes them itself, and a drain
    only waits for them to be gone.  With several ranks per pod nothing changes: one evicted pod
    still breaks exactly one group, and that group's unready pods use up the budget the same way.
    """
    return _stamp(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(ident, pdb_name(ident.name)),
            "spec": {
                "maxUnavailable": spec.update_strategy.max_unavailable,
                "selector": {"matchLabels": {L_CLUSTER: ident.name}},
                # A pod that is not Ready serves nothing: evicting it costs no availability (and a
                # crash-looping group must not block a node drain forever).
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }
    )


def lease(
    spec: TPInferenceClusterSpec, ident: Identity, group: int, rank: int, ranks_per_pod: int = 1
) -> dict[str, Any]:
    """A rank's heartbeat Lease. Only the fields the operator owns: the runtime renews renewTime.

    Named ``ranks.lease_name``: the pod's name with one rank per pod, ``<pod>-r<local rank>``
    otherwise; its holder is the pod, as the runtime writes it."""
    ordinal, local = ranks.placement(rank, ranks_per_pod)
    pod = pod_name(ident.name, group, ordinal)
    name = ranks.lease_name(pod, local, ranks_per_pod)
    return _stamp(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                **_meta(ident, name, {L_GROUP: str(group), L_RANK: str(rank)}),
                "annotations": {L_RANK: str(rank)},
            },
            "spec": {
                "holderIdentity": pod,
                "leaseDurationSeconds": spec.failure_policy.heartbeat_timeout_seconds,
            },
        }
    )


def rbac(ident: Identity, lease_names: list[str]) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding for the runtime: only its own cluster's Leases, by name,
    and no ``create`` (the operator creates them; a rank never makes or touches another's)."""
    name = runtime_sa_name(ident.name)
    return [
        _stamp({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(ident, name)}),
        _stamp(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": _meta(ident, name),
                "rules": [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        # an empty list would grant every Lease: never render that
                        "resourceNames": sorted(lease_names) or [pod_name(ident.name, 0, 0)],
                        "verbs": ["get", "update", "patch"],
                    }
                ],
            }
        ),
        _stamp(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": _meta(ident, name),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ident.namespace}],
            }
        ),
    ]


def shared_objects(spec: TPInferenceClusterSpec, ident: Identity, lease_names: list[str]) -> list[dict[str, Any]]:
    """Objects shared by all groups (the runtime's Role names every rank's Lease)."""
    return [
        *rbac(ident, lease_names),
        headless_service(spec, ident),
        client_service(spec, ident),
        disruption_budget(spec, ident),
    ]
