"""Settings resolution (docs/configuration.md) and serve preflight (docs/configuration.md, docs/api.md#security, README.md#models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from macprovider.core import config as cfg
from macprovider.core.errors import ConfigError, InvalidModelId, ModelNotCachedError
from macprovider.serve.preflight import plan_serve


def write_config(home, text: str):
    path = home / ".config" / "macprovider" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_cli_over_env_over_yaml_over_default(isolated_env):
    path = write_config(isolated_env, "kv_bits: 4\nmax_concurrency_override: 3\nport: 9000\n")
    env = {
        "HOME": str(isolated_env),
        "XDG_CONFIG_HOME": str(isolated_env / ".config"),
        "MACPROVIDER_KV_BITS": "8",
        "MACPROVIDER_PORT": "9100",
    }
    resolved = cfg.resolve({"port": "9200"}, env, ram_gb=16)
    s = resolved.settings
    assert (s.port, s.kv_bits, s.max_concurrency_override, s.host) == (9200, 8, 3, "127.0.0.1")
    assert resolved.sources["port"] == "cli"
    assert resolved.sources["kv_bits"] == "env:MACPROVIDER_KV_BITS"
    assert resolved.sources["max_concurrency_override"] == f"yaml:{path}"
    assert resolved.sources["host"] == "default"
    assert (s.max_context_override, resolved.sources["max_context_override"]) == (50_000, "ram-tier")
    assert s.max_queue_depth == 64  # docs/api.md#engine-semantics: not tied to max-batch


@pytest.mark.parametrize(
    "ram, expected",
    [(8, 20_000), (12, 20_000), (16, 50_000), (24, 50_000), (32, 120_000), (48, 120_000), (64, 200_000)],
)
def test_ram_tier_default_max_context(ram, expected):
    assert cfg.default_max_context(ram) == expected


@pytest.mark.parametrize(
    "cli, env, needle",
    [
        ({"kv_bits": "7"}, {}, "invalid kv_bits '7' (from cli): must be 4 or 8"),
        ({}, {"MACPROVIDER_KV_BITS": "7"}, "(from env:MACPROVIDER_KV_BITS)"),
        ({"max_context_override": "0"}, {}, "invalid max_context_override '0' (from cli)"),
        ({"max_concurrency_override": "0"}, {}, "invalid max_concurrency_override '0'"),
        ({"port": "70000"}, {}, "invalid port '70000' (from cli): must be in 1..65535"),
        ({}, {"MACPROVIDER_PORT": "eighty"}, "invalid port 'eighty' (from env:MACPROVIDER_PORT): must be an integer"),
        ({}, {"MACPROVIDER_MAX_CONCURRENCY_OVERRIDE": "2.5"}, "must be an integer"),
        ({"log_level": "loud"}, {}, "invalid log_level 'loud'"),
        (
            {},
            {"MACPROVIDER_MEMORY_BUDGET_GB": "inf"},
            "invalid memory_budget_gb 'inf' (from env:MACPROVIDER_MEMORY_BUDGET_GB)",
        ),
        ({}, {"MACPROVIDER_MODEL_WAIT_TIMEOUT_S": "inf"}, "invalid model_wait_timeout_s 'inf'"),
        ({}, {"MACPROVIDER_DRAIN_TIMEOUT_S": "nan"}, "invalid drain_timeout_s 'nan'"),
    ],
)
def test_invalid_values_name_setting_value_and_source(isolated_env, cli, env, needle):
    with pytest.raises(ConfigError) as info:
        cfg.resolve(cli, {"HOME": str(isolated_env), **env}, ram_gb=16)
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_yaml_problems(isolated_env, tmp_path):
    write_config(isolated_env, "kv_bits: 8\nmystery_knob: 1\napi_key: secret\n")
    resolved = cfg.resolve({}, {"HOME": str(isolated_env)}, ram_gb=16)
    assert resolved.settings.kv_bits == 8
    assert any("mystery_knob" in w for w in resolved.warnings)
    assert any("api_key" in w and "ignored" in w for w in resolved.warnings)

    write_config(isolated_env, "kv_bits: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.resolve({}, {"HOME": str(isolated_env)}, ram_gb=16)

    with pytest.raises(ConfigError, match="does not exist"):
        cfg.resolve({}, {"HOME": str(isolated_env), "MACPROVIDER_CONFIG": str(tmp_path / "nope.yaml")}, ram_gb=16)
    # A missing default file means all defaults.
    (isolated_env / ".config" / "macprovider" / "config.yaml").unlink()
    assert cfg.resolve({}, {"HOME": str(isolated_env)}, ram_gb=16).settings.port == 8080


def test_xdg_config_home_replaces_dot_config(tmp_path):
    paths = cfg.Paths.from_env({"HOME": str(tmp_path / "h"), "XDG_CONFIG_HOME": str(tmp_path / "x")})
    assert paths.config_file == tmp_path / "x" / "macprovider" / "config.yaml"
    assert paths.autotune_db == tmp_path / "x" / "macprovider" / "autotune.sqlite"
    assert (
        cfg.Paths.from_env({"HOME": str(tmp_path / "h")}).config_file
        == tmp_path / "h" / ".config" / "macprovider" / "config.yaml"
    )


def test_api_key_sources_and_file_mode(tmp_path):
    settings = cfg.Settings(api_key_file=str(tmp_path / "key"))
    assert cfg.load_api_key(cfg.Settings(), {"MACPROVIDER_API_KEY": "k1"}) == "k1"
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load_api_key(settings, {})
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        cfg.load_api_key(settings, {})
    key.chmod(0o600)
    assert cfg.load_api_key(settings, {}) == "s3cret"


def test_preflight(tiny_model, isolated_env):
    env = dict(os.environ)
    plan = plan_serve(cfg.resolve({"model": tiny_model, "max_context_override": "100000"}, env), env)
    assert plan.max_context == 4096 and plan.max_context_source == "model"  # the model's max_position_embeddings
    assert plan.settings.max_context_override == 4096

    with pytest.raises(ConfigError, match="API key"):
        plan_serve(cfg.resolve({"model": tiny_model, "host": "0.0.0.0"}, env), env)
    exposed = plan_serve(
        cfg.resolve({"model": tiny_model, "host": "0.0.0.0"}, env), {**env, "MACPROVIDER_API_KEY": "k"}
    )
    assert exposed.api_key == "k"

    with pytest.raises(InvalidModelId):
        plan_serve(cfg.resolve({"model": "../no-such-dir/a/b"}, env), env)
    with pytest.raises(ModelNotCachedError, match="models pull"):
        plan_serve(cfg.resolve({"model": "nobody/absent"}, env), env)
    with pytest.raises(ConfigError, match="no model configured"):
        plan_serve(cfg.resolve({}, env), env)


def test_config_show_cli(isolated_env):
    write_config(isolated_env, "kv_bits: 4\n")
    run = subprocess.run(
        [sys.executable, "-m", "macprovider", "config", "show", "--json"],
        env={**os.environ, "MACPROVIDER_MAX_CONCURRENCY_OVERRIDE": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["settings"]["kv_bits"] == 4 and payload["sources"]["kv_bits"].startswith("yaml:")
    assert payload["settings"]["max_concurrency_override"] == 2
    assert payload["sources"]["max_concurrency_override"] == "env:MACPROVIDER_MAX_CONCURRENCY_OVERRIDE"

    bad = subprocess.run(
        [sys.executable, "-m", "macprovider", "config", "show"],
        env={**os.environ, "MACPROVIDER_KV_BITS": "7"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "kv_bits" in bad.stderr and "Traceback" not in bad.stderr


def test_every_help_text_reaches_the_screen_unmarked():
    """Help texts say "[default: …]"; rich markup read those brackets as tags and printed "Address to bind ."."""
    import typer.main
    from typer.testing import CliRunner

    from macprovider.cli import app

    def commands(group, path):
        for name, command in getattr(group, "commands", {}).items():
            yield path + [name], command
            yield from commands(command, path + [name])

    bracketed = 0
    for path, command in commands(typer.main.get_command(app), []):
        if getattr(command, "commands", None):
            continue
        shown = " ".join(CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output.split())
        for param in command.params:
            help_text = " ".join((getattr(param, "help", None) or "").split())
            if "[" in help_text:
                bracketed += 1
                assert help_text in shown, (path, param.name, shown)
    assert bracketed >= 10


def test_speculative_setting_from_yaml_env_and_fleet_entries(isolated_env):
    env = {"HOME": str(isolated_env), "XDG_CONFIG_HOME": str(isolated_env / ".config")}
    # A bare `off` is YAML 1.1's false: it still means off, at the top level and in a model entry.
    write_config(isolated_env, "speculative: off\nmodels:\n  - id: a/b\n    speculative: off\n  - c/d\n")
    resolved = cfg.resolve({}, env, ram_gb=16)
    assert resolved.settings.speculative == "off"
    assert resolved.settings.models[0].speculative == "off"
    write_config(isolated_env, "speculative: prompt-lookup\nspeculative_tokens: 6\n")
    resolved = cfg.resolve({}, env, ram_gb=16)
    assert (resolved.settings.speculative, resolved.settings.speculative_tokens) == ("prompt-lookup", 6)
    for bad_env, needle in (
        ({"MACPROVIDER_SPECULATIVE": "draft"}, "speculative"),
        ({"MACPROVIDER_SPECULATIVE_TOKENS": "17"}, "speculative_tokens"),
    ):
        with pytest.raises(ConfigError, match=needle):
            cfg.resolve({}, {**env, **bad_env}, ram_gb=16)


def test_cpu_kernels_setting_from_env_and_yaml_with_a_clear_error(isolated_env):
    env = {"HOME": str(isolated_env), "XDG_CONFIG_HOME": str(isolated_env / ".config")}
    assert cfg.resolve({}, env, ram_gb=16).settings.cpu_kernels == "auto"
    assert cfg.resolve({}, {**env, "MACPROVIDER_CPU_KERNELS": " MLX "}, ram_gb=16).settings.cpu_kernels == "mlx"
    write_config(isolated_env, "cpu_kernels: mlx\n")
    assert cfg.resolve({}, env, ram_gb=16).settings.cpu_kernels == "mlx"
    for bad in ("numpy", "", "0", "\ud800"):
        with pytest.raises(ConfigError, match="cpu_kernels.*must be one of auto, mlx"):
            cfg.resolve({}, {**env, "MACPROVIDER_CPU_KERNELS": bad}, ram_gb=16)
