"""The termination message of a pod running several ranks: which local rank ended it, and why.  Pure.

``python -m tpi_runtime launch`` writes it to the container's termination message file
(Kubernetes' ``terminationMessagePath``, ``/dev/termination-log``); the kubelet puts it in
``status.containerStatuses[].state.terminated.message``, where the operator reads it back with
``parse`` to name the rank in per-rank status. The first line is the cause, in one fixed form a
person reads as a sentence; later lines add the other local ranks' ends. Example (the first
line is one line)::

    local rank 1 (rank 3) exited 137: OOMKilled: the kernel's OOM killer struck in this container's
    cgroup (oom_kill 0 -> 1)
    local rank 0 (rank 2) exited 143 after the launcher stopped it: killed by SIGTERM
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tpi_contract import exitcodes

#: Kubernetes keeps at most this many bytes of a termination message.
MAX_BYTES = 4096
#: Where Kubernetes looks for it unless the container says otherwise.
DEFAULT_PATH = "/dev/termination-log"
#: A cause's meaning starts with this when the kernel's OOM killer struck (the container's reason).
OOM_KILLED = "OOMKilled"

_STOPPED = " after the launcher stopped it"
_CAUSE = re.compile(rf"local rank (\d+) \(rank (\d+)\) exited (\d+)({re.escape(_STOPPED)})?: (.*)")


@dataclass(frozen=True)
class RankEnd:
    """How one local rank ended."""

    local_rank: int
    rank: int
    #: The shell's convention: the process's own exit code, or 128 + N when signal N killed it.
    exit_code: int
    #: The kernel's OOM killer struck in the container while this rank ended (the cause only).
    oom_killed: bool = False
    #: The launcher had signalled it (it was stopped, not a cause).
    stopped: bool = False
    #: Extra words for the reader (the cgroup counter's values).
    detail: str = ""

    @property
    def meaning(self) -> str:
        if self.oom_killed:
            return f"{OOM_KILLED}: the kernel's OOM killer struck in this container's cgroup" + (
                f" ({self.detail})" if self.detail else ""
            )
        return exitcodes.describe(self.exit_code) + (f" ({self.detail})" if self.detail else "")

    def line(self) -> str:
        stopped = _STOPPED if self.stopped else ""
        return f"local rank {self.local_rank} (rank {self.rank}) exited {self.exit_code}{stopped}: {self.meaning}"


def message(cause: RankEnd | None, others: list[RankEnd], summary: str = "") -> str:
    """The termination message: the cause first (or ``summary`` when no rank caused the end, as
    after a graceful stop), then the other ranks; cut to ``MAX_BYTES``."""
    lines = [cause.line() if cause is not None else summary, *(o.line() for o in others)]
    text = "\n".join(line for line in lines if line)
    raw = text.encode()
    return text if len(raw) <= MAX_BYTES else raw[:MAX_BYTES].decode(errors="ignore")


def parse(text: str | None) -> RankEnd | None:
    """The cause named by a termination message, or None (a graceful stop, another writer)."""
    first = (text or "").split("\n", 1)[0]
    m = _CAUSE.fullmatch(first)
    if m is None:
        return None
    return RankEnd(
        local_rank=int(m.group(1)),
        rank=int(m.group(2)),
        exit_code=int(m.group(3)),
        oom_killed=m.group(5).startswith(OOM_KILLED + ":"),
        stopped=m.group(4) is not None,
    )
