"""Tiny random checkpoints (Llama, Mistral, Qwen2, Qwen3) for tests, demos and e2e runs (no
network, no hub).

`make_tiny_checkpoint(dir, **config_overrides)` writes a Hugging Face style directory:
config.json, sharded model-0000x-of-0000y.safetensors + model.safetensors.index.json (or a single
model.safetensors), generation_config.json and a word-level tokenizer.json, so both token-id and
string prompts work. Needs `transformers` (a dev dependency); the runtime itself does not.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Real words first so demo output reads like (random) text; filler tokens pad the vocabulary.
_WORDS_TEXT = (
    "the a an and or but of to in on at for with from by is are was were be been it he she they we "
    "you i this that these those there here what which who when where why how cat dog bird fish tree "
    "house car road city sun moon star sky sea river hill rain snow wind fire stone light dark red "
    "blue green white black big small old new good bad fast slow hot cold happy sad runs walks sees "
    "eats sleeps sings reads writes makes takes gives finds tells asks works plays"
)
_WORDS = _WORDS_TEXT.split()
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 257,  # prime: never divisible by tp, exercising the padded vocab shard
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# Per-family overrides of TINY_CONFIG exercising what sets each family apart, at odd shapes.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    # A window much shorter than the test prompts: keys outside it must never be attended.
    "mistral": {"sliding_window": 7},
    "qwen2": {},  # q/k/v biases are implicit in the architecture
    # head_dim 24 != hidden 64 / 4 heads; per-head q/k norms.
    "qwen3": {"head_dim": 24, "intermediate_size": 132},
}


def tiny_vocab(vocab_size: int) -> list[str]:
    words = list(SPECIAL_TOKENS) + list(_WORDS)
    words += [f"tok{i}" for i in range(len(words), vocab_size)]
    return words[:vocab_size]


def write_tokenizer(model_dir: str, vocab_size: int) -> None:
    """A whitespace word-level tokenizer.json covering exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(tiny_vocab(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(os.path.join(model_dir, "tokenizer.json"))


def make_tiny_checkpoint(
    model_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | int = "100KB",
    tokenizer: bool = True,
    init_std: float = 0.2,
    family: str = "llama",
    **config_overrides: Any,
) -> str:
    """Build a random model of `family` (a FAMILY_CONFIGS key) from TINY_CONFIG + the family's
    overrides + `config_overrides`, and save it as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    cfg = AutoConfig.for_model(family, **{**TINY_CONFIG, **FAMILY_CONFIGS[family], **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        # The default init (std 0.02) makes every logit nearly equal, so greedy ties would be
        # decided by rounding noise; a wider spread keeps argmax comparisons meaningful. Biases
        # (zero at init) and norm weights (one) get noise too, so a dropped one shows.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_std)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer:
        write_tokenizer(model_dir, cfg.vocab_size)
    return model_dir


def load_hf_model(model_dir: str):  # type: ignore[no-untyped-def]
    """The reference implementation: transformers' own model class on the same files."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def read_config(model_dir: str) -> dict[str, Any]:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


# --- tiny GGUF files -----------------------------------------------------------------------------

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Every type the runtime dequantizes, cycled over the 2-D tensors of a tiny GGUF file.
GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32")
# K-quant types have no Python quantizer: random blocks, with each block's scale field(s) set to a
# small float16 so the weights stay in a sane range. (byte offset of d, of dmin or None)
_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}


def _llamacpp_permute(w: Any, n_head: int) -> Any:
    """convert_hf_to_gguf's q/k row permutation for llama-arch files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A tiny GPT-2 style vocabulary: the 256 byte symbols, two merges, three control tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    sym, n = [], 0
    for b in range(256):
        if b in printable:
            sym.append(chr(b))
        else:
            sym.append(chr(256 + n))
            n += 1
    merges = ["Ġ t", "h e"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sym, "Ġt", "he"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


# SentencePiece pieces of the tiny "llama" vocabulary, best first: letters, then merged pieces.
_SPM_PIECES = [
    "\u2581",
    "e",
    "t",
    "a",
    "o",
    "i",
    "n",
    "s",
    "h",
    "r",
    "d",
    "l",
    "u",
    "c",
    "m",
    "w",
    "f",
    "g",
    "y",
    "p",
    "b",
    "v",
    "k",
    ".",
    ",",
    "!",
    "?",
    "'",
    "é",
    "\u2581t",
    "he",
    "\u2581the",
    "in",
    "er",
    "\u2581a",
    "an",
    "\u2581c",
    "at",
    "\u2581cat",
    "on",
    "\u2581on",
    "is",
    "\u2581is",
    "\u2581s",
    "\u2581d",
    "og",
    "\u2581dog",
    "re",
    "\u2581w",
    "it",
    "\u2581it",
    "\u2581\u2581",
    "\u2581\u2581\u2581\u2581",
]


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A tiny SentencePiece (llama.cpp "llama") vocabulary: <unk>, <s>, </s>, the 256 <0xNN>
    byte-fallback tokens, scored pieces (no merges: they are recovered from the scores), and one
    user-defined token."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *_SPM_PIECES, "<tool>"]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-float(i) for i in range(len(_SPM_PIECES))), 0.0]
    types = [2, 3, 3, *([6] * 256), *([1] * len(_SPM_PIECES)), 4]  # unknown, control, byte, normal, user
    return tokens, scores, types


def llama3_rope_factors(rope_scaling: dict[str, Any], theta: float, head_dim: int) -> list[float]:
    """convert_hf_to_gguf's rope_freqs.weight for a llama3 rope_scaling (one divisor per frequency)."""
    import math

    factor = float(rope_scaling["factor"])
    low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
    old = float(rope_scaling["original_max_position_embeddings"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def make_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    family: str = "llama",
    seed: int = 0,
    types: tuple[str, ...] = GGUF_TYPES,
    vocab: str = "gpt2",
    head_dim: int = 64,
    name: str | None = None,
    rope_scaling: dict[str, Any] | None = None,
    sliding_window: int | None = None,
    vocab_size: int | None = None,
) -> str:
    """A tiny random GGUF file of `family` (llama/qwen2/qwen3) whose 2-D tensors cycle through
    `types`, written the way llama.cpp's converter writes them (q/k rows permuted for llama).

    vocab: "gpt2" (byte-level BPE) or "llama" (SentencePiece, scores and byte fallback).
    rope_scaling: Hugging Face style; "linear" goes to <arch>.rope.scaling.*, "llama3" to a
    rope_freqs.weight tensor, as convert_hf_to_gguf writes them. sliding_window: written as
    <arch>.attention.sliding_window. vocab_size: pad the vocabulary with plain tokens up to it."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType, quants
    from transformers import AutoConfig, AutoModelForCausalLM

    from .gguf_checkpoint import hf_to_gguf_name  # the loader's own name map: the file must match it

    if vocab == "gpt2":
        tokens, merges, token_types = _byte_level_vocab()
        scores: list[float] = []
    else:
        tokens, scores, token_types = _sentencepiece_vocab()
        merges = []
    for k in range(len(tokens), vocab_size or 0):
        tokens.append(f"tok{k}")
        token_types.append(1)
        scores.extend([-1e4] if scores else [])
    overrides = {
        "vocab_size": len(tokens),
        "hidden_size": 256,  # K-quant rows are 256-element super-blocks
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,  # 4 heads x head_dim must stay a multiple of 256 (K-quant rows of o_proj)
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg = AutoConfig.for_model(family, **{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    rng = np.random.default_rng(seed)
    arch = GGUF_ARCH[family]
    w = GGUFWriter(os.fspath(path), arch)
    w.add_name(name or f"tiny-{family}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)
    if rope_scaling is not None and rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope_scaling["factor"]))
    w.add_tokenizer_model(vocab)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    if vocab == "gpt2":
        w.add_tokenizer_pre("default")
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(True)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    if rope_scaling is not None and rope_scaling["rope_type"] == "llama3":
        factors = np.array(llama3_rope_factors(rope_scaling, 10000.0, head_dim), dtype=np.float32)
        w.add_tensor("rope_freqs.weight", factors, raw_dtype=GGMLQuantizationType.F32)
    i = 0
    for hf_name, p in model.state_dict().items():
        data = p.detach().numpy().astype(np.float32)
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gname = hf_to_gguf_name(hf_name)
        if data.ndim == 1:
            if "norm" in hf_name:
                data = rng.uniform(0.5, 1.5, data.shape).astype(np.float32)
            else:
                data = rng.normal(0.0, 0.5, data.shape).astype(np.float32)  # q/k/v biases
            w.add_tensor(gname, data, raw_dtype=GGMLQuantizationType.F32)
            continue
        qtype = types[i % len(types)]
        i += 1
        data = rng.normal(0.0, 0.08, data.shape).astype(np.float32)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            data = _llamacpp_permute(data, heads)
        t = GGMLQuantizationType[qtype]
        if qtype in _K_SCALES:
            block, size = quants.GGML_QUANT_SIZES[t]
            raw = rng.integers(0, 256, (data.shape[0], data.shape[1] // block, size), dtype=np.uint8)
            d_at, dmin_at = _K_SCALES[qtype]
            raw[:, :, d_at : d_at + 2] = np.full(raw.shape[:2], 1e-4, np.float16)[..., None].view(np.uint8)
            if dmin_at is not None:
                raw[:, :, dmin_at : dmin_at + 2] = np.full(raw.shape[:2], 1e-4, np.float16)[..., None].view(np.uint8)
            w.add_tensor(gname, raw.reshape(data.shape[0], -1), raw_dtype=t)
        elif qtype == "F32":
            w.add_tensor(gname, data, raw_dtype=t)
        elif qtype == "F16":
            w.add_tensor(gname, data.astype(np.float16), raw_dtype=t)
        else:
            try:
                w.add_tensor(gname, quants.quantize(data, t), raw_dtype=t)
            except NotImplementedError:  # a type gguf cannot write (IQ*): random blocks, for refusal tests
                block, size = quants.GGML_QUANT_SIZES[t]
                raw = rng.integers(0, 256, (data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
                w.add_tensor(gname, raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def load_hf_gguf_model(path: str, **overrides: Any):  # type: ignore[no-untyped-def]
    """The reference: transformers' own GGUF loading (dequantize, un-permute) of the same file.

    transformers does not read `<arch>.attention.key_length` for qwen3 files (it keeps
    Qwen3Config's default head_dim of 128), so the file's value is passed for it. Nor does it read
    RoPE scaling or a sliding window from GGUF metadata: a test passes those as `overrides`.
    A `sliding_window` override gives transformers' MistralForCausalLM holding the weights its
    GGUF loader read for the llama-arch file (its own Mistral GGUF path fails in gguf-py lookups).
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    fields = GGUFReader(path).fields
    extra: dict[str, Any] = {}
    if fields["general.architecture"].contents() == "qwen3":
        extra["head_dim"] = int(fields["qwen3.attention.key_length"].contents())
    window = overrides.pop("sliding_window", None)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        **{**extra, **overrides},
    ).eval()
    if window is None:
        return model
    d = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    mistral = MistralForCausalLM(MistralConfig(**{**d, "sliding_window": window})).float().eval()
    mistral.load_state_dict(model.state_dict())
    return mistral
