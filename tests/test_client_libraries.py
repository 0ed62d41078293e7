"""The client libraries people point at an OpenAI-compatible server, used as their docs say, against
`macprovider serve` on the real SmolLM2-135M-Instruct model: langchain-openai,
litellm, llm (Simon Willison's), pydantic-ai, the Agents SDK, and a Claude Code-shaped request through the
`anthropic` SDK. (The `openai` SDK and the `anthropic` SDK's own round trips are in tests/test_real_model.py.)

Per library: plain chat, streaming (the same greedy text as the plain answer), a tool-call round trip where the
library can force the call (the 135M model does not call tools unforced), and structured output. One shared
server (`real_tools_server`: the model with a Hermes-style tool template); 16-48 tokens a request.

What a library cannot do against any OpenAI-compatible server is not tested: `llm` has no `tool_choice`, so its
tool chain depends on the model choosing a tool, which this model does not do.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.e2e

SHORT = 16  # tokens for an answer to the demo question ("The capital of France is Paris.")
LONG = 48  # tokens for a tool call or a JSON object
QUESTION = "What is the capital of France?"
JSON_QUESTION = "What is the capital of France? Reply in JSON with the city and the country."
WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_REPORT = {"temp_c": 18, "sky": "sunny"}


class Capital(BaseModel):
    """The structured-output type every library is asked for."""

    city: str
    country: str


def get_weather(city: str) -> str:
    """Weather in a city"""
    return json.dumps(WEATHER_REPORT)


@pytest.fixture
def server(real_tools_server):
    return real_tools_server


# ---------------------------------------------------------------------------------------------- langchain-openai
def chat_openai(server, max_tokens: int):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=server.model,
        base_url=server.base + "/v1",
        api_key="unused",
        max_tokens=max_tokens,
        temperature=0,
        max_retries=0,
        timeout=120,
    )


def test_langchain_openai_invoke_stream_tools_and_structured_output(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    llm = chat_openai(server, SHORT)
    answer = llm.invoke(QUESTION)
    assert "Paris" in answer.content and answer.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.content for chunk in llm.stream(QUESTION)) == answer.content

    weather = tool(get_weather)
    forced = chat_openai(server, LONG).bind_tools([weather], tool_choice="get_weather", strict=True)
    history = [HumanMessage(WEATHER_QUESTION)]
    call_message = forced.invoke(history)
    [call] = call_message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    history += [call_message, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([weather], tool_choice="none").invoke(history)
    assert final.content and not final.tool_calls and "<tool_call>" not in final.content

    capital = chat_openai(server, LONG).with_structured_output(Capital, method="json_schema").invoke(JSON_QUESTION)
    assert isinstance(capital, Capital) and capital.city == "Paris"


# ---------------------------------------------------------------------------------------------- litellm
@pytest.fixture
def litellm(monkeypatch):
    # litellm fetches a model price map from GitHub when imported, retrying for seconds without a network.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def test_litellm_completion_stream_tools_and_response_format(server, litellm):
    settings = dict(
        model="openai/" + server.model,
        api_base=server.base + "/v1",
        api_key="unused",
        temperature=0,
        num_retries=0,
        timeout=120,
    )
    ask = [{"role": "user", "content": QUESTION}]
    answer = litellm.completion(messages=ask, max_tokens=SHORT, **settings)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.usage.completion_tokens > 0
    streamed = asyncio.run(_litellm_stream_text(litellm, ask, settings))
    assert streamed == text

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    ask_weather = [{"role": "user", "content": WEATHER_QUESTION}]
    first = litellm.completion(
        messages=ask_weather,
        tools=[weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=LONG,
        **settings,
    )
    assert first.choices[0].finish_reason == "tool_calls"
    message = first.choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    history = ask_weather + [
        message.model_dump(),
        {"role": "tool", "tool_call_id": call.id, "content": get_weather(**json.loads(call.function.arguments))},
    ]
    final = litellm.completion(messages=history, tools=[weather], tool_choice="none", max_tokens=SHORT, **settings)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls

    structured = litellm.completion(
        messages=[{"role": "user", "content": JSON_QUESTION}], response_format=Capital, max_tokens=LONG, **settings
    )
    assert Capital.model_validate_json(structured.choices[0].message.content).city == "Paris"


async def _litellm_stream_text(litellm, messages, settings) -> str:
    """`acompletion(stream=True)` deltas joined (the async client as an async app uses it)."""
    parts = []
    async for chunk in await litellm.acompletion(messages=messages, max_tokens=SHORT, stream=True, **settings):
        parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- llm
@pytest.fixture
def llm_model(server, tmp_path, monkeypatch):
    """`llm` configured as its docs say for an OpenAI-compatible local server: `extra-openai-models.yaml` in
    the user directory (LLM_USER_PATH), one entry on chat completions, one on the Responses API."""
    import yaml

    entry = {
        "model_name": server.model,
        "api_base": server.base + "/v1",
        "supports_tools": True,
        "supports_schema": True,
    }
    models = [
        {"model_id": "macprovider-chat", **entry},
        {"model_id": "macprovider-responses", "responses": True, **entry},
    ]
    (tmp_path / "extra-openai-models.yaml").write_text(yaml.safe_dump(models))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LLM_OPENAI_SHOW_RESPONSES"):
        monkeypatch.delenv(key, raising=False)
    import llm

    return llm.get_model


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("model_id", ["macprovider-chat", "macprovider-responses"])
def test_llm_prompt_stream_and_schema(llm_model, model_id):
    model = llm_model(model_id)
    answer = model.prompt(QUESTION, max_tokens=SHORT, temperature=0, stream=False)
    text = answer.text()
    assert "Paris" in text and answer.usage().output > 0
    streamed = model.prompt(QUESTION, max_tokens=SHORT, temperature=0)
    assert "".join(streamed) == text
    capital = json.loads(model.prompt(JSON_QUESTION, schema=SCHEMA, max_tokens=LONG, temperature=0).text())
    assert Capital.model_validate(capital).city == "Paris"


# ---------------------------------------------------------------------------------------------- pydantic-ai
def pydantic_ai_model(server):
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(server.model, provider=OpenAIProvider(base_url=server.base + "/v1", api_key="unused"))


def test_pydantic_ai_run_stream_and_output_types(server):
    from pydantic_ai import Agent, ModelSettings, NativeOutput

    model = pydantic_ai_model(server)
    agent = Agent(model, model_settings=ModelSettings(max_tokens=SHORT, temperature=0))
    result = agent.run_sync(QUESTION)
    assert "Paris" in result.output and result.usage.output_tokens > 0

    async def stream() -> str:
        async with agent.run_stream(QUESTION) as run:
            return "".join([delta async for delta in run.stream_text(delta=True)])

    assert asyncio.run(stream()) == result.output

    settings = ModelSettings(max_tokens=LONG, temperature=0)
    by_tool = (
        Agent(model, output_type=Capital, model_settings=settings).run_sync(JSON_QUESTION).output
    )  # pydantic-ai's default: an output tool
    native = (
        Agent(model, output_type=NativeOutput(Capital), model_settings=settings).run_sync(JSON_QUESTION).output
    )  # response_format json_schema
    assert by_tool.city == native.city == "Paris"


def test_pydantic_ai_tool_round_trip(server):
    """The agent loop: step 1 forced to call `get_weather` (tool_choice per step, as pydantic-ai's docs show
    with a capability), the tool runs, step 2 answers in text."""
    from dataclasses import dataclass

    from pydantic_ai import Agent, ModelSettings
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.messages import ToolCallPart, ToolReturnPart

    @dataclass
    class WeatherFirst(AbstractCapability):
        def get_model_settings(self):
            return lambda ctx: ModelSettings(tool_choice=["get_weather"] if ctx.run_step == 1 else "none")

    cities = []
    agent = Agent(
        pydantic_ai_model(server),
        model_settings=ModelSettings(max_tokens=LONG, temperature=0),
        capabilities=[WeatherFirst()],
    )

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Weather in a city"""
        cities.append(city)
        return json.dumps(WEATHER_REPORT)

    result = agent.run_sync(WEATHER_QUESTION)
    assert cities == ["Paris"]
    parts = [type(part) for message in result.all_messages() for part in message.parts]
    assert ToolCallPart in parts and ToolReturnPart in parts
    assert result.output and "<tool_call>" not in result.output


