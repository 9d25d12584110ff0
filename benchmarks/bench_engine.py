"""Engine-level continuous batching: single request vs N concurrent, against raw mlx_lm.

    python -m benchmarks engine                       # SmolLM2 on this machine
    python -m benchmarks engine --model synthetic:qwen3-0.6b-8bit --batches 1 5 16   # GPU
    python -m benchmarks engine --eager               # + the engine without the compiled step
    python -m benchmarks engine --pipelining          # + decode pipelined and not, side by side
    python -m benchmarks engine --column-write        # + KV column by slice update and by select
    python -m benchmarks engine --unpadded --ragged   # + unpadded batches eager and compiled
    python -m benchmarks engine --mlx-lm-loop         # the engine over mlx_lm's BatchGenerator

For each batch size it runs our AsyncEngine (N requests submitted together) and then raw
mlx_lm BatchGenerator on the same loaded weights, in the same process, with the seed's prompts
cycled, a fixed max_tokens and EOS ignored. The engine runs with the options users get: the
model's `engine:` block in the serve config (`--config`, default serve_config.yaml) when it names
the model, else EngineConfig's defaults, so the paged cache is on; only the batch is widened to the
largest batch measured. `--mlx-lm-loop` turns the paged cache off: the engine then runs mlx_lm's
BatchGenerator itself (the loop of models whose caches the paged cache cannot hold), so it differs
from raw only by the engine around the loop. Each run records OpenBLAS's threads at its end (the
engine chooses them while it runs, `engine.cpu_threads`, and the raw run after it inherits them). With `--rounds N` every run is made N times,
interleaved, and the table gives each one's median (the JSON keeps every round's tok/s): a
single pass on a noisy host says little. Prints one JSON document and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
from pathlib import Path

from .openai_bench.prompts import SEED_QUESTIONS
from .report import emit, mlx_machine

ROOT = Path(__file__).resolve().parents[1]


def prompt_ids(tokenizer, n: int, ragged: bool = False) -> list[list[int]]:
    """The seed's prompts cycled; on the synthetic model token ids, 32 each, or with `ragged` 32-47
    (rows of different lengths: a padded decode batch, as a server mostly runs)."""
    from engine.prompts import encode_prompt
    from engine.request import PromptInput

    if not tokenizer.has_chat_template:  # synthetic model: token-id prompts
        lengths = [32 + (5 * i) % 16 if ragged else 32 for i in range(n)]
        return [[(7 * i + j) % 1000 + 10 for j in range(length)] for i, length in enumerate(lengths)]
    return [
        encode_prompt(tokenizer, PromptInput(messages=[{"role": "user", "content": SEED_QUESTIONS[i % 5]}]))
        for i in range(n)
    ]


async def run_engine(engine, prompts, max_tokens: int) -> dict:
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(ids):
        start = time.perf_counter()
        ttft, n = None, 0
        async for out in engine.submit(PromptInput(token_ids=ids), params):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            n += len(out.token_ids)
        return ttft, n

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return summarize(results, time.perf_counter() - start)


def run_raw(model, prompts, max_tokens: int, config) -> dict:
    """mlx_lm's BatchGenerator alone: the baseline our loop must keep up with."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        completion_batch_size=config.max_num_seqs,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
    )
    start = time.perf_counter()
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
    first, counts, done = {}, {u: 0 for u in uids}, set()
    while len(done) < len(uids):
        for r in gen.next_generated():
            first.setdefault(r.uid, time.perf_counter() - start)
            counts[r.uid] += 1
            if r.finish_reason is not None:
                done.add(r.uid)
    gen.close()
    return summarize([(first[u], counts[u]) for u in uids], time.perf_counter() - start)


