"""The probe workload and its measurement over HTTP (docs/autotune.md#stage-1-the-biggest-model, #stage-2-the-knobs).

Workload: one chat request whose prompt fills ~80 % of the target context, counted in the model's own
tokens (its tokenizer and chat template, loaded from the cached files with `transformers` — no MLX);
`temperature: 0`, `max_tokens: 64`, streamed with `stream_options.include_usage`. Every request gets its
own filler text (a seeded word stream), so prompt-prefix reuse cannot make a replicate cheaper than the
first one.

Timing: TTFT = request start → first non-empty content delta (client clock). Decode throughput comes from
the usage chunk (`macprovider_generated_completion_tokens` / `macprovider_generation_ms`). A max_batch N
cell sends N concurrent streams per replicate; its aggregate throughput is Σ generated tokens divided by
the span of the streams' decode intervals, each interval being [usage arrival − generation_ms, usage
arrival] — for N = 1 exactly the usage-chunk rate, and a server that serialises the streams is not
credited with N× the speed. One discarded warm-up request precedes the measured replicates.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macprovider.autotune.provider import Deadline, DeadlineReached
from macprovider.autotune.search import median, p95

MAX_TOKENS = 64
PROMPT_FRACTION = 0.8
DEFAULT_LEAK_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")
# Time a request may take after its first token (64 tokens on a slow machine, generously).
DECODE_TIMEOUT_S = 600.0
_WORDS = (
    "memory bandwidth cache token batch model weights context latency throughput silicon kernel queue "
    "stream decode prefill tensor layer head attention value key budget machine local provider request "
    "answer sentence river mountain garden window music paper orange violet number letter signal"
).split()


class Workload:
    """Chat prompts of ~`fraction` × target context tokens for one model, plus its leak markers.

    `model_dir`: the cached model directory (tokenizer files + tokenizer_config.json chat template).
    Raises ValueError when the tokenizer cannot be loaded or has no chat template.
    """

    def __init__(self, model_dir: Path, target_context: int, fraction: float = PROMPT_FRACTION) -> None:
        import logging
        import os

        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" line
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:  # noqa: BLE001 - any loader failure means we cannot size the prompt
            raise ValueError(f"cannot load the tokenizer: {exc.__class__.__name__}") from None
        self.target_tokens = max(1, int(target_context * fraction))
        markers = set(DEFAULT_LEAK_MARKERS)
        markers.update(t for t in getattr(self.tokenizer, "all_special_tokens", []) if t)
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        markers.update(tok.content for tok in decoder.values() if getattr(tok, "special", False) and tok.content)
        self.leak_markers = tuple(sorted(markers))

    name = "synthetic"

    def cached_tokens(self, max_context: int, max_batch: int, replicates: int) -> int:
        """Tokens this workload's finished requests leave in the provider's prompt cache: the warm-up and
        every measured stream (at most memory.PROMPT_CACHE_ENTRIES), each ≤ prompt + MAX_TOKENS, ≤ max_context."""
        from macprovider.autotune.memory import PROMPT_CACHE_ENTRIES

        requests = min(1 + replicates * max_batch, PROMPT_CACHE_ENTRIES)
        return requests * min(max_context, self.target_tokens + MAX_TOKENS)

    def count(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of `messages` after the chat template (with the generation prompt)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def messages(self, seed: int, target: int | None = None, prefix: str = "") -> tuple[list[dict[str, str]], int]:
        """A prompt with its own filler (seeded), as close to `target` tokens (default `target_tokens`) as
        possible without exceeding it (the shortest prompt when even the template alone is longer).
        `prefix` (text) starts the message, so prompts sharing it share a token prefix. Returns (messages,
        tokens)."""
        target = self.target_tokens if target is None else target
        rng = random.Random(seed)
        head = prefix + f"Request {seed}. Read these notes, then write one short sentence about them.\n"

        def build(n_words: int) -> list[dict[str, str]]:
            words = [_WORDS[rng_index] for rng_index in indices[:n_words]]
            return [{"role": "user", "content": head + " ".join(words)}]

        indices: list[int] = []
        hi = 16
        while True:
            while len(indices) < hi:
                indices.append(rng.randrange(len(_WORDS)))
            if self.count(build(hi)) > target or hi > 4 * target:
                break
            hi *= 2
        lo = 0
        while lo < hi:  # largest n with count(build(n)) <= target
            mid = (lo + hi + 1) // 2
            if self.count(build(mid)) <= target:
                lo = mid
            else:
                hi = mid - 1
        chosen = build(lo)
        return chosen, self.count(chosen)

    # -- the workload interface the probe runs (ReplayWorkload in autotune/replay.py has the same) ------
    def describe(self) -> dict[str, Any]:
        """The report's `workload` object: `{"kind": "synthetic"}`."""
        return {"kind": self.name}

    def requests_per_round(self, max_batch: int) -> int:
        """Measured requests in one replicate: max_batch concurrent streams."""
        return max_batch

    def memory_shape(self) -> dict[str, int | None]:
        """What the memory estimate needs of the workload (memory.estimate): prompts of `target_tokens`
        (~80 % of the target context) plus MAX_TOKENS generated, max_batch of them at once."""
        return {
            "sequence_tokens": self.target_tokens + MAX_TOKENS,
            "prompt_tokens": self.target_tokens,
            "live_sequences": None,
        }

    def warmup(self, seed: int) -> ProbeRequest:
        """The discarded warm-up request."""
        return ProbeRequest(self.messages(seed)[0], MAX_TOKENS, 1)

    def round(self, replicate: int, max_batch: int, seed: int) -> list[ProbeRequest]:
        """One replicate: max_batch prompts of their own filler, all sent at once."""
        return [
            ProbeRequest(self.messages(seed + 1 + replicate * max_batch + i)[0], MAX_TOKENS, max_batch)
            for i in range(max_batch)
        ]


