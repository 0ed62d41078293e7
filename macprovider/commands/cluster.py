"""`macprovider cluster ...`: several Macs serving one model (docs/several-machines.md).

    cluster check HOSTFILE [--model M] [--json]   each host reachable, same macprovider/mlx versions, the
                                                 model cached, its memory budget; which split fits; a table
    cluster print [HOSTFILE] [--model M] [--parallel P] [-- SERVE ARGS]   the `mlx.launch` command line
    cluster serve [HOSTFILE] [--model M] [--parallel P] [-- SERVE ARGS]   run it; exit non-zero when a rank failed
                                                 (what is not given comes from the config: what
                                                 `autotune --hostfile --apply` wrote)
    cluster probe [--model M]                    (run on each host by `check`) this host's facts as JSON

A thin CLI over `macprovider.core.cluster` (hostfile parsing and probing in `cluster.hosts`, split planning and the
`mlx.launch` command in `cluster.parallel`, shared with `autotune --hostfile`). The remote interpreter is this
one's path unless `--python` names another.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from typing import Annotated, Any

import typer

from macprovider.commands.common import fail, user_errors
from macprovider.core.cluster.hosts import check_hosts, read_hosts, split_plans
from macprovider.core.cluster.parallel import PARALLEL_MODES, failed_rank_line, launch_argv
from macprovider.core.errors import ConfigError

app = typer.Typer(
    help="Serve one model across several machines (mlx.launch + mx.distributed).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

PythonOption = Annotated[str, typer.Option("--python", help="Interpreter with macprovider on the hosts.")]


# ---------------------------------------------------------------------------------------------- probe
@app.command("probe", hidden=True)
def probe(model: str | None = typer.Option(None, "--model", help="Model id to look for in this host's cache.")) -> None:
    """Print this host's facts as one JSON line (what `cluster check` runs on every host)."""
    typer.echo(json.dumps(probe_facts(model)))


# ---------------------------------------------------------------------------------------------- check
def _gib(value: Any) -> str:
    return f"{value / 2**30:.1f} GiB" if isinstance(value, (int, float)) else "-"


