"""The imperative shell: kopf handlers that read state, call the core, and apply its decision.

Shape (like a controller-runtime controller, inside kopf):

* kopf *indices* keep watch-fed caches of the rank Pods, Leases and StatefulSets per cluster,
  so a reconcile costs no LIST calls;
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
import copy
import datetime as dt
import json
import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
import pydantic

from tpi_operator import checkpoint, metrics
from tpi_operator.api.v1alpha1 import GROUP, PLURAL, VERSION, TPInferenceClusterSpec, TPInferenceClusterStatus
from tpi_operator.core import capacity, reconcile, recovery, render, sizing
from tpi_operator.core import status as status_core
from tpi_operator.core.observe import Observation, lease_obs, pod_obs, sts_obs
from tpi_operator.kube import Kube, KubeError, load_configuration

log = logging.getLogger("tpi_operator")
CLUSTER = render.L_CLUSTER
#: Shared objects (Services, RBAC) are re-applied at least this often, to heal manual deletes.
RESYNC_SECONDS = 300.0
#: Node capacity (two cluster-wide LISTs) is shared by all clusters for this long.
CAPACITY_TTL_SECONDS = 5.0
#: Status is rewritten at most this often when only heartbeat times moved.
STATUS_REFRESH_SECONDS = 60.0


@dataclass
class OperatorConfig:
    """Set by ``__main__`` before kopf starts."""

    workers: int = 8
    idle_seconds: float = 30.0
    busy_seconds: float = 2.0
    models_root: str | None = None
    peering: str | None = None
    priority: int = 0
    kubeconfig: str | None = None


CONFIG = OperatorConfig()


@dataclass
class Memory:
    """Per-cluster in-memory state; losing it (restart) only costs some redundant applies."""

    last_status: dict[str, Any] | None = None
    last_status_write: float = 0.0
    applied: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    model_key: str | None = None
    model_info: sizing.ModelInfo | None = None


_WAKERS: dict[tuple[str, str], asyncio.Event] = {}
_MEMORY: dict[tuple[str, str], Memory] = {}
_STATE: dict[str, Any] = {}


def _kube() -> Kube:
    if "kube" not in _STATE:
        _STATE["kube"] = Kube.connect(pool_size=CONFIG.workers + 2, kubeconfig=CONFIG.kubeconfig)
    return _STATE["kube"]


def _executor() -> ThreadPoolExecutor:
    if "executor" not in _STATE:
        _STATE["executor"] = ThreadPoolExecutor(CONFIG.workers, thread_name_prefix="reconcile")
    return _STATE["executor"]


def _wake(namespace: str | None, name: str | None) -> None:
    if namespace and name and (event := _WAKERS.get((namespace, name))) is not None:
        event.set()


def _plain(obj: Any) -> Any:
    """A deep plain-dict copy of a kopf body (kopf's views are live)."""
    return json.loads(json.dumps(obj, default=dict))


# ------------------------------------------------------------------------------------- startup
@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the API server with the same credentials as our client (--kubeconfig first).

    kopf's stock handler calls ``load_kube_config()`` without a path, and the client library reads
    $KUBECONFIG only when it is imported, so an explicit --kubeconfig would be ignored there.
    """
    cfg = load_configuration(CONFIG.kubeconfig)
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
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Everything the reconciler needs lives in status and labels; kopf's own bookkeeping goes into
    # annotations (our status schema is strict and would prune kopf's fields anyway).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.tpi.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.tpi.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "tpi.dev/daemon"
    settings.posting.level = logging.WARNING  # Events: we post our own; kopf only its warnings
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Server-side filtering: only our rank pods, StatefulSets and Leases are listed and watched
    # (the client-side label filters below then always match).
    for resource in (("v1", "pods"), ("apps/v1", "statefulsets"), ("coordination.k8s.io/v1", "leases")):
        settings.watching.label_selectors[resource] = CLUSTER
    if CONFIG.peering:
        settings.peering.name = CONFIG.peering
        settings.peering.priority = CONFIG.priority
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
            {
                k: meta.get(k)
                for k in ("name", "uid", "labels", "annotations", "deletionTimestamp")
                if meta.get(k)
            }
        ),
        "spec": _plain({k: spec.get(k) for k in spec_keys if k in spec}),
        "status": _plain(body.get("status", {}) or {}),
    }


@kopf.index("pods", labels={CLUSTER: kopf.PRESENT})
def tpi_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[CLUSTER]): _slim(body, ["nodeName"])}


@kopf.index("leases.v1.coordination.k8s.io", labels={CLUSTER: kopf.PRESENT})
def tpi_leases(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    slim = _slim(body, ["renewTime", "holderIdentity"])
    slim["status"] = {}
    return {(namespace, labels[CLUSTER]): slim}


@kopf.index("statefulsets.v1.apps", labels={CLUSTER: kopf.PRESENT})
def tpi_statefulsets(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[CLUSTER]): _slim(body, ["replicas"])}


@kopf.on.event("pods", labels={CLUSTER: kopf.PRESENT})
async def pod_changed(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
    _wake(namespace, labels.get(CLUSTER))


@kopf.on.event("statefulsets.v1.apps", labels={CLUSTER: kopf.PRESENT})
async def statefulset_changed(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
    _wake(namespace, labels.get(CLUSTER))


# ------------------------------------------------------------------------------ cluster events
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def cluster_changed(spec: kopf.Spec, name: str, namespace: str, **_: Any) -> None:
    """Thin: wake the cluster's reconciler; an unusable spec is reported there, in status."""
    _wake(namespace, name)
    try:
        TPInferenceClusterSpec.model_validate(_plain(spec))
    except pydantic.ValidationError as e:
        # Permanent: retrying the same spec cannot help; the next edit is a new update.
        raise kopf.PermanentError(f"invalid spec: {_validation_message(e)}") from None


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=2.0)
async def reconciler(
    name: str,
    namespace: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    tpi_pods: kopf.Index,
    tpi_leases: kopf.Index,
    tpi_statefulsets: kopf.Index,
    **_: Any,
) -> None:
    """The one reconciler of this cluster: reconcile, then sleep until woken or due."""
    key = (namespace, name)
    wake = _WAKERS.setdefault(key, asyncio.Event())
    loop = asyncio.get_running_loop()
    try:
        while not stopped:
            wake.clear()
            snapshot = _plain(body)
            pods = [copy.deepcopy(p) for p in tpi_pods.get(key, [])]
            leases = [copy.deepcopy(x) for x in tpi_leases.get(key, [])]
            stses = [copy.deepcopy(x) for x in tpi_statefulsets.get(key, [])]
            started = time.monotonic()
            try:
                outcome = await loop.run_in_executor(
                    _executor(), reconcile_once, snapshot, pods, leases, stses
                )
                metrics.RECONCILES.labels(outcome.result).inc()
            except Exception as e:  # never let one bad reconcile kill the daemon; back off instead
                log.exception("reconcile of %s/%s failed", namespace, name)
                metrics.RECONCILES.labels("error").inc()
                outcome = Outcome(wake_after=min(60.0, CONFIG.busy_seconds * 5), result="error")
                kopf.warn(body, reason="ReconcileError", message=str(e)[:1000])
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            for etype, reason, message in outcome.events:
                kopf.event(body, type=etype, reason=reason, message=message[:1000])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=outcome.wake_after)
    finally:
        _WAKERS.pop(key, None)
        _MEMORY.pop(key, None)


