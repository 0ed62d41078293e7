"""Per-request state of one generated sequence, and the handle the HTTP layer iterates.

`OutputText` turns token ids into the text a client may see (docs/api.md#engine-semantics "Stop handling"): mlx-lm's
streaming detokenizer, special tokens (EOS, end-of-turn, `<|im_start|>` …) never decoded into text, and
request `stop` strings matched on text by mlx-lm's `TextStateMachine` — text that may be the start of a
stop string is held back until it is resolved, a matched stop string ends the sequence and is dropped.

`SequenceHandle` is the consumer side: the generation thread pushes `GenerationChunk`s with
`deliver()` (thread-safe, through `loop.call_soon_threadsafe`), the server iterates it asynchronously.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine

from macprovider.engine.protocol import GenerationChunk, Usage


class OutputText:
    """Token ids → client-visible text for one sequence.

    detokenizer: a fresh mlx-lm streaming detokenizer (`TokenizerWrapper.detokenizer`).
    hidden_token_ids: ids never rendered as text (the tokenizer's special tokens).
    stop: request stop strings (≤ 4).
    """

    def __init__(self, detokenizer: Any, hidden_token_ids: frozenset[int], stop: Sequence[str]):
        self._detokenizer = detokenizer
        self._hidden = hidden_token_ids
        self._stop = tuple(stop)
        self._machine = TextStateMachine({"normal": [(word, None) for word in stop]}) if stop else None
        self._state = self._machine.make_state("normal") if self._machine else None
        self._seen = ""  # text fed to the stop matcher, to name the stop string that matched
        self.stopped = False
        self.stop_sequence: str | None = None  # the stop string that ended the sequence

    def _filter(self, text: str) -> str:
        if self._machine is None or not text:
            return text
        self._seen += text
        self._state, emitted, state_name = TextStateMachine.step(self._state, text)
        if state_name is None:
            self.stopped = True
            matched = self._seen[: len(self._seen) - len(self._state[3])]  # the state's 4th item: text after the match
            self.stop_sequence = next((word for word in self._stop if matched.endswith(word)), None)
        return emitted

    def add(self, token: int) -> str:
        """Text that became safe to emit after `token` (may be empty). Sets `stopped` on a stop string."""
        if token in self._hidden:
            return ""
        self._detokenizer.add_token(token)
        return self._filter(self._detokenizer.last_segment)

    def finish(self, release_held: bool) -> str:
        """Flush the detokenizer; with `release_held`, also the text held back for a possible stop string
        (a sequence that ended by length: the held text was not a stop string)."""
        self._detokenizer.finalize()
        text = self._filter(self._detokenizer.last_segment)
        if release_held and self._machine is not None and not self.stopped:
            self._state, held, _ = TextStateMachine.flush(self._state)
            text += held
        return text


class SequenceHandle:
    """Consumer side of a sequence: `async for chunk in handle`; `cancel()` from any thread.

    Without a running event loop at creation (the engine's self-test), `wait()` collects synchronously.
    """

    def __init__(self, on_cancel: Callable[[SequenceHandle], None]):
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._async_queue: asyncio.Queue[GenerationChunk] | None = asyncio.Queue() if self._loop else None
        self._sync_queue: queue.SimpleQueue[GenerationChunk] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._cancel_lock = threading.Lock()
        self.cancelled = False
        self.finished = False

    def deliver(self, chunk: GenerationChunk) -> None:
        """Hand a chunk to the consumer (called from the generation thread)."""
        if self._loop is not None and self._async_queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._sync_queue.put(chunk)

    def cancel(self) -> None:
        """Ask the engine to drop this sequence; idempotent."""
        with self._cancel_lock:
            if self.cancelled or self.finished:
                return
            self.cancelled = True
        self._on_cancel(self)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        assert self._async_queue is not None, "handle created outside an event loop: use wait()"
        while True:
            chunk = await self._async_queue.get()
            yield chunk
            if chunk.finish_reason is not None:
                return

    def wait(self, timeout: float | None = None) -> list[GenerationChunk]:
        """Block until the sequence finishes; all its chunks. Raises queue.Empty on timeout."""
        chunks = []
        while True:
            chunk = self._sync_queue.get(timeout=timeout)
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                return chunks


@dataclass(eq=False)
class SequenceState:
    """Generation-thread state of one request (not thread-safe: only the generation thread touches it,
    except `handle.cancelled`)."""

    handle: SequenceHandle
    prompt: list[int]
    max_tokens: int
    sampler: Any
    logits_processors: list[Any]
    output: OutputText
    submitted_at: float = field(default_factory=time.perf_counter)
    uid: int | None = None
    cached_tokens: int = 0
    generated_tokens: int = 0
    completion_tokens: int = 0
    decode_started_at: float | None = None
    last_token_at: float | None = None
    top_logprobs: int | None = None
    # uid of a sequence still prefilling a prompt that shares this one's prefix: admission waits for its
    # prompt KV (Engine._admit) instead of prefilling the same tokens a second time.
    waits_for_prefix_of: int | None = None
    # Set (on the generation thread) when this sequence's own sampler, logits processor or detokenizer
    # raised: the engine ends this sequence alone with the error; the rest of the batch carries on.
    fault: BaseException | None = None

    def usage(self) -> Usage:
        """Usage for the final chunk; decode time runs from entering the decode batch to the last token."""
        generation_ms = 0.0
        if self.decode_started_at is not None and self.last_token_at is not None:
            generation_ms = max(0.0, (self.last_token_at - self.decode_started_at) * 1000.0)
        return Usage(
            prompt_tokens=len(self.prompt),
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            generation_ms=generation_ms,
            generated_tokens=self.generated_tokens,
        )
