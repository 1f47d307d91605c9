"""GGUF checkpoints (llama.cpp / ollama files): the config, the weights and the tokenizer.

`--model` may name a `.gguf` file or a directory holding exactly one. The file is read with the
`gguf` package: its metadata becomes a config.json-shaped dict (gguf_config; ModelConfig then
applies the same checks as for safetensors), and each rank dequantizes only its own rows to the
serving dtype, in row chunks, undoing llama.cpp's q/k row permutation for the "llama" architecture.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tpi_contract import gguf_header

from .gguf_config import config_from_metadata
from .loader import CheckpointError, LoadReport
from .tp import ParamPlan, TensorSlice, logical_rows, shard_plan, weight_rows

log = logging.getLogger("tpi_runtime.gguf")

# Quantization types we dequantize (all through gguf.quants.dequantize): the float types and the
# legacy / K quants llama.cpp's Q2_K..Q8_0 files mix (a Q4_K_M file holds Q4_K, Q6_K and often
# Q5_0 / Q8_0 tensors). The IQ* and ternary types are refused, naming the tensor.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Dequantized float32 bytes per row chunk: bounds a rank's transient memory per tensor (the raw
# bytes, the float32 rows and the copy handed to the parameter each hold at most this much).
_CHUNK_BYTES = 4 << 20

# Hugging Face parameter name pieces -> GGUF tensor name pieces (llama.cpp's tensor map).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_path(model: str) -> str | None:
    """The GGUF file `model` names (a .gguf file, or a directory with exactly one), else None."""
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise CheckpointError(f"{model}: GGUF file not found")
        return model
    if not os.path.isdir(model) or os.path.exists(os.path.join(model, "config.json")):
        return None
    found = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{model}: {len(found)} .gguf files ({', '.join(found)}); name one with --model")
    return os.path.join(model, found[0]) if found else None


def hf_to_gguf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")  # model.layers.<i>.<module...>.<weight|bias>
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in _LAYER_NAMES:
        raise CheckpointError(f"no GGUF name for tensor {name}")
    return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


@dataclass
class GGUFFile:
    """An opened GGUF file: metadata values, tensors by name, the file size."""

    path: str
    fields: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    @classmethod
    def open(cls, path: str) -> GGUFFile:
        from gguf import GGUFReader

        try:  # the contract's reader first: it names the file and tensor of a truncated/corrupt file
            gguf_header.read_header(path, max_array=0)
        except gguf_header.HeaderError as e:
            raise CheckpointError(str(e)) from None
        try:
            reader = GGUFReader(path)
        except Exception as e:  # the reader's errors name neither the file nor the cause plainly
            raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None
        fields: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                fields[key] = field.contents()
            except Exception as e:
                raise CheckpointError(f"{path}: corrupt metadata value {key}: {e}") from None
        size = os.path.getsize(path)
        tensors = {}
        for t in reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name} "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})"
                )
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"{path}: file is truncated: tensor {t.name} needs bytes up to "
                    f"{t.data_offset + t.n_bytes} but the file holds {size}"
                )
            tensors[t.name] = t
        return cls(path, fields, tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def config_dict(self) -> dict[str, Any]:
        """A config.json-shaped dict from the metadata (ModelConfig.from_dict checks it)."""
        return config_from_metadata(self.fields, self._small_tensor, self.path, "output.weight" in self.tensors)

    def _small_tensor(self, name: str) -> np.ndarray | None:
        """A 1-D metadata-like tensor (rope_freqs.weight) as float32, or None when absent."""
        t = self.tensors.get(name)
        return None if t is None else _dequantize(self.path, t, 0, int(t.data.shape[0]))

    @property
    def chat_template(self) -> str | None:
        value = self.get("tokenizer.chat_template")
        return None if value is None else str(value)


def _permuted(name: str, arch: str) -> bool:
    # convert_hf_to_gguf interleaves the two RoPE halves of each q/k head for llama-arch files.
    return arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight"))


def _unpermute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's permute on whole heads: per head, rows (0, 1, 2, 3...) were stored as
    (0, d/2, 1, d/2+1, ...)."""
    n = rows.shape[0] // head_dim
    return rows.reshape(n, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _dequantize(path: str, t: Any, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of GGUF tensor `t` as float32 [rows, cols] (1-D: elements [r0, r1)).

    Only those rows' bytes are read, with pread rather than through the reader's memory map:
    mapped pages a rank touched would stay in its RSS until the map goes, so a rank walking every
    row of a row-parallel weight would end up holding the whole tensor's pages."""
    from gguf import quants

    layout = t.data  # the reader's memmap view: its dtype and shape say how rows are stored
    flat = layout.ndim == 1  # a norm / bias / rope_freqs vector: small, read whole
    width = int(layout.shape[-1])
    start, n = (0, int(t.n_bytes)) if flat else (r0 * width * layout.itemsize, (r1 - r0) * width * layout.itemsize)
    with open(path, "rb") as fh:
        raw = os.pread(fh.fileno(), n, int(t.data_offset) + start)
    if len(raw) != n:
        raise CheckpointError(f"{path}: file is truncated: tensor {t.name} ends before byte {start + n}")
    rows = np.frombuffer(raw, dtype=layout.dtype)
    out = np.asarray(quants.dequantize(rows if flat else rows.reshape(r1 - r0, width), t.tensor_type), np.float32)
    return out[r0:r1] if flat else out.reshape(r1 - r0, -1)


def _read_slice(f: GGUFFile, arch: str, head_dim: int, s: TensorSlice, sink: Any) -> int:
    """Feed this rank's part of slice `s` to sink(first_local_row, float32 rows); returns bytes."""
    name = hf_to_gguf_name(s.name)
    t = f.tensors.get(name)
    if t is None:
        raise CheckpointError(f"{f.path}: missing tensor {name} (expected shape {list(s.shape)})")
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists the innermost dim first
    if shape != s.shape:
        raise CheckpointError(
            f"{f.path}: shape mismatch for tensor {name}: file has {list(shape)}, metadata implies {list(s.shape)}"
        )
    if len(s.shape) == 1:
        a, b = (s.start, s.stop) if s.dim == 0 else (0, s.shape[0])
        sink(0, _dequantize(f.path, t, 0, s.shape[0])[a:b])
        return (b - a) * 4
    cols = s.shape[1]
    if s.dim == 1:  # a column block of every row: dequantize row chunks, keep our columns
        r_lo, r_hi, c_lo, c_hi = 0, s.shape[0], s.start, s.stop
    else:
        r_lo, r_hi, c_lo, c_hi = (s.start, s.stop, 0, cols) if s.dim == 0 else (0, s.shape[0], 0, cols)
    step = max(1, _CHUNK_BYTES // (cols * 4))
    if _permuted(name, arch):
        step = max(1, step // head_dim) * head_dim  # whole heads: the permutation is within a head
    nbytes = 0
    for a in range(r_lo, r_hi, step):
        b = min(a + step, r_hi)
        rows = _dequantize(f.path, t, a, b)
        if _permuted(name, arch):
            rows = _unpermute(rows, head_dim)
        sink(a - r_lo, rows[:, c_lo:c_hi])
        nbytes += (b - a) * (c_hi - c_lo) * 4
    return nbytes


@torch.inference_mode()
def load_gguf_weights(model: torch.nn.Module, f: GGUFFile, cfg: Any, rank: int, tp: int) -> LoadReport:
    """Fill `model`'s local parameters with this rank's slices of the GGUF file's tensors."""
    t0 = time.monotonic()
    arch = str(f.get("general.architecture"))
    plan: list[ParamPlan] = shard_plan(cfg, rank, tp)
    params = dict(model.named_parameters())
    report = LoadReport(files=[f.path], bytes_total=sum(int(t.n_bytes) for t in f.tensors.values()))
    expected = {hf_to_gguf_name(s.name) for pp in plan for s in pp.slices}
    # output.weight: a tied head some exporters store anyway; rope_freqs.weight: read into the config.
    extra = sorted(set(f.tensors) - expected - {"output.weight", "rope_freqs.weight"})
    if extra:
        raise CheckpointError(f"{f.path}: unexpected tensor {extra[0]} (not part of a {cfg.architecture})")
    for pp in plan:
        dest = params[pp.param]
        row = 0
        for s in pp.slices:

            def sink(first: int, rows: np.ndarray, base: int = row, dest: torch.Tensor = dest) -> None:
                src = torch.from_numpy(np.array(rows, dtype=np.float32, order="C"))  # own, writable copy
                for a, b, dst in weight_rows(dest, base + first, base + first + src.shape[0]):
                    dst.copy_(src[a - base - first : b - base - first])

            try:
                report.bytes_read += _read_slice(f, arch, cfg.head_dim, s, sink)
            except CheckpointError:
                raise
            except Exception as e:  # a corrupt block the header checks could not catch
                raise CheckpointError(f"{f.path}: failed reading tensor {hf_to_gguf_name(s.name)}: {e}") from e
            report.tensors_read += 1
            row += s.local_shape[0]
        for _, _, padding in weight_rows(dest, row, logical_rows(dest)):
            padding.zero_()  # vocab padding rows produce logit 0 and are sliced away
    report.seconds = time.monotonic() - t0
    log.info(
        "rank %d/%d: GGUF weights dequantized: %.1f MiB float32 from a %.1f MiB file in %.2fs",
        rank,
        tp,
        report.bytes_read / 2**20,
        report.bytes_total / 2**20,
        report.seconds,
    )
    return report
