"""Shard-on-load from Hugging Face safetensors checkpoints.

Each rank reads only the slices it owns (`safe_open(...).get_slice(name)[a:b]`), never the whole
tensor, and copies them straight into its preallocated local parameters. Before touching any
data, every file header is validated against the file size and the expected tensor names and
shapes, so a broken checkpoint fails with a `CheckpointError` naming the file and the tensor
instead of a segfault or a shape error deep inside the model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from tpi_contract import safetensors_header

from .config import ModelConfig
from .tp import ParamPlan, TensorSlice, logical_rows, shard_plan, weight_rows

log = logging.getLogger("tpi_runtime.loader")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {dt: safetensors_header.DTYPE_BYTES[dt] for dt in ("F32", "BF16", "F16")}  # the ones we load
# Harmless extras some exporters write; the model recomputes / shares them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Peak-memory knobs: read at most _CHUNK_BYTES of file span per get_slice, and drop the file's
# mapping after _WINDOW_BYTES so touched pages do not pile up in this rank's RSS.
_CHUNK_BYTES = 8 << 20
_WINDOW_BYTES = 16 << 20


class CheckpointError(Exception):
    """The checkpoint is missing, incomplete or does not match config.json."""


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    tensors_read: int = 0
    bytes_read: int = 0  # bytes of checkpoint data this rank actually sliced out
    bytes_total: int = 0  # bytes of all tensors in the checkpoint
    seconds: float = 0.0


@dataclass(frozen=True)
class _Header:
    path: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)


def read_header(path: str) -> _Header:
    """Parse and validate one safetensors header (no tensor data is read): the contract's reader
    checks the header fits the file, this checks every tensor against its dtype and the data."""
    try:
        header = safetensors_header.read_header(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing") from None
    except safetensors_header.HeaderError as e:
        raise CheckpointError(str(e)) from None
    data_len = header.data_bytes
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.tensors.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}: {e}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has unsupported dtype {dtype} (supported: {', '.join(_DTYPES)})"
            )
        numel = 1
        for s in shape:
            numel *= s
        if b - a != numel * _DTYPES[dtype]:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name} offsets [{a}, {b}) "
                f"do not match shape {list(shape)} {dtype}"
            )
        if b > data_len:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name} needs data bytes up to {b} "
                f"but the file holds only {data_len}"
            )
        tensors[name] = (dtype, shape)
    return _Header(path, tensors)


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """tensor name -> file path, from the index or from the single file's header."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index file: {e}") from None
        return {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(single):
        return dict.fromkeys(read_header(single).tensors, single)
    pickles = (
        [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(model_dir) else []
    )
    hint = f" (found {pickles[0]}: pickle checkpoints are refused, convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _validate(cfg: ModelConfig, plan: list[ParamPlan], where: dict[str, str]) -> dict[str, _Header]:
    headers: dict[str, _Header] = {}
    for path in sorted(set(where.values())):
        if not os.path.exists(path):
            names = sorted(n for n, p in where.items() if p == path)
            raise CheckpointError(
                f"{path}: checkpoint file is missing (it should hold tensor "
                f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''})"
            )
        headers[path] = read_header(path)
    expected = {s.name: s for pp in plan for s in pp.slices}
    for name, s in expected.items():
        found = where.get(name)
        if found is None:
            src = (
                os.path.join(os.path.dirname(next(iter(headers), "")) or ".", INDEX_FILE)
                if len(headers) > 1
                else next(iter(headers), "?")
            )
            raise CheckpointError(f"{src}: missing tensor {name} (expected shape {list(s.shape)})")
        path = found
        if name not in headers[path].tensors:
            raise CheckpointError(f"{path}: missing tensor {name} (the index says it is in this file)")
        shape = headers[path].tensors[name][1]
        if shape != s.shape:
            raise CheckpointError(
                f"{path}: shape mismatch for tensor {name}: checkpoint has {list(shape)}, "
                f"config.json implies {list(s.shape)}"
            )
    for path, h in headers.items():
        for name in h.tensors:
            if name in expected or name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some exporters store the tied head anyway
            raise CheckpointError(
                f"{path}: unexpected tensor {name} (not part of a {cfg.architecture} with this config.json)"
            )
    return headers


@dataclass(frozen=True)
class _Chunk:
    """Rows [r0, r1) of a slice (rows of the slice, i.e. of the local block), and where they go."""

    slice: TensorSlice
    dest: torch.Tensor
    dest_row: int
    r0: int
    r1: int
    touched: int  # bytes of the file these rows span (whole rows, even for a column slice)


