"""Waiting for a spawned `serve` to answer /v1/health (shared by the tests that start real processes)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def wait_healthy(base: str, alive: Callable[[], bool], log: Callable[[], str], timeout: float) -> None:
    """Return once GET `base`/v1/health answers 200. AssertionError with `log()` when `alive()` turns false
    (the process died) or after `timeout` seconds. Polls every 0.1 s: readiness is an event in another
    process, and its health endpoint is the only place to see it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), log()
        try:
            if httpx.get(base + "/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready in {timeout} s:\n{log()}")
