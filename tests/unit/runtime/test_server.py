"""The serving half against real runtime processes over loopback HTTP.

One single-rank server (``python -m tpi_runtime serve`` on gloo, WORLD_SIZE=1) is started per
module and shared by the tests; a 2-rank group (two real processes) checks that every rank serves
probes and metrics, rank 0 serves completions, and the tensor-parallel output is the same.
Greedy output is compared with Hugging Face transformers running the same checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tpi_runtime.serving.detokenizer import IncrementalDetokenizer
from tpi_runtime.testing import TINY_CONFIG, load_hf_model, make_tiny_checkpoint
from tpikit.ports import free_port

REPO = Path(__file__).resolve().parents[3]
MAX_MODEL_LEN = 128
EOS = TINY_CONFIG["eos_token_id"]
PROMPT = "the cat sees a dog and the bird"


class Server:
    """A real `python -m tpi_runtime serve` process."""

    def __init__(self, model: str, port: int, env: dict[str, str], log: Path, *extra: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "tpi_runtime",
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend",
            "gloo",
            "--max-batch-size",
            "4",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--dist-timeout-seconds",
            "30",
            *extra,
        ]
        inherited = {k: v for k, v in os.environ.items() if k != "TPI_LEASE_NAME"}  # heartbeat only if asked
        full_env = {
            **inherited,
            "PYTHONPATH": f"{REPO / 'runtime'}:{REPO / 'contract'}:{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1",
            "TPI_LOG_LEVEL": "INFO",
            **env,
        }
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._logf, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} while starting:\n{self.logs()}")
            try:
                if self.client.get("/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.logs()}")

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal (unless ``sig`` is None: already signalled) and wait; returns the exit code."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError(f"server ignored signal {sig} for {timeout}s:\n{self.logs()}") from None
        finally:
            self.client.close()
            self._logf.close()
        return code


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def server(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    srv = Server(ckpt, free_port(), env, tmp_path_factory.mktemp("logs") / "server.log", "--served-model-name", "tiny")
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    # SIGTERM is a graceful stop: exit 0 (checked after the module's tests).
    assert code == 0, f"graceful stop exited {code}:\n{srv.logs()}"


@pytest.fixture(scope="module")
def hf(ckpt: str) -> Any:
    return load_hf_model(ckpt)


@pytest.fixture(scope="module")
def tokenizer(ckpt: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))


def hf_greedy(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Reference greedy decode with transformers; stops after the eos token (which is not returned)."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == EOS:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def complete(srv: Server, **body: Any) -> dict[str, Any]:
    r = srv.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(srv: Server, **body: Any) -> list[dict[str, Any]]:
    """POST with stream=true; returns the parsed chunks, asserting SSE framing and the final [DONE]."""
    chunks: list[dict[str, Any]] = []
    with srv.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    for ev in events[:-2]:
        assert ev.startswith("data: "), ev
        chunks.append(json.loads(ev[len("data: ") :]))
    return chunks


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def metric_samples(srv: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = srv.client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---------------------------------------------------------------------------------------------
# Probes and models
# ---------------------------------------------------------------------------------------------
def test_probes(server: Server) -> None:
    h = server.client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = server.client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "rank": 0}


def test_models(server: Server) -> None:
    r = server.client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == MAX_MODEL_LEN


# ---------------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------------
def test_string_prompt_greedy_matches_transformers(server: Server, hf: Any, tokenizer: Any) -> None:
    prompt_ids = tokenizer.encode(PROMPT).ids
    expected = hf_greedy(hf, prompt_ids, 12)
    body = complete(server, model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "tiny"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["token_ids"] == expected
    assert choice["finish_reason"] == ("length" if len(expected) == 12 else "stop")
    # The text is the continuation of the prompt: its decoded words, each after a space.
    words = tokenizer.decode(expected, skip_special_tokens=True)
    assert choice["text"] == (" " + words if words else "")
    n = len(prompt_ids)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": len(expected), "total_tokens": n + 12}


def test_token_prompt_forms_are_equivalent(server: Server, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT).ids
    forms = [PROMPT, [PROMPT], ids, [ids]]
    outs = [complete(server, prompt=p, max_tokens=8, temperature=0)["choices"][0] for p in forms]
    assert all(o == outs[0] for o in outs), outs


def test_max_tokens_gives_length(server: Server, hf: Any) -> None:
    # Pick a prompt whose greedy continuation does not hit eos within 6 tokens.
    for start in range(3, 200):
        prompt = [start, start + 1]
        if len(hf_greedy(hf, prompt, 6)) == 6:
            break
    else:
        raise AssertionError("no prompt without an early eos in the tiny model")
    choice = complete(server, prompt=prompt, max_tokens=6, temperature=0)["choices"][0]
    assert len(choice["token_ids"]) == 6
    assert choice["finish_reason"] == "length"


def test_stop_string_cuts_text(server: Server) -> None:
    full = complete(server, prompt=PROMPT, max_tokens=10, temperature=0)["choices"][0]
    words = full["text"].split()
    assert len(words) >= 4, full
    stop = " " + words[2]  # the third generated word, with its separating space
    cut = full["text"].index(stop)
    choice = complete(server, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop, "zzz-not-there"])
    choice = choice["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full["text"][:cut]
    # Generation stopped at the token that completed the stop string.
    assert choice["token_ids"] == full["token_ids"][: len(choice["token_ids"])]
    assert len(choice["token_ids"]) < len(full["token_ids"])
    # A single string works as well as a list.
    assert complete(server, prompt=PROMPT, max_tokens=10, temperature=0, stop=stop)["choices"][0] == choice


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0, "max_tokens": 9},
        {"temperature": 0, "max_tokens": 10, "stop": ["dog"]},
        {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 1234, "max_tokens": 9},
    ],
    ids=["greedy", "stop", "seeded-sampling"],
)
def test_stream_concatenates_to_nonstream(server: Server, params: dict[str, Any]) -> None:
    full = complete(server, prompt=PROMPT, **params)
    chunks = stream(server, prompt=PROMPT, stream_options={"include_usage": True}, **params)
    *token_chunks, final, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert all(len(c["choices"][0]["token_ids"]) == 1 for c in token_chunks), "one chunk per token"
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    text = "".join(c["choices"][0]["text"] for c in [*token_chunks, final])
    ids = [t for c in token_chunks for t in c["choices"][0]["token_ids"]]
    assert text == full["choices"][0]["text"]
    assert ids == full["choices"][0]["token_ids"]
    assert final["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(server: Server) -> None:
    kw = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.5}
    a = complete(server, seed=7, **kw)["choices"][0]["token_ids"]
    b = complete(server, seed=7, **kw)["choices"][0]["token_ids"]
    assert a == b
    others = {tuple(complete(server, seed=s, **kw)["choices"][0]["token_ids"]) for s in (8, 9, 10)}
    assert len(others | {tuple(a)}) > 1, "different seeds should not all give the same tokens"


def test_concurrent_requests_match_sequential(server: Server) -> None:
    prompts = [
        f"the {w} runs to the {v}"
        for w, v in [
            ("cat", "house"),
            ("dog", "tree"),
            ("bird", "sea"),
            ("fish", "river"),
            ("car", "city"),
            ("sun", "hill"),
        ]
    ]
    lengths = [5, 9, 3, 12, 7, 10]  # different lengths: requests join and leave the batch mid-flight

    def run(i: int) -> dict[str, Any]:
        return complete(server, prompt=prompts[i], max_tokens=lengths[i], temperature=0)["choices"][0]

    sequential = [run(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(run, range(len(prompts))))
    assert concurrent == sequential


# ---------------------------------------------------------------------------------------------
# Bad requests: OpenAI-shaped 4xx, and the server keeps serving
# ---------------------------------------------------------------------------------------------
BAD_BODIES: list[tuple[str, Any, int, str | None]] = [
    ("not-an-object", [1, 2, 3], 400, None),
    ("missing-prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty-prompt", {"prompt": []}, 400, "prompt"),
    ("prompt-wrong-type", {"prompt": 42}, 400, "prompt"),
    ("prompt-batch-with-an-empty-prompt", {"prompt": ["a", ""]}, 400, "prompt"),
    ("prompt-batch-too-large", {"prompt": [[5]] * 257}, 400, "prompt"),
    ("prompt-batch-mixed", {"prompt": ["a", [5]]}, 400, "prompt"),
    ("prompt-float-ids", {"prompt": [1.5, 2]}, 400, "prompt"),
    ("prompt-negative-id", {"prompt": [-1, 2]}, 400, "prompt"),
    ("prompt-id-outside-vocab", {"prompt": [1, 100000]}, 400, "prompt"),
    ("max-tokens-zero", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-string", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("max-tokens-bool", {"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ("temperature-negative", {"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("temperature-string", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("top-p-zero", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("top-k-negative", {"prompt": "a", "top_k": -5}, 400, "top_k"),
    ("seed-float", {"prompt": "a", "seed": 1.5}, 400, "seed"),
    ("n-too-many", {"prompt": "a", "n": 17}, 400, "n"),
    ("stream-not-bool", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("stop-wrong-type", {"prompt": "a", "stop": 5}, 400, "stop"),
    ("stop-empty-string", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("logprobs-too-many", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("context-exceeded", {"prompt": list(range(3, 100)), "max_tokens": 40}, 400, "max_tokens"),
    ("prompt-longer-than-context", {"prompt": [5] * (MAX_MODEL_LEN + 1), "max_tokens": 1}, 400, "prompt"),
    ("unknown-model", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_request_is_rejected_and_server_keeps_serving(
    server: Server,
    case: str,
    body: Any,
    status: int,
    param: str | None,
) -> None:
    err = error_of(server.client.post("/v1/completions", json=body), status)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if case.startswith("context") or case.startswith("prompt-longer"):
        assert err["code"] == "context_length_exceeded"
    assert complete(server, prompt="a b", max_tokens=2, temperature=0)["choices"][0]["token_ids"]


def test_malformed_http_is_rejected_and_server_keeps_serving(server: Server) -> None:
    c = server.client
    err = error_of(c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    error_of(c.post("/v1/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    error_of(c.get("/no/such/path"), 404)
    error_of(c.post("/healthz", json={}), 405)
    r = c.get("/v1/completions")
    error_of(r, 405)
    assert r.headers["allow"] == "POST"
    error_of(c.delete("/v1/models"), 405)
    big = b'{"prompt": "' + b"a " * (3 * 1024 * 1024) + b'"}'
    error_of(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    # A raw socket that lies about its body length and hangs up must not hurt the server either.
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro')
    assert complete(server, prompt="a b", max_tokens=2, temperature=0)["choices"][0]["token_ids"]
    assert c.get("/healthz").status_code == 200


def test_client_disconnect_mid_stream_frees_the_slot(server: Server) -> None:
    before = metric_samples(server)
    aborted = ("tpi_requests_total", (("finish_reason", "abort"), ("rank", "0"), ("status", "499")))
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        body = json.dumps(
            {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 20, "temperature": 0.8, "stream": True}
        ).encode()
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        got = b""
        while got.count(b"data: ") < 2:
            chunk = s.recv(4096)
            assert chunk, "server closed the stream early"
            got += chunk
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metric_samples(server)
        if m.get(aborted, 0) > before.get(aborted, 0) and m[("tpi_running_batch_size", (("rank", "0"),))] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the aborted request was not released")
    assert complete(server, prompt="a b", max_tokens=2, temperature=0)["choices"][0]["token_ids"]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def test_metrics_exposed_and_increase_after_a_request(server: Server) -> None:
    r0 = (("rank", "0"),)
    before = metric_samples(server)
    for name in (
        "tpi_ready",
        "tpi_engine_steps_total",
        "tpi_generated_tokens_total",
        "tpi_queue_depth",
        "tpi_running_batch_size",
        "tpi_effective_batch_size",
        "tpi_max_batch_size",
        "tpi_oom_recoveries_total",
        "tpi_prompt_tokens_total",
        "tpi_kv_blocks_total",
        "tpi_kv_blocks_used",
        "tpi_kv_blocks_cached",
        "tpi_kv_preemptions_total",
        "tpi_prefix_cache_hit_tokens_total",
    ):
        assert (name, r0) in before, f"{name} missing from /metrics"
    assert before[("tpi_ready", r0)] == 1
    assert before[("tpi_max_batch_size", r0)] == 4
    assert before[("tpi_effective_batch_size", r0)] == 4
    assert before[("tpi_oom_recoveries_total", r0)] == 0
    assert before[("tpi_kv_blocks_total", r0)] > 0 and before[("tpi_kv_blocks_used", r0)] == 0
    assert not any(name.startswith("tpi_gpu_") for name, _ in before), "no GPU series on a CPU host"

    body = complete(server, prompt=PROMPT, max_tokens=7, temperature=0)
    n_gen, n_prompt = body["usage"]["completion_tokens"], body["usage"]["prompt_tokens"]
    after = metric_samples(server)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = r0) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("tpi_generated_tokens_total") >= n_gen
    assert delta("tpi_prompt_tokens_total") == n_prompt
    assert delta("tpi_completion_tokens_total") == n_gen
    assert delta("tpi_engine_steps_total") >= n_gen
    ok = (("finish_reason", body["choices"][0]["finish_reason"]), ("rank", "0"), ("status", "200"))
    assert delta("tpi_requests_total", ok) == 1
    for hist in (
        "tpi_request_latency_seconds",
        "tpi_time_to_first_token_seconds",
        "tpi_time_per_output_token_seconds",
        "tpi_step_duration_seconds",
    ):
        assert delta(f"{hist}_count") >= 1, hist
        assert delta(f"{hist}_sum") > 0, hist
    assert delta("tpi_step_tokens_total", (("phase", "prefill"), ("rank", "0"))) >= n_prompt


# ---------------------------------------------------------------------------------------------
# Incremental detokenisation (in-process, with a real byte-level BPE tokenizer)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_bpe() -> Any:
    """A byte-level BPE whose small vocabulary splits multi-byte characters across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world, the world says hello"] * 10, trainer)
    return tok


