"""Reading a checkpoint the operator can see (shell: file I/O), for ``core.sizing``.

Only ``config.json`` and the safetensors *headers* are read (``tpi_contract.safetensors_header``):
weights are never loaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tpi_contract.safetensors_header import read_header

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec
from tpi_operator.core.sizing import ModelInfo, weight_bytes_from_headers


def read_model_info(directory: Path, served_dtype: str) -> ModelInfo:
    """config.json head counts and safetensors sizes of a checkpoint directory; unknown if unreadable."""
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
