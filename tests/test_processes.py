"""`macprovider.core.processes`: a child made with `die_with_parent()` does not outlive a parent killed with -9 (the
suite's own servers use it, so a killed pytest leaves no `serve` behind), and `exit_with_parent()` (every
rank of a distributed `serve`) turns the parent's death into SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _parent(body: str) -> subprocess.Popen:
    """A Python parent running `body`, which prints its child's pid on its first stdout line."""
    script = textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("tied", [True, False])
def test_a_child_dies_with_a_parent_killed_with_minus_9(tied):
    parent = _parent(f"""
        import subprocess, sys, time
        from macprovider.core.processes import die_with_parent
        child = subprocess.Popen({SLEEPER!r}, preexec_fn=die_with_parent() if {tied} else None)
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs([child], timeout=15 if tied else 1)
        assert bool(gone) == tied  # untied, the child is orphaned and keeps running: the check can fail
    finally:
        if child.is_running():
            child.kill()


def test_exit_with_parent_turns_the_parents_death_into_a_signal():
    parent = _parent("""
        import subprocess, sys, time
        code = "import os, signal, sys, time; from macprovider.core.processes import exit_with_parent; "
        code += "exit_with_parent(signal.SIGTERM); print(os.getpid(), flush=True); time.sleep(120)"
        subprocess.Popen([sys.executable, "-c", code], stdout=sys.stdout)
        time.sleep(120)
    """)
    child = psutil.Process(int(parent.stdout.readline()))  # printed after exit_with_parent returned
    try:
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs([child], timeout=15)
        assert gone and not alive  # SIGTERM's default action ended it long before its 120 s sleep
    finally:
        if child.is_running():
            child.kill()
