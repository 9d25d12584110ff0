"""Quantized KV blocks (`engine.kv_bits` 8 / 4, engine.kv.quantized_storage), without a model:
what a block holds and reads back, copies and disk round trips, the budget in real bytes, the bit
width in the cache identity, a group size the head dimension refuses. The model-level behaviour
(greedy exactness at 8 bits, agreement with 16 bits, sharing, preemption) is in
test_quantized_serving.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.kv.block_pool import BlockPool
from engine.kv.kv_storage import LayerShape, row_index, slab_index
from engine.kv.manager import PagedCacheManager, model_salt
from engine.kv.prefix_cache import PrefixCache
from engine.kv.quantized_storage import KVQuant, QuantizedKVStorage, make_storage

# SmolLM2-135M's K/V: 30 layers of 3 KV heads, head_dim 64.
SMOLLM_LAYERS = [LayerShape(3, 64, 64)] * 30


def _storage(dtype=mx.float16, bits=8, group=32, block_size=4) -> QuantizedKVStorage:
    store = make_storage([LayerShape(2, 64, 64), LayerShape(2, 32, 64)], dtype, block_size, KVQuant(bits, group))
    store.grow(4)
    return store


def _write_block(store: QuantizedKVStorage, layer: int, block: int, seed: int) -> tuple[mx.array, mx.array]:
    """Random K/V for every slot of `block` in `layer`, written; returned as [1, H, bs, D]."""
    s, bs = store.layers[layer], store.block_size
    rng = np.random.default_rng(seed)
    k = mx.array(rng.normal(size=(1, s.kv_heads, bs, s.k_dim)).astype(np.float32)).astype(store.dtype)
    v = mx.array(rng.normal(size=(1, s.kv_heads, bs, s.v_dim)).astype(np.float32)).astype(store.dtype)
    rows = row_index(np.array([[block] * bs]), np.arange(bs)[None, :], s.kv_heads, bs)
    store.write(layer, mx.array(rows.reshape(-1).astype(np.int32)), k, v)
    return k, v


def _read_block(store: QuantizedKVStorage, layer: int, block: int) -> tuple[mx.array, mx.array]:
    slabs = slab_index(np.array([[block]]), store.layers[layer].kv_heads)
    return store.read(layer, mx.array(slabs.astype(np.int32)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_block_reads_back_exactly_what_quantizing_its_tokens_gives(dtype, bits):
    """Each token is quantized on its own along the head dimension: the gather returns
    dequantize(quantize(k)) of the written values, in the model's dtype, whatever else the pool
    holds; the zero block reads as zeros."""
    store = _storage(dtype, bits)
    q = store.quant
    for layer in range(2):
        k, v = _write_block(store, layer, 3, seed=layer)
        _write_block(store, layer, 2, seed=10 + layer)  # a neighbour block changes nothing
        got_k, got_v = _read_block(store, layer, 3)
        assert got_k.dtype == dtype and got_k.shape == k.shape and got_v.shape == v.shape
        assert mx.array_equal(got_k, q.dequantize(q.quantize(k))).item()
        assert mx.array_equal(got_v, q.dequantize(q.quantize(v))).item()
        assert not mx.array_equal(got_k, k).item()  # quantized: not the values written
        zeros_k, zeros_v = _read_block(store, layer, BlockPool.NULL)
        assert not mx.any(zeros_k).item() and not mx.any(zeros_v).item()


def test_copy_on_write_and_the_disk_tier_round_trip_every_quantized_array():
    """`copy` (copy-on-write) and `block_arrays` / `load_block` (the disk tier's interface) move a
    block's packed values, scales and biases in every layer: the copy reads back bit-identical."""
    for dtype in (mx.float16, mx.bfloat16):
        store = _storage(dtype)
        for layer in range(2):
            _write_block(store, layer, 2, seed=layer)
        before = [_read_block(store, layer, 2) for layer in range(2)]
        store.copy([(2, 4)])
        arrays = store.block_arrays(2)
        assert len(arrays) == 2 * 2 * 3 and all(isinstance(a, np.ndarray) for a in arrays)
        store.load_block(5, arrays)
        mx.eval(store.take_writes())
        for layer in range(2):
            for block in (4, 5):
                got = _read_block(store, layer, block)
                assert all(mx.array_equal(a, b).item() for a, b in zip(got, before[layer]))


def test_zeroed_keeps_the_shape_of_every_quantized_array():
    """What the manager restarts from when the pool's arrays cannot be evaluated (`recover`)."""
    store = _storage()
    k, v = store.zeroed()
    for layer in range(2):
        for fresh, old in zip(k[layer] + v[layer], store.k[layer] + store.v[layer]):
            assert fresh.shape == old.shape and fresh.dtype == old.dtype and not mx.any(fresh).item()


@pytest.mark.parametrize(
    ("dtype", "at_least"),
    [(mx.float16, {8: 1.85, 4: 3.5}), (mx.float32, {8: 3.5, 4: 6.3})],
)
def test_one_budget_holds_about_2x_or_3_5x_the_blocks_in_real_bytes(dtype, at_least):
    """SmolLM2's K/V shape in a 64 MB budget, group 64: 8-bit blocks take 68 bytes a head-row in
    float16 against 128 (1.88x; 4-bit 36: 3.56x), and in float32 (the CPU fast path) 72 against
    256 (3.56x; 4-bit: 6.4x). The pool's capacity is the budget over those bytes."""
    budget = 64 * 2**20
    capacity = {}
    for bits in (16, 8, 4):
        config = EngineConfig(kv_bits=bits, cache_memory_mb=64, kv_group_size=64)
        mgr = PagedCacheManager(SMOLLM_LAYERS, dtype, config)
        stats = mgr.stats()
        packed = 64 * (bits if bits < 16 else 8 * dtype.size) // 8 + (2 * dtype.size if bits < 16 else 0)
        assert stats["block_bytes"] == 32 * 30 * 3 * 2 * packed
        assert stats["kv_bits"] == bits and stats["kv_group_size"] == (None if bits == 16 else 64)
        assert stats["blocks_capacity"] == budget // stats["block_bytes"] - BlockPool.RESERVED
        capacity[bits] = stats["blocks_capacity"]
    for bits in (8, 4):
        assert capacity[bits] / capacity[16] >= at_least[bits]


def test_the_bit_width_and_group_size_are_part_of_the_cache_identity():
    """Blocks of another width never answer a lookup: the model salt (hence every chain hash)
    differs per (bits, group size), and 16 bits keeps the salt it had before quantization existed."""

    class Model:
        args = "args"

    salts = {
        (bits, group): model_salt(Model(), SMOLLM_LAYERS, mx.float16, None if bits == 16 else KVQuant(bits, group))
        for bits, group in [(16, 64), (8, 64), (8, 32), (4, 64)]
    }
    assert len(set(salts.values())) == 4
    assert salts[16, 64] == model_salt(Model(), SMOLLM_LAYERS, mx.float16)
    pool = BlockPool([LayerShape(1, 32, 32)], mx.float16, 4, None)
    tokens = list(range(12))
    hashes = {key: PrefixCache(pool, salt).chain(tokens) for key, salt in salts.items()}
    assert len({tuple(h) for h in hashes.values()}) == 4


def test_a_group_size_that_does_not_divide_the_head_dimension_is_refused_naming_the_field():
    with pytest.raises(ModelLoadError) as err:
        PagedCacheManager([LayerShape(2, 96, 96)], mx.float16, EngineConfig(kv_bits=8, kv_group_size=64))
    assert err.value.param == "kv_group_size" and "96" in err.value.message
    # 32 divides 96: the same model loads with it
    assert PagedCacheManager([LayerShape(2, 96, 96)], mx.float16, EngineConfig(kv_bits=8, kv_group_size=32))


def test_only_16_8_and_4_bits_are_options():
    with pytest.raises(ValueError, match="kv_bits"):
        EngineConfig(kv_bits=6)
    with pytest.raises(ValueError, match="kv_group_size"):
        EngineConfig(kv_group_size=16)


def test_attention_reads_what_the_blocks_hold_in_prefill_chunks_and_both_decode_paths(smollm, monkeypatch):
    """SmolLM2 at 8 bits through the paged cache by hand: what each layer's attention receives, in
    two prefill chunks, an eager decode step through a working copy and a compiled one, is
    bit for bit what the blocks hold once written (the step's own tokens included), so a later
    cache hit reads exactly what this step read."""
    from engine.compiled_step import CompiledDecode
    from engine.kv.manager import make_cache_manager
    from engine.kv.paged_cache import BatchPagedKVCache

    model = smollm.model
    mgr = make_cache_manager(model, EngineConfig(kv_bits=8, block_size=16))
    ctx = mgr.batch_kv()
    store = mgr.pool.storage
    seen: dict[int, tuple[mx.array, mx.array]] = {}
    fetch = BatchPagedKVCache.update_and_fetch

    def spy(self, keys, values):
        seen[self.layer] = fetch(self, keys, values)
        return seen[self.layer]

    monkeypatch.setattr(BatchPagedKVCache, "update_and_fetch", spy)
    tokens = [(7 * i) % 900 + 20 for i in range(48)]
    seq, _ = mgr.acquire(tokens, 4)

    def check(length: int, got: dict[int, tuple[mx.array, mx.array]]) -> None:
        slabs = mx.array(slab_index(np.array([seq.table]), 3).astype(np.int32))
        for layer in (0, 14, 29):
            held = store.read(layer, slabs)
            for a, b in zip(got[layer], held):
                assert mx.array_equal(a[:, :, :length], b[:, :, :length]).item()

    done = 0
    for n in (24, 16):  # two prefill chunks: the second reads the first's blocks
        caches = ctx.caches([seq], chunk=[n])
        mx.eval(model(mx.array([tokens[done : done + n]]), cache=caches), ctx.take_writes())
        done += n
        check(done, seen)
    ctx.policy = "always"
    caches = ctx.caches([seq])  # eager decode through the working copy
    mx.eval(model(mx.array([[tokens[done]]]), cache=caches), ctx.take_writes(), [seen[i] for i in seen])
    done += 1
    check(done, seen)
    copies = ctx.decode_copies(caches)  # a compiled step, one column further
    geom = ctx.geometry
    step = CompiledDecode(model, quant=ctx.quant)
    logits, ks, vs, columns = step(mx.array([tokens[done]]), geom.col - 1, geom.pad_array, [c.k for c in copies], [c.v for c in copies])  # fmt: skip
    ctx.commit_column(caches, ks, vs, columns)
    mx.eval(logits, ks, vs, ctx.take_writes())
    done += 1
    check(done, {i: (ks[i], vs[i]) for i in range(30)})
    assert seq.length == done and ctx.counters["steps_working_copy"] == 2


def test_a_quantized_block_round_trips_through_the_disk_tier(tmp_path):
    """The disk tier (engine.kv.disk_tier) stores `block_arrays` and hands them back to `load_block`:
    a quantized block's packed values, scales and biases come back bit for bit into another block."""
    from engine.kv.disk_tier import DiskTier, identity_digest

    store = _storage(mx.bfloat16)
    for layer in range(2):
        _write_block(store, layer, 2, seed=layer)
    want = store.block_arrays(2)
    shapes = [(a.shape, a.dtype.name) for a in store.block_arrays(0)]
    identity = identity_digest("weights", b"salt", store.block_size, str(store.dtype), 8)
    key, parent, tokens = bytes([7]) * 16, bytes([6]) * 16, (7, 7, 7, 7)
    tier = DiskTier(tmp_path, identity, shapes, 10**9, 10**9)
    assert tier.offer(key, parent, tokens, lambda: store.block_arrays(2))
    assert tier.close(10) == 0
    again = DiskTier(tmp_path, identity, shapes, 10**9, 10**9)  # a new process reads the directory
    store.load_block(3, again.read(key, parent, tokens))
    assert all(np.array_equal(a, b) for a, b in zip(want, store.block_arrays(3)))
    assert all(mx.array_equal(a, b).item() for a, b in zip(_read_block(store, 1, 2), _read_block(store, 1, 3)))
