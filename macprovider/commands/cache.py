"""`macprovider cache ls|clear`: the prompt cache's files on disk (`prompt_cache_dir`)."""

from __future__ import annotations

import json
import sys
import time

import typer

from macprovider.commands.common import user_errors

app = typer.Typer(help="Show or empty the prompt cache on disk.", no_args_is_help=True, rich_markup_mode=None)

CONFIG_HELP = "Config file (default: MACPROVIDER_CONFIG or ~/.config/macprovider/config.yaml)."


def _directory(config: str | None):
    from pathlib import Path

    from macprovider.core import config as cfg

    with user_errors():
        resolved = cfg.resolve(cli_config=config)
    for warning in resolved.warnings:
        print(warning, file=sys.stderr)
    return Path(str(resolved.settings.prompt_cache_dir)), resolved.settings.prompt_cache_disk_bytes


@app.command("ls")
def ls(
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: {directory, budget_bytes, total_bytes, entries[]}."
    ),
    config: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """List the cached prompts: model, revision, weights dtype, kv-bits, tokens, size and last use."""
    from macprovider.engine.disk_cache import scan
    from macprovider.models.hub_cache import format_size

    directory, budget = _directory(config)
    entries = sorted(scan(directory, with_metadata=True), key=lambda entry: entry.last_used, reverse=True)
    total = sum(entry.size for entry in entries)
    if as_json:
        payload = {
            "directory": str(directory),
            "budget_bytes": budget,
            "total_bytes": total,
            "entries": [
                {
                    "model": e.model,
                    "revision": e.revision,
                    "weights_dtype": e.weights_dtype,
                    "kv_bits": None if e.kv_bits in ("", "None") else int(e.kv_bits),
                    "tokens": e.tokens,
                    "size_bytes": e.size,
                    "last_used": round(e.last_used, 3),
                    "valid": e.valid,
                    "path": str(e.path),
                }
                for e in entries
            ],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"prompt cache: {directory} ({len(entries)} entries, {format_size(total)} of {format_size(budget)})")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        kv = "kv-bits " + e.kv_bits if e.kv_bits not in ("", "None") else "full-precision KV"
        what = f"{e.model} ({e.weights_dtype}, {kv})" if e.valid else "(unreadable: removed on next use)"
        typer.echo(f"  {format_size(e.size):>10}  {e.tokens:>7} tokens  {used}  {what}")


@app.command("clear")
def clear(config: str | None = typer.Option(None, "--config", help=CONFIG_HELP)) -> None:
    """Delete every cached prompt in the directory (a running server rebuilds entries as it serves)."""
    from macprovider.engine import disk_cache
    from macprovider.models.hub_cache import format_size

    directory, _ = _directory(config)
    removed, freed = disk_cache.clear(directory)
    typer.echo(f"removed {removed} cached prompt(s) from {directory} ({format_size(freed)} freed)")
