"""The runtime's Lease heartbeat against the real local kube-apiserver (hack/cluster.sh).

What the operator relies on: ``spec.renewTime`` moves while the rank's main loop makes progress
and stops moving once the loop is stuck, even though the process (and this thread) lives on.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from tpi_operator.core import render
from tpi_runtime.heartbeat import LeaseHeartbeat, heartbeat_from_settings
from tpi_runtime.settings import HeartbeatSettings
from tpikit.kube import wait_until

pytestmark = pytest.mark.integration

INTERVAL = 0.4
STALL = 1.2  # three intervals


class Counter:
    """A main-loop step counter that advances on every read while ``running`` is set."""

    def __init__(self) -> None:
        self.value = 0
        self.running = threading.Event()
        self.running.set()

    def __call__(self) -> int:
        if self.running.is_set():
            self.value += 1
        return self.value


def _read(coord: client.CoordinationV1Api, namespace: str, name: str) -> Any | None:
    try:
        return coord.read_namespaced_lease(name, namespace)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def _renew_time(coord: client.CoordinationV1Api, namespace: str, name: str) -> dt.datetime | None:
    lease = _read(coord, namespace, name)
    return None if lease is None or lease.spec.renew_time is None else lease.spec.renew_time


def _create_lease(coord: client.CoordinationV1Api, namespace: str, name: str) -> None:
    """What the operator does for every rank before it starts: the rank itself never creates it."""
    coord.create_namespaced_lease(
        namespace,
        client.V1Lease(metadata=client.V1ObjectMeta(name=name), spec=client.V1LeaseSpec(lease_duration_seconds=30)),
    )


def _wait_renewals(coord: client.CoordinationV1Api, namespace: str, name: str, n: int) -> list[dt.datetime]:
    """Wait until renewTime has taken ``n`` distinct values; returns them in order."""
    seen: list[dt.datetime] = []

    def moved() -> bool:
        t = _renew_time(coord, namespace, name)
        if t is not None and (not seen or t != seen[-1]):
            seen.append(t)
        return len(seen) >= n

    wait_until(moved, timeout=20, interval=INTERVAL / 4, what=f"{n} distinct renewTimes of Lease {name}")
    return seen


def test_renews_while_progressing_and_stops_when_stalled(api_client: client.ApiClient, namespace: str) -> None:
    coord = client.CoordinationV1Api(api_client)
    steps = Counter()
    hb = LeaseHeartbeat(
        coord,
        namespace,
        "rank-0",
        holder="tpi-demo-0",
        interval=INTERVAL,
        progress=steps,
        annotations_fn=lambda: {
            "rank": "0",
            "step": str(steps.value),
            "last-error": "",
            "oom-count": "2",
            "live-batch-size": "4",
        },
        stall_threshold=STALL,
    )
    assert _read(coord, namespace, "rank-0") is None, "the Lease must not exist before the heartbeat runs"
    hb.start()
    try:
        # A missing Lease is retried, never created by the rank (the operator creates it)...
        wait_until(lambda: hb.errors >= 2, timeout=10, what="renewals of a missing Lease to be retried")
        assert _read(coord, namespace, "rank-0") is None, "the rank created its own Lease"
        # ...and once it exists, renewed.
        _create_lease(coord, namespace, "rank-0")
        errors = hb.errors
        times = _wait_renewals(coord, namespace, "rank-0", 3)
        assert times == sorted(times)
        lease = _read(coord, namespace, "rank-0")
        assert lease.spec.holder_identity == "tpi-demo-0"
        assert lease.spec.lease_duration_seconds and lease.spec.lease_duration_seconds >= 1
        ann = lease.metadata.annotations
        assert ann["tpi.dev/rank"] == "0"
        assert int(ann["tpi.dev/step"]) > 0
        assert ann["tpi.dev/oom-count"] == "2"
        assert ann["tpi.dev/live-batch-size"] == "4"
        assert ann["tpi.dev/last-error"] == ""
        # renewTime is fresh: within a few intervals of now (apiserver and test share a clock).
        age = (dt.datetime.now(dt.UTC) - _renew_time(coord, namespace, "rank-0")).total_seconds()
        assert age < 5 * INTERVAL, f"renewTime is {age:.2f}s old"

        # Freeze the main loop (as if stuck in a collective): the thread lives, renewals stop.
        steps.running.clear()
        frozen_step = steps.value
        wait_until(
            lambda: hb.stalled,
            timeout=STALL + 4 * INTERVAL,
            interval=INTERVAL / 4,
            what="the heartbeat noticing the stall",
        )
        last = _renew_time(coord, namespace, "rank-0")
        time.sleep(STALL + 3 * INTERVAL)
        assert hb._thread is not None and hb._thread.is_alive(), "the heartbeat thread must keep running"
        assert _renew_time(coord, namespace, "rank-0") == last, "renewTime moved while the main loop was stuck"
        age = (dt.datetime.now(dt.UTC) - last).total_seconds()
        assert age > STALL, f"renewTime should be stale, is only {age:.2f}s old"
        lease = _read(coord, namespace, "rank-0")
        assert lease.metadata.annotations["tpi.dev/step"] == str(frozen_step)

        # The loop recovers: renewals resume.
        steps.running.set()
        resumed = _wait_renewals(coord, namespace, "rank-0", 2)
        assert resumed[-1] > last
        assert not hb.stalled
    finally:
        hb.stop()
    assert hb.errors == errors, f"{hb.errors - errors} API errors during a healthy run"


def test_keeps_operator_created_lease_fields(api_client: client.ApiClient, namespace: str) -> None:
    """The operator creates the Lease with its timeout; renewing must not clobber it or its labels."""
    coord = client.CoordinationV1Api(api_client)
    coord.create_namespaced_lease(
        namespace,
        client.V1Lease(
            metadata=client.V1ObjectMeta(
                name="rank-1",
                labels={"app.kubernetes.io/managed-by": "tpi-operator"},
                annotations={"example.com/keep": "yes"},
            ),
            spec=client.V1LeaseSpec(holder_identity="", lease_duration_seconds=17),
        ),
    )
    steps = Counter()
    hb = LeaseHeartbeat(
        coord,
        namespace,
        "rank-1",
        holder="tpi-demo-1",
        interval=INTERVAL,
        progress=steps,
        annotations_fn=lambda: {"rank": "1", "step": str(steps.value)},
        stall_threshold=STALL,
    )
    hb.start()
    try:
        _wait_renewals(coord, namespace, "rank-1", 2)
    finally:
        hb.stop()
    lease = _read(coord, namespace, "rank-1")
    assert lease.spec.lease_duration_seconds == 17
    assert lease.spec.holder_identity == "tpi-demo-1"
    assert lease.metadata.labels == {"app.kubernetes.io/managed-by": "tpi-operator"}
    assert lease.metadata.annotations["example.com/keep"] == "yes"
    assert lease.metadata.annotations["tpi.dev/rank"] == "1"


def _token_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> None:
    """A kubeconfig that authenticates with a bearer token, like a pod's service account."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    if "certificate-authority" in cluster:
        ca = base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
    else:
        ca = cluster["certificate-authority-data"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [{"name": "c", "cluster": {"server": cluster["server"], "certificate-authority-data": ca}}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
            }
        )
    )


