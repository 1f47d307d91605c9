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


def greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def _noise(shape: tuple[int, int], generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Exp(1) noise, one row per request generator (seeded requests reproduce on any batch)."""
    noise = torch.empty(shape, dtype=torch.float32)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    return noise.to(device, non_blocking=True)


def sample(logits: torch.Tensor, params: list[RowParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] -> one token id per row (-1 where the row's logits are not finite)."""
    x = logits.float()
    bad = ~torch.isfinite(x).all(dim=-1)
    x = torch.where(bad[:, None], torch.zeros((), device=x.device), x)
    greedy_tok = x.argmax(dim=-1)
    if all(p.temperature < MIN_TEMPERATURE for p in params):
        return torch.where(bad, -1, greedy_tok).tolist()
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
    tok = torch.where(is_greedy, greedy_tok, picked)
    return torch.where(bad, -1, tok).tolist()
