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
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import psutil
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from macprovider.serve import openai_schemas as schemas
from macprovider.config import Settings, is_loopback
from macprovider.engine.protocol import EngineProtocol, GenerationChunk
from macprovider.errors import ApiError

log = logging.getLogger("macprovider.serve.app")

OPEN_PATHS = frozenset({"/v1/health", "/health", "/metrics"})
LOOPBACK_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOOPBACK_ORIGIN_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ADMITTING = ("ready", "busy")


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
def _error_response(exc: ApiError) -> JSONResponse:
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
                await _error_response(error)(scope, receive, send)
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
    """401 `invalid_api_key` (constant-time compare; health and metrics are open) and 413
    `request_too_large` from Content-Length, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope["path"], Headers(scope=scope))
            if error is not None:
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, path: str, headers: Headers) -> ApiError | None:
        if self.key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self.key):
                return ApiError(
                    401,
                    "invalid_api_key",
                    "missing or invalid API key: send it as `Authorization: Bearer <key>`",
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


# ---------------------------------------------------------------------------------------------- streaming
class _ClientGone(Exception):
    """The client closed the connection before the response was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await `work` while listening for `http.disconnect`; raise _ClientGone if the client leaves first.
    The body must already have been read, so `receive` only reports the disconnect."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task in done:
        return task.result()
    raise _ClientGone


