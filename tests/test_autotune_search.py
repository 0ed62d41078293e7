"""Stage 1 / Stage 2 search with a scripted fake probe
(docs/autotune.md#stage-1-the-biggest-model, #stage-2-the-knobs)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from macprovider.autotune.search import (
    BudgetExhausted,
    Infeasible,
    IntegrityAbort,
    Interrupted,
    Knobs,
    Trial,
    balanced_score,
    explain_choice,
    infeasible_smallest_first,
    is_new_best,
    keep_best_rule,
    median,
    p95,
    speculative_plan,
    stage1,
    stage2,
    stage2_cells,
)


def trial(model="m", tps=None, ttft=None, fits=True, stage=2, knobs=Knobs(None, 1, 100), **kw) -> Trial:  # noqa: B008 - Knobs is frozen
    return Trial(stage, model, 100, knobs, 64, fits=fits, throughput_tps=tps, ttft_p95_ms=ttft, **kw)


class FakeProbe:
    """Scripted evaluator: `script[model]` (stage 1) or `script[knobs]` (stage 2) → Trial or exception."""

    def __init__(self, script):
        self.script = script
        self.calls: list[tuple[str, Knobs, int]] = []

    def __call__(self, model, knobs, stage):
        self.calls.append((model, knobs, stage))
        outcome = self.script[model if stage == 1 else knobs]
        if isinstance(outcome, BaseException):
            raise outcome
        return replace(outcome, model=model, knobs=knobs, stage=stage)


class Recorder:
    def __init__(self):
        self.rows: list[Trial] = []

    def __call__(self, t: Trial) -> Trial:
        t = replace(t, row_id=len(self.rows) + 1)
        self.rows.append(t)
        return t


def test_keep_best_check_vector_of_the_spec():
    a = trial(tps=10.0, ttft=4000)
    assert is_new_best(trial(tps=10.05, ttft=3000), a, 0.02) is True
    assert is_new_best(trial(tps=10.05, ttft=4500), a, 0.02) is False


@pytest.mark.parametrize(
    "new, best, eps, expected",
    [
        (trial(tps=None), None, 0.02, False),  # no throughput: never best
        (trial(tps=1.0), None, 0.02, True),  # no incumbent
        (trial(tps=0.5), trial(tps=0.0), 0.02, True),  # incumbent <= 0: best iff new > 0
        (trial(tps=0.0), trial(tps=0.0), 0.02, False),
        (trial(tps=10.3, ttft=9999), trial(tps=10.0, ttft=1), 0.02, True),  # gain > eps wins despite ttft
        (trial(tps=9.7, ttft=1), trial(tps=10.0, ttft=9999), 0.02, False),  # loss > eps loses despite ttft
        (trial(tps=10.0, ttft=100), trial(tps=10.0, ttft=None), 0.02, True),  # measured ttft beats unmeasured
        (trial(tps=10.0, ttft=None), trial(tps=10.0, ttft=100), 0.02, False),
        (trial(tps=10.0, ttft=100), trial(tps=10.0, ttft=100), 0.02, False),  # exact tie: incumbent stays
        (trial(tps=10.1, ttft=50), trial(tps=10.0, ttft=100), 0.0, True),  # eps 0: any gain wins
    ],
)
def test_keep_best_rules(new, best, eps, expected):
    assert is_new_best(new, best, eps) is expected


def test_p95_is_nearest_rank_and_median_is_usual():
    assert p95([5.0]) == 5.0
    assert p95(list(map(float, range(1, 21)))) == 19.0  # ceil(0.95*20)-1 = 18 -> 19
    assert p95(list(map(float, range(1, 11)))) == 10.0  # ceil(9.5)-1 = 9 -> 10
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_stage1_keeps_operator_order_and_stops_at_first_feasible():
    probe = FakeProbe({"org/1B": trial(fits=True, tps=5), "org/32B": trial(fits=True, tps=1)})
    rec = Recorder()
    result = stage1(["org/1B", "org/32B"], 100, probe, rec)
    assert result.chosen == "org/1B" and result.rank == 1
    assert [c[0] for c in probe.calls] == ["org/1B"]  # the 32B is never probed
    assert probe.calls[0][1] == Knobs(None, 1, 100)
    assert [(r.stage, r.kept) for r in rec.rows] == [(1, False)]


def test_stage1_walks_past_infeasible_and_lists_them():
    probe = FakeProbe(
        {
            "org/big-32B": trial(fits=False, notes="memory estimate 20 GiB"),
            "org/mid-7B": trial(fits=False, notes="ttft"),
            "org/small-1B": trial(fits=True, tps=3),
        }
    )
    result = stage1(["org/big-32B", "org/mid-7B", "org/small-1B"], 100, probe, Recorder())
    assert result.chosen == "org/small-1B" and result.rank == 3
    assert [i.model for i in result.infeasible] == ["org/big-32B", "org/mid-7B"]


def test_all_infeasible_is_reported_smallest_first():
    probe = FakeProbe(
        {
            "org/a-32B": trial(fits=False, notes="x"),
            "org/b-1B": trial(fits=False, notes="y"),
            "org/c-7B": trial(fits=False, notes="z", weights_bytes=4_000_000_000),
        }
    )
    result = stage1(["org/a-32B", "org/b-1B", "org/c-7B"], 100, probe, Recorder())
    assert result.chosen is None
    ordered = infeasible_smallest_first(result.infeasible)
    assert [i.model for i in ordered] == ["org/b-1B", "org/c-7B", "org/a-32B"]
    unknown = infeasible_smallest_first([Infeasible("org/x", 1, "r"), Infeasible("org/y", 2, "r", 10)])
    assert [i.model for i in unknown] == ["org/y", "org/x"]


def test_integrity_failure_is_recorded_then_aborts():
    probe = FakeProbe({"org/a": trial(fits=False, notes="bad hash", failure_class="integrity"), "org/b": trial()})
    rec = Recorder()
    with pytest.raises(IntegrityAbort):
        stage1(["org/a", "org/b"], 100, probe, rec)
    assert [r.model for r in rec.rows] == ["org/a"]
    assert len(probe.calls) == 1


def test_interrupt_in_stage1_records_the_trial_in_flight():
    probe = FakeProbe({"org/a": Interrupted(trial(fits=False, notes="interrupted", stage=1))})
    rec = Recorder()
    with pytest.raises(Interrupted):
        stage1(["org/a"], 100, probe, rec)
    assert rec.rows[0].notes == "interrupted" and rec.rows[0].fits is False


def test_stage2_cells_nesting_order():
    cells = stage2_cells([None, 4], [1, 2], [100, 200])
    assert cells[:4] == [Knobs(None, 1, 100), Knobs(None, 1, 200), Knobs(None, 2, 100), Knobs(None, 2, 200)]
    assert cells[4] == Knobs(4, 1, 100) and len(cells) == 8


def test_stage2_keeps_best_feasible_cell_and_ignores_infeasible_fast_ones():
    cells = stage2_cells([None, 8], [1, 2], [100])
    probe = FakeProbe(
        {
            Knobs(None, 1, 100): trial(tps=10.0, ttft=400),
            Knobs(None, 2, 100): trial(tps=50.0, ttft=100, fits=False),  # fastest but infeasible
            Knobs(8, 1, 100): trial(tps=10.1, ttft=300),  # within eps, lower ttft -> best
            Knobs(8, 2, 100): trial(tps=10.15, ttft=500),  # within eps of 10.1, higher ttft -> stays
        }
    )
    rec = Recorder()
    result = stage2("m", cells, probe, rec, 0.02)
    assert [c[1] for c in probe.calls] == cells
    assert result.best.knobs == Knobs(8, 1, 100)
    assert not result.partial and len(rec.rows) == 4 and not any(r.kept for r in rec.rows)


def test_stage2_budget_exhausted_returns_best_so_far_as_partial():
    cells = stage2_cells([None, 4, 8], [1], [100])
    probe = FakeProbe(
        {
            Knobs(None, 1, 100): trial(tps=10.0, ttft=100),
            Knobs(4, 1, 100): BudgetExhausted(trial(fits=False, notes="budget")),
            Knobs(8, 1, 100): trial(tps=99.0, ttft=1),
        }
    )
    rec = Recorder()
    result = stage2("m", cells, probe, rec, 0.02)
    assert result.partial and result.best.knobs == Knobs(None, 1, 100)
    assert len(rec.rows) == 2 and rec.rows[1].notes == "budget"  # the trial in flight is recorded
    assert len(probe.calls) == 2


def test_stage2_no_feasible_cell():
    cells = stage2_cells([None], [1, 2], [100])
    probe = FakeProbe({c: trial(fits=False, tps=None) for c in cells})
    assert stage2("m", cells, probe, Recorder(), 0.02).best is None


# A measured run: max-batch 2 kept for +3.5 % tokens/s while TTFT p95 doubled (10.3 s -> 20.7 s).
BATCH1 = trial(tps=10.0, ttft=10300.0, knobs=Knobs(None, 1, 160), row_id=1)
BATCH2 = trial(tps=10.35, ttft=20700.0, knobs=Knobs(None, 2, 160), row_id=2)


@pytest.mark.parametrize("objective, winner", [("throughput", BATCH2), ("latency", BATCH1), ("balanced", BATCH1)])
def test_objectives_on_the_issue_15_run(objective, winner):
    probe = FakeProbe({BATCH1.knobs: BATCH1, BATCH2.knobs: BATCH2})
    result = stage2("m", [BATCH1.knobs, BATCH2.knobs], probe, lambda t: t, 0.02, objective)
    assert result.best == winner
    why = explain_choice(result.best, result.trials, objective)
    assert why.startswith(f"objective {objective}: kv_bits=unset max_batch={winner.knobs.max_batch}")
    assert "next best" in why


@pytest.mark.parametrize(
    "new, best, expected",
    [
        (trial(tps=5, ttft=900), trial(tps=9, ttft=1000), True),  # 10 % lower TTFT beats more tokens/s
        (trial(tps=9, ttft=1010), trial(tps=5, ttft=1000), True),  # within ε: higher throughput breaks the tie
        (trial(tps=4, ttft=1010), trial(tps=5, ttft=1000), False),
        (trial(tps=9, ttft=1100), trial(tps=5, ttft=1000), False),
        (trial(tps=9, ttft=None), None, False),  # no TTFT: never best
        (trial(tps=1, ttft=5), None, True),
    ],
)
def test_latency_keep_best_rule(new, best, expected):
    assert keep_best_rule("latency")(new, best, 0.02) is expected


def test_balanced_is_tokens_per_second_per_second_of_ttft():
    assert balanced_score(trial(tps=10.0, ttft=2000.0)) == 5.0
    assert balanced_score(trial(tps=None, ttft=2000.0)) is None
    rule = keep_best_rule("balanced")
    assert rule(trial(tps=20.0, ttft=3000.0), trial(tps=10.0, ttft=2000.0), 0.02)  # 6.67 > 5
    assert not rule(trial(tps=20.0, ttft=4100.0), trial(tps=10.0, ttft=2000.0), 0.02)  # 4.88 < 5
    assert rule(trial(tps=20.0, ttft=3990.0), trial(tps=10.0, ttft=2000.0), 0.02) is False  # tie: lower TTFT keeps
    assert keep_best_rule("throughput") is is_new_best


# ---------------------------------------------------------------------------------------------- speculative
GRID = stage2_cells([None, 8], [1, 2], [100])
GRID_SCRIPT = {
    Knobs(None, 1, 100): trial(tps=10.0, ttft=400),
    Knobs(None, 2, 100): trial(tps=12.0, ttft=500),  # the grid's best
    Knobs(8, 1, 100): trial(tps=9.0, ttft=300),
    Knobs(8, 2, 100): trial(tps=11.0, ttft=450),
}
SPECULATIVE_BEST = Knobs(None, 2, 100, speculative="prompt-lookup")


@pytest.mark.parametrize(
    "speculative_result, kept",
    [
        (trial(tps=15.0, ttft=520), True),  # +25 % tokens/s: wins
        (trial(tps=12.1, ttft=450), True),  # within ε and a lower TTFT: wins the tie, like any cell
        (trial(tps=12.1, ttft=600), False),  # within ε, higher TTFT: the grid's best stays
        (trial(tps=11.0, ttft=100), False),  # slower: stays off
        (trial(tps=99.0, ttft=1, fits=False), False),  # fast but infeasible
    ],
)
def test_the_speculative_trial_runs_after_the_grid_on_its_best_cell_and_is_kept_only_when_it_wins(
    speculative_result, kept
):
    probe = FakeProbe({**GRID_SCRIPT, SPECULATIVE_BEST: speculative_result})
    rec = Recorder()
    result = stage2("m", GRID, probe, rec, 0.02, speculative_modes=("prompt-lookup",))
    assert [c[1] for c in probe.calls] == [*GRID, SPECULATIVE_BEST]  # the grid untouched, then one more trial
    assert all(c[1].speculative == "off" for c in probe.calls[:-1]) and probe.calls[-1][2] == 2
    assert result.best.knobs == (SPECULATIVE_BEST if kept else Knobs(None, 2, 100))
    assert len(result.trials) == len(rec.rows) == 5 and not result.partial
    assert not any(r.kept for r in rec.rows)  # the caller marks the winner


def test_the_speculative_trial_follows_the_objective_s_best_cell():
    probe = FakeProbe({**GRID_SCRIPT, Knobs(8, 1, 100, speculative="prompt-lookup"): trial(tps=9.0, ttft=250)})
    result = stage2("m", GRID, probe, Recorder(), 0.02, "latency", ("prompt-lookup",))
    assert probe.calls[-1][1] == Knobs(8, 1, 100, speculative="prompt-lookup")  # latency's best: lowest TTFT
    assert result.best.knobs.speculative == "prompt-lookup"  # 250 ms beats 300 ms by more than ε


def test_without_speculative_modes_no_extra_trial_runs():
    probe = FakeProbe(GRID_SCRIPT)
    result = stage2("m", GRID, probe, Recorder(), 0.02, speculative_modes=())
    assert [c[1] for c in probe.calls] == GRID and result.best.knobs == Knobs(None, 2, 100)


def test_no_feasible_cell_means_no_speculative_trial():
    probe = FakeProbe({c: trial(fits=False, tps=None) for c in GRID})
    result = stage2("m", GRID, probe, Recorder(), 0.02, speculative_modes=("prompt-lookup",))
    assert result.best is None and len(probe.calls) == len(GRID)


def test_budget_exhausted_in_the_speculative_trial_keeps_the_grid_best_as_partial():
    probe = FakeProbe({**GRID_SCRIPT, SPECULATIVE_BEST: BudgetExhausted(trial(fits=False, notes="budget"))})
    rec = Recorder()
    result = stage2("m", GRID, probe, rec, 0.02, speculative_modes=("prompt-lookup",))
    assert result.partial and result.best.knobs == Knobs(None, 2, 100)
    assert probe.calls[-1][1] == SPECULATIVE_BEST
    assert len(rec.rows) == 5 and rec.rows[-1].notes == "budget"  # the trial in flight is recorded, as in the grid


def test_interrupt_in_the_speculative_trial_records_it_and_propagates():
    probe = FakeProbe({**GRID_SCRIPT, SPECULATIVE_BEST: Interrupted(trial(fits=False, notes="interrupted"))})
    rec = Recorder()
    with pytest.raises(Interrupted):
        stage2("m", GRID, probe, rec, 0.02, speculative_modes=("prompt-lookup",))
    assert rec.rows[-1].notes == "interrupted" and len(rec.rows) == 5


@pytest.mark.parametrize(
    "axis, distributed, plan",
    [
        (("off", "prompt-lookup"), False, ("off", ("prompt-lookup",))),
        (("prompt-lookup", "off"), False, ("off", ("prompt-lookup",))),  # order does not matter: the grid runs off
        (("off",), False, ("off", ())),
        (("prompt-lookup",), False, ("prompt-lookup", ())),  # speculation on in every cell, nothing extra
        (("off", "prompt-lookup"), True, ("off", ())),  # --hostfile: serve runs it off across machines
    ],
)
def test_speculative_plan(axis, distributed, plan):
    assert speculative_plan(axis, distributed) == plan


def test_grid_cells_carry_the_grid_s_speculative_mode_and_why_names_it():
    cells = stage2_cells([None], [1], [100], speculative="prompt-lookup")
    assert cells == [Knobs(None, 1, 100, None, "prompt-lookup")]
    off = trial(tps=10.0, ttft=100, knobs=Knobs(None, 1, 100), row_id=1)
    on = trial(tps=13.0, ttft=90, knobs=cells[0], row_id=2)
    why = explain_choice(on, [off, on], "throughput")
    assert why == (
        "objective throughput: kv_bits=unset max_batch=1 max_context=100 speculative=prompt-lookup gave 13.0 tok/s"
        " (ttft p95 90 ms); next best kv_bits=unset max_batch=1 max_context=100 gave 10.0 tok/s (ttft p95 100 ms)"
    )
