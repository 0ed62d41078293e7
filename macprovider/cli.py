"""The `macprovider` command line: a typer app assembled from one module per command family.

Thin by design: each command parses its flags, resolves configuration, makes one core call, and maps
`MacproviderError` to a one-line message on stderr and its exit code (`macprovider.core.errors`). MLX and
mlx-lm are imported inside command bodies only, so `--help`, `config` and `service` stay fast.
"""

from __future__ import annotations

import typer

from macprovider import __version__
from macprovider.commands import autotune, cache, cluster, config, fleet, models, serve, service

app = typer.Typer(
    name="macprovider",
    help="A local OpenAI-compatible inference provider on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say "[default: …]"; rich markup would swallow the brackets
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"macprovider {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """A local OpenAI-compatible inference provider on MLX."""


app.command("serve")(serve.serve)
app.command("autotune")(autotune.autotune)
app.command("ps")(fleet.ps)
app.command("load")(fleet.load)
app.command("unload")(fleet.unload)
app.add_typer(config.app, name="config")
app.add_typer(models.app, name="models")
app.add_typer(service.app, name="service")
app.add_typer(cluster.app, name="cluster")
app.add_typer(cache.app, name="cache")


def main() -> None:
    """Console-script entry point."""
    app()
