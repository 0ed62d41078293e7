"""Speculative decoding inside the continuous batch: prompt-lookup drafts, verified in one batched forward pass.

mlx-lm's server turns batching off when it speculates (a draft model drives one sequence); here every running
sequence may carry its own draft, and one forward pass of width W = 1 + the longest draft verifies them all.

- Drafts (`PromptLookup`): prompt-lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; transformers'
  `prompt_lookup_num_tokens`, vLLM's n-gram proposer): the sequence's last n tokens (n = 3, then 2) are
  looked up at their latest earlier occurrence in its own context (prompt and output), and the tokens that
  followed there are the draft. No second model; at its best when the output quotes the input — a file
  returned with an edit, a document quoted, JSON re-emitted.
- Verification (`SpeculativeGenerationBatch`): row b's input is its pending token y followed by its draft
  d_1 … d_k (shorter drafts are padded; padding is never accepted). The sequence's own sampler (greedy,
  temperature/top-p/top-k, seeded) draws a token t_j from the target distribution at every position j, and
  d_{j+1} is accepted while t_j = d_{j+1}; the first t_j that differs (or the token after the last accepted
  draft) is the next pending token. For a draft that is one fixed token, this is exactly the acceptance rule
  of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Algorithm 1):
  accept with probability min(1, p(d)/q(d)) = p(d) as q puts all its mass on d, and on rejection sample from
  norm(max(0, p − q)) = p restricted to tokens ≠ d — which is t_j conditioned on t_j ≠ d. So the output
  distribution is the sampler's own, and greedy output is the greedy output without speculation.
- Rollback: every row wrote W positions; each keeps its pending token and its accepted drafts. The batch
  caches roll back per row (`kvcache.RowTrimMixin`: the rest become masked holes, compacted when they add
  up), quantized KV (kv-bits) included.
- Width: verifying costs — a forward pass over B × W positions. `StepCosts` keeps the measured seconds of a
  step per (B, W) (an exponential moving average; unmeasured widths start from a linear prior), each row
  an acceptance rate α (moving average of accepted / drafted), and each step takes the W that maximizes
  expected tokens per second, Σ_b (1 + α_b + … + α_b^m_b) / cost(B, W) with m_b = min(draft_b, W − 1)
  (the expected accepted run of a geometric acceptance model, Leviathan et al. 2023 §3.1). A draft not
  verified still teaches α for free: the next step's pending token shows whether its first token was right
  (so a batch that starts out not verifying learns when drafts turn good). W = 1 is
  mlx-lm's own pipelined `GenerationBatch` step, unchanged — as is every step where no sequence has a
  draft. A sequence with logits processors (penalties, a grammar) never drafts: its processors see one
  position per step.

Emission order and the cache invariant are `GenerationBatch`'s: emitted tokens are in the KV cache (and in
`tokens[b]`); the pending token (`_next_tokens`) is not yet.
"""

from __future__ import annotations

import time
from typing import Any, cast

import mlx.core as mx
from mlx_lm.generate import GenerationBatch

from macprovider.engine import cpu_kernels
from macprovider.engine.kvcache import row_trimmable

# n-gram lengths looked up, longest first (a 1-token match drafts too often to pay for its verification).
NGRAM_SIZES = (3, 2)
# The acceptance rate assumed before any draft was checked, and the weight of each observation in the moving
# averages (one per sequence; one for the batch, which new sequences start from).
INITIAL_ACCEPTANCE = 0.5
ACCEPTANCE_SMOOTHING = 0.3


