"""A rank whose peer is Pending for longer than the collective timeout (issue 10 item 2), on the
real node with the default failure policy.

A blocker pod holds the node's memory so that only one of a TP=2 group's ranks can schedule; the
other stays Pending (Unschedulable) for longer than the 60 s the ranks used to give the
rendezvous before exiting 3 (which the operator counted as a crash loop). Then the blocker goes,
the second rank schedules, and the group forms and serves: no group restart, no degrade.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tpikit.cluster import RUNTIME_IMAGE, Client, Kube, Operator, endpoint_url, status, tpic, wait_serving
from tpikit.kube import wait_until
from tpikit.provider import NODE_SELECTOR, TOLERATIONS, Provider

from tests.e2e.conftest import Checkpoint, record_timing
from tests.e2e.test_tpic import _mib, assert_completion, pods_of

NAME = "late-peer"
RANK_MEMORY_MIB = 2048
#: The collective timeout the operator renders by default (heartbeatTimeoutSeconds 30 -> 60 s):
#: the old rendezvous deadline. The peer stays Pending well past it, and below the default
#: unschedulableTimeoutSeconds (120 s), after which a degrade would be right.
PENDING_S = 80


def _requested_mib(k: Kube, node: str) -> float:
    pods = k.p.kubectl("get", "pods", "-A", "--field-selector", f"spec.nodeName={node}", "-o", "json")
    total = 0.0
    for pod in json.loads(pods)["items"]:
        if pod["status"].get("phase") in ("Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
            continue  # (soon) not holding its requests: counting it could leave room for two ranks later
        for c in pod["spec"]["containers"]:
            total += _mib(((c.get("resources") or {}).get("requests") or {}).get("memory", "0"))
    return total


def _blocker(memory_mib: int, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "blocker", "labels": {"app": "blocker"}},
        "spec": {
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
            "terminationGracePeriodSeconds": 0,
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": "hold",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", "import time; time.sleep(10**9)"],
                    # Requests only: the scheduler reserves the memory, nothing uses it.
                    "resources": {"requests": {"cpu": "10m", "memory": f"{memory_mib}Mi"}},
                }
            ],
        },
    }


READYZ = """
import urllib.error, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8000/readyz").read().decode())
except urllib.error.HTTPError as e:
    print(e.read().decode())
"""


def _readyz(k: Kube, pod: str) -> dict[str, Any]:
    """The rank's /readyz body, asked from inside its pod."""
    return json.loads(k("exec", pod, "--", "python", "-c", READYZ).strip().splitlines()[-1])


def test_rank_waits_for_a_pending_peer_past_the_collective_timeout_and_the_group_serves(
    provider: Provider, operator: Operator, namespace: str, checkpoint: Checkpoint
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    client = Client(k, namespace)  # before the blocker: it needs a little memory too
    node = provider.node_name()
    alloc = _mib(k.get("node", node)["status"]["allocatable"]["memory"])
    free = alloc - _requested_mib(k, node)
    hold = int(free - 1.5 * RANK_MEMORY_MIB)  # room for one rank, not two
    assert hold > 0, f"the node has only {free:.0f} MiB unrequested memory"
    k.apply(_blocker(hold, RUNTIME_IMAGE))
    k("wait", "--for=condition=Ready", "pod/blocker", "--timeout=60s", timeout=70)

    manifest = tpic(NAME, checkpoint.node_path, resources={"cpu": "200m", "memory": f"{RANK_MEMORY_MIB}Mi"})
    del manifest["spec"]["failurePolicy"]  # the default failure policy, as a user gets it
    t0 = time.monotonic()
    k.apply(manifest)

    def split() -> tuple[dict[str, Any], dict[str, Any]] | None:
        pods = pods_of(k, NAME)
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        pending = [
            p for p in pods
            if any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                   for c in p["status"].get("conditions", []))
        ]  # fmt: skip
        return (running[0], pending[0]) if len(pods) == 2 and running and pending else None

    runner, pending = wait_until(split, timeout=120, interval=1, what="one rank Running, its peer Unschedulable")
    t_pending = time.monotonic()
    waiter, absent = runner["metadata"]["name"], pending["metadata"]["name"]
    absent_rank = int(absent.rsplit("-", 1)[1])
    print(f"\n{waiter} runs, {absent} is Pending (Unschedulable) {t_pending - t0:.1f}s after apply")
    while time.monotonic() - t_pending < PENDING_S:
        pods = {p["metadata"]["name"]: p for p in pods_of(k, NAME)}
        assert pods[absent]["status"].get("phase") == "Pending", pods[absent]["status"]
        cs = pods[waiter]["status"]["containerStatuses"][0]
        assert cs["restartCount"] == 0 and "running" in cs["state"], cs  # never gave up, never restarted
        st = status(k, NAME)
        assert (st.get("restarts") or 0) == 0 and not st.get("history"), st
        time.sleep(5)
    body = _readyz(k, waiter)
    assert body["status"] == "waiting" and body["waiting_for"] == [absent_rank], body
    logs = k.logs(waiter, tail=200)
    assert f"waiting for ranks [{absent_rank}]" in logs, logs

    k("delete", "pod", "blocker", "--grace-period=0", "--wait=false")
    t_free = time.monotonic()
    st = wait_serving(k, NAME, timeout=120)
    t_serving = time.monotonic()
    assert_completion(client, endpoint_url(st, NAME, namespace), checkpoint.reference)
    pending_for = t_free - t_pending
    record_timing(
        "peer Pending past the collective timeout -> group serving (default failure policy)",
        t_serving - t_free,
        peer_pending_s=round(pending_for, 1),
        from_apply_s=round(t_serving - t0, 1),
    )
    st = status(k, NAME)
    assert st.get("restarts", 0) == 0 and st["currentTensorParallelSize"] == 2, st
    assert not [h for h in st.get("history", []) if h["action"] in ("Degrade", "RecreateGroup")], st["history"]
    assert st.get("degradedReason") is None, st
    for p in pods_of(k, NAME):
        assert p["status"]["containerStatuses"][0]["restartCount"] == 0, p["status"]
    assert pending_for >= PENDING_S > 60
