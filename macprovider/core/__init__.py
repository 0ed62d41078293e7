"""The shared core's standalone helpers (no macprovider imports: every layer may use them).

files.py           write_atomic: the one atomic file writer (temp file, fsync, rename, fsync the dir)
processes.py       child lifetimes (Linux parent-death signal)
request_shapes.py  request shapes (content-free): what serve records and autotune replays
"""
