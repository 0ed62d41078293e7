"""`macprovider models ...`: the local model cache (SPEC.md §4) and the offline demo model (§9).

    models list [--json]      what is in the Hub cache, with sizes
    models pull ID            download (progress bar, resumable); clear errors for gated/absent/offline
    models verify ID          recompute every cached file's hash; names each mismatch, exit 1
    models rm ID [--yes]      delete the repo from the cache
    models demo               build a tiny local chat model into the cache (no download)
"""

from __future__ import annotations

import json
import sys
import time

import typer

from macprovider.commands.common import fail, user_errors

app = typer.Typer(help="Manage models in the local Hugging Face cache.", no_args_is_help=True)


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {cache_dir, models[{id, size_bytes, files, refs, revisions, path}]}."),
) -> None:
    """List the models in the local Hugging Face cache with their size on disk."""
    from macprovider.models import hub_cache

    with user_errors():
        listing = hub_cache.list_models()
    for warning in listing.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if as_json:
        payload = {
            "cache_dir": str(listing.cache_dir),
            "models": [
                {
                    "id": m.repo_id,
                    "size_bytes": m.size_bytes,
                    "files": m.nb_files,
                    "refs": list(m.refs),
                    "revisions": list(m.revisions),
                    "path": str(m.path),
                }
                for m in listing.models
            ],
            "incomplete_bytes": listing.incomplete_bytes,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    if not listing.models:
        typer.echo(f"no models in {listing.cache_dir}")
        typer.echo("download one with `macprovider models pull ORG/NAME`, or build the offline demo: `macprovider models demo`")
        return
    width = max(len("MODEL"), *(len(m.repo_id) for m in listing.models))
    typer.echo(f"{'MODEL':<{width}}  {'SIZE':>9}  {'FILES':>5}  MODIFIED")
    for m in listing.models:
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_modified))
        typer.echo(f"{m.repo_id:<{width}}  {hub_cache.format_size(m.size_bytes):>9}  {m.nb_files:>5}  {modified}")
    total = sum(m.size_bytes for m in listing.models)
    typer.echo(f"{len(listing.models)} model(s), {hub_cache.format_size(total)} in {listing.cache_dir}")
    if listing.incomplete_bytes:
        typer.echo(
            f"partial downloads: {hub_cache.format_size(listing.incomplete_bytes)} "
            "(run `macprovider models pull ID` again to resume)"
        )


@app.command("pull")
def pull(model: str = typer.Argument(..., help="Hub id org/name, e.g. mlx-community/Llama-3.2-1B-Instruct-4bit.")) -> None:
    """Download a model into the Hugging Face cache (resumable; only what mlx-lm loads)."""
    from macprovider.models import hub_cache

    with user_errors():
        path = hub_cache.pull_model(model)
    typer.echo(f"{model} is in the cache at {path}")
    typer.echo(f"serve it with: macprovider serve --model {model}")


@app.command("verify")
def verify(model: str = typer.Argument(..., help="Hub id org/name of a cached model.")) -> None:
    """Recompute every cached file's hash and compare it with the hash the cache recorded.

    Exit 0 when every file matches, 1 naming each file that does not.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from macprovider.models import hub_cache

    with user_errors():
        repo, files = hub_cache.verify_plan(model)
        total = sum(p.stat().st_size for p in files if p.exists())
        progress = Progress(
            TextColumn("verifying"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            transient=True, console=None, disable=not sys.stderr.isatty(),
        )
        with progress:
            task = progress.add_task("verify", total=total)
            report = hub_cache.verify_model(model, on_bytes=lambda n: progress.advance(task, n))
    checked = [f for f in report.files if f.status != "unverifiable"]
    for f in report.files:
        if f.status == "unverifiable":
            print(f"warning: {f.name} (revision {f.revision[:12]}) is not a hash-named blob: not checked", file=sys.stderr)
    if report.ok:
        typer.echo(f"{model}: {len(checked)} file(s) verified, all hashes match")
        return
    for f in report.bad:
        if f.status == "missing":
            print(f"MISSING   {f.name} (revision {f.revision[:12]}): blob {f.expected} is gone", file=sys.stderr)
        else:
            print(
                f"MISMATCH  {f.name} (revision {f.revision[:12]}): {f.algorithm} is {f.actual}, the cache recorded {f.expected}",
                file=sys.stderr,
            )
    raise fail(
        f"{model}: {len(report.bad)} of {len(report.files)} file(s) do not match; re-download with "
        f"`macprovider models rm {model}` then `macprovider models pull {model}`",
        1,
    )


@app.command("rm")
def rm(
    model: str = typer.Argument(..., help="Hub id org/name of a cached model."),
) -> None:
    """Delete a model (all its cached revisions) from the Hugging Face cache."""
    from macprovider.models import hub_cache

    with user_errors():
        freed = hub_cache.remove_model(model)
    typer.echo(f"removed {model} from the cache ({hub_cache.format_size(freed)} freed)")


@app.command("demo")
def demo(
    repo_id: str = typer.Option("macprovider-demo/tiny-chat", "--id", help="Model id to install it as."),
) -> None:
    """Build a tiny random-weight chat model locally and put it in the Hub cache (no download).

    Then: `macprovider serve --model macprovider-demo/tiny-chat`.
    """
    from macprovider.models.demo import create_demo_model
    from macprovider.errors import InvalidModelId
    from macprovider.models.ids import is_hub_id

    with user_errors():
        if not is_hub_id(repo_id):
            raise InvalidModelId(f"invalid --id {repo_id!r}: expected org/name (parts of [A-Za-z0-9._-])")
        snapshot = create_demo_model(repo_id)
    typer.echo(f"demo model {repo_id} installed at {snapshot}")
    typer.echo(f"serve it with: macprovider serve --model {repo_id}")
