"""`macprovider models import` (README.md#models) on small GGUF files written like llama.cpp's converter writes them
(tests/gguf_files.py): exact round trip of float tensors (q/k un-permuted), quantized tensors kept with
per-layer bits, the tokenizer rebuilt from metadata, bad input, and Ollama's manifest tree."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from macprovider.models import gguf as importer
from macprovider.models.demo import TinyModelSpec, build_model_files
from tests.gguf_files import (
    LEGACY_TYPES,
    llama3_rope_freqs,
    next_token_kl,
    pack_q2_k,
    pack_q3_k,
    pack_q4_k,
    pack_q6_k,
    reencode_gguf,
    write_llama_gguf,
)

PROMPT_IDS = [5, 17, 42, 99, 7, 300, 12, 64]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return build_model_files(tmp_path_factory.mktemp("gguf-src"), TinyModelSpec(seed=3))


@pytest.fixture(scope="module")
def f32_gguf(tiny_source, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_source, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def quant_gguf(tiny_source, tmp_path_factory) -> Path:
    """Q8_0 embedding, Q5_0 down projections, Q4_1 output, Q4_0 elsewhere."""
    return write_llama_gguf(
        tiny_source,
        tmp_path_factory.mktemp("gguf") / "tiny-q4.gguf",
        types={"token_embd": "Q8_0", "ffn_down": "Q5_0", "output": "Q4_1"},
        default_type="Q4_0",
    )


def logits(model_dir: Path):
    import mlx.core as mx
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    return model(mx.array([PROMPT_IDS]))[0].astype(mx.float32), tokenizer


def run_cli(*args):
    from typer.testing import CliRunner

    from macprovider.cli import app

    return CliRunner().invoke(app, list(args))


def test_float_gguf_imports_exactly(f32_gguf, tiny_source, hf_home):
    """An F32 GGUF with llama.cpp's q/k permutation imports to the same logits as the source model."""
    import mlx.core as mx

    result = importer.import_gguf(f32_gguf, "gguf-test/tiny-f32", dtype="float32", cache_dir=hf_home / "hub")
    assert result.quantization is None and result.dtype == "float32" and result.architecture == "llama"
    imported, tokenizer = logits(result.snapshot)
    reference, reference_tokenizer = logits(tiny_source)
    assert mx.abs(imported - reference).max().item() < 1e-4
    text = "Hello! What is the capital of France? def main(): return 1000"
    assert tokenizer.encode(text) == reference_tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    ) == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.eos_token == "<|im_end|>"


