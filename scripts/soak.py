#!/usr/bin/env python3
"""Soak: `macprovider serve --max-batch B` under minutes of mixed traffic. A benchmark, not a test.

Phases, each against a fresh server started from this environment (the model built locally unless `--model`):

1. soak (ours): `--clients` concurrent clients for `--minutes`, each looping over a mix of streamed chat,
   non-streamed chat, structured output (`response_format` json_schema), tool requests and legacy
   completions; `--disconnect` of the streams hang up after their first content chunk, `--hostile` of the
   requests are hostile bodies (bad JSON, wrong types, 20k-word prompts, 100k-deep nesting, non-UTF-8, ...)
   that must get a 4xx in the error envelope. A poller reads /v1/health every 0.25 s (latency p99) and the
   server's RSS every second.
2. queue drain (ours): max-batch + `--queue-depth` + 8 requests at once; those over the queue get 429 with
   Retry-After, every admitted one completes, and health goes back to 0 active / 0 queued.
3. memory side by side (`--peer-seconds` > 0): an 8-client load — 8 clients of chat (5-200 word prompts,
   4-64 tokens, half streamed) — on ours (`--prompt-cache-mib`) and on `mlx_lm.server --decode-concurrency B`;
   RSS at start (after the first request) / peak / end of each.

Pass criteria (exit 1 otherwise): no 5xx, no non-JSON error body, no stuck sequence (health
`active_sequences`, `requests_in_flight`, `requests_queued` back to 0 once the clients stop), prompt-cache
bytes never above the cap, the queue phase drains. Prints a summary and `SOAK_JSON {...}`.

    python scripts/soak.py                                   # defaults sized for a 2-core machine
    python scripts/soak.py --clients 8 --minutes 1 --peer-seconds 60
    python scripts/soak.py --model macprovider-demo/smollm2  # a model already in the Hub cache
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FILLER, Server, build_models, free_port  # noqa: E402

WORDS = FILLER.split()
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def percentile(values: list[float], q: float) -> float | None:
    """sorted[ceil(q n) − 1], the nearest-rank percentile (None for no values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def prompt_text(rnd: random.Random, low: int = 5, high: int = 200) -> str:
    return f"{rnd.random():.6f} " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(low, high)))


def hostile_bodies(model: str) -> list[tuple[str, bytes]]:
    """(name, raw body) pairs a careless or hostile client sends; each must get a 4xx JSON error."""
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    as_json = lambda obj: json.dumps(obj).encode()  # noqa: E731
    return [
        ("not_json", b"{not json"),
        ("not_utf8", b'{"model": "\xff\xfe", "messages": []}'),
        ("deep_nesting", b"[" * 100_000 + b"]" * 100_000),
        ("messages_string", as_json({**ok, "messages": "hello"})),
        ("messages_empty", as_json({**ok, "messages": []})),
        ("bad_role", as_json({**ok, "messages": [{"role": "wizard", "content": "hi"}]})),
        ("negative_max_tokens", as_json({**ok, "max_tokens": -5})),
        ("temperature_text", as_json({**ok, "temperature": "hot"})),
        ("unknown_model", as_json({**ok, "model": "nobody/nothing"})),
        ("huge_prompt", as_json({**ok, "messages": [{"role": "user", "content": "sea " * 20_000}]})),
        ("array_body", as_json([ok])),
        ("null_content", as_json({**ok, "messages": [{"role": "user", "content": None}]})),
    ]


class Tally:
    """Outcomes by kind and status; bad error bodies (non-JSON or not the envelope) kept as examples."""

    def __init__(self) -> None:
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.bad_bodies: list[str] = []
        self.transport_errors: collections.Counter[str] = collections.Counter()
        self.disconnected = 0

    def record(self, kind: str, status: int, body: bytes | None = None) -> None:
        self.by_kind[f"{kind}:{status}"] += 1
        self.statuses[status] += 1
        if status >= 400 and body is not None:
            try:
                error = json.loads(body)["error"]
                assert isinstance(error["message"], str) and isinstance(error["code"], str)
            except Exception:  # noqa: BLE001 - any failure to parse the envelope is the finding
                if len(self.bad_bodies) < 10:
                    self.bad_bodies.append(f"{kind} {status}: {body[:200]!r}")


