"""The paged KV cache: block pool, chained prefix hashes, sharing between running requests, the
memory budget. On the real SmolLM2 (and Gemma 3 for sliding-window layers), CPU, short prompts."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.kv.block_pool import BlockPool
from engine.kv.kv_storage import LayerShape
from engine.kv.prefix_cache import PrefixCache
from engine.request import PromptInput
from engine.sampling import SamplingParams

from ...conftest import SMOLLM

GREEDY = dict(temperature=0, max_tokens=8)
SYSTEM = (
    "You are the help desk of the Orchard public library. Answer in one short sentence. Opening hours: "
    "Monday to Friday 9:00-19:00, Saturday 10:00-16:00, closed on Sunday. Members may borrow 12 items "
    "for 3 weeks; renewals are possible twice unless someone reserved the item. "
)
QUESTIONS = ["When do you open on Saturday?", "How many books can I borrow?", "Can I renew a book?"]


def chat(question: str, system: str = SYSTEM) -> PromptInput:
    return PromptInput(messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])


async def run(engine, prompt: PromptInput, **params):
    outs = [o async for o in engine.submit(prompt, SamplingParams(**{**GREEDY, **params}))]
    return [t for o in outs for t in o.token_ids], outs[-1].usage


def cache_stats(engine) -> dict:
    return engine.stats()["cache"]


async def settled(engine) -> dict:
    """Stats once nothing runs or waits."""
    for _ in range(200):
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine did not settle: {stats}")


@pytest.fixture(scope="module", autouse=True)
def _one_load_per_model(load_once):
    """Every engine of this module shares its model's weights (tests/conftest.load_once)."""


@pytest.fixture(scope="module")
def off():
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(paged_cache=False))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def on():
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig())
    yield eng
    eng.shutdown()


# --- the pool and the index without a model ---------------------------------------------------


def _pool(capacity=4, block_size=4, on_evict=None) -> BlockPool:
    return BlockPool([LayerShape(2, 8, 8)] * 3, mx.float32, block_size, capacity, on_evict=on_evict)


def test_lru_evicts_tails_first_and_counts_blocks():
    pool = _pool(capacity=4, on_evict=lambda block: index.forget(block))
    index = PrefixCache(pool, b"salt")
    ids = list(range(100, 116))  # four full blocks of 4
    hashes = index.chain(ids)
    chain = [pool.allocate() for _ in range(4)]
    for k, (h, b) in enumerate(zip(hashes, chain)):
        assert index.insert(index.parent_of(hashes, k), tuple(ids[4 * k : 4 * k + 4]), b, h)
    pool.release(chain)
    assert pool.stats()["blocks_cached"] == 4 and pool.used == 0
    pool.allocate()  # the pool is at capacity: one eviction, the chain's tail
    assert index.lookup(ids).blocks == chain[:3]
    assert pool.counters["evictions"] == 1


def test_chained_hashes_do_not_reuse_a_run_after_another_prefix():
    pool = _pool(capacity=8)
    index = PrefixCache(pool, b"salt")
    run = [7, 7, 7, 7, 8, 8, 8, 8]
    first, second = [1, 2, 3, 4] + run, [5, 6, 3, 4] + run
    hashes = index.chain(first)
    blocks = [pool.allocate() for _ in hashes]
    for k, (h, b) in enumerate(zip(hashes, blocks)):
        index.insert(index.parent_of(hashes, k), tuple(first[4 * k : 4 * k + 4]), b, h)
    assert index.chain(second)[1:] != hashes[1:]
    match = index.lookup(second)
    assert match.blocks == [] and match.partial_tokens == 0  # only block 0 could match, and it differs at token 0
    assert index.lookup([1, 2, 9, 9, 7]).partial_tokens == 2  # a partial hit inside block 0


