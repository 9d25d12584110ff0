"""What a JSON schema costs per token, inside the batch: constrained vs unconstrained decoding.

    python -m benchmarks structured                                  # SmolLM2 on this machine
    python -m benchmarks structured --model synthetic:qwen3-0.6b-8bit --tokenizer DIR   # GPU

For each batch size, in one process on the same loaded weights: B requests under a JSON schema
whose output cannot end within --tokens (an array of at least 64 short strings), then B plain
requests of exactly as many tokens (EOS ignored), then half and half. Every request produces the
same number of tokens, so the time per step compares like with like. A synthetic model (random
weights, a real model's shape) needs a real tokenizer for a grammar to mean anything: --tokenizer
gives it one (e.g. /tmp/smollm2-f32). Prints one JSON document and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .report import emit, mlx_machine

SCHEMA = {
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 64}},
    "required": ["words"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "List many short English words as JSON."}]


async def run_mode(engine, batch: int, tokens: int, constrained: int) -> dict:
    """`constrained` of the `batch` requests under SCHEMA; all produce exactly `tokens` tokens."""
    from engine.constraints import GuidedSpec
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    prompt = (
        PromptInput(messages=PROMPT)
        if engine.tokenizer.has_chat_template
        else PromptInput(token_ids=[11 + i for i in range(32)])
    )
    plain = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    guided = plain.model_copy(update={"guided": GuidedSpec(json_schema=SCHEMA)})

    async def one(params):
        n = 0
        async for out in engine.submit(prompt, params):
            n += len(out.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(guided if i < constrained else plain) for i in range(batch)))
    wall = time.perf_counter() - start
    if set(counts) != {tokens}:
        raise RuntimeError(f"requests ended early: {counts} (the schema should not complete in {tokens} tokens)")
    return {
        "batch": batch,
        "constrained": constrained,
        "tokens": sum(counts),
        "wall_s": round(wall, 3),
        "tok_per_s": round(sum(counts) / wall, 2),
        "ms_per_step": round(wall / tokens * 1000, 2),
    }


async def bench(engine, batches: list[int], tokens: int) -> list[dict]:
    await run_mode(engine, 1, 8, 1)  # compile the schema's grammar and warm the compiled mask once
    rows = []
    for batch in batches:
        for constrained in sorted({0, batch // 2, batch}, reverse=True):
            if batch == 1 and constrained == 0 and rows and rows[-1]["batch"] == 1 and rows[-1]["constrained"] == 0:
                continue
            print(f"batch {batch}, {constrained} constrained", file=sys.stderr, flush=True)
            rows.append(await run_mode(engine, batch, tokens, constrained))
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["constrained"] == 0)
        r["step_vs_unconstrained"] = round(r["ms_per_step"] / base["ms_per_step"], 3)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| batch | constrained rows | tok/s | ms per step | step time vs none |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['batch']} | {r['constrained']} | {r['tok_per_s']} | {r['ms_per_step']} | "
        f"{r['step_vs_unconstrained']:.3f}x |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokenizer", help="a real tokenizer for a synthetic model (a directory with tokenizer.json)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()  # on Linux CPU: float32 weights over OpenBLAS, as the server runs them
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine
    from engine.loading.loader import default_cache_dir
    from engine.loading.synthetic import local_source

    source = local_source(args.model, default_cache_dir(), tokenizer=args.tokenizer)
    engine = AsyncEngine.from_source(source, EngineConfig(max_num_seqs=max(args.batches), cache_memory_mb=512))
    try:
        rows = asyncio.run(bench(engine, args.batches, args.tokens))
    finally:
        engine.shutdown()
    emit(
        {
            "benchmark": "structured",
            "model": args.model,
            "tokenizer": args.tokenizer,
            "schema": SCHEMA,
            "tokens_per_request": args.tokens,
            "machine": mlx_machine(),
            "rows": rows,
        },
        table(rows),
        args.json_out,
    )


if __name__ == "__main__":
    main()
