"""`autotune --hostfile` (docs/autotune.md#several-machines): the per-rank memory pre-check, the parallel axis,
the hosts and split in the recipe / reports / config — with fakes — and one real run on a 2-rank loopback
hostfile under mlx.launch."""

from __future__ import annotations

import io
import json
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from macprovider.autotune import memory
from macprovider.autotune.apply import owned_values, render_config
from macprovider.autotune.preflight import ClusterHosts, parse_inputs
from macprovider.autotune.provider import Deadline, port_is_listening
from macprovider.autotune.report import (
    Recommendation,
    recipe_domain,
    recipe_hash,
    render_terminal,
    verify_recipe_hash,
)
from macprovider.autotune.runner import Deps, run
from macprovider.autotune.search import Knobs, Trial
from macprovider.autotune.trial import RealEvaluator
from macprovider.cli import app
from macprovider.core.cluster.parallel import failed_rank_line, layers_per_rank
from macprovider.core.hardware import MachineFacts
from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache
from tests.test_autotune_e2e import NO_FOREGROUND, _listening_serve_child, free_port
from tests.test_autotune_report import CANDIDATES, PINNED_HASH, REC
from tests.test_autotune_report import report as base_report
from tests.test_autotune_run import FakeConflicts, Script, feasible

GIB = memory.GIB
SPLIT_ID = "hostfile/split4"  # 4 layers, 2 KV heads: pipeline and tensor both split it over 2 ranks


@pytest.fixture(scope="session")
def split_dir(hf_home, tmp_path_factory) -> Path:
    source = build_model_files(
        tmp_path_factory.mktemp("split4"), TinyModelSpec(num_hidden_layers=4, num_key_value_heads=2)
    )
    return install_in_hub_cache(source, SPLIT_ID, hf_home / "hub")


def _hostfile(path: Path, hosts: list[str]) -> str:
    path.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": h, "ips": ["127.0.0.1"]} for h in hosts]}))
    return str(path)


# ---------------------------------------------------------------------------------------------- budget split
def test_layers_follow_the_budgets_with_rank_zero_holding_the_last_stage():
    assert layers_per_rank(30, [1, 1]) == [15, 15]
    assert layers_per_rank(32, [16, 48]) == [8, 24]  # rank 1 has three times rank 0's memory
    assert layers_per_rank(4, [1, 1, 1]) == [1, 1, 2]  # the first stage (rank N−1) takes the extra layer


def test_rank_weight_fractions_follow_the_split(split_dir):
    even = memory.rank_weight_fractions(split_dir, "pipeline", [2, 2])
    skewed = memory.rank_weight_fractions(split_dir, "pipeline", [3, 1])
    assert sum(even) == pytest.approx(1.0)  # an untied head: every tensor lives on exactly one rank
    assert skewed[0] > even[0] and skewed[1] < even[1]
    # Tensor: every rank holds 1/N of each decoder layer and the whole embedding, norm and head.
    tensor = memory.rank_weight_fractions(split_dir, "tensor", [0, 0])
    assert tensor[0] == tensor[1] and 0.5 < tensor[0] < 1.0


def test_every_rank_share_must_fit_its_own_host():
    whole = memory.MemoryEstimate(weights=1000, kv=400, prompt_cache=50, prefill=10, baseline=5, budget=0)
    shares = memory.rank_estimates(whole, [0.75, 0.25], [3, 1], budgets=[900, 400])
    assert [s.terms() for s in shares] == [
        {"weights": 750, "kv": 300, "prompt_cache": 0, "prefill": 10, "baseline": 5},
        {"weights": 250, "kv": 100, "prompt_cache": 0, "prefill": 10, "baseline": 5},
    ]
    assert [s.fits for s in shares] == [False, True]  # 1065 > 900 on rank 0, 365 <= 400 on rank 1
    assert not memory.rank_estimates(whole, [0.75, 0.25], [3, 1], budgets=[2000, 300])[1].fits
    tensor = memory.rank_estimates(whole, [0.6, 0.6], None, budgets=[1000, 1000])
    assert tensor[0].kv == 200 and all(s.fits for s in tensor)


