"""`weights_dtype` (macprovider/engine/weights_dtype.py): what `auto` picks, and casting a quantized model."""

from __future__ import annotations

import pytest

from macprovider.core import config as cfg
from macprovider.core.errors import ConfigError
from macprovider.engine.weights_dtype import choose_weights_dtype

GIB = 1024**3


@pytest.mark.parametrize(
    "setting, on_cpu, float32_gib, available_gib, quantized, expected",
    [
        ("auto", True, 0.5, 8, True, "float32"),  # CPU backend, fits in half the free memory
        ("auto", True, 5, 8, False, None),  # CPU backend, a float checkpoint that would not fit: as stored
        ("auto", True, 5, 8, True, "quantized-float32"),  # ... a quantized one: float32 scales
        ("auto", False, 0.5, 8, True, None),  # Metal / CUDA: untouched
        ("native", True, 5, 8, True, None),
        ("float16", False, 0.5, 8, False, "float16"),
        ("float32", True, 50, 8, True, "float32"),  # explicit: the user's call
    ],
)
def test_choose_weights_dtype(setting, on_cpu, float32_gib, available_gib, quantized, expected):
    got = choose_weights_dtype(setting, on_cpu, int(float32_gib * GIB), int(available_gib * GIB), quantized=quantized)
    assert got == expected


def test_setting_sources_and_errors(monkeypatch):
    assert cfg.resolve({}).settings.weights_dtype == "auto"
    monkeypatch.setenv("MACPROVIDER_WEIGHTS_DTYPE", "native")
    resolved = cfg.resolve({})
    assert (
        resolved.settings.weights_dtype == "native"
        and resolved.sources["weights_dtype"] == "env:MACPROVIDER_WEIGHTS_DTYPE"
    )
    assert cfg.resolve({"weights_dtype": "float32"}).settings.weights_dtype == "float32"
    with pytest.raises(ConfigError, match=r"invalid weights_dtype 'int8' \(from cli\): must be one of auto, native"):
        cfg.resolve({"weights_dtype": "int8"})


def test_cast_weights_dequantizes_every_layer(tiny_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    from macprovider.engine.weights_dtype import cast_weights, parameter_count
    from macprovider.models.ids import ensure_local

    model, _ = load(str(ensure_local(tiny_model)))
    count = parameter_count(model)
    nn.quantize(model, group_size=64, bits=4)
    assert parameter_count(model) == count
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    reference = model(tokens)
    cast_weights(model, "float32")
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    from mlx.utils import tree_flatten

    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert mx.abs(model(tokens) - reference).max().item() < 1e-3


def test_auto_keeps_a_quantized_model_quantized_with_float32_scales_when_float32_does_not_fit(tiny_model, monkeypatch):
    """MLX's CPU backend computes float16 far slower than float32 on x86 (weights_dtype.py's table); when the
    dequantized copy does not fit, `auto` keeps the packed weights and computes in float32."""
    import mlx.core as mx
    import mlx.nn as nn
    import psutil
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from macprovider.engine.weights_dtype import apply_weights_dtype, parameter_count
    from macprovider.models.ids import ensure_local

    model, _ = load(str(ensure_local(tiny_model)))
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    packed = {name: v for name, v in tree_flatten(model.parameters()) if v.dtype == mx.uint32}
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    reference = model(tokens)
    assert reference.dtype == mx.float16
    free = parameter_count(model) * 4  # the float32 copy would need all of it; auto allows half
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": free})())
    assert apply_weights_dtype(model, "auto") == "quantized-float32"
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized and all(m.scales.dtype == mx.float32 and m.biases.dtype == mx.float32 for m in quantized)
    after = dict(tree_flatten(model.parameters()))
    assert all(after[name] is value or mx.array_equal(after[name], value) for name, value in packed.items())
    assert {v.dtype for v in after.values()} == {mx.uint32, mx.float32}
    logits = model(tokens)
    assert logits.dtype == mx.float32
    assert mx.abs(logits - reference.astype(mx.float32)).max().item() < 0.05
    assert apply_weights_dtype(model, "native") == "native"


def test_every_setting_value_resolves():
    for value in cfg.WEIGHTS_DTYPES:
        assert cfg.resolve({"weights_dtype": value}).settings.weights_dtype == value
