"""The prefix cache's disk tier (engine.kv.disk_tier), without a model: a block's arrays round
trip through a file, a file of another identity or a damaged one is skipped with a warning and
never loaded, the byte cap is kept least recently used first, a failing disk leaves the cache
RAM-only, a writer's leftover temporary file is never read, and the paged cache manager continues
a prefix match from RAM down the disk."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.kv import disk_tier
from engine.kv.disk_tier import DiskTier, identity_digest
from engine.kv.kv_storage import KVStorage, LayerShape
from engine.kv.layout import CacheLayout, KVSlot, StateSlot
from engine.kv.manager import PagedCacheManager, make_cache_manager

LAYERS = [LayerShape(2, 8, 8), LayerShape(1, 8, 4)]
BS = 4
IDENTITY = identity_digest("weights", b"salt", BS, "mlx.core.float32", None)


def storage(dtype=mx.float32, blocks: int = 8) -> KVStorage:
    s = KVStorage(LAYERS, dtype, BS)
    s.grow(blocks)
    return s


def random_block(s: KVStorage, block: int, seed: int) -> list[np.ndarray]:
    """Fill `block` with seeded values; its arrays as block_arrays gives them."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(a.shape).astype(np.float32) for a in s.block_arrays(0)]
    s.load_block(block, [mx.array(a).astype(s.dtype) for a in arrays])
    return s.block_arrays(block)


def tier(path, s: KVStorage | None = None, identity: bytes = IDENTITY, max_bytes: int = 10**9, **kw) -> DiskTier:
    s = s or storage()
    shapes = [(a.shape, a.dtype.name) for a in s.block_arrays(0)]
    return DiskTier(path, identity, shapes, max_bytes, kw.pop("queue_bytes", 10**9))


def key(i: int) -> bytes:
    return bytes([i]) * 16


def put(t: DiskTier, s: KVStorage, block: int, i: int) -> None:
    assert t.offer(key(i), key(i - 1), (i, i, i, i), lambda: s.block_arrays(block))


def flushed(t: DiskTier) -> None:
    assert t.close(10) == 0


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_a_blocks_arrays_come_back_from_disk_bit_for_bit_into_another_block(tmp_path, dtype):
    s = storage(dtype)
    want = random_block(s, 3, seed=1)
    t = tier(tmp_path, s)
    put(t, s, 3, 7)
    flushed(t)
    again = tier(tmp_path, s)  # a new process: the index is read from the directory
    assert again.has(key(7)) and again.stats()["entries"] == 1
    s.load_block(5, again.read(key(7), key(6), (7, 7, 7, 7)))
    assert all(np.array_equal(a, b) for a, b in zip(want, s.block_arrays(5)))
    assert again.stats()["hits"] == 1


def test_a_block_another_replica_wrote_after_this_one_opened_is_found_and_files_are_the_owners_only(tmp_path):
    s = storage()
    want = random_block(s, 3, seed=8)
    reader = tier(tmp_path, s)  # opened first: its index is empty
    writer = tier(tmp_path, s)
    put(writer, s, 3, 7)
    flushed(writer)
    got = reader.read(key(7), key(6), (7, 7, 7, 7))
    assert got is not None and all(np.array_equal(a, b) for a, b in zip(want, got))
    assert reader.stats()["entries"] == 1 and reader.stats()["bytes"] > 0
    assert (tmp_path / f"{key(7).hex()}.kvb").stat().st_mode & 0o777 == 0o600


def test_a_file_of_another_identity_or_chain_is_skipped_with_a_warning_and_removed(tmp_path, caplog):
    s = storage()
    random_block(s, 3, seed=2)
    t = tier(tmp_path, s)
    put(t, s, 3, 7)
    put(t, s, 3, 8)
    flushed(t)
    other = tier(tmp_path, s, identity=identity_digest("weights", b"salt", BS, "mlx.core.float32", 4))
    with caplog.at_level(logging.WARNING):
        assert other.read(key(7), key(6), (7, 7, 7, 7)) is None
    assert "another identity" in caplog.text and not (tmp_path / f"{key(7).hex()}.kvb").exists()
    same = tier(tmp_path, s)
    assert same.read(key(8), key(6), (8, 8, 8, 8)) is None  # the header names another parent
    assert same.stats()["skipped"] == 1 and same.stats()["hits"] == 0


