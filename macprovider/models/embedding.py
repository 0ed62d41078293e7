"""Embedding models as models: what kind a model directory is, and how an embedding model pools and normalizes.

    model_kind(path) -> "chat" | "embedding"     which routes a model directory serves
    read_embedding_config(path) -> EmbeddingConfig  pooling, normalization, input limit, dimensions

The sentence-transformers layout (`modules.json` listing a `Pooling` and optionally a `Normalize` module,
`1_Pooling/config.json` with `pooling_mode_*` flags, `sentence_bert_config.json` with `max_seq_length`) is the
source of truth when present, so the served vectors are the ones `SentenceTransformer(path).encode` gives.
Without it an encoder-only checkpoint (`BertModel`, `XLMRobertaModel`, ...) gets mean pooling and L2
normalization, the sentence-transformers defaults. No MLX here: `models list` and the fleet read it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from macprovider.core.errors import ModelError

ModelKind = Literal["chat", "embedding"]
Pooling = Literal["mean", "cls", "max", "lasttoken"]

# Encoder-only architectures (config.json `model_type`) that cannot generate text: an embedding model even
# without sentence-transformers files.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "nomic_bert", "modernbert"})
# sentence-transformers Pooling flags (sentence_transformers/models/Pooling.py) → our pooling names.
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _modules(path: Path) -> list[dict[str, Any]] | None:
    data = _read_json(Path(path) / "modules.json")
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else None


def model_kind(path: Path) -> ModelKind:
    """`"embedding"` when the model directory is a sentence-transformers model (a `modules.json` with a
    Pooling module) or an encoder-only checkpoint (config.json `model_type` in ENCODER_MODEL_TYPES);
    `"chat"` otherwise (what mlx-lm generates with). Never raises: an unreadable directory is `"chat"`, whose
    loader reports the problem."""
    modules = _modules(Path(path))
    if modules and any(str(m.get("type", "")).endswith("Pooling") for m in modules):
        return "embedding"
    config = _read_json(Path(path) / "config.json")
    if isinstance(config, dict) and str(config.get("model_type", "")).lower() in ENCODER_MODEL_TYPES:
        return "embedding"
    return "chat"


@dataclass(frozen=True)
class EmbeddingConfig:
    """How an embedding model turns token states into one vector.

    pooling: `mean` over non-padding tokens, `cls` (first token), `max` (element-wise over tokens) or
        `lasttoken` (the final non-padding token, decoder embedding models).
    normalize: L2-normalize the pooled vector (a sentence-transformers `Normalize` module).
    max_tokens: the longest input, special tokens included (`max_seq_length` of sentence_bert_config.json,
        else the tokenizer's `model_max_length`, else config.json `max_position_embeddings`).
    dimensions: the length of a vector (config.json `hidden_size`, or the Pooling config's
        `word_embedding_dimension`).
    matryoshka_dimensions: the shorter lengths the model was trained to be cut to (`dimensions` in a request),
        from `matryoshka_dimensions` in config_sentence_transformers.json or config.json; empty = none.
    """

    pooling: Pooling
    normalize: bool
    max_tokens: int
    dimensions: int
    matryoshka_dimensions: tuple[int, ...] = ()


def read_embedding_config(path: Path) -> EmbeddingConfig:
    """The pooling, normalization, input limit and vector length of the embedding model at `path`.

    Raises ModelError when config.json is unreadable or the pooling config asks for a mode this server does
    not implement (e.g. `pooling_mode_weightedmean_tokens`)."""
    path = Path(path)
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ModelError(f"cannot read config.json of embedding model at {path.name}")
    modules = _modules(path) or []
    pooling: Pooling = "mean"
    dimensions = int(config.get("hidden_size") or config.get("d_model") or 0)
    pooling_module = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling_module is not None:
        pool_config = _read_json(path / str(pooling_module.get("path", "")) / "config.json") or {}
        chosen = [name for flag, name in _POOLING_FLAGS.items() if pool_config.get(flag)]
        unknown = [k for k, v in pool_config.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_FLAGS]
        if unknown or len(chosen) > 1:
            raise ModelError(
                f"embedding model {path.name}: pooling {', '.join(unknown or chosen)} is not supported "
                "(one of mean, cls, max, lasttoken)"
            )
        if chosen:
            pooling = chosen[0]  # type: ignore[assignment]
        dimensions = int(pool_config.get("word_embedding_dimension") or dimensions)
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) if modules else True
    limits = [
        (_read_json(path / "sentence_bert_config.json") or {}).get("max_seq_length"),
        (_read_json(path / "tokenizer_config.json") or {}).get("model_max_length"),
        config.get("max_position_embeddings"),
    ]
    max_tokens = next((int(v) for v in limits if isinstance(v, int) and 0 < v < 10**7), 512)
    matryoshka: Any = (_read_json(path / "config_sentence_transformers.json") or {}).get("matryoshka_dimensions")
    matryoshka = matryoshka or config.get("matryoshka_dimensions") or ()
    dims = tuple(sorted({int(d) for d in matryoshka if isinstance(d, int) and 0 < d <= dimensions}))
    if dimensions <= 0:
        raise ModelError(f"embedding model {path.name}: config.json states no hidden_size")
    return EmbeddingConfig(pooling, normalize, max_tokens, dimensions, dims)
