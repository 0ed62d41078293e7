"""Speculative decoding inside the continuous batch (macprovider/engine/speculative.py): prompt-lookup drafts,
per-row KV rollback (kvcache.RowTrimMixin), the acceptance rule's output distribution, and on the tiny model:
greedy output token-identical with and without speculation, batched, with kv-bits, stop strings, max_tokens
and logprobs."""

from __future__ import annotations

import asyncio
import collections

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from macprovider.engine.engine import Engine
from macprovider.engine.kvcache import QuantizedKVCache, row_trimmable
from macprovider.engine.protocol import GenerationRequest
from macprovider.engine.speculative import PromptLookup, SpeculativeGenerationBatch, StepCosts

HEADS, DIM = 2, 64


# ------------------------------------------------------------------------------------------- drafts
def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    # The context ends "3 7 8": neither "3 7 8" nor "7 8" occurred before.
    assert lookup.propose(3) == []
    # With pending 2 the tail is "7 8 2" / "8 2": new too (1-token matches are not looked up).
    assert lookup.propose(3, pending=2) == []
    # As a last resort (filling a pass that runs anyway) one token may match: "2" last preceded 3 7 8.
    assert lookup.propose(3, pending=2, shortest=1) == [3, 7, 8]
    lookup.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3])
    # "2 3" last occurred at 6..7 (followed by 7 8 2) — the latest earlier one, not the first (followed by 4).
    assert lookup.propose(3) == [7, 8, 2]
    assert lookup.propose(2) == [7, 8]
    # With pending 7 the tail 3-gram "2 3 7" occurred at 6..8, followed by 8 2 3 — and then by the pending 7.
    assert lookup.propose(4, pending=7) == [8, 2, 3, 7]


def test_prompt_lookup_prefers_the_longer_match():
    lookup = PromptLookup([5, 1, 2, 6, 9, 1, 2, 7, 5, 1, 2])
    # The 2-gram "1 2" last occurred at 5..6 (→ 7), the 3-gram "5 1 2" at 0..2 (→ 6): the 3-gram wins.
    assert lookup.propose(1) == [6]


def test_step_costs_prior_and_measurements():
    costs = StepCosts()
    assert costs.estimate(8, 3) == pytest.approx(1 + 0.26 * 2)  # unmeasured: the linear prior, relative
    costs.record(8, 1, 0.2)
    assert costs.estimate(8, 3) == pytest.approx(0.2 * (1 + 0.26 * 2))
    costs.record(8, 3, 9.0)  # a first step of a new shape: replaced by the second
    costs.record(8, 3, 0.3)
    assert costs.estimate(8, 3) == pytest.approx(0.3)
    costs.record(8, 3, 0.5)
    assert costs.estimate(8, 3) == pytest.approx(0.3 + 0.2 * 0.2)


# ------------------------------------------------------------------------------------- row rollback
def _kv(rows: int, length: int, seed: int) -> tuple[mx.array, mx.array]:
    mx.random.seed(seed)
    return mx.random.normal((rows, HEADS, length, DIM)), mx.random.normal((rows, HEADS, length, DIM))


def _single(bits: int | None):
    return KVCache() if bits is None else QuantizedKVCache(group_size=64, bits=bits)


def _dense(keys, bits: int | None) -> mx.array:
    return keys if bits is None else mx.dequantize(*keys, group_size=64, bits=bits)


