#!/usr/bin/env python3
"""kill -9 autotune at random moments; check the database and the config survive (docs/autotune.md#apply, #database).

Builds a tiny model in a temporary Hub cache (HF_HUB_OFFLINE=1, nothing downloaded), measures one full run,
then N times: start `macprovider autotune --apply` on it, SIGKILL it at a uniformly random moment within
the full run's duration, kill the orphaned candidate provider it leaves behind (a process this script
started, found by its unique port), and check:
  - `PRAGMA integrity_check` of the database is `ok` and the store opens (migrations, WAL recovery);
  - the config file is byte-identical to either the original or ORIGINAL with one complete recommendation
    applied (never torn; the winning knobs may differ between runs, measurements being noisy);
  - no `*.tmp` file is left as the config.
Prints one line per run and a summary. Usage: python scripts/autotune_kill_test.py [--runs 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# On a shared machine other people's `macprovider serve` processes would make every run a provider_conflict;
# the kill test is about the database and the config, so the runs do not look at foreground servers.
HIDE_FOREGROUND = (
    "import sys; from macprovider.autotune import conflict; "
    "conflict.find_foreground_servers = lambda exclude_pids=None: []; "
    "from macprovider.cli import main; sys.argv[0] = 'macprovider'; main()"
)
ORIGINAL = "# operator's config\nport: 9000\n\nlog_level: info   # keep\nkv_bits: 4\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_orphans(port: int) -> int:
    """SIGKILL the candidate providers that listen on `port` (started by our autotune child)."""
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if (
            "serve" in argv
            and "--port" in argv
            and argv[argv.index("--port") + 1 : argv.index("--port") + 2] == [str(port)]
        ):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            killed.append(proc)
    psutil.wait_procs(killed, timeout=10)
    return len(killed)


def is_applied(text: str) -> bool:
    """Whether `text` is ORIGINAL with some complete recommendation applied (the winner may differ between
    runs: measurements are noisy), i.e. exactly what `render_config` makes of ORIGINAL for its owned values."""
    import yaml

    from macprovider.autotune.apply import owned_values, render_config

    try:
        data = yaml.safe_load(text)
        values = owned_values(
            data["model"], data.get("kv_bits"), data["max_concurrency_override"], data["max_context_override"]
        )
    except Exception:  # noqa: BLE001 - unparsable or incomplete: torn
        return False
    return text == render_config(ORIGINAL, values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="autotune-kill-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
    env.update(HOME=str(work / "home"), HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", XDG_CONFIG_HOME=str(work / "xdg"))
    os.environ.update(env)
    from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache

    src = build_model_files(work / "src", TinyModelSpec(hidden_size=64, num_attention_heads=1, num_hidden_layers=2))
    install_in_hub_cache(src, "kill/tiny", work / "hf" / "hub")
    db, config = work / "at.sqlite", work / "cfg" / "config.yaml"
    config.parent.mkdir()

    def argv(port: int) -> list[str]:
        return [
            sys.executable,
            "-c",
            HIDE_FOREGROUND,
            "autotune",
            "--candidate-models",
            "kill/tiny",
            "--target-context",
            "128",
            "--stage2-replicates",
            "1",
            "--kv-bits-axis",
            "unset,8",
            "--max-batch-axis",
            "1",
            "--apply",
            "--config",
            str(config),
            "--db-path",
            str(db),
            "--port",
            str(port),
            "--retain-runs",
            "5",
        ]

    config.write_text(ORIGINAL)
    port = free_port()
    start = time.monotonic()
    full = subprocess.run(argv(port), env=env, capture_output=True, text=True)
    duration = time.monotonic() - start
    if full.returncode != 0:
        print(full.stdout, full.stderr, file=sys.stderr)
        return 2
    applied = config.read_text()
    print(f"full run: {duration:.1f} s, exit 0; applied config:\n{applied}")

    bad_db = torn = opened_fail = 0
    states = {"original": 0, "applied": 0}
    for i in range(args.runs):
        config.write_text(ORIGINAL)
        for backup in config.parent.glob("config.yaml.bak-*"):
            backup.unlink()
        port = free_port()
        proc = subprocess.Popen(argv(port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = rng.uniform(0, duration)
        try:
            proc.wait(timeout=at)
            outcome = f"finished before the kill (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            outcome = "killed"
        orphans = kill_orphans(port)
        check = sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] if db.exists() else "ok"
        bad_db += check != "ok"
        text = config.read_text()
        state = "original" if text == ORIGINAL else "applied" if is_applied(text) else "TORN"
        if state == "TORN":
            torn += 1
        else:
            states[state] += 1
        try:
            from macprovider.autotune.store import Store

            Store(db).close()
            reopened = "ok"
        except Exception as exc:  # noqa: BLE001 - report, keep going
            reopened = f"FAILED {exc}"
            opened_fail += 1
        print(
            f"run {i + 1:2d}: kill at {at:5.2f} s, {outcome}, orphans killed {orphans}, "
            f"integrity_check {check}, store reopen {reopened}, config {state}"
        )
    runs = sqlite3.connect(db).execute("SELECT exit_reason, COUNT(*) FROM tune_runs GROUP BY exit_reason").fetchall()
    print(
        f"\nsummary: {args.runs} runs; integrity_check failures {bad_db}; store reopen failures {opened_fail}; "
        f"torn configs {torn}; config original {states['original']}, applied {states['applied']}; "
        f"retained run rows by exit_reason {dict(runs)}"
    )
    return 1 if (bad_db or torn or opened_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