def _evaluator(tmp_path, budgets, **flags) -> RealEvaluator:
    raw = {
        "candidate_models": SPLIT_ID,
        "target_context": "128",
        "db_path": str(tmp_path / "t.sqlite"),
        "config": str(tmp_path / "c.yaml"),
        **flags,
    }
    cluster = ClusterHosts(str(tmp_path / "hosts.json"), ("hostA", "hostB"), tuple(budgets), "ring")
    inputs = replace(parse_inputs(raw), cluster=cluster)
    evaluator = RealEvaluator(inputs, Deadline(600), budget=lambda: 64 * GIB)
    evaluator._baseline = 100 * 1024**2  # no baseline child: nothing here may start a process
    return evaluator


def test_precheck_names_the_rank_whose_host_is_too_small_and_starts_nothing(tmp_path, split_dir, monkeypatch):
    monkeypatch.setattr("macprovider.autotune.trial.CandidateProvider", None)  # a spawn attempt would raise
    trial = _evaluator(tmp_path, [64 * GIB, 1024**2])(SPLIT_ID, Knobs(None, 1, 128, "pipeline"), 1)
    assert not trial.fits and trial.failure_class == "infeasible"
    assert trial.notes.startswith("rank 1 (hostB): memory estimate") and "exceeds budget 0.00 GiB" in trial.notes
    assert trial.layers_per_rank == (3, 1)  # sized by the budgets: the tiny host still gets its one layer


def test_impossible_split_is_an_infeasible_trial_with_the_refusal(tmp_path, hf_home, monkeypatch):
    (tmp_path / "odd").mkdir()
    source = build_model_files(tmp_path / "odd", TinyModelSpec(num_hidden_layers=2))  # 1 KV head
    install_in_hub_cache(source, "hostfile/onekv", hf_home / "hub")
    monkeypatch.setattr("macprovider.autotune.trial.CandidateProvider", None)
    evaluator = _evaluator(tmp_path, [64 * GIB] * 2, candidate_models="hostfile/onekv")
    trial = evaluator("hostfile/onekv", Knobs(None, 1, 128, "tensor"), 2)
    assert not trial.fits
    assert "1 key/value heads are not divisible by 2; --parallel pipeline fits" in trial.notes


def test_a_failed_rank_is_a_failed_trial_naming_it(tmp_path, split_dir, monkeypatch):
    # A stand-in for mlx.launch that does what it does when a rank dies while loading: prints which one in
    # colour, then exits 0 itself.
    line = "\x1b[33m[WARN] Node with rank 1 exited with code 1 \x1b[0m"
    launcher = [
        sys.executable,
        "-c",
        f"import sys; print('loading', file=sys.stderr); print({line!r}, file=sys.stderr)",
    ]
    monkeypatch.setattr(
        RealEvaluator, "launch", lambda self, model, knobs, cluster: {"argv": launcher, "host": "127.0.0.1"}
    )
    trial = _evaluator(tmp_path, [64 * GIB] * 2)(SPLIT_ID, Knobs(None, 1, 128, "pipeline"), 1)
    assert not trial.fits and trial.failure_class == "infeasible"
    assert trial.notes == "provider exited with code 0 while loading: [WARN] Node with rank 1 exited with code 1"
    assert failed_rank_line("[INFO] Node with rank 0 completed\n") is None


