"""The MLX engine in-process on the tiny test model: continuous batching, kv-bits, max-context, stop
strings, cancellation, queue limits, prefix reuse, seeds, failure of the generation thread."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from macprovider.core.errors import ApiError
from macprovider.engine.engine import Engine
from macprovider.engine.protocol import GenerationRequest

PROMPTS = [
    "Hello there",
    "Write a short poem about the sea and the sailors who sleep",
    "What is the capital of France? Answer briefly, please.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 and code def main(): return",
]


async def collect(engine: Engine, tokens, **request):
    """(text, chunks) of one sequence."""
    handle = engine.submit(GenerationRequest(prompt_tokens=tokens, **request))
    chunks = [chunk async for chunk in handle]
    return "".join(c.text for c in chunks), chunks


def token_logprobs(chunks) -> list[float]:
    """Each generated token's log-probability: these depend on every cached key and value, so they tell
    apart sequences whose greedy text is the same (the tiny random model often says the same thing)."""
    return [entry.logprob for chunk in chunks for entry in chunk.logprobs]


def assert_same_sequences(together, alone, tolerance: float) -> None:
    """Same text and, token by token, log-probabilities within `tolerance` (batched arithmetic may round
    differently from a batch of one)."""
    assert [text for text, _ in together] == [text for text, _ in alone]
    for (_, batched), (_, single) in zip(together, alone):
        batched_logprobs, single_logprobs = token_logprobs(batched), token_logprobs(single)
        assert len(batched_logprobs) == len(single_logprobs) > 0
        assert max(abs(a - b) for a, b in zip(batched_logprobs, single_logprobs)) <= tolerance


def batched_tolerance(kv_bits: int | None) -> float:
    """How far a batched token's log-probability may be from the same token decoded alone. Full precision:
    rounding only (~1e-6 seen). Quantized KV: a key or value that rounds differently in the batched matmul can
    land in the next 8/4-bit code of its group, and that step moves a log-probability by ~1.4e-4 (seen with
    OpenBLAS on an AMD EPYC, 1 run in 3); the text must still be identical."""
    return 1e-4 if kv_bits is None else 1e-3


def chat(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_batched_greedy_outputs_equal_one_at_a_time(tiny_model, engines, kv_bits):
    batched = engines(tiny_model, max_concurrency_override=4, kv_bits=kv_bits, prompt_cache_bytes=0)
    prompts = [chat(batched, p) for p in PROMPTS]

    async def together():
        # PROMPTS[1:] run the full 24 tokens on the test model; PROMPTS[0] (greedy: 6 tokens, then EOS)
        # joins the running batch once the others are decoding.
        first = [
            asyncio.create_task(collect(batched, p, max_tokens=24, temperature=0, top_logprobs=0)) for p in prompts[1:]
        ]
        while batched.stats().generated_tokens_total < 6:
            await asyncio.sleep(0.01)
        late = asyncio.create_task(collect(batched, prompts[0], max_tokens=24, temperature=0, top_logprobs=0))
        return await asyncio.gather(late, *first)

    together_results = asyncio.run(together())
    assert batched.stats().peak_active_sequences == 4

    async def one_by_one():
        return [await collect(batched, p, max_tokens=24, temperature=0, top_logprobs=0) for p in prompts]

    alone_results = asyncio.run(one_by_one())
    assert_same_sequences(together_results, alone_results, tolerance=batched_tolerance(kv_bits))
    for text, chunks in together_results:
        assert chunks[-1].usage.generated_tokens > 0
        assert "<|im_end|>" not in text and "<|endoftext|>" not in text and "<|im_start|>" not in text


def test_kv_bits_shrink_kv_bytes(tiny_model, engines):
    peaks = {}
    for bits in (None, 8, 4):
        engine = engines(tiny_model, kv_bits=bits, prompt_cache_bytes=0)
        prompt = chat(engine, "the sea is wide " * 140)
        asyncio.run(collect(engine, prompt, max_tokens=4, temperature=0))
        peaks[bits] = engine.stats().peak_kv_cache_bytes
        engine.close()
    assert peaks[None] > 0
    # float32 tiny model: 8-bit ≈ (1 + 8/64)/4 = 28 %, 4-bit ≈ (0.5 + 8/64)/4 = 16 % of full precision.
    assert peaks[8] <= 0.6 * peaks[None]
    assert peaks[4] <= 0.35 * peaks[None]
    assert peaks[4] < peaks[8]


def test_max_context_rejects_long_prompts_and_clamps_generation(tiny_model, engines):
    engine = engines(tiny_model, max_context_override=64)
    long_prompt = chat(engine, "hello " * 100)
    with pytest.raises(ApiError) as info:
        engine.submit(GenerationRequest(prompt_tokens=long_prompt))
    assert info.value.status == 413 and info.value.code == "context_length_exceeded"
    assert info.value.extra == {"n_prompt_tokens": len(long_prompt), "n_ctx": 64}
    assert f"Prompt length ({len(long_prompt)} tokens)" in info.value.message

    prompt = chat(engine, "hello")
    _, chunks = asyncio.run(collect(engine, prompt, temperature=0.0, max_tokens=10_000))
    usage = chunks[-1].usage
    assert usage.generated_tokens <= 64 - len(prompt)
    if chunks[-1].finish_reason == "length":
        assert usage.prompt_tokens + usage.generated_tokens == 64

    exactly_full = list(range(3, 67))
    text, chunks = asyncio.run(collect(engine, exactly_full, temperature=0.0))
    assert text == "" and chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 0


def test_stop_strings_end_generation_and_are_never_streamed(tiny_model, engines):
    engine = engines(tiny_model, prompt_cache_bytes=0)
    prompt = chat(engine, PROMPTS[1])
    full, _ = asyncio.run(collect(engine, prompt, max_tokens=40, temperature=0))
    stop = full[10:13]
    assert len(stop) == 3
    expected = full[: full.index(stop)]
    text, chunks = asyncio.run(collect(engine, prompt, max_tokens=40, temperature=0, stop=[stop, "zzzz-never"]))
    assert text == expected
    assert chunks[-1].finish_reason == "stop"
    streamed = ""
    for chunk in chunks:
        streamed += chunk.text
        assert stop not in streamed


def test_cancel_mid_batch_frees_the_slot_and_others_continue(tiny_model, engines):
    engine = engines(tiny_model, max_concurrency_override=2, prompt_cache_bytes=0)
    prompt = chat(engine, PROMPTS[1])  # greedy: hundreds of tokens before any EOS on the test model

    async def scenario():
        doomed = engine.submit(GenerationRequest(prompt_tokens=prompt, max_tokens=2000, temperature=0))
        survivor = asyncio.create_task(collect(engine, chat(engine, PROMPTS[2]), max_tokens=30, temperature=0))
        iterator = doomed.__aiter__()
        await iterator.__anext__()
        started = time.monotonic()
        doomed.cancel()
        final = [chunk async for chunk in iterator][-1]
        while engine.stats().active_sequences > 1 and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        freed_after = time.monotonic() - started
        return final, freed_after, await survivor

    final, freed_after, (text, chunks) = asyncio.run(scenario())
    assert final.finish_reason == "cancelled"
    assert freed_after < 1.0
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage.generated_tokens > 0


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_kv_bits_sequence_cancelled_mid_batch_leaves_the_others_exact(tiny_model, engines, kv_bits):
    """A quantized batch loses a row mid-decode (BatchQuantizedKVCache.filter); the rows that stay decode
    exactly what they decode alone."""
    engine = engines(tiny_model, max_concurrency_override=4, kv_bits=kv_bits, prompt_cache_bytes=0)
    prompts = [chat(engine, p) for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3])]

    async def scenario():
        # PROMPTS[1] under greedy decoding runs for hundreds of tokens on the test model: it cannot end first.
        doomed = engine.submit(
            GenerationRequest(prompt_tokens=chat(engine, PROMPTS[1]), max_tokens=2000, temperature=0)
        )
        survivors = [
            asyncio.create_task(collect(engine, p, max_tokens=24, temperature=0, top_logprobs=0)) for p in prompts
        ]
        iterator = doomed.__aiter__()
        # Cancel once all four have decoded together (the survivors need 24 tokens each, so they still run).
        while engine.stats().peak_active_sequences < 4 or engine.stats().generated_tokens_total < 8:
            await iterator.__anext__()
        doomed.cancel()
        final = [chunk async for chunk in iterator][-1]
        return final, await asyncio.gather(*survivors)

    final, together = asyncio.run(scenario())
    assert final.finish_reason == "cancelled"
    alone = [asyncio.run(collect(engine, p, max_tokens=24, temperature=0, top_logprobs=0)) for p in prompts]
    assert_same_sequences(together, alone, tolerance=batched_tolerance(kv_bits))
    assert all(chunks[-1].usage.generated_tokens > 0 for _, chunks in together)


def test_queue_limit_answers_429_with_retry_after(tiny_model, engines):
    engine = engines(tiny_model, max_concurrency_override=1, max_queue_depth=2)  # 1 slot + 2 queue places
    prompt = chat(engine, PROMPTS[1])  # greedy: hundreds of tokens before any EOS on the test model

    async def scenario():
        handles = [
            engine.submit(GenerationRequest(prompt_tokens=prompt, max_tokens=500, temperature=0)) for _ in range(3)
        ]
        with pytest.raises(ApiError) as info:
            engine.submit(GenerationRequest(prompt_tokens=prompt, max_tokens=5))
        for handle in handles:
            handle.cancel()
        for handle in handles:
            assert [c async for c in handle][-1].finish_reason == "cancelled"
        return info.value

    error = asyncio.run(scenario())
    assert error.status == 429 and error.code == "rate_limit_exceeded" and "Retry-After" in error.headers
    text, chunks = asyncio.run(collect(engine, prompt, max_tokens=3, temperature=0))  # room again
    assert chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_prefix_reuse_reports_cached_tokens_and_keeps_outputs_exact(tiny_model, engines, kv_bits):
    warm = engines(tiny_model, kv_bits=kv_bits)
    cold = engines(tiny_model, prompt_cache_bytes=0, kv_bits=kv_bits)
    system = {"role": "system", "content": "You are a helpful assistant. " * 20}
    first = [system, {"role": "user", "content": "Hello there"}]
    reply, _ = asyncio.run(collect(warm, warm.encode_chat(first), max_tokens=8, temperature=0))
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    text, chunks = asyncio.run(collect(warm, warm.encode_chat(second), max_tokens=12, temperature=0))
    usage = chunks[-1].usage
    assert usage.cached_tokens >= len(warm.encode_chat(first)) - 1
    assert warm.stats().cached_prompt_tokens_total == usage.cached_tokens
    cold_text, cold_chunks = asyncio.run(collect(cold, cold.encode_chat(second), max_tokens=12, temperature=0))
    assert cold_chunks[-1].usage.cached_tokens == 0
    assert text == cold_text


def test_seeded_requests_reproduce_inside_a_batch(tiny_model, engines):
    engine = engines(tiny_model, max_concurrency_override=3, prompt_cache_bytes=0)
    prompt = chat(engine, PROMPTS[3])

    async def scenario():
        return await asyncio.gather(
            collect(engine, prompt, max_tokens=20, temperature=1.0, seed=1234),
            collect(engine, prompt, max_tokens=20, temperature=1.0, seed=1234),
            collect(engine, prompt, max_tokens=20, temperature=1.0, seed=99),
        )

    (a, _), (b, _), (c, _) = asyncio.run(scenario())
    assert a == b
    assert a != c


def test_generation_thread_death_is_reported(tiny_model, engines):
    engine = engines(tiny_model)
    prompt = chat(engine, PROMPTS[0])

    def explode():
        raise RuntimeError("simulated Metal failure")

    engine._batch.next = explode
    text, chunks = asyncio.run(collect(engine, prompt, max_tokens=5))
    assert chunks[-1].finish_reason == "error" and "simulated Metal failure" in chunks[-1].error
    engine._thread.join(timeout=5)
    assert not engine.is_alive()
    assert engine.stats().state == "unavailable"


def test_draining_refuses_new_sequences(tiny_model, engines):
    engine = engines(tiny_model)
    engine.start_draining()
    with pytest.raises(ApiError) as info:
        engine.submit(GenerationRequest(prompt_tokens=[1, 2, 3]))
    assert info.value.status == 503 and info.value.code == "draining"
    assert engine.stats().state == "draining"


def test_added_special_tokens_are_hidden_even_outside_the_special_tokens_map(tiny_model, engines):
    """ChatML's `<|im_start|>` is an added token flagged special but not in `all_special_ids` (as in many
    real tokenizers); a model that generates it must not show it as text."""
    from macprovider.engine.engine import _special_token_ids

    engine = engines(tiny_model)
    vocab = engine.tokenizer.get_vocab()
    assert vocab["<|im_start|>"] not in engine.tokenizer.all_special_ids
    assert {vocab[token] for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")} <= _special_token_ids(
        engine.tokenizer
    )


def test_prompt_cache_entries_hold_only_their_own_bytes(tiny_model, engines):
    """A finished sequence's KV, kept for prefix reuse, owns just its rows: MLX's live memory grows by what
    the prompt cache counts, not by the batch buffers the rows were cut from (lazily extracted
    rows kept every batch buffer alive, ~5x the counted bytes)."""
    import mlx.core as mx

    engine = engines(tiny_model, max_concurrency_override=8, prompt_cache_bytes=64 << 20)
    prompts = [chat(engine, f"{i}: " + PROMPTS[1] * (1 + i % 4)) for i in range(16)]
    before = mx.get_active_memory()

    async def scenario():
        return await asyncio.gather(
            *(collect(engine, p, max_tokens=8 + 4 * (i % 5), temperature=0) for i, p in enumerate(prompts))
        )

    asyncio.run(scenario())
    engine.close()  # the generation thread is done with MLX: what is live now is what the engine keeps
    held = engine._prompt_cache.nbytes
    assert held > 0
    grown = mx.get_active_memory() - before
    assert grown <= held * 1.1 + (256 << 10), (grown, held)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_burst_sharing_a_prefix_prefills_it_once(tiny_model, engines, kv_bits):
    """Four requests that arrive together with one long system prompt: the first prefills it, the other
    three start from its prompt KV (cached_tokens) instead of prefilling it again, with the same text as
    requests served one at a time without any prefix cache."""
    warm = engines(tiny_model, max_concurrency_override=4, kv_bits=kv_bits)
    cold = engines(tiny_model, prompt_cache_bytes=0, kv_bits=kv_bits)
    system = {"role": "system", "content": "You are a careful assistant who answers in one line. " * 12}
    questions = ["Hello there", "Hello there", "Name a sea.", "What is the capital of France?"]
    prompts = [warm.encode_chat([system, {"role": "user", "content": q}]) for q in questions]

    async def burst():
        return await asyncio.gather(*(collect(warm, p, max_tokens=8, temperature=0) for p in prompts))

    together = asyncio.run(burst())
    cached = sorted(chunks[-1].usage.cached_tokens for _, chunks in together)
    shared = len(os.path.commonprefix(prompts))
    assert shared >= 100
    assert cached[0] == 0  # the leader prefilled the system prompt
    assert all(c >= shared - 1 for c in cached[1:]), cached  # the others reused it
    assert warm.stats().cached_prompt_tokens_total == sum(cached)
    alone = [asyncio.run(collect(cold, p, max_tokens=8, temperature=0)) for p in prompts]
    assert [text for text, _ in together] == [text for text, _ in alone]


def test_requests_without_a_long_shared_prefix_do_not_wait(tiny_model, engines):
    engine = engines(tiny_model, max_concurrency_override=4)
    prompts = [chat(engine, p) for p in PROMPTS]

    async def burst():
        return await asyncio.gather(*(collect(engine, p, max_tokens=4, temperature=0) for p in prompts))

    results = asyncio.run(burst())
    assert [chunks[-1].usage.cached_tokens for _, chunks in results] == [0, 0, 0, 0]
    assert engine.stats().peak_active_sequences == 4
