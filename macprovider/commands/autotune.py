"""`macprovider autotune`: biggest feasible model, then the best knobs for it (docs/autotune.md).

Every flag (docs/autotune.md#flags) arrives as text (None = not given) and is validated by
`macprovider.autotune.preflight.parse_inputs` before the database is touched or anything is spawned; a
bad value exits 2 (`exit_reason = config_error`) with one line naming the flag and the cell.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import typer

from macprovider.commands.common import fail

if TYPE_CHECKING:  # pragma: no cover
    from macprovider.autotune.preflight import ClusterHosts


# Long only for its typer option declarations and the flag dict they fill; parse_inputs and run do the work.
def autotune(
    target_context: str | None = typer.Option(
        None, "--target-context", help="Context (tokens) the operator needs [default: 2000]."
    ),
    candidate_models: str | None = typer.Option(
        None,
        "--candidate-models",
        help="Comma-separated model ids, biggest first; the order is the contract [default: the curated list].",
    ),
    max_model_size: str | None = typer.Option(
        None, "--max-model-size", help="Trim the curated list to models of at most this size, e.g. 8B."
    ),
    min_model_size: str | None = typer.Option(
        None, "--min-model-size", help="Trim the curated list to models of at least this size, e.g. 3B."
    ),
    kv_bits_axis: str | None = typer.Option(
        None, "--kv-bits-axis", help="Stage 2 kv_bits cells: unset, 4, 8 [default: unset,4,8]."
    ),
    max_batch_axis: str | None = typer.Option(None, "--max-batch-axis", help="Stage 2 max_batch cells [default: 1,2]."),
    speculative_axis: str | None = typer.Option(
        None,
        "--speculative-axis",
        help="Stage 2 speculative decoding: off, prompt-lookup; with both, the grid runs off and the best cell gets"
        " one more trial with prompt-lookup, kept only if it wins; off alone skips it [default: off,prompt-lookup].",
    ),
    max_context_axis: str | None = typer.Option(
        None,
        "--max-context-axis",
        help="Stage 2 max_context caps, each >= target context [default: the target context].",
    ),
    stage1_replicates: str | None = typer.Option(
        None, "--stage1-replicates", help="Measured requests per Stage 1 candidate [default: 1]."
    ),
    stage2_replicates: str | None = typer.Option(
        None, "--stage2-replicates", help="Measured rounds per Stage 2 cell [default: 3]."
    ),
    gate_ttft_ms: str | None = typer.Option(
        None, "--gate-ttft-ms", help="Feasibility gate on TTFT p95, ms [default: 60000]."
    ),
    tps_tie_epsilon: str | None = typer.Option(
        None, "--tps-tie-epsilon", help="Relative throughput band treated as a tie [default: 0.02]."
    ),
    max_duration: str | None = typer.Option(
        None, "--max-duration", help="Whole-run budget in seconds [default: 7200]."
    ),
    drain: bool = typer.Option(False, "--drain", help="Stop a running provider first and restore it at exit."),
    restart_foreground: bool = typer.Option(
        False, "--restart-foreground", help="With --drain: restart a drained foreground serve with its original argv."
    ),
    drain_grace: str | None = typer.Option(
        None, "--drain-grace", help="Seconds a provider gets to exit before SIGKILL [default: 30]."
    ),
    port: str | None = typer.Option(None, "--port", help="Port the candidate providers listen on [default: 18080]."),
    db_path: str | None = typer.Option(
        None, "--db-path", help="Autotune database [default: ~/.config/macprovider/autotune.sqlite]."
    ),
    retain_runs: str | None = typer.Option(None, "--retain-runs", help="Runs kept in the database [default: 50]."),
    json_output: bool = typer.Option(False, "--json", help="Print the JSON report to stdout after the terminal block."),
    apply: bool = typer.Option(
        False, "--apply", help="Write the recommendation into the config file (atomic, with a backup)."
    ),
    config: str | None = typer.Option(
        None, "--config", help="Config file --apply edits [default: the serve config path]."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit without touching anything."),
    memory_budget_gb: str | None = typer.Option(
        None, "--memory-budget-gb", help="Memory the pre-check may plan for, GiB [default: detected]."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Per-trial lines on stderr."),
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="Stage 2 keeps the cell with the best: throughput (tokens/s, ties to lower TTFT), latency (TTFT p95, ties to higher tokens/s) or balanced (tokens/s per second of TTFT p95) [default: throughput].",
    ),
    hostfile: str | None = typer.Option(
        None,
        "--hostfile",
        help="mlx hostfile (JSON, as for `cluster`): tune one model across its hosts under mlx.launch; each host's budget as `cluster check` reads it (--memory-budget-gb: the same for every host).",
    ),
    workload: str | None = typer.Option(
        None,
        "--workload",
        help="What each trial sends: synthetic (one prompt at ~80 percent of the target context), recorded (the request shapes serve recorded) or a JSON/JSONL file of shapes [default: synthetic].",
    ),
) -> None:
    """Find the biggest model this machine can serve at the target context, then tune its knobs."""
    from macprovider.autotune.preflight import parse_inputs
    from macprovider.core.errors import ConfigError

    raw = {
        "target_context": target_context,
        "candidate_models": candidate_models,
        "max_model_size": max_model_size,
        "min_model_size": min_model_size,
        "kv_bits_axis": kv_bits_axis,
        "max_batch_axis": max_batch_axis,
        "max_context_axis": max_context_axis,
        "speculative_axis": speculative_axis,
        "stage1_replicates": stage1_replicates,
        "stage2_replicates": stage2_replicates,
        "gate_ttft_ms": gate_ttft_ms,
        "tps_tie_epsilon": tps_tie_epsilon,
        "max_duration": max_duration,
        "drain": drain,
        "restart_foreground": restart_foreground,
        "drain_grace": drain_grace,
        "port": port,
        "db_path": db_path,
        "retain_runs": retain_runs,
        "json": json_output,
        "apply": apply,
        "config": config,
        "dry_run": dry_run,
        "memory_budget_gb": memory_budget_gb,
        "verbose": verbose,
        "objective": objective,
        "workload": workload,
        "hostfile": hostfile,
    }
    try:
        inputs = parse_inputs(raw)
    except ConfigError as exc:
        raise fail(f"autotune: {exc} (exit_reason: config_error)", 2) from None
    if inputs.dry_run:
        for warning in inputs.warnings:
            print(warning, file=sys.stderr)
        sys.stdout.write(inputs.plan_text())
        raise typer.Exit(0)
    if inputs.hostfile:
        try:
            inputs = replace(inputs, cluster=resolve_hosts(inputs.hostfile, inputs.memory_budget_bytes))
        except ConfigError as exc:
            raise fail(f"autotune: {exc} (exit_reason: config_error)", 2) from None
    from macprovider.autotune import run

    outcome = run(inputs)
    raise typer.Exit(outcome.exit_code)


def resolve_hosts(hostfile: str, budget_bytes: int | None) -> ClusterHosts:
    """The hosts of `hostfile` by rank with their memory budgets: probed the way `cluster check` probes them
    (`budget_bytes` replaces every probed budget when given). Raises ConfigError naming the hostfile and the
    first host with a problem (unreachable, other macprovider/mlx versions)."""
    from macprovider.autotune.preflight import ClusterHosts
    from macprovider.core.cluster.hosts import check_hosts, read_hosts
    from macprovider.core.errors import ConfigError

    parsed = read_hosts(hostfile)
    hosts = [h.ssh_hostname for h in parsed.hosts]
    reports = check_hosts(hosts, None, sys.executable)
    for report in reports:
        if report.problems or report.facts is None:
            raise ConfigError(
                f"invalid --hostfile {hostfile!r}: rank {report.rank} ({report.host}): {'; '.join(report.problems)}"
            )
    budgets = [int(budget_bytes or report.facts["memory_budget_bytes"]) for report in reports]  # type: ignore[index]
    return ClusterHosts(hostfile, tuple(hosts), tuple(budgets), parsed.backend or "ring")