@pytest.mark.parametrize("bits", [None, 8])
def test_row_trim_keeps_exactly_the_accepted_positions(bits):
    """Three rows of different lengths; a verification step writes 4 positions to each and the rows keep 1, 4
    and 2 of them; then 2 more steps. Every row must look like a cache that only ever saw its kept positions:
    the same keys (extract), the same RoPE offset, and an attention mask that admits exactly those columns."""
    lengths = [5, 9, 2]
    singles, history = [], []
    for row, length in enumerate(lengths):
        keys, values = _kv(1, length, seed=row)
        cache = _single(bits)
        cache.update_and_fetch(keys, values)
        singles.append(cache)
        history.append([(keys[:, :, i], values[:, :, i]) for i in range(length)])
    batch = row_trimmable(type(singles[0]).merge(singles))
    assert batch is not None

    def write(width: int, seed: int) -> tuple[mx.array, mx.array]:
        keys, values = _kv(len(lengths), width, seed)
        batch.update_and_fetch(keys, values)
        return keys, values

    keys, values = write(4, seed=10)
    kept = [1, 4, 2]
    batch.trim_rows([4 - k for k in kept])
    for row, k in enumerate(kept):
        history[row] += [(keys[row : row + 1, :, i], values[row : row + 1, :, i]) for i in range(k)]
    for step in range(2):
        keys, values = write(1, seed=20 + step)
        for row in range(len(lengths)):
            history[row].append((keys[row : row + 1, :, 0], values[row : row + 1, :, 0]))

    assert batch.offset.tolist() == [len(h) for h in history]
    mask = batch.make_mask(1)  # (B, 1, 1, idx + 1): the next query may see its kept history and itself
    for row, rows_history in enumerate(history):
        assert int(mask[row, 0, 0].astype(mx.int32).sum().item()) == len(rows_history) + 1
        single = batch.extract(row)
        want_keys = mx.stack([k for k, _ in rows_history], axis=2)
        want_values = mx.stack([v for _, v in rows_history], axis=2)
        tolerance = 1e-6 if bits is None else 0.05
        assert single.offset == len(rows_history)
        assert mx.allclose(_dense(single.keys, bits)[..., : single.offset, :], want_keys, atol=tolerance).item()
        assert mx.allclose(_dense(single.values, bits)[..., : single.offset, :], want_values, atol=tolerance).item()

    # Membership changes keep the holes aligned: drop row 1, extend with a fresh sequence.
    batch.filter([0, 2])
    history = [history[0], history[2]]
    fresh_keys, fresh_values = _kv(1, 3, seed=99)
    fresh = _single(bits)
    fresh.update_and_fetch(fresh_keys, fresh_values)
    batch.extend(type(fresh).merge([fresh]))
    history.append([(fresh_keys[:, :, i], fresh_values[:, :, i]) for i in range(3)])
    for row, rows_history in enumerate(history):
        assert batch.extract(row).offset == len(rows_history)
    mask = batch.make_mask(1)
    assert [int(mask[row, 0, 0].astype(mx.int32).sum().item()) for row in range(3)] == [len(h) + 1 for h in history]

    # Compaction gathers the kept positions; nothing a row sees changes.
    before = [_dense(batch.extract(row).keys, bits) for row in range(3)]
    padding = batch.left_padding.tolist()
    kept_positions = [batch._kept_positions(row, padding[row]) for row in range(3)]
    batch.compact(kept_positions, max(len(p) for p in kept_positions))
    assert batch.holes is None
    assert batch.offset.tolist() == [len(h) for h in history]
    for row in range(3):
        assert mx.array_equal(_dense(batch.extract(row).keys, bits), before[row]).item()


def test_holes_are_compacted_once_they_waste_enough_columns():
    """Rows that take turns rejecting drafts leave holes in every row; once they waste COMPACT_MIN_COLUMNS (and
    an eighth of the cache) the cache gathers itself back to the plain layout, keeping every row's positions."""
    batch = row_trimmable(KVCache.merge([KVCache(), KVCache()]))
    history: list[list[mx.array]] = [[], []]
    compacted_at = None
    for step in range(60):
        keys, values = _kv(2, 4, seed=step)
        batch.update_and_fetch(keys, values)
        kept = [4, 1] if step % 2 == 0 else [1, 4]
        batch.trim_rows([4 - k for k in kept])
        for row, k in enumerate(kept):
            history[row] += [keys[row : row + 1, :, i] for i in range(k)]
        if batch.holes is None and compacted_at is None and step > 0:
            compacted_at = step
    assert compacted_at is not None and batch._idx < 4 * 60
    for row in range(2):
        single = batch.extract(row)
        assert single.offset == len(history[row]) == 150
        assert mx.array_equal(single.keys[..., : single.offset, :], mx.stack(history[row], axis=2)).item()


