"""SmallBatchLinear (engine/small_batch_matmul.py): the transposed decode matmul gives nn.Linear's results for
every row count and shape, and is switched on only where it measures faster."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from macprovider.engine import small_batch_matmul
from macprovider.engine.small_batch_matmul import SmallBatchLinear, use_small_batch_linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leading", [(1,), (3,), (8,), (2, 4), (15,), (16,), (4, 1, 5)])
def test_small_batch_linear_equals_linear(bias, leading):
    mx.random.seed(0)
    layer = nn.Linear(96, 160, bias=bias)
    x = mx.random.normal((*leading, 96))
    want = layer(x)
    layer.__class__ = SmallBatchLinear
    got = layer(x)
    assert got.shape == want.shape == (*leading, 160)
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)
        self.embed = nn.Embedding(10, 64)


@pytest.mark.parametrize(("plain_s", "transposed_s", "switched"), [(1.0, 0.5, True), (1.0, 0.9, False)])
def test_switched_only_where_measured_faster(monkeypatch, plain_s, transposed_s, switched):
    timings = iter([plain_s, transposed_s])
    monkeypatch.setattr(small_batch_matmul, "_median_seconds", lambda run, repeats=7: next(timings))
    monkeypatch.setattr(small_batch_matmul.mx, "default_device", lambda: mx.cpu)
    model = _TwoLayers()
    assert use_small_batch_linear(model) is switched
    kinds = {type(model.up), type(model.down)}
    assert kinds == ({SmallBatchLinear} if switched else {nn.Linear})
    assert type(model.embed) is nn.Embedding