async def one_request(client: httpx.AsyncClient, model: str, rnd: random.Random, tally: Tally, args) -> None:
    """One request of the soak mix."""
    if rnd.random() < args.hostile:
        name, raw = rnd.choice(hostile_bodies(model))
        response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        tally.record(f"hostile_{name}", response.status_code, response.content)
        return
    messages = [{"role": "user", "content": prompt_text(rnd)}]
    max_tokens = rnd.randint(4, 64)
    roll = rnd.random()
    if roll < 0.40:  # streamed chat, some hang up mid-stream
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        hang_up = rnd.random() < args.disconnect
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                tally.record("stream", response.status_code, await response.aread())
                return
            async for line in response.aiter_lines():
                if hang_up and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    tally.disconnected += 1
                    tally.record("stream_disconnected", 200)
                    return  # leaving the block closes the connection mid-stream
            tally.record("stream", 200)
        return
    if roll < 0.65:
        kind, path, body = (
            "chat",
            "/v1/chat/completions",
            {"model": model, "messages": messages, "max_tokens": max_tokens},
        )
    elif roll < 0.80:
        kind, path = "structured", "/v1/chat/completions"
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
        }
    elif roll < 0.92:
        kind, path = "tools", "/v1/chat/completions"
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "tools": TOOLS}
    else:
        kind, path, body = (
            "completion",
            "/v1/completions",
            {"model": model, "prompt": messages[0]["content"], "max_tokens": max_tokens},
        )
    response = await client.post(path, json=body)
    tally.record(kind, response.status_code, response.content)


async def client_loop(base: str, model: str, seed: int, until: float, tally: Tally, args) -> None:
    rnd = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=300, trust_env=False) as client:
        while time.monotonic() < until:
            try:
                await one_request(client, model, rnd, tally, args)
            except httpx.HTTPError as exc:
                tally.transport_errors[exc.__class__.__name__] += 1


class Watcher:
    """Polls /v1/health (latency, prompt-cache and MLX bytes) and the server's RSS while a phase runs."""

    def __init__(self, base: str | None, pid: int) -> None:
        self.base, self.process = base, psutil.Process(pid)
        self.health_ms: list[float] = []
        self.rss: list[int] = []
        self.max_prompt_cache = self.max_active = self.max_cache = 0
        self.stop = asyncio.Event()

    def rss_now(self) -> int:
        return self.process.memory_info().rss + sum(c.memory_info().rss for c in self.process.children(recursive=True))

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            next_rss = 0.0
            while not self.stop.is_set():
                if time.monotonic() >= next_rss:
                    self.rss.append(self.rss_now())
                    next_rss = time.monotonic() + 1.0
                if self.base is not None:
                    tic = time.perf_counter()
                    try:
                        engine = (await client.get(self.base + "/v1/health")).json()["engine"]
                        self.health_ms.append((time.perf_counter() - tic) * 1000)
                        self.max_prompt_cache = max(self.max_prompt_cache, engine.get("prompt_cache_bytes", 0))
                        self.max_active = max(self.max_active, engine.get("active_memory_bytes", 0))
                        self.max_cache = max(self.max_cache, engine.get("cache_memory_bytes", 0))
                    except (httpx.HTTPError, ValueError, KeyError):
                        self.health_ms.append(float("inf"))
                try:
                    await asyncio.wait_for(self.stop.wait(), 0.25)
                except TimeoutError:
                    pass
            self.rss.append(self.rss_now())


