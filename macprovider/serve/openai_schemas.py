"""OpenAI request/response shapes and the error envelope (docs/api.md#chat-completions, #errors). Pure: no sockets, no engine.

Requests are validated by strict pydantic models (a string is not a number, `true` is not an integer,
every integer and float has both bounds). Unknown fields are ignored, but a *known* feature this provider
does not implement (`n > 1`, `functions`, a non-JSON `response_format`, `suffix`, `echo`, …) is refused
with 400 naming the parameter, never silently dropped (`unsupported_features`).

    parse_json_body(bytes) -> dict             400 invalid_json / invalid_request (not an object)
    parse_chat(dict) -> ChatCompletionRequest  400 invalid_request, `param` = dotted path (`messages.0.role`)
    normalize_messages(request) -> [{"role", "content"}]   text parts joined, developer -> system, ready for the chat template
    chat_response / chat_chunk / completion_response / completion_chunk -> dicts for JSON / SSE
    chat_logprobs / completion_logprobs -> OpenAI `logprobs` objects from `TokenLogprob`s
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import GenerationRequest, TokenLogprob, Usage

# Bounds of request integers (docs/api.md#security: every integer has a lower and an upper bound).
MAX_TOKENS_LIMIT = 10_000_000  # same ceiling as the max_context_override setting
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # OpenAI allows int64; MLX keys take uint64 (negatives wrap)
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000
MAX_MESSAGES = 100_000

Role = Literal["developer", "system", "user", "assistant", "tool"]  # developer: OpenAI's current name for system


class StrictRequest(BaseModel):
    """Strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class ChatMessage(StrictRequest):
    """One chat message: `content` is a string or a list of OpenAI text parts (null only for assistant)."""

    role: Role
    content: Any = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for index, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise PydanticCustomError(
                        "content_part",
                        'content part {index} is not supported: only text parts (type "text") are',
                        {"index": index},
                    )
                parts.append(part["text"])
            return "".join(parts)
        raise PydanticCustomError("content_type", "content must be a string or a list of text parts")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise PydanticCustomError("stop_type", "stop must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise PydanticCustomError("stop_count", "stop takes at most {n} strings", {"n": MAX_STOP_STRINGS})
    if any(not item or len(item) > MAX_STOP_CHARS for item in items):
        raise PydanticCustomError("stop_len", "each stop string must have 1..{n} characters", {"n": MAX_STOP_CHARS})
    return tuple(items)


TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class StreamOptions(StrictRequest):
    include_usage: bool | None = None


class _Sampling(StrictRequest):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Any = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> tuple[str, ...]:
        return _stop(value)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def _common_unsupported(self) -> None:
        if self.n is not None and self.n != 1:
            raise _unsupported("n", "n must be 1: this provider returns one choice per request")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")

    def generation_request(self, prompt_tokens: list[int], max_tokens: int | None) -> GenerationRequest:
        """The engine request; None sampling fields become OpenAI's defaults (temperature 1, top_p 1)."""
        return GenerationRequest(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=self.stop,
            seed=None if self.seed is None else self.seed % 2**64,
            top_logprobs=self.wanted_logprobs,
            grammar=self.grammar,
        )

    @property
    def grammar(self) -> str | None:
        """The llguidance grammar the output must follow, or None."""
        return None

    @property
    def wanted_logprobs(self) -> int | None:
        """None = no log-probabilities; else how many alternatives per token (0–20)."""
        return None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions body (docs/api.md#chat-completions)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    def check_supported(self) -> None:
        """Raise ApiError 400 naming the first requested feature this provider does not implement."""
        self._common_unsupported()
        tools, choice = self.tool_spec
        if (
            choice not in ("auto", "none")
            and self.response_format is not None
            and self.response_format.get("type") != "text"
        ):
            raise _unsupported("response_format", "response_format cannot be combined with a forced tool_choice")
        if self.functions:
            raise _unsupported("functions", "functions (function calling) are not supported by this provider")
        if self.function_call is not None and self.function_call != "none":
            raise _unsupported("function_call", 'function_call must be "none": functions are not supported')
        _ = self.grammar  # 400 for a bad response_format
        if self.top_logprobs is not None and not self.logprobs:
            raise _unsupported("top_logprobs", "top_logprobs requires logprobs: true")
        for index, message in enumerate(self.messages):
            if message.content is None and message.role != "assistant":
                raise ApiError(
                    400, "invalid_request", f"a {message.role} message needs content", param=f"messages.{index}.content"
                )

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_spec(self) -> tuple[list[dict[str, Any]], str]:
        """(tools, choice): choice is "auto", "none", "required" or a function name; ApiError 400 if bad."""
        from macprovider.serve.tool_calls import check_tools

        return check_tools(self.tools, self.tool_choice)

    @property
    def grammar(self) -> str | None:
        """`response_format` as an llguidance grammar (None for text); ApiError 400 if it is bad."""
        from macprovider.serve.grammar import grammar_for

        return grammar_for(self.response_format)

    @property
    def wanted_tokens(self) -> int | None:
        """`max_completion_tokens`, else `max_tokens`; None = the engine's default (remaining capacity)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions body: a single string `prompt`."""

    prompt: Any
    suffix: Any = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise PydanticCustomError(
                "prompt_type", "prompt must be a single string (arrays of prompts or tokens are not supported)"
            )
        return value

    def check_supported(self) -> None:
        """Raise ApiError 400 naming the first requested feature this provider does not implement."""
        self._common_unsupported()
        if self.suffix is not None:
            raise _unsupported("suffix", "suffix is not supported")
        if self.echo:
            raise _unsupported("echo", "echo is not supported")
        if self.best_of is not None and self.best_of > 1:
            raise _unsupported("best_of", "best_of must be 1")

    @property
    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------------------------------------- parsing
def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, param=param)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Decode a request body. Raises ApiError 400 `invalid_json` (not UTF-8 / not JSON / NaN / too deep)
    or 400 `invalid_request` (valid JSON that is not an object)."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object", param=None)
    # A lone surrogate can only arrive as a `\\uD800`–`\\uDFFF` escape (raw surrogate bytes are not UTF-8):
    # scan the parsed body only when the raw one has such an escape.
    if _SURROGATE_ESCAPE.search(body):
        where = _lone_surrogate_path(data, ())
        if where is not None:
            param = ".".join(str(part) for part in where) or None
            message = f"{param} holds a lone UTF-16 surrogate (text that is not valid Unicode)"
            raise ApiError(400, "invalid_request", message, param=param)
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate_path(value: Any, path: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The path (keys and indexes) of the first string, or object key, holding a lone surrogate; None if
    none. JSON decoding joins an escaped surrogate pair into one character, so any surrogate left is lone.
    Iterative over containers, so a deep body cannot exhaust the stack."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return where
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if _LONE_SURROGATE.search(key):
                    return (*where, key.encode("utf-8", "replace").decode("utf-8"))
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, index)) for index, child in reversed(list(enumerate(item))))
    return None


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location → dotted OpenAI `param`, e.g. ('messages', 0, 'role') → 'messages.0.role'.
    Type tags pydantic inserts for unions/constraints (they contain '[' or '-') are dropped."""
    parts = [str(item) for item in loc if isinstance(item, int) or ("[" not in str(item) and "-" not in str(item))]
    return ".".join(parts) or None


def validate_body(model: type[StrictRequest], data: dict[str, Any]) -> Any:
    """`model.model_validate(data)`; the first pydantic error becomes ApiError 400 `invalid_request` whose
    `param` is the dotted path of the bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        param = param_from_loc(tuple(error["loc"]))
        message = error["msg"] if error["type"] != "missing" else "this field is required"
        raise ApiError(400, "invalid_request", f"invalid {param or 'request'}: {message}", param=param) from None


