"""The vectorized sampler: every accepted parameter value is safe, bad rows fail alone, penalties."""

from __future__ import annotations

import pytest
import torch
from tpi_runtime.sampling import RowHistory, RowParams, apply_penalties, sample

V = 50

EDGE_PARAMS = [
    RowParams(),
    RowParams(temperature=0.0),
    RowParams(temperature=1e-30),
    RowParams(temperature=1e-6),
    RowParams(temperature=1e30),
    RowParams(top_p=1e-12),
    RowParams(top_k=1),
    RowParams(top_k=10 * V),
    RowParams(min_p=1.0),
    RowParams(temperature=5.0, top_p=0.5, top_k=3, min_p=0.2),
    RowParams(presence_penalty=-2.0, frequency_penalty=-2.0, repetition_penalty=2.0, logprobs=20),
    RowParams(presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=1e-3, logprobs=0),
]


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e37])
def test_edge_params_always_give_valid_tokens(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(EDGE_PARAMS), V, generator=g) * scale
    gens = [torch.Generator().manual_seed(i) for i in range(len(EDGE_PARAMS))]
    hist = [RowHistory([1, 2, 2], [5, 1, 2, 2]) for _ in EDGE_PARAMS]
    out = sample(logits, EDGE_PARAMS, gens, hist)
    assert all(0 <= s.token < V for s in out), out
    best = logits.argmax(-1).tolist()
    for i in (1, 2, 5, 6, 8):  # greedy-equivalent rows pick the best token
        assert out[i].token == best[i]
    assert len(out[10].top) == 20 and out[10].logprob is not None and out[10].logprob <= 0
    assert out[11].top == () and out[11].logprob is not None


def test_a_non_finite_row_fails_alone() -> None:
    logits = torch.randn(3, V)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    out = sample(logits, [RowParams(temperature=0.7)] * 3, [torch.Generator().manual_seed(1)] * 3)
    assert [s.token for s in out][1:] == [-1, -1]
    assert 0 <= out[0].token < V


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = torch.randn(1, V)
    alone = sample(logits, [RowParams(temperature=1.0)], [torch.Generator().manual_seed(9)])[0].token
    batch = torch.cat([torch.randn(2, V), logits])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 9)]
    assert sample(batch, [RowParams(temperature=1.0)] * 3, gens)[2].token == alone


def test_penalties_follow_openai_and_ctrl() -> None:
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = RowParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = apply_penalties(x, [p], [RowHistory(output=[0, 0, 1], context=[3, 0, 0, 1])])
    # token 0: 2 - 0.25*2 - 0.5 = 1.0, then repetition (seen, > 0) / 2 = 0.5
    # token 1: -2 - 0.25 - 0.5 = -2.75, then (seen, < 0) * 2 = -5.5
    # token 2: untouched; token 3: only in the prompt: 0.5 / 2
    assert out.tolist() == [[0.5, -5.5, 1.0, 0.25]]
