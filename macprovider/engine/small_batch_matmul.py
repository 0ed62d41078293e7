"""Decode-step matmuls for a few rows on MLX's CPU backend: y = (W · xᵀ)ᵀ instead of y = x · Wᵀ.

A decode step multiplies B rows (one per running sequence, B × width under speculation) by every weight
matrix. MLX's CPU backend hands both forms to the BLAS `sgemm`; OpenBLAS (the optimized BLAS one preloads on
Linux, docs/configuration.md#weights_dtype) is slow for the row-major x · Wᵀ with 2–15 rows — on two x86 cores,
SmolLM2-135M's MLP matrices (1536 × 576) at 8 rows: 1.0 ms as x · Wᵀ, 0.55 ms as (W · xᵀ)ᵀ (16 rows and more
are as fast either way). Both compute the same dot products; results agree to float32 rounding.

`use_small_batch_linear(model)` measures both forms on the model's largest dense `nn.Linear` at 8 rows when
the model loads and, only where the transposed form is clearly faster, turns every dense `nn.Linear` of the
model into `SmallBatchLinear`, which takes the transposed form for 2–15 rows. Quantized layers, embeddings
used as the output projection, and other devices are left alone.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("macprovider.engine.small_batch_matmul")

SMALL_BATCH_ROWS = range(2, 16)
# The transposed form is used only when it takes at most this fraction of the plain form's time.
REQUIRED_SPEEDUP = 0.85


class SmallBatchLinear(nn.Linear):
    """`nn.Linear` computing (W · xᵀ)ᵀ (+ bias) when x holds 2–15 rows (x: (..., in) → (..., out))."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if rows not in SMALL_BATCH_ROWS:
            return super().__call__(x)
        weight = self["weight"]
        y = mx.contiguous((weight @ x.reshape(rows, x.shape[-1]).T).T).reshape(*x.shape[:-1], weight.shape[0])
        return y + self["bias"] if "bias" in self else y


def _median_seconds(run: Any, repeats: int = 7) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def use_small_batch_linear(model: Any) -> bool:
    """Switch the model's dense `nn.Linear` layers to `SmallBatchLinear` when, on MLX's CPU backend, the
    transposed form measures faster (at most REQUIRED_SPEEDUP of the plain time) on its largest one at 8 rows.
    Returns whether it did; logs the two timings."""
    if mx.default_device() != mx.cpu:
        return False
    linears = [module for _, module in model.named_modules() if type(module) is nn.Linear]
    if not linears:
        return False
    weight = max((module["weight"] for module in linears), key=lambda w: w.size)
    x = mx.random.normal((8, weight.shape[1])).astype(weight.dtype)
    mx.eval(x)
    plain = _median_seconds(lambda: mx.eval(x @ weight.T))
    transposed = _median_seconds(lambda: mx.eval(mx.contiguous((weight @ x.T).T)))
    chosen = transposed <= REQUIRED_SPEEDUP * plain
    log.info(
        "decode matmul at 8 rows, %s weight %s: x·Wᵀ %.3f ms, (W·xᵀ)ᵀ %.3f ms -> %s",
        weight.dtype,
        tuple(weight.shape),
        plain * 1e3,
        transposed * 1e3,
        "transposed" if chosen else "plain",
    )
    if chosen:
        for module in linears:
            module.__class__ = SmallBatchLinear
    return chosen
