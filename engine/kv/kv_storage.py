"""The K/V arrays behind one model's block pool: MLX storage only, no bookkeeping.

One block id spans all layers (like vLLM): block `b` holds `block_size` consecutive token
positions of one sequence, in every layer. Per layer the storage is two arrays, K and V, of shape
`[num_blocks * kv_heads * block_size, head_dim]`, i.e. `[num_blocks, kv_heads, block_size,
head_dim]` flattened, so

- a write of new tokens is one scatter of rows into each array (in place: the arrays are kept
  singly referenced, so MLX donates their buffers), and
- a read of a batch's blocks is one `take` of whole `[block_size, head_dim]` slabs that lands
  directly in the `[B, kv_heads, L, head_dim]` layout attention wants (no transpose copy).

Growing appends blocks (ids stay valid). Block 0 (`NULL`) is all zeros and never written: it pads
short rows in a gather. Block 1 (`TRASH`) takes the writes of padding tokens and is never read.
Which block is free, cached or shared is the block pool's business (engine.kv.block_pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

NULL = 0  # zeros; pads gathers, never written
TRASH = 1  # padding tokens are written here; never gathered
RESERVED = 2


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    k_dim: int
    v_dim: int


def layer_block_bytes(layers: list[LayerShape], dtype: mx.Dtype, block_size: int) -> list[int]:
    """Bytes of one block's K and V, layer by layer."""
    return [block_size * s.kv_heads * (s.k_dim + s.v_dim) * dtype.size for s in layers]


