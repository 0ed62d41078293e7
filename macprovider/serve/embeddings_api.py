"""`POST /v1/embeddings` in OpenAI's shape (CreateEmbeddingRequest → CreateEmbeddingResponse).

    parse_request(data) -> EmbeddingRequest       the body checked; ApiError 400 naming the field
    check_embedding_engine(engine, model) -> engine  400 unless the model serving `model` is an embedding model
    router(ctx) -> APIRouter   POST /v1/embeddings; `ctx.fleet.acquire` finds the engine (name/alias -> lease)

Request: `model`; `input` a string, an array of strings, an array of token ids, or an array of token-id arrays
(token ids are the served model's own vocabulary; the model's special tokens are added unless the array
already starts and ends with them); `encoding_format` `float` (default) or `base64` (little-endian float32
bytes, what the openai SDK decodes); `dimensions` only where the model was trained for shorter vectors
(Matryoshka), else 400 unless it equals the model's length; `user` is accepted and ignored.

Limits (OpenAI's): at most MAX_INPUTS inputs a request and MAX_TOTAL_TOKENS tokens summed over them; no empty
input; each input at most the model's `max_input_tokens` (special tokens included): a longer one is a 400
naming its index, never cut. `usage.prompt_tokens` = `total_tokens` = the tokens the model ran on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EmbeddingEngineProtocol
from macprovider.serve import openai_schemas as schemas
from macprovider.serve.context import AppContext

log = logging.getLogger("macprovider.serve.embeddings")

MAX_INPUTS = 2048  # OpenAI's maximum array length for `input`
MAX_TOTAL_TOKENS = 300_000  # OpenAI's cap on tokens summed across the inputs of one request
CHAT_ROUTES = "/v1/chat/completions, /v1/completions, /v1/responses and /v1/messages"
ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked request: `inputs` are strings or token-id lists (never empty), `dimensions` None = native."""

    model: str
    inputs: list[str | list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None


def _bad(message: str, param: str = "input", code: str = "invalid_value") -> ApiError:
    return ApiError(400, code, message, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(data: dict[str, Any]) -> EmbeddingRequest:
    """Check an embeddings body. Raises ApiError 400 (`param` names the field; for inputs the message names
    the index) on a missing/mistyped field, an empty input, too many inputs, or a bad `encoding_format` /
    `dimensions`."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("`model` is required and must be a string", "model", "missing_required_parameter")
    raw = data.get("input")
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(_is_int(t) for t in raw):
        items = [raw]  # one token-id array
    elif isinstance(raw, list):
        items = raw
    else:
        raise _bad(
            "`input` is required: a string, an array of strings, an array of token ids or an array of token-id arrays",
            code="missing_required_parameter" if raw is None else "invalid_type",
        )
    if not items:
        raise _bad("`input` must not be an empty array")
    if len(items) > MAX_INPUTS:
        raise _bad(f"`input` has {len(items)} items; at most {MAX_INPUTS} inputs are allowed per request")
    inputs: list[str | list[int]] = []
    kinds = set()
    for index, item in enumerate(items):
        if isinstance(item, str):
            kinds.add("string")
            if not item:
                raise _bad(f"input[{index}] is an empty string; every input must have text")
            inputs.append(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            kinds.add("tokens")
            if not item:
                raise _bad(f"input[{index}] is an empty token array")
            inputs.append(list(item))
        else:
            raise _bad(f"input[{index}] must be a string or an array of integer token ids", code="invalid_type")
    if len(kinds) > 1:
        raise _bad("`input` mixes strings and token arrays; send one kind per request", code="invalid_type")
    encoding = data.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        raise _bad(f"`encoding_format` must be 'float' or 'base64', not {encoding!r}", "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise _bad(f"`dimensions` must be a positive integer, not {dimensions!r}", "dimensions")
    return EmbeddingRequest(model, inputs, encoding, dimensions)


def check_embedding_engine(engine: Any, model: str) -> EmbeddingEngineProtocol:
    """`engine` (the one serving `model`) if it is an embedding model; else ApiError 400
    `unsupported_model_route`, saying which routes a chat model serves."""
    if getattr(engine, "kind", "chat") != "embedding":
        raise ApiError(
            400,
            "unsupported_model_route",
            f"the model {model!r} is a chat model: it serves {CHAT_ROUTES}, "
            "not /v1/embeddings (serve an embedding model for that)",
            param="model",
        )
    return engine


def check_lengths(token_lists: Sequence[Sequence[int]], limit: int) -> int:
    """The tokens summed over the inputs. ApiError 400 naming the first input longer than `limit` tokens, or
    when the sum exceeds MAX_TOTAL_TOKENS."""
    for index, ids in enumerate(token_lists):
        if len(ids) > limit:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"input[{index}] is {len(ids)} tokens long; this model takes at "
                f"most {limit} tokens an input (special tokens included): shorten or split it",
                param="input",
            )
    total = sum(len(ids) for ids in token_lists)
    if total > MAX_TOTAL_TOKENS:
        raise _bad(
            f"the inputs add up to {total} tokens; at most {MAX_TOTAL_TOKENS} tokens are allowed per request",
            code="too_many_tokens",
        )
    return total


def check_dimensions(engine: EmbeddingEngineProtocol, dimensions: int | None) -> int | None:
    """The length to cut vectors to (None = as they are). ApiError 400 (param `dimensions`) when the model was
    not trained for shorter vectors (Matryoshka) and `dimensions` is not its own length, or it is longer."""
    if dimensions is None or dimensions == engine.dimensions:
        return None
    if not engine.matryoshka_dimensions:
        raise _bad(
            f"the model {engine.model_id!r} does not support `dimensions`: its vectors have {engine.dimensions} "
            "dimensions and it was not trained to be shortened",
            "dimensions",
            "unsupported_parameter",
        )
    if dimensions > engine.dimensions:
        raise _bad(f"`dimensions` {dimensions} exceeds the model's {engine.dimensions}", "dimensions")
    return dimensions


def response_body(model: str, vectors: Any, tokens: int, encoding: str, dimensions: int | None) -> dict[str, Any]:
    """The CreateEmbeddingResponse. `vectors`: a float32 numpy array (inputs, dimensions). A cut vector is
    L2-normalized again (what OpenAI does for `dimensions`)."""
    import numpy as np

    if dimensions is not None:
        vectors = vectors[:, :dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding == "base64":
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        data = vectors.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def router(ctx: AppContext) -> APIRouter:
    """The `/v1/embeddings` route over `ctx`. `await ctx.fleet.acquire(model)` gives a lease on the model's
    loaded engine (`.engine`, `.release()`), checked by `check_embedding_engine`; `ctx.state` is the app's
    ServerState (request/error counters, in-flight tracking for the drain); `ctx.read_body` reads the capped
    JSON body; `ctx.require_loaded` raises 503 while the model loads."""
    api = APIRouter()
    state, acquire, read_body, require_loaded = ctx.state, ctx.fleet.acquire, ctx.read_body, ctx.require_loaded

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        state.requests_total += 1
        if state.draining:
            state.errors_total += 1
            return JSONResponse(
                ApiError(503, "draining", "the server is shutting down").envelope(),
                status_code=503,
                headers={"Retry-After": "5"},
            )
        state.begin()
        error = True
        try:
            require_loaded()
            body = parse_request(schemas.parse_json_body(await read_body(request)))
            lease = await acquire(body.model)
            try:
                engine = check_embedding_engine(lease.engine, body.model)
                dimensions = check_dimensions(engine, body.dimensions)
                token_lists = await run_in_threadpool(engine.encode_inputs, body.inputs)
                tokens = check_lengths(token_lists, engine.max_input_tokens)
                vectors = await asyncio.wrap_future(engine.embed(token_lists))
            finally:
                lease.release()
            payload = await run_in_threadpool(
                response_body, body.model, vectors, tokens, body.encoding_format, dimensions
            )
            error = False
            return JSONResponse(payload)
        except ApiError as exc:
            return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # noqa: BLE001 - the client gets the envelope, the log gets the details
            log.error("internal error in /v1/embeddings: %s", exc.__class__.__name__, exc_info=exc)
            return JSONResponse(ApiError(500, "internal_error", "internal server error").envelope(), status_code=500)
        finally:
            state.end(error)

    return api
