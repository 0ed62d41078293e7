"""The dtype the engine serves the weights in (`weights_dtype`, SPEC.md §2 serving knobs).

MLX's CPU backend runs quantized matmuls and float16/bfloat16 matmuls far slower than float32 ones, which
go to BLAS (sgemm): on a 2-core x86 machine SmolLM2-135M Q4 prefills ~8 tok/s quantized and ~178 tok/s
with float32 weights and OpenBLAS (`mlx_lm generate`, measured for issue 11). So on the CPU backend `auto`
dequantizes / up-casts the weights to float32 when that fits the memory budget; on Metal and CUDA `auto`
leaves the checkpoint as it is (`native`).

    auto      CPU backend: float32 if it fits (below); otherwise, and on GPUs: native
    native    as the checkpoint stores them (quantized layers stay quantized)
    float32 | float16 | bfloat16   every quantized layer dequantized, every float parameter cast

Memory budget for `auto`: the float32 copy (4 bytes per parameter) must fit in half of the memory available
when the model loads (psutil `virtual_memory().available`), leaving the rest for the KV cache and the system.
"""

from __future__ import annotations

from typing import Any

# The setting's values and the `auto` rule live in config (autotune's memory estimate predicts the same choice).
from macprovider.config import AUTO_BUDGET_FRACTION, WEIGHTS_DTYPES, choose_weights_dtype  # noqa: F401


def parameter_count(model: Any) -> int:
    """Number of weights of an mlx-lm model, counting each quantized weight once (packed words × 32/bits)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    count = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            count += module.weight.size * 32 // module.bits
            if "bias" in module:
                count += module.bias.size
    quantized = {name for name, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    for name, value in tree_flatten(model.parameters()):
        if name.rpartition(".")[0] not in quantized:
            count += value.size
    return count


def cast_weights(model: Any, dtype: str) -> None:
    """Dequantize every quantized layer of `model` (mlx-lm's `dequantize_model`) and cast every floating
    parameter to `dtype` (float32 / float16 / bfloat16), in place; evaluates the new weights."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())


def apply_weights_dtype(model: Any, setting: str) -> str:
    """Apply the `weights_dtype` setting to a loaded model; returns what was done, for the log line:
    `native` or the dtype cast to."""
    import mlx.core as mx
    import psutil

    on_cpu = mx.default_device().type == mx.cpu
    target = choose_weights_dtype(setting, on_cpu, parameter_count(model) * 4, psutil.virtual_memory().available)
    if target is None:
        return "native"
    cast_weights(model, target)
    return target
