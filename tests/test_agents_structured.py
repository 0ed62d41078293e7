"""Structured output (`response_format` json_object / json_schema) by constrained decoding on the real MLX
engine and the tiny random-weight model, through HTTP with the `openai` client: the output parses and
validates even though the weights are random, also while unconstrained streams share the batch."""

from __future__ import annotations

import concurrent.futures
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_agents_logprobs import MESSAGES, real_server  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}


def _valid(value: dict) -> bool:
    return (
        set(value) == {"city", "population", "coastal"}
        and isinstance(value["city"], str)
        and len(value["city"]) <= 12
        and isinstance(value["population"], int)
        and 0 <= value["population"] <= 100000
        and isinstance(value["coastal"], bool)
    )


@pytest.fixture
def server(tiny_model):
    with real_server(tiny_model) as pair:
        yield pair


def test_schema_valid_output_next_to_unconstrained_streams(server):
    client, model = server

    def constrained(seed: int) -> dict:
        reply = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
        )
        assert reply.choices[0].finish_reason == "stop"
        return json.loads(reply.choices[0].message.content)

    def free(i: int) -> str:
        text = ""
        for chunk in client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=40, temperature=0, stream=True
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        free_futures = [pool.submit(free, i) for i in range(2)]
        values = list(pool.map(constrained, [1, 2]))
        texts = [f.result() for f in free_futures]
    assert all(_valid(v) for v in values), values
    assert all(texts)  # the unconstrained streams still produced text


def test_json_object_is_an_object(server):
    client, model = server
    # Random weights may keep a string open until max_tokens; a finished answer is always a JSON object.
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=40,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        choice = reply.choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"
