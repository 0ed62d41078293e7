"""The contract between the HTTP layer and the engine, with no MLX in it.

`macprovider.serve` depends only on this module's `EngineProtocol`, so HTTP tests run against a fake engine and
the real engine (`engine.engine.Engine`) can change inside. The engine works on token ids internally; the
per-request text work (chat template, detokenizing, stop strings held back until resolved, EOS text never
emitted) happens behind `submit`, so the server only relays `GenerationChunk`s.

Flow of one request:
    tokens = engine.encode_chat(messages)            # or encode_text(prompt); raises ApiError 400
    handle = engine.submit(GenerationRequest(...))   # raises ApiError 413 / 429 / 503
    async for chunk in handle: ...                   # text deltas, then one chunk with finish_reason+usage
    handle.cancel()                                  # client went away: slot freed at the next step
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import numpy

    from macprovider.core.config import Settings

EngineState = Literal["loading", "ready", "busy", "draining", "unavailable"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate.

    prompt_tokens: the full prompt, token ids (1-D).
    max_tokens: completion tokens wanted; None = the remaining capacity (max_context − prompt tokens).
    temperature: 0 = greedy; top_p in (0, 1]; top_k: sample among the k most likely tokens (0 = all,
        Anthropic's `top_k`); penalties in [−2, 2] (OpenAI semantics).
    stop: up to 4 strings; generation ends before them and they are not returned.
    seed: per-request sampling seed, or None.
    top_logprobs: None = no log-probabilities; 0–20 = each generated token's log-probability plus that many
        most likely alternatives (OpenAI `logprobs`/`top_logprobs`), delivered in `GenerationChunk.logprobs`.
    grammar: None, or an llguidance grammar (`structured.grammar_for`) the output is constrained to.
    """

    prompt_tokens: Sequence[int]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    seed: int | None = None
    top_logprobs: int | None = None
    grammar: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its natural-log probability under the model's distribution (before
    temperature/top-p), and the `top` most likely tokens at that step as (token text, logprob, token bytes),
    best first.

    `token_bytes` are the token's own bytes (OpenAI logprob `bytes`): for a token holding part of a
    multi-byte UTF-8 character they differ from `token.encode()` (the text then shows U+FFFD).
    None = `token.encode("utf-8")`.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float, bytes], ...] = ()
    token_bytes: bytes | None = None

    @property
    def raw_bytes(self) -> bytes:
        """The token's own bytes (`token_bytes`, else the UTF-8 of `token`)."""
        return self.token.encode("utf-8") if self.token_bytes is None else self.token_bytes


