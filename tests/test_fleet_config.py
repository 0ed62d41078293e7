"""The fleet's configuration: the YAML `models:` list with per-model knobs, keep_alive durations, `serve --model
A --model B`, today's single `model:` (a fleet of one), and the preflight of every listed model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from macprovider.core import config as cfg
from macprovider.core.errors import ConfigError, ModelNotCachedError
from macprovider.serve.preflight import is_fleet, plan_fleet


def write_config(home, text: str):
    path = home / ".config" / "macprovider" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def env_for(home, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), **extra}


FLEET_YAML = """\
kv_bits: 8
max_context_override: 4096
keep_alive: 10m
models:
  - id: org/chat
    aliases: [gpt-4o, "claude-*sonnet*"]
    max_concurrency_override: 4
    pinned: true
  - id: org/fast
    aliases: "claude-*haiku*"
    kv_bits: 4
    max_context_override: 2048
    weights_dtype: float32
    keep_alive: 1h
  - id: org/never
    keep_alive: -1
  - org/plain
"""


def test_yaml_models_list_with_per_model_knobs_and_keep_alive_durations(isolated_env):
    write_config(isolated_env, FLEET_YAML)
    resolved = cfg.resolve({}, env_for(isolated_env), ram_gb=16)
    chat, fast, never, plain = cfg.fleet_entries(resolved)
    assert (chat.id, chat.aliases, chat.max_concurrency_override, chat.pinned) == (
        "org/chat",
        ("gpt-4o", "claude-*sonnet*"),
        4,
        True,
    )
    assert (fast.aliases, fast.kv_bits, fast.max_context_override, fast.weights_dtype, fast.keep_alive) == (
        ("claude-*haiku*",),
        4,
        2048,
        "float32",
        3600.0,
    )
    assert never.keep_alive == cfg.KEEP_FOREVER
    assert (plain.id, plain.keep_alive, plain.pinned) == ("org/plain", None, False)  # unset: the top-level value
    assert resolved.settings.keep_alive == 600.0
    assert is_fleet(resolved)


@pytest.mark.parametrize(
    "raw, seconds", [(300, 300.0), ("45", 45.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("-1", -1.0), (0, 0.0)]
)
def test_keep_alive_takes_seconds_or_a_duration(isolated_env, raw, seconds):
    resolved = cfg.resolve({}, env_for(isolated_env, MACPROVIDER_KEEP_ALIVE=str(raw)), ram_gb=16)
    assert resolved.settings.keep_alive == seconds


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("models:\n  - id: org/a\n    keep_alive: soon\n", "keep_alive 'soon'"),
        ("models:\n  - id: org/a\n    kv_bit: 4\n", "unknown key 'kv_bit'"),
        ("models:\n  - id: org/a\n    kv_bits: 7\n", "kv_bits 7"),
        ("models:\n  - id: org/a\n  - id: org/b\n    aliases: [org/a]\n", "listed twice"),
        ("models:\n  - aliases: [x]\n", "has no `id`"),
        ("models: org/a\n", None),  # one id as text is a list of one
    ],
)
def test_bad_models_entries_name_the_entry_key_and_value(isolated_env, yaml_text, needle):
    write_config(isolated_env, yaml_text)
    if needle is None:
        assert [e.id for e in cfg.resolve({}, env_for(isolated_env), ram_gb=16).settings.models] == ["org/a"]
        return
    with pytest.raises(ConfigError) as error:
        cfg.resolve({}, env_for(isolated_env), ram_gb=16)
    assert "invalid models" in str(error.value) and needle in str(error.value) and "yaml:" in str(error.value)


def test_repeated_model_flags_name_the_fleet_and_one_model_stays_todays_single_model(isolated_env):
    write_config(isolated_env, "models:\n  - id: org/yaml-only\n")
    two = cfg.resolve({"model": "org/a", "models": ["org/a", "org/b"]}, env_for(isolated_env), ram_gb=16)
    assert [e.id for e in cfg.fleet_entries(two)] == ["org/a", "org/b"] and is_fleet(two)
    one = cfg.resolve({"model": "org/a"}, env_for(isolated_env), ram_gb=16)
    assert [(e.id, e.pinned) for e in cfg.fleet_entries(one)] == [("org/a", True)] and not is_fleet(one)

    write_config(isolated_env, "model: org/single\n")
    single = cfg.resolve({}, env_for(isolated_env), ram_gb=16)
    assert [(e.id, e.pinned) for e in cfg.fleet_entries(single)] == [("org/single", True)] and not is_fleet(single)

    write_config(isolated_env, "model: org/default\nmodels:\n  - org/other\n")
    both = cfg.resolve({}, env_for(isolated_env), ram_gb=16)
    assert [e.id for e in cfg.fleet_entries(both)] == ["org/default", "org/other"]  # `model:` first: the default


def test_fleet_preflight_checks_every_model_and_estimates_each(tiny_model, isolated_env, hf_home):
    env = env_for(isolated_env, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    write_config(
        isolated_env,
        f"max_context_override: 256\nmodels:\n  - id: {tiny_model}\n    max_context_override: 128\n"
        f"    aliases: [small]\n  - id: nobody/absent\n",
    )
    with pytest.raises(ModelNotCachedError) as missing:
        plan_fleet(cfg.resolve({}, env, ram_gb=16), None, env)
    assert "nobody/absent" in str(missing.value)

    write_config(
        isolated_env,
        f"max_context_override: 256\nmodels:\n  - id: {tiny_model}\n    max_context_override: 128\n"
        f"    aliases: [small]\n    kv_bits: 8\n",
    )
    plan, models = plan_fleet(cfg.resolve({}, env, ram_gb=16), None, env)
    (model,) = models
    assert (model.id, model.aliases, model.max_context, model.kv_bits) == (tiny_model, ("small",), 128, 8)
    assert model.plan.settings.kv_bits == 8 and plan.model_id == tiny_model
    assert model.estimate_bytes > 0


def test_serve_with_two_models_checks_both_before_loading(tiny_model, isolated_env, hf_home):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "macprovider",
            "serve",
            "--model",
            tiny_model,
            "--model",
            "nobody/absent",
            "--port",
            "18999",
        ],
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "nobody/absent" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------------- autotune --apply
APPLY_YAML = """\
# my provider
port: 9000   # keep me
models:
  - id: org/chat
    aliases: [gpt-4o]
    pinned: true
  - id: org/tuned
    kv_bits: 4
