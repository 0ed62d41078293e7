"""Full disks and broken files: `models pull`, `models import` and `autotune --apply` on a full
disk, and truncated weights. A command that runs out of space ends with one clear line, a
non-zero exit and nothing half-written; `serve` refuses weights truncated after download, naming the file.

The full disk is a small tmpfs mounted for the test (`mount -t tmpfs -o size=...`, which needs root or
CAP_SYS_ADMIN); where mounting is impossible those tests are skipped with that reason.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from macprovider.autotune.apply import apply_recommendation, owned_values
from macprovider.core.errors import ApplyError
from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache
from tests.gguf_files import write_llama_gguf


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs; yields its path, unmounted afterwards."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


COMMIT = "c" * 40


@pytest.fixture
def file_hub():
    """A stand-in for huggingface.co serving `files` (name -> bytes) for any repo: repo info, the recursive
    tree, HEAD/GET resolve with X-Repo-Commit and ETag (what huggingface_hub's snapshot_download reads)."""
    servers = []

    def start(files: dict[str, bytes]) -> str:
        class Hub(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self, head: bool) -> None:
                path = self.path.split("?")[0]
                status, body, headers = 404, b"{}", {"Content-Type": "application/json"}
                if path.startswith("/api/models/") and "/revision/" in path:
                    repo = path[len("/api/models/") :].split("/revision/")[0]
                    status, body = (
                        200,
                        json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]}).encode(),
                    )
                elif path.startswith("/api/models/") and "/tree/" in path:
                    entries = [
                        {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in files.items()
                    ]
                    status, body = 200, json.dumps(entries).encode()
                elif "/resolve/" in path and path.split("/resolve/")[1].split("/", 1)[1] in files:
                    body = files[path.split("/resolve/")[1].split("/", 1)[1]]
                    status, headers = 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server API
                self.answer(head=False)

            def do_HEAD(self):  # noqa: N802 - http.server API
                self.answer(head=True)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fill(directory: Path, leave: int = 0) -> None:
    """Fill the filesystem of `directory` until at most `leave` bytes are free."""
    index = 0
    while True:
        free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
        if free <= leave:
            return
        try:
            with open(directory / f"filler-{index}", "wb") as handle:
                handle.write(b"\0" * min(free - leave, 1 << 20))
        except OSError:
            return
        index += 1


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "macprovider", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_models_import_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path):
    source = build_model_files(tmp_path / "src", TinyModelSpec(seed=5))
    model = write_llama_gguf(source, tmp_path / "tiny.gguf")
    assert model.stat().st_size > 256 * 1024  # bigger than the whole disk
    result = cli("models", "import", str(model), "--id", "gguf-test/too-big", env={"HF_HOME": str(small_disk)})
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0].lower(), result.stderr
    hub = small_disk / "hub"
    leftovers = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*")) if hub.exists() else []
    assert not any("too-big" in p or ".macprovider-import" in p for p in leftovers), leftovers


def test_models_pull_on_a_full_disk_is_one_line_and_keeps_no_partial_model(small_disk, file_hub):
    endpoint = file_hub({"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(1 << 20)})
    result = cli(
        "models",
        "pull",
        "org/too-big",
        env={"HF_HOME": str(small_disk), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1"},
    )
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # above it: huggingface_hub's progress bar and free-space warning
    assert last.startswith("macprovider: disk full while downloading org/too-big") and "nothing was kept" in last
    assert not (small_disk / "hub" / "models--org--too-big").exists()


def test_autotune_apply_on_a_full_config_directory_keeps_the_old_config(small_disk):
    config = small_disk / "config.yaml"
    old = "# mine\nport: 9000\n" + "# padding\n" * 200
    config.write_text(old)
    fill(small_disk)
    before = sorted(p.name for p in small_disk.iterdir())
    with pytest.raises(ApplyError, match="cannot write config"):
        apply_recommendation(config, owned_values("org/model", None, 2, 4096))
    assert config.read_text() == old
    assert sorted(p.name for p in small_disk.iterdir()) == before  # no backup or temp file left half-written


def test_serve_refuses_weights_truncated_after_download_naming_the_file(hf_home, tmp_path):
    snapshot = install_in_hub_cache(
        build_model_files(tmp_path / "src", TinyModelSpec(seed=6)), "e2e/cut-short", hf_home / "hub"
    )
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-4096])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cli(
        "serve", "--model", "e2e/cut-short", "--port", str(port), env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode != 0
    assert "model.safetensors" in result.stderr and "Traceback" not in result.stderr, result.stderr
