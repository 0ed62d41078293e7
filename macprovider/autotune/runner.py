"""One autotune run end to end: store, conflict/drain, Stage 1, Stage 2, report, apply, restore (docs/autotune.md).

`run(inputs, deps)` returns a `RunOutcome` (exit code, exit_reason, JSON report). The real trial
evaluator lives here: pre-warm → memory pre-check → candidate provider child → probe → Trial. Every
ending (docs/autotune.md#ending-a-run) goes through the same `finally`: the trial in flight is recorded (by the search
stage), any drained provider is restored (after `--apply`), the run row gets its exit_reason, and the
report is printed. SIGINT and SIGTERM raise KeyboardInterrupt directly, so both end as `interrupted` (130).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from macprovider.autotune import memory
from macprovider.autotune.preflight import AutotuneInputs
from macprovider.autotune.probe import MAX_TOKENS
from macprovider.autotune.provider import Deadline
from macprovider.autotune.replay import workload_summary
from macprovider.autotune.report import SPEC_VERSION, Recommendation, build_report, render_terminal
from macprovider.autotune.search import (
    BudgetExhausted,
    IntegrityAbort,
    Interrupted,
    Knobs,
    Trial,
    explain_choice,
    infeasible_smallest_first,
    stage1,
    stage2,
    stage2_cells,
)
from macprovider.autotune.trial import Progress, RealEvaluator
from macprovider.core.cluster.parallel import PARALLEL_MODES, split_problem
from macprovider.core.errors import ApplyError, ProviderConflict, StoreError

EXIT_CODES = {
    "ok": 0,
    "interrupted": 130,
    "no_feasible": 1,
    "budget_exhausted_no_model_selected": 1,
    "budget_exhausted_with_partial_recommendation": 1,
    "pre_warm_integrity_failure": 1,
    "provider_conflict": 1,
    "config_error": 2,
    "internal_error": 1,
}


def utc_now() -> str:
    """ISO-8601 UTC with a `Z` suffix, millisecond precision."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Deps:
    """What a run talks to; tests replace pieces. `evaluate` replaces the real trial evaluator."""

    machine: Any = None
    binary_version: str | None = None
    detect_conflicts: Callable[[int, bool], Any] | None = None
    budget_bytes: Callable[[], int] = memory.default_budget_bytes
    evaluate: Callable[[str, Knobs, int], Trial] | None = None
    parallel_modes: Callable[[str, int], Sequence[str]] | None = None  # default: possible_modes
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)


@dataclass
class RunOutcome:
    """The run's exit code, exit_reason and JSON report (None only when the store could not open)."""

    exit_code: int
    exit_reason: str
    report: dict[str, Any] | None


