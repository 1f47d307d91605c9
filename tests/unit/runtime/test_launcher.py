"""The launcher of several ranks per pod, with real processes (no mocks).

Small real child programs (``launch_child.py``) stand in for the runtime where the test is about
the launcher itself: the environment each local rank gets, dying together, exit codes, signals
and the termination message. A temp directory laid out like ``/sys/fs/cgroup`` stands in for the
kernel's cgroup files (a child bumps its ``oom_kill`` before it SIGKILLs itself, as the kernel's
OOM killer would), since a unit test cannot make the kernel OOM-kill on demand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tpi_contract import exitcodes, termination

REPO = Path(__file__).resolve().parents[3]
HARNESS = Path(__file__).with_name("launch_harness.py")
CHILD = Path(__file__).with_name("launch_child.py")
#: The launcher's own default (settings.DEFAULT_STOP_GRACE_SECONDS); tests run with it.
GRACE = 5.0


def env_for(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TPI_") and k not in ("RANK", "WORLD_SIZE")}
    return {**base, "PYTHONPATH": f"{REPO / 'runtime'}:{REPO / 'contract'}", **extra}


class Run:
    """One launcher process running launch_child.py plans."""

    def __init__(self, tmp: Path, plans: list[str], *flags: str, cgroup_root: Path | None = None, **env: str) -> None:
        self.out = tmp / "out"
        self.out.mkdir(exist_ok=True)
        self.tlog = tmp / "termination-log"
        root = cgroup_root or fake_cgroup(tmp / "cgroup", 0)
        cmd = [
            sys.executable, str(HARNESS), "--ranks-per-pod", str(len(plans)), "--termination-log", str(self.tlog),
            "--cgroup-root", str(root), *flags, "--", sys.executable, str(CHILD), str(self.out), *plans,
        ]  # fmt: skip
        self.log = tmp / "launcher.log"
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env_for(**env), stdout=self._logf, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"launcher still runs after {timeout}s:\n{self.log.read_text()}") from None
        finally:
            self._logf.close()

    def child_env(self, local: int, timeout: float = 30) -> dict[str, Any]:
        path = self.out / f"env-{local}.json"
        deadline = time.monotonic() + timeout
        while not path.exists() or not path.read_text():
            assert time.monotonic() < deadline, f"local rank {local} never started:\n{self.log.read_text()}"
            time.sleep(0.05)
        time.sleep(0.05)  # written in one go, but let the writer close it
        return dict(json.loads(path.read_text()))

    def sigterms(self, local: int) -> int:
        path = self.out / f"sigterm-{local}"
        return int(path.read_text()) if path.exists() else 0

    def message(self) -> str:
        return self.tlog.read_text()


def fake_cgroup(root: Path, oom_kills: int) -> Path:
    """A cgroup v2 mount with only the top cgroup's memory.events: stands in for the kernel's."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.events").write_text(f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {oom_kills}\noom_group_kill 0\n")
    return root


def test_each_local_rank_gets_its_place_in_the_group(tmp_path: Path) -> None:
    run = Run(tmp_path, ["exit:0:0", "exit:0:0"], WORLD_SIZE="4", TPI_POD_ORDINAL="1", TPI_LEASE_NAME="c-g0-1")
    assert run.wait() == 0, run.log.read_text()
    envs = [run.child_env(0), run.child_env(1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["WORLD_SIZE"]) for e in envs] == [
        ("2", "0", "2", "4"),
        ("3", "1", "2", "4"),
    ]
    assert [e["TPI_LEASE_NAME"] for e in envs] == ["c-g0-1-r0", "c-g0-1-r1"]  # one Lease per rank
    assert all(e["ppid"] == run.proc.pid for e in envs)
    assert run.message() == "all 2 local ranks exited 0 on their own"


def test_heartbeat_stays_off_without_a_lease_name(tmp_path: Path) -> None:
    run = Run(tmp_path, ["exit:0:0", "exit:0:0"])  # WORLD_SIZE unset: the pod is the whole group
    assert run.wait() == 0, run.log.read_text()
    assert [run.child_env(i)["TPI_LEASE_NAME"] for i in (0, 1)] == [None, None]
    assert [run.child_env(i)["RANK"] for i in (0, 1)] == ["0", "1"]


def test_a_failing_rank_stops_the_others_and_names_itself(tmp_path: Path) -> None:
    run = Run(tmp_path, ["serve", "exit:2:0.5", "serve"], WORLD_SIZE="3")
    assert run.wait() == exitcodes.BAD_CONFIG, run.log.read_text()
    assert run.sigterms(0) == 1 and run.sigterms(2) == 1  # stopped, with one SIGTERM each
    cause = termination.parse(run.message())
    assert cause == termination.RankEnd(local_rank=1, rank=1, exit_code=2), run.message()
    assert "bad configuration" in run.message().splitlines()[0]
    assert "local rank 0 (rank 0) exited 0 after the launcher stopped it" in run.message()


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    run = Run(tmp_path, ["stubborn", "exit:1:0.3"])
    assert run.wait() == exitcodes.CRASHED, run.log.read_text()
    elapsed = time.monotonic() - run.t0
    assert run.sigterms(0) == 1
    assert elapsed >= GRACE, f"SIGKILL came after {elapsed:.1f}s, before the {GRACE}s grace"
    assert termination.parse(run.message()) == termination.RankEnd(1, 1, 1)
    assert "local rank 0 (rank 0) exited 137 after the launcher stopped it: killed by SIGKILL" in run.message()


def test_runtime_oom_exit_is_reported_as_4(tmp_path: Path) -> None:
    run = Run(tmp_path, ["serve", "exit:4:0.3"])
    assert run.wait() == exitcodes.OUT_OF_MEMORY, run.log.read_text()
    cause = termination.parse(run.message())
    assert cause == termination.RankEnd(1, 1, 4) and not cause.oom_killed
    assert "out of GPU memory" in run.message()


def test_kernel_oom_kill_gives_137_and_names_the_victim(tmp_path: Path) -> None:
    root = fake_cgroup(tmp_path / "cgroup", 2)  # two kills before this container's ranks started
    run = Run(tmp_path, ["serve", f"oom:0.3:{root / 'memory.events'}"], cgroup_root=root)
    assert run.wait() == exitcodes.KERNEL_OOM_KILLED, run.log.read_text()
    cause = termination.parse(run.message())
    assert cause is not None and cause.oom_killed and (cause.local_rank, cause.exit_code) == (1, 137)
    assert "oom_kill 2 -> 3" in run.message()
    assert run.sigterms(0) == 1


def test_a_plain_sigkill_is_not_called_an_oom(tmp_path: Path) -> None:
    run = Run(tmp_path, ["serve", "sigkill:0.3"])
    assert run.wait() == 137, run.log.read_text()
    cause = termination.parse(run.message())
    assert cause is not None and not cause.oom_killed and cause.local_rank == 1
    assert "killed by SIGKILL" in run.message() and termination.OOM_KILLED not in run.message()


def test_sigterm_is_forwarded_once_and_a_drain_exits_0(tmp_path: Path) -> None:
    run = Run(tmp_path, ["serve", "serve"])
    run.child_env(0), run.child_env(1)  # both started (their SIGTERM handlers are set before this file)
    time.sleep(0.2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.log.read_text()
    assert (run.sigterms(0), run.sigterms(1)) == (1, 1)
    assert run.message() == "all 2 local ranks exited 0 after SIGTERM"


def test_a_rank_leaving_alone_breaks_the_group(tmp_path: Path) -> None:
    run = Run(tmp_path, ["exit:0:0.2", "serve"])
    assert run.wait() == exitcodes.CRASHED, run.log.read_text()
    assert time.monotonic() - run.t0 >= GRACE  # it first waited for rank 1 to leave too
    cause = termination.parse(run.message())
    assert cause == termination.RankEnd(0, 0, 0)
    assert "still ran" in run.message()


def test_a_failure_while_waiting_for_a_leaver_stops_the_rest_at_once(tmp_path: Path) -> None:
    run = Run(tmp_path, ["exit:0:0.1", "exit:2:0.5", "serve"])
    assert run.wait() == exitcodes.BAD_CONFIG, run.log.read_text()
    assert time.monotonic() - run.t0 < GRACE, "the failure waited for the leaver's grace"
    assert run.sigterms(2) == 1
    assert termination.parse(run.message()) == termination.RankEnd(1, 1, 2)


def test_no_rank_outlives_a_killed_launcher(tmp_path: Path) -> None:
    run = Run(tmp_path, ["serve", "serve"])
    pids = [run.child_env(0)["pid"], run.child_env(1)["pid"]]
    run.proc.kill()  # SIGKILL: no handler runs, the kernel ends the children (PR_SET_PDEATHSIG)
    run.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"local ranks {pids} outlived their launcher"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return not stat.split(") ", 1)[1].startswith("Z")  # a zombie is dead, only not reaped yet


def test_an_unwritable_termination_log_is_no_reason_to_fail(tmp_path: Path) -> None:
    run = Run(tmp_path, ["serve", "exit:5:0.2"], "--termination-log", str(tmp_path / "no" / "such" / "dir"))
    assert run.wait() == 5, run.log.read_text()
    assert "cannot write the termination message" in run.log.read_text()


@pytest.mark.parametrize(
    ("env", "flags", "says"),
    [
        ({"WORLD_SIZE": "3"}, ["--ranks-per-pod", "2"], "does not divide"),
        ({"WORLD_SIZE": "4"}, ["--ranks-per-pod", "2"], "TPI_POD_ORDINAL is required"),
        ({"WORLD_SIZE": "4", "TPI_POD_ORDINAL": "2"}, ["--ranks-per-pod", "2"], "outside the group's 2 pod(s)"),
        ({"TPI_RANKS_PER_POD": "0"}, [], "must be >= 1"),
        ({}, ["--ranks-per-pod", "2"], "--model"),  # the runtime's own settings are checked first
    ],
)
def test_bad_configuration_exits_2_and_says_why(
    tmp_path: Path, env: dict[str, str], flags: list[str], says: str
) -> None:
    tlog = tmp_path / "termination-log"
    cmd = [sys.executable, "-m", "tpi_runtime", "launch", "--termination-log", str(tlog), *flags, "serve"]
    r = subprocess.run(cmd, env=env_for(**env), capture_output=True, text=True, timeout=60)
    assert r.returncode == exitcodes.BAD_CONFIG, r.stderr
    assert says in r.stderr and says in tlog.read_text()
    assert "started local rank" not in r.stderr  # nothing started
