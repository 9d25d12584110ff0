"""The compiled decode step traces a batch shape only once it recurs (engine.compiled_step): the
shapes a burst passes through while its rows join run uncompiled, and give the same logits."""

from __future__ import annotations

import mlx.core as mx

from engine.compiled_step import CompiledDecode


class _Model:
    """One layer: the logits are the sum of what the step's column write leaves in the copy."""

    def __call__(self, inputs, cache):
        (c,) = cache
        k = mx.ones((inputs.shape[0], 1, 1, 2)) * inputs[:, :, None, None].astype(mx.float32)
        keys, _ = c.update_and_fetch(k, k)
        return keys.sum(axis=(1, 3))[:, None, :]


def _copies(rows: int, cap: int) -> tuple[list[mx.array], list[mx.array]]:
    return [mx.zeros((rows, 1, cap, 2))], [mx.zeros((rows, 1, cap, 2))]


def _step(decode: CompiledDecode, rows: int, cap: int) -> mx.array:
    ks, vs = _copies(rows, cap)
    logits, *_ = decode(mx.arange(rows), 1, mx.zeros((rows,), mx.int32), ks, vs)
    return logits


def test_a_shape_is_traced_at_its_third_step_and_computes_the_same_before():
    decode = CompiledDecode(_Model(), column_write="select")
    first = [_step(decode, 3, 8) for _ in range(2)]
    assert decode.traces == 0 and decode.eager_steps == 2 and not decode.shapes
    traced = _step(decode, 3, 8)
    assert decode.traces == 1 and decode.shapes == {(3, 8)}
    assert _step(decode, 3, 8).tolist() == traced.tolist() == first[0].tolist() == first[1].tolist()
    assert decode.eager_steps == 2 and decode.steps == 4


def test_shapes_used_once_are_never_traced():
    decode = CompiledDecode(_Model(), column_write="slice")
    for rows in range(1, 6):
        _step(decode, rows, 8)
    assert decode.traces == 0 and decode.eager_steps == 5
