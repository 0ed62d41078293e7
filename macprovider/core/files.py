"""Writing a file so a reader sees the old bytes or the new ones, never half of them, and no temp file stays.

write_atomic    temp file in the same directory, fsync, rename over the target, fsync the directory
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically: a dot-named temp file in the same directory, fsync, `chmod` to
    `mode` (when given; else mkstemp's 0o600), rename over `path`, fsync the directory. On any error
    (a full disk, an interrupt) the temp file is removed, `path` keeps its old bytes and the error is raised."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync `directory` so a rename inside it survives a crash (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