class EventStream(Response):
    """ASGI `text/event-stream` response that listens for disconnect concurrently (whatever the ASGI spec
    version), closes its event generator however it ends (so the generator's `finally` cancels the
    sequence), then calls `on_close(error)`."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None]):  # noqa: D107
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events = events
        self.on_close = on_close
        self.error = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _until_disconnect(receive, pump())
        except (_ClientGone, OSError):
            pass
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
            self.on_close(self.error)


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
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error = ApiError(404, "path_not_found", "no such route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/health")
        elif exc.status_code == 405:
            error = ApiError(405, "method_not_allowed", f"method {request.method} is not allowed on this route", headers=dict(exc.headers or {}))
        else:
            error = ApiError(exc.status_code, "invalid_request", "the request could not be served", headers=dict(exc.headers or {}))
        return _error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("internal error: %s", exc.__class__.__name__, exc_info=exc)
        return _error_response(ApiError(500, "internal_error", "internal server error"))

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

    @app.get("/v1/models")
    async def models() -> Response:
        require_loaded()
        entry = {"id": engine.model_id, "object": "model", "created": int(state.started_at), "owned_by": "macprovider"}
        return JSONResponse({"object": "list", "data": [entry]})

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

    async def complete(request: Request, chat: bool) -> Response:
        state.requests_total += 1
        try:
            if state.draining or status() == "draining":
                raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
            require_loaded()
            data = schemas.parse_json_body(await read_body(request))
            body = schemas.parse_chat(data) if chat else schemas.parse_completion(data)
            if body.model != engine.model_id:
                raise ApiError(404, "model_not_found", f"the model {body.model!r} is not served here; this server serves {engine.model_id!r}", param="model")
            param = "messages" if chat else "prompt"
            tools, choice = body.tool_spec if chat else ([], "none")
            splitter, grammar = None, None
            if tools:
                markup = getattr(engine, "tool_markup", None)
                if markup is None:
                    raise ApiError(400, "invalid_request", "this model's chat template does not support tools", param="tools")
                from macprovider.engine.tool_calls import ToolCallSplitter, tool_call_grammar

                splitter = ToolCallSplitter(markup[0], markup[1], markup[2], tools)
                if choice not in ("auto", "none"):
                    if not getattr(markup[2], "__module__", "").endswith("json_tools"):
                        raise ApiError(400, "invalid_request", "a forced tool_choice needs a model with JSON tool-call markup (mlx-lm json_tools)", param="tool_choice")
                    grammar = tool_call_grammar(tools, choice, markup[0] + "\n", "\n" + markup[1])
            if chat:
                tokens = await run_in_threadpool(engine.encode_chat, schemas.normalize_messages(body), tools or None)
            else:
                tokens = await run_in_threadpool(engine.encode_text, body.prompt)
            if not tokens:
                raise ApiError(400, "invalid_request", f"the {param} is empty", param=param)
            if len(tokens) > engine.max_context:
                raise schemas.context_length_error(len(tokens), engine.max_context, param)
            if state.draining:
                raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
            generation = body.generation_request(list(tokens), body.wanted_tokens)
            if grammar is not None:
                import dataclasses

                generation = dataclasses.replace(generation, grammar=grammar)
            handle = engine.submit(generation)
            if recorder is not None:
                handle = recorder.track(handle, endpoint="chat" if chat else "completions", prompt_tokens=len(tokens),
                                        max_tokens=body.wanted_tokens, concurrency=state.in_flight + 1)
        except ApiError as exc:
            state.errors_total += 1
            return _error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the client gets the envelope, the log gets the details
            state.errors_total += 1
            log.error("internal error before generation: %s", exc.__class__.__name__, exc_info=exc)
            return _error_response(ApiError(500, "internal_error", "internal server error"))
        state.begin()
        relay = _Relay(handle, engine.model_id, chat, lambda: state.draining, splitter)
        if body.streaming:
            stream = EventStream(relay.events(), on_close=state.end)
            relay.on_error = lambda: setattr(stream, "error", True)
            return stream
        error = True
        try:
            response = await _until_disconnect(request.receive, relay.collect())
            error = response.status_code >= 400
            return response
        except _ClientGone:  # nobody will read this; the sequence is cancelled below
            error = False
            return Response(status_code=499)
        finally:
            if not relay.finished:
                handle.cancel()
            state.end(error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    # -- middleware, innermost first
    app.add_middleware(RequestGuard, api_key=api_key, max_body=settings.max_request_body_bytes)
    if settings.cors_allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allowed_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(HostOriginGuard, settings=settings)
    return app


class _Relay:
    """Turns a generation handle's chunks into OpenAI chat or text-completion objects (SPEC.md §3.3)."""

    def __init__(self, handle: Any, model: str, chat: bool, draining: Callable[[], bool], splitter: Any = None):
        self.handle = handle
        self.splitter = splitter  # tools.ToolCallSplitter when the request has tools
        self.tool_calls = 0
        self.model = model
        self.chat = chat
        self.draining = draining
        self.id = schemas.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.finished = False
        self.text_offset = 0  # characters of token text already reported (completion `text_offset`)
        self.on_error: Callable[[], None] = lambda: None

    def _failure(self, chunk: GenerationChunk | None) -> ApiError:
        if self.draining():
            return ApiError(503, "draining", (chunk and chunk.error) or "the server is shutting down")
        if chunk is not None and chunk.finish_reason == "cancelled":
            return ApiError(503, "cancelled", chunk.error or "the request was cancelled")
        return ApiError(500, "internal_error", (chunk and chunk.error) or "generation ended without a result")

    def _logprobs(self, entries: Any) -> dict[str, Any] | None:
        if not entries:
            return None
        if self.chat:
            return schemas.chat_logprobs(entries)
        result = schemas.completion_logprobs(entries, self.text_offset)
        self.text_offset += sum(len(e.token) for e in entries)
        return result

    def _chunk(self, text: str = "", finish: str | None = None, usage: Any = None, role: bool = False, logprobs: Any = ()) -> bytes:
        lp = self._logprobs(logprobs)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text or lp else {})
            return schemas.sse(schemas.chat_chunk(self.id, self.created, self.model, delta, finish, usage, lp))
        return schemas.sse(schemas.completion_chunk(self.id, self.created, self.model, text, finish, usage, lp))

    def _tool_chunks(self, calls: list[dict[str, Any]]) -> list[bytes]:
        """Per call two OpenAI deltas: {index, id, type, function.name, arguments ""}, then the arguments."""
        out = []
        for call in calls:
            index = self.tool_calls
            self.tool_calls += 1
            head = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
            args = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, args):
                out.append(schemas.sse(schemas.chat_chunk(self.id, self.created, self.model, {"tool_calls": [part]})))
        return out

    def _finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.splitter is not None and self.splitter.calls else reason

    async def events(self) -> AsyncIterator[bytes]:
        """SSE bytes: role chunk (chat), content chunks, finish chunk, usage chunk, `[DONE]`; or an error event
        then `[DONE]`. Cancels the sequence if closed before the engine finished it."""
        try:
            if self.chat:
                yield self._chunk(role=True)
            final = None
            async for chunk in self.handle:
                if chunk.finish_reason is not None:
                    final = chunk
                    self.finished = True
                if chunk.text or chunk.logprobs:
                    text, calls = self.splitter.feed(chunk.text) if self.splitter else (chunk.text, [])
                    if text or chunk.logprobs:
                        yield self._chunk(text, logprobs=chunk.logprobs)
                    for event in self._tool_chunks(calls):
                        yield event
                if final is not None:
                    break
            self.finished = True
            if final is None or final.finish_reason in ("error", "cancelled") or final.usage is None:
                self.on_error()
                yield schemas.sse(self._failure(final).envelope())
            else:
                if self.splitter is not None:
                    text, calls = self.splitter.finish()
                    if text:
                        yield self._chunk(text)
                    for event in self._tool_chunks(calls):
                        yield event
                yield self._chunk(finish=self._finish_reason(final.finish_reason))
                yield self._chunk(usage=final.usage)
            yield schemas.sse("[DONE]")
        finally:
            if not self.finished:
                self.handle.cancel()

    async def collect(self) -> Response:
        """The non-streaming response, or the error envelope if the engine failed the sequence."""
        parts: list[str] = []
        entries: list[Any] = []
        final = None
        async for chunk in self.handle:
            parts.append(chunk.text)
            entries.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                final = chunk
                break
        self.finished = True
        if final is None or final.finish_reason in ("error", "cancelled") or final.usage is None:
            return _error_response(self._failure(final))
        text = "".join(parts)
        if self.splitter is not None:
            text, calls = self.splitter.feed(text)
            rest, more = self.splitter.finish()
            text, calls = text + rest, calls + more
            return JSONResponse(
                schemas.chat_response(self.id, self.created, self.model, text, self._finish_reason(final.finish_reason), final.usage, self._logprobs(entries), calls)
            )
        build = schemas.chat_response if self.chat else schemas.completion_response
        return JSONResponse(build(self.id, self.created, self.model, text, final.finish_reason, final.usage, self._logprobs(entries)))
