"""The operator routes (docs/api.md#health, #metrics, #models): health, metrics, models, the fleet's load/unload.

router(ctx) -> APIRouter
    GET  /v1/health, /health       the health body; 200 while the server admits work (ready, busy), else 503
    GET  /metrics                  the same numbers as Prometheus text (open, as health is)
    GET  /v1/models, /v1/models/{id}   OpenAI model objects plus context length, load state and aliases
    POST /v1/macprovider/load, /v1/macprovider/unload   `{"model": "<id or alias>"}` -> the model object
health_body(ctx, process, ram_gb) -> dict     what /v1/health and /metrics report
model_entry(ctx, model_id) -> dict            one model object (ApiError 404 for an unknown name)
"""

from __future__ import annotations

import time
from typing import Any

import psutil
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from macprovider.core.errors import ApiError
from macprovider.serve import openai_schemas as schemas
from macprovider.serve.context import AppContext

ADMITTING = ("ready", "busy")


def health_body(ctx: AppContext, process: psutil.Process, ram_gb: int) -> dict[str, Any]:
    """The health body (docs/api.md#health): status, counters, memory, capacity, engine stats and the fleet."""
    fleet, state, primary = ctx.fleet, ctx.state, ctx.primary
    stats = ctx.primary_stats()
    current = ctx.status()
    queued = stats.queued_sequences
    if len(fleet.models) > 1:
        queued = sum(e.stats().queued_sequences for e in fleet.loaded_engines())
    loaded = fleet.state(primary.id) == "loaded" and stats.state in ("ready", "busy", "draining")
    body = {
        "status": current,
        "model": primary.id,
        "model_loaded": loaded and current != "unavailable",
        "uptime_s": round(time.time() - state.started_at, 3),
        "requests_total": state.requests_total,
        "requests_in_flight": state.in_flight,
        "requests_queued": queued,
        "errors_total": state.errors_total,
        "memory_rss_mb": round(process.memory_info().rss / (1024 * 1024), 1),
        "capacity": {
            "ram_gb": ram_gb,
            "max_context_tokens": primary.max_context,
            "max_batch": primary.max_batch,
            "kv_bits": primary.kv_bits,
            "speculative": getattr(primary, "speculative", "off"),
            "cpu_kernels": stats.cpu_kernels,
        },
        "engine": stats.engine_json(),
        "models": fleet.describe(),
    }
    if fleet.budget_bytes is not None:
        body["memory_budget_bytes"] = fleet.budget_bytes
    return body | ({"distributed": stats.extra["distributed"]} if "distributed" in stats.extra else {})


def model_entry(ctx: AppContext, model_id: str) -> dict[str, Any]:
    """An OpenAI model object plus the extension fields clients need (context length, load state, aliases)."""
    model = ctx.fleet.resolve(model_id)
    return {
        "id": model.id,
        "object": "model",
        "created": int(ctx.state.started_at),
        "owned_by": "macprovider",
        "context_length": model.max_context,
        "macprovider_state": ctx.fleet.state(model.id),
        "macprovider_aliases": list(model.aliases),
    }


def router(ctx: AppContext) -> APIRouter:
    """Health, metrics, models and the operator's load/unload over `ctx` (its fleet and counters). Errors are
    raised as ApiError; the app's handler answers them in the OpenAI envelope."""
    from macprovider.core.hardware import physical_ram_gb

    ram_gb = physical_ram_gb()
    process = psutil.Process()
    api = APIRouter()

    async def health() -> Response:
        body = health_body(ctx, process, ram_gb)
        return JSONResponse(body, status_code=200 if body["status"] in ADMITTING else 503)

    api.add_api_route("/v1/health", health, methods=["GET"])
    api.add_api_route("/health", health, methods=["GET"])

    @api.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(
            schemas.prometheus_text(health_body(ctx, process, ram_gb)),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @api.get("/v1/models")
    async def models() -> Response:
        ctx.require_loaded()
        return JSONResponse({"object": "list", "data": [model_entry(ctx, model.id) for model in ctx.fleet.models]})

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        ctx.require_loaded()
        return JSONResponse(model_entry(ctx, model_id))

    # -- operator actions (`macprovider load ID` / `macprovider unload ID`)
    async def model_action(request: Request, action: str) -> Response:
        ctx.require_loaded()
        data = schemas.parse_json_body(await ctx.read_body(request))
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, "invalid_request", 'the body must be {"model": "<id or alias>"}', param="model")
        model = await (ctx.fleet.load(name) if action == "load" else ctx.fleet.unload(name))
        return JSONResponse(model_entry(ctx, model.id))

    @api.post("/v1/macprovider/load")
    async def load_model(request: Request) -> Response:
        return await model_action(request, "load")

    @api.post("/v1/macprovider/unload")
    async def unload_model(request: Request) -> Response:
        return await model_action(request, "unload")

    return api