def parse_chat(data: dict[str, Any]) -> ChatCompletionRequest:
    """Validate a chat completion body. Raises ApiError 400 (`invalid_request`, `param` set)."""
    request = validate_body(ChatCompletionRequest, data)
    request.check_supported()
    return request


def parse_completion(data: dict[str, Any]) -> CompletionRequest:
    """Validate a text completion body. Raises ApiError 400 (`invalid_request`, `param` set)."""
    request = validate_body(CompletionRequest, data)
    request.check_supported()
    return request


def normalize_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages for the chat template: `{"role", "content"}` with text parts joined (null content → ""),
    `developer` as `system` (chat templates know only system), plus `tool_calls` (arguments decoded to
    objects, as chat templates expect), `tool_call_id`, `name`."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": message.content or ""}
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                call = dict(call) if isinstance(call, dict) else {}
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass
                call["function"] = function
                calls.append(call)
            item["tool_calls"] = calls
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            item["name"] = message.name
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------------- errors
def context_length_error(n_prompt: int, n_ctx: int, param: str) -> ApiError:
    """413 `context_length_exceeded` with the exact docs/api.md#errors message and `n_prompt_tokens`, `n_ctx`."""
    return ApiError(
        413,
        "context_length_exceeded",
        f"Prompt length ({n_prompt} tokens) exceeds this provider's safe capacity ({n_ctx} tokens).",
        param=param,
        extra={"n_prompt_tokens": n_prompt, "n_ctx": n_ctx},
    )


