"""The MLX engine: one generation thread that owns the model and mlx-lm's `BatchGenerator`.

This is the only serve-path module that imports MLX (docs/architecture.md#threads).

- Continuous batching (docs/api.md#engine-semantics): up to `max_batch` sequences are decoded together by
  `mlx_lm.generate.BatchGenerator`; a new request is inserted into the running batch as soon as a slot is
  free (its prompt is prefilled in chunks interleaved with the running decode steps). Further requests
  wait in a FIFO of `max_queue_depth`; beyond that `submit` raises 429 with Retry-After.
- kv-bits: every sequence gets `kvcache.QuantizedKVCache` layers, which merge into a
  `kvcache.BatchQuantizedKVCache` — quantized from the first token, and batching stays on.
- max-context C: a prompt longer than C is refused (413); `max_tokens` is clamped to C − prompt tokens,
  so the KV cache of a sequence never holds more than C tokens.
- Prompt-prefix reuse: finished sequences leave their KV in mlx-lm's `LRUPromptCache` (bounded by
  `prompt_cache_bytes`) and, written by a background thread, on disk (`engine.disk_cache`, bounded by
  `prompt_cache_disk_bytes`); a new prompt starts from the longest cached prefix of either.
- Shared prefixes are prefilled once: a waiting request whose prompt shares at least
  SHARED_PREFIX_MIN_TOKENS not-yet-cached tokens (and at least half of its prompt) with a sequence still
  prefilling waits for that prefill; when it ends, the leader's prompt KV goes into the prefix cache and the
  follower prefills only the rest — a burst of identical prompts costs about one prefill, not one each
  (what vLLM's automatic prefix caching and SGLang's radix cache do for requests in flight).
- Cancellation, draining and stats are messages to / reads from the thread; `EngineStats` is a snapshot.

Threads: `submit`/`encode_*`/`stats` run on the server's threads; all MLX work happens on the generation
thread, including loading the model (MLX streams are per thread).
"""

from __future__ import annotations

import collections
import logging
import queue
import re
import threading
import time
from typing import Any, cast

from macprovider.core.config import PROMPT_CACHE_ENTRIES
from macprovider.core.errors import ApiError, ModelError
from macprovider.engine.distributed import FAILURE_ANNOUNCE_S, Lockstep, LockstepBatch, SamplerSpec, follow
from macprovider.engine.isolation import fault_report, guard, record_fault
from macprovider.engine.protocol import (
    EngineState,
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ServePlan,
    TokenLogprob,
)
from macprovider.engine.sequence import OutputText, SequenceHandle, SequenceState

log = logging.getLogger("macprovider.engine.engine")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback piece

# Text of end-of-turn tokens of common chat formats; any of them in the vocabulary ends generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<|return|>",
)
# Fewer shared tokens than this are not worth a wait: chat templates alone share their opening tokens.
SHARED_PREFIX_MIN_TOKENS = 32
# MLX keeps freed buffers for reuse (its buffer cache) up to its memory limit by default — on Linux, all of
# RAM. Decode-step temporaries are far smaller, and mlx-lm empties the cache after every prefill chunk, so a
# fixed cap bounds the process without costing reuse where it matters (health reports the cache
# as engine.cache_memory_bytes).
MLX_CACHE_LIMIT_BYTES = 256 * 1024 * 1024


