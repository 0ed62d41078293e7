"""Service managers: install / uninstall / start / stop / restart / status of the service file that
`macprovider.service.spec` renders, for launchd (a LaunchAgent in the `gui/<uid>` domain) and systemd (a user
unit). Every `launchctl` / `systemctl` call goes through the injected `Runner`.

launchd (launchctl(1)): install = write plist 0644, `bootout gui/<uid>/<label>` (a stale job; "not loaded"
is fine), `bootstrap gui/<uid> <plist>`; uninstall = bootout + remove; start = `kickstart` (or bootstrap
when unloaded); stop = bootout; restart = `kickstart -k`; status = `launchctl list`.
systemd (systemctl(1)): install = write unit, `daemon-reload`, `enable`, `restart`; uninstall =
`disable --now`, remove, `daemon-reload`; start/stop/restart; status = `show --property=…`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from macprovider.core.errors import ServiceError
from macprovider.service.spec import (
    LABEL,
    SYSTEMD_UNIT,
    Runner,
    ServiceSpec,
    _failed,
    default_runner,
    launchd_bootout,
    launchd_bootstrap,
    launchd_plist_path,
    parse_launchctl_list,
    render_plist,
    render_systemd_unit,
    systemd_unit_path,
    write_file_atomic,
)


@dataclass
class ServiceStatus:
    """What `service status` reports. `pid`/`last_exit` are None when unknown."""

    manager: str
    path: str
    installed: bool
    loaded: bool
    running: bool
    pid: int | None = None
    last_exit: int | None = None
    detail: str = ""


class LaunchdManager:
    """The LaunchAgent in the `gui/<uid>` domain, through `runner`."""

    name = "launchd"

    def __init__(self, runner: Runner, home: Path, uid: int) -> None:
        self.runner, self.home, self.uid = runner, Path(home), uid
        self.path = launchd_plist_path(self.home)
        self.target = f"gui/{uid}/{LABEL}"

    def render(self, spec: ServiceSpec) -> bytes:
        return render_plist(spec)

    def logs_hint(self, spec: ServiceSpec) -> str:
        return f"tail -f {spec.log_path}"

    def _loaded(self) -> tuple[bool, int | None, int | None]:
        result = self.runner(["launchctl", "list"])
        if result.returncode != 0:
            raise ServiceError(_failed("launchctl list", result))
        return parse_launchctl_list(result.stdout)

    def install(self, spec: ServiceSpec) -> list[str]:
        """Write the plist (0644), boot out a stale job, bootstrap the new one."""
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        changed = write_file_atomic(self.path, render_plist(spec), 0o644)
        launchd_bootout(self.runner, uid=self.uid)
        launchd_bootstrap(self.runner, uid=self.uid, plist=self.path)
        return [f"{'wrote' if changed else 'unchanged'} {self.path}", f"loaded {self.target}"]

    def uninstall(self) -> list[str]:
        """Boot out the job and remove the plist."""
        unloaded = launchd_bootout(self.runner, uid=self.uid)
        removed = self.path.exists()
        self.path.unlink(missing_ok=True)
        return [
            f"{'unloaded' if unloaded else 'was not loaded:'} {self.target}",
            f"{'removed' if removed else 'no file at'} {self.path}",
        ]

    def _require_installed(self) -> None:
        if not self.path.exists():
            raise ServiceError(
                f"the service is not installed ({self.path} is missing): run `macprovider service install`"
            )

    def start(self) -> list[str]:
        self._require_installed()
        if self._loaded()[0]:
            self._check(["launchctl", "kickstart", self.target])
            return [f"started {self.target}"]
        launchd_bootstrap(self.runner, uid=self.uid, plist=self.path)
        return [f"loaded and started {self.target}"]

    def stop(self) -> list[str]:
        unloaded = launchd_bootout(self.runner, uid=self.uid)
        return [
            f"stopped {self.target} (it starts again at login or with `macprovider service start`)"
            if unloaded
            else f"{self.target} was not running"
        ]

    def restart(self) -> list[str]:
        self._require_installed()
        if self._loaded()[0]:
            self._check(["launchctl", "kickstart", "-k", self.target])
            return [f"restarted {self.target}"]
        launchd_bootstrap(self.runner, uid=self.uid, plist=self.path)
        return [f"loaded and started {self.target}"]

    def status(self) -> ServiceStatus:
        loaded, pid, last_exit = self._loaded()
        return ServiceStatus(self.name, str(self.path), self.path.exists(), loaded, pid is not None, pid, last_exit)

    def _check(self, argv: list[str]) -> None:
        result = self.runner(argv)
        if result.returncode != 0:
            raise ServiceError(_failed(" ".join(argv[:2]), result))


class SystemdManager:
    """The systemd user unit (`systemctl --user`), through `runner`."""

    name = "systemd"

    def __init__(self, runner: Runner, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.runner, self.home = runner, Path(home)
        self.path = systemd_unit_path(self.home, env)

    def render(self, spec: ServiceSpec) -> bytes:
        return render_systemd_unit(spec).encode()

    def logs_hint(self, spec: ServiceSpec) -> str:
        return f"journalctl --user -u {SYSTEMD_UNIT} -f"

    def _systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.runner(["systemctl", "--user", *args])
        if check and result.returncode != 0:
            message = _failed(f"systemctl --user {args[0]}", result)
            if "bus" in (result.stderr or "").lower():
                message += (
                    "; no systemd user session is running (containers, some ssh logins): run "
                    "`loginctl enable-linger $USER` and log in again, or run `macprovider serve` in the foreground"
                )
            raise ServiceError(message)
        return result

    def install(self, spec: ServiceSpec) -> list[str]:
        """Write the unit (0644), reload systemd, enable it at login and (re)start it."""
        changed = write_file_atomic(self.path, render_systemd_unit(spec).encode(), 0o644)
        self._systemctl("daemon-reload")
        self._systemctl("enable", SYSTEMD_UNIT)
        self._systemctl("restart", SYSTEMD_UNIT)
        return [f"{'wrote' if changed else 'unchanged'} {self.path}", f"enabled and started {SYSTEMD_UNIT}"]

    def uninstall(self) -> list[str]:
        """Disable and stop the unit, remove it, reload systemd."""
        self._systemctl("disable", "--now", SYSTEMD_UNIT, check=self.path.exists())
        removed = self.path.exists()
        self.path.unlink(missing_ok=True)
        self._systemctl("daemon-reload")
        return [f"disabled {SYSTEMD_UNIT}", f"{'removed' if removed else 'no file at'} {self.path}"]

    def _require_installed(self) -> None:
        if not self.path.exists():
            raise ServiceError(
                f"the service is not installed ({self.path} is missing): run `macprovider service install`"
            )

    def start(self) -> list[str]:
        self._require_installed()
        self._systemctl("start", SYSTEMD_UNIT)
        return [f"started {SYSTEMD_UNIT}"]

    def stop(self) -> list[str]:
        self._systemctl("stop", SYSTEMD_UNIT)
        return [f"stopped {SYSTEMD_UNIT}"]

    def restart(self) -> list[str]:
        self._require_installed()
        self._systemctl("restart", SYSTEMD_UNIT)
        return [f"restarted {SYSTEMD_UNIT}"]

    def status(self) -> ServiceStatus:
        result = self._systemctl(
            "show", SYSTEMD_UNIT, "--property=LoadState,ActiveState,SubState,MainPID,ExecMainStatus"
        )
        props = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        pid = int(props.get("MainPID", "0") or 0) or None
        status = props.get("ExecMainStatus", "")
        return ServiceStatus(
            self.name,
            str(self.path),
            self.path.exists(),
            loaded=props.get("LoadState") == "loaded",
            running=props.get("ActiveState") == "active",
            pid=pid,
            last_exit=int(status) if status.isdigit() else None,
            detail=f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})",
        )


def get_manager(
    name: str, runner: Runner = default_runner, home: Path | None = None, env: Mapping[str, str] | None = None
) -> LaunchdManager | SystemdManager:
    """The manager called `name` (`launchd` or `systemd`); ServiceError for anything else."""
    env = os.environ if env is None else env
    home = Path(home) if home is not None else Path(env.get("HOME") or Path.home())
    if name == "launchd":
        return LaunchdManager(runner, home, os.getuid())
    if name == "systemd":
        return SystemdManager(runner, home, env)
    raise ServiceError(f"unknown service manager {name!r}: expected launchd or systemd")
