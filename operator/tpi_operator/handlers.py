"""The imperative shell: kopf handlers that read state, call the core, and apply its decision.

Shape (like a controller-runtime controller, inside kopf):

* kopf *indices* keep watch-fed caches of the rank Pods, Leases and StatefulSets per cluster,
  and of every Node (slimmed), so a reconcile costs no LIST calls; free capacity, needed only
  while a cluster is degraded or a rank unschedulable, adds one query per candidate node selected
  on ``spec.nodeName`` (never a list of every pod in the cluster);
* one kopf *daemon* per TPInferenceCluster is its only reconciler (no two reconciles of one
  cluster ever race); it sleeps until a watched object changes (``on.event`` wakes it) or the
  core's next deadline (backoff, heartbeat, timeouts), and re-reads everything each time:
  level-triggered, so an operator restart simply resumes from status and the live objects;
* the blocking API work runs in a small thread pool, keeping the event loop free for watches.

Nothing here decides anything: ``core.reconcile.decide`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
import pydantic

from tpi_operator import checkpoint, metrics
from tpi_operator.api.v1alpha1 import GROUP, PLURAL, VERSION, TPInferenceClusterSpec, TPInferenceClusterStatus
from tpi_operator.core import admission, capacity, heartbeat, layout, placement, reconcile, recovery, render, sizing
from tpi_operator.core import status as status_core
from tpi_operator.core.observe import NodeObs, Observation, foreign_owner, lease_obs, node_obs, rank_obs, sts_obs
from tpi_operator.kopf_costs import ClusterEssenceStorage, QuietWatchHandlers
from tpi_operator.kube import Kube, KubeError, load_configuration

log = logging.getLogger("tpi_operator")
CLUSTER = render.L_CLUSTER
#: Shared objects (Services, RBAC) are re-read about this often, to heal manual deletes and edits
#: (re-applied only then): each after a random half to whole period (``_refresh_at``), by an idle
#: pass (``_due``).
RESYNC_SECONDS = 300.0
#: What is bound to a node (one field-selected query per node) is shared by all clusters this long.
CAPACITY_TTL_SECONDS = 10.0
#: Pod deletes of one pass run this many at a time (a group is recreated by deleting all its pods).
DELETE_FANOUT = 4
#: How long an object our delete removed (a force-deleted pod, a StatefulSet) is taken as gone while the
#: watch still shows it (``unseen_deletes``), and a StatefulSet we applied as applied (``unseen_applies``)
FORCE_DELETE_EXPECTATION_SECONDS = 30.0
#: Status is rewritten at most this often when only heartbeat times moved.
STATUS_REFRESH_SECONDS = 60.0


def idle_workers(workers: int) -> int:
    """Reconcile workers that idle resyncs may hold: half. The rest are kept for clusters with
    something to do (with 2 of 8 kept, 42 groups whose node-loss deadlines expired together
    waited up to 7 s for a worker)."""
    return max(1, workers // 2)


@dataclass
class OperatorConfig:
    """Set by ``__main__`` (through kopf's memo) before kopf starts."""

    workers: int = 64
    idle_seconds: float = 30.0
    busy_seconds: float = 2.0
    models_root: str | None = None
    peering: str | None = None
    priority: int = 0
    kubeconfig: str | None = None
    #: hostPath model sources are refused outside these prefixes (none: every hostPath is refused).
    allowed_host_paths: tuple[str, ...] = ()


@dataclass
class Memory:
    """Per-cluster in-memory state; losing it (restart) only costs some redundant applies."""

    last_status: dict[str, Any] | None = None
    last_status_write: float = 0.0
    #: (kind, name) -> (the applied object's hash, the resourceVersion our apply got back)
    applied: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    #: shared objects a re-read found deleted or changed by someone else: applied again
    stale: set[tuple[str, str]] = field(default_factory=set)
    model_key: str | None = None
    model_info: sizing.ModelInfo | None = None
    leases_seen: dict[str, heartbeat.Seen] = field(default_factory=dict)
    #: (kind, name) -> (monotonic time its re-read is due, who else has it, or None when ours or absent)
    owners: dict[tuple[str, str], tuple[float, str | None]] = field(default_factory=dict)
    #: uid -> when (monotonic) our grace-0 delete of that pod was sent; recorded once it returned, so
    #: the pod is gone from the API though the watch may not have said so yet (``unseen_deletes``)
    force_deleted: dict[str, float] = field(default_factory=dict)
    #: the same for the StatefulSets we deleted (a surge group done, a scale-down)
    deleted_statefulsets: dict[str, float] = field(default_factory=dict)
    #: StatefulSet name -> (when, the annotations) of our last apply (``unseen_applies``)
    applied_statefulsets: dict[str, tuple[float, dict[str, str]]] = field(default_factory=dict)


@dataclass
class Shared:
    """Operator-wide state.  It lives in kopf's memo: kopf shallow-copies the operator's memo into
    every object's memo, so all handlers share this one object (and tests can build their own)."""

    config: OperatorConfig = field(default_factory=OperatorConfig)
    wakers: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    #: uids of clusters deleted from the API: their reconcilers stop (no finalizer tells kopf).
    gone: set[str] = field(default_factory=set)
    clusters: dict[tuple[str, str], Memory] = field(default_factory=dict)
    #: node name -> (monotonic time read, the requests bound there): see ``_node_usage``
    node_usage: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)
    #: until when (monotonic) pods may not be listed cluster-wide (403: a namespaced install)
    pods_forbidden_until: float = 0.0
    node_missing_since: dict[str, dt.datetime] = field(default_factory=dict)
    #: node name -> its last seen readiness (True/False, None: unknown or deleted): wakes on a change
    node_ready: dict[str, bool | None] = field(default_factory=dict)
    gpu_nodes: GpuNodes = field(default_factory=lambda: GpuNodes())
    _kube: Kube | None = None
    _executor: ThreadPoolExecutor | None = None
    _fanout: ThreadPoolExecutor | None = None
    _slots: asyncio.Semaphore | None = None
    _resync_slots: asyncio.Semaphore | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def kube(self) -> Kube:
        with self._lock:
            if self._kube is None:
                pool = self.config.workers * (DELETE_FANOUT + 1) + 2  # each worker and its deletes; kopf
                self._kube = Kube.connect(pool_size=pool, kubeconfig=self.config.kubeconfig)
            return self._kube

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.config.workers, thread_name_prefix="reconcile")
            return self._executor

    def fanout(self) -> ThreadPoolExecutor:
        """Threads for the passes' independent requests (their pod deletes), DELETE_FANOUT per
        worker; separate from the workers, which wait on them."""
        with self._lock:
            if self._fanout is None:
                self._fanout = ThreadPoolExecutor(self.config.workers * DELETE_FANOUT, thread_name_prefix="fanout")
            return self._fanout

    @contextlib.asynccontextmanager
    async def slot(self, resync: bool = False) -> AsyncIterator[None]:
        """A reconcile worker: a reconciler takes its snapshot only once a worker is free, so when
        hundreds of clusters wake together their copies are not all held while they queue.

        Idle resyncs (nothing changed, the period ran out) hold at most half of them
        (``idle_workers``): a cluster woken by a change or a deadline (a node lost, a hang) never
        queues behind hundreds of resyncs that came due together.
        """
        if self._slots is None or self._resync_slots is None:
            self._slots = asyncio.Semaphore(self.config.workers)
            self._resync_slots = asyncio.Semaphore(idle_workers(self.config.workers))
        if resync:
            async with self._resync_slots, self._slots:
                yield
        else:
            async with self._slots:
                yield

    def wake(self, namespace: str | None, name: str | None) -> None:
        if namespace and name and (event := self.wakers.get((namespace, name))) is not None:
            event.set()


