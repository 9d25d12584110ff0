"""The compiled decode step (engine.compiled_step) gives the tokens of the model's own step.

Rows of different lengths in one batch (left padding in the working copies), outputs long enough
to grow the copies past their first capacity, and a row leaving mid-batch (a new geometry). On
the real SmolLM2, CPU, greedy."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.request import PromptInput
from engine.sampling import SamplingParams
from engine.working_copy import capacity

from .conftest import SMOLLM

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
    made = {name: AsyncEngine.from_source(SMOLLM, cfg) for name, cfg in (
        ("compiled", EngineConfig()),
        ("eager", EngineConfig(compiled_decode=False)),
        ("off", EngineConfig(paged_cache=False)),
    )}
    yield made
    for eng in made.values():
        eng.shutdown()


async def test_compiled_decode_equals_the_models_own_step(engines):
    ctx = engines["compiled"].scheduler.cache.ctx
    ctx.policy = "always"  # every decode step through working copies, so every one compiled
    try:
        got = {name: await _outputs(eng) for name, eng in engines.items()}
    finally:
        ctx.policy = "auto"
    assert [len(ids) for ids in got["compiled"]] == MAX_TOKENS
    assert got["compiled"] == got["eager"] == got["off"]
    stats = engines["compiled"].stats()
    assert stats["compiled_steps"] >= max(MAX_TOKENS) - 1
    # one trace per (rows, capacity), the capacity growing by 16 columns: far fewer than steps
    assert 2 <= stats["compiled_shapes"] <= 10 < stats["compiled_steps"]
    assert engines["eager"].stats()["compiled_steps"] == 0


def test_capacities_are_few_and_mostly_full():
    caps = [capacity(cols, 16) for cols in range(1, 8193)]
    assert all(c >= cols for cols, c in enumerate(caps, 1))
    assert all(b >= a for a, b in zip(caps, caps[1:]))
    assert all((c - cols) / cols < 1 / 8 for cols, c in enumerate(caps, 1) if cols > 128)
    assert len(set(caps)) <= 56  # one trace per capacity and batch size: the log of the context
