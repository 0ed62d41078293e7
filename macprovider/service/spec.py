"""The background service: one `ServiceSpec`, two renderers, two managers (docs/architecture.md#service).

`build_spec()` describes the job once — `<python> -m macprovider serve --config <abs path>`, restart on
failure only, a stop timeout longer than `drain_timeout_s`, logs, a minimal environment with no secret —
and `render_plist()` (launchd LaunchAgent, via `plistlib`) / `render_systemd_unit()` (systemd user unit)
turn it into the file each manager reads. `LaunchdManager` / `SystemdManager` install, uninstall, start,
stop, restart and report status; every `launchctl` / `systemctl` call goes through an injected
`Runner` (`argv -> subprocess.CompletedProcess[str]`), as Homebrew's `brew services` does, so tests record
the exact argv sequences with a fake executable on PATH.

Helpers autotune's provider-conflict handling (docs/autotune.md#provider-conflict) may call with its own
runner:
`launchd_job_loaded(runner)`, `launchd_bootout(runner)`, `launchd_bootstrap(runner)`.

launchd semantics used here (launchd.plist(5), launchctl(1)): `KeepAlive {SuccessfulExit: false}`
restarts the job only after a non-zero exit (serve exits 0 after a SIGTERM drain, non-zero when its
generation thread dies); `ThrottleInterval` 10 s spaces restarts; `ExitTimeOut` is how long launchd waits
after SIGTERM before SIGKILL, so it must exceed the drain timeout.
"""

from __future__ import annotations

import math
import os
import platform
import plistlib
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from macprovider.core.errors import ServiceError
from macprovider.core.files import write_atomic

