"""Waiting for a `macprovider serve` child the scripts started: shared by the embedding scripts."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    """Return once http://127.0.0.1:`port`/v1/health answers 200. Raises SystemExit naming the cause when
    `server` exits first or `timeout` seconds pass (a script must not go on to measure a server that is not
    there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve exited with status {server.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a child process's port: nothing to await
    raise SystemExit(f"serve on port {port} was not ready within {timeout:.0f} s")
