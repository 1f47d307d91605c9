"""``tpi.dev/v1alpha1`` TPInferenceCluster: spec, status and their validation.

These pydantic models are the single source of truth for the API: ``hack/gen_crds.py`` turns them
into the CRD's structural OpenAPI schema (plus the CEL rules attached with ``x-kubernetes-validations``
below), and the controllers parse live objects with them.  Field names are camelCase on the wire
(aliases) and snake_case in Python.

Validation is layered:

* the API server enforces the OpenAPI bounds (``minimum`` and friends) and the CEL rules, so an
  obviously wrong object is rejected at ``kubectl apply`` time with a readable message;
* whatever can only be judged with more knowledge (the checkpoint's head counts, node capacity)
  is checked by the controller and reported in status conditions.

Immutability: ``spec.model.source`` cannot change.  A cluster serves one model; pointing it at other
weights is a new deployment (new endpoint semantics, possibly a different valid TP size), so it
is a new object.  Everything else (image, runtime settings, resources, sizes) may change and is
rolled out group by group.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from tpi_contract import defaults

GROUP = "tpi.dev"
VERSION = "v1alpha1"
KIND = "TPInferenceCluster"
PLURAL = "tpinferenceclusters"
SINGULAR = "tpinferencecluster"
SHORT_NAMES = ["tpic"]
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes resource.Quantity, as accepted by kubebuilder-generated CRDs.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]

#: How many restart-history entries status keeps (the oldest are dropped).
HISTORY_LIMIT = 30
#: Rank pods' terminationGracePeriodSeconds: default and floor (see tpi_contract.defaults).
DEFAULT_GRACE_SECONDS = defaults.GRACE_SECONDS
MIN_GRACE_SECONDS = defaults.MIN_GRACE_SECONDS


def _cel(rule: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"rule": rule, "message": message, **extra}


class _Model(BaseModel):
    """Base: camelCase aliases on the wire, unknown fields ignored (the API server prunes them)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        protected_namespaces=(),
    )

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, unset optionals omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------------------- model
class PVCSource(_Model):
    """Weights on a PersistentVolumeClaim, mounted read-only into every rank."""

    claim_name: str = Field(min_length=1, max_length=253, description="Name of the PVC in the namespace.")
    path: str = Field("", max_length=4096, description="Directory of the checkpoint inside the volume.")


class HostPathSource(_Model):
    """Weights on the node's filesystem (development only: violates the restricted Pod Security Standard)."""

    path: str = Field(min_length=1, max_length=4096, pattern=r"^/", description="Absolute path on the node.")


class ImageSource(_Model):
    """Weights baked into the runtime image (or into ``reference``, mounted as an image volume)."""

    path: str = Field(min_length=1, max_length=4096, pattern=r"^/", description="Absolute path in the image.")
    reference: str | None = Field(
        None,
        max_length=1024,
        description="OCI image holding the weights, mounted read-only (ImageVolume feature). "
        "Unset: the weights are inside spec.image itself.",
    )


class ModelSource(_Model):
    """Where the checkpoint (config.json, tokenizer, *.safetensors) lives. Exactly one must be set."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "[has(self.pvc), has(self.hostPath), has(self.image)].filter(x, x).size() == 1",
                    "exactly one of model.source.pvc, model.source.hostPath or model.source.image must be set",
                ),
                _cel(
                    "self == oldSelf",
                    "model.source is immutable: create a new TPInferenceCluster to serve other weights",
                ),
            ]
        }
    )

    pvc: PVCSource | None = None
    host_path: HostPathSource | None = None
    image: ImageSource | None = None

    @property
    def kind(self) -> str:
        return "pvc" if self.pvc else "hostPath" if self.host_path else "image"


class ModelConfigHints(_Model):
    """Architecture hints, used when the operator cannot read the checkpoint's config.json."""

    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    vocab_size: int | None = Field(None, ge=1)