def test_the_identity_names_weights_salt_block_size_dtype_and_kv_bits():
    base = ("w", b"s", 32, "float16", None)
    variants = [("w2", b"s", 32, "float16", None), ("w", b"t", 32, "float16", None), ("w", b"s", 16, "float16", None)]
    variants += [("w", b"s", 32, "bfloat16", None), ("w", b"s", 32, "float16", 4)]
    digests = {identity_digest(*v) for v in [base, *variants]}
    assert len(digests) == 6


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "empty"])
def test_a_damaged_file_is_skipped_with_a_warning_and_never_loaded(tmp_path, caplog, damage):
    s = storage()
    random_block(s, 3, seed=3)
    t = tier(tmp_path, s)
    put(t, s, 3, 7)
    flushed(t)
    path = tmp_path / f"{key(7).hex()}.kvb"
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) - 10],
        "flipped": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
        "foreign": os.urandom(len(data)),
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    again = tier(tmp_path, s)
    before = s.block_arrays(5)
    with caplog.at_level(logging.WARNING):
        assert again.read(key(7), key(6), (7, 7, 7, 7)) is None
    assert "skipped" in caplog.text and again.stats()["skipped"] == 1 and not again.has(key(7))
    assert all(np.array_equal(a, b) for a, b in zip(before, s.block_arrays(5)))


def test_the_byte_cap_is_kept_least_recently_used_first(tmp_path):
    s = storage()
    random_block(s, 3, seed=4)
    t = tier(tmp_path, s)
    put(t, s, 3, 1)
    flushed(t)
    size = (tmp_path / f"{key(1).hex()}.kvb").stat().st_size
    t = tier(tmp_path, s, max_bytes=3 * size)
    for i in (2, 3):
        time.sleep(0.01)  # distinct mtimes: the order the next load reads
        put(t, s, 3, i)
    flushed(t)
    t = tier(tmp_path, s, max_bytes=3 * size)
    assert t.read(key(1), key(0), (1, 1, 1, 1)) is not None  # the oldest, used again: now the newest
    put(t, s, 3, 4)
    flushed(t)
    names = sorted(p.name for p in tmp_path.glob("*.kvb"))
    assert names == sorted(f"{key(i).hex()}.kvb" for i in (1, 3, 4))
    assert t.stats()["bytes"] == 3 * size and t.stats()["evicted"] == 1


def test_a_failing_disk_leaves_the_cache_ram_only_with_a_warning(tmp_path, caplog, monkeypatch):
    s = storage()
    random_block(s, 3, seed=5)
    t = tier(tmp_path, s)
    put(t, s, 3, 1)
    t._queue.put(disk_tier._STOP)
    t._thread.join(10)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_tier.os, "replace", full)
    t = tier(tmp_path, s)
    with caplog.at_level(logging.WARNING):
        put(t, s, 3, 2)
        flushed(t)
    assert "RAM-only" in caplog.text and not t.writing and t.stats()["errors"] == 1
    assert not t.offer(key(3), key(2), (3,) * 4, lambda: s.block_arrays(3))  # no more writes
    assert not list(tmp_path.glob("*.tmp")) and not t.has(key(2))
    assert t.read(key(1), key(0), (1,) * 4) is not None  # what is on disk still reads


