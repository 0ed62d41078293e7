"""Weights on disk: the safetensors header reader (docs/autotune.md#memory-estimate) — exact tensor bytes, and
files cut short after download caught from their headers in a few small reads, without loading anything. Used by
`serve` (preflight refuses a truncated file, naming it) and autotune (memory estimate, pre-warm integrity).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from macprovider.core.hardware import MIB

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * MIB


class SafetensorsError(ValueError):
    """A safetensors file whose header is truncated or malformed (an integrity failure)."""


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header: 8-byte little-endian header length N, then N bytes of JSON.

    Returns (header dict, total tensor bytes). Checks the header against the file length: N fits in the
    file, every tensor has a known dtype, `data_offsets` lie inside the data region and match
    dtype size × prod(shape). Raises SafetensorsError otherwise (the message names the file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path.name}: truncated safetensors file ({size} bytes, no header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise SafetensorsError(f"{path.name}: safetensors header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise SafetensorsError(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: safetensors header is not a JSON object")
    data_len = size - 8 - length
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
            expected = SAFETENSORS_DTYPE_BYTES[dtype] * count
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path.name}: malformed safetensors entry {name!r}") from None
        if not (0 <= begin <= end) or end - begin != expected:
            raise SafetensorsError(f"{path.name}: tensor {name!r} offsets do not match its dtype and shape")
        if end > data_len:
            raise SafetensorsError(
                f"{path.name}: truncated safetensors file (tensor {name!r} ends at {end}, data has {data_len} bytes)"
            )
        total += end - begin
    return header, total


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards if there is an index, else `*.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            return [model_dir / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, AttributeError):
            pass
    return sorted(model_dir.glob("*.safetensors"))
