"""End to end: `macprovider serve` as a real process on the tiny local model, called with the official
`openai` client (and httpx where the test needs raw HTTP). Servers are session-scoped per knob set."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from macprovider.core.processes import die_with_parent
from tests.readiness import wait_healthy

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`python -m macprovider serve` in its own process group, with stderr kept for assertions."""

    def __init__(self, model: str, hf_home, home, *extra: str, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.model = model
        settings_env = env
        env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
        env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
        env.update(settings_env or {})
        argv = [sys.executable, "-m", "macprovider", "serve", "--model", model, "--port", str(self.port), *extra]
        self.stderr_path = home / f"serve-{self.port}.log"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        wait_healthy(self.base, lambda: self.process.poll() is None, self.stderr, timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.base + "/v1/health", timeout=5).json()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="not-needed", max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._stderr.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def serve_factory(tiny_model, hf_home, tmp_path_factory):
    started: list[ServeProcess] = []

    def start(*extra: str, wait: bool = True, env: dict[str, str] | None = None) -> ServeProcess:
        server = ServeProcess(tiny_model, hf_home, tmp_path_factory.mktemp("serve-home"), *extra, env=env)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(serve_factory) -> ServeProcess:
    return serve_factory("--max-batch", "4", "--max-context", "512")


@pytest.fixture(scope="session")
def serial_server(serve_factory) -> ServeProcess:
    """One batch slot and two queue places (the default queue is 64 deep, docs/api.md#engine-semantics)."""
    return serve_factory("--max-batch", "1", "--max-context", "512", env={"MACPROVIDER_MAX_QUEUE_DEPTH": "2"})


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."}]


def test_models_lists_the_configured_id(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert models.data[0].owned_by == "macprovider"


def test_chat_non_stream_and_stream_agree_under_greedy(server):
    client = server.client()
    full = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=24, temperature=0)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert (
        full.usage.prompt_tokens > 0
        and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    )
    extra = full.usage.model_extra
    assert extra["macprovider_generated_completion_tokens"] >= full.usage.completion_tokens
    assert extra["macprovider_generation_ms"] >= 0

    stream = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finish == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    for special in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"):
        assert special not in text


def test_text_completions(server):
    result = server.client().completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=12, temperature=0
    )
    assert result.object == "text_completion" and result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 12
    streamed = server.client().completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == result.choices[0].text


