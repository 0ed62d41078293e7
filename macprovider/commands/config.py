"""`macprovider config show [--json]`: the resolved settings and where each came from (docs/configuration.md)."""

from __future__ import annotations

import json
import sys

import typer

from macprovider.commands.common import user_errors

app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True, rich_markup_mode=None)


@app.command("show")
def show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {settings, sources, config_path}."),
    config: str | None = typer.Option(
        None, "--config", help="Config file (default: MACPROVIDER_CONFIG or ~/.config/macprovider/config.yaml)."
    ),
) -> None:
    """Print every setting with its value and source (cli, env:NAME, yaml:PATH, default, ram-tier)."""
    from macprovider.core import config as cfg

    with user_errors():
        resolved = cfg.resolve(cli_config=config)
    for warning in resolved.warnings:
        print(warning, file=sys.stderr)
    values = resolved.settings.model_dump(mode="json")
    if as_json:
        payload = {
            "config_path": str(resolved.config_path) if resolved.config_path else None,
            "settings": values,
            "sources": resolved.sources,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"config file: {resolved.config_path or '(none: defaults)'}")
    width = max(len(name) for name in values)
    for name, value in values.items():
        shown = "unset" if value is None else value
        typer.echo(f"{name:<{width}}  {shown!s:<24}  ({resolved.sources[name]})")
