"""A rank that starts before its whole group exists waits for it without a deadline (issue 10 item 2).

Real ``python -m tpi_runtime serve`` processes on gloo, with the collective timeout the operator
renders by default (``--dist-timeout-seconds`` 60 for heartbeatTimeoutSeconds 30): before the
change a rank gave up on the rendezvous after it and exited 3, which the operator counted as a
crash loop. Here ranks wait longer than that deadline, alive and not ready, and the group forms
when the peer finally comes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tpi_contract import defaults
from tpi_operator.api.v1alpha1 import FailurePolicy
from tpi_runtime.rendezvous import LOG_EVERY_S
from tpi_runtime.testing import make_tiny_checkpoint
from tpikit.ports import free_port

from .conftest import WORKER, rank_env
from .test_server import Server, complete, error_of

#: What the operator passes with the default failure policy (the old rendezvous deadline).
DIST_TIMEOUT_S = defaults.collective_timeout_seconds(FailurePolicy().heartbeat_timeout_seconds)
#: How long the lonely ranks wait here: well past that deadline.
WAIT_S = DIST_TIMEOUT_S + 15


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def rank_server(ckpt: str, rank: int, master: int, log: Path) -> Server:
    env = {
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master),
    }
    return Server(ckpt, free_port(), env, log, "--dist-timeout-seconds", str(DIST_TIMEOUT_S))


def readyz(srv: Server) -> tuple[int, dict[str, object]] | None:
    try:
        r = srv.client.get("/readyz", timeout=5)
    except httpx.TransportError:
        return None  # the HTTP server is not up yet
    return r.status_code, r.json()


def test_ranks_wait_past_the_collective_deadline_then_the_group_forms(ckpt: str, tmp_path: Path) -> None:
    """Rank 1 of group A and rank 0 of group B start alone. Both stay alive and not ready,
    saying whom they wait for, longer than the old deadline. Then A's rank 0 starts: group A
    forms and answers a completion. B's peer never comes; SIGTERM ends its wait with exit 0."""
    assert DIST_TIMEOUT_S == 60, "the operator's default collective timeout changed: revisit WAIT_S"
    master_a, master_b = free_port(), free_port()
    a1 = rank_server(ckpt, 1, master_a, tmp_path / "a1.log")
    b0 = rank_server(ckpt, 0, master_b, tmp_path / "b0.log")
    a0: Server | None = None
    lonely = ((a1, 1, [0]), (b0, 0, [1]))
    try:
        t0 = time.monotonic()
        seen_waiting: set[int] = set()
        while time.monotonic() - t0 < WAIT_S:
            for srv, rank, missing in lonely:
                assert srv.proc.poll() is None, f"rank exited {srv.proc.returncode} while waiting:\n{srv.logs()}"
                got = readyz(srv)
                if got is not None:
                    code, body = got
                    assert code == 503, body
                    if body.get("status") == "waiting":
                        assert body == {"status": "waiting", "rank": rank, "waiting_for": missing}
                        seen_waiting.add(id(srv))
            time.sleep(2)
        waited = time.monotonic() - t0
        assert seen_waiting == {id(a1), id(b0)}, "a lonely rank never reported what it waits for"
        for srv, rank, missing in lonely:
            assert srv.proc.poll() is None, srv.logs()
            assert srv.client.get("/healthz").status_code == 200  # alive: liveness never restarts it
            assert readyz(srv) == (503, {"status": "waiting", "rank": rank, "waiting_for": missing})
        err = error_of(b0.client.post("/v1/completions", json={"prompt": "a"}), 503)
        assert err["code"] == "not_ready" and "waiting for ranks [1]" in err["message"], err
        # It says so in its log, now and then, with no deadline.
        said = [ln for ln in a1.log.read_text().splitlines() if "waiting for ranks [0]" in ln]
        assert len(said) >= WAIT_S // LOG_EVERY_S - 2, a1.log.read_text()[-3000:]

        a0 = rank_server(ckpt, 0, master_a, tmp_path / "a0.log")
        a0.wait_ready()
        a1.wait_ready()
        out = complete(a0, prompt="a b", max_tokens=4, temperature=0, ignore_eos=True)["choices"][0]
        assert len(out["token_ids"]) == 4 and out["finish_reason"] == "length", out
        assert "every rank joined" in a1.log.read_text()
        print(f"\nrank 1 waited {waited:.0f}s (collective timeout {DIST_TIMEOUT_S}s), then the group served")

        # B's rank 0 still waits; a stop request (the pod deleted) ends the wait cleanly.
        assert b0.proc.poll() is None and readyz(b0) == (503, {"status": "waiting", "rank": 0, "waiting_for": [1]})
        t_stop = time.monotonic()
        assert b0.stop(signal.SIGTERM, timeout=15) == 0, b0.logs()
        assert time.monotonic() - t_stop < 5, "the wait did not end promptly on SIGTERM"
        a0.proc.send_signal(signal.SIGTERM)
        a1.proc.send_signal(signal.SIGTERM)
        assert [a0.stop(sig=None), a1.stop(sig=None)] == [0, 0], a0.logs() + a1.logs()
    finally:
        for srv in (a0, a1, b0):
            if srv is not None and srv.proc.poll() is None:
                srv.proc.kill()
                srv.stop(sig=None)


def test_waiting_ranks_reconnect_when_rank_0_is_replaced(tmp_path: Path) -> None:
    """A group of 3: ranks 0 and 1 wait for rank 2; rank 0 is killed (its pod replaced) and a new
    rank 0 starts; rank 1 reconnects to it instead of failing, and the group forms once rank 2
    comes."""
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("r0", "r1", "r0b", "r2")}
    procs: dict[str, subprocess.Popen[str]] = {}

    def spawn(name: str, rank: int) -> subprocess.Popen[str]:
        with open(logs[name], "w") as err:
            procs[name] = subprocess.Popen(
                [sys.executable, str(WORKER), "join"],
                env=rank_env(rank, 3, port),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        return procs[name]

    def wait_log(name: str, text: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while text not in logs[name].read_text():
            assert procs[name].poll() is None, f"{name} exited {procs[name].returncode}:\n{logs[name].read_text()}"
            assert time.monotonic() < deadline, f"{name} never logged {text!r}:\n{logs[name].read_text()}"
            time.sleep(0.2)

    try:
        spawn("r1", 1)
        wait_log("r1", "waiting for ranks [0]")  # rank 0 not there yet: connection refused
        spawn("r0", 0)
        wait_log("r1", "waiting for ranks [2]")  # connected to rank 0's store, rank 0 joined
        procs["r0"].kill()
        procs["r0"].wait(10)
        wait_log("r1", "reconnecting")
        wait_log("r1", "waiting for ranks [0]")
        spawn("r0b", 0)
        spawn("r2", 2)
        results = {}
        for name in ("r0b", "r1", "r2"):
            out, _ = procs[name].communicate(timeout=120)
            assert procs[name].returncode == 0, f"{name} exited {procs[name].returncode}:\n{logs[name].read_text()}"
            results[name] = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
        assert all('"sum": 3.0' in line for line in results.values()), results
        assert "tpi_runtime: collective" not in logs["r1"].read_text()  # never gave up (die)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