async def settle(base: str, timeout: float = 30) -> dict:
    """Health once in-flight, queued and active sequences are all 0 (or the last reading at `timeout`)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as client:
        while True:
            health = (await client.get("/v1/health")).json()
            if (health["requests_in_flight"], health["requests_queued"], health["engine"]["active_sequences"]) == (
                0,
                0,
                0,
            ):
                return health
            if time.monotonic() >= deadline:
                return health
            await asyncio.sleep(0.1)


async def soak_phase(server: Server, model: str, args) -> dict:
    base = f"http://127.0.0.1:{server.port}"
    tally, watcher = Tally(), Watcher(base, server.process.pid)
    watch = asyncio.create_task(watcher.run())
    until = time.monotonic() + args.minutes * 60
    await asyncio.gather(*(client_loop(base, model, args.seed + i, until, tally, args) for i in range(args.clients)))
    health = await settle(base)
    watcher.stop.set()
    await watch
    stuck = health["requests_in_flight"] + health["requests_queued"] + health["engine"]["active_sequences"]
    return {
        "requests": sum(tally.statuses.values()),
        "statuses": dict(sorted(tally.statuses.items())),
        "by_kind": dict(sorted(tally.by_kind.items())),
        "server_errors_5xx": sum(n for status, n in tally.statuses.items() if status >= 500),
        "bad_error_bodies": tally.bad_bodies,
        "transport_errors": dict(tally.transport_errors),
        "disconnected_mid_stream": tally.disconnected,
        "stuck_sequences": stuck,
        "health_p50_ms": percentile(watcher.health_ms, 0.50),
        "health_p99_ms": percentile(watcher.health_ms, 0.99),
        "health_samples": len(watcher.health_ms),
        "rss_start_mib": watcher.rss[0] / 2**20,
        "rss_peak_mib": max(watcher.rss) / 2**20,
        "rss_end_mib": watcher.rss[-1] / 2**20,
        "prompt_cache_bytes_max": watcher.max_prompt_cache,
        "prompt_cache_cap_bytes": args.prompt_cache_mib * 2**20,
        "mlx_active_bytes_max": watcher.max_active,
        "mlx_cache_bytes_max": watcher.max_cache,
        "health_after": health["engine"],
    }


async def queue_phase(server: Server, model: str, args) -> dict:
    """max_batch + queue_depth + 8 requests at once: 429 beyond the queue, every admitted one completes."""
    base = f"http://127.0.0.1:{server.port}"
    total = args.max_batch + args.queue_depth + 8
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 16}
    async with httpx.AsyncClient(
        base_url=base, timeout=600, trust_env=False, limits=httpx.Limits(max_connections=total + 4)
    ) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(total)))
    codes = collections.Counter(r.status_code for r in responses)
    retry_after = all(r.headers.get("retry-after", "").isdigit() for r in responses if r.status_code == 429)
    health = await settle(base)
    drained = (health["requests_in_flight"], health["requests_queued"], health["engine"]["active_sequences"]) == (
        0,
        0,
        0,
    )
    return {
        "sent": total,
        "statuses": dict(codes),
        "retry_after_on_429": retry_after,
        "drained": drained,
        "ok": codes[200] + codes[429] == total and codes[200] >= args.max_batch and drained and retry_after,
    }


async def chat_load(server: Server, model: str, args, with_health: bool) -> dict:
    """The memory-comparison load: 8 clients of chat (5-200 word prompts, 4-64 tokens, half streamed)."""
    base = f"http://127.0.0.1:{server.port}"
    watcher = Watcher(base if with_health else None, server.process.pid)
    start_rss = watcher.rss_now()
    watch = asyncio.create_task(watcher.run())
    until = time.monotonic() + args.peer_seconds
    statuses: collections.Counter[int] = collections.Counter()

    async def one_client(seed: int) -> None:
        rnd = random.Random(seed)
        async with httpx.AsyncClient(base_url=base, timeout=300, trust_env=False) as client:
            while time.monotonic() < until:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt_text(rnd)}],
                    "max_tokens": rnd.randint(4, 64),
                    "stream": rnd.random() < 0.5,
                }
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    await response.aread()
                    statuses[response.status_code] += 1

    await asyncio.gather(*(one_client(args.seed + 1000 + i) for i in range(8)))
    watcher.stop.set()
    await watch
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "rss_start_mib": start_rss / 2**20,
        "rss_peak_mib": max(watcher.rss) / 2**20,
        "rss_end_mib": watcher.rss[-1] / 2**20,
        "prompt_cache_bytes_max": watcher.max_prompt_cache if with_health else None,
        "mlx_active_bytes_max": watcher.max_active if with_health else None,
        "mlx_cache_bytes_max": watcher.max_cache if with_health else None,
    }


def print_soak(soak: dict, model: str, args) -> None:
    """The soak phase's summary, printed as soon as it ends (a later phase failing loses nothing)."""
    print(f"\n== soak: {args.clients} clients x {args.minutes:g} min on {model}, --max-batch {args.max_batch}")
    print(
        f"requests {soak['requests']}  statuses {soak['statuses']}  disconnected mid-stream {soak['disconnected_mid_stream']}"
    )
    print(
        f"5xx {soak['server_errors_5xx']}  bad error bodies {len(soak['bad_error_bodies'])}  transport errors {soak['transport_errors']}  stuck sequences {soak['stuck_sequences']}"
    )
    print(
        f"/v1/health p50 {soak['health_p50_ms']:.1f} ms  p99 {soak['health_p99_ms']:.1f} ms ({soak['health_samples']} samples)"
    )
    print(
        f"RSS start {soak['rss_start_mib']:.0f} MiB  peak {soak['rss_peak_mib']:.0f}  end {soak['rss_end_mib']:.0f}; "
        f"prompt cache max {soak['prompt_cache_bytes_max'] / 2**20:.1f} MiB (cap {args.prompt_cache_mib}); "
        f"MLX active max {soak['mlx_active_bytes_max'] / 2**20:.0f} MiB, buffer cache max {soak['mlx_cache_bytes_max'] / 2**20:.0f} MiB",
        flush=True,
    )


