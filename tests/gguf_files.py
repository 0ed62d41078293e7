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
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_freqs(config: dict) -> np.ndarray:
    """`rope_freqs.weight` as convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors` computes it for a
    config with `rope_scaling.rope_type == "llama3"` (float32 frequencies, the original context read from the
    config's top level with default 8192, as the converter does)."""
    scaling = config["rope_scaling"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (
        np.float32(config.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    )
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
    model_dir: Path,
    path: Path,
    types: dict[str, str] | None = None,
    default_type: str = "F32",
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


# K-quant blocks as llama.cpp packs them (ggml-common.h `block_q2_K` … `block_q6_K`, ggml-quants.c
# `quantize_row_q*_K_ref`): gguf-py dequantizes K-quants but cannot quantize them, so tests build the blocks from
# chosen scales and codes. Every packer takes per-block arrays (n blocks) and returns uint8 (n × block bytes).
QK_K = 256


def _half(values: np.ndarray) -> np.ndarray:
    """float16 scalars per block (n,) → uint8 (n × 2)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float16).reshape(-1, 1)).view(np.uint8)


def pack_q4_k(d, dmin, sc, mn, q, q5: bool = False) -> np.ndarray:
    """block_q4_K {d, dmin, scales[12], qs[128]} (or block_q5_K {d, dmin, scales[12], qh[32], qs[128]} with
    `q5`) from d, dmin (n,), 6-bit sub-block scales `sc` and mins `mn` (n × 8), codes `q` (n × 256, < 16 or
    < 32): weight = d·sc_j·q − dmin·m_j. Scale bytes as `get_scale_min_k4` reads them: bytes 0–3 / 4–7 hold
    scales / mins 0–3 and the top 2 bits of 4–7, bytes 8–11 the low nibbles of scales / mins 4–7."""
    sc, mn, q = (np.asarray(x, dtype=np.uint8) for x in (sc, mn, q))
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    sub = q.reshape(-1, 4, 2, 32)  # chunk c of 64 weights: sub-block 2c in low nibbles, 2c+1 in high
    qs = ((sub[:, :, 0] & 0x0F) | ((sub[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    parts = [_half(d), _half(dmin), scales]
    if q5:
        high = (q.reshape(-1, 8, 32) >> 4) & 1  # qh[l] bit j = fifth bit of weight l of sub-block j
        parts.append((high << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=1).astype(np.uint8))
    return np.concatenate(parts + [qs], axis=1)


def pack_q6_k(d, sc, q) -> np.ndarray:
    """block_q6_K {ql[128], qh[64], scales[16] (int8), d} from d (n,), int8 scales (n × 16) and codes `q`
    (n × 256, 0…63): weight = d·sc_j·(q − 32), sub-blocks of 16. Each half of 128 weights: ql byte b holds the
    low nibbles of weights b (low) and b + 64 (high); qh byte l holds the top 2 bits of weights l, l + 32,
    l + 64, l + 96."""
    q = np.asarray(q, dtype=np.uint8).reshape(-1, 2, 128)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=2).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, np.asarray(sc, dtype=np.int8).view(np.uint8), _half(d)], axis=1)


def pack_q3_k(d, sc, q) -> np.ndarray:
    """block_q3_K {hmask[32], qs[64], scales[12], d} from d (n,), scales (n × 16, −32…31) and codes `q`
    (n × 256, −4…3): weight = d·sc_j·q. q + 4 is stored as 2 low bits (qs, 4 per byte across 32-byte rows) and
    a high bit (hmask bit t of byte l: weight 32t + l); scales + 32 as 6 bits (bytes 0–7 low nibbles, 8–11 top
    2 bits)."""
    u = (np.asarray(sc, dtype=np.int16) + 32).astype(np.uint8)
    scales = np.concatenate(
        [
            (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4),
            ((u >> 4).reshape(-1, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=1).astype(np.uint8),
        ],
        axis=1,
    )
    v = (np.asarray(q, dtype=np.int16) + 4).astype(np.uint8)
    low = (v & 3).reshape(-1, 2, 4, 32)
    qs = (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=2).astype(np.uint8).reshape(-1, 64)
    high = (v >> 2).reshape(-1, 8, 32)
    hmask = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([hmask, qs, scales, _half(d)], axis=1)


def pack_q2_k(d, dmin, sc, mn, q) -> np.ndarray:
    """block_q2_K {scales[16], qs[64], d, dmin} from d, dmin (n,), 4-bit scales and mins (n × 16) and codes
    `q` (n × 256, 0…3): weight = d·sc_j·q − dmin·m_j, sub-blocks of 16; qs as block_q3_K's."""
    scales = (np.asarray(sc, dtype=np.uint8) & 0x0F) | (np.asarray(mn, dtype=np.uint8) << 4)
    low = np.asarray(q, dtype=np.uint8).reshape(-1, 2, 4, 32)
    qs = (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=2).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([scales, qs, _half(d), _half(dmin)], axis=1)


def quantize_k(values: np.ndarray, type_name: str) -> np.ndarray:
    """A simple K-quant quantizer (per-sub-block min-max, not llama.cpp's iterative search) for real weights
    `values` (rows × in_features, a multiple of 256): GGUF tensor bytes (rows × bytes) of `type_name`."""
    rows = values.shape[0]
    x = values.astype(np.float32).reshape(-1, QK_K)
    if type_name in ("Q4_K", "Q5_K"):
        top = 15 if type_name == "Q4_K" else 31
        sub = x.reshape(-1, 8, 32)
        lo = np.minimum(sub.min(axis=-1), 0)
        scale = (sub.max(axis=-1) - lo) / top
        d = np.maximum(scale.max(axis=-1), 1e-12) / 63
        dmin = np.maximum(-lo.min(axis=-1), 1e-12) / 63
        d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(scale / d16[:, None]), 1, 63)
        mn = np.clip(np.rint(-lo / dmin16[:, None]), 0, 63)
        step = (d16[:, None] * sc)[..., None]
        q = np.clip(np.rint((sub + (dmin16[:, None] * mn)[..., None]) / step), 0, top)
        blocks = pack_q4_k(d16, dmin16, sc, mn, q.reshape(-1, QK_K), q5=type_name == "Q5_K")
    elif type_name in ("Q6_K", "Q3_K"):
        top, smax = (32, 127) if type_name == "Q6_K" else (4, 31)
        sub = x.reshape(-1, 16, 16)
        scale = np.abs(sub).max(axis=-1) / top
        d = np.maximum(scale.max(axis=-1), 1e-12) / smax
        d16 = d.astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(scale / d16[:, None]), 1, smax)
        q = np.clip(np.rint(sub / (d16[:, None] * sc)[..., None]), -top, top - 1).reshape(-1, QK_K)
        blocks = pack_q6_k(d16, sc, q + 32) if type_name == "Q6_K" else pack_q3_k(d16, sc, q)
    elif type_name == "Q2_K":
        sub = x.reshape(-1, 16, 16)
        lo = np.minimum(sub.min(axis=-1), 0)
        scale = (sub.max(axis=-1) - lo) / 3
        d = np.maximum(scale.max(axis=-1), 1e-12) / 15
        dmin = np.maximum(-lo.min(axis=-1), 1e-12) / 15
        d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(scale / d16[:, None]), 1, 15)
        mn = np.clip(np.rint(-lo / dmin16[:, None]), 0, 15)
        q = np.clip(np.rint((sub + (dmin16[:, None] * mn)[..., None]) / (d16[:, None] * sc)[..., None]), 0, 3)
        blocks = pack_q2_k(d16, dmin16, sc, mn, q.reshape(-1, QK_K))
    else:
        raise ValueError(type_name)
    return blocks.reshape(rows, -1)


LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the types gguf-py's `quants.quantize` writes


def reencode_gguf(source: Path, target: Path, choose) -> Path:
    """Copy the GGUF `source` to `target` with every tensor for which `choose(name, type_name, shape)` (shape in
    GGML order, fastest dimension first) returns a GGML type name re-encoded to it: dequantized by gguf-py, then
    quantized by gguf-py (LEGACY_TYPES) or `quantize_k`. Metadata is copied as gguf-py's gguf_new_metadata does."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        shape = tuple(int(n) for n in tensor.shape)
        new = choose(tensor.name, kind.name, shape)
        if new is None or new == kind.name:
            if kind.name in ("F32", "F16"):
                writer.add_tensor(tensor.name, np.asarray(tensor.data))
            else:
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=kind)
            continue
        dense = gguf.quants.dequantize(np.asarray(tensor.data), kind).reshape(tuple(reversed(shape)))
        qtype = gguf.GGMLQuantizationType[new]
        raw = gguf.quants.quantize(dense, qtype) if new in LEGACY_TYPES else quantize_k(dense, new)
        writer.add_tensor(tensor.name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def next_token_kl(reference_dir: Path, candidate_dir: Path, prompts: list[str]) -> tuple[float, float]:
    """(mean, max) over every position of `prompts` of KL(p_reference ‖ p_candidate) in nats, the next-token
    distributions of two mlx-lm model directories, both computed in float32 (quantized layers keep their
    codes, their scales and biases cast to float32, as macprovider's `quantized-float32` serves them)."""
    import mlx.core as mx
    from mlx_lm.utils import load

    reference, tokenizer = load(str(reference_dir))
    candidate, _ = load(str(candidate_dir))
    reference.set_dtype(mx.float32)
    candidate.set_dtype(mx.float32)
    kls = []
    for prompt in prompts:
        ids = mx.array([tokenizer.encode(prompt)])
        p = reference(ids)[0].astype(mx.float32)
        q = candidate(ids)[0].astype(mx.float32)
        log_p = p - mx.logsumexp(p, axis=-1, keepdims=True)
        log_q = q - mx.logsumexp(q, axis=-1, keepdims=True)
        kls.append(mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1))
    every = mx.concatenate(kls)
    return every.mean().item(), every.max().item()
