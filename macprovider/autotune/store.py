"""The autotune SQLite store: numbered append-only migrations, runs, trials, retention (docs/autotune.md#database).

Schema version lives in `PRAGMA user_version` (part of the database header, so it commits atomically with
the migration that sets it). Migrations, applied in order when the store opens, each in one transaction:

    1  the prototype tables (`tune_runs`, `tune_trials` without stage/kv_bits/max_context_cap/max_batch/
       replicates_n) and their indexes, if absent — a prototype database already has them
    2  rebuild `tune_trials` into its documented shape (SQLite's documented create-copy-drop-rename recipe),
       old rows get stage = 1
    3  add `memory_estimate_bytes` and `peak_memory_bytes` (memory pre-check vs measured peak,
       docs/autotune.md#memory-estimate)
    4  the calibrated memory model and the run's objective and workload: `tune_trials` gets the estimate's terms
       `memory_weights_bytes`, `memory_kv_bytes`, `memory_prompt_cache_bytes`, `memory_prefill_bytes`,
       `memory_baseline_bytes` and `mlx_peak_memory_bytes`; from here on `peak_memory_bytes` is the measured
       peak of autotune.memory (MLX peak + runtime baseline; rows with a NULL `mlx_peak_memory_bytes` are
       older and hold the MLX peak alone). `tune_runs` gets `objective` and `workload`.
    5  `tune_trials.parallel`: the trial's parallel mode with `--hostfile` (pipeline | tensor),
       NULL for a one-process trial and for every older row.
    6  `tune_trials.speculative`: the trial's speculative decoding mode (`off` | `prompt-lookup`,
       docs/autotune.md#stage-2-the-knobs); NULL for every older row (they all ran with it off).

Never edit a shipped migration: append a new one. The journal is WAL with synchronous=FULL and every
write is one transaction, so a `kill -9` at any moment leaves the last committed state.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from macprovider.autotune.search import Trial
from macprovider.core.errors import StoreError

RUNS_DDL = """CREATE TABLE IF NOT EXISTS tune_runs (
  run_id TEXT PRIMARY KEY, started_at_utc TEXT NOT NULL, ended_at_utc TEXT, spec_version TEXT NOT NULL,
  binary_version TEXT NOT NULL, machine_ram_gb INTEGER NOT NULL, machine_chip TEXT NOT NULL,
  machine_os_version TEXT NOT NULL, target_context INTEGER NOT NULL, candidate_models_json TEXT NOT NULL,
  stage1_replicates INTEGER NOT NULL, stage2_replicates INTEGER NOT NULL, gate_ttft_ms INTEGER NOT NULL,
  tps_tie_epsilon REAL NOT NULL, recommendation_json TEXT, recipe_hash TEXT,
  applied INTEGER NOT NULL DEFAULT 0, exit_reason TEXT NOT NULL)"""

PROTOTYPE_TRIALS_DDL = """CREATE TABLE IF NOT EXISTS tune_trials (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts_utc TEXT NOT NULL, run_id TEXT NOT NULL,
  model TEXT NOT NULL, target_context INTEGER NOT NULL,
  measured_prompt_tokens INTEGER, max_tokens INTEGER NOT NULL, agg_throughput_tps REAL, ttft_p95_ms REAL,
  fits INTEGER NOT NULL DEFAULT 0, n_err INTEGER NOT NULL DEFAULT 0, kept INTEGER NOT NULL DEFAULT 0,
  notes TEXT)"""

TRIALS_V2_DDL = """CREATE TABLE tune_trials_v2 (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts_utc TEXT NOT NULL, run_id TEXT NOT NULL,
  stage INTEGER NOT NULL, model TEXT NOT NULL, target_context INTEGER NOT NULL,
  measured_prompt_tokens INTEGER, max_tokens INTEGER NOT NULL, agg_throughput_tps REAL, ttft_p95_ms REAL,
  fits INTEGER NOT NULL DEFAULT 0, n_err INTEGER NOT NULL DEFAULT 0, kept INTEGER NOT NULL DEFAULT 0,
  notes TEXT, kv_bits INTEGER, max_context_cap INTEGER, max_batch INTEGER, replicates_n INTEGER)"""

PROTOTYPE_COLUMNS = (
    "id, ts_utc, run_id, model, target_context, measured_prompt_tokens, max_tokens, agg_throughput_tps, "
    "ttft_p95_ms, fits, n_err, kept, notes"
)
INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_tune_trials_run_id ON tune_trials(run_id)",
    "CREATE INDEX IF NOT EXISTS idx_tune_trials_ts_utc ON tune_trials(ts_utc)",
)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _m1_prototype(conn: sqlite3.Connection) -> None:
    conn.execute(RUNS_DDL)
    conn.execute(PROTOTYPE_TRIALS_DDL)
    for ddl in INDEXES:
        conn.execute(ddl)


def _m2_stage_columns(conn: sqlite3.Connection) -> None:
    if "stage" in _columns(conn, "tune_trials"):
        return
    conn.execute(TRIALS_V2_DDL)
    conn.execute(
        f"INSERT INTO tune_trials_v2 ({PROTOTYPE_COLUMNS}, stage) SELECT {PROTOTYPE_COLUMNS}, 1 FROM tune_trials"
    )
    conn.execute("DROP TABLE tune_trials")
    conn.execute("ALTER TABLE tune_trials_v2 RENAME TO tune_trials")
    for ddl in INDEXES:
        conn.execute(ddl)


def _m3_memory_columns(conn: sqlite3.Connection) -> None:
    existing = _columns(conn, "tune_trials")
    for column in ("memory_estimate_bytes", "peak_memory_bytes"):
        if column not in existing:
            conn.execute(f"ALTER TABLE tune_trials ADD COLUMN {column} INTEGER")


MEMORY_TERM_COLUMNS = {  # tune_trials column -> MemoryEstimate term
    "memory_weights_bytes": "weights",
    "memory_kv_bytes": "kv",
    "memory_prompt_cache_bytes": "prompt_cache",
    "memory_prefill_bytes": "prefill",
    "memory_baseline_bytes": "baseline",
}


def _m4_memory_terms_objective_workload(conn: sqlite3.Connection) -> None:
    existing = _columns(conn, "tune_trials")
    for column in (*MEMORY_TERM_COLUMNS, "mlx_peak_memory_bytes"):
        if column not in existing:
            conn.execute(f"ALTER TABLE tune_trials ADD COLUMN {column} INTEGER")
    runs = _columns(conn, "tune_runs")
    for column in ("objective", "workload"):
        if column not in runs:
            conn.execute(f"ALTER TABLE tune_runs ADD COLUMN {column} TEXT")


def _m5_parallel(conn: sqlite3.Connection) -> None:
    if "parallel" not in _columns(conn, "tune_trials"):
        conn.execute("ALTER TABLE tune_trials ADD COLUMN parallel TEXT")


def _m6_speculative(conn: sqlite3.Connection) -> None:
    if "speculative" not in _columns(conn, "tune_trials"):
        conn.execute("ALTER TABLE tune_trials ADD COLUMN speculative TEXT")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _m1_prototype,
    _m2_stage_columns,
    _m3_memory_columns,
    _m4_memory_terms_objective_workload,
    _m5_parallel,
    _m6_speculative,
)


class Store:
    """One open autotune database. Raises StoreError (exit 2, `config_error`) when it cannot be used."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10)
            self.conn.execute("PRAGMA busy_timeout = 10000")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"journal_mode is {mode}, WAL unavailable")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"autotune database {self.path} is unusable: {exc}") from None

    # -- plumbing -------------------------------------------------------------------------------------
    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn` in one IMMEDIATE transaction; roll back on any error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this macprovider knows")
        for number, migration in enumerate(MIGRATIONS, start=1):
            if number <= version:
                continue

            def step(conn: sqlite3.Connection, migration=migration, number=number) -> None:
                migration(conn)
                conn.execute(f"PRAGMA user_version = {number}")

            self._write(step)

    @property
    def schema_version(self) -> int:
        """The number of applied migrations."""
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    # -- runs -----------------------------------------------------------------------------------------
    def insert_run(self, row: dict[str, Any]) -> None:
        """Insert the run row at start (`exit_reason = internal_error`, `ended_at_utc` NULL)."""
        row = {**row, "exit_reason": "internal_error", "ended_at_utc": None}
        names = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        self._write(lambda c: c.execute(f"INSERT INTO tune_runs ({names}) VALUES ({marks})", row))

    def retain(self, keep: int) -> int:
        """Delete runs beyond the newest `keep` (by start time) and their trials, in one transaction.

        Returns the number of runs deleted.
        """

        def prune(conn: sqlite3.Connection) -> int:
            old = [
                r[0]
                for r in conn.execute(
                    "SELECT run_id FROM tune_runs ORDER BY started_at_utc DESC, rowid DESC LIMIT -1 OFFSET ?",
                    (keep,),
                )
            ]
            for run_id in old:
                conn.execute("DELETE FROM tune_trials WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM tune_runs WHERE run_id = ?", (run_id,))
            return len(old)

        return self._write(prune)

    def finish_run(
        self,
        run_id: str,
        *,
        ended_at_utc: str,
        exit_reason: str,
        report: dict[str, Any] | None,
        recipe_hash: str | None,
        applied: bool,
    ) -> None:
        """Update the run row at the end with its exit reason, full JSON report and recipe hash."""
        self._write(
            lambda c: c.execute(
                "UPDATE tune_runs SET ended_at_utc = ?, exit_reason = ?, recommendation_json = ?, recipe_hash = ?,"
                " applied = ? WHERE run_id = ?",
                (
                    ended_at_utc,
                    exit_reason,
                    json.dumps(report, sort_keys=True) if report is not None else None,
                    recipe_hash,
                    1 if applied else 0,
                    run_id,
                ),
            )
        )

    # -- trials ---------------------------------------------------------------------------------------
    def insert_trial(self, run_id: str, ts_utc: str, trial: Trial) -> int:
        """Write one trial the moment it ends; returns its row id."""
        values = (
            ts_utc,
            run_id,
            trial.stage,
            trial.model,
            trial.target_context,
            trial.measured_prompt_tokens,
            trial.max_tokens,
            trial.throughput_tps,
            trial.ttft_p95_ms,
            1 if trial.fits else 0,
            trial.n_err,
            1 if trial.kept else 0,
            trial.notes,
            trial.knobs.kv_bits,
            trial.knobs.max_context,
            trial.knobs.max_batch,
            trial.replicates_n,
            trial.memory_estimate_bytes,
            trial.peak_memory_bytes,
            trial.mlx_peak_memory_bytes,
            trial.knobs.parallel,
            trial.knobs.speculative,
            *((trial.memory_terms or {}).get(term) for term in MEMORY_TERM_COLUMNS.values()),
        )
        columns = (
            "ts_utc, run_id, stage, model, target_context, measured_prompt_tokens, max_tokens, agg_throughput_tps,"
            " ttft_p95_ms, fits, n_err, kept, notes, kv_bits, max_context_cap, max_batch, replicates_n,"
            " memory_estimate_bytes, peak_memory_bytes, mlx_peak_memory_bytes, parallel, speculative, "
            + ", ".join(MEMORY_TERM_COLUMNS)
        )
        marks = ", ".join("?" * len(values))
        return self._write(
            lambda c: c.execute(f"INSERT INTO tune_trials ({columns}) VALUES ({marks})", values).lastrowid
        )

    def mark_kept(self, run_id: str, row_id: int) -> None:
        """Make `row_id` the one Stage 2 row of the run with kept = 1."""

        def mark(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE tune_trials SET kept = 0 WHERE run_id = ? AND kept != 0", (run_id,))
            conn.execute("UPDATE tune_trials SET kept = 1 WHERE id = ? AND run_id = ? AND stage = 2", (row_id, run_id))

        self._write(mark)

    def rows(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Read helper for tests and reports: rows as `sqlite3.Row`."""
        self.conn.row_factory = sqlite3.Row
        try:
            return list(self.conn.execute(sql, params))
        finally:
            self.conn.row_factory = None
