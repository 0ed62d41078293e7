"""autotune end to end: real `macprovider serve` children on tiny local models of different sizes (docs/autotune.md).

Models (session fixture, all head_dim 64): small (hidden 64, 2 layers), big (hidden 128, 4 layers,
intermediate 1024), huge (hidden 128, 4 layers, intermediate 8192) and a copy of small whose weights blob is
truncated. `--target-context 256` and one Stage 2 replicate keep each provider start to a few seconds.

A shared development machine may run other engineers' `macprovider serve` processes; the CLI runs here use a
wrapper that hides foreground servers from the conflict check, except the conflict test, which uses the real
detection (and only ever drains its own server).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from macprovider.autotune import conflict, memory
from macprovider.autotune.preflight import parse_inputs
from macprovider.autotune.provider import port_is_listening
from macprovider.autotune.runner import Deps, run
from macprovider.autotune.search import Knobs, Trial, is_new_best
from macprovider.core.processes import die_with_parent
from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache

# Generous wall-clock caps: with every core busy (scripts/test_loaded) a six-trial run takes minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SPECS = {
    "e2e/small": TinyModelSpec(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128),
    "e2e/big": TinyModelSpec(hidden_size=128, num_attention_heads=2, num_hidden_layers=4, intermediate_size=1024),
    "e2e/huge": TinyModelSpec(hidden_size=128, num_attention_heads=2, num_hidden_layers=4, intermediate_size=8192),
    # KV and prefill activations large beside the runtime baseline (16 KiB of KV a token): the replay test
    "e2e/kvheavy": TinyModelSpec(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=8,
        intermediate_size=1024,
        vocab_size=1024,
    ),
    "e2e/mid": TinyModelSpec(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=1024,
        vocab_size=2048,
    ),
}
NO_FOREGROUND = (
    "import sys; from macprovider.autotune import conflict; "
    "conflict.find_foreground_servers = lambda exclude_pids=None: []; "
    "from macprovider.cli import main; sys.argv[0] = 'macprovider'; main()"
)


@pytest.fixture(scope="session")
def e2e_models(hf_home, tmp_path_factory) -> dict[str, Path]:
    """Install the tiny models in the session Hub cache; returns id -> snapshot dir (plus a truncated copy)."""
    out = {}
    for repo, spec in SPECS.items():
        src = build_model_files(tmp_path_factory.mktemp(repo.split("/")[1]), spec)
        out[repo] = install_in_hub_cache(src, repo, hf_home / "hub")
    src = build_model_files(tmp_path_factory.mktemp("trunc"), SPECS["e2e/small"])
    snap = install_in_hub_cache(src, "e2e/truncated", hf_home / "hub")
    blob = (snap / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-4096])
    out["e2e/truncated"] = snap
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def budget_between(models, fits: str, too_big: str) -> str:
    """A --memory-budget-gb that admits `fits` but not `too_big` at target context 256 (the runtime baseline
    measured here is the one the CLI then reads from the same cache)."""
    from macprovider.autotune.trial import BASELINE_CACHE_NAME
    from macprovider.core.config import Paths

    baseline = memory.runtime_baseline_bytes(Paths.from_env().config_dir / BASELINE_CACHE_NAME)

    def est(repo):
        config = json.loads((models[repo] / "config.json").read_text())
        return memory.estimate(
            models[repo], config, max_context=256, max_batch=2, kv_bits=None, budget=0, baseline=baseline
        ).total

    low, high = est(fits), est(too_big)
    assert low < high
    return f"{(low + high) / 2 / memory.GIB:.6f}"


def autotune_cli(tmp_path, *args, timeout=840, target_context=256):
    argv = [
        sys.executable,
        "-c",
        NO_FOREGROUND,
        "autotune",
        "--db-path",
        str(tmp_path / "at.sqlite"),
        "--target-context",
        str(target_context),
        "--stage2-replicates",
        "1",
        "--port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def db_rows(tmp_path, sql):
    db = sqlite3.connect(tmp_path / "at.sqlite")
    db.row_factory = sqlite3.Row
    return db.execute(sql).fetchall()


def test_biggest_feasible_under_the_memory_budget_then_knobs_then_apply(tmp_path, e2e_models):
    config = tmp_path / "config.yaml"
    config.write_text("# keep me\nport: 9000\n")
    budget = budget_between(e2e_models, "e2e/big", "e2e/huge")
    result = autotune_cli(
        tmp_path,
        "--candidate-models",
        "e2e/huge,e2e/big,e2e/small",
        "--memory-budget-gb",
        budget,
        "--kv-bits-axis",
        "unset",
        "--max-batch-axis",
        "1,2",
        "--json",
        "--apply",
        "--config",
        str(config),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    rec = report["recommendation"]
    assert rec["model"] == "e2e/big" and report["alternates"] == ["e2e/small"]
    assert report["infeasible"][0]["model"] == "e2e/huge"
    assert report["infeasible"][0]["reason"].startswith("memory estimate")
    assert rec["tps_median"] > 0 and rec["ttft_p95_ms"] > 0 and rec["replicates"] == 1
    assert report["exit_reason"] == "ok" and report["recipe_hash"].startswith("sha256:")
    trials = db_rows(tmp_path, "SELECT * FROM tune_trials ORDER BY id")
    assert [(t["stage"], t["model"], t["speculative"]) for t in trials] == [
        (1, "e2e/huge", "off"),
        (1, "e2e/big", "off"),
        (2, "e2e/big", "off"),
        (2, "e2e/big", "off"),
        (2, "e2e/big", "prompt-lookup"),  # the grid's best cell once more, served with --speculative prompt-lookup
    ]
    assert trials[0]["fits"] == 0 and trials[0]["memory_estimate_bytes"] > 0
    assert all(t["memory_estimate_bytes"] > 0 for t in trials[1:])
    assert trials[1]["measured_prompt_tokens"] is not None and trials[1]["measured_prompt_tokens"] <= 256
    assert sum(t["kept"] for t in trials) == 1 and [t["kept"] for t in trials if t["stage"] == 1] == [0, 0]
    speculative = trials[-1]
    assert speculative["fits"] == 1, speculative["notes"]  # a real serve child took the flag and served
    as_trials = [as_trial(row) for row in trials[2:]]
    grid_best = None
    for cell in as_trials[:2]:
        if cell.fits and is_new_best(cell, grid_best, 0.02):
            grid_best = cell
    assert grid_best is not None and speculative["max_batch"] == grid_best.knobs.max_batch  # the grid's best cell
    assert speculative["kept"] == is_new_best(as_trials[2], grid_best, 0.02)  # kept only when it wins
    assert rec["knobs"]["speculative"] == ("prompt-lookup" if speculative["kept"] else "off")
    assert_memory_estimates_within(tmp_path, expect=4)
    applied = {
        "port": 9000,
        "model": "e2e/big",
        "max_concurrency_override": rec["knobs"]["max_concurrency_override"],
        "max_context_override": 256,
    }
    if speculative["kept"]:
        applied["speculative"] = "prompt-lookup"
        assert rec["serve_command"].endswith(" --speculative prompt-lookup")
    assert yaml.safe_load(config.read_text()) == applied
    assert config.read_text().startswith("# keep me\nport: 9000\n")
    assert "applied: model=e2e/big" in result.stdout


def as_trial(row) -> Trial:
    """A stored Stage 2 row as the search's Trial (knobs and the figures the keep-best rule reads)."""
    knobs = Knobs(row["kv_bits"], row["max_batch"], row["max_context_cap"], speculative=row["speculative"])
    return Trial(
        2,
        row["model"],
        row["target_context"],
        knobs,
        row["max_tokens"],
        fits=bool(row["fits"]),
        throughput_tps=row["agg_throughput_tps"],
        ttft_p95_ms=row["ttft_p95_ms"],
    )