def error_envelope(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""
    return ApiError(status, code, message, param=param).envelope()


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    """`chatcmpl-…` / `cmpl-…` ids: prefix + 24 random hex digits."""
    return f"{prefix}-{secrets.token_hex(12)}"


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat `choices[].logprobs`: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}`;
    `bytes` are the token's own bytes (`TokenLogprob.raw_bytes`), also for part of a multi-byte character."""

    def one(token: str, logprob: float, raw: bytes) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**one(e.token, e.logprob, e.raw_bytes), "top_logprobs": [one(*alternative) for alternative in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI legacy completion `choices[].logprobs`: parallel lists `tokens`, `token_logprobs`,
    `top_logprobs` (one {token: logprob} dict per token) and `text_offset` (characters, from `offset`).
    Two candidates with the same text (e.g. byte tokens both shown as "\ufffd") share one key: the higher
    log-probability, listed first, is kept."""

    def top_dict(top: Sequence[tuple[str, float, bytes]]) -> dict[str, float]:
        merged: dict[str, float] = {}
        for token, logprob, _ in top:
            merged.setdefault(token, logprob)
        return merged

    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [top_dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def chat_response(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage,
    logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Non-streaming `chat.completion` object (`content` null when the answer is only tool calls;
    `refusal: null` as OpenAI's schema requires)."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
        message["content"] = text or None
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}],
        "usage": usage.to_openai(),
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`: a delta (with `finish_reason`), or with `usage` the final `choices: []` chunk."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage.to_openai()
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": logprobs}]
    return chunk


def completion_response(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Non-streaming `text_completion` object."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
        "usage": usage.to_openai(),
    }


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    text: str = "",
    finish_reason: str | None = None,
    usage: Usage | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed `text_completion` chunk (or, with `usage`, the final `choices: []` chunk)."""
    chunk: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage.to_openai()
    else:
        chunk["choices"] = [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]
    return chunk


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event `data: <json>\\n\\n` (or the literal `[DONE]`)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---------------------------------------------------------------------------------------------- health, metrics
def prometheus_text(health: dict[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of a /v1/health body: the same counters and gauges."""
    capacity, engine = health["capacity"], health["engine"]
    model = str(health["model"]).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    rows: list[tuple[str, str, str, Any]] = [
        ("macprovider_info", "gauge", "Served model (value is always 1).", None),
        (
            "macprovider_ready",
            "gauge",
            "1 when the server admits requests (status ready or busy).",
            int(health["status"] in ("ready", "busy")),
        ),
        ("macprovider_uptime_seconds", "gauge", "Seconds since the server started.", health["uptime_s"]),
        ("macprovider_requests_total", "counter", "Completion requests received.", health["requests_total"]),
        (
            "macprovider_requests_in_flight",
            "gauge",
            "Completion requests admitted to the engine and not finished.",
            health["requests_in_flight"],
        ),
        ("macprovider_requests_queued", "gauge", "Sequences waiting for a batch slot.", health["requests_queued"]),
        (
            "macprovider_errors_total",
            "counter",
            "Completion requests that ended with an error.",
            health["errors_total"],
        ),
        (
            "macprovider_memory_rss_bytes",
            "gauge",
            "Resident set size of the server process.",
            int(health["memory_rss_mb"] * 1024 * 1024),
        ),
        (
            "macprovider_max_context_tokens",
            "gauge",
            "Max prompt+generation tokens per sequence.",
            capacity["max_context_tokens"],
        ),
        ("macprovider_max_batch", "gauge", "Sequences decoded together.", capacity["max_batch"]),
        ("macprovider_kv_bits", "gauge", "KV cache quantization bits (0 = full precision).", capacity["kv_bits"] or 0),
    ]
    for key, value in engine.items():
        kind = "counter" if key.endswith("_total") else "gauge"
        rows.append((f"macprovider_engine_{key}", kind, f"Engine {key.replace('_', ' ')}.", value))
    lines = []
    for name, kind, help_text, value in rows:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{model="{model}"}} 1' if value is None else f"{name} {value}")
    models = health.get("models") or []
    for key, name, kind, help_text in FLEET_METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for entry in models:
            label = str(entry["id"]).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            value = entry.get(key)
            if key == "state":
                value = int(value == "loaded")
            lines.append(f'{name}{{model="{label}"}} {0 if value is None else value}')
    return "\n".join(lines) + "\n"


# Per-model series of /metrics, from the `models` list of /v1/health: (key, metric, type, help).
FLEET_METRICS = (
    ("state", "macprovider_model_loaded", "gauge", "1 when the model is loaded."),
    ("requests_in_flight", "macprovider_model_requests_in_flight", "gauge", "Requests holding the model."),
    ("active_sequences", "macprovider_model_active_sequences", "gauge", "Sequences its engine decodes now."),
    ("idle_s", "macprovider_model_idle_seconds", "gauge", "Seconds since its last request ended (0: busy/unloaded)."),
    ("loads", "macprovider_model_loads_total", "counter", "Times the model was loaded."),
    ("unloads", "macprovider_model_unloads_total", "counter", "Times the model was unloaded."),
    ("load_seconds", "macprovider_model_load_seconds", "gauge", "Duration of its last load."),
    ("memory_estimate_bytes", "macprovider_model_memory_estimate_bytes", "gauge", "Memory estimate of the model."),
    ("memory_measured_bytes", "macprovider_model_memory_measured_bytes", "gauge", "MLX memory its last load added."),
)
