"""The shared core, MLX-free: what every layer may use (the bottom of the layers contract in pyproject.toml).

config.py          settings: one resolver (CLI > environment > YAML > default) that records each value's source
errors.py          the error tree: exit codes and, for HTTP, status/type/code
hardware.py        machine facts (RAM, chip, memory budget) and the GIB/MIB constants
files.py           write_atomic: the one atomic file writer (temp file, fsync, rename, fsync the dir)
processes.py       child lifetimes (Linux parent-death signal)
request_shapes.py  request shapes (content-free): what serve records and autotune replays
cluster/           several machines: hostfiles (hosts.py) and split planning, the mlx.launch command (parallel.py)
"""
