"""`macprovider service ...` (docs/architecture.md#service): rendering, and the exact launchctl / systemctl
argv sequences.

`launchctl` and `systemctl` are fake executables put first on PATH: each call appends its argv to a log
and answers from canned files, so these tests pass on Linux and never touch a real service manager.
"""

from __future__ import annotations

import http.server
import json
import os
import plistlib
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from macprovider.cli import app
from macprovider.service import spec as service

REPO = Path(__file__).resolve().parents[1]
LABEL = "live.streamvc.macprovider"
UID = os.getuid()

FAKE = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["FAKE_SERVICE_LOG"], "a") as log:
    log.write(json.dumps([name] + args) + "\\n")
key = args[1] if name == "systemctl" and args[:1] == ["--user"] and len(args) > 1 else (args[0] if args else "")
base = os.path.join(os.environ["FAKE_SERVICE_STATE"], name + "." + key)
def read(ext, default=""):
    try:
        with open(base + ext) as handle:
            return handle.read()
    except FileNotFoundError:
        return default
sys.stdout.write(read(".stdout"))
sys.stderr.write(read(".stderr"))
sys.exit(int(read(".rc", "0") or 0))
"""


class Fakes:
    """The fake service managers: `calls()` is every recorded argv; `answer()` scripts a reply."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.state = root / "state"
        self.log = root / "calls.jsonl"
        self.bin.mkdir(parents=True)
        self.state.mkdir()
        for name in ("launchctl", "systemctl"):
            path = self.bin / name
            path.write_text(FAKE.format(python=sys.executable))
            path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def answer(self, tool: str, sub: str, *, stdout: str = "", stderr: str = "", rc: int = 0) -> None:
        base = self.state / f"{tool}.{sub}"
        Path(f"{base}.stdout").write_text(stdout)
        Path(f"{base}.stderr").write_text(stderr)
        Path(f"{base}.rc").write_text(str(rc))

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> Fakes:
    fakes = Fakes(tmp_path / "fakes")
    monkeypatch.setenv("PATH", f"{fakes.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SERVICE_LOG", str(fakes.log))
    monkeypatch.setenv("FAKE_SERVICE_STATE", str(fakes.state))
    return fakes


@pytest.fixture
def config(isolated_env) -> Path:
    """A config file at the default path: a model, port 18123, drain_timeout_s 50."""
    path = isolated_env / ".config" / "macprovider" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("# my config\nmodel: org/some-model\nport: 18123\ndrain_timeout_s: 50\n")
    return path


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def listed(pid: str = "1234", status: str = "0") -> str:
    return f"PID\tStatus\tLabel\n-\t0\tcom.apple.something\n{pid}\t{status}\t{LABEL}\n"


# ---- rendering ------------------------------------------------------------------------------------


def test_reference_plist_matches_the_code():
    spec = service.build_spec(
        python="/Users/USER/.local/share/macprovider/venv/bin/python",
        config_path="/Users/USER/.config/macprovider/config.yaml",
        home="/Users/USER",
        drain_timeout_s=30,
        environment={"PYTHONUNBUFFERED": "1"},
    )
    reference = (REPO / "launchd" / f"{LABEL}.plist").read_bytes()
    assert service.render_plist(spec) == reference


def test_print_launchd_plist(config, isolated_env, monkeypatch):
    monkeypatch.setenv("MACPROVIDER_API_KEY", "sk-very-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_very_secret")
    monkeypatch.setenv("MACPROVIDER_DRAIN_TIMEOUT_S", "999")  # the service does not inherit the shell's env
    result = cli("service", "print", "--manager", "launchd")
    assert result.exit_code == 0, result.output
    assert "very-secret" not in result.stdout and "very_secret" not in result.stdout
    job = plistlib.loads(result.stdout.encode())
    assert job["Label"] == LABEL
    assert job["ProgramArguments"] == [sys.executable, "-m", "macprovider", "serve", "--config", str(config)]
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ThrottleInterval"] == 10
    assert job["ExitTimeOut"] > 50
    logs = isolated_env / "Library" / "Logs" / "macprovider"
    assert Path(job["StandardOutPath"]).parent == logs and Path(job["StandardErrorPath"]).parent == logs
    assert job["EnvironmentVariables"]["HF_HOME"] == os.environ["HF_HOME"]
    assert not any(k.startswith("MACPROVIDER_") or k == "HF_TOKEN" for k in job["EnvironmentVariables"])


def test_print_expands_a_relative_config_path(isolated_env, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "my.yaml").write_text("drain_timeout_s: 5\n")
    monkeypatch.chdir(tmp_path / "work")
    job = plistlib.loads(cli("service", "print", "--manager", "launchd", "--config", "my.yaml").stdout.encode())
    assert job["ProgramArguments"][-1] == str(tmp_path / "work" / "my.yaml")
    assert job["ExitTimeOut"] > 5


