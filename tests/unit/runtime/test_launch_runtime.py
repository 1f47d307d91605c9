"""``python -m tpi_runtime launch --ranks-per-pod 2 serve ...``: a TP=2 group as one "pod" of two
real runtime processes (gloo), asked through the official ``openai`` client.

It must answer with exactly the tokens of a single-process TP=1 run, drain on SIGTERM, and when
one local rank's process is SIGKILLed, stop the other and exit non-zero naming that rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from tpi_contract import exitcodes, termination
from tpi_runtime.testing import make_tiny_checkpoint
from tpikit.ports import free_port

REPO = Path(__file__).resolve().parents[3]
PROMPT = "the cat sees a dog and the bird"
MAX_TOKENS = 12


def env_for() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("TPI_")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        keep.pop(k, None)
    return {
        **keep,
        "PYTHONPATH": f"{REPO / 'runtime'}:{REPO / 'contract'}",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def tp1_tokens(ckpt: str) -> list[int]:
    """The single-process (TP=1) greedy answer."""
    cmd = [sys.executable, "-m", "tpi_runtime", "generate", "--model", ckpt, "--prompt", PROMPT]
    cmd += ["--max-tokens", str(MAX_TOKENS)]
    r = subprocess.run(cmd, env=env_for(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"^token_ids: ([\d,]+)$", r.stdout, re.M)
    assert m, r.stdout
    return [int(t) for t in m.group(1).split(",")]


class Pod:
    """The launcher and its two local ranks, as the container of a 2-rank pod runs them."""

    def __init__(self, ckpt: str, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port(span=2)  # rank 0 on port, local rank 1's probes on port + 1
        self.tlog = tmp / "termination-log"
        self.log = tmp / "pod.log"
        cmd = [
            sys.executable, "-m", "tpi_runtime", "launch", "--ranks-per-pod", "2", "--termination-log", str(self.tlog),
            "serve", "--model", ckpt, "--host", "127.0.0.1", "--port", str(self.port), "--backend", "gloo",
            "--max-batch-size", "4", "--max-model-len", "128", "--served-model-name", "tiny", *extra,
        ]  # fmt: skip
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        full_env = {**env_for(), **(env or {})}
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._logf, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def wait_ready(self, port: int, timeout: float = 240) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"launcher exited {self.proc.returncode}:\n{self.logs()}"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if r.status_code == 200:
                    return dict(r.json())
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"port {port} not ready:\n{self.logs()}")

    def pid_of(self, local_rank: int) -> int:
        m = re.search(rf"started local rank {local_rank} \(rank \d+/2\) as pid (\d+)", self.log.read_text())
        assert m, self.logs()
        return int(m.group(1))

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG)
            self.proc.wait()
            raise AssertionError(f"launcher still runs after {timeout}s:\n{self.logs()}") from None
        finally:
            self._logf.close()


@pytest.fixture
def pod(ckpt: str, tmp_path: Path) -> Iterator[Pod]:
    p = Pod(ckpt, tmp_path)
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        p._logf.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_local_ranks_answer_like_tp1_and_drain_on_sigterm(pod: Pod, tp1_tokens: list[int]) -> None:
    assert pod.wait_ready(pod.port) == {"status": "ready", "rank": 0}
    assert pod.wait_ready(pod.port + 1) == {"status": "ready", "rank": 1}  # the port rule: + LOCAL_RANK
    client = OpenAI(base_url=f"http://127.0.0.1:{pod.port}/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].model_extra["token_ids"] == tp1_tokens  # type: ignore[index]
    pod.proc.send_signal(signal.SIGTERM)  # the kubelet's: forwarded once, rank 0 drains, rank 1 follows
    assert pod.wait() == 0, pod.logs()
    assert pod.tlog.read_text() == "all 2 local ranks exited 0 after SIGTERM"


def test_sigkill_of_one_local_rank_stops_the_pod(pod: Pod) -> None:
    pod.wait_ready(pod.port)
    pod.wait_ready(pod.port + 1)
    pids = pod.pid_of(0), pod.pid_of(1)
    os.kill(pids[1], signal.SIGKILL)
    code = pod.wait()
    assert code != 0, pod.logs()
    cause = termination.parse(pod.tlog.read_text())
    assert cause is not None, pod.tlog.read_text()
    assert (cause.local_rank, cause.rank, cause.exit_code, cause.oom_killed) == (1, 1, 137, False)
    assert code == exitcodes.SIGNAL_BASE + signal.SIGKILL
    assert "local rank 0 (rank 0)" in pod.tlog.read_text()
    assert not alive(pids[0]) and not alive(pids[1])