class Engine:
    """Implements `engine.protocol.EngineProtocol` on MLX. Construct cheaply, then `load()` (blocking)."""

    # Width of the model's logits (token ids 0 … vocab_size−1); 0 until loaded.
    vocab_size: int = 0
    # The longest vocabulary entry, in characters of its piece (a byte-level BPE piece has one character per
    # byte, so this bounds the characters one token can cover); 0 until loaded. Serve uses it to refuse a
    # prompt that cannot fit max_context before tokenizing it.
    max_token_chars: int = 0

    def __init__(self, plan: ServePlan, lockstep: Lockstep | None = None):
        """`lockstep`: this rank's place in a distributed group (`engine.distributed`), None for one process."""
        settings = plan.settings
        self.lockstep = lockstep
        self.model_id = plan.model_id
        self.model_path = plan.model_path
        self.max_context = plan.max_context
        self.max_batch = settings.max_concurrency_override
        self.kv_bits = settings.kv_bits
        self.weights_dtype: str = settings.weights_dtype  # the setting; after load(), what was applied
        # Speculative decoding (engine/speculative.py): the setting; after load(), what runs ("off" across
        # several machines, where followers replay rank 0's steps one token at a time, and for models whose
        # caches cannot roll back per row).
        self.speculative: str = settings.speculative if lockstep is None else "off"
        self.speculative_tokens = settings.speculative_tokens
        # Exponentials on MLX's CPU device (engine/cpu_kernels.py): the setting, and what runs ("numpy" once
        # load() chose the NumPy route, else "mlx").
        self.cpu_kernels_setting = settings.cpu_kernels
        self.cpu_kernels = "mlx"
        self.max_queue_depth = settings.max_queue_depth
        # Prefix reuse is per rank and byte-bounded: ranks holding different layers would evict differently.
        self.prompt_cache_bytes = settings.prompt_cache_bytes if lockstep is None else 0
        # Its disk tier (engine/disk_cache.py) sits under the memory tier: off with it (prompt_cache_bytes 0 means
        # no prefix reuse at all) and on distributed ranks (each holds only its own layers).
        self.prompt_cache_disk_bytes = settings.prompt_cache_disk_bytes if self.prompt_cache_bytes > 0 else 0
        self.prompt_cache_dir = settings.prompt_cache_dir
        self._disk: Any = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._state: EngineState = "loading"
        self._draining = False
        self._stopping = False
        self._admitted = 0  # submitted and not finished (waiting + active)
        self._group_failure_reported = False
        # Generation-thread state.
        self._pending: collections.deque[SequenceState] = collections.deque()
        self._active: dict[int, SequenceState] = {}
        self._counters: collections.Counter[str] = collections.Counter()
        self._kv_bytes = 0
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ lifecycle
    def load(self, timeout: float | None = None) -> None:
        """Load the model on the generation thread and run a one-token self-test. Blocks until ready.

        Raises ModelError when loading or the self-test fails (the thread is then gone).
        """
        self._thread = threading.Thread(target=self._thread_main, name="macprovider-generation", daemon=True)
        self._thread.start()
        if not self._loaded.wait(timeout):
            raise ModelError(f"model {self.model_id} did not load within {timeout} s")
        if self._load_error is not None:
            raise ModelError(f"cannot load model {self.model_id}: {_describe(self._load_error)}") from None
        self._self_test()
        with self._lock:
            self._state = "ready"
        log.info(
            "engine ready: model=%s max_batch=%d max_context=%d kv_bits=%s weights=%s speculative=%s cpu_kernels=%s",
            self.model_id,
            self.max_batch,
            self.max_context,
            self.kv_bits,
            self.weights_dtype,
            self.speculative if self.speculative == "off" else f"{self.speculative}/{self.speculative_tokens}",
            self.cpu_kernels,
        )

    def _self_test(self) -> None:
        prompt = self.encode_text("Hello")
        handle = self._enqueue(GenerationRequest(prompt_tokens=prompt, max_tokens=1, temperature=0.0), internal=True)
        try:
            chunks = handle.wait(timeout=600)
        except queue.Empty:
            raise ModelError("self-test: no token within 600 s") from None
        final = chunks[-1]
        if final.finish_reason == "error" or final.usage is None or final.usage.generated_tokens != 1:
            raise ModelError(f"self-test failed: {final.error or final.finish_reason}")

    def close(self) -> None:
        """Stop the generation thread (pending sequences are dropped)."""
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush_prompt_cache(timeout=5)

    def follow(self) -> int:
        """A follower rank (distributed, rank > 0): load this rank's share on the calling thread, then step
        in lockstep with rank 0 until it says stop. Returns the exit code; raises as `follow` does."""
        assert self.lockstep is not None and self.lockstep.rank != 0
        self._load_on_thread()
        return follow(self, self.lockstep)

    def is_alive(self) -> bool:
        if self.lockstep is not None and self._group_failed():
            # Health says 503 and why (stats) for a moment before the server exits non-zero.
            return self.lockstep.failed_for() < FAILURE_ANNOUNCE_S
        if self._thread is None:
            return True  # not started yet: loading
        return self._thread.is_alive() or self._stopping

    def _group_failed(self) -> bool:
        """Whether the distributed group broke. The first time, every queued and running sequence gets its
        error chunk from here: a stalled collective holds the generation thread, which cannot send them."""
        reason = self.lockstep.failure() if self.lockstep is not None else None
        if reason is None:
            return False
        with self._lock:
            first, self._group_failure_reported = not self._group_failure_reported, True
        if first:
            log.error("distributed group failed: %s", reason)
            try:
                self._fail_everything(f"a rank of the distributed group failed: {reason}")
            except RuntimeError:  # the generation thread changed the batch meanwhile: it is alive and reports
                pass
        return True

    # ------------------------------------------------------------------ protocol: text
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Chat template (with generation prompt, and `tools` when given) → token ids. Raises ApiError 400
        when the template fails, or for `tools` when the model has no tool-call support in mlx-lm."""
        tokenizer = self._require_tokenizer()
        if tools and not (tokenizer.has_chat_template and tokenizer.has_tool_calling):
            raise ApiError(400, "invalid_request", "this model's chat template does not support tools", param="tools")
        try:
            with self._tokenizer_lock:
                if tokenizer.has_chat_template:
                    extra = {"tools": tools} if tools else {}
                    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
                else:
                    from mlx_lm.server import convert_chat

                    tokens = tokenizer.encode(convert_chat(messages))
        except Exception as exc:  # jinja raises for e.g. roles the template does not accept
            raise ApiError(
                400,
                "invalid_request",
                f"the model's chat template rejected the messages: {_describe(exc)}",
                param="messages",
            ) from None
        return list(tokens)

    @property
    def tool_markup(self) -> tuple[str, str, Any] | None:
        """(tool_call_start, tool_call_end, parse) from mlx-lm's tool parser of this model, or None."""
        tokenizer = self.tokenizer
        if tokenizer is None or not tokenizer.has_tool_calling:
            return None
        return tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is exactly one added token of the vocabulary (`<tool_call>` in Qwen2.5's
        and Hermes' tokenizers), else None. Grammars must name such a token by id: its text spelled in
        ordinary tokens is a different token sequence."""
        added = (getattr(self.tokenizer, "added_tokens_decoder", None) or {}) if self.tokenizer is not None else {}
        return next((token_id for token_id, token in added.items() if str(token) == text), None)

    def encode_text(self, prompt: str) -> list[int]:
        """Plain prompt → token ids (no special tokens added beyond the tokenizer's defaults)."""
        tokenizer = self._require_tokenizer()
        with self._tokenizer_lock:
            return list(tokenizer.encode(prompt))

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ApiError(503, "model_not_loaded", "the model is still loading", error_type="server_error")
        return self.tokenizer

    # ------------------------------------------------------------------ protocol: generation
    def submit(self, request: GenerationRequest) -> SequenceHandle:
        """Queue a sequence (see EngineProtocol.submit for the errors raised)."""
        with self._lock:
            state, draining = self._state, self._draining
        if draining:
            raise ApiError(503, "draining", "the server is shutting down", error_type="server_error")
        if state not in ("ready", "busy"):
            raise ApiError(503, "model_not_loaded", "the model is not loaded", error_type="server_error")
        return self._enqueue(request, internal=False)

    def _enqueue(self, request: GenerationRequest, internal: bool) -> SequenceHandle:
        prompt = list(request.prompt_tokens)
        if len(prompt) > self.max_context:
            raise ApiError(
                413,
                "context_length_exceeded",
                f"Prompt length ({len(prompt)} tokens) exceeds this provider's safe capacity ({self.max_context} tokens).",
                param="messages",
                extra={"n_prompt_tokens": len(prompt), "n_ctx": self.max_context},
            )
        if not prompt:
            raise ApiError(400, "invalid_request", "the prompt is empty", param="messages")
        if request.grammar is not None and not self._grammar_ok:
            raise ApiError(
                400,
                "invalid_request",
                "this model's tokenizer does not support response_format (constrained decoding needs a fast tokenizer)",
                param="response_format",
            )
        with self._lock:
            if not internal and self._admitted >= self.max_batch + self.max_queue_depth:
                raise ApiError(
                    429,
                    "rate_limit_exceeded",
                    f"all {self.max_batch} batch slots and {self.max_queue_depth} queue places are taken; retry shortly",
                    headers={"Retry-After": "1"},
                )
            self._admitted += 1
        remaining = self.max_context - len(prompt)
        max_tokens = remaining if request.max_tokens is None else min(request.max_tokens, remaining)
        handle = SequenceHandle(on_cancel=lambda h: self._inbox.put(("cancel", h)))
        sequence = SequenceState(
            handle=handle,
            prompt=prompt,
            max_tokens=max_tokens,
            sampler=self._sampler(request),
            logits_processors=self._logits_processors(request) + self._grammar_processors(request),
            output=OutputText(self.tokenizer.detokenizer, self._hidden_ids, tuple(request.stop or ())),
            top_logprobs=request.top_logprobs,
        )
        guard(sequence, sampler=self.lockstep is None)
        self._inbox.put(("submit", sequence))
        return handle

    def start_draining(self) -> None:
        with self._lock:
            self._draining = True
            if self._state in ("ready", "busy"):
                self._state = "draining"

    def cancel_all(self, reason: str) -> None:
        self._inbox.put(("cancel_all", reason))

    def stats(self) -> EngineStats:
        with self._lock:
            counters = dict(self._counters)
            state: EngineState = self._state
            if state == "ready" and self._counters["active"] >= self.max_batch:
                state = "busy"
            if (
                self._thread is not None
                and not self._thread.is_alive()
                and not self._stopping
                and self._loaded.is_set()
            ):
                state = "unavailable"
        if self.lockstep is not None and self._group_failed():
            state = "unavailable"
        return EngineStats(
            state=state,
            active_sequences=counters.get("active", 0),
            peak_active_sequences=counters.get("peak_active", 0),
            queued_sequences=counters.get("queued", 0),
            kv_cache_bytes=counters.get("kv_bytes", 0),
            peak_kv_cache_bytes=counters.get("peak_kv_bytes", 0),
            peak_memory_bytes=counters.get("peak_memory", 0),
            prompt_tokens_total=counters.get("prompt_tokens", 0),
            cached_prompt_tokens_total=counters.get("cached_prompt_tokens", 0),
            generated_tokens_total=counters.get("generated_tokens", 0),
            prompt_cache_bytes=counters.get("prompt_cache_bytes", 0),
            active_memory_bytes=counters.get("active_memory", 0),
            cache_memory_bytes=counters.get("cache_memory", 0),
            speculative_drafted_tokens_total=counters.get("drafted_tokens", 0),
            speculative_accepted_tokens_total=counters.get("accepted_tokens", 0),
            cpu_kernels=self.cpu_kernels,
            **self._disk_stats(),
            extra={"distributed": self.lockstep.describe()} if self.lockstep is not None else {},
        )

    def _disk_stats(self) -> dict[str, Any]:
        disk = self._disk.stats() if self._disk is not None else {}
        return {
            "prompt_cache_disk_entries": disk.get("entries", 0),
            "prompt_cache_disk_bytes": disk.get("bytes", 0),
            "prompt_cache_disk_hits_total": disk.get("hits", 0),
            "prompt_cache_disk_misses_total": disk.get("misses", 0),
            "prompt_cache_disk_load_seconds_total": disk.get("load_seconds", 0.0),
        }

    def flush_prompt_cache(self, timeout: float = 10.0) -> None:
        """Let the disk tier write what it has queued (up to `timeout` seconds); at shutdown."""
        if self._disk is not None:
            self._disk.flush(timeout)

    # ------------------------------------------------------------------ sampling
    def _sampler(self, request: GenerationRequest):
        # top_k at or above the vocabulary keeps every token (what the number means); mlx-lm's sampler
        # raises for it instead.
        top_k = request.top_k if 0 < request.top_k < self.vocab_size else 0
        return self._sampler_for(SamplerSpec(request.temperature, request.top_p, request.seed, top_k))

    def _sampler_for(self, spec: SamplerSpec):
        """Greedy (one shared sampler), seeded (a fresh one per request) or shared by (temperature, top_p):
        the same structure on every rank of a group, whose token ids are rank 0's (`wrap_sampler`)."""
        from mlx_lm.sample_utils import greedy_sampler, make_sampler

        wrap = self.lockstep.wrap_sampler if self.lockstep is not None else lambda _, sampler: sampler
        if spec.temperature == 0:
            key = (0.0, 1.0, 0)
            build = lambda: wrap(SamplerSpec(), greedy_sampler)  # noqa: E731
        elif spec.seed is not None:
            return wrap(spec, _seeded_sampler(spec.temperature, spec.top_p, spec.seed, spec.top_k))
        else:
            key = (spec.temperature, spec.top_p, spec.top_k)
            build = lambda: wrap(spec, make_sampler(temp=spec.temperature, top_p=spec.top_p, top_k=spec.top_k))  # noqa: E731
        with self._lock:
            sampler = self._samplers.get(key)
            if sampler is None:
                sampler = self._samplers[key] = build()
        return sampler

    def _grammar_processors(self, request: GenerationRequest) -> list[Any]:
        if request.grammar is None:
            return []
        from macprovider.engine.constrained import GrammarProcessor

        return [GrammarProcessor(self._grammar_tokenizers, request.grammar)]

    @staticmethod
    def _logits_processors(request: GenerationRequest) -> list[Any]:
        if not request.presence_penalty and not request.frequency_penalty:
            return []
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )

    # ------------------------------------------------------------------ generation thread
    def _thread_main(self) -> None:
        try:
            self._load_on_thread()
        except BaseException as exc:  # noqa: BLE001 - reported through load()
            self._load_error = exc
            self._loaded.set()
            return
        self._loaded.set()
        try:
            self._loop()
            if self.lockstep is not None:
                self.lockstep.stop()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, not vanish
            log.exception("generation thread died: %s", _describe(exc))
            if self.lockstep is not None:
                with self._lock:
                    self._group_failure_reported = True  # this thread fails the sequences itself, below
                self.lockstep.fail(f"lost a peer rank: {_describe(exc)}")
            with self._lock:
                self._state = "unavailable"
            self._fail_everything(f"the generation engine failed: {_describe(exc)}")

    def _load_on_thread(self) -> None:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.generate import BatchGenerator, make_stop_sequences
        from mlx_lm.models.cache import LRUPromptCache

        from macprovider.engine.kvcache import kv_group_size, make_cache_factory

        mx.set_cache_limit(MLX_CACHE_LIMIT_BYTES)
        from macprovider.engine.weights_dtype import apply_weights_dtype

        if self.lockstep is None:
            model, tokenizer = load(str(self.model_path))
            self.weights_dtype = apply_weights_dtype(model, self.weights_dtype)
        else:
            from macprovider.core.hardware import memory_budget_bytes, mlx_recommended_working_set_bytes
            from macprovider.engine.distributed import load_sharded

            def cast(module: Any) -> str:
                self.weights_dtype = apply_weights_dtype(module, self.weights_dtype)
                return self.weights_dtype

            budget = memory_budget_bytes(mlx_recommended_working_set_bytes())
            model, tokenizer = load_sharded(self.model_path, self.lockstep, budget, cast)
        from macprovider.engine import cpu_kernels

        if cpu_kernels.wanted(self.cpu_kernels_setting, distributed=self.lockstep is not None):
            cpu_kernels.install()
            cpu_kernels.enable_in_this_thread()  # the generation thread: every forward pass of this engine
            self.cpu_kernels = "numpy"
        group_size = 64
        if self.kv_bits is not None:
            layer = model.layers[0] if hasattr(model, "layers") else None
            head_dim = getattr(getattr(layer, "self_attn", None), "head_dim", None) or _head_dim_from(model)
            group_size = kv_group_size(head_dim) if head_dim else 64
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.vocab_size = _logits_width(model, vocab)
        self.max_token_chars = max((len(piece) for piece in vocab), default=0)
        end_ids = set(tokenizer.eos_token_ids) | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        tokenizer.eos_token_ids = end_ids
        self._hidden_ids = _special_token_ids(tokenizer) | frozenset(end_ids)
        if getattr(tokenizer, "has_tool_calling", False):  # tool-call markup must reach the server's splitter
            markup = set(tokenizer.tool_call_start_tokens or ()) | set(tokenizer.tool_call_end_tokens or ())
            self._hidden_ids = self._hidden_ids - (markup - frozenset(end_ids))
        self._samplers: dict[tuple[float, float, int], Any] = {}
        self._token_texts: dict[int, str] = {}  # token id -> decoded text, for logprobs (generation thread)
        self._token_pieces: dict[int, bytes] = {}  # token id -> its own bytes, for logprob `bytes`
        from macprovider.engine.constrained import TokenizerCache

        hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self._grammar_ok = bool(getattr(hf_tokenizer, "is_fast", False))  # llguidance.hf needs a fast tokenizer
        self._grammar_tokenizers = TokenizerCache(hf_tokenizer, sorted(end_ids))
        self._make_cache = make_cache_factory(model, self.kv_bits, group_size)
        self._stop_sequences = make_stop_sequences(tokenizer)
        self._prompt_cache = LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES, max_bytes=max(self.prompt_cache_bytes, 0))
        from macprovider.engine.disk_cache import model_revision, open_disk_cache

        self._disk = open_disk_cache(
            self.prompt_cache_dir,
            self.prompt_cache_disk_bytes,
            {
                "model": self.model_id,
                "revision": model_revision(self.model_path),
                "weights_dtype": str(self.weights_dtype),
                "kv_bits": str(self.kv_bits),
                "kv_group_size": str(group_size),
            },
        )
        self._batch = BatchGenerator(
            model,
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
            stream=mx.default_stream(mx.default_device()),
        )
        if self.speculative != "off":
            from macprovider.engine.speculative import enable_speculation

            if not enable_speculation(self._batch, self.speculative_tokens, self._make_cache):
                log.warning(
                    "speculative decoding is off for %s: its KV cache cannot roll back per sequence", self.model_id
                )
                self.speculative = "off"
        if self.lockstep is not None and self.lockstep.rank == 0:
            self._batch = LockstepBatch(self._batch, self.lockstep)
        self._mx = mx
        self.tokenizer = tokenizer

    def _loop(self) -> None:
        batch = self._batch
        while True:
            idle = not self._active and not self._pending
            if not self._drain_inbox(block=idle):
                return
            self._admit()
            if self._active:
                prompt_responses, generation_responses = batch.next()
                now = time.perf_counter()
                for response in prompt_responses:
                    if response.end_of_prompt and response.uid in self._active:
                        self._active[response.uid].decode_started_at = now
                        self._share_prompt_kv(self._active[response.uid])
                for response in generation_responses:
                    self._on_token_isolated(response, now)
                self._end_faulted()
            elif self.lockstep is not None:
                self.lockstep.heartbeat()
            self._publish_gauges()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued messages; with `block`, wait for the first. False when told to stop."""
        try:
            message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload = message
            if kind == "stop":
                return False
            if kind == "submit":
                if payload.handle.cancelled:
                    self._finish(payload, "cancelled")
                else:
                    self._pending.append(payload)
            elif kind == "cancel":
                self._cancel(payload)
            elif kind == "cancel_all":
                for sequence in list(self._pending) + list(self._active.values()):
                    self._finish(sequence, "error", error=payload)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, handle: SequenceHandle) -> None:
        for sequence in self._pending:
            if sequence.handle is handle:
                self._finish(sequence, "cancelled")
                return
        for sequence in self._active.values():
            if sequence.handle is handle:
                self._finish(sequence, "cancelled")
                return

    def _admit(self) -> None:
        """Move waiting sequences into the running batch while slots are free (FIFO), except those waiting
        for a shared prefix that another sequence is prefilling (`_waits_for_shared_prefix`)."""
        waiting: list[SequenceState] = []
        while self._pending and len(self._active) < self.max_batch:
            sequence = self._pending.popleft()
            if sequence.max_tokens <= 0:  # prompt fills the whole context: nothing may be generated
                sequence.decode_started_at = sequence.last_token_at = time.perf_counter()
                self._finish(sequence, "length")
                continue
            if self._waits_for_shared_prefix(sequence):
                waiting.append(sequence)
                continue
            cache, rest = None, sequence.prompt
            if self.prompt_cache_bytes > 0:
                cache, rest = self._prompt_cache.fetch_nearest_cache(self.model_id, sequence.prompt)
            if self._disk is not None:  # a longer prefix on disk (e.g. from before a restart) wins
                cache, rest = self._disk.nearest(sequence.prompt, cache, rest)
            if cache is not None and not rest:  # exact hit: recompute the last token to get its logits
                from mlx_lm.models.cache import trim_prompt_cache

                trim_prompt_cache(cache, 1)
                rest = sequence.prompt[-1:]
            sequence.cached_tokens = len(sequence.prompt) - len(rest)
            (sequence.uid,) = self._batch.insert(
                [rest],
                max_tokens=[sequence.max_tokens],
                caches=[cache if cache is not None else self._make_cache()],
                all_tokens=[sequence.prompt[: sequence.cached_tokens]],
                samplers=[sequence.sampler],
                logits_processors=[sequence.logits_processors],
                stop_sequences=[self._stop_sequences],
            )
            self._active[sequence.uid] = sequence
            with self._lock:
                self._counters["prompt_tokens"] += len(sequence.prompt)
                self._counters["cached_prompt_tokens"] += sequence.cached_tokens
        self._pending.extendleft(reversed(waiting))

    def _shares_prefix_with(self, leader: SequenceState, sequence: SequenceState) -> bool:
        """Whether `sequence` should start from `leader`'s prompt KV rather than prefill alongside it: they
        share at least SHARED_PREFIX_MIN_TOKENS tokens the leader is computing (not taken from the prefix cache)
        and at least half of `sequence`'s prompt, so waiting saves more prefill than it delays."""
        a, b = leader.prompt, sequence.prompt
        limit = min(len(a), len(b))
        shared = 0
        while shared < limit and a[shared] == b[shared]:
            shared += 1
        return shared - leader.cached_tokens >= SHARED_PREFIX_MIN_TOKENS and 2 * shared >= len(b)

    def _waits_for_shared_prefix(self, sequence: SequenceState) -> bool:
        """True while a sequence that is still prefilling a prefix of `sequence`'s prompt is active; the
        leader is chosen once, then only its state is checked (this runs every decode step)."""
        if self.prompt_cache_bytes <= 0:
            return False
        if sequence.waits_for_prefix_of is not None:
            leader = self._active.get(sequence.waits_for_prefix_of)
            if leader is not None and leader.decode_started_at is None:
                return True
            sequence.waits_for_prefix_of = None  # its prompt KV is in the prefix cache now (or it is gone)
            return False
        for leader in self._active.values():
            if leader.decode_started_at is None and self._shares_prefix_with(leader, sequence):
                sequence.waits_for_prefix_of = leader.uid
                return True
        return False

    def _share_prompt_kv(self, leader: SequenceState) -> None:
        """At the end of `leader`'s prefill, put its prompt KV into the prefix cache if a waiting sequence
        is waiting for it (the entry is evaluated, so it owns its rows and not the batch buffer)."""
        if not any(sequence.waits_for_prefix_of == leader.uid for sequence in self._pending):
            return
        cache, tokens = self._batch.extract_cache([leader.uid]).get(leader.uid, (None, None))
        if cache is None:
            return
        self._mx.eval([layer.state for layer in cache])
        self._prompt_cache.insert_cache(self.model_id, list(tokens), cache)
        self._prompt_cache.trim_to(n_bytes=self.prompt_cache_bytes)

    def _on_token(self, response: Any, now: float) -> None:
        sequence = self._active.get(response.uid)
        if sequence is None:
            return
        sequence.generated_tokens += 1
        sequence.last_token_at = now
        if sequence.decode_started_at is None:
            sequence.decode_started_at = now
        with self._lock:
            self._counters["generated_tokens"] += 1
        finish = response.finish_reason
        logprobs: tuple[TokenLogprob, ...] = ()
        if finish == "stop":  # an end-of-turn token: never rendered
            text = sequence.output.finish(release_held=False)
        else:
            sequence.completion_tokens += 1
            text = sequence.output.add(response.token)
            if finish == "length" or sequence.output.stopped:
                text += sequence.output.finish(release_held=not sequence.output.stopped)
            if sequence.top_logprobs is not None:
                logprobs = (self._token_logprob(response.token, response.logprobs, sequence.top_logprobs),)
        if text or logprobs:
            sequence.handle.deliver(GenerationChunk(text=text, logprobs=logprobs))
        if sequence.output.stopped and finish is None:
            finish = "stop"
        if finish is not None:
            self._finish(sequence, finish, finished_by_batch=response.finish_reason is not None, response=response)

    def _on_token_isolated(self, response: Any, now: float) -> None:
        """`_on_token`, where an exception while detokenizing or rendering this sequence's token (or its
        logprobs) faults this sequence only."""
        try:
            self._on_token(response, now)
        except Exception as exc:  # noqa: BLE001 - this sequence's failure, reported to its own client
            sequence = self._active.get(response.uid)
            if sequence is None:
                raise
            record_fault(sequence, exc, "detokenizing")

    def _end_faulted(self) -> None:
        """End every running sequence whose own sampler, processor or detokenizer raised, each with its own
        error (`engine.isolation`); the others stay in the batch."""
        for sequence, fault in [(s, s.fault) for s in self._active.values() if s.fault is not None]:
            status, message, param = fault_report(fault)
            self._finish(sequence, "error", error=message, error_status=status, error_param=param)

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def _token_bytes(self, token: int) -> bytes:
        pieces = self._token_pieces.get(token)
        if pieces is None:
            hf_tokenizer = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
            piece = hf_tokenizer.convert_ids_to_tokens(token)
            pieces = self._token_pieces[token] = token_bytes(
                piece if isinstance(piece, str) else "", self._token_text(token)
            )
        return pieces

    def _token_logprob(self, token: int, logprobs: Any, top: int) -> TokenLogprob:
        """The sampled token's log-probability and the `top` best alternatives, from BatchGenerator's
        per-token log-softmax vector (shape (vocab,), natural log, after logits processors)."""
        import mlx.core as mx

        row = logprobs.reshape(-1)
        alternatives: tuple[tuple[str, float, bytes], ...] = ()
        if top > 0:
            k = min(top, row.shape[0])
            ids = mx.argpartition(-row, kth=k - 1)[:k]
            values = row[ids]
            order = mx.argsort(-values)
            ids_list = cast(list[int], ids[order].tolist())  # 1-D arrays: flat lists
            values_list = cast(list[float], values[order].tolist())
            alternatives = tuple(
                (self._token_text(i), float(v), self._token_bytes(i)) for i, v in zip(ids_list, values_list)
            )
        return TokenLogprob(self._token_text(token), float(row[token].item()), alternatives, self._token_bytes(token))

    def _finish(
        self,
        sequence: SequenceState,
        reason: FinishReason,
        *,
        error: str | None = None,
        finished_by_batch: bool = False,
        response: Any = None,
        error_status: int = 500,
        error_param: str | None = None,
    ) -> None:
        """End a sequence: leave the batch (saving its KV for prefix reuse), send the final chunk."""
        if sequence.uid is not None and sequence.uid in self._active:
            del self._active[sequence.uid]
            if finished_by_batch:
                cache, tokens = response.prompt_cache, response.all_tokens
            else:
                extracted = self._batch.remove([sequence.uid], return_prompt_caches=reason in ("stop", "length"))
                cache, tokens = extracted.get(sequence.uid, (None, None))
            if cache is not None and self.prompt_cache_bytes > 0:
                # mlx-lm extracts a row lazily (a slice of the whole batch buffer): evaluated now, the entry
                # owns just its rows; left lazy, it kept every batch buffer it came from alive — ~5x the
                # bytes the prompt cache counted (measured in scripts/soak.py's memory phase).
                self._mx.eval([layer.state for layer in cache])
                self._prompt_cache.insert_cache(self.model_id, list(tokens), cache)
                self._prompt_cache.trim_to(n_bytes=self.prompt_cache_bytes)
                if self._disk is not None:  # queued for the disk tier's writer thread; never waits
                    self._disk.offer(list(tokens), cache)
        elif sequence in self._pending:
            self._pending.remove(sequence)
        sequence.handle.finished = True
        with self._lock:
            self._admitted -= 1
        stop_sequence = sequence.output.stop_sequence if reason == "stop" else None
        sequence.handle.deliver(
            GenerationChunk(
                finish_reason=reason,
                usage=sequence.usage(),
                error=error,
                stop_sequence=stop_sequence,
                error_status=error_status,
                error_param=error_param,
            )
        )

    def _fail_everything(self, message: str) -> None:
        for sequence in list(self._pending) + list(self._active.values()):
            try:
                sequence.handle.deliver(GenerationChunk(finish_reason="error", usage=sequence.usage(), error=message))
            except Exception:  # noqa: BLE001 - best effort while dying
                pass
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                payload.handle.deliver(GenerationChunk(finish_reason="error", usage=payload.usage(), error=message))

    def _publish_gauges(self) -> None:
        kv_bytes = self._batch.prompt_cache_nbytes if self._active else 0
        mx = self._mx
        peak_memory, active_memory, cache_memory = (
            int(mx.get_peak_memory()),
            int(mx.get_active_memory()),
            int(mx.get_cache_memory()),
        )
        with self._lock:
            counters = self._counters
            counters["active"] = len(self._active)
            counters["peak_active"] = max(counters["peak_active"], len(self._active))
            counters["queued"] = len(self._pending)
            counters["kv_bytes"] = kv_bytes
            counters["peak_kv_bytes"] = max(counters["peak_kv_bytes"], kv_bytes)
            counters["peak_memory"] = max(counters["peak_memory"], peak_memory)
            counters["prompt_cache_bytes"] = self._prompt_cache.nbytes
            counters["active_memory"] = active_memory
            counters["cache_memory"] = cache_memory
            decoding = getattr(self._batch, "_generation_batch", None)
            counters["drafted_tokens"] = getattr(decoding, "drafted_tokens", 0)
            counters["accepted_tokens"] = getattr(decoding, "accepted_tokens", 0)