def test_partial_lookup_compares_two_children_of_many():
    """Many cached continuations after one parent: a lookup finds the longest one by comparing
    only the two beside the prompt in sorted order, and forgetting a block leaves no trace."""
    pool = _pool(capacity=64, block_size=8)
    index = PrefixCache(pool, b"salt")
    root = index.root
    others = {pool.allocate(): (t, t + 1, t + 2) for t in range(100, 140)}  # 40 runs, other first tokens
    for b, toks in others.items():
        assert index.insert(root, toks, b)
    short, long_ = pool.allocate(), pool.allocate()
    assert index.insert(root, (5, 6), short)
    assert index.insert(root, (5, 6, 7, 8), long_)
    assert not index.insert(root, (5, 6, 7), pool.allocate())  # an indexed block already starts so
    match = index.lookup([5, 6, 7, 9, 1])
    assert (match.partial_block, match.partial_tokens) == (long_, 3)
    assert index.holder(root, (5, 6, 7)) == long_ and index.holder(root, (9,)) is None
    assert len(index._beside(root, (5, 6, 7, 9, 1))) == 2  # of 42 children
    assert (index.lookup([100, 101, 7]).partial_tokens, index.lookup([139, 140]).partial_tokens) == (2, 2)
    assert index.lookup([99, 101]).partial_tokens == 0  # before every child: none shares a token
    index.forget(long_)
    assert (index.lookup([5, 6, 7]).partial_block, index.lookup([5, 6, 7]).partial_tokens) == (short, 2)
    for b in [short, *others]:
        index.forget(b)
    assert index.children == {} and index.meta == {}


def test_copy_on_write_copies_every_layer():
    pool = _pool(capacity=8)
    src = pool.allocate()
    n = 2 * pool.block_size
    for layer in range(3):
        pool.storage.k[layer][src * n : (src + 1) * n] = mx.full((n, 8), float(layer + 1))
    dst = pool.copy_block(src)
    for layer in range(3):
        assert mx.all(pool.storage.k[layer][dst * n : (dst + 1) * n] == layer + 1).item()
    assert pool.counters["cow_copies"] == 1 and dst != src


# --- on the real model -----------------------------------------------------------------------


async def test_prefix_cache_table(on):
    """The seed's table: MISS, HIT, MISS, HIT, PREFIX_HIT, read from the stats."""

    async def outcome(prompt):
        before = cache_stats(on)
        await run(on, prompt)
        after = cache_stats(on)
        return next(k for k in ("hits", "misses", "prefix_hits") if after[k] > before[k])

    first = PromptInput(text="The tallest mountain in the Alps is")
    other = PromptInput(text="Water boils at a temperature of")
    system = "You translate English to French. Keep names unchanged."
    assert await outcome(first) == "misses"
    assert await outcome(first) == "hits"
    assert await outcome(other) == "misses"
    assert await outcome(first) == "hits"
    assert await outcome(chat("Good morning, Anna.", system)) == "misses"
    assert await outcome(chat("See you tomorrow, Paul.", system)) == "prefix_hits"


async def test_exact_repeats_equal_cache_off(on, off):
    prompt = chat("Which day are you closed?")
    want, _ = await run(off, prompt)
    for i in range(3):
        got, usage = await run(on, prompt)
        assert got == want
        if i:
            assert usage.cached_tokens == usage.prompt_tokens - 1  # a full hit: all but the last token


async def test_a_pipelined_loop_computes_a_partly_matched_block_again_while_it_runs(off):
    """A GPU's loop is pipelined: copying a cached block's first tokens would wait for the step in
    flight, so while a request runs, a repeat reuses whole blocks only and computes the rest; on an
    idle loop it copies (a full hit). Outputs equal cache off either way (SmolLM2, real weights)."""
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(pipelined_decode=True))
    try:
        bs, prompt = eng.config.block_size, chat("Which day are you closed?")
        want, _ = await run(off, prompt)
        assert (await run(eng, prompt))[0] == want
        got, usage = await run(eng, prompt)
        assert got == want and usage.cached_tokens == usage.prompt_tokens - 1
        long = eng.submit(chat("Describe the library's reading room."), SamplingParams(temperature=0, max_tokens=200))
        await anext(long)  # it runs: the loop has a step in flight from now on
        got, usage = await run(eng, prompt)
        assert got == want and usage.cached_tokens == (usage.prompt_tokens - 1) // bs * bs > 0
        await long.aclose()
        assert (await settled(eng))["cache"]["live_sequences"] == 0
    finally:
        eng.shutdown()


async def test_shared_system_prompt_equals_cache_off(on, off):
    want = [(await run(off, chat(q)))[0] for q in QUESTIONS]
    got = await asyncio.gather(*(run(on, chat(q)) for q in QUESTIONS))
    assert [ids for ids, _ in got] == want
    assert all(usage.cached_tokens > 60 for _, usage in got[1:])  # the later ones reused the system prompt


