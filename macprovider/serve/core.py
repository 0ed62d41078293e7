"""The one request/stream core under every API surface (docs/api.md): OpenAI chat and completions, the
Responses API and the Anthropic Messages API are thin translations onto it, so sampling, stop handling, tool
parsing and constrained decoding exist once.

    Turn                       one generation in API-neutral terms (chat messages or a prompt, tools, sampling)
    start(engine, turn, ...)   -> Generation: tool markup + call grammar, encode, context check, submit
    Generation.deltas()        Delta(text, calls, logprobs) with tool-call markup split out; then
                               `finish_reason` stop|length|tool_calls and `usage`, or `error` (an ApiError)
    EventStream                a text/event-stream response that cancels its sequence when the client leaves
    until_disconnect(...)      await work unless the client disconnects first (raises ClientGone)

A surface builds a `Turn` from its request, then relays `Generation.deltas()` as its own stream events or
collects them (`Generation.collect()`) into its own response body.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EngineProtocol, GenerationChunk, GenerationRequest, TokenLogprob, Usage


@dataclass(frozen=True)
class Turn:
    """One generation, whatever API asked for it.

    messages: chat-template messages (roles system/user/assistant/tool; assistant `tool_calls` with
        arguments decoded to objects; tool messages with `tool_call_id`), or None for a raw `prompt`.
    prompt: the text-completion prompt when `messages` is None.
    param: the request field the prompt came from, named by the 400 (empty) and 413 (too long) errors.
    tools: OpenAI-shaped function tools `{"type": "function", "function": {name, description, parameters}}`.
    tool_choice: "auto", "none", "required" or a function name (forced by constrained decoding).
    parallel_tool_calls: False keeps only the first tool call of the answer (OpenAI `parallel_tool_calls:
        false`, Anthropic `tool_choice.disable_parallel_tool_use`); the rest of the markup is dropped.
    request: sampling, stop strings, seed, logprobs, grammar; its `prompt_tokens` are filled in by `start`.
    """

    messages: list[dict[str, Any]] | None
    request: GenerationRequest
    prompt: str | None = None
    param: str = "messages"
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "none"
    parallel_tool_calls: bool = True


@dataclass
class Delta:
    """Output since the previous delta: client text (tool-call markup removed), completed tool calls
    (OpenAI-shaped `{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}`), and the
    log-probabilities of the tokens generated meanwhile."""

    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: tuple[TokenLogprob, ...] = ()


class Generation:
    """A submitted turn. Iterate `deltas()` once; afterwards either `error` is set (an ApiError: the engine
    failed, the server drained, the sequence was cancelled) or `finish_reason` ("stop", "length",
    "tool_calls"), `usage` and `stop_sequence` (the request stop string that ended it, if one did) are.
    `close()` cancels the sequence unless it finished (idempotent)."""

    def __init__(
        self, handle: Any, splitter: Any, draining: Callable[[], bool], prompt_tokens: int, max_calls: int | None = None
    ):
        """max_calls: pass at most this many tool calls to the client (None: all)."""
        self.handle = handle
        self.max_calls = max_calls
        self.passed_calls = 0
        self.splitter = splitter  # engine.tool_calls.ToolCallSplitter when the turn has tools
        self.draining = draining
        self.prompt_tokens = prompt_tokens
        self.finished = False
        self.error: ApiError | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.stop_sequence: str | None = None
        self.calls = 0

    def _failure(self, chunk: GenerationChunk | None) -> ApiError:
        if self.draining():
            return ApiError(503, "draining", (chunk and chunk.error) or "the server is shutting down")
        if chunk is not None and chunk.finish_reason == "cancelled":
            return ApiError(503, "cancelled", chunk.error or "the request was cancelled")
        if chunk is not None and chunk.error and 400 <= chunk.error_status < 500:  # the request's own input
            return ApiError(chunk.error_status, "invalid_request", chunk.error, param=chunk.error_param)
        return ApiError(500, "internal_error", (chunk and chunk.error) or "generation ended without a result")

    def _passed(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.max_calls is not None:
            calls = calls[: max(0, self.max_calls - self.passed_calls)]
        self.passed_calls += len(calls)
        return calls

    async def deltas(self) -> AsyncIterator[Delta]:
        """The output as it arrives; a partial tool call cut off by `max_tokens` is flushed at the end."""
        final = None
        try:
            async for chunk in self.handle:
                if chunk.text or chunk.logprobs:
                    text, calls = self.splitter.feed(chunk.text) if self.splitter else (chunk.text, [])
                    calls = self._passed(calls)
                    if text or calls or chunk.logprobs:
                        yield Delta(text, calls, chunk.logprobs)
                if chunk.finish_reason is not None:
                    final = chunk
                    break
        finally:
            self.finished = final is not None
        if final is None or final.finish_reason in ("error", "cancelled") or final.usage is None:
            self.error = self._failure(final)
            return
        if self.splitter is not None:
            text, calls = self.splitter.finish()
            calls = self._passed(calls)
            if text or calls:
                yield Delta(text, calls)
            self.calls = self.splitter.calls
        self.usage = final.usage
        self.stop_sequence = final.stop_sequence
        self.finish_reason = "tool_calls" if final.finish_reason == "stop" and self.calls else final.finish_reason

    async def collect(self) -> tuple[str, list[dict[str, Any]], list[TokenLogprob]]:
        """All deltas joined: (text, tool calls, logprobs); then check `error` / `finish_reason`."""
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        logprobs: list[TokenLogprob] = []
        async for delta in self.deltas():
            text.append(delta.text)
            calls.extend(delta.calls)
            logprobs.extend(delta.logprobs)
        return "".join(text), calls, logprobs

    def close(self) -> None:
        if not self.finished:
            self.handle.cancel()


async def start(
    engine: EngineProtocol, turn: Turn, draining: Callable[[], bool], track: Callable[[Any, int], Any] | None = None
) -> Generation:
    """Encode and submit `turn`; `track(handle, prompt_tokens)` may wrap the engine's handle (the workload
    recorder). Raises ApiError: 400 (`tools` on a model without tool support, a forced tool_choice on a
    model whose call markup is not JSON, an empty prompt, encode errors), 413 `context_length_exceeded`,
    and whatever `engine.submit` raises (429, 503)."""
    from macprovider.serve.openai_schemas import context_length_error

    splitter, grammar = None, None
    if turn.tools:
        markup = getattr(engine, "tool_markup", None)
        if markup is None:
            raise ApiError(400, "invalid_request", "this model's chat template does not support tools", param="tools")
        from macprovider.serve.tool_calls import ToolCallSplitter, tool_call_grammar

        splitter = ToolCallSplitter(markup[0], markup[1], markup[2], turn.tools)
        if turn.tool_choice not in ("auto", "none"):
            if not getattr(markup[2], "__module__", "").endswith("json_tools"):
                raise ApiError(
                    400,
                    "invalid_request",
                    "a forced tool_choice needs a model with JSON tool-call markup (mlx-lm json_tools)",
                    param="tool_choice",
                )
            token_id = getattr(engine, "special_token_id", None) or (lambda _text: None)
            grammar = tool_call_grammar(
                turn.tools,
                turn.tool_choice,
                markup[0] + "\n",
                "\n" + markup[1],
                start_token=token_id(markup[0]),
                end_token=token_id(markup[1]),
            )
    check_prompt_bound(engine, turn.messages if turn.messages is not None else turn.prompt, turn.param)
    if turn.messages is not None:
        tokens = await run_in_threadpool(engine.encode_chat, turn.messages, turn.tools or None)
    else:
        tokens = await run_in_threadpool(engine.encode_text, turn.prompt or "")
    if not tokens:
        raise ApiError(400, "invalid_request", f"the {turn.param} is empty", param=turn.param)
    if len(tokens) > engine.max_context:
        raise context_length_error(len(tokens), engine.max_context, turn.param)
    if draining():
        raise ApiError(503, "draining", "the server is shutting down", headers={"Retry-After": "5"})
    request = dataclasses.replace(sampling_for(engine, turn.request), prompt_tokens=list(tokens))
    if grammar is not None:
        request = dataclasses.replace(request, grammar=grammar)
    handle = engine.submit(request)
    if track is not None:
        handle = track(handle, len(tokens))
    return Generation(handle, splitter, draining, len(tokens), max_calls=None if turn.parallel_tool_calls else 1)


# Slack on the character bound: a tokenizer normalizer may shorten text before splitting it (NFKC, accent
# stripping), so a token may cover a little more input than its own piece.
BOUND_SLACK = 2


def text_chars(value: Any) -> int:
    """Characters in every string of `value` (a prompt, or chat messages: nested dicts and lists), keys
    excluded. Iterative, so a deep body cannot exhaust the stack."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def prompt_token_floor(engine: EngineProtocol, prompt: Any) -> int:
    """A lower bound on the tokens `prompt` (text or messages) encodes to, without tokenizing: its characters
    over what one token can cover (`engine.max_token_chars`, times `BOUND_SLACK`). 0 when the engine does not
    say how long its tokens are."""
    per_token = int(getattr(engine, "max_token_chars", 0) or 0) * BOUND_SLACK
    return -(-text_chars(prompt) // per_token) if per_token > 0 else 0


def check_prompt_bound(engine: EngineProtocol, prompt: Any, param: str) -> None:
    """Raise 413 `context_length_exceeded` when `prompt` cannot fit `engine.max_context` whatever it
    tokenizes to (`prompt_token_floor`), so an oversized body costs a character count, not a full
    tokenization; the error reports that lower bound as the prompt length."""
    from macprovider.serve.openai_schemas import context_length_error

    floor = prompt_token_floor(engine, prompt)
    if floor > engine.max_context:
        raise context_length_error(floor, engine.max_context, param)


def sampling_for(engine: EngineProtocol, request: GenerationRequest) -> GenerationRequest:
    """`request` checked against the loaded model: `top_k` at or above the vocabulary (`engine.vocab_size`,
    when the engine knows it) keeps every token, so it becomes 0 (no truncation). Raises ApiError 400 naming
    the parameter for a value no model could take (negative `top_k`, a non-finite or out-of-range float) —
    the schemas bound these already; this is the last line before the engine."""
    import math

    floats = {
        "temperature": (request.temperature, 0.0, 2.0),
        "top_p": (request.top_p, 0.0, 1.0),
        "presence_penalty": (request.presence_penalty, -2.0, 2.0),
        "frequency_penalty": (request.frequency_penalty, -2.0, 2.0),
    }
    for name, (value, low, high) in floats.items():
        if not math.isfinite(value) or not low <= value <= high or (name == "top_p" and value == 0):
            raise ApiError(400, "invalid_request", f"{name} must be a number in [{low:g}, {high:g}]", param=name)
    if request.top_k < 0:
        raise ApiError(400, "invalid_request", "top_k must be 0 or more", param="top_k")
    vocab = int(getattr(engine, "vocab_size", 0) or 0)
    if vocab and request.top_k >= vocab:
        request = dataclasses.replace(request, top_k=0)
    return request


# ---------------------------------------------------------------------------------------------- streaming
class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await `work` while listening for `http.disconnect`; raise ClientGone if the client leaves first.
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
    raise ClientGone


class EventStream(Response):
    """ASGI `text/event-stream` response that listens for disconnect concurrently (whatever the ASGI spec
    version), closes its event generator however it ends, then calls `on_close()` (which cancels the
    sequence if it did not finish, and does the accounting)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):  # noqa: D107
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events = events
        self.on_close = on_close

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
            await until_disconnect(receive, pump())
        except (ClientGone, OSError):
            pass
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
            self.on_close()
