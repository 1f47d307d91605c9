"""Several ranks per pod on the real node (issue 11): a TP=2 group as ONE pod whose launcher
(`python -m tpi_runtime launch --ranks-per-pod 2`) runs both ranks, gloo + the pod's /dev/shm on
CPU, under the DEFAULT failure policy (heartbeatTimeoutSeconds 30, backoff 5 s, 3 restarts per
window: nothing shortened).

The first cluster (`pair`) is shared, in file order: it answers like one process, then a local
rank is SIGKILLed, then one is SIGSTOPped; each test ends with the group serving again (two
group restarts, within the default three per window). The cgroup OOM needs a big-vocabulary
checkpoint and a memory limit, so it gets its own cluster, last.

Answers go through the official `openai` client, over `kubectl port-forward` to rank 0's pod (the
same on both providers: nothing else from the test process reaches a pod on kind).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from tpikit.cluster import MAX_TOKENS, PROMPT_IDS, Client, Kube, Operator, endpoint_url, status, tpic, wait_serving
from tpikit.kube import wait_until
from tpikit.provider import Provider

from tests.e2e.conftest import Checkpoint, record_timing
from tests.e2e.test_tpic import (  # noqa: F401  (big_vocab_checkpoint: a fixture, used by name)
    OOM_MAX_BATCH,
    OOM_MEMORY_LIMIT,
    FullBatches,
    _mib,
    big_vocab_checkpoint,
    pod_uids,
    pods_of,
    serving_again,
)

NAME = "pair"
RANKS_PER_POD = 2

#: Run inside the pod (`kubectl exec`): the PID of the runtime process of local rank argv[1],
#: found by its environment (the launcher sets LOCAL_RANK per child), then argv[2]: a signal
#: number to send it, or 0 to only print it.
SIGNAL_LOCAL_RANK = r"""
import os, sys
local, sig = sys.argv[1], int(sys.argv[2])
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if b"LOCAL_RANK=" + local.encode() in env and b"tpi_runtime" in cmd and b"launch" not in cmd:
        found.append(int(pid))
assert len(found) == 1, f"local rank {local}: processes {found}"
if sig:
    os.kill(found[0], sig)
print(found[0])
"""


def pair_manifest(name: str, model_path: str, **spec: Any) -> dict[str, Any]:
    obj = tpic(name, model_path, ranksPerPod=RANKS_PER_POD, **spec)
    obj["spec"]["failurePolicy"] = {}  # the defaults: nothing shortened
    return obj


def signal_local_rank(k: Kube, pod: str, local_rank: int, signum: int) -> int:
    out = k("exec", "-i", pod, "--", "python3", "-", str(local_rank), str(signum), input=SIGNAL_LOCAL_RANK)
    return int(out.strip().splitlines()[-1])


@contextlib.contextmanager
def port_forward(k: Kube, pod: str, port: int = 8000) -> Iterator[str]:
    """`kubectl port-forward pod/<pod> :port`; yields http://127.0.0.1:<local port>."""
    proc = subprocess.Popen(
        [k.p.kubectl_bin, "--kubeconfig", k.p.kubeconfig, "-n", k.ns, "port-forward", f"pod/{pod}", f":{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8000"
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"kubectl port-forward said {line!r}{proc.stdout.read() if proc.poll() is not None else ''}"
        yield f"http://127.0.0.1:{m.group(1)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def openai_completion(k: Kube, name: str) -> list[int]:
    """Greedy token ids of PROMPT_IDS -> MAX_TOKENS from rank 0's pod, through the openai client."""
    with port_forward(k, f"{name}-g0-0") as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=5, timeout=120)
        model = client.models.list().data[0].id
        res = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=MAX_TOKENS, temperature=0)
    ids = (res.choices[0].model_extra or {})["token_ids"]
    return [int(t) for t in ids]


def lease_age(k: Kube, lease: str) -> float:
    renew = k.get("lease", lease)["spec"]["renewTime"]
    return (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(renew.replace("Z", "+00:00"))).total_seconds()


def history(k: Kube, name: str) -> list[dict[str, Any]]:
    return list(status(k, name).get("history") or [])


# ------------------------------------------------------------------------------ shared cluster
class Pair:
    def __init__(self, k: Kube, ckpt: Checkpoint) -> None:
        self.k, self.ckpt = k, ckpt


