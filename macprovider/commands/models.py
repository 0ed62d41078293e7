"""`macprovider models ...`: the local model cache (SPEC.md §4) and the offline demo model (§9)."""

from __future__ import annotations

import typer

from macprovider.commands.common import user_errors

app = typer.Typer(help="Manage models in the local Hugging Face cache.", no_args_is_help=True)


@app.command("demo")
def demo(
    repo_id: str = typer.Option("macprovider-demo/tiny-chat", "--id", help="Model id to install it as."),
) -> None:
    """Build a tiny random-weight chat model locally and put it in the Hub cache (no download).

    Then: `macprovider serve --model macprovider-demo/tiny-chat`.
    """
    from macprovider.demo import create_demo_model

    with user_errors():
        snapshot = create_demo_model(repo_id)
    typer.echo(f"demo model {repo_id} installed at {snapshot}")
    typer.echo(f"serve it with: macprovider serve --model {repo_id}")