async def test_identical_aligned_runs_after_different_prefixes_are_not_reused(on, off):
    bs = EngineConfig().block_size
    tok = on.tokenizer
    words = tok.encode(" ".join(f"river{i} stone{i}" for i in range(200)))
    head = tok.encode(" ".join(f"alpha{i}" for i in range(60)))[:bs]
    run_ids = words[: 2 * bs]  # two blocks of the same tokens in both prompts, block-aligned
    first = head + run_ids
    second = head[: bs // 2] + [t + 1 for t in head[bs // 2 :]] + run_ids  # differs from token bs/2 on
    want = [(await run(off, PromptInput(token_ids=p)))[0] for p in (first, second)]
    got_first, _ = await run(on, PromptInput(token_ids=first))
    got_second, usage = await run(on, PromptInput(token_ids=second))
    assert [got_first, got_second] == want
    assert usage.cached_tokens == bs // 2  # the common start of block 0, not the identical run after it


async def test_ten_users_share_one_copy_of_the_system_prompt(on, off):
    system = " ".join(
        f"Rule {i}: visitors of the botanical garden keep to the paths in zone {i} and never feed the fish."
        for i in range(22)
    )
    questions = [f"Is zone {i} open today?" for i in range(10)]
    ids = [on.tokenizer.apply_chat_template(chat(q, system).messages, add_generation_prompt=True) for q in questions]
    common = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    assert 450 <= common <= 560
    bs = EngineConfig().block_size
    on.clear_cache()
    results = await asyncio.gather(*(run(on, PromptInput(token_ids=p), max_tokens=6) for p in ids))
    stats = (await settled(on))["cache"]
    cached = sorted(usage.cached_tokens for _, usage in results)
    assert cached[0] == 0 and cached[1] >= common // bs * bs  # computed once, then reused by the 9 others
    # Peak blocks in use: the shared blocks once plus a few private blocks per user, not 10 copies.
    private = max(-(-(len(p) - common // bs * bs + 6) // bs) for p in ids) + 1
    assert stats["blocks_used_peak"] <= common // bs + 10 * private
    assert stats["blocks_used_peak"] < 10 * (len(ids[0]) // bs) / 3
    assert stats["blocks_used"] == 0
    for i in (0, 7):  # spot-check two outputs against the cache off
        assert results[i][0] == (await run(off, PromptInput(token_ids=ids[i]), max_tokens=6))[0]


async def test_decode_through_working_copies_or_gathers_equals_cache_off(on, off):
    """Both ways a decode step reads the pool (engine.kv.paged_cache) give the cache-off tokens."""
    prompts = [PromptInput(text=t) for t in ("Rivers flow into", "The oldest tree in Europe", "Paper was invented")]
    want = [(await run(off, p, max_tokens=10))[0] for p in prompts]
    ctx = on.scheduler.cache.ctx
    try:
        for policy in ("always", "never"):
            ctx.policy = policy  # read on the engine thread at its next step
            before = dict(ctx.counters)
            on.clear_cache()
            got = await asyncio.gather(*(run(on, p, max_tokens=10) for p in prompts))
            assert [ids for ids, _ in got] == want
            used = "steps_working_copy" if policy == "always" else "steps_gathered"
            assert ctx.counters[used] > before[used]
    finally:
        ctx.policy = "auto"


async def test_clear_while_running_keeps_outputs(on, off):
    prompt = chat("Tell me about the reading room.")
    want, _ = await run(off, prompt, max_tokens=12)
    stream = on.submit(prompt, SamplingParams(temperature=0, max_tokens=12))
    first = await stream.__anext__()
    on.clear_cache()
    rest = [o async for o in stream]
    assert first.token_ids + [t for o in rest for t in o.token_ids] == want
    stats = (await settled(on))["cache"]
    assert stats["blocks_used"] == 0


async def test_abort_mid_stream_returns_blocks(on):
    stream = on.submit(chat("Write a long story about a lighthouse."), SamplingParams(temperature=0, max_tokens=200))
    await stream.__anext__()
    await stream.__anext__()
    assert cache_stats(on)["blocks_used"] > 0
    await stream.aclose()
    stats = await settled(on)
    assert stats["cache"]["blocks_used"] == 0 and stats["cache"]["live_sequences"] == 0
    assert stats["kv_cache_bytes"] == 0


async def test_tiny_budget_evicts_and_outputs_stay_the_same(off):
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=12))  # 6 blocks of 32 tokens
    try:
        questions = [f"Name one animal that starts with the letter {c}." for c in "ABCDEFGH"]
        got = await asyncio.gather(*(run(eng, chat(q, "Be brief.")) for q in questions))
        long_prompt = chat("Summarize: " + "the quick brown fox jumps over the lazy dog " * 25, "Be brief.")
        got_long, _ = await run(eng, long_prompt)  # needs more than the whole budget: runs alone
        stats = (await settled(eng))["cache"]
    finally:
        eng.shutdown()
    want = [(await run(off, chat(q, "Be brief.")))[0] for q in questions]
    assert [ids for ids, _ in got] == want
    assert got_long == (await run(off, long_prompt))[0]
    assert stats["blocks_capacity"] == 6 and stats["evictions"] > 0 and stats["over_budget_blocks"] > 0
    assert stats["blocks_used"] == 0 and stats["live_sequences"] == 0


async def test_a_kv_budget_six_times_too_small_preempts_and_outputs_stay_the_same(off):
    """8 requests whose worst cases need 24 blocks share a pool of 6: each starts when its prompt
    fits and takes blocks as it grows; when the pool runs out the newest is preempted and resumes
    later from its cached blocks. Greedy outputs equal the unconstrained run; nothing leaks and
    the pool never grows past its budget."""
    params = dict(max_tokens=32, ignore_eos=True)
    questions = [f"Write a poem about the letter {c}." for c in "ABCDEFGH"]
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=12))  # 6 blocks of 32 tokens
    try:
        got = await asyncio.gather(*(run(eng, chat(q, "Be brief."), **params) for q in questions))
        stats = await settled(eng)
    finally:
        eng.shutdown()
    want = await asyncio.gather(*(run(off, chat(q, "Be brief."), **params) for q in questions))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert stats["preempted"] > 0
    cache = stats["cache"]
    assert cache["blocks_capacity"] == 6 and cache["over_budget_blocks"] == 0
    assert cache["blocks_used"] == 0 and cache["live_sequences"] == 0


async def test_penalties_in_the_batch_equal_mlx_lms_processors(on, off):
    """The batch loop's vectorised penalties give mlx_lm's per-request logits processors' tokens."""
    params = dict(temperature=0, max_tokens=24, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)
    prompts = [chat(q, "Be brief.") for q in ("List ten fruits.", "Repeat the word cat many times.")]
    got = await asyncio.gather(*(run(on, p, **params) for p in prompts))
    want = await asyncio.gather(*(run(off, p, **params) for p in prompts))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


async def test_a_seeded_request_samples_the_same_tokens_through_preemptions(on):
    """Randomness is keyed by (seed, token position): a request preempted and resumed in a tiny
    budget samples what it samples with room to spare."""
    params = dict(temperature=0.9, top_p=0.95, top_k=40, max_tokens=40, ignore_eos=True)
    prompts = [chat(f"Write a poem about the letter {c}.", "Be brief.") for c in "ABCDE"]
    roomy = await asyncio.gather(*(run(on, p, seed=i, **params) for i, p in enumerate(prompts)))
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=12))
    try:
        tight = await asyncio.gather(*(run(eng, p, seed=i, **params) for i, p in enumerate(prompts)))
        stats = await settled(eng)
    finally:
        eng.shutdown()
    assert stats["preempted"] > 0
    assert [ids for ids, _ in tight] == [ids for ids, _ in roomy]


