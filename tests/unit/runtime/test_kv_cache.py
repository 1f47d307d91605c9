"""The paged KV cache's pure parts: sizes, budget arithmetic, the block allocator, the scheduler's
decisions (chunks under the token budget, decodes first, admission by free blocks, preemption of
the newest, sliding-window freeing, the effective batch size's limits) and the step-memory estimate,
table-tested on real Request objects without a model."""

from __future__ import annotations

import itertools

import pytest
import torch
from tpi_runtime.config import ModelConfig
from tpi_runtime.engine import Request, SamplingParams
from tpi_runtime.kv_cache import (
    BLOCK_SIZE,
    SCRATCH_BLOCK,
    BlockAllocator,
    KVCacheTooSmallError,
    blocks_for,
    bytes_per_token,
    check_fits,
    num_blocks_for_budget,
)
from tpi_runtime.scheduler import Scheduler
from tpi_runtime.settings import RuntimeSettings, SettingsError, build_parser, max_num_batched_tokens_for, parse_bytes
from tpi_runtime.step_memory import step_bytes
from tpi_runtime.testing import TINY_CONFIG


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("1000", 1000),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512mi", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("64KiB", 65536),
        ("10k", 10_000),
        (" 3 GB ", 3 * 10**9),
    ],
)
def test_parse_bytes(text: str, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "lots", "2 GiBs", "-1G", "1e9"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes(text)


def settings(argv: list[str], env: dict[str, str] | None = None) -> RuntimeSettings:
    return RuntimeSettings.from_args(build_parser().parse_args(["serve", "--model", "m", *argv]), env or {})


def test_flags_and_env_fallback() -> None:
    s = settings([])
    assert (s.kv_cache_memory, s.gpu_memory_utilization, s.max_num_batched_tokens) == (None, 0.9, None)
    s = settings(["--kv-cache-memory", "2GiB", "--max-num-batched-tokens", "256"])
    assert (s.kv_cache_memory, s.max_num_batched_tokens) == (2 * 2**30, 256)
    env = {"TPI_KV_CACHE_MEMORY": "512MiB", "TPI_GPU_MEMORY_UTILIZATION": "0.5", "TPI_MAX_NUM_BATCHED_TOKENS": "64"}
    s = settings([], env)
    assert (s.kv_cache_memory, s.gpu_memory_utilization, s.max_num_batched_tokens) == (512 * 2**20, 0.5, 64)
    for argv, env, msg in [
        ([], {"TPI_KV_CACHE_MEMORY": "lots"}, "TPI_KV_CACHE_MEMORY"),
        (["--gpu-memory-utilization", "1.5"], {}, "gpu-memory-utilization"),
        (["--max-num-batched-tokens", "0"], {}, "max-num-batched-tokens"),
        (["--kv-cache-memory", "0"], {}, "kv-cache-memory"),
    ]:
        with pytest.raises(SettingsError, match=msg):
            settings(argv, env)


def test_bytes_per_token_follows_the_kv_shards() -> None:
    cfg = ModelConfig.from_dict(TINY_CONFIG)  # 2 layers, 2 KV heads of 16
    assert bytes_per_token(cfg, 0, 1, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert bytes_per_token(cfg, 1, 2, torch.float32) == 2 * 2 * 1 * 16 * 4
    assert bytes_per_token(cfg, 3, 4, torch.bfloat16) == 2 * 2 * 1 * 16 * 2  # 4 ranks replicate 2 heads


def test_budget_arithmetic_and_the_too_small_message() -> None:
    per = 512
    assert num_blocks_for_budget(9 * BLOCK_SIZE * per, per) == 8  # one block is the scratch block
    assert num_blocks_for_budget(100, per) == -1
    check_fits(8, per, 9 * BLOCK_SIZE * per, 128, "x")  # exactly one 128-token sequence: fine
    with pytest.raises(KVCacheTooSmallError) as e:
        check_fits(7, per, 8 * BLOCK_SIZE * per, 128, "--kv-cache-memory=65536")
    msg = str(e.value)
    assert "--kv-cache-memory=65536 gives 65536 bytes per rank = 7 blocks" in msg
    assert "512 bytes per token" in msg and "needs 8 blocks (128 tokens" in msg


def test_allocator_lowest_first_limit_and_scratch() -> None:
    a = BlockAllocator(6)
    assert a.allocate(3) == [1, 2, 3] and a.used == 3 and a.available == 3
    a.free([2, SCRATCH_BLOCK])  # the scratch block is never pooled
    assert a.allocate(2) == [2, 4]
    a.limit = 4
    assert a.available == 0
    with pytest.raises(RuntimeError):
        a.allocate(1)
    a.free([1, 2, 3, 4])
    assert a.used == 0 and a.available == 4


_PROMPTS = itertools.count()


def req(n_prompt: int, max_tokens: int = 100, prompt: list[int] | None = None) -> Request:
    """A request of ``n_prompt`` tokens no other request starts with (unless ``prompt`` is given)."""
    first = 1000 * next(_PROMPTS)
    prompt = prompt if prompt is not None else list(range(first, first + n_prompt))
    return Request("r", prompt, SamplingParams(max_tokens=max_tokens))


def make(
    blocks: int,
    *,
    batch: int = 8,
    budget: int = 64,
    max_len: int = 64,
    window: int | None = None,
    prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        BlockAllocator(blocks),
        max_batch_size=batch,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        window=window,
        prefix_caching=prefix_caching,
    )


def run_step(s: Scheduler, effective: int = 8) -> list[tuple[Request, int, int]]:
    """Schedule, then pretend the step ran: advance, and give every sampling sequence a token."""
    plan = s.schedule(effective)
    for sc in plan:
        s.advance(sc)
        if sc.samples:
            sc.req._tokens.append(7)
            sc.req._decoding = True
    return [(sc.req, sc.pos0, sc.n) for sc in plan]


def test_long_prompt_is_chunked_and_decodes_come_first() -> None:
    s = make(40, budget=16)
    a = req(5)
    s.waiting.append(a)
    assert run_step(s) == [(a, 0, 5)]
    b = req(40)
    s.waiting.append(b)
    # a decodes every step; b's 40 tokens come in chunks of what is left of the budget.
    assert run_step(s) == [(a, 5, 1), (b, 0, 15)]
    assert run_step(s) == [(a, 6, 1), (b, 15, 15)]
    assert run_step(s) == [(a, 7, 1), (b, 30, 10)]
    assert run_step(s) == [(a, 8, 1), (b, 40, 1)]
    assert b._blocks == [2, 3, 4] and a._blocks == [1]  # admission took the whole prompt's blocks


def test_admission_waits_for_blocks_first_come_first_served() -> None:
    s = make(5, max_len=32)
    a, b, c = req(40), req(40), req(3)
    s.waiting.extend([a, b, c])
    plan = run_step(s)
    # b needs 3 blocks, 2 are left; c would fit, but waits behind b.
    assert plan == [(a, 0, 40)] and list(s.waiting) == [b, c]
    assert s.alloc.available == 2
    s.release(a)
    assert [r for r, _, _ in run_step(s)] == [b, c]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["recomputed", "from-the-prefix-cache"])
def test_out_of_blocks_preempts_the_newest_and_it_recomputes(prefix_caching: bool) -> None:
    s = make(4, max_len=32, prefix_caching=prefix_caching)
    a, b = req(16), req(30)
    s.waiting.extend([a, b])
    run_step(s)  # a: 1 block (16 tokens), b: 2 blocks (30 tokens); 1 block left
    assert s.alloc.available == 1
    plan = run_step(s)  # a's 17th token takes the last block; b's 31st still fits its 2nd block
    assert plan == [(a, 16, 1), (b, 30, 1)] and s.alloc.available == 0
    assert run_step(s) == [(a, 17, 1), (b, 31, 1)]
    plan = run_step(s)
    # b crosses into a 3rd block: none free, so b (the newest) is preempted; a keeps decoding.
    assert plan == [(a, 18, 1)]
    assert list(s.waiting) == [b] and b._blocks == [] and b._num_cached == 0 and s.preemptions == 1
    s.release(a)
    plan = run_step(s)
    if prefix_caching:  # its 2 full blocks were kept: only its last token is computed again
        assert plan == [(b, 32, 1)] and s.prefix_hit_tokens == 32
    else:
        assert plan == [(b, 0, 33)], "readmitted: prompt + its generated tokens recomputed in one chunk"


def test_sliding_window_frees_blocks_nobody_can_attend() -> None:
    s = make(10, budget=100, max_len=100, window=7)
    a = req(50)
    s.waiting.append(a)
    run_step(s)  # 50 cached: future queries (>= 50) see keys >= 44, so blocks 0-1 (0..31) are dead
    assert a._blocks[:2] == [SCRATCH_BLOCK, SCRATCH_BLOCK] and a._blocks[2:] == [3, 4]
    assert s.window_freed == 2 and s.alloc.used == 2
    s.release(a)
    assert s.alloc.used == 0


def test_effective_batch_scales_sequences_budget_and_blocks() -> None:
    s = make(32, batch=8, budget=64, max_len=64)
    rs = [req(10) for _ in range(6)]
    s.waiting.extend(rs)
    assert len(run_step(s, effective=8)) == 6
    plan = s.schedule(2)  # halved twice: 2 sequences, a 16-token budget, 8 of 32 blocks
    assert [sc.req for sc in plan] == rs[:2]
    assert s.token_budget(2) == 16 and s.alloc.limit == 8
    assert list(s.waiting) == rs[2:] and s.preemptions == 4
    assert s.token_budget(1) == 8
    s2 = make(8, batch=8, budget=64, max_len=128)
    s2.schedule(1)
    assert s2.alloc.limit == blocks_for(128), "never below one max_model_len sequence"


def test_step_estimate_has_no_attention_scores() -> None:
    shape = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 512}
    cfg = ModelConfig.from_dict({**TINY_CONFIG, **shape})

    def est(n_tokens: int, ctx: int, masked: bool = True) -> int:
        one = step_bytes(
            cfg, 0, 1, torch.bfloat16, n_seqs=1, n_tokens=n_tokens, max_ctx=ctx, batched_decode=False, masked=masked
        )
        return one

    # A whole 4k prompt from position 0 runs causal, without a mask: linear in its length.
    assert est(4096, 4096, masked=False) < 2.01 * est(2048, 2048, masked=False)
    scores = 32 * 4096 * 4096 * 2  # what materialized scores alone would take
    assert est(4096, 4096, masked=False) < scores / 10
    # A later chunk carries a [chunk, ctx] mask: counted, but far below heads x chunk x ctx scores.
    assert est(512, 4096) - est(512, 4096, masked=False) == 512 * 4096 * 3


@pytest.mark.parametrize(
    ("device", "configured", "budget"), [("cpu", None, 64), ("cuda", None, 2048), ("cpu", 512, 512), ("cuda", 16, 16)]
)
def test_step_token_budget_defaults_per_device(device: str, configured: int | None, budget: int) -> None:
    # A CPU prefills ~1 token/ms per core: a GPU-sized chunk would stall running streams for seconds.
    assert max_num_batched_tokens_for(device, configured) == budget