def assemble(tok: Any, text: str, stop: list[str]) -> tuple[list[str], str, bool]:
    asm = IncrementalDetokenizer(tok, tok.encode("say:").ids, stop)
    deltas = []
    for t in tok.encode(text).ids:
        deltas.append(asm.add(t))
        if asm.stopped:
            break
    if not asm.stopped:
        deltas.append(asm.finish())
    return deltas, asm.text, asm.stopped


def test_text_assembler_never_emits_partial_characters(byte_bpe: Any) -> None:
    text = "héllo 日本語 world"
    ids = byte_bpe.encode(text).ids
    assert len(ids) > len(text.split()) + 6, "the test needs characters split across tokens"
    deltas, final, stopped = assemble(byte_bpe, text, [])
    assert not stopped and final == text
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas), deltas


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(["本語"], "héllo 日"), (["lo 日"], "hél"), (["zz", " wor"], "héllo 日本語"), (["héllo"], "")],
)
def test_text_assembler_cuts_at_stop_strings_spanning_tokens(byte_bpe: Any, stop: list[str], expected: str) -> None:
    deltas, final, stopped = assemble(byte_bpe, "héllo 日本語 world", stop)
    assert stopped
    assert final == expected
    # Nothing beyond the cut was ever released, even transiently.
    assert "".join(deltas) == expected