def shared(memo: Any) -> Shared:
    """The operator-wide state in ``memo`` (made on first use when kopf runs without ``__main__``)."""
    found = getattr(memo, "shared", None)
    if not isinstance(found, Shared):
        found = memo.shared = Shared()
    return found


def _plain(obj: Any) -> Any:
    """A deep plain-dict copy of a kopf body (kopf's views are live)."""
    return json.loads(json.dumps(obj, default=dict))


# ------------------------------------------------------------------------------------- startup
@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the API server with the same credentials as our client (--kubeconfig first).

    kopf's stock handler calls ``load_kube_config()`` without a path, and the client library reads
    $KUBECONFIG only when it is imported, so an explicit --kubeconfig would be ignored there.
    """
    cfg = load_configuration(shared(memo).config.kubeconfig)
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = shared(memo).config
    # Everything the reconciler needs lives in status and labels; kopf's own bookkeeping goes into
    # annotations (our status schema is strict and would prune kopf's fields anyway).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.tpi.dev")
    settings.persistence.diffbase_storage = ClusterEssenceStorage(
        prefix="kopf.tpi.dev", key="last-handled-configuration"
    )
    # No handler needs a finalizer (see no_finalizer below); kopf still removes this one from
    # clusters that an older operator blocked with it.
    settings.persistence.finalizer = "tpi.dev/daemon"
    settings.posting.level = logging.WARNING  # Events: we post our own; kopf only its warnings
    objects_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietWatchHandlers) for f in objects_log.filters):
        objects_log.addFilter(QuietWatchHandlers(WATCH_HANDLERS))
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Server-side filtering: only our rank pods, StatefulSets and Leases are listed and watched
    # (the client-side label filters below then always match).
    for resource in (("v1", "pods"), ("apps/v1", "statefulsets"), ("coordination.k8s.io/v1", "leases")):
        settings.watching.label_selectors[resource] = CLUSTER
    if config.peering:
        settings.peering.name = config.peering
        settings.peering.priority = config.priority
        settings.peering.standalone = False
        settings.peering.mandatory = True
    else:
        settings.peering.standalone = True


# --------------------------------------------------------------------------------------- caches
def _slim(body: Mapping[str, Any], spec_keys: Iterable[str] = ()) -> dict[str, Any]:
    meta = body.get("metadata", {})
    spec = body.get("spec", {}) or {}
    return {
        "metadata": _plain(
            {k: meta.get(k) for k in ("name", "uid", "labels", "annotations", "deletionTimestamp") if meta.get(k)}
        ),
        "spec": _plain({k: spec.get(k) for k in spec_keys if k in spec}),
        "status": _plain(body.get("status", {}) or {}),
    }


#: What ``observe.pod_obs`` reads of a container status: the index keeps only this (a 1.34
#: container status also lists its image, resources, volume mounts and user, per pod and forever).
_CONTAINER_STATUS_KEYS = ("name", "ready", "started", "restartCount", "state", "lastState")


def _slim_pod_status(status: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "phase": status.get("phase"),
        "startTime": status.get("startTime"),
        "conditions": status.get("conditions") or [],
        "containerStatuses": [
            {k: c[k] for k in _CONTAINER_STATUS_KEYS if k in c} for c in status.get("containerStatuses") or []
        ],
    }


@kopf.index("pods", labels={CLUSTER: kopf.PRESENT})
def tpi_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    # schedulingGates: a pod a queue (Kueue) holds is waiting, not stalled (observe.pod_obs).
    slim = _slim(body, ["nodeName", "schedulingGates"])
    slim["status"] = _slim_pod_status(slim["status"])
    # The requests, for capacity where only rank pods can be seen (capacity.node_usage).
    containers = (body.get("spec") or {}).get("containers") or []
    slim["spec"]["containers"] = [
        {"resources": {"requests": _plain((c.get("resources") or {}).get("requests") or {})}} for c in containers
    ]
    return {(namespace, labels[CLUSTER]): slim}


@kopf.index("leases.v1.coordination.k8s.io", labels={CLUSTER: kopf.PRESENT})
def tpi_leases(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    slim = _slim(body, ["renewTime", "holderIdentity"])
    slim["status"] = {}
    # The operator's own clock: heartbeats are judged by when the operator saw them, not renewTime.
    slim["observedAt"] = dt.datetime.now(dt.UTC).isoformat()
    return {(namespace, labels[CLUSTER]): slim}


@kopf.index("statefulsets.v1.apps", labels={CLUSTER: kopf.PRESENT})
def tpi_statefulsets(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[CLUSTER]): _slim(body, ["replicas"])}


@kopf.index("nodes")
def tpi_nodes(name: str, body: kopf.Body, **_: Any) -> dict:
    """Every node, slimmed to what capacity and node loss read (nodes are cluster-scoped: kopf
    watches them cluster-wide even when the operator serves only some namespaces)."""
    return {name: capacity.slim_node(_plain(body))}


def _node_ready(body: Mapping[str, Any]) -> bool | None:
    conds = (body.get("status") or {}).get("conditions") or []
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    return None if ready is None else ready.get("status") == "True"


@kopf.on.event("nodes")
async def node_changed(
    name: str, body: kopf.Body, event: Mapping[str, Any], memo: kopf.Memo, tpi_pods: kopf.Index, **_: Any
) -> None:
    """A node's readiness changed (or it went away): wake the clusters with rank pods on it, so the
    node-loss clock starts now rather than at their next resync."""
    state = shared(memo)
    ready = None if event.get("type") == "DELETED" else _node_ready(body)
    if name in state.node_ready and state.node_ready[name] == ready:
        return
    known = name in state.node_ready
    state.node_ready[name] = ready
    if not known and ready:
        return  # first sight of a healthy node: nothing to do
    for key, store in list(tpi_pods.items()):
        if any((p.get("spec") or {}).get("nodeName") == name for p in store):
            state.wake(*key)


@kopf.on.event("pods", labels={CLUSTER: kopf.PRESENT})
async def pod_changed(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    shared(memo).wake(namespace, labels.get(CLUSTER))


@kopf.on.event("statefulsets.v1.apps", labels={CLUSTER: kopf.PRESENT})
async def statefulset_changed(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    shared(memo).wake(namespace, labels.get(CLUSTER))


# ------------------------------------------------------------------------------ cluster events
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def cluster_changed(spec: kopf.Spec, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """Thin: wake the cluster's reconciler; an unusable spec is reported there, in status."""
    shared(memo).wake(namespace, name)
    try:
        TPInferenceClusterSpec.model_validate(_plain(spec))
    except pydantic.ValidationError as e:
        # Permanent: retrying the same spec cannot help; the next edit is a new update.
        raise kopf.PermanentError(f"invalid spec: {_validation_message(e)}") from None


