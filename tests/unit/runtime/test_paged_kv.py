"""The paged KV cache and chunked prefill through the engine, in real rank processes (gloo):
mixed-length requests in a pool too small for them together (admission waits, decodes preempt
the newest request) give each request its tokens from alone; a long prompt is prefilled in chunks
while running streams keep decoding; the sliding window (Mistral) frees blocks and still matches
transformers; a budget that cannot hold one max_model_len sequence exits 2 with the numbers."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
from tpi_contract import exitcodes
from tpi_runtime.testing import load_hf_model

from . import test_parity as parity
from .conftest import REPO, rank_env, run_ranks
from .rank_worker import PROMPTS
from .test_engine import run_scenario

BUDGET = 16  # --max-num-batched-tokens of the chunked scenario
MAX_LEN = 128  # the worker's max_model_len: 8 blocks of 16


def hf_tokens(model: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens (no eos stop: the scenarios set ignore_eos)."""
    return list(parity.hf_greedy(model, prompt, n)["tokens"])


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_lengths_in_a_small_pool_match_alone_with_preemption(tp: int, ckpt_main: str) -> None:
    # 10 blocks: one max_model_len sequence (8) fits, the six requests together (~30 blocks) do not.
    res = run_scenario(ckpt_main, "paged", tp, env={"T_KV_BLOCKS": "10"})[0]
    assert res["stats"]["kv_blocks_total"] == 10
    assert res["max_running"] >= 2, "requests never ran together"
    assert res["preemptions"] >= 1, "the pool never ran out: the test does not exercise preemption"
    assert res["max_blocks_used"] <= 10
    for i, (alone, together) in enumerate(zip(res["alone"], res["together"], strict=True)):
        assert "error" not in together, together
        assert together == alone, f"request {i}"
    hf = load_hf_model(ckpt_main)
    for i in (0, 3):  # the shortest and the longest prompt, against transformers
        assert res["alone"][i]["tokens"] == hf_tokens(hf, res["prompts"][i], len(res["alone"][i]["tokens"]))
    assert res["stats"]["kv_blocks_used"] == 0, "blocks leaked"


@pytest.mark.parametrize("tp", [1, 2])
def test_long_prompt_is_chunked_between_running_decodes(tp: int, ckpt_main: str) -> None:
    res = run_scenario(ckpt_main, "chunked", tp, env={"T_MAX_TOKENS": str(BUDGET)})[0]
    steps = res["steps"]
    assert all(s["num_prefill_tokens"] + s["num_decode_tokens"] <= BUDGET for s in steps)
    long_id, n_prompt = res["long_id"], len(res["long_prompt"])
    prefill_steps = [s for s in steps if long_id in s["request_ids"] and s["num_prefill_tokens"] > 0]
    # 3 streams decode in every one of those steps, so each chunk is at most BUDGET - 3 tokens.
    assert len(prefill_steps) >= math.ceil(n_prompt / (BUDGET - 3)), prefill_steps
    for s in prefill_steps:
        assert s["num_decode_seqs"] == 3 and set(res["stream_ids"]) <= set(s["request_ids"]), s
    assert sum(s["num_prefill_tokens"] for s in prefill_steps) == n_prompt
    together = res["together"]
    assert together[-1] == res["alone"]
    assert together[:3] == res["streams_alone"]
    hf = load_hf_model(ckpt_main)
    assert res["alone"]["tokens"] == hf_tokens(hf, res["long_prompt"], 8)


def test_sliding_window_frees_blocks_and_matches_transformers(ckpt_families: dict[str, str]) -> None:
    """Mistral, window 7: a 100-token prompt in chunks of up to 13, beside 3 decoding streams."""
    d = ckpt_families["mistral"]
    res = run_scenario(d, "chunked", 1, env={"T_MAX_TOKENS": str(BUDGET)})[0]
    assert res["stats"]["kv_blocks_freed_by_window"] > 0
    hf = load_hf_model(d)
    assert res["alone"]["tokens"] == hf_tokens(hf, res["long_prompt"], 8)
    assert res["together"][-1] == res["alone"]
    for p, got in zip(PROMPTS[:3], res["together"][:3], strict=True):
        assert got["tokens"] == hf_tokens(hf, p, 60)


def _generate(ckpt: str, *extra: str) -> list[str]:
    return ["-m", "tpi_runtime", "generate", "--model", ckpt, "--device", "cpu", "--prompt-ids", "1,2", *extra]


@pytest.mark.parametrize("tp", [1, 2])
def test_budget_below_one_sequence_exits_2_with_the_numbers(tp: int, ckpt_main: str) -> None:
    # 32 KiB per rank; one token is 2 layers x K,V x (2 / tp) KV heads x 16 dims x 4 bytes, so
    # 3 (tp 1) or 7 (tp 2) blocks of 16 tokens besides the scratch block: one short of 8.
    per_token = 2 * 2 * (2 // tp) * 16 * 4
    argv = _generate(ckpt_main, "--max-model-len", "128", "--kv-cache-memory", "32KiB")
    results = run_ranks(tp, argv, timeout=120)
    for r in results:
        assert r.returncode == exitcodes.BAD_CONFIG, (r.returncode, r.stderr[-2000:])
        msg = r.stderr
        assert "KV cache budget too small" in msg
        assert f"{32 * 1024} bytes per rank" in msg
        assert f"{per_token} bytes per token" in msg
        assert "max_model_len=128 sequence needs 8 blocks (128 tokens" in msg


def test_budget_that_fits_generates(ckpt_main: str) -> None:
    """The same command with a budget of exactly one sequence (+ scratch block) runs; env fallback."""
    env = rank_env(0, 1, 0, {"TPI_KV_CACHE_MEMORY": f"{9 * 16 * 512}"})
    out = subprocess.run(
        [sys.executable, *_generate(ckpt_main, "--max-model-len", "128", "--max-tokens", "3")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finish_reason: length" in out.stdout
    assert "KV cache 8 blocks" in out.stderr


def test_bad_size_is_a_config_error(ckpt_main: str) -> None:
    out = subprocess.run(
        [sys.executable, *_generate(ckpt_main, "--kv-cache-memory", "lots")],
        env=rank_env(0, 1, 0),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == exitcodes.BAD_CONFIG and "--kv-cache-memory" in out.stderr, out.stderr
