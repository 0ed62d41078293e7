"""Tiny random-weight chat models, built locally, for tests and offline demos (SPEC.md §9).

`build_model_files(directory, ...)` writes a complete mlx-lm model directory: `config.json` (a llama),
random weights in `model.safetensors`, a byte-level BPE tokenizer trained with `tokenizers` on a small
built-in text, and a `tokenizer_config.json` whose ChatML `chat_template` and `eos_token` make it a chat
model. `install_in_hub_cache(...)` places those files in the Hugging Face Hub cache layout
(`models--org--name/{blobs,refs/main,snapshots/<rev>/…}`), blobs named as the Hub names them (sha256 for
LFS files, git blob sha1 for the rest), so `huggingface_hub` + `mlx_lm.load` run unchanged with
`HF_HUB_OFFLINE=1`.

The output of a random-weight model is gibberish, but it is deterministic under greedy decoding and it
exercises the real tokenizer, chat template, KV cache and sampling paths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEMO_MODEL_ID = "macprovider-demo/tiny-chat"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A local provider serves a language model on the machine
you own: prompts never leave it, answers stream back token by token, and the cache of keys and values
grows with every token of context. Apple silicon shares one pool of memory between the processor and
the graphics cores, so the largest model that fits is a question of bytes: weights, the KV cache, and
what the operating system keeps for itself. Continuous batching lets several requests decode together;
each step reads the weights once and produces one token for every sequence in the batch.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Code: def main(): return {"ok": true, "items": [1, 2, 3]}
Write a short poem about the sea. The sea is wide, the sea is deep, it sings the sailors off to sleep.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny llama. head_dim = hidden_size / num_attention_heads must be a multiple of 64
    so the KV cache can be quantized with group size 64 (mx.quantize)."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    seed: int = 0
    # float32: MLX's CPU backend runs float16 quantized_matmul (the kv-bits attention path) ~25x slower
    # than float32. With float16 weights (as real checkpoints) KV bytes under kv-bits are ~53 % / ~28 % of
    # full precision; with float32 they are ~28 % / ~16 %.
    dtype: str = "float32"
    # Standard deviation of the attention scores q·k/sqrt(head_dim) at initialisation. q_proj and k_proj
    # weights get std sqrt(attention_score_std / hidden_size) (inputs have unit RMS after RMSNorm, so
    # q·k/sqrt(d) has std ≈ std_q · std_k · hidden_size). With every weight at std 0.02 the scores are ~0.05:
    # attention is uniform, the keys do not matter, and a test could not tell a damaged KV cache apart.
    attention_score_std: float = 2.0


def train_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the built-in corpus; special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer


def build_model_files(directory: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a tiny llama chat model into `directory` (created). Returns the directory.

    Files: config.json, model.safetensors (`spec.dtype`, seeded by `spec.seed`: random normal × 0.02,
    q_proj/k_proj scaled for `spec.attention_score_std`, norm gains 1), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id("<|im_end|>")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": False,
        "eos_token_id": eos_id,
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "torch_dtype": spec.dtype,
    }
    mx.random.seed(spec.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    query_key_std = math.sqrt(spec.attention_score_std / spec.hidden_size)

    def initial(name: str, shape) -> mx.array:
        if name.endswith("norm.weight"):  # RMSNorm gains start at 1, as in a trained model
            return mx.ones(shape)
        std = query_key_std if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.02
        return mx.random.normal(shape) * std

    weights = {name: initial(name, value.shape).astype(getattr(mx, spec.dtype)) for name, value in tree_flatten(model.parameters())}
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": spec.max_position_embeddings,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHATML_TEMPLATE,
            },
            indent=2,
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2)
    )
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id]}, indent=2))
    return directory


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".gguf", ".npz"))


def install_in_hub_cache(source: Path, repo_id: str, cache_dir: Path | None = None) -> Path:
    """Copy a model directory into the Hub cache as `repo_id`; returns the snapshot directory.

    LFS-like files (safetensors) go to blobs named by their sha256, others by their git blob sha1, as the
    Hub names them, so `macprovider models verify` can check them. Idempotent for identical content.
    """
    from macprovider.models.ids import hub_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(source).iterdir() if p.is_file())
    digests = {}
    for path in files:
        data = path.read_bytes()
        digests[path.name] = hashlib.sha256(data).hexdigest() if _is_lfs(path.name) else _git_blob_sha1(data)
    revision = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = repo_dir / "blobs" / digests[path.name]
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def create_demo_model(
    repo_id: str = DEMO_MODEL_ID, spec: TinyModelSpec = TinyModelSpec(), cache_dir: Path | None = None
) -> Path:
    """Build a tiny model and install it in the Hub cache as `repo_id`. Returns the snapshot path."""
    with tempfile.TemporaryDirectory(prefix="macprovider-demo-") as tmp:
        build_model_files(Path(tmp), spec)
        return install_in_hub_cache(Path(tmp), repo_id, cache_dir)