@dataclass(frozen=True)
class ProbeRequest:
    """One request of a workload: chat messages, max_tokens, and the concurrency it arrives under (it is
    sent once fewer than `concurrency` of its round's requests are in flight)."""

    messages: list[dict[str, str]]
    max_tokens: int
    concurrency: int


@dataclass
class StreamResult:
    """One streamed request: ok/error, TTFT (ms), returned text, usage figures, usage arrival time (s)."""

    ok: bool = False
    error: str | None = None
    ttft_ms: float | None = None
    text: str = ""
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    generation_ms: float | None = None
    end_s: float | None = None
    cached_tokens: int | None = None


async def stream_once(
    client: Any,
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    first_token_timeout_s: float,
    deadline: Deadline | None,
) -> StreamResult:
    """POST one streamed chat completion and time it. Never raises for HTTP/protocol failures (they are
    `error`); raises DeadlineReached when the run budget ends first."""
    result = StreamResult()
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    loop = asyncio.get_running_loop()
    budget = deadline.remaining() if deadline is not None else math.inf
    limit = min(first_token_timeout_s, budget)
    start = time.monotonic()
    try:
        async with asyncio.timeout(limit) as timer:
            async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        result.error = f"stream error: {str(event['error'].get('message', ''))[:200]}"
                        return result
                    for choice in event.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if result.ttft_ms is None:
                                result.ttft_ms = (time.monotonic() - start) * 1000.0
                                rest = min(DECODE_TIMEOUT_S, deadline.remaining() if deadline else math.inf)
                                timer.reschedule(loop.time() + rest)
                            result.text += content
                    usage = event.get("usage")
                    if usage:
                        result.end_s = time.monotonic()
                        result.prompt_tokens = usage.get("prompt_tokens")
                        result.generated_tokens = usage.get("macprovider_generated_completion_tokens")
                        result.generation_ms = usage.get("macprovider_generation_ms")
                        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    except TimeoutError:
        if deadline is not None and deadline.expired:
            raise DeadlineReached("--max-duration ran out during a probe request") from None
        phase = "first token" if result.ttft_ms is None else "completion"
        result.error = f"timed out waiting for the {phase}"
        return result
    except Exception as exc:  # noqa: BLE001 - transport / protocol failure of this request
        result.error = f"request failed: {exc.__class__.__name__}"
        return result
    if result.generated_tokens is None or result.generation_ms is None:
        result.error = "no usage chunk with macprovider_generation_ms"
        return result
    result.ok = True
    return result


def aggregate_throughput(streams: Sequence[StreamResult]) -> float | None:
    """Σ generated tokens / span of the decode intervals (s); None if not computable (module docstring)."""
    if not streams:
        return None
    ends: list[float] = []
    starts: list[float] = []
    tokens = 0
    for s in streams:
        if s.generated_tokens is None or s.generation_ms is None or s.end_s is None:
            return None
        ends.append(s.end_s)
        starts.append(s.end_s - s.generation_ms / 1000.0)
        tokens += s.generated_tokens
    span = max(ends) - min(starts)
    if span <= 0:
        return None
    return tokens / span


@dataclass
class Measurement:
    """Everything one trial measured: per-replicate aggregate tok/s, every TTFT sample (ms), errors,
    leaked markers, empty outputs, the prompt tokens the server counted, the server's peak memory."""

    throughputs: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    empty_outputs: int = 0
    prompt_tokens: int | None = None
    replicates: int = 0
    peak_memory_bytes: int | None = None
    cached_tokens: int = 0  # prompt tokens the server reused from its prefix cache, over the measured rounds

    @property
    def tps_median(self) -> float | None:
        return median(self.throughputs) if self.throughputs else None

    @property
    def ttft_p95_ms(self) -> float | None:
        return p95(self.ttfts_ms) if self.ttfts_ms else None