def _signal_to_interrupt(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt at once, wherever the main thread is. Installed for SIGINT
    too, so `asyncio.run` (the probe) keeps it instead of installing its own SIGINT handler, which only cancels
    the probe task and raises after the task unwinds. Under a CPU burner a SIGINT during a trial twice left
    the tuner running past 60 s (cause inside that path not isolated) while SIGTERM, raised directly, always
    ended it; both signals now take SIGTERM's path."""
    raise KeyboardInterrupt


@dataclass
class _RunState:
    """What a run accumulates on its way to the report; the helpers of `run` fill it in."""

    exit_reason: str = "internal_error"
    kept_row: int | None = None
    rec: Recommendation | None = None
    partial: bool = False
    applied: bool = False
    apply_failed: bool = False
    infeasible: list = field(default_factory=list)
    alternates: list[str] = field(default_factory=list)
    conflicts: Any = None
    messages: list[str] = field(default_factory=list)
    apply_lines: list[str] = field(default_factory=list)
    recorded: list[Trial] = field(default_factory=list)


def run(inputs: AutotuneInputs, deps: Deps | None = None) -> RunOutcome:
    """Run autotune (docs/autotune.md). Prints the terminal block (and JSON) on `deps.out`."""
    from macprovider import __version__
    from macprovider.autotune.store import Store
    from macprovider.core.hardware import MachineFacts

    deps = deps or Deps()
    err = deps.err
    for warning in inputs.warnings:
        print(warning, file=err)
    try:
        store = Store(inputs.db_path)
    except StoreError as exc:
        print(f"macprovider: {exc}", file=err)
        return RunOutcome(2, "config_error", None)

    machine = deps.machine or MachineFacts.detect()
    machine_obj: dict[str, Any] = {
        "ram_gb": int(machine.ram_gb),
        "chip": str(machine.chip),
        "os_version": str(machine.os_version),
        "binary_version": deps.binary_version or __version__,
    }
    inputs_obj = _inputs_obj(inputs)
    run_id = str(uuid.uuid4())
    started = utc_now()
    deadline = Deadline(inputs.max_duration_s)
    _insert_run_row(store, run_id, started, machine_obj, inputs, inputs_obj)
    store.retain(inputs.retain_runs)

    evaluate_inner = deps.evaluate or RealEvaluator(inputs, deadline, deps.budget_bytes)
    cluster = inputs.cluster
    grid_speculative, extra_speculative = inputs.speculative_trials
    cells = stage2_cells(
        inputs.kv_bits_axis,
        inputs.max_batch_axis,
        inputs.max_context_axis,
        PARALLEL_MODES if cluster is not None else (None,),
        grid_speculative,
    )
    progress = Progress(err, inputs.verbose, len(inputs.candidate_models) + len(cells) + len(extra_speculative))
    state = _RunState()

    def evaluate(model: str, knobs: Knobs, stage: int) -> Trial:
        progress.started(model, knobs, stage)
        try:
            return evaluate_inner(model, knobs, stage)
        except KeyboardInterrupt:
            trial = Trial(stage, model, inputs.target_context, knobs, MAX_TOKENS, fits=False, notes="interrupted")
            raise Interrupted(trial) from None

    def record(trial: Trial) -> Trial:
        row_id = store.insert_trial(run_id, utc_now(), trial)
        trial = replace(trial, row_id=row_id)
        state.recorded.append(trial)
        progress.ended(trial)
        return trial

    old_handlers = _install_signal_handlers()
    try:
        _search_to_an_ending(inputs, deps, state, store, run_id, cells, evaluate, record, progress, old_handlers)
        _maybe_apply(inputs, state, machine_obj, inputs_obj)
    finally:
        if state.conflicts is not None:
            try:
                state.conflicts.restore()
            except Exception as exc:  # noqa: BLE001 - never lose the run record over a restore failure
                state.messages.append(f"autotune: could not restore the drained provider: {exc}")
    return _finish(inputs, deps, state, store, run_id, started, machine_obj, inputs_obj)


def _inputs_obj(inputs: AutotuneInputs) -> dict[str, Any]:
    """The report's `inputs` object (hostfile and hosts only with --hostfile)."""
    inputs_obj: dict[str, Any] = {
        "target_context": inputs.target_context,
        "candidate_models": list(inputs.candidate_models),
        "stage1_replicates": inputs.stage1_replicates,
        "stage2_replicates": inputs.stage2_replicates,
        "gate_ttft_ms": int(inputs.gate_ttft_ms) if float(inputs.gate_ttft_ms).is_integer() else inputs.gate_ttft_ms,
        "tps_tie_epsilon": inputs.tps_tie_epsilon,
        "objective": inputs.objective,
        "workload": workload_summary(inputs.workload_kind, inputs.workload_source, inputs.workload_shapes),
    }
    if inputs.cluster is not None:  # only with --hostfile: a one-machine report keeps its keys
        inputs_obj["hostfile"] = inputs.cluster.hostfile
        inputs_obj["hosts"] = inputs.cluster.describe()
    return inputs_obj


def _insert_run_row(
    store: Any,
    run_id: str,
    started: str,
    machine_obj: dict[str, Any],
    inputs: AutotuneInputs,
    inputs_obj: dict[str, Any],
) -> None:
    """Insert the run's row (its exit_reason is written by `_finish`)."""
    store.insert_run(
        {
            "run_id": run_id,
            "started_at_utc": started,
            "spec_version": SPEC_VERSION,
            "binary_version": machine_obj["binary_version"],
            "machine_ram_gb": machine_obj["ram_gb"],
            "machine_chip": machine_obj["chip"],
            "machine_os_version": machine_obj["os_version"],
            "target_context": inputs.target_context,
            "candidate_models_json": json.dumps(list(inputs.candidate_models)),
            "stage1_replicates": inputs.stage1_replicates,
            "stage2_replicates": inputs.stage2_replicates,
            "gate_ttft_ms": int(round(inputs.gate_ttft_ms)),
            "tps_tie_epsilon": inputs.tps_tie_epsilon,
            "objective": inputs.objective,
            "workload": json.dumps(inputs_obj["workload"], sort_keys=True),
        }
    )


def _install_signal_handlers() -> dict[int, Any]:
    """Route SIGINT and SIGTERM to KeyboardInterrupt (main thread only); returns the handlers to put back."""
    if not _in_main_thread():
        return {}
    return {
        sig: signal.signal(sig, _signal_to_interrupt)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) != signal.SIG_IGN
    }  # an ignored signal stays ignored (nohup, `&`)