@pytest.fixture(scope="module")
def pair(provider: Provider, operator: Operator, module_namespace: str, checkpoint: Checkpoint) -> Pair:
    operator.ensure()
    k = Kube(provider, module_namespace)
    t0 = time.monotonic()
    k.apply(pair_manifest(NAME, checkpoint.node_path))
    wait_serving(k, NAME, timeout=300)
    record_timing("TP=2 as one pod of 2 ranks Ready from apply", time.monotonic() - t0)
    return Pair(k, checkpoint)


def test_one_pod_runs_both_ranks_and_answers_like_one_process(pair: Pair) -> None:
    t0 = time.monotonic()
    k = pair.k
    st = status(k, NAME)
    assert st["readyReplicas"] == 1 and st["currentTensorParallelSize"] == 2, st
    pods = pods_of(k, NAME)
    assert [p["metadata"]["name"] for p in pods] == [f"{NAME}-g0-0"], "one pod for the whole group"
    pod = pods[0]
    assert pod["metadata"]["annotations"].get("tpi.dev/ranks-per-pod") == "2", pod["metadata"]["annotations"]
    c = pod["spec"]["containers"][0]
    argv = c.get("command", []) + c.get("args", [])
    assert "launch" in argv and argv[argv.index("--ranks-per-pod") + 1] == "2", argv
    # Per-rank status lists both ranks, on that one pod, with their local ranks.
    ranks = sorted((r["rank"], r.get("localRank"), r["pod"]) for r in st["ranks"])
    assert ranks == [(0, 0, f"{NAME}-g0-0"), (1, 1, f"{NAME}-g0-0")], st["ranks"]
    # Two runtime processes inside the pod, one per local rank, each renewing its own Lease.
    pids = {lr: signal_local_rank(k, pod["metadata"]["name"], lr, 0) for lr in range(RANKS_PER_POD)}
    assert len(set(pids.values())) == 2, pids
    for lr in range(RANKS_PER_POD):
        # A rank starts its heartbeat once its engine is built, just after /readyz can say ready:
        # the first renewal may land a moment after the pod turned Ready (seen once in CI).
        name = f"{NAME}-g0-0-r{lr}"
        lease = wait_until(lambda n=name: (x := k.get("lease", n))["spec"].get("renewTime") and x, timeout=30,
                           interval=0.5, what=f"{name} renewed")  # fmt: skip
        assert lease["spec"]["holderIdentity"] == f"{NAME}-g0-0", lease
        assert lease_age(k, name) < 10
    served = openai_completion(k, NAME)
    assert served == pair.ckpt.reference, f"served {served} != single process {pair.ckpt.reference}"
    record_timing("ranksPerPod=2: checks + openai completion", time.monotonic() - t0)


def test_killed_local_rank_stops_the_pod_and_the_group_is_recreated(pair: Pair) -> None:
    k = pair.k
    wait_serving(k, NAME)
    old = pod_uids(k, NAME)
    t0 = time.monotonic()
    pid = signal_local_rank(k, f"{NAME}-g0-0", 1, 9)
    print(f"\nSIGKILL -> local rank 1 (pid {pid} in the pod)")
    wait_until(lambda: serving_again(k, NAME, set(old.values())), timeout=300, interval=1, what="group recreated")
    recovered = time.monotonic() - t0
    assert openai_completion(k, NAME) == pair.ckpt.reference
    record_timing("ranksPerPod=2: recovery after SIGKILL of local rank 1 (Ready)", recovered)
    st = status(k, NAME)
    crashes = [h for h in st.get("history", []) if h["reason"] == "Crash"]
    # The launcher's termination message names the rank that ended the pod, and its exit.
    assert any("local rank 1 (rank 1) exited 137" in h["message"] for h in crashes), json.dumps(st.get("history"))
    # A SIGKILL is exit 137 too, but not an OOM: the batch stays.
    assert not [h for h in st.get("history", []) if h["reason"] == "OOMKilled"], st["history"]
    assert st.get("effectiveMaxBatchSize") in (None, 8), st