class KVStorage:
    quant = None  # the model's dtype, unquantized (engine.kv.quantized_storage for quantized blocks)

    def __init__(self, layers: list[LayerShape], dtype: mx.Dtype, block_size: int):
        self.layers = list(layers)
        self.dtype = dtype
        self.block_size = block_size
        self.layer_block_bytes = layer_block_bytes(self.layers, dtype, block_size)
        self.block_bytes = sum(self.layer_block_bytes)
        self.dirty = False  # writes not evaluated yet (see take_writes)
        self.reset()

    def reset(self) -> None:
        """Only the reserved blocks: every other block's memory goes back."""
        self.k = [self._zeros(RESERVED, s.k_dim, s) for s in self.layers]
        self.v = [self._zeros(RESERVED, s.v_dim, s) for s in self.layers]
        mx.eval(self.k, self.v)
        self.num_blocks = RESERVED

    def grow(self, add: int) -> None:
        """Append `add` zeroed blocks to every layer."""
        for i, s in enumerate(self.layers):
            self.k[i] = mx.concatenate([self.k[i], self._zeros(add, s.k_dim, s)])
            self.v[i] = mx.concatenate([self.v[i], self._zeros(add, s.v_dim, s)])
        mx.eval(self.k, self.v)  # the old arrays go now, not at the end of the next step
        self.num_blocks += add

    def _zeros(self, blocks: int, dim: int, s: LayerShape) -> mx.array:
        return mx.zeros((blocks * s.kv_heads * self.block_size, dim), self.dtype)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """The contents of each block `src` into its block `dst`, in every layer, with one host
        sync for them all (a sync per layer and block stalled a step that admitted rows reusing
        part of a cached block)."""
        parts = []
        for i, s in enumerate(self.layers):
            n = s.kv_heads * self.block_size
            for arrays in (self.k, self.v):
                for src, dst in pairs:
                    # A real copy, evaluated before the update: a view of the array would keep its
                    # buffer shared and turn the update into a copy of the whole array.
                    parts.append(
                        (arrays, i, slice(dst * n, (dst + 1) * n), mx.contiguous(arrays[i][src * n : (src + 1) * n]))
                    )
        mx.eval([data for *_, data in parts])
        for arrays, i, rows, data in parts:
            arrays[i][rows] = data
        self.dirty = True

    def block_arrays(self, block: int) -> list[np.ndarray]:
        """One block's rows of every array, copied out, in a fixed order (K then V, layer by layer;
        each `[kv_heads * block_size, dim]`). The raw values: bfloat16, which numpy lacks, as its
        uint16 bits (`load_block` takes them back)."""
        rows = [a[i][self._rows(block, s)] for i, s in enumerate(self.layers) for a in (self.k, self.v)]
        if self.dtype == mx.bfloat16:
            rows = [r.view(mx.uint16) for r in rows]
        mx.eval(rows)
        return [np.array(r, copy=True) for r in rows]

    def load_block(self, block: int, arrays: list[np.ndarray]) -> None:
        """Write one block's rows of every array (`block_arrays`' order and shapes) into `block`."""
        for j, data in enumerate(arrays):
            layer, s = j // 2, self.layers[j // 2]
            target = (self.k, self.v)[j % 2]
            rows = mx.array(data)
            target[layer][self._rows(block, s)] = rows.view(self.dtype) if rows.dtype != self.dtype else rows
        self.dirty = True

    def _rows(self, block: int, s: LayerShape) -> slice:
        n = s.kv_heads * self.block_size
        return slice(block * n, (block + 1) * n)

    # --- reads and writes (one layer) -----------------------------------------------------

    def write(self, layer: int, rows: mx.array, keys: mx.array, values: mx.array) -> None:
        """Scatter `keys`/`values` ([B, H, N, D], flattened in that order) into storage rows."""
        self.k[layer][rows] = keys.reshape(-1, keys.shape[-1])
        self.v[layer][rows] = values.reshape(-1, values.shape[-1])
        self.dirty = True

    def read_rows(self, layer: int, rows: mx.array) -> tuple[mx.array, mx.array]:
        """Gather single rows (`row_index` order), flattened to [n, D]."""
        return self.k[layer][rows], self.v[layer][rows]

    def read(self, layer: int, slabs: mx.array) -> tuple[mx.array, mx.array]:
        """Gather `[block_size, D]` slabs: `slabs` is [B, H, nb] of `block * H + head`."""
        bs = self.block_size
        B, H, nb = slabs.shape
        s = self.layers[layer]
        k = mx.take(self.k[layer].reshape(-1, bs * s.k_dim), slabs, axis=0).reshape(B, H, nb * bs, s.k_dim)
        v = mx.take(self.v[layer].reshape(-1, bs * s.v_dim), slabs, axis=0).reshape(B, H, nb * bs, s.v_dim)
        return k, v

    def take_writes(self) -> list[mx.array]:
        """The arrays written since the last call, to evaluate with the step (else none)."""
        if not self.dirty:
            return []
        self.dirty = False
        return [a for layer in range(len(self.layers)) for a in (self.k[layer], self.v[layer])]

    def zeroed(self) -> tuple[list[mx.array], list[mx.array]]:
        """Zeroed arrays of the current size: what the pool starts over from when its arrays
        cannot be evaluated (the cache is then cleared: no block's contents are kept)."""
        self.dirty = False
        return (
            [self._zeros(self.num_blocks, s.k_dim, s) for s in self.layers],
            [self._zeros(self.num_blocks, s.v_dim, s) for s in self.layers],
        )

    def layer_state(self, layer: int) -> tuple[mx.array, mx.array]:
        return self.k[layer], self.v[layer]


def row_index(blocks: np.ndarray, slots: np.ndarray, kv_heads: int, block_size: int) -> np.ndarray:
    """Storage rows [B, H, m] of (block, slot) pairs [B, m], in the [B, H, m] order of a K/V slab."""
    h = np.arange(kv_heads)[None, :, None]
    return (blocks[:, None, :] * kv_heads + h) * block_size + slots[:, None, :]


def slab_index(tables: np.ndarray, kv_heads: int) -> np.ndarray:
    """[B, nb] block ids -> [B, H, nb] slab ids (`block * H + head`) for `KVStorage.read`."""
    return tables[:, None, :] * kv_heads + np.arange(kv_heads, dtype=tables.dtype)[None, :, None]