def test_row_trim_attention_equals_attention_over_the_kept_positions():
    """Full precision: attention of a new query through the holed batch cache and its mask equals attention
    over a cache holding only the kept positions."""
    singles = []
    for row, length in enumerate([4, 6]):
        cache = KVCache()
        cache.update_and_fetch(*_kv(1, length, seed=row))
        singles.append(cache)
    batch = row_trimmable(KVCache.merge(singles))
    batch.update_and_fetch(*_kv(2, 5, seed=7))
    batch.trim_rows([4, 1])  # rows keep 1 and 4 of the 5 positions
    query = mx.random.normal((2, HEADS, 1, DIM))
    new_keys, new_values = _kv(2, 1, seed=8)
    mask = batch.make_mask(1)
    keys, values = batch.update_and_fetch(new_keys, new_values)
    got = mx.fast.scaled_dot_product_attention(query, keys, values, scale=0.125, mask=mask)
    for row in range(2):
        single = batch.extract(row)  # kept history + the new position
        want = mx.fast.scaled_dot_product_attention(
            query[row : row + 1],
            single.keys[..., : single.offset, :],
            single.values[..., : single.offset, :],
            scale=0.125,
        )
        assert mx.allclose(got[row : row + 1], want, atol=1e-5).item()


# ------------------------------------------------------------------------------ acceptance rule
class _FixedDistributionModel:
    """A stand-in model whose next-token distribution is `probabilities` at every position whatever the
    context (it still writes each position to the caches, as a model does)."""

    def __init__(self, probabilities: list[float]):
        self.logits = mx.log(mx.array(probabilities))

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        rows, width = inputs.shape
        for layer in cache:
            layer.update_and_fetch(mx.zeros((rows, 1, width, 8)), mx.zeros((rows, 1, width, 8)))
        return mx.broadcast_to(self.logits, (rows, width, self.logits.shape[0]))


def test_sampled_output_keeps_the_target_distribution_under_speculation():
    """Leviathan et al.'s rule for a fixed draft token d: accept with probability p(d), else a token drawn from
    p without d. The target here never depends on context, so every emitted token must be distributed as p —
    with the draft always the rarest token. Accepting drafts unchecked, or resampling from p on rejection,
    would put far more mass on it (about 0.5 and 0.0975 instead of 0.05)."""
    from mlx_lm.generate import StopSequences
    from mlx_lm.models.cache import BatchKVCache
    from mlx_lm.sample_utils import make_sampler

    probabilities = [0.5, 0.3, 0.15, 0.05]
    rare = 3
    model = _FixedDistributionModel(probabilities)
    mx.random.seed(0)
    sampler = make_sampler(temp=1.0)
    rows = 4
    batch = SpeculativeGenerationBatch(
        model,
        uids=list(range(rows)),
        inputs=mx.array([0] * rows, dtype=mx.uint32),
        prompt_cache=[BatchKVCache([0] * rows)],
        tokens=[[0, 1, 2] for _ in range(rows)],
        samplers=[sampler] * rows,
        fallback_sampler=sampler,
        logits_processors=[()] * rows,
        stop_sequences=[StopSequences()] * rows,
        max_tokens=[100_000] * rows,
        max_draft_tokens=3,
    )
    batch.prompt_cache = [row_trimmable(layer) for layer in batch.prompt_cache]
    batch._may_draft = lambda: True  # type: ignore[method-assign]
    batch._draft = lambda row, pending: [rare, rare, rare]  # type: ignore[method-assign]
    batch._choose_width = lambda drafts: 4  # type: ignore[method-assign]
    counts: collections.Counter[int] = collections.Counter()
    while sum(counts.values()) < 12_000:
        for response in batch.next():
            counts[response.token] += 1
    total = sum(counts.values())
    assert batch.accepted_tokens > 0  # drafts were verified and some accepted
    for token, p in enumerate(probabilities):
        standard_error = (p * (1 - p) / total) ** 0.5
        assert abs(counts[token] / total - p) < 5 * standard_error, (token, counts[token] / total, p)


# ------------------------------------------------------------------------------------ engine, tiny model
# Prompts whose greedy continuation on the tiny random model repeats itself, so prompt lookup drafts.
PROMPTS = [
    "one two three four one two three four one two three four one two",
    "def f(x): return x + 1\ndef g(x): return x + 2\ndef h(x): return x",
    "abc abc abc abc abc abc abc abc",
    "The sea is wide and the sea is deep, the sea is wide and the sea",
]


async def _run(engine: Engine, prompts: list[str], **request):
    async def one(text: str):
        handle = engine.submit(GenerationRequest(prompt_tokens=engine.encode_text(text), **request))
        chunks = [chunk async for chunk in handle]
        return chunks

    return await asyncio.gather(*(one(p) for p in prompts))


