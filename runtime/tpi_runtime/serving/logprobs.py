"""Logprobs in OpenAI's two shapes: completions (parallel lists) and chat (a list of token objects)."""

from __future__ import annotations

from typing import Any

from tpi_runtime.engine import TokenLogprobs


def _text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False)) if tokenizer is not None else ""


def completion_logprobs(tokenizer: Any, lps: list[TokenLogprobs], offset: int = 0) -> dict[str, Any]:
    tokens = [_text(tokenizer, t.token) for t in lps]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in lps],
        "top_logprobs": [{_text(tokenizer, i): lp for i, lp in t.top} for t in lps],
        "text_offset": offsets,
    }


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
