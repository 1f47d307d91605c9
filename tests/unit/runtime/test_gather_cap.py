"""The bound on what one attention call gathers (kv_cache.gather_cap_tokens): batched decodes are
split into calls of at most that many keys, on the eager path and on the static one (what CUDA
graphs capture), with the same logits as one call; and the step estimate the KV cache's sizing on
CUDA reserves covers what a step of max_batch_size decodes at max_model_len gathers, without
growing with the batch past the cap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tpi_runtime.config import ModelConfig
from tpi_runtime.cuda_graphs import DecodeGraphRunner
from tpi_runtime.dist import Dist, DistEnv
from tpi_runtime.kv_cache import BLOCK_SIZE, GATHER_TOKENS, blocks_for, gather_cap_tokens
from tpi_runtime.model import BatchMeta, Transformer, decode_buckets
from tpi_runtime.step_memory import step_bytes
from tpi_runtime.testing import TINY_CONFIG

from .test_static_decode import build

# Five prompts of 3 blocks each: uncapped, their decodes are one batched call.
PROMPTS = [[1, *((13 + 5 * i + 7 * j) % 250 for j in range(40 + i))] for i in range(5)]


def test_buckets_split_at_the_cap() -> None:
    three_blocks = [40, 41, 42, 43, 44]
    assert decode_buckets(three_blocks) == [[0, 1, 2, 3, 4]]
    # 2 rows x 3 blocks x 16 = 96 keys a call at most
    assert decode_buckets(three_blocks, max_tokens=96) == [[0, 1], [2, 3], [4]]
    # a row alone may exceed it (the real cap is never below one max_model_len sequence)
    assert decode_buckets([300, 40], max_tokens=96) == [[1], [0]]
    # the longest-first padding rule still applies under a cap that would allow more
    assert decode_buckets([5, 4096, 40], max_tokens=10**6) == [[0], [2], [1]]


def test_cap_is_never_below_one_sequence() -> None:
    assert gather_cap_tokens(4096) == GATHER_TOKENS
    assert gather_cap_tokens(100_000) == blocks_for(100_000) * BLOCK_SIZE


def prefill(model: Transformer) -> list[int]:
    nxt = []
    for slot, p in enumerate(PROMPTS):
        logits = model(torch.tensor(p), BatchMeta.build([(slot, 0, len(p))], model.device))
        nxt.append(int(logits[0].argmax()))
    return nxt


def test_capped_batched_decode_matches_one_call(ckpt_main: str) -> None:
    model = build(ckpt_main, slots=len(PROMPTS))
    nxt = prefill(model)
    seqs = [(slot, len(p), 1) for slot, p in enumerate(PROMPTS)]
    one_call = BatchMeta.build(seqs, model.device)
    want = model(torch.tensor(nxt), one_call)
    assert len(one_call.decode_buckets) == 1
    model.gather_cap = 2 * 3 * BLOCK_SIZE  # two rows of 3 blocks a call
    capped = BatchMeta.build(seqs, model.device)
    got = model(torch.tensor(nxt), capped)
    assert [b.tables_t.shape[0] for b in capped.decode_buckets] == [2, 2, 1]
    assert capped.gather_scratch is not None and capped.gather_scratch[0].shape[0] * BLOCK_SIZE <= model.gather_cap
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_capped_static_decode_matches_one_call(ckpt_main: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The static path attends rows in calls of gather_cap // L rows (L: the 128-key bucket here)."""
    model = build(ckpt_main, slots=len(PROMPTS))
    nxt = prefill(model)
    seqs = [(slot, len(p), 1) for slot, p in enumerate(PROMPTS)]
    runner = DecodeGraphRunner(model, capture=False)
    want = runner(nxt, seqs)
    model.gather_cap = 2 * 128  # two rows a call: calls of 2, 2 and 1 rows
    sdpa, rows_per_call = F.scaled_dot_product_attention, []

    def counting(q: torch.Tensor, k: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        rows_per_call.append(k.shape[0])
        return sdpa(q, k, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    got = runner(nxt, seqs)
    assert rows_per_call == [2, 2, 1] * model.cfg.num_hidden_layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    eager = model(torch.tensor(nxt), BatchMeta.build(seqs, model.device))
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)


def test_largest_step_estimate_covers_the_gather_and_stops_growing_at_the_cap() -> None:
    """256 decodes at 4096 tokens would gather 1M keys a layer in one call. Under the cap they
    gather at most GATHER_TOKENS a call; the step estimate (what sizing on CUDA reserves)
    covers that scratch, and past the cap grows only by the per-sequence terms (masks, logits)."""
    shape = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 512, "max_position_embeddings": 4096}
    cfg = ModelConfig.from_dict({**TINY_CONFIG, **shape})
    model = Transformer(cfg, Dist(DistEnv(0, 1, 0, "127.0.0.1", 0)), dtype=torch.bfloat16, device=torch.device("cpu"))
    max_len, batch = 4096, 256
    model.setup_paged_cache(num_blocks=1, max_len=max_len)  # prepare only addresses blocks
    per_seq = blocks_for(max_len)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    meta = model.prepare(BatchMeta.paged([(t, max_len - 1, 1) for t in tables], model.device))
    assert sum(b.tables_t.shape[0] for b in meta.decode_buckets) == batch
    assert all(b.tables_t.numel() * BLOCK_SIZE <= GATHER_TOKENS for b in meta.decode_buckets)
    assert meta.gather_scratch is not None
    scratch_bytes = sum(t.numel() * t.element_size() for t in meta.gather_scratch)

    def estimate(n_seqs: int, cap: int | None) -> int:
        return step_bytes(
            cfg, 0, 1, torch.bfloat16, n_seqs=n_seqs, n_tokens=2048, max_ctx=max_len, batched_decode=True,
            gather_cap=cap,
        )  # fmt: skip

    capped = estimate(batch, gather_cap_tokens(max_len))
    assert capped >= scratch_bytes
    assert estimate(batch, None) > 8 * capped  # what an unbounded gather would have needed
    per_seq_terms = estimate(batch, gather_cap_tokens(max_len)) - estimate(batch // 2, gather_cap_tokens(max_len))
    assert per_seq_terms < scratch_bytes / 4
