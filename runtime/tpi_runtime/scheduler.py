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
    ) -> None:
        self.alloc = allocator
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.min_blocks = blocks_for(max_model_len)  # one max_model_len sequence always fits
        self.window = window
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.window_freed = 0  # blocks returned early because they fell out of the sliding window

    def token_budget(self, effective: int) -> int:
        """The step's token budget at this effective batch size (at least one token per sequence)."""
        return max(effective, self.max_num_batched_tokens * effective // self.max_batch_size)

    def schedule(self, effective: int) -> list[Scheduled]:
        """The next step's work, in running order (oldest admitted first). Call under the engine lock."""
        self.alloc.limit = max(self.min_blocks, self.alloc.num_blocks * effective // self.max_batch_size)
        while len(self.running) > effective:
            self.preempt(self.running[-1])
        budget = self.token_budget(effective)
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
                r._blocks += self.alloc.allocate(need)
            plan[id(r)] = (r._num_cached, 1)
            budget -= 1
        for r in self.running:  # 2. prefills in progress
            if budget <= 0:
                break
            if id(r) not in plan:
                n = min(len(r._tokens) - r._num_cached, budget)
                plan[id(r)] = (r._num_cached, n)
                budget -= n
        while self.waiting and len(self.running) < effective and budget > 0:  # 3. admissions
            r = self.waiting[0]
            need = blocks_for(len(r._tokens))
            if need > self.alloc.available:
                break  # first come, first served: it waits for blocks to come back
            self.waiting.popleft()
            r._blocks = self.alloc.allocate(need)
            r._decoding = False
            self.running.append(r)
            n = min(len(r._tokens), budget)
            plan[id(r)] = (0, n)
            budget -= n
        return [Scheduled(r, *plan[id(r)]) for r in self.running if id(r) in plan]

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
        r._decoding = False

    def preempt(self, r: Request) -> None:
        """Back to the head of the queue; its tokens so far are recomputed when it is readmitted."""
        self.release(r)
        self.waiting.appendleft(r)
        self.preemptions += 1