LABEL = "live.streamvc.macprovider"
SYSTEMD_UNIT = "macprovider.service"
LOG_FILE_NAME = "macprovider.log"
# Stop timeout margin over drain_timeout_s: time to cancel what is left, flush logs and free the model.
EXIT_TIMEOUT_MARGIN_S = 15
THROTTLE_INTERVAL_S = 10
# Environment variables copied into the service (where serve finds models). Never keys or tokens.
CARRIED_ENV = ("HF_HOME", "HF_HUB_CACHE")

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def default_runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` (found on PATH), capturing text output, 30 s timeout. A missing binary is exit 127."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{' '.join(argv)}: timed out after 30 s")


def default_manager() -> str:
    """`launchd` on macOS, `systemd` elsewhere."""
    return "launchd" if platform.system() == "Darwin" else "systemd"


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs and how; manager-neutral. Paths are absolute strings; times in seconds."""

    label: str
    description: str
    program_arguments: tuple[str, ...]
    working_directory: str
    log_path: str
    exit_timeout_s: int
    throttle_interval_s: int = THROTTLE_INTERVAL_S
    environment: tuple[tuple[str, str], ...] = field(default=())


def exit_timeout_for(drain_timeout_s: float) -> int:
    """Seconds a manager waits after SIGTERM before SIGKILL: ceil(drain_timeout_s) + 15."""
    return int(math.ceil(drain_timeout_s)) + EXIT_TIMEOUT_MARGIN_S


def carried_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the service gets: PYTHONUNBUFFERED=1 (logs reach the file as they happen) plus the
    Hub cache location (`CARRIED_ENV`) if set, as absolute paths. Never MACPROVIDER_API_KEY or HF_TOKEN."""
    env = os.environ if env is None else env
    carried = {"PYTHONUNBUFFERED": "1"}
    for name in CARRIED_ENV:
        if env.get(name):
            carried[name] = os.path.abspath(os.path.expanduser(env[name]))
    return carried


def launchd_plist_path(home: Path) -> Path:
    """~/Library/LaunchAgents/live.streamvc.macprovider.plist."""
    return Path(home) / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def launchd_log_dir(home: Path) -> Path:
    """~/Library/Logs/macprovider."""
    return Path(home) / "Library" / "Logs" / "macprovider"


def systemd_unit_path(home: Path, env: Mapping[str, str] | None = None) -> Path:
    """$XDG_CONFIG_HOME/systemd/user/macprovider.service (XDG_CONFIG_HOME defaults to ~/.config)."""
    env = os.environ if env is None else env
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path(home) / ".config"
    return base / "systemd" / "user" / SYSTEMD_UNIT


def build_spec(
    *,
    python: str,
    config_path: str | Path,
    home: str | Path,
    drain_timeout_s: float,
    environment: Mapping[str, str] | None = None,
    log_dir: str | Path | None = None,
) -> ServiceSpec:
    """The service for `<python> -m macprovider serve --config <config_path>`.

    `python` and `config_path` are made absolute (`~` expanded, symlinks kept: a venv's python must stay the
    venv's). `environment` defaults to `carried_environment()`. Logs go to `log_dir` (default
    ~/Library/Logs/macprovider) / macprovider.log.
    """
    home = os.path.abspath(os.path.expanduser(str(home)))
    python = os.path.abspath(os.path.expanduser(str(python)))
    config = os.path.abspath(os.path.expanduser(str(config_path)))
    logs = os.path.abspath(os.path.expanduser(str(log_dir))) if log_dir else str(launchd_log_dir(Path(home)))
    env = carried_environment() if environment is None else dict(environment)
    return ServiceSpec(
        label=LABEL,
        description="macprovider: local OpenAI-compatible inference provider (MLX)",
        program_arguments=(python, "-m", "macprovider", "serve", "--config", config),
        working_directory=home,
        log_path=os.path.join(logs, LOG_FILE_NAME),
        exit_timeout_s=exit_timeout_for(drain_timeout_s),
        environment=tuple(sorted(env.items())),
    )


def render_plist(spec: ServiceSpec) -> bytes:
    """The LaunchAgent property list (XML, keys sorted) for `spec`."""
    job: dict[str, object] = {
        "Label": spec.label,
        "ProgramArguments": list(spec.program_arguments),
        "WorkingDirectory": spec.working_directory,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": spec.throttle_interval_s,
        "ExitTimeOut": spec.exit_timeout_s,
        # Serving answers the user's own requests: not a throttled background job.
        "ProcessType": "Interactive",
        "StandardOutPath": spec.log_path,
        "StandardErrorPath": spec.log_path,
    }
    if spec.environment:
        job["EnvironmentVariables"] = dict(spec.environment)
    return plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=True)


def _systemd_quote(arg: str) -> str:
    """One ExecStart word / Environment value, quoted per systemd.syntax(7) and systemd.service(5):
    `%` -> `%%` (specifiers), `$` -> `$$` (variable expansion), double quotes around words with spaces."""
    value = arg.replace("%", "%%").replace("$", "$$")
    if any(ch in value for ch in " \t\"\\'") or value == "":
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def render_systemd_unit(spec: ServiceSpec) -> str:
    """The systemd user unit for `spec`: Restart=on-failure, RestartSec, TimeoutStopSec, journal logs."""
    lines = [
        "[Unit]",
        f"Description={spec.description}",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in spec.program_arguments),
        f"WorkingDirectory={_systemd_quote(spec.working_directory)}",
    ]
    lines += [f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in spec.environment]
    lines += [
        "Restart=on-failure",
        f"RestartSec={spec.throttle_interval_s}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={spec.exit_timeout_s}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write `data` to `path` with `mode` (`macprovider.core.files.write_atomic`: temp file, fsync, rename).
    Returns False, touching nothing, when the file already holds exactly `data` with that mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    write_atomic(path, data, mode)
    return True


# ---- launchd helpers (also for autotune's provider conflict) --------------------------------------------


def parse_launchctl_list(output: str, label: str = LABEL) -> tuple[bool, int | None, int | None]:
    """Parse `launchctl list` (`PID<TAB>Status<TAB>Label` rows, `-` for none) for `label`:
    (loaded, pid or None, last exit status or None)."""
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == label:
            pid = int(parts[0]) if parts[0].isdigit() else None
            try:
                status = int(parts[1])
            except ValueError:
                status = None
            return True, pid, status
    return False, None, None


def launchd_job_loaded(runner: Runner = default_runner, label: str = LABEL) -> bool:
    """Whether the launchd job `label` is loaded in this user's domain (`launchctl list`). False when
    launchctl is missing or fails."""
    result = runner(["launchctl", "list"])
    return result.returncode == 0 and parse_launchctl_list(result.stdout, label)[0]


def launchd_bootout(runner: Runner = default_runner, *, uid: int | None = None, label: str = LABEL) -> bool:
    """`launchctl bootout gui/<uid>/<label>`: stop and unload the job (launchd sends SIGTERM and waits
    ExitTimeOut). Returns True if it was unloaded, False if it was not loaded; ServiceError otherwise."""
    uid = os.getuid() if uid is None else uid
    result = runner(["launchctl", "bootout", f"gui/{uid}/{label}"])
    if result.returncode == 0:
        return True
    text = f"{result.stdout} {result.stderr}".lower()
    # "Boot-out failed: 3: No such process" / "Could not find specified service" (113): not loaded.
    if result.returncode in (3, 113) or "no such process" in text or "could not find" in text or "not loaded" in text:
        return False
    raise ServiceError(_failed("launchctl bootout", result))


def launchd_bootstrap(
    runner: Runner = default_runner, *, uid: int | None = None, plist: Path | None = None, home: Path | None = None
) -> None:
    """`launchctl bootstrap gui/<uid> <plist>`: load the job (RunAtLoad starts it). ServiceError on failure."""
    uid = os.getuid() if uid is None else uid
    plist = plist or launchd_plist_path(home or Path(os.environ.get("HOME") or Path.home()))
    result = runner(["launchctl", "bootstrap", f"gui/{uid}", str(plist)])
    if result.returncode != 0:
        raise ServiceError(
            _failed("launchctl bootstrap", result)
            + f"; if the job is half-loaded, run `launchctl bootout gui/{uid}/{LABEL}` and try again"
        )


def _failed(what: str, result: subprocess.CompletedProcess[str]) -> str:
    detail = " ".join(f"{result.stderr} {result.stdout}".split())[:400] or "no output"
    if result.returncode == 127:
        tool = what.split()[0]
        hint = (
            "launchd runs only on macOS: use --manager systemd" if tool == "launchctl" else "systemd is not installed"
        )
        return f"{tool} not found ({hint})"
    return f"{what} failed (exit {result.returncode}): {detail}"


def health_url(host: str, port: int) -> str:
    """`http://<host>:<port>/v1/health`, with a wildcard bind checked on loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/v1/health"


def check_health(host: str, port: int, timeout_s: float = 1.5) -> tuple[str, dict | None]:
    """GET /v1/health: (`status` from the body, e.g. `ready`, or `unreachable (<reason>)`, and the body)."""
    import httpx

    url = health_url(host, port)
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"unreachable ({exc.__class__.__name__})", None
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code} (not a macprovider health body)", None
    if not isinstance(body, dict):
        return f"HTTP {response.status_code}", None
    return str(body.get("status") or f"HTTP {response.status_code}"), body