def _search_to_an_ending(
    inputs: AutotuneInputs,
    deps: Deps,
    state: _RunState,
    store: Any,
    run_id: str,
    cells: list,
    evaluate: Callable[[str, Knobs, int], Trial],
    record: Callable[[Trial], Trial],
    progress: Progress,
    old_handlers: dict[int, Any],
) -> None:
    """Run `_search` under the progress display and turn each of its endings into the state's exit_reason and
    message; the signal handlers are put back whatever happens."""
    try:
        with progress:
            _search(inputs, deps, state, store, run_id, cells, evaluate, record)
    except ProviderConflict as exc:
        state.exit_reason = "provider_conflict"
        if str(exc) not in state.messages:
            state.messages.append(str(exc))
    except IntegrityAbort as exc:
        state.exit_reason = "pre_warm_integrity_failure"
        state.messages.append(f"autotune: {exc.trial.model}: {exc}; run `macprovider models pull` again to repair it")
    except BudgetExhausted:
        state.exit_reason = "budget_exhausted_no_model_selected"
        state.messages.append("autotune: --max-duration ran out before a model was selected")
    except (Interrupted, KeyboardInterrupt):
        state.exit_reason = "interrupted"
        state.messages.append("autotune: interrupted")
    except Exception as exc:  # noqa: BLE001 - the run row keeps internal_error; no traceback for users
        state.exit_reason = "internal_error"
        state.messages.append(f"autotune: internal error: {exc.__class__.__name__}: {exc}")
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _search(
    inputs: AutotuneInputs,
    deps: Deps,
    state: _RunState,
    store: Any,
    run_id: str,
    cells: list,
    evaluate: Callable[[str, Knobs, int], Trial],
    record: Callable[[Trial], Trial],
) -> None:
    """Conflict check (and drain), Stage 1, Stage 2: sets the state's exit_reason and recommendation.
    Raises the search's own endings (ProviderConflict, IntegrityAbort, BudgetExhausted, Interrupted)."""
    from macprovider.autotune import conflict as conflict_mod

    cluster = inputs.cluster
    stage1_parallel = "pipeline" if cluster is not None else None  # the split sized by the hosts' budgets
    detect = deps.detect_conflicts or (lambda port, restart: conflict_mod.detect(port, restart_foreground=restart))
    found = detect(inputs.port, inputs.restart_foreground)
    if found.any and not inputs.drain:
        state.messages.append(found.refusal())
        raise ProviderConflict(found.refusal())
    if found.any:
        state.conflicts = found
        state.conflicts.drain(inputs.drain_grace_s)
    s1 = stage1(inputs.candidate_models, inputs.target_context, evaluate, record, stage1_parallel)
    state.infeasible = infeasible_smallest_first(s1.infeasible)
    if s1.chosen is None:
        state.exit_reason = "no_feasible"
        state.messages.append(
            f"autotune: no candidate is feasible at target context {inputs.target_context}; "
            "try a smaller --target-context or other --candidate-models"
        )
        return
    state.alternates = list(inputs.candidate_models[s1.rank :])
    if cluster is not None:  # Stage 2's parallel axis: the modes that can split the chosen model
        modes = (deps.parallel_modes or possible_modes)(s1.chosen, len(cluster.hosts))
        cells = [cell for cell in cells if cell.parallel in modes]
    _, extra_speculative = inputs.speculative_trials  # one more trial of the best cell for each
    s2 = stage2(s1.chosen, cells, evaluate, record, inputs.tps_tie_epsilon, inputs.objective, extra_speculative)
    state.partial = s2.partial
    if s2.best is not None:
        assert s2.best.row_id is not None  # every evaluated trial went through record()
        store.mark_kept(run_id, s2.best.row_id)
        state.kept_row = s2.best.row_id
        state.rec = replace(
            Recommendation.from_trial(s2.best, inputs.target_context, cluster),
            why=explain(s2.best, s2.trials, inputs),
        )
    elif state.partial and s1.trial is not None:
        state.rec = Recommendation.from_trial(s1.trial, inputs.target_context, cluster)  # Stage 1 knobs
    if state.partial:
        state.exit_reason = "budget_exhausted_with_partial_recommendation"
    elif state.rec is None:
        state.exit_reason = "no_feasible"
        state.messages.append(f"autotune: no Stage 2 cell of {s1.chosen} is feasible")
    else:
        state.exit_reason = "ok"