class ModelSpec(_Model):
    """The checkpoint to serve."""

    source: ModelSource
    size_bytes: int | None = Field(
        None, ge=1, description="Declared size of the weights at the served dtype (sizing fallback)."
    )
    config: ModelConfigHints | None = Field(None, description="Hints overriding an unreadable config.json.")
    served_model_name: str | None = Field(None, max_length=253, description="Name in /v1/models.")


# --------------------------------------------------------------------------------- resources
class RankResources(_Model):
    """Per-rank resources; requests equal limits so every rank gets the same guaranteed share."""

    cpu: Quantity | None = Field(None, description="CPU per rank, e.g. '4'.")
    memory: Quantity | None = Field(None, description="Memory per rank, e.g. '32Gi'.")
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per rank (0: CPU ranks).")
    gpu_memory: Quantity | None = Field(
        None, description="Memory of one GPU, e.g. '80Gi'; lets tensorParallelSize 'auto' size GPU ranks."
    )


class RuntimeSpec(_Model):
    """Settings passed to ``python -m tpi_runtime serve``."""

    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_batch_size: int = Field(8, ge=1, le=4096)
    max_model_len: int | None = Field(None, ge=1)
    port: int = Field(defaults.HTTP_PORT, ge=1024, le=65535)
    extra_args: list[str] = Field(default_factory=list, max_length=64)


class Toleration(_Model):
    """core/v1 Toleration."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


#: A label key (an optional DNS-subdomain prefix and a name), as topologyKey and pod-group keys are.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LabelKey = Annotated[str, Field(min_length=1, max_length=316, pattern=LABEL_KEY_PATTERN)]


class KueueSpec(_Model):
    """Admit each group whole through Kueue's pod-group integration (docs/kueue.md)."""

    queue_name: str = Field(
        min_length=1,
        max_length=63,
        description=(
            "LocalQueue of the cluster's namespace: the pods get kueue.x-k8s.io/queue-name, "
            "kueue.x-k8s.io/pod-group-name (one group per TP group and incarnation), "
            "kueue.x-k8s.io/pod-group-total-count and kueue.x-k8s.io/retriable-in-group: 'false'."
        ),
    )


class PodGroupKeys(_Model):
    """Where a gang scheduler reads a pod's group: the operator writes the pod-group name and the
    group's pod count under these keys (e.g. coscheduling's label scheduling.x-k8s.io/pod-group)."""

    name_labels: list[LabelKey] = Field(
        default_factory=list, max_length=8, description="Pod labels set to the pod-group name."
    )
    name_annotations: list[LabelKey] = Field(
        default_factory=list, max_length=8, description="Pod annotations set to the pod-group name."
    )
    count_annotations: list[LabelKey] = Field(
        default_factory=list, max_length=8, description="Pod annotations set to the group's pod count."
    )


