"""A fake `EngineProtocol` for HTTP tests: scripted output, no MLX.

Tokens are whitespace-separated words (a chat message adds one token for its role), so a test can size a
prompt exactly. Each submitted sequence yields the script's chunks, then (when `hold_after` is set) waits
after that many chunks until `release()` / a cancel / `cancel_all`, then finishes with the script's
finish_reason and a Usage. Everything a test calls from its own thread (`release_all`, `wait_active`,
`kill`, `handles[i].cancelled.wait`) is thread-safe; the handles themselves run on the server's loop.

`serving(engine)` runs `serve.runtime.ServeRuntime` over it on a real socket (127.0.0.1, port 0) in a background
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from macprovider.core.config import Settings
from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EngineStats, GenerationChunk, GenerationRequest, TokenLogprob, Usage
from macprovider.serve.runtime import ServeRuntime


@dataclass
class Script:
    """What every sequence produces: `chunks` of text (empty strings allowed), then `finish_reason`
    (`error` sends `error` text instead of usage; `stop_sequence` names the stop string a `stop` finish
    matched). One chunk is one token: with logprobs asked for, each carries a `TokenLogprob` of logprob
    −0.5 whose `token_bytes` come from `token_bytes` (else the text's UTF-8), and alternatives at −1, −2, …"""

    chunks: tuple[str, ...] = ("Hello", ",", "", " world")
    finish_reason: str = "stop"
    error: str | None = None
    cached_tokens: int = 2
    generation_ms: float = 12.5
    hold_after: int | None = None
    stop_sequence: str | None = None
    token_bytes: dict[str, bytes] = field(default_factory=dict)

    def logprob(self, text: str, top: int) -> TokenLogprob:
        own = self.token_bytes.get(text, text.encode("utf-8"))
        alternatives = tuple((f"alt{i}", -1.0 - i, f"alt{i}".encode()) for i in range(top))
        return TokenLogprob(text, -0.5, alternatives, own)


def parse_json_tool_call(text: str, tools: Any = None) -> dict[str, Any]:
    """mlx-lm's `json_tools.parse_tool_call` (`<tool_call>` JSON markup), without importing mlx-lm."""
    return json.loads(text.strip())


parse_json_tool_call.__module__ = "fake.json_tools"  # serve forces calls only for json_tools-style markup
JSON_TOOL_MARKUP = ("<tool_call>", "</tool_call>", parse_json_tool_call)


class FakeHandle:
    """One submitted sequence. `cancelled` is a threading.Event a test can wait on."""

    def __init__(self, engine: FakeEngine, request: GenerationRequest):
        self.engine = engine
        self.request = request
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._failure: str | None = None
        self.cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        if self.finished or self.cancelled.is_set():
            return
        self.cancelled.set()
        self.engine._retire(self)
        self._poke()

    def _poke(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            pass

    def fail(self, reason: str) -> None:
        self._failure = reason
        self._poke()

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        script = self.engine.script
        limit = self.request.max_tokens
        sent = 0
        finish = script.finish_reason
        for index, text in enumerate(script.chunks):
            if script.hold_after is not None and index == script.hold_after:
                await self._wake.wait()
            if self._failure or self.cancelled.is_set():
                break
            if limit is not None and sent >= limit:
                finish = "length"
                break
            sent += 1
            top = self.request.top_logprobs
            yield GenerationChunk(text=text, logprobs=() if top is None else (script.logprob(text, top),))
            await asyncio.sleep(0)
        else:
            if script.hold_after is not None and script.hold_after >= len(script.chunks):
                await self._wake.wait()
        self.finished = True
        self.engine._retire(self)
        if self.cancelled.is_set():
            yield GenerationChunk(finish_reason="cancelled", error="cancelled")
        elif self._failure or script.error:
            yield GenerationChunk(finish_reason="error", error=self._failure or script.error)
        else:
            usage = Usage(
                prompt_tokens=len(self.request.prompt_tokens),
                completion_tokens=sent,
                cached_tokens=script.cached_tokens,
                generation_ms=script.generation_ms,
                generated_tokens=sent + 1,
            )
            yield GenerationChunk(
                finish_reason=finish, usage=usage, stop_sequence=script.stop_sequence if finish == "stop" else None
            )


@dataclass
class FakeEngine:
    """Implements `engine.protocol.EngineProtocol` (plus `load()`), with knobs for tests."""

    model_id: str = "fake-org/fake-model"
    max_context: int = 64
    max_batch: int = 2
    kv_bits: int | None = None
    vocab_size: int = 256
    max_token_chars: int = 0  # 0: unknown, no character bound before encoding
    queue_limit: int = 4
    script: Script = field(default_factory=Script)
    state: str = "ready"
    alive: bool = True
    draining: bool = False
    encode_error: ApiError | None = None
    load_gate: threading.Event | None = None
    load_error: Exception | None = None
    submitted: list[GenerationRequest] = field(default_factory=list)
    handles: list[FakeHandle] = field(default_factory=list)
    encoded: list[Any] = field(default_factory=list)
    encoded_tools: list[Any] = field(default_factory=list)
    encode_threads: set[int] = field(default_factory=set)
    submit_threads: set[int] = field(default_factory=set)
    cancel_all_reasons: list[str] = field(default_factory=list)
    loaded: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._active: list[FakeHandle] = []

    tool_markup: Any = None  # None = no tool-call support; JSON_TOOL_MARKUP = Hermes-style `<tool_call>` JSON

    def encode_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        self.encode_threads.add(threading.get_ident())
        self.encoded.append(messages)
        if self.encode_error is not None:
            raise self.encode_error
        count = sum(1 + len(message["content"].split()) for message in messages)
        self.encoded_tools.append(tools)
        return list(range(count))

    def encode_text(self, prompt: str) -> list[int]:
        self.encode_threads.add(threading.get_ident())
        self.encoded.append(prompt)
        return list(range(len(prompt.split())))

    def submit(self, request: GenerationRequest) -> FakeHandle:
        self.submit_threads.add(threading.get_ident())
        if self.draining:
            raise ApiError(503, "draining", "the server is shutting down")
        if self.state not in ("ready", "busy"):
            raise ApiError(503, "model_not_loaded", "the model is not loaded")
        with self._cond:
            if len(self._active) >= self.queue_limit:
                raise ApiError(429, "rate_limit_exceeded", "queue full; retry shortly", headers={"Retry-After": "2"})
            handle = FakeHandle(self, request)
            self._active.append(handle)
            self.submitted.append(request)
            self.handles.append(handle)
            self._cond.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self._cond:
            active = len(self._active)
        state = "draining" if self.draining else self.state
        if state == "ready" and active >= self.max_batch:
            state = "busy"
        return EngineStats(
            state=state,  # type: ignore[arg-type]
            active_sequences=min(active, self.max_batch),
            peak_active_sequences=self.max_batch,
            queued_sequences=max(0, active - self.max_batch),
            kv_cache_bytes=1024,
            peak_kv_cache_bytes=4096,
            peak_memory_bytes=1 << 20,
            prompt_tokens_total=sum(len(r.prompt_tokens) for r in self.submitted),
            cached_prompt_tokens_total=7,
            generated_tokens_total=11,
        )

    def start_draining(self) -> None:
        self.draining = True

    def cancel_all(self, reason: str) -> None:
        self.cancel_all_reasons.append(reason)
        with self._cond:
            active = list(self._active)
        for handle in active:
            handle.fail(reason)

    def is_alive(self) -> bool:
        return self.alive

    def load(self) -> None:
        if self.load_gate is not None:
            self.load_gate.wait(30)
        if self.load_error is not None:
            self.alive = False
            raise self.load_error
        self.state = "ready"
        self.loaded.set()

    # -- test controls (any thread)
    def _retire(self, handle: FakeHandle) -> None:
        with self._cond:
            if handle in self._active:
                self._active.remove(handle)
            self._cond.notify_all()

    def active_count(self) -> int:
        with self._cond:
            return len(self._active)

    def wait_active(self, count: int, timeout: float = 10.0) -> bool:
        """Block until exactly `count` sequences are active (submitted, not finished or cancelled)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._active) == count, timeout)

    def release_all(self) -> None:
        """Let every held sequence finish."""
        with self._cond:
            active = list(self._active)
        for handle in active:
            handle._poke()

    def kill(self) -> None:
        """Simulate the generation thread dying."""
        self.alive = False
        self.state = "unavailable"


# ---------------------------------------------------------------------------------------------- harness


@dataclass
class Served:
    runtime: ServeRuntime
    engine: FakeEngine
    thread: threading.Thread
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.runtime.port}"

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=10, **kwargs)

    def exit_code(self, timeout: float = 15) -> int | None:
        self.thread.join(timeout)
        return self.result.get("code")

    def raw(self, data: bytes) -> bytes:
        """Send raw bytes on a fresh connection; everything the server answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.runtime.port), timeout=10) as sock:
            sock.sendall(data)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
            return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


@contextlib.contextmanager
def serving(
    engine: FakeEngine | None = None, *, api_key: str | None = None, load: bool = False, **overrides: Any
) -> Iterator[Served]:
    """A running server over `engine`; shut down (drained) on exit."""
    engine = engine or FakeEngine()
    overrides.setdefault("drain_timeout_s", 5.0)
    settings = Settings(model=engine.model_id, host=overrides.pop("host", "127.0.0.1"), port=0, **overrides)
    runtime = ServeRuntime(engine, settings, api_key, load=load)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", runtime.run()), daemon=True)
    thread.start()
    assert runtime.started.wait(15), "server did not start"
    served = Served(runtime, engine, thread, result)
    try:
        yield served
    finally:
        engine.release_all()
        runtime.request_shutdown("test teardown")
        thread.join(15)


def sse_events(text: str) -> list[Any]:
    """Parse an event-stream body into JSON payloads (and the string '[DONE]'); asserts the framing."""
    assert text.endswith("\n\n")
    events = []
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat_body(engine: FakeEngine, **extra: Any) -> dict[str, Any]:
    return {"model": engine.model_id, "messages": [{"role": "user", "content": "hi there"}], **extra}
