"""Benchmark: per-token decode time of grammar-constrained sequences (response_format json_schema) next to
unconstrained ones in the same continuous batch, on the MLX engine in-process.

    python scripts/bench_constrained.py [--model ID] [--batch 4] [--tokens 64] [--hidden 512 --layers 4]

Without --model it builds a random-weight llama (macprovider.models.demo) in a temporary Hub cache (HF_HOME is
pointed there, offline). Reports decode ms/token (Usage.generation_ms / generated tokens) for:
  A) `batch` unconstrained sequences;  B) batch/2 constrained + batch/2 unconstrained together.
Target: constrained ms/token in B <= 1.5 x unconstrained ms/token in A.
A schema with no length limits is used with min_tokens-like behaviour forced by `max_tokens`, so
constrained sequences run to `tokens` unless the grammar completes first (then they stop early).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}}},
    "required": ["items"],
}


async def run(engine, prompt, n_free: int, n_constrained: int, tokens: int, grammar: str | None):
    from macprovider.engine.protocol import GenerationRequest

    async def one(g):
        handle = engine.submit(
            GenerationRequest(prompt_tokens=prompt, max_tokens=tokens, temperature=0.8, seed=7, grammar=g)
        )
        chunks = [c async for c in handle]
        usage = chunks[-1].usage
        return g is not None, usage.generation_ms / max(1, usage.generated_tokens - 1), usage.generated_tokens

    jobs = [one(None) for _ in range(n_free)] + [one(grammar) for _ in range(n_constrained)]
    return await asyncio.gather(*jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-constrained-")
    model = args.model
    if model is None:
        os.environ["HF_HOME"] = tmp
        os.environ["HF_HUB_OFFLINE"] = "1"
        from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache

        source = Path(tmp) / "src"
        build_model_files(
            source,
            TinyModelSpec(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.hidden * 2),
        )
        model = "bench/constrained-llama"
        install_in_hub_cache(source, model, Path(tmp) / "hub")

    from macprovider.core import config as cfg
    from macprovider.engine.engine import Engine
    from macprovider.serve.grammar import grammar_for
    from macprovider.serve.preflight import plan_serve

    engine = Engine(
        plan_serve(
            cfg.resolve(
                {
                    "model": model,
                    "max_context_override": 2048,
                    "max_concurrency_override": args.batch,
                    "prompt_cache_bytes": 0,
                }
            )
        )
    )
    engine.load()
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "b", "schema": SCHEMA}})
    prompt = engine.encode_chat([{"role": "user", "content": "List a few things about the sea as JSON"}])
    half = args.batch // 2
    asyncio.run(run(engine, prompt, 1, 1, 8, grammar))  # warm-up (builds the llguidance tokenizer)
    free_a, free_b, constrained_b, constrained_tokens = [], [], [], []
    for _ in range(args.repeats):
        for _is_c, ms, _n in asyncio.run(run(engine, prompt, args.batch, 0, args.tokens, grammar)):
            free_a.append(ms)
        for is_c, ms, n in asyncio.run(run(engine, prompt, args.batch - half, half, args.tokens, grammar)):
            (constrained_b if is_c else free_b).append(ms)
            if is_c:
                constrained_tokens.append(n)
    engine.close()
    a, fb, cb = statistics.median(free_a), statistics.median(free_b), statistics.median(constrained_b)
    print(
        json.dumps(
            {
                "model": model,
                "batch": args.batch,
                "tokens": args.tokens,
                "A_unconstrained_ms_per_token": round(a, 3),
                "B_unconstrained_ms_per_token": round(fb, 3),
                "B_constrained_ms_per_token": round(cb, 3),
                "B_constrained_tokens_median": statistics.median(constrained_tokens),
                "ratio_constrained_vs_A": round(cb / a, 3),
                "ratio_B_unconstrained_vs_A": round(fb / a, 3),
                "target_ratio": 1.5,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