def _maybe_apply(
    inputs: AutotuneInputs, state: _RunState, machine_obj: dict[str, Any], inputs_obj: dict[str, Any]
) -> None:
    """With --apply and an `ok` recommendation, write it to the config (and say how to make it live)."""
    rec = state.rec
    if inputs.apply and state.exit_reason == "ok" and rec is not None:
        from macprovider.autotune import conflict as conflict_mod
        from macprovider.autotune.apply import apply_recommendation, owned_values, summary_line
        from macprovider.autotune.report import recipe_domain, recipe_hash

        values = owned_values(
            rec.model, rec.kv_bits, rec.max_batch, rec.max_context, rec.parallel, rec.hostfile, rec.speculative
        )
        try:
            hash_value = recipe_hash(
                recipe_domain(
                    binary_version=machine_obj["binary_version"],
                    candidate_models=inputs_obj["candidate_models"],
                    chip=machine_obj["chip"],
                    ram_gb=machine_obj["ram_gb"],
                    rec=rec,
                    objective=inputs_obj.get("objective", "throughput"),
                    workload=inputs_obj.get("workload"),
                )
            )
            result = apply_recommendation(inputs.config_path, values, recipe_hash=hash_value)
            state.applied = True
            state.apply_lines.append(summary_line(values, result))
            if rec.parallel:
                state.apply_lines.append(
                    f"start it on every host (hostfile, model, parallel and knobs come from {inputs.config_path}): "
                    f"macprovider cluster serve --config {inputs.config_path}"
                )
            elif not inputs.drain:
                state.apply_lines.append(
                    f"restart the provider so the new recipe goes live: launchctl kickstart -k "
                    f"gui/{os.getuid()}/{conflict_mod.LAUNCHD_LABEL}   (or: macprovider service restart)"
                )
        except ApplyError as exc:
            state.apply_failed = True
            state.messages.append(f"autotune: --apply failed: {exc}")
    elif inputs.apply and rec is not None:
        state.messages.append(f"autotune: not applying a {state.exit_reason} recommendation")


def _finish(
    inputs: AutotuneInputs,
    deps: Deps,
    state: _RunState,
    store: Any,
    run_id: str,
    started: str,
    machine_obj: dict[str, Any],
    inputs_obj: dict[str, Any],
) -> RunOutcome:
    """Build the report, close the run row and the store, print messages and the report; the outcome."""
    rec = state.rec
    report = build_report(
        run_id=run_id,
        started_at=started,
        ended_at=utc_now(),
        machine=machine_obj,
        inputs=inputs_obj,
        recommendation=rec,
        infeasible=state.infeasible,
        alternates=state.alternates if rec is not None else [],
        db_path=str(inputs.db_path),
        exit_reason=state.exit_reason,
        partial=state.partial,
        applied=state.applied,
        trials=[replace(t, kept=t.row_id == state.kept_row) for t in state.recorded],
    )
    try:
        store.finish_run(
            run_id,
            ended_at_utc=report["ended_at"],
            exit_reason=state.exit_reason,
            report=report,
            recipe_hash=report["recipe_hash"],
            applied=state.applied,
        )
    finally:
        store.close()
    out = deps.out
    err = deps.err
    for line in state.messages:
        print(line, file=err)
    out.write(render_terminal(report))
    for line in state.apply_lines:
        print(line, file=out)
    if inputs.json:
        out.write(json.dumps(report, indent=2) + "\n")
    out.flush()
    code = EXIT_CODES[state.exit_reason]
    if state.apply_failed and code == 0:
        code = 1
    return RunOutcome(code, state.exit_reason, report)


def possible_modes(model: str, world_size: int) -> list[str]:
    """The parallel modes that can split `model` (its cached config.json) over `world_size` ranks
    (`macprovider.core.cluster.parallel.split_problem`); every mode when the config cannot be read (the trial says why)."""
    from macprovider.core.errors import MacproviderError
    from macprovider.models.ids import ensure_local, read_model_config

    try:
        config = read_model_config(ensure_local(model))
    except (MacproviderError, OSError, ValueError):
        return list(PARALLEL_MODES)
    return [mode for mode in PARALLEL_MODES if split_problem(config, world_size, mode) is None]


def explain(best: Trial, trials: list[Trial], inputs: AutotuneInputs) -> str:
    """Why the winner won (search.explain_choice), and for a replayed workload how much prefix it reused."""
    why = explain_choice(best, trials, inputs.objective)
    if inputs.workload_kind != "synthetic":
        why += (
            f"; on the {inputs.workload_kind} workload the winner reused {best.cached_prompt_tokens or 0} prompt"
            f" tokens from the prefix cache"
        )
    return why


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
