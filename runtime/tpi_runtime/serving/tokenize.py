"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``.

lm-evaluation-harness's ``local-completions`` looks for them (its remote tokenizer backend), so an
evaluation of a served checkpoint needs no copy of its tokenizer on the client: a GGUF file's
tokenizer lives only in the file. They encode and decode exactly as the completions endpoint does.
"""

from __future__ import annotations

from typing import Any

from . import chat
from .errors import bad_request
from .protocol import DetokenizeRequest, TokenizeRequest
from .state import ServerState


def _tokenizer(state: ServerState, model: str | None) -> Any:
    engine = state.require_engine()
    state.check_model(model)
    if engine.tokenizer is None:
        raise bad_request("this checkpoint has no tokenizer", None, "tokenizer_missing")
    return engine.tokenizer


def tokenize(req: TokenizeRequest, state: ServerState) -> dict[str, Any]:
    tok = _tokenizer(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send exactly one of 'prompt' or 'messages'", "prompt")
    if req.messages is not None:
        text = chat.render(state, req.messages, req.add_generation_prompt)
        special = bool(req.add_special_tokens)  # the template writes its own bos (as chat does)
    else:
        text, special = req.prompt or "", req.add_special_tokens is not False
    ids = list(tok.encode(text, add_special_tokens=special).ids)
    return {"count": len(ids), "max_model_len": state.require_engine().max_model_len, "tokens": ids}


def detokenize(req: DetokenizeRequest, state: ServerState) -> dict[str, Any]:
    tok = _tokenizer(state, req.model)
    vocab = state.require_engine().config.vocab_size
    bad = next((t for t in req.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range [0, {vocab})", "tokens")
    return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}  # transformers' default


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """The special tokens' texts and the chat template (vLLM's ``/tokenizer_info``)."""
    engine = state.require_engine()
    tok = _tokenizer(state, None)
    template = state.chat_template

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_token(token_id)

    eos_ids = engine.eos_token_ids
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": (template.bos_token if template else None) or text(engine.config.bos_token_id),
        "eos_token": (template.eos_token if template else None) or text(eos_ids[0] if eos_ids else None),
        "pad_token": None,
        "chat_template": template.source if template else None,
        "model_max_length": engine.max_model_len,
    }