@kopf.on.event(GROUP, VERSION, PLURAL)
async def cluster_event(type: str | None, uid: str, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A deleted cluster's reconciler stops: kopf itself stops daemons only of objects that a
    finalizer keeps around, and ours keep none."""
    if type == "DELETED":
        state = shared(memo)
        state.gone.add(uid)
        state.wake(namespace, name)


#: The ``on.event`` handlers, called once per watch event: kopf's log line for each success is dropped.
WATCH_HANDLERS = tuple(f.__name__ for f in (node_changed, pod_changed, statefulset_changed, cluster_event))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=2.0)
async def reconciler(
    name: str,
    namespace: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    tpi_pods: kopf.Index,
    tpi_leases: kopf.Index,
    tpi_statefulsets: kopf.Index,
    tpi_nodes: kopf.Index,
    **_: Any,
) -> None:
    """The one reconciler of this cluster: reconcile, then sleep until woken or due."""
    state = shared(memo)
    key = (namespace, name)
    # Fresh ones: a deleted same-named predecessor may still be on its way out with its own.
    wake = state.wakers[key] = asyncio.Event()
    mem = state.clusters[key] = Memory()
    loop = asyncio.get_running_loop()
    uid = body.get("metadata", {}).get("uid", "")
    try:
        resync = False  # the first pass, and every pass after a change or a deadline, is not one
        while not stopped and uid not in state.gone:
            async with state.slot(resync):
                outcome = await _reconcile_in_worker(state, mem, key, body, loop, wake, tpi_pods, tpi_leases,
                                                     tpi_statefulsets, tpi_nodes, refresh_shared=resync)  # fmt: skip
            for event in outcome.events:
                kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])
            try:
                await asyncio.wait_for(wake.wait(), timeout=_jittered(outcome.wake_after, state.config))
                resync = False
            except TimeoutError:
                resync = outcome.wake_after >= state.config.idle_seconds
    finally:
        state.gone.discard(uid)
        if state.wakers.get(key) is wake:  # a same-named successor may have started already
            state.wakers.pop(key, None)
            state.clusters.pop(key, None)


async def _reconcile_in_worker(
    state: Shared,
    mem: Memory,
    key: tuple[str, str],
    body: kopf.Body,
    loop: asyncio.AbstractEventLoop,
    wake: asyncio.Event,
    tpi_pods: kopf.Index,
    tpi_leases: kopf.Index,
    tpi_statefulsets: kopf.Index,
    tpi_nodes: kopf.Index,
    refresh_shared: bool = True,
) -> Outcome:
    """Take what the worker thread reads (the indexes change in this event loop), then run one
    reconcile there; our own last status write is newer than the body's, as in reconcile_once.

    References, not copies: kopf replaces a body's or an index key's value on every event and
    changes neither in place (the index functions build new plain dicts), and the reconcile only
    reads them; lists taken here are a consistent snapshot.  Deep copies of them were a third of
    the operator's CPU while a lost node's groups recovered (py-spy, 43 groups)."""
    wake.clear()
    snapshot = {k: body[k] for k in body}
    pods = list(tpi_pods.get(key, []))
    leases = list(tpi_leases.get(key, []))
    stses = list(tpi_statefulsets.get(key, []))
    world = _world(mem.last_status or snapshot.get("status") or {}, pods, tpi_nodes, tpi_pods, state.gpu_nodes)
    started = time.monotonic()
    try:
        outcome = await loop.run_in_executor(
            state.executor(), reconcile_once, state, mem, snapshot, pods, leases, stses, world, refresh_shared
        )
        metrics.RECONCILES.labels(outcome.result).inc()
    except Exception as e:  # never let one bad reconcile kill the daemon; back off instead
        log.exception("reconcile of %s/%s failed", *key)
        metrics.RECONCILES.labels("error").inc()
        outcome = Outcome(wake_after=min(60.0, state.config.busy_seconds * 5), result="error")
        kopf.warn(body, reason="ReconcileError", message=str(e)[:1000])
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    return outcome


def _jittered(wake_after: float, config: OperatorConfig) -> float:
    """Idle resyncs are spread by up to 10%, so clusters created together do not all wake in the
    same instant forever after; deadlines (backoff, heartbeats, node loss) are kept exact."""
    if wake_after >= config.idle_seconds:
        return wake_after * random.uniform(1.0, 1.1)
    return wake_after


def no_finalizer(registry: Any) -> int:
    """Let this operator's daemons run without a finalizer on the cluster; returns how many.

    kopf adds a finalizer to every object that has a daemon, to stop the daemon before the object
    goes.  A TPInferenceCluster then cannot be deleted while no operator runs: it hangs Terminating,
    and its namespace with it.  Our daemon has no end-of-life work (owner references garbage-collect
    everything the cluster owns, and ``cluster_event`` stops the daemon on deletion), so the
    requirement is dropped.  kopf exposes no option for it: its handler records are rewritten.
    """
    handlers = registry._spawning._handlers
    changed = 0
    for i, h in enumerate(handlers):
        if getattr(h, "requires_finalizer", False):
            handlers[i] = dataclasses.replace(h, requires_finalizer=False)
            changed += 1
    return changed


no_finalizer(kopf.get_default_registry())


# ------------------------------------------------------------------------------------ reconcile
@dataclass
class World:
    """What a reconcile reads of the rest of the cluster, copied from the indexes."""

    #: the rank pods' nodes: name -> slim node, or None when it does not exist
    nodes: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    #: every node (slim), only when free capacity is needed; else None
    all_nodes: list[dict[str, Any]] | None = None
    #: every rank pod the operator watches (all clusters), for capacity without cluster-wide pod reads
    rank_pods: list[dict[str, Any]] = field(default_factory=list)
    #: every node offering GPUs (slim), for the default ranks per pod of GPU clusters
    gpu_nodes: list[dict[str, Any]] = field(default_factory=list)


def _needs_capacity(st: Mapping[str, Any], pods: list[dict[str, Any]]) -> bool:
    """Free capacity matters only to a degraded cluster or a rank that cannot be scheduled."""
    if (st.get("currentTensorParallelSize") or 0) < (st.get("desiredTensorParallelSize") or 0):
        return True
    if any(g.get("releasedAt") for g in st.get("groups") or []):  # it scales back up once it fits
        return True
    return any(
        c.get("type") == "PodScheduled" and c.get("status") == "False"
        for p in pods
        for c in (p.get("status") or {}).get("conditions") or []
    )


def _world(
    st: Mapping[str, Any],
    pods: list[dict[str, Any]],
    nodes: kopf.Index,
    rank_pods: kopf.Index,
    gpu_nodes: GpuNodes,
) -> World:
    names = {n for p in pods if (n := (p.get("spec") or {}).get("nodeName"))}
    world = World(nodes={n: next(iter(nodes.get(n, [])), None) for n in sorted(names)})
    world.gpu_nodes = gpu_nodes.of(nodes)
    if _needs_capacity(st, pods):
        world.all_nodes = [n for store in nodes.values() for n in store]
        world.rank_pods = [p for store in rank_pods.values() for p in store]
    return world


def _offers_gpus(node: Mapping[str, Any]) -> bool:
    return capacity.allocatable(node).get("nvidia.com/gpu", 0.0) > 0


@dataclass
class GpuNodes:
    """The nodes offering GPUs, each node's answer kept while its index value is the same object
    (a new one comes with every change): parsing every node's allocatable on every pass cost more
    than the pass's own decision with 500 clusters."""

    _seen: dict[str, tuple[Mapping[str, Any], bool]] = field(default_factory=dict)

    def of(self, nodes: kopf.Index) -> list[dict[str, Any]]:
        out, seen = [], {}
        for name, store in nodes.items():
            for node in store:
                cached = self._seen.get(name)
                gpus = cached[1] if cached is not None and cached[0] is node else _offers_gpus(node)
                seen[name] = (node, gpus)
                if gpus:
                    out.append(node)
        self._seen = seen
        return out


@dataclass
class Outcome:
    wake_after: float
    result: str = "ok"
    events: list[reconcile.Event] = field(default_factory=list)


def _validation_message(e: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])


