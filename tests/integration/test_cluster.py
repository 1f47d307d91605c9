"""The local cluster itself: a real control plane, kwok fake nodes, and fault stages that
report what a real kubelet would."""

from __future__ import annotations

import json
import subprocess

import pytest
from kubernetes import client
from tpikit.kube import REPO, kubectl, wait_until

from tests.integration.conftest import inject_fault, pod_json

SMOKE_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.smoke.tpi.dev}
spec:
  group: smoke.tpi.dev
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"""


def statefulset(name: str, replicas: int, gpus: int = 1) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "rank",
                            "image": "tpi/runtime:dev",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ]
                },
            },
        },
    }


def running_pods(namespace: str, app: str) -> list[dict]:
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", f"app={app}", "-o", "json"))["items"]
    return [p for p in pods if p["status"].get("phase") == "Running" and p["spec"].get("nodeName")]


def test_bring_up_is_idempotent(kubeconfig: str) -> None:
    # A second `up` on a running cluster must be a quick no-op that still leaves the API answering.
    out = subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "up in" in out.stderr
    assert kubectl("get", "--raw", "/readyz").strip() == "ok"


def test_fake_nodes_advertise_gpus(api_client: client.ApiClient) -> None:
    nodes = client.CoreV1Api(api_client).list_node(label_selector="tpi.dev/fake-node=true").items
    assert len(nodes) >= 2
    for node in nodes:
        assert int(node.status.allocatable["nvidia.com/gpu"]) >= 1
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True"


def test_crd_custom_object_and_statefulset(namespace: str, api_client: client.ApiClient) -> None:
    kubectl("apply", "-f", "-", input=SMOKE_CRD)
    wait_until(
        lambda: (
            "Established"
            in kubectl("get", "crd", "widgets.smoke.tpi.dev", "-o", "jsonpath={.status.conditions[*].type}")
        ),
        what="CRD established",
    )
    kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input="apiVersion: smoke.tpi.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: 3}\n",
    )
    assert json.loads(kubectl("get", "widget", "w", "-n", namespace, "-o", "json"))["spec"]["size"] == 3
    # The schema is enforced by the real apiserver.
    bad = subprocess.run(
        [*kubectl_cmd(), "apply", "-n", namespace, "-f", "-"],
        input="apiVersion: smoke.tpi.dev/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {size: 0}\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "spec.size" in bad.stderr

    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(statefulset("ranks", 3)))
    pods = wait_until(
        lambda: len(running_pods(namespace, "ranks")) == 3 and running_pods(namespace, "ranks"),
        timeout=60,
        what="3 pods Running on fake nodes",
    )
    for pod in pods:
        assert pod["spec"]["nodeName"].startswith("kwok-node-")
        assert all(s["ready"] for s in pod["status"]["containerStatuses"])


def kubectl_cmd() -> list[str]:
    from tpikit.kube import KUBECONFIG, tool

    return [tool("kubectl"), "--kubeconfig", str(KUBECONFIG)]


@pytest.mark.parametrize(("fault", "reason", "exit_code"), [("oom", "OOMKilled", 137), ("crash", "Error", 1)])
def test_fault_ends_container_like_kubelet(namespace: str, fault: str, reason: str, exit_code: int) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(statefulset("f", 1)))
    pod = wait_until(lambda: running_pods(namespace, "f"), what="pod Running")[0]["metadata"]["name"]
    inject_fault(namespace, pod, fault, restart=False)

    def terminated() -> dict | None:
        status = pod_json(namespace, pod)["status"]["containerStatuses"][0]
        return status if "terminated" in status["state"] else None

    status = wait_until(terminated, timeout=30, what=f"{fault} termination")
    assert status["state"]["terminated"]["reason"] == reason
    assert status["state"]["terminated"]["exitCode"] == exit_code
    assert status["ready"] is False
    conditions = {c["type"]: c["status"] for c in pod_json(namespace, pod)["status"]["conditions"]}
    assert conditions["Ready"] == "False"


def test_fault_then_restart_fills_last_state(namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(statefulset("r", 1)))
    pod = wait_until(lambda: running_pods(namespace, "r"), what="pod Running")[0]["metadata"]["name"]
    for expected_restarts in (1, 2):
        inject_fault(namespace, pod, "oom", restart=True, restart_delay="500ms")

        def restarted(n: int = expected_restarts) -> dict | None:
            status = pod_json(namespace, pod)["status"]["containerStatuses"][0]
            return status if status["restartCount"] == n and "running" in status["state"] else None

        status = wait_until(restarted, timeout=30, what=f"restartCount {expected_restarts}")
        assert status["lastState"]["terminated"]["reason"] == "OOMKilled"
        assert status["lastState"]["terminated"]["exitCode"] == 137
        assert status["ready"] is True
        annotations = pod_json(namespace, pod)["metadata"].get("annotations", {})
        assert "tpi.dev/fault" not in annotations and "tpi.dev/fault-state" not in annotations


def test_patch_naming_a_previous_pods_uid_is_refused(namespace: str) -> None:
    """What keeps a fault stage off the replacement of the pod it matched (hack/kwok/fault-stages.yaml:
    kwok plays delayed and retried stages by name): the real API server refuses a patch whose
    metadata.uid is not the pod's, on the status subresource too, and changes nothing."""
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(statefulset("s", 1)))
    old = wait_until(lambda: running_pods(namespace, "s"), what="pod Running")[0]["metadata"]
    kubectl("delete", "pod", old["name"], "-n", namespace, "--wait=false")
    new = wait_until(
        lambda: [p for p in running_pods(namespace, "s") if p["metadata"]["uid"] != old["uid"]],
        timeout=60,
        what="the StatefulSet's replacement Running",
    )[0]["metadata"]
    assert new["name"] == old["name"]

    def patch(uid: str, annotations: dict | None = None, status: dict | None = None) -> subprocess.CompletedProcess:
        """A patch as the fault stages make it: metadata.uid beside the annotations, or beside the status."""
        body: dict = {"metadata": {"uid": uid, **({"annotations": annotations} if annotations else {})}}
        how = ["--subresource=status", "--type=strategic"] if status else ["--type=merge"]  # as kwok sends them
        if status:
            body["status"] = status
        return subprocess.run(
            [*kubectl_cmd(), "patch", "pod", new["name"], "-n", namespace, *how, "-p", json.dumps(body)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    status = patch(old["uid"], status={"message": "a stale stage"})
    assert status.returncode != 0 and "uid" in status.stderr, status.stderr
    annotations = {"tpi.dev/stale-stage": "true"}
    meta = patch(old["uid"], annotations=annotations)
    assert meta.returncode != 0 and "uid" in meta.stderr, meta.stderr
    pod = pod_json(namespace, new["name"])
    assert "message" not in pod["status"] and "tpi.dev/stale-stage" not in pod["metadata"].get("annotations", {})
    # The same patches naming the pod's own uid go through: the uid, nothing else, refused them.
    assert patch(new["uid"], status={"message": "ok"}).returncode == 0
    assert patch(new["uid"], annotations=annotations).returncode == 0
    pod = pod_json(namespace, new["name"])
    assert pod["status"]["message"] == "ok" and pod["metadata"]["annotations"]["tpi.dev/stale-stage"] == "true"


def test_unschedulable_rank_stays_pending(namespace: str) -> None:
    # No fake node has 64 GPUs: the real scheduler reports what it would for a rank that cannot fit.
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(statefulset("u", 1, gpus=64)))

    def unschedulable() -> dict | None:
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "app=u", "-o", "json"))["items"]
        for pod in pods:
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return pod
        return None

    pod = wait_until(unschedulable, timeout=30, what="PodScheduled=False/Unschedulable")
    assert pod["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")["message"]