# ------------------------------------------------------------------------------------ reconcile
@dataclass
class Outcome:
    wake_after: float
    result: str = "ok"
    events: list[tuple[str, str, str]] = field(default_factory=list)


def _validation_message(e: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])


def _model_info(mem: Memory, spec: TPInferenceClusterSpec) -> sizing.ModelInfo:
    key = json.dumps([spec.model.wire(), spec.runtime.dtype], sort_keys=True)
    if mem.model_key != key:
        read = None
        path = checkpoint.local_model_dir(spec, CONFIG.models_root)
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


def reconcile_once(body: dict[str, Any], pods: list[dict], leases: list[dict], stses: list[dict]) -> Outcome:
    """One level-triggered pass for one cluster (runs in a worker thread)."""
    kube = _kube()
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    mem = _MEMORY.setdefault((namespace, name), Memory())
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
        events = [] if prev.last_failure == st.last_failure else [("Warning", "InvalidSpec", msg)]
        return Outcome(CONFIG.idle_seconds * 10, "invalid", events)

    info = _model_info(mem, spec)
    try:
        desired = sizing.desired_tp(spec, info)
    except sizing.SizingError as e:
        phase = "Pending" if e.reason == "SizingUnavailable" else "Failed"
        st = status_core.invalid(prev, generation, e.reason, str(e), now, phase=phase)
        st.desired_tensor_parallel_size = None
        _write_status(kube, mem, name, namespace, st)
        events = [] if prev.last_failure == st.last_failure else [("Warning", e.reason, str(e))]
        return Outcome(CONFIG.idle_seconds * 2, "invalid", events)

    rank_bytes = sizing.rank_memory_bytes(spec)
    sizes = [s for s in sizing.valid_tp_sizes(info) if sizing.fits(info, s, rank_bytes) is not False]
    sizes = sorted(set(sizes) | {desired})
    ident = render.Identity(name=name, namespace=namespace, uid=meta["uid"])
    restarted_at = (meta.get("annotations") or {}).get(render.A_RESTARTED_AT)
    pod_list = [p for p in (pod_obs(x) for x in pods) if p is not None]
    sts_list = [s for s in (sts_obs(x) for x in stses) if s is not None]
    obs = Observation(
        now=now,
        generation=generation,
        desired_tp=desired,
        valid_sizes=sizes,
        status=prev,
        pods=pod_list,
        leases={lo.name: lo for lo in (lease_obs(x) for x in leases)},
        statefulsets={s.group: s for s in sts_list},
        restarted_at=restarted_at,
        free_rank_slots=_free_slots(kube, spec, prev, pod_list),
        hash_for=reconcile.hash_function(spec, ident, restarted_at),
    )
    decision = reconcile.decide(
        spec, ident, obs, idle_seconds=CONFIG.idle_seconds, busy_seconds=CONFIG.busy_seconds
    )

    events: list[tuple[str, str, str]] = []
    recreate_grace = {a.group for a in decision.actions if isinstance(a, recovery.RecreateGroup)}
    for obj in decision.apply:
        _apply(kube, mem, obj)
    if decision.delete_pods:
        why = {p.name: f"{p.name}(incarnation {p.incarnation}, template {p.template_hash})" for p in pod_list}
        wanted = {g.group: g.incarnation for g in decision.status.groups}
        log.info("%s/%s: deleting pods %s; groups' incarnations %s", namespace, name,
                 ", ".join(why.get(x, x) for x in decision.delete_pods), wanted)  # fmt: skip
    for pod in decision.delete_pods:
        seen = next((p for p in pod_list if p.name == pod), None)
        # A broken group is useless: short grace. A rolled one drains (runtime handles SIGTERM).
        grace = 5 if seen is not None and seen.group in recreate_grace else None
        kube.delete("Pod", namespace, pod, grace_seconds=grace, uid=seen.uid if seen else None)
    for sts in decision.delete_statefulsets:
        kube.delete("StatefulSet", namespace, sts)
    for lease in decision.delete_leases:
        kube.delete("Lease", namespace, lease)
    _write_status(kube, mem, name, namespace, decision.status)

    for a in decision.actions:
        if isinstance(a, recovery.RECORDED) or (isinstance(a, recovery.RollGroup) and a.reason != "Create"):
            metrics.ACTIONS.labels(a.kind, a.reason).inc()
            log.info("%s/%s: %s %s: %s", namespace, name, a.kind, a.reason, a.message)
            etype = "Warning" if isinstance(a, recovery.MarkFailed | recovery.Degrade) else "Normal"
            events.append((etype, a.kind, f"{a.reason}: {a.message}"))
    for rec in decision.recovered:
        metrics.RECOVERY_SECONDS.labels(rec.reason or "unknown").observe(rec.seconds)
        events.append(
            ("Normal", "Recovered", f"group {rec.group} Ready again {rec.seconds:.1f}s after {rec.reason}")
        )
    return Outcome(decision.wake_after, "ok", events)


