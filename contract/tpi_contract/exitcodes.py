"""Exit codes of the runtime (``python -m tpi_runtime``) and what they mean to the operator."""

from __future__ import annotations

import signal

OK = 0
#: The main loop failed unexpectedly (a bug): a crash like any other.
CRASHED = 1
#: Bad configuration: flags, tensor-parallel size, dtype, lengths or the checkpoint itself. A restart
#: does not help; the operator reports the crash.
BAD_CONFIG = 2
#: A collective failed or timed out (a peer died or hung): the group is broken, every rank must be
#: restarted together.
COLLECTIVE_FAILED = 3
#: A rank of a multi-rank group ran out of GPU memory in the middle of a forward pass: its peers are
#: inside the pass's collectives, so the group cannot resume in-process. The operator treats it like
#: ``OOMKilled``: it halves the effective batch size and recreates the group.
OUT_OF_MEMORY = 4
#: The launcher of a pod running several ranks (``python -m tpi_runtime launch``): the kernel's OOM
#: killer struck inside the container's cgroup (its OOM-kill counter rose), as a one-rank pod whose
#: process the OOM killer took exits (128 + SIGKILL); the container runtime usually reports the
#: container OOMKilled too. The code alone does not tell it from a plain SIGKILL (as for any container): the termination
#: message does (``tpi_contract.termination``).
KERNEL_OOM_KILLED = 137
#: A child killed by signal N (not the OOM killer) makes the launcher exit SIGNAL_BASE + N, what a
#: one-rank pod's container would have shown; the termination message tells which.
SIGNAL_BASE = 128

MEANINGS: dict[int, str] = {
    OK: "stopped after a graceful shutdown",
    CRASHED: "the main loop failed",
    BAD_CONFIG: "bad configuration (flags, tensor-parallel size, checkpoint)",
    COLLECTIVE_FAILED: "a collective failed or timed out",
    OUT_OF_MEMORY: "out of GPU memory in the middle of a forward pass",
}


def describe(code: int) -> str:
    """A short phrase for an exit code, for events and messages."""
    if code in MEANINGS:
        return MEANINGS[code]
    if code > SIGNAL_BASE:
        return f"killed by {signal_name(code - SIGNAL_BASE)}"
    return f"exit code {code}"


def is_out_of_memory(code: int | None) -> bool:
    """Whether the runtime exited because it ran out of GPU memory mid forward pass."""
    return code == OUT_OF_MEMORY


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; ``signal 99`` for a number with no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
