"""`macprovider autotune`: biggest feasible model, then the best knobs for it (SPEC.md §5)."""

from __future__ import annotations

from macprovider.commands.common import fail


def autotune() -> None:
    """Find the biggest model this machine can serve at the target context, then tune its knobs."""
    raise fail("autotune is not implemented yet", 2)
