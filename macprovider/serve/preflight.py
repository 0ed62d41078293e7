"""Serve preflight: every check that can fail before a model loads (docs/configuration.md, docs/api.md#security, README.md#models).

`plan_serve` turns resolved settings into a `ServePlan` or raises a MacproviderError whose one line
names the setting, the value and its source. It reads the model's config.json (cheap) but never loads
weights and never touches the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from macprovider.core.config import ModelEntry, ResolvedConfig, Settings, fleet_entries, is_loopback, load_api_key
from macprovider.core.errors import ConfigError, ModelError
from macprovider.engine.protocol import ServePlan
from macprovider.models.embedding import model_kind
from macprovider.models.ids import ensure_local, max_position_embeddings, read_model_config, validate_model_id
from macprovider.models.safetensors import SafetensorsError, read_safetensors_header, weight_files
from macprovider.serve.fleet import FleetModel


def plan_serve(resolved: ResolvedConfig, env: Mapping[str, str] | None = None) -> ServePlan:
    """Check everything `serve` needs before loading. Raises ConfigError (exit 2) or ModelError (exit 1)."""
    env = os.environ if env is None else env
    settings = resolved.settings
    if not settings.model:
        raise ConfigError(
            "no model configured: pass --model ORG/NAME (or set MACPROVIDER_MODEL or `model:` in config.yaml)"
        )
    model_id = validate_model_id(settings.model)
    api_key = load_api_key(settings, env)
    if not is_loopback(settings.host) and not api_key:
        raise ConfigError(
            f"refusing to bind host {settings.host!r} (from {resolved.sources['host']}) without an API key: "
            "set MACPROVIDER_API_KEY or api_key_file, or bind 127.0.0.1"
        )
    return _plan_model(settings, resolved.sources["max_context_override"], model_id, api_key)


def _plan_model(settings: Settings, source: str, model_id: str, api_key: str | None) -> ServePlan:
    """One model's plan: it is in the cache with sound weights; max context capped by the model's limit."""
    model_path = ensure_local(model_id)
    check_weight_files(model_id, model_path)
    max_context = settings.max_context_override
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


def is_fleet(resolved: ResolvedConfig) -> bool:
    """Whether `serve` runs a fleet (a `models:` list, several `--model`) rather than one model loaded at start:
    a single pinned model with no knobs or aliases of its own is today's one model."""
    entries = fleet_entries(resolved)
    return len(entries) > 1 or (len(entries) == 1 and entries[0] != ModelEntry(id=entries[0].id, pinned=True))


def plan_fleet(
    resolved: ResolvedConfig, budget_bytes: int | None, env: Mapping[str, str] | None = None
) -> tuple[ServePlan, list[FleetModel]]:
    """Check every model of the fleet before any loads (each must be in the cache with sound weights) and
    estimate the memory each needs loaded (`models.memory.estimate`, prompt cache counted full). Returns the
    first model's plan (the server-wide settings and key) and the fleet's models. Raises as `plan_serve`."""
    entries = fleet_entries(resolved)
    if not entries:
        return plan_serve(resolved, env), []
    first = plan_serve(_with_model(resolved, entries[0]), env)
    base = resolved.settings
    models = []
    for entry in entries:
        plan = (
            first
            if entry is entries[0]
            else _plan_model(
                _entry_settings(base, entry),
                _context_source(resolved, entry),
                validate_model_id(entry.id),
                first.api_key,
            )
        )
        keep_alive = base.keep_alive if entry.keep_alive is None else entry.keep_alive
        kind = model_kind(plan.model_path)
        models.append(
            FleetModel(
                id=plan.model_id,
                aliases=entry.aliases,
                max_context=plan.max_context,
                max_batch=plan.settings.max_concurrency_override,
                kv_bits=plan.settings.kv_bits,
                speculative=plan.settings.speculative,
                keep_alive=keep_alive,
                pinned=entry.pinned,
                estimate_bytes=_estimate(plan, budget_bytes, kind),
                kind=kind,
                plan=plan,
            )
        )
    return first, models


def _with_model(resolved: ResolvedConfig, entry: ModelEntry) -> ResolvedConfig:
    settings = _entry_settings(resolved.settings, entry)
    return ResolvedConfig(settings, resolved.sources, resolved.config_path, resolved.warnings)


def _entry_settings(settings: Settings, entry: ModelEntry) -> Settings:
    """The settings one fleet model is served with: its own knobs where it sets them, else the top-level ones."""
    update: dict[str, object] = {"model": entry.id}
    for knob in (
        "kv_bits",
        "max_context_override",
        "max_concurrency_override",
        "weights_dtype",
        "speculative",
        "speculative_tokens",
    ):
        if getattr(entry, knob) is not None:
            update[knob] = getattr(entry, knob)
    return settings.model_copy(update=update)


def _context_source(resolved: ResolvedConfig, entry: ModelEntry) -> str:
    if entry.max_context_override is not None:
        return resolved.sources.get("models", "yaml")
    return resolved.sources["max_context_override"]


def _estimate(plan: ServePlan, budget_bytes: int | None, kind: str = "chat") -> int:
    """The memory the model needs loaded (bytes, `models.memory.resident_bytes`): without the runtime baseline,
    which the fleet's budget already leaves out. An embedding model holds no KV cache: its weights as stored
    (`models.memory.weights_bytes`). 0 (admitted without one, logged) when it cannot be made."""
    from macprovider.models.memory import resident_bytes, weights_bytes

    settings = plan.settings
    try:
        if kind == "embedding":
            return weights_bytes(plan.model_path)
        return resident_bytes(
            plan.model_path,
            max_context=plan.max_context,
            max_batch=settings.max_concurrency_override,
            kv_bits=settings.kv_bits,
            prompt_cache_bytes=settings.prompt_cache_bytes,
            weights_dtype=settings.weights_dtype,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        import logging

        logging.getLogger("macprovider.serve.preflight").warning(
            "no memory estimate for %s (%s): it is admitted without one", plan.model_id, exc.__class__.__name__
        )
        return 0


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