async def test_entry_count_mode(off):
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(memory_aware=False, max_cache_entries=2))
    try:
        prompts = [PromptInput(text=t) for t in ("Apples are", "Bridges are", "Clouds are")]
        for p in prompts:
            await run(eng, p)
        _, again_first = await run(eng, prompts[0])  # the oldest entry was dropped
        _, again_last = await run(eng, prompts[2])
        stats = cache_stats(eng)
    finally:
        eng.shutdown()
    assert again_first.cached_tokens == 0
    assert again_last.cached_tokens == again_last.prompt_tokens - 1
    assert stats["mode"] == "entries" and stats["entries"] == 2


async def test_gemma_sliding_window_equals_cache_off():
    """Gemma 3's layout (synthetic:gemma3_text, engine.loading.families: random weights, 5 of 6
    layers attend to a 16-token window). Prompts past the window, shared prefix; the first one
    decodes through the compiled step, and with `unpadded_decode: eager` (CUDA's default, forced
    here) the lone rows decode eagerly: the window masks its 5 layers, the global layer gets no mask."""
    from engine.loading.families import VOCAB

    rng = np.random.default_rng(7)
    shared = [int(t) for t in rng.integers(1, VOCAB, 45)]
    prompts = [PromptInput(token_ids=shared + [int(t) for t in rng.integers(1, VOCAB, 4)]) for _ in range(2)]
    configs = {
        "off": EngineConfig(paged_cache=False, block_size=8),
        "paged": EngineConfig(block_size=8),
        "eager": EngineConfig(unpadded_decode="eager", block_size=8),
    }
    results, compiled_steps, copy_steps = {}, {}, {}
    for name, config in configs.items():
        eng = AsyncEngine.from_source("synthetic:gemma3_text", config)
        try:
            results[name] = [await run(eng, p, max_tokens=6, ignore_eos=True) for p in prompts]
            stats = eng.stats()
            compiled_steps[name] = stats["compiled_steps"]  # the window in the compiled step's mask
            copy_steps[name] = stats["cache"].get("steps_working_copy", 0)
        finally:
            eng.shutdown()
    assert compiled_steps["paged"] > 0 and compiled_steps["eager"] == 0 < copy_steps["eager"]
    assert results["paged"][0][1].prompt_tokens > 2 * 16
    assert [ids for ids, _ in results["paged"]] == [ids for ids, _ in results["off"]]
    assert [ids for ids, _ in results["eager"]] == [ids for ids, _ in results["off"]]
    assert results["paged"][1][1].cached_tokens >= 40 and results["eager"][1][1].cached_tokens >= 40


