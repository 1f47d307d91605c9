"""Rollouts: what a failing new template looks like, and whether a rollout still makes progress.  Pure.

A rollout is the set of templates the groups should run (one hash per group, ``Observation.hash_for``
at the group's size and batch).  It is *halted* at the group that runs the new template and shows
why it cannot work (``template_problem``: an image that cannot be pulled, a missing Secret, a
crash loop), and *past its deadline* when no further group became Ready on its wanted template for
``updateStrategy.progressDeadlineSeconds`` (``track`` keeps that clock in status).  Either way the
remaining groups keep their old template: they serve, and are healed in place.
"""

from __future__ import annotations

import datetime as dt

from tpi_operator.api.v1alpha1 import RolloutStatus
from tpi_operator.core import render
from tpi_operator.core.observe import PodObs, format_time, parse_time

#: Container waiting reasons that say the pod's template cannot start: retrying (the kubelet does)
#: or recreating cannot help, and neither can a smaller tensor-parallel size.
TEMPLATE_ERRORS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)
#: How much of the kubelet's message a condition quotes.
MESSAGE_CHARS = 256


def key_of(want: dict[int, str]) -> str:
    """One digest for the templates every group should run: a change is a new rollout."""
    return render.content_hash(sorted(want.items()), length=12)


def pod_problem(p: PodObs) -> tuple[str, str] | None:
    """(reason, what) when a rank pod shows that its template cannot run; None otherwise."""
    if p.waiting_reason in TEMPLATE_ERRORS:
        detail = f": {p.waiting_message[:MESSAGE_CHARS]}" if p.waiting_message else ""
        return p.waiting_reason, f"pod {p.name}: {p.waiting_reason}{detail}"
    if p.crashed:
        code = f", last exit code {p.exit_code}" if p.exit_code is not None else ""
        why = p.termination_reason or p.phase
        return "CrashLoopBackOff", f"pod {p.name}: CrashLoopBackOff ({why}{code}, {p.restarts} restarts)"
    return None


def describe(pods: list[PodObs]) -> str:
    """What a group's pods are doing, for a condition message."""
    if not pods:
        return "no rank pods"
    parts = []
    for p in pods:
        if p.local_rank:  # a pod of several ranks is described once
            continue
        state = p.waiting_reason or ("SchedulingGated" if p.scheduling_gates else p.phase)
        parts.append(f"{p.name} {state}{'' if p.ready else ' (not Ready)'}")
    return ", ".join(parts)


def track(
    prev: RolloutStatus | None,
    key: str,
    updated_ready: int,
    complete: bool,
    now: dt.datetime,
    queued: bool = False,
) -> RolloutStatus | None:
    """The rollout's progress clock: restarted by a new rollout or by one more group Ready on it.

    ``queued``: a group on its new template waits behind scheduling gates (Kueue has not admitted
    it): the clock stops (no record), and starts afresh once the queue lets the pods go, so the
    deadline counts the time the template had to become Ready, never the time in a queue."""
    if complete or queued:
        return None
    if prev is None or prev.key != key or updated_ready > prev.updated_ready:
        return RolloutStatus(key=key, progress_at=format_time(now, micro=True), updated_ready=updated_ready)
    return prev


def deadline(rec: RolloutStatus | None, seconds: int) -> dt.datetime | None:
    """When the rollout in flight runs out of time (None: none in flight)."""
    since = parse_time(rec.progress_at) if rec is not None else None
    return since + dt.timedelta(seconds=seconds) if since is not None else None
