"""Candidate provider lifecycle and the probe's SSE timing against a fake `serve` child
(docs/autotune.md#trials, #the-probe)."""

from __future__ import annotations

import os
import socket
import sys

import psutil
import pytest

from macprovider.autotune.probe import Measurement, StreamResult, Workload, aggregate_throughput, judge, measure
from macprovider.autotune.provider import (
    CandidateProvider,
    Deadline,
    DeadlineReached,
    ProviderExited,
    ProviderTimeout,
    port_is_listening,
    serve_argv,
)
from macprovider.models.ids import cached_model_path

FAKE_SERVER = '"""A stand-in for `macprovider serve` in autotune tests: the endpoints autotune reads (docs/api.md#routes).\n\nUsage: python autotune_fake_server.py PORT MODE [TEXT]\nMODE: ok | die (exit 3 at start, as an OOM would) | never-ready (503 forever) | stubborn (ignores SIGTERM)\n| error (500 on chat). TEXT is the streamed content (default "hello world").\n"""\n\nimport json\nimport signal\nimport sys\nimport time\nfrom http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n\nport, mode = int(sys.argv[1]), sys.argv[2]\ntext = sys.argv[3] if len(sys.argv) > 3 else "hello world"\nif mode == "die":\n    print("fake: out of memory while loading", file=sys.stderr, flush=True)\n    sys.exit(3)\nif mode == "stubborn":\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\n\nclass Handler(BaseHTTPRequestHandler):\n    def log_message(self, *args):\n        pass\n\n    def _json(self, status, body):\n        data = json.dumps(body).encode()\n        self.send_response(status)\n        self.send_header("content-type", "application/json")\n        self.send_header("content-length", str(len(data)))\n        self.end_headers()\n        self.wfile.write(data)\n\n    def do_GET(self):\n        if self.path == "/v1/models":\n            if mode == "never-ready":\n                return self._json(503, {"error": {"code": "model_not_loaded"}})\n            return self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})\n        if self.path == "/v1/health":\n            return self._json(200, {"status": "ready", "engine": {"peak_memory_bytes": 12345}})\n        self._json(404, {})\n\n    def do_POST(self):\n        body = json.loads(self.rfile.read(int(self.headers["content-length"])))\n        if mode == "error":\n            return self._json(500, {"error": {"message": "boom"}})\n        self.send_response(200)\n        self.send_header("content-type", "text/event-stream")\n        self.end_headers()\n\n        def send(obj):\n            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\\n\\n")\n            self.wfile.flush()\n\n        send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})\n        start = time.monotonic()\n        for word in text.split(" "):\n            time.sleep(0.01)\n            send({"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})\n        gen_ms = (time.monotonic() - start) * 1000\n        send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})\n        n = len(text.split(" "))\n        prompt = len(json.dumps(body["messages"]))\n        send({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,\n                                       "macprovider_generation_ms": gen_ms,\n                                       "macprovider_generated_completion_tokens": n}})\n        send(b"[DONE]")\n\n\nThreadingHTTPServer.allow_reuse_address = True\nserver = ThreadingHTTPServer(("127.0.0.1", port), Handler)\nserver.serve_forever()\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVER)

    def make(mode="ok", text="hello world", **kw):
        port = free_port()
        return CandidateProvider(
            "fake", port, max_context=256, argv=[sys.executable, str(script), str(port), mode, text], **kw
        )

    return make


def test_serve_argv_is_the_contract(tmp_path):
    argv = serve_argv("org/m", 18080, max_batch=2, max_context=4096, kv_bits=8, config_path=tmp_path / "c.yaml")
    assert argv[:4] == [sys.executable, "-m", "macprovider", "serve"]
    assert argv[4:] == [
        "--model",
        "org/m",
        "--port",
        "18080",
        "--host",
        "127.0.0.1",
        "--max-batch",
        "2",
        "--max-context",
        "4096",
        "--kv-bits",
        "8",
        "--config",
        str(tmp_path / "c.yaml"),
        "--log-level",
        "warning",
    ]
    assert "--kv-bits" not in serve_argv("org/m", 1, max_batch=1, max_context=2, kv_bits=None, config_path=tmp_path)
    assert "--speculative" not in argv  # off: the empty config leaves serve's default


def test_a_speculative_trial_starts_serve_with_the_speculative_flag(tmp_path, monkeypatch):
    """`serve_argv` carries `--speculative MODE` (serve's flag for the `speculative` setting), and a real trial
    with `Knobs.speculative` starts its child with it."""
    from macprovider.autotune.preflight import parse_inputs
    from macprovider.autotune.search import Knobs, Trial
    from macprovider.autotune.trial import RealEvaluator
    from macprovider.core.config import SETTINGS

    argv = serve_argv(
        "org/m", 18080, max_batch=1, max_context=64, kv_bits=None, config_path=tmp_path, speculative="prompt-lookup"
    )
    assert argv[argv.index("--max-context") : argv.index("--config")] == [
        "--max-context",
        "64",
        "--speculative",
        "prompt-lookup",
    ]
    assert next(spec for spec in SETTINGS if spec.name == "speculative").cli_flag == "--speculative"

    started: list[list[str]] = []

    def refuse_to_start(provider: CandidateProvider) -> None:
        started.append(provider.argv)
        raise ProviderExited(2, "not started in this test")

    monkeypatch.setattr(CandidateProvider, "start", refuse_to_start)
    inputs = parse_inputs({"candidate_models": "org/m", "db_path": str(tmp_path / "t.sqlite")})
    evaluator = RealEvaluator(inputs, Deadline(60), budget=lambda: 1 << 40)
    for mode in ("prompt-lookup", "off"):
        knobs = Knobs(None, 2, 64, speculative=mode)
        trial = evaluator._probe(Trial(2, "org/m", 64, knobs, 64, fits=False), "org/m", knobs, None, None, 1, 2)
        assert not trial.fits and "exited with code 2" in trial.notes
    with_speculation, without = started
    assert with_speculation[with_speculation.index("--speculative") + 1] == "prompt-lookup"
    assert "--speculative" not in without


