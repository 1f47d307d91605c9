"""A GGUF file's metadata as a config.json-shaped dict (ModelConfig.from_dict then applies the same
checks as for safetensors).

Every `<arch>.*` key is either mapped or refused: a key we do not know could change the maths
(MoE experts, partial rotary, soft-capping...), so serving the file anyway could be silently
wrong. Refusals name the field (or tensor) and the file.

RoPE scaling follows llama.cpp, not transformers' GGUF loader (which ignores both):
`<arch>.rope.scaling.type = linear` + `.factor`, and llama3's `rope_freqs.weight` (one divisor per
rotary frequency, written by convert_hf_to_gguf for Llama 3.1+), turned back into the llama3
parameters the runtime's RoPE takes, and checked to reproduce every divisor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# general.architecture -> the transformers architecture whose maths it is.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# `<arch>.` keys read below; any other one is refused.
_KNOWN_KEYS = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.attn_factor",
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "expert_count",
    "expert_used_count",
}
# llama.cpp's default original context for llama3 rope_freqs (convert_hf_to_gguf's).
_LLAMA3_ORIGINAL_CONTEXT = 8192
_ROPE_FREQS = "rope_freqs.weight"


class GGUFConfigError(ValueError):
    """The file's metadata asks for something the runtime does not implement (or is incomplete)."""