async def test_a_replica_reports_the_prefixes_its_cache_still_holds():
    """The prefix-affinity report (deployments.prefix_residency): the router's text-block hashes
    of the prompts whose token blocks are still cached; an evicted prefix drops out of it."""
    from deployments.hop import GenerateRequest
    from deployments.prefix_residency import PrefixResidency
    from deployments.request_router import block_hashes, prompt_text

    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=12))  # 6 blocks of 32 tokens
    residency = PrefixResidency(block_chars=64)

    async def serve(system: str, question: str) -> list[int]:
        request = GenerateRequest(
            PromptInput(messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        )
        stream = eng.submit(request.prompt, SamplingParams(**GREEDY))
        key = residency.served(request, stream.prompt_ids, eng.block_hashes(stream.prompt_ids), eng.config.block_size)
        async for _ in stream:
            pass
        residency.finished(key)
        return block_hashes(prompt_text(request), 64)

    try:
        library = await serve(SYSTEM, QUESTIONS[0])
        first = (await residency.report(eng))["hashes"]
        for name in ("Aster", "Birch", "Cedar"):  # other tenants' prompts push the library's out
            newest = await serve(f"Tenant {name} support desk. " + "Answer politely and briefly. " * 8, "Hello?")
        later = (await residency.report(eng))["hashes"]
        queued_request = GenerateRequest(
            PromptInput(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Queued?"}])
        )
        ids = eng.encode(queued_request.prompt)
        queued = residency.served(queued_request, ids, eng.block_hashes(ids), eng.config.block_size)  # not finished yet
        while_queued = (await residency.report(eng))["hashes"]
        residency.finished(queued)
        eng.resident_blocks([eng.block_hashes([1] * 64)]).cancel()  # an asker that gave up
        await serve(SYSTEM, QUESTIONS[1])  # the engine lives on
        eng.check_health()
        eng.clear_cache()
        await settled(eng)
        cleared = (await residency.report(eng))["hashes"]
    finally:
        eng.shutdown()
    assert len(library) // 2 <= len(first) <= len(library) and first == library[: len(first)]
    assert library[0] not in later and newest[0] in later
    assert library[0] in while_queued  # a request still queued or running: its prefix counts as held
    assert cleared == []
