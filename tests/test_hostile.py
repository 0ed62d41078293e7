"""Hostile input through HTTP: sampling parameters at and beyond their bounds on all four generation routes
(on the real MLX engine and the tiny test model), lone surrogates, Host headers that only look like
loopback, oversized prompts refused before tokenizing — and a server under four concurrent streams that
survives a battery of such requests with every stream finishing normally."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import math
import threading
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine, serving

from macprovider.engine.engine import Engine
from macprovider.serve.app import host_name
from tests.inprocess import serving_engine

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def real_server(model: str, **settings: Any) -> contextlib.AbstractContextManager[tuple[str, Engine]]:
    """(base URL, engine) of `model` served in-process with max-context 256 and max-batch 4 unless overridden."""
    return serving_engine(model, **{"max_context_override": 256, "max_concurrency_override": 4, **settings})


@pytest.fixture
def server(tiny_model):
    with real_server(tiny_model) as pair:
        yield pair


def body_for(route: str, model: str, **fields: Any) -> dict[str, Any]:
    """A minimal valid body of `route` asking for 2 tokens, with `fields` on top."""
    text = "Say something"
    base: dict[str, Any] = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 2},
        "/v1/completions": {"prompt": text, "max_tokens": 2},
        "/v1/responses": {"input": text, "max_output_tokens": 2},
        "/v1/messages": {"messages": [{"role": "user", "content": text}], "max_tokens": 2},
    }[route]
    return {"model": model, **base, **fields}


def post(client: httpx.Client, route: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, parsed answer): the JSON body, or the list of stream events (SSE `data:` payloads)."""
    content = json.dumps(body, allow_nan=True)  # NaN / Infinity as a hostile client writes them
    response = client.post(route, content=content, headers={"content-type": "application/json"})
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        return response.status_code, events
    return response.status_code, response.json()


def stream_failed(events: list[Any]) -> bool:
    """Whether a stream carried an error event (OpenAI `error`, Responses `response.failed` / `error`,
    Anthropic `error`)."""
    return any("error" in e or e.get("type") in ("error", "response.failed") for e in events if isinstance(e, dict))


SWEEP_PARAMS = {
    "/v1/chat/completions": (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "max_tokens",
        "top_logprobs",
    ),
    "/v1/completions": (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "max_tokens",
        "logprobs",
    ),
    "/v1/responses": ("temperature", "top_p", "max_output_tokens"),
    "/v1/messages": ("temperature", "top_p", "top_k", "max_tokens"),
}


def sweep_values(vocab: int) -> list[Any]:
    return [0, 1, vocab - 1, vocab, vocab + 1, 2**31, -1, math.inf, -math.inf, math.nan, 10**30, 0.5]


def test_every_sampling_parameter_at_its_boundaries_is_answered_or_refused_by_name(server):
    """Each numeric sampling parameter over boundary values on every route, with and without `seed`, streamed
    and not: a normal answer, or 400 naming the parameter (invalid JSON for NaN / ±inf) — never a 5xx, an
    error inside a stream, or a dead engine."""
    url, engine = server
    vocab = engine.vocab_size
    assert vocab > 2
    cases = [
        (route, param, value)
        for route, params in SWEEP_PARAMS.items()
        for param in params
        for value in sweep_values(vocab)
    ]
    modes = itertools.cycle([(False, None), (True, None), (False, 11), (True, 11)])
    with httpx.Client(base_url=url, timeout=120) as client:
        for (route, param, value), (stream, seed) in zip(cases, modes):
            extra: dict[str, Any] = {param: value, "stream": stream}
            if param == "top_logprobs":
                extra["logprobs"] = True
            if seed is not None and route in ("/v1/chat/completions", "/v1/completions") and param != "seed":
                extra["seed"] = seed
            status, answer = post(client, route, body_for(route, engine.model_id, **extra))
            where = (route, param, value, stream, seed, str(answer)[:300])
            assert status in (200, 400), where
            if status == 400:
                error = answer["error"]
                if isinstance(value, float) and not math.isfinite(value):
                    continue  # not JSON: invalid_json, or the same 400 naming the field
                if route == "/v1/messages":
                    assert param in error["message"], where
                else:
                    assert error["param"] == param, where
            elif stream:
                assert not stream_failed(answer), where
    assert engine.is_alive() and engine.stats().state in ("ready", "busy")


