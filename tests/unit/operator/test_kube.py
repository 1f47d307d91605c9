"""kube.Kube: deletes with a uid precondition, paginated lists; and the shell's capacity reads built on them."""

from __future__ import annotations

import asyncio
import json

import pytest
from tpi_operator import handlers
from tpi_operator.kube import Kube, KubeError, _resource


class FakeKube(Kube):
    def __init__(self, status: int | None) -> None:
        super().__init__(api=None)  # type: ignore[arg-type]
        self.status, self.calls = status, []

    def request(self, method, path, *, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path, body))
        if self.status is not None:
            raise KubeError(self.status, json.dumps({"message": "nope"}))
        return {}


@pytest.mark.parametrize(
    ("status", "uid", "result"),
    [(None, "u1", True), (404, "u1", False), (409, "u1", False), (None, None, True), (404, None, False)],
)
def test_delete_with_uid_precondition(status, uid, result) -> None:
    kube = FakeKube(status)
    assert kube.delete("Pod", "ns", "p-0", grace_seconds=5, uid=uid) is result
    method, path, body = kube.calls[0]
    assert (method, path) == ("DELETE", "/api/v1/namespaces/ns/pods/p-0")
    assert body["gracePeriodSeconds"] == 5
    assert body.get("preconditions") == ({"uid": uid} if uid else None)


def test_conflict_without_uid_is_an_error() -> None:
    with pytest.raises(KubeError):
        FakeKube(409).delete("Pod", "ns", "p-0")


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/api/v1/nodes", "nodes"),
        ("/api/v1/namespaces/x/pods/p", "pods"),
        ("/apis/tpi.dev/v1alpha1/namespaces/x/tpinferenceclusters/a/status", "tpinferenceclusters/status"),
        ("/apis/apps/v1/namespaces/x/statefulsets", "statefulsets"),
    ],
)
def test_request_metric_resource(path: str, resource: str) -> None:
    assert _resource(path) == resource


class PagedKube(Kube):
    """Serves a list in pages, as the API server does with limit + continue."""

    def __init__(self, items: list[dict], page: int, status: int | None = None) -> None:
        super().__init__(api=None)  # type: ignore[arg-type]
        self.items, self.page, self.status, self.queries = items, page, status, []

    def request(self, method, path, *, body=None, query=None, content_type="application/json"):
        self.queries.append((path, dict(query or [])))
        if self.status is not None:
            raise KubeError(self.status, json.dumps({"message": "forbidden"}))
        q = dict(query or [])
        start = int(q.get("continue", 0))
        end = start + min(int(q["limit"]), self.page)
        meta = {"continue": str(end)} if end < len(self.items) else {}
        return {"items": self.items[start:end], "metadata": meta}


def test_list_is_paginated() -> None:
    kube = PagedKube([{"n": i} for i in range(7)], page=3)
    assert kube.list("Pod", fields="spec.nodeName=a", page_size=3) == [{"n": i} for i in range(7)]
    assert [q.get("continue") for _, q in kube.queries] == [None, "3", "6"]
    assert all(q["limit"] == 3 and q["fieldSelector"] == "spec.nodeName=a" for _, q in kube.queries)
    assert {p for p, _ in kube.queries} == {"/api/v1/pods"}  # all namespaces: the node's every pod


def _pod(node: str, cpu: str = "1") -> dict:
    return {"spec": {"nodeName": node, "containers": [{"resources": {"requests": {"cpu": cpu}}}]}, "status": {}}


def test_node_usage_one_field_selected_query_per_node_shared_by_clusters() -> None:
    state = handlers.Shared()
    kube = PagedKube([_pod("a"), _pod("a")], page=500)
    used = handlers._node_usage(state, kube, ["a"], [])
    assert used == {"a": {"pods": 2.0, "cpu": 2.0}}
    handlers._node_usage(state, kube, ["a"], [])  # a second cluster within the TTL: no new query
    assert len(kube.queries) == 1
    assert kube.queries[0][1]["fieldSelector"].startswith("spec.nodeName=a,")


def test_node_usage_without_cluster_wide_pod_reads_counts_the_watched_rank_pods() -> None:
    state = handlers.Shared()
    kube = PagedKube([], page=500, status=403)
    used = handlers._node_usage(state, kube, ["a", "b"], [_pod("a", "2")])
    assert used == {"a": {"pods": 1.0, "cpu": 2.0}}
    handlers._node_usage(state, kube, ["a", "b"], [])  # remembered: no new refused query
    assert len(kube.queries) == 1


