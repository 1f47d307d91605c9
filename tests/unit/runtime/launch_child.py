"""A small real program the launcher tests start as a "local rank" (instead of the runtime).

    python launch_child.py OUTDIR PLAN_FOR_LOCAL_RANK_0 PLAN_FOR_LOCAL_RANK_1 ...

Each process picks its plan by LOCAL_RANK, writes the environment the launcher gave it to
OUTDIR/env-<local rank>.json, then follows the plan:

* ``exit:CODE:SECONDS``: exit CODE after SECONDS;
* ``serve``: run until SIGTERM, then exit 0 (a draining rank); counts the SIGTERMs it got;
* ``stubborn``: ignore SIGTERM (a rank stuck in a collective), so only SIGKILL ends it;
* ``sigkill:SECONDS``: SIGKILL itself after SECONDS (as `kill -9` of that process would);
* ``oom:SECONDS:FILE``: after SECONDS, do what the kernel's OOM killer does to the container: add
  one to ``oom_kill`` in FILE (a stand-in for the cgroup's memory.events), then SIGKILL itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

PASS_THROUGH = ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "TPI_LEASE_NAME")


def bump_oom_kill(path: str) -> None:
    with open(path) as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        key, _, value = line.partition(" ")
        out.append(f"{key} {int(value) + 1}" if key == "oom_kill" else line)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main() -> None:
    outdir, plans = sys.argv[1], sys.argv[2:]
    local = int(os.environ["LOCAL_RANK"])
    with open(os.path.join(outdir, f"env-{local}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in PASS_THROUGH} | {"pid": os.getpid(), "ppid": os.getppid()}, f)
    kind, *rest = plans[local].split(":")
    terms = 0

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal terms
        terms += 1
        with open(os.path.join(outdir, f"sigterm-{local}"), "w") as f:
            f.write(str(terms))

    if kind == "exit":
        time.sleep(float(rest[1]))
        sys.exit(int(rest[0]))
    if kind == "serve":
        signal.signal(signal.SIGTERM, on_term)
        while not terms:
            time.sleep(0.02)
        time.sleep(0.3)  # a second SIGTERM would be counted here (a runtime takes it as "exit now")
        sys.exit(0)
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, on_term)
        while True:
            time.sleep(0.1)
    if kind in ("sigkill", "oom"):
        time.sleep(float(rest[0]))
        if kind == "oom":
            bump_oom_kill(rest[1])
        os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(f"unknown plan {plans[local]!r}")


if __name__ == "__main__":
    main()
