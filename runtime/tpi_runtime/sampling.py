"""Token selection from full-vocabulary logits, vectorized over the batch on the logits' device.

Runs on rank 0 only; other ranks get the result through the next step's broadcast, so every rank
always agrees. Every accepted parameter value must be safe here (a raise would take the whole group
down): temperatures are applied after subtracting the row maximum, so tiny or huge values cannot
overflow; top_k is clamped to the vocabulary; the most likely token always survives top_p/min_p; a
row whose logits are not finite yields -1 (the engine fails that request only).
"""

from __future__ import annotations

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
    # Penalties at their bounds may overflow huge logits: stay finite so the row is still sampled.
    big = torch.finfo(x.dtype).max
    return torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)


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


def _noise(shape: tuple[int, int], generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Exp(1) noise, one row per request generator (seeded requests reproduce on any batch)."""
    noise = torch.empty(shape, dtype=torch.float32)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    return noise.to(device, non_blocking=True)


def sample(
    logits: torch.Tensor,
    params: list[RowParams],
    generators: list[torch.Generator | None],
    history: list[RowHistory] | None = None,
) -> list[Sampled]:
    """logits [B, V] -> one token per row (-1 where the row's logits are not finite).

    Logprobs are those of the distribution after penalties, before temperature and truncation."""
    x = logits.float()
    bad = ~torch.isfinite(x).all(dim=-1)
    x = torch.where(bad[:, None], torch.zeros((), device=x.device), x)
    if history is not None:
        x = apply_penalties(x, params, history)
    tok = torch.where(bad, -1, _pick(x, params, generators))
    if any(p.logprobs is not None for p in params):
        return _logprobs(x, tok, params)
    return [Sampled(t) for t in tok.tolist()]


def _pick(x: torch.Tensor, params: list[RowParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    greedy_tok = x.argmax(dim=-1)
    if all(p.temperature < MIN_TEMPERATURE for p in params):
        return greedy_tok
    dev, n_vocab = x.device, x.shape[-1]
    temp = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < n_vocab else n_vocab for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)

    x = (x - x.max(dim=-1, keepdim=True).values) / temp[:, None]  # <= 0, the best token at 0
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    ranks = torch.arange(n_vocab, device=dev)
    drop = ranks[None, :] >= top_k[:, None]
    # Drop a token when the tokens ranked above it already hold top_p of the mass.
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (one pass, no host copy of logits).
    score = torch.where(probs > 0, probs / _noise(tuple(probs.shape), generators, dev), -1.0)  # type: ignore[arg-type]
    picked = order.gather(-1, score.argmax(dim=-1, keepdim=True)).squeeze(-1)
    is_greedy = torch.tensor([p.temperature < MIN_TEMPERATURE for p in params], device=dev)
    return torch.where(is_greedy, greedy_tok, picked)
