"""The HTTP layer of `macprovider serve` (SPEC.md §3.2–§3.5): routes, SSE, auth/Host/Origin checks, limits,
disconnect → cancel, the relay from engine chunks to OpenAI objects. The process lifecycle (uvicorn, background load, drain,
watchdog) lives in `macprovider.serve.runtime`.

It talks to the engine only through `engine.protocol.EngineProtocol`, so tests run it against a fake engine.

    create_app(engine, settings, api_key) -> FastAPI      pure app factory (no sockets, no threads)

Middleware order, outermost first (pure ASGI, so streaming responses and disconnects pass untouched):
Host/Origin guard (403) → CORS (only when origins are configured) → API key (401) → body cap from
Content-Length (413) → routes. A chunked body is capped while it is read (413).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import psutil
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from macprovider.serve import anthropic_api, core, embeddings_api, openai_api, responses_api
from macprovider.serve import openai_schemas as schemas
from macprovider.config import Settings, is_loopback
from macprovider.engine.protocol import EngineProtocol
from macprovider.errors import ApiError

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
    """403 `forbidden_host` for a non-loopback Host on a loopback bind (DNS rebinding, SPEC.md §3.5) and
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
    """The name part of a Host header, lower-cased: `localhost:8080` → `localhost`, `[::1]:80` → `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


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


def create_app(engine: EngineProtocol, settings: Settings, api_key: str | None, *, started_at: float | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (SPEC.md §3.2). Pure: no sockets, no threads started.

    `settings` gives host (loopback rules), max_request_body_bytes, cors_allowed_origins; `api_key`
    None = no key required. `app.state.macprovider` is the `ServerState` the runtime drives.
    """
    state = ServerState(time.time() if started_at is None else started_at)
    from macprovider.hardware import physical_ram_gb

    ram_gb = physical_ram_gb()
    process = psutil.Process()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="macprovider")
    app.state.macprovider = state
    recorder = workload_recorder(settings)
    app.state.workload_recorder = recorder

    # -- errors: every one is the OpenAI envelope
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error = ApiError(404, "path_not_found", "no such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, /v1/embeddings, /v1/health")
        elif exc.status_code == 405:
            error = ApiError(405, "method_not_allowed", f"method {request.method} is not allowed on this route", headers=dict(exc.headers or {}))
        else:
            error = ApiError(exc.status_code, "invalid_request", "the request could not be served", headers=dict(exc.headers or {}))
        return _error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("internal error: %s", exc.__class__.__name__, exc_info=exc)
        return _error_response(ApiError(500, "internal_error", "internal server error"), request.url.path)

    # -- health and metrics
    def status() -> str:
        if state.engine_dead or state.load_failed or not engine.is_alive():
            return "unavailable"
        engine_state = engine.stats().state
        if state.draining and engine_state != "unavailable":
            return "draining"
        return engine_state

    def health_body() -> dict[str, Any]:
        stats = engine.stats()
        current = status()
        return {
            "status": current,
            "model": engine.model_id,
            "model_loaded": stats.state in ("ready", "busy", "draining") and current != "unavailable",
            "uptime_s": round(time.time() - state.started_at, 3),
            "requests_total": state.requests_total,
            "requests_in_flight": state.in_flight,
            "requests_queued": stats.queued_sequences,
            "errors_total": state.errors_total,
            "memory_rss_mb": round(process.memory_info().rss / (1024 * 1024), 1),
            "capacity": {
                "ram_gb": ram_gb,
                "max_context_tokens": engine.max_context,
                "max_batch": engine.max_batch,
                "kv_bits": engine.kv_bits,
            },
            "engine": stats.engine_json(),
        } | ({"distributed": stats.extra["distributed"]} if "distributed" in stats.extra else {})

    async def health() -> Response:
        body = health_body()
        return JSONResponse(body, status_code=200 if body["status"] in ADMITTING else 503)

    app.add_api_route("/v1/health", health, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(schemas.prometheus_text(health_body()), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- models
    def require_loaded() -> None:
        current = status()
        if current in ("loading", "unavailable"):
            message = "the model is still loading" if current == "loading" else "the engine is unavailable"
            raise ApiError(503, "model_not_loaded", message, headers={"Retry-After": "1"})

    def model_entry() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": int(state.started_at), "owned_by": "macprovider"}

    @app.get("/v1/models")
    async def models() -> Response:
        require_loaded()
        return JSONResponse({"object": "list", "data": [model_entry()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        require_loaded()
        openai_api.check_model(model_id, engine.model_id)
        return JSONResponse(model_entry())

    # -- completions
    async def read_body(request: Request) -> bytes:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)")
        cap, size, parts = settings.max_request_body_bytes, 0, []
        async for part in request.stream():
            size += len(part)
            if size > cap:
                raise ApiError(413, "request_too_large", f"the request body is larger than this server's limit of {cap} bytes", headers={"Connection": "close"})
            parts.append(part)
        return b"".join(parts)

    async def generate(request: Request, prepare: Callable[[dict[str, Any]], Any], error_response: Callable[[ApiError], Response]) -> Response:
        """Serve one generation for any API surface: admission checks, `prepare(body) -> (Turn, surface)`
        (the surface's own parsing), `core.start`, then the surface's stream (`surface.events`) or body
        (`surface.respond`). Errors before generation go through `error_response` (the surface's envelope)."""
        state.requests_total += 1
        try:
            if state.draining or status() == "draining":
                raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
            require_loaded()
            data = schemas.parse_json_body(await read_body(request))
            turn, surface = prepare(data)
            # the content-free shape record autotune replays (the chat-shaped APIs count as chat)
            endpoint = "chat" if turn.messages is not None else "completions"
            track = None if recorder is None else lambda handle, prompt_tokens: recorder.track(
                handle, endpoint=endpoint, prompt_tokens=prompt_tokens, max_tokens=turn.request.max_tokens, concurrency=state.in_flight + 1
            )
            generation = await core.start(engine, turn, lambda: state.draining, track)
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
            state.end(error)

    openai_error = openai_api.OpenAISurface.error_response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, lambda data: openai_api.prepare_chat(data, engine.model_id), openai_error)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, lambda data: openai_api.prepare_completion(data, engine.model_id), openai_error)

    # -- the Responses API; stored responses live in this app's bounded in-memory store
    store = responses_api.ResponseStore()
    app.state.responses = store

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await generate(request, lambda data: responses_api.prepare(data, engine.model_id, store), openai_error)

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
        return await generate(request, lambda data: anthropic_api.prepare(data, engine.model_id), anthropic_api.error_response)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        try:
            require_loaded()
            messages, tools = anthropic_api.count_turn(schemas.parse_json_body(await read_body(request)), engine.model_id)
            tokens = await run_in_threadpool(engine.encode_chat, messages, tools or None)
        except ApiError as exc:
            return anthropic_api.error_response(exc)
        return JSONResponse({"input_tokens": len(tokens)})

    # -- embeddings: the route finds its engine through one lookup (a single-model server: this engine)
    def embedding_engine(model: str) -> Any:
        return embeddings_api.lookup_engine(engine, model)

    app.include_router(embeddings_api.router(embedding_engine, state, read_body, require_loaded))

    # -- middleware, innermost first
    app.add_middleware(RequestGuard, api_key=api_key, max_body=settings.max_request_body_bytes)
    if settings.cors_allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allowed_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HostOriginGuard, settings=settings)
    return app
