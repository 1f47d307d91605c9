"""Fixtures for the integration tier: a real kube-apiserver with kwok fake nodes.

The cluster is brought up once per session by hack/cluster.sh (idempotent, so a cluster that is
already up is reused); each test gets a fresh namespace, deleted afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config
from tpikit.kube import KUBECONFIG, REPO, kubectl, wait_until

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    """Path of the kubeconfig of the local cluster, brought up if needed."""
    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True, timeout=300)
    return str(KUBECONFIG)


@pytest.fixture(scope="session")
def api_client(kubeconfig: str) -> client.ApiClient:
    return config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture()
def namespace(api_client: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test."""
    core = client.CoreV1Api(api_client)
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # The ServiceAccount controller must have made `default` before pods can be created.
    wait_until(lambda: _has_default_sa(core, name), timeout=30, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name, propagation_policy="Background")


def _has_default_sa(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
        return True
    except client.ApiException:
        return False


def inject_fault(namespace: str, pod: str, fault: str, restart: bool = True, restart_delay: str = "1s") -> None:
    """Make a pod's container fail the way a real kubelet reports it (kwok stages in hack/kwok).

    fault: "oom" (OOMKilled, exit 137) or "crash" (Error, exit 1). With restart, the container
    then restarts: restartCount + 1 and lastState.terminated holds the failure.
    """
    if fault not in ("oom", "crash"):
        raise ValueError(f"unknown fault {fault!r}")
    annotations = {
        "tpi.dev/fault": fault,
        "tpi.dev/fault-restart": "true" if restart else "false",
        "tpi.dev/fault-restart-delay": restart_delay,
    }
    kubectl("annotate", "pod", pod, "-n", namespace, "--overwrite", *[f"{k}={v}" for k, v in annotations.items()])


def inject_exit(namespace: str, pod: str, exit_code: int, message: str, restart_delay: str = "1s") -> None:
    """Make a pod's container end with reason Error, ``exit_code`` and the termination message
    ``message`` (as the launcher of several ranks writes it), then restart (kwok stage ``exit``).
    Only kwoks loaded with this checkout's stages play it (tests/integration/test_ranks_per_pod.py)."""
    annotations = {
        "tpi.dev/fault-exit-code": str(exit_code),
        "tpi.dev/fault-message": message,
        "tpi.dev/fault-restart": "true",
        "tpi.dev/fault-restart-delay": restart_delay,
    }
    kubectl("annotate", "pod", pod, "-n", namespace, "--overwrite", *[f"{k}={v}" for k, v in annotations.items()])
    kubectl("annotate", "pod", pod, "-n", namespace, "--overwrite", "tpi.dev/fault=exit")  # last: it plays


def pod_json(namespace: str, pod: str) -> dict:
    return json.loads(kubectl("get", "pod", pod, "-n", namespace, "-o", "json"))


@pytest.fixture()
def faults() -> object:
    """The fault helpers, as a fixture for tests that prefer injection over imports."""

    class Faults:
        inject = staticmethod(inject_fault)
        pod = staticmethod(pod_json)

    return Faults()
