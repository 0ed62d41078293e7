"""What every router of one app shares: the counters, the fleet, and the request steps common to the APIs.

    ServerState                          counters and lifecycle flags (the runtime drives them)
    AppContext(settings, state, fleet, recorder)   built by `create_app`, stored as `app.state.context`
    AppContext.status() / require_loaded()          the server's state as health reports it; 503 while loading
    AppContext.read_body(request)                   the capped JSON body (415, 413)
    AppContext.routed(data)                         (body, model id) through the fleet's names
    AppContext.generate(request, prepare, error_response)   one generation for any API surface

Each `*_api.router(ctx)` and `ops_api.router(ctx)` closes over one AppContext: nothing here is module-global,
so two apps in one process (the tests build many) share nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import Response

from macprovider.core.config import Settings
from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EngineStats
from macprovider.serve import core
from macprovider.serve import openai_schemas as schemas
from macprovider.serve.fleet import FleetModel, ServeFleet

log = logging.getLogger("macprovider.serve.app")


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
        """One more request admitted to the engine."""
        self.in_flight += 1
        self.idle.clear()

    def end(self, error: bool) -> None:
        """An admitted request's response finished (`error`: it is counted in errors_total)."""
        self.in_flight -= 1
        self.errors_total += int(error)
        if self.in_flight == 0:
            self.idle.set()


@dataclass
class AppContext:
    """The per-app state the routers share. `recorder` is the workload recorder (serve/workload.py) or None;
    `primary` is the fleet's first model, fixed when the app is built."""

    settings: Settings
    state: ServerState
    fleet: ServeFleet
    recorder: Any = None
    primary: FleetModel = field(init=False)

    def __post_init__(self) -> None:
        self.primary = self.fleet.primary

    # ------------------------------------------------------------------ the server's state
    def primary_stats(self) -> EngineStats:
        """The primary model's engine stats; while it is not loaded, `loading` (pinned, pending) or `ready`."""
        stats = self.fleet.stats(self.primary.id)
        if stats is not None:
            return stats
        return EngineStats(state="loading" if self.fleet.pinned_pending() else "ready")

    def status(self) -> str:
        """The health `status`: unavailable, loading, draining, or the primary engine's own state."""
        state, fleet = self.state, self.fleet
        if state.engine_dead or state.load_failed or fleet.dead_model() is not None:
            return "unavailable"
        engine_state = self.primary_stats().state
        if engine_state == "ready" and fleet.pinned_pending():
            engine_state = "loading"
        if state.draining and engine_state != "unavailable":
            return "draining"
        return engine_state

    def require_loaded(self) -> None:
        """ApiError 503 `model_not_loaded` (Retry-After: 1) while the server loads or is unavailable."""
        current = self.status()
        if current in ("loading", "unavailable"):
            message = "the model is still loading" if current == "loading" else "the engine is unavailable"
            raise ApiError(503, "model_not_loaded", message, headers={"Retry-After": "1"})

    # ------------------------------------------------------------------ request steps
    async def read_body(self, request: Request) -> bytes:
        """The request body: 415 unless it is JSON, 413 once it passes `max_request_body_bytes` (a chunked body
        is counted as it is read)."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)"
            )
        cap, size, parts = self.settings.max_request_body_bytes, 0, []
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

    def routed(self, data: Any) -> tuple[Any, str]:
        """(body, model id): the model the body's `model` names, through the fleet (aliases and globs;
        404 for another name). The body's `model` becomes that id, so each surface checks and reports it.
        A body without a string `model` goes on to its surface's own 400; an unknown name is checked by the
        surface first (a malformed body is a 400 whatever it names), then `fleet.acquire` answers 404."""
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str):
            return data, self.primary.id
        try:
            model = self.fleet.resolve(name)
        except ApiError:
            return data, name
        return ({**data, "model": model.id} if name != model.id else data), model.id

    # ------------------------------------------------------------------ the generation driver
    async def generate(
        self,
        request: Request,
        prepare: Callable[[dict[str, Any], str], Any],
        error_response: Callable[[ApiError], Response],
    ) -> Response:
        """Serve one generation for any API surface: admission checks, `prepare(body) -> (Turn, surface)`
        (the surface's own parsing), `core.start`, then the surface's stream (`surface.events`) or body
        (`surface.respond`). Errors before generation go through `error_response` (the surface's envelope)."""
        state = self.state
        state.requests_total += 1
        try:
            surface, lease, generation = await self._start(request, prepare)
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

    async def _start(self, request: Request, prepare: Callable[[dict[str, Any], str], Any]) -> tuple[Any, Any, Any]:
        """(surface, lease, generation): admission (503 draining / loading), the body, the surface's
        `prepare`, a lease on the model's engine and `core.start`. The lease is released if the start fails."""
        state = self.state
        if state.draining or self.status() == "draining":
            raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
        self.require_loaded()
        data = schemas.parse_json_body(await self.read_body(request))
        data, model = self.routed(data)
        turn, surface = prepare(data, model)
        # the content-free shape record autotune replays (the chat-shaped APIs count as chat)
        endpoint = "chat" if turn.messages is not None else "completions"
        recorder = self.recorder
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
        lease = await self.fleet.acquire(model)
        try:
            generation = await core.start(lease.engine, turn, lambda: state.draining, track)
        except BaseException:
            lease.release()
            raise
        return surface, lease, generation
