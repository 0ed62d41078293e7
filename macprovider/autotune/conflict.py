"""Provider conflict: find a running provider, drain it, restore it (docs/autotune.md#provider-conflict).

Looks for the launchd job (`live.streamvc.macprovider`, via `launchctl list` through an injectable
runner, so Linux tests feed recorded output), foreground `macprovider serve` processes (psutil argv
matching; never this process, its ancestors or its children) and a listener on the autotune port.
Without `--drain` the run refuses; with it, the launchd job is booted out (never SIGKILLed) and
foreground servers get SIGTERM (SIGKILL after the grace), and `Conflicts.restore()` — run from a `finally`
— bootstraps the job again and, with `--restart-foreground`, restarts each server with its original
argv and working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from macprovider.autotune.provider import port_is_listening, wait_port_free
from macprovider.core.errors import ProviderConflict
from macprovider.service import spec as service_spec

LAUNCHD_LABEL = service_spec.LABEL  # the launchd helpers are service's (one copy; autotune may import it)
Runner = service_spec.Runner
default_runner = service_spec.default_runner  # a missing binary is exit 127 (no launchd on Linux)


def launchd_plist_path(home: Path | None = None) -> Path:
    """~/Library/LaunchAgents/live.streamvc.macprovider.plist (service's path; `home` defaults to $HOME)."""
    return service_spec.launchd_plist_path(home or Path(os.environ.get("HOME") or Path.home()))


def parse_launchctl_list(output: str, label: str = LAUNCHD_LABEL) -> bool:
    """Whether `launchctl list` output (`PID\\tStatus\\tLabel` rows) has a row for `label` (service's parser)."""
    return service_spec.parse_launchctl_list(output, label)[0]


def is_serve_argv(argv: Sequence[str]) -> bool:
    """Whether an argv runs `macprovider serve` (console script, `python -m macprovider`, or a path)."""
    for i, arg in enumerate(argv[:-1]):
        base = os.path.basename(arg)
        if base == "macprovider" or (arg == "macprovider" and i > 0 and argv[i - 1] == "-m"):
            if argv[i + 1] == "serve":
                return True
    return False


@dataclass
class ForegroundServer:
    """A foreground `macprovider serve` process: pid, argv and working directory (for the restart)."""

    pid: int
    argv: list[str]
    cwd: str | None


def find_foreground_servers(exclude_pids: set[int] | None = None) -> list[ForegroundServer]:
    """Every `macprovider serve` process except this one, its ancestors and its descendants."""
    me = psutil.Process()
    excluded = {me.pid} | set(exclude_pids or ())
    excluded |= {p.pid for p in me.parents()}
    excluded |= {p.pid for p in me.children(recursive=True)}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if proc.info["pid"] in excluded or not is_serve_argv(argv):
                continue
            try:
                cwd = proc.cwd()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                cwd = None
            found.append(ForegroundServer(proc.info["pid"], list(argv), cwd))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@dataclass
class Conflicts:
    """What was found, and what was drained (so `restore` knows what to bring back)."""

    launchd: bool = False
    foreground: list[ForegroundServer] = field(default_factory=list)
    port_listener: bool = False
    port: int = 0
    drained_launchd: bool = False
    drained_foreground: list[ForegroundServer] = field(default_factory=list)
    restart_foreground: bool = False
    runner: Runner = default_runner
    restored: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return self.launchd or bool(self.foreground) or self.port_listener

    def names(self) -> list[str]:
        """`launchd-managed`, `foreground-PID-N`, `port-P-listener` — in that order."""
        out = ["launchd-managed"] if self.launchd else []
        out += [f"foreground-PID-{s.pid}" for s in self.foreground]
        if self.port_listener and not out:
            out.append(f"port-{self.port}-listener")
        return out

    def refusal(self) -> str:
        """The refusal line (docs/autotune.md#provider-conflict)."""
        return f"autotune: provider conflict: {', '.join(self.names())}; rerun with --drain to stop it first."

    def drain(self, grace: float) -> None:
        """Stop what was found: bootout the launchd job, SIGTERM (then SIGKILL) foreground servers, and
        wait up to `grace` s for the port. Raises ProviderConflict if the port stays busy."""
        if self.launchd:
            uid = os.getuid()
            self.runner(["launchctl", "bootout", f"gui/{uid}/{LAUNCHD_LABEL}"])
            self.drained_launchd = True
        procs = []
        for server in self.foreground:
            try:
                proc = psutil.Process(server.pid)
                proc.terminate()
                procs.append(proc)
                self.drained_foreground.append(server)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        if not wait_port_free(self.port, timeout=max(grace, 1.0)):
            raise ProviderConflict(
                f"autotune: provider conflict: port {self.port} is still in use after draining; "
                "stop whatever listens there or pick another --port."
            )

    def restore(self) -> None:
        """Bring back what was drained: bootstrap the launchd job; restart foreground servers when asked."""
        if self.drained_launchd:
            self.runner(["launchctl", "bootstrap", f"gui/{os.getuid()}", str(launchd_plist_path())])
            self.restored.append("launchd")
            self.drained_launchd = False
        if self.restart_foreground:
            for server in self.drained_foreground:
                subprocess.Popen(
                    server.argv,
                    cwd=server.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                self.restored.append(f"foreground:{' '.join(server.argv)}")
        self.drained_foreground = []


def detect(port: int, *, runner: Runner = default_runner, restart_foreground: bool = False) -> Conflicts:
    """Look for a running provider (launchd job, foreground serve processes, a listener on `port`)."""
    launchd = service_spec.launchd_job_loaded(runner)
    return Conflicts(
        launchd=launchd,
        foreground=find_foreground_servers(),
        port_listener=port_is_listening(port),
        port=port,
        restart_foreground=restart_foreground,
        runner=runner,
    )


def warn(message: str) -> None:
    print(message, file=sys.stderr)
