"""Rendezvous without a deadline: wait until every rank of the group is there, then form it.

A rank pod can start long before its peers: a peer may be Pending (no capacity yet), pulling a
multi-GB image, or still loading weights. Giving up after a timeout and exiting would make the
operator count a crash loop for what is only a slow start, so the wait has no deadline:

1. rank 0 serves a ``TCPStore`` on ``MASTER_PORT``; every other rank connects to it, retrying
   for as long as it takes (rank 0's pod may not exist yet, so its DNS name may not resolve;
   a plain socket probes first, so the wait does not fill the log with c10d's retry traces);
2. each rank marks itself joined in the store and waits until every rank has, logging
   ``waiting for ranks [...]`` every ``LOG_EVERY_S``;
3. the caller then runs ``init_process_group(store=...)`` with the collective timeout: that
   timeout starts only once every rank runs.

If rank 0 goes away while the others wait (its pod recreated), they reconnect to the new one.
Only a stop request (SIGTERM) ends the wait (``Aborted``). Deciding that a group cannot run
(capacity) is the operator's job (its unschedulable rule), not a timeout's here.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import Callable

from torch.distributed import TCPStore  # type: ignore[attr-defined]  # c10d's, not in the stubs' exports

from .settings import DistEnv

__all__ = ["Aborted", "rendezvous"]

log = logging.getLogger("tpi_runtime.rendezvous")

#: How often a waiting rank says what it waits for.
LOG_EVERY_S = 10.0
#: Pause between two looks at the store (or two connection attempts).
POLL_S = 0.5
#: One TCP probe of rank 0's port.
PROBE_TIMEOUT_S = 2.0


def joined_key(rank: int) -> str:
    return f"tpi/joined/{rank}"


class Aborted(Exception):
    """The rank was asked to stop before its group formed."""


class _Waiter:
    """Paces the wait and its log lines; ``on_wait`` gets the ranks still missing."""

    def __init__(self, env: DistEnv, stop: threading.Event | None, on_wait: Callable[[list[int]], None] | None) -> None:
        self.env, self.stop, self.on_wait = env, stop, on_wait
        self.t0 = time.monotonic()
        self._last_log = -LOG_EVERY_S
        self._last_said: tuple[list[int], str] | None = None

    def tick(self, missing: list[int], why: str) -> None:
        """Report ``missing``, log on news and every ``LOG_EVERY_S``, sleep one poll; raises
        Aborted on a stop request."""
        if self.on_wait is not None:
            self.on_wait(missing)
        now = time.monotonic()
        news = (missing, why.split(":", 1)[0])  # the reason's kind, not every errno text
        if now - self._last_log >= LOG_EVERY_S or news != self._last_said:
            self._last_log, self._last_said = now, news
            log.info(
                "rank %d/%d waiting for ranks %s for %.0fs (%s); no deadline",
                *(self.env.rank, self.env.world_size, missing, now - self.t0, why),
            )
        if self.stop is None:
            time.sleep(POLL_S)
        elif self.stop.wait(POLL_S):
            raise Aborted(f"stopped while waiting for ranks {missing}")


def _first_line(e: BaseException) -> str:
    """c10d errors carry a C++ backtrace after the first line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _reachable(host: str, port: int) -> str | None:
    """None when rank 0's port accepts a TCP connection; else why not (DNS, refused, ...)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


def _connect(env: DistEnv, timeout_s: float, waiter: _Waiter) -> TCPStore:
    timeout = dt.timedelta(seconds=timeout_s)
    if env.rank == 0:
        # Listens on every interface: MASTER_ADDR is this pod's own DNS name.
        return TCPStore(env.master_addr, env.master_port, env.world_size, True, timeout=timeout, wait_for_workers=False)
    while True:
        why = _reachable(env.master_addr, env.master_port)
        if why is None:
            try:
                return TCPStore(
                    env.master_addr, env.master_port, env.world_size, False, timeout=timeout, wait_for_workers=False
                )
            except (RuntimeError, OSError) as e:  # went away between the probe and the handshake
                why = _first_line(e)
        waiter.tick([0], f"rank 0 not reachable yet: {why}")


def _missing(store: TCPStore, world_size: int) -> list[int]:
    return [r for r in range(world_size) if not store.check([joined_key(r)])]


def rendezvous(
    env: DistEnv,
    timeout_s: float,
    stop: threading.Event | None = None,
    on_wait: Callable[[list[int]], None] | None = None,
) -> TCPStore:
    """Block, without a deadline, until every rank of ``env``'s group has joined rank 0's store.

    Returns the store for ``init_process_group(store=...)``; its timeout (``timeout_s``) applies
    to the store operations from then on. Raises ``Aborted`` once ``stop`` is set.
    """
    waiter = _Waiter(env, stop, on_wait)
    while True:
        store = _connect(env, timeout_s, waiter)
        try:
            store.set(joined_key(env.rank), str(time.time()))
            while missing := _missing(store, env.world_size):
                waiter.tick(missing, "not joined yet")
        except (RuntimeError, OSError) as e:  # c10d errors: rank 0's store is gone (process or pod replaced)
            log.warning("rank %d: rank 0's store went away (%s); reconnecting", env.rank, _first_line(e))
            continue
        if on_wait is not None:
            on_wait([])
        log.info("rank %d/%d: every rank joined after %.1fs", env.rank, env.world_size, time.monotonic() - waiter.t0)
        return store
