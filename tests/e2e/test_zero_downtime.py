"""Zero-downtime rolls and drains on the real node (issue #10 item 7): 16 concurrent streaming
clients of ~30 s each keep going through the cluster's Service while

* a replicas=1 cluster with ``maxSurge: 1`` is rolled (``tpi.dev/restartedAt``), and
* a replicas=2 cluster loses a rank to the Eviction API (what ``kubectl drain`` calls), with its
  PodDisruptionBudget refusing a second group's eviction meanwhile.

Every stream must end with ``finish_reason: length`` and exactly the tokens asked for: 0 failed,
0 truncated.  The default terminationGracePeriodSeconds (60 s: preStop 5 s, drain 45 s) is used.
Streams are sized at run time for ~30 s on this node (a calibration round first).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tpikit.cluster import Client, Kube, Operator, endpoint_url, status, tpic, wait_serving
from tpikit.kube import wait_until
from tpikit.provider import Provider

from tests.e2e.conftest import record_timing

CLIENTS = 16
STREAM_SECONDS = 30.0
MAX_MODEL_LEN = 4096
PROMPT = [1, 17, 42, 99, 7, 123, 5]

# Runs in the client pod: CLIENTS workers stream completions one after another until the stop file
# exists; one JSON line per request.
STREAM_SCRIPT = r"""
import json, os, sys, threading, time, urllib.error, urllib.request
url, body, workers, stop = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
once = stop == "-"
lock = threading.Lock()

def stream():
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.time()
    tokens, finish, err = 0, None, None
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    err = ev["error"]
                    continue
                for c in ev.get("choices") or []:
                    tokens += len(c.get("token_ids") or [])
                    finish = c.get("finish_reason") or finish
    except urllib.error.HTTPError as e:
        err = f"HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"
    except Exception as e:
        err = repr(e)[:300]
    return {"t": t, "s": time.time() - t, "tokens": tokens, "finish": finish, "error": err}

def worker(i):
    time.sleep(i * 0.05)
    while True:
        res = stream()
        with lock:
            print(json.dumps(res), flush=True)
        if once or os.path.exists(stop):
            return

threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
for th in threads:
    th.start()
for th in threads:
    th.join()
"""


class Streams:
    """CLIENTS streaming workers in the client pod, until ``stop``."""

    def __init__(self, client: Client, url: str, max_tokens: int, loop: bool = True) -> None:
        self.client, self.token = client, uuid.uuid4().hex[:8]
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        self.max_tokens = max_tokens
        k = client.k
        self.proc = subprocess.Popen(
            [k.p.kubectl_bin, "--kubeconfig", k.p.kubeconfig, "-n", client.ns, "exec", "-i", client.pod, "--",
             "python3", "-", url, json.dumps(body), str(CLIENTS), f"/tmp/stop-{self.token}" if loop else "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write(STREAM_SCRIPT)
        self.proc.stdin.close()
        self.proc.stdin = None

    def stop(self) -> list[dict[str, Any]]:
        self.client.k("exec", self.client.pod, "--", "touch", f"/tmp/stop-{self.token}")
        return self.wait()

    def wait(self) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"stream client failed: {err[-2000:]}"
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def check(self, results: list[dict[str, Any]]) -> None:
        """0 failed, 0 truncated: every stream ends on its length with every token."""
        bad = [r for r in results if r["error"] or r["finish"] != "length" or r["tokens"] != self.max_tokens]
        assert results and not bad, f"{len(bad)} of {len(results)} streams failed or were truncated: {bad[:5]}"


@pytest.fixture(scope="module")
def long_checkpoint(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a long context, so a stream can last ~30 s."""
    from tpi_runtime.testing import make_tiny_checkpoint

    local = tmp_path_factory.mktemp("ckpt") / "tiny-long"
    make_tiny_checkpoint(local, seed=7, max_position_embeddings=MAX_MODEL_LEN)
    return provider.stage_dir(Path(local), f"tiny-long-{uuid.uuid4().hex[:6]}")


def cluster(k: Kube, name: str, model: str, **spec: Any) -> dict[str, Any]:
    """The default failure policy; maxBatchSize 16: all CLIENTS run at once (a queued stream would
    wait out another's 30 s)."""
    # This revision's CRD (maxSurge) is applied by the operator fixture (tpikit Operator.install).
    obj = tpic(name, model, runtime={"maxBatchSize": CLIENTS, "maxModelLen": MAX_MODEL_LEN}, **spec)
    obj["spec"]["failurePolicy"] = {}
    return obj


