"""The cache seam (engine.kv.interface): both managers implement `CacheManager` whole, the paged
context is the loop's `BatchKV`, and `can_allocate` alone decides whether a step's writes fit
(a decoding row at a block's end, a shared block to copy, a prompt chunk's new blocks)."""

from __future__ import annotations

import mlx.core as mx

from engine.batch_loop import BatchLoop
from engine.config import EngineConfig
from engine.kv.interface import BatchKV, CacheManager, StepWrites
from engine.kv.kv_storage import LayerShape
from engine.kv.manager import NoCache, PagedCacheManager
from engine.kv.paged_cache import SeqBlocks
from engine.loop import Loop
from engine.mlx_lm_batch import MlxLmBatch

LAYERS = [LayerShape(4, 64, 64)] * 8  # 256 KiB a block in float16 at 32 tokens: 2 MB buy 6 usable blocks


def paged(**config) -> PagedCacheManager:
    return PagedCacheManager(LAYERS, mx.float16, EngineConfig(cache_memory_mb=2, **config))


def blocks(manager: PagedCacheManager, n: int, written: int) -> SeqBlocks:
    """A running request's blocks: `n` allocated, `written` tokens in every layer."""
    return SeqBlocks([manager.pool.allocate() for _ in range(n)], written, len(LAYERS))


def test_both_managers_are_cache_managers_and_the_paged_one_hands_the_loop_its_kv():
    nothing, manager = NoCache(123), paged()
    assert isinstance(nothing, CacheManager) and isinstance(manager, CacheManager)
    assert nothing.batch_kv() is None and nothing.budget_bytes == 123
    assert isinstance(manager.batch_kv(), BatchKV) and manager.budget_bytes == 2 * 2**20
    assert nothing.can_allocate(StepWrites(prefill=[(SeqBlocks([], 0, 1), 10_000)]))
    assert nothing.acquire([1, 2, 3], 8) == (None, 0)


def test_both_loops_are_loops(smollm):
    sizes = dict(max_num_seqs=2, prefill_batch_size=1, prefill_step_size=8)
    ours, theirs = BatchLoop(smollm.model, paged().batch_kv(), **sizes), MlxLmBatch(smollm.model, **sizes)
    try:
        assert isinstance(ours, Loop) and isinstance(theirs, Loop)
        assert ours.compiled is not None and ours.peak_batch == 0
        assert theirs.compiled is None and theirs.peak_batch is None
        assert ours.next_writes() == theirs.next_writes() == StepWrites()  # nothing runs
    finally:
        ours.close()
        theirs.close()


def test_can_allocate_counts_the_blocks_a_step_takes_against_the_headroom():
    manager = paged()
    bs = manager.pool.block_size
    full = blocks(manager, 2, 2 * bs)  # its next token opens a third block
    partial = blocks(manager, 2, bs + 8)  # its next token goes into its second block
    assert manager.pool.capacity == 6 and manager.headroom() == 2
    assert manager.can_allocate(StepWrites(decode=[full, partial]))  # 1 block
    assert manager.can_allocate(StepWrites(decode=[full], prefill=[(partial, 20)]))  # 1 + (0 + a copy)
    assert not manager.can_allocate(StepWrites(decode=[full], prefill=[(partial, 30)]))  # 1 + (1 + a copy)
    manager.pool.incref(partial.table[1])  # shared now: its next token needs a private copy
    assert manager.headroom() == 2
    assert manager.can_allocate(StepWrites(decode=[full, partial]))  # 2 blocks
    third = blocks(manager, 1, bs - 1)  # takes one block of the headroom; its next token fits in it
    assert manager.headroom() == 1
    assert not manager.can_allocate(StepWrites(decode=[full, partial, third]))  # 2 blocks
    assert manager.can_allocate(StepWrites(decode=[partial, third]))  # the copy alone


def test_without_a_budget_every_step_fits():
    manager = paged(memory_aware=False)
    assert manager.headroom() is None
    assert manager.can_allocate(StepWrites(prefill=[(blocks(manager, 1, 4), 10_000)]))
