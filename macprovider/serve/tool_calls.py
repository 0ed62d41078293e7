"""OpenAI tool calling (docs/api.md#tools-structured-output-and-logprobs), used by `macprovider.serve`.

    check_tools(tools, tool_choice) -> (tools, choice)   ApiError 400 naming `tools.N...` / `tool_choice`
    tool_call_grammar(tools, choice, start, end) -> str  llguidance grammar forcing one well-formed call
    ToolCallSplitter(start, end, parse)                  streamed text -> content text + parsed calls

The markup (`start`/`end`, e.g. "<tool_call>" / "</tool_call>") and `parse` come from mlx-lm's per-model
tool parsers (`TokenizerWrapper.tool_call_start`, `.tool_call_end`, `.tool_parser`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from typing import Any

from macprovider.core.errors import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI function-name rule
_PARTIAL_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')  # a complete "name": "..." member
_PARTIAL_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict[str, Any]], Any]:
    """Validate OpenAI `tools` and `tool_choice`; returns (tools, choice) where choice is "auto", "none",
    "required" or a function name (str, for `{"type": "function", "function": {"name": ...}}`).
    Raises ApiError 400 naming the first bad field (`tools.0.function.name`, `tool_choice`, …)."""
    tools = tools or []
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list")
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad(f"tools.{i}.type", 'each tool needs type "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"tools.{i}.function", "each tool needs a function object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"tools.{i}.function.name", "function name must be 1-64 of a-z, A-Z, 0-9, _ and -")
        if name in names:
            raise _bad(f"tools.{i}.function.name", f"duplicate function name {name!r}")
        names.append(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _bad(f"tools.{i}.function.parameters", "parameters must be a JSON schema object")
    if tool_choice is None:
        return tools, "auto" if tools else "none"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice != "none" and not tools:
            raise _bad("tool_choice", f'tool_choice "{tool_choice}" needs tools')
        return tools, tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise _bad("tool_choice", f"tool_choice names function {name!r}, which is not in tools")
        return tools, name
    raise _bad(
        "tool_choice",
        'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
    )


def tool_call_grammar(
    tools: list[dict[str, Any]],
    choice: str,
    start: str,
    end: str,
    *,
    start_token: int | None = None,
    end_token: int | None = None,
    start_suffix: str = "\n",
    end_prefix: str = "\n",
) -> str:
    """llguidance Lark grammar: `start` + one JSON object {"name": <a tool (or `choice`)>, "arguments":
    <that tool's parameters schema>} + `end` (the Hermes/Qwen `<tool_call>` JSON format, mlx-lm's
    `json_tools` parser). Raises ApiError 400 (`tools`) if a parameters schema cannot be compiled.

    start_token / end_token: when the markup is one special token of the vocabulary (Qwen2.5's and Hermes'
    `<tool_call>` is an added token), its id: the grammar then names that token (`<[id]>`) followed by
    `start_suffix` (and `end_prefix` before the end token), since the text `<tool_call>` spelled in ordinary
    tokens is not the token the model and mlx-lm's parser expect — and llguidance never lets a special token
    match quoted text. A parameters schema's `$defs` / `definitions` are hoisted to the grammar's root
    (`hoist_definitions`), where its `$ref`s can resolve."""
    from llguidance import LLMatcher

    variants: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    for index, tool in enumerate(tools):
        function = tool["function"]
        if choice not in ("required", "auto") and function["name"] != choice:
            continue
        parameters, defs = hoist_definitions(function.get("parameters") or {"type": "object"}, f"tool{index}_")
        definitions.update(defs)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = dict(variants[0]) if len(variants) == 1 else {"anyOf": variants}
    if definitions:
        schema["$defs"] = definitions
    schema["x-guidance"] = {"whitespace_flexible": False}  # compact JSON: no unbounded whitespace runs
    start_rule = json.dumps(start) if start_token is None else f"<[{start_token}]> {json.dumps(start_suffix)}"
    end_rule = json.dumps(end) if end_token is None else f"{json.dumps(end_prefix)} <[{end_token}]>"
    grammar = f"start: {start_rule} call {end_rule}\ncall: %json {json.dumps(schema)}\n"
    is_error, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(grammar))
    if is_error:
        raise _bad("tools", f"a tool's parameters schema cannot be used: {messages[0]}")
    return LLMatcher.grammar_from_lark(grammar)


def hoist_definitions(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(schema with its `$ref`s rewritten, definitions to place under the root's `$defs`).

    A tool's parameters schema sits under `arguments` in the call grammar, so its local references
    (`#/$defs/X`, `#/definitions/X`, and `#` for the schema itself, as pydantic writes nested and recursive
    models) would point at the grammar's root. Each definition moves to `$defs/<prefix>X` (the prefix keeps
    two tools' same-named models apart) and every reference is rewritten to match; a `#` reference points
    at a copy of the whole schema, `$defs/<prefix>root`. Other references are left as they are."""
    own = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    body = {key: value for key, value in schema.items() if key not in ("$defs", "definitions")}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {key: rewrite(value) for key, value in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str):
                if ref == "#":
                    out["$ref"] = f"#/$defs/{prefix}root"
                else:
                    for base in ("#/$defs/", "#/definitions/"):
                        if ref.startswith(base):
                            out["$ref"] = f"#/$defs/{prefix}{ref[len(base) :]}"
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    definitions = {f"{prefix}{name}": rewrite(value) for name, value in own.items()}
    rewritten = rewrite(body)
    if '"#"' in json.dumps(body):
        definitions[f"{prefix}root"] = rewritten
    return rewritten, definitions