def test_ready_then_stopped_leaves_no_process_and_a_free_port(fake):
    provider = fake()
    with provider:
        provider.wait_ready()
        pid = provider.proc.pid
        assert os.getpgid(pid) == pid  # its own process group
        assert port_is_listening(provider.port)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not port_is_listening(provider.port)


def test_child_that_dies_while_loading_reports_its_stderr(fake):
    with pytest.raises(ProviderExited) as info:
        with fake("die") as provider:
            provider.wait_ready()
    assert info.value.returncode == 3 and "out of memory" in info.value.stderr_tail


def test_readiness_timeout_is_reported_and_the_child_is_stopped(fake):
    provider = fake("never-ready", ready_timeout=1.0)
    with pytest.raises(ProviderTimeout):
        with provider:
            pid = provider.proc.pid
            provider.wait_ready()
    assert not port_is_listening(provider.port)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_run_deadline_interrupts_readiness(fake):
    provider = fake("never-ready", deadline=Deadline(0.5))
    with pytest.raises(DeadlineReached):
        with provider:
            provider.wait_ready()


def test_child_ignoring_sigterm_is_killed_after_the_grace(fake):
    provider = fake("stubborn", drain_grace=0.5)
    with provider:
        provider.wait_ready()
        pid = provider.proc.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not port_is_listening(provider.port)


def test_exception_inside_the_block_still_stops_the_child(fake):
    provider = fake()
    with pytest.raises(RuntimeError):
        with provider:
            provider.wait_ready()
            raise RuntimeError("boom")
    assert not port_is_listening(provider.port)


@pytest.fixture
def workload(tiny_model):
    return Workload(cached_model_path(tiny_model), 256)


def test_prompt_fills_80_percent_of_the_target_in_model_tokens(workload):
    messages, tokens = workload.messages(7)
    assert tokens <= int(256 * 0.8) and tokens >= int(256 * 0.8) - 8
    assert workload.count(messages) == tokens
    other, _ = workload.messages(8)
    assert other != messages  # every request has its own filler
    assert {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|im_start|>"} <= set(workload.leak_markers)


def test_measure_reads_ttft_usage_and_aggregates_concurrent_streams(fake, workload):
    with fake() as provider:
        provider.wait_ready()
        m = measure(provider.base_url, "fake", workload, max_batch=2, replicates=2, gate_ttft_ms=60000)
    assert m.errors == [] and m.replicates == 2
    assert len(m.ttfts_ms) == 4 and len(m.throughputs) == 2
    assert all(t > 0 for t in m.throughputs)
    assert m.peak_memory_bytes == 12345
    assert judge(m, 60000, 4) == (True, None)
    fits, reason = judge(m, 0.0001, 4)
    assert not fits and "ttft p95" in reason


def test_leaked_end_of_turn_text_makes_the_trial_infeasible(fake, workload):
    with fake(text="fine <|im_end|> more") as provider:
        provider.wait_ready()
        m = measure(provider.base_url, "fake", workload, max_batch=1, replicates=1, gate_ttft_ms=60000)
    fits, reason = judge(m, 60000, 1)
    assert not fits and "<|im_end|>" in reason


def test_http_errors_make_the_trial_infeasible(fake, workload):
    with fake("error") as provider:
        provider.wait_ready()
        m = measure(provider.base_url, "fake", workload, max_batch=1, replicates=1, gate_ttft_ms=60000)
    fits, reason = judge(m, 60000, 1)
    assert not fits and "HTTP 500" in reason


def test_aggregate_throughput_does_not_credit_serialised_streams():
    overlapped = [
        StreamResult(True, generated_tokens=10, generation_ms=1000, end_s=1.0),
        StreamResult(True, generated_tokens=10, generation_ms=1000, end_s=1.0),
    ]
    serial = [
        StreamResult(True, generated_tokens=10, generation_ms=1000, end_s=1.0),
        StreamResult(True, generated_tokens=10, generation_ms=1000, end_s=2.0),
    ]
    assert aggregate_throughput(overlapped) == pytest.approx(20.0)
    assert aggregate_throughput(serial) == pytest.approx(10.0)
    assert aggregate_throughput(
        [StreamResult(True, generated_tokens=64, generation_ms=500, end_s=9.0)]
    ) == pytest.approx(128.0)


def test_judge_rejects_empty_output_and_zero_throughput():
    m = Measurement(throughputs=[5.0], ttfts_ms=[10.0], empty_outputs=1)
    assert judge(m, 100, 1)[0] is False
    assert judge(Measurement(throughputs=[0.0], ttfts_ms=[10.0]), 100, 1)[0] is False


def test_candidates_get_only_the_trial_knobs_and_never_record_their_traffic():
    from macprovider.autotune.provider import child_env

    env = child_env(
        {
            "MACPROVIDER_KV_BITS": "8",
            "MACPROVIDER_SPECULATIVE": "prompt-lookup",
            "MACPROVIDER_RECORD_WORKLOAD": "1",
            "PATH": "/bin",
        }
    )
    assert env["MACPROVIDER_RECORD_WORKLOAD"] == "0" and "MACPROVIDER_KV_BITS" not in env
    assert "MACPROVIDER_SPECULATIVE" not in env  # an `off` cell must not inherit the operator's speculation
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/bin"