def _full_rank_pod() -> dict:
    """A rank pod as a 1.34 API server returns it (the fields the index must keep, and some it drops)."""
    running = {"running": {"startedAt": "2026-11-30T09:00:05Z"}}
    crashed = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-11-30T09:00:04Z"}}
    return {
        "metadata": {"name": "demo-g0-1", "uid": "u1", "namespace": "ns",
                     "labels": {"tpi.dev/cluster": "demo", "tpi.dev/group": "0", "tpi.dev/incarnation": "2",
                                "apps.kubernetes.io/pod-index": "1"},
                     "managedFields": [{"manager": "kube-controller-manager"}]},
        "spec": {"nodeName": "n1", "containers": [{"name": "runtime", "image": "tpi-runtime:1",
                 "resources": {"requests": {"cpu": "2", "nvidia.com/gpu": "1"}}, "env": [{"name": "X"}]}]},
        "status": {"phase": "Running", "startTime": "2026-11-30T09:00:00Z", "podIP": "10.0.0.1",
                   "qosClass": "Burstable",
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "runtime", "ready": True, "started": True, "restartCount": 1,
                                          "state": running, "lastState": crashed, "image": "tpi-runtime:1",
                                          "imageID": "sha256:1", "allocatedResources": {"cpu": "2"},
                                          "volumeMounts": [{"name": "m", "mountPath": "/models"}]}]},
    }  # fmt: skip


def test_the_pod_index_keeps_what_observe_and_capacity_read() -> None:
    from tpi_operator.core import capacity
    from tpi_operator.core.observe import pod_obs

    full = _full_rank_pod()
    [slim] = handlers.tpi_pods(namespace="ns", labels=full["metadata"]["labels"], body=full).values()
    assert pod_obs(slim) == pod_obs(full)
    used = {"n1": {"pods": 1.0, "cpu": 2.0, "nvidia.com/gpu": 1.0}}
    assert capacity.node_usage([slim]) == capacity.node_usage([full]) == used
    cs = slim["status"]["containerStatuses"][0]
    assert "allocatedResources" not in cs and "volumeMounts" not in cs and "podIP" not in slim["status"]
    assert "managedFields" not in slim["metadata"]


def test_the_pod_index_keeps_a_queued_pods_scheduling_gates() -> None:
    """Kueue holds a pod group's pods behind a scheduling gate until it admits the group: the index
    must keep the gate, or the group is taken for a stalled rollout (seen with a real Kueue)."""
    from tpi_operator.core.observe import pod_obs

    full = _full_rank_pod()
    del full["spec"]["nodeName"]
    full["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    full["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                          "reason": "SchedulingGated"}]}  # fmt: skip
    [slim] = handlers.tpi_pods(namespace="ns", labels=full["metadata"]["labels"], body=full).values()
    seen = pod_obs(slim)
    assert seen == pod_obs(full) and seen is not None and seen.scheduling_gates == ("kueue.x-k8s.io/admission",)


@pytest.mark.parametrize(
    ("status", "conditions", "needed"),
    [
        ({"currentTensorParallelSize": 4, "desiredTensorParallelSize": 4}, [], False),
        ({"currentTensorParallelSize": 2, "desiredTensorParallelSize": 4}, [], True),  # degraded
        ({}, [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}], True),
        ({}, [{"type": "PodScheduled", "status": "True"}], False),
    ],
)
def test_capacity_is_read_only_when_a_decision_needs_it(status: dict, conditions: list, needed: bool) -> None:
    pods = [{"status": {"conditions": conditions}}]
    assert handlers._needs_capacity(status, pods) is needed


