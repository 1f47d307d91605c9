"""Reading a checkpoint the operator can see (shell: file I/O), for ``core.sizing``.

Only ``config.json`` and the safetensors *headers* are read (``tpi_contract.safetensors_header``),
or, for a directory holding one GGUF file and no config.json, the GGUF header
(``tpi_contract.gguf_header``): weights are never loaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tpi_contract import gguf_header
from tpi_contract.safetensors_header import read_header

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec
from tpi_operator.core.sizing import ModelInfo, weight_bytes_from_headers

#: Bytes per element of the dtypes a GGUF file is dequantized to.
_SERVED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def read_gguf_info(path: Path, served_dtype: str) -> ModelInfo:
    """Head counts and dequantized size from a GGUF header; unknown if unreadable."""
    try:
        header = gguf_header.read_header(path, max_array=0)
    except (OSError, ValueError, struct.error):
        return ModelInfo()
    arch = header.metadata.get("general.architecture")
    heads = header.metadata.get(f"{arch}.attention.head_count")
    kv = header.metadata.get(f"{arch}.attention.head_count_kv", heads)
    inter = header.metadata.get(f"{arch}.feed_forward_length")
    size = sum(t.numel for t in header.tensors.values()) * _SERVED_BYTES.get(served_dtype, 4)
    return ModelInfo(heads, kv, inter, size, origin="checkpoint")


def read_model_info(directory: Path, served_dtype: str) -> ModelInfo:
    """config.json head counts and safetensors sizes of a checkpoint directory (or the header of its
    one GGUF file, or of a GGUF file itself); unknown if unreadable."""
    if directory.suffix == ".gguf":
        return read_gguf_info(directory, served_dtype)
    try:
        ggufs = [] if (directory / "config.json").exists() else sorted(directory.glob("*.gguf"))
    except OSError:
        ggufs = []
    if len(ggufs) == 1:
        return read_gguf_info(ggufs[0], served_dtype)
    heads = kv = inter = size = None
    try:
        config = json.loads((directory / "config.json").read_text())
        heads = config.get("num_attention_heads")
        kv = config.get("num_key_value_heads")
        inter = config.get("intermediate_size")
    except (OSError, ValueError):
        pass
    try:
        files = sorted(directory.glob("*.safetensors"))
        if files:
            size = weight_bytes_from_headers([read_header(p).tensors for p in files], served_dtype)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        size = None
    if heads is None and size is None:
        return ModelInfo()
    return ModelInfo(heads, kv, inter, size, origin="checkpoint")


def local_model_dir(spec: TPInferenceClusterSpec, models_root: str | None) -> Path | None:
    """Where the operator itself may read the checkpoint: a hostPath as is, a PVC's directory under
    ``models_root/<claimName>`` when the operator mounts claims there; images are never readable."""
    source = spec.model.source
    if source.host_path:
        return Path(source.host_path.path)
    if source.pvc and models_root:
        return Path(models_root) / source.pvc.claim_name / source.pvc.path.lstrip("/")
    return None
