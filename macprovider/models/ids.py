"""Model ids, Hub cache resolution and model facts read from config.json (README.md#models).

A model id is `org/name` (each part `[A-Za-z0-9._-]+`, neither `.` nor `..`) or a path to a local
directory; anything else is rejected before it touches the filesystem or the network.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from macprovider.core.errors import InvalidModelId, ModelError, ModelNotCachedError

_PART = re.compile(r"^[A-Za-z0-9._-]+$")

# The files mlx-lm's loader fetches (mlx_lm/utils.py DEFAULT_ALLOW_PATTERNS).
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


def is_hub_id(model: str) -> bool:
    """Whether `model` is a syntactically valid `org/name` Hub id."""
    parts = model.split("/")
    return len(parts) == 2 and all(_PART.match(p) and p not in (".", "..") for p in parts)


def validate_model_id(model: str) -> str:
    """Return `model` if it is an `org/name` id or an existing local directory, else raise ModelError."""
    if not isinstance(model, str) or not model or len(model) > 512 or "\x00" in model:
        raise InvalidModelId(f"invalid model id {model!r}: expected org/name or a local directory")
    if Path(model).expanduser().is_dir():
        return model
    if not is_hub_id(model):
        raise InvalidModelId(
            f"invalid model id {model!r}: expected org/name (parts of [A-Za-z0-9._-]) or an existing local directory"
        )
    return model


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hub cache directory as huggingface_hub computes it, read from the environment now (not at import):
    HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "huggingface" / "hub"


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE)."""
    env = os.environ if env is None else env
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_model_path(model: str) -> Path | None:
    """The local directory holding `model`: the directory itself, or its cached Hub snapshot; None if absent."""
    validate_model_id(model)
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                model, cache_dir=str(hub_cache_dir()), local_files_only=True, allow_patterns=ALLOW_PATTERNS
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def ensure_local(model: str) -> Path:
    """The local directory of `model`; raises ModelNotCachedError (with the fix) if it is not cached.

    `serve` never downloads implicitly: `macprovider models pull ID` does, with a progress bar.
    """
    path = cached_model_path(model)
    if path is None:
        raise ModelNotCachedError(
            f"model {model} is not in the local Hugging Face cache"
            + (" and HF_HUB_OFFLINE is set" if hub_offline() else "")
            + f"; download it first with `macprovider models pull {model}`"
            " (or try the offline demo: `macprovider models demo`)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model {model} has no config.json in {path.name}; re-download it")
    return path


def read_model_config(path: Path) -> dict[str, Any]:
    """Parse `config.json` of a model directory; ModelError if it is missing or malformed."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read config.json of model at {Path(path).name}: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise ModelError("config.json of the model is not a JSON object")
    return data


def max_position_embeddings(config: dict[str, Any]) -> int | None:
    """The model's own context limit from config.json (top level or `text_config`), if it states one."""
    for scope in (config, config.get("text_config") or {}):
        value = scope.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None
