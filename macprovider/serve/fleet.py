"""The fleet: the one owner of "which models this server may serve and which are loaded".

Every API module asks it (`resolve` a name or alias → `FleetModel`; `acquire` → a `Lease` on a loaded
engine), as vLLM's `OpenAIServingModels` and mlx-lm's `ModelProvider` are asked; nothing else keeps a
model id or an engine of its own.

    fleet = ServeFleet(models, load=load_engine, release=release_engine, budget_bytes=B, wait_timeout_s=60)
    ServeFleet.of_engine(engine)       a fleet of one over an engine built elsewhere (pinned, never unloaded)
    lease = await fleet.acquire(name)  loads the model if needed; lease.engine; lease.release() when done
    await fleet.sweep()                unload idle models whose keep_alive ran out (the runtime calls it)

Rules (all state lives on the event loop; loads and releases run on worker threads):
- Only listed models load (an allow-list); a name is an id, an alias, or matches a glob alias (`fnmatch`:
  `claude-*haiku*`); anything else is 404 `model_not_found` naming the available models.
- One load per model at a time: concurrent requests for a model being loaded await the same future.
- Admission by memory: a model loads when the estimates (`models.memory.estimate`) of everything resident
  or loading plus its own fit `budget_bytes`; otherwise idle models are unloaded least recently used first.
  A model with requests in flight, or pinned, is never unloaded. When even that cannot make room, the request
  waits up to `wait_timeout_s` for a change, then gets 503 `model_busy` with Retry-After. A model whose
  estimate exceeds the budget alone is refused at once: 503 `model_too_large`.
- keep_alive: an idle model unloads `keep_alive` seconds after its last request ended (0: at once; -1: never).

Imports: `engine.protocol` (types) and `errors` only — engines come from the `load` callable, so tests use
fake engines and a fake clock.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EngineProtocol, EngineStats

log = logging.getLogger("macprovider.serve.fleet")

ModelState = Literal["loaded", "loading", "unloaded"]
KEEP_FOREVER = -1.0


@dataclass(frozen=True)
class FleetModel:
    """One servable model. max_context (tokens, `context_length` in /v1/models), max_batch, kv_bits,
    speculative (`off` | `prompt-lookup`): its knobs; keep_alive: idle seconds before it unloads (KEEP_FOREVER = never); estimate_bytes: the memory it
    needs loaded (0 = unknown, counted as nothing); kind: which engine serves it (`engine.factory`);
    plan: what the `load` callable builds it from (an `engine.protocol.ServePlan` for `serve`)."""

    id: str
    aliases: tuple[str, ...] = ()
    max_context: int = 0
    max_batch: int = 1
    kv_bits: int | None = None
    speculative: str = "off"
    keep_alive: float = 300.0
    pinned: bool = False
    estimate_bytes: int = 0
    kind: str = "chat"
    plan: Any = None

    def matches(self, name: str) -> bool:
        """Whether `name` is this model's id or an alias, or matches a glob alias."""
        if name == self.id or name in self.aliases:
            return True
        return any(_is_glob(alias) and fnmatch.fnmatchcase(name, alias) for alias in self.aliases)


def _is_glob(alias: str) -> bool:
    return any(ch in alias for ch in "*?[")


class _Slot:
    """A model's mutable state (event loop only)."""

    def __init__(self, model: FleetModel, engine: EngineProtocol | None = None):
        self.model = model
        self.engine = engine
        self.static = engine is not None  # handed in: loaded by the runtime at start, never unloaded
        self.loading: asyncio.Future[None] | None = None
        self.in_flight = 0
        self.last_used = 0.0
        self.loads = 0
        self.unloads = 0
        self.load_seconds = 0.0
        self.memory_measured_bytes = 0
        self.last_error: str | None = None

    @property
    def state(self) -> ModelState:
        if self.static:
            assert self.engine is not None
            engine_state = self.engine.stats().state
            return "loading" if engine_state == "loading" else "loaded"
        if self.loading is not None:
            return "loading"
        return "loaded" if self.engine is not None else "unloaded"


class Lease:
    """A loaded model held for one request: `engine` stays loaded until `release()` (idempotent)."""

    def __init__(self, fleet: ServeFleet, slot: _Slot):
        assert slot.engine is not None
        self.fleet = fleet
        self.model = slot.model
        self.engine: EngineProtocol = slot.engine
        self._slot: _Slot | None = slot

    def release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self.fleet._release(slot)


