"""The two cache managers (engine.kv.interface.CacheManager) and the factory that picks one.

`NoCache` computes every prompt from scratch: the model keeps mlx_lm's own contiguous caches and
mlx_lm's BatchGenerator runs it (engine.mlx_lm_batch). `PagedCacheManager` keeps all K/V in a
block pool (engine.kv.block_pool): running requests that share a prefix share its blocks,
finished prompts stay cached within a byte budget (or an entry count), and a new prompt reuses
the longest cached prefix (engine.kv.prefix_cache). Our batch loop reads and writes the blocks
through `PagedContext` (engine.kv.paged_cache).

How a request goes through the paged cache:
- `can_admit`: it waits while a running request is computing full blocks of its prompt that are
  not indexed yet (a request that arrived together with the same system prompt reuses them once
  written instead of computing them again), or while the blocks its prompt needs now, plus one to
  grow into, do not fit next to the blocks in use and the working copies (admission by use). With
  `kv_admission: reserve` it waits instead while its worst case (prompt + max_tokens, in blocks)
  does not fit next to the running requests' worst cases. A request alone always runs, even one
  larger than the budget (the pool grows past it, logged).
- `acquire`: the longest indexed prefix (full blocks by chained hash, then the best partial block,
  but while a pipelined loop runs whole blocks only: a copy would wait for its step in flight) is
  referenced; at most all but the last prompt token (HIT), else PREFIX_HIT or MISS. As it runs,
  each full prompt block it finishes is indexed at once (`_sync`).
- `can_allocate`, before every step: the blocks the step may take (a decoding row crossing into a
  new block or copying a shared one, a prompt chunk's new blocks plus a copy of a shared partial
  one) against `headroom`. When they do not fit, the scheduler preempts the newest request.
- `store` indexes the rest of its blocks (prompt and output, and the last partial block), `release`
  does not; both drop its references. Unreferenced indexed blocks stay cached until evicted (LRU,
  tails first) or, with memory_aware False, until their entry falls out of the last
  max_cache_entries.

The budget, in blocks (memory-aware mode; entry-count mode has none):
- `BlockPool.capacity`: what the byte budget buys (`budget_bytes` / block bytes, less the reserved
  blocks); `WORKING_COPY_SHARE` of it is left to decode working copies by cached (unreferenced)
  blocks (`BlockPool.cache_capacity`). `headroom()`: what running requests may still take (capacity
  less the blocks in use and the working copies; cached blocks are evicted when needed).
  `copy_room()`: what working copies may take (capacity less what the pool holds or has promised).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mlx.core as mx

from ..config import EngineConfig
from .block_pool import BlockPool
from .disk_tier import DiskTier, open_disk_tier
from .interface import CacheManager, StepWrites
from .kv_storage import LayerShape
from .layout import CacheLayout, KVSlot, probe_layout
from .paged_cache import PagedContext, SeqBlocks
from .prefix_cache import PrefixCache
from .quantized_storage import KVQuant, kv_quant, storage_block_bytes
from .snapshots import SnapshotStore

log = logging.getLogger(__name__)


class NoCache:
    """Every prompt is computed from scratch, in mlx_lm's own caches (no budget to decide on)."""

    def __init__(self, budget_bytes: int, why: str = "paged_cache is off"):
        self.budget_bytes = budget_bytes
        self.why = why

    def can_admit(self, tokens: list[int], max_tokens: int) -> bool:
        return True

    def acquire(self, tokens: list[int], max_tokens: int) -> tuple[None, int]:
        return None, 0

    def can_allocate(self, writes: StepWrites) -> bool:
        return True

    def store(self, token_ids: list[int], blocks: None) -> None:
        return None

    def release(self, blocks: None) -> None:
        return None

    def clear(self) -> None:
        return None

    def begin_step(self) -> None:
        return None

    def recover(self) -> None:
        return None

    def block_hashes(self, token_ids: list[int]) -> list[bytes]:
        return []

    def resident(self, hashes: list[bytes]) -> int:
        return 0

    def stats(self) -> dict:
        return {"enabled": False, "path": "mlx_lm", "why": self.why, "kv_bits": 16}

    def batch_kv(self) -> None:
        return None

    def close(self, timeout_s: float) -> None:
        return None


