"""GGUF files → MLX models in the Hugging Face Hub cache (`macprovider models import`, README.md#models).

`import_gguf(path, repo_id, dtype=...)` reads a llama.cpp GGUF file and installs an mlx-lm model directory
(config.json, model.safetensors, tokenizer files, generation_config.json) in the Hub cache layout, so
`serve`, `autotune` and `models list|verify|rm` treat it like a pulled model.

Reading. The `gguf` package (llama.cpp's own gguf-py) reads the metadata and the raw tensor blocks. Quantized
tensors are repacked, not dequantized (`ggml_affine_groups`, details there; docs/gguf-import.md has the table):
Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks and the 32-wide sub-blocks of Q4_K / Q5_K are MLX's affine
quantization (`w = scale · q + bias`, group size 32) with the file's own bits, bit for bit; Q6_K / Q3_K / Q2_K
(16-wide sub-blocks; MLX has no group size 16) become 8-bit groups, exact where a group allows it (every
Q3_K group) and otherwise the 8-bit grid with the least squared error. Scales and biases are float16 where every
one round-trips through float16 (the legacy types), else float32 (K-quants' d · sc products). The codes are
packed as `mx.quantize` packs them (a little-endian bit stream per row). (`mx.load`'s own GGUF reader is not
used: it refuses a whole file as soon as one tensor has a type it cannot convert, e.g. Q5_0.) Where layers
differ the config's `quantization` names the odd ones. F32 / F16 / BF16 tensors are kept (cast to the model's
float dtype). Any other GGML type (IQ*, …) is dequantized to float32 by `gguf.quants.dequantize` (llama.cpp's
reference code) and re-quantized with `mx.quantize` (affine, group size 32) to the largest MLX width not above
its bits per weight, or kept as floats with `dtype` float16 / bfloat16 / float32 (which dequantizes every
tensor).

Rotary embeddings. llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows of
each head of `attn_q` / `attn_k` of llama-family models so its interleaved ("normal", GPT-J style) RoPE
computes what Hugging Face's half-split RoPE computes. We un-permute those rows (the inverse reshape), so the
result is an ordinary Hugging Face llama and mlx-lm's default RoPE (`rope_traditional: false`) is right.
Rows are output features, and quantization groups run along input features, so un-permuting the packed
weight, scales and biases rows is exact. qwen2 / qwen3 files are not permuted (llama.cpp runs NEOX RoPE).

Llama 3.1 / 3.2 RoPE scaling. Hugging Face's `rope_scaling: {"rope_type": "llama3", factor, low_freq_factor,
high_freq_factor, original_max_position_embeddings}` is not GGUF metadata: llama.cpp's converter
(convert_hf_to_gguf.py, `LlamaModel.generate_extra_tensors`) writes it as the tensor `rope_freqs.weight`, one
float32 divisor per rotary frequency (1 for short wavelengths, `factor` for long ones, a smooth blend between),
and llama.cpp divides each frequency by it. We recover the `rope_scaling` dict mlx-lm's `Llama3RoPE` takes
(`llama3_rope_scaling`): Meta's published parameter sets first, else solved from the tensor (the blend is linear in
1 / wavelength), and keep it only if it regenerates the stored tensor within 1e-5 (relative); a tensor no llama3
parameters reproduce is refused.

Tokenizer. Rebuilt from `tokenizer.ggml.*` with `tokenizers`, through transformers' GGUF tokenizer converter
(`convert_gguf_tokenizer`: byte-level BPE for `gpt2` vocabularies, SentencePiece-style BPE for `llama`, the
split regex of `tokenizer.ggml.pre`; plus `smollm`: single digits, as llama.cpp's llama-vocab.cpp splits).
BOS / EOS / padding / unknown tokens, `add_bos_token` and the chat template come from the metadata.

Errors (`GGUFImportError`, a ModelError: one line, exit 1): not a GGUF file, a truncated file, an
architecture other than llama / qwen2 / qwen3, a tensor this importer does not know, RoPE that mlx-lm cannot
run the same way (partial rotary dimensions, a `rope_freqs` tensor that is not llama3 scaling), an id that exists.
Nothing is half-written: files are built in a temporary directory and the repo moves into the cache last.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macprovider.core.errors import ModelError

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "qwen2", "qwen3")
DTYPES = ("auto", "float16", "bfloat16", "float32")
MLX_BITS = (2, 3, 4, 5, 6, 8)  # widths mx.quantize supports in affine mode
REQUANTIZE_GROUP_SIZE = 32

# llama.cpp tensor names (gguf-py/gguf/constants.py, TENSOR_NAMES) → Hugging Face module paths.
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_FLOAT_TYPES = ("F32", "F16", "BF16")
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # gguf-py constants.py MODEL_TENSOR.ROPE_FREQS
# Meta's llama3 `rope_scaling` (config.json of Llama 3.1 and of Llama 3.2 1B / 3B); the converter reads the
# original context from the config's top level, where Llama 3.x has none, so it always uses its default 8192.
LLAMA3_ROPE_PRESETS = (
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
LLAMA3_ROPE_CONVERTER_CONTEXT = 8192
ROPE_FREQS_RTOL = 1e-5


class GGUFImportError(ModelError):
    """A GGUF file that cannot be imported; the message names the file and the reason."""


@dataclass(frozen=True)
class ImportResult:
    """What `import_gguf` installed: the id, the snapshot path, and facts for `--json` output."""

    repo_id: str
    snapshot: Path
    architecture: str
    dtype: str
    quantization: dict | None
    tensor_types: dict[str, int]
    size_bytes: int


def _scalar(value: Any) -> Any:
    """A metadata value as a Python value (mx.load returns numbers as 0-d mx.array, lists as 1-d)."""
    return value.tolist() if hasattr(value, "tolist") else value


def check_gguf_file(path: Path) -> None:
    """Raise GGUFImportError unless `path` is a readable file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise GGUFImportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFImportError(f"{path}: is a directory, expected a .gguf file") from None
    except OSError as exc:
        raise GGUFImportError(f"{path}: cannot read it ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")


