#!/usr/bin/env python3
"""What one hostile request costs the server: a measurement, not a test.

Serves a model in-process (the tiny test model, built in a temporary Hub cache, unless `--model` names one
already cached) and times, each against the running server:

1. a `--mib` MiB `/v1/messages` body whose prompt cannot fit `max_context` (refused with 413);
2. the same body on `/v1/messages/count_tokens`;
3. a small `/v1/messages/count_tokens` sent while (2) is in flight: how long it waits;
4. RSS of the process before and after.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/hostile_cost.py
    python scripts/hostile_cost.py --model macprovider-demo/smollm2 --mib 9.9
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model id in the Hub cache (default: build the tiny test model)")
    parser.add_argument("--mib", type=float, default=9.9, help="size of the oversized prompt, MiB")
    parser.add_argument("--max-context", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="macprovider-hostile-") as tmp:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = args.model
        if model is None:
            os.environ["HF_HOME"] = tmp
            from macprovider.models.demo import TINY_DEMO_MODEL_ID, create_tiny_demo_model

            create_tiny_demo_model(cache_dir=Path(tmp) / "hub")
            model = TINY_DEMO_MODEL_ID
        from macprovider.core import config as cfg
        from macprovider.core.config import Settings
        from macprovider.engine.engine import Engine
        from macprovider.serve.preflight import plan_serve
        from macprovider.serve.runtime import ServeRuntime

        engine = Engine(plan_serve(cfg.resolve({"model": model, "max_context_override": args.max_context})))
        engine.load()
        settings = Settings(model=engine.model_id, host="127.0.0.1", port=0, drain_timeout_s=5.0)
        runtime = ServeRuntime(engine, settings, None, load=False)
        thread = threading.Thread(target=runtime.run, daemon=True)
        thread.start()
        assert runtime.started.wait(30)
        process = psutil.Process()
        rss_before = process.memory_info().rss
        big_text = "lorem ipsum dolor sit amet " * int(args.mib * 2**20 / 27)
        big = {"model": engine.model_id, "max_tokens": 4, "messages": [{"role": "user", "content": big_text}]}
        small = {"model": engine.model_id, "messages": [{"role": "user", "content": "hello"}]}
        print(
            f"model {model}: vocab {engine.vocab_size}, longest piece {engine.max_token_chars} chars, "
            f"max_context {engine.max_context}; body {len(big_text) / 2**20:.1f} MiB",
            flush=True,
        )
        with httpx.Client(base_url=runtime.url, timeout=600) as client:
            for route in ("/v1/messages", "/v1/messages/count_tokens"):
                started = time.perf_counter()
                response = client.post(route, json=big)
                print(
                    f"{route}: {response.status_code} in {(time.perf_counter() - started) * 1000:.0f} ms "
                    f"({response.text[:120]})",
                    flush=True,
                )
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                slow = pool.submit(client.post, "/v1/messages/count_tokens", json=big)
                time.sleep(0.05)
                started = time.perf_counter()
                quick = client.post("/v1/messages/count_tokens", json=small)
                waited = (time.perf_counter() - started) * 1000
                slow.result()
            print(f"small count_tokens during the big one: {quick.status_code} in {waited:.0f} ms", flush=True)
        rss_after = process.memory_info().rss
        print(f"RSS: {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB after", flush=True)
        runtime.request_shutdown("done")
        thread.join(15)
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
