"""NumPy for the exponential-heavy steps of a forward pass on MLX's CPU device (setting `cpu_kernels`).

Why: MLX's CPU backend evaluates `exp` (and so `softmax`, `sigmoid`, `logsumexp`) one element at a time
outside Apple silicon: its vectorized path (`mlx/backend/cpu/simd/`) is built only with Accelerate's SIMD
types; elsewhere every `Simd<float, N>` has N = 1. Measured on a 2-core x86-64 box (MLX 0.32.4, float32):
`mx.exp` ~15 ns per element, NumPy's `np.exp` (SIMD, X86_V3) ~2 ns; `mx.softmax` over a (8, 3, 27, 600)
score tensor 5.7 ms, the NumPy route below 2.6 ms including the copies. Element-wise arithmetic and
matrix products are fast in MLX (BLAS); only the exponential is slow. In a decode step of a 135 M model
with 8 sequences at ~600 tokens of context the exponentials (attention softmax, SiLU, log-softmax) took
~45 % of the step, and ~1/3 of a prefill.

What: three drop-ins that evaluate the MLX graph up to their input, do the exponential part in NumPy and
hand back an MLX array —
  * `attention`: mlx-lm's `scaled_dot_product_attention` (models/base.py) — the grouped-query attention
    that MLX's CPU `scaled_dot_product_attention` falls back to (scores, mask, softmax, values), plain or
    over kv-bits caches (`quantized_matmul`, as mlx-lm's `quantized_scaled_dot_product_attention`);
  * `swiglu`: mlx-lm's `swiglu` (models/activations.py), silu(gate) · x;
  * `log_softmax`: log-probabilities from logits (`log_probabilities` picks it or MLX's for the thread;
    speculative verification).
Results differ from MLX's by float32 rounding only (a few 1e-7 in probabilities, ~1e-4 in log-probabilities
of a 30-layer model); greedy text on the real test model is unchanged (tests/test_cpu_kernels.py).

How it is switched on: `install()` replaces those two names in every loaded `mlx_lm.models.*` module that
imported mlx-lm's own function, with wrappers that use the NumPy route only on a thread that called
`enable_in_this_thread()` — an engine's generation thread — and mlx-lm's function everywhere else (other
threads, other dtypes than float32, attention sinks). `wanted()` says whether the setting and the device
call for it: `auto` on MLX's CPU device except on macOS/arm64 (Accelerate's SIMD), never across machines
(lockstep ranks keep MLX's graph whole between collectives).
"""

from __future__ import annotations

import platform
import sys
import threading
from typing import Any

import mlx.core as mx
import numpy as np

_local = threading.local()
_originals: dict[str, Any] = {}


def wanted(setting: str, distributed: bool = False) -> bool:
    """Whether `cpu_kernels: <setting>` ("auto" | "mlx") asks for the NumPy route on this process's default
    device (module docstring)."""
    if setting != "auto" or distributed or mx.default_device().type != mx.cpu:
        return False
    return not (sys.platform == "darwin" and platform.machine() == "arm64")


def enable_in_this_thread(enabled: bool = True) -> None:
    """Use the NumPy route for forward passes run on the calling thread (after `install()`)."""
    _local.enabled = enabled


def enabled() -> bool:
    """Whether the calling thread uses the NumPy route."""
    return getattr(_local, "enabled", False)


def install() -> None:
    """Point every loaded mlx-lm model module's `scaled_dot_product_attention` / `swiglu` at this module's
    thread-aware wrappers. Idempotent; call after loading a model (its module is imported by then)."""
    import mlx_lm.models.activations as activations
    import mlx_lm.models.base as base

    _originals.setdefault("scaled_dot_product_attention", base.scaled_dot_product_attention)
    _originals.setdefault("swiglu", activations.swiglu)
    replacements = {"scaled_dot_product_attention": _attention_entry, "swiglu": _swiglu_entry}
    for name, module in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or name in ("mlx_lm.models.base", "mlx_lm.models.activations"):
            continue
        for attribute, replacement in replacements.items():
            if getattr(module, attribute, None) is _originals[attribute]:
                setattr(module, attribute, replacement)


def _attention_entry(queries, keys, values, cache, scale, mask, sinks=None):  # mlx-lm's signature
    if enabled() and sinks is None and queries.dtype == mx.float32:
        return attention(queries, keys, values, cache, scale, mask)
    return _originals["scaled_dot_product_attention"](queries, keys, values, cache, scale, mask, sinks)


