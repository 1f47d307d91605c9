"""A `tokenizers` Tokenizer built from a GGUF file's vocabulary (tokenizer.ggml.*).

Byte-level BPE ("gpt2": SmolLM2, Qwen, Llama 3) is supported, split the way the vocabulary's
merges were learned (tokenizer.ggml.pre), as transformers' own GGUF loader does. SentencePiece
vocabularies ("llama": Llama 2, Mistral v0.1) are refused with a message naming the field.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex; any other value: GPT-2's own byte-level split.
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL = 3  # llama.cpp token types
_USER_DEFINED = 4


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters table (the spelling of byte-level vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def build_tokenizer(fields: dict[str, Any], path: str) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes; ValueError naming the field otherwise."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') vocabularies "
            "are built from GGUF metadata"
        )
    tokens = [str(t) for t in fields.get("tokenizer.ggml.tokens") or []]
    merges = [str(m) for m in fields.get("tokenizer.ggml.merges") or []]
    if not tokens or not merges:
        raise ValueError(f"{path}: tokenizer.ggml.tokens / tokenizer.ggml.merges missing from the metadata")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {
        (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, [(a, b) for a, b in pairs], fuse_unk=False))
    split = _SPLITS.get(str(fields.get("tokenizer.ggml.pre")))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = list(fields.get("tokenizer.ggml.token_type") or [])
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _CONTROL and set(t) <= spelled
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(
        [AddedToken(t, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    )
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token") and bos is not None:
        name = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, int(bos))]
        )
    return tok
