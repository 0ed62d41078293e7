"""The rolling, content-free record of request shapes `autotune --workload recorded` replays (docs/autotune.md#objectives-and-workloads).

`WorkloadRecorder(path).track(handle, ...)` wraps an engine handle: when the request's final chunk arrives
it appends one `macprovider.core.request_shapes.RequestShape` (token counts, the cached prefix the engine reused,
max_tokens and the concurrency at arrival — never text) to `path`. Writes happen on one background thread
(a single-worker executor, so lines keep their order) and never on the event loop. The file holds at most
RECORD_LIMIT shapes: when it reaches twice that, the newest RECORD_LIMIT are rewritten to a temp file and
renamed over it. The file is created mode 0600 (usage patterns are the owner's business). A failing disk never fails a request: the recorder logs once and stops writing.
`record_workload: false` (MACPROVIDER_RECORD_WORKLOAD=0) turns it off: `track` returns the handle as is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from macprovider.core.files import write_atomic
from macprovider.core.request_shapes import RECORD_LIMIT, RequestShape, shapes_jsonl

log = logging.getLogger("macprovider.serve.workload")


class _TrackedHandle:
    """An engine handle that reports its final chunk's usage; everything else is the handle's own."""

    def __init__(self, handle: Any, on_final: Any) -> None:
        self._handle = handle
        self._on_final = on_final

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for chunk in self._handle:
            if chunk.finish_reason is not None and chunk.usage is not None:
                self._on_final(chunk)
            yield chunk


class WorkloadRecorder:
    """Appends request shapes to `path` off the event loop (module docstring). `limit`: shapes kept."""

    def __init__(self, path: Path, limit: int = RECORD_LIMIT) -> None:
        self.path = Path(path)
        self.limit = limit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="macprovider-workload")
        self._lines: int | None = None  # lines in the file, counted on the writer thread
        self._failed = False

    def track(self, handle: Any, *, endpoint: str, prompt_tokens: int, max_tokens: int | None, concurrency: int) -> Any:
        """Wrap `handle` so its shape is recorded when it finishes (error/cancel finishes are not recorded)."""

        def on_final(chunk: Any) -> None:
            if chunk.finish_reason in ("error", "cancelled"):
                return
            usage = chunk.usage
            shape = RequestShape(
                prompt_tokens=prompt_tokens,
                cached_tokens=min(int(getattr(usage, "cached_tokens", 0) or 0), max(prompt_tokens - 1, 0)),
                max_tokens=max_tokens,
                concurrency=concurrency,
                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                endpoint=endpoint,
                ts=int(time.time()),
            )
            self.submit(shape)

        return _TrackedHandle(handle, on_final)

    def submit(self, shape: RequestShape) -> None:
        """Queue one shape for the writer thread (returns at once)."""
        if not self._failed:
            self._executor.submit(self._append, shape)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued shape is written (tests, shutdown)."""
        self._executor.submit(lambda: None).result(timeout)

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        self._executor.shutdown(wait=True)

    # -- writer thread ----------------------------------------------------------------------------------
    def _append(self, shape: RequestShape) -> None:
        try:
            if self._lines is None:
                self._lines = _count_lines(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # the owner's only
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(shapes_jsonl([shape]))
            self._lines += 1
            if self._lines >= 2 * self.limit:
                self._lines = _keep_newest(self.path, self.limit)
        except OSError as exc:
            self._failed = True
            log.warning("workload record disabled: cannot write %s (%s)", self.path, exc.__class__.__name__)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _keep_newest(path: Path, limit: int) -> int:
    """Rewrite `path` with its newest `limit` lines (temp file + rename). Returns the lines kept."""
    lines = path.read_bytes().splitlines(keepends=True)[-limit:]
    write_atomic(path, b"".join(lines))
    return len(lines)