def test_print_systemd_unit(config, monkeypatch):
    result = cli("service", "print", "--manager", "systemd")
    assert result.exit_code == 0, result.output
    unit = result.stdout.splitlines()
    assert f"ExecStart={sys.executable} -m macprovider serve --config {config}" in unit
    assert "Restart=on-failure" in unit
    timeout = next(int(line.split("=")[1]) for line in unit if line.startswith("TimeoutStopSec="))
    assert timeout > 50
    assert "WantedBy=default.target" in unit


def test_systemd_quoting_of_paths_with_spaces_and_percent():
    spec = service.build_spec(
        python="/opt/my env/bin/python",
        config_path="/home/u/100%/config.yaml",
        home="/home/u",
        drain_timeout_s=30,
        environment={"HF_HOME": "/data/hf cache"},
    )
    unit = service.render_systemd_unit(spec)
    assert 'ExecStart="/opt/my env/bin/python" -m macprovider serve --config /home/u/100%%/config.yaml' in unit
    assert 'Environment="HF_HOME=/data/hf cache"' in unit


def test_print_rejects_an_unknown_manager(config):
    result = cli("service", "print", "--manager", "upstart")
    assert result.exit_code == 2
    assert "invalid --manager 'upstart'" in result.stderr


def test_print_imports_no_mlx(config):
    code = (
        "import sys\n"
        "from macprovider.cli import main\n"
        "sys.argv = ['macprovider', 'service', 'print', '--manager', 'launchd']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'fastapi', 'uvicorn', 'huggingface_hub'))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr
    assert "<key>Label</key>" in result.stdout


# ---- launchd --------------------------------------------------------------------------------------


def test_launchd_install_writes_the_plist_and_bootstraps(fakes, config, isolated_env):
    result = cli("service", "install", "--manager", "launchd")
    assert result.exit_code == 0, result.output
    plist = isolated_env / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    assert stat.S_IMODE(plist.stat().st_mode) == 0o644
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][-1] == str(config)
    assert (isolated_env / "Library" / "Logs" / "macprovider").is_dir()
    assert fakes.calls() == [
        ["launchctl", "bootout", f"gui/{UID}/{LABEL}"],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist)],
    ]


def test_launchd_install_over_a_job_that_is_not_loaded(fakes, config):
    fakes.answer("launchctl", "bootout", stderr="Boot-out failed: 3: No such process\n", rc=3)
    result = cli("service", "install", "--manager", "launchd")
    assert result.exit_code == 0, result.output
    assert [c[1] for c in fakes.calls()] == ["bootout", "bootstrap"]


def test_launchd_install_reports_a_bootstrap_failure(fakes, config):
    fakes.answer("launchctl", "bootstrap", stderr="Bootstrap failed: 5: Input/output error\n", rc=5)
    result = cli("service", "install", "--manager", "launchd")
    assert result.exit_code == 1
    assert "launchctl bootstrap failed (exit 5): Bootstrap failed: 5: Input/output error" in result.stderr
    assert "Traceback" not in result.output


def test_install_needs_a_config_file(fakes, isolated_env):
    result = cli("service", "install", "--manager", "launchd")
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and "install.sh" in result.stderr
    assert fakes.calls() == []


def test_install_warns_when_the_config_names_no_model(fakes, config):
    config.write_text("port: 8080\n")
    result = cli("service", "install", "--manager", "launchd")
    assert result.exit_code == 0
    assert "sets no model" in result.stderr


def test_launchd_uninstall(fakes, config, isolated_env):
    assert cli("service", "install", "--manager", "launchd").exit_code == 0
    fakes.log.unlink()
    result = cli("service", "uninstall", "--manager", "launchd")
    assert result.exit_code == 0, result.output
    assert not (isolated_env / "Library" / "LaunchAgents" / f"{LABEL}.plist").exists()
    assert fakes.calls() == [["launchctl", "bootout", f"gui/{UID}/{LABEL}"]]


def test_launchd_start_stop_restart(fakes, config, isolated_env):
    plist = isolated_env / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    assert cli("service", "install", "--manager", "launchd").exit_code == 0
    fakes.log.unlink()
    fakes.answer("launchctl", "list", stdout=listed())
    assert cli("service", "restart", "--manager", "launchd").exit_code == 0
    assert cli("service", "start", "--manager", "launchd").exit_code == 0
    assert cli("service", "stop", "--manager", "launchd").exit_code == 0
    fakes.answer("launchctl", "list", stdout="PID\tStatus\tLabel\n")
    assert cli("service", "start", "--manager", "launchd").exit_code == 0
    assert fakes.calls() == [
        ["launchctl", "list"],
        ["launchctl", "kickstart", "-k", f"gui/{UID}/{LABEL}"],
        ["launchctl", "list"],
        ["launchctl", "kickstart", f"gui/{UID}/{LABEL}"],
        ["launchctl", "bootout", f"gui/{UID}/{LABEL}"],
        ["launchctl", "list"],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist)],
    ]


def test_start_before_install_says_so(fakes, config):
    result = cli("service", "start", "--manager", "launchd")
    assert result.exit_code == 1 and "not installed" in result.stderr and "service install" in result.stderr