def _model_info(mem: Memory, spec: TPInferenceClusterSpec, models_root: str | None) -> sizing.ModelInfo:
    key = json.dumps([spec.model.wire(), spec.runtime.dtype], sort_keys=True)
    if mem.model_key != key:
        read = None
        path = checkpoint.local_model_dir(spec, models_root)
        if path is not None and (path.is_dir() or (path.suffix == ".gguf" and path.is_file())):
            read = checkpoint.read_model_info(path, spec.runtime.dtype)
        mem.model_key, mem.model_info = key, sizing.model_info_from_spec(spec, read)
    assert mem.model_info is not None
    return mem.model_info


def _write_status(kube: Kube, mem: Memory, name: str, namespace: str, st: TPInferenceClusterStatus) -> None:
    wire = st.wire()
    if mem.last_status is not None:
        if mem.last_status == wire:
            return
        # Heartbeat times alone move every few seconds: written at most every STATUS_REFRESH_SECONDS.
        due = time.monotonic() - mem.last_status_write > STATUS_REFRESH_SECONDS
        if _without_heartbeats(mem.last_status) == _without_heartbeats(wire) and not due:
            return
    kube.apply_status(name, namespace, wire)
    mem.last_status, mem.last_status_write = wire, time.monotonic()


def _without_heartbeats(wire: dict[str, Any]) -> dict[str, Any]:
    out = dict(wire)
    out["ranks"] = [{k: v for k, v in r.items() if k != "lastHeartbeat"} for r in wire.get("ranks", [])]
    return out


