"""The process lifecycle of `macprovider serve` (docs/api.md#engine-semantics): the app under uvicorn, the model loaded on a
background thread, a watchdog on the generation thread, and the drain on SIGTERM/SIGINT.

    ServeRuntime(engine_or_fleet, settings, api_key).run() -> int   uvicorn + background load + watchdog + drain
    configure_logging(level)                              stderr log lines for macprovider and uvicorn
    run_server(plan, engine_or_fleet) -> int              what `macprovider serve` calls (exit code)

A fleet (`serve.fleet`) loads its pinned models at start and the rest on demand; a keep_alive sweeper
unloads idle ones. One engine handed in is a fleet of one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from macprovider.core.config import Settings
from macprovider.engine.protocol import EngineProtocol, ServePlan
from macprovider.serve.app import create_app
from macprovider.serve.context import ServerState
from macprovider.serve.fleet import ServeFleet

log = logging.getLogger("macprovider.serve.app")

CANCEL_GRACE_S = 5.0  # after cancel_all, how long streams get to send their final error event
# Connection limits (docs/api.md#limits). uvicorn's h11 protocol closes a connection idle
# *between* requests after timeout_keep_alive, but waits forever for the head of a request, so one byte a
# second (slowloris) or a connection that never speaks holds a socket for good: REQUEST_HEAD_TIMEOUT_S bounds
# the time from connect / the end of the previous response to a complete request head.
KEEP_ALIVE_TIMEOUT_S = 5  # uvicorn's default; httpx / the OpenAI SDK expire idle pooled connections after 5 s
REQUEST_HEAD_TIMEOUT_S = 10.0  # nginx's client_header_timeout is 60 s; a local client sends its head at once
MAX_REQUEST_HEAD_BYTES = 64 * 1024  # h11's default is 16 KiB; a head above it is answered 400
# Beyond this many open connections (or running requests) uvicorn answers 503 at once; the engine's own
# queue (max_queue_depth, 429) is the limit that normally applies. The process also raises its soft open-file
# limit toward the hard one (macOS starts shells at 256), so the limit can be reached at all.
CONNECTION_LIMIT = 1024
DEATH_GRACE_S = 2.0  # after the generation thread died, how long in-flight requests get to see their error
WATCHDOG_INTERVAL_S = 0.25


class _Uvicorn:  # namespace for the lazily defined uvicorn.Server and H11Protocol subclasses
    cls: Any = None
    protocol: Any = None


def _uvicorn_server_class() -> Any:
    """The uvicorn Server subclass (our signal handling) — built once, with its h11 Protocol subclass
    (the request-head deadline), both kept on `_Uvicorn`."""
    if _Uvicorn.cls is not None:
        return _Uvicorn.cls
    Server = _make_server_class()
    Protocol = _make_protocol_class()
    _Uvicorn.cls = Server
    _Uvicorn.protocol = Protocol
    return Server


def _make_server_class() -> Any:
    """uvicorn.Server whose SIGINT/SIGTERM start the runtime's drain (see the class docstring)."""
    import contextlib
    import os
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server whose signals start our drain instead of uvicorn's own shutdown, and which does not
        re-raise the captured signal after a graceful exit (uvicorn does, which would turn exit 0 into −15)."""

        runtime: ServeRuntime

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:  # runs on the main thread, between bytecodes
            runtime = self.runtime
            if sig == signal.SIGINT and runtime.shutting_down:
                os.write(2, b"macprovider: second interrupt, exiting now\n")
                os._exit(130)
            if runtime.loop is None:  # not started yet: let uvicorn stop the startup
                self.should_exit = True
                return
            # Only flags and a wake-up here: engine locks may be held by the interrupted code.
            runtime.loop.call_soon_threadsafe(runtime.begin_shutdown, signal.Signals(sig).name)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                await self.runtime.on_started(self)

    return Server


def _make_protocol_class() -> Any:
    """uvicorn's h11 protocol with a deadline for a complete request head (see the class docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        """uvicorn's h11 protocol plus a deadline for a complete request head (REQUEST_HEAD_TIMEOUT_S), armed
        when the connection opens and again when each response completes."""

        _head_deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_deadline()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            self._cancel_head_deadline()
            if not self.transport.is_closing():
                self._head_deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_timed_out, self.cycle)

        def _cancel_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self, cycle_when_armed: Any) -> None:
            # A new head makes a new cycle; the same cycle with its response complete means none came.
            waiting = self.cycle is cycle_when_armed and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def raise_open_file_limit(wanted: int = 4 * CONNECTION_LIMIT) -> int:
    """Raise the soft RLIMIT_NOFILE toward `wanted` (never above the hard limit); the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ServeRuntime:
    """One serving process: the app under uvicorn, the engine loaded on a background thread, a watchdog on
    the generation thread, and the drain on SIGTERM/SIGINT (docs/api.md#engine-semantics).

    Exit codes from `run()`: 0 after a signal-initiated drain, 1 when loading failed, the generation
    thread died, or the address could not be bound. `started` is set once the socket listens (`port` is
    then the bound port; settings.port 0 picks a free one).
    """

    def __init__(
        self, engine: EngineProtocol | ServeFleet, settings: Settings, api_key: str | None, *, load: bool = True
    ):
        import threading

        import uvicorn

        self.settings = settings
        self.app = create_app(engine, settings, api_key)
        self.fleet: ServeFleet = self.app.state.fleet
        self.engine = engine if not isinstance(engine, ServeFleet) else None  # the one engine handed in, if so
        self.state: ServerState = self.app.state.macprovider
        self.load_on_start = load
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self.started = threading.Event()
        self.shutting_down = False
        self.loaded = False
        self.exit_code = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        server_class = _uvicorn_server_class()
        config = uvicorn.Config(
            self.app,
            http=_Uvicorn.protocol,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=settings.log_level == "debug",
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=int(CANCEL_GRACE_S),
            timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
            limit_concurrency=CONNECTION_LIMIT,
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        )
        self.server = server_class(config)
        self.server.runtime = self

    # -- entry
    def run(self) -> int:
        """Serve until shut down; the exit code."""
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits on a bind failure after logging the OSError
            log.error("cannot listen on %s:%s", self.settings.host, self.settings.port)
            return 1
        return self.exit_code

    def request_shutdown(self, reason: str = "shutdown requested") -> None:
        """Start the drain from any thread (what SIGTERM does)."""
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.begin_shutdown, reason)
            except RuntimeError:  # the loop is closed: already shut down
                pass

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    # -- lifecycle (event loop)
    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_started(self, server: Any) -> None:
        import threading

        self.loop = asyncio.get_running_loop()
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self._spawn(self._watchdog())
        self._spawn(self.fleet.run_sweeper())
        static = [engine for engine in self.fleet.static_engines() if hasattr(engine, "load")]
        if self.load_on_start and static:
            log.info("loading model %s", self.fleet.primary.id)
            threading.Thread(target=self._load, args=(static,), name="macprovider-load", daemon=True).start()
        elif self.load_on_start and self.fleet.pinned_pending():
            self._spawn(self._load_pinned())
        else:
            self._on_loaded(None)
        self.started.set()

    def _load(self, engines: list[Any]) -> None:
        error: BaseException | None = None
        try:
            for engine in engines:
                engine.load()
        except BaseException as exc:  # noqa: BLE001 - reported on the loop
            error = exc
        try:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._on_loaded, error)
        except RuntimeError:  # the loop already closed: we are exiting anyway
            pass

    async def _load_pinned(self) -> None:
        try:
            await self.fleet.load_pinned()
        except Exception as exc:  # noqa: BLE001 - a pinned model that cannot load fails the start
            self._on_loaded(exc)
            return
        self._on_loaded(None)

    def _on_loaded(self, error: BaseException | None) -> None:
        if error is not None:
            from macprovider.core.errors import MacproviderError

            detail = str(error) if isinstance(error, MacproviderError) else f"{error.__class__.__name__}: {error}"
            log.error("cannot load model %s: %s", self.fleet.primary.id, detail.splitlines()[0] if detail else "")
            self.state.load_failed = True
            self.exit_code = 1
            self.server.should_exit = True
            return
        self.loaded = True
        if not self.shutting_down:
            primary = self.fleet.primary
            others = f" (+{len(self.fleet.models) - 1} more on demand)" if len(self.fleet.models) > 1 else ""
            log.info(
                "ready: serving %s%s at %s (max_batch=%d, max_context=%d, kv_bits=%s)",
                primary.id,
                others,
                self.url,
                primary.max_batch,
                primary.max_context,
                primary.kv_bits,
            )

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.state.idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def begin_shutdown(self, reason: str) -> None:
        """Stop admitting (503 `draining`), then drain: wait ≤ drain_timeout_s, cancel the rest, exit."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.state.draining = True
        log.info(
            "%s: draining, %d request(s) in flight (up to %g s)",
            reason,
            self.state.in_flight,
            self.settings.drain_timeout_s,
        )
        for engine in self._engines():
            try:
                engine.start_draining()
            except Exception as exc:  # noqa: BLE001 - the drain must go on
                log.error("engine.start_draining failed: %s", exc.__class__.__name__)
        self._spawn(self._drain())

    async def _drain(self) -> None:
        if not await self._wait_idle(self.settings.drain_timeout_s):
            log.warning("drain timeout: cancelling %d request(s) still in flight", self.state.in_flight)
            for engine in self._engines():
                engine.cancel_all("server shutting down")
            await self._wait_idle(CANCEL_GRACE_S)
        log.info("drained; exiting")
        self.server.should_exit = True

    def _engines(self) -> list[Any]:
        """The engines that may hold requests: the one handed in, or every loaded one of the fleet."""
        return [self.engine] if self.engine is not None else self.fleet.loaded_engines()

    async def _watchdog(self) -> None:
        while not self.server.should_exit:
            if self.loaded and self.fleet.dead_model() is not None:
                self.state.engine_dead = True
                self.exit_code = 1
                log.error("the generation thread died; exiting with status 1 so a supervisor restarts the server")
                await self._wait_idle(DEATH_GRACE_S)
                self.server.should_exit = True
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)


def configure_logging(level: str) -> None:
    """Log lines on stderr: `time level logger: message`, at `level` for macprovider and uvicorn."""
    import sys

    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("macprovider", "uvicorn"):
        logging.getLogger(name).setLevel(level.upper())


def run_server(plan: ServePlan, engine: EngineProtocol | ServeFleet) -> int:
    """`macprovider serve` after preflight: listen, load `engine` (built, not loaded) in the background, serve
    until drained. The engine is handed in (`commands/serve.py` builds `engine.engine.Engine`), so this
    package never imports MLX. Returns the process exit code (0 after a drain, 1 on load failure / engine
    death / bind failure)."""
    configure_logging(plan.settings.log_level)
    raise_open_file_limit()
    runtime = ServeRuntime(engine, plan.settings, plan.api_key)
    # The engine's generation thread is a daemon and is left to the interpreter's exit: joining it first
    # (Engine.close) makes MLX abort the process at exit ("terminate called without an active exception").
    return runtime.run()