def test_sigstopped_local_rank_is_found_through_its_lease(pair: Pair) -> None:
    k = pair.k
    wait_serving(k, NAME)
    old = pod_uids(k, NAME)
    pod = f"{NAME}-g0-0"
    t0 = time.monotonic()
    pid = signal_local_rank(k, pod, 1, 19)  # SIGSTOP local rank 1; local rank 0 (the probes) stays well
    print(f"\nSIGSTOP -> local rank 1 (pid {pid} in the pod)")
    recreated = False
    try:
        time.sleep(8)
        # Its own Lease stops being renewed while local rank 0's goes on.
        assert lease_age(k, f"{pod}-r1") >= 6, "the stopped rank's Lease is still renewed"
        assert lease_age(k, f"{pod}-r0") < 6, "local rank 0's Lease stopped too"
        assert status(k, NAME).get("readyReplicas") == 1, "the pod's probes (local rank 0) stay Ready"
        wait_until(lambda: serving_again(k, NAME, set(old.values())), timeout=300, interval=1, what="recreated")
        recreated = True
    finally:
        if not recreated:  # never leave a stopped process behind
            with contextlib.suppress(RuntimeError, AssertionError, ValueError):
                signal_local_rank(k, pod, 1, 18)
    recovered = time.monotonic() - t0
    hist = [h for h in history(k, NAME) if h["reason"] == "HeartbeatTimeout"]
    assert any("local rank 1" in h["message"] for h in hist), json.dumps(history(k, NAME), indent=1)
    assert openai_completion(k, NAME) == pair.ckpt.reference
    record_timing("ranksPerPod=2: recovery after SIGSTOP of local rank 1 (heartbeatTimeoutSeconds=30)", recovered)


# ----------------------------------------------------------------------------------------- OOM
def test_cgroup_oom_of_one_local_rank_is_oomkilled_and_halves_the_batch(
    provider: Provider,
    operator: Operator,
    namespace: str,
    big_vocab_checkpoint: str,  # noqa: F811
) -> None:
    """test_tpic's recipe, two ranks in one container: the limit is per rank (the pod gets twice
    it), a full batch of a 1M-token vocabulary makes both ranks' logits grow past it, and the
    kernel's cgroup OOM killer ends ONE local rank; the launcher reads the cgroup's OOM counter."""
    operator.ensure()
    k = Kube(provider, namespace)
    name = "oomp"
    t_apply = time.monotonic()
    k.apply(
        pair_manifest(
            name,
            big_vocab_checkpoint,
            resources={"cpu": "600m", "memory": OOM_MEMORY_LIMIT},
            runtime={"maxBatchSize": OOM_MAX_BATCH, "maxModelLen": 64},
        )
    )
    client = Client(k, namespace)
    st = wait_serving(k, name, timeout=300)
    url = endpoint_url(st, name, namespace)
    limit = k.get("pod", f"{name}-g0-0")["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert _mib(limit) == RANKS_PER_POD * _mib(OOM_MEMORY_LIMIT), limit  # ranksPerPod x the per-rank limit
    old = pod_uids(k, name)
    t0 = time.monotonic()
    messages: set[str] = set()  # the launcher's termination messages (short-lived: the pod is recreated)

    def oom_in_history() -> list[dict[str, Any]]:
        for p in pods_of(k, name):
            for cs in p["status"].get("containerStatuses", []):
                for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                    if (state.get("terminated") or {}).get("message"):
                        messages.add(state["terminated"]["message"])
        st = status(k, name)
        messages.update(r["terminationMessage"] for r in st.get("ranks", []) if r.get("terminationMessage"))
        return [h for h in st.get("history") or [] if h["reason"] == "OOMKilled"]

    with FullBatches(client, url) as load:
        hist = wait_until(oom_in_history, timeout=240, interval=0.5, what="an OOMKilled group failure")
    t_oom = time.monotonic()
    print(f"\nOOMKilled {t_oom - t0:.1f}s after the first full batch: {hist}; messages {messages}")
    # The launcher's message names the one local rank the kernel killed, and the OOM.
    # The pod's own message lives only until the group is recreated; the history keeps its first line.
    oom_line = re.compile(r"local rank [01] \(rank [01]\) exited 137: OOMKilled")
    recreate = next(h for h in hist if h["action"] == "RecreateGroup")
    assert oom_line.search(recreate["message"]), (hist, messages)
    st = wait_until(lambda: serving_again(k, name, set(old.values())), timeout=300, interval=1, what="recreated")
    record_timing("ranksPerPod=2: recovery after a cgroup OOM kill (seen -> serving)", time.monotonic() - t_oom)
    load.thread.join(timeout=300)
    assert "OOMKilled" in (st.get("lastFailure") or ""), st
    assert st["effectiveMaxBatchSize"] == OOM_MAX_BATCH // 2, st
    args = k.get("pod", f"{name}-g0-0")["spec"]["containers"][0]["args"]
    assert args[args.index("--effective-batch-size") + 1] == str(OOM_MAX_BATCH // 2), args
    res = client.complete(url, Client.body(prompt_ids=[1, 2, 3], max_tokens=4))
    assert res["ok"], res
    record_timing("ranksPerPod=2: cgroup OOM scenario (apply -> serving at half batch)", time.monotonic() - t_apply)