def start(kind: str, model: str, args, env: dict[str, str]) -> Server:
    server = Server(kind, model, free_port(), args.max_batch, None, env)
    try:
        server.wait_ready(model)
    except BaseException:
        server.stop()
        raise
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model id in the Hub cache (default: build the bench's `small` model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--queue-depth", type=int, default=64, help="what the server is told (MACPROVIDER_MAX_QUEUE_DEPTH)"
    )
    parser.add_argument("--prompt-cache-mib", type=int, default=64, help="MACPROVIDER_PROMPT_CACHE_BYTES in MiB")
    parser.add_argument("--disconnect", type=float, default=0.2, help="fraction of streams that hang up mid-stream")
    parser.add_argument("--hostile", type=float, default=0.05, help="fraction of hostile request bodies")
    parser.add_argument("--peer-seconds", type=float, default=60, help="memory phase per server (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        MACPROVIDER_PROMPT_CACHE_BYTES=str(args.prompt_cache_mib * 2**20),
        MACPROVIDER_MAX_QUEUE_DEPTH=str(args.queue_depth),
    )
    report: dict = {
        "args": vars(args),
        "environment": {"LD_PRELOAD": os.environ.get("LD_PRELOAD"), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory(prefix="macprovider-soak-") as tmp:
        model = args.model
        if model is None:
            env["HF_HOME"] = tmp
            model = build_models(Path(tmp), ["small"], "float32")["small"]
        report["model"] = model
        server = start("ours", model, args, env)
        try:
            report["soak"] = soak = asyncio.run(soak_phase(server, model, args))
            print_soak(soak, model, args)
            report["queue"] = queue = asyncio.run(queue_phase(server, model, args))
            print(
                f"queue: {queue['sent']} at once -> {queue['statuses']}, Retry-After on every 429: {queue['retry_after_on_429']}, drained: {queue['drained']}",
                flush=True,
            )
        finally:
            server.stop()
        if args.peer_seconds > 0:
            report["memory"] = {}
            for kind in ("ours", "peer"):
                try:
                    server = start(kind, model, args, env)
                except RuntimeError as error:  # the memory comparison is reported as missing, the soak stands
                    report["memory"][kind] = {"error": str(error)}
                    print(f"memory ({kind}): {error}", flush=True)
                    continue
                try:
                    report["memory"][kind] = mem = asyncio.run(
                        chat_load(server, model, args, with_health=kind == "ours")
                    )
                finally:
                    server.stop()
                print(
                    f"memory ({kind}, 8 chat clients x {args.peer_seconds:g} s, {mem['requests']} requests {mem['statuses']}): "
                    f"RSS {mem['rss_start_mib']:.0f} -> peak {mem['rss_peak_mib']:.0f} -> end {mem['rss_end_mib']:.0f} MiB",
                    flush=True,
                )

    print("SOAK_JSON " + json.dumps(report))
    passed = (
        soak["server_errors_5xx"] == 0
        and not soak["bad_error_bodies"]
        and soak["stuck_sequences"] == 0
        and soak["prompt_cache_bytes_max"] <= soak["prompt_cache_cap_bytes"]
        and queue["ok"]
    )
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
