"""The package layout keeps its dependency directions (docs/architecture.md#import-contracts).

The contracts live in pyproject.toml (`[tool.importlinter]`): cli -> commands -> serve | autotune ->
service -> engine -> cluster -> models; serve never imports the engine's MLX modules; autotune never imports the
engine or MLX; no import cycles between sibling modules. The run-time checks below prove what the static
graph cannot: the HTTP side serves a request, tools and a JSON schema included, without loading MLX, and
the CLI's help loads none of the heavy libraries.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mlx", "mlx_lm")


def test_import_contracts_hold():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_a_broken_direction_is_caught(tmp_path):
    """The checker can fail: a copy of the package where serve imports the engine breaks a contract."""
    import shutil

    shutil.copytree(REPO / "macprovider", tmp_path / "macprovider", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    app = tmp_path / "macprovider" / "serve" / "app.py"
    app.write_text(
        app.read_text() + "\n\ndef _bad():\n    from macprovider.engine.engine import Engine  # noqa: F401\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert "macprovider.serve.app -> macprovider.engine.engine" in result.stdout, result.stdout


def test_serving_http_loads_no_mlx():
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        import httpx
        from fake_engine import FakeEngine, chat_body, serving
        engine = FakeEngine()
        body = chat_body(engine, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
        with serving(engine) as served, served.http() as http:
            reply = http.post("/v1/chat/completions", json=body)
        print("STATUS", reply.status_code)
        print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
        """
    )
    code = f"HEAVY = {HEAVY!r}\n" + code
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "STATUS 200" in result.stdout, result.stdout + result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_cli_help_loads_no_heavy_library():
    code = textwrap.dedent(
        """
        import sys
        from macprovider.cli import main
        sys.argv = ["macprovider", "--help"]
        try:
            main()
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "fastapi", "uvicorn", "transformers")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "serve" in result.stdout and "autotune" in result.stdout
