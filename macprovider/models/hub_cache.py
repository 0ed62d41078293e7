"""Operations on the Hugging Face Hub cache: list, pull, verify, rm (README.md#models).

The cache layout is huggingface_hub's (`models--org--name/{blobs,refs,snapshots/<rev>/…}`): every file of a
snapshot is a symlink to a blob whose *name is the hash the Hub recorded for it* — the sha256 of the content
for LFS/Xet files (64 hex digits), the git blob sha1 (`sha1(b"blob <len>\\0" + data)`, 40 hex digits) for
regular files. `verify_model` recomputes those hashes; `pull_model` wraps `snapshot_download` (resumable by
itself) and turns the Hub's failures into `ModelError` lines that say what to do; `list_models` and
`remove_model` use huggingface_hub's cache scanner and deletion strategy.

Autotune's pre-warm (docs/autotune.md#pre-warm-and-failures) uses the same calls: a `PullError` carries
`transient=True` (network, 5xx, gated,
disk full: the candidate is skipped), and `verify_model(...).ok` is False on an integrity failure.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macprovider.core.errors import InvalidModelId, ModelError, ModelNotCachedError
from macprovider.models.ids import (
    ALLOW_PATTERNS,
    cached_model_path,
    hub_cache_dir,
    hub_offline,
    is_hub_id,
    validate_model_id,
)

_HEX = frozenset("0123456789abcdef")
_CHUNK = 1 << 20


class PullError(ModelError):
    """`models pull` failed. `transient` is True for failures a retry may cure (network, Hub 5xx, gated or
    denied access, disk full, interruption) and False for ones it cannot (the repo does not exist, holds no
    MLX safetensors weights)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class CachedModel:
    """One model repo in the Hub cache. `size_bytes` sums its blobs (bytes on disk, each blob once)."""

    repo_id: str
    size_bytes: int
    nb_files: int
    refs: tuple[str, ...]
    revisions: tuple[str, ...]
    last_modified: float
    path: Path


