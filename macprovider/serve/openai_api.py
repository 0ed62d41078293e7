"""`/v1/chat/completions` and `/v1/completions` as translations onto the request/stream core
(docs/api.md#chat-completions).

router(ctx) -> APIRouter            POST /v1/chat/completions, POST /v1/completions through `ctx.generate`
prepare_chat(data, model_id) / prepare_completion(data, model_id) -> (Turn, OpenAISurface)
OpenAISurface.events(generation)    SSE: role chunk (chat), content and tool-call chunks, the finish
                                    chunk, the usage chunk only when `stream_options.include_usage`
                                    is true, `[DONE]`; or one error event, then `[DONE]`
OpenAISurface.respond(generation)   the `chat.completion` / `text_completion` body, or the error envelope
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import TokenLogprob
from macprovider.serve import openai_schemas as schemas
from macprovider.serve.context import AppContext
from macprovider.serve.core import Generation, Turn


def check_model(model: str, model_id: str) -> None:
    """404 `model_not_found` unless `model` names the loaded model (docs/api.md#chat-completions)."""
    if model != model_id:
        raise ApiError(
            404,
            "model_not_found",
            f"the model {model!r} is not served here; this server serves {model_id!r}",
            param="model",
        )


def prepare_chat(data: dict[str, Any], model_id: str) -> tuple[Turn, OpenAISurface]:
    """A chat completion body → (Turn, surface). Raises ApiError 400 / 404."""
    body = schemas.parse_chat(data)
    check_model(body.model, model_id)
    tools, choice = body.tool_spec
    turn = Turn(
        schemas.normalize_messages(body),
        body.generation_request([], body.wanted_tokens),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )
    return turn, OpenAISurface(model_id, chat=True, streaming=body.streaming, include_usage=_include_usage(body))


def prepare_completion(data: dict[str, Any], model_id: str) -> tuple[Turn, OpenAISurface]:
    """A text completion body → (Turn, surface). Raises ApiError 400 / 404."""
    body = schemas.parse_completion(data)
    check_model(body.model, model_id)
    turn = Turn(None, body.generation_request([], body.wanted_tokens), prompt=body.prompt, param="prompt")
    return turn, OpenAISurface(model_id, chat=False, streaming=body.streaming, include_usage=_include_usage(body))


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class OpenAISurface:
    """Turns a Generation's deltas into OpenAI chat or text-completion objects (docs/api.md#chat-completions)."""

    def __init__(self, model: str, *, chat: bool, streaming: bool, include_usage: bool):
        self.model = model
        self.chat = chat
        self.streaming = streaming
        self.include_usage = include_usage
        self.id = schemas.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.text_offset = 0  # characters of token text already reported (completion `text_offset`)
        self.tool_calls = 0

    @staticmethod
    def error_response(exc: ApiError) -> Response:
        """The OpenAI error envelope (docs/api.md#errors)."""
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not entries:
            return None
        if self.chat:
            return schemas.chat_logprobs(entries)
        result = schemas.completion_logprobs(entries, self.text_offset)
        self.text_offset += sum(len(e.token) for e in entries)
        return result

    def _chunk(
        self,
        text: str = "",
        finish: str | None = None,
        usage: Any = None,
        role: bool = False,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> bytes:
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
            head = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            args = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, args):
                out.append(schemas.sse(schemas.chat_chunk(self.id, self.created, self.model, {"tool_calls": [part]})))
        return out

    async def events(self, generation: Generation) -> AsyncIterator[bytes]:
        """The SSE bytes of a streamed response (see the module docstring)."""
        if self.chat:
            yield self._chunk(role=True)
        async for delta in generation.deltas():
            if delta.text or delta.logprobs:
                yield self._chunk(delta.text, logprobs=delta.logprobs)
            for event in self._tool_chunks(delta.calls):
                yield event
        if generation.error is not None:
            yield schemas.sse(generation.error.envelope())
        else:
            yield self._chunk(finish=generation.finish_reason)
            if self.include_usage:
                yield self._chunk(usage=generation.usage)
        yield schemas.sse("[DONE]")

    async def respond(self, generation: Generation) -> Response:
        """The non-streaming response, or the error envelope if the engine failed the sequence."""
        text, calls, logprobs = await generation.collect()
        if generation.error is not None:
            return self.error_response(generation.error)
        assert generation.finish_reason is not None and generation.usage is not None
        if self.chat:
            body = schemas.chat_response(
                self.id,
                self.created,
                self.model,
                text,
                generation.finish_reason,
                generation.usage,
                self._logprobs(logprobs),
                calls,
            )
        else:
            body = schemas.completion_response(
                self.id,
                self.created,
                self.model,
                text,
                generation.finish_reason,
                generation.usage,
                self._logprobs(logprobs),
            )
        return JSONResponse(body)


def router(ctx: AppContext) -> APIRouter:
    """The two OpenAI generation routes over `ctx` (admission, body, fleet, counters); errors before generation
    are answered in the OpenAI envelope."""
    api = APIRouter()
    openai_error = OpenAISurface.error_response

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await ctx.generate(request, prepare_chat, openai_error)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await ctx.generate(request, prepare_completion, openai_error)

    return api
