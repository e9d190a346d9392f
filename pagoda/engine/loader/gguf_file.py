"""A GGUF file's metadata and tensor index, read in one pass with `struct`.

gguf-py's `GGUFReader` builds a numpy view for every part of every field: on the demo model
(49,152 tokens, 48,900 merges) that is ~1M numpy objects and 5 s per read, paid by every service
that loads the tokenizer. This reader decodes the same values straight from the mapped bytes
(~0.1 s) and exposes tensors as numpy views over the file, as `GGUFReader` does, so
`gguf.quants.dequantize` takes them unchanged. Little-endian GGUF v2/v3 only (what llama.cpp
writes); anything else is a clear error.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUFValueType -> (struct format, size) for the fixed-size scalars
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {t: fmt for t, (fmt, _) in _SCALARS.items()}  # numpy reads the same format codes
_STRING, _ARRAY = 8, 9
# types whose tensor data is read as elements; every other type is read as raw bytes (uint8)
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    data: np.ndarray  # elements for float/int types, raw bytes [rows, bytes per row] otherwise


class GgufFile:
    """`fields`: metadata key -> value (str, int, float, bool, or a list of them);
    `tensors`: the tensor index in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._buf[:4] != _MAGIC:
            raise ValueError(f"{self.path.name} is not a GGUF file (no GGUF magic)")
        try:
            self._read()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as e:
            raise ValueError(f"{self.path.name} is truncated or corrupt: {e}") from e

    def _read(self) -> None:
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ValueError(
                f"{self.path.name}: GGUF version {version} is not supported (little-endian v2/v3 only)"
            )
        self._pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            (vtype,) = self._unpack("<I", 4)
            self.fields[key] = self._value(vtype)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        start = -(-self._pos // align) * align
        raw = np.frombuffer(self._buf, dtype=np.uint8)
        self.tensors = [self._tensor(raw, start, *info) for info in infos]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    # -- decoding --------------------------------------------------------------------------------

    def _unpack(self, fmt: str, size: int) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return values

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._pos)
        start = self._pos + 8
        self._pos = start + n
        return self._buf[start : start + n].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(*_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path.name}: unknown GGUF value type {vtype} at byte {self._pos}")
        item_type, count = self._unpack("<IQ", 12)
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos += count * dtype.itemsize
            return values.tolist()
        return [self._value(item_type) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I", 4)
        dims = self._unpack(f"<{n_dims}Q", 8 * n_dims)
        raw_type, offset = self._unpack("<IQ", 12)
        return name, tuple(int(d) for d in dims), int(raw_type), int(offset)

    def _tensor(
        self, raw: np.ndarray, start: int, name: str, dims: tuple[int, ...], raw_type: int, offset: int
    ) -> GgufTensor:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError as e:
            raise ValueError(f"{self.path.name}: tensor {name} has unknown GGML type {raw_type}") from e
        n_elems = int(np.prod(dims)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[qtype]
        begin = start + offset
        n_bytes = n_elems * type_size // block
        if begin + n_bytes > len(self._buf):
            raise ValueError(f"{self.path.name} is truncated: tensor {name} runs past the end of the file")
        np_dims = tuple(reversed(dims))
        if qtype in _ELEMENT_DTYPES:
            dtype = np.dtype(_ELEMENT_DTYPES[qtype])
            data = np.frombuffer(self._buf, dtype=dtype, count=n_elems, offset=begin).reshape(np_dims)
        else:
            row_bytes = np_dims[-1] * type_size // block
            data = raw[begin : begin + n_bytes].reshape(*np_dims[:-1], row_bytes)
        return GgufTensor(name, qtype, dims, data)