def judge(m: Measurement, gate_ttft_ms: float, expected_requests: int) -> tuple[bool, str | None]:
    """Feasibility (docs/autotune.md#stage-1-the-biggest-model) over all replicates → (fits, reason when not)."""
    if m.errors:
        return False, f"{len(m.errors)} request(s) failed: {m.errors[0]}"
    if len(m.ttfts_ms) < expected_requests:
        return False, "a request produced no content"
    if m.empty_outputs:
        return False, "empty output"
    if m.leaks:
        return False, f"end-of-turn token text leaked into the output: {sorted(set(m.leaks))[0]}"
    tps = m.tps_median
    if tps is None or not math.isfinite(tps) or tps <= 0:
        return False, "no finite decode throughput"
    ttft = m.ttft_p95_ms
    if ttft is None or ttft > gate_ttft_ms:
        return False, f"ttft p95 {ttft:.0f} ms exceeds gate {gate_ttft_ms:g} ms"
    return True, None


def _note_stream(m: Measurement, s: StreamResult, markers: Sequence[str]) -> None:
    if not s.ok:
        m.errors.append(s.error or "request failed")
        return
    if s.ttft_ms is not None:
        m.ttfts_ms.append(s.ttft_ms)
    if not s.text:
        m.empty_outputs += 1
    m.leaks.extend(marker for marker in markers if marker in s.text)
    if s.prompt_tokens is not None:
        m.prompt_tokens = s.prompt_tokens


async def _run_round(
    client: Any, base_url: str, model: str, requests: Sequence[ProbeRequest], **kwargs: Any
) -> list[StreamResult]:
    """Send `requests` in order, each once fewer than its `concurrency` requests are in flight."""
    in_flight = 0
    changed = asyncio.Condition()

    async def one(request: ProbeRequest) -> StreamResult:
        nonlocal in_flight
        try:
            return await stream_once(client, base_url, model, request.messages, max_tokens=request.max_tokens, **kwargs)
        finally:
            async with changed:
                in_flight -= 1
                changed.notify_all()

    tasks = []
    for request in requests:
        async with changed:
            # The predicate runs within this iteration and must read the current in_flight.
            await changed.wait_for(lambda: in_flight < max(1, request.concurrency))  # noqa: B023
            in_flight += 1
        tasks.append(asyncio.create_task(one(request)))
    return list(await asyncio.gather(*tasks))


async def _measure(
    base_url: str,
    model: str,
    workload: Workload,
    *,
    max_batch: int,
    replicates: int,
    gate_ttft_ms: float,
    deadline: Deadline | None,
    seed: int,
) -> Measurement:
    import httpx

    m = Measurement()
    first_timeout = gate_ttft_ms / 1000.0 + 5.0
    rounds = [workload.round(replicate, max_batch, seed) for replicate in range(replicates)]
    connections = max([max_batch] + [r.concurrency for requests in rounds for r in requests]) + 2
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits, trust_env=False) as client:
        kwargs: dict[str, Any] = dict(first_token_timeout_s=first_timeout, deadline=deadline)
        warm_request = workload.warmup(seed)
        warm = await stream_once(
            client, base_url, model, warm_request.messages, max_tokens=warm_request.max_tokens, **kwargs
        )
        if not warm.ok:
            m.errors.append(f"warm-up: {warm.error}")
            return m
        for requests in rounds:
            streams = await _run_round(client, base_url, model, requests, **kwargs)
            m.replicates += 1
            for s in streams:
                _note_stream(m, s, workload.leak_markers)
            if all(s.ok for s in streams):
                tps = aggregate_throughput(streams)
                if tps is not None:
                    m.throughputs.append(tps)
            m.cached_tokens += sum(s.cached_tokens or 0 for s in streams)
        try:
            health = (await client.get(f"{base_url}/v1/health", timeout=5.0)).json()
            peak = (health.get("engine") or {}).get("peak_memory_bytes")
            m.peak_memory_bytes = int(peak) if isinstance(peak, (int, float)) else None
        except Exception:  # noqa: BLE001 - health is informative only
            pass
    return m


def measure(
    base_url: str,
    model: str,
    workload: Workload,
    *,
    max_batch: int,
    replicates: int,
    gate_ttft_ms: float,
    deadline: Deadline | None = None,
    seed: int = 0,
) -> Measurement:
    """Run the workload's warm-up and `replicates` measured rounds (`workload.round`: for the synthetic
    probe `max_batch` concurrent streams, for a replay the recorded shapes at their concurrency).

    Raises DeadlineReached when the run budget ends mid-trial (partial figures are lost with it).
    """
    return asyncio.run(
        _measure(
            base_url,
            model,
            workload,
            max_batch=max_batch,
            replicates=replicates,
            gate_ttft_ms=gate_ttft_ms,
            deadline=deadline,
            seed=seed,
        )
    )