def test_launchctl_missing_is_a_clear_error(config, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = cli("service", "stop", "--manager", "launchd")
    assert result.exit_code == 1
    assert "launchctl not found (launchd runs only on macOS: use --manager systemd)" in result.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        body = json.dumps({"status": "ready", "model": "org/some-model"}).encode()
        self.send_response(200 if self.path == "/v1/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_launchd_status_running_and_healthy(fakes, config, health_port):
    config.write_text(f"model: org/some-model\nport: {health_port}\n")
    assert cli("service", "install", "--manager", "launchd").exit_code == 0
    fakes.answer("launchctl", "list", stdout=listed("4321"))
    result = cli("service", "status", "--manager", "launchd")
    assert result.exit_code == 0, result.output
    assert "running:   yes (pid 4321)" in result.stdout
    assert f"endpoint:  http://127.0.0.1:{health_port}/v1" in result.stdout
    assert "health:    ready (model org/some-model)" in result.stdout
    payload = json.loads(cli("service", "status", "--manager", "launchd", "--json").stdout)
    assert payload["pid"] == 4321 and payload["health"] == "ready" and payload["installed"] is True


def test_launchd_status_crashed_job(fakes, config):
    fakes.answer("launchctl", "list", stdout=listed("-", "1"))
    result = cli("service", "status", "--manager", "launchd")
    assert result.exit_code == 3
    assert "loaded:    yes" in result.stdout
    assert "running:   no, last exit status 1" in result.stdout
    assert "not installed" in result.stdout


def test_launchd_helpers_for_autotune():
    calls = []

    def runner(argv):
        calls.append(argv)
        if argv[1] == "list":
            return subprocess.CompletedProcess(argv, 0, listed(), "")
        if argv[1] == "bootout":
            return subprocess.CompletedProcess(argv, 3, "", "Boot-out failed: 3: No such process")
        return subprocess.CompletedProcess(argv, 0, "", "")

    assert service.launchd_job_loaded(runner) is True
    assert service.launchd_job_loaded(runner, label="other.label") is False
    assert service.launchd_bootout(runner, uid=501) is False
    service.launchd_bootstrap(runner, uid=501, plist=Path("/Users/u/Library/LaunchAgents/x.plist"))
    assert calls[2:] == [
        ["launchctl", "bootout", f"gui/501/{LABEL}"],
        ["launchctl", "bootstrap", "gui/501", "/Users/u/Library/LaunchAgents/x.plist"],
    ]
    assert service.parse_launchctl_list(listed("77", "0")) == (True, 77, 0)
    assert service.parse_launchctl_list("PID\tStatus\tLabel\n") == (False, None, None)


# ---- systemd --------------------------------------------------------------------------------------


def test_systemd_install_uninstall(fakes, config, isolated_env):
    result = cli("service", "install", "--manager", "systemd")
    assert result.exit_code == 0, result.output
    unit = isolated_env / ".config" / "systemd" / "user" / "macprovider.service"  # XDG_CONFIG_HOME is respected
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert f"--config {config}" in unit.read_text()
    assert fakes.calls() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "macprovider.service"],
        ["systemctl", "--user", "restart", "macprovider.service"],
    ]
    fakes.log.unlink()
    assert cli("service", "uninstall", "--manager", "systemd").exit_code == 0
    assert not unit.exists()
    assert fakes.calls() == [
        ["systemctl", "--user", "disable", "--now", "macprovider.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_systemd_unit_follows_xdg_config_home(fakes, config, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    result = cli("service", "install", "--manager", "systemd", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "xdg" / "systemd" / "user" / "macprovider.service").is_file()


def test_systemd_start_stop_restart_status(fakes, config):
    assert cli("service", "install", "--manager", "systemd").exit_code == 0
    fakes.log.unlink()
    for command in ("start", "stop", "restart"):
        assert cli("service", command, "--manager", "systemd").exit_code == 0
    fakes.answer(
        "systemctl",
        "show",
        stdout="LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=999\nExecMainStatus=0\n",
    )
    result = cli("service", "status", "--manager", "systemd")
    assert "running:   yes (pid 999)" in result.stdout
    assert "journalctl --user -u macprovider.service" in result.stdout
    assert fakes.calls() == [
        ["systemctl", "--user", "start", "macprovider.service"],
        ["systemctl", "--user", "stop", "macprovider.service"],
        ["systemctl", "--user", "restart", "macprovider.service"],
        [
            "systemctl",
            "--user",
            "show",
            "macprovider.service",
            "--property=LoadState,ActiveState,SubState,MainPID,ExecMainStatus",
        ],
    ]


def test_systemd_without_a_user_session(fakes, config):
    fakes.answer("systemctl", "daemon-reload", stderr="Failed to connect to bus: No medium found\n", rc=1)
    result = cli("service", "install", "--manager", "systemd")
    assert result.exit_code == 1
    assert "no systemd user session" in result.stderr and "Traceback" not in result.output
