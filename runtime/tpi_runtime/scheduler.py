"""Rank 0's scheduler: which requests run in the next step, how many of their tokens, and which KV
blocks hold them (paged cache, kv_cache.py; chunked prefill).

Each step has a token budget. In order:

1. every running sequence that decodes gets its one token, and a new block when it crosses a block
   boundary; when none is free, the newest running request is preempted (its blocks dropped, the
   request put back at the head of the queue, its prompt + generated tokens recomputed later);
2. running sequences still prefilling get their next chunk, as far as the budget allows;
3. waiting requests are admitted (first come, first served) while the running count is under the
   effective batch size, budget is left and free blocks hold the request's whole prompt; each
   starts with a chunk of its prompt.

So running streams produce a token every step while a long prompt is prefilled in chunks beside
them. With a sliding window, blocks that fall entirely before every future query's window go back
to the pool as the sequence advances.

Prefix caching (models without a sliding window): every block a step fills is cached by its
tokens and the prefix before them (kv_cache.BlockAllocator). An admitted request takes the
cached blocks its tokens start with and prefills from there, never its last token (its logits
give the first new one). The blocks cached by a step count from that step on: the ``n`` choices
of a prompt admitted together share the blocks the first one fills in the same step, since every
layer writes the step's K/V before any sequence attends. A request that wants prompt logprobs
takes no cached block (each prompt token's logits are needed).

The effective batch size (an out-of-memory halving, or the operator's ``--effective-batch-size``)
scales three limits by effective / max batch size: running sequences, the step's token budget and
the blocks in use (never below one max_model_len sequence), so it shrinks the step's activations
and its attention working set (docs/contracts.md).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, BlockAllocator, blocks_for

if TYPE_CHECKING:
    from .engine import Request


@dataclass(frozen=True)
class Scheduled:
    """One sequence's share of a step: tokens [pos0, pos0 + n) of its prompt + generated tokens."""

    req: Request
    pos0: int
    n: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token (its logits give the next token)."""
        return self.pos0 + self.n == len(self.req._tokens)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        window: int | None,
        prefix_caching: bool = True,
    ) -> None:
        self.alloc = allocator
        # With a window, the blocks a sequence no longer attends are freed (advance), so a prefix
        # is not kept whole: no caching.
        self.prefix_caching = prefix_caching and window is None
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.min_blocks = blocks_for(max_model_len)  # one max_model_len sequence always fits
        self.window = window
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.window_freed = 0  # blocks returned early because they fell out of the sliding window
        self.prefix_hit_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        # This step's caching, undone by step_failed: blocks newly cached, requests admitted on hits.
        self._step_cached: list[int] = []
        self._step_hits: list[Request] = []

    def token_budget(self, effective: int) -> int:
        """The step's token budget at this effective batch size (at least one token per sequence)."""
        return max(effective, self.max_num_batched_tokens * effective // self.max_batch_size)

    def schedule(self, effective: int) -> list[Scheduled]:
        """The next step's work, in running order (oldest admitted first). Call under the engine lock."""
        self.alloc.limit = max(self.min_blocks, self.alloc.num_blocks * effective // self.max_batch_size)
        while len(self.running) > effective:
            self.preempt(self.running[-1])
        budget = self.token_budget(effective)
        self._step_cached, self._step_hits = [], []
        plan: dict[int, tuple[int, int]] = {}  # id(request) -> (pos0, n)
        for r in list(self.running):  # 1. decodes
            if r not in self.running or len(r._tokens) - r._num_cached != 1:
                continue
            need = blocks_for(r._num_cached + 1) - len(r._blocks)
            while need > self.alloc.available and self.running:
                victim = self.running[-1]  # the newest: the least work lost
                self.preempt(victim)
                if victim is r:
                    break
            if r not in self.running:
                break  # r was the newest left: every later request is preempted too
            if need > 0:
                r._blocks += self.alloc.allocate(need, after=r._blocks[-1] if r._blocks else None)
            self._plan(plan, r, r._num_cached, 1)
            budget -= 1
        for r in self.running:  # 2. prefills in progress
            if budget <= 0:
                break
            if id(r) not in plan:
                n = min(len(r._tokens) - r._num_cached, budget)
                self._plan(plan, r, r._num_cached, n)
                budget -= n
        while self.waiting and len(self.running) < effective and budget > 0:  # 3. admissions
            r = self.waiting[0]
            hits, entries = self._cached_prefix(r)
            need = blocks_for(len(r._tokens)) - len(hits)
            if need + self.alloc.share_cost(hits) > self.alloc.available:
                break  # first come, first served: it waits for blocks to come back
            self.waiting.popleft()
            self.alloc.share(hits)  # before allocate: an eviction must not take them
            # How far its table may grow: a new table is laid out where it can grow contiguously.
            grows_to = min(blocks_for(len(r.prompt_ids) + r.params.max_tokens), self.min_blocks) - len(hits)
            r._blocks = hits + self.alloc.allocate(need, after=hits[-1] if hits else None, grows_to=grows_to)
            r._num_cached = len(hits) * BLOCK_SIZE
            r._entries = entries
            if hits:
                self.prefix_hit_tokens += r._num_cached
                self._step_hits.append(r)
            r._decoding = False
            self.running.append(r)
            n = min(len(r._tokens) - r._num_cached, budget)
            self._plan(plan, r, r._num_cached, n)
            budget -= n
        return [Scheduled(r, *plan[id(r)]) for r in self.running if id(r) in plan]

    def _plan(self, plan: dict[int, tuple[int, int]], r: Request, pos0: int, n: int) -> None:
        """Put tokens [pos0, pos0 + n) of ``r`` in the step, and cache the blocks they fill."""
        plan[id(r)] = (pos0, n)
        if not self.prefix_caching:
            return
        for i in range(len(r._entries), (pos0 + n) // BLOCK_SIZE):
            tokens = tuple(r._tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            entry, new = self.alloc.cache(r._entries[-1] if r._entries else 0, tokens, r._blocks[i])
            r._entries.append(entry)
            if new:
                self._step_cached.append(r._blocks[i])

    def _cached_prefix(self, r: Request) -> tuple[list[int], list[int]]:
        """The cached blocks ``r``'s tokens start with (never the one with its last token), and the
        prefix entry each ends."""
        hits: list[int] = []
        entries: list[int] = []
        if not self.prefix_caching or r.params.prompt_logprobs is not None:
            return hits, entries
        for i in range((len(r._tokens) - 1) // BLOCK_SIZE):
            tokens = tuple(r._tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            b = self.alloc.lookup(entries[-1] if entries else 0, tokens)
            if b is None:
                break
            hits.append(b)
            entries.append(self.alloc.entry(b))
        return hits, entries

    def step_failed(self) -> None:
        """The last scheduled step did not run (out of memory): the blocks it cached hold nothing,
        and a request admitted on them must not attend to them. Uncache them, and send the
        requests admitted on cached blocks back to the head of the queue to look again."""
        self.alloc.forget(self._step_cached)
        for r in reversed(self._step_hits):
            if r in self.running:
                self.preempt(r)
        for r in self.running:  # what they cached this step is no longer cached
            del r._entries[r._num_cached // BLOCK_SIZE :]
        self._step_cached, self._step_hits = [], []

    def advance(self, s: Scheduled) -> None:
        """After a step: the chunk's K/V is cached; free blocks no future query can attend to."""
        r = s.req
        r._num_cached = s.pos0 + s.n
        if self.window is None:
            return
        # Every future query sits at >= _num_cached and sees keys > its position - window.
        dead = min((r._num_cached - self.window + 1) // BLOCK_SIZE, len(r._blocks))
        for b in range(dead):
            if r._blocks[b] != SCRATCH_BLOCK:
                self.alloc.free([r._blocks[b]])
                r._blocks[b] = SCRATCH_BLOCK
                self.window_freed += 1

    def release(self, r: Request) -> None:
        """Drop a request's blocks and cached state (finished, cancelled or preempted)."""
        if r in self.running:
            self.running.remove(r)
        self.alloc.free(r._blocks)
        r._blocks = []
        r._num_cached = 0
        r._entries = []
        r._decoding = False

    def preempt(self, r: Request) -> None:
        """Back to the head of the queue; its tokens so far are recomputed when it is readmitted."""
        self.release(r)
        self.waiting.appendleft(r)
        self.preemptions += 1
