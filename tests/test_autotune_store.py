"""The autotune SQLite store: exact schema, prototype migration, retention, kept (docs/autotune.md#database)."""

from __future__ import annotations

import sqlite3

import pytest

from macprovider.autotune.search import Knobs, Trial
from macprovider.autotune.store import MIGRATIONS, Store
from macprovider.core.errors import StoreError

SPEC_TRIAL_COLUMNS = [
    "id",
    "ts_utc",
    "run_id",
    "stage",
    "model",
    "target_context",
    "measured_prompt_tokens",
    "max_tokens",
    "agg_throughput_tps",
    "ttft_p95_ms",
    "fits",
    "n_err",
    "kept",
    "notes",
    "kv_bits",
    "max_context_cap",
    "max_batch",
    "replicates_n",
]
SPEC_RUN_COLUMNS = [
    "run_id",
    "started_at_utc",
    "ended_at_utc",
    "spec_version",
    "binary_version",
    "machine_ram_gb",
    "machine_chip",
    "machine_os_version",
    "target_context",
    "candidate_models_json",
    "stage1_replicates",
    "stage2_replicates",
    "gate_ttft_ms",
    "tps_tie_epsilon",
    "recommendation_json",
    "recipe_hash",
    "applied",
    "exit_reason",
]
PROTOTYPE_SCHEMA = """
CREATE TABLE tune_runs (
  run_id TEXT PRIMARY KEY, started_at_utc TEXT NOT NULL, ended_at_utc TEXT, spec_version TEXT NOT NULL,
  binary_version TEXT NOT NULL, machine_ram_gb INTEGER NOT NULL, machine_chip TEXT NOT NULL,
  machine_os_version TEXT NOT NULL, target_context INTEGER NOT NULL, candidate_models_json TEXT NOT NULL,
  stage1_replicates INTEGER NOT NULL, stage2_replicates INTEGER NOT NULL, gate_ttft_ms INTEGER NOT NULL,
  tps_tie_epsilon REAL NOT NULL, recommendation_json TEXT, recipe_hash TEXT,
  applied INTEGER NOT NULL DEFAULT 0, exit_reason TEXT NOT NULL);
CREATE TABLE tune_trials (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts_utc TEXT NOT NULL, run_id TEXT NOT NULL,
  model TEXT NOT NULL, target_context INTEGER NOT NULL,
  measured_prompt_tokens INTEGER, max_tokens INTEGER NOT NULL, agg_throughput_tps REAL, ttft_p95_ms REAL,
  fits INTEGER NOT NULL DEFAULT 0, n_err INTEGER NOT NULL DEFAULT 0, kept INTEGER NOT NULL DEFAULT 0,
  notes TEXT);
INSERT INTO tune_runs VALUES ('old-run', '2025-01-01T00:00:00Z', '2025-01-01T01:00:00Z', '0', '0.0.1', 16,
  'Apple M1', 'macOS 14', 2000, '["a/b"]', 1, 3, 60000, 0.02, NULL, NULL, 0, 'ok');
INSERT INTO tune_trials (ts_utc, run_id, model, target_context, max_tokens, agg_throughput_tps, fits, kept, notes)
  VALUES ('2025-01-01T00:10:00Z', 'old-run', 'a/b', 2000, 64, 12.5, 1, 1, 'prototype row');
"""


def run_row(run_id: str, started: str) -> dict:
    return {
        "run_id": run_id,
        "started_at_utc": started,
        "spec_version": "1",
        "binary_version": "0.1.0",
        "machine_ram_gb": 24,
        "machine_chip": "chip",
        "machine_os_version": "os",
        "target_context": 100,
        "candidate_models_json": "[]",
        "stage1_replicates": 1,
        "stage2_replicates": 3,
        "gate_ttft_ms": 60000,
        "tps_tie_epsilon": 0.02,
    }


