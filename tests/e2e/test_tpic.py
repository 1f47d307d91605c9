"""TPInferenceClusters on real pods: the operator installed with Helm and running in-cluster from
its image, rank pods from the runtime image forming gloo groups across pods through the headless
Service's DNS names, and the failures the operator must recover from done for real (pod deletion,
a cgroup OOM kill, a SIGSTOPped rank, a rank that cannot be scheduled, a rolling restart).

The tests of the first cluster (`tiny`) share it and run in file order; each of them ends with
the cluster serving again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import pytest
from tpikit.cluster import (
    MAX_TOKENS,
    OPERATOR_NAMESPACE,
    PROMPT_IDS,
    RELEASE,
    Client,
    Kube,
    Operator,
    dump_namespace,
    endpoint_url,
    is_serving,
    status,
    tpic,
    wait_serving,
)
from tpikit.kube import wait_until
from tpikit.provider import Provider

from tests.e2e.conftest import Checkpoint, record_timing

NAME = "tiny"


def pods_of(k: Kube, name: str) -> list[dict[str, Any]]:
    return k.items("pods", selector=f"tpi.dev/cluster={name}")


def pod_uids(k: Kube, name: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods_of(k, name)}


def container_id(pod: dict[str, Any]) -> str:
    cs = pod["status"]["containerStatuses"][0]
    return cs["containerID"].split("://", 1)[1]


def serving_again(k: Kube, name: str, old_uids: set[str], groups: int = 1) -> dict[str, Any] | None:
    """Serving with none of the old pods left (the group was recreated)."""
    st = is_serving(k, name, groups)
    if st is None:
        return None
    pods = pods_of(k, name)
    if any(p["metadata"]["uid"] in old_uids for p in pods):
        return None
    return st


def assert_completion(client: Client, url: str, reference: list[int], retries: int = 5) -> dict[str, Any]:
    """A completion through the client Service equals the local single-process tokens."""
    res: dict[str, Any] = {}
    for _ in range(retries):  # right after Ready the Service's endpoints may still be updating
        res = client.complete(url)
        if res["ok"]:
            break
        time.sleep(2)
    assert res["ok"], res
    assert res["token_ids"] == reference, f"served {res['token_ids']} != local {reference}"
    return res


# ------------------------------------------------------------------------------ shared cluster
class Tiny:
    def __init__(self, k: Kube, client: Client, url: str, ckpt: Checkpoint) -> None:
        self.k, self.client, self.url, self.ckpt = k, client, url, ckpt


@pytest.fixture(scope="module")
def tiny(provider: Provider, operator: Operator, module_namespace: str, checkpoint: Checkpoint) -> Tiny:
    operator.ensure()
    k = Kube(provider, module_namespace)
    t0 = time.monotonic()
    k.apply(tpic(NAME, checkpoint.node_path))
    client = Client(k, module_namespace)
    st = wait_serving(k, NAME, timeout=300)
    record_timing("2-rank group Ready from apply", time.monotonic() - t0)
    return Tiny(k, client, endpoint_url(st, NAME, module_namespace), checkpoint)


def test_operator_runs_in_cluster_from_its_image(provider: Provider, operator: Operator) -> None:
    k = Kube(provider, OPERATOR_NAMESPACE)
    pods = k.items("pods", selector=f"app.kubernetes.io/instance={RELEASE}")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"] == provider.node_name()
    assert pod["spec"]["containers"][0]["image"].endswith("operator:dev") or pod["spec"]["containers"][0]["image"]


def test_completion_matches_single_process(tiny: Tiny) -> None:
    st = status(tiny.k, NAME)
    assert st["readyReplicas"] == 1 and st["currentTensorParallelSize"] == 2, st
    pods = pods_of(tiny.k, NAME)
    assert len(pods) == 2 and {p["status"]["podIP"] for p in pods}.__len__() == 2
    res = assert_completion(tiny.client, tiny.url, tiny.ckpt.reference)
    print(f"\nserved {len(res['token_ids'])} tokens in {res['s']:.2f}s == local generate {PROMPT_IDS} -> {MAX_TOKENS}")


def test_deleted_rank_pod_group_recovers(tiny: Tiny) -> None:
    k = tiny.k
    wait_serving(k, NAME)
    old = pod_uids(k, NAME)
    t0 = time.monotonic()
    k("delete", "pod", f"{NAME}-g0-1", "--wait=false")
    # The whole group re-forms (rank 0's process group broke too): wait for all-new, serving pods.
    wait_until(lambda: serving_again(k, NAME, set(old.values())), timeout=300, interval=1, what="group recreated")
    recovered = time.monotonic() - t0
    assert_completion(tiny.client, tiny.url, tiny.ckpt.reference)
    served = time.monotonic() - t0
    record_timing("recovery after rank pod deletion (Ready)", recovered, served_again_s=round(served, 1))
    hist = status(k, NAME).get("history", [])
    assert any(h["reason"] in ("PodDeleted", "Crash") for h in hist), hist


def test_sigstopped_rank_lease_goes_stale_and_group_is_recreated(provider: Provider, tiny: Tiny) -> None:
    k = tiny.k
    wait_serving(k, NAME)
    old = pod_uids(k, NAME)
    victim = next(p for p in pods_of(k, NAME) if p["metadata"]["name"].endswith("-1"))
    cid = container_id(victim)
    lease_before = k.get("lease", victim["metadata"]["name"])["spec"]["renewTime"]
    t0 = time.monotonic()
    pid = provider.signal_container(cid, "STOP")
    print(f"\nSIGSTOP -> pid {pid} ({victim['metadata']['name']})")
    try:
        # The Lease stops being renewed...
        time.sleep(6)
        lease = k.get("lease", victim["metadata"]["name"], check=False)
        if lease:
            assert lease["spec"]["renewTime"] in (lease_before, lease["spec"]["renewTime"])
            renew = dt.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
            age = (dt.datetime.now(dt.UTC) - renew).total_seconds()
            assert age >= 4, f"Lease of a stopped rank was renewed {age:.1f}s ago"
        # ...the operator notices after heartbeatTimeoutSeconds and recreates the group.
        wait_until(lambda: serving_again(k, NAME, set(old.values())), timeout=300, interval=1, what="group recreated")
    finally:
        with contextlib.suppress(RuntimeError):  # never leave a stopped process behind
            provider.signal_container(cid, "CONT")
    recovered = time.monotonic() - t0
    hist = status(k, NAME).get("history", [])
    assert any(h["reason"] == "HeartbeatTimeout" for h in hist), json.dumps(hist, indent=1)
    assert_completion(tiny.client, tiny.url, tiny.ckpt.reference)
    record_timing("recovery after SIGSTOP of a rank (heartbeatTimeoutSeconds=15)", recovered)


# ----------------------------------------------------------------------------------------- OOM
#: A checkpoint whose per-step memory grows with the batch: logits are [batch, vocab] float32 on
#: every rank (all-gathered), so a big vocabulary makes a full batch cost hundreds of MiB.
#: Measured in the rank pods (torch 2.15, CPU, TP 2, float32; memory.max_usage_in_bytes of the pod
#: cgroup): 0.58 GiB per rank after loading, peak 0.85 / 0.87 / 1.06 / 1.26 / 1.41 GiB with 8 / 16 /
#: 32 / 48 / 64 sequences per step. How many of 64 simultaneous requests share a step depends on
#: timing (the runtime's accept backlog is small, a slow step lets early ones finish), so the limit
#: sits just above the halved batch: 1.13 GiB kills any step of ~40 or more and lets 32 run.
OOM_VOCAB = 1_000_000
OOM_MAX_BATCH = 64
OOM_MEMORY_LIMIT = "1160Mi"


class FullBatches:
    """Full batches of long completions to ``url``, sent again and again from a thread while the
    block runs: all of them in the running batch at once, so that the per-step logits of the big
    vocabulary grow past the memory limit.  The test polls meanwhile (the operator recreates the
    group within seconds, so the OOMKilled container status it looks for is short-lived)."""

    def __init__(self, client: Client, url: str) -> None:
        self.client, self.url = client, url
        self.results: list[dict[str, Any]] = []  # the last batch's
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._load, daemon=True)

    def _load(self) -> None:
        body = Client.body(prompt_ids=[1, 2, 3], max_tokens=48)
        while not self.stop.is_set():
            self.results[:] = self.client.parallel(self.url, OOM_MAX_BATCH, body, stagger=0)

    def __enter__(self) -> FullBatches:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()  # the batch in flight ends on its own (its pods are being recreated)


@pytest.fixture(scope="module")
def big_vocab_checkpoint(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> str:
    from tpi_runtime.testing import make_tiny_checkpoint

    local = tmp_path_factory.mktemp("ckpt") / "bigvocab"
    make_tiny_checkpoint(local, seed=7, vocab_size=OOM_VOCAB, tokenizer=False, max_shard_size="2GB")
    return provider.stage_dir(local, f"bigvocab-{uuid.uuid4().hex[:6]}")


def test_oom_killed_rank_halves_batch_and_serves_again(
    provider: Provider, operator: Operator, namespace: str, big_vocab_checkpoint: str
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    name = "oom"
    k.apply(
        tpic(
            name,
            big_vocab_checkpoint,
            # CPU: the node has 2 cores; the module's `tiny` cluster and two clients run beside it.
            resources={"cpu": "600m", "memory": OOM_MEMORY_LIMIT},
            runtime={"maxBatchSize": OOM_MAX_BATCH, "maxModelLen": 64},
        )
    )
    client = Client(k, namespace)
    st = wait_serving(k, name, timeout=300)
    url = endpoint_url(st, name, namespace)
    assert st.get("effectiveMaxBatchSize") in (None, OOM_MAX_BATCH), st
    old = pod_uids(k, name)

    # Full batches: the per-step logits exceed the container's memory limit, the kernel's cgroup
    # OOM killer ends a rank, the kubelet reports OOMKilled.
    t0 = time.monotonic()
    seen_oom: dict[str, Any] = {}

    def oom_seen() -> bool:
        for p in pods_of(k, name):
            for cs in p["status"].get("containerStatuses", []):
                term = (cs.get("lastState") or {}).get("terminated") or (cs.get("state") or {}).get("terminated")
                if term and term.get("reason") == "OOMKilled":
                    seen_oom.setdefault("pod", p["metadata"]["name"])
        for r in status(k, name).get("ranks", []):
            if r.get("lastTerminationReason") == "OOMKilled":
                seen_oom.setdefault("status_rank", r)
        return bool(seen_oom)

    with FullBatches(client, url) as load:
        deadline = time.monotonic() + 240
        while not oom_seen() and time.monotonic() < deadline:
            time.sleep(0.5)
    history_oom = [h for h in status(k, name).get("history", []) if h["reason"] == "OOMKilled"]
    if not seen_oom and not history_oom:
        peaks = {
            p["metadata"]["name"]: k("exec", p["metadata"]["name"], "--", "cat",
                                     "/sys/fs/cgroup/memory/memory.max_usage_in_bytes", check=False).strip()
            for p in pods_of(k, name)
        }  # fmt: skip
        raise AssertionError(f"no OOMKilled rank after full batches; peak cgroup usage {peaks}; {load.results[:2]}")
    t_oom = time.monotonic()
    print(f"\nOOMKilled seen {t_oom - t0:.1f}s after the first full batch was sent: {seen_oom}")

    st = wait_until(lambda: serving_again(k, name, set(old.values())), timeout=300, interval=1, what="recreated")
    record_timing("recovery after a cgroup OOM kill (seen -> serving)", time.monotonic() - t_oom)
    load.thread.join(timeout=300)
    hist = [h for h in st.get("history", []) if h["reason"] == "OOMKilled"]
    assert hist and any(f"{name}-g0-" in h["message"] for h in hist), json.dumps(st.get("history"), indent=1)
    assert "OOMKilled" in (st.get("lastFailure") or ""), st
    assert st["effectiveMaxBatchSize"] == OOM_MAX_BATCH // 2, st
    for p in pods_of(k, name):  # the assigned batch reaches the ranks as their flag
        args = p["spec"]["containers"][0]["args"]
        assert args[args.index("--effective-batch-size") + 1] == str(OOM_MAX_BATCH // 2)
    res = client.complete(url, Client.body(prompt_ids=[1, 2, 3], max_tokens=4))
    assert res["ok"], res


# ------------------------------------------------------------------------------- unschedulable
def test_unschedulable_rank_degrades_tp_and_serves(
    provider: Provider, operator: Operator, namespace: str, checkpoint: Checkpoint
) -> None:
    """TP 4 of ranks that each need a third of the node's memory: only two fit on the one real
    node, the others stay Pending (Unschedulable), and the operator serves at TP 2."""
    operator.ensure()
    k = Kube(provider, namespace)
    node = k.get("node", provider.node_name())
    alloc_mib = _mib(node["status"]["allocatable"]["memory"])
    per_rank = f"{int(alloc_mib * 0.4)}Mi"  # 2 fit, 3 do not
    name = "degrade"
    t0 = time.monotonic()
    k.apply(
        tpic(
            name,
            checkpoint.node_path,
            tensorParallelSize=4,
            resources={"cpu": "250m", "memory": per_rank},
            failurePolicy={"unschedulableTimeoutSeconds": 10, "allowDegrade": True, "scaleBackUp": False},
        )
    )
    client = Client(k, namespace)

    def pending_unschedulable() -> bool:
        for p in pods_of(k, name):
            for c in p["status"].get("conditions", []):
                if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                    return True
        return False

    wait_until(pending_unschedulable, timeout=120, what="an Unschedulable rank")
    st = wait_serving(k, name, timeout=300)
    record_timing("TP 4 -> degraded TP 2 serving", time.monotonic() - t0, per_rank_memory=per_rank)
    print(f"\nhistory: {json.dumps(st.get('history'), indent=1)}")
    assert st["phase"] == "Degraded", st
    # Two ranks fit; the operator picks a valid size <= what it estimates fits (2, or 1 when its
    # capacity estimate is conservative).
    assert st["desiredTensorParallelSize"] == 4 and 1 <= st["currentTensorParallelSize"] < 4, st
    assert st["degradedReason"] == "Unschedulable", st
    assert_completion(client, endpoint_url(st, name, namespace), checkpoint.reference)


def _mib(q: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10, "Ti": 2**20, "k": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for u, f in units.items():
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q) / 2**20


# ------------------------------------------------------------------------------ rolling restart
def test_restarted_at_rolls_groups_one_at_a_time_without_failed_requests(
    provider: Provider, operator: Operator, namespace: str, checkpoint: Checkpoint
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    name = "roll"
    k.apply(tpic(name, checkpoint.node_path, replicas=2, resources={"cpu": "200m", "memory": "1Gi"}))
    client = Client(k, namespace)
    st = wait_serving(k, name, timeout=300, groups=2)
    url = endpoint_url(st, name, namespace)
    assert_completion(client, url, checkpoint.reference)
    old = pod_uids(k, name)

    proc, token = client.start_loop(url)
    t0 = time.monotonic()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    k("annotate", "tpinferencecluster", name, f"tpi.dev/restartedAt={stamp}", "--overwrite")
    ready_groups_seen: list[int] = []
    try:
        deadline = time.monotonic() + 420
        while True:
            st = status(k, name)
            pods = pods_of(k, name)
            ready_groups_seen.append(st.get("readyReplicas") or 0)
            # Never both groups down: at least one group's pods are all old or all new and Ready.
            gone = {n for n, u in old.items() if u not in {p["metadata"]["uid"] for p in pods}}
            if len(gone) == len(old) and is_serving(k, name, groups=2):
                break
            assert time.monotonic() < deadline, f"roll did not finish: {json.dumps(st)[:2000]}"
            time.sleep(1)
    finally:
        results = client.stop_loop(proc, token)
    rolled = time.monotonic() - t0
    record_timing("rolling restart of 2 groups", rolled, requests=len(results))
    assert min(ready_groups_seen) >= 1, f"both groups were down at once: {ready_groups_seen}"
    failed = [r for r in results if not r["ok"]]
    assert len(results) >= 5, results
    assert not failed, f"{len(failed)}/{len(results)} requests failed during the roll: {failed[:5]}"
    assert all(r["token_ids"] == checkpoint.reference for r in results)
    assert status(k, name).get("restartedAt") == stamp


# ------------------------------------------------------------------------------------ clean-up
def test_cr_deletion_and_helm_uninstall_leave_nothing_behind(
    provider: Provider, operator: Operator, namespace: str, checkpoint: Checkpoint
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    name = "gone"
    k.apply(tpic(name, checkpoint.node_path))
    wait_serving(k, name, timeout=300)
    owned = "statefulsets,pods,services,leases,serviceaccounts,roles,rolebindings,configmaps,endpoints"

    def leftovers() -> list[str]:
        out = k("get", owned, "-l", f"tpi.dev/cluster={name}", "-o", "name")
        return out.split()

    assert leftovers(), "nothing labelled tpi.dev/cluster before deletion?"
    t0 = time.monotonic()
    k("delete", "tpinferencecluster", name, "--wait=true", "--timeout=120s", timeout=130)
    try:
        wait_until(lambda: not leftovers(), timeout=120, what="the cluster's objects gone")
    except AssertionError:
        dump_namespace(k, namespace)
        raise
    record_timing("CR deletion -> all owned objects gone", time.monotonic() - t0)
    # Leases are owned through the cluster too, whether or not they carry the label.
    leases = k("get", "leases", "-o", "name").split()
    assert not [x for x in leases if x.startswith(f"lease.coordination.k8s.io/{name}-")], leases

    operator.uninstall()
    ko = Kube(provider, OPERATOR_NAMESPACE)
    sel = f"app.kubernetes.io/instance={RELEASE}"
    kinds = "all,serviceaccounts,roles,rolebindings,configmaps"
    wait_until(lambda: not ko("get", kinds, "-l", sel, "-o", "name").split(), timeout=120, what="release objects gone")
    cluster_scoped = provider.kubectl("get", "clusterroles,clusterrolebindings", "-l", sel, "-o", "name").split()
    assert not cluster_scoped, cluster_scoped
    assert not ko("get", "pods", "-o", "name").split()
    # Helm keeps CRDs on uninstall by design (crds/ of the chart); everything else is gone.
    assert provider.kubectl("get", "crd", "tpinferenceclusters.tpi.dev", "-o", "name", check=False).strip()
