"""Recurrent state behind the cache seam, without a model: the snapshot store (engine.kv.snapshots)
and what the paged cache manager does for a layout with recurrent slots — the running sequences'
state counted in the budget, snapshot points, a prompt resuming from the snapshot at its longest
matched point and never past it. The families' real models run in tests/engine/test_families.py."""

from __future__ import annotations

import mlx.core as mx

from engine.config import EngineConfig
from engine.kv.kv_storage import LayerShape
from engine.kv.layout import CacheLayout, KVSlot, StateSlot
from engine.kv.manager import PagedCacheManager
from engine.kv.snapshots import SnapshotStore

LAYERS = [LayerShape(2, 16, 16)] * 2  # 4 KiB a block in float32 at 16 tokens
STATE = (1, 4, 16, 16)  # one sequence's state array: 4 KiB in float32


def hybrid(**config) -> PagedCacheManager:
    layout = CacheLayout(
        slots=[KVSlot(0), StateSlot(0, (STATE,), (mx.float32,)), KVSlot(1)],
        kv_layers=LAYERS,
        kv_dtype=mx.float32,
        state_shapes=[STATE],
        state_dtypes=[mx.float32],
    )
    cfg = EngineConfig(cache_memory_mb=1, block_size=16, **config)
    return PagedCacheManager(LAYERS, mx.float32, cfg, layout=layout)


def finish(manager: PagedCacheManager, tokens: list[int], state_value: float):
    """A request over `tokens` that computed all of them, ending with its state (value-filled)."""
    seq, cached = manager.acquire(tokens + [0], 4)
    seq.written = [len(tokens)] * len(seq.written)
    manager.ctx._make_room(seq, cached, len(tokens))
    seq.state, seq.state_len = [mx.full(STATE, state_value)], len(tokens)
    manager.store(tokens, seq)
    return cached


def test_the_store_keeps_the_newest_snapshots_within_its_budget():
    store = SnapshotStore(budget_bytes=10, block_size=4)
    store.add(7, 4, [mx.zeros(1)], 4)
    store.add(8, 2, [mx.zeros(1)], 4)
    store.take(7, 4)  # used: the other one is older now
    store.add(9, 1, [mx.zeros(1)], 4)
    assert (8, 2) not in store.lru and store.bytes == 8
    store.add(10, 1, [mx.zeros(1)], 11)  # larger than the whole budget: not kept
    assert store.counters["snapshots_skipped"] == 1 and store.bytes == 8
    store.forget_block(7)
    assert store.on_block == {9: store.on_block[9]} and store.bytes == 4


def test_the_best_resume_point_is_the_longest_one_the_match_covers():
    store = SnapshotStore(budget_bytes=100, block_size=4)
    for block, m in [(5, 4), (6, 2), (6, 3), (9, 2)]:
        store.add(block, m, [mx.zeros(1)], 1)
    assert store.best([5, 6], None, 0, limit=100) == (7, 6, 3)  # block 6's first 3 tokens
    assert store.best([5, 6], None, 0, limit=6) == (6, 6, 2)
    assert store.best([5, 6], 9, 1, limit=100) == (7, 6, 3)  # block 9 matched for 1 token only: its m=2 is past it
    assert store.best([5, 6], 9, 2, limit=100) == (10, 9, 2)
    assert store.best([4], None, 0, limit=100) == (0, -1, 0)


def test_running_sequences_state_counts_in_the_budget():
    manager = hybrid()
    assert manager.state_blocks == 1  # 4 KiB of state, one block's worth
    assert manager.snapshots.budget_bytes == int(2**20 * 0.3)
    before = manager.headroom()
    seq, _ = manager.acquire(list(range(1, 21)), 4)
    manager.ctx._make_room(seq, 0, 20)
    assert manager.headroom() == before - 2 - 1  # its two blocks and its state
    manager.release(seq)
    assert manager.headroom() == before


def test_prompt_chunks_stop_at_the_snapshot_points():
    manager = hybrid(state_interval=20)  # rounded up to 32, two blocks
    assert manager.interval == 32
    seq, _ = manager.acquire(list(range(1, 101)), 4)  # snapshot points 32, 64, 96 and 99 (the prompt's end)
    assert manager._chunk_limit(seq) == 32
    seq.written = [40] * len(seq.written)
    assert manager._chunk_limit(seq) == 24
    seq.written = [96] * len(seq.written)
    assert manager._chunk_limit(seq) == 3
    seq.written = [99] * len(seq.written)
    assert manager._chunk_limit(seq) is None


