"""Swap timings of a fleet on the real demo model: `macprovider serve --model A --model B` where B is a second id
of the same weights, with a memory budget that fits one of them, so every request for the other model unloads
one and loads the other. Prints, per request, the model, its wall time and the server's RSS afterwards, then
the per-model load counts and last load seconds from /v1/health, the slowest /v1/health answer while the
swaps ran (is the HTTP side responsive while a model loads?), and the RSS once keep_alive unloaded both.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/fleet_swap.py [--requests 6]

Uses a temporary HOME and Hub cache (HF_HOME), never the user's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--keep-alive", type=float, default=5.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fleet-swap-"))
    os.environ.update(HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    import httpx
    import psutil

    from macprovider.models.demo import DEMO_MODEL_ID, create_demo_model
    from macprovider.models.hub_cache import install_in_hub_cache
    from macprovider.models.ids import ensure_local
    from macprovider.models.memory import resident_bytes

    create_demo_model(DEMO_MODEL_ID, cache_dir=root / "hf" / "hub", dtype="float32")
    first = ensure_local(DEMO_MODEL_ID)
    copy = root / "copy"
    copy.mkdir()
    for path in first.iterdir():
        shutil.copyfile(path.resolve(), copy / path.name)
    second_id = DEMO_MODEL_ID + "-second"
    install_in_hub_cache(copy, second_id, root / "hf" / "hub")
    one = resident_bytes(first, max_context=512, max_batch=1, kv_bits=None, prompt_cache_bytes=256 * 2**20)
    budget_gb = 1.5 * one / 2**30
    print(f"estimate per model {one / 2**20:.0f} MiB; budget {budget_gb * 1024:.0f} MiB (fits one)", flush=True)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
    env.update(
        HOME=str(root),
        XDG_CONFIG_HOME=str(root / ".config"),
        MACPROVIDER_MEMORY_BUDGET_GB=f"{budget_gb:.6f}",
        MACPROVIDER_KEEP_ALIVE=str(args.keep_alive),
        MACPROVIDER_PROMPT_CACHE_BYTES=str(256 * 2**20),
        MACPROVIDER_RECORD_WORKLOAD="false",
    )
    argv = [
        sys.executable,
        "-m",
        "macprovider",
        "serve",
        "--model",
        DEMO_MODEL_ID,
        "--model",
        second_id,
        "--max-context",
        "512",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(argv, env=env, stderr=open(root / "serve.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        process = psutil.Process(server.pid)
        print(f"ready, nothing loaded: rss {process.memory_info().rss / 2**20:.0f} MiB", flush=True)
        body = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        stop, health_s = threading.Event(), []

        def poll_health() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                httpx.get(base + "/v1/health", timeout=30)
                health_s.append(time.perf_counter() - start)
                time.sleep(0.05)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        for index in range(args.requests):
            model = (DEMO_MODEL_ID, second_id)[index % 2]
            start = time.perf_counter()
            reply = httpx.post(base + "/v1/chat/completions", json={**body, "model": model}, timeout=300)
            wall = time.perf_counter() - start
            text = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else reply.text
            print(
                f"request {index} {model:<36} {reply.status_code} {wall:6.2f} s  rss "
                f"{process.memory_info().rss / 2**20:5.0f} MiB  {text!r}",
                flush=True,
            )
        stop.set()
        poller.join()
        health_s.sort()
        print(
            f"/v1/health during the swaps: {len(health_s)} answers, median {health_s[len(health_s) // 2] * 1000:.0f} ms,"
            f" max {health_s[-1] * 1000:.0f} ms",
            flush=True,
        )
        for entry in httpx.get(base + "/v1/health").json()["models"]:
            print(
                f"{entry['id']:<36} loads {entry['loads']} unloads {entry['unloads']} last load "
                f"{entry['load_seconds']:.2f} s  measured {entry['memory_measured_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
        deadline = time.monotonic() + args.keep_alive + 30
        while time.monotonic() < deadline:
            if all(m["state"] == "unloaded" for m in httpx.get(base + "/v1/health").json()["models"]):
                break
            time.sleep(0.25)
        print(f"after keep_alive, both unloaded: rss {process.memory_info().rss / 2**20:.0f} MiB", flush=True)
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