# ---------------------------------------------------------------------------------------------- Claude Code
def test_a_claude_code_request_and_output_config_on_real_weights(server):
    """A request shaped like Claude Code's (tests/test_anthropic_api.py `claude_code_request`: cache_control,
    thinking, metadata, context_management, a system-reminder, tools, `stream: true`) answers in text without
    thinking blocks; `output_config.format` gives JSON valid against its schema (the `anthropic` SDK)."""
    import anthropic

    from tests.test_anthropic_api import CLAUDE_CODE_TOOLS, claude_code_request

    client = anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0, timeout=120)
    body = claude_code_request(
        model=server.model,
        max_tokens=SHORT,
        tools=CLAUDE_CODE_TOOLS[:3],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>cwd /tmp</system-reminder>\n"},
                    {"type": "text", "text": QUESTION, "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
    )
    extra = {key: body.pop(key) for key in ("context_management", "temperature", "stream")}
    with client.messages.stream(**body, extra_body={**extra, "temperature": 0}) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["text"] and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0

    answer = client.messages.create(
        model=server.model,
        max_tokens=LONG,
        messages=[{"role": "user", "content": JSON_QUESTION}],
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
        extra_body={"temperature": 0},
    )
    assert Capital.model_validate_json(answer.content[0].text).city == "Paris"


# ---------------------------------------------------------------------------------------------- openai-agents
def test_openai_agents_tool_round_trip_on_real_weights(server):
    """The Agents SDK on its default (Responses) model: `tool_choice="required"` makes the first turn call
    `get_weather`; the SDK then resets tool_choice (its default `reset_tool_choice`) and the model answers."""
    import agents
    import openai

    cities = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city"""
        cities.append(city)
        return json.dumps(WEATHER_REPORT)

    agents.set_tracing_disabled(True)
    agent = agents.Agent(
        name="forecaster",
        tools=[get_weather],
        model=server.model,
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=LONG),
    )
    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    run_config = agents.RunConfig(model_provider=agents.OpenAIProvider(openai_client=client, use_responses=True))
    result = agents.Runner.run_sync(agent, WEATHER_QUESTION, run_config=run_config, max_turns=3)
    assert cities == ["Paris"]
    assert [item.type for item in result.new_items][:2] == ["tool_call_item", "tool_call_output_item"]
    assert result.final_output and "<tool_call>" not in result.final_output


# ---------------------------------------------------------------------------------------------- embeddings
# `embedding_server` (tests/conftest.py): `macprovider serve` on the real all-MiniLM-L6-v2. Each library's
# vectors are held to the openai SDK's `embeddings.create` on the same texts (itself held to an independent
# forward in tests/test_embeddings.py).
DOCUMENTS = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "東京は日本の首都です。",
]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def reference_vectors(embedding_server):
    import numpy as np
    import openai

    client = openai.OpenAI(base_url=embedding_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.embeddings.create(model=embedding_server.model, input=DOCUMENTS + [QUERY])
    assert [d.index for d in result.data] == [0, 1, 2, 3]
    return np.array([d.embedding for d in result.data])


def assert_same_vectors(got, reference) -> None:
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    assert got.shape == reference.shape
    assert np.allclose(got, reference, atol=1e-6)
    assert int(np.argmax(got[:3] @ got[3])) == 0  # the query's nearest document is the one about Paris


def test_langchain_openai_embeddings_with_text_and_with_its_default_token_arrays(
    embedding_server, reference_vectors, monkeypatch
):
    """`check_embedding_ctx_length=False` (langchain's setting for OpenAI-compatible servers) sends text. The
    default sends token-id arrays from tiktoken's cl100k_base, which tiktoken downloads at run time (not
    offline); the token arrays this server takes are the served model's own ids, so here langchain's tiktoken
    encoding is the model's tokenizer: the default request path (arrays of ids, chunked and re-averaged by
    langchain) is then exercised as it runs, and must give the text path's vectors."""
    import tiktoken
    from langchain_openai import OpenAIEmbeddings
    from tokenizers import Tokenizer

    settings = {
        "model": embedding_server.model,
        "base_url": embedding_server.base + "/v1",
        "api_key": "unused",
        "max_retries": 0,
        "timeout": 120,
    }
    text_path = OpenAIEmbeddings(check_embedding_ctx_length=False, **settings)
    assert_same_vectors(text_path.embed_documents(DOCUMENTS) + [text_path.embed_query(QUERY)], reference_vectors)

    snapshot = embedding_server.snapshot
    tokenizer = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    class ModelEncoding:
        def encode_ordinary(self, text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids

        def encode(self, text: str, **_: object) -> list[int]:
            return self.encode_ordinary(text)

    def no_download(name: str) -> object:
        raise KeyError(name)

    monkeypatch.setattr(tiktoken, "encoding_for_model", no_download)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: ModelEncoding())
    token_path = OpenAIEmbeddings(**settings)
    assert token_path.check_embedding_ctx_length and token_path.tiktoken_enabled  # langchain's defaults
    assert_same_vectors(token_path.embed_documents(DOCUMENTS) + [token_path.embed_query(QUERY)], reference_vectors)


