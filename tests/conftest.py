"""Shared fixtures. Every test runs with HOME, XDG_CONFIG_HOME and HF_HOME pinned to temporary
directories, MACPROVIDER_* scrubbed and HF_HUB_OFFLINE=1, so no test touches the developer's files or
the network. Tiny models are built once per session into a session Hub cache (SPEC.md §9)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from macprovider.models.demo import TinyModelSpec, install_in_hub_cache, build_model_files

TINY_MODEL_ID = "macprovider-test/tiny-chat"


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """A session Hub cache root (HF_HOME) holding the tiny test models."""
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(scope="session")
def tiny_model(hf_home, tmp_path_factory) -> str:
    """Id of a tiny random-weight llama chat model (hidden 128, 2 layers, head_dim 64) in the session cache."""
    source = tmp_path_factory.mktemp("tiny-model-src")
    build_model_files(source, TinyModelSpec())
    install_in_hub_cache(source, TINY_MODEL_ID, hf_home / "hub")
    return TINY_MODEL_ID


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch, hf_home):
    """Pin HOME/XDG_CONFIG_HOME/HF_HOME, scrub MACPROVIDER_*, force HF_HUB_OFFLINE=1."""
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith("MACPROVIDER_") or key in ("HF_HUB_CACHE", "XDG_CONFIG_HOME"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield home
