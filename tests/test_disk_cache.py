"""The prompt cache's disk tier (macprovider/engine/disk_cache.py) on the tiny model: a restarted engine or
server reuses KV from disk with the same greedy tokens, partial prefixes are reused, a corrupted or
truncated entry is deleted and the request still answered, a full disk degrades to memory only, the byte
budget holds, and `macprovider cache ls|clear` show and empty the directory."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from macprovider.core import config as cfg
from macprovider.engine import disk_cache
from macprovider.engine.engine import Engine
from macprovider.engine.protocol import GenerationRequest

LONG = "the sea and the sailors who sleep under the waves " * 50  # ~600 tokens of the tiny model's tokenizer
OTHER = "numbers 0 1 2 3 4 5 6 7 8 9 and code def main(): return 42 " * 20


@pytest.fixture
def engines(engines, tiny_model):
    """conftest's engine factory on the tiny model, with its prompt cache on disk in `directory`."""

    def factory(directory: Path, **settings) -> Engine:
        return engines(tiny_model, prompt_cache_dir=str(directory), **settings)

    return factory


def generate(engine: Engine, tokens: list[int], max_tokens: int = 8):
    """(text, usage, per-token logprobs) of one greedy sequence."""

    async def run():
        request = GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens, temperature=0.0, top_logprobs=0)
        handle = engine.submit(request)
        return [chunk async for chunk in handle]

    chunks = asyncio.run(run())
    assert chunks[-1].finish_reason in ("stop", "length"), chunks[-1]
    return "".join(c.text for c in chunks), chunks[-1].usage, [e.logprob for c in chunks for e in c.logprobs]


def entry_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*" + disk_cache.SUFFIX) if not p.name.startswith("."))


def written(engine: Engine) -> None:
    engine._disk.wait_written()


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_restarted_engine_reuses_disk_entry_with_identical_greedy_tokens(engines, tmp_path, kv_bits):
    first = engines(tmp_path / "kv", kv_bits=kv_bits)
    prompt = first.encode_text(LONG)
    assert len(prompt) > disk_cache.DISK_MIN_TOKENS + 100
    cold_text, cold_usage, cold_logprobs = generate(first, prompt)
    assert cold_usage.cached_tokens == 0
    written(first)
    assert len(entry_files(tmp_path / "kv")) == 1
    first.close()

    restarted = engines(tmp_path / "kv", kv_bits=kv_bits)
    text, usage, logprobs = generate(restarted, prompt)
    assert usage.cached_tokens == len(prompt) - 1  # all but the last prompt token, recomputed for its logits
    assert text == cold_text
    assert max(abs(a - b) for a, b in zip(logprobs, cold_logprobs)) < 1e-4
    stats = restarted.stats()
    assert stats.prompt_cache_disk_hits_total == 1
    assert stats.prompt_cache_disk_entries >= 1 and stats.prompt_cache_disk_bytes > 0
    assert stats.cached_prompt_tokens_total >= len(prompt) - 1


def test_partial_prefix_is_reused_from_disk(engines, tmp_path):
    first = engines(tmp_path / "kv")
    prompt = first.encode_text(LONG)
    generate(first, prompt)
    written(first)
    first.close()

    shared = 400
    other = prompt[:shared] + first.encode_text(OTHER)
    assert other[shared] != prompt[shared]
    restarted = engines(tmp_path / "kv")
    text, usage, logprobs = generate(restarted, other)
    assert usage.cached_tokens == shared

    cold = engines(tmp_path / "cold", prompt_cache_disk_bytes=0, prompt_cache_bytes=0)
    cold_text, cold_usage, cold_logprobs = generate(cold, other)
    assert cold_usage.cached_tokens == 0
    assert text == cold_text
    assert max(abs(a - b) for a, b in zip(logprobs, cold_logprobs)) < 1e-3


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_entry_is_deleted_and_the_request_answered(engines, tmp_path, caplog, damage):
    first = engines(tmp_path / "kv")
    prompt = first.encode_text(LONG)
    cold_text, _, _ = generate(first, prompt)
    written(first)
    first.close()
    (path,) = entry_files(tmp_path / "kv")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        middle = len(data) // 2  # inside the KV tensors, past the header
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="macprovider.engine.disk_cache")
    restarted = engines(tmp_path / "kv")
    text, usage, _ = generate(restarted, prompt)
    assert usage.cached_tokens == 0
    assert text == cold_text
    assert not path.exists() or path.read_bytes() != bytes(data)  # deleted (a fresh entry may replace it)
    assert "dropping bad entry" in caplog.text
    assert restarted.stats().prompt_cache_disk_hits_total == 0


