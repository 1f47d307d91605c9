"""Tensor-parallel sizing: which sizes a checkpoint can be split into, and which one fits a rank.

Pure functions. Reading a checkpoint (``config.json`` and the safetensors headers) is the shell's
job: ``tpi_operator.checkpoint`` turns a directory into the ``ModelInfo`` used here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tpi_contract import tp_rule
from tpi_contract.safetensors_header import DTYPE_BYTES, FLOAT_DTYPES
from tpi_contract.tp_rule import MAX_TP

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec

#: Fraction of a rank's memory the weights shard may use; the rest is KV cache and activations.
WEIGHT_FRACTION = 0.8

_SERVED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class SizingError(ValueError):
    """The spec cannot be turned into a tensor-parallel size; the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModelInfo:
    """What the operator knows about a checkpoint (any field may be unknown)."""

    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    weight_bytes: int | None = None  # at the served dtype
    origin: str = "unknown"  # "checkpoint", "spec" or "unknown": said in messages


# ---------------------------------------------------------------------------- valid sizes
def tp_problems(info: ModelInfo, tp: int) -> list[str]:
    """Why ``tp`` cannot shard this model (empty: it can): the runtime's rule, ``tpi_contract.tp_rule``."""
    return tp_rule.tp_problems(info.num_attention_heads, info.num_key_value_heads, info.intermediate_size, tp)


def valid_tp_sizes(info: ModelInfo, limit: int = MAX_TP) -> list[int]:
    """Sizes the model can be split into; powers of two when the architecture is unknown."""
    return tp_rule.valid_tp_sizes(info.num_attention_heads, info.num_key_value_heads, info.intermediate_size, limit)


# ------------------------------------------------------------------------------- capacity
_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ('32Gi', '500m', '1e9') as a number."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIX[suffix]
    return float(text)


def rank_memory_bytes(spec: TPInferenceClusterSpec) -> int | None:
    """Memory one rank can hold weights in: its GPUs' memory, or its memory limit on CPU ranks."""
    res = spec.resources
    if res.gpus > 0:
        return int(res.gpus * parse_quantity(res.gpu_memory)) if res.gpu_memory else None
    return int(parse_quantity(res.memory)) if res.memory else None


# -------------------------------------------------------------------------------- choosing
def model_info_from_spec(spec: TPInferenceClusterSpec, read: ModelInfo | None = None) -> ModelInfo:
    """Merge what was read from the checkpoint with the spec's hints (the checkpoint wins)."""
    read = read or ModelInfo()
    hints = spec.model.config
    return ModelInfo(
        num_attention_heads=read.num_attention_heads or (hints.num_attention_heads if hints else None),
        num_key_value_heads=read.num_key_value_heads or (hints.num_key_value_heads if hints else None),
        intermediate_size=read.intermediate_size or (hints.intermediate_size if hints else None),
        weight_bytes=read.weight_bytes or spec.model.size_bytes,
        origin=read.origin if read.origin != "unknown" else "spec",
    )


def fits(info: ModelInfo, tp: int, rank_bytes: int | None) -> bool | None:
    """Whether a 1/tp shard fits a rank with headroom; None when either side is unknown."""
    if info.weight_bytes is None or rank_bytes is None:
        return None
    return info.weight_bytes / tp <= rank_bytes * WEIGHT_FRACTION


def desired_tp(spec: TPInferenceClusterSpec, info: ModelInfo) -> int:
    """The tensor-parallel size the spec asks for, resolving 'auto'; raises SizingError."""
    sizes = valid_tp_sizes(info)
    rank_bytes = rank_memory_bytes(spec)
    if spec.tensor_parallel_size != "auto":
        tp = int(spec.tensor_parallel_size)
        problems = tp_problems(info, tp)
        if problems:
            raise SizingError(
                "InvalidTensorParallelSize",
                f"tensorParallelSize={tp} cannot shard this model ({'; '.join(problems)}); valid sizes: {sizes[:16]}",
            )
        return tp
    if info.weight_bytes is None:
        raise SizingError(
            "SizingUnavailable",
            "tensorParallelSize 'auto' needs the weights' size: set spec.model.sizeBytes "
            "or make the checkpoint readable by the operator (--models-root)",
        )
    if rank_bytes is None:
        what = "resources.gpuMemory" if spec.resources.gpus else "resources.memory"
        raise SizingError("SizingUnavailable", f"tensorParallelSize 'auto' needs {what} to size ranks")
    for tp in sizes:
        if fits(info, tp, rank_bytes):
            return tp
    raise SizingError(
        "ModelTooLarge",
        f"{_gib(info.weight_bytes)} of weights do not fit {WEIGHT_FRACTION:.0%} of "
        f"{_gib(rank_bytes)} per rank "
        f"at any valid size (largest: {sizes[-1] if sizes else 'none'})",
    )


def next_smaller(sizes: list[int], current: int, floor: int, at_most: int | None = None) -> int | None:
    """Largest valid size below ``current`` (and <= ``at_most``) that is >= ``floor``; None if none."""
    limit = current - 1 if at_most is None else min(current - 1, at_most)
    candidates = [s for s in sizes if floor <= s <= limit]
    return max(candidates) if candidates else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ----------------------------------------------------------------- a checkpoint's weights
def weight_bytes_from_headers(headers: list[Mapping[str, Any]], served_dtype: str) -> int:
    """Bytes of all tensors (safetensors header entries) once floating-point ones are cast to the
    served dtype."""
    served = _SERVED_BYTES[served_dtype]
    total = 0
    for header in headers:
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(tensor["shape"])
            dtype = tensor["dtype"]
            total += count * (served if dtype in FLOAT_DTYPES else DTYPE_BYTES.get(dtype, 4))
    return total