def test_messages_top_k_at_the_vocabulary_is_no_truncation(server):
    """The crash this guards against: mlx-lm's sampler raised for top_k >= vocabulary and took the process."""
    url, engine = server
    with httpx.Client(base_url=url, timeout=120) as client:
        for top_k in (engine.vocab_size, engine.vocab_size + 1, 5000, 10_000_000):
            for stream in (False, True):
                status, answer = post(
                    client,
                    "/v1/messages",
                    body_for("/v1/messages", engine.model_id, top_k=top_k, temperature=1.0, stream=stream),
                )
                assert status == 200, answer
                assert not stream or not stream_failed(answer)
    assert engine.is_alive()


HOSTILE_BATTERY: list[tuple[str, dict[str, Any]]] = [
    ("/v1/messages", {"top_k": 5000, "temperature": 1.0}),
    ("/v1/messages", {"top_k": 10_000_000, "temperature": 1.0, "stream": True}),
    ("/v1/chat/completions", {"temperature": 2.0, "top_p": 1e-9, "seed": 2**64 - 1}),
    (
        "/v1/chat/completions",
        {"presence_penalty": 2.0, "frequency_penalty": -2.0, "logprobs": True, "top_logprobs": 20},
    ),
    ("/v1/completions", {"logprobs": 20, "seed": -(2**63), "stream": True}),
    ("/v1/responses", {"metadata": {"k": "\udc00"}, "stream": True}),
    ("/v1/responses", {"user": "\ud800x"}),
    ("/v1/messages", {"temperature": math.nan}),
    ("/v1/chat/completions", {"max_tokens": 10**12}),
    ("/v1/messages", {"system": "x" * 200_000}),
]


def test_four_streams_survive_a_battery_of_hostile_requests(server):
    """Four streams are opened (each has sent its first event) before the hostile requests go out; every
    stream then ends as it does alone, with the same text and no error event, and every hostile request
    gets an answer (never a 5xx)."""
    url, engine = server
    long_body = {
        "model": engine.model_id,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 200,
        "temperature": 0.0,
        "stream": True,
    }

    def text_and_finish(events: list[Any]) -> tuple[str, str]:
        choices = [e["choices"][0] for e in events if e.get("choices")]
        return "".join(c["delta"].get("content") or "" for c in choices), choices[-1]["finish_reason"]

    with httpx.Client(base_url=url, timeout=300) as client:
        _, alone = post(client, "/v1/chat/completions", long_body)
        expected = text_and_finish(alone)
        started = threading.Barrier(5, timeout=120)

        def stream() -> tuple[int, list[Any]]:
            with client.stream("POST", "/v1/chat/completions", json=long_body) as response:
                lines = response.iter_lines()
                first = next(lines)
                started.wait()
                text = "\n".join([first, *lines])
            events = [
                json.loads(line[6:])
                for line in text.splitlines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
            return response.status_code, events

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream) for _ in range(4)]
            started.wait()
            for route, fields in HOSTILE_BATTERY:
                status, answer = post(client, route, body_for(route, engine.model_id, **fields))
                assert status < 500, (route, fields, answer)
                if route == "/v1/responses" and "metadata" in fields:
                    assert status == 400 and answer["error"]["param"] == "metadata.k"
            for future in streams:
                status, events = future.result(timeout=300)
                assert status == 200 and not stream_failed(events)
                assert text_and_finish(events) == expected
    assert engine.is_alive()


