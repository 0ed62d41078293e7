"""Stage 1 (biggest feasible model) and Stage 2 (knob hill-climb) as pure functions
(docs/autotune.md#stage-1-the-biggest-model, #stage-2-the-knobs).

Nothing here knows about processes, HTTP or SQLite: both stages take an `evaluate(model, knobs, stage)
-> Trial` callable (a real probe in `autotune.runner`, a scripted fake in tests) and a `record(trial)`
callable that persists each trial the moment it ends. An evaluator that cannot finish a trial (budget
ran out, SIGINT) raises a `TrialAborted` carrying the partial trial; the stage records it and lets the
exception travel up so the run can end with the right `exit_reason`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

FailureClass = Literal["none", "infeasible", "transient", "integrity"]


@dataclass(frozen=True)
class Knobs:
    """The serving knobs of one trial: kv_bits (None = full precision), max_batch, max_context, with
    `--hostfile` the parallel mode (pipeline | tensor; None = one process on this machine), and the speculative
    decoding mode (`off` | `prompt-lookup`, serve's `speculative` setting)."""

    kv_bits: int | None
    max_batch: int
    max_context: int
    parallel: str | None = None
    speculative: str = "off"


@dataclass(frozen=True)
class Trial:
    """One trial = one row of `tune_trials` (docs/autotune.md#database), plus in-memory fields.

    throughput_tps: aggregate decode tokens/s (median over replicates); None when not measured.
    ttft_p95_ms: p95 of every TTFT sample of the trial (ms); None when not measured.
    failure_class: `none` (feasible), `infeasible`, `transient` (pre-warm) or `integrity` (aborts the run).
    weights_bytes: model weight bytes when known (orders the infeasible list, smallest first).
    memory_estimate_bytes / peak_memory_bytes: the estimate and the measured peak (MLX peak + runtime
    baseline, autotune.memory); mlx_peak_memory_bytes the MLX part alone; memory_terms the estimate's terms.
    cached_prompt_tokens: prompt tokens the provider reused from its prefix cache over the measured rounds.
    layers_per_rank: with `--hostfile` and pipeline, the decoder layers each rank holds (by rank).
    """

    stage: int
    model: str
    target_context: int
    knobs: Knobs
    max_tokens: int
    fits: bool
    notes: str | None = None
    measured_prompt_tokens: int | None = None
    throughput_tps: float | None = None
    ttft_p95_ms: float | None = None
    n_err: int = 0
    replicates_n: int | None = None
    memory_estimate_bytes: int | None = None
    peak_memory_bytes: int | None = None
    mlx_peak_memory_bytes: int | None = None
    cached_prompt_tokens: int | None = None
    memory_terms: dict[str, int] | None = field(default=None, repr=False, compare=False)
    weights_bytes: int | None = None
    failure_class: FailureClass = "none"
    kept: bool = False
    row_id: int | None = None
    ttft_samples_ms: tuple[float, ...] = field(default=(), repr=False)
    layers_per_rank: tuple[int, ...] | None = None


class TrialAborted(Exception):
    """The evaluator could not finish a trial; `trial` is what was measured so far (recorded by the stage)."""

    def __init__(self, trial: Trial, message: str = "") -> None:
        super().__init__(message or (trial.notes or "trial aborted"))
        self.trial = trial


class BudgetExhausted(TrialAborted):
    """`--max-duration` ran out during a trial."""


class Interrupted(TrialAborted):
    """SIGINT / SIGTERM arrived during a trial."""


class IntegrityAbort(Exception):
    """A cached model failed its integrity check; the run ends with `pre_warm_integrity_failure`."""

    def __init__(self, trial: Trial) -> None:
        super().__init__(trial.notes or "pre-warm integrity failure")
        self.trial = trial


Evaluate = Callable[[str, Knobs, int], Trial]
Record = Callable[[Trial], Trial]


def median(values: Sequence[float]) -> float:
    """The usual median (mean of the two middle values for an even count). ValueError on empty input."""
    return float(statistics.median(values))


def p95(values: Sequence[float]) -> float:
    """p95 = sorted[ceil(0.95 n) − 1] (nearest-rank, docs/autotune.md#the-probe). ValueError on empty input."""
    if not values:
        raise ValueError("p95 of no values")
    ordered = sorted(values)
    return float(ordered[math.ceil(0.95 * len(ordered)) - 1])


def is_new_best(new: Trial, best: Trial | None, epsilon: float) -> bool:
    """Keep-best rule of docs/autotune.md#stage-2-the-knobs with relative tie band `epsilon`.

    No throughput → never best; no incumbent → best; incumbent throughput ≤ 0 → best iff new > 0;
    relative gain (new − best)/best > ε → best; |gain| ≤ ε → best iff its TTFT is lower (a measured TTFT
    beats an unmeasured one); otherwise the incumbent stays.
    """
    if new.throughput_tps is None or not math.isfinite(new.throughput_tps):
        return False
    if best is None:
        return True
    incumbent = best.throughput_tps
    if incumbent is None or incumbent <= 0:
        return new.throughput_tps > 0
    gain = (new.throughput_tps - incumbent) / incumbent
    if gain > epsilon:
        return True
    if abs(gain) <= epsilon:
        if new.ttft_p95_ms is None:
            return False
        if best.ttft_p95_ms is None:
            return True
        return new.ttft_p95_ms < best.ttft_p95_ms
    return False


OBJECTIVES = ("throughput", "latency", "balanced")


def is_new_best_latency(new: Trial, best: Trial | None, epsilon: float) -> bool:
    """`--objective latency`: the lowest TTFT p95 wins, throughput breaks ties (the mirror of the throughput rule).

    No TTFT → never best; no incumbent (or one without TTFT) → best; relative improvement
    (best − new)/best > ε → best; |change| ≤ ε → best iff its throughput is higher; otherwise the incumbent.
    """
    if new.ttft_p95_ms is None or not math.isfinite(new.ttft_p95_ms):
        return False
    if best is None or best.ttft_p95_ms is None:
        return True
    if best.ttft_p95_ms <= 0:
        return False
    gain = (best.ttft_p95_ms - new.ttft_p95_ms) / best.ttft_p95_ms
    if gain > epsilon:
        return True
    if abs(gain) <= epsilon:
        return (new.throughput_tps or 0.0) > (best.throughput_tps or 0.0)
    return False


def balanced_score(trial: Trial) -> float | None:
    """`--objective balanced`: decode tokens/s divided by TTFT p95 in seconds (None when either is missing).

    Equal weight on relative changes: a cell that doubles TTFT p95 must also double throughput to tie (a
    cell with +3.5 % tokens/s for 2× TTFT loses). Higher is better.
    """
    if not trial.throughput_tps or not trial.ttft_p95_ms or trial.ttft_p95_ms <= 0:
        return None
    return trial.throughput_tps / (trial.ttft_p95_ms / 1000.0)


def is_new_best_balanced(new: Trial, best: Trial | None, epsilon: float) -> bool:
    """Keep-best on `balanced_score` with the throughput rule's relative tie band; a tie goes to the lower TTFT p95."""
    score = balanced_score(new)
    if score is None or not math.isfinite(score):
        return False
    incumbent = balanced_score(best) if best is not None else None
    if incumbent is None:
        return True
    gain = (score - incumbent) / incumbent
    if gain > epsilon:
        return True
    if abs(gain) <= epsilon:
        return new.ttft_p95_ms < best.ttft_p95_ms  # type: ignore[operator, union-attr]
    return False


def keep_best_rule(objective: str) -> Callable[[Trial, Trial | None, float], bool]:
    """The Stage 2 keep-best rule of an objective: throughput (the default), latency or balanced
    (docs/autotune.md#objectives-and-workloads)."""
    rules = {"throughput": is_new_best, "latency": is_new_best_latency, "balanced": is_new_best_balanced}
    return rules[objective]


def objective_key(objective: str) -> Callable[[Trial], float]:
    """Sort key, best first, of an objective's figure: −tokens/s, TTFT p95, or −balanced_score."""
    if objective == "latency":
        return lambda t: t.ttft_p95_ms if t.ttft_p95_ms is not None else math.inf
    if objective == "balanced":
        return lambda t: -(balanced_score(t) or 0.0)
    return lambda t: -(t.throughput_tps or 0.0)


def knobs_text(knobs: Knobs) -> str:
    """`kv_bits=8 max_batch=2 max_context=4096`, then ` parallel=P` with --hostfile and
    ` speculative=prompt-lookup` when speculation is on (the `-v` lines, the progress bar and `why`)."""
    kv = "unset" if knobs.kv_bits is None else knobs.kv_bits
    text = f"kv_bits={kv} max_batch={knobs.max_batch} max_context={knobs.max_context}"
    if knobs.parallel:
        text += f" parallel={knobs.parallel}"
    if knobs.speculative != "off":
        text += f" speculative={knobs.speculative}"
    return text


def explain_choice(best: Trial, trials: Sequence[Trial], objective: str) -> str:
    """One line saying why `best` won among the feasible Stage 2 `trials`, against the runner-up."""

    def knobs(t: Trial) -> str:
        return knobs_text(t.knobs)

    def figure(t: Trial) -> str:
        if objective == "latency":
            return f"ttft p95 {t.ttft_p95_ms:.0f} ms ({t.throughput_tps or 0:.1f} tok/s)"
        if objective == "balanced":
            return f"{balanced_score(t) or 0:.2f} tok/s per s of ttft p95 ({t.throughput_tps or 0:.1f} tok/s, {t.ttft_p95_ms or 0:.0f} ms)"
        return f"{t.throughput_tps or 0:.1f} tok/s (ttft p95 {t.ttft_p95_ms or 0:.0f} ms)"

    others = sorted((t for t in trials if t.fits and t.row_id != best.row_id), key=objective_key(objective))
    line = f"objective {objective}: {knobs(best)} gave {figure(best)}"
    if others:
        line += f"; next best {knobs(others[0])} gave {figure(others[0])}"
    return line


@dataclass(frozen=True)
class Infeasible:
    """A Stage 1 candidate that was not feasible: its 1-based input rank and the reason."""

    model: str
    rank: int
    reason: str
    weights_bytes: int | None = None


@dataclass
class Stage1Result:
    """The chosen candidate (None if none was feasible), its rank and trial, and every infeasible one."""

    chosen: str | None
    rank: int | None
    trial: Trial | None
    infeasible: list[Infeasible]
    trials: list[Trial]


def stage1(
    candidates: Sequence[str], target_context: int, evaluate: Evaluate, record: Record, parallel: str | None = None
) -> Stage1Result:
    """Walk `candidates` in the given order (never re-sorted); stop at the first feasible one.

    Each candidate is evaluated with default knobs (kv_bits unset, max_batch 1, max_context = target, and
    `parallel`: None on one machine, pipeline with `--hostfile` — the split sized by the hosts' budgets).
    Raises IntegrityAbort after recording an integrity failure; TrialAborted propagates after recording.
    """
    trials: list[Trial] = []
    infeasible: list[Infeasible] = []
    knobs = Knobs(None, 1, target_context, parallel)
    for rank, model in enumerate(candidates, start=1):
        try:
            trial = evaluate(model, knobs, 1)
        except TrialAborted as exc:
            exc.trial = record(replace(exc.trial, fits=False, kept=False))
            raise
        trial = record(replace(trial, kept=False))
        trials.append(trial)
        if trial.failure_class == "integrity":
            raise IntegrityAbort(trial)
        if trial.fits:
            return Stage1Result(model, rank, trial, infeasible, trials)
        infeasible.append(Infeasible(model, rank, trial.notes or "infeasible", trial.weights_bytes))
    return Stage1Result(None, None, None, infeasible, trials)


def stage2_cells(
    kv_bits_axis: Sequence[int | None],
    max_batch_axis: Sequence[int],
    max_context_axis: Sequence[int],
    parallel_axis: Sequence[str | None] = (None,),
    speculative: str = "off",
) -> list[Knobs]:
    """Cells kv_bits × max_batch × max_context × parallel, in that nesting order (kv_bits outermost;
    `parallel_axis` is (None,) on one machine, the modes that can split the model with `--hostfile`), every
    cell with the grid's speculative mode (`speculative_plan`)."""
    return [
        Knobs(kv, batch, ctx, mode, speculative)
        for kv in kv_bits_axis
        for batch in max_batch_axis
        for ctx in max_context_axis
        for mode in parallel_axis
    ]


def speculative_plan(speculative_axis: Sequence[str], distributed: bool = False) -> tuple[str, tuple[str, ...]]:
    """How `--speculative-axis` is measured (docs/autotune.md#stage-2-the-knobs): `(grid mode, extra modes)`.

    The grid runs `off` when the axis lists it (else its one mode: `prompt-lookup` alone turns speculation on in
    every cell), and each other listed mode is ONE more trial of the grid's best cell, not another grid axis.
    With `--hostfile` (`distributed`) it is `("off", ())`: serve turns speculation off across machines.
    """
    if distributed or not speculative_axis or "off" in speculative_axis:
        grid_mode = "off"
    else:
        grid_mode = speculative_axis[0]
    if distributed:
        return grid_mode, ()
    return grid_mode, tuple(mode for mode in speculative_axis if mode != grid_mode)


@dataclass
class Stage2Result:
    """The best feasible cell (None if none), every cell trial, and whether the budget cut it short."""

    best: Trial | None
    trials: list[Trial]
    partial: bool = False


def stage2(
    model: str,
    cells: Sequence[Knobs],
    evaluate: Evaluate,
    record: Record,
    epsilon: float,
    objective: str = "throughput",
    speculative_modes: Sequence[str] = (),
) -> Stage2Result:
    """Evaluate every cell in order and keep the best feasible one by the objective's rule
    (`keep_best_rule`: `is_new_best` for throughput); then, for each of `speculative_modes`
    (`speculative_plan`'s extra modes), one more trial: the best cell with that speculative mode, kept only
    when it beats the best by the same rule (within ε it must win the tie like any other cell).

    The returned trials are recorded with kept = 0; the caller marks the winner (exactly one row).
    BudgetExhausted is absorbed: the result is the best so far with `partial = True`. Interrupted and
    other TrialAborted propagate after the trial in flight is recorded.
    """
    better = keep_best_rule(objective)
    best: Trial | None = None
    trials: list[Trial] = []

    def measure(knobs: Knobs) -> Trial | None:
        """One recorded Stage 2 trial, or None when the budget ran out during it (recorded too)."""
        try:
            trial = evaluate(model, knobs, 2)
        except BudgetExhausted as exc:
            exc.trial = record(replace(exc.trial, fits=False, kept=False))
            trials.append(exc.trial)
            return None
        except TrialAborted as exc:
            exc.trial = record(replace(exc.trial, fits=False, kept=False))
            raise
        trial = record(replace(trial, kept=False))
        trials.append(trial)
        return trial

    for knobs in cells:
        trial = measure(knobs)
        if trial is None:
            return Stage2Result(best, trials, partial=True)
        if trial.fits and better(trial, best, epsilon):
            best = trial
    for mode in speculative_modes:
        if best is None:  # no feasible cell: nothing to speed up
            break
        trial = measure(replace(best.knobs, speculative=mode))
        if trial is None:
            return Stage2Result(best, trials, partial=True)
        if trial.fits and better(trial, best, epsilon):
            best = trial
    return Stage2Result(best, trials)


def infeasible_smallest_first(items: Sequence[Infeasible]) -> list[Infeasible]:
    """Order infeasible candidates smallest first, then larger by size (docs/autotune.md#stage-1-the-biggest-model).

    Size is the weight bytes when known, else the parameter count in the name (`…-7B-…`); a candidate of
    unknown size sorts after the known ones, later input ranks (the operator's smaller ones) first.
    """

    def key(item: Infeasible) -> tuple[int, float, int]:
        size = item.weights_bytes if item.weights_bytes is not None else nominal_size_bytes(item.model)
        if size is None:
            return (1, 0.0, -item.rank)
        return (0, float(size), -item.rank)

    return sorted(items, key=key)


def nominal_size_bytes(model: str) -> float | None:
    """Approximate 4-bit weight bytes from a parameter count in the id (`32B` → 32e9 × 0.5625), else None."""
    import re

    match = re.search(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z0-9])", model.split("/")[-1])
    if not match:
        return None
    return float(match.group(1)) * 1e9 * 0.5625
