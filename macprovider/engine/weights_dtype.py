"""The dtype the engine serves the weights in (`weights_dtype`, docs/configuration.md serving knobs).

MLX's CPU backend sends float32 matmuls to BLAS (sgemm), runs quantized matmuls well only in float32, and
computes float16 / bfloat16 slowly on x86. Measured side by side on a 2-core x86 machine with OpenBLAS
preloaded, SmolLM2-135M Q4 (group 32, float16 scales), 32-token prompt, 8 tokens (`scripts/bench_weights_dtype.py
--model macprovider-demo/smollm2-135m`):

    native (float16 scales and activations)   prefill 0.25 tok/s   decode 0.21 tok/s   MLX peak 100 MiB
    quantized-float32                         prefill 9.8 tok/s    decode 6.7 tok/s    MLX peak 123 MiB
    float32 (dequantized)                     prefill 102 tok/s    decode 12.6 tok/s   MLX peak 525 MiB

So on the CPU backend `auto` dequantizes / up-casts the weights to float32 when that fits the memory budget,
else keeps a quantized checkpoint's quantized layers and casts only their scales and biases (and the other
floating parameters) to float32; on Metal and CUDA `auto` leaves the checkpoint as it is (`native`).

    auto      CPU backend: float32 if it fits (below); else quantized-float32 for a quantized checkpoint,
              native for a float one; on GPUs: native
    native    as the checkpoint stores them (quantized layers stay quantized)
    quantized-float32   quantized layers stay quantized; every floating parameter (their scales and biases,
              norms, unquantized layers) cast to float32
    float32 | float16 | bfloat16   every quantized layer dequantized, every float parameter cast

Memory budget for `auto`: the float32 copy (4 bytes per parameter) must fit in half of the memory available
when the model loads (psutil `virtual_memory().available`), leaving the rest for the KV cache and the system.
"""

from __future__ import annotations

from typing import Any

# The setting's values and the `auto` rule live in config (autotune's memory estimate predicts the same choice).
from macprovider.core.config import AUTO_BUDGET_FRACTION, QUANTIZED_FLOAT32, WEIGHTS_DTYPES, choose_weights_dtype  # noqa: F401


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
    quantized = {
        name for name, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
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


def is_quantized(model: Any) -> bool:
    """Whether any layer of `model` is an MLX quantized layer (QuantizedLinear / QuantizedEmbedding)."""
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def apply_weights_dtype(model: Any, setting: str) -> str:
    """Apply the `weights_dtype` setting to a loaded model; returns what was done, for the log line:
    `native`, QUANTIZED_FLOAT32 or the dtype cast to."""
    import mlx.core as mx
    import psutil

    on_cpu = mx.default_device().type == mx.cpu
    target = choose_weights_dtype(
        setting, on_cpu, parameter_count(model) * 4, psutil.virtual_memory().available, quantized=is_quantized(model)
    )
    if target is None:
        return "native"
    if target == QUANTIZED_FLOAT32:
        model.set_dtype(mx.float32)  # floating parameters only (nn.Module.set_dtype): packed words stay uint32
        mx.eval(model.parameters())
        return target
    cast_weights(model, target)
    return target
