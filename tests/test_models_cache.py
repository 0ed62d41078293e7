"""`macprovider models list | pull | verify | rm` on a temporary Hub cache (README.md#models).

Models are copies of the session's tiny model (built with macprovider.models.demo), so corrupting one never
touches the shared session cache. Pull tests never reach the network: offline mode, a closed local port,
and a local fake Hub that answers with huggingface's error headers.
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
from typer.testing import CliRunner

from macprovider.cli import app
from macprovider.models.demo import install_in_hub_cache


@pytest.fixture
def cache(tmp_path, monkeypatch, hf_home, tiny_model) -> Path:
    """A fresh HF_HOME whose hub holds `org/one` and `org/two`, copies of the session tiny model."""
    home = tmp_path / "hf"
    hub = home / "hub"
    src = hf_home / "hub" / ("models--" + tiny_model.replace("/", "--"))
    snapshot = next((src / "snapshots").iterdir())
    for repo_id in ("org/one", "org/two"):
        install_in_hub_cache(snapshot, repo_id, hub)
    monkeypatch.setenv("HF_HOME", str(home))
    return hub


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def blob_of(hub: Path, repo_id: str, name: str) -> Path:
    snapshot = next((hub / ("models--" + repo_id.replace("/", "--")) / "snapshots").iterdir())
    return (snapshot / name).resolve()


def corrupt(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_list_shows_each_model_with_its_size(cache):
    result = run("models", "list")
    assert result.exit_code == 0, result.output
    blobs = (cache / "models--org--one" / "blobs").iterdir()
    size = sum(p.stat().st_size for p in blobs)
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "org/one" in lines and "org/two" in lines
    listing = json.loads(run("models", "list", "--json").stdout)
    by_id = {m["id"]: m for m in listing["models"]}
    assert by_id["org/one"]["size_bytes"] == size
    assert by_id["org/one"]["files"] == 6
    assert listing["cache_dir"] == str(cache)


def test_list_of_an_empty_or_missing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nothing-here"))
    result = run("models", "list")
    assert result.exit_code == 0
    assert "no models" in result.stdout and "models demo" in result.stdout


def test_verify_passes_on_an_intact_model(cache):
    result = run("models", "verify", "org/one")
    assert result.exit_code == 0, result.output
    assert "6 file(s) verified" in result.stdout


@pytest.mark.parametrize("name, algorithm", [("model.safetensors", "sha256"), ("config.json", "git-sha1")])
def test_verify_names_the_corrupted_file_and_fails(cache, name, algorithm):
    corrupt(blob_of(cache, "org/one", name))
    result = run("models", "verify", "org/one")
    assert result.exit_code == 1
    bad = [line for line in result.stderr.splitlines() if line.startswith("MISMATCH")]
    assert len(bad) == 1 and name in bad[0] and algorithm in bad[0]
    assert "1 of 6 file(s) do not match" in result.stderr
    assert "Traceback" not in result.output
    # The other copy shares nothing with it and still verifies.
    assert run("models", "verify", "org/two").exit_code == 0


def test_verify_reports_a_missing_blob(cache):
    blob_of(cache, "org/one", "tokenizer.json").unlink()
    result = run("models", "verify", "org/one")
    assert result.exit_code == 1
    assert any(line.startswith("MISSING") and "tokenizer.json" in line for line in result.stderr.splitlines())


def test_verify_hashes_match_the_hub_naming(cache):
    """The recorded names are sha256 (LFS) and git blob sha1 (regular files), recomputed independently."""
    from macprovider.models.hub_cache import verify_model

    report = verify_model("org/one")
    assert report.ok and len(report.files) == 6
    for check in report.files:
        data = blob_of(cache, "org/one", check.name).read_bytes()
        expected = (
            hashlib.sha256(data).hexdigest()
            if check.algorithm == "sha256"
            else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        )
        assert check.expected == expected == check.actual


def test_rm_deletes_only_that_model(cache):
    result = run("models", "rm", "org/one")
    assert result.exit_code == 0, result.output
    assert "removed org/one" in result.stdout
    assert not (cache / "models--org--one").exists()
    ids = [m["id"] for m in json.loads(run("models", "list", "--json").stdout)["models"]]
    assert ids == ["org/two"]
    assert run("models", "verify", "org/two").exit_code == 0
    again = run("models", "rm", "org/one")
    assert again.exit_code == 1 and "not in the local cache" in again.stderr


def test_rm_removes_a_corrupted_repo(cache):
    blob_of(cache, "org/one", "config.json").unlink()  # the scanner now skips it as corrupted
    assert run("models", "rm", "org/one").exit_code == 0
    assert not (cache / "models--org--one").exists()
    assert (cache / "models--org--two").is_dir()


@pytest.mark.parametrize("command", ["pull", "verify", "rm"])
@pytest.mark.parametrize("bad_id", ["../etc", "a/b/c", "org/..", "org name/x", ""])
def test_invalid_ids_are_rejected_before_any_io(cache, command, bad_id):
    result = run("models", command, bad_id)
    assert result.exit_code == 2
    assert "invalid model id" in result.stderr
    assert "Traceback" not in result.output


def test_verify_of_an_uncached_model(cache):
    result = run("models", "verify", "org/absent")
    assert result.exit_code == 1
    assert "not in the local cache" in result.stderr and "models pull org/absent" in result.stderr


# ---- pull: no network, ever --------------------------------------------------------------------------


def pull(repo_id: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`macprovider models pull` in a fresh interpreter, so huggingface_hub reads HF_* afresh."""
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "macprovider", "models", "pull", repo_id],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
    )


