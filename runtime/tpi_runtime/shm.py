"""Shared-memory collectives for CPU ranks on one host.

gloo routes even a 3 KB all-reduce through loopback TCP and an epoll wakeup (~0.1 ms idle, ~2 ms
on a busy 2-core box), and a decode step issues ~2 per layer. Ranks on the same host instead
exchange through one /dev/shm mapping:

    slot[buf][rank] <- my tensor;  flag[rank] = seq;  wait until every flag >= seq;  read all slots

with two buffers alternating by sequence number: a rank can only be writing buffer `seq % 2` once
every peer has posted `seq - 1`, i.e. finished reading that buffer's previous use, so one wait per
collective suffices. Every rank reduces the slots in rank order, so results are bitwise identical
on all ranks. Relies on x86-64 store ordering (data stores become visible before the flag store).

A peer that dies is noticed within ~0.1 s (its pid is gone); one that hangs, at the timeout.
"""

from __future__ import annotations

import os
import platform
import time
import uuid

import torch

_ALIGN = 64


class PeerFailure(RuntimeError):
    pass


class ShmTransport:
    def __init__(
        self, path: str, rank: int, world: int, slot_bytes: int, timeout_s: float, create: bool
    ) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.slot_bytes = slot_bytes
        header = _ALIGN * (2 * world)  # flags (int64, one cache line each) then pids
        total = header + 2 * world * slot_bytes
        if create:
            with open(path, "wb") as f:
                f.truncate(total)
        mem = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        self._mem = mem
        lines = mem[:header].view(torch.int64).view(2 * world, _ALIGN // 8)
        self.flags = lines[:world, 0]
        self.pids = lines[world:, 0]
        self.data = mem[header:].view(2, world, slot_bytes)
        self.seq = 0
        self.pids[rank] = os.getpid()

    @classmethod
    def supported(cls) -> bool:
        return platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")

    @staticmethod
    def new_path() -> str:
        return f"/dev/shm/tpi-collectives-{uuid.uuid4().hex}"

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes

    def _exchange(self, t: torch.Tensor | None, nbytes: int) -> torch.Tensor:
        """Post `t` (None: post nothing), wait for every rank; returns the [world, nbytes] slots."""
        self.seq += 1
        buf = self.data[self.seq % 2]
        if t is not None:
            buf[self.rank, :nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
        self.flags[self.rank] = self.seq
        self._wait()
        return buf[:, :nbytes]

    def _wait(self) -> None:
        seq = self.seq
        if int(self.flags.min()) >= seq:
            return
        start = time.monotonic()
        next_check = start + 0.1
        spins = 0
        while int(self.flags.min()) < seq:
            spins += 1
            if spins < 2000:
                os.sched_yield()  # peers are usually microseconds away
                continue
            time.sleep(0.0002 if spins < 20000 else 0.002)  # idle waits must not burn a core
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.1
                late = [r for r in range(self.world) if int(self.flags[r]) < seq]
                for r in late:
                    pid = int(self.pids[r])
                    if pid > 0 and not _alive(pid):
                        raise PeerFailure(f"peer rank {r} (pid {pid}) exited")
                if now - start > self.timeout_s:
                    raise PeerFailure(f"peer ranks {late} did not arrive within {self.timeout_s:.0f}s")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        slots = self._exchange(t, nbytes)
        parts = [slots[r].view(t.dtype).view(t.shape) for r in range(self.world)]
        t.copy_(parts[0])
        for p in parts[1:]:
            t.add_(p)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        nbytes = t.numel() * t.element_size()
        slots = self._exchange(t, nbytes)
        return [slots[r].view(t.dtype).view(t.shape) for r in range(self.world)]

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        slots = self._exchange(t if self.rank == src else None, nbytes)
        if self.rank != src:
            t.view(-1).view(torch.uint8).copy_(slots[src])
        return t


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
