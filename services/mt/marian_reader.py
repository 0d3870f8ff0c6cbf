"""Read a Marian binary model (`.bin`) into float32 numpy arrays and its embedded config.

Layout (little-endian): u64 version, u64 item count; per item four u64 (name length with
NUL, type, shape rank, data bytes); then all names; then all shapes (i32 each); u64 pad
length and the padding; then the data of each item in order. Data lengths include
alignment padding, so only the first `prod(shape)` values of an item are meaningful.

Bergamot students store their matrices as intgemm int8: `size` int8 values followed by
one float32 multiplier, float = int8 / multiplier. They are written transposed (out x in)
and come back here as (in x out) like Marian's float matrices, except the shared
embedding `Wemb`, a lookup table (vocab x dim) stored untransposed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

_TYPE_FLOAT32 = 0x404
_TYPE_INTGEMM8 = 0x4101
_CONFIG_NAME = "special:model.yml"
_ACTIVATION_SUFFIX = "_QuantMultA"
_UNTRANSPOSED = frozenset({"Wemb"})


@dataclass(frozen=True)
class MarianModel:
    """Parameters by Marian name (float32, matrices as in x out) and the training config.

    For an int8 model, `weight_multipliers[name]` is the matrix's intgemm multiplier
    (int8 = round(float * multiplier)) and `activation_multipliers[name]` the fixed one
    Marian uses to quantise that matrix's input (the `<name>_QuantMultA` items).
    """

    params: dict[str, np.ndarray]
    config: dict[str, Any]
    weight_multipliers: dict[str, float] = field(default_factory=dict)
    activation_multipliers: dict[str, float] = field(default_factory=dict)


def read_marian(path: Path) -> MarianModel:
    data = Path(path).read_bytes()
    version, count = struct.unpack_from("<QQ", data, 0)
    if version != 1:
        raise ValueError(f"{path}: unsupported Marian binary version {version}")
    offset = 16
    headers = [struct.unpack_from("<4Q", data, offset + 32 * i) for i in range(count)]
    offset += 32 * count

    names: list[str] = []
    for name_len, _, _, _ in headers:
        names.append(data[offset : offset + name_len - 1].decode())
        offset += name_len
    shapes: list[tuple[int, ...]] = []
    for _, _, rank, _ in headers:
        shapes.append(struct.unpack_from(f"<{rank}i", data, offset))
        offset += 4 * rank
    (pad,) = struct.unpack_from("<Q", data, offset)
    offset += 8 + pad

    params: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {}
    weight_multipliers: dict[str, float] = {}
    for name, (_, kind, _, nbytes), shape in zip(names, headers, shapes, strict=True):
        start, offset = offset, offset + nbytes
        size = int(np.prod(shape))
        if name == _CONFIG_NAME:
            config = yaml.safe_load(data[start : start + size].rstrip(b"\0").decode())
        elif kind == _TYPE_FLOAT32:
            params[name] = np.frombuffer(data, "<f4", size, start).reshape(shape)
        elif kind == _TYPE_INTGEMM8:
            (multiplier,) = struct.unpack_from("<f", data, start + size)
            values = np.frombuffer(data, np.int8, size, start).astype(np.float32)
            matrix = values / np.float32(multiplier)
            if name not in _UNTRANSPOSED and len(shape) == 2:
                matrix = matrix.reshape(shape[1], shape[0]).T
            params[name] = matrix.reshape(shape)
            weight_multipliers[name] = multiplier
        else:
            raise ValueError(f"{path}: item {name!r} has unsupported type {kind:#x}")
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} trailing bytes; layout not understood")

    # `<name>_QuantMultA` items are scalars; one of them (Wemb's) is itself stored as int8.
    activation_multipliers = {
        name.removesuffix(_ACTIVATION_SUFFIX): float(params.pop(name).reshape(-1)[0])
        for name in list(params)
        if name.endswith(_ACTIVATION_SUFFIX)
    }
    for name in activation_multipliers:
        weight_multipliers.pop(f"{name}{_ACTIVATION_SUFFIX}", None)
    # Copy: frombuffer views are read-only and transposed views are not C-contiguous.
    owned = {name: np.array(value, dtype=np.float32, order="C") for name, value in params.items()}
    return MarianModel(owned, config, weight_multipliers, activation_multipliers)