def run_scheduler(engine, prompts, max_tokens: int, profile: bool = False) -> dict:
    """Our scheduler driven synchronously on this thread: the loop's cost without the thread hop."""
    import cProfile
    import pstats

    from engine.kv.manager import make_cache_manager
    from engine.request import Request as Sequence
    from engine.sampling import SamplingParams
    from engine.scheduler import Scheduler
    from engine.text_stream import TextStream

    # A cache of its own, made on this thread: MLX streams belong to the thread that made them.
    cache = make_cache_manager(engine.loaded.model, engine.config)
    sched = Scheduler(engine.loaded.model, engine.tokenizer, engine.config, cache)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    seqs = [
        Sequence(f"s{i}", ids, params, max_tokens, TextStream(engine.tokenizer.detokenizer, []))
        for i, ids in enumerate(prompts)
    ]
    for seq in seqs:
        sched.add(seq)
    while sched.has_work():
        sched.step()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    wall = time.perf_counter() - start
    sched.gen.close()
    return summarize([(s.first_token_time - s.arrival, len(s.output_ids)) for s in seqs], wall)


def median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s, with every run's tok/s beside it (`--rounds`)."""
    ranked = sorted(runs, key=lambda r: r["tok_per_s"])
    out = {**ranked[(len(ranked) - 1) // 2], "tok_per_s_rounds": [r["tok_per_s"] for r in runs]}
    if "blas_threads" in runs[0]:
        out["blas_threads_rounds"] = [r["blas_threads"] for r in runs]
    return out


def summarize(results, wall: float) -> dict:
    ttfts = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
        "ttft_max_ms": round(max(ttfts) * 1000, 1),
    }


def table(rows: list[dict]) -> str:
    extra = [k for k in VARIANTS if k in rows[0]]
    lines = [
        "| batch | engine tok/s |"
        + "".join(f" engine, {VARIANTS[k][0]} tok/s |" for k in extra)
        + " scheduler (sync) tok/s | raw mlx_lm tok/s | engine/raw | engine speedup vs single "
        "| raw speedup vs single | TTFT p50 ms (engine" + "".join(f" / {k}" for k in extra) + " / raw) |",
        "|---" * (8 + len(extra)) + "|",
    ]
    single, raw_single = rows[0]["ours"]["tok_per_s"], rows[0]["raw"]["tok_per_s"]
    for r in rows:
        o, s, b = r["ours"], r["scheduler"], r["raw"]
        lines.append(
            f"| {r['batch']} | {o['tok_per_s']} |"
            + "".join(f" {r[k]['tok_per_s']} |" for k in extra)
            + f" {s['tok_per_s']} | {b['tok_per_s']} "
            f"| {o['tok_per_s'] / b['tok_per_s']:.3f} | {o['tok_per_s'] / single:.2f}x "
            f"| {b['tok_per_s'] / raw_single:.2f}x | {o['ttft_p50_ms']}"
            + "".join(f" / {r[k]['ttft_p50_ms']}" for k in extra)
            + f" / {b['ttft_p50_ms']} |"
        )
    return "\n".join(lines)


# Variants of the engine run beside the default one: name -> (table label, EngineConfig update).
VARIANTS = {
    "eager": ("eager decode", {"compiled_decode": False}),
    "pipelined": ("decode pipelined", {"pipelined_decode": True}),
    "unpipelined": ("decode unpipelined", {"pipelined_decode": False}),
    "slice": ("column by slice update", {"decode_column_write": "slice"}),
    "select": ("column by select", {"decode_column_write": "select"}),
    "unpadded_eager": ("unpadded eager", {"unpadded_decode": "eager"}),
    "unpadded_compiled": ("unpadded compiled", {"unpadded_decode": "compiled"}),
}


def engine_config(args):
    """The engine's options as users get them (see the module's docstring)."""
    from deployments.config import check_serve_config
    from engine.config import EngineConfig

    named = {m.name: m.engine for app in check_serve_config(args.config) for m in app.models if m.kind == "chat"}
    options = named[args.model].model_dump(exclude_unset=True) if args.model in named else {}
    options["max_num_seqs"] = max(options.get("max_num_seqs", 1), *args.batches)
    if args.mlx_lm_loop:
        options["paged_cache"] = False
    return EngineConfig.model_validate(options)


def blas_threads() -> int | None:
    """OpenBLAS's threads in this process now (None: MLX's BLAS is not OpenBLAS)."""
    from threadpoolctl import ThreadpoolController

    libs = ThreadpoolController().select(prefix="libopenblas").info()
    return libs[0]["num_threads"] if libs else None


async def main_async(args) -> dict:
    from engine.engine import AsyncEngine

    source = args.model
    config = engine_config(args)
    engine = AsyncEngine.from_source(source, config)
    # The same engine with one setting changed (--eager: the model's own uncompiled decode step, for
    # the compiled step's gain; --pipelining: decode pipelined and not, for what pipelining buys).
    names = (
        (["eager"] if args.eager else [])
        + (["pipelined", "unpipelined"] if args.pipelining else [])
        + (["slice", "select"] if args.column_write else [])
        + (["unpadded_eager", "unpadded_compiled"] if args.unpadded else [])
    )
    variants = {k: AsyncEngine.from_source(source, config.model_copy(update=VARIANTS[k][1])) for k in names}
    model, tokenizer = engine.loaded.model, engine.tokenizer
    rows = []
    for n in args.batches:
        prompts = prompt_ids(tokenizer, n, args.ragged)
        # Warm-up at this batch size first (kernel compilation for new shapes must not count;
        # --warmup-tokens as many as --max-tokens: every shape of the run, the compiled step's too).
        await run_engine(engine, prompts, args.warmup_tokens)
        run_raw(model, prompts, args.warmup_tokens, config)
        for variant in variants.values():
            await run_engine(variant, prompts, args.warmup_tokens)
        runs = collections.defaultdict(list)
        for _ in range(args.rounds):  # interleaved, so a slow minute of the host hits every run alike
            runs["ours"].append({**await run_engine(engine, prompts, args.max_tokens), "blas_threads": blas_threads()})
            raw = run_raw(model, prompts, args.max_tokens, config)  # same weights; our loop idle
            runs["raw"].append({**raw, "blas_threads": blas_threads()})
            for k, variant in variants.items():
                runs[k].append(await run_engine(variant, prompts, args.max_tokens))
        sched = run_scheduler(engine, prompts, args.max_tokens, profile=args.profile and n == args.batches[0])
        rows.append({"batch": n, "scheduler": sched, **{k: median_run(v) for k, v in runs.items()}})
        ours, raw = rows[-1]["ours"], rows[-1]["raw"]
        print(
            f"batch {n}: engine {ours['tok_per_s']} tok/s, scheduler {sched['tok_per_s']}, raw {raw['tok_per_s']}",
            file=sys.stderr,
            flush=True,
        )
    for e in (engine, *variants.values()):
        e.shutdown()
    return {
        "machine": mlx_machine(),
        "model": engine.info,
        "engine_config": config.model_dump(mode="json", exclude_defaults=True),
        "max_tokens": args.max_tokens,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model source or synthetic:qwen3-0.6b-8bit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 5, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--warmup-tokens", type=int, default=8, help="tokens of the warm-up run before each measurement"
    )
    parser.add_argument(
        "--config", default=str(ROOT / "serve_config.yaml"), help="the serve config whose engine options the model gets"
    )
    parser.add_argument(
        "--mlx-lm-loop",
        action="store_true",
        help="run the engine without the paged cache, over mlx_lm's BatchGenerator (raw's own loop)",
    )
    parser.add_argument("--paged", action="store_true", help="the default now (kept for older commands)")
    parser.add_argument("--eager", action="store_true", help="also run the engine without the compiled decode step")
    parser.add_argument(
        "--pipelining", action="store_true", help="also run the engine with its decode steps pipelined and unpipelined"
    )
    parser.add_argument(
        "--column-write",
        action="store_true",
        help="also run the engine with the decode step's KV column written by slice update and by select",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each run this many times, interleaved; the table gives the median",
    )
    parser.add_argument(
        "--unpadded",
        action="store_true",
        help="also run the engine with unpadded decode batches eager (unmasked) and compiled",
    )
    parser.add_argument(
        "--ragged", action="store_true", help="synthetic model: prompts of 32-47 tokens, so decode batches are padded"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the synchronous scheduler at the first batch size"
    )
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    emit(result, table(result["rows"]), args.json_out)


if __name__ == "__main__":
    main()
