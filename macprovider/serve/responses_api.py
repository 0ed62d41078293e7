"""`/v1/responses` (OpenAI Responses API) as a translation onto the request/stream core (docs/api.md).

ResponseStore(max_count, max_bytes)        recent responses for GET/DELETE and `previous_response_id`;
                                           bounded by count and by bytes, the oldest evicted first
prepare(data, model_id, store) -> (Turn, ResponsesSurface)
ResponsesSurface.events(generation)        typed SSE events (`event: <type>`), each with `sequence_number`:
    response.created, response.in_progress, then per output item output_item.added →
    (content_part.added, output_text.delta…, output_text.done, content_part.done | function_call_arguments
    .delta, .done) → output_item.done, and response.completed / response.incomplete / response.failed
ResponsesSurface.respond(generation)       the `Response` object, or the error envelope
router(ctx, store) -> APIRouter            POST /v1/responses (through `ctx.generate`), GET/DELETE
                                           /v1/responses/{id} from `store`
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import GenerationRequest
from macprovider.serve import responses_schemas as shapes
from macprovider.serve.context import AppContext
from macprovider.serve.core import Generation, Turn
from macprovider.serve.openai_api import OpenAISurface, check_model

STORE_MAX_RESPONSES = 256  # LM Studio and vllm-mlx keep a similar handful in memory; OpenAI keeps 30 days
STORE_MAX_BYTES = 64 * 1024 * 1024


class ResponseStore:
    """Stored responses: id → (the `Response` object, the chat messages a continuation starts from).

    Bounded by `max_count` entries and `max_bytes` (the JSON size of both parts); adding past either bound
    evicts the oldest. An entry larger than `max_bytes` by itself is not kept. Event-loop only."""

    def __init__(self, max_count: int = STORE_MAX_RESPONSES, max_bytes: int = STORE_MAX_BYTES):
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict[str, Any], history: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(history))
        if size > self.max_bytes:
            return
        self._entries[response["id"]] = (response, history, size)
        self.bytes += size
        while len(self._entries) > self.max_count or self.bytes > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def get(self, response_id: str, param: str = "response_id") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(response, history); ApiError 404 `response_not_found` (naming `param`) if absent."""
        entry = self._entries.get(response_id)
        if entry is None:
            raise not_found(response_id, param)
        return entry[0], entry[1]

    def delete(self, response_id: str) -> None:
        _, _, size = self._entries.pop(response_id, (None, None, 0))
        if size == 0:
            raise not_found(response_id, "response_id")
        self.bytes -= size


def not_found(response_id: str, param: str) -> ApiError:
    """OpenAI's 404 for an unknown response id."""
    return ApiError(404, "response_not_found", f"Response with id {response_id!r} not found.", param=param)


def prepare(data: dict[str, Any], model_id: str, store: ResponseStore) -> tuple[Turn, ResponsesSurface]:
    """A /v1/responses body → (Turn, surface). Raises ApiError 400 / 404."""
    from macprovider.serve.grammar import grammar_for

    request = shapes.parse_request(data)
    check_model(request.model, model_id)
    tools, choice = shapes.chat_tools(request)
    fmt = shapes.response_format(request)
    if choice not in ("auto", "none") and fmt is not None and fmt["type"] != "text":
        raise ApiError(
            400, "invalid_request", "text.format cannot be combined with a forced tool_choice", param="text.format"
        )
    try:
        grammar = grammar_for(fmt)
    except ApiError as exc:
        exc.param = "text.format"
        raise
    history = store.get(request.previous_response_id, "previous_response_id")[1] if request.previous_response_id else []
    conversation = history + shapes.input_messages(request.input)
    messages = ([{"role": "system", "content": request.instructions}] if request.instructions else []) + conversation
    generation = GenerationRequest(
        prompt_tokens=(),
        max_tokens=request.max_output_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        grammar=grammar,
    )
    turn = Turn(
        messages,
        generation,
        param="input",
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=request.parallel_tool_calls is not False,
    )
    return turn, ResponsesSurface(request, store, conversation)