# ---------------------------------------------------------------------------------------------- run with fakes
def _go(tmp_path, modes, **flags):
    raw = {
        "target_context": "100",
        "candidate_models": "org/big-7B,org/small-1B",
        "kv_bits_axis": "unset",
        "max_batch_axis": "1",
        "stage2_replicates": "1",
        "db_path": str(tmp_path / "t.sqlite"),
        "config": str(tmp_path / "config.yaml"),
        **flags,
    }
    cluster = ClusterHosts(str(tmp_path / "hosts.json"), ("mac-a", "mac-b"), (48 * GIB, 16 * GIB), "ring")
    inputs = replace(parse_inputs(raw), cluster=cluster)
    layers = {"pipeline": (24, 8), "tensor": None}
    by_knobs = {
        Knobs(None, 1, 100, "pipeline"): replace(feasible(tps=10.0), layers_per_rank=(24, 8)),
        Knobs(None, 1, 100, "tensor"): feasible(tps=30.0),
    }
    script = Script({"org/big-7B": replace(feasible(), layers_per_rank=layers["pipeline"])}, by_knobs)
    asked = []
    deps = Deps(
        machine=MachineFacts(24, "Test Chip", "Linux test"),
        binary_version="0.1.0",
        detect_conflicts=lambda port, restart: FakeConflicts(),
        evaluate=script,
        out=io.StringIO(),
        err=io.StringIO(),
        parallel_modes=lambda model, size: asked.append((model, size)) or modes,
    )
    return run(inputs, deps), script, asked, deps.out.getvalue()


def test_stage1_runs_pipeline_and_stage2_only_the_modes_that_split_the_model(tmp_path):
    outcome, script, asked, out = _go(tmp_path, ["pipeline"])
    assert asked == [("org/big-7B", 2)]
    assert [(stage, knobs.parallel) for _, knobs, stage in script.calls] == [(1, "pipeline"), (2, "pipeline")]
    rec = outcome.report["recommendation"]
    assert (
        rec["knobs"]["parallel"] == "pipeline"
        and rec["hosts"] == ["mac-a", "mac-b"]
        and rec["layers_per_rank"] == [24, 8]
    )
    assert outcome.report["inputs"]["hosts"] == [
        {"rank": 0, "host": "mac-a", "memory_budget_bytes": 48 * GIB},
        {"rank": 1, "host": "mac-b", "memory_budget_bytes": 16 * GIB},
    ]
    assert rec["serve_command"].startswith(
        f"macprovider cluster serve {tmp_path / 'hosts.json'} --model org/big-7B --parallel pipeline"
    )
    assert "  rank 0: mac-a (24 layers)" in out and "  rank 1: mac-b (8 layers)" in out
    assert verify_recipe_hash(outcome.report)