def _swiglu_entry(gate, x):
    if enabled() and gate.dtype == mx.float32 and x.dtype == mx.float32:
        return swiglu(gate, x)
    return _originals["swiglu"](gate, x)


def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis of float32 `scores` (any shape), computed by NumPy into a new array, as MLX's
    softmax allocates one (autotune's memory estimate counts the score tensors MLX's attention holds).
    Computing it in place in `scores`' own buffer (NumPy's view of an evaluated MLX array shares its memory)
    saved ~10 % of a prefill; it needs that estimate's prefill term revisited first."""
    mx.eval(scores)
    values = np.asarray(scores)
    with np.errstate(invalid="ignore"):  # a row masked to -inf throughout gives NaN, as in MLX, silently
        out = values - values.max(axis=-1, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(axis=-1, keepdims=True)
    return mx.array(out)


def log_softmax(logits: mx.array) -> mx.array:
    """log(softmax(logits)) over the last axis of float32 `logits` (any shape), computed by NumPy."""
    mx.eval(logits)
    values = np.asarray(logits)
    with np.errstate(invalid="ignore", divide="ignore"):  # all -inf or NaN logits: NaN, as in MLX, silently
        shifted = values - values.max(axis=-1, keepdims=True)
        shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return mx.array(shifted)


def log_probabilities(logits: mx.array) -> mx.array:
    """logits − logsumexp(logits) over the last axis: by `log_softmax` on a thread that enabled the NumPy
    route (float32), else by MLX (as mlx-lm's generation step computes them)."""
    if enabled() and logits.dtype == mx.float32:
        return log_softmax(logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) · x = gate · sigmoid(gate) · x (mlx-lm's `swiglu`), computed by NumPy; same shapes in and out."""
    mx.eval(gate, x)
    g = np.asarray(gate)
    out = np.negative(g)
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for gate < -88: silu is then -0.0, as in MLX
        np.exp(out, out=out)
    out += 1.0
    np.divide(g, out, out=out)
    out *= np.asarray(x)
    return mx.array(out)


def attention(
    queries: mx.array, keys: Any, values: Any, cache: Any, scale: float, mask: mx.array | str | None
) -> mx.array:
    """Scaled dot-product attention with the softmax in NumPy (module docstring).

    queries: (B, H, L, D) float32; keys / values: (B, Hk, S, D) with H a multiple of Hk (grouped-query
    attention), or kv-bits triples (packed, scales, biases) when `cache` has `bits` / `group_size`
    (mlx-lm's quantized caches). mask: None, "causal" (query i sees keys up to S - L + i), or an array
    broadcastable to (B, H, L, S) — boolean (True = attend) or additive. Returns (B, H, L, D).
    """
    batch, heads, length, dim = queries.shape
    quantized = hasattr(cache, "bits")
    kv_heads = (keys[0] if quantized else keys).shape[-3]
    group = heads // kv_heads
    q = (queries * scale).reshape(batch, kv_heads, group * length, dim)
    if quantized:
        group_size, bits = cache.group_size, cache.bits
        packed, scales, biases = keys
        scores = mx.quantized_matmul(q, packed, scales, biases, transpose=True, group_size=group_size, bits=bits)
    else:
        scores = q @ keys.swapaxes(-1, -2)
    scores = scores.reshape(batch, kv_heads, group, length, -1)  # (B, Hk, g, L, S)
    if mask is not None:
        scores = _masked(scores, mask, heads, kv_heads)
    probabilities = softmax(scores).reshape(batch, kv_heads, group * length, -1)
    if quantized:
        packed, scales, biases = values
        out = mx.quantized_matmul(
            probabilities, packed, scales, biases, transpose=False, group_size=group_size, bits=bits
        )
    else:
        out = probabilities @ values
    return out.reshape(batch, heads, length, dim)


def _masked(scores: mx.array, mask: mx.array | str, heads: int, kv_heads: int) -> mx.array:
    """`scores` (B, Hk, g, L, S) with `mask` applied as MLX's scaled_dot_product_attention applies it."""
    length, keys = scores.shape[-2:]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        mask = mx.arange(keys - length, keys)[:, None] >= mx.arange(keys)[None]
    else:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (B|1, H|1, L|1, S|1)
        mask_batch, mask_heads = mask.shape[:2]
        if mask_heads == heads:
            mask = mask.reshape(mask_batch, kv_heads, heads // kv_heads, *mask.shape[2:])
        else:
            mask = mx.expand_dims(mask, 2)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask.astype(scores.dtype)
