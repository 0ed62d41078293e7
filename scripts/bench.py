#!/usr/bin/env python3
"""Side-by-side benchmark: `macprovider serve` against `mlx_lm.server`, same model, same machine, one run.

For each model, each server is started in turn (alternating, `--rounds` times) from this environment's
installed packages, and measured with the same client code:

- single-stream decode tokens/s: streamed greedy requests one at a time (median of `--single-repeats`);
  (completion tokens − 1) / (last − first content chunk time);
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

`--workload edit` makes every request an edit: a ~540-token Python module (~600 tokens with the instruction on
the SmolLM2 tokenizer; names and numbers drawn per request, so each stream gets a different file) to be returned
whole with one function renamed, output only code (`--prompt-words` is then unused; `--max-tokens` ~256–600 lets
the answer run long). With `--speculative MODE` (e.g. prompt-lookup; `--speculative-tokens K` optional) a third
server joins the rotation, ours with `serve --speculative MODE` (`ours_spec`): the table adds ours_spec/peer and
ours_spec/ours, and the greedy completions of ours and ours_spec for the same prompts are compared (single-stream
and concurrent, identical / total). Speculation must not change greedy text: any difference is printed with
`!!!` and the script exits 1 after the JSON line.

Without `--model`, tiny random-weight models are built locally (macprovider.models.demo): `tiny` (hidden 128,
2 layers) and `small` (hidden 256, 4 layers), in `--dtype` (float32 by default, see demo.TinyModelSpec).

    python scripts/bench.py                       # tiny + small, full-precision KV
    python scripts/bench.py --kv-bits 8 --models small
    python scripts/bench.py --workload edit --max-tokens 400 --speculative prompt-lookup   # edits, 3 servers
    python scripts/bench.py --model macprovider-bench/smollm2-135m-f32 --workload edit --speculative prompt-lookup
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
import random
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

FILLER = "The sea is wide and the sea is deep, it sings the sailors off to sleep. "

# The edit workload: a ~540-token Python module (SmolLM2 tokenizer; ~600 with the instruction) whose names and
# numbers are drawn from the request tag, so no two streams share more than the first few tokens.
EDIT_NOUNS = "invoice shipment sensor ticket account order reading booking parcel sample patient vehicle".split()
EDIT_LABELS = "region owner status category supplier station channel priority".split()
EDIT_AMOUNTS = "amount weight duration score price distance volume latency".split()
EDIT_FILE = string.Template('''\
"""${Noun} records for the ${label} service (module ${tag}): loading, validation and summaries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

MAX_${NOUN}S = ${limit}
${AMOUNT}_CEILING = ${ceiling}


@dataclasses.dataclass
class ${Noun}:
    """One ${noun} as stored on disk, one JSON object per line."""

    ${noun}_id: int
    ${label}: str
    ${amount}: float
    tags: list[str] = dataclasses.field(default_factory=list)

    def is_valid(self) -> bool:
        """True when the ${label} is set and the ${amount} lies within 0..${AMOUNT}_CEILING."""
        return bool(self.${label}) and 0 <= self.${amount} <= ${AMOUNT}_CEILING


def load_${noun}s(path: Path) -> list[${Noun}]:
    """Read ${noun}s from a JSON lines file, skipping blank lines; at most MAX_${NOUN}S."""
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        data = json.loads(line)
        records.append(${Noun}(data["id"], data["${label}"], float(data["${amount}"]), data.get("tags", [])))
    return records[:MAX_${NOUN}S]


def total_${amount}(records: list[${Noun}]) -> float:
    """Sum of the ${amount} over the valid ${noun}s."""
    return sum(record.${amount} for record in records if record.is_valid())


def group_by_${label}(records: list[${Noun}]) -> dict[str, list[${Noun}]]:
    """${Noun}s keyed by their ${label}, each group in input order."""
    groups: dict[str, list[${Noun}]] = {}
    for record in records:
        groups.setdefault(record.${label}, []).append(record)
    return groups


def main(argv: list[str]) -> int:
    records = load_${noun}s(Path(argv[1]))
    print(json.dumps({"count": len(records), "valid": sum(record.is_valid() for record in records)}))
    for name, group in sorted(group_by_${label}(records).items()):
        print(f"{name}: {len(group)} ${noun}s, total ${amount} {total_${amount}(group):.2f}")
    return 0
