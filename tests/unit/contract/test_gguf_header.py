"""tpi_contract.gguf_header against the `gguf` package's own writer and reader."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from tpi_contract import gguf_header


def write_file(path: Path) -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.normal(size=(6, 64)).astype(np.float32))
    w.add_tensor("b.weight", quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0),
                 raw_dtype=GGMLQuantizationType.Q8_0)  # fmt: skip
    w.add_tensor("c.weight", rng.normal(size=(3, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_matches_the_gguf_package(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.gguf")
    h = gguf_header.read_header(path, max_array=10)
    assert h.metadata["llama.attention.head_count"] == 9
    assert h.metadata["llama.attention.head_count_kv"] == 3
    assert h.metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert h.metadata["tokenizer.ggml.tokens"] == {"array_len": 100}  # long arrays summarised
    assert gguf_header.read_header(path).metadata["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    ref = GGUFReader(str(path))
    assert sorted(h.tensors) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        info = h.tensors[t.name]
        assert info.type_name == t.tensor_type.name
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert (h.data_start + info.offset, info.nbytes) == (t.data_offset, t.n_bytes)


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(gguf_header.HeaderError, match=r"m\.gguf: file is truncated: tensor c\.weight"):
        gguf_header.read_header(path)
    path.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(gguf_header.HeaderError, match=r"m\.gguf: corrupt GGUF header: .* past the end"):
        gguf_header.read_header(path)


def test_not_gguf_and_corrupt_counts(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(gguf_header.HeaderError, match=r"x\.gguf: not a GGUF file"):
        gguf_header.read_header(bad)
    # An array claiming 2**40 items in a tiny file: refused before any allocation.
    key = b"k"
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    bad.write_bytes(raw + struct.pack("<IIQ", 9, 4, 1 << 40))
    with pytest.raises(gguf_header.HeaderError, match="claims"):
        gguf_header.read_header(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    with pytest.raises(gguf_header.HeaderError, match="version 7"):
        gguf_header.read_header(bad)
