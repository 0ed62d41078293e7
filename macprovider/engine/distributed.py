"""One model across several machines on `mx.distributed` (docs/several-machines.md): ranks in lockstep.

`macprovider serve --parallel pipeline|tensor` runs under `mlx.launch` (ring, JACCL or MPI backend; the
transport is MLX's). Every rank loads its share of the model and runs the same mlx-lm `BatchGenerator`;
rank 0 also binds HTTP and owns the request queue.

Splits
    pipeline  `model.layers` split into contiguous stages sized by each rank's memory budget
              (`split_layers`, largest remainder; equal budgets → equal split, the low stages take the
              extra layers). Rank N−1 is the first stage (embedding), rank 0 the last (final norm and
              head, so the HTTP rank has the real logits); activations go stage to stage with
              `mx.distributed.send/recv` — B×L×hidden values per step. The model is loaded lazily and
              pruned before its weights are read, so a rank materialises only its layers (plus the
              embedding on the first stage and norm/head on the last; a tied head keeps the embedding).
              Works for mlx-lm decoders whose inner model has `embed_tokens`, `layers` and `norm` and whose
              layers are called `layer(h, mask, cache=c)` (the llama family: llama, mistral, qwen2/3, …).
    tensor    mlx-lm's own `model.shard(group)` where the model has one; needs the attention heads, the
              KV heads and the MLP width divisible by the group size.
`check_split` (macprovider.core.cluster.parallel, MLX-free) refuses an impossible split before any weight loads and
names the mode that fits.

Lockstep
    Before every `BatchGenerator.next()` (and every `IDLE_HEARTBEAT_S` while idle) rank 0 sends the
    batch changes it made since the last step — inserts (prompt token ids, max_tokens, sampler) and
    removes (cancels, stop strings) — as a stream of int32 ops cut into fixed-size messages of
    `CONTROL_INTS` int32 each, delivered with `all_sum` (rank 0 contributes the message, the others
    zeros). The common step is one 1 KiB message; a long prompt takes ⌈tokens / 254⌉ of them.
    Followers replay the same `insert`/`remove` calls, so every rank's batch is identical (uids match;
    a mismatch fails loudly).

Sampling (decided): rank 0 samples and its token ids are broadcast (`all_sum` of the sampler output,
zeros from the other ranks) inside the step's graph. Every rank builds the same samplers (greedy, a
(temperature, top_p) sampler shared by key, or a fresh seeded one per request) so the collectives line up;
logits processors (penalties, grammars) run on rank 0 only. Nothing depends on the ranks computing
bit-identical logits, and in pipeline mode the other ranks never compute logits at all.

Not in distributed mode: prompt-prefix reuse (the byte-bounded LRU would evict differently on ranks
holding different layers), so `serve` sets `prompt_cache_bytes` to 0.

Failure: a collective whose peer died raises on rank 0 → the generation thread dies → health 503 and
exit 1 (`serve.runtime`). A collective that does not return within `rank_timeout_s` (a stalled rank)
makes `Lockstep.failure()` non-None, which `Engine.is_alive()` reports the same way. Followers exit
non-zero when rank 0's sockets close, and 0 when rank 0 sends STOP after its drain.

MLX is imported inside functions only: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macprovider.core.cluster.parallel import check_split, split_layers
from macprovider.core.config import WEIGHTS_DTYPES
from macprovider.core.errors import ModelError
from macprovider.core.processes import exit_with_parent

log = logging.getLogger("macprovider.engine.distributed")

CONTROL_INTS = 256  # one control message: 1 KiB of int32
HEADER_INTS = 2  # [payload length, action]
PAYLOAD_INTS = CONTROL_INTS - HEADER_INTS
IDLE_HEARTBEAT_S = 0.5  # the engine's idle inbox wait: an idle group exchanges one message this often
FAILURE_ANNOUNCE_S = 2.0  # rank 0 answers 503 (health names the failure) this long before it exits

# Actions (header[1]) and ops (payload stream).
ACTION_MORE, ACTION_STEP, ACTION_IDLE, ACTION_STOP = 0, 1, 2, 3
OP_INSERT, OP_REMOVE = 1, 2


# ---------------------------------------------------------------------------------------------- control
def encode_control(ops: Sequence[int], action: int) -> list[list[int]]:
    """Cut an op stream into fixed-size control messages (each `CONTROL_INTS` int32: length, action,
    payload). All but the last carry ACTION_MORE; an empty stream is one message."""
    messages = []
    chunks = [list(ops[i : i + PAYLOAD_INTS]) for i in range(0, len(ops), PAYLOAD_INTS)] or [[]]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        messages.append([len(chunk), action if last else ACTION_MORE] + chunk + [0] * (PAYLOAD_INTS - len(chunk)))
    return messages


def float_bits(value: float) -> int:
    """A float32 as the int32 with the same bits (how temperatures travel in int32 messages)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def bits_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _int32(value: int) -> int:
    return struct.unpack("<i", struct.pack("<I", value & 0xFFFFFFFF))[0]