''')


def edit_prompt(tag: str) -> str:
    """An edit request: the module drawn for `tag`, then the instruction to return it with one function renamed."""
    rng = random.Random(f"edit-{tag}")
    noun, label, amount = rng.choice(EDIT_NOUNS), rng.choice(EDIT_LABELS), rng.choice(EDIT_AMOUNTS)
    source = EDIT_FILE.substitute(
        tag=tag,
        noun=noun,
        Noun=noun.capitalize(),
        NOUN=noun.upper(),
        label=label,
        amount=amount,
        AMOUNT=amount.upper(),
        limit=rng.randrange(100, 10000),
        ceiling=rng.randrange(50, 5000),
    )
    return (
        f"Here is the file `{noun}_{label}.py`:\n\n```python\n{source}```\n\n"
        f"Return the complete file again, unchanged except that the function `group_by_{label}` is renamed to "
        f"`{noun}s_by_{label}` (its definition and every call). Output only the code."
    )


def make_prompt(workload: str, tag: str, prompt_words: int) -> str:
    """The prompt of one request: `plain` ~`prompt_words` words of filler, `edit` an edit of a whole file."""
    if workload == "edit":
        return edit_prompt(tag)
    return f"Request {tag}. " + FILLER * max(1, prompt_words // 16)


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
        speculative: str | None = None,
        speculative_tokens: int | None = None,
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
            if speculative:
                argv += ["--speculative", speculative]
            if speculative_tokens:
                argv += ["--speculative-tokens", str(speculative_tokens)]
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
        # Ours keeps prompt KV on disk across restarts: each start gets an empty cache of its own, or a later
        # server would find the prompts an earlier one wrote (the peer has no such tier).
        self.prompt_cache_dir = tempfile.TemporaryDirectory(prefix="bench-kv-")
        env = dict(env, MACPROVIDER_PROMPT_CACHE_DIR=self.prompt_cache_dir.name)
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
        self.prompt_cache_dir.cleanup()


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: TTFT, per-chunk times, completion tokens (from usage if sent), text."""
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
    pieces: list[str] = []
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
                if content := (choice.get("delta") or {}).get("content"):
                    chunk_times.append(time.perf_counter())
                    pieces.append(content)
    tokens = usage["completion_tokens"] if usage else len(chunk_times)
    return {
        "start": start,
        "chunk_times": chunk_times,
        "tokens": tokens,
        "end": time.perf_counter(),
        "text": "".join(pieces),
    }


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
    workload: str = "plain",
) -> dict:
    """The figures of one server in one round, and under "texts" the completions of its single-stream and
    concurrent requests (the same prompts for every server in that round)."""
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    prompt = lambda i: make_prompt(workload, f"{round_index}-{i}", prompt_words)  # noqa: E731
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, model, prompt(-1), 8)  # discarded warm-up
        single_rates, single_texts = [], []
        for repeat in range(single_repeats):
            single = await stream_one(client, url, model, prompt(-2 - repeat), max_tokens)
            single_texts.append(single["text"])
            times = single["chunk_times"]
            if len(times) > 1:  # tokens, not chunks: with speculation one chunk may carry several tokens
                single_rates.append((single["tokens"] - 1) / (times[-1] - times[0]))
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
            filler = FILLER * max(1, prompt_words // 16)
            burst_prompt = f"Burst {round_index}. Return this text unchanged. " + filler
            if workload == "edit":
                burst_prompt = edit_prompt(f"burst-{round_index}")
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
        "texts": {"single": single_texts, "concurrent": [r["text"] for r in results]},
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


def ratios(summary: dict, kind: str, base: str, keys: tuple[str, ...]) -> dict:
    """summary[kind] / summary[base] for each key where the base is non-zero."""
    return {key: summary[kind][key] / summary[base][key] for key in keys if summary[base][key]}


def compare_texts(reference: list[dict], candidate: list[dict]) -> dict:
    """How many completions two servers gave identically for the same prompts (measure's "texts", per round)."""
    figures: dict = {"first_mismatch": None}
    for part in ("single", "concurrent"):
        pairs = [(a, b) for ref, cand in zip(reference, candidate) for a, b in zip(ref[part], cand[part])]
        figures[f"{part}_identical"] = sum(a == b for a, b in pairs)
        figures[f"{part}_total"] = len(pairs)
        if figures["first_mismatch"] is None:
            figures["first_mismatch"] = next(
                ({"requests": part, "reference": a[:300], "candidate": b[:300]} for a, b in pairs if a != b), None
            )
    figures["identical"] = figures["first_mismatch"] is None
    return figures


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
        "--workload",
        choices=("plain", "edit"),
        default="plain",
        help="plain: filler prompts of --prompt-words; edit: a ~540-token Python file per request, to be returned "
        "whole with one function renamed (a different file per stream)",
    )
    parser.add_argument(
        "--speculative",
        metavar="MODE",
        help="also run ours with serve --speculative MODE (ours_spec, e.g. prompt-lookup) and check its greedy "
        "text equals ours",
    )
    parser.add_argument("--speculative-tokens", type=int, metavar="K", help="ours_spec: serve --speculative-tokens K")
    parser.add_argument(
        "--compare-weights-dtype",
        metavar="DTYPE",
        help="also run ours with serve --weights-dtype DTYPE (e.g. native: the checkpoint's quantized weights) and print ours / that",
    )
    args = parser.parse_args()
    if args.speculative_tokens is not None and not args.speculative:
        parser.error("--speculative-tokens needs --speculative")
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so each `finally: server.stop()` kills its server's group.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    import mlx.core as mx
    import mlx_lm

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    kinds = ("ours", "peer", "ours_full") if args.kv_bits else ("ours", "peer")
    if args.compare_weights_dtype:
        kinds += ("ours_alt",)
    if args.speculative:
        kinds += ("ours_spec",)
    text_mismatch = False
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
            "workload": args.workload,
            "speculative": args.speculative,
            "speculative_tokens": args.speculative_tokens,
            "kv_bits": args.kv_bits,
            "dtype": None if args.model else args.dtype,
            "weights_dtype": {
                "ours": args.weights_dtype or "auto (serve default)",
                "ours_alt": args.compare_weights_dtype,
            },
            "environment": {
                "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
                "MACPROVIDER_CPU_KERNELS": os.environ.get("MACPROVIDER_CPU_KERNELS"),  # unset: auto
                "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__,
                "cpus": os.cpu_count(),
            },
            "models": {},
        }
        for name, model_id in models.items():
            samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
            texts: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for round_index in range(args.rounds):
                for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
                    bits = None if kind == "ours_full" else args.kv_bits
                    dtype = args.compare_weights_dtype if kind == "ours_alt" else args.weights_dtype
                    spec = (args.speculative, args.speculative_tokens) if kind == "ours_spec" else (None, None)
                    server = Server(kind, model_id, free_port(), args.streams, bits, env, dtype, *spec)
                    try:
                        server.wait_ready(model_id, args.ready_timeout)
                        figures = asyncio.run(
                            measure(
                                server,
                                model_id,
                                args.streams,
                                args.prompt_words,
                                args.max_tokens,
                                round_index,
                                args.single_repeats,
                                args.burst,
                                args.workload,
                            )
                        )
                        texts[kind].append(figures.pop("texts"))
                        samples[kind].append(figures)
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
            entry = {**summary, "ratios_ours_over_peer": ratios(summary, "ours", "peer", compared)}
            columns = [("ours", "ours", 12), ("peer", "mlx_lm.server", 16)]  # kind, heading, width
            ratio_columns = [("ours/peer", entry["ratios_ours_over_peer"])]
            if args.speculative:
                entry["ratios_ours_spec_over_peer"] = ratios(summary, "ours_spec", "peer", compared)
                entry["ratios_ours_spec_over_ours"] = ratios(summary, "ours_spec", "ours", compared)
                columns.insert(1, ("ours_spec", "ours_spec", 12))
                ratio_columns += [
                    ("spec/peer", entry["ratios_ours_spec_over_peer"]),
                    ("spec/ours", entry["ratios_ours_spec_over_ours"]),
                ]
            print(
                f"\n== {name} ({model_id}) workload={args.workload} streams={args.streams} "
                f"kv_bits={args.kv_bits or 'unset'} speculative={args.speculative or 'unset'}"
                f"{f' tokens={args.speculative_tokens}' if args.speculative_tokens else ''} rounds={args.rounds}"
            )
            print(
                f"{'metric':<22}"
                + "".join(f"{heading:>{width}}" for _, heading, width in columns)
                + "".join(f"{heading:>12}" for heading, _ in ratio_columns)
            )
            for key in compared:
                print(
                    f"{key:<22}"
                    + "".join(f"{summary[kind][key]:>{width}.1f}" for kind, _, width in columns)
                    + "".join(f"{values.get(key, float('nan')):>12.2f}" for _, values in ratio_columns)
                )
            print(
                f"health p99 (ours, during {args.streams} streams): {summary['ours']['health_p99_ms']:.1f} ms; peak KV bytes (ours): {summary['ours']['peak_kv_cache_bytes']}"
            )
            if args.speculative:
                same = entry["greedy_text_ours_vs_ours_spec"] = compare_texts(texts["ours"], texts["ours_spec"])
                print(
                    f"greedy text, ours_spec vs ours (same prompts): single-stream {same['single_identical']}/"
                    f"{same['single_total']} identical, concurrent {same['concurrent_identical']}/"
                    f"{same['concurrent_total']} identical"
                )
                if not same["identical"]:
                    text_mismatch = True
                    mismatch = same["first_mismatch"]
                    for stream in (sys.stdout, sys.stderr):
                        print(
                            f"!!! SPECULATION CHANGED GREEDY TEXT ({name}): first difference in the "
                            f"{mismatch['requests']} requests (a difference only in concurrent ones may also come "
                            f"from another batch composition)\n!!! ours:      {mismatch['reference']!r}\n"
                            f"!!! ours_spec: {mismatch['candidate']!r}",
                            file=stream,
                            flush=True,
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
    return 1 if text_mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
