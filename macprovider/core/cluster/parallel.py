"""How one model splits over several ranks (docs/several-machines.md), MLX-free: what `serve --parallel`, `cluster` and
`autotune --hostfile` share.

    PARALLEL_MODES      pipeline | tensor
    split_problem       why a mode cannot split a model (config.json) over N ranks, or None
    check_split         the same as a ConfigError naming the mode that fits (refused before anything loads)
    split_layers        layers per pipeline stage, proportional to each stage's memory budget
    layers_per_rank     the same by rank (stage s runs on rank N−1−s: rank 0 holds the last stage, the head)
    launch_argv         the `mlx.launch` command that starts `macprovider serve --parallel` on every host
    failed_rank_line    mlx.launch's line saying a rank failed (it exits 0 even then)

Nothing here imports MLX or the engine: autotune (which may import neither) plans with it too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from macprovider.core.errors import ConfigError

PARALLEL_MODES = ("pipeline", "tensor")


def check_split(config: Mapping[str, Any], world_size: int, parallel: str, model: str = "the model") -> None:
    """Refuse a split that cannot work, before any weight loads (docs/several-machines.md).

    `config` is the model's config.json. Pipeline needs ≥ 1 layer per rank; tensor needs the attention
    heads, KV heads and MLP width divisible by `world_size`. Raises ConfigError naming the reason and the
    mode that fits (or that none does).
    """
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"invalid parallel {parallel!r}: must be one of {', '.join(PARALLEL_MODES)}")
    problems = {mode: split_problem(config, world_size, mode) for mode in PARALLEL_MODES}
    problem = problems[parallel]
    if problem is None:
        return
    fits = [mode for mode, reason in problems.items() if reason is None]
    hint = f"--parallel {fits[0]} fits" if fits else "no parallel mode fits; use fewer ranks"
    raise ConfigError(f"cannot split {model} over {world_size} ranks with --parallel {parallel}: {problem}; {hint}")


def split_problem(config: Mapping[str, Any], world_size: int, parallel: str) -> str | None:
    """Why `parallel` cannot split the model of `config` (config.json, top level or `text_config`) over
    `world_size` ranks, or None when it can."""
    text = config.get("text_config") or {}
    get = lambda key: config.get(key, text.get(key))  # noqa: E731 - a two-level config lookup
    if parallel == "pipeline":
        layers = get("num_hidden_layers")
        if not isinstance(layers, int):
            return "config.json has no num_hidden_layers"
        if layers < world_size:
            return f"{layers} layers cannot give each of {world_size} ranks a layer"
        return None
    heads, kv_heads = get("num_attention_heads"), get("num_key_value_heads") or get("num_attention_heads")
    width = get("intermediate_size")
    for name, value in (
        ("attention heads", heads),
        ("key/value heads", kv_heads),
        ("MLP width (intermediate_size)", width),
    ):
        if isinstance(value, int) and value % world_size:
            return f"{value} {name} are not divisible by {world_size}"
    return None


def split_layers(n_layers: int, budgets: Sequence[float]) -> list[int]:
    """Layers per pipeline stage (first stage first), proportional to each stage's memory budget.

    Largest-remainder apportionment (Hamilton's method) of `n_layers` over `budgets` (any positive unit),
    with at least one layer per stage; ties go to the earlier stage. Equal budgets give mlx-lm's even
    split (`PipelineMixin.pipeline`: the low stages take the extra layers). Raises ValueError when there
    are fewer layers than stages or a budget is not positive.
    """
    stages = len(budgets)
    if stages == 0 or n_layers < stages:
        raise ValueError(f"{n_layers} layers cannot fill {stages} stages")
    if any(not b > 0 for b in budgets):
        raise ValueError(f"memory budgets must be positive: {list(budgets)}")
    spare = n_layers - stages  # one layer each first, the rest by budget
    total = float(sum(budgets))
    quotas = [spare * b / total for b in budgets]
    counts = [1 + int(q) for q in quotas]
    order = sorted(range(stages), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in order[: n_layers - sum(counts)]:
        counts[i] += 1
    return counts


def layers_per_rank(n_layers: int, budgets_by_rank: Sequence[float]) -> list[int]:
    """`split_layers` by rank: rank r runs stage N−1−r (the engine's order: rank N−1 embeds, rank 0 holds
    the norm and head). Raises ValueError like `split_layers`."""
    return split_layers(n_layers, list(budgets_by_rank)[::-1])[::-1]


def launch_argv(
    hostfile: str, model: str, parallel: str, serve_args: Sequence[str], python: str, backend: str | None
) -> list[str]:
    """The `mlx.launch` command (the one beside this interpreter) that starts `python -m macprovider serve
    --model MODEL --parallel PARALLEL SERVE_ARGS…` on every host of `hostfile`, with `--backend` when given."""
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    backend_args = ["--backend", backend] if backend else []
    return [
        launcher,
        "--hostfile",
        hostfile,
        *backend_args,
        "--",
        python,
        "-m",
        "macprovider",
        "serve",
        "--model",
        model,
        "--parallel",
        parallel,
        *serve_args,
    ]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failed_rank_line(text: str) -> str | None:
    """The last line of mlx.launch output saying a rank failed (`Node with rank N exited with code C` /
    `Node with rank N was killed`), colour codes removed; None when no rank failed."""
    found = None
    for line in text.splitlines():
        if "Node with rank" in line and ("exited with code" in line or "was killed" in line):
            found = _ANSI.sub("", line).strip()
    return found
