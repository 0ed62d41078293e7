"""Memory pre-check: will this candidate fit before we spend a load on it? (SPEC.md §5.6)

estimate = weights + KV cache + fixed overhead, where
  weights  = exact bytes from the safetensors headers (sum of every tensor's `data_offsets` span), or the
             index's `metadata.total_size` when the headers cannot be read;
  KV cache = 2 (K and V) × layers × kv_heads × head_dim × bytes per element × tokens,
             bytes per element: 8-bit ≈ 1.0625 (8 bits + a float16 scale and bias per group of 64 →
             8 + 32/64 bits = 8.5 bits), 4-bit ≈ 0.5625 (4.5 bits), full precision = the model dtype size;
             tokens = max_context × max_batch (every sequence of a full batch at the cap);
  overhead = OVERHEAD_BYTES for activations, scratch buffers and the runtime.
budget = `--memory-budget-gb`, else `hardware.memory_budget_bytes` (Metal's recommended working set where
MLX reports it, else physical RAM minus a reserve). Reading headers is a few small reads, so a hopeless
candidate is rejected in milliseconds without loading anything.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2
# Activations, temporary buffers and the MLX runtime beside weights and KV (a deliberately round figure:
# the measured peak recorded per trial is there to check it).
OVERHEAD_BYTES = 256 * MIB
KV_BYTES_PER_ELEMENT = {8: 1.0625, 4: 0.5625}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Safetensors dtype names → bytes per element (safetensors format spec).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
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


def weights_bytes(model_dir: Path) -> int:
    """Exact weight bytes from the safetensors headers; the index `total_size` if a shard is unreadable.

    Raises SafetensorsError / OSError when neither is available.
    """
    model_dir = Path(model_dir)
    try:
        files = weight_files(model_dir)
        if not files:
            raise SafetensorsError("no safetensors weights")
        return sum(read_safetensors_header(f)[1] for f in files)
    except (OSError, SafetensorsError):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
            if isinstance(total, int) and total > 0:
                return total
        raise


@dataclass(frozen=True)
class KvShape:
    """KV-relevant shape of a model: layers, KV heads, head dimension, activation dtype bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "KvShape":
        """From config.json (top level or `text_config`). ValueError when a field is missing."""
        scope = config.get("text_config") if "num_hidden_layers" not in config and config.get("text_config") else config
        layers = int(scope["num_hidden_layers"])
        heads = int(scope["num_attention_heads"])
        kv_heads = int(scope.get("num_key_value_heads") or heads)
        head_dim = int(scope.get("head_dim") or int(scope["hidden_size"]) // heads)
        dtype = str(scope.get("torch_dtype") or config.get("torch_dtype") or "float16")
        return cls(layers, kv_heads, head_dim, DTYPE_BYTES.get(dtype, 2))


def kv_bytes(shape: KvShape, tokens: int, kv_bits: int | None) -> int:
    """2 × layers × kv_heads × head_dim × bytes per element × tokens (see module docstring)."""
    per_element = KV_BYTES_PER_ELEMENT[kv_bits] if kv_bits is not None else shape.dtype_bytes
    return int(2 * shape.layers * shape.kv_heads * shape.head_dim * per_element * tokens)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: weights, kv, overhead and their total, against `budget`."""

    weights: int
    kv: int
    overhead: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def note(self) -> str:
        """`memory estimate …` note for an infeasible trial."""
        return (
            f"memory estimate {self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f} + KV {self.kv / GIB:.2f}"
            f" + overhead {self.overhead / GIB:.2f}) exceeds budget {self.budget / GIB:.2f} GiB"
        )


def estimate(
    model_dir: Path, config: dict[str, Any], *, max_context: int, max_batch: int, kv_bits: int | None, budget: int
) -> MemoryEstimate:
    """Estimate the memory of serving the model with these knobs. Raises SafetensorsError/OSError/ValueError."""
    shape = KvShape.from_config(config)
    return MemoryEstimate(
        weights_bytes(model_dir), kv_bytes(shape, max_context * max_batch, kv_bits), OVERHEAD_BYTES, budget
    )


def default_budget_bytes() -> int:
    """Metal's recommended working set where MLX reports it, else physical RAM minus a reserve.

    Imports MLX in-process only to query the device (called lazily, once per run).
    """
    from macprovider import hardware

    return hardware.memory_budget_bytes(hardware.mlx_recommended_working_set_bytes())
