"""The README's local command, verbatim: ``torchrun --nproc-per-node 2 -m tpi_runtime serve
--model DIR --port PORT``. Rank 0 serves the API on PORT; local rank 1 serves its probes and
metrics on PORT + 1 (no EADDRINUSE)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tpi_runtime.testing import make_tiny_checkpoint

from tests.unit.runtime.test_server import REPO, free_port


def two_free_ports() -> int:
    """A port P with P + 1 free too, both below the kernel's ephemeral range. P + 1 is not held
    between this check and rank 1's bind, and inside that range Linux gives bind(0) odd ports and
    connect() even ones: an odd P from bind(0) makes P + 1 the next source port of any outgoing
    connection (torchrun's store clients, gloo). CI once saw rank 1 fail with EADDRINUSE so."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, ephemeral_low - 1)
        if all(bindable(p) for p in (port, port + 1)):
            return port
    raise AssertionError("no two consecutive free ports")


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # the runtime binds every interface
        except OSError:
            return False
    return True


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
    port = two_free_ports()
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
