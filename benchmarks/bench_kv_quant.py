"""Quantized KV blocks (`engine.kv_bits`): quality, capacity and speed at 16, 8 and 4 bits, per model.

    python -m benchmarks kvquant                        # everything
    python -m benchmarks kvquant --parts quality capacity  # what a shared 2-core box may run

- quality: perplexity of a fixed English text (`data/kv_quality_text.txt`: CPython's "Execution
  model" and "The import statement" reference sections from `pydoc_data.topics`, 18 kB, ~4,100
  tokens for SmolLM2 and Gemma 3) computed through the
  paged cache itself: the prompt in chunks of `--chunk` tokens, each chunk attending to the blocks
  the earlier ones wrote (quantized as served); and greedy agreement with 16-bit KV on the seed's
  five prompts (all five at once, so they batch): outputs identical, and the mean share of each
  16-bit output matched before the first differing token.
- capacity: in one KV budget (`--cache-mb`), the blocks the pool holds and the sequences of
  `--seq-tokens` that fit, from the cache manager's own budget arithmetic.
- throughput: the engine in-process at `--clients` concurrent requests (the seed's prompts cycled,
  greedy, EOS ignored, `--max-tokens` each) in that budget: completion tok/s, preemptions. A
  timing: take it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

from .openai_bench.prompts import SEED_QUESTIONS
from .report import emit, md_table, mlx_machine

MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]
TEXT = Path(__file__).parent / "data" / "kv_quality_text.txt"


def perplexity(model, tokens: list[int], bits: int, chunk: int, group: int = 64, block_size: int = 32) -> float:
    """exp(mean NLL) of `tokens[1:]`, the text prefilled in chunks through a fresh paged cache."""
    import mlx.core as mx

    from engine.config import EngineConfig
    from engine.kv.manager import PagedCacheManager, make_cache_manager

    mgr = make_cache_manager(
        model, EngineConfig(kv_bits=bits, kv_group_size=group, block_size=block_size, cache_memory_mb=1024)
    )
    assert isinstance(mgr, PagedCacheManager), "the model's caches are not paged"
    seq, _ = mgr.acquire(tokens, 1)
    ctx = mgr.batch_kv()
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, chunk):
        ids = tokens[start : min(start + chunk, len(tokens) - 1)]
        caches = ctx.caches([seq], chunk=[len(ids)])
        logits = model(mx.array([ids]), cache=caches)[0].astype(mx.float32)
        targets = mx.array(tokens[start + 1 : start + 1 + len(ids)])
        losses = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        mx.eval(losses, ctx.take_writes())
        ctx.flush(caches)
        nll += losses.sum().item()
        count += len(ids)
    mgr.release(seq)
    return math.exp(nll / count)


def prompt_for(model_name: str, question: str):
    from engine.request import PromptInput

    if "gemma" in model_name or model_name.startswith("synthetic:"):  # no chat template worth the name
        return PromptInput(text=question)
    return PromptInput(messages=[{"role": "user", "content": question}])


async def greedy_outputs(source: str, bits: int, max_tokens: int, group: int = 64) -> list[list[int]]:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine
    from engine.sampling import SamplingParams

    engine = AsyncEngine.from_source(source, EngineConfig(kv_bits=bits, kv_group_size=group))
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)

        async def one(q: str) -> list[int]:
            return [t async for out in engine.submit(prompt_for(source, q), params) for t in out.token_ids]

        return list(await asyncio.gather(*(one(q) for q in SEED_QUESTIONS)))
    finally:
        engine.shutdown()


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Outputs identical, and the mean share of each reference output matched before they differ."""
    shares = []
    for a, b in zip(reference, other):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / len(a) if a else float(not b))
    return {
        "identical": sum(a == b for a, b in zip(reference, other)),
        "prompts": len(reference),
        "matched_share": round(sum(shares) / len(shares), 3),
    }


