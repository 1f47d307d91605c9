"""Token selection from full-vocabulary logits, vectorized over the batch on the logits' device.

Runs on rank 0 only; other ranks get the result through the next step's broadcast, so every rank
always agrees. Every accepted parameter value must be safe here (a raise would take the whole group
down): temperatures are applied after subtracting the row maximum, so tiny or huge values cannot
overflow; top_k is clamped to the vocabulary; the most likely token always survives top_p/min_p; a
row whose logits are not finite yields -1 (the engine fails that request only).
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5  # below this a row is sampled greedily (as vLLM does)


@dataclass(frozen=True)
class RowParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)


@dataclass(frozen=True)
class RowHistory:
    """What penalties look at: the generated ids (presence/frequency) and prompt + generated ids
    (repetition, as in transformers and vLLM)."""

    output: list[int]
    context: list[int]


@dataclass(frozen=True)
class Sampled:
    token: int  # -1: the row's logits were not finite
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def _counts(rows: list[list[int]], n_vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] occurrence counts of each row's ids (one padded scatter, no per-row loop on device)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), n_vocab, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    counts = torch.zeros(len(rows), n_vocab + 1, device=device)
    counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    return counts[:, :n_vocab]


def apply_penalties(x: torch.Tensor, params: list[RowParams], history: list[RowHistory]) -> torch.Tensor:
    """OpenAI's presence/frequency penalties and the CTRL repetition penalty, on [B, V] logits."""
    dev, n_vocab = x.device, x.shape[-1]
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = _counts([h.output for h in history], n_vocab, dev)
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)
        x = x - freq[:, None] * counts - pres[:, None] * (counts > 0)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _counts([h.context for h in history], n_vocab, dev) > 0
        rp = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
    return _finite(x)  # penalties at their bounds may overflow huge logits


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Logits pushed past the float range by a penalty or a bias, clamped back, so their row is
    still sampled (a non-finite row would fail its request)."""
    big = torch.finfo(x.dtype).max
    return torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)


def apply_logit_bias(x: torch.Tensor, params: list[RowParams]) -> torch.Tensor:
    """OpenAI's logit_bias on [B, V] logits: each row's (token, bias) pairs added in one scattered
    add, from one host-to-device copy of every row's pairs (exact: ids < 2**53 in float64)."""
    triples = [(row, tok, bias) for row, p in enumerate(params) for tok, bias in p.logit_bias]
    if not triples:
        return x
    t = torch.tensor(triples, dtype=torch.float64).to(x.device, non_blocking=True)
    rows, toks = t[:, 0].long(), t[:, 1].long()
    return _finite(x.index_put((rows, toks), t[:, 2].to(x.dtype), accumulate=True))


def _logprobs(x: torch.Tensor, tokens: torch.Tensor, params: list[RowParams]) -> list[Sampled]:
    lp = x.log_softmax(dim=-1)
    chosen = lp.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1).tolist()
    k = min(max(p.logprobs or 0 for p in params), x.shape[-1])
    top_v, top_i = lp.topk(k, dim=-1)
    tv, ti = top_v.tolist(), top_i.tolist()
    out = []
    for i, (t, p) in enumerate(zip(tokens.tolist(), params, strict=True)):
        if p.logprobs is None:
            out.append(Sampled(t))
            continue
        out.append(Sampled(t, chosen[i], tuple(zip(ti[i][: p.logprobs], tv[i][: p.logprobs], strict=True))))
    return out


def sample(
    logits: torch.Tensor,
    params: list[RowParams],
    generators: Sequence[torch.Generator | None],
    history: list[RowHistory] | None = None,
    positions: Sequence[int] | None = None,
) -> list[Sampled]:
    """logits [B, V] -> one token per row (-1 where the row's logits are not finite).

    Everything runs on the logits' device, vectorized over the batch; only the B chosen ids (and
    the requested logprobs) come back to the host. A row's random draw is a function of its
    generator's seed and its draw number only, so seeded requests reproduce in any batch:
    `positions` (e.g. each row's count of generated tokens) fixes that number, so that a caller
    that samples a row a varying number of times still draws the same numbers for its tokens.
    Logprobs are those of the distribution after penalties and logit_bias, before temperature and
    truncation."""
    x = logits.float()
    bad = ~torch.isfinite(x).all(dim=-1)
    x = torch.where(bad[:, None], torch.zeros((), device=x.device), x)
    if history is not None:
        x = apply_penalties(x, params, history)
    x = apply_logit_bias(x, params)
    tok = torch.where(bad, -1, _pick(x, params, generators, positions))
    if any(p.logprobs is not None for p in params):
        return _logprobs(x, tok, params)
    return [Sampled(t) for t in tok.tolist()]


