"""Prefix caching (kv_cache.BlockAllocator, scheduler.py): the allocator's reference counts and
cache, the scheduler's sharing table-tested, and the engine in real rank processes (gloo): the
``n`` choices of a prompt share its blocks and give the tokens they give with caching off, greedy
ones transformers' tokens, at TP 1 and 2."""

from __future__ import annotations

import pytest
from tpi_runtime.engine import Request, SamplingParams
from tpi_runtime.kv_cache import BlockAllocator
from tpi_runtime.testing import load_hf_model

from . import test_parity as parity
from .test_engine import run_scenario
from .test_kv_cache import make, req, run_step

T = tuple(range(16))  # one block's tokens


def test_allocator_counts_holds_and_keeps_released_cached_blocks_until_needed() -> None:
    a = BlockAllocator(3)
    b1, b2 = a.allocate(2)
    e1, new = a.cache(0, T, b1)
    assert new and a.lookup(0, T) == b1 and a.entry(b1) == e1
    assert a.cache(0, T, b2) == (e1, False), "the same prefix stays cached once"
    assert a.share_cost([b1]) == 0
    a.share([b1])  # a second sequence holds it
    a.free([b1])
    assert a.used == 2 and a.lookup(0, T) == b1
    a.free([b2, b1])
    assert a.used == 0 and a.available == 3 and a.cached == 1
    assert a.share_cost([b1]) == 1  # held by none: sharing it takes one from the pool
    # The pool needs every block: the free ones go first, then the cached one is evicted.
    assert sorted(a.allocate(3)) == [1, 2, 3]
    assert a.lookup(0, T) is None and a.cached == 0


def test_a_child_of_an_evicted_block_is_never_found_under_a_new_parent() -> None:
    a = BlockAllocator(2)
    parent, child = a.allocate(2)
    e_parent, _ = a.cache(0, T, parent)
    a.cache(e_parent, T, child)
    a.free([parent, child])  # a table, head first: its tail is evicted first
    assert a.allocate(1) == [child] and a.lookup(e_parent, T) is None
    assert a.lookup(0, T) == parent
    a.free([child])
    b = a.allocate(2)  # evicts the parent too
    e_new, _ = a.cache(0, (9,) * 16, b[0])  # the same block, new contents, a new entry
    assert e_new != e_parent and a.lookup(0, T) is None


def test_a_released_table_is_evicted_tail_first_so_a_shared_head_outlives_the_tails() -> None:
    a = BlockAllocator(6)
    system = a.allocate(2)  # a system prompt, held by two sequences
    e1, _ = a.cache(0, T, system[0])
    e2, _ = a.cache(e1, T, system[1])
    a.share(system)
    tail_a, tail_b = a.allocate(1, after=system[1]), a.allocate(1)
    a.cache(e2, (1,) * 16, *tail_a)
    a.cache(e2, (2,) * 16, *tail_b)
    a.free(system + tail_a)
    a.free(system + tail_b)  # the system prompt is held by none now too
    grown = a.allocate(2) + a.allocate(1, after=6) + a.allocate(1, after=6)
    assert grown[2:] == tail_a + tail_b, "the tails go first, the least recently released first"
    assert a.lookup(0, T) == system[0] and a.lookup(e1, T) == system[1]
    assert a.allocate(1, after=6) == [system[1]] and a.lookup(0, T) == system[0], "then a chain's tail"


def test_a_new_table_is_contiguous_only_where_that_evicts_no_more_than_it_needs() -> None:
    a = BlockAllocator(8)
    first, second = a.allocate(4), a.allocate(4)
    for i, b in enumerate(first + second):
        a.cache(0, (i,) * 16, b)
    a.free(first)
    a.free(second)  # eviction order: 4 3 2 1 8 7 6 5
    assert a.allocate(2, grows_to=3) == [2, 3], "the run of the first table's tail, as it will grow"
    assert a.allocate(1, after=3) == [4] and a.cached == 5
    assert a.allocate(2) == [1, 8], "no run of 2 among the next evictions: one block at a time"
    assert a.cached == 3 and a.lookup(0, (4,) * 16) == 5


