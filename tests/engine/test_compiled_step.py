"""The compiled decode step (engine.compiled_step) gives the tokens of the model's own step.

Rows of different lengths in one batch (left padding in the working copies), outputs long enough
to grow the copies past their first capacity, a row leaving mid-batch (a new geometry), and a lone
row decoding eagerly without a mask (CUDA's default). On the real SmolLM2, CPU, greedy."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.kv.working_copy import Geometry, capacity
from engine.request import PromptInput
from engine.sampling import SamplingParams

from ..conftest import SMOLLM

PROMPTS = ["Rivers flow into", "The oldest tree in Europe grows in a valley where", "Paper"]
MAX_TOKENS = [40, 12, 40]  # 40 tokens outgrow the copies twice; the second row leaves early


async def _outputs(engine: AsyncEngine) -> list[list[int]]:
    async def one(text: str, max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [t async for o in engine.submit(PromptInput(text=text), params) for t in o.token_ids]

    return list(await asyncio.gather(*(one(p, n) for p, n in zip(PROMPTS, MAX_TOKENS))))


@pytest.fixture(scope="module", autouse=True)
def _one_load_per_model(load_once):
    """Every engine of this module shares its model's weights (tests/conftest.load_once)."""


@pytest.fixture(scope="module")
def engines():
    made = {
        name: AsyncEngine.from_source(SMOLLM, cfg)
        for name, cfg in (
            ("compiled", EngineConfig()),
            ("select", EngineConfig(decode_column_write="select")),  # CUDA's column write, forced on
            ("eager", EngineConfig(compiled_decode=False)),
            ("unpadded", EngineConfig(unpadded_decode="eager")),  # CUDA's default, forced on
            ("off", EngineConfig(paged_cache=False)),
        )
    }
    yield made
    for eng in made.values():
        eng.shutdown()


async def test_compiled_decode_equals_the_models_own_step(engines):
    ctxs = [engines[name].scheduler.cache.ctx for name in ("compiled", "select", "unpadded")]
    for ctx in ctxs:
        ctx.policy = "always"  # every decode step through working copies, so every one compiled
    try:
        got = {name: await _outputs(eng) for name, eng in engines.items()}
    finally:
        for ctx in ctxs:
            ctx.policy = "auto"
    assert [len(ids) for ids in got["compiled"]] == MAX_TOKENS
    assert engines["select"].scheduler.gen.compiled.select and not engines["compiled"].scheduler.gen.compiled.select
    assert got["compiled"] == got["select"] == got["eager"] == got["unpadded"] == got["off"]
    stats = engines["compiled"].stats()
    assert stats["compiled_steps"] >= max(MAX_TOKENS) - 1
    # one trace per (rows, capacity), the capacity growing by 16 columns: far fewer than steps
    assert 2 <= stats["compiled_shapes"] <= 10 < stats["compiled_steps"]
    assert engines["eager"].stats()["compiled_steps"] == 0
    assert engines["unpadded"].stats()["compiled_steps"] >= max(MAX_TOKENS) - 1  # its rows are padded


async def test_an_unpadded_batch_decodes_eagerly_and_unmasked(engines):
    """With `unpadded_decode: eager` a lone row (never padded) skips the compiled step; its
    attention gets no mask at all, and its tokens are the compiled step's."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def solo(name: str) -> list[int]:
        prompt = PromptInput(text=PROMPTS[1])
        return [t async for o in engines[name].submit(prompt, params) for t in o.token_ids]

    before = {name: engines[name].stats()["compiled_steps"] for name in ("compiled", "unpadded")}
    assert await solo("unpadded") == await solo("compiled")
    assert engines["unpadded"].stats()["compiled_steps"] == before["unpadded"]
    assert engines["compiled"].stats()["compiled_steps"] > before["compiled"]


def test_a_mask_that_hides_nothing_is_none():
    geom = Geometry.new((1, 2), [7, 7], step=16)
    assert geom.sees_all(None) and geom.mask(None) is None
    assert geom.mask(None, return_array=True).tolist() == [[[[True] * 8]]] * 2  # a model that asks for an array
    assert geom.mask(4) is not None and not geom.sees_all(4)  # a sliding window cuts the first columns
    padded = Geometry.new((1, 2), [7, 5], step=16)
    assert not padded.sees_all(None) and padded.mask(None)[1, 0, 0].tolist() == [False] * 2 + [True] * 6


def test_capacities_are_few_and_mostly_full():
    caps = [capacity(cols, 16) for cols in range(1, 8193)]
    assert all(c >= cols for cols, c in enumerate(caps, 1))
    assert all(b >= a for a, b in zip(caps, caps[1:]))
    assert all((c - cols) / cols < 1 / 8 for cols, c in enumerate(caps, 1) if cols > 128)
    assert len(set(caps)) <= 56  # one trace per capacity and batch size: the log of the context


def test_the_cuda_column_write_equals_the_slice_update(engines):
    """On CUDA the step writes its column with a select over the copy (engine.compiled_step's
    docstring says why); forced here on the CPU, it gives the slice update's copies and logits."""
    import mlx.core as mx

    from engine.compiled_step import CompiledDecode

    model = engines["compiled"].loaded.model
    args = model.args
    rows, cap, col = 3, 32, 20
    shape = (rows, args.num_key_value_heads, cap, args.hidden_size // args.num_attention_heads)
    ks = [mx.random.normal(shape) for _ in model.layers]
    vs = [mx.random.normal(shape) for _ in model.layers]
    inputs, pad = mx.array([5, 17, 400]), mx.array([0, 4, 11], dtype=mx.int32)
    out = {how: CompiledDecode(model, how)(inputs, col, pad, ks, vs) for how in ("slice", "select")}
    (logits_a, ks_a, vs_a), (logits_b, ks_b, vs_b) = out["slice"], out["select"]
    assert all(mx.array_equal(a, b).item() for a, b in zip(ks_a + vs_a, ks_b + vs_b))
    assert not mx.array_equal(ks_a[0], ks[0]).item()  # the column was written
    assert mx.array_equal(ks_a[0][:, :, :col], ks[0][:, :, :col]).item()
    assert mx.allclose(logits_a, logits_b, atol=1e-4).item()