def _pick(
    x: torch.Tensor,
    params: list[RowParams],
    generators: Sequence[torch.Generator | None],
    positions: Sequence[int] | None,
) -> torch.Tensor:
    greedy_tok = x.argmax(dim=-1)
    if all(p.temperature < MIN_TEMPERATURE for p in params):
        return greedy_tok
    dev, n_vocab = x.device, x.shape[-1]
    # One host-to-device copy for every per-row parameter (each tensor() is one on CUDA).
    rows = torch.tensor(
        [
            [max(p.temperature, MIN_TEMPERATURE) for p in params],
            [p.top_p for p in params],
            [p.top_k if 0 < p.top_k < n_vocab else n_vocab for p in params],
            [p.min_p for p in params],
            [float(p.temperature < MIN_TEMPERATURE) for p in params],
        ],
        dtype=torch.float64,
    ).to(dev, non_blocking=True)
    temp, top_p, top_k, min_p, is_greedy = rows[0], rows[1], rows[2], rows[3], rows[4] > 0
    u = uniforms(generators, positions, dev)  # one U(0, 1) draw per row, made on the device

    x = (x - x.max(dim=-1, keepdim=True).values) / temp[:, None].float()  # <= 0, the best token at 0
    truncate = any(p.top_p < 1 or 0 < p.top_k < n_vocab or p.min_p > 0 for p in params)
    if truncate:
        x, order = torch.sort(x, dim=-1, descending=True)
    probs = x.softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    if truncate:
        # Sorted, each rule drops a suffix, so the kept tokens are the first n_keep: a token goes when
        # it ranks at or past top_k, when the tokens above it already hold top_p of the mass, or when
        # it is below min_p x the best probability. The best token always stays.
        ranks = torch.arange(n_vocab, device=dev)
        drop = ranks[None, :] >= top_k[:, None]
        drop |= (cdf - probs) > top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        n_keep = (~drop).sum(dim=-1).clamp(min=1)
    else:
        n_keep = torch.full_like(greedy_tok, n_vocab)
    # Inverse-CDF sampling over the kept tokens: the first index whose cumulative mass exceeds
    # u x (the kept mass). Renormalising after truncation is that multiplication; tokens of zero
    # probability never own an interval.
    mass = cdf.gather(-1, (n_keep - 1)[:, None])
    idx = torch.searchsorted(cdf, u[:, None] * mass, right=True)
    idx = torch.minimum(idx, (n_keep - 1)[:, None])
    picked = (order.gather(-1, idx) if truncate else idx).squeeze(-1)
    return torch.where(is_greedy, greedy_tok, picked)


# Seeded draws come from a counter-based hash of (the request's seed, its draw number): the same
# numbers on any device, whatever else is in the batch, with no per-row generator calls. The
# draw number is the caller's `positions` (the row's output index) when given, else the number of
# draws this sampler made for that generator so far.
_draws: weakref.WeakKeyDictionary[torch.Generator, int] = weakref.WeakKeyDictionary()
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (lowbias32-style), on int64 tensors holding values < 2**32
    (the products stay below 2**59: no overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def uniforms(
    generators: Sequence[torch.Generator | None], positions: Sequence[int] | None, device: torch.device
) -> torch.Tensor:
    """One float64 in (0, 1) per row: a hash of the row generator's seed and the draw number (a
    generator of None: a fresh random seed)."""
    keys = []
    for i, g in enumerate(generators):
        if g is None:
            seed, n = secrets.randbits(64), 0
        else:
            seed = g.initial_seed()
            n = _draws.get(g, 0)
            _draws[g] = n + 1  # the same generator twice in one call gets two draws
            if positions is not None:
                n = positions[i]
        keys.append([seed & _M32, (seed >> 32) & _M32, n & _M32, (n >> 32) & _M32])
    k = torch.tensor(keys, dtype=torch.int64).to(device, non_blocking=True)
    h = _mix32(k[:, 3] ^ 0x9E3779B9)
    for col in (2, 1, 0):
        h = _mix32(k[:, col] ^ h)
    return (h.double() + 0.5) / 2.0**32
