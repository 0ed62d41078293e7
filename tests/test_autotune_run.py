"""A whole autotune run with a fake evaluator: every exit_reason, the DB rows, the report, --apply
(docs/autotune.md#apply, #database, #ending-a-run)."""

from __future__ import annotations

import io
import json
import sqlite3
from dataclasses import replace

import pytest
import yaml
from typer.testing import CliRunner

from macprovider.autotune.preflight import parse_inputs
from macprovider.autotune.report import verify_recipe_hash
from macprovider.autotune.runner import Deps, run
from macprovider.autotune.search import BudgetExhausted, Knobs, Trial
from macprovider.cli import app
from macprovider.core.hardware import MachineFacts

MACHINE = MachineFacts(24, "Test Chip", "Linux test")


class FakeConflicts:
    def __init__(self, any_=False):
        self.any = any_
        self.drained = self.restored = False

    def refusal(self):
        return "autotune: provider conflict: foreground-PID-42; rerun with --drain to stop it first."

    def drain(self, grace):
        self.drained = True

    def restore(self):
        self.restored = True


def feasible(tps=10.0, ttft=100.0):
    return Trial(0, "", 0, Knobs(None, 1, 1), 64, fits=True, throughput_tps=tps, ttft_p95_ms=ttft, replicates_n=1)


def infeasible(notes="too slow", failure_class="infeasible"):
    return Trial(0, "", 0, Knobs(None, 1, 1), 64, fits=False, notes=notes, failure_class=failure_class)


class Script:
    """Evaluator answering from `by_model` in stage 1 and `by_knobs` (default feasible) in stage 2."""

    def __init__(self, by_model, by_knobs=None):
        self.by_model, self.by_knobs, self.calls = by_model, by_knobs or {}, []

    def __call__(self, model, knobs, stage):
        self.calls.append((model, knobs, stage))
        outcome = self.by_model[model] if stage == 1 else self.by_knobs.get(knobs, feasible())
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            outcome = outcome()
        return replace(outcome, model=model, knobs=knobs, stage=stage, target_context=100)


def go(tmp_path, evaluate, conflicts=None, **flags):
    raw = {
        "target_context": "100",
        "candidate_models": "org/big-7B,org/small-1B",
        "kv_bits_axis": "unset,8",
        "max_batch_axis": "1,2",
        "stage2_replicates": "1",
        "db_path": str(tmp_path / "t.sqlite"),
        "config": str(tmp_path / "config.yaml"),
        **flags,
    }
    inputs = parse_inputs(raw)
    out, err = io.StringIO(), io.StringIO()
    conflicts = conflicts or FakeConflicts()
    deps = Deps(
        machine=MACHINE,
        binary_version="0.1.0",
        detect_conflicts=lambda port, restart: conflicts,
        evaluate=evaluate,
        out=out,
        err=err,
    )
    outcome = run(inputs, deps)
    db = sqlite3.connect(tmp_path / "t.sqlite")
    db.row_factory = sqlite3.Row
    return outcome, out.getvalue(), err.getvalue(), db