def test_a_system_prompt_outlives_the_requests_it_served_when_a_later_one_needs_room() -> None:
    s = make(8, budget=256, max_len=128)
    system = list(range(900, 932))  # two blocks
    first, second = (req(48, max_tokens=1, prompt=system + [tok] * 16) for tok in (1, 2))
    s.waiting.extend([first, second])
    run_step(s)  # first: [1, 2, 3], second: [1, 2, 4]
    s.release(second)  # eviction order: 4
    s.release(first)  # 4 3 2 1 (head first, as before: 4 1 2 3)
    assert s.alloc.cached == 4 and s.alloc.available == 8
    c = req(48, max_tokens=48)  # grows to 6 blocks: the 4 free ones, then 2 evictions
    s.waiting.append(c)
    while len(c._blocks) < 6:
        run_step(s)
    s.release(c)
    hits = s.prefix_hit_tokens
    d = req(40, prompt=system + [7] * 8)
    s.waiting.append(d)
    run_step(s)
    assert s.prefix_hit_tokens - hits == 32, "the two requests' own blocks were evicted, not the system prompt"


def test_choices_admitted_together_share_the_blocks_the_first_fills() -> None:
    s = make(20, budget=256)
    prompt = list(range(500, 540))  # 40 tokens: 2 full blocks and 8 in a third
    a, b, c = (req(40, prompt=prompt) for _ in range(3))
    s.waiting.extend([a, b, c])
    assert run_step(s) == [(a, 0, 40), (b, 32, 8), (c, 32, 8)]
    assert b._blocks[:2] == c._blocks[:2] == a._blocks[:2]
    assert len({a._blocks[2], b._blocks[2], c._blocks[2]}) == 3, "the partial block is each one's own"
    assert s.alloc.used == 5 and s.prefix_hit_tokens == 64
    for r in (a, b, c):
        s.release(r)
    assert s.alloc.used == 0


def test_a_chunked_prompt_is_shared_once_its_blocks_are_filled() -> None:
    s = make(20, budget=16)
    prompt = list(range(600, 640))
    a, b = req(40, prompt=prompt), req(40, prompt=prompt)
    s.waiting.extend([a, b])
    assert run_step(s) == [(a, 0, 16)]
    assert run_step(s) == [(a, 16, 16)]
    assert run_step(s) == [(a, 32, 8), (b, 32, 8)], "b admitted on a's two filled blocks"
    assert b._blocks[:2] == a._blocks[:2]


def test_prompt_logprobs_take_no_cached_block_but_leave_theirs() -> None:
    s = make(20, budget=256)
    prompt = list(range(700, 740))
    scored = Request("r", prompt, SamplingParams(max_tokens=4, prompt_logprobs=1))
    s.waiting.extend([req(40, prompt=prompt), scored])
    plan = run_step(s)
    assert plan[1] == (scored, 0, 40)
    after = req(40, prompt=prompt)
    s.waiting.append(after)
    assert run_step(s)[-1] == (after, 32, 8)


def test_released_blocks_serve_a_later_request_and_a_different_prefix_misses() -> None:
    s = make(20, budget=256)
    first = req(40)
    s.waiting.append(first)
    run_step(s)
    s.release(first)
    again, other = req(40, prompt=first.prompt_ids), req(40, prompt=[*first.prompt_ids[:16], *range(9000, 9024)])
    s.waiting.extend([again, other])
    assert run_step(s) == [(again, 32, 8), (other, 16, 24)]


def test_a_failed_step_uncaches_what_it_filled_and_requeues_who_shared_it() -> None:
    s = make(20, budget=256)
    prompt = list(range(800, 840))
    a, b = req(40, prompt=prompt), req(40, prompt=prompt)
    s.waiting.extend([a, b])
    assert [(x.req, x.pos0, x.n) for x in s.schedule(8)] == [(a, 0, 40), (b, 32, 8)]
    s.step_failed()  # out of memory: nothing was written
    assert s.alloc.lookup(0, tuple(prompt[:16])) is None
    assert list(s.waiting) == [b] and s.running == [a]
    assert run_step(s) == [(a, 0, 40), (b, 32, 8)], "retried: a fills them again, b shares them again"


