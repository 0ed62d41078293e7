"""The prompt cache's disk tier: KV of finished prompts kept in files, so a restart does not prefill again.

The memory tier (mlx-lm's `LRUPromptCache`, bounded by `prompt_cache_bytes`) lives as long as the process.
This tier keeps the same entries on disk under `prompt_cache_dir`, bounded by `prompt_cache_disk_bytes`:

- Write-through, off the decode path: when a sequence finishes, the generation thread hands its (already
  evaluated) per-layer KV to `offer`, which only queues it; a background writer thread serializes it. A full
  queue drops the offer instead of waiting. Entries shorter than `DISK_MIN_TOKENS` are not written (their
  prefill is cheap), so whatever the memory tier evicts later is already on disk.
- Keyed by everything that makes KV valid: files live in one directory per *namespace* — a hash of the
  model id, its revision (the Hub snapshot, or a fingerprint of a local directory's files), the weights dtype
  actually served, kv-bits and the KV group size — and are named by a hash of their token ids. The tokens
  themselves are stored in the entry and compared with the prompt before use, so a hit is never the wrong KV.
- Format: one safetensors file per entry, written by this module (header JSON, then raw tensor bytes) and
  read back with `mx.load`. Tensors: `tokens` (int32) and each layer's `state` arrays (`<layer>.<path>`, the
  same flattening mlx-lm's `save_prompt_cache` uses). `__metadata__` holds the identity, the layer classes and
  their scalar state, and an xxh3-128 checksum of every tensor's bytes (in file order). mlx-lm's
  `save_prompt_cache` is not used because it cannot write from the writer thread without building MLX arrays
  there, and its files carry no checksum.
- Atomic: written to a dot-named temporary file in the same directory, fsynced, then `os.replace`d into
  place; a crash leaves only a temporary file (removed by a later eviction pass), never a readable partial
  entry. Two processes sharing the directory may write the same entry: each rename is atomic and both files
  are valid. Reads take no lock: they verify the checksum, so a file deleted or replaced meanwhile is simply
  a miss or a reload.
- Checked on load: a truncated, corrupted or foreign file is deleted and logged, and the request goes on
  with what the memory tier had (or a full prefill).
- Bounded, least-recently-used: a hit touches the file's mtime; before each write the writer deletes the
  oldest files of the whole directory (every namespace) until the new entry fits the budget. The budget is
  `prompt_cache_disk_bytes`, capped at startup to half of what its filesystem has free (plus what the
  cache already holds). A full disk (ENOSPC/EDQUOT) pauses writing for `FULL_DISK_PAUSE_S` with one
  warning: the server keeps answering from memory.
- Lookup (`nearest`): the memory tier's answer stands unless a disk entry shares at least
  `DISK_MIN_TOKENS` more prompt tokens; then that entry is loaded, trimmed to the shared prefix (KV caches are
  trimmable) and only the rest of the prompt is prefilled. Loading happens on the generation thread.

Only `KVCache` and this project's `QuantizedKVCache` layers are stored (full attention, trimmable); models
whose caches are rotating windows or recurrent states keep the memory tier only. Distributed ranks do not use
this tier (each holds only its own layers; `Engine` passes no directory).

No MLX import at module level: `macprovider cache ls|clear` read the headers with the standard library.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("macprovider.engine.disk_cache")

FORMAT = "macprovider-kv-1"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
# Entries (prompt + generated tokens) shorter than this are not written, and a disk entry is used only when it
# covers at least this many more prompt tokens than the memory tier: below it, prefilling costs about as much as
# reading the file (SmolLM2-135M float32 on this project's x86 CPU: ~100 tok/s prefill, 46 KB of KV per token).
DISK_MIN_TOKENS = 256
WRITE_QUEUE_ENTRIES = 4
FULL_DISK_PAUSE_S = 60.0
STALE_TMP_S = 3600.0
BUDGET_FREE_FRACTION = 0.5
# Only names this module makes are listed, evicted or cleared: a `prompt_cache_dir` pointed at a directory
# holding other files (model weights are .safetensors too) never loses them.
_NAMESPACE = re.compile(r"[0-9a-f]{16}")
_ENTRY = re.compile(r"[0-9a-f]{32}\.safetensors")
_TEMPORARY = re.compile(r"\.tmp-[0-9]+-[0-9a-f]{12}\.safetensors")
# safetensors dtype names (https://github.com/huggingface/safetensors, `Dtype`) of the MLX dtypes a KV cache holds.
_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint32": "U32",
    "int32": "I32",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "int64": "I64",
    "uint64": "U64",
}


class BadEntry(Exception):
    """A cache file that cannot be used: truncated, corrupted, foreign or of another format."""


# ---------------------------------------------------------------------------------------------- file format
def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its data starts: (header dict, data offset in bytes).

    Raises BadEntry when the file is too short or the header is not a JSON object; OSError when unreadable.
    """
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise BadEntry("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > 64 * 1024 * 1024:
            raise BadEntry("header length is implausible")
        raw = handle.read(length)
    if len(raw) != length:
        raise BadEntry("header is truncated")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadEntry("header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise BadEntry("header has no metadata")
    return header, 8 + length


def read_tokens(path: Path) -> tuple[list[int], dict[str, str]]:
    """An entry's token ids and metadata, read without MLX (two small reads).

    Raises BadEntry for a file that is not a complete entry of this format, OSError when unreadable.
    """
    import numpy as np

    header, data_start = read_header(path)
    metadata = header["__metadata__"]
    if metadata.get("format") != FORMAT:
        raise BadEntry(f"format {metadata.get('format')!r} is not {FORMAT}")
    spec = header.get("tokens")
    if not isinstance(spec, dict) or spec.get("dtype") != "I32":
        raise BadEntry("no int32 tokens tensor")
    begin, end = spec["data_offsets"]
    last = max(value["data_offsets"][1] for key, value in header.items() if key != "__metadata__")
    if os.path.getsize(path) != data_start + last:
        raise BadEntry("file size does not match its header (truncated?)")
    with open(path, "rb") as handle:
        handle.seek(data_start + begin)
        raw = handle.read(end - begin)
    tokens = np.frombuffer(raw, dtype=np.int32).tolist()
    if len(tokens) != int(metadata.get("n_tokens", -1)):
        raise BadEntry("token count does not match its metadata")
    return tokens, metadata


def _write_entry(path: Path, tensors: Mapping[str, Any], metadata: dict[str, str]) -> int:
    """Write `tensors` (name -> evaluated, row-contiguous mx.array) as a safetensors file at `path` (which must
    not exist), its checksum in the metadata; fsync. Returns the file size. Raises OSError (ENOSPC, ...)."""
    import xxhash

    views = {name: memoryview(array).cast("B") for name, array in tensors.items()}
    digest = xxhash.xxh3_128()
    header: dict[str, Any] = {}
    offset = 0
    for name, array in tensors.items():
        view = views[name]
        digest.update(view)
        header[name] = {
            "dtype": _ST_DTYPES[str(array.dtype).split(".")[-1]],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        offset += view.nbytes
    header["__metadata__"] = dict(metadata, checksum=digest.hexdigest())
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as safetensors writers do
    # Owner-only: an entry holds the prompt's token ids.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for view in views.values():
            handle.write(view)
        handle.flush()
        os.fsync(handle.fileno())
    return 8 + len(blob) + offset


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- identity
def model_revision(model_path: Path) -> str:
    """What distinguishes one build of a model's weights: the Hub snapshot (commit) name when `model_path` is a
    Hub cache snapshot, else `local:` + a hash of config.json and every weight file's name, size and mtime."""
    model_path = Path(model_path)
    if model_path.parent.name == "snapshots":
        return model_path.name
    digest = hashlib.sha256()
    try:
        digest.update((model_path / "config.json").read_bytes())
        for weights in sorted(model_path.glob("*.safetensors")):
            info = weights.stat()
            digest.update(f"{weights.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    except OSError:
        digest.update(str(model_path.resolve()).encode())
    return "local:" + digest.hexdigest()[:16]


def namespace_of(identity: Mapping[str, str]) -> str:
    """The directory name of one identity (model, revision, weights dtype, kv-bits, group size)."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:16]


def tokens_name(tokens: Sequence[int]) -> str:
    """An entry's file name: a hash of its token ids (int32, little-endian)."""
    import numpy as np

    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()[:32] + SUFFIX


# ---------------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class DiskEntry:
    """One cache file as `macprovider cache ls` shows it (sizes in bytes, `last_used` Unix seconds)."""

    path: Path
    size: int
    last_used: float
    model: str = ""
    revision: str = ""
    weights_dtype: str = ""
    kv_bits: str = ""
    tokens: int = 0
    valid: bool = True


def scan(root: Path, *, with_metadata: bool = False) -> Iterator[DiskEntry]:
    """Every entry file under `root` (one level of namespace directories). With `with_metadata`, each header is
    read (model, tokens, …; `valid` False when it cannot be). Files vanishing meanwhile are skipped."""
    for namespace in _subdirs(root):
        for file in _files(namespace):
            if not _ENTRY.fullmatch(file.name):
                continue
            try:
                info = file.stat(follow_symlinks=False)
            except OSError:
                continue
            entry = DiskEntry(Path(file.path), info.st_size, info.st_mtime)
            if with_metadata:
                try:
                    metadata = read_header(entry.path)[0]["__metadata__"]
                    entry = DiskEntry(
                        entry.path,
                        entry.size,
                        entry.last_used,
                        str(metadata.get("model", "")),
                        str(metadata.get("revision", "")),
                        str(metadata.get("weights_dtype", "")),
                        str(metadata.get("kv_bits", "")),
                        int(metadata.get("n_tokens", 0)),
                        metadata.get("format") == FORMAT,
                    )
                except (OSError, BadEntry, ValueError):
                    entry = DiskEntry(entry.path, entry.size, entry.last_used, valid=False)
            yield entry


def clear(root: Path) -> tuple[int, int]:
    """Delete every entry (and leftover temporary file) under `root`; returns (files removed, bytes freed).
    Namespace directories left empty are removed. A file another process deletes first is not counted."""
    removed = freed = 0
    for namespace in _subdirs(root):
        for file in _files(namespace):
            if not (_ENTRY.fullmatch(file.name) or _TEMPORARY.fullmatch(file.name)):
                continue
            try:
                size = file.stat(follow_symlinks=False).st_size
                os.unlink(file.path)
            except OSError:
                continue
            removed += 1
            freed += size
        try:
            os.rmdir(namespace)
        except OSError:
            pass
    return removed, freed


# ---------------------------------------------------------------------------------------------- the tier
@dataclass
class _Indexed:
    tokens: Any  # numpy int32 array
    path: Path


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0
    writes: int = 0
    write_errors: int = 0
    dropped: int = 0  # bad entries deleted
    entries: int = 0
    bytes: int = 0


class DiskPromptCache:
    """The disk tier of one engine (see the module docstring). Thread use: `nearest` and `offer` on the
    generation thread, `stats` from any thread, the writer on its own thread.

    root: the cache directory (`prompt_cache_dir`); budget_bytes: `prompt_cache_disk_bytes` (> 0);
    identity: model, revision, weights_dtype, kv_bits, group_size (strings), the key every entry carries.
    """

    def __init__(self, root: Path, budget_bytes: int, identity: Mapping[str, str]):
        self.root = Path(root)
        self.identity = {key: str(value) for key, value in identity.items()}
        self.directory = self.root / namespace_of(self.identity)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.mkdir(exist_ok=True, mode=0o700)
        held = sum(entry.size for entry in scan(self.root))
        try:
            stat = os.statvfs(self.directory)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = budget_bytes
        self.budget = min(budget_bytes, int(BUDGET_FREE_FRACTION * (free + held)))
        if self.budget < budget_bytes:
            log.info(
                "prompt cache on disk: budget %d bytes (setting %d, capped to half of the free space)",
                self.budget,
                budget_bytes,
            )
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one directory re-read at a time (generation thread, writer)
        self._index: dict[str, _Indexed] = {}
        self._index_stamp: int | None = None
        self._counters = _Counters()
        self._paused_until = 0.0
        self._queue: queue.Queue[tuple[list[int], list[tuple[str, Any]]] | None] = queue.Queue(WRITE_QUEUE_ENTRIES)
        self._writer = threading.Thread(target=self._write_loop, name="macprovider-kv-writer", daemon=True)
        self._writer.start()
        self._update_totals()
        log.info(
            "prompt cache on disk: %s (%d entries, %d bytes, budget %d bytes)",
            self.directory,
            self._counters.entries,
            self._counters.bytes,
            self.budget,
        )

    # -- stats --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """Entries and bytes of the whole directory (as of the last write or scan), hits, misses, seconds spent
        loading, entries written, write errors and bad entries dropped, all since this process started."""
        with self._lock:
            c = self._counters
            return {
                "entries": c.entries,
                "bytes": c.bytes,
                "hits": c.hits,
                "misses": c.misses,
                "load_seconds": round(c.load_seconds, 6),
                "writes": c.writes,
                "write_errors": c.write_errors,
                "dropped": c.dropped,
            }

    def _update_totals(self) -> None:
        entries = list(scan(self.root))
        with self._lock:
            self._counters.entries = len(entries)
            self._counters.bytes = sum(entry.size for entry in entries)

    # -- lookup (generation thread) -----------------------------------------------------------------
    def nearest(self, prompt: Sequence[int], cache: list[Any] | None, rest: Sequence[int]) -> tuple[Any, Sequence[int]]:
        """The better of the memory tier's answer (`cache`, `rest`: KV of the prompt's first
        len(prompt) − len(rest) tokens, and the tokens still to prefill) and the longest disk entry sharing a
        prefix with `prompt`. At most len(prompt) − 1 tokens come from disk (the last is recomputed for its
        logits). A bad entry is deleted and logged, and the memory answer returned."""
        import numpy as np

        have = len(prompt) - len(rest) if cache is not None else 0
        limit = len(prompt) - 1
        if limit - have < DISK_MIN_TOKENS:
            return cache, rest
        self._refresh_index()
        wanted = np.asarray(prompt, dtype=np.int32)
        best: tuple[int, str, _Indexed] | None = None
        with self._lock:
            candidates = list(self._index.items())
        for name, entry in candidates:
            n = min(len(entry.tokens), len(wanted))
            same = entry.tokens[:n] == wanted[:n]
            common = n if bool(same.all()) else int(np.argmin(same))
            usable = min(common, limit)
            if usable - have >= DISK_MIN_TOKENS and (best is None or usable > best[0]):
                best = (usable, name, entry)
        if best is None:
            with self._lock:
                self._counters.misses += 1
            return cache, rest
        usable, name, entry = best
        started = time.perf_counter()
        try:
            loaded = self._load(entry, wanted[:usable])
        except FileNotFoundError:  # evicted by another process since the index was read
            self._forget(name)
            with self._lock:
                self._counters.misses += 1
            return cache, rest
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is dropped; the request must go on
            log.warning("prompt cache on disk: dropping bad entry %s: %s", entry.path.name, _describe(exc))
            self._drop(name, entry.path)
            with self._lock:
                self._counters.misses += 1
            return cache, rest
        for layer in loaded:  # keep the shared prefix only
            layer.trim(layer.offset - usable)
        try:
            os.utime(entry.path)  # least-recently-used order is file mtime, shared by every process
        except OSError:
            pass
        elapsed = time.perf_counter() - started
        with self._lock:
            self._counters.hits += 1
            self._counters.load_seconds += elapsed
        log.debug("prompt cache on disk: hit %d of %d tokens in %.3f s", usable, len(prompt), elapsed)
        return loaded, list(prompt[usable:])

    def _load(self, entry: _Indexed, prefix: Any) -> list[Any]:
        """Read, verify and rebuild one entry's per-layer caches. Raises BadEntry / OSError / MLX errors."""
        import mlx.core as mx
        import numpy as np
        import xxhash
        from mlx.utils import tree_unflatten

        header, _ = read_header(entry.path)
        metadata = header["__metadata__"]
        if metadata.get("format") != FORMAT or any(metadata.get(k) != v for k, v in self.identity.items()):
            raise BadEntry("identity does not match this model")
        order = sorted((key for key in header if key != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        arrays: dict[str, Any] = mx.load(str(entry.path))  # type: ignore[assignment]
        if set(arrays) != set(order):
            raise BadEntry("tensors do not match the header")
        mx.eval(list(arrays.values()))
        digest = xxhash.xxh3_128()
        for key in order:
            digest.update(memoryview(arrays[key]).cast("B"))
        if digest.hexdigest() != metadata.get("checksum"):
            raise BadEntry("checksum mismatch (corrupted)")
        tokens = np.asarray(arrays["tokens"]).astype(np.int32)
        if len(tokens) < len(prefix) or not bool((tokens[: len(prefix)] == prefix).all()):
            raise BadEntry("tokens do not match the index")
        layers = json.loads(metadata["layers"])
        classes = _layer_classes()
        caches = []
        for index, layer in enumerate(layers):
            flat = [(key[len(f"{index}.") :], value) for key, value in arrays.items() if key.startswith(f"{index}.")]
            flat += [(key, value) for key, value in layer["scalars"].items()]
            state = tree_unflatten(flat)
            cache = classes[layer["class"]].from_state(tuple(state) if isinstance(state, list) else state)
            if cache.offset != len(tokens):
                raise BadEntry("a layer does not hold exactly the entry's tokens")
            caches.append(cache)
        return caches

    def _refresh_index(self) -> None:
        """Bring the index in line with the directory (another process may have written or evicted)."""
        with self._refresh_lock:
            self._refresh_index_locked()

    def _refresh_index_locked(self) -> None:
        try:
            stamp = os.stat(self.directory).st_mtime_ns
        except OSError:
            return
        if stamp == self._index_stamp:
            return
        try:
            names = {entry.name for entry in os.scandir(self.directory) if _ENTRY.fullmatch(entry.name)}
        except OSError:
            return
        with self._lock:
            known = set(self._index)
            for name in known - names:
                del self._index[name]
        for name in names - known:
            path = self.directory / name
            try:
                tokens, metadata = read_tokens(path)
                if any(metadata.get(k) != v for k, v in self.identity.items()):
                    raise BadEntry("identity does not match its directory")
            except FileNotFoundError:
                continue
            except (OSError, BadEntry, ValueError, KeyError, TypeError) as exc:
                log.warning("prompt cache on disk: dropping bad entry %s: %s", name, _describe(exc))
                self._drop(name, path)
                continue
            self._remember(name, tokens, path)
        self._index_stamp = stamp

    def _remember(self, name: str, tokens: Sequence[int], path: Path) -> None:
        import numpy as np

        with self._lock:
            self._index[name] = _Indexed(np.asarray(tokens, dtype=np.int32), path)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._index.pop(name, None)

    def _drop(self, name: str, path: Path) -> None:
        self._forget(name)
        try:
            os.unlink(path)
        except OSError:
            pass
        with self._lock:
            self._counters.dropped += 1
        self._update_totals()

    # -- writing ------------------------------------------------------------------------------------
    def offer(self, tokens: Sequence[int], cache: Sequence[Any]) -> None:
        """Queue a finished sequence's KV (`cache`: per-layer caches, evaluated; `tokens`: the ids it covers)
        for writing. Never blocks: a full queue, a short entry or an unsupported layer kind is skipped."""
        if len(tokens) < DISK_MIN_TOKENS or time.monotonic() < self._paused_until or not cache:
            return
        classes = _layer_classes()
        if any(type(layer).__name__ not in classes for layer in cache):
            return
        held = min(int(layer.offset) for layer in cache)  # the tokens whose KV every layer holds
        if held > len(tokens) or held < DISK_MIN_TOKENS:
            return
        tokens = tokens[:held]
        layers = [(type(layer).__name__, layer.state) for layer in cache]
        try:
            self._queue.put_nowait((list(tokens), layers))
        except queue.Full:
            log.debug("prompt cache on disk: writer busy, entry of %d tokens not written", len(tokens))

    def flush(self, timeout: float) -> None:
        """Let the writer finish what is queued (up to `timeout` seconds), then stop it. Idempotent."""
        if not self._writer.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._writer.join(timeout)

    def wait_written(self) -> None:
        """Block until every entry queued so far has been written (or skipped). For tests and benchmarks."""
        self._queue.join()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one entry
                log.warning("prompt cache on disk: could not write an entry: %s", _describe(exc))
                with self._lock:
                    self._counters.write_errors += 1
            finally:
                self._queue.task_done()

    def _write(self, tokens: list[int], layers: list[tuple[str, Any]]) -> None:
        import mlx.core as mx
        import numpy as np
        from mlx.utils import tree_flatten

        if time.monotonic() < self._paused_until:
            return
        name = tokens_name(tokens)
        path = self.directory / name
        self._refresh_index()
        wanted = np.asarray(tokens, dtype=np.int32)
        with self._lock:
            entries = list(self._index.items())
        for _name, other in entries:  # an entry at least this long with these tokens first covers it
            if len(other.tokens) >= len(wanted) and bool((other.tokens[: len(wanted)] == wanted).all()):
                try:
                    os.utime(other.path)
                except OSError:
                    pass
                return
        tensors: dict[str, Any] = {"tokens": mx.array(wanted)}
        described = []
        for index, (kind, state) in enumerate(layers):
            scalars: dict[str, Any] = {}
            for key, value in tree_flatten(state):
                if hasattr(value, "dtype"):
                    tensors[f"{index}.{key}"] = value
                else:
                    scalars[key] = value
            described.append({"class": kind, "scalars": scalars})
        metadata = dict(
            self.identity,
            format=FORMAT,
            n_tokens=str(len(tokens)),
            layers=json.dumps(described),
            created=str(int(time.time())),
        )
        size = 8 + sum(memoryview(v).nbytes for v in tensors.values()) + 4096  # header: a few KB at most
        if size > self.budget:
            return
        self._evict(room=size)
        temporary = self.directory / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        try:
            _write_entry(temporary, tensors, metadata)
            os.replace(temporary, path)
        except OSError as exc:
            _unlink(temporary)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._paused_until = time.monotonic() + FULL_DISK_PAUSE_S
                log.warning(
                    "prompt cache on disk: %s is full; keeping prompts in memory only for %g s",
                    self.directory,
                    FULL_DISK_PAUSE_S,
                )
                with self._lock:
                    self._counters.write_errors += 1
                return
            raise
        _fsync_dir(self.directory)
        self._remember(name, tokens, path)
        # Shorter entries this one extends are redundant: trimming this one serves their prompts.
        for other_name, other in entries:
            if (
                other_name != name
                and len(other.tokens) < len(wanted)
                and bool((wanted[: len(other.tokens)] == other.tokens).all())
            ):
                self._forget(other_name)
                _unlink(other.path)
        with self._lock:
            self._counters.writes += 1
        self._update_totals()

    def _evict(self, room: int) -> None:
        """Delete the least recently used files of the whole directory until `room` more bytes fit the budget;
        also temporary files older than STALE_TMP_S (left by a crash)."""
        now = time.time()
        for namespace in _subdirs(self.root):
            for file in _files(namespace):
                if _TEMPORARY.fullmatch(file.name):
                    try:
                        if now - file.stat().st_mtime > STALE_TMP_S:
                            os.unlink(file.path)
                    except OSError:
                        pass
        entries = sorted(scan(self.root), key=lambda entry: entry.last_used)
        total = sum(entry.size for entry in entries)
        for entry in entries:
            if total + room <= self.budget:
                break
            _unlink(entry.path)
            total -= entry.size
            if entry.path.parent == self.directory:
                self._forget(entry.path.name)


def _subdirs(root: Path) -> list[str]:
    """The namespace directories under `root` (names this module makes only)."""
    try:
        return [
            entry.path
            for entry in os.scandir(root)
            if _NAMESPACE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
    except OSError:
        return []


def _files(directory: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(directory))
    except OSError:
        return []


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _layer_classes() -> dict[str, Any]:
    """The cache classes an entry may hold, by the class name stored in it."""
    from mlx_lm.models.cache import KVCache

    from macprovider.engine.kvcache import QuantizedKVCache

    return {"KVCache": KVCache, "QuantizedKVCache": QuantizedKVCache}


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}"[:300] if text else exc.__class__.__name__


def open_disk_cache(root: str | Path | None, budget_bytes: int, identity: Mapping[str, str]) -> DiskPromptCache | None:
    """The disk tier for an engine, or None when `budget_bytes` is 0 or the directory cannot be created (logged).
    `root` None means the default directory (`config.Paths.prompt_cache_dir`)."""
    if budget_bytes <= 0:
        return None
    if root is None:
        from macprovider.core.config import Paths

        root = Paths.from_env().prompt_cache_dir
    try:
        return DiskPromptCache(Path(root).expanduser(), budget_bytes, identity)
    except OSError as exc:
        log.warning("prompt cache on disk is off: cannot use %s: %s", root, _describe(exc))
        return None
