"""`weights_dtype` (macprovider/engine/weights.py): what `auto` picks, and casting a quantized model."""

from __future__ import annotations

import pytest

from macprovider import config as cfg
from macprovider.engine.weights import choose_weights_dtype
from macprovider.errors import ConfigError

GIB = 1024**3


@pytest.mark.parametrize(
    "setting, on_cpu, float32_gib, available_gib, expected",
    [
        ("auto", True, 0.5, 8, "float32"),  # CPU backend, fits in half the free memory
        ("auto", True, 5, 8, None),  # CPU backend, would not fit: as stored
        ("auto", False, 0.5, 8, None),  # Metal / CUDA: untouched
        ("native", True, 0.5, 8, None),
        ("float16", False, 0.5, 8, "float16"),
        ("float32", True, 50, 8, "float32"),  # explicit: the user's call
    ],
)
def test_choose_weights_dtype(setting, on_cpu, float32_gib, available_gib, expected):
    assert choose_weights_dtype(setting, on_cpu, int(float32_gib * GIB), int(available_gib * GIB)) == expected


def test_setting_sources_and_errors(monkeypatch):
    assert cfg.resolve({}).settings.weights_dtype == "auto"
    monkeypatch.setenv("MACPROVIDER_WEIGHTS_DTYPE", "native")
    resolved = cfg.resolve({})
    assert resolved.settings.weights_dtype == "native" and resolved.sources["weights_dtype"] == "env:MACPROVIDER_WEIGHTS_DTYPE"
    assert cfg.resolve({"weights_dtype": "float32"}).settings.weights_dtype == "float32"
    with pytest.raises(ConfigError, match=r"invalid weights_dtype 'int8' \(from cli\): must be one of auto, native"):
        cfg.resolve({"weights_dtype": "int8"})


def test_cast_weights_dequantizes_every_layer(tiny_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    from macprovider.engine.weights import cast_weights, parameter_count
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