def test_ok_run_records_every_trial_and_exactly_one_kept(tmp_path):
    script = Script(
        {"org/big-7B": infeasible("memory estimate 9 GiB"), "org/small-1B": feasible()},
        {Knobs(8, 2, 100): feasible(tps=20.0)},
    )
    outcome, out, err, db = go(tmp_path, script, json="1")
    assert (outcome.exit_code, outcome.exit_reason) == (0, "ok")
    rec = outcome.report["recommendation"]
    assert rec["model"] == "org/small-1B" and rec["knobs"] == {
        "kv_bits": 8,
        "max_concurrency_override": 2,
        "max_context_override": 100,
        "speculative": "off",  # the speculative trial of the best cell (10 tok/s) lost to it (20 tok/s)
    }
    assert outcome.report["infeasible"] == [{"model": "org/big-7B", "rank": 1, "reason": "memory estimate 9 GiB"}]
    assert outcome.report["alternates"] == []
    assert verify_recipe_hash(outcome.report)
    trials = db.execute(
        "SELECT stage, model, kv_bits, max_batch, speculative, kept FROM tune_trials ORDER BY id"
    ).fetchall()
    assert [tuple(t) for t in trials] == [
        (1, "org/big-7B", None, 1, "off", 0),
        (1, "org/small-1B", None, 1, "off", 0),
        (2, "org/small-1B", None, 1, "off", 0),
        (2, "org/small-1B", None, 2, "off", 0),
        (2, "org/small-1B", 8, 1, "off", 0),
        (2, "org/small-1B", 8, 2, "off", 1),
        (2, "org/small-1B", 8, 2, "prompt-lookup", 0),
    ]
    run_row = db.execute("SELECT * FROM tune_runs").fetchone()
    assert (
        run_row["exit_reason"] == "ok"
        and run_row["ended_at_utc"]
        and run_row["recipe_hash"] == outcome.report["recipe_hash"]
    )
    assert json.loads(run_row["recommendation_json"]) == outcome.report
    assert "RECOMMENDATION" in out and out.rstrip().endswith("}")
    assert json.loads(out[out.index("{") :]) == outcome.report


def test_alternates_are_the_entries_after_the_chosen_one(tmp_path):
    script = Script({"org/big-7B": feasible(), "org/small-1B": feasible()})
    outcome, out, _, _ = go(tmp_path, script)
    assert outcome.report["alternates"] == ["org/small-1B"]
    assert [c[0] for c in script.calls if c[2] == 1] == ["org/big-7B"]
    assert "  - org/small-1B\n" in out


def test_all_infeasible_exits_1_listing_smallest_first(tmp_path):
    script = Script({"org/big-7B": infeasible("a"), "org/small-1B": infeasible("b")})
    outcome, out, err, db = go(tmp_path, script)
    assert (outcome.exit_code, outcome.exit_reason) == (1, "no_feasible")
    assert out.index("rank 2 org/small-1B: b") < out.index("rank 1 org/big-7B: a")
    assert "target context 100" in err and "--target-context" in err
    assert db.execute("SELECT exit_reason FROM tune_runs").fetchone()[0] == "no_feasible"


def test_no_feasible_stage2_cell(tmp_path):
    cells_bad = {Knobs(kv, b, 100): infeasible() for kv in (None, 8) for b in (1, 2)}
    outcome, *_, db = go(tmp_path, Script({"org/big-7B": feasible(), "org/small-1B": feasible()}, cells_bad))
    assert outcome.exit_reason == "no_feasible" and outcome.report["recommendation"] is None
    assert db.execute("SELECT COUNT(*) FROM tune_trials WHERE kept = 1").fetchone()[0] == 0


def test_integrity_failure_aborts_after_recording(tmp_path):
    script = Script(
        {"org/big-7B": infeasible("pre-warm integrity failure: x", "integrity"), "org/small-1B": feasible()}
    )
    outcome, _, err, db = go(tmp_path, script)
    assert (outcome.exit_code, outcome.exit_reason) == (1, "pre_warm_integrity_failure")
    assert [c[0] for c in script.calls] == ["org/big-7B"]
    assert db.execute("SELECT notes FROM tune_trials").fetchall()[0][0] == "pre-warm integrity failure: x"


def test_budget_in_stage1_and_in_stage2(tmp_path):
    budget = BudgetExhausted(infeasible("budget exhausted"))
    outcome, *_ = go(tmp_path, Script({"org/big-7B": budget, "org/small-1B": feasible()}))
    assert (outcome.exit_code, outcome.exit_reason) == (1, "budget_exhausted_no_model_selected")

    script = Script({"org/big-7B": feasible()}, {Knobs(None, 2, 100): BudgetExhausted(infeasible("budget"))})
    outcome, out, _, db = go(tmp_path, script)
    assert (outcome.exit_code, outcome.exit_reason) == (1, "budget_exhausted_with_partial_recommendation")
    assert (
        outcome.report["partial"] is True and outcome.report["recommendation"]["knobs"]["max_concurrency_override"] == 1
    )
    assert "partial:" in out