def test_a_node_going_not_ready_wakes_the_clusters_with_ranks_on_it() -> None:
    state = handlers.Shared()
    memo = type("Memo", (), {"shared": state})()
    events = {key: asyncio.Event() for key in (("ns", "a"), ("ns", "b"))}
    state.wakers.update(events)
    pods = {("ns", "a"): [{"spec": {"nodeName": "n1"}}], ("ns", "b"): [{"spec": {"nodeName": "n2"}}]}

    def node(status: str) -> dict:
        return {"status": {"conditions": [{"type": "Ready", "status": status}]}}

    def seen(status: str | None, kind: str = "MODIFIED") -> set[str]:
        for e in events.values():
            e.clear()
        body = node(status) if status else {}
        asyncio.run(handlers.node_changed(name="n1", body=body, event={"type": kind}, memo=memo, tpi_pods=pods))
        return {key[1] for key, e in events.items() if e.is_set()}

    assert seen("True") == set()  # first sight of a healthy node
    assert seen("True") == set()  # no change
    assert seen("Unknown") == {"a"}  # only the cluster with a rank there
    assert seen("Unknown") == set()
    assert seen("True") == {"a"}
    assert seen(None, "DELETED") == {"a"}


def test_reconcilers_take_their_state_only_once_a_worker_is_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """500 clusters that wake together must not all hold their snapshots while they queue."""
    import threading

    import kopf

    state = handlers.Shared(config=handlers.OperatorConfig(workers=2))
    release, snapshots = threading.Event(), []
    world = handlers._world

    def counting_world(*args):  # the snapshot each reconcile takes of its cluster's world
        snapshots.append(1)
        return world(*args)

    def blocked_reconcile(state, mem, body, *rest):  # both workers busy until released
        release.wait(10)
        state.gone.add(body["metadata"]["uid"])  # one pass each: then the daemon ends
        return handlers.Outcome(wake_after=0.01)

    monkeypatch.setattr(handlers, "_world", counting_world)
    monkeypatch.setattr(handlers, "reconcile_once", blocked_reconcile)

    class Running:
        def __bool__(self) -> bool:
            return False

    async def run() -> int:
        memo = kopf.Memo(shared=state)
        daemons = [
            asyncio.create_task(handlers.reconciler(
                name=f"c{i}", namespace="ns", body={"metadata": {"name": f"c{i}", "namespace": "ns", "uid": f"u{i}"}},
                stopped=Running(), memo=memo, tpi_pods={}, tpi_leases={}, tpi_statefulsets={}, tpi_nodes={},
            ))
            for i in range(10)
        ]  # fmt: skip
        await asyncio.sleep(0.3)
        taken = len(snapshots)
        release.set()
        await asyncio.wait_for(asyncio.gather(*daemons), timeout=10)
        assert len(snapshots) == 10
        return taken

    assert asyncio.run(run()) == 2


@pytest.mark.parametrize(("wake_after", "lowest", "highest"), [(30.0, 30.0, 33.0), (300.0, 300.0, 330.0),
                                                              (2.0, 2.0, 2.0), (0.5, 0.5, 0.5)])  # fmt: skip
def test_idle_resyncs_are_spread_and_deadlines_kept(wake_after: float, lowest: float, highest: float) -> None:
    config = handlers.OperatorConfig()  # idle_seconds 30
    seen = [handlers._jittered(wake_after, config) for _ in range(200)]
    assert lowest <= min(seen) and max(seen) <= highest
    if lowest != highest:
        assert len(set(seen)) > 1


def test_idle_resyncs_leave_workers_for_clusters_with_something_to_do() -> None:
    state = handlers.Shared(config=handlers.OperatorConfig(workers=4))

    async def run() -> tuple[int, bool]:
        hold, held = asyncio.Event(), []

        async def resync() -> None:
            async with state.slot(resync=True):
                held.append(1)
                await hold.wait()

        resyncs = [asyncio.create_task(resync()) for _ in range(50)]  # hundreds came due together
        await asyncio.sleep(0.05)
        busy = len(held)
        async with asyncio.timeout(1):  # a node-loss deadline: a worker is free at once
            async with state.slot():
                urgent = True
        hold.set()
        await asyncio.gather(*resyncs)
        return busy, urgent

    assert asyncio.run(run()) == (handlers.idle_workers(4), True) == (2, True)


def _service(digest: str = "h1") -> dict:
    annotations = {handlers.render.A_OBJECT_HASH: digest}
    meta = {"name": "demo", "namespace": "ns", "annotations": annotations}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta}


