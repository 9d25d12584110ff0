"""The paged KV cache against mlx_lm's contiguous cache (engine with paged_cache=False).

    python -m benchmarks paged [--quick] [--block-sizes 16 32 64 128] [--no-e2e-decode] [--json-out PATH]

1. Ten users arriving together, one ~500-token system prompt, distinct short questions (AsyncEngine,
   greedy, EOS ignored): TTFT p50 / max, aggregate completion tok/s, and the peak KV bytes held
   while they run. Paged: peak blocks in use x block bytes (+ decode working copies, if any);
   contiguous: the peak of mlx_lm's cache bytes (the loop's `nbytes`), and the
   ideal contiguous bytes (every token of every user once, no padding) for reference. Sampled after
   every engine step, on the engine thread.
2. TTFT cold vs warm for one ~1000-token prompt (paged; the cache cleared before each cold run), and
   the contiguous cache's TTFT for it, the three alternating.
3. Decode at batch 16 with 1000-token contexts: mlx_lm's decode loop (GenerationBatch) through its
   contiguous BatchKVCache, through the paged cache gathering blocks every step, and through the
   paged cache with decode working copies (what the engine uses when rows share little), on the
   same weights and synthetic K/V, in alternating rounds (this machine is shared: ratios per round,
   medians).
4. The same end to end (AsyncEngine, 16 distinct ~1000-token prompts, decode tok/s while all 16
   decode), paged vs contiguous. Slow (16k prompt tokens per engine on 2 cores): --no-e2e-decode.
5. Block size sweep: 1 (paged) and 3 for each --block-sizes.

Prints one JSON document, then markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from .probe import after_each_step
from .report import emit

SENTENCE = "Rule {i}: visitors of the botanical garden keep to the paths in zone {i} and never feed the fish."


def text_of_tokens(tokenizer, n: int, template: str = SENTENCE) -> str:
    """Text of about n tokens (whole sentences)."""
    parts = []
    while len(tokenizer.encode(" ".join(parts))) < n:
        parts.append(template.format(i=len(parts)))
    return " ".join(parts)


def chat_ids(tokenizer, system: str, question: str) -> list[int]:
    from engine.prompts import encode_prompt
    from engine.request import PromptInput

    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return encode_prompt(tokenizer, PromptInput(messages=msgs))


class StepProbe:
    """Wraps the scheduler's step (on the engine thread) to sample KV bytes after every step."""

    def __init__(self, engine):
        self.sched = engine.scheduler
        self.peak_cache_bytes = 0  # BatchGenerator.prompt_cache_nbytes
        self.peak_pool_bytes = 0  # paged: blocks in use + working copies
        self.steps = 0
        after_each_step(self.sched, self.sample)

    def sample(self) -> None:
        from engine.kv.manager import PagedCacheManager

        self.steps += 1
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.sched.gen.nbytes)
        cache = self.sched.cache
        if isinstance(cache, PagedCacheManager):
            held = cache.pool.used * cache.pool.block_bytes + sum(cache.ctx.copy_bytes.values())
            self.peak_pool_bytes = max(self.peak_pool_bytes, held)

    def reset(self) -> None:
        self.peak_cache_bytes = self.peak_pool_bytes = self.steps = 0


async def timed(engine, ids, max_tokens: int) -> dict:
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ttft, stamps, usage = None, [], None
    async for out in engine.submit(PromptInput(token_ids=ids), params):
        now = time.perf_counter()
        ttft = ttft if ttft is not None else now - start
        stamps += [now] * len(out.token_ids)
        usage = out.usage or usage
    return {
        "start": start,
        "ttft": ttft,
        "stamps": stamps,
        "cached": usage.cached_tokens,
        "prompt": usage.prompt_tokens,
    }


# --- 1. ten users, one system prompt ------------------------------------------------------------


