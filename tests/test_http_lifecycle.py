"""The serving process around the HTTP layer (docs/api.md#engine-semantics): background load, drain on shutdown (in-flight
requests finish, new ones get 503, the rest are cancelled after drain_timeout_s), exit codes, real signals
(SIGTERM → drain → 0; a second SIGINT exits at once), and engine death → health 503 and a non-zero exit."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import httpx
from fake_engine import FakeEngine, Script, chat_body, serving, sse_events

from macprovider.core.errors import ModelError
from macprovider.core.processes import die_with_parent

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_shutdown_lets_in_flight_requests_finish_and_refuses_new_ones():
    engine = FakeEngine(script=Script(hold_after=1))
    with serving(engine, drain_timeout_s=30) as server, server.http() as http:
        with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(engine, stream=True, stream_options={"include_usage": True})
        ) as stream:
            assert engine.wait_active(1)
            server.runtime.request_shutdown("test")
            health = httpx.get(server.base + "/v1/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            refused = httpx.post(server.base + "/v1/chat/completions", json=chat_body(engine))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert engine.draining
            engine.release_all()
            events = sse_events(stream.read().decode())
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 4
        assert events[-3]["choices"][0]["finish_reason"] == "stop"
        assert server.exit_code() == 0
        assert engine.cancel_all_reasons == []


def test_drain_timeout_cancels_the_rest_with_a_final_error_event():
    engine = FakeEngine(script=Script(hold_after=1))
    with serving(engine, drain_timeout_s=0.2) as server, server.http() as http:
        with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(engine, stream=True, stream_options={"include_usage": True})
        ) as stream:
            assert engine.wait_active(1)
            server.runtime.request_shutdown("test")
            events = sse_events(stream.read().decode())
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "draining" and events[-2]["error"]["message"] == "server shutting down"
        assert engine.cancel_all_reasons == ["server shutting down"]
        assert server.exit_code() == 0


def test_engine_death_turns_health_503_and_exits_non_zero():
    engine = FakeEngine(script=Script(hold_after=0))
    with serving(engine) as server, server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(engine, stream=True)):
            assert engine.wait_active(1)
            engine.kill()
            health = httpx.get(server.base + "/v1/health")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            assert httpx.post(server.base + "/v1/chat/completions", json=chat_body(engine)).status_code == 503
            engine.release_all()
        assert server.exit_code() == 1


def test_load_failure_logs_one_line_and_exits_1(caplog):
    engine = FakeEngine(state="loading", load_error=ModelError("cannot read weights: model.safetensors is truncated"))
    with caplog.at_level(logging.INFO, logger="macprovider"):
        with serving(engine, load=True) as server:
            assert server.exit_code() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"cannot load model {engine.model_id}: cannot read weights: model.safetensors is truncated"]


def test_successful_load_logs_ready_with_the_url(caplog):
    with caplog.at_level(logging.INFO, logger="macprovider"):
        with serving(FakeEngine(state="loading"), load=True) as server:
            assert server.engine.loaded.wait(5)
            assert httpx.get(server.base + "/v1/health").status_code == 200
        assert server.exit_code() == 0
    assert any(
        r.getMessage().startswith("ready: serving fake-org/fake-model at http://127.0.0.1:") for r in caplog.records
    )


# ---------------------------------------------------------------------------------------------- real signals
SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, {tests!r})
    from fake_engine import FakeEngine, Script
    from macprovider.core.config import Settings
    from macprovider.serve.runtime import ServeRuntime, configure_logging
    configure_logging("info")
    engine = FakeEngine(script=Script(hold_after={hold!r}))
    runtime = ServeRuntime(engine, Settings(model=engine.model_id, port=0, drain_timeout_s={drain!r}), None, load=False)
    def announce():
        runtime.started.wait()
        print(runtime.port, flush=True)
    threading.Thread(target=announce, daemon=True).start()
    sys.exit(runtime.run())
    """
)


class FakeServerProcess:
    def __init__(self, hold: int | None, drain: float):
        script = SERVER_SCRIPT.format(tests=TESTS_DIR, hold=hold, drain=drain)
        self.process = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent(),
        )
        line = self.process.stdout.readline()
        assert line.strip().isdigit(), self.process.stderr.read()
        self.base = f"http://127.0.0.1:{int(line)}"

    def open_stream(self, http: httpx.Client):
        stream = http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "fake-org/fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        response = stream.__enter__()
        lines = response.iter_lines()
        assert '"role":"assistant"' in next(lines)
        return stream, response, lines

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return code, self.process.stderr.read()


def test_sigterm_drains_cancels_after_timeout_and_exits_zero():
    server = FakeServerProcess(hold=1, drain=0.3)
    with httpx.Client(base_url=server.base, timeout=20) as http:
        stream, response, lines = server.open_stream(http)
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
        stream.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: ") :])["error"]["code"] == "draining"
    code, stderr = server.finish()
    assert code == 0, stderr
    assert "SIGTERM: draining" in stderr and "Traceback" not in stderr


def test_idle_sigint_exits_zero():
    server = FakeServerProcess(hold=None, drain=30)
    assert httpx.get(server.base + "/v1/health").status_code == 200
    server.process.send_signal(signal.SIGINT)
    code, stderr = server.finish()
    assert code == 0, stderr


def test_second_sigint_exits_at_once():
    server = FakeServerProcess(hold=1, drain=300)
    with httpx.Client(base_url=server.base, timeout=20) as http:
        stream, _, _ = server.open_stream(http)
        server.process.send_signal(signal.SIGINT)
        assert httpx.get(server.base + "/v1/health").json()["status"] == "draining"
        server.process.send_signal(signal.SIGINT)
        code, stderr = server.finish(timeout=10)  # far below the 300 s drain
        stream.__exit__(None, None, None)
    assert code == 130
    assert "second interrupt" in stderr
