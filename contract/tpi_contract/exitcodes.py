"""Exit codes of the runtime (``python -m tpi_runtime``) and what they mean to the operator."""

from __future__ import annotations

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

MEANINGS: dict[int, str] = {
    OK: "stopped after a graceful shutdown",
    CRASHED: "the main loop failed",
    BAD_CONFIG: "bad configuration (flags, tensor-parallel size, checkpoint)",
    COLLECTIVE_FAILED: "a collective failed or timed out",
    OUT_OF_MEMORY: "out of GPU memory in the middle of a forward pass",
}


def describe(code: int) -> str:
    """A short phrase for an exit code, for events and messages."""
    return MEANINGS.get(code, f"exit code {code}")


def is_out_of_memory(code: int | None) -> bool:
    """Whether the runtime exited because it ran out of GPU memory mid forward pass."""
    return code == OUT_OF_MEMORY