def test_no_prefix_caching_with_a_sliding_window_or_when_off() -> None:
    for s in (make(20, budget=256, max_len=100, window=7), make(20, budget=256, prefix_caching=False)):
        prompt = list(range(40))
        a, b = req(40, prompt=prompt), req(40, prompt=prompt)
        s.waiting.extend([a, b])
        assert run_step(s) == [(a, 0, 40), (b, 0, 40)]
        assert s.alloc.cached == 0


@pytest.mark.parametrize("tp", [1, 2])
def test_choices_share_the_prompt_and_match_caching_off_and_transformers(tp: int, ckpt_main: str) -> None:
    on = run_scenario(ckpt_main, "shared_prefix", tp)[0]
    off = run_scenario(ckpt_main, "shared_prefix", tp, env={"T_PREFIX_CACHING": "off"})[0]
    # 3 seeded choices and 3 greedy ones share 2 blocks each; the later request its first 2.
    assert on["stats"]["prefix_cache_hit_tokens"] >= (6 + 1) * 32, on["stats"]
    assert off["stats"]["prefix_cache_hit_tokens"] == 0
    assert on["choices"] == off["choices"] and on["later"] == off["later"]
    assert len({tuple(c["tokens"]) for c in on["choices"][:4]}) > 1, "seeded choices should differ"
    hf = load_hf_model(ckpt_main)
    want = list(parity.hf_greedy(hf, on["prompts"][1], 12)["tokens"])
    assert all(c["tokens"] == want for c in on["choices"][4:])
    assert on["later"]["tokens"] == list(parity.hf_greedy(hf, on["extended"], 12)["tokens"])
    assert on["stats"]["kv_blocks_used"] == 0, "blocks leaked"


def test_a_growing_sequence_takes_the_block_after_its_last() -> None:
    a = BlockAllocator(8)
    head, last = a.allocate(2), a.allocate(1)
    assert (head, last) == ([1, 2], [3])
    a.free(head)
    assert a.allocate(1, after=3) == [4], "the block after its last, not the lowest free"
    (five,) = a.allocate(1, after=4)
    a.cache(0, T, five)
    a.free([five])  # cached, held by none
    assert a.allocate(1, after=4) == [5] and a.cached == 0, "taken back for contiguity"
    assert a.allocate(1, after=8) == [1], "none after the last block: the lowest free"


def test_batch_one_requests_in_a_one_sequence_pool_keep_contiguous_tables() -> None:
    """What the batch-1 decode (bench_roofline.py) sees: one request after another, each with a new
    prompt, in a pool of one max_model_len sequence that the earlier ones' cached blocks fill."""
    s = make(8, batch=1, budget=256, max_len=128)
    for _ in range(4):
        r = req(40, max_tokens=100)
        s.waiting.append(r)
        while len(r._tokens) < 120:
            run_step(s, effective=1)
        assert r._blocks == list(range(r._blocks[0], r._blocks[0] + len(r._blocks))), r._blocks
        s.release(r)


def test_a_shared_prefix_request_out_of_memory_alone_fails_once_and_the_prefix_still_serves(ckpt_main: str) -> None:
    res = run_scenario(ckpt_main, "oom_on_shared_prefix", 1)[0]
    assert res["fired"] == [[1, 8]], "the fake OOM never hit the request admitted on cached blocks"
    assert "out of memory running" in res["failed"]["error"], res["failed"]
    assert res["again"] == res["first"] and len(res["first"]["tokens"]) == 6
    assert res["generated"] == 6, "the failed request must not run again after its error"
    st = res["stats"]
    assert st["queue_depth"] == 0 and st["running"] == 0 and st["kv_blocks_used"] == 0
    assert st["prefix_cache_hit_tokens"] == 2 * 32 and st["oom_count"] == 1