@dataclass(frozen=True)
class Usage:
    """Token counts and timing of one finished sequence (docs/api.md#chat-completions).

    prompt_tokens / completion_tokens / cached_tokens: counts (cached = prompt tokens whose KV was reused).
    generation_ms: decode wall time, first generated token to last, milliseconds.
    generated_tokens: tokens the model generated (including a final EOS that is not returned as text).
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    generation_ms: float = 0.0
    generated_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        """OpenAI `usage` object plus the macprovider timing fields."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "macprovider_generation_ms": round(self.generation_ms, 3),
            "macprovider_generated_completion_tokens": self.generated_tokens,
        }


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of output. `text` may be empty. The last chunk of a sequence has `finish_reason` and
    `usage` set; `finish_reason == "error"` carries `error` (a message safe to show a client).
    `logprobs`: the tokens generated since the previous chunk, when the request asked for log-probabilities
    (their text may lag `text` by the tokens held back for stop strings).
    `error_status` / `error_param`: with `error`, the HTTP status for it (4xx when the request's own input
    caused it, else 500) and the request field it names.
    `stop_sequence`: on a final `stop` chunk, the request stop string that ended generation (None when the
    model's end-of-turn token did; the Anthropic API reports it as `stop_sequence`)."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_sequence: str | None = None
    # With `error`: the HTTP status it maps to (a 4xx when the request's own input caused the failure) and the
    # request field it names, if any.
    error_status: int = 500
    error_param: str | None = None


class GenerationHandle(Protocol):
    """A submitted sequence: iterate for chunks; `cancel()` is idempotent and safe from any thread."""

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges for /v1/health and /metrics (docs/api.md#routes). Bytes are integers."""

    state: EngineState
    active_sequences: int = 0
    peak_active_sequences: int = 0
    queued_sequences: int = 0
    kv_cache_bytes: int = 0
    peak_kv_cache_bytes: int = 0
    peak_memory_bytes: int = 0
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    # What the process holds now: the prompt (prefix) cache's entries, MLX's live arrays and MLX's
    # buffer cache (freed buffers kept for reuse: `mx.get_active_memory` / `mx.get_cache_memory`).
    prompt_cache_bytes: int = 0
    active_memory_bytes: int = 0
    cache_memory_bytes: int = 0
    # The prompt cache's disk tier (engine/disk_cache.py): files and bytes in its directory, prompts that took
    # their prefix from disk (hits) or looked there in vain (misses), seconds spent loading entries.
    prompt_cache_disk_entries: int = 0
    prompt_cache_disk_bytes: int = 0
    prompt_cache_disk_hits_total: int = 0
    prompt_cache_disk_misses_total: int = 0
    prompt_cache_disk_load_seconds_total: float = 0.0
    # Speculative decoding (engine/speculative.py): draft tokens verified, and those accepted.
    speculative_drafted_tokens_total: int = 0
    speculative_accepted_tokens_total: int = 0
    # What computes a forward pass's exponentials (engine/cpu_kernels.py): "numpy" or "mlx" (health capacity).
    cpu_kernels: str = "mlx"
    extra: dict[str, Any] = field(default_factory=dict)

    def engine_json(self) -> dict[str, int | float]:
        """The `engine {…}` object of /v1/health."""
        return {
            "active_sequences": self.active_sequences,
            "peak_active_sequences": self.peak_active_sequences,
            "kv_cache_bytes": self.kv_cache_bytes,
            "peak_kv_cache_bytes": self.peak_kv_cache_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "prompt_tokens_total": self.prompt_tokens_total,
            "cached_prompt_tokens_total": self.cached_prompt_tokens_total,
            "generated_tokens_total": self.generated_tokens_total,
            "prompt_cache_bytes": self.prompt_cache_bytes,
            "active_memory_bytes": self.active_memory_bytes,
            "cache_memory_bytes": self.cache_memory_bytes,
            "prompt_cache_disk_entries": self.prompt_cache_disk_entries,
            "prompt_cache_disk_bytes": self.prompt_cache_disk_bytes,
            "prompt_cache_disk_hits_total": self.prompt_cache_disk_hits_total,
            "prompt_cache_disk_misses_total": self.prompt_cache_disk_misses_total,
            "prompt_cache_disk_load_seconds_total": self.prompt_cache_disk_load_seconds_total,
            "speculative_drafted_tokens_total": self.speculative_drafted_tokens_total,
            "speculative_accepted_tokens_total": self.speculative_accepted_tokens_total,
            "speculative_acceptance_rate": (
                self.speculative_accepted_tokens_total / self.speculative_drafted_tokens_total
                if self.speculative_drafted_tokens_total
                else 0.0
            ),
        }


class EngineProtocol(Protocol):
    """What the HTTP layer needs from an engine.

    model_id: the id as configured (what /v1/models lists and `model` must equal).
    max_context: C, the KV capacity of one sequence in tokens; max_batch: N; kv_bits: 4, 8 or None.
    """

    model_id: str
    max_context: int
    max_batch: int
    kv_bits: int | None
    # Optional (read with getattr): `vocab_size` -> the model's output vocabulary (logits width), 0 if unknown;
    # `top_k` at or above it means no truncation.
    # Optional (read with getattr): `tool_markup` -> (tool_call_start, tool_call_end, parse(text, tools)) from
    # mlx-lm's per-model tool parser, or None when the model cannot call tools.

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Apply the chat template (with the generation prompt, and OpenAI `tools` when given) and tokenize.
        ApiError 400 if it fails, or (param `tools`) when the model has no tool-call support."""
        ...

    def encode_text(self, prompt: str) -> list[int]:
        """Tokenize a plain completion prompt."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a sequence. Raises ApiError: 413 `context_length_exceeded` (prompt > max_context),
        429 `rate_limit_exceeded` (queue full, with Retry-After), 503 `model_not_loaded` / `draining`."""
        ...

    def stats(self) -> EngineStats:
        """A consistent snapshot of the engine's counters; cheap, safe from the event loop."""
        ...

    def start_draining(self) -> None:
        """Stop admitting new sequences (submit → 503 `draining`); running ones go on."""
        ...

    def cancel_all(self, reason: str) -> None:
        """End every queued and running sequence with an `error` chunk carrying `reason`."""
        ...

    def is_alive(self) -> bool:
        """False once the generation thread has died; the server then reports 503 and exits non-zero."""
        ...


class EmbeddingEngineProtocol(Protocol):
    """What the embeddings route needs from an embedding-model engine (on top of `EngineProtocol`'s
    health/lifecycle members, which an embedding engine also has so the app's health, metrics and drain work
    unchanged; its `encode_chat`/`encode_text`/`submit` raise ApiError 400 naming the routes it serves).

    kind: always "embedding" (a chat engine has no `kind`, or "chat"): how a route tells them apart.
    max_input_tokens: the longest input in tokens, special tokens included; dimensions: vector length;
    matryoshka_dimensions: the shorter lengths a request's `dimensions` may ask for (empty = none).

    Flow of one request:
        token_lists = engine.encode_inputs(inputs)   # strings tokenized; id lists checked; ApiError 400
        vectors = await asyncio.wrap_future(engine.embed(token_lists))   # ApiError 429 / 503 at submit
    """

    kind: Literal["embedding"]
    model_id: str
    max_input_tokens: int
    dimensions: int
    matryoshka_dimensions: tuple[int, ...]

    def encode_inputs(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Each input as the token ids the model runs on, the model's special tokens added (a token-id input
        already starting and ending with them is taken as is). ApiError 400 (param `input`) naming the index
        of an id outside the vocabulary. Lengths are not checked here."""
        ...

    def embed(self, token_lists: Sequence[Sequence[int]]) -> Future[numpy.ndarray]:
        """Queue the inputs for the engine's worker thread (batched with other requests' inputs); the future
        resolves to a float32 array (inputs, dimensions): one pooled (and, per the model, L2-normalized)
        vector per input, in order, or to
        the ApiError / exception that ended it. Raises ApiError 429 `rate_limit_exceeded` (queue full) or
        503 `draining` / `model_not_loaded` at once."""
        ...


@dataclass(frozen=True)
class ServePlan:
    """What `serve` runs: the settings (max context already capped), the model directory, the API key.

    `max_context_source` says why max context has its value (a settings source, or `model` when the
    model's max_position_embeddings capped it).
    """

    settings: Settings
    model_id: str
    model_path: Path
    api_key: str | None
    max_context: int
    max_context_source: str