class StoreKube(Kube):
    """An API server of one namespace's objects, by (kind, name): enough for the shared objects'
    refresh; counts requests by method."""

    def __init__(self) -> None:
        super().__init__(api=None)  # type: ignore[arg-type]
        self.objects: dict[str, dict] = {}
        self.methods: list[str] = []
        self.version = 0

    def request(self, method, path, *, body=None, query=None, content_type="application/json"):
        self.methods.append(method)
        if method == "GET":
            if path not in self.objects:
                raise KubeError(404, json.dumps({"message": "not found"}))
            return self.objects[path]
        self.version += 1  # a server-side apply that changed something
        obj = json.loads(json.dumps(body))
        obj["metadata"]["resourceVersion"] = str(self.version)
        if "/poddisruptionbudgets/" in path:  # a kind with a generation (and a status others write)
            obj["metadata"]["generation"] = 1
        self.objects[path] = obj
        return obj


def test_shared_objects_are_reread_after_a_spread_period_on_idle_passes_and_reapplied_only_when_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """500 clusters created together must not all refresh their shared objects in the same minute,
    a lost node's recovery pass must not wait on those requests, and an untouched object costs one
    GET per period, not a GET and an apply."""
    from tpi_operator.core import render

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    due = [handlers._refresh_at() - clock[0] for _ in range(200)]
    period = handlers.RESYNC_SECONDS
    assert period / 2 <= min(due) and max(due) <= period and max(due) - min(due) > period / 4

    spec = handlers.TPInferenceClusterSpec.model_validate(
        {"image": "x", "model": {"source": {"image": {"path": "/m"}}}, "tensorParallelSize": 2}
    )
    ident = render.Identity(name="demo", namespace="ns", uid="u1")
    shared = render.shared_objects(spec, ident, [])
    kube, mem = StoreKube(), handlers.Memory()

    def one_pass(refresh: bool) -> list[str]:
        kube.methods.clear()
        handlers._foreign(kube, mem, spec, ident, refresh)
        for obj in shared:
            handlers._apply(kube, mem, obj)
        return kube.methods

    first = one_pass(refresh=False)  # a new cluster: each read once (none there), then applied
    assert first.count("GET") == first.count("PATCH") == len(shared)
    assert one_pass(refresh=True) == []  # nothing due
    clock[0] += period  # every re-read is due
    assert one_pass(refresh=False) == []  # a pass woken for something to do leaves it
    assert one_pass(refresh=True) == ["GET"] * len(shared)  # an idle pass: read, nothing changed
    pdb = next(k for k in kube.objects if "/poddisruptionbudgets/" in k)
    kube.objects[pdb]["metadata"]["resourceVersion"] = "status-moved"  # the disruption controller
    clock[0] += period
    assert one_pass(refresh=True) == ["GET"] * len(shared)  # its generation is what counts
    service = next(k for k in kube.objects if "/services/" in k)
    del kube.objects[service]  # someone deletes the Service
    kube.objects[next(k for k in kube.objects if "/roles/" in k)]["metadata"]["resourceVersion"] = "edited"
    clock[0] += period
    assert one_pass(refresh=True) == ["GET"] * len(shared) + ["PATCH"] * 2  # the Service and the Role
    assert service in kube.objects
    clock[0] += 2 * period  # a cluster never idle: a whole period late, its passes re-read anyway
    assert one_pass(refresh=False) == ["GET"] * len(shared)


class RecordingKube(Kube):
    """Records every request as (method, resource path) in order; answers like an API server."""

    def __init__(self) -> None:
        super().__init__(api=None)  # type: ignore[arg-type]
        self.calls: list[tuple[str, str]] = []

    def request(self, method, path, *, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path.rsplit("/namespaces/ns/", 1)[-1]))
        return {"metadata": {"resourceVersion": "1"}}


