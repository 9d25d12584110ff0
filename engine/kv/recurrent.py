"""Recurrent state in a batch: the cache objects hybrid and state-space layers see.

A recurrent layer (a gated delta-net, a Mamba mixer, LFM2's short convolution) keeps a state of
a fixed size per sequence instead of K/V that grows: mlx_lm stores it in an `ArraysCache`, the
layer reads `cache[i]` and writes the next state back with `cache[i] = ...`. Between steps a
running sequence holds its own state (`SeqBlocks.state`, one `[1, ...]` array per state array of
the model, `state_len` tokens in). A batch concatenates its rows' states into one
`BatchStateCache` per slot, the model updates it, and `write_back` hands each row its slice
again when the batch changes, a prompt chunk ends or a request leaves.

Prompt chunks of a recurrent model are never padded (engine.batch_loop): every row of a chunk
computes the same number of real tokens, so no state is ever advanced over padding. That makes
the batch exact whether or not a layer honours `cache.lengths` (mlx_lm's nemotron_h Mamba layer
does not), and decode steps are one real token per row anyway. The cache therefore never sets
`lengths` or `left_padding`, and its mask is None.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from .layout import CacheLayout, StateSlot


class BatchStateCache(ArraysCache):
    """One recurrent slot's state for a batch of rows, in mlx_lm's `ArraysCache` protocol."""

    def __init__(self, slot: StateSlot, arrays: list[mx.array | None], on_write: Callable):
        super().__init__(len(arrays))
        self.slot = slot
        self.cache = arrays
        self._on_write = on_write

    def __setitem__(self, idx, value):
        self.cache[idx] = value
        self._on_write(self, idx, value)

    def make_mask(self, N: int):
        return None  # rows are never padded (see the module docstring)


def gather_states(layout: CacheLayout, slot: StateSlot, rows) -> list[mx.array | None]:
    """The batch's arrays of one slot: the rows' states concatenated (zeros for a row that has
    computed nothing yet; None for each array when no row has)."""
    if all(r.state is None for r in rows):
        return [None] * len(slot.shapes)
    out = []
    for j, (shape, dtype) in enumerate(zip(slot.shapes, slot.dtypes)):
        parts = [r.state[slot.index + j] if r.state is not None else mx.zeros(shape, dtype) for r in rows]
        out.append(parts[0] if len(parts) == 1 else mx.concatenate(parts))
    return out


def write_back(layout: CacheLayout, caches: list[BatchStateCache], rows) -> None:
    """Each row's slice of the batch's state arrays becomes its own state (lazily: slices)."""
    if not caches or caches[0].cache[0] is None:
        return
    n = len(layout.state_shapes)
    for i, row in enumerate(rows):
        state: list[mx.array | None] = [None] * n
        for c in caches:
            for j, a in enumerate(c.cache):
                state[c.slot.index + j] = a if len(rows) == 1 else a[i : i + 1]
        row.state = state
        row.state_len = row.length
