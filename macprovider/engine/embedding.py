"""The embedding-model engine: one worker thread owns MLX and runs the encoder over inputs batched across
requests (dynamic batching), as the chat engine's generation thread owns generation.

    engine = EmbeddingEngine(plan)          built by `commands/serve.py` when the model's kind is "embedding"
    engine.load()                           tokenizer + weights, then the worker thread starts
    ids = engine.encode_inputs(inputs)      event loop / thread pool: tokenizing needs no MLX
    vectors = await asyncio.wrap_future(engine.embed(ids))

Batching: requests queue as jobs; the worker takes every queued job (at least one, up to MAX_JOB_INPUTS
inputs), sorts their inputs by length and runs them in forward passes of at most `max_batch` inputs and
BATCH_TOKEN_BUDGET padded tokens, with little padding (PADDING_SLACK), then resolves each job's future. Many
small requests from several clients thus share forward passes; a large request is split into passes of
similar lengths.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from macprovider.core.errors import ApiError, ModelError
from macprovider.engine.protocol import EngineState, EngineStats, GenerationHandle, GenerationRequest, ServePlan
from macprovider.models.embedding import EmbeddingConfig, read_embedding_config
from macprovider.models.ids import read_model_config

log = logging.getLogger("macprovider.engine.embedding")


def load_decoder(path: Path, dtype: Any) -> Any:
    """A decoder embedding model (Qwen3-Embedding and the like: last-token pooling) through mlx-lm's own model
    classes: `(input_ids, attention_mask) -> (batch, tokens, hidden)`, the decoder stack's hidden states after
    its final norm (`model.model`, no LM head). Attention is causal, so right padding never reaches a real
    token and the mask is only needed for pooling. Unquantized weights are cast to `dtype`. Raises ModelError
    when mlx-lm cannot load the checkpoint or it has no `model` stack."""
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(Path(path))
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise ModelError(
            f"embedding model {Path(path).name}: cannot load it as a BERT encoder or an mlx-lm decoder ({exc})"
        ) from None
    backbone = getattr(model, "model", None)
    if backbone is None:
        raise ModelError(
            f"embedding model {Path(path).name}: {config.get('model_type')} has no decoder stack to embed with"
        )
    if not config.get("quantization"):
        import mlx.core as mx

        model.set_dtype(dtype)
        mx.eval(model.parameters())
    return lambda input_ids, attention_mask: backbone(input_ids)


DEFAULT_MAX_BATCH = 32  # inputs per forward pass when `max_concurrency_override` is unset or 1
BATCH_TOKEN_BUDGET = 16384  # padded tokens per forward pass (batch × longest input): bounds activation memory
# A pass grows while its padded tokens stay within PADDING_SLACK x its real tokens (or it is still small): on
# MLX's CPU backend a forward costs about its padded tokens whatever the batch, so padding is pure loss there.
PADDING_SLACK = 1.25
SMALL_PASS_TOKENS = 256
MAX_JOB_INPUTS = 4096  # inputs the worker takes in one round; a round ends, then newly queued jobs join
SERVED_ROUTES = "/v1/embeddings"


@dataclass
class _Job:
    token_lists: Sequence[Sequence[int]]
    future: Future = field(default_factory=Future)


class EmbeddingEngine:
    """Implements `EmbeddingEngineProtocol` and the health/lifecycle half of `EngineProtocol`.

    model_id / max_context (= max_input_tokens) / max_batch (inputs per forward pass) / kv_bits (None) are
    what /v1/health reports. Weights are float32 (MLX's CPU backend runs float16 ~30x slower, and the
    oracle comparison needs float32 sums) unless `weights_dtype` asks for float16/bfloat16.
    """

    kind: Literal["embedding"] = "embedding"

    def __init__(self, plan: ServePlan):
        self.plan = plan
        self.model_id = plan.model_id
        self.path = Path(plan.model_path)
        self.config: EmbeddingConfig = read_embedding_config(self.path)
        self.max_input_tokens = self.config.max_tokens
        self.max_context = self.config.max_tokens
        self.dimensions = self.config.dimensions
        self.matryoshka_dimensions = self.config.matryoshka_dimensions
        batch = plan.settings.max_concurrency_override
        self.max_batch = batch if isinstance(batch, int) and batch > 1 else DEFAULT_MAX_BATCH
        self.kv_bits = None
        self.queue_limit = max(1, plan.settings.max_queue_depth)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        self._active = 0
        self._state: EngineState = "loading"
        self._draining = False
        self._thread: threading.Thread | None = None
        self._tokenizer: Any = None
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        self._vocab_size = 0
        self._pad_id = 0
        self._tokens_total = 0
        self._peak_active = 0
        self._rounds = 0  # worker rounds so far (one round = every job queued when it began, batched)

    # -- loading (background thread of the runtime)
    def load(self) -> None:
        """Read the tokenizer and weights, then start the worker thread. Raises ModelError."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
            raise ModelError(f"embedding model {self.model_id}: cannot read tokenizer.json ({exc})") from None
        tokenizer.no_truncation()  # an over-long input is refused (400), never cut silently
        tokenizer.no_padding()
        with_special, without = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
        start = next((i for i in range(len(with_special)) if with_special[i : i + len(without)] == without), 0)
        self._prefix, self._suffix = with_special[:start], with_special[start + len(without) :]
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.get_vocab_size()
        padding = tokenizer.token_to_id("[PAD]")
        self._pad_id = int(padding) if padding is not None else 0
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="macprovider-embed", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        self._state = "ready"
        log.info(
            "embedding model %s: %d dimensions, %s pooling%s, inputs up to %d tokens",
            self.model_id,
            self.dimensions,
            self.config.pooling,
            ", normalized" if self.config.normalize else "",
            self.max_input_tokens,
        )

    # -- EmbeddingEngineProtocol
    def encode_inputs(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """See `EmbeddingEngineProtocol.encode_inputs`."""
        if self._tokenizer is None:
            raise ApiError(503, "model_not_loaded", "the model is still loading", headers={"Retry-After": "1"})
        texts = [(i, text) for i, text in enumerate(inputs) if isinstance(text, str)]
        encoded = dict(zip((i for i, _ in texts), self._tokenizer.encode_batch([t for _, t in texts]))) if texts else {}
        out: list[list[int]] = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                out.append(list(encoded[index].ids))
                continue
            ids = [int(t) for t in item]
            bad = next((t for t in ids if not 0 <= t < self._vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400,
                    "invalid_token_id",
                    f"input[{index}] has token id {bad}, outside this model's vocabulary "
                    f"of {self._vocab_size}: token arrays are the served model's own token ids (a client sending "
                    "tiktoken ids, as langchain's OpenAIEmbeddings does by default, should send text: "
                    "check_embedding_ctx_length=False)",
                    param="input",
                )
            wrapped = (
                (not self._prefix or ids[: len(self._prefix)] == self._prefix)
                and (not self._suffix or ids[-len(self._suffix) :] == self._suffix)
                and len(ids) >= len(self._prefix) + len(self._suffix)
            )
            out.append(ids if wrapped and (self._prefix or self._suffix) else self._prefix + ids + self._suffix)
        return out

    def embed(self, token_lists: Sequence[Sequence[int]]) -> Future:
        """See `EmbeddingEngineProtocol.embed`."""
        with self._lock:
            if self._draining:
                raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
            if self._state == "loading" or self._thread is None:
                raise ApiError(503, "model_not_loaded", "the model is still loading", headers={"Retry-After": "1"})
            if self._queued >= self.queue_limit:
                raise ApiError(
                    429,
                    "rate_limit_exceeded",
                    f"too many embedding requests queued ({self._queued})",
                    headers={"Retry-After": "1"},
                )
            self._queued += 1
        job = _Job(token_lists)
        self._queue.put(job)
        return job.future

    # -- the worker thread (owns MLX)
    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            import mlx.core as mx

            from macprovider.engine.bert import load_bert, pool

            dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16}.get(
                str(self.plan.settings.weights_dtype), mx.float32
            )
            config = read_model_config(self.path)
            model = (
                load_bert(self.path, config, dtype)
                if config.get("model_type") == "bert"
                else load_decoder(self.path, dtype)
            )
        except BaseException as exc:  # noqa: BLE001 - reported by load()
            failure.append(exc)
            ready.set()
            return
        ready.set()

        def forward(batch: list[Sequence[int]]) -> np.ndarray:
            longest = max(len(ids) for ids in batch)
            ids = np.full((len(batch), longest), self._pad_id, dtype=np.int32)
            mask = np.zeros((len(batch), longest), dtype=np.int32)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1
            ids_mx, mask_mx = mx.array(ids), mx.array(mask)
            vectors = pool(model(ids_mx, mask_mx), mask_mx, self.config.pooling, self.config.normalize)
            return np.array(vectors.astype(mx.float32))

        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, count = self._gather(job)
            with self._lock:
                self._queued -= len(jobs)
                self._active = count
                self._peak_active = max(self._peak_active, count)
                self._rounds += 1
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            self._embed(live, forward)

    def _gather(self, job: _Job) -> tuple[list[_Job], int]:
        """`job` plus the queued jobs that fit in MAX_JOB_INPUTS inputs (a shutdown sentinel is put back)."""
        jobs = [job]
        count = len(job.token_lists)
        while count < MAX_JOB_INPUTS:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._queue.put(None)
                break
            jobs.append(more)
            count += len(more.token_lists)
        return jobs, count

    def _embed(self, live: list[_Job], forward: Callable[[list[Sequence[int]]], np.ndarray]) -> None:
        """Embed the live jobs' inputs in length-sorted passes and resolve their futures (each gets the error
        when a pass fails)."""
        try:
            items = [(len(ids), n, k) for n, j in enumerate(live) for k, ids in enumerate(j.token_lists)]
            items.sort()
            results = [np.empty((len(j.token_lists), self.dimensions), dtype=np.float32) for j in live]
            start = 0
            while start < len(items):
                end = start + 1  # sorted ascending: items[end] is the longest input of the widened pass
                real = items[start][0]
                while end < len(items) and end - start < self.max_batch:
                    padded = items[end][0] * (end - start + 1)
                    wasteful = padded > PADDING_SLACK * (real + items[end][0]) and padded > SMALL_PASS_TOKENS
                    if padded > BATCH_TOKEN_BUDGET or wasteful:
                        break
                    real += items[end][0]
                    end += 1
                chunk = items[start:end]
                vectors = forward([live[n].token_lists[k] for _, n, k in chunk])
                for row, (_, n, k) in enumerate(chunk):
                    results[n][k] = vectors[row]
                start = end
            with self._lock:
                self._tokens_total += sum(length for length, _, _ in items)
            for j, result in zip(live, results):
                j.future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error; the worker goes on
            log.error("embedding forward failed: %s", exc.__class__.__name__, exc_info=exc)
            for j in live:
                if not j.future.done():
                    j.future.set_exception(exc)
        finally:
            with self._lock:
                self._active = 0

    # -- EngineProtocol (health, lifecycle; generation is not served)
    def _not_served(self) -> ApiError:
        return ApiError(
            400,
            "unsupported_model_route",
            f"the model {self.model_id!r} is an embedding model: it serves "
            f"{SERVED_ROUTES} only, not chat, completions, responses or messages",
            param="model",
        )

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Always ApiError 400: an embedding model does not chat."""
        raise self._not_served()

    def encode_text(self, prompt: str) -> list[int]:
        """Always ApiError 400: an embedding model does not complete text."""
        raise self._not_served()

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Always ApiError 400: an embedding model does not generate."""
        raise self._not_served()

    def stats(self) -> EngineStats:
        """Queued jobs (requests not yet taken by the worker), inputs in the current round, the tokens embedded
        so far (as prompt tokens), and `extra["embedding_rounds"]`: worker rounds so far."""
        with self._lock:
            state: EngineState = self._state
            if state == "ready" and (self._active or self._queued):
                state = "busy"
            if self._draining and state != "unavailable":
                state = "draining"
            if self._thread is not None and not self._thread.is_alive():
                state = "unavailable"
            return EngineStats(
                state=state,
                active_sequences=self._active,
                peak_active_sequences=self._peak_active,
                queued_sequences=self._queued,
                prompt_tokens_total=self._tokens_total,
                extra={"embedding_rounds": self._rounds},
            )

    def start_draining(self) -> None:
        """Refuse new requests (503 `draining`); queued ones still run."""
        with self._lock:
            self._draining = True

    def cancel_all(self, reason: str) -> None:
        """Fail every queued job with `reason` (503); the pass in progress finishes."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._queue.put(None)
                return
            with self._lock:
                self._queued -= 1
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ApiError(503, "cancelled", reason))

    def is_alive(self) -> bool:
        """False once the worker thread has died (the server then exits non-zero)."""
        return self._thread is None or self._thread.is_alive()

    def close(self) -> None:
        """Stop the worker thread after the jobs already queued."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
