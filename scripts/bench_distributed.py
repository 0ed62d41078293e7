#!/usr/bin/env python3
"""Distributed serving benchmark (docs/several-machines.md): one model served by 1, 2 and 3 ranks on this machine.

For each rank count: `macprovider serve` (1 rank) or `mlx.launch -n R --backend ring -- macprovider serve
--parallel MODE`, one discarded warm-up request, then `--repeats` greedy chat requests of `--max-tokens`
tokens with the openai client. Prints per rank count: decode tokens/s (median, from the usage's
`macprovider_generation_ms`), time to first token, the mean time of one control round (health's
`distributed.control_seconds / control_messages`) and the bytes sent per generated token, and whether the
greedy text equals the one-rank text. A `BENCH_JSON` line carries everything.

Bytes per token (one sequence, all links together; from the model's config.json):
    control   one all_sum of CONTROL_INTS int32 per step; a ring all_sum sends 2(N−1)/N of the array per rank
    tokens    one all_sum of the sampled token id (int32) per step
    pipeline  (N−1) stage boundaries × hidden_size × activation bytes
    tensor    2 all_sums (attention out, MLP down) per layer of hidden_size × activation bytes, ring-scaled
On one machine the ranks share the CPU and loopback: expect it slower than one process. Between Macs the
per-token bytes are what the link must carry.

    .venv/bin/python scripts/bench_distributed.py --model macprovider-demo/smollm2 --parallel pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from macprovider.engine.distributed import CONTROL_INTS  # noqa: E402
from macprovider.models.ids import ensure_local, read_model_config  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(model: str, ranks: int, parallel: str, port: int, log: Path) -> subprocess.Popen:
    serve = [sys.executable, "-m", "macprovider", "serve", "--model", model, "--port", str(port)]
    if ranks > 1:
        launch = str(Path(sys.executable).parent / "mlx.launch")
        serve = [
            launch,
            "-n",
            str(ranks),
            "--backend",
            "ring",
            "-p",
            str(free_port()),
            "--",
            *serve,
            "--parallel",
            parallel,
        ]
    return subprocess.Popen(serve, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(base + "/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready")


def one_request(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[str, float, float]:
    """(text, decode tokens/s, TTFT s) of one streamed greedy request."""
    started = time.perf_counter()
    first = None
    text = ""
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    extra = usage.model_extra or {}
    rate = extra["macprovider_generated_completion_tokens"] / (extra["macprovider_generation_ms"] / 1000)
    return text, rate, (first or time.perf_counter()) - started


def bytes_per_token(config: dict, ranks: int, parallel: str, activation_bytes: int) -> dict[str, float]:
    if ranks == 1:
        return {"control": 0, "tokens": 0, "activations": 0, "total": 0}
    ring = 2 * (ranks - 1) / ranks * ranks  # bytes all ranks send for an array of 1 byte in a ring all_sum
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    control = CONTROL_INTS * 4 * ring
    tokens = 4 * ring
    if parallel == "pipeline":
        activations = (ranks - 1) * hidden * activation_bytes
    else:
        activations = 2 * layers * hidden * activation_bytes * ring
    return {"control": control, "tokens": tokens, "activations": activations, "total": control + tokens + activations}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--parallel", choices=("pipeline", "tensor"), default="pipeline")
    parser.add_argument("--ranks", default="1,2,3", help="comma-separated rank counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = read_model_config(ensure_local(args.model))
    dtype = str(config.get("torch_dtype", "float16"))
    activation_bytes = 4 if "32" in dtype else 2
    results = []
    reference = None
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    for ranks in [int(r) for r in args.ranks.split(",")]:
        port = free_port()
        log = logs / f"bench_distributed_{ranks}.log"
        process = start(args.model, ranks, args.parallel, port, log)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process)
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
            one_request(client, args.model, 8)  # warm-up, discarded
            runs = [one_request(client, args.model, args.max_tokens) for _ in range(args.repeats)]
            health = httpx.get(base + "/v1/health", timeout=10).json()
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        text = runs[0][0]
        reference = text if reference is None else reference
        distributed = health.get("distributed") or {}
        messages = distributed.get("control_messages") or 0
        row = {
            "ranks": ranks,
            "parallel": args.parallel if ranks > 1 else None,
            "layers_per_stage": distributed.get("layers_per_stage"),
            "decode_tok_s": statistics.median(r[1] for r in runs),
            "decode_tok_s_samples": [round(r[1], 2) for r in runs],
            "ttft_s": statistics.median(r[2] for r in runs),
            "control_round_ms": 1000 * distributed["control_seconds"] / messages if messages else None,
            "bytes_per_token": bytes_per_token(config, ranks, args.parallel, activation_bytes),
            "same_greedy_text": text == reference,
            "rank0_active_memory_bytes": health["engine"].get("active_memory_bytes"),
            "rank0_rss_mb": health.get("memory_rss_mb"),
        }
        results.append(row)
        control = f"{row['control_round_ms']:.3f} ms" if row["control_round_ms"] is not None else "-"
        print(
            f"ranks={ranks} decode={row['decode_tok_s']:.1f} tok/s ttft={row['ttft_s'] * 1000:.0f} ms control_round={control} "
            f"bytes/token={row['bytes_per_token']['total']:.0f} rank0_active_mem={(row['rank0_active_memory_bytes'] or 0) / 2**20:.0f} MiB "
            f"same_text={row['same_greedy_text']}",
            flush=True,
        )
    print(
        "BENCH_JSON "
        + json.dumps(
            {
                "model": args.model,
                "max_tokens": args.max_tokens,
                "activation_bytes": activation_bytes,
                "ld_preload": os.environ.get("LD_PRELOAD"),
                "results": results,
            }
        )
    )
    return 0 if all(r["same_greedy_text"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
