"""A rank whose peer dies or hangs must exit non-zero within the collective timeout, naming the
collective that failed (real gloo processes, real SIGKILL / SIGSTOP)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest
from tpi_runtime.dist import EXIT_COLLECTIVE_FAILED

from .conftest import spawn_ranks, worker_argv

TIMEOUT_S = 10


def wait_for_line(p: subprocess.Popen[str], prefix: str, within: float) -> None:
    assert p.stdout is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 0.5)
        if ready:
            line = p.stdout.readline()
            if line.startswith(prefix):
                return
            if not line and p.poll() is not None:
                break
    raise AssertionError(
        f"no {prefix!r} line within {within}s (exit {p.poll()}): {p.stderr.read() if p.stderr else ''}"
    )


def drain_and_wait(p: subprocess.Popen[str], within: float) -> tuple[int, float, str]:
    """(exit code, seconds until exit, stderr); SIGKILLs and fails if it does not exit in time."""
    t0 = time.monotonic()
    try:
        _, err = p.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        raise AssertionError(f"rank did not exit within {within}s:\n{err[-3000:]}") from None
    return p.returncode, time.monotonic() - t0, err


def _cleanup(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.communicate()


@pytest.mark.parametrize(("victim", "transport"), [(1, "shm"), (0, "shm"), (1, "gloo")])
def test_surviving_rank_exits_when_peer_is_killed_mid_request(ckpt_main: str, victim: int, transport: str) -> None:
    env = {"T_DIST_TIMEOUT": str(TIMEOUT_S), "TPI_SHM_COLLECTIVES": "0" if transport == "gloo" else "1"}
    procs = spawn_ranks(2, worker_argv("stream", ckpt_main), env)
    try:
        wait_for_line(procs[0], "TOKEN", within=120)  # rank 0 is streaming tokens: mid-request
        procs[victim].kill()
        survivor = procs[1 - victim]
        code, took, err = drain_and_wait(survivor, within=TIMEOUT_S + 10)
        assert code == EXIT_COLLECTIVE_FAILED, err[-3000:]
        assert took <= TIMEOUT_S + 6
        assert "collective " in err and " failed" in err
        assert any(f"collective {kind}/" in err for kind in ("broadcast", "all_reduce", "all_gather")), err[-2000:]
    finally:
        _cleanup(procs)


def test_surviving_rank_exits_when_peer_hangs(ckpt_main: str) -> None:
    procs = spawn_ranks(2, worker_argv("stream", ckpt_main), {"T_DIST_TIMEOUT": str(TIMEOUT_S)})
    try:
        wait_for_line(procs[0], "TOKEN", within=120)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive but making no progress
        t0 = time.monotonic()
        code, _, err = drain_and_wait(procs[0], within=TIMEOUT_S + 15)
        took = time.monotonic() - t0
        assert code == EXIT_COLLECTIVE_FAILED, err[-3000:]
        assert TIMEOUT_S - 2 <= took <= TIMEOUT_S + 8, f"exited after {took:.1f}s"
        assert "collective " in err and " failed" in err
    finally:
        _cleanup(procs)


def test_rank_0_sizing_the_shm_file_keeps_what_a_faster_peer_wrote() -> None:
    """A peer may map rank 0's file (torch.from_file extends it) and write its pid before rank 0
    sizes it: rank 0 must not empty the file under that mapping (it lost the pid, and a peer
    touching the mapping meanwhile died of SIGBUS: a rare CI failure of a 4-rank test)."""
    from tpi_runtime.shm import ShmTransport

    path = ShmTransport.new_path()
    open(path, "wb").close()  # what rank 0 creates before it broadcasts the path
    try:
        peer = ShmTransport(path, rank=1, world=2, slot_bytes=4096, timeout_s=5, create=False)
        ShmTransport(path, rank=0, world=2, slot_bytes=4096, timeout_s=5, create=True)
        assert int(peer.pids[1]) == os.getpid()
    finally:
        os.unlink(path)
