"""`/v1/responses` (OpenAI Responses API) over the fake engine on real sockets: the `openai` SDK's
`responses.create` (stream and not, strict validation), a function-tool round trip, `previous_response_id`
over the bounded store, GET/DELETE, and every body and event validated against OpenAI's OpenAPI document."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fake_engine import JSON_TOOL_MARKUP, FakeEngine, Script, serving
from openapi_schemas import check

from macprovider.core.errors import ApiError
from macprovider.serve.responses_api import ResponseStore

MODEL = "fake-org/fake-model"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = ("<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>")


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=10, _strict_response_validation=True
    )


def sse_typed(text: str) -> list[dict]:
    """Parse `event: <type>\\ndata: <json>` blocks; asserts the event line names the payload's type."""
    events = []
    for block in text.strip("\n").split("\n\n"):
        head, data = block.split("\n", 1)
        assert head.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data[len("data: ") :])
        assert payload["type"] == head[len("event: ") :]
        events.append(payload)
    return events


@pytest.fixture
def served():
    with serving() as server:
        yield server


def test_text_response_with_the_sdk(served):
    client = client_for(served)
    result = client.responses.create(
        model=MODEL, input="hi there", instructions="be brief", max_output_tokens=50, temperature=0.5, top_p=0.9
    )
    assert result.id.startswith("resp_") and result.object == "response" and result.status == "completed"
    assert result.output_text == "Hello, world"
    assert result.usage.input_tokens == 3 + 3 and result.usage.output_tokens == 4 and result.usage.total_tokens == 10
    assert served.engine.encoded[-1] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    request = served.engine.submitted[-1]
    assert (request.max_tokens, request.temperature, request.top_p) == (50, 0.5, 0.9)
    raw = httpx.get(served.base + f"/v1/responses/{result.id}").json()
    check("Response", raw)
    assert raw["output"][0]["content"][0]["text"] == "Hello, world"


def test_items_input_with_developer_and_history(served):
    items = [
        {"role": "developer", "content": "terse"},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "user", "content": "again"},
    ]
    client_for(served).responses.create(model=MODEL, input=items)
    assert served.engine.encoded[-1] == [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]


