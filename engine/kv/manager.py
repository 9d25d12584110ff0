"""The KV cache seam of the scheduler.

A cache manager hands the scheduler a prompt cache for the part of a prompt it already holds
(`acquire`) and takes it back when the request ends: `store` after a normal finish (what it
computed may serve later prompts), `release` after an abort. `can_admit` says whether a request may
start now or must wait (the KV budget is taken, or a running request is computing the same
prefix). The scheduler hands the cache and the rest of the prompt to its batch loop; mlx_lm's cache
protocol (`update_and_fetch`, `make_mask`) does the attention.

    cache, cached_tokens = manager.acquire(prompt_ids, max_tokens)
    ...   # loop.insert(cache, prompt_ids, cached_tokens, ...) (engine.batch_loop)
    manager.store(prompt_ids + output_ids[:-1], cache)   # or manager.release(cache)

`NoCache` computes every prompt from scratch with mlx_lm's own contiguous caches (and mlx_lm's
BatchGenerator as the loop). `PagedCacheManager`
keeps all K/V in a block pool (engine.kv.block_pool): running requests that share a prefix share its
blocks, finished prompts stay cached within a byte budget (or an entry count), and a new prompt
reuses the longest cached prefix (engine.kv.prefix_cache). engine.kv.paged_cache has the cache classes
mlx_lm's models and BatchGenerator talk to.

How a request goes through the paged cache:
- `can_admit`: it waits while a running request is computing full blocks of its prompt that are
  not indexed yet (a request that arrived together with the same system prompt reuses them once
  written instead of computing them again), or while its worst case (prompt + max_tokens, in
  blocks) does not fit the budget next to the running requests' worst cases: a running request can
  then never run out of blocks. A request alone always runs, even one larger than the budget (the
  pool grows past it, logged).
- `acquire`: the longest indexed prefix (full blocks by chained hash, then the best partial block)
  is referenced, never copied; at most all but the last prompt token (HIT), else PREFIX_HIT or
  MISS. As it runs, each full prompt block it finishes is indexed at once (`_sync`).
- `store` indexes the rest of its blocks (prompt and output, and the last partial block), `release`
  does not; both drop its references. Unreferenced indexed blocks stay cached until evicted (LRU,
  tails first) or, with memory_aware False, until their entry falls out of the last
  max_cache_entries.
"""

from __future__ import annotations

import hashlib
import logging

import mlx.core as mx

from ..config import EngineConfig
from .block_pool import BlockPool
from .kv_storage import LayerShape, layer_block_bytes
from .paged_cache import PagedContext, PagedKVCache, SeqBlocks
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)


class NoCache:
    """Every prompt is computed from scratch."""

    def can_admit(self, prompt_ids: list[int], max_tokens: int) -> bool:
        return True

    def acquire(self, prompt_ids: list[int], max_tokens: int = 0):
        return None, 0

    def store(self, token_ids: list[int], prompt_cache) -> None:
        return None

    def release(self, prompt_cache) -> None:
        return None

    def clear(self) -> None:
        return None

    def block_hashes(self, token_ids: list[int]) -> list[bytes]:
        return []

    def resident(self, hashes: list[bytes]) -> int:
        return 0

    def stats(self) -> dict:
        return {"enabled": False}


# Share of the byte budget that cached (unreferenced) blocks leave to decode working copies; running
# requests may still take the whole budget (then decode gathers blocks instead).
WORKING_COPY_SHARE = 0.25


