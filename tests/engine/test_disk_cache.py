"""The disk tier through the engine (SmolLM2, the bundled GGUF): an engine started again on the
same disk path (what a reload or a restart is) answers a prompt it saw before from its disk
blocks, with the same greedy output as the first engine computed from scratch; with quantized KV
blocks (`kv_bits: 8`) too, and an engine of another bit width finds none of them."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.request import PromptInput

from ..conftest import SMOLLM
from .helpers import run

SYSTEM = " ".join(f"Rule {i}: answer briefly, politely and only about topic {i}." for i in range(24))


def prompt(question: str) -> PromptInput:
    return PromptInput(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def engine(path, kv_bits: int = 16) -> AsyncEngine:
    config = EngineConfig(cache_memory_mb=64, kv_bits=kv_bits, disk_cache={"enabled": True, "path": str(path)})
    return AsyncEngine.from_source(SMOLLM, config)


@pytest.mark.parametrize("kv_bits", [16, 8])
async def test_a_reloaded_engine_answers_a_repeated_prompt_from_disk_with_the_same_output(tmp_path, load_once, kv_bits):
    first = engine(tmp_path, kv_bits)
    try:
        text, ids, outs = await run(first, prompt("Say hi."), temperature=0, max_tokens=12)
    finally:
        first.shutdown()  # the disk writer's queue is flushed here
    usage = outs[-1].usage
    assert usage.cached_tokens == 0
    full = usage.prompt_tokens // 32 * 32  # the prompt's full blocks: what the disk holds of it

    second = engine(tmp_path, kv_bits)
    try:
        assert second.stats()["cache"]["disk"]["entries"] >= full // 32
        again, ids2, outs2 = await run(second, prompt("Say hi."), temperature=0, max_tokens=12)
        cache = second.stats()["cache"]
    finally:
        second.shutdown()
    assert outs2[-1].usage.cached_tokens == min(full, usage.prompt_tokens - 1) > 0
    assert cache["misses"] == 0 and cache["disk"]["hits"] == full // 32
    assert cache["disk"]["errors"] == cache["disk"]["skipped"] == 0
    assert (again, ids2) == (text, ids)
    if kv_bits != 16:  # blocks of another bit width are another identity: never read
        other = engine(tmp_path, 16)
        try:
            *_, outs16 = await run(other, prompt("Say hi."), temperature=0, max_tokens=12)
            assert outs16[-1].usage.cached_tokens == 0 and other.stats()["cache"]["disk"]["hits"] == 0
        finally:
            other.shutdown()
