"""One request never takes down the server: a sequence whose own sampler, logits processor or detokenizer
raises ends alone with its own error, while the other sequences of the batch finish with their normal text
and the engine keeps serving (engine in-process on the tiny test model)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from macprovider.core import config as cfg
from macprovider.engine import engine as engine_module
from macprovider.engine.engine import Engine
from macprovider.engine.protocol import GenerationRequest
from macprovider.serve.preflight import plan_serve

PROMPTS = ["Hello there", "Write a short poem about the sea", "What is the capital of France?", "Numbers: 1 2 3"]
MAX_TOKENS = 12
MARK = 1.25  # presence_penalty that tags the hostile request (the other three use none)


class Boom(RuntimeError):
    """What the injected per-request code raises."""


@pytest.fixture
def engine(tiny_model):
    made = Engine(
        plan_serve(
            cfg.resolve(
                {
                    "model": tiny_model,
                    "max_context_override": 512,
                    "max_concurrency_override": 4,
                    "prompt_cache_bytes": 0,
                }
            )
        )
    )
    made.load()
    yield made
    made.close()


def requests(engine: Engine) -> list[GenerationRequest]:
    tokens = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    return [GenerationRequest(prompt_tokens=t, max_tokens=MAX_TOKENS, temperature=0.0) for t in tokens]


async def run(engine: Engine, batch: list[GenerationRequest]) -> list[tuple[str, object]]:
    """(text, final chunk) of each request, all submitted together."""

    async def one(request: GenerationRequest):
        chunks = [chunk async for chunk in engine.submit(request)]
        return "".join(c.text for c in chunks), chunks[-1]

    return await asyncio.wait_for(asyncio.gather(*(one(r) for r in batch)), timeout=300)


def hostile(request: GenerationRequest) -> GenerationRequest:
    import dataclasses

    return dataclasses.replace(request, presence_penalty=MARK)


def check_isolated(engine: Engine, normal: list[tuple[str, Any]], together: list[tuple[str, Any]], what: str) -> None:
    text, final = together[1]
    assert final.finish_reason == "error" and what in final.error, final
    assert final.error_status == 500
    for index in (0, 2, 3):
        assert together[index][0] == normal[index][0]
        assert together[index][1].finish_reason == normal[index][1].finish_reason != "error"
        assert together[index][1].error is None
    assert engine.is_alive() and engine.stats().state in ("ready", "busy")
    after = asyncio.run(run(engine, requests(engine)[:1]))  # and it keeps serving
    assert after[0][0] == normal[0][0]


def test_a_raising_logits_processor_fails_only_its_own_sequence(engine, monkeypatch):
    normal = asyncio.run(run(engine, requests(engine)))
    calls = {"n": 0}

    def processor(tokens, logits):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-stream, after some text was delivered
            raise Boom("processor exploded for this request only")
        return logits

    original = Engine._logits_processors
    monkeypatch.setattr(
        Engine, "_logits_processors", staticmethod(lambda r: [processor] if r.presence_penalty == MARK else original(r))
    )
    batch = requests(engine)
    batch[1] = hostile(batch[1])
    together = asyncio.run(run(engine, batch))
    check_isolated(engine, normal, together, "processor exploded for this request only")


def test_a_raising_sampler_fails_only_its_own_sequence(engine, monkeypatch):
    normal = asyncio.run(run(engine, requests(engine)))
    original = Engine._sampler

    def sampler_for(self, request):
        if request.presence_penalty != MARK:
            return original(self, request)

        def sample(logprobs):
            raise Boom("sampler exploded for this request only")

        return sample

    monkeypatch.setattr(Engine, "_sampler", sampler_for)
    monkeypatch.setattr(Engine, "_logits_processors", staticmethod(lambda r: []))
    batch = requests(engine)
    batch[1] = hostile(batch[1])
    together = asyncio.run(run(engine, batch))
    check_isolated(engine, normal, together, "sampler exploded for this request only")


def test_a_raising_detokenizer_fails_only_its_own_sequence(engine, monkeypatch):
    normal = asyncio.run(run(engine, requests(engine)))

    class Exploding(engine_module.OutputText):
        def add(self, token):
            if "BOOM-STOP" in self._stop:
                raise Boom("detokenizer exploded for this request only")
            return super().add(token)

    monkeypatch.setattr(engine_module, "OutputText", Exploding)
    batch = requests(engine)
    import dataclasses

    batch[1] = dataclasses.replace(batch[1], stop=("BOOM-STOP",))
    together = asyncio.run(run(engine, batch))
    check_isolated(engine, normal, together, "detokenizer exploded for this request only")


@pytest.mark.parametrize("seed", [None, 7])
def test_top_k_at_or_above_the_vocabulary_means_no_truncation(engine, seed):
    """mlx-lm's sampler raises for top_k >= vocabulary; here it keeps every token, as the number means."""
    assert engine.vocab_size > 0
    base = requests(engine)[0]
    import dataclasses

    batch = [
        dataclasses.replace(base, temperature=1.0, top_k=k, seed=seed, max_tokens=4)
        for k in (engine.vocab_size - 1, engine.vocab_size, engine.vocab_size + 1, 2**31)
    ]
    results = asyncio.run(run(engine, batch))
    assert all(final.finish_reason in ("stop", "length") for _, final in results), results
    assert engine.is_alive()


def test_a_matcher_error_ends_the_request_with_an_error_never_unconstrained(engine, monkeypatch):
    """A token the grammar cannot follow (here forced by a sampler that ignores the mask) ends that request
    with an error — it neither goes on unconstrained nor reports `stop` on JSON that does not parse."""
    from macprovider.serve.grammar import grammar_for

    normal = asyncio.run(run(engine, requests(engine)))
    bad_token = engine.encode_text("x")[-1]
    original = Engine._sampler

    def sampler_for(self, request):
        if request.grammar is None:
            return original(self, request)
        import mlx.core as mx

        return lambda logprobs: mx.array([bad_token] * logprobs.shape[0], dtype=mx.uint32)

    monkeypatch.setattr(Engine, "_sampler", sampler_for)
    import dataclasses

    batch = requests(engine)
    batch[1] = dataclasses.replace(batch[1], grammar=grammar_for({"type": "json_object"}))
    together = asyncio.run(run(engine, batch))
    check_isolated(engine, normal, together, "the output constraint failed")
