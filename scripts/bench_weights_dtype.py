#!/usr/bin/env python3
"""Prefill and decode speed of one model under each `weights_dtype` (engine/weights_dtype.py), side by side in one
run, on whatever MLX device is the default here. A benchmark, not a test.

Each variant loads the model fresh (mlx_lm.load), applies the setting with serve's own
`apply_weights_dtype`, then runs mlx-lm's `generate_step` greedily: one warm-up, then `--repeats` timed runs
(median). TTFT = prompt in → first token out; decode tok/s = (tokens − 1) / (time after the first token).

    HF_HUB_OFFLINE=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \\
        python scripts/bench_weights_dtype.py --model macprovider-demo/smollm2-135m --prompt-tokens 32 --max-tokens 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(model_path: str, setting: str, prompt_tokens: int, max_tokens: int, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from macprovider.engine.weights_dtype import apply_weights_dtype

    model, tokenizer = load(model_path)
    applied = apply_weights_dtype(model, setting)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    prompt = mx.array(tokenizer.encode(" ".join(["word"] * prompt_tokens))[:prompt_tokens])

    def once(limit: int) -> tuple[float, float | None]:
        start, first, count = time.perf_counter(), None, 0
        for _ in generate_step(prompt, model, max_tokens=limit):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - start, (count - 1) / (end - first) if count > 1 and end > first else None

    once(2)
    runs = [once(max_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode = [r[1] for r in runs if r[1] is not None]
    result = {
        "setting": setting,
        "applied": applied,
        "prompt_tokens": int(prompt.size),
        "ttft_s": round(ttft, 3),
        "prefill_tps": round(prompt.size / ttft, 2),
        "decode_tps": round(statistics.median(decode), 2) if decode else None,
        "mlx_peak_mib": round(mx.get_peak_memory() / 2**20, 1),
    }
    model = None  # let the weights go before the next variant loads
    mx.clear_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model id in the Hub cache, or a local directory")
    parser.add_argument(
        "--settings", default="native,quantized-float32,float32", help="comma-separated weights_dtype values"
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from macprovider.models.ids import ensure_local

    path = str(ensure_local(args.model))
    results = []
    for setting in args.settings.split(","):
        results.append(measure(path, setting.strip(), args.prompt_tokens, args.max_tokens, args.repeats))
        r = results[-1]
        print(
            f"{r['setting']:>18} ({r['applied']}): TTFT {r['ttft_s']:.2f} s, prefill {r['prefill_tps']:.2f} tok/s, "
            f"decode {r['decode_tps']} tok/s, MLX peak {r['mlx_peak_mib']} MiB",
            flush=True,
        )
    print("BENCH_WEIGHTS_JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
