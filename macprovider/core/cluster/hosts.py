"""The hosts of a hostfile (docs/several-machines.md), MLX-free: what `cluster check` and `autotune --hostfile` share.

    read_hosts      mlx's hostfile format, parsed with mlx's pure-Python `Hostfile` (no mlx.core, no Metal)
    check_hosts     every host probed over ssh (`127.0.0.1` locally), the problems of each
    split_plans     which `--parallel` modes fit the model on these hosts, the pipeline's layers per rank

HOSTFILE is mlx's own format (`mlx.distributed_config` writes it). Hosts are reached the way `mlx.launch`
reaches them: `ssh HOST` (BatchMode, a connect timeout), except the literal `127.0.0.1`, which runs locally.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from macprovider.core.cluster.parallel import PARALLEL_MODES, layers_per_rank, split_problem
from macprovider.core.errors import ConfigError

LOCAL_HOST = "127.0.0.1"  # what mlx.launch runs without ssh
PROBE_TIMEOUT_S = 60
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
Runner = Callable[[list[str], float], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def read_hosts(hostfile: str) -> Any:
    """mlx's `Hostfile` for `hostfile`; ConfigError naming the file when it is missing or malformed."""
    from mlx._distributed_utils.common import Hostfile

    try:
        hosts = Hostfile.from_file(hostfile)
    except ValueError as exc:
        raise ConfigError(f"invalid hostfile {hostfile}: {exc}") from None
    if not hosts.hosts:
        raise ConfigError(f"invalid hostfile {hostfile}: no hosts")
    return hosts


@dataclass
class HostReport:
    rank: int
    host: str
    facts: dict[str, Any] | None
    problems: list[str]


def probe_argv(host: str, python: str, model: str | None) -> list[str]:
    command = [python, "-m", "macprovider", "cluster", "probe"] + (["--model", model] if model else [])
    if host == LOCAL_HOST:
        return command
    return ["ssh", *SSH_OPTIONS, host, shlex.join(command)]


def check_hosts(hosts: list[str], model: str | None, python: str, runner: Runner = _run) -> list[HostReport]:
    """Probe every host (in rank order); each report lists its problems (empty when the host is fine).
    Versions are compared with rank 0's."""
    reports = []
    for rank, host in enumerate(hosts):
        try:
            done = runner(probe_argv(host, python, model), PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reports.append(HostReport(rank, host, None, [f"unreachable: {exc.__class__.__name__}"]))
            continue
        facts = _last_json_line(done.stdout) if done.returncode == 0 else None
        if facts is None:
            detail = (done.stderr or done.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit status {done.returncode}"
            reports.append(HostReport(rank, host, None, [f"unreachable or no macprovider: {reason}"[:200]]))
            continue
        problems = []
        if model and not facts.get("model_cached"):
            problems.append(f"model {model} not cached")
        reports.append(HostReport(rank, host, facts, problems))
    reference = next((r.facts for r in reports if r.facts), None)
    for report in reports:
        if report.facts and reference and report.facts is not reference:
            for key in ("macprovider", "mlx", "mlx_lm"):
                if report.facts.get(key) != reference.get(key):
                    report.problems.append(f"{key} {report.facts.get(key)} differs from rank 0's {reference.get(key)}")
    return reports


def split_plans(reports: list[HostReport]) -> dict[str, Any]:
    """Which `--parallel` modes fit the model on these hosts, and the pipeline's layers per rank (sized by
    the hosts' memory budgets). Needs every host probed and the model's shape from one of them."""
    config = next((r.facts["model_config"] for r in reports if r.facts and r.facts.get("model_config")), None)
    if config is None or any(r.facts is None for r in reports):
        return {}
    size = len(reports)
    plans: dict[str, Any] = {
        mode: {"fits": split_problem(config, size, mode) is None, "reason": split_problem(config, size, mode)}
        for mode in PARALLEL_MODES
    }
    if plans["pipeline"]["fits"]:
        budgets = [r.facts["memory_budget_bytes"] for r in reports]  # type: ignore[index]
        plans["pipeline"]["layers_per_rank"] = layers_per_rank(config["num_hidden_layers"], budgets)
    return plans


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
