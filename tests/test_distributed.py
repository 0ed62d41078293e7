"""Several ranks on loopback (docs/several-machines.md): `macprovider serve --parallel pipeline|tensor` as 2–3 real
processes on the ring backend (CPU), judged against one-process `serve` on the same tiny model.

Ranks start either under `mlx.launch` (what users run) or directly with the two variables mlx.launch sets
(MLX_RANK, MLX_HOSTFILE), where a test needs each rank's exit status. Every wait polls with a deadline;
every group is killed when its test ends, passed or not.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from macprovider.core.processes import die_with_parent
from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache
from tests.readiness import wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SPLIT_MODEL_ID = "macprovider-test/tiny-split"
MESSAGES = [{"role": "user", "content": "Hello! What is the capital of France?"}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "coastal": {"type": "boolean"}},
    "required": ["city", "coastal"],
    "additionalProperties": False,
}


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free loopback ports below Linux's ephemeral range (32768+), where the kernel does not
    hand them to other processes' outgoing connections between this check and the ranks binding them
    (`mlx.launch -p P` binds P, P+1, …; a port picked with bind(0) lost that race now and then: EADDRINUSE)."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 32000 - count)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", base + offset))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


@pytest.fixture(scope="session")
def split_model(hf_home, tmp_path_factory) -> str:
    """A tiny llama that splits every way the tests need: 4 layers, 2 attention heads, 2 KV heads."""
    source = tmp_path_factory.mktemp("tiny-split-src")
    build_model_files(source, TinyModelSpec(num_hidden_layers=4, num_key_value_heads=2))
    install_in_hub_cache(source, SPLIT_MODEL_ID, hf_home / "hub")
    return SPLIT_MODEL_ID


class Group:
    """`ranks` processes of `macprovider serve` (1 = plain one-process serve); rank 0 serves HTTP."""

    def __init__(
        self,
        model: str,
        hf_home: Path,
        home: Path,
        ranks: int,
        *extra: str,
        launcher: bool = False,
        env: dict[str, str] | None = None,
    ):
        self.port = _free_ports(1)[0]
        self.home = home
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MACPROVIDER_", "MLX_"))} | (env or {})
        if ranks == 1:  # the one-process reference runs MLX's own ops, as ranks do (engine/cpu_kernels.py)
            env.setdefault("MACPROVIDER_CPU_KERNELS", "mlx")
        env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
        serve = [sys.executable, "-m", "macprovider", "serve", "--model", model, "--port", str(self.port), *extra]
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        if ranks == 1 or launcher:
            argv = serve
            if launcher:
                launch = str(Path(sys.executable).parent / "mlx.launch")
                argv = [launch, "-n", str(ranks), "--backend", "ring", "-p", str(_free_ports(ranks)[0]), "--", *serve]
            self._spawn(argv, env, "serve")
        else:
            hostfile = home / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(ranks)]))
            for rank in range(ranks):
                self._spawn(serve, env | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}, f"rank{rank}")
        self.base = f"http://127.0.0.1:{self.port}"

    def _spawn(self, argv: list[str], env: dict[str, str], name: str) -> None:
        log = self.home / f"{name}.log"
        with open(log, "wb") as stderr:
            self.processes.append(
                subprocess.Popen(
                    argv, env=env, stdout=stderr, stderr=stderr, start_new_session=True, preexec_fn=die_with_parent()
                )
            )
        self.logs.append(log)

    def text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs)

    def wait_ready(self, timeout: float = 180) -> None:
        wait_healthy(self.base, lambda: all(p.poll() is None for p in self.processes), self.text, timeout)

    def wait_exit(self, timeout: float, ranks: int | None = None) -> list[int | None]:
        """Exit statuses of the first `ranks` processes (all by default), waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        for process in self.processes[:ranks]:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.processes[:ranks]]

    def health(self) -> httpx.Response:
        return httpx.get(self.base + "/v1/health", timeout=5)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()


@pytest.fixture
def start(split_model, hf_home, tmp_path_factory):
    groups: list[Group] = []

    def start_group(
        ranks: int, *extra: str, launcher: bool = False, wait: bool = True, env: dict[str, str] | None = None
    ) -> Group:
        group = Group(split_model, hf_home, tmp_path_factory.mktemp("ranks"), ranks, *extra, launcher=launcher, env=env)
        groups.append(group)
        if wait:
            group.wait_ready()
        return group

    yield start_group
    for group in groups:
        group.kill()


def _chat(group: Group, max_tokens: int = 24, **extra) -> str:
    reply = group.client().chat.completions.create(
        model=SPLIT_MODEL_ID, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **extra
    )
    return reply.choices[0].message.content