def test_without_unpermuting_the_logits_differ(tiny_source, f32_gguf):
    """The un-permutation matters: a model whose q/k rows keep llama.cpp's order computes other logits."""
    import mlx.core as mx

    arrays = mx.load(str(f32_gguf))
    config = json.loads((tiny_source / "config.json").read_text())
    q = arrays["blk.0.attn_q.weight"]
    assert not mx.array_equal(q, importer.unpermute_rows(q, config["num_attention_heads"]))
    reference = mx.load(str(tiny_source / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert mx.array_equal(importer.unpermute_rows(q, config["num_attention_heads"]), reference)


def test_quantized_gguf_keeps_quantization_per_layer(quant_gguf, hf_home):
    """Q4_0/Q4_1/Q5_0/Q8_0 stay quantized as they are (bits per layer in the config); the logits equal those of
    the same file dequantized to float32, within float16 rounding."""
    import mlx.core as mx

    quantized = importer.import_gguf(quant_gguf, "gguf-test/tiny-q4", cache_dir=hf_home / "hub")
    dense = importer.import_gguf(quant_gguf, "gguf-test/tiny-q4-f32", dtype="float32", cache_dir=hf_home / "hub")
    q = quantized.quantization
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["model.embed_tokens"]["bits"] == 8
    assert all(q[f"model.layers.{i}.mlp.down_proj"]["bits"] == 5 for i in range(2))
    assert "lm_head" not in q  # Q4_1: 4 bits like the rest
    assert quantized.tensor_types == {"F32": 5, "Q8_0": 1, "Q4_0": 12, "Q5_0": 2, "Q4_1": 1}
    config = json.loads((quantized.snapshot / "config.json").read_text())
    assert config["quantization"] == q and config["torch_dtype"] == "float16"
    quantized_logits, _ = logits(quantized.snapshot)
    dense_logits, _ = logits(dense.snapshot)
    print("max |logit difference| auto vs float32:", mx.abs(quantized_logits - dense_logits).max().item())
    assert mx.abs(quantized_logits - dense_logits).max().item() < 0.05


def test_cli_import_json_list_verify_and_existing_id(f32_gguf, hf_home):
    result = run_cli("models", "import", str(f32_gguf), "--id", "gguf-test/cli", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["id"] == "gguf-test/cli" and payload["architecture"] == "llama"
    assert payload["tensor_types"] == {"F32": 21}
    assert run_cli("models", "verify", "gguf-test/cli").exit_code == 0
    listed = json.loads(run_cli("models", "list", "--json").stdout)
    assert "gguf-test/cli" in [m["id"] for m in listed["models"]]
    again = run_cli("models", "import", str(f32_gguf), "--id", "gguf-test/cli")
    assert again.exit_code == 1 and "already in the cache" in again.stderr and "Traceback" not in again.stderr


def _cache_entries(hub: Path) -> set[str]:
    return {p.name for p in hub.iterdir()} if hub.exists() else set()


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-gguf", "not a GGUF file"),
        ("truncated", "truncated or corrupt"),
        ("missing", "no such file"),
        ("architecture", "architecture 'gpt2' is not supported"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(case, message, f32_gguf, tmp_path, monkeypatch):
    import gguf

    path = tmp_path / f"{case}.gguf"
    if case == "not-gguf":
        path.write_text("hello, not a model\n")
    elif case == "truncated":
        path.write_bytes(f32_gguf.read_bytes()[: f32_gguf.stat().st_size * 2 // 3])
    elif case == "architecture":
        writer = gguf.GGUFWriter(str(path), "gpt2")
        writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 32), dtype="float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = _cache_entries(hub)
    result = run_cli("models", "import", str(path), "--id", "gguf-test/bad")
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _cache_entries(hub) == before  # no repo, no temporary directory left behind


def test_from_ollama_finds_the_blob_through_the_manifest(f32_gguf, tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    digest = hashlib.sha256(f32_gguf.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    os.link(f32_gguf, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q4"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 3},
                    {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
                ],
            }
        )
    )
    env = {"OLLAMA_MODELS": str(store)}
    assert importer.ollama_gguf_path("tiny:q4", env) == store / "blobs" / f"sha256-{digest}"
    assert importer.ollama_repo_id("tiny:q4") == "ollama/tiny-q4"
    with pytest.raises(importer.GGUFImportError, match="not found"):
        importer.ollama_gguf_path("tiny", env)  # :latest has no manifest
    with pytest.raises(importer.GGUFImportError, match="invalid Ollama model"):
        importer.ollama_gguf_path("../../etc:passwd", env)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    result = run_cli("models", "import", "--from-ollama", "tiny:q4", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["id"] == "ollama/tiny-q4"


def test_repacked_blocks_equal_mlx_own_gguf_reader(tiny_source, tmp_path):
    """Q4_0 / Q4_1 / Q8_0 blocks repack to exactly the arrays MLX's own GGUF reader (`mx.load`) produces."""
    import mlx.core as mx
    import numpy as np

    path = write_llama_gguf(
        tiny_source, tmp_path / "mixed.gguf", types={"token_embd": "Q8_0", "output": "Q4_1"}, default_type="Q4_0"
    )
    reference = mx.load(str(path))
    _, tensors = importer.read_gguf(path)
    checked = 0
    for name, tensor in tensors.items():
        affine = importer.mlx_affine_from_ggml(np.asarray(tensor.data), tensor.tensor_type.name)
        if affine is None:
            continue
        base = name.removesuffix(".weight")
        for ours, theirs in zip(affine, (reference[name], reference[f"{base}.scales"], reference[f"{base}.biases"])):
            assert ours.dtype == theirs.dtype and mx.array_equal(ours, theirs), name
        checked += 1
    assert checked == 16


LLAMA_3_2_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
UNPUBLISHED_ROPE = {
    "rope_type": "llama3",
    "factor": 16.0,
    "low_freq_factor": 0.5,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 8192,
}


def _with_rope_scaling(source: Path, destination: Path, rope_scaling: dict | None) -> Path:
    """A copy of the tiny model directory whose config has Llama 3's rope_theta and `rope_scaling`."""
    import shutil

    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(rope_theta=500000.0, max_position_embeddings=131072)
    if rope_scaling is None:
        config.pop("rope_scaling", None)
    else:
        config["rope_scaling"] = rope_scaling
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("rope_scaling", [LLAMA_3_2_ROPE, UNPUBLISHED_ROPE], ids=["llama-3.2", "solved"])
def test_llama3_rope_freqs_become_rope_scaling(rope_scaling, tiny_source, tmp_path, hf_home):
    """A Llama 3.x GGUF carries its RoPE scaling only as llama.cpp's `rope_freqs.weight` tensor: the import
    recovers the `rope_scaling` (Meta's published set, or solved from the tensor) and the model computes the
    logits of an mlx-lm model built from the same weights with that rope_scaling, over 300 positions — where
    the same weights without the scaling compute other logits."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load

    source = _with_rope_scaling(tiny_source, tmp_path / "src", rope_scaling)
    path = write_llama_gguf(source, tmp_path / "llama3.gguf")
    _, tensors = importer.read_gguf(path)
    assert "rope_freqs.weight" in tensors
    result = importer.import_gguf(
        path, f"gguf-test/llama3-rope-{rope_scaling['factor']:g}", dtype="float32", cache_dir=hf_home / "hub"
    )
    config = json.loads((result.snapshot / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"] == pytest.approx(rope_scaling)
    assert config["head_dim"] == 64 and config["rope_theta"] == 500000.0
    assert np.allclose(
        importer.llama3_rope_factors(config["rope_scaling"], 64, 500000.0),
        llama3_rope_freqs(json.loads((source / "config.json").read_text())),
        rtol=1e-6,
    )

    prompt = mx.array([[(7 * i + 3) % 500 for i in range(300)]])
    ours = load(str(result.snapshot))[0](prompt)[0].astype(mx.float32)
    reference = load(str(source))[0](prompt)[0].astype(mx.float32)
    unscaled = load(str(_with_rope_scaling(tiny_source, tmp_path / "plain", None)))[0](prompt)[0].astype(mx.float32)
    assert mx.abs(ours - reference).max().item() < 1e-4
    assert mx.abs(unscaled - reference).max().item() > 1e-2


def test_rope_freqs_that_no_llama3_scaling_fits_are_refused(tiny_source, tmp_path, monkeypatch):
    """A `rope_freqs` tensor no llama3 parameters regenerate: one line naming it, exit 1, nothing in the cache."""
    import numpy as np

    source = _with_rope_scaling(tiny_source, tmp_path / "src", LLAMA_3_2_ROPE)
    factors = llama3_rope_freqs(json.loads((source / "config.json").read_text()))
    path = write_llama_gguf(source, tmp_path / "odd.gguf", rope_freqs=factors[::-1].copy())  # low → high reversed
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_cli("models", "import", str(path), "--id", "gguf-test/odd-rope")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "rope_freqs.weight" in result.stderr and "matches no Llama 3 RoPE scaling" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _cache_entries(hub) == set()
    assert importer.llama3_rope_scaling(np.ones(32), 64, 500000.0) is None  # all ones: no scaling at all


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_imports_exactly(arch, tiny_source, tmp_path, hf_home):
    """qwen2 (q/k/v biases, tied embeddings: no output.weight) and qwen3 (q_norm / k_norm, head_dim 32 ≠
    hidden / heads, from attention.key_length) GGUFs, unpermuted as llama.cpp writes them, import to the
    logits of the mlx-lm model they were written from."""
    import importlib
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    source = tmp_path / arch
    shutil.copytree(tiny_source, source)
    config = json.loads((source / "config.json").read_text())
    config.update(
        model_type=arch,
        architectures=[f"{arch.capitalize()}ForCausalLM"],
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    )
    if arch == "qwen3":
        config["head_dim"] = 32
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(5)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = {
        k: (
            mx.random.normal(v.shape) * (0.3 if k.endswith(("q_proj.weight", "k_proj.weight")) else 0.05)
            + (1 if "norm" in k else 0)
        )
        for k, v in tree_flatten(model.parameters())
    }
    assert any(k.endswith("q_proj.bias") for k in weights) == (arch == "qwen2")
    assert any(k.endswith("self_attn.q_norm.weight") for k in weights) == (arch == "qwen3")
    mx.save_safetensors(str(source / "model.safetensors"), weights, metadata={"format": "mlx"})
    (source / "config.json").write_text(json.dumps(config))

    path = write_llama_gguf(source, tmp_path / f"{arch}.gguf")
    result = importer.import_gguf(path, f"gguf-test/tiny-{arch}", dtype="float32", cache_dir=hf_home / "hub")
    imported = json.loads((result.snapshot / "config.json").read_text())
    assert imported["model_type"] == arch and imported["tie_word_embeddings"] is True
    if arch == "qwen3":
        assert imported["head_dim"] == 32
    prompt = mx.array([PROMPT_IDS * 4])
    ours = load(str(result.snapshot))[0](prompt)[0]
    reference = load(str(source))[0](prompt)[0]
    assert mx.abs(ours - reference).max().item() < 1e-4


# --- repacking each GGML block type, compared with gguf-py's own dequantization -------------------------------

ROWS, COLUMNS = 8, 512


def _k_blocks(type_name: str, rng):
    """Random K-quant rows (ROWS × bytes) packed as llama.cpp's block layouts, and the weights those scales and
    codes stand for (ROWS × COLUMNS, float64), computed from the arrays themselves, not from any decoder."""
    import numpy as np

    n = ROWS * COLUMNS // 256
    d = rng.uniform(1e-4, 1e-2, n).astype(np.float16).astype(np.float64)
    dmin = rng.uniform(1e-4, 1e-2, n).astype(np.float16).astype(np.float64)
    if type_name in ("Q4_K", "Q5_K"):
        sc, mn = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
        q = rng.integers(0, 16 if type_name == "Q4_K" else 32, (n, 256))
        raw = pack_q4_k(d, dmin, sc, mn, q, q5=type_name == "Q5_K")
        values = d[:, None, None] * sc[..., None] * q.reshape(n, 8, 32) - (dmin[:, None] * mn)[..., None]
    elif type_name == "Q6_K":
        sc, q = rng.integers(-128, 128, (n, 16)), rng.integers(0, 64, (n, 256))
        raw = pack_q6_k(d, sc, q)
        values = d[:, None, None] * sc[..., None] * (q.reshape(n, 16, 16) - 32)
    elif type_name == "Q3_K":
        sc, q = rng.integers(-32, 32, (n, 16)), rng.integers(-4, 4, (n, 256))
        raw = pack_q3_k(d, sc, q)
        values = d[:, None, None] * sc[..., None] * q.reshape(n, 16, 16)
    else:
        sc, mn, q = rng.integers(0, 16, (n, 16)), rng.integers(0, 16, (n, 16)), rng.integers(0, 4, (n, 256))
        raw = pack_q2_k(d, dmin, sc, mn, q)
        values = d[:, None, None] * sc[..., None] * q.reshape(n, 16, 16) - (dmin[:, None] * mn)[..., None]
    return raw.reshape(ROWS, -1), values.reshape(ROWS, COLUMNS)


def _blocks(type_name: str, seed: int = 0):
    """(raw GGUF rows of `type_name`, gguf-py's float32 dequantization of them)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    if type_name in LEGACY_TYPES:
        weights = rng.normal(0, 0.05, (ROWS, COLUMNS)).astype(np.float32)
        raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[type_name])
    else:
        raw, values = _k_blocks(type_name, rng)
        # the packer is llama.cpp's layout: gguf-py reads back the scales and codes it was given
        reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
        assert np.allclose(reference, values, rtol=1e-6, atol=1e-7), type_name
    return raw, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", importer.EXACT_TYPES + ("Q3_K",))
def test_exact_types_repack_to_gguf_py_values(type_name):
    """Q4_0 … Q8_0 (quantized by gguf-py) and Q4_K / Q5_K / Q3_K (random scales and codes in llama.cpp's
    layout): `mx.dequantize` of the repacked tensor equals gguf-py's `dequantize`, max |difference| 0, at the
    file's own bits (Q3_K: 8); scales are float16 where they round-trip (legacy types), else float32."""
    import mlx.core as mx
    import numpy as np

    raw, reference = _blocks(type_name)
    packed, scales, biases = importer.mlx_affine_from_ggml(raw, type_name)
    bits = packed.shape[-1] * 32 // COLUMNS
    assert bits == {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q3_K": 8}[type_name]
    assert scales.dtype == (mx.float16 if type_name in LEGACY_TYPES else mx.float32)
    scales32, biases32 = scales.astype(mx.float32), biases.astype(mx.float32)
    ours = np.array(mx.dequantize(packed, scales32, biases32, group_size=32, bits=bits))
    assert np.abs(ours - reference).max() == 0.0
    if scales.dtype == mx.float16:  # computed in float16: scale·q and the sum round, each by ≤ 2^-11 relative
        native = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits).astype(mx.float32))
        s, b = np.abs(np.array(scales.astype(mx.float32))), np.abs(np.array(biases.astype(mx.float32)))
        bound = np.repeat(2.0**-10 * (s * (2**bits - 1) + b), 32, axis=-1)
        assert (np.abs(native - reference) <= bound).all()


@pytest.mark.parametrize("type_name", ["Q6_K", "Q2_K"])
def test_sixteen_wide_types_are_the_nearest_8_bit_grid(type_name):
    """Q6_K / Q2_K scale 16-wide sub-blocks, which one MLX group of 32 holds only approximately: 8 bits, each
    weight within (max − min) / 382 of gguf-py's value (/ 510 for Q2_K's min-max grids), a smaller error than
    `mx.quantize` at 8 bits gives the same values, and exact where the two halves share one lattice."""
    import gguf
    import mlx.core as mx
    import numpy as np

    raw, reference = _blocks(type_name)
    groups = importer.ggml_affine_groups(raw, type_name)
    assert groups.bits == 8 and groups.groups == ROWS * COLUMNS // 32
    packed, scales, biases = importer.mlx_affine_from_ggml(raw, type_name)
    ours = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=8))
    grouped, error = reference.reshape(ROWS, -1, 32), np.abs(ours - reference).reshape(ROWS, -1, 32)
    bound = (grouped.max(axis=-1) - grouped.min(axis=-1)) / (382 if type_name == "Q6_K" else 510)
    assert (error.max(axis=-1) <= bound * (1 + 1e-5) + 1e-9).all()
    plain = mx.dequantize(*mx.quantize(mx.array(reference), group_size=32, bits=8), group_size=32, bits=8)
    assert np.sqrt((error**2).mean()) < np.sqrt(((np.array(plain) - reference) ** 2).mean())

    # a super-block whose sub-blocks share one scale is d·sc·(q − 32): exact at 8 bits (6 would do)
    shared = raw.reshape(-1, 210 if type_name == "Q6_K" else 84).copy()
    if type_name == "Q6_K":
        shared[:, 192:208] = shared[:, 192:193]
    else:
        shared[:, 0:16] = shared[:, 0:1]
    shared = shared.reshape(ROWS, -1)
    expected = gguf.quants.dequantize(shared, gguf.GGMLQuantizationType[type_name])
    packed, scales, biases = importer.mlx_affine_from_ggml(shared, type_name)
    assert np.array_equal(np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=8)), expected)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_quant_layers_import_and_compute_the_file(type_name, tiny_source, tmp_path, hf_home):
    """A GGUF whose down projections (256 inputs: one K super-block per row) are `type_name`, Q4_0 elsewhere,
    imports quantized (K layers at their own bits, or 8 for 16-wide types) and computes, in float32, the logits
    of the same file dequantized to float32 by the importer: equal within 1e-4 for the exact types."""
    import mlx.core as mx
    from mlx_lm.utils import load

    base = write_llama_gguf(tiny_source, tmp_path / "base.gguf", default_type="Q4_0")
    path = reencode_gguf(
        base, tmp_path / f"{type_name}.gguf", lambda name, kind, shape: type_name if ".ffn_down." in name else None
    )
    repo_id, hub = f"gguf-test/k-{type_name.lower()}", hf_home / "hub"
    quantized = importer.import_gguf(path, repo_id, cache_dir=hub)
    dense = importer.import_gguf(path, repo_id + "-f32", dtype="float32", cache_dir=hub)
    assert quantized.tensor_types[type_name] == 2
    bits = {"Q4_K": 4, "Q5_K": 5}.get(type_name, 8)
    layers = [quantized.quantization.get(f"model.layers.{i}.mlp.down_proj", quantized.quantization) for i in range(2)]
    assert [layer["bits"] for layer in layers] == [bits, bits]
    ours = load(str(quantized.snapshot))[0]
    ours.set_dtype(mx.float32)
    prompt = mx.array([PROMPT_IDS])
    difference = mx.abs(ours(prompt)[0] - load(str(dense.snapshot))[0](prompt)[0]).max().item()
    assert difference < (1e-4 if type_name in importer.EXACT_TYPES + ("Q3_K",) else 0.05)


@pytest.mark.real_model
def test_demo_model_reencoded_to_q5_1_imports_exactly(smollm2_gguf, tmp_path, hf_home):
    """SmolLM2-135M (the demo GGUF) re-encoded to Q5_1 by gguf-py imports at 5 bits with float16 scales, no
    bigger than the file's tensors, with mean next-token KL ≤ 0.002 nats against gguf-py's float32
    dequantization of the same file (both computed in float32)."""
    path = reencode_gguf(
        smollm2_gguf, tmp_path / "smollm2-q5_1.gguf", lambda name, kind, shape: "Q5_1" if len(shape) == 2 else None
    )
    _, tensors = importer.read_gguf(path)
    quantized = importer.import_gguf(path, "gguf-test/smollm2-q5_1", cache_dir=hf_home / "hub")
    dense = importer.import_gguf(path, "gguf-test/smollm2-q5_1-f32", dtype="float32", cache_dir=hf_home / "hub")
    assert quantized.quantization == {"group_size": 32, "bits": 5, "mode": "affine"}
    import mlx.core as mx

    stored = mx.load(str(quantized.snapshot / "model.safetensors"))
    for name, tensor in tensors.items():  # every Q5_1 matrix: 5-bit codes + float16 scale and bias = 6 bits/weight
        if tensor.tensor_type.name == "Q5_1":
            module = importer.hf_tensor_name(name).rpartition(".")[0]
            assert sum(stored[f"{module}.{part}"].nbytes for part in ("weight", "scales", "biases")) == tensor.n_bytes
    assert sum(array.nbytes for array in stored.values()) <= sum(int(t.n_bytes) for t in tensors.values())
    mean, worst = next_token_kl(
        dense.snapshot,
        quantized.snapshot,
        [
            "The capital of France is Paris, and the capital of Germany is",
            "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
        ],
    )
    print(f"Q5_1 import: next-token KL mean {mean:.2e}, max {worst:.2e} nats")
    assert mean <= 0.002 and worst <= 0.01