@dataclass(frozen=True)
class CacheListing:
    """`list_models` result: models sorted by id, repos the scanner found corrupted, partial-download bytes."""

    cache_dir: Path
    models: tuple[CachedModel, ...]
    warnings: tuple[str, ...] = ()
    incomplete_bytes: int = 0


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one cached file: `status` is `ok`, `mismatch`, `missing` (broken symlink) or
    `unverifiable` (not a hash-named blob, e.g. a copied file); `expected`/`actual` are hex digests."""

    revision: str
    name: str
    algorithm: str
    expected: str
    actual: str | None
    status: str
    size_bytes: int = 0


@dataclass(frozen=True)
class VerifyReport:
    """`verify_model` result. `ok` is True iff no file is mismatched or missing."""

    repo_id: str
    files: tuple[FileCheck, ...] = field(default=())

    @property
    def bad(self) -> tuple[FileCheck, ...]:
        """Files whose content does not match the recorded hash, or whose blob is gone."""
        return tuple(f for f in self.files if f.status in ("mismatch", "missing"))

    @property
    def ok(self) -> bool:
        return not self.bad


def _repo_dir(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def _hub_id(model: str) -> str:
    """Validate `model` at the boundary and require an `org/name` id (the cache holds Hub repos only)."""
    validate_model_id(model)
    if not is_hub_id(model):
        raise InvalidModelId(f"invalid model id {model!r}: the cache commands take a Hub id org/name, not a directory")
    return model


def list_models(cache_dir: Path | None = None) -> CacheListing:
    """Every model repo in the Hub cache (huggingface_hub `scan_cache_dir`), sorted by id.

    A cache directory that does not exist yet is an empty listing, not an error.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    try:
        info = scan_cache_dir(cache_dir=cache_dir)
    except CacheNotFound:
        return CacheListing(cache_dir, ())
    except ValueError as exc:
        raise ModelError(f"cannot scan the Hub cache {cache_dir}: {exc}") from None
    models = tuple(
        CachedModel(
            repo_id=repo.repo_id,
            size_bytes=repo.size_on_disk,
            nb_files=repo.nb_files,
            refs=tuple(sorted(repo.refs)),
            revisions=tuple(sorted(rev.commit_hash for rev in repo.revisions)),
            last_modified=repo.last_modified,
            path=repo.repo_path,
        )
        for repo in sorted(info.repos, key=lambda r: r.repo_id.lower())
        if repo.repo_type == "model"
    )
    incomplete = sum(f.size_on_disk for f in getattr(info, "incomplete_files", ()) or ())
    return CacheListing(cache_dir, models, tuple(str(w) for w in info.warnings), incomplete)


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exception classes: the builtins plus httpx's / httpx2's (huggingface_hub's client)."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx", "httpx2"):
        try:
            classes.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def _is_connection_failure(exc: BaseException) -> bool:
    errors = _transport_errors()
    return any(isinstance(e, errors) for e in _cause_chain(exc))


def _http_status(exc: BaseException) -> int | None:
    for e in _cause_chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _reason(exc: BaseException) -> str:
    """The innermost cause as `Type: message`, one line."""
    inner = _cause_chain(exc)[-1]
    text = " ".join(str(inner).split())
    return f"{inner.__class__.__name__}: {text}"[:300] if text else inner.__class__.__name__


def _unreachable(where: str, repo_id: str, exc: BaseException, retry: str) -> PullError:
    """The transient error for a Hub that cannot be reached (DNS, refused connection, timeout)."""
    return PullError(
        f"cannot reach the Hugging Face Hub at {where} to download {repo_id} ({_reason(exc)}): check the "
        f"network (or HF_ENDPOINT), then {retry}; `macprovider models demo` works offline",
        transient=True,
    )


def pull_model(
    model: str,
    *,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    tqdm_class: Any = None,
) -> Path:
    """Download `model` (org/name) into the Hub cache with huggingface_hub's `snapshot_download`
    (files matching `ALLOW_PATTERNS`, i.e. what mlx-lm loads); returns the snapshot directory.

    Resumable: files already complete are skipped and `.incomplete` blobs continue where they stopped.
    `endpoint` defaults to `HF_ENDPOINT` read now. Offline mode (`HF_HUB_OFFLINE`) returns the cached
    snapshot or raises. Raises InvalidModelId (bad id), PullError (gated, absent, network, Hub error,
    disk full, no safetensors weights; `transient` tells which can be retried).
    """
    repo_id = _hub_id(model)
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if hub_offline():
        return _offline_snapshot(repo_id, cache_dir)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    where = endpoint or "https://huggingface.co"
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    fresh = not repo_dir.exists()  # a first pull that fails on a full disk keeps nothing
    retry = f"run `macprovider models pull {repo_id}` again (it resumes)"
    try:
        path = Path(
            snapshot_download(
                repo_id,
                cache_dir=str(cache_dir),
                allow_patterns=ALLOW_PATTERNS,
                endpoint=endpoint,
                tqdm_class=tqdm_class,
            )
        )
    except GatedRepoError:
        raise PullError(
            f"model {repo_id} is gated: accept its terms at {where}/{repo_id} with your account, then log in "
            "(`hf auth login`, or set HF_TOKEN) and " + retry,
            transient=True,
        ) from None
    except RepositoryNotFoundError:
        raise PullError(
            f"model {repo_id} was not found on {where}: check the id (org/name, case matters); if it is private, "
            "log in (`hf auth login`, or set HF_TOKEN)",
            transient=False,
        ) from None
    except RevisionNotFoundError:
        raise PullError(f"model {repo_id} has no 'main' revision on {where}", transient=False) from None
    except LocalEntryNotFoundError as exc:
        raise _local_entry_error(exc, repo_id, where, retry) from None
    except HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, where, retry) from None
    except KeyboardInterrupt:
        raise PullError(f"download of {repo_id} interrupted; {retry}", transient=True) from None
    except OSError as exc:
        raise _os_error(exc, repo_id, where, retry, cache_dir, repo_dir, fresh) from None
    except Exception as exc:  # httpx transport errors raised outside huggingface_hub's wrappers
        if _is_connection_failure(exc):
            raise _unreachable(where, repo_id, exc, retry) from None
        raise
    if not any(path.glob("model*.safetensors")):
        raise PullError(
            f"model {repo_id} has no model*.safetensors weights: it is not an MLX model; look for an MLX conversion "
            "(e.g. under mlx-community/)",
            transient=False,
        )
    return path


def _offline_snapshot(repo_id: str, cache_dir: Path) -> Path:
    """Offline mode: the cached snapshot of `repo_id`, or a PullError saying how to get it."""
    cached = cached_model_path(repo_id)
    if cached is not None:
        return cached
    raise PullError(
        f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE is set) and it is not in the local "
        f"cache {cache_dir}; unset HF_HUB_OFFLINE (or set it to 0) and run `macprovider models pull {repo_id}` "
        "again, or try the offline demo: `macprovider models demo`",
        transient=True,
    )


