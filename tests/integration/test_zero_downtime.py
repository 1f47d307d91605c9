"""Issue #10 item 7 and 8's finalizer against the real control plane (kwok nodes): maxSurge rolls,
the PodDisruptionBudget against the Eviction API, and a cluster deleted while no operator runs."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, watch
from tpikit.kube import kubectl, wait_until

from tests.integration.test_faults import apply_crd
from tests.integration.test_operator import Operator, apply, cluster_yaml, get, history, status, sts_hash, wait_phase

pytestmark = pytest.mark.integration


@pytest.fixture()
def op(kubeconfig: str, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    apply_crd()
    proc = Operator(kubeconfig, namespace, tmp_path / "operator.log")
    proc.start()
    yield proc
    if proc.proc is None or proc.proc.poll() is not None:
        proc.start()  # a test stopped it: clean up with an operator running
    kubectl("delete", "tpic", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
    proc.stop()
    print((tmp_path / "operator.log").read_text()[-5000:])


def rank_pods(core: client.CoreV1Api, namespace: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector="tpi.dev/cluster=demo").items


def ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def group_ready(pods: list[client.V1Pod], group: int, thash: str | None = None, size: int = 2) -> bool:
    live = [p for p in pods if p.metadata.labels.get("tpi.dev/group") == str(group)]
    return len(live) == size and all(
        ready(p) and not p.metadata.deletion_timestamp
        and (thash is None or p.metadata.labels.get("tpi.dev/template-hash") == thash)
        for p in live
    )  # fmt: skip


def serving_endpoints(discovery: client.DiscoveryV1Api, namespace: str) -> int:
    """Ready endpoints of the client Service (rank 0 of every Ready group)."""
    slices = discovery.list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=demo")
    return sum(1 for s in slices.items for e in s.endpoints or [] if e.conditions and e.conditions.ready)


class PodOrder:
    """Replays the rank pods' watch stream (the API server's own order of changes) to record which
    state came first: no sampling that a sub-second reaction could slip between."""

    def __init__(self, core: client.CoreV1Api, namespace: str, old_hash: str) -> None:
        self.core, self.namespace, self.old = core, namespace, old_hash
        self.pods: dict[str, client.V1Pod] = {}
        self.surge_ready_at: int | None = None  # index of the event
        self.old_down_at: int | None = None
        self.old_listed = False
        self.events = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        w = watch.Watch()
        for ev in w.stream(self.core.list_namespaced_pod, self.namespace, label_selector="tpi.dev/cluster=demo",
                           timeout_seconds=150):  # fmt: skip
            pod = ev["object"]
            if ev["type"] == "DELETED":
                self.pods.pop(pod.metadata.name, None)
            else:
                self.pods[pod.metadata.name] = pod
            self.events += 1
            pods = list(self.pods.values())
            if self.surge_ready_at is None and group_ready(pods, 1):
                self.surge_ready_at = self.events
            old = [p for p in pods if p.metadata.labels.get("tpi.dev/group") == "0"
                   and p.metadata.labels.get("tpi.dev/template-hash") == self.old]  # fmt: skip
            whole = len(old) == 2 and not any(p.metadata.deletion_timestamp for p in old)
            self.old_listed = self.old_listed or whole  # the initial listing arrives pod by pod
            if self.old_down_at is None and self.old_listed and not whole:
                self.old_down_at = self.events
            if self._stop.is_set():
                w.stop()

    def start(self) -> PodOrder:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def test_max_surge_brings_up_the_new_group_before_the_old_one_goes(
    op: Operator, namespace: str, api_client: client.ApiClient
) -> None:
    core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
    apply(namespace, cluster_yaml(replicas=1, updateStrategy={"maxSurge": 1}))
    wait_phase(namespace, "Running")
    wait_until(lambda: serving_endpoints(discovery, namespace) == 1, timeout=30, what="the Service's endpoint")
    old = sts_hash(namespace, 0)
    order = PodOrder(core, namespace, old).start()
    time.sleep(1)  # the watch has listed the pods
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"image":"tpi-runtime:v2"}}')
    min_endpoints = 1
    deadline = time.monotonic() + 120
    while True:
        min_endpoints = min(min_endpoints, serving_endpoints(discovery, namespace))
        pods = rank_pods(core, namespace)
        done = not get(namespace, "statefulset", "demo-g1") and (new := sts_hash(namespace, 0)) != old
        if done and group_ready(pods, 0, new):
            break
        assert time.monotonic() < deadline, f"roll did not finish: {status(namespace).get('conditions')}"
        time.sleep(0.1)
    order.stop()
    assert order.surge_ready_at is not None and order.old_down_at is not None, vars(order)
    assert order.surge_ready_at < order.old_down_at, "the old group went before the surge group was Ready"
    assert min_endpoints >= 1, "the Service had no Ready endpoint during the roll"
    steps = [(h["action"], h.get("group"), h["reason"]) for h in history(namespace)]
    assert steps == [("RollGroup", 1, "Surge"), ("RollGroup", 0, "Update"), ("RemoveGroup", 1, "SurgeDone")]
    assert wait_phase(namespace, "Running")["readyReplicas"] == 1


def evict(core: client.CoreV1Api, namespace: str, pod: str) -> int:
    """The Eviction API (what kubectl drain calls): 201 evicted, 429 refused by a disruption budget."""
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
    try:
        core.create_namespaced_pod_eviction(pod, namespace, body)
        return 201
    except client.ApiException as e:
        return int(e.status)


@contextlib.contextmanager
def cordoned(core: client.CoreV1Api, namespace: str, nodes: list[str], affinity: dict) -> Iterator[None]:
    """Cordon ``nodes`` until the block ends, and first wait until the scheduler has seen it.

    ``kubectl cordon`` returns once the API server has the change; the scheduler learns it from
    its watch a moment later (over a second on a loaded machine), and a pod it schedules before
    then lands on a cordoned node. A canary pod with ``affinity`` that the scheduler reports
    Unschedulable proves every cordon is in its cache."""
    for node in nodes:
        kubectl("cordon", node)
    try:
        wait_until(
            lambda: canary_refused(core, namespace, affinity), timeout=60, what="the scheduler to see the cordons"
        )
        yield
    finally:
        for node in nodes:
            kubectl("uncordon", node)


def canary_refused(core: client.CoreV1Api, namespace: str, affinity: dict) -> bool:
    """Whether the scheduler refuses a pod with ``affinity`` (False: it bound it, or said nothing yet)."""
    name = f"cordon-canary-{uuid.uuid4().hex[:6]}"
    restricted = client.V1SecurityContext(
        allow_privilege_escalation=False,
        run_as_non_root=True,
        run_as_user=65532,
        capabilities=client.V1Capabilities(drop=["ALL"]),
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            affinity=affinity,
            containers=[client.V1Container(name="canary", image="tpi/none:canary", security_context=restricted)],
        ),
    )
    core.create_namespaced_pod(namespace, pod)

    def verdict() -> str | None:
        p = core.read_namespaced_pod(name, namespace)
        if p.spec.node_name:
            return "bound"
        unschedulable = [
            c for c in p.status.conditions or [] if c.type == "PodScheduled" and c.reason == "Unschedulable"
        ]
        return "refused" if unschedulable else None

    try:
        return wait_until(verdict, timeout=30, interval=0.1, what=f"the scheduler's verdict on {name}") == "refused"
    finally:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def test_disruption_budget_lets_evictions_take_one_group_at_a_time(
    op: Operator, namespace: str, api_client: client.ApiClient
) -> None:
    core, policy = client.CoreV1Api(api_client), client.PolicyV1Api(api_client)
    # Pinned to kwok-node-0..3 (the bench can add more fake nodes), so cordoning them holds group 0 down.
    nodes = [f"kwok-node-{i}" for i in range(4)]
    pinned = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": nodes}]}]}}}  # fmt: skip
    apply(namespace, cluster_yaml(replicas=2, scheduling={"affinity": pinned}))
    wait_phase(namespace, "Running")
    pdb = wait_until(lambda: get(namespace, "pdb", "demo"), timeout=30, what="the PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "TPInferenceCluster"
    wait_until(lambda: policy.read_namespaced_pod_disruption_budget("demo", namespace).status.disruptions_allowed == 1,
               timeout=30, what="the disruption controller's count")  # fmt: skip

    # A drain cordons before it evicts. Cordoning every node keeps group 0's replacement Pending:
    # kwok would otherwise make it Ready within milliseconds, before the refusal could be seen.
    with cordoned(core, namespace, nodes, pinned):
        assert evict(core, namespace, "demo-g0-1") == 201  # a drain takes one rank of group 0 ...
        # ... which breaks group 0; while it is down no pod of group 1 may be evicted.
        held_until = time.monotonic() + 5
        while time.monotonic() < held_until:
            assert evict(core, namespace, "demo-g1-0") == 429, "a pod of group 1 was evicted while group 0 was down"
            time.sleep(0.2)
    # Once group 0 is Ready again, the budget lets the drain go on.
    refused = 0
    while True:
        before = group_ready(rank_pods(core, namespace), 0)
        code = evict(core, namespace, "demo-g1-0")
        after = group_ready(rank_pods(core, namespace), 0)
        if code == 201:
            assert before or after, "a pod of group 1 was evicted while group 0 was down"
            break
        assert code == 429, code
        refused += 1
        assert refused < 600, "group 1's pod was never evictable again"
        time.sleep(0.2)
    reasons = [(h["group"], h["reason"]) for h in history(namespace) if h["action"] == "RecreateGroup"]
    assert reasons[0] == (0, "PodDeleted")
    wait_phase(namespace, "Running")


def test_a_cluster_deleted_while_no_operator_runs_goes_away(
    op: Operator, namespace: str, api_client: client.ApiClient
) -> None:
    apply(namespace, cluster_yaml())
    wait_phase(namespace, "Running")
    assert "finalizers" not in get(namespace, "tpic", "demo")["metadata"]
    op.stop()
    started = time.monotonic()
    kubectl("delete", "tpic", "demo", "-n", namespace, "--wait=true", "--timeout=20s")
    assert time.monotonic() - started < 20
    assert not get(namespace, "tpic", "demo")

    def owned() -> list[str]:
        kinds = "statefulsets,services,leases,serviceaccounts,roles,rolebindings,poddisruptionbudgets,pods"
        items = json.loads(kubectl("get", kinds, "-n", namespace, "-l", "tpi.dev/cluster=demo", "-o", "json"))
        return [f"{i['kind']}/{i['metadata']['name']}" for i in items["items"]]

    # the garbage collector (kube-controller-manager runs it) follows the owner references
    wait_until(lambda: not owned(), timeout=60, what="garbage collection of the owned objects")


def test_the_finalizer_of_an_older_operator_is_released(op: Operator, namespace: str) -> None:
    op.stop()
    apply(namespace, cluster_yaml())
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p",
            '{"metadata":{"finalizers":["tpi.dev/daemon"]}}')  # fmt: skip
    op.start()
    wait_until(lambda: not get(namespace, "tpic", "demo")["metadata"].get("finalizers"), timeout=30,
               what="the old finalizer removed")  # fmt: skip
    wait_phase(namespace, "Running")