def a_trial(stage=2, **kw) -> Trial:
    return Trial(stage, "org/m", 100, Knobs(8, 2, 300), 64, fits=True, throughput_tps=10.0, replicates_n=3, **kw)


def columns(db, table):
    return [r[1] for r in sqlite3.connect(db).execute(f"PRAGMA table_info({table})")]


def test_fresh_database_has_the_spec_tables_wal_and_indexes(tmp_path):
    db = tmp_path / "a.sqlite"
    store = Store(db)
    assert store.schema_version == 6
    store.close()
    assert columns(db, "tune_runs") == SPEC_RUN_COLUMNS + ["objective", "workload"]
    assert columns(db, "tune_trials") == SPEC_TRIAL_COLUMNS + [
        "memory_estimate_bytes",
        "peak_memory_bytes",
        "memory_weights_bytes",
        "memory_kv_bytes",
        "memory_prompt_cache_bytes",
        "memory_prefill_bytes",
        "memory_baseline_bytes",
        "mlx_peak_memory_bytes",
        "parallel",
        "speculative",
    ]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexed = {r[2] for r in conn.execute("SELECT * FROM sqlite_master WHERE type='index'").fetchall() if r[2]}
    index_cols = {
        tuple(c[2] for c in conn.execute(f"PRAGMA index_info({name})"))
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='tune_trials'")
    }
    assert ("run_id",) in index_cols and ("ts_utc",) in index_cols and "tune_trials" in indexed
    stage_notnull = [r for r in conn.execute("PRAGMA table_info(tune_trials)") if r[1] == "stage"][0][3]
    assert stage_notnull == 1


def test_prototype_database_is_migrated_in_place_with_stage_1(tmp_path):
    db = tmp_path / "proto.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(PROTOTYPE_SCHEMA)
    conn.close()
    store = Store(db)
    rows = store.rows("SELECT * FROM tune_trials")
    assert len(rows) == 1 and rows[0]["stage"] == 1 and rows[0]["notes"] == "prototype row"
    assert rows[0]["kv_bits"] is None and rows[0]["agg_throughput_tps"] == 12.5
    # new trials go in beside the old ones
    store.insert_run(run_row("new", "2026-01-01T00:00:00Z"))
    row_id = store.insert_trial("new", "2026-01-01T00:00:01Z", a_trial())
    assert row_id > rows[0]["id"]
    store.close()
    assert columns(db, "tune_trials")[: len(SPEC_TRIAL_COLUMNS)] == SPEC_TRIAL_COLUMNS
    assert Store(db).schema_version == 6  # reopening applies nothing twice


