"""Issue #10 item 6 against the real control plane: a bad rollout is stopped and explained.

An image that cannot be pulled and a runtime that never becomes Ready are played by kwok stages
keyed on the image name (hack/kwok/fault-stages.yaml).  The shared kwok may have been started from
another checkout, so these tests play their own fake nodes with a kwok process of their own that
loads this checkout's stages (as test_faults does for node death).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tpikit.kube import REPO, kubectl, wait_until
from tpikit.kwok import STAGES

from tests.integration.conftest import inject_fault
from tests.integration.test_faults import TEST_LABEL, FakeNodes, apply_crd
from tests.integration.test_operator import Operator, apply, cluster_yaml, get, pods, status

pytestmark = pytest.mark.integration
BAD_IMAGE = "registry.invalid/tpi-runtime:missing"  # hack/kwok: ErrImagePull / ImagePullBackOff
NEVER_READY = "tpi-runtime:never-ready"  # hack/kwok: runs, never Ready


def stages(tmp: Path) -> Path:
    """The shared kwok's stages, with this checkout's fault stages in place of its own."""
    ours = [d for d in yaml.safe_load_all((REPO / "hack" / "kwok" / "fault-stages.yaml").read_text()) if d]
    names = {d["metadata"]["name"] for d in ours}
    theirs = [d for d in yaml.safe_load_all(STAGES.read_text()) if d and d["metadata"]["name"] not in names]
    out = tmp / "kwok-stages.yaml"
    out.write_text(yaml.safe_dump_all(theirs + ours))
    return out


@pytest.fixture()
def nodes(kubeconfig: str, tmp_path: Path) -> Iterator[FakeNodes]:
    """Two 4-CPU fake nodes played by a kwok of this test's own (this checkout's stages)."""
    fake = FakeNodes(kubeconfig, tmp_path)
    fake.living.config = stages(tmp_path)
    fake.living.start()
    try:
        for i in range(2):
            fake.add(f"roll-{i}", "a", dies=False, cpu="4")
        yield fake
    finally:
        fake.cleanup()


@pytest.fixture()
def op(kubeconfig: str, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    apply_crd()
    proc = Operator(kubeconfig, namespace, tmp_path / "operator.log")
    proc.start()
    yield proc
    kubectl("delete", "tpic", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
    proc.stop()
    print((tmp_path / "operator.log").read_text()[-20000:])


def on_nodes(fake: FakeNodes, **spec: object) -> str:
    """A cluster of small ranks (many per node) that lands on ``fake``'s nodes only."""
    tolerations = [{"key": TEST_LABEL, "operator": "Equal", "value": fake.id, "effect": "NoSchedule"}]
    scheduling = {"nodeSelector": {TEST_LABEL: fake.id}, "tolerations": tolerations}
    return cluster_yaml(resources={"cpu": "100m", "memory": "128Mi"}, scheduling=scheduling, **spec)


def patch(namespace: str, spec: dict) -> None:
    kubectl("patch", "tpic", "demo", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def condition(namespace: str, ctype: str) -> dict:
    return next((c for c in status(namespace).get("conditions", []) if c["type"] == ctype), {})


def group_state(namespace: str, group: int) -> tuple[str, set[str], bool]:
    """(StatefulSet template hash, pod uids, every pod Ready)."""
    sts = get(namespace, "statefulset", f"demo-g{group}")
    live = pods(namespace, group)
    ready = bool(live) and all(
        any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])) for p in live
    )
    return sts["metadata"]["annotations"]["tpi.dev/template-hash"], {p["metadata"]["uid"] for p in live}, ready


def images(namespace: str, group: int) -> set[str]:
    return {p["spec"]["containers"][0]["image"] for p in pods(namespace, group)}


def wait_ready_replicas(namespace: str, n: int, timeout: float = 90) -> dict:
    return wait_until(lambda: (s := status(namespace)).get("readyReplicas") == n and s, timeout=timeout,
                      what=f"{n} groups ready")  # fmt: skip