class ServeFleet:
    """See the module docstring. `load(model) -> engine` builds and loads an engine (blocking, run on a worker
    thread); `release(engine)` stops it and gives its memory back; `budget_bytes` None = no memory limit;
    `clock` (seconds, monotonic) drives keep_alive and idle times; `measure() -> bytes` reads the memory a load
    adds (`serve` passes MLX's active memory), reported per model as `memory_measured_bytes`."""

    def __init__(
        self,
        models: list[FleetModel] | tuple[FleetModel, ...],
        *,
        load: Callable[[FleetModel], EngineProtocol] | None = None,
        release: Callable[[EngineProtocol], None] | None = None,
        budget_bytes: int | None = None,
        wait_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        engines: dict[str, EngineProtocol] | None = None,
        measure: Callable[[], int] | None = None,
    ):
        if not models:
            raise ValueError("a fleet needs at least one model")
        engines = engines or {}
        self.models = tuple(models)
        self._slots = {model.id: _Slot(model, engines.get(model.id)) for model in self.models}
        self._load_fn = load
        self._release_fn = release
        self.budget_bytes = budget_bytes
        self.wait_timeout_s = wait_timeout_s
        self.clock = clock
        self._measure = measure
        self._admission: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def of_engine(cls, engine: EngineProtocol) -> ServeFleet:
        """A fleet of one over `engine` (built, maybe not yet loaded): pinned, never unloaded."""
        model = FleetModel(
            engine.model_id,
            max_context=engine.max_context,
            max_batch=engine.max_batch,
            kv_bits=engine.kv_bits,
            speculative=getattr(engine, "speculative", "off"),
            keep_alive=KEEP_FOREVER,
            pinned=True,
        )
        return cls([model], engines={engine.model_id: engine})

    # ------------------------------------------------------------------ names
    @property
    def primary(self) -> FleetModel:
        """The first listed model: the default the single-model fields of health describe."""
        return self.models[0]

    def resolve(self, name: str) -> FleetModel:
        """The model `name` means: an id, then an exact alias, then the first glob alias it matches (list order).
        Raises ApiError 404 `model_not_found` naming the available models."""
        if name in self._slots:
            return self._slots[name].model
        for model in self.models:
            if name in model.aliases:
                return model
        for model in self.models:
            if model.matches(name):
                return model
        available = ", ".join(repr(model.id) for model in self.models)
        raise ApiError(
            404, "model_not_found", f"the model {name!r} is not served here; available: {available}", param="model"
        )

    def state(self, model_id: str) -> ModelState:
        """loaded | loading | unloaded."""
        return self._slots[model_id].state

    def engine(self, model_id: str) -> EngineProtocol | None:
        """The model's engine while it is loaded (or, for an engine handed in, always)."""
        return self._slots[model_id].engine

    def static_engines(self) -> list[EngineProtocol]:
        """Engines handed in (`of_engine`): the runtime loads them at start."""
        return [slot.engine for slot in self._slots.values() if slot.static and slot.engine is not None]

    def loaded_engines(self) -> list[EngineProtocol]:
        """Every engine that is loaded now."""
        return [slot.engine for slot in self._slots.values() if slot.engine is not None and slot.state == "loaded"]

    def dead_model(self) -> str | None:
        """The id of a loaded model whose generation thread died, or None."""
        for slot in self._slots.values():
            if slot.engine is not None and not slot.engine.is_alive():
                return slot.model.id
        return None

    def pinned_pending(self) -> bool:
        """Whether a pinned model is not loaded yet (the server is still starting)."""
        return any(slot.model.pinned and slot.state != "loaded" for slot in self._slots.values())

    # ------------------------------------------------------------------ memory
    def resident_bytes(self) -> int:
        """The estimates of every loaded or loading model, bytes."""
        return sum(slot.model.estimate_bytes for slot in self._slots.values() if slot.state != "unloaded")

    def _fits(self, extra: int) -> bool:
        return self.budget_bytes is None or self.resident_bytes() + extra <= self.budget_bytes

    # ------------------------------------------------------------------ loop plumbing
    def _loop_objects(self) -> tuple[asyncio.Lock, asyncio.Event]:
        if self._admission is None or self._changed is None:
            self._admission, self._changed = asyncio.Lock(), asyncio.Event()
        return self._admission, self._changed

    def _signal(self) -> None:
        """Wake every request waiting for room (a model finished, loaded or unloaded)."""
        _, changed = self._loop_objects()
        changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ acquire / release
    async def acquire(self, name: str) -> Lease:
        """A lease on the loaded engine of the model `name` means, loading it (and unloading idle models to
        make room) if needed. Raises ApiError: 404 `model_not_found`, 503 `model_too_large` (its estimate
        exceeds the budget alone), 503 `model_busy` with Retry-After (no room within `wait_timeout_s`: the
        models that would have to go have requests in flight), 503 `model_not_loaded` (its load failed)."""
        model = self.resolve(name)
        slot = self._slots[model.id]
        deadline: float | None = None
        while True:
            if slot.state == "loaded":
                slot.in_flight += 1
                slot.last_used = self.clock()
                return Lease(self, slot)
            if slot.loading is not None:
                await asyncio.shield(slot.loading)
                continue
            if slot.static:  # handed in and still loading: the runtime loads it
                raise ApiError(503, "model_not_loaded", "the model is still loading", headers={"Retry-After": "1"})
            _, changed = self._loop_objects()
            if await self._admit(slot):
                continue
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_timeout_s if deadline is None else deadline
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                raise self._busy_error(model) from None

    def _busy_error(self, model: FleetModel) -> ApiError:
        busy = [s.model.id for s in self._slots.values() if s.state != "unloaded" and (s.in_flight or s.model.pinned)]
        return ApiError(
            503,
            "model_busy",
            f"the model {model.id!r} cannot be loaded now: it does not fit in memory beside the models that are "
            f"serving requests or pinned ({', '.join(busy) or 'none'}); retry shortly",
            headers={"Retry-After": str(max(1, math.ceil(min(self.wait_timeout_s, 30.0))))},
        )

    async def _admit(self, slot: _Slot) -> bool:
        """Start loading `slot` when it fits, unloading idle models least recently used first to make room.
        False when it cannot fit until a busy model finishes. Raises 503 `model_too_large`."""
        model = slot.model
        if self.budget_bytes is not None and model.estimate_bytes > self.budget_bytes:
            raise ApiError(
                503,
                "model_too_large",
                f"the model {model.id!r} needs about {model.estimate_bytes / 2**30:.2f} GiB (memory estimate), more "
                f"than this server's memory budget of {self.budget_bytes / 2**30:.2f} GiB even alone",
            )
        admission, _ = self._loop_objects()
        async with admission:
            if slot.state != "unloaded":
                return True
            if not self._fits(model.estimate_bytes):
                assert self.budget_bytes is not None
                need = self.resident_bytes() + model.estimate_bytes - self.budget_bytes
                idle = sorted(
                    (
                        s
                        for s in self._slots.values()
                        if s.state == "loaded" and not s.static and not s.in_flight and not s.model.pinned
                    ),
                    key=lambda s: s.last_used,
                )
                victims, freed = [], 0
                for victim in idle:
                    if freed >= need:
                        break
                    victims.append(victim)
                    freed += victim.model.estimate_bytes
                if freed < need:
                    return False
                for victim in victims:
                    log.info("unloading %s (least recently used) to make room for %s", victim.model.id, model.id)
                    await self._unload(victim)
            slot.loading = asyncio.get_running_loop().create_future()
            slot.loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # waiters get it; none: quiet
            self._spawn(self._load(slot))
            return True

    async def _load(self, slot: _Slot) -> None:
        assert slot.loading is not None and self._load_fn is not None
        future = slot.loading
        model = slot.model
        started, before = time.perf_counter(), self._measure() if self._measure else 0
        log.info("loading model %s", model.id)
        try:
            engine = await asyncio.to_thread(self._load_fn, model)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the reason, the server carries on
            detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            log.error("cannot load model %s: %s", model.id, detail)
            slot.last_error = detail
            slot.loading = None
            future.set_exception(ApiError(503, "model_not_loaded", f"cannot load model {model.id!r}: {detail}"))
            self._signal()
            return
        slot.engine = engine
        slot.loading = None
        slot.loads += 1
        slot.last_used = self.clock()
        slot.load_seconds = time.perf_counter() - started
        slot.memory_measured_bytes = max(0, (self._measure() if self._measure else 0) - before)
        slot.last_error = None
        log.info("loaded model %s in %.2f s", model.id, slot.load_seconds)
        future.set_result(None)  # the waiters take their leases before keep_alive 0 can unload it (on release)
        self._signal()

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        slot.last_used = self.clock()
        self._signal()
        if slot.in_flight == 0 and slot.model.keep_alive == 0 and not slot.model.pinned and not slot.static:
            self._spawn(self._unload_if_idle(slot))

    async def _unload(self, slot: _Slot) -> None:
        """Unload `slot` (idle, loaded): it reads as unloaded at once; its memory is back when this returns."""
        engine, slot.engine = slot.engine, None
        slot.unloads += 1
        log.info("unloading model %s", slot.model.id)
        if engine is not None and self._release_fn is not None:
            await asyncio.to_thread(self._release_fn, engine)
        del engine
        self._signal()

    async def _unload_if_idle(self, slot: _Slot) -> bool:
        admission, _ = self._loop_objects()
        async with admission:
            if slot.state != "loaded" or slot.in_flight or slot.static or slot.model.pinned:
                return False
            await self._unload(slot)
            return True

    # ------------------------------------------------------------------ keep_alive, operator actions
    async def sweep(self) -> list[str]:
        """Unload every idle, unpinned model whose keep_alive has run out; the ids unloaded."""
        now = self.clock()
        done = []
        for slot in list(self._slots.values()):
            keep = slot.model.keep_alive
            if slot.state == "loaded" and not slot.in_flight and keep >= 0 and now - slot.last_used >= keep:
                if await self._unload_if_idle(slot):
                    done.append(slot.model.id)
        return done

    async def run_sweeper(self, interval_s: float = 1.0) -> None:
        """`sweep()` every `interval_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - keep sweeping; the next pass retries
                log.error("keep_alive sweep failed: %s", exc.__class__.__name__, exc_info=exc)

    async def load(self, name: str) -> FleetModel:
        """Load the model `name` means (as a request would) and leave it loaded, idle. Raises as `acquire`."""
        lease = await self.acquire(name)
        lease.release()
        return lease.model

    async def load_pinned(self) -> None:
        """Load every pinned model that the fleet builds itself (at start). Raises ApiError as `acquire`."""
        for model in self.models:
            if model.pinned and not self._slots[model.id].static:
                await self.load(model.id)

    async def unload(self, name: str) -> FleetModel:
        """Unload the model `name` means once its requests finish (waiting up to `wait_timeout_s`).
        Raises ApiError 404, 400 `invalid_request` (pinned), 503 `model_busy` (still serving at the deadline)."""
        model = self.resolve(name)
        slot = self._slots[model.id]
        if model.pinned or slot.static:
            raise ApiError(400, "invalid_request", f"the model {model.id!r} is pinned: it stays loaded", param="model")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout_s
        while True:
            if slot.loading is not None:
                try:
                    await asyncio.shield(slot.loading)
                except ApiError:
                    return model
            _, changed = self._loop_objects()
            if slot.state == "unloaded" or await self._unload_if_idle(slot):
                return model
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                raise self._busy_error(model) from None

    # ------------------------------------------------------------------ what health and /v1/models show
    def stats(self, model_id: str) -> EngineStats | None:
        """The model's engine stats while loaded, else None."""
        slot = self._slots[model_id]
        return slot.engine.stats() if slot.engine is not None and slot.state != "unloaded" else None

    def describe(self) -> list[dict[str, Any]]:
        """Per model, for /v1/health, /metrics and `macprovider ps`: id, state, aliases, pinned, keep_alive_s,
        context_length, max_batch, kv_bits, speculative, requests_in_flight, active_sequences, idle_s (since its last
        request ended; null while serving or unloaded), loads, unloads, load_seconds (the last load),
        memory_estimate_bytes, memory_measured_bytes (growth of `measure()` over its last load)."""
        now = self.clock()
        out = []
        for slot in self._slots.values():
            state = slot.state
            stats = slot.engine.stats() if slot.engine is not None and state == "loaded" else None
            model = slot.model
            idle = state == "loaded" and not slot.in_flight and slot.loads > 0
            out.append(
                {
                    "id": model.id,
                    "state": state,
                    "aliases": list(model.aliases),
                    "kind": model.kind,
                    "pinned": model.pinned,
                    "keep_alive_s": model.keep_alive,
                    "context_length": model.max_context,
                    "max_batch": model.max_batch,
                    "kv_bits": model.kv_bits,
                    "speculative": model.speculative,
                    "requests_in_flight": slot.in_flight,
                    "active_sequences": stats.active_sequences if stats else 0,
                    "idle_s": round(now - slot.last_used, 3) if idle else None,
                    "loads": slot.loads,
                    "unloads": slot.unloads,
                    "load_seconds": round(slot.load_seconds, 3),
                    "memory_estimate_bytes": model.estimate_bytes,
                    "memory_measured_bytes": slot.memory_measured_bytes,
                    "last_error": slot.last_error,
                }
            )
        return out