def config_from_metadata(
    fields: dict[str, Any], read_tensor: Callable[[str], np.ndarray | None], path: str, has_output: bool
) -> dict[str, Any]:
    """The config.json-shaped dict for a GGUF file's metadata. `read_tensor(name)` gives a small
    float32 tensor (rope_freqs.weight) or None; `has_output`: the file has output.weight."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFConfigError(
            f"{path}: unsupported general.architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    for key in sorted(fields):
        if key.startswith(f"{arch}.") and key[len(arch) + 1 :] not in _KNOWN_KEYS:
            raise GGUFConfigError(f"{path}: unsupported metadata {key}={_short(fields[key])} (not implemented)")

    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}")
        return default if value is None else value

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise GGUFConfigError(f"{path}: missing metadata {arch}.{key}")
        return value

    for key in ("expert_count", "expert_used_count"):
        if int(get(key, 0)):
            raise GGUFConfigError(f"{path}: unsupported {arch}.{key}={get(key)}: mixture-of-experts is not implemented")
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise GGUFConfigError(
            f"{path}: unsupported {arch}.attention.value_length={value_dim} != {arch}.attention.key_length={head_dim}"
        )
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFConfigError(
            f"{path}: unsupported {arch}.rope.dimension_count={rope_dims}: partial rotary embeddings are not "
            f"implemented (head_dim {head_dim})"
        )
    vocab = int(get("vocab_size", len(fields.get("tokenizer.ggml.tokens") or [])))
    if vocab < 1:
        raise GGUFConfigError(f"{path}: missing metadata {arch}.vocab_size (and no tokenizer.ggml.tokens)")
    theta = float(get("rope.freq_base", 10000.0))
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": not has_output,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _stop_ids(fields),
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(fields, arch, path, theta, head_dim, read_tensor(_ROPE_FREQS))
    if scaling is not None:
        d["rope_scaling"] = scaling
    window = get("attention.sliding_window")
    if window:
        if arch != "llama":
            raise GGUFConfigError(f"{path}: unsupported {arch}.attention.sliding_window={window} for {arch}")
        # A llama-arch file with a window is Mistral's maths: keys outside the window are masked.
        d["architectures"] = ["MistralForCausalLM"]
        d["sliding_window"] = int(window)
    return d


def _stop_ids(fields: dict[str, Any]) -> list[int] | None:
    """EOS first (the chat template's eos_token), then the end-of-turn / end-of-message tokens
    llama.cpp also stops on (Llama 3 Instruct's <|eot_id|> when EOS is <|end_of_text|>)."""
    keys = ("eos", "eot", "eom")
    ids = [int(i) for i in (fields.get(f"tokenizer.ggml.{k}_token_id") for k in keys) if i is not None]
    return list(dict.fromkeys(ids)) or None


def _rope_scaling(
    fields: dict[str, Any], arch: str, path: str, theta: float, head_dim: int, freqs: np.ndarray | None
) -> dict[str, Any] | None:
    kind = str(fields.get(f"{arch}.rope.scaling.type") or "none")
    attn = float(fields.get(f"{arch}.rope.scaling.attn_factor") or 1.0)
    if attn != 1.0:
        raise GGUFConfigError(f"{path}: unsupported {arch}.rope.scaling.attn_factor={attn} (only 1.0)")
    if kind not in ("none", "linear"):
        raise GGUFConfigError(
            f"{path}: unsupported {arch}.rope.scaling.type {kind!r}; supported: 'none', 'linear', "
            f"and llama3 scaling as a {_ROPE_FREQS} tensor"
        )
    linear = None
    if kind == "linear":
        factor = fields.get(f"{arch}.rope.scaling.factor")
        if factor is None or float(factor) <= 0:
            raise GGUFConfigError(
                f"{path}: {arch}.rope.scaling.type 'linear' needs a positive {arch}.rope.scaling.factor"
            )
        linear = {"rope_type": "linear", "factor": float(factor)}
    if freqs is None:
        return linear
    if linear is not None:
        raise GGUFConfigError(
            f"{path}: unsupported tensor {_ROPE_FREQS} together with {arch}.rope.scaling.type 'linear'"
        )
    original = int(fields.get(f"{arch}.rope.scaling.original_context_length") or _LLAMA3_ORIGINAL_CONTEXT)
    return llama3_from_factors(np.asarray(freqs, dtype=np.float64).reshape(-1), theta, head_dim, original, path)


def llama3_from_factors(
    factors: np.ndarray, theta: float, head_dim: int, original: int, path: str = "?"
) -> dict[str, Any] | None:
    """The llama3 rope_scaling whose per-frequency divisors are `factors` (rope_freqs.weight):
    1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) between, with
    s linear in 1 / wavelength. The parameters are only defined up to a common scale, so
    `original` (the file's original context, else llama.cpp's 8192) fixes it. None when every
    divisor is 1. GGUFConfigError naming the tensor when no llama3 parameters give the divisors."""

    def refuse(why: str) -> GGUFConfigError:
        return GGUFConfigError(f"{path}: unsupported tensor {_ROPE_FREQS}: {why}")

    if factors.shape != (head_dim // 2,):
        raise refuse(f"shape [{factors.size}], expected [{head_dim // 2}] (one divisor per rotary frequency pair)")
    if not np.all(np.isfinite(factors)) or np.any(factors < 1.0 - 1e-6):
        raise refuse("divisors must be finite and >= 1 (llama3 scaling only slows rotations)")
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    x = inv / (2 * math.pi)  # 1 / wavelength: decreasing along the frequencies
    high = np.isclose(factors, 1.0, rtol=1e-6, atol=0)
    low = np.isclose(factors, factor, rtol=1e-6, atol=0)
    mid = ~high & ~low
    band = np.where(high, 0, np.where(mid, 1, 2))
    if np.any(np.diff(band) < 0):
        raise refuse("divisors are not 1 for short wavelengths, rising to a constant factor for long ones")
    # s = 0 at x = x_low (slowed by `factor`), 1 at x = x_high (kept); between, linear in x.
    s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x_hi_band = x[high].min() if high.any() else x.max() * 2  # smallest x still kept whole
    x_lo_band = x[low].max() if low.any() else x.min() / 2  # largest x fully slowed
    if mid.sum() >= 2:
        a, b = np.polyfit(x[mid], s, 1)
        if a <= 0:
            raise refuse("divisors between the bands do not fall with the wavelength")
        x_low, x_high = -b / a, (1 - b) / a
    elif mid.sum() == 1:
        xm, sm = float(x[mid][0]), float(s[0])
        span = 0.5 * min((xm - x_lo_band) / sm, (x_hi_band - xm) / (1 - sm))
        x_low = xm - sm * span
        x_high = x_low + span
    else:  # no frequency between the bands: put both edges in the gap
        x_low = x_lo_band + (x_hi_band - x_lo_band) / 3
        x_high = x_lo_band + 2 * (x_hi_band - x_lo_band) / 3
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(original * x_low),
        "high_freq_factor": float(original * x_high),
        "original_max_position_embeddings": original,
    }
    got = inv / _llama3_inv(inv, scaling)
    err = float(np.max(np.abs(got - factors) / factors))
    if err > 1e-4:
        raise refuse(f"no llama3 rope scaling reproduces its divisors (closest differs by {err:.2e} relative)")
    return scaling


def _llama3_inv(inv: np.ndarray, rs: dict[str, Any]) -> np.ndarray:
    """transformers' (and model.rope_inv_freq's) llama3 formula, in float64."""
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
