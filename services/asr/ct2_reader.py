"""Read a CTranslate2 `model.bin` (binary version 6) into numpy arrays.

Layout, little-endian: u32 version; string spec name; u32 spec revision; u32 variable
count; per variable a string name, u8 rank, u32 dims, u8 dtype, u32 byte count and the raw
data; then u32 alias count and (alias, target) string pairs. A string is a u16 length that
counts its trailing NUL, then the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_VERSION = 6

_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_BFLOAT16 = 5


@dataclass(frozen=True)
class CT2Model:
    """The variables of one model; aliases point at the same array as their target."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]

    def scalar(self, name: str) -> int:
        return int(self.variables[name].reshape(()))


class _Cursor:
    def __init__(self, data: bytes, source: Path) -> None:
        self.data = data
        self.offset = 0
        self.source = source

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return int(value)

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.source}: truncated at byte {self.offset}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        if not raw.endswith(b"\0"):
            raise ValueError(f"{self.source}: string without NUL at byte {self.offset}")
        return raw[:-1].decode("utf-8")


def read_ct2(path: Path) -> CT2Model:
    """Parse `path`; fp16 stays fp16 (the converter decides when to widen)."""
    cursor = _Cursor(path.read_bytes(), path)
    version = cursor.unpack("I")
    if version != SUPPORTED_VERSION:
        raise ValueError(f"{path}: binary version {version}, expected {SUPPORTED_VERSION}")
    spec = cursor.string()
    revision = cursor.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cursor.unpack("I")):
        name = cursor.string()
        shape = tuple(cursor.unpack("I") for _ in range(cursor.unpack("B")))
        dtype_code = cursor.unpack("B")
        raw = cursor.take(cursor.unpack("I"))
        variables[name] = _to_array(raw, dtype_code, shape, f"{path}: {name}")
    for _ in range(cursor.unpack("I")):
        alias, target = cursor.string(), cursor.string()
        variables[alias] = variables[target]
    if cursor.offset != len(cursor.data):
        raise ValueError(f"{path}: {len(cursor.data) - cursor.offset} trailing bytes")
    return CT2Model(spec, revision, variables)


def _to_array(raw: bytes, dtype_code: int, shape: tuple[int, ...], where: str) -> np.ndarray:
    if dtype_code == _BFLOAT16:
        # numpy has no bfloat16: its bits are the high half of a float32.
        widened = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        array = widened.view(np.float32)
    elif dtype_code in _DTYPES:
        array = np.frombuffer(raw, _DTYPES[dtype_code])
    else:
        raise ValueError(f"{where}: unknown dtype code {dtype_code}")
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{where}: {array.size} values for shape {shape}")
    return array.reshape(shape)
