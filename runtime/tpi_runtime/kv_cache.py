"""The paged KV cache's bookkeeping: sizing the block pool from a memory budget, and the block
allocator rank 0's scheduler draws from.

Each rank holds, per layer, a K and a V pool of ``num_blocks`` blocks of ``BLOCK_SIZE`` tokens for
its own KV heads (``model.Transformer.setup_paged_cache``). A sequence owns a block table: the
blocks holding its positions 0..15, 16..31, ... in order. Block 0 is never handed out: it is the
scratch block that padding rows write to and that freed table entries point at (always masked).
Only rank 0 allocates; it broadcasts each step's block tables, so followers need no allocator.
"""

from __future__ import annotations

import heapq
import math

import torch

from .config import ModelConfig
from .tp import local_heads

BLOCK_SIZE = 16  # tokens per block, as vLLM's default
SCRATCH_BLOCK = 0
# The most K/V tokens one attention call gathers (per layer, for K and for V). Batched decodes
# are split into calls of at most this many, so a step's transient memory has a bound whatever
# the batch, which the KV cache's sizing on CUDA can reserve: 256 decodes at 4k tokens would
# otherwise gather 1M tokens a layer (4 GiB for an 8B model's K and V in bf16). Above what a CPU
# batch reaches (64 decodes of ~400 tokens), so CPU steps stay one call.
GATHER_TOKENS = 32 * 1024


class KVCacheTooSmallError(ValueError):
    """The budget cannot hold one max_model_len sequence (the runtime exits BAD_CONFIG)."""


def bytes_per_token(cfg: ModelConfig, rank: int, world_size: int, dtype: torch.dtype) -> int:
    """K and V of one token in every layer, for this rank's KV heads."""
    _, hkv, _ = local_heads(cfg, rank, world_size)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * hkv * cfg.head_dim * elem


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def gather_cap_tokens(max_model_len: int) -> int:
    """Keys one attention call gathers at most: GATHER_TOKENS, and never less than one
    max_model_len sequence (whose keys are gathered in one call)."""
    return max(GATHER_TOKENS, blocks_for(max_model_len) * BLOCK_SIZE)


def num_blocks_for_budget(budget_bytes: int, per_token: int) -> int:
    """Usable blocks (the scratch block not included) a budget pays for; may be <= 0."""
    return math.floor(budget_bytes / (per_token * BLOCK_SIZE)) - 1


def check_fits(num_blocks: int, per_token: int, budget_bytes: int, max_model_len: int, source: str) -> None:
    """Raise KVCacheTooSmallError, with the numbers, unless one max_model_len sequence fits."""
    need = blocks_for(max_model_len)
    if num_blocks >= need:
        return
    raise KVCacheTooSmallError(
        f"KV cache budget too small: {source} gives {budget_bytes} bytes per rank = "
        f"{max(0, num_blocks)} blocks of {BLOCK_SIZE} tokens ({max(0, num_blocks) * BLOCK_SIZE} tokens) at "
        f"{per_token} bytes per token, but one max_model_len={max_model_len} sequence needs {need} blocks "
        f"({need * BLOCK_SIZE} tokens, {(need + 1) * BLOCK_SIZE * per_token} bytes with the scratch block); "
        "raise --kv-cache-memory / --gpu-memory-utilization or lower --max-model-len"
    )


class BlockAllocator:
    """Free blocks 1..num_blocks, lowest first: a lone sequence's blocks then come out contiguous,
    which the attention reads as a view instead of a gather.

    ``limit`` caps the blocks in use below the pool (the effective batch size scales it down after
    an out-of-memory; see docs/contracts.md)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(1, num_blocks + 1))  # sorted: already a heap
        self.limit = num_blocks

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def available(self) -> int:
        return max(0, min(len(self._free), self.limit - self.used))

    def allocate(self, n: int) -> list[int]:
        if n > self.available:
            raise RuntimeError(f"{n} blocks asked, {self.available} available")  # callers check first
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b != SCRATCH_BLOCK:
                heapq.heappush(self._free, b)