def test_interrupt_records_the_trial_in_flight_and_exits_130(tmp_path):
    conflicts = FakeConflicts(any_=True)
    script = Script({"org/big-7B": KeyboardInterrupt(), "org/small-1B": feasible()})
    outcome, _, _, db = go(tmp_path, script, conflicts=conflicts, drain=True)
    assert (outcome.exit_code, outcome.exit_reason) == (130, "interrupted")
    assert [tuple(r) for r in db.execute("SELECT stage, model, fits, notes FROM tune_trials")] == [
        (1, "org/big-7B", 0, "interrupted")
    ]
    assert db.execute("SELECT exit_reason FROM tune_runs").fetchone()[0] == "interrupted"
    assert conflicts.drained and conflicts.restored  # restore runs however the run ends


def test_conflict_without_drain_refuses_and_probes_nothing(tmp_path):
    script = Script({"org/big-7B": feasible()})
    outcome, _, err, _ = go(tmp_path, script, conflicts=FakeConflicts(any_=True))
    assert (outcome.exit_code, outcome.exit_reason) == (1, "provider_conflict")
    assert "autotune: provider conflict: foreground-PID-42; rerun with --drain to stop it first." in err
    assert script.calls == []


def test_unexpected_error_is_internal_error_without_traceback(tmp_path):
    outcome, _, err, db = go(tmp_path, Script({"org/big-7B": RuntimeError("kaboom")}))
    assert (outcome.exit_code, outcome.exit_reason) == (1, "internal_error")
    assert "kaboom" in err and "Traceback" not in err
    assert db.execute("SELECT exit_reason FROM tune_runs").fetchone()[0] == "internal_error"


def test_apply_writes_the_recommendation_and_prints_the_summary(tmp_path):
    (tmp_path / "config.yaml").write_text("# mine\nport: 9000\nkv_bits: 4\n")
    outcome, out, _, db = go(tmp_path, Script({"org/big-7B": feasible()}), apply=True)
    assert outcome.exit_code == 0 and outcome.report["applied"] is True
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "port": 9000,
        "model": "org/big-7B",
        "max_context_override": 100,
        "max_concurrency_override": 1,
    }
    assert (tmp_path / "config.yaml").read_text().startswith("# mine\nport: 9000\n")
    assert (
        "applied: model=org/big-7B kv_bits=unset max_concurrency_override=1 max_context_override=100 (backup at" in out
    )
    assert "launchctl kickstart" in out
    assert db.execute("SELECT applied FROM tune_runs").fetchone()[0] == 1


def test_retention_runs_at_start(tmp_path):
    for _ in range(3):
        go(tmp_path, Script({"org/big-7B": feasible()}), retain_runs="2")
    db = sqlite3.connect(tmp_path / "t.sqlite")
    assert db.execute("SELECT COUNT(*) FROM tune_runs").fetchone()[0] == 2


