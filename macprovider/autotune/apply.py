"""`autotune --apply`: rewrite the owned config keys, atomically, with a backup (docs/autotune.md#apply).

`render_config` is a pure line editor: it replaces the top-level lines of `model`, `kv_bits`,
`max_context_override`, `max_concurrency_override`, `speculative`, and (with `autotune --hostfile`) `parallel`
and `hostfile` (removing `kv_bits` when it is unset, `speculative` when it is off, `parallel`/`hostfile` for a
one-machine recipe), appends the missing ones, and leaves every other byte — keys, comments, blank lines,
order, line endings — as it was.
`apply_recommendation` writes it: refuse a symlink; back up the old file as
`config.yaml.bak-<unix-ts>-<counter>` (lowest free counter from 0, O_CREAT|O_EXCL, mode 0600); write a
temp file in the same directory, fsync, rename over the config, fsync the directory. A reader sees the old
file or the new one, never a partial one.

A config that lists a fleet (`models:`) gets the tuned model's entry instead (`render_fleet_entry`): its
knobs and `recipe_hash` are set on the entry with that id, or a new entry is appended; the other entries and
every line outside the `models:` block stay as they were (the block itself is re-rendered, so comments inside
it are not kept), and the top-level keys are left alone.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macprovider.core.errors import ApplyError
from macprovider.core.files import write_atomic

OWNED_KEYS = (
    "model",
    "kv_bits",
    "max_context_override",
    "max_concurrency_override",
    "speculative",
    "parallel",
    "hostfile",
)
_KEY_LINE = re.compile(r"^(" + "|".join(OWNED_KEYS) + r")[ \t]*:(?=\s|$)")
_PLAIN = re.compile(r"^[A-Za-z0-9_./~@+-]+$")
_YAML_SPECIAL = re.compile(r"^(?:true|false|yes|no|on|off|null|~|[-+]?[0-9.]+(?:e[-+]?[0-9]+)?)$", re.IGNORECASE)


def yaml_scalar(value: Any) -> str:
    """A YAML scalar for `value`: ints as-is, plain-safe strings bare, anything else double-quoted (JSON)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"unsupported value {value!r}")
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and not _YAML_SPECIAL.match(text) and not text.startswith(("-", "~", "@")):
        return text
    return json.dumps(text, ensure_ascii=False)


def owned_values(
    model: str,
    kv_bits: int | None,
    max_batch: int,
    max_context: int,
    parallel: str | None = None,
    hostfile: str | None = None,
    speculative: str = "off",
) -> dict[str, Any]:
    """The owned keys and their new values (None = remove the key: `kv_bits` unset; `speculative` off, serve's
    default; `parallel` and `hostfile` on a one-machine recipe, so `cluster serve` never starts a stale split)."""
    return {
        "model": model,
        "kv_bits": kv_bits,
        "max_context_override": max_context,
        "max_concurrency_override": max_batch,
        "speculative": None if speculative == "off" else speculative,
        "parallel": parallel,
        "hostfile": hostfile,
    }


_MODELS_LINE = re.compile(r"^models[ \t]*:")
FLEET_KNOBS = ("kv_bits", "max_context_override", "max_concurrency_override", "speculative")


def render_fleet_entry(text: str, values: dict[str, Any], recipe_hash: str | None = None) -> str | None:
    """The config text with the tuned model's `models:` entry written (module docstring), or None when the
    config lists no fleet (then `render_config` applies). `values` as `owned_values`."""
    import yaml

    try:
        parsed = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("models"), list):
        return None
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if any(line.endswith("\r\n") for line in lines) else "\n"
    start = next((i for i, line in enumerate(lines) if _MODELS_LINE.match(line)), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][:1] in (" ", "\t", "-")):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay where they are
        end -= 1
    entries = [dict(e) if isinstance(e, dict) else {"id": e} for e in parsed["models"]]
    entry = next((e for e in entries if e.get("id") == values["model"]), None)
    if entry is None:
        entry = {"id": values["model"]}
        entries.append(entry)
    for key in FLEET_KNOBS:
        if values.get(key) is None:
            entry.pop(key, None)
        else:
            entry[key] = values[key]
    if recipe_hash:
        entry["recipe_hash"] = recipe_hash
    block = yaml.safe_dump(entries, sort_keys=False, default_flow_style=False, allow_unicode=True)
    rendered = "models:" + newline + "".join(f"  {line}{newline}" for line in block.splitlines())
    head = "".join(lines[:start])
    tail = "".join(lines[end:])
    if head and not head.endswith(("\n", "\r")):
        head += newline
    return head + rendered + tail


