"""A quantized KV cache that can join a continuous batch.

mlx-lm 0.32 batches sequences through `BatchKVCache` (mlx_lm/models/cache.py), whose interface —
`merge`, `extend`, `filter`, `extract`, `prepare`/`finalize` for padding, `make_mask` — lets
`BatchGenerator` add and remove sequences while the batch runs. Its `QuantizedKVCache` has no `merge`, so
mlx-lm's server turns batching off under `--kv-bits`. `BatchQuantizedKVCache` follows `BatchKVCache` line
for line, but stores keys and values as `mx.quantize` triples (packed uint32, scales, biases; group size
64 by default) from the first token. Because it has `bits` and `group_size` attributes, mlx-lm's attention
(`models/base.py: scaled_dot_product_attention`) routes it to `quantized_scaled_dot_product_attention`,
unchanged. `QuantizedKVCache` here is mlx-lm's single-sequence cache plus a `merge` into the batch cache,
so prefix-cache entries and freshly made caches enter a batch the same way full-precision ones do.

Layout: each of `keys`/`values` is a tuple of three arrays with shapes
    packed (B, H, L, D * bits / 32) uint32, scales (B, H, L, D / group_size), biases (same),
L growing in steps of 256 tokens. Sequences are left-padded: `left_padding[b]` leading slots of row b are
masked out, `offset[b]` is its real length (`_idx − left_padding[b]`).
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, KVCache, _BaseCache, dynamic_roll
from mlx_lm.models.cache import QuantizedKVCache as _MlxQuantizedKVCache

QuantTriple = tuple[mx.array, mx.array, mx.array]


class QuantizedKVCache(_MlxQuantizedKVCache):
    """mlx-lm's single-sequence quantized cache, able to `merge` into a `BatchQuantizedKVCache`."""

    def size(self) -> int:
        return self.offset

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