def _local_entry_error(exc: Exception, repo_id: str, where: str, retry: str) -> Exception:
    """The PullError for a LocalEntryNotFoundError: offline mode, an HTTP status, no connection, or its reason."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if any(isinstance(e, OfflineModeIsEnabled) for e in _cause_chain(exc)):
        return PullError(
            f"cannot download {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE) and it is not "
            "cached; unset HF_HUB_OFFLINE and " + retry,
            transient=True,
        )
    status = _http_status(exc)
    if status is not None:
        return PullError(
            f"the Hub at {where} answered HTTP {status} for {repo_id}: try again later; {retry}", transient=True
        )
    if _is_connection_failure(exc):
        return _unreachable(where, repo_id, exc, retry)
    return PullError(f"cannot download {repo_id}: {_reason(exc)}; {retry}", transient=True)


def _http_error(exc: Exception, repo_id: str, where: str, retry: str) -> PullError:
    """The PullError for a Hub HTTP error (401: log in; any other status: try again later)."""
    status = _http_status(exc)
    if status == 401:
        return PullError(
            f"the Hub at {where} refused access to {repo_id} (HTTP 401): log in (`hf auth login`, or set HF_TOKEN) "
            "and " + retry,
            transient=True,
        )
    return PullError(
        f"the Hub at {where} answered HTTP {status or '?'} for {repo_id}: try again later; {retry}",
        transient=True,
    )


def _os_error(
    exc: OSError, repo_id: str, where: str, retry: str, cache_dir: Path, repo_dir: Path, fresh: bool
) -> Exception:
    """The PullError for an OSError: disk full (a fresh pull's partial snapshot is removed first), no
    connection, or its reason."""
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in _cause_chain(exc)):
        if fresh:  # a snapshot with some files and no weights would look cached; the space is wanted back
            shutil.rmtree(repo_dir, ignore_errors=True)
        return PullError(
            f"disk full while downloading {repo_id} into {cache_dir}"
            + (" (nothing was kept)" if fresh else "")
            + f": free space (`macprovider models rm ID`), then {retry}",
            transient=True,
        )
    if _is_connection_failure(exc):
        return _unreachable(where, repo_id, exc, retry)
    return PullError(f"cannot download {repo_id}: {_reason(exc)}; {retry}", transient=True)


def blob_hash(path: Path, algorithm: str, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex digest of a file: `sha256` of the content, or `git-sha1` = sha1(b"blob <len>\\0" + content)
    (git's object id for a blob, which is what the Hub records for non-LFS files). `on_bytes(n)` is called
    as bytes are read. Raises OSError when the file cannot be read."""
    size = path.stat().st_size
    if algorithm == "sha256":
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def blob_hash_algorithm(blob_name: str) -> str | None:
    """The hash a Hub cache blob is named by: `sha256` (64 hex digits, LFS/Xet files), `git-sha1` (40 hex
    digits, other files), or None (not a hash name: cannot be verified)."""
    if not set(blob_name) <= _HEX:
        return None
    return {64: "sha256", 40: "git-sha1"}.get(len(blob_name))


def verify_plan(model: str, cache_dir: Path | None = None) -> tuple[Path, list[Path]]:
    """The repo directory of `model` and every file of every cached snapshot (sorted); ModelError if absent."""
    repo_id = _hub_id(model)
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo = _repo_dir(repo_id, cache_dir)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        raise ModelNotCachedError(
            f"model {repo_id} is not in the local cache {cache_dir}; download it with `macprovider models pull {repo_id}`"
        )
    files = sorted(p for p in snapshots.rglob("*") if p.is_symlink() or p.is_file())
    return repo, files


def verify_model(
    model: str, cache_dir: Path | None = None, on_bytes: Callable[[int], None] | None = None
) -> VerifyReport:
    """Recompute the hash of every file of every cached snapshot of `model` and compare it with the blob
    name the cache recorded (sha256 for 64-hex names, git blob sha1 for 40-hex names).

    `on_bytes(n)` is called as bytes are hashed (for a progress bar). Raises ModelNotCachedError when the
    model is not cached; mismatches are reported, not raised.
    """
    repo, files = verify_plan(model, cache_dir)
    checks: list[FileCheck] = []
    for path in files:
        rel = path.relative_to(repo / "snapshots")
        revision, name = rel.parts[0], "/".join(rel.parts[1:])
        blob = Path(os.path.abspath(path.parent / os.readlink(path))) if path.is_symlink() else path
        algorithm = blob_hash_algorithm(blob.name) if path.is_symlink() else None
        if not path.exists():
            checks.append(FileCheck(revision, name, algorithm or "?", blob.name, None, "missing"))
            continue
        if algorithm is None:
            checks.append(FileCheck(revision, name, "?", "", None, "unverifiable", path.stat().st_size))
            continue
        actual = blob_hash(path, algorithm, on_bytes)
        status = "ok" if actual == blob.name else "mismatch"
        checks.append(FileCheck(revision, name, algorithm, blob.name, actual, status, path.stat().st_size))
    return VerifyReport(model, tuple(checks))


def remove_model(model: str, cache_dir: Path | None = None) -> int:
    """Delete `model` from the Hub cache (all revisions, its blobs and refs) with huggingface_hub's
    `delete_revisions` strategy; returns the bytes freed. Raises ModelNotCachedError if it is not cached.

    A repo the scanner reports as corrupted (e.g. a blob deleted by hand) is removed as a whole directory,
    after checking the path is the repo's own directory inside the cache.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    repo_id = _hub_id(model)
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo_path = _repo_dir(repo_id, cache_dir)
    if not repo_path.is_dir():
        raise ModelNotCachedError(f"model {repo_id} is not in the local cache {cache_dir}: nothing to remove")
    freed = 0
    try:
        info = scan_cache_dir(cache_dir=cache_dir)
    except CacheNotFound:  # pragma: no cover - the repo dir exists, so the cache does
        info = None
    repo = next((r for r in (info.repos if info else ()) if r.repo_type == "model" and r.repo_id == repo_id), None)
    if info is not None and repo is not None and repo.revisions:  # repo came from info
        # Restrict the scan to this repo first: delete_revisions matches commit hashes cache-wide, and two
        # repos may hold the same commit (a copy, or demo models built from the same files).
        only_this = dataclasses.replace(info, repos=frozenset({repo}))
        strategy = only_this.delete_revisions(*(rev.commit_hash for rev in repo.revisions))
        freed = strategy.expected_freed_size
        strategy.execute()
    if repo_path.exists():
        # Corrupted or revision-less repo: remove its own directory only (never follow a symlinked root).
        resolved_cache = cache_dir.resolve()
        if repo_path.is_symlink() or repo_path.resolve().parent != resolved_cache:
            raise ModelError(f"refusing to remove {repo_path}: not a directory inside the cache {cache_dir}")
        freed += sum(p.stat().st_size for p in (repo_path / "blobs").glob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(repo_path)
    locks = cache_dir / ".locks" / repo_path.name
    if locks.is_dir() and not locks.is_symlink():
        shutil.rmtree(locks, ignore_errors=True)
    return freed


def format_size(num_bytes: int) -> str:
    """Bytes as a short decimal string (`1.2 GB`), as the Hub and huggingface_hub show sizes."""
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def _is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".gguf", ".npz"))


def install_in_hub_cache(source: Path, repo_id: str, cache_dir: Path | None = None, *, exclusive: bool = False) -> Path:
    """Copy a model directory into the Hub cache as `repo_id`; returns the snapshot directory.

    LFS-like files (safetensors) go to blobs named by their sha256, others by their git blob sha1, as the
    Hub names them, so `macprovider models verify` can check them. Idempotent for identical content.

    `exclusive=True` (imports): the repo must not be in the cache yet (ModelError otherwise); the files are
    moved out of `source` (which should sit on the cache's filesystem) into a hidden temporary repo directory
    in `cache_dir`, which is renamed into place last, so an interrupted install leaves no partial repo.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    # Sub-folders are kept (sentence-transformers models keep their pooling config in `1_Pooling/`).
    source = Path(source)
    names = {path: path.relative_to(source).as_posix() for path in sorted(source.rglob("*")) if path.is_file()}
    files = list(names)
    digests = {names[path]: blob_hash(path, "sha256" if _is_lfs(path.name) else "git-sha1") for path in files}
    revision = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    exists = ModelError(
        f"model {repo_id} is already in the cache; choose another id or remove it with `macprovider models rm {repo_id}`"
    )
    if exclusive and repo_dir.exists():
        raise exists
    cache_dir.mkdir(parents=True, exist_ok=True)
    build = (
        Path(tempfile.mkdtemp(prefix=".macprovider-install-", dir=cache_dir)) / repo_dir.name if exclusive else repo_dir
    )
    try:
        snapshot = build / "snapshots" / revision
        (build / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in files:
            blob = build / "blobs" / digests[names[path]]
            if exclusive:
                shutil.move(path, blob)
            elif not blob.exists():
                shutil.copyfile(path, blob)
            link = snapshot / names[path]
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, link.parent))
        (build / "refs").mkdir(exist_ok=True)
        (build / "refs" / "main").write_text(revision)
        if exclusive:
            try:
                os.rename(build, repo_dir)
            except OSError:
                raise exists from None
    finally:
        if exclusive:
            shutil.rmtree(build.parent, ignore_errors=True)
    return repo_dir / "snapshots" / revision
