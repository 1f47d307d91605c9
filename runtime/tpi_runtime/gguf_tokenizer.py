"""A `tokenizers` Tokenizer built from a GGUF file's vocabulary (tokenizer.ggml.*), the way
transformers' own GGUF loader builds it, so ids match `AutoTokenizer.from_pretrained(..., gguf_file=)`.

- "gpt2": byte-level BPE (SmolLM2, Qwen, Llama 3), split the way the vocabulary's merges were
  learned (tokenizer.ggml.pre).
- "llama": SentencePiece BPE (Llama 2, Mistral v0.1, TinyLlama): merges from the file, else
  recovered from the token scores; `<0xNN>` byte-fallback tokens for text outside the vocabulary;
  spaces spelled "▁" and one prefixed to the text (tokenizer.ggml.add_space_prefix, default on);
  BOS added unless tokenizer.ggml.add_bos_token says otherwise (llama.cpp's default).

Anything else is refused with a message naming the field and the file.
"""

from __future__ import annotations

from collections.abc import Sequence
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
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex (transformers' GGUF table); any other value: GPT-2's own
# byte-level split, as there.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3_SPLIT,
    ),
    "dbrx": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
SUPPORTED_MODELS = ("gpt2", "llama")
_CONTROL = 3  # llama.cpp token types
_USER_DEFINED = 4
_SPACE = "\u2581"  # SentencePiece's spelling of a space


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
    if kind not in SUPPORTED_MODELS:
        raise ValueError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r}: supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece BPE)"
        )
    tokens = [str(t) for t in fields.get("tokenizer.ggml.tokens") or []]
    if not tokens:
        raise ValueError(f"{path}: tokenizer.ggml.tokens missing from the metadata")
    types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or []]
    merges = [str(m) for m in fields.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        tok, spelled = _byte_level(fields, tokens, merges, path), set(_byte_alphabet().values())
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    else:
        tok, spelled = _sentencepiece(fields, tokens, merges, path), None
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM
    # Control tokens stay whole and are skipped when decoding; in a byte-level vocabulary one not
    # spelled in the byte alphabet is a llama.cpp mislabel, skipped as transformers skips it.
    special = [
        t for t, ty in zip(tokens, types, strict=False) if ty == _CONTROL and (spelled is None or set(t) <= spelled)
    ]
    # The named special tokens (transformers' bos/eos/unk/pad) are matched whole in text too.
    for key in ("bos", "eos", "unknown", "padding"):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens) and tokens[int(i)] not in special:
            special.append(tokens[int(i)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.add_tokens(
        [AddedToken(t, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    )
    tok.post_processor = _post_processor(fields, tokens, add_bos, path)
    return tok


def _byte_level(fields: dict[str, Any], tokens: list[str], merges: list[str], path: str) -> Tokenizer:
    if not merges:
        raise ValueError(f"{path}: tokenizer.ggml.merges missing from the metadata (needed for 'gpt2')")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {
        (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    tok = Tokenizer(models.BPE(vocab, [_pair(m) for m in merges], fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(str(fields.get("tokenizer.ggml.pre")))
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
    return tok


def _sentencepiece(fields: dict[str, Any], tokens: list[str], merges: list[str], path: str) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs: list[tuple[str, str]]
    if merges:
        pairs = [_pair(m) for m in merges]
    else:
        scores = [float(s) for s in fields.get("tokenizer.ggml.scores") or []]
        if len(scores) != len(tokens):
            raise ValueError(
                f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens "
                "(a SentencePiece vocabulary without merges needs one score per token)"
            )
        pairs = merges_from_scores(tokens, scores)
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    # "first": only the text's very start gets the prefix, not the text after a special token
    # (transformers' LlamaTokenizer, legacy=False).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))  # the prefixed space is not part of the text
    tok.decoder = decoders.Sequence(steps)
    return tok


def _pair(merge: str) -> tuple[str, str]:
    a, _, b = merge.partition(" ")
    return a, b


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best score first (transformers' `generate_merges` with scores, same order and tie-breaks)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores, strict=True))  # a repeated token keeps its last score, as there
    found: list[tuple[str, str, float]] = []
    for piece, s in score.items():
        local = [(piece[:k], piece[k:], s) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _post_processor(fields: dict[str, Any], tokens: list[str], add_bos: bool, path: str) -> Any:
    """BOS / EOS around every encoded text, as tokenizer.ggml.add_bos_token / add_eos_token say."""
    ends: list[tuple[str, str]] = []  # (which end, field)
    if add_bos:
        ends.append(("bos", "tokenizer.ggml.bos_token_id"))
    if fields.get("tokenizer.ggml.add_eos_token"):
        ends.append(("eos", "tokenizer.ggml.eos_token_id"))
    named: dict[str, tuple[str, int]] = {}
    for end, key in ends:
        i = fields.get(key)
        if i is None:
            continue  # transformers drops the flag when the token is not named
        if not 0 <= int(i) < len(tokens):
            raise ValueError(f"{path}: {key}={i} is outside the vocabulary of {len(tokens)} tokens")
        named[end] = (tokens[int(i)], int(i))
    if not named:
        return None
    bos, eos = named.get("bos"), named.get("eos")
    single = " ".join([*([f"{bos[0]}:0"] if bos else []), "$A:0", *([f"{eos[0]}:0"] if eos else [])])
    pair_b = " ".join([*([f"{bos[0]}:1"] if bos else []), "$B:1", *([f"{eos[0]}:1"] if eos else [])])
    return processors.TemplateProcessing(single=single, pair=f"{single} {pair_b}", special_tokens=list(named.values()))
