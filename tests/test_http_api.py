"""The HTTP layer over a fake engine, on real sockets: shapes, streaming order, errors, limits, auth,
Host/Origin rules, disconnect → cancel (docs/api.md#routes, #security)."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest
from fake_engine import FakeEngine, Script, chat_body, serving, sse_events

from macprovider.core.errors import ApiError


@pytest.fixture
def served():
    with serving() as server:
        yield server


@pytest.fixture(scope="module")
def shared():
    """One server for the many read-only parametrized cases (each must leave the engine untouched)."""
    with serving() as server:
        yield server


def _error(response: httpx.Response, status: int, code: str, param: str | None = "<any>") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["code"] == code
    if param != "<any>":
        assert error["param"] == param
    assert "Traceback" not in response.text and ".py" not in response.text
    return error


def _client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=10)


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_lists_the_served_model(served):
    models = _client(served).models.list()
    assert [m.id for m in models.data] == [served.engine.model_id]
    raw = httpx.get(served.base + "/v1/models").json()
    assert raw["object"] == "list"
    assert raw["data"][0] == {
        "id": served.engine.model_id,
        "object": "model",
        "created": raw["data"][0]["created"],
        "owned_by": "macprovider",
        # extension fields: what clients need to size requests, and whether the model is loaded
        "context_length": served.engine.max_context,
        "macprovider_state": "loaded",
        "macprovider_aliases": [],
    }
    assert isinstance(raw["data"][0]["created"], int)


def test_chat_non_stream_with_the_openai_client(served):
    result = _client(served).chat.completions.create(
        model=served.engine.model_id,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ],
        max_completion_tokens=9,
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        stop=["END", "\n\n"],
        seed=-1,
        presence_penalty=0.5,
    )
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.model == served.engine.model_id
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "Hello, world"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == 6 and result.usage.completion_tokens == 4 and result.usage.total_tokens == 10
    assert result.usage.prompt_tokens_details.cached_tokens == 2
    assert result.usage.model_extra == {"macprovider_generation_ms": 12.5, "macprovider_generated_completion_tokens": 5}
    # what reached the engine
    assert served.engine.encoded[-1] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    request = served.engine.submitted[-1]
    assert request.max_tokens == 9  # max_completion_tokens wins over max_tokens
    assert (request.temperature, request.top_p, request.presence_penalty) == (0.5, 0.9, 0.5)
    assert tuple(request.stop) == ("END", "\n\n") and request.seed == 2**64 - 1


def test_chat_stream_exact_event_order(served):
    body = chat_body(served.engine, stream=True, stream_options={"include_usage": True})
    response = httpx.post(served.base + "/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == served.engine.model_id for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"] for c in chunks[1:4]]
    assert contents == [{"content": "Hello"}, {"content": ","}, {"content": " world"}]  # the empty chunk is skipped
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:4])
    assert chunks[4]["choices"][0]["delta"] == {} and chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 4
    assert chunks[5]["usage"]["macprovider_generated_completion_tokens"] == 5
    assert len(chunks) == 6


@pytest.mark.parametrize("options", [None, {"include_usage": False}, {}])
def test_chat_stream_has_no_usage_chunk_unless_asked(served, options):
    """OpenAI's canonical loop `chunk.choices[0].delta.content` must not hit an empty `choices`."""
    extra = {} if options is None else {"stream_options": options}
    stream = _client(served).chat.completions.create(
        model=served.engine.model_id, messages=[{"role": "user", "content": "hi"}], stream=True, **extra
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "Hello, world"


def test_chat_stream_with_include_usage_ends_with_usage(served):
    stream = _client(served).chat.completions.create(
        model=served.engine.model_id,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 2 + 4
    assert all(c.usage is None for c in chunks[:-1])


def test_text_completion_stream_and_non_stream(served):
    client = _client(served)
    result = client.completions.create(model=served.engine.model_id, prompt="once upon a time", max_tokens=3)
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.choices[0].text == "Hello," and result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == 4
    assert served.engine.encoded[-1] == "once upon a time"

    texts = [
        chunk.choices[0].text
        for chunk in client.completions.create(model=served.engine.model_id, prompt="a b", stream=True)
    ]
    assert texts == ["Hello", ",", " world", ""]  # no usage chunk: the canonical loop works
    body = {"model": served.engine.model_id, "prompt": "a b", "stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(served.base + "/v1/completions", json=body)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    assert texts == ["Hello", ",", " world", ""]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] == 2
    assert all(e["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_length_finish_reason_is_relayed(stream):
    with serving(FakeEngine(script=Script(finish_reason="length"))) as server:
        response = httpx.post(server.base + "/v1/chat/completions", json=chat_body(server.engine, stream=stream))
        if stream:
            finishes = [e["choices"][0]["finish_reason"] for e in sse_events(response.text)[:-1] if e["choices"]]
            assert finishes == [None, None, None, None, "length"]
        else:
            assert response.json()["choices"][0]["finish_reason"] == "length"


def test_engine_error_mid_stream_is_one_error_event_then_done():
    with serving(FakeEngine(script=Script(error="the generation engine failed: boom"))) as server:
        response = httpx.post(server.base + "/v1/chat/completions", json=chat_body(server.engine, stream=True))
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        assert events[-2] == {
            "error": {
                "message": "the generation engine failed: boom",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
        }
        assert [e["choices"][0]["delta"].get("content") for e in events[1:-2]] == ["Hello", ",", " world"]

        plain = httpx.post(server.base + "/v1/chat/completions", json=chat_body(server.engine))
        _error(plain, 500, "internal_error")
        assert server.engine.active_count() == 0
        assert httpx.get(server.base + "/v1/health").json()["errors_total"] == 2


def test_tokenizing_runs_off_the_event_loop(served):
    httpx.post(served.base + "/v1/chat/completions", json=chat_body(served.engine))
    httpx.post(served.base + "/v1/completions", json={"model": served.engine.model_id, "prompt": "x"})
    assert served.engine.encode_threads and served.engine.submit_threads
    assert not served.engine.encode_threads & served.engine.submit_threads  # submit runs on the loop


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_model_and_path_and_method(served):
    _error(
        httpx.post(served.base + "/v1/chat/completions", json={**chat_body(served.engine), "model": "other/model"}),
        404,
        "model_not_found",
        "model",
    )
    _error(httpx.get(served.base + "/v1/nothing"), 404, "path_not_found")
    wrong = httpx.get(served.base + "/v1/chat/completions")
    _error(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    assert "GET" in httpx.post(served.base + "/v1/models", json={}).headers["allow"]


def test_context_length_exceeded_has_the_exact_message(served):
    long = {"role": "user", "content": "word " * 70}
    error = _error(
        httpx.post(served.base + "/v1/chat/completions", json={**chat_body(served.engine), "messages": [long]}),
        413,
        "context_length_exceeded",
        "messages",
    )
    assert error["message"] == "Prompt length (71 tokens) exceeds this provider's safe capacity (64 tokens)."
    assert (error["n_prompt_tokens"], error["n_ctx"]) == (71, 64)
    text = httpx.post(served.base + "/v1/completions", json={"model": served.engine.model_id, "prompt": "w " * 65})
    assert _error(text, 413, "context_length_exceeded", "prompt")["n_prompt_tokens"] == 65
    assert served.engine.submitted == []


def test_encode_errors_are_relayed():
    engine = FakeEngine(
        encode_error=ApiError(
            400, "invalid_request", "the model's chat template rejected the messages", param="messages"
        )
    )
    with serving(engine) as server:
        _error(
            httpx.post(server.base + "/v1/chat/completions", json=chat_body(engine)), 400, "invalid_request", "messages"
        )


def test_unexpected_exception_is_a_bare_500():
    engine = FakeEngine(encode_error=RuntimeError("secret at /home/someone/file.py line 3"))  # type: ignore[arg-type]
    with serving(engine) as server:
        response = httpx.post(server.base + "/v1/chat/completions", json=chat_body(engine))
        error = _error(response, 500, "internal_error")
        assert "secret" not in response.text and error["message"] == "internal server error"


M = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": M}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"model": "m", "messages": [M[0], {"role": "user", "content": 5}]}, "messages.1.content"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages.0.content",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        ({"model": "m", "messages": M, "temperature": 2.5}, "temperature"),
        ({"model": "m", "messages": M, "temperature": -0.1}, "temperature"),
        ({"model": "m", "messages": M, "temperature": "1"}, "temperature"),
        ({"model": "m", "messages": M, "top_p": 0}, "top_p"),
        ({"model": "m", "messages": M, "top_p": 1.5}, "top_p"),
        ({"model": "m", "messages": M, "presence_penalty": 3}, "presence_penalty"),
        ({"model": "m", "messages": M, "frequency_penalty": -2.01}, "frequency_penalty"),
        ({"model": "m", "messages": M, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": M, "max_tokens": 10**20}, "max_tokens"),
        ({"model": "m", "messages": M, "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": M, "max_tokens": True}, "max_tokens"),
        ({"model": "m", "messages": M, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"model": "m", "messages": M, "seed": 2**64}, "seed"),
        ({"model": "m", "messages": M, "seed": -(2**63) - 1}, "seed"),
        ({"model": "m", "messages": M, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "messages": M, "stop": [1]}, "stop"),
        ({"model": "m", "messages": M, "stop": [""]}, "stop"),
        ({"model": "m", "messages": M, "n": 2}, "n"),
        ({"model": "m", "messages": M, "n": 0}, "n"),
        ({"model": "m", "messages": M, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"model": "m", "messages": M, "tool_choice": "auto"}, "tool_choice"),
        ({"model": "m", "messages": M, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "m", "messages": M, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {
                "model": "m",
                "messages": M,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            },
            "response_format.json_schema.schema",
        ),
        ({"model": "m", "messages": M, "logprobs": 1}, "logprobs"),
        ({"model": "m", "messages": M, "top_logprobs": 3}, "top_logprobs"),
        ({"model": "m", "messages": M, "logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        ({"model": "m", "messages": M, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "m", "messages": M, "logit_bias": {"1": 5}}, "logit_bias"),
        ({"model": "m", "messages": M, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": M, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"model": "m", "messages": M, "user": 7}, "user"),
    ],
)
def test_invalid_chat_requests_name_the_param(shared, body, param):
    if body.get("model") == "m":
        body = {**body, "model": shared.engine.model_id}
    _error(httpx.post(shared.base + "/v1/chat/completions", json=body), 400, "invalid_request", param)
    assert shared.engine.submitted == []


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "suffix": "z"}, "suffix"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": "a", "n": 3}, "n"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "logprobs": True}, "logprobs"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_invalid_completion_requests_name_the_param(shared, extra, param):
    body = {"model": shared.engine.model_id, **extra}
    _error(httpx.post(shared.base + "/v1/completions", json=body), 400, "invalid_request", param)
    assert shared.engine.submitted == []


def test_unknown_fields_and_accepted_features_pass(served):
    body = chat_body(
        served.engine,
        whatever={"deep": [1, 2]},
        tool_choice="none",
        tools=[],
        response_format={"type": "text"},
        n=1,
        user="u1",
        logprobs=False,
    )
    assert httpx.post(served.base + "/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"model": NaN}', "invalid_json"),
        (b"[" * 50000 + b"]" * 50000, "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (b'"just a string"', "invalid_request"),
        (b"null", "invalid_request"),
        (b'{"model": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", "invalid_json"),  # too deep to parse
        (b'{"model": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}", "invalid_request"),  # parses, wrong type
    ],
)
def test_hostile_bodies(shared, raw, code):
    response = httpx.post(
        shared.base + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    _error(response, 400, code)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(shared, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(
        shared.base + "/v1/chat/completions", content=json.dumps(chat_body(shared.engine)), headers=headers
    )
    _error(response, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(served):
    response = httpx.post(
        served.base + "/v1/chat/completions",
        content=json.dumps(chat_body(served.engine)),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


def test_body_over_the_cap_by_content_length_is_refused_without_reading():
    with serving(max_request_body_bytes=4096) as server:
        # Announce 10 MB but send none of it: the answer must come anyway.
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.runtime.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        ).encode()
        answer = server.raw(head)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 413")
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"


def test_chunked_body_growing_past_the_cap_is_refused():
    with serving(max_request_body_bytes=4096) as server:

        def chunks():
            for _ in range(6):
                yield b" " * 1000

        response = httpx.post(
            server.base + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        _error(response, 413, "request_too_large")
        small = httpx.post(
            server.base + "/v1/chat/completions",
            content=iter([json.dumps(chat_body(server.engine)).encode()]),
            headers={"content-type": "application/json"},
        )
        assert small.status_code == 200


def test_queue_full_is_429_with_retry_after():
    engine = FakeEngine(queue_limit=1, script=Script(hold_after=1))
    with serving(engine) as server, server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(engine, stream=True)) as first:
            assert engine.wait_active(1)
            refused = httpx.post(server.base + "/v1/chat/completions", json=chat_body(engine))
            _error(refused, 429, "rate_limit_exceeded")
            assert refused.headers["retry-after"] == "2"
            engine.release_all()
            assert sse_events(first.read().decode())[-1] == "[DONE]"


def test_loading_answers_503_model_not_loaded():
    gate = threading.Event()
    engine = FakeEngine(state="loading", load_gate=gate)
    with serving(engine, load=True) as server:
        health = httpx.get(server.base + "/v1/health")
        assert (
            health.status_code == 503
            and health.json()["status"] == "loading"
            and health.json()["model_loaded"] is False
        )
        _error(httpx.get(server.base + "/v1/models"), 503, "model_not_loaded")
        _error(httpx.post(server.base + "/v1/chat/completions", json=chat_body(engine)), 503, "model_not_loaded")
        gate.set()
        assert engine.loaded.wait(5)
        assert httpx.get(server.base + "/v1/health").status_code == 200
        assert httpx.get(server.base + "/v1/models").status_code == 200


# ---------------------------------------------------------------------------------------------- health, metrics
def test_health_body_and_counters(served):
    httpx.post(served.base + "/v1/chat/completions", json=chat_body(served.engine))
    httpx.post(served.base + "/v1/chat/completions", json={"model": "nope", "messages": M})
    response = httpx.get(served.base + "/health")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "status",
        "model",
        "model_loaded",
        "uptime_s",
        "requests_total",
        "requests_in_flight",
        "requests_queued",
        "errors_total",
        "memory_rss_mb",
        "capacity",
        "engine",
        "models",
    }
    assert body["status"] == "ready" and body["model"] == served.engine.model_id and body["model_loaded"] is True
    assert (body["requests_total"], body["errors_total"], body["requests_in_flight"]) == (2, 1, 0)
    assert body["memory_rss_mb"] > 1 and body["uptime_s"] >= 0
    assert body["capacity"] == {
        "ram_gb": body["capacity"]["ram_gb"],
        "max_context_tokens": 64,
        "max_batch": 2,
        "kv_bits": None,
        "speculative": "off",
        "cpu_kernels": "mlx",
    }
    assert isinstance(body["capacity"]["ram_gb"], int) and body["capacity"]["ram_gb"] > 0
    assert body["engine"]["peak_kv_cache_bytes"] == 4096 and body["engine"]["prompt_tokens_total"] == 3


def test_busy_is_200_and_counts_in_flight_and_queued():
    engine = FakeEngine(max_batch=1, queue_limit=3, script=Script(hold_after=0))
    with serving(engine) as server, server.http() as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=chat_body(engine, stream=True)) for _ in range(2)]
        responses = [stream.__enter__() for stream in streams]
        assert engine.wait_active(2)
        health = httpx.get(server.base + "/v1/health")
        assert health.status_code == 200
        assert (
            health.json()["status"] == "busy"
            and health.json()["requests_in_flight"] == 2
            and health.json()["requests_queued"] == 1
        )
        engine.release_all()
        for stream, response in zip(streams, responses):
            assert sse_events(response.read().decode())[-1] == "[DONE]"
            stream.__exit__(None, None, None)


def test_metrics_is_prometheus_text(served):
    httpx.post(served.base + "/v1/chat/completions", json=chat_body(served.engine))
    response = httpx.get(served.base + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    samples = {line.split(" ")[0]: line.split(" ")[1] for line in lines if not line.startswith("#")}
    assert samples["macprovider_requests_total"] == "1"
    assert samples["macprovider_engine_generated_tokens_total"] == "11"
    assert samples["macprovider_ready"] == "1"
    assert (
        "# TYPE macprovider_requests_total counter" in lines and "# TYPE macprovider_requests_in_flight gauge" in lines
    )
    for name in samples:
        base = name.split("{")[0]
        assert f"# HELP {base} " in response.text and f"# TYPE {base} " in response.text
    assert f'macprovider_info{{model="{served.engine.model_id}"}} 1' in lines


def test_docs_routes_are_disabled(served):
    for path in ("/docs", "/redoc", "/openapi.json"):
        _error(httpx.get(served.base + path), 404, "path_not_found")


# ---------------------------------------------------------------------------------------------- security
def test_api_key_rules():
    with serving(api_key="s3cret-key") as server:
        url = server.base + "/v1/chat/completions"
        body = chat_body(server.engine)
        missing = httpx.post(url, json=body)
        _error(missing, 401, "invalid_api_key")
        assert "s3cret" not in missing.text
        _error(httpx.post(url, json=body, headers={"authorization": "Bearer wrong"}), 401, "invalid_api_key")
        _error(httpx.post(url, json=body, headers={"authorization": "Basic s3cret-key"}), 401, "invalid_api_key")
        _error(httpx.get(server.base + "/v1/models"), 401, "invalid_api_key")
        assert httpx.post(url, json=body, headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        assert _client(server, "s3cret-key").models.list().data[0].id == server.engine.model_id
        with pytest.raises(openai.AuthenticationError):
            _client(server, "bad").models.list()
        for open_path in ("/v1/health", "/health", "/metrics"):
            assert httpx.get(server.base + open_path).status_code == 200


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8080", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8080", "LOCALHOST:9"]
)
def test_loopback_host_headers_are_accepted(shared, host):
    assert httpx.get(shared.base + "/v1/models", headers={"host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil", "10.0.0.1", "[::2]"]
)
def test_other_host_headers_are_403_on_a_loopback_bind(shared, host):
    _error(httpx.get(shared.base + "/v1/models", headers={"host": host}), 403, "forbidden_host")
    _error(httpx.get(shared.base + "/v1/health", headers={"host": host}), 403, "forbidden_host")


def test_missing_host_header_is_403(served):
    answer = served.raw(b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403") and b"forbidden_host" in answer


def test_origin_rules_without_cors_configured(served):
    url = served.base + "/v1/chat/completions"
    body = chat_body(served.engine)
    for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
        _error(httpx.post(url, json=body, headers={"origin": origin}), 403, "forbidden_origin")
    local = httpx.post(url, json=body, headers={"origin": "http://localhost:5173"})
    assert local.status_code == 200
    assert not any(name.lower().startswith("access-control-") for name in local.headers)


def test_configured_cors_origin_gets_headers_and_preflight():
    with serving(cors_allowed_origins=("https://app.example",), api_key="k") as server:
        url = server.base + "/v1/chat/completions"
        preflight = httpx.options(
            url,
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = httpx.post(
            url, json=chat_body(server.engine), headers={"origin": "https://app.example", "authorization": "Bearer k"}
        )
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        _error(
            httpx.post(
                url,
                json=chat_body(server.engine),
                headers={"origin": "https://other.example", "authorization": "Bearer k"},
            ),
            403,
            "forbidden_origin",
        )


def test_non_loopback_bind_accepts_any_host_but_not_foreign_origins():
    with serving(host="0.0.0.0", api_key="k") as server:
        ok = httpx.get(server.base + "/v1/models", headers={"host": "my-mac.local:8080", "authorization": "Bearer k"})
        assert ok.status_code == 200
        _error(
            httpx.get(
                server.base + "/v1/models", headers={"origin": "http://localhost:3000", "authorization": "Bearer k"}
            ),
            403,
            "forbidden_origin",
        )


# ---------------------------------------------------------------------------------------------- disconnects
def test_stream_disconnect_cancels_the_sequence_promptly():
    engine = FakeEngine(script=Script(hold_after=2))
    with serving(engine) as server, server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(engine, stream=True)) as response:
            for line in response.iter_lines():
                if '"content":"Hello"' in line:
                    break
        # the connection is closed; the held sequence must be cancelled
        assert engine.handles[0].cancelled.wait(1.0)
        assert engine.wait_active(0)
        health = httpx.get(server.base + "/v1/health").json()
        assert health["requests_in_flight"] == 0


def test_non_stream_disconnect_cancels_the_sequence_promptly():
    engine = FakeEngine(script=Script(hold_after=0))
    with serving(engine) as server:
        payload = json.dumps(chat_body(engine)).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.runtime.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        sock = socket.create_connection(("127.0.0.1", server.runtime.port))
        sock.sendall(head + payload)
        assert engine.wait_active(1)
        sock.close()
        assert engine.handles[0].cancelled.wait(1.0)
        assert engine.wait_active(0)


def test_disconnect_while_queued_before_any_token_cancels():
    engine = FakeEngine(script=Script(hold_after=0))
    with serving(engine) as server, server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(engine, stream=True)) as response:
            assert engine.wait_active(1)
            first = next(response.iter_lines())
            assert '"role":"assistant"' in first
        assert engine.handles[0].cancelled.wait(1.0)
