"""`macprovider service ...`: the launchd / systemd user service (docs/architecture.md#service).

    service print     [--manager launchd|systemd] [--config PATH]   the rendered plist / unit on stdout
    service install   write it, (re)load it, start it
    service uninstall stop it, remove it
    service start | stop | restart
    service status    [--json]   installed / loaded / running / pid / port / health; exit 0 running, 3 not

The service runs `<this python> -m macprovider serve --config <abs config path>` and reads its settings
from that file only: MACPROVIDER_* variables of the shell that installs it are not copied into it. Nothing
here imports MLX.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from macprovider.commands.common import fail, user_errors

app = typer.Typer(
    help="Install and control the background service (launchd on macOS, systemd on Linux).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

_MANAGER_HELP = "launchd or systemd [default: launchd on macOS, systemd on Linux]."
_CONFIG_HELP = "Config file the service serves with (default: MACPROVIDER_CONFIG or ~/.config/macprovider/config.yaml)."
ManagerOption = Annotated[str | None, typer.Option("--manager", help=_MANAGER_HELP)]
ConfigOption = Annotated[str | None, typer.Option("--config", help=_CONFIG_HELP)]


def _manager(name: str | None):
    from macprovider.service import managers as service_managers
    from macprovider.service import spec as service

    name = name or service.default_manager()
    if name not in ("launchd", "systemd"):
        raise fail(f"invalid --manager {name!r}: expected launchd or systemd", 2)
    return service_managers.get_manager(name)


def _settings(config: str | None):
    """(absolute config path, settings the service will see or None if the file is missing, warnings).

    The service's environment carries no MACPROVIDER_* variable, so they are left out here too."""
    from macprovider.core import config as cfg

    path, _explicit = cfg.config_path_for(config, os.environ)
    path = Path(os.path.abspath(path))
    if not path.exists():
        return path, None, ()
    service_env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
    resolved = cfg.resolve(env=service_env, cli_config=str(path))
    return path, resolved.settings, resolved.warnings


def _spec(config_path: Path, settings):
    from macprovider.core.config import Settings
    from macprovider.service import spec as service

    home = os.environ.get("HOME") or str(Path.home())
    drain = (settings or Settings()).drain_timeout_s
    return service.build_spec(python=sys.executable, config_path=config_path, home=home, drain_timeout_s=drain)


def _echo(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


@app.command("print")
def print_cmd(
    manager: ManagerOption = None,
    config: ConfigOption = None,
) -> None:
    """Write the rendered launchd plist or systemd unit to stdout (changes nothing)."""
    with user_errors():
        mgr = _manager(manager)
        path, settings, warnings = _settings(config)
        for warning in warnings:
            print(warning, file=sys.stderr)
        if settings is None:
            print(f"note: config file {path} does not exist yet (defaults used)", file=sys.stderr)
        sys.stdout.write(mgr.render(_spec(path, settings)).decode())


@app.command("install")
def install(
    manager: ManagerOption = None,
    config: ConfigOption = None,
) -> None:
    """Write the service file, replace any stale job, and start it (at every login from now on)."""
    from macprovider.core.errors import ServiceError

    with user_errors():
        mgr = _manager(manager)
        path, settings, warnings = _settings(config)
        for warning in warnings:
            print(warning, file=sys.stderr)
        if settings is None:
            raise ServiceError(
                f"config file {path} does not exist: create it (install.sh writes a commented default) or pass --config PATH"
            )
        if settings.model is None:
            print(
                f"warning: {path} sets no model: the service will fail to start until it does "
                "(`macprovider autotune --apply`, or `macprovider models demo` and `model: macprovider-demo/smollm2-135m`)",
                file=sys.stderr,
            )
        if os.environ.get("MACPROVIDER_API_KEY"):
            print(
                "note: MACPROVIDER_API_KEY is not copied into the service; set api_key_file (a 0600 file) in the config",
                file=sys.stderr,
            )
        spec = _spec(path, settings)
        _echo(mgr.install(spec))
    typer.echo(f"logs: {mgr.logs_hint(spec)}")
    typer.echo(f"check it: macprovider service status --manager {mgr.name}")


@app.command("uninstall")
def uninstall(manager: ManagerOption = None) -> None:
    """Stop the service and remove its file."""
    with user_errors():
        _echo(_manager(manager).uninstall())


@app.command("start")
def start(manager: ManagerOption = None) -> None:
    """Start the installed service."""
    with user_errors():
        _echo(_manager(manager).start())


@app.command("stop")
def stop(manager: ManagerOption = None) -> None:
    """Stop the service (launchd: unload it until the next login or `service start`)."""
    with user_errors():
        _echo(_manager(manager).stop())


@app.command("restart")
def restart(manager: ManagerOption = None) -> None:
    """Restart the service, e.g. after `macprovider autotune --apply` changed the config."""
    with user_errors():
        _echo(_manager(manager).restart())


@app.command("status")
def status(
    manager: ManagerOption = None,
    config: ConfigOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Is the service installed, loaded, running (pid), on which port, and healthy? Exit 0 if running, else 3."""
    from macprovider.core.config import Settings
    from macprovider.service import spec as service

    with user_errors():
        mgr = _manager(manager)
        path, settings, _warnings = _settings(config)
        settings = settings or Settings()
        state = mgr.status()
        spec = _spec(path, settings)
    health, body = service.check_health(settings.host, settings.port) if state.running else ("not checked", None)
    if as_json:
        payload = {
            "manager": state.manager,
            "file": state.path,
            "installed": state.installed,
            "loaded": state.loaded,
            "running": state.running,
            "pid": state.pid,
            "last_exit": state.last_exit,
            "config": str(path),
            "url": service.health_url(settings.host, settings.port).removesuffix("/health"),
            "health": health,
            "model": (body or {}).get("model"),
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(f"manager:   {state.manager}")
        typer.echo(f"file:      {state.path} ({'installed' if state.installed else 'not installed'})")
        typer.echo(f"loaded:    {'yes' if state.loaded else 'no'}" + (f"  {state.detail}" if state.detail else ""))
        running = f"yes (pid {state.pid})" if state.running and state.pid else ("yes" if state.running else "no")
        if state.last_exit not in (None, 0):
            running += f", last exit status {state.last_exit}"
        typer.echo(f"running:   {running}")
        typer.echo(f"config:    {path}")
        typer.echo(f"endpoint:  {service.health_url(settings.host, settings.port).removesuffix('/health')}")
        model = f" (model {body.get('model')})" if body and body.get("model") else ""
        typer.echo(f"health:    {health}{model}")
        typer.echo(f"logs:      {mgr.logs_hint(spec)}")
    raise typer.Exit(0 if state.running else 3)