def test_run_row_lifecycle_and_trial_fields(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.insert_run(run_row("r1", "2026-01-01T00:00:00Z"))
    run = store.rows("SELECT * FROM tune_runs")[0]
    assert run["exit_reason"] == "internal_error" and run["ended_at_utc"] is None
    t1 = store.insert_trial(
        "r1",
        "2026-01-01T00:00:01Z",
        a_trial(
            stage=1,
            memory_estimate_bytes=5,
            peak_memory_bytes=4,
            mlx_peak_memory_bytes=3,
            memory_terms={"weights": 1, "kv": 1, "prompt_cache": 0, "prefill": 1, "baseline": 2},
        ),
    )
    t2 = store.insert_trial("r1", "2026-01-01T00:00:02Z", a_trial())
    t3 = store.insert_trial("r1", "2026-01-01T00:00:03Z", a_trial())
    store.mark_kept("r1", t3)
    store.mark_kept("r1", t2)  # only ever one
    store.mark_kept("r1", t1)  # a stage 1 row can never be kept
    kept = store.rows("SELECT id, stage FROM tune_trials WHERE kept = 1")
    assert kept == []
    store.mark_kept("r1", t2)
    assert [tuple(k) for k in store.rows("SELECT id, stage FROM tune_trials WHERE kept = 1")] == [(t2, 2)]
    row = store.rows("SELECT * FROM tune_trials WHERE id = ?", (t1,))[0]
    assert (row["stage"], row["kv_bits"], row["max_batch"], row["max_context_cap"], row["replicates_n"]) == (
        1,
        8,
        2,
        300,
        3,
    )
    assert (row["memory_estimate_bytes"], row["peak_memory_bytes"], row["mlx_peak_memory_bytes"]) == (5, 4, 3)
    assert (
        row["memory_weights_bytes"],
        row["memory_kv_bytes"],
        row["memory_prompt_cache_bytes"],
        row["memory_prefill_bytes"],
        row["memory_baseline_bytes"],
    ) == (1, 1, 0, 1, 2)
    assert store.rows("SELECT memory_kv_bytes FROM tune_trials WHERE id = ?", (t2,))[0][0] is None
    store.finish_run(
        "r1",
        ended_at_utc="2026-01-01T00:01:00Z",
        exit_reason="ok",
        report={"a": 1},
        recipe_hash="sha256:x",
        applied=True,
    )
    run = store.rows("SELECT * FROM tune_runs")[0]
    assert (run["exit_reason"], run["recipe_hash"], run["applied"], run["recommendation_json"]) == (
        "ok",
        "sha256:x",
        1,
        '{"a": 1}',
    )


def test_retention_keeps_the_newest_runs_and_drops_their_trials(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for i in range(5):
        store.insert_run(run_row(f"r{i}", f"2026-01-0{i + 1}T00:00:00Z"))
        store.insert_trial(f"r{i}", "2026-01-01T00:00:00Z", a_trial())
    assert store.retain(2) == 3
    assert sorted(r[0] for r in store.rows("SELECT run_id FROM tune_runs")) == ["r3", "r4"]
    assert sorted(r[0] for r in store.rows("SELECT DISTINCT run_id FROM tune_trials")) == ["r3", "r4"]
    assert store.retain(1) == 1
    assert [r[0] for r in store.rows("SELECT run_id FROM tune_runs")] == ["r4"]


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError) as info:
        Store(bad)
    assert "bad.sqlite" in str(info.value) and info.value.exit_code == 2


def test_a_version_5_database_gains_the_speculative_column_and_keeps_its_rows(tmp_path):
    """Migration 6 adds `tune_trials.speculative` to a database made before the knob: old rows read NULL (they
    ran with speculation off), new rows store the trial's mode."""
    db = tmp_path / "v5.sqlite"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:5]:
        migration(conn)
    conn.execute("PRAGMA user_version = 5")
    conn.execute(
        "INSERT INTO tune_trials (ts_utc, run_id, stage, model, target_context, max_tokens, fits, kept, kv_bits)"
        " VALUES ('2026-01-01T00:00:00Z', 'old', 2, 'org/m', 100, 64, 1, 1, 8)"
    )
    conn.commit()
    conn.close()
    assert "speculative" not in columns(db, "tune_trials")
    store = Store(db)
    assert store.schema_version == 6
    assert columns(db, "tune_trials")[-1] == "speculative"
    old = store.rows("SELECT model, kv_bits, kept, speculative FROM tune_trials")
    assert [tuple(r) for r in old] == [("org/m", 8, 1, None)]
    store.insert_run(run_row("new", "2026-01-02T00:00:00Z"))
    on = Trial(2, "org/m", 100, Knobs(8, 2, 300, speculative="prompt-lookup"), 64, fits=True, throughput_tps=11.0)
    on_id = store.insert_trial("new", "2026-01-02T00:00:01Z", on)
    off_id = store.insert_trial("new", "2026-01-02T00:00:02Z", a_trial())
    stored = {
        r["id"]: r["speculative"] for r in store.rows("SELECT id, speculative FROM tune_trials WHERE run_id = 'new'")
    }
    assert stored == {on_id: "prompt-lookup", off_id: "off"}
