"""Logprobs in OpenAI's two shapes: completions (parallel lists) and chat (a list of token objects)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpi_runtime.engine import TokenLogprobs


def _text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False)) if tokenizer is not None else ""


def completion_logprobs(
    tokenizer: Any, lps: Sequence[TokenLogprobs], leading: int | None = None, offset: int = 0
) -> dict[str, Any]:
    """``leading``: a first token without a logprob (an echoed prompt's first: nothing precedes it),
    listed with null entries as OpenAI's legacy API and vLLM do. ``offset``: the first token's
    ``text_offset`` (a streamed chunk's: the length of the tokens listed before it)."""
    ids = ([] if leading is None else [leading]) + [t.token for t in lps]
    tokens = [_text(tokenizer, t) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    none: list[Any] = [] if leading is None else [None]
    return {
        "tokens": tokens,  # text_offset of the next token: offsets[-1] + len(tokens[-1])
        "token_logprobs": none + [t.logprob for t in lps],
        "top_logprobs": none + [{_text(tokenizer, i): lp for i, lp in t.top} for t in lps],
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(tokenizer: Any, entries: Sequence[TokenLogprobs], k: int) -> list[dict[str, Any] | None]:
    """vLLM's shape: per prompt token (None for the first), token id -> logprob, rank and text,
    for the token itself and the k most likely."""
    out: list[dict[str, Any] | None] = [None]
    for e in entries:
        row = {str(e.token): {"logprob": e.logprob, "rank": e.rank, "decoded_token": _text(tokenizer, e.token)}}
        for rank, (i, lp) in enumerate(e.top[:k], 1):
            row.setdefault(str(i), {"logprob": lp, "rank": rank, "decoded_token": _text(tokenizer, i)})
        out.append(row)
    return out


def _chat_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = _text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprobs]) -> dict[str, Any]:
    return {
        "content": [
            {
                **_chat_entry(tokenizer, t.token, t.logprob),
                "top_logprobs": [_chat_entry(tokenizer, i, lp) for i, lp in t.top],
            }
            for t in lps
        ]
    }