async def quality(source: str, args) -> list[dict]:
    from engine.loading.loader import load_model

    loaded = load_model(source)
    tokens = loaded.tokenizer.encode(TEXT.read_text())[: args.text_tokens]
    rows, reference = [], None
    for bits in args.bits:
        start = time.perf_counter()
        ppl = perplexity(loaded.model, tokens, bits, args.chunk, args.group_size)
        outputs = await greedy_outputs(source, bits, args.agree_tokens, args.group_size)
        reference = outputs if reference is None else reference
        rows.append(
            {
                "model": source,
                "kv_bits": bits,
                "kv_group_size": args.group_size if bits < 16 else None,
                "text_tokens": len(tokens),
                "perplexity": round(ppl, 4),
                **{f"agree_{k}": v for k, v in agreement(reference, outputs).items()},
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_vs_first"] = round(row["perplexity"] / base - 1, 4)
    return rows


def capacity(source: str, args) -> list[dict]:
    from engine.config import EngineConfig
    from engine.kv.manager import make_cache_manager
    from engine.loading.loader import load_model

    model = load_model(source).model
    rows = []
    for bits in args.bits:
        mgr = make_cache_manager(
            model, EngineConfig(kv_bits=bits, kv_group_size=args.group_size, cache_memory_mb=args.cache_mb)
        )
        stats = mgr.stats()
        per_seq = -(-args.seq_tokens // stats["block_size"])
        rows.append(
            {
                "model": source,
                "kv_bits": bits,
                "cache_mb": args.cache_mb,
                "block_bytes": stats["block_bytes"],
                "blocks": stats["blocks_capacity"],
                "tokens": stats["blocks_capacity"] * stats["block_size"],
                "sequences": stats["blocks_capacity"] // per_seq,
            }
        )
    return rows


async def throughput_run(source: str, bits: int, clients: int, args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine
    from engine.sampling import SamplingParams

    engine = AsyncEngine.from_source(
        source,
        EngineConfig(kv_bits=bits, kv_group_size=args.group_size, cache_memory_mb=args.cache_mb, max_num_seqs=clients),
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    async def one(i: int) -> int:
        prompt = prompt_for(source, SEED_QUESTIONS[i % len(SEED_QUESTIONS)])
        return sum([len(out.token_ids) async for out in engine.submit(prompt, params)])

    try:
        await asyncio.gather(*(one(i) for i in range(clients)))  # warm-up: traces, blocks
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(clients))))
        wall = time.perf_counter() - start
        stats = engine.stats()
    finally:
        engine.shutdown()
    return {
        "model": source,
        "kv_bits": bits,
        "clients": clients,
        "tok_per_s": round(tokens / wall, 2),
        "batch_peak": stats["batch_peak"],
        "preempted": stats["preempted"],
    }


async def throughput(source: str, args) -> list[dict]:
    return [await throughput_run(source, bits, clients, args) for bits in args.bits for clients in args.clients]


def tables(doc: dict) -> str:
    out = []
    if doc.get("quality"):
        head = ["model", "kv_bits", "group", "perplexity", "vs first", "identical outputs", "matched share"]
        rows = [
            [r["model"], r["kv_bits"], r["kv_group_size"] or "-", f"{r['perplexity']:.3f}", f"{100 * r['perplexity_vs_first']:+.2f}%",
             f"{r['agree_identical']}/{r['agree_prompts']}", r["agree_matched_share"]]
            for r in doc["quality"]
        ]  # fmt: skip
        out.append(md_table(head, rows))
    if doc.get("capacity"):
        head = ["model", "kv_bits", "block bytes", "blocks", "tokens", "sequences"]
        rows = [
            [r["model"], r["kv_bits"], r["block_bytes"], r["blocks"], r["tokens"], r["sequences"]]
            for r in doc["capacity"]
        ]
        out.append(md_table(head, rows))
    if doc.get("throughput"):
        head = ["model", "kv_bits", "clients", "tok/s", "batch peak", "preempted"]
        rows = [
            [r[k] for k in ("model", "kv_bits", "clients", "tok_per_s", "batch_peak", "preempted")]
            for r in doc["throughput"]
        ]
        out.append(md_table(head, rows))
    return "\n\n".join(out)


async def main_async(args) -> dict:
    doc = {"machine": mlx_machine(), "options": {k: v for k, v in vars(args).items() if k != "json_out"}}
    for part in args.parts:
        doc[part] = []
        for source in args.models:
            if part == "quality":
                doc[part] += await quality(source, args)
            elif part == "capacity":
                doc[part] += capacity(source, args)
            else:
                doc[part] += await throughput(source, args)
    return doc


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--parts", nargs="+", choices=["quality", "capacity", "throughput"], default=["quality", "capacity", "throughput"])  # fmt: skip
    p.add_argument(
        "--bits", nargs="+", type=int, choices=[16, 8, 4], default=[16, 8, 4], help="the first is the reference"
    )
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64, help="kv_group_size of 8 and 4 bits")
    p.add_argument("--text-tokens", type=int, default=8192, help="most tokens of the text (it has ~4,100)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk of the perplexity run (tokens)")
    p.add_argument("--agree-tokens", type=int, default=64, help="max_tokens of the greedy agreement run")
    p.add_argument("--cache-mb", type=int, default=64, help="the one KV budget of the capacity and throughput parts")
    p.add_argument("--seq-tokens", type=int, default=1024, help="a sequence's tokens (prompt + output) for capacity")
    p.add_argument("--clients", nargs="+", type=int, default=[16, 64])
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request (throughput)")
    p.add_argument("--json-out")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    doc = asyncio.run(main_async(args))
    emit(doc, tables(doc), args.json_out)


if __name__ == "__main__":
    main()