def test_error_envelopes(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="someone/else", messages=MESSAGES)
    assert not_found.value.body["code"] == "model_not_found"

    with pytest.raises(openai.APIStatusError) as too_long:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "sea " * 2000}])
    assert too_long.value.status_code == 413
    body = too_long.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages" and body["n_ctx"] == 512
    assert (
        body["message"]
        == f"Prompt length ({body['n_prompt_tokens']} tokens) exceeds this provider's safe capacity (512 tokens)."
    )

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=server.model, messages=MESSAGES, n=2)
    assert bad.value.body["param"] == "n"

    raw = httpx.post(
        server.base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    assert "Traceback" not in raw.text


def _streams_sent_at_once(server: ServeProcess, count: int, max_tokens: int = 450) -> list[tuple[int, dict, bytes]]:
    """Send `count` identical greedy streaming chat requests so the server finds all of them waiting at once:
    the server is SIGSTOPped, each complete request is written into its own connection's kernel buffer
    (connect() completes from the listen backlog without the process), then SIGCONT. Opening the streams one by
    one raced under load — the first could finish its tokens before the last was even sent. Each response is
    read to its end on its own thread; returns (status, headers, body) per request, in sending order."""
    body = json.dumps(
        {"model": server.model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    connections: list[socket.socket] = []
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        for _ in range(count):
            connections.append(socket.create_connection(("127.0.0.1", server.port), timeout=120))
            connections[-1].sendall(request)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)

    def read(connection: socket.socket) -> tuple[int, dict, bytes]:
        with connection:
            response = http.client.HTTPResponse(connection)
            response.begin()
            return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(read, connections))


def _finish_reasons(sse_body: bytes) -> list[str]:
    events = [json.loads(line[6:]) for line in sse_body.decode().splitlines() if line.startswith("data: {")]
    return [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]


def test_max_batch_decodes_streams_together(serve_factory, serial_server):
    # The engine's own high-water mark on a fresh server (client receive times raced under load).
    batched = serve_factory("--max-batch", "4", "--max-context", "512")
    results = _streams_sent_at_once(batched, 4)
    assert [status for status, _, _ in results] == [200] * 4
    assert all(_finish_reasons(body) in (["stop"], ["length"]) for _, _, body in results)
    assert batched.health()["engine"]["peak_active_sequences"] == 4
    # With --max-batch 1 the second waits for the first: the engine never decodes two at once.
    results = _streams_sent_at_once(serial_server, 2)
    assert [status for status, _, _ in results] == [200] * 2
    assert serial_server.health()["engine"]["peak_active_sequences"] == 1


def test_queue_full_answers_429_with_retry_after_then_drains(serial_server):
    # One batch slot + two queue places (MACPROVIDER_MAX_QUEUE_DEPTH=2): of four requests arriving together, three
    # are admitted and run to their end, the one found with the queue full is refused.
    results = _streams_sent_at_once(serial_server, 4)
    assert sorted(status for status, _, _ in results) == [200, 200, 200, 429]
    for status, headers, body in results:
        if status == 429:
            assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
            assert int(headers["retry-after"]) >= 1
        else:  # the full queue drains: every admitted stream runs to its end
            assert _finish_reasons(body) in (["stop"], ["length"]), body[-300:]
    deadline = time.monotonic() + 10  # a response's bookkeeping ends just after its last byte is sent
    while (health := serial_server.health())["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (health["requests_in_flight"], health["requests_queued"], health["engine"]["active_sequences"]) == (0, 0, 0)
    again = httpx.post(
        serial_server.base + "/v1/chat/completions",
        json={"model": serial_server.model, "messages": MESSAGES, "max_tokens": 4},
        timeout=30,
    )
    assert again.status_code == 200


def test_client_disconnect_frees_the_slot_within_a_second(serve_factory):
    # 4,000 tokens to go: the stream is still decoding when the client hangs up (450 on the shared 512-token
    # server once finished before the first health check under load, and the test proved nothing).
    server = serve_factory("--max-context", "4096")
    body = {"model": server.model, "messages": MESSAGES, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()  # kept referenced: closing the generator would close the stream
            for line in lines:
                if line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        break
            assert server.health()["engine"]["active_sequences"] == 1
            closed_at = time.monotonic()
    while server.health()["engine"]["active_sequences"] != 0:
        assert time.monotonic() - closed_at < 1.0, "slot not freed within 1 s of the disconnect"
        time.sleep(0.02)


def test_prefix_reuse_reports_cached_tokens(server):
    client = server.client()
    long_system = {"role": "system", "content": "You are a helpful assistant who loves the sea. " * 12}
    first = client.chat.completions.create(
        model=server.model, messages=[long_system, {"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    second = client.chat.completions.create(
        model=server.model,
        messages=[
            long_system,
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "More?"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert server.health()["engine"]["cached_prompt_tokens_total"] >= second.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("kv_bits, limit", [("8", 0.6), ("4", 0.35)])
def test_kv_bits_shrink_health_kv_bytes_and_keep_batching(serve_factory, kv_bits, limit, server):
    quantized = serve_factory("--max-batch", "4", "--max-context", "512", "--kv-bits", kv_bits)
    prompt = [{"role": "user", "content": "The sea is wide and deep. " * 40}]
    peaks = []
    for target in (server, quantized):
        before = target.health()["engine"]["peak_kv_cache_bytes"]
        target.client().chat.completions.create(model=target.model, messages=prompt, max_tokens=4, temperature=0)
        peaks.append(max(before, target.health()["engine"]["peak_kv_cache_bytes"]))
    assert quantized.health()["capacity"]["kv_bits"] == int(kv_bits)
    assert peaks[1] <= limit * peaks[0]
    assert [status for status, _, _ in _streams_sent_at_once(quantized, 3)] == [200] * 3
    assert quantized.health()["engine"]["peak_active_sequences"] == 3  # batching stays on under kv-bits


def test_sigterm_drains_and_exits_zero(serve_factory):
    draining = serve_factory("--max-batch", "2", "--max-context", "512")
    client = draining.client()
    result: dict = {}

    def long_request():
        result["response"] = client.chat.completions.create(
            model=draining.model, messages=MESSAGES, max_tokens=60, temperature=0
        )

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 10
    while draining.health()["requests_in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(draining.process.pid, signal.SIGTERM)
    worker.join(timeout=40)
    assert draining.process.wait(timeout=40) == 0
    assert result["response"].choices[0].finish_reason in ("stop", "length")


def test_preflight_errors_exit_before_loading(tiny_model, hf_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", MACPROVIDER_KV_BITS="7")
    run = subprocess.run(
        [sys.executable, "-m", "macprovider", "serve", "--model", tiny_model],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "kv_bits" in run.stderr and "'7'" in run.stderr and "env:MACPROVIDER_KV_BITS" in run.stderr
    assert "Traceback" not in run.stderr

    env.pop("MACPROVIDER_KV_BITS")
    missing = subprocess.run(
        [sys.executable, "-m", "macprovider", "serve", "--model", "nobody/absent-model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0
    assert "not in the local Hugging Face cache" in missing.stderr and "models pull" in missing.stderr

    exposed = subprocess.run(
        [sys.executable, "-m", "macprovider", "serve", "--model", tiny_model, "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exposed.returncode == 2 and "API key" in exposed.stderr


def test_models_json_shape_matches_spec(server):
    payload = httpx.get(server.base + "/v1/models").json()
    assert payload["object"] == "list"
    entry = payload["data"][0]
    # OpenAI's four fields plus the extension fields clients size requests by (context length, load state, aliases)
    assert set(entry) == {
        "id",
        "object",
        "created",
        "owned_by",
        "context_length",
        "macprovider_state",
        "macprovider_aliases",
    }
    assert entry["object"] == "model" and entry["context_length"] == 512 and entry["macprovider_state"] == "loaded"
    assert json.loads(json.dumps(payload)) == payload


def test_speculative_serve_matches_plain_text_reports_health_and_exits_zero(serve_factory, server):
    """`serve --speculative prompt-lookup`: the same greedy text as the plain server through the openai client
    (prompts whose continuation the tiny model repeats, so drafts are verified), its counters in /v1/health and /metrics, and
    a clean exit on SIGTERM (the verification step's arrays are released with the engine)."""
    speculative = serve_factory("--max-batch", "4", "--max-context", "512", "--speculative", "prompt-lookup")
    prompts = ["one two three four one two three four one two three four one two", "abc abc abc abc abc abc abc abc"]
    texts = [
        [
            s.client().completions.create(model=s.model, prompt=prompt, max_tokens=48, temperature=0).choices[0].text
            for prompt in prompts
        ]
        for s in (server, speculative)
    ]
    assert texts[1] == texts[0]
    health = speculative.health()
    assert health["capacity"]["speculative"] == "prompt-lookup"
    assert server.health()["capacity"]["speculative"] == "off"
    from macprovider.engine import cpu_kernels  # (imports MLX: only here) the NumPy route on MLX's CPU device

    assert health["capacity"]["cpu_kernels"] == ("numpy" if cpu_kernels.wanted("auto") else "mlx")
    engine = health["engine"]
    assert engine["speculative_drafted_tokens_total"] >= engine["speculative_accepted_tokens_total"] > 0
    assert 0 < engine["speculative_acceptance_rate"] <= 1
    metrics = httpx.get(speculative.base + "/metrics", timeout=5).text
    assert "macprovider_engine_speculative_accepted_tokens_total" in metrics
    assert speculative.stop() == 0