def test_unreadable_database_is_config_error(tmp_path):
    (tmp_path / "t.sqlite").write_bytes(b"garbage" * 500)
    inputs = parse_inputs({"candidate_models": "org/a", "db_path": str(tmp_path / "t.sqlite")})
    err = io.StringIO()
    outcome = run(inputs, Deps(machine=MACHINE, evaluate=Script({}), out=io.StringIO(), err=err))
    assert (outcome.exit_code, outcome.exit_reason) == (2, "config_error")
    assert "t.sqlite" in err.getvalue()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--kv-bits-axis", "unset,7"], "--kv-bits-axis cell '7'"),
        (["--speculative-axis", "off,eagle"], "--speculative-axis cell 'eagle': must be off or prompt-lookup"),
        (["--speculative-axis", "off,OFF"], "--speculative-axis cell 'OFF': listed twice"),
        (["--speculative-axis", ""], "--speculative-axis"),
        (["--max-batch-axis", "1,0"], "--max-batch-axis cell '0'"),
        (["--max-batch-axis", "1,x"], "--max-batch-axis cell 'x'"),
        (["--candidate-models", "org/a,,org/b"], "--candidate-models"),
        (["--candidate-models", "org/a,bad id"], "--candidate-models cell 'bad id'"),
        (["--target-context", "0"], "--target-context '0'"),
        (["--max-context-axis", "4000,1000"], "--max-context-axis cell '1000'"),
        (["--max-context-axis", "3000,3000"], "listed twice"),
        (["--stage2-replicates", "0"], "--stage2-replicates"),
        (["--gate-ttft-ms", "0"], "--gate-ttft-ms"),
        (["--tps-tie-epsilon", "-0.1"], "--tps-tie-epsilon"),
        (["--max-duration", "0"], "--max-duration"),
        (["--drain-grace", "-1"], "--drain-grace"),
        (["--port", "70000"], "--port"),
        (["--retain-runs", "0"], "--retain-runs"),
        (["--max-model-size", "3B", "--min-model-size", "8B"], "--min-model-size"),
        (["--max-model-size", "0.5B"], "removes every curated candidate"),
        (["--max-model-size", "huge"], "--max-model-size 'huge'"),
        (["--memory-budget-gb", "-2"], "--memory-budget-gb"),
        (["--restart-foreground"], "--restart-foreground"),
        (["--objective", "fastest"], "--objective 'fastest': must be throughput, latency or balanced"),
        (["--workload", "recorded"], "--workload 'recorded': no request shapes recorded yet"),
        (["--workload", "/nonexistent/shapes.jsonl"], "--workload '/nonexistent/shapes.jsonl'"),
    ],
)
def test_bad_flags_exit_2_before_touching_the_database(tmp_path, args, needle):
    db = tmp_path / "never.sqlite"
    result = CliRunner().invoke(app, ["autotune", "--db-path", str(db), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "config_error" in result.output
    assert not db.exists()


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    db = tmp_path / "never.sqlite"
    result = CliRunner().invoke(
        app,
        [
            "autotune",
            "--dry-run",
            "--db-path",
            str(db),
            "--max-model-size",
            "8B",
            "--min-model-size",
            "3B",
            "--max-context-axis",
            "8000,4000",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "1. mlx-community/Qwen2.5-Coder-7B-Instruct-4bit\n    2. mlx-community/Llama-3.2-3B-Instruct-4bit\n"
        in result.output
    )
    assert "1B" not in result.output.split("stage 2")[0].split("candidates")[1]
    assert "max_context: 4000,8000" in result.output and "cells:       12" in result.output
    assert "speculative: off in every cell, then prompt-lookup on the best cell (1 more trial)" in result.output
    assert not db.exists()
    only_off = CliRunner().invoke(app, ["autotune", "--dry-run", "--speculative-axis", "off"])
    assert only_off.exit_code == 0 and "speculative: off in every cell\n" in only_off.output


def test_size_filters_are_ignored_with_a_warning_when_candidates_are_given(tmp_path):
    result = CliRunner().invoke(app, ["autotune", "--dry-run", "--candidate-models", "org/a", "--max-model-size", "8B"])
    assert result.exit_code == 0 and "ignored" in result.output and "1. org/a" in result.output


def test_a_bad_workload_file_names_its_line(tmp_path):
    shapes = tmp_path / "shapes.jsonl"
    shapes.write_text('{"prompt_tokens": 10}\n{"prompt_tokens": -1}\n')
    result = CliRunner().invoke(app, ["autotune", "--db-path", str(tmp_path / "n.sqlite"), "--workload", str(shapes)])
    assert result.exit_code == 2 and "line 2: prompt_tokens must be an integer >= 1" in result.output
    assert not (tmp_path / "n.sqlite").exists()


def test_objective_and_recorded_workload_reach_the_run_row_the_report_and_the_plan(tmp_path):
    from macprovider.core.config import Paths
    from macprovider.core.request_shapes import RequestShape, shapes_jsonl

    record = Paths.from_env().workload_file
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(shapes_jsonl([RequestShape(120, 80, 16, 2), RequestShape(40, 0, None, 1)]))
    plan = CliRunner().invoke(app, ["autotune", "--dry-run", "--objective", "latency", "--workload", "recorded"])
    assert "objective:          latency" in plan.output
    assert f"workload:           recorded (2 shapes from {record})" in plan.output
    slow_batch = {
        Knobs(None, 2, 100): feasible(tps=10.35, ttft=200.0),
        Knobs(8, 2, 100): feasible(tps=10.4, ttft=210.0),
    }
    outcome, out, _, db = go(
        tmp_path, Script({"org/big-7B": feasible()}, slow_batch), objective="latency", workload="recorded", json=True
    )
    assert outcome.exit_reason == "ok"
    report = outcome.report
    assert report["inputs"]["objective"] == "latency"
    workload = report["inputs"]["workload"]
    assert (workload["kind"], workload["shapes"], workload["max_concurrency"]) == ("recorded", 2, 2)
    assert workload["cached_fraction"] == round(80 / 160, 4) and workload["digest"].startswith("sha256:")
    assert report["recommendation"]["knobs"]["max_concurrency_override"] == 1  # throughput would take batch 2
    assert report["recommendation"]["why"].startswith("objective latency: kv_bits=unset max_batch=1")
    assert verify_recipe_hash(report)
    run_row = db.execute("SELECT objective, workload FROM tune_runs").fetchone()
    assert run_row["objective"] == "latency" and json.loads(run_row["workload"])["kind"] == "recorded"
    assert "why:               objective latency" in out
    default, *_ = go(tmp_path / "d", Script({"org/big-7B": feasible()}, slow_batch))
    assert default.report["recommendation"]["knobs"]["max_concurrency_override"] == 2
    assert default.report["inputs"]["objective"] == "throughput"
    assert default.report["inputs"]["workload"] == {"kind": "synthetic"}


# ---------------------------------------------------------------------------------------------- speculative
FASTER_WITH_SPECULATION = {
    Knobs(8, 2, 100): feasible(tps=20.0),  # the grid's best
    Knobs(8, 2, 100, speculative="prompt-lookup"): feasible(tps=26.0, ttft=90.0),
}


def test_speculation_that_pays_is_kept_recorded_reported_and_applied(tmp_path):
    (tmp_path / "config.yaml").write_text("# mine\nport: 9000\n")
    script = Script({"org/big-7B": feasible()}, FASTER_WITH_SPECULATION)
    outcome, out, err, db = go(tmp_path, script, apply=True, verbose=True)
    assert (outcome.exit_code, outcome.exit_reason) == (0, "ok")
    stage2_calls = [knobs for _, knobs, stage in script.calls if stage == 2]
    assert stage2_calls[:-1] == [Knobs(kv, b, 100) for kv in (None, 8) for b in (1, 2)]  # the grid, off
    assert stage2_calls[-1] == Knobs(8, 2, 100, speculative="prompt-lookup")  # then its best, with speculation
    rec = outcome.report["recommendation"]
    assert rec["knobs"]["speculative"] == "prompt-lookup" and rec["tps_median"] == 26.0
    assert rec["serve_command"].endswith("--kv-bits 8 --max-batch 2 --max-context 100 --speculative prompt-lookup")
    assert rec["why"].startswith(
        "objective throughput: kv_bits=8 max_batch=2 max_context=100 speculative=prompt-lookup gave 26.0 tok/s"
    )
    assert "next best kv_bits=8 max_batch=2 max_context=100 gave 20.0 tok/s" in rec["why"]
    assert [t["knobs"]["speculative"] for t in outcome.report["trials"]][-2:] == ["off", "prompt-lookup"]
    assert verify_recipe_hash(outcome.report)
    kept = db.execute("SELECT kv_bits, max_batch, speculative FROM tune_trials WHERE kept = 1").fetchall()
    assert [tuple(k) for k in kept] == [(8, 2, "prompt-lookup")]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "port": 9000,
        "model": "org/big-7B",
        "kv_bits": 8,
        "max_context_override": 100,
        "max_concurrency_override": 2,
        "speculative": "prompt-lookup",
    }
    assert (
        "applied: model=org/big-7B kv_bits=8 max_concurrency_override=2 max_context_override=100 speculative=prompt-lookup (backup at"
        in out
    )
    assert "  speculative:                prompt-lookup\n" in out
    assert "[stage 2] org/big-7B kv_bits=8 max_batch=2 max_context=100 speculative=prompt-lookup: 26.0 tok/s" in err


def test_speculation_that_does_not_pay_is_not_kept_and_the_recipe_hashes_as_without_the_axis(tmp_path):
    slower = {**FASTER_WITH_SPECULATION, Knobs(8, 2, 100, speculative="prompt-lookup"): feasible(tps=19.0)}
    (tmp_path / "config.yaml").write_text("speculative: prompt-lookup\n")  # a stale setting --apply removes
    outcome, out, _, db = go(tmp_path, Script({"org/big-7B": feasible()}, slower), apply=True)
    assert outcome.exit_reason == "ok" and outcome.report["recommendation"]["knobs"]["speculative"] == "off"
    assert db.execute("SELECT speculative FROM tune_trials WHERE kept = 1").fetchone()[0] == "off"
    assert "speculative" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "--speculative" not in outcome.report["recommendation"]["serve_command"]
    without_axis, *_ = go(tmp_path / "off", Script({"org/big-7B": feasible()}, slower), speculative_axis="off")
    assert without_axis.report["recipe_hash"] == outcome.report["recipe_hash"]  # an off recipe hashes as before


def test_speculative_axis_off_runs_no_extra_trial(tmp_path):
    script = Script({"org/big-7B": feasible()}, FASTER_WITH_SPECULATION)
    outcome, *_, db = go(tmp_path, script, speculative_axis="off")
    assert [knobs for _, knobs, stage in script.calls if stage == 2] == [
        Knobs(kv, b, 100) for kv in (None, 8) for b in (1, 2)
    ]
    assert db.execute("SELECT COUNT(*) FROM tune_trials WHERE speculative != 'off'").fetchone()[0] == 0
    assert outcome.report["recommendation"]["knobs"]["speculative"] == "off"


def test_speculative_axis_prompt_lookup_alone_runs_the_grid_with_it(tmp_path):
    script = Script({"org/big-7B": feasible()})
    outcome, *_ = go(tmp_path, script, speculative_axis="prompt-lookup")
    stage2_calls = [knobs for _, knobs, stage in script.calls if stage == 2]
    assert stage2_calls == [Knobs(kv, b, 100, speculative="prompt-lookup") for kv in (None, 8) for b in (1, 2)]
    assert script.calls[0][1].speculative == "off"  # Stage 1 always serves with the defaults
    assert outcome.report["recommendation"]["knobs"]["speculative"] == "prompt-lookup"


def test_budget_running_out_in_the_speculative_trial_is_a_partial_recommendation(tmp_path):
    speculative = Knobs(8, 2, 100, speculative="prompt-lookup")
    budget = {**FASTER_WITH_SPECULATION, speculative: BudgetExhausted(replace(infeasible("budget"), knobs=speculative))}
    outcome, out, _, db = go(tmp_path, Script({"org/big-7B": feasible()}, budget), apply=True)
    assert (outcome.exit_code, outcome.exit_reason) == (1, "budget_exhausted_with_partial_recommendation")
    assert outcome.report["partial"] is True and outcome.report["applied"] is False
    rec = outcome.report["recommendation"]
    assert (rec["knobs"]["kv_bits"], rec["knobs"]["speculative"], rec["tps_median"]) == (8, "off", 20.0)
    assert tuple(db.execute("SELECT speculative, notes FROM tune_trials ORDER BY id DESC").fetchone()) == (
        "prompt-lookup",
        "budget",
    )
    assert "partial:" in out
