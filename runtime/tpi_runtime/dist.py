"""Process group setup and failure-aware collectives.

Joining the group (`Dist.form`) waits without a deadline until every rank is there
(`tpi_runtime.rendezvous`); only then does the collective timeout apply.

Every collective the runtime issues goes through `Dist`, which
- names the collective, so a failure says which one broke ("collective all_reduce/o_proj failed"),
- turns a backend error (peer died: gloo "Connection closed by peer"; timeout) into a logged
  message and `os._exit(EXIT_COLLECTIVE_FAILED)`: a rank whose group is broken must die so the
  pod restarts, not sit in a half-dead state,
- arms a watchdog thread that kills the process if one collective runs past the timeout, as a
  backstop for backends whose own timeout does not fire (a hung NCCL kernel).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from tpi_contract import exitcodes

from .rendezvous import Aborted, rendezvous
from .settings import DistEnv
from .shm import ShmTransport, pid_alive

__all__ = ["EXIT_COLLECTIVE_FAILED", "Dist", "DistEnv", "die"]

log = logging.getLogger("tpi_runtime.dist")

EXIT_COLLECTIVE_FAILED = exitcodes.COLLECTIVE_FAILED
# Extra slack before the watchdog fires, so the backend's own timeout normally reports first.
WATCHDOG_GRACE_S = 5.0
# Per-rank slot of the shared-memory transport; bigger tensors (long prefills) go through gloo.
SHM_SLOT_BYTES = 4 << 20


def die(msg: str, exit_code: int = EXIT_COLLECTIVE_FAILED) -> None:
    """Log `msg` and end the process now (no cleanup: a broken group's collectives could hang it)."""
    log.critical(msg)
    # Also straight to stderr: logging may be unconfigured or buffered in a dying process.
    print(f"tpi_runtime: {msg}", file=sys.stderr, flush=True)
    os._exit(exit_code)


class Dist:
    """Collectives for one tensor-parallel group (a no-op shell when world_size == 1)."""

    def __init__(
        self,
        env: DistEnv,
        backend: str = "auto",
        timeout_s: float = 120.0,
        device: torch.device | None = None,
        shm: bool = True,
        force_group: bool = False,
        form: bool = True,
    ) -> None:
        """``shm``: small collectives between ranks of one host (gloo on CPU) use shared memory.
        ``form=False``: join the group later with ``form()`` (the engine loads weights first)."""
        self.rank = env.rank
        self.world_size = env.world_size
        self.timeout_s = float(timeout_s)
        self.device = device or torch.device("cpu")
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"unknown backend {backend!r} (auto, nccl, gloo)")
        self.backend = backend
        # (name, start) of the collective in flight, or None; one attribute, so the watchdog reads it
        # without a lock (a collective takes microseconds; a lock round trip would be a real share).
        self._op: tuple[str, float] | None = None
        self.collectives = 0
        self.shm: ShmTransport | None = None
        # force_group: a real process group even for one rank, so the GPU tier and bench can check
        # NCCL initialisation and run the TP=1 model's collectives through it.
        self.grouped = self.world_size > 1 or force_group
        self.env = env
        self._shm_wanted = shm
        self.store: dist.Store | None = None
        if self.grouped and form:
            self.form()

    def form(self, stop: threading.Event | None = None, on_wait: Callable[[list[int]], None] | None = None) -> None:
        """Join the process group: wait without a deadline until every rank is there (see
        ``tpi_runtime.rendezvous``), then form it with the collective timeout, which therefore
        starts only once every rank runs. Raises ``rendezvous.Aborted`` when ``stop`` is set
        while waiting; a failure once every rank is there exits ``EXIT_COLLECTIVE_FAILED``."""
        if not self.grouped or dist.is_initialized():
            return
        env = self.env
        log.info(
            "rank %d/%d joining process group at %s:%d (backend=%s, timeout=%.0fs once every rank is there)",
            env.rank,
            env.world_size,
            env.master_addr,
            env.master_port,
            self.backend,
            self.timeout_s,
        )
        t0 = time.monotonic()
        try:
            self.store = rendezvous(env, self.timeout_s, stop=stop, on_wait=on_wait)
        except Aborted:
            raise
        except Exception as e:  # rank 0 cannot listen on MASTER_PORT
            die(f"collective rendezvous failed after {time.monotonic() - t0:.1f}s: {e}")
        t1 = time.monotonic()
        try:
            dist.init_process_group(
                backend=self.backend,
                store=self.store,
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(seconds=self.timeout_s),
                device_id=self.device if self.backend == "nccl" else None,
            )
        except Exception as e:  # a peer left between the rendezvous and the handshake
            die(f"collective init_process_group failed after {time.monotonic() - t1:.1f}s: {e}")
        log.info("process group formed in %.2fs (%.1fs waiting for the ranks)", time.monotonic() - t0, t1 - t0)
        threading.Thread(target=self._watchdog, name="tpi-collective-watchdog", daemon=True).start()
        if self.backend == "gloo" and self.device.type == "cpu" and self._shm_wanted:
            self._setup_shm()
        self.collectives = 0  # count model/engine collectives only, not the setup handshakes

    def _setup_shm(self) -> None:
        """Switch small collectives to shared memory when every rank can map rank 0's file."""
        path = [ShmTransport.new_path() if self.rank == 0 else ""]
        ok = ShmTransport.supported()
        if self.rank == 0 and ok:
            open(path[0], "wb").close()
        self._run("broadcast/shm_path", dist.broadcast_object_list, path, src=0)
        transport = None
        try:
            ok = ok and os.path.exists(path[0])  # same host and same /dev/shm (not separate pods)
            if ok:
                transport = ShmTransport(
                    path[0], self.rank, self.world_size, SHM_SLOT_BYTES, self.timeout_s, create=self.rank == 0
                )
        except Exception as e:
            log.info("shared-memory collectives unavailable: %s", e)
            ok = False
        flag = torch.tensor([int(ok)])
        self._run("all_reduce/shm_probe", dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        if flag.item() and transport is not None:
            # Peers' pids must be visible for fast death detection (same pid namespace).
            pids_ok = all(pid_alive(int(p)) for p in transport.pids.tolist())
            flag = torch.tensor([int(pids_ok)])
            self._run("all_reduce/shm_probe", dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        if self.rank == 0 and path[0]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path[0])  # every rank has it mapped (or gave up): nothing leaks on a crash
        if flag.item() and transport is not None:
            self.shm = transport
            log.info("same-host ranks: small collectives use shared memory (%d KiB slots)", SHM_SLOT_BYTES >> 10)

    # --- watchdog ---------------------------------------------------------------------------
    def _watchdog(self) -> None:
        limit = self.timeout_s + WATCHDOG_GRACE_S
        while True:
            time.sleep(min(1.0, limit / 4))
            current = self._op
            if current is None:
                continue
            op, started = current
            if time.monotonic() - started > limit:
                die(
                    f"collective {op} failed: no progress for {time.monotonic() - started:.1f}s "
                    f"(timeout {self.timeout_s:.0f}s); a peer rank is dead or hung"
                )

    def _run(self, name: str, fn, *a, **kw):  # type: ignore[no-untyped-def]
        self._op = (name, time.monotonic())
        try:
            out = fn(*a, **kw)
        except Exception as e:  # DistBackendError / RuntimeError from gloo or NCCL
            die(f"collective {name} failed: {type(e).__name__}: {e}")
        finally:
            self._op = None
        self.collectives += 1
        return out

    # --- collectives ------------------------------------------------------------------------
    def _use_shm(self, t: torch.Tensor) -> bool:
        return self.shm is not None and self.shm.fits(t.numel() * t.element_size())

    def all_reduce(
        self, t: torch.Tensor, name: str = "all_reduce", op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> torch.Tensor:
        if self.grouped:
            if op == dist.ReduceOp.SUM and self._use_shm(t):
                self._run(f"all_reduce/{name}", self.shm.all_reduce, t)  # type: ignore[union-attr]
            else:
                self._run(f"all_reduce/{name}", dist.all_reduce, t, op=op)
        return t

    def all_gather(self, t: torch.Tensor, name: str = "all_gather") -> torch.Tensor:
        """Concatenate each rank's `t` along the last dimension (rank order)."""
        if not self.grouped:
            return t
        t = t.contiguous()
        if self._use_shm(t):
            parts = self._run(f"all_gather/{name}", self.shm.all_gather, t)  # type: ignore[union-attr]
        elif self.backend == "nccl":
            out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=t.device)
            self._run(f"all_gather/{name}", dist.all_gather_into_tensor, out, t)
            parts = list(out.unbind(0))
        else:  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            self._run(f"all_gather/{name}", dist.all_gather, parts, t)
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor, src: int = 0, name: str = "broadcast") -> torch.Tensor:
        if self.grouped:
            if self._use_shm(t):
                self._run(f"broadcast/{name}", self.shm.broadcast, t, src)  # type: ignore[union-attr]
            else:
                self._run(f"broadcast/{name}", dist.broadcast, t, src=src)
        return t

    def barrier(self, name: str = "barrier") -> None:
        if self.grouped:
            # An all_reduce rather than dist.barrier(): NCCL barrier needs a device guess.
            self.all_reduce(torch.zeros(1, device=self.device), name=name)

    def close(self) -> None:
        if self.grouped and dist.is_initialized():
            dist.destroy_process_group()
