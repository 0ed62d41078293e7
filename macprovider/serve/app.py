"""The HTTP layer of `macprovider serve` (docs/api.md#routes, #security): routes, SSE, auth/Host/Origin checks, limits,
disconnect → cancel, the relay from engine chunks to OpenAI objects. The process lifecycle (uvicorn, background load, drain,
watchdog) lives in `macprovider.serve.runtime`.

It talks to engines only through `engine.protocol.EngineProtocol`, and finds them through the fleet
(`serve.fleet.ServeFleet`: which models exist, which are loaded), so tests run it against fake engines.

    create_app(engine_or_fleet, settings, api_key) -> FastAPI   pure app factory (no sockets, no threads)

Middleware order, outermost first (pure ASGI, so streaming responses and disconnects pass untouched):
Host/Origin guard (403) → CORS (only when origins are configured) → API key (401) → body cap from
Content-Length (413) → routes. A chunked body is capped while it is read (413).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psutil
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from macprovider.config import Settings, is_loopback
from macprovider.engine.protocol import EngineProtocol, EngineStats
from macprovider.errors import ApiError
from macprovider.serve import anthropic_api, core, embeddings_api, openai_api, responses_api
from macprovider.serve import openai_schemas as schemas
from macprovider.serve.fleet import ServeFleet

log = logging.getLogger("macprovider.serve.app")

OPEN_PATHS = frozenset({"/v1/health", "/health", "/metrics"})
LOOPBACK_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOOPBACK_ORIGIN_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ADMITTING = ("ready", "busy")
ANTHROPIC_PATHS = "/v1/messages"


class ServerState:
    """What the HTTP layer counts and the lifecycle flags the runtime sets. Touched only on the event loop.

    requests_total: completion requests received; errors_total: those answered with an error (any status
    ≥ 400, or an error event in a stream); in_flight: requests admitted to the engine whose response has
    not finished. `idle` is set whenever in_flight is 0 (the drain waits on it).
    """

    def __init__(self, started_at: float):
        self.started_at = started_at
        self.requests_total = 0
        self.errors_total = 0
        self.in_flight = 0
        self.draining = False
        self.load_failed = False
        self.engine_dead = False
        self.idle = asyncio.Event()
        self.idle.set()

    def begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def end(self, error: bool) -> None:
        self.in_flight -= 1
        self.errors_total += int(error)
        if self.in_flight == 0:
            self.idle.set()


# ---------------------------------------------------------------------------------------------- middleware
def _error_response(exc: ApiError, path: str = "") -> Response:
    """The error in the envelope of the API the path belongs to: Anthropic's under /v1/messages, else OpenAI's."""
    if path.startswith(ANTHROPIC_PATHS):
        return anthropic_api.error_response(exc)
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)


class HostOriginGuard:
    """403 `forbidden_host` for a non-loopback Host on a loopback bind (DNS rebinding, docs/api.md#security) and
    403 `forbidden_origin` for a cross-site Origin (not configured, and not loopback on a loopback bind)."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.loopback = is_loopback(settings.host)
        self.origins = frozenset(settings.cors_allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(Headers(scope=scope))
            if error is not None:
                await _error_response(error, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, headers: Headers) -> ApiError | None:
        if self.loopback and host_name(headers.get("host", "")) not in LOOPBACK_HOST_NAMES:
            return ApiError(403, "forbidden_host", "this server only answers requests addressed to localhost")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin):
            return ApiError(403, "forbidden_origin", "cross-site requests are not allowed from this origin")
        return None

    def origin_allowed(self, origin: str) -> bool:
        if origin in self.origins or "*" in self.origins:
            return True
        if not self.loopback:
            return False
        try:
            parts = urlsplit(origin)
            return parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_ORIGIN_HOSTS
        except ValueError:
            return False


def host_name(host: str) -> str:
    """The name part of a Host header (RFC 9110 §7.2: `uri-host [ ":" port ]`), lower-cased:
    `localhost:8080` → `localhost`, `[::1]:80` → `[::1]`. A header that is not exactly a name (or a
    bracketed IPv6 literal) plus an optional all-digit port is returned whole, so it never equals a
    loopback name: `[::1]evil.com`, `localhost:80:80`, `localhost:8o` are not loopback."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[: end + 1], host[end + 1 :]) if end > 0 else (host, "")
    elif host.count(":") == 1:
        name, rest = host.split(":")[0], ":" + host.split(":")[1]
    else:
        name, rest = host, ""
    if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
        return host
    return name


class RequestGuard:
    """401 `invalid_api_key` (constant-time compare of `Authorization: Bearer` or, as Anthropic clients send
    it, `x-api-key`; health and metrics are open) and 413
    `request_too_large` from Content-Length, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope["path"], Headers(scope=scope))
            if error is not None:
                await _error_response(error, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, path: str, headers: Headers) -> ApiError | None:
        if self.key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            bearer = token.strip() if scheme.lower() == "bearer" else ""
            offered = (bearer or headers.get("x-api-key", "")).encode("utf-8")  # x-api-key: Anthropic clients
            if not hmac.compare_digest(offered, self.key):
                return ApiError(
                    401,
                    "invalid_api_key",
                    "missing or invalid API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            return ApiError(
                413,
                "request_too_large",
                f"the request body is larger than this server's limit of {self.max_body} bytes",
                headers={"Connection": "close"},
            )
        return None


