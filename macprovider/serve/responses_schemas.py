"""OpenAI Responses API shapes (docs/api.md; the `CreateResponse`, `Response`, `OutputItem` and
`Response*Event` schemas of OpenAI's OpenAPI document). Pure: no sockets, no engine.

    parse_request(dict) -> ResponsesRequest        400 invalid_request naming the parameter
    input_messages(input, param) -> chat messages   items (messages incl. developer, function_call,
                                                    function_call_output) -> chat-template messages
    chat_tools(request) -> (tools, choice)          function tools; built-in tools -> 400 naming `tools.N.type`
    response_format(request)                        `text.format` -> a chat `response_format` (or None)
    response_object / message_item / function_call_item / usage_object -> dicts for JSON and events
    history_messages(output items) -> chat messages the next turn (previous_response_id) starts from
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import Usage
from macprovider.serve.openai_schemas import MAX_MESSAGES, StrictRequest, TokenCount, validate_body

BUILT_IN_TOOLS = (
    "web_search, file_search, computer, code_interpreter, image_generation, mcp, shell and other built-in tools"
)
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(StrictRequest):
    """POST /v1/responses body. Unknown fields are ignored; known features this provider lacks → 400."""

    model: str
    input: Any
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and len(value) <= MAX_MESSAGES):
            return value
        raise PydanticCustomError(
            "input_type", "input must be a string or a list of at most {n} items", {"n": MAX_MESSAGES}
        )

    def check_supported(self) -> None:
        """Raise ApiError 400 naming the first requested feature this provider does not implement."""
        if self.background:
            raise _bad("background", "background responses are not supported")
        if self.conversation is not None:
            raise _bad("conversation", "conversations are not supported: use previous_response_id")
        if self.prompt is not None:
            raise _bad("prompt", "prompt templates are not supported")
        if self.top_logprobs:
            raise _bad("top_logprobs", "top_logprobs is not supported on /v1/responses (use /v1/chat/completions)")
        if self.truncation == "auto":
            raise _bad("truncation", 'truncation "auto" is not supported: a prompt over the context is refused (413)')


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


def parse_request(data: dict[str, Any]) -> ResponsesRequest:
    """Validate a /v1/responses body. Raises ApiError 400 (`invalid_request`, `param` = dotted path)."""
    request = validate_body(ResponsesRequest, data)
    request.check_supported()
    return request


def _text(content: Any, param: str) -> str:
    """A message's content: a string or a list of text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "content must be a string or a list of input_text parts")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _bad(
                f"{param}.{index}",
                f"content part type {kind!r} is not supported: only text parts (input_text, output_text) are",
            )
        texts.append(part["text"])
    return "".join(texts)


def _arguments(text: Any) -> Any:
    """A call's JSON arguments text decoded to an object, as chat templates expect (left as text if not JSON)."""
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def input_messages(items: str | list[Any], param: str = "input") -> list[dict[str, Any]]:
    """Responses `input` → chat-template messages: message items (roles user, assistant, system and
    developer — developer becomes system), `function_call` items (merged into the preceding assistant
    message's `tool_calls`), `function_call_output` items (tool messages). Reasoning items are skipped (this
    provider never produces them). Raises ApiError 400 naming `input.N…` for anything else."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{param}.{index}"
        if not isinstance(item, dict):
            raise _bad(where, "each input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{where}.role", 'role must be "user", "assistant", "system" or "developer"')
            messages.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _text(item.get("content"), f"{where}.content"),
                }
            )
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _bad(f"{where}.{key}", f"a function_call item needs a string {key}")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": _arguments(item["arguments"])},
            }
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}.call_id", "a function_call_output item needs a string call_id")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _text(item.get("output"), f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            continue
        else:
            raise _bad(
                f"{where}.type",
                f"input item type {kind!r} is not supported: use message, function_call or function_call_output",
            )
    return messages


def chat_tools(request: ResponsesRequest) -> tuple[list[dict[str, Any]], str]:
    """Responses function tools (`{"type": "function", "name", "description", "parameters"}`) and
    `tool_choice` as chat tools and a core choice ("auto", "none", "required" or a function name).
    Raises ApiError 400 naming `tools.N.type` for a built-in tool, `tools.N.name`, or `tool_choice`."""
    from macprovider.serve.tool_calls import check_tools

    tools = []
    for index, tool in enumerate(request.tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(
                f"tools.{index}.type",
                f"tool type {kind!r} is not supported: only function tools are ({BUILT_IN_TOOLS} are not)",
            )
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        tools.append({"type": "function", "function": function})
    choice = request.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _bad(
                "tool_choice",
                f'tool_choice type {choice.get("type")!r} is not supported: use "auto", "none", "required" or a function',
            )
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    try:
        return check_tools(tools, choice)
    except ApiError as exc:
        exc.param = (exc.param or "").replace(".function.", ".")
        raise


def response_format(request: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format` (json_schema's name/schema/strict move under
    `json_schema`); None for plain text. Raises ApiError 400 (`text.format`) for another shape."""
    fmt = (request.text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("text.format.type", 'text.format type must be "text", "json_object" or "json_schema"')
    if fmt["type"] == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt},
        }
    return {"type": fmt["type"]}


# ---------------------------------------------------------------------------------------------- output
def new_id(prefix: str) -> str:
    """`resp_…`, `msg_…`, `fc_…` ids: prefix + 48 random hex digits (OpenAI's look)."""
    return f"{prefix}_{secrets.token_hex(24)}"


def usage_object(usage: Usage) -> dict[str, Any]:
    """`ResponseUsage`: input/output token counts (+ cached input tokens) and the macprovider timing fields."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
        "macprovider_generation_ms": round(usage.generation_ms, 3),
        "macprovider_generated_completion_tokens": usage.generated_tokens,
    }


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant `OutputMessage` with one `output_text` part (empty `content` while it is being opened)."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def function_call_item(item_id: str, call: dict[str, Any], status: str, arguments: str | None = None) -> dict[str, Any]:
    """A `FunctionToolCall` output item from a core call (`{"id", "function": {"name", "arguments"}}`)."""
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"] if arguments is None else arguments,
    }


def response_object(
    response_id: str,
    created_at: int,
    request: ResponsesRequest,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `Response` object: status in_progress / completed / incomplete (max_output_tokens) / failed,
    with the request's settings echoed as OpenAI does."""
    fmt = (request.text or {}).get("format") or {"type": "text"}
    tool_choice = request.tool_choice if request.tool_choice is not None else "auto"
    body = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": request.model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
        "previous_response_id": request.previous_response_id,
        "reasoning": None,
        "store": request.store is not False,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": {"format": fmt},
        "tool_choice": tool_choice,
        "tools": [_echo_tool(tool) for tool in request.tools or []],
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": request.truncation or "disabled",
        "metadata": request.metadata or {},
    }
    if usage is not None:  # the schema has no null usage or user: absent until known
        body["usage"] = usage_object(usage)
    if request.user is not None:
        body["user"] = request.user
    return body


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A request's function tool as the `FunctionTool` the response echoes (name, description, parameters,
    strict — null when not given)."""
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def history_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as chat-template messages, for a later turn's `previous_response_id`."""
    items = []
    for item in output:
        if item["type"] == "message":
            items.append(
                {"type": "message", "role": "assistant", "content": "".join(part["text"] for part in item["content"])}
            )
        else:
            items.append(item)
    return input_messages(items)
