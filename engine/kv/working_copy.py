"""Decode working copies: a contiguous K/V per layer for a decode batch, written back lazily.

A decode step through the pool writes each row's token with a scatter and gathers every row's
blocks again. A working copy is what mlx_lm's own batch cache is: per layer one `[B, H, cap, D]`
K and V with the rows *right-aligned* (left padding), so every step writes one column for all rows
with a slice update and attention reads a view `[:, :, :col]`; the mask hides each row's padding.
The copy is built by one gather when the batch changes (`Geometry`: rows, lengths, capacity),
grows at its end when full, and is then the only place decode tokens go: they are written back
to the rows' blocks (`flush`, one scatter per layer) before anything else may read them: the
batch changes, a prompt chunk runs (it may reuse a block that a row just filled), or a row
leaves (its blocks go to the prefix cache or back to the pool).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .kv_storage import row_index

_ids = itertools.count()


def capacity(cols: int, step: int) -> int:
    """Columns a working copy holds for `cols`: a multiple of `step`, or of an eighth of the power
    of two below `cols` when that is more. The compiled decode step reads whole copies, so the
    empty columns stay under ~1/8 of what it reads, and the distinct capacities (one trace
    each) grow with the log of the context."""
    grain = max(step, 1 << max(0, cols.bit_length() - 4))
    return -(-cols // grain) * grain


def visible(cols: mx.array, last, pad: mx.array, window_size: int | None) -> mx.array:
    """[B, 1, 1, C] bool for a decode step writing column `last` (an int, or an array inside a
    compiled step): row b sees columns `cols` from its padding `pad[b]` to `last` and, with a
    window, only the last `window_size` of them. The one rule both decode paths mask with."""
    cols = cols[None, :]
    seen = (cols >= pad[:, None]) & (cols <= last)
    if window_size is not None:
        seen = seen & (cols > last - window_size)
    return seen[:, None, None, :]


@dataclass
class Geometry:
    """Where a decode batch's tokens sit in its working copies (the same for every layer)."""

    ident: tuple  # the rows (their SeqBlocks, compared by identity)
    pad: np.ndarray  # [B] left padding: row b's position p is column pad[b] + p
    col: int  # columns written after this step
    cap: int
    gen: int  # a new geometry means every layer rebuilds its copy
    _pad: mx.array | None = None
    _indices: dict = field(default_factory=dict)  # pool rows of this step's gather / flush, per key

    def __post_init__(self):
        self.padded = bool(self.pad.any())  # fixed for the geometry; asked by every layer a step

    @classmethod
    def new(cls, ident: tuple, lengths: list[int], step: int) -> Geometry:
        """Lengths before this step's token; the capacity from `capacity`."""
        longest = max(lengths)
        pad = np.asarray([longest - n for n in lengths], dtype=np.int32)
        return cls(ident, pad, longest + 1, capacity(longest + 1, step), next(_ids))

    def advance(self, ident: tuple, lengths: list[int], step: int) -> bool:
        """Continue with this step if it has the same rows, each one token further (the capacity
        grows when full); False: the batch needs a new geometry."""
        if ident != self.ident or not all(int(p) + n == self.col for p, n in zip(self.pad, lengths)):
            return False
        self.col += 1
        if self.col > self.cap:
            self.cap = capacity(self.col, step)
        return True

    @property
    def pad_array(self) -> mx.array:
        """`pad` on the device, made once."""
        if self._pad is None:
            self._pad = mx.array(self.pad)
        return self._pad

    def indices(self, key: tuple, build: Callable[[], np.ndarray]) -> mx.array:
        """The pool rows `build()` gives, on the device, made once for every layer that asks with
        `key` (its heads and columns): the layers of a step share the rows' tables and padding, so
        a batch of 28 layers indexes its rows once, not 28 times on the host."""
        rows = self._indices.get(key)
        if rows is None:
            if len(self._indices) >= 8:  # the keys of earlier steps
                self._indices.clear()
            rows = self._indices[key] = mx.array(build().reshape(-1).astype(np.int32))
        return rows

    def sees_all(self, window_size: int | None) -> bool:
        """Whether every row sees every column written so far: no padding, no window cut."""
        return not self.padded and (window_size is None or self.col <= window_size)

    def mask(self, window_size: int | None, return_array: bool = False) -> mx.array | None:
        """[B, 1, 1, col] bool over the columns written so far (`visible`); None when it would hide
        nothing (`sees_all`) and the model takes None: attention then runs unmasked, which on CUDA
        is MLX's fused vector kernel instead of the ~5 kernels of its masked fallback."""
        if self.sees_all(window_size) and not return_array:
            return None
        return visible(mx.arange(self.col), self.col - 1, self.pad_array, window_size)