def test_stream_events_in_order_with_sequence_numbers(served):
    response = httpx.post(served.base + "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_typed(response.text)
    for event in events:
        check("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello, world"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello, world"
    assert final["usage"]["output_tokens"] == 4

    streamed = list(client_for(served).responses.create(model=MODEL, input="hi", stream=True))
    assert streamed[-1].type == "response.completed" and streamed[-1].response.output_text == "Hello, world"


def test_max_output_tokens_is_incomplete(served):
    result = client_for(served).responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert result.status == "incomplete" and result.incomplete_details.reason == "max_output_tokens"
    assert result.output_text == "Hello,"
    events = sse_typed(
        httpx.post(
            served.base + "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True, "max_output_tokens": 2}
        ).text
    )
    assert events[-1]["type"] == "response.incomplete"
    check("ResponseStreamEvent", events[-1])


def test_function_tool_round_trip_and_previous_response_id():
    with serving(FakeEngine(script=Script(chunks=CALL), tool_markup=JSON_TOOL_MARKUP)) as server:
        client = client_for(server)
        first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
        [call] = first.output
        assert (
            call.type == "function_call"
            and call.name == "get_weather"
            and json.loads(call.arguments) == {"city": "Paris"}
        )
        assert server.engine.encoded_tools[-1] == [
            {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}
        ]
        assert server.engine.submitted[-1].grammar is not None  # required: forced by constrained decoding
        check("Response", httpx.get(server.base + f"/v1/responses/{first.id}").json())

        server.engine.script = Script(chunks=("It is sunny.",))
        second = client.responses.create(
            model=MODEL,
            previous_response_id=first.id,
            tools=[WEATHER],
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        )
        assert second.output_text == "It is sunny." and second.previous_response_id == first.id
        conversation = server.engine.encoded[-1]
        assert conversation[0] == {"role": "user", "content": "Weather in Paris?"}
        assert conversation[1]["role"] == "assistant"
        assert conversation[1]["tool_calls"] == [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ]
        assert conversation[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}

        # the same round trip stated statelessly, with the call as an input item
        stateless = [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ]
        client.responses.create(model=MODEL, input=stateless, tools=[WEATHER], store=False)
        assert server.engine.encoded[-1][1]["tool_calls"][0]["id"] == "c1"


def test_function_call_stream_events():
    with serving(FakeEngine(script=Script(chunks=("Checking. ",) + CALL), tool_markup=JSON_TOOL_MARKUP)) as server:
        events = sse_typed(
            httpx.post(
                server.base + "/v1/responses", json={"model": MODEL, "input": "w?", "tools": [WEATHER], "stream": True}
            ).text
        )
        for event in events:
            check("ResponseStreamEvent", event)
        kinds = [e["type"] for e in events]
        assert kinds[kinds.index("response.output_item.done") + 1 :] == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        assert json.loads(done["arguments"]) == {"city": "Paris"} and done["output_index"] == 1
        assert [item["type"] for item in events[-1]["response"]["output"]] == ["message", "function_call"]


def test_structured_output_sets_the_grammar(served):
    fmt = {
        "type": "json_schema",
        "name": "city",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    result = client_for(served).responses.create(model=MODEL, input="city?", text={"format": fmt})
    assert served.engine.submitted[-1].grammar is not None
    assert result.text.format.type == "json_schema"
    bad = httpx.post(
        served.base + "/v1/responses",
        json={"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": 3}}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text.format"


def test_get_delete_and_missing_ids(served):
    client = client_for(served)
    result = client.responses.create(model=MODEL, input="hi")
    assert client.responses.retrieve(result.id).output_text == "Hello, world"
    deleted = httpx.delete(served.base + f"/v1/responses/{result.id}")
    assert deleted.json() == {"id": result.id, "object": "response", "deleted": True}
    for response in (
        httpx.get(served.base + f"/v1/responses/{result.id}"),
        httpx.delete(served.base + f"/v1/responses/{result.id}"),
    ):
        assert response.status_code == 404
        check("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(result.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_missing")
    assert caught.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model=MODEL, input="hi", store=False)
    assert httpx.get(served.base + f"/v1/responses/{unstored.id}").status_code == 404


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}]}, "tools.1.type"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"input": 3}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ],
)
def test_bad_requests_name_the_parameter(served, extra, param):
    response = httpx.post(served.base + "/v1/responses", json={"model": MODEL, "input": "hi", **extra})
    assert response.status_code == 400, response.text
    check("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param


def test_other_model_and_hostile_bodies(served):
    other = httpx.post(served.base + "/v1/responses", json={"model": "other", "input": "hi"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    for raw, code in (
        (b"{", "invalid_json"),
        (b"[]", "invalid_request"),
        (b'{"model": "' + MODEL.encode() + b'"}', "invalid_request"),
    ):
        response = httpx.post(served.base + "/v1/responses", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == code
        check("ErrorResponse", response.json())


def test_engine_error_mid_stream_is_response_failed():
    with serving(FakeEngine(script=Script(error="boom"))) as server:
        events = sse_typed(
            httpx.post(server.base + "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}).text
        )
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"]["message"] == "boom"
        for event in events:
            check("ResponseStreamEvent", event)


def test_store_is_bounded_by_count_and_bytes():
    store = ResponseStore(max_count=2, max_bytes=10_000)
    for name in ("a", "b", "c"):
        store.put({"id": name, "text": "x"}, [{"role": "user", "content": name}])
    assert len(store) == 2  # count bound: the oldest ("a") went first
    with pytest.raises(ApiError):
        store.get("a")
    assert store.get("c")[1] == [{"role": "user", "content": "c"}]
    store.put({"id": "big", "text": "y" * 6_000}, [])
    store.put({"id": "big2", "text": "y" * 6_000}, [])  # byte bound: "c" and "big" evicted, oldest first
    assert len(store) == 1 and store.get("big2") and store.bytes <= 10_000
    store.put({"id": "huge", "text": "z" * 20_000}, [])  # larger than the whole budget: not kept
    assert len(store) == 1
    store.delete("big2")
    assert len(store) == 0 and store.bytes == 0


def test_parallel_tool_calls_false_keeps_the_first_call_on_chat_and_responses():
    # OpenAI's `parallel_tool_calls: false`, through the same core as Anthropic's disable_parallel_tool_use.
    second = ("<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n', "</tool_call>")
    chat_tool = {
        "type": "function",
        "function": {
            "name": WEATHER["name"],
            "description": WEATHER["description"],
            "parameters": WEATHER["parameters"],
        },
    }
    ask = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    with serving(FakeEngine(script=Script(chunks=CALL + second), tool_markup=JSON_TOOL_MARKUP)) as server:
        client = client_for(server)
        both = client.chat.completions.create(model=MODEL, messages=ask, tools=[chat_tool])
        assert [json.loads(c.function.arguments)["city"] for c in both.choices[0].message.tool_calls] == [
            "Paris",
            "Rome",
        ]
        one = client.chat.completions.create(model=MODEL, messages=ask, tools=[chat_tool], parallel_tool_calls=False)
        assert [json.loads(c.function.arguments)["city"] for c in one.choices[0].message.tool_calls] == ["Paris"]
        assert one.choices[0].finish_reason == "tool_calls"
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=ask, tools=[chat_tool], parallel_tool_calls=False, stream=True
            )
        )
        streamed = [part for chunk in chunks if chunk.choices for part in chunk.choices[0].delta.tool_calls or []]
        assert {part.index for part in streamed} == {0}
        response = client.responses.create(
            model=MODEL, input=ask[0]["content"], tools=[WEATHER], parallel_tool_calls=False
        )
        calls = [item for item in response.output if item.type == "function_call"]
        assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris"] and response.parallel_tool_calls is False
