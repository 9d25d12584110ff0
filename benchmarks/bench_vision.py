"""A vision-language model's time to first token: a cold image, the same image again, a new prompt
on a seen image, and text only.

    python -m benchmarks vision                                              # tiny synthetic:gemma3-vlm, this CPU
    python -m benchmarks vision --model synthetic:gemma-3-4b-vlm --out vision.json   # gemma-3-4b's shapes, a GPU

The engine in-process (AsyncEngine), greedy, one request at a time, `--new-tokens` each. Each
round uses a fresh random image (`--image-size` pixels square; the processor resizes it to the
model's size) and a fresh question, in this order:
  cold         the new image and question, cache cleared first: preprocessing, the vision encoder,
               the whole prompt's prefill
  same         the same image and question again: the prefix cache holds the whole prompt but
               its last token, so the image is not even encoded again
  seen image   the same image, another question: the encoder cache only (the question comes
               before the image in the prompt, so no block of the image is reused)
  text only    a new question alone, no image (its first blocks, the chat template's opening, hit)
TTFT: submit to the first token. `--rounds` rounds after `--warmup-rounds` unrecorded ones; the
table gives medians and cold / each, the JSON every round and the engine's vision stats.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time

from .report import emit, md_table, mlx_machine

CASES = ("cold", "same", "seen image", "text only")


def image(seed: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def prompt(question: str, picture: bytes | None):
    from engine.request import PromptInput

    if picture is None:
        return PromptInput(messages=[{"role": "user", "content": question}])
    parts = [{"type": "text", "text": question}, {"type": "image"}]
    return PromptInput(messages=[{"role": "user", "content": parts}], images=[picture])


async def ttft(engine, request, new_tokens: int) -> dict:
    from engine.sampling import SamplingParams

    start = time.perf_counter()
    first, usage = None, None
    async for out in engine.submit(request, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)):
        if first is None and out.token_ids:
            first = time.perf_counter() - start
        usage = out.usage or usage
    return {
        "ttft_ms": round(first * 1000, 2),
        "cached_tokens": usage.cached_tokens,
        "prompt_tokens": usage.prompt_tokens,
    }


async def one_round(engine, seed: int, args) -> dict:
    picture = image(seed, args.image_size)
    question = f"Round {seed}: what is in this picture, and what colour is its upper left corner?"
    other = f"Round {seed}: is there any text in this picture? Answer in one word."
    engine.clear_cache()
    return {
        "cold": await ttft(engine, prompt(question, picture), args.new_tokens),
        "same": await ttft(engine, prompt(question, picture), args.new_tokens),
        "seen image": await ttft(engine, prompt(other, picture), args.new_tokens),
        "text only": await ttft(
            engine, prompt(f"Round {seed}: tell me about a long river, please.", None), args.new_tokens
        ),
    }


async def run(args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    engine = AsyncEngine(args.model, EngineConfig(cache_memory_mb=args.cache_mb))
    try:
        for w in range(args.warmup_rounds):
            await one_round(engine, 10_000 + w, args)
        rounds = []
        for r in range(args.rounds):
            rounds.append(await one_round(engine, r, args))
            print(f"round {r + 1}/{args.rounds}: {rounds[-1]}", file=sys.stderr)
        stats = engine.stats().get("vision")
        footprint = engine.footprint.to_dict()
    finally:
        engine.shutdown()
    medians = {c: statistics.median(x[c]["ttft_ms"] for x in rounds) for c in CASES}
    return {
        "suite": "vision",
        "machine": mlx_machine(),
        "model": args.model,
        "options": vars(args),
        "ttft_ms_p50": medians,
        "cold_over": {c: round(medians["cold"] / medians[c], 2) if medians[c] else None for c in CASES[1:]},
        "vision": stats,
        "footprint": footprint,
        "rounds": rounds,
    }


def table(doc: dict) -> str:
    last = doc["rounds"][-1]
    rows = [
        [c, doc["ttft_ms_p50"][c], last[c]["cached_tokens"], last[c]["prompt_tokens"], doc["cold_over"].get(c, 1.0)]
        for c in CASES
    ]
    head = f"{doc['model']} on {doc['machine']['device']}, {len(doc['rounds'])} rounds"
    return head + "\n" + md_table(["case", "TTFT p50 ms", "cached tokens", "prompt tokens", "cold / case"], rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:gemma3-vlm", help="a vision model's source")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--image-size", type=int, default=512, help="the test image's side in pixels")
    p.add_argument("--cache-mb", type=int, default=512, help="the KV cache budget")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    doc = asyncio.run(run(args))
    emit(doc, table(doc), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