# ------------------------------------------------------------------------------ a bad image
def test_bad_image_roll_halts_at_group_0_while_the_others_serve_and_heal(
    op: Operator, namespace: str, nodes: FakeNodes
) -> None:
    apply(namespace, on_nodes(nodes, replicas=3))
    wait_until(lambda: status(namespace).get("phase") == "Running", timeout=90, what="Running")
    before = {g: group_state(namespace, g) for g in (1, 2)}
    t0 = time.monotonic()
    patch(namespace, {"image": BAD_IMAGE})

    def halted() -> dict | None:
        cond = condition(namespace, "Progressing")
        return cond if cond.get("reason") == "RolloutHalted" else None

    cond = wait_until(halted, timeout=60, what="RolloutHalted")
    print(f"bad image -> roll halted and explained: {time.monotonic() - t0:.1f}s")
    assert "group 0" in cond["message"] and "pod demo-g0-" in cond["message"], cond
    assert "ErrImagePull" in cond["message"] or "ImagePullBackOff" in cond["message"], cond
    assert BAD_IMAGE in cond["message"]
    st = status(namespace)
    assert st["phase"] == "Degraded" and st["readyReplicas"] == 2
    assert {c["type"]: c for c in st["conditions"]}["Degraded"]["reason"] == "RolloutHalted"
    waiting = {r["waitingReason"] for r in st["ranks"] if r["group"] == 0}
    assert waiting and waiting <= {"ErrImagePull", "ImagePullBackOff"}, st["ranks"]
    assert all(r.get("waitingMessage") for r in st["ranks"] if r["group"] == 0)
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
    assert [e for e in events if e.get("reason") == "RolloutHalted"]
    # it stays halted: the other groups keep their template and pods, and serve
    time.sleep(15)
    assert {g: group_state(namespace, g) for g in (1, 2)} == before
    assert images(namespace, 0) == {BAD_IMAGE} and images(namespace, 1) == {"tpi-runtime:test"}
    # a group still on the old template that fails is healed on the old template (in place)
    old_hash, old_uids, _ = before[1]
    inject_fault(namespace, "demo-g1-0", "crash", restart=False)

    def healed() -> bool:
        thash, uids, ready = group_state(namespace, 1)
        return thash == old_hash and ready and not uids & old_uids and len(uids) == 2

    wait_until(healed, timeout=60, what="group 1 healed on its old template")
    assert images(namespace, 1) == {"tpi-runtime:test"}
    assert {p["metadata"]["labels"]["tpi.dev/incarnation"] for p in pods(namespace, 1)} == {"1"}
    st = wait_ready_replicas(namespace, 2)
    assert group_state(namespace, 2) == before[2] and halted()
    assert not [h for h in st["history"] if h["action"] == "Degrade"]
    # rolling back to the good image heals group 0, and the roll is complete
    t1 = time.monotonic()
    patch(namespace, {"image": "tpi-runtime:test"})
    wait_until(lambda: status(namespace).get("phase") == "Running", timeout=90, what="Running again")
    print(f"roll back -> Running: {time.monotonic() - t1:.1f}s")
    assert condition(namespace, "Progressing")["reason"] == "Complete"
    assert images(namespace, 0) == {"tpi-runtime:test"}


# ------------------------------------------------------------------------------- the deadline
def test_progress_deadline_halts_a_roll_that_never_becomes_ready(
    op: Operator, namespace: str, nodes: FakeNodes
) -> None:
    # The deadline itself is what is tested here, so it is set short; the default (600 s) is
    # asserted by the unit tests.
    apply(namespace, on_nodes(nodes, replicas=2, updateStrategy={"progressDeadlineSeconds": 20}))
    wait_until(lambda: status(namespace).get("phase") == "Running", timeout=90, what="Running")
    before = group_state(namespace, 1)
    t0 = time.monotonic()
    patch(namespace, {"image": NEVER_READY})
    wait_until(lambda: images(namespace, 0) == {NEVER_READY}, timeout=30, what="group 0 rolled")
    time.sleep(10)
    assert condition(namespace, "Progressing").get("reason") == "Reconciling"  # still within the deadline

    def exceeded() -> dict | None:
        cond = condition(namespace, "Progressing")
        return cond if cond.get("reason") == "ProgressDeadlineExceeded" else None

    cond = wait_until(exceeded, timeout=60, what="ProgressDeadlineExceeded")
    took = time.monotonic() - t0
    assert 20 <= took <= 45, took
    assert cond["status"] == "False" and "halted at group 0: demo-g0-0 Running (not Ready)" in cond["message"]
    time.sleep(5)
    assert group_state(namespace, 1) == before and status(namespace)["readyReplicas"] == 1
    # a spec change resumes: a new rollout with its own clock
    patch(namespace, {"image": "tpi-runtime:v2"})
    wait_until(lambda: status(namespace).get("phase") == "Running" and images(namespace, 1) == {"tpi-runtime:v2"},
               timeout=120, what="rolled to v2")  # fmt: skip
    assert condition(namespace, "Progressing")["reason"] == "Complete"


