"""The schema tier for the OpenAI routes (docs/api.md#chat-completions): every body and every stream chunk `serve` produces
validates against its component schema in OpenAI's published OpenAPI document, and the official `openai`
SDK accepts it with `_strict_response_validation=True`. Fake engine, real sockets."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from fake_engine import JSON_TOOL_MARKUP, FakeEngine, Script, chat_body, serving, sse_events
from openapi_schemas import check

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = ("<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>")
CUT_CALL = (
    "<tool_call>",
    '\n{"name": "get_weather", ',
    '"arguments": {"city": "Pa',
    'ris"}}\n',
    "</tool_call>",
)  # max_tokens 3 cuts it
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def strict_client(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=10, _strict_response_validation=True
    )


def chunks_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    return events[:-1]


CHAT_CASES = {
    "plain": (Script(), {}),
    "logprobs": (
        Script(chunks=("Hi", "\ufffd", "!"), token_bytes={"\ufffd": b"\xf0\x9f"}),
        {"logprobs": True, "top_logprobs": 2},
    ),
    "tools": (Script(chunks=("Let me look. ",) + CALL), {"tools": [WEATHER]}),
    "forced tool cut by max_tokens": (
        Script(chunks=CUT_CALL),
        {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 3},
    ),
    "structured output": (Script(chunks=('{"city"', ': "Paris"}')), {"response_format": JSON_SCHEMA}),
    "json_object": (Script(chunks=("{}",)), {"response_format": {"type": "json_object"}}),
    "length": (Script(), {"max_tokens": 2}),
}


@pytest.mark.parametrize("case", CHAT_CASES)
def test_chat_bodies_and_chunks_match_the_schema(case):
    script, extra = CHAT_CASES[case]
    with serving(FakeEngine(script=script, tool_markup=JSON_TOOL_MARKUP)) as server:
        response = httpx.post(server.base + "/v1/chat/completions", json=chat_body(server.engine, **extra))
        assert response.status_code == 200, response.text
        body = response.json()
        check("CreateChatCompletionResponse", body)
        assert body["choices"][0]["message"]["refusal"] is None
        for options in (None, {"include_usage": True}):
            stream_extra = (
                dict(extra, stream=True) if options is None else dict(extra, stream=True, stream_options=options)
            )
            chunks = chunks_of(
                httpx.post(server.base + "/v1/chat/completions", json=chat_body(server.engine, **stream_extra))
            )
            for chunk in chunks:
                check("CreateChatCompletionStreamResponse", chunk)
            assert (chunks[-1]["choices"] == []) == (options is not None)

        client = strict_client(server)
        messages = [{"role": "user", "content": "hi"}]
        sdk_extra = {key: value for key, value in extra.items()}
        reply = client.chat.completions.create(model=server.engine.model_id, messages=messages, **sdk_extra)
        assert reply.choices[0].finish_reason == body["choices"][0]["finish_reason"]
        streamed = list(
            client.chat.completions.create(
                model=server.engine.model_id,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **sdk_extra,
            )
        )
        assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_forced_tool_call_cut_by_max_tokens_is_returned_partial():
    with serving(FakeEngine(script=Script(chunks=CUT_CALL), tool_markup=JSON_TOOL_MARKUP)) as server:
        body = chat_body(server.engine, tools=[WEATHER], tool_choice="required", max_tokens=3)
        choice = httpx.post(server.base + "/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "length"
        [call] = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Pa'}
        assert choice["message"]["content"] is None

        chunks = chunks_of(httpx.post(server.base + "/v1/chat/completions", json=dict(body, stream=True)))
        deltas = [c["choices"][0]["delta"] for c in chunks]
        calls = [part for delta in deltas for part in delta.get("tool_calls", [])]
        assert calls[0]["function"]["name"] == "get_weather"
        assert "".join(part["function"]["arguments"] for part in calls) == '{"city": "Pa'
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_logprob_bytes_are_the_tokens_own_bytes():
    script = Script(chunks=("Hi", "\ufffd", "\ufffd"), token_bytes={"\ufffd": b"\xf0\x9f"})
    with serving(FakeEngine(script=script)) as server:
        reply = strict_client(server).chat.completions.create(
            model=server.engine.model_id, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1
        )
        assert [entry.bytes for entry in reply.choices[0].logprobs.content] == [[72, 105], [0xF0, 0x9F], [0xF0, 0x9F]]
        assert reply.choices[0].logprobs.content[0].top_logprobs[0].bytes == list(b"alt0")


def completion_chunk_as_body(chunk: dict[str, Any], last: bool) -> dict[str, Any]:
    """The document has no chunk schema for legacy completions: a chunk is a CreateCompletionResponse whose
    `finish_reason` is null until the finishing chunk (as OpenAI streams them). Check that, then validate the
    chunk with the null replaced."""
    choices = []
    for choice in chunk["choices"]:
        if choice["finish_reason"] is None:
            assert not last or chunk["choices"] == []
            choice = dict(choice, finish_reason="stop")
        choices.append(choice)
    return dict(chunk, choices=choices)


def test_completions_bodies_and_chunks_match_the_schema():
    with serving() as server:
        base = {"model": server.engine.model_id, "prompt": "once upon a time"}
        for extra in ({}, {"logprobs": 2}, {"max_tokens": 2}):
            response = httpx.post(server.base + "/v1/completions", json=dict(base, **extra))
            assert response.status_code == 200, response.text
            check("CreateCompletionResponse", response.json())
            for options in (None, {"include_usage": True}):
                stream_extra = (
                    dict(extra, stream=True) if options is None else dict(extra, stream=True, stream_options=options)
                )
                chunks = chunks_of(httpx.post(server.base + "/v1/completions", json=dict(base, **stream_extra)))
                for chunk in chunks:
                    check("CreateCompletionResponse", completion_chunk_as_body(chunk, last=chunk is chunks[-1]))
        client = strict_client(server)
        result = client.completions.create(model=server.engine.model_id, prompt="a b", logprobs=1)
        assert result.choices[0].logprobs.tokens == ["Hello", ",", "", " world"]
        # Streamed legacy completions carry `finish_reason: null` until the last chunk, as OpenAI's own do; the
        # SDK's strict mode (typed for bodies) refuses that null, so the stream replays in its default mode.
        loose = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=10)
        texts = [
            c.choices[0].text for c in loose.completions.create(model=server.engine.model_id, prompt="a b", stream=True)
        ]
        assert texts == ["Hello", ",", " world", ""]


def test_models_and_model_retrieve_match_the_schema():
    with serving() as server:
        listed = httpx.get(server.base + "/v1/models")
        check("ListModelsResponse", listed.json())
        one = httpx.get(server.base + f"/v1/models/{server.engine.model_id}")
        assert one.status_code == 200
        check("Model", one.json())
        assert one.json() == listed.json()["data"][0]
        client = strict_client(server)
        assert client.models.retrieve(server.engine.model_id).id == server.engine.model_id
        missing = httpx.get(server.base + "/v1/models/other-org/other-model")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        check("ErrorResponse", missing.json())
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("other-org/other-model")


def test_developer_role_is_the_system_prompt():
    with serving() as server:
        messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
        reply = strict_client(server).chat.completions.create(model=server.engine.model_id, messages=messages)
        assert reply.choices[0].message.content == "Hello, world"
        assert server.engine.encoded[-1][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/v1/chat/completions", {"model": "m"}, 400),
        ("POST", "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "fake-org/fake-model", "messages": [{"role": "user", "content": "x " * 100}]},
            413,
        ),
        ("POST", "/v1/completions", {"model": "fake-org/fake-model", "prompt": 3}, 400),
        ("GET", "/v1/nowhere", None, 404),
        ("DELETE", "/v1/models", None, 405),
    ],
)
def test_errors_match_the_schema(method, path, body, status):
    with serving() as server:
        response = httpx.request(method, server.base + path, json=body)
        assert response.status_code == status
        check("ErrorResponse", response.json())


def test_stream_error_event_matches_the_schema():
    with serving(FakeEngine(script=Script(error="boom"))) as server:
        chunks = chunks_of(httpx.post(server.base + "/v1/chat/completions", json=chat_body(server.engine, stream=True)))
        check("ErrorResponse", chunks[-1])
        for chunk in chunks[:-1]:
            check("CreateChatCompletionStreamResponse", chunk)


def test_tool_call_stream_reassembles_to_the_non_streamed_call():
    with serving(FakeEngine(script=Script(chunks=CALL), tool_markup=JSON_TOOL_MARKUP)) as server:
        client = strict_client(server)
        kwargs = dict(model=server.engine.model_id, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER])
        whole = client.chat.completions.create(**kwargs)
        assert whole.choices[0].finish_reason == "tool_calls"
        assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
        names = [
            d.function.name
            for c in client.chat.completions.create(stream=True, **kwargs)
            for d in (c.choices[0].delta.tool_calls or [])
            if d.function.name
        ]
        assert names == ["get_weather"]
