"""`logprobs` / `top_logprobs` and `seed` through HTTP with the official `openai` client, on the real MLX
engine and the tiny random-weight test model, served in-process (ServeRuntime on 127.0.0.1, port 0)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import openai
import pytest

from tests.inprocess import serving_engine

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea"}]


@contextlib.contextmanager
def real_server(model: str) -> Iterator[tuple[openai.OpenAI, str]]:
    """An official `openai` client on `model` served in-process (max-context 2048, max-batch 4), and its id."""
    with serving_engine(model, max_context_override=2048, max_concurrency_override=4) as (url, engine):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), engine.model_id


@pytest.fixture
def server(tiny_model):
    with real_server(tiny_model) as pair:
        yield pair


def _check_entries(entries, top: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == top
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-3  # probabilities of distinct tokens
        # greedy decoding: the sampled token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        if "\ufffd" not in entry.token:  # else part of a character: its own bytes (tests/test_token_text.py)
            assert entry.bytes == list(entry.token.encode("utf-8"))


def test_chat_logprobs_stream_and_not(server):
    client, model = server
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    _check_entries(entries, 3)

    streamed = []
    text = ""
    for chunk in client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                streamed.extend(chunk.choices[0].logprobs.content)
    assert text == choice.message.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-3)

    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_completion_logprobs_and_seed(server):
    client, model = server
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for _token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and value <= 0.0
        assert max(top.values()) == pytest.approx(value, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)

    def sample(seed: int) -> str:
        out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=seed)
        return out.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # the seed changes the random-weight model's samples


def test_completion_top_logprobs_keep_the_best_of_candidates_with_the_same_text():
    """Legacy `top_logprobs` is a {token text: logprob} dict: two byte tokens that both render as U+FFFD
    collide, and the higher (first-listed) log-probability must win."""
    from macprovider.engine.protocol import TokenLogprob
    from macprovider.serve.openai_schemas import completion_logprobs

    entry = TokenLogprob(
        "\ufffd", -0.5, (("\ufffd", -0.5, b"\xf0"), ("\ufffd", -0.9, b"\x9f"), ("a", -1.2, b"a")), b"\xf0"
    )
    assert completion_logprobs([entry])["top_logprobs"] == [{"\ufffd": -0.5, "a": -1.2}]
