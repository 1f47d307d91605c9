"""tpi_runtime.launch_outcome: how the local ranks' ends make the pod's exit code.  Table-tested."""

from __future__ import annotations

import pytest
from tpi_contract import termination
from tpi_runtime.launch_outcome import ChildEnd, decide

KILL, TERM = -9, -15


def end(local: int, code: int, stopped: bool = False) -> ChildEnd:
    return ChildEnd(local, 10 + local, code, stopped)


@pytest.mark.parametrize(
    ("ends", "draining", "oom", "code", "cause"),
    [
        # every rank left on its own with 0 (generate finished, a remote rank 0 shut the group down)
        ([end(0, 0), end(1, 0)], False, (0, 0), 0, None),
        # a drain: SIGTERM forwarded, every rank exits 0, or dies of that SIGTERM before its handler
        ([end(0, 0, True), end(1, 0, True)], True, (0, 0), 0, None),
        ([end(1, TERM, True), end(0, 0, True)], True, (0, 0), 0, None),
        # a rank fails: its code, whatever the stopped ones did
        ([end(1, 2), end(0, TERM, True)], False, (0, 0), 2, 1),
        ([end(1, 1), end(0, KILL, True)], False, (0, 0), 1, 1),
        # a rank killed by a signal: 128 + N
        ([end(1, KILL), end(0, 0, True)], False, (0, 0), 137, 1),
        ([end(0, -6), end(1, 0, True)], False, (0, 0), 134, 0),
        # the kernel's OOM killer: 137 even when a peer's "collective failed" came first;
        # the SIGKILLed rank is the cause
        ([end(0, 3), end(1, KILL)], False, (4, 5), 137, 1),
        ([end(0, 3), end(1, TERM, True)], False, (4, 5), 137, 0),
        # the counter rose but nothing failed: a helper was killed, the ranks stopped cleanly
        ([end(0, 0, True), end(1, 0, True)], True, (0, 1), 0, None),
        # unknown counter (no cgroup file): no OOM can be claimed
        ([end(1, KILL), end(0, 0, True)], False, (None, None), 137, 1),
        # the runtime's own OOM code (4) wins over a peer's report of the broken collective (3)
        ([end(0, 3), end(1, 4)], False, (0, 0), 4, 1),
        ([end(0, 3), end(1, 4, True)], False, (0, 0), 4, 1),
        # a rank that only reports a failed peer (3) is not the cause when another one failed
        ([end(0, 3), end(1, 1)], False, (0, 0), 1, 1),
        ([end(0, 3), end(1, TERM, True)], False, (0, 0), 3, 0),
        # a failure during a drain still counts
        ([end(0, 0, True), end(1, 3, True)], True, (0, 0), 3, 1),
        # a rank left alone (0) and the others had to be stopped: the group is broken
        ([end(0, 0), end(1, 0, True)], False, (0, 0), 1, 0),
    ],
)
def test_decide(
    ends: list[ChildEnd], draining: bool, oom: tuple[int | None, int | None], code: int, cause: int | None
) -> None:
    out = decide(ends, draining=draining, oom_before=oom[0], oom_after=oom[1])
    assert out.code == code, out.message
    assert (out.cause.local_rank if out.cause else None) == cause, out.message
    parsed = termination.parse(out.message)
    assert (parsed.local_rank if parsed else None) == cause
    if parsed is not None:
        assert parsed.rank == 10 + parsed.local_rank
        assert parsed.oom_killed == (code == 137 and oom[0] is not None and oom[1] != oom[0])
    assert len(out.message.splitlines()) == (len(ends) if cause is not None else 1)


def test_child_exit_codes_follow_the_shell() -> None:
    assert [end(0, c).exit_code for c in (0, 3, KILL, TERM)] == [0, 3, 137, 143]
