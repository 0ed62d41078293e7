"""Structured output by constrained decoding (OpenAI `response_format` json_object / json_schema).

The grammar library is llguidance (https://github.com/guidance-ai/llguidance): a JSON schema compiles to a
grammar; per sequence an `LLMatcher` follows the generated tokens and yields the bitmask of the tokens that
may come next. The grammar is built on the request side (`serve.grammar.grammar_for`); `GrammarProcessor` is an mlx-lm logits processor (`(tokens, logits) -> logits`), passed per
sequence to `BatchGenerator.insert`, so constrained and unconstrained sequences share one batch.

    TokenizerCache(hf_tokenizer, eos_ids)          builds the llguidance tokenizer once per model (~1 s)
    GrammarProcessor(cache, grammar)                one per sequence; generation thread only
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from macprovider.core.errors import ApiError


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