# ---------------------------------------------------------------------------------------------- the app
def workload_recorder(settings: Settings) -> Any:
    """The request-shape recorder (serve/workload.py) writing to the config directory, or None when
    `record_workload` is off."""
    if not settings.record_workload:
        return None
    from macprovider.config import Paths
    from macprovider.serve.workload import WorkloadRecorder

    return WorkloadRecorder(Paths.from_env().workload_file)


def create_app(
    engine: EngineProtocol | ServeFleet, settings: Settings, api_key: str | None, *, started_at: float | None = None
) -> FastAPI:
    """The OpenAI-compatible app over a fleet of models, or over one engine (a fleet of one). Pure: no
    sockets, no threads started.

    `settings` gives host (loopback rules), max_request_body_bytes, cors_allowed_origins; `api_key`
    None = no key required. `app.state.macprovider` is the `ServerState` the runtime drives;
    `app.state.fleet` the `ServeFleet`.
    """
    fleet = engine if isinstance(engine, ServeFleet) else ServeFleet.of_engine(engine)
    state = ServerState(time.time() if started_at is None else started_at)
    from macprovider.hardware import physical_ram_gb

    ram_gb = physical_ram_gb()
    process = psutil.Process()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="macprovider")
    app.state.macprovider = state
    app.state.fleet = fleet
    recorder = workload_recorder(settings)
    app.state.workload_recorder = recorder

    # -- errors: every one is the OpenAI envelope
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error = ApiError(
                404,
                "path_not_found",
                "no such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, /v1/embeddings, /v1/health",
            )
        elif exc.status_code == 405:
            error = ApiError(
                405,
                "method_not_allowed",
                f"method {request.method} is not allowed on this route",
                headers=dict(exc.headers or {}),
            )
        else:
            error = ApiError(
                exc.status_code, "invalid_request", "the request could not be served", headers=dict(exc.headers or {})
            )
        return _error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("internal error: %s", exc.__class__.__name__, exc_info=exc)
        return _error_response(ApiError(500, "internal_error", "internal server error"), request.url.path)

    # -- health and metrics
    primary = fleet.primary

    def primary_stats() -> EngineStats:
        stats = fleet.stats(primary.id)
        if stats is not None:
            return stats
        return EngineStats(state="loading" if fleet.pinned_pending() else "ready")

    def status() -> str:
        if state.engine_dead or state.load_failed or fleet.dead_model() is not None:
            return "unavailable"
        engine_state = primary_stats().state
        if engine_state == "ready" and fleet.pinned_pending():
            engine_state = "loading"
        if state.draining and engine_state != "unavailable":
            return "draining"
        return engine_state

    def health_body() -> dict[str, Any]:
        stats = primary_stats()
        current = status()
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
            },
            "engine": stats.engine_json(),
            "models": fleet.describe(),
        }
        if fleet.budget_bytes is not None:
            body["memory_budget_bytes"] = fleet.budget_bytes
        return body | ({"distributed": stats.extra["distributed"]} if "distributed" in stats.extra else {})

    async def health() -> Response:
        body = health_body()
        return JSONResponse(body, status_code=200 if body["status"] in ADMITTING else 503)

    app.add_api_route("/v1/health", health, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(
            schemas.prometheus_text(health_body()), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # -- models
    def require_loaded() -> None:
        current = status()
        if current in ("loading", "unavailable"):
            message = "the model is still loading" if current == "loading" else "the engine is unavailable"
            raise ApiError(503, "model_not_loaded", message, headers={"Retry-After": "1"})

    def model_entry(model_id: str) -> dict[str, Any]:
        """An OpenAI model object plus the extension fields clients need (context length, load state, aliases)."""
        model = fleet.resolve(model_id)
        return {
            "id": model.id,
            "object": "model",
            "created": int(state.started_at),
            "owned_by": "macprovider",
            "context_length": model.max_context,
            "macprovider_state": fleet.state(model.id),
            "macprovider_aliases": list(model.aliases),
        }

    @app.get("/v1/models")
    async def models() -> Response:
        require_loaded()
        return JSONResponse({"object": "list", "data": [model_entry(model.id) for model in fleet.models]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        require_loaded()
        return JSONResponse(model_entry(model_id))

    # -- operator actions (`macprovider load ID` / `macprovider unload ID`)
    async def model_action(request: Request, action: str) -> Response:
        require_loaded()
        data = schemas.parse_json_body(await read_body(request))
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, "invalid_request", 'the body must be {"model": "<id or alias>"}', param="model")
        model = await (fleet.load(name) if action == "load" else fleet.unload(name))
        return JSONResponse(model_entry(model.id))

    @app.post("/v1/macprovider/load")
    async def load_model(request: Request) -> Response:
        return await model_action(request, "load")

    @app.post("/v1/macprovider/unload")
    async def unload_model(request: Request) -> Response:
        return await model_action(request, "unload")

    # -- completions
    async def read_body(request: Request) -> bytes:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)"
            )
        cap, size, parts = settings.max_request_body_bytes, 0, []
        async for part in request.stream():
            size += len(part)
            if size > cap:
                raise ApiError(
                    413,
                    "request_too_large",
                    f"the request body is larger than this server's limit of {cap} bytes",
                    headers={"Connection": "close"},
                )
            parts.append(part)
        return b"".join(parts)

    async def generate(
        request: Request, prepare: Callable[[dict[str, Any], str], Any], error_response: Callable[[ApiError], Response]
    ) -> Response:
        """Serve one generation for any API surface: admission checks, `prepare(body) -> (Turn, surface)`
        (the surface's own parsing), `core.start`, then the surface's stream (`surface.events`) or body
        (`surface.respond`). Errors before generation go through `error_response` (the surface's envelope)."""
        state.requests_total += 1
        try:
            if state.draining or status() == "draining":
                raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
            require_loaded()
            data = schemas.parse_json_body(await read_body(request))
            data, model = routed(data)
            turn, surface = prepare(data, model)
            # the content-free shape record autotune replays (the chat-shaped APIs count as chat)
            endpoint = "chat" if turn.messages is not None else "completions"
            track = (
                None
                if recorder is None
                else lambda handle, prompt_tokens: recorder.track(
                    handle,
                    endpoint=endpoint,
                    prompt_tokens=prompt_tokens,
                    max_tokens=turn.request.max_tokens,
                    concurrency=state.in_flight + 1,
                )
            )
            lease = await fleet.acquire(model)
            try:
                generation = await core.start(lease.engine, turn, lambda: state.draining, track)
            except BaseException:
                lease.release()
                raise
        except ApiError as exc:
            state.errors_total += 1
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the client gets the envelope, the log gets the details
            state.errors_total += 1
            log.error("internal error before generation: %s", exc.__class__.__name__, exc_info=exc)
            return error_response(ApiError(500, "internal_error", "internal server error"))
        state.begin()
        if surface.streaming:

            def closed() -> None:
                generation.close()
                lease.release()
                state.end(generation.error is not None)  # a client that left is not an error

            return core.EventStream(surface.events(generation), on_close=closed)
        error = True
        try:
            response = await core.until_disconnect(request.receive, surface.respond(generation))
            error = response.status_code >= 400
            return response
        except core.ClientGone:  # nobody will read this; the sequence is cancelled below
            error = False
            return Response(status_code=499)
        finally:
            generation.close()
            lease.release()
            state.end(error)

    def routed(data: Any) -> tuple[Any, str]:
        """(body, model id): the model the body's `model` names, through the fleet (aliases and globs;
        404 for another name). The body's `model` becomes that id, so each surface checks and reports it.
        A body without a string `model` goes on to its surface's own 400; an unknown name is checked by the
        surface first (a malformed body is a 400 whatever it names), then `fleet.acquire` answers 404."""
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str):
            return data, primary.id
        try:
            model = fleet.resolve(name)
        except ApiError:
            return data, name
        return ({**data, "model": model.id} if name != model.id else data), model.id

    openai_error = openai_api.OpenAISurface.error_response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, openai_api.prepare_chat, openai_error)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, openai_api.prepare_completion, openai_error)

    # -- the Responses API; stored responses live in this app's bounded in-memory store
    store = responses_api.ResponseStore()
    app.state.responses = store

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await generate(request, lambda data, model: responses_api.prepare(data, model, store), openai_error)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        return JSONResponse(store.get(response_id)[0])

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    # -- the Anthropic Messages API
    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await generate(request, anthropic_api.prepare, anthropic_api.error_response)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        try:
            require_loaded()
            data, model = routed(schemas.parse_json_body(await read_body(request)))
            messages, tools = anthropic_api.count_turn(data, model)
            lease = await fleet.acquire(model)
            try:
                # A count beyond the context is refused as the generation would be, before tokenizing it all.
                core.check_prompt_bound(lease.engine, messages, "messages")
                tokens = await run_in_threadpool(lease.engine.encode_chat, messages, tools or None)
            finally:
                lease.release()
        except ApiError as exc:
            return anthropic_api.error_response(exc)
        return JSONResponse({"input_tokens": len(tokens)})

    # -- embeddings: the route finds its engine through the fleet, as the generation routes do
    app.include_router(embeddings_api.router(fleet.acquire, state, read_body, require_loaded))

    # -- middleware, innermost first
    app.add_middleware(RequestGuard, api_key=api_key, max_body=settings.max_request_body_bytes)
    if settings.cors_allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(HostOriginGuard, settings=settings)
    return app