def test_a_killed_writers_temporary_file_is_never_read_and_old_ones_are_removed(tmp_path):
    s = storage()
    random_block(s, 3, seed=6)
    t = tier(tmp_path, s)
    put(t, s, 3, 1)
    flushed(t)
    whole = (tmp_path / f"{key(1).hex()}.kvb").read_bytes()
    fresh = tmp_path / f".{key(2).hex()}.kvb.123.456.tmp"
    fresh.write_bytes(whole[: len(whole) // 2])  # SIGKILL mid-write: the rename never happened
    old = tmp_path / f".{key(3).hex()}.kvb.123.789.tmp"
    old.write_bytes(whole)
    os.utime(old, (time.time() - 2 * disk_tier.STALE_TMP_S,) * 2)
    again = tier(tmp_path, s)
    assert not again.has(key(2)) and again.read(key(2), key(1), (2,) * 4) is None
    assert fresh.exists() and not old.exists()  # a live writer's is left alone
    assert again.stats()["entries"] == 1


def test_offers_past_the_queue_bound_are_dropped_and_counted_never_waited_for(tmp_path, monkeypatch):
    s = storage()
    random_block(s, 3, seed=7)
    gate = threading.Event()
    real = DiskTier._write
    monkeypatch.setattr(DiskTier, "_write", lambda self, *a: (gate.wait(10), real(self, *a)))
    t = tier(tmp_path, s, queue_bytes=2 * s.block_bytes)
    assert t.offer(key(1), key(0), (1,) * 4, lambda: s.block_arrays(3))
    assert t.offer(key(2), key(1), (2,) * 4, lambda: s.block_arrays(3))
    assert not t.offer(key(3), key(2), (3,) * 4, lambda: s.block_arrays(3))
    assert not t.offer(key(1), key(0), (1,) * 4, lambda: s.block_arrays(3))  # queued already: not again
    assert t.stats()["dropped"] == 1
    gate.set()
    flushed(t)
    assert t.stats()["writes"] == 2


# --- the paged cache manager over a disk tier ----------------------------------------------


def manager(path, **disk) -> PagedCacheManager:
    cfg = EngineConfig(cache_memory_mb=1, block_size=BS, disk_cache={"enabled": True, "path": str(path), **disk})
    m = PagedCacheManager(LAYERS, mx.float32, cfg, salt=b"salt")
    m.disk, m.disk_why = disk_tier.open_disk_tier(cfg, None, "weights", b"salt", m.pool.storage)
    return m


def finish(m: PagedCacheManager, tokens: list[int], seed: int) -> tuple[int, list[list[np.ndarray]]]:
    """A request over `tokens` that computed all of them (seeded K/V in its new blocks): the
    tokens it reused and every full block's arrays."""
    seq, cached = m.acquire(tokens + [0], 4)
    seq.written = [len(tokens)] * len(seq.written)
    m.ctx._make_room(seq, cached, len(tokens))
    for k, b in enumerate(seq.table):
        if k * BS >= cached:
            random_block(m.pool.storage, b, seed + k)
    arrays = [m.pool.storage.block_arrays(b) for b in seq.table[: len(tokens) // BS]]
    m.store(tokens, seq)
    return cached, arrays


def test_a_new_manager_continues_a_prefix_match_from_disk_with_the_same_kv(tmp_path):
    tokens = list(range(100, 118))  # 4 full blocks and 2 tokens
    first = manager(tmp_path)
    cached, want = finish(first, tokens, seed=10)
    assert cached == 0
    first.close(10)
    assert first.stats()["disk"]["writes"] == 4
    second = manager(tmp_path)
    seq, cached = second.acquire(tokens + [5, 6], 4)  # the same prefix, another ending
    assert cached == 4 * BS  # 4 full blocks from disk (a partial block is never written)
    got = [second.pool.storage.block_arrays(b) for b in seq.table[:4]]
    assert all(np.array_equal(a, b) for x, y in zip(want, got) for a, b in zip(x, y))
    assert second.stats()["disk"]["hits"] == 4 and second.stats()["prefix_hits"] == 1


def test_a_corrupt_block_ends_the_disk_match_there(tmp_path):
    tokens = list(range(200, 216))  # 4 full blocks
    first = manager(tmp_path)
    finish(first, tokens, seed=20)
    first.close(10)
    third = first.index.chain(tokens)[2]
    path = tmp_path / first.disk.identity.hex() / f"{third.hex()}.kvb"
    path.write_bytes(path.read_bytes()[:-1])
    second = manager(tmp_path)
    _, cached = second.acquire(tokens + [1], 4)
    assert cached == 2 * BS
    assert second.stats()["disk"]["skipped"] == 1


def test_the_disk_cache_without_the_paged_cache_is_refused_by_name():
    with pytest.raises(ValueError, match="disk_cache.enabled needs paged_cache"):
        EngineConfig(paged_cache=False, disk_cache={"enabled": True})
    assert not EngineConfig().disk_cache.enabled  # off by default


def test_a_hybrid_model_gets_no_disk_tier_and_says_why(tmp_path, monkeypatch):
    state = (1, 2, 4, 4)
    layout = CacheLayout(
        slots=[KVSlot(0), StateSlot(0, (state,), (mx.float32,))],
        kv_layers=LAYERS[:1],
        kv_dtype=mx.float32,
        state_shapes=[state],
        state_dtypes=[mx.float32],
    )
    monkeypatch.setattr("engine.kv.manager.probe_layout", lambda model: layout)
    cfg = EngineConfig(cache_memory_mb=1, block_size=BS, disk_cache={"enabled": True, "path": str(tmp_path)})
    m = make_cache_manager(object(), cfg, None, "weights")
    assert m.disk is None
    assert m.stats()["disk"] == {"enabled": False, "why": m.disk_why} and "recurrent" in m.disk_why
    assert not list(tmp_path.iterdir())