class SchedulingSpec(_Model):
    """Where rank pods may run, and how a group is placed and admitted (README: placement)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.exclusive) || !self.exclusive || has(self.topologyKey)",
                    "scheduling.exclusive needs scheduling.topologyKey (the domain a group owns)",
                )
            ]
        }
    )

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(
        None,
        description=(
            "core/v1 Affinity; the operator's own pod-affinity terms (co-location, topologyKey, "
            "exclusive) are appended to it, never replacing yours."
        ),
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = None
    topology_key: LabelKey | None = Field(
        None,
        description=(
            "Node label (e.g. a rack or NVLink-domain label): all pods of a group must run in one "
            "domain of it (required pod affinity). Unset: a group's pods are only preferred onto "
            "one node (kubernetes.io/hostname)."
        ),
    )
    exclusive: bool = Field(
        False,
        description=(
            "One group per topologyKey domain (as LeaderWorkerSet's exclusive topology): no pod of "
            "another exclusive group (any cluster) on the same key may share the domain."
        ),
    )
    scheduler_name: str | None = Field(
        None, max_length=253, description="The rank pods' schedulerName (a gang scheduler's)."
    )
    kueue: KueueSpec | None = Field(None, description="Admit each group whole through Kueue.")
    pod_group: PodGroupKeys = Field(
        default_factory=PodGroupKeys,
        description="Extra keys for the pod-group name and count (Volcano, coscheduling, ...).",
    )


class FailurePolicy(_Model):
    """How the operator recovers groups, and when it gives up."""

    heartbeat_timeout_seconds: int = Field(
        30,
        ge=defaults.min_heartbeat_timeout_seconds(),
        description=(
            "A rank whose Lease the operator has not seen renewed for this long while Running is hung; "
            "at least the runtime's stall threshold plus one renewal interval."
        ),
    )
    max_group_restarts: int = Field(3, ge=0, le=20, description="Group restarts allowed per window.")
    restart_window_seconds: int = Field(600, ge=1)
    backoff_seconds: int = Field(5, ge=0, le=3600, description="Base of the exponential restart backoff.")
    max_backoff_seconds: int = Field(300, ge=0, le=86400, description="Cap of the restart backoff.")
    oom_batch_size_floor: int = Field(1, ge=1, description="OOM halving never goes below this batch size.")
    allow_degrade: bool = Field(True, description="Shrink tensorParallelSize instead of failing.")
    min_tensor_parallel_size: int = Field(1, ge=1, description="Never degrade below this size.")
    scale_back_up: bool = Field(True, description="Grow back to the desired size when capacity returns.")
    scale_back_up_delay_seconds: int = Field(
        60,
        ge=0,
        le=86400,
        description=(
            "Least time at a size degraded for capacity before growing back (crash degrades wait "
            "restartWindowSeconds); doubled for every grow-back that had to go back down."
        ),
    )
    unschedulable_timeout_seconds: int = Field(
        120,
        ge=0,
        description=(
            "A rank Pending-unschedulable for this long: the cluster degrades to a size that fits; "
            "when none does, a group holding part of its pods releases them (scaled to zero) and "
            "retries once capacity for the whole group is free."
        ),
    )
    node_lost_timeout_seconds: int = Field(
        60,
        ge=0,
        le=86400,
        description=(
            "A rank on a NotReady, unreachable or deleted node for this long: its group's pods on that "
            "node are force-deleted and the group is recreated elsewhere."
        ),
    )


class UpdateStrategy(_Model):
    """Rolling of groups after a spec change or ``tpi.dev/restartedAt``."""

    max_unavailable: int = Field(
        1,
        ge=1,
        description=(
            "Groups that may be down for an update at once; also what the cluster's "
            "PodDisruptionBudget lets evictions (kubectl drain) take."
        ),
    )
    max_surge: int = Field(
        0,
        ge=0,
        le=16,
        description=(
            "Extra groups brought up with the new template before a Ready group is taken down, so a "
            "roll never lowers serving capacity (needs capacity for that many more groups). "
            "0: groups are rolled in place within maxUnavailable."
        ),
    )
    paused: bool = Field(
        False,
        description=(
            "Stop rolling: out-of-date groups keep their template (and are still healed in place); "
            "new groups are still created."
        ),
    )
    progress_deadline_seconds: int = Field(
        600,
        ge=1,
        le=86400,
        description=(
            "A rollout in which no further group became Ready on its new template for this long is "
            "halted (condition Progressing=False, reason ProgressDeadlineExceeded) until the spec changes."
        ),
    )


TensorParallelSize = int | Literal["auto"]


class TPInferenceClusterSpec(_Model):
    """Desired state: ``replicas`` independent tensor-parallel groups of ``tensorParallelSize`` ranks."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.failurePolicy) || !has(self.failurePolicy.minTensorParallelSize)"
                    " || type(self.tensorParallelSize) != int"
                    " || self.failurePolicy.minTensorParallelSize <= self.tensorParallelSize",
                    "failurePolicy.minTensorParallelSize must be <= tensorParallelSize",
                ),
                _cel(
                    "!has(self.ranksPerPod) || type(self.tensorParallelSize) != int"
                    " || self.tensorParallelSize % self.ranksPerPod == 0",
                    "ranksPerPod must divide tensorParallelSize: the pods of a group hold equal ranks",
                ),
                _cel(
                    "!has(self.failurePolicy) || !has(self.failurePolicy.oomBatchSizeFloor)"
                    " || !has(self.runtime) || !has(self.runtime.maxBatchSize)"
                    " || self.failurePolicy.oomBatchSizeFloor <= self.runtime.maxBatchSize",
                    "failurePolicy.oomBatchSizeFloor must be <= runtime.maxBatchSize",
                ),
            ]
        }
    )

    model: ModelSpec
    image: str = Field(min_length=1, max_length=1024, description="Runtime image (runs tpi_runtime).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    tensor_parallel_size: TensorParallelSize = Field(
        1,
        description="Ranks per group, or 'auto': the smallest valid size whose shard fits a rank.",
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                _cel(
                    "type(self) == int ? self >= 1 && self <= 256 : self == 'auto'",
                    "tensorParallelSize must be an integer between 1 and 256 or the string 'auto'",
                )
            ],
        },
    )
    replicas: int = Field(1, ge=0, le=1000, description="Independent TP groups (scale subresource).")
    ranks_per_pod: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "Ranks one pod runs (one process each; the pod requests that many times resources): a "
            "group is tensorParallelSize / ranksPerPod pods. Must divide tensorParallelSize; a "
            "degraded size uses the largest divisor of it that is at most this. Unset: the whole "
            "group in one pod when ranks request nvidia.com/gpu (NVLink/P2P between its GPUs), one "
            "rank per pod on CPU."
        ),
    )
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    resources: RankResources = Field(default_factory=RankResources)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)
    update_strategy: UpdateStrategy = Field(default_factory=UpdateStrategy)
    termination_grace_period_seconds: int = Field(
        DEFAULT_GRACE_SECONDS,
        ge=MIN_GRACE_SECONDS,
        le=3600,
        description=(
            "Rank pods' terminationGracePeriodSeconds: the preStop delay, then the runtime's drain "
            "of in-flight requests (--drain-seconds, derived from it), then exit. Longer than the "
            "longest request you want a roll or drain to finish."
        ),
    )


