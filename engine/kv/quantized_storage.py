"""Quantized K/V blocks (`EngineConfig.kv_bits` 8 or 4): the pool's arrays stored as MLX's affine
quantization, as mlx_lm's `QuantizedKVCache` keeps them.

Each stored row (one token of one KV head, `head_dim` values) is quantized on its own along the head
dimension (`mx.quantize` groups over the last axis): `group_size` values share one scale and one
bias, so a block's stored values never depend on another token's. Per layer, K and V are each three
arrays of `[num_blocks * kv_heads * block_size, width]` rows in the dense storage's order
(engine.kv.kv_storage): the packed values (uint32, `head_dim * bits / 32` wide), the scales and the
biases (the model's dtype, `head_dim / group_size` wide). Everything that moves rows (growth,
copy-on-write, gathers) moves all three alike; a read dequantizes what it gathered, so attention
sees dense `[B, H, L, D]` arrays of the model's dtype (dequantize-on-gather: no model's attention
changes, sinks and latent KV included).

What attention reads is always what the blocks hold: the tokens a step computes are quantized,
written, and read back dequantized like every other token (a decode working copy's new column is
`dequantize(quantize(k))` of the very arrays written to the pool: `write_parts`). So a prefix-cache
hit, a chunk boundary or a batch neighbour never changes what a row attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import ModelLoadError
from .kv_storage import RESERVED, KVStorage, LayerShape, layer_block_bytes


@dataclass(frozen=True)
class KVQuant:
    """How K/V values are stored: `bits` per value, one scale and bias per `group_size` values."""

    bits: int
    group_size: int

    def widths(self, dim: int) -> tuple[int, int]:
        """Columns of the packed array (uint32) and of the scales and biases, for rows of `dim`."""
        return dim * self.bits // 32, dim // self.group_size

    def row_bytes(self, dim: int, dtype: mx.Dtype) -> int:
        packed, groups = self.widths(dim)
        return packed * 4 + 2 * groups * dtype.size

    def quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    def dequantize(self, parts) -> mx.array:
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)

    def round_trip(self, x: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array]]:
        """What the blocks will hold for `x`, dense, and its stored parts."""
        parts = self.quantize(x)
        return self.dequantize(parts), parts

    def check(self, layers: list[LayerShape]) -> None:
        """Refuse a model whose K or V head dimension the group size does not divide."""
        bad = sorted({d for s in layers for d in (s.k_dim, s.v_dim) if d % self.group_size})
        if bad:
            raise ModelLoadError(
                f"kv_bits {self.bits}: kv_group_size {self.group_size} does not divide this model's K/V head "
                f"dimensions {bad}; choose a group size (32, 64, 128) that divides them, or kv_bits 16",
                param="kv_group_size",
            )


def kv_quant(bits: int, group_size: int) -> KVQuant | None:
    """The quantization `EngineConfig.kv_bits` asks for (None: the model's dtype, unquantized)."""
    return None if bits >= 16 else KVQuant(bits, group_size)


def storage_block_bytes(layers: list[LayerShape], dtype: mx.Dtype, block_size: int, quant: KVQuant | None) -> list[int]:
    """Bytes of one block's K and V as stored, layer by layer (what the budget counts)."""
    if quant is None:
        return layer_block_bytes(layers, dtype, block_size)
    return [
        block_size * s.kv_heads * (quant.row_bytes(s.k_dim, dtype) + quant.row_bytes(s.v_dim, dtype)) for s in layers
    ]


def make_storage(layers: list[LayerShape], dtype: mx.Dtype, block_size: int, quant: KVQuant | None) -> KVStorage:
    """The pool's storage: dense in the model's dtype, or quantized."""
    if quant is None:
        return KVStorage(layers, dtype, block_size)
    return QuantizedKVStorage(layers, dtype, block_size, quant)


class QuantizedKVStorage(KVStorage):
    """`KVStorage`'s interface over quantized rows: `k[layer]` and `v[layer]` are each the list
    [packed, scales, biases]; reads return dense arrays of the model's dtype."""

    def __init__(self, layers: list[LayerShape], dtype: mx.Dtype, block_size: int, quant: KVQuant):
        quant.check(layers)
        self.quant = quant
        super().__init__(layers, dtype, block_size)
        self.layer_block_bytes = storage_block_bytes(self.layers, dtype, block_size, quant)
        self.block_bytes = sum(self.layer_block_bytes)

    def reset(self) -> None:
        self.k = [self._parts(RESERVED, s.k_dim, s) for s in self.layers]
        self.v = [self._parts(RESERVED, s.v_dim, s) for s in self.layers]
        mx.eval(self.k, self.v)
        self.num_blocks = RESERVED

    def grow(self, add: int) -> None:
        for i, s in enumerate(self.layers):
            new_k, new_v = self._parts(add, s.k_dim, s), self._parts(add, s.v_dim, s)
            self.k[i] = [mx.concatenate([a, b]) for a, b in zip(self.k[i], new_k)]
            self.v[i] = [mx.concatenate([a, b]) for a, b in zip(self.v[i], new_v)]
        mx.eval(self.k, self.v)
        self.num_blocks += add

    def _parts(self, blocks: int, dim: int, s: LayerShape) -> list[mx.array]:
        """Zeroed packed values, scales and biases (all zeros dequantize to zeros: the NULL block)."""
        rows = blocks * s.kv_heads * self.block_size
        packed, groups = self.quant.widths(dim)
        return [
            mx.zeros((rows, packed), mx.uint32),
            mx.zeros((rows, groups), self.dtype),
            mx.zeros((rows, groups), self.dtype),
        ]

    def _all(self) -> list[mx.array]:
        """Every array, in a fixed order: layer by layer, K's parts then V's."""
        return [a for i in range(len(self.layers)) for parts in (self.k[i], self.v[i]) for a in parts]

    def _block_rows(self, block: int, layer: int) -> slice:
        n = self.layers[layer].kv_heads * self.block_size
        return slice(block * n, (block + 1) * n)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """As KVStorage.copy: every pair in every layer's arrays, one host sync for them all."""
        parts = []
        for i in range(len(self.layers)):
            for src, dst in pairs:
                s, d = self._block_rows(src, i), self._block_rows(dst, i)
                for arrays in (self.k[i], self.v[i]):
                    for a in arrays:
                        parts.append((a, d, mx.contiguous(a[s])))  # evaluated first: a view would share the buffer
        mx.eval([data for *_, data in parts])
        for a, d, data in parts:
            a[d] = data
        self.dirty = True

    def block_arrays(self, block: int) -> list[np.ndarray]:
        """One block's rows of every array (`_all`'s order), on the host (a disk tier's copy)."""
        out = []
        for i in range(len(self.layers)):
            rows = self._block_rows(block, i)
            for parts in (self.k[i], self.v[i]):
                for a in parts:
                    data = a[rows]
                    out.append(np.array(data.view(mx.uint16) if data.dtype == mx.bfloat16 else data))
        return out

    def load_block(self, block: int, arrays: list[np.ndarray]) -> None:
        """Write `block_arrays`' output back into `block`."""
        it = iter(arrays)
        for i in range(len(self.layers)):
            rows = self._block_rows(block, i)
            for parts in (self.k[i], self.v[i]):
                for a in parts:
                    data = mx.array(next(it))
                    a[rows] = data.view(mx.bfloat16) if a.dtype == mx.bfloat16 else data.astype(a.dtype)
        self.dirty = True

    # --- reads and writes (one layer) -----------------------------------------------------

    def write(self, layer: int, rows: mx.array, keys: mx.array, values: mx.array) -> None:
        """Quantize `keys`/`values` ([B, H, N, D], flattened in that order) into storage rows."""
        self.write_parts(layer, rows, self.quant.quantize(keys), self.quant.quantize(values))

    def write_parts(self, layer: int, rows: mx.array, kparts, vparts) -> None:
        """Scatter already quantized rows (the parts of `KVQuant.quantize`, any leading shape)."""
        for stored, new in ((self.k[layer], kparts), (self.v[layer], vparts)):
            for a, p in zip(stored, new):
                a[rows] = p.reshape(-1, p.shape[-1])
        self.dirty = True

    def read_rows(self, layer: int, rows: mx.array) -> tuple[mx.array, mx.array]:
        k = self.quant.dequantize([a[rows] for a in self.k[layer]])
        v = self.quant.dequantize([a[rows] for a in self.v[layer]])
        return k, v

    def read(self, layer: int, slabs: mx.array) -> tuple[mx.array, mx.array]:
        """Gather `[block_size, width]` slabs of every part, then dequantize: [B, H, nb * bs, D]."""
        bs = self.block_size
        B, H, nb = slabs.shape

        def gather(parts):
            taken = [mx.take(a.reshape(-1, bs * a.shape[1]), slabs, axis=0) for a in parts]
            return self.quant.dequantize([t.reshape(B, H, nb * bs, a.shape[1]) for t, a in zip(taken, parts)])

        return gather(self.k[layer]), gather(self.v[layer])

    def take_writes(self) -> list[mx.array]:
        if not self.dirty:
            return []
        self.dirty = False
        return self._all()

    def zeroed(self) -> tuple[list, list]:
        self.dirty = False
        return (
            [self._parts(self.num_blocks, s.k_dim, s) for s in self.layers],
            [self._parts(self.num_blocks, s.v_dim, s) for s in self.layers],
        )
