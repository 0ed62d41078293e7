"""Process lifetimes: a child that must not outlive its parent (Linux `prctl(PR_SET_PDEATHSIG)`).

Used by autotune's candidate servers (a tuner killed with `kill -9` leaves no `serve` behind), by every rank
of a distributed `serve` (a rank whose `mlx.launch` or ssh session is gone stops instead of holding its port),
and by the test suite's server processes. On other systems (macOS has no parent-death signal) both helpers
are no-ops; there launchd / the test's own cleanup stop the process.

Source: prctl(2) — "PR_SET_PDEATHSIG: set the parent-death signal of the calling process"; the signal is sent
when the *thread* that created the process exits, so create children from a thread that lives as long as
they should (the main thread, or mlx.launch's per-rank reader threads).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` making the child receive `sig` when its parent dies, even by
    `kill -9`. prctl is resolved here, in the parent, so the forked child makes one C call between fork and
    exec (no import, no allocation). None where the platform has no parent-death signal."""
    prctl = _prctl()
    if prctl is None:
        return None
    number = int(sig)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, number)

    return preexec


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask for `sig` when this process's parent dies (if it died while we asked — re-parented between the two
    `getppid()` reads — send `sig` to ourselves now). Returns False where unsupported (nothing changed)."""
    prctl = _prctl()
    if prctl is None:
        return False
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
