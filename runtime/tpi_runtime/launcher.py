"""``python -m tpi_runtime launch [--ranks-per-pod N] serve|generate ...``: one pod, several ranks.

Starts one runtime process per local rank (``LauncherSettings.child_env``: RANK = pod ordinal x
ranks per pod + local rank, LOCAL_RANK, LOCAL_WORLD_SIZE, its own Lease name) and keeps them
together, as a pod of one rank is kept whole by the kubelet:

* every child sees all the pod's GPUs (CUDA_VISIBLE_DEVICES is left alone) and picks
  ``cuda:LOCAL_RANK``, so NCCL between local ranks can use P2P/NVLink; on CPU the children split
  the cores (LOCAL_WORLD_SIZE), as under torchrun;
* when one child ends, the others get SIGTERM, then SIGKILL after ``--stop-grace-seconds``: a
  tensor-parallel group is useless without any one rank, and the operator must see the pod fail
  to recreate the group;
* SIGTERM (or SIGINT) to the launcher is forwarded once to every child (rank 0 drains); the
  launcher waits for them with no deadline of its own (the kubelet's grace period is one);
* the exit code and the termination message (``launch_outcome``) name the rank that ended it
  and say whether the kernel's OOM killer struck (``cgroup_oom``);
* children inherit stdout/stderr: the runtime's log lines already carry their rank.

As PID 1 of a container it also reaps orphans (``waitpid(-1)``). It never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from tpi_contract import exitcodes, ranks

from . import cgroup_oom
from .launch_outcome import ChildEnd, Outcome, decide
from .settings import LauncherSettings, RuntimeSettings, SettingsError, build_parser

log = logging.getLogger("tpi_runtime.launcher")

#: How often the launcher looks at its children and its signals.
POLL_S = 0.05
#: prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _die_with_launcher(launcher_pid: int) -> Callable[[], None]:
    """A child's pre-exec step: the kernel SIGKILLs it if the launcher dies (SIGKILL, a crash), so
    no rank outlives its pod's supervisor outside a container either (inside one, PID 1's end
    ends them all anyway)."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher_pid:  # it died before the prctl
            os._exit(exitcodes.CRASHED)

    return arm


@dataclass
class _Child:
    local_rank: int
    rank: int
    proc: subprocess.Popen[bytes]
    signalled: bool = False

    def signal(self, signum: int) -> None:
        self.signalled = True
        with contextlib.suppress(ProcessLookupError):  # ended between the reap and the signal
            self.proc.send_signal(signum)


