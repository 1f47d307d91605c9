"""The container's OOM-kill counter: did the kernel's OOM killer strike inside our cgroup?

The launcher reads it when it starts and when a local rank ends: a rise means a process of this
container was OOM-killed (the kernel picks the biggest, usually a rank, maybe a helper), so the
pod exits 137 and its message says OOMKilled instead of a plain crash or a peer's exit 3.

Where the counter lives (``/proc/self/cgroup`` names our cgroup, ``/sys/fs/cgroup`` holds it):

* cgroup v2 (``0::/path``): ``<root>/<path>/memory.events``, line ``oom_kill N``; it counts kills
  in the cgroup and below it;
* cgroup v1 (``N:memory:/path``, also on hybrid hosts, whose v2 tree has no memory controller):
  ``<root>/memory/<path>/memory.oom_control``, line ``oom_kill N`` (kernels >= 4.13).

In a container the path in ``/proc/self/cgroup`` is often the host's (no cgroup namespace) while
the mount shows the container's own cgroup at its top, so the top is tried when the full path is
absent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("tpi_runtime.cgroup_oom")

DEFAULT_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"
COUNTER_KEY = "oom_kill"


@dataclass(frozen=True)
class OomCounter:
    """One cgroup's OOM-kill counter file."""

    path: str
    version: int  # 1 or 2

    def read(self) -> int | None:
        """The counter now; None when the file cannot be read or has no ``oom_kill`` line."""
        try:
            with open(self.path) as f:
                return parse_counter(f.read())
        except OSError as e:
            log.warning("cannot read the OOM-kill counter %s: %s", self.path, e)
            return None


def parse_counter(text: str) -> int | None:
    """``oom_kill`` of a ``memory.events`` (v2) or ``memory.oom_control`` (v1) file: both are
    ``key value`` lines."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == COUNTER_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """(v1 memory cgroup path, v2 cgroup path) from ``/proc/<pid>/cgroup``'s
    ``hierarchy-id:controllers:path`` lines; None for a hierarchy that is absent."""
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def candidates(root: str, proc_cgroup: str) -> list[OomCounter]:
    """The files that may hold our counter, best first (pure: nothing is read but the argument)."""
    v1, v2 = parse_proc_cgroup(proc_cgroup)
    out: list[OomCounter] = []
    if v1 is not None:  # a memory controller on v1 wins: on hybrid hosts v2 has none
        mem = os.path.join(root, "memory")
        out += [OomCounter(os.path.join(_under(mem, v1), "memory.oom_control"), 1)]
        out += [OomCounter(os.path.join(mem, "memory.oom_control"), 1)]
    if v2 is not None:
        out += [OomCounter(os.path.join(_under(root, v2), "memory.events"), 2)]
        out += [OomCounter(os.path.join(root, "memory.events"), 2)]
    unique: dict[str, OomCounter] = {}
    for c in out:  # a path of "/" makes both candidates of a version the same file
        unique.setdefault(c.path, c)
    return list(unique.values())


def find(root: str = DEFAULT_ROOT, proc_cgroup_path: str = PROC_SELF_CGROUP) -> OomCounter | None:
    """This process's OOM-kill counter, or None (then OOM kills cannot be told from other deaths)."""
    try:
        with open(proc_cgroup_path) as f:
            proc = f.read()
    except OSError as e:
        log.warning("cannot read %s (%s): OOM kills will not be told apart", proc_cgroup_path, e)
        return None
    for c in candidates(root, proc):
        if os.path.isfile(c.path) and c.read() is not None:
            return c
    log.warning(
        "no OOM-kill counter (memory.events or memory.oom_control with oom_kill) under %s for %s: "
        "OOM kills will not be told apart",
        *(root, " ".join(proc.split())),
    )
    return None