def reconcile_once(
    state: Shared,
    mem: Memory,
    body: dict[str, Any],
    pods: list[dict],
    leases: list[dict],
    stses: list[dict],
    world: World | None = None,
    refresh_shared: bool = True,
) -> Outcome:
    """One level-triggered pass for one cluster (runs in a worker thread): read, decide, apply.

    ``refresh_shared``: this is an idle pass, which re-reads the shared objects whose period ran
    out (and re-applies those found deleted or changed); a pass woken for something to do leaves
    that to the next idle pass (``_due``), so those requests do not delay a recovery."""
    kube, config = state.kube(), state.config
    world = world if world is not None else World()
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    now = dt.datetime.now(dt.UTC)
    generation = int(meta.get("generation") or 1)
    # Only this operator writes status: our last write is newer than a lagging watch.
    raw_status = mem.last_status if mem.last_status is not None else body.get("status") or {}
    try:
        prev = TPInferenceClusterStatus.model_validate(raw_status)
    except pydantic.ValidationError:
        prev = TPInferenceClusterStatus()

    try:
        spec = TPInferenceClusterSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as e:
        msg = f"spec cannot be used: {_validation_message(e)}"
        st = status_core.invalid(prev, generation, "InvalidSpec", msg, now, phase="Failed")
        _write_status(kube, mem, name, namespace, st)
        events = [] if prev.last_failure == st.last_failure else [reconcile.Event("Warning", "InvalidSpec", msg)]
        return Outcome(config.idle_seconds * 10, "invalid", events)

    refused = admission.host_path_refusal(spec, config.allowed_host_paths)
    if refused is not None:  # before anything reads or mounts the path
        st = status_core.invalid(prev, generation, "HostPathNotAllowed", refused, now, phase="Failed")
        _write_status(kube, mem, name, namespace, st)
        event = reconcile.Event("Warning", "HostPathNotAllowed", refused)
        events = [] if prev.last_failure == st.last_failure else [event]
        return Outcome(config.idle_seconds * 10, "invalid", events)

    info = _model_info(mem, spec, config.models_root)
    try:
        desired = sizing.desired_tp(spec, info)
    except sizing.SizingError as e:
        phase = "Pending" if e.reason == "SizingUnavailable" else "Failed"
        st = status_core.invalid(prev, generation, e.reason, str(e), now, phase=phase)
        st.desired_tensor_parallel_size = None
        _write_status(kube, mem, name, namespace, st)
        events = [] if prev.last_failure == st.last_failure else [reconcile.Event("Warning", e.reason, str(e))]
        return Outcome(config.idle_seconds * 2, "invalid", events)

    if found := layout.problems(spec, desired):  # 'auto' resolved to a size ranksPerPod cannot split
        msg = found[0]
        st = status_core.invalid(prev, generation, "InvalidRanksPerPod", msg, now, phase="Failed")
        _write_status(kube, mem, name, namespace, st)
        events = [] if prev.last_failure == st.last_failure else [reconcile.Event("Warning", "InvalidRanksPerPod", msg)]
        return Outcome(config.idle_seconds * 10, "invalid", events)

    # Unset ranksPerPod on GPUs: the whole group per pod when it fits the largest eligible node.
    spec = layout.resolved(spec, desired, capacity.most_gpus_on_a_node(spec, world.gpu_nodes))
    rank_bytes = sizing.rank_memory_bytes(spec)
    sizes = [s for s in sizing.valid_tp_sizes(info) if sizing.fits(info, s, rank_bytes) is not False]
    sizes = sorted(set(sizes) | {desired})
    ident = render.Identity(name=name, namespace=namespace, uid=meta["uid"])
    restarted_at = (meta.get("annotations") or {}).get(render.A_RESTARTED_AT)
    pods = unseen_deletes(mem.force_deleted, pods)
    stses = unseen_applies(mem.applied_statefulsets, unseen_deletes(mem.deleted_statefulsets, stses))
    pod_list = [p for x in pods for p in rank_obs(x)]  # one per rank: a pod may run several
    sts_list = [s for s in (sts_obs(x) for x in stses) if s is not None]
    lease_map = {lo.name: lo for lo in (lease_obs(x) for x in leases)}
    mem.leases_seen = heartbeat.track(mem.leases_seen, pod_list, lease_map, now)
    obs = Observation(
        now=now,
        generation=generation,
        desired_tp=desired,
        valid_sizes=sizes,
        status=prev,
        pods=pod_list,
        leases=heartbeat.with_since(lease_map, mem.leases_seen),
        statefulsets={s.group: s for s in sts_list},
        restarted_at=restarted_at,
        **_free_slots(state, kube, spec, world, {layout.ranks_per_pod(spec, s) for s in sizes if s <= desired}, ident),
        group_id=lambda g: placement.group_id(namespace, name, g),
        nodes=_nodes(state, world, now),
        foreign=_foreign(kube, mem, spec, ident, refresh_shared),
        hash_for=reconcile.hash_function(spec, ident, restarted_at),
    )
    decision = reconcile.decide(spec, ident, obs, idle_seconds=config.idle_seconds, busy_seconds=config.busy_seconds)

    sts_uids = {m.get("name"): m.get("uid") for m in (x.get("metadata") or {} for x in stses)}
    apply_decision(state, kube, mem, name, namespace, decision, sts_uids)

    for a in decision.actions:
        if isinstance(a, (*recovery.RECORDED, recovery.ForceDelete)) or (
            isinstance(a, recovery.RollGroup) and a.reason != "Create"
        ):
            metrics.ACTIONS.labels(a.kind, a.reason).inc()
            log.info("%s/%s: %s %s: %s", namespace, name, a.kind, a.reason, a.message)
    for rec in decision.recovered:
        metrics.RECOVERY_SECONDS.labels(rec.reason or "unknown").observe(rec.seconds)
        log.info("%s/%s: group %d Ready again %.1fs after %s", namespace, name, rec.group, rec.seconds, rec.reason)
    return Outcome(decision.wake_after, "ok", decision.events)