def assert_memory_estimates_within(tmp_path, tolerance=0.10, expect=1, over=None):
    """Every trial that ran has its estimate within ±tolerance of its measured peak
    (docs/autotune.md#memory-estimate); `over`, when given, is the tolerance above it instead."""
    rows = db_rows(tmp_path, "SELECT * FROM tune_trials WHERE peak_memory_bytes IS NOT NULL")
    assert len(rows) >= expect
    for row in rows:
        error = (row["memory_estimate_bytes"] - row["peak_memory_bytes"]) / row["peak_memory_bytes"]
        assert -tolerance <= error <= (tolerance if over is None else over), (dict(row), error)
        assert row["peak_memory_bytes"] == row["mlx_peak_memory_bytes"] + row["memory_baseline_bytes"]
        terms = ("weights", "kv", "prompt_cache", "prefill", "baseline")
        assert row["memory_estimate_bytes"] == sum(row[f"memory_{t}_bytes"] for t in terms)
    return rows


def test_memory_estimate_within_ten_percent_with_and_without_kv_bits(tmp_path, e2e_models):
    result = autotune_cli(
        tmp_path, "--candidate-models", "e2e/mid", "--kv-bits-axis", "unset,8,4", "--max-batch-axis", "1,2", "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = assert_memory_estimates_within(tmp_path, expect=8)  # the speculative trial's estimate holds too
    assert {(r["kv_bits"], r["max_batch"]) for r in rows if r["stage"] == 2} == {
        (kv, b) for kv in (None, 8, 4) for b in (1, 2)
    }
    assert [r["speculative"] for r in rows].count("prompt-lookup") == 1
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert len(report["trials"]) == 8
    for trial in report["trials"]:
        assert abs(trial["memory_estimate_error"]) <= 0.10
        assert sum(trial["memory_estimate_terms"].values()) == trial["memory_estimate_bytes"]
    rec = report["recommendation"]
    assert rec["peak_memory_bytes"] > rec["memory_estimate_bytes"] * 0.9
    assert "memory_peak:" in result.stdout


def test_memory_estimate_within_ten_percent_on_the_real_model(tmp_path, real_model):
    """SmolLM2-135M-Instruct (the `real_model` import, served with weights_dtype auto: float32 on MLX's CPU
    backend), kv-bits unset and 8 × max-batch 1 and 2: every trial's estimate within ±10 % of its measured
    peak. The synthetic probe (a 64-token answer a stream) takes ~7 min here on MLX's CPU matmul, so the
    trials replay a short workload file instead (two 40-token prompts, 2 tokens each, sent together): same
    trial machinery, same estimate, same measured peak; max-batch 2 holds two live sequences."""
    from macprovider.core.request_shapes import RequestShape, shapes_jsonl

    shapes = tmp_path / "shapes.jsonl"
    shapes.write_text(shapes_jsonl([RequestShape(40, 0, 2, 2)] * 2))
    result = autotune_cli(
        tmp_path,
        "--candidate-models",
        real_model,
        "--kv-bits-axis",
        "unset,8",
        "--max-batch-axis",
        "1,2",
        "--workload",
        str(shapes),
        "--speculative-axis",
        "off",
        "--json",
        target_context=96,
    )
    assert result.returncode == 0, result.stderr
    rows = assert_memory_estimates_within(tmp_path, expect=5)
    assert {(r["kv_bits"], r["max_batch"]) for r in rows if r["stage"] == 2} == {
        (kv, b) for kv in (None, 8) for b in (1, 2)
    }
    # the real model's weights dominate: float32 copy of 135 M parameters (> 500 MiB), as served
    assert all(r["memory_weights_bytes"] > 500 * memory.MIB for r in rows)
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert all(abs(t["memory_estimate_error"]) <= 0.10 for t in report["trials"])


def test_a_replayed_workload_reuses_its_prefixes_and_latency_picks_the_recipe(tmp_path, e2e_models):
    from macprovider.core.request_shapes import RequestShape, shapes_jsonl

    shapes = tmp_path / "shapes.jsonl"  # an agent's long prompts sharing a prefix, two at a time, then a short one
    shapes.write_text(
        shapes_jsonl(
            [
                RequestShape(200, 120, 8, 1),
                RequestShape(210, 120, 8, 2),
                RequestShape(200, 120, 8, 2),
                RequestShape(30, 0, 4, 1),
            ]
        )
    )
    result = autotune_cli(
        tmp_path,
        "--candidate-models",
        "e2e/small",
        "--kv-bits-axis",
        "unset",
        "--max-batch-axis",
        "1,2",
        "--workload",
        str(shapes),
        "--objective",
        "latency",
        "--speculative-axis",
        "off",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    workload = report["inputs"]["workload"]
    assert (workload["kind"], workload["source"], workload["replayed"]) == ("file", str(shapes), 4)
    assert report["inputs"]["objective"] == "latency"
    stage2 = [t for t in report["trials"] if t["stage"] == 2]
    assert len(stage2) == 2 and all(t["fits"] for t in stage2)
    # three replayed requests start with the document the warm-up left in the prefix cache
    assert all(t["cached_prompt_tokens"] >= 3 * 100 for t in stage2)
    first, second = stage2
    ttft_gain = (first["ttft_p95_ms"] - second["ttft_p95_ms"]) / first["ttft_p95_ms"]
    tie = abs(ttft_gain) <= 0.02  # --tps-tie-epsilon: a TTFT tie goes to the higher throughput
    expected = (
        (second if second["tps_median"] > first["tps_median"] else first)
        if tie
        else (second if ttft_gain > 0 else first)
    )
    rec = report["recommendation"]
    assert rec["knobs"] == expected["knobs"] and rec["ttft_p95_ms"] == expected["ttft_p95_ms"]
    assert "on the file workload the winner reused" in rec["why"]
    assert f"workload:          file (4 of 4 shapes from {shapes}" in result.stdout
    assert not list(tmp_path.glob("**/workload.jsonl"))  # candidates never record the probe as the operator's
    assert_memory_estimates_within(tmp_path, expect=3)


def test_memory_estimate_within_ten_percent_replaying_eight_concurrent_agents(tmp_path, e2e_models):
    """Eight requests in flight, each a 400-token prompt whose first 300 tokens the prefix cache holds: the
    estimate (live KV, prompt cache, prefill of the uncached rests) is at most 10 % under the measured peak
    and at most 15 % over it. Over, because the estimate counts all eight rests prefilled in one step, while
    the measured peak depends on how many requests reach the engine within one prefill step: 3.4–12.2 % over
    in 10 runs once prefill got faster (engine/cpu_kernels.py). Counting eight whole prompts' prefill instead
    overestimated by 13.6 % when prefill was slower."""
    from macprovider.core.request_shapes import RequestShape, shapes_jsonl

    shapes = tmp_path / "agents.jsonl"
    shapes.write_text(shapes_jsonl([RequestShape(400, 300, 16, 8)] * 8))
    result = autotune_cli(
        tmp_path,
        "--candidate-models",
        "e2e/kvheavy",
        "--kv-bits-axis",
        "unset",
        "--max-batch-axis",
        "8",
        "--workload",
        str(shapes),
        "--speculative-axis",
        "off",
        "--json",
        target_context=512,
    )
    assert result.returncode == 0, result.stderr
    rows = assert_memory_estimates_within(tmp_path, expect=2, over=0.15)
    (batch8,) = [r for r in rows if r["stage"] == 2]
    assert batch8["max_batch"] == 8
    # the variable terms matter here: KV, prompt cache and prefill are over a third of the estimate
    assert batch8["memory_kv_bytes"] + batch8["memory_prompt_cache_bytes"] + batch8["memory_prefill_bytes"] > (
        batch8["memory_estimate_bytes"] / 3
    )
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    stage2 = [t for t in report["trials"] if t["stage"] == 2]
    assert stage2[0]["cached_prompt_tokens"] >= 8 * 250  # the prefixes really came from the cache


def test_operator_order_is_honoured(tmp_path, e2e_models):
    result = autotune_cli(
        tmp_path,
        "--candidate-models",
        "e2e/small,e2e/big",
        "--kv-bits-axis",
        "8",
        "--max-batch-axis",
        "1",
        "--speculative-axis",
        "off",
        "-v",
    )
    assert result.returncode == 0, result.stderr
    assert "model:           e2e/small" in result.stdout and "  - e2e/big" in result.stdout
    models = [r["model"] for r in db_rows(tmp_path, "SELECT model FROM tune_trials")]
    assert "e2e/big" not in models
    assert "[stage 2] e2e/small kv_bits=8" in result.stderr
    assert_memory_estimates_within(tmp_path, expect=2)


def test_truncated_safetensors_aborts_with_integrity_failure(tmp_path, e2e_models):
    result = autotune_cli(tmp_path, "--candidate-models", "e2e/truncated,e2e/small", "--json")
    assert result.returncode == 1
    assert '"exit_reason": "pre_warm_integrity_failure"' in result.stdout
    trials = db_rows(tmp_path, "SELECT model, notes FROM tune_trials")
    assert [t["model"] for t in trials] == ["e2e/truncated"]
    assert "integrity" in trials[0]["notes"] and "model.safetensors" in trials[0]["notes"]


def test_all_infeasible_lists_smallest_first(tmp_path, e2e_models):
    budget = budget_between(e2e_models, "e2e/small", "e2e/big")
    result = autotune_cli(
        tmp_path,
        "--candidate-models",
        "e2e/huge,e2e/big,e2e/small",
        "--memory-budget-gb",
        budget,
        "--gate-ttft-ms",
        "0.001",
        "--json",
    )
    assert result.returncode == 1
    report = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert report["exit_reason"] == "no_feasible" and report["recommendation"] is None
    assert [i["model"] for i in report["infeasible"]] == ["e2e/small", "e2e/big", "e2e/huge"]
    assert "ttft p95" in report["infeasible"][0]["reason"]
    assert "NO RECOMMENDATION" in result.stdout and "--target-context" in result.stdout


def test_max_duration_is_enforced_inside_a_slow_trial(tmp_path, e2e_models):
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        NO_FOREGROUND,
        "autotune",
        "--db-path",
        str(tmp_path / "at.sqlite"),
        "--target-context",
        "256",
        "--candidate-models",
        "e2e/small",
        "--port",
        str(port),
        "--max-duration",
        "1.5",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "budget_exhausted_no_model_selected" in result.stdout
    assert not port_is_listening(port)
    assert db_rows(tmp_path, "SELECT exit_reason FROM tune_runs")[0][0] == "budget_exhausted_no_model_selected"


def _listening_serve_child(pid: int, port: int) -> psutil.Process | None:
    """The `serve` descendant of `pid` that listens on `port`, or None. Descendants come and go between
    trials (and a short-lived one may vanish while we look), so each is read on its own."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in descendants:
        try:
            if "serve" in child.cmdline() and any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")
            ):
                return child
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_records_the_trial_in_flight_and_leaves_nothing_behind(tmp_path, e2e_models, sig):
    port = free_port()
    # -X faulthandler: if the tuner does not exit, SIGABRT makes it print every thread's stack (in the failure).
    argv = [
        sys.executable,
        "-X",
        "faulthandler",
        "-c",
        NO_FOREGROUND,
        "autotune",
        "--db-path",
        str(tmp_path / "at.sqlite"),
        "--target-context",
        "256",
        "--candidate-models",
        "e2e/small",
        "--port",
        str(port),
        "--drain-grace",
        "5",
    ]
    tie = die_with_parent()

    def as_from_a_terminal() -> None:
        # Unix keeps an ignored signal ignored across exec, and a shell runs `cmd &` with SIGINT ignored: a
        # suite started that way (nohup / a CI harness in the background) gave the tuner an ignored SIGINT,
        # and this test waited 60 s for an interrupt that could not arrive. A terminal's Ctrl-C is what we test.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if tie is not None:
            tie()

    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal
    )
    try:
        deadline = time.monotonic() + 90
        # The first trial's candidate listens: a trial is in flight. Freeze it (SIGSTOP) so the trial cannot
        # finish before our signal lands, however slowly this process is scheduled (checking "port
        # listening" then "children" raced a trial that ended in between).
        while (child := _listening_serve_child(proc.pid, port)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        child.suspend()
        stop_by = time.monotonic() + 10
        while child.status() != psutil.STATUS_STOPPED:  # SIGSTOP is delivered asynchronously
            assert time.monotonic() < stop_by, child.status()
            time.sleep(0.01)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            raise AssertionError(
                f"autotune did not exit within 60 s of signal {sig}; its threads:\n{err[-6000:]}"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out
    assert not port_is_listening(port)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE  # SIGKILL reaches a stopped child
    trials = db_rows(tmp_path, "SELECT model, fits, notes FROM tune_trials")
    assert [(t["model"], t["fits"]) for t in trials] == [("e2e/small", 0)] and "interrupted" in trials[0]["notes"]
    assert db_rows(tmp_path, "SELECT exit_reason, ended_at_utc FROM tune_runs")[0][0] == "interrupted"
    # the next run opens the database normally
    again = autotune_cli(tmp_path, "--candidate-models", "e2e/small", "--dry-run")
    assert again.returncode == 0


@pytest.fixture
def foreground_serve(e2e_models, tmp_path):
    """A real `macprovider serve` started detached (not our child), like an operator's terminal would."""
    port = free_port()
    log = tmp_path / "fg.log"
    cmd = (
        f"'{sys.executable}' -m macprovider serve --model e2e/small --port {port} --max-context 512 "
        f">'{log}' 2>&1 & echo $!"
    )
    pid = int(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout.strip())
    deadline = time.monotonic() + 90
    while not port_is_listening(port):
        assert psutil.pid_exists(pid) and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield pid, port
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["cmdline"] and str(port) in p.info["cmdline"] and "serve" in p.info["cmdline"]:
            p.kill()


def test_conflict_with_a_foreground_serve_refuses_then_drains_and_restarts(tmp_path, e2e_models, foreground_serve):
    pid, fg_port = foreground_serve
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "macprovider",
            "autotune",
            "--db-path",
            str(tmp_path / "at.sqlite"),
            "--candidate-models",
            "e2e/small",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert f"foreground-PID-{pid}" in refused.stderr and "rerun with --drain" in refused.stderr
    assert "provider_conflict" in refused.stdout and psutil.pid_exists(pid)

    def only_mine(port, restart):  # never drain other people's servers on a shared machine
        found = conflict.detect(port, restart_foreground=restart)
        found.foreground = [s for s in found.foreground if s.pid == pid]
        return found

    inputs = parse_inputs(
        {
            "db_path": str(tmp_path / "at.sqlite"),
            "candidate_models": "e2e/small",
            "target_context": "256",
            "stage2_replicates": "1",
            "kv_bits_axis": "unset",
            "max_batch_axis": "1",
            "speculative_axis": "off",
            "port": str(free_port()),
            "drain": True,
            "restart_foreground": True,
            "drain_grace": "10",
        }
    )
    outcome = run(inputs, Deps(detect_conflicts=only_mine, out=io.StringIO(), err=io.StringIO()))
    assert outcome.exit_reason == "ok"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    deadline = time.monotonic() + 90
    while not port_is_listening(fg_port):  # restarted with its original argv
        assert time.monotonic() < deadline
        time.sleep(0.1)