def _empty_triple(batch: int, heads: int, length: int, dim: int, bits: int, group_size: int, dtype) -> QuantTriple:
    per_int = 32 // bits
    return (
        mx.zeros((batch, heads, length, dim // per_int), dtype=mx.uint32),
        mx.zeros((batch, heads, length, dim // group_size), dtype=dtype),
        mx.zeros((batch, heads, length, dim // group_size), dtype=dtype),
    )


def _join(a: QuantTriple, b: QuantTriple, axis: int = 0) -> QuantTriple:
    """`a` and `b` concatenated part by part (packed, scales, biases) along `axis`."""
    return (
        mx.concatenate([a[0], b[0]], axis=axis),
        mx.concatenate([a[1], b[1]], axis=axis),
        mx.concatenate([a[2], b[2]], axis=axis),
    )


def _head_dim(triple: QuantTriple, bits: int) -> int:
    return triple[0].shape[-1] * (32 // bits)


class BatchQuantizedKVCache(_BaseCache):
    """Batched, left-padded KV cache holding `mx.quantize`d keys and values (see module docstring).

    left_padding: one int per sequence (tokens of padding before it). group_size/bits: as `mx.quantize`
    (bits 4 or 8; the head dimension must be a multiple of group_size).
    """

    step = 256

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8):
        self.keys: QuantTriple | None = None
        self.values: QuantTriple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-pad for pad in left_padding])
        self._idx = 0
        self._right_padding = None
        self.group_size = group_size
        self.bits = bits

    # -- growth ---------------------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Quantize and append `keys`/`values` of shape (B, H, N, D); return all cached triples."""
        batch, heads, steps, k_dim = keys.shape
        v_dim = values.shape[-1]
        prev = self._idx
        if self.keys is None or prev + steps > self.keys[0].shape[2]:
            new_len = (self.step + steps - 1) // self.step * self.step
            new_k = _empty_triple(batch, heads, new_len, k_dim, self.bits, self.group_size, keys.dtype)
            new_v = _empty_triple(batch, heads, new_len, v_dim, self.bits, self.group_size, keys.dtype)
            if self.keys is not None:
                if prev % self.step != 0:
                    self.keys, self.values = tree_map(lambda x: x[..., :prev, :], (self.keys, self.values))
                assert self.values is not None  # keys and values are always set together
                self.keys = _join(self.keys, new_k, axis=2)
                self.values = _join(self.values, new_v, axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset = self.offset + steps
        self._idx += steps
        q_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        q_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        stored_k, stored_v = self.keys, self.values
        assert stored_k is not None and stored_v is not None  # allocated above
        for i in range(3):
            stored_k[i][..., prev : self._idx, :] = q_keys[i]
            stored_v[i][..., prev : self._idx, :] = q_values[i]
        return self.keys_and_values()

    def keys_and_values(self):
        return tree_map(lambda x: x[..., : self._idx, :], (self.keys, self.values))

    # -- padding (same protocol as mlx-lm's BatchKVCache) ---------------------------------------------
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty BatchQuantizedKVCache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        """Turn right padding (from a ragged prefill) into left padding by rolling each row."""
        if self._right_padding is not None:
            padding = self._right_padding
            roll = lambda x: dynamic_roll(x, padding[:, None], axis=2)  # noqa: E731
            self.keys = tuple(roll(x) for x in self.keys)
            self.values = tuple(roll(x) for x in self.values)
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    # -- state ----------------------------------------------------------------------------------------
    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.group_size, self.bits)))

    @meta_state.setter
    def meta_state(self, v):
        self.group_size, self.bits = map(int, v)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return tree_reduce(lambda total, x: total + x.nbytes, (self.keys, self.values), 0)

    # -- batch membership -----------------------------------------------------------------------------
    def filter(self, batch_indices):
        """Keep only the rows `batch_indices` (in that order); drop padding no row needs any more."""
        if self.keys is not None:
            self.keys = tuple(x[batch_indices] for x in self.keys)
            self.values = tuple(x[batch_indices] for x in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist()) if self.left_padding.size else 0
        if min_left_pad > 0:
            if self.keys is not None:
                self.keys = tuple(x[..., min_left_pad:, :] for x in self.keys)
                self.values = tuple(x[..., min_left_pad:, :] for x in self.values)
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other: BatchQuantizedKVCache):
        """Append the rows of `other`, right-justifying both to the longer history."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        reference = self if self.keys is not None else other
        ref_keys, ref_values = reference.keys, reference.values
        assert ref_keys is not None and ref_values is not None  # one side has history (checked above)
        heads = ref_keys[0].shape[1]
        k_dim = _head_dim(ref_keys, self.bits)
        v_dim = _head_dim(ref_values, self.bits)
        dtype = ref_keys[1].dtype
        max_idx = max(self._idx, other._idx)
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(cache):
            keys, values = cache.keys, cache.values
            if keys is None:
                rows = cache.offset.shape[0]
                keys = _empty_triple(rows, heads, 0, k_dim, self.bits, self.group_size, dtype)
                values = _empty_triple(rows, heads, 0, v_dim, self.bits, self.group_size, dtype)
            left = max_idx - cache._idx
            right = max_size - keys[0].shape[2] - left
            if right < 0:
                keys, values = tree_map(lambda x: x[..., :right, :], (keys, values))
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                keys, values = tree_map(lambda x: mx.pad(x, widths), (keys, values))
            return keys, values, cache.offset, cache.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
        self.keys = _join(k1, k2)
        self.values = _join(v1, v2)
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int) -> QuantizedKVCache:
        """Row `idx` as a single-sequence `QuantizedKVCache` (padding removed, contiguous copy)."""
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        padding = cast(list[int], self.left_padding.tolist())[idx]  # a 1-D array: a list of ints
        if self.keys is not None:
            assert self.values is not None  # keys and values are always set together
            cut = lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx])  # noqa: E731
            cache.keys = tuple(cut(x) for x in self.keys)
            cache.values = tuple(cut(x) for x in self.values)
            cache.offset = cache.keys[0].shape[2]
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        """Left-pad single-sequence `QuantizedKVCache`s (possibly empty) into one batch cache."""
        group_size, bits = caches[0].group_size, caches[0].bits
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        max_length = max(lengths)
        if max_length == 0:
            return cls([0] * len(caches), group_size=group_size, bits=bits)
        padding = [max_length - length for length in lengths]
        first = next(c for c in caches if c.keys is not None)
        heads = first.keys[0].shape[1]
        k_dim = _head_dim(first.keys, bits)
        v_dim = _head_dim(first.values, bits)
        dtype = first.keys[1].dtype
        keys = _empty_triple(len(caches), heads, max_length, k_dim, bits, group_size, dtype)
        values = _empty_triple(len(caches), heads, max_length, v_dim, bits, group_size, dtype)
        for row, (pad, cache) in enumerate(zip(padding, caches)):
            if cache.keys is None:
                continue
            for i in range(3):
                keys[i][row : row + 1, :, pad : pad + cache.offset] = cache.keys[i][..., : cache.offset, :]
                values[i][row : row + 1, :, pad : pad + cache.offset] = cache.values[i][..., : cache.offset, :]
        cache = cls(padding, group_size=group_size, bits=bits)
        cache.keys, cache.values = keys, values
        cache.offset += max_length
        cache._idx = max_length
        return cache


def kv_group_size(head_dim: int, preferred: int = 64) -> int:
    """Group size for quantizing a head dimension: 64 (docs/api.md#engine-semantics) when it divides `head_dim`, else 32.

    Raises ValueError when neither divides it (mx.quantize needs the last axis divisible by the group).
    """
    for size in (preferred, 32):
        if head_dim % size == 0:
            return size
    raise ValueError(f"head dimension {head_dim} is not a multiple of 32: the KV cache cannot be quantized")


def make_cache_factory(model, kv_bits: int | None, group_size: int = 64):
    """A function returning a fresh per-layer cache list for one sequence.

    Full precision: mlx-lm's own `make_prompt_cache(model)`. With `kv_bits`: every plain `KVCache` layer
    becomes a `QuantizedKVCache` (other cache kinds, e.g. rotating windows, stay as the model makes them).
    """
    from mlx_lm.models.cache import make_prompt_cache

    if kv_bits is None:
        return lambda: make_prompt_cache(model)

    def factory():
        return [
            QuantizedKVCache(group_size=group_size, bits=kv_bits) if type(layer) is KVCache else layer
            for layer in make_prompt_cache(model)
        ]

    return factory


class RowTrimMixin:
    """Per-row rollback for a batch KV cache, for speculative decoding inside the batch (engine/speculative.py).

    A verification step writes W positions to every row; row b then keeps only some of them. `trim_rows`
    trims the batch by the smallest count (as `trim`) and marks each row's remaining rejected positions as
    holes: `holes` is a (B, n) NumPy bool array (True = that column is not part of row b's sequence; columns
    ≥ n are not holes), `offset[b]` (the row's length, its RoPE position) drops by the row's own count, and
    `make_mask` masks holes out of attention. Holes cost attention work, not correctness: when they waste
    enough columns, `compact` gathers every row's kept positions into the usual left-padded layout. With
    no holes (`holes is None`) every method is the base class's.

    Mixed into mlx-lm's `BatchKVCache` (`RowTrimBatchKVCache`) and `BatchQuantizedKVCache`
    (`RowTrimBatchQuantizedKVCache`); `row_trimmable` converts a batch cache layer.
    """

    holes: np.ndarray | None = None
    # Compact when it shortens the cache by at least this many columns and by an eighth of its length.
    COMPACT_MIN_COLUMNS = 64

    # Attributes of the batch cache this is mixed into (mlx-lm BatchKVCache / BatchQuantizedKVCache).
    keys: Any
    values: Any
    offset: mx.array
    left_padding: mx.array
    _idx: int

    def _holes_width(self, width: int) -> np.ndarray:
        """`holes` with exactly `width` columns (created all False, cut or padded with False)."""
        rows = int(self.left_padding.shape[0])
        holes = self.holes if self.holes is not None else np.zeros((rows, 0), dtype=bool)
        if holes.shape[1] >= width:
            return holes[:, :width]
        return np.concatenate([holes, np.zeros((rows, width - holes.shape[1]), dtype=bool)], axis=1)

    def trim(self, n: int) -> int:
        n = super().trim(n)  # type: ignore[misc]
        if self.holes is not None:
            self.holes = self.holes[:, : self._idx]
        return n

    def trim_rows(self, counts: Any) -> None:
        """Drop the last `counts[b]` positions of each row b (counts: B non-negative ints)."""
        counts = np.asarray(counts, dtype=np.int64)
        common = int(counts.min()) if counts.size else 0
        if common:
            self.trim(common)
        extra = counts - common
        if not extra.any():
            return
        holes = self._holes_width(self._idx).copy()
        for row in np.nonzero(extra)[0]:
            holes[row, self._idx - int(extra[row]) : self._idx] = True
        self.holes = holes
        self.offset = self.offset - mx.array(extra.astype(np.int32))
        self._maybe_compact()

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        mask = super().make_mask(N, return_array=return_array, **kwargs)  # type: ignore[misc]
        if self.holes is None or not self.holes.any():
            return mask
        keep = mx.array(~self._holes_width(self._idx + N))  # (B, idx + N)
        return mask & keep[:, None, None, :]

    def filter(self, batch_indices):
        holes = self.holes[batch_indices] if self.holes is not None else None
        shift = min(cast(list[int], self.left_padding[batch_indices].tolist()), default=0)
        super().filter(batch_indices)
        if holes is not None:
            holes = holes[:, max(shift, 0) :]
            self.holes = holes if holes.any() else None

    def extend(self, other):
        rows_mine, rows_theirs = int(self.left_padding.shape[0]), int(other.left_padding.shape[0])
        width = max(self._idx, other._idx)
        mine = _right_justified(self.holes, self._idx, width, rows_mine)
        theirs = _right_justified(getattr(other, "holes", None), other._idx, width, rows_theirs)
        super().extend(other)
        if mine is None and theirs is None:
            self.holes = None
            return
        mine = mine if mine is not None else np.zeros((rows_mine, width), dtype=bool)
        theirs = theirs if theirs is not None else np.zeros((rows_theirs, width), dtype=bool)
        self.holes = np.concatenate([mine, theirs], axis=0)

    def _kept_positions(self, row: int, left_padding: int) -> list[int]:
        kept = ~self._holes_width(self._idx)[row, left_padding:]
        return cast(list[int], (np.flatnonzero(kept) + left_padding).tolist())

    def extract(self, idx: int):
        if self.holes is None or not self.holes[idx].any():
            return super().extract(idx)  # type: ignore[misc]
        padding = cast(list[int], self.left_padding.tolist())[idx]
        positions = mx.array(self._kept_positions(idx, padding))
        cache = self._single_cache()
        take = lambda x: mx.contiguous(x[idx : idx + 1, :, positions])  # noqa: E731
        cache.keys = tree_map(take, self.keys)
        cache.values = tree_map(take, self.values)
        cache.offset = int(positions.shape[0])
        return cache

    def _single_cache(self) -> Any:
        raise NotImplementedError

    def _maybe_compact(self) -> None:
        if self.holes is None or self.keys is None:
            return
        # Runs after every verification step, in every layer: decide from counts (holes only ever lie after a
        # row's left padding), and list positions only to compact.
        padding = np.asarray(self.left_padding.tolist(), dtype=np.int64)
        length = int((self._idx - padding - self._holes_width(self._idx).sum(axis=1)).max())
        if self._idx - length < max(self.COMPACT_MIN_COLUMNS, self._idx // 8):
            return
        self.compact([self._kept_positions(row, int(pad)) for row, pad in enumerate(padding)], length)

    def compact(self, kept: list[list[int]], length: int) -> None:
        """Gather each row's `kept` positions into a left-padded layout `length` columns long (holes gone)."""
        index = np.zeros((len(kept), length), dtype=np.int32)
        for row, positions in enumerate(kept):
            if positions:
                index[row, length - len(positions) :] = positions
        gather = mx.array(index)[:, None, :, None]
        take = lambda x: mx.take_along_axis(x, gather, axis=2)  # noqa: E731
        self.keys = tree_map(take, self.keys)
        self.values = tree_map(take, self.values)
        self.left_padding = mx.array([length - len(positions) for positions in kept])
        self._idx = length
        self.holes = None


def _right_justified(holes: np.ndarray | None, idx: int, width: int, rows: int) -> np.ndarray | None:
    """`holes` of a cache whose history ends at column `idx`, shifted right to end at `width` (as `extend`
    right-justifies the keys), or None when it has none."""
    if holes is None or not holes.any():
        return None
    out = np.zeros((rows, width), dtype=bool)
    used = holes[:, :idx]
    out[:, width - idx : width - idx + used.shape[1]] = used
    return out


class RowTrimBatchKVCache(RowTrimMixin, BatchKVCache):
    """mlx-lm's `BatchKVCache` with per-row rollback (`RowTrimMixin`)."""

    def _single_cache(self) -> KVCache:
        return KVCache()


class RowTrimBatchQuantizedKVCache(RowTrimMixin, BatchQuantizedKVCache):
    """`BatchQuantizedKVCache` with per-row rollback (`RowTrimMixin`)."""

    def _single_cache(self) -> QuantizedKVCache:
        return QuantizedKVCache(group_size=self.group_size, bits=self.bits)


_ROW_TRIM = {BatchKVCache: RowTrimBatchKVCache, BatchQuantizedKVCache: RowTrimBatchQuantizedKVCache}


def row_trimmable(layer: Any) -> Any:
    """`layer` (a batch cache layer) as its `RowTrimMixin` class, sharing its arrays; None when the layer kind
    cannot roll back per row (rotating windows, SSM state, …). A layer already converted is returned as is."""
    if isinstance(layer, RowTrimMixin):
        return layer
    kind = _ROW_TRIM.get(type(layer))
    if kind is None:
        return None
    converted = kind.__new__(kind)
    converted.__dict__.update(layer.__dict__)
    converted.holes = None
    return converted
