"""Decoder-only model configuration (Llama, Mistral, Qwen2/2.5, Qwen3) read from a Hugging Face
`config.json`, and the tensor-parallel sizes it can be split into.

The families differ only in a few switches (`qkv_bias`, `qk_norm`, `sliding_window`); anything
that would change the maths beyond them is refused here, naming the config field.

Pure Python (no torch import). The rule itself lives in ``tpi_contract.tp_rule``, which the
operator applies too, so both sides accept and refuse the same sizes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from tpi_contract import tp_rule

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# The rope_scaling fields each type's formula reads (model.rope_inv_freq).
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry biases
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before RoPE
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        family = _family_switches(arch, d)
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        eos = d.get("eos_token_id")
        eos_ids: tuple[int, ...] = (
            () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),))
        )
        # transformers >= 5 writes `rope_parameters` (theta + scaling in one dict); older versions
        # write `rope_theta` and `rope_scaling`. Accept both.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        cfg = cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            architecture=arch,
            **family,
            raw=dict(d),
        )
        if cfg.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {cfg.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        missing = [k for k in _ROPE_KEYS.get(cfg.rope_type, ()) if (cfg.rope_scaling or {}).get(k) is None]
        if missing:  # checked here, not as a KeyError once the RoPE tables are built
            raise ValueError(f"rope_scaling type {cfg.rope_type!r} needs rope_scaling.{missing[0]}")
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise ValueError(f"unsupported partial_rotary_factor={partial}: RoPE over the whole head only")
        if heads % cfg.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={cfg.num_key_value_heads}"
            )
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json in model directory") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        return cls.from_dict(d)


def _family_switches(arch: str, d: dict[str, Any]) -> dict[str, Any]:
    """The per-family switches; raises ValueError naming the first field we cannot honour."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
    if d.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=true: no supported family has MLP biases")
    if d.get("attention_bias"):
        # Llama/Qwen3 attention_bias also puts a bias on o_proj, which no checkpoint we know uses.
        raise ValueError(f"unsupported attention_bias=true for {arch}")
    window = d.get("sliding_window")
    if arch == "MistralForCausalLM":
        if window is not None and int(window) < 1:
            raise ValueError(f"invalid sliding_window {window!r}: must be a positive integer or null")
        return {"sliding_window": None if window is None else int(window)}
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        sliding = [t for t in d.get("layer_types") or [] if t != "full_attention"]
        if d.get("use_sliding_window") or sliding:
            raise ValueError(
                f"unsupported use_sliding_window/layer_types for {arch}: only full attention is implemented"
            )
        return {"qkv_bias": arch == "Qwen2ForCausalLM", "qk_norm": arch == "Qwen3ForCausalLM"}
    if arch == "LlamaForCausalLM" and window is not None:
        raise ValueError(f"unsupported sliding_window={window!r} for LlamaForCausalLM")
    return {}


def _tp_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why `tp` cannot shard this model (empty list: it can)."""
    return tp_rule.tp_problems(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, tp)


def valid_tp_sizes(config: ModelConfig | dict[str, Any]) -> list[int]:
    """Every tensor-parallel size this model can be split into (vocab size needs no divisibility:
    the vocab-parallel embedding / LM head pad the last shard)."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    heads = cfg.num_attention_heads
    return tp_rule.valid_tp_sizes(heads, cfg.num_key_value_heads, cfg.intermediate_size, limit=heads)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the problem and the valid sizes when `tp` cannot shard the model."""
    problems = _tp_problems(cfg, tp)
    if problems:
        raise ValueError(
            f"tensor-parallel size {tp} is invalid for this model ({'; '.join(problems)}); "
            f"valid sizes: {valid_tp_sizes(cfg)}"
        )