def test_stage2_parallel_axis_keeps_the_faster_mode_and_apply_writes_it(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("# mine\nport: 9000\nparallel: pipeline\n")
    outcome, script, _, out = _go(tmp_path, ["pipeline", "tensor"], apply=True)
    assert [knobs.parallel for _, knobs, stage in script.calls if stage == 2] == ["pipeline", "tensor"]
    rec = outcome.report["recommendation"]
    assert rec["knobs"]["parallel"] == "tensor" and rec["layers_per_rank"] is None
    assert [t["knobs"]["parallel"] for t in outcome.report["trials"]] == ["pipeline", "pipeline", "tensor"]
    stored = sqlite3.connect(tmp_path / "t.sqlite").execute("SELECT stage, parallel, kept FROM tune_trials ORDER BY id")
    assert stored.fetchall() == [(1, "pipeline", 0), (2, "pipeline", 0), (2, "tensor", 1)]
    written = yaml.safe_load(config.read_text())
    assert written == {
        "port": 9000,
        "model": "org/big-7B",
        "max_context_override": 100,
        "max_concurrency_override": 1,
        "parallel": "tensor",
        "hostfile": str(tmp_path / "hosts.json"),
    }
    assert config.read_text().startswith("# mine\n")
    assert "macprovider cluster serve --config" in out
    # `cluster print` (like `cluster serve`) starts what was applied: hostfile, model, parallel and knobs.
    _hostfile(tmp_path / "hosts.json", ["127.0.0.1", "127.0.0.1"])
    printed = CliRunner().invoke(app, ["cluster", "print", "--config", str(config), "--", "--log-level", "debug"])
    assert printed.exit_code == 0, printed.output
    argv = shlex.split(printed.output)
    assert argv[argv.index("serve") :] == [
        "serve",
        "--model",
        "org/big-7B",
        "--parallel",
        "tensor",
        "--max-context",
        "100",
        "--max-batch",
        "1",
        "--log-level",
        "debug",
    ]
    assert argv[1:3] == ["--hostfile", str(tmp_path / "hosts.json")]


def test_a_one_machine_apply_removes_a_stale_split():
    text = "model: old\nparallel: pipeline\nhostfile: /h.json\nport: 1\n"
    assert yaml.safe_load(render_config(text, owned_values("org/m", None, 1, 100))) == {
        "model": "org/m",
        "port": 1,
        "max_context_override": 100,
        "max_concurrency_override": 1,
    }


# ---------------------------------------------------------------------------------------------- hash stability
def test_hostfile_fields_enter_the_hash_only_with_a_hostfile():
    assert base_report()["recipe_hash"] == PINNED_HASH  # one machine: the pinned vector is unchanged
    trial = Trial(2, CANDIDATES[0], 2000, Knobs(8, 2, 4096), 64, fits=True)
    assert "parallel" not in base_report(trials=[trial])["trials"][0]["knobs"]
    cluster = ClusterHosts("/h.json", ("mac-a", "mac-b"), (GIB, GIB))
    placed = replace(REC, parallel="pipeline", hostfile="/h.json", hosts=("mac-a", "mac-b"), layers_per_rank=(20, 12))
    domain = recipe_domain(
        binary_version="0.1.0", candidate_models=CANDIDATES, chip="Apple M2 Pro", ram_gb=32, rec=placed
    )
    assert (
        domain["knobs"]["parallel"] == "pipeline"
        and domain["hosts"] == ["mac-a", "mac-b"]
        and domain["layers_per_rank"] == [20, 12]
    )
    hashes = {PINNED_HASH, recipe_hash(domain)}
    for other in (
        replace(placed, layers_per_rank=(16, 16)),
        replace(placed, parallel="tensor", layers_per_rank=None),
        replace(placed, hosts=("mac-a", "mac-c")),
    ):
        report = base_report(rec=other, inputs={**base_report()["inputs"], "hosts": cluster.describe()})
        assert verify_recipe_hash(report)
        hashes.add(report["recipe_hash"])
    assert len(hashes) == 5
    assert "  parallel:                   pipeline" in render_terminal(base_report(rec=placed))
    assert Recommendation.from_trial(replace(trial, knobs=Knobs(8, 2, 4096, "tensor")), 2000, cluster).hosts == (
        "mac-a",
        "mac-b",
    )


# ---------------------------------------------------------------------------------------------- end to end
def _autotune_argv(tmp_path, model: str, port: int, *extra: str) -> list[str]:
    hostfile = _hostfile(tmp_path / "hosts.json", ["127.0.0.1", "127.0.0.1"])
    return [
        sys.executable,
        "-c",
        NO_FOREGROUND,
        "autotune",
        "--hostfile",
        hostfile,
        "--candidate-models",
        model,
        "--target-context",
        "128",
        "--kv-bits-axis",
        "unset",
        "--max-batch-axis",
        "1",
        "--stage2-replicates",
        "1",
        "--db-path",
        str(tmp_path / "at.sqlite"),
        "--port",
        str(port),
        "--drain-grace",
        "5",
        *extra,
    ]


def _is_rank(argv: list[str], model: str) -> bool:
    """A `macprovider serve --parallel` rank of `model` (not the mlx.launch carrying the same arguments)."""
    return "--parallel" in argv and model in argv and not any(part.endswith("mlx.launch") for part in argv)


def _argv(process: psutil.Process) -> list[str]:
    """A child's argv, or [] for one that exited (or is a zombie) between listing and reading it: the tuner's
    short-lived helpers come and go while the ranks are listed."""
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return []


def _ranks_of(model: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if _is_rank(p.info["cmdline"] or [], model)]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_autotune_hostfile_on_two_loopback_ranks(tmp_path, tiny_model):
    """The conftest tiny model (2 layers, 1 KV head): Stage 1 runs pipeline over both ranks under mlx.launch;
    tensor cannot split one KV head, so Stage 2 tries pipeline only; --apply writes the split; no rank is left."""
    config = tmp_path / "config.yaml"
    argv = _autotune_argv(tmp_path, tiny_model, free_port(), "--json", "--apply", "--config", str(config))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    rec = report["recommendation"]
    assert rec["knobs"]["parallel"] == "pipeline" and rec["layers_per_rank"] == [1, 1]
    assert rec["hosts"] == ["127.0.0.1", "127.0.0.1"] and rec["tps_median"] > 0
    assert [(t["stage"], t["knobs"]["parallel"], t["fits"]) for t in report["trials"]] == [
        (1, "pipeline", True),
        (2, "pipeline", True),
    ]
    assert all(t["memory_estimate_bytes"] > 0 and t["peak_memory_bytes"] > 0 for t in report["trials"])
    assert "  rank 0: 127.0.0.1 (1 layers)" in result.stdout
    assert yaml.safe_load(config.read_text())["parallel"] == "pipeline"
    assert _ranks_of(tiny_model) == []  # every trial's ranks are gone


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_mid_trial_leaves_no_rank_running(tmp_path, tiny_model, sig):
    """SIGTERM: autotune stops the trial's launcher group (exit 130). SIGKILL: nothing in autotune runs, yet
    the launcher dies with it and the ranks stop with the launcher (macprovider.core.processes)."""
    port = free_port()
    proc = subprocess.Popen(
        _autotune_argv(tmp_path, tiny_model, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while (rank0 := _listening_serve_child(proc.pid, port)) is None:  # the Stage 1 trial is in flight
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_rank(_argv(p), tiny_model)]
        assert len(ranks) == 2
        if sig == signal.SIGTERM:
            rank0.suspend()  # the trial cannot finish before the signal lands (a killed tuner ends it anyway)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL), err
    still_alive = psutil.wait_procs(ranks, timeout=60)[1]  # SIGKILL: rank 0 drains, then stops the follower
    assert still_alive == []
    assert not port_is_listening(port)


def test_a_relative_hostfile_is_recorded_absolute(tmp_path, monkeypatch):
    # --apply writes it to the config, which `cluster serve` reads from any directory.
    _hostfile(tmp_path / "hosts.json", ["127.0.0.1"])
    monkeypatch.chdir(tmp_path)
    inputs = parse_inputs(
        {"hostfile": "hosts.json", "db_path": str(tmp_path / "t.sqlite"), "config": str(tmp_path / "c.yaml")}
    )
    assert inputs.hostfile == str(tmp_path / "hosts.json")
    with pytest.raises(Exception, match="invalid --hostfile 'missing.json': no such file"):
        parse_inputs({"hostfile": "missing.json", "db_path": str(tmp_path / "t.sqlite")})


def test_no_speculative_trial_across_machines(tmp_path):
    """serve runs speculative decoding off under mlx.launch: --hostfile tries no speculative cell, and refuses
    an axis that would only have one."""
    from macprovider.core.errors import ConfigError

    hostfile = _hostfile(tmp_path / "hosts.json", ["127.0.0.1", "127.0.0.1"])
    with pytest.raises(ConfigError, match="--speculative-axis 'prompt-lookup' with --hostfile"):
        parse_inputs({"candidate_models": "org/m", "hostfile": hostfile, "speculative_axis": "prompt-lookup"})
    inputs = parse_inputs({"candidate_models": "org/m", "hostfile": hostfile})
    assert inputs.speculative_axis == ("off", "prompt-lookup") and inputs.speculative_trials == ("off", ())
    assert "speculative: off in every cell (prompt-lookup is not tried: serve runs it off across machines)" in (
        inputs.plan_text()
    )
    _, script, _, _ = _go(tmp_path, ["pipeline", "tensor"])
    assert [knobs.speculative for _, knobs, _ in script.calls] == ["off"] * 3