class ResponsesSurface:
    """Turns a Generation's deltas into the Responses API's output items and typed events."""

    error_response = OpenAISurface.error_response

    def __init__(self, request: shapes.ResponsesRequest, store: ResponseStore, conversation: list[dict[str, Any]]):
        self.request = request
        self.store = store
        self.conversation = conversation  # this turn's messages without instructions (a continuation's start)
        self.streaming = bool(request.stream)
        self.id = shapes.new_id("resp")
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.sequence = 0

    def _response(self, status: str, usage: Any = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return shapes.response_object(
            self.id, self.created_at, self.request, status=status, output=self.output, usage=usage, error=error
        )

    def _finish(self, generation: Generation) -> dict[str, Any]:
        """The final Response object (and, when `store` is not false, remember it)."""
        if generation.error is not None:
            code = "server_error" if generation.error.status >= 500 else "invalid_prompt"
            return self._response("failed", error={"code": code, "message": generation.error.message})
        status = "incomplete" if generation.finish_reason == "length" else "completed"
        for item in self.output:
            item["status"] = status
        response = self._response(status, generation.usage)
        if self.request.store is not False:
            self.store.put(response, self.conversation + shapes.history_messages(self.output))
        return response

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()

    async def events(self, generation: Generation) -> AsyncIterator[bytes]:
        """The typed event stream (see the module docstring)."""
        yield self._event("response.created", response=self._response("in_progress"))
        yield self._event("response.in_progress", response=self._response("in_progress"))
        message: dict[str, Any] | None = None  # the open message item, if text is streaming into it

        def close_message(item: dict[str, Any], status: str = "completed") -> list[bytes]:
            index = len(self.output) - 1
            part = item["content"][0]
            base = {"item_id": item["id"], "output_index": index, "content_index": 0}
            return [
                self._event("response.output_text.done", **base, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **base, part=part),
                self._event("response.output_item.done", output_index=index, item=dict(item, status=status)),
            ]

        async for delta in generation.deltas():
            if delta.text:
                if message is None:
                    message = shapes.message_item(shapes.new_id("msg"), None, "in_progress")
                    self.output.append(message)
                    index = len(self.output) - 1
                    yield self._event("response.output_item.added", output_index=index, item=dict(message, content=[]))
                    message["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                    yield self._event(
                        "response.content_part.added",
                        item_id=message["id"],
                        output_index=index,
                        content_index=0,
                        part=message["content"][0],
                    )
                message["content"][0]["text"] += delta.text
                yield self._event(
                    "response.output_text.delta",
                    item_id=message["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=delta.text,
                    logprobs=[],
                )
            for call in delta.calls:
                if message is not None:
                    for event in close_message(message):
                        yield event
                    message = None
                item = shapes.function_call_item(shapes.new_id("fc"), call, "in_progress")
                self.output.append(item)
                index = len(self.output) - 1
                yield self._event("response.output_item.added", output_index=index, item=dict(item, arguments=""))
                yield self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=item["arguments"],
                )
                yield self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
                yield self._event("response.output_item.done", output_index=index, item=dict(item, status="completed"))
        if message is not None:
            for event in close_message(message, "incomplete" if generation.finish_reason == "length" else "completed"):
                yield event
        final = self._finish(generation)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            final["status"], "response.failed"
        )
        yield self._event(kind, response=final)

    async def respond(self, generation: Generation) -> Response:
        """The non-streaming `Response` object, or the error envelope if the engine failed the sequence."""
        text, calls, _ = await generation.collect()
        if generation.error is not None:
            return self.error_response(generation.error)
        if text:
            self.output.append(shapes.message_item(shapes.new_id("msg"), text, "completed"))
        for call in calls:
            self.output.append(shapes.function_call_item(shapes.new_id("fc"), call, "completed"))
        return JSONResponse(self._finish(generation))


def router(ctx: AppContext, store: ResponseStore) -> APIRouter:
    """The Responses API routes over `ctx`; `store` is the app's own bounded store (`app.state.responses`).
    Errors are answered in the OpenAI envelope."""
    api = APIRouter()

    @api.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await ctx.generate(
            request, lambda data, model: prepare(data, model, store), OpenAISurface.error_response
        )

    @api.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        return JSONResponse(store.get(response_id)[0])

    @api.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    return api
