"""Ports and cadences both sides assume."""

from __future__ import annotations

import math

#: Every rank's HTTP port (/healthz, /readyz, /metrics; rank 0 also /v1/completions).
HTTP_PORT = 8000
#: Rank 0's rendezvous port (MASTER_PORT).
RENDEZVOUS_PORT = 29500

#: How often the runtime renews its Lease.
HEARTBEAT_INTERVAL_SECONDS = 2.0
#: Renewals stop once the step counter has stood still this many intervals.
HEARTBEAT_STALL_INTERVALS = 3.0


def heartbeat_stall_seconds(interval: float = HEARTBEAT_INTERVAL_SECONDS) -> float:
    """How long the runtime's step counter may stand still before it stops renewing its Lease.

    A heartbeat timeout must exceed this (plus one interval for the last renewal to land), or a
    slow but healthy step looks like a hang.
    """
    return HEARTBEAT_STALL_INTERVALS * interval


def min_heartbeat_timeout_seconds(interval: float = HEARTBEAT_INTERVAL_SECONDS) -> int:
    """The smallest heartbeat timeout the runtime's cadence allows: stall threshold plus one interval.

    Below it, a healthy rank whose step takes just under the stall threshold looks hung.
    """
    return math.ceil(heartbeat_stall_seconds(interval) + interval)


#: The collective timeout is never shorter than this.
MIN_COLLECTIVE_TIMEOUT_SECONDS = 60


def collective_timeout_seconds(heartbeat_timeout_seconds: int) -> int:
    """``--dist-timeout-seconds`` of a rank pod: a collective stuck for twice the heartbeat timeout
    is a hang (the rank exits 3). It starts only once every rank of the group has joined: the wait
    for missing ranks has no deadline (``tpi_runtime.rendezvous``)."""
    return max(2 * heartbeat_timeout_seconds, MIN_COLLECTIVE_TIMEOUT_SECONDS)


# ---------------------------------------------------------------------- termination timeline
#: The rank pods' default terminationGracePeriodSeconds: long enough for a long streamed answer.
GRACE_SECONDS = 60
#: The preStop delay (a native ``sleep`` action): the pod keeps serving while its endpoint is
#: removed from every Service, so no client is sent to a rank that already refuses requests.
PRESTOP_SECONDS = 5
#: A follower waits this much longer than rank 0's drain before leaving on its own, so it normally
#: leaves on rank 0's shutdown step rather than breaking a group that still runs collectives.
FOLLOWER_EXTRA_SECONDS = 5.0
#: Left unused at the end of the grace period: the operator's reaction to an evicted peer, and the
#: interpreter's exit, happen before the kubelet's SIGKILL.
GRACE_MARGIN_SECONDS = 5
#: The smallest grace period the timeline fits in (preStop, follower extra, margin, 5 s of drain).
MIN_GRACE_SECONDS = PRESTOP_SECONDS + int(FOLLOWER_EXTRA_SECONDS) + GRACE_MARGIN_SECONDS + 5


def drain_seconds(grace_seconds: int) -> int:
    """The runtime's ``--drain-seconds`` for a pod's grace period.

    Timeline from the pod's deletion (t=0): preStop sleep until PRESTOP_SECONDS, SIGTERM, rank 0
    drains in-flight requests for at most this long, its followers leave on its shutdown step (or
    FOLLOWER_EXTRA_SECONDS after it at the latest), and GRACE_MARGIN_SECONDS remain before SIGKILL.
    """
    return max(1, grace_seconds - PRESTOP_SECONDS - int(FOLLOWER_EXTRA_SECONDS) - GRACE_MARGIN_SECONDS)