def test_litellm_embedding(embedding_server, reference_vectors, litellm):
    response = litellm.embedding(
        model="openai/" + embedding_server.model,
        input=DOCUMENTS + [QUERY],
        api_base=embedding_server.base + "/v1",
        api_key="unused",
        timeout=120,
    )
    assert_same_vectors([item["embedding"] for item in response.data], reference_vectors)
    assert response.usage.prompt_tokens > len(DOCUMENTS)


def test_llm_embed(embedding_server, reference_vectors, tmp_path, monkeypatch):
    """`llm embed` with llm's own OpenAI embedding model class, registered for the served id as a plugin does
    (llm's extra-openai-models.yaml registers chat models only); OPENAI_BASE_URL points it here."""
    import llm
    from click.testing import CliRunner
    from llm.cli import cli
    from llm.default_plugins.openai_models import OpenAIEmbeddingModel

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    monkeypatch.setenv("OPENAI_BASE_URL", embedding_server.base + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")

    class Plugin:
        __name__ = "macprovider_embeddings"

        @llm.hookimpl
        def register_embedding_models(self, register):
            register(OpenAIEmbeddingModel("macprovider-minilm", embedding_server.model))

    llm.plugins.pm.register(Plugin(), name="macprovider-embeddings")
    try:
        vectors = []
        for text in DOCUMENTS + [QUERY]:
            result = CliRunner().invoke(cli, ["embed", "-m", "macprovider-minilm", "-c", text])
            assert result.exit_code == 0, result.output
            vectors.append(json.loads(result.output))
    finally:
        llm.plugins.pm.unregister(name="macprovider-embeddings")
    assert_same_vectors(vectors, reference_vectors)
