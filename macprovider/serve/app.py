"""The HTTP app of `macprovider serve` (docs/api.md#routes, #security): `create_app` wires the routers, the
error handlers and the middleware (auth/Host/Origin checks, limits). The process lifecycle (uvicorn,
background load, drain, watchdog) lives in `macprovider.serve.runtime`.

It talks to engines only through `engine.protocol.EngineProtocol`, and finds them through the fleet
(`serve.fleet.ServeFleet`: which models exist, which are loaded), so tests run it against fake engines.

    create_app(engine_or_fleet, settings, api_key) -> FastAPI   pure app factory (no sockets, no threads)

Routes: one router per API surface, each built over the app's one `context.AppContext` (counters, fleet,
body reading, the generation driver): `ops_api` (health, metrics, models, load/unload), `openai_api`,
`responses_api`, `anthropic_api`, `embeddings_api`. Errors: the envelope of the API the path belongs to
(Anthropic's under /v1/messages, else OpenAI's), from the handlers and the middleware alike.

Middleware order, outermost first (pure ASGI, so streaming responses and disconnects pass untouched):
Host/Origin guard (403) → CORS (only when origins are configured) → API key (401) → body cap from
Content-Length (413) → routes. A chunked body is capped while it is read (413).
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from macprovider.core.config import Settings, is_loopback
from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EngineProtocol
from macprovider.serve import anthropic_api, embeddings_api, openai_api, ops_api, responses_api
from macprovider.serve.context import AppContext, ServerState
from macprovider.serve.fleet import ServeFleet

log = logging.getLogger("macprovider.serve.app")

OPEN_PATHS = frozenset({"/v1/health", "/health", "/metrics"})
LOOPBACK_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOOPBACK_ORIGIN_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ANTHROPIC_PATHS = "/v1/messages"


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
    from macprovider.core.config import Paths
    from macprovider.serve.workload import WorkloadRecorder

    return WorkloadRecorder(Paths.from_env().workload_file)


def create_app(
    engine: EngineProtocol | ServeFleet, settings: Settings, api_key: str | None, *, started_at: float | None = None
) -> FastAPI:
    """The OpenAI-compatible app over a fleet of models, or over one engine (a fleet of one). Pure: no
    sockets, no threads started.

    `settings` gives host (loopback rules), max_request_body_bytes, cors_allowed_origins; `api_key`
    None = no key required. `app.state.macprovider` is the `ServerState` the runtime drives;
    `app.state.fleet` the `ServeFleet`; `app.state.context` the `AppContext` every router shares.
    """
    fleet = engine if isinstance(engine, ServeFleet) else ServeFleet.of_engine(engine)
    state = ServerState(time.time() if started_at is None else started_at)
    ctx = AppContext(settings, state, fleet, workload_recorder(settings))
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="macprovider")
    app.state.macprovider = state
    app.state.fleet = fleet
    app.state.workload_recorder = ctx.recorder
    app.state.context = ctx
    _install_error_handlers(app)
    # -- the routes, one router per API surface (registration order is the order they are matched in)
    app.include_router(ops_api.router(ctx))
    app.include_router(openai_api.router(ctx))
    store = responses_api.ResponseStore()  # stored responses live in this app's bounded in-memory store
    app.state.responses = store
    app.include_router(responses_api.router(ctx, store))
    app.include_router(anthropic_api.router(ctx))
    app.include_router(embeddings_api.router(ctx))  # finds its engine through the fleet, as the others do
    _install_middleware(app, settings, api_key)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in the envelope of the API its path belongs to (`_error_response`)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error = ApiError(
                404,
                "path_not_found",
                "no such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/responses, "
                "/v1/messages, /v1/embeddings, /v1/health",
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


def _install_middleware(app: FastAPI, settings: Settings, api_key: str | None) -> None:
    """The middleware, added innermost first (the module docstring lists them outermost first)."""
    app.add_middleware(RequestGuard, api_key=api_key, max_body=settings.max_request_body_bytes)
    if settings.cors_allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(HostOriginGuard, settings=settings)
