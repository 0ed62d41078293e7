"""Anthropic Messages API shapes (docs/api.md; docs.anthropic.com "Messages" and "Streaming Messages").
Pure: no sockets, no engine.

    parse_request(dict, count_only) -> MessagesRequest   400 naming the parameter (`messages.0.content.1.type`);
                                                          accepts what Claude Code sends (see `MessagesRequest`)
    output_grammar(request) -> grammar | None             `output_config.format` (structured output) enforced
    chat_messages(request) -> chat-template messages      system + text / tool_use / tool_result blocks
    chat_tools(request) -> (tools, choice)                custom tools (`input_schema`), tool_choice
                                                          auto / any / tool / none
    stop_reason(finish_reason, stop_sequence)             end_turn / max_tokens / stop_sequence / tool_use
    message_object / text_block / tool_use_block / usage_object -> dicts for JSON and events
    error_body(ApiError) -> {"type": "error", "error": {"type", "message"}}
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import Usage
from macprovider.serve.openai_schemas import (
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    StrictRequest,
    TokenCount,
    validate_body,
)

# What a text-only model accepts and honours or ignores (docs.anthropic.com "Messages", "Extended thinking",
# "Structured outputs", "Context editing"). Thinking of any kind is accepted and produces no thinking blocks.
THINKING_TYPES = ("enabled", "adaptive", "disabled", "between_tools")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
SERVICE_TIERS = ("auto", "standard_only")
# Context edits this provider can honour: clearing thinking blocks is what it always does (history thinking blocks
# never reach the prompt). Clearing tool uses or compacting is not implemented: 400.
CONTEXT_EDITS = ("clear_thinking_20251015",)

# Anthropic's error `type` per HTTP status (docs.anthropic.com "Errors").
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class MessagesRequest(StrictRequest):
    """POST /v1/messages body (`max_tokens` required) or, with `count_only`, /v1/messages/count_tokens.

    Beyond the core fields it takes what Claude Code and the `anthropic` SDK send: `metadata` (user_id),
    `cache_control` (top level and on system / tool / message blocks: prompt caching is automatic here),
    `service_tier`, `thinking` (accepted; no thinking blocks are produced), `output_config` (`effort` ignored,
    `format` enforced by constrained decoding like OpenAI's `response_format`; also the beta's top-level
    `output_format`), `context_management` (clear_thinking edits), `tool_choice.disable_parallel_tool_use`
    (at most one tool_use block). Checked by `parse_request`.
    """

    model: str
    messages: Annotated[list[Any], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: TokenCount | None = None
    system: Any = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None

    @property
    def single_tool_use(self) -> bool:
        """`tool_choice.disable_parallel_tool_use`: at most one tool_use block in the answer."""
        return bool(self.tool_choice and self.tool_choice.get("disable_parallel_tool_use"))

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) > MAX_STOP_STRINGS:
                raise PydanticCustomError(
                    "stop_count", "this provider takes at most {n} stop_sequences", {"n": MAX_STOP_STRINGS}
                )
            if any(not item or len(item) > MAX_STOP_CHARS for item in value):
                raise PydanticCustomError(
                    "stop_len", "each stop sequence must have 1..{n} characters", {"n": MAX_STOP_CHARS}
                )
        return value


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


def parse_request(data: dict[str, Any], count_only: bool = False) -> MessagesRequest:
    """Validate a Messages body. Raises ApiError 400 naming the parameter."""
    request = validate_body(MessagesRequest, data)
    if request.max_tokens is None and not count_only:
        raise _bad("max_tokens", "invalid max_tokens: this field is required")
    if request.thinking is not None:
        _check_thinking(request.thinking)
    if request.mcp_servers:
        raise _bad("mcp_servers", "MCP servers are not supported by this provider")
    if request.service_tier is not None and request.service_tier not in SERVICE_TIERS:
        raise _bad("service_tier", f"service_tier must be one of {', '.join(SERVICE_TIERS)}")
    if request.tool_choice is not None and not isinstance(
        request.tool_choice.get("disable_parallel_tool_use", False), bool
    ):
        raise _bad("tool_choice.disable_parallel_tool_use", "disable_parallel_tool_use must be a boolean")
    if request.context_management is not None:
        _check_context_management(request.context_management)
    if request.output_config is not None:
        effort = request.output_config.get("effort")
        if effort is not None and effort not in EFFORTS:
            raise _bad("output_config.effort", f"effort must be one of {', '.join(EFFORTS)}")
    return request


def _check_thinking(thinking: dict[str, Any]) -> None:
    """`thinking` of a known type (accepted: this provider's models answer without thinking blocks)."""
    kind = thinking.get("type")
    if kind not in THINKING_TYPES:
        raise _bad("thinking.type", f"thinking type must be one of {', '.join(THINKING_TYPES)}")
    budget = thinking.get("budget_tokens")
    if kind == "enabled" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise _bad("thinking.budget_tokens", "thinking of type enabled needs an integer budget_tokens")


def _check_context_management(value: dict[str, Any]) -> None:
    edits = value.get("edits", [])
    if not isinstance(edits, list):
        raise _bad("context_management.edits", "edits must be a list")
    for index, edit in enumerate(edits):
        kind = edit.get("type") if isinstance(edit, dict) else None
        if kind not in CONTEXT_EDITS:
            raise _bad(
                f"context_management.edits.{index}.type",
                f"context edit {kind!r} is not supported by this provider: only {', '.join(CONTEXT_EDITS)} (thinking blocks never reach the prompt here)",
            )


def output_grammar(request: MessagesRequest) -> str | None:
    """The llguidance grammar of `output_config.format` (or the beta's top-level `output_format`):
    `{"type": "json_schema", "schema": {...}}` → the answer is JSON valid against that schema, enforced as
    OpenAI's `response_format` is (engine.constrained.grammar_for). None without a format. Raises ApiError
    400 naming `output_config.format…` for another type, a bad schema, or a format with a forced tool_choice."""
    from macprovider.serve.grammar import grammar_for

    param, spec = "output_config.format", (request.output_config or {}).get("format")
    if spec is None and request.output_format is not None:
        param, spec = "output_format", request.output_format
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "json_schema":
        raise _bad(f"{param}.type", 'the output format type must be "json_schema"')
    if not isinstance(spec.get("schema"), dict):
        raise _bad(f"{param}.schema", "the output format needs a JSON schema object")
    if request.tool_choice is not None and request.tool_choice.get("type") in ("any", "tool"):
        raise _bad(param, "an output format cannot be combined with a forced tool_choice")
    try:
        return grammar_for({"type": "json_schema", "json_schema": {"name": "output", "schema": spec["schema"]}})
    except ApiError as exc:
        raise _bad(f"{param}.schema", exc.message) from None


def _unsupported_block(param: str, kind: Any, message: str) -> ApiError:
    """400 naming the block: images and documents get their own reason (the model reads text only)."""
    if kind in ("image", "document"):
        return _bad(param, f"{kind} blocks are not supported: this provider serves a text-only model")
    return _bad(param, message)


def _block_text(content: Any, param: str) -> str:
    """A string, or text blocks joined (as `system` and `tool_result.content` take)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of text blocks")
    texts = []
    for index, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise _unsupported_block(
                f"{param}.{index}.type", kind, f"block type {kind!r} is not supported here: only text blocks are"
            )
        texts.append(block["text"])
    return "".join(texts)


def chat_messages(request: MessagesRequest) -> list[dict[str, Any]]:
    """`system` and `messages` as chat-template messages: text blocks joined; a `system` message inside
    `messages` (text only) stays a system message at its position, applying from there on; an assistant's `tool_use`
    blocks become `tool_calls`; a user's `tool_result` blocks become tool messages (before its text).
    Thinking blocks from history are skipped (this provider never produces them). Raises ApiError 400
    naming `messages.N.content.M.type` for images, documents and other blocks."""
    out: list[dict[str, Any]] = []
    if request.system is not None:
        system = _block_text(request.system, "system")
        if system:
            out.append({"role": "system", "content": system})
    for index, message in enumerate(request.messages):
        where = f"messages.{index}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise _bad(f"{where}.role", 'role must be "user", "assistant" or "system"')
        role, content = message["role"], message.get("content")
        if role == "system":  # a system message at its own position (Claude Code sends its environment this way)
            out.append({"role": "system", "content": _block_text(content, f"{where}.content")})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content", "content must be a string or a list of content blocks")
        texts, calls, results = [], [], []
        for number, block in enumerate(content):
            at = f"{where}.content.{number}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                if (
                    not isinstance(block.get("id"), str)
                    or not isinstance(block.get("name"), str)
                    or not isinstance(block.get("input", {}), dict)
                ):
                    raise _bad(at, "a tool_use block needs a string id and name and an object input")
                calls.append(
                    {
                        "id": block["id"],
                        "type": "function",
                        "function": {"name": block["name"], "arguments": block.get("input", {})},
                    }
                )
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise _bad(f"{at}.tool_use_id", "a tool_result block needs a string tool_use_id")
                text = _block_text(block.get("content", ""), f"{at}.content")
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": block["tool_use_id"],
                        "content": f"Error: {text}" if block.get("is_error") else text,
                    }
                )
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            else:
                raise _unsupported_block(
                    f"{at}.type", kind, f"content block type {kind!r} is not supported in a {role} message"
                )
        out.extend(results)
        if texts or calls or not results:
            item: dict[str, Any] = {"role": role, "content": "".join(texts)}
            if calls:
                item["tool_calls"] = calls
            out.append(item)
    return out


def chat_tools(request: MessagesRequest) -> tuple[list[dict[str, Any]], str]:
    """Custom tools (`{name, description, input_schema}`) as chat tools and `tool_choice` (auto / any /
    tool / none) as a core choice. Raises ApiError 400: `tools.N.type` for Anthropic's server and client
    tools (bash, text_editor, web_search, computer, …), `tools.N.name`, `tools.N.input_schema`, `tool_choice`."""
    from macprovider.serve.tool_calls import check_tools

    tools = []
    for index, tool in enumerate(request.tools or []):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(
                f"tools.{index}.type",
                f"tool type {kind!r} is not supported: only custom tools with an input_schema are",
            )
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema", {"type": "object"})}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    choice: Any = None
    if request.tool_choice is not None:
        kind = request.tool_choice.get("type")
        if kind == "tool":
            choice = {"type": "function", "function": {"name": request.tool_choice.get("name")}}
        elif kind in ("auto", "any", "none"):
            choice = {"auto": "auto", "any": "required", "none": "none"}[kind] if tools or kind == "none" else "none"
        else:
            raise _bad("tool_choice.type", 'tool_choice type must be "auto", "any", "tool" or "none"')
    try:
        return check_tools(tools, choice)
    except ApiError as exc:
        exc.param = (exc.param or "").replace(".function.parameters", ".input_schema").replace(".function.", ".")
        raise


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    """The core's finish as Anthropic's `stop_reason`."""
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def new_id(prefix: str) -> str:
    """`msg_…` / `toolu_…` ids: prefix + 24 random hex digits."""
    return f"{prefix}_{secrets.token_hex(12)}"


def usage_object(usage: Usage) -> dict[str, Any]:
    """Anthropic `usage`: `input_tokens` excludes prompt tokens read from the cache
    (`cache_read_input_tokens`), as Anthropic counts them; plus the macprovider timing fields."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "macprovider_generation_ms": round(usage.generation_ms, 3),
        "macprovider_generated_completion_tokens": usage.generated_tokens,
    }


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(call: dict[str, Any], with_input: bool = True) -> dict[str, Any]:
    """A `tool_use` block from a core call; its JSON arguments decoded (`{}` for a call cut off mid-JSON)."""
    block = {
        "type": "tool_use",
        "id": "toolu_" + call["id"].removeprefix("call_"),
        "name": call["function"]["name"],
        "input": {},
    }
    if with_input:
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError:
            arguments = {}
        block["input"] = arguments if isinstance(arguments, dict) else {}
    return block


def message_object(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop: str | None,
    stop_sequence: str | None,
    usage: dict[str, Any],
) -> dict[str, Any]:
    """The `Message` object (also the `message_start` payload, with empty content and no stop reason)."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def error_body(exc: ApiError) -> dict[str, Any]:
    """Anthropic's error envelope `{"type": "error", "error": {"type", "message"}}`."""
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    message = exc.message if exc.param is None or exc.param in exc.message else f"{exc.param}: {exc.message}"
    return {"type": "error", "error": {"type": kind, "message": message}}
