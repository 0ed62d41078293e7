"""Memory pre-check and pre-warm integrity checks on real safetensors / Hub-cache layouts
(docs/autotune.md#pre-warm-and-failures, #memory-estimate)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from macprovider.autotune import memory
from macprovider.autotune.memory import KvShape, SafetensorsError, kv_bytes, read_safetensors_header, weights_bytes
from macprovider.autotune.prewarm import PrewarmIntegrity, PrewarmTransient, prewarm, verify_snapshot
from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], truncate: int = 0) -> int:
    header, offset = {}, 0
    sizes = {"F32": 4, "F16": 2, "U32": 4}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", len(blob)) + blob + b"\0" * offset
    path.write_bytes(data[: len(data) - truncate] if truncate else data)
    return offset


def test_weights_bytes_are_exact_from_headers(tmp_path):
    a = write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"w": ("F32", [3, 5]), "b": ("F16", [7])})
    b = write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"u": ("U32", [2, 2, 2])})
    assert a == 3 * 5 * 4 + 7 * 2 and b == 32
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 999},
                "weight_map": {
                    "w": "model-00001-of-00002.safetensors",
                    "b": "model-00001-of-00002.safetensors",
                    "u": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    assert weights_bytes(tmp_path) == a + b
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert weights_bytes(tmp_path) == 999  # the index total_size when a shard cannot be read


@pytest.mark.parametrize("truncate", [1, 40])
def test_truncated_safetensors_is_detected(tmp_path, truncate):
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [4, 4])}, truncate=truncate)
    with pytest.raises(SafetensorsError, match="truncated|exceeds"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_malformed_header_is_detected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{not json" + b"\0" * 10)
    with pytest.raises(SafetensorsError, match="JSON"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_kv_bytes_formula():
    shape = KvShape.from_config(
        {
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_size": 3584,
            "torch_dtype": "bfloat16",
        }
    )
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes) == (28, 4, 128, 2)
    assert kv_bytes(shape, 1000, None) == 2 * 28 * 4 * 128 * 2 * 1000
    assert kv_bytes(shape, 1000, 8) == int(2 * 28 * 4 * 128 * 1.0625 * 1000)
    assert kv_bytes(shape, 1000, 4) == int(2 * 28 * 4 * 128 * 0.5625 * 1000)


@pytest.fixture(scope="module")
def model_src(tmp_path_factory) -> Path:
    return build_model_files(tmp_path_factory.mktemp("src"), TinyModelSpec(hidden_size=64, num_attention_heads=1))


def test_memory_precheck_rejects_quickly_without_loading(model_src):
    config = json.loads((model_src / "config.json").read_text())
    est = memory.estimate(model_src, config, max_context=100_000, max_batch=2, kv_bits=None, budget=128 * memory.MIB)
    assert not est.fits and est.note().startswith("memory estimate ")
    assert (
        est.weights
        == (model_src / "model.safetensors").stat().st_size
        - 8
        - struct.unpack("<Q", (model_src / "model.safetensors").read_bytes()[:8])[0]
    )
    roomy = memory.estimate(model_src, config, max_context=256, max_batch=1, kv_bits=4, budget=2 * memory.GIB)
    assert roomy.fits


def test_clean_cached_model_passes_and_is_not_downloaded(model_src, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = install_in_hub_cache(model_src, "org/clean", tmp_path / "hf" / "hub")
    assert prewarm("org/clean") == snap


def test_blob_with_wrong_content_is_an_integrity_failure(model_src, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = install_in_hub_cache(model_src, "org/corrupt", tmp_path / "hf" / "hub")
    blob = (snap / "config.json").resolve()
    blob.write_text(blob.read_text().replace("llama", "llamb"))
    with pytest.raises(PrewarmIntegrity, match="config.json does not match the hash"):
        prewarm("org/corrupt")


def test_truncated_weights_blob_is_an_integrity_failure(model_src, tmp_path):
    snap = install_in_hub_cache(model_src, "org/trunc", tmp_path / "hub")
    blob = (snap / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(PrewarmIntegrity, match="model.safetensors"):
        verify_snapshot(snap)


@pytest.mark.parametrize("missing, message", [("config.json", "config.json"), ("tokenizer.json", "tokenizer")])
def test_missing_required_files_are_integrity_failures(model_src, tmp_path, missing, message):
    local = tmp_path / "local"
    local.mkdir()
    for f in model_src.iterdir():
        if f.name != missing:
            (local / f.name).write_bytes(f.read_bytes())
    with pytest.raises(PrewarmIntegrity, match=message):
        verify_snapshot(local)


def test_uncached_model_offline_is_transient(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(PrewarmTransient, match="HF_HUB_OFFLINE"):
        prewarm("org/not-here")


def test_unreachable_hub_is_transient(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(PrewarmTransient, match="cannot reach"):
        prewarm("org/absent")


def test_quantized_kv_bytes_follow_the_activation_dtype_and_group_size():
    base = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128}
    fp32 = KvShape.from_config({**base, "torch_dtype": "float32"})  # head_dim 64: group 64
    assert fp32.kv_bytes_per_element(None) == 4
    assert fp32.kv_bytes_per_element(8) == 1 + 2 * 4 / 64 and fp32.kv_bytes_per_element(4) == 0.5 + 2 * 4 / 64
    odd = KvShape.from_config({**base, "hidden_size": 192, "num_attention_heads": 2, "torch_dtype": "float16"})
    assert odd.head_dim == 96 and odd.kv_bytes_per_element(8) == 1 + 2 * 2 / 32  # 64 does not divide 96


def test_estimate_terms_add_up(model_src):
    config = json.loads((model_src / "config.json").read_text())
    shape = KvShape.from_config(config)
    est = memory.estimate(
        model_src,
        config,
        max_context=300,
        max_batch=2,
        kv_bits=8,
        budget=memory.GIB,
        baseline=100 * memory.MIB,
        cached_tokens=1000,
    )
    assert est.kv == kv_bytes(shape, 2 * 512, 8)  # 300 tokens allocate two steps of 256
    assert est.prompt_cache == kv_bytes(shape, 1000, 8) and est.baseline == 100 * memory.MIB
    assert est.prefill == shape.prefill_bytes(300, 2) > 0
    assert est.total == sum(est.terms().values())
    capped = memory.estimate(
        model_src,
        config,
        max_context=300,
        max_batch=2,
        kv_bits=8,
        budget=memory.GIB,
        cached_tokens=10**6,
        prompt_cache_bytes=1234,
    )
    assert capped.prompt_cache == 1234
    # a workload that never fills the context or the batch: only what it uses
    light = memory.estimate(
        model_src,
        config,
        max_context=2000,
        max_batch=4,
        kv_bits=None,
        budget=memory.GIB,
        sequence_tokens=300,
        prompt_tokens=200,
        live_sequences=2,
    )
    assert light.kv == kv_bytes(shape, 2 * 512, None) and light.prefill == shape.prefill_bytes(200, 2)
    worst = memory.estimate(
        model_src,
        config,
        max_context=2000,
        max_batch=4,
        kv_bits=None,
        budget=memory.GIB,
        sequence_tokens=9000,
        prompt_tokens=9000,
        live_sequences=9,
    )
    assert worst.kv == kv_bytes(shape, 4 * 2048, None) and worst.prefill == shape.prefill_bytes(2000, 4)
    # a replay: four short requests in flight together (50 uncached tokens of 100 each), then a 400-token
    # prompt alone, 300 of it from the prefix cache. Live KV: the larger window (4 × 256 > 1 × 512 tokens);
    # prefill: one whole prompt (the warm-up) or a window's rows prefilling their uncached rest together.
    windows = [[(120, 50)], [(120, 50), (120, 50)], [(120, 50)] * 3, [(120, 50)] * 4, [(420, 100)]]
    replay = memory.estimate(
        model_src,
        config,
        max_context=2000,
        max_batch=4,
        kv_bits=None,
        budget=memory.GIB,
        sequence_tokens=420,
        prompt_tokens=400,
        live_sequences=4,
        live_windows=windows,
    )
    assert replay.kv == kv_bytes(shape, 4 * 256, None) < kv_bytes(shape, 4 * 512, None)
    assert replay.prefill == max(
        shape.prefill_bytes(400, 1), shape.prefill_bytes(50, 4, keys=400), shape.prefill_bytes(100, 1, keys=400)
    )
    assert replay.prefill < shape.prefill_bytes(400, 4)  # what counting four whole prompts gave
    narrow = memory.estimate(
        model_src,
        config,
        max_context=2000,
        max_batch=2,
        kv_bits=None,
        budget=memory.GIB,
        sequence_tokens=420,
        prompt_tokens=400,
        live_sequences=4,
        live_windows=windows,
    )
    assert narrow.kv == kv_bytes(shape, 512, None)  # max-batch 2 holds two of the four: 2 × 256 = 1 × 512
    assert shape.prefill_bytes(50, 4, keys=400) > shape.prefill_bytes(50, 4)  # the scores span the whole prompt
    assert replace_budget(est).note().startswith("memory estimate ") and "baseline 0.10" in replace_budget(est).note()


def replace_budget(est):
    from dataclasses import replace

    return replace(est, budget=0)


def test_the_memory_model_constants_match_the_runtime():
    """The constants the estimate cites are the ones mlx-lm and the engine really use."""
    import inspect

    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import KVCache

    from macprovider.engine import engine, kvcache

    assert KVCache.step == kvcache.BatchQuantizedKVCache.step == memory.KV_ALLOCATION_STEP
    assert inspect.signature(BatchGenerator).parameters["prefill_step_size"].default == memory.PREFILL_STEP_SIZE
    assert "prefill_step_size" not in inspect.getsource(engine.Engine)  # the engine keeps mlx-lm's default
    assert engine.PROMPT_CACHE_ENTRIES == memory.PROMPT_CACHE_ENTRIES
    assert [kvcache.kv_group_size(d) for d in (64, 96, 128)] == [64, 32, 64]


def test_runtime_baseline_is_measured_once_per_runtime_and_cached_atomically(tmp_path):
    cache = tmp_path / "cfg" / "runtime-baseline.json"
    calls = []

    def measure():
        calls.append(1)
        return 123_456_789

    assert memory.runtime_baseline_bytes(cache, measure) == 123_456_789
    assert memory.runtime_baseline_bytes(cache, measure) == 123_456_789
    assert len(calls) == 1 and json.loads(cache.read_text())["key"] == memory.runtime_key()
    other = json.loads(cache.read_text())
    other["key"]["mlx"] = "0.0.1"
    cache.write_text(json.dumps(other))
    assert memory.runtime_baseline_bytes(cache, measure) == 123_456_789 and len(calls) == 2  # another runtime
    assert [p.name for p in cache.parent.iterdir()] == ["runtime-baseline.json"]  # no temp file left


def test_runtime_baseline_falls_back_without_caching_when_the_child_fails(tmp_path):
    cache = tmp_path / "runtime-baseline.json"

    def broken():
        raise RuntimeError("runtime baseline child exited 1")

    assert memory.runtime_baseline_bytes(cache, broken) == memory.FALLBACK_BASELINE_BYTES
    assert not cache.exists()


def test_bare_runtime_child_reports_a_plausible_footprint():
    value = memory.measure_runtime_baseline()
    assert 20 * memory.MIB < value < 2 * memory.GIB


def test_served_weights_follow_the_weights_dtype_serve_will_apply(tmp_path):
    """A 4-bit checkpoint (group 32): 8 packed words per row hold 64 weights; on MLX's CPU backend `auto`
    serves float32, so the stored weights, the float32 copy and the largest float16 tensor are counted."""
    stored = write_safetensors(
        tmp_path / "model.safetensors",
        {
            "layers.0.mlp.weight": ("U32", [16, 8]),
            "layers.0.mlp.scales": ("F16", [16, 2]),
            "layers.0.mlp.biases": ("F16", [16, 2]),
            "norm.weight": ("F16", [64]),
        },
    )
    config = {
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "hidden_size": 64,
        "torch_dtype": "float16",
        "quantization": {"group_size": 32, "bits": 4},
    }
    assert memory.parameter_counts(tmp_path, config) == (16 * 64 + 64, 16 * 64)
    params = 16 * 64 + 64
    on_cpu = memory.served_weights(tmp_path, config, on_cpu=True, available_bytes=memory.GIB)[1]
    assert on_cpu == stored + params * 4 + 16 * 64 * 2
    assert memory.served_weights(tmp_path, config, on_cpu=False, available_bytes=memory.GIB)[1] == stored
    # too big for float32: the packed words stay, the 16-bit scales, biases and norm get a float32 copy
    half = 16 * 2 * 2 + 64
    assert memory.half_precision_elements(tmp_path) == half
    assert memory.served_weights(tmp_path, config, on_cpu=True, available_bytes=params * 4)[1] == stored + half * 4
    assert (
        memory.served_weights(tmp_path, config, on_cpu=True, available_bytes=params * 4, setting="native")[1] == stored
    )
    eight_bit = {**config, "quantization": {"group_size": 32, "bits": 4, "layers.0.mlp": {"group_size": 32, "bits": 8}}}
    assert memory.parameter_counts(tmp_path, eight_bit)[0] == 16 * 32 + 64
    plain = {**config, "torch_dtype": "float32"}
    plain.pop("quantization")
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [8, 8])})
    assert memory.served_weights(tmp_path, plain, on_cpu=True, available_bytes=memory.GIB)[1] == 8 * 8 * 4


def test_serve_and_the_estimate_share_one_weights_dtype_rule():
    from macprovider.core import config
    from macprovider.engine import weights_dtype as weights

    assert weights.choose_weights_dtype is config.choose_weights_dtype


def test_kv_and_activations_count_the_dtype_serve_computes_in(model_src):
    """A float16 checkpoint that `auto` serves in float32 on MLX's CPU backend holds float32 KV and
    activations (MLX computes in the weights' dtype): twice the bytes the checkpoint's dtype would give."""
    config = {**json.loads((model_src / "config.json").read_text()), "torch_dtype": "float16"}
    common = dict(
        max_context=512, max_batch=2, kv_bits=None, budget=memory.GIB, cached_tokens=300, available_bytes=memory.GIB
    )
    on_gpu = memory.estimate(model_src, config, on_cpu=False, **common)
    on_cpu = memory.estimate(model_src, config, on_cpu=True, **common)
    assert on_gpu.kv > 0 and on_cpu.kv == 2 * on_gpu.kv and on_cpu.prompt_cache == 2 * on_gpu.prompt_cache
    assert on_cpu.prefill > on_gpu.prefill
    assert memory.compute_dtype_bytes(None, 2) == 2 and memory.compute_dtype_bytes("quantized-float32", 2) == 4
    assert memory.compute_dtype_bytes("bfloat16", 4) == 2
