"""The memory model of a served model: autotune's pre-check of a candidate and the fleet's
admission in `serve` (which models fit together) use this one estimate.

"Measured peak" (one definition, used by every trial row, the report and the tests):
    measured peak = the serving child's MLX peak (`mx.get_peak_memory()` over its whole life, reported by
                    `GET /v1/health` as `engine.peak_memory_bytes`) + the runtime baseline below.
MLX's peak counts every buffer MLX allocated (weights, KV cache, activations) on Metal and on the CPU
backend alike; the baseline is what the process holds before MLX allocates anything. (On Linux the serving
child's RSS high-water mark runs a few tens of MiB above this: its tokenizer and HTTP server state.)

estimate = weights + kv_live + prompt_cache + prefill + baseline, term by term:
  weights      exact bytes from the safetensors headers (sum of every tensor's `data_offsets` span — packed
               quantized weights, scales and biases included), or the index's `metadata.total_size` — the
               weights as stored. When `serve` will cast them (`weights_dtype: auto` on MLX's CPU backend:
               float32 if that copy fits half the available memory, config.choose_weights_dtype, applied by
               engine/weights_dtype.py), add the cast copy (parameters × target dtype size; parameters counted from
               the headers, a quantized weight's packed words × 32 / bits) and the largest tensor dequantized in
               the stored dtype: while `cast_weights` evaluates, the stored and the cast weights are both alive.
               When float32 does not fit, `auto` keeps a quantized checkpoint's quantized layers and casts its
               16-bit tensors (scales, biases, norms) to float32 (`quantized-float32`): add their float32 copy.
               Candidates run with the default `weights_dtype` (auto); the CPU backend is every platform but
               Apple silicon macOS, unless the `mlx-cuda` backend is installed.
  kv_live      live sequences × allocated tokens × KV bytes per token. Live sequences = max_batch, or fewer
               when the workload never has that many requests in flight; a sequence's tokens = max_context,
               or the workload's longest prompt + max_tokens when that is less (a KV cache only grows as far
               as its sequence does; mlx-lm's BatchKVCache left-pads every row to the longest one, so the
               batch holds live sequences × the longest). A replayed workload names which requests can be in
               flight together (`live_windows`: each request with the ones sent before it, as many as its
               recorded concurrency — the replay sends in order and the engine admits FIFO): the term is the
               largest window's min(size, max_batch) × its longest sequence. Four concurrent short chats and
               one long agent prompt at a time no longer count as four long sequences (measured on SmolLM2,
               recorded workload, max-batch 4: +16.3 % before). Allocated tokens = those tokens rounded up to KV_ALLOCATION_STEP (mlx_lm.models.cache.KVCache.step = 256; BatchKVCache and our
               BatchQuantizedKVCache grow by the same step). KV bytes per token = 2 (K and V) × layers ×
               kv_heads (GQA: `num_key_value_heads`) × head_dim × bytes per element, where bytes per element
               is the activation dtype size at full precision — the dtype serve computes in, so 4 when
               `weights_dtype` casts to float32 or quantized-float32 (compute_dtype_bytes), else the
               checkpoint's `torch_dtype` — and with kv-bits b it is b/8 + 2 × dtype
               size / group size (mx.quantize: b-bit codes plus one scale and one bias per group of 64, or 32
               when 64 does not divide head_dim — engine.kvcache.kv_group_size). float16 activations give
               the usual 1.0625 B (8-bit) and 0.5625 B (4-bit).
  prompt_cache finished sequences the engine keeps for prefix reuse (mlx-lm `LRUPromptCache`, at most
               PROMPT_CACHE_ENTRIES entries and `prompt_cache_bytes`, default 1 GiB; each entry is a contiguous
               copy of its tokens' KV, `BatchKVCache.extract`): the tokens the trial's workload leaves there ×
               KV bytes per token, capped by `prompt_cache_bytes`. A provider that serves for hours fills it up
               to that cap; a trial only holds what its requests left.
  prefill      the activations of one prefill step: mlx-lm's BatchGenerator prefills `prefill_batch_size`
               (= max_batch, engine) prompts in chunks of at most PREFILL_STEP_SIZE tokens (its
               `prefill_step_size` default, 2048). Per token of a chunk: dtype size × (3 × intermediate_size
               (SwiGLU gate, up and their product, mlx_lm/models/llama.py MLP) + 4 × hidden_size (residual,
               normed input, attention output, o_proj)) + 4 B × heads × chunk (the float32 attention scores
               MLX's CPU `scaled_dot_product_attention` materialises; Metal's fused kernel does not, so there
               the term is an upper bound). chunk = min(PREFILL_STEP_SIZE, max_context, the workload's longest
               prompt); prompts prefilled together = the live sequences.
               A replayed workload prefills only the uncached rest of a prompt that reuses a prefix (engine
               `_admit` inserts `rest` after `LRUPromptCache.fetch_nearest_cache`): there the term is the larger
               of one request prefilling the longest prompt alone (the warm-up, or a cold request) and, over
               the `live_windows`, min(size, max_batch) requests prefilling the window's longest uncached rest
               together (chunk = that rest, scores against the longest prompt as keys). Counting whole prompts
               for every live sequence measured +13.6 % at 8 in flight.
  baseline     the runtime's own footprint: the RSS of a bare child that imports what `macprovider serve`
               imports (MLX, mlx-lm, the HTTP server) and allocates nothing, measured once per machine and
               runtime (`autotune.memory.runtime_baseline_bytes`, cached in the config directory); the fleet in
               `serve` counts its own process's footprint instead.
budget = `--memory-budget-gb`, else `hardware.memory_budget_bytes` (Metal's recommended working set where
MLX reports it, else physical RAM minus a reserve). Reading headers is a few small reads, so a hopeless
candidate is rejected in milliseconds without loading anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from macprovider.core.config import PROMPT_CACHE_ENTRIES  # noqa: F401 - the engine's prompt cache size
from macprovider.core.hardware import GIB, MIB  # noqa: F401 - re-exported for autotune's modules

# The safetensors header reader lives with the models (serve's preflight checks weights with it too).
from macprovider.models.safetensors import SafetensorsError, read_safetensors_header, weight_files  # noqa: F401

KV_ALLOCATION_STEP = 256  # mlx_lm.models.cache.KVCache.step (tests/test_autotune_memory.py pins it)
PREFILL_STEP_SIZE = 2048  # mlx_lm.generate.BatchGenerator prefill_step_size default (pinned by a test)
KV_GROUP_SIZES = (64, 32)  # engine.kvcache.kv_group_size: 64 when it divides head_dim, else 32
SCORE_BYTES = 4  # float32 attention scores (CPU scaled_dot_product_attention)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


# Safetensors dtype names → bytes per element (safetensors format spec).
def weights_bytes(model_dir: Path) -> int:
    """Exact weight bytes from the safetensors headers; the index `total_size` if a shard is unreadable.

    Raises SafetensorsError / OSError when neither is available.
    """
    model_dir = Path(model_dir)
    try:
        files = weight_files(model_dir)
        if not files:
            raise SafetensorsError("no safetensors weights")
        return sum(read_safetensors_header(f)[1] for f in files)
    except (OSError, SafetensorsError):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
            if isinstance(total, int) and total > 0:
                return total
        raise


def parameter_counts(model_dir: Path, config: dict[str, Any]) -> tuple[int, int]:
    """(parameters, parameters of the largest tensor) from the safetensors headers. A quantized weight
    (`X.weight` with `X.scales`) holds packed uint32 words of `bits` bits each (config `quantization`, per-path
    overrides); its `scales` / `biases` are quantization data, not parameters."""
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    total = largest = 0
    for path in weight_files(model_dir):
        header, _ = read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            base, _, leaf = name.rpartition(".")
            if leaf in ("scales", "biases") and f"{base}.weight" in header and f"{base}.scales" in header:
                continue
            count = _elements(info["shape"])
            if leaf == "weight" and f"{base}.scales" in header:
                entry = quantization.get(base)
                layer = entry if isinstance(entry, dict) else {}
                count = count * 32 // int(layer.get("bits") or quantization.get("bits") or 4)
            total += count
            largest = max(largest, count)
    return total, largest


def half_precision_elements(model_dir: Path) -> int:
    """Elements of the 16-bit floating tensors (F16 / BF16: scales, biases, norms, unquantized weights) in
    the safetensors headers — what `weights_dtype` quantized-float32 casts to float32."""
    return sum(
        _elements(info["shape"])
        for path in weight_files(model_dir)
        for name, info in read_safetensors_header(path)[0].items()
        if name != "__metadata__" and info.get("dtype") in ("F16", "BF16")
    )


def _elements(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def mlx_on_cpu() -> bool:
    """Whether MLX runs on its CPU backend here, without importing MLX: everywhere but Apple silicon macOS
    (Metal), unless the `mlx-cuda` backend is installed."""
    import platform
    from importlib import metadata

    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return False
    try:
        metadata.version("mlx-cuda")
        return False
    except metadata.PackageNotFoundError:
        return True


def compute_dtype_bytes(target: str | None, stored_dtype_bytes: int) -> int:
    """Bytes per activation / KV element once `serve` applied `target` (config.choose_weights_dtype): MLX
    computes in the dtype of the weights (and of a quantized layer's scales), so float32 and
    quantized-float32 give 4, float16 / bfloat16 give 2, as stored gives the checkpoint's own."""
    from macprovider.core.config import QUANTIZED_FLOAT32

    if target == QUANTIZED_FLOAT32:
        return 4
    return DTYPE_BYTES.get(target, stored_dtype_bytes) if target else stored_dtype_bytes


def served_weights(
    model_dir: Path, config: dict[str, Any], *, on_cpu: bool, available_bytes: int, setting: str = "auto"
) -> tuple[str | None, int]:
    """(what `serve` will do to the weights — config.choose_weights_dtype, None = as stored —, the weights
    term in bytes): as stored, plus the cast copy and the largest dequantized tensor when `serve` casts them
    (module docstring). Raises SafetensorsError/OSError like `weights_bytes`."""
    from macprovider.core.config import QUANTIZED_FLOAT32, choose_weights_dtype

    stored = weights_bytes(model_dir)
    params, largest = parameter_counts(model_dir, config)
    quantized = bool(config.get("quantization") or config.get("quantization_config"))
    target = choose_weights_dtype(setting, on_cpu, params * 4, available_bytes, quantized=quantized)
    if target == QUANTIZED_FLOAT32:  # the float32 copy of every 16-bit tensor, alive beside the stored ones
        return target, stored + half_precision_elements(model_dir) * 4
    shape_dtype = ModelShape.from_config(config).dtype_bytes
    if target is None or (not quantized and DTYPE_BYTES[target] == shape_dtype):
        return target, stored  # nothing to cast (MLX's astype to the same dtype is the array itself)
    return target, stored + params * DTYPE_BYTES[target] + largest * shape_dtype


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from config.json: layers, attention heads, KV heads, head dimension,
    hidden and intermediate sizes, activation dtype bytes."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From config.json (top level or `text_config`). ValueError/KeyError when a field is missing."""
        nested = "num_hidden_layers" not in config and config.get("text_config")
        scope: dict[str, Any] = config["text_config"] if nested else config
        layers = int(scope["num_hidden_layers"])
        heads = int(scope["num_attention_heads"])
        hidden = int(scope["hidden_size"])
        kv_heads = int(scope.get("num_key_value_heads") or heads)
        head_dim = int(scope.get("head_dim") or hidden // heads)
        intermediate = int(scope.get("intermediate_size") or 4 * hidden)
        dtype = str(scope.get("torch_dtype") or config.get("torch_dtype") or "float16")
        return cls(layers, heads, kv_heads, head_dim, hidden, intermediate, DTYPE_BYTES.get(dtype, 2))

    def kv_bytes_per_element(self, kv_bits: int | None) -> float:
        """Full precision: the dtype size; kv-bits b: b/8 + 2 × dtype size / group size (module docstring)."""
        if kv_bits is None:
            return float(self.dtype_bytes)
        group = next((g for g in KV_GROUP_SIZES if self.head_dim % g == 0), KV_GROUP_SIZES[-1])
        return kv_bits / 8 + 2 * self.dtype_bytes / group

    def kv_bytes_per_token(self, kv_bits: int | None) -> float:
        """2 (K and V) × layers × kv_heads × head_dim × bytes per element."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_element(kv_bits)

    def prefill_bytes(self, chunk: int, batch: int, keys: int | None = None) -> int:
        """Activations of one prefill step of `batch` prompts × `chunk` tokens attending to `keys` tokens
        (default `chunk`: nothing cached before the chunk) (module docstring)."""
        scores = SCORE_BYTES * self.heads * max(chunk, keys or 0)
        per_token = self.dtype_bytes * (3 * self.intermediate_size + 4 * self.hidden_size) + scores
        return int(batch * chunk * per_token)


KvShape = ModelShape  # the name earlier callers used


def kv_bytes(shape: ModelShape, tokens: int, kv_bits: int | None) -> int:
    """KV bytes of `tokens` tokens: 2 × layers × kv_heads × head_dim × bytes per element × tokens."""
    return int(shape.kv_bytes_per_token(kv_bits) * tokens)


def allocated_tokens(tokens: int) -> int:
    """Tokens a KV cache holding `tokens` has allocated: rounded up to KV_ALLOCATION_STEP."""
    return -(-tokens // KV_ALLOCATION_STEP) * KV_ALLOCATION_STEP


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's terms in bytes (module docstring), their total, and the `budget` it must fit."""

    weights: int
    kv: int
    prompt_cache: int
    prefill: int
    baseline: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.prompt_cache + self.prefill + self.baseline

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def terms(self) -> dict[str, int]:
        """The terms by name (for reports): weights, kv, prompt_cache, prefill, baseline."""
        return {
            "weights": self.weights,
            "kv": self.kv,
            "prompt_cache": self.prompt_cache,
            "prefill": self.prefill,
            "baseline": self.baseline,
        }

    def note(self) -> str:
        """`memory estimate …` note for an infeasible trial."""
        parts = " + ".join(f"{name} {value / GIB:.2f}" for name, value in self.terms().items())
        return f"memory estimate {self.total / GIB:.2f} GiB ({parts}) exceeds budget {self.budget / GIB:.2f} GiB"


def estimate(
    model_dir: Path,
    config: dict[str, Any],
    *,
    max_context: int,
    max_batch: int,
    kv_bits: int | None,
    budget: int,
    baseline: int = 0,
    cached_tokens: int = 0,
    prompt_cache_bytes: int | None = None,
    sequence_tokens: int | None = None,
    prompt_tokens: int | None = None,
    live_sequences: int | None = None,
    live_windows: Sequence[Sequence[tuple[int, int]]] | None = None,
    on_cpu: bool | None = None,
    available_bytes: int | None = None,
    weights_dtype: str = "auto",
) -> MemoryEstimate:
    """Estimate the peak memory of serving the model with these knobs (module docstring, term by term).

    baseline: the runtime baseline in bytes (`runtime_baseline_bytes`). cached_tokens: the tokens the
    workload's finished requests leave in the prompt cache (newest PROMPT_CACHE_ENTRIES requests);
    prompt_cache_bytes: the serving child's `prompt_cache_bytes` (default: `Settings` default).
    sequence_tokens / prompt_tokens / live_sequences: the workload's longest sequence (prompt + max_tokens),
    longest prompt, and most requests in flight; None = the knobs' worst case (max_context, max_context,
    max_batch). Each is capped by its knob. live_windows: for a replayed workload, per request the
    (sequence tokens, uncached prompt tokens) of it and of the requests that may be in flight with it, newest
    last (module docstring, kv_live and prefill); None = live_sequences of the longest. on_cpu / available_bytes: MLX's backend and the memory available
    to the child, for the weights' served dtype (default: `mlx_on_cpu()`, psutil's available memory);
    weights_dtype: the `weights_dtype` setting it is served with.
    Raises SafetensorsError/OSError/ValueError/KeyError when the files cannot be read.
    """
    from macprovider.core.config import Settings

    live = min(max_batch, live_sequences or max_batch)
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    target, weights = served_weights(
        model_dir,
        config,
        on_cpu=mlx_on_cpu() if on_cpu is None else on_cpu,
        available_bytes=available_bytes,
        setting=weights_dtype,
    )
    stored_shape = ModelShape.from_config(config)
    shape = replace(stored_shape, dtype_bytes=compute_dtype_bytes(target, stored_shape.dtype_bytes))
    cap = Settings().prompt_cache_bytes if prompt_cache_bytes is None else prompt_cache_bytes
    return MemoryEstimate(
        weights=weights,
        kv=kv_bytes(shape, live_kv_tokens(max_context, live, sequence_tokens, live_windows), kv_bits),
        prompt_cache=min(cap, kv_bytes(shape, cached_tokens, kv_bits)),
        prefill=prefill_term(shape, max_context, live, prompt_tokens, live_windows),
        baseline=baseline,
        budget=budget,
    )


def resident_bytes(
    model_dir: Path,
    *,
    max_context: int,
    max_batch: int,
    kv_bits: int | None,
    prompt_cache_bytes: int,
    weights_dtype: str = "auto",
) -> int:
    """What a model holds once a long-running server has served it at these knobs, in bytes, without the
    runtime baseline: the worst case of `estimate` (max_batch sequences of max_context tokens, one whole prefill
    chunk each) with the prompt cache full (its `prompt_cache_bytes` cap, or PROMPT_CACHE_ENTRIES sequences).
    `serve`'s fleet admits models by it, and autotune's pre-check counts the pinned models a candidate will
    sit beside with it. Raises SafetensorsError/OSError/ValueError/KeyError like `estimate`."""
    from macprovider.models.ids import read_model_config

    return estimate(
        model_dir,
        read_model_config(model_dir),
        max_context=max_context,
        max_batch=max_batch,
        kv_bits=kv_bits,
        budget=0,
        cached_tokens=PROMPT_CACHE_ENTRIES * max_context,
        prompt_cache_bytes=prompt_cache_bytes,
        weights_dtype=weights_dtype,
    ).total


def _live(window: Sequence[tuple[int, int]], live: int) -> Sequence[tuple[int, int]]:
    """The newest min(len(window), live) entries of a live window: what the batch can hold at once."""
    return window[-max(1, min(len(window), live)) :]


def live_kv_tokens(
    max_context: int, live: int, sequence_tokens: int | None, live_windows: Sequence[Sequence[tuple[int, int]]] | None
) -> int:
    """Allocated KV tokens of the live batch (module docstring, kv_live): `live` × the longest sequence, or the
    largest live window's rows × its longest sequence. Tokens."""
    if not live_windows:
        return live * allocated_tokens(min(max_context, sequence_tokens or max_context))
    return max(
        len(rows) * allocated_tokens(min(max_context, max(seq for seq, _ in rows)))
        for rows in (_live(w, live) for w in live_windows)
    )


def prefill_term(
    shape: ModelShape,
    max_context: int,
    live: int,
    prompt_tokens: int | None,
    live_windows: Sequence[Sequence[tuple[int, int]]] | None,
) -> int:
    """The prefill term (module docstring): `live` whole prompts of the longest prompt, or, for a replay
    (`live_windows`), the larger of one whole longest prompt and a window's rows prefilling its longest
    uncached rest together. Bytes."""
    prompt = min(max_context, prompt_tokens or max_context)
    whole = shape.prefill_bytes(min(PREFILL_STEP_SIZE, prompt), 1)
    if not live_windows:
        return live * whole
    return max(
        [whole]
        + [
            shape.prefill_bytes(
                min(PREFILL_STEP_SIZE, prompt, max(1, max(rest for _, rest in rows))), len(rows), keys=prompt
            )
            for rows in (_live(w, live) for w in live_windows)
        ]
    )


def relative_error(estimate_bytes: int | None, measured_bytes: int | None) -> float | None:
    """(estimate − measured) / measured, or None when either is unknown."""
    if not estimate_bytes or not measured_bytes:
        return None
    return (estimate_bytes - measured_bytes) / measured_bytes


def default_budget_bytes() -> int:
    """Metal's recommended working set where MLX reports it, else physical RAM minus a reserve.

    Imports MLX in-process only to query the device (called lazily, once per run).
    """
    from macprovider.core import hardware

    return hardware.memory_budget_bytes(hardware.mlx_recommended_working_set_bytes())


# ---------------------------------------------------------------------------------------------- several hosts
def rank_weight_fractions(model_dir: Path, parallel: str, layers_per_rank: Sequence[int]) -> list[float]:
    """Each rank's share of the stored weight bytes (by rank; they sum to ≥ 1), from the safetensors headers.

    pipeline: a tensor `….layers.<i>.…` belongs to the rank holding layer i (rank r holds stage N−1−r,
    `macprovider.core.cluster.parallel.layers_per_rank`); the embedding to the first stage (rank N−1), and to rank 0 too
    when the head is tied (no `lm_head` tensor); everything else (final norm, head) to rank 0 — the split
    `engine.distributed.PipelineStage` makes. tensor: mlx-lm's `shard()` splits the decoder layers' linear
    layers over the ranks and leaves embedding, norm and head whole on every rank.
    Raises SafetensorsError/OSError when the headers cannot be read, ValueError on a layer outside the split.
    """
    import re

    ranks = len(layers_per_rank)
    owner: list[int] = []  # layer index → rank
    for stage, count in enumerate(reversed(list(layers_per_rank))):
        owner += [ranks - 1 - stage] * count
    shares: list[float] = [0] * ranks
    total = 0
    sizes: dict[str, int] = {}
    for path in weight_files(model_dir):
        header, _ = read_safetensors_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = int(end) - int(start)
    tied = not any(".lm_head." in f".{name}" for name in sizes)
    for name, size in sizes.items():
        total += size
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if parallel == "tensor":
            for rank in range(ranks):
                shares[rank] += size / ranks if layer else size
        elif layer:
            index = int(layer.group(1))
            if index >= len(owner):
                raise ValueError(f"tensor {name}: layer {index} is outside a split of {len(owner)} layers")
            shares[owner[index]] += size
        elif "embed_tokens" in name:
            shares[ranks - 1] += size
            if tied and ranks > 1:
                shares[0] += size
        else:
            shares[0] += size
    if total == 0:
        raise SafetensorsError("no safetensors weights")
    return [share / total for share in shares]


def rank_estimates(
    whole: MemoryEstimate,
    weight_fractions: Sequence[float],
    layers_per_rank: Sequence[int] | None,
    budgets: Sequence[int],
) -> list[MemoryEstimate]:
    """Each rank's share of `whole` (the one-process estimate of the model and knobs), against its host's
    budget, by rank. weights × the rank's `rank_weight_fractions`; KV × its layers' share (pipeline:
    layers_per_rank[r] / layers; tensor: 1 / ranks, the KV heads are split); prompt cache 0 (distributed
    `serve` keeps none); prefill and baseline whole (every rank runs one prefill chunk through its layers,
    and every rank is a full runtime). The group fits when every share fits."""
    ranks = len(budgets)
    total_layers = sum(layers_per_rank) if layers_per_rank else None
    shares = []
    for rank in range(ranks):
        kv_fraction = layers_per_rank[rank] / total_layers if layers_per_rank and total_layers else 1 / ranks
        shares.append(
            MemoryEstimate(
                weights=int(whole.weights * weight_fractions[rank]),
                kv=int(whole.kv * kv_fraction),
                prompt_cache=0,
                prefill=whole.prefill,
                baseline=whole.baseline,
                budget=int(budgets[rank]),
            )
        )
    return shares
