"""Constraints that cannot be bypassed: forced tool calls whose markup is one added token (as `<tool_call>` is
in Qwen2.5's and Hermes' tokenizers), and tool schemas with `$defs` / `$ref` (pydantic's nested models) —
checked with llguidance's own matcher on the tiny test tokenizer, and through the three HTTP APIs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fake_engine import JSON_TOOL_MARKUP, FakeEngine, serving
from pydantic import BaseModel

from macprovider.core.errors import ApiError
from macprovider.models.demo import train_tokenizer
from macprovider.serve.tool_calls import hoist_definitions, tool_call_grammar


class Loc(BaseModel):
    city: str
    country: str | None = None


class Weather(BaseModel):
    where: Loc
    stops: list[Loc] = []


def tools_with_defs() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "weather", "parameters": Weather.model_json_schema()}}]


@pytest.fixture(scope="module")
def qwen_like_tokenizer():
    """A fast tokenizer whose `<tool_call>` / `</tool_call>` are single added tokens (not `special`, as in
    Qwen2.5's tokenizer.json), plus ChatML's end token."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(512), eos_token="<|im_end|>")
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    return tokenizer


def matcher_for(tokenizer, grammar: str):
    import llguidance.hf
    from llguidance import LLMatcher

    return LLMatcher(llguidance.hf.from_tokenizer(tokenizer, eos_token=[tokenizer.eos_token_id]), grammar, log_level=0)


def call_tokens(tokenizer, arguments: dict[str, Any]) -> list[int]:
    """What a Qwen-style model emits for one call: the `<tool_call>` token, the JSON line, `</tool_call>`."""
    body = json.dumps({"name": "weather", "arguments": arguments}, separators=(",", ":"))
    start, end = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    return [start, *tokenizer.encode("\n" + body + "\n", add_special_tokens=False), end]


def test_forced_call_grammar_names_the_markup_token(qwen_like_tokenizer):
    tokenizer = qwen_like_tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    grammar = tool_call_grammar(tools, "required", "<tool_call>\n", "\n</tool_call>", start_token=start, end_token=end)
    matcher = matcher_for(tokenizer, grammar)
    assert matcher.consume_tokens(call_tokens(tokenizer, {"city": "Paris"})), matcher.get_error()
    assert not matcher.is_error() and matcher.is_accepting()


def test_forced_call_grammar_accepts_nested_pydantic_models(qwen_like_tokenizer):
    tokenizer = qwen_like_tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    grammar = tool_call_grammar(
        tools_with_defs(), "weather", "<tool_call>\n", "\n</tool_call>", start_token=start, end_token=end
    )
    matcher = matcher_for(tokenizer, grammar)
    arguments = {"where": {"city": "Oslo", "country": None}, "stops": [{"city": "Bergen"}]}
    assert matcher.consume_tokens(call_tokens(tokenizer, arguments)), matcher.get_error()
    assert matcher.is_accepting()


def test_text_markup_grammar_still_compiles_with_defs():
    """The text-markup form (a model whose `<tool_call>` is ordinary text) with `$defs` compiles."""
    assert tool_call_grammar(tools_with_defs(), "required", "<tool_call>\n", "\n</tool_call>")


def test_hoisting_keeps_two_tools_same_named_models_apart():
    first, first_defs = hoist_definitions({"$defs": {"A": {"type": "string"}}, "$ref": "#/$defs/A"}, "tool0_")
    second, second_defs = hoist_definitions(
        {"definitions": {"A": {"type": "integer"}}, "properties": {"a": {"$ref": "#/definitions/A"}}}, "tool1_"
    )
    assert first == {"$ref": "#/$defs/tool0_A"} and first_defs == {"tool0_A": {"type": "string"}}
    assert second["properties"]["a"] == {"$ref": "#/$defs/tool1_A"} and second_defs == {"tool1_A": {"type": "integer"}}
    recursive, defs = hoist_definitions({"type": "object", "properties": {"child": {"$ref": "#"}}}, "tool2_")
    assert recursive["properties"]["child"] == {"$ref": "#/$defs/tool2_root"} and "tool2_root" in defs


def test_a_schema_llguidance_cannot_use_is_still_a_400():
    with pytest.raises(ApiError) as caught:
        tool_call_grammar(
            [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/Missing"}}}],
            "required",
            "<tool_call>\n",
            "\n</tool_call>",
        )
    assert caught.value.status == 400 and caught.value.param == "tools"


ROUTE_BODIES = {
    "/v1/chat/completions": lambda model: {
        "model": model,
        "messages": [{"role": "user", "content": "weather?"}],
        "tool_choice": "required",
        "tools": tools_with_defs(),
    },
    "/v1/responses": lambda model: {
        "model": model,
        "input": "weather?",
        "tool_choice": "required",
        "tools": [{"type": "function", "name": "weather", "parameters": Weather.model_json_schema()}],
    },
    "/v1/messages": lambda model: {
        "model": model,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "weather?"}],
        "tool_choice": {"type": "any"},
        "tools": [{"name": "weather", "input_schema": Weather.model_json_schema()}],
    },
}


