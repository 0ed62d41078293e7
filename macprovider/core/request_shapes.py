"""Request shapes: the content-free record `serve` keeps and `autotune --workload` replays
(docs/autotune.md#objectives-and-workloads).

One shape per finished completion request, one JSON object per line of `workload.jsonl` in the config
directory (`~/.config/macprovider/workload.jsonl`), never any text of a prompt or an answer:

    {"v": 1, "ts": <unix seconds, int>, "endpoint": "chat" | "completions", "prompt_tokens": <int >= 1>,
     "cached_tokens": <int >= 0, prompt tokens whose KV was reused>, "max_tokens": <int >= 1 | null>,
     "completion_tokens": <int >= 0>, "concurrency": <int >= 1, requests in flight at its arrival, itself included>}

Writers (serve/workload.py) keep the file bounded to the newest RECORD_LIMIT shapes. A `--workload FILE` is
JSONL of these objects or one JSON array of them; only `prompt_tokens` is required (the others default to
cached 0, max_tokens null, concurrency 1). Both serve and autotune import this module; it imports nothing of
theirs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
RECORD_LIMIT = 1000  # newest shapes kept in workload.jsonl
WORKLOAD_FILE_NAME = "workload.jsonl"


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the file and the line or field."""


@dataclass(frozen=True)
class RequestShape:
    """One request's shape (module docstring): token counts and concurrency, no content."""

    prompt_tokens: int
    cached_tokens: int = 0
    max_tokens: int | None = None
    concurrency: int = 1
    completion_tokens: int | None = None
    endpoint: str = "chat"
    ts: int | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSONL object (with the format version `v`)."""
        return {"v": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_record(cls, obj: Any, where: str) -> RequestShape:
        """Validate one JSON object. Raises WorkloadError naming `where` and the field."""
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: a request shape must be a JSON object")

        def count(name: str, low: int, default: Any = None, required: bool = False) -> Any:
            value = obj.get(name, default)
            if value is None and not required:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise WorkloadError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
            return value

        prompt = count("prompt_tokens", 1, required=True)
        cached = count("cached_tokens", 0, 0)
        if cached >= prompt:
            cached = prompt - 1  # at least one prompt token is always computed
        endpoint = obj.get("endpoint", "chat")
        return cls(
            prompt_tokens=prompt,
            cached_tokens=cached,
            max_tokens=count("max_tokens", 1),
            concurrency=count("concurrency", 1, 1),
            completion_tokens=count("completion_tokens", 0),
            endpoint=endpoint if endpoint in ("chat", "completions") else "chat",
            ts=count("ts", 0),
        )


def parse_shapes(text: str, name: str) -> list[RequestShape]:
    """Shapes from JSONL text or one JSON array. Raises WorkloadError (names `name` and the line)."""
    stripped = text.strip()
    if not stripped:
        raise WorkloadError(f"{name}: no request shapes")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as exc:  # JSONDecodeError, or a plain ValueError (e.g. an integer over the digit limit)
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise WorkloadError(f"{name}: not valid JSON ({detail})") from None
        return [RequestShape.from_record(obj, f"{name} item {i}") for i, obj in enumerate(items, start=1)]
    shapes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise WorkloadError(f"{name} line {number}: not valid JSON") from None
        shapes.append(RequestShape.from_record(obj, f"{name} line {number}"))
    if not shapes:
        raise WorkloadError(f"{name}: no request shapes")
    return shapes


def load_shapes(path: Path) -> list[RequestShape]:
    """Read a workload file (JSONL or JSON array). Raises WorkloadError when unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    return parse_shapes(text, str(path))


def shapes_jsonl(shapes: Iterable[RequestShape]) -> str:
    """JSONL text of `shapes` (one record per line, trailing newline)."""
    return "".join(json.dumps(s.to_record(), separators=(",", ":")) + "\n" for s in shapes)
