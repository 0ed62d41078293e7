#!/usr/bin/env python3
"""Side-by-side benchmark: `macprovider serve` against `mlx_lm.server`, same model, same machine, one run.

For each model, each server is started in turn (alternating, `--rounds` times) from this environment's
installed packages, and measured with the same client code:

- single-stream decode tokens/s: streamed greedy requests one at a time (median of `--single-repeats`);
  (chunks − 1) / (last − first chunk time);
- aggregate tokens/s at N concurrent streams: total completion tokens / wall time of the N requests;
- TTFT median / p95 over the concurrent requests (request start → first non-empty content);
- ours only: /v1/health latency p99 while the N streams decode, and health's peak KV bytes;
- with `--burst`: N *identical* requests sent at once with a prompt no server has seen (agent fan-out, a burst
  after a restart): wall time, aggregate tokens/s and TTFT median — how often the shared prompt is prefilled.

Prints a table of ours/peer ratios and one JSON line (prefix `BENCH_JSON `). With `--kv-bits B` both
servers quantize the KV cache (mlx_lm.server with `--quantized-kv-start 0`, which serializes requests;
ours keeps batching), and two more measurements run in the same rotation:

- ours without kv-bits (`ours_full`): the single-stream decode ratio kv-bits / full precision;
- a KV-bytes probe: a fresh `macprovider serve --max-batch 4` with and without kv-bits gets 4 concurrent
  prompts of ~`--probe-prompt-tokens` tokens; health's `peak_kv_cache_bytes` of both are compared.

Without `--model`, tiny random-weight models are built locally (macprovider.models.demo): `tiny` (hidden 128,
2 layers) and `small` (hidden 256, 4 layers), in `--dtype` (float32 by default, see demo.TinyModelSpec).

    python scripts/bench.py                       # tiny + small, full-precision KV
    python scripts/bench.py --kv-bits 8 --models small
    python scripts/bench.py --model mlx-community/Llama-3.2-1B-Instruct-4bit   # a cached real model
    python scripts/bench.py --model macprovider-demo/smollm2-135m --compare-weights-dtype native   # float32 / Q4

Readiness: each server must accept connections and answer one 1-token completion within `--ready-timeout`
seconds (900 by default: mlx_lm.server on a Q4 model prefills ~8 tok/s on a loaded CPU).

BLAS: on Linux the `mlx[cpu]` wheel bundles the reference (netlib) BLAS, whose sgemm makes a batch of B
decode steps cost ~B times one step, so batching barely pays there, unlike on a Mac (Accelerate/Metal).
Both servers inherit this process's environment, so
`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0` (Debian `libopenblas0-pthread`) gives both an
optimized sgemm; the JSON records `LD_PRELOAD` and the library versions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

FILLER = "The sea is wide and the sea is deep, it sings the sailors off to sleep. "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def p95(values: list[float]) -> float:
    """sorted[ceil(0.95 n) − 1] (nearest rank, as autotune: docs/autotune.md#the-probe)."""
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


class Server:
    """A server child process in its own process group; `stop()` kills the group."""

    def __init__(
        self,
        kind: str,
        model: str,
        port: int,
        streams: int,
        kv_bits: int | None,
        env: dict[str, str],
        weights_dtype: str | None = None,
    ):
        self.kind, self.port = kind, port
        if kind.startswith("ours"):
            argv = [
                sys.executable,
                "-m",
                "macprovider",
                "serve",
                "--model",
                model,
                "--port",
                str(port),
                "--max-batch",
                str(streams),
                "--log-level",
                "warning",
            ]
            if kv_bits:
                argv += ["--kv-bits", str(kv_bits)]
            if weights_dtype:
                argv += ["--weights-dtype", weights_dtype]
        else:
            argv = [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                model,
                "--port",
                str(port),
                "--decode-concurrency",
                str(streams),
                "--prompt-concurrency",
                str(streams),
                "--log-level",
                "WARNING",
            ]
            if kv_bits:
                argv += ["--kv-bits", str(kv_bits), "--quantized-kv-start", "0"]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=env, start_new_session=True)

    def wait_ready(self, model: str, timeout: float) -> None:
        """Wait until the server accepts connections, then for one 1-token completion (retried while it answers
        503, ours while loading; mlx_lm.server may load the model on its first request; a slow CPU answers it in
        minutes), all within `timeout` seconds.
        Raises RuntimeError with the server's log tail if it exits, or when the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.kind} server not listening after {timeout:.0f} s (--ready-timeout)"
                    ) from None
                time.sleep(0.25)  # polling the port of a starting child process
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        while True:  # ours listens while it loads and answers 503 model_not_loaded until then
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{self.port}/v1/chat/completions",
                    json=body,
                    timeout=httpx.Timeout(max(1.0, deadline - time.monotonic()), connect=10),
                )
            except httpx.HTTPError as exc:
                self._check_alive()
                raise RuntimeError(
                    f"{self.kind} server: no first completion within {timeout:.0f} s (--ready-timeout): {exc!r}"
                ) from None
            if response.status_code == 200:
                return
            if response.status_code != 503 or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.kind} server: first completion answered {response.status_code}: {response.text[:500]}"
                )
            self._check_alive()
            time.sleep(0.5)  # polling a loading server

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            self.log.seek(0)
            raise RuntimeError(f"{self.kind} server exited: {self.log.read()[-2000:].decode(errors='replace')}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: TTFT, per-chunk times, completion tokens (from usage if sent)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunk_times.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(chunk_times)
    return {"start": start, "chunk_times": chunk_times, "tokens": tokens, "end": time.perf_counter()}


async def measure_burst(
    client: httpx.AsyncClient, url: str, model: str, streams: int, prompt: str, max_tokens: int
) -> dict:
    """`streams` identical streamed requests at once: wall seconds, aggregate tokens/s, TTFT median (ms)."""
    tic = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, url, model, prompt, max_tokens) for _ in range(streams)))
    wall = time.perf_counter() - tic
    ttfts = [(r["chunk_times"][0] - r["start"]) * 1000 for r in results if r["chunk_times"]]
    return {
        "burst_wall_s": wall,
        "burst_aggregate_tps": sum(r["tokens"] for r in results) / wall,
        "burst_ttft_median_ms": statistics.median(ttfts) if ttfts else float("nan"),
    }


async def measure(
    server: Server,
    model: str,
    streams: int,
    prompt_words: int,
    max_tokens: int,
    round_index: int,
    single_repeats: int,
    burst: bool = False,
) -> dict:
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    prompt = lambda i: f"Request {round_index}-{i}. " + FILLER * max(1, prompt_words // 16)  # noqa: E731
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, model, prompt(-1), 8)  # discarded warm-up
        single_rates = []
        for repeat in range(single_repeats):
            times = (await stream_one(client, url, model, prompt(-2 - repeat), max_tokens))["chunk_times"]
            if len(times) > 1:
                single_rates.append((len(times) - 1) / (times[-1] - times[0]))
        single_tps = statistics.median(single_rates) if single_rates else float("nan")

        health_latencies: list[float] = []
        done = asyncio.Event()

        async def poll_health():
            while not done.is_set():
                tic = time.perf_counter()
                try:
                    await client.get(f"http://127.0.0.1:{server.port}/v1/health", timeout=5)
                    health_latencies.append((time.perf_counter() - tic) * 1000)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_health()) if server.kind.startswith("ours") else None
        tic = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, model, prompt(i), max_tokens) for i in range(streams)))
        wall = time.perf_counter() - tic
        done.set()
        if poller:
            await poller
        health = None
        if server.kind.startswith("ours"):
            health = (await client.get(f"http://127.0.0.1:{server.port}/v1/health")).json()
        burst_figures = {"burst_wall_s": None, "burst_aggregate_tps": None, "burst_ttft_median_ms": None}
        if burst:  # a prompt unseen in this server's life: nothing of it is cached
            burst_prompt = f"Burst {round_index}. Return this text unchanged. " + FILLER * max(1, prompt_words // 16)
            burst_figures = await measure_burst(client, url, model, streams, burst_prompt, max_tokens)
    ttfts = [(r["chunk_times"][0] - r["start"]) * 1000 for r in results if r["chunk_times"]]
    return {
        "single_decode_tps": single_tps,
        "aggregate_tps": sum(r["tokens"] for r in results) / wall,
        "ttft_median_ms": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p95_ms": p95(ttfts) if ttfts else float("nan"),
        "health_p99_ms": sorted(health_latencies)[max(0, math.ceil(0.99 * len(health_latencies)) - 1)]
        if health_latencies
        else None,
        "peak_kv_cache_bytes": (health or {}).get("engine", {}).get("peak_kv_cache_bytes"),
        "completion_tokens": sum(r["tokens"] for r in results),
        **burst_figures,
    }


async def probe_kv_bytes(server: Server, model: str, prompts: int, prompt_tokens: int) -> dict:
    """`prompts` concurrent chat requests of ~`prompt_tokens` tokens each (8 new tokens); health's peak KV
    bytes afterwards, and the prompt tokens the server counted for each."""
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    filler = FILLER.split()

    async def one(client: httpx.AsyncClient, words: int, max_tokens: int = 8, tag: int = -1) -> int:
        text = f"Request {tag}: " + " ".join(filler[i % len(filler)] for i in range(words))
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        response = await client.post(url, json=body)
        response.raise_for_status()
        return response.json()["usage"]["prompt_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        # Calibrate words → tokens on this tokenizer; the probe's peak must come from the concurrent prompts,
        # so the calibration prompt is short.
        short, long = await one(client, 32, 1), await one(client, 64, 1)
        per_word = (long - short) / 32
        base = short - 32 * per_word
        words = max(1, round((prompt_tokens - base) / per_word))
        counted = await asyncio.gather(*(one(client, words, tag=i) for i in range(prompts)))
        health = (await client.get(f"http://127.0.0.1:{server.port}/v1/health")).json()
    return {"prompt_tokens": counted, "peak_kv_cache_bytes": health["engine"]["peak_kv_cache_bytes"]}


def build_models(hf_home: Path, names: list[str], dtype: str) -> dict[str, str]:
    from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache

    specs = {
        "tiny": TinyModelSpec(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=256,
            dtype=dtype,
        ),
        "small": TinyModelSpec(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
            vocab_size=2048,
            dtype=dtype,
        ),
    }
    ids = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            build_model_files(Path(tmp), specs[name])
            install_in_hub_cache(Path(tmp), f"macprovider-bench/{name}", hf_home / "hub")
        ids[name] = f"macprovider-bench/{name}"
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="benchmark this cached model id or local directory instead of built ones")
    parser.add_argument("--models", default="tiny,small", help="built models to run: tiny,small")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="weights of built models"
    )
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (and --max-batch of ours)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=200, help="approximate prompt length in words")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server (medians reported)")
    parser.add_argument("--single-repeats", type=int, default=3, help="single-stream requests per round (median)")
    parser.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the KV cache on both servers")
    parser.add_argument(
        "--probe-prompts", type=int, default=4, help="kv-bits mode: concurrent prompts of the KV-bytes probe"
    )
    parser.add_argument("--probe-prompt-tokens", type=int, default=600, help="kv-bits mode: tokens per probe prompt")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=900,
        help="seconds a server may take to listen and answer its first 1-token completion",
    )
    parser.add_argument("--weights-dtype", help="ours: serve --weights-dtype (default: serve's own, auto)")
    parser.add_argument(
        "--burst", action="store_true", help="also send --streams identical cold prompts at once (shared-prefix burst)"
    )
    parser.add_argument(
        "--compare-weights-dtype",
        metavar="DTYPE",
        help="also run ours with serve --weights-dtype DTYPE (e.g. native: the checkpoint's quantized weights) and print ours / that",
    )
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so each `finally: server.stop()` kills its server's group.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    import mlx.core as mx
    import mlx_lm

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    kinds = ("ours", "peer", "ours_full") if args.kv_bits else ("ours", "peer")
    if args.compare_weights_dtype:
        kinds += ("ours_alt",)
    with tempfile.TemporaryDirectory(prefix="macprovider-bench-") as tmp:
        if args.model:
            models = {args.model: args.model}
        else:
            env["HF_HOME"] = tmp
            models = build_models(Path(tmp), [m.strip() for m in args.models.split(",") if m.strip()], args.dtype)
        report = {
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "prompt_words": args.prompt_words,
            "kv_bits": args.kv_bits,
            "dtype": None if args.model else args.dtype,
            "weights_dtype": {
                "ours": args.weights_dtype or "auto (serve default)",
                "ours_alt": args.compare_weights_dtype,
            },
            "environment": {
                "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
                "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__,
                "cpus": os.cpu_count(),
            },
            "models": {},
        }
        for name, model_id in models.items():
            samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for round_index in range(args.rounds):
                for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
                    bits = None if kind == "ours_full" else args.kv_bits
                    dtype = args.compare_weights_dtype if kind == "ours_alt" else args.weights_dtype
                    server = Server(kind, model_id, free_port(), args.streams, bits, env, dtype)
                    try:
                        server.wait_ready(model_id, args.ready_timeout)
                        samples[kind].append(
                            asyncio.run(
                                measure(
                                    server,
                                    model_id,
                                    args.streams,
                                    args.prompt_words,
                                    args.max_tokens,
                                    round_index,
                                    args.single_repeats,
                                    args.burst,
                                )
                            )
                        )
                        print(
                            f"round {round_index} {kind}: {json.dumps(samples[kind][-1])}", flush=True
                        )  # kept if the run is cut short
                    finally:
                        server.stop()
            summary = {}
            for kind, runs in samples.items():
                summary[kind] = {
                    key: statistics.median([r[key] for r in runs if r[key] is not None])
                    if any(r[key] is not None for r in runs)
                    else None
                    for key in runs[0]
                }
            compared = ("single_decode_tps", "aggregate_tps", "ttft_median_ms", "ttft_p95_ms")
            if args.burst:
                compared += ("burst_wall_s", "burst_aggregate_tps", "burst_ttft_median_ms")
            ratios = {key: summary["ours"][key] / summary["peer"][key] for key in compared if summary["peer"][key]}
            entry = {**summary, "ratios_ours_over_peer": ratios}
            print(
                f"\n== {name} ({model_id}) streams={args.streams} kv_bits={args.kv_bits or 'unset'} rounds={args.rounds}"
            )
            print(f"{'metric':<22}{'ours':>12}{'mlx_lm.server':>16}{'ours/peer':>12}")
            for key in compared:
                print(
                    f"{key:<22}{summary['ours'][key]:>12.1f}{summary['peer'][key]:>16.1f}{ratios.get(key, float('nan')):>12.2f}"
                )
            print(
                f"health p99 (ours, during {args.streams} streams): {summary['ours']['health_p99_ms']:.1f} ms; peak KV bytes (ours): {summary['ours']['peak_kv_cache_bytes']}"
            )
            if args.compare_weights_dtype:
                alt = summary["ours_alt"]
                entry["weights_dtype_ratio"] = {
                    key: summary["ours"][key] / alt[key]
                    for key in ("single_decode_tps", "aggregate_tps", "ttft_median_ms")
                    if alt[key]
                }
                print(
                    f"ours weights {args.weights_dtype or 'auto'} / ours weights {args.compare_weights_dtype}: single-stream decode "
                    f"{entry['weights_dtype_ratio']['single_decode_tps']:.2f}x ({summary['ours']['single_decode_tps']:.1f} vs {alt['single_decode_tps']:.1f} tok/s), "
                    f"aggregate {entry['weights_dtype_ratio']['aggregate_tps']:.2f}x ({summary['ours']['aggregate_tps']:.1f} vs {alt['aggregate_tps']:.1f} tok/s), "
                    f"TTFT median {entry['weights_dtype_ratio']['ttft_median_ms']:.2f}x ({summary['ours']['ttft_median_ms']:.0f} vs {alt['ttft_median_ms']:.0f} ms)"
                )
            if args.kv_bits:
                full = summary["ours_full"]
                entry["kv_bits_over_full"] = {
                    "single_decode_tps": summary["ours"]["single_decode_tps"] / full["single_decode_tps"],
                    "aggregate_tps": summary["ours"]["aggregate_tps"] / full["aggregate_tps"],
                }
                probes = {}
                for kind, bits in (("ours", args.kv_bits), ("ours_full", None)):
                    server = Server(kind, model_id, free_port(), args.probe_prompts, bits, env, args.weights_dtype)
                    try:
                        server.wait_ready(model_id, args.ready_timeout)
                        probes[kind] = asyncio.run(
                            probe_kv_bytes(server, model_id, args.probe_prompts, args.probe_prompt_tokens)
                        )
                    finally:
                        server.stop()
                entry["kv_bytes_probe"] = {
                    **probes,
                    "ratio": probes["ours"]["peak_kv_cache_bytes"] / probes["ours_full"]["peak_kv_cache_bytes"],
                }
                print(
                    f"ours kv-bits {args.kv_bits} / ours full precision: single-stream decode "
                    f"{entry['kv_bits_over_full']['single_decode_tps']:.2f}x ({summary['ours']['single_decode_tps']:.1f} vs {full['single_decode_tps']:.1f} tok/s), "
                    f"aggregate {entry['kv_bits_over_full']['aggregate_tps']:.2f}x"
                )
                print(
                    f"KV-bytes probe ({args.probe_prompts} concurrent prompts of {probes['ours']['prompt_tokens']} tokens): "
                    f"{probes['ours']['peak_kv_cache_bytes']} vs {probes['ours_full']['peak_kv_cache_bytes']} bytes = {entry['kv_bytes_probe']['ratio']:.2f}x"
                )
            report["models"][name] = entry
        print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
