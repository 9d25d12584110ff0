"""What a model keeps between tokens, slot by slot: the paged cache's plan for one model.

mlx_lm's models take one cache object per *slot* (`model.make_cache()`), and a slot is not
always a layer: gemma4's KV-sharing layers and nemotron_h's MLP layers have none, falcon_h1's
layers have a `CacheList` of two. `probe_layout` runs one token through the model with mlx_lm's
own caches and reads, per slot, what kind of state it is:

- `KVSlot`: K/V that grows with the sequence (`KVCache`, and `RotatingKVCache` with `keep=0`,
  i.e. a sliding window the model masks itself): paged in the block pool, one pool layer each.
- `StateSlot`: recurrent state of a fixed size per sequence (`ArraysCache`: conv state, SSM or
  gated delta-net state): kept per sequence, snapshotted into the prefix cache
  (engine.kv.recurrent).
- `ListSlot`: a `CacheList` of the above (falcon_h1: a Mamba state and a KV cache per layer).

Anything else (mlx_lm's `ChunkedKVCache`, `QuantizedKVCache`, a cache kind a future mlx_lm adds,
a rotating cache that keeps a prefix) makes the layout unpageable, with the reason: the model then
runs on mlx_lm's own BatchGenerator, and the engine's stats say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .kv_storage import LayerShape


@dataclass(frozen=True)
class KVSlot:
    layer: int  # the pool layer (engine.kv.kv_storage) this slot's K/V live in


@dataclass(frozen=True)
class StateSlot:
    index: int  # first of this slot's arrays in a sequence's flat state list
    shapes: tuple[tuple[int, ...], ...]  # each array's shape for one sequence (batch dim 1)
    dtypes: tuple[mx.Dtype, ...]


@dataclass(frozen=True)
class ListSlot:
    children: tuple[KVSlot | StateSlot, ...]


Slot = KVSlot | StateSlot | ListSlot


@dataclass
class CacheLayout:
    slots: list[Slot] = field(default_factory=list)
    kv_layers: list[LayerShape] = field(default_factory=list)
    kv_dtype: mx.Dtype | None = None
    state_shapes: list[tuple[int, ...]] = field(default_factory=list)  # flat, one entry per state array
    state_dtypes: list[mx.Dtype] = field(default_factory=list)
    why_not: str | None = None  # set when the model's caches cannot be paged
    # The model's attention groups queries by KV head into five dimensions but applies the mask
    # as four ([B, 1, N, L]): mlx_lm 0.32.2's gemma2 (tests/engine/test_mlx_lm_sentinels.py).
    # Our masks then get the group axis, which makes every row see its own mask.
    grouped_mask: bool = False

    @property
    def recurrent(self) -> bool:
        """Whether sequences carry recurrent state besides K/V."""
        return bool(self.state_shapes)

    @property
    def state_bytes(self) -> int:
        """Bytes of one sequence's recurrent state (all slots)."""
        total = 0
        for shape, dtype in zip(self.state_shapes, self.state_dtypes):
            n = dtype.size
            for d in shape:
                n *= d
            total += n
        return total

    def describe(self) -> str:
        kinds = [_kind(s) for s in self.slots]
        return f"{kinds.count('kv')} KV, {kinds.count('state')} recurrent, {kinds.count('list')} combined slots"


def _kind(slot: Slot) -> str:
    return "kv" if isinstance(slot, KVSlot) else "state" if isinstance(slot, StateSlot) else "list"


def probe_layout(model) -> CacheLayout:
    """The model's cache slots, read from one token through it with mlx_lm's own caches."""
    from mlx_lm.models.cache import ArraysCache, CacheList, make_prompt_cache

    caches = make_prompt_cache(model)
    layout = CacheLayout()
    for c in caches:
        reason = _unpageable(c)
        if reason is not None:
            layout.why_not = reason
            return layout
    model(mx.array([[1]]), cache=caches)
    mx.eval([c.state for c in caches])

    def slot_of(c) -> KVSlot | StateSlot | ListSlot:
        if isinstance(c, CacheList):
            return ListSlot(tuple(slot_of(child) for child in c.caches))
        if isinstance(c, ArraysCache):
            arrays = list(c.cache)
            if any(a is None for a in arrays):
                raise ValueError(f"{type(c).__name__} left an entry unset after one token")
            index = len(layout.state_shapes)
            layout.state_shapes.extend(tuple(a.shape) for a in arrays)
            layout.state_dtypes.extend(a.dtype for a in arrays)
            return StateSlot(index, tuple(tuple(a.shape) for a in arrays), tuple(a.dtype for a in arrays))
        layout.kv_layers.append(LayerShape(c.keys.shape[1], c.keys.shape[3], c.values.shape[3]))
        if layout.kv_dtype is None:
            layout.kv_dtype = c.keys.dtype
        return KVSlot(len(layout.kv_layers) - 1)

    layout.slots = [slot_of(c) for c in caches]
    layout.grouped_mask = _groups_queries_in_5d(model)
    if layout.kv_dtype is None:  # a state-space model: no K/V at all
        layout.kv_dtype = mx.float16
    return layout


def _unpageable(cache) -> str | None:
    """Why one of mlx_lm's cache objects cannot be paged (None: it can)."""
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

    kind = type(cache)
    if kind is KVCache or kind is ArraysCache:
        return None
    if kind is RotatingKVCache:
        return None if cache.keep == 0 else f"RotatingKVCache keeps {cache.keep} tokens at its start"
    if kind is CacheList:
        return next((r for r in map(_unpageable, cache.caches) if r is not None), None)
    return f"{kind.__name__} (mlx_lm's {kind.__module__}) is not a cache kind the paged cache holds"


def _groups_queries_in_5d(model) -> bool:
    """mlx_lm 0.32.2's gemma2 attention with more query heads than KV heads."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) != "gemma2":
        return False
    return args.num_attention_heads != args.num_key_value_heads