def test_pull_offline_and_not_cached_says_how_to_fix_it(cache):
    result = pull("org/absent", {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "offline mode is on" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "models demo" in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_offline_of_a_cached_model_succeeds_without_network(cache):
    result = pull("org/one", {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "org/one is in the cache" in result.stdout


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pull_with_an_unreachable_hub_fails_fast_with_a_clear_message(cache):
    port = closed_port()
    result = pull("org/absent", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert result.returncode == 1
    assert f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}" in result.stderr
    assert "again (it resumes)" in result.stderr
    assert "Traceback" not in result.stderr


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request the way huggingface.co answers for a gated or an absent repo."""

    answers = {
        "gated": (403, "GatedRepo", "Access to model org/gated is restricted."),
        "absent": (404, "RepoNotFound", "Repository not found"),
        "down": (503, None, "Service Unavailable"),
    }

    def do_GET(self):  # noqa: N802 - http.server API
        kind = next((k for k in self.answers if f"org/{k}" in self.path), "absent")
        status, code, message = self.answers[kind]
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "repo_id, expected",
    [
        ("org/gated", ["org/gated is gated", "accept its terms", "hf auth login"]),
        ("org/absent", ["org/absent was not found on", "check the id"]),
        ("org/down", ["answered HTTP 503", "try again later"]),
    ],
)
def test_pull_maps_hub_errors_to_what_to_do(cache, fake_hub, repo_id, expected):
    result = pull(repo_id, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub, "HF_HUB_ETAG_TIMEOUT": "5"})
    assert result.returncode == 1, result.stdout
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_error_classes_for_autotune(cache, fake_hub, monkeypatch):
    """Gated is transient (a login may fix it); an absent repo is not."""
    import huggingface_hub.constants as hub_constants

    from macprovider.models.hub_cache import PullError, pull_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PullError) as gated:
        pull_model("org/gated", endpoint=fake_hub)
    assert gated.value.transient is True
    with pytest.raises(PullError) as absent:
        pull_model("org/absent", endpoint=fake_hub)
    assert absent.value.transient is False


def test_serve_keeps_failing_fast_on_an_uncached_model_offline(cache):
    from macprovider.core.errors import ModelNotCachedError
    from macprovider.models.ids import ensure_local

    with pytest.raises(ModelNotCachedError, match="models pull org/absent"):
        ensure_local("org/absent")
    assert ensure_local("org/one").is_dir()


def test_demo_rejects_a_bad_id(cache):
    result = run("models", "demo", "--id", "../../etc")
    assert result.exit_code == 2 and "invalid --id" in result.stderr
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("models--")) == [
        "models--org--one",
        "models--org--two",
    ]
