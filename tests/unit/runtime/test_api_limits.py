"""Overload, deadlines, disconnects and graceful stop against real single-rank servers.

A 4096-position tiny checkpoint makes a long generation (ignore_eos) last a few seconds on CPU,
long enough to fill the one batch slot while the test queues, rejects and disconnects others.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tpi_runtime.testing import make_tiny_checkpoint
from tpikit.ports import free_port

from tests.unit.runtime.test_server import Server, error_of, metric_samples

LONG = 4000  # tokens: a few seconds of decoding on CPU
R0 = (("rank", "0"),)


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-long", max_position_embeddings=4096)


def single(ckpt: str, log: Path, *extra: str) -> Server:
    env = {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    srv = Server(ckpt, free_port(), env, log, "--served-model-name", "tiny", "--max-model-len", "4096", *extra)
    srv.wait_ready()
    return srv


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def raw_request(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a completion request on a raw socket (so the test can hang up whenever it wants)."""
    s = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return s


def gauge(srv: Server, name: str) -> float:
    return metric_samples(srv).get((name, R0), -1.0)


@pytest.fixture(scope="module")
def limited(long_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = single(
        long_ckpt, tmp_path_factory.mktemp("logs") / "limited.log", "--max-batch-size", "1", "--max-queue", "1"
    )
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.logs()


def test_full_queue_is_429_and_disconnects_free_their_slots(limited: Server) -> None:
    long_body = {"prompt": [3, 4, 5], "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    before = metric_samples(limited)
    running = raw_request(limited.port, {**long_body, "stream": True})  # takes the only slot
    try:
        assert running.recv(4096).startswith(b"HTTP/1.1 200")
        wait_for(lambda: gauge(limited, "tpi_running_batch_size") == 1, "the stream to run")
        queued = raw_request(limited.port, {"prompt": [3, 4], "max_tokens": 2})
        wait_for(lambda: gauge(limited, "tpi_queue_depth") == 1, "the second request to queue")
        r = limited.client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 2})
        err = error_of(r, 429)
        assert err["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        queued.close()  # a queued client leaves: its place in the queue is freed
        wait_for(lambda: gauge(limited, "tpi_queue_depth") == 0, "the queued request to leave")
    finally:
        running.close()  # a decoding client leaves: its batch slot is freed within a step
    wait_for(lambda: gauge(limited, "tpi_running_batch_size") == 0, "the running request to leave", 5)
    after = metric_samples(limited)
    assert after[("tpi_client_disconnects_total", R0)] - before.get(("tpi_client_disconnects_total", R0), 0) == 2
    rejected = ("tpi_requests_rejected_total", (("rank", "0"), ("reason", "queue_full")))
    assert after[rejected] - before.get(rejected, 0) == 1
    ok = limited.client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2
    # More sequences in one request (prompts x n) than the queue holds: a 400, since a 429 and its
    # Retry-After would never clear.
    err = error_of(limited.client.post("/v1/completions", json={"prompt": [[3], [4]], "max_tokens": 2}), 400)
    assert err["param"] == "prompt" and "queues at most 1 (--max-queue)" in err["message"]
    assert error_of(limited.client.post("/v1/completions", json={"prompt": [3], "n": 2, "max_tokens": 2}), 400)


def test_request_deadline(long_ckpt: str, tmp_path: Path) -> None:
    srv = single(long_ckpt, tmp_path / "deadline.log", "--request-timeout-seconds", "1")
    try:
        body = {"prompt": [3, 4, 5], "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
        t0 = time.monotonic()
        err = error_of(srv.client.post("/v1/completions", json=body), 504)
        assert err["code"] == "deadline_exceeded" and time.monotonic() - t0 < 10
        # Streamed: the deadline ends the stream with an error event, then [DONE].
        with srv.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = b"".join(r.iter_bytes()).decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        assert json.loads(events[-3][len("data: ") :])["error"]["code"] == "deadline_exceeded"
        wait_for(lambda: gauge(srv, "tpi_running_batch_size") == 0, "the slot to be freed", 5)
        ok = srv.client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        assert srv.stop() == 0, srv.logs()


def test_sigterm_during_a_long_stream_finishes_it_then_exits_0(long_ckpt: str, tmp_path: Path) -> None:
    srv = single(long_ckpt, tmp_path / "drain.log", "--drain-seconds", "60")
    n = 1500
    body = {"prompt": [3, 4, 5], "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    raw: list[bytes] = []
    got_some = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for chunk in r.iter_bytes():
                raw.append(chunk)
                if len(raw) > 3:
                    got_some.set()

    t = threading.Thread(target=consume)
    t.start()
    try:
        assert got_some.wait(60), srv.logs()
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: srv.client.get("/readyz").status_code == 503, "/readyz to drop")
        assert error_of(srv.client.post("/v1/completions", json={"prompt": [3], "max_tokens": 1}), 503)
    finally:
        t.join(120)
    events = b"".join(raw).decode().split("\n\n")
    assert events[-2] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == n
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.stop(sig=None, timeout=60) == 0, srv.logs()


def test_idle_and_trickling_connections_are_closed(long_ckpt: str, tmp_path: Path) -> None:
    """Neither an idle keep-alive connection nor a client trickling its body holds the server: the
    first is closed after the keep-alive timeout, the second gets 408 after the body timeout (the
    defaults, 15 s and 30 s), and the server keeps answering meanwhile."""
    from tpi_runtime.serving.app import BODY_READ_TIMEOUT_S
    from tpi_runtime.serving.lifecycle import KEEPALIVE_TIMEOUT_S

    srv = single(long_ckpt, tmp_path / "r0.log")
    try:
        idle = socket.create_connection(("127.0.0.1", srv.port))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        slow = socket.create_connection(("127.0.0.1", srv.port))
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        t0 = time.monotonic()
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200  # others are served
        idle.settimeout(KEEPALIVE_TIMEOUT_S + 10)
        assert idle.recv(1) == b"", "the idle keep-alive connection was not closed"
        assert KEEPALIVE_TIMEOUT_S - 1 <= time.monotonic() - t0 <= KEEPALIVE_TIMEOUT_S + 10
        slow.settimeout(BODY_READ_TIMEOUT_S + 10)
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        assert time.monotonic() - t0 <= BODY_READ_TIMEOUT_S + 10
        idle.close()
        slow.close()
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
    finally:
        srv.stop()
