"""A bad rollout on the real node (issue #10 item 6): an image that does not exist anywhere is
rolled to a replicas=2 cluster with the default failure policy and update strategy.  The kubelet
really fails to pull it (nothing can be pulled here), the roll halts at the first group with a
condition naming the pod and ErrImagePull/ImagePullBackOff, the other group keeps answering
completions, and rolling back to the good image heals the cluster.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tpikit.cluster import (
    RUNTIME_IMAGE,
    Client,
    Kube,
    Operator,
    endpoint_url,
    is_serving,
    status,
    tpic,
    wait_serving,
)
from tpikit.kube import wait_until
from tpikit.provider import Provider

from tests.e2e.conftest import Checkpoint, record_timing

BAD_IMAGE = "registry.invalid/tpi/runtime:does-not-exist"


def condition(k: Kube, name: str, ctype: str) -> dict[str, Any]:
    return next((c for c in status(k, name).get("conditions", []) if c["type"] == ctype), {})


def group_pods(k: Kube, name: str, group: int) -> list[dict[str, Any]]:
    return k.items("pods", selector=f"tpi.dev/cluster={name},tpi.dev/group={group}")


def completes(client: Client, url: str, reference: list[int], tries: int = 5) -> None:
    res: dict[str, Any] = {}
    for _ in range(tries):  # the Service's endpoints may still be updating right after a change
        res = client.complete(url)
        if res["ok"]:
            break
        time.sleep(2)
    assert res["ok"] and res["token_ids"] == reference, res


def test_bad_image_roll_halts_at_the_first_group_and_rolling_back_heals(
    provider: Provider, operator: Operator, namespace: str, checkpoint: Checkpoint
) -> None:
    operator.ensure()
    k = Kube(provider, namespace)
    name = "badroll"
    k.apply(tpic(name, checkpoint.node_path, replicas=2, resources={"cpu": "200m", "memory": "1Gi"}))
    client = Client(k, namespace)
    st = wait_serving(k, name, timeout=300, groups=2)
    url = endpoint_url(st, name, namespace)
    completes(client, url, checkpoint.reference)
    g1 = {p["metadata"]["uid"] for p in group_pods(k, name, 1)}

    t0 = time.monotonic()
    spec = {"image": BAD_IMAGE, "imagePullPolicy": "IfNotPresent"}
    k("patch", "tpinferencecluster", name, "--type=merge", "-p", json.dumps({"spec": spec}))

    def halted() -> dict[str, Any] | None:
        cond = condition(k, name, "Progressing")
        return cond if cond.get("reason") == "RolloutHalted" else None

    cond = wait_until(halted, timeout=180, interval=1, what="RolloutHalted")
    took = time.monotonic() - t0
    record_timing("bad image roll halted at the first group and explained", took)
    assert f"pod {name}-g0-" in cond["message"], cond
    assert "ErrImagePull" in cond["message"] or "ImagePullBackOff" in cond["message"], cond
    st = status(k, name)
    waiting = {r.get("waitingReason") for r in st["ranks"] if r["group"] == 0}
    assert waiting & {"ErrImagePull", "ImagePullBackOff"}, st["ranks"]
    # the other group keeps its pods and its template, and answers completions
    time.sleep(20)
    for _ in range(5):
        completes(client, url, checkpoint.reference, tries=1)
    assert {p["metadata"]["uid"] for p in group_pods(k, name, 1)} == g1
    assert {p["spec"]["containers"][0]["image"] for p in group_pods(k, name, 1)} == {RUNTIME_IMAGE}
    assert halted() and status(k, name)["readyReplicas"] == 1
    assert not [h for h in status(k, name).get("history", []) if h["action"] == "Degrade"]

    t1 = time.monotonic()
    spec = {"image": RUNTIME_IMAGE, "imagePullPolicy": "Never"}
    k("patch", "tpinferencecluster", name, "--type=merge", "-p", json.dumps({"spec": spec}))
    wait_until(lambda: is_serving(k, name, groups=2) and condition(k, name, "Progressing").get("reason") == "Complete",
               timeout=300, interval=1, what="both groups serving after the roll back")  # fmt: skip
    record_timing("roll back from a bad image: both groups serving", time.monotonic() - t1)
    completes(client, url, checkpoint.reference)
    assert {p["metadata"]["uid"] for p in group_pods(k, name, 1)} == g1  # never touched
