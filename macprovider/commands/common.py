"""Helpers shared by the command modules: error reporting and exit codes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from macprovider.core.errors import MacproviderError


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `macprovider: <message>` on stderr and return the Exit to raise with `code`."""
    print(f"macprovider: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a MacproviderError into its one-line message and exit code; never a traceback."""
    try:
        yield
    except MacproviderError as exc:
        raise fail(str(exc), exc.exit_code) from None
