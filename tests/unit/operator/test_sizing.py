"""Sizing: valid TP sizes (tpi_contract.tp_rule), 'auto', checkpoint headers."""

from __future__ import annotations

import json
import struct

import pytest
from op_builders import make_spec
from tpi_operator import checkpoint
from tpi_operator.core import sizing
from tpi_operator.core.sizing import ModelInfo, SizingError

LLAMA_8B = ModelInfo(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (LLAMA_8B, [1, 2, 4, 8, 16, 32]),
        (
            ModelInfo(num_attention_heads=12, num_key_value_heads=12, intermediate_size=3072),
            [1, 2, 3, 4, 6, 12],
        ),
        (ModelInfo(num_attention_heads=6, num_key_value_heads=2, intermediate_size=64), [1, 2]),
        (ModelInfo(), [1, 2, 4, 8, 16, 32, 64, 128, 256]),
    ],
)
def test_valid_sizes(info, expected):
    assert sizing.valid_tp_sizes(info) == expected


@pytest.mark.parametrize(
    ("overrides", "info", "expected"),
    [
        ({"tensorParallelSize": 4}, LLAMA_8B, 4),
        # 16 GB of weights, 10 Gi GPUs: 0.8*10Gi=8.6 GB per rank -> 2 ranks
        ({"tensorParallelSize": "auto", "resources": {"gpus": 1, "gpuMemory": "10Gi"}},
         ModelInfo(32, 8, 14336, weight_bytes=16 * 10**9), 2),
        ({"tensorParallelSize": "auto", "resources": {"memory": "64Gi"}},
         ModelInfo(weight_bytes=16 * 10**9), 1),
    ],
)  # fmt: skip
def test_desired_tp(overrides, info, expected):
    assert sizing.desired_tp(make_spec(**overrides), info) == expected


@pytest.mark.parametrize(
    ("overrides", "info", "reason"),
    [
        ({"tensorParallelSize": 3}, LLAMA_8B, "InvalidTensorParallelSize"),
        ({"tensorParallelSize": "auto", "resources": {"memory": "1Gi"}}, LLAMA_8B, "SizingUnavailable"),
        ({"tensorParallelSize": "auto", "resources": {"gpus": 1}},
         ModelInfo(weight_bytes=10), "SizingUnavailable"),
        ({"tensorParallelSize": "auto", "resources": {"memory": "1Gi"}},
         ModelInfo(6, 2, 64, weight_bytes=10 * 2**30), "ModelTooLarge"),
    ],
)  # fmt: skip
def test_sizing_errors(overrides, info, reason):
    with pytest.raises(SizingError) as err:
        sizing.desired_tp(make_spec(**overrides), info)
    assert err.value.reason == reason and str(err.value)


def test_next_smaller():
    assert sizing.next_smaller([1, 2, 4, 8], 8, 2) == 4
    assert sizing.next_smaller([1, 2, 4, 8], 2, 2) is None
    assert sizing.next_smaller([1, 2, 3, 4, 6], 6, 1, at_most=3) == 3


def _write_safetensors(path, tensors):
    header = {name: {"dtype": dt, "shape": shape, "data_offsets": [0, 0]} for name, (dt, shape) in tensors.items()}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


def test_read_model_info_from_headers_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2,
                                                      "intermediate_size": 96}))  # fmt: skip
    _write_safetensors(tmp_path / "a.safetensors", {"w": ("F32", [10, 10]), "ids": ("I64", [4])})
    _write_safetensors(tmp_path / "b.safetensors", {"v": ("BF16", [5])})
    info = checkpoint.read_model_info(tmp_path, "bfloat16")
    assert (info.num_attention_heads, info.num_key_value_heads, info.intermediate_size) == (8, 2, 96)
    assert info.weight_bytes == 100 * 2 + 4 * 8 + 5 * 2  # floats at the served dtype, ints as stored
    assert checkpoint.read_model_info(tmp_path / "missing", "bfloat16") == ModelInfo()


def test_parse_quantity():
    assert sizing.parse_quantity("32Gi") == 32 * 2**30
    assert sizing.parse_quantity("500m") == 0.5
    assert sizing.parse_quantity("1e3") == 1000
    assert sizing.parse_quantity("2") == 2


def test_read_model_info_from_a_gguf_header(tmp_path):
    from tests.unit.contract.test_gguf_header import write_file

    write_file(tmp_path / "model.gguf")  # a directory holding one GGUF file and no config.json
    info = checkpoint.read_model_info(tmp_path, "float32")
    assert (info.num_attention_heads, info.num_key_value_heads) == (9, 3)
    assert info.weight_bytes == (6 * 64 + 4 * 64 + 3 * 32) * 4  # dequantized to the served dtype
    as_bf16 = checkpoint.read_model_info(tmp_path / "model.gguf", "bfloat16")  # the file itself
    assert as_bf16.weight_bytes == (6 * 64 + 4 * 64 + 3 * 32) * 2
    (tmp_path / "model.gguf").write_bytes(b"GGUF broken")
    assert checkpoint.read_model_info(tmp_path, "float32") == ModelInfo()
