"""Token selection from full-vocabulary logits (run on rank 0 only; other ranks get the result
through the next step's broadcast, so every rank always agrees)."""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def sample_one(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> int:
    """One token from a [V] float32 logits row. temperature 0 means greedy."""
    if temperature <= 0.0:
        return int(logits.argmax())
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first
        # token is always kept).
        drop = (probs.cumsum(-1) - probs) > top_p
        x = x.scatter(0, order[drop], float("-inf"))
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: torch.Tensor, params: list[tuple[float, float, int]], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [B, V]; params[i] = (temperature, top_p, top_k) for row i."""
    if all(t <= 0.0 for t, _, _ in params):
        return greedy(logits)
    rows = logits.float().cpu()  # per-request CPU generators
    return [sample_one(rows[i], t, p, k, generators[i]) for i, (t, p, k) in enumerate(params)]
