"""A candidate provider: one `macprovider serve` child process per trial (docs/autotune.md#trials).

The child runs in its own session (own process group) so an out-of-memory or Metal crash kills it, not
the tuner, and so stopping it reaches every process it started. It gets an empty config file and no
MACPROVIDER_* environment, so the trial's knobs — and only they — decide how it serves (an operator's
`kv_bits: 8` in config.yaml must not leak into an "unset" cell). Its stderr goes to a temp file whose tail
becomes the trial's notes when it dies.

`CandidateProvider` is a context manager: however the block ends (exception, SIGINT, budget) the group
gets SIGTERM, up to `drain_grace` seconds to exit, then SIGKILL; the port is free before `__exit__`
returns, so the next child can bind it. On Linux the child also gets PR_SET_PDEATHSIG, so even a
`kill -9` of the tuner takes its candidate down with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from macprovider.core.processes import die_with_parent

READY_TIMEOUT_S = 120.0
POLL_S = 0.1


class ProviderExited(Exception):
    """The child exited (while loading: the out-of-memory signal). `stderr_tail` holds its last lines."""

    def __init__(self, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(f"provider exited with code {returncode}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ProviderTimeout(Exception):
    """The child did not become ready within the readiness timeout (a transient failure)."""


class DeadlineReached(Exception):
    """The whole-run deadline passed while waiting (`--max-duration`)."""


class Deadline:
    """A monotonic deadline; `remaining()` in seconds (never negative), `expired` when it has passed."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect((host, port))
        except OSError:
            return False
        return True


def wait_port_free(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """Poll until nothing listens on host:port, up to `timeout` seconds. Returns True when free."""
    end = time.monotonic() + timeout
    while True:
        if not port_is_listening(port, host):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(POLL_S)


def serve_argv(
    model: str,
    port: int,
    *,
    max_batch: int,
    max_context: int,
    kv_bits: int | None,
    config_path: Path,
    speculative: str = "off",
    python: str = sys.executable,
) -> list[str]:
    """The child's argv: `python -m macprovider serve --model M` + `serve_args`."""
    args = serve_args(
        port,
        max_batch=max_batch,
        max_context=max_context,
        kv_bits=kv_bits,
        config_path=config_path,
        speculative=speculative,
    )
    return [python, "-m", "macprovider", "serve", "--model", model, *args]


def serve_args(
    port: int,
    *,
    max_batch: int,
    max_context: int,
    kv_bits: int | None,
    config_path: Path,
    host: str = "127.0.0.1",
    speculative: str = "off",
) -> list[str]:
    """A candidate's serve flags after `--model M`: `--port P --host H --max-batch N --max-context C
    [--kv-bits B] [--speculative MODE] --config <empty> --log-level warning` (`--speculative` only when not
    `off`: the empty config leaves serve's default, off)."""
    args = ["--port", str(port), "--host", host, "--max-batch", str(max_batch), "--max-context", str(max_context)]
    if kv_bits is not None:
        args += ["--kv-bits", str(kv_bits)]
    if speculative != "off":
        args += ["--speculative", speculative]
    return args + ["--config", str(config_path), "--log-level", "warning"]


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a candidate: ours without MACPROVIDER_* (the trial's flags are the only knobs),
    offline for the Hub, and not recording its traffic (the probe's requests are not the operator's
    workload: `record_workload` off)."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if not k.startswith("MACPROVIDER_")}
    env["MACPROVIDER_RECORD_WORKLOAD"] = "0"
    # Pre-warm already put the files in the cache: a candidate never opens a network connection
    # (docs/autotune.md#trials).
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


class CandidateProvider:
    """One `macprovider serve` child on 127.0.0.1:`port` (see module docstring).

    `argv` overrides the command (tests start fakes, `autotune --hostfile` starts `mlx.launch` this way);
    otherwise `serve_argv` builds it. `host`: where the HTTP server listens (rank 0's host with --hostfile).
    """

    def __init__(
        self,
        model: str,
        port: int,
        *,
        max_batch: int = 1,
        max_context: int,
        kv_bits: int | None = None,
        speculative: str = "off",
        drain_grace: float = 30.0,
        deadline: Deadline | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        argv: Sequence[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.model = model
        self.port = port
        self.host = host
        self.drain_grace = drain_grace
        self.deadline = deadline
        self.ready_timeout = ready_timeout
        self._tmpdir = tempfile.TemporaryDirectory(prefix="macprovider-autotune-")
        self.config_path = Path(self._tmpdir.name) / "config.yaml"
        self.config_path.write_text("# empty: autotune passes every knob on the command line\n")
        self.argv = (
            list(argv)
            if argv is not None
            else serve_argv(
                model,
                port,
                max_batch=max_batch,
                max_context=max_context,
                kv_bits=kv_bits,
                config_path=self.config_path,
                speculative=speculative,
            )
        )
        self.stderr_path = Path(self._tmpdir.name) / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.last_stderr_tail = ""
        self.last_stderr_text = ""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> CandidateProvider:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Spawn the child in its own session with stderr to a temp file."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env(),
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def stderr_tail(self, lines: int = 8, limit: int = 800) -> str:
        """The last `lines` lines of the child's stderr (at most `limit` characters), one line."""
        try:
            data = self.stderr_path.read_bytes()[-16384:].decode("utf-8", "replace")
        except OSError:
            return ""
        tail = " | ".join(line.strip() for line in data.strip().splitlines()[-lines:] if line.strip())
        return tail[-limit:]

    def stderr_text(self, limit: int = 65536) -> str:
        """The child's stderr so far (its last `limit` bytes; after `stop()`, what it was then)."""
        try:
            return self.stderr_path.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return self.last_stderr_text[-limit:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> float:
        """Poll `GET /v1/models` until 200 while the child is alive. Returns seconds waited.

        Raises ProviderExited (child died), ProviderTimeout (`ready_timeout`), DeadlineReached (run budget).
        """
        import httpx

        assert self.proc is not None
        start = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ProviderExited(self.proc.returncode, self.stderr_tail())
                try:
                    if client.get(f"{self.base_url}/v1/models").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                if self.deadline is not None and self.deadline.expired:
                    raise DeadlineReached("--max-duration ran out while the provider was loading")
                if time.monotonic() - start >= self.ready_timeout:
                    raise ProviderTimeout(f"provider not ready within {self.ready_timeout:.0f} s")
                try:
                    self.proc.wait(timeout=POLL_S)  # wakes at once if the child dies
                except subprocess.TimeoutExpired:
                    pass

    def stop(self) -> None:
        """SIGTERM the process group, wait up to `drain_grace`, SIGKILL the group, wait for the port."""
        proc, self.proc = self.proc, None
        interrupted: BaseException | None = None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.drain_grace)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt as exc:  # a second Ctrl-C: skip the grace, still leave nothing behind
                interrupted = exc
            _signal_group(proc.pid, signal.SIGKILL)  # the leader and anything it left behind
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            wait_port_free(self.port, timeout=10.0, host=self.host)
            self.last_stderr_tail = self.stderr_tail()
            self.last_stderr_text = self.stderr_text()
        self._tmpdir.cleanup()
        if interrupted is not None:
            raise interrupted


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