@app.command("check")
def check(
    hostfile: str = typer.Argument(..., help="mlx hostfile (JSON; `mlx.distributed_config` writes one)."),
    model: str | None = typer.Option(None, "--model", help="Model id every host must have cached."),
    python: PythonOption = sys.executable,
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {hosts[…], plans{…}, ok}."),
) -> None:
    """Check every host of HOSTFILE: reachable, same versions, model cached, memory budget. Exit 1 on a problem."""
    with user_errors():
        hosts = [h.ssh_hostname for h in read_hosts(hostfile).hosts]
    reports = check_hosts(hosts, model, python)
    plans = split_plans(reports) if model else {}
    ok = not any(r.problems for r in reports) and (not model or any(p.get("fits") for p in plans.values()))
    if as_json:
        payload = {"hosts": [r.__dict__ for r in reports], "plans": plans, "ok": ok}
        typer.echo(json.dumps(payload, indent=2))
    else:
        layers = plans.get("pipeline", {}).get("layers_per_rank") or [None] * len(reports)
        rows = [("RANK", "HOST", "MACPROVIDER", "MLX", "MODEL", "BUDGET", "LAYERS", "PROBLEMS")]
        for report, count in zip(reports, layers):
            facts = report.facts or {}
            cached = {True: "cached", False: "missing", None: "-"}[facts.get("model_cached")]
            rows.append(
                (
                    str(report.rank),
                    report.host,
                    facts.get("macprovider") or "-",
                    facts.get("mlx") or "-",
                    cached,
                    _gib(facts.get("memory_budget_bytes")),
                    str(count) if count else "-",
                    "; ".join(report.problems) or "ok",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        for mode, plan in plans.items():
            typer.echo(f"--parallel {mode}: " + ("fits" if plan["fits"] else f"does not fit ({plan['reason']})"))
    if not ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- launch
def _checked_launch_argv(
    ctx: typer.Context, hostfile: str | None, model: str | None, parallel: str | None, python: str, config: str | None
) -> list[str]:
    """`launch_argv` after checking `parallel` and reading the hostfile (its backend, else ring); extra
    arguments go to serve. What is not given comes from the config (`autotune --hostfile --apply` writes
    `hostfile`, `model`, `parallel` and the knobs): with the model from the config, its `kv_bits`,
    `max_context_override` and `max_concurrency_override` travel as serve flags too, so every host serves the
    applied recipe whatever its own config says. Raises ConfigError naming the bad or missing setting."""
    serve_args = list(ctx.args)
    if hostfile is not None and hostfile.startswith("-"):  # no HOSTFILE: the first serve flag after `--` landed here
        serve_args, hostfile = [hostfile, *serve_args], None
    if hostfile is None or model is None or parallel is None:
        from macprovider.core.config import resolve

        resolved = resolve({}, cli_config=config)
        settings = resolved.settings
        if model is None and settings.model:
            model = settings.model
            recipe = []
            if settings.kv_bits is not None:
                recipe += ["--kv-bits", str(settings.kv_bits)]
            if resolved.sources.get("max_context_override") not in ("default", "ram-tier"):
                recipe += ["--max-context", str(settings.max_context_override)]
            if resolved.sources.get("max_concurrency_override") != "default":
                recipe += ["--max-batch", str(settings.max_concurrency_override)]
            serve_args = recipe + serve_args  # flags given here come later and win
        hostfile = hostfile or settings.hostfile
        parallel = parallel or settings.parallel or "pipeline"
    if hostfile is None:
        raise ConfigError(
            "no HOSTFILE: give one, or set hostfile in the config (autotune --hostfile --apply writes it)"
        )
    if model is None:
        raise ConfigError("no model: give --model, or set model in the config")
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"invalid parallel {parallel!r} (from cli): must be pipeline or tensor")
    backend = read_hosts(hostfile).backend or "ring"
    return launch_argv(hostfile, model, parallel, serve_args, python, backend)


SERVE_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
# `cluster print` and `cluster serve` take the same arguments (typer declares them per command).
LaunchHostfile = Annotated[str | None, typer.Argument(help="mlx hostfile (JSON) [default: hostfile in the config].")]
LaunchModel = Annotated[
    str | None, typer.Option("--model", help="Model id (cached on every host) [default: the config's model and knobs].")
]
LaunchParallel = Annotated[
    str | None, typer.Option("--parallel", help="pipeline or tensor [default: the config's, else pipeline].")
]
LaunchConfig = Annotated[str | None, typer.Option("--config", help="Config file the defaults come from.")]


@app.command("print", context_settings=SERVE_CONTEXT)
def print_cmd(
    ctx: typer.Context,
    hostfile: LaunchHostfile = None,
    model: LaunchModel = None,
    parallel: LaunchParallel = None,
    python: PythonOption = sys.executable,
    config: LaunchConfig = None,
) -> None:
    """Print the mlx.launch command that serves MODEL on every host of HOSTFILE (extra args go to serve)."""
    with user_errors():
        argv = _checked_launch_argv(ctx, hostfile, model, parallel, python, config)
    typer.echo(shlex.join(argv))


@app.command("serve", context_settings=SERVE_CONTEXT)
def serve_cmd(
    ctx: typer.Context,
    hostfile: LaunchHostfile = None,
    model: LaunchModel = None,
    parallel: LaunchParallel = None,
    python: PythonOption = sys.executable,
    config: LaunchConfig = None,
) -> None:
    """Run the mlx.launch command; exit 1 when any rank failed (mlx.launch itself exits 0 even then)."""
    with user_errors():
        argv = _checked_launch_argv(ctx, hostfile, model, parallel, python, config)
    raise typer.Exit(run_launch(argv))


def run_launch(argv: list[str]) -> int:
    """Run `mlx.launch` in its own session, relaying its output. SIGTERM/SIGINT go to rank 0 when it runs on
    this machine (it drains, then stops every rank), else to the launcher. Returns 1 when a rank reported
    failure (`Node with rank N exited with code C` / `was killed`) or the launcher failed, else 0."""
    import signal

    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True
        )
    except OSError as exc:
        raise fail(f"cannot run {argv[0]}: {exc.strerror}") from None

    def forward(number: int, _frame: Any) -> None:
        target = local_rank0_pid(process.pid) or process.pid
        try:
            import os

            os.kill(target, number)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    failed = False
    assert process.stderr is not None
    for line in process.stderr:
        sys.stderr.write(line)
        if failed_rank_line(line):
            failed = True
    code = process.wait()
    return 1 if failed or code != 0 else 0


def local_rank0_pid(launcher_pid: int) -> int | None:
    """The pid of the launcher's descendant running with MLX_RANK=0 on this machine, if any."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            if child.environ().get("MLX_RANK") == "0" and "macprovider" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def probe_facts(model: str | None) -> dict[str, Any]:
    """This host's facts for `cluster check`: versions, the model's presence and shape, the memory budget."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from macprovider import __version__
    from macprovider.core.hardware import memory_budget_bytes, mlx_recommended_working_set_bytes

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "macprovider": __version__,
        "mlx": package("mlx"),
        "mlx_lm": package("mlx-lm"),
        "memory_budget_bytes": memory_budget_bytes(mlx_recommended_working_set_bytes()),
        "model": model,
        "model_cached": None,
        "model_error": None,
        "model_config": None,
    }
    if model:
        from macprovider.core.errors import MacproviderError
        from macprovider.models.ids import ensure_local, read_model_config

        try:
            config = read_model_config(ensure_local(model))
            keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
            facts["model_config"] = {k: config.get(k, (config.get("text_config") or {}).get(k)) for k in keys}
            facts["model_cached"] = True
        except MacproviderError as exc:
            facts["model_cached"], facts["model_error"] = False, str(exc)
    return facts
