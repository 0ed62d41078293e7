"""`macprovider serve`: the OpenAI-compatible HTTP endpoint (docs/api.md)."""

from __future__ import annotations

import sys
from typing import Any

import typer

from macprovider.commands.common import user_errors


# Long only for its typer option declarations; the work is in _plan and _serve_plan.
def serve(
    model: list[str] | None = typer.Option(
        None,
        "--model",
        metavar="MODEL",
        help=(
            "Hub id org/name (from the local cache) or a local directory; repeat it to serve several models, "
            "loaded on demand."
        ),
    ),
    host: str | None = typer.Option(None, "--host", help="Address to bind [default: 127.0.0.1]."),
    port: str | None = typer.Option(None, "--port", help="Port to listen on [default: 8080]."),
    kv_bits: str | None = typer.Option(
        None, "--kv-bits", help="Quantize the KV cache to 4 or 8 bits [default: unset]."
    ),
    max_context: str | None = typer.Option(
        None, "--max-context", help="Max prompt+generation tokens per request [default: by RAM tier]."
    ),
    max_batch: str | None = typer.Option(
        None, "--max-batch", help="Sequences decoded together (continuous batching) [default: 1]."
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="debug, info, warning, error."),
    api_key_file: str | None = typer.Option(None, "--api-key-file", help="File (mode 0600) holding the API key."),
    drain_timeout: str | None = typer.Option(
        None, "--drain-timeout", help="Seconds to let requests finish on SIGTERM [default: 30]."
    ),
    weights_dtype: str | None = typer.Option(
        None,
        "--weights-dtype",
        help="auto (on MLX's CPU backend: float32 when it fits in half the free memory, else quantized-float32 for a quantized model), native, quantized-float32 (quantized layers kept, float32 scales and activations), float32, float16, bfloat16 [default: auto].",
    ),
    speculative: str | None = typer.Option(
        None,
        "--speculative",
        help="off, or prompt-lookup: draft tokens from each request's own context, verified inside the batch [default: off].",
    ),
    speculative_tokens: str | None = typer.Option(
        None, "--speculative-tokens", help="Most draft tokens one sequence verifies per step, 1..16 [default: 4]."
    ),
    parallel: str | None = typer.Option(
        None,
        "--parallel",
        help="Under mlx.launch: split the model over the ranks by pipeline or tensor [default: unset, one process].",
    ),
    config: str | None = typer.Option(
        None, "--config", help="Config file (default: MACPROVIDER_CONFIG or ~/.config/macprovider/config.yaml)."
    ),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    cli_values = {
        "model": model[0] if model else None,
        "models": list(model) if model and len(model) > 1 else None,
        "host": host,
        "port": port,
        "kv_bits": kv_bits,
        "max_context_override": max_context,
        "max_concurrency_override": max_batch,
        "log_level": log_level,
        "api_key_file": api_key_file,
        "drain_timeout_s": drain_timeout,
        "weights_dtype": weights_dtype,
        "speculative": speculative,
        "speculative_tokens": speculative_tokens,
        "parallel": parallel,
    }
    plan, lockstep = _plan(cli_values, config)
    code = _serve_plan(plan, lockstep)
    _exit(code)


def _plan(cli_values: dict[str, Any], config: str | None) -> tuple[Any, Any]:
    """Resolve the settings (a fleet config is served, and exits, here), plan the serve and, with --parallel,
    join the rank group: `(plan, lockstep or None)`."""
    from macprovider.core import config as cfg
    from macprovider.serve.preflight import plan_serve

    with user_errors():
        resolved = cfg.resolve(cli_values, cli_config=config)
        for warning in resolved.warnings:
            print(warning, file=sys.stderr)
        if fleet_mode(resolved):
            code = serve_fleet(resolved)
            _exit(code)
        plan = plan_serve(resolved)
        lockstep = None
        if plan.settings.parallel:
            from macprovider.engine.distributed import start_group
            from macprovider.models.ids import read_model_config

            lockstep = start_group(
                plan.settings.parallel, read_model_config(plan.model_path), plan.model_id, plan.settings.rank_timeout_s
            )
    return plan, lockstep


def _serve_plan(plan: Any, lockstep: Any) -> int:
    """Build the engine for the planned model (embedding or generation) and serve it (rank 0) or follow
    (other ranks); the exit code."""
    from macprovider.models.embedding import model_kind
    from macprovider.serve import run_server

    if model_kind(plan.model_path) == "embedding":  # serves /v1/embeddings; the chat routes answer 400
        from macprovider.engine.embedding import EmbeddingEngine

        with user_errors():
            if lockstep is not None:
                from macprovider.core.errors import ConfigError

                raise ConfigError(f"parallel {plan.settings.parallel!r}: an embedding model is served by one process")
            engine: Any = EmbeddingEngine(plan)
    else:
        from macprovider.engine.engine import Engine

        engine = Engine(plan, lockstep)
    if lockstep is not None and lockstep.rank != 0:
        from macprovider.engine.distributed import run_follower
        from macprovider.serve.runtime import configure_logging

        configure_logging(plan.settings.log_level)
        code = run_follower(engine)
    else:
        code = run_server(plan, engine)
        if hasattr(engine, "flush_prompt_cache"):  # entries still queued for the prompt cache's disk tier
            engine.flush_prompt_cache()
        if lockstep is not None and code == 0 and not lockstep.failure():
            engine.close()  # the generation thread tells the followers to stop
    return code


def _exit(code: int) -> None:
    # MLX's C++ runtime aborts in static destructors ("terminate called without an active exception")
    # when the interpreter finalizes with the generation thread's streams alive. Everything is drained
    # and flushed at this point, so leave without running them: the exit status stays truthful.
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fleet_mode(resolved: object) -> bool:
    """Whether the resolved config asks for several models (or one with knobs of its own): a fleet."""
    from macprovider.serve.preflight import is_fleet

    return is_fleet(resolved)  # type: ignore[arg-type]


def _mlx_active_bytes() -> int:
    """MLX's active memory (bytes, the whole process): what a model's load adds is its measured size."""
    import mlx.core as mx

    return int(mx.get_active_memory())


def serve_fleet(resolved: object) -> int:
    """Serve the fleet the config lists: check every model, estimate each one's memory, then serve with models
    loaded on demand (pinned ones at start). The exit code. Raises MacproviderError (preflight)."""
    import psutil

    from macprovider.core.config import GIB, ResolvedConfig
    from macprovider.core.errors import ConfigError
    from macprovider.engine.factory import load_engine, release_engine
    from macprovider.models.memory import default_budget_bytes
    from macprovider.serve import run_server
    from macprovider.serve.fleet import ServeFleet
    from macprovider.serve.preflight import plan_fleet

    assert isinstance(resolved, ResolvedConfig)
    settings = resolved.settings
    if settings.parallel:
        raise ConfigError(
            f"invalid parallel {settings.parallel!r} (from {resolved.sources['parallel']}): a distributed group serves "
            "one model; list one model or unset parallel"
        )
    process = psutil.Process()
    if settings.memory_budget_gb is not None:
        budget = int(settings.memory_budget_gb * GIB)
    else:  # the machine's budget less what this process holds before any model loads
        budget = max(0, default_budget_bytes() - process.memory_info().rss)
    plan, models = plan_fleet(resolved, budget)
    fleet = ServeFleet(
        models,
        load=lambda model: load_engine(model.plan, model.kind),
        release=release_engine,
        budget_bytes=budget,
        wait_timeout_s=settings.model_wait_timeout_s,
        measure=_mlx_active_bytes,
    )
    return run_server(plan, fleet)
