"""Issue #10's faults against the real control plane: a rank's node dies, and no reconcile spin.

Node death: the shared kwok process and its nodes are everyone's, so each test makes fake nodes
of its own (labelled and tainted so that only its pods land there) and plays them with kwok
processes of its own: one for the nodes that die, one for those that live.  Killing the first is a
dead kubelet: its node Leases stop, and the real kube-controller-manager marks the nodes Unknown
after its node-monitor-grace-period.  Everything runs with the default failure policy
(nodeLostTimeoutSeconds 60).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from tpikit.kube import kubectl, wait_until
from tpikit.kwok import Kwok

from tests.integration.conftest import inject_fault
from tests.integration.test_operator import CRD, Operator, apply, cluster_yaml, get, renew_leases

pytestmark = pytest.mark.integration
TEST_LABEL = "tpi.dev/fault-test"


def apply_crd() -> None:
    # The CRD is cluster-wide: re-applied per test (and before long waits), as a concurrent session
    # may have applied another revision of it meanwhile.
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/tpinferenceclusters.tpi.dev", "--timeout=60s")


@pytest.fixture()
def crd_applied(kubeconfig: str) -> None:
    apply_crd()


@pytest.fixture()
def op(kubeconfig: str, namespace: str, crd_applied: None, tmp_path: Path) -> Iterator[Operator]:
    """The operator with its default resync periods (the spin test counts its reconciles)."""
    proc = Operator(kubeconfig, namespace, tmp_path / "operator.log", ("--idle-seconds", "30", "--busy-seconds", "2"))
    proc.start()
    yield proc
    kubectl("delete", "tpic", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
    proc.stop()
    print((tmp_path / "operator.log").read_text()[-30000:])


# ------------------------------------------------------------------------------- fake nodes
class FakeNodes:
    """This test's nodes: only pods that select ``TEST_LABEL=<id>`` and tolerate its taint land here."""

    def __init__(self, kubeconfig: str, tmp: Path) -> None:
        self.id = f"ft-{uuid.uuid4().hex[:6]}"
        self.kubeconfig = kubeconfig
        self.dying = Kwok(kubeconfig, f"{self.id}-dying", "10.251.0.0/16", tmp / "kwok-dying.log")
        self.living = Kwok(kubeconfig, f"{self.id}-living", "10.252.0.0/16", tmp / "kwok-living.log")
        self.names: list[str] = []

    def add(
        self,
        name: str,
        zone: str,
        dies: bool,
        cpu: str = "1",
        gpus: int = 0,
        labels: dict[str, str] | None = None,
        taints: list[dict] | None = None,
    ) -> str:
        """A node of this test; ``gpus``: its nvidia.com/gpu allocatable, ``labels``/``taints``: more of them."""
        name = f"{self.id}-{name}"
        amounts = {"cpu": cpu, "memory": "8Gi", "pods": "110", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": (self.dying if dies else self.living).selector,
                                "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"kubernetes.io/hostname": name, "type": "kwok", TEST_LABEL: self.id,
                           "topology.kubernetes.io/zone": f"{self.id}-{zone}", **(labels or {})},
            },
            "spec": {"taints": [{"key": TEST_LABEL, "value": self.id, "effect": "NoSchedule"}, *(taints or [])]},
            # room for exactly one 1-CPU rank (by default)
            "status": {"allocatable": amounts, "capacity": amounts},
        }  # fmt: skip
        self.names.append(name)
        kubectl("apply", "-f", "-", input=json.dumps(node))
        wait_until(lambda: ready(name) is True, timeout=60, what=f"node {name} Ready")
        return name

    def cleanup(self) -> None:
        self.dying.kill()
        self.living.kill()
        for name in self.names:  # PodGC then force-deletes the pods still bound to them
            kubectl("delete", "node", name, "--wait=false", check=False)


def ready(node: str) -> bool | None:
    """True/False for Ready True/not, None when the node has no Ready condition yet."""
    obj = json.loads(kubectl("get", "node", node, "-o", "json", check=False) or "{}")
    cond = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)
    return None if cond is None else cond["status"] == "True"


