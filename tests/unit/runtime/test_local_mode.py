"""The README's local command, verbatim: ``torchrun --nproc-per-node 2 -m tpi_runtime serve
--model DIR --port PORT``. Rank 0 serves the API on PORT; local rank 1 serves its probes and
metrics on PORT + 1 (no EADDRINUSE)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tpi_runtime.testing import make_tiny_checkpoint
from tpikit.ports import free_port

from tests.unit.runtime.test_server import REPO


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready:\n{log.read_text()[-4000:]}")


def test_readme_torchrun_command(tmp_path: Path) -> None:
    model = make_tiny_checkpoint(tmp_path / "tiny")
    port = free_port(span=2)  # rank 0's API on port, local rank 1's probes on port + 1
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc-per-node", "2", "-m", "tpi_runtime", "serve", "--model", model, "--port", str(port)]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TPI_")},
        "PET_MASTER_PORT": str(free_port()),  # torchrun's --master-port through its env fallback
        "PYTHONPATH": f"{REPO / 'runtime'}:{REPO / 'contract'}",
    }
    log = tmp_path / "torchrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api, follower = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
        wait_ready(api, proc, log)
        wait_ready(follower, proc, log)
        assert httpx.get(api + "/readyz").json() == {"status": "ready", "rank": 0}
        assert httpx.get(follower + "/readyz").json() == {"status": "ready", "rank": 1}
        assert 'tpi_ready{rank="1"} 1.0' in httpx.get(follower + "/metrics").text
        r = httpx.post(api + "/v1/completions", json={"prompt": "the cat sees", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"], r.text
        assert httpx.post(follower + "/v1/completions", json={"prompt": "a"}).status_code == 404
        assert "EADDRINUSE" not in log.read_text() and "Address already in use" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it; both ranks drain and stop
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchrun did not stop on SIGTERM:\n{log.read_text()[-4000:]}")
