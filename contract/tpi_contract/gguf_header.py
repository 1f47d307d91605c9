"""Reading a GGUF file's header (llama.cpp's format): metadata key/values and tensor infos.

Standard library only (the operator image has no `gguf` or numpy). Only the header is read, never
tensor data; every length is checked against the file's size before it is trusted, and every
tensor's data is checked to lie inside the file, so a truncated or corrupt file fails with a
message naming the file (and the tensor) instead of a huge allocation or a crash later.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: ggml type id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}  # fmt: skip
# Metadata value types: id -> struct format (8: string, 9: array are read separately).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class HeaderError(ValueError):
    """The file is not GGUF, its header is corrupt, or the file is too short; names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]  # the Hugging Face order: outermost first (GGUF lists innermost first)
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    #: key -> value; arrays longer than `max_array` are summarised as {"array_len": n}
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0


class _Reader:
    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise HeaderError(
                f"{self.path}: corrupt GGUF header: {what} runs past the end of the {self.size}-byte file"
            )
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        return self.read(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, max_array: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype, n = self.unpack("<I", what), self.unpack("<Q", what)
            if n > self.size:  # every item takes at least one byte
                raise HeaderError(f"{self.path}: corrupt GGUF header: {what} claims {n} items")
            if itype in _SCALARS and n > max_array:  # skip without decoding
                self.read(n * struct.calcsize(_SCALARS[itype]), what)
                return {"array_len": n}
            items = [self.value(itype, what, max_array) for _ in range(n)]
            return {"array_len": n} if n > max_array else items
        raise HeaderError(f"{self.path}: corrupt GGUF header: {what} has unknown value type {vtype}")


def read_header(path: str | os.PathLike[str], *, max_array: int = 1 << 20) -> Header:
    """The metadata and tensor infos of one GGUF file (FileNotFoundError/OSError when it cannot be
    read; HeaderError when it is not GGUF, is corrupt, or does not hold its tensors' data)."""
    p = os.fspath(path)
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        r = _Reader(f, p, size)
        if size < 4 or f.read(4) != MAGIC:
            raise HeaderError(f"{p}: not a GGUF file (no GGUF magic)")
        version = r.unpack("<I", "version")
        if version not in (2, 3):
            raise HeaderError(f"{p}: unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = r.unpack("<Q", "tensor count"), r.unpack("<Q", "metadata count")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string("metadata key")
            metadata[key] = r.value(r.unpack("<I", f"metadata {key}"), f"metadata {key}", max_array)
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = r.string("tensor name")
            n_dims = r.unpack("<I", f"tensor {name}")
            if n_dims > 8:
                raise HeaderError(f"{p}: corrupt GGUF header: tensor {name} has {n_dims} dimensions")
            dims = tuple(r.unpack("<Q", f"tensor {name}") for _ in range(n_dims))
            infos.append((name, dims, r.unpack("<I", f"tensor {name}"), r.unpack("<Q", f"tensor {name}")))
        align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align < 1:
            raise HeaderError(f"{p}: corrupt GGUF header: general.alignment {align!r}")
        data_start = -(-f.tell() // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            raise HeaderError(f"{p}: tensor {name} has unknown ggml type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        numel = 1
        for d in dims:
            numel *= d
        if dims and dims[0] % block:
            raise HeaderError(f"{p}: tensor {name}: row length {dims[0]} is not a multiple of {type_name}'s {block}")
        nbytes = numel // block * block_bytes
        if data_start + offset + nbytes > size:
            raise HeaderError(
                f"{p}: file is truncated: tensor {name} needs bytes up to {data_start + offset + nbytes} "
                f"but the file holds only {size}"
            )
        tensors[name] = TensorInfo(name, type_name, tuple(reversed(dims)), offset, nbytes)
    return Header(metadata, tensors, data_start)