def _schema_answer(group: Group, seed: int) -> str:
    reply = group.client().chat.completions.create(
        model=SPLIT_MODEL_ID,
        messages=MESSAGES,
        max_tokens=120,
        temperature=1.0,
        seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    return reply.choices[0].message.content


def _stream(group: Group, content: str, max_tokens: int, started: threading.Event | None = None) -> str:
    text = ""
    stream = group.client().chat.completions.create(
        model=SPLIT_MODEL_ID,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            if started is not None:
                started.set()
    return text


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_pipeline_under_mlx_launch_answers_like_one_process_and_stops_with_its_launcher(start):
    one = start(1, "--max-batch", "3")
    expected_greedy = _chat(one)
    expected_long = _stream(one, "Write a short poem about the sea.", 400)
    expected_short = _stream(one, "Numbers:", 12)
    expected_schema = _schema_answer(one, seed=5)
    one.kill()

    group = start(2, "--parallel", "pipeline", "--max-batch", "3", launcher=True)
    distributed = group.health().json()["distributed"]
    assert distributed["world_size"] == 2 and distributed["parallel"] == "pipeline"
    assert distributed["layers_per_stage"] == [2, 2]
    assert _chat(group) == expected_greedy

    # Continuous batching with a late joiner: the short stream joins the running long one (400 tokens: with 60
    # the long one once ended before the short one was admitted under stress-ng, peak 1).
    results: dict[str, str] = {}
    long_started = threading.Event()
    runner = threading.Thread(
        target=lambda: results.setdefault(
            "long", _stream(group, "Write a short poem about the sea.", 400, long_started)
        )
    )
    runner.start()
    assert long_started.wait(60)
    results["short"] = _stream(group, "Numbers:", 12)
    runner.join(120)
    assert results == {"long": expected_long, "short": expected_short}
    assert group.health().json()["engine"]["peak_active_sequences"] >= 2

    # Structured output: rank 0's grammar decides; the followers follow its token ids.
    answer = _schema_answer(group, seed=5)
    assert answer == expected_schema and set(json.loads(answer)) == {"city", "coastal"}

    # A cancel mid-stream frees the slot on every rank: the next answer is still exact.
    stream = group.client().chat.completions.create(
        model=SPLIT_MODEL_ID, messages=MESSAGES, max_tokens=400, temperature=0, stream=True
    )
    for index, _ in enumerate(stream):
        if index == 3:
            break
    stream.close()
    _wait_for(lambda: group.health().json()["engine"]["active_sequences"] == 0, 30, "the cancelled slot to free")
    assert _chat(group) == expected_greedy

    # mlx.launch killed with -9 (a supervisor's hard stop): no rank is left behind holding the port — each
    # asked for SIGTERM on its launcher's death, so rank 0 drains and stops the follower.
    launcher = psutil.Process(group.processes[0].pid)
    ranks = launcher.children()
    assert len(ranks) == 2, [r.cmdline() for r in ranks]
    launcher.kill()
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, [r.cmdline() for r in alive]
    with socket.socket() as probe:  # nothing listens on the port: a new server binds it (as uvicorn does)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", group.port))


def _anthropic_text(group: Group, max_tokens: int, started: threading.Event | None = None, **sampling) -> str:
    import anthropic

    client = anthropic.Anthropic(base_url=group.base, api_key="unused", max_retries=0, timeout=120)
    text = ""
    # This SDK release takes the sampling fields only as extra body fields; the server reads them as before.
    with client.messages.stream(
        model=SPLIT_MODEL_ID, max_tokens=max_tokens, messages=MESSAGES, extra_body=sampling
    ) as stream:
        for piece in stream.text_stream:
            text += piece
            if started is not None and text:
                started.set()
    return text


def test_top_k_reaches_rank_0_and_mixed_top_k_batches_stay_in_lockstep(start):
    # top_k=1 at temperature 1 is greedy, so it must equal one process's greedy text; the Anthropic API is
    # where top_k comes in. A batch mixing top_k 1 and 0 at the same temperature samples each sequence alone
    # on rank 0, so the followers must too (one all_sum per sampler call): top_k travels in the control message.
    one = start(1)
    expected = _anthropic_text(one, 24, temperature=0)
    one.kill()
    group = start(2, "--parallel", "pipeline", "--max-batch", "2")
    assert _anthropic_text(group, 24, temperature=1.0, top_k=1) == expected
    results: dict[str, str] = {}
    started = threading.Event()
    runner = threading.Thread(
        target=lambda: results.setdefault("open", _anthropic_text(group, 400, started, temperature=1.0))
    )
    runner.start()
    assert started.wait(60)
    results["top_k"] = _anthropic_text(group, 24, temperature=1.0, top_k=1)
    runner.join(120)
    assert results["top_k"] == expected and "open" in results
    assert group.health().json()["engine"]["peak_active_sequences"] == 2


def test_tensor_with_kv_bits_answers_like_one_process(start):
    one = start(1, "--kv-bits", "8")
    expected = _chat(one, max_tokens=16)
    one.kill()
    group = start(2, "--parallel", "tensor", "--kv-bits", "8")
    assert group.health().json()["distributed"]["parallel"] == "tensor"
    assert _chat(group, max_tokens=16) == expected


def test_three_ranks_then_sigterm_drains_and_stops_every_rank(start):
    one = start(1)
    expected = _chat(one)
    expected_long = _stream(one, "Write a short poem about the sea.", 80)
    one.kill()

    group = start(3, "--parallel", "pipeline")
    assert group.health().json()["distributed"]["layers_per_stage"] == [2, 1, 1]
    assert _chat(group) == expected
    results: dict[str, str] = {}
    started = threading.Event()
    runner = threading.Thread(
        target=lambda: results.setdefault("long", _stream(group, "Write a short poem about the sea.", 80, started))
    )
    runner.start()
    assert started.wait(60)
    group.processes[0].send_signal(signal.SIGTERM)  # rank 0: drain, then tell the others to stop
    runner.join(120)
    assert results.get("long") == expected_long  # the in-flight stream finished during the drain
    assert group.wait_exit(60) == [0, 0, 0], group.text()
    assert "rank 0 said stop" in group.text()


def test_killed_rank_fails_requests_and_the_group_exits_nonzero(start):
    # A dead peer usually raises at once ("connection to a peer was lost"); when MLX's ring leaves the
    # step waiting instead, the rank timeout catches it — keep that short here.
    group = start(2, "--parallel", "pipeline", env={"MACPROVIDER_RANK_TIMEOUT_S": "5"})
    errors: list[str] = []
    started = threading.Event()

    def stream() -> None:
        try:
            _stream(group, "Write a short poem about the sea.", 400, started)
        except Exception as exc:  # noqa: BLE001 - the error event / dropped connection is the point
            errors.append(str(exc))

    runner = threading.Thread(target=stream)
    runner.start()
    assert started.wait(60)
    group.processes[1].kill()
    runner.join(60)
    assert errors and ("peer was lost" in errors[0] or "did not answer" in errors[0]), (
        errors
    )  # the error event says why
    assert group.wait_exit(30, ranks=1) == [1], group.text()
    assert "exiting with status 1" in group.text()


def test_stalled_rank_turns_health_503_naming_it_and_exits(start):
    group = start(2, "--parallel", "pipeline", env={"MACPROVIDER_RANK_TIMEOUT_S": "3"})
    started = threading.Event()
    # A stream in flight when the rank stalls: its step never returns, the engine fails it from outside.
    threading.Thread(
        target=lambda: _ignore_errors(_stream, group, "Write a short poem about the sea.", 400, started), daemon=True
    ).start()
    assert started.wait(60)
    os.kill(group.processes[1].pid, signal.SIGSTOP)
    try:

        def unavailable():
            try:
                response = group.health()
            except httpx.HTTPError:
                return None
            return response if response.status_code == 503 else None

        response = _wait_for(unavailable, 120, "health to turn 503")
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["distributed"]["failed_rank"] == 1 and "did not answer" in body["distributed"]["error"]
        assert group.wait_exit(60, ranks=1) == [1], group.text()  # rank 1 is stopped: only rank 0 can exit
    finally:
        os.kill(group.processes[1].pid, signal.SIGCONT)


def _ignore_errors(function, *args) -> None:
    try:
        function(*args)
    except Exception:  # noqa: BLE001 - the server dies under this request by design
        pass


def test_impossible_split_is_refused_before_loading(tiny_model, hf_home, tmp_path):
    # The conftest tiny model has one KV head: tensor parallelism over two ranks cannot split it.
    group = Group(tiny_model, hf_home, tmp_path, 2, "--parallel", "tensor")
    try:
        assert group.wait_exit(120) == [2, 2], group.text()
        assert "1 key/value heads are not divisible by 2; --parallel pipeline fits" in group.text()
        assert "loading" not in group.text()
    finally:
        group.kill()


def test_real_model_pipeline_under_mlx_launch_answers_like_one_process(real_model, hf_home, tmp_path_factory):
    """The acceptance run: `mlx.launch -n 2 --backend ring -- macprovider serve --model <real demo model>
    --parallel pipeline` gives the openai client the same greedy text as one process (SmolLM2-135M-Instruct:
    30 layers, 15 a rank; 16 tokens)."""
    args = ("--max-context", "512")
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    def greedy(group: Group) -> str:
        reply = group.client().chat.completions.create(
            model=real_model, messages=messages, max_tokens=16, temperature=0
        )
        return reply.choices[0].message.content

    groups = [Group(real_model, hf_home, tmp_path_factory.mktemp("one"), 1, *args)]
    try:
        groups[0].wait_ready(300)
        expected = greedy(groups[0])
        groups[0].kill()
        groups.append(
            Group(
                real_model, hf_home, tmp_path_factory.mktemp("two"), 2, "--parallel", "pipeline", *args, launcher=True
            )
        )
        groups[1].wait_ready(300)
        assert groups[1].health().json()["distributed"]["layers_per_stage"] == [15, 15]
        assert expected and greedy(groups[1]) == expected
    finally:
        for group in groups:
            group.kill()
