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
    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, timeout_s: float, create: bool) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.slot_bytes = slot_bytes
        header = _ALIGN * (2 * world)  # flags (int64, one cache line each) then pids
        total = header + 2 * world * slot_bytes
        if create:
            # Sized without truncating first ("ab", not "wb"): a peer may already have mapped the
            # file (torch.from_file extends it) and written its pid; emptying it under that
            # mapping lost the pid, and a peer touching it meanwhile died of SIGBUS.
            with open(path, "ab") as f:
                f.truncate(total)
        mem = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        self._mem = mem
        lines = mem[:header].view(torch.int64).view(2 * world, _ALIGN // 8)
        self.flags = lines[:world, 0].numpy()  # numpy: a flag read or write is ~0.3 us, a tensor op ~3 us
        self.pids = lines[world:, 0]
        self.data = mem[header:].view(2, world, slot_bytes)
        self.seq = 0
        self.pids[rank] = os.getpid()
        # (buffer, dtype, shape) -> every rank's slot viewed as that tensor. Decode repeats a few
        # shapes thousands of times; building the views is most of a small collective's cost.
        self._views: dict[tuple[int, torch.dtype, torch.Size], list[torch.Tensor]] = {}

    @classmethod
    def supported(cls) -> bool:
        return platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")

    @staticmethod
    def new_path() -> str:
        return f"/dev/shm/tpi-collectives-{uuid.uuid4().hex}"

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes

    def _slots(self, buf: int, t: torch.Tensor) -> list[torch.Tensor]:
        key = (buf, t.dtype, t.shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 512:  # prefill lengths vary; keep the cache bounded
                self._views.clear()
            nbytes = t.numel() * t.element_size()
            views = [self.data[buf, r, :nbytes].view(t.dtype).view(t.shape) for r in range(self.world)]
            self._views[key] = views
        return views

    def _exchange(self, t: torch.Tensor, post: bool = True) -> list[torch.Tensor]:
        """Post `t` (unless `post` is False), wait for every rank; returns every rank's slot as a
        tensor shaped like `t`."""
        self.seq += 1
        slots = self._slots(self.seq % 2, t)
        if post:
            slots[self.rank].copy_(t)
        self.flags[self.rank] = self.seq
        self._wait()
        return slots

    def _wait(self) -> None:
        seq = self.seq
        if self.flags.min() >= seq:
            return
        start = time.monotonic()
        next_check = start + 0.1
        spins = 0
        while self.flags.min() < seq:
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
                    if pid > 0 and not pid_alive(pid):
                        raise PeerFailure(f"peer rank {r} (pid {pid}) exited")
                if now - start > self.timeout_s:
                    raise PeerFailure(f"peer ranks {late} did not arrive within {self.timeout_s:.0f}s")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(t)
        t.copy_(parts[0])  # every rank sums in rank order, so every rank gets the same bits
        for p in parts[1:]:
            t.add_(p)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(t)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        parts = self._exchange(t, post=self.rank == src)
        if self.rank != src:
            t.copy_(parts[src])
        return t


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists in this pid namespace (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
