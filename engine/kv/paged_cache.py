"""mlx_lm cache-protocol classes over the block pool.

mlx_lm's models talk to one cache object per layer (`update_and_fetch`, `make_mask`, `offset`).
Our batch loop (engine.batch_loop) gets those through `PagedContext`, its one way to the paged K/V
(engine.kv.interface.BatchKV): one `BatchPagedKVCache` per layer for a batch of rows (with
`chunk` before a right-padded prompt chunk), `flush` before anything else reads the rows'
blocks, the writes to evaluate with a step. Every running request is a `SeqBlocks`: a block table
into the shared `BlockPool` plus how many tokens each layer has written. Cache objects only point at SeqBlocks,
so a new batch view never copies K/V, and two sequences that share a prefix point at the same
physical blocks while they run.

Layout inside a batch: every row starts at position 0 (no left padding). `offset` is an array of
each row's current length (RoPE positions), the gathered keys are `[B, H, nb * block_size, D]`
with `nb` the widest row's block count (shorter rows padded with the zero block), and `make_mask`
hides, per row, everything after the query's own position (causality, the row's tail and the
padding at once) and, for sliding-window layers, everything `window_size` or more tokens back.
Tokens past a row's real length in a right-padded prompt chunk are written to the trash block.

Writes go into the row's blocks. A block that is shared (ref count > 1) or held by the prefix
index is never written: the first write into it makes a private copy (copy-on-write).

Reads. MLX has no paged-attention kernel, and mlx_lm's attention wants one `[B, H, L, D]` array
per layer. The plain way, a gather of every row's blocks per layer per step, costs a copy of the
whole batch's K/V each decode step, as much memory traffic as the attention itself
(docs/lab-notebook.md, *Paged KV cache*). So a decode batch
may keep *working copies* instead (engine.kv.working_copy): per layer a contiguous K and V laid out
as mlx_lm's batch cache (rows right-aligned), built by one gather and then written one column a
step; decode tokens reach the pool when the loop flushes (before the batch changes, a prompt
chunk runs or a row leaves). That makes decode as cheap as mlx_lm's contiguous cache, but it is
one more copy of each row's whole context, shared prefix included. The policy
(`PagedContext._copy_pays`): working copies only when less than half of the rows' blocks are
shared with another sequence (they then at most double what those rows hold alone) and they fit
the part of the budget the pool does not use or need; otherwise every step gathers, and a shared
prefix stays one copy in memory at the price of the gather. Prefill chunks always gather (the
copy is small next to the chunk's compute).

Quantized blocks (`EngineConfig.kv_bits`, engine.kv.quantized_storage): gathers dequantize, working
copies stay dense (they count in the budget at their dense bytes), and a decode step writes its
quantized column to the blocks at once, the copy taking the dequantized value: re-quantizing a
copy's values at `flush` would not give back what was attended to.

A model's cache list follows its slots (engine.kv.layout): a K/V slot gets a `BatchPagedKVCache`,
a recurrent one a `BatchStateCache` over the rows' states (engine.kv.recurrent), a `CacheList`
its children; `flush` also hands each row its slice of the batch's state back.

Block lifetime is not tied to these objects (the loop makes new ones whenever its batch changes):
the cache manager (`engine.kv.manager.PagedCacheManager`) owns each SeqBlocks from
`acquire` to `store`/`release`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import CacheList, _BaseCache

from .block_pool import BlockPool
from .kv_storage import layer_block_bytes, row_index, slab_index
from .layout import CacheLayout, KVSlot, StateSlot
from .recurrent import BatchStateCache, gather_states, write_back
from .working_copy import Geometry, WorkingCopy


class SeqBlocks:
    """One running request's KV: its block table and the tokens each layer has written, with what
    the cache manager needs to index its prompt blocks as they fill (the cache manager's record,
    from `acquire` to `store` / `release`). Compared by identity."""

    __slots__ = (
        "table",
        "written",
        "max_blocks",
        "tokens",
        "prompt_hashes",
        "registered",
        "state",
        "state_len",
        "snapshots",
        "good",
        "match_end",
        "last_state",
    )

    def __init__(
        self,
        table: list[int],
        written: int,
        num_layers: int,
        max_blocks: int = 0,
        tokens: list[int] | None = None,
        prompt_hashes: list[bytes] | None = None,
        registered: int = 0,
    ):
        self.table = table
        self.written = [written] * num_layers
        self.max_blocks = max_blocks  # worst case (prompt + max_tokens), for `kv_admission: reserve`
        self.tokens = tokens if tokens is not None else []  # what it was acquired for (the request's list)
        self.prompt_hashes = prompt_hashes if prompt_hashes is not None else []  # chain hashes of full blocks
        self.registered = registered  # prompt blocks [0, registered) are in the prefix index (or skipped)
        # Recurrent models (engine.kv.recurrent): the state after `state_len` tokens (None: none
        # computed yet), and snapshots taken (tokens, arrays) not yet stored on an indexed block.
        self.state: list[mx.array] | None = None
        self.state_len = written
        self.snapshots: list[tuple[int, list[mx.array]]] = []
        self.good = written  # tokens known written before the current step (a failed step drops the rest)
        self.match_end = 0  # recurrent models: where its prompt's K/V match ended (a snapshot point)
        self.last_state = 0  # recurrent models: the latest snapshot it resumed from or took (tokens)

    @property
    def length(self) -> int:
        """Tokens every layer has taken in (K/V written; the recurrent state, for hybrid models,
        counts as one more layer)."""
        return min(self.written)


@dataclass
class _Plan:
    """Where one forward step of a batch writes and what it reads; the same for every layer."""

    tables: np.ndarray  # [B, nb] block ids, padded with BlockPool.NULL
    starts: np.ndarray  # [B] positions of the first new token
    real: np.ndarray  # [B] new tokens that are not padding
    n: int
    working_copy: bool = False  # decode through per-layer working copies (see BatchPagedKVCache)
    _rows: dict = field(default_factory=dict)
    _slabs: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Blocks gathered per row: the widest row after this step."""
        return self.tables.shape[1]

    def rows(self, heads: int, bs: int) -> mx.array:
        """Pool rows for the new keys [B, H, N, D] in that order."""
        if heads not in self._rows:
            N = self.n
            i = np.arange(N)
            pos = self.starts[:, None] + i[None, :]
            valid = i[None, :] < self.real[:, None]
            col = np.minimum(pos // bs, self.tables.shape[1] - 1)
            blk = np.where(valid, np.take_along_axis(self.tables, col, axis=1), BlockPool.TRASH)
            slot = np.where(valid, pos % bs, i[None, :] % bs)
            rows = row_index(blk, slot, heads, bs)
            self._rows[heads] = mx.array(rows.reshape(-1).astype(np.int32))
        return self._rows[heads]

    def slabs(self, heads: int, width: int | None = None) -> mx.array:
        """[B, H, width] slabs of the rows' blocks (padded with the zero block) for a gather."""
        width = width or self.width
        if (heads, width) not in self._slabs:
            tables = self.tables
            if width > tables.shape[1]:
                tables = np.pad(tables, ((0, 0), (0, width - tables.shape[1])), constant_values=BlockPool.NULL)
            self._slabs[heads, width] = mx.array(slab_index(tables, heads).astype(np.int32))
        return self._slabs[heads, width]


class BatchCaches(list):
    """The model's cache list for one batch (what it is called with), with the K/V layers' and the
    recurrent slots' caches and the rows at hand for the batch loop's calls back."""

    def __init__(self, kv: list[BatchPagedKVCache], rows: list[SeqBlocks]):
        super().__init__()
        self.kv = kv
        self.rows = list(rows)
        self.states: list[BatchStateCache] = []


class PagedContext:
    """What the cache objects of one model share (the pool, the per-step memo), and the batch
    loop's one way to the paged K/V (engine.kv.interface.BatchKV)."""

    # A working copy's capacity grows by at least this many columns (engine.kv.working_copy.capacity).
    copy_step = 16

    def __init__(
        self,
        pool: BlockPool,
        num_layers: int,
        copy_room: Callable[[], int | None] = lambda: None,
        layout: CacheLayout | None = None,
        on_state: Callable[[SeqBlocks], None] = lambda seq: None,
    ):
        self.pool = pool
        self.num_layers = num_layers  # K/V layers in the pool
        self.layout = layout if layout is not None else CacheLayout(slots=[KVSlot(i) for i in range(num_layers)])
        # What a sequence counts in `written`: its K/V layers, and its recurrent state as one more.
        self.seq_layers = num_layers + (1 if self.layout.recurrent else 0)
        self.on_state = on_state  # told of each row whose state was written back (snapshots)
        self.chunk_limit: Callable[[SeqBlocks], int | None] = lambda seq: None  # the cache manager's
        self._state_writes: list[mx.array] = []
        self.policy = "auto"  # working copies: "auto", "always" or "never"
        self.pipelined = False  # set by a pipelined loop: a copy-on-write would wait for its step in flight
        self.copy_room = copy_room  # blocks working copies may take (None: unbounded), from the cache manager
        self.counters = {"steps_gathered": 0, "steps_working_copy": 0, "working_copy_builds": 0}
        self.copy_bytes: dict[int, int] = {}  # id(cache object) -> bytes of its working copy
        self._plan_key = None
        self._plan: _Plan | None = None
        self._offset_key = None
        self._offset: mx.array | None = None
        self.geometry: Geometry | None = None  # of the decode batch's working copies

    def offsets(self, starts: tuple[int, ...]) -> mx.array:
        if starts != self._offset_key:
            self._offset_key, self._offset = starts, mx.array(starts, dtype=mx.int32)
        return self._offset

    def plan(self, rows: list[SeqBlocks], starts: list[int], real: list[int], n: int) -> _Plan:
        """Make room for the new tokens (allocation, copy-on-write) and index them. The first layer
        of a step does the work; the others find it memoized."""
        key = (self.pool.epoch, tuple(rows), tuple(starts), tuple(real), n)
        if key == self._plan_key:
            return self._plan
        self._make_rooms([(row, start, start + count) for row, start, count in zip(rows, starts, real) if count])
        bs = self.pool.block_size
        width = max(-(-(s + n) // bs) for s in starts)
        tables = np.full((len(rows), width), BlockPool.NULL, dtype=np.int64)
        for i, row in enumerate(rows):
            t = row.table[:width]
            tables[i, : len(t)] = t
        plan = _Plan(tables, np.asarray(starts, dtype=np.int64), np.asarray(real, dtype=np.int64), n)
        plan.working_copy = n == 1 and all(real) and self._copy_pays(rows, width)
        if plan.working_copy:
            ident = tuple(rows)
            if self.geometry is None or not self.geometry.advance(ident, starts, self.copy_step):
                self.geometry = Geometry.new(ident, starts, self.copy_step)
        self.counters["steps_working_copy" if plan.working_copy else "steps_gathered"] += 1
        self._plan_key = (self.pool.epoch, *key[1:])
        self._plan = plan
        return plan

    def _copy_pays(self, rows: list[SeqBlocks], width: int) -> bool:
        """Whether a decode batch should keep contiguous working copies of its K/V.

        A working copy makes a decode step as cheap as mlx_lm's contiguous cache (one new token
        written per row, no gather), but it holds each row's whole context once more, shared
        blocks included. So only when less than half of the rows' blocks are shared with another
        sequence (then the copy at most doubles what the rows hold alone) and the copy fits the
        budget. Otherwise every step gathers the rows' blocks, and a shared prefix stays one copy."""
        if self.policy != "auto":
            return self.policy == "always"
        refs = self.pool.refs
        held = sum(len(r.table) for r in rows)
        shared = sum(1 for r in rows for b in r.table if refs[b] > 1)
        if 2 * shared >= held:
            return False
        room = self.copy_room()
        need = len(rows) * (width + -(-self.copy_step // self.pool.block_size)) * self._copy_block_bytes()
        return room is None or -(-need // self.pool.block_bytes) - self.copy_blocks() <= room

    def _copy_block_bytes(self) -> int:
        """Bytes a block's tokens take in a working copy: dense, in the model's dtype, also when
        the blocks are stored quantized."""
        store = self.pool.storage
        return sum(layer_block_bytes(store.layers, store.dtype, self.pool.block_size))

    def copy_blocks(self) -> int:
        """The working copies' bytes, in blocks: budget they take from the running requests."""
        return sum(self.copy_bytes.values()) // max(1, self.pool.block_bytes)

    def _make_room(self, row: SeqBlocks, start: int, end: int) -> None:
        self._make_rooms([(row, start, end)])

    def _make_rooms(self, spans: list[tuple[SeqBlocks, int, int]]) -> None:
        """Blocks for each row's tokens [start, end): a shared or cached block there is copied
        first (copy-on-write, all of the step's copies with one host sync), then new ones."""
        pool, bs = self.pool, self.pool.block_size
        frozen = [
            (row, k)
            for row, start, end in spans
            for k in range(start // bs, min(len(row.table), -(-end // bs)))
            if pool.frozen(row.table[k])
        ]
        copies = pool.copy_blocks([row.table[k] for row, k in frozen])
        for (row, k), new in zip(frozen, copies):
            pool.decref(row.table[k])
            row.table[k] = new
        for row, _, end in spans:
            while len(row.table) * bs < end:
                row.table.append(pool.allocate())

    # --- the batch loop's interface (engine.kv.interface.BatchKV) ----------------------------

    @property
    def recurrent(self) -> bool:
        return self.layout.recurrent

    @property
    def grouped_mask(self) -> bool:
        return self.layout.grouped_mask

    def caches(self, rows: list[SeqBlocks], chunk: list[int] | None = None) -> BatchCaches:
        """The model's cache list for a batch of rows, slot by slot (engine.kv.layout); `chunk`:
        a prompt chunk with `chunk[i]` real tokens in row i follows (right-padded; a recurrent
        model's chunks are never padded)."""
        kv = [BatchPagedKVCache(self, layer, rows) for layer in range(self.num_layers)]
        if chunk is not None:
            for cache in kv:
                cache.set_chunk(chunk)
        out = BatchCaches(kv, rows)
        if not self.layout.recurrent and len(self.layout.slots) == len(kv):
            out.extend(kv)  # plain K/V, one slot per layer
            return out
        advance = list(chunk) if chunk is not None else [1] * len(rows)

        def on_write(cache: BatchStateCache, idx: int, value: mx.array) -> None:
            self._state_writes.append(value)
            if cache.slot.index == 0 and idx == 0:  # each forward call writes it once: count its tokens
                for row, n in zip(rows, advance):
                    if not kv:  # a state-space model: its blocks (no K/V) still key the prefix index
                        self._make_room(row, row.written[-1], row.written[-1] + n)
                    row.written[-1] += n

        def build(slot):
            if isinstance(slot, KVSlot):
                return kv[slot.layer]
            if isinstance(slot, StateSlot):
                cache = BatchStateCache(slot, gather_states(self.layout, slot, rows), on_write)
                out.states.append(cache)
                return cache
            return CacheList(*(build(child) for child in slot.children))

        out.extend(build(slot) for slot in self.layout.slots)
        return out

    def decode_copies(self, caches: BatchCaches) -> list[WorkingCopy] | None:
        """Before a compiled decode step (engine.compiled_step): plan the batch's one-token step and,
        when it goes through working copies, every layer's copy; None when it gathers (the model's
        own call through the caches does that step)."""
        if not caches.kv or not caches.kv[0]._step_plan(1).working_copy:
            return None
        return [c._working_copy() for c in caches.kv]

    @property
    def quant(self):
        """How the blocks are stored (engine.kv.quantized_storage.KVQuant; None: unquantized): a
        compiled decode step stores its column that way and attends to what the blocks hold."""
        return self.pool.storage.quant

    def commit_column(
        self, caches: BatchCaches, ks: list[mx.array], vs: list[mx.array], columns: list | None = None
    ) -> None:
        """A compiled decode step's new copies; `columns`: per layer the step's quantized K and V
        parts (quantized blocks), written to the blocks now."""
        for i, (cache, k, v) in enumerate(zip(caches.kv, ks, vs)):
            cache.commit_column(k, v, columns[i] if columns is not None else None)

    def flush(self, caches: BatchCaches) -> None:
        """Decode tokens held only in working copies go to the rows' blocks; each row's slice of
        the batch's recurrent state becomes its own (and may be snapshotted)."""
        for cache in caches.kv:
            cache.flush()
        if caches.states and caches.states[0].cache[0] is not None:
            write_back(self.layout, caches.states, caches.rows)
            for row in caches.rows:
                self.on_state(row)

    def truncate(self, seq: SeqBlocks, length: int) -> None:
        """Cut a row's K/V back to its first `length` tokens: a verify step wrote draft tokens the
        row did not keep (engine.speculative). The tail is overwritten as the row goes on; its
        blocks stay the row's (they were private copies or new ones: `_make_room`)."""
        if self.layout.recurrent:
            raise ValueError("a recurrent state cannot be cut back")
        seq.written = [min(w, length) for w in seq.written]

    def take_writes(self) -> list[mx.array]:
        writes, self._state_writes = self._state_writes, []
        return self.pool.storage.take_writes() + writes

    def nbytes(self, rows: list[SeqBlocks]) -> int:
        return len({b for r in rows for b in r.table}) * self.pool.block_bytes

    def mask(self, starts: list[int], n: int, window_size: int | None) -> mx.array:
        """[B, 1, N, L] bool: query i of row b (position starts[b] + i) sees key j iff j <= its
        position (and j is less than window_size back)."""
        bs = self.pool.block_size
        width = max(-(-(s + n) // bs) for s in starts) * bs
        q = np.asarray(starts)[:, None] + np.arange(n)[None, :]
        j = np.arange(width)[None, None, :]
        m = j <= q[:, :, None]
        if window_size is not None:
            m &= j > q[:, :, None] - window_size
        return mx.array(m[:, None])


class BatchPagedKVCache(_BaseCache):
    """One layer's cache for a batch of sequences, each a SeqBlocks in the pool."""

    def __init__(self, ctx: PagedContext, layer: int, rows: list[SeqBlocks]):
        self.ctx = ctx
        self.layer = layer
        self.rows = list(rows)
        self._real_left: list[int] | None = None  # real tokens left per row in a right-padded prompt
        self._copy: dict | None = None  # decode working copy (see _through_copy)

    # --- what the model sees -------------------------------------------------------------

    def _starts(self) -> list[int]:
        return [r.written[self.layer] for r in self.rows]

    @property
    def offset(self):
        return self.ctx.offsets(tuple(self._starts()))

    def _step_plan(self, n: int) -> _Plan:
        starts = self._starts()
        real = [n] * len(self.rows) if self._real_left is None else [min(n, left) for left in self._real_left]
        return self.ctx.plan(self.rows, starts, real, n)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        plan = self._step_plan(n)
        if self._real_left is not None:
            self._real_left = [left - r for left, r in zip(self._real_left, plan.real.tolist())]
        if plan.working_copy:
            out = self._through_copy(keys, values)
        else:
            self._drop_copy()
            pool = self.ctx.pool
            store = pool.storage
            heads = store.layers[self.layer].kv_heads
            store.write(self.layer, plan.rows(heads, pool.block_size), keys, values)
            out = store.read(self.layer, plan.slabs(heads))
        for row, count in zip(self.rows, plan.real.tolist()):
            row.written[self.layer] += count
        return out

    def _through_copy(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Decode through the working copy (engine.kv.working_copy): built by one gather when the
        geometry is new, then one column per step; the tokens reach the pool at `flush`. Quantized
        blocks: the column is written to them now and the copy takes what they hold."""
        quant = self.ctx.pool.storage.quant
        if quant is None:
            return self._working_copy().append(keys, values)
        (k, kparts), (v, vparts) = quant.round_trip(keys), quant.round_trip(values)
        self._write_through(kparts, vparts)
        return self._working_copy().append(k, v)

    def _write_through(self, kparts, vparts) -> None:
        """This decode step's quantized column into the rows' blocks (the copy then has nothing
        of its own to flush: re-quantizing its dequantized values would not give them back)."""
        pool = self.ctx.pool
        rows = self._step_plan(1).rows(pool.storage.layers[self.layer].kv_heads, pool.block_size)
        pool.storage.write_parts(self.layer, rows, kparts, vparts)
        self._working_copy().flushed = self.ctx.geometry.col

    def _working_copy(self) -> WorkingCopy:
        """This layer's copy for the decode batch's geometry, at the geometry's capacity."""
        geom = self.ctx.geometry
        if self._copy is None or self._copy.geom is not geom:
            self._drop_copy()
            self._copy = WorkingCopy(self.ctx.pool, self.layer, geom, [r.table for r in self.rows], self._starts())
            self.ctx.counters["working_copy_builds"] += 1
            self.ctx.copy_bytes[id(self)] = self._copy.nbytes
        elif self._copy.fit():
            self.ctx.copy_bytes[id(self)] = self._copy.nbytes
        return self._copy

    def commit_column(self, k: mx.array, v: mx.array, parts=None) -> None:
        """A compiled decode step wrote this step's column: its copy's new K and V (and, for
        quantized blocks, the column's stored parts: (K's, V's))."""
        self._copy.k, self._copy.v = k, v
        if parts is not None:
            self._write_through(*parts)
        for row in self.rows:
            row.written[self.layer] += 1

    def flush(self) -> None:
        """Write the decode tokens held only in the working copy into the rows' blocks."""
        if self._copy is not None:
            self._copy.flush([r.table for r in self.rows])

    def _drop_copy(self) -> None:
        if self._copy is not None:
            self.flush()
            self._copy = None
            self.ctx.copy_bytes.pop(id(self), None)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs):
        if self._step_plan(N).working_copy:
            mask = self.ctx.geometry.mask(window_size, return_array)
        else:
            mask = self.ctx.mask(self._starts(), N, window_size)
        if self.ctx.layout.grouped_mask and isinstance(mask, mx.array) and mask.ndim == 4:
            mask = mask[:, :, None]  # [B, 1, 1, N, L] for queries grouped [B, kv_heads, repeats, N, D]
        return mask

    def set_chunk(self, real: list[int]) -> None:
        """The next forward call is a right-padded prompt chunk with `real[i]` real tokens in row i
        (the padding is written to the trash block)."""
        self._real_left = list(real)

    def __del__(self):
        self.ctx.copy_bytes.pop(id(self), None)

    @property
    def state(self):
        """The layer's pool arrays: evaluating them commits every write issued so far."""
        return self.ctx.pool.storage.layer_state(self.layer)

    @state.setter
    def state(self, v):
        raise NotImplementedError("a paged cache cannot be restored from a state")

    @property
    def nbytes(self) -> int:
        """The layer's share of the distinct blocks the rows hold, plus a working copy if any."""
        blocks = {b for r in self.rows for b in r.table}
        copy_bytes = self.ctx.copy_bytes.get(id(self), 0) if self._copy is not None else 0
        return len(blocks) * self.ctx.pool.storage.layer_block_bytes[self.layer] + copy_bytes

    def size(self) -> int:
        return max(self._starts(), default=0)

    def empty(self) -> bool:
        return not self.rows or self.size() == 0
