"""Checkpoint loading: every broken-checkpoint case fails with a CheckpointError naming the file and
the tensor, and each rank reads only its own slices."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tpi_runtime.config import ModelConfig
from tpi_runtime.dist import Dist, DistEnv
from tpi_runtime.loader import CheckpointError, load_weights
from tpi_runtime.model import Transformer
from tpi_runtime.testing import make_tiny_checkpoint

from .conftest import assert_all_ok, run_ranks, worker_argv

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _load(model_dir: str | Path) -> None:
    cfg = ModelConfig.from_pretrained(str(model_dir))
    dist = Dist(DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0))
    model = Transformer(cfg, dist, dtype=torch.float32, device=torch.device("cpu"))
    load_weights(model, str(model_dir), cfg, 0, 1)


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, idx: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def _file_of(d: Path, tensor: str) -> Path:
    return d / _index(d)["weight_map"][tensor]


def test_good_checkpoint_loads(ckpt_main: str, ckpt_tied: str) -> None:
    _load(ckpt_main)
    _load(ckpt_tied)


def test_missing_file(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert str(shard) in msg and "missing" in msg
    held = [n for n, f in _index(d)["weight_map"].items() if f == shard.name]
    assert any(f"tensor {n} " in msg for n in held)  # names a tensor that file should hold


def test_missing_tensor_listed_in_index(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    tensors = load_file(str(shard))
    del tensors[Q0]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor") as e:
        _load(d)
    assert str(shard) in str(e.value) and Q0 in str(e.value)


def test_missing_tensor_absent_from_index(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, "lm_head.weight")
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    idx = _index(d)
    del idx["weight_map"]["lm_head.weight"]
    _write_index(d, idx)
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head\.weight") as e:
        _load(d)
    assert "model.safetensors.index.json" in str(e.value)


def test_unexpected_tensor(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    tensors = load_file(str(shard))
    tensors["model.layers.0.self_attn.q_bias"] = torch.zeros(4)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_bias") as e:
        _load(d)
    assert str(shard) in str(e.value)


def test_shape_mismatch(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    tensors = load_file(str(shard))
    tensors[Q0] = torch.zeros(65, 64)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        _load(d)
    assert str(shard) in str(e.value) and Q0 in str(e.value) and "[65, 64]" in str(e.value)


def test_truncated_file(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated") as e:
        _load(d)
    msg = str(e.value)
    # The tensor stored last in the file is the one cut off.
    tensors = load_file(str(_copy(ckpt_main, tmp_path / "orig") / shard.name))
    assert str(shard) in msg
    assert any(f"tensor {name} " in msg for name in tensors)


def test_corrupt_header(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        _load(d)
    assert str(shard) in str(e.value)


def test_header_length_garbage(ckpt_main: str, tmp_path: Path) -> None:
    d = _copy(ckpt_main, tmp_path / "c")
    shard = _file_of(d, Q0)
    with open(shard, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        _load(d)
    assert str(shard) in str(e.value)


def test_pickle_checkpoints_are_refused(ckpt_main: str, tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(os.path.join(ckpt_main, "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused") as e:
        _load(d)
    assert str(d) in str(e.value)


def test_bfloat16_checkpoint_into_float32(tmp_path: Path) -> None:
    d = make_tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16", tokenizer=False)
    _load(d)


def _expected_slice_bytes(cfg: ModelConfig, rank: int, tp: int) -> int:
    """Independent arithmetic (not the loader's plan) of what rank `rank` must read, float32."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    kv_local = max(1, cfg.num_key_value_heads // tp)  # replicated: one KV head per rank
    per_layer = (
        (cfg.num_attention_heads // tp) * d * h  # q rows
        + 2 * kv_local * d * h  # k, v rows
        + h * (cfg.num_attention_heads // tp) * d  # o_proj columns
        + 3 * (inter // tp) * h  # gate, up rows + down columns
        + 2 * h  # the two norms (replicated)
    )
    per = -(-cfg.vocab_size // tp)
    vocab_rows = max(0, min(per, cfg.vocab_size - rank * per))
    heads = 1 if cfg.tie_word_embeddings else 2
    return 4 * (cfg.num_hidden_layers * per_layer + heads * vocab_rows * h + h)


def test_each_rank_reads_only_its_slices(tmp_path: Path) -> None:
    # A big vocabulary dominates the file (2 x 32 MiB float32), so a rank that materialised full
    # tensors would show it clearly in its peak RSS.
    d = make_tiny_checkpoint(tmp_path / "big", vocab_size=131072, max_shard_size="20MB", tokenizer=False)
    cfg = ModelConfig.from_pretrained(d)
    results = run_ranks(4, worker_argv("load", d))
    assert_all_ok(results)
    total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    for r in results:
        out = r.json()
        assert out["bytes_read"] == _expected_slice_bytes(cfg, out["rank"], 4)
        assert out["bytes_read"] < 0.3 * out["bytes_total"] and out["bytes_total"] <= total
        # Peak RSS growth during load: the rank's own parameters plus at most one window of
        # mapped pages; far below the 64 MiB the full embedding + head would need.
        grown_mib = (out["peak_rss_kib"] - out["rss_before_kib"]) / 1024
        params_mib = out["param_bytes"] / 2**20
        assert grown_mib < params_mib + 24, (
            f"rank {out['rank']}: RSS grew {grown_mib:.1f} MiB for {params_mib:.1f} MiB of parameters: {out}"
        )
