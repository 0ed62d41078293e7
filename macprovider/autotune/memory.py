"""Autotune's side of the memory model: the runtime baseline of a serving child, measured once per machine.

The estimate itself (weights, KV, prompt cache, prefill terms; `estimate`, `MemoryEstimate`, …) lives one
layer down in `macprovider.models.memory`, because `serve`'s fleet admits models by the same estimate; its
names are re-exported here for autotune's modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from macprovider.models.memory import (  # noqa: F401 - re-exported for autotune's modules
    DTYPE_BYTES,
    GIB,
    KV_ALLOCATION_STEP,
    KV_GROUP_SIZES,
    MIB,
    PREFILL_STEP_SIZE,
    PROMPT_CACHE_ENTRIES,
    SCORE_BYTES,
    KvShape,
    MemoryEstimate,
    ModelShape,
    SafetensorsError,
    allocated_tokens,
    compute_dtype_bytes,
    default_budget_bytes,
    estimate,
    half_precision_elements,
    kv_bytes,
    live_kv_tokens,
    mlx_on_cpu,
    parameter_counts,
    prefill_term,
    rank_estimates,
    rank_weight_fractions,
    read_safetensors_header,
    relative_error,
    served_weights,
    weight_files,
    weights_bytes,
)

# Used only when the bare baseline child cannot run (then the provider would not start either).
FALLBACK_BASELINE_BYTES = 128 * MIB


# The bare child: import what `macprovider serve` imports, allocate nothing, report its RSS.
_BASELINE_CHILD = """
import json, psutil
import mlx.core, mlx_lm, mlx_lm.generate, mlx_lm.models.cache
import macprovider.serve.runtime, macprovider.engine.engine, macprovider.engine.kvcache
print(json.dumps({"rss": psutil.Process().memory_info().rss, "mlx_active": mlx.core.get_active_memory()}))
"""


def runtime_key() -> dict[str, str]:
    """What the baseline depends on: interpreter, platform, and the versions of MLX, mlx-lm, macprovider."""
    import platform
    import sys
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "system": platform.system(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "macprovider": version("macprovider"),
    }


def measure_runtime_baseline(timeout_s: float = 120.0) -> int:
    """RSS (bytes) of a bare child that imports the serving runtime and allocates nothing.

    Raises RuntimeError when the child fails (its stderr tail in the message).
    """
    import subprocess
    import sys

    from macprovider.autotune.provider import child_env

    proc = subprocess.run(
        [sys.executable, "-c", _BASELINE_CHILD],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=child_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"runtime baseline child exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(figures["rss"]) + int(figures["mlx_active"])


def runtime_baseline_bytes(cache_file: Path, measure: Any = measure_runtime_baseline) -> int:
    """The runtime baseline, measured once per `runtime_key()` and cached in `cache_file` (JSON).

    A cache written for another interpreter or other versions is measured again; the file is replaced
    atomically (`macprovider.core.files.write_atomic`), so a crash never leaves half a file nor a temp file.
    When the child cannot run, FALLBACK_BASELINE_BYTES is returned and nothing is cached.
    """
    from macprovider.core.files import write_atomic

    key = runtime_key()
    try:
        cached = json.loads(Path(cache_file).read_text(encoding="utf-8"))
        if cached.get("key") == key and int(cached["baseline_bytes"]) > 0:
            return int(cached["baseline_bytes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        value = int(measure())
    except Exception:  # noqa: BLE001 - a child that cannot run (or times out): the documented fallback
        return FALLBACK_BASELINE_BYTES
    try:
        cache_file = Path(cache_file)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps({"key": key, "baseline_bytes": value}).encode("utf-8"))
    except OSError:
        pass  # an unwritable config directory only costs a re-measurement next run
    return value
