"""kill -9 mid-stream: the client's stream ends promptly with an error (the SDK raises, nothing
hangs), a new `serve` binds the same port at once, and the rendered service files restart a crashed server
but not a cleanly stopped one.

No systemd runs as init and no launchd exists here, so the restart rule is tested on the rendered unit and
plist with a fake manager that applies the documented semantics — systemd.service(5) `Restart=on-failure`:
restart after an unclean exit code or an unclean signal (any but SIGHUP, SIGINT, SIGTERM, SIGPIPE);
launchd.plist(5) `KeepAlive {SuccessfulExit: false}`: restart unless the job exited with status 0 — to the
real `macprovider serve` command the files name.
"""

from __future__ import annotations

import os
import plistlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from macprovider.core.processes import die_with_parent
from macprovider.service import spec as service
from tests.readiness import wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


def systemd_restarts(unit: str, returncode: int) -> bool:
    """Whether systemd restarts a service of this unit whose main process ended with `returncode`
    (Popen convention: −N = killed by signal N). Only the Restart= values a unit of ours may carry."""
    restart = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Restart="))
    if restart == "always":
        return True
    if restart == "on-failure":
        return returncode > 0 or (returncode < 0 and signal.Signals(-returncode) not in CLEAN_SIGNALS)
    if restart == "no":
        return False
    raise AssertionError(f"unexpected Restart={restart}")


def launchd_restarts(plist: bytes, returncode: int) -> bool:
    """Whether launchd relaunches a job of this plist that ended with `returncode` (−N = signal N)."""
    keep_alive = plistlib.loads(plist)["KeepAlive"]
    if keep_alive is True:
        return True
    if isinstance(keep_alive, dict) and keep_alive.get("SuccessfulExit") is False:
        return returncode != 0
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeManager:
    """Runs the service's ProgramArguments the way the manager would, and decides restarts by its rules."""

    def __init__(self, spec: service.ServiceSpec, env: dict[str, str], port: int, log_dir) -> None:
        self.spec, self.env, self.port, self.log_dir = spec, env, port, log_dir
        self.starts = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"serve-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            list(self.spec.program_arguments),
            env=self.env,
            cwd=self.spec.working_directory,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.close()

    def log(self) -> str:
        return (self.log_dir / f"serve-{self.starts}.log").read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        alive = lambda: self.process is not None and self.process.poll() is None  # noqa: E731
        wait_healthy(f"http://127.0.0.1:{self.port}", alive, self.log, timeout)


@pytest.fixture
def managed(tiny_model, hf_home, isolated_env, tmp_path):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tiny_model}\nport: {port}\nmax_context_override: 4096\ndrain_timeout_s: 5\n")
    spec = service.build_spec(
        python=sys.executable,
        config_path=config,
        home=isolated_env,
        drain_timeout_s=5,
        environment={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(isolated_env), **dict(spec.environment)}
    manager = FakeManager(spec, env, port, tmp_path)
    yield manager
    if manager.process is not None and manager.process.poll() is None:
        os.killpg(manager.process.pid, signal.SIGKILL)
        manager.process.wait()


def test_kill_9_mid_stream_then_the_rendered_rules_restart_it_on_the_same_port_but_not_after_a_clean_stop(managed):
    unit, plist = service.render_systemd_unit(managed.spec), service.render_plist(managed.spec)
    managed.start()
    managed.wait_ready()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{managed.port}/v1", api_key="unused", max_retries=0, timeout=60)
    model = httpx.get(f"http://127.0.0.1:{managed.port}/v1/models").json()["data"][0]["id"]
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=4000,
        temperature=0,
        stream=True,
    )
    # 4,000 tokens: still decoding when the kill comes (a 450-token stream could end first on a loaded machine)
    chunks = iter(stream)
    next(c for c in chunks if c.choices and c.choices[0].delta.content)  # decoding now

    os.killpg(managed.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _ in chunks:  # what was already sent may still arrive; then the SDK raises
            pass
    assert time.monotonic() - killed_at < 10, "the stream did not end promptly after kill -9"
    code = managed.process.wait(timeout=10)
    assert code == -signal.SIGKILL
    assert systemd_restarts(unit, code) and launchd_restarts(plist, code)

    managed.start()  # what both managers do now: the same command, the same port, at once
    managed.wait_ready()
    assert "cannot listen" not in managed.log()
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")

    managed.process.send_signal(signal.SIGTERM)  # `systemctl stop` / `launchctl bootout`: a clean stop
    code = managed.process.wait(timeout=60)
    assert code == 0, managed.log()
    assert not systemd_restarts(unit, code) and not launchd_restarts(plist, code)
    # A crash the server notices itself (generation thread died, exit 1) is restarted too.
    assert systemd_restarts(unit, 1) and launchd_restarts(plist, 1)
