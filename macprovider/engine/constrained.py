"""Structured output by constrained decoding (OpenAI `response_format` json_object / json_schema).

The grammar library is llguidance (https://github.com/guidance-ai/llguidance): a JSON schema compiles to a
grammar; per sequence an `LLMatcher` follows the generated tokens and yields the bitmask of the tokens that
may come next. `GrammarProcessor` is an mlx-lm logits processor (`(tokens, logits) -> logits`), passed per
sequence to `BatchGenerator.insert`, so constrained and unconstrained sequences share one batch.

    grammar_for(response_format) -> str | None     None for {"type": "text"}; ApiError 400 otherwise bad
    TokenizerCache(hf_tokenizer, eos_ids)          builds the llguidance tokenizer once per model (~1 s)
    GrammarProcessor(cache, grammar)                one per sequence; generation thread only
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

from macprovider.core.errors import ApiError


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar (a string) for an OpenAI `response_format`, or None for no constraint.

    `{"type": "text"}` / None -> None; `{"type": "json_object"}` -> any JSON object;
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}` -> that schema.
    Raises ApiError 400 (param `response_format...`) for another type, a missing/invalid schema, or a
    schema llguidance cannot compile.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    from llguidance import LLMatcher

    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ApiError(
                400,
                "invalid_request",
                "response_format.json_schema needs a `name` string",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "invalid_request",
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema.schema",
            )
    else:
        raise ApiError(
            400,
            "invalid_request",
            'response_format type must be "text", "json_object" or "json_schema"',
            param="response_format.type",
        )
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError with a message
        raise ApiError(
            400, "invalid_request", f"the JSON schema cannot be used: {exc}", param="response_format.json_schema.schema"
        ) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ApiError(
            400,
            "invalid_request",
            f"the JSON schema cannot be used: {messages[0]}",
            param="response_format.json_schema.schema",
        )
    return grammar


class TokenizerCache:
    """The llguidance tokenizer of one model, built on first use for the model's logits width.

    hf_tokenizer: a fast Hugging Face tokenizer (mlx-lm `TokenizerWrapper._tokenizer`); eos_ids: the ids
    that end generation (a finished grammar allows only these).
    """

    def __init__(self, hf_tokenizer: Any, eos_ids: Sequence[int]):
        self._hf = hf_tokenizer
        self._eos = sorted(eos_ids)
        self._lock = threading.Lock()
        self._built: dict[int, Any] = {}
        # Every added token's id (`added_tokens_decoder`: ChatML's markers, Qwen's `<tool_call>`, …).
        self.added_ids = frozenset(int(token) for token in (getattr(hf_tokenizer, "added_tokens_decoder", None) or {}))

    @property
    def eos_ids(self) -> list[int]:
        """The ids that end generation (sorted)."""
        return self._eos

    def get(self, n_vocab: int) -> Any:
        with self._lock:
            tokenizer = self._built.get(n_vocab)
            if tokenizer is None:
                import llguidance.hf

                tokenizer = self._built[n_vocab] = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=n_vocab, eos_token=self._eos
                )
            return tokenizer


_NAMED_TOKEN = re.compile(r"<\[(\d+)\]>")  # a token named by id in an llguidance Lark grammar


class ConstraintError(RuntimeError):
    """The grammar matcher of one sequence failed mid-decode (a token it could not follow)."""


class GrammarProcessor:
    """mlx-lm logits processor constraining one sequence to `grammar`.

    Called by BatchGenerator once per step with `tokens` (1-D mx.array: the sequence's tokens so far, the
    last one being the token just sampled) and `logits` (shape (1, vocab)); returns logits with every
    token the grammar forbids at -inf. The first call fixes where generation starts; each later call
    feeds the newly sampled tokens to the matcher. Reading the sampled token costs one host sync per step.
    """

    def __init__(self, tokenizers: TokenizerCache, grammar: str):
        self._tokenizers = tokenizers
        self._grammar = grammar
        self._matcher: Any = None
        self._start = 0
        self._consumed = 0
        self._bitmask: Any = None
        self._named = frozenset(int(token) for token in _NAMED_TOKEN.findall(grammar))

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        n_vocab = logits.shape[-1]
        if self._matcher is None:
            self._matcher = LLMatcher(self._tokenizers.get(n_vocab), self._grammar, log_level=0)
            self._bitmask = allocate_token_bitmask(1, n_vocab)
            self._start = int(tokens.shape[0])
        else:
            new = tokens[self._start + self._consumed :].tolist()
            for token in new:
                self._matcher.consume_token(int(token))
            self._consumed += len(new)
        if self._matcher.is_error():
            # Never decode on unconstrained (the answer would break its schema, or end as `stop` mid-JSON):
            # the engine ends this sequence alone with this error (engine.isolation).
            raise ConstraintError(f"the output constraint failed: {self._matcher.get_error()}")
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[:n_vocab].astype(bool)
        # Added (special) tokens only where the grammar names them (`<[id]>`): llguidance's mask may offer
        # one for the same text in a JSON string (`"<|im_end|>"`), which would end or derail the answer.
        allowed[[token for token in self._tokenizers.added_ids - self._named if token < n_vocab]] = False
        if not self._matcher.is_accepting():
            # An end token before the grammar is complete would end the answer as `stop` on broken JSON (the
            # batch ends a sequence on its end token before this processor sees it): only text may follow.
            allowed[[token for token in self._tokenizers.eos_ids if token < n_vocab]] = False
        elif self._tokenizers.eos_ids:
            allowed[[token for token in self._tokenizers.eos_ids if token < n_vocab]] = True
        if not allowed.any():
            raise ApiError(
                400,
                "invalid_request",
                "the output schema can only continue with a special token "
                "here (its text spells one, e.g. <|im_end|>), which is never produced as text",
                param="response_format",
            )
        return mx.where(mx.array(allowed)[None, :], logits, mx.array(-float("inf"), dtype=logits.dtype))