@dataclass(frozen=True)
class SamplerSpec:
    """What a follower needs to build the same sampler: temperature 0 is greedy; a seed means a fresh
    per-request sampler; otherwise samplers are shared by (temperature, top_p, top_k).

    Followers' samplers never decide a token (rank 0's ids win), but they must be shared exactly as rank 0's
    are: mlx-lm's BatchGenerator samples a batch whose sequences share one sampler object in one call and
    otherwise calls each sequence's sampler alone — one `all_sum` per call (`Lockstep.wrap_sampler`), so
    every rank must make the same calls. Hence `top_k` travels too."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0

    def encode(self) -> list[int]:
        seed = self.seed or 0
        return [
            float_bits(self.temperature),
            float_bits(self.top_p),
            int(self.seed is not None),
            _int32(seed >> 32),
            _int32(seed),
            int(self.top_k),
        ]

    @classmethod
    def decode(cls, ints: Sequence[int]) -> SamplerSpec:
        temperature, top_p, has_seed, high, low, top_k = ints
        seed = ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF) if has_seed else None
        return cls(bits_float(temperature), bits_float(top_p), seed, top_k)


SAMPLER_INTS = 6


@dataclass
class InsertOp:
    uid: int
    max_tokens: int
    sampler: SamplerSpec
    prompt: list[int]

    def encode(self) -> list[int]:
        return [OP_INSERT, self.uid, self.max_tokens, *self.sampler.encode(), len(self.prompt), *self.prompt]


@dataclass
class RemoveOp:
    uids: list[int] = field(default_factory=list)

    def encode(self) -> list[int]:
        return [OP_REMOVE, len(self.uids), *self.uids]


def decode_ops(stream: Sequence[int]) -> list[InsertOp | RemoveOp]:
    """The op stream of one step back into ops. Raises ValueError on a malformed stream."""
    ops: list[InsertOp | RemoveOp] = []
    i = 0
    while i < len(stream):
        kind = stream[i]
        if kind == OP_REMOVE:
            n = stream[i + 1]
            ops.append(RemoveOp(list(stream[i + 2 : i + 2 + n])))
            i += 2 + n
        elif kind == OP_INSERT:
            uid, max_tokens = stream[i + 1], stream[i + 2]
            sampler = SamplerSpec.decode(stream[i + 3 : i + 3 + SAMPLER_INTS])
            j = i + 3 + SAMPLER_INTS
            n = stream[j]
            ops.append(InsertOp(uid, max_tokens, sampler, list(stream[j + 1 : j + 1 + n])))
            i = j + 1 + n
        else:
            raise ValueError(f"unknown control op {kind} at {i}")
    return ops


class Lockstep:
    """This rank's place in the group and the per-step control exchange (see the module docstring).

    `group`: an `mx.distributed.Group`; `rank_timeout_s`: how long one collective may take before the
    group counts as failed. Thread-safe for `failure()` (read by the HTTP side); everything else runs on
    the generation thread (rank 0) or the main thread (followers).
    """

    def __init__(self, group: Any, parallel: str, rank_timeout_s: float):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.parallel = parallel
        self.rank_timeout_s = rank_timeout_s
        self.stages: list[int] = []  # layers per stage, first stage first (pipeline)
        self._ops: list[int] = []
        self._since: float | None = None  # when the collective in progress started
        self._error: str | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()
        self.messages_sent = 0
        self.control_seconds = 0.0

    # -- collectives
    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """Run a step that waits on other ranks: past `rank_timeout_s`, `failure()` reports the group broken;
        an exception (a peer's socket closed) marks it broken at once."""
        with self._lock:
            self._since = time.monotonic()
        try:
            yield
        except Exception as exc:
            self.fail(f"lost a peer rank: {exc}")
            raise
        finally:
            with self._lock:
                self._since = None

    def _all_sum(self, values: Any) -> Any:
        import mlx.core as mx

        with self.watched():
            out = mx.distributed.all_sum(values, group=self.group, stream=mx.cpu)
            mx.eval(out)
            return out

    def all_gather_floats(self, value: float) -> list[float]:
        """Every rank's `value`, by rank (a fixed-size all_sum of one slot per rank)."""
        import mlx.core as mx

        slots = [0.0] * self.size
        slots[self.rank] = value
        return [float(v) for v in self._all_sum(mx.array(slots, dtype=mx.float32)).tolist()]

    def exchange(self, action: int) -> tuple[int, list[InsertOp | RemoveOp]]:
        """One control round: rank 0 sends its pending ops with `action`; every rank returns (action, ops).

        Followers pass any action (ignored). Raises RuntimeError when a peer is gone."""
        import mlx.core as mx

        started = time.perf_counter()
        messages = encode_control(self._ops, action) if self.rank == 0 else None
        self._ops = []
        stream: list[int] = []
        index = 0
        while True:
            mine = messages[index] if messages is not None else [0] * CONTROL_INTS
            received = self._all_sum(mx.array(mine, dtype=mx.int32)).tolist()
            self.messages_sent += 1
            index += 1
            length, got = received[0], received[1]
            stream.extend(received[HEADER_INTS : HEADER_INTS + length])
            if got != ACTION_MORE:
                break
        self.control_seconds += time.perf_counter() - started
        return got, decode_ops(stream)

    def heartbeat(self) -> None:
        """An idle round (rank 0, nothing to step): keeps the group's liveness visible both ways."""
        self.exchange(ACTION_IDLE)

    def stop(self) -> None:
        """Tell the followers to exit 0 (rank 0, after its drain)."""
        self.exchange(ACTION_STOP)

    # -- rank 0 records batch changes
    def record_insert(self, uid: int, prompt: Sequence[int], max_tokens: int, sampler: SamplerSpec) -> None:
        self._ops.extend(InsertOp(uid, max_tokens, sampler, list(prompt)).encode())

    def record_remove(self, uids: Sequence[int]) -> None:
        self._ops.extend(RemoveOp(list(uids)).encode())

    def wrap_sampler(self, spec: SamplerSpec, sampler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`sampler` whose token ids are rank 0's on every rank (an all_sum inside the step's graph)."""
        import mlx.core as mx

        rank0 = self.rank == 0
        group = self.group

        def sample(logprobs: Any) -> Any:
            tokens = sampler(logprobs).astype(mx.int32)
            mine = tokens if rank0 else mx.zeros(tokens.shape, dtype=mx.int32)
            return mx.distributed.all_sum(mine, group=group).astype(mx.uint32)

        sample.spec = spec  # type: ignore[attr-defined]
        return sample

    # -- health
    def fail(self, reason: str) -> None:
        with self._lock:
            if self._error is None:
                self._error, self._failed_at = reason, time.monotonic()

    def failure(self) -> str | None:
        """Why the group is broken (a peer lost, or a collective past `rank_timeout_s`), else None."""
        with self._lock:
            if self._error is None and self._since is not None and time.monotonic() - self._since > self.rank_timeout_s:
                self._error = f"a rank did not answer within {self.rank_timeout_s:g} s (stalled or unreachable)"
                self._failed_at = time.monotonic()
            return self._error

    def failed_for(self) -> float:
        """Seconds since the group broke (0 while it is fine)."""
        with self._lock:
            return time.monotonic() - self._failed_at if self._error is not None else 0.0

    def describe(self) -> dict[str, Any]:
        """The `distributed` object of /v1/health."""
        error = self.failure()
        # rank 0 talks to its ring neighbours 1 and N−1; with two ranks the culprit is certain.
        failed = (1 if self.size == 2 else None) if error else None
        return {
            "rank": self.rank,
            "world_size": self.size,
            "parallel": self.parallel,
            "layers_per_stage": self.stages,
            "failed_rank": failed,
            "error": error,
            "control_messages": self.messages_sent,
            "control_seconds": round(self.control_seconds, 6),
        }


class LockstepBatch:
    """Rank 0's view of mlx-lm's BatchGenerator: `insert`/`remove` are applied and recorded for the
    followers; `next()` first sends them (one control round, ACTION_STEP). Everything else passes through."""

    def __init__(self, batch: Any, lockstep: Lockstep):
        self._batch = batch
        self._lockstep = lockstep

    def insert(self, prompts: list[list[int]], max_tokens: list[int], samplers: list[Any], **kwargs: Any) -> list[int]:
        uids = self._batch.insert(prompts, max_tokens=max_tokens, samplers=samplers, **kwargs)
        for uid, prompt, limit, sampler in zip(uids, prompts, max_tokens, samplers):
            self._lockstep.record_insert(uid, prompt, limit, sampler.spec)
        return uids

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> Any:
        self._lockstep.record_remove(uids)
        return self._batch.remove(uids, return_prompt_caches=return_prompt_caches)

    def next(self) -> Any:
        self._lockstep.exchange(ACTION_STEP)
        with self._lockstep.watched():  # the step's graph holds collectives too (activations, token ids)
            return self._batch.next()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)


def follow(engine: Any, lockstep: Lockstep) -> int:
    """A follower rank's loop: replay rank 0's batch changes and step with it until STOP (returns 0).

    `engine` is a loaded `engine.Engine` (its raw BatchGenerator, cache factory, stop sequences and
    sampler construction are reused). Raises RuntimeError when rank 0 is gone, ModelError when the
    batches diverge."""
    batch = engine._batch
    while True:
        action, ops = lockstep.exchange(ACTION_IDLE)
        for op in ops:
            if isinstance(op, RemoveOp):
                batch.remove(op.uids)
                continue
            (uid,) = batch.insert(
                [op.prompt],
                max_tokens=[op.max_tokens],
                caches=[engine._make_cache()],
                all_tokens=[[]],
                samplers=[engine._sampler_for(op.sampler)],
                logits_processors=[[]],
                stop_sequences=[engine._stop_sequences],
            )
            if uid != op.uid:
                raise ModelError(f"rank {lockstep.rank} diverged from rank 0: batch uid {uid} != {op.uid}")
        if action == ACTION_STOP:
            return 0
        if action == ACTION_STEP:
            with lockstep.watched():
                batch.next()


# ---------------------------------------------------------------------------------------------- loading
WEIGHT_DTYPE_CODES = tuple(value for value in WEIGHTS_DTYPES if value != "auto")  # what apply_weights_dtype returns


def load_sharded(
    model_path: Path, lockstep: Lockstep, budget_bytes: float, cast: Callable[[Any], str]
) -> tuple[Any, Any]:
    """Load this rank's share of the model: (model, tokenizer), weights evaluated.

    Pipeline: budgets are gathered from all ranks and `split_layers` sizes the stages; the model is
    loaded lazily and pruned to this rank's stage before its weights are read. Tensor: mlx-lm's
    `model.shard(group)`. `cast(module)` applies the weights dtype (`engine.weights_dtype`) to this rank's
    share and returns what it chose; every rank must choose the same (activations travel in it).
    Raises ModelError when the model has no such support or the ranks chose different dtypes."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(model_path), lazy=True)
    if lockstep.parallel == "tensor":
        if not hasattr(model, "shard"):
            raise ModelError(
                f"{type(model).__module__} has no tensor-parallel shard() in mlx-lm; use --parallel pipeline"
            )
        model.shard(lockstep.group)
        mx.eval(model.parameters())
        chosen = cast(model)
    else:
        budgets = lockstep.all_gather_floats(float(budget_bytes) / 2**30)
        by_stage = [budgets[lockstep.size - 1 - s] for s in range(lockstep.size)]  # stage s = rank N−1−s
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            raise ModelError(
                f"{type(model).__module__}: pipeline needs a decoder with model.embed_tokens, model.layers and model.norm"
            )
        lockstep.stages = split_layers(len(inner.layers), by_stage)
        model = PipelineStage(model, lockstep.group, lockstep.stages)
        mx.eval(model.parameters())
        chosen = cast(model.model)
    code = WEIGHT_DTYPE_CODES.index(chosen) if chosen in WEIGHT_DTYPE_CODES else len(WEIGHT_DTYPE_CODES)
    codes = lockstep.all_gather_floats(float(code))  # also: everyone loaded, nobody times out on a slow loader
    if len(set(codes)) > 1:
        names = [WEIGHT_DTYPE_CODES[int(c)] if int(c) < len(WEIGHT_DTYPE_CODES) else "other" for c in codes]
        raise ModelError(
            f"the ranks chose different weights dtypes {names} (weights_dtype auto depends on each host's free memory); set --weights-dtype"
        )
    return model, tokenizer


class PipelineStage:
    """One pipeline stage of an mlx-lm decoder: this rank's contiguous layers, the embedding on the
    first stage (rank N−1), the final norm and head on the last (rank 0). Called like the model:
    `stage(inputs (B, L) int, cache=[one per local layer])` → logits (B, L, vocab); on stages other than
    the last the logits are zeros (rank 0 samples; see the module docstring). The activations sent per
    call are B×L×hidden values of the model's dtype.
    """

    def __init__(self, model: Any, group: Any, stages: Sequence[int]):
        import mlx.nn as nn

        self.model = model
        self.group = group
        rank, size = group.rank(), group.size()
        stage = size - 1 - rank
        self.first, self.last = stage == 0, stage == size - 1
        self.rank = rank
        inner = model.model
        start = sum(stages[:stage])
        end = start + stages[stage]
        self.start, self.end = start, end
        self.args = model.args  # every mlx-lm model keeps its ModelArgs (vocab_size, hidden_size) here
        tied = not hasattr(model, "lm_head")
        self.vocab_size = self.args.vocab_size
        self.hidden_size = self.args.hidden_size
        self.sliding_window = getattr(inner, "sliding_window", None)
        self.full_layers = inner.layers
        inner.layers = inner.layers[start:end]
        # Drop what this stage never runs, so its weights are never read.
        if not self.first and not (self.last and tied):
            inner.embed_tokens = nn.Identity()
        if not self.last:
            inner.norm = nn.Identity()
            if not tied:
                model.lm_head = nn.Identity()
        self._dtype: Any = None  # of the activations: known once the weights dtype is applied

    @property
    def layers(self) -> list[Any]:
        return self.model.model.layers

    def parameters(self) -> Any:
        return self.model.parameters()

    def make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        caches = []
        for layer in self.layers:
            if getattr(layer, "use_sliding", False) and self.sliding_window:
                caches.append(RotatingKVCache(max_size=self.sliding_window))
            else:
                caches.append(KVCache())
        return caches

    def __call__(self, inputs: Any, cache: list[Any] | None = None, **_: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        inner = self.model.model
        batch, length = inputs.shape[:2]
        if self.first:
            h = inner.embed_tokens(inputs)
        else:
            if self._dtype is None:
                self._dtype = _activation_dtype(self.layers[0])
            h = mx.distributed.recv((batch, length, self.hidden_size), self._dtype, self.rank + 1, group=self.group)
        if cache is None:
            cache = [None] * len(self.layers)
        masks: dict[bool, Any] = {}
        for layer, layer_cache in zip(self.layers, cache):
            sliding = bool(getattr(layer, "use_sliding", False))
            if sliding not in masks:
                masks[sliding] = create_attention_mask(
                    h, layer_cache, window_size=self.sliding_window if sliding else None
                )
            h = layer(h, masks[sliding], cache=layer_cache)
        if not self.last:
            # Send now: the prompt pass evaluates only the caches, never the logits.
            mx.eval(mx.distributed.send(h, self.rank - 1, group=self.group))
            return mx.zeros((batch, length, self.vocab_size), dtype=mx.float32)
        out = inner.norm(h)
        if hasattr(self.model, "lm_head"):
            return self.model.lm_head(out)
        return inner.embed_tokens.as_linear(out)


def _activation_dtype(layer: Any) -> Any:
    """The dtype activations travel in: the first floating parameter of the stage's first layer (a
    norm weight in the llama family; quantized weights are integers and are skipped)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(layer.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def start_group(parallel: str, config: Mapping[str, Any], model_id: str, rank_timeout_s: float) -> Lockstep | None:
    """Join the distributed group `mlx.launch` set up; None when this is a single process (world size 1).

    Checks the split before anything loads (ConfigError, same on every rank). On Linux every rank also asks
    for SIGTERM when its launcher (`mlx.launch`, or the ssh session it started) dies: rank 0 then drains and
    stops the group instead of holding its port as an orphan (`processes.exit_with_parent`)."""
    import mlx.core as mx

    group = mx.distributed.init()
    if group.size() == 1:
        return None
    exit_with_parent(signal.SIGTERM)
    check_split(config, group.size(), parallel, model_id)
    return Lockstep(group, parallel, rank_timeout_s)


def run_follower(engine: Any) -> int:
    """`serve` on a rank > 0: no HTTP; load and follow rank 0 (`Engine.follow`); SIGINT/SIGTERM are ignored
    (rank 0 decides when the group stops). Exits the process with
    status 1 when a collective stays open past `rank_timeout_s` (rank 0 stalled) — a watchdog thread,
    since the stuck collective cannot be interrupted. Returns 0 after rank 0's STOP, 1 on any error."""
    import os
    import signal

    lockstep: Lockstep = engine.lockstep
    # A follower lives and dies with rank 0: a terminal's Ctrl-C or a supervisor's SIGTERM to the whole
    # group drains rank 0, whose STOP (or closed sockets) ends this rank — never a half-stepped batch.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)

    def watchdog() -> None:
        while True:
            time.sleep(IDLE_HEARTBEAT_S)
            reason = lockstep.failure()
            if reason is not None:
                log.error("rank %d: %s; exiting with status 1", lockstep.rank, reason)
                os._exit(1)

    threading.Thread(target=watchdog, name="macprovider-rank-watchdog", daemon=True).start()
    log.info(
        "rank %d of %d: loading %s (%s parallel)", lockstep.rank, lockstep.size, engine.model_id, lockstep.parallel
    )
    try:
        code = engine.follow()
    except Exception as exc:  # noqa: BLE001 - one line, then a non-zero exit for the launcher
        log.error(
            "rank %d stopped: %s: %s",
            lockstep.rank,
            exc.__class__.__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return 1
    log.info("rank %d: rank 0 said stop; exiting", lockstep.rank)
    return code
