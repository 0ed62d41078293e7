"""`macprovider service ...`: the launchd / systemd user service (SPEC.md §6)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Install and control the background service.", no_args_is_help=True)
