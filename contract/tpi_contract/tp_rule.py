"""Which tensor-parallel sizes can shard a model (vLLM's rule).

Attention heads and the MLP's intermediate size split evenly; KV heads are split when there are
enough, else replicated, which needs ``tp % kv == 0``. The vocabulary needs no divisibility (the
vocab-parallel embedding and LM head pad the last shard). Any count may be unknown (``None``: the
operator may only have partial hints); an unknown count constrains nothing.
"""

from __future__ import annotations

#: Largest size considered when the head count is unknown.
MAX_TP = 256


def tp_problems(heads: int | None, kv_heads: int | None, intermediate: int | None, tp: int) -> list[str]:
    """Why ``tp`` cannot shard this model (empty: it can). ``kv_heads`` None means ``heads``."""
    if tp < 1:
        return ["tensor-parallel size must be >= 1"]
    problems = []
    kv = kv_heads or heads
    if heads is not None and heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by {tp}")
    if kv is not None:
        if tp <= kv and kv % tp:
            problems.append(f"num_key_value_heads={kv} is not divisible by {tp}")
        if tp > kv and tp % kv:
            problems.append(f"tp={tp} > num_key_value_heads={kv} needs tp % {kv} == 0 (KV head replication)")
    if intermediate is not None and intermediate % tp:
        problems.append(f"intermediate_size={intermediate} is not divisible by {tp}")
    return problems


def valid_tp_sizes(heads: int | None, kv_heads: int | None, intermediate: int | None, limit: int = MAX_TP) -> list[int]:
    """Every size (<= ``limit``) this model can be split into; powers of two when the architecture
    is unknown (no head count and no intermediate size)."""
    if heads is None and intermediate is None:
        return [2**i for i in range(limit.bit_length()) if 2**i <= limit]
    top = min(limit, heads or limit)
    return [tp for tp in range(1, top + 1) if not tp_problems(heads, kv_heads, intermediate, tp)]
