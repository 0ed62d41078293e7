"""A BERT encoder in MLX, the architecture of sentence-transformers' MiniLM / mpnet-style embedding models.

    model = load_bert(path, dtype)                      weights from the checkpoint's safetensors
    states = model(input_ids, attention_mask)           (batch, tokens, hidden) last hidden states
    pool(states, attention_mask, pooling, normalize)    (batch, hidden) sentence vectors

The layer follows Hugging Face's `BertModel` (transformers/models/bert/modeling_bert.py), post-LayerNorm:
embeddings = LayerNorm(word + position + token_type); per layer
    h = LayerNorm(x + W_o · softmax(QKᵀ/√d_head + mask) V);  out = LayerNorm(h + W_2 · gelu(W_1 · h)),
with the exact (erf) GELU of `hidden_act: "gelu"`. Module and parameter names match the checkpoint's
(`encoder.layer.N.attention.self.query.weight`, ...), so the safetensors load as they are. mlx-embeddings
(PyPI) has the same model but pulls in mlx-vlm (OpenCV, datasets, mlx-audio) and a newer transformers than
this project pins, so the encoder is kept here, small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from macprovider.core.errors import ModelError

MASK_VALUE = -1e9  # additive attention mask for padding keys (finite: a row of all padding stays NaN-free)


@dataclass(frozen=True)
class BertConfig:
    """The config.json fields a BERT encoder needs (Hugging Face `BertConfig` names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BertConfig:
        """Raises ModelError for a model type or activation this encoder does not implement."""
        if str(config.get("model_type", "")).lower() != "bert":
            raise ModelError(f"embedding model type {config.get('model_type')!r} is not supported (BERT encoders only)")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"position_embedding_type {config['position_embedding_type']!r} is not supported")
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in config.items() if key in names})


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])[None, :]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.heads = c.num_attention_heads


class _Dense(nn.Module):
    def __init__(self, inputs: int, outputs: int, eps: float | None):
        super().__init__()
        self.dense = nn.Linear(inputs, outputs)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(outputs, eps=eps)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)  # the checkpoint's name: attention.self.query.weight
        self.output = _Dense(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        attention: _SelfAttention = self.self
        batch, length, hidden = x.shape
        heads = attention.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(batch, length, heads, hidden // heads).transpose(0, 2, 1, 3)

        q, k, v = split(attention.query(x)), split(attention.key(x)), split(attention.value(x))
        context = mx.fast.scaled_dot_product_attention(q, k, v, scale=(hidden // heads) ** -0.5, mask=mask)
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        return self.output.LayerNorm(x + self.output.dense(context))


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Dense(c.hidden_size, c.intermediate_size, None)
        self.output = _Dense(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.output.LayerNorm(h + self.output.dense(nn.gelu(self.intermediate.dense(h))))


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c.num_hidden_layers)]


class BertEncoder(nn.Module):
    """`BertModel` without the pooler: token ids (batch, tokens) int32 and a 0/1 attention mask of the same
    shape → last hidden states (batch, tokens, hidden)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        x = self.embeddings(input_ids)
        # (batch, 1, 1, keys): padding keys get MASK_VALUE, broadcast over heads and queries
        mask = ((1 - attention_mask.astype(x.dtype)) * MASK_VALUE)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def load_bert(path: Path, config: dict[str, Any], dtype: mx.Dtype = mx.float32) -> BertEncoder:
    """A BertEncoder with the weights of every `*.safetensors` in `path` (a `bert.` prefix is dropped; the
    pooler and `position_ids` buffers are ignored), cast to `dtype`. Raises ModelError for missing weights."""
    model = BertEncoder(BertConfig.from_dict(config))
    weights: dict[str, mx.array] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():  # type: ignore[union-attr]
            name = name.removeprefix("bert.")
            if name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
                weights[name] = value.astype(dtype)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelError(f"embedding model {Path(path).name}: {exc}") from None
    mx.eval(model.parameters())
    return model


def pool(states: mx.array, attention_mask: mx.array, pooling: str, normalize: bool) -> mx.array:
    """Sentence vectors (batch, hidden) from token states (batch, tokens, hidden), as sentence-transformers'
    `Pooling` (mean over real tokens, first token, element-wise max over real tokens, or the last real token)
    then, when `normalize`, its `Normalize` (x / max(‖x‖₂, 1e-12), torch.nn.functional.normalize)."""
    mask = attention_mask.astype(states.dtype)[:, :, None]
    if pooling == "mean":
        vectors = (states * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1e-9)
    elif pooling == "cls":
        vectors = states[:, 0]
    elif pooling == "max":
        vectors = mx.where(mask > 0, states, -1e9).max(axis=1)
    else:  # lasttoken: inputs are right-padded, so the last real token sits at length - 1
        last = attention_mask.sum(axis=1).astype(mx.int32) - 1
        vectors = mx.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
    if normalize:
        vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors
