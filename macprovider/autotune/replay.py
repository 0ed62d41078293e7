"""`--workload recorded|FILE`: replay the operator's own request shapes against each trial
(docs/autotune.md#objectives-and-workloads).

The shapes (macprovider.core.request_shapes: prompt tokens, cached prefix tokens, max tokens, concurrency at arrival)
come from the record `serve` keeps (`recorded`: `<config dir>/workload.jsonl`) or from a JSON/JSONL file. The
newest REPLAY_MAX_REQUESTS shapes form one measured round; every replicate replays them in their recorded
order, each request sent once fewer than its recorded concurrency are in flight, so four concurrent chats
arrive four at a time and an editor's one-by-one completions one by one.

Prompts are built in the model's own tokens (the probe's tokenizer and chat template, no MLX): every prompt
starts with the same seeded shared document — the first `cached_tokens` of a shape's prompt are that
document's first tokens — then filler of its own (a seeded word stream) up to `prompt_tokens`. The warm-up
request is the shared document itself, at the longest cached prefix of the workload, so the provider's
prefix cache really holds it and a shape's cached prefix is really reused (the usage's `cached_tokens`,
summed per trial, shows it). Fitted to the trial: max_tokens = recorded (MAX_TOKENS when the client left it
unset), at most REPLAY_MAX_TOKENS and half the target context; prompt tokens at most target context minus
that; a cached prefix below the prompt.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from macprovider.autotune.probe import _WORDS, MAX_TOKENS, ProbeRequest, Workload
from macprovider.core.request_shapes import RequestShape, shapes_jsonl

REPLAY_MAX_REQUESTS = 16  # newest shapes replayed per round
REPLAY_MAX_TOKENS = 256  # a recorded max_tokens above this is replayed as this (keeps a trial bounded)
_DOCUMENT_SEED = 15


def shapes_digest(shapes: Sequence[RequestShape]) -> str:
    """`sha256:<hex>` of the replayed shapes' token counts and concurrency (timestamps left out): the
    workload's identity in the report and the recipe hash."""
    canonical = [
        RequestShape(s.prompt_tokens, s.cached_tokens, s.max_tokens, s.concurrency, endpoint=s.endpoint) for s in shapes
    ]
    return "sha256:" + hashlib.sha256(shapes_jsonl(canonical).encode()).hexdigest()


def workload_summary(kind: str, source: str | None, shapes: Sequence[RequestShape]) -> dict[str, Any]:
    """The report's `workload` object: `{"kind": "synthetic"}`, or for a replay `{kind: recorded|file,
    source, shapes (in the file), replayed (the newest REPLAY_MAX_REQUESTS), max_concurrency,
    cached_fraction (recorded cached prefix tokens / prompt tokens of the replayed shapes), digest}`."""
    if kind == "synthetic":
        return {"kind": "synthetic"}
    replayed = list(shapes)[-REPLAY_MAX_REQUESTS:]
    prompt = sum(s.prompt_tokens for s in replayed)
    return {
        "kind": kind,
        "source": source,
        "shapes": len(shapes),
        "replayed": len(replayed),
        "max_concurrency": max((s.concurrency for s in replayed), default=1),
        "cached_fraction": round(sum(s.cached_tokens for s in replayed) / prompt, 4) if prompt else 0.0,
        "digest": shapes_digest(replayed),
    }


