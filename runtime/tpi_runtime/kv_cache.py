"""The paged KV cache's bookkeeping: sizing the block pool from a memory budget, and the block
allocator rank 0's scheduler draws from.

Each rank holds, per layer, a K and a V pool of ``num_blocks`` blocks of ``BLOCK_SIZE`` tokens for
its own KV heads (``model.Transformer.setup_paged_cache``). A sequence owns a block table: the
blocks holding its positions 0..15, 16..31, ... in order. Block 0 is never handed out: it is the
scratch block that padding rows write to and that freed table entries point at (always masked).
Only rank 0 allocates; it broadcasts each step's block tables, so followers need no allocator.
"""

from __future__ import annotations

import collections
import heapq
import itertools
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
    """The pool's blocks 1..num_blocks. A sequence's next block is the one after its last when
    that one is free (or cached and held by none), else the lowest free one; a new table that the
    free blocks cannot hold starts among the cached blocks next to be evicted instead (below). A
    lone sequence's blocks then stay contiguous, also when earlier sequences' cached blocks fill
    the pool, and the attention reads them as a view instead of a gather.

    Blocks are reference-counted, and full ones can be kept in a prefix cache: a block holding
    tokens t after a cached prefix (its parent entry) is found again by (parent, t), so sequences
    whose tokens start the same way (the ``n`` choices of one prompt, a shared system prompt, a
    preempted sequence coming back) share those blocks instead of recomputing them. A cached block
    no sequence holds stays cached until the pool needs it, the least recently released first, and
    a table's blocks released together tail first, as vLLM does: a chain's later blocks are found
    only through its head, which other sequences may share too (a system prompt), so evicting the
    head first would strand the rest.

    ``limit`` caps the blocks in use below the pool (the effective batch size scales it down after
    an out-of-memory; see docs/contracts.md)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Neither held nor cached: a set, and a heap of them for the lowest (entries of blocks
        # taken out of order stay in it until popped or compacted, and are skipped).
        self._free_set = set(range(1, num_blocks + 1))
        self._free = list(range(1, num_blocks + 1))  # sorted: already a heap
        self._refs: dict[int, int] = {}  # block -> sequences holding it (> 0)
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, held by none
        self._by_key: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent entry, tokens) -> block
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._entry_of: dict[int, int] = {}  # cached block -> its entry (a fresh number per caching)
        self._entries = itertools.count(1)  # 0: the empty prefix
        self.limit = num_blocks

    @property
    def used(self) -> int:
        """Blocks some sequence holds (a shared block counts once)."""
        return len(self._refs)

    @property
    def cached(self) -> int:
        """Blocks in the prefix cache, held or not."""
        return len(self._key_of)

    @property
    def available(self) -> int:
        return max(0, min(len(self._free_set) + len(self._lru), self.limit - self.used))

    def allocate(self, n: int, after: int | None = None, grows_to: int = 0) -> list[int]:
        """``n`` blocks for a sequence whose table ends with block ``after`` (None: a new table,
        which may grow to ``grows_to`` blocks)."""
        if n > self.available:
            raise RuntimeError(f"{n} blocks asked, {self.available} available")  # callers check first
        out: list[int] = []
        prev = after
        if prev is None and n > len(self._free_set) and self._lru:
            prev = self._run_start(max(n, grows_to))
            if prev is None and grows_to > n:
                prev = self._run_start(n)
            if prev is not None:
                self._take(prev)
                self._refs[prev] = 1
                out.append(prev)
        for _ in range(n - len(out)):
            b = self._take_after(prev) if prev is not None else None
            if b is None:
                b = self._take_lowest_free()
            if b is None:  # evict the least recently released cached block
                b, _ = self._lru.popitem(last=False)
                self._uncache(b)
            self._refs[b] = 1
            out.append(b)
            prev = b
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one hold on each block of a table, head first (SCRATCH_BLOCK entries are skipped).
        The cached ones no sequence holds any more enter the eviction order tail first."""
        unheld: list[int] = []
        for b in blocks:
            if b == SCRATCH_BLOCK:
                continue
            left = self._refs[b] - 1
            if left:
                self._refs[b] = left
                continue
            del self._refs[b]
            if b in self._key_of:
                unheld.append(b)
            else:
                self._release(b)
        for b in reversed(unheld):
            self._lru[b] = None

    def _run_start(self, length: int) -> int | None:
        """The first block of a run of ``length`` blocks each free or among the cached blocks that
        taking ``length`` blocks evicts anyway (the next ones in eviction order), if there is one:
        a new table is contiguous there without evicting more than it needs. (Called when the
        free blocks cannot hold the table, so there are few of them.)"""
        doomed = itertools.islice(self._lru, max(0, length - len(self._free_set)))
        start, run, last = 0, 0, -1
        for b in sorted(itertools.chain(self._free_set, doomed)):
            start, run = (start, run + 1) if b == last + 1 else (b, 1)
            if run == length:
                return start
            last = b
        return None

    def _take(self, b: int) -> None:
        """Take a block that is free or cached and held by none."""
        if b in self._free_set:
            self._free_set.remove(b)
        else:
            del self._lru[b]
            self._uncache(b)

    def _take_after(self, prev: int) -> int | None:
        b = prev + 1
        if b in self._free_set or b in self._lru:  # contiguity is worth more than a cached block no one holds
            self._take(b)
            return b
        return None

    def _take_lowest_free(self) -> int | None:
        while self._free:
            b = heapq.heappop(self._free)
            if b in self._free_set:
                self._free_set.remove(b)
                return b
        return None

    def _release(self, b: int) -> None:
        self._free_set.add(b)
        heapq.heappush(self._free, b)
        if len(self._free) > 2 * len(self._free_set) + 64:  # drop the entries of blocks taken since
            self._free = sorted(self._free_set)

    # --- the prefix cache ---
    def lookup(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding ``tokens`` after the prefix entry ``parent`` (0: at position 0)."""
        return self._by_key.get((parent, tokens))

    def entry(self, block: int) -> int:
        """The prefix entry a cached block ends: the parent of the block after it."""
        return self._entry_of[block]

    def share_cost(self, blocks: list[int]) -> int:
        """How much ``available`` drops when ``share(blocks)`` takes them: cached blocks no one holds."""
        return sum(b not in self._refs for b in blocks)

    def share(self, blocks: list[int]) -> None:
        """Hold cached blocks (found by ``lookup``) once more each."""
        for b in blocks:
            self._lru.pop(b, None)
            self._refs[b] = self._refs.get(b, 0) + 1

    def cache(self, parent: int, tokens: tuple[int, ...], block: int) -> tuple[int, bool]:
        """Cache a full, held ``block`` as ``tokens`` after the entry ``parent``. Returns the entry the
        prefix now ends at (an existing one when a block already holds the same prefix, or when
        ``block`` is already cached, found by lookup) and whether ``block`` was newly cached."""
        found = self._by_key.get((parent, tokens))
        if found is not None:
            return self._entry_of[found], False
        if block in self._key_of:
            return self._entry_of[block], False
        entry = next(self._entries)
        self._by_key[(parent, tokens)] = block
        self._key_of[block] = (parent, tokens)
        self._entry_of[block] = entry
        return entry, True

    def forget(self, blocks: list[int]) -> None:
        """Take blocks out of the prefix cache (their contents were never written: a failed step)."""
        for b in blocks:
            if b not in self._key_of:
                continue
            self._uncache(b)
            if b in self._lru:  # held by none: free now
                del self._lru[b]
                self._release(b)

    def _uncache(self, b: int) -> None:
        del self._by_key[self._key_of.pop(b)]
        del self._entry_of[b]
