"""The headline table against peer servers: same weights, same harness, one server at a time.

    python -m benchmarks peers --label ours --base-url http://127.0.0.1:8000 \
        --model smollm2-135m-instruct --out /tmp/ours.json
    python -m benchmarks peers --label mlx_lm.server --base-url http://127.0.0.1:8081 \
        --model /tmp/smollm2-f32 --out /tmp/mlx_lm.json
    python -m benchmarks peers --merge /tmp/ours.json /tmp/mlx_lm.json --out docs/results/peers_cpu.json

Rows (all streamed, temperature 0, 64 new tokens, prompts that ask for long answers and
`ignore_eos` where the server takes it): TTFT p50 of single requests with the seed's short chat
prompts; completion tok/s with 1, 5 and 16 concurrent clients (total tokens / wall time of the
wave, median of the waves); TTFT of a fresh ~1,000-token prompt (a nonce makes it a cache miss).
Errors are counted, never retried. Prints progress to stderr, then JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import statistics
import sys
import time

from .openai_bench.prompts import SEED_QUESTIONS
from .report import emit

LONG = "Answer at length, in detail, with examples: "
MAX_TOKENS = 64


class Target:
    def __init__(self, base_url: str, model: str):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
        self.model = model
        self.extra: dict = {}
        self.errors: list[str] = []

    async def probe(self) -> None:
        """Send ignore_eos only if the server takes it."""
        try:
            await self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=2,
                extra_body={"ignore_eos": True},
            )
            self.extra = {"ignore_eos": True}
        except Exception:  # noqa: BLE001 - a 400 here means: without it
            self.extra = {}

    async def one(self, content: str, max_tokens: int = MAX_TOKENS) -> tuple[float | None, int]:
        """(TTFT s, completion tokens) of one streamed chat request."""
        start = time.perf_counter()
        ttft, chunks, usage = None, 0, None
        try:
            stream = await self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=self.extra,
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    chunks += 1
        except Exception as exc:  # noqa: BLE001 - counted, never retried
            self.errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            return None, 0
        return ttft, usage if usage is not None else chunks


async def wave(target: Target, n: int) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(target.one(LONG + SEED_QUESTIONS[i % 5]) for i in range(n)))
    return sum(tokens for _, tokens in results) / (time.perf_counter() - start)


def long_prompt() -> str:
    """About 1,000 tokens of plain words, unique to this call."""
    words = " ".join(f"item{secrets.token_hex(2)} is filed under shelf {i % 37} in aisle {i % 11}." for i in range(95))
    return f"[{secrets.token_hex(8)}] Here is an inventory list. {words} Which aisle holds the most items?"


async def run(args) -> dict:
    t = Target(args.base_url, args.model)
    await t.probe()
    say = lambda *a: print(f"[{args.label}]", *a, file=sys.stderr, flush=True)  # noqa: E731 - a one-line local helper
    await wave(t, 5)  # warm-up: kernels for these shapes, and the servers' caches
    ttfts = []
    for q in SEED_QUESTIONS * 2:
        ttft, _ = await t.one(q, max_tokens=8)
        if ttft is not None:
            ttfts.append(ttft)
    say(f"single TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms")
    rows = {"single_ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1)}
    for n in (1, 5, 16):
        rates = [await wave(t, n) for _ in range(args.waves)]
        rows[f"tok_s_{n}"] = round(statistics.median(rates), 2)
        rows[f"tok_s_{n}_all"] = [round(r, 2) for r in rates]
        say(f"{n} clients: {rows[f'tok_s_{n}']} tok/s {rows[f'tok_s_{n}_all']}")
    cold = []
    for _ in range(2):
        ttft, _ = await t.one(long_prompt(), max_tokens=4)
        if ttft is not None:
            cold.append(ttft)
    rows["cold_1k_ttft_s"] = round(min(cold), 2) if cold else None
    rows["cold_1k_ttft_all_s"] = [round(c, 2) for c in cold]
    say(f"cold ~1k-token prompt TTFT {rows['cold_1k_ttft_s']} s")
    rows["speedup_5"] = round(rows["tok_s_5"] / rows["tok_s_1"], 2)
    rows["speedup_16"] = round(rows["tok_s_16"] / rows["tok_s_1"], 2)
    rows["errors"] = len(t.errors)
    rows["error_kinds"] = sorted(set(t.errors))[:5]
    return {
        "label": args.label,
        "base_url": args.base_url,
        "model": args.model,
        "ignore_eos": bool(t.extra),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.platform(),
        "rows": rows,
    }


def table(results: list[dict]) -> str:
    keys = [
        ("single TTFT p50 (ms)", "single_ttft_p50_ms"),
        ("1 client tok/s", "tok_s_1"),
        ("5 clients tok/s", "tok_s_5"),
        ("speedup at 5", "speedup_5"),
        ("16 clients tok/s", "tok_s_16"),
        ("speedup at 16", "speedup_16"),
        ("cold ~1k-token TTFT (s)", "cold_1k_ttft_s"),
        ("errors", "errors"),
    ]
    lines = ["| | " + " | ".join(r["label"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for name, key in keys:
        lines.append(f"| {name} | " + " | ".join(str(r["rows"].get(key)) for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label")
    p.add_argument("--base-url")
    p.add_argument("--model")
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier runs into one report")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.merge:
        results = [r for f in args.merge for r in (json.load(open(f)).get("results") or [json.load(open(f))])]
    else:
        results = [asyncio.run(run(args))]
    emit({"results": results}, table(results), args.out)


if __name__ == "__main__":
    main()