def _text(chunks) -> str:
    return "".join(c.text for c in chunks)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_greedy_output_is_token_identical_with_speculation(tiny_model, engines, kv_bits):
    plain = engines(tiny_model, max_concurrency_override=4, kv_bits=kv_bits)
    speculative = engines(tiny_model, max_concurrency_override=4, kv_bits=kv_bits, speculative="prompt-lookup")
    request = {"max_tokens": 48, "temperature": 0.0, "top_logprobs": 0}
    without = asyncio.run(_run(plain, PROMPTS, **request))
    with_speculation = asyncio.run(_run(speculative, PROMPTS, **request))
    assert [_text(c) for c in with_speculation] == [_text(c) for c in without]
    for a, b in zip(without, with_speculation):
        logprobs_a = [e.logprob for chunk in a for e in chunk.logprobs]
        logprobs_b = [e.logprob for chunk in b for e in chunk.logprobs]
        assert len(logprobs_a) == len(logprobs_b) == 48
        assert max(abs(x - y) for x, y in zip(logprobs_a, logprobs_b)) < (1e-4 if kv_bits is None else 1e-3)
        assert a[-1].usage.generated_tokens == b[-1].usage.generated_tokens == 48
    stats = speculative.stats()
    assert stats.speculative_accepted_tokens_total > 0
    assert stats.speculative_drafted_tokens_total >= stats.speculative_accepted_tokens_total
    assert plain.stats().speculative_drafted_tokens_total == 0
    health = stats.engine_json()
    assert 0 < health["speculative_acceptance_rate"] <= 1


def test_speculation_keeps_stop_strings_and_max_tokens_exact(tiny_model, engines):
    plain = engines(tiny_model, max_concurrency_override=2)
    speculative = engines(tiny_model, max_concurrency_override=2, speculative="prompt-lookup", speculative_tokens=8)
    reference = asyncio.run(_run(plain, PROMPTS[:2], max_tokens=40, temperature=0.0))
    # A stop string taken from the middle of each reference output ends both at the same place.
    for prompt, chunks in zip(PROMPTS[:2], reference):
        text = _text(chunks)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        if not stop.strip():
            continue
        a = asyncio.run(_run(plain, [prompt], max_tokens=40, temperature=0.0, stop=[stop]))[0]
        b = asyncio.run(_run(speculative, [prompt], max_tokens=40, temperature=0.0, stop=[stop]))[0]
        assert _text(b) == _text(a)
        assert b[-1].finish_reason == a[-1].finish_reason == "stop"
    for max_tokens in (1, 2, 7):
        a = asyncio.run(_run(plain, PROMPTS[:2], max_tokens=max_tokens, temperature=0.0))
        b = asyncio.run(_run(speculative, PROMPTS[:2], max_tokens=max_tokens, temperature=0.0))
        assert [_text(c) for c in b] == [_text(c) for c in a]
        assert [c[-1].usage.generated_tokens for c in b] == [max_tokens, max_tokens]


def test_seeded_sampling_with_speculation_reproduces(tiny_model, engines):
    speculative = engines(tiny_model, max_concurrency_override=4, speculative="prompt-lookup")
    request = {"max_tokens": 24, "temperature": 0.8, "seed": 7}
    first = [_text(c) for c in asyncio.run(_run(speculative, PROMPTS, **request))]
    second = [_text(c) for c in asyncio.run(_run(speculative, PROMPTS, **request))]
    assert first == second


def test_sequences_with_logits_processors_never_draft_but_share_the_batch(tiny_model, engines):
    plain = engines(tiny_model, max_concurrency_override=2)
    speculative = engines(tiny_model, max_concurrency_override=2, speculative="prompt-lookup")

    async def pair(engine: Engine):
        penalized = engine.submit(
            GenerationRequest(
                prompt_tokens=engine.encode_text(PROMPTS[0]), max_tokens=32, temperature=0.0, presence_penalty=1.5
            )
        )
        free = engine.submit(
            GenerationRequest(prompt_tokens=engine.encode_text(PROMPTS[2]), max_tokens=32, temperature=0.0)
        )
        return [_text([c async for c in penalized]), _text([c async for c in free])]

    assert asyncio.run(pair(speculative)) == asyncio.run(pair(plain))