# ------------------------------------------------------------------------------- fake engine: text hygiene
@pytest.mark.parametrize(
    "host,name",
    [
        ("localhost", "localhost"),
        ("localhost:8080", "localhost"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("LOCALHOST:1", "localhost"),
        ("[::1]evil.com", "[::1]evil.com"),
        ("[::1]:80evil", "[::1]:80evil"),
        ("localhost:80:80", "localhost:80:80"),
        ("localhost:8o", "localhost:8o"),
        ("localhost.evil.com", "localhost.evil.com"),
        ("[::1", "[::1"),
        ("localhost:\u0661", "localhost:\u0661"),
    ],
)
def test_host_header_is_parsed_not_prefix_matched(host, name):
    assert host_name(host) == name


@pytest.mark.parametrize("host", ["[::1]evil.com", "[::1]:80evil.com", "localhost:80:80", "127.0.0.1.evil.com"])
def test_lookalike_loopback_hosts_are_forbidden(host):
    with serving() as served:
        answer = served.raw(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"forbidden_host" in answer


SURROGATE_CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udc00"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"user": "\ud800"}, "user"),
    ("/v1/completions", {"prompt": "a\udfffb"}, "prompt"),
    ("/v1/responses", {"metadata": {"k": "\udc00"}}, "metadata.k"),
    ("/v1/responses", {"user": "\udc00"}, "user"),
    ("/v1/responses", {"input": "\ud83d"}, "input"),
    ("/v1/messages", {"metadata": {"user_id": "\udc00"}}, "metadata.user_id"),
    ("/v1/messages", {"system": "\udc00"}, "system"),
    ("/v1/messages/count_tokens", {"system": "\udc00"}, "system"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route,fields,param", SURROGATE_CASES)
def test_lone_surrogates_are_a_400_naming_the_field(route, fields, param, stream):
    engine = FakeEngine()
    base = {
        "model": engine.model_id,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "prompt": "hi",
        "input": "hi",
        "stream": stream,
    }
    if route == "/v1/messages/count_tokens":
        base.pop("stream")
    with serving(engine) as served, served.http() as client:
        response = client.post(
            route, content=json.dumps({**base, **fields}), headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    if route.startswith("/v1/messages"):
        assert param in error["message"]
    else:
        assert error["param"] == param and error["code"] == "invalid_request"
    assert not engine.submitted


def test_a_surrogate_pair_is_ordinary_text():
    engine = FakeEngine()
    with serving(engine) as served, served.http() as client:
        response = client.post(
            "/v1/responses",
            content=json.dumps(
                {"model": engine.model_id, "input": "smile \U0001f600", "metadata": {"k": "\U0001f600"}}
            ),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200, response.text[:300]


# ------------------------------------------------------------------------- fake engine: bounded work
@pytest.mark.parametrize("route", ROUTES + ("/v1/messages/count_tokens",))
def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(route):
    """With tokens of at most 4 characters, 10,000 characters are at least 1,250 tokens: more than a
    64-token context, whatever the tokenizer would say, so the server answers 413 without encoding."""
    engine = FakeEngine(max_context=64, max_token_chars=4)
    body = body_for(route if route != "/v1/messages/count_tokens" else "/v1/messages", engine.model_id)
    big = "word " * 2_000
    for key in ("messages",):
        if key in body:
            body[key] = [{"role": "user", "content": big}]
    body.update({k: big for k in ("prompt", "input") if k in body})
    with serving(engine) as served, served.http() as client:
        response = client.post(route, json=body)
    assert response.status_code == 413, response.text[:300]
    assert "context_length_exceeded" in response.text or "exceeds" in response.text
    assert engine.encoded == []  # never tokenized


def test_a_prompt_under_the_bound_is_tokenized_and_counted_exactly():
    engine = FakeEngine(max_context=64, max_token_chars=4)
    with serving(engine) as served, served.http() as client:
        response = client.post(
            "/v1/messages/count_tokens",
            json={"model": engine.model_id, "messages": [{"role": "user", "content": "a few words"}]},
        )
    assert response.status_code == 200 and response.json()["input_tokens"] > 0