def not_ready_since(node: str) -> dt.datetime | None:
    obj = json.loads(kubectl("get", "node", node, "-o", "json"))
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    if cond["status"] == "True":
        return None
    return dt.datetime.fromisoformat(cond["lastTransitionTime"].replace("Z", "+00:00"))


@pytest.fixture()
def nodes(kubeconfig: str, tmp_path: Path) -> Iterator[FakeNodes]:
    fake = FakeNodes(kubeconfig, tmp_path)
    fake.dying.start()
    fake.living.start()
    try:
        yield fake
    finally:
        fake.cleanup()


def all_pods(namespace: str) -> list[dict]:
    return json.loads(kubectl("get", "pods", "-n", namespace, "-l", "tpi.dev/cluster=demo", "-o", "json"))["items"]


def node_lost_cluster(fake: FakeNodes, evict_at_once: bool) -> str:
    tolerations: list[dict] = [{"key": TEST_LABEL, "operator": "Equal", "value": fake.id, "effect": "NoSchedule"}]
    if evict_at_once:  # the taint manager evicts at once: the pods then stay Terminating forever
        tolerations += [{"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 0} for t in ("unreachable", "not-ready")]  # fmt: skip
    # the default failure policy, as shipped (nodeLostTimeoutSeconds 60)
    spec = cluster_yaml(scheduling={"nodeSelector": {TEST_LABEL: fake.id}, "tolerations": tolerations})
    doc = json.loads(spec)
    doc["spec"].pop("failurePolicy")
    return json.dumps(doc)


def serving_elsewhere(namespace: str, dead: set[str]) -> dict | None:
    st = get(namespace, "tpic", "demo").get("status", {})
    live = [p for p in all_pods(namespace) if not p["metadata"].get("deletionTimestamp")]
    on_dead = [p for p in all_pods(namespace) if p["spec"].get("nodeName") in dead]
    if st.get("phase") == "Running" and st.get("readyRanks") == 2 and len(live) == 2 and not on_dead:
        return st
    return None


def _heal_node_loss(namespace: str, fake: FakeNodes, dead: list[str], evicted: bool) -> float:
    """Kill the dying kwok; the group must serve again on the living nodes. Returns NotReady -> serving."""
    apply_crd()
    fake.dying.kill()
    wait_until(lambda: all(not_ready_since(n) for n in dead), timeout=150, interval=2, what="nodes NotReady")
    since = min(t for t in (not_ready_since(n) for n in dead[:2]) if t is not None)  # the ranks' nodes

    def terminating_on_dead() -> bool:
        return any(p["metadata"].get("deletionTimestamp") for p in all_pods(namespace)
                   if p["spec"].get("nodeName") in dead)  # fmt: skip

    if evicted:
        # Kubernetes evicted the rank(s): Terminating forever, as no kubelet finalizes them.
        wait_until(terminating_on_dead, timeout=60, what="eviction")
    else:
        # Nothing evicted: the ranks stay bound to the dead nodes until the operator acts.
        time.sleep(max(0.0, 50 - (dt.datetime.now(dt.UTC) - since).total_seconds()))
        assert not terminating_on_dead(), "Kubernetes evicted the ranks"
        assert {p["spec"].get("nodeName") for p in all_pods(namespace)} <= set(dead)
    st = wait_until(lambda: serving_elsewhere(namespace, set(dead)), timeout=240, interval=1,
                    what="serving on the living nodes")  # fmt: skip
    took = (dt.datetime.now(dt.UTC) - since).total_seconds()
    # the target: nodeLostTimeoutSeconds (60) + 60 s after NotReady, with no manual step
    assert took <= 120, f"served again {took:.0f}s after NotReady"
    recreate = [h for h in st["history"] if h["action"] == "RecreateGroup"]
    assert len(recreate) == 1 and recreate[0]["reason"] == "NodeLost", st["history"]
    assert any(n in recreate[0]["message"] for n in dead), recreate
    assert st["groups"][0]["restartTimes"] in ([], None) or "restartTimes" not in st["groups"][0]
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
    force = [e for e in events if e.get("reason") == "ForceDelete"]
    assert force and any(n in force[0]["message"] for n in dead), [e.get("reason") for e in events]
    print(f"node lost -> serving again: {took:.1f}s after NotReady")
    return took


def test_node_dies_pods_evicted_terminating_forever(op: Operator, namespace: str, nodes: FakeNodes) -> None:
    """Few nodes of the zone die: Kubernetes evicts, and the evicted pods stay Terminating forever."""
    dead = [nodes.add("dead-0", "a", dies=True)]
    nodes.add("live-0", "a", dies=False)
    apply(namespace, node_lost_cluster(nodes, evict_at_once=True))
    wait_until(lambda: get(namespace, "tpic", "demo").get("status", {}).get("phase") == "Running", timeout=90,
               what="Running")  # fmt: skip
    assert {p["spec"]["nodeName"] for p in all_pods(namespace)} & set(dead)
    for i in range(1, 4):  # spare living nodes: 1 of 4 in the zone dies, so eviction goes ahead
        nodes.add(f"live-{i}", "a", dies=False)
    _heal_node_loss(namespace, nodes, dead, evicted=True)


def test_zone_dies_nothing_evicted(op: Operator, namespace: str, nodes: FakeNodes) -> None:
    """Most nodes of a zone die: Kubernetes evicts nothing, the pods stay bound to the dead nodes.

    The node lifecycle controller calls a zone partially disrupted when more than 2 of its nodes and
    at least 55 % are NotReady, and then evicts nothing in zones of <= 50 nodes."""
    dead = [nodes.add("dead-0", "b", dies=True), nodes.add("dead-1", "b", dies=True)]
    apply(namespace, node_lost_cluster(nodes, evict_at_once=False))
    wait_until(lambda: get(namespace, "tpic", "demo").get("status", {}).get("phase") == "Running", timeout=90,
               what="Running")  # fmt: skip
    dead.append(nodes.add("dead-2", "b", dies=True))  # 3 of 4 in zone b die: a partial disruption
    nodes.add("live-0", "b", dies=False)
    nodes.add("live-1", "c", dies=False)
    before = get(namespace, "statefulset", "demo-g0")["metadata"]
    _heal_node_loss(namespace, nodes, dead, evicted=False)
    # Every pod of the group was on the dead nodes: it came back in the same incarnation, from the
    # StatefulSet as it was (not written: no new ControllerRevision while the node's deletes wait).
    after = get(namespace, "statefulset", "demo-g0")["metadata"]
    assert after["generation"] == before["generation"], "the StatefulSet's spec was written"
    assert get(namespace, "tpic", "demo")["status"]["groups"][0].get("incarnation", 0) == 0
    assert {p["metadata"]["labels"]["tpi.dev/incarnation"] for p in all_pods(namespace)} == {"0"}


# -------------------------------------------------------------------------------- no spin
def test_reconciles_stay_bounded_while_weights_load(op: Operator, namespace: str, api_client: client.ApiClient) -> None:
    """After a recreate the new ranks load weights for minutes without renewing (the runtime starts
    its heartbeat once loaded) while the old incarnation's Leases are stale: the operator must
    not reconcile in a loop.  Then the Leases renew every 2 s, as the runtime's do."""
    apply(namespace, cluster_yaml())
    wait_until(lambda: get(namespace, "tpic", "demo").get("status", {}).get("phase") == "Running", timeout=90,
               what="Running")  # fmt: skip
    names = ["demo-g0-0", "demo-g0-1"]
    renew_leases(api_client, namespace, names)
    inject_fault(namespace, "demo-g0-1", "crash")
    wait_until(lambda: get(namespace, "tpic", "demo").get("status", {}).get("restarts") == 1, timeout=30,
               what="group recreated")  # fmt: skip
    before = op.metric("tpi_operator_reconciles_total")
    time.sleep(60)  # loading: no renewals; the Leases still carry the previous pods' renewTime
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(2.0):
            renew_leases(api_client, namespace, names)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        time.sleep(60)
    finally:
        stop.set()
        beater.join(5)
    reconciles = op.metric("tpi_operator_reconciles_total") - before
    st = get(namespace, "tpic", "demo")["status"]
    print(f"reconciles during a 2-minute load: {reconciles:.0f}")
    assert reconciles < 60, f"{reconciles:.0f} reconciles in 2 minutes"
    assert st["restarts"] == 1, st["history"]  # neither the stale Leases nor the renewals look like a hang


# ------------------------------------------------------------------------ no takeover, hostPath
def test_foreign_service_is_reported_and_left_untouched(op: Operator, namespace: str) -> None:
    """A Service of the cluster's name that someone else made: a Conflict, never adopted or changed."""
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "demo", "labels": {"team": "theirs"}},
              "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 1234}]}}  # fmt: skip
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(theirs))
    apply(namespace, cluster_yaml())

    def conflict() -> dict | None:
        conds = get(namespace, "tpic", "demo").get("status", {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "Degraded" and c["reason"] == "Conflict"), None)

    cond = wait_until(conflict, timeout=60, what="Conflict condition")
    assert "Service demo" in cond["message"]
    wait_until(lambda: get(namespace, "tpic", "demo")["status"].get("readyRanks") == 2, timeout=60,
               what="the groups run regardless")  # fmt: skip
    svc = get(namespace, "service", "demo")
    assert svc["spec"]["selector"] == {"app": "theirs"} and [p["port"] for p in svc["spec"]["ports"]] == [1234]
    assert not svc["metadata"].get("ownerReferences"), "adopted"
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
    assert [e for e in events if e.get("reason") == "Conflict"]
    # deleting the cluster must not take their Service with it
    kubectl("delete", "tpic", "demo", "-n", namespace, "--wait=true", "--timeout=60s")
    time.sleep(3)
    assert get(namespace, "service", "demo")["spec"]["selector"] == {"app": "theirs"}


