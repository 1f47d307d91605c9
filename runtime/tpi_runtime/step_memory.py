"""How much accelerator memory one forward step needs beyond the weights and the KV cache: the
engine's out-of-memory pre-check (``Engine._preflight``) reserves it before any collective, and the
KV cache's sizing on CUDA leaves it free.

Counted: per-token activations, the attention working set and the logits. Not counted: attention
scores, which SDPA's flash and memory-efficient kernels never materialize (the step's masks are
counted instead: a chunk's boolean mask and its conversion to the model dtype).
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .kv_cache import BLOCK_SIZE, blocks_for
from .tp import local_heads


def step_bytes(
    cfg: ModelConfig,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    *,
    n_seqs: int,
    n_tokens: int,
    max_ctx: int,
    batched_decode: bool,
    masked: bool = True,
    prompt_rows: int = 0,
    prompt_rows_at_once: int = 1,
    gather_cap: int | None = None,
) -> int:
    """An upper estimate of one step's transient memory on this rank, in bytes. ``masked``: some
    sequence's chunk needs an explicit mask (a chunk after the first, or a sliding window); a
    whole prompt from position 0 runs causal, without one. ``prompt_rows``: tokens whose logits
    give prompt logprobs, projected ``prompt_rows_at_once`` at a time. ``gather_cap``: the most
    keys one attention call gathers (kv_cache.gather_cap_tokens; None: no bound)."""
    hq, hkv, _ = local_heads(cfg, rank, world_size)
    d, elem = cfg.head_dim, torch.empty((), dtype=dtype).element_size()
    il = cfg.intermediate_size // world_size
    # Residual stream, norm output, attention and MLP outputs (and their all-reduce buffers); the
    # fused qkv output and its RoPE'd copy; the attention output and its reshaped copy; gate_up.
    per_token = 5 * cfg.hidden_size + 2 * (hq + 2 * hkv) * d + 2 * hq * d + 2 * il
    activations = n_tokens * per_token * elem
    # Attention working set, one layer at a time: gathered K and V of the sequences attended
    # together (with two or more decodes in the step, batched_decode: all of them, padded to the
    # longest, in calls of at most gather_cap keys; otherwise one sequence at a time; whole
    # blocks either way), GQA's broadcast of them to the query heads should the kernel expand
    # it, and the masks (boolean, then in the model dtype): the batched decodes' and a chunk's.
    seq_tokens = blocks_for(max_ctx) * BLOCK_SIZE
    kv_tokens = n_seqs * seq_tokens if batched_decode else seq_tokens
    if gather_cap is not None:
        kv_tokens = min(kv_tokens, max(gather_cap, seq_tokens))
    gathered = 2 * kv_tokens * (hkv + hq) * d * elem
    decode_masks = n_seqs * max_ctx * (1 + elem) if batched_decode else 0
    chunk_mask = min(n_tokens, max_ctx) * max_ctx * (1 + elem) if masked and n_tokens > n_seqs else 0
    masks = decode_masks + chunk_mask
    # float32 logits: this rank's vocabulary shard, the all-gathered rows, and sampling's copies.
    logits = 4 * n_seqs * cfg.vocab_size * 4
    if prompt_rows:  # their kept hidden states, and one slice's logits (shard, gathered, log-softmax)
        logits += prompt_rows * cfg.hidden_size * elem + 4 * min(prompt_rows, prompt_rows_at_once) * cfg.vocab_size * 4
    return activations + gathered + masks + logits