# ---------------------------------------------------------------------------------------------
# A 2-rank tensor-parallel group: two real processes on gloo
# ---------------------------------------------------------------------------------------------
def start_group(
    ckpt: str, logdir: Path, world: int = 2, extra_env: Callable[[int], dict[str, str]] | None = None
) -> list[Server]:
    master = str(free_port())
    ranks = []
    for rank in range(world):
        env = {
            **(extra_env(rank) if extra_env else {}),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": master,
        }
        ranks.append(Server(ckpt, free_port(), env, logdir / f"rank{rank}.log", "--served-model-name", "tiny"))
    for srv in ranks:
        srv.wait_ready()
    return ranks


def stop_group(ranks: list[Server]) -> list[int]:
    """SIGTERM to every rank at once, as when Kubernetes deletes the pods: rank 0 drains and
    broadcasts shutdown, the followers leave on it. Returns the exit codes (0 each when graceful)."""
    for srv in ranks:
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
    return [srv.stop(sig=None) for srv in ranks]


@pytest.fixture(scope="module")
def group(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    ranks = start_group(ckpt, tmp_path_factory.mktemp("group"))
    try:
        yield ranks
    finally:
        codes = stop_group(ranks)
    assert codes == [0, 0], f"graceful group stop exited {codes}:\n" + "\n".join(s.logs() for s in ranks)


def test_group_every_rank_serves_probes_and_metrics(group: list[Server]) -> None:
    for rank, srv in enumerate(group):
        assert srv.client.get("/healthz").status_code == 200
        assert srv.client.get("/readyz").json() == {"status": "ready", "rank": rank}
        m = metric_samples(srv)
        assert m[("tpi_ready", (("rank", str(rank)),))] == 1
    # Completions and models are rank 0's: the follower answers 404 in OpenAI's error shape.
    follower = group[1]
    err = error_of(follower.client.post("/v1/completions", json={"prompt": "a"}), 404)
    assert "rank 0" in err["message"]
    error_of(follower.client.get("/v1/models"), 404)


def test_group_greedy_matches_single_rank_and_follower_steps(
    group: list[Server],
    server: Server,
    hf: Any,
    tokenizer: Any,
) -> None:
    steps = ("tpi_engine_steps_total", (("rank", "1"),))
    before = metric_samples(group[1])[steps]
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    tp = complete(group[0], **body)["choices"][0]
    single = complete(server, **body)["choices"][0]
    assert tp == single
    assert tp["token_ids"] == hf_greedy(hf, tokenizer.encode(PROMPT).ids, 10)
    chunks = stream(group[0], **body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == tp["text"]
    # The follower mirrors rank 0's steps (this is what its heartbeat reports).
    assert metric_samples(group[1])[steps] >= before + len(tp["token_ids"])


def test_group_probes_before_the_group_forms_and_peer_death_exits_nonzero(ckpt: str, tmp_path: Path) -> None:
    """Rank 0 alone loads, then waits at the rendezvous: alive but not ready, completions 503. Once rank 1
    joins both are ready; when rank 1 dies (SIGKILL) rank 0's next collective fails and it exits
    non-zero instead of serving half a model."""
    master = str(free_port())

    def env(rank: int) -> dict[str, str]:
        return {
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": master,
        }

    rank0 = Server(ckpt, free_port(), env(0), tmp_path / "rank0.log")
    rank1: Server | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert rank0.proc.poll() is None, rank0.logs()
            assert time.monotonic() < deadline, f"rank 0 never answered /healthz:\n{rank0.logs()}"
            try:
                if rank0.client.get("/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # Loading, then waiting for rank 1 (with no deadline: see test_rendezvous).
        seen = []
        while not seen or seen[-1] != {"status": "waiting", "rank": 0, "waiting_for": [1]}:
            assert time.monotonic() < deadline, f"rank 0 never said it waits for rank 1: {seen}"
            r = rank0.client.get("/readyz")
            assert r.status_code == 503, r.text
            seen.append(r.json())
            time.sleep(0.2)
        assert all(s in ({"status": "loading", "rank": 0}, seen[-1]) for s in seen), seen
        err = error_of(rank0.client.post("/v1/completions", json={"prompt": "a"}), 503)
        assert err["code"] == "not_ready" and "waiting for ranks [1]" in err["message"]
        assert metric_samples(rank0)[("tpi_ready", (("rank", "0"),))] == 0

        rank1 = Server(ckpt, free_port(), env(1), tmp_path / "rank1.log")
        rank0.wait_ready()
        rank1.wait_ready()
        assert complete(rank0, prompt="a b", max_tokens=3, temperature=0)["choices"][0]["token_ids"]

        rank1.proc.kill()  # SIGKILL: no goodbye to the group
        rank1.proc.wait(10)
        try:
            code = rank0.proc.wait(60)  # the next idle step's broadcast fails
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 0 outlived its peer:\n{rank0.logs()}") from None
        assert code != 0, rank0.logs()
    finally:
        for srv in (rank0, rank1):
            if srv is not None:
                if srv.proc.poll() is None:
                    srv.proc.kill()
                srv.stop(sig=None)


def test_chat_without_a_template_is_400_naming_the_files(server: Server) -> None:
    r = server.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat"}]})
    err = error_of(r, 400)
    assert err["code"] == "chat_template_missing" and err["param"] == "messages"
    assert "chat_template.jinja" in err["message"] and "tokenizer_config.json" in err["message"]
