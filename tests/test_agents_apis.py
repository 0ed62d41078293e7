"""The Responses API and the Anthropic Messages API on the real MLX engine (tiny random-weight model with a
Hermes-style `<tool_call>` chat template), through the official clients: a forced function-tool round trip
on each, streamed and not. Forced calls are constrained decoding, so they parse even on random weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anthropic
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_agents_logprobs import real_server  # noqa: E402
from test_agents_tools import WEATHER, tools_model  # noqa: E402,F401 - the session fixture is used below

RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}
ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": WEATHER["function"]["parameters"],
}


@pytest.fixture
def server(tools_model):  # noqa: F811
    with real_server(tools_model) as pair:
        yield pair


def test_responses_function_tool_round_trip(server):
    client, model = server
    first = client.responses.create(
        model=model,
        input="What is the weather in Paris?",
        tools=[RESPONSES_WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=200,
    )
    assert first.status == "completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}

    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        tools=[RESPONSES_WEATHER],
        tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 18}'}],
        temperature=0,
        max_output_tokens=8,
    )
    assert second.status in ("completed", "incomplete") and second.usage.input_tokens > first.usage.input_tokens
    assert "<tool_call>" not in second.output_text

    events = list(
        client.responses.create(
            model=model,
            input="Weather?",
            tools=[RESPONSES_WEATHER],
            tool_choice="required",
            temperature=0,
            max_output_tokens=200,
            stream=True,
        )
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and set(json.loads(done[0].arguments)) == {"city"}
    assert events[-1].type == "response.completed"


def test_anthropic_forced_tool_use_round_trip(server):
    openai_client, model = server
    client = anthropic.Anthropic(
        base_url=str(openai_client.base_url).removesuffix("/v1/"), api_key="unused", max_retries=0, timeout=60
    )
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(
        model=model,
        max_tokens=200,
        messages=ask,
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"}

    history = ask + [
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": '{"temp_c": 18}'}]},
    ]
    with client.messages.stream(
        model=model,
        max_tokens=8,
        messages=history,
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "none"},
        extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" and "<tool_call>" not in block.text for block in final.content)

    with client.messages.stream(
        model=model,
        max_tokens=200,
        messages=ask,
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and set(streamed.content[-1].input) == {"city"}


def test_openai_agents_sdk_on_its_default_responses_model(server):
    """The Agents SDK's default model speaks the Responses API (streamed): a forced call runs the Python
    tool, whose output ends the run (`stop_on_first_tool`: random weights would not stop on their own, and
    the SDK treats a `max_output_tokens` cut as a failure)."""
    import agents
    import openai

    openai_client, model = server
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        calls.append(city)
        return "sunny, 18 C"

    agents.set_tracing_disabled(True)
    agent = agents.Agent(
        name="forecaster",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=model,
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=200),
        tool_use_behavior="stop_on_first_tool",
    )
    client = openai.AsyncOpenAI(base_url=str(openai_client.base_url), api_key="unused", max_retries=0, timeout=60)
    run_config = agents.RunConfig(model_provider=agents.OpenAIProvider(openai_client=client, use_responses=True))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", run_config=run_config, max_turns=4)
    assert len(calls) == 1 and isinstance(calls[0], str)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert result.final_output == "sunny, 18 C"
