"""Admission by use vs by worst case, in one fixed KV budget (engine alone, same process).

    python -m benchmarks admission --kv-mb 48 --requests 16 --max-tokens 1024

16 chat requests with a generous max_tokens (as clients send it) but answers that end on their
own (greedy, short questions): `kv_admission: reserve` admits a request only when prompt +
max_tokens fits next to the running requests' worst cases; `on_demand` (the default) when its
prompt fits, taking blocks as it grows and preempting the newest when the pool runs out. Reports,
per mode: the most sequences decoding at once, completion tok/s (total tokens / wall), TTFT
p50 / max, preemptions, and whether the outputs are identical across modes. JSON, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from .openai_bench.prompts import SEED_QUESTIONS
from .report import emit

QUESTIONS = SEED_QUESTIONS + ["What is the boiling point of water?", "Name a planet.", "What is 10 times 3?"]


async def run_mode(source: str, mode: str, args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    engine = AsyncEngine.from_source(source, EngineConfig(cache_memory_mb=args.kv_mb, kv_admission=mode))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    async def one(i: int):
        start = time.perf_counter()
        ttft, ids = None, []
        prompt = PromptInput(messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (#{i})"}])
        async for out in engine.submit(prompt, params):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            ids += out.token_ids
        return ttft, ids

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(args.requests)))
    wall = time.perf_counter() - start
    stats = engine.stats()
    engine.shutdown()
    tokens = sum(len(ids) for _, ids in results)
    ttfts = [t for t, _ in results]
    out = {
        "mode": mode,
        "batch_peak": stats["batch_peak"],
        "tok_per_s": round(tokens / wall, 2),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 2),
        "ttft_max_s": round(max(ttfts), 2),
        "preempted": stats["preempted"],
        "blocks_capacity": stats["cache"]["blocks_capacity"],
        "blocks_used_peak": stats["cache"]["blocks_used_peak"],
        "outputs": [ids for _, ids in results],
    }
    print(
        f"{mode}: peak batch {out['batch_peak']}, {out['tok_per_s']} tok/s, preempted {out['preempted']}",
        file=sys.stderr,
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--kv-mb", type=int, default=48)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    rows = [asyncio.run(run_mode(args.model, mode, args)) for mode in ("reserve", "on_demand")]
    same = rows[0]["outputs"] == rows[1]["outputs"]
    for r in rows:
        r.pop("outputs")
    doc = {
        "model": args.model,
        "kv_mb": args.kv_mb,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "outputs_identical": same,
        "rows": rows,
    }
    lines = [
        "| admission | most sequences at once | tok/s | TTFT p50 / max (s) | preempted | blocks peak / capacity |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['mode']} | {r['batch_peak']} | {r['tok_per_s']} | {r['ttft_p50_s']} / {r['ttft_max_s']} "
        f"| {r['preempted']} | {r['blocks_used_peak']} / {r['blocks_capacity']} |"
        for r in rows
    ]
    lines.append(f"outputs identical across modes: {same}")
    emit(doc, "\n".join(lines), args.json_out)


if __name__ == "__main__":
    main()
