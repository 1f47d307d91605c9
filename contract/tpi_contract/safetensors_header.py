"""Reading a safetensors file's header: 8-byte little-endian length, then that many bytes of JSON.

Only the header is read, never the tensors, and it is checked against the file's size first, so a
truncated or corrupt file fails with a message naming the file instead of a huge read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

#: Longest header believed (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100 << 20
METADATA_KEY = "__metadata__"
#: Bytes per element of each safetensors dtype.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
#: Floating-point dtypes a runtime casts to its served dtype (8-bit floats are kept as stored).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


class HeaderError(ValueError):
    """The file's header is corrupt or the file is too short; the message names the file."""


@dataclass(frozen=True)
class Header:
    """One file's header."""

    #: tensor name -> {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]} (unchecked)
    tensors: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: bytes of tensor data the file holds after the header
    data_bytes: int = 0


def read_header(path: str | os.PathLike[str]) -> Header:
    """The header of one .safetensors file. Raises FileNotFoundError/OSError when the file cannot be
    read, HeaderError when its header is corrupt or does not fit in the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise HeaderError(f"{path}: corrupt safetensors header: file is only {size} bytes")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HeaderError(
                f"{path}: corrupt safetensors header: header length {n} does not fit in a {size}-byte file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop(METADATA_KEY, None)
    return Header(header, metadata if isinstance(metadata, dict) else {}, size - 8 - n)
