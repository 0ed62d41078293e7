"""Provider conflict: launchd via a fake launchctl, real foreground `serve` processes, drain/restore
(docs/autotune.md#provider-conflict)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psutil
import pytest

from macprovider.autotune.conflict import (
    LAUNCHD_LABEL,
    detect,
    find_foreground_servers,
    is_serve_argv,
    parse_launchctl_list,
)

LAUNCHCTL_LIST = "PID\tStatus\tLabel\n-\t0\tcom.apple.x\n512\t0\tlive.streamvc.macprovider\n"


class FakeLaunchctl:
    def __init__(self, listed: bool):
        self.listed = listed
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        self.calls.append(argv)
        out = LAUNCHCTL_LIST if self.listed else "PID\tStatus\tLabel\n"
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_parse_launchctl_list():
    assert parse_launchctl_list(LAUNCHCTL_LIST)
    assert not parse_launchctl_list("PID\tStatus\tLabel\n-\t0\tlive.streamvc.macprovider.other\n")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/usr/bin/python3", "-m", "macprovider", "serve", "--model", "x"], True),
        (["/home/u/.venv/bin/macprovider", "serve"], True),
        (["macprovider", "serve", "--port", "1"], True),
        (["macprovider", "autotune"], False),
        (["python", "-m", "macprovider", "autotune", "--candidate-models", "serve"], False),
        (["vim", "macprovider.py", "serve"], False),
    ],
)
def test_serve_argv_matching(argv, expected):
    assert is_serve_argv(argv) is expected


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def foreground_serve():
    """Pid of a detached process (not our child) whose argv looks like `... macprovider serve`."""
    token = uuid.uuid4().hex
    script = f"'{sys.executable}' -c 'import time; time.sleep(120)' macprovider serve --port 1 --model {token} >/dev/null 2>&1 & echo $!"
    pid = int(subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.strip())
    yield pid
    try:
        psutil.Process(pid).kill()
    except psutil.NoSuchProcess:
        pass


def test_launchd_job_is_a_conflict_and_drain_boots_it_out_then_restores(tmp_path):
    launchctl = FakeLaunchctl(listed=True)
    found = detect(1, runner=launchctl)  # port 1: nothing listens
    assert found.any and found.names()[0] == "launchd-managed"
    assert "provider conflict: launchd-managed" in found.refusal() and "--drain" in found.refusal()
    found.foreground = []
    found.drain(0.1)
    assert any(c[:2] == ["launchctl", "bootout"] and c[2].endswith("/" + LAUNCHD_LABEL) for c in launchctl.calls)
    found.restore()
    assert launchctl.calls[-1][:2] == ["launchctl", "bootstrap"] and launchctl.calls[-1][3].endswith(".plist")


def test_foreground_serve_is_found_never_self_and_drained(foreground_serve):
    found = detect(1, runner=FakeLaunchctl(listed=False))
    pids = [s.pid for s in found.foreground]
    assert foreground_serve in pids
    assert os.getpid() not in pids
    assert f"foreground-PID-{foreground_serve}" in found.refusal()
    found.foreground = [s for s in found.foreground if s.pid == foreground_serve]
    found.drain(5)
    assert gone(foreground_serve)
    found.restore()  # without --restart-foreground nothing comes back
    token = found.foreground[0].argv[-1]
    assert all(s.argv[-1] != token for s in find_foreground_servers())


def test_restart_foreground_relaunches_the_original_argv(foreground_serve):
    found = detect(1, runner=FakeLaunchctl(listed=False), restart_foreground=True)
    found.foreground = [s for s in found.foreground if s.pid == foreground_serve]
    original = found.foreground[0].argv
    found.drain(5)
    found.restore()
    again = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["cmdline"] == original and not gone(p.pid)]
    try:
        assert again and again[0].pid != foreground_serve and gone(foreground_serve)
    finally:
        for p in again:
            p.kill()
        psutil.wait_procs(again, timeout=5)