class PagedCacheManager:
    """Paged KV cache with prefix sharing for one model."""

    def __init__(self, layers: list[LayerShape], dtype: mx.Dtype, config: EngineConfig, salt: bytes = b""):
        bs = config.block_size
        block_bytes = sum(layer_block_bytes(layers, dtype, bs))
        self.budget_bytes = budget_bytes(config)
        self.memory_aware = config.memory_aware
        self.reserve = config.kv_admission == "reserve"
        capacity = max(1, self.budget_bytes // block_bytes - BlockPool.RESERVED) if self.memory_aware else None
        self.pool = BlockPool(
            layers, dtype, bs, capacity, cache_share=1 - WORKING_COPY_SHARE, on_evict=self._forget_evicted
        )
        self.ctx = PagedContext(self.pool, len(layers), room=self._room)
        self.index = PrefixCache(self.pool, salt, None if self.memory_aware else config.max_cache_entries)
        self.live: dict[int, SeqBlocks] = {}  # uid -> running sequence

    # --- the seam --------------------------------------------------------------------------

    def can_admit(self, prompt_ids: list[int], max_tokens: int) -> bool:
        """False while the request should wait: a running request is computing blocks of its
        prefix (it will reuse them once written), or its prompt's new blocks (plus one to grow
        into) do not fit next to the running requests' blocks (`kv_admission: reserve`: its worst
        case next to theirs). A request alone always runs."""
        if not self.live:
            return True
        self._sync()
        match = self.index.lookup(prompt_ids)
        if match.pending:
            return False
        if self.pool.capacity is None:
            return True
        table, cached = self._reuse(match, len(prompt_ids))
        pinned = sum(1 for b in table if self.pool.refs[b] > 0)  # already counted as used
        if self.reserve:
            need = self._worst_case(len(prompt_ids), max_tokens) - pinned
            return self.pool.used + self._outstanding() + need <= self.pool.capacity
        bs = self.pool.block_size
        fresh = -(-len(prompt_ids) // bs) - cached // bs  # blocks beyond the reused ones (a partial one is copied)
        need = len(table) - pinned + fresh + 1
        return self.pool.used + need <= self.pool.capacity - self.ctx.copies_in_blocks()

    def headroom(self) -> int | None:
        """Blocks the running requests may still take before the budget is used up (None: no
        budget). Cached blocks count as free: they are evicted when needed."""
        if self.pool.capacity is None:
            return None
        return self.pool.capacity - self.pool.used - self.ctx.copies_in_blocks()

    def acquire(self, prompt_ids: list[int], max_tokens: int = 0):
        """A paged cache holding the longest cached prefix of the prompt (all but its last token
        at most), and how many tokens that is."""
        self._sync()
        match = self.index.lookup(prompt_ids)
        table, cached = self._reuse(match, len(prompt_ids))
        for b in table:
            self.pool.incref(b)
        self.index.touch(table)
        self.index.record(cached, len(prompt_ids))
        seq = SeqBlocks(table, cached, self.ctx.num_layers, self._worst_case(len(prompt_ids), max_tokens))
        seq.prompt_ids = list(prompt_ids)
        seq.prompt_hashes = match.hashes
        seq.registered = len(match.blocks)
        for h in match.hashes[len(match.blocks) :]:  # the blocks this request will compute
            if h not in self.index.full:
                self.index.pending.setdefault(h, seq)
        self.live[seq.uid] = seq
        return [PagedKVCache(self.ctx, layer, seq) for layer in range(self.ctx.num_layers)], cached

    def store(self, token_ids: list[int], prompt_cache) -> None:
        """A request finished: index its blocks under `token_ids` (the tokens whose K/V it holds)
        and drop its references."""
        seq = self._seq(prompt_cache)
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
        self._end(seq)

    def release(self, prompt_cache) -> None:
        """A request ended without a result worth keeping (abort): drop its references. Prompt
        blocks it had already computed stay indexed."""
        seq = self._seq(prompt_cache)
        if seq is not None:
            self._sync()
            self._end(seq)

    def clear(self) -> None:
        """Forget every cached prefix; blocks of running requests stay theirs until they end."""
        self.index.clear()
        self.pool.shrink()
        self.pool.peak_used = self.pool.used

    def block_hashes(self, token_ids: list[int]) -> list[bytes]:
        """Chain hashes of a prompt's full blocks, the prefix index's keys. Pure: any thread."""
        return self.index.chain(token_ids)

    def resident(self, hashes: list[bytes]) -> int:
        """Leading blocks of a chain the index holds now (the loop thread only)."""
        return self.index.resident(hashes)

    def stats(self) -> dict:
        """Read-only (other threads may call it while the engine steps)."""
        return {
            "enabled": True,
            "mode": "memory" if self.memory_aware else "entries",
            "budget_bytes": self.budget_bytes if self.memory_aware else None,
            "live_sequences": len(self.live),
            **self.index.stats(),
            **self.pool.stats(),
            "working_copy_bytes": sum(self.ctx.copy_bytes.values()),
            **self.ctx.counters,
        }

    # --- internals -------------------------------------------------------------------------

    def _reuse(self, match, prompt_len: int) -> tuple[list[int], int]:
        """The blocks to reference and the tokens they give: all but the prompt's last token at
        most (mlx_lm needs one token to compute the first logits)."""
        bs = self.pool.block_size
        cached = min(match.tokens(bs), prompt_len - 1)
        if cached == 1 and prompt_len > 2:  # a lone shared BOS is no prefix worth a copy-on-write
            cached = 0
        nblocks = -(-cached // bs)
        table = match.blocks[:nblocks]
        if nblocks > len(table):
            table.append(match.partial_block)
        return table, cached

    def _worst_case(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks a request can hold at most: prompt + max_tokens, plus one copy-on-write."""
        return -(-(prompt_len + max_tokens) // self.pool.block_size) + 1

    def _forget_evicted(self, block: int) -> None:
        """The pool evicted a cached block: the prefix index forgets it."""
        self.index.forget(block)

    def _room(self) -> int | None:
        """Budget (in blocks) that the pool neither occupies nor may grow into for the running
        requests: what decode working copies may use."""
        if self.pool.capacity is None:
            return None
        return self.pool.capacity - max(self.pool.total, self.pool.used + self._outstanding())

    def _outstanding(self) -> int:
        """Blocks the running requests may still take in the worst case (reserve mode only)."""
        if not self.reserve:
            return 0
        return sum(max(0, s.max_blocks - len(s.table)) for s in self.live.values())

    def _sync(self) -> None:
        """Index the prompt blocks running requests have finished writing, so that requests with
        the same prefix can share them now."""
        bs = self.pool.block_size
        for seq in self.live.values():
            hashes = seq.prompt_hashes
            if seq.registered >= len(hashes):
                continue
            upto = min(seq.length // bs, len(hashes), len(seq.table))
            for k in range(seq.registered, upto):
                if self.index.pending.get(hashes[k]) is seq:
                    del self.index.pending[hashes[k]]
                tokens = tuple(seq.prompt_ids[k * bs : (k + 1) * bs])
                self.index.insert(self.index.parent_of(hashes, k), tokens, seq.table[k], hashes[k])
            seq.registered = max(seq.registered, upto)

    def _seq(self, prompt_cache) -> SeqBlocks | None:
        if not prompt_cache or not isinstance(prompt_cache[0], PagedKVCache):
            return None
        seq = prompt_cache[0].seq
        return seq if seq.uid in self.live else None

    def _end(self, seq: SeqBlocks) -> None:
        for h in seq.prompt_hashes[seq.registered :]:
            if self.index.pending.get(h) is seq:
                del self.index.pending[h]
        self.index.add_entry(seq.table)
        self.pool.release(seq.table)
        seq.table = []
        del self.live[seq.uid]
        self.index.trim_entries()


def budget_bytes(config: EngineConfig) -> int:
    if config.cache_memory_mb is not None:
        return config.cache_memory_mb * 2**20
    import psutil

    return int(psutil.virtual_memory().total * config.cache_memory_percent)


def probe_layers(model) -> tuple[list[LayerShape], mx.Dtype] | None:
    """Per-layer K/V shapes and dtype from one token through the model with mlx_lm's own caches;
    None when the model's caches are not plain (or sliding-window) KV caches."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    if len(caches) != len(getattr(model, "layers", caches)):
        return None
    for c in caches:
        if type(c) is not KVCache and not (type(c) is RotatingKVCache and c.keep == 0):
            return None
    model(mx.array([[0]]), cache=caches)
    mx.eval([c.state for c in caches])
    layers = [LayerShape(c.keys.shape[1], c.keys.shape[3], c.values.shape[3]) for c in caches]
    return layers, caches[0].keys.dtype


def model_salt(model, layers: list[LayerShape], dtype) -> bytes:
    args = getattr(model, "args", None)
    text = f"{type(model).__module__}|{args!r}|{layers!r}|{dtype}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def make_cache_manager(model, config: EngineConfig):
    if not config.paged_cache:
        return NoCache()
    try:
        probed = probe_layers(model)
    except Exception:  # noqa: BLE001 - an odd model: run it without the paged cache
        log.exception("probing the model's KV layout failed; paged cache off")
        probed = None
    if probed is None:
        log.warning("this model's caches are not plain KV caches: paged cache off (prompts computed from scratch)")
        return NoCache()
    layers, dtype = probed
    return PagedCacheManager(layers, dtype, config, model_salt(model, layers, dtype))