async def ten_users(source: str, paged: bool, block_size: int, users: int, system_tokens: int, max_tokens: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    engine = AsyncEngine.from_source(source, EngineConfig(paged_cache=paged, block_size=block_size))
    try:
        tok = engine.tokenizer
        system = text_of_tokens(tok, system_tokens)
        prompts = [
            chat_ids(tok, system, f"Question {i}: is zone {i * 3 + 1} open today, and why?") for i in range(users)
        ]
        await timed(engine, chat_ids(tok, "Be brief.", "Hello!"), 4)  # warm-up
        engine.clear_cache()
        probe = StepProbe(engine)
        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(timed(engine, p, max_tokens) for p in prompts))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        cache = engine.stats()["cache"]
        token_bytes = kv_bytes_per_token(engine)
    finally:
        engine.shutdown()
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(len(r["stamps"]) for r in results)
    ideal = sum(len(p) + max_tokens for p in prompts) * token_bytes
    out = {
        "paged": paged,
        "block_size": block_size if paged else None,
        "users": users,
        "prompt_tokens": [len(p) for p in prompts][:3],
        "system_prompt_tokens": system_tokens,
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(ttfts[-1], 3),
        "tok_per_s": round(tokens / wall, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "completion_tokens": tokens,
        "cached_tokens": sorted(r["cached"] for r in results),
        "kv_bytes_peak": probe.peak_pool_bytes if paged else probe.peak_cache_bytes,
        "mlx_lm_cache_bytes_peak": probe.peak_cache_bytes,
        "ideal_contiguous_bytes": ideal,
    }
    if paged:
        out["cache"] = {
            k: cache[k]
            for k in (
                "blocks_used_peak",
                "block_bytes",
                "cow_copies",
                "steps_gathered",
                "steps_working_copy",
                "tokens_reused",
                "hits",
                "prefix_hits",
                "misses",
            )
        }
    return out


def kv_bytes_per_token(engine) -> int:
    from engine.kv.kv_storage import layer_block_bytes
    from engine.kv.manager import probe_layers

    layers, dtype = probe_layers(engine.loaded.model)
    return sum(layer_block_bytes(layers, dtype, 1))  # a block of one token


# --- 2. TTFT cold vs warm -------------------------------------------------------------------------


async def ttft_cold_warm(source: str, prompt_tokens: int, reps: int) -> dict:
    """Paged cold (cache cleared), paged warm (same prompt again) and contiguous, alternating."""
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    paged = AsyncEngine.from_source(source, EngineConfig())
    contiguous = AsyncEngine.from_source(source, EngineConfig(paged_cache=False))
    try:
        tok = paged.tokenizer
        ids = tok.encode(
            text_of_tokens(tok, prompt_tokens, "Chapter {i}: the lighthouse keeper wrote down the weather.")
        )
        for engine in (paged, contiguous):
            await timed(engine, ids[:64], 2)  # warm-up
        cold, warm, base, cached = [], [], [], 0
        for _ in range(reps):
            paged.clear_cache()
            cold.append((await timed(paged, ids, 1))["ttft"])
            r = await timed(paged, ids, 1)
            warm.append(r["ttft"])
            cached = r["cached"]
            base.append((await timed(contiguous, ids, 1))["ttft"])
    finally:
        paged.shutdown()
        contiguous.shutdown()
    c, w = statistics.median(cold), statistics.median(warm)
    return {
        "prompt_tokens": len(ids),
        "cold_ttft_s": round(c, 3),
        "warm_ttft_s": round(w, 4),
        "warm_over_cold": round(w / c, 4),
        "warm_cached_tokens": cached,
        "reps": reps,
        "contiguous_ttft_s": round(statistics.median(base), 3),
        "runs_s": {
            "cold": [round(x, 3) for x in cold],
            "warm": [round(x, 4) for x in warm],
            "contiguous": [round(x, 3) for x in base],
        },
    }


# --- 3. decode step, model level ---------------------------------------------------------------


def _contiguous_caches(shapes, batch: int, context: int) -> list:
    """mlx_lm's BatchKVCache per layer, filled with `context` columns of random K/V."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    caches = []
    for s in shapes:
        c = BatchKVCache([0] * batch)
        c.keys = mx.random.normal((batch, s.kv_heads, context, s.k_dim))
        c.values = mx.random.normal((batch, s.kv_heads, context, s.v_dim))
        c.offset, c._idx = mx.array([context] * batch), context
        caches.append(c)
    mx.eval([c.state for c in caches])
    return caches


def _paged_caches(model, block_size: int, policy: str, batch: int, context: int):
    """A paged cache manager with `batch` rows of `context` random tokens, and its per-layer caches."""
    import mlx.core as mx

    from engine.config import EngineConfig
    from engine.kv.manager import make_cache_manager
    from engine.kv.paged_cache import BatchPagedKVCache, SeqBlocks

    nl = len(model.layers)
    mgr = make_cache_manager(model, EngineConfig(block_size=block_size))
    mgr.ctx.policy = policy
    pool = mgr.pool
    rows = [SeqBlocks([pool.allocate() for _ in range(-(-context // block_size))], context, nl) for _ in range(batch)]
    for i in range(nl):
        pool.storage.k[i] = mx.random.normal(pool.storage.k[i].shape)
        pool.storage.v[i] = mx.random.normal(pool.storage.v[i].shape)
    mx.eval(pool.storage.k, pool.storage.v)
    return mgr, [BatchPagedKVCache(mgr.ctx, i, rows) for i in range(nl)]


def _step_times(decoders: dict, rounds: int, batch: int) -> dict:
    """Per decoder, the median ms a step over `rounds` interleaved rounds of 4 steps, and the
    process CPU time (all threads: the work, less the machine's noise), both also as ratios to
    the contiguous cache's in the same round."""
    per_round = {k: [] for k in decoders}
    cpu_round = {k: [] for k in decoders}
    for _ in range(rounds):
        for name, d in decoders.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(4):
                d.next()
            per_round[name].append((time.perf_counter() - t) / 4)
            cpu_round[name].append((time.process_time() - c) / 4)
    out = {}
    for name, times in per_round.items():
        ratios = [t / b for t, b in zip(times, per_round["contiguous"])]
        cpu_ratios = [t / b for t, b in zip(cpu_round[name], cpu_round["contiguous"])]
        out[name] = {
            "ms_per_step_median": round(statistics.median(times) * 1000, 1),
            "ms_per_step_min": round(min(times) * 1000, 1),
            "tok_per_s": round(batch / statistics.median(times), 1),
            "vs_contiguous": round(statistics.median(ratios), 3),
            "cpu_ms_per_step": round(statistics.median(cpu_round[name]) * 1000, 1),
            "cpu_vs_contiguous": round(statistics.median(cpu_ratios), 3),
        }
    return out


def decode_steps(source: str, block_sizes: list[int], batch: int, context: int, rounds: int) -> dict:
    """ms per decode step of mlx_lm's own decode loop (GenerationBatch: pipelined, async eval) over
    batch x context tokens of synthetic K/V: contiguous BatchKVCache vs the paged cache gathering
    blocks every step (per block size) vs the paged cache with decode working copies."""
    import mlx.core as mx
    from mlx_lm.generate import GenerationBatch, StopSequences
    from mlx_lm.sample_utils import make_sampler

    from engine.kv.manager import probe_layers
    from engine.loading.loader import load_model

    model = load_model(source).model
    shapes, _ = probe_layers(model)

    def decoder(cache):
        return GenerationBatch(
            model,
            list(range(batch)),
            mx.zeros((batch,), mx.uint32),
            cache,
            [[] for _ in range(batch)],
            [],
            make_sampler(0.0),
            [],
            [StopSequences() for _ in range(batch)],
            [10**9] * batch,
        )

    caches, managers = {"contiguous": _contiguous_caches(shapes, batch, context)}, {}
    for name, bs, policy in [
        *((f"paged_gather_bs{bs}", bs, "never") for bs in block_sizes),
        ("paged_working_copy", 32, "auto"),
    ]:
        managers[name], caches[name] = _paged_caches(model, bs, policy, batch, context)
    decoders = {name: decoder(c) for name, c in caches.items()}
    for d in decoders.values():  # warm-up (the contiguous cache grows its buffer on the first step)
        d.next(), d.next()
    return {
        "batch": batch,
        "context": context,
        "rounds": rounds,
        "steps": _step_times(decoders, rounds, batch),
        "working_copy_steps": managers["paged_working_copy"].ctx.counters["steps_working_copy"],
        "working_copy_builds": managers["paged_working_copy"].ctx.counters["working_copy_builds"],
    }


# --- 4. decode end to end -------------------------------------------------------------------------


async def decode_e2e(source: str, paged: bool, batch: int, context: int, max_tokens: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    engine = AsyncEngine.from_source(source, EngineConfig(paged_cache=paged, max_num_seqs=batch))
    try:
        tok = engine.tokenizer
        prompts = [
            tok.encode(
                f"Log {u}. " + text_of_tokens(tok, context - 8, f"Entry {{i}} of station {u}: wind {u}{{i}} knots.")
            )
            for u in range(batch)
        ]
        await timed(engine, prompts[0][:32], 2)
        results = await asyncio.gather(*(timed(engine, p, max_tokens) for p in prompts))
        cache = engine.stats()["cache"]
    finally:
        engine.shutdown()
    all_in = max(r["stamps"][0] for r in results)  # from here on every request decodes
    last = max(r["stamps"][-1] for r in results)
    after = sum(1 for r in results for t in r["stamps"] if t > all_in)
    out = {
        "paged": paged,
        "batch": batch,
        "context": len(prompts[0]),
        "max_tokens": max_tokens,
        "decode_tok_per_s": round(after / (last - all_in), 2),
        "ttft_max_s": round(max(r["ttft"] for r in results), 2),
    }
    if paged:
        out["steps_working_copy"], out["steps_gathered"] = cache["steps_working_copy"], cache["steps_gathered"]
    return out


# --- report ---------------------------------------------------------------------------------------


def tables(result: dict) -> str:
    lines = []
    users = result["ten_users"]
    base = next(r for r in users if not r["paged"])
    lines += [
        "### 10 users, one ~500-token system prompt",
        "",
        "| cache | block | TTFT p50 s | TTFT max s | agg tok/s | CPU s | peak KV MiB | saved vs contiguous (vs ideal) | reused tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in users:
        mb = r["kv_bytes_peak"] / 2**20
        saved = 1 - r["kv_bytes_peak"] / base["kv_bytes_peak"]
        saved_ideal = 1 - r["kv_bytes_peak"] / r["ideal_contiguous_bytes"]
        lines.append(
            f"| {'paged' if r['paged'] else 'contiguous'} | {r['block_size'] or '-'} | {r['ttft_p50_s']} "
            f"| {r['ttft_max_s']} | {r['tok_per_s']} | {r['cpu_s']} | {mb:.1f} | {saved:.1%} ({saved_ideal:.1%}) "
            f"| {sum(r['cached_tokens'])} |"
        )
    t = result["ttft"]
    lines += [
        "",
        "### TTFT, one prompt",
        "",
        "| prompt tokens | contiguous s | paged cold s | paged warm s | warm / cold | reused |",
        "|---|---|---|---|---|---|",
        f"| {t['prompt_tokens']} | {t['contiguous_ttft_s']} | {t['cold_ttft_s']} | {t['warm_ttft_s']} "
        f"| {t['warm_over_cold']:.1%} | {t['warm_cached_tokens']} |",
    ]
    d = result["decode_steps"]
    lines += [
        "",
        f"### Decode step, batch {d['batch']}, {d['context']}-token contexts (mlx_lm GenerationBatch, synthetic K/V)",
        "",
        "| cache | ms/step (median) | ms/step (min) | tok/s | wall vs contiguous | CPU ms/step | CPU vs contiguous |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in d["steps"].items():
        lines.append(
            f"| {name} | {s['ms_per_step_median']} | {s['ms_per_step_min']} | {s['tok_per_s']} "
            f"| {s['vs_contiguous']:.3f} | {s['cpu_ms_per_step']} | {s['cpu_vs_contiguous']:.3f} |"
        )
    if result.get("decode_e2e"):
        lines += [
            "",
            "### Decode end to end (AsyncEngine), 16 distinct prompts",
            "",
            "| cache | context | decode tok/s | TTFT max s |",
            "|---|---|---|---|",
        ]
        for r in result["decode_e2e"]:
            lines.append(
                f"| {'paged' if r['paged'] else 'contiguous'} | {r['context']} | {r['decode_tok_per_s']} | {r['ttft_max_s']} |"
            )
    return "\n".join(lines)


async def main_async(args) -> dict:
    from .report import mlx_machine

    result: dict = {"machine": mlx_machine(), "model": args.model}
    users = []
    for paged, bs in [(False, None)] + [(True, b) for b in args.block_sizes]:
        r = await ten_users(args.model, paged, bs or 32, args.users, args.system_tokens, args.max_tokens)
        users.append(r)
        print(
            f"ten users paged={paged} bs={bs}: ttft p50 {r['ttft_p50_s']} s, {r['tok_per_s']} tok/s, "
            f"peak KV {r['kv_bytes_peak'] / 2**20:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )
    result["ten_users"] = users
    result["ttft"] = await ttft_cold_warm(args.model, args.prompt_tokens, args.reps)
    print(f"ttft: {result['ttft']}", file=sys.stderr, flush=True)
    result["decode_steps"] = decode_steps(args.model, args.block_sizes, args.batch, args.context, args.rounds)
    print(f"decode steps: {result['decode_steps']}", file=sys.stderr, flush=True)
    if args.e2e_decode:
        result["decode_e2e"] = [
            await decode_e2e(args.model, p, args.batch, args.context, args.e2e_tokens) for p in (False, True)
        ]
        print(f"decode e2e: {result['decode_e2e']}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per user (EOS ignored)")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="TTFT cold/warm prompt")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--e2e-tokens", type=int, default=64)
    parser.add_argument("--no-e2e-decode", dest="e2e_decode", action="store_false")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and reps, no end-to-end decode")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.reps, args.e2e_decode = 4, 1, False
    result = asyncio.run(main_async(args))
    emit(result, tables(result), args.json_out)


if __name__ == "__main__":
    main()