def test_full_disk_degrades_to_memory_only(engines, tmp_path, caplog):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        caplog.set_level(logging.WARNING, logger="macprovider.engine.disk_cache")
        engine = engines(mount_point / "kv")
        prompt = engine.encode_text(LONG)
        # The disk fills up while the server runs: leave less room than one entry needs.
        stat = os.statvfs(mount_point)
        (mount_point / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))
        cold_text, _, _ = generate(engine, prompt)
        written(engine)
        assert "is full; keeping prompts in memory only" in caplog.text
        assert entry_files(mount_point) == []
        assert [p for p in (mount_point / "kv").rglob("*") if p.is_file()] == []  # no temporary file left
        text, usage, _ = generate(engine, prompt)  # the memory tier still serves the prefix
        assert text == cold_text
        assert usage.cached_tokens == len(prompt) - 1
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def test_disk_budget_holds_under_a_stream_of_distinct_prompts(engines, tmp_path):
    budget = 2_000_000  # about three entries of ~600 tokens (~0.63 MB each on the tiny model)
    engine = engines(tmp_path / "kv", prompt_cache_disk_bytes=budget)
    last = None
    for i in range(6):
        last = engine.encode_text(f"prompt {i} {'abcdefghij'[i]} " + LONG)
        generate(engine, last, max_tokens=2)
        written(engine)
        files = entry_files(tmp_path / "kv")
        assert sum(p.stat().st_size for p in files) <= budget
        assert engine.stats().prompt_cache_disk_bytes <= budget
    assert len(entry_files(tmp_path / "kv")) >= 2
    newest = disk_cache.read_tokens(max(entry_files(tmp_path / "kv"), key=lambda p: p.stat().st_mtime))[0]
    assert newest[: len(last)] == last  # least recently used went first


