"""Autotune inputs: flag parsing and validation before anything is touched (docs/autotune.md#flags).

`parse_inputs(raw)` turns the raw flag strings (None = not given) into a frozen `AutotuneInputs` or
raises ConfigError (exit 2, `exit_reason = config_error`) whose message names the flag and the bad cell,
e.g. `invalid --kv-bits-axis cell '7': must be unset, 4 or 8`. No database, file or process is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macprovider.autotune.search import OBJECTIVES, speculative_plan
from macprovider.core.errors import ConfigError

# The curated list (docs/autotune.md#flags), largest first: (id, parameters in billions).
CURATED: tuple[tuple[str, float], ...] = (
    ("mlx-community/Qwen2.5-32B-Instruct-4bit", 32),
    ("mlx-community/Qwen2.5-14B-Instruct-4bit", 14),
    ("mlx-community/Qwen2.5-Coder-7B-Instruct-4bit", 7),
    ("mlx-community/Llama-3.2-3B-Instruct-4bit", 3),
    ("mlx-community/Llama-3.2-1B-Instruct-4bit", 1),
)


@dataclass(frozen=True)
class ClusterHosts:
    """`--hostfile`: the mlx hostfile, its hosts by rank, each host's memory budget in bytes (what `cluster
    check` reads from each host, or `--memory-budget-gb` for every host) and the hostfile's backend."""

    hostfile: str
    hosts: tuple[str, ...]
    budgets: tuple[int, ...]
    backend: str | None = None

    def describe(self) -> list[dict[str, Any]]:
        """The hosts by rank for reports: `[{rank, host, memory_budget_bytes}]`."""
        return [
            {"rank": r, "host": h, "memory_budget_bytes": b} for r, (h, b) in enumerate(zip(self.hosts, self.budgets))
        ]


@dataclass(frozen=True)
class AutotuneInputs:
    """Validated inputs of one autotune run (every flag in docs/autotune.md#flags)."""

    target_context: int
    candidate_models: tuple[str, ...]
    kv_bits_axis: tuple[int | None, ...]
    max_batch_axis: tuple[int, ...]
    max_context_axis: tuple[int, ...]
    stage1_replicates: int
    stage2_replicates: int
    gate_ttft_ms: float
    tps_tie_epsilon: float
    max_duration_s: float
    drain: bool
    restart_foreground: bool
    drain_grace_s: float
    port: int
    db_path: Path
    retain_runs: int
    json: bool
    apply: bool
    config_path: Path
    dry_run: bool
    memory_budget_bytes: int | None
    verbose: bool
    warnings: tuple[str, ...] = ()
    objective: str = "throughput"
    workload: str = "synthetic"  # synthetic | recorded | a path to a JSON/JSONL file of request shapes
    # the shapes of `recorded` / FILE (macprovider.core.request_shapes.RequestShape)
    workload_shapes: tuple[Any, ...] = ()
    workload_source: str | None = None  # the file they came from
    cluster: ClusterHosts | None = None  # --hostfile, resolved by the command (hosts probed for budgets)
    hostfile: str | None = None  # --hostfile as given
    speculative_axis: tuple[str, ...] = ("off", "prompt-lookup")  # --speculative-axis (search.speculative_plan)

    @property
    def workload_kind(self) -> str:
        """`synthetic`, `recorded` or `file`."""
        return self.workload if self.workload in ("synthetic", "recorded") else "file"

    @property
    def speculative_trials(self) -> tuple[str, tuple[str, ...]]:
        """`(grid mode, extra modes)` of `--speculative-axis` (search.speculative_plan; none extra with
        --hostfile)."""
        distributed = self.cluster is not None or self.hostfile is not None
        return speculative_plan(self.speculative_axis, distributed=distributed)

    def speculative_plan_text(self) -> str:
        """The `--dry-run` line of `--speculative-axis`: the grid's mode and the extra trial, if any."""
        grid_mode, extra = self.speculative_trials
        text = f"{grid_mode} in every cell"
        for mode in extra:
            text += f", then {mode} on the best cell (1 more trial)"
        if self.hostfile and "prompt-lookup" in self.speculative_axis:
            text += " (prompt-lookup is not tried: serve runs it off across machines)"
        return text

    def plan_text(self) -> str:
        """The `--dry-run` plan: inputs, candidate order and axes."""
        kv = ",".join("unset" if b is None else str(b) for b in self.kv_bits_axis)
        budget = f"{self.memory_budget_bytes / 1024**3:g} GiB" if self.memory_budget_bytes else "detected"
        lines = [
            "autotune plan (dry run: nothing is started, downloaded or written)",
            f"  target_context:     {self.target_context}",
            "  candidates (stage 1 order, first feasible wins):",
            *[f"    {i}. {m}" for i, m in enumerate(self.candidate_models, start=1)],
            "  stage 2 axes (kv_bits x max_batch x max_context):",
            f"    kv_bits:     {kv}",
            f"    max_batch:   {','.join(map(str, self.max_batch_axis))}",
            f"    max_context: {','.join(map(str, self.max_context_axis))}",
            f"    cells:       {len(self.kv_bits_axis) * len(self.max_batch_axis) * len(self.max_context_axis)}",
            f"    speculative: {self.speculative_plan_text()}",
            f"  replicates:         stage1 {self.stage1_replicates}, stage2 {self.stage2_replicates}",
            f"  objective:          {self.objective}",
            f"  workload:           {self.workload_kind}"
            + (f" ({len(self.workload_shapes)} shapes from {self.workload_source})" if self.workload_source else ""),
            f"  gate_ttft_ms:       {self.gate_ttft_ms:g}",
            f"  tps_tie_epsilon:    {self.tps_tie_epsilon:g}",
            f"  max_duration:       {self.max_duration_s:g} s",
            f"  memory budget:      {budget}" + (" per host" if self.hostfile and self.memory_budget_bytes else ""),
            *(
                [f"  hostfile:           {self.hostfile} (stage 1 pipeline; stage 2 adds parallel: pipeline, tensor)"]
                if self.hostfile
                else []
            ),
            f"  port:               {self.port}",
            f"  drain:              {'yes' if self.drain else 'no'}"
            f"{' (restart foreground)' if self.restart_foreground else ''}, grace {self.drain_grace_s:g} s",
            f"  db:                 {self.db_path} (keep {self.retain_runs} runs)",
            f"  apply:              {'yes -> ' + str(self.config_path) if self.apply else 'no'}",
        ]
        return "\n".join(lines) + "\n"


def _int(flag: str, raw: Any, low: int, high: int | None = None, cell: bool = False) -> int:
    what = f"{flag} cell" if cell else flag
    text = str(raw).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ConfigError(f"invalid {what} {str(raw)!r}: must be an integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"invalid {what} {str(raw)!r}: must be {bound}")
    return value


def _float(flag: str, raw: Any, *, low: float, strict: bool) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"invalid {flag} {str(raw)!r}: must be a number") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"invalid {flag} {str(raw)!r}: must be {'>' if strict else '>='} {low:g}")
    return value


def _cells(flag: str, raw: str) -> list[str]:
    cells = [c.strip() for c in raw.split(",")]
    for c in cells:
        if c == "":
            raise ConfigError(f"invalid {flag} {raw!r}: empty cell")
    return cells


def parse_size(flag: str, raw: str) -> float:
    """`8B` / `1.5b` / `500M` → billions of parameters. ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BbMm])\s*", str(raw))
    if not match:
        raise ConfigError(f"invalid {flag} {raw!r}: expected a size like 8B or 500M")
    value = float(match.group(1))
    return value / 1000.0 if match.group(2) in "Mm" else value


def parse_inputs(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> AutotuneInputs:
    """Validate every flag (keys: the flag names without dashes, `_` for `-`; None = not given)."""
    import os

    from macprovider.core.config import Paths, config_path_for

    env = os.environ if env is None else env
    warnings: list[str] = []

    def get(key: str, default: Any = None) -> Any:
        """raw[key], or `default` when it is missing or None."""
        return default if raw.get(key) is None else raw.get(key)

    target = _int("--target-context", get("target_context", 2000), 1)

    candidates = _candidate_models(raw, warnings)

    kv_axis = _kv_bits_axis(get("kv_bits_axis", "unset,4,8"))
    batch_axis = _max_batch_axis(get("max_batch_axis", "1,2"))
    ctx_axis = _max_context_axis(get("max_context_axis", ""), target)
    speculative_axis = _speculative_axis(get("speculative_axis", "off,prompt-lookup"))

    restart_foreground = bool(raw.get("restart_foreground"))
    drain = bool(raw.get("drain"))
    if restart_foreground and not drain:
        raise ConfigError("invalid --restart-foreground: it only applies with --drain")
    budget_gb = raw.get("memory_budget_gb")
    budget = None
    if budget_gb is not None:
        budget = int(_float("--memory-budget-gb", budget_gb, low=0, strict=True) * 1024**3)
    db_raw = raw.get("db_path")
    db_path = Path(db_raw).expanduser() if db_raw else Paths.from_env(env).autotune_db
    if db_path.exists() and db_path.is_dir():
        raise ConfigError(f"invalid --db-path {str(db_path)!r}: is a directory")
    config_path, _ = config_path_for(raw.get("config"), env)
    objective = str(get("objective", "throughput")).strip().lower()
    if objective not in OBJECTIVES:
        raise ConfigError(f"invalid --objective {raw.get('objective')!r}: must be throughput, latency or balanced")
    workload, shapes, source = _workload(str(get("workload", "synthetic")).strip(), env)
    hostfile = raw.get("hostfile")
    if hostfile is not None and not Path(str(hostfile)).expanduser().is_file():
        raise ConfigError(f"invalid --hostfile {str(hostfile)!r}: no such file")
    if hostfile is not None and "off" not in speculative_axis:
        raise ConfigError(
            f"invalid --speculative-axis {raw.get('speculative_axis')!r} with --hostfile: "
            "serve runs speculative decoding off across machines; leave off in the axis"
        )
    return AutotuneInputs(
        target_context=target,
        candidate_models=tuple(candidates),
        kv_bits_axis=tuple(kv_axis),
        max_batch_axis=tuple(batch_axis),
        max_context_axis=tuple(ctx_axis),
        stage1_replicates=_int("--stage1-replicates", get("stage1_replicates", 1), 1, 1000),
        stage2_replicates=_int("--stage2-replicates", get("stage2_replicates", 3), 1, 1000),
        gate_ttft_ms=_float("--gate-ttft-ms", get("gate_ttft_ms", 60000), low=0, strict=True),
        tps_tie_epsilon=_float("--tps-tie-epsilon", get("tps_tie_epsilon", 0.02), low=0, strict=False),
        max_duration_s=_float("--max-duration", get("max_duration", 7200), low=0, strict=True),
        drain=drain,
        restart_foreground=restart_foreground,
        drain_grace_s=_float("--drain-grace", get("drain_grace", 30), low=0, strict=False),
        port=_int("--port", get("port", 18080), 1, 65535),
        db_path=db_path,
        retain_runs=_int("--retain-runs", get("retain_runs", 50), 1),
        json=bool(raw.get("json")),
        apply=bool(raw.get("apply")),
        config_path=config_path,
        dry_run=bool(raw.get("dry_run")),
        memory_budget_bytes=budget,
        verbose=bool(raw.get("verbose")),
        warnings=tuple(warnings),
        objective=objective,
        workload=workload,
        workload_shapes=tuple(shapes),
        workload_source=source,
        hostfile=None if hostfile is None else str(Path(str(hostfile)).expanduser().resolve()),  # --apply writes it
        speculative_axis=tuple(speculative_axis),
    )


def _candidate_models(raw: Mapping[str, Any], warnings: list[str]) -> list[str]:
    """--candidate-models (validated, no duplicates), or the curated list filtered by --max/--min-model-size."""
    from macprovider.models.ids import validate_model_id

    if raw.get("candidate_models") is not None:
        candidates = _cells("--candidate-models", raw["candidate_models"])
        for cell in candidates:
            try:
                validate_model_id(cell)
            except Exception:  # noqa: BLE001 - InvalidModelId → a flag error naming the cell
                raise ConfigError(
                    f"invalid --candidate-models cell {cell!r}: expected org/name or an existing local directory"
                ) from None
        if len(set(candidates)) != len(candidates):
            dup = next(c for c in candidates if candidates.count(c) > 1)
            raise ConfigError(f"invalid --candidate-models cell {dup!r}: listed twice")
        if raw.get("max_model_size") is not None or raw.get("min_model_size") is not None:
            warnings.append("warning: --max-model-size/--min-model-size are ignored with --candidate-models")
    else:
        max_b = parse_size("--max-model-size", raw["max_model_size"]) if raw.get("max_model_size") is not None else None
        min_b = parse_size("--min-model-size", raw["min_model_size"]) if raw.get("min_model_size") is not None else None
        if max_b is not None and min_b is not None and min_b > max_b:
            raise ConfigError(
                f"invalid --min-model-size {raw['min_model_size']!r}: larger than --max-model-size {raw['max_model_size']!r}"
            )
        candidates = [m for m, b in CURATED if (max_b is None or b <= max_b) and (min_b is None or b >= min_b)]
        if not candidates:
            raise ConfigError("invalid --max-model-size/--min-model-size: the filter removes every curated candidate")
    return candidates


def _kv_bits_axis(raw_cells: Any) -> list[int | None]:
    """--kv-bits-axis cells: unset (None), 4 or 8, each once."""
    kv_axis: list[int | None] = []
    for cell in _cells("--kv-bits-axis", raw_cells):
        if cell.lower() == "unset":
            value = None
        elif cell in ("4", "8"):
            value = int(cell)
        else:
            raise ConfigError(f"invalid --kv-bits-axis cell {cell!r}: must be unset, 4 or 8")
        if value in kv_axis:
            raise ConfigError(f"invalid --kv-bits-axis cell {cell!r}: listed twice")
        kv_axis.append(value)
    return kv_axis


def _speculative_axis(raw_cells: Any) -> list[str]:
    """--speculative-axis cells: off, prompt-lookup (serve's `speculative` modes), each once."""
    from macprovider.core.config import SPECULATIVE_MODES

    modes: list[str] = []
    for cell in _cells("--speculative-axis", raw_cells):
        value = cell.lower()
        if value not in SPECULATIVE_MODES:
            raise ConfigError(f"invalid --speculative-axis cell {cell!r}: must be {' or '.join(SPECULATIVE_MODES)}")
        if value in modes:
            raise ConfigError(f"invalid --speculative-axis cell {cell!r}: listed twice")
        modes.append(value)
    return modes


def _max_batch_axis(raw_cells: Any) -> list[int]:
    """--max-batch-axis cells: integers 1..256, each once."""
    batch_axis: list[int] = []
    for cell in _cells("--max-batch-axis", raw_cells):
        value = _int("--max-batch-axis", cell, 1, 256, cell=True)
        if value in batch_axis:
            raise ConfigError(f"invalid --max-batch-axis cell {cell!r}: listed twice")
        batch_axis.append(value)
    return batch_axis


def _max_context_axis(ctx_raw: Any, target: int) -> list[int]:
    """--max-context-axis cells (sorted, each once, none below --target-context); empty: [target]."""
    if str(ctx_raw).strip() == "":
        ctx_axis = [target]
    else:
        ctx_axis = []
        for cell in _cells("--max-context-axis", str(ctx_raw)):
            value = _int("--max-context-axis", cell, 1, 10_000_000, cell=True)
            if value < target:
                raise ConfigError(f"invalid --max-context-axis cell {cell!r}: below --target-context {target}")
            if value in ctx_axis:
                raise ConfigError(f"invalid --max-context-axis cell {cell!r}: listed twice")
            ctx_axis.append(value)
        ctx_axis.sort()
    return ctx_axis


def _workload(value: str, env: Mapping[str, str]) -> tuple[str, list[Any], str | None]:
    """`--workload`: synthetic | recorded (serve's record in the config directory) | FILE (JSON/JSONL of
    request shapes). Returns (value, shapes, source file). ConfigError when the record is missing or empty,
    or the file is unreadable or invalid (the message names the line)."""
    from macprovider.core.config import Paths
    from macprovider.core.request_shapes import WorkloadError, load_shapes

    if value.lower() == "synthetic":
        return "synthetic", [], None
    if value == "":
        raise ConfigError("invalid --workload '': must be synthetic, recorded or a file of request shapes")
    if value.lower() == "recorded":
        path = Paths.from_env(env).workload_file
        if not path.is_file():
            raise ConfigError(
                f"invalid --workload 'recorded': no request shapes recorded yet ({path} does not exist; "
                "`macprovider serve` records them unless record_workload is false)"
            )
        try:
            return "recorded", load_shapes(path), str(path)
        except WorkloadError as exc:
            raise ConfigError(f"invalid --workload 'recorded': {exc}") from None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"invalid --workload {value!r}: must be synthetic, recorded or an existing file of request shapes"
        )
    try:
        return str(path), load_shapes(path), str(path)
    except WorkloadError as exc:
        raise ConfigError(f"invalid --workload {value!r}: {exc}") from None