def read_gguf(path: Path):
    """(metadata {key: value}, tensors {name: gguf ReaderTensor}) of a GGUF file, read with the `gguf`
    package. Raises GGUFImportError for a file that is not GGUF, truncated or corrupt."""
    from gguf import GGUFReader

    check_gguf_file(path)
    try:
        reader = GGUFReader(str(path))
        metadata = {key: field.contents() for key, field in reader.fields.items()}
    except (ValueError, IndexError, OSError) as exc:
        raise GGUFImportError(f"{path}: cannot read it as GGUF, the file is truncated or corrupt ({exc})") from None
    return metadata, {tensor.name: tensor for tensor in reader.tensors}


# GGML block layouts (ggml-common.h): bytes per block of 32 (legacy) or 256 (K-quants) weights.
_BLOCK_BYTES = {
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q8_0": 34,
    "Q2_K": 84,
    "Q3_K": 110,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
}
EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K")  # repacked bit for bit, their own bits
NEAREST_TYPES = ("Q2_K", "Q3_K", "Q6_K")  # 16-wide sub-blocks: 8 bits, exact where a group allows it
NEAREST_BITS = 8
GROUP_SIZE = 32


@dataclass(frozen=True)
class AffineGroups:
    """GGML blocks as MLX affine groups of 32: `codes` (uint8, rows × in_features, each < 2**bits), `scales`
    and `biases` (float32, rows × in_features / 32) with weight = scale · code + bias computed in float32;
    `exact` counts the groups whose every weight equals gguf-py's `dequantize` bit for bit."""

    codes: Any
    scales: Any
    biases: Any
    bits: int
    exact: int
    groups: int


def _f16(raw):
    """float16 fields (uint8 pairs, last axis 2) as float32 (…)."""
    import numpy as np

    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _k_scale_min(packed):
    """The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K block's 12 scale bytes (ggml-quants.c
    `get_scale_min_k4`; gguf-py `Q4_K.get_scale_min`) as two (…, 8) float32 arrays."""
    from gguf.quants import Q4_K

    shape = packed.shape[:-1]
    sc, mn = Q4_K.get_scale_min(packed.reshape(-1, 12))
    return sc.reshape(*shape, 8).astype("float32"), mn.reshape(*shape, 8).astype("float32")


def _bits_of(data, count: int, step: int = 1):
    """(…, count): bit `i·step` of the little-endian byte string `data` (…, bytes) for i < count, as uint8."""
    import numpy as np

    unpacked = np.unpackbits(np.ascontiguousarray(data), axis=-1, bitorder="little")
    return unpacked[..., : count * step : step]