def test_a_lost_nodes_pods_go_before_the_status_after_their_groups_new_template() -> None:
    """nodeLostTimeoutSeconds -> action: the force delete must not wait behind the bookkeeping,
    but the StatefulSet must already make the replacements from the new incarnation."""
    from tpi_operator.api.v1alpha1 import TPInferenceClusterStatus
    from tpi_operator.core import reconcile

    def obj(api: str, kind: str, name: str) -> dict:
        meta = {"name": name, "namespace": "ns", "annotations": {handlers.render.A_OBJECT_HASH: "h"}}
        return {"apiVersion": api, "kind": kind, "metadata": meta}

    sts, lease = obj("apps/v1", "StatefulSet", "demo-g0"), obj("coordination.k8s.io/v1", "Lease", "demo-g0-r0")
    decision = reconcile.Decision(
        actions=[], status=TPInferenceClusterStatus(phase="Recovering"), recovered=[],
        apply=[lease], apply_first=[sts],
        force_delete_pods=[reconcile.PodDelete("demo-g0-1", "u1", 0)],
        delete_pods=[reconcile.PodDelete("demo-g0-0", "u0", 5)],
    )  # fmt: skip
    kube, state = RecordingKube(), handlers.Shared()
    handlers.apply_decision(state, kube, handlers.Memory(), "demo", "ns", decision)
    assert kube.calls == [
        ("PATCH", "statefulsets/demo-g0"),
        ("DELETE", "pods/demo-g0-1"),
        ("PATCH", "tpinferenceclusters/demo/status"),
        ("PATCH", "leases/demo-g0-r0"),
        ("DELETE", "pods/demo-g0-0"),
    ]
    kube.calls.clear()  # without a lost node: status first, as always
    handlers.apply_decision(state, kube, handlers.Memory(), "demo", "ns", reconcile.Decision(
        actions=[], status=TPInferenceClusterStatus(phase="Recovering"), recovered=[], apply=[sts],
        delete_pods=[reconcile.PodDelete("demo-g0-0", "u0", 5)],
    ))  # fmt: skip
    assert [c[1] for c in kube.calls] == ["tpinferenceclusters/demo/status", "statefulsets/demo-g0", "pods/demo-g0-0"]
    kube.calls.clear()  # a recreate as a merge patch of the StatefulSet: it, too, goes before the force delete
    mem = handlers.Memory()
    mem.applied_statefulsets["demo-g0"] = (0.0, {})  # an earlier apply: the patch supersedes it
    handlers.apply_decision(state, kube, mem, "demo", "ns", reconcile.Decision(
        actions=[], status=TPInferenceClusterStatus(phase="Recovering"), recovered=[],
        patch_statefulsets=[("demo-g0", {"metadata": {"labels": {"x": "1"}}})],
        force_delete_pods=[reconcile.PodDelete("demo-g0-1", "u1", 0)],
    ))  # fmt: skip
    assert [c[1] for c in kube.calls] == ["statefulsets/demo-g0", "pods/demo-g0-1", "tpinferenceclusters/demo/status"]
    assert mem.applied_statefulsets == {}


def test_a_force_deleted_pod_the_watch_still_shows_is_not_deleted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expectations: the StatefulSet's event after a lost node's force delete wakes the cluster
    before the pods' DELETED events arrive; that pass must not see (and force-delete) them again."""
    from tpi_operator.api.v1alpha1 import TPInferenceClusterStatus
    from tpi_operator.core import reconcile

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])

    def pod(name: str, uid: str) -> dict:
        return {"metadata": {"name": name, "uid": uid}}

    kube, state, mem = RecordingKube(), handlers.Shared(), handlers.Memory()
    handlers.apply_decision(state, kube, mem, "demo", "ns", reconcile.Decision(
        actions=[], status=TPInferenceClusterStatus(phase="Recovering"), recovered=[],
        force_delete_pods=[reconcile.PodDelete("demo-g0-1", "u1", 0)],
        delete_pods=[reconcile.PodDelete("demo-g0-0", "u0", 5)],  # graceful: Terminating, still seen
    ))  # fmt: skip
    watched = [pod("demo-g0-0", "u0"), pod("demo-g0-1", "u1"), pod("demo-g0-2", "u2")]
    assert [p["metadata"]["uid"] for p in handlers.unseen_deletes(mem.force_deleted, watched)] == ["u0", "u2"]
    replacement = pod("demo-g0-1", "u9")  # same name, a new pod: seen
    assert len(handlers.unseen_deletes(mem.force_deleted, [*watched, replacement])) == 3
    # the watch caught up: the expectation ends (a uid is never reused)
    assert handlers.unseen_deletes(mem.force_deleted, [watched[0], replacement]) == [watched[0], replacement]
    assert mem.force_deleted == {}
    # an event that never comes: after FORCE_DELETE_EXPECTATION_SECONDS the watch is believed again
    mem.force_deleted["u1"] = clock[0]
    clock[0] += handlers.FORCE_DELETE_EXPECTATION_SECONDS + 1
    assert handlers.unseen_deletes(mem.force_deleted, watched) == watched