@pytest.mark.parametrize("route", list(ROUTE_BODIES))
def test_defs_schemas_work_under_a_forced_tool_choice_on_every_api(route):
    engine = FakeEngine(tool_markup=JSON_TOOL_MARKUP)
    with serving(engine) as served, served.http() as client:
        response = client.post(route, json=ROUTE_BODIES[route](engine.model_id))
    assert response.status_code == 200, response.text[:400]
    assert engine.submitted and engine.submitted[-1].grammar


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"t": {"const": "<|im_end|>"}}, "required": ["t"]},
        {"type": "object", "properties": {"t": {"enum": ["a<|im_end|>b", "<|endoftext|>"]}}, "required": ["t"]},
        {"type": "object", "properties": {"t": {"const": "<tool_call>"}}, "required": ["t"]},
    ],
)
def test_special_token_text_inside_json_never_ends_the_answer_early(tiny_model, schema):
    """Special-token text in a JSON string is ordinary text: the answer is the whole JSON with `stop`, or it
    ends with `length` / an error — never `stop` on JSON that does not parse."""
    import asyncio

    from macprovider.core import config as cfg
    from macprovider.engine.engine import Engine
    from macprovider.engine.protocol import GenerationRequest
    from macprovider.serve.grammar import grammar_for
    from macprovider.serve.preflight import plan_serve

    engine = Engine(plan_serve(cfg.resolve({"model": tiny_model, "max_context_override": 512})))
    engine.load()
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "json please"}])
        grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})

        async def one():
            chunks = [
                c
                async for c in engine.submit(
                    GenerationRequest(prompt_tokens=prompt, max_tokens=60, temperature=0.0, grammar=grammar)
                )
            ]
            return "".join(c.text for c in chunks), chunks[-1]

        text, final = asyncio.run(asyncio.wait_for(one(), 120))
    finally:
        engine.close()
    assert final.finish_reason in ("stop", "length", "error"), final
    if final.finish_reason == "stop":
        assert json.loads(text)["t"] in (schema["properties"]["t"].get("enum") or [schema["properties"]["t"]["const"]])


def test_the_engine_names_added_tokens_by_id(tiny_model):
    """What serve asks before building a forced-call grammar: the id of markup that is one added token."""
    from macprovider.core import config as cfg
    from macprovider.engine.engine import Engine
    from macprovider.serve.preflight import plan_serve

    engine = Engine(plan_serve(cfg.resolve({"model": tiny_model, "max_context_override": 512})))
    engine.load()
    try:
        end_id = engine.special_token_id("<|im_end|>")
        assert end_id is not None and engine.tokenizer.decode([end_id], skip_special_tokens=False) == "<|im_end|>"
        assert engine.special_token_id("<tool_call>") is None and engine.special_token_id("hello") is None
    finally:
        engine.close()
