"""Heartbeat: renew this rank's ``coordination.k8s.io/v1`` Lease while the main loop progresses.

A rank stuck inside a collective still has a live process and a live HTTP server, so liveness
probes cannot see it. The operator watches ``spec.renewTime`` instead: this thread only renews
while ``progress()`` (the engine step counter) keeps changing, so a wedged main loop lets the
Lease expire even though the process lives.

The API token is never logged: API errors are reported as status/reason only.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from tpi_contract import defaults, keys

from tpi_runtime.settings import HeartbeatSettings

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = keys.PREFIX
_MAX_ANNOTATION_LEN = 1024  # last-error can be a long traceback message; annotations are not logs


def _now_micro() -> str:
    """RFC 3339 with microseconds, the wire format of a Kubernetes MicroTime."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _describe_api_error(e: BaseException) -> str:
    # ApiException.__str__ includes response headers and body; status and reason are enough and
    # can never contain credentials.
    status = getattr(e, "status", None)
    if status is not None:
        return f"HTTP {status} {getattr(e, 'reason', '')}".strip()
    return f"{type(e).__name__}: {e}"


class LeaseHeartbeat:
    """Renews one Lease every ``interval`` seconds while ``progress()`` keeps changing.

    ``api`` is a ``kubernetes.client.CoordinationV1Api``. ``annotations_fn`` returns the
    ``tpi.dev/*`` annotation values (keys without the prefix are prefixed). ``stall_threshold``
    is how long ``progress()`` may stay unchanged before renewal stops (default:
    ``tpi_contract.defaults.heartbeat_stall_seconds``, three intervals).
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        holder: str,
        interval: float,
        progress: Callable[[], int],
        annotations_fn: Callable[[], dict[str, str]] | None = None,
        stall_threshold: float | None = None,
        lease_duration_seconds: int | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {interval}")
        self.api = api
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.interval = float(interval)
        self.progress = progress
        self.annotations_fn = annotations_fn or (lambda: {})
        self.stall_threshold = (
            float(stall_threshold) if stall_threshold is not None else defaults.heartbeat_stall_seconds(self.interval)
        )
        # Kept for callers; the operator creates the Lease (with the heartbeat timeout as duration).
        self.lease_duration_seconds = lease_duration_seconds or max(1, math.ceil(self.stall_threshold + self.interval))
        # A hung apiserver connection must not wedge the thread past the next few ticks.
        self._timeout = max(2.0, 2 * self.interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_value: int | None = None
        self._last_change = time.monotonic()
        self._stalled = False
        self.renewals = 0  # successful renewals, for tests and debugging
        self.errors = 0

    # -- state ---------------------------------------------------------------------------------
    @property
    def stalled(self) -> bool:
        return self._stalled

    def _check_progress(self) -> bool:
        """True while the main loop advanced within the stall threshold."""
        now = time.monotonic()
        try:
            value = self.progress()
        except Exception:
            log.warning("heartbeat progress() failed; treating as no progress", exc_info=True)
            value = self._last_value
        if value != self._last_value:
            self._last_value = value
            self._last_change = now
        stalled = now - self._last_change > self.stall_threshold
        if stalled != self._stalled:
            if stalled:
                log.warning(
                    "main loop made no progress for %.1fs (step %s); no longer renewing Lease %s/%s",
                    now - self._last_change,
                    value,
                    self.namespace,
                    self.name,
                )
            else:
                log.info(
                    "main loop progressing again (step %s); renewing Lease %s/%s",
                    value,
                    self.namespace,
                    self.name,
                )
            self._stalled = stalled
        return not stalled

    def _annotations(self) -> dict[str, str]:
        try:
            raw = self.annotations_fn()
        except Exception:
            log.warning("heartbeat annotations_fn() failed", exc_info=True)
            return {}
        out = {}
        for k, v in raw.items():
            key = k if "/" in k else ANNOTATION_PREFIX + k
            out[key] = ("" if v is None else str(v))[:_MAX_ANNOTATION_LEN]
        return out

    # -- API -----------------------------------------------------------------------------------
    def renew_once(self) -> None:
        """One renewal: merge-patch holder/renewTime/annotations of the Lease the operator created.

        A missing Lease (404) is an error, retried next interval: the rank never creates it (its
        Role has no ``create``, and may only touch its own cluster's Leases by name).
        """
        patch = {
            "metadata": {"annotations": self._annotations()},
            "spec": {"holderIdentity": self.holder, "renewTime": _now_micro()},
        }
        self.api.patch_namespaced_lease(self.name, self.namespace, patch, _request_timeout=self._timeout)

    def tick(self) -> bool:
        """Check progress and renew if progressing. Returns True when a renewal succeeded."""
        if not self._check_progress():
            return False
        try:
            self.renew_once()
        except Exception as e:  # never let the API kill the rank; retry next interval
            self.errors += 1
            log.warning("Lease %s/%s renewal failed: %s", self.namespace, self.name, _describe_api_error(e))
            return False
        self.renewals += 1
        return True

    # -- thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        self._last_change = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> LeaseHeartbeat:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"lease-heartbeat-{self.name}", daemon=True)
        self._thread.start()
        log.info(
            "Lease heartbeat started: %s/%s every %.1fs (stall after %.1fs)",
            self.namespace,
            self.name,
            self.interval,
            self.stall_threshold,
        )
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def make_coordination_api(kubeconfig: str | None = None) -> Any:
    """A CoordinationV1Api from ``kubeconfig``, else from the in-cluster service account."""
    from kubernetes import client, config

    if kubeconfig:
        api_client = config.new_client_from_config(config_file=kubeconfig)
    else:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        api_client = client.ApiClient(configuration=cfg)
    return client.CoordinationV1Api(api_client)


def heartbeat_from_settings(
    settings: HeartbeatSettings | None,
    progress: Callable[[], int],
    annotations_fn: Callable[[], dict[str, str]] | None = None,
) -> LeaseHeartbeat | None:
    """Build (not start) the heartbeat ``settings`` describe (``HeartbeatSettings.from_env``);
    None when it is off."""
    if settings is None:
        return None
    api = make_coordination_api(settings.kubeconfig)
    return LeaseHeartbeat(
        api,
        settings.namespace,
        settings.lease_name,
        settings.pod_name,
        settings.interval,
        progress,
        annotations_fn,
        stall_threshold=settings.stall_seconds,
    )
