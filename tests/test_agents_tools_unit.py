"""macprovider.serve.tool_calls building blocks (not wired into HTTP yet): validation naming the bad field, markup
splitting with mlx-lm's json_tools parser, and the llguidance grammar that forces one well-formed call."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher
from mlx_lm.tool_parsers import json_tools

from macprovider.core.errors import ApiError
from macprovider.serve.tool_calls import ToolCallSplitter, check_tools, tool_call_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        ("x", None, "tools"),
        ([{"type": "web"}], None, "tools.0.type"),
        ([{"type": "function", "function": {"name": "bad name"}}], None, "tools.0.function.name"),
        ([WEATHER, WEATHER], None, "tools.1.function.name"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([], "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "other"}}, "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(ApiError) as info:
        check_tools(tools, choice)
    assert info.value.status == 400 and info.value.param == param


def test_choices():
    assert check_tools([WEATHER], None)[1] == "auto"
    assert check_tools(None, None)[1] == "none"
    assert check_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})[1] == "get_weather"


def test_splitter_keeps_markup_out_of_content_across_fragments():
    splitter = ToolCallSplitter(json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call)
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = "", []
    for i in range(0, len(text), 3):  # 3-character fragments split the markup
        c, k = splitter.feed(text[i : i + 3])
        content, calls = content + c, calls + k
    c, k = splitter.finish()
    content, calls = content + c, calls + k
    assert content == "Let me check. "
    assert "<" not in content
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_grammar_accepts_only_a_valid_call():
    grammar = tool_call_grammar([WEATHER], "get_weather", "<tool_call>\n", "\n</tool_call>")
    assert LLMatcher.validate_grammar(grammar) == ""
