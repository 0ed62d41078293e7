"""Machine facts: RAM, chip, OS version, the memory an MLX model may use.

Pure parsers (`parse_*`) take recorded command output so tests can feed macOS output on Linux; thin
collectors call the real commands. Nothing here imports MLX at module import time.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import psutil

GIB = 1024**3  # the byte units, defined once (config, models import them from here)
MIB = 1024**2
# Physical RAM minus this is the budget where MLX reports no recommended working set (Linux, CPU).
RAM_RESERVE_BYTES = 4 * GIB

Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout


def physical_ram_bytes() -> int:
    """Total physical memory in bytes (psutil)."""
    return int(psutil.virtual_memory().total)


def physical_ram_gb() -> int:
    """Total physical memory in GiB, rounded to the nearest integer (a 24 GiB Mac reports 24)."""
    return round(physical_ram_bytes() / GIB)


def parse_sysctl_brand(output: str) -> str:
    """`sysctl -n machdep.cpu.brand_string` output → chip name, e.g. 'Apple M2 Pro'."""
    return output.strip() or "unknown"


def parse_proc_cpuinfo(text: str) -> str:
    """/proc/cpuinfo → the first 'model name' value (x86) or 'Hardware'/'CPU part' fallbacks."""
    for key in ("model name", "Hardware", "Model"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.machine() or "unknown"


def chip_name(runner: Runner = _run, system: str | None = None) -> str:
    """The CPU/SoC name: sysctl on macOS, /proc/cpuinfo on Linux, `platform.processor()` otherwise."""
    system = system or platform.system()
    try:
        if system == "Darwin":
            return parse_sysctl_brand(runner(["sysctl", "-n", "machdep.cpu.brand_string"]))
        if system == "Linux":
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                return parse_proc_cpuinfo(handle.read())
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def os_version(system: str | None = None) -> str:
    """'macOS 15.1' on a Mac, else '<system> <release>'."""
    system = system or platform.system()
    if system == "Darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{system} {platform.release()}"


def mlx_recommended_working_set_bytes() -> int | None:
    """Metal's recommended working set (bytes) where MLX reports one, else None. Imports MLX."""
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        value = info.get("max_recommended_working_set_size")
        return int(value) if value else None
    except Exception:  # noqa: BLE001 - no Metal / no GPU backend: fall back to RAM
        return None


def memory_budget_bytes(recommended: int | None = None, ram_bytes: int | None = None) -> int:
    """Memory a model may use: Metal's recommended working set, else physical RAM minus a 4 GiB reserve."""
    if recommended:
        return recommended
    ram = physical_ram_bytes() if ram_bytes is None else ram_bytes
    return max(ram - RAM_RESERVE_BYTES, ram // 2)


@dataclass(frozen=True)
class MachineFacts:
    """What reports and the recipe hash record about the machine (the report's `machine`, docs/autotune.md#report)."""

    ram_gb: int
    chip: str
    os_version: str

    @classmethod
    def detect(cls) -> MachineFacts:
        return cls(physical_ram_gb(), chip_name(), os_version())