def sized_tokens(client: Client, url: str) -> int:
    """max_tokens for ~STREAM_SECONDS per stream with CLIENTS at once, at this node's speed."""
    probe = 64
    streams = Streams(client, url, probe, loop=False)
    results = streams.wait()
    streams.check(results)
    per_token = max(r["s"] for r in results) / probe
    tokens = int(STREAM_SECONDS / per_token)
    return max(probe, min(tokens, MAX_MODEL_LEN - len(PROMPT) - 1))


def pods_of(k: Kube, name: str, group: int | None = None) -> list[dict[str, Any]]:
    sel = f"tpi.dev/cluster={name}" + (f",tpi.dev/group={group}" if group is not None else "")
    return [p for p in k.items("pods", selector=sel) if not p["metadata"].get("deletionTimestamp")]


def evict(k: Kube, pod: str) -> str:
    """The Eviction API, as kubectl drain calls it: '' when evicted, else the refusal."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": k.ns}}
    try:
        k("create", "--raw", f"/api/v1/namespaces/{k.ns}/pods/{pod}/eviction", "-f", "-", input=json.dumps(body))
        return ""
    except RuntimeError as e:  # kubectl's error carries the API's 429 message
        return str(e)


def test_roll_with_max_surge_serves_every_stream(
    provider: Provider, operator: Operator, namespace: str, long_checkpoint: str
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    name = "surge"
    k.apply(cluster(k, name, long_checkpoint, replicas=1, updateStrategy={"maxSurge": 1}))
    st = wait_serving(k, name, timeout=300)
    client = Client(k, namespace)
    url = endpoint_url(st, name, namespace)
    max_tokens = sized_tokens(client, url)
    old = {p["metadata"]["uid"] for p in pods_of(k, name)}

    streams = Streams(client, url, max_tokens)
    time.sleep(5)  # streams in flight on the old group
    t0 = time.monotonic()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    k("annotate", "tpinferencecluster", name, f"tpi.dev/restartedAt={stamp}", "--overwrite")

    def rolled() -> bool:
        live = pods_of(k, name)
        return (not k.exists("statefulset", f"{name}-g1") and len(live) == 2
                and not {p["metadata"]["uid"] for p in live} & old
                and status(k, name).get("readyReplicas") == 1)  # fmt: skip

    wait_until(rolled, timeout=600, interval=1, what="the roll (surge group up, group 0 rolled, surge gone)")
    roll_s = time.monotonic() - t0
    time.sleep(5)  # a few streams more on the rolled group
    results = streams.stop()
    streams.check(results)
    steps = [(h["action"], h.get("group"), h["reason"]) for h in status(k, name).get("history", [])]
    assert steps == [("RollGroup", 1, "Surge"), ("RollGroup", 0, "Update"), ("RemoveGroup", 1, "SurgeDone")], steps
    longest = max(r["s"] for r in results)
    record_timing("roll of a replicas=1 cluster with maxSurge=1 under 16 streams (0 failed)", roll_s,
                  streams=len(results), max_tokens=max_tokens, longest_stream_s=round(longest, 1))  # fmt: skip


def test_eviction_drains_one_group_and_the_budget_holds_the_other(
    provider: Provider, operator: Operator, namespace: str, long_checkpoint: str
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    name = "drain"
    k.apply(cluster(k, name, long_checkpoint, replicas=2))
    st = wait_serving(k, name, timeout=300, groups=2)
    wait_until(lambda: (k.get("pdb", name).get("status") or {}).get("disruptionsAllowed") == 1, timeout=60,
               interval=1, what="the PodDisruptionBudget counted")  # fmt: skip
    client = Client(k, namespace)
    url = endpoint_url(st, name, namespace)
    max_tokens = sized_tokens(client, url)
    old = {p["metadata"]["uid"] for p in pods_of(k, name, 0)}

    streams = Streams(client, url, max_tokens)
    time.sleep(5)  # streams in flight on both groups
    t0 = time.monotonic()
    assert evict(k, f"{name}-g0-1") == ""
    refusal = evict(k, f"{name}-g1-0")  # group 0 is down now: the budget must refuse group 1
    assert "disruption budget" in refusal, refusal

    def back() -> bool:
        live = pods_of(k, name, 0)
        return (
            len(live) == 2
            and not {p["metadata"]["uid"] for p in live} & old
            and (status(k, name).get("readyReplicas") == 2)
        )

    wait_until(back, timeout=600, interval=1, what="group 0 recreated and Ready")
    recovered_s = time.monotonic() - t0
    time.sleep(5)
    results = streams.stop()
    streams.check(results)
    assert any(h["group"] == 0 and h["action"] == "RecreateGroup" for h in status(k, name).get("history", []))
    longest = max(r["s"] for r in results)
    what = "eviction of a rank of a replicas=2 cluster under 16 streams (0 failed): group Ready again"
    record_timing(what, recovered_s, streams=len(results), max_tokens=max_tokens, longest_stream_s=round(longest, 1))
