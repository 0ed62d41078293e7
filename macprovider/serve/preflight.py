"""Serve preflight: every check that can fail before a model loads (SPEC.md §2, §3.5, §4).

`plan_serve` turns resolved settings into a `ServePlan` or raises a MacproviderError whose one line
names the setting, the value and its source. It reads the model's config.json (cheap) but never loads
weights and never touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from macprovider.config import ResolvedConfig, Settings, is_loopback, load_api_key
from macprovider.engine.protocol import ServePlan
from macprovider.errors import ConfigError, ModelError
from macprovider.models.ids import ensure_local, max_position_embeddings, read_model_config, validate_model_id
from macprovider.models.weights import SafetensorsError, read_safetensors_header, weight_files


def plan_serve(resolved: ResolvedConfig, env: Mapping[str, str] | None = None) -> ServePlan:
    """Check everything `serve` needs before loading. Raises ConfigError (exit 2) or ModelError (exit 1)."""
    env = os.environ if env is None else env
    settings = resolved.settings
    if not settings.model:
        raise ConfigError("no model configured: pass --model ORG/NAME (or set MACPROVIDER_MODEL or `model:` in config.yaml)")
    model_id = validate_model_id(settings.model)
    api_key = load_api_key(settings, env)
    if not is_loopback(settings.host) and not api_key:
        raise ConfigError(
            f"refusing to bind host {settings.host!r} (from {resolved.sources['host']}) without an API key: "
            "set MACPROVIDER_API_KEY or api_key_file, or bind 127.0.0.1"
        )
    model_path = ensure_local(model_id)
    check_weight_files(model_id, model_path)
    max_context = settings.max_context_override
    source = resolved.sources["max_context_override"]
    model_limit = max_position_embeddings(read_model_config(model_path))
    if model_limit is not None and max_context is not None and model_limit < max_context:
        if source in ("cli", "yaml") or source.startswith(("env:", "yaml:")):
            # An explicit request above what the model supports: honour the model's limit, but say so.
            import sys

            print(
                f"warning: max_context_override {max_context} (from {source}) exceeds the model's "
                f"max_position_embeddings {model_limit}; using {model_limit}",
                file=sys.stderr,
            )
        max_context, source = model_limit, "model"
    assert max_context is not None
    settings = settings.model_copy(update={"max_context_override": max_context})
    return ServePlan(settings, model_id, model_path, api_key, max_context, source)


def check_weight_files(model_id: str, model_path: Path) -> None:
    """Refuse weights cut short or damaged after download before loading anything: each safetensors file's
    header must parse and every tensor must lie inside the file (a few small reads per file). Raises
    ModelError naming the file and how to fix it."""
    files = weight_files(model_path)
    if not files:
        raise ModelError(
            f"model {model_id} has no safetensors weights in the cache (an interrupted download?); re-download it: "
            f"`macprovider models rm {model_id}` then `macprovider models pull {model_id}`"
        )
    for path in files:
        try:
            read_safetensors_header(path)
        except SafetensorsError as exc:
            raise ModelError(
                f"model {model_id}: weights file {path.name} is damaged ({exc}); re-download it: "
                f"`macprovider models rm {model_id}` then `macprovider models pull {model_id}`"
            ) from None
        except OSError as exc:
            raise ModelError(f"model {model_id}: cannot read weights file {path.name}: {exc.strerror or exc}") from None
