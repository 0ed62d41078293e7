"""docs/configuration.md's settings table matches `macprovider.core.config` (`Settings` and `SETTINGS`).

Every setting must have a row; each row's YAML key, environment variable, `serve` flag and default must be
the code's. Adding a setting without documenting it fails here, naming the setting.
"""

from __future__ import annotations

import re
from pathlib import Path

from macprovider.core.config import SETTINGS, Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
NO_FLAG = "—"


def settings_rows() -> dict[str, list[str]]:
    """The rows of the table under '## Settings', keyed by the YAML key: [key, env, flag, default, ...]."""
    section = DOC.read_text(encoding="utf-8").split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def first_code(cell: str) -> str:
    """The first `code` span of a cell, or the cell itself (e.g. "—")."""
    match = re.search(r"`([^`]*)`", cell)
    return match.group(1) if match else cell


def rendered_default(value: object) -> str:
    """A default as the table writes it: None → unset, booleans lower-case, a tuple as a list."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def test_every_setting_has_a_row():
    rows = settings_rows()
    missing = [spec.name for spec in SETTINGS if spec.name not in rows]
    assert not missing, f"settings missing from docs/configuration.md's table: {missing}"


def test_every_row_is_a_setting():
    names = {spec.name for spec in SETTINGS}
    unknown = [name for name in settings_rows() if name not in names]
    assert not unknown, f"docs/configuration.md documents settings the code does not have: {unknown}"


def test_rows_match_the_code():
    rows = settings_rows()
    wrong = []
    for spec in SETTINGS:
        cells = rows.get(spec.name)
        if cells is None:
            continue
        expected = {
            "environment variable": spec.env or NO_FLAG,
            "serve flag": spec.cli_flag or NO_FLAG,
            "default": rendered_default(Settings.model_fields[spec.name].default),
        }
        found = {
            "environment variable": first_code(cells[1]),
            "serve flag": first_code(cells[2]),
            "default": first_code(cells[3]),
        }
        for column, value in expected.items():
            if found[column] != value:
                wrong.append(f"{spec.name}: {column} is {found[column]!r} in the doc, {value!r} in the code")
    assert not wrong, "docs/configuration.md differs from macprovider/core/config.py:\n" + "\n".join(wrong)


def test_the_check_can_fail():
    """A setting renamed in the code would be reported by name."""
    rows = settings_rows()
    assert "model" in rows and first_code(rows["model"][1]) == "MACPROVIDER_MODEL"
    assert rendered_default(None) == "unset" and rendered_default(()) == "[]" and rendered_default(True) == "true"
