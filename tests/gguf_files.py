"""Write small GGUF files the way llama.cpp's converter does (convert_hf_to_gguf.py), for importer tests.

`write_llama_gguf(model_dir, path, types)` turns a tiny mlx-lm llama directory (macprovider.models.demo's
`build_model_files`) into a GGUF: llama.cpp tensor names, q/k rows permuted for interleaved RoPE
(`LlamaModel.permute`), tensors quantized with the `gguf` package (llama.cpp's reference Python code), and the
byte-level BPE vocabulary, merges, token types, special ids and chat template as `tokenizer.ggml.*` metadata,
and a Llama 3 `rope_scaling` as the `rope_freqs.weight` tensor (`LlamaModel.generate_extra_tensors`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        index, _, rest = module.removeprefix("model.layers.").partition(".")
        return f"blk.{index}.{HF_TO_GGUF[rest]}.{suffix}"
    return f"{HF_TO_GGUF[module]}.{suffix}"


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_freqs(config: dict) -> np.ndarray:
    """`rope_freqs.weight` as convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors` computes it for a
    config with `rope_scaling.rope_type == "llama3"` (float32 frequencies, the original context read from the
    config's top level with default 8192, as the converter does)."""
    scaling = config["rope_scaling"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (np.float32(config.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = config.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def write_llama_gguf(
    model_dir: Path, path: Path, types: dict[str, str] | None = None, default_type: str = "F32",
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """Write `model_dir` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) as a GGUF.
    `types` maps GGUF module names (e.g. "token_embd", "ffn_down", "output") to a GGML type name; 2-D tensors not named
    get `default_type`, 1-D tensors (norms) stay F32. `rope_freqs` replaces the `rope_freqs.weight` tensor the
    config's llama3 `rope_scaling` would give (to write a file no converter writes)."""
    import gguf
    import mlx.core as mx

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    arch = config["model_type"]  # llama, qwen2 or qwen3
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny test {arch}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if "head_dim" in config:  # TextModel.set_gguf_parameters
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tokenizer["added_tokens"] if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_config["chat_template"])
    if rope_freqs is None and (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        rope_freqs = llama3_rope_freqs(config)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    types = types or {}
    weights = mx.load(str(model_dir / "model.safetensors"))
    for hf_name in sorted(weights):
        name = gguf_name(hf_name)
        array = np.array(weights[hf_name].astype(mx.float32))
        # llama only: qwen2 / qwen3 run NEOX RoPE in llama.cpp and are not permuted
        if arch == "llama" and ".attn_q." in name:
            array = permute(array, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            array = permute(array, config["num_key_value_heads"])
        module = name.rpartition(".")[0].rpartition(".")[2]  # blk.0.ffn_down.weight → ffn_down
        kind = "F32" if array.ndim == 1 else types.get(module, default_type)
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
