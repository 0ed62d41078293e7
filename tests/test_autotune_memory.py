"""Memory pre-check and pre-warm integrity checks on real safetensors / Hub-cache layouts (§5.5, §5.6)."""

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
        json.dumps({"metadata": {"total_size": 999}, "weight_map": {
            "w": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
            "u": "model-00002-of-00002.safetensors"}})
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
    shape = KvShape.from_config({"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "hidden_size": 3584, "torch_dtype": "bfloat16"})
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes) == (28, 4, 128, 2)
    assert kv_bytes(shape, 1000, None) == 2 * 28 * 4 * 128 * 2 * 1000
    assert kv_bytes(shape, 1000, 8) == int(2 * 28 * 4 * 128 * 1.0625 * 1000)
    assert kv_bytes(shape, 1000, 4) == int(2 * 28 * 4 * 128 * 0.5625 * 1000)


@pytest.fixture(scope="module")
def model_src(tmp_path_factory) -> Path:
    return build_model_files(tmp_path_factory.mktemp("src"), TinyModelSpec(hidden_size=64, num_attention_heads=1))


def test_memory_precheck_rejects_quickly_without_loading(model_src):
    config = json.loads((model_src / "config.json").read_text())
    est = memory.estimate(model_src, config, max_context=100_000, max_batch=2, kv_bits=None, budget=memory.OVERHEAD_BYTES)
    assert not est.fits and est.note().startswith("memory estimate ")
    assert est.weights == (model_src / "model.safetensors").stat().st_size - 8 - struct.unpack(
        "<Q", (model_src / "model.safetensors").read_bytes()[:8])[0]
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