log_level: info
"""


def test_apply_updates_the_tuned_models_entry_and_keeps_the_others(isolated_env):
    from macprovider.autotune.apply import apply_recommendation, owned_values, render_fleet_entry

    path = write_config(isolated_env, APPLY_YAML)
    values = owned_values("org/tuned", None, 2, 4096)
    result = apply_recommendation(path, values, recipe_hash="sha256:abc")
    assert result.changed and result.backup is not None
    text = path.read_text()
    assert text.startswith("# my provider\nport: 9000   # keep me\nmodels:\n") and text.endswith("log_level: info\n")
    resolved = cfg.resolve({}, env_for(isolated_env), ram_gb=16)
    chat, tuned = resolved.settings.models
    assert (chat.id, chat.aliases, chat.pinned) == ("org/chat", ("gpt-4o",), True)
    assert (tuned.kv_bits, tuned.max_concurrency_override, tuned.max_context_override, tuned.recipe_hash) == (
        None,
        2,
        4096,
        "sha256:abc",
    )
    assert resolved.settings.port == 9000 and resolved.settings.model is None  # top-level keys untouched
    assert apply_recommendation(path, values, recipe_hash="sha256:abc").changed is False  # idempotent

    apply_recommendation(path, owned_values("org/new", 8, 1, 2048), recipe_hash="sha256:def")
    ids = [e.id for e in cfg.resolve({}, env_for(isolated_env), ram_gb=16).settings.models]
    assert ids == ["org/chat", "org/tuned", "org/new"]
    assert render_fleet_entry("model: org/one\nkv_bits: 4\n", values) is None  # no fleet: today's keys


def test_apply_precheck_counts_the_pinned_models_the_candidate_sits_beside(tiny_model, isolated_env):
    from macprovider.autotune.trial import pinned_fleet_bytes

    path = write_config(
        isolated_env, f"max_context_override: 256\nmodels:\n  - id: {tiny_model}\n    pinned: true\n  - id: org/other\n"
    )
    beside = pinned_fleet_bytes(path, "org/candidate")
    assert beside > 0
    assert pinned_fleet_bytes(path, tiny_model) == 0  # the candidate itself is not counted twice
    write_config(isolated_env, f"model: {tiny_model}\n")  # a single model is replaced by --apply, not joined
    assert pinned_fleet_bytes(path, "org/candidate") == 0