# ------------------------------------------------------------------------------------- status
Phase = Literal["Pending", "Loading", "Running", "Degraded", "Recovering", "Failed"]


class Condition(_Model):
    """metav1.Condition."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: Timestamp
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=32768)


class RankStatus(_Model):
    """One rank as last observed (with several ranks per pod, the pod's fields are shared)."""

    group: int
    rank: int
    pod: str
    local_rank: int | None = Field(
        None, description="The rank's index inside its pod (set only when pods run several ranks)."
    )
    node: str | None = None
    phase: str = "Pending"
    ready: bool = False
    restarts: int = 0
    last_termination_reason: str | None = None
    last_exit_code: int | None = Field(None, description="Exit code of the current or last terminated container.")
    waiting_reason: str | None = Field(
        None, description="Why the container is not running (ErrImagePull, CrashLoopBackOff, ...)."
    )
    waiting_message: str | None = Field(None, max_length=512, description="The kubelet's message, truncated.")
    last_heartbeat: Timestamp | None = None
    effective_batch_size: int | None = None
    termination_message: str | None = Field(
        None,
        max_length=512,
        description=(
            "Why the pod of several ranks last ended, from its launcher's termination message: which "
            "local rank exited, with which code (e.g. OOMKilled); on the rank it names."
        ),
    )


class GroupStatus(_Model):
    """Bookkeeping of one group; everything recovery needs survives an operator restart here."""

    group: int
    incarnation: int = Field(0, description="Bumped on every recreate; pods of older incarnations are deleted.")
    ready: bool = False
    restart_times: list[Timestamp] = Field(default_factory=list, description="Recreates within the window.")
    failing_since: Timestamp | None = Field(None, description="First failure not yet recovered from.")
    template_hash: str | None = None
    pod_uids: list[str] = Field(
        default_factory=list, description="UIDs of the formed group's ranks; a replaced pod breaks the group."
    )
    failure_reason: str | None = Field(None, description="Why the group last failed (kept while Failed).")
    failure_message: str | None = Field(None, max_length=1024, description="What the last failure was.")
    failed_generation: int | None = Field(
        None,
        description=(
            "The group is Failed: left alone, pods kept for debugging, while the other groups serve; "
            "a newer generation or tpi.dev/restartedAt retries it."
        ),
    )
    ready_hash: str | None = Field(
        None,
        description=(
            "Template the group was last Ready on: crash loops of a template the group never ran "
            "(a bad rollout) never degrade tensor parallelism."
        ),
    )
    max_batch_size: int | None = Field(
        None, description="This group's batch size after OOM halving (None: the spec's maxBatchSize)."
    )
    batch_basis: str | None = Field(
        None, description="The maxBatchSize/restartedAt the halving started from; a change resets it."
    )
    floor_ooms: int = Field(0, description="OOMs while already at oomBatchSizeFloor.")
    lost_node: str | None = Field(None, description="The node this group was last recreated off.")
    released_at: Timestamp | None = Field(
        None,
        description=(
            "The group held part of its pods while the rest could not be scheduled: it was scaled to "
            "zero so it holds nothing (all-or-nothing); set until it is scaled back up."
        ),
    )
    retry_at: Timestamp | None = Field(
        None, description="A released group is scaled back up from then on, once its whole size fits."
    )
    releases: int = Field(0, description="Releases since the group was last Ready (each doubles the backoff).")
    release_pods: int | None = Field(None, description="The released group's pod count.")


class RolloutStatus(_Model):
    """Progress of the rollout in flight (absent when every group runs its wanted template)."""

    key: str = Field(description="Digest of the groups' wanted templates: a new one is a new rollout.")
    progress_at: Timestamp = Field(description="When it started or last had one more group Ready on it.")
    updated_ready: int = Field(0, description="Groups Ready on their wanted template at progressAt.")


class HistoryEntry(_Model):
    """One recovery action."""

    time: Timestamp
    group: int | None = None
    reason: str
    action: str
    message: str = ""


class TPInferenceClusterStatus(_Model):
    """Observed state, written only by the operator."""

    phase: Phase = "Pending"
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    desired_tensor_parallel_size: int | None = None
    current_tensor_parallel_size: int | None = None
    tp: str | None = Field(None, description="current/desired TP size, for kubectl get.")
    ready: str | None = Field(None, description="readyRanks/totalRanks, for kubectl get.")
    ready_ranks: int = 0
    total_ranks: int = 0
    replicas: int = Field(0, description="Groups that exist (scale subresource).")
    ready_replicas: int = 0
    selector: str | None = Field(None, description="Label selector of rank-0 pods (scale subresource).")
    endpoint: str | None = None
    effective_max_batch_size: int | None = None
    restarts: int = Field(0, description="Group recreates so far.")
    last_failure: str | None = None
    ranks: list[RankStatus] = Field(default_factory=list)
    groups: list[GroupStatus] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list, max_length=HISTORY_LIMIT)
    degraded_reason: str | None = None
    degraded_since: Timestamp | None = Field(None, description="When the current size was degraded to.")
    grown_back_at: Timestamp | None = Field(None, description="Last grow-back not yet confirmed Ready.")
    failed_grow_backs: int = Field(0, description="Grow-backs that went back down; each doubles the delay.")
    rollout: RolloutStatus | None = None
    ready_spec: str | None = Field(
        None,
        description=(
            "Digest of the spec (without the size and batch recovery picks) some group was last Ready "
            "on: a resize of a proven spec is not a bad rollout."
        ),
    )
    restarted_at: str | None = Field(None, description="Last tpi.dev/restartedAt value acted upon.")


class TPInferenceCluster(_Model):
    """A set of tensor-parallel inference groups serving one model."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                    "metadata.name must be a DNS-1035 label of at most 40 characters "
                    "(it prefixes Service, StatefulSet and pod names)",
                )
            ]
        }
    )

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: TPInferenceClusterSpec
    status: TPInferenceClusterStatus = Field(default_factory=TPInferenceClusterStatus)