# Share of the budget that cached (unreferenced) blocks leave to decode working copies; running
# requests may still take the whole budget (then decode gathers blocks instead).
WORKING_COPY_SHARE = 0.25


class PagedCacheManager:
    """Paged KV cache with prefix sharing for one model."""

    def __init__(
        self,
        layers: list[LayerShape],
        dtype: mx.Dtype,
        config: EngineConfig,
        salt: bytes = b"",
        layout: CacheLayout | None = None,
    ):
        bs = config.block_size
        self.layout = (
            layout if layout is not None else CacheLayout([KVSlot(i) for i in range(len(layers))], layers, dtype)
        )
        # A state-space model has no K/V: its blocks are bookkeeping only (the prefix index's keys),
        # and the budget is counted in bytes: the bytes blocks take as stored (quantized or not).
        quant = kv_quant(config.kv_bits, config.kv_group_size)
        unit = sum(storage_block_bytes(layers, dtype, bs, quant)) or 1
        self.budget_bytes = budget_bytes(config)
        self.memory_aware = config.memory_aware
        self.reserve = config.kv_admission == "reserve"
        self.snapshots: SnapshotStore | None = None
        self.state_blocks = 0  # what one running sequence's recurrent state takes, in blocks
        self.interval = 0
        self.min_gap = 0  # tokens (see below)
        pool_bytes = self.budget_bytes
        if self.layout.recurrent:
            share = int(self.budget_bytes * config.state_cache_share)
            self.snapshots = SnapshotStore(share, bs)
            pool_bytes -= share
            self.state_blocks = -(-self.layout.state_bytes // unit)
            self.interval = -(-config.state_interval // bs) * bs
            # A snapshot this close after another one of the same sequence costs more memory than
            # recomputing the tokens between them saves: one-eighth of the tokens whose K/V would
            # take the snapshot's bytes (models with K/V; a state-space model has only its states).
            kv_token_bytes = unit // bs if layers else 0
            self.min_gap = self.layout.state_bytes // kv_token_bytes // 8 if kv_token_bytes else 0
        capacity = max(1, pool_bytes // unit - BlockPool.RESERVED) if self.memory_aware else None
        self.pool = BlockPool(
            layers, dtype, bs, capacity, cache_share=1 - WORKING_COPY_SHARE, on_evict=self._forget_evicted, quant=quant
        )
        self.ctx = PagedContext(
            self.pool, len(layers), copy_room=self.copy_room, layout=self.layout, on_state=self._on_state
        )
        self.ctx.chunk_limit = self._chunk_limit
        self.index = PrefixCache(self.pool, salt, None if self.memory_aware else config.max_cache_entries)
        self.live: dict[int, SeqBlocks] = {}  # id -> a running request's blocks
        self.disk: DiskTier | None = None  # engine.kv.disk_tier (attached by make_cache_manager)
        self.disk_why = "engine.disk_cache.enabled is false"

    # --- the seam --------------------------------------------------------------------------

    def can_admit(self, tokens: list[int], max_tokens: int) -> bool:
        """False while the request should wait: a running request is computing blocks of its
        prefix (it will reuse them once written), or its prompt's new blocks (plus one to grow
        into) do not fit next to the running requests' blocks (`kv_admission: reserve`: its worst
        case next to theirs). A request alone always runs."""
        if not self.live:
            return True
        self._sync()
        match = self.index.lookup(tokens)
        if match.pending:
            return False
        if self.pool.capacity is None:
            return True
        table, cached, _ = self._reuse(match, len(tokens))
        pinned = sum(1 for b in table if self.pool.refs[b] > 0)  # already counted as used
        if self.reserve:
            need = self._worst_case(len(tokens), max_tokens) - pinned + self.state_blocks
            return self.pool.used + self._live_state() + self._outstanding() + need <= self.pool.capacity
        bs = self.pool.block_size
        fresh = -(-len(tokens) // bs) - cached // bs  # blocks beyond the reused ones (a partial one is copied)
        need = len(table) - pinned + fresh + 1 + self.state_blocks
        return need <= self.headroom()

    def acquire(self, tokens: list[int], max_tokens: int) -> tuple[SeqBlocks, int]:
        """The blocks of the longest cached prefix of `tokens` (all but the last token at most),
        referenced, and how many tokens that is."""
        self._sync()
        match = self._from_disk(self.index.lookup(tokens), tokens)
        table, cached, resume = self._reuse(match, len(tokens))
        for b in table:
            self.pool.incref(b)
        self.index.touch(table)
        self.index.record(cached, len(tokens))
        worst = self._worst_case(len(tokens), max_tokens)
        seq = SeqBlocks(table, cached, self.ctx.seq_layers, worst, tokens, match.hashes, len(match.blocks))
        if resume is not None:
            seq.state = self.snapshots.take(*resume)
            seq.last_state = cached
        if self.snapshots is not None:  # cached K/V went further than any state: snapshot there
            seq.match_end = min(match.tokens(self.pool.block_size), len(tokens) - 1)
        for h in match.hashes[len(match.blocks) :]:  # the blocks this request will compute
            if h not in self.index.full:
                self.index.pending.setdefault(h, seq)
        self.live[id(seq)] = seq
        return seq, cached

    def can_allocate(self, writes: StepWrites) -> bool:
        """Whether the blocks the next step may take fit `headroom` (always, without a budget)."""
        room = self.headroom()
        if room is None:
            return True
        bs = self.pool.block_size
        at_most = 2 * len(writes.decode) + sum(-(-n // bs) + 2 for _, n in writes.prefill)
        if room >= at_most:  # the common case: no look at the tables
            return True
        return self._blocks_needed(writes) <= room

    def _blocks_needed(self, writes: StepWrites) -> int:
        """New blocks the step takes at most: a decoding row crossing into a new block (or copying
        a shared one), and a prompt chunk's new blocks plus a copy of a shared partial block."""
        pool, bs = self.pool, self.pool.block_size
        need = 0
        for seq in writes.decode:
            k = seq.length // bs
            need += k >= len(seq.table) or pool.frozen(seq.table[k])
        for seq, n in writes.prefill:
            need += max(0, -(-(seq.length + n) // bs) - len(seq.table)) + 1
        return need

    def store(self, token_ids: list[int], blocks: SeqBlocks | None) -> None:
        """A request finished: index its blocks under `token_ids` (the tokens whose K/V it holds)
        and drop its references. A recurrent model's state at that point is kept too."""
        seq = self._live(blocks)
        if seq is None:
            return
        self._sync()
        n = min(len(token_ids), seq.length, len(seq.table) * self.pool.block_size)
        bs = self.pool.block_size
        hashes = seq.prompt_hashes[: n // bs]
        hashes += self.index.chain(token_ids[:n], self.index.parent_of(hashes, len(hashes)), len(hashes))
        for k, h in enumerate(hashes):
            self.index.insert(self.index.parent_of(hashes, k), tuple(token_ids[k * bs : (k + 1) * bs]), seq.table[k], h)
        if n % bs:
            k = n // bs
            self.index.insert(self.index.parent_of(hashes, k), tuple(token_ids[k * bs : n]), seq.table[k])
        self._offer(hashes)
        if self.snapshots is not None:
            if seq.state is not None and seq.state_len == n > 0:  # the conversation so far: the next turn's
                seq.snapshots.append((n, seq.state))
            self._attach(seq, token_ids[:n], hashes)
        self._end(seq)

    def release(self, blocks: SeqBlocks | None) -> None:
        """A request ended without a result worth keeping (abort): drop its references. Prompt
        blocks it had already computed stay indexed."""
        seq = self._live(blocks)
        if seq is not None:
            self._sync()
            self._offer(seq.prompt_hashes[: seq.registered])
            self._end(seq)

    def clear(self) -> None:
        """Forget every cached prefix; blocks of running requests stay theirs until they end. The
        disk tier keeps its files (a later prompt may read them back)."""
        self.index.clear()
        if self.snapshots is not None:
            self.snapshots.clear()
        self.pool.shrink()
        self.pool.peak_used = self.pool.used

    def begin_step(self) -> None:
        """A step starts: what each running sequence holds now is known good (see `recover`)."""
        for seq in self.live.values():
            seq.good = seq.length

    def recover(self) -> None:
        """After a failed step, before its sequences are released: blocks they wrote in that step
        leave the index (their K/V may be half-done), so do snapshots taken in it; everything
        indexed before it, and every other request's blocks, stay. Only when the pool's arrays
        themselves cannot be evaluated any more is the whole cache dropped."""
        storage = self.pool.storage
        try:
            mx.eval(storage.k, storage.v)
        except Exception:  # noqa: BLE001 - the arrays hold the failure: nothing in them can be trusted
            log.exception("the KV pool cannot be evaluated after the failed step: prefix cache cleared")
            storage.k, storage.v = storage.zeroed()
            self.clear()
        bs = self.pool.block_size
        for seq in self.live.values():
            seq.registered = len(seq.prompt_hashes)  # nothing more of it is indexed
            seq.snapshots = []
            for b in seq.table[seq.good // bs :]:
                if b in self.index.meta:
                    self.index.forget(b)
                    self.pool.set_cached(b, False)
                    if self.snapshots is not None:
                        self.snapshots.forget_block(b)

    def block_hashes(self, token_ids: list[int]) -> list[bytes]:
        """Chain hashes of a prompt's full blocks, the prefix index's keys. Pure: any thread."""
        return self.index.chain(token_ids)

    def resident(self, hashes: list[bytes]) -> int:
        """Leading blocks of a chain the index holds now (the loop thread only); for a recurrent
        model, only up to the last of them a state snapshot is on (the rest cannot be resumed)."""
        n = self.index.resident(hashes)
        if self.snapshots is not None:
            while n and self.index.full[hashes[n - 1]] not in self.snapshots.on_block:
                n -= 1
        return n

    def stats(self) -> dict:
        """Read-only (other threads may call it while the engine steps)."""
        out = {
            "enabled": True,
            "path": "paged",
            "why": f"mlx_lm's caches for this model are pageable ({self.layout.describe()})",
            "mode": "memory" if self.memory_aware else "entries",
            "budget_bytes": self.budget_bytes if self.memory_aware else None,
            "live_sequences": len(self.live),
            **self.index.stats(),
            **self.pool.stats(),
            "working_copy_bytes": sum(self.ctx.copy_bytes.values()),
            **self.ctx.counters,
        }
        out["disk"] = self.disk.stats() if self.disk is not None else {"enabled": False, "why": self.disk_why}
        if self.snapshots is not None:
            out |= self.snapshots.stats()
            out |= {
                "state_bytes_per_sequence": self.layout.state_bytes,
                "snapshot_budget_bytes": self.snapshots.budget_bytes,
            }
        return out

    def batch_kv(self) -> PagedContext:
        return self.ctx

    def close(self, timeout_s: float) -> None:
        """The engine stops: write what the disk tier has queued, for `timeout_s` at most."""
        if self.disk is not None:
            self.disk.close(timeout_s)

    # --- the disk tier (engine.kv.disk_tier) ---------------------------------------------------

    def _from_disk(self, match, tokens: list[int]):
        """Continue a prefix match past the RAM index down the disk tier: each full block found
        there (and whole) is read into a fresh pool block and indexed, while the budget has room;
        then the match is made again over the longer index."""
        hashes, k, bs = match.hashes, len(match.blocks), self.pool.block_size
        if self.disk is None or k >= len(hashes):
            return match
        arrays = self._disk_read(hashes, tokens, k)
        if arrays is None:
            return match
        held = list(match.blocks)
        for b in held:  # not evicted to make room for their own continuation
            self.pool.incref(b)
        try:
            while arrays is not None and (self.pool.capacity is None or self.headroom() > 1):
                block = self.pool.allocate()
                held.append(block)
                self.pool.storage.load_block(block, arrays)
                parent, toks = self.index.parent_of(hashes, k), tuple(tokens[k * bs : (k + 1) * bs])
                if not self.index.insert(parent, toks, block, hashes[k]):
                    break
                k += 1
                arrays = self._disk_read(hashes, tokens, k) if k < len(hashes) else None
        finally:
            self.pool.release(held)
        return self.index.lookup(tokens, hashes)

    def _disk_read(self, hashes: list[bytes], tokens: list[int], k: int):
        bs = self.pool.block_size
        return self.disk.read(hashes[k], self.index.parent_of(hashes, k), tuple(tokens[k * bs : (k + 1) * bs]))

    def _offer(self, hashes: list[bytes]) -> None:
        """Offer the indexed full blocks of a chain to the disk tier (those not there yet)."""
        if self.disk is None or not self.disk.writing:
            return
        for h in hashes:
            b = self.index.full.get(h)
            if b is not None and not self.disk.has(h):
                parent, toks, _ = self.index.meta[b]
                self.disk.offer(h, parent, toks, lambda b=b: self.pool.storage.block_arrays(b))

    # --- the budget (in blocks; None: entry-count mode, no budget) ----------------------------

    def headroom(self) -> int | None:
        """Blocks the running requests may still take: the capacity less the blocks in use, the
        working copies and the running sequences' recurrent state. Cached blocks count as free:
        they are evicted when needed."""
        if self.pool.capacity is None:
            return None
        return self.pool.capacity - self.pool.used - self.ctx.copy_blocks() - self._live_state()

    def copy_room(self) -> int | None:
        """Blocks decode working copies may take: the capacity less what the pool holds or may
        grow into for the running requests."""
        if self.pool.capacity is None:
            return None
        held = max(self.pool.total, self.pool.used + self._outstanding())
        return self.pool.capacity - held - self._live_state()

    def _live_state(self) -> int:
        """The running sequences' recurrent state, in blocks (0 for a model without one)."""
        return self.state_blocks * len(self.live)

    def _outstanding(self) -> int:
        """Blocks the running requests may still take in the worst case (reserve mode only)."""
        if not self.reserve:
            return 0
        return sum(max(0, s.max_blocks - len(s.table)) for s in self.live.values())

    # --- internals -------------------------------------------------------------------------

    def _reuse(self, match, prompt_len: int) -> tuple[list[int], int, tuple[int, int] | None]:
        """The blocks to reference and the tokens they give: all but the prompt's last token at
        most (mlx_lm needs one token to compute the first logits). A recurrent model resumes only
        where a snapshot of its state is: also the snapshot's place (block, m)."""
        bs = self.pool.block_size
        if self.snapshots is not None:
            cached, block, m = self.snapshots.best(
                match.blocks, match.partial_block, match.partial_tokens, prompt_len - 1
            )
            if cached == 0:
                return [], 0, None
            return match.blocks[: -(-cached // bs) - 1] + [block], cached, (block, m)
        cached = min(match.tokens(bs), prompt_len - 1)
        if cached == 1 and prompt_len > 2:  # a lone shared BOS is no prefix worth a copy-on-write
            cached = 0
        cached -= cached % bs if self.ctx.pipelined and self.live else 0  # a copy would stall the running step
        nblocks = -(-cached // bs)
        table = match.blocks[:nblocks]
        if nblocks > len(table):
            table.append(match.partial_block)
        return table, cached, None

    def _worst_case(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks a request can hold at most: prompt + max_tokens, plus one copy-on-write."""
        return -(-(prompt_len + max_tokens) // self.pool.block_size) + 1

    def _forget_evicted(self, block: int) -> None:
        """The pool evicted a cached block: the prefix index forgets it (and its snapshots go)."""
        self.index.forget(block)
        if self.snapshots is not None:
            self.snapshots.forget_block(block)

    # --- recurrent state (engine.kv.snapshots) -------------------------------------------------

    def _chunk_limit(self, seq: SeqBlocks) -> int | None:
        """Prompt tokens a row may compute before its next snapshot point (the loop ends its chunk
        there); None: no limit."""
        if self.snapshots is None:
            return None
        length, end = seq.length, len(seq.tokens) - 1
        if length >= end:
            return None
        stop = min(end, (length // self.interval + 1) * self.interval) if self.interval else end
        if length < seq.match_end < stop:
            stop = seq.match_end
        return stop - length

    def _on_state(self, seq: SeqBlocks) -> None:
        """A row's state was written back: keep a snapshot if it stands at a snapshot point of its
        prompt: every `interval` tokens, the prompt's end, and where its match with cached K/V
        ended (a second prompt that shares a system prompt with the first and then differs
        leaves a snapshot where they part: the third resumes there)."""
        n = seq.state_len
        if self.snapshots is None or seq.state is None or id(seq) not in self.live:
            return
        end = len(seq.tokens) - 1
        at_point = n == seq.match_end or (self.interval and n < end and n % self.interval == 0)
        at_point = at_point or (n == end and self._pays(seq, n))
        if at_point and n > 0 and all(p != n for p, _ in seq.snapshots):
            seq.snapshots.append((n, list(seq.state)))
            seq.last_state = n

    def _pays(self, seq: SeqBlocks, n: int) -> bool:
        """Whether a prompt-end snapshot is worth its bytes: not when the sequence resumed from or
        took one fewer than `min_gap` tokens before (a repeat then recomputes those few tokens from
        there: a short question after a shared system prompt keeps no state of its own)."""
        return seq.last_state == 0 or n - seq.last_state >= self.min_gap

    def _attach(self, seq: SeqBlocks, tokens: list[int], hashes: list[bytes]) -> None:
        """Store the row's snapshots on the indexed blocks holding their last tokens (those not yet
        indexed stay pending): its chain's block (a repeat walks that chain) and the one a lookup
        of its tokens names (`holder`, maybe a sibling's: a prompt parting there resumes from it).
        `tokens`, `hashes`: what the row's blocks hold, and their full blocks' chain."""
        bs = self.pool.block_size
        pending = []
        for n, arrays in seq.snapshots:
            k = (n - 1) // bs
            blocks = set()
            if k < len(hashes) or (k >= len(seq.prompt_hashes) and n <= len(tokens)):
                blocks.add(self.index.holder(self.index.parent_of(hashes, k), tuple(tokens[k * bs : n])))
                if k < len(hashes):
                    blocks.add(self.index.full.get(hashes[k]))
            blocks.discard(None)
            if not blocks:  # its own block is not indexed yet (a prompt block still being written)
                pending.append((n, arrays))
            for block in blocks:
                self.snapshots.add(block, n - k * bs, arrays, self.layout.state_bytes)
        seq.snapshots = pending

    def _sync(self) -> None:
        """Index the prompt blocks running requests have finished writing, so that requests with
        the same prefix can share them now, and store their state snapshots on indexed blocks."""
        bs = self.pool.block_size
        for seq in self.live.values():
            hashes = seq.prompt_hashes
            if seq.registered < len(hashes):
                upto = min(seq.length // bs, len(hashes), len(seq.table))
                for k in range(seq.registered, upto):
                    if self.index.pending.get(hashes[k]) is seq:
                        del self.index.pending[hashes[k]]
                    tokens = tuple(seq.tokens[k * bs : (k + 1) * bs])
                    self.index.insert(self.index.parent_of(hashes, k), tokens, seq.table[k], hashes[k])
                seq.registered = max(seq.registered, upto)
            if seq.snapshots:  # those on blocks indexed by now (by it or before it) are stored
                done = seq.registered
                self._attach(seq, seq.tokens[: done * bs], hashes[:done])

    def _live(self, blocks: SeqBlocks | None) -> SeqBlocks | None:
        return blocks if blocks is not None and id(blocks) in self.live else None

    def _end(self, seq: SeqBlocks) -> None:
        for h in seq.prompt_hashes[seq.registered :]:
            if self.index.pending.get(h) is seq:
                del self.index.pending[h]
        self.index.add_entry(seq.table)
        self.pool.release(seq.table)
        seq.table = []
        del self.live[id(seq)]
        self.index.trim_entries()


def budget_bytes(config: EngineConfig) -> int:
    """The KV cache's byte budget: `cache_memory_mb`, else `cache_memory_percent` of the host's memory."""
    if config.cache_memory_mb is not None:
        return config.cache_memory_mb * 2**20
    import psutil

    return int(psutil.virtual_memory().total * config.cache_memory_percent)


def probe_layers(model) -> tuple[list[LayerShape], mx.Dtype] | None:
    """Per-layer K/V shapes and dtype (engine.kv.layout); None when the model's caches are not
    all K/V."""
    layout = probe_layout(model)
    if layout.why_not is not None or layout.recurrent or len(layout.slots) != len(layout.kv_layers):
        return None
    return layout.kv_layers, layout.kv_dtype


def model_salt(model, layers: list[LayerShape], dtype, quant: KVQuant | None = None) -> bytes:
    """The cache identity of a model's blocks: its module, args and K/V shapes, and how blocks are
    stored (quantized blocks never share a hash with unquantized ones or another width)."""
    args = getattr(model, "args", None)
    text = f"{type(model).__module__}|{args!r}|{layers!r}|{dtype}"
    if quant is not None:
        text += f"|kv_bits={quant.bits}|kv_group_size={quant.group_size}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def make_cache_manager(
    model, config: EngineConfig, disk_root: Path | None = None, weights_id: str | None = None
) -> CacheManager:
    """The paged cache when the config asks for it and mlx_lm's caches for the model are kinds it
    holds (engine.kv.layout), else `NoCache` (mlx_lm's own caches and loop), saying why. With
    `engine.disk_cache` on, a model with K/V only also gets its disk tier, under `disk_root` (or
    the config's path) and keyed on `weights_id` (a digest of its files)."""
    if not config.paged_cache:
        return _no_cache(config, "paged_cache is off in the engine config")
    try:
        layout = probe_layout(model)
    except Exception as exc:  # noqa: BLE001 - an odd model: run it without the paged cache
        log.exception("probing the model's caches failed; paged cache off")
        layout = CacheLayout(why_not=f"probing the model's caches failed: {type(exc).__name__}: {exc}")
    if layout.why_not is not None:
        log.warning("paged cache off for this model, prompts computed from scratch: %s", layout.why_not)
        return _no_cache(config, layout.why_not)
    salt = model_salt(model, layout.kv_layers, layout.kv_dtype, kv_quant(config.kv_bits, config.kv_group_size))
    manager = PagedCacheManager(layout.kv_layers, layout.kv_dtype, config, salt, layout)
    if config.disk_cache.enabled and layout.recurrent:
        manager.disk_why = "recurrent state (hybrid or state-space model): its snapshots are not kept on disk"
        if weights_id is not None:  # the engine's own cache (not a load-time check's)
            log.warning("disk KV cache off for this model: %s", manager.disk_why)
    elif config.disk_cache.enabled:
        manager.disk, manager.disk_why = open_disk_tier(config, disk_root, weights_id, salt, manager.pool.storage)
    return manager


def _no_cache(config: EngineConfig, why: str) -> NoCache:
    if config.kv_bits < 16:
        log.warning("kv_bits %d applies to the paged cache only: this model's K/V stay unquantized", config.kv_bits)
    return NoCache(budget_bytes(config), why)
