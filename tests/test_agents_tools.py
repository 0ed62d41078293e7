"""Tool calling through HTTP with the official `openai` client on the real MLX engine: a tiny random-weight
model whose chat template is Hermes/Qwen-style (`<tool_call>` JSON markup, mlx-lm's `json_tools` parser).
`tool_choice` required/named is enforced by constrained decoding, so a call really happens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache

sys.path.insert(0, str(Path(__file__).parent))
from test_agents_logprobs import real_server  # noqa: E402

TOOLS_MODEL_ID = "macprovider-test/tiny-tools-chat"
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions.\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Answer a call as <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '\n<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n'
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="session")
def tools_model(hf_home, tmp_path_factory) -> str:
    source = tmp_path_factory.mktemp("tiny-tools-src")
    build_model_files(source, TinyModelSpec())
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    install_in_hub_cache(source, TOOLS_MODEL_ID, hf_home / "hub")
    return TOOLS_MODEL_ID


@pytest.fixture
def server(tools_model):
    with real_server(tools_model) as pair:
        yield pair


def test_tool_call_round_trip(server):
    client, model = server
    first = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        max_tokens=200,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content  # no raw markup, no text
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)

    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18})},
    ]
    answer = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=12, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert "<tool_call>" not in (answer.choices[0].message.content or "")


def test_streamed_tool_call_assembled_by_the_client(server):
    client, model = server
    contents = []
    with client.chat.completions.stream(
        model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, temperature=0
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                contents.append(event.delta)
        final = stream.get_final_completion()
    assert all("<tool_call" not in c and "</tool_call" not in c for c in contents)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == ({"city"} if call.function.name == "get_weather" else {"zone"})


def test_tools_on_a_model_without_tool_support_is_400(tiny_model):
    with real_server(tiny_model) as (client, model):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER])
        assert info.value.body["param"] == "tools"
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model, messages=ASK, tools=[{"type": "function", "function": {"name": "a b"}}]
            )
        assert info.value.body["param"] == "tools.0.function.name"
