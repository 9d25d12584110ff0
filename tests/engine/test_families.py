"""The conformance matrix: every mlx_lm family we serve, through the engine, against mlx_lm itself.

Each family is a tiny random-weight model built from its real config (`synthetic:<family>`,
engine.loading.families), with the cache kinds that make it different: sliding windows, latent KV,
chunked attention, KV shared between layers, conv / SSM / gated delta-net state. For each one:

- four prompts of different lengths, submitted at once so that they batch (padded rows), decode
  greedily exactly as mlx_lm's own model does one prompt at a time (`solo`: make_prompt_cache and
  the model's forward, argmax);
- the engine with its paged cache off decodes the same;
- a repeated prompt hits the prefix cache and decodes as it did cold, and so does a prompt that
  extends a finished request's prompt and output (it reuses blocks written during decode); blocks
  of 4 tokens and prefill chunks of 16, so that prompts cross blocks, chunks and the 16-token
  windows and 32-token chunks of the families that have them;
- the engine says which path it took (`stats()["cache"]["path"]`, and `why` when it is not the
  paged one) and whether it batched (`stats()["batched"]`).

EXPECT holds what each family should get, one line each. A mismatch names the first differing
step and mlx_lm's own top-1/top-2 logit margin there: the weights are chosen so that no solo step
is a near tie (SOLO_MARGIN), so a flip is a cache or batching bug, not float noise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

import engine.engine
from engine.config import EngineConfig, SpeculativeConfig
from engine.engine import AsyncEngine
from engine.loading.families import FAMILIES, VOCAB
from engine.request import PromptInput
from engine.sampling import SamplingParams

from .helpers import collect

NEW_TOKENS = 8
LENGTHS = (5, 11, 23, 37)  # the batch: different lengths, so rows are padded
REPEAT_LENGTH = 28  # the prompt that is run cold, then again, then extended
EXTRA = 3  # new tokens after the finished request's prompt + output
SOLO_MARGIN = 1e-3  # every solo step's top-1/top-2 logit margin is above this (measured)
CONFIG = EngineConfig(block_size=4, prefill_step_size=16, prefill_batch_size=4, max_num_seqs=8, cache_memory_mb=16)


@dataclass(frozen=True)
class Expect:
    path: str = "paged"  # engine.stats()["cache"]["path"] with the paged cache on
    batched: bool = True  # False: the engine serves the family one request at a time
    reuses_decode_blocks: bool = True  # a prompt extending prompt + output hits past the prompt


EXPECT = {name: Expect() for name in FAMILIES} | {
    # llama4 builds its chunked-attention mask (and its NoPE layers' attention scales) from one
    # offset for the whole batch, and mlx_lm's BatchGenerator cannot hold its ChunkedKVCache even
    # for one request with history: the batch check serves it one request at a time on mlx_lm's
    # own generate_step (engine.solo_loop), never wrong.
    "llama4": Expect(path="mlx_lm", batched=False),
}


@dataclass
class Solo:
    tokens: list[int]
    margins: list[float]  # mlx_lm's top-1/top-2 logit margin at each step


@dataclass
class Case:
    name: str
    expect: Expect
    engine: AsyncEngine
    prompts: list[list[int]]
    solo: list[Solo]
    repeat: list[int]
    repeat_solo: Solo
    extended: list[int]
    extended_solo: Solo


def make_prompts(name: str) -> tuple[list[list[int]], list[int]]:
    """Seeded random ids (never 0, the EOS): the batch's prompts and the repeated one."""
    rng = np.random.default_rng(sorted(FAMILIES).index(name))
    ids = [[int(t) for t in rng.integers(1, VOCAB, n)] for n in (*LENGTHS, REPEAT_LENGTH)]
    return ids[:-1], ids[-1]


