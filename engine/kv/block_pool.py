"""The block pool of one model: fixed-size KV blocks for every layer, ref counts, a free list and
an LRU of cached blocks, grown within a byte budget.

One block id spans all layers (like vLLM): block `b` holds `block_size` consecutive token
positions of one sequence, in every layer. Per layer the pool is two arrays, K and V, of shape
`[num_blocks * kv_heads * block_size, head_dim]`, i.e. `[num_blocks, kv_heads, block_size,
head_dim]` flattened, so

- a write of new tokens is one scatter of rows into each array (in place: the pool arrays are kept
  singly referenced, so MLX donates their buffers), and
- a read of a batch's blocks is one `take` of whole `[block_size, head_dim]` slabs that lands
  directly in the `[B, kv_heads, L, head_dim]` layout attention wants (no transpose copy).

Growing the pool appends blocks (ids stay valid). Block 0 is all zeros and never written: it pads
short rows in a gather. Block 1 takes the writes of padding tokens and is never read.

The pool knows nothing about tokens or attention. A block is *cached* while the prefix index holds
it (`set_cached`); a cached block whose ref count drops to 0 goes to the LRU and stays reusable
until the pool needs room (`allocate` evicts the least recently used one and tells the index
through `on_evict`). Any other block whose ref count drops to 0 goes to the free list.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    k_dim: int
    v_dim: int


class BlockPool:
    NULL = 0  # zeros; pads gathers, never written
    TRASH = 1  # padding tokens are written here; never gathered
    RESERVED = 2

    def __init__(
        self,
        layers: list[LayerShape],
        dtype: mx.Dtype,
        block_size: int,
        capacity_blocks: int | None,
        first_growth: int = 64,
        cache_share: float = 1.0,
        on_evict: Callable[[int], None] | None = None,
    ):
        """`capacity_blocks`: most usable blocks (the byte budget / block_bytes); None: unbounded.
        `cache_share`: the pool grows past this share of the capacity only for referenced blocks
        (running requests); up to it, it grows rather than evict cached blocks. The rest of the
        budget is left to decode working copies (engine.kv.paged_cache) while nothing else needs it.
        `on_evict(block)`: told of each cached block the pool evicts, before it is reused (the
        prefix index forgets it)."""
        self.layers = list(layers)
        self.dtype = dtype
        self.block_size = block_size
        self.capacity = capacity_blocks
        self.soft_capacity = None if capacity_blocks is None else max(1, int(capacity_blocks * cache_share))
        self.first_growth = first_growth
        size = dtype.size
        self.layer_block_bytes = [block_size * s.kv_heads * (s.k_dim + s.v_dim) * size for s in self.layers]
        self.block_bytes = sum(self.layer_block_bytes)
        self.on_evict = on_evict
        self.epoch = 0  # bumped on every change of a block's contents owner (allocation, copy, growth)
        self.counters = {"evictions": 0, "cow_copies": 0, "grows": 0, "over_budget_blocks": 0}
        self.peak_used = 0  # most blocks referenced at once
        self.dirty = False  # writes not evaluated yet (see take_writes)
        self._reset_storage()

    # --- storage ---------------------------------------------------------------------------

    def _reset_storage(self) -> None:
        self.num_blocks = self.RESERVED
        self.k = [mx.zeros((self.RESERVED * s.kv_heads * self.block_size, s.k_dim), self.dtype) for s in self.layers]
        self.v = [mx.zeros((self.RESERVED * s.kv_heads * self.block_size, s.v_dim), self.dtype) for s in self.layers]
        mx.eval(self.k, self.v)
        self.refs: list[int] = [1] * self.RESERVED  # reserved blocks are never freed
        self.cached: list[bool] = [False] * self.RESERVED
        self.free: list[int] = []
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.epoch += 1

    def _grow(self, want: int, limit: int | None) -> None:
        """Append blocks: to `want` usable blocks at least, doubling, within `limit` when possible."""
        usable = self.num_blocks - self.RESERVED
        target = max(want, usable * 2, self.first_growth)
        if limit is not None:
            target = min(target, max(limit, want))
        add = target - usable
        if add <= 0:
            return
        bs = self.block_size
        for i, s in enumerate(self.layers):
            rows = add * s.kv_heads * bs
            self.k[i] = mx.concatenate([self.k[i], mx.zeros((rows, s.k_dim), self.dtype)])
            self.v[i] = mx.concatenate([self.v[i], mx.zeros((rows, s.v_dim), self.dtype)])
        mx.eval(self.k, self.v)  # the old arrays go now, not at the end of the next step
        new = range(self.num_blocks, self.num_blocks + add)
        self.refs.extend([0] * add)
        self.cached.extend([False] * add)
        self.free.extend(reversed(new))  # pop() hands out the lowest id first
        self.num_blocks += add
        self.counters["grows"] += 1
        self.epoch += 1

    def shrink(self) -> None:
        """Give the memory back when no block is referenced and none is cached."""
        if self.used == 0 and not self.lru and self.num_blocks > self.RESERVED:
            self._reset_storage()

    # --- allocation ------------------------------------------------------------------------

    def allocate(self) -> int:
        """A block with ref count 1. Order: free list, growth up to the cache share of the budget,
        LRU eviction, growth up to the budget, growth beyond it (only when referenced blocks alone
        exceed the budget, i.e. one request larger than the budget runs alone; logged)."""
        if not self.free:
            usable = self.num_blocks - self.RESERVED
            if self.capacity is None or usable < self.soft_capacity:
                self._grow(usable + 1, self.soft_capacity)
            elif self.lru:
                self._evict_one()
            elif usable < self.capacity:
                self._grow(usable + 1, self.capacity)
            else:
                log.warning("KV block pool over its budget (%d blocks): growing anyway", self.capacity)
                self.counters["over_budget_blocks"] += 1
                self._grow(usable + max(1, usable // 8), None)
        b = self.free.pop()
        self.refs[b] = 1
        self.epoch += 1
        self.peak_used = max(self.peak_used, self.used)
        return b

    def _evict_one(self) -> None:
        b, _ = self.lru.popitem(last=False)
        self.counters["evictions"] += 1
        if self.on_evict is not None:
            self.on_evict(b)  # the index drops it; it calls set_cached(b, False)
        self.cached[b] = False
        self.free.append(b)

    def evict(self, block: int) -> None:
        """Drop one unreferenced cached block now (entry-count mode)."""
        if block in self.lru:
            del self.lru[block]
            self.counters["evictions"] += 1
            self.cached[block] = False
            self.free.append(block)

    def incref(self, block: int) -> None:
        if self.refs[block] == 0:
            self.lru.pop(block, None)
        self.refs[block] += 1
        self.peak_used = max(self.peak_used, self.used)

    def decref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.cached[block]:
                self.lru[block] = None  # most recently used end
            else:
                self.free.append(block)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block of a sequence, tail first: when they become cached,
        a chain's tail is older in the LRU than its head, so it is evicted first."""
        for b in reversed(blocks):
            self.decref(b)

    def set_cached(self, block: int, cached: bool) -> None:
        if self.cached[block] == cached:
            return
        self.cached[block] = cached
        if self.refs[block] == 0:
            if cached:  # (not reachable in practice: only referenced blocks get cached)
                self.free.remove(block)
                self.lru[block] = None
            else:
                self.lru.pop(block, None)
                self.free.append(block)

    def touch(self, block: int) -> None:
        if block in self.lru:
            self.lru.move_to_end(block)

    def frozen(self, block: int) -> bool:
        """Whether writing into this block needs a private copy first (shared or cached)."""
        return self.refs[block] > 1 or self.cached[block]

    def copy_block(self, src: int) -> int:
        """Copy-on-write: a new block (ref 1) with the contents of `src` in every layer."""
        dst = self.allocate()
        bs = self.block_size
        for i, s in enumerate(self.layers):
            n = s.kv_heads * bs
            for pool in (self.k, self.v):
                # A real copy, evaluated now: a view of the pool would keep its buffer shared and
                # turn the update below into a copy of the whole pool array.
                data = mx.contiguous(pool[i][src * n : (src + 1) * n])
                mx.eval(data)
                pool[i][dst * n : (dst + 1) * n] = data
        self.dirty = True
        self.counters["cow_copies"] += 1
        return dst

    # --- reads and writes (one layer) -----------------------------------------------------

    def write(self, layer: int, rows: mx.array, keys: mx.array, values: mx.array) -> None:
        """Scatter `keys`/`values` ([B, H, N, D], flattened in that order) into pool rows."""
        self.k[layer][rows] = keys.reshape(-1, keys.shape[-1])
        self.v[layer][rows] = values.reshape(-1, values.shape[-1])
        self.dirty = True

    def read_rows(self, layer: int, rows: mx.array) -> tuple[mx.array, mx.array]:
        """Gather single pool rows (`row_index` order), flattened to [n, D]."""
        return self.k[layer][rows], self.v[layer][rows]

    def take_writes(self) -> list[mx.array]:
        """The pool arrays written since the last call, to evaluate with the step (else none)."""
        if not self.dirty:
            return []
        self.dirty = False
        return [a for layer in range(len(self.layers)) for a in (self.k[layer], self.v[layer])]

    def read(self, layer: int, slabs: mx.array) -> tuple[mx.array, mx.array]:
        """Gather `[block_size, D]` slabs: `slabs` is [B, H, nb] of `block * H + head`."""
        bs = self.block_size
        B, H, nb = slabs.shape
        s = self.layers[layer]
        k = mx.take(self.k[layer].reshape(-1, bs * s.k_dim), slabs, axis=0).reshape(B, H, nb * bs, s.k_dim)
        v = mx.take(self.v[layer].reshape(-1, bs * s.v_dim), slabs, axis=0).reshape(B, H, nb * bs, s.v_dim)
        return k, v

    def layer_state(self, layer: int) -> tuple[mx.array, mx.array]:
        return self.k[layer], self.v[layer]

    # --- numbers ---------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.num_blocks - self.RESERVED

    @property
    def used(self) -> int:
        return self.total - len(self.free) - len(self.lru)

    def stats(self) -> dict:
        return {
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "blocks_total": self.total,
            "blocks_used": self.used,
            "blocks_cached": len(self.lru),
            "blocks_free": len(self.free),
            "blocks_capacity": self.capacity,
            "bytes": self.num_blocks * self.block_bytes,
            "bytes_used": self.used * self.block_bytes,
            "blocks_used_peak": self.peak_used,
            **self.counters,
        }


def row_index(blocks: np.ndarray, slots: np.ndarray, kv_heads: int, block_size: int) -> np.ndarray:
    """Pool rows [B, H, m] of (block, slot) pairs [B, m], in the [B, H, m] order of a K/V slab."""
    h = np.arange(kv_heads)[None, :, None]
    return (blocks[:, None, :] * kv_heads + h) * block_size + slots[:, None, :]


def slab_index(tables: np.ndarray, kv_heads: int) -> np.ndarray:
    """[B, nb] block ids -> [B, H, nb] slab ids (`block * H + head`) for `BlockPool.read`."""
    return tables[:, None, :] * kv_heads + np.arange(kv_heads, dtype=tables.dtype)[None, :, None]
