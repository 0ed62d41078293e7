"""Pre-warm: get a candidate's files into the local cache and check them before measuring
(docs/autotune.md#pre-warm-and-failures).

Two failure classes, decided by checking rather than by matching error text:
- transient (`PrewarmTransient`): offline and not cached, network down, Hub 5xx, gated/denied or absent
  repo, disk full, interrupted download — the candidate is infeasible and the run moves on;
- integrity (`PrewarmIntegrity`): a cached file whose content does not hash to the name the cache recorded
  for it (sha256 for LFS blobs, named by 64 hex digits; git blob sha1 for the others, 40 hex digits), a
  truncated or malformed safetensors header, a missing `config.json` / tokenizer / weight file — the run
  aborts with `pre_warm_integrity_failure`.

Downloads go through `macprovider.models.hub_cache.pull_model` (the code of `models pull`). `verify_snapshot`
hashes blobs with `hub_cache.blob_hash` (as `models verify` does) and adds what pre-warm also needs
(safetensors headers against file lengths, required files).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from macprovider.autotune.memory import SafetensorsError, read_safetensors_header, weight_files
from macprovider.models.hub_cache import PullError, blob_hash, blob_hash_algorithm, pull_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


class PrewarmTransient(Exception):
    """The model could not be fetched for a reason that may go away (network, Hub, disk, gated)."""


class PrewarmUnusable(Exception):
    """The repo can never serve (absent, not an MLX model): infeasible, but not an integrity abort."""


class PrewarmIntegrity(Exception):
    """The cached model is damaged or incomplete; the message names the file."""


def verify_snapshot(snapshot: Path) -> None:
    """Check a model directory (a Hub snapshot or a local directory). Raises PrewarmIntegrity.

    Required files present (config.json, a tokenizer file, every safetensors shard of the index or at least
    one safetensors file); every file that links to a cache blob hashes to the blob's name; every
    safetensors header parses and fits the file length.
    """
    snapshot = Path(snapshot)
    if not (snapshot / "config.json").is_file():
        raise PrewarmIntegrity("config.json is missing")
    try:
        json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PrewarmIntegrity("config.json is not valid JSON") from None
    if not any((snapshot / name).is_file() for name in TOKENIZER_FILES) and not list(snapshot.glob("*.tiktoken")):
        raise PrewarmIntegrity("tokenizer files are missing (no tokenizer.json / tokenizer.model / vocab.json)")
    shards = weight_files(snapshot)
    if not shards:
        raise PrewarmIntegrity("no safetensors weight files")
    for shard in shards:
        if not shard.is_file():
            raise PrewarmIntegrity(f"weight file {shard.name} is missing")
    for entry in sorted(snapshot.rglob("*")):
        if not entry.is_symlink():
            continue
        target = Path(os.path.realpath(entry))
        if not target.is_file():
            raise PrewarmIntegrity(f"{entry.name} points to a missing cache blob")
        name = target.name
        algorithm = blob_hash_algorithm(name)
        if algorithm and blob_hash(target, algorithm) != name:
            raise PrewarmIntegrity(f"{entry.name} does not match the hash the cache recorded for it ({algorithm})")
    for shard in shards:
        try:
            read_safetensors_header(shard)
        except SafetensorsError as exc:
            raise PrewarmIntegrity(str(exc)) from None
        except OSError as exc:
            raise PrewarmIntegrity(f"{shard.name}: unreadable ({exc.__class__.__name__})") from None


def _classify(exc: BaseException) -> str:
    """A short reason for a failed download (the transient class)."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return "gated repo: access not granted"
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return "repository not found or access denied"
    if isinstance(exc, hf_errors.OfflineModeIsEnabled) or isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return "not in the local cache and the Hub is unreachable (offline)"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"Hub HTTP error {status}" if status else "Hub HTTP error"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk full"
    return f"download failed: {exc.__class__.__name__}"


def _weights_complete(path: Path) -> bool:
    shards = weight_files(path)
    return bool(shards) and all(shard.exists() or shard.is_symlink() for shard in shards)


def prewarm(model: str) -> Path:
    """Return the verified local directory of `model`, downloading it first if it is not cached.

    A local directory is only verified. A Hub id already complete in the cache is not downloaded again;
    otherwise `hub_cache.pull_model` fetches it (exactly `macprovider models pull`). Raises PrewarmTransient,
    PrewarmUnusable or PrewarmIntegrity.
    """
    from macprovider.models import ids as models

    local = Path(model).expanduser()
    if local.is_dir():
        verify_snapshot(local)
        return local.resolve()
    path = models.cached_model_path(model)
    if path is not None and (path / "config.json").is_file() and _weights_complete(path):
        verify_snapshot(path)
        return path
    if models.hub_offline():
        state = "incomplete in" if path is not None else "not in"
        raise PrewarmTransient(f"{state} the local cache and HF_HUB_OFFLINE is set")
    try:
        path = pull_model(model)  # what `macprovider models pull` does (resumable snapshot_download)
    except KeyboardInterrupt:
        raise
    except PullError as exc:
        if exc.transient:
            raise PrewarmTransient(str(exc)) from None
        raise PrewarmUnusable(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any other download failure is transient (docs/autotune.md)
        raise PrewarmTransient(_classify(exc)) from None
    verify_snapshot(path)
    return path