def fitted(shape: RequestShape, target_context: int) -> tuple[int, int, int]:
    """(prompt tokens, cached prefix tokens, max_tokens) of a shape fitted to the trial (module docstring)."""
    max_tokens = min(shape.max_tokens or MAX_TOKENS, REPLAY_MAX_TOKENS, max(1, target_context // 2))
    prompt = max(1, min(shape.prompt_tokens, target_context - max_tokens))
    cached = max(0, min(shape.cached_tokens, prompt - 1))
    return prompt, cached, max_tokens


class ReplayWorkload(Workload):
    """The probe workload replaying `shapes` (module docstring). `kind`: `recorded` or `file`; `source`:
    the file the shapes came from. Raises ValueError (tokenizer) like `Workload`."""

    def __init__(
        self, model_dir: Path, target_context: int, shapes: Sequence[RequestShape], kind: str, source: str
    ) -> None:
        super().__init__(model_dir, target_context)
        self.name = kind
        self.source = source
        self.shapes_all = list(shapes)
        self.shapes = self.shapes_all[-REPLAY_MAX_REQUESTS:]
        self.fits = [fitted(s, target_context) for s in self.shapes]
        rng = random.Random(_DOCUMENT_SEED)
        self._document = [_WORDS[rng.randrange(len(_WORDS))] for _ in range(2 * target_context + 16)]
        self._prefixes: dict[int, str] = {}
        # Tokens of a prompt holding only the probe's own head line: the room a shared prefix must leave.
        self._head_tokens = self.messages(0, 0)[1]

    def describe(self) -> dict[str, Any]:
        """The report's `workload` object (`workload_summary`)."""
        return workload_summary(self.name, self.source, self.shapes_all)

    def prefix(self, tokens: int) -> str:
        """The longest start of the shared document whose prompt stays within `tokens` tokens ('' for 0)."""
        if tokens <= 0:
            return ""
        if tokens not in self._prefixes:
            lo, hi = 0, len(self._document)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.count([{"role": "user", "content": " ".join(self._document[:mid])}]) <= tokens:
                    lo = mid
                else:
                    hi = mid - 1
            self._prefixes[tokens] = " ".join(self._document[:lo]) + "\n" if lo else ""
        return self._prefixes[tokens]

    def requests_per_round(self, max_batch: int) -> int:
        return len(self.shapes)

    def memory_shape(self) -> dict[str, Any]:
        """The longest replayed sequence (prompt + max_tokens), the longest prompt (the warm-up's included), the
        most requests in flight, and the live windows: per request, (prompt + max_tokens, uncached rest of the
        prompt — the warm-up leaves each shape's cached prefix in the provider's prefix cache) of it and of
        the requests sent before it that may still run (its recorded concurrency; a round is replayed in
        order and finishes before the next), for memory.estimate."""
        rows = [(prompt + out, prompt - self.reused_tokens(prompt, cached)) for prompt, cached, out in self.fits]
        longest_prompt = max(max(prompt for prompt, _, _ in self.fits), max(cached for _, cached, _ in self.fits) + 1)
        return {
            "sequence_tokens": max(prompt + out for prompt, _, out in self.fits),
            "prompt_tokens": longest_prompt,
            "live_sequences": max(shape.concurrency for shape in self.shapes),
            "live_windows": [rows[max(0, i + 1 - shape.concurrency) : i + 1] for i, shape in enumerate(self.shapes)],
        }

    def reused_tokens(self, prompt: int, cached: int) -> int:
        """Tokens of a fitted shape's prompt taken from the shared document (at most its cached prefix, leaving
        room for the probe's head line): what the provider's prefix cache serves."""
        return max(0, min(cached, prompt - self._head_tokens))

    def cached_tokens(self, max_context: int, max_batch: int, replicates: int) -> int:
        """Tokens the warm-up and the newest PROMPT_CACHE_ENTRIES replayed requests leave in the prefix cache."""
        from macprovider.autotune.memory import PROMPT_CACHE_ENTRIES

        per_request = [min(max_context, prompt + out) for prompt, _, out in self.fits] * replicates
        warm = min(max_context, max((cached for _, cached, _ in self.fits), default=0) + 1)
        return sum(([warm] + per_request)[-PROMPT_CACHE_ENTRIES:])

    def warmup(self, seed: int) -> ProbeRequest:
        """The shared document at the workload's longest cached prefix (the first shape when none)."""
        longest = max((cached for _, cached, _ in self.fits), default=0)
        if longest > 0:
            return ProbeRequest([{"role": "user", "content": self.prefix(longest)}], 1, 1)
        prompt, _, out = self.fits[0]
        return ProbeRequest(self.messages(seed, prompt)[0], out, 1)

    def round(self, replicate: int, max_batch: int, seed: int) -> list[ProbeRequest]:
        """Every replayed shape, in order, at its recorded concurrency."""
        requests = []
        for i, (shape, (prompt, cached, out)) in enumerate(zip(self.shapes, self.fits)):
            room = self.reused_tokens(prompt, cached)
            messages, _ = self.messages(seed + 1 + replicate * len(self.shapes) + i, prompt, self.prefix(room))
            requests.append(ProbeRequest(messages, out, shape.concurrency))
        return requests
