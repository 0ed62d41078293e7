#!/usr/bin/env python3
"""Time one decode / verification step of a batch, and one batched prefill, with MLX's own ops or with the
NumPy route for exponentials (macprovider/engine/cpu_kernels.py) — the profile behind `cpu_kernels`.

A step here is what the engine's generation thread runs: the model over (batch, width) new tokens against a
KV cache already holding `--context` tokens a row (mlx-lm's BatchKVCache), then log-softmax and argmax;
width 1 is a plain decode step, width W verifies W - 1 draft tokens a row. Each figure is the median of
`--repeats` steps (the cache is trimmed back after each); the prefill is `--context` random tokens a row in
chunks of 200. A benchmark, not a test: run it on an idle machine, e.g.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/profile_step.py \\
        --model macprovider-bench/smollm2-135m-f32 --batch 8 --context 600

which prints one line per setting (`mlx`, then `numpy`) with milliseconds per width.
"""

from __future__ import annotations

import argparse
import statistics
import time


def profile(model_path: str, kernels: str, batch: int, context: int, widths: list[int], repeats: int) -> str:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import BatchKVCache

    from macprovider.engine import cpu_kernels
    from macprovider.engine.weights_dtype import apply_weights_dtype

    model, _ = load(model_path)
    apply_weights_dtype(model, "auto")
    if kernels == "numpy":
        cpu_kernels.install()
    cpu_kernels.enable_in_this_thread(kernels == "numpy")

    mx.random.seed(0)
    caches = [BatchKVCache([0] * batch) for _ in model.layers]
    prompt = mx.random.randint(0, 1000, (batch, context))
    started = time.perf_counter()
    for start in range(0, context, 200):
        mx.eval(model(prompt[:, start : start + 200], cache=caches))
    prefill = time.perf_counter() - started

    figures = []
    for width in widths:
        tokens = mx.random.randint(0, 1000, (batch, width))
        times = []
        for _ in range(repeats + 1):  # the first, warm-up step is not counted
            started = time.perf_counter()
            mx.argmax(cpu_kernels.log_probabilities(model(tokens, cache=caches)), axis=-1).tolist()
            times.append(time.perf_counter() - started)
            for cache in caches:
                cache.trim(width)
        figures.append(f"W={width} {statistics.median(times[1:]) * 1e3:.0f} ms")
    cpu_kernels.enable_in_this_thread(False)
    return f"{kernels:5s} batch {batch} context {context}: prefill {prefill:.2f} s; " + ", ".join(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hub id in the local cache or a model directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=600, help="tokens a row already in the KV cache")
    parser.add_argument("--widths", default="1,2,3,5,9,17", help="positions a row per step, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", default="mlx,numpy", help="which settings to run, in order")
    args = parser.parse_args()
    from macprovider.models.ids import ensure_local

    path = str(ensure_local(args.model))
    widths = [int(w) for w in args.widths.split(",")]
    for kernels in args.kernels.split(","):
        print(profile(path, kernels, args.batch, args.context, widths, args.repeats), flush=True)


if __name__ == "__main__":
    main()