def test_api_errors_are_retried_and_never_log_the_token(
    api_client: client.ApiClient,
    kubeconfig: str,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service account without RBAC gets 403s: logged (without the token) and retried until granted."""
    core = client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="rank"))
    )
    token = core.create_namespaced_service_account_token(
        "rank",
        namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)),
    ).status.token
    assert token and len(token) > 20

    with tempfile.TemporaryDirectory() as tmp:
        kc = Path(tmp) / "kubeconfig"
        _token_kubeconfig(kubeconfig, token, kc)
        steps = Counter()
        env = {
            "TPI_LEASE_NAME": "tpi-demo-0",
            "POD_NAMESPACE": namespace,
            "POD_NAME": "tpi-demo-0",
            "TPI_HEARTBEAT_INTERVAL_SECONDS": str(INTERVAL),
            "KUBECONFIG": str(kc),
        }
        caplog.set_level(logging.DEBUG)
        hb = heartbeat_from_settings(HeartbeatSettings.from_env(env), steps, lambda: {"rank": "0"})
        assert hb is not None and hb.interval == INTERVAL and hb.holder == "tpi-demo-0"
        hb.start()
        try:
            wait_until(lambda: hb.errors >= 3, timeout=20, what="forbidden renewals to be retried")
            assert hb._thread is not None and hb._thread.is_alive()
            assert hb.renewals == 0
            assert _read(client.CoordinationV1Api(api_client), namespace, "tpi-demo-0") is None

            # Grant exactly what the operator's Role grants a rank (its Lease by name, no create),
            # and create the Lease as the operator does.
            (rule,) = next(o for o in render.rbac(render.Identity("demo", namespace, "u"), ["tpi-demo-0"])
                           if o["kind"] == "Role")["rules"]  # fmt: skip
            assert "create" not in rule["verbs"] and rule["resourceNames"] == ["tpi-demo-0"]
            rbac.create_namespaced_role(
                namespace,
                client.V1Role(
                    metadata=client.V1ObjectMeta(name="rank-lease"),
                    rules=[
                        client.V1PolicyRule(
                            api_groups=rule["apiGroups"],
                            resources=rule["resources"],
                            resource_names=rule["resourceNames"],
                            verbs=rule["verbs"],
                        )
                    ],
                ),
            )
            _create_lease(client.CoordinationV1Api(api_client), namespace, "tpi-demo-0")
            rbac.create_namespaced_role_binding(
                namespace,
                client.V1RoleBinding(
                    metadata=client.V1ObjectMeta(name="rank-lease"),
                    role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="rank-lease"),
                    subjects=[client.RbacV1Subject(kind="ServiceAccount", name="rank", namespace=namespace)],
                ),
            )
            _wait_renewals(client.CoordinationV1Api(api_client), namespace, "tpi-demo-0", 2)
            assert hb.renewals >= 2
        finally:
            hb.stop()

    assert any("renewal failed" in r.getMessage() and "403" in r.getMessage() for r in caplog.records), (
        "the 403s should have been logged"
    )
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert token not in logged, "the service-account token was logged"
    assert token[-16:] not in logged


def test_off_outside_kubernetes() -> None:
    assert heartbeat_from_settings(HeartbeatSettings.from_env({}), lambda: 0) is None
    assert heartbeat_from_settings(HeartbeatSettings.from_env({"TPI_LEASE_NAME": ""}), lambda: 0) is None
    # Named but without the downward-API variables: off, not crashing the rank.
    assert heartbeat_from_settings(HeartbeatSettings.from_env({"TPI_LEASE_NAME": "x"}), lambda: 0) is None


def test_real_group_rank_stuck_in_collective_stops_renewing(
    kubeconfig: str, api_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """Two real runtime ranks renew their Leases; freezing rank 0 (SIGSTOP) leaves rank 1's main loop
    blocked in the step broadcast while its process, HTTP server and heartbeat thread live on: rank 1's
    renewTime must stop moving, and move again once the group resumes."""
    from tpi_runtime.testing import make_tiny_checkpoint

    from tests.unit.runtime.test_server import start_group

    coord = client.CoordinationV1Api(api_client)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    interval = 0.5

    def lease_env(rank: int) -> dict[str, str]:
        return {
            "TPI_LEASE_NAME": f"tpi-rank-{rank}",
            "POD_NAME": f"tpi-rank-{rank}",
            "POD_NAMESPACE": namespace,
            "TPI_HEARTBEAT_INTERVAL_SECONDS": str(interval),
            "KUBECONFIG": kubeconfig,
        }

    for rank in (0, 1):
        _create_lease(coord, namespace, f"tpi-rank-{rank}")
    ranks = start_group(ckpt, tmp_path, extra_env=lease_env)
    try:
        for rank in (0, 1):
            _wait_renewals(coord, namespace, f"tpi-rank-{rank}", 3)
            ann = _read(coord, namespace, f"tpi-rank-{rank}").metadata.annotations
            assert ann["tpi.dev/rank"] == str(rank)
            assert int(ann["tpi.dev/step"]) > 0
            assert ann["tpi.dev/live-batch-size"] == "4" and ann["tpi.dev/oom-count"] == "0"

        ranks[0].proc.send_signal(signal.SIGSTOP)
        try:
            stall = 3 * interval
            time.sleep(stall + 2 * interval)  # the stall is noticed within one interval past the threshold
            frozen = _renew_time(coord, namespace, "tpi-rank-1")
            time.sleep(stall + 2 * interval)
            assert _renew_time(coord, namespace, "tpi-rank-1") == frozen, "a stuck rank kept renewing"
            # ...while the process itself is alive and answering: only the Lease can tell.
            assert ranks[1].proc.poll() is None
            assert ranks[1].client.get("/healthz").status_code == 200
        finally:
            ranks[0].proc.send_signal(signal.SIGCONT)
        resumed = _wait_renewals(coord, namespace, "tpi-rank-1", 2)
        assert resumed[-1] > frozen
    finally:
        for srv in ranks:
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
        codes = [srv.stop(sig=None) for srv in ranks]
    assert codes == [0, 0], codes