class StepCosts:
    """Seconds of one decode step by (B sequences, W positions each): an exponential moving average of the
    measured steps (weight `smoothing`), else a prior from a measured width of that B, linear in W:
    cost(B, W) = cost(B, 1) × (1 + (0.1 + 0.02 B)(W − 1)) — the slope fits SmolLM2-135M float32 on two x86
    cores at ~600 tokens of context (B = 1: +12 % per position, B = 8: +26 %); measurements replace it."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self._seconds: dict[tuple[int, int], float] = {}
        self._samples: dict[tuple[int, int], int] = {}

    @staticmethod
    def _relative(batch: int, width: int) -> float:
        return 1.0 + (0.1 + 0.02 * batch) * (width - 1)

    def record(self, batch: int, width: int, seconds: float) -> None:
        """Add one measured step; the first of each (B, W) is replaced by the second (a first step of a new
        shape pays one-time costs: buffer allocation, a cache growing)."""
        key = (batch, width)
        samples = self._samples[key] = self._samples.get(key, 0) + 1
        known = self._seconds.get(key)
        self._seconds[key] = seconds if known is None or samples == 2 else known + self.smoothing * (seconds - known)

    def estimate(self, batch: int, width: int) -> float:
        known = self._seconds.get((batch, width))
        if known is not None:
            return known
        base = self._seconds.get((batch, 1))
        if base is None:
            measured = [(w, t) for (b, w), t in self._seconds.items() if b == batch]
            base = measured[0][1] / self._relative(batch, measured[0][0]) if measured else 1.0
        return base * self._relative(batch, width)


class PromptLookup:
    """Prompt-lookup drafts for one sequence: an index of its n-grams (NGRAM_SIZES) → where each last occurred.

    `sync(tokens)` appends the tokens the sequence gained since the last call (its context only grows);
    `propose(k, pending)` returns up to k tokens that followed the latest earlier occurrence of the context's
    last n tokens (with `pending` appended to the context when given), or [] when there is none;
    `shortest=1` also accepts a one-token match (a last resort: `SpeculativeGenerationBatch` uses it only to
    fill positions a verification pass computes anyway).
    """

    def __init__(self, tokens: list[int] | None = None):
        self.tokens: list[int] = []
        self._follows: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in (*NGRAM_SIZES, 1)}
        self.sync(tokens or [])

    def sync(self, tokens: list[int]) -> None:
        for token in tokens[len(self.tokens) :]:
            self._append(token)

    def _append(self, token: int) -> None:
        # The n-grams ending just before `token` now have a continuation: `token`, at this index.
        at = len(self.tokens)
        for n, follows in self._follows.items():
            if at >= n:
                follows[tuple(self.tokens[at - n : at])] = at
        self.tokens.append(token)

    def propose(self, k: int, pending: int | None = None, shortest: int = NGRAM_SIZES[-1]) -> list[int]:
        if k <= 0:
            return []
        context = self.tokens if pending is None else [*self.tokens[-max(NGRAM_SIZES) :], pending]
        for n, follows in self._follows.items():
            if len(context) < n or n < shortest:
                continue
            start = follows.get(tuple(context[-n:]))
            if start is not None:
                draft = self.tokens[start : start + k]
                if pending is not None and len(draft) < k and start + k > len(self.tokens):
                    draft.append(pending)  # the continuation runs into the pending token itself
                return draft[:k]
        return []


class SpeculativeGenerationBatch(GenerationBatch):
    """mlx-lm's `GenerationBatch` (continuous batching's decode side) with prompt-lookup speculation (module
    docstring). `max_draft_tokens` (k, ≥ 1) caps one sequence's draft; `drafted_tokens` / `accepted_tokens`
    count draft tokens verified and accepted since the start (for health and /metrics)."""

    # GenerationBatch's own state (mlx-lm is untyped): per-layer batch caches, per-row log-probability vectors.
    prompt_cache: list[Any]
    _next_logprobs: list[Any]

    def __init__(self, *args: Any, max_draft_tokens: int = 4, **kwargs: Any):
        self.max_draft_tokens = max_draft_tokens
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.costs = StepCosts()
        self._lookups: list[PromptLookup] = []
        self._acceptance: list[float] = []
        self._unverified: list[int | None] = []  # first token of a draft the last step did not verify
        self._batch_acceptance = INITIAL_ACCEPTANCE
        self._previous_width = 0  # the last step's width (0: none yet)
        super().__init__(*args, **kwargs)
        self._lookups = [PromptLookup(t) for t in self.tokens]
        self._acceptance = [INITIAL_ACCEPTANCE] * len(self.uids)
        self._unverified = [None] * len(self.uids)

    @classmethod
    def empty_batch(cls, model: Any, fallback_sampler: Any, max_draft_tokens: int) -> SpeculativeGenerationBatch:
        """An empty batch for `BatchGenerator._generation_batch` (as `GenerationBatch.empty`)."""
        return cls(
            model=model,
            fallback_sampler=fallback_sampler,
            uids=[],
            inputs=mx.array([], dtype=mx.uint32),
            prompt_cache=[],
            tokens=[],
            samplers=[],
            logits_processors=[],
            max_tokens=[],
            stop_sequences=[],
            max_draft_tokens=max_draft_tokens,
        )

    # -- batch membership ------------------------------------------------------------------------------
    def extend(self, batch: Any) -> None:
        super().extend(batch)
        self.prompt_cache = [row_trimmable(layer) for layer in self.prompt_cache]
        self._lookups.extend(PromptLookup(t) for t in batch.tokens)
        self._acceptance.extend([self._batch_acceptance] * len(batch.uids))
        self._unverified.extend([None] * len(batch.uids))

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        self._lookups = [self._lookups[i] for i in keep]
        self._acceptance = [self._acceptance[i] for i in keep]
        self._unverified = [self._unverified[i] for i in keep]

    # -- decoding --------------------------------------------------------------------------------------
    def next(self) -> list[Any]:
        if not self.uids:
            return []
        if not self._may_draft():
            self._unverified = [None] * len(self.uids)
            return self._plain_step(synchronized=False)
        pending = cast(list[int], self._next_tokens.tolist())  # waits for the step in flight; (B,): a flat list
        self._check_unverified(pending)
        drafts = [self._draft(row, token) for row, token in enumerate(pending)]
        width = self._choose_width(drafts)
        if width > 1:
            filled = self._fill(pending, drafts, width)
            return self._verify(pending, [draft[: width - 1] for draft in drafts], filled)
        self._unverified = [draft[0] if draft else None for draft in drafts]
        return self._plain_step(synchronized=True)

    def _fill(self, pending: list[int], drafts: list[list[int]], width: int) -> set[int]:
        """Rows without a draft in a verification pass of `width` would compute padding: give them a draft
        from a one-token match instead (free to verify). Returns those rows; their outcomes do not move their
        acceptance rates, which price real drafts."""
        filled = set()
        for row, draft in enumerate(drafts):
            if not draft and self._draftable(row):
                room = self.max_tokens[row] - self._num_tokens[row] - 1
                drafts[row] = self._lookups[row].propose(min(width - 1, room), pending[row], shortest=1)
                if drafts[row]:
                    filled.add(row)
        return filled

    def _check_unverified(self, pending: list[int]) -> None:
        for row, guess in enumerate(self._unverified):
            if guess is not None:
                self._observe(row, float(guess == pending[row]))
        self._unverified = [None] * len(pending)

    def _observe(self, row: int, accepted_fraction: float) -> None:
        self._acceptance[row] += ACCEPTANCE_SMOOTHING * (accepted_fraction - self._acceptance[row])
        self._batch_acceptance += ACCEPTANCE_SMOOTHING * (accepted_fraction - self._batch_acceptance)

    def _plain_step(self, synchronized: bool) -> list[Any]:
        """mlx-lm's pipelined step, timed for `StepCosts`. Pipelined, a step's call lasts about one forward
        pass (it waits for the one in flight) — but only when the step before was pipelined too. After a
        wait for the pending tokens (`synchronized`), nothing is in flight, so this step waits for its own
        forward pass to be timed like a verification step."""
        batch, started = len(self.uids), time.perf_counter()
        responses = super().next()
        if synchronized and self._next_tokens is not None:
            mx.eval(self._next_tokens)
            self.costs.record(batch, 1, time.perf_counter() - started)
        elif not synchronized and self._previous_width == 1:
            self.costs.record(batch, 1, time.perf_counter() - started)
        self._previous_width = 1 if not synchronized else 0
        return responses

    def _choose_width(self, drafts: list[list[int]]) -> int:
        """The width with the most expected tokens per second (module docstring); 1 = no verification."""
        batch = len(drafts)
        longest = max(len(draft) for draft in drafts)
        best_width, best_rate = 1, batch / self.costs.estimate(batch, 1)
        for width in range(2, longest + 2):
            expected = sum(
                1 + _expected_run(alpha, min(len(draft), width - 1)) for alpha, draft in zip(self._acceptance, drafts)
            )
            rate = expected / self.costs.estimate(batch, width)
            if rate > best_rate:
                best_width, best_rate = width, rate
        return best_width

    def _draftable(self, row: int) -> bool:
        return not self.logits_processors[row] and self.max_tokens[row] - self._num_tokens[row] > 1

    def _may_draft(self) -> bool:
        """A cheap check before waiting for the pending tokens: does any sequence's context (without its
        pending token) end in an n-gram seen before? Without one, the step stays mlx-lm's pipelined step."""
        for row, lookup in enumerate(self._lookups):
            if self._draftable(row):
                lookup.sync(self.tokens[row])
                if lookup.propose(1):
                    return True
        return False

    def _draft(self, row: int, pending: int) -> list[int]:
        if not self._draftable(row):
            return []
        room = self.max_tokens[row] - self._num_tokens[row] - 1  # the pending token is emitted too
        self._lookups[row].sync(self.tokens[row])
        return self._lookups[row].propose(min(self.max_draft_tokens, room), pending)

    def _verify(
        self, pending: list[int], drafts: list[list[int]], filled: frozenset[int] | set[int] = frozenset()
    ) -> list[Any]:
        """One forward pass over [pending, draft…] for every row; accept, roll back, respond."""
        started = time.perf_counter()
        width = 1 + max(len(d) for d in drafts)
        rows = [[token, *draft, *[token] * (width - 1 - len(draft))] for token, draft in zip(pending, drafts)]
        inputs = mx.array(rows)
        logits = self.model(inputs, cache=self.prompt_cache)
        logits = self._process_first_position(logits, inputs)
        logprobs = cpu_kernels.log_probabilities(logits)
        targets = cast(list[list[int]], self._sample(logprobs).tolist())  # (B, W)
        self.costs.record(len(pending), width, time.perf_counter() - started)
        self._previous_width = width

        responses, keep, trims, next_tokens, next_logprobs = [], [], [], [], []
        for row, (token, draft) in enumerate(zip(pending, drafts)):
            accepted = 0
            while accepted < len(draft) and targets[row][accepted] == draft[accepted]:
                accepted += 1
            self._adapt(row, len(draft), accepted, learn=row not in filled)
            emitted = [token, *draft[:accepted]]
            emitted_logprobs = [self._next_logprobs[row], *(logprobs[row, j] for j in range(accepted))]
            finish, count = self._finish_within(row, emitted)
            trims.append(width - count)
            self.tokens[row].extend(emitted[:count])
            responses.append((row, emitted[:count], emitted_logprobs[:count], finish))
            next_tokens.append(targets[row][accepted])
            next_logprobs.append(logprobs[row, accepted])
            if finish is None:
                keep.append(row)
        for layer in self.prompt_cache:
            layer.trim_rows(trims)

        out = []
        for row, emitted, emitted_logprobs, finish in responses:
            for i, (token, token_logprobs) in enumerate(zip(emitted, emitted_logprobs)):
                last = i == len(emitted) - 1
                reason = finish if last else None
                out.append(
                    self.Response(
                        uid=self.uids[row],
                        token=token,
                        logprobs=token_logprobs,
                        finish_reason=reason,
                        prompt_cache=self.extract_cache(row) if reason else None,
                        all_tokens=self.tokens[row] if reason else None,
                    )
                )
        self._current_tokens = inputs[:, 0]
        self._next_tokens = mx.array(next_tokens, dtype=mx.uint32)
        self._next_logprobs = next_logprobs
        if len(keep) < len(self.uids):
            self.filter(keep)
        return out

    def _process_first_position(self, logits: mx.array, inputs: mx.array) -> mx.array:
        """Apply each sequence's logits processors at position 0 (sequences with processors never draft),
        with the token context mlx-lm keeps for them."""
        if not any(self.logits_processors):
            return logits
        rows = []
        for row, processors in enumerate(self.logits_processors):
            row_logits = logits[row]
            if processors:
                context = self._token_context[row].update_and_fetch(inputs[row, :1])
                first = row_logits[:1]
                for processor in processors:
                    first = processor(context, first)
                row_logits = mx.concatenate([first, row_logits[1:]], axis=0)
            rows.append(row_logits)
        return mx.stack(rows)

    def _sample(self, logprobs: mx.array) -> mx.array:
        """A token per row and position, (B, W), each from its sequence's sampler — one call for the whole
        batch when it shares one sampler (e.g. greedy)."""
        batch, width, vocab = logprobs.shape
        samplers = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * batch)]
        if all(s is samplers[0] for s in samplers):
            return samplers[0](logprobs.reshape(batch * width, vocab)).reshape(batch, width)
        return mx.stack([sampler(logprobs[row]) for row, sampler in enumerate(samplers)])

    def _adapt(self, row: int, drafted: int, accepted: int, learn: bool = True) -> None:
        if not drafted:
            return
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        if learn:
            self._observe(row, accepted / drafted)

    def _finish_within(self, row: int, emitted: list[int]) -> tuple[str | None, int]:
        """(finish reason, tokens of `emitted` to keep): the sequence ends at the first of them that
        reaches max_tokens or completes a stop sequence (mlx-lm's rules, token by token)."""
        for i, token in enumerate(emitted):
            self._num_tokens[row] += 1
            finish = "length" if self._num_tokens[row] >= self.max_tokens[row] else None
            if self._matchers[row].advance(token):
                finish = "stop"
            if finish is not None:
                return finish, i + 1
        return None, len(emitted)


def _expected_run(alpha: float, drafted: int) -> float:
    """Expected accepted drafts out of `drafted` when each is accepted with probability `alpha` until the
    first rejection: α + α² + … + α^drafted."""
    return sum(alpha**j for j in range(1, drafted + 1))


def enable_speculation(generator: Any, max_draft_tokens: int, make_cache: Any) -> bool:
    """Give mlx-lm's `BatchGenerator` a `SpeculativeGenerationBatch` (before anything is inserted). False,
    changing nothing, when a layer of the caches `make_cache()` builds (one sequence's) cannot roll back per
    row once batched: only full-attention layers (`KVCache`, kv-bits `QuantizedKVCache`) can."""
    from mlx_lm.models.cache import KVCache

    from macprovider.engine.kvcache import QuantizedKVCache

    if not all(type(layer) in (KVCache, QuantizedKVCache) for layer in make_cache()):
        return False
    generator._generation_batch = SpeculativeGenerationBatch.empty_batch(
        generator.model, generator.sampler, max_draft_tokens
    )
    return True