class Launcher:
    """Starts the local ranks, watches them, stops them together."""

    def __init__(self, settings: LauncherSettings, program: Sequence[str], environ: Mapping[str, str]) -> None:
        """``program``: the command each local rank runs, in ``environ`` plus its place in the group."""
        self.settings = settings
        self.program = list(program)
        self.pod_env = dict(environ)
        self.children: dict[int, _Child] = {}  # pid -> child, while it runs
        self.ends: list[ChildEnd] = []
        self.draining = False
        self._drain_asked = 0  # the signal that asked for a drain
        self._stop_sent_at: float | None = None
        self._first_end_at: float | None = None
        self._killed = False

    # ----------------------------------------------------------------------------- signals
    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: drain; the main loop forwards it (a handler only sets a flag)."""
        self._drain_asked = signum

    # ----------------------------------------------------------------------------- children
    def start(self) -> None:
        s = self.settings
        for local in range(s.ranks_per_pod):
            rank = ranks.global_rank(s.pod_ordinal, s.ranks_per_pod, local)
            # Own process group: a terminal's Ctrl-C reaches the launcher only, which forwards one
            # SIGTERM (a runtime takes a second signal as "exit now, no drain").
            env = s.child_env(self.pod_env, local)
            arm = _die_with_launcher(os.getpid())
            proc = subprocess.Popen(self.program, env=env, process_group=0, preexec_fn=arm)
            self.children[proc.pid] = _Child(local, rank, proc)
            log.info("started local rank %d (rank %d/%d) as pid %d", local, rank, s.world_size, proc.pid)

    def _reap(self) -> None:
        """Collect every ended child (and, as PID 1, orphans), in the order they ended."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue  # an orphan reparented to us (we are PID 1): reaped, nothing to do
            code = os.waitstatus_to_exitcode(status)
            child.proc.returncode = code  # Popen must not wait for it again
            end = ChildEnd(child.local_rank, child.rank, code, stopped=child.signalled)
            self.ends.append(end)
            if self._first_end_at is None:
                self._first_end_at = time.monotonic()
            log_at = logging.INFO if code == 0 or child.signalled else logging.ERROR
            log.log(
                log_at, "local rank %d (rank %d) ended: %s", child.local_rank, child.rank,
                exitcodes.describe(end.exit_code) if code else "exit 0",
            )  # fmt: skip

    def _signal_all(self, signum: int) -> None:
        for child in self.children.values():
            if signum == signal.SIGKILL or not child.signalled:  # one SIGTERM each: a second one means "now"
                child.signal(signum)

    def _stop_rest(self, why: str) -> None:
        if self._stop_sent_at is not None or not self.children:
            return
        log.warning(
            "%s: stopping local ranks %s (SIGTERM, SIGKILL after %.0fs)",
            *(why, sorted(c.local_rank for c in self.children.values()), self.settings.stop_grace_seconds),
        )
        self._stop_sent_at = time.monotonic()
        self._signal_all(signal.SIGTERM)

    def _step(self) -> None:
        self._reap()
        now = time.monotonic()
        if self._drain_asked and not self.draining:
            self.draining = True
            log.info("got %s: forwarding SIGTERM to every local rank", exitcodes.signal_name(self._drain_asked))
            self._signal_all(signal.SIGTERM)
        if self.ends and not self.draining and self._stop_sent_at is None and self.children:
            failed = next((e for e in self.ends if e.returncode != 0), None)
            first = self.ends[0]
            if failed is not None:
                self._stop_rest(f"local rank {failed.local_rank} (rank {failed.rank}) failed")
            elif self._first_end_at is not None and now - self._first_end_at > self.settings.stop_grace_seconds:
                # A rank that left with 0 got as long for the others to leave too (generate's end,
                # a rank 0 in another pod that shut the group down); they did not.
                self._stop_rest(f"local rank {first.local_rank} (rank {first.rank}) left and the others did not")
        if (
            self._stop_sent_at is not None
            and not self._killed
            and self.children
            and now - self._stop_sent_at > self.settings.stop_grace_seconds
        ):
            self._killed = True
            log.warning("local ranks %s still run: SIGKILL", sorted(c.local_rank for c in self.children.values()))
            self._signal_all(signal.SIGKILL)

    def run(self) -> Outcome:
        """Start, supervise until every local rank ended, and decide the outcome."""
        s = self.settings
        counter = cgroup_oom.find(s.cgroup_root)
        before = counter.read() if counter is not None else None
        self.start()
        while self.children:
            self._step()
            if self.children:
                time.sleep(POLL_S)
        after = counter.read() if counter is not None else None
        return decide(self.ends, draining=self.draining, oom_before=before, oom_after=after)


def write_termination_message(path: str, text: str) -> None:
    """Kubernetes shows it as the container's last state; failing to write is no reason to fail."""
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        log.warning("cannot write the termination message to %s (%s): %s", path, e.strerror or e, text)


def runtime_program(settings: LauncherSettings) -> list[str]:
    """What a local rank runs: this interpreter's ``python -m tpi_runtime serve|generate ...``."""
    return [sys.executable, "-m", "tpi_runtime", *settings.runtime_argv]


def main(args: argparse.Namespace, environ: Mapping[str, str], program: Sequence[str] | None = None) -> int:
    """``launch``: ``args`` parsed by ``settings.build_parser``, the pod's environment. ``program``:
    run this in each local rank instead of the runtime (tests start small programs; their flags
    are not checked)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(levelname)s %(name)s: %(message)s")
    try:
        settings = LauncherSettings.from_args(args, environ)
        # One clear error now rather than one per rank: the ranks' own settings must parse.
        if program is None:
            program = runtime_program(settings)
            _check_runtime_args(settings, environ)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        path = LauncherSettings.termination_log_of(args, environ)
        write_termination_message(path, f"launcher: bad configuration: {e}")
        return exitcodes.BAD_CONFIG
    launcher = Launcher(settings, program, environ)
    signal.signal(signal.SIGTERM, launcher.on_signal)
    signal.signal(signal.SIGINT, launcher.on_signal)
    outcome = launcher.run()
    (log.info if outcome.code == 0 else log.error)("exit %d: %s", outcome.code, outcome.message.replace("\n", "; "))
    write_termination_message(settings.termination_log, outcome.message)
    return outcome.code


def _check_runtime_args(settings: LauncherSettings, environ: Mapping[str, str]) -> None:
    """SettingsError unless local rank 0's command line and environment make valid settings."""
    try:
        runtime_args = build_parser().parse_args(list(settings.runtime_argv))
    except SystemExit:  # argparse printed why
        raise SettingsError(f"the runtime's flags do not parse: {' '.join(settings.runtime_argv)}") from None
    RuntimeSettings.from_args(runtime_args, settings.child_env(environ, 0))
