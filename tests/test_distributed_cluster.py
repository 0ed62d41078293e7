"""`macprovider cluster check|print|serve` (docs/several-machines.md) on this machine: loopback hosts run the real probe
locally (as mlx.launch runs 127.0.0.1), other hosts go through a fake `ssh` on PATH."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from macprovider.cli import app
from macprovider.commands import cluster

FAKE_SSH = """#!/bin/sh
# Fake ssh: logs its argv; down.example is unreachable, old.example answers with a recorded probe.
printf '%s\\n' "$*" >> "$FAKE_SSH_LOG"
for arg; do host_seen="$host_seen $arg"; done
case "$host_seen" in
  *down.example*) echo "ssh: connect to host down.example port 22: Connection refused" >&2; exit 255 ;;
  *old.example*) echo '{"hostname": "old", "macprovider": "0.0.1", "mlx": "0.20.0", "mlx_lm": "0.20.0",
"memory_budget_bytes": 8589934592, "model": null, "model_cached": true, "model_error": null, "model_config": null}' | tr -d '\\n'; echo ;;
esac
"""


def _hostfile(tmp_path: Path, hosts: list[str], backend: str = "ring") -> str:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"backend": backend, "hosts": [{"ssh": h, "ips": ["127.0.0.1"]} for h in hosts]}))
    return str(path)


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text(FAKE_SSH)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return log


def test_check_two_loopback_hosts_plans_the_split(tmp_path, tiny_model):
    result = CliRunner().invoke(
        app, ["cluster", "check", _hostfile(tmp_path, ["127.0.0.1", "127.0.0.1"]), "--model", tiny_model, "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert [h["problems"] for h in report["hosts"]] == [[], []]
    assert all(h["facts"]["model_cached"] and h["facts"]["memory_budget_bytes"] > 0 for h in report["hosts"])
    # The tiny model: 2 layers, 2 heads, 1 KV head — a layer per rank, but one KV head cannot be split.
    assert report["plans"]["pipeline"] == {"fits": True, "reason": None, "layers_per_rank": [1, 1]}
    assert report["plans"]["tensor"]["fits"] is False and "key/value heads" in report["plans"]["tensor"]["reason"]


def test_check_names_unreachable_hosts_and_version_mismatches(tmp_path, tiny_model, fake_ssh):
    hostfile = _hostfile(tmp_path, ["127.0.0.1", "down.example", "old.example"])
    result = CliRunner().invoke(app, ["cluster", "check", hostfile])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["RANK", "HOST", "MACPROVIDER", "MLX"]
    assert lines[1].endswith("ok")
    assert "down.example" in lines[2] and "Connection refused" in lines[2]
    assert "old.example" in lines[3] and "macprovider 0.0.1 differs from rank 0's" in lines[3]
    calls = fake_ssh.read_text().splitlines()
    assert len(calls) == 2 and all("BatchMode=yes" in call and "-m macprovider cluster probe" in call for call in calls)


def test_check_reports_a_model_missing_on_a_host(tmp_path):
    result = CliRunner().invoke(
        app, ["cluster", "check", _hostfile(tmp_path, ["127.0.0.1"]), "--model", "org/absent", "--json"]
    )
    assert result.exit_code == 1
    (host,) = json.loads(result.output)["hosts"]
    assert host["problems"] == ["model org/absent not cached"]


def test_print_builds_the_mlx_launch_command(tmp_path):
    hostfile = _hostfile(tmp_path, ["127.0.0.1", "127.0.0.1"], backend="jaccl")
    result = CliRunner().invoke(
        app, ["cluster", "print", hostfile, "--model", "org/m", "--parallel", "tensor", "--max-batch", "4"]
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output)
    assert Path(argv[0]).name == "mlx.launch"
    assert argv[1:5] == ["--hostfile", hostfile, "--backend", "jaccl"]
    assert argv[5:] == [
        "--",
        sys.executable,
        "-m",
        "macprovider",
        "serve",
        "--model",
        "org/m",
        "--parallel",
        "tensor",
        "--max-batch",
        "4",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--parallel", "data"], "invalid parallel 'data'"),
        ([], "invalid hostfile"),
    ],
)
def test_print_refuses_bad_settings(tmp_path, args, message):
    hostfile = _hostfile(tmp_path, ["127.0.0.1"]) if args else str(tmp_path / "missing.json")
    result = CliRunner().invoke(app, ["cluster", "print", hostfile, "--model", "org/m", *args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    "stderr, expected",
    [
        ("[INFO] Node with rank 0 completed", 0),
        ("\x1b[33m[WARN] Node with rank 1 exited with code 1 \x1b[0m", 1),
        ("\x1b[33m[WARN] Node with rank 2 was killed \x1b[0m", 1),
    ],
)
def test_serve_exits_nonzero_when_a_rank_failed_although_mlx_launch_exits_zero(stderr, expected, capfd):
    launcher = [sys.executable, "-c", f"import sys; print({stderr!r}, file=sys.stderr)"]
    assert cluster.run_launch(launcher) == expected
    assert "Node with rank" in capfd.readouterr().err  # relayed


def test_local_rank0_is_found_by_its_environment(tmp_path):
    script = "import subprocess, sys, os; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', 'macprovider'], env=os.environ | {'MLX_RANK': '0'}); print(p.pid, flush=True); p.wait()"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert cluster.local_rank0_pid(parent.pid) == child
    finally:
        parent.kill()
        parent.wait()
        try:
            os.kill(child, 9)
        except (ProcessLookupError, UnboundLocalError):
            pass
