"""macprovider: a local OpenAI-compatible inference provider on MLX.

`__version__` is the `binary_version` of autotune reports and of the recipe hash (docs/autotune.md#report).
This module has no side effects and imports nothing heavy.
"""

__version__ = "0.1.0"
