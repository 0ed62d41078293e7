"""engine/cpu_kernels.py: the NumPy route for exponentials on MLX's CPU device equals MLX's own ops (attention
with every mask kind, grouped-query and kv-bits caches; SwiGLU at the extremes; log-softmax), and is used only
on a thread that asked for it. The real-model tier (tests/test_real_model.py) checks greedy text against
mlx-lm's own generation with it on."""

from __future__ import annotations

import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from macprovider.engine import cpu_kernels


@pytest.fixture
def on_this_thread():
    cpu_kernels.enable_in_this_thread()
    try:
        yield
    finally:
        cpu_kernels.enable_in_this_thread(False)


def close(a: mx.array, b: mx.array, atol: float = 2e-5) -> bool:
    return bool(np.allclose(np.array(a), np.array(b), atol=atol, rtol=1e-4))


def masks(batch: int, heads: int, length: int, keys: int) -> dict[str, object]:
    rng = np.random.default_rng(1)
    bool_mask = rng.random((batch, 1, length, keys)) < 0.7
    bool_mask[..., -1] = True  # every query sees at least one key
    per_head = rng.random((batch, heads, length, keys)) < 0.7
    per_head[..., -1] = True
    additive = np.where(rng.random((1, 1, length, keys)) < 0.7, 0.0, -1e9).astype(np.float32)
    return {
        "none": None,
        "causal": "causal",
        "bool per batch": mx.array(bool_mask),
        "bool per head": mx.array(per_head),
        "additive": mx.array(additive),
        "2-d bool": mx.array(bool_mask[0, 0]),
    }


@pytest.mark.parametrize(("heads", "kv_heads", "length"), [(6, 2, 5), (4, 4, 1), (3, 1, 7)])
def test_attention_equals_mlx_scaled_dot_product_attention_for_every_mask(heads, kv_heads, length):
    batch, keys, dim = 2, 11, 16
    q = mx.random.normal((batch, heads, length, dim), key=mx.random.key(0))
    k = mx.random.normal((batch, kv_heads, keys, dim), key=mx.random.key(1))
    v = mx.random.normal((batch, kv_heads, keys, dim), key=mx.random.key(2))
    for name, mask in masks(batch, heads, length, keys).items():
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        got = cpu_kernels.attention(q, k, v, None, 0.25, mask)
        assert got.shape == expected.shape and close(got, expected), name


def test_attention_over_kv_bits_caches_equals_mlx_lm_quantized_attention():
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    class Cache:
        bits, group_size = 8, 32

    batch, heads, kv_heads, length, keys, dim = 2, 6, 2, 3, 9, 64
    q = mx.random.normal((batch, heads, length, dim), key=mx.random.key(3))
    k = mx.quantize(mx.random.normal((batch, kv_heads, keys, dim), key=mx.random.key(4)), group_size=32, bits=8)
    v = mx.quantize(mx.random.normal((batch, kv_heads, keys, dim), key=mx.random.key(5)), group_size=32, bits=8)
    mask = masks(batch, heads, length, keys)["bool per batch"]
    got = cpu_kernels.attention(q, k, v, Cache(), 0.125, mask)
    # (mlx-lm's function scales `q` in place: it runs second)
    expected = quantized_scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask, group_size=32, bits=8)
    assert close(got, expected)


def test_swiglu_equals_mlx_at_the_extremes_without_warnings():
    gate = mx.array([[-1e4, -100.0, -88.5, -20.0, -1.0, 0.0, 1e-3, 3.0, 90.0, 1e4]], dtype=mx.float32)
    x = mx.full(gate.shape, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cpu_kernels.swiglu(gate, x)
    assert close(got, nn.silu(gate) * x, atol=1e-6)
    assert not np.isnan(np.array(got)).any()


def test_log_softmax_equals_mlx():
    logits = mx.random.normal((3, 4, 1000), key=mx.random.key(6)) * 20
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert close(cpu_kernels.log_softmax(logits), expected, atol=1e-4)


def test_log_probabilities_take_the_numpy_route_only_where_enabled(monkeypatch, on_this_thread):
    routes: list[str] = []
    monkeypatch.setattr(cpu_kernels, "log_softmax", lambda logits: routes.append("numpy") or logits)
    logits = mx.zeros((2, 5))
    cpu_kernels.log_probabilities(logits)
    cpu_kernels.log_probabilities(logits.astype(mx.float16))  # not float32: MLX's
    cpu_kernels.enable_in_this_thread(False)
    assert close(cpu_kernels.log_probabilities(logits), mx.full((2, 5), -np.log(5.0)), atol=1e-6)
    assert routes == ["numpy"]


def test_fully_masked_rows_give_nan_as_mlx_does_without_warnings():
    rows = mx.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]], dtype=mx.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probabilities, log_probabilities = cpu_kernels.softmax(rows), cpu_kernels.log_softmax(rows)
    for got, expected in (
        (probabilities, mx.softmax(rows, axis=-1)),
        (log_probabilities, rows - mx.logsumexp(rows, axis=-1, keepdims=True)),
    ):
        assert np.isnan(np.array(got[0])).all() and np.isnan(np.array(expected[0])).all()
        assert close(got[1], expected[1], atol=1e-6)


def test_installed_wrappers_use_numpy_only_on_an_enabled_thread(monkeypatch):
    import mlx_lm.models.llama as llama

    cpu_kernels.install()
    assert llama.scaled_dot_product_attention is cpu_kernels._attention_entry
    assert llama.swiglu is cpu_kernels._swiglu_entry
    calls: list[str] = []
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda gate, x: calls.append(threading.current_thread().name) or x)
    gate = mx.ones((1, 4))

    llama.swiglu(gate, gate)  # this thread never enabled it: mlx-lm's own function
    assert calls == []

    def worker() -> None:
        cpu_kernels.enable_in_this_thread()
        llama.swiglu(gate, gate)
        llama.swiglu(gate.astype(mx.float16), gate.astype(mx.float16))  # not float32: mlx-lm's

    thread = threading.Thread(target=worker, name="generation")
    thread.start()
    thread.join()
    assert calls == ["generation"]
    assert not cpu_kernels.enabled()


def test_wanted_follows_setting_device_platform_and_distribution(monkeypatch):
    assert cpu_kernels.wanted("mlx") is False
    assert cpu_kernels.wanted("auto", distributed=True) is False
    assert cpu_kernels.wanted("auto") is (mx.default_device().type == mx.cpu)
    monkeypatch.setattr(cpu_kernels.sys, "platform", "darwin")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "arm64")
    assert cpu_kernels.wanted("auto") is False
