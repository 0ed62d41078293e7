"""`/v1/messages` and `/v1/messages/count_tokens` (Anthropic Messages API) over the fake engine on real
sockets, through the official `anthropic` SDK in strict response validation: text, streaming events, a
forced tool_use round trip, stop_reason mapping, `x-api-key`, and Anthropic's error envelope for hostile
input."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import pytest
from fake_engine import JSON_TOOL_MARKUP, FakeEngine, Script, serving

MODEL = "fake-org/fake-model"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = ("<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>")
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def client_for(server, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.base, api_key=key, max_retries=0, timeout=10, _strict_response_validation=True
    )


def sse_typed(text: str) -> list[dict]:
    events = []
    for block in text.strip("\n").split("\n\n"):
        head, data = block.split("\n", 1)
        payload = json.loads(data[len("data: ") :])
        assert head == f"event: {payload['type']}"
        events.append(payload)
    return events


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    assert "Traceback" not in response.text and ".py" not in response.text
    return body["error"]


@pytest.fixture
def served():
    with serving() as server:
        yield server


def test_text_message_with_the_sdk(served):
    message = client_for(served).messages.create(
        model=MODEL,
        max_tokens=50,
        system=[{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},  # this SDK version dropped the sampling keywords
    )
    assert message.id.startswith("msg_") and message.role == "assistant" and message.model == MODEL
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == "Hello, world"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == 6 and message.usage.output_tokens == 4
    assert served.engine.encoded[-1] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    request = served.engine.submitted[-1]
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (50, 0.5, 0.9, 40)


def test_stream_events_in_order(served):
    response = httpx.post(
        served.base + "/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": ASK, "stream": True}
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_typed(response.text)
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == "Hello, world"
    assert (
        events[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        and events[-2]["usage"]["output_tokens"] == 4
    )

    with client_for(served).messages.stream(model=MODEL, max_tokens=20, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello, world" and final.content[0].text == "Hello, world" and final.stop_reason == "end_turn"


@pytest.mark.parametrize(
    "script, extra, reason, sequence",
    [
        (Script(finish_reason="length"), {}, "max_tokens", None),
        (Script(), {"max_tokens": 2}, "max_tokens", None),
        (Script(stop_sequence="END"), {"stop_sequences": ["END", "STOP"]}, "stop_sequence", "END"),
    ],
)
def test_stop_reason_mapping(script, extra, reason, sequence):
    with serving(FakeEngine(script=script)) as server:
        body = {"model": MODEL, "max_tokens": 20, "messages": ASK, **extra}
        message = client_for(server).messages.create(**body)
        assert (message.stop_reason, message.stop_sequence) == (reason, sequence)
        if "stop_sequences" in extra:
            assert server.engine.submitted[-1].stop == ("END", "STOP")
        with client_for(server).messages.stream(**body) as stream:
            final = stream.get_final_message()
        assert (final.stop_reason, final.stop_sequence) == (reason, sequence)


def test_forced_tool_use_round_trip():
    with serving(FakeEngine(script=Script(chunks=CALL), tool_markup=JSON_TOOL_MARKUP)) as server:
        client = client_for(server)
        first = client.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        assert first.stop_reason == "tool_use"
        [use] = first.content
        assert (
            use.type == "tool_use"
            and use.name == "get_weather"
            and use.input == {"city": "Paris"}
            and use.id.startswith("toolu_")
        )
        assert server.engine.submitted[-1].grammar is not None  # forced by constrained decoding
        assert server.engine.encoded_tools[-1] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER["input_schema"],
                    "description": "Weather in a city",
                },
            }
        ]

        with client.messages.stream(
            model=MODEL, max_tokens=100, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"}
        ) as stream:
            streamed = stream.get_final_message()
        assert streamed.stop_reason == "tool_use" and streamed.content[0].input == {"city": "Paris"}

        server.engine.script = Script(chunks=("It is sunny.",))
        history = ASK + [
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ]
        second = client.messages.create(model=MODEL, max_tokens=100, messages=history, tools=[WEATHER])
        assert second.content[0].text == "It is sunny." and second.stop_reason == "end_turn"
        assert server.engine.encoded[-1] == [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": use.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": use.id, "content": "sunny"},
            {"role": "user", "content": "Thanks"},
        ]


def test_tool_use_stream_events():
    with serving(FakeEngine(script=Script(chunks=("Checking. ",) + CALL), tool_markup=JSON_TOOL_MARKUP)) as server:
        body = {"model": MODEL, "max_tokens": 100, "messages": ASK, "tools": [WEATHER], "stream": True}
        events = sse_typed(httpx.post(server.base + "/v1/messages", json=body).text)
        kinds = [e["type"] for e in events]
        assert kinds[2:] == [
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert (
            events[5]["index"] == 1
            and events[5]["content_block"]["type"] == "tool_use"
            and events[5]["content_block"]["input"] == {}
        )
        assert events[6]["delta"]["type"] == "input_json_delta" and json.loads(events[6]["delta"]["partial_json"]) == {
            "city": "Paris"
        }
        assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_count_tokens(served):
    counted = client_for(served).messages.count_tokens(model=MODEL, system="be brief", messages=ASK)
    assert counted.input_tokens == 3 + 4
    assert served.engine.submitted == []  # counting generates nothing
    bad = httpx.post(served.base + "/v1/messages/count_tokens", json={"model": MODEL, "messages": []})
    assert_anthropic_error(bad, 400, "invalid_request_error")


def test_key_as_x_api_key_or_bearer():
    with serving(api_key="sekret") as server:
        assert (
            client_for(server, key="sekret").messages.create(model=MODEL, max_tokens=5, messages=ASK).content[0].text
            == "Hello, world"
        )
        with pytest.raises(anthropic.AuthenticationError):
            client_for(server, key="wrong").messages.create(model=MODEL, max_tokens=5, messages=ASK)
        bearer = httpx.post(
            server.base + "/v1/messages",
            json={"model": MODEL, "max_tokens": 5, "messages": ASK},
            headers={"authorization": "Bearer sekret"},
        )
        assert bearer.status_code == 200
        missing = httpx.post(server.base + "/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": ASK})
        assert_anthropic_error(missing, 401, "authentication_error")
        assert httpx.get(server.base + "/v1/models", headers={"x-api-key": "sekret"}).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "messages": ASK}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 0, "messages": ASK}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            "messages.0.content.0.type",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": ASK, "temperature": 1.5}, "temperature"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": ASK, "stop_sequences": ["a", "b", "c", "d", "e"]},
            "stop_sequences",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"type": "bash_20250124", "name": "bash"}]},
            "tools.0.type",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"name": "bad name!", "input_schema": {}}]},
            "tools.0.name",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            "tool_choice",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": ASK, "thinking": {"type": "deep"}}, "thinking.type"),
        ({"model": MODEL, "max_tokens": 5, "messages": ASK, "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ASK,
                "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
            },
            "context_management.edits.0.type",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": ASK, "service_tier": "priority"}, "service_tier"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": ASK, "output_config": {"effort": "extreme"}},
            "output_config.effort",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ASK,
                "output_config": {"format": {"type": "regex", "schema": {}}},
            },
            "output_config.format.type",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": ASK, "output_config": {"format": {"type": "json_schema"}}},
            "output_config.format.schema",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ASK,
                "output_format": {"type": "json_schema", "schema": {"type": "nonsense"}},
            },
            "output_format.schema",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": {"type": "any"},
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            },
            "output_config.format",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ASK,
                "tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"},
            },
            "tool_choice.disable_parallel_tool_use",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [
                                    {
                                        "type": "image",
                                        "source": {"type": "base64", "media_type": "image/png", "data": ""},
                                    }
                                ],
                            }
                        ],
                    }
                ],
            },
            "messages.0.content.0.content.0.type",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": ASK, "system": 3}, "system"),
    ],
)
def test_bad_requests_get_anthropics_envelope(served, body, param):
    error = assert_anthropic_error(httpx.post(served.base + "/v1/messages", json=body), 400, "invalid_request_error")
    assert param in error["message"]


def test_image_and_document_blocks_are_refused_as_text_only(served):
    for kind in ("image", "document"):
        body = {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": kind, "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
                    ],
                }
            ],
        }
        error = assert_anthropic_error(
            httpx.post(served.base + "/v1/messages", json=body), 400, "invalid_request_error"
        )
        assert (
            error["message"].startswith(f"messages.0.content.1.type: {kind} blocks are not supported")
            and "text-only" in error["message"]
        )
    assert served.engine.submitted == []


# What Claude Code sends with ANTHROPIC_BASE_URL pointed at the server (its requests as LiteLLM / llama.cpp proxy
# users report them): system blocks with cache_control, many tools (JSON Schema draft-07 `$schema`, cache_control
# on the last), thinking, metadata.user_id, context_management clearing thinking, history with a signed thinking
# block, `stream: true`.
CLAUDE_CODE_TOOLS = [
    {
        "name": name,
        "description": f"{name} tool",
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": False,
            "properties": {"command": {"type": "string", "description": "what to run"}},
            "required": ["command"],
        },
    }
    for name in ("Bash", "Glob", "Grep", "Read", "Edit", "Write", "TodoWrite", "WebFetch", "mcp__ide__getDiagnostics")
]
CLAUDE_CODE_TOOLS[-1] = {**CLAUDE_CODE_TOOLS[-1], "cache_control": {"type": "ephemeral"}}


def claude_code_request(**overrides) -> dict:
    body = {
        "model": MODEL,
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": " Be concise.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>cwd /tmp</system-reminder>"},
                    {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should run ls.", "signature": "c2ln"},
                    {"type": "text", "text": "Sure."},
                ],
            },
            {"role": "user", "content": "go on"},
        ],
        "tools": CLAUDE_CODE_TOOLS,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "metadata": {"user_id": "user_5f2c_account_9b1e_session_0d47"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "temperature": 1,
        "stream": True,
    }
    return {**body, **overrides}


# The first request Claude Code 2.1.332 (`claude -p "Say hello"`, npm @anthropic-ai/claude-code) sent to
# ANTHROPIC_BASE_URL, captured on the wire: texts and descriptions shortened, metadata ids zeroed, input schemas
# as sent. It carries adaptive thinking, a `system` message inside `messages`, a tool with `defer_loading`,
# `output_config.effort`, a clear_thinking edit, and the path `/v1/messages?beta=true` with these headers.
RECORDED_CLAUDE_CODE = Path(__file__).parent / "data" / "claude_code_2.1.332_request.json"
RECORDED_CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,effort-2025-11-24",
    "x-api-key": "unused",
    "x-app": "cli",
    "user-agent": "claude-cli/2.1.332 (external, sdk-cli)",
}


def test_a_recorded_claude_code_request_is_served():
    body = json.loads(RECORDED_CLAUDE_CODE.read_text()) | {"model": MODEL}
    with serving(FakeEngine(tool_markup=JSON_TOOL_MARKUP, max_context=65536)) as server:
        response = httpx.post(
            server.base + "/v1/messages?beta=true", json=body, headers=RECORDED_CLAUDE_CODE_HEADERS, timeout=30
        )
        assert response.status_code == 200, response.text
        events = sse_typed(response.text)
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
        assert "thinking" not in {e.get("content_block", {}).get("type") for e in events}
        encoded = server.engine.encoded[-1]
        # The mid-conversation system message stays a system message at its position, after the user turn.
        assert [m["role"] for m in encoded] == ["system", "user", "system"]
        assert encoded[2]["content"].startswith("# Environment")
        assert [t["function"]["name"] for t in server.engine.encoded_tools[-1]] == [t["name"] for t in body["tools"]]


def test_a_system_message_inside_messages_takes_text_only(served):
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "image", "source": {}}]},
        ],
    }
    error = assert_anthropic_error(httpx.post(served.base + "/v1/messages", json=body), 400, "invalid_request_error")
    assert "messages.1.content.0.type" in error["message"]
    body["messages"][1] = {"role": "tool", "content": "x"}
    error = assert_anthropic_error(httpx.post(served.base + "/v1/messages", json=body), 400, "invalid_request_error")
    assert "messages.1.role" in error["message"]


def test_a_claude_code_request_is_served():
    with serving(FakeEngine(tool_markup=JSON_TOOL_MARKUP)) as server:
        body = claude_code_request()
        # this SDK version takes neither `temperature` nor `context_management` as keywords
        extra = {key: body.pop(key) for key in ("context_management", "temperature")}
        del body["stream"]
        with client_for(server).messages.stream(**body, extra_body=extra) as stream:
            final = stream.get_final_message()
        assert [block.type for block in final.content] == ["text"] and final.content[
            0
        ].text == "Hello, world"  # no thinking blocks
        assert final.stop_reason == "end_turn"
        assert server.engine.encoded[-1] == [
            {"role": "system", "content": "You are Claude Code. Be concise."},
            {"role": "user", "content": "<system-reminder>cwd /tmp</system-reminder>list files"},
            {
                "role": "assistant",
                "content": "Sure.",
            },  # the thinking block is dropped (clear_thinking keeps nothing to clear)
            {"role": "user", "content": "go on"},
        ]
        assert [tool["function"]["name"] for tool in server.engine.encoded_tools[-1]] == [
            tool["name"] for tool in CLAUDE_CODE_TOOLS
        ]
        request = server.engine.submitted[-1]
        assert request.max_tokens == 32000 and request.temperature == 1 and request.grammar is None
        # the same body on the wire, plus the other fields Claude Code and the SDK may send
        raw = claude_code_request(
            service_tier="standard_only", cache_control={"type": "ephemeral"}, thinking={"type": "adaptive"}
        )
        events = sse_typed(httpx.post(server.base + "/v1/messages", json=raw).text)
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
        assert not any(e.get("content_block", {}).get("type") == "thinking" for e in events)


def test_output_config_format_is_enforced():
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    with serving(FakeEngine(script=Script(chunks=('{"city":', '"Paris"}')))) as server:
        client = client_for(server)
        message = client.messages.create(
            model=MODEL,
            max_tokens=20,
            messages=ASK,
            output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}},
        )
        assert json.loads(message.content[0].text) == {"city": "Paris"}
        grammar = server.engine.submitted[-1].grammar
        assert grammar is not None and '"Paris"' not in grammar and "city" in grammar  # the schema, compiled
        client.messages.create(
            model=MODEL,
            max_tokens=20,
            messages=ASK,
            extra_body={"output_format": {"type": "json_schema", "schema": schema}},
        )
        assert server.engine.submitted[-1].grammar == grammar  # the structured-outputs beta's top-level spelling
        client.messages.create(model=MODEL, max_tokens=20, messages=ASK, output_config={"effort": "low"})
        assert server.engine.submitted[-1].grammar is None


def test_disable_parallel_tool_use_keeps_one_tool_use():
    second = ("<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n', "</tool_call>")
    with serving(FakeEngine(script=Script(chunks=CALL + second), tool_markup=JSON_TOOL_MARKUP)) as server:
        client = client_for(server)
        both = client.messages.create(model=MODEL, max_tokens=100, messages=ASK, tools=[WEATHER])
        assert [block.input for block in both.content] == [{"city": "Paris"}, {"city": "Rome"}]
        choice = {"type": "auto", "disable_parallel_tool_use": True}
        one = client.messages.create(model=MODEL, max_tokens=100, messages=ASK, tools=[WEATHER], tool_choice=choice)
        assert [block.input for block in one.content] == [{"city": "Paris"}] and one.stop_reason == "tool_use"
        with client.messages.stream(
            model=MODEL, max_tokens=100, messages=ASK, tools=[WEATHER], tool_choice=choice
        ) as stream:
            streamed = stream.get_final_message()
        assert [block.input for block in streamed.content] == [{"city": "Paris"}] and streamed.stop_reason == "tool_use"


def test_hostile_input_gets_anthropics_envelope(served):
    headers = {"content-type": "application/json"}
    assert_anthropic_error(
        httpx.post(served.base + "/v1/messages", content=b"{", headers=headers), 400, "invalid_request_error"
    )
    assert_anthropic_error(
        httpx.post(served.base + "/v1/messages", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "invalid_request_error",
    )
    assert_anthropic_error(
        httpx.post(served.base + "/v1/messages", json={"model": "claude-x", "max_tokens": 5, "messages": ASK}),
        404,
        "not_found_error",
    )
    assert_anthropic_error(httpx.get(served.base + "/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(httpx.post(served.base + "/v1/messages/nowhere", json={}), 404, "not_found_error")
    huge = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 100}]}
    assert_anthropic_error(httpx.post(served.base + "/v1/messages", json=huge), 413, "request_too_large")
    assert_anthropic_error(
        httpx.post(served.base + "/v1/messages", json=ASK, headers={"host": "evil.example"}), 403, "permission_error"
    )
    with pytest.raises(anthropic.NotFoundError):
        client_for(served).messages.create(model="claude-x", max_tokens=5, messages=ASK)


def test_engine_error_mid_stream_is_an_error_event():
    with serving(FakeEngine(script=Script(error="boom"))) as server:
        events = sse_typed(
            httpx.post(
                server.base + "/v1/messages", json={"model": MODEL, "max_tokens": 9, "messages": ASK, "stream": True}
            ).text
        )
        assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "boom"}}
        with pytest.raises(anthropic.APIStatusError):
            client_for(server).messages.create(model=MODEL, max_tokens=9, messages=ASK)