def apply_decision(
    state: Shared,
    kube: Kube,
    mem: Memory,
    name: str,
    namespace: str,
    decision: reconcile.Decision,
    sts_uids: Mapping[str, str | None] | None = None,
) -> None:
    """Carry out one decision, in this order: a lost node's pods (after their groups' new
    templates, which the replacements must carry), then the status (bookkeeping first: if it
    cannot be written, nothing else is done, rather than acting again on the next pass from a
    status that never recorded it), then the objects, the StatefulSets' patches and the deletes."""
    if decision.force_delete_pods:
        for obj in decision.apply_first:
            _apply(kube, mem, obj)
        _patch_statefulsets(kube, mem, namespace, decision.patch_statefulsets)
        names = ", ".join(d.name for d in decision.force_delete_pods)
        log.info("%s/%s: force-deleting pods %s", namespace, name, names)
        started = time.monotonic()
        _delete_pods(state, kube, namespace, decision.force_delete_pods)
        mem.force_deleted.update((d.uid, started) for d in decision.force_delete_pods if d.uid)
        log.info("%s/%s: force-deleted pods %s in %.2fs", namespace, name, names, time.monotonic() - started)
    _write_status(kube, mem, name, namespace, decision.status)
    for obj in decision.apply:
        _apply(kube, mem, obj)
    if not decision.force_delete_pods:
        _patch_statefulsets(kube, mem, namespace, decision.patch_statefulsets)  # before the deletes: new pods get it
    if decision.delete_pods:
        wanted = {g.group: g.incarnation for g in decision.status.groups}
        log.info("%s/%s: deleting pods %s; groups' incarnations %s", namespace, name,
                 ", ".join(f"{d.name}(grace {d.grace_seconds})" for d in decision.delete_pods), wanted)  # fmt: skip
    _delete_pods(state, kube, namespace, decision.delete_pods)
    for sts in decision.delete_statefulsets:
        kube.delete("StatefulSet", namespace, sts)
        if uid := (sts_uids or {}).get(sts):  # ``sts_uids``: name -> uid of the StatefulSets observed
            mem.deleted_statefulsets[uid] = time.monotonic()
    for lease in decision.delete_leases:
        kube.delete("Lease", namespace, lease)