def solo_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> Solo:
    """mlx_lm's own greedy decode of one prompt: its cache, its forward, argmax."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    tokens, margins = [], []
    for _ in range(n):
        top2 = mx.sort(logits)[-2:]
        margins.append((top2[1] - top2[0]).item())
        tokens.append(mx.argmax(logits).item())
        logits = model(mx.array([tokens[-1:]]), cache=cache)[0, -1]
    return Solo(tokens, margins)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, load_once):
    """One family: mlx_lm's solo references first (on this thread), then the engine, which shares
    the loaded weights (tests/conftest.load_once)."""
    name = request.param
    source = f"synthetic:{name}"
    model = engine.engine.load_model(source, fast_cpu=CONFIG.fast_cpu).model
    prompts, repeat = make_prompts(name)
    solo = [solo_greedy(model, p) for p in prompts]
    repeat_solo = solo_greedy(model, repeat)
    extended = repeat + repeat_solo.tokens + [int(t) for t in np.random.default_rng(99).integers(1, VOCAB, EXTRA)]
    eng = AsyncEngine(source, CONFIG)
    yield Case(name, EXPECT[name], eng, prompts, solo, repeat, repeat_solo, extended, solo_greedy(model, extended))
    eng.shutdown()


async def generate(eng: AsyncEngine, prompt: list[int]):
    """Greedy, NEW_TOKENS past EOS: the token ids and the usage."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    _, ids, outs = await collect(eng.submit(PromptInput(token_ids=prompt), params))
    return ids, outs[-1].usage


def assert_as_solo(what: str, got: list[int], ref: Solo) -> None:
    """Token for token; a difference names its step and mlx_lm's margin there."""
    assert min(ref.margins) > SOLO_MARGIN, f"{what}: solo has a near tie ({min(ref.margins):.1e}): pick another seed"
    if got != ref.tokens:
        step = next((i for i, (a, b) in enumerate(zip(got, ref.tokens)) if a != b), min(len(got), len(ref.tokens)))
        raise AssertionError(
            f"{what}: differs from mlx_lm solo at step {step} (solo margin there "
            f"{ref.margins[step] if step < len(ref.margins) else float('nan'):.2e}): got {got}, solo {ref.tokens}"
        )


def path_of(eng: AsyncEngine) -> str:
    cache = eng.stats()["cache"]
    return f"path {cache.get('path')!r} (why: {cache.get('why')!r})"


async def test_a_batch_of_different_lengths_decodes_as_mlx_lm_does_one_at_a_time(case):
    results = await asyncio.gather(*(generate(case.engine, p) for p in case.prompts))
    for prompt, (got, _), ref in zip(case.prompts, results, case.solo):
        assert_as_solo(f"{case.name}, {len(prompt)}-token prompt in a batch ({path_of(case.engine)})", got, ref)
    stats = case.engine.stats()
    assert stats["cache"].get("path") == case.expect.path, path_of(case.engine)
    if case.expect.path != "paged":
        assert stats["cache"].get("why"), "a family off the paged path says why"
    assert stats.get("batched", True) is case.expect.batched
    if case.expect.batched:
        assert stats["batch_peak"] == len(case.prompts), "the four prompts decoded as one batch"
    else:
        assert (stats["batch_peak"] or 1) == 1


async def test_the_engine_with_its_paged_cache_off_decodes_the_same(case):
    off = AsyncEngine(f"synthetic:{case.name}", CONFIG.model_copy(update={"paged_cache": False}))
    try:
        results = await asyncio.gather(*(generate(off, p) for p in case.prompts))
    finally:
        off.shutdown()
    for prompt, (got, _), ref in zip(case.prompts, results, case.solo):
        assert_as_solo(f"{case.name}, cache off, {len(prompt)}-token prompt", got, ref)


async def test_a_prefix_hit_decodes_as_the_cold_prompt_did(case):
    cold, cold_usage = await generate(case.engine, case.repeat)
    hit, hit_usage = await generate(case.engine, case.repeat)
    extended, extended_usage = await generate(case.engine, case.extended)
    assert_as_solo(f"{case.name}, cold", cold, case.repeat_solo)
    assert_as_solo(f"{case.name}, the same prompt again ({hit_usage.cached_tokens} cached)", hit, case.repeat_solo)
    assert_as_solo(
        f"{case.name}, prompt + output + {EXTRA} ({extended_usage.cached_tokens} cached)", extended, case.extended_solo
    )
    assert cold_usage.cached_tokens == 0
    if case.expect.path == "paged":
        assert hit_usage.cached_tokens > 0, path_of(case.engine)
        assert extended_usage.cached_tokens > (len(case.repeat) if case.expect.reuses_decode_blocks else 0)


