"""`--apply`: line editor keeps every other byte, atomic write with backups, symlink refusal
(docs/autotune.md#apply)."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from macprovider.autotune.apply import apply_recommendation, owned_values, render_config, summary_line
from macprovider.core.errors import ApplyError

ORIGINAL = (
    "# macprovider config\n"
    "port:   8080   # odd spacing stays\n"
    "\n"
    "model: old/model\n"
    "kv_bits: 8\n"
    "  # indented comment\n"
    "log_level: debug\n"
    "\n"
    "\n"
    "cors_allowed_origins:\n"
    "  - http://a.example\n"
    "max_concurrency_override: 4\n"
    "trailing_key: x"
)


def test_only_owned_lines_change_and_kv_unset_removes_the_key():
    values = owned_values("org/new", None, 2, 4096)
    new = render_config(ORIGINAL, values)
    assert new == (
        "# macprovider config\n"
        "port:   8080   # odd spacing stays\n"
        "\n"
        "model: org/new\n"
        "  # indented comment\n"
        "log_level: debug\n"
        "\n"
        "\n"
        "cors_allowed_origins:\n"
        "  - http://a.example\n"
        "max_concurrency_override: 2\n"
        "trailing_key: x\n"
        "max_context_override: 4096\n"
    )
    parsed = yaml.safe_load(new)
    assert parsed["model"] == "org/new" and "kv_bits" not in parsed and parsed["port"] == 8080


def test_render_is_idempotent_and_keeps_crlf():
    values = owned_values("org/m", 4, 1, 2000)
    once = render_config("a: 1\r\nkv_bits: 8\r\n", values)
    assert once == "a: 1\r\nkv_bits: 4\r\nmodel: org/m\r\nmax_context_override: 2000\r\nmax_concurrency_override: 1\r\n"
    assert render_config(once, values) == once


def test_awkward_model_values_are_quoted():
    new = render_config("", owned_values("/path/with space: and #hash", None, 1, 10))
    assert yaml.safe_load(new)["model"] == "/path/with space: and #hash"
    assert yaml.safe_load(render_config("", owned_values("true", None, 1, 10)))["model"] == "true"


def test_apply_writes_atomically_with_a_0600_backup(tmp_path):
    tmp_path = tmp_path / "cfg"
    tmp_path.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(ORIGINAL)
    values = owned_values("org/new", 8, 2, 4096)
    result = apply_recommendation(config, values, now=1700000000)
    assert result.changed and result.backup == tmp_path / "config.yaml.bak-1700000000-0"
    assert result.backup.read_text() == ORIGINAL
    assert stat.S_IMODE(result.backup.stat().st_mode) == 0o600
    assert config.read_text() == render_config(ORIGINAL, values)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    line = summary_line(values, result)
    assert line == (
        "applied: model=org/new kv_bits=8 max_concurrency_override=2 max_context_override=4096 "
        f"(backup at {result.backup})"
    )
    # same recommendation again: same config, no new backup
    again = apply_recommendation(config, values, now=1700000000)
    assert not again.changed and again.backup is None
    assert config.read_text() == render_config(ORIGINAL, values)
    # a different one in the same second: the next free counter, never overwriting
    third = apply_recommendation(config, owned_values("org/other", None, 1, 2000), now=1700000000)
    assert third.backup.name == "config.yaml.bak-1700000000-1"
    assert (tmp_path / "config.yaml.bak-1700000000-0").read_text() == ORIGINAL


def test_missing_config_is_created_without_backup(tmp_path):
    config = tmp_path / "sub" / "config.yaml"
    result = apply_recommendation(config, owned_values("org/m", None, 1, 100))
    assert result.changed and result.backup is None
    assert yaml.safe_load(config.read_text()) == {
        "model": "org/m",
        "max_context_override": 100,
        "max_concurrency_override": 1,
    }
    assert "new file" in summary_line(owned_values("org/m", None, 1, 100), result)


def test_symlinked_config_is_refused_and_untouched(tmp_path):
    tmp_path = tmp_path / "cfg"
    tmp_path.mkdir()
    real = tmp_path / "real.yaml"
    real.write_text("model: keep/me\n")
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    with pytest.raises(ApplyError, match="symlink"):
        apply_recommendation(link, owned_values("org/m", None, 1, 100))
    assert real.read_text() == "model: keep/me\n"
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "real.yaml"]


def test_config_that_would_not_parse_is_refused(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: [unclosed\n  - x: : :\n")
    with pytest.raises(ApplyError):
        apply_recommendation(config, owned_values("org/m", None, 1, 100))
    assert config.read_text() == "model: [unclosed\n  - x: : :\n"


def _served(path, model: str | None = None):
    """What `serve` reads from the applied config: the settings, or the fleet entry of `model`."""
    from macprovider.core import config as cfg

    settings = cfg.resolve({}, {}, cli_config=str(path), ram_gb=16).settings
    return settings if model is None else next(e for e in settings.models if e.id == model)


def test_speculation_on_is_written_and_off_removes_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("# mine\nspeculative_tokens: 6\n")
    on = owned_values("org/m", None, 2, 4096, speculative="prompt-lookup")
    result = apply_recommendation(config, on, now=1700000000)
    assert config.read_text() == (
        "# mine\nspeculative_tokens: 6\nmodel: org/m\nmax_context_override: 4096\nmax_concurrency_override: 2\n"
        "speculative: prompt-lookup\n"
    )
    assert (_served(config).speculative, _served(config).speculative_tokens) == ("prompt-lookup", 6)
    assert summary_line(on, result).startswith(
        "applied: model=org/m kv_bits=unset max_concurrency_override=2 max_context_override=4096 "
        "speculative=prompt-lookup (backup at"
    )
    off = owned_values("org/m", None, 2, 4096)
    assert off["speculative"] is None  # as kv_bits unset: the key goes, serve's default (off) applies
    apply_recommendation(config, off, now=1700000001)
    assert "speculative:" not in config.read_text() and _served(config).speculative == "off"
    assert "speculative" not in summary_line(off, result)


def test_a_fleet_entry_gets_speculation_and_loses_it_when_off(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("port: 9000\nmodels:\n  - id: org/chat\n    speculative: prompt-lookup\n  - id: org/tuned\n")
    apply_recommendation(config, owned_values("org/tuned", 8, 2, 4096, speculative="prompt-lookup"), now=1)
    assert _served(config, "org/tuned").speculative == "prompt-lookup"
    assert _served(config, "org/tuned").kv_bits == 8
    apply_recommendation(config, owned_values("org/tuned", 8, 2, 4096), now=2)
    tuned = yaml.safe_load(config.read_text())["models"][1]
    assert tuned == {"id": "org/tuned", "kv_bits": 8, "max_context_override": 4096, "max_concurrency_override": 2}
    assert _served(config, "org/chat").speculative == "prompt-lookup"  # the other entries are left alone
