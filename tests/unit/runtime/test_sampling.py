"""The vectorized sampler: every accepted parameter value is safe, bad rows fail alone, penalties."""

from __future__ import annotations

import pytest
import torch
from tpi_runtime.sampling import RowHistory, RowParams, apply_logit_bias, apply_penalties, sample

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
    RowParams(temperature=0.9, logit_bias=((0, 100.0), (1, -100.0), (0, 100.0))),
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


def test_logit_bias_is_per_row_added_before_the_pick_and_the_logprobs() -> None:
    """OpenAI's logit_bias: each row's own pairs added to its logits (a key given twice adds
    twice), +100 forces a token and -100 bans one, greedy or sampled, and the logprobs are those
    of the biased distribution."""
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    rows = [RowParams(logit_bias=((3, 1.5), (3, 1.0), (0, -1.0))), RowParams(), RowParams(logit_bias=((1, 0.25),))]
    assert apply_logit_bias(x, rows).tolist() == [[0.0, 2.0, 3.0, 2.5], [1.0, 2.0, 3.0, 0.0], [1.0, 2.25, 3.0, 0.0]]
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    best = logits.argmax(-1).tolist()
    params = [
        RowParams(temperature=0.0, logit_bias=((7, 100.0),)),
        RowParams(temperature=0.0, logit_bias=((best[1], -100.0),)),
        RowParams(temperature=1.0, logit_bias=((9, 100.0),), logprobs=2),
        RowParams(temperature=0.0),
    ]
    out = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(4)])
    second = logits[1].topk(2).indices[1].item()
    assert [s.token for s in out] == [7, second, 9, best[3]]
    assert out[2].top[0][0] == 9 and out[2].logprob == out[2].top[0][1] > -1e-6


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


def _frequencies(logits: torch.Tensor, p: RowParams, n: int = 20000) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    toks = torch.tensor([s.token for s in sample(logits.expand(n, -1), [p] * n, gens)])
    return torch.bincount(toks, minlength=logits.shape[-1]).double() / n


def test_draws_follow_the_truncated_renormalised_distribution() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0].double()
    # 20000 draws: a frequency's standard error is <= 0.0036, so 0.015 is > 4 sigma.
    assert torch.allclose(_frequencies(logits, RowParams(temperature=1.0)), probs, atol=0.015)
    top2 = torch.zeros(5, dtype=torch.float64)
    top2[:2] = probs[:2] / probs[:2].sum()
    assert torch.allclose(_frequencies(logits, RowParams(top_k=2)), top2, atol=0.015)
    # top_p 0.6: tokens 0 (0.46) and 1 (0.28) are kept (the mass above token 1 is < 0.6), 2 is not.
    assert torch.allclose(_frequencies(logits, RowParams(top_p=0.6)), top2, atol=0.015)
    hot = (logits / 0.5).softmax(-1)[0].double()
    assert torch.allclose(_frequencies(logits, RowParams(temperature=0.5)), hot, atol=0.015)


def test_a_rows_draws_depend_only_on_its_seed_and_position() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the token is the draw itself
    p = [RowParams(temperature=1.0)]
    first = [sample(logits, p, [torch.Generator().manual_seed(3)], positions=[i])[0].token for i in range(4)]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):  # draws made before do not matter once the position is given
        sample(logits, p, [g])
    again = [sample(logits, p, [g], positions=[i])[0].token for i in range(4)]
    assert first == again and len(set(first)) > 1
    # Without positions, a generator's successive calls are its successive draws.
    h = torch.Generator().manual_seed(3)
    assert [sample(logits, p, [h])[0].token for _ in range(4)] == first