async def test_a_hybrid_model_preempted_in_a_tight_budget_decodes_as_alone():
    """Qwen3.5's layout (synthetic:qwen3_5): four long requests in a 1 MB budget (blocks of 16, the
    running states counted in it) preempt each other; a preempted request resumes from the snapshot
    of its state taken when it left (or recomputes, if that was evicted) and decodes exactly as
    mlx_lm does alone."""
    source = "synthetic:qwen3_5"
    model = engine.engine.load_model(source, fast_cpu=CONFIG.fast_cpu).model
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(1, VOCAB, n)] for n in (300, 310, 320, 330)]
    solo = [solo_greedy(model, p, 160) for p in prompts]
    eng = AsyncEngine(source, EngineConfig(block_size=16, cache_memory_mb=1, state_interval=64))
    try:
        params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
        results = await asyncio.gather(*(collect(eng.submit(PromptInput(token_ids=p), params)) for p in prompts))
        for _ in range(100):  # the loop publishes its stats every STATS_INTERVAL_S
            stats = eng.stats()
            if stats["running"] == stats["waiting"] == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        eng.shutdown()
    for prompt, (_, got, _), ref in zip(prompts, results, solo):
        assert_as_solo(f"qwen3_5, {len(prompt)}-token prompt, preempted", got, ref)
    assert stats["preempted"] > 0 and stats["cache"]["over_budget_blocks"] == 0
    assert stats["cache"]["blocks_used"] == 0 and stats["cache"]["live_sequences"] == 0


async def test_verified_drafts_decode_as_mlx_lm(case, monkeypatch):
    """Speculation's verify step (engine.speculative) on each family: drafts from an oracle that
    knows mlx_lm's solo continuation, right for two tokens then wrong, so that every verify keeps
    some drafts and cuts the K/V of a rejected one back. The batch of different lengths (rows
    padded in the verify chunk) and the extended prompt (a prefix hit on blocks written by verify
    steps) decode exactly as mlx_lm does alone. Families whose state cannot be cut back (recurrent
    layers) or that no batch serves run without speculation, and say so (no `speculative` stats)."""
    import engine.speculative

    continuations = {tuple(p): s.tokens for p, s in zip(case.prompts, case.solo)}
    continuations[tuple(case.repeat)] = case.repeat_solo.tokens
    continuations[tuple(case.extended)] = case.extended_solo.tokens

    def oracle(spec, k):  # in place of prompt lookup
        tokens = spec.tokens
        for prompt, solo in continuations.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                right = solo[done : done + 2]
                return (right + [(right[-1] + 1) % VOCAB if right else 1])[:k]
        return []

    monkeypatch.setattr(engine.speculative.RowSpec, "lookup", oracle)
    spec_config = CONFIG.model_copy(update={"speculative": SpeculativeConfig(method="ngram")})
    eng = AsyncEngine(f"synthetic:{case.name}", spec_config)
    try:
        results = await asyncio.gather(*(generate(eng, p) for p in case.prompts))
        await generate(eng, case.repeat)
        extended, usage = await generate(eng, case.extended)
        stats = eng.stats()
    finally:
        eng.shutdown()
    for prompt, (got, _), ref in zip(case.prompts, results, case.solo):
        assert_as_solo(f"{case.name}, speculating, {len(prompt)}-token prompt in a batch", got, ref)
    assert_as_solo(f"{case.name}, speculating, prompt + output + {EXTRA}", extended, case.extended_solo)
    recurrent = "state_bytes_per_sequence" in stats["cache"]
    if case.expect.path != "paged" or recurrent:
        assert "speculative" not in stats, "speculation is off where the state cannot be cut back"
        return
    spec = stats["speculative"]
    assert spec["verify_steps"] > 0 and 0 < spec["accepted_tokens"] < spec["drafted_tokens"]
    if case.expect.reuses_decode_blocks:
        assert usage.cached_tokens > len(case.repeat)