def test_a_deleted_statefulset_the_watch_still_shows_is_not_removed_again() -> None:
    """A surge group's StatefulSet, once deleted, is out of the next pass's observation until the
    watch drops it: that pass decided RemoveGroup again and recorded it twice in the history
    (once in CI, test_zero_downtime's max-surge roll)."""
    from tpi_operator.api.v1alpha1 import TPInferenceClusterStatus
    from tpi_operator.core import reconcile

    kube, state, mem = RecordingKube(), handlers.Shared(), handlers.Memory()
    handlers.apply_decision(state, kube, mem, "demo", "ns", reconcile.Decision(
        actions=[], status=TPInferenceClusterStatus(phase="Running"), recovered=[],
        delete_statefulsets=["demo-g1"],
    ), {"demo-g0": "s0", "demo-g1": "s1"})  # fmt: skip
    assert ("DELETE", "statefulsets/demo-g1") in kube.calls
    watched = [{"metadata": {"name": "demo-g0", "uid": "s0"}}, {"metadata": {"name": "demo-g1", "uid": "s1"}}]
    assert handlers.unseen_deletes(mem.deleted_statefulsets, watched) == watched[:1]
    assert handlers.unseen_deletes(mem.deleted_statefulsets, watched[:1]) == watched[:1]
    assert mem.deleted_statefulsets == {}  # the watch caught up


def test_gpu_nodes_are_parsed_once_per_node_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pass needs the GPU nodes; a node's allocatable is parsed again only when its index
    value is a new object (any change to the node)."""
    parsed: list[str] = []
    offers = handlers._offers_gpus

    def counting(node):
        parsed.append(node["metadata"]["name"])
        return offers(node)

    monkeypatch.setattr(handlers, "_offers_gpus", counting)

    def node(name: str, gpus: str) -> dict:
        return {"metadata": {"name": name}, "status": {"allocatable": {"cpu": "8", "nvidia.com/gpu": gpus}}}

    index = {"a": [node("a", "8")], "b": [node("b", "0")]}
    cache = handlers.GpuNodes()
    assert [n["metadata"]["name"] for n in cache.of(index)] == ["a"]
    assert [n["metadata"]["name"] for n in cache.of(index)] == ["a"] and parsed == ["a", "b"]
    index["b"] = [node("b", "4")]  # b changed: only b is parsed again
    del index["a"]  # a went away
    assert [n["metadata"]["name"] for n in cache.of(index)] == ["b"] and parsed == ["a", "b", "b"]


def test_an_applied_statefulset_the_watch_shows_old_is_seen_as_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A roll's StatefulSet apply, then a pass woken by a pod event before the StatefulSet's own:
    it sees the template we applied (the roll is not decided and recorded again) until the watch
    shows our object, and the watch again after FORCE_DELETE_EXPECTATION_SECONDS."""
    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    kube, mem = RecordingKube(), handlers.Memory()
    h = handlers.render.A_OBJECT_HASH
    new = {"apiVersion": "apps/v1", "kind": "StatefulSet",
           "metadata": {"name": "demo-g0", "annotations": {h: "new", "t": "2"}}}  # fmt: skip
    handlers._apply(kube, mem, new)
    old = {"metadata": {"name": "demo-g0", "uid": "s0", "annotations": {h: "old", "t": "1"}}}
    other = {"metadata": {"name": "demo-g1", "uid": "s1", "annotations": {h: "x"}}}
    [seen, untouched] = handlers.unseen_applies(mem.applied_statefulsets, [old, other])
    assert seen["metadata"]["annotations"]["t"] == "2" and seen["metadata"]["uid"] == "s0" and untouched is other
    caught_up = {"metadata": {**old["metadata"], "annotations": new["metadata"]["annotations"]}}
    assert handlers.unseen_applies(mem.applied_statefulsets, [caught_up]) == [caught_up]
    assert mem.applied_statefulsets == {}
    handlers._apply(kube, mem, new)
    clock[0] += handlers.FORCE_DELETE_EXPECTATION_SECONDS + 1
    assert handlers.unseen_applies(mem.applied_statefulsets, [old]) == [old]
    handlers._apply(kube, mem, new)  # the StatefulSet is deleted since: the entry goes
    assert handlers.unseen_applies(mem.applied_statefulsets, [other]) == [other]
    assert mem.applied_statefulsets == {}