class ToolCallSplitter:
    """Splits streamed model text into client `content` and tool calls, so markup never reaches `content`.

    start/end: the model's tool-call markup; parse(text, tools) -> {"name", "arguments"} (mlx-lm parser).
    `feed(text)` returns (content, calls) safe to send now: text that might be the beginning of `start` is
    held back; a call is returned once its `end` arrived. `finish()` flushes (an unterminated call is
    parsed if it can be, else dropped). Calls are OpenAI-shaped: {"id", "type": "function",
    "function": {"name", "arguments": <JSON string>}}.
    """

    def __init__(self, start: str, end: str, parse: Callable[[str, Any], dict[str, Any]], tools: Any = None):
        self.start, self.end, self.parse, self.tools = start, end, parse, tools
        self._buffer = ""
        self._in_call = False
        self.calls = 0

    def _call(self, body: str) -> dict[str, Any] | None:
        try:
            parsed = self.parse(body, self.tools)
        except Exception:  # noqa: BLE001 - a malformed call is dropped, never shown as content
            return None
        arguments = parsed.get("arguments", {})
        self.calls += 1
        return {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {
                "name": parsed.get("name", ""),
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
            },
        }

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += text
        content = ""
        calls: list[dict[str, Any]] = []
        while True:
            if self._in_call:
                at = self._buffer.find(self.end)
                if at < 0:
                    return content, calls
                call = self._call(self._buffer[:at])
                if call is not None:
                    calls.append(call)
                self._buffer = self._buffer[at + len(self.end) :]
                self._in_call = False
                continue
            at = self._buffer.find(self.start)
            if at >= 0:
                content += self._buffer[:at]
                self._buffer = self._buffer[at + len(self.start) :]
                self._in_call = True
                continue
            keep = 0  # longest suffix of the buffer that is a prefix of `start`
            for n in range(min(len(self.start) - 1, len(self._buffer)), 0, -1):
                if self.start.startswith(self._buffer[-n:]):
                    keep = n
                    break
            content += self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return content, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Flush: the held text, or the unterminated call — parsed if it can be, else (a call cut off by
        `max_tokens`) returned partial, as OpenAI does: its name and the arguments text so far."""
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            call = self._call(rest) or self._partial_call(rest)
            return "", [call] if call is not None else []
        return rest, []

    def _partial_call(self, body: str) -> dict[str, Any] | None:
        """A call cut off mid-JSON (`{"name": "f", "arguments": {"city": "Pa`): name and arguments so far;
        None when not even the name is complete."""
        name = _PARTIAL_NAME.search(body)
        if name is None:
            return None
        arguments = _PARTIAL_ARGUMENTS.search(body, name.end())
        self.calls += 1
        return {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {
                "name": json.loads(f'"{name.group(1)}"'),
                "arguments": body[arguments.end() :] if arguments else "",
            },
        }
