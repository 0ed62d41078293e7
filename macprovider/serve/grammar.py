"""The request side of structured output: an OpenAI `response_format` -> an llguidance grammar (no MLX).

The grammar library is llguidance (https://github.com/guidance-ai/llguidance): a JSON schema compiles to a
grammar that the engine's `engine.constrained.GrammarProcessor` follows token by token. A bad format is the
client's error, so it is refused here, as a 400, before anything reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

from macprovider.core.errors import ApiError


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar (a string) for an OpenAI `response_format`, or None for no constraint.

    `{"type": "text"}` / None -> None; `{"type": "json_object"}` -> any JSON object;
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}` -> that schema.
    Raises ApiError 400 (param `response_format...`) for another type, a missing/invalid schema, or a
    schema llguidance cannot compile.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    from llguidance import LLMatcher

    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ApiError(
                400,
                "invalid_request",
                "response_format.json_schema needs a `name` string",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "invalid_request",
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema.schema",
            )
    else:
        raise ApiError(
            400,
            "invalid_request",
            'response_format type must be "text", "json_object" or "json_schema"',
            param="response_format.type",
        )
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError with a message
        raise ApiError(
            400, "invalid_request", f"the JSON schema cannot be used: {exc}", param="response_format.json_schema.schema"
        ) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ApiError(
            400,
            "invalid_request",
            f"the JSON schema cannot be used: {messages[0]}",
            param="response_format.json_schema.schema",
        )
    return grammar
