"""`/v1/messages` and `/v1/messages/count_tokens` (Anthropic Messages API) as a translation onto the
request/stream core (docs/api.md).

    prepare(data, model_id) -> (Turn, AnthropicSurface)
    AnthropicSurface.events(generation)   `event: <type>` SSE: message_start, ping, per block
        content_block_start → content_block_delta (text_delta | input_json_delta) → content_block_stop,
        message_delta (stop_reason, stop_sequence, usage), message_stop; or an `error` event
    AnthropicSurface.respond(generation)  the `Message` object, or Anthropic's error envelope
    count_turn(data, model_id) -> (messages, tools)   what count_tokens encodes
    router(ctx) -> APIRouter   POST /v1/messages (through `ctx.generate`), POST /v1/messages/count_tokens
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import GenerationRequest
from macprovider.serve import anthropic_schemas as shapes
from macprovider.serve import core
from macprovider.serve import openai_schemas as schemas
from macprovider.serve.context import AppContext
from macprovider.serve.core import Generation, Turn
from macprovider.serve.openai_api import check_model


def prepare(data: dict[str, Any], model_id: str) -> tuple[Turn, AnthropicSurface]:
    """A /v1/messages body → (Turn, surface). Raises ApiError 400 / 404."""
    request = shapes.parse_request(data)
    check_model(request.model, model_id)
    tools, choice = shapes.chat_tools(request)
    grammar = shapes.output_grammar(request)
    generation = GenerationRequest(
        prompt_tokens=(),
        max_tokens=request.max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        stop=tuple(request.stop_sequences or ()),
        grammar=grammar,
    )
    turn = Turn(
        shapes.chat_messages(request),
        generation,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=not request.single_tool_use,
    )
    return turn, AnthropicSurface(request.model, bool(request.stream))


def count_turn(data: dict[str, Any], model_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A count_tokens body → (chat messages, tools) to encode. Raises ApiError 400 / 404."""
    request = shapes.parse_request(data, count_only=True)
    check_model(request.model, model_id)
    return shapes.chat_messages(request), shapes.chat_tools(request)[0]


def error_response(exc: ApiError) -> Response:
    """Anthropic's error envelope with the error's status and headers."""
    return JSONResponse(shapes.error_body(exc), status_code=exc.status, headers=exc.headers)


def sse(kind: str, payload: dict[str, Any]) -> bytes:
    """One `event: <kind>` server-sent event whose data carries `"type": kind`."""
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


class AnthropicSurface:
    """Turns a Generation's deltas into Anthropic content blocks and stream events."""

    error_response = staticmethod(error_response)

    def __init__(self, model: str, streaming: bool):
        self.model = model
        self.streaming = streaming
        self.id = shapes.new_id("msg")

    async def events(self, generation: Generation) -> AsyncIterator[bytes]:
        """The event stream (see the module docstring)."""
        start_usage = {"input_tokens": generation.prompt_tokens, "output_tokens": 0}
        yield sse("message_start", {"message": shapes.message_object(self.id, self.model, [], None, None, start_usage)})
        yield sse("ping", {})
        index = -1
        text_open = False
        async for delta in generation.deltas():
            if delta.text:
                if not text_open:
                    index += 1
                    text_open = True
                    yield sse("content_block_start", {"index": index, "content_block": shapes.text_block("")})
                yield sse("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": delta.text}})
            for call in delta.calls:
                if text_open:
                    yield sse("content_block_stop", {"index": index})
                    text_open = False
                index += 1
                yield sse(
                    "content_block_start",
                    {"index": index, "content_block": shapes.tool_use_block(call, with_input=False)},
                )
                yield sse(
                    "content_block_delta",
                    {
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": call["function"]["arguments"]},
                    },
                )
                yield sse("content_block_stop", {"index": index})
        if text_open:
            yield sse("content_block_stop", {"index": index})
        if generation.error is not None:
            yield sse("error", {"error": shapes.error_body(generation.error)["error"]})
            return
        assert generation.usage is not None
        stop = shapes.stop_reason(generation.finish_reason, generation.stop_sequence)
        usage = shapes.usage_object(generation.usage)
        yield sse(
            "message_delta", {"delta": {"stop_reason": stop, "stop_sequence": generation.stop_sequence}, "usage": usage}
        )
        yield sse("message_stop", {})

    async def respond(self, generation: Generation) -> Response:
        """The non-streaming `Message`, or the error envelope if the engine failed the sequence."""
        text, calls, _ = await generation.collect()
        if generation.error is not None:
            return self.error_response(generation.error)
        assert generation.usage is not None
        content = [shapes.text_block(text)] if text or not calls else []
        content += [shapes.tool_use_block(call) for call in calls]
        stop = shapes.stop_reason(generation.finish_reason, generation.stop_sequence)
        return JSONResponse(
            shapes.message_object(
                self.id, self.model, content, stop, generation.stop_sequence, shapes.usage_object(generation.usage)
            )
        )


def router(ctx: AppContext) -> APIRouter:
    """The Messages API routes over `ctx`. Their errors are answered in Anthropic's envelope (the app's
    handlers pick it for every path under /v1/messages, too)."""
    api = APIRouter()

    @api.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await ctx.generate(request, prepare, error_response)

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        try:
            ctx.require_loaded()
            data, model = ctx.routed(schemas.parse_json_body(await ctx.read_body(request)))
            messages, tools = count_turn(data, model)
            lease = await ctx.fleet.acquire(model)
            try:
                # A count beyond the context is refused as the generation would be, before tokenizing it all.
                core.check_prompt_bound(lease.engine, messages, "messages")
                tokens = await run_in_threadpool(lease.engine.encode_chat, messages, tools or None)
            finally:
                lease.release()
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"input_tokens": len(tokens)})

    return api