def ggml_affine_groups(blocks, type_name: str) -> AffineGroups | None:
    """The MLX affine groups (group size 32) of GGML rows `blocks` (uint8, rows × bytes, ggml-common.h layouts)
    of type `type_name`, or None for a type not in EXACT_TYPES / NEAREST_TYPES.

    Exact (EXACT_TYPES, the file's own bits): every legacy block and every 32-wide K sub-block is
    w = d_g · q + c_g with an integer code q, so scale = d_g and bias = c_g, computed as gguf-py computes them
    (float32 products of float16 and small integers, which are exact): Q4_0 d, −8d; Q4_1 d, m; Q5_0 d, −16d;
    Q5_1 d, m; Q8_0 d, −128d (code q + 128); Q4_K / Q5_K d·sc_j, −dmin·m_j. Then scale · q + bias in float32
    rounds once, where gguf-py's d·q + c rounds once on the same exact operands: the values are identical.

    Nearest (NEAREST_TYPES, 8 bits): Q6_K (w = d·sc_j·(q − 32), int8 sc_j), Q3_K (d·(sc_j − 32)·(q − 4)) and
    Q2_K (d·sc_j·q − dmin·m_j) scale each 16-wide sub-block on its own, and MLX has no group size 16. Both
    halves of a group of 32 lie on the lattice d·g, g = gcd(sc_a, sc_b): when their integers a_i = w_i / (d·g)
    span at most 255 (and a Q2_K group's two mins agree, its codes reach 0) the group is exact at 8 bits
    (scale d·g, bias d·g·min a). That is every Q3_K group (|sc·q| ≤ 128, span ≤ 252), and Q6_K / Q2_K groups whose scales are
    small or share a large factor. Every other group gets, of these 8-bit grids, the one with the least squared
    error: min-max (error ≤ (max − min) / 510 per weight); min-max's codes with scale and bias refit by least
    squares; for Q6_K, the grid d·|sc_big| / n that holds the half with the larger scale exactly (n the most
    steps that still cover the group, error on the other half ≤ half a step, ≤ (max − min) / 382)."""
    import numpy as np

    block_bytes = _BLOCK_BYTES.get(type_name)
    if block_bytes is None:
        return None
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(rows, -1, block_bytes)  # rows × blocks × bytes
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(b[..., 0:2])
        if type_name == "Q8_0":
            codes: np.ndarray = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            return _exact(codes, d, d * np.float32(-128), 8)
        header = 4 if type_name in ("Q4_1", "Q5_1") else 2
        if type_name in ("Q5_0", "Q5_1"):
            high = _bits_of(b[..., header : header + 4], 32)  # qh: bit j is weight j's fifth bit
            header += 4
        qs = b[..., header:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles: weights 0–15
        bits = 4
        if type_name in ("Q5_0", "Q5_1"):
            codes = codes | (high << 4)
            bits = 5
        if type_name in ("Q4_1", "Q5_1"):
            return _exact(codes, d, _f16(b[..., 2:4]), bits)
        return _exact(codes, d, d * np.float32(-(1 << (bits - 1))), bits)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scale_min(b[..., 4:16])
        qs = b[..., -128:].reshape(rows, -1, 4, 32)  # 4 chunks of 32 bytes: sub-blocks 2c (low), 2c+1 (high)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, -1, 8, 32)
        bits = 4
        if type_name == "Q5_K":  # qh[l] bit j: the fifth bit of weight l of sub-block j
            high = np.unpackbits(b[..., 16:48], axis=-1, bitorder="little").reshape(rows, -1, 32, 8)
            codes = codes | (high.swapaxes(-1, -2) << 4)
            bits = 5
        return _exact(codes, d * sc, -(dmin * mn), bits)
    return _nearest(b, type_name)


def _exact(codes, scales, biases, bits: int) -> AffineGroups:
    """AffineGroups of codes (rows × … × 32 per group) with float32 scales / biases (rows × … groups)."""
    import numpy as np

    rows = codes.shape[0]
    groups = int(np.prod(scales.shape[1:]))
    return AffineGroups(
        codes=codes.reshape(rows, -1),
        scales=scales.reshape(rows, -1).astype(np.float32),
        biases=biases.reshape(rows, -1).astype(np.float32),
        bits=bits,
        exact=rows * groups,
        groups=rows * groups,
    )


def _nearest(b, type_name: str) -> AffineGroups:
    """8-bit AffineGroups of Q2_K / Q3_K / Q6_K blocks `b` (rows × blocks × bytes): see ggml_affine_groups."""
    import numpy as np

    rows, nblocks = b.shape[:2]
    offset = np.zeros((rows, nblocks, 16, 1), dtype=np.float32)  # the common offset of each 16-wide sub-block
    if type_name == "Q6_K":  # ql[128] qh[64] scales[16] d: gguf-py Q6_K.dequantize_blocks
        ql = b[..., 0:128].reshape(rows, nblocks, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
        qh = b[..., 128:192].reshape(rows, nblocks, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        q = (ql & 0x0F).reshape(rows, nblocks, 8, 32) | ((qh & 0x03).reshape(rows, nblocks, 8, 32) << 4)
        k = (q.astype(np.int32) - 32).reshape(rows, nblocks, 16, 16)
        sub_scale = b[..., 192:208].view(np.int8).astype(np.int32)
        d = _f16(b[..., 208:210])
    elif type_name == "Q3_K":  # hmask[32] qs[64] scales[12] d: gguf-py Q3_K.dequantize_blocks
        packed = b[..., 96:108]
        low = packed[..., 0:8].reshape(rows, nblocks, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
        high = packed[..., 8:12].reshape(rows, nblocks, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        sub_scale = (low & 0x0F).reshape(rows, nblocks, 16) | ((high & 0x03).reshape(rows, nblocks, 16) << 4)
        sub_scale = sub_scale.astype(np.int32) - 32
        ql = b[..., 32:96].reshape(rows, nblocks, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        hbit = np.unpackbits(b[..., 0:32], axis=-1, bitorder="little").reshape(rows, nblocks, 32, 8).swapaxes(-1, -2)
        k = (ql & 0x03).reshape(rows, nblocks, 8, 32).astype(np.int32) - ((hbit ^ 1).astype(np.int32) << 2)
        k = k.reshape(rows, nblocks, 16, 16)
        d = _f16(b[..., 108:110])
    else:  # Q2_K: scales[16] qs[64] d dmin: gguf-py Q2_K.dequantize_blocks
        scales = b[..., 0:16]
        qs = b[..., 16:80].reshape(rows, nblocks, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        k = (qs & 0x03).reshape(rows, nblocks, 16, 16).astype(np.int32)
        sub_scale = (scales & 0x0F).astype(np.int32)
        d = _f16(b[..., 80:82])
        offset = -(_f16(b[..., 82:84])[..., None] * (scales >> 4).astype(np.float32))[..., None]
    a = k * sub_scale[..., None]  # weight = d · a (+ offset), a an integer
    # gguf-py's values: (d · sc) · q (+ offset), each product exact in float32, one rounding for the offset
    values = (d[..., None, None] * a.astype(np.float32) + offset).reshape(rows, -1, GROUP_SIZE)
    pairs = sub_scale.reshape(rows, nblocks, 8, 2)
    fold = np.gcd(pairs[..., 0], pairs[..., 1])  # both halves lie on the lattice d · gcd(sc_a, sc_b)
    fold = np.where(fold == 0, 1, fold).reshape(rows, -1)
    a = a.reshape(rows, -1, GROUP_SIZE) // fold[..., None]
    offset = offset.repeat(16, axis=-1).reshape(rows, -1, GROUP_SIZE)
    unit = np.broadcast_to(d[..., None], (rows, nblocks, 8)).reshape(rows, -1) * fold.astype(np.float32)
    low = a.min(axis=-1)
    lattice = ((a.max(axis=-1) - low) <= 255) & (offset == offset[..., :1]).all(axis=-1)
    lattice &= (offset[..., 0] == 0) | (low == 0)  # bias unit·low + offset must round only once
    scales, biases, codes, error = _least_error(values.astype(np.float64), NEAREST_BITS)
    if type_name != "Q2_K":  # the half with the larger scale exact: grid step d·|sc_big| / n
        big = np.maximum(np.abs(pairs[..., 0]), np.abs(pairs[..., 1])).reshape(rows, -1).astype(np.float64)
        a_units = a.astype(np.float64) * fold[..., None]
        span = a_units.max(axis=-1) - a_units.min(axis=-1)
        steps = np.floor((NEAREST_BITS_LEVELS - 1) * big / np.where(span > 0, span, 1))
        step = big / np.maximum(steps, 1)
        which = np.abs(pairs[..., 0]) >= np.abs(pairs[..., 1])
        half_low = np.where(which.reshape(rows, -1), a_units[..., :16].min(axis=-1), a_units[..., 16:].min(axis=-1))
        base = half_low - np.ceil((half_low - a_units.min(axis=-1)) / step) * step
        d64 = np.broadcast_to(d[..., None], (rows, nblocks, 8)).reshape(rows, -1).astype(np.float64)
        aligned = _grid_fit(values.astype(np.float64), d64 * step, d64 * base, NEAREST_BITS_LEVELS)
        better = aligned[3] < error
        scales = np.where(better, aligned[0], scales)
        biases = np.where(better, aligned[1], biases)
        codes = np.where(better[..., None], aligned[2], codes)
    scales = np.where(lattice, unit, scales).astype(np.float32)
    biases = np.where(lattice, unit * low.astype(np.float32) + offset[..., 0], biases).astype(np.float32)
    codes = np.where(lattice[..., None], a - low[..., None], codes).astype(np.uint8)
    rebuilt = scales[..., None] * codes.astype(np.float32) + biases[..., None]
    exact = int((rebuilt == values).all(axis=-1).sum())
    return AffineGroups(
        codes=codes.reshape(rows, -1), scales=scales, biases=biases, bits=NEAREST_BITS, exact=exact, groups=scales.size
    )


NEAREST_BITS_LEVELS = (1 << NEAREST_BITS) - 1


def _grid_fit(values, scale, bias, levels: int):
    """Codes of `values` (… × group) on the grid float32(scale) · c + float32(bias), c = 0…levels, rounded to
    nearest, and the squared error per group: (scale32, bias32, codes, error)."""
    import numpy as np

    scale32, bias32 = scale.astype(np.float32), bias.astype(np.float32)
    codes = np.clip(np.rint((values - bias32[..., None]) / scale32[..., None]), 0, levels)
    error = ((scale32[..., None] * codes.astype(np.float32) + bias32[..., None] - values) ** 2).sum(axis=-1)
    return scale32, bias32, codes, error


def _least_error(values, bits: int):
    """Per group (last axis) the affine grid of 2**bits levels with the smaller squared error of: min-max, and
    min-max's codes with scale and bias refit by least squares. Returns float32 scales, biases (… groups),
    codes (… groups × size) and the squared error per group."""
    import numpy as np

    levels = (1 << bits) - 1
    low, high = values.min(axis=-1), values.max(axis=-1)
    scale = np.where(high > low, (high - low) / levels, 1.0)
    first = _grid_fit(values, scale, low, levels)
    codes = first[2]
    mean_c, mean_v = codes.mean(axis=-1), values.mean(axis=-1)
    var_c = (codes**2).mean(axis=-1) - mean_c**2
    cov = (codes * values).mean(axis=-1) - mean_c * mean_v
    refit = np.where(var_c > 0, cov / np.where(var_c > 0, var_c, 1), scale)
    refit = np.where(refit > 0, refit, scale)
    second = _grid_fit(values, refit, mean_v - refit * mean_c, levels)
    better = second[3] < first[3]
    return tuple(np.where(better[..., None] if i == 2 else better, second[i], first[i]) for i in range(4))


def pack_codes(codes, bits: int):
    """MLX's packed weight (uint32, rows × in_features · bits / 32) of codes (uint8, rows × in_features):
    each row a little-endian bit stream of `bits`-bit codes, as `mx.quantize` packs every width."""
    import numpy as np

    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[..., None] >> shifts) & 1).astype(np.uint8).reshape(codes.shape[0], -1)
    return np.ascontiguousarray(np.packbits(stream, axis=-1, bitorder="little")).view(np.uint32)


def scale_dtype(scales, biases):
    """numpy float16 when every scale and bias survives the round trip through float16 unchanged, else float32:
    K-quant products d · sc_j (11 + 6 significant bits) usually do not, legacy types' d, m, −8d… always do."""
    import numpy as np

    for array in (scales, biases):
        with np.errstate(over="ignore"):
            if not np.array_equal(array.astype(np.float16).astype(np.float32), array):
                return np.float32
    return np.float16


def mlx_affine_from_ggml(blocks, type_name: str):
    """MLX affine arrays (packed uint32 weight, scales, biases; group size 32) for GGML rows `blocks` (uint8,
    rows × bytes) of a type in EXACT_TYPES or NEAREST_TYPES (see `ggml_affine_groups`), scales and biases in
    float16 where every one round-trips, else float32 (`scale_dtype`). Returns None for another type.
    Q4_0 / Q4_1 / Q8_0 give the arrays MLX's own GGUF reader (mlx/io/gguf_quants.cpp) gives."""
    import mlx.core as mx

    groups = ggml_affine_groups(blocks, type_name)
    if groups is None:
        return None
    dtype = scale_dtype(groups.scales, groups.biases)
    return (
        mx.array(pack_codes(groups.codes, groups.bits)),
        mx.array(groups.scales.astype(dtype)),
        mx.array(groups.biases.astype(dtype)),
    )


def llama3_rope_factors(scaling: Mapping[str, float], head_dim: int, base: float):
    """The per-frequency divisors (float64 array of head_dim / 2) that Llama 3 RoPE scaling `scaling` applies
    to the inverse frequencies base^(-2i / head_dim): 1 where the wavelength 2π / freq is below
    original_max_position_embeddings / high_freq_factor, `factor` above original / low_freq_factor, and
    1 / ((1 - s) / factor + s), s = (original / wavelength - low) / (high - low), between — as llama.cpp's
    convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors` writes `rope_freqs` (mlx-lm's `Llama3RoPE`
    multiplies the periods by the same numbers)."""
    import numpy as np

    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * np.pi * base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (context / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, blended))


def llama3_rope_scaling(rope_freqs, head_dim: int, base: float, original_context: int | None = None) -> dict | None:
    """The mlx-lm `rope_scaling` {"rope_type": "llama3", ...} whose factors (`llama3_rope_factors`) regenerate
    llama.cpp's `rope_freqs` tensor (head_dim / 2 floats) within ROPE_FREQS_RTOL; None for a tensor of ones.

    Tried in order: LLAMA3_ROPE_PRESETS (Llama 3.1 / 3.2), then parameters solved from the tensor: `factor` is
    its largest value, and in the blended band 1 / ((1 / r - 1 / factor) / (1 - 1 / factor)) = s is linear in
    1 / wavelength, so a least-squares line through those entries gives low / high_freq_factor for the original
    context `original_context` (the file's rope.scaling.original_context_length, else the converter's 8192;
    only the ratios context / low and context / high matter). Raises GGUFImportError when nothing fits."""
    import numpy as np

    stored = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if stored.shape != (head_dim // 2,):
        raise GGUFImportError(f"{ROPE_FREQS_TENSOR} has {stored.size} values, expected head_dim / 2 = {head_dim // 2}")
    if np.allclose(stored, 1.0, rtol=0, atol=ROPE_FREQS_RTOL):
        return None
    candidates = [dict(preset) for preset in LLAMA3_ROPE_PRESETS]
    factor = float(stored.max())
    context = original_context or LLAMA3_ROPE_CONVERTER_CONTEXT
    blended = (stored > 1 + ROPE_FREQS_RTOL) & (stored < factor * (1 - ROPE_FREQS_RTOL))
    if factor > 1 and blended.sum() >= 2:
        wavelength = 2 * np.pi * base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        smooth = (1 / stored[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(context / wavelength[blended], smooth, 1)  # s = (x - low) / (high - low)
        if slope > 0:
            low = -intercept / slope
            candidates.append(
                {
                    "factor": factor,
                    "low_freq_factor": float(low),
                    "high_freq_factor": float(low + 1 / slope),
                    "original_max_position_embeddings": context,
                }
            )
    for candidate in candidates:
        for rounded in (True, False):  # tidy numbers (7 significant digits) when they fit as well
            params = {k: float(f"{v:.7g}") if rounded else v for k, v in candidate.items()}
            params["original_max_position_embeddings"] = int(candidate["original_max_position_embeddings"])
            if params["low_freq_factor"] <= 0 or params["high_freq_factor"] <= params["low_freq_factor"]:
                continue
            if np.allclose(llama3_rope_factors(params, head_dim, base), stored, rtol=ROPE_FREQS_RTOL, atol=0):
                return {"rope_type": "llama3", **params}
    raise GGUFImportError(
        f"{ROPE_FREQS_TENSOR} (per-frequency RoPE factors) matches no Llama 3 RoPE scaling "
        "(rope_type llama3: factor, low/high_freq_factor, original context); mlx-lm cannot run this RoPE"
    )


def model_config(metadata: Mapping[str, Any], tensor_names: set[str], rope_freqs=None) -> dict[str, Any]:
    """The mlx-lm `config.json` of a llama / qwen2 / qwen3 GGUF from its `<arch>.*` metadata keys
    (names as in llama.cpp's gguf-py/gguf/constants.py `Keys.LLM` / `Keys.Attention` / `Keys.Rope`), and
    the `rope_scaling` that `rope_freqs` (the `rope_freqs.weight` tensor's values, if the file has one) encodes.
    head_dim: attention.key_length, else rope.dimension_count (llama.cpp's llama converter writes only that),
    else embedding_length / head_count.

    Raises GGUFImportError for another architecture, a missing required key, partial rotary dimensions
    (rope.dimension_count other than head_dim: mlx-lm's llama / qwen rotate whole heads) or a RoPE scaling
    mlx-lm does not run the same way."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def key(name: str, default: Any = KeyError) -> Any:
        value = metadata.get(f"{arch}.{name}")
        if value is None:
            if default is KeyError:
                raise GGUFImportError(f"the file has no {arch}.{name} metadata")
            return default
        return _scalar(value)

    tokens = metadata.get("tokenizer.ggml.tokens")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "intermediate_size": key("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", key("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "vocab_size": len(tokens) if tokens is not None else key("vocab_size"),
        "max_position_embeddings": key("context_length", 4096),
        "rope_theta": key("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    rope_dims = key("rope.dimension_count", config["head_dim"])
    if rope_dims != config["head_dim"]:
        raise GGUFImportError(
            f"{arch}.rope.dimension_count is {rope_dims} but head_dim is {config['head_dim']}: partial rotary "
            "embeddings are not supported for this architecture"
        )
    if arch == "qwen2" and config["head_dim"] != hidden // heads:  # mlx-lm's qwen2 derives it
        raise GGUFImportError(
            f"qwen2 with head_dim {config['head_dim']} other than embedding_length / head_count is not supported"
        )
    if arch == "llama":  # llama.cpp's converter keeps HF's q/k/v/o and MLP biases (Llama variants with biases)
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    scaling = key("rope.scaling.type", None)
    if rope_freqs is not None:
        if scaling not in (None, "none"):
            raise GGUFImportError(f"{ROPE_FREQS_TENSOR} together with rope scaling {scaling!r} is not supported")
        llama3 = llama3_rope_scaling(
            rope_freqs, config["head_dim"], config["rope_theta"], key("rope.scaling.original_context_length", None)
        )
        if llama3 is not None:
            config["rope_scaling"] = llama3
    elif scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": key("rope.scaling.factor")}
    elif scaling == "yarn":
        config["rope_scaling"] = {
            "type": "yarn",
            "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
        }
    elif scaling not in (None, "none"):
        raise GGUFImportError(f"rope scaling {scaling!r} is not supported")
    if arch == "qwen2":
        config["architectures"] = ["Qwen2ForCausalLM"]
    elif arch == "qwen3":
        config["architectures"] = ["Qwen3ForCausalLM"]
    else:
        config["architectures"] = ["LlamaForCausalLM"]
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight` (suffix kept: weight, bias, and
    MLX's scales / biases). Raises GGUFImportError for a tensor the importer does not know."""
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.{suffix}"
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    raise GGUFImportError(f"tensor {gguf_name!r} is not supported by the importer (llama / qwen2 / qwen3 tensors only)")


def unpermute_rows(array, heads: int):
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`:
    `w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)`) on axis 0 of `array` (rows × ...)."""
    shape = array.shape
    return array.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def requantize_bits(type_name: str) -> int:
    """Largest MLX affine width not above the GGML type's bits per weight (gguf.GGML_QUANT_SIZES)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    bits_per_weight = type_size * 8 / block_size
    return max([b for b in MLX_BITS if b <= bits_per_weight] or [MLX_BITS[0]])


def convert_weights(
    tensors: Mapping[str, Any],
    config: dict[str, Any],
    dtype: str,
    on_tensor: Callable[[str], None] | None = None,
) -> tuple[dict, dict | None, str]:
    """MLX weights named as mlx-lm expects, the config's `quantization` (None when unquantized) and the float
    dtype used, from the gguf package's tensors by name (`tensor_type`, raw `data`). `dtype`: see DTYPES.
    `on_tensor(name)` is called after each GGUF tensor."""
    import mlx.core as mx
    import numpy as np

    if dtype == "auto":
        float_name = "bfloat16" if any(t.tensor_type.name == "BF16" for t in tensors.values()) else "float16"
    else:
        float_name = dtype
    float_dtype = getattr(mx, float_name)
    permuted = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights: dict[str, Any] = {}
    layer_quant: dict[str, tuple[int, int]] = {}  # module path → (group_size, bits)
    for name, tensor in tensors.items():
        hf_name = hf_tensor_name(name)
        module, _, suffix = hf_name.rpartition(".")
        type_name = tensor.tensor_type.name
        in_features = int(tensor.shape[0])  # GGML lists the fastest-moving dimension first
        affine = mlx_affine_from_ggml(np.asarray(tensor.data), type_name) if dtype == "auto" else None
        if affine is not None:
            packed, scales, biases = affine
            parts = {"weight": packed, "scales": scales, "biases": biases}
            layer_quant[module] = (in_features // scales.shape[-1], packed.shape[-1] * 32 // in_features)
        else:
            dense = mx.array(_dense_values(tensor))
            requantize = dtype == "auto" and type_name not in _FLOAT_TYPES
            if requantize and dense.ndim == 2 and in_features % REQUANTIZE_GROUP_SIZE == 0:
                bits = requantize_bits(type_name)
                packed, scales, biases = mx.quantize(
                    dense.astype(float_dtype), group_size=REQUANTIZE_GROUP_SIZE, bits=bits
                )
                parts = {"weight": packed, "scales": scales, "biases": biases}
                layer_quant[module] = (REQUANTIZE_GROUP_SIZE, bits)
            else:
                parts = {suffix: dense.astype(float_dtype)}  # suffix: weight, or a linear's bias (qwen2 q/k/v)
        gguf_module = name.rpartition(".")[0].rpartition(".")[2]
        heads = permuted.get(gguf_module) if config["model_type"] == "llama" else None
        for part, value in parts.items():
            weights[f"{module}.{part}"] = unpermute_rows(value, heads) if heads else value
        mx.eval(list(parts.values()))
        if on_tensor is not None:
            on_tensor(name)
    return weights, _quantization_config(layer_quant), float_name


def _dense_values(tensor):
    """A gguf ReaderTensor's values as a numpy array in Hugging Face (row-major) shape: F32 / F16 as stored,
    any other type dequantized by `gguf.quants.dequantize`. Raises GGUFImportError for a type it cannot read."""
    import numpy as np
    from gguf import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    if tensor.tensor_type.name in ("F32", "F16"):
        return np.asarray(tensor.data).reshape(shape)
    try:
        return dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
    except NotImplementedError:
        raise GGUFImportError(
            f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf package cannot dequantize"
        ) from None


def _quantization_config(layer_quant: dict[str, tuple[int, int]]) -> dict | None:
    """mlx-lm's `quantization`: the most common (group_size, bits) at the top, other layers by path."""
    if not layer_quant:
        return None
    (group_size, bits), _ = Counter(layer_quant.values()).most_common(1)[0]
    quantization: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for module, (g, b) in sorted(layer_quant.items()):
        if (g, b) != (group_size, bits):
            quantization[module] = {"group_size": g, "bits": b, "mode": "affine"}
    return quantization


def build_tokenizer(metadata: Mapping[str, Any]):
    """A transformers fast tokenizer (`tokenizers` backend) rebuilt from `tokenizer.ggml.*`, with its special
    tokens, `add_bos_token` and chat template. Raises GGUFImportError for a vocabulary type it cannot build."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" line
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    arch = metadata["general.architecture"]
    fields = {
        name: _scalar(metadata[f"tokenizer.{key}"])
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in metadata
    }
    if "tokens" not in fields:
        raise GGUFImportError("the file has no tokenizer.ggml.tokens: no vocabulary to rebuild the tokenizer from")
    try:
        backend, _ = convert_gguf_tokenizer(arch, fields)
    except ValueError as exc:
        raise GGUFImportError(str(exc)) from None
    if fields.get("pre_tokenizer_type") == "smollm":  # llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: \p{N} first
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokens = fields["tokens"]

    def token(key: str) -> str | None:
        index = fields.get(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos = token("bos_token_id")
    add_bos = _scalar(metadata.get("tokenizer.ggml.add_bos_token", fields.get("tokenizer_type") == "llama"))
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, fields["bos_token_id"])]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        unk_token=token("unk_token_id"),
        pad_token=token("pad_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(add_bos),
        clean_up_tokenization_spaces=False,
        model_max_length=_scalar(metadata.get(f"{arch}.context_length", 4096)),
    )


def eos_token_ids(metadata: Mapping[str, Any]) -> list[int]:
    """End-of-generation ids: `tokenizer.ggml.eos_token_id`, then `eot_token_id` / `eom_token_id` if set."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and _scalar(value) not in ids:
            ids.append(_scalar(value))
    return ids


def write_model_files(
    gguf_path: Path,
    directory: Path,
    dtype: str = "auto",
    on_tensor: Callable[[str], None] | None = None,
    tensor_count: Callable[[int], None] | None = None,
) -> tuple[dict, dict]:
    """Convert `gguf_path` into an mlx-lm model directory `directory` (which must exist). Returns
    (config, facts) where facts has `architecture`, `dtype`, `quantization`, `tensor_types`.
    `tensor_count(n)` is called once with the number of tensors, `on_tensor(name)` after each."""
    import mlx.core as mx

    if dtype not in DTYPES:
        raise GGUFImportError(f"invalid --dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    metadata, tensors = read_gguf(gguf_path)
    weight_tensors = {name: t for name, t in tensors.items() if name != ROPE_FREQS_TENSOR}
    if tensor_count is not None:
        tensor_count(len(weight_tensors))
    rope_freqs = tensors.get(ROPE_FREQS_TENSOR)
    if rope_freqs is not None:
        rope_freqs = _dense_values(rope_freqs)
    config = model_config(metadata, set(tensors), rope_freqs)
    for name in weight_tensors:
        hf_tensor_name(name)  # unknown tensors fail before any conversion work
    tokenizer = build_tokenizer(metadata)
    weights, quantization, float_name = convert_weights(weight_tensors, config, dtype, on_tensor)
    eos_ids = eos_token_ids(metadata)
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = _scalar(metadata["tokenizer.ggml.bos_token_id"])
    config["torch_dtype"] = float_name
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    config["gguf_source"] = {
        "file": gguf_path.name,
        "name": metadata.get("general.name"),
        "file_type": _scalar(metadata.get("general.file_type")),
    }
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}, indent=2))
    tokenizer.save_pretrained(str(directory))
    facts = {
        "architecture": config["model_type"],
        "dtype": float_name,
        "quantization": quantization,
        "tensor_types": dict(Counter(t.tensor_type.name for t in tensors.values())),
    }
    return config, facts


def import_gguf(
    gguf_path: Path,
    repo_id: str,
    dtype: str = "auto",
    cache_dir: Path | None = None,
    on_tensor: Callable[[str], None] | None = None,
    tensor_count: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import a GGUF file into the Hub cache as `repo_id` (org/name). Raises GGUFImportError (bad file,
    unsupported architecture / tensor, the id already in the cache) with nothing left behind."""
    from macprovider.models.hub_cache import install_in_hub_cache
    from macprovider.models.ids import hub_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    if repo_dir.exists():
        raise GGUFImportError(
            f"model {repo_id} is already in the cache; choose another --id or remove it with `macprovider models rm {repo_id}`"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".macprovider-import-", dir=cache_dir))
    except OSError as exc:
        raise _write_failure(exc, repo_id, cache_dir) from None
    try:
        _, facts = write_model_files(Path(gguf_path), staging, dtype, on_tensor, tensor_count)
        snapshot = install_in_hub_cache(staging, repo_id, cache_dir, exclusive=True)
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError("[write] ...")
        if isinstance(exc, RuntimeError) and not str(exc).startswith("[write]"):
            raise
        shutil.rmtree(repo_dir, ignore_errors=True)  # a half-installed repo is worse than none
        raise _write_failure(exc, repo_id, cache_dir) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in (repo_dir / "blobs").iterdir())
    return ImportResult(repo_id=repo_id, snapshot=snapshot, size_bytes=size, **facts)


def _write_failure(exc: BaseException, repo_id: str, cache_dir: Path) -> GGUFImportError:
    """One line for a write that failed while importing: disk full (ENOSPC, or MLX's failed write with
    under 1 MiB free) says how much is free and what to do; anything else names the error."""
    try:
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < 1 << 20)
    if full:
        return GGUFImportError(
            f"no space left on device while importing {repo_id} into {cache_dir} ({free or 0} bytes free); "
            "nothing was kept: free space (`macprovider models rm ID`) and import again"
        )
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    return GGUFImportError(f"cannot write {repo_id} into {cache_dir}: {reason}; nothing was kept")


def default_repo_id(gguf_path: Path) -> str:
    """`gguf/<file stem>` with characters outside [A-Za-z0-9._-] replaced by '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(gguf_path).stem).strip(".-") or "model"
    return f"gguf/{name}"


OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def ollama_models_dir(env: Mapping[str, str] | None = None) -> Path:
    """Ollama's model store: `OLLAMA_MODELS`, else `~/.ollama/models`."""
    env = os.environ if env is None else env
    if env.get("OLLAMA_MODELS"):
        return Path(env["OLLAMA_MODELS"]).expanduser()
    return Path(env.get("HOME") or Path.home()) / ".ollama" / "models"


def ollama_gguf_path(reference: str, env: Mapping[str, str] | None = None) -> Path:
    """The GGUF blob of an Ollama model `NAME[:TAG]` (TAG defaults to `latest`; NAME may be `namespace/name`
    or `host/namespace/name`), found through `manifests/<host>/<namespace>/<name>/<tag>` (an OCI-style JSON
    manifest) and its layer of media type `application/vnd.ollama.image.model` → `blobs/sha256-<hex>`.
    Raises GGUFImportError naming what is missing."""
    root = ollama_models_dir(env)
    name, _, tag = reference.partition(":")
    tag = tag or "latest"
    parts = [p for p in name.split("/") if p]
    if (
        not parts
        or len(parts) > 3
        or any(not re.fullmatch(r"[A-Za-z0-9._-]+", p) or p in (".", "..") for p in parts + [tag])
    ):
        raise GGUFImportError(f"invalid Ollama model {reference!r}: expected NAME[:TAG], e.g. llama3.2:1b")
    if len(parts) == 1:
        parts = ["library", *parts]
    if len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest_path = root.joinpath("manifests", *parts, tag)
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise GGUFImportError(
            f"Ollama model {name}:{tag} not found (no manifest {manifest_path}); `ollama list` shows what is there"
        ) from None
    except (OSError, ValueError) as exc:
        raise GGUFImportError(f"cannot read the Ollama manifest {manifest_path}: {exc}") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    digests = [
        layer.get("digest", "")
        for layer in layers or []
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE
    ]
    if not digests or not re.fullmatch(r"sha256:[0-9a-f]{64}", digests[0]):
        raise GGUFImportError(f"the Ollama manifest {manifest_path} has no model layer ({OLLAMA_MODEL_MEDIA_TYPE})")
    blob = root / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        raise GGUFImportError(f"the Ollama blob {blob} named by {manifest_path} is missing")
    return blob


def ollama_repo_id(reference: str) -> str:
    """`ollama/<name>-<tag>` for an Ollama reference (namespace dropped, invalid characters → '-')."""
    name, _, tag = reference.partition(":")
    stem = f"{name.rsplit('/', 1)[-1]}-{tag or 'latest'}"
    return "ollama/" + (re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-") or "model")