def render_config(text: str, values: dict[str, Any]) -> str:
    """The config text with the owned keys set to `values`; every other line byte-identical.

    Only top-level (unindented) lines `key: ...` are owned. A key set to None is removed (every
    occurrence); a key that appears more than once keeps its first line, updated, and loses the rest.
    """
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if any(line.endswith("\r\n") for line in lines) else "\n"
    seen: set[str] = set()
    out: list[str] = []
    for line in lines:
        match = _KEY_LINE.match(line)
        if not match:
            out.append(line)
            continue
        key = match.group(1)
        value = values.get(key)
        if value is None or key in seen:
            continue
        seen.add(key)
        ending = line[len(line.rstrip("\r\n")) :] or newline
        out.append(f"{key}: {yaml_scalar(value)}{ending}")
    missing = [key for key in OWNED_KEYS if key not in seen and values.get(key) is not None]
    if missing and out and not out[-1].endswith(("\n", "\r")):
        out[-1] = out[-1] + newline
    for key in missing:
        out.append(f"{key}: {yaml_scalar(values[key])}{newline}")
    return "".join(out)


@dataclass(frozen=True)
class ApplyResult:
    """What `apply_recommendation` did: the backup path (None if there was no old file or no change)."""

    path: Path
    backup: Path | None
    changed: bool


def _backup(path: Path, data: bytes, now: float) -> Path:
    stamp = int(now)
    counter = 0
    while True:
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{counter}")
        try:
            fd = os.open(str(candidate), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            counter += 1
            continue
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            candidate.unlink(missing_ok=True)  # never leave a half-written backup (a full disk)
            raise
        os.close(fd)
        return candidate


def apply_recommendation(
    path: Path, values: dict[str, Any], *, now: float | None = None, recipe_hash: str | None = None
) -> ApplyResult:
    """Write `values` into the config at `path` atomically (see module docstring); into the tuned model's
    `models:` entry (with `recipe_hash`) when the config lists a fleet.

    Raises ApplyError for a symlink, an unreadable/undecodable file, invalid YAML after editing, or a
    failed write; the old config is then untouched.
    """
    import yaml

    path = Path(path)
    if path.is_symlink():
        raise ApplyError(f"refusing to --apply: config path {path} is a symlink; point --config at the real file")
    try:
        old_bytes = path.read_bytes() if path.exists() else None
        old_text = old_bytes.decode("utf-8") if old_bytes is not None else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ApplyError(f"cannot read config {path}: {exc.__class__.__name__}") from None
    fleet_text = render_fleet_entry(old_text, values, recipe_hash)
    if fleet_text is not None and (values.get("parallel") or values.get("hostfile")):
        raise ApplyError(
            f"config {path} lists a fleet (`models:`); a distributed recipe serves one model: it is unchanged"
        )
    new_text = render_config(old_text, values) if fleet_text is None else fleet_text
    try:
        parsed = yaml.safe_load(new_text) or {}
    except yaml.YAMLError:
        raise ApplyError(f"config {path} would not be valid YAML after --apply; it is unchanged") from None
    if fleet_text is not None:
        listed = [e for e in parsed.get("models", []) if isinstance(e, dict)]
        entry = next((e for e in listed if e.get("id") == values["model"]), None)
        wrong = entry is None or any(entry.get(k) != values.get(k) for k in FLEET_KNOBS)
    else:
        wrong = not isinstance(parsed, dict) or any(parsed.get(k) != v for k, v in values.items() if v is not None)
    if wrong:
        raise ApplyError(f"config {path} has a layout --apply cannot edit safely; it is unchanged")
    if old_bytes is not None and new_text.encode("utf-8") == old_bytes:
        return ApplyResult(path, None, False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backup = _backup(path, old_bytes, time.time() if now is None else now) if old_bytes is not None else None
        mode = (path.stat().st_mode & 0o777) if old_bytes is not None else 0o600
        write_atomic(path, new_text.encode("utf-8"), mode)
    except OSError as exc:
        raise ApplyError(f"cannot write config {path}: {exc.strerror or exc.__class__.__name__}") from None
    return ApplyResult(path, backup, True)


def summary_line(values: dict[str, Any], result: ApplyResult) -> str:
    """`applied: model=<id> kv_bits=<n|unset> max_concurrency_override=<n> max_context_override=<n>
    [speculative=<mode>] [parallel=<p> hostfile=<h>] (…)`."""
    kv = "unset" if values["kv_bits"] is None else values["kv_bits"]
    if result.backup is not None:
        tail = f"(backup at {result.backup})"
    elif result.changed:
        tail = "(new file, no backup)"
    else:
        tail = "(config already had this recipe; unchanged, no backup)"
    return (
        f"applied: model={values['model']} kv_bits={kv} "
        f"max_concurrency_override={values['max_concurrency_override']} "
        f"max_context_override={values['max_context_override']} "
        + (f"speculative={values['speculative']} " if values.get("speculative") else "")
        + (f"parallel={values['parallel']} hostfile={values['hostfile']} " if values.get("parallel") else "")
        + tail
    )
