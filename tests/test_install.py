"""install.sh in a temporary HOME (docs/architecture.md#service).

`test_install_sh_fresh_home_then_second_run_changes_nothing` is THE install test (select it with
`-k install_sh`): a real run of install.sh on a copy of this checkout — a new virtual environment, a real
`pip install` of the package and its dependencies from the package index (about a minute), the link, the
default config — then a second run that must change nothing. The other tests check the refusals, which
happen before anything is installed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from macprovider import __version__

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = (
    "model",
    "host",
    "port",
    "kv_bits",
    "max_context_override",
    "max_concurrency_override",
    "max_request_body_bytes",
    "log_level",
    "api_key_file",
    "drain_timeout_s",
)


def checkout_copy(tmp_path: Path) -> Path:
    """install.sh + what pip builds from, copied so concurrent edits and build files stay out of the repo."""
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("install.sh", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "macprovider", src / "macprovider", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def environment(tmp_path: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MACPROVIDER_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
        # Skipping byte-compilation of ~200 MB of dependencies (transformers, numpy) halves the install time.
        MACPROVIDER_PIP_ARGS="--no-compile",
    )
    if extra_path is not None:
        env["PATH"] = f"{extra_path}{os.pathsep}{env['PATH']}"
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def install_sh(src: Path, env: dict[str, str], *args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(src / "install.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=env["HOME"],
    )


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.install
def test_install_sh_fresh_home_then_second_run_changes_nothing(tmp_path):
    src = checkout_copy(tmp_path)
    env = environment(tmp_path)
    first = install_sh(src, env, "--no-service", "--allow-root", "--python", sys.executable)
    assert first.returncode == 0, first.stdout + first.stderr

    venv = tmp_path / "data" / "macprovider" / "venv"
    assert (venv / "pyvenv.cfg").is_file() and (venv / "bin" / "python").exists()
    location = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import macprovider; print(macprovider.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path / "home",
    ).stdout
    assert location.startswith(str(venv)), location  # installed into the venv, not borrowed from elsewhere

    link = tmp_path / "home" / ".local" / "bin" / "macprovider"
    assert link.is_symlink() and link.resolve() == (venv / "bin" / "macprovider").resolve()
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"macprovider {__version__}"

    config = tmp_path / "config" / "macprovider" / "config.yaml"
    text = config.read_text()
    assert yaml.safe_load(text) is None  # every key commented: all defaults until the operator sets one
    for key in SPEC_KEYS:
        assert f"# {key}:" in text, key
    shown = subprocess.run([str(link), "config", "show", "--json"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and str(config) in shown.stdout
    assert "macprovider autotune --apply" in first.stdout and "macprovider models demo" in first.stdout

    # The operator edits the config; a second run keeps it byte for byte and changes nothing else.
    config.write_text(text + "port: 9000\n")
    before = config.read_bytes()
    venv_stamp = (venv / "pyvenv.cfg").stat().st_mtime_ns
    no_user_systemd = tmp_path / "fake-bin"
    fake_tool(no_user_systemd, "systemctl", 'echo "Failed to connect to bus: No medium found" >&2; exit 1')
    second = install_sh(src, environment(tmp_path, no_user_systemd), "--allow-root", "--python", sys.executable)
    assert second.returncode == 0, second.stdout + second.stderr
    assert config.read_bytes() == before
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == venv_stamp
    assert "reusing the environment" in second.stdout
    assert "installing" not in second.stdout
    assert "service: " in second.stdout and "service: installed" not in second.stdout
    assert "nothing to change" in second.stdout


def test_install_sh_refuses_root_without_allow_root(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "id", "echo 0")
    result = install_sh(REPO, environment(tmp_path, bin_dir), "--no-service", timeout=30)
    assert result.returncode == 5
    assert "refusing to run as root" in result.stderr and "--allow-root" in result.stderr
    assert not (tmp_path / "data").exists()


def test_install_sh_unsupported_platform(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "uname", 'case "$1" in -s) echo SunOS;; -m) echo sparc64;; esac')
    result = install_sh(REPO, environment(tmp_path, bin_dir), "--no-service", "--allow-root", timeout=30)
    assert result.returncode == 3
    assert "unsupported platform SunOS/sparc64" in result.stderr
    assert not (tmp_path / "data").exists()


def test_install_sh_missing_python(tmp_path):
    result = install_sh(
        REPO,
        environment(tmp_path),
        "--no-service",
        "--allow-root",
        "--python",
        str(tmp_path / "no-python3"),
        timeout=30,
    )
    assert result.returncode == 4
    assert "is not a python >= 3.11" in result.stderr
    assert not (tmp_path / "home" / ".local" / "bin" / "macprovider").exists()


def test_install_sh_usage(tmp_path):
    env = environment(tmp_path)
    bad = install_sh(REPO, env, "--frobnicate", timeout=30)
    assert bad.returncode == 2 and "unknown option '--frobnicate'" in bad.stderr
    helped = install_sh(REPO, env, "--help", timeout=30)
    assert helped.returncode == 0
    for line in ("--no-service", "--version X", "--allow-root", "unsupported platform", "missing tool"):
        assert line in helped.stdout