class WorkingCopy:
    """One layer's copy for one geometry; `flushed` columns are in the pool already."""

    def __init__(self, pool, layer: int, geom: Geometry, tables: list[list[int]], lengths: list[int]):
        self.pool, self.layer, self.geom = pool, layer, geom
        store = pool.storage
        shape = store.layers[layer]
        B, H = len(lengths), shape.kv_heads
        self.k = mx.zeros((B, H, geom.cap, shape.k_dim), store.dtype)
        self.v = mx.zeros((B, H, geom.cap, shape.v_dim), store.dtype)
        longest = max(lengths)
        if longest:
            rows = geom.indices(("gather", H, geom.col), lambda: _gather_rows(pool, geom.pad, tables, longest, H))
            k, v = store.read_rows(layer, rows)
            self.k[:, :, :longest, :] = k.reshape(B, H, longest, shape.k_dim)
            self.v[:, :, :longest, :] = v.reshape(B, H, longest, shape.v_dim)
        self.flushed = longest

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def fit(self) -> bool:
        """Grow to the geometry's capacity (it grows at the end when full); whether it grew."""
        extra = self.geom.cap - self.k.shape[2]
        if extra <= 0:
            return False
        B, H = self.k.shape[:2]
        self.k = mx.concatenate([self.k, mx.zeros((B, H, extra, self.k.shape[3]), self.k.dtype)], axis=2)
        self.v = mx.concatenate([self.v, mx.zeros((B, H, extra, self.v.shape[3]), self.v.dtype)], axis=2)
        return True

    def append(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write this step's token (column geom.col - 1) and return the views attention reads."""
        col = self.geom.col
        self.k[:, :, col - 1 : col, :] = keys
        self.v[:, :, col - 1 : col, :] = values
        return self.k[:, :, :col, :], self.v[:, :, :col, :]

    def flush(self, tables: list[list[int]]) -> None:
        """Write the columns not in the pool yet into the rows' blocks (one scatter per K and V)."""
        start, end = self.flushed, self.geom.col
        if end <= start:
            return
        pool, geom = self.pool, self.geom
        H = pool.storage.layers[self.layer].kv_heads
        rows = geom.indices(("flush", H, start, end), lambda: _flush_rows(pool, geom.pad, tables, start, end, H))
        pool.storage.write(self.layer, rows, self.k[:, :, start:end, :], self.v[:, :, start:end, :])
        self.flushed = end


def _gather_rows(pool, pad: np.ndarray, tables: list[list[int]], longest: int, H: int) -> np.ndarray:
    """Pool rows of the rows' first `longest` columns, right-aligned (`pad`), the null block's
    in the padding: what a copy gathers."""
    bs = pool.block_size
    pos = np.arange(longest)[None, :] - pad[:, None]  # [B, longest] position per column
    valid = pos >= 0
    table = np.zeros((len(tables), max(1, -(-longest // bs))), dtype=np.int64)
    for b, t in enumerate(tables):
        table[b, : min(len(t), table.shape[1])] = t[: table.shape[1]]
    blocks = np.take_along_axis(table, np.where(valid, pos // bs, 0), axis=1)
    return row_index(np.where(valid, blocks, pool.NULL), np.where(valid, pos % bs, 0), H, bs)


def _flush_rows(pool, pad: np.ndarray, tables: list[list[int]], start: int, end: int, H: int) -> np.ndarray:
    """Pool rows of columns `start:end` in the rows' blocks (the trash block's in the padding)."""
    bs = pool.block_size
    pos = np.arange(start, end)[None, :] - pad[:, None]  # [B, m]
    blocks = np.stack([np.asarray(t, dtype=np.int64)[np.minimum(p // bs, len(t) - 1)] for t, p in zip(tables, pos)])
    return row_index(np.where(pos >= 0, blocks, pool.TRASH), pos % bs, H, bs)