def _seeded_sampler(temperature: float, top_p: float, seed: int, top_k: int = 0):
    """A sampler with its own PRNG key, so a seeded request stays reproducible inside a shared batch."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p

    state = {"key": mx.random.key(seed)}

    def sample(logprobs):
        state["key"], subkey = mx.random.split(state["key"])
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=subkey)

    return sample


def _special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Token ids never rendered as text: the special-tokens map (`all_special_ids`) and every added token
    flagged `special` in transformers' `added_tokens_decoder` (ChatML's `<|im_start|>`, Llama 3's header
    tokens, … which `all_special_ids` leaves out unless listed as additional special tokens) — the set
    `decode(..., skip_special_tokens=True)` of a fast tokenizer skips."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(token_id for token_id, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


def _logits_width(model: Any, vocab: dict[str, int]) -> int:
    """The model's output vocabulary (the logits' last dimension): `args.vocab_size` from its config, else
    one past the tokenizer's largest id."""
    width = getattr(getattr(model, "args", None), "vocab_size", None)
    if width:
        return int(width)
    return max(vocab.values(), default=-1) + 1


def _head_dim_from(model: Any) -> int | None:
    args = getattr(model, "args", None)
    if args is None:
        return None
    head_dim = getattr(args, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def _describe(exc: BaseException) -> str:
    """A one-line, path-free description of an exception for logs and client messages."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}"[:300] if text else exc.__class__.__name__


def token_bytes(piece: str, text: str) -> bytes:
    """A token's own bytes, for OpenAI logprob `bytes` (docs/api.md).

    piece: the vocabulary entry (`convert_ids_to_tokens`); text: the token decoded alone. When the text is
    whole (no U+FFFD) its UTF-8 is the answer. A token holding part of a multi-byte character decodes to
    U+FFFD, so its bytes come from the piece: a SentencePiece byte-fallback piece `<0xF0>` is that byte; a
    byte-level BPE piece (GPT-2's byte-to-unicode alphabet, mlx-lm `tokenizer_utils._byte_decoder`) maps
    character by character to bytes. Anything else falls back to the text's UTF-8.
    """
    if "\ufffd" not in text or not piece:
        return text.encode("utf-8")
    match = _BYTE_TOKEN.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    from mlx_lm.tokenizer_utils import _byte_decoder

    decoder = _byte_decoder()
    if all(char in decoder for char in piece):
        return bytes(decoder[char] for char in piece)
    return text.encode("utf-8")