def _apply(kube: Kube, mem: Memory, obj: dict[str, Any]) -> None:
    """Apply unless this exact object was applied recently (shared objects are not watched)."""
    key = (obj["kind"], obj["metadata"]["name"])
    digest = obj["metadata"]["annotations"][render.A_OBJECT_HASH]
    watched = obj["kind"] in ("StatefulSet", "Lease")  # their caches already said "changed"
    seen = mem.applied.get(key)
    if not watched and seen and seen[0] == digest and time.monotonic() - seen[1] < RESYNC_SECONDS:
        return
    try:
        kube.apply(obj)
    except KubeError as e:
        if e.status == 404 and obj["kind"] == "Lease":
            return  # namespace going away
        raise
    mem.applied[key] = (digest, time.monotonic())


def _free_slots(
    kube: Kube, spec: TPInferenceClusterSpec, prev: TPInferenceClusterStatus, pods: list
) -> int | None:
    """Free capacity, only when a decision needs it (it costs two cluster-wide LISTs)."""
    degraded = (prev.current_tensor_parallel_size or 0) < (prev.desired_tensor_parallel_size or 0)
    stuck = any(p.unschedulable_since is not None for p in pods)
    if not (degraded or stuck):
        return None
    cached = _STATE.get("capacity")
    if cached is None or time.monotonic() - cached[0] > CAPACITY_TTL_SECONDS:
        try:
            nodes = kube.list("Node")
            bound = kube.list("Pod", fields="status.phase!=Succeeded,status.phase!=Failed")
        except KubeError as e:
            log.warning("cannot read capacity (%s); assuming none is free", e)
            return None
        # Only what capacity needs: a cluster-wide pod list is big.
        bound = [{"spec": {k: p["spec"].get(k) for k in ("nodeName", "containers")}, "status": {}} for p in bound
                 if p.get("spec", {}).get("nodeName")]  # fmt: skip
        cached = _STATE["capacity"] = (time.monotonic(), nodes, bound)
    return capacity.free_rank_slots(spec, cached[1], cached[2])
