"""How a pod's local ranks ended -> the launcher's exit code and termination message.  Pure.

The launcher (``tpi_runtime.launcher``) records each local rank's end in order; this module
decides what the pod reports:

* a rise of the container cgroup's OOM-kill counter with any failure: ``137``
  (``exitcodes.KERNEL_OOM_KILLED``), the cause being the rank SIGKILL took (the kernel's victim);
* else any rank that exited ``4`` (``exitcodes.OUT_OF_MEMORY``, the runtime's own OOM): ``4``;
* else the first rank that failed on its own, preferring one that did not merely report a failed
  peer (``3``: its peer's end is the cause); a rank killed by signal N gives ``128 + N``;
* no failure: ``0``, unless a rank left (exit 0) while another one had to be stopped: the group
  cannot go on without it, so ``1`` (``exitcodes.CRASHED``).

A rank the launcher had signalled (to drain on SIGTERM, or to stop it after a peer ended) is a
consequence, never a cause, unless no rank ended on its own; a rank that SIGTERM itself killed
during a drain (before the runtime installed its handler) stopped as asked: exit 0.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

from tpi_contract import exitcodes, termination


@dataclass(frozen=True)
class ChildEnd:
    """One local rank's process ended."""

    local_rank: int
    rank: int
    #: ``subprocess``'s convention: the exit code, or -N when signal N killed it.
    returncode: int
    #: The launcher had signalled it before it ended.
    stopped: bool = False

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + N for signal N."""
        return exitcodes.SIGNAL_BASE - self.returncode if self.returncode < 0 else self.returncode

    def end(self, *, oom_killed: bool = False, detail: str = "") -> termination.RankEnd:
        return termination.RankEnd(
            self.local_rank, self.rank, self.exit_code, oom_killed=oom_killed, stopped=self.stopped, detail=detail
        )


@dataclass(frozen=True)
class Outcome:
    code: int
    message: str
    cause: ChildEnd | None


def _failed(e: ChildEnd, draining: bool) -> bool:
    if draining and e.stopped and e.returncode == -signal.SIGTERM:
        return False  # killed by the SIGTERM it was forwarded: what a drain asks for
    return e.returncode != 0


def decide(
    ends: Sequence[ChildEnd], *, draining: bool, oom_before: int | None = None, oom_after: int | None = None
) -> Outcome:
    """The pod's exit code and message from its ranks' ends (in the order they ended), whether
    the launcher was draining (it got SIGTERM), and the OOM-kill counter at start and now."""
    failed = [e for e in ends if _failed(e, draining)]
    if not failed:
        left = [e for e in ends if not e.stopped]
        held = [e for e in ends if e.stopped]
        if left and held and not draining:
            cause = left[0]
            detail = f"it left while local rank(s) {[e.local_rank for e in held]} still ran; they were stopped"
            others = [e.end() for e in ends if e is not cause]
            return Outcome(exitcodes.CRASHED, termination.message(cause.end(detail=detail), others), cause)
        why = "after SIGTERM" if draining else "on their own"
        return Outcome(exitcodes.OK, f"all {len(ends)} local ranks exited 0 {why}", None)

    candidates = [e for e in failed if not e.stopped] or failed
    oom_rose = oom_before is not None and oom_after is not None and oom_after > oom_before
    if oom_rose:
        cause = next((e for e in candidates if e.returncode == -signal.SIGKILL), candidates[0])
        code = exitcodes.KERNEL_OOM_KILLED
        cause_end = cause.end(oom_killed=True, detail=f"oom_kill {oom_before} -> {oom_after}")
    else:
        cause = next((e for e in failed if e.exit_code == exitcodes.OUT_OF_MEMORY), None) or next(
            (e for e in candidates if e.exit_code != exitcodes.COLLECTIVE_FAILED), candidates[0]
        )
        code = cause.exit_code
        cause_end = cause.end()
    others = [e.end() for e in ends if e is not cause]
    return Outcome(code, termination.message(cause_end, others), cause)
