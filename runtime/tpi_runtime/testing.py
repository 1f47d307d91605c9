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