# ------------------------------------------------------------------------------------- paused
def test_paused_roll_stays_paused_until_unpaused(op: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(replicas=2, updateStrategy={"paused": True}))
    wait_until(lambda: status(namespace).get("phase") == "Running", timeout=90, what="Running")
    before = {g: group_state(namespace, g) for g in (0, 1)}
    patch(namespace, {"image": "tpi-runtime:v2"})
    wait_until(lambda: condition(namespace, "Progressing").get("reason") == "RolloutPaused", timeout=30,
               what="RolloutPaused")  # fmt: skip
    time.sleep(10)
    assert {g: group_state(namespace, g) for g in (0, 1)} == before
    assert status(namespace)["phase"] == "Running"
    assert "2 group(s) keep their old template" in condition(namespace, "Progressing")["message"]
    # still healed while paused, on the old template
    inject_fault(namespace, "demo-g0-1", "crash", restart=False)
    wait_until(lambda: status(namespace).get("restarts") == 1, timeout=30, what="group 0 recreated")
    wait_ready_replicas(namespace, 2)
    assert images(namespace, 0) == {"tpi-runtime:test"} and group_state(namespace, 0)[0] == before[0][0]
    patch(namespace, {"updateStrategy": {"paused": False}})
    wait_until(lambda: images(namespace, 0) == images(namespace, 1) == {"tpi-runtime:v2"}
               and status(namespace).get("phase") == "Running", timeout=120, what="rolled once unpaused")  # fmt: skip
    assert [h["group"] for h in status(namespace)["history"] if h["action"] == "RollGroup"] == [0, 1]


# --------------------------------------------------------------------------- Failed per group
def test_a_group_failed_at_the_oom_floor_does_not_freeze_the_others(op: Operator, namespace: str) -> None:
    apply(namespace, cluster_yaml(replicas=2, runtime={"maxBatchSize": 1}))  # already at the floor (1)
    wait_ready_replicas(namespace, 2)
    g1_uids = group_state(namespace, 1)[1]
    for attempt in range(2):  # one more try at the floor, then Failed
        wait_until(lambda: group_state(namespace, 1)[2], timeout=60, what="group 1 ready")
        inject_fault(namespace, "demo-g1-1", "oom", restart=False)
        if attempt == 0:
            wait_until(lambda: status(namespace).get("restarts") == 1, timeout=30, what="group 1 recreated")
    st = wait_until(lambda: (s := status(namespace))["groups"][1].get("failedGeneration") and s, timeout=30,
                    what="group 1 Failed")  # fmt: skip
    assert st["groups"][1]["failureReason"] == "OOMAtBatchFloor" and st["phase"] == "Degraded", st
    cond = condition(namespace, "Degraded")
    assert cond["reason"] == "GroupFailed" and "group 1 Failed: OOMAtBatchFloor" in cond["message"]
    assert st["readyReplicas"] == 1 and st["tp"] == "2/2"  # never a smaller TP for an OOM
    kept = group_state(namespace, 1)[1]
    assert kept and not kept & g1_uids  # the Failed incarnation's pods are kept for debugging
    # group 0 is still healed
    inject_fault(namespace, "demo-g0-0", "crash")
    wait_until(lambda: status(namespace).get("restarts") == 2, timeout=30, what="group 0 recreated")
    wait_until(lambda: group_state(namespace, 0)[2] and status(namespace).get("readyReplicas") == 1, timeout=60,
               what="group 0 serves again")  # fmt: skip
    assert group_state(namespace, 1)[1] == kept and status(namespace)["groups"][1].get("failedGeneration")
    # a spec change retries group 1
    patch(namespace, {"runtime": {"maxBatchSize": 2}})
    st = wait_until(lambda: (s := status(namespace)).get("phase") == "Running" and s, timeout=90, what="Running")
    assert all("failedGeneration" not in g for g in st["groups"])
