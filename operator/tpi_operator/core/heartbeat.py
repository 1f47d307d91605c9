"""Heartbeat clocks: when did the operator itself last see each rank's Lease renewed?  Pure.

A Lease's ``renewTime`` is written with the node's clock, so comparing it with the operator's
clock lets clock skew fake (or hide) a hang, and a Lease left over from the previous pod of the
same name makes a fresh pod look hung or makes the next deadline already past (a reconcile
spin).  Instead the operator remembers, per Lease, the pod it belongs to and the operator time at
which ``renewTime`` last *changed*; only that time is compared with the operator's ``now``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tpi_operator.core.observe import LeaseObs, PodObs

#: Container start times have whole seconds: a renewal counts as this container's on first sight
#: only when it is this much later than the (truncated) start (both times are the node's clock).
CLOCK_SLACK = dt.timedelta(seconds=1)


@dataclass(frozen=True)
class Seen:
    """What the operator last saw of one Lease."""

    pod_uid: str
    renew_time: dt.datetime | None
    since: dt.datetime | None  # operator time of the last renewTime change for this pod


def _renewed_by(pod: PodObs, lease: LeaseObs) -> bool:
    """On the operator's first sight of a Lease: was this renewTime written by the pod's container?"""
    if lease.renew_time is None or pod.started_at is None:
        return False
    return lease.renew_time > pod.started_at + CLOCK_SLACK


def track(
    prev: Mapping[str, Seen], pods: Iterable[PodObs], leases: Mapping[str, LeaseObs], now: dt.datetime
) -> dict[str, Seen]:
    """The next memory of Leases, from the previous one and what is observed now."""
    # Lease -> the rank (pod, local rank) that renews it: ranks.lease_name, the pod's name with
    # one rank per pod.
    uids = {p.lease_name: p for p in pods if not p.deleting}
    out: dict[str, Seen] = {}
    for name, lease in leases.items():
        pod, old = uids.get(name), prev.get(name)
        if pod is None:
            if old is not None:
                out[name] = old  # between incarnations: keep what the old pod's Lease said
            continue
        seen_at = lease.observed_at or now
        if old is None:
            # First sight (the operator restarted): the Lease counts, from now, only if this pod's
            # own container wrote it; a leftover from the previous pod does not.
            since = now if _renewed_by(pod, lease) else None
        elif old.pod_uid != pod.uid:
            since = None  # a new pod: nothing counts until the operator sees its Lease renewed
        elif lease.renew_time != old.renew_time:
            since = seen_at
        else:
            since = old.since
        out[name] = Seen(pod.uid, lease.renew_time, since)
    return out


def with_since(leases: Mapping[str, LeaseObs], seen: Mapping[str, Seen]) -> dict[str, LeaseObs]:
    """The Leases with ``since`` filled from the tracker."""
    return {
        name: dataclasses.replace(lease, since=seen[name].since if name in seen else None)
        for name, lease in leases.items()
    }
