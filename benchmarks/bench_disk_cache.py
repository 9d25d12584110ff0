"""Time to first token of a long system prompt after an eviction: cold, from the disk KV cache, from RAM.

    python -m benchmarks diskcache                                  # SmolLM2, 2k-token system prompt
    python -m benchmarks diskcache --system-tokens 256 --rounds 1   # a seconds-long smoke

In process, AsyncEngine, token-id prompts (seeded random ids), greedy, one new token. Each round
uses a fresh disk directory (`engine.disk_cache` on):

1. engine A, started: the system prompt and question 0: **cold** (nothing cached anywhere);
2. engine A: the system prompt and question 1: **from RAM** (the prefix cache holds the system
   prompt's blocks); A shuts down, which writes what its disk tier has queued;
3. engine B, a new engine on the same directory (what the governor's reload, a restart of
   `serve run` or a new replica on the machine is): the system prompt and question 2: **from disk**
   (the blocks read back, checked and put in B's pool before the rest is computed).

TTFT is submit to the first token (two are asked for: a request's blocks go to the disk tier
when it ends, so the copy-out is not in its TTFT); the RAM request waits until the first one's
blocks are written (`written_s`), so the writer thread does not run beside it. The files were just written, so the reads come from the OS's
page cache; after a long eviction on a busy machine, from the disk itself. `--rounds` rounds after
`--warmup-rounds` unrecorded ones (kernels compile there); the table gives medians, the JSON every
round. Progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time

from .report import emit, fmt, md_table, mlx_machine

QUESTION_TOKENS = 16


def prompts(vocab: int, system_tokens: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """A system prompt and three distinct questions, random token ids (never 0)."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(system_tokens)]
    questions = [[rng.randrange(1, vocab) for _ in range(QUESTION_TOKENS)] for _ in range(3)]
    return system, questions


async def ask(engine, ids: list[int]) -> dict:
    """One request, two tokens (the blocks are offered to the disk when it ends, after its first
    token): its TTFT (monotonic clock) and cached tokens."""
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    submitted = time.monotonic()
    first, usage = None, None
    async for out in engine.submit(PromptInput(token_ids=ids), params):
        first = first or out.first_token_time
        usage = out.usage or usage
    return {"ttft_s": round(first - submitted, 4), "cached_tokens": usage.cached_tokens}


def make_engine(args, path: str):
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    config = EngineConfig(
        cache_memory_mb=args.cache_mb, disk_cache={"enabled": True, "path": path, "max_gb": args.max_gb}
    )
    return AsyncEngine.from_source(args.model, config)


def one_round(args, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="orchard-diskcache-") as path:
        first = make_engine(args, path)
        try:
            vocab = first.loaded.config["vocab_size"]
            system, questions = prompts(vocab, args.system_tokens, seed)
            cold = asyncio.run(ask(first, system + questions[0]))
            written_s = written(first)  # the RAM figure without the writer beside it
            ram = asyncio.run(ask(first, system + questions[1]))
        finally:
            started = time.monotonic()
            first.shutdown()
            flush_s = time.monotonic() - started
        second = make_engine(args, path)
        try:
            disk = asyncio.run(ask(second, system + questions[2]))
            tier = second.stats()["cache"]["disk"]
        finally:
            second.shutdown()
    return {
        "cold": cold,
        "disk": disk,
        "ram": ram,
        "written_s": written_s,
        "shutdown_s": round(flush_s, 3),
        "disk_entries": tier["entries"],
        "disk_bytes": tier["bytes"],
        "disk_hits": tier["hits"],
    }


def written(engine, timeout_s: float = 300.0) -> float:
    """Seconds until the engine's disk tier has written what it was offered (its stats say so)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        disk = engine.stats()["cache"]["disk"]
        if disk["queued"] == 0 and disk["writes"] > 0:
            break
        time.sleep(0.05)
    return round(time.monotonic() - started, 3)


def summarize(rounds: list[dict]) -> dict:
    def median(kind: str) -> float:
        return round(statistics.median(r[kind]["ttft_s"] for r in rounds), 4)

    out = {f"ttft_{k}_s": median(k) for k in ("cold", "disk", "ram")}
    out["cold_over_disk"] = round(out["ttft_cold_s"] / out["ttft_disk_s"], 2)
    out["cold_over_ram"] = round(out["ttft_cold_s"] / out["ttft_ram_s"], 2)
    out["cached_tokens"] = {k: sorted({r[k]["cached_tokens"] for r in rounds}) for k in ("cold", "disk", "ram")}
    out["disk_bytes"] = rounds[-1]["disk_bytes"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=512, help="the engines' KV budget (RAM)")
    p.add_argument("--max-gb", type=float, default=4.0, help="the disk tier's cap")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()  # on a CPU-only Linux, OpenBLAS as the replicas get it (a no-op elsewhere)
    args = parse_args(argv)
    rounds = []
    for i in range(args.warmup_rounds + args.rounds):
        r = one_round(args, seed=i)
        warm = i < args.warmup_rounds
        print(
            f"round {i}{' (warm-up)' if warm else ''}: TTFT cold {r['cold']['ttft_s']} s, disk {r['disk']['ttft_s']} s "
            f"(cached {r['disk']['cached_tokens']}), RAM {r['ram']['ttft_s']} s (cached {r['ram']['cached_tokens']})",
            file=sys.stderr,
            flush=True,
        )
        if not warm:
            rounds.append(r)
    summary = summarize(rounds)
    doc = {"suite": "diskcache", "machine": mlx_machine(), "args": vars(args), "summary": summary, "rounds": rounds}
    table = md_table(
        ["system prompt", "TTFT cold", "TTFT from disk", "TTFT from RAM", "cold / disk", "cold / RAM"],
        [
            [
                f"{args.system_tokens} tokens",
                fmt(summary["ttft_cold_s"], " s"),
                fmt(summary["ttft_disk_s"], " s"),
                fmt(summary["ttft_ram_s"], " s"),
                fmt(summary["cold_over_disk"], "x"),
                fmt(summary["cold_over_ram"], "x"),
            ]
        ],
    )
    emit(doc, table, args.out)
    return 0