def test_host_path_outside_the_allow_list_is_refused(op: Operator, namespace: str) -> None:
    """The integration operator allows only the temp dir: /etc is refused before anything mounts it."""
    apply(namespace, cluster_yaml(model={"source": {"hostPath": {"path": "/etc"}}}))
    st = wait_until(lambda: (s := get(namespace, "tpic", "demo").get("status", {})).get("phase") == "Failed" and s,
                    timeout=60, what="Failed")  # fmt: skip
    cond = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert cond["reason"] == "HostPathNotAllowed" and "/etc" in cond["message"]
    assert not all_pods(namespace) and not get(namespace, "statefulset", "demo-g0")


# ---------------------------------------------------------------------------- OOM per group
def _batches(namespace: str) -> dict[str, str]:
    out = {}
    for p in all_pods(namespace):
        if p["metadata"].get("deletionTimestamp"):
            continue
        args = p["spec"]["containers"][0]["args"]
        out[p["metadata"]["name"]] = args[args.index("--effective-batch-size") + 1]
    return out


def group_uids(namespace: str, group: str) -> set[str]:
    return {p["metadata"]["uid"] for p in all_pods(namespace) if p["metadata"]["labels"]["tpi.dev/group"] == group}


def test_oom_halves_only_its_group_and_a_spec_edit_resets_it(op: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(replicas=2, runtime={"maxBatchSize": 8}))
    wait_until(lambda: get(namespace, "tpic", "demo").get("status", {}).get("readyReplicas") == 2, timeout=90,
               what="2 groups ready")  # fmt: skip
    g1_uids = group_uids(namespace, "1")
    inject_fault(namespace, "demo-g0-1", "oom")
    want = {"demo-g0-0": "4", "demo-g0-1": "4", "demo-g1-0": "8", "demo-g1-1": "8"}
    wait_until(lambda: _batches(namespace) == want, timeout=60, what=f"batches {want}")
    st = wait_until(lambda: (s := get(namespace, "tpic", "demo")["status"]).get("readyReplicas") == 2 and s,
                    timeout=60, what="2 groups ready again")  # fmt: skip
    assert [g.get("maxBatchSize") for g in st["groups"]] == [4, None]
    # group 1 was neither halved nor rolled: the same pods
    assert group_uids(namespace, "1") == g1_uids
    # an edit of maxBatchSize resets the halving: every group gets the new batch
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"runtime":{"maxBatchSize":16}}}')
    wait_until(lambda: set(_batches(namespace).values()) == {"16"} and len(_batches(namespace)) == 4, timeout=90,
               what="batch 16 everywhere")  # fmt: skip
