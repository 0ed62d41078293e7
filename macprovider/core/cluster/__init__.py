"""Several machines serving one model (docs/several-machines.md), MLX-free: what `serve --parallel`,
`cluster` and `autotune --hostfile` share.

    parallel.py    how a model splits over ranks: split checks, layers per rank, the mlx.launch command
    hosts.py       a hostfile's hosts: parsing, probing each (ssh), which split fits their memory budgets

Nothing here imports mlx.core or the engine: autotune (which may import neither) plans with it too.
"""
