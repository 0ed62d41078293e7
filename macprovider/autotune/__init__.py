"""`macprovider autotune`: the biggest feasible model, then the best knobs for it (docs/autotune.md).

Layout (pure search, real measurement: docs/architecture.md#autotune):
    preflight.py  flag parsing/validation, the curated list       search.py   Stage 1 / Stage 2, keep-best (pure)
    provider.py   candidate `macprovider serve` child processes    probe.py    workload, SSE timing, feasibility
    prewarm.py    download + integrity check of cached files       memory.py   runtime baseline (the estimate: models/memory.py)
    conflict.py   running-provider detection, drain, restore       store.py    SQLite (migrations, retention)
    report.py     terminal block, JSON, recipe hash                apply.py    atomic config edit
    runner.py     one run end to end                               trial.py    one real trial, progress display
    replay.py     --workload recorded|FILE: replay request shapes (macprovider.core.request_shapes) with prefix reuse
Nothing here imports MLX at module level: candidates are measured as child processes over HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from macprovider.autotune.preflight import AutotuneInputs
    from macprovider.autotune.runner import Deps, RunOutcome


def run(inputs: AutotuneInputs, deps: Deps | None = None) -> RunOutcome:
    """Run autotune; see `macprovider.autotune.runner.run`."""
    from macprovider.autotune.runner import run as _run

    return _run(inputs, deps)