def test_a_prompt_resumes_from_the_snapshot_at_its_longest_matched_point_only():
    manager = hybrid()
    first = list(range(1, 41))  # 2.5 blocks
    assert finish(manager, first, 1.0) == 0
    assert manager.stats()["snapshots"] == 1  # its end: block 2, token 8

    seq, cached = manager.acquire(first + [99, 98], 4)  # a continuation
    assert cached == 40 and seq.state_len == 40 and mx.all(seq.state[0] == 1.0).item()
    assert len(seq.table) == 3
    manager.release(seq)

    seq, cached = manager.acquire(first[:36] + [7, 7, 7, 7], 4)  # differs inside the last block
    assert cached == 0 and seq.state is None  # K/V of 36 tokens match, but no state there: computed again
    manager.release(seq)
    assert manager.stats()["state_resumes"] == 1


def test_a_prompt_that_parts_from_a_cached_one_leaves_a_snapshot_where_they_part():
    manager = hybrid()  # interval 512: no interval point in these prompts
    system = list(range(1, 31))
    assert finish(manager, system + [40, 41, 42], 1.0) == 0  # a snapshot at its end only
    seq, cached = manager.acquire(system + [50, 51, 52, 53], 4)
    assert cached == 0 and seq.match_end == 30  # K/V match the system prompt; no state there yet
    assert manager._chunk_limit(seq) == 30  # its prefill stops there...
    seq.written = [30] * len(seq.written)
    manager.ctx._make_room(seq, 0, 30)
    seq.state, seq.state_len = [mx.full(STATE, 2.0)], 30
    manager._on_state(seq)  # ...and its state there is kept
    assert [n for n, _ in seq.snapshots] == [30]
    seq.written = [34] * len(seq.written)
    manager.ctx._make_room(seq, 30, 34)
    seq.state, seq.state_len = [mx.full(STATE, 3.0)], 34
    manager.store(system + [50, 51, 52, 53], seq)
    third, cached = manager.acquire(system + [60, 61], 4)
    assert cached == 30 and mx.all(third.state[0] == 2.0).item()
    manager.release(third)
    # the second prompt again: its chain's own block holds that snapshot too (the one a lookup of
    # the parting tokens names is the first prompt's block), so it resumes there, not from zero
    again, cached = manager.acquire(system + [50, 51, 52, 53], 4)
    assert cached == 30 and mx.all(again.state[0] == 2.0).item()
    manager.release(again)


def test_a_replica_reports_only_the_blocks_it_can_resume_from():
    """Prefix-affinity routing reads `resident`: for a recurrent model, cached K/V past the last
    state snapshot cannot be resumed, so it does not count."""
    manager = hybrid()
    tokens = list(range(1, 50))  # 3 full blocks and a partial one
    finish(manager, tokens, 1.0)  # one snapshot: at its end, in the partial block
    hashes = manager.block_hashes(tokens)
    assert manager.index.resident(hashes) == 3 and manager.resident(hashes) == 0
    seq, cached = manager.acquire(tokens[:32] + [7, 7], 4)
    seq.written = [32] * len(seq.written)
    seq.state, seq.state_len = [mx.full(STATE, 2.0)], 32
    seq.snapshots = [(32, list(seq.state))]
    manager.release(seq)  # its snapshot at 32 (a full block's end) is stored as it goes
    assert manager.resident(hashes) == 2


def test_a_short_question_after_a_resumed_system_prompt_keeps_no_state_of_its_own():
    """A prompt-end snapshot a few tokens after the one the sequence resumed from costs more than
    recomputing those tokens: `min_gap` is an eighth of the tokens whose K/V weigh one state."""
    big = (1, 64, 16, 16)  # 64 KiB of state; K/V 512 bytes a token: min_gap 16 tokens
    layout = CacheLayout(
        [KVSlot(0), StateSlot(0, (big,), (mx.float32,)), KVSlot(1)], LAYERS, mx.float32, [big], [mx.float32]
    )
    manager = PagedCacheManager(LAYERS, mx.float32, EngineConfig(cache_memory_mb=1, block_size=16), layout=layout)
    assert manager.min_gap == 16
    system = list(range(1, 33))
    seq, _ = manager.acquire(system + [0], 4)
    seq.written = [32] * len(seq.written)
    manager.ctx._make_room(seq, 0, 32)
    seq.state, seq.state_len = [mx.zeros(big)], 32
    manager._on_state(seq)  # a fresh prompt's end: kept
    manager.store(system, seq)
    seq, cached = manager.acquire(system + [40, 41, 42, 43], 4)
    assert cached == 32
    seq.written = [35] * len(seq.written)
    seq.state, seq.state_len = [mx.zeros(big)], 35
    manager._on_state(seq)  # 3 tokens past the state it resumed from: not worth 64 KiB
    assert seq.snapshots == []
    manager.release(seq)