def _chunks(s: TensorSlice, dest: torch.Tensor, dest_row: int, elem: int) -> list[_Chunk]:
    """Split a slice into row chunks of at most _CHUNK_BYTES of file span each."""
    if len(s.shape) == 1:  # a norm weight (whole) or a bias (its rows, like its weight's)
        rows = s.local_shape[0]
        return [_Chunk(s, dest, dest_row, 0, rows, rows * elem)]
    rows = s.local_shape[0]
    row_bytes = _numel(s.shape[1:]) * elem
    step = max(1, _CHUNK_BYTES // row_bytes)
    return [
        _Chunk(s, dest, dest_row + a, a, min(a + step, rows), (min(a + step, rows) - a) * row_bytes)
        for a in range(0, rows, step)
    ]


def _read_chunk(f: Any, c: _Chunk) -> torch.Tensor:
    """``f``: an open ``safe_open`` handle (safetensors ships no type information)."""
    s = c.slice
    sl = f.get_slice(s.name)
    out: torch.Tensor
    if len(s.shape) == 1:
        out = sl[s.start : s.stop] if s.dim == 0 else sl[:]
    elif s.dim == 1:  # column slice (row-parallel weight): all rows, our columns
        out = sl[c.r0 : c.r1, s.start : s.stop]
    else:
        base = s.start if s.dim == 0 else 0
        out = sl[base + c.r0 : base + c.r1]
    return out


@torch.inference_mode()
def load_weights(model: torch.nn.Module, model_dir: str, cfg: ModelConfig, rank: int, tp: int) -> LoadReport:
    """Fill `model`'s local parameters with this rank's slices; returns byte accounting."""
    t0 = time.monotonic()
    plan = shard_plan(cfg, rank, tp)
    where = checkpoint_files(model_dir)
    headers = _validate(cfg, plan, where)
    params = dict(model.named_parameters())
    report = LoadReport(files=sorted(headers))
    report.bytes_total = sum(_DTYPES[dt] * _numel(shape) for h in headers.values() for dt, shape in h.tensors.values())

    # file -> row chunks, so each file is processed in one pass of short-lived mappings.
    work: dict[str, list[_Chunk]] = defaultdict(list)
    for pp in plan:
        dest = params[pp.param]
        row = 0
        for s in pp.slices:
            path = where[s.name]
            elem = _DTYPES[headers[path].tensors[s.name][0]]
            work[path].extend(_chunks(s, dest, row, elem))
            row += s.local_shape[0]
        for _, _, padding in weight_rows(dest, row, logical_rows(dest)):
            padding.zero_()  # vocab padding rows produce logit 0 and are sliced away
    for i, path in enumerate(sorted(work), 1):
        tf = time.monotonic()
        nbytes_file = 0
        items = work[path]
        j = 0
        while j < len(items):
            touched = 0
            try:
                # Reopen after _WINDOW_BYTES: closing unmaps the file, so the pages this rank
                # touched leave its RSS instead of accumulating up to the file size.
                with safe_open(path, framework="pt", device="cpu") as f:
                    while j < len(items) and touched < _WINDOW_BYTES:
                        c = items[j]
                        t = _read_chunk(f, c)
                        n = t.numel() * t.element_size()
                        pieces = weight_rows(c.dest, c.dest_row, c.dest_row + (c.r1 - c.r0))
                        expected = [c.r1 - c.r0, *pieces[0][2].shape[1:]]
                        if list(t.shape) != expected:
                            raise CheckpointError(
                                f"{path}: tensor {c.slice.name} slice has shape {list(t.shape)}, expected {expected}"
                            )
                        for a, b, dst in pieces:
                            dst.copy_(t[a - c.dest_row : b - c.dest_row])
                        del t
                        touched += c.touched
                        nbytes_file += n
                        report.bytes_read += n
                        report.tensors_read += c.r0 == 0
                        j += 1
            except CheckpointError:
                raise
            except Exception as e:  # safetensors errors on data we could not pre-validate
                name = items[j].slice.name if j < len(items) else "?"
                raise CheckpointError(f"{path}: failed reading tensor {name}: {e}") from e
        log.info(
            "rank %d: loaded %d/%d %s: %.1f MiB in %.2fs",
            rank,
            i,
            len(work),
            os.path.basename(path),
            nbytes_file / 2**20,
            time.monotonic() - tf,
        )
    report.seconds = time.monotonic() - t0
    log.info(
        "rank %d/%d: weights loaded: read %.1f of %.1f MiB in %.2fs",
        rank,
        tp,
        report.bytes_read / 2**20,
        report.bytes_total / 2**20,
        report.seconds,
    )
    return report


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