# ---------------------------------------------------------------------------------------------- serve + CLI
def _cli(home: Path, directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), MACPROVIDER_PROMPT_CACHE_DIR=str(directory))
    return subprocess.run(
        [sys.executable, "-m", "macprovider", "cache", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _complete(server) -> dict:
    body = {"model": server.model, "prompt": LONG, "max_tokens": 8, "temperature": 0}
    response = httpx.post(server.base + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_restarted_server_answers_from_disk_and_cache_cli(tiny_model, hf_home, tmp_path):
    from tests.test_e2e_serve import ServeProcess

    directory = tmp_path / "kv"
    env = {"MACPROVIDER_PROMPT_CACHE_DIR": str(directory)}
    server = ServeProcess(tiny_model, hf_home, tmp_path, "--max-context", "2048", env=env)
    try:
        server.wait_ready()
        cold = _complete(server)
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        deadline = time.monotonic() + 60  # the background writer's entry becomes visible in health
        while server.health()["engine"]["prompt_cache_disk_entries"] < 1:
            assert time.monotonic() < deadline, "no disk entry within 60 s"
            time.sleep(0.1)
    finally:
        assert server.stop() == 0

    listed = _cli(tmp_path, directory, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)["entries"]
    assert entry["model"] == tiny_model and entry["tokens"] >= cold["usage"]["prompt_tokens"] and entry["valid"]
    assert "1 entries" in _cli(tmp_path, directory, "ls").stdout

    server = ServeProcess(tiny_model, hf_home, tmp_path, "--max-context", "2048", env=env)
    try:
        server.wait_ready()
        warm = _complete(server)
        prompt_tokens = warm["usage"]["prompt_tokens"]
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        engine = server.health()["engine"]
        assert engine["prompt_cache_disk_hits_total"] == 1
        assert engine["prompt_cache_disk_load_seconds_total"] > 0
        metrics = httpx.get(server.base + "/metrics", timeout=10).text
        assert "macprovider_engine_prompt_cache_disk_hits_total 1" in metrics
    finally:
        assert server.stop() == 0

    cleared = _cli(tmp_path, directory, "clear")
    assert cleared.returncode == 0 and "removed 1 cached prompt" in cleared.stdout
    assert json.loads(_cli(tmp_path, directory, "ls", "--json").stdout)["entries"] == []


def test_settings_default_to_the_users_cache_directory_and_show_in_config_show(isolated_env, monkeypatch):
    from typer.testing import CliRunner

    from macprovider.cli import app
    from macprovider.core.errors import ConfigError

    resolved = cfg.resolve({}, ram_gb=16)
    assert resolved.settings.prompt_cache_dir == str(isolated_env / ".cache" / "macprovider" / "kv")
    assert resolved.settings.prompt_cache_disk_bytes == 10 * 1024**3
    assert resolved.sources["prompt_cache_dir"] == resolved.sources["prompt_cache_disk_bytes"] == "default"
    monkeypatch.setenv("XDG_CACHE_HOME", str(isolated_env / "xdg"))
    assert cfg.resolve({}, ram_gb=16).settings.prompt_cache_dir == str(isolated_env / "xdg" / "macprovider" / "kv")
    monkeypatch.setenv("MACPROVIDER_PROMPT_CACHE_DIR", "~/kv")
    monkeypatch.setenv("MACPROVIDER_PROMPT_CACHE_DISK_BYTES", "0")
    resolved = cfg.resolve({}, ram_gb=16)
    assert resolved.settings.prompt_cache_dir == str(isolated_env / "kv")
    assert resolved.settings.prompt_cache_disk_bytes == 0
    assert resolved.sources["prompt_cache_dir"] == "env:MACPROVIDER_PROMPT_CACHE_DIR"
    shown = CliRunner().invoke(app, ["config", "show"], terminal_width=200).output
    assert "prompt_cache_dir" in shown and str(isolated_env / "kv") in shown and "prompt_cache_disk_bytes" in shown
    monkeypatch.setenv("MACPROVIDER_PROMPT_CACHE_DISK_BYTES", "-1")
    expected = r"invalid prompt_cache_disk_bytes '-1' \(from env:MACPROVIDER_PROMPT_CACHE_DISK_BYTES\)"
    with pytest.raises(ConfigError, match=expected):
        cfg.resolve({}, ram_gb=16)


def test_two_engines_sharing_the_directory_leave_only_valid_entries(engines, tmp_path):
    directory = tmp_path / "kv"
    first, second = engines(directory), engines(directory)
    prompts = [first.encode_text(f"{word} " + LONG) for word in ("alpha", "beta", "gamma")]

    async def both():  # the same prompts on both engines at once: both writers race for the same files
        async def run(engine, tokens):
            handle = engine.submit(GenerationRequest(prompt_tokens=tokens, max_tokens=1, temperature=0.0))
            return [chunk async for chunk in handle][-1]

        for tokens in prompts:
            finals = await asyncio.gather(run(first, tokens), run(second, tokens))
            assert all(final.finish_reason in ("stop", "length") for final in finals)

    asyncio.run(both())
    written(first)
    written(second)
    files = entry_files(directory)
    assert len(files) == len(prompts)
    assert [p for p in directory.rglob(disk_cache.TMP_PREFIX + "*")] == []
    third = engines(directory)
    for tokens in prompts:
        _, usage, _ = generate(third, tokens, max_tokens=1)
        assert usage.cached_tokens == len(tokens) - 1
    assert third.stats().prompt_cache_disk_hits_total == len(prompts)


def test_a_write_cut_short_never_reads_as_an_entry(engines, tmp_path):
    """A crash mid-write leaves only a dot-named temporary file: never indexed, removed once stale."""
    engine = engines(tmp_path / "kv")
    namespace = engine._disk.directory
    path = namespace / (disk_cache.TMP_PREFIX + "123-0123456789ab" + disk_cache.SUFFIX)
    path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"__metadata__":')  # half a header
    stale = time.time() - disk_cache.STALE_TMP_S - 60
    os.utime(path, (stale, stale))
    prompt = engine.encode_text(LONG)
    generate(engine, prompt)
    written(engine)
    assert not path.exists()
    assert len(entry_files(tmp_path / "kv")) == 1
    assert json.loads(_cli(tmp_path, tmp_path / "kv", "ls", "--json").stdout)["entries"][0]["valid"]


def test_clear_and_listing_touch_only_the_caches_own_files(tmp_path):
    """`prompt_cache_dir` pointed at a directory with other files (weights are .safetensors too) keeps them."""
    root = tmp_path / "shared"
    foreign = [
        root / "models" / "model.safetensors",
        root / "0123456789abcdef" / "weights.safetensors",
        root / "0123456789abcdef" / "notes.txt",
    ]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a cache entry")
    own = root / "0123456789abcdef" / ("f" * 32 + disk_cache.SUFFIX)
    own.write_bytes(b"\0" * 16)
    assert [entry.path for entry in disk_cache.scan(root)] == [own]
    assert disk_cache.clear(root) == (1, 16)
    assert all(path.exists() for path in foreign) and not own.exists()