def _patch_statefulsets(kube: Kube, mem: Memory, namespace: str, patches: list[tuple[str, dict[str, Any]]]) -> None:
    for sts, patch in patches:
        kube.patch("StatefulSet", namespace, sts, patch)
        mem.applied_statefulsets.pop(sts, None)  # our apply is no longer the latest version


def _delete_pods(state: Shared, kube: Kube, namespace: str, deletes: list[reconcile.PodDelete]) -> None:
    """Together, not one after another (a recreated group waits on all of them); re-raises a failure."""
    list(state.fanout().map(
        lambda d: kube.delete("Pod", namespace, d.name, grace_seconds=d.grace_seconds, uid=d.uid or None), deletes
    ))  # fmt: skip


def unseen_deletes(deleted: dict[str, float], objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects without those our own deletes removed and the watch still shows (``deleted``:
    uid -> when the delete returned), like a Kubernetes controller's expectations: a pass right
    after a force delete (its StatefulSet's events wake it) would otherwise force-delete the pods
    again, a second request per pod while a lost node's groups wait for theirs, and a pass right
    after a surge group's StatefulSet went would remove (and record) it again.  An entry ends when
    the watch no longer shows the object, or after FORCE_DELETE_EXPECTATION_SECONDS should its
    event never come; ``deleted`` is pruned in place."""
    now, live = time.monotonic(), {(o.get("metadata") or {}).get("uid") for o in objs}
    expired = now - FORCE_DELETE_EXPECTATION_SECONDS
    for uid in [uid for uid, at in deleted.items() if uid not in live or at <= expired]:
        del deleted[uid]
    return [o for o in objs if (o.get("metadata") or {}).get("uid") not in deleted]


def unseen_applies(
    applied: dict[str, tuple[float, dict[str, str]]], stses: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The StatefulSets with the annotations of our last apply where the watch still shows an
    older version (its object hash differs): a pass woken by a pod event before the StatefulSet's
    own event would otherwise roll the group again and record the roll twice (once in CI,
    test_zero_downtime's max-surge roll).  An entry ends once the watch shows our object, or after
    FORCE_DELETE_EXPECTATION_SECONDS; ``applied`` is pruned in place."""
    expired, out = time.monotonic() - FORCE_DELETE_EXPECTATION_SECONDS, []
    names = {(sts.get("metadata") or {}).get("name") for sts in stses}
    for gone in [name for name in applied if name not in names]:  # deleted since: nothing to show
        del applied[gone]
    for sts in stses:
        meta = sts.get("metadata") or {}
        seen = applied.get(meta.get("name"))
        if seen is not None and (seen[0] <= expired or (meta.get("annotations") or {}).get(
                render.A_OBJECT_HASH) == seen[1].get(render.A_OBJECT_HASH)):  # fmt: skip
            del applied[meta.get("name")]
            seen = None
        out.append(sts if seen is None else {**sts, "metadata": {**meta, "annotations": seen[1]}})
    return out


def _refresh_at() -> float:
    """When a shared object is next re-read: after a random half to whole
    RESYNC_SECONDS, so that hundreds of clusters created together do not all come due in the same
    minute (their 12 requests each once queued a lost node's recovery behind them)."""
    return time.monotonic() + RESYNC_SECONDS * random.uniform(0.5, 1.0)


def _due(refresh_at: float, refresh: bool) -> bool:
    """A shared object's periodic refresh is due; a pass woken for something to do (a change, a
    deadline) leaves it to an idle pass unless it is a whole period late (a cluster never idle)."""
    return time.monotonic() >= refresh_at + (0.0 if refresh else RESYNC_SECONDS)


def _apply(kube: Kube, mem: Memory, obj: dict[str, Any]) -> None:
    """Apply unless this exact object was applied and no re-read found it deleted or changed since
    (``_foreign``: shared objects are not watched)."""
    key = (obj["kind"], obj["metadata"]["name"])
    digest = obj["metadata"]["annotations"][render.A_OBJECT_HASH]
    watched = obj["kind"] in ("StatefulSet", "Lease")  # their caches already said "changed"
    seen = mem.applied.get(key)
    if not watched and seen and seen[0] == digest and key not in mem.stale:
        return
    try:
        applied = kube.apply(obj)
    except KubeError as e:
        if e.status == 404 and obj["kind"] == "Lease":
            return  # namespace going away
        raise
    mem.applied[key] = (digest, _version(applied or {}))
    mem.stale.discard(key)
    if obj["kind"] == "StatefulSet":
        mem.applied_statefulsets[obj["metadata"]["name"]] = (time.monotonic(), obj["metadata"]["annotations"])


def _free_slots(
    state: Shared,
    kube: Kube,
    spec: TPInferenceClusterSpec,
    world: World,
    pod_sizes: set[int],
    ident: render.Identity,
) -> dict[str, Any]:
    """Free capacity, only when a decision needs it (``_needs_capacity``): the node index, minus
    what is bound to each candidate node (``_node_usage``, and the rank pods the operator's watch
    shows now); in ranks of one-rank pods (``free_rank_slots``), of pods of each other size the
    group may run (``free_ranks_in_pods``), and as room under the placement rules per pod size
    (``capacities``)."""
    if world.all_nodes is None:
        return {"free_rank_slots": None}
    names = capacity.candidate_nodes(spec, world.all_nodes)
    try:
        used = _node_usage(state, kube, names, world.rank_pods)
    except KubeError as e:
        log.warning("cannot read what is bound to the nodes (%s); assuming no capacity is free", e)
        return {"free_rank_slots": None}
    groups = spec.replicas + spec.update_strategy.max_surge
    own = frozenset(placement.group_id(ident.namespace, ident.name, g) for g in range(groups))
    return {
        "free_rank_slots": capacity.free_rank_slots(spec, world.all_nodes, used),
        "free_ranks_in_pods": {
            n: capacity.free_rank_slots(spec, world.all_nodes, used, n) for n in sorted(pod_sizes) if n > 1
        },
        "capacities": {
            n: capacity.snapshot(spec, world.all_nodes, used, world.rank_pods, own, n) for n in sorted(pod_sizes | {1})
        },
    }


def _node_usage(
    state: Shared, kube: Kube, names: list[str], rank_pods: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Requests bound to each node: one query per node selected on ``spec.nodeName`` (paginated,
    shared by all clusters for CAPACITY_TTL_SECONDS).

    Without the right to list pods in every namespace (a namespaced install without
    ``rbac.listPodsClusterWide``), only the rank pods the operator watches are counted: other
    workloads on those nodes are invisible, so the estimate is an upper bound there.
    """
    if time.monotonic() < state.pods_forbidden_until:
        return capacity.node_usage(rank_pods)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        cached = state.node_usage.get(name)
        if cached is None or time.monotonic() - cached[0] > CAPACITY_TTL_SECONDS:
            try:
                bound = kube.list("Pod", fields=f"spec.nodeName={name},status.phase!=Succeeded,status.phase!=Failed")
            except KubeError as e:
                if e.status != 403:
                    raise
                log.warning("may not list pods cluster-wide (%s): free capacity counts only rank pods", e.message)
                state.pods_forbidden_until = time.monotonic() + RESYNC_SECONDS
                return capacity.node_usage(rank_pods)
            cached = state.node_usage[name] = (time.monotonic(), capacity.node_usage(bound).get(name, {}))
        out[name] = cached[1]
    return out


def _nodes(state: Shared, world: World, now: dt.datetime) -> dict[str, NodeObs]:
    """The rank pods' nodes, from the node index (no requests)."""
    out = {}
    for node_name, node in world.nodes.items():
        if node is None:
            missing = state.node_missing_since.setdefault(node_name, now)  # the operator's own clock
        else:
            state.node_missing_since.pop(node_name, None)
            missing = None
        out[node_name] = node_obs(node_name, node, missing)
    return out


def _version(obj: dict[str, Any]) -> str:
    """What changes when someone edits an object: its generation where it has one (a
    PodDisruptionBudget, whose status the disruption controller rewrites as pods come and go),
    else its resourceVersion."""
    meta = obj.get("metadata") or {}
    return f"g{meta['generation']}" if meta.get("generation") else str(meta.get("resourceVersion", ""))


def _foreign(
    kube: Kube, mem: Memory, spec: TPInferenceClusterSpec, ident: render.Identity, refresh: bool = True
) -> dict[tuple[str, str], str]:
    """Shared objects of our names that someone else has (one GET each when first seen, when its
    refresh is due (``_due``), and on every pass while someone else has it).

    A re-read also marks ours stale when it is gone or its version (``_version``) is not the one
    our apply got back (someone edited it), so ``_apply`` re-applies only those rather than every
    shared object every period."""
    out = {}
    for obj in render.shared_objects(spec, ident, []):
        key = (obj["kind"], obj["metadata"]["name"])
        seen = mem.owners.get(key)
        if seen is None or _due(seen[0], refresh) or seen[1] is not None:
            try:
                live = kube.request("GET", kube.path(key[0], ident.namespace, key[1]))
                owner = foreign_owner(live, ident.uid)
                if owner is None and (key not in mem.applied or mem.applied[key][1] != _version(live)):
                    mem.stale.add(key)
            except KubeError as e:
                if e.status != 404:
                    raise
                owner = None
                mem.stale.add(key)
            seen = mem.owners[key] = (_refresh_at(), owner)
        if seen[1] is not None:
            out[key] = seen[1]
    return out
