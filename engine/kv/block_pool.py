"""The block pool of one model: the bookkeeping of fixed-size KV blocks (ref counts, a free list
and an LRU of cached blocks), grown within a byte budget. The K/V arrays themselves are its
`storage` (engine.kv.kv_storage); the pool decides when it grows and which block goes where.

The pool knows nothing about tokens or attention. A block is *cached* while the prefix index holds
it (`set_cached`); a cached block whose ref count drops to 0 goes to the LRU and stays reusable
until the pool needs room (`allocate` evicts the least recently used one and tells the index
through `on_evict`). Any other block whose ref count drops to 0 goes to the free list.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import mlx.core as mx

from . import kv_storage
from .kv_storage import LayerShape
from .quantized_storage import KVQuant, make_storage

log = logging.getLogger(__name__)


class BlockPool:
    NULL, TRASH, RESERVED = kv_storage.NULL, kv_storage.TRASH, kv_storage.RESERVED

    def __init__(
        self,
        layers: list[LayerShape],
        dtype: mx.Dtype,
        block_size: int,
        capacity_blocks: int | None,
        first_growth: int = 64,
        cache_share: float = 1.0,
        on_evict: Callable[[int], None] | None = None,
        quant: KVQuant | None = None,
    ):
        """`capacity_blocks`: most usable blocks (the byte budget / block_bytes); None: unbounded.
        `cache_share`: the pool grows past this share of the capacity only for referenced blocks
        (running requests); up to it, it grows rather than evict cached blocks. The rest of the
        budget is left to decode working copies (engine.kv.paged_cache) while nothing else needs it.
        `on_evict(block)`: told of each cached block the pool evicts, before it is reused (the
        prefix index forgets it). `quant`: blocks stored quantized (engine.kv.quantized_storage)."""
        self.storage = make_storage(layers, dtype, block_size, quant)
        self.block_size = block_size
        self.block_bytes = self.storage.block_bytes
        self.capacity = capacity_blocks
        # blocks the pool grows to before it evicts a cached block (referenced ones may go past it)
        self.cache_capacity = None if capacity_blocks is None else max(1, int(capacity_blocks * cache_share))
        self.first_growth = first_growth
        self.on_evict = on_evict
        self.epoch = 0  # bumped on every change of a block's contents owner (allocation, copy, growth)
        self.counters = {"evictions": 0, "cow_copies": 0, "grows": 0, "over_budget_blocks": 0}
        self.peak_used = 0  # most blocks referenced at once
        self._reset()

    # --- growth ----------------------------------------------------------------------------

    def _reset(self) -> None:
        self.storage.reset()
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
        new = range(self.num_blocks, self.num_blocks + add)
        self.storage.grow(add)
        self.refs.extend([0] * add)
        self.cached.extend([False] * add)
        self.free.extend(reversed(new))  # pop() hands out the lowest id first
        self.counters["grows"] += 1
        self.epoch += 1

    def shrink(self) -> None:
        """Give the memory back when no block is referenced and none is cached."""
        if self.used == 0 and not self.lru and self.num_blocks > self.RESERVED:
            self._reset()

    # --- allocation ------------------------------------------------------------------------

    def allocate(self) -> int:
        """A block with ref count 1. Order: free list, growth up to the cache share of the budget,
        LRU eviction, growth up to the budget, growth beyond it (only when referenced blocks alone
        exceed the budget, i.e. one request larger than the budget runs alone; logged)."""
        if not self.free:
            usable = self.num_blocks - self.RESERVED
            if self.capacity is None or usable < self.cache_capacity:
                self._grow(usable + 1, self.cache_capacity)
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
        return self.copy_blocks([src])[0]

    def copy_blocks(self, sources: list[int]) -> list[int]:
        """Copy-on-write of several blocks at once (one host sync): new blocks, ref 1 each."""
        pairs = [(src, self.allocate()) for src in sources]
        if pairs:
            self.storage.copy(pairs)
            self.counters["cow_copies"] += len(pairs)
        return [dst for _, dst in pairs]

    # --- numbers ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.storage.num_blocks

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
            "kv_bits": 16 if self.storage.quant is None else self.storage.quant.bits,
            "kv_group_size": None if self.storage.quant is None else self.storage.quant.group_size,
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
